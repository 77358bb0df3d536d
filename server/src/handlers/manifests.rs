//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use std::collections::BTreeMap;

use crate::body::ReqBody;
use ballast_engine::catalog::{ManifestLink, Op, State};
use ballast_engine::{names, Algorithm, Digest, Error as EngineError};
use bytes::Bytes;
use hyper::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, ETAG, LOCATION};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;

use super::{blocking, check_name, query, reply};
use crate::body::{full, read_limited, ResBody};
use crate::error::ApiError;
use crate::{now_secs, App, CachedManifest};

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Index,
}

fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        _ => None,
    }
}

enum Reference {
    Tag(String),
    Digest(Digest),
}

/// Parses a reference to push to: a tag that is not valid is refused as `MANIFEST_INVALID`.
fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    if reference.contains(':') {
        reference
            .parse()
            .map(Reference::Digest)
            .map_err(|e: EngineError| ApiError::DigestInvalid(e.to_string()))
    } else {
        names::validate_tag(reference).map_err(|e| ApiError::ManifestInvalid(e.to_string()))?;
        Ok(Reference::Tag(reference.to_owned()))
    }
}

/// Parses a reference to read or delete: a tag that cannot exist names no manifest, so it is
/// `MANIFEST_UNKNOWN` (404), as Distribution answers and clients probing names expect.
fn parse_existing_reference(reference: &str) -> Result<Reference, ApiError> {
    parse_reference(reference).map_err(|e| match e {
        ApiError::ManifestInvalid(why) => ApiError::ManifestUnknown(format!(
            "no manifest can have the reference {reference:?}: {why}"
        )),
        other => other,
    })
}

/// What a manifest says about itself and what it references.
#[derive(Debug)]
struct Analyzed {
    media_type: String,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
    subject: Option<Digest>,
    artifact_type: Option<String>,
    annotations: BTreeMap<String, String>,
}

fn descriptor(v: &Value, what: &str) -> Result<(Digest, Option<String>, bool), ApiError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::ManifestInvalid(format!("{what} is not a descriptor object")))?;
    let digest = obj
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::ManifestInvalid(format!("{what} has no digest")))?
        .parse::<Digest>()
        .map_err(|e| ApiError::ManifestInvalid(format!("{what}: {e}")))?;
    if obj.get("size").is_none_or(|s| s.as_u64().is_none()) {
        return Err(ApiError::ManifestInvalid(format!(
            "{what} has no valid size"
        )));
    }
    let media_type = obj
        .get("mediaType")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // Foreign layers live elsewhere; the registry does not need to hold them.
    let foreign = obj
        .get("urls")
        .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
        || media_type
            .as_deref()
            .is_some_and(|m| m.contains(".foreign."));
    Ok((digest, media_type, foreign))
}

/// What a catalog needs to name a stored manifest: its link (media type, references, ...),
/// the blobs it references and the manifests an index lists. For `ballast tag` and the
/// pull-through cache (`content_type`: what it was served with, if known).
pub fn link_of(
    bytes: &[u8],
    content_type: Option<&str>,
    pushed_at: u64,
) -> Result<(ManifestLink, Vec<Digest>, Vec<Digest>), ApiError> {
    let a = analyze(bytes, content_type)?;
    let link = ManifestLink {
        media_type: a.media_type,
        size: bytes.len() as u64,
        artifact_type: a.artifact_type,
        annotations: a.annotations,
        subject: a.subject,
        references: a.blobs.iter().chain(&a.children).cloned().collect(),
        pushed_at,
        origin: None,
    };
    Ok((link, a.blobs, a.children))
}

/// The catalog ops that put a manifest in a repository and point tags at it (now).
pub(crate) fn put_ops(repo: &str, digest: &Digest, link: ManifestLink, tags: &[String]) -> Vec<Op> {
    let mut ops = vec![Op::PutManifest {
        repo: repo.to_owned(),
        digest: digest.clone(),
        link,
    }];
    ops.extend(tags.iter().map(|tag| Op::Tag {
        repo: repo.to_owned(),
        tag: tag.clone(),
        digest: digest.clone(),
        at: now_secs(),
    }));
    ops
}

/// Validates a manifest as a push would (JSON, schema, media type): its media type, or the
/// error a client gets. For the fuzz target and tests.
pub fn validate(bytes: &[u8], content_type: Option<&str>) -> Result<String, ApiError> {
    analyze(bytes, content_type).map(|a| a.media_type)
}

fn analyze(bytes: &[u8], content_type: Option<&str>) -> Result<Analyzed, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::ManifestInvalid(format!("not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::ManifestInvalid("a manifest is a JSON object".into()))?;
    match obj.get("schemaVersion").and_then(Value::as_u64) {
        Some(2) => {}
        Some(1) => {
            return Err(ApiError::ManifestInvalid(
                "Docker schema 1 manifests are not supported; push with schema 2 or OCI".into(),
            ))
        }
        _ => return Err(ApiError::ManifestInvalid("schemaVersion must be 2".into())),
    }
    let content_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| kind_of(c).is_some());
    let body_type = obj.get("mediaType").and_then(Value::as_str);
    let media_type = match (body_type, content_type) {
        (Some(b), Some(c)) if b != c => {
            return Err(ApiError::ManifestInvalid(format!(
                "mediaType {b} differs from Content-Type {c}"
            )));
        }
        (Some(b), _) => b.to_owned(),
        (None, Some(c)) => c.to_owned(),
        (None, None) if obj.contains_key("manifests") => OCI_INDEX.to_owned(),
        (None, None) if obj.contains_key("config") => OCI_MANIFEST.to_owned(),
        (None, None) => {
            return Err(ApiError::ManifestInvalid(
                "cannot tell the manifest's media type".into(),
            ))
        }
    };
    let kind = kind_of(&media_type).ok_or_else(|| {
        ApiError::ManifestInvalid(format!("unsupported manifest media type {media_type}"))
    })?;
    let mut out = Analyzed {
        media_type,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: None,
        artifact_type: obj
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_owned),
        annotations: BTreeMap::new(),
    };
    match kind {
        Kind::Image => {
            let config = obj
                .get("config")
                .ok_or_else(|| ApiError::ManifestInvalid("image manifest without config".into()))?;
            let (digest, config_type, _) = descriptor(config, "config")?;
            out.blobs.push(digest);
            // Spec: an image manifest without `artifactType` is listed among referrers with
            // its config's media type, whatever that type is (image configs included).
            if out.artifact_type.is_none() {
                out.artifact_type = config_type;
            }
            let layers = obj.get("layers").and_then(Value::as_array).ok_or_else(|| {
                ApiError::ManifestInvalid("image manifest without a layers array".into())
            })?;
            for (i, l) in layers.iter().enumerate() {
                let (digest, _, foreign) = descriptor(l, &format!("layers[{i}]"))?;
                if !foreign {
                    out.blobs.push(digest);
                }
            }
        }
        Kind::Index => {
            let manifests = obj
                .get("manifests")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    ApiError::ManifestInvalid("index without a manifests array".into())
                })?;
            for (i, m) in manifests.iter().enumerate() {
                out.children
                    .push(descriptor(m, &format!("manifests[{i}]"))?.0);
            }
        }
    }
    if let Some(s) = obj.get("subject") {
        out.subject = Some(descriptor(s, "subject")?.0);
    }
    if let Some(a) = obj.get("annotations") {
        let a = a
            .as_object()
            .ok_or_else(|| ApiError::ManifestInvalid("annotations must be an object".into()))?;
        for (k, v) in a {
            let v = v.as_str().ok_or_else(|| {
                ApiError::ManifestInvalid(format!("annotation {k} is not a string"))
            })?;
            out.annotations.insert(k.clone(), v.to_owned());
        }
    }
    Ok(out)
}

/// Resolves a reference to a manifest digest and its link.
fn resolve<'s>(
    state: &'s State,
    name: &str,
    reference: &Reference,
) -> Result<(Digest, &'s ManifestLink), ApiError> {
    let repo = state
        .repos
        .get(name)
        .ok_or_else(|| ApiError::NameUnknown(format!("repository {name} is not known")))?;
    let digest = match reference {
        Reference::Tag(t) => repo
            .tags
            .get(t)
            .ok_or_else(|| ApiError::ManifestUnknown(format!("tag {t} is not in {name}")))?,
        Reference::Digest(d) => d,
    };
    let link = repo
        .manifests
        .get(digest)
        .ok_or_else(|| ApiError::ManifestUnknown(format!("manifest {digest} is not in {name}")))?;
    Ok((digest.clone(), link))
}

pub async fn get(
    app: &App,
    name: &str,
    reference: &str,
    head: bool,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let parsed = parse_existing_reference(reference)?;
    if let Some(up) = app.pull_through.upstream_for(name) {
        crate::upstream::fill_manifest(app, up, name, reference).await?;
    }
    let reference = parsed;
    let (digest, media_type, size) = {
        let state = app.store.catalog().read();
        let (digest, link) = resolve(&state, name, &reference).map_err(|e| match e {
            ApiError::NameUnknown(m) => ApiError::ManifestUnknown(m),
            other => other,
        })?;
        (digest, link.media_type.clone(), link.size)
    };
    let cached = match app.manifests.get(&digest) {
        Some(c) => c,
        None => {
            let (store, d) = (app.store.clone(), digest.clone());
            let bytes =
                blocking(move || store.read_blob(&d).map_err(ApiError::from_engine)).await?;
            let c = CachedManifest::new(&digest, Bytes::from(bytes));
            app.manifests.put(digest, c.clone());
            c
        }
    };
    let r = reply(StatusCode::OK)
        .header(CONTENT_TYPE, media_type.as_str())
        .header(DOCKER_CONTENT_DIGEST, cached.digest)
        .header(ETAG, cached.etag)
        .header(CONTENT_LENGTH, size);
    if head {
        return Ok(r.body(crate::body::empty()));
    }
    Ok(r.body(full(cached.bytes)))
}

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

pub async fn put(
    app: &App,
    name: &str,
    reference: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let reference = parse_reference(reference)?;
    super::check_room(app).await?;
    let q = query(&req);
    let mut tags: Vec<String> = Vec::new();
    if let Reference::Tag(t) = &reference {
        tags.push(t.clone());
    }
    for t in q.get("tag").into_iter().flatten() {
        names::validate_tag(t).map_err(|e| ApiError::ManifestInvalid(e.to_string()))?;
        if !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let max = app.config.manifest_bytes_max;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = req.into_body();
    if let Some(n) = declared.filter(|&n| n > max as u64) {
        // Refused without keeping any of it. A body at most twice the limit is read and
        // dropped first, so a client still sending it reads the 413 rather than a reset
        // connection; a larger one is refused before any of it is read.
        if n <= 2 * max as u64 {
            let mut pace = app.body_pace();
            while crate::body::next_data(&mut body, &mut pace)
                .await?
                .is_some()
            {}
        }
        return Err(ApiError::ManifestTooLarge(format!(
            "manifests are limited to {max} bytes; this one declares {n} bytes"
        )));
    }
    let bytes: Bytes = read_limited(&mut body, max, app.body_pace())
        .await?
        .ok_or_else(|| {
            ApiError::ManifestTooLarge(format!("manifests are limited to {max} bytes"))
        })?;
    let analyzed = analyze(&bytes, content_type.as_deref())?;
    let algorithm = match &reference {
        Reference::Digest(d) => d.algorithm(),
        Reference::Tag(_) => Algorithm::Sha256,
    };
    let digest = Digest::of(algorithm, &bytes);
    if let Reference::Digest(d) = &reference {
        if *d != digest {
            return Err(ApiError::DigestInvalid(format!(
                "manifest digest is {digest}, not {d}"
            )));
        }
    }
    let store = app.store.clone();
    let (d, b) = (digest.clone(), bytes.clone());
    blocking(move || {
        store
            .put_blob(&b, Some(&d))
            .map(|_| ())
            .map_err(ApiError::from_engine)
    })
    .await?;

    let link = ManifestLink {
        media_type: analyzed.media_type.clone(),
        size: bytes.len() as u64,
        artifact_type: analyzed.artifact_type.clone(),
        annotations: analyzed.annotations.clone(),
        subject: analyzed.subject.clone(),
        references: analyzed
            .blobs
            .iter()
            .chain(&analyzed.children)
            .cloned()
            .collect(),
        pushed_at: now_secs(),
        origin: None,
    };
    let (store, immutable, quotas) = (app.store.clone(), app.immutable(), app.quotas.clone());
    let (repo, d, t) = (name.to_owned(), digest.clone(), tags.clone());
    blocking(move || {
        // Through the store: the manifest blob is pinned against a running collection.
        store.commit_catalog(|state| {
            for tag in &t {
                immutable.check_tag(state, &repo, tag, &d)?;
            }
            quotas.check_put(state, &repo, &d, &link, &t)?;
            // Checked under the commit lock, so a concurrent delete cannot slip in between.
            let r = state.repos.get(&repo);
            let has_blob = |x: &Digest| {
                r.is_some_and(|r| r.blobs.contains_key(x) || r.manifests.contains_key(x))
            };
            if let Some(missing) = analyzed.blobs.iter().find(|x| !has_blob(x)) {
                return Err(ApiError::ManifestBlobUnknown(format!(
                    "blob {missing} is not in repository {repo}; push it first"
                )));
            }
            let has_manifest = |x: &Digest| r.is_some_and(|r| r.manifests.contains_key(x));
            if let Some(missing) = analyzed.children.iter().find(|x| !has_manifest(x)) {
                return Err(ApiError::ManifestUnknown(format!(
                    "manifest {missing} is not in repository {repo}; push it first"
                )));
            }
            Ok((put_ops(&repo, &d, link, &t), ()))
        })
    })
    .await?;
    wait_for_bucket(app).await?;

    let mut r = reply(StatusCode::CREATED)
        .header(LOCATION, format!("/v2/{name}/manifests/{digest}"))
        .header("Docker-Content-Digest", digest.to_string());
    if let Some(s) = &analyzed.subject {
        r = r.header("OCI-Subject", s.to_string());
    }
    if !q.get("tag").is_none_or(Vec::is_empty) {
        r = r.header("OCI-Tag", tags.join(","));
    }
    Ok(r.empty())
}

/// With `acknowledge = "bucket"`, waits until the bucket holds what was just committed.
async fn wait_for_bucket(app: &App) -> Result<(), ApiError> {
    let (Some(shipper), Some(cfg)) = (&app.bucket, &app.config.bucket) else {
        return Ok(());
    };
    if cfg.acknowledge != ballast_bucket::Acknowledge::Bucket {
        return Ok(());
    }
    let position = app.store.catalog().durable_position();
    let timeout = std::time::Duration::from_secs(cfg.acknowledge_timeout_secs);
    shipper.wait_shipped(position, timeout).await.map_err(|e| {
        ApiError::Unavailable(format!(
            "the manifest is stored here but {e} (acknowledge = \"bucket\"): push it again \
                 to wait again; GET /admin/bucket says why"
        ))
    })
}

pub async fn delete(app: &App, name: &str, reference: &str) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let reference = parse_existing_reference(reference)?;
    let (store, immutable) = (app.store.clone(), app.immutable());
    let repo = name.to_owned();
    blocking(move || {
        store.commit_catalog(|state| {
            let (digest, _) = resolve(state, &repo, &reference).map_err(|e| match e {
                ApiError::NameUnknown(m) => ApiError::ManifestUnknown(m),
                other => other,
            })?;
            let op = match &reference {
                Reference::Tag(t) => {
                    immutable.check_untag(state, &repo, t)?;
                    Op::Untag {
                        repo: repo.clone(),
                        tag: t.clone(),
                    }
                }
                Reference::Digest(_) => {
                    immutable.check_delete_manifest(state, &repo, &digest)?;
                    Op::DeleteManifest {
                        repo: repo.clone(),
                        digest,
                    }
                }
            };
            Ok((vec![op], ()))
        })
    })
    .await?;
    Ok(reply(StatusCode::ACCEPTED).empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn infers_media_types() {
        let m = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/x","digest":"{D}","size":0}},"layers":[]}}"#
        );
        let a = analyze(m.as_bytes(), None).expect("manifest");
        assert_eq!(a.media_type, OCI_MANIFEST);
        assert_eq!(a.artifact_type.as_deref(), Some("application/x"));
        let i = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{D}","size":1}}]}}"#);
        assert_eq!(
            analyze(i.as_bytes(), None).expect("index").media_type,
            OCI_INDEX
        );
        assert_eq!(
            analyze(i.as_bytes(), Some(DOCKER_LIST))
                .expect("list")
                .media_type,
            DOCKER_LIST
        );
    }

    #[test]
    fn rejects_bad_manifests() {
        for bad in [
            "nope",
            "[]",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2}"#,
            r#"{"schemaVersion":2,"config":{"digest":"sha256:zz","size":1},"layers":[]}"#,
            r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:00"}]}"#,
        ] {
            assert!(analyze(bad.as_bytes(), None).is_err(), "{bad}");
        }
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","config":{{"digest":"{D}","size":0}},"layers":[]}}"#
        );
        assert!(analyze(m.as_bytes(), Some(OCI_MANIFEST)).is_err());
    }
}
