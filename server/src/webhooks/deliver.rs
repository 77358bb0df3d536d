//! One endpoint's delivery worker: reads the outbox from the endpoint's cursor, sends each
//! event it wants, in order, retrying with exponential backoff and jitter until it is
//! delivered or older than `max_age_secs` (then a dead letter), and moves the cursor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ballast_engine::outbox::{Entry, Outbox};

use super::event::{sign, Event, Kind};
use super::{Endpoint, Format};

/// Events read from the outbox at a time.
const BATCH: usize = 256;

pub(super) async fn run(outbox: Outbox, ep: Arc<Endpoint>, source: String, base_url: String) {
    let name = ep.cfg.name.clone();
    loop {
        let Some(from) = outbox.cursor(&name) else {
            return;
        };
        let o = outbox.clone();
        let n = name.clone();
        let batch = match tokio::task::spawn_blocking(move || o.read(&n, from, BATCH)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %name, error = %e, "reading the webhook outbox failed");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            // Woken by a new event; the timeout also covers one recorded between the read
            // and the wait.
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wake.notified()).await;
            continue;
        }
        let mut done = from;
        for entry in batch {
            if let Some(event) = wanted(&ep, &entry) {
                deliver(&outbox, &ep, &entry, &event, &source, &base_url).await;
            }
            done = entry.seq + 1;
            // (The cursor moves after each event: a restart repeats at most the one being
            // sent, which receivers deduplicate by its id.)
            let o = outbox.clone();
            let n = name.clone();
            match tokio::task::spawn_blocking(move || o.ack(&n, done)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(endpoint = %name, error = %e, "moving the webhook cursor failed");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    break;
                }
                Err(_) => return,
            }
        }
        let _ = done;
    }
}

/// The event, when this endpoint wants it (kind, repository, pull sampling).
fn wanted(ep: &Endpoint, entry: &Entry) -> Option<Event> {
    let event: Event = match serde_json::from_slice(&entry.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(endpoint = %ep.cfg.name, seq = entry.seq, error = %e, "skipping an outbox event that does not parse");
            return None;
        }
    };
    // A redelivered dead letter goes to its endpoint whatever the filters say now.
    if entry.target.is_none() && !ep.wants(event.kind, event.repository.as_deref()) {
        return None;
    }
    if event.kind == Kind::ManifestPulled
        && entry.target.is_none()
        && ep.cfg.pull_sample < 1.0
        && rand::random::<f64>() >= ep.cfg.pull_sample
    {
        return None;
    }
    if ep.cfg.format == Format::Distribution && event.distribution_action().is_none() {
        return None;
    }
    Some(event)
}

/// Sends one event until it is delivered or too old (then buries it).
async fn deliver(
    outbox: &Outbox,
    ep: &Endpoint,
    entry: &Entry,
    event: &Event,
    source: &str,
    base_url: &str,
) {
    let (body, content_type) = match ep.cfg.format {
        Format::Cloudevents => (event.cloudevent(source), "application/cloudevents+json"),
        Format::Distribution => (
            serde_json::json!({"events": [event.distribution(source, base_url)]}),
            "application/vnd.docker.distribution.events.v1+json",
        ),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let mut delay = Duration::from_millis(ep.cfg.retry_initial_ms);
    let max_delay = Duration::from_secs(ep.cfg.retry_max_delay_secs.max(1));
    let mut attempt = 1u32;
    loop {
        let timestamp = crate::now_secs();
        let mut req = ep
            .client
            .post(&ep.cfg.url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("Ballast-Event-Id", &event.id)
            .header("Ballast-Event-Type", event.kind.name())
            .header("Ballast-Timestamp", timestamp.to_string())
            .header("Ballast-Signature", sign(&ep.secret, timestamp, &body))
            .header("Ballast-Delivery-Attempt", attempt.to_string());
        for (k, v) in &ep.cfg.headers {
            req = req.header(k, v);
        }
        let failure = match req.body(body.clone()).send().await {
            Ok(res) if res.status().is_success() => None,
            Ok(res) => Some(format!("HTTP {}", res.status())),
            Err(e) if e.is_timeout() => Some(format!("no answer within {} s", ep.cfg.timeout_secs)),
            Err(e) => Some(format!("{e}")),
        };
        let Some(why) = failure else {
            ep.delivered.fetch_add(1, Ordering::Relaxed);
            return;
        };
        ep.failed.fetch_add(1, Ordering::Relaxed);
        let age = crate::now_secs().saturating_sub(entry.at);
        if age >= ep.cfg.max_age_secs {
            let reason = format!("{why} (attempt {attempt}; gave up after {age} s)");
            tracing::warn!(endpoint = %ep.cfg.name, event = %event.id, %reason, "webhook event moved to the dead letters");
            let o = outbox.clone();
            let (n, e) = (ep.cfg.name.clone(), entry.clone());
            let buried =
                tokio::task::spawn_blocking(move || o.bury(&n, &e, &reason, crate::now_secs()))
                    .await;
            if !matches!(buried, Ok(Ok(()))) {
                tracing::error!(endpoint = %ep.cfg.name, event = %event.id, "recording a dead letter failed; the event is dropped");
            }
            ep.dead.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if attempt == 1 || attempt.is_power_of_two() {
            tracing::info!(endpoint = %ep.cfg.name, event = %event.id, attempt, error = %why, "webhook delivery failed; retrying");
        }
        // Full jitter over the upper half: receivers coming back are not hit all at once.
        let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        // Never sleep past the give-up point by much.
        let left = Duration::from_secs(ep.cfg.max_age_secs.saturating_sub(age).max(1));
        tokio::time::sleep(jittered.min(left)).await;
        delay = (delay * 2).min(max_delay);
        attempt += 1;
    }
}
