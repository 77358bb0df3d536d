//! The admin endpoints of accounts and the audit log: robots (`/admin/robots`) and audit
//! lines (`/admin/audit`), which the console's Admin and Activity pages also use.

use hyper::{Request, Response, StatusCode};

use super::{blocking, first, query, reply};
use crate::audit::query::{self as audit_query, Filter};
use crate::auth::accounts::{self, RobotsFile};
use crate::body::{ReqBody, ResBody};
use crate::error::ApiError;
use crate::App;

/// Most audit lines one page answers.
pub const AUDIT_PAGE_MAX: usize = 1000;

/// `GET /admin/robots`: name, description and creation time of each robot.
pub async fn robots(app: &App) -> Result<Response<ResBody>, ApiError> {
    let path = app.config.robots_path();
    let file =
        blocking(move || RobotsFile::load(&path).map_err(|e| ApiError::Internal(format!("{e:#}"))))
            .await?;
    let list: Vec<serde_json::Value> = file
        .robots
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name, "description": r.description, "created_at": r.created_at,
            })
        })
        .collect();
    Ok(reply(StatusCode::OK).json(&serde_json::json!({ "robots": list })))
}

/// `POST /admin/robots?name=…[&description=…]`: creates a robot; the answer holds its token,
/// the only time it is shown.
pub async fn robot_create(
    app: &App,
    req: &Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    let q = query(req);
    let name = first(&q, "name")
        .ok_or_else(|| ApiError::NameInvalid("name the robot: ?name=…".into()))?
        .to_owned();
    let description = first(&q, "description").unwrap_or("").to_owned();
    if description.chars().any(char::is_control) || description.len() > 200 {
        return Err(ApiError::Unsupported(
            "a robot's description is one line of at most 200 bytes".into(),
        ));
    }
    accounts::validate_robot_name(&name).map_err(|e| ApiError::NameInvalid(e.to_string()))?;
    let path = app.config.robots_path();
    let now = crate::now_secs();
    let (n, d) = (name.clone(), description.clone());
    let token = blocking(move || {
        accounts::edit_robots(&path, |file| file.create(&n, &d, now))
            .map_err(|e| ApiError::NameInvalid(format!("{e:#}")))
    })
    .await?;
    app.auth.accounts_changed();
    Ok(reply(StatusCode::CREATED).json(&serde_json::json!({
        "name": name,
        "description": description,
        "created_at": now,
        "token": token,
        "note": format!(
            "shown once: store it now. Log in as {name:?} with the token as password; grant it \
             rights with subject \"robot:{name}\" in [[auth.policy]]"
        ),
    })))
}

/// `DELETE /admin/robots/<name>`: revokes a robot; its token, and tokens issued to it, stop
/// working at once.
pub async fn robot_revoke(app: &App, name: &str) -> Result<Response<ResBody>, ApiError> {
    let path = app.config.robots_path();
    let n = name.to_owned();
    blocking(move || {
        accounts::edit_robots(&path, |file| file.revoke(&n))
            .map_err(|e| ApiError::NotFound(format!("{e:#}")))
    })
    .await?;
    app.auth.accounts_changed();
    Ok(reply(StatusCode::OK).json(&serde_json::json!({ "revoked": name })))
}

/// The filter of an audit query: `actor`, `action` (a trailing `.` matches a family),
/// `repository`, `outcome`, `since` and `until` (RFC 3339, or a duration back: `2h`).
pub fn audit_filter(
    q: &std::collections::BTreeMap<String, Vec<String>>,
) -> Result<Filter, ApiError> {
    let text = |k: &str| first(q, k).filter(|v| !v.is_empty()).map(str::to_owned);
    let time = |k: &str| {
        text(k)
            .map(|v| audit_query::parse_time(&v, k))
            .transpose()
            .map_err(|e| ApiError::Unsupported(e.to_string()))
    };
    Ok(Filter {
        actor: text("actor"),
        action: text("action"),
        repository: text("repository"),
        outcome: text("outcome"),
        since: time("since")?,
        until: time("until")?,
    })
}

/// `GET /admin/audit?…&skip=N&limit=N`: matching audit lines, newest first; `more` says
/// whether another page follows.
pub async fn audit(app: &App, req: &Request<ReqBody>) -> Result<Response<ResBody>, ApiError> {
    let q = query(req);
    let filter = audit_filter(&q)?;
    let number = |k: &str, default: usize| -> Result<usize, ApiError> {
        first(&q, k).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| ApiError::Unsupported(format!("{k}={v:?} is not a number")))
        })
    };
    let (skip, limit) = (
        number("skip", 0)?,
        number("limit", 100)?.min(AUDIT_PAGE_MAX),
    );
    let log = app.config.audit_path();
    let page = blocking(move || {
        audit_query::newest(&log, &filter, |_| true, skip, limit)
            .map_err(|e| ApiError::Internal(format!("reading the audit log: {e:#}")))
    })
    .await?;
    Ok(reply(StatusCode::OK).json(&serde_json::json!({
        "lines": page.lines, "more": page.more,
    })))
}
