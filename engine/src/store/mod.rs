//! The store: segments, the chunk and blob indexes, the write path with group commit, the
//! read path, and recovery at open (docs/design.md). One concept a file:
//!
//! - `mod.rs` (here): the shared state, accessors, health and the quarantine.
//! - `recovery.rs`: opening a data directory: index files chosen, segments without an index
//!   replayed, a torn tail told from damage.
//! - `writer.rs`: the active segment: staged appends, rolling and sealing, group commit
//!   (`sync_to`) and recipe commits.
//! - `indexes.rs`: where a key is (the delta, then mapped index files), pending index files
//!   and their level merges.
//! - `read.rs`: reading and checking records, chunks and recipes.
//!
//! What a running garbage collection needs from writers (pins, leases, writer registration,
//! the catalog door) and what it does to segments (relocation, finish) live beside mark and
//! plan in `crate::gc`.
//!
//! Lock order: a thread holding one of these locks only takes locks further down the list
//! (`merge_lock` is only ever tried, never waited for):
//!
//! upload `slots` (`crate::uploads`) → `gc_lock` → catalog journal (`commit_catalog`) → `gc`
//! → `synced` → `writer` → `segments` → `delta` → `quarantine` → `indexes` → `pending`
//! → `written` → `recipes` → `removed`

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::catalog::Catalog;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::index::IndexFile;
use crate::io::{FileHandle, OpenMode, Storage};
use crate::recipe::Recipe;
use crate::segment::{segment_path, FILE_HEADER_LEN};
pub use crate::stats::Stats;
use crate::sys::Map;
pub use follow::{Followed, FOLLOWER_SEGMENT};
pub use remote::{RemoteSegment, RemoteSegments, REMOTE_SEGMENTS};

mod follow;
mod indexes;
mod read;
mod recovery;
pub mod remote;
pub(crate) mod room;
mod writer;

pub(crate) use self::indexes::{Delta, Pending, SegmentEntries};
pub(crate) use self::writer::{create_segment, Active};
use crate::gc::GcState;

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
    /// Open despite damage in segments replayed at open: the records around each damaged
    /// stretch are indexed and the damage is left for fsck to report (fsck; implied by
    /// `rebuild_indexes`).
    pub salvage: bool,
    /// Merge this many index files of one level into one.
    pub index_merge_fanin: usize,
    /// New data (chunks of pushes) is refused with [`Error::NoSpace`] while the data
    /// directory's file system has fewer free bytes than this, so that deletes and garbage
    /// collection, which need a little room to write, always work. 0: no floor.
    pub free_bytes_min: u64,
    /// The catalog journal is folded into a snapshot past this size.
    pub catalog_journal_bytes_max: u64,
    /// How blob readers and compaction read ahead of what they need (docs/design.md,
    /// "Read path").
    pub read_ahead: crate::readahead::ReadAhead,
    /// A read replica's store (`follow.rs`): it writes no segment of its own (its active
    /// segment is [`FOLLOWER_SEGMENT`], above every id a primary uses, and stays empty),
    /// refuses catalog commits, and takes its catalog and segments from
    /// [`Store::follow`].
    pub follower: bool,
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
            salvage: false,
            index_merge_fanin: 4,
            free_bytes_min: 0,
            catalog_journal_bytes_max: crate::catalog::JOURNAL_BYTES_MAX,
            read_ahead: crate::readahead::ReadAhead::default(),
            follower: false,
        }
    }
}

#[derive(Clone)]
pub(crate) enum SegmentData {
    Mapped(Map),
    File(FileHandle),
    /// Its bytes are elsewhere (`remote.rs`).
    Remote(remote::RemoteSegment),
}

impl SegmentData {
    /// Bytes of its local file (none for a remote segment).
    pub(crate) fn local_bytes(&self) -> Option<u64> {
        match self {
            SegmentData::Mapped(m) => Some(m.len() as u64),
            SegmentData::File(h) => Some(h.len().unwrap_or(0)),
            SegmentData::Remote(_) => None,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) dir: PathBuf,
    pub(crate) seg_dir: PathBuf,
    pub(crate) idx_dir: PathBuf,
    pub(crate) opts: Options,
    pub(crate) writer: Mutex<Active>,
    /// Group commit: holds the highest (segment, offset) known durable.
    pub(crate) synced: Mutex<(u64, u64)>,
    /// Segments with an id below this are sealed and durable.
    pub(crate) sealed_below: AtomicU64,
    /// The active segment's id and how much of it is in the file (the rest is staged): a
    /// read of a staged record writes the staged records first.
    pub(crate) written: Mutex<(u64, u64)>,
    pub(crate) indexes: RwLock<Arc<Vec<Arc<IndexFile>>>>,
    pub(crate) delta: RwLock<Delta>,
    pub(crate) pending: Mutex<Pending>,
    pub(crate) segments: RwLock<HashMap<u64, SegmentData>>,
    /// Where remote segments are read from, once installed.
    pub(crate) remote: RwLock<Option<Arc<dyn remote::RemoteSegments>>>,
    pub(crate) poisoned: crate::error::Poison,
    pub(crate) recipes: Mutex<HashMap<[u8; 32], Arc<Recipe>>>,
    pub(crate) merge_lock: Mutex<()>,
    pub(crate) gc: Mutex<GcState>,
    /// Held for a whole collection: one at a time.
    pub(crate) gc_lock: Mutex<()>,
    /// Segments removed by collections (the `removed-segments` file).
    pub(crate) removed: Mutex<std::collections::BTreeSet<u64>>,
    pub(crate) stats: Stats,
    /// Bytes of new chunks since free space was last looked at, and whether it was below
    /// the floor then (see `Store::check_room`).
    pub(crate) room: crate::store::room::Room,
    /// Verifications of chunk reads that later reads may reuse (verified.rs).
    pub(crate) verified: crate::verified::RecentlyVerified,
    /// Damaged records and blobs set aside by `fsck --repair` (quarantine.rs); `damage` is
    /// true when it is not empty, so lookups pay nothing otherwise.
    pub(crate) quarantine: RwLock<Arc<crate::quarantine::Quarantine>>,
    pub(crate) damage: std::sync::atomic::AtomicBool,
    pub(crate) catalog: Arc<Catalog>,
    /// What opening found and mended (a damaged index file rebuilt): for the server's log
    /// and the tools' output.
    pub(crate) open_warnings: Vec<String>,
    /// Damage to the catalog found at open that a salvaging open went past (a journal cut
    /// short): fsck reports it.
    pub(crate) catalog_damage: Mutex<Vec<(crate::verify::FindingCode, String)>>,
    pub(crate) _lock: Box<dyn Send + Sync>,
}

/// An open store. Cheap to clone; safe to share across threads.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish()
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Store {
    /// What opening the store found and mended (damaged index files rebuilt from their
    /// segments), to be logged.
    /// Damage to the catalog that a salvaging open (fsck) went past: a journal that ends
    /// before where the segments recorded it durable (acknowledged changes were cut), or a
    /// snapshot whose damaged sections were lost.
    pub fn catalog_damage(&self) -> Vec<(crate::verify::FindingCode, String)> {
        self.inner.catalog_damage.lock().clone()
    }

    /// `fsck --repair`: the changes cut from the journal cannot be had back; once the
    /// active segment that recorded them is sealed, the store opens again, and this says
    /// it was dealt with.
    pub fn accept_catalog_damage(&self) {
        self.inner.catalog_damage.lock().clear();
    }

    /// What opening mended (a damaged index file rebuilt): for the server's log and the
    /// tools' output.
    pub fn open_warnings(&self) -> &[String] {
        &self.inner.open_warnings
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

    pub(super) fn check_poisoned(&self) -> Result<()> {
        self.inner.poisoned.check()
    }

    pub(crate) fn poison(&self, err: &Error) -> Error {
        self.inner.poisoned.set(err.to_string())
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

    pub(super) fn is_quarantined(&self, digest: &Digest) -> bool {
        self.inner.damage.load(Ordering::Relaxed)
            && self.inner.quarantine.read().blobs.contains_key(digest)
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

    /// Segment files and their bytes (local and remote), and chunk entries indexed, without touching the disk
    /// beyond an fstat of the active segment (for metrics, read at every scrape).
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint::default();
        for data in self.inner.segments.read().values() {
            f.segments += 1;
            f.segment_bytes += data.local_bytes().unwrap_or(0);
            if let SegmentData::Remote(r) = data {
                f.remote_segments += 1;
                f.remote_bytes += r.len;
            }
        }
        f.indexed_chunks = self
            .inner
            .indexes
            .read()
            .iter()
            .map(|i| i.count(crate::index::Table::Chunks) as u64)
            .sum::<u64>()
            + self
                .inner
                .pending
                .lock()
                .by_segment
                .values()
                .map(|(c, _)| c.len() as u64)
                .sum::<u64>();
        f
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

    /// How readers and compaction read ahead.
    pub(crate) fn read_ahead(&self) -> crate::readahead::ReadAhead {
        self.inner.opts.read_ahead
    }

    /// The path of a segment file.
    pub fn segment_path(&self, id: u64) -> PathBuf {
        segment_path(&self.inner.seg_dir, id)
    }
}

/// What [`Store::footprint`] tells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Segment files.
    pub segments: u64,
    /// Their bytes.
    pub segment_bytes: u64,
    /// Remote segments (`remote.rs`): not in `segments`.
    pub remote_segments: u64,
    /// Their bytes.
    pub remote_bytes: u64,
    /// Chunk entries in index files and in segments waiting for theirs: the stored chunks
    /// (a chunk a collection moved counts twice until the old segment's file is merged away).
    pub indexed_chunks: u64,
}

/// File in the data directory listing segments removed by garbage collection, one id a line.
pub const REMOVED_SEGMENTS: &str = "removed-segments";

pub(crate) fn open_sealed(file: &FileHandle) -> Result<SegmentData> {
    Ok(match file.map()? {
        Some(map) => SegmentData::Mapped(map),
        None => SegmentData::File(file.clone()),
    })
}
