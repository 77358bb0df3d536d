//! A full disk (#14 item 3): on a small tmpfs, pushes fill the file system until the
//! free-space floor refuses them with 507; then deleting images and a collection make room
//! and pushes work again, and fsck is clean, all without making room by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::http::call;
use crate::{seeded, sha256, try_push_image_as, Registry};

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

#[test]
fn a_full_disk_refuses_pushes_and_deletes_and_gc_make_room_without_help() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mnt = Tmpfs::mount(&tmp.path().join("mnt"), "48m");
    let data = mnt.0.join("data");
    let log = tmp.path().join("server.log");
    let mut r = Registry::start_with(
        &data,
        &[
            (crate::STDERR_FILE, log.to_str().expect("utf8")),
            ("BALLAST_DISK_FREE_MIN_BYTES", &(8u64 << 20).to_string()),
            ("BALLAST_SEGMENT_BYTES_MAX", &(4u64 << 20).to_string()),
            ("BALLAST_GC_INTERVAL_SECS", "0"),
        ],
    );
    let mut pushed = Vec::new();
    let refused = loop {
        let seed = pushed.len() as u64 + 1;
        assert!(seed < 40, "48 MiB never filled");
        let (res, manifest) =
            try_push_image_as(&r.url(""), "fill", &format!("t{seed}"), seed, 3 << 20, &[]);
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
    // And the log says so (the server looks every few seconds).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("nearly full")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning in the log"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
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
    let (res, _) = try_push_image_as(&r.url(""), "fill", "again", 1000, 3 << 20, &[]);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let health: Value =
        serde_json::from_slice(&call("GET", &r.url("/healthz"), &[], None).body).expect("json");
    assert_eq!(health["status"], "ok", "{health}");
    r.stop();
    crate::assert_fsck_clean(&data);
}
