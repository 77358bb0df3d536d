//! Blob fills from an upstream Ballast by chunks (docs/replication.md): the blob's recipe,
//! then only the chunks this store lacks (each checked against its BLAKE3 id when stored);
//! the blob is assembled from held chunks and checked against its digest before it becomes
//! visible. A rebuilt image whose layers share most chunks with what is cached costs a few
//! chunks. The clients waiting for such a fill are served from the store once it is done.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use ballast_engine::delta::Assembled;
use ballast_engine::recipe::RecipePiece;
use ballast_engine::{ChunkId, Digest};

use super::Upstream;
use crate::remote::Failure;
use crate::App;

/// Ids asked for at a time (the upstream answers as many as fit in 16 MiB).
const IDS_PER_REQUEST: usize = 4096;

/// Fills `digest` in the store by delta. [`Failure::Failed`]: do a plain fetch instead.
pub async fn fetch(app: &App, up: &Upstream, name: &str, digest: &Digest) -> Result<(), Failure> {
    let remote = up.remote_name(name);
    let got = up.client.get_recipe(&remote, digest).await;
    up.count(&got);
    let wire = got?;
    up.delta_support.store(1, Ordering::Relaxed);
    up.counters
        .bytes
        .fetch_add(wire.len() as u64, Ordering::Relaxed);
    let (size, pieces) = ballast_engine::recipe::decode_wire(&wire)
        .map_err(|why| Failure::Failed(format!("its recipe of {digest}: {why}")))?;
    crate::handlers::check_room(app)
        .await
        .map_err(|e| Failure::Failed(format!("this registry cannot store it: {e}")))?;
    let mut seen = HashSet::new();
    let ids: Vec<ChunkId> = pieces
        .iter()
        .filter_map(|p| match p {
            RecipePiece::Chunk { id, .. } => seen.insert(*id).then_some(*id),
            RecipePiece::Inline(_) => None,
        })
        .collect();
    let store = app.store.clone();
    let mut missing = tokio::task::spawn_blocking(move || store.missing_chunks(&ids))
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?;
    while !missing.is_empty() {
        let ask = &missing[..missing.len().min(IDS_PER_REQUEST)];
        let got = up.client.fetch_chunks(&remote, digest, ask).await;
        up.count(&got);
        let chunks = got?;
        if chunks.is_empty() || chunks.iter().zip(ask).any(|((id, _), want)| id != want) {
            return Err(Failure::Failed(
                "it answered other chunks than those asked for".into(),
            ));
        }
        let n = chunks.len();
        let bytes: u64 = chunks.iter().map(|(_, b)| 36 + b.len() as u64).sum();
        up.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        let store = app.store.clone();
        tokio::task::spawn_blocking(move || store.put_chunks(&chunks))
            .await
            .map_err(|e| Failure::Failed(e.to_string()))?
            .map_err(|e| Failure::Failed(format!("its chunks are refused: {e}")))?;
        missing.drain(..n);
    }
    let store = app.store.clone();
    let d = digest.clone();
    let assembled = tokio::task::spawn_blocking(move || store.commit_from_recipe(&d, size, pieces))
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?
        .map_err(|e| Failure::Failed(format!("assembling {digest}: {e}")))?;
    match assembled {
        Assembled::Committed(_) => {
            up.counters.delta_blobs.fetch_add(1, Ordering::Relaxed);
            up.counters
                .delta_blob_bytes
                .fetch_add(size, Ordering::Relaxed);
            Ok(())
        }
        // (Collected between the fetch and the commit: rare; the plain path takes over.)
        Assembled::Missing(m) => Err(Failure::Failed(format!(
            "{} chunks went missing before the blob was assembled",
            m.len()
        ))),
    }
}
