//! A read replica's store: it follows a primary through the checkpoints the primary ships
//! (docs/design.md, "Read replicas"). A follower never writes a segment of its own: its
//! active segment is [`FOLLOWER_SEGMENT`], above every id a primary takes, and stays empty;
//! every segment it knows is remote ([`super::remote`]), located by the index file the
//! primary shipped with it ([`Store::segment_index`]). [`Store::follow`] moves it to a newer
//! checkpoint without a restart: new segments added with their index files, the catalog
//! replaced by the checkpoint's, segments the checkpoint no longer lists dropped (as a
//! collection drops them: readers still holding a location read until they finish, and the
//! bucket keeps the objects for its grace period).
//!
//! Order, for a crash at any point: index files, then the `remote-segments` list with the
//! new segments, then the catalog, then the dropped segments. A follower that restarts in
//! between opens with the catalog of the previous checkpoint or of the new one, and every
//! segment that catalog references listed.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::index::{self, IndexFile, Table};
use crate::io::write_atomic;

use super::remote::RemoteSegment;
use super::*;

/// The id of a follower's active segment: far above any id a primary reaches (a primary
/// refuses to open a data directory that holds it, and a follower one that holds any
/// other local segment).
pub const FOLLOWER_SEGMENT: u64 = 1 << 62;

/// What [`Store::follow`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// Segments added (with their index files).
    pub added: usize,
    /// Segments the checkpoint no longer lists, dropped.
    pub dropped: usize,
    /// Repositories in the catalog now.
    pub repos: usize,
}

impl Store {
    /// The index file of sealed segment `id` as bytes (docs/format.md, "Index files"),
    /// covering that segment alone: shipped beside it, so a follower locates its records
    /// without reading the segment.
    pub fn segment_index(&self, id: u64) -> Result<Vec<u8>> {
        if id >= self.inner.sealed_below.load(Ordering::SeqCst)
            || !self.inner.segments.read().contains_key(&id)
        {
            return Err(Error::NotFound(format!("sealed segment {id}")));
        }
        let (mut chunks, mut blobs) = (Vec::new(), Vec::new());
        for (table, key, loc) in self.entries_in(id) {
            match table {
                Table::Chunks => chunks.push((key, loc)),
                Table::Blobs => blobs.push((key, loc)),
            }
        }
        if let Some((c, b)) = self.inner.pending.lock().by_segment.get(&id) {
            chunks.extend_from_slice(c);
            blobs.extend_from_slice(b);
        }
        for t in [&mut chunks, &mut blobs] {
            t.sort_unstable_by_key(|e| e.0);
            t.dedup_by(|b, a| a.0 == b.0);
        }
        Ok(index::encode_index(&chunks, &blobs))
    }

    /// Of `listed` (segment ids a checkpoint lists), those this follower does not know
    /// yet: their index files must be fetched for [`Store::follow`].
    pub fn segments_to_follow(&self, listed: &[u64]) -> Vec<u64> {
        let segments = self.inner.segments.read();
        listed
            .iter()
            .copied()
            .filter(|id| !segments.contains_key(id))
            .collect()
    }

    /// Moves a follower to a newer checkpoint: `snapshot` is its catalog (a snapshot
    /// file's bytes), `listed` every segment it lists with its length, and `indexes` the
    /// index file of each segment [`Store::segments_to_follow`] named. Nothing changes when
    /// an index file is missing or damaged or the snapshot does not read.
    pub fn follow(
        &self,
        snapshot: &[u8],
        listed: &[(u64, u64)],
        indexes: &BTreeMap<u64, Vec<u8>>,
    ) -> Result<Followed> {
        if !self.inner.opts.follower {
            return Err(Error::InvalidInput {
                what: crate::error::Input::Segment,
                reason: "only a replica's store follows a checkpoint".into(),
            });
        }
        if !self.has_remote() {
            return Err(Error::Unavailable(
                "no bucket is installed to read the followed segments from".into(),
            ));
        }
        let _one_at_a_time = self.inner.gc_lock.lock();
        let ids: Vec<u64> = listed.iter().map(|(id, _)| *id).collect();
        if let Some(bad) = ids.iter().find(|id| **id >= FOLLOWER_SEGMENT) {
            return Err(Error::InvalidInput {
                what: crate::error::Input::Segment,
                reason: format!("segment {bad} is past the ids a primary uses"),
            });
        }
        let new: Vec<(u64, u64)> = {
            let segments = self.inner.segments.read();
            listed
                .iter()
                .copied()
                .filter(|(id, _)| !segments.contains_key(id))
                .collect()
        };
        // Every index file is checked before anything changes (those written are removed
        // again when one fails).
        let storage = self.inner.storage.as_ref();
        let mut files = Vec::with_capacity(new.len());
        for (id, _) in &new {
            let path = self.inner.idx_dir.join(index::index_file_name(*id, *id));
            match self.take_index(*id, indexes.get(id), &path) {
                Ok(f) => files.push(Arc::new(f)),
                Err(e) => {
                    for p in files.iter().map(|f| f.path()).chain([path.as_path()]) {
                        let _ = storage.remove(p);
                    }
                    return Err(e);
                }
            }
        }
        let mtime = crate::clock::now_secs();
        let keep: HashSet<u64> = ids.iter().copied().collect();
        let mut list = self.remote_list();
        list.extend(
            new.iter()
                .map(|(id, len)| (*id, RemoteSegment { len: *len, mtime })),
        );
        list.sort_unstable_by_key(|(id, _)| *id);
        self.write_remote_list(&list)?;
        {
            let mut segments = self.inner.segments.write();
            for (id, len) in &new {
                segments.insert(*id, SegmentData::Remote(RemoteSegment { len: *len, mtime }));
            }
        }
        {
            let mut idx = self.inner.indexes.write();
            let mut all: Vec<_> = idx.iter().cloned().chain(files).collect();
            all.sort_by_key(|f| f.lo);
            *idx = Arc::new(all);
        }
        let repos = self.inner.catalog.replace(snapshot)?;
        let dropped: HashSet<u64> = self
            .remote_list()
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !keep.contains(id))
            .collect();
        if !dropped.is_empty() {
            {
                let mut segments = self.inner.segments.write();
                for id in &dropped {
                    segments.remove(id);
                }
            }
            self.inner.recipes.lock().clear();
            self.forget_segments(&dropped)?;
        }
        self.maybe_merge()?;
        Ok(Followed {
            added: new.len(),
            dropped: dropped.len(),
            repos,
        })
    }

    /// Writes the shipped index file of segment `id` to `path` and opens it, checked
    /// whole and naming no other segment.
    fn take_index(
        &self,
        id: u64,
        bytes: Option<&Vec<u8>>,
        path: &std::path::Path,
    ) -> Result<IndexFile> {
        let bytes = bytes.ok_or_else(|| {
            Error::Unavailable(format!("the index file of segment {id} was not fetched"))
        })?;
        let storage = self.inner.storage.as_ref();
        write_atomic(storage, path, bytes)?;
        let f = IndexFile::open(storage, path)?;
        f.verify()?;
        let stray = [Table::Chunks, Table::Blobs]
            .into_iter()
            .any(|t| f.iter(t).any(|(_, l)| l.segment != id));
        if stray {
            return Err(Error::corrupted(
                path,
                0,
                format!("the index file of segment {id} names other segments"),
            ));
        }
        Ok(f)
    }

    /// Refuses a write to a follower's store.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.inner.opts.follower {
            return Err(Error::ReadOnly(
                "this registry is a read replica: its content comes from the primary it \
                 follows; push to the primary"
                    .into(),
            ));
        }
        Ok(())
    }
}
