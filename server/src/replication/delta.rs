//! Delta uploads to a Ballast target (docs/replication.md): the source asks which of a
//! blob's chunks the target lacks, sends only those (each frame checked against its id
//! there), then the recipe; the target assembles the blob from chunks it holds and checks
//! every chunk's id and the blob's digest before the blob becomes visible. A batch of chunks
//! the target acknowledged is never sent again: a cut connection is retried, and the next
//! question leaves them out.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use ballast_engine::recipe::RecipePiece;
use ballast_engine::{ChunkId, Digest};
use bytes::Bytes;

use super::Rule;
use crate::remote::Failure;
use crate::App;

/// Ids asked about at a time (the target takes up to 65,536).
const IDS_PER_QUESTION: usize = 16_384;
/// Bytes of chunk frames sent at a time (the target takes up to 64 MiB).
const FRAMES_MAX: usize = 16 << 20;

/// Why a blob was not sent by delta.
pub enum Refusal {
    /// The target has no delta endpoints (not a Ballast).
    Unsupported(String),
    /// The target refused this blob's delta (a plain upload follows).
    Refused(String),
    /// The target could not be asked (retried like any replication failure).
    Failed(Failure),
}

impl From<Failure> for Refusal {
    fn from(f: Failure) -> Self {
        Refusal::Failed(f)
    }
}

/// Sends one blob by delta.
pub async fn send(app: &App, rule: &Rule, target: &str, digest: &Digest) -> Result<(), Refusal> {
    let store = app.store.clone();
    let d = digest.clone();
    let recipe = tokio::task::spawn_blocking(move || store.recipe(&d))
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?
        .map_err(|e| Failure::Failed(format!("reading blob {digest} here: {e}")))?;
    let mut unique = HashSet::new();
    let ids: Vec<ChunkId> = recipe
        .pieces
        .iter()
        .filter_map(|p| match p {
            RecipePiece::Chunk { id, .. } => unique.insert(*id).then_some(*id),
            RecipePiece::Inline(_) => None,
        })
        .collect();
    let mut missing = Vec::new();
    for batch in ids.chunks(IDS_PER_QUESTION) {
        match rule.client.chunks_missing(target, batch).await {
            Ok(m) => missing.extend(m),
            Err(f) if rule.delta_support.load(Ordering::Relaxed) == 0 && !f.is_outage() => {
                return Err(Refusal::Unsupported(f.to_string()))
            }
            Err(Failure::Failed(why)) if rule.delta_support.load(Ordering::Relaxed) == 0 => {
                return Err(Refusal::Unsupported(why))
            }
            Err(f) => return Err(f.into()),
        }
    }
    rule.delta_support.store(1, Ordering::Relaxed);
    send_chunks(app, rule, target, &missing).await?;
    let wire = Bytes::from(ballast_engine::recipe::encode_wire(
        recipe.size,
        &recipe.pieces,
    ));
    let c = &rule.counters;
    for attempt in 0..2 {
        c.delta_bytes
            .fetch_add(wire.len() as u64, Ordering::Relaxed);
        let lacking = match rule.client.put_recipe(target, digest, wire.clone()).await {
            Ok(l) => l,
            Err(Failure::Failed(why)) => return Err(Refusal::Refused(why)),
            Err(f) => return Err(f.into()),
        };
        if lacking.is_empty() {
            c.delta_blobs.fetch_add(1, Ordering::Relaxed);
            c.delta_blob_bytes.fetch_add(recipe.size, Ordering::Relaxed);
            return Ok(());
        }
        // It said it had these (or lost them since): send them, once.
        if attempt == 0 {
            let known: HashSet<&ChunkId> = ids.iter().collect();
            if lacking.iter().any(|l| !known.contains(l)) {
                return Err(Refusal::Refused(
                    "the target asks for chunks the blob does not have".into(),
                ));
            }
            send_chunks(app, rule, target, &lacking).await?;
        }
    }
    Err(Refusal::Refused(format!(
        "the target still lacks chunks of {digest} it was sent"
    )))
}

/// Sends chunks in frames of up to [`FRAMES_MAX`] bytes a request.
async fn send_chunks(app: &App, rule: &Rule, target: &str, ids: &[ChunkId]) -> Result<(), Refusal> {
    let mut i = 0;
    while i < ids.len() {
        // Read the next batch off the async threads.
        let store = app.store.clone();
        let rest: Vec<ChunkId> = ids[i..].to_vec();
        let (frames, taken) = tokio::task::spawn_blocking(move || {
            let mut frames: Vec<u8> = Vec::new();
            let mut taken = 0;
            for id in &rest {
                let bytes = store.read_chunk(id)?;
                if taken > 0 && frames.len() + 36 + bytes.len() > FRAMES_MAX {
                    break;
                }
                ballast_engine::delta::encode_frame(&mut frames, id, &bytes);
                taken += 1;
            }
            Ok::<_, ballast_engine::Error>((frames, taken))
        })
        .await
        .map_err(|e| Failure::Failed(e.to_string()))?
        .map_err(|e| Failure::Failed(format!("reading a chunk here: {e}")))?;
        let n = frames.len() as u64;
        match rule.client.post_chunks(target, Bytes::from(frames)).await {
            Ok(()) => {}
            Err(Failure::Failed(why)) => return Err(Refusal::Refused(why)),
            Err(f) => return Err(f.into()),
        }
        rule.counters.delta_bytes.fetch_add(n, Ordering::Relaxed);
        i += taken;
    }
    Ok(())
}
