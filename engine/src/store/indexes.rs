//! Where a chunk or blob is: the in-memory delta of what was written since the last index
//! file, then the mapped index files newest first. Sealed segments get an index file each;
//! files of one level are merged so a store keeps O(log n) of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::digest::ChunkId;
use crate::error::Result;
use crate::index::{self, Entry, IndexFile, Location, Table};

use super::*;

#[derive(Default)]
pub(crate) struct Delta {
    pub(crate) chunks: HashMap<ChunkId, Location>,
    pub(crate) blobs: HashMap<[u8; 32], Location>,
}

/// The chunk and blob entries of one segment.
pub(crate) type SegmentEntries = (Vec<Entry>, Vec<Entry>);

/// Entries of segments that have no index file yet, in segment order.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) by_segment: BTreeMap<u64, SegmentEntries>,
}

impl Pending {
    /// Queues an index entry for the index file of the segment `loc` is in.
    pub(crate) fn queue(&mut self, table: Table, key: [u8; 32], loc: Location) {
        let entries = self.by_segment.entry(loc.segment).or_default();
        match table {
            Table::Chunks => entries.0.push((key, loc)),
            Table::Blobs => entries.1.push((key, loc)),
        }
    }
}

impl Store {
    /// Looks up where a chunk is stored.
    pub fn chunk_location(&self, id: &ChunkId) -> Option<Location> {
        self.locate(Table::Chunks, &id.0)
    }

    /// Where a blob's recipe is stored, by its digest's index key.
    pub fn blob_location(&self, key: &[u8; 32]) -> Option<Location> {
        self.locate(Table::Blobs, key)
    }

    /// The current location of a key: the delta first, then index files newest first. Entries
    /// into segments that GC removed are skipped.
    pub(crate) fn locate(&self, table: Table, key: &[u8; 32]) -> Option<Location> {
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

    /// The current location of a chunk or blob key (for GC).
    pub(crate) fn current_location(&self, table: Table, key: &[u8; 32]) -> Option<Location> {
        self.locate(table, key)
    }

    /// Writes an index file for every sealed segment that has none yet, then moves its
    /// entries from the in-memory delta to the mapped index.
    pub(super) fn write_pending_indexes(&self) -> Result<()> {
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
    pub(super) fn maybe_merge(&self) -> Result<()> {
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

    /// Which of `candidates` some index file has an entry into.
    pub(crate) fn segments_named_by_indexes(
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
}
