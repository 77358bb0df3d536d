//! Segments kept remotely (issue #22, `store/remote.rs`): local files dropped once their
//! copy is confirmed elsewhere, records read back through a `RemoteSegments`, checked, and
//! compacted through it. The remote here is a directory of segment copies (what the bucket
//! holds, byte for byte) that can be told to fail or to hand out a bad copy once.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use ballast_engine::catalog::Op;
use ballast_engine::checkpoint::restore;
use ballast_engine::store::{RemoteSegments, REMOTE_SEGMENTS};
use ballast_engine::{verify, Error, Options, Store};
use bytes::Bytes;
use parking_lot::Mutex;

use crate::gc::{collect_now, push_layer};
use crate::seeded;

#[derive(Default)]
pub struct Shelf {
    pub dir: PathBuf,
    pub(crate) reads: AtomicU64,
    pub(crate) discards: AtomicU64,
    pub(crate) down: AtomicBool,
    /// Spans handed out once with a flipped byte.
    pub(crate) spoil: Mutex<HashSet<(u64, u64)>>,
    pub(crate) spoil_all: AtomicBool,
}

impl RemoteSegments for Shelf {
    fn read(&self, segment: u64, len: u64, offset: u64, n: usize) -> Result<Bytes, String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("the shelf is down".into());
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        let bytes =
            std::fs::read(restore::segment_file(&self.dir, segment)).map_err(|e| e.to_string())?;
        assert_eq!(bytes.len() as u64, len, "segment {segment} length");
        let mut out = bytes[offset as usize..offset as usize + n].to_vec();
        if self.spoil_all.load(Ordering::SeqCst) && self.spoil.lock().insert((segment, offset)) {
            let last = out.len() - 1;
            out[last] ^= 0x40;
        }
        Ok(Bytes::from(out))
    }
    fn prefetch(&self, _: u64, _: u64, _: u64, _: usize) {}
    fn is_cached(&self, _: u64, _: u64, _: u64, _: usize) -> bool {
        false
    }
    fn discard(&self, _: u64, _: u64, _: usize) {
        self.discards.fetch_add(1, Ordering::SeqCst);
    }
}

/// Small uncompressed segments, chunks verified.
pub fn opts() -> Options {
    Options {
        segment_bytes_max: 512 * 1024,
        compress: false,
        verify_chunk_ids: true,
        ..Options::default()
    }
}

#[test]
fn remote_segments_read_back_checked_survive_a_reopen_and_are_compacted_through_the_remote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shelf_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), opts()).expect("open");
    let mut images = Vec::new();
    for i in 0..10u64 {
        let data = seeded(150_000 + i as usize * 5_000, 700 + i);
        let (d, data, md, _) = push_layer(&store, "team/app", &format!("v{i}"), data);
        images.push((d, data, md));
    }
    // What the bucket holds: the checkpoint's segments.
    let cp = store.checkpoint().expect("checkpoint");
    std::fs::create_dir_all(shelf_dir.path().join("segments")).expect("mkdir");
    for seg in &cp.segments {
        let mut bytes = vec![0u8; seg.len() as usize];
        seg.read_at(&mut bytes, 0).expect("read");
        std::fs::write(restore::segment_file(shelf_dir.path(), seg.id()), bytes).expect("write");
    }
    drop(cp);
    let shelf = Arc::new(Shelf {
        dir: shelf_dir.path().to_path_buf(),
        ..Shelf::default()
    });

    // Without a remote installed nothing is dropped.
    let first = store.local_sealed_segments()[0].0;
    assert!(matches!(
        store.make_remote(first),
        Err(Error::InvalidInput { .. })
    ));
    store.set_remote(shelf.clone());
    let sealed = store.local_sealed_segments();
    assert!(sealed.len() >= 3, "{sealed:?}");
    for (id, len) in &sealed {
        assert_eq!(store.make_remote(*id).expect("make remote"), Some(*len));
        assert!(!restore::segment_file(dir.path(), *id).exists());
        // Twice is nothing.
        assert_eq!(store.make_remote(*id).expect("again"), None);
    }
    assert_eq!(store.remote_segments(), sealed);
    assert_eq!(store.footprint().remote_segments, sealed.len() as u64);
    for (d, data, _) in &images {
        assert!(store.read_blob(d).expect("read") == *data);
    }
    assert!(shelf.reads.load(Ordering::SeqCst) > 0);

    // A bad copy is discarded and fetched again: the read succeeds, nothing is damaged.
    shelf.spoil_all.store(true, Ordering::SeqCst);
    for (d, data, _) in &images {
        assert!(store.read_blob(d).expect("read past a bad copy") == *data);
    }
    shelf.spoil_all.store(false, Ordering::SeqCst);
    assert!(shelf.discards.load(Ordering::SeqCst) > 0);
    assert_eq!(store.stats().chunk_read_failures.load(Ordering::SeqCst), 0);

    // The remote down: unavailable, not corrupted.
    shelf.down.store(true, Ordering::SeqCst);
    match store.read_blob(&images[0].0) {
        Err(Error::Unavailable(why)) => assert!(why.contains("down"), "{why}"),
        other => panic!("expected unavailable, got {:?}", other.map(|b| b.len())),
    }
    shelf.down.store(false, Ordering::SeqCst);

    // Reopened: still remote, and an fsck without the remote says what it left unchecked;
    // with it, every blob is reassembled.
    drop(store);
    let store = Store::open(dir.path(), opts()).expect("reopen");
    assert_eq!(store.remote_segments(), sealed);
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.remote_segments, sealed.len() as u64);
    assert!(report.blobs_unchecked > 0, "{report:?}");
    store.set_remote(shelf.clone());
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.blobs_unchecked, 0);
    assert!(report.blobs >= images.len() as u64);
    // Indexes are all that locates remote records: a rebuild is refused, not attempted.
    drop(store);
    let rebuilt = Store::open(
        dir.path(),
        Options {
            rebuild_indexes: true,
            ..opts()
        },
    );
    match rebuilt {
        Err(Error::InvalidInput { reason, .. }) => assert!(reason.contains("restore"), "{reason}"),
        other => panic!("expected a refusal, got {:?}", other.is_ok()),
    }
    let store = Store::open(dir.path(), opts()).expect("reopen");
    store.set_remote(shelf.clone());

    // Half the images deleted: a collection compacts the remote segments through the
    // remote into a new local segment and drops them from the list.
    for (d, _, md) in images.iter().take(5) {
        store
            .commit_ops(vec![
                Op::DeleteManifest {
                    repo: "team/app".into(),
                    digest: md.clone(),
                },
                Op::UnlinkBlob {
                    repo: "team/app".into(),
                    digest: d.clone(),
                },
            ])
            .expect("delete");
    }
    let gc = collect_now(&store);
    assert!(gc.segments_compacted > 0, "{gc:?}");
    let left: Vec<u64> = store.remote_segments().iter().map(|(id, _)| *id).collect();
    assert!(left.len() < sealed.len(), "{left:?} of {sealed:?}");
    let listed = std::fs::read_to_string(dir.path().join(REMOTE_SEGMENTS)).expect("list");
    assert_eq!(listed.lines().count() - 1, left.len(), "{listed}");
    for (d, data, _) in images.iter().skip(5) {
        assert!(store.read_blob(d).expect("read after gc") == *data);
    }
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
}
