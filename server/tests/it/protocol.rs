//! Protocol corners found by testing from outside (issue #13): HEAD over HTTP/2, references
//! that cannot exist, referrers of plain images, and an inverted byte range.

use serde_json::json;

use crate::auth::{secure_with_tls, ADMIN_PW};
use crate::http::{call, manifest_for, push_blob, OCI_MANIFEST};
use crate::{have, seeded, sha256, Registry};

/// Every HEAD, whatever its status, is answered with headers only over HTTP/2 and HTTP/1.1
/// (hyper sent the error bodies as DATA frames after a HEAD and curl reset the stream).
#[test]
fn head_is_answered_without_a_body_over_http2_and_http1() {
    assert!(
        have("curl"),
        "curl is not installed: run scripts/install-test-deps"
    );
    let t = secure_with_tls();
    let (s, ca) = (&t.s, t.ca.as_str());
    let admin = format!("admin:{ADMIN_PW}");
    let layer = seeded(70_000, 1);
    let blob = sha256(&layer);
    let file = t.certs.join("layer");
    std::fs::write(&file, &layer).expect("layer");
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            ca,
            "-u",
            &admin,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["-X", "POST", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .arg(s.r.url(&format!("/v2/team-a/h2/blobs/uploads/?digest={blob}")))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "201");
    let missing = sha256(b"missing");
    // (path, credentials, status)
    let cases: Vec<(String, bool, &str)> = vec![
        ("/v2/".into(), true, "200"),
        ("/v2/".into(), false, "401"),
        ("/v2/team-a/h2/manifests/absent".into(), true, "404"),
        (format!("/v2/team-a/h2/blobs/{blob}"), true, "200"),
        (format!("/v2/team-a/h2/blobs/{missing}"), true, "404"),
        (format!("/v2/team-z/h2/blobs/{missing}"), false, "401"),
        ("/v2/BAD/manifests/x".into(), true, "400"),
        ("/healthz".into(), false, "200"),
    ];
    for proto in ["--http2", "--http1.1"] {
        for (path, with_creds, status) in &cases {
            let url = s.r.url(path);
            let mut args = vec![
                "-sS",
                "-I",
                proto,
                "--cacert",
                ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{http_code} %{size_download}",
            ];
            if *with_creds {
                args.extend(["-u", admin.as_str()]);
            }
            args.push(&url);
            let out = std::process::Command::new("curl")
                .args(&args)
                .output()
                .expect("curl");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "HEAD {path} {proto}: curl failed: {} {text}",
                String::from_utf8_lossy(&out.stderr)
            );
            let version = if proto == "--http2" { "2" } else { "1.1" };
            assert_eq!(text, format!("{version} {status} 0"), "HEAD {path} {proto}");
        }
    }
    // The size a GET would have is still announced.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-I", "--http2", "--cacert", ca, "-u", &admin])
        .arg(s.r.url(&format!("/v2/team-a/h2/blobs/{blob}")))
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        head.contains(&format!("content-length: {}", layer.len())),
        "{head}"
    );
}

#[test]
fn references_that_cannot_exist_are_unknown_and_inverted_ranges_unsatisfiable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(tmp.path());
    let repo = "corner/app";
    let config = push_blob(&r, repo, b"{}");
    let layer = seeded(1000, 7);
    let ld = push_blob(&r, repo, &layer);
    let m = manifest_for(&config, 2, &[(&ld, layer.len())]);
    let put = |reference: &str, body: &[u8]| {
        call(
            "PUT",
            &r.url(&format!("/v2/{repo}/manifests/{reference}")),
            &[("Content-Type", OCI_MANIFEST)],
            Some(body),
        )
    };
    assert_eq!(put("v1", &m).status, 201);

    // A reference that is not a valid tag names nothing: 404 on reads and deletes...
    for bad in ["bad!tag", "-leading", &"x".repeat(129)] {
        for method in ["GET", "HEAD", "DELETE"] {
            let res = call(
                method,
                &r.url(&format!("/v2/{repo}/manifests/{bad}")),
                &[],
                None,
            );
            assert_eq!(res.status, 404, "{method} {bad}");
            if method != "HEAD" {
                assert_eq!(res.code(), "MANIFEST_UNKNOWN", "{method} {bad}");
            }
        }
        // ...and stays 400 on a push.
        let res = put(bad, &m);
        assert_eq!((res.status, res.code().as_str()), (400, "MANIFEST_INVALID"));
    }

    // `bytes=500-0`: last before first is 416 with the size, as Distribution answers.
    for range in ["bytes=500-0", "bytes=0-1,9-3"] {
        let res = call(
            "GET",
            &r.url(&format!("/v2/{repo}/blobs/{ld}")),
            &[("Range", range)],
            None,
        );
        assert_eq!(res.status, 416, "{range}");
        assert_eq!(
            res.header("Content-Range"),
            Some(format!("bytes */{}", layer.len()).as_str())
        );
    }
}

/// Spec: a referrer that is an image manifest without `artifactType` is listed with its
/// config's media type, image config types included, and the filter matches on it.
#[test]
fn referrers_without_an_artifact_type_are_listed_with_their_config_type() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(tmp.path());
    let repo = "refs/app";
    let config = push_blob(&r, repo, b"{}");
    let layer = seeded(500, 3);
    let ld = push_blob(&r, repo, &layer);
    let subject = manifest_for(&config, 2, &[(&ld, layer.len())]);
    let sd = sha256(&subject);
    let put = |body: &[u8]| {
        let res = call(
            "PUT",
            &r.url(&format!("/v2/{repo}/manifests/{}", sha256(body))),
            &[("Content-Type", OCI_MANIFEST)],
            Some(body),
        );
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    };
    put(&subject);
    let referrer = |config_type: &str, seed: u8| {
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sd, "size": subject.len()},
            "annotations": {"seed": seed.to_string()}})
        .to_string()
        .into_bytes()
    };
    let types = [
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
        "application/vnd.example.thing+json",
    ];
    for (i, t) in types.iter().enumerate() {
        put(&referrer(t, i as u8));
    }
    let list = call(
        "GET",
        &r.url(&format!("/v2/{repo}/referrers/{sd}")),
        &[],
        None,
    )
    .json();
    let mut listed: Vec<String> = list["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap_or("(none)").to_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = types.iter().map(|t| t.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);
    for t in types {
        let res = call(
            "GET",
            &r.url(&format!(
                "/v2/{repo}/referrers/{sd}?artifactType={}",
                t.replace('+', "%2B")
            )),
            &[],
            None,
        );
        let list = res.json();
        let found = list["manifests"].as_array().expect("manifests");
        assert_eq!(found.len(), 1, "filter {t}");
        assert_eq!(found[0]["artifactType"], json!(t));
    }
}

/// HEAD of a layer, then a collection, then the manifest PUT that relies on the HEAD: the
/// push is not refused (Distribution's issue #4569). Without the HEAD, the same collection
/// removes the link and the PUT is refused: the control.
#[test]
fn head_then_gc_then_manifest_put_succeeds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(tmp.path());
    let config = b"{}".to_vec();
    let (kept, gone) = (seeded(40_000, 11), seeded(40_000, 12));
    let (c, k, g) = (
        push_blob(&r, "race/kept", &config),
        push_blob(&r, "race/kept", &kept),
        push_blob(&r, "race/gone", &gone),
    );
    push_blob(&r, "race/gone", &config);
    // Older than the 1 s grace period used below.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for (repo, d) in [("race/kept", &k), ("race/kept", &c)] {
        let res = call("HEAD", &r.url(&format!("/v2/{repo}/blobs/{d}")), &[], None);
        assert_eq!(res.status, 200);
    }
    let res = call("POST", &r.url("/admin/gc?grace=1"), &[], None);
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    let put = |repo: &str, layer: &str, len: usize| {
        call(
            "PUT",
            &r.url(&format!("/v2/{repo}/manifests/v1")),
            &[("Content-Type", OCI_MANIFEST)],
            Some(&manifest_for(&c, 2, &[(layer, len)])),
        )
    };
    let res = put("race/kept", &k, kept.len());
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let res = put("race/gone", &g, gone.len());
    assert_eq!(
        (res.status, res.code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN"),
        "the control: without a HEAD the collection removed the link"
    );
}
