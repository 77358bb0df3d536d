//! Streaming blob writes and reads.
//!
//! [`BlobWriter`] takes bytes in any pieces. For a large blob the work runs as a pipeline of
//! three threads: the caller cuts chunks (CDC), a digest thread computes the OCI digest over
//! the whole stream, and a store thread hashes each chunk with BLAKE3, looks it up, compresses
//! and appends it. SHA-256 is the floor cost of an upload; everything else overlaps with it.
//! Memory stays bounded (bounded channels of chunk buffers) whatever the blob size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use std::sync::mpsc::{sync_channel as bounded, SyncSender as Sender};

use crate::chunker::{Mode, Piece, StreamChunker};
use crate::digest::{Algorithm, ChunkId, Digest, Hasher};
use crate::error::{Error, Input, Result};
use crate::readahead::{Prefetcher, ReadAhead, VerifyAhead, AHEAD_BYTES, AHEAD_MIN_BLOB};
use crate::recipe::{Recipe, RecipePiece};
use crate::store::Store;

/// Up to this many bytes a blob is written on the caller's thread alone; threads are not
/// worth starting for manifests and configs.
const INLINE_LEN_MAX: u64 = 1 << 20;
/// Pieces in flight to the store thread.
const PIECES_IN_FLIGHT: usize = 64;

enum DigestState {
    Inline(Hasher),
    Thread {
        tx: Sender<Bytes>,
        handle: JoinHandle<Digest>,
    },
    Taken,
}

/// A piece handed from the chunker to whoever stores it.
enum OwnedPiece {
    Inline(Vec<u8>),
    Chunk(Bytes),
    /// Not a piece: the store thread answers with the pieces from this index on, once every
    /// piece sent before is stored (or with the error that stopped it).
    Barrier(usize, Sender<Result<Vec<RecipePiece>>>),
}

/// What storing the pieces produced.
#[derive(Default)]
struct Stored {
    pieces: Vec<RecipePiece>,
    new_chunks: u64,
    new_bytes: u64,
    error: Option<Error>,
    /// New chunks in a row whose compression did not pay; past a few, only every
    /// `PROBE_EVERY`th chunk is tried (gzip and zstd layers never compress again).
    incompressible_run: u32,
    /// The writer's registration with the store (dedup hits stay alive until it commits).
    writer: Option<u64>,
}

/// Compression attempts in a row that must fail before attempts become sparse.
const INCOMPRESSIBLE_RUN_MIN: u32 = 8;
/// While attempts are sparse, one chunk in this many is tried.
const PROBE_EVERY: u32 = 16;

impl Stored {
    /// The pieces stored from index `from` on, or the error that stopped storing.
    fn since(&self, from: usize) -> Result<Vec<RecipePiece>> {
        match &self.error {
            Some(e) => Err(Error::Internal(format!("blob writer: storing failed: {e}"))),
            None => Ok(self.pieces.get(from..).unwrap_or_default().to_vec()),
        }
    }

    fn take(&mut self, store: &Store, piece: OwnedPiece) {
        if self.error.is_some() {
            return;
        }
        match piece {
            OwnedPiece::Barrier(..) => unreachable!("barriers are answered, not taken"),
            OwnedPiece::Inline(bytes) => self.pieces.push(RecipePiece::Inline(bytes)),
            OwnedPiece::Chunk(bytes) => {
                let id = ChunkId::of(&bytes);
                let run = self.incompressible_run;
                let try_compress = run < INCOMPRESSIBLE_RUN_MIN || run.is_multiple_of(PROBE_EVERY);
                match store.put_chunk_with_id(id, &bytes, try_compress, self.writer) {
                    Ok((new, paid)) => {
                        match paid {
                            Some(true) => self.incompressible_run = 0,
                            Some(false) => self.incompressible_run += 1,
                            None if new => self.incompressible_run += 1,
                            None => {}
                        }
                        if new {
                            self.new_chunks += 1;
                            self.new_bytes += bytes.len() as u64;
                        }
                        self.pieces.push(RecipePiece::Chunk {
                            id,
                            len: bytes.len() as u32,
                        });
                    }
                    Err(e) => self.error = Some(e),
                }
            }
        }
    }
}

enum ChunkSink {
    Inline(Stored),
    Thread {
        tx: Sender<OwnedPiece>,
        handle: JoinHandle<Stored>,
        failed: Arc<AtomicBool>,
    },
    Taken,
}

impl ChunkSink {
    fn send(&mut self, store: &Store, piece: OwnedPiece) {
        match self {
            ChunkSink::Inline(stored) => stored.take(store, piece),
            ChunkSink::Thread { tx, .. } => {
                // A send fails only when the thread is gone; `finish` reports why.
                let _ = tx.send(piece);
            }
            ChunkSink::Taken => {}
        }
    }

    fn failed(&self) -> bool {
        match self {
            ChunkSink::Inline(stored) => stored.error.is_some(),
            ChunkSink::Thread { failed, .. } => failed.load(Ordering::Relaxed),
            ChunkSink::Taken => true,
        }
    }

    /// Waits until every piece sent so far is stored; returns those from index `from` on.
    fn settle(&mut self, from: usize) -> Result<Vec<RecipePiece>> {
        match self {
            ChunkSink::Inline(stored) => stored.since(from),
            ChunkSink::Thread { tx, .. } => {
                let (reply_tx, reply_rx) = bounded(1);
                tx.send(OwnedPiece::Barrier(from, reply_tx))
                    .map_err(|_| thread_error("store thread stopped"))?;
                reply_rx
                    .recv()
                    .map_err(|_| thread_error("store thread stopped"))?
            }
            ChunkSink::Taken => Err(Error::Internal("blob writer used after it finished".into())),
        }
    }

    fn into_stored(self) -> Result<Stored> {
        match self {
            ChunkSink::Inline(stored) => Ok(stored),
            ChunkSink::Thread { tx, handle, .. } => {
                drop(tx);
                handle
                    .join()
                    .map_err(|_| thread_error("store thread panicked"))
            }
            ChunkSink::Taken => Err(Error::Internal("blob writer used after it finished".into())),
        }
    }
}

fn thread_error(why: &str) -> Error {
    Error::Internal(format!("blob writer: {why}"))
}

/// A writer's registration with its store, ended when the writer goes (committed or not).
struct WriteLease {
    store: Store,
    id: u64,
}

impl Drop for WriteLease {
    fn drop(&mut self) {
        self.store.end_write(self.id);
    }
}

/// A blob being written. Nothing becomes visible until [`BlobWriter::finish`] succeeds.
pub struct BlobWriter {
    store: Store,
    // Dropped after the commit in `finish` (fields drop after the body), when the blob's own
    // lease already protects its chunks.
    _lease: WriteLease,
    chunker: StreamChunker,
    size: u64,
    digest: DigestState,
    sink: ChunkSink,
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
        let id = store.begin_write();
        BlobWriter {
            store: store.clone(),
            _lease: WriteLease {
                store: store.clone(),
                id,
            },
            chunker: StreamChunker::new(mode),
            size: 0,
            digest: DigestState::Inline(algorithm.hasher()),
            sink: ChunkSink::Inline(Stored {
                writer: Some(id),
                ..Stored::default()
            }),
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
        self.write_inner(data, None)
    }

    /// Appends bytes the caller owns as [`Bytes`]: the digest and store threads share them
    /// instead of copying.
    pub fn write_bytes(&mut self, data: Bytes) -> Result<()> {
        self.write_inner(&data, Some(&data))
    }

    fn write_inner(&mut self, data: &[u8], owned: Option<&Bytes>) -> Result<()> {
        if self.sink.failed() {
            // Stop early; the error itself comes out of the sink.
            let sink = std::mem::replace(&mut self.sink, ChunkSink::Taken);
            return Err(sink
                .into_stored()?
                .error
                .unwrap_or_else(|| thread_error("store failed")));
        }
        self.size += data.len() as u64;
        if self.size > INLINE_LEN_MAX {
            self.start_threads()?;
        }
        self.feed_digest(data, owned)?;
        let Self {
            chunker,
            store,
            sink,
            ..
        } = self;
        chunker.push(data, &mut |p| sink.send(store, own(p, owned)));
        Ok(())
    }

    /// Moves digest and chunk storing to threads of their own (large blobs only).
    fn start_threads(&mut self) -> Result<()> {
        if let DigestState::Inline(_) = self.digest {
            let DigestState::Inline(mut h) =
                std::mem::replace(&mut self.digest, DigestState::Taken)
            else {
                unreachable!("checked above")
            };
            let (tx, rx) = bounded::<Bytes>(16);
            let handle = std::thread::Builder::new()
                .name("ballast-digest".into())
                .spawn(move || {
                    for buf in rx {
                        h.update(&buf);
                    }
                    h.finish()
                })
                .map_err(|e| Error::Internal(format!("starting the digest thread: {e}")))?;
            self.digest = DigestState::Thread { tx, handle };
        }
        if let ChunkSink::Inline(_) = self.sink {
            let ChunkSink::Inline(mut stored) = std::mem::replace(&mut self.sink, ChunkSink::Taken)
            else {
                unreachable!("checked above")
            };
            let (tx, rx) = bounded::<OwnedPiece>(PIECES_IN_FLIGHT);
            let failed = Arc::new(AtomicBool::new(stored.error.is_some()));
            let (store, flag) = (self.store.clone(), failed.clone());
            let handle = std::thread::Builder::new()
                .name("ballast-store".into())
                .spawn(move || {
                    for piece in rx {
                        if let OwnedPiece::Barrier(from, reply) = piece {
                            let _ = reply.send(stored.since(from));
                            continue;
                        }
                        stored.take(&store, piece);
                        if stored.error.is_some() {
                            flag.store(true, Ordering::Relaxed);
                        }
                    }
                    stored
                })
                .map_err(|e| Error::Internal(format!("starting the store thread: {e}")))?;
            self.sink = ChunkSink::Thread { tx, handle, failed };
        }
        Ok(())
    }

    fn feed_digest(&mut self, data: &[u8], owned: Option<&Bytes>) -> Result<()> {
        match &mut self.digest {
            DigestState::Inline(h) => h.update(data),
            DigestState::Thread { tx, .. } => {
                let buf = owned
                    .cloned()
                    .unwrap_or_else(|| Bytes::copy_from_slice(data));
                tx.send(buf)
                    .map_err(|_| thread_error("digest thread stopped"))?;
            }
            DigestState::Taken => {
                return Err(Error::Internal("blob writer used after it finished".into()))
            }
        }
        Ok(())
    }

    fn take_digest(&mut self) -> Result<Digest> {
        match std::mem::replace(&mut self.digest, DigestState::Taken) {
            DigestState::Inline(h) => Ok(h.finish()),
            DigestState::Thread { tx, handle } => {
                drop(tx);
                handle
                    .join()
                    .map_err(|_| thread_error("digest thread panicked"))
            }
            DigestState::Taken => Err(Error::Internal("blob writer used after it finished".into())),
        }
    }

    /// Waits until every chunk decided so far is stored (appended to the store, not yet
    /// durable: the caller syncs), and returns the pieces from index `from` on and the bytes
    /// not yet cut into pieces. Those pieces and bytes are the whole stream written so far:
    /// a new writer fed the same bytes is in this one's state (upload sessions resume so).
    pub(crate) fn settle(&mut self, from: usize) -> Result<(Vec<RecipePiece>, &[u8])> {
        let pieces = self.sink.settle(from)?;
        Ok((pieces, self.chunker.pending()))
    }

    /// Finishes the blob. With `expected`, a different computed digest fails with
    /// [`Error::DigestMismatch`] and nothing becomes visible. On success the blob is durable.
    pub fn finish(mut self, expected: Option<&Digest>) -> Result<Committed> {
        {
            let Self {
                chunker,
                store,
                sink,
                ..
            } = &mut self;
            chunker.finish(&mut |p| sink.send(store, own(p, None)));
        }
        let sink = std::mem::replace(&mut self.sink, ChunkSink::Taken);
        let stored = sink.into_stored();
        let digest = self.take_digest()?;
        let stored = stored?;
        if let Some(e) = stored.error {
            return Err(e);
        }
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
            pieces: stored.pieces,
        };
        let recipe = self.store.commit_recipe(recipe)?;
        Ok(Committed {
            recipe,
            new_chunks: stored.new_chunks,
            new_bytes: stored.new_bytes,
        })
    }
}

/// Turns a chunker piece into an owned one: a slice of the caller's [`Bytes`] when it lies
/// inside them (no copy), a copy otherwise (pieces that straddle two writes).
fn own(piece: Piece<'_>, owned: Option<&Bytes>) -> OwnedPiece {
    match piece {
        Piece::Inline(b) => OwnedPiece::Inline(b.to_vec()),
        Piece::Chunk(b) => {
            let inside = owned.filter(|o| {
                let (start, end) = (o.as_ptr() as usize, o.as_ptr() as usize + o.len());
                let p = b.as_ptr() as usize;
                p >= start && p + b.len() <= end
            });
            OwnedPiece::Chunk(match inside {
                Some(o) => o.slice_ref(b),
                None => Bytes::copy_from_slice(b),
            })
        }
    }
}

/// A blob pushed whole with its digest named up front: when the store holds that blob
/// already, its bytes are only hashed (a dedup hit writes nothing); otherwise they are
/// stored as by a [`BlobWriter`].
pub enum Ingest {
    /// The blob is stored: check the bytes against the digest.
    Known(Box<Hasher>, Digest),
    /// Store the bytes.
    New(Box<BlobWriter>, Digest),
}

impl Ingest {
    /// Takes the next bytes.
    pub fn write(&mut self, data: Bytes) -> Result<()> {
        match self {
            Ingest::Known(h, _) => {
                h.update(&data);
                Ok(())
            }
            Ingest::New(w, _) => w.write_bytes(data),
        }
    }

    /// Ends the push: the blob is durable when the bytes match the digest
    /// ([`Error::DigestMismatch`] otherwise, and nothing becomes visible).
    pub fn finish(self) -> Result<()> {
        match self {
            Ingest::Known(h, expected) => {
                let actual = h.finish();
                if actual == expected {
                    Ok(())
                } else {
                    Err(Error::DigestMismatch {
                        expected: expected.to_string(),
                        actual: actual.to_string(),
                    })
                }
            }
            Ingest::New(w, expected) => w.finish(Some(&expected)).map(drop),
        }
    }
}

impl Store {
    /// Starts a push of the blob `expected` (see [`Ingest`]).
    pub fn ingest(&self, expected: &Digest) -> Ingest {
        if self.contains(expected) {
            Ingest::Known(Box::new(expected.algorithm().hasher()), expected.clone())
        } else {
            Ingest::New(
                Box::new(BlobWriter::new(self, expected.algorithm(), Mode::Auto)),
                expected.clone(),
            )
        }
    }

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
    /// When the blob's chunks lie in segments kept remotely, fetches the first of them not
    /// held locally: a remote store that does not answer is found out before a caller
    /// starts sending the blob (`Error::Unavailable`), not in the middle of it.
    pub fn ensure_reachable(&self) -> Result<()> {
        if !self.store.has_remote() {
            return Ok(());
        }
        // The blob's extent in each remote segment is asked for at once (one streamed
        // request each, as far as the cache can hold), then its first missing record read.
        let mut extents: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        let mut first = None;
        for piece in &self.recipe.pieces {
            if let crate::recipe::RecipePiece::Chunk { id, .. } = piece {
                if let Some(loc) = self.store.chunk_location(id) {
                    if self.store.remote_needs_fetch(&loc) {
                        let end = loc.offset
                            + crate::segment::RECORD_HEADER_LEN as u64
                            + u64::from(loc.len);
                        let e = extents.entry(loc.segment).or_insert((loc.offset, end));
                        *e = (e.0.min(loc.offset), e.1.max(end));
                        first.get_or_insert(loc);
                    }
                }
            }
        }
        for (segment, (start, end)) in extents {
            self.store.prefetch_remote(
                segment,
                start,
                usize::try_from(end - start).unwrap_or(usize::MAX),
            );
        }
        match first {
            Some(loc) => self.store.read_record(&loc).map(drop),
            None => Ok(()),
        }
    }

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
                Input::Range,
                format!("{start}-{end} is outside a blob of {} bytes", self.size()),
            ));
        }
        // The piece containing `start`: the last piece whose start is <= start.
        let first = self
            .starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1);
        let mode = self.store.inner.opts.read_ahead;
        let big = end - start >= AHEAD_MIN_BLOB;
        let ahead = (mode != ReadAhead::Off && big)
            .then(|| Prefetcher::new(mode, crate::readahead::BLOB_REACH));
        let verifier = if big && mode != ReadAhead::Off {
            VerifyAhead::start(&self.store)
        } else {
            None
        };
        Ok(RangeIter {
            reader: self.clone(),
            piece: first,
            pos: start,
            end,
            ahead,
            verifier,
            planned: first,
        })
    }
}

/// Iterator over the pieces of a byte range; see [`BlobReader::range`].
pub struct RangeIter {
    reader: BlobReader,
    piece: usize,
    pos: u64,
    end: u64,
    /// What was asked for ahead of the position (none for small ranges or with read-ahead
    /// off), and the first piece not asked for yet.
    ahead: Option<Prefetcher>,
    verifier: Option<VerifyAhead>,
    planned: usize,
}

impl RangeIter {
    /// Keeps the pieces up to [`AHEAD_BYTES`] past the position asked for, in steps of half
    /// that, so the reads ahead are few and large.
    fn read_ahead(&mut self) {
        let Some(ahead) = self.ahead.as_mut() else {
            return;
        };
        let r = &self.reader;
        let planned_to = r.starts.get(self.planned).copied().unwrap_or(u64::MAX);
        if planned_to >= self.end || planned_to >= self.pos + AHEAD_BYTES / 2 {
            return;
        }
        let horizon = (self.pos + AHEAD_BYTES).min(self.end);
        let mut locs = Vec::new();
        let mut ids = Vec::new();
        while let (Some(piece), Some(&start)) = (
            r.recipe.pieces.get(self.planned),
            r.starts.get(self.planned),
        ) {
            if start >= horizon {
                break;
            }
            if let RecipePiece::Chunk { id, .. } = piece {
                if let Some(loc) = r.store.chunk_location(id) {
                    locs.push(loc);
                    ids.push(*id);
                }
            }
            self.planned += 1;
        }
        ahead.ask(&r.store, ids.iter().map(|id| id.0), &locs);
        if let Some(v) = &self.verifier {
            v.ask(ids);
        }
    }

    fn chunk(&mut self, id: &ChunkId) -> Result<Bytes> {
        let store = &self.reader.store;
        if let Some((loc, record)) = self.ahead.as_mut().and_then(|a| a.take(&id.0)) {
            if let Ok(b) = store.read_chunk_fetched(id, &loc, &record) {
                return Ok(b);
            }
        }
        store.read_chunk(id)
    }
}

impl Iterator for RangeIter {
    type Item = Result<Bytes>;
    fn next(&mut self) -> Option<Result<Bytes>> {
        while self.pos < self.end {
            self.read_ahead();
            let recipe = self.reader.recipe.clone();
            let piece = recipe.pieces.get(self.piece)?;
            let piece_start = *self.reader.starts.get(self.piece)?;
            let piece_end = piece_start + piece.len();
            self.piece += 1;
            if piece_end <= self.pos {
                continue;
            }
            let bytes = match piece {
                RecipePiece::Inline(b) => Bytes::copy_from_slice(b),
                RecipePiece::Chunk { id, len } => match self.chunk(id) {
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
