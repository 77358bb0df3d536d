//! A consistent cut of a store, for shipping it to another place (an object store: see
//! docs/design.md, "Segments in a bucket"): the catalog as a snapshot file, and the sealed
//! segments that hold everything it references, each with an open handle (a collection may
//! unlink a segment file afterwards; the handle still reads it).
//!
//! The cut is taken under the collection lock, so no collection removes a segment between
//! the catalog being read and the segments being listed, and the active segment is sealed
//! in between: every blob the catalog references was written (and synced) before the catalog
//! was read, so it lies in a segment listed. Index files are derived: a data directory
//! rebuilt with the segments ([`restore::finish`]) indexes them at open; one whose segments
//! stay in the bucket ([`restore::finish_remote`]) takes the index file of each segment
//! that the cut can produce ([`Store::checkpoint_indexing`]).

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::Result;
use crate::io::{FileHandle, Storage};
use crate::segment::segment_path;
use crate::store::Store;

/// What [`Store::checkpoint`] took.
pub struct Checkpoint {
    /// The generation a catalog rebuilt from this cut gets: past every catalog position the
    /// segments recorded, so recovery never takes the new catalog for a journal cut short.
    pub generation: u64,
    /// The catalog, as a snapshot file (docs/format.md).
    pub snapshot: Vec<u8>,
    /// Repositories in the catalog.
    pub repos: usize,
    /// Every sealed segment, in id order.
    pub segments: Vec<SealedSegment>,
    /// The index file ([`Store::segment_index`]) of each sealed segment the caller asked
    /// for, taken under the same lock (no collection removes one in between).
    pub indexes: std::collections::BTreeMap<u64, Vec<u8>>,
}

/// A sealed segment of a [`Checkpoint`]: its bytes never change.
pub struct SealedSegment {
    id: u64,
    len: u64,
    /// `None` for a remote segment (read through the store's remote).
    file: Option<FileHandle>,
    store: Store,
}

impl SealedSegment {
    /// The segment's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a segment of no bytes (never: a segment has at least its header).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when its bytes are kept remotely, not in a local file.
    pub fn is_remote(&self) -> bool {
        self.file.is_none()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.file {
            Some(f) => f.read_exact_at(buf, offset),
            None => self.store.read_remote_bytes(self.id, offset, buf),
        }
    }
}

impl Store {
    /// A position that moves whenever the store changes in a way a [`Checkpoint`] would
    /// show: the catalog's journal position and how much of the active segment is written.
    /// Equal positions mean a new checkpoint would hold nothing new.
    pub fn change_position(&self) -> (u64, u64, u64, u64) {
        let (g, o) = self.inner.catalog.durable_position();
        let (s, w) = *self.inner.written.lock();
        (g, o, s, w)
    }

    /// Takes a consistent cut: seals the active segment when it holds anything, and returns
    /// the catalog as it was before the seal with every sealed segment. Waits for a running
    /// collection to finish.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.checkpoint_indexing(&|_| false)
    }

    /// [`Store::checkpoint`], with the index file of every sealed segment `wanted` names.
    pub fn checkpoint_indexing(&self, wanted: &dyn Fn(u64) -> bool) -> Result<Checkpoint> {
        let _one_at_a_time = self.inner.gc_lock.lock();
        let mut state = self.inner.catalog.read().clone();
        self.seal_active()?;
        let sealed_below = self.inner.sealed_below.load(Ordering::SeqCst);
        // Read after the seal: every catalog position a sealed segment recorded is at or
        // before this one.
        let generation = self.inner.catalog.durable_position().0 + 1;
        let mut ids: Vec<u64> = self
            .inner
            .segments
            .read()
            .keys()
            .copied()
            .filter(|&id| id < sealed_below)
            .collect();
        ids.sort_unstable();
        // Everything before the active segment is acknowledged whole.
        state.segments_durable = ids.last().map(|&id| (id, u64::MAX));
        let mut indexes = std::collections::BTreeMap::new();
        for &id in ids.iter().filter(|id| wanted(**id)) {
            indexes.insert(id, self.segment_index(id)?);
        }
        let mut segments = Vec::with_capacity(ids.len());
        let remote: std::collections::HashMap<u64, u64> =
            self.remote_segments().into_iter().collect();
        for id in ids {
            let (len, file) = match remote.get(&id) {
                Some(len) => (*len, None),
                None => {
                    let file = self.segment_handle(id)?;
                    (file.len()?, Some(file))
                }
            };
            segments.push(SealedSegment {
                id,
                len,
                file,
                store: self.clone(),
            });
        }
        Ok(Checkpoint {
            generation,
            snapshot: crate::catalog::snapshot_bytes(&state)?,
            repos: state.repos.len(),
            segments,
            indexes,
        })
    }
}

/// Rebuilding a data directory from a shipped checkpoint: the caller writes the segment
/// files (`segments/<id:020>.seg`), then [`restore::finish`] installs the catalog, opens
/// the store (which indexes every segment), seals what opening made active and closes it.
pub mod restore {
    use super::*;

    /// Where the segment `id` goes in the data directory `dir`.
    pub fn segment_file(dir: &Path, id: u64) -> std::path::PathBuf {
        segment_path(&dir.join("segments"), id)
    }

    /// Installs the catalog (`snapshot` at `generation`) in `dir`, whose segments are in
    /// place, and opens the store once so its indexes are written; the newest segment is
    /// sealed again (opening takes the newest segment without an index as the active one).
    /// Returns the warnings opening gave.
    pub fn finish(
        storage: std::sync::Arc<dyn Storage>,
        dir: &Path,
        generation: u64,
        snapshot: &[u8],
        opts: crate::store::Options,
    ) -> Result<Vec<String>> {
        open_restored(storage, dir, generation, snapshot, opts, true)
    }

    /// Installs the catalog and opens the store once (sealing its active segment when
    /// `seal`); the warnings opening gave.
    fn open_restored(
        storage: std::sync::Arc<dyn Storage>,
        dir: &Path,
        generation: u64,
        snapshot: &[u8],
        opts: crate::store::Options,
        seal: bool,
    ) -> Result<Vec<String>> {
        crate::catalog::install_snapshot(
            storage.as_ref(),
            &dir.join("catalog"),
            generation,
            snapshot,
        )?;
        let store = Store::open_on(storage, dir, opts)?;
        let warnings = store.open_warnings().to_vec();
        if seal {
            store.seal_active()?;
        }
        store.close()?;
        Ok(warnings)
    }

    /// Like [`finish`] for a data directory whose segments stay in the bucket: `indexes`
    /// holds the index file (as shipped) of every segment in `remote` (id and length), and
    /// `segments/` is empty. The index files are written, the segments listed in
    /// `remote-segments` (with `mtime`, when they were sealed at the latest), the catalog
    /// installed, and the store opened once (it starts an empty active segment past them).
    /// Segment bytes are read through the [`crate::store::RemoteSegments`] the server
    /// installs, each record checked as it is read.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_remote(
        storage: std::sync::Arc<dyn Storage>,
        dir: &Path,
        generation: u64,
        snapshot: &[u8],
        remote: &[(u64, u64)],
        indexes: &std::collections::BTreeMap<u64, Vec<u8>>,
        mtime: u64,
        opts: crate::store::Options,
    ) -> Result<Vec<String>> {
        let idx_dir = dir.join("index");
        storage
            .create_dir_all(&idx_dir)
            .map_err(|e| crate::error::Error::io(&idx_dir, e))?;
        let mut list = Vec::with_capacity(remote.len());
        for &(id, len) in remote {
            let bytes = indexes.get(&id).ok_or_else(|| {
                crate::error::Error::NotFound(format!("the index file of segment {id}"))
            })?;
            crate::io::write_atomic(
                storage.as_ref(),
                &idx_dir.join(crate::index::index_file_name(id, id)),
                bytes,
            )?;
            list.push((id, crate::store::RemoteSegment { len, mtime }));
        }
        crate::store::remote::write_list(storage.as_ref(), dir, &list)?;
        open_restored(storage, dir, generation, snapshot, opts, false)
    }
}
