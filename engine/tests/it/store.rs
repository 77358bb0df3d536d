//! Store behaviour: dedup, digests, ranges, reopen, corruption.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ballast_engine::catalog::Op;
use ballast_engine::storage::SimStorage;
use ballast_engine::{Algorithm, BlobWriter, ChunkMode, Digest, Error, Options, Store};

use crate::{seeded, sha256, tar};

fn open(dir: &Path) -> Store {
    Store::open(dir, Options::default()).expect("open store")
}

#[test]
fn same_blob_twice_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(3 << 20, 7);
    let a = store.put_blob(&data, Some(&sha256(&data))).expect("first");
    assert!(a.new_chunks > 10);
    let appended = store
        .stats()
        .bytes_appended
        .load(std::sync::atomic::Ordering::Relaxed);
    let b = store.put_blob(&data, Some(&sha256(&data))).expect("second");
    assert_eq!(b.new_chunks, 0);
    assert_eq!(b.new_bytes, 0);
    let after = store
        .stats()
        .bytes_appended
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after, appended, "a second identical push writes nothing");
    assert_eq!(store.read_blob(&sha256(&data)).expect("read"), data);
}

#[test]
fn insertion_in_the_middle_adds_few_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let base = seeded(64 << 20, 11);
    let first = store.put_blob(&base, None).expect("base");
    let mut edited = base[..32 << 20].to_vec();
    edited.extend_from_slice(&seeded(1 << 20, 99));
    edited.extend_from_slice(&base[32 << 20..]);
    let second = store.put_blob(&edited, None).expect("edited");
    let total = second.recipe.pieces.len() as u64;
    assert!(first.new_chunks > 500);
    // 1 MiB of new data is ~16 chunks at 64 KiB; the edges add one or two more.
    assert!(
        second.new_chunks <= 24,
        "{} of {total} chunks were new",
        second.new_chunks
    );
    assert!(second.new_bytes < (1 << 20) + 4 * 256 * 1024);
    assert_eq!(store.read_blob(&sha256(&edited)).expect("read"), edited);
}

fn tree(files: usize, seed: u64) -> Vec<(String, Vec<u8>)> {
    (0..files)
        .map(|i| {
            let len = match i % 5 {
                0 => 300,
                1 => 5000,
                2 => 40_000,
                3 => 150_000,
                _ => 700_000,
            };
            (format!("usr/lib/file{i}.bin"), seeded(len, seed + i as u64))
        })
        .collect()
}

#[test]
fn tar_rebuilt_with_new_mtimes_adds_only_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let files = tree(60, 1000);
    let old = tar(&files, 1_600_000_000);
    let new = tar(&files, 1_700_000_000);
    assert_ne!(sha256(&old), sha256(&new));
    store.put_blob(&old, None).expect("old");
    let second = store.put_blob(&new, None).expect("new");
    assert_eq!(
        second.new_chunks, 0,
        "only headers changed, and they are inline"
    );
    assert_eq!(store.read_blob(&sha256(&new)).expect("read"), new);

    // Plain CDC over the same streams re-stores much more.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let plain = open(dir2.path());
    let mut w = BlobWriter::new(&plain, Algorithm::Sha256, ChunkMode::Plain);
    w.write(&old).expect("write");
    w.finish(None).expect("finish");
    let mut w = BlobWriter::new(&plain, Algorithm::Sha256, ChunkMode::Plain);
    w.write(&new).expect("write");
    let c = w.finish(None).expect("finish");
    // Every header sits inside a CDC chunk that now changes: about one chunk per file.
    assert!(
        c.new_bytes > 1 << 20,
        "plain CDC rewrote only {} bytes",
        c.new_bytes
    );
}

#[test]
fn blob_shared_by_two_repositories_is_stored_once() {
    // Blobs are global: a second push of the same bytes (from another repository) is a dedup
    // hit for every chunk and for the recipe.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(1 << 20, 5);
    store.put_blob(&data, None).expect("repo a");
    let before = store
        .stats()
        .bytes_appended
        .load(std::sync::atomic::Ordering::Relaxed);
    let again = store.put_blob(&data, None).expect("repo b");
    assert_eq!(again.new_bytes, 0);
    assert_eq!(
        before,
        store
            .stats()
            .bytes_appended
            .load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn digest_mismatch_leaves_nothing_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(2 << 20, 3);
    let wrong = sha256(b"something else");
    match store.put_blob(&data, Some(&wrong)) {
        Err(Error::DigestMismatch { .. }) => {}
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!store.contains(&wrong));
    assert!(!store.contains(&sha256(&data)));
    drop(store);
    let store = open(dir.path());
    assert!(!store.contains(&sha256(&data)));
}

#[test]
fn sha512_blobs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(300_000, 9);
    let d = Digest::of(Algorithm::Sha512, &data);
    store.put_blob(&data, Some(&d)).expect("put");
    assert_eq!(store.read_blob(&d).expect("read"), data);
    assert_eq!(store.stat(&d).expect("stat"), Some(data.len() as u64));
    assert!(!store.contains(&sha256(&data)));
}

/// The bytes `[a, b)` of a blob, through its range reader.
fn read_range(reader: &ballast_engine::BlobReader, a: u64, b: u64) -> Vec<u8> {
    reader
        .range(a, b)
        .expect("range")
        .flat_map(|p| p.expect("piece").to_vec())
        .collect()
}

#[test]
fn range_reads_at_chunk_edges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(2 << 20, 21);
    let d = sha256(&data);
    store.put_blob(&data, None).expect("put");
    let reader = store.open_blob(&d).expect("open");
    let starts = reader.recipe().starts();
    let mut cases = vec![
        (0, 0),
        (0, 1),
        (0, data.len() as u64),
        (data.len() as u64, data.len() as u64),
    ];
    for &s in &starts[1..starts.len() - 1] {
        cases.extend([
            (s - 1, s),
            (s, s + 1),
            (s - 1, s + 1),
            (s - 100, s + 70_000),
        ]);
    }
    for (a, b) in cases {
        let b = b.min(data.len() as u64);
        assert_eq!(
            read_range(&reader, a, b),
            data[a as usize..b as usize],
            "range {a}-{b}"
        );
    }
    assert!(reader.range(0, data.len() as u64 + 1).is_err());
}

#[test]
fn streaming_write_in_odd_pieces_matches_one_shot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let data = seeded(5 << 20, 77);
    let mut w = BlobWriter::new(&store, Algorithm::Sha256, ChunkMode::Auto);
    for part in data.chunks(12_345) {
        w.write(part).expect("write");
    }
    let a = w.finish(Some(&sha256(&data))).expect("finish");
    let dir2 = tempfile::tempdir().expect("tempdir");
    let b = open(dir2.path()).put_blob(&data, None).expect("put");
    assert_eq!(a.recipe.pieces, b.recipe.pieces);
}

#[test]
fn reopen_after_close_and_after_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        segment_bytes_max: 1 << 20,
        ..Options::default()
    };
    let mut blobs = Vec::new();
    {
        let store = Store::open(dir.path(), opts.clone()).expect("open");
        for i in 0..40 {
            let data = seeded(200_000 + i * 1000, i as u64);
            store.put_blob(&data, None).expect("put");
            blobs.push(data);
        }
        store.close().expect("close");
    }
    {
        let store = Store::open(dir.path(), opts.clone()).expect("reopen");
        for data in &blobs {
            assert_eq!(&store.read_blob(&sha256(data)).expect("read"), data);
        }
        let data = seeded(50_000, 1234);
        store.put_blob(&data, None).expect("put");
        blobs.push(data);
        // Dropped without close: the next open replays the active segment.
    }
    let store = Store::open(dir.path(), opts).expect("reopen again");
    for data in &blobs {
        assert_eq!(&store.read_blob(&sha256(data)).expect("read"), data);
    }
    let (segments, indexes) = store.file_counts();
    assert!(segments > 5);
    assert!(
        indexes < segments,
        "index files are merged ({indexes} for {segments} segments)"
    );
}

#[test]
fn second_open_names_the_holder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _store = open(dir.path());
    match Store::open(dir.path(), Options::default()) {
        Err(e @ Error::Locked { .. }) => {
            assert!(
                e.to_string()
                    .contains(&format!("pid {}", std::process::id())),
                "{e}"
            );
        }
        other => panic!("expected a lock error, got {other:?}"),
    }
}

#[test]
fn flipped_byte_is_reported_as_corruption_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        compress: false,
        ..Options::default()
    };
    let data = seeded(600_000, 5);
    let d = sha256(&data);
    {
        let store = Store::open(dir.path(), opts.clone()).expect("open");
        store.put_blob(&data, None).expect("put");
        store.close().expect("close");
    }
    let seg = dir.path().join("segments").join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&seg).expect("read segment");
    bytes[100_000] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write segment");
    let store = Store::open(dir.path(), opts).expect("open still works: the segment is sealed");
    let err = store.read_blob(&d).expect_err("damage is detected");
    match &err {
        Error::Corrupted { file, offset, .. } => {
            assert_eq!(file, &seg);
            assert!(*offset <= 100_000 && *offset > 0);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn damage_to_acknowledged_data_in_the_active_segment_is_not_truncated() {
    let sim = SimStorage::new();
    let dir = Path::new("/store");
    let data = seeded(400_000, 8);
    {
        let store = Store::open_on(
            Arc::new(sim.clone()),
            dir,
            Options {
                compress: false,
                ..Options::default()
            },
        )
        .expect("open");
        store.put_blob(&data, None).expect("put");
        store.put_blob(&seeded(1000, 1), None).expect("put");
    }
    let seg = dir.join("segments").join("00000000000000000001.seg");
    sim.flip_bit(&seg, 5000);
    let err = Store::open_on(Arc::new(sim.crash_image(None)), dir, Options::default())
        .expect_err("corruption");
    assert!(err.is_corruption(), "{err}");
    assert!(
        err.to_string().contains("00000000000000000001.seg"),
        "{err}"
    );
}

/// #14 item 1: a power cut after a push was acknowledged but before the segment's own sync
/// mark reached the disk, then one flipped bit in the pushed blob. The catalog batch that
/// acknowledged the push recorded how far the segments were durable, so opening refuses
/// (damage in acknowledged data) instead of cutting the segment back to its header and
/// losing the blob without a word.
#[test]
fn damage_before_a_sync_point_only_the_catalog_recorded_is_not_taken_for_a_torn_tail() {
    let sim = SimStorage::new();
    let dir = Path::new("/store");
    let data = seeded(400_000, 9);
    let digest = sha256(&data);
    {
        let store = Store::open_on(
            Arc::new(sim.clone()),
            dir,
            Options {
                compress: false,
                ..Options::default()
            },
        )
        .expect("open");
        store.put_blob(&data, Some(&digest)).expect("put");
        store
            .commit_ops(vec![Op::LinkBlob {
                repo: "r".into(),
                digest: digest.clone(),
                at: 1,
            }])
            .expect("link");
    }
    // Only what was synced survives: the mark written after the blob's sync does not.
    let image = sim.crash_image(None);
    let seg = dir.join("segments").join("00000000000000000001.seg");
    image.flip_bit(&seg, 5000);
    let err = Store::open_on(Arc::new(image.clone()), dir, Options::default())
        .expect_err("damage in acknowledged data must not open as a torn tail");
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("acknowledged"), "{err}");
    // Undamaged, the same image opens with the blob (the torn-tail rule is intact).
    image.flip_bit(&seg, 5000);
    let store = Store::open_on(Arc::new(image), dir, Options::default()).expect("open");
    assert_eq!(store.read_blob(&digest).expect("blob"), data);
}

#[test]
fn failed_sync_poisons_the_store() {
    let sim = SimStorage::new();
    let store =
        Store::open_on(Arc::new(sim.clone()), Path::new("/s"), Options::default()).expect("open");
    store.put_blob(b"first", None).expect("put");
    sim.fail_syncs();
    assert!(store.put_blob(b"second", None).is_err());
    match store.put_blob(b"third", None) {
        Err(Error::Poisoned(_)) => {}
        other => panic!("expected poisoned, got {other:?}"),
    }
    // Reads still work.
    assert_eq!(store.read_blob(&sha256(b"first")).expect("read"), b"first");
}

#[test]
fn health_reports_a_poisoned_store_or_catalog() {
    use ballast_engine::catalog::Op;
    for catalog in [false, true] {
        let sim = SimStorage::new();
        let store = Store::open_on(Arc::new(sim.clone()), Path::new("/s"), Options::default())
            .expect("open");
        let digest = store
            .put_blob(b"first", None)
            .expect("put")
            .recipe
            .digest
            .clone();
        assert!(store.health().is_ok());
        sim.fail_syncs();
        if catalog {
            let op = Op::LinkBlob {
                repo: "r".into(),
                digest,
                at: 0,
            };
            assert!(store.commit_ops(vec![op]).is_err());
        } else {
            assert!(store.put_blob(b"second", None).is_err());
        }
        sim.heal_syncs();
        match store.health() {
            Err(Error::Poisoned(why)) => assert!(why.contains("simulated sync failure"), "{why}"),
            other => panic!("catalog={catalog}: expected poisoned, got {other:?}"),
        }
    }
}

#[test]
fn repair_salvages_records_after_damage_and_quarantines_the_rest() {
    use ballast_engine::catalog::Op;
    use ballast_engine::verify;
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || Options {
        compress: false,
        ..Options::default()
    };
    let (a, b) = (seeded(300_000, 71), seeded(300_000, 72));
    let (da, db) = (sha256(&a), sha256(&b));
    {
        let store = Store::open(dir.path(), opts()).expect("open");
        for (data, d) in [(&a, &da), (&b, &db)] {
            store.put_blob(data, None).expect("put");
            let op = Op::LinkBlob {
                repo: "r".into(),
                digest: d.clone(),
                at: ballast_engine::clock::now_secs(),
            };
            store.commit_ops(vec![op]).expect("link");
        }
        store.close().expect("close");
    }
    // Damage a byte inside `a`'s first chunk; `b`'s records come after it in the same file.
    let seg = dir.path().join("segments").join(format!("{:020}.seg", 1));
    let mut bytes = std::fs::read(&seg).expect("segment");
    let at = bytes
        .windows(64)
        .position(|w| w == &a[..64])
        .expect("a's bytes in the segment");
    bytes[at + 100] ^= 0x40;
    std::fs::write(&seg, &bytes).expect("write");

    // Rebuilding the indexes (fsck --repair) used to stop at the damage and refuse to open;
    // now everything after it is found again.
    let store = Store::open(
        dir.path(),
        Options {
            rebuild_indexes: true,
            ..opts()
        },
    )
    .expect("a damaged sealed segment is salvaged");
    assert_eq!(store.read_blob(&db).expect("b survives"), b);
    let report = verify::fsck(&store, &|_, _, _| {});
    let codes: Vec<&str> = report.findings.iter().map(|f| f.code.as_str()).collect();
    assert!(codes.contains(&"record_corrupt"), "{codes:?}");
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.digest.as_ref() == Some(&da)),
        "{codes:?}"
    );
    let (records, blobs) =
        verify::quarantine_damage(&store, &report, ballast_engine::clock::now_secs())
            .expect("quarantine");
    assert!(records >= 1 && blobs == 1, "{records} {blobs}");
    let again = verify::fsck(&store, &|_, _, _| {});
    assert!(again.is_clean(), "{:?}", again.findings);
    assert_eq!(again.quarantined_blobs, vec![da.clone()]);
    assert!(matches!(store.read_blob(&da), Err(Error::NotFound(_))));
    drop(store);

    // The quarantine survives a reopen; pushing `a` again stores fresh chunks and heals it.
    let store = Store::open(dir.path(), opts()).expect("reopen");
    assert!(matches!(store.read_blob(&da), Err(Error::NotFound(_))));
    store.put_blob(&a, None).expect("push again");
    assert_eq!(store.read_blob(&da).expect("healed"), a);
    assert!(store.quarantine().blobs.is_empty());
    let last = verify::fsck(&store, &|_, _, _| {});
    assert!(last.is_clean(), "{:?}", last.findings);
    assert!(last.quarantined_records >= 1);
}

/// With BLAKE3 verification on, chunk reads skip the record CRC: a flipped bit anywhere in a
/// segment (headers, chunk prefixes, raw and zstd payloads) must still fail the read with a
/// corruption error, or leave the bytes read exact — never return other bytes.
#[test]
fn a_record_read_while_its_append_is_still_staged_comes_back_whole() {
    // Appends are gathered and written to the segment about 1 MiB at a time; reading a
    // record that is still gathered writes it first. Checked for every record of the first
    // megabyte, each read straight after its append, then again after a reopen.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), Options::default()).expect("open");
    let chunks: Vec<Vec<u8>> = (0..24)
        .map(|i| seeded(40_000 + i * 997, 100 + i as u64))
        .collect();
    let mut ids = Vec::new();
    for c in &chunks {
        let (id, new) = store.put_chunk(c).expect("put");
        assert!(new);
        assert!(store.read_chunk(&id).expect("read") == c.as_slice());
        ids.push(id);
    }
    store.close().expect("close");
    let store = Store::open(dir.path(), Options::default()).expect("reopen");
    for (id, c) in ids.iter().zip(&chunks) {
        assert!(store.read_chunk(id).expect("read after reopen") == c.as_slice());
    }
}

#[test]
fn reads_of_a_chunk_in_quick_succession_share_one_verification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reuse = |window: std::time::Duration| Options {
        verify_chunk_ids: true,
        verify_reuse: window,
        ..Options::default()
    };
    let data = seeded(1_000_000, 12);
    let digest = sha256(&data);
    let chunks = {
        let store = Store::open(dir.path(), reuse(std::time::Duration::ZERO)).expect("open");
        let chunks = store
            .put_blob(&data, Some(&digest))
            .expect("put")
            .recipe
            .pieces
            .len();
        store.close().expect("close");
        chunks as u64
    };
    assert!(chunks > 4, "the blob has {chunks} chunks");
    let verified = |store: &Store| store.stats().chunks_verified.load(Ordering::Relaxed);
    for (window, expected) in [
        (std::time::Duration::ZERO, 3 * chunks),
        (std::time::Duration::from_secs(3600), chunks),
    ] {
        let store = Store::open(dir.path(), reuse(window)).expect("open");
        for _ in 0..3 {
            assert!(store.read_blob(&digest).expect("read") == data);
        }
        assert_eq!(verified(&store), expected, "window {window:?}");
    }
    // Reuse never spans stores: a chunk damaged while the store was closed is caught on the
    // first read after it opens again, window or not.
    let seg = dir.path().join("segments").join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&seg).expect("read segment");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&seg, &bytes).expect("write segment");
    let store = Store::open(dir.path(), reuse(std::time::Duration::from_secs(3600))).expect("open");
    let err = store
        .read_blob(&digest)
        .expect_err("a damaged chunk is not served");
    assert!(err.is_corruption(), "{err}");
}

#[test]
fn verified_reads_without_the_crc_never_return_damaged_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        verify_chunk_ids: true,
        ..Options::default()
    };
    // Random bytes (raw chunks) and text (zstd chunks).
    let raw = seeded(300_000, 11);
    let text: Vec<u8> = (0..300_000u32)
        .flat_map(|i| format!("line {} of a compressible layer\n", i % 5000).into_bytes())
        .take(300_000)
        .collect();
    let blobs = [(sha256(&raw), raw), (sha256(&text), text)];
    {
        let store = Store::open(dir.path(), opts.clone()).expect("open");
        for (d, b) in &blobs {
            store.put_blob(b, Some(d)).expect("put");
        }
        store.close().expect("close");
    }
    let seg = dir.path().join("segments").join("00000000000000000001.seg");
    let pristine = std::fs::read(&seg).expect("read segment");
    let mut detected = 0;
    let positions: Vec<usize> = (0..pristine.len()).step_by(1499).chain(0..200).collect();
    for &pos in &positions {
        let mut bytes = pristine.clone();
        bytes[pos] ^= 1 << (pos % 8);
        std::fs::write(&seg, &bytes).expect("write segment");
        let Ok(store) = Store::open(dir.path(), opts.clone()) else {
            detected += 1;
            continue;
        };
        for (d, b) in &blobs {
            match store.read_blob(d) {
                Ok(got) => assert!(
                    &got == b,
                    "bit flipped at {pos}: a read returned other bytes"
                ),
                Err(e) => {
                    assert!(e.is_corruption() || matches!(e, Error::NotFound(_)), "{e}");
                    detected += 1;
                }
            }
        }
        drop(store);
    }
    std::fs::write(&seg, &pristine).expect("restore");
    assert!(
        detected > positions.len() / 2,
        "most flips land in chunk data and are caught"
    );
}

/// What a crash leaves of atomic writes (`*.tmp`) is removed at open, wherever the engine
/// writes them: the data directory itself, the catalog, the index and the upload sessions.
#[test]
fn unfinished_atomic_writes_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(Store::open(dir.path(), Options::default()).expect("open"));
    let leftovers = [
        dir.path().join("quarantine.tmp"),
        dir.path().join("removed-segments.tmp"),
        dir.path()
            .join("uploads")
            .join("0123456789abcdef0123456789abcdef.tmp"),
    ];
    for p in &leftovers {
        std::fs::write(p, b"half").expect("leftover");
    }
    let keep = dir.path().join("uploads").join("README");
    std::fs::write(&keep, b"not ours").expect("other file");
    drop(Store::open(dir.path(), Options::default()).expect("reopen"));
    for p in &leftovers {
        assert!(!p.exists(), "{} is still there", p.display());
    }
    assert!(keep.exists(), "only *.tmp files go");
}

/// An index file whose header is damaged no longer stops the store from opening: indexes
/// are derived, so it is removed, its segments are replayed and indexed again, and the open
/// says so (#14 item 6). Every blob reads back and fsck finds nothing.
#[test]
fn a_damaged_index_file_is_rebuilt_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = || Options {
        segment_bytes_max: 256 << 10,
        ..Options::default()
    };
    let mut blobs = Vec::new();
    {
        let store = Store::open(dir.path(), opts()).expect("open");
        for i in 0..6 {
            let data = seeded(200_000, 700 + i);
            let c = store.put_blob(&data, None).expect("put");
            blobs.push((c.recipe.digest.clone(), data));
        }
        store.close().expect("close");
    }
    let idx = std::fs::read_dir(dir.path().join("index"))
        .expect("index dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|x| x == "idx"))
        .expect("an index file");
    let mut bytes = std::fs::read(&idx).expect("read");
    bytes[0] ^= 0xff;
    std::fs::write(&idx, &bytes).expect("damage");

    let store = Store::open(dir.path(), opts()).expect("opens despite the damaged index");
    let warnings = store.open_warnings().join("\n");
    assert!(
        warnings.contains("damaged") && warnings.contains("rebuilt"),
        "{warnings}"
    );
    for (d, data) in &blobs {
        assert_eq!(&store.read_blob(d).expect("read"), data);
    }
    let report = ballast_engine::verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    drop(store);
    let store = Store::open(dir.path(), opts()).expect("reopen");
    assert!(store.open_warnings().is_empty(), "rebuilt for good");
}

/// What `fsck` without `--repair` opens a directory on: opening mends a torn tail and a
/// store takes writes, all in memory, and not a byte on disk changes (#14 item 1a).
#[test]
fn a_store_opened_on_the_overlay_changes_nothing_on_disk() {
    use ballast_engine::storage::OverlayStorage;
    use ballast_engine::testdata::files_of;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data = seeded(300_000, 3);
    let digest = sha256(&data);
    {
        let store = Store::open(dir, Options::default()).expect("open");
        store.put_blob(&data, Some(&digest)).expect("put");
        // Dropped without close: the blob stays in the active segment.
    }
    let active = dir.join("segments").join("00000000000000000001.seg");
    let mut bytes = std::fs::read(&active).expect("read");
    let torn_at = bytes.len();
    bytes.extend_from_slice(&[0xab; 1000]);
    std::fs::write(&active, &bytes).expect("a torn tail");
    let before = files_of(dir);
    {
        let store = Store::open_on(Arc::new(OverlayStorage::new()), dir, Options::default())
            .expect("open on the overlay");
        assert_eq!(store.read_blob(&digest).expect("read"), data);
        store
            .put_blob(&seeded(5000, 4), None)
            .expect("a write, in memory");
        store.seal_active().expect("seal, in memory");
    }
    assert!(files_of(dir) == before, "the overlay wrote to disk");
    // A real open does cut the torn tail: that is what the overlay kept off the disk.
    drop(Store::open(dir, Options::default()).expect("open"));
    assert_eq!(
        std::fs::metadata(&active).expect("active").len(),
        torn_at as u64
    );
}

/// #14 item 6: a stray file named like the next segment (not a segment: no valid header)
/// is set aside with a warning instead of stopping the open.
#[test]
fn a_stray_next_segment_is_set_aside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let data = seeded(200_000, 5);
    let digest = sha256(&data);
    {
        let store = Store::open(dir, Options::default()).expect("open");
        store.put_blob(&data, Some(&digest)).expect("put");
        store.close().expect("close");
    }
    let mut ids: Vec<String> = std::fs::read_dir(dir.join("segments"))
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    let next: u64 = ids.last().expect("segment")[..20].parse().expect("id");
    let stray = dir.join("segments").join(format!("{:020}.seg", next + 1));
    std::fs::write(&stray, seeded(10_000, 6)).expect("stray");
    let store = Store::open(dir, Options::default()).expect("opens");
    assert_eq!(store.read_blob(&digest).expect("read"), data);
    assert!(
        store
            .open_warnings()
            .iter()
            .any(|w| w.contains("set aside") && w.contains(&format!("{:020}.seg", next + 1))),
        "{:?}",
        store.open_warnings()
    );
    assert!(stray.with_extension("seg.stray").exists());
    store.put_blob(b"more", None).expect("writes go on");
}

/// #14 item 2: a catalog journal cut at a batch boundary (acknowledged batches removed, the
/// rest intact) used to open, and pass fsck, as if nothing happened. The segments record how
/// far the journal was durable when they synced, so the cut is found: a normal open refuses
/// and a salvaging open (fsck) reports it.
#[test]
fn a_journal_cut_short_is_told_from_a_torn_tail() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let journal = dir.join("catalog").join("journal-00000000000000000000.jnl");
    let link = |store: &Store, repo: &str, data: &[u8]| {
        let c = store.put_blob(data, None).expect("put");
        store
            .commit_ops(vec![Op::LinkBlob {
                repo: repo.into(),
                digest: c.recipe.digest.clone(),
                at: 1,
            }])
            .expect("link");
    };
    let cut_at = {
        let store = Store::open(dir, Options::default()).expect("open");
        link(&store, "a", &seeded(100_000, 1));
        let cut_at = std::fs::metadata(&journal).expect("journal").len();
        link(&store, "b", &seeded(100_000, 2));
        link(&store, "c", &seeded(100_000, 3));
        // A later blob's sync records how far the journal was durable (past "b" and "c").
        store.put_blob(&seeded(100_000, 4), None).expect("put");
        cut_at
    };
    let full = std::fs::read(&journal).expect("read");
    std::fs::write(&journal, &full[..cut_at as usize]).expect("cut");
    let err = Store::open(dir, Options::default()).expect_err("a cut journal must not open");
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains("cut from it"), "{err}");
    let store = Store::open(
        dir,
        Options {
            salvage: true,
            ..Options::default()
        },
    )
    .expect("a salvaging open");
    let report = ballast_engine::verify::fsck(&store, &|_, _, _| {});
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.code.as_str() == "catalog_truncated"),
        "{:?}",
        report.findings
    );
    drop(store);
    // Restored, it opens again.
    std::fs::write(&journal, &full).expect("restore");
    let store = Store::open(dir, Options::default()).expect("open");
    assert_eq!(store.catalog().read().repos.len(), 3);
}

/// #14 item 2: both catalog generations damaged. A normal open refuses, naming the
/// snapshot; a salvaging open (fsck) keeps what the undamaged sections of the snapshot hold,
/// reports `catalog_damaged`, and lists the stored manifests no repository names any more,
/// with the command to tag them again.
#[test]
fn a_catalog_beyond_rebuild_keeps_its_undamaged_sections_and_lists_unnamed_manifests() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let opts = || Options {
        catalog_journal_bytes_max: 2048,
        ..Options::default()
    };
    let manifest_of = |layer: &Digest| {
        format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
             \"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"{layer}\",\"size\":1}},\
             \"layers\":[]}}"
        )
        .into_bytes()
    };
    let mut manifests = Vec::new();
    {
        let store = Store::open(dir, opts()).expect("open");
        for repo in ["a/app", "z/app"] {
            let layer = store
                .put_blob(
                    &seeded(50_000, repo.len() as u64 + manifests.len() as u64),
                    None,
                )
                .expect("layer")
                .recipe
                .digest
                .clone();
            let m = manifest_of(&layer);
            let md = store
                .put_blob(&m, None)
                .expect("manifest")
                .recipe
                .digest
                .clone();
            store
                .commit_ops(vec![
                    Op::LinkBlob {
                        repo: repo.into(),
                        digest: layer.clone(),
                        at: 1,
                    },
                    Op::PutManifest {
                        repo: repo.into(),
                        digest: md.clone(),
                        link: ballast_engine::catalog::ManifestLink {
                            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                            size: m.len() as u64,
                            artifact_type: None,
                            annotations: Default::default(),
                            subject: None,
                            references: vec![layer],
                            pushed_at: 1,
                            origin: None,
                        },
                    },
                ])
                .expect("manifest");
            manifests.push(md);
        }
        for i in 0..40 {
            store
                .commit_ops(vec![Op::Tag {
                    repo: "a/app".into(),
                    tag: format!("t{i}"),
                    digest: manifests[0].clone(),
                    at: 0,
                }])
                .expect("tag");
        }
    }
    // Both generations' snapshots damaged in their last section ("z/app").
    let cat = dir.join("catalog");
    let mut snaps: Vec<_> = std::fs::read_dir(&cat)
        .expect("catalog")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "snp"))
        .collect();
    snaps.sort();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    for s in &snaps {
        let mut b = std::fs::read(s).expect("read");
        let at = b.len() - 20;
        b[at] ^= 0x20;
        std::fs::write(s, &b).expect("write");
    }
    let err = Store::open(dir, opts()).expect_err("beyond rebuild");
    assert!(err.to_string().contains("cannot be rebuilt"), "{err}");
    let store = Store::open(
        dir,
        Options {
            salvage: true,
            ..opts()
        },
    )
    .expect("salvaging open");
    let state = store.catalog().read().clone();
    assert!(
        state.repos.contains_key("a/app"),
        "{:?}",
        state.repos.keys()
    );
    assert!(!state.repos.contains_key("z/app"));
    let report = ballast_engine::verify::fsck(&store, &|_, _, _| {});
    let codes: Vec<&str> = report.findings.iter().map(|f| f.code.as_str()).collect();
    assert!(codes.contains(&"catalog_damaged"), "{codes:?}");
    let unnamed: Vec<&ballast_engine::verify::Finding> = report
        .findings
        .iter()
        .filter(|f| f.code.as_str() == "manifest_unnamed")
        .collect();
    assert_eq!(unnamed.len(), 1, "{:?}", report.findings);
    assert_eq!(unnamed[0].digest.as_ref(), Some(&manifests[1]));
    assert!(
        unnamed[0].message.contains("ballast tag"),
        "{}",
        unnamed[0].message
    );
}

/// Every way of reading ahead returns the same bytes for whole blobs and ranges spread over
/// several segments, and a flipped bit in a chunk read ahead is caught (by its BLAKE3 id with
/// verification on, by the record CRC with it off), never served; with verification, the
/// helper that verifies ahead finds the damage first and must not hide it from the reader.
#[test]
fn reads_ahead_return_exact_bytes_and_never_damaged_ones() {
    use ballast_engine::ReadAhead;
    for mode in [ReadAhead::Off, ReadAhead::Advise, ReadAhead::Uring] {
        for verify in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let opts = Options {
                compress: false,
                segment_bytes_max: 3 << 20,
                verify_chunk_ids: verify,
                // With verification, a helper thread verifies ahead (the reuse window on).
                verify_reuse: std::time::Duration::from_secs(if verify { 60 } else { 0 }),
                read_ahead: mode,
                ..Options::default()
            };
            let data = seeded(12 << 20, 77);
            let d = sha256(&data);
            {
                let store = Store::open(dir.path(), opts.clone()).expect("open");
                store.put_blob(&data, None).expect("put");
                store.close().expect("close");
            }
            // Cold, as after a restart: spans in the page cache are taken from the map.
            drop_segments_from_cache(dir.path());
            let store = Store::open(dir.path(), opts.clone()).expect("open");
            assert_eq!(store.read_blob(&d).expect("read"), data, "{mode:?}");
            let reader = store.open_blob(&d).expect("open blob");
            let n = data.len() as u64;
            for (a, b) in [(1, n - 1), (5 << 20, 9 << 20), (n - (2 << 20), n)] {
                let got = read_range(&reader, a, b);
                assert_eq!(got, data[a as usize..b as usize], "{mode:?} {a}-{b}");
            }
            drop(reader);
            let ahead = store
                .stats()
                .bytes_read_ahead
                .load(std::sync::atomic::Ordering::Relaxed);
            // Bytes are read into buffers only by io_uring; where it cannot be set up, `uring`
            // hints like `advise` (and reads nothing itself).
            assert_eq!(
                ahead > 0,
                mode.effective() == ReadAhead::Uring,
                "{mode:?}: {ahead}"
            );
            // Warm now: nothing more is read into buffers (a copy the map spares).
            assert_eq!(store.read_blob(&d).expect("read"), data, "{mode:?}");
            let again = store
                .stats()
                .bytes_read_ahead
                .load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(again, ahead, "{mode:?}: warm spans come from the map");
            store.close().expect("close");
            // One flipped bit in the middle of the second segment's data.
            let seg = dir.path().join("segments").join("00000000000000000002.seg");
            let mut bytes = std::fs::read(&seg).expect("read segment");
            let at = bytes.len() / 2;
            bytes[at] ^= 0x10;
            std::fs::write(&seg, &bytes).expect("write segment");
            drop_segments_from_cache(dir.path());
            let store = Store::open(dir.path(), opts).expect("open");
            let err = store.read_blob(&d).expect_err("damage is detected");
            assert!(err.is_corruption(), "{mode:?} verify={verify}: {err}");
        }
    }
}

/// Drops a store's segment files from the page cache (written back first), so the next
/// reads come from the disk.
fn drop_segments_from_cache(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir.join("segments")).expect("segments") {
        let path = entry.expect("entry").path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .expect("sync segment");
        ballast_engine::storage::drop_page_cache(&path).expect("drop from the page cache");
    }
}
