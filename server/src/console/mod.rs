//! The web console at `/ui/` on the registry's listener: browse, understand and manage the
//! registry in a browser. Server-rendered HTML (maud templates, checked and compiled into
//! the binary), one stylesheet and one small script, both compiled in too: nothing is
//! fetched from anywhere at run time. A strict Content-Security-Policy allows only those.
//!
//! Reads check the same access as the API (a page shows only what its viewer may pull);
//! every change is a request to the API's own endpoint made on the viewer's behalf through
//! [`crate::guard::serve_as`]: the same authorization, handler, audit lines and webhook
//! events as the same request from the wire. Mutations are POSTs that carry the session's
//! form token.

mod activity;
mod admin;
mod figures;
pub mod html;
mod image;
mod login;
mod repos;
pub mod session;
mod storage;

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt as _;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use maud::{html, Markup};

use crate::auth::{Access, Action, Need, Principal};
use crate::body::{self, ReqBody, ResBody};
use crate::config::Config;
use crate::guard::RequestId;
use crate::App;

use self::html::{Nav, Viewer};
use self::session::{Found, Session, Sessions};

/// The Content-Security-Policy of every console response: the console's own stylesheet and
/// script only; no inline script or style, no frames, forms post only to the console.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                       base-uri 'none'";

/// Bytes a console form may have.
const FORM_BYTES_MAX: usize = 64 << 10;

/// The console's state.
#[derive(Debug)]
pub struct Console {
    /// Signed-in (and not yet signed-in) visitors.
    pub sessions: Sessions,
    figures: figures::Figures,
}

impl Console {
    /// The console of a server with this configuration.
    pub fn new(config: &Config) -> Console {
        Console {
            sessions: Sessions::new(
                std::time::Duration::from_secs(config.console_idle_secs),
                std::time::Duration::from_secs(config.console_session_max_secs),
            ),
            figures: figures::Figures::default(),
        }
    }
}

/// True for the paths the console serves.
pub fn serves(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// True when a request for `/` comes from a browser (it asks for HTML): it is sent to the
/// console.
pub fn browser_at_root(req: &Request<ReqBody>) -> bool {
    req.uri().path() == "/"
        && matches!(*req.method(), Method::GET | Method::HEAD)
        && req
            .headers()
            .get(hyper::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
}

/// What a page handler answers.
pub(crate) enum Reply {
    /// A page with its status.
    Page(StatusCode, Markup),
    /// A redirect (303 See Other) to a console path.
    Redirect(String),
}

impl Reply {
    fn ok(m: Markup) -> Reply {
        Reply::Page(StatusCode::OK, m)
    }
}

/// One request's visitor: who, with what access, and their session.
pub(crate) struct Visit<'a> {
    pub app: &'a Arc<App>,
    pub peer: SocketAddr,
    /// `None` before signing in (with authentication on).
    pub access: Option<Access>,
    pub session: Session,
    pub token: String,
    pub viewer: Viewer,
    /// The registry's host as clients name it, for pull commands.
    pub host: String,
    pub id: Option<RequestId>,
    /// The query parameters.
    pub query: std::collections::BTreeMap<String, Vec<String>>,
    /// The form fields of a POST.
    pub form: std::collections::BTreeMap<String, String>,
}

/// What an API request made for the viewer answered.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub json: serde_json::Value,
}

impl Answer {
    /// True for a 2xx answer.
    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The error the API gave, as `CODE: message`.
    pub fn error(&self) -> String {
        let e = &self.json["errors"][0];
        match (e["code"].as_str(), e["message"].as_str()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            _ => format!("the registry answered {}", self.status),
        }
    }
}

impl Visit<'_> {
    /// The query parameter `k` (empty when absent).
    pub fn q(&self, k: &str) -> &str {
        crate::handlers::first(&self.query, k).unwrap_or("")
    }

    /// The form field `k` (empty when absent).
    pub fn f(&self, k: &str) -> &str {
        self.form.get(k).map_or("", String::as_str)
    }

    /// The page number asked for (1 when absent or not a number).
    pub fn page_no(&self) -> usize {
        self.q("page").parse().unwrap_or(1).max(1)
    }

    /// True when the viewer may do `action` on `repo`.
    pub fn may(&self, repo: &str, action: Action) -> bool {
        self.access
            .as_ref()
            .is_some_and(|a| a.may(&self.app.auth, repo, action))
    }

    /// The viewer's access (pages that need one are only reached signed in).
    pub fn access(&self) -> Access {
        self.access.clone().unwrap_or_else(|| {
            // (Unreachable: routing sends visitors who are not signed in to the sign-in
            // page first. Should it happen, nothing is allowed.)
            Access::nobody()
        })
    }

    /// Makes an API request on the viewer's behalf, through the same endpoint table,
    /// authorization, handler and audit as a request from the wire.
    pub async fn api(&self, method: Method, uri: &str) -> Answer {
        let Ok(mut req) = Request::builder()
            .method(method)
            .uri(uri)
            .body(ReqBody::Empty)
        else {
            return Answer {
                status: StatusCode::BAD_REQUEST,
                json: serde_json::json!({ "errors": [{
                    "code": "NAME_INVALID",
                    "message": format!("{uri:?} is not a valid request path"),
                }] }),
            };
        };
        if let Some(id) = &self.id {
            req.extensions_mut().insert(id.clone());
        }
        let res = crate::guard::serve_as(self.app, self.peer, &self.access(), req).await;
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Answer { status, json }
    }

    /// A page in the frame.
    pub fn page(&self, nav: Nav, title: &str, body: Markup) -> Markup {
        html::page(Some(&self.viewer), nav, title, body)
    }

    /// A page saying something went wrong, with its status.
    pub fn fail(&self, status: StatusCode, title: &str, text: &str) -> Reply {
        Reply::Page(
            status,
            self.page(
                Nav::None,
                title,
                html! {
                    h1 { (title) }
                    (html::message("error", text))
                    p { a href="/ui/" { "Back to the repositories" } }
                },
            ),
        )
    }

    /// The refusal of an admins-only page to anyone else.
    pub fn admin_only(&self, page: &str) -> Option<Reply> {
        (!self.viewer.admin).then(|| {
            self.fail(
                StatusCode::FORBIDDEN,
                "Admins only",
                &format!("The {page} page is for the registry's admins."),
            )
        })
    }

    /// An audit line of this visit: actor, action, client address and request id.
    pub fn event(&self, actor: impl Into<String>, action: &str) -> crate::audit::Event {
        let mut e = crate::audit::Event::new(actor, action);
        e.client = Some(self.peer.ip().to_string());
        e.request_id = self.id.as_ref().map(|i| i.as_str().to_owned());
        e
    }

    /// The page for a repository the viewer may not see or that does not exist (the same
    /// answer for both: the console tells nothing of repositories one may not pull).
    pub fn no_repository(&self, name: &str) -> Reply {
        self.fail(
            StatusCode::NOT_FOUND,
            "Repository not found",
            &format!("There is no repository {name:?}, or you may not pull it."),
        )
    }

    /// Runs `f` off the async threads.
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        tokio::task::spawn_blocking(f).await.ok()
    }
}

/// The host clients pull from: `public_url`'s, else the `Host` the browser used.
fn registry_host(config: &Config, req: &Request<ReqBody>) -> String {
    if let Some(u) = &config.public_url {
        let rest = u.split_once("://").map_or(u.as_str(), |(_, r)| r);
        return rest.trim_end_matches('/').to_owned();
    }
    req.headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| config.listen.to_string())
}

/// Serves a console request.
pub async fn serve(app: &Arc<App>, peer: SocketAddr, req: Request<ReqBody>) -> Response<ResBody> {
    let path = req.uri().path().to_owned();
    if let Some(name) = path.strip_prefix("/ui/assets/") {
        return asset(name);
    }
    if path == "/ui" || browser_at_root(&req) {
        return finish(Reply::Redirect("/ui/".into()), None, app.config.tls());
    }
    let console = &app.console;
    let mut new_cookie = None;
    let mut expired = false;
    let found = session::token_of(req.headers()).map(|t| (console.sessions.find(&t), t));
    let (mut token, mut session) = match found {
        Some((Found::Live(s), t)) => (t, s),
        other => {
            expired = matches!(other, Some((Found::Expired, _)));
            let user = (!app.auth.enabled()).then_some(Principal::Anonymous);
            let (t, s) = console.sessions.create(user, 0);
            new_cookie = Some(t.clone());
            (t, s)
        }
    };
    let mut access = session
        .user
        .as_ref()
        .and_then(|p| app.auth.session_access(p, session.stamp));
    if session.user.is_some() && access.is_none() {
        // The account is gone, or its password changed: this session ends (others end at
        // their own next request; one signed in with the new password stays).
        console.sessions.remove(&token);
        let (t, s) = console.sessions.create(None, 0);
        new_cookie = Some(t.clone());
        (token, session, access) = (t, s, None);
        expired = true;
    }
    let admin = access
        .as_ref()
        .is_some_and(|a| app.auth.grants(a, &Need::Admin));
    let viewer = Viewer {
        name: match (&session.user, app.auth.enabled()) {
            (Some(p), true) => Some(match p {
                Principal::User(n) | Principal::Robot(n) => n.clone(),
                Principal::Anonymous => "anonymous".into(),
            }),
            _ => None,
        },
        admin,
        csrf: session.csrf.clone(),
        replica_of: (app.replica.as_ref()).map(|f| f.bucket().describe().to_owned()),
    };
    let method = req.method().clone();
    let query = crate::handlers::query(&req);
    let host = registry_host(&app.config, &req);
    let id = req.extensions().get::<RequestId>().cloned();
    let mut visit = Visit {
        app,
        peer,
        access,
        session,
        token,
        viewer,
        host,
        id,
        query,
        form: Default::default(),
    };
    let secure = app.config.tls();
    if method == Method::POST {
        let mut body = req.into_body();
        let bytes = match body::read_limited(&mut body, FORM_BYTES_MAX, app.body_pace()).await {
            Ok(Some(b)) => b,
            Ok(None) => {
                let r = visit.fail(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    "A console form is at most 64 KiB.",
                );
                return finish(r, new_cookie.as_deref(), secure);
            }
            Err(e) => {
                let r = visit.fail(StatusCode::BAD_REQUEST, "Form not received", &e.to_string());
                return finish(r, new_cookie.as_deref(), secure);
            }
        };
        visit.form = form_urlencoded::parse(&bytes).into_owned().collect();
        if !visit
            .session
            .csrf_ok(visit.form.get("csrf").map(String::as_str))
        {
            let r = login::csrf_refused(&visit, &path).await;
            return finish(r, new_cookie.as_deref(), secure);
        }
    } else if method != Method::GET && method != Method::HEAD {
        let r = visit.fail(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "The console takes GET for pages and POST for forms.",
        );
        return finish(r, new_cookie.as_deref(), secure);
    }
    let (reply, cookie) = route(&mut visit, &method, &path, expired).await;
    let cookie = match cookie {
        Some(c) => Some(c),
        None => new_cookie.map(Some),
    };
    let mut res = finish(reply, None, secure);
    if let Some(c) = cookie {
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(c.as_deref(), secure)) {
            res.headers_mut().insert(SET_COOKIE, v);
        }
    }
    res
}

/// Routes a console request; the answer, and a cookie to set (`Some(None)` removes it).
async fn route(
    v: &mut Visit<'_>,
    method: &Method,
    path: &str,
    expired: bool,
) -> (Reply, Option<Option<String>>) {
    let get = *method != Method::POST;
    match (get, path) {
        (true, "/ui/login") => return (login::form(v, expired, None), None),
        (false, "/ui/login") => return login::submit(v).await,
        (false, "/ui/logout") => return login::logout(v).await,
        _ => {}
    }
    if v.access.is_none() {
        if !get {
            return (
                v.fail(
                    StatusCode::FORBIDDEN,
                    "Sign in first",
                    "Your session ended; sign in and try again.",
                ),
                None,
            );
        }
        let next = v.query_string_path(path);
        return (
            if expired {
                login::form(v, true, Some(&next))
            } else {
                Reply::Redirect(html::url("/ui/login", &[("next", &next)]))
            },
            None,
        );
    }
    let reply = match (get, path) {
        (true, "/ui/" | "/ui/repos") => repos::list(v).await,
        (true, "/ui/repo") => repos::repository(v).await,
        (true, "/ui/image") => image::show(v).await,
        (true, "/ui/tag/delete") => repos::confirm_delete(v).await,
        (false, "/ui/tag/delete") => repos::delete(v).await,
        (true, "/ui/storage") => storage::show(v).await,
        (false, "/ui/gc") => storage::gc(v).await,
        (false, "/ui/retention") => storage::retention(v).await,
        (true, "/ui/activity") => activity::show(v).await,
        (true, "/ui/admin") => admin::show(v).await,
        (false, "/ui/robots/create") => admin::create_robot(v).await,
        (true, "/ui/robots/revoke") => admin::confirm_revoke(v).await,
        (false, "/ui/robots/revoke") => admin::revoke_robot(v).await,
        _ => v.fail(
            StatusCode::NOT_FOUND,
            "Page not found",
            &format!("The console has no page at {path}."),
        ),
    };
    (reply, None)
}

impl Visit<'_> {
    /// The path and query of this request, for coming back after signing in.
    fn query_string_path(&self, path: &str) -> String {
        let pairs: Vec<(&str, &str)> = self
            .query
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.as_str(), v.as_str())))
            .collect();
        html::url(path, &pairs)
    }
}

/// The headers every console response carries, and the page or redirect.
fn finish(reply: Reply, cookie: Option<&str>, secure: bool) -> Response<ResBody> {
    let mut res = match reply {
        Reply::Page(status, markup) => {
            let mut r = Response::new(body::full(markup.into_string()));
            *r.status_mut() = status;
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        Reply::Redirect(to) => {
            let mut r = Response::new(body::empty());
            *r.status_mut() = StatusCode::SEE_OTHER;
            // (Only console paths are ever redirected to: `to` is built here, and a
            // `next` parameter is checked to be one.)
            if let Ok(v) = HeaderValue::from_str(&to) {
                r.headers_mut().insert(LOCATION, v);
            }
            r
        }
    };
    let h = res.headers_mut();
    protect(h);
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie {
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(Some(c), secure)) {
            h.insert(SET_COOKIE, v);
        }
    }
    res
}

/// The headers every console answer carries: the policy, and no type sniffing.
fn protect(h: &mut hyper::HeaderMap) {
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

/// The stylesheet and the script, compiled into the binary.
fn asset(name: &str) -> Response<ResBody> {
    let (body, kind): (&'static str, &'static str) = match name {
        "console.css" => (
            include_str!("assets/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_str!("assets/console.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => {
            return crate::error::response(&crate::error::ApiError::NotFound(format!(
                "the console has no asset {name:?}"
            )))
        }
    };
    let mut r = Response::new(body::full(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    protect(h);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r
}
