//! An image's page: its manifest (layers with chunks and shared bytes, the config, an
//! index's children by platform), its referrers (signatures, SBOMs, attestations), tags and
//! pull commands.

use std::sync::Arc;

use ballast_engine::Digest;
use hyper::StatusCode;
use maud::{html, Markup};
use serde_json::Value;

use super::html::{self, Nav};
use super::{Reply, Visit};
use crate::auth::Action;
use crate::App;

/// Bytes of a config blob the page reads at most.
const CONFIG_BYTES_MAX: u64 = 4 << 20;

/// A manifest's JSON, from the manifest cache or the store (blocking).
pub fn manifest_json(app: &App, digest: &Digest) -> Option<Value> {
    if let Some(c) = app.manifests.get(digest) {
        return serde_json::from_slice(&c.bytes).ok();
    }
    let size = app.store.stat(digest).ok().flatten()?;
    if size > app.config.manifest_bytes_max as u64 {
        return None;
    }
    let bytes = bytes::Bytes::from(app.store.read_blob(digest).ok()?);
    let json = serde_json::from_slice(&bytes).ok();
    // Kept for the next page, and for pulls (manifests never change).
    app.manifests
        .put(digest.clone(), crate::CachedManifest::new(digest, bytes));
    json
}

/// What a table row tells of a manifest.
#[derive(Debug, Default)]
pub struct Summary {
    /// An index (or manifest list).
    pub index: bool,
    /// Its artifact type, if any.
    pub artifact_type: Option<String>,
    /// The platforms of an index's children (`linux/arm64/v8`).
    pub platforms: Vec<String>,
    /// The manifest and what it references (an index: with its children's), when readable.
    pub logical: Option<u64>,
}

impl Summary {
    /// "index", "image" or the artifact type.
    pub fn kind(&self, media_type: &str) -> String {
        if self.index {
            "index".into()
        } else if let Some(a) = &self.artifact_type {
            a.clone()
        } else if media_type.is_empty() {
            "—".into()
        } else {
            "image".into()
        }
    }
}

fn size_of(v: &Value) -> u64 {
    v["size"].as_u64().unwrap_or(0)
}

/// The platform of an index entry (`os/arch[/variant]`), none for attestation entries.
pub fn platform(entry: &Value) -> Option<String> {
    let p = &entry["platform"];
    let (os, arch) = (p["os"].as_str()?, p["architecture"].as_str()?);
    if os == "unknown" {
        return None;
    }
    Some(match p["variant"].as_str() {
        Some(var) => format!("{os}/{arch}/{var}"),
        None => format!("{os}/{arch}"),
    })
}

/// A manifest's summary (blocking: reads it and an index's children).
pub fn summary(app: &App, digest: &Digest) -> Summary {
    let Some(m) = manifest_json(app, digest) else {
        return Summary::default();
    };
    let own = app.store.stat(digest).ok().flatten().unwrap_or(0);
    let image_bytes = |m: &Value| {
        size_of(&m["config"])
            + m["layers"]
                .as_array()
                .map_or(0, |l| l.iter().map(size_of).sum())
    };
    let mut s = Summary {
        artifact_type: m["artifactType"]
            .as_str()
            .or_else(|| {
                m["config"]["mediaType"]
                    .as_str()
                    .filter(|t| !t.contains("image.config") && !t.contains("container.image"))
            })
            .map(str::to_owned),
        ..Summary::default()
    };
    if let Some(children) = m["manifests"].as_array() {
        s.index = true;
        s.artifact_type = None;
        let mut total = own;
        for c in children {
            s.platforms.extend(platform(c));
            total += size_of(c);
            if let Some(child) = c["digest"]
                .as_str()
                .and_then(|d| d.parse::<Digest>().ok())
                .and_then(|d| manifest_json(app, &d))
            {
                total += image_bytes(&child);
            }
        }
        s.logical = Some(total);
    } else {
        s.logical = Some(own + image_bytes(&m));
    }
    s
}

/// One layer row.
struct Layer {
    media_type: String,
    digest: String,
    size: u64,
    use_: Option<ballast_engine::ownership::BlobBytes>,
}

/// A referrer: digest, artifact type, media type, annotations.
type Referrer = (String, String, String, Vec<(String, String)>);

/// What the page shows, gathered off the async threads.
struct Gathered {
    media_type: String,
    size: u64,
    pushed_at: u64,
    pulls: (u64, u64),
    tags: Vec<String>,
    annotations: Vec<(String, String)>,
    manifest: Option<Value>,
    config: Option<Value>,
    layers: Vec<Layer>,
    children: Vec<(String, String, String, u64)>,
    referrers: Vec<Referrer>,
    unique: Option<u64>,
}

fn gather(
    app: &Arc<App>,
    repo: &str,
    digest: &Digest,
    fig: Option<&super::figures::Made>,
) -> Option<Gathered> {
    let (media_type, size, pushed_at, pulls, tags, annotations, referrers) = {
        let cat = app.store.catalog().read();
        let r = cat.repos.get(repo)?;
        let link = r.manifests.get(digest)?;
        let tags: Vec<String> = r
            .tags
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(t, _)| t.clone())
            .collect();
        let referrers = r
            .manifests
            .iter()
            .filter(|(_, m)| m.subject.as_ref() == Some(digest))
            .map(|(d, m)| {
                (
                    d.to_string(),
                    m.artifact_type.clone().unwrap_or_default(),
                    m.media_type.clone(),
                    m.annotations
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            })
            .collect();
        let p = r.pulls.get(digest);
        (
            link.media_type.clone(),
            link.size,
            link.pushed_at,
            (p.map_or(0, |p| p.count), p.map_or(0, |p| p.last)),
            tags,
            link.annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            referrers,
        )
    };
    let manifest = manifest_json(app, digest);
    let mut g = Gathered {
        media_type,
        size,
        pushed_at,
        pulls,
        tags,
        annotations,
        manifest: None,
        config: None,
        layers: Vec::new(),
        children: Vec::new(),
        referrers,
        unique: fig.and_then(|f| f.own.unique_bytes(repo, digest)),
    };
    if let Some(m) = &manifest {
        if let Some(children) = m["manifests"].as_array() {
            for c in children {
                g.children.push((
                    c["digest"].as_str().unwrap_or("").to_owned(),
                    platform(c).unwrap_or_else(|| {
                        c["annotations"]["vnd.docker.reference.type"]
                            .as_str()
                            .unwrap_or("—")
                            .to_owned()
                    }),
                    c["mediaType"].as_str().unwrap_or("").to_owned(),
                    size_of(c),
                ));
            }
        }
        if let Some(cd) = m["config"]["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
        {
            let json = m["config"]["mediaType"]
                .as_str()
                .is_some_and(|t| t.ends_with("json") || t.contains("image.config"));
            if json && size_of(&m["config"]) <= CONFIG_BYTES_MAX {
                g.config = app
                    .store
                    .read_blob(&cd)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            }
        }
        for l in m["layers"].as_array().into_iter().flatten() {
            let digest = l["digest"].as_str().unwrap_or("").to_owned();
            let use_ = match (fig, digest.parse::<Digest>()) {
                (Some(f), Ok(d)) => f.own.blob(&app.store, &d).ok(),
                _ => None,
            };
            g.layers.push(Layer {
                media_type: l["mediaType"].as_str().unwrap_or("").to_owned(),
                digest,
                size: size_of(l),
                use_,
            });
        }
    }
    g.manifest = manifest;
    Some(g)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn config_card(c: &Value) -> Markup {
    let cfg = &c["config"];
    let labels: Vec<(String, String)> = cfg["Labels"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let history = c["history"].as_array().cloned().unwrap_or_default();
    html! {
        h2 { "Config" }
        div.card #config {
            dl.kv {
                dt { "Platform" } dd { (c["os"].as_str().unwrap_or("—")) "/" (c["architecture"].as_str().unwrap_or("—")) }
                dt { "Created" } dd { (c["created"].as_str().unwrap_or("—")) }
                dt { "Entrypoint" } dd.mono { (strings(&cfg["Entrypoint"]).join(" ")) }
                dt { "Cmd" } dd.mono { (strings(&cfg["Cmd"]).join(" ")) }
                dt { "Working dir" } dd.mono { (cfg["WorkingDir"].as_str().unwrap_or("")) }
                dt { "User" } dd.mono { (cfg["User"].as_str().unwrap_or("")) }
                dt { "Env" } dd { @for e in strings(&cfg["Env"]) { div.mono { (e) } } }
                dt { "Labels" } dd #labels { @for (k, v) in &labels { div { span.mono { (k) } " = " span.mono { (v) } } } }
            }
            @if !history.is_empty() {
                h2 { "History" }
                table #history {
                    thead { tr { th { "Created" } th { "Created by" } th { "Layer" } } }
                    tbody { @for h in &history {
                        tr {
                            td { (h["created"].as_str().unwrap_or("")) }
                            td.mono { (h["created_by"].as_str().or(h["comment"].as_str()).unwrap_or("")) }
                            td { @if h["empty_layer"].as_bool() == Some(true) { span.muted { "empty" } } }
                        }
                    } }
                }
            }
        }
    }
}

/// `GET /ui/image?repo=…&digest=…`.
pub async fn show(v: &Visit<'_>) -> Reply {
    let (repo, d) = (v.q("repo").to_owned(), v.q("digest").to_owned());
    if !v.may(&repo, Action::Pull) {
        return v.no_repository(&repo);
    }
    let Ok(digest) = d.parse::<Digest>() else {
        return v.fail(
            StatusCode::BAD_REQUEST,
            "Not a digest",
            &format!("{d:?} is not a digest."),
        );
    };
    let figures = v
        .app
        .console
        .figures
        .get(v.app, std::time::Duration::from_secs(2))
        .await;
    let (app, r2, d2) = (v.app.clone(), repo.clone(), digest.clone());
    let Some(Some(g)) = v
        .blocking(move || gather(&app, &r2, &d2, figures.as_deref()))
        .await
    else {
        return v.fail(
            StatusCode::NOT_FOUND,
            "Manifest not found",
            &format!("{repo} has no manifest {digest}."),
        );
    };
    let may_delete = v.may(&repo, Action::Delete)
        && v.app.pull_through.refuse_writes(&repo).is_ok()
        && v.app.replica.is_none();
    let by_digest = format!("docker pull {}/{}@{}", v.host, repo, digest);
    let stored: u64 = g
        .layers
        .iter()
        .filter_map(|l| l.use_.map(|u| u.stored_bytes))
        .sum();
    let body = html! {
        p { a href=(html::repo_url(&repo)) { (repo) } }
        h1 { (digest.to_string()) }
        div.card {
            dl.kv {
                dt { "Media type" } dd { (g.media_type) }
                dt { "Manifest size" } dd { (html::bytes(g.size)) }
                dt { "Pushed" } dd { (html::time(g.pushed_at)) }
                dt { "Pulls" } dd { (g.pulls.0) @if g.pulls.1 > 0 { " (last " (html::time(g.pulls.1)) ")" } }
                dt { "Tags" } dd #image-tags { @for t in &g.tags { span.pill { (t) } } @if g.tags.is_empty() { span.muted { "untagged" } } }
                dt { "Unique bytes" } dd { (g.unique.map_or("…".to_owned(), html::bytes)) span.muted { " stored bytes only this image needs" } }
                @if !g.layers.is_empty() {
                    dt { "Stored layer bytes" } dd { (html::bytes(stored)) }
                }
            }
        }
        h2 { "Pull" }
        div.card #pull {
            (html::copy_field("pull-digest", &by_digest))
            @for (i, t) in g.tags.iter().enumerate() {
                (html::copy_field(&format!("pull-tag-{i}"), &format!("docker pull {}/{}:{}", v.host, repo, t)))
            }
            @if may_delete {
                @for t in &g.tags {
                    a.button.danger href=(html::url("/ui/tag/delete", &[("repo", &repo), ("tag", t)])) { "Delete tag " (t) }
                    " "
                }
            }
        }
        @if !g.annotations.is_empty() {
            h2 { "Annotations" }
            div.card #annotations { dl.kv { @for (k, val) in &g.annotations { dt.mono { (k) } dd { (val) } } } }
        }
        @if !g.children.is_empty() {
            h2 { "Platforms" }
            table #children {
                thead { tr { th { "Platform" } th { "Digest" } th { "Media type" } th.num { "Size" } } }
                tbody { @for (cd, p, mt, size) in &g.children {
                    tr {
                        td { (p) }
                        td.mono { a href=(html::image_url(&repo, cd)) { (html::short(cd)) } }
                        td { (mt) }
                        td.num { (html::bytes(*size)) }
                    }
                } }
            }
        }
        @if !g.layers.is_empty() {
            h2 { "Layers" }
            table #layers {
                thead { tr {
                    th { "#" } th { "Digest" } th { "Media type" } th.num { "Size" }
                    th.num { "Chunks" } th.num { "Stored" } th.num { "Shared" }
                } }
                tbody { @for (i, l) in g.layers.iter().enumerate() {
                    tr {
                        td { (i + 1) }
                        td.mono title=(l.digest) { (html::short(&l.digest)) }
                        td { (l.media_type) }
                        td.num { (html::bytes(l.size)) }
                        td.num { (l.use_.map_or("…".to_owned(), |u| u.chunks.to_string())) }
                        td.num { (l.use_.map_or("…".to_owned(), |u| html::bytes(u.stored_bytes))) }
                        td.num { (l.use_.map_or("…".to_owned(), |u| html::percent(u.shared_bytes, u.stored_bytes))) }
                    }
                } }
            }
            p.muted { "Stored: bytes of the layer's chunks as kept (compressed, each chunk once). Shared: the part of those another image needs too." }
        }
        @if let Some(c) = &g.config { (config_card(c)) }
        h2 { "Referrers" }
        @if g.referrers.is_empty() {
            p.muted #no-referrers { "No signatures, SBOMs or attestations refer to this manifest." }
        } @else {
            table #referrers {
                thead { tr { th { "Artifact type" } th { "Digest" } th { "Annotations" } } }
                tbody { @for (rd, at, mt, ann) in &g.referrers {
                    tr {
                        td { (if at.is_empty() { mt.as_str() } else { at.as_str() }) }
                        td.mono { a href=(html::image_url(&repo, rd)) { (html::short(rd)) } }
                        td { @for (k, val) in ann { div { span.mono { (k) } " = " (val) } } }
                    }
                } }
            }
        }
        @if g.manifest.is_none() {
            (html::message("note", "The manifest's bytes are not stored here yet (a pull-through cache fetches them on the first pull)."))
        }
    };
    Reply::ok(v.page(Nav::Repositories, &html::short(&digest.to_string()), body))
}
