//! `/metrics` and request ids: what a push and a pull are counted as, who may read the
//! metrics, the metrics listener, and a real Prometheus scraping the registry.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth::{basic, secure, ADMIN_PW};
use crate::http::call;
use crate::peers::free_port;
use crate::{have, push_image_as, seeded, sha256, Registry};

/// `name{labels}` → value, from the text format.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn scrape(url: &str, headers: &[(&str, &str)]) -> BTreeMap<String, f64> {
    let res = call("GET", url, headers, None);
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert!(
        res.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        res.header("content-type")
    );
    parse(&String::from_utf8_lossy(&res.body))
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        panic!(
            "no {key} in the metrics: {:?}",
            m.keys().collect::<Vec<_>>()
        )
    })
}

/// The image [`push_image_as`] pushes: (config, layer, manifest) sizes.
fn image_sizes(seed: u64, len: usize) -> (usize, usize) {
    let config = format!("{{\"seed\":{seed}}}").len();
    (config, len)
}

#[test]
fn a_push_and_a_pull_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let base = r.url("");
    let len = 700_000;
    let digest = push_image_as(&base, "team/app", "v1", 7, len, &[]);
    let (config_len, layer_len) = image_sizes(7, len);
    let manifest = call(
        "GET",
        &r.url("/v2/team/app/manifests/v1"),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
        None,
    );
    assert_eq!(manifest.status, 200);
    assert_eq!(sha256(&manifest.body), digest);
    let layer = sha256(&seeded(len, 7));
    let blob = call(
        "GET",
        &r.url(&format!("/v2/team/app/blobs/{layer}")),
        &[],
        None,
    );
    assert_eq!(blob.body.len(), layer_len);
    assert_eq!(
        call("GET", &r.url("/v2/nope/manifests/x"), &[], None).status,
        404
    );

    let m = scrape(&r.url("/metrics"), &[]);
    let req = |route: &str, method: &str, status: &str| {
        get(
            &m,
            &format!(
                "ballast_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(req("manifests", "PUT", "2xx"), 1.0);
    assert_eq!(req("manifests", "GET", "2xx"), 1.0);
    assert_eq!(req("manifests", "GET", "4xx"), 1.0);
    assert_eq!(req("blobs", "GET", "2xx"), 1.0);
    assert_eq!(req("uploads", "POST", "2xx"), 2.0);
    assert_eq!(
        get(
            &m,
            "ballast_http_request_duration_seconds_count{route=\"manifests\",method=\"GET\"}"
        ),
        2.0
    );
    let manifest_len = manifest.body.len();
    let pushed = (config_len + layer_len + manifest_len) as f64;
    assert_eq!(get(&m, "ballast_http_received_bytes_total"), pushed);
    assert!(get(&m, "ballast_http_sent_bytes_total") >= (layer_len + manifest_len) as f64);
    assert_eq!(
        get(&m, "ballast_http_requests_in_flight"),
        1.0,
        "the scrape itself"
    );
    assert_eq!(get(&m, "ballast_store_logical_bytes"), pushed);
    assert_eq!(get(&m, "ballast_catalog_repositories"), 1.0);
    assert_eq!(get(&m, "ballast_catalog_tags"), 1.0);
    assert_eq!(get(&m, "ballast_catalog_manifests"), 1.0);
    assert!(get(&m, "ballast_store_chunks_written_total") >= 3.0);
    assert!(get(&m, "ballast_store_chunks") >= 3.0);
    assert!(get(&m, "ballast_store_chunks_verified_total") >= 1.0);
    assert_eq!(
        get(&m, "ballast_store_chunk_verification_failures_total"),
        0.0
    );
    assert!(get(&m, "ballast_store_segment_bytes") >= (layer_len / 2) as f64);
    assert!(get(&m, "ballast_fsync_duration_seconds_count") >= 1.0);
    assert!(get(&m, "ballast_catalog_journal_bytes") > 0.0);
    assert_eq!(get(&m, "ballast_store_healthy"), 1.0);
    assert_eq!(get(&m, "ballast_upload_sessions"), 0.0);

    // A session in flight is counted; a collection too.
    let start = call("POST", &r.url("/v2/team/app/blobs/uploads/"), &[], None);
    assert_eq!(start.status, 202);
    let gc = call("POST", &r.url("/admin/gc?grace=0"), &[], None);
    assert_eq!(gc.status, 200);
    let m = scrape(&r.url("/metrics"), &[]);
    assert_eq!(get(&m, "ballast_upload_sessions"), 1.0);
    assert!(get(&m, "ballast_gc_last_run_timestamp_seconds") > 1.7e9);
    assert_eq!(
        get(
            &m,
            "ballast_gc_runs_total{trigger=\"request\",outcome=\"ok\"}"
        ),
        1.0
    );
    // Live bytes are recomputed after a collection (and every minute): the image is live.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = scrape(&r.url("/metrics"), &[]);
        let live = m.get("ballast_store_live_bytes").copied().unwrap_or(0.0);
        if live >= layer_len as f64 / 2.0 {
            let dead = get(&m, "ballast_store_dead_bytes");
            let total = get(&m, "ballast_store_segment_bytes");
            assert!(
                live + dead == total && dead < total / 2.0,
                "{live} + {dead} != {total}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "live bytes never counted the image: {live}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn request_ids_tie_the_response_to_its_audit_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(dir.path());
    let data = b"request id";
    let d = sha256(data);
    let res = call(
        "POST",
        &r.url(&format!("/v2/a/blobs/uploads/?digest={d}")),
        &[],
        Some(data),
    );
    assert_eq!(res.status, 201);
    let id = res.header("x-request-id").expect("X-Request-Id").to_owned();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let other = call("GET", &r.url("/v2/"), &[], None);
    assert_ne!(other.header("x-request-id"), Some(id.as_str()));
    // Errors carry one too.
    assert!(call("GET", &r.url("/v2/a/blobs/sha256:00"), &[], None)
        .header("x-request-id")
        .is_some());
    let audit = std::fs::read_to_string(r.data.join("audit").join("audit.log")).expect("audit log");
    let line: Value = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["action"] == "blob.upload")
        .expect("blob.upload audited");
    assert_eq!(line["request_id"], id.as_str());
}

#[test]
fn metrics_need_admin_when_auth_is_on_unless_on_their_own_listener() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let s = secure(&[("BALLAST_METRICS_LISTEN", &listen)]);
    let url = s.r.url("/metrics");
    assert_eq!(call("GET", &url, &[], None).status, 401);
    let runtime = basic("runtime", "runtime-password-1");
    assert_eq!(
        call("GET", &url, &[("Authorization", &runtime)], None).status,
        403
    );
    let wrong = basic("runtime", "not-the-password");
    assert_eq!(
        call("GET", &s.r.url("/v2/"), &[("Authorization", &wrong)], None).status,
        401
    );
    let admin = basic("admin", ADMIN_PW);
    let m = scrape(&url, &[("Authorization", &admin)]);
    assert_eq!(get(&m, "ballast_login_failures_total"), 1.0);

    // The metrics listener needs nothing, and serves nothing else.
    let open = format!("http://{listen}");
    let m = scrape(&format!("{open}/metrics"), &[]);
    assert_eq!(get(&m, "ballast_login_failures_total"), 1.0);
    assert_eq!(call("GET", &format!("{open}/v2/"), &[], None).status, 404);
    assert_eq!(
        call("POST", &format!("{open}/metrics"), &[], None).status,
        405
    );
}

#[test]
fn metrics_off_counts_nothing_and_serves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start_with(dir.path(), &[("BALLAST_METRICS", "false")]);
    let res = call("GET", &r.url("/metrics"), &[], None);
    assert_eq!(res.status, 404);
    assert!(String::from_utf8_lossy(&res.body).contains("metrics = false"));
}

/// A Prometheus started on loopback.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(dir: &Path, target: &str) -> Prometheus {
    assert!(
        have("prometheus"),
        "prometheus is not installed: run scripts/install-test-deps"
    );
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: ballast\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("prometheus.yml");
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        child,
        url: format!("http://{listen}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = crate::http::try_call("GET", &format!("{}/-/ready", p.url), &[], None) {
            if r.status == 200 {
                return p;
            }
        }
        assert!(Instant::now() < deadline, "prometheus did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of an instant query's single sample, if it has one.
fn query(p: &Prometheus, q: &str) -> Option<f64> {
    let url = format!(
        "{}/api/v1/query?query={}",
        p.url,
        form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
    );
    let res = call("GET", &url, &[], None);
    let v = res.json();
    v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}

#[test]
fn prometheus_scrapes_a_push_and_a_pull() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = Registry::start(&dir.path().join("data"));
    let p = start_prometheus(dir.path(), &r.host());
    let len = 300_000;
    let digest = push_image_as(&r.url(""), "lib/web", "1.0", 11, len, &[]);
    let pulled = call(
        "GET",
        &r.url(&format!("/v2/lib/web/manifests/{digest}")),
        &[],
        None,
    );
    assert_eq!(pulled.status, 200);
    let (config_len, layer_len) = image_sizes(11, len);
    let logical = (config_len + layer_len + pulled.body.len()) as f64;
    let checks: [(&str, f64); 4] = [
        ("up{job=\"ballast\"}", 1.0),
        (
            "ballast_http_requests_total{route=\"manifests\",method=\"PUT\",status=\"2xx\"}",
            1.0,
        ),
        (
            "ballast_http_requests_total{route=\"manifests\",method=\"GET\",status=\"2xx\"}",
            1.0,
        ),
        ("ballast_store_logical_bytes", logical),
    ];
    // Prometheus scrapes every second: wait until a scrape after the pull has landed.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: Vec<Option<f64>> = checks.iter().map(|(q, _)| query(&p, q)).collect();
        if checks
            .iter()
            .zip(&got)
            .all(|((_, want), g)| *g == Some(*want))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the expected values: {:?}",
            checks.iter().map(|c| c.0).zip(got).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // A rate over the pushed bytes works as an operator's query would.
    assert!(query(&p, "ballast_http_received_bytes_total").is_some_and(|v| v >= logical));
}
