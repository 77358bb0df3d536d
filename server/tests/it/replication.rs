//! Push replication to real targets on loopback: CNCF Distribution, and another Ballast with
//! token auth.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::http::{call, try_call};
use crate::peers::{config_file, push_image, Distribution};
use crate::{sha256, Registry};

/// Polls `f` until it holds (at most `secs` seconds).
fn within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "not within {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The manifest `repo:reference` on a registry, when it has it.
fn manifest(base: &str, repo: &str, reference: &str, h: &[(&str, &str)]) -> Option<Vec<u8>> {
    let mut headers = h.to_vec();
    headers.push((
        "Accept",
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
    ));
    let r = try_call(
        "GET",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &headers,
        None,
    )
    .ok()?;
    (r.status == 200).then_some(r.body)
}

/// Pushes a signature-like referrer of `subject` (by digest); its digest.
fn push_referrer(base: &str, repo: &str, subject: &str, subject_len: usize) -> String {
    let empty = b"{}".to_vec();
    let sig = b"a signature".to_vec();
    for b in [&empty, &sig] {
        let res = call(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/?digest={}", sha256(b)),
            &[],
            Some(b),
        );
        assert_eq!(res.status, 201);
    }
    let m = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.signature",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(&empty), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": sha256(&sig), "size": sig.len()}],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject, "size": subject_len},
    })
    .to_string()
    .into_bytes();
    let d = sha256(&m);
    let res = call(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{d}"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        Some(&m),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    d
}

#[test]
fn replication_to_distribution() {
    let mut dist = Distribution::start(&[]);
    let target = dist.url("");
    // The rule reaches Distribution through a tap (to hold an upload mid-way below).
    let tap = crate::peers::Tap::start(&target);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(
        &tmp,
        &format!(
            "[[replication]]\nname = \"dr\"\nurl = \"{}\"\nrepositories = [\"team/**\"]\ntags = [\"v*\"]\ndelete = true\nretry_initial_ms = 50\nretry_max_delay_secs = 1\ntimeout_secs = 5\nreconcile_interval_secs = 0\n",
            tap.url()
        ),
    );
    let data = tmp.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", &config.to_string_lossy()]);
    let src = r.url("");

    // Pushes are copied, tags outside the filter are not (events are replicated in order:
    // once v1.1 is there, dev was seen and left out).
    let v1 = push_image(&src, "team/app", "v1", 1, 300_000, &[]);
    let _dev = push_image(&src, "team/app", "dev", 2, 100_000, &[]);
    let v11 = push_image(&src, "team/app", "v1.1", 3, 100_000, &[]);
    within(20, "v1.1 on the target", || {
        manifest(&target, "team/app", "v1.1", &[]).is_some()
    });
    assert_eq!(
        manifest(&target, "team/app", "v1", &[]).as_deref(),
        Some(&v1.manifest[..])
    );
    assert!(manifest(&target, "team/app", "dev", &[]).is_none());
    let layer = call(
        "GET",
        &dist.url(&format!("/v2/team/app/blobs/{}", v1.layer_digest)),
        &[],
        None,
    );
    assert!(layer.body == v1.layer);
    let _ = v11;

    // A referrer pushed later by digest follows its subject.
    let sig = push_referrer(&src, "team/app", &v1.digest, v1.manifest.len());
    within(20, "the signature on the target", || {
        manifest(&target, "team/app", &sig, &[]).is_some()
    });

    // The target down: pushes wait, and are all there once it is back.
    dist.stop();
    let v2 = push_image(&src, "team/app", "v2", 4, 200_000, &[]);
    let v3 = push_image(&src, "team/other", "v3", 5, 200_000, &[]);
    within(20, "a failed attempt", || {
        call("GET", &r.url("/admin/replication"), &[], None).json()["rules"][0]["failed_attempts"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    dist.restart();
    within(30, "v2 and v3 on the target", || {
        manifest(&target, "team/app", "v2", &[]).as_deref() == Some(&v2.manifest[..])
            && manifest(&target, "team/other", "v3", &[]).as_deref() == Some(&v3.manifest[..])
    });

    // Deletes are replicated (Distribution deletes no tags: the manifest it names goes).
    let res = call("DELETE", &r.url("/v2/team/app/manifests/v1.1"), &[], None);
    assert_eq!(res.status, 202);
    within(20, "v1.1 deleted on the target", || {
        manifest(&target, "team/app", "v1.1", &[]).is_none()
    });
    assert!(manifest(&target, "team/app", "v2", &[]).is_some());

    // kill -9 while the layer's upload to the target is under way (the tap holds it):
    // replicated once the source is back.
    tap.take();
    tap.stall_uploads
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let big = push_image(&src, "team/big", "v1", 6, 24 << 20, &[]);
    within(20, "the layer's upload under way", || {
        tap.take()
            .iter()
            .any(|l| l.contains("/v2/team/big/blobs/uploads/") && !l.starts_with("POST"))
    });
    r.kill();
    tap.stall_uploads
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let mut r = Registry::start_args(&data, &[], &["--config", &config.to_string_lossy()]);
    within(60, "the big image on the target", || {
        manifest(&target, "team/big", "v1", &[]).as_deref() == Some(&big.manifest[..])
    });
    let layer = call(
        "GET",
        &dist.url(&format!("/v2/team/big/blobs/{}", big.layer_digest)),
        &[],
        None,
    );
    assert!(layer.body == big.layer);

    // Status, metrics and audit.
    within(10, "no lag", || {
        call("GET", &r.url("/admin/replication"), &[], None).json()["rules"][0]["pending_events"]
            == 0
    });
    let status = call("GET", &r.url("/admin/replication"), &[], None).json();
    let rule = &status["rules"][0];
    assert_eq!(rule["name"], "dr");
    assert!(
        rule["manifests_copied"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
    let metrics =
        String::from_utf8_lossy(&call("GET", &r.url("/metrics"), &[], None).body).into_owned();
    assert!(
        metrics.contains("ballast_replication_manifests_total{rule=\"dr\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("ballast_replication_lag_seconds{rule=\"dr\"} 0"));
    r.stop();
    let audit = std::fs::read_to_string(data.join("audit/audit.log")).expect("audit");
    assert!(audit.contains("\"replication.copy\""));
    assert!(audit.contains("\"replication.delete\""));
    assert!(audit.contains("\"actor\":\"replication:dr\""));
}

#[test]
fn replication_to_ballast_with_token_auth_reconciles_what_was_there_before() {
    let up = crate::auth::secure(&[]);
    let robot = crate::auth::basic("ci", &up.robot_token);
    let h = [("Authorization", robot.as_str())];
    let target = up.r.url("");
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");

    // Content pushed before any rule: an image and a multi-platform index (skopeo).
    let mut r = Registry::start(&data);
    let before = push_image(&r.url(""), "team-a/app", "v1", 11, 150_000, &[]);
    crate::clients::require("skopeo");
    let layout = tmp.path().join("layout");
    let index = crate::oci::multi_arch(&layout, 80);
    crate::oci::finish_layout(&layout, &index, "multi");
    crate::clients::push_layout_all(
        &layout,
        "multi",
        &format!("docker://{}/team-a/multi:v1", r.host()),
    );
    r.stop();

    let config = config_file(
        &tmp,
        &format!(
            "[[replication]]\nname = \"site-b\"\nurl = \"{target}\"\nrepositories = [\"team-a/**\"]\ntarget_prefix = \"team-a/mirror\"\nusername = \"ci\"\npassword = \"{}\"\nretry_initial_ms = 50\nretry_max_delay_secs = 1\n",
            up.robot_token
        ),
    );
    let r = Registry::start_args(&data, &[], &["--config", &config.to_string_lossy()]);
    // The reconciliation at start copies what was there.
    within(30, "the image from before on the target", || {
        manifest(&target, "team-a/mirror/team-a/app", "v1", &h).as_deref()
            == Some(&before.manifest[..])
    });
    within(30, "the index from before on the target", || {
        manifest(&target, "team-a/mirror/team-a/multi", "v1", &h)
            .is_some_and(|b| sha256(&b) == index.digest)
    });
    let idx: serde_json::Value = serde_json::from_slice(
        &manifest(&target, "team-a/mirror/team-a/multi", "v1", &h).expect("index"),
    )
    .expect("json");
    for child in idx["manifests"].as_array().expect("children") {
        let d = child["digest"].as_str().expect("digest");
        assert!(
            manifest(&target, "team-a/mirror/team-a/multi", d, &h).is_some(),
            "child {d} not replicated"
        );
    }

    // A live push; then the same layer in another repository is mounted, not uploaded.
    let live = push_image(&r.url(""), "team-a/app", "v2", 12, 150_000, &[]);
    within(20, "the live push on the target", || {
        manifest(&target, "team-a/mirror/team-a/app", "v2", &h).as_deref()
            == Some(&live.manifest[..])
    });
    let uploaded = |r: &Registry| {
        call("GET", &r.url("/admin/replication"), &[], None).json()["rules"][0]["blobs_uploaded"]
            .as_u64()
            .unwrap_or(0)
    };
    let before_uploads = uploaded(&r);
    let again = push_image(&r.url(""), "team-a/other", "v1", 12, 150_000, &[]);
    within(20, "the second repository on the target", || {
        manifest(&target, "team-a/mirror/team-a/other", "v1", &h).as_deref()
            == Some(&again.manifest[..])
    });
    let status = call("GET", &r.url("/admin/replication"), &[], None).json();
    assert_eq!(uploaded(&r), before_uploads, "{status}");
    assert!(
        status["rules"][0]["blobs_mounted"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );
    // An explicit reconciliation finds nothing left to do.
    let rep = call(
        "POST",
        &r.url("/admin/replication/reconcile?rule=site-b"),
        &[],
        None,
    )
    .json();
    assert_eq!(rep["reconciled"][0]["copied"], 0, "{rep}");
    assert_eq!(rep["reconciled"][0]["failed"], 0, "{rep}");
    let res = call(
        "POST",
        &r.url("/admin/replication/reconcile?rule=nope"),
        &[],
        None,
    );
    assert_eq!(res.status, 404);
}

/// Bytes of chunk frames the tap forwarded (chunk uploads that reached the target).
fn chunk_bytes(log: &[String]) -> u64 {
    log.iter()
        .filter(|l| l.starts_with("POST ") && l.contains("/chunks ") && !l.contains("/missing"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn rule_status(r: &Registry) -> serde_json::Value {
    call("GET", &r.url("/admin/replication"), &[], None).json()["rules"][0].clone()
}

#[test]
fn delta_replication_between_ballasts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut dst = Registry::start(&tmp.path().join("target"));
    let target = dst.url("");
    let tap = crate::peers::Tap::start(&target);
    let config = config_file(
        &tmp,
        &format!(
            "[[replication]]\nname = \"peer\"\nurl = \"{}\"\nretry_initial_ms = 50\nretry_max_delay_secs = 1\nreconcile_interval_secs = 0\n",
            tap.url()
        ),
    );
    let r = Registry::start_args(
        &tmp.path().join("source"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let src = r.url("");

    // A first image: everything is new there.
    let base = crate::seeded(8 << 20, 31);
    let a = crate::peers::push_layer(&src, "apps/web", "v1", 31, base.clone(), &[]);
    within(30, "v1 on the target", || {
        manifest(&target, "apps/web", "v1", &[]).as_deref() == Some(&a.manifest[..])
    });
    let first = rule_status(&r);
    assert_eq!(first["delta"], "in use", "{first}");
    tap.take();
    // A rebuild that changed 4 KiB in the middle of the layer: a few chunks go.
    let mut changed = base.clone();
    changed[4 << 20..(4 << 20) + 4096].copy_from_slice(&crate::seeded(4096, 32));
    let b = crate::peers::push_layer(&src, "apps/web", "v2", 31, changed.clone(), &[]);
    within(30, "v2 on the target", || {
        manifest(&target, "apps/web", "v2", &[]).as_deref() == Some(&b.manifest[..])
    });
    let got = call(
        "GET",
        &format!("{target}/v2/apps/web/blobs/{}", b.layer_digest),
        &[],
        None,
    );
    assert!(
        got.body == changed,
        "the target holds the rebuilt layer whole"
    );
    let sent = chunk_bytes(&tap.take());
    assert!(
        sent * 10 < changed.len() as u64,
        "{sent} bytes of chunks for a layer of {} with 4 KiB changed",
        changed.len()
    );

    // The connection cut at the second chunk upload: retried, and the chunks the target
    // acknowledged are not sent again.
    tap.cut_chunks.store(2, std::sync::atomic::Ordering::SeqCst);
    let fresh = crate::seeded(40 << 20, 33);
    let c = crate::peers::push_layer(&src, "apps/batch", "v1", 33, fresh.clone(), &[]);
    within(60, "the cut image on the target", || {
        manifest(&target, "apps/batch", "v1", &[]).as_deref() == Some(&c.manifest[..])
    });
    let log = tap.take();
    let forwarded = chunk_bytes(&log);
    let cuts = log
        .iter()
        .filter(|l| l.contains("/chunks ") && l.starts_with("POST "))
        .count();
    assert!(cuts >= 3, "{log:?}");
    // Every chunk frame the target took, once (36 bytes of frame header per ~64 KiB chunk),
    // plus the one batch that was cut and never reached it.
    assert!(
        forwarded < fresh.len() as u64 + (16 << 20) + fresh.len() as u64 / 1000,
        "{forwarded} bytes forwarded for {} bytes of chunks: confirmed chunks were sent again",
        fresh.len()
    );
    let got = call(
        "GET",
        &format!("{target}/v2/apps/batch/blobs/{}", c.layer_digest),
        &[],
        None,
    );
    assert!(got.body == fresh);

    // A target that claims to hold every chunk: its recipe check catches it, the chunks go,
    // and nothing wrong becomes visible.
    tap.lie_missing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let other = crate::seeded(2 << 20, 34);
    let d = crate::peers::push_layer(&src, "apps/lied", "v1", 34, other.clone(), &[]);
    within(30, "the image on the lying target", || {
        manifest(&target, "apps/lied", "v1", &[]).as_deref() == Some(&d.manifest[..])
    });
    let log = tap.take();
    let recipe_puts = log
        .iter()
        .filter(|l| {
            l.starts_with(&format!(
                "PUT /v2/_ballast/apps/lied/blobs/{}",
                d.layer_digest
            ))
        })
        .count();
    assert_eq!(recipe_puts, 2, "{log:?}");
    let got = call(
        "GET",
        &format!("{target}/v2/apps/lied/blobs/{}", d.layer_digest),
        &[],
        None,
    );
    assert!(got.body == other);
    tap.lie_missing
        .store(false, std::sync::atomic::Ordering::SeqCst);

    // The endpoints refuse what does not hold: a chunk whose bytes are not its id's, a
    // recipe whose chunks are not there, one whose digest is not the blob's.
    let wrong_id = [7u8; 32];
    let mut frame = wrong_id.to_vec();
    frame.extend_from_slice(&5u32.to_le_bytes());
    frame.extend_from_slice(b"bytes");
    let res = call(
        "POST",
        &format!("{target}/v2/_ballast/apps/web/chunks"),
        &[],
        Some(&frame),
    );
    assert_eq!(res.status, 400);
    assert_eq!(res.code(), "DIGEST_INVALID");
    let mut recipe = 5u64.to_le_bytes().to_vec();
    recipe.extend_from_slice(&1u32.to_le_bytes());
    recipe.push(0);
    recipe.extend_from_slice(&wrong_id);
    recipe.extend_from_slice(&5u32.to_le_bytes());
    let res = call(
        "PUT",
        &format!("{target}/v2/_ballast/apps/web/blobs/{}", sha256(b"bytes")),
        &[],
        Some(&recipe),
    );
    assert_eq!(res.status, 400);
    assert_eq!(res.code(), "BLOB_UPLOAD_INVALID");
    assert_eq!(
        res.json()["errors"][0]["detail"]["missing"][0],
        hex::encode(wrong_id)
    );
    let mut inline = 5u64.to_le_bytes().to_vec();
    inline.extend_from_slice(&1u32.to_le_bytes());
    inline.push(1);
    inline.extend_from_slice(&5u16.to_le_bytes());
    inline.extend_from_slice(b"bytes");
    let res = call(
        "PUT",
        &format!("{target}/v2/_ballast/apps/web/blobs/{}", sha256(b"other")),
        &[],
        Some(&inline),
    );
    assert_eq!(res.status, 400);
    assert_eq!(res.code(), "DIGEST_INVALID");
    let status = rule_status(&r);
    assert!(status["delta_blobs"].as_u64().unwrap_or(0) >= 4, "{status}");
    drop(r);
    dst.stop();
    crate::assert_fsck_clean(&tmp.path().join("target"));
}
