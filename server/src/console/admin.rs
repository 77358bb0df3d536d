//! The Admin page (registry admins): robot accounts (create, with the token shown once;
//! revoke), and the state of webhooks, replication and pull-through upstreams. Every read
//! and change goes through the API's admin endpoints on the viewer's behalf.

use hyper::{Method, StatusCode};
use maud::html;

use super::html::{self, Nav};
use super::{Reply, Visit};

/// `GET /ui/admin`.
pub async fn show(v: &Visit<'_>) -> Reply {
    if let Some(r) = v.admin_only("Admin") {
        return r;
    }
    let robots = v.api(Method::GET, "/admin/robots").await;
    let hooks = v.api(Method::GET, "/admin/webhooks").await;
    let replication = v.api(Method::GET, "/admin/replication").await;
    let upstreams = v.api(Method::GET, "/admin/pull-through").await;
    let list = |a: &super::Answer, k: &str| a.json[k].as_array().cloned().unwrap_or_default();
    let robots_list = list(&robots, "robots");
    let csrf = &v.session.csrf;
    let body = html! {
        h1 { "Admin" }
        h2 { "Robot accounts" }
        div.card {
            @if !robots.ok() { (html::message("error", &robots.error())) }
            @if robots_list.is_empty() {
                p.muted { "No robots. Create one for each CI pipeline; grant it rights with subject \"robot:NAME\" in [[auth.policy]]." }
            } @else {
                table #robots {
                    thead { tr { th { "Name" } th { "Description" } th { "Created" } th {} } }
                    tbody { @for r in &robots_list {
                        @let name = r["name"].as_str().unwrap_or("");
                        tr data-robot=(name) {
                            td { (name) }
                            td { (r["description"].as_str().unwrap_or("")) }
                            td { (html::time(r["created_at"].as_u64().unwrap_or(0))) }
                            td { a.button.danger href=(html::url("/ui/robots/revoke", &[("name", name)])) { "Revoke" } }
                        }
                    } }
                }
            }
            h2 { "New robot" }
            form.filters method="post" action="/ui/robots/create" {
                (html::csrf_field(csrf))
                label { "Name" input #robot-name name="name" required pattern="[a-z0-9][a-z0-9._-]{0,63}" placeholder="ci-team-a"; }
                label { "Description" input #robot-description name="description" maxlength="200"; }
                button #robot-create type="submit" { "Create" }
            }
        }
        h2 { "Webhooks" }
        @let endpoints = list(&hooks, "endpoints");
        @if endpoints.is_empty() { p.muted { "No webhook endpoints ([[webhooks]] in the config)." } }
        @else { (html::json_table(&endpoints)) }
        h2 { "Replication" }
        @let rules = list(&replication, "rules");
        @if rules.is_empty() { p.muted { "No replication rules ([[replication]] in the config)." } }
        @else { (html::json_table(&rules)) }
        h2 { "Pull-through cache" }
        @let ups = list(&upstreams, "upstreams");
        @if ups.is_empty() { p.muted { "No upstreams ([[pull_through]] in the config)." } }
        @else { (html::json_table(&ups)) }
    };
    Reply::ok(v.page(Nav::Admin, "Admin", body))
}

/// `POST /ui/robots/create`: `POST /admin/robots` on the viewer's behalf; shows the token,
/// once.
pub async fn create_robot(v: &Visit<'_>) -> Reply {
    let uri = html::url(
        "/admin/robots",
        &[("name", v.f("name")), ("description", v.f("description"))],
    );
    let a = v.api(Method::POST, &uri).await;
    if !a.ok() {
        return v.fail(a.status, "Robot not created", &a.error());
    }
    let name = a.json["name"].as_str().unwrap_or("").to_owned();
    let token = a.json["token"].as_str().unwrap_or("").to_owned();
    let body = html! {
        h1 { "Robot " (name) " created" }
        (html::message("note", "Its token is shown here once and never again: copy it now, into your CI's secret store."))
        div.card {
            (html::copy_field("robot-token", &token))
            p { "Log in from a client with user name " code { (name) } " and this token as password, e.g. "
                code { "docker login " (v.host) " -u " (name) } "." }
            p { "Grant it rights with subject " code { "robot:" (name) } " in " code { "[[auth.policy]]" } "." }
        }
        p { a href="/ui/admin" { "Back to Admin" } }
    };
    Reply::ok(v.page(Nav::Admin, "Robot created", body))
}

/// `GET /ui/robots/revoke?name=…`: asks to confirm.
pub async fn confirm_revoke(v: &Visit<'_>) -> Reply {
    if let Some(r) = v.admin_only("Admin") {
        return r;
    }
    let name = v.q("name").to_owned();
    let body = html! {
        h1 { "Revoke robot " (name) "?" }
        div.card {
            p { "Its token, and every token issued to it, stop working at once." }
            form method="post" action="/ui/robots/revoke" {
                (html::csrf_field(&v.session.csrf))
                input type="hidden" name="name" value=(name);
                button.danger #confirm-revoke type="submit" { "Revoke" }
                " " a href="/ui/admin" { "Cancel" }
            }
        }
    };
    Reply::ok(v.page(Nav::Admin, "Revoke robot", body))
}

/// `POST /ui/robots/revoke`: `DELETE /admin/robots/<name>` on the viewer's behalf.
pub async fn revoke_robot(v: &Visit<'_>) -> Reply {
    let name = v.f("name").to_owned();
    if crate::auth::accounts::validate_robot_name(&name).is_err() {
        return v.fail(
            StatusCode::BAD_REQUEST,
            "Not revoked",
            &format!("{name:?} is not a robot name."),
        );
    }
    let a = v
        .api(Method::DELETE, &format!("/admin/robots/{name}"))
        .await;
    if !a.ok() {
        return v.fail(a.status, "Not revoked", &a.error());
    }
    let body = html! {
        h1 { "Robot revoked" }
        (html::message("ok", &format!("Robot {name} is revoked.")))
        p { a href="/ui/admin" { "Back to Admin" } }
    };
    Reply::ok(v.page(Nav::Admin, "Robot revoked", body))
}
