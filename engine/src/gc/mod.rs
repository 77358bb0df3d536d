//! Garbage collection: mark what the catalog still needs, then compact the segments that are
//! mostly dead (docs/design.md, "Garbage collection"). Runs online: pushes and pulls
//! continue, writers pin what they reuse. One concept a file:
//!
//! - `mod.rs` (here): options, report, and `collect`, which drives a collection.
//! - `plan.rs`: mark and plan, pure.
//! - `barrier.rs`: what writers do while a collection runs (pins, leases, writer
//!   registration) and the store's catalog commit, the one door that pins new references.

//! - `compact.rs`: relocation of live records and the end of a collection.

mod barrier;
mod compact;
mod plan;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

pub(crate) use self::barrier::GcState;
pub use self::plan::{fold, mark, plan, SegmentStats, FOLD_MIN_SEGMENTS};
use crate::catalog::Op;
use crate::digest::ChunkId;
use crate::error::{Error, Result};
use crate::index::{Location, Table};
use crate::readahead::{Prefetcher, AHEAD_BYTES};
use crate::recipe::RecipePiece;
use crate::segment::{FILE_HEADER_LEN, RECORD_HEADER_LEN};
use crate::store::Store;

/// How to collect.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Blob links, manifests and segments younger than this many seconds are kept.
    pub grace_secs: u64,
    /// Remove manifests that no tag and no live index or subject reaches.
    pub delete_untagged: bool,
    /// A segment is compacted when at least this fraction of it is dead (half as much for
    /// segments older than a week).
    pub dead_fraction_min: f64,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// While blob writers run, live bytes are copied at most this fast (a token bucket);
    /// without writers the copy runs at full speed. Zero: never paced.
    pub pace_bytes_per_sec: u64,
    /// Sealed segments smaller than this are folded together (their live records copied
    /// into the active segment) when there are at least [`plan::FOLD_MIN_SEGMENTS`] of them
    /// past the grace period, however little of them is dead: shipping to a bucket seals a
    /// segment per checkpoint, and without folding a registry with a trickle of pushes
    /// keeps a file per interval. Zero: never.
    pub fold_below_bytes: u64,
}

/// The default pace while pushes run: a sixteenth of what a good disk writes, enough to
/// compact 230 GB a day during non-stop pushes.
pub const PACE_BYTES_PER_SEC: u64 = 64 << 20;

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace_secs: 3600,
            delete_untagged: false,
            dead_fraction_min: 0.5,
            dry_run: false,
            pace_bytes_per_sec: PACE_BYTES_PER_SEC,
            fold_below_bytes: 0,
        }
    }
}

/// What a collection did (or, dry, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Blob links removed from repositories.
    pub blob_links_removed: u64,
    /// Manifests removed (`delete_untagged`).
    pub manifests_removed: u64,
    /// Segments examined (sealed ones).
    pub segments_examined: u64,
    /// Segments compacted away (the folded ones included).
    pub segments_compacted: u64,
    /// Of those, small segments folded together for their size (`fold_below_bytes`).
    pub segments_folded: u64,
    /// Bytes of segment files before.
    pub bytes_before: u64,
    /// Live bytes copied forward.
    pub bytes_moved: u64,
    /// Bytes freed: compacted segments' sizes minus what was copied forward.
    pub bytes_reclaimed: u64,
    /// Dead bytes left in segments younger than the grace period (they may hold a blob
    /// committed but not linked yet).
    pub dead_bytes_left_young: u64,
    /// Dead bytes left in segments whose dead fraction is below `dead_fraction_min`.
    pub dead_bytes_left_below_fraction: u64,
    /// Milliseconds spent copying live records.
    pub copy_ms: u64,
    /// Milliseconds the copy rested so that running pushes keep the disk (pacing).
    pub paced_ms: u64,
    /// Live bytes copied while pushes ran (at most the pace).
    pub bytes_moved_paced: u64,
}

/// Runs one collection.
pub fn collect(store: &Store, opts: &GcOptions, now: u64) -> Result<GcReport> {
    store.check_writable()?;
    let _one_at_a_time = store.gc_start().ok_or_else(|| {
        Error::Busy("a collection is already running; try again when it ends".into())
    })?;
    let result = run(store, opts, now);
    if opts.dry_run || result.is_err() {
        store.gc_abort();
    }
    result
}

fn run(store: &Store, opts: &GcOptions, now: u64) -> Result<GcReport> {
    let mut report = GcReport {
        dry_run: opts.dry_run,
        ..GcReport::default()
    };
    // 1. Mark, and (unless dry) drop the dead links in the same atomic catalog commit.
    // Links a client was told exist within the grace period stay (taken under the catalog
    // lock: a touch before this commit is seen).
    let mark_sparing_touched = |state: &crate::catalog::State| {
        let (mut ops, mut live) = mark(state, now, opts);
        if opts.grace_secs > 0 {
            let touched = store.links_touched_since(now.saturating_sub(opts.grace_secs));
            ops.retain(|op| match op {
                Op::UnlinkBlob { repo, digest } => {
                    let keep = touched.contains(&(repo.clone(), digest.clone()));
                    if keep {
                        live.insert(digest.clone());
                    }
                    !keep
                }
                _ => true,
            });
        }
        (ops, live)
    };
    let (ops, live) = if opts.dry_run {
        mark_sparing_touched(&store.catalog().read())
    } else {
        store.commit_catalog(|state| {
            let (ops, live) = mark_sparing_touched(state);
            Ok::<_, Error>((ops.clone(), (ops, live)))
        })?
    };
    // Blobs committed within the grace period but not linked yet stay too (grace 0, for
    // offline use, protects nothing).
    let mut live = live;
    if opts.grace_secs > 0 {
        live.extend(store.leased_since(now.saturating_sub(opts.grace_secs)));
    }
    for op in &ops {
        match op {
            Op::UnlinkBlob { .. } => report.blob_links_removed += 1,
            Op::DeleteManifest { .. } => report.manifests_removed += 1,
            _ => {}
        }
    }
    // 2. What the live blobs need: their recipes and chunks.
    let mut live_chunks: HashSet<ChunkId> = HashSet::new();
    let mut live_blobs: HashSet<[u8; 32]> = HashSet::new();
    for digest in &live {
        if let Ok(recipe) = store.recipe(digest) {
            live_blobs.insert(digest.index_key());
            for p in &recipe.pieces {
                if let RecipePiece::Chunk { id, .. } = p {
                    live_chunks.insert(*id);
                }
            }
        }
    }
    // Chunks that blob writers still running deduplicated against before this collection
    // started: their recipes do not exist yet, so nothing above names them.
    live_chunks.extend(store.writing_chunks());
    // Chunks of unfinished upload sessions (read after the running writers above: a session
    // whose writer ends meanwhile has logged its chunks by then).
    live_chunks.extend(store.upload_chunks()?);
    // 3. Live bytes per sealed segment, from the index files (no segment data is read).
    let (sealed, _active) = store.sealed_segments();
    let mut stats = Vec::new();
    let mut live_entries: HashMap<u64, Vec<(Table, [u8; 32], crate::index::Location)>> =
        HashMap::new();
    for id in sealed {
        // A segment kept in a bucket is compacted through it (its live records fetched back
        // into a new local segment); without a bucket to read from, it is left alone.
        if store.is_remote(id) && !store.has_remote() {
            continue;
        }
        let (size, mtime) = store.segment_size_and_age(id);
        report.bytes_before += size;
        let mut live_bytes = FILE_HEADER_LEN as u64;
        for (table, key, loc) in store.entries_in(id) {
            let needed = match table {
                Table::Chunks => live_chunks.contains(&ChunkId(key)),
                Table::Blobs => live_blobs.contains(&key),
            };
            if needed && store.current_location(table, &key) == Some(loc) {
                live_bytes += RECORD_HEADER_LEN as u64 + u64::from(loc.len);
                live_entries.entry(id).or_default().push((table, key, loc));
            }
        }
        stats.push(SegmentStats {
            id,
            size,
            live: live_bytes,
            mtime,
        });
    }
    report.segments_examined = stats.len() as u64;
    // 4. Plan and compact.
    let mut victims: HashSet<u64> = plan(&stats, now, opts).into_iter().collect();
    let folded = fold(&stats, &victims, now, opts);
    report.segments_folded = folded.len() as u64;
    victims.extend(folded);
    let victim_bytes: u64 = stats
        .iter()
        .filter(|s| victims.contains(&s.id))
        .map(|s| s.size)
        .sum();
    report.segments_compacted = victims.len() as u64;
    // What stays dead, and why: an operator who deleted an image wants to know.
    for s in stats.iter().filter(|s| !victims.contains(&s.id)) {
        let dead = s.size.saturating_sub(s.live);
        if s.size <= FILE_HEADER_LEN as u64 || dead == 0 {
            continue;
        }
        if s.mtime.saturating_add(opts.grace_secs) > now {
            report.dead_bytes_left_young += dead;
        } else {
            report.dead_bytes_left_below_fraction += dead;
        }
    }
    if opts.dry_run {
        let live_in_victims: u64 = stats
            .iter()
            .filter(|s| victims.contains(&s.id))
            .map(|s| s.live)
            .sum();
        report.bytes_moved = live_in_victims;
        report.bytes_reclaimed = victim_bytes.saturating_sub(live_in_victims);
        return Ok(report);
    }
    // Live records in the order they lie on disk, victim after victim: the reads are
    // sequential and are asked for ahead of the copy (readahead.rs).
    let mut order: Vec<u64> = victims.iter().copied().collect();
    order.sort_unstable();
    let mut entries = Vec::new();
    for id in &order {
        let mut e = live_entries.remove(id).unwrap_or_default();
        e.sort_unstable_by_key(|(_, _, loc)| loc.offset);
        entries.extend(e);
    }
    let mut copy = Copy {
        ahead: Prefetcher::new(store.read_ahead(), crate::readahead::COPY_REACH),
        asked: 0,
        bucket: Bucket::new(opts.pace_bytes_per_sec),
    };
    let mut at = 0;
    while at < entries.len() {
        let paced = store.has_writers();
        // Small batches while pushes run (each holds the writer lock once), large ones when
        // the disk is the compactor's alone.
        let budget = if paced { BATCH_PACED } else { BATCH_FULL };
        let mut end = at;
        let mut bytes = 0u64;
        while end < entries.len() && (end == at || bytes < budget) {
            bytes += RECORD_HEADER_LEN as u64 + u64::from(entries[end].2.len);
            end += 1;
        }
        copy.ask_ahead(store, &entries, end);
        if paced {
            report.paced_ms += copy.bucket.take(bytes, || store.has_writers());
        }
        let started = std::time::Instant::now();
        let moved = store.relocate_batch(&entries[at..end], &mut copy.ahead)?;
        report.copy_ms += started.elapsed().as_millis() as u64;
        report.bytes_moved += moved;
        if paced {
            report.bytes_moved_paced += moved;
        }
        at = end;
    }
    report.bytes_moved += store.gc_finish(&victims)?;
    report.bytes_reclaimed = victim_bytes.saturating_sub(report.bytes_moved);
    Ok(report)
}

/// A copy batch while pushes run: one writer-lock hold of about a millisecond.
const BATCH_PACED: u64 = 2 << 20;
/// A copy batch when no push runs.
const BATCH_FULL: u64 = 8 << 20;

/// The copy's read-ahead and pace.
struct Copy {
    ahead: Prefetcher,
    /// Entries before this index have been asked for.
    asked: usize,
    bucket: Bucket,
}

impl Copy {
    /// Keeps the records up to [`AHEAD_BYTES`] past the batch that ends at `end` asked for.
    fn ask_ahead(&mut self, store: &Store, entries: &[(Table, [u8; 32], Location)], end: usize) {
        if self.asked > end {
            return;
        }
        let mut bytes = 0u64;
        let (mut keys, mut locs) = (Vec::new(), Vec::new());
        while self.asked < entries.len() && (self.asked < end || bytes < AHEAD_BYTES) {
            let (_, key, loc) = entries[self.asked];
            bytes += RECORD_HEADER_LEN as u64 + u64::from(loc.len);
            keys.push(key);
            locs.push(loc);
            self.asked += 1;
        }
        self.ahead.ask(store, keys, &locs);
    }
}

/// A token bucket on bytes copied: tokens come at `rate` a second, up to one paced batch;
/// a copy that needs more than there are waits until they have come.
struct Bucket {
    rate: u64,
    tokens: f64,
    last: std::time::Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        Bucket {
            rate,
            tokens: BATCH_PACED as f64,
            last: std::time::Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = std::time::Instant::now();
        let add = now.duration_since(self.last).as_secs_f64() * self.rate as f64;
        self.tokens = (self.tokens + add).min(BATCH_PACED as f64);
        self.last = now;
    }

    /// Takes `bytes` tokens, waiting for them while `still` says pacing applies (writers
    /// still run); returns the milliseconds waited.
    fn take(&mut self, bytes: u64, still: impl Fn() -> bool) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        let started = std::time::Instant::now();
        self.refill();
        while self.tokens < bytes as f64 && still() {
            let missing = bytes as f64 - self.tokens;
            // Short naps, so the copy resumes at full speed soon after the pushes end.
            let nap = (missing / self.rate as f64).min(0.05);
            std::thread::sleep(std::time::Duration::from_secs_f64(nap));
            self.refill();
            if self.tokens >= BATCH_PACED as f64 {
                break;
            }
        }
        self.tokens -= bytes as f64;
        started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod writer_race {
    use super::*;
    use crate::testdata::seeded as random;
    use crate::{Options, Store};

    /// A push that deduplicates against an unreferenced old chunk just before a collection
    /// starts, and commits its recipe after it ended, must find the chunk still there. Two
    /// blobs are deduplicated the same way: one by a registered writer (as `BlobWriter`
    /// does), one without; only the registered writer's chunks survive, which shows the test
    /// would catch a missing registration.
    #[test]
    fn chunks_a_running_writer_deduplicated_survive_a_collection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(
            dir.path(),
            Options {
                segment_bytes_max: 256 * 1024,
                compress: false,
                ..Options::default()
            },
        )
        .expect("open");
        let (x, y) = (random(200_000, 1), random(200_000, 2));
        let chunks = |data: &[u8]| -> Vec<(ChunkId, Vec<u8>)> {
            data.chunks(50_000)
                .map(|c| (ChunkId::of(c), c.to_vec()))
                .collect()
        };
        for data in [&x, &y] {
            for (_, c) in chunks(data) {
                store.put_chunk(&c).expect("put");
            }
        }
        // Push unrelated data so both blobs' segments are sealed, then dedup against them.
        store.put_chunk(&random(600_000, 3)).expect("filler");
        store.seal_active().expect("seal");
        let writer = store.begin_write();
        for (id, c) in chunks(&x) {
            let (new, _) = store
                .put_chunk_with_id(id, &c, false, Some(writer))
                .expect("dedup");
            assert!(!new);
        }
        for (id, c) in chunks(&y) {
            store.put_chunk_with_id(id, &c, false, None).expect("dedup");
        }
        let opts = GcOptions {
            grace_secs: 0,
            dead_fraction_min: 0.1,
            ..GcOptions::default()
        };
        let report = collect(&store, &opts, crate::clock::now_secs() + 1).expect("gc");
        assert!(report.segments_compacted > 0, "{report:?}");
        for (id, c) in chunks(&x) {
            assert!(
                store.chunk_location(&id).is_some(),
                "a leased chunk was collected"
            );
            assert_eq!(store.read_chunk(&id).expect("read").as_ref(), &c[..]);
        }
        assert!(
            chunks(&y)
                .iter()
                .all(|(id, _)| store.chunk_location(id).is_none()),
            "without a registration the chunks go (the control)"
        );
        store.end_write(writer);
        assert!(store.writing_chunks().is_empty());
    }
}

/// A store with garbage, and a collection that keeps what a running writer pinned: for the
/// tests of pacing here and of compaction's end (`compact.rs`).
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::testdata::seeded as random;
    use crate::Store;

    /// A store whose sealed segments are two-thirds dead; returns the live chunks.
    pub(crate) fn garbage(store: &Store, seed: u64) -> Vec<(ChunkId, Vec<u8>)> {
        let mut live = Vec::new();
        for i in 0..150u64 {
            let c = random(100_000, seed + i);
            let (id, _) = store.put_chunk(&c).expect("put");
            if i % 3 == 0 {
                live.push((id, c));
            }
        }
        store.seal_active().expect("seal");
        live
    }

    pub(crate) fn collect_keeping(
        store: &Store,
        live: &[(ChunkId, Vec<u8>)],
        pace: u64,
    ) -> GcReport {
        // The live chunks are kept by a running writer's pins, as a push's dedup hits are.
        let writer = store.begin_write();
        for (id, c) in live {
            store
                .put_chunk_with_id(*id, c, false, Some(writer))
                .expect("pin");
        }
        let opts = GcOptions {
            grace_secs: 0,
            dead_fraction_min: 0.5,
            pace_bytes_per_sec: pace,
            ..GcOptions::default()
        };
        let report = collect(store, &opts, crate::clock::now_secs() + 1).expect("gc");
        store.end_write(writer);
        for (id, c) in live {
            assert_eq!(store.read_chunk(id).expect("read").as_ref(), &c[..]);
        }
        report
    }
}

#[cfg(test)]
mod pacing {
    use super::test_support::{collect_keeping, garbage};
    use crate::readahead::ReadAhead;
    use crate::{Options, Store};

    #[test]
    fn while_writers_run_the_copy_keeps_to_the_pace_and_reports_it() {
        for mode in [ReadAhead::Off, ReadAhead::Advise, ReadAhead::Uring] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(
                dir.path(),
                Options {
                    segment_bytes_max: 1 << 20,
                    compress: false,
                    read_ahead: mode,
                    ..Options::default()
                },
            )
            .expect("open");
            let live = garbage(&store, 1_000);
            // 5 MB of live data at 1 MiB/s: the first 2 MiB are the bucket's burst, the rest
            // waits about 2.8 s; far under the copy's own speed even on a loaded machine, so
            // the wait shows.
            let r = collect_keeping(&store, &live, 1 << 20);
            assert!(r.bytes_moved >= 5_000_000, "{mode:?}: {r:?}");
            assert!(r.paced_ms > 0, "{mode:?}: {r:?}");
            assert_eq!(r.bytes_moved_paced, r.bytes_moved, "{r:?}");
            let floor = (r.bytes_moved_paced.saturating_sub(2 << 20)) * 1000 / (1 << 20);
            // Tokens also come while a batch copies; milliseconds are rounded down per rest.
            let spent = r.paced_ms + r.copy_ms;
            assert!(spent + 50 >= floor, "{mode:?}: rested too little: {r:?}");
            // Rests alone never exceed what the bucket asks (the copy's own time, which a
            // loaded machine stretches, is not rest).
            assert!(
                r.paced_ms <= floor + 1000,
                "{mode:?}: rested too long: {r:?}"
            );
            // Unpaced, the same work does not rest.
            let live = garbage(&store, 2_000);
            let r = collect_keeping(&store, &live, 0);
            assert!(r.bytes_moved > 0 && r.paced_ms == 0, "{r:?}");
        }
    }
}
