//! The store: segments, the chunk and blob indexes, the write path with group commit, the read
//! path, and recovery at open (docs/design.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::catalog::Catalog;
use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Result};
use crate::index::{self, Entry, IndexFile, Location, Table};
use crate::io::{
    existed, write_atomic, FileHandle, OpenMode, RealStorage, Storage, WritebackHints,
};
use crate::recipe::{Recipe, RecipePiece};
use crate::segment::{
    self, check_file_header, file_header, parse_segment_file_name, record_header, segment_path,
    Check, RecordKind, CHUNK_PREFIX_LEN, FILE_HEADER_LEN, FLAG_ZSTD, RECORD_HEADER_LEN,
    SEGMENT_MAGIC,
};
use crate::sys::Map;
use crate::uploads::Uploads;

/// Tuning knobs of a store.
#[derive(Clone, Debug)]
pub struct Options {
    /// A segment is sealed once it reaches this size.
    pub segment_bytes_max: u64,
    /// Store chunks zstd-compressed when that saves at least 10%.
    pub compress: bool,
    /// zstd level for chunks.
    pub zstd_level: i32,
    /// Check every chunk read against its BLAKE3 id (CRC is always checked).
    pub verify_chunk_ids: bool,
    /// With `verify_chunk_ids`: a chunk verified at the same place less than this long ago
    /// is not hashed again (concurrent pulls of one image read each chunk several times in
    /// a moment). Zero hashes every read.
    pub verify_reuse: std::time::Duration,
    /// Ignore index files and rebuild them from the segments (fsck's repair).
    pub rebuild_indexes: bool,
    /// Merge this many index files of one level into one.
    pub index_merge_fanin: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes_max: 64 << 20,
            compress: true,
            zstd_level: 1,
            verify_chunk_ids: false,
            verify_reuse: std::time::Duration::ZERO,
            rebuild_indexes: false,
            index_merge_fanin: 4,
        }
    }
}

/// Counters, for inspect and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Chunks written.
    pub chunks_written: AtomicU64,
    /// Chunks found already stored.
    pub chunks_deduped: AtomicU64,
    /// Bytes appended to segments.
    pub bytes_appended: AtomicU64,
    /// fsyncs of segment files.
    pub syncs: AtomicU64,
    /// Chunks read and checked against their BLAKE3 id.
    pub chunks_verified: AtomicU64,
}

#[derive(Clone)]
enum SegmentData {
    Mapped(Map),
    File(FileHandle),
}

struct Active {
    id: u64,
    file: FileHandle,
    /// Logical length: what is in the file plus what is staged.
    len: u64,
    hints: WritebackHints,
    /// Appended records not yet written to the file: appends are gathered and written about
    /// 1 MiB at a time (the kernel's page-cache write costs about half as much per byte for
    /// 1 MiB writes as for one write per 64 KiB chunk).
    staged: Vec<u8>,
    /// Bytes of the file written so far.
    flushed: u64,
}

/// Staged appends are written once they reach this size (and before every sync, seal, and
/// read of a staged record).
const STAGED_BYTES_MAX: usize = 1 << 20;

#[derive(Default)]
struct Delta {
    chunks: HashMap<ChunkId, Location>,
    blobs: HashMap<[u8; 32], Location>,
}

/// What a running collection needs from writers (docs/design.md, "Garbage collection").
#[derive(Default)]
pub(crate) struct GcState {
    /// A collection is between its mark and the removal of its victims.
    pub(crate) running: bool,
    /// Chunks that writers deduplicated against while it ran.
    pub(crate) pinned_chunks: HashSet<ChunkId>,
    /// Blobs that something started to reference while it ran.
    pub(crate) pinned_blobs: HashSet<Digest>,
    /// Blobs committed recently (new or deduplicated), with the time: a push links its blob
    /// a moment after committing it, so a collection that starts in between must keep the
    /// blob and its chunks (a lease for the grace period).
    pub(crate) leases: HashMap<Digest, u64>,
    /// Blob writers still running → the chunks they deduplicated against while no
    /// collection ran: a collection that starts before they commit keeps those chunks (their
    /// recipes do not exist yet to say so).
    pub(crate) writing: HashMap<u64, Vec<ChunkId>>,
    /// The last writer id handed out.
    pub(crate) next_writer: u64,
}

/// The chunk and blob entries of one segment.
type SegmentEntries = (Vec<Entry>, Vec<Entry>);

/// Entries of segments that have no index file yet, in segment order.
#[derive(Default)]
struct Pending {
    by_segment: BTreeMap<u64, SegmentEntries>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    seg_dir: PathBuf,
    idx_dir: PathBuf,
    opts: Options,
    writer: Mutex<Active>,
    /// Group commit: holds the highest (segment, offset) known durable.
    synced: Mutex<(u64, u64)>,
    /// Segments with an id below this are sealed and durable.
    sealed_below: AtomicU64,
    /// The active segment's id and how much of it is in the file (the rest is staged): a
    /// read of a staged record writes the staged records first.
    written: Mutex<(u64, u64)>,
    indexes: RwLock<Arc<Vec<Arc<IndexFile>>>>,
    delta: RwLock<Delta>,
    pending: Mutex<Pending>,
    segments: RwLock<HashMap<u64, SegmentData>>,
    poisoned: crate::error::Poison,
    recipes: Mutex<HashMap<[u8; 32], Arc<Recipe>>>,
    merge_lock: Mutex<()>,
    gc: Mutex<GcState>,
    /// Held for a whole collection: one at a time.
    gc_lock: Mutex<()>,
    /// Segments removed by collections (the `removed-segments` file).
    removed: Mutex<std::collections::BTreeSet<u64>>,
    stats: Stats,
    /// Verifications of chunk reads that later reads may reuse (verified.rs).
    verified: crate::verified::RecentlyVerified,
    /// Damaged records and blobs set aside by `fsck --repair` (quarantine.rs); `damage` is
    /// true when it is not empty, so lookups pay nothing otherwise.
    quarantine: RwLock<Arc<crate::quarantine::Quarantine>>,
    damage: std::sync::atomic::AtomicBool,
    catalog: Arc<Catalog>,
    uploads: Uploads,
    _lock: Box<dyn Send + Sync>,
}

/// An open store. Cheap to clone; safe to share across threads.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

const RECIPE_CACHE_MAX: usize = 4096;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Store {
    /// Opens (creating if needed) the store in `dir` on the real file system.
    pub fn open(dir: impl AsRef<Path>, opts: Options) -> Result<Store> {
        Self::open_on(Arc::new(RealStorage), dir.as_ref(), opts)
    }

    /// Opens the store in `dir` on `storage`.
    pub fn open_on(storage: Arc<dyn Storage>, dir: &Path, opts: Options) -> Result<Store> {
        storage.create_dir_all(dir).map_err(io_err(dir))?;
        let lock = storage.lock(dir)?;
        let seg_dir = dir.join("segments");
        let idx_dir = dir.join("index");
        for d in [&seg_dir, &idx_dir] {
            storage.create_dir_all(d).map_err(io_err(d))?;
        }
        storage.sync_dir(dir).map_err(io_err(dir))?;
        let catalog = Arc::new(Catalog::open(storage.clone(), &dir.join("catalog"))?);
        let uploads = Uploads::open(storage.clone(), &dir.join("uploads"))?;
        let quarantine = crate::quarantine::Quarantine::load(storage.as_ref(), dir)?;

        // Index files: keep a non-overlapping covering set, widest first; drop the rest (the
        // inputs of a merge that finished) and leftover temp files.
        let mut idx_names: Vec<(u64, u64, String)> = Vec::new();
        for name in storage.list(&idx_dir).map_err(io_err(&idx_dir))? {
            match index::parse_index_file_name(&name) {
                Some((lo, hi)) if !opts.rebuild_indexes => idx_names.push((lo, hi, name)),
                _ => {
                    let p = idx_dir.join(&name);
                    storage.remove(&p).map_err(io_err(&p))?;
                }
            }
        }
        idx_names.sort_by_key(|(lo, hi, _)| (std::cmp::Reverse(hi - lo), *lo));
        let mut chosen: Vec<(u64, u64, String)> = Vec::new();
        for (lo, hi, name) in idx_names {
            if chosen.iter().any(|(l, h, _)| lo <= *h && *l <= hi) {
                let p = idx_dir.join(&name);
                storage.remove(&p).map_err(io_err(&p))?;
            } else {
                chosen.push((lo, hi, name));
            }
        }
        chosen.sort_by_key(|(lo, _, _)| *lo);
        let mut indexes = Vec::new();
        for (_, _, name) in &chosen {
            indexes.push(Arc::new(IndexFile::open(
                storage.as_ref(),
                &idx_dir.join(name),
            )?));
        }
        storage.sync_dir(&idx_dir).map_err(io_err(&idx_dir))?;
        let covered = |id: u64| chosen.iter().any(|(lo, hi, _)| (*lo..=*hi).contains(&id));

        let mut seg_ids: Vec<u64> = storage
            .list(&seg_dir)
            .map_err(io_err(&seg_dir))?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        seg_ids.sort_unstable();

        let mut segments = HashMap::new();
        let mut delta = Delta::default();
        let mut pending = Pending::default();
        let last = seg_ids.last().copied();
        let mut active: Option<Active> = None;
        for &id in &seg_ids {
            let path = segment_path(&seg_dir, id);
            if covered(id) {
                let file = FileHandle::open(storage.as_ref(), &path, OpenMode::Read)?;
                segments.insert(id, open_sealed(&file)?);
                continue;
            }
            let is_last = Some(id) == last;
            let file = FileHandle::open(storage.as_ref(), &path, OpenMode::ReadWrite)?;
            let (len, entries) = replay_segment(&file, id, is_last, opts.rebuild_indexes)?;
            for (key, loc) in &entries.0 {
                delta.chunks.insert(ChunkId(*key), *loc);
            }
            for (key, loc) in &entries.1 {
                delta.blobs.insert(*key, *loc);
            }
            pending.by_segment.insert(id, entries);
            if is_last {
                segments.insert(id, SegmentData::File(file.clone()));
                active = Some(Active {
                    id,
                    file,
                    len,
                    hints: WritebackHints::from(len),
                    staged: Vec::new(),
                    flushed: len,
                });
            } else {
                segments.insert(id, open_sealed(&file)?);
            }
        }

        let next_id = last.map_or(1, |l| l + 1);
        let removed = read_removed_segments(storage.as_ref(), dir)?;
        let verified = crate::verified::RecentlyVerified::new(opts.verify_reuse);
        let inner = Arc::new(Inner {
            storage: storage.clone(),
            dir: dir.to_path_buf(),
            seg_dir: seg_dir.clone(),
            idx_dir,
            opts,
            writer: Mutex::new(match active {
                Some(a) => a,
                None => create_segment(storage.as_ref(), &seg_dir, next_id)?,
            }),
            synced: Mutex::new((0, 0)),
            sealed_below: AtomicU64::new(0),
            written: Mutex::new((0, 0)),
            indexes: RwLock::new(Arc::new(indexes)),
            delta: RwLock::new(delta),
            pending: Mutex::new(pending),
            segments: RwLock::new(segments),
            poisoned: crate::error::Poison::default(),
            recipes: Mutex::new(HashMap::new()),
            damage: std::sync::atomic::AtomicBool::new(!quarantine.is_empty()),
            quarantine: RwLock::new(Arc::new(quarantine)),
            merge_lock: Mutex::new(()),
            gc: Mutex::new(GcState::default()),
            gc_lock: Mutex::new(()),
            removed: Mutex::new(removed),
            stats: Stats::default(),
            verified,
            catalog,
            uploads,
            _lock: lock,
        });
        {
            let w = inner.writer.lock();
            inner.sealed_below.store(w.id, Ordering::SeqCst);
            *inner.written.lock() = (w.id, w.flushed);
            *inner.synced.lock() = (w.id, w.len);
            inner
                .segments
                .write()
                .insert(w.id, SegmentData::File(w.file.clone()));
        }
        let store = Store { inner };
        // Segments before the active one that were sealed without an index get one now.
        store.write_pending_indexes()?;
        Ok(store)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The storage this store runs on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// The catalog of repositories, tags and links.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.inner.catalog
    }

    /// The upload sessions.
    pub fn uploads(&self) -> &Uploads {
        &self.inner.uploads
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &Options {
        &self.inner.opts
    }

    /// `Err(Poisoned)` once a failed write or fsync poisoned the store or its catalog: it
    /// then refuses every write until it is reopened (for health checks).
    pub fn health(&self) -> Result<()> {
        self.check_poisoned()?;
        self.inner.catalog.check_poisoned()
    }

    fn check_poisoned(&self) -> Result<()> {
        self.inner.poisoned.check()
    }

    fn poison(&self, err: &Error) -> Error {
        self.inner.poisoned.set(err.to_string())
    }

    /// Looks up where a chunk is stored.
    pub fn chunk_location(&self, id: &ChunkId) -> Option<Location> {
        self.locate(Table::Chunks, &id.0)
    }

    fn blob_location(&self, key: &[u8; 32]) -> Option<Location> {
        self.locate(Table::Blobs, key)
    }

    /// The current location of a key: the delta first, then index files newest first. Entries
    /// into segments that GC removed are skipped.
    fn locate(&self, table: Table, key: &[u8; 32]) -> Option<Location> {
        let segments = self.inner.segments.read();
        let delta = self.inner.delta.read();
        let hit = match table {
            Table::Chunks => delta.chunks.get(&ChunkId(*key)),
            Table::Blobs => delta.blobs.get(key),
        };
        let damage = self.inner.damage.load(Ordering::Relaxed);
        let quarantine = damage.then(|| self.inner.quarantine.read().clone());
        // Records fsck --repair found damaged count as absent.
        let usable = |l: &Location| {
            segments.contains_key(&l.segment)
                && !quarantine
                    .as_ref()
                    .is_some_and(|q| q.is_damaged(l.segment, l.offset))
        };
        if let Some(loc) = hit.filter(|l| usable(l)) {
            return Some(*loc);
        }
        drop(delta);
        self.inner
            .indexes
            .read()
            .iter()
            .rev()
            .find_map(|f| f.get(table, key).filter(|l| usable(l)))
    }

    /// What is quarantined (see quarantine.rs).
    pub fn quarantine(&self) -> Arc<crate::quarantine::Quarantine> {
        self.inner.quarantine.read().clone()
    }

    /// Replaces the quarantine, durably. Damaged records count as absent from now on, and
    /// quarantined blobs as missing.
    pub fn set_quarantine(&self, q: crate::quarantine::Quarantine) -> Result<()> {
        q.save(self.inner.storage.as_ref(), &self.inner.dir)?;
        self.inner.recipes.lock().clear();
        self.inner.damage.store(!q.is_empty(), Ordering::Relaxed);
        *self.inner.quarantine.write() = Arc::new(q);
        Ok(())
    }

    fn is_quarantined(&self, digest: &Digest) -> bool {
        self.inner.damage.load(Ordering::Relaxed)
            && self.inner.quarantine.read().blobs.contains_key(digest)
    }

    /// The current location of a chunk or blob key (for GC).
    pub(crate) fn current_location(&self, table: Table, key: &[u8; 32]) -> Option<Location> {
        self.locate(table, key)
    }

    /// Records that a writer relies on the chunk at `segment` while a collection may run;
    /// false when the segment is already gone (the caller must store the chunk again).
    fn pin_chunk(&self, id: &ChunkId, segment: u64, writer: Option<u64>) -> bool {
        let mut gc = self.inner.gc.lock();
        if !self.inner.segments.read().contains_key(&segment) {
            return false;
        }
        if gc.running {
            gc.pinned_chunks.insert(*id);
        } else if let Some(list) = writer.and_then(|w| gc.writing.get_mut(&w)) {
            // Under the same lock that starts a collection: either this is seen by its
            // snapshot of running writers, or the collection is already running and pins it.
            list.push(*id);
        }
        true
    }

    /// Registers a blob writer; its dedup hits are kept alive until [`Store::end_write`].
    pub(crate) fn begin_write(&self) -> u64 {
        let mut gc = self.inner.gc.lock();
        gc.next_writer += 1;
        let id = gc.next_writer;
        gc.writing.insert(id, Vec::new());
        id
    }

    /// Forgets a blob writer (its blob committed, with its own lease, or abandoned).
    pub(crate) fn end_write(&self, writer: u64) {
        self.inner.gc.lock().writing.remove(&writer);
    }

    /// True while blob writers run (a collection paces its compaction then).
    pub(crate) fn has_writers(&self) -> bool {
        !self.inner.gc.lock().writing.is_empty()
    }

    /// Chunks that running blob writers deduplicated against (for a collection's mark,
    /// called after it started).
    pub(crate) fn writing_chunks(&self) -> Vec<ChunkId> {
        let gc = self.inner.gc.lock();
        gc.writing.values().flatten().copied().collect()
    }

    /// Commits a catalog batch like [`crate::Catalog::commit_with`], and pins every blob the
    /// batch starts to reference (`LinkBlob`, `PutManifest`) under the catalog lock. A
    /// collection marks under the same lock, so a new reference is either seen by its mark or
    /// pinned against its compaction; a blob already collected fails the batch with
    /// `NotFound` (the client uploads it again).
    pub fn commit_catalog<T>(
        &self,
        plan: impl FnOnce(&crate::catalog::State) -> Result<(Vec<crate::catalog::Op>, T)>,
    ) -> Result<T> {
        self.inner.catalog.commit_with(|state| {
            let (ops, out) = plan(state)?;
            for op in &ops {
                let digest = match op {
                    crate::catalog::Op::LinkBlob { digest, .. }
                    | crate::catalog::Op::PutManifest { digest, .. } => digest,
                    _ => continue,
                };
                if !self.pin_blob(digest) {
                    return Err(Error::NotFound(format!(
                        "blob {digest} (collected meanwhile; upload it again)"
                    )));
                }
            }
            Ok((ops, out))
        })
    }

    /// Makes sure a committed blob outlives any collection in progress, before something
    /// (a mount, a link, a manifest) starts to reference it. False when it is not stored.
    pub fn pin_blob(&self, digest: &Digest) -> bool {
        let key = digest.index_key();
        let Some(loc) = self.blob_location(&key) else {
            return false;
        };
        if self.recipe(digest).is_err() {
            return false;
        }
        let mut gc = self.inner.gc.lock();
        if !self.inner.segments.read().contains_key(&loc.segment) {
            return false;
        }
        if gc.running {
            gc.pinned_blobs.insert(digest.clone());
        }
        true
    }

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
        self.inner
            .pending
            .lock()
            .by_segment
            .entry(loc.segment)
            .or_default()
            .0
            .push((id.0, loc));
        self.inner
            .stats
            .chunks_written
            .fetch_add(1, Ordering::Relaxed);
        Ok((true, attempt.then_some(compressed.is_some())))
    }

    /// Appends one record to the active segment, rolling to a new segment first when it would
    /// overflow. Caller holds the writer lock.
    fn append_locked(
        &self,
        w: &mut Active,
        kind: RecordKind,
        flags: u8,
        parts: &[&[u8]],
        aux: u32,
    ) -> Result<Location> {
        self.check_poisoned()?;
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let rec_len = (RECORD_HEADER_LEN + payload_len) as u64;
        if w.len > FILE_HEADER_LEN as u64 && w.len + rec_len > self.inner.opts.segment_bytes_max {
            self.roll_locked(w)?;
        }
        // The record is staged; staged records go to the file together (flush_locked).
        let offset = w.len;
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
    fn flush_locked(&self, w: &mut Active) -> Result<()> {
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
        let end = w.flushed;
        w.file.appended(&mut w.hints, end);
        *self.inner.written.lock() = (w.id, end);
        Ok(())
    }

    /// Before reading the record at `loc` from a file: writes the staged records when the
    /// record is among them.
    fn flush_for_read(&self, loc: &Location) -> Result<()> {
        let (active, written) = *self.inner.written.lock();
        if is_staged(loc, active, written) {
            let mut w = self.inner.writer.lock();
            self.flush_locked(&mut w)?;
        }
        Ok(())
    }

    /// [`Store::read_record`] for a caller that holds the writer lock (the read path would
    /// wait for it to write a staged record): a staged record is written here first.
    fn read_record_locked(&self, w: &mut Active, loc: &Location) -> Result<(u8, Bytes)> {
        if is_staged(loc, w.id, w.flushed) {
            self.flush_locked(w)?;
        }
        self.read_record(loc)
    }

    /// Seals the active segment (fsync, map, index file) and starts the next one.
    fn roll_locked(&self, w: &mut Active) -> Result<()> {
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

    /// Writes an index file for every sealed segment that has none yet, then moves its
    /// entries from the in-memory delta to the mapped index.
    fn write_pending_indexes(&self) -> Result<()> {
        let sealed_below = self.inner.sealed_below.load(Ordering::SeqCst);
        loop {
            let next = {
                let p = self.inner.pending.lock();
                p.by_segment
                    .iter()
                    .next()
                    .filter(|(id, _)| **id < sealed_below)
                    .map(|(id, e)| (*id, e.clone()))
            };
            let Some((id, (mut chunks, mut blobs))) = next else {
                break;
            };
            chunks.sort_unstable_by_key(|e| e.0);
            blobs.sort_unstable_by_key(|e| e.0);
            chunks.dedup_by(|b, a| a.0 == b.0);
            blobs.dedup_by(|b, a| a.0 == b.0);
            let path = self.inner.idx_dir.join(index::index_file_name(id, id));
            index::write_index(self.inner.storage.as_ref(), &path, &chunks, &blobs)
                .map_err(|e| self.poison(&e))?;
            let file = Arc::new(IndexFile::open(self.inner.storage.as_ref(), &path)?);
            {
                let mut idx = self.inner.indexes.write();
                let mut files: Vec<_> = idx.iter().cloned().collect();
                files.push(file);
                files.sort_by_key(|f| f.lo);
                *idx = Arc::new(files);
            }
            {
                let mut d = self.inner.delta.write();
                for (k, loc) in &chunks {
                    if d.chunks.get(&ChunkId(*k)) == Some(loc) {
                        d.chunks.remove(&ChunkId(*k));
                    }
                }
                for (k, loc) in &blobs {
                    if d.blobs.get(k) == Some(loc) {
                        d.blobs.remove(k);
                    }
                }
            }
            self.inner.pending.lock().by_segment.remove(&id);
        }
        self.maybe_merge()
    }

    /// Merges index files level by level: `fanin` adjacent files whose segment spans are of the
    /// same power-of-`fanin` level become one, so a store of n segments keeps O(log n) files
    /// and each entry is rewritten O(log n) times.
    fn maybe_merge(&self) -> Result<()> {
        let Some(_guard) = self.inner.merge_lock.try_lock() else {
            return Ok(());
        };
        let fanin = self.inner.opts.index_merge_fanin.max(2);
        loop {
            let files = self.inner.indexes.read().clone();
            let level = |f: &IndexFile| {
                let mut span = f.hi - f.lo + 1;
                let mut l = 0;
                while span >= fanin as u64 {
                    span /= fanin as u64;
                    l += 1;
                }
                l
            };
            let Some(start) = (0..files.len().saturating_sub(fanin - 1)).find(|&i| {
                let l = level(&files[i]);
                files[i..i + fanin].iter().all(|f| level(f) == l)
            }) else {
                return Ok(());
            };
            let group: Vec<&IndexFile> = files[start..start + fanin]
                .iter()
                .map(|f| f.as_ref())
                .collect();
            let (lo, hi) = (group[0].lo, group[fanin - 1].hi);
            let (mut chunks, mut blobs) = index::merge(&group);
            {
                // Entries into segments a collection removed are dropped for good.
                let segments = self.inner.segments.read();
                chunks.retain(|(_, l)| segments.contains_key(&l.segment));
                blobs.retain(|(_, l)| segments.contains_key(&l.segment));
            }
            let path = self.inner.idx_dir.join(index::index_file_name(lo, hi));
            index::write_index(self.inner.storage.as_ref(), &path, &chunks, &blobs)
                .map_err(|e| self.poison(&e))?;
            let merged = Arc::new(IndexFile::open(self.inner.storage.as_ref(), &path)?);
            let old: Vec<PathBuf> = group.iter().map(|f| f.path().to_path_buf()).collect();
            {
                let mut idx = self.inner.indexes.write();
                let mut next: Vec<_> = idx
                    .iter()
                    .filter(|f| f.hi < lo || f.lo > hi)
                    .cloned()
                    .collect();
                next.push(merged);
                next.sort_by_key(|f| f.lo);
                *idx = Arc::new(next);
            }
            for p in &old {
                self.inner.storage.remove(p).map_err(io_err(p))?;
            }
            self.inner
                .storage
                .sync_dir(&self.inner.idx_dir)
                .map_err(io_err(&self.inner.idx_dir))?;
        }
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
        }
        Ok(())
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
                    .insert(recipe.digest.clone(), crate::gc::now_secs());
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
        // The index entry is queued with the append, under the writer lock: if the segment
        // is sealed before this commit's sync returns, its index file must hold the recipe
        // (sealing syncs first, so the entry is never visible before it is durable).
        let loc = {
            let mut w = self.inner.writer.lock();
            let loc = self.append_locked(
                &mut w,
                RecordKind::Recipe,
                0,
                &[&payload],
                u32::from(recipe.digest.algorithm().code()),
            )?;
            self.inner
                .pending
                .lock()
                .by_segment
                .entry(loc.segment)
                .or_default()
                .1
                .push((key, loc));
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
            .insert(recipe.digest.clone(), crate::gc::now_secs());
        if self.is_quarantined(&recipe.digest) {
            // Pushed again, from fresh chunks (damaged ones count as absent): it is whole.
            let mut q = (*self.quarantine()).clone();
            q.blobs.remove(&recipe.digest);
            self.set_quarantine(q)?;
        }
        self.cache_recipe(key, recipe.clone());
        Ok(recipe)
    }

    fn cache_recipe(&self, key: [u8; 32], recipe: Arc<Recipe>) {
        let mut cache = self.inner.recipes.lock();
        if cache.len() >= RECIPE_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, recipe);
    }

    fn segment_data(&self, id: u64) -> Result<SegmentData> {
        self.inner.segments.read().get(&id).cloned().ok_or_else(|| {
            Error::corrupted(
                segment_path(&self.inner.seg_dir, id),
                0,
                "segment file referenced by the index is missing",
            )
        })
    }

    /// Reads and checks the record at `loc`; returns its flags and payload.
    fn read_record(&self, loc: &Location) -> Result<(u8, Bytes)> {
        self.read_record_with(loc, Check::Crc)
    }

    /// [`Store::read_record`], checking as `check` says.
    fn read_record_with(&self, loc: &Location, check: Check) -> Result<(u8, Bytes)> {
        let path = || segment_path(&self.inner.seg_dir, loc.segment);
        match self.segment_data(loc.segment)? {
            SegmentData::Mapped(map) => {
                let start = usize::try_from(loc.offset).unwrap_or(usize::MAX);
                let bytes = map.get(start..).ok_or_else(|| {
                    Error::corrupted(path(), loc.offset, "record offset past end of segment")
                })?;
                let (h, payload) = segment::decode_record_with(&path(), loc.offset, bytes, check)?;
                if h.len != loc.len {
                    return Err(Error::corrupted(
                        path(),
                        loc.offset,
                        "record length differs from the index",
                    ));
                }
                let begin = start + RECORD_HEADER_LEN;
                let end = begin + payload.len();
                Ok((h.flags, Bytes::from_owner(MapSlice { map, begin, end })))
            }
            SegmentData::File(file) => {
                self.flush_for_read(loc)?;
                let (h, payload) = segment::read_record_with(&file, loc.offset, check)?;
                if h.len != loc.len {
                    return Err(Error::corrupted(
                        path(),
                        loc.offset,
                        "record length differs from the index",
                    ));
                }
                Ok((h.flags, Bytes::from(payload)))
            }
        }
    }

    /// The raw bytes of a chunk; uncompressed chunks of sealed segments are not copied.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Bytes> {
        // With BLAKE3 verification on, the id check below covers what the record's CRC would.
        let check = if self.inner.opts.verify_chunk_ids {
            Check::Content
        } else {
            Check::Crc
        };
        let (loc, flags, payload) = self.read_located(Table::Chunks, &id.0, check)?;
        let path = || segment_path(&self.inner.seg_dir, loc.segment);
        if payload.len() < CHUNK_PREFIX_LEN || payload[..32] != id.0 {
            return Err(Error::corrupted(
                path(),
                loc.offset,
                "chunk record holds another chunk than the index says",
            ));
        }
        let raw_len = u32::from_le_bytes(payload[32..36].try_into().unwrap_or_default()) as usize;
        let body = payload.slice(CHUNK_PREFIX_LEN..);
        let data = if flags & FLAG_ZSTD != 0 {
            let v = zstd::bulk::decompress(&body, raw_len)
                .map_err(|e| Error::corrupted(path(), loc.offset, format!("zstd: {e}")))?;
            Bytes::from(v)
        } else {
            body
        };
        if data.len() != raw_len {
            return Err(Error::corrupted(
                path(),
                loc.offset,
                "chunk length differs from its header",
            ));
        }
        if self.inner.opts.verify_chunk_ids && !self.inner.verified.fresh(id, &loc) {
            self.inner
                .stats
                .chunks_verified
                .fetch_add(1, Ordering::Relaxed);
            if ChunkId::of(&data) != *id {
                return Err(Error::corrupted(
                    path(),
                    loc.offset,
                    "chunk bytes do not match their BLAKE3 id",
                ));
            }
            self.inner.verified.record(id, &loc);
        }
        Ok(data)
    }

    /// Locates a key and reads its record. A collection may remove the segment between the
    /// lookup and the read; the lookup is then repeated and finds the moved copy.
    fn read_located(
        &self,
        table: Table,
        key: &[u8; 32],
        check: Check,
    ) -> Result<(Location, u8, Bytes)> {
        let what = || match table {
            Table::Chunks => format!("chunk {}", ChunkId(*key)),
            Table::Blobs => format!("blob {}", hex::encode(key)),
        };
        for _ in 0..3 {
            let loc = self
                .locate(table, key)
                .ok_or_else(|| Error::NotFound(what()))?;
            if !self.inner.segments.read().contains_key(&loc.segment) {
                continue;
            }
            match self.read_record_with(&loc, check) {
                Ok((flags, payload)) => return Ok((loc, flags, payload)),
                Err(e) if !self.inner.segments.read().contains_key(&loc.segment) => drop(e),
                Err(e) => return Err(e),
            }
        }
        Err(Error::NotFound(what()))
    }

    /// The recipe of a committed blob.
    pub fn recipe(&self, digest: &Digest) -> Result<Arc<Recipe>> {
        if self.is_quarantined(digest) {
            return Err(Error::NotFound(format!(
                "blob {digest} (quarantined: damaged)"
            )));
        }
        let key = digest.index_key();
        if let Some(r) = self.inner.recipes.lock().get(&key) {
            if r.digest == *digest {
                return Ok(r.clone());
            }
        }
        let (loc, _, payload) = self.read_located(Table::Blobs, &key, Check::Crc)?;
        let recipe = Recipe::decode(
            &segment_path(&self.inner.seg_dir, loc.segment),
            loc.offset,
            &payload,
        )?;
        if recipe.digest != *digest {
            return Err(Error::NotFound(format!("blob {digest}")));
        }
        // A blob is visible only while all of its chunks are stored: GC may have collected
        // the chunks of a blob nothing links any more while its recipe record lives on.
        for piece in &recipe.pieces {
            if let RecipePiece::Chunk { id, .. } = piece {
                if self.chunk_location(id).is_none() {
                    return Err(Error::NotFound(format!("blob {digest}")));
                }
            }
        }
        let recipe = Arc::new(recipe);
        self.cache_recipe(key, recipe.clone());
        Ok(recipe)
    }

    /// The size of a committed blob, or `None` when it is not stored.
    pub fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.recipe(digest) {
            Ok(r) => Ok(Some(r.size)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// True when the blob is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        matches!(self.stat(digest), Ok(Some(_)))
    }

    /// Seals the active segment so the next open replays nothing, and releases the store.
    /// Dropping a store without `close` is safe too: the next open replays the active segment.
    pub fn close(self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.inner.writer.lock();
        if w.len > FILE_HEADER_LEN as u64 {
            self.roll_locked(&mut w)?;
        }
        Ok(())
    }

    /// Number of segment files and index files, for inspect.
    pub fn file_counts(&self) -> (usize, usize) {
        (
            self.inner.segments.read().len(),
            self.inner.indexes.read().len(),
        )
    }

    /// Ids of all segments, in order.
    pub fn segment_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.inner.segments.read().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Starts a collection: from now on dedup hits and blob references are pinned. Returns
    /// the guard that keeps other collections out, or `None` when one is running.
    pub(crate) fn gc_start(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        let guard = self.inner.gc_lock.try_lock()?;
        let mut gc = self.inner.gc.lock();
        gc.running = true;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
        Some(guard)
    }

    /// Ids of the sealed segments (every segment but the active one) and the active id.
    pub(crate) fn sealed_segments(&self) -> (Vec<u64>, u64) {
        let active = self.inner.writer.lock().id;
        let mut ids: Vec<u64> = self
            .inner
            .segments
            .read()
            .keys()
            .copied()
            .filter(|&id| id != active)
            .collect();
        ids.sort_unstable();
        (ids, active)
    }

    /// Copies the records at the given locations (chunks or recipes) to the active segment
    /// and points the index at the copies; the copies are durable after the next sync. They
    /// are read first, then appended under one hold of the writer lock, so a compaction hands
    /// the lock back and forth with writers once per batch instead of once per record
    /// (callers keep batches to a few MiB, so a hold stays around a millisecond).
    pub(crate) fn relocate_batch(&self, items: &[(Table, [u8; 32], Location)]) -> Result<u64> {
        let mut read = Vec::with_capacity(items.len());
        for (table, key, loc) in items {
            let (flags, payload) = self.read_record(loc)?;
            read.push((*table, key, loc, flags, payload));
        }
        let mut w = self.inner.writer.lock();
        let mut moved = 0;
        for (table, key, loc, flags, payload) in &read {
            moved += self.relocate_locked(&mut w, *table, key, loc, *flags, payload)?;
        }
        Ok(moved)
    }

    fn relocate_locked(
        &self,
        w: &mut Active,
        table: Table,
        key: &[u8; 32],
        loc: &Location,
        flags: u8,
        payload: &[u8],
    ) -> Result<u64> {
        // Only the current copy moves; a newer one may exist already.
        if self.locate(table, key) != Some(*loc) {
            return Ok(0);
        }
        let kind = match table {
            Table::Chunks => RecordKind::Chunk,
            Table::Blobs => RecordKind::Recipe,
        };
        let new = self.append_locked(w, kind, flags, &[payload], loc.aux)?;
        let mut delta = self.inner.delta.write();
        let mut pending = self.inner.pending.lock();
        let queued = pending.by_segment.entry(new.segment).or_default();
        match table {
            Table::Chunks => {
                delta.chunks.insert(ChunkId(*key), new);
                queued.0.push((*key, new));
            }
            Table::Blobs => {
                delta.blobs.insert(*key, new);
                queued.1.push((*key, new));
            }
        }
        Ok(RECORD_HEADER_LEN as u64 + payload.len() as u64)
    }

    /// Ends a collection: moves whatever writers pinned out of the victims, makes the copies
    /// durable, and removes the victims from the store (their files are unlinked after the
    /// last reader is gone: mappings stay valid). Returns the bytes moved for pins.
    pub(crate) fn gc_finish(&self, victims: &HashSet<u64>) -> Result<u64> {
        let mut gc = self.inner.gc.lock();
        let mut moved = 0;
        {
            let mut w = self.inner.writer.lock();
            let mut chunks: Vec<ChunkId> = gc.pinned_chunks.iter().copied().collect();
            for digest in &gc.pinned_blobs {
                let key = digest.index_key();
                if let Some(loc) = self.blob_location(&key) {
                    let (flags, payload) = self.read_record_locked(&mut w, &loc)?;
                    if let Ok(r) =
                        Recipe::decode(&self.segment_path(loc.segment), loc.offset, &payload)
                    {
                        chunks.extend(r.pieces.iter().filter_map(|p| match p {
                            RecipePiece::Chunk { id, .. } => Some(*id),
                            RecipePiece::Inline(_) => None,
                        }));
                    }
                    if victims.contains(&loc.segment) {
                        moved += self.relocate_locked(
                            &mut w,
                            Table::Blobs,
                            &key,
                            &loc,
                            flags,
                            &payload,
                        )?;
                    }
                }
            }
            for id in chunks {
                if let Some(loc) = self
                    .chunk_location(&id)
                    .filter(|l| victims.contains(&l.segment))
                {
                    let (flags, payload) = self.read_record_locked(&mut w, &loc)?;
                    moved +=
                        self.relocate_locked(&mut w, Table::Chunks, &id.0, &loc, flags, &payload)?;
                }
            }
            // Every copy, from the whole collection, is durable before a victim goes.
            // (The group-commit position is left alone: its lock is taken before the writer
            // lock elsewhere. A committer that finds it stale syncs once more, harmlessly.)
            self.flush_locked(&mut w)?;
            w.file.sync().map_err(|e| self.poison(&e))?;
            self.inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
            let mark = w.len.to_le_bytes();
            self.append_locked(&mut w, RecordKind::SyncMark, 0, &[&mark], 0)?;
            let mut segments = self.inner.segments.write();
            for id in victims {
                segments.remove(id);
            }
        }
        gc.running = false;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
        drop(gc);
        self.inner.recipes.lock().clear();
        // Remember which segments a collection removed, so fsck can tell them from lost ones,
        // for as long as an index file still names them: index merges drop the entries into
        // removed segments, and later index files never name them, so the list stays as long
        // as what the indexes still name, not as long as the store's history.
        let list = {
            let mut candidates = self.inner.removed.lock().clone();
            candidates.extend(victims.iter().copied());
            let named = self.segments_named_by_indexes(&candidates);
            let mut removed = self.inner.removed.lock();
            removed.extend(victims.iter().copied());
            removed.retain(|id| named.contains(id));
            removed
                .iter()
                .map(|id| format!("{id}\n"))
                .collect::<String>()
        };
        write_atomic(
            self.inner.storage.as_ref(),
            &self.inner.dir.join(REMOVED_SEGMENTS),
            list.as_bytes(),
        )?;
        for id in victims {
            let path = segment_path(&self.inner.seg_dir, *id);
            existed(&path, self.inner.storage.remove(&path))?;
        }
        self.inner
            .storage
            .sync_dir(&self.inner.seg_dir)
            .map_err(io_err(&self.inner.seg_dir))?;
        Ok(moved)
    }

    /// Blobs committed at or after `since` (leases), forgetting older ones. Called by a
    /// collection after it started, so a blob committed later is pinned instead.
    pub fn leased_since(&self, since: u64) -> Vec<Digest> {
        let mut gc = self.inner.gc.lock();
        gc.leases.retain(|_, at| *at >= since);
        gc.leases.keys().cloned().collect()
    }

    /// Abandons a collection (on error): pins are dropped, nothing is removed.
    pub(crate) fn gc_abort(&self) {
        let mut gc = self.inner.gc.lock();
        gc.running = false;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
    }

    /// Live index entries of a sealed segment, from the index files: (table, key, location).
    pub(crate) fn entries_in(&self, segment: u64) -> Vec<(Table, [u8; 32], Location)> {
        let mut out = Vec::new();
        for f in self
            .inner
            .indexes
            .read()
            .iter()
            .filter(|f| (f.lo..=f.hi).contains(&segment))
        {
            for table in [Table::Chunks, Table::Blobs] {
                out.extend(
                    f.iter(table)
                        .filter(|(_, l)| l.segment == segment)
                        .map(|(k, l)| (table, k, l)),
                );
            }
        }
        out
    }

    /// Size of a segment file and its last modification time (seconds since the epoch).
    pub(crate) fn segment_size_and_age(&self, id: u64) -> (u64, u64) {
        let path = segment_path(&self.inner.seg_dir, id);
        let len = self.segment_handle(id).and_then(|f| f.len()).unwrap_or(0);
        let mtime = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        (len, mtime)
    }

    /// Which of `candidates` some index file has an entry into.
    fn segments_named_by_indexes(
        &self,
        candidates: &std::collections::BTreeSet<u64>,
    ) -> HashSet<u64> {
        let mut named = HashSet::new();
        // A snapshot: lookups and index swaps go on meanwhile (swaps only ever drop entries
        // into removed segments).
        let files = self.inner.indexes.read().clone();
        for file in files.iter() {
            if candidates.range(file.lo..=file.hi).next().is_none() {
                continue;
            }
            if file.lo == file.hi {
                // A segment's own index file names nothing but that segment.
                if file.iter(Table::Chunks).next().is_some()
                    || file.iter(Table::Blobs).next().is_some()
                {
                    named.insert(file.lo);
                }
                continue;
            }
            for table in [Table::Chunks, Table::Blobs] {
                for (_, loc) in file.iter(table) {
                    if candidates.contains(&loc.segment) {
                        named.insert(loc.segment);
                    }
                }
            }
        }
        named
    }

    /// True when a collection removed the segment (for fsck).
    pub fn segment_was_collected(&self, id: u64) -> bool {
        self.inner.removed.lock().contains(&id)
    }

    /// A read handle on a segment file (for fsck and inspect).
    pub fn segment_handle(&self, id: u64) -> Result<FileHandle> {
        FileHandle::open(
            self.inner.storage.as_ref(),
            &segment_path(&self.inner.seg_dir, id),
            OpenMode::Read,
        )
    }

    /// The path of a segment file.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.inner.seg_dir, id)
    }

    /// The open index files (for fsck).
    pub fn index_files(&self) -> Vec<Arc<IndexFile>> {
        self.inner.indexes.read().iter().cloned().collect()
    }

    /// Every committed blob digest known to the indexes (for fsck and inspect).
    pub fn blob_locations(&self) -> Vec<([u8; 32], Location)> {
        let mut out: HashMap<[u8; 32], Location> = HashMap::new();
        for f in self.inner.indexes.read().iter() {
            out.extend(f.iter(Table::Blobs));
        }
        out.extend(self.inner.delta.read().blobs.iter().map(|(k, v)| (*k, *v)));
        out.into_iter().collect()
    }

    /// Reads a recipe by its location (for fsck and inspect).
    pub fn recipe_at(&self, loc: &Location) -> Result<Recipe> {
        let (_, payload) = self.read_record(loc)?;
        Recipe::decode(
            &segment_path(&self.inner.seg_dir, loc.segment),
            loc.offset,
            &payload,
        )
    }
}

struct MapSlice {
    map: Map,
    begin: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.get(self.begin..self.end).unwrap_or_default()
    }
}

thread_local! {
    // Compression contexts are costly to set up; each writing thread keeps its own.
    static PROBER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
}

/// File in the data directory listing segments removed by garbage collection, one id a line.
pub const REMOVED_SEGMENTS: &str = "removed-segments";

fn read_removed_segments(
    storage: &dyn Storage,
    dir: &Path,
) -> Result<std::collections::BTreeSet<u64>> {
    let path = dir.join(REMOVED_SEGMENTS);
    let Ok(file) = FileHandle::open(storage, &path, OpenMode::Read) else {
        return Ok(Default::default());
    };
    let mut bytes = vec![0u8; usize::try_from(file.len()?).unwrap_or(0)];
    file.read_exact_at(&mut bytes, 0)?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.trim()
                .parse()
                .map_err(|_| Error::corrupted(&path, 0, format!("{l:?} is not a segment id")))
        })
        .collect()
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

fn open_sealed(file: &FileHandle) -> Result<SegmentData> {
    Ok(match file.map()? {
        Some(map) => SegmentData::Mapped(map),
        None => SegmentData::File(file.clone()),
    })
}

/// True when the record at `loc` is still staged, given the active segment's id and how
/// much of it is in the file.
fn is_staged(loc: &Location, active: u64, written: u64) -> bool {
    loc.segment == active && loc.offset + RECORD_HEADER_LEN as u64 + u64::from(loc.len) > written
}

fn create_segment(storage: &dyn Storage, seg_dir: &Path, id: u64) -> Result<Active> {
    let path = segment_path(seg_dir, id);
    let file = FileHandle::open(storage, &path, OpenMode::Truncate)?;
    file.write_all_at(&file_header(SEGMENT_MAGIC), 0)?;
    file.sync()?;
    storage.sync_dir(seg_dir).map_err(io_err(seg_dir))?;
    Ok(Active {
        id,
        file,
        len: FILE_HEADER_LEN as u64,
        hints: WritebackHints::default(),
        staged: Vec::new(),
        flushed: FILE_HEADER_LEN as u64,
    })
}

/// Replays a segment without an index file: collects its entries, and decides what an invalid
/// record means. In the last segment, bytes after the last sync mark were never acknowledged,
/// so damage there is a torn tail and is truncated; damage before it is corruption. With
/// `salvage` (`fsck --repair`), corruption does not stop the open: the records after each
/// damaged stretch are found again and indexed, and the damaged ones are left for fsck to
/// report and quarantine.
fn replay_segment(
    file: &FileHandle,
    id: u64,
    is_last: bool,
    salvage: bool,
) -> Result<(u64, SegmentEntries)> {
    let path = file.path().to_path_buf();
    let len = file.len()?;
    let mut head = [0u8; FILE_HEADER_LEN];
    if len < FILE_HEADER_LEN as u64
        || file.read_exact_at(&mut head, 0).is_err()
        || check_file_header(&path, SEGMENT_MAGIC, &head).is_err()
    {
        if is_last && len <= 4096 {
            // Created but its header never became durable: start it afresh.
            file.set_len(0)?;
            file.write_all_at(&file_header(SEGMENT_MAGIC), 0)?;
            file.sync()?;
            return Ok((FILE_HEADER_LEN as u64, (Vec::new(), Vec::new())));
        }
        check_file_header(&path, SEGMENT_MAGIC, &head)?;
    }
    let mut chunks = Vec::new();
    let mut blobs = Vec::new();
    let durable_end = std::cell::Cell::new(FILE_HEADER_LEN as u64);
    let mut visit = |rec: segment::ScannedRecord| {
        let loc = Location {
            segment: id,
            offset: rec.offset,
            len: rec.header.len,
            aux: 0,
        };
        match rec.header.kind {
            RecordKind::Chunk => {
                let p = &rec.payload;
                let key: [u8; 32] = p
                    .get(..32)
                    .and_then(|k| k.try_into().ok())
                    .ok_or_else(|| Error::corrupted(&path, rec.offset, "chunk record too short"))?;
                let raw = p
                    .get(32..36)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes)
                    .unwrap_or_default();
                chunks.push((key, Location { aux: raw, ..loc }));
            }
            RecordKind::Recipe => {
                let r = match Recipe::decode(&path, rec.offset, &rec.payload) {
                    Ok(r) => r,
                    // A CRC-valid record that does not decode: fsck reports it.
                    Err(_) if salvage => return Ok(()),
                    Err(e) => return Err(e),
                };
                blobs.push((
                    r.digest.index_key(),
                    Location {
                        aux: u32::from(r.digest.algorithm().code()),
                        ..loc
                    },
                ));
            }
            RecordKind::SyncMark => durable_end.set(rec.offset),
            RecordKind::CatalogBatch if salvage => {}
            RecordKind::CatalogBatch => {
                return Err(Error::corrupted(
                    &path,
                    rec.offset,
                    "catalog record in a segment",
                ))
            }
        }
        Ok(())
    };
    let (end, how) = segment::scan(file, FILE_HEADER_LEN as u64, &mut visit)?;
    match segment::settle_tail(file, &how, durable_end.get(), is_last) {
        Ok(()) => Ok((end, (chunks, blobs))),
        Err(Error::Corrupted { .. }) if salvage => {
            // Damage in acknowledged data: index everything readable around it.
            let segment::ScanEnd::Invalid { offset, .. } = how else {
                return Ok((end, (chunks, blobs)));
            };
            let (end, _damage) = segment::scan_salvaging(file, offset, &mut visit)?;
            Ok((end, (chunks, blobs)))
        }
        Err(e) => Err(e),
    }
}
