//! Appending to an upload session and finishing it, and the warm writers kept between
//! appends.
//!
//! An append feeds a [`BlobWriter`]: chunks are cut, stored and deduplicated as the bytes
//! arrive. Its checkpoint waits for the writer's store thread, syncs the segments, then
//! appends one record to the session log (the pieces cut since the last checkpoint and the
//! change to the uncut tail) and syncs it: then the append is acknowledged. Between appends
//! the writer stays warm in memory; a session that is not warm (after a restart, or let go)
//! is replayed: its chunks are read back and fed to a new writer, which ends in the same
//! state because cuts do not depend on how the bytes arrived.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::log::{self, Checkpoint};
use super::{unknown, Uploads};
use crate::blob::{BlobWriter, Committed};
use crate::chunker::Mode;
use crate::digest::{Algorithm, Digest};
use crate::error::{Error, Input, Result};
use crate::io::{FileHandle, OpenMode};
use crate::recipe::RecipePiece;
use crate::segment::{FILE_HEADER_LEN, RECORD_HEADER_LEN, RECORD_PAYLOAD_MAX};

/// Most sessions kept warm at once (each holds up to two threads and a chunk buffer).
const WARM_MAX: usize = 32;
/// A warm writer unused this long is let go (its session stays, on disk).
const WARM_IDLE: Duration = Duration::from_secs(600);
/// Bytes read at a time from an older version's spool file.
const LEGACY_READ_LEN: usize = 1 << 20;

pub(crate) enum Slot {
    /// An append or finish runs.
    Busy,
    /// Kept between appends.
    Warm(Box<Session>),
}

/// A session in memory: its writer is in step with its log.
pub(crate) struct Session {
    id: String,
    writer: BlobWriter,
    algorithm: Algorithm,
    /// Bytes the log holds (acknowledged).
    len: u64,
    /// Pieces the log holds.
    pieces: usize,
    /// Uncut bytes the log holds.
    tail_len: usize,
    log: FileHandle,
    log_len: u64,
    parked: Instant,
}

/// An append to a session, or its finish: see [`Uploads::writer`]. Dropped without
/// [`UploadWriter::checkpoint`], what was written since the last checkpoint is not kept.
pub struct UploadWriter {
    uploads: Uploads,
    id: String,
    session: Option<Box<Session>>,
    /// Bytes were written since the last checkpoint.
    dirty: bool,
    /// Bytes the other open sessions held when this writer first wrote (for the bound on
    /// all sessions' bytes; read once, not per write).
    others: Option<u64>,
}

impl Uploads {
    /// Takes a session to append at `offset`, which must be its length (else
    /// `InvalidInput` of kind `UploadOffset`). `algorithm` is what the upload will be
    /// finished with (SHA-256 unless the finishing request says otherwise). One writer per
    /// session at a time: while one is out, another fails with `Busy`.
    pub fn writer(&self, id: &str, offset: u64, algorithm: Algorithm) -> Result<UploadWriter> {
        super::validate_id(id)?;
        let taken = {
            let mut slots = self.slots.lock();
            match slots.insert(id.to_owned(), Slot::Busy) {
                Some(Slot::Busy) => {
                    return Err(Error::Busy(format!(
                        "upload {id} is taking another request's bytes; retry when it ends"
                    )))
                }
                Some(Slot::Warm(s)) => Some(s),
                None => None,
            }
        };
        // From here the writer releases the slot when dropped, whatever happens.
        let mut w = UploadWriter {
            uploads: self.clone(),
            id: id.to_owned(),
            session: None,
            dirty: false,
            others: None,
        };
        // A warm session exists (ending one forgets its writer); a cold one is known by its
        // meta file, read only then.
        let session = match taken {
            Some(s) if s.algorithm == algorithm => s,
            _ => {
                self.meta(id)?;
                self.load(id, algorithm)?
            }
        };
        let len = session.len;
        w.session = Some(session);
        if len != offset {
            return Err(Error::invalid(
                Input::UploadOffset,
                format!("the upload has {len} bytes, not {offset}"),
            ));
        }
        Ok(w)
    }

    /// The length of a warm session.
    pub(super) fn warm_len(&self, id: &str) -> Option<u64> {
        match self.slots.lock().get(id) {
            Some(Slot::Warm(s)) => Some(s.len),
            _ => None,
        }
    }

    /// Forgets a session's writer (it ended); a writer out now is not kept when it returns.
    pub(super) fn forget(&self, id: &str) {
        // Dropped after the lock is released: a writer's drop joins its threads.
        let _gone = self.slots.lock().remove(id);
    }

    /// Lets go of warm writers unused for long.
    pub(super) fn cool_idle(&self) {
        let _gone: Vec<_> = self
            .slots
            .lock()
            .extract_if(|_, slot| matches!(slot, Slot::Warm(s) if s.parked.elapsed() >= WARM_IDLE))
            .collect();
    }

    /// Ids of the sessions kept warm.
    pub fn warm_ids(&self) -> Vec<String> {
        let slots = self.slots.lock();
        slots
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Warm(_)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A session from its files: replayed from its log, or turned into one from an older
    /// version's spool.
    fn load(&self, id: &str, algorithm: Algorithm) -> Result<Box<Session>> {
        let storage = self.storage_ref();
        let legacy = self.path(id, "data");
        if let Ok(data) = FileHandle::open(storage, &legacy, OpenMode::Read) {
            return self.convert(id, &data, algorithm);
        }
        let log = FileHandle::open(storage, &self.path(id, "log"), OpenMode::ReadWrite)
            .map_err(|_| unknown(id))?;
        let r = log::replay(&log)?;
        let mut writer = BlobWriter::new(&self.store, algorithm, Mode::Auto);
        for piece in &r.pieces {
            match piece {
                RecipePiece::Inline(bytes) => writer.write(bytes)?,
                RecipePiece::Chunk { id: chunk, len } => {
                    let bytes = self.store.read_chunk(chunk)?;
                    if bytes.len() != *len as usize {
                        return Err(Error::corrupted(
                            log.path(),
                            0,
                            format!("upload log: chunk {chunk} is not {len} bytes long"),
                        ));
                    }
                    writer.write_bytes(bytes)?;
                }
            }
        }
        writer.write(&r.tail)?;
        let (pieces, pending) = writer.settle(0)?;
        if pieces != r.pieces || pending != r.tail.as_slice() {
            return Err(Error::corrupted(
                log.path(),
                0,
                "upload log: its bytes do not cut into the pieces it lists",
            ));
        }
        Ok(Box::new(Session {
            id: id.to_owned(),
            writer,
            algorithm,
            len: r.len,
            pieces: r.pieces.len(),
            tail_len: r.tail.len(),
            log,
            log_len: r.valid_end,
            parked: Instant::now(),
        }))
    }

    /// Turns an older version's session (its bytes spooled whole in `.data`) into a log: the
    /// spool is cut into chunks and checkpointed, then removed. A crash before the removal
    /// does it again next time (the spool is what counts while it exists).
    fn convert(&self, id: &str, data: &FileHandle, algorithm: Algorithm) -> Result<Box<Session>> {
        let storage = self.storage_ref();
        let log = FileHandle::open(storage, &self.path(id, "log"), OpenMode::Truncate)?;
        log.write_all_at(&log::header(), 0)?;
        let mut session = Box::new(Session {
            id: id.to_owned(),
            writer: BlobWriter::new(&self.store, algorithm, Mode::Auto),
            algorithm,
            len: 0,
            pieces: 0,
            tail_len: 0,
            log,
            log_len: FILE_HEADER_LEN as u64,
            parked: Instant::now(),
        });
        let len = data.len()?;
        let mut at = 0;
        while at < len {
            let n = LEGACY_READ_LEN.min((len - at) as usize);
            let mut buf = vec![0u8; n];
            data.read_exact_at(&mut buf, at)?;
            session.writer.write_bytes(Bytes::from(buf))?;
            at += n as u64;
        }
        self.checkpoint(&mut session)?;
        let path = self.path(id, "data");
        storage.remove(&path).map_err(|e| Error::io(&path, e))?;
        storage
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?;
        Ok(session)
    }

    /// Makes what the session's writer took durable and records it in the log.
    fn checkpoint(&self, s: &mut Session) -> Result<u64> {
        let len = s.writer.len();
        let (pieces, tail) = s.writer.settle(s.pieces)?;
        // The chunks first: the log must never name a chunk that a crash could take back.
        self.store.sync_appended()?;
        let added: u64 = pieces.iter().map(RecipePiece::len).sum();
        let dropped = added.min(s.tail_len as u64) as usize;
        let kept = s.tail_len - dropped;
        assert!(kept <= tail.len(), "the uncut tail only grows at its end");
        let record = Checkpoint {
            len,
            tail_drop: dropped as u32,
            pieces: &pieces,
            tail_append: &tail[kept..],
        }
        .encode();
        if record.len() - RECORD_HEADER_LEN > RECORD_PAYLOAD_MAX {
            return Err(Error::LimitExceeded(format!(
                "an upload append of {} bytes cuts into more pieces than one log record holds; \
                 send it in smaller requests",
                len - s.len
            )));
        }
        let tail_len = tail.len();
        s.log.write_all_at(&record, s.log_len)?;
        s.log.sync()?;
        s.log_len += record.len() as u64;
        s.pieces += pieces.len();
        s.tail_len = tail_len;
        s.len = len;
        self.with_usage(|u| u.set_len(&s.id, len))?;
        Ok(len)
    }
}

impl UploadWriter {
    fn session(&mut self) -> Result<&mut Session> {
        self.session
            .as_deref_mut()
            .ok_or_else(|| Error::Internal("upload writer used after a failure".into()))
    }

    /// The session's length with what this writer took.
    pub fn len(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.writer.len())
    }

    /// True when the session holds no bytes yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends bytes (cut, stored and deduplicated as they come; durable at the checkpoint).
    /// Bytes past a bound on session bytes fail with [`Error::Throttled`]: the append is
    /// not kept (the session stays as its last checkpoint left it).
    pub fn write(&mut self, data: Bytes) -> Result<()> {
        self.dirty = true;
        let len = self.len() + data.len() as u64;
        let limits = self.uploads.limits();
        if limits.session_bytes_max > 0 && len > limits.session_bytes_max {
            return Err(Error::Throttled(format!(
                "upload {} would hold {len} bytes, more than one upload session may \
                 (upload_session_bytes_max = {})",
                self.id, limits.session_bytes_max
            )));
        }
        if limits.bytes_max > 0 {
            let others = match self.others {
                Some(n) => n,
                None => {
                    let n = self.uploads.with_usage(|u| u.bytes_besides(&self.id))?;
                    *self.others.insert(n)
                }
            };
            if others + len > limits.bytes_max {
                return Err(Error::Throttled(format!(
                    "open upload sessions would hold {} bytes, more than this registry keeps \
                     (upload_bytes_max = {}); retry once some finish",
                    others + len,
                    limits.bytes_max
                )));
            }
        }
        let result = self.session()?.writer.write_bytes(data);
        if result.is_err() {
            // The writer's state is unknown: the log's last checkpoint is what counts.
            self.session = None;
        }
        result
    }

    /// Makes everything written durable and part of the session; returns its length.
    pub fn checkpoint(mut self) -> Result<u64> {
        let mut session = self
            .session
            .take()
            .ok_or_else(|| Error::Internal("upload writer used after a failure".into()))?;
        // On failure the session is replayed from its log next time (a torn record there
        // is not believed).
        let len = self.uploads.checkpoint(&mut session)?;
        self.session = Some(session);
        self.dirty = false;
        Ok(len)
    }

    /// Finishes the upload: the blob is committed (durable) when its digest is `expected`.
    /// The session stays until [`Uploads::end`]: end it once the blob is linked, so a crash in
    /// between leaves a session the client can finish again.
    pub fn finish(mut self, expected: &Digest) -> Result<Committed> {
        let session = self
            .session
            .take()
            .ok_or_else(|| Error::Internal("upload writer used after a failure".into()))?;
        session.writer.finish(Some(expected))
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        // A session not kept is dropped after the lock is released (its writer's drop joins
        // threads).
        let mut session = self.session.take().filter(|_| !self.dirty);
        let mut slots = self.uploads.slots.lock();
        if !matches!(slots.get(&self.id), Some(Slot::Busy)) {
            // Ended (or expired) while out: nothing to keep.
            return;
        }
        let warm = slots
            .values()
            .filter(|s| matches!(s, Slot::Warm(_)))
            .count();
        match session.take() {
            Some(mut s) if warm < WARM_MAX => {
                s.parked = Instant::now();
                slots.insert(self.id.clone(), Slot::Warm(s));
            }
            other => {
                slots.remove(&self.id);
                drop(slots);
                drop(other);
            }
        }
    }
}
