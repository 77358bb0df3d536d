//! The Repositories page (search, sort, pages, namespaces and their quotas) and a
//! repository's page (its tags, with pull commands and deletion).

use std::collections::BTreeMap;

use ballast_engine::ownership::namespace_of;
use ballast_engine::Digest;
use hyper::{Method, StatusCode};
use maud::html;

use super::html::{self, Nav, PAGE_ROWS};
use super::image::{summary, Summary};
use super::{Reply, Visit};
use crate::auth::Action;

/// One row of the repositories list.
struct RepoRow {
    name: String,
    tags: usize,
    manifests: usize,
    last_push: u64,
    bytes: Option<u64>,
}

/// How long a page waits for the first byte figures of a freshly started server.
const FIGURES_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

/// `GET /ui/`: the repositories the viewer may pull.
pub async fn list(v: &Visit<'_>) -> Reply {
    let (q, ns, sort) = (
        v.q("q").to_owned(),
        v.q("ns").to_owned(),
        v.q("sort").to_owned(),
    );
    let figures = v.app.console.figures.get(v.app, FIGURES_WAIT).await;
    let (app, access) = (v.app.clone(), v.access());
    let fig = figures.clone();
    let (q2, ns2, sort2) = (q.clone(), ns.clone(), sort.clone());
    let Some((rows, namespaces)) = v
        .blocking(move || {
            let cat = app.store.catalog().read();
            let mut namespaces: BTreeMap<String, usize> = BTreeMap::new();
            let mut rows = Vec::new();
            for (name, r) in &cat.repos {
                if !access.may_see(&app.auth, name) {
                    continue;
                }
                *namespaces.entry(namespace_of(name).to_owned()).or_default() += 1;
                if (!q2.is_empty() && !name.contains(q2.as_str()))
                    || (!ns2.is_empty() && namespace_of(name) != ns2)
                {
                    continue;
                }
                let last_push = r
                    .manifests
                    .values()
                    .map(|m| m.pushed_at)
                    .chain(r.tag_set_at.values().copied())
                    .max()
                    .unwrap_or(0);
                rows.push(RepoRow {
                    name: name.clone(),
                    tags: r.tags.len(),
                    manifests: r.manifests.len(),
                    last_push,
                    bytes: fig
                        .as_ref()
                        .and_then(|f| f.own.repositories.get(name).copied()),
                });
            }
            drop(cat);
            match sort2.as_str() {
                "push" => rows.sort_by_key(|r| std::cmp::Reverse(r.last_push)),
                "size" => rows.sort_by_key(|r| std::cmp::Reverse(r.bytes)),
                _ => {}
            }
            (rows, namespaces)
        })
        .await
    else {
        return v.fail(StatusCode::INTERNAL_SERVER_ERROR, "Error", "listing failed");
    };
    let quotas = if v.app.quotas.is_empty() {
        Vec::new()
    } else {
        let quotas = v.app.quotas.clone();
        v.blocking(move || quotas.report(false).unwrap_or_default())
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|u| {
                u.namespaces
                    .iter()
                    .any(|g| namespaces.contains_key(namespace_of(g)))
            })
            .collect()
    };
    let pages = html::pages(rows.len());
    let page = v.page_no().min(pages);
    let shown = rows.iter().skip((page - 1) * PAGE_ROWS).take(PAGE_ROWS);
    let params = [
        ("q", q.as_str()),
        ("ns", ns.as_str()),
        ("sort", sort.as_str()),
    ];
    let sort_link = |key: &str, text: &str| {
        let href = html::url("/ui/", &[("q", &q), ("ns", &ns), ("sort", key)]);
        html! { a href=(href) { (text) } }
    };
    let body = html! {
        h1 { "Repositories" }
        div.layout {
            aside.side {
                div.card {
                    strong { "Namespaces" }
                    a href=(html::url("/ui/", &[("q", &q), ("sort", &sort)])) {
                        span { "all" } span.muted { (namespaces.values().sum::<usize>()) }
                    }
                    @for (n, count) in &namespaces {
                        a href=(html::url("/ui/", &[("q", &q), ("ns", n), ("sort", &sort)]))
                            class=[(ns == *n).then_some("here")] {
                            span { (n) } span.muted { (count) }
                        }
                    }
                }
                @if !quotas.is_empty() {
                    div.card {
                        strong { "Quotas" }
                        @for u in &quotas {
                            div {
                                div.mono { (u.namespaces.join(", ")) }
                                @if let Some(max) = u.bytes_max {
                                    div class={"bar" @if u.warning { " warn" }} {
                                        span style=(format!("width:{:.0}%", (u.bytes as f64 * 100.0 / max.max(1) as f64).min(100.0))) {}
                                    }
                                    div.muted { (html::bytes(u.bytes)) " of " (html::bytes(max)) }
                                } @else {
                                    div.muted { (html::bytes(u.bytes)) " (no byte limit)" }
                                }
                            }
                        }
                    }
                }
            }
            section {
                form.filters method="get" action="/ui/" {
                    label { "Search" input #search type="search" name="q" value=(q) placeholder="name contains…"; }
                    @if !ns.is_empty() { input type="hidden" name="ns" value=(ns); }
                    input type="hidden" name="sort" value=(sort);
                    button type="submit" { "Search" }
                }
                @if rows.is_empty() {
                    (html::message("note", "No repositories to show (none match, or none you may pull)."))
                } @else {
                    table #repositories {
                        thead { tr {
                            th { (sort_link("name", "Repository")) }
                            th.num { "Tags" }
                            th.num { "Manifests" }
                            th { (sort_link("push", "Last push")) }
                            th.num { (sort_link("size", "Size")) }
                        } }
                        tbody {
                            @for r in shown {
                                tr {
                                    td { a href=(html::repo_url(&r.name)) { (r.name) } }
                                    td.num { (r.tags) }
                                    td.num { (r.manifests) }
                                    td { (html::time(r.last_push)) }
                                    td.num { (r.bytes.map_or("…".to_owned(), html::bytes)) }
                                }
                            }
                        }
                    }
                    (html::pager("/ui/", &params, page, pages))
                    p.muted {
                        (rows.len()) " repositories. Size: what the repository links (each blob in full). "
                        @if let Some(f) = &figures { "Figures of " (html::time(f.at)) "." }
                    }
                }
            }
        }
    };
    Reply::ok(v.page(Nav::Repositories, "Repositories", body))
}

/// One row of a repository's tags.
struct TagRow {
    tag: String,
    digest: Digest,
    set_at: u64,
    media_type: String,
    last_pull: u64,
    pulls: u64,
    summary: Summary,
    unique: Option<u64>,
}

/// `GET /ui/repo?name=…`: a repository's tags.
pub async fn repository(v: &Visit<'_>) -> Reply {
    let name = v.q("name").to_owned();
    if !v.may(&name, Action::Pull) {
        return v.no_repository(&name);
    }
    let (q, sort) = (v.q("q").to_owned(), v.q("sort").to_owned());
    let figures = v.app.console.figures.get(v.app, FIGURES_WAIT).await;
    let page_asked = v.page_no();
    let (app, n, q2, sort2) = (v.app.clone(), name.clone(), q.clone(), sort.clone());
    let fig = figures.clone();
    let found = v
        .blocking(move || {
            let cat = app.store.catalog().read();
            let r = cat.repos.get(&n)?;
            let mut tags: Vec<(&String, &Digest, u64)> = r
                .tags
                .iter()
                .filter(|(t, _)| q2.is_empty() || t.contains(q2.as_str()))
                .map(|(t, d)| (t, d, r.tag_set_at.get(t).copied().unwrap_or(0)))
                .collect();
            if sort2 != "name" {
                tags.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
            }
            let total = tags.len();
            let pages = html::pages(total);
            let page = page_asked.min(pages);
            let rows: Vec<(String, Digest, u64, String, u64, u64)> = tags
                .into_iter()
                .skip((page - 1) * PAGE_ROWS)
                .take(PAGE_ROWS)
                .map(|(t, d, at)| {
                    let m = r.manifests.get(d);
                    let p = r.pulls.get(d);
                    (
                        t.clone(),
                        d.clone(),
                        at,
                        m.map_or(String::new(), |m| m.media_type.clone()),
                        p.map_or(0, |p| p.last),
                        p.map_or(0, |p| p.count),
                    )
                })
                .collect();
            let untagged = r.manifests.len();
            drop(cat);
            let rows: Vec<TagRow> = rows
                .into_iter()
                .map(
                    |(tag, digest, set_at, media_type, last_pull, pulls)| TagRow {
                        summary: summary(&app, &digest),
                        unique: fig.as_ref().and_then(|f| f.own.unique_bytes(&n, &digest)),
                        tag,
                        digest,
                        set_at,
                        media_type,
                        last_pull,
                        pulls,
                    },
                )
                .collect();
            Some((rows, total, page, pages, untagged))
        })
        .await
        .flatten();
    let Some((rows, total, page, pages, manifests)) = found else {
        return v.no_repository(&name);
    };
    let may_delete = v.may(&name, Action::Delete)
        && v.app.pull_through.refuse_writes(&name).is_ok()
        && v.app.replica.is_none();
    let params = [
        ("name", name.as_str()),
        ("q", q.as_str()),
        ("sort", sort.as_str()),
    ];
    let body = html! {
        h1 { (name) }
        p.muted { (total) " tags, " (manifests) " manifests. "
            @if v.app.pull_through.refuse_writes(&name).is_err() { "A pull-through cache (read-only). " }
        }
        form.filters method="get" action="/ui/repo" {
            input type="hidden" name="name" value=(name);
            label { "Tag" input #tag-search type="search" name="q" value=(q) placeholder="tag contains…"; }
            label { "Order"
                select name="sort" {
                    option value="recent" selected[sort != "name"] { "Most recently set" }
                    option value="name" selected[sort == "name"] { "Name" }
                }
            }
            button type="submit" { "Show" }
        }
        @if rows.is_empty() {
            (html::message("note", "No tags to show."))
        } @else {
            table #tags {
                thead { tr {
                    th { "Tag" } th { "Digest" } th { "Kind" } th { "Set" } th { "Last pull" }
                    th.num { "Size" } th.num { "Unique" } th { "Pull" }
                    @if may_delete { th {} }
                } }
                tbody {
                    @for r in &rows {
                        tr data-tag=(r.tag) {
                            td { a href=(html::image_url(&name, &r.digest.to_string())) { (r.tag) } }
                            td.mono title=(r.digest.to_string()) { (html::short(&r.digest.to_string())) }
                            td {
                                (r.summary.kind(&r.media_type))
                                @for p in &r.summary.platforms { span.pill { (p) } }
                            }
                            td { (html::time(r.set_at)) }
                            td { (html::time(r.last_pull)) @if r.pulls > 0 { span.muted { " (" (r.pulls) ")" } } }
                            td.num { (r.summary.logical.map_or("—".to_owned(), html::bytes)) }
                            td.num { (r.unique.map_or("…".to_owned(), html::bytes)) }
                            td { button type="button" data-copy=(format!("docker pull {}/{}:{}", v.host, name, r.tag)) { "Copy pull" } }
                            @if may_delete {
                                td { a.button.danger href=(html::url("/ui/tag/delete", &[("repo", &name), ("tag", &r.tag)])) { "Delete" } }
                            }
                        }
                    }
                }
            }
            (html::pager("/ui/repo", &params, page, pages))
        }
        p.muted { "Size: the manifest and what it references (an index: with its children). Unique: stored bytes only this image needs (what deleting it alone would free)." }
    };
    Reply::ok(v.page(Nav::Repositories, &name, body))
}

/// `GET /ui/tag/delete?repo=…&tag=…`: asks to confirm.
pub async fn confirm_delete(v: &Visit<'_>) -> Reply {
    let (repo, tag) = (v.q("repo").to_owned(), v.q("tag").to_owned());
    if !v.may(&repo, Action::Pull) {
        return v.no_repository(&repo);
    }
    let target = {
        let cat = v.app.store.catalog().read();
        cat.repos.get(&repo).and_then(|r| r.tags.get(&tag)).cloned()
    };
    let Some(digest) = target else {
        return v.fail(
            StatusCode::NOT_FOUND,
            "Tag not found",
            &format!("{repo} has no tag {tag:?}."),
        );
    };
    let body = html! {
        h1 { "Delete tag " (tag) " of " (repo) "?" }
        div.card {
            p { "The tag points at " code { (digest.to_string()) } ". Deleting the tag leaves the manifest in place (a collection with delete_untagged removes untagged manifests)." }
            form method="post" action="/ui/tag/delete" {
                (html::csrf_field(&v.session.csrf))
                input type="hidden" name="repo" value=(repo);
                input type="hidden" name="tag" value=(tag);
                button.danger #confirm-delete type="submit" { "Delete the tag" }
                " "
                a href=(html::repo_url(&repo)) { "Cancel" }
            }
        }
    };
    Reply::ok(v.page(Nav::Repositories, "Delete tag", body))
}

/// `POST /ui/tag/delete`: `DELETE /v2/<repo>/manifests/<tag>` on the viewer's behalf.
pub async fn delete(v: &Visit<'_>) -> Reply {
    let (repo, tag) = (v.f("repo").to_owned(), v.f("tag").to_owned());
    if repo.is_empty() || tag.is_empty() || tag.contains(['/', '?', '#', ':', '@']) {
        return v.fail(
            StatusCode::BAD_REQUEST,
            "Not deleted",
            "Name a repository and a tag.",
        );
    }
    let answer = v
        .api(Method::DELETE, &format!("/v2/{repo}/manifests/{tag}"))
        .await;
    if !answer.ok() {
        return v.fail(answer.status, "Not deleted", &answer.error());
    }
    let body = html! {
        h1 { "Tag deleted" }
        (html::message("ok", &format!("Deleted tag {tag} of {repo}.")))
        p { a #back href=(html::repo_url(&repo)) { "Back to " (repo) } }
    };
    Reply::ok(v.page(Nav::Repositories, "Tag deleted", body))
}
