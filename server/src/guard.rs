//! What stands around every request: the endpoint table's answer, the authorization check
//! before the handler, the audit lines after it.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::body::ReqBody;
use hyper::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};

use crate::audit::Event;
use crate::auth::{Access, Denial, Need};
use crate::body::ResBody;
use crate::error::ApiError;
use crate::handlers::{self, first, query};
use crate::routes::{resolve, Audit, AuditKind, Endpoint, Resolved, Route};
use crate::webhooks::{Event as WebhookEvent, Kind as WebhookKind};
use crate::App;

/// Serves one request: resolved in the endpoint table, authorized, handled, audited.
pub async fn serve(app: &Arc<App>, peer: SocketAddr, req: Request<ReqBody>) -> Response<ResBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let (d, r, allowed) = match resolve(&method, &path) {
        Resolved::NotFound => {
            return crate::error::response(&ApiError::NotFound(format!("no endpoint at {path}")))
        }
        Resolved::MethodNotAllowed(d, r) => (d, r, false),
        Resolved::Found(d, r) => (d, r, true),
    };
    if allowed && d.endpoint == Endpoint::Token {
        return handlers::token(app, peer, req).await;
    }
    let id = req.extensions().get::<RequestId>().cloned();
    let need = handlers::need(d, &r);
    // A name that cannot exist is refused before anything echoes it (the challenge's scope).
    if let Some(res) = invalid_name(&need) {
        return res;
    }
    // (Only challenges use the host; the hot path without authentication skips it.)
    let host = if app.auth.enabled() { host(&req) } else { None };
    let access = match app
        .auth
        .check(req.headers(), host.as_deref(), peer.ip(), &need)
        .await
    {
        Ok(a) => a,
        Err(d) => return denied(app, d, id.as_ref()).await,
    };
    if !allowed {
        return crate::error::response(&ApiError::MethodNotAllowed(format!(
            "{method} is not allowed on {path}"
        )));
    }
    authorized(app, peer, d, r, &access, req).await
}

/// Serves a request made on behalf of a caller whose access is already known (the console's
/// signed-in user): resolved in the same endpoint table, refused unless that access grants
/// what the endpoint needs (the refusal audited like the API's), then handled, audited and
/// announced exactly as a request from the wire is.
pub async fn serve_as(
    app: &Arc<App>,
    peer: SocketAddr,
    access: &Access,
    req: Request<ReqBody>,
) -> Response<ResBody> {
    let path = req.uri().path().to_owned();
    let (d, r) = match resolve(req.method(), &path) {
        Resolved::Found(d, r) => (d, r),
        Resolved::NotFound | Resolved::MethodNotAllowed(..) => {
            return crate::error::response(&ApiError::NotFound(format!(
                "no endpoint takes {} {path}",
                req.method()
            )))
        }
    };
    let need = handlers::need(d, &r);
    if let Some(res) = invalid_name(&need) {
        return res;
    }
    if let Err(denial) = app.auth.permits(access, peer.ip(), &need) {
        let id = req.extensions().get::<RequestId>().cloned();
        return denied(app, *denial, id.as_ref()).await;
    }
    authorized(app, peer, d, r, access, req).await
}

/// On a read replica, the refusal of a request that would change the store (pushes,
/// deletes, collections and the like), naming the primary to send it to. A replica still
/// answers what concerns itself alone: its robots, its webhook deliveries, following now.
async fn replica_refusal(app: &App, d: &crate::routes::Descriptor) -> Option<ApiError> {
    let follower = app.replica.as_ref()?;
    let writes = match d.audit {
        Audit::Read => false,
        Audit::AtEnd(_) => true,
        Audit::Change(kind) => !matches!(
            kind,
            AuditKind::WebhookRedeliver
                | AuditKind::RobotCreate
                | AuditKind::RobotRevoke
                | AuditKind::BucketFollow
        ),
    };
    if !writes {
        return None;
    }
    Some(ApiError::MethodNotAllowed(format!(
        "this registry is a read replica of {}: it serves pulls and takes no changes; send \
         this to the primary: {}",
        follower.bucket().describe(),
        follower.primary().await
    )))
}

/// The answer to a request naming a repository that cannot exist, if it does.
fn invalid_name(need: &Need) -> Option<Response<ResBody>> {
    let Need::Repo(name, _) = need else {
        return None;
    };
    ballast_engine::names::validate_repo(name)
        .err()
        .map(|e| crate::error::response(&ApiError::NameInvalid(e.to_string())))
}

/// The part of serving a request after it was allowed: the audit plan, the handler, the
/// audit lines and webhook events.
async fn authorized(
    app: &Arc<App>,
    peer: SocketAddr,
    d: &'static crate::routes::Descriptor,
    r: Route<'_>,
    access: &Access,
    req: Request<ReqBody>,
) -> Response<ResBody> {
    let method = req.method().clone();
    let id = req.extensions().get::<RequestId>().cloned();
    let plan = match d.audit {
        Audit::Change(kind) => Plan::before(app, kind, &r, &req, access, peer),
        Audit::Read | Audit::AtEnd(_) => None,
    }
    .map(|mut p| {
        p.base.request_id = id.as_ref().map(|i| i.as_str().to_owned());
        p
    });
    let mut req = req;
    req.extensions_mut().insert(ClientAddr(peer));
    let outcome = match replica_refusal(app, d).await {
        Some(refused) => Err(refused),
        None => handlers::dispatch(app, access, d.endpoint, r, req).await,
    };
    let (mut res, failure) = match outcome {
        Ok(res) => (res, None),
        Err(e) => {
            if app.config.metrics && matches!(e, ApiError::Quota(_)) {
                app.metrics.quota_refusals.inc();
            }
            let (code, _) = e.code_and_status();
            (crate::error::response(&e), Some(format!("{code}: {e}")))
        }
    };
    let ok = failure.is_none() && res.status().is_success();
    let (lines, mut events) = match plan {
        Some(plan) => plan.after(&res, failure),
        None => (Vec::new(), Vec::new()),
    };
    if ok && d.endpoint == Endpoint::ManifestGet && method == hyper::Method::GET {
        if app.config.pull_tracking {
            count_pull(app, &r, &res);
        }
        if let Some(e) = pulled(app, &r, &res, access, peer, id.as_ref()) {
            events.push(e);
        }
    }
    let crossed = if matches!(d.audit, Audit::Change(_)) && !app.quotas.is_empty() {
        app.quotas.take_crossed()
    } else {
        Vec::new()
    };
    for (namespace, bytes, max) in crossed {
        let mut e = WebhookEvent::new(WebhookKind::QuotaWarning, "system");
        e.detail = Some(serde_json::json!({
            "namespaces": namespace, "bytes": bytes, "bytes_max": max,
        }));
        e.request_id = id.as_ref().map(|i| i.as_str().to_owned());
        events.push(e);
    }
    if !events.is_empty() {
        // Recorded before the answer: an acknowledged change always has its event.
        if let Err(e) = record_events(app, events).await {
            tracing::error!(error = %e, "recording webhook events failed");
            res = crate::error::response(&e);
        }
    }
    if !lines.is_empty() {
        app.audit.record_all(lines).await;
    }
    res.extensions_mut().insert(Actor(access.actor()));
    res
}

/// Counts a manifest pull (committed to the catalog in batches: `pulls.rs`).
fn count_pull(app: &App, r: &Route<'_>, res: &Response<ResBody>) {
    let Route::Manifest { name, .. } = r else {
        return;
    };
    if let Some(d) = response_digest(res).and_then(|v| v.parse().ok()) {
        app.pulls.record(name, d, crate::now_secs());
    }
}

/// The `Docker-Content-Digest` a handler answered with.
fn response_digest(res: &Response<ResBody>) -> Option<&str> {
    res.headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
}

/// The webhook event of a manifest pull, when some endpoint wants it.
fn pulled(
    app: &App,
    r: &Route<'_>,
    res: &Response<ResBody>,
    access: &Access,
    peer: SocketAddr,
    id: Option<&RequestId>,
) -> Option<WebhookEvent> {
    let Route::Manifest { name, reference } = r else {
        return None;
    };
    if !app.webhooks.wanted(WebhookKind::ManifestPulled, Some(name)) {
        return None;
    }
    let header = |h| {
        res.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut e = WebhookEvent::new(WebhookKind::ManifestPulled, access.actor());
    e.repository = Some((*name).to_owned());
    e.tag = (!reference.contains(':')).then(|| (*reference).to_owned());
    e.digest = response_digest(res).map(str::to_owned);
    e.media_type = header("Content-Type");
    e.size = header("Content-Length").and_then(|v| v.parse().ok());
    e.client = Some(peer.ip().to_string());
    e.request_id = id.map(|i| i.as_str().to_owned());
    Some(e)
}

/// Fills in what the audit lines do not say (a manifest's media type and size, a blob's
/// size) and records the events in the outbox, off the async threads.
async fn record_events(app: &Arc<App>, mut events: Vec<WebhookEvent>) -> Result<(), ApiError> {
    let app = app.clone();
    handlers::blocking(move || {
        for e in &mut events {
            let (Some(repo), Some(digest)) = (&e.repository, &e.digest) else {
                continue;
            };
            let Ok(d) = digest.parse::<ballast_engine::Digest>() else {
                continue;
            };
            match e.kind {
                WebhookKind::ManifestPushed | WebhookKind::TagSet if e.size.is_none() => {
                    let cat = app.store.catalog().read();
                    if let Some(m) = cat.repos.get(repo).and_then(|r| r.manifests.get(&d)) {
                        e.media_type = Some(m.media_type.clone());
                        e.size = Some(m.size);
                    }
                }
                WebhookKind::BlobUploaded => {
                    e.media_type = Some("application/octet-stream".into());
                    e.size = app.store.stat(&d).ok().flatten();
                }
                _ => {}
            }
        }
        app.webhooks.record(&events)
    })
    .await
}

/// The address a request came from, for handlers that bound work per client.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// Who made a request, as the audit log names them, for the request log line.
#[derive(Clone, Debug)]
pub struct Actor(pub String);

/// The response header naming a request's id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A request's id: 16 hex digits, random, in the response (`X-Request-Id`), the request log
/// line and the audit lines of the request, so one request can be followed across them.
/// The server makes its own; an id a client or proxy sent is not trusted into the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// A fresh id.
    pub fn new() -> RequestId {
        RequestId(format!("{:016x}", rand::random::<u64>()).into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

/// The request's host, for the token realm (`Host`, or the authority of an HTTP/2 URI).
fn host(req: &Request<ReqBody>) -> Option<String> {
    req.headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Answers a denial, with its challenge or Retry-After, audits it and counts failed logins.
pub(crate) async fn denied(app: &App, d: Denial, id: Option<&RequestId>) -> Response<ResBody> {
    let mut res = crate::error::response(&d.error);
    if let Some(c) = d.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        res.headers_mut().insert(WWW_AUTHENTICATE, c);
    }
    if let Some(s) = d.retry_after {
        res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(mut e) = d.audit {
        if app.config.metrics && e.action == "login" {
            match e.outcome.as_str() {
                "failed" => app.metrics.login_failures.inc(),
                _ => app.metrics.login_lockouts.inc(),
            };
        }
        e.request_id = id.map(|i| i.as_str().to_owned());
        res.extensions_mut().insert(Actor(e.actor.clone()));
        app.audit.record(e).await;
    }
    res
}

/// What to audit about a mutating request, prepared before it runs (what a tag pointed at
/// before is gone afterwards).
struct Plan {
    base: Event,
    kind: Kind,
}

enum Kind {
    ManifestPut {
        tags: Vec<(String, Option<String>)>,
    },
    ManifestDelete {
        tag: Option<(String, Option<String>)>,
    },
    Mount {
        from: Option<String>,
    },
    Upload,
    BlobDelete,
    UploadCancel,
    Gc,
    AdminAction,
}

impl Plan {
    fn before(
        app: &App,
        kind: AuditKind,
        r: &Route<'_>,
        req: &Request<ReqBody>,
        access: &Access,
        peer: SocketAddr,
    ) -> Option<Plan> {
        let mut base = Event::new(access.actor(), "");
        base.client = Some(peer.ip().to_string());
        base.repository = r.repository().map(str::to_owned);
        let target = |name: &str, tag: &str| {
            let cat = app.store.catalog().read();
            cat.repos
                .get(name)
                .and_then(|r| r.tags.get(tag))
                .map(|d| d.to_string())
        };
        let kind = match (kind, r) {
            (AuditKind::ManifestPut, Route::Manifest { name, reference }) => {
                let q = query(req);
                let mut tags: Vec<String> = q.get("tag").cloned().unwrap_or_default();
                if !reference.contains(':') {
                    tags.insert(0, (*reference).to_owned());
                }
                tags.dedup();
                let tags = tags
                    .into_iter()
                    .map(|t| {
                        let before = target(name, &t);
                        (t, before)
                    })
                    .collect();
                if reference.contains(':') {
                    base.digest = Some((*reference).to_owned());
                }
                Kind::ManifestPut { tags }
            }
            (AuditKind::ManifestDelete, Route::Manifest { name, reference }) => {
                if reference.contains(':') {
                    base.digest = Some((*reference).to_owned());
                    Kind::ManifestDelete { tag: None }
                } else {
                    let before = target(name, reference);
                    Kind::ManifestDelete {
                        tag: Some(((*reference).to_owned(), before)),
                    }
                }
            }
            (AuditKind::UploadStart, _) => {
                let q = query(req);
                if let Some(m) = first(&q, "mount") {
                    base.digest = Some(m.to_owned());
                    Kind::Mount {
                        from: first(&q, "from").map(str::to_owned),
                    }
                } else if let Some(d) = first(&q, "digest") {
                    base.digest = Some(d.to_owned());
                    Kind::Upload
                } else {
                    // A session starts: nothing changed yet.
                    return None;
                }
            }
            (AuditKind::UploadFinish, _) => {
                base.digest = first(&query(req), "digest").map(str::to_owned);
                Kind::Upload
            }
            (AuditKind::UploadCancel, _) => Kind::UploadCancel,
            (AuditKind::DeltaChunks, _) => {
                base.action = "chunks.upload".into();
                base.reason = req
                    .headers()
                    .get(hyper::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .map(|n| format!("{n} bytes of chunk frames (delta replication)"));
                Kind::AdminAction
            }
            (AuditKind::DeltaBlob, Route::DeltaBlob { digest, .. }) => {
                base.digest = Some((*digest).to_owned());
                base.reason = Some("assembled from its recipe (delta replication)".into());
                Kind::Upload
            }
            (AuditKind::BlobDelete, Route::Blob { digest, .. }) => {
                base.digest = Some((*digest).to_owned());
                Kind::BlobDelete
            }
            (AuditKind::Retention, _) => {
                base.action = "retention.run".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                Kind::AdminAction
            }
            (AuditKind::ReplicationReconcile, _) => {
                base.action = "replication.reconcile".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                Kind::AdminAction
            }
            (AuditKind::BucketShip, _) => {
                base.action = "bucket.ship".into();
                Kind::AdminAction
            }
            (AuditKind::BucketFollow, _) => {
                base.action = "bucket.follow".into();
                Kind::AdminAction
            }
            (AuditKind::PullThroughEvict, _) => {
                base.action = "pull_through.evict.run".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                Kind::AdminAction
            }
            (AuditKind::WebhookRedeliver, _) => {
                base.action = "webhook.redeliver".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                Kind::AdminAction
            }
            (AuditKind::RobotCreate, _) => {
                base.action = "robot.create".into();
                base.tag = first(&query(req), "name").map(|n| format!("robot:{n}"));
                Kind::AdminAction
            }
            (AuditKind::RobotRevoke, Route::AdminRobot { name }) => {
                base.action = "robot.revoke".into();
                base.tag = Some(format!("robot:{name}"));
                Kind::AdminAction
            }
            (AuditKind::Gc, _) => {
                base.action = "gc.run".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                Kind::Gc
            }
            (kind, r) => {
                // The table pairs each kind with its path; should it not, say so in the
                // log rather than drop the line silently.
                tracing::error!(?kind, ?r, "no audit plan for this endpoint");
                return None;
            }
        };
        Some(Plan { base, kind })
    }

    /// The audit lines, and the webhook events of a change that succeeded.
    fn after(
        self,
        res: &Response<ResBody>,
        failure: Option<String>,
    ) -> (Vec<Event>, Vec<WebhookEvent>) {
        let Plan { mut base, kind } = self;
        let mut hooks = Vec::new();
        let status = res.status();
        let digest = response_digest(res).map(str::to_owned);
        if digest.is_some() {
            base.digest = digest.clone();
        }
        if let Some(f) = &failure {
            base.outcome = "failed".into();
            base.reason = Some(f.clone());
        }
        let mut out = Vec::new();
        let ok = failure.is_none() && status.is_success();
        match kind {
            Kind::ManifestPut { tags } => {
                if ok {
                    let mut pushed = WebhookEvent::of_audit(WebhookKind::ManifestPushed, &base);
                    pushed.tag = tags.first().map(|(t, _)| t.clone());
                    hooks.push(pushed);
                    for (tag, before) in &tags {
                        if *before != digest {
                            let mut set = WebhookEvent::of_audit(WebhookKind::TagSet, &base);
                            set.tag = Some(tag.clone());
                            set.previous = before.clone();
                            hooks.push(set);
                        }
                    }
                }
                base.action = "manifest.put".into();
                if !tags.is_empty() {
                    base.tag = Some(
                        tags.iter()
                            .map(|(t, _)| t.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                    );
                }
                out.push(base.clone());
                if failure.is_none() {
                    for (tag, before) in tags {
                        if before.is_some() && before != digest {
                            let mut e = base.clone();
                            e.action = "tag.move".into();
                            e.tag = Some(tag);
                            e.previous = before;
                            out.push(e);
                        }
                    }
                }
            }
            Kind::ManifestDelete { tag } => match tag {
                Some((t, before)) => {
                    base.action = "tag.delete".into();
                    base.tag = Some(t);
                    base.digest = before;
                    if ok {
                        hooks.push(WebhookEvent::of_audit(WebhookKind::TagDeleted, &base));
                    }
                    out.push(base);
                }
                None => {
                    base.action = "manifest.delete".into();
                    if ok {
                        hooks.push(WebhookEvent::of_audit(WebhookKind::ManifestDeleted, &base));
                    }
                    out.push(base);
                }
            },
            Kind::Mount { from } => {
                // 202 means "no mount, upload it instead": nothing happened yet.
                if status == StatusCode::ACCEPTED {
                    return (out, hooks);
                }
                base.action = "blob.mount".into();
                base.previous = from;
                if ok {
                    let mut e = WebhookEvent::of_audit(WebhookKind::BlobUploaded, &base);
                    e.previous = base.previous.clone();
                    hooks.push(e);
                }
                out.push(base);
            }
            Kind::Upload => {
                base.action = "blob.upload".into();
                if ok {
                    hooks.push(WebhookEvent::of_audit(WebhookKind::BlobUploaded, &base));
                }
                out.push(base);
            }
            Kind::BlobDelete => {
                base.action = "blob.delete".into();
                out.push(base);
            }
            Kind::UploadCancel => {
                base.action = "upload.cancel".into();
                out.push(base);
            }
            Kind::Gc | Kind::AdminAction => out.push(base),
        }
        (out, hooks)
    }
}
