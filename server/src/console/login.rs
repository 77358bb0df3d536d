//! Signing in and out of the console, and refusing forms without their token. Robots
//! cannot sign in (their tokens are for clients); users sign in with the registry's
//! passwords, under the same failed-login throttling and audit as the API.

use hyper::StatusCode;
use maud::html;

use super::html::{self, Nav};
use super::{Reply, Visit};
use crate::auth::Principal;

/// Where to go after signing in: a console path, never another site.
fn next_path(next: &str) -> String {
    let ok = next.starts_with("/ui/") && !next.starts_with("//") && !next.contains('\\');
    if ok {
        next.to_owned()
    } else {
        "/ui/".to_owned()
    }
}

/// The sign-in page (with authentication off, straight to the repositories).
pub fn form(v: &Visit<'_>, expired: bool, next: Option<&str>) -> Reply {
    if !v.app.auth.enabled() {
        return Reply::Redirect("/ui/".into());
    }
    let next = next.unwrap_or(v.q("next")).to_owned();
    form_with(v, expired, &next, None, StatusCode::OK)
}

fn form_with(
    v: &Visit<'_>,
    expired: bool,
    next: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Reply {
    let idle_min = v.app.config.console_idle_secs / 60;
    let body = html! {
        div.login.card {
            h1 { "Sign in to Ballast" }
            @if expired {
                (html::message("note", &format!(
                    "Your session ended (unused for more than {idle_min} minutes, signed out, \
                     or the account's password changed). Sign in again."
                )))
            }
            @if let Some(e) = error { (html::message("error", e)) }
            form method="post" action="/ui/login" {
                (html::csrf_field(&v.session.csrf))
                input type="hidden" name="next" value=(next);
                label for="username" { "User name" }
                input #username name="username" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button #signin type="submit" { "Sign in" }
            }
            p.muted { "Robot accounts cannot sign in here: their tokens are for registry clients." }
        }
    };
    Reply::Page(status, html::page(None, Nav::None, "Sign in", body))
}

/// `POST /ui/login`.
pub async fn submit(v: &mut Visit<'_>) -> (Reply, Option<Option<String>>) {
    let app = v.app;
    if !app.auth.enabled() {
        return (Reply::Redirect("/ui/".into()), None);
    }
    let (user, password, next) = (
        v.f("username").to_owned(),
        v.f("password").to_owned(),
        next_path(v.f("next")),
    );
    match app.auth.login(&user, &password, v.peer.ip(), None).await {
        Ok(Principal::Robot(name)) => {
            let mut e = v.event(format!("robot:{name}"), "console.login");
            e.outcome = "denied".into();
            e.reason = Some("robots cannot sign in to the console".into());
            app.audit.record(e).await;
            let msg = "Robot accounts cannot sign in to the console; sign in as a user.";
            (
                form_with(v, false, &next, Some(msg), StatusCode::FORBIDDEN),
                None,
            )
        }
        Ok(p) => {
            // A new session for the signed-in user (the one from before signing in, which
            // a page on another site could have seen set, is dropped).
            app.console.sessions.remove(&v.token);
            let stamp = app.auth.session_stamp(&p);
            let (token, _) = app.console.sessions.create(Some(p.clone()), stamp);
            let e = v.event(p.subject(), "console.login");
            app.audit.record(e).await;
            (Reply::Redirect(next), Some(Some(token)))
        }
        Err(denial) => {
            let status = denial.error.code_and_status().1;
            let msg = denial.error.to_string();
            // Audited and counted as the API's failed logins are.
            let _ = crate::guard::denied(app, denial, v.id.as_ref()).await;
            (form_with(v, false, &next, Some(&msg), status), None)
        }
    }
}

/// `POST /ui/logout`.
pub async fn logout(v: &mut Visit<'_>) -> (Reply, Option<Option<String>>) {
    let app = v.app;
    app.console.sessions.remove(&v.token);
    if let Some(p) = &v.session.user {
        if app.auth.enabled() {
            let e = v.event(p.subject(), "console.logout");
            app.audit.record(e).await;
        }
    }
    let to = if app.auth.enabled() {
        "/ui/login"
    } else {
        "/ui/"
    };
    (Reply::Redirect(to.into()), Some(None))
}

/// A form posted without this session's token: refused, logged and audited (a page on
/// another site trying to act with the viewer's session looks like this).
pub async fn csrf_refused(v: &Visit<'_>, path: &str) -> Reply {
    let actor = v
        .session
        .user
        .as_ref()
        .map_or("anonymous".to_owned(), Principal::subject);
    tracing::warn!(peer = %v.peer, actor, path, "console: form without a valid form token refused");
    let mut e = v.event(actor, "console.form");
    e.outcome = "denied".into();
    e.reason = Some(format!(
        "POST {path} without this session's form token (CSRF)"
    ));
    v.app.audit.record(e).await;
    v.fail(
        StatusCode::FORBIDDEN,
        "Form refused",
        "This form did not carry the session's security token (it was sent from another \
         page, or the session changed). Reload the page and try again.",
    )
}

#[cfg(test)]
mod tests {
    use super::next_path;

    #[test]
    fn only_console_paths_are_gone_back_to() {
        assert_eq!(next_path("/ui/repo?name=a"), "/ui/repo?name=a");
        assert_eq!(next_path("https://evil.example/"), "/ui/");
        assert_eq!(next_path("//evil.example/ui/"), "/ui/");
        assert_eq!(next_path("/ui/\\evil"), "/ui/");
        assert_eq!(next_path(""), "/ui/");
    }
}
