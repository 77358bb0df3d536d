//! Manifest fills: a pull of a manifest in a cached repository makes sure the catalog holds
//! what the upstream says, then the ordinary read path serves it.
//!
//! - By digest: held → served; not held → fetched, its digest checked, stored.
//! - By tag: checked upstream (a `HEAD`) when it was last checked more than `tag_ttl_secs`
//!   ago or is not held; a moved tag is fetched by its new digest and moved here too; a tag
//!   gone upstream is removed here. When the upstream cannot be asked (down, timing out,
//!   rate-limiting, failing), a held tag is served as it is (offline mode, logged and
//!   counted); one not held fails with `UNAVAILABLE` saying why.
//!
//! One fill per reference at a time: concurrent pulls wait for it and then find it held.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ballast_engine::catalog::Op;
use ballast_engine::Digest;

use super::{PullThrough, Upstream};
use crate::error::ApiError;
use crate::handlers::blocking;
use crate::remote::Failure;
use crate::App;

/// Makes the catalog hold what `name:reference` is upstream (see the module comment). The
/// caller then serves it from the catalog as for any repository.
pub async fn fill_manifest(
    app: &App,
    up: &Upstream,
    name: &str,
    reference: &str,
) -> Result<(), ApiError> {
    let cache = &app.pull_through;
    if reference.contains(':') {
        let digest: Digest = reference
            .parse()
            .map_err(|e: ballast_engine::Error| ApiError::DigestInvalid(e.to_string()))?;
        if held(app, name, &digest) {
            return Ok(());
        }
        let lock = cache.manifest_lock(format!("{name}@{digest}"));
        let _guard = lock.lock().await;
        if held(app, name, &digest) {
            return Ok(());
        }
        return fetch(app, up, name, &digest.to_string(), Some(&digest), None)
            .await
            .map_err(|f| unavailable(up, name, reference, &f, "manifest"));
    }
    let tag = reference;
    let fresh = |cache: &PullThrough| {
        cache
            .checked
            .lock()
            .get(&(name.to_owned(), tag.to_owned()))
            .is_some_and(|at| at.elapsed() < Duration::from_secs(up.cfg.tag_ttl_secs))
    };
    let local = || tagged(app, name, tag);
    if local().is_some() && fresh(cache) {
        return Ok(());
    }
    let lock = cache.manifest_lock(format!("{name}:{tag}"));
    let _guard = lock.lock().await;
    let current = local();
    if current.is_some() && fresh(cache) {
        return Ok(());
    }
    let remote = up.remote_name(name);
    let head = up.client.head_manifest(&remote, tag).await;
    up.count(&head);
    let result = match head {
        Ok((Some(d), _)) if Some(&d) == current.as_ref() => Ok(()),
        Ok((Some(d), _)) if held(app, name, &d) => retag(app, name, tag, &d).await,
        Ok((Some(d), _)) => fetch(app, up, name, &d.to_string(), Some(&d), Some(tag)).await,
        // (An upstream that does not name the digest: fetched by tag, digest computed.)
        Ok((None, _)) => fetch(app, up, name, tag, None, Some(tag)).await,
        Err(f) => Err(f),
    };
    match result {
        Ok(()) => {
            cache
                .checked
                .lock()
                .insert((name.to_owned(), tag.to_owned()), Instant::now());
            Ok(())
        }
        Err(Failure::NotFound) => {
            if current.is_some() {
                untag(app, name, tag).await?;
            }
            Err(ApiError::ManifestUnknown(format!(
                "tag {tag} is not in {} (pull_through {:?})",
                up.origin(name),
                up.cfg.name
            )))
        }
        Err(f) if f.is_outage() && current.is_some() => {
            up.counters.offline_serves.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                upstream = %up.cfg.name, repository = name, tag, error = %f,
                "serving the cached tag: the upstream could not be asked"
            );
            // Asked again after the TTL, not at every pull while it is down.
            cache
                .checked
                .lock()
                .insert((name.to_owned(), tag.to_owned()), Instant::now());
            Ok(())
        }
        Err(f) => Err(unavailable(up, name, tag, &f, "tag")),
    }
}

/// The error a client gets when a manifest cannot be filled.
fn unavailable(up: &Upstream, name: &str, reference: &str, f: &Failure, what: &str) -> ApiError {
    let msg = format!(
        "{name}:{reference} is not cached, and pull_through {:?} ({}) could not provide the \
         {what}: {f}",
        up.cfg.name,
        up.origin(name)
    );
    match f {
        Failure::NotFound => ApiError::ManifestUnknown(msg),
        Failure::Denied(_) => ApiError::Denied(msg),
        Failure::RateLimited => ApiError::TooManyRequests(msg),
        _ => ApiError::Unavailable(msg),
    }
}

fn held(app: &App, name: &str, digest: &Digest) -> bool {
    let state = app.store.catalog().read();
    state
        .repos
        .get(name)
        .is_some_and(|r| r.manifests.contains_key(digest))
}

fn tagged(app: &App, name: &str, tag: &str) -> Option<Digest> {
    let state = app.store.catalog().read();
    state.repos.get(name).and_then(|r| r.tags.get(tag).cloned())
}

/// Fetches a manifest (by `reference`: its digest, or a tag), checks it (against `expected`,
/// else against the digest the upstream names) and stores it, tagged `tag` if given.
async fn fetch(
    app: &App,
    up: &Upstream,
    name: &str,
    reference: &str,
    expected: Option<&Digest>,
    tag: Option<&str>,
) -> Result<(), Failure> {
    let remote = up.remote_name(name);
    let got = up
        .client
        .get_manifest(&remote, reference, app.config.manifest_bytes_max)
        .await;
    up.count(&got);
    let (bytes, content_type, named) = got?;
    up.counters
        .bytes
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    let want = expected.or(named.as_ref());
    let digest = match want {
        Some(w) => {
            let actual = Digest::of(w.algorithm(), &bytes);
            if &actual != w {
                return Err(Failure::Failed(format!(
                    "it sent a manifest whose digest is {actual}, not {w}: refused, nothing stored"
                )));
            }
            actual
        }
        None => Digest::of(ballast_engine::Algorithm::Sha256, &bytes),
    };
    let (mut link, _, _) =
        crate::handlers::manifests::link_of(&bytes, content_type.as_deref(), crate::now_secs())
            .map_err(|e| Failure::Failed(format!("its manifest {digest} is refused: {e}")))?;
    link.origin = Some(up.origin(name));
    let store = app.store.clone();
    let (repo, d, t) = (name.to_owned(), digest.clone(), tag.map(str::to_owned));
    blocking(move || {
        store
            .put_blob(&bytes, Some(&d))
            .map_err(ApiError::from_engine)?;
        // Through the store: the manifest blob is pinned against a running collection.
        let tags: Vec<String> = t.into_iter().collect();
        store.commit_catalog(|_| {
            Ok::<_, ApiError>((
                crate::handlers::manifests::put_ops(&repo, &d, link, &tags),
                (),
            ))
        })
    })
    .await
    .map_err(|e| Failure::Failed(format!("storing its manifest: {e}")))?;
    up.counters.manifest_fills.fetch_add(1, Ordering::Relaxed);
    tracing::info!(upstream = %up.cfg.name, repository = name, reference, %digest, "manifest cached");
    Ok(())
}

async fn retag(app: &App, name: &str, tag: &str, digest: &Digest) -> Result<(), Failure> {
    let op = Op::Tag {
        repo: name.to_owned(),
        tag: tag.to_owned(),
        digest: digest.clone(),
        at: crate::now_secs(),
    };
    commit(app, op)
        .await
        .map_err(|e| Failure::Failed(format!("moving the tag: {e}")))
}

async fn untag(app: &App, name: &str, tag: &str) -> Result<(), ApiError> {
    let op = Op::Untag {
        repo: name.to_owned(),
        tag: tag.to_owned(),
    };
    commit(app, op).await
}

async fn commit(app: &App, op: Op) -> Result<(), ApiError> {
    let store = app.store.clone();
    blocking(move || {
        store
            .commit_catalog(|_| Ok::<_, ApiError>((vec![op], ())))
            .map(drop)
    })
    .await
}
