//! Streaming blob writes and reads.
//!
//! [`BlobWriter`] takes bytes in any pieces. The OCI digest is computed on a thread of its own
//! while the calling thread chunks, hashes chunks with BLAKE3, compresses and appends: SHA-256
//! is the floor cost of an upload, and everything else overlaps with it. Memory stays bounded
//! (a few chunk buffers) whatever the blob size.

use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use crossbeam_channel::{bounded, Sender};

use crate::chunker::{Mode, Piece, StreamChunker};
use crate::digest::{Algorithm, ChunkId, Digest, Hasher};
use crate::error::{Error, Result};
use crate::recipe::{Recipe, RecipePiece};
use crate::store::Store;

/// Below this many bytes the digest is computed inline; a thread is not worth starting.
const INLINE_HASH_MAX: u64 = 1 << 20;

enum DigestState {
    Inline(Hasher),
    Thread {
        tx: Sender<Vec<u8>>,
        handle: JoinHandle<Digest>,
    },
    Taken,
}

/// A blob being written. Nothing becomes visible until [`BlobWriter::finish`] succeeds.
pub struct BlobWriter {
    store: Store,
    chunker: StreamChunker,
    pieces: Vec<RecipePiece>,
    size: u64,
    digest: DigestState,
    error: Option<Error>,
    new_chunks: u64,
    new_bytes: u64,
}

/// What a finished write did.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The blob's recipe.
    pub recipe: Arc<Recipe>,
    /// Chunks this write stored for the first time.
    pub new_chunks: u64,
    /// Raw bytes of those chunks.
    pub new_bytes: u64,
}

impl BlobWriter {
    /// Starts a blob whose digest uses `algorithm`.
    pub fn new(store: &Store, algorithm: Algorithm, mode: Mode) -> Self {
        BlobWriter {
            store: store.clone(),
            chunker: StreamChunker::new(mode),
            pieces: Vec::new(),
            size: 0,
            digest: DigestState::Inline(algorithm.hasher()),
            error: None,
            new_chunks: 0,
            new_bytes: 0,
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// True when nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Appends bytes to the blob.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        self.size += data.len() as u64;
        self.feed_digest(data)?;
        let Self {
            chunker,
            store,
            pieces,
            error,
            new_chunks,
            new_bytes,
            ..
        } = self;
        chunker.push(data, &mut |p| {
            take_piece(store, pieces, error, new_chunks, new_bytes, p)
        });
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn feed_digest(&mut self, data: &[u8]) -> Result<()> {
        if let DigestState::Inline(h) = &mut self.digest {
            if self.size <= INLINE_HASH_MAX {
                h.update(data);
                return Ok(());
            }
            // Large blob: move the hasher to its own thread.
            let DigestState::Inline(mut h) =
                std::mem::replace(&mut self.digest, DigestState::Taken)
            else {
                unreachable!("checked above")
            };
            let (tx, rx) = bounded::<Vec<u8>>(16);
            let handle = std::thread::Builder::new()
                .name("ballast-digest".into())
                .spawn(move || {
                    for buf in rx {
                        h.update(&buf);
                    }
                    h.finish()
                })
                .map_err(|e| Error::io("digest thread", e))?;
            self.digest = DigestState::Thread { tx, handle };
        }
        if let DigestState::Thread { tx, .. } = &self.digest {
            tx.send(data.to_vec()).map_err(|_| {
                Error::io(
                    "digest thread",
                    std::io::Error::other("digest thread stopped"),
                )
            })?;
        }
        Ok(())
    }

    fn take_digest(&mut self) -> Result<Digest> {
        match std::mem::replace(&mut self.digest, DigestState::Taken) {
            DigestState::Inline(h) => Ok(h.finish()),
            DigestState::Thread { tx, handle } => {
                drop(tx);
                handle.join().map_err(|_| {
                    Error::io(
                        "digest thread",
                        std::io::Error::other("digest thread panicked"),
                    )
                })
            }
            DigestState::Taken => Err(Error::invalid("blob writer", "already finished")),
        }
    }

    /// Finishes the blob. With `expected`, a different computed digest fails with
    /// [`Error::DigestMismatch`] and nothing becomes visible. On success the blob is durable.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<Committed> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        {
            let Self {
                chunker,
                store,
                pieces,
                error,
                new_chunks,
                new_bytes,
                ..
            } = &mut self;
            chunker.finish(&mut |p| take_piece(store, pieces, error, new_chunks, new_bytes, p));
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let digest = self.take_digest()?;
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(Error::DigestMismatch {
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let recipe = Recipe {
            digest,
            size: self.size,
            pieces: std::mem::take(&mut self.pieces),
        };
        let recipe = self.store.commit_recipe(recipe)?;
        Ok(Committed {
            recipe,
            new_chunks: self.new_chunks,
            new_bytes: self.new_bytes,
        })
    }
}

fn take_piece(
    store: &Store,
    pieces: &mut Vec<RecipePiece>,
    error: &mut Option<Error>,
    new_chunks: &mut u64,
    new_bytes: &mut u64,
    piece: Piece<'_>,
) {
    if error.is_some() {
        return;
    }
    match piece {
        Piece::Inline(bytes) => pieces.push(RecipePiece::Inline(bytes.to_vec())),
        Piece::Chunk(bytes) => {
            let id = ChunkId::of(bytes);
            match store.put_chunk_with_id(id, bytes) {
                Ok(new) => {
                    if new {
                        *new_chunks += 1;
                        *new_bytes += bytes.len() as u64;
                    }
                    pieces.push(RecipePiece::Chunk {
                        id,
                        len: bytes.len() as u32,
                    });
                }
                Err(e) => *error = Some(e),
            }
        }
    }
}

impl Store {
    /// Writes a whole blob from memory; convenience over [`BlobWriter`].
    pub fn put_blob(&self, data: &[u8], expected: Option<&Digest>) -> Result<Committed> {
        let algorithm = expected.map_or(Algorithm::Sha256, Digest::algorithm);
        let mut w = BlobWriter::new(self, algorithm, Mode::Auto);
        w.write(data)?;
        w.finish(expected)
    }

    /// A reader over a committed blob.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        let recipe = self.recipe(digest)?;
        let starts = recipe.starts();
        Ok(BlobReader {
            store: self.clone(),
            recipe,
            starts,
        })
    }

    /// Reads a whole blob into memory (for manifests and tests).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let r = self.open_blob(digest)?;
        let mut out = Vec::with_capacity(usize::try_from(r.size()).unwrap_or(0));
        for piece in r.range(0, r.size())? {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }
}

/// Reads a committed blob, whole or by byte range.
#[derive(Clone)]
pub struct BlobReader {
    store: Store,
    recipe: Arc<Recipe>,
    starts: Vec<u64>,
}

impl BlobReader {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.recipe.size
    }

    /// The blob's digest.
    pub fn digest(&self) -> &Digest {
        &self.recipe.digest
    }

    /// The blob's recipe.
    pub fn recipe(&self) -> &Arc<Recipe> {
        &self.recipe
    }

    /// The bytes `[start, end)` as a sequence of pieces (chunk slices, no copies where the
    /// chunk is stored raw in a sealed segment).
    pub fn range(&self, start: u64, end: u64) -> Result<RangeIter> {
        if start > end || end > self.size() {
            return Err(Error::invalid(
                "range",
                format!("{start}-{end} is outside a blob of {} bytes", self.size()),
            ));
        }
        // The piece containing `start`: the last piece whose start is <= start.
        let first = self
            .starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1);
        Ok(RangeIter {
            reader: self.clone(),
            piece: first,
            pos: start,
            end,
        })
    }
}

/// Iterator over the pieces of a byte range; see [`BlobReader::range`].
pub struct RangeIter {
    reader: BlobReader,
    piece: usize,
    pos: u64,
    end: u64,
}

impl Iterator for RangeIter {
    type Item = Result<Bytes>;
    fn next(&mut self) -> Option<Result<Bytes>> {
        while self.pos < self.end {
            let piece = self.reader.recipe.pieces.get(self.piece)?;
            let piece_start = *self.reader.starts.get(self.piece)?;
            let piece_end = piece_start + piece.len();
            self.piece += 1;
            if piece_end <= self.pos {
                continue;
            }
            let bytes = match piece {
                RecipePiece::Inline(b) => Bytes::copy_from_slice(b),
                RecipePiece::Chunk { id, len } => match self.reader.store.read_chunk(id) {
                    Ok(b) if b.len() == *len as usize => b,
                    Ok(_) => {
                        return Some(Err(Error::NotFound(format!(
                            "chunk {id} has another length than its recipe says"
                        ))))
                    }
                    Err(e) => return Some(Err(e)),
                },
            };
            let from = (self.pos - piece_start) as usize;
            let to = (self.end.min(piece_end) - piece_start) as usize;
            self.pos = piece_start + to as u64;
            return Some(Ok(bytes.slice(from..to)));
        }
        None
    }
}
