//! Checkpoints: a consistent cut of a store, and a data directory rebuilt from one
//! (segments in a bucket, issue #22).

use std::sync::Arc;

use ballast_engine::checkpoint::{restore, Checkpoint};
use ballast_engine::clock::now_secs;
use ballast_engine::gc::{collect, GcOptions};
use ballast_engine::storage::RealStorage;
use ballast_engine::{verify, Options, Store};

use crate::gc::{collect_now, push_layer};
use crate::{seeded, sha256};

fn small() -> Options {
    Options {
        segment_bytes_max: 512 * 1024,
        compress: false,
        ..Options::default()
    }
}

/// Copies the cut's segments into `dir` as a restore does, byte for byte.
fn copy_segments(cp: &Checkpoint, dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("segments")).expect("mkdir");
    for seg in &cp.segments {
        let mut bytes = vec![0u8; seg.len() as usize];
        seg.read_at(&mut bytes, 0).expect("read segment");
        std::fs::write(restore::segment_file(dir, seg.id()), &bytes).expect("write");
    }
}

#[test]
fn a_checkpoint_rebuilds_the_store_as_it_was_even_after_a_collection_removed_its_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), small()).expect("open");
    let mut images = Vec::new();
    for i in 0..12u64 {
        let data = seeded(200_000 + i as usize * 7_000, 500 + i);
        images.push(push_layer(
            &store,
            &format!("team/app{}", i % 3),
            &format!("v{i}"),
            data,
        ));
    }
    let before = store.change_position();
    let cp = store.checkpoint().expect("checkpoint");
    assert_ne!(
        store.change_position(),
        before,
        "the active segment was sealed"
    );
    let state = store.catalog().read().clone();
    assert!(cp.segments.len() >= 4, "{} segments", cp.segments.len());
    assert_eq!(cp.repos, 3);
    assert!(cp
        .segments
        .windows(2)
        .all(|w| w[0].id() < w[1].id() && !w[1].is_empty()));
    let newest = cp.segments.last().map(|s| s.id()).expect("a segment");
    assert_eq!(
        store.segment_ids().last().copied(),
        Some(newest + 1),
        "the segment after the cut is the new active one"
    );

    // After the cut the store goes on: new pushes, and a collection that removes segments
    // the cut lists. The cut's handles still read them.
    let extra = seeded(300_000, 99);
    store.put_blob(&extra, None).expect("put after");
    for (_, _, md, _) in images.iter().take(6) {
        store
            .commit_ops(vec![ballast_engine::catalog::Op::DeleteManifest {
                repo: state
                    .repos
                    .iter()
                    .find(|(_, r)| r.manifests.contains_key(md))
                    .map(|(n, _)| n.clone())
                    .expect("repo of manifest"),
                digest: md.clone(),
            }])
            .expect("delete");
    }
    let mut unlinks = Vec::new();
    for (name, repo) in &store.catalog().read().repos {
        for (d, _, _, _) in images.iter().take(6) {
            if repo.blobs.contains_key(d) {
                unlinks.push(ballast_engine::catalog::Op::UnlinkBlob {
                    repo: name.clone(),
                    digest: d.clone(),
                });
            }
        }
    }
    store.commit_ops(unlinks).expect("unlink");
    store.seal_active().expect("seal");
    let gc = collect_now(&store);
    assert!(gc.segments_compacted > 0, "{gc:?}");
    let gone: Vec<u64> = cp
        .segments
        .iter()
        .map(|s| s.id())
        .filter(|id| store.segment_was_collected(*id))
        .collect();
    assert!(
        !gone.is_empty(),
        "the collection removed a segment of the cut"
    );

    let restored = tempfile::tempdir().expect("tempdir");
    let target = restored.path().join("data");
    copy_segments(&cp, &target);
    let warnings = restore::finish(
        Arc::new(RealStorage),
        &target,
        cp.generation,
        &cp.snapshot,
        small(),
    )
    .expect("finish");
    assert!(warnings.is_empty(), "{warnings:?}");

    let back = Store::open(&target, small()).expect("open restored");
    assert!(
        back.open_warnings().is_empty(),
        "{:?}",
        back.open_warnings()
    );
    let got = back.catalog().read().clone();
    assert_eq!(got.repos, state.repos, "the catalog as it was at the cut");
    for (d, data, md, manifest) in &images {
        assert_eq!(&back.read_blob(d).expect("layer"), data);
        assert_eq!(&back.read_blob(md).expect("manifest"), manifest);
    }
    assert!(!back.contains(&sha256(&extra)), "pushed after the cut");
    let report = verify::fsck(&back, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    // The restored store takes new writes in a segment after the restored ones.
    assert!(back.segment_ids().last().copied() > Some(newest));
    let more = seeded(100_000, 7);
    back.put_blob(&more, None).expect("put restored");
    drop(back);
    let again = Store::open(&target, small()).expect("reopen restored");
    assert_eq!(again.read_blob(&sha256(&more)).expect("new blob"), more);
    assert!(verify::fsck(&again, &|_, _, _| {}).is_clean());
}

#[test]
fn a_checkpoint_without_changes_seals_nothing_and_install_refuses_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), small()).expect("open");
    let data = seeded(100_000, 3);
    store.put_blob(&data, None).expect("put");
    let first = store.checkpoint().expect("first");
    let at = store.change_position();
    let second = store.checkpoint().expect("second");
    assert_eq!(store.change_position(), at, "nothing new: nothing sealed");
    let ids = |c: &Checkpoint| c.segments.iter().map(|s| s.id()).collect::<Vec<_>>();
    assert_eq!(ids(&first), ids(&second));
    assert_eq!(first.snapshot, second.snapshot);

    // A snapshot goes only into an empty catalog, and only when it reads back as one.
    let storage = RealStorage;
    let target = tempfile::tempdir().expect("tempdir");
    let catalog = target.path().join("catalog");
    let mut bad = first.snapshot.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = ballast_engine::catalog::install_snapshot(&storage, &catalog, 5, &bad)
        .expect_err("damaged snapshot");
    assert!(err.is_corruption(), "{err}");
    assert!(std::fs::read_dir(&catalog).expect("ls").next().is_none());
    ballast_engine::catalog::install_snapshot(&storage, &catalog, 5, &first.snapshot)
        .expect("install");
    let err = ballast_engine::catalog::install_snapshot(&storage, &catalog, 6, &first.snapshot)
        .expect_err("a catalog is there");
    assert!(err.to_string().contains("holds a catalog already"), "{err}");
}

#[test]
fn small_segments_that_checkpoints_sealed_are_folded_together_by_a_collection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        compress: false,
        ..Options::default()
    };
    let store = Store::open(dir.path(), opts.clone()).expect("open");
    let mut images = Vec::new();
    for i in 0..6u64 {
        let data = seeded(40_000 + i as usize * 1_000, 900 + i);
        images.push(push_layer(&store, "team/app", &format!("v{i}"), data));
        // Each shipment's cut seals the active segment: one small segment per checkpoint.
        drop(store.checkpoint().expect("checkpoint"));
    }
    let sealed_before = store.segment_ids().len() - 1;
    assert!(sealed_before >= 6, "{sealed_before} sealed segments");
    let gc = |fold_below_bytes| {
        collect(
            &store,
            &GcOptions {
                grace_secs: 0,
                fold_below_bytes,
                ..GcOptions::default()
            },
            now_secs(),
        )
        .expect("collect")
    };
    // Off by default: nothing is dead, nothing is compacted.
    let off = gc(0);
    assert_eq!((off.segments_compacted, off.segments_folded), (0, 0));
    let on = gc(1 << 20);
    assert!(on.segments_folded >= 6, "{on:?}");
    assert_eq!(on.segments_compacted, on.segments_folded);
    assert!(
        on.bytes_moved > 0 && on.bytes_reclaimed < on.bytes_moved,
        "{on:?}"
    );
    let sealed_after = store.segment_ids().len() - 1;
    assert!(
        sealed_after < sealed_before,
        "{sealed_before} sealed segments before, {sealed_after} after"
    );
    for (d, data, md, manifest) in &images {
        assert_eq!(&store.read_blob(d).expect("layer"), data);
        assert_eq!(&store.read_blob(md).expect("manifest"), manifest);
    }
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    drop(store);
    let again = Store::open(dir.path(), opts).expect("reopen");
    for (d, data, _, _) in &images {
        assert_eq!(&again.read_blob(d).expect("layer after reopen"), data);
    }
    assert!(verify::fsck(&again, &|_, _, _| {}).is_clean());
}
