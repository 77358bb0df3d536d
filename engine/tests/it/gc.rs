//! Garbage collection: what nothing links is reclaimed, what something links survives, also
//! while writers, readers and deleters run concurrently.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_engine::catalog::{ManifestLink, Op};
use ballast_engine::clock::now_secs;
use ballast_engine::gc::{collect, GcOptions};
use ballast_engine::{inspect, verify, Digest, Options, Store};

use crate::{seeded, sha256};

fn link(store: &Store, repo: &str, d: &Digest, at: u64) {
    let op = Op::LinkBlob {
        repo: repo.into(),
        digest: d.clone(),
        at,
    };
    store.commit_ops(vec![op]).expect("link");
}

/// Publishes `blob` under `repo:tag` through a stored manifest that references it, as a push
/// does; returns the manifest digest.
fn publish(store: &Store, repo: &str, tag: &str, blob: &Digest) -> Digest {
    try_publish(store, repo, tag, blob).expect("publish").0
}

/// A collection now, with no grace and anything at least 1% dead compacted.
pub fn collect_now(store: &Store) -> ballast_engine::gc::GcReport {
    collect(
        store,
        &GcOptions {
            grace_secs: 0,
            dead_fraction_min: 0.01,
            ..GcOptions::default()
        },
        now_secs(),
    )
    .expect("collect")
}

/// Stores `data` as a layer of `repo`, linked, and a manifest of it tagged `tag`: (layer
/// digest, layer, manifest digest, manifest).
pub fn push_layer(
    store: &Store,
    repo: &str,
    tag: &str,
    data: Vec<u8>,
) -> (Digest, Vec<u8>, Digest, Vec<u8>) {
    let d = sha256(&data);
    store.put_blob(&data, None).expect("put");
    store
        .commit_ops(vec![Op::LinkBlob {
            repo: repo.into(),
            digest: d.clone(),
            at: 1,
        }])
        .expect("link");
    let (md, manifest) = try_publish(store, repo, tag, &d).expect("publish");
    (d, data, md, manifest)
}

/// [`publish`] that reports failures (for crash tests); returns the manifest's digest and
/// bytes.
pub fn try_publish(
    store: &Store,
    repo: &str,
    tag: &str,
    blob: &Digest,
) -> ballast_engine::Result<(Digest, Vec<u8>)> {
    let manifest =
        format!("{{\"schemaVersion\":2,\"layers\":[\"{blob}\"],\"tag\":\"{tag}\"}}").into_bytes();
    let md = sha256(&manifest);
    store.put_blob(&manifest, None)?;
    let link = ManifestLink {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: manifest.len() as u64,
        artifact_type: None,
        annotations: Default::default(),
        subject: None,
        references: vec![blob.clone()],
        pushed_at: now_secs(),
        origin: None,
    };
    store.commit_catalog(|state| {
        // As the server does: the layer must be linked in the repository at commit time (a
        // collection may have removed an old link meanwhile; the client then uploads again).
        if !state
            .repos
            .get(repo)
            .is_some_and(|r| r.blobs.contains_key(blob))
        {
            return Err(ballast_engine::Error::NotFound(format!(
                "blob {blob} is not in {repo}"
            )));
        }
        Ok((
            vec![
                Op::PutManifest {
                    repo: repo.into(),
                    digest: md.clone(),
                    link,
                },
                Op::Tag {
                    repo: repo.into(),
                    tag: tag.into(),
                    digest: md.clone(),
                    at: 0,
                },
            ],
            (),
        ))
    })?;
    Ok((md, manifest))
}

fn small() -> Options {
    Options {
        segment_bytes_max: 512 * 1024,
        compress: false,
        ..Options::default()
    }
}

#[test]
fn gc_reclaims_exactly_what_nothing_links() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), small()).expect("open");
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for i in 0..40u64 {
        let data = seeded(150_000 + i as usize * 1000, 2 * i + 1001);
        let d = sha256(&data);
        store.put_blob(&data, None).expect("put");
        link(&store, "repo", &d, 1);
        if i % 2 == 0 {
            publish(&store, "repo", &format!("t{i}"), &d);
            kept.push(data);
        } else {
            // Pushed long ago and referenced by no manifest: garbage once the grace is over.
            dropped.push(data);
        }
    }
    store.clone().close().expect("seal");
    drop(store);
    let store = Store::open(dir.path(), small()).expect("reopen");
    let before = inspect::inspect(&store).expect("inspect");
    assert!(before.dead_bytes > 2_800_000, "{before:?}");

    let opts = GcOptions {
        grace_secs: 0,
        dead_fraction_min: 0.01,
        ..GcOptions::default()
    };
    let dry = collect(
        &store,
        &GcOptions {
            dry_run: true,
            ..opts.clone()
        },
        now_secs(),
    )
    .expect("dry run");
    assert!(dry.segments_compacted > 0 && dry.bytes_reclaimed > 0);
    assert_eq!(
        inspect::inspect(&store).expect("inspect").segment_bytes,
        before.segment_bytes,
        "dry run changes nothing"
    );

    let report = collect(&store, &opts, now_secs()).expect("gc");
    assert_eq!(report.segments_compacted, dry.segments_compacted);
    let after = inspect::inspect(&store).expect("inspect");
    let freed = before.segment_bytes - after.segment_bytes;
    // What was freed is the dead bytes (within the per-segment headers and sync marks).
    assert!(
        freed * 100 >= before.dead_bytes * 97,
        "freed {freed} of {} dead",
        before.dead_bytes
    );
    assert!(
        freed <= before.dead_bytes + 64 * 1024,
        "freed {freed} of {} dead",
        before.dead_bytes
    );
    for data in &kept {
        assert_eq!(&store.read_blob(&sha256(data)).expect("kept blob"), data);
    }
    for data in &dropped {
        assert!(
            !store.contains(&sha256(data)),
            "collected blob must not be visible"
        );
    }
    assert!(verify::fsck(&store, &|_, _, _| {}).is_clean());
    drop(store);
    let store = Store::open(dir.path(), small()).expect("reopen after gc");
    for data in &kept {
        assert_eq!(
            &store
                .read_blob(&sha256(data))
                .expect("kept blob after reopen"),
            data
        );
    }
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    // A collected blob can be pushed again.
    store.put_blob(&dropped[0], None).expect("re-push");
    assert_eq!(
        store.read_blob(&sha256(&dropped[0])).expect("re-pushed"),
        dropped[0]
    );
}

#[test]
fn gc_online_with_concurrent_pushes_pulls_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), small()).expect("open");
    // Blobs that get deleted and pushed again while collections run: re-pushes deduplicate
    // against chunks a collection considers dead.
    let pool: Vec<Vec<u8>> = (0..12u64).map(|i| seeded(120_000, 2 * i + 5001)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..2u64 {
        let (store, stop, pool) = (store.clone(), stop.clone(), pool.clone());
        handles.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let repo = format!("w{t}");
                let data = if i.is_multiple_of(3) {
                    pool[(i as usize + t as usize) % pool.len()].clone()
                } else {
                    seeded(90_000, 2 * (t * 1_000_000 + i) + 1)
                };
                let d = sha256(&data);
                // A client whose manifest is refused because a collection took its layer's
                // link (under heavy load, the link can outlive the 1 s grace before the
                // manifest arrives) uploads the layer again, as registries clients do.
                let mut attempts = 0;
                let md = loop {
                    store.put_blob(&data, None).expect("push during gc");
                    link(&store, &repo, &d, now_secs());
                    match try_publish(&store, &repo, &format!("t{i}"), &d) {
                        Ok((md, _)) => break md,
                        Err(e) if attempts < 5 => {
                            attempts += 1;
                            eprintln!("retrying a push refused meanwhile: {e}");
                        }
                        Err(e) => panic!("publish: {e}"),
                    }
                };
                // Read back what was just pushed, and delete every other image again (its
                // layer becomes garbage once the grace period is over).
                assert_eq!(store.read_blob(&d).expect("pull during gc"), data);
                if i % 2 == 1 {
                    let op = Op::DeleteManifest {
                        repo: repo.clone(),
                        digest: md,
                    };
                    store.commit_ops(vec![op]).expect("delete");
                }
                i += 1;
            }
            i
        }));
    }
    let opts = GcOptions {
        grace_secs: 1,
        dead_fraction_min: 0.2,
        ..GcOptions::default()
    };
    let started = Instant::now();
    let mut runs = 0;
    let mut compacted = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let r = collect(&store, &opts, now_secs()).expect("gc");
        compacted += r.segments_compacted;
        runs += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let pushed: u64 = handles.into_iter().map(|h| h.join().expect("writer")).sum();
    assert!(
        runs > 10 && pushed > 50,
        "{runs} collections, {pushed} pushes"
    );
    assert!(
        compacted > 0,
        "collections compacted nothing in {runs} runs"
    );
    // Everything still linked reads back byte-exact, now and after a reopen.
    let check = |store: &Store| {
        let linked: Vec<Digest> = store
            .catalog()
            .read()
            .repos
            .values()
            .flat_map(|r| r.blobs.keys().chain(r.manifests.keys()).cloned())
            .collect();
        assert!(!linked.is_empty());
        for d in &linked {
            let bytes = store
                .read_blob(d)
                .unwrap_or_else(|e| panic!("linked blob {d} lost: {e}"));
            assert_eq!(&sha256(&bytes), d);
        }
        let report = verify::fsck(store, &|_, _, _| {});
        assert!(report.is_clean(), "{:?}", report.findings);
    };
    check(&store);
    drop(store);
    check(&Store::open(dir.path(), small()).expect("reopen"));
}

fn removed_list(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("removed-segments"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().expect("segment id"))
        .collect()
}

/// The list of segments collections removed keeps an id only while an index file still names
/// that segment: once merges have dropped its entries, the next collection forgets it, so the
/// list (read at every open) does not grow with the store's history.
#[test]
fn removed_segments_are_forgotten_once_no_index_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), small()).expect("open");
    let opts = GcOptions {
        grace_secs: 0,
        dead_fraction_min: 0.01,
        ..GcOptions::default()
    };
    // Garbage (blobs nothing links), sealed, then a collection.
    let collect_garbage = |blobs: u64, seed: u64| {
        for i in 0..blobs {
            store
                .put_blob(&seeded(150_000, seed + i), None)
                .expect("put");
        }
        store.seal_active().expect("seal");
        collect(&store, &opts, now_secs()).expect("gc");
        removed_list(dir.path())
    };
    let first = collect_garbage(6, 5000);
    assert!(!first.is_empty(), "the first collection removed segments");

    // Many more segments (kept), so the index files of the removed ones merge away.
    let mut kept = Vec::new();
    for i in 0..60u64 {
        let data = seeded(100_000, 7000 + i);
        let d = sha256(&data);
        store.put_blob(&data, None).expect("put");
        link(&store, "repo", &d, now_secs());
        publish(&store, "repo", &format!("k{i}"), &d);
        kept.push(data);
    }
    store.seal_active().expect("seal");
    let named_before: std::collections::HashSet<u64> = store
        .index_files()
        .iter()
        .flat_map(|f| {
            f.iter(ballast_engine::index::Table::Chunks)
                .chain(f.iter(ballast_engine::index::Table::Blobs))
                .map(|(_, l)| l.segment)
                .collect::<Vec<_>>()
        })
        .collect();
    let still_named: Vec<u64> = first
        .iter()
        .copied()
        .filter(|id| named_before.contains(id))
        .collect();
    assert!(
        still_named.len() < first.len(),
        "merges dropped the entries of some removed segments ({still_named:?} of {first:?})"
    );

    // More garbage, and a second collection.
    let second = collect_garbage(3, 9000);
    for id in &first {
        assert_eq!(
            second.contains(id),
            still_named.contains(id),
            "segment {id}: kept in the list exactly while an index names it"
        );
    }
    assert!(
        second.iter().any(|id| !first.contains(id)),
        "the second collection's victims are listed"
    );
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    drop(store);
    let store = Store::open(dir.path(), small()).expect("reopen");
    for data in &kept {
        assert_eq!(&store.read_blob(&sha256(data)).expect("kept"), data);
    }
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
}

/// A segment's age comes through the storage, so the grace period holds on `SimStorage` as
/// on a disk: a segment written just now is kept whatever its dead bytes, and the same
/// segment aged past the grace period is compacted. (The age was read with std::fs, which
/// finds no file under SimStorage and took every segment for ancient.)
#[test]
fn the_grace_period_holds_on_simulated_storage() {
    use ballast_engine::storage::SimStorage;
    let sim = SimStorage::new();
    let dir = std::path::Path::new("/grace");
    let store = Store::open_on(
        Arc::new(sim.clone()),
        dir,
        Options {
            segment_bytes_max: 1 << 20,
            ..Options::default()
        },
    )
    .expect("open");
    let dead = store.put_blob(&seeded(300_000, 1), None).expect("dead");
    let first = store.segment_ids()[0];
    store.seal_active().expect("seal");
    // Two hours on, the blob's lease (grace period from its commit) is over: only the
    // segment's own age can keep it.
    let later = now_secs() + 7200;
    let opts = GcOptions {
        grace_secs: 3600,
        ..GcOptions::default()
    };
    let path = store.segment_path(first);
    sim.set_modified(&path, later - 600);
    let r = collect(&store, &opts, later).expect("gc");
    assert_eq!(r.segments_compacted, 0, "written 10 minutes before: {r:?}");
    assert!(store.contains(&dead.recipe.digest));
    sim.set_modified(&path, later - 7200);
    let r = collect(&store, &opts, later).expect("gc");
    assert_eq!(r.segments_compacted, 1, "aged past the grace period: {r:?}");
    assert!(!store.contains(&dead.recipe.digest), "nothing linked it");
}

/// A link a client was just told exists (HEAD or GET of the blob in that repository) stays
/// through the grace period even when nothing references it yet: the client skips the
/// upload and pushes a manifest naming it (Distribution's issue #4569).
#[test]
fn a_touched_link_outlives_its_grace_period_from_the_touch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Options::default()).expect("open");
    let now = now_secs();
    let opts = GcOptions {
        grace_secs: 3600,
        ..GcOptions::default()
    };
    let mut digests = Vec::new();
    for (i, repo) in ["touched", "untouched"].iter().enumerate() {
        let b = store
            .put_blob(&seeded(50_000, 40 + i as u64), None)
            .expect("blob");
        // Linked two hours ago: past the grace period, and nothing references it.
        link(&store, repo, &b.recipe.digest, now - 7200);
        digests.push(b.recipe.digest.clone());
    }
    store.touch_link("touched", &digests[0]);
    let r = collect(&store, &opts, now).expect("gc");
    assert_eq!(r.blob_links_removed, 1, "{r:?}");
    let state = store.catalog().read();
    assert!(state.repos["touched"].blobs.contains_key(&digests[0]));
    assert!(!state
        .repos
        .get("untouched")
        .is_some_and(|r| r.blobs.contains_key(&digests[1])));
    drop(state);
    // Past the grace period from the touch, it goes too.
    let r = collect(&store, &opts, now + 3601).expect("gc");
    assert_eq!(r.blob_links_removed, 1, "{r:?}");
}

/// A cached manifest (format 4 `origin`) may reference blobs the repository does not hold
/// yet: fsck accepts that for it alone, GC keeps it and keeps what it references once held.
#[test]
fn cached_manifests_may_reference_what_is_not_fetched_yet() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), small()).expect("open");
    let absent = sha256(b"a layer the cache has not fetched");
    let layer = seeded(50_000, 41);
    let held = store
        .put_blob(&layer, None)
        .expect("put")
        .recipe
        .digest
        .clone();
    link(&store, "cache/up/app", &held, now_secs());
    let put = |tag: &str, origin: Option<&str>| {
        let manifest = format!("{{\"tag\":\"{tag}\"}}").into_bytes();
        let md = store
            .put_blob(&manifest, None)
            .expect("manifest")
            .recipe
            .digest
            .clone();
        let link = ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: manifest.len() as u64,
            artifact_type: None,
            annotations: Default::default(),
            subject: None,
            references: vec![held.clone(), absent.clone()],
            pushed_at: now_secs(),
            origin: origin.map(str::to_owned),
        };
        store
            .commit_ops(vec![
                Op::PutManifest {
                    repo: "cache/up/app".into(),
                    digest: md.clone(),
                    link,
                },
                Op::Tag {
                    repo: "cache/up/app".into(),
                    tag: tag.into(),
                    digest: md,
                    at: now_secs(),
                },
            ])
            .expect("commit");
    };
    put("cached", Some("http://127.0.0.1:5000/app"));
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    let opts = GcOptions {
        grace_secs: 0,
        ..Default::default()
    };
    collect(&store, &opts, now_secs() + 10).expect("gc");
    assert_eq!(store.read_blob(&held).expect("kept"), layer);
    // The same manifest pushed (no origin) is missing a blob.
    put("pushed", None);
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.code == verify::FindingCode::ReferenceDangling),
        "{:?}",
        report.findings
    );
}
