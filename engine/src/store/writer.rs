//! The active segment: records are staged and written about 1 MiB at a time, the segment
//! rolls (is sealed, mapped and indexed) at its size limit, and commits share fsyncs
//! (group commit) before a sync mark records how far the segment is durable.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::digest::ChunkId;
use crate::error::{Error, Result};
use crate::index::{Location, Table};
use crate::io::{create_with_header, FileHandle, Storage, WritebackHints};
use crate::recipe::Recipe;
use crate::segment::{
    self, record_header, RecordKind, FILE_HEADER_LEN, FLAG_ZSTD, RECORD_HEADER_LEN, SEGMENT_MAGIC,
};

use super::*;

pub(crate) struct Active {
    pub(crate) id: u64,
    pub(crate) file: FileHandle,
    /// Logical length: what is in the file plus what is staged.
    pub(crate) len: u64,
    pub(crate) hints: WritebackHints,
    /// Appended records not yet written to the file: appends are gathered and written about
    /// 1 MiB at a time (the kernel's page-cache write costs about half as much per byte for
    /// 1 MiB writes as for one write per 64 KiB chunk).
    pub(crate) staged: Vec<u8>,
    /// Bytes of the file written so far.
    pub(crate) flushed: u64,
    /// The catalog position last recorded in this segment (a CatalogDurable record).
    pub(crate) catalog_recorded: (u64, u64),
    /// The segment's format (a segment of format 1, still being appended to after an
    /// upgrade, gets no record kinds of format 2).
    pub(crate) format: u16,
}

/// Staged appends are written once they reach this size (and before every sync, seal, and
/// read of a staged record).
const STAGED_BYTES_MAX: usize = 1 << 20;

impl Active {
    /// The writer's invariants (cheap, checked on every flush: an assertion is a test that
    /// runs in production): what is in the file plus what is staged is the segment's length,
    /// and staging never holds more than a flush's worth plus one record.
    pub(crate) fn check(&self) {
        assert_eq!(
            self.flushed + self.staged.len() as u64,
            self.len,
            "segment {}: staged + flushed must be its length",
            self.id
        );
        assert!(
            self.flushed >= FILE_HEADER_LEN as u64,
            "segment {}: header",
            self.id
        );
    }
}

thread_local! {
    // Compression contexts are costly to set up; each writing thread keeps its own.
    static PROBER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

fn compress_if_worth(data: &[u8], level: i32) -> Option<Vec<u8>> {
    const PROBE: usize = 4096;
    if data.len() < 512 {
        return None;
    }
    // A cheap probe first: compressed and encrypted data is stored raw without paying for a
    // full compression attempt.
    if data.len() > 2 * PROBE {
        let probe = PROBER.with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = zstd::bulk::Compressor::new(1).ok();
            }
            c.as_mut().and_then(|z| z.compress(&data[..PROBE]).ok())
        })?;
        if probe.len() * 10 > PROBE * 9 {
            return None;
        }
    }
    let c = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = zstd::bulk::Compressor::new(level).ok().map(|z| (level, z));
        }
        c.as_mut().and_then(|(_, z)| z.compress(data).ok())
    })?;
    (c.len() * 10 <= data.len() * 9).then_some(c)
}

/// True when the record at `loc` is still staged, given the active segment's id and how
/// much of it is in the file.
pub(crate) fn is_staged(loc: &Location, active: u64, written: u64) -> bool {
    loc.segment == active && loc.offset + RECORD_HEADER_LEN as u64 + u64::from(loc.len) > written
}

pub(crate) fn create_segment(storage: &dyn Storage, seg_dir: &Path, id: u64) -> Result<Active> {
    let name = segment::segment_file_name(id);
    let file = create_with_header(
        storage,
        seg_dir,
        &name,
        &segment::file_header_versioned(SEGMENT_MAGIC, segment::SEGMENT_FORMAT),
    )?;
    Ok(Active {
        id,
        file,
        len: FILE_HEADER_LEN as u64,
        hints: WritebackHints::default(),
        staged: Vec::new(),
        flushed: FILE_HEADER_LEN as u64,
        catalog_recorded: (0, 0),
        format: segment::SEGMENT_FORMAT,
    })
}

impl Store {
    /// Stores a chunk unless it is already stored. Returns its id and whether it was new.
    /// The chunk is durable once a later commit's sync covers it.
    pub fn put_chunk(&self, data: &[u8]) -> Result<(ChunkId, bool)> {
        let id = ChunkId::of(data);
        self.put_chunk_with_id(id, data, true, None)
            .map(|(new, _)| (id, new))
    }

    /// [`Store::put_chunk`] with a known id. `try_compress` false skips the compression
    /// attempt. Returns whether the chunk was new and, when a compression attempt was made,
    /// whether it paid.
    pub(crate) fn put_chunk_with_id(
        &self,
        id: ChunkId,
        data: &[u8],
        try_compress: bool,
        writer: Option<u64>,
    ) -> Result<(bool, Option<bool>)> {
        self.check_poisoned()?;
        if let Some(loc) = self.chunk_location(&id) {
            if self.pin_chunk(&id, loc.segment, writer) {
                self.inner
                    .stats
                    .chunks_deduped
                    .fetch_add(1, Ordering::Relaxed);
                return Ok((false, None));
            }
        }
        // New data: refused below the free-space floor (before anything is appended, so
        // the store stays healthy and cleanup keeps its room).
        self.check_room(data.len() as u64)?;
        let raw_len = u32::try_from(data.len())
            .map_err(|_| Error::LimitExceeded("chunk larger than 4 GiB".into()))?;
        let attempt = self.inner.opts.compress && try_compress;
        let compressed = if attempt {
            compress_if_worth(data, self.inner.opts.zstd_level)
        } else {
            None
        };
        let (flags, body): (u8, &[u8]) = match &compressed {
            Some(c) => (FLAG_ZSTD, c),
            None => (0, data),
        };
        let prefix = segment::chunk_prefix(&id, raw_len);
        let mut w = self.inner.writer.lock();
        // Another writer may have stored it meanwhile; appends are serialized by this lock.
        if self.inner.delta.read().chunks.contains_key(&id) {
            self.inner
                .stats
                .chunks_deduped
                .fetch_add(1, Ordering::Relaxed);
            return Ok((false, None));
        }
        let loc =
            self.append_locked(&mut w, RecordKind::Chunk, flags, &[&prefix, body], raw_len)?;
        self.inner.delta.write().chunks.insert(id, loc);
        self.inner.pending.lock().queue(Table::Chunks, id.0, loc);
        self.inner
            .stats
            .chunks_written
            .fetch_add(1, Ordering::Relaxed);
        Ok((true, attempt.then_some(compressed.is_some())))
    }

    /// Appends one record to the active segment, rolling to a new segment first when it would
    /// overflow. Caller holds the writer lock.
    pub(crate) fn append_locked(
        &self,
        w: &mut Active,
        kind: RecordKind,
        flags: u8,
        parts: &[&[u8]],
        aux: u32,
    ) -> Result<Location> {
        self.check_poisoned()?;
        self.check_writable()?;
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let rec_len = (RECORD_HEADER_LEN + payload_len) as u64;
        if w.len > FILE_HEADER_LEN as u64 && w.len + rec_len > self.inner.opts.segment_bytes_max {
            self.roll_locked(w)?;
        }
        // The record is staged; staged records go to the file together (flush_locked).
        let offset = w.len;
        debug_assert_eq!(w.flushed + w.staged.len() as u64, w.len);
        let header = record_header(kind, flags, parts);
        w.staged.extend_from_slice(&header);
        for part in parts {
            w.staged.extend_from_slice(part);
        }
        w.len += rec_len;
        if w.staged.len() >= STAGED_BYTES_MAX {
            self.flush_locked(w)?;
        }
        self.inner
            .stats
            .bytes_appended
            .fetch_add(rec_len, Ordering::Relaxed);
        Ok(Location {
            segment: w.id,
            offset,
            len: payload_len as u32,
            aux,
        })
    }

    /// Seals the active segment now when it holds any record, so everything written so far
    /// is in sealed segments (which a collection may compact). For benchmarks and tests.
    pub fn seal_active(&self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.inner.writer.lock();
        if w.len > FILE_HEADER_LEN as u64 {
            self.roll_locked(&mut w)?;
        }
        Ok(())
    }

    /// Writes the staged records to the file. A failure poisons the store: the staged
    /// records were already handed out as locations, so nothing after them can be trusted
    /// (the file is cut back to what was written before).
    pub(crate) fn flush_locked(&self, w: &mut Active) -> Result<()> {
        w.check();
        if w.staged.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        if let Err(e) = w.file.write_all_at(&w.staged, w.flushed) {
            let _ = w.file.set_len(w.flushed);
            w.staged.clear();
            return Err(self.poison(&e));
        }
        w.flushed += w.staged.len() as u64;
        w.staged.clear();
        assert_eq!(w.flushed, w.len, "a flush writes every staged byte");
        let end = w.flushed;
        w.file.appended(&mut w.hints, end);
        *self.inner.written.lock() = (w.id, end);
        Ok(())
    }

    /// Before reading the record at `loc` from a file: writes the staged records when the
    /// record is among them.
    pub(super) fn flush_for_read(&self, loc: &Location) -> Result<()> {
        let (active, written) = *self.inner.written.lock();
        if is_staged(loc, active, written) {
            let mut w = self.inner.writer.lock();
            self.flush_locked(&mut w)?;
        }
        Ok(())
    }

    /// [`Store::read_record`] for a caller that holds the writer lock (the read path would
    /// wait for it to write a staged record): a staged record is written here first.
    pub(crate) fn read_record_locked(&self, w: &mut Active, loc: &Location) -> Result<(u8, Bytes)> {
        if is_staged(loc, w.id, w.flushed) {
            self.flush_locked(w)?;
        }
        self.read_record(loc)
    }

    /// Seals the active segment (fsync, map, index file) and starts the next one.
    pub(super) fn roll_locked(&self, w: &mut Active) -> Result<()> {
        self.flush_locked(w)?;
        w.file.sync().map_err(|e| self.poison(&e))?;
        self.inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let next = create_segment(self.inner.storage.as_ref(), &self.inner.seg_dir, w.id + 1)
            .map_err(|e| self.poison(&e))?;
        let old = std::mem::replace(w, next);
        *self.inner.written.lock() = (w.id, w.flushed);
        self.inner.sealed_below.store(w.id, Ordering::SeqCst);
        {
            let mut segs = self.inner.segments.write();
            segs.insert(old.id, open_sealed(&old.file)?);
            segs.insert(w.id, SegmentData::File(w.file.clone()));
        }
        self.write_pending_indexes()
    }

    /// Makes everything appended up to `(segment, end)` durable. Concurrent callers share one
    /// fsync: whoever takes the lock syncs everything written so far for all of them.
    fn sync_to(&self, segment: u64, end: u64) -> Result<()> {
        if segment < self.inner.sealed_below.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut synced = self.inner.synced.lock();
        if *synced >= (segment, end) || segment < self.inner.sealed_below.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.check_poisoned()?;
        let (id, file, len) = {
            let mut w = self.inner.writer.lock();
            self.flush_locked(&mut w)?;
            (w.id, w.file.clone(), w.len)
        };
        if id != segment {
            // The segment was sealed (and synced) while we waited.
            return Ok(());
        }
        file.sync().map_err(|e| self.poison(&e))?;
        self.inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
        *synced = (id, len);
        // Record that everything before this point is durable; recovery uses the last mark to
        // tell a torn tail from damage to acknowledged data.
        let mut w = self.inner.writer.lock();
        if w.id == id && w.len == len {
            let mark = len.to_le_bytes();
            self.append_locked(&mut w, RecordKind::SyncMark, 0, &[&mark], 0)?;
            // And how far the catalog journal is durable: recovery tells a journal cut short
            // (acknowledged batches removed) from a torn tail by it.
            let catalog = self.inner.catalog.durable_position();
            if catalog != w.catalog_recorded && w.format >= 2 {
                let point = segment::encode_position(catalog);
                self.append_locked(&mut w, RecordKind::CatalogDurable, 0, &[&point], 0)?;
                w.catalog_recorded = catalog;
            }
            // Written at once (not left staged): a process killed after the acknowledgement
            // still leaves the mark in the page cache. Only a power cut before the next sync
            // can take it, and then the catalog's record of the sync point (written with
            // every batch, `State::segments_durable`) still tells damage from a torn tail.
            self.flush_locked(&mut w)?;
        }
        Ok(())
    }

    /// Makes everything appended so far durable (an upload session's checkpoint).
    pub(crate) fn sync_appended(&self) -> Result<()> {
        let (id, len) = {
            let w = self.inner.writer.lock();
            (w.id, w.len)
        };
        self.sync_to(id, len)
    }

    /// Commits a recipe: appends it, makes it durable, then makes it visible.
    pub(crate) fn commit_recipe(&self, recipe: Recipe) -> Result<Arc<Recipe>> {
        let key = recipe.digest.index_key();
        if self.pin_blob(&recipe.digest) {
            if let Ok(existing) = self.recipe(&recipe.digest) {
                self.inner
                    .gc
                    .lock()
                    .leases
                    .insert(recipe.digest.clone(), crate::clock::now_secs());
                return Ok(existing);
            }
        }
        let payload = recipe.encode();
        if payload.len() > segment::RECORD_PAYLOAD_MAX {
            return Err(Error::LimitExceeded(format!(
                "recipe of {} bytes is too large",
                payload.len()
            )));
        }
        let compressed = crate::recipe::compress(&payload, self.inner.opts.zstd_level);
        // The index entry is queued with the append, under the writer lock: if the segment
        // is sealed before this commit's sync returns, its index file must hold the recipe
        // (sealing syncs first, so the entry is never visible before it is durable).
        let loc = {
            let mut w = self.inner.writer.lock();
            // (Compressed only in segments of format 3: an older one being appended to
            // after an upgrade gets what its format knows.)
            let (flags, body) = match &compressed {
                Some(z) if w.format >= 3 => (segment::FLAG_ZSTD, z),
                _ => (0, &payload),
            };
            let loc = self.append_locked(
                &mut w,
                RecordKind::Recipe,
                flags,
                &[body],
                u32::from(recipe.digest.algorithm().code()),
            )?;
            self.inner.pending.lock().queue(Table::Blobs, key, loc);
            loc
        };
        self.sync_to(
            loc.segment,
            loc.offset + RECORD_HEADER_LEN as u64 + u64::from(loc.len),
        )?;
        {
            // Visible once durable; a segment sealed meanwhile already has it in its index.
            let w = self.inner.writer.lock();
            if w.id == loc.segment {
                self.inner.delta.write().blobs.insert(key, loc);
            }
        }
        let recipe = Arc::new(recipe);
        self.inner
            .gc
            .lock()
            .leases
            .insert(recipe.digest.clone(), crate::clock::now_secs());
        if self.is_quarantined(&recipe.digest) {
            // Pushed again, from fresh chunks (damaged ones count as absent): it is whole.
            let mut q = (*self.quarantine()).clone();
            q.blobs.remove(&recipe.digest);
            self.set_quarantine(q)?;
        }
        self.cache_recipe(key, recipe.clone());
        Ok(recipe)
    }
}
