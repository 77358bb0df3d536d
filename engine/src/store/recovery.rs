//! Opening a data directory: the index files to keep, the segments without one replayed
//! (a torn tail of the last one truncated, damage before its last sync mark refused, or
//! salvaged by `fsck --repair`), the list of segments collections removed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::catalog::Catalog;
use crate::digest::ChunkId;
use crate::error::{Error, Result};
use crate::index::{self, IndexFile, Location};
use crate::io::{FileHandle, OpenMode, RealStorage, Storage, WritebackHints};
use crate::recipe::Recipe;
use crate::segment::{
    self, parse_segment_file_name, segment_path, RecordKind, FILE_HEADER_LEN, SEGMENT_MAGIC,
};

use super::*;

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

/// What replaying a segment found: where its valid records end, its index entries, and the
/// newest catalog position it recorded.
type Replayed = (u64, SegmentEntries, Option<(u64, u64)>);

/// The format of a segment whose header was checked at replay.
fn segment_format(file: &FileHandle) -> u16 {
    let mut head = [0u8; FILE_HEADER_LEN];
    match file.read_exact_at(&mut head, 0) {
        Ok(()) => u16::from_le_bytes([head[8], head[9]]),
        Err(_) => segment::SEGMENT_FORMAT,
    }
}

/// Why the file at `path` is not a segment this store wrote: its header is invalid and it
/// is larger than the header a crash can leave unwritten (`None` when it is a segment, or
/// may be one cut short by a crash).
fn not_a_segment(storage: &dyn crate::io::Storage, path: &Path) -> Result<Option<String>> {
    let file = FileHandle::open(storage, path, OpenMode::Read)?;
    let len = file.len()?;
    if len <= 4096 {
        return Ok(None);
    }
    let mut head = [0u8; FILE_HEADER_LEN];
    file.read_exact_at(&mut head, 0)?;
    Ok(segment::check_segment_header(path, &head)
        .err()
        .map(|e| e.to_string()))
}

/// Replays a segment without an index file: collects its entries, and decides what an invalid
/// record means. In the last segment, bytes after the last sync mark were never acknowledged,
/// so damage there is a torn tail and is truncated; damage before it is corruption. With
/// `salvage` (`fsck --repair`), corruption does not stop the open: the records after each
/// damaged stretch are found again and indexed, and the damaged ones are left for fsck to
/// report and quarantine.
///
/// `acknowledged` is how far the catalog says this segment was durable when a batch was
/// last committed: bytes before it were acknowledged even when the segment's own sync mark
/// did not reach the disk, so damage there is never taken for a torn tail.
fn replay_segment(
    file: &FileHandle,
    id: u64,
    is_last: bool,
    salvage: bool,
    acknowledged: u64,
) -> Result<Replayed> {
    let path = file.path().to_path_buf();
    let len = file.len()?;
    let mut head = [0u8; FILE_HEADER_LEN];
    if len < FILE_HEADER_LEN as u64
        || file.read_exact_at(&mut head, 0).is_err()
        || segment::check_segment_header(&path, &head).is_err()
    {
        if is_last && len <= 4096 {
            // Created but its header never became durable: start it afresh.
            file.set_len(0)?;
            file.write_all_at(
                &segment::file_header_versioned(SEGMENT_MAGIC, segment::SEGMENT_FORMAT),
                0,
            )?;
            file.sync()?;
            return Ok((FILE_HEADER_LEN as u64, (Vec::new(), Vec::new()), None));
        }
        segment::check_segment_header(&path, &head)?;
    }
    let mut chunks = Vec::new();
    let mut blobs = Vec::new();
    let durable_end = std::cell::Cell::new(FILE_HEADER_LEN as u64);
    let catalog_recorded = std::cell::Cell::new(None::<(u64, u64)>);
    let mut visit = |rec: segment::ScannedRecord| {
        let loc = Location {
            segment: id,
            offset: rec.offset,
            len: rec.header.len,
            aux: 0,
        };
        match rec.header.kind {
            RecordKind::Chunk => {
                let c = segment::ChunkPayload::decode(&rec.payload)
                    .ok_or_else(|| Error::corrupted(&path, rec.offset, "chunk record too short"))?;
                chunks.push((
                    c.id.0,
                    Location {
                        aux: c.raw_len,
                        ..loc
                    },
                ));
            }
            RecordKind::Recipe => {
                let r = match Recipe::decode_record(
                    &path,
                    rec.offset,
                    rec.header.flags,
                    &rec.payload,
                ) {
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
            RecordKind::CatalogDurable => {
                let point = segment::decode_position(&rec.payload);
                catalog_recorded.set(catalog_recorded.get().max(point));
            }
            RecordKind::CatalogBatch
            | RecordKind::UploadCheckpoint
            | RecordKind::SegmentsDurable
            | RecordKind::OutboxEvent
            | RecordKind::OutboxDead
                if salvage => {}
            RecordKind::CatalogBatch
            | RecordKind::UploadCheckpoint
            | RecordKind::SegmentsDurable
            | RecordKind::OutboxEvent
            | RecordKind::OutboxDead => {
                return Err(Error::corrupted(
                    &path,
                    rec.offset,
                    "catalog, upload or outbox record in a segment",
                ))
            }
        }
        Ok(())
    };
    let (end, how) = segment::scan(file, FILE_HEADER_LEN as u64, &mut visit)?;
    let durable_end = durable_end.get().max(acknowledged);
    let end = match segment::settle_tail(file, &how, durable_end, is_last) {
        Ok(()) => end,
        Err(Error::Corrupted { .. }) if salvage => {
            // Damage in acknowledged data: index everything readable around it.
            match how {
                segment::ScanEnd::Invalid { offset, .. } => {
                    segment::scan_salvaging(file, offset, &mut visit)?.0
                }
                segment::ScanEnd::Clean => end,
            }
        }
        Err(e) => return Err(e),
    };
    Ok((end, (chunks, blobs), catalog_recorded.get()))
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
        // (quarantine.tmp, removed-segments.tmp; the catalog, index and upload directories
        // clear their own.)
        crate::io::remove_unfinished_writes(storage.as_ref(), dir)?;
        let catalog = Arc::new(Catalog::open_salvaging(
            storage.clone(),
            &dir.join("catalog"),
            opts.catalog_journal_bytes_max,
            opts.salvage || opts.rebuild_indexes,
        )?);
        crate::uploads::prepare_dir(storage.as_ref(), &crate::uploads::sessions_dir(dir))?;
        let quarantine = crate::quarantine::Quarantine::load(storage.as_ref(), dir)?;

        // Index files are all a store knows of the records of segments kept in a bucket:
        // they are never rebuilt while there are any.
        let remote = super::remote::read_list(storage.as_ref(), dir)?;
        if opts.rebuild_indexes && !remote.is_empty() {
            return Err(Error::InvalidInput {
                what: crate::error::Input::Segment,
                reason: format!(
                    "{} segments of {} are kept in the bucket and only the index files locate \
                     their records, so the indexes cannot be rebuilt from local segments; \
                     `ballast restore` a fresh data directory from the bucket and repair that",
                    remote.len(),
                    dir.display()
                ),
            });
        }
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
        // Index files are derived: a damaged one is removed and its segments replayed, so
        // the store opens and the index is written again (said in `open_warnings`).
        let mut warnings: Vec<String> = catalog.open_warnings().to_vec();
        let mut indexes = Vec::new();
        let mut usable = Vec::new();
        for (lo, hi, name) in chosen {
            let path = idx_dir.join(&name);
            match IndexFile::open(storage.as_ref(), &path) {
                Ok(f) => {
                    indexes.push(Arc::new(f));
                    usable.push((lo, hi, name));
                }
                Err(e) if e.is_corruption() => {
                    warnings.push(format!(
                        "index file {} is damaged ({e}); it was removed and is rebuilt from \
                         segments {lo} to {hi}",
                        path.display()
                    ));
                    storage.remove(&path).map_err(io_err(&path))?;
                }
                Err(e) => return Err(e),
            }
        }
        let chosen = usable;
        storage.sync_dir(&idx_dir).map_err(io_err(&idx_dir))?;
        let covered = |id: u64| chosen.iter().any(|(lo, hi, _)| (*lo..=*hi).contains(&id));

        let mut seg_ids: Vec<u64> = storage
            .list(&seg_dir)
            .map_err(io_err(&seg_dir))?
            .iter()
            .filter_map(|n| parse_segment_file_name(n))
            .collect();
        seg_ids.sort_unstable();
        // A read replica's directory holds its one empty segment and nothing else of its
        // own; a primary's never holds that one.
        let follower = super::follow::FOLLOWER_SEGMENT;
        if opts.follower {
            if let Some(id) = seg_ids.iter().find(|id| **id < follower) {
                return Err(Error::InvalidInput {
                    what: crate::error::Input::Segment,
                    reason: format!(
                        "{} holds segment {id} written by a registry: it is not a read \
                         replica's data directory (a replica needs a directory of its own)",
                        dir.display()
                    ),
                });
            }
        } else if seg_ids.last().is_some_and(|id| *id >= follower) {
            return Err(Error::InvalidInput {
                what: crate::error::Input::Segment,
                reason: format!(
                    "{} is a read replica's data directory: it follows a primary through \
                     the bucket and takes no writes (serve it with role = \"replica\", or \
                     `ballast restore` a primary's directory from the bucket)",
                    dir.display()
                ),
            });
        }
        if let Some(&newest) = seg_ids.last() {
            let acknowledged = catalog
                .read()
                .segments_durable
                .is_some_and(|(s, _)| s >= newest);
            if !covered(newest) && !acknowledged {
                let path = segment_path(&seg_dir, newest);
                if let Some(why) = not_a_segment(storage.as_ref(), &path)? {
                    // Not a segment this store wrote (no valid header, larger than a crash
                    // can leave) and nothing acknowledged in it: set aside, not replayed.
                    let aside = path.with_extension("seg.stray");
                    storage.rename(&path, &aside).map_err(io_err(&path))?;
                    storage.sync_dir(&seg_dir).map_err(io_err(&seg_dir))?;
                    warnings.push(format!(
                        "{} is not a segment ({why}) and nothing acknowledged is in it: set \
                         aside as {}",
                        path.display(),
                        aside.display()
                    ));
                    seg_ids.pop();
                }
            }
        }

        let mut segments = HashMap::new();
        let mut catalog_recorded: Option<(u64, u64)> = None;
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
            let acknowledged = match catalog.read().segments_durable {
                Some((s, offset)) if s == id => offset,
                Some((s, _)) if s > id => u64::MAX,
                _ => 0,
            };
            let (len, entries, recorded) = replay_segment(
                &file,
                id,
                is_last,
                opts.rebuild_indexes || opts.salvage,
                acknowledged,
            )?;
            catalog_recorded = catalog_recorded.max(recorded);
            for (key, loc) in &entries.0 {
                delta.chunks.insert(ChunkId(*key), *loc);
            }
            for (key, loc) in &entries.1 {
                delta.blobs.insert(*key, *loc);
            }
            pending.by_segment.insert(id, entries);
            if is_last {
                let format = segment_format(&file);
                segments.insert(id, SegmentData::File(file.clone()));
                active = Some(Active {
                    id,
                    file,
                    len,
                    hints: WritebackHints::from(len),
                    staged: Vec::new(),
                    flushed: len,
                    catalog_recorded: recorded.unwrap_or((0, 0)),
                    format,
                });
            } else {
                segments.insert(id, open_sealed(&file)?);
            }
        }

        // Segments whose bytes are kept remotely (`remote.rs`): a local file, where a crash
        // left one, is used instead.
        let mut remote_ids = Vec::new();
        for (id, seg) in &remote {
            if segments.contains_key(id) {
                continue;
            }
            if !covered(*id) {
                warnings.push(format!(
                    "segment {id} is listed in {} as kept in the bucket, but no index file                      covers it: its records cannot be located without its bytes; `ballast                      fsck` lists what is affected",
                    dir.join(super::remote::REMOTE_SEGMENTS).display()
                ));
                continue;
            }
            segments.insert(*id, SegmentData::Remote(*seg));
            remote_ids.push(*id);
        }
        let last = last.max(remote_ids.iter().max().copied());
        let next_id = if opts.follower {
            follower
        } else {
            last.map_or(1, |l| l + 1)
        };
        // The segments say how far the journal was durable when they synced: a journal that
        // ends before that lost acknowledged batches (cut short, or an older copy), which a
        // torn tail never does.
        let mut catalog_damage: Vec<(crate::verify::FindingCode, String)> = catalog
            .damage()
            .map(|d| (crate::verify::FindingCode::CatalogDamaged, d.to_owned()))
            .into_iter()
            .collect();
        if let Some(recorded) = catalog_recorded {
            let now = catalog.durable_position();
            if recorded > now {
                let why = format!(
                    "the catalog journal ends at generation {}, offset {}, but the segments \
                     recorded it durable through generation {}, offset {}: acknowledged \
                     changes (tags, links, deletes) were cut from it",
                    now.0, now.1, recorded.0, recorded.1
                );
                if !(opts.salvage || opts.rebuild_indexes) {
                    return Err(Error::corrupted(dir.join("catalog"), 0, why));
                }
                catalog_damage.push((crate::verify::FindingCode::CatalogTruncated, why));
            }
        }
        let removed = read_removed_segments(storage.as_ref(), dir)?;
        if let Some((s, _)) = catalog.read().segments_durable {
            if last.is_none_or(|l| s > l) && !removed.contains(&s) {
                warnings.push(format!(
                    "segment {s} is missing ({}), although the catalog recorded it durable \
                     when it last committed: the newest data of this store is gone (restored \
                     from an older copy, or files deleted by hand). Blobs stored there are \
                     missing; `ballast fsck` lists what is affected",
                    segment_path(&seg_dir, s).display()
                ));
            }
        }
        // Sealed segments that index files cover but that are gone, though no collection
        // removed them: said now, not found one failed read at a time.
        let present: std::collections::HashSet<u64> =
            seg_ids.iter().chain(&remote_ids).copied().collect();
        let vanished: Vec<u64> = chosen
            .iter()
            .flat_map(|(lo, hi, _)| *lo..=*hi)
            .filter(|id| !present.contains(id) && !removed.contains(id))
            .collect();
        if !vanished.is_empty() {
            warnings.push(format!(
                "sealed segment(s) {vanished:?} are missing from {} although their index files \
                 name them and no collection removed them: blobs stored there cannot be \
                 served; `ballast fsck` lists them and `ballast fsck --repair` sets them aside \
                 until they are pushed again",
                seg_dir.display()
            ));
        }
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
            remote: RwLock::new(None),
            poisoned: crate::error::Poison::default(),
            recipes: Mutex::new(HashMap::new()),
            damage: std::sync::atomic::AtomicBool::new(!quarantine.is_empty()),
            quarantine: RwLock::new(Arc::new(quarantine)),
            merge_lock: Mutex::new(()),
            gc: Mutex::new(GcState::default()),
            gc_lock: Mutex::new(()),
            removed: Mutex::new(removed),
            stats: Stats::default(),
            room: Default::default(),
            verified,
            catalog,
            open_warnings: warnings,
            catalog_damage: Mutex::new(catalog_damage),
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
}
