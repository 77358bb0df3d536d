//! Garbage collection: mark what the catalog still needs, then compact the segments that are
//! mostly dead (docs/design.md, "Garbage collection"). `mark` and `plan` are pure; `collect`
//! does the I/O. Runs online: pushes and pulls continue, writers pin what they reuse.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::catalog::{Op, State};
use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Result};
use crate::index::Table;
use crate::recipe::RecipePiece;
use crate::segment::{FILE_HEADER_LEN, RECORD_HEADER_LEN};
use crate::store::Store;

/// Seconds since the Unix epoch: the clock of grace periods, link times and segment ages.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace_secs: 3600,
            delete_untagged: false,
            dead_fraction_min: 0.5,
            dry_run: false,
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
    /// Segments compacted away.
    pub segments_compacted: u64,
    /// Bytes of segment files before.
    pub bytes_before: u64,
    /// Live bytes copied forward.
    pub bytes_moved: u64,
    /// Bytes freed: compacted segments' sizes minus what was copied forward.
    pub bytes_reclaimed: u64,
}

/// Marks one catalog state: the ops that drop what nothing needs, and every digest (blob or
/// manifest, any repository) that stays.
pub fn mark(state: &State, now: u64, opts: &GcOptions) -> (Vec<Op>, HashSet<Digest>) {
    let cutoff = now.saturating_sub(opts.grace_secs);
    let mut ops = Vec::new();
    let mut live_all = HashSet::new();
    for (name, repo) in &state.repos {
        let mut live: HashSet<&Digest> = repo.tags.values().collect();
        for (d, link) in &repo.manifests {
            if !opts.delete_untagged || link.pushed_at > cutoff {
                live.insert(d);
            }
        }
        // Close over references (index → manifests) and referrers (subject → referrer).
        let mut blobs: HashSet<&Digest> = HashSet::new();
        loop {
            let before = live.len();
            for d in live.clone() {
                if let Some(link) = repo.manifests.get(d) {
                    for r in &link.references {
                        if repo.manifests.contains_key(r) {
                            live.insert(r);
                        } else {
                            blobs.insert(r);
                        }
                    }
                }
            }
            for (d, link) in &repo.manifests {
                if link.subject.as_ref().is_some_and(|s| live.contains(s)) {
                    live.insert(d);
                }
            }
            if live.len() == before {
                break;
            }
        }
        for d in repo.manifests.keys() {
            if live.contains(d) {
                live_all.insert(d.clone());
            } else {
                ops.push(Op::DeleteManifest {
                    repo: name.clone(),
                    digest: d.clone(),
                });
            }
        }
        for (d, at) in &repo.blobs {
            if blobs.contains(d) || *at > cutoff {
                live_all.insert(d.clone());
            } else {
                ops.push(Op::UnlinkBlob {
                    repo: name.clone(),
                    digest: d.clone(),
                });
            }
        }
    }
    (ops, live_all)
}

/// A sealed segment as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentStats {
    /// Segment id.
    pub id: u64,
    /// File size.
    pub size: u64,
    /// Bytes of records something still needs.
    pub live: u64,
    /// Last modification, seconds since the epoch.
    pub mtime: u64,
}

/// Chooses the segments to compact: dead fraction at or above the threshold (half of it for
/// segments older than a week), and older than the grace period (a segment written within
/// it may hold a blob committed but not linked yet).
pub fn plan(segments: &[SegmentStats], now: u64, opts: &GcOptions) -> Vec<u64> {
    const WEEK: u64 = 7 * 24 * 3600;
    segments
        .iter()
        .filter(|s| s.size > FILE_HEADER_LEN as u64)
        .filter(|s| s.mtime.saturating_add(opts.grace_secs) <= now)
        .filter(|s| {
            let dead = s.size.saturating_sub(s.live) as f64 / s.size as f64;
            let min = if s.mtime.saturating_add(WEEK) <= now {
                opts.dead_fraction_min / 2.0
            } else {
                opts.dead_fraction_min
            };
            dead >= min
        })
        .map(|s| s.id)
        .collect()
}

/// Runs one collection.
pub fn collect(store: &Store, opts: &GcOptions, now: u64) -> Result<GcReport> {
    let _one_at_a_time = store.gc_start().ok_or_else(|| {
        Error::invalid(
            "gc",
            "a collection is already running; try again when it ends",
        )
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
    let (ops, live) = if opts.dry_run {
        mark(&store.catalog().read(), now, opts)
    } else {
        store.catalog().commit_with(|state| {
            let (ops, live) = mark(state, now, opts);
            Ok((ops.clone(), (ops, live)))
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
    // 3. Live bytes per sealed segment, from the index files (no segment data is read).
    let (sealed, _active) = store.sealed_segments();
    let mut stats = Vec::new();
    let mut live_entries: HashMap<u64, Vec<(Table, [u8; 32], crate::index::Location)>> =
        HashMap::new();
    for id in sealed {
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
    let victims: HashSet<u64> = plan(&stats, now, opts).into_iter().collect();
    let victim_bytes: u64 = stats
        .iter()
        .filter(|s| victims.contains(&s.id))
        .map(|s| s.size)
        .sum();
    report.segments_compacted = victims.len() as u64;
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
    // Copied in batches of about 2 MiB: one writer-lock hold per batch.
    const BATCH_BYTES: u64 = 2 << 20;
    let relocate = |batch: &[(Table, [u8; 32], crate::index::Location)]| -> Result<u64> {
        let started = std::time::Instant::now();
        let moved = store.relocate_batch(batch)?;
        // Pushes come first: while blob writers run, the compactor rests as long as the batch
        // took, so it never takes more than half of what the machine gives them.
        if store.has_writers() {
            std::thread::sleep(started.elapsed());
        }
        Ok(moved)
    };
    for id in &victims {
        let entries = live_entries.remove(id).unwrap_or_default();
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        for entry in entries {
            batch_bytes += u64::from(entry.2.len);
            batch.push(entry);
            if batch_bytes >= BATCH_BYTES {
                report.bytes_moved += relocate(&batch)?;
                batch.clear();
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            report.bytes_moved += relocate(&batch)?;
        }
    }
    report.bytes_moved += store.gc_finish(&victims)?;
    report.bytes_reclaimed = victim_bytes.saturating_sub(report.bytes_moved);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ManifestLink, Repo};
    use crate::digest::Algorithm;

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    fn manifest(refs: &[&str], subject: Option<&str>, pushed_at: u64) -> ManifestLink {
        ManifestLink {
            media_type: "m".into(),
            size: 1,
            artifact_type: None,
            annotations: Default::default(),
            subject: subject.map(d),
            references: refs.iter().map(|r| d(r)).collect(),
            pushed_at,
        }
    }

    fn state() -> State {
        let mut repo = Repo::default();
        for b in ["cfg", "layer", "old-layer", "fresh-layer", "child-cfg"] {
            repo.blobs
                .insert(d(b), if b == "fresh-layer" { 990 } else { 10 });
        }
        repo.manifests
            .insert(d("m1"), manifest(&["cfg", "layer"], None, 10));
        repo.manifests
            .insert(d("child"), manifest(&["child-cfg"], None, 10));
        repo.manifests
            .insert(d("index"), manifest(&["child"], None, 10));
        repo.manifests
            .insert(d("sig"), manifest(&["layer"], Some("m1"), 10));
        repo.manifests
            .insert(d("untagged"), manifest(&["old-layer"], None, 10));
        repo.tags.insert("v1".into(), d("m1"));
        repo.tags.insert("multi".into(), d("index"));
        State {
            repos: [("r".to_owned(), repo)].into(),
        }
    }

    #[test]
    fn mark_keeps_what_tags_reach() {
        let opts = GcOptions {
            grace_secs: 100,
            ..GcOptions::default()
        };
        let (ops, live) = mark(&state(), 1000, &opts);
        // Untagged manifests are kept by default, and so is what they reference.
        assert!(ops.is_empty(), "{ops:?}");
        assert!(live.contains(&d("old-layer")) && live.contains(&d("untagged")));

        let opts = GcOptions {
            grace_secs: 100,
            delete_untagged: true,
            ..GcOptions::default()
        };
        let (ops, live) = mark(&state(), 1000, &opts);
        for keep in [
            "m1",
            "cfg",
            "layer",
            "index",
            "child",
            "child-cfg",
            "sig",
            "fresh-layer",
        ] {
            assert!(live.contains(&d(keep)), "{keep} must stay");
        }
        assert!(!live.contains(&d("untagged")) && !live.contains(&d("old-layer")));
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(ops.contains(&Op::DeleteManifest {
            repo: "r".into(),
            digest: d("untagged")
        }));
        assert!(ops.contains(&Op::UnlinkBlob {
            repo: "r".into(),
            digest: d("old-layer")
        }));
    }

    #[test]
    fn plan_takes_mostly_dead_old_enough_segments() {
        let opts = GcOptions {
            grace_secs: 100,
            ..GcOptions::default()
        };
        let s = |id, size, live, mtime| SegmentStats {
            id,
            size,
            live,
            mtime,
        };
        let now = 1_000_000_000;
        let segs = [
            s(1, 1000, 400, now - 200),           // 60% dead: compact
            s(2, 1000, 600, now - 200),           // 40% dead: keep
            s(3, 1000, 0, now - 50),              // all dead but within grace: keep
            s(4, 1000, 700, now - 8 * 24 * 3600), // 30% dead, older than a week: compact
            s(5, 16, 16, now - 200),              // empty: nothing to gain
        ];
        assert_eq!(plan(&segs, now, &opts), vec![1, 4]);
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
        let report = collect(&store, &opts, now_secs() + 1).expect("gc");
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
