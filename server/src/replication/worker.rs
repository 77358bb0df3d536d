//! Each rule's worker: follows the outbox from the rule's cursor and replicates each change
//! it covers, in order, retrying with backoff (an outage is waited out; another failure is
//! given up on after a few attempts, recorded, and left to the next reconciliation); the
//! cursor moves once a change is done, so a restart or a kill -9 repeats at most the one in
//! progress (copies are idempotent). And its reconciliation: at start, every
//! `reconcile_interval_secs` and on request, every covered tag's digest is compared with the
//! target's and copied when it differs; with `delete`, tags the target has and this registry
//! does not are deleted there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ballast_engine::Digest;

use super::copy::{self, Copied};
use super::Rule;
use crate::remote::Failure;
use crate::webhooks::{Event, Kind};
use crate::App;

/// Events read from the outbox at a time.
const BATCH: usize = 256;

/// Failures other than outages tried this many times before an event is left to the next
/// reconciliation.
const ATTEMPTS: u32 = 5;

/// Starts every rule's worker and reconciliation.
pub fn start(app: &Arc<App>) -> Vec<tokio::task::JoinHandle<()>> {
    app.replication
        .iter()
        .flat_map(|r| {
            [
                tokio::spawn(follow(app.clone(), r.clone())),
                tokio::spawn(reconcile_loop(app.clone(), r.clone())),
            ]
        })
        .collect()
}

async fn follow(app: Arc<App>, rule: Arc<Rule>) {
    let Some(outbox) = app.webhooks.outbox().cloned() else {
        return;
    };
    let consumer = rule.consumer();
    loop {
        let Some(from) = outbox.cursor(&consumer) else {
            return;
        };
        let (o, n) = (outbox.clone(), consumer.clone());
        let batch = match tokio::task::spawn_blocking(move || o.read(&n, from, BATCH)).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(rule = %rule.cfg.name, error = %e, "reading the outbox failed");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rule.wake.notified()).await;
            continue;
        }
        for entry in batch {
            match serde_json::from_slice::<Event>(&entry.payload) {
                Ok(event) if rule.wants(event.kind, event.repository.as_deref()) => {
                    apply_with_retries(&app, &rule, &event).await;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(rule = %rule.cfg.name, seq = entry.seq, error = %e, "skipping an outbox event that does not parse");
                }
            }
            let (o, n, next) = (outbox.clone(), consumer.clone(), entry.seq + 1);
            match tokio::task::spawn_blocking(move || o.ack(&n, next)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(rule = %rule.cfg.name, error = %e, "moving the replication cursor failed");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

async fn apply_with_retries(app: &App, rule: &Rule, event: &Event) {
    let mut delay = Duration::from_millis(rule.cfg.retry_initial_ms.max(1));
    let max_delay = Duration::from_secs(rule.cfg.retry_max_delay_secs.max(1));
    let mut attempt = 1u32;
    loop {
        match apply(app, rule, event).await {
            Ok(()) => return,
            Err(f) => {
                let what = format!(
                    "{} {}{}: {f}",
                    event.kind.name(),
                    event.repository.as_deref().unwrap_or(""),
                    event
                        .tag
                        .as_deref()
                        .map(|t| format!(":{t}"))
                        .or_else(|| event.digest.as_deref().map(|d| format!("@{d}")))
                        .unwrap_or_default()
                );
                rule.failed(what.clone());
                if !f.is_outage() && attempt >= ATTEMPTS {
                    tracing::warn!(rule = %rule.cfg.name, attempt, error = %what, "replication gave up on a change; the next reconciliation tries it again");
                    return;
                }
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::info!(rule = %rule.cfg.name, attempt, error = %what, "replication failed; retrying");
                }
                tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
                delay = (delay * 2).min(max_delay);
                attempt += 1;
            }
        }
    }
}

/// Replicates one change.
async fn apply(app: &App, rule: &Rule, event: &Event) -> Result<(), Failure> {
    let Some(repo) = event.repository.as_deref() else {
        return Ok(());
    };
    let event_digest: Option<Digest> = event.digest.as_deref().and_then(|d| d.parse().ok());
    match event.kind {
        Kind::TagSet => {
            let Some(tag) = event.tag.as_deref().filter(|t| rule.covers_tag(t)) else {
                return Ok(());
            };
            // What the tag points at now: a tag moved twice is copied once, where it is.
            let now = {
                let state = app.store.catalog().read();
                state.repos.get(repo).and_then(|r| r.tags.get(tag).cloned())
            };
            let Some(digest) = now else {
                return Ok(());
            };
            if copy::copy(app, rule, repo, &digest, Some(tag)).await? == Copied::Sent {
                copied(app, rule, repo, Some(tag), &digest).await;
            }
        }
        Kind::ManifestPushed if event.tag.is_none() => {
            // A referrer pushed by digest (a signature, an SBOM) follows its subject once
            // that is on the target; other untagged manifests go with what lists them.
            let Some(digest) = event_digest.clone() else {
                return Ok(());
            };
            let subject = {
                let state = app.store.catalog().read();
                state
                    .repos
                    .get(repo)
                    .and_then(|r| r.manifests.get(&digest))
                    .and_then(|l| l.subject.clone())
            };
            let Some(subject) = subject else {
                return Ok(());
            };
            match rule
                .client
                .head_manifest(&rule.target(repo), &subject.to_string())
                .await
            {
                Ok(_) => {}
                Err(Failure::NotFound) => return Ok(()),
                Err(f) => return Err(f),
            }
            if copy::copy(app, rule, repo, &digest, None).await? == Copied::Sent {
                copied(app, rule, repo, None, &digest).await;
            }
        }
        Kind::TagDeleted if rule.cfg.delete => {
            let Some(tag) = event.tag.as_deref().filter(|t| rule.covers_tag(t)) else {
                return Ok(());
            };
            copy::delete_tag(app, rule, repo, tag).await?;
            deleted(app, rule, repo, Some(tag), None).await;
        }
        Kind::ManifestDeleted if rule.cfg.delete => {
            let Some(digest) = event_digest.clone() else {
                return Ok(());
            };
            copy::delete_manifest(rule, repo, &digest).await?;
            deleted(app, rule, repo, None, Some(&digest)).await;
        }
        _ => {}
    }
    Ok(())
}

/// Counts and audits a copy (`replication.copy`).
async fn copied(app: &App, rule: &Rule, repo: &str, tag: Option<&str>, digest: &Digest) {
    let reason = format!("to {} as {}", rule.cfg.url, rule.target(repo));
    done(
        app,
        rule,
        "replication.copy",
        repo,
        tag,
        Some(digest),
        reason,
    )
    .await;
}

/// Counts and audits a delete (`replication.delete`).
async fn deleted(app: &App, rule: &Rule, repo: &str, tag: Option<&str>, digest: Option<&Digest>) {
    rule.counters.deletes.fetch_add(1, Ordering::Relaxed);
    let reason = format!("on {} in {}", rule.cfg.url, rule.target(repo));
    done(app, rule, "replication.delete", repo, tag, digest, reason).await;
}

/// Notes a replicated change: the rule's last success, and its audit line.
async fn done(
    app: &App,
    rule: &Rule,
    action: &str,
    repo: &str,
    tag: Option<&str>,
    digest: Option<&Digest>,
    reason: String,
) {
    rule.counters
        .last_success
        .store(crate::now_secs(), Ordering::Relaxed);
    let mut e = crate::audit::Event::new(format!("replication:{}", rule.cfg.name), action);
    e.repository = Some(repo.to_owned());
    e.tag = tag.map(str::to_owned);
    e.digest = digest.map(ToString::to_string);
    e.reason = Some(reason);
    app.audit.record(e).await;
}

async fn reconcile_loop(app: Arc<App>, rule: Arc<Rule>) {
    loop {
        reconcile(&app, &rule).await;
        match rule.cfg.reconcile_interval_secs {
            0 => return,
            every => tokio::time::sleep(Duration::from_secs(every)).await,
        }
    }
}

/// Reconciles a rule now: copies what differs (and deletes with `delete`); the report.
pub async fn reconcile(app: &App, rule: &Rule) -> serde_json::Value {
    let pairs: Vec<(String, String, Digest)> = {
        let state = app.store.catalog().read();
        state
            .repos
            .iter()
            .filter(|(name, _)| rule.covers(name))
            .flat_map(|(name, r)| {
                r.tags
                    .iter()
                    .filter(|(t, _)| rule.covers_tag(t))
                    .map(move |(t, d)| (name.clone(), t.clone(), d.clone()))
            })
            .collect()
    };
    let (mut copies, mut deletes, mut failures) = (0u64, 0u64, 0u64);
    for (repo, tag, digest) in &pairs {
        match copy::copy(app, rule, repo, digest, Some(tag)).await {
            Ok(Copied::Sent) => {
                copies += 1;
                copied(app, rule, repo, Some(tag), digest).await;
            }
            Ok(_) => {}
            Err(f) => {
                failures += 1;
                rule.failed(format!("reconciling {repo}:{tag}: {f}"));
            }
        }
    }
    if rule.cfg.delete {
        let mut repos: Vec<&String> = pairs.iter().map(|(r, _, _)| r).collect();
        repos.dedup();
        for repo in repos {
            let there = match rule.client.tags(&rule.target(repo)).await {
                Ok(t) => t,
                Err(Failure::NotFound) => continue,
                Err(f) => {
                    failures += 1;
                    rule.failed(format!(
                        "reconciling {repo}: listing the target's tags: {f}"
                    ));
                    continue;
                }
            };
            for tag in there.iter().filter(|t| rule.covers_tag(t)) {
                if pairs.iter().any(|(r, t, _)| r == repo && t == tag) {
                    continue;
                }
                match copy::delete_tag(app, rule, repo, tag).await {
                    Ok(()) => {
                        deletes += 1;
                        deleted(app, rule, repo, Some(tag), None).await;
                    }
                    Err(f) => {
                        failures += 1;
                        rule.failed(format!("reconciling {repo}: deleting {tag}: {f}"));
                    }
                }
            }
        }
    }
    let report = serde_json::json!({
        "rule": rule.cfg.name,
        "at": crate::now_secs(),
        "tags_checked": pairs.len(),
        "copied": copies,
        "deleted": deletes,
        "failed": failures,
    });
    rule.counters
        .reconciliations
        .fetch_add(1, Ordering::Relaxed);
    *rule.counters.last_reconcile.lock() = Some(report.clone());
    if copies + deletes + failures > 0 {
        tracing::info!(rule = %rule.cfg.name, copies, deletes, failures, "replication reconciled");
    }
    report
}

/// Reconciles the rules now (all, or the one named); their reports.
pub async fn reconcile_now(app: &App, name: Option<&str>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for rule in app
        .replication
        .iter()
        .filter(|r| name.is_none_or(|n| r.cfg.name == n))
    {
        out.push(reconcile(app, rule).await);
    }
    out
}
