//! Copying to a target: a manifest with everything it references (an index's children
//! first, an image's config and layers), then the manifests that refer to it (signatures,
//! SBOMs); and deletes. What the target has is not sent again: a `HEAD` of each manifest and
//! blob first, a cross-repository mount when the blob was seen in another of its
//! repositories, an upload otherwise (the target checks every digest).

use std::sync::atomic::Ordering;

use ballast_engine::catalog::ManifestLink;
use ballast_engine::Digest;
use bytes::Bytes;

use super::Rule;
use crate::remote::{Failure, UPLOAD_PIECE};
use crate::App;

/// What a copy did.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// The target had it.
    UpToDate,
    /// Sent.
    Sent,
    /// Not here any more (a later event says what happened).
    Gone,
}

fn local(app: &App, repo: &str, digest: &Digest) -> Option<ManifestLink> {
    let state = app.store.catalog().read();
    state
        .repos
        .get(repo)
        .and_then(|r| r.manifests.get(digest).cloned())
}

/// Copies `repo`'s manifest `digest` (tagged `tag` on the target if given).
pub async fn copy(
    app: &App,
    rule: &Rule,
    repo: &str,
    digest: &Digest,
    tag: Option<&str>,
) -> Result<Copied, Failure> {
    let target = rule.target(repo);
    if let Some(t) = tag {
        if let Ok((Some(there), _)) = rule.client.head_manifest(&target, t).await {
            if &there == digest {
                return Ok(Copied::UpToDate);
            }
        }
    }
    if local(app, repo, digest).is_none() {
        return Ok(Copied::Gone);
    }
    let sent = copy_tree(app, rule, repo, &target, digest, tag, 0).await?;
    Ok(if sent { Copied::Sent } else { Copied::UpToDate })
}

/// Copies one manifest and what it references, then its referrers; true when something was
/// sent. (Boxed: it recurses over an index's children.)
fn copy_tree<'a>(
    app: &'a App,
    rule: &'a Rule,
    repo: &'a str,
    target: &'a str,
    digest: &'a Digest,
    tag: Option<&'a str>,
    depth: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, Failure>> + Send + 'a>> {
    Box::pin(async move {
        if depth > 8 {
            return Err(Failure::Failed(format!(
                "{repo}@{digest}: indexes nested deeper than 8"
            )));
        }
        let Some(link) = local(app, repo, digest) else {
            // (A child a cache never fetched, or one deleted meanwhile: the target will
            // refuse the index, and the error says which.)
            return Err(Failure::Failed(format!(
                "{repo}@{digest} is referenced but not held here"
            )));
        };
        let mut sent = false;
        let present = tag.is_none()
            && matches!(
                rule.client.head_manifest(target, &digest.to_string()).await,
                Ok((Some(d), _)) if &d == digest
            );
        if !present {
            let children: Vec<Digest> = {
                let state = app.store.catalog().read();
                let r = state.repos.get(repo);
                link.references
                    .iter()
                    .filter(|d| r.is_some_and(|r| r.manifests.contains_key(*d)))
                    .cloned()
                    .collect()
            };
            for c in &children {
                copy_tree(app, rule, repo, target, c, None, depth + 1).await?;
            }
            for b in link.references.iter().filter(|d| !children.contains(d)) {
                copy_blob(app, rule, target, b).await?;
            }
            let (store, d) = (app.store.clone(), digest.clone());
            let bytes = tokio::task::spawn_blocking(move || store.read_blob(&d))
                .await
                .map_err(|e| Failure::Failed(e.to_string()))?
                .map_err(|e| Failure::Failed(format!("reading {repo}@{digest} here: {e}")))?;
            let reference = tag.map_or_else(|| digest.to_string(), str::to_owned);
            rule.client
                .put_manifest(target, &reference, Bytes::from(bytes), &link.media_type)
                .await?;
            rule.counters.manifests.fetch_add(1, Ordering::Relaxed);
            sent = true;
        }
        // The manifests that refer to it.
        let referrers: Vec<Digest> = {
            let state = app.store.catalog().read();
            state.repos.get(repo).map_or_else(Vec::new, |r| {
                r.manifests
                    .iter()
                    .filter(|(_, l)| l.subject.as_ref() == Some(digest))
                    .map(|(d, _)| d.clone())
                    .collect()
            })
        };
        for r in &referrers {
            if depth < 8 {
                sent |= copy_tree(app, rule, repo, target, r, None, depth + 1).await?;
            }
        }
        Ok(sent)
    })
}

/// Makes the target's repository hold a blob; true when bytes were sent.
async fn copy_blob(app: &App, rule: &Rule, target: &str, digest: &Digest) -> Result<bool, Failure> {
    let c = &rule.counters;
    match rule.client.head_blob(target, digest).await {
        Ok(_) => {
            c.skipped.fetch_add(1, Ordering::Relaxed);
            rule.seen.lock().insert(digest.clone(), target.to_owned());
            return Ok(false);
        }
        Err(Failure::NotFound) => {}
        Err(f) => return Err(f),
    }
    let from = rule.seen.lock().get(digest).cloned();
    if let Some(from) = from.filter(|f| f != target) {
        if rule.client.mount_blob(target, digest, &from).await? {
            c.mounted.fetch_add(1, Ordering::Relaxed);
            rule.seen.lock().insert(digest.clone(), target.to_owned());
            return Ok(true);
        }
    }
    if rule.cfg.delta && rule.delta_support.load(Ordering::Relaxed) != 2 {
        match super::delta::send(app, rule, target, digest).await {
            Ok(()) => {
                rule.seen.lock().insert(digest.clone(), target.to_owned());
                return Ok(true);
            }
            Err(super::delta::Refusal::Unsupported(why)) => {
                rule.delta_support.store(2, Ordering::Relaxed);
                tracing::info!(rule = %rule.cfg.name, %why, "the target takes no delta uploads: plain uploads from now on");
            }
            Err(super::delta::Refusal::Refused(why)) => {
                tracing::warn!(rule = %rule.cfg.name, %digest, %why, "a delta upload was refused: a plain upload instead");
            }
            Err(super::delta::Refusal::Failed(f)) => return Err(f),
        }
    }
    let store = app.store.clone();
    let d = digest.clone();
    let reader = tokio::task::spawn_blocking(move || store.open_blob(&d))
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?
        .map_err(|e| Failure::Failed(format!("reading blob {digest} here: {e}")))?;
    let size = reader.size();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, String>>(2);
    // Pieces of up to UPLOAD_PIECE bytes, read off the async threads.
    tokio::task::spawn_blocking(move || {
        let iter = match reader.range(0, size) {
            Ok(i) => i,
            Err(e) => {
                let _ = tx.blocking_send(Err(e.to_string()));
                return;
            }
        };
        let mut piece: Vec<u8> = Vec::new();
        for part in iter {
            match part {
                Ok(b) => {
                    let mut b: &[u8] = &b;
                    while !b.is_empty() {
                        let n = (UPLOAD_PIECE - piece.len()).min(b.len());
                        piece.extend_from_slice(&b[..n]);
                        b = &b[n..];
                        if piece.len() == UPLOAD_PIECE
                            && tx
                                .blocking_send(Ok(Bytes::from(std::mem::take(&mut piece))))
                                .is_err()
                        {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e.to_string()));
                    return;
                }
            }
        }
        if !piece.is_empty() {
            let _ = tx.blocking_send(Ok(Bytes::from(piece)));
        }
    });
    rule.client.upload_blob(target, digest, size, rx).await?;
    c.blobs.fetch_add(1, Ordering::Relaxed);
    c.bytes.fetch_add(size, Ordering::Relaxed);
    rule.seen.lock().insert(digest.clone(), target.to_owned());
    Ok(true)
}

/// Deletes a tag on the target. A target that cannot delete tags (CNCF Distribution) has
/// the manifest it points at deleted instead, unless another tag here still points at it.
pub async fn delete_tag(app: &App, rule: &Rule, repo: &str, tag: &str) -> Result<(), Failure> {
    let target = rule.target(repo);
    match rule.client.delete_manifest(&target, tag).await {
        Ok(()) | Err(Failure::NotFound) => return Ok(()),
        // (Refused as unsupported, or a failure the digest path meets again.)
        Err(Failure::Failed(_)) => {}
        Err(f) => return Err(f),
    }
    let digest = match rule.client.head_manifest(&target, tag).await {
        Ok((Some(d), _)) => d,
        Ok((None, _)) => {
            return Err(Failure::Failed(format!(
                "{target}:{tag}: the target deletes no tags and does not name the digest"
            )))
        }
        Err(Failure::NotFound) => return Ok(()),
        Err(f) => return Err(f),
    };
    let still_tagged = {
        let state = app.store.catalog().read();
        state.repos.get(repo).is_some_and(|r| {
            r.tags
                .iter()
                .any(|(t, d)| d == &digest && rule.covers_tag(t))
        })
    };
    if still_tagged {
        return Ok(());
    }
    delete_manifest(rule, repo, &digest).await
}

/// Deletes a manifest on the target.
pub async fn delete_manifest(rule: &Rule, repo: &str, digest: &Digest) -> Result<(), Failure> {
    match rule
        .client
        .delete_manifest(&rule.target(repo), &digest.to_string())
        .await
    {
        Ok(()) | Err(Failure::NotFound) => Ok(()),
        Err(f) => Err(f),
    }
}
