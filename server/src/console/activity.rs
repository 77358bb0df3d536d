//! The Activity page: the audit log, newest first, filtered by actor, action, repository,
//! outcome and time, a page at a time. Admins see every line; others the lines of the
//! repositories they may pull.

use hyper::StatusCode;
use maud::html;

use super::html::{self, Nav, PAGE_ROWS};
use super::{Reply, Visit};
use crate::audit::query;
use crate::auth::Action;

/// `GET /ui/activity`.
pub async fn show(v: &Visit<'_>) -> Reply {
    let filter = match crate::handlers::admin_audit_filter(&v.query) {
        Ok(f) => f,
        Err(e) => {
            return v.fail(
                StatusCode::BAD_REQUEST,
                "Filter not understood",
                &e.to_string(),
            )
        }
    };
    let page = v.page_no();
    let (app, access, admin) = (v.app.clone(), v.access(), v.viewer.admin);
    let log = v.app.config.audit_path();
    let found = v
        .blocking(move || {
            query::newest(
                &log,
                &filter,
                |line| {
                    admin
                        || line["repository"]
                            .as_str()
                            .is_some_and(|r| access.may(&app.auth, r, Action::Pull))
                },
                (page - 1) * PAGE_ROWS,
                PAGE_ROWS,
            )
        })
        .await;
    let p = match found {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            return v.fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Audit log unreadable",
                &format!("{e:#}"),
            )
        }
        None => {
            return v.fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Audit log unreadable",
                "the read failed",
            )
        }
    };
    let keys = ["actor", "action", "repository", "outcome", "since", "until"];
    let params: Vec<(&str, &str)> = keys.iter().map(|k| (*k, v.q(k))).collect();
    let field = |l: &serde_json::Value, k: &str| l[k].as_str().unwrap_or("").to_owned();
    let next = {
        let mut all = params.clone();
        let n = (page + 1).to_string();
        all.push(("page", &n));
        html::url("/ui/activity", &all)
    };
    let prev = {
        let mut all = params.clone();
        let n = (page.saturating_sub(1)).max(1).to_string();
        all.push(("page", &n));
        html::url("/ui/activity", &all)
    };
    let outcome = v.q("outcome");
    let body = html! {
        h1 { "Activity" }
        form.filters method="get" action="/ui/activity" {
            label { "Actor" input name="actor" value=(v.q("actor")) placeholder="user:alice"; }
            label { "Action" input name="action" value=(v.q("action")) placeholder="tag.delete or manifest."; }
            label { "Repository" input name="repository" value=(v.q("repository")); }
            label { "Outcome"
                select name="outcome" {
                    option value="" selected[outcome.is_empty()] { "any" }
                    @for o in ["ok", "denied", "failed"] { option value=(o) selected[outcome == o] { (o) } }
                }
            }
            label { "Since (UTC)" input type="datetime-local" name="since" value=(v.q("since")); }
            label { "Until (UTC)" input type="datetime-local" name="until" value=(v.q("until")); }
            button type="submit" { "Filter" }
        }
        @if !v.viewer.admin { p.muted { "Showing the lines of repositories you may pull." } }
        @if p.lines.is_empty() {
            (html::message("note", "No audit lines match."))
        } @else {
            table #activity {
                thead { tr { th { "Time" } th { "Actor" } th { "Action" } th { "Repository" } th { "Tag" } th { "Digest" } th { "Outcome" } th { "Reason" } } }
                tbody { @for l in &p.lines {
                    tr data-action=(field(l, "action")) {
                        td { (field(l, "time").replace('T', " ")) }
                        td { (field(l, "actor")) }
                        td { (field(l, "action")) }
                        td { (field(l, "repository")) }
                        td { (field(l, "tag")) }
                        td.mono title=(field(l, "digest")) { (html::short(&field(l, "digest"))) }
                        td { (field(l, "outcome")) }
                        td { (field(l, "reason")) }
                    }
                } }
            }
            nav.pager {
                @if page > 1 { a rel="prev" href=(prev) { "← Newer" } }
                span.muted { "Page " (page) }
                @if p.more { a rel="next" href=(next) { "Older →" } }
            }
        }
    };
    Reply::ok(v.page(Nav::Activity, "Activity", body))
}
