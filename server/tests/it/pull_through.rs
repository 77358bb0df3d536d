//! The pull-through cache against real upstreams on loopback: CNCF Distribution (open and
//! with htpasswd auth) and another Ballast with token auth.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::http::call;
use crate::peers::{config_file, push_image, Distribution, Tap};
use crate::{assert_fsck_clean, Registry};

fn cache_config(url: &str, extra: &str) -> String {
    format!(
        "[[pull_through]]\nname = \"up\"\nprefix = \"cache/up\"\nurl = \"{url}\"\ntimeout_secs = 5\n{extra}\n"
    )
}

fn get(r: &Registry, path: &str) -> crate::http::Res {
    call("GET", &r.url(path), &[], None)
}

/// Requests the tap saw that match `what`.
fn count(log: &[String], what: &str) -> usize {
    log.iter().filter(|l| l.contains(what)).count()
}

#[test]
fn pull_through_distribution() {
    let mut dist = Distribution::start(&[]);
    let base = dist.url("");
    let v1 = push_image(&base, "team/app", "v1", 1, 300_000, &[]);
    let other = push_image(&base, "team/app", "other", 2, 200_000, &[]);
    let big = push_image(&base, "team/big", "v1", 3, 8 << 20, &[]);
    let bad = push_image(&base, "team/bad", "v1", 4, 1 << 20, &[]);
    let tap = Tap::start(&base);
    let tmp = tempfile::tempdir().expect("tempdir");
    // `up` keeps tags for the default 300 s (warm pulls stay local however slow the
    // machine); `ttl`, the same upstream, re-checks them after 3 s.
    let config = config_file(
        &tmp,
        &format!(
            "{}[[pull_through]]\nname = \"ttl\"\nprefix = \"cache/ttl\"\nurl = \"{}\"\ntag_ttl_secs = 3\ntimeout_secs = 5\n",
            cache_config(&tap.url(), ""),
            tap.url()
        ),
    );
    let mut r = Registry::start_args(
        &tmp.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );

    // Cold pull by tag: the manifest, config and layer, byte-identical.
    let m = get(&r, "/v2/cache/up/team/app/manifests/v1");
    assert_eq!(m.status, 200, "{}", String::from_utf8_lossy(&m.body));
    assert_eq!(m.body, v1.manifest);
    assert_eq!(m.header("docker-content-digest"), Some(v1.digest.as_str()));
    assert_eq!(
        m.header("content-type"),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let layer = get(
        &r,
        &format!("/v2/cache/up/team/app/blobs/{}", v1.layer_digest),
    );
    assert_eq!(layer.status, 200);
    assert_eq!(layer.body, v1.layer);
    let cfg = get(
        &r,
        &format!("/v2/cache/up/team/app/blobs/{}", crate::sha256(&v1.config)),
    );
    assert_eq!(cfg.body, v1.config);
    // Cold pull by digest.
    let m = get(
        &r,
        &format!("/v2/cache/up/team/app/manifests/{}", other.digest),
    );
    assert_eq!(m.status, 200);
    assert_eq!(m.body, other.manifest);
    let log = tap.take();
    assert_eq!(count(&log, "GET /v2/team/app/blobs/"), 2, "{log:?}");

    // Warm pulls: nothing reaches the upstream.
    for path in [
        "/v2/cache/up/team/app/manifests/v1".to_owned(),
        format!("/v2/cache/up/team/app/manifests/{}", v1.digest),
        format!("/v2/cache/up/team/app/manifests/{}", other.digest),
        format!("/v2/cache/up/team/app/blobs/{}", v1.layer_digest),
    ] {
        let res = get(&r, &path);
        assert_eq!(res.status, 200, "{path}");
    }
    let log = tap.take();
    assert!(log.is_empty(), "warm pulls reached the upstream: {log:?}");

    // Cached repositories are read-only to clients.
    let res = call(
        "PUT",
        &r.url("/v2/cache/up/team/app/manifests/mine"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        Some(&v1.manifest),
    );
    assert_eq!(res.status, 403);
    assert_eq!(res.code(), "DENIED");
    let msg = String::from_utf8_lossy(&res.body);
    assert!(msg.contains("pull-through cache"), "{msg}");
    let res = call(
        "POST",
        &r.url("/v2/cache/up/team/app/blobs/uploads/"),
        &[],
        None,
    );
    assert_eq!(res.status, 403);

    // A tag moved upstream is seen once its TTL has passed, not before.
    let res = get(&r, "/v2/cache/ttl/team/app/manifests/v1");
    assert_eq!(
        res.header("docker-content-digest"),
        Some(v1.digest.as_str())
    );
    let moved = push_image(&base, "team/app", "v1", 5, 100_000, &[]);
    let res = get(&r, "/v2/cache/ttl/team/app/manifests/v1");
    assert_eq!(
        res.header("docker-content-digest"),
        Some(v1.digest.as_str())
    );
    tap.take();
    std::thread::sleep(Duration::from_millis(3100));
    let res = get(&r, "/v2/cache/ttl/team/app/manifests/v1");
    assert_eq!(
        res.header("docker-content-digest"),
        Some(moved.digest.as_str())
    );
    assert_eq!(res.body, moved.manifest);
    let log = tap.take();
    assert_eq!(count(&log, "HEAD /v2/team/app/manifests/v1"), 1, "{log:?}");

    // 8 concurrent cold pulls of one large layer: one upstream fetch, 8 identical bodies.
    let res = get(&r, "/v2/cache/up/team/big/manifests/v1");
    assert_eq!(res.status, 200);
    let url = r.url(&format!("/v2/cache/up/team/big/blobs/{}", big.layer_digest));
    let bodies: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| call("GET", &url, &[], None)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let res = h.join().expect("puller");
                assert_eq!(res.status, 200);
                res.body
            })
            .collect()
    });
    for b in &bodies {
        assert!(b == &big.layer, "a concurrent pull got other bytes");
    }
    let log = tap.take();
    assert_eq!(
        count(
            &log,
            &format!("GET /v2/team/big/blobs/{}", big.layer_digest)
        ),
        1,
        "{log:?}"
    );

    // Wrong bytes from the upstream: refused, and nothing stored.
    let res = get(&r, "/v2/cache/up/team/bad/manifests/v1");
    assert_eq!(res.status, 200);
    tap.corrupt.store(true, Ordering::SeqCst);
    let url = r.url(&format!("/v2/cache/up/team/bad/blobs/{}", bad.layer_digest));
    // An error answer, or a body cut before its last byte: never the whole wrong blob.
    match crate::http::try_call("GET", &url, &[], None) {
        Ok(res) => assert_eq!(res.status, 503, "{}", String::from_utf8_lossy(&res.body)),
        Err(e) => assert!(e.contains("reading the body"), "{e}"),
    }
    tap.corrupt.store(false, Ordering::SeqCst);
    tap.take();
    let res = call("GET", &url, &[], None);
    assert_eq!(res.status, 200);
    assert!(res.body == bad.layer);
    let log = tap.take();
    assert_eq!(
        count(&log, "GET /v2/team/bad/blobs/"),
        1,
        "the corrupted blob was kept: {log:?}"
    );

    // The upstream down: cached content is served (the TTL passed: offline mode), what is
    // not cached fails with a clear error.
    dist.stop();
    std::thread::sleep(Duration::from_millis(3100));
    let res = get(&r, "/v2/cache/ttl/team/app/manifests/v1");
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.body, moved.manifest);
    let res = get(
        &r,
        &format!("/v2/cache/up/team/big/blobs/{}", big.layer_digest),
    );
    assert!(res.body == big.layer);
    let res = get(&r, "/v2/cache/up/team/never/manifests/v1");
    assert_eq!(res.status, 503, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.code(), "UNAVAILABLE");
    let msg = String::from_utf8_lossy(&res.body);
    // (The tap answers 502 for the stopped peer; an unreachable one: the next test.)
    assert!(
        msg.contains("not cached") && msg.contains("could not provide"),
        "{msg}"
    );
    let res = get(
        &r,
        &format!(
            "/v2/cache/up/team/app/blobs/{}",
            crate::sha256(&moved.config)
        ),
    );
    assert_eq!(res.status, 503);
    let status = get(&r, "/admin/pull-through").json();
    let ttl = &status["upstreams"][1];
    assert_eq!(ttl["name"], "ttl");
    assert!(ttl["offline_serves"].as_u64().unwrap_or(0) >= 1, "{status}");
    assert!(
        status["upstreams"][0]["last_error"]["error"]
            .as_str()
            .is_some(),
        "{status}"
    );
    let metrics = String::from_utf8_lossy(&get(&r, "/metrics").body).into_owned();
    assert!(
        metrics.contains("ballast_pull_through_offline_serves_total{upstream=\"ttl\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ballast_pull_through_blobs_cached_total{upstream=\"up\"} 4"),
        "{metrics}"
    );

    // Back up: a new tag is fetched again.
    dist.restart();
    let res = get(&r, "/v2/cache/up/team/app/manifests/other");
    assert_eq!(res.status, 200);
    r.stop();
    // Cached manifests whose blobs were never pulled are not damage.
    assert_fsck_clean(&tmp.path().join("data"));
}

#[test]
fn pull_through_with_credentials() {
    // Distribution with htpasswd: basic credentials.
    let dist = Distribution::start(&[("puller", "pull-secret-1")]);
    let auth = crate::auth::basic("puller", "pull-secret-1");
    let h = [("Authorization", auth.as_str())];
    let img = push_image(&dist.url(""), "team/app", "v1", 11, 50_000, &h);
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("pw"), "pull-secret-1\n").expect("pw");
    let text = format!(
        "{}\n{}",
        cache_config(
            &dist.url(""),
            &format!(
                "username = \"puller\"\npassword_file = \"{}\"",
                tmp.path().join("pw").display()
            )
        ),
        "[[pull_through]]\nname = \"nopw\"\nprefix = \"cache/nopw\"\n".to_owned()
            + &format!("url = \"{}\"\n", dist.url(""))
    );
    let config = config_file(&tmp, &text);
    let r = Registry::start_args(
        &tmp.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let res = get(&r, "/v2/cache/up/team/app/manifests/v1");
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.body, img.manifest);
    let res = get(
        &r,
        &format!("/v2/cache/up/team/app/blobs/{}", img.layer_digest),
    );
    assert!(res.body == img.layer);
    // Without credentials the upstream refuses, and the client is told so.
    let res = get(&r, "/v2/cache/nopw/team/app/manifests/v1");
    assert_eq!(res.status, 403, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.code(), "DENIED");
    // An upstream that cannot be reached: cached tags still pull, others say why not.
    let mut dist = dist;
    dist.stop();
    let res = get(&r, "/v2/cache/up/team/app/manifests/v1");
    assert_eq!(res.status, 200);
    let res = get(&r, "/v2/cache/up/team/app/manifests/v2");
    assert_eq!(res.status, 503);
    let msg = String::from_utf8_lossy(&res.body);
    assert!(msg.contains("unreachable"), "{msg}");

    // Another Ballast with token auth: the token flow, as the user `runtime`.
    let up = crate::auth::secure(&[]);
    let robot = crate::auth::basic("ci", &up.robot_token);
    let img = push_image(
        &up.r.url(""),
        "team-a/svc",
        "v1",
        12,
        70_000,
        &[("Authorization", robot.as_str())],
    );
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let config = config_file(
        &tmp2,
        &cache_config(
            &up.r.url(""),
            "username = \"runtime\"\npassword = \"runtime-password-1\"",
        ),
    );
    let r2 = Registry::start_args(
        &tmp2.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let res = get(&r2, "/v2/cache/up/team-a/svc/manifests/v1");
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.body, img.manifest);
    let res = get(
        &r2,
        &format!("/v2/cache/up/team-a/svc/blobs/{}", img.layer_digest),
    );
    assert!(res.body == img.layer);
    // `runtime` may not pull team-c upstream: denied there, denied here.
    let res = get(&r2, "/v2/cache/up/team-c/svc/manifests/v1");
    assert!(
        res.status == 403 || res.status == 404,
        "{} {}",
        res.status,
        String::from_utf8_lossy(&res.body)
    );
}

#[test]
fn pull_through_eviction_keeps_the_most_recently_used_within_the_cap() {
    let dist = Distribution::start(&[]);
    let base = dist.url("");
    let a = push_image(&base, "team/a", "v1", 21, 200_000, &[]);
    let b = push_image(&base, "team/b", "v1", 22, 200_000, &[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = config_file(&tmp, &cache_config(&base, "bytes_max = 250000"));
    let r = Registry::start_args(
        &tmp.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    for (repo, img) in [("a", &a), ("b", &b)] {
        let res = get(&r, &format!("/v2/cache/up/team/{repo}/manifests/v1"));
        assert_eq!(res.status, 200);
        let res = get(
            &r,
            &format!("/v2/cache/up/team/{repo}/blobs/{}", img.layer_digest),
        );
        assert!(res.body == img.layer);
        // (Last uses one second apart.)
        std::thread::sleep(Duration::from_millis(1100));
    }
    let dry = call(
        "POST",
        &r.url("/admin/pull-through/evict?dry_run=true"),
        &[],
        None,
    );
    assert_eq!(dry.status, 200);
    let report = dry.json();
    assert_eq!(
        report["evicted"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["evicted"][0]["repository"], "cache/up/team/a");
    let res = get(&r, "/v2/cache/up/team/a/manifests/v1");
    assert_eq!(res.status, 200, "a dry run changed nothing");
    let run = call("POST", &r.url("/admin/pull-through/evict"), &[], None).json();
    assert_eq!(run["evicted"][0]["digest"], a.digest.as_str());
    assert_eq!(run["evicted"][0]["reason"], "bytes_max");
    // (Its blobs' links go with the next collection.)
    let tags = get(&r, "/v2/cache/up/team/a/tags/list").json();
    assert!(
        tags["tags"].as_array().is_none_or(Vec::is_empty),
        "the evicted image is gone: {tags}"
    );
    let audit = std::fs::read_to_string(tmp.path().join("data/audit/audit.log")).expect("audit");
    assert!(audit.contains("\"pull_through.evict\""), "{audit}");
    // Pulled again, it comes back from the upstream.
    let res = get(&r, "/v2/cache/up/team/a/manifests/v1");
    assert_eq!(res.status, 200);
    assert_eq!(res.body, a.manifest);
}

/// skopeo copies a multi-platform image out of the cache (index, both platforms' manifests
/// and layers fetched as it asks for them), digests preserved.
#[test]
fn skopeo_pulls_a_multi_arch_index_through_the_cache() {
    crate::clients::require("skopeo");
    let dist = Distribution::start(&[]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = tmp.path().join("in");
    let index = crate::oci::multi_arch(&layout, 70);
    crate::oci::finish_layout(&layout, &index, "multi");
    crate::clients::push_layout_all(
        &layout,
        "multi",
        &format!("docker://{}/lib/app:v1", dist.addr),
    );
    let config = config_file(&tmp, &cache_config(&dist.url(""), ""));
    let r = Registry::start_args(
        &tmp.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let src = format!("docker://{}/cache/up/lib/app:v1", r.host());
    let out = tmp.path().join("out");
    crate::clients::skopeo(&[
        "copy",
        "--quiet",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        "--dest-oci-accept-uncompressed-layers",
        &src,
        &format!("oci:{}:multi", out.display()),
    ]);
    assert_eq!(
        crate::clients::blob_files(&out),
        crate::clients::blob_files(&layout)
    );
    let raw = crate::clients::skopeo(&["inspect", "--raw", "--tls-verify=false", &src]);
    assert_eq!(crate::sha256(raw.as_bytes()), index.digest);
}

/// From an upstream Ballast, a blob whose chunks are mostly cached already (a rebuild) is
/// filled by delta: its recipe and the few chunks missing here.
#[test]
fn pull_through_from_ballast_fetches_only_missing_chunks() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let up = Registry::start(&tmp.path().join("upstream"));
    let base = crate::seeded(8 << 20, 51);
    let v1 = crate::peers::push_layer(&up.url(""), "lib/app", "v1", 51, base.clone(), &[]);
    let mut changed = base.clone();
    changed[2 << 20..(2 << 20) + 4096].copy_from_slice(&crate::seeded(4096, 52));
    let v2 = crate::peers::push_layer(&up.url(""), "lib/app", "v2", 51, changed.clone(), &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_file(&dir, &cache_config(&up.url(""), ""));
    let r = Registry::start_args(
        &dir.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let fetched = |r: &Registry| {
        get(r, "/admin/pull-through").json()["upstreams"][0]["bytes_fetched"]
            .as_u64()
            .unwrap_or(0)
    };
    for (img, layer) in [(&v1, &base), (&v2, &changed)] {
        let before = fetched(&r);
        let m = get(
            &r,
            &format!("/v2/cache/up/lib/app/manifests/{}", img.digest),
        );
        assert_eq!(m.status, 200);
        let res = get(
            &r,
            &format!("/v2/cache/up/lib/app/blobs/{}", img.layer_digest),
        );
        assert_eq!(res.status, 200);
        assert!(&res.body == layer, "the cached layer is the upstream's");
        let spent = fetched(&r) - before;
        if img.digest == v2.digest {
            assert!(
                spent * 10 < layer.len() as u64,
                "{spent} bytes fetched for a rebuilt layer of {}",
                layer.len()
            );
        }
    }
    let status = get(&r, "/admin/pull-through").json();
    assert_eq!(status["upstreams"][0]["delta"], "in use", "{status}");
    assert!(status["upstreams"][0]["delta_blobs"].as_u64().unwrap_or(0) >= 2);
}

/// An upstream over HTTPS with a private CA: trusted through `ca_file`, refused without it.
#[test]
fn pull_through_over_tls_with_a_ca_file() {
    let up = crate::auth::secure_with_tls();
    let robot = crate::auth::basic("ci", &up.s.robot_token);
    // (The test's HTTP client does not trust the private CA: push with curl, which can.)
    let layer = crate::seeded(30_000, 61);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = up.certs.join("ca.crt");
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: {robot}")])
            .args(args)
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    };
    let config_blob = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}".to_vec();
    for b in [&config_blob, &layer] {
        let f = dir.path().join("blob");
        std::fs::write(&f, b).expect("blob");
        curl(&[
            "-X",
            "POST",
            "--data-binary",
            &format!("@{}", f.display()),
            &up.s.r.url(&format!(
                "/v2/team-a/tls/blobs/uploads/?digest={}",
                crate::sha256(b)
            )),
        ]);
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": crate::sha256(&config_blob), "size": config_blob.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": crate::sha256(&layer), "size": layer.len()}],
    })
    .to_string();
    let mf = dir.path().join("manifest");
    std::fs::write(&mf, &manifest).expect("manifest");
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", mf.display()),
        &up.s.r.url("/v2/team-a/tls/manifests/v1"),
    ]);
    let text = format!(
        "{}\nca_file = \"{}\"\n[[pull_through]]\nname = \"untrusted\"\nprefix = \"cache/untrusted\"\nurl = \"{}\"\n",
        cache_config(
            &up.s.r.url(""),
            "username = \"runtime\"\npassword = \"runtime-password-1\""
        ),
        ca.display(),
        up.s.r.url("")
    );

    let config = config_file(&dir, &text);
    let r = Registry::start_args(
        &dir.path().join("data"),
        &[],
        &["--config", &config.to_string_lossy()],
    );
    let res = get(&r, "/v2/cache/up/team-a/tls/manifests/v1");
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.body, manifest.as_bytes());
    let res = get(
        &r,
        &format!("/v2/cache/up/team-a/tls/blobs/{}", crate::sha256(&layer)),
    );
    assert!(res.body == layer);
    let res = get(&r, "/v2/cache/untrusted/team-a/tls/manifests/v1");
    assert_eq!(res.status, 503, "{}", String::from_utf8_lossy(&res.body));
    let msg = String::from_utf8_lossy(&res.body);
    assert!(
        msg.contains("certificate") || msg.contains("unreachable"),
        "{msg}"
    );
}
