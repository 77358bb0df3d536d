//! The on-disk format, pinned: a data directory written by format 1 (segments, index files,
//! catalog journal and snapshot) is committed under `tests/fixtures/format-1/`, and every
//! build must open it, read every blob byte-exact and find it clean. A format change that
//! breaks it must bump the version and keep a reader for this one (docs/format.md).

use std::path::{Path, PathBuf};

use ballast_engine::catalog::{ManifestLink, Op};
use ballast_engine::{verify, ChunkMode, Digest, Options, Store};

use crate::{seeded, sha256, tar};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1")
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
    let mut ops: Vec<Op> = digests
        .iter()
        .map(|d| Op::LinkBlob {
            repo: "fixture/app".into(),
            digest: d.clone(),
            at: 1_790_000_000,
        })
        .collect();
    ops.push(Op::PutManifest {
        repo: "fixture/app".into(),
        digest: md.clone(),
        link: ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: manifest.len() as u64,
            artifact_type: None,
            annotations: Default::default(),
            subject: None,
            references: digests[1..].to_vec(),
            pushed_at: 1_790_000_000,
        },
    });
    ops.push(Op::Tag {
        repo: "fixture/app".into(),
        tag: "v1".into(),
        digest: md,
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
