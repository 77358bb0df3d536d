//! Garbage collection as the server runs it: on a schedule and on request
//! (`POST /admin/gc`), both through [`run`], which times it, counts it in the metrics and
//! logs it. The scheduled run is audited here; a requested one by the endpoint table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_engine::gc::{GcOptions, GcReport};

use crate::error::ApiError;
use crate::App;

/// What started a collection (the metrics' `trigger` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `gc_interval_secs`.
    Schedule,
    /// `POST /admin/gc`.
    Request,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Schedule => "schedule",
            Trigger::Request => "request",
        }
    }
}

/// Runs one collection off the async threads; one that changed something is a
/// `gc.finished` webhook event by `actor`.
pub async fn run(
    app: &App,
    opts: GcOptions,
    trigger: Trigger,
    actor: &str,
) -> Result<GcReport, ApiError> {
    let store = app.store.clone();
    let started = Instant::now();
    let result = crate::handlers::blocking(move || {
        ballast_engine::gc::collect(&store, &opts, crate::now_secs()).map_err(ApiError::from)
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    if app.config.metrics {
        app.metrics.gc(
            trigger.label(),
            secs,
            result.as_ref().ok(),
            crate::now_secs(),
        );
        app.metrics.liveness_refresh.notify_one();
    }
    match &result {
        Ok(r) => tracing::info!(
            trigger = trigger.label(),
            dry_run = r.dry_run,
            reclaimed = r.bytes_reclaimed,
            moved = r.bytes_moved,
            paced_ms = r.paced_ms,
            segments = r.segments_compacted,
            links = r.blob_links_removed,
            manifests = r.manifests_removed,
            secs,
            "garbage collection"
        ),
        Err(e) => {
            tracing::warn!(trigger = trigger.label(), error = %e, "garbage collection failed")
        }
    }
    if let Ok(r) = &result {
        if !r.dry_run {
            *app.last_gc.lock() = Some((
                crate::now_secs(),
                trigger.label().to_owned(),
                serde_json::to_value(r).unwrap_or_default(),
            ));
        }
        let kind = crate::webhooks::Kind::GcFinished;
        if !r.dry_run && app.webhooks.wanted(kind, None) {
            let mut e = crate::webhooks::Event::new(kind, actor);
            let mut detail = serde_json::to_value(r).unwrap_or_default();
            if let Some(d) = detail.as_object_mut() {
                d.insert("trigger".into(), trigger.label().into());
            }
            e.detail = Some(detail);
            let hooks = app.webhooks.clone();
            crate::handlers::blocking(move || hooks.record(&[e])).await?;
        }
    }
    result
}

/// The options a scheduled collection runs with.
pub fn scheduled_options(app: &App) -> GcOptions {
    GcOptions {
        grace_secs: app.config.gc_grace_secs,
        delete_untagged: app.config.gc_delete_untagged,
        dead_fraction_min: app.config.gc_min_dead_fraction,
        pace_bytes_per_sec: app.config.gc_pace_mb_per_sec << 20,
        fold_below_bytes: app.config.gc_fold_below_bytes(),
        ..Default::default()
    }
}

/// Collects every `gc_interval_secs` (never when 0), auditing each run as `system`.
pub async fn scheduled(app: Arc<App>) {
    let interval = app.config.gc_interval_secs;
    if interval == 0 {
        return;
    }
    loop {
        tokio::time::sleep(Duration::from_secs(interval)).await;
        let mut e = crate::audit::Event::new("system", "gc.run");
        match run(&app, scheduled_options(&app), Trigger::Schedule, "system").await {
            Ok(r) => {
                e.reason = Some(format!(
                    "scheduled: {} bytes reclaimed, {} blob links and {} manifests removed",
                    r.bytes_reclaimed, r.blob_links_removed, r.manifests_removed
                ));
            }
            Err(err) => {
                e.outcome = "failed".into();
                e.reason = Some(err.to_string());
            }
        }
        app.audit.record(e).await;
    }
}
