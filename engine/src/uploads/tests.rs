use std::path::Path;

use bytes::Bytes;

use super::*;
use crate::digest::{Algorithm, Digest};
use crate::gc::{collect, GcOptions};
use crate::testdata::{seeded, tar};
use crate::Options;

const A: &str = "0123456789abcdef0123456789abcdef";
const B: &str = "fedcba9876543210fedcba9876543210";

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn meta(started_at: u64) -> SessionMeta {
    SessionMeta {
        repo: "r".into(),
        started_at,
        client: None,
    }
}

fn by(client: &str) -> SessionMeta {
    SessionMeta {
        client: Some(client.into()),
        ..meta(1)
    }
}

fn small_segments() -> Options {
    Options {
        segment_bytes_max: 1 << 20,
        ..Options::default()
    }
}

/// Appends `data` in one request at the session's current length.
fn append(up: &Uploads, id: &str, data: &[u8]) -> u64 {
    let at = up.status(id).expect("status").1;
    let mut w = up.writer(id, at, Algorithm::Sha256).expect("writer");
    // In pieces of odd sizes, as a request body arrives.
    for part in data.chunks(77_777) {
        w.write(Bytes::copy_from_slice(part)).expect("write");
    }
    w.checkpoint().expect("checkpoint")
}

fn finish(up: &Uploads, id: &str, digest: &Digest) -> Result<crate::Committed> {
    let at = up.status(id)?.1;
    up.writer(id, at, digest.algorithm())?.finish(digest)
}

/// A tar layer (tar-aware cuts, inline headers) and random bytes: both kinds of pieces.
fn layer() -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("f{i}"), seeded(150_000 + i * 70_001, i as u64)))
        .collect();
    let mut data = tar(&files, 1);
    data.extend(seeded(700_000, 99));
    data
}

#[test]
fn a_chunked_upload_is_written_once_and_finishes_as_the_same_blob_as_a_monolithic_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let up = Uploads::new(&store);
    let data = layer();
    let digest = Digest::of(Algorithm::Sha256, &data);
    up.create(A, &meta(1)).expect("create");
    // Appends that end anywhere: inside a tar header, inside a chunk, on a boundary.
    let cuts = [
        0,
        100,
        511,
        512,
        70_000,
        400_000,
        400_001,
        1_300_000,
        data.len(),
    ];
    for pair in cuts.windows(2) {
        let len = append(&up, A, &data[pair[0]..pair[1]]);
        assert_eq!(len, pair[1] as u64);
        assert_eq!(up.status(A).expect("status").1, len);
    }
    let appended = store
        .stats()
        .bytes_appended
        .load(std::sync::atomic::Ordering::Relaxed);
    let committed = finish(&up, A, &digest).expect("finish");
    assert_eq!(store.read_blob(&digest).expect("read"), data);
    // Nothing was spooled: each append logged its pieces and at most the bytes the chunker
    // waits on (a largest chunk and a tar block).
    let log_len = std::fs::metadata(tmp.path().join(format!("uploads/{A}.log")))
        .expect("log")
        .len();
    let appends = (cuts.len() - 1) as u64;
    let uncut_max = (crate::chunker::CHUNK_LEN_MAX + crate::chunker::TAR_BLOCK) as u64;
    assert!(
        log_len < appends * (uncut_max + (8 << 10)),
        "log of {log_len} bytes for {appends} appends of a blob of {}",
        data.len()
    );
    // The same bytes pushed whole elsewhere cut into the same pieces.
    let other = tempfile::tempdir().expect("tempdir");
    let mono = Store::open(other.path(), Options::default()).expect("open");
    let whole = mono.put_blob(&data, Some(&digest)).expect("put");
    assert_eq!(committed.recipe.pieces, whole.recipe.pieces);
    assert!(
        appended < data.len() as u64 * 11 / 10,
        "{appended} bytes appended to segments for {} bytes of blob",
        data.len()
    );
    // Finished, the session is still there until ended (the caller links first).
    up.end(A).expect("end");
    assert!(matches!(up.status(A), Err(Error::NotFound(_))));
}

#[test]
fn a_session_survives_a_restart_and_a_torn_last_append_is_not_believed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = layer();
    let digest = Digest::of(Algorithm::Sha256, &data);
    let first = 600_001;
    {
        let store = Store::open(tmp.path(), small_segments()).expect("open");
        let up = Uploads::new(&store);
        up.create(A, &meta(1)).expect("create");
        append(&up, A, &data[..first]);
        // A second append whose record is cut by a crash: not acknowledged.
        append(&up, A, &data[first..first + 1000]);
        drop(up);
        store.close().expect("close");
    }
    let log = tmp.path().join(format!("uploads/{A}.log"));
    let len = std::fs::metadata(&log).expect("log").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .expect("open log")
        .set_len(len - 5)
        .expect("cut");
    let store = Store::open(tmp.path(), small_segments()).expect("reopen");
    let up = Uploads::new(&store);
    assert_eq!(up.status(A).expect("status").1, first as u64);
    // Resumed from the log (its chunks read back), it finishes as the right blob.
    append(&up, A, &data[first..]);
    finish(&up, A, &digest).expect("finish");
    assert_eq!(store.read_blob(&digest).expect("read"), data);
    // Finishing with another digest algorithm replays the session to hash it so.
    up.create(B, &meta(1)).expect("create");
    append(&up, B, &data);
    let sha512 = Digest::of(Algorithm::Sha512, &data);
    finish(&up, B, &sha512).expect("finish sha512");
    assert_eq!(store.read_blob(&sha512).expect("read"), data);
}

#[test]
fn a_collection_keeps_the_chunks_of_unfinished_sessions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), small_segments()).expect("open");
    let data = seeded(3 << 20, 7);
    let digest = Digest::of(Algorithm::Sha256, &data);
    {
        let up = Uploads::new(&store);
        up.create(A, &meta(1)).expect("create");
        append(&up, A, &data[..2 << 20]);
    }
    store.seal_active().expect("seal");
    // Grace 0: nothing protects the chunks but the session's log.
    let later = crate::clock::now_secs() + 3600;
    let report = collect(
        &store,
        &GcOptions {
            grace_secs: 0,
            ..GcOptions::default()
        },
        later,
    )
    .expect("gc");
    assert_eq!(report.segments_compacted, 0, "{report:?}");
    let up = Uploads::new(&store);
    append(&up, A, &data[2 << 20..]);
    finish(&up, A, &digest).expect("finish after gc");
    assert_eq!(store.read_blob(&digest).expect("read"), data);
    // Once the session ends, its chunks are garbage like any other (the blob is unlinked).
    up.end(A).expect("end");
}

#[test]
fn one_writer_per_session_at_the_right_offset_and_an_unfinished_append_is_not_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let up = Uploads::new(&store);
    up.create(A, &meta(1)).expect("create");
    append(&up, A, b"hello");
    assert!(matches!(
        up.writer(A, 4, Algorithm::Sha256),
        Err(Error::InvalidInput {
            what: Input::UploadOffset,
            ..
        })
    ));
    let mut w = up.writer(A, 5, Algorithm::Sha256).expect("writer");
    assert!(matches!(
        up.writer(A, 5, Algorithm::Sha256),
        Err(Error::Busy(_))
    ));
    w.write(Bytes::from_static(b" world")).expect("write");
    assert_eq!(w.len(), 11);
    drop(w);
    assert_eq!(up.status(A).expect("status").1, 5);
    let digest = Digest::of(Algorithm::Sha256, b"hello there");
    let mut w = up.writer(A, 5, Algorithm::Sha256).expect("writer");
    w.write(Bytes::from_static(b" there")).expect("write");
    w.finish(&digest).expect("finish");
    assert_eq!(store.read_blob(&digest).expect("read"), b"hello there");
    // A wrong digest commits nothing.
    up.create(B, &meta(1)).expect("create");
    append(&up, B, b"abc");
    let wrong = Digest::of(Algorithm::Sha256, b"abd");
    assert!(matches!(
        finish(&up, B, &wrong),
        Err(Error::DigestMismatch { .. })
    ));
    assert!(!store.contains(&wrong));
    assert!(matches!(
        up.writer("nothex", 0, Algorithm::Sha256),
        Err(Error::InvalidInput {
            what: Input::UploadId,
            ..
        })
    ));
    assert!(matches!(
        up.writer(&"9".repeat(32), 0, Algorithm::Sha256),
        Err(Error::NotFound(_))
    ));
}

/// An older version's session (`.data` spooled whole, the fixture) resumes and finishes.
#[test]
fn a_session_spooled_by_an_older_version_is_turned_into_a_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uploads-spool");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let dir = tmp.path().join("uploads");
    for name in files(&fixture) {
        std::fs::copy(fixture.join(&name), dir.join(&name)).expect("copy");
    }
    let id = "5f0c6a7d2e1b4c3a9f8e7d6c5b4a3928";
    let spooled = std::fs::read(fixture.join(format!("{id}.data"))).expect("spool");
    let up = Uploads::new(&store);
    let (m, len) = up.status(id).expect("status");
    assert_eq!((m.repo.as_str(), len), ("team-a/api", spooled.len() as u64));
    let rest = b" and the rest";
    let mut all = spooled.clone();
    all.extend_from_slice(rest);
    append(&up, id, rest);
    assert_eq!(files(&dir), vec![format!("{id}.log"), format!("{id}.meta")]);
    let digest = Digest::of(Algorithm::Sha256, &all);
    finish(&up, id, &digest).expect("finish");
    assert_eq!(store.read_blob(&digest).expect("read"), all);
}

#[test]
fn an_ended_session_is_unknown_at_once_and_its_log_goes_with_discard() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let up = Uploads::new(&store);
    let dir = tmp.path().join("uploads");
    up.create(A, &meta(100)).expect("create");
    append(&up, A, b"hello");
    assert_eq!(up.warm_ids(), vec![A.to_owned()]);
    up.end(A).expect("end");
    assert!(up.warm_ids().is_empty());
    assert!(matches!(up.status(A), Err(Error::NotFound(_))));
    assert!(matches!(
        up.writer(A, 5, Algorithm::Sha256),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(up.end(A), Err(Error::NotFound(_))));
    assert!(up.ids().expect("ids").is_empty());
    assert_eq!(files(&dir), vec![format!("{A}.done")]);
    up.discard(A).expect("discard");
    up.discard(A).expect("discard twice is fine");
    assert!(files(&dir).is_empty());
}

#[test]
fn expire_sweeps_old_sessions_and_every_kind_of_leftover() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let up = Uploads::new(&store);
    let dir = tmp.path().join("uploads");
    up.create(A, &meta(100)).expect("old session");
    up.create(B, &meta(1_000)).expect("fresh session");
    let ids = [
        "11111111111111111111111111111111",
        "22222222222222222222222222222222",
        "33333333333333333333333333333333",
        "44444444444444444444444444444444",
        "55555555555555555555555555555555",
    ];
    // An ended session whose log was never discarded (the server stopped first).
    std::fs::write(dir.join(format!("{}.done", ids[0])), b"x").expect("done");
    // A session whose creation stopped before its meta was written.
    std::fs::write(dir.join(format!("{}.log", ids[1])), b"").expect("log");
    // A session whose end stopped between renaming its log and removing its meta.
    std::fs::write(dir.join(format!("{}.meta", ids[2])), b"{}").expect("meta");
    // A session whose meta cannot be read.
    std::fs::write(dir.join(format!("{}.meta", ids[3])), b"not json").expect("meta");
    std::fs::write(dir.join(format!("{}.log", ids[3])), b"abc").expect("log");
    // An older version's spool without its meta.
    std::fs::write(dir.join(format!("{}.data", ids[4])), b"abc").expect("data");
    // Something that is not a session at all stays.
    std::fs::write(dir.join("README"), b"keep").expect("other");

    let n = up.expire(500).expect("expire");
    assert_eq!(n, 6, "the old session and five leftovers");
    assert_eq!(
        files(&dir),
        vec!["README".to_owned(), format!("{B}.log"), format!("{B}.meta")]
    );
    assert_eq!(up.ids().expect("ids"), vec![B.to_owned()]);
    assert_eq!(up.expire(500).expect("again"), 0);
}

#[test]
fn bounds_on_sessions_per_client_in_all_and_on_their_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Store::open(tmp.path(), Options::default()).expect("open");
    let limits = UploadLimits {
        sessions_max: 2,
        sessions_per_client_max: 1,
        session_bytes_max: 1000,
        bytes_max: 1500,
    };
    let up = Uploads::with_limits(&store, limits);
    let ids: Vec<String> = (1..=4).map(|i| format!("{i:032x}")).collect();
    up.create(&ids[0], &by("user:alice"))
        .expect("alice's first");
    let again = up.create(&ids[1], &by("user:alice"));
    assert!(
        matches!(&again, Err(Error::Throttled(m)) if m.contains("user:alice") && m.contains("upload_sessions_per_client_max")),
        "{again:?}"
    );
    up.create(&ids[1], &by("user:bob")).expect("bob's");
    let third = up.create(&ids[2], &by("address:10.0.0.9"));
    assert!(
        matches!(&third, Err(Error::Throttled(m)) if m.contains("upload_sessions_max")),
        "{third:?}"
    );
    // A session's bytes: an append past the bound is refused and not kept.
    append(&up, &ids[0], &[7u8; 900]);
    let mut w = up.writer(&ids[0], 900, Algorithm::Sha256).expect("writer");
    let past = w.write(Bytes::from(vec![7u8; 101]));
    assert!(
        matches!(&past, Err(Error::Throttled(m)) if m.contains("upload_session_bytes_max")),
        "{past:?}"
    );
    drop(w);
    assert_eq!(up.status(&ids[0]).expect("status").1, 900);
    // All sessions' bytes: 900 held by alice, so bob may add 600 but not 601.
    let mut w = up.writer(&ids[1], 0, Algorithm::Sha256).expect("writer");
    let past = w.write(Bytes::from(vec![8u8; 601]));
    assert!(
        matches!(&past, Err(Error::Throttled(m)) if m.contains("upload_bytes_max")),
        "{past:?}"
    );
    drop(w);
    append(&up, &ids[1], &[8u8; 600]);
    // Ending a session makes room; the count survives a restart (read from the files).
    up.remove(&ids[0]).expect("remove");
    up.create(&ids[2], &by("address:10.0.0.9"))
        .expect("room again");
    drop(up);
    let up = Uploads::with_limits(&store, limits);
    let full = up.create(&ids[3], &by("user:carol"));
    assert!(matches!(full, Err(Error::Throttled(_))), "{full:?}");
}
