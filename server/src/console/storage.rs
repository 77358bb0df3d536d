//! The Storage page (registry admins): logical against stored bytes, dedup, dead bytes and
//! segments, per namespace; the last collection, and collections and retention run or
//! previewed (dry run) from here through the API's admin endpoints.

use hyper::Method;
use maud::{html, Markup};

use super::html::{self, Nav};
use super::{Reply, Visit};

/// A JSON report as a definition list (every value escaped).
fn report(v: &serde_json::Value) -> Markup {
    html! {
        dl.kv.report {
            @for (k, val) in v.as_object().into_iter().flatten() {
                dt { (k.replace('_', " ")) }
                dd.mono { (match val { serde_json::Value::String(s) => s.clone(), other => other.to_string() }) }
            }
        }
    }
}

/// `GET /ui/storage`.
pub async fn show(v: &Visit<'_>) -> Reply {
    if let Some(r) = v.admin_only("Storage") {
        return r;
    }
    let figures = v
        .app
        .console
        .figures
        .get(v.app, std::time::Duration::from_secs(5))
        .await;
    let store = v.app.store.clone();
    let (footprint, liveness) = v
        .blocking(move || {
            (
                store.footprint(),
                ballast_engine::inspect::liveness(&store).ok(),
            )
        })
        .await
        .unwrap_or_default();
    let quotas = {
        let q = v.app.quotas.clone();
        v.blocking(move || q.report(true).unwrap_or_default())
            .await
            .unwrap_or_default()
    };
    let last_gc = v.app.last_gc.lock().clone();
    let logical: u64 = figures.as_ref().map_or(0, |f| {
        f.own.namespaces.values().map(|n| n.logical_bytes).sum()
    });
    let csrf = &v.session.csrf;
    let replica = v.app.replica.is_some();
    let body = html! {
        h1 { "Storage" }
        div.card #totals {
            dl.kv {
                dt { "Logical bytes" } dd { (html::bytes(logical)) span.muted { " what the repositories link, each blob in full" } }
                dt { "Segment files" } dd { (html::bytes(footprint.segment_bytes)) " in " (footprint.segments) " segments" }
                dt { "Dedup ratio" } dd #ratio { @if footprint.segment_bytes > 0 { (format!("{:.2}×", logical as f64 / footprint.segment_bytes as f64)) } @else { "—" } }
                @if let Some(l) = liveness {
                    dt { "Live bytes" } dd { (html::bytes(l.live_bytes)) }
                    dt { "Dead bytes" } dd #dead { (html::bytes(l.dead_bytes)) span.muted { " what collections can free" } }
                }
                @if let Some(f) = &figures {
                    dt { "Chunks images need" } dd { (html::bytes(f.own.stored_bytes)) ", of which shared by several images: " (html::bytes(f.own.shared_bytes)) }
                    dt { "Figures of" } dd { (html::time(f.at)) " (" (f.own.image_count) " images)" }
                }
            }
        }
        h2 { "Namespaces" }
        @if let Some(f) = &figures {
            table #namespaces {
                thead { tr {
                    th { "Namespace" } th.num { "Repositories" } th.num { "Logical" }
                    th.num { "Stored" } th.num { "Unique" } th.num { "Shared" } th.num { "Dedup" }
                } }
                tbody { @for (n, b) in &f.own.namespaces {
                    tr {
                        td { a href=(html::url("/ui/", &[("ns", n)])) { (n) } }
                        td.num { (b.repositories) }
                        td.num { (html::bytes(b.logical_bytes)) }
                        td.num { (html::bytes(b.stored_bytes)) }
                        td.num { (html::bytes(b.unique_bytes)) }
                        td.num { (html::bytes(b.stored_bytes.saturating_sub(b.unique_bytes))) }
                        td.num { @if b.stored_bytes > 0 { (format!("{:.2}×", b.logical_bytes as f64 / b.stored_bytes as f64)) } }
                    }
                } }
            }
            p.muted { "Stored: chunk bytes the namespace's images need, each once. Unique: those no other namespace needs (what deleting the namespace would free). Shared: the rest." }
        } @else {
            (html::message("note", "The figures are being counted; reload in a moment."))
        }
        @if !quotas.is_empty() {
            h2 { "Quotas" }
            table #quotas {
                thead { tr { th { "Namespaces" } th.num { "Bytes" } th.num { "Limit" } th.num { "Repositories" } th.num { "Limit" } } }
                tbody { @for u in &quotas {
                    tr {
                        td.mono { (u.namespaces.join(", ")) }
                        td.num { (html::bytes(u.bytes)) }
                        td.num { (u.bytes_max.map_or("—".to_owned(), html::bytes)) }
                        td.num { (u.repositories) }
                        td.num { (u.repositories_max.map_or("—".to_owned(), |m| m.to_string())) }
                    }
                } }
            }
        }
        h2 { "Garbage collection" }
        div.card #gc {
            @match &last_gc {
                Some((at, trigger, r)) => {
                    p { "Last collection: " (html::time(*at)) " (" (trigger) ")." }
                    (report(r))
                }
                None => { p.muted { "No collection since the server started." } }
            }
            // (A read replica's collections and retention run on its primary.)
            @if replica {
                p.muted { "Collections run on the primary." }
            } @else {
                form.inline method="post" action="/ui/gc" {
                    (html::csrf_field(csrf))
                    input type="hidden" name="dry_run" value="true";
                    button.secondary #gc-preview type="submit" { "Preview a collection (dry run)" }
                }
                " "
                form.inline method="post" action="/ui/gc" {
                    (html::csrf_field(csrf))
                    button #gc-run type="submit" { "Collect now" }
                }
            }
        }
        @if !replica {
            h2 { "Retention" }
            div.card {
                p.muted { "What the retention rules would delete now, without deleting anything." }
                form.inline method="post" action="/ui/retention" {
                    (html::csrf_field(csrf))
                    button.secondary #retention-preview type="submit" { "Preview retention (dry run)" }
                }
            }
        }
    };
    Reply::ok(v.page(Nav::Storage, "Storage", body))
}

/// `POST /ui/gc`: `POST /admin/gc[?dry_run=true]` on the viewer's behalf.
pub async fn gc(v: &Visit<'_>) -> Reply {
    let dry = v.f("dry_run") == "true";
    let uri = if dry {
        "/admin/gc?dry_run=true"
    } else {
        "/admin/gc"
    };
    let a = v.api(Method::POST, uri).await;
    if !a.ok() {
        return v.fail(a.status, "Collection not run", &a.error());
    }
    let title = if dry {
        "Collection preview (dry run)"
    } else {
        "Collection finished"
    };
    let body = html! {
        h1 { (title) }
        @if dry { (html::message("note", "Nothing was changed: this is what a collection would do now.")) }
        div.card #gc-report { (report(&a.json)) }
        p { a href="/ui/storage" { "Back to Storage" } }
    };
    Reply::ok(v.page(Nav::Storage, title, body))
}

/// `POST /ui/retention`: `POST /admin/retention?dry_run=true` on the viewer's behalf.
pub async fn retention(v: &Visit<'_>) -> Reply {
    let a = v.api(Method::POST, "/admin/retention?dry_run=true").await;
    if !a.ok() {
        return v.fail(a.status, "Retention preview failed", &a.error());
    }
    let repos = a.json["repositories"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let tags_of = |r: &serde_json::Value| -> Vec<String> {
        r["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t[0].as_str().map(str::to_owned))
            .collect()
    };
    let body = html! {
        h1 { "Retention preview (dry run)" }
        (html::message("note", "Nothing was deleted: this is what the retention rules would delete now."))
        div.card {
            dl.kv {
                dt { "Repositories affected" } dd { (repos.len()) }
                dt { "Bytes a collection would then free" } dd { (html::bytes(a.json["freed_bytes"].as_u64().unwrap_or(0))) }
            }
        }
        @if !repos.is_empty() {
            table #retention {
                thead { tr { th { "Repository" } th { "Rule" } th { "Tags" } th.num { "Manifests" } th.num { "Frees" } } }
                tbody { @for r in &repos {
                    tr {
                        td { (r["repository"].as_str().unwrap_or("")) }
                        td { "#" (r["rule"].as_u64().unwrap_or(0)) }
                        td { @for t in tags_of(r) { span.pill { (t) } } }
                        td.num { (r["manifests"].as_array().map_or(0, Vec::len)) }
                        td.num { (html::bytes(r["freed_bytes"].as_u64().unwrap_or(0))) }
                    }
                } }
            }
        }
        p { a href="/ui/storage" { "Back to Storage" } }
    };
    Reply::ok(v.page(Nav::Storage, "Retention preview", body))
}
