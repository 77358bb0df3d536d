//! Compaction mechanics: live records of the chosen segments are copied to the active
//! segment in batches, then `gc_finish` moves what writers pinned meanwhile, makes every copy
//! durable and removes the victims.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::digest::ChunkId;
use crate::error::Result;
use crate::index::{Location, Table};
use crate::io::{existed, write_atomic};
use crate::readahead::Prefetcher;
use crate::recipe::{Recipe, RecipePiece};
use crate::segment::{segment_path, RecordKind, RECORD_HEADER_LEN};
use crate::store::{io_err, Active, SegmentData, Store, REMOVED_SEGMENTS};

impl Store {
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
    ///
    /// Records `ahead` read into buffers of its own are taken from there (checked as a read
    /// from the segment is); the rest are read from the segment.
    pub(crate) fn relocate_batch(
        &self,
        items: &[(Table, [u8; 32], Location)],
        ahead: &mut Prefetcher,
    ) -> Result<u64> {
        let mut read = Vec::with_capacity(items.len());
        for (table, key, loc) in items {
            let fetched = ahead
                .take(key)
                .filter(|(at, _)| at == loc)
                .and_then(|(_, record)| self.decode_fetched_crc(loc, &record).ok());
            let (flags, payload) = match fetched {
                Some(r) => r,
                None => self.read_record(loc)?,
            };
            read.push((*table, key, loc, flags, payload));
        }
        let mut w = self.inner.writer.lock();
        let mut moved = 0;
        for (table, key, loc, flags, payload) in &read {
            moved += self.relocate_locked(&mut w, *table, key, loc, *flags, payload)?;
        }
        Ok(moved)
    }

    pub(super) fn relocate_locked(
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
        match table {
            Table::Chunks => delta.chunks.insert(ChunkId(*key), new),
            Table::Blobs => delta.blobs.insert(*key, new),
        };
        self.inner.pending.lock().queue(table, *key, new);
        Ok(RECORD_HEADER_LEN as u64 + payload.len() as u64)
    }

    /// Ends a collection: moves whatever writers pinned out of the victims, makes the copies
    /// durable, and removes the victims from the store (their files are unlinked; readers'
    /// mappings stay valid). Returns the bytes moved for pins.
    ///
    /// The victims' maps are held across the unlink and let go on a thread of their own:
    /// the file system frees a file's blocks and the kernel drops its cached pages when the
    /// last map or handle goes, which for a few hundred megabytes of segments on ext4 takes
    /// longer than the rest of the collection's end. The collection is done (the copies
    /// durable, the victims unlinked and recorded as removed) without waiting for it.
    pub(crate) fn gc_finish(&self, victims: &HashSet<u64>) -> Result<u64> {
        let mut gc = self.inner.gc.lock();
        assert!(gc.running, "gc_finish outside a collection");
        let mut moved = 0;
        let mut released = Vec::new();
        {
            let mut w = self.inner.writer.lock();
            assert!(
                !victims.contains(&w.id),
                "the active segment is never a victim"
            );
            let mut chunks: Vec<ChunkId> = gc.pinned_chunks.iter().copied().collect();
            for digest in &gc.pinned_blobs {
                let key = digest.index_key();
                if let Some(loc) = self.blob_location(&key) {
                    let (flags, payload) = self.read_record_locked(&mut w, &loc)?;
                    if let Ok(r) = Recipe::decode_record(
                        &self.segment_path(loc.segment),
                        loc.offset,
                        flags,
                        &payload,
                    ) {
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
            // The mark is made durable too before a victim goes: no catalog batch follows
            // to record this sync point, and the copies are the only ones from then on.
            let mark = w.len.to_le_bytes();
            self.append_locked(&mut w, RecordKind::SyncMark, 0, &[&mark], 0)?;
            self.flush_locked(&mut w)?;
            w.file.sync().map_err(|e| self.poison(&e))?;
            self.inner.stats.syncs.fetch_add(1, Ordering::Relaxed);
            let mut segments = self.inner.segments.write();
            for id in victims {
                released.extend(segments.remove(id));
            }
        }
        gc.running = false;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
        drop(gc);
        self.inner.recipes.lock().clear();
        self.forget_segments(victims)?;
        release_off_path(&self.inner.room.releasing, released);
        Ok(moved)
    }

    /// Segments gone for good (a collection's victims, or those a follower's checkpoint no
    /// longer lists), already out of the segment map: recorded as removed, dropped from the
    /// remote list, their local files deleted.
    pub(crate) fn forget_segments(&self, victims: &HashSet<u64>) -> Result<()> {
        // Remember which segments were removed, so fsck can tell them from lost ones, for
        // as long as an index file still names them: index merges drop the entries into
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
        self.forget_remote(victims)?;
        for id in victims {
            let path = segment_path(&self.inner.seg_dir, *id);
            existed(&path, self.inner.storage.remove(&path))?;
        }
        self.inner
            .storage
            .sync_dir(&self.inner.seg_dir)
            .map_err(io_err(&self.inner.seg_dir))
    }

    /// Size of a segment file and its last modification time (seconds since the epoch).
    /// Through the storage, so crash tests on `SimStorage` see real ages. A segment whose
    /// age cannot be read counts as new (kept), not as old.
    pub(crate) fn segment_size_and_age(&self, id: u64) -> (u64, u64) {
        if let Some(crate::store::SegmentData::Remote(r)) = self.segment_data_of(id) {
            return (r.len, r.mtime);
        }
        let Ok(file) = self.segment_handle(id) else {
            return (0, u64::MAX);
        };
        (file.len().unwrap_or(0), file.modified().unwrap_or(u64::MAX))
    }
}

/// Drops the last maps and handles of removed segments on a thread of its own (freeing the
/// unlinked files' blocks and cached pages is the file system's slow part), counting their
/// bytes in `releasing` until they are gone. When no thread can be started, the refused
/// closure drops them here.
fn release_off_path(releasing: &Arc<AtomicU64>, released: Vec<SegmentData>) {
    if released.is_empty() {
        return;
    }
    let bytes = released.iter().filter_map(SegmentData::local_bytes).sum();
    releasing.fetch_add(bytes, Ordering::Relaxed);
    let held = Released {
        segments: released,
        bytes,
        releasing: releasing.clone(),
    };
    let _ = std::thread::Builder::new()
        .name("ballast-release".into())
        .spawn(move || drop(held));
}

/// Removed segments being let go; no longer counted once dropped, wherever that happens.
struct Released {
    segments: Vec<SegmentData>,
    bytes: u64,
    releasing: Arc<AtomicU64>,
}

impl Drop for Released {
    fn drop(&mut self) {
        self.segments.clear();
        self.releasing.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use crate::gc::test_support::{collect_keeping, garbage};
    use crate::segment::segment_path;
    use crate::{Options, Store};

    /// A collection returns with its victims unlinked and recorded; the bytes counted as
    /// being freed (`free_bytes` adds them) go back to nothing once the thread that lets go
    /// of their maps is done, and the copies read back.
    #[test]
    fn victims_are_unlinked_at_once_and_let_go_off_the_collections_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            Options {
                segment_bytes_max: 1 << 20,
                compress: false,
                ..Options::default()
            },
        )
        .expect("open");
        let live = garbage(&store, 500);
        let before: Vec<u64> = store.inner.segments.read().keys().copied().collect();
        let report = collect_keeping(&store, &live, 0);
        assert!(report.segments_compacted > 0, "{report:?}");
        let gone: Vec<u64> = before
            .iter()
            .copied()
            .filter(|id| !store.inner.segments.read().contains_key(id))
            .collect();
        assert!(!gone.is_empty());
        for id in &gone {
            assert!(
                !segment_path(&store.inner.seg_dir, *id).exists(),
                "victim {id} unlinked before the collection returned"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.inner.room.releasing.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "the victims were never let go");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
