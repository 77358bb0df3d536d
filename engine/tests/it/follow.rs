//! A read replica's store (`store/follow.rs`): it follows a primary through the
//! checkpoints the primary ships (the segments and one index file per segment, and the
//! catalog), reads every record through the remote, takes no write, and survives a
//! reopen. The "bucket" here is a directory of what a primary shipped.

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_engine::catalog::Op;
use ballast_engine::checkpoint::restore;
use ballast_engine::store::FOLLOWER_SEGMENT;
use ballast_engine::{verify, Digest, Error, Options, Store};

use crate::gc::{collect_now, push_layer};
use crate::remote::{opts, Shelf};
use crate::seeded;

fn follower() -> Options {
    Options {
        follower: true,
        ..opts()
    }
}

/// What a shipment puts in the bucket: the new segments' bytes on the shelf, every listed
/// segment's index file, and the catalog.
struct Shipped {
    snapshot: Vec<u8>,
    listed: Vec<(u64, u64)>,
    indexes: BTreeMap<u64, Vec<u8>>,
}

fn ship(primary: &Store, shelf: &Shelf) -> Shipped {
    let cp = primary.checkpoint().expect("checkpoint");
    std::fs::create_dir_all(shelf.dir.join("segments")).expect("mkdir");
    let mut indexes = BTreeMap::new();
    for seg in &cp.segments {
        let path = restore::segment_file(&shelf.dir, seg.id());
        if !path.exists() {
            let mut bytes = vec![0u8; seg.len() as usize];
            seg.read_at(&mut bytes, 0).expect("read");
            std::fs::write(path, bytes).expect("write");
        }
        indexes.insert(seg.id(), primary.segment_index(seg.id()).expect("index"));
    }
    Shipped {
        snapshot: cp.snapshot.clone(),
        listed: cp.segments.iter().map(|s| (s.id(), s.len())).collect(),
        indexes,
    }
}

fn push(store: &Store, tag: &str, seed: u64) -> (Digest, Vec<u8>, Digest) {
    let (d, data, md, _) = push_layer(
        store,
        "team/app",
        tag,
        seeded(120_000 + seed as usize * 3_000, seed),
    );
    (d, data, md)
}

fn tags(store: &Store) -> BTreeMap<String, Digest> {
    store
        .catalog()
        .read()
        .repos
        .get("team/app")
        .map(|r| r.tags.clone())
        .unwrap_or_default()
}

#[test]
fn a_follower_takes_checkpoints_reads_through_the_remote_refuses_writes_and_reopens() {
    let pdir = tempfile::tempdir().expect("tempdir");
    let fdir = tempfile::tempdir().expect("tempdir");
    let shelf_dir = tempfile::tempdir().expect("tempdir");
    let shelf = Arc::new(Shelf {
        dir: shelf_dir.path().to_path_buf(),
        ..Shelf::default()
    });
    let primary = Store::open(pdir.path(), opts()).expect("open primary");
    let mut images: Vec<_> = (0..8u64)
        .map(|i| push(&primary, &format!("v{i}"), 900 + i))
        .collect();
    let first = ship(&primary, &shelf);

    let replica = Store::open(fdir.path(), follower()).expect("open follower");
    // Not without a remote to read from.
    assert!(matches!(
        replica.follow(&first.snapshot, &first.listed, &first.indexes),
        Err(Error::Unavailable(_))
    ));
    replica.set_remote(shelf.clone());
    let ids: Vec<u64> = first.listed.iter().map(|(id, _)| *id).collect();
    assert_eq!(replica.segments_to_follow(&ids), ids);
    // A damaged index file changes nothing.
    let mut bad = first.indexes.clone();
    let last = *bad.keys().next_back().expect("a segment");
    let b = bad.get_mut(&last).expect("index");
    let n = b.len();
    b[n / 2] ^= 0x10;
    assert!(replica
        .follow(&first.snapshot, &first.listed, &bad)
        .is_err());
    assert!(tags(&replica).is_empty());
    let left: Vec<_> = std::fs::read_dir(fdir.path().join("index"))
        .expect("index dir")
        .collect();
    assert!(
        left.is_empty(),
        "index files left by a failed follow: {left:?}"
    );
    let done = replica
        .follow(&first.snapshot, &first.listed, &first.indexes)
        .expect("follow");
    assert_eq!(done.added, first.listed.len());
    assert_eq!(done.dropped, 0);
    assert_eq!(tags(&replica), tags(&primary));
    for (d, data, md) in &images {
        assert!(replica.read_blob(d).expect("layer") == *data);
        assert!(replica.read_blob(md).is_ok(), "manifest {md}");
    }
    assert!(replica.segments_to_follow(&ids).is_empty());

    // A replica takes no write of any kind.
    assert!(matches!(
        replica.put_blob(b"new bytes", None),
        Err(Error::ReadOnly(_))
    ));
    assert!(matches!(
        replica.commit_ops(vec![Op::DeleteManifest {
            repo: "team/app".into(),
            digest: images[0].2.clone(),
        }]),
        Err(Error::ReadOnly(_))
    ));
    assert!(matches!(
        ballast_engine::gc::collect(&replica, &Default::default(), 0),
        Err(Error::ReadOnly(_))
    ));

    // The primary moves on: half deleted and collected, more pushed.
    for (d, _, md) in images.drain(..4) {
        primary
            .commit_ops(vec![
                Op::DeleteManifest {
                    repo: "team/app".into(),
                    digest: md,
                },
                Op::UnlinkBlob {
                    repo: "team/app".into(),
                    digest: d,
                },
            ])
            .expect("delete");
    }
    primary.seal_active().expect("seal");
    let gc = collect_now(&primary);
    assert!(gc.segments_compacted > 0, "{gc:?}");
    images.extend((8..11u64).map(|i| push(&primary, &format!("v{i}"), 900 + i)));
    let second = ship(&primary, &shelf);
    let ids: Vec<u64> = second.listed.iter().map(|(id, _)| *id).collect();
    let wanted = replica.segments_to_follow(&ids);
    assert!(!wanted.is_empty());
    // Only the new segments' index files are needed.
    let needed: BTreeMap<u64, Vec<u8>> = wanted
        .iter()
        .map(|id| (*id, second.indexes[id].clone()))
        .collect();
    let done = replica
        .follow(&second.snapshot, &second.listed, &needed)
        .expect("follow again");
    assert_eq!(done.added, wanted.len());
    assert!(done.dropped > 0, "{done:?}");
    assert_eq!(tags(&replica), tags(&primary));
    assert!(!tags(&replica).contains_key("v0"));
    for (d, data, _) in &images {
        assert!(replica.read_blob(d).expect("layer after follow") == *data);
    }
    assert_eq!(
        replica.remote_segments(),
        second.listed,
        "the replica lists exactly the checkpoint's segments"
    );

    // Reopened, it is where it was; fsck through the remote is clean.
    drop(replica);
    let replica = Store::open(fdir.path(), follower()).expect("reopen follower");
    assert_eq!(tags(&replica), tags(&primary));
    assert_eq!(replica.remote_segments(), second.listed);
    assert!(
        replica.open_warnings().is_empty(),
        "{:?}",
        replica.open_warnings()
    );
    replica.set_remote(shelf.clone());
    for (d, data, _) in &images {
        assert!(replica.read_blob(d).expect("layer after reopen") == *data);
    }
    let report = verify::fsck(&replica, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.blobs_unchecked, 0);
    assert_eq!(replica.segment_ids().last(), Some(&FOLLOWER_SEGMENT));
    drop(replica);

    // Neither directory opens as the other.
    match Store::open(fdir.path(), opts()) {
        Err(Error::InvalidInput { reason, .. }) => assert!(reason.contains("replica"), "{reason}"),
        other => panic!(
            "a primary opened a replica's directory: {:?}",
            other.is_ok()
        ),
    }
    drop(primary);
    match Store::open(pdir.path(), follower()) {
        Err(Error::InvalidInput { reason, .. }) => {
            assert!(reason.contains("not a read replica"), "{reason}")
        }
        other => panic!(
            "a replica opened a primary's directory: {:?}",
            other.is_ok()
        ),
    }
}
