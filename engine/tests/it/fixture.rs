//! The on-disk format, pinned: data directories written by format 1 (segments, index files,
//! a catalog journal) and by format 2 (segments with CatalogDurable records, a folded
//! catalog with its snapshot and the generation before it, a non-empty active segment, a
//! quarantine, removed segments, an upload session log) and by format 3 (the same, with tag
//! times and pull counts) are committed under
//! `tests/fixtures/`, and every build must open them, read every blob byte-exact and find
//! them clean. A format change that breaks one must bump the version and keep a reader for
//! it (docs/format.md).

use std::path::{Path, PathBuf};

use ballast_engine::catalog::{ManifestLink, Op};
use ballast_engine::{verify, ChunkMode, Digest, Options, Store};

use crate::{seeded, sha256, tar};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1")
}

fn fixture_2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-2")
}

fn fixture_3_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-3")
}

/// The upload session the format-2 fixture holds, and what it received.
const SESSION: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn session_bytes() -> Vec<u8> {
    seeded(150_000, 9)
}

/// Writes the format-2 fixture: `cargo test -p ballast-engine --test it
/// fixture::write_fixture_2 -- --ignored`. Only for a new format version.
#[test]
#[ignore = "writes the committed fixture: only for a new format version"]
fn write_fixture_2() {
    write_fixture_folded(&fixture_2_dir(), false);
}

/// Writes the format-3 fixture (the format-2 one's content, plus tag times and pull counts):
/// `cargo test -p ballast-engine --test it fixture::write_fixture_3 -- --ignored`. Only for
/// a new format version.
#[test]
#[ignore = "writes the committed fixture: only for a new format version"]
fn write_fixture_3() {
    write_fixture_folded(&fixture_3_dir(), true);
}

/// A folded catalog with its generation before, sealed and active segments, a collected
/// segment, an upload session and a quarantine; `format_3` adds tag times and pull counts.
fn write_fixture_folded(dir: &Path, format_3: bool) {
    let dir = dir.to_path_buf();
    let _ = std::fs::remove_dir_all(&dir);
    let opts = Options {
        catalog_journal_bytes_max: 2048,
        ..opts()
    };
    let store = Store::open(&dir, opts).expect("open");
    let digests: Vec<Digest> = blobs()
        .iter()
        .map(|b| store.put_blob(b, None).expect("put").recipe.digest.clone())
        .collect();
    // A blob linked, then unlinked and collected: its segment goes (removed-segments).
    let gone = store.put_blob(&seeded(70_000, 7), None).expect("put");
    store.seal_active().expect("seal");
    let link = |repo: &str, d: &Digest| Op::LinkBlob {
        repo: repo.into(),
        digest: d.clone(),
        at: 1_790_000_000,
    };
    store
        .commit_ops(vec![link("fixture/tmp", &gone.recipe.digest)])
        .expect("link");
    store
        .commit_ops(vec![Op::UnlinkBlob {
            repo: "fixture/tmp".into(),
            digest: gone.recipe.digest.clone(),
        }])
        .expect("unlink");
    // The blobs, kept by a tagged manifest; then enough small batches (tags) for the
    // catalog to fold (a snapshot and the generation before it).
    let manifest = format!(
        "{{\"schemaVersion\":2,\"layers\":[\"{}\",\"{}\",\"{}\"]}}",
        digests[0], digests[1], digests[2]
    )
    .into_bytes();
    let md = store
        .put_blob(&manifest, None)
        .expect("manifest")
        .recipe
        .digest
        .clone();
    let ops = manifest_ops("fixture/app", &md, manifest.len(), &digests);
    store.commit_ops(ops).expect("catalog");
    for i in 0..60 {
        store
            .commit_ops(vec![Op::Tag {
                repo: "fixture/app".into(),
                tag: format!("t{i}"),
                digest: md.clone(),
                at: if format_3 { 1_790_000_000 + i } else { 0 },
            }])
            .expect("tag");
    }
    if format_3 {
        store
            .commit_ops(vec![Op::Pulled {
                repo: "fixture/app".into(),
                digest: md.clone(),
                count: 7,
                at: 1_790_000_100,
            }])
            .expect("pulled");
    }
    let report = ballast_engine::gc::collect(
        &store,
        &ballast_engine::gc::GcOptions {
            grace_secs: 0,
            dead_fraction_min: 0.01,
            ..Default::default()
        },
        ballast_engine::clock::now_secs() + 10,
    )
    .expect("gc");
    assert!(report.segments_compacted > 0, "{report:?}");
    // The active segment keeps data: the store is dropped, not closed.
    store.put_blob(b"in the active segment", None).expect("put");
    let uploads = ballast_engine::Uploads::new(&store);
    uploads
        .create(
            SESSION,
            &ballast_engine::uploads::SessionMeta {
                repo: "fixture/app".into(),
                started_at: 1_790_000_000,
                client: Some("user:fixture".into()),
            },
        )
        .expect("session");
    let mut w = uploads
        .writer(SESSION, 0, ballast_engine::Algorithm::Sha256)
        .expect("writer");
    w.write(session_bytes().into()).expect("write");
    w.checkpoint().expect("checkpoint");
    drop(uploads);
    let mut q = (*store.quarantine()).clone();
    q.blobs.insert(
        sha256(b"a blob once damaged"),
        ballast_engine::quarantine::QuarantinedBlob {
            reason: "chunk_missing: written for the fixture".into(),
            at: 1_790_000_000,
        },
    );
    store.set_quarantine(q).expect("quarantine");
    drop(store);
    let _ = std::fs::remove_file(dir.join("LOCK"));
    let names: Vec<String> = std::fs::read_dir(dir.join("catalog"))
        .expect("catalog")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("snapshot-")),
        "{names:?}"
    );
    assert!(dir.join("removed-segments").exists());
}

#[test]
fn format_2_fixture_reads_back() {
    folded_fixture_reads_back(&fixture_2_dir());
}

#[test]
fn format_3_fixture_reads_back() {
    let state = folded_fixture_reads_back(&fixture_3_dir());
    let repo = &state.repos["fixture/app"];
    assert_eq!(repo.tag_set_at.len(), 60);
    assert_eq!(repo.tag_set_at["t59"], 1_790_000_059);
    let pulls: Vec<_> = repo.pulls.values().collect();
    assert_eq!(pulls.len(), 1);
    assert_eq!((pulls[0].count, pulls[0].last), (7, 1_790_000_100));
}

/// Opens a copy of a folded fixture (format 2 and later), reads every blob back, finds it
/// clean and finishes its upload session; returns its catalog.
fn folded_fixture_reads_back(dir: &Path) -> ballast_engine::catalog::State {
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(dir, tmp.path());
    let store = Store::open(tmp.path(), opts()).expect("the fixture opens");
    for b in blobs()
        .iter()
        .chain([b"in the active segment".to_vec()].iter())
    {
        assert_eq!(&store.read_blob(&sha256(b)).expect("fixture blob"), b);
    }
    let state = store.catalog().read().clone();
    assert_eq!(state.repos.len(), 1, "{:?}", state.repos.keys());
    assert_eq!(state.repos["fixture/app"].tags.len(), 60);
    assert!(state.segments_durable.is_some());
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.quarantined_blobs.len(), 1);
    // The upload session resumes and finishes.
    let uploads = ballast_engine::Uploads::new(&store);
    let data = session_bytes();
    assert_eq!(
        uploads.status(SESSION).expect("status").1,
        data.len() as u64
    );
    let w = uploads
        .writer(
            SESSION,
            data.len() as u64,
            ballast_engine::Algorithm::Sha256,
        )
        .expect("writer");
    w.finish(&sha256(&data)).expect("finish");
    assert_eq!(store.read_blob(&sha256(&data)).expect("read"), data);
    state
}

/// The blobs the fixture holds: random bytes, compressible text (stored zstd-compressed), and
/// a tar layer (chunked at member boundaries).
fn blobs() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..4000)
        .flat_map(|i| format!("line {i} of a compressible config file\n").into_bytes())
        .collect();
    let layer = tar::<String>(
        &[
            ("etc/app.conf".into(), b"key = value\n".repeat(200)),
            ("bin/tool".into(), seeded(70_000, 3)),
        ],
        1_700_000_000,
    );
    vec![seeded(20_000, 1), text, layer]
}

/// Links `refs` in `repo` and puts the manifest `md` (of `len` bytes) referencing them.
fn manifest_ops(repo: &str, md: &Digest, len: usize, refs: &[Digest]) -> Vec<Op> {
    let mut ops: Vec<Op> = refs
        .iter()
        .map(|d| Op::LinkBlob {
            repo: repo.into(),
            digest: d.clone(),
            at: 1_790_000_000,
        })
        .collect();
    ops.push(Op::PutManifest {
        repo: repo.into(),
        digest: md.clone(),
        link: ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: len as u64,
            artifact_type: None,
            annotations: Default::default(),
            subject: None,
            references: refs.to_vec(),
            pushed_at: 1_790_000_000,
            origin: None,
        },
    });
    ops
}

fn opts() -> Options {
    Options {
        segment_bytes_max: 64 * 1024,
        ..Options::default()
    }
}

/// Writes the fixture: `cargo test -p ballast-engine --test it fixture::write_fixture --
/// --ignored`. Only for a new format version; the committed one is the contract.
#[test]
#[ignore = "writes the committed fixture: only for a new format version"]
fn write_fixture() {
    let dir = fixture_dir();
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir, opts()).expect("open");
    let mut digests: Vec<Digest> = Vec::new();
    for (i, b) in blobs().iter().enumerate() {
        let mut w = ballast_engine::BlobWriter::new(
            &store,
            ballast_engine::Algorithm::Sha256,
            if i == 2 {
                ChunkMode::Auto
            } else {
                ChunkMode::Plain
            },
        );
        w.write(b).expect("write");
        digests.push(w.finish(None).expect("finish").recipe.digest.clone());
    }
    let manifest = format!(
        "{{\"schemaVersion\":2,\"layers\":[\"{}\",\"{}\"]}}",
        digests[1], digests[2]
    )
    .into_bytes();
    let md = sha256(&manifest);
    store.put_blob(&manifest, None).expect("manifest");
    // (Format 1 linked every blob but referenced the last two.)
    let mut ops = manifest_ops("fixture/app", &md, manifest.len(), &digests);
    if let Some(Op::PutManifest { link, .. }) = ops.last_mut() {
        link.references = digests[1..].to_vec();
    }
    ops.push(Op::Tag {
        repo: "fixture/app".into(),
        tag: "v1".into(),
        digest: md,
        at: 0,
    });
    store.commit_ops(ops).expect("catalog");
    store.close().expect("close");
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[test]
fn format_1_fixture_reads_back() {
    // Work on a copy: opening may write (the lock file, a fresh active segment).
    let tmp = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture_dir(), tmp.path());
    let store = Store::open(tmp.path(), opts()).expect("format 1 opens");
    let all = blobs();
    for b in &all {
        assert_eq!(&store.read_blob(&sha256(b)).expect("fixture blob"), b);
    }
    let state = store.catalog().read().clone();
    let repo = &state.repos["fixture/app"];
    let md = repo.tags["v1"].clone();
    let manifest = store.read_blob(&md).expect("manifest");
    assert_eq!(sha256(&manifest), md);
    assert_eq!(repo.blobs.len(), all.len());
    let report = verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
    assert!(
        report.segments >= 2,
        "the fixture has sealed and active segments"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("fixture directory") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}
