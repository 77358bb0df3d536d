//! Segments in a bucket (issue #22) against a real 3-node Garage cluster: shipping
//! checkpoints while pushes go on, a restore after the data directory is lost, a Garage node
//! down, the bucket unreachable, and a kill -9 in the middle of an upload.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::garage::Garage;
use crate::http::call;
use crate::{assert_fsck_clean, metric, push_image_as, seeded, sha256, Registry};

fn write_config(dir: &Path, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("config dir");
    let path = dir.join("ballast.toml");
    std::fs::write(&path, body).expect("config");
    path
}

/// A 3-node Garage, a scratch directory, and a config whose `[bucket]` is `prefix` on it
/// with `extra` settings.
fn bed(prefix: &str, extra: &str) -> (Garage, tempfile::TempDir, PathBuf) {
    let g = Garage::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(tmp.path(), &g.bucket_table(prefix, extra));
    (g, tmp, config)
}

/// A runtime to drive the bucket client from a test.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn status(r: &Registry) -> Value {
    let res = call("GET", &r.url("/admin/bucket"), &[], None);
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the bucket holds every change committed before this call (the status sees
/// those at once); returns how long that took.
fn wait_shipped(r: &Registry) -> Duration {
    let started = Instant::now();
    wait_for("the bucket to catch up", Duration::from_secs(60), || {
        let s = status(r);
        s["pending_since"].is_null() && !s["last_seq"].is_null()
    });
    started.elapsed()
}

fn restore(config: &Path, dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("restore")
        .arg("--config")
        .arg(config)
        .args(extra)
        .arg(dir)
        .output()
        .expect("ballast restore");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Restores the newest checkpoint into `dir` (it must succeed, fsck clean) and serves it.
fn restored(config: &Path, dir: &Path) -> Registry {
    let (code, out) = restore(config, dir, &[]);
    assert_eq!(code, 0, "{out}");
    Registry::start(dir)
}

/// The image `push_image_as(.., seed, len, ..)` pushed, pulled back byte for byte.
fn assert_pulls(r: &Registry, repo: &str, tag: &str, digest: &str, seed: u64, len: usize) {
    assert_eq!(
        pull_status(r, repo, tag, digest, seed, len),
        (200, String::new())
    );
}

/// Pulls that image: 200 when its manifest and layer came back byte for byte, else the
/// first other status and its body.
fn pull_status(
    r: &Registry,
    repo: &str,
    tag: &str,
    digest: &str,
    seed: u64,
    len: usize,
) -> (u16, String) {
    let m = call(
        "GET",
        &r.url(&format!("/v2/{repo}/manifests/{tag}")),
        &[],
        None,
    );
    if m.status != 200 {
        return (m.status, String::from_utf8_lossy(&m.body).into_owned());
    }
    assert_eq!(sha256(&m.body), digest, "{repo}:{tag}");
    let layer = m.json()["layers"][0]["digest"]
        .as_str()
        .expect("layer")
        .to_owned();
    let b = call(
        "GET",
        &r.url(&format!("/v2/{repo}/blobs/{layer}")),
        &[],
        None,
    );
    if b.status != 200 {
        return (b.status, String::from_utf8_lossy(&b.body).into_owned());
    }
    assert!(
        b.body == seeded(len, seed),
        "{repo}:{tag}: layer bytes differ"
    );
    (200, String::new())
}

/// Every checkpoint record in the bucket names objects that are there whole (the length it
/// gives); returns how many records there are, the segment ids they list and the segment
/// ids the bucket holds.
fn assert_records_whole(g: &Garage, prefix: &str) -> (usize, BTreeSet<u64>, BTreeSet<u64>) {
    let bucket = g.client(prefix);
    let rt = runtime();
    rt.block_on(async {
        let objects: std::collections::BTreeMap<String, u64> =
            bucket.list("").await.expect("list").into_iter().collect();
        let mut listed = BTreeSet::new();
        let mut records = 0;
        for (name, _) in objects
            .iter()
            .filter(|(n, _)| n.starts_with("checkpoints/"))
        {
            let bytes = bucket.get(name).await.expect("get").expect("record");
            let rec: Value = serde_json::from_slice(&bytes).expect("record json");
            records += 1;
            let cat = rec["catalog"]["name"].as_str().expect("catalog");
            assert_eq!(
                objects.get(cat).copied(),
                rec["catalog"]["len"].as_u64(),
                "{cat}"
            );
            for s in rec["segments"].as_array().expect("segments") {
                let id = s["id"].as_u64().expect("id");
                let obj = format!("segments/{id:020}.seg");
                assert_eq!(
                    objects.get(&obj).copied(),
                    s["len"].as_u64(),
                    "{obj} in {name}"
                );
                listed.insert(id);
            }
        }
        let stored: BTreeSet<u64> = objects
            .keys()
            .filter_map(|n| {
                n.strip_prefix("segments/")?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()
            })
            .collect();
        assert!(
            listed.is_subset(&stored),
            "records list segments the bucket lacks"
        );
        (records, listed, stored)
    })
}

#[test]
fn a_registry_comes_back_from_the_bucket_after_its_disk_is_lost() {
    let (mut g, tmp, config) = bed(
        "registry-a",
        "ship_interval_secs = 1\ncheckpoints_kept = 3\ncheckpoint_grace_secs = 0",
    );
    let cfg = config.to_str().expect("utf-8");
    let data = tmp.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", cfg]);
    let mut images = vec![
        ("team-a/api", "v1", 1u64, 3 << 20),
        // Above 16 MiB: a segment sent as a multipart upload.
        ("team-a/api", "v2", 2, 20 << 20),
        ("team-b/web", "latest", 3, 1 << 20),
    ];
    let mut digests = Vec::new();
    for (repo, tag, seed, len) in &images {
        digests.push(push_image_as(&r.url(""), repo, tag, *seed, *len, &[]));
    }
    let first = wait_shipped(&r);
    // One Garage node down: with three copies, two still make a quorum for every write.
    g.kill_node(2);
    images.push(("team-b/web", "v2", 4, 2 << 20));
    digests.push(push_image_as(
        &r.url(""),
        "team-b/web",
        "v2",
        4,
        2 << 20,
        &[],
    ));
    let lag = wait_shipped(&r);
    eprintln!(
        "acknowledged pushes in the bucket after {} ms, then {} ms with a node down \
         (ship_interval_secs = 1)",
        first.as_millis(),
        lag.as_millis()
    );
    let forced = call("POST", &r.url("/admin/bucket/ship"), &[], None);
    assert_eq!(
        forced.status,
        200,
        "{}",
        String::from_utf8_lossy(&forced.body)
    );
    assert!(forced.json()["seq"].as_u64().is_some());
    let s = status(&r);
    assert_eq!(s["consecutive_failures"], 0);
    assert!(s["segments_uploaded"].as_u64().unwrap_or(0) >= 2, "{s}");

    // The host's disk is gone.
    r.kill();
    std::fs::remove_dir_all(&data).expect("remove data");

    let (code, out) = restore(&config, &data, &["--checkpoint", "999999"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("holds no checkpoint 999999"), "{out}");
    assert!(!data.exists(), "a refused restore creates nothing");
    let (code, list) = restore(&config, &data, &["--list"]);
    assert_eq!(code, 0, "{list}");
    assert!(
        list.lines().filter(|l| l.starts_with("checkpoint")).count() <= 3,
        "checkpoints_kept = 3: {list}"
    );
    let (code, out) = restore(&config, &data, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("restored checkpoint") && out.contains("clean"),
        "{out}"
    );
    eprintln!("{}", out.lines().next().unwrap_or_default());
    let (code, out) = restore(&config, &data, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not empty"), "{out}");

    let mut back = Registry::start(&data);
    for ((repo, tag, seed, len), digest) in images.iter().zip(&digests) {
        assert_pulls(&back, repo, tag, digest, *seed, *len);
    }
    back.stop();
    assert_fsck_clean(&data);
    let audit = std::fs::read_to_string(data.join("audit/audit.log")).unwrap_or_default();
    assert!(audit.contains("bucket.restore"), "the restore is audited");
    g.start_node(2);

    // fsck with the config checks the bucket too: clean, then what is wrong in it.
    let fsck = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
            .arg("fsck")
            .arg(&data)
            .args(["--config", cfg])
            .args(extra)
            .output()
            .expect("fsck");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = fsck(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("bucket clean"), "{out}");
    let client = g.client("registry-a");
    let rt = runtime();
    let newest: Value = {
        let names = rt.block_on(client.list("checkpoints/")).expect("list");
        let (name, _) = names.last().expect("a checkpoint");
        serde_json::from_slice(&rt.block_on(client.get(name)).expect("get").expect("record"))
            .expect("json")
    };
    let catalog = newest["catalog"]["name"]
        .as_str()
        .expect("catalog")
        .to_owned();
    let len = newest["catalog"]["len"].as_u64().expect("len") as usize;
    rt.block_on(async {
        client
            .put("segments/00000000000000099999.seg", seeded(1000, 5).into())
            .await
            .expect("put");
        client
            .put("notes.txt", bytes::Bytes::from_static(b"not ballast's"))
            .await
            .expect("put");
        client
            .put(&catalog, seeded(len, 6).into())
            .await
            .expect("put");
    });
    let (code, out) = fsck(&[]);
    assert_eq!(code, 1, "{out}");
    for kind in ["object_unreferenced", "object_unknown", "object_digest"] {
        assert!(out.contains(kind), "{kind}: {out}");
    }
    let (code, out) = fsck(&["--repair"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("1 unreferenced objects deleted"), "{out}");
    assert!(!out.contains("object_unreferenced"), "{out}");
    assert!(
        out.contains("object_unknown") && out.contains("object_digest"),
        "{out}"
    );
}

#[test]
fn pushes_go_on_while_the_bucket_is_unreachable_and_it_catches_up() {
    let (mut g, tmp, config) = bed(
        "registry-b",
        "ship_interval_secs = 1\nrequest_timeout_secs = 3",
    );
    let data = tmp.path().join("data");
    let r = Registry::start_args(&data, &[], &["--config", config.to_str().expect("utf-8")]);
    let d1 = push_image_as(&r.url(""), "ops/tool", "v1", 11, 1 << 20, &[]);
    wait_shipped(&r);

    for i in 0..3 {
        g.kill_node(i);
    }
    let d2 = push_image_as(&r.url(""), "ops/tool", "v2", 12, 1 << 20, &[]);
    assert_pulls(&r, "ops/tool", "v1", &d1, 11, 1 << 20);
    wait_for(
        "/healthz to report the bucket",
        Duration::from_secs(60),
        || {
            let h = call("GET", &r.url("/healthz"), &[], None).json();
            h["status"] == "degraded"
                && h["bucket_lag_secs"].as_u64().is_some_and(|l| l > 0)
                && h["detail"].as_str().is_some_and(|d| d.contains("bucket"))
        },
    );
    let metrics =
        String::from_utf8(call("GET", &r.url("/metrics"), &[], None).body).expect("utf-8");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    assert!(value("ballast_bucket_lag_seconds") > 0.0);
    assert!(value("ballast_bucket_ship_failures_total") > 0.0);
    let forced = call("POST", &r.url("/admin/bucket/ship"), &[], None);
    assert_eq!(forced.status, 503);
    let msg = String::from_utf8_lossy(&forced.body);
    assert!(msg.contains("shipping to the bucket failed"), "{msg}");

    for i in 0..3 {
        g.start_node(i);
    }
    // The shipper backs off while shipments fail; an operator's ship does not wait for it.
    wait_for("a shipment to succeed", Duration::from_secs(60), || {
        call("POST", &r.url("/admin/bucket/ship"), &[], None).status == 200
    });
    let h = call("GET", &r.url("/healthz"), &[], None).json();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["bucket_lag_secs"], 0, "{h}");
    drop(r);
    let back = restored(&config, &tmp.path().join("restored"));
    assert_pulls(&back, "ops/tool", "v1", &d1, 11, 1 << 20);
    assert_pulls(&back, "ops/tool", "v2", &d2, 12, 1 << 20);
}

#[test]
fn a_kill_during_uploads_never_leaves_a_partial_checkpoint() {
    let (g, tmp, config) = bed("registry-c", "ship_interval_secs = 1");
    let cfg = config.to_str().expect("utf-8");
    let data = tmp.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", cfg]);
    let small = push_image_as(&r.url(""), "ci/base", "v1", 21, 1 << 20, &[]);
    wait_shipped(&r);
    // A 48 MiB layer: its segment goes up in three parts; the kill lands while it does
    // (or, on a fast machine, just after), and neither may leave a checkpoint that names
    // what the bucket does not hold whole.
    let big = push_image_as(&r.url(""), "ci/big", "v1", 22, 48 << 20, &[]);
    std::thread::sleep(Duration::from_millis(1300));
    r.kill();
    assert_records_whole(&g, "registry-c");

    // Started again, it clears what the killed shipment left and ships what is missing.
    let r = Registry::start_args(&data, &[], &["--config", cfg]);
    wait_shipped(&r);
    let (records, listed, stored) = assert_records_whole(&g, "registry-c");
    assert!(records >= 2);
    assert_eq!(
        listed, stored,
        "no segment object is left that no checkpoint lists"
    );
    let s = status(&r);
    let newest: Value = {
        let bucket = g.client("registry-c");
        let rt = runtime();
        let name = format!(
            "checkpoints/{:020}.json",
            s["last_seq"].as_u64().expect("seq")
        );
        let bytes = rt
            .block_on(bucket.get(&name))
            .expect("get")
            .expect("newest record");
        serde_json::from_slice(&bytes).expect("json")
    };
    let newest_ids: BTreeSet<u64> = newest["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|s| s["id"].as_u64())
        .collect();
    assert!(newest_ids.is_subset(&stored));
    drop(r);
    let back = restored(&config, &tmp.path().join("restored"));
    assert_pulls(&back, "ci/base", "v1", &small, 21, 1 << 20);
    assert_pulls(&back, "ci/big", "v1", &big, 22, 48 << 20);
}

#[test]
fn with_acknowledge_bucket_a_push_is_answered_once_the_bucket_holds_it() {
    let mut g = Garage::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    // A long interval: only the pushes' own requests make the shipments here.
    let config = write_config(
        tmp.path(),
        &g.bucket_table(
            "registry-d",
            "ship_interval_secs = 600\nacknowledge = \"bucket\"\nacknowledge_timeout_secs = 4\n\
             request_timeout_secs = 2",
        ),
    );
    let data = tmp.path().join("data");
    let r = Registry::start_args(&data, &[], &["--config", config.to_str().expect("utf-8")]);
    let mut took = Vec::new();
    for seed in 31..34u64 {
        let started = Instant::now();
        push_image_as(
            &r.url(""),
            "rel/app",
            &format!("v{seed}"),
            seed,
            1 << 20,
            &[],
        );
        took.push(started.elapsed().as_millis());
        let s = status(&r);
        assert!(
            s["pending_since"].is_null(),
            "answered before the bucket held it: {s}"
        );
    }
    // The same pushes, answered once stored here (the default), in the same run.
    let local_config = write_config(
        &tmp.path().join("local"),
        &g.bucket_table("registry-e", "ship_interval_secs = 1"),
    );
    let local = Registry::start_args(
        &tmp.path().join("local/data"),
        &[],
        &["--config", local_config.to_str().expect("utf-8")],
    );
    let mut local_took = Vec::new();
    for seed in 31..34u64 {
        let started = Instant::now();
        push_image_as(
            &local.url(""),
            "rel/app",
            &format!("v{seed}"),
            seed,
            1 << 20,
            &[],
        );
        local_took.push(started.elapsed().as_millis());
    }
    drop(local);
    eprintln!(
        "pushes of a 1 MiB image: answered once in the bucket {took:?} ms, once stored here \
         {local_took:?} ms"
    );

    // The bucket unreachable: the push is stored but answered 503, saying so.
    for i in 0..3 {
        g.kill_node(i);
    }
    let (res, _) = crate::try_push_image_as(&r.url(""), "rel/app", "late", 40, 1 << 20, &[]);
    assert_eq!(res.status, 503, "{}", String::from_utf8_lossy(&res.body));
    let msg = String::from_utf8_lossy(&res.body);
    assert!(msg.contains("stored here but not in the bucket"), "{msg}");
    let m = call("GET", &r.url("/v2/rel/app/manifests/late"), &[], None);
    assert_eq!(m.status, 200, "the push was kept locally");
}

#[test]
fn a_second_registry_on_the_same_prefix_is_refused_while_the_first_holds_the_lease() {
    let (garage, tmp, config) = bed("registry-f", "ship_interval_secs = 1");
    let cfg = config.to_str().expect("utf-8");
    let mut first = Registry::start_args(&tmp.path().join("a"), &[], &["--config", cfg]);
    let second = || {
        Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                cfg,
                "--data",
            ])
            .arg(tmp.path().join("b"))
            .env("BALLAST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("second serve")
    };
    let out = second().wait_with_output().expect("wait");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds the lease"), "{err}");

    // The same registry killed and started again takes its own lease back at once.
    first.kill();
    let mut first = Registry::start_args(&tmp.path().join("a"), &[], &["--config", cfg]);
    // A clean stop gives the lease up: the second one starts and ships.
    first.stop();
    let mut b = Registry::start_args(&tmp.path().join("b"), &[], &["--config", cfg]);
    push_image_as(&b.url(""), "lease/app", "v1", 31, 1 << 16, &[]);
    wait_shipped(&b);
    let s = status(&b);
    assert_eq!(s["consecutive_failures"], 0);
    let owner = std::fs::read_to_string(tmp.path().join("b/bucket/owner")).expect("owner");
    assert_eq!(s["lease_owner"], owner.trim(), "{s}");
    assert!(s["lease_renewed_at"].as_u64().is_some(), "{s}");

    // Another registry's live lease appears while this one runs (one started in the same
    // second, which read-then-write cannot stop): this one ships nothing over it.
    let rt = runtime();
    let bucket = garage.client("registry-f");
    let other = ballast_bucket::lease::Lease {
        owner: "elsewhere:0000beef".into(),
        renewed_at: ballast_engine::clock::now_secs(),
        ttl_secs: 600,
        url: None,
    };
    rt.block_on(bucket.put(
        ballast_bucket::lease::LEASE,
        serde_json::to_vec(&other).expect("json").into(),
    ))
    .expect("put lease");
    let before = status(&b)["last_seq"].clone();
    let refused = call("POST", &b.url("/admin/bucket/ship"), &[], None);
    assert_eq!(refused.status, 503);
    let msg = String::from_utf8_lossy(&refused.body);
    assert!(
        msg.contains("elsewhere:0000beef") && msg.contains("holds the lease"),
        "{msg}"
    );
    assert_eq!(status(&b)["last_seq"], before, "nothing shipped");
    let held = rt
        .block_on(ballast_bucket::lease::read(&bucket))
        .expect("read lease");
    assert_eq!(held, Some(other), "the other's lease is left alone");
    // Once it is gone, shipping goes on.
    rt.block_on(bucket.delete(ballast_bucket::lease::LEASE))
        .expect("delete lease");
    let shipped = call("POST", &b.url("/admin/bucket/ship"), &[], None);
    assert_eq!(
        shipped.status,
        200,
        "{}",
        String::from_utf8_lossy(&shipped.body)
    );
    b.stop();
}

#[test]
fn serve_on_an_empty_data_directory_restores_the_bucket_unless_a_live_lease_says_otherwise() {
    let (_garage, tmp, config) = bed("registry-g", "ship_interval_secs = 1\ncheckpoints_kept = 1");
    let cfg = config.to_str().expect("utf-8");
    let old = tmp.path().join("old");
    let mut r = Registry::start_args(&old, &[], &["--config", cfg]);
    let digest = push_image_as(&r.url(""), "team-a/api", "v1", 41, 2 << 20, &[]);
    wait_shipped(&r);

    // The old host dies: its lease is still live, so a new host must not take over yet.
    r.kill();
    let new = tmp.path().join("new");
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg,
            "--data",
        ])
        .arg(&new)
        .env("BALLAST_LOG", "warn")
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds the lease") && err.contains("was not restored"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(&new).map_or(true, |mut d| d.next().is_none()),
        "a refused start leaves the directory empty"
    );

    // Once the old one is gone for good (here: it came back and stopped cleanly, giving the
    // lease up), serve on the empty directory restores the newest checkpoint and goes on
    // shipping to the same prefix.
    let mut r = Registry::start_args(&old, &[], &["--config", cfg]);
    r.stop();
    let mut back = Registry::start_args(&new, &[], &["--config", cfg]);
    assert_pulls(&back, "team-a/api", "v1", &digest, 41, 2 << 20);
    let audit = std::fs::read_to_string(new.join("audit/audit.log")).unwrap_or_default();
    assert!(
        audit.contains("bucket.restore") && audit.contains("\"system\""),
        "the restore at start is audited: {audit}"
    );
    let more = push_image_as(&back.url(""), "team-a/api", "v2", 42, 1 << 20, &[]);
    wait_shipped(&back);
    assert_eq!(status(&back)["consecutive_failures"], 0);
    back.stop();
    assert_fsck_clean(&new);

    // And a registry restored from that prefix now has both.
    let third = tmp.path().join("third");
    let mut last = Registry::start_args(&third, &[], &["--config", cfg]);
    assert_pulls(&last, "team-a/api", "v1", &digest, 41, 2 << 20);
    assert_pulls(&last, "team-a/api", "v2", &more, 42, 1 << 20);
    last.stop();
    // One checkpoint kept by number, but none is an hour old: every one is still there.
    let (code, list) = restore(&config, &tmp.path().join("unused"), &["--list"]);
    assert_eq!(code, 0, "{list}");
    assert!(
        list.lines().filter(|l| l.starts_with("checkpoint")).count() >= 3,
        "checkpoints within checkpoint_grace_secs stay: {list}"
    );
}

#[test]
fn segments_past_cache_bytes_max_are_read_back_from_the_bucket_through_a_bounded_cache() {
    const MIB: usize = 1 << 20;
    const CACHE: u64 = 8 << 20;
    let g = Garage::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        tmp.path(),
        &format!(
            "segment_bytes_max = {}\n{}",
            4 * MIB,
            g.bucket_table(
                "registry-t",
                &format!(
                    "ship_interval_secs = 1\nrequest_timeout_secs = 3\ncache_bytes_max = {CACHE}"
                )
            )
        ),
    );
    let data = tmp.path().join("data");
    let args = ["--config", config.to_str().expect("utf-8")];
    let mut r = Registry::start_args(&data, &[], &args);
    let images: Vec<(u64, String)> = (1..=8u64)
        .map(|seed| {
            let tag = format!("v{seed}");
            (
                seed,
                push_image_as(&r.url(""), "ops/big", &tag, 40 + seed, 3 * MIB, &[]),
            )
        })
        .collect();
    wait_shipped(&r);
    wait_for(
        "local copies to be dropped",
        Duration::from_secs(60),
        || status(&r)["remote_segments"].as_u64().unwrap_or(0) >= 3,
    );
    let s = status(&r);
    let remote = s["remote_segments"].as_u64().expect("remote_segments");
    let listed = std::fs::read_to_string(data.join("remote-segments")).expect("remote-segments");
    for id in listed
        .lines()
        .skip(1)
        .map(|l| l.split(' ').next().expect("id"))
    {
        let file = data.join("segments").join(format!("{:0>20}.seg", id));
        assert!(
            !file.exists(),
            "{} is remote but still local",
            file.display()
        );
    }

    // Every image pulls byte for byte, the old ones from the bucket: a range GET per run of
    // blocks, not one per chunk.
    let gets = |r: &Registry| metric(r, "ballast_bucket_requests_total{kind=\"get\"}");
    let before = gets(&r);
    for (seed, digest) in &images {
        assert_pulls(
            &r,
            "ops/big",
            &format!("v{seed}"),
            digest,
            40 + seed,
            3 * MIB,
        );
    }
    let used = gets(&r) - before;
    let s = status(&r);
    let misses = s["cache_misses"].as_u64().expect("misses");
    println!(
        "tiering: {remote} segments remote; 8 pulls of 3 MiB layers cost {used} GETs for \
         {misses} blocks; cache {} bytes",
        s["cache_bytes"]
    );
    assert!(misses > 0, "{s}");
    // 3 MiB layers with their manifest and config span at most 2 blocks each, plus a
    // recipe elsewhere: well under one request per 64 KiB chunk (48 per layer).
    assert!(
        used <= (images.len() * 4) as f64,
        "{used} GETs for {} pulls",
        images.len()
    );
    assert!(
        s["cache_bytes"].as_u64().expect("cache_bytes") <= CACHE + 2 * (4 << 20),
        "{s}"
    );

    // Stopped and started again: what is remote stays remote and still reads.
    r.stop();
    let mut r = Registry::start_args(&data, &[], &args);
    assert_pulls(&r, "ops/big", "v1", &images[0].1, 41, 3 * MIB);
    // An offline fsck checks what is local and says what it left to the bucket.
    r.stop();
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("fsck")
        .arg(&data)
        .output()
        .expect("fsck");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("kept in the bucket"), "{text}");

    // The bucket gone: what is cached or local pulls, the rest is a clear 503.
    let mut g = g;
    let r = Registry::start_args(&data, &[], &args);
    let (newest, digest) = images.last().expect("images");
    assert_pulls(
        &r,
        "ops/big",
        &format!("v{newest}"),
        digest,
        40 + newest,
        3 * MIB,
    );
    for i in 0..3 {
        g.kill_node(i);
    }
    let cached_before = status(&r)["cache_bytes"].as_u64().unwrap_or(0);
    let mut unavailable = 0;
    for (seed, digest) in &images {
        let tag = format!("v{seed}");
        match pull_status(&r, "ops/big", &tag, digest, 40 + seed, 3 * MIB) {
            (200, _) => {}
            (503, msg) => {
                assert!(msg.contains("bucket"), "{msg}");
                unavailable += 1;
            }
            other => panic!("{tag}: {other:?}"),
        }
    }
    assert!(
        unavailable > 0,
        "with {cached_before} bytes cached some image must need the bucket"
    );
    assert!(metric(&r, "ballast_bucket_cache_failures_total") > 0.0);
    for i in 0..3 {
        g.start_node(i);
    }

    // The host is lost. With cache_bytes_max the bucket may hold more than a disk: the
    // restore fetches the catalog and the index files only, and every image pulls through
    // the bucket; fsck is clean. `--fetch-all` fetches every segment instead.
    // (Stopped cleanly, as if its lease had lapsed: the restored one ships to the prefix.)
    let mut r = r;
    r.stop();
    std::fs::remove_dir_all(&data).expect("remove data");
    let (code, out) = restore(&config, &data, &[]);
    assert_eq!(code, 0, "{out}");
    let bytes_fetched = |out: &str| -> u64 {
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words
            .iter()
            .position(|w| *w == "fetched")
            .expect("bytes fetched");
        words[at - 2].parse().expect("a number")
    };
    assert!(out.contains("left in the bucket"), "{out}");
    assert!(bytes_fetched(&out) < (2 * MIB) as u64, "{out}");
    eprintln!("{}", out.lines().next().unwrap_or_default());
    let local_bytes: u64 = std::fs::read_dir(data.join("segments"))
        .expect("segments")
        .map(|e| e.expect("entry").metadata().expect("meta").len())
        .sum();
    assert!(
        local_bytes < MIB as u64,
        "{local_bytes} bytes of segments local"
    );
    let mut back = Registry::start_args(&data, &[], &args);
    for (seed, digest) in &images {
        assert_pulls(
            &back,
            "ops/big",
            &format!("v{seed}"),
            digest,
            40 + seed,
            3 * MIB,
        );
    }
    // It goes on as the primary: a push after the restore ships.
    push_image_as(&back.url(""), "ops/big", "after", 99, MIB, &[]);
    wait_shipped(&back);
    back.stop();
    assert_fsck_clean(&data);
    let all = tmp.path().join("all");
    let (code, out) = restore(&config, &all, &["--fetch-all"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("(0 left in the bucket)"), "{out}");
    assert!(bytes_fetched(&out) > (24 * MIB) as u64, "{out}");
}

/// Issue #22's request-amplification benchmark (run by `scripts/bench-bucket`, not by the
/// test suite): one 64 MiB layer pulled from the bucket by Ballast with an empty cache
/// (cold), again from its cache (warm), and by Distribution's `s3` driver on the same
/// Garage; time and S3 requests (Garage's own counters) of each, printed side by side.
#[test]
#[ignore = "a benchmark: scripts/bench-bucket runs it"]
fn bench_cold_pull_from_the_bucket_against_distribution_s3() {
    use crate::peers::Distribution;
    const MIB: usize = 1 << 20;
    let len: usize = std::env::var("BENCH_BUCKET_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
        * MIB;
    let g = Garage::start();
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf = |name: &str, cache: u64| {
        write_config(
            &tmp.path().join(name),
            &format!(
                "segment_bytes_max = {}\n{}",
                16 * MIB,
                g.bucket_table(
                    "bench-ballast",
                    &format!("ship_interval_secs = 1\ncache_bytes_max = {cache}")
                )
            ),
        )
    };
    let (small, large) = (conf("small", 8 << 20), conf("large", 4 << 30));
    let data = tmp.path().join("data");
    // Pushed with a small cache: every shipped segment's local file is dropped.
    let mut r = Registry::start_args(&data, &[], &["--config", small.to_str().expect("utf-8")]);
    let layer = crate::peers::push_image(&r.url(""), "bench/img", "v1", 77, len, &[]).layer_digest;
    wait_shipped(&r);
    wait_for("the layer to be remote", Duration::from_secs(120), || {
        status(&r)["remote_bytes"].as_u64().unwrap_or(0) >= (len - 16 * MIB) as u64
    });
    r.stop();
    std::fs::remove_dir_all(data.join("cache")).expect("empty the cache");
    let mut r = Registry::start_args(&data, &[], &["--config", large.to_str().expect("utf-8")]);
    // Every request Garage logged (GETs, HEADs, LISTs), so a driver's stats count too.
    let gets = |g: &Garage| g.s3_requests().values().sum::<u64>();
    let pull = |base: &str| {
        let before = gets(&g);
        let started = Instant::now();
        let b = call(
            "GET",
            &format!("{base}/v2/bench/img/blobs/{layer}"),
            &[],
            None,
        );
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(b.status, 200);
        assert!(b.body == seeded(len, 77), "layer bytes differ");
        (secs, gets(&g) - before)
    };
    let cold = pull(&r.url(""));
    let warm = pull(&r.url(""));
    r.stop();

    let mut d = Distribution::start_s3(
        &g.endpoint(0),
        crate::garage::BUCKET,
        crate::garage::KEY_ID,
        crate::garage::SECRET,
        "bench-distribution",
    );
    let pushed = crate::peers::push_image(&d.url(""), "bench/img", "v1", 77, len, &[]);
    assert_eq!(pushed.layer_digest, layer);
    let dist1 = pull(&d.url(""));
    let dist2 = pull(&d.url(""));
    d.stop();
    let mb = (len / MIB) as f64;
    let line = |what: &str, (secs, n): (f64, u64)| {
        println!(
            "{what:<34} {secs:>7.3} s {:>8.1} MiB/s {n:>6} S3 requests",
            mb / secs
        );
    };
    println!("bench-bucket: one {mb} MiB layer, 3-node Garage on loopback");
    line("ballast, cold (from the bucket)", cold);
    line("ballast, warm (from its cache)", warm);
    line("distribution s3, first pull", dist1);
    line("distribution s3, second pull", dist2);
    println!(
        "ballast cold vs distribution: {:.2}x the speed, {:.2}x the requests",
        dist1.0 / cold.0,
        cold.1 as f64 / dist1.1.max(1) as f64
    );
}

/// Until `f` holds, polling every 50 ms; how long that took.
fn time_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    wait_for(what, limit, || {
        let done = f();
        if !done {
            std::thread::sleep(Duration::from_millis(50));
        }
        done
    });
    started.elapsed()
}

#[test]
fn read_replicas_follow_the_primary_serve_pulls_and_send_writers_to_it() {
    // Shipping and following every second: a tag pushed to the primary is visible on the
    // replicas within ship_interval + follow_interval + the transfers.
    let (mut garage, tmp, config) = bed(
        "registry-r",
        "ship_interval_secs = 1\ncheckpoint_grace_secs = 60",
    );
    let cfg = config.to_str().expect("utf-8");
    let replica_config = write_config(
        &tmp.path().join("replica-config"),
        &garage.bucket_table(
            "registry-r",
            "role = \"replica\"\nfollow_interval_secs = 1\nrequest_timeout_secs = 3",
        ),
    );
    let rcfg = replica_config.to_str().expect("utf-8");
    // Pull counts flushed every second (a replica's go to the primary through the bucket).
    let env = [("BALLAST_PULL_FLUSH_SECS", "1")];
    let mut primary = Registry::start_args(&tmp.path().join("primary"), &env, &["--config", cfg]);

    // A replica started before the primary shipped anything serves an empty registry.
    let early = Registry::start_args(&tmp.path().join("r0"), &env, &["--config", rcfg]);
    let empty = call("GET", &early.url("/v2/_catalog"), &[], None);
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["repositories"], serde_json::json!([]));

    let v1 = push_image_as(&primary.url(""), "team-a/api", "v1", 51, 3 << 20, &[]);
    wait_shipped(&primary);
    let mut replicas = vec![
        early,
        Registry::start_args(&tmp.path().join("r1"), &env, &["--config", rcfg]),
    ];
    // The one started after the checkpoint has it at once; the early one follows.
    assert_pulls(&replicas[1], "team-a/api", "v1", &v1, 51, 3 << 20);
    wait_for(
        "the early replica to follow",
        Duration::from_secs(20),
        || pull_status(&replicas[0], "team-a/api", "v1", &v1, 51, 3 << 20).0 == 200,
    );

    // New tags: the time from the push's answer until each replica serves it.
    let mut seen = Vec::new();
    let mut digests = Vec::new();
    for (i, (tag, seed)) in [("v2", 52u64), ("v3", 53)].iter().enumerate() {
        let digest = push_image_as(&primary.url(""), "team-a/api", tag, *seed, 1 << 20, &[]);
        digests.push(digest.clone());
        let pushed = Instant::now();
        for r in &replicas {
            time_until("the tag on a replica", Duration::from_secs(30), || {
                pull_status(r, "team-a/api", tag, &digest, *seed, 1 << 20).0 == 200
            });
            seen.push(pushed.elapsed());
        }
        assert_pulls(&replicas[i % 2], "team-a/api", tag, &digest, *seed, 1 << 20);
    }
    let worst = seen.iter().max().copied().unwrap_or_default();
    eprintln!(
        "a pushed tag was visible on the replicas after {:?} (ship_interval_secs = 1, \
         follow_interval_secs = 1)",
        seen.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    assert!(
        worst < Duration::from_secs(10),
        "visible within ship + follow interval and the transfers: {worst:?}"
    );

    // Writes on a replica: 405 UNSUPPORTED naming the primary, nothing changed.
    let r = &replicas[0];
    let primary_url = primary.url("");
    for (method, path) in [
        ("POST", "/v2/team-a/api/blobs/uploads/"),
        ("PUT", "/v2/team-a/api/manifests/v9"),
        ("DELETE", &format!("/v2/team-a/api/manifests/{v1}") as &str),
        ("POST", "/admin/gc?grace=0"),
        ("POST", "/admin/bucket/ship"),
    ] {
        let res = call(method, &r.url(path), &[], Some(b"{}"));
        let body = String::from_utf8_lossy(&res.body);
        assert_eq!(res.status, 405, "{method} {path}: {body}");
        assert!(
            body.contains("UNSUPPORTED") && body.contains(&primary_url),
            "{method} {path}: {body}"
        );
    }
    assert_pulls(r, "team-a/api", "v1", &v1, 51, 3 << 20);
    // A client pushing to the replica is told where to go.
    let (refused, _) = crate::try_push_image_as(&r.url(""), "team-a/new", "v1", 54, 1 << 10, &[]);
    assert_eq!(refused.status, 405);
    assert!(String::from_utf8_lossy(&refused.body).contains(&primary_url));

    // What it shows: its role, the primary, the checkpoint served and its lag.
    let s = status(r);
    assert_eq!(s["role"], "replica", "{s}");
    assert!(
        s["primary"].as_str().unwrap_or("").contains(&primary_url),
        "{s}"
    );
    assert_eq!(s["consecutive_failures"], 0, "{s}");
    assert!(
        s["seq"].as_u64().is_some() && s["lag_secs"].as_u64() < Some(10),
        "{s}"
    );
    // The console says so on every page.
    let console = call("GET", &r.url("/ui/"), &[], None);
    assert!(
        String::from_utf8_lossy(&console.body).contains("This registry is a read replica of"),
        "{}",
        console.status
    );
    // ... and offers no change it would refuse (on the primary it does).
    let page = |reg: &Registry, path: &str| {
        String::from_utf8_lossy(&call("GET", &reg.url(path), &[], None).body).into_owned()
    };
    let repo_page = "/ui/repo?name=team-a%2Fapi";
    assert!(!page(r, repo_page).contains("/ui/tag/delete"));
    assert!(page(&primary, repo_page).contains("/ui/tag/delete"));
    let storage = page(r, "/ui/storage");
    assert!(
        storage.contains("Collections run on the primary") && !storage.contains("gc-run"),
        "{storage}"
    );
    let health = call("GET", &r.url("/healthz"), &[], None).json();
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["replica_lag_secs"].as_u64().is_some(), "{health}");
    assert!(metric(r, "ballast_replica_follows_total") >= 1.0);
    let now = ballast_engine::clock::now_secs() as f64;
    assert!(now - metric(r, "ballast_replica_checkpoint_taken_seconds") < 60.0);
    let followed = call("POST", &r.url("/admin/bucket/follow"), &[], None);
    assert_eq!(
        followed.status,
        200,
        "{}",
        String::from_utf8_lossy(&followed.body)
    );
    let audit = std::fs::read_to_string(tmp.path().join("r0/audit/audit.log")).unwrap_or_default();
    assert!(
        audit.contains("bucket.follow"),
        "the follow is audited: {audit}"
    );

    // A delete and a collection on the primary: the replicas drop the image and keep
    // serving the rest from the segments the collection wrote.
    let del = call(
        "DELETE",
        &primary.url(&format!("/v2/team-a/api/manifests/{v1}")),
        &[],
        None,
    );
    assert_eq!(del.status, 202);
    let gc = call(
        "POST",
        &primary.url("/admin/gc?grace=0&min_dead_fraction=0.01"),
        &[],
        None,
    );
    assert_eq!(gc.status, 200, "{}", String::from_utf8_lossy(&gc.body));
    wait_shipped(&primary);
    for r in &replicas {
        // (The manifest only: a whole pull of the deleted image could be cut when the
        // replica follows in the middle of it, as on the primary, since the collection
        // ran with no grace.)
        let url = r.url(&format!("/v2/team-a/api/manifests/{v1}"));
        wait_for("the delete on a replica", Duration::from_secs(30), || {
            call("GET", &url, &[], None).status == 404
        });
    }
    let tags = call(
        "GET",
        &replicas[1].url("/v2/team-a/api/tags/list"),
        &[],
        None,
    )
    .json();
    assert_eq!(tags["tags"], serde_json::json!(["v2", "v3"]), "{tags}");
    let (v2, v3) = (&digests[0], &digests[1]);
    for r in &replicas {
        assert_pulls(r, "team-a/api", "v3", v3, 53, 1 << 20);
    }
    eprintln!(
        "after the collection the replicas dropped {} and {} segments",
        status(&replicas[0])["segments_dropped"],
        status(&replicas[1])["segments_dropped"]
    );

    // One Garage node down: a new replica follows and pulls everything cold from the
    // bucket (two copies of three answer).
    garage.kill_node(2);
    let mut cold = Registry::start_args(&tmp.path().join("r2"), &env, &["--config", rcfg]);
    assert_pulls(&cold, "team-a/api", "v2", v2, 52, 1 << 20);
    assert_pulls(&cold, "team-a/api", "v3", v3, 53, 1 << 20);
    assert!(status(&cold)["cache_misses"].as_u64() > Some(0));
    cold.stop();

    // A replica killed and started again serves what it served; its directory is its own:
    // a primary refuses it, and a replica refuses the primary's.
    replicas[0].kill();
    replicas[0] = Registry::start_args(&tmp.path().join("r0"), &env, &["--config", rcfg]);
    assert_pulls(&replicas[0], "team-a/api", "v3", v3, 53, 1 << 20);
    replicas[1].stop();
    // The pulls the replicas served count on the primary (retention reads them there): a
    // stopped replica reported its last ones, and the primary takes reports in and deletes
    // them.
    let reports = garage.client("registry-r");
    let rt = runtime();
    wait_for(
        "the primary to take in the pull reports",
        Duration::from_secs(30),
        || {
            rt.block_on(reports.list("pulls/"))
                .expect("list")
                .is_empty()
        },
    );
    primary.stop();
    let pulls =
        &crate::governance::catalog_of(&tmp.path().join("primary")).repos["team-a/api"].pulls;
    let counted = &pulls[&v2.parse::<ballast_engine::Digest>().expect("digest")];
    eprintln!(
        "v2 pulled {} times on the replicas, counted on the primary",
        counted.count
    );
    assert!(counted.count >= 3, "{counted:?}");
    assert!(
        counted.last + 120 > ballast_engine::clock::now_secs(),
        "{counted:?}"
    );
    let as_primary = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("r1"))
        .env("BALLAST_LOG", "warn")
        .output()
        .expect("serve");
    assert!(!as_primary.status.success());
    let err = String::from_utf8_lossy(&as_primary.stderr);
    assert!(err.contains("read replica's data directory"), "{err}");
    let as_replica = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            rcfg,
            "--data",
        ])
        .arg(tmp.path().join("primary"))
        .env("BALLAST_LOG", "warn")
        .output()
        .expect("serve");
    assert!(!as_replica.status.success());
    let err = String::from_utf8_lossy(&as_replica.stderr);
    assert!(err.contains("not a read replica's data directory"), "{err}");
    // With the primary stopped, the replica goes on serving pulls and refusing writes.
    let res = call(
        "POST",
        &replicas[0].url("/v2/team-a/api/blobs/uploads/"),
        &[],
        None,
    );
    assert_eq!(res.status, 405);
    assert_pulls(&replicas[0], "team-a/api", "v2", v2, 52, 1 << 20);

    // The bucket unreachable: the replica serves what it cached and says it cannot follow;
    // back, it is healthy again.
    for i in 0..3 {
        garage.kill_node(i);
    }
    let health = || call("GET", &replicas[0].url("/healthz"), &[], None).json();
    wait_for("a degraded replica", Duration::from_secs(60), || {
        let h = health();
        h["status"] == "degraded" && h["detail"].as_str().unwrap_or("").contains("following")
    });
    assert_pulls(&replicas[0], "team-a/api", "v3", v3, 53, 1 << 20);
    for i in 0..3 {
        garage.start_node(i);
    }
    wait_for(
        "the replica to follow again",
        Duration::from_secs(60),
        || health()["status"] == "ok",
    );
    replicas[0].stop();
}
