//! Request handlers, grouped by endpoint, and what they share.

mod admin;
mod blobs;
mod bucket;
mod delta;
mod listing;
pub(crate) mod manifests;
mod token;
mod uploads;

use std::collections::BTreeMap;

use crate::body::ReqBody;
use ballast_engine::{names, Digest};
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{Access, Need};
use crate::body::{self, ResBody};
use crate::error::ApiError;
use crate::routes::{Descriptor, Endpoint, Requires, Route};
use crate::App;

pub use admin::audit_filter as admin_audit_filter;
pub use manifests::validate as validate_manifest;
pub use token::token;

/// What a request to endpoint `d` at route `r` needs to be allowed (auth.rs decides).
pub fn need(d: &Descriptor, r: &Route<'_>) -> Need {
    match (d.requires, r.repository()) {
        (Requires::Nothing, _) => Need::Nothing,
        (Requires::Authenticated, _) => Need::Authenticated,
        (Requires::Catalog, _) => Need::Catalog,
        (Requires::Admin, _) => Need::Admin,
        (Requires::Repo(a), Some(name)) => Need::Repo(name.to_owned(), a),
        // (The table never pairs a repository action with a path without a repository.)
        (Requires::Repo(_), None) => Need::Admin,
    }
}

/// Calls the handler of an endpoint; `r` is the route its path resolved to.
pub async fn dispatch(
    app: &std::sync::Arc<App>,
    access: &Access,
    endpoint: Endpoint,
    r: Route<'_>,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    let head = req.method() == Method::HEAD;
    match (endpoint, r) {
        (Endpoint::Base, _) => Ok(reply(StatusCode::OK).json(&serde_json::json!({}))),
        (Endpoint::Health, _) => {
            let mut problems = app.auth.problems();
            problems.extend(disk_problem(&app.store, app.config.disk_free_min_bytes));
            let cfg = app.config.bucket.clone().unwrap_or_default();
            let bucket =
                (app.bucket.as_ref()).map(|b| bucket_health(&b.status(), cfg.ship_interval_secs));
            let replica = (app.replica.as_ref())
                .map(|f| replica_health(&f.status(), cfg.follow_interval_secs));
            if let Some((_, Some(p))) = &bucket {
                problems.push(p.clone());
            }
            if let Some((_, Some(p))) = &replica {
                problems.push(p.clone());
            }
            let lag = match (bucket, replica) {
                (Some((lag, _)), _) => Some(("bucket_lag_secs", lag)),
                (_, Some((lag, _))) => Some(("replica_lag_secs", lag)),
                _ => None,
            };
            Ok(health(&app.store, problems, lag))
        }
        (Endpoint::AdminGc, _) => admin_gc(app, access, &req).await,
        (Endpoint::AdminWebhooks, _) => {
            let hooks = app.webhooks.clone();
            let status = blocking(move || Ok(hooks.status())).await?;
            Ok(reply(StatusCode::OK).json(&serde_json::json!({ "endpoints": status })))
        }
        (Endpoint::AdminWebhooksDead, _) => {
            let dead: Vec<serde_json::Value> = app
                .webhooks
                .dead_letters()
                .iter()
                .map(crate::webhooks::dead_letter_json)
                .collect();
            Ok(reply(StatusCode::OK).json(&serde_json::json!({ "dead_letters": dead })))
        }
        (Endpoint::AdminWebhooksRedeliver, _) => redeliver(app, &req).await,
        (Endpoint::AdminUsage, _) => {
            let q = query(&req);
            let flag = |k: &str| first(&q, k).is_some_and(|v| v == "true" || v == "1");
            let (detail, verify) = (flag("detail"), flag("verify"));
            let quotas = app.quotas.clone();
            let (usage, matches) =
                blocking(move || Ok((quotas.report(detail)?, verify.then(|| quotas.consistent()))))
                    .await?;
            let mut body = serde_json::json!({ "namespaces": usage });
            if let Some(m) = matches {
                // The usage kept incrementally against a full recount of the catalog.
                body["recount_matches"] = serde_json::json!(m);
            }
            Ok(reply(StatusCode::OK).json(&body))
        }
        (Endpoint::AdminRetention, _) => {
            let q = query(&req);
            let dry_run = first(&q, "dry_run").is_some_and(|v| v == "true" || v == "1");
            let report =
                crate::governance::retention::run_in_server(app, dry_run, &access.actor()).await?;
            Ok(reply(StatusCode::OK).json(&serde_json::to_value(&report).unwrap_or_default()))
        }
        (Endpoint::AdminPullThrough, _) => {
            let ups: Vec<serde_json::Value> = app
                .pull_through
                .upstreams()
                .iter()
                .map(|u| u.status())
                .collect();
            Ok(reply(StatusCode::OK).json(&serde_json::json!({ "upstreams": ups })))
        }
        (Endpoint::AdminPullThroughEvict, _) => {
            let q = query(&req);
            let dry_run = first(&q, "dry_run").is_some_and(|v| v == "true" || v == "1");
            let report = crate::upstream::evict::run(app, dry_run, &access.actor()).await?;
            Ok(reply(StatusCode::OK).json(&serde_json::to_value(&report).unwrap_or_default()))
        }
        (Endpoint::AdminReplication, _) => {
            let outbox = app.webhooks.outbox();
            let rules: Vec<serde_json::Value> =
                app.replication.iter().map(|r| r.status(outbox)).collect();
            Ok(reply(StatusCode::OK).json(&serde_json::json!({ "rules": rules })))
        }
        (Endpoint::AdminReplicationReconcile, _) => {
            let q = query(&req);
            let name = first(&q, "rule");
            if let Some(n) = name {
                if !app.replication.iter().any(|r| r.cfg.name == n) {
                    return Err(ApiError::NotFound(format!(
                        "no replication rule is named {n:?} (GET /admin/replication lists them)"
                    )));
                }
            }
            let reports = crate::replication::reconcile_now(app, name).await;
            Ok(reply(StatusCode::OK).json(&serde_json::json!({ "reconciled": reports })))
        }
        (Endpoint::AdminBucket, _) => bucket::status(app).await,
        (Endpoint::AdminBucketShip, _) => bucket::ship(app).await,
        (Endpoint::AdminBucketFollow, _) => bucket::follow(app).await,
        (Endpoint::AdminRobots, _) => admin::robots(app).await,
        (Endpoint::AdminRobotCreate, _) => admin::robot_create(app, &req).await,
        (Endpoint::AdminRobotRevoke, Route::AdminRobot { name }) => {
            admin::robot_revoke(app, name).await
        }
        (Endpoint::AdminAudit, _) => admin::audit(app, &req).await,
        (Endpoint::Metrics, _) => metrics(app).await,
        (Endpoint::Catalog, _) => listing::catalog(app, access, &req),
        (Endpoint::Tags, Route::Tags { name }) => listing::tags(app, name, &req),
        (Endpoint::Referrers, Route::Referrers { name, digest }) => {
            listing::referrers(app, name, digest, &req).await
        }
        (Endpoint::BlobGet, Route::Blob { name, digest }) => {
            blobs::get(app, name, digest, &req, head).await
        }
        (Endpoint::BlobDelete, Route::Blob { name, digest }) => {
            app.pull_through.refuse_writes(name)?;
            blobs::delete(app, name, digest).await
        }
        (Endpoint::UploadStart, Route::UploadStart { name }) => {
            app.pull_through.refuse_writes(name)?;
            app.quotas.check_upload(name)?;
            uploads::start(app, access, name, req).await
        }
        (Endpoint::UploadPatch, Route::Upload { name, id }) => {
            uploads::patch(app, name, id, req).await
        }
        (Endpoint::UploadFinish, Route::Upload { name, id }) => {
            app.quotas.check_upload(name)?;
            uploads::finish(app, name, id, req).await
        }
        (Endpoint::UploadStatus, Route::Upload { name, id }) => {
            uploads::status(app, name, id).await
        }
        (Endpoint::UploadCancel, Route::Upload { name, id }) => {
            uploads::cancel(app, name, id).await
        }
        (Endpoint::DeltaMissing, Route::DeltaMissing { name }) => {
            delta::missing(app, name, req).await
        }
        (Endpoint::DeltaChunks, Route::DeltaChunks { name }) => delta::chunks(app, name, req).await,
        (Endpoint::DeltaBlob, Route::DeltaBlob { name, digest }) => {
            delta::blob(app, name, digest, req).await
        }
        (Endpoint::DeltaRecipe, Route::DeltaRecipe { name, digest }) => {
            delta::recipe(app, name, digest).await
        }
        (Endpoint::DeltaFetch, Route::DeltaFetch { name, digest }) => {
            delta::fetch(app, name, digest, req).await
        }
        (Endpoint::ManifestGet, Route::Manifest { name, reference }) => {
            manifests::get(app, name, reference, head).await
        }
        (Endpoint::ManifestPut, Route::Manifest { name, reference }) => {
            app.pull_through.refuse_writes(name)?;
            manifests::put(app, name, reference, req).await
        }
        (Endpoint::ManifestDelete, Route::Manifest { name, reference }) => {
            app.pull_through.refuse_writes(name)?;
            manifests::delete(app, name, reference).await
        }
        (e, r) => Err(ApiError::Internal(format!(
            "the endpoint table pairs {e:?} with {r:?}"
        ))),
    }
}

/// `POST /admin/webhooks/dead/redeliver[?id=N...]`: puts dead letters (all, or those
/// named) back for delivery to their endpoint.
async fn redeliver(app: &App, req: &Request<ReqBody>) -> Result<Response<ResBody>, ApiError> {
    let q = query(req);
    let ids = match q.get("id") {
        None => None,
        Some(ids) => Some(
            ids.iter()
                .map(|i| {
                    i.parse::<u64>().map_err(|_| {
                        ApiError::Unsupported(format!(
                            "id={i:?} is not a dead letter id (GET /admin/webhooks/dead lists them)"
                        ))
                    })
                })
                .collect::<Result<Vec<u64>, ApiError>>()?,
        ),
    };
    let hooks = app.webhooks.clone();
    let n = blocking(move || hooks.redeliver(ids.as_deref())).await?;
    Ok(reply(StatusCode::OK).json(&serde_json::json!({ "redelivered": n })))
}

/// `GET /metrics`: the Prometheus text format.
pub(crate) async fn metrics(app: &App) -> Result<Response<ResBody>, ApiError> {
    if !app.config.metrics {
        return Err(ApiError::NotFound(
            "metrics are off in this registry's config (metrics = false)".into(),
        ));
    }
    let m = app.metrics.clone();
    // (Reading the engine's figures takes short locks: off the async threads.)
    let text = blocking(move || Ok(m.encode())).await?;
    Ok(reply(StatusCode::OK)
        .header(CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
        .header(CONTENT_LENGTH, HeaderValue::from(text.len()))
        .body(body::full(text)))
}

/// `POST /admin/gc[?dry_run=true][&delete_untagged=true][&grace=SECONDS]`: runs a garbage
/// collection now and answers its report. Pushes and pulls go on meanwhile.
async fn admin_gc(
    app: &App,
    access: &Access,
    req: &Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    let q = query(req);
    let flag = |k: &str| first(&q, k).is_some_and(|v| v == "true" || v == "1");
    let grace = match first(&q, "grace") {
        Some(g) => g.parse().map_err(|_| {
            ApiError::Unsupported(format!("grace={g:?} is not a number of seconds"))
        })?,
        None => app.config.gc_grace_secs,
    };
    let opts = ballast_engine::gc::GcOptions {
        grace_secs: grace,
        delete_untagged: flag("delete_untagged") || app.config.gc_delete_untagged,
        dead_fraction_min: match first(&q, "min_dead_fraction") {
            Some(f) => f
                .parse::<f64>()
                .ok()
                .filter(|f| (0.0..=1.0).contains(f))
                .ok_or_else(|| {
                    ApiError::Unsupported(format!(
                        "min_dead_fraction={f:?} is not a fraction from 0 to 1"
                    ))
                })?,
            None => app.config.gc_min_dead_fraction,
        },
        dry_run: flag("dry_run"),
        pace_bytes_per_sec: app.config.gc_pace_mb_per_sec << 20,
        fold_below_bytes: app.config.gc_fold_below_bytes(),
    };
    let report = crate::gc::run(app, opts, crate::gc::Trigger::Request, &access.actor()).await?;
    Ok(reply(StatusCode::OK).json(&serde_json::to_value(&report).unwrap_or_default()))
}

/// A response under construction.
pub struct Reply(hyper::http::response::Builder);

/// Starts a response with the distribution API version header.
pub fn reply(status: StatusCode) -> Reply {
    Reply(
        Response::builder()
            .status(status)
            .header("Docker-Distribution-API-Version", "registry/2.0"),
    )
}

impl Reply {
    /// Adds a header.
    pub fn header(self, name: impl TryInto<HeaderName>, value: impl TryInto<HeaderValue>) -> Reply {
        match (name.try_into(), value.try_into()) {
            (Ok(n), Ok(v)) => Reply(self.0.header(n, v)),
            _ => self,
        }
    }
    /// Finishes with an empty body and `Content-Length: 0`.
    pub fn empty(self) -> Response<ResBody> {
        self.header(CONTENT_LENGTH, HeaderValue::from(0))
            .body(body::empty())
    }
    /// Finishes with a body.
    pub fn body(self, body: ResBody) -> Response<ResBody> {
        self.0
            .body(body)
            .unwrap_or_else(|e| crate::error::response(&ApiError::Internal(e.to_string())))
    }
    /// Finishes with a JSON body.
    pub fn json(self, value: &serde_json::Value) -> Response<ResBody> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, HeaderValue::from(bytes.len()))
            .body(body::full(bytes))
    }
}

/// Checks a repository name from the path.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    names::validate_repo(name).map_err(|e| ApiError::NameInvalid(e.to_string()))
}

/// Parses a digest from the path or query.
pub fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse()
        .map_err(|e: ballast_engine::Error| ApiError::DigestInvalid(e.to_string()))
}

/// Query parameters, percent-decoded; repeated keys keep every value in order.
pub fn query(req: &Request<ReqBody>) -> BTreeMap<String, Vec<String>> {
    parse_form(req.uri().query().unwrap_or(""))
}

/// Parses `application/x-www-form-urlencoded` text (a query string or a form body), with
/// the `form_urlencoded` crate (percent-decoding, `+` as space, invalid UTF-8 replaced).
pub fn parse_form(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(text.as_bytes()) {
        out.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    out
}

/// The first value of a query parameter.
pub fn first<'a>(q: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    q.get(key).and_then(|v| v.first()).map(String::as_str)
}

/// Parses the `n` pagination parameter.
pub fn page_size(q: &BTreeMap<String, Vec<String>>) -> Result<Option<usize>, ApiError> {
    match first(q, "n") {
        None | Some("") => Ok(None),
        Some(n) => n
            .parse()
            .map(Some)
            .map_err(|_| ApiError::Unsupported(format!("n={n:?} is not a count"))),
    }
}

/// Runs blocking engine work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("worker failed: {e}")))?
}

/// True when the repository may read the blob: it is linked there as a blob or a manifest.
pub fn linked(app: &App, name: &str, digest: &Digest) -> bool {
    let cat = app.store.catalog().read();
    cat.repos
        .get(name)
        .is_some_and(|r| r.blobs.contains_key(digest) || r.manifests.contains_key(digest))
}

/// A warning for /healthz when the data directory's file system is within twice the floor
/// below which pushes are refused (or below it).
fn disk_problem(store: &ballast_engine::Store, floor: u64) -> Option<String> {
    let free = store.free_bytes()?;
    (floor > 0 && free < floor.saturating_mul(2)).then(|| {
        let mib = |n: u64| n as f64 / f64::from(1u32 << 20);
        let state = if free < floor {
            "pushes are refused"
        } else {
            "pushes will be refused"
        };
        format!(
            "disk: {:.1} MiB free on the data directory's file system; {state} below {:.1} MiB \
             (disk_free_min_bytes): delete images and run gc, or grow the file system",
            mib(free),
            mib(floor)
        )
    })
}

/// Refuses a push up front (507) when the data directory's file system is below its floor.
pub(crate) async fn check_room(app: &App) -> Result<(), ApiError> {
    let store = app.store.clone();
    blocking(move || store.check_room(0).map_err(ApiError::from_engine)).await
}

/// `/healthz`: 200 while the store takes writes; 503 once a failed write or fsync poisoned
/// it (it refuses writes until restarted, which recovers from the disk), so a supervisor's
/// health check restarts it. The reason names files, so it goes to the log, not to the
/// (unauthenticated) caller.
/// `GET /healthz`: 503 once the store refuses writes (a supervisor should restart it); 200
/// with `"status": "degraded"` and the problems when an account file cannot be used (a
/// restart would not help: its accounts are refused until it is fixed); 200 `ok` otherwise.
/// With a bucket configured, `bucket_lag_secs` says how far the bucket lags behind
/// acknowledged pushes; on a read replica, `replica_lag_secs` how long since it last saw
/// itself serving the bucket's newest checkpoint.
fn health(
    store: &ballast_engine::Store,
    problems: Vec<String>,
    lag: Option<(&str, u64)>,
) -> Response<ResBody> {
    match store.health() {
        Ok(()) if problems.is_empty() => {
            let mut v = serde_json::json!({"status": "ok"});
            if let Some((key, secs)) = lag {
                v[key] = secs.into();
            }
            reply(StatusCode::OK).json(&v)
        }
        Ok(()) => {
            let mut v = serde_json::json!({
                "status": "degraded",
                "detail": problems.join("; "),
                "problems": problems,
            });
            if let Some((key, secs)) = lag {
                v[key] = secs.into();
            }
            reply(StatusCode::OK).json(&v)
        }
        Err(e) => {
            tracing::warn!(error = %e, "health check: the store refuses writes");
            reply(StatusCode::SERVICE_UNAVAILABLE).json(&serde_json::json!({
                "status": "poisoned",
                "detail": "a write or fsync failed, so the store refuses writes; restart the \
                           server to recover from the disk (the reason is in the server log)",
                "problems": problems,
            }))
        }
    }
}

/// The bucket's lag, and a problem when shipments fail or it lags well past its interval
/// (a restart would not help: the shipper keeps trying; the details are in
/// `GET /admin/bucket` and the server log, not here where anyone may read).
fn bucket_health(s: &ballast_bucket::Status, interval: u64) -> (u64, Option<String>) {
    let lag = s.lag_secs(crate::now_secs());
    let problem = if s.attempts.consecutive_failures > 0 {
        Some(format!(
            "shipping to the bucket has failed {} times in a row; the bucket lags {lag} s behind              acknowledged pushes (GET /admin/bucket says why)",
            s.attempts.consecutive_failures
        ))
    } else if lag > (6 * interval).max(60) {
        Some(format!(
            "the bucket lags {lag} s behind acknowledged pushes (shipments are slower than              ship_interval_secs = {interval})"
        ))
    } else {
        None
    };
    (lag, problem)
}

/// A replica's lag, and a problem when follows fail or what it serves is well past its
/// interval behind the bucket's newest checkpoint.
fn replica_health(s: &ballast_bucket::FollowStatus, interval: u64) -> (u64, Option<String>) {
    let lag = s.lag_secs(crate::now_secs());
    let problem = if s.attempts.consecutive_failures > 0 {
        Some(format!(
            "following the primary's checkpoints has failed {} times in a row; what this \
             replica serves is {lag} s old (GET /admin/bucket says why)",
            s.attempts.consecutive_failures
        ))
    } else if s.newest_seq > s.seq && lag > (6 * interval).max(60) {
        Some(format!(
            "this replica serves a checkpoint {lag} s old while a newer one is in the bucket \
             (follows are slower than follow_interval_secs = {interval})"
        ))
    } else {
        None
    };
    (lag, problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let f = parse_form("a=x%2Fy&mount=sha256%3Aab&a=2&p=100%&q=%zz&r=%4&s=a+b&flag");
        assert_eq!(f["a"], ["x/y", "2"]);
        assert_eq!(first(&f, "mount"), Some("sha256:ab"));
        assert_eq!(first(&f, "p"), Some("100%"));
        assert_eq!(first(&f, "q"), Some("%zz"));
        assert_eq!(first(&f, "r"), Some("%4"));
        assert_eq!(first(&f, "s"), Some("a b"));
        assert_eq!(first(&f, "flag"), Some(""));
    }

    #[test]
    fn healthz_answers_503_once_the_store_is_poisoned() {
        use ballast_engine::storage::SimStorage;
        use http_body_util::BodyExt;
        let sim = SimStorage::new();
        let store = ballast_engine::Store::open_on(
            std::sync::Arc::new(sim.clone()),
            std::path::Path::new("/s"),
            ballast_engine::Options::default(),
        )
        .expect("open");
        assert_eq!(health(&store, Vec::new(), None).status(), StatusCode::OK);
        sim.fail_syncs();
        assert!(store.put_blob(b"lost", None).is_err());
        let res = health(&store, Vec::new(), None);
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(res.into_body().collect())
            .expect("body")
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["status"], "poisoned");
        let detail = v["detail"].as_str().expect("detail");
        assert!(detail.contains("restart"), "{detail}");
        assert!(
            !detail.contains("/s"),
            "no paths to anonymous callers: {detail}"
        );
    }
}
