//! Crash torture of the server: concurrent pushes (monolithic and chunked uploads, manifests,
//! tag moves), SIGKILL at a random moment, restart, and every acknowledged upload and tag
//! must be there, byte-exact. `BALLAST_TORTURE_KILLS` sets the number of kills (default 20;
//! docs/benchmarks.md has the result of a 1000-kill run).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::http::try_call;
use crate::{seeded, sha256, Registry};

/// What the clients were told was stored.
#[derive(Default)]
struct Acked {
    /// (repository, digest, seed, length) of every acknowledged blob upload.
    blobs: Vec<(String, String, u64, usize)>,
    /// (repository, tag) → the digest of the last acknowledged manifest push.
    tags: HashMap<(String, String), String>,
    /// (repository, tag) → manifest pushes not acknowledged since the last acknowledged
    /// one (the server died under them: each may or may not have landed).
    in_flight: HashMap<(String, String), Vec<String>>,
}

/// Uploads `data`; monolithic or in chunks. `Ok(true)` when acknowledged with 201.
fn upload(base: &str, repo: &str, data: &[u8], chunked: bool) -> Result<bool, String> {
    let d = sha256(data);
    if !chunked {
        let res = try_call(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"),
            &[],
            Some(data),
        )?;
        return Ok(res.status == 201);
    }
    let res = try_call(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        &[],
        None,
    )?;
    if res.status != 202 {
        return Ok(false);
    }
    let mut location = res.header("location").unwrap_or_default().to_owned();
    let chunk = 64 * 1024;
    for (i, piece) in data.chunks(chunk).enumerate() {
        let start = i * chunk;
        let range = format!("{}-{}", start, start + piece.len() - 1);
        let res = try_call(
            "PATCH",
            &format!("{base}{location}"),
            &[
                ("Content-Range", &range),
                ("Content-Type", "application/octet-stream"),
            ],
            Some(piece),
        )?;
        if res.status != 202 {
            return Ok(false);
        }
        location = res.header("location").unwrap_or_default().to_owned();
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let res = try_call(
        "PUT",
        &format!("{base}{location}{sep}digest={d}"),
        &[],
        None,
    )?;
    Ok(res.status == 201)
}

/// One client: pushes images to its own repository until the server goes away.
fn client(base: String, t: u64, round: u64, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    let repo = format!("torture/c{t}");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let seed = (round * 1_000 + i) * 10 + t;
        let len = 1_000 + (seed as usize * 7_919) % 600_000;
        let layer = seeded(len, seed);
        let config = format!("{{\"seed\":{seed}}}").into_bytes();
        let mut ok = true;
        for (data, s, n) in [(&config, u64::MAX, 0usize), (&layer, seed, len)] {
            match upload(&base, &repo, data, i % 2 == 1) {
                Ok(true) => {
                    if s != u64::MAX {
                        acked
                            .lock()
                            .expect("lock")
                            .blobs
                            .push((repo.clone(), sha256(data), s, n));
                    }
                }
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        if !ok {
            return;
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(&layer), "size": len}],
        })
        .to_string()
        .into_bytes();
        let md = sha256(&manifest);
        let key = (repo.clone(), format!("v{}", i % 4));
        acked
            .lock()
            .expect("lock")
            .in_flight
            .entry(key.clone())
            .or_default()
            .push(md.clone());
        let res = try_call(
            "PUT",
            &format!("{base}/v2/{repo}/manifests/{}", key.1),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            Some(&manifest),
        );
        let mut a = acked.lock().expect("lock");
        match res {
            Ok(r) if r.status == 201 => {
                a.in_flight.remove(&key);
                a.tags.insert(key, md);
            }
            _ => return,
        }
        drop(a);
        i += 1;
    }
}

/// Checks every tag, the blobs acknowledged since `new_from`, and every `stride`-th older one
/// (long runs would otherwise re-read everything after every kill).
fn check(r: &Registry, acked: &Acked, round: u64, new_from: usize, stride: usize) {
    let older = acked.blobs[..new_from].iter().step_by(stride.max(1));
    for (repo, d, seed, len) in older.chain(&acked.blobs[new_from..]) {
        let res = crate::http::call("GET", &r.url(&format!("/v2/{repo}/blobs/{d}")), &[], None);
        assert_eq!(
            res.status, 200,
            "round {round}: acknowledged blob {d} in {repo} lost"
        );
        assert!(
            res.body == seeded(*len, *seed),
            "round {round}: blob {d} damaged"
        );
    }
    for ((repo, tag), want) in &acked.tags {
        let res = crate::http::call(
            "GET",
            &r.url(&format!("/v2/{repo}/manifests/{tag}")),
            &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            None,
        );
        assert_eq!(
            res.status, 200,
            "round {round}: acknowledged tag {repo}:{tag} lost"
        );
        let got = res.header("docker-content-digest").unwrap_or_default();
        let alt = acked.in_flight.get(&(repo.clone(), tag.clone()));
        assert!(
            got == want || alt.is_some_and(|a| a.iter().any(|d| d == got)),
            "round {round}: {repo}:{tag} is {got}, acknowledged {want}"
        );
        assert_eq!(sha256(&res.body), got);
    }
}

#[test]
fn sigkill_during_concurrent_pushes() {
    let kills: u64 = std::env::var("BALLAST_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let mut r = Registry::start_with(&data, &[("BALLAST_SEGMENT_BYTES_MAX", "1048576")]);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut rng = ballast_engine::testdata::XorShift::new(0x2545_F491_4F6C_DD1D);
    // Short runs re-check everything after each kill; long ones a sample of the older blobs.
    let stride = if kills > 50 { 97 } else { 1 };
    for round in 0..kills {
        let new_from = acked.lock().expect("lock").blobs.len();
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..3u64)
            .map(|t| {
                let (base, stop, acked) = (r.url(""), stop.clone(), acked.clone());
                std::thread::spawn(move || client(base, t, round, stop, acked))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + rng.next() % 400));
        r.kill();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join().expect("client");
        }
        r.restart();
        check(&r, &acked.lock().expect("lock"), round, new_from, stride);
    }
    // And everything at the end.
    check(&r, &acked.lock().expect("lock"), kills, 0, 1);
    let a = acked.lock().expect("lock");
    assert!(
        a.blobs.len() as u64 > kills,
        "only {} uploads were acknowledged in {kills} rounds",
        a.blobs.len()
    );
    eprintln!(
        "torture: {kills} kills, {} acknowledged blob uploads and {} tags checked after each",
        a.blobs.len(),
        a.tags.len()
    );
    drop(a);
    r.stop();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["fsck", "--json"])
        .arg(&data)
        .output()
        .expect("fsck");
    assert!(
        out.status.success(),
        "fsck after {kills} kills: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
