//! Prometheus metrics: what the server counts as requests pass (`Metrics`), and what it
//! reads from the engine at each scrape (`EngineCollector`). Served at `/metrics` (the
//! `admin` permission when auth is on) and, when `metrics_listen` is set, on a listener of
//! its own without auth. Names and units follow Prometheus's conventions; docs/operations.md
//! lists them.

use std::fmt::Write as _;
use std::sync::Arc;

use ballast_engine::inspect::Liveness;
use ballast_engine::stats::HistogramSnapshot;
use ballast_engine::{Store, Uploads};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::routes::PathKind;

mod bucket;
mod peers;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A request's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route group (`manifests`, `blobs`, `uploads`, ...; `none` for unknown paths).
    pub route: &'static str,
    /// The method (`other` for methods no endpoint takes).
    pub method: &'static str,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub status: &'static str,
}

/// A latency observation's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// As in [`RequestLabels`].
    pub route: &'static str,
    /// As in [`RequestLabels`].
    pub method: &'static str,
}

/// A garbage collection's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GcLabels {
    /// `schedule` or `request`.
    pub trigger: &'static str,
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

/// What the server counts.
pub struct Metrics {
    registry: Registry,
    /// Requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from the request's head to its response's head.
    pub request_seconds: Family<RouteLabels, Histogram>,
    /// Request body bytes read.
    pub received_bytes: Counter,
    /// Response body bytes (of responses with a known length; HEAD sends none).
    pub sent_bytes: Counter,
    /// Of the bytes sent, those sent from segment files with `sendfile` (`sendfile.rs`).
    pub sendfile_bytes: Counter,
    /// Requests being served.
    pub in_flight: Gauge,
    /// Logins refused for a wrong name or password.
    pub login_failures: Counter,
    /// Logins refused because too many failed before (lockout).
    pub login_lockouts: Counter,
    /// Requests answered 429 (lockouts, upload bounds).
    pub rate_limited: Counter,
    /// Collections run.
    pub gc_runs: Family<GcLabels, Counter>,
    /// How long collections took.
    pub gc_seconds: Histogram,
    /// Bytes collections freed.
    pub gc_reclaimed_bytes: Counter,
    /// Live bytes collections copied forward.
    pub gc_moved_bytes: Counter,
    /// Time collections rested so that running pushes kept the disk (pacing).
    pub gc_paced_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// When the last collection (not a dry run) finished.
    pub gc_last_run: Gauge,
    /// Pushes and uploads refused by a quota.
    pub quota_refusals: Counter,
    /// Tags and manifests retention deleted.
    pub retention_deletions: Counter,
    liveness: Arc<Mutex<Option<(Liveness, u64)>>>,
    /// Wakes [`refresh_liveness`] early (after a collection).
    pub liveness_refresh: tokio::sync::Notify,
    /// The counters of `requests` by (route, method, status) index, once used.
    request_cells: Box<[std::sync::OnceLock<Counter>]>,
    /// The histograms of `request_seconds` by (route, method) index, once used.
    latency_cells: Box<[std::sync::OnceLock<Histogram>]>,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 16 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

impl Metrics {
    /// Registers every metric; the engine's are read from `store` and `uploads` at scrape.
    pub fn new(
        store: Store,
        uploads: Uploads,
        webhooks: Arc<crate::webhooks::Webhooks>,
        upstreams: Vec<Arc<crate::upstream::Upstream>>,
        rules: Vec<Arc<crate::replication::Rule>>,
        bucket: Option<Arc<ballast_bucket::Shipper>>,
        replica: Option<Arc<ballast_bucket::Follower>>,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("ballast");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route group, method and status class",
            requests.clone(),
        );
        let request_seconds =
            Family::<RouteLabels, Histogram>::new_with_constructor(latency_histogram as fn() -> _);
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's head to its response's head (a streamed body goes on after)",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let received_bytes = Counter::default();
        registry.register_with_unit(
            "http_received",
            "Request body bytes read",
            Unit::Bytes,
            received_bytes.clone(),
        );
        let sent_bytes = Counter::default();
        registry.register_with_unit(
            "http_sent",
            "Response body bytes of responses with a known length (HEAD sends none)",
            Unit::Bytes,
            sent_bytes.clone(),
        );
        let sendfile_bytes = Counter::default();
        registry.register_with_unit(
            "http_sendfile",
            "Response body bytes sent from segment files with sendfile, not copied",
            Unit::Bytes,
            sendfile_bytes.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "Requests being served",
            in_flight.clone(),
        );
        let login_failures = Counter::default();
        registry.register(
            "login_failures",
            "Logins refused for a wrong user name or password (or token secret)",
            login_failures.clone(),
        );
        let login_lockouts = Counter::default();
        registry.register(
            "login_lockouts",
            "Logins refused without checking because too many failed before",
            login_lockouts.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "http_rate_limited",
            "Requests answered 429 Too Many Requests (login lockouts, upload bounds)",
            rate_limited.clone(),
        );
        let gc_runs = Family::<GcLabels, Counter>::default();
        registry.register(
            "gc_runs",
            "Garbage collections run (dry runs included), by trigger and outcome",
            gc_runs.clone(),
        );
        let gc_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register_with_unit(
            "gc_duration",
            "How long garbage collections took",
            Unit::Seconds,
            gc_seconds.clone(),
        );
        let gc_reclaimed_bytes = Counter::default();
        registry.register_with_unit(
            "gc_reclaimed",
            "Bytes garbage collections freed",
            Unit::Bytes,
            gc_reclaimed_bytes.clone(),
        );
        let gc_moved_bytes = Counter::default();
        registry.register_with_unit(
            "gc_moved",
            "Live bytes garbage collections copied forward",
            Unit::Bytes,
            gc_moved_bytes.clone(),
        );
        let gc_paced_seconds = Counter::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "gc_paced",
            "Time garbage collections rested so that running pushes kept the disk",
            Unit::Seconds,
            gc_paced_seconds.clone(),
        );
        let gc_last_run = Gauge::default();
        registry.register_with_unit(
            "gc_last_run_timestamp",
            "When the last collection (not a dry run) finished, Unix time; 0 before the first",
            Unit::Seconds,
            gc_last_run.clone(),
        );
        let quota_refusals = Counter::default();
        registry.register(
            "quota_refusals",
            "Pushes and uploads refused because a namespace quota would be exceeded",
            quota_refusals.clone(),
        );
        let retention_deletions = Counter::default();
        registry.register(
            "retention_deletions",
            "Tags and manifests retention deleted",
            retention_deletions.clone(),
        );
        let liveness = Arc::new(Mutex::new(None));
        registry.register_collector(Box::new(EngineCollector {
            store,
            uploads,
            liveness: liveness.clone(),
            blob_sizes: Mutex::default(),
        }));
        if !rules.is_empty() {
            registry.register_collector(Box::new(peers::ReplicationCollector(
                rules,
                webhooks.clone(),
            )));
        }
        registry.register_collector(Box::new(WebhookCollector(webhooks)));
        if let Some(b) = bucket {
            registry.register_collector(Box::new(bucket::BucketCollector(b)));
        }
        if let Some(f) = replica {
            registry.register_collector(Box::new(bucket::ReplicaCollector(f)));
        }
        if !upstreams.is_empty() {
            registry.register_collector(Box::new(peers::PullThroughCollector(upstreams)));
        }
        Metrics {
            registry,
            requests,
            request_seconds,
            received_bytes,
            sent_bytes,
            sendfile_bytes,
            in_flight,
            login_failures,
            login_lockouts,
            rate_limited,
            gc_runs,
            gc_seconds,
            gc_reclaimed_bytes,
            gc_moved_bytes,
            gc_paced_seconds,
            gc_last_run,
            quota_refusals,
            retention_deletions,
            liveness,
            liveness_refresh: tokio::sync::Notify::new(),
            request_cells: (0..ROUTES.len() * METHODS.len() * STATUSES.len())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            latency_cells: (0..ROUTES.len() * METHODS.len())
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        }
    }

    /// Counts one answered request. The label sets' counters and histograms are looked up
    /// in their families once and then kept by index: a request costs two atomic adds and
    /// one short histogram lock, no hashing.
    pub fn request(&self, kind: Option<PathKind>, method: &hyper::Method, status: u16, secs: f64) {
        self.request_at(route_index(kind), method, status, secs);
    }

    /// Counts one answered request of the web console (`route="console"`).
    pub fn console_request(&self, method: &hyper::Method, status: u16, secs: f64) {
        let r = ROUTES.iter().position(|r| *r == "console").unwrap_or(0);
        self.request_at(r, method, status, secs);
    }

    fn request_at(&self, r: usize, method: &hyper::Method, status: u16, secs: f64) {
        let m = METHODS
            .iter()
            .position(|x| *x == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let st = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            _ => 3,
        };
        let counter = self.request_cells[(r * METHODS.len() + m) * STATUSES.len() + st]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: ROUTES[r],
                        method: METHODS[m],
                        status: STATUSES[st],
                    })
                    .clone()
            });
        counter.inc();
        let histogram = self.latency_cells[r * METHODS.len() + m].get_or_init(|| {
            self.request_seconds
                .get_or_create(&RouteLabels {
                    route: ROUTES[r],
                    method: METHODS[m],
                })
                .clone()
        });
        histogram.observe(secs);
    }

    /// Counts one collection.
    pub fn gc(
        &self,
        trigger: &'static str,
        secs: f64,
        report: Option<&ballast_engine::gc::GcReport>,
        now: u64,
    ) {
        let outcome = if report.is_some() { "ok" } else { "failed" };
        self.gc_runs
            .get_or_create(&GcLabels { trigger, outcome })
            .inc();
        self.gc_seconds.observe(secs);
        let Some(r) = report.filter(|r| !r.dry_run) else {
            return;
        };
        self.gc_reclaimed_bytes.inc_by(r.bytes_reclaimed);
        self.gc_moved_bytes.inc_by(r.bytes_moved);
        self.gc_paced_seconds.inc_by(r.paced_ms as f64 / 1000.0);
        self.gc_last_run.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    /// Sets the live and dead bytes (computed off the scrape: see [`refresh_liveness`]).
    pub fn set_liveness(&self, l: Liveness, at: u64) {
        *self.liveness.lock() = Some((l, at));
    }

    /// The text format Prometheus scrapes.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            // (Only a formatter error, which writing to a String never gives.)
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// The `route` labels.
const ROUTES: [&str; 15] = [
    "none",
    "console",
    "base",
    "catalog",
    "tags",
    "manifests",
    "blobs",
    "uploads",
    "referrers",
    "delta",
    "health",
    "admin",
    "token",
    "metrics",
    "other",
];
/// The `method` labels (`other` last).
const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other",
];
/// The `status` labels.
const STATUSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The `route` label of a path, as an index into [`ROUTES`].
fn route_index(kind: Option<PathKind>) -> usize {
    let name = match kind {
        None => "none",
        Some(PathKind::Base) => "base",
        Some(PathKind::Catalog) => "catalog",
        Some(PathKind::Tags) => "tags",
        Some(PathKind::Manifest) => "manifests",
        Some(PathKind::Blob) => "blobs",
        Some(PathKind::UploadStart | PathKind::Upload) => "uploads",
        Some(PathKind::Referrers) => "referrers",
        Some(
            PathKind::DeltaMissing
            | PathKind::DeltaChunks
            | PathKind::DeltaBlob
            | PathKind::DeltaRecipe
            | PathKind::DeltaFetch,
        ) => "delta",
        Some(PathKind::Health) => "health",
        Some(
            PathKind::AdminGc
            | PathKind::AdminRetention
            | PathKind::AdminUsage
            | PathKind::AdminWebhooks
            | PathKind::AdminWebhooksDead
            | PathKind::AdminWebhooksRedeliver
            | PathKind::AdminPullThrough
            | PathKind::AdminPullThroughEvict
            | PathKind::AdminReplication
            | PathKind::AdminReplicationReconcile
            | PathKind::AdminBucket
            | PathKind::AdminBucketShip
            | PathKind::AdminBucketFollow
            | PathKind::AdminRobots
            | PathKind::AdminRobot
            | PathKind::AdminAudit,
        ) => "admin",
        Some(PathKind::Token) => "token",
        Some(PathKind::Metrics) => "metrics",
    };
    ROUTES
        .iter()
        .position(|r| *r == name)
        .unwrap_or(ROUTES.len() - 1)
}

/// Reads the engine's figures at each scrape: cheap reads of in-memory state and counters
/// (no scan of segments).
#[derive(Debug)]
struct EngineCollector {
    store: Store,
    uploads: Uploads,
    liveness: Arc<Mutex<Option<(Liveness, u64)>>>,
    /// Sizes of linked blobs, kept between scrapes (see `Store::logical_bytes`).
    blob_sizes: Mutex<std::collections::HashMap<ballast_engine::Digest, u64>>,
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: impl prometheus_client::encoding::EncodeGaugeValue + Clone + std::fmt::Debug,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?)
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: u64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?)
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    m.encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &h.buckets, None)
}

impl Collector for EngineCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let store = &self.store;
        let healthy = store.health().is_ok();
        gauge(
            &mut e,
            "store_healthy",
            "1 while the store accepts writes; 0 once a failed fsync poisoned it (restart to recover)",
            None,
            i64::from(healthy),
        )?;
        let f = store.footprint();
        gauge(
            &mut e,
            "store_segments",
            "Segment files",
            None,
            f.segments as i64,
        )?;
        gauge(
            &mut e,
            "store_segment",
            "Bytes of segment files: what the store takes on disk",
            Some(Unit::Bytes),
            f.segment_bytes as i64,
        )?;
        gauge(
            &mut e,
            "store_chunks",
            "Stored chunks (index entries)",
            None,
            f.indexed_chunks as i64,
        )?;
        let (repos, tags, manifests) = {
            let cat = store.catalog().read();
            let tags: usize = cat.repos.values().map(|r| r.tags.len()).sum();
            let manifests: usize = cat.repos.values().map(|r| r.manifests.len()).sum();
            (cat.repos.len(), tags, manifests)
        };
        let logical = store.logical_bytes(&mut self.blob_sizes.lock());
        gauge(
            &mut e,
            "store_logical",
            "Bytes the repositories link, each repository counted in full: what a registry \
             without dedup would store",
            Some(Unit::Bytes),
            logical as i64,
        )?;
        let ratio = if f.segment_bytes == 0 {
            1.0
        } else {
            logical as f64 / f.segment_bytes as f64
        };
        gauge(
            &mut e,
            "store_dedup_ratio",
            "Logical bytes over segment bytes",
            None,
            ratio,
        )?;
        gauge(
            &mut e,
            "catalog_repositories",
            "Repositories",
            None,
            repos as i64,
        )?;
        gauge(&mut e, "catalog_tags", "Tags", None, tags as i64)?;
        gauge(
            &mut e,
            "catalog_manifests",
            "Manifests (per repository)",
            None,
            manifests as i64,
        )?;
        let s = store.stats();
        counter(
            &mut e,
            "store_chunks_written",
            "Chunks written",
            None,
            s.chunks_written.load(Relaxed),
        )?;
        counter(
            &mut e,
            "store_chunks_deduplicated",
            "Chunks found already stored, not written again",
            None,
            s.chunks_deduped.load(Relaxed),
        )?;
        counter(
            &mut e,
            "store_appended",
            "Bytes appended to segments",
            Some(Unit::Bytes),
            s.bytes_appended.load(Relaxed),
        )?;
        counter(
            &mut e,
            "store_chunks_verified",
            "Chunk reads checked against their BLAKE3 id",
            None,
            s.chunks_verified.load(Relaxed),
        )?;
        counter(
            &mut e,
            "store_chunk_verification_failures",
            "Chunk reads that found damage (bytes not matching their id, an unreadable record)",
            None,
            s.chunk_read_failures.load(Relaxed),
        )?;
        let q = store.quarantine();
        gauge(
            &mut e,
            "store_quarantined_blobs",
            "Blobs fsck --repair set aside as damaged",
            None,
            q.blobs.len() as i64,
        )?;
        gauge(
            &mut e,
            "store_damaged_records",
            "Records fsck --repair marked damaged",
            None,
            q.records.len() as i64,
        )?;
        if let Some((l, at)) = *self.liveness.lock() {
            gauge(
                &mut e,
                "store_live",
                "Bytes of the records tags and manifests need (computed every minute)",
                Some(Unit::Bytes),
                l.live_bytes as i64,
            )?;
            gauge(
                &mut e,
                "store_dead",
                "Bytes of segments nothing needs: what collections could free (every minute)",
                Some(Unit::Bytes),
                l.dead_bytes as i64,
            )?;
            gauge(
                &mut e,
                "store_liveness_timestamp",
                "When store_live_bytes and store_dead_bytes were computed, Unix time",
                Some(Unit::Seconds),
                at as i64,
            )?;
        }
        if let Some(free) = store.free_bytes() {
            gauge(
                &mut e,
                "disk_free",
                "Free bytes on the data directory's file system (pushes are refused below \
                 disk_free_min_bytes)",
                Some(Unit::Bytes),
                free as i64,
            )?;
        }
        histogram(
            &mut e,
            "fsync_duration",
            "fsync latency of the files the engine syncs (segments, catalog, upload logs)",
            &ballast_engine::stats::fsync_latency().snapshot(),
        )?;
        gauge(
            &mut e,
            "catalog_journal",
            "Bytes in the catalog journal's current generation",
            Some(Unit::Bytes),
            store.catalog().journal_bytes() as i64,
        )?;
        histogram(
            &mut e,
            "catalog_fold_duration",
            "How long folding the catalog journal into a snapshot took",
            &store.catalog().fold_latency().snapshot(),
        )?;
        if let Ok((sessions, bytes)) = self.uploads.open_sessions() {
            gauge(
                &mut e,
                "upload_sessions",
                "Open upload sessions",
                None,
                sessions as i64,
            )?;
            gauge(
                &mut e,
                "upload_session",
                "Bytes open upload sessions received",
                Some(Unit::Bytes),
                bytes as i64,
            )?;
        }
        Ok(())
    }
}

/// Reads the webhook endpoints' counters and the outbox at each scrape.
#[derive(Debug)]
struct WebhookCollector(Arc<crate::webhooks::Webhooks>);

impl Collector for WebhookCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(stats) = self.0.outbox_stats() else {
            return Ok(());
        };
        let status = self.0.status();
        {
            let mut m = e.encode_descriptor(
                "webhook_deliveries",
                "Webhook delivery attempts by endpoint and outcome (ok; failed: each failed \
                 attempt, retried; dead: given up on, moved to the dead letters)",
                None,
                MetricType::Counter,
            )?;
            for s in &status {
                for (outcome, v) in [
                    ("ok", s.delivered),
                    ("failed", s.failed_attempts),
                    ("dead", s.dead_lettered),
                ] {
                    let labels = [("endpoint", s.name.as_str()), ("outcome", outcome)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut m = e.encode_descriptor(
                "webhook_pending_events",
                "Events recorded that an endpoint has not had yet (some may not be for it)",
                None,
                MetricType::Gauge,
            )?;
            for s in &status {
                let labels = [("endpoint", s.name.as_str())];
                ConstGauge::new(s.pending as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "webhook_oldest_pending",
                "Age of the oldest event an endpoint has not had yet (0: none)",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for s in &status {
                let labels = [("endpoint", s.name.as_str())];
                let age = s.oldest_pending_secs.unwrap_or(0) as i64;
                ConstGauge::new(age).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "webhook_outbox",
            "Bytes the webhook outbox takes (bounded by webhook_outbox_bytes_max)",
            Some(Unit::Bytes),
            stats.bytes as i64,
        )?;
        counter(
            &mut e,
            "webhook_events_dropped",
            "Events lost because the outbox or the dead letters were full, or damaged",
            None,
            stats.dropped,
        )?;
        gauge(
            &mut e,
            "webhook_dead_letters",
            "Events given up on, waiting for an admin (redeliver or leave)",
            None,
            stats.dead_letters as i64,
        )
    }
}

/// How often live and dead bytes are recomputed.
pub const LIVENESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Recomputes live and dead bytes now and then, off the async threads (it reads the recipes
/// of live blobs: too much for every scrape on a big registry).
pub async fn refresh_liveness(app: Arc<crate::App>) {
    if !app.config.metrics {
        return;
    }
    loop {
        let store = app.store.clone();
        match tokio::task::spawn_blocking(move || ballast_engine::inspect::liveness(&store)).await {
            Ok(Ok(l)) => app.metrics.set_liveness(l, crate::now_secs()),
            Ok(Err(e)) => tracing::warn!(error = %e, "computing live bytes for the metrics failed"),
            Err(e) => tracing::warn!(error = %e, "computing live bytes for the metrics panicked"),
        }
        tokio::select! {
            _ = app.metrics.liveness_refresh.notified() => {}
            _ = tokio::time::sleep(LIVENESS_INTERVAL) => {}
        }
    }
}
