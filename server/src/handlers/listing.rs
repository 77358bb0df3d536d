//! Listings: `GET /v2/_catalog`, `GET /v2/<name>/tags/list`, `GET /v2/<name>/referrers/<digest>`.

use crate::body::ReqBody;
use hyper::header::{CONTENT_TYPE, LINK};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use ballast_engine::catalog::ManifestLink;
use ballast_engine::Digest;

use super::{blocking, check_name, first, page_size, parse_digest, query, reply};
use crate::body::ResBody;
use crate::error::ApiError;
use crate::App;

/// Largest page served, whatever `n` asks.
const PAGE_MAX: usize = 10_000;

/// One page of a sorted list: items after `last`, at most `n`, and whether more follow.
fn page<'a>(
    items: impl Iterator<Item = &'a String>,
    last: Option<&str>,
    n: Option<usize>,
) -> (Vec<String>, bool) {
    let n = n.unwrap_or(PAGE_MAX).min(PAGE_MAX);
    let mut out = Vec::new();
    let mut more = false;
    for item in items.filter(|i| last.is_none_or(|l| i.as_str() > l)) {
        if out.len() == n {
            more = true;
            break;
        }
        out.push(item.clone());
    }
    (out, more)
}

fn next_link(path: &str, n: Option<usize>, items: &[String]) -> Option<String> {
    let last = items.last()?;
    let n = n.map(|n| format!("n={n}&")).unwrap_or_default();
    Some(format!("<{path}?{n}last={last}>; rel=\"next\""))
}

pub fn catalog(
    app: &App,
    access: &crate::auth::Access,
    req: &Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    let q = query(req);
    let n = page_size(&q)?;
    let (repos, more) = {
        let state = app.store.catalog().read();
        // Only what the caller may pull is listed (everything with authentication off).
        let visible = state
            .repos
            .keys()
            .filter(|name| access.may_see(&app.auth, name));
        page(visible, first(&q, "last"), n)
    };
    let mut r = reply(StatusCode::OK);
    if more {
        if let Some(link) = next_link("/v2/_catalog", n, &repos) {
            r = r.header(LINK, link);
        }
    }
    Ok(r.json(&json!({ "repositories": repos })))
}

pub fn tags(app: &App, name: &str, req: &Request<ReqBody>) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let q = query(req);
    let n = page_size(&q)?;
    let (tags, more) = {
        let state = app.store.catalog().read();
        let repo = state
            .repos
            .get(name)
            .ok_or_else(|| ApiError::NameUnknown(format!("repository {name} is not known")))?;
        page(repo.tags.keys(), first(&q, "last"), n)
    };
    let mut r = reply(StatusCode::OK);
    if more {
        if let Some(link) = next_link(&format!("/v2/{name}/tags/list"), n, &tags) {
            r = r.header(LINK, link);
        }
    }
    Ok(r.json(&json!({ "name": name, "tags": tags })))
}

/// Image manifest media types, whose config's media type stands in for a missing
/// `artifactType`.
const IMAGE_MANIFESTS: [&str; 2] = [
    super::manifests::OCI_MANIFEST,
    super::manifests::DOCKER_MANIFEST,
];

pub async fn referrers(
    app: &App,
    name: &str,
    digest: &str,
    req: &Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let subject = parse_digest(digest)?;
    let q = query(req);
    let filter = first(&q, "artifactType").filter(|s| !s.is_empty());
    let n = page_size(&q)?;
    // (digest, link) of every referrer, with the artifact type recorded at push.
    let mut links: Vec<(Digest, ManifestLink)> = {
        let state = app.store.catalog().read();
        state.repos.get(name).map_or_else(Vec::new, |repo| {
            repo.manifests
                .iter()
                .filter(|(_, link)| link.subject.as_ref() == Some(&subject))
                .map(|(d, link)| (d.clone(), link.clone()))
                .collect()
        })
    };
    // Image manifests pushed before the artifact type was recorded for image configs: read
    // the config's media type from the manifest (few, small, and usually cached).
    let missing: Vec<Digest> = links
        .iter()
        .filter(|(_, l)| {
            l.artifact_type.is_none() && IMAGE_MANIFESTS.contains(&l.media_type.as_str())
        })
        .map(|(d, _)| d.clone())
        .collect();
    if !missing.is_empty() {
        let store = app.store.clone();
        let found = blocking(move || {
            Ok(missing
                .into_iter()
                .filter_map(|d| {
                    let bytes = store.read_blob(&d).ok()?;
                    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                    let t = v["config"]["mediaType"].as_str()?.to_owned();
                    Some((d, t))
                })
                .collect::<Vec<_>>())
        })
        .await?;
        for (d, t) in found {
            if let Some((_, l)) = links.iter_mut().find(|(x, _)| *x == d) {
                l.artifact_type = Some(t);
            }
        }
    }
    let mut found: Vec<(String, serde_json::Value)> = Vec::new();
    for (d, link) in links {
        if filter.is_some_and(|f| link.artifact_type.as_deref() != Some(f)) {
            continue;
        }
        let mut desc =
            json!({ "mediaType": link.media_type, "digest": d.to_string(), "size": link.size });
        if let Some(t) = &link.artifact_type {
            desc["artifactType"] = json!(t);
        }
        if !link.annotations.is_empty() {
            desc["annotations"] = json!(link.annotations);
        }
        found.push((d.to_string(), desc));
    }
    let keys: Vec<String> = found.iter().map(|(k, _)| k.clone()).collect();
    let (page_keys, more) = page(keys.iter(), first(&q, "last"), n);
    let manifests: Vec<_> = found
        .into_iter()
        .filter(|(k, _)| page_keys.contains(k))
        .map(|(_, v)| v)
        .collect();
    let mut r =
        reply(StatusCode::OK).header(CONTENT_TYPE, "application/vnd.oci.image.index.v1+json");
    if filter.is_some() {
        r = r.header("OCI-Filters-Applied", "artifactType");
    }
    if more {
        if let Some(link) = next_link(&format!("/v2/{name}/referrers/{subject}"), n, &page_keys) {
            r = r.header(LINK, link);
        }
    }
    let body = json!({ "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests });
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    Ok(
        r.header(hyper::header::CONTENT_LENGTH, bytes.len().to_string())
            .body(crate::body::full(bytes)),
    )
}
