//! Blobs assembled from chunks another store sent (delta replication, docs/replication.md):
//! which chunks of a list the store lacks, storing chunks sent with their ids (each checked
//! against its BLAKE3 id first), and committing a blob from a recipe whose chunks are all
//! held: every chunk is read back and checked against its id, and the reassembled bytes'
//! digest against the blob's, before the blob becomes visible.

use std::sync::Arc;

use bytes::Bytes;

use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Input, Result};
use crate::recipe::{Recipe, RecipePiece};
use crate::store::Store;

/// Largest chunk taken from another store (the chunker's largest is far below it).
pub const CHUNK_LEN_MAX: usize = 16 << 20;

/// Chunk ids as the protocol sends them: 32 bytes each, concatenated.
pub fn encode_ids(ids: &[ChunkId]) -> Vec<u8> {
    ids.iter().flat_map(|i| i.0).collect()
}

/// Reads what [`encode_ids`] wrote.
pub fn decode_ids(bytes: &[u8]) -> std::result::Result<Vec<ChunkId>, String> {
    if !bytes.len().is_multiple_of(32) {
        return Err(format!(
            "{} bytes are not a list of 32-byte chunk ids",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().unwrap_or([0; 32])))
        .collect())
}

/// Appends a chunk frame: its id, its length (u32 little-endian), its bytes.
pub fn encode_frame(out: &mut Vec<u8>, id: &ChunkId, bytes: &[u8]) {
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Why chunk frames could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A frame is cut short (the message says where).
    Malformed(String),
    /// A chunk is longer than [`CHUNK_LEN_MAX`].
    TooLarge(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Malformed(why) | FrameError::TooLarge(why) => f.write_str(why),
        }
    }
}

/// Reads frames [`encode_frame`] wrote (the chunks are slices of `bytes`, not copies); a
/// chunk longer than [`CHUNK_LEN_MAX`] or a frame cut short is an error saying where.
pub fn decode_frames(bytes: &Bytes) -> std::result::Result<Vec<(ChunkId, Bytes)>, FrameError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let head = bytes.get(at..at + 36).ok_or_else(|| {
            FrameError::Malformed(format!("a chunk frame is cut short at byte {at}"))
        })?;
        let id = ChunkId(head[..32].try_into().unwrap_or([0; 32]));
        let len = u32::from_le_bytes(head[32..36].try_into().unwrap_or([0; 4])) as usize;
        if len > CHUNK_LEN_MAX {
            return Err(FrameError::TooLarge(format!(
                "a chunk of {len} bytes at byte {at}: at most {CHUNK_LEN_MAX} are taken"
            )));
        }
        let data = bytes
            .get(at + 36..at + 36 + len)
            .ok_or_else(|| FrameError::Malformed(format!("the chunk at byte {at} is cut short")))?;
        out.push((id, bytes.slice_ref(data)));
        at += 36 + len;
    }
    Ok(out)
}

/// What committing a blob from a recipe did.
#[derive(Debug)]
pub enum Assembled {
    /// The blob is stored (or was already).
    Committed(Arc<Recipe>),
    /// These chunks of the recipe are not held: send them, then commit again.
    Missing(Vec<ChunkId>),
}

/// Keeps a blob writer registered (its pinned chunks live through a collection) until
/// dropped.
struct Lease<'a>(&'a Store, u64);

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        self.0.end_write(self.1);
    }
}

impl Store {
    /// The chunks of `ids` this store does not hold, in their order.
    pub fn missing_chunks(&self, ids: &[ChunkId]) -> Vec<ChunkId> {
        ids.iter()
            .filter(|id| self.chunk_location(id).is_none())
            .copied()
            .collect()
    }

    /// Stores chunks sent with their ids: each is checked against its id first (a chunk
    /// that does not match fails the call with [`Input::Chunk`], naming it; one longer than
    /// [`CHUNK_LEN_MAX`] with [`Error::LimitExceeded`]; those before it stay, harmless:
    /// unreferenced chunks go with a collection). Returns how many were new. They become
    /// durable with the next sync, at the latest with the commit of a blob that uses them.
    pub fn put_chunks(&self, chunks: &[(ChunkId, Bytes)]) -> Result<u64> {
        let mut new = 0;
        for (id, bytes) in chunks {
            if bytes.len() > CHUNK_LEN_MAX {
                return Err(Error::LimitExceeded(format!(
                    "chunk {} is {} bytes; at most {CHUNK_LEN_MAX} are taken",
                    hex::encode(id.0),
                    bytes.len()
                )));
            }
            if ChunkId::of(bytes) != *id {
                return Err(Error::InvalidInput {
                    what: Input::Chunk,
                    reason: format!(
                        "the bytes sent as chunk {} have another BLAKE3 id ({})",
                        hex::encode(id.0),
                        hex::encode(ChunkId::of(bytes).0)
                    ),
                });
            }
            let (stored, _) = self.put_chunk_with_id(*id, bytes, true, None)?;
            new += u64::from(stored);
        }
        Ok(new)
    }

    /// Commits the blob `digest` of `size` bytes from `pieces`: every chunk must be held
    /// (else [`Assembled::Missing`] lists those that are not), is read back and checked
    /// against its id, and the reassembled bytes must have the digest
    /// ([`Error::DigestMismatch`] otherwise). Nothing becomes visible unless all holds.
    pub fn commit_from_recipe(
        &self,
        digest: &Digest,
        size: u64,
        pieces: Vec<RecipePiece>,
    ) -> Result<Assembled> {
        let total: u64 = pieces.iter().map(RecipePiece::len).sum();
        if total != size {
            return Err(Error::InvalidInput {
                what: Input::Recipe,
                reason: format!("its pieces add up to {total} bytes, not {size}"),
            });
        }
        if let Ok(existing) = self.recipe(digest) {
            if self.pin_blob(digest) {
                return Ok(Assembled::Committed(existing));
            }
        }
        let writer = self.begin_write();
        let _lease = Lease(self, writer);
        let mut missing = Vec::new();
        for p in &pieces {
            if let RecipePiece::Chunk { id, .. } = p {
                match self.chunk_location(id) {
                    // Pinned: a collection running now keeps it for this commit.
                    Some(loc) if self.pin_chunk(id, loc.segment, Some(writer)) => {}
                    _ => {
                        if !missing.contains(id) {
                            missing.push(*id);
                        }
                    }
                }
            }
        }
        if !missing.is_empty() {
            return Ok(Assembled::Missing(missing));
        }
        let mut hasher = digest.algorithm().hasher();
        for p in &pieces {
            match p {
                RecipePiece::Inline(b) => hasher.update(b),
                RecipePiece::Chunk { id, len } => {
                    let bytes = match self.read_chunk(id) {
                        Ok(b) => b,
                        // Collected between the check and the read: send it again.
                        Err(Error::NotFound(_)) => return Ok(Assembled::Missing(vec![*id])),
                        Err(e) => return Err(e),
                    };
                    // (Checked whatever `verify_chunk_ids` says: these bytes came from
                    // elsewhere.)
                    if ChunkId::of(&bytes) != *id || bytes.len() as u64 != u64::from(*len) {
                        return Err(Error::InvalidInput {
                            what: Input::Recipe,
                            reason: format!(
                                "chunk {} held here is {} bytes or has another id; the recipe \
                                 says {len} bytes",
                                hex::encode(id.0),
                                bytes.len()
                            ),
                        });
                    }
                    hasher.update(&bytes);
                }
            }
        }
        let actual = hasher.finish();
        if actual != *digest {
            return Err(Error::DigestMismatch {
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        let recipe = Recipe {
            digest: digest.clone(),
            size,
            pieces,
        };
        self.commit_recipe(recipe).map(Assembled::Committed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::seeded;
    use crate::Options;

    #[test]
    fn a_blob_is_assembled_from_chunks_sent_by_id_and_checked() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let src = Store::open(a.path(), Options::default()).expect("open");
        let dst = Store::open(b.path(), Options::default()).expect("open");
        let data = seeded(3 << 20, 5);
        let recipe = src.put_blob(&data, None).expect("put").recipe;
        let ids: Vec<ChunkId> = recipe
            .pieces
            .iter()
            .filter_map(|p| match p {
                RecipePiece::Chunk { id, .. } => Some(*id),
                RecipePiece::Inline(_) => None,
            })
            .collect();
        assert!(ids.len() > 1);
        assert_eq!(dst.missing_chunks(&ids), ids);
        // Without the chunks: missing, nothing visible.
        match dst
            .commit_from_recipe(&recipe.digest, recipe.size, recipe.pieces.clone())
            .expect("commit")
        {
            Assembled::Missing(m) => assert_eq!(m, ids),
            other => panic!("{other:?}"),
        }
        assert!(!dst.contains(&recipe.digest));
        // A chunk whose bytes are not its id's is refused.
        let wrong = (ids[0], Bytes::from_static(b"not the chunk"));
        assert!(dst.put_chunks(&[wrong]).is_err());
        // Half sent: the rest is missing.
        let sent: Vec<(ChunkId, Bytes)> = ids[..1]
            .iter()
            .map(|id| (*id, src.read_chunk(id).expect("chunk")))
            .collect();
        assert_eq!(dst.put_chunks(&sent).expect("put"), 1);
        assert_eq!(dst.missing_chunks(&ids), ids[1..].to_vec());
        let rest: Vec<(ChunkId, Bytes)> = ids[1..]
            .iter()
            .map(|id| (*id, src.read_chunk(id).expect("chunk")))
            .collect();
        dst.put_chunks(&rest).expect("put");
        // A recipe that claims another digest is refused.
        let other = crate::digest::Digest::of(crate::Algorithm::Sha256, b"other");
        assert!(matches!(
            dst.commit_from_recipe(&other, recipe.size, recipe.pieces.clone()),
            Err(Error::DigestMismatch { .. })
        ));
        assert!(!dst.contains(&other));
        match dst
            .commit_from_recipe(&recipe.digest, recipe.size, recipe.pieces.clone())
            .expect("commit")
        {
            Assembled::Committed(r) => assert_eq!(r.digest, recipe.digest),
            other => panic!("{other:?}"),
        }
        assert_eq!(dst.read_blob(&recipe.digest).expect("read"), data);
        // The wire form of the pieces reads back.
        let wire = crate::recipe::encode_wire(recipe.size, &recipe.pieces);
        assert_eq!(
            crate::recipe::decode_wire(&wire).expect("decode"),
            (recipe.size, recipe.pieces.clone())
        );
        assert!(crate::recipe::decode_wire(&wire[..wire.len() - 1]).is_err());
    }
}
