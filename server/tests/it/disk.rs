//! A full disk (#14 item 3): on a small tmpfs, pushes fill the file system until the
//! free-space floor refuses them with 507; then deleting images and a collection make room
//! and pushes work again, and fsck is clean, all without making room by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::http::{call, Res};
use crate::{seeded, sha256, Registry};

/// A tmpfs mounted for the test's life (needs root, as the test deps' installation does).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs for the full-disk test failed (the tests run as root, like \
             scripts/install-test-deps): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Pushes an image with a random layer of `len` bytes; the manifest PUT's response, or
/// the first failed blob upload's.
fn try_push(r: &Registry, tag: &str, seed: u64, len: usize) -> (Res, String) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = seeded(len, seed);
    let mut descs = Vec::new();
    for (data, media) in [
        (&config, "application/vnd.oci.image.config.v1+json"),
        (&layer, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let d = sha256(data);
        let res = call(
            "POST",
            &r.url(&format!("/v2/fill/blobs/uploads/?digest={d}")),
            &[],
            Some(data),
        );
        if res.status != 201 {
            return (res, String::new());
        }
        descs.push(json!({"mediaType": media, "digest": d, "size": data.len()}));
    }
    let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": descs[0], "layers": [descs[1]]});
    let body = m.to_string().into_bytes();
    let res = call(
        "PUT",
        &r.url(&format!("/v2/fill/manifests/{tag}")),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        Some(&body),
    );
    (res, sha256(&body))
}

#[test]
fn a_full_disk_refuses_pushes_and_deletes_and_gc_make_room_without_help() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), "48m");
    let data = mnt.0.join("data");
    let mut r = Registry::start_with(
        &data,
        &[
            ("BALLAST_DISK_FREE_MIN_BYTES", &(8u64 << 20).to_string()),
            ("BALLAST_SEGMENT_BYTES_MAX", &(4u64 << 20).to_string()),
            ("BALLAST_GC_INTERVAL_SECS", "0"),
        ],
    );
    let mut pushed = Vec::new();
    let refused = loop {
        let seed = pushed.len() as u64 + 1;
        assert!(seed < 40, "48 MiB never filled");
        let (res, manifest) = try_push(&r, &format!("t{seed}"), seed, 3 << 20);
        if res.status != 201 {
            break res;
        }
        pushed.push(manifest);
    };
    let text = String::from_utf8_lossy(&refused.body);
    assert_eq!(refused.status, 507, "{text}");
    assert!(
        text.contains("DENIED") && text.contains("free") && text.contains("disk_free_min_bytes"),
        "{text}"
    );
    assert!(pushed.len() >= 5, "only {} images fit", pushed.len());
    let health: Value =
        serde_json::from_slice(&call("GET", &r.url("/healthz"), &[], None).body).expect("json");
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["detail"].as_str().unwrap_or("").contains("disk"),
        "{health}"
    );
    // What is stored is still served.
    let first = seeded(3 << 20, 1);
    let got = call(
        "GET",
        &r.url(&format!("/v2/fill/blobs/{}", sha256(&first))),
        &[],
        None,
    );
    assert!(got.status == 200 && got.body == first);

    // Delete every image but the last, collect: the room comes back.
    for m in &pushed[..pushed.len() - 1] {
        let res = call(
            "DELETE",
            &r.url(&format!("/v2/fill/manifests/{m}")),
            &[],
            None,
        );
        assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
    }
    let gc = call(
        "POST",
        &r.url("/admin/gc?grace=0&min_dead_fraction=0.01"),
        &[],
        None,
    );
    assert_eq!(gc.status, 200, "{}", String::from_utf8_lossy(&gc.body));
    let (res, _) = try_push(&r, "again", 1000, 3 << 20);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let health: Value =
        serde_json::from_slice(&call("GET", &r.url("/healthz"), &[], None).body).expect("json");
    assert_eq!(health["status"], "ok", "{health}");
    r.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["fsck"])
        .arg(&data)
        .output()
        .expect("fsck");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
