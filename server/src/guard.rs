//! What stands around every request: the authorization check before the handler, the audit
//! lines after it, and the token endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

use crate::audit::Event;
use crate::auth::{Access, Denial, Need};
use crate::body::ResBody;
use crate::error::ApiError;
use crate::handlers::{self, first, parse_form, query, reply};
use crate::routes::{route, Route};
use crate::App;

/// Largest token request body (an OAuth2 form), in bytes.
const TOKEN_FORM_MAX: usize = 64 << 10;

/// Serves one request: token endpoint, or authorization, handler and audit.
pub async fn serve(app: &Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Response<ResBody> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let Some(r) = route(&path) else {
        return crate::error_response(&ApiError::NotFound(format!("no endpoint at {path}")));
    };
    if r == Route::Token {
        return token(app, peer, req).await;
    }
    let need = handlers::need(&method, &r);
    // A name that cannot exist is refused before anything echoes it (the challenge's scope).
    if let Need::Repo(name, _) = &need {
        if let Err(e) = ballast_engine::names::validate_repo(name) {
            return crate::error_response(&ApiError::NameInvalid(e.to_string()));
        }
    }
    // (Only challenges use the host; the hot path without authentication skips it.)
    let host = if app.auth.enabled() { host(&req) } else { None };
    let access = match app
        .auth
        .check(req.headers(), host.as_deref(), peer.ip(), &need)
        .await
    {
        Ok(a) => a,
        Err(d) => return denied(app, d).await,
    };
    let plan = Plan::before(app, &method, &r, &req, &access, peer);
    let (mut res, failure) = match handlers::dispatch(app, &access, &path, r, req).await {
        Ok(res) => (res, None),
        Err(e) => {
            let (code, _) = e.code_and_status();
            (crate::error_response(&e), Some(format!("{code}: {e}")))
        }
    };
    if let Some(plan) = plan {
        app.audit.record_all(plan.after(&res, failure)).await;
    }
    res.extensions_mut().insert(Actor(access.actor()));
    res
}

/// Who made a request, as the audit log names them, for the request log line.
#[derive(Clone, Debug)]
pub struct Actor(pub String);

/// The request's host, for the token realm (`Host`, or the authority of an HTTP/2 URI).
fn host(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Answers a denial, with its challenge or Retry-After, and audits it.
async fn denied(app: &App, d: Denial) -> Response<ResBody> {
    let mut res = crate::error_response(&d.error);
    if let Some(c) = d.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        res.headers_mut().insert(WWW_AUTHENTICATE, c);
    }
    if let Some(s) = d.retry_after {
        res.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    if let Some(e) = d.audit {
        res.extensions_mut().insert(Actor(e.actor.clone()));
        app.audit.record(e).await;
    }
    res
}

/// `GET /token` (Basic credentials or none) and `POST /token` (OAuth2 password grant).
async fn token(app: &Arc<App>, peer: SocketAddr, req: Request<Incoming>) -> Response<ResBody> {
    let mut params = query(&req);
    let headers = req.headers().clone();
    match *req.method() {
        Method::GET => {}
        Method::POST => {
            let body = http_body_util::Limited::new(req.into_body(), TOKEN_FORM_MAX);
            let form =
                match tokio::time::timeout(app.config.body_idle_timeout(), body.collect()).await {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => {
                        return crate::error_response(&ApiError::Unsupported(format!(
                        "the token request body must be a form of at most {TOKEN_FORM_MAX} bytes"
                    )))
                    }
                };
            for (k, v) in parse_form(&String::from_utf8_lossy(&form)) {
                params.entry(k).or_default().extend(v);
            }
        }
        ref m => {
            return crate::error_response(&ApiError::MethodNotAllowed(format!(
                "{m} is not allowed on /token"
            )))
        }
    }
    match app.auth.issue(&headers, &params, peer.ip()).await {
        Ok(body) => reply(StatusCode::OK)
            .header(hyper::header::CACHE_CONTROL, "no-store")
            .json(&body),
        Err(d) => denied(app, d).await,
    }
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
}

impl Plan {
    fn before(
        app: &App,
        method: &Method,
        r: &Route<'_>,
        req: &Request<Incoming>,
        access: &Access,
        peer: SocketAddr,
    ) -> Option<Plan> {
        // Reads are not audited: keep the hottest requests free of this work.
        if matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        let mut base = Event::new(access.actor(), "");
        base.client = Some(peer.ip().to_string());
        let target = |name: &str, tag: &str| {
            let cat = app.store.catalog().read();
            cat.repos
                .get(name)
                .and_then(|r| r.tags.get(tag))
                .map(|d| d.to_string())
        };
        let (name, kind) = match (method, r) {
            (&Method::PUT, Route::Manifest { name, reference }) => {
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
                (name, Kind::ManifestPut { tags })
            }
            (&Method::DELETE, Route::Manifest { name, reference }) => {
                if reference.contains(':') {
                    base.digest = Some((*reference).to_owned());
                    (name, Kind::ManifestDelete { tag: None })
                } else {
                    let before = target(name, reference);
                    let tag = Some(((*reference).to_owned(), before));
                    (name, Kind::ManifestDelete { tag })
                }
            }
            (&Method::POST, Route::UploadStart { name }) => {
                let q = query(req);
                if let Some(m) = first(&q, "mount") {
                    base.digest = Some(m.to_owned());
                    (
                        name,
                        Kind::Mount {
                            from: first(&q, "from").map(str::to_owned),
                        },
                    )
                } else if let Some(d) = first(&q, "digest") {
                    base.digest = Some(d.to_owned());
                    (name, Kind::Upload)
                } else {
                    return None;
                }
            }
            (&Method::PUT, Route::Upload { name, .. }) => {
                base.digest = first(&query(req), "digest").map(str::to_owned);
                (name, Kind::Upload)
            }
            (&Method::DELETE, Route::Upload { name, .. }) => (name, Kind::UploadCancel),
            (&Method::DELETE, Route::Blob { name, digest }) => {
                base.digest = Some((*digest).to_owned());
                (name, Kind::BlobDelete)
            }
            (&Method::POST, Route::AdminGc) => {
                base.action = "gc.run".into();
                base.reason = req.uri().query().map(|q| format!("on request: {q}"));
                return Some(Plan {
                    base,
                    kind: Kind::Gc,
                });
            }
            _ => return None,
        };
        base.repository = Some((*name).to_owned());
        Some(Plan { base, kind })
    }

    fn after(self, res: &Response<ResBody>, failure: Option<String>) -> Vec<Event> {
        let Plan { mut base, kind } = self;
        let status = res.status();
        let digest = res
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if digest.is_some() {
            base.digest = digest.clone();
        }
        if let Some(f) = &failure {
            base.outcome = "failed".into();
            base.reason = Some(f.clone());
        }
        let mut out = Vec::new();
        match kind {
            Kind::ManifestPut { tags } => {
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
                    out.push(base);
                }
                None => {
                    base.action = "manifest.delete".into();
                    out.push(base);
                }
            },
            Kind::Mount { from } => {
                // 202 means "no mount, upload it instead": nothing happened yet.
                if status == StatusCode::ACCEPTED {
                    return out;
                }
                base.action = "blob.mount".into();
                base.previous = from;
                out.push(base);
            }
            Kind::Upload => {
                base.action = "blob.upload".into();
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
            Kind::Gc => out.push(base),
        }
        out
    }
}
