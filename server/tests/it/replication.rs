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
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(
        &tmp,
        &format!(
            "[[replication]]\nname = \"dr\"\nurl = \"{target}\"\nrepositories = [\"team/**\"]\ntags = [\"v*\"]\ndelete = true\nretry_initial_ms = 50\nretry_max_delay_secs = 1\ntimeout_secs = 5\nreconcile_interval_secs = 0\n"
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

    // kill -9 right after a push: replicated once the source is back.
    let big = push_image(&src, "team/big", "v1", 6, 24 << 20, &[]);
    r.kill();
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
