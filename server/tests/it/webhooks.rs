//! Webhooks against a real HTTP receiver the test runs: signatures, both payload formats,
//! order, a receiver that is down, a server killed between the answer and the delivery,
//! retries with growing delays, dead letters and redelivery.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::http::call;
use crate::peers::free_port;
use crate::{push_image_as, Registry};

const SECRET: &str = "a-webhook-secret-0123456789";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    /// Checks the signature as a receiver would (docs/operations.md).
    fn verify(&self, secret: &str) {
        let ts = self.header("Ballast-Timestamp").expect("timestamp header");
        let sig = self.header("Ballast-Signature").expect("signature header");
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let want = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig, want, "signature");
        let age = crate::now().saturating_sub(ts.parse().expect("timestamp"));
        assert!(age < 300, "a fresh timestamp: {age} s old");
    }
}

/// An HTTP receiver on loopback answering every request with `status`.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Got>>>,
    status: Arc<AtomicU16>,
    /// Milliseconds to wait before answering.
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(port: u16, status: u16) -> Receiver {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind receiver");
        let port = listener.local_addr().expect("addr").port();
        let r = Receiver {
            port,
            got: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
            delay_ms: Arc::default(),
            stop: Arc::default(),
        };
        let (got, st, stop, delay) = (
            r.got.clone(),
            r.status.clone(),
            r.stop.clone(),
            r.delay_ms.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (got, st, stop, delay) = (got.clone(), st.clone(), stop.clone(), delay.clone());
                std::thread::spawn(move || serve(conn, &got, &st, &stop, &delay));
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for what arrived.
    fn wait_for(&self, what: &str, pred: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.got();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: got {:?}",
                got.iter()
                    .map(|g| String::from_utf8_lossy(&g.body).into_owned())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    conn: TcpStream,
    got: &Mutex<Vec<Got>>,
    status: &AtomicU16,
    stop: &AtomicBool,
    delay_ms: &std::sync::atomic::AtomicU64,
) {
    let mut w = conn.try_clone().expect("clone");
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || stop.load(Ordering::SeqCst) {
            return;
        }
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        got.lock().expect("lock").push(Got {
            headers,
            body,
            at: Instant::now(),
        });
        std::thread::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst)));
        let s = status.load(Ordering::SeqCst);
        if w.write_all(format!("HTTP/1.1 {s} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

/// A config file with one endpoint.
fn config(dir: &Path, url: &str, extra: &str) -> String {
    let path = dir.join("ballast.toml");
    std::fs::write(
        &path,
        format!("[[webhooks]]\nname = \"ci\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n{extra}\n"),
    )
    .expect("config");
    path.to_string_lossy().into_owned()
}

fn types(got: &[Got]) -> Vec<String> {
    got.iter()
        .map(|g| {
            g.json()["type"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("dev.ballast.")
                .to_owned()
        })
        .collect()
}

#[test]
fn pushes_pulls_moves_and_deletes_arrive_signed_and_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start(0, 200);
    let cfg = config(
        dir.path(),
        &rx.url(),
        "events = [\"manifest.pushed\", \"tag.set\", \"tag.deleted\", \"manifest.pulled\", \"blob.uploaded\", \"gc.finished\"]\nrepositories = [\"team/**\"]\nretry_initial_ms = 50",
    );
    let r = Registry::start_args(&dir.path().join("data"), &[], &["--config", &cfg]);
    let base = r.url("");
    let first = push_image_as(&base, "team/app", "v1", 1, 50_000, &[]);
    // Not under team/**: no events.
    push_image_as(&base, "other/app", "v1", 2, 50_000, &[]);
    let pull = call("GET", &r.url("/v2/team/app/manifests/v1"), &[], None);
    assert_eq!(pull.status, 200);
    let second = push_image_as(&base, "team/app", "v1", 3, 50_000, &[]);
    let del = call("DELETE", &r.url("/v2/team/app/manifests/v1"), &[], None);
    assert_eq!(del.status, 202);
    assert_eq!(call("POST", &r.url("/admin/gc"), &[], None).status, 200);
    let want = [
        "blob.uploaded",
        "blob.uploaded",
        "manifest.pushed",
        "tag.set",
        "manifest.pulled",
        "blob.uploaded",
        "blob.uploaded",
        "manifest.pushed",
        "tag.set",
        "tag.deleted",
        "gc.finished",
    ];
    let got = rx.wait_for("every event", |g| g.len() >= want.len());
    assert_eq!(types(&got), want);
    for g in &got {
        g.verify(SECRET);
        assert_eq!(
            g.header("content-type"),
            Some("application/cloudevents+json")
        );
        let ce = g.json();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(g.header("Ballast-Event-Id"), ce["id"].as_str());
        assert!(ce["source"]
            .as_str()
            .is_some_and(|s| s.starts_with("http://127.0.0.1:")));
    }
    let ce: Vec<Value> = got.iter().map(Got::json).collect();
    assert_eq!(ce[2]["subject"], "team/app:v1");
    assert_eq!(ce[2]["data"]["digest"], first.as_str());
    assert_eq!(
        ce[2]["data"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert!(ce[2]["data"]["size"].as_u64().is_some_and(|n| n > 100));
    assert_eq!(ce[2]["data"]["actor"], "anonymous");
    assert!(ce[3]["data"].get("previousDigest").is_none(), "a new tag");
    assert_eq!(ce[4]["data"]["digest"], first.as_str());
    assert_eq!(ce[8]["data"]["digest"], second.as_str());
    assert_eq!(
        ce[8]["data"]["previousDigest"],
        first.as_str(),
        "the tag moved"
    );
    assert_eq!(ce[9]["subject"], "team/app:v1");
    assert_eq!(ce[9]["data"]["digest"], second.as_str());
    assert_eq!(ce[5]["data"]["size"], 10, "the config blob first");
    assert_eq!(ce[6]["data"]["size"], 50_000);
    assert!(ce[10]["data"]["detail"]["trigger"] == "request");
    // The delete's event names the request that caused it.
    assert_eq!(
        ce[9]["data"]["requestId"].as_str(),
        del.header("x-request-id")
    );
    // The admin view agrees, once the last answer is taken in (the receiver has the event
    // before the server has its 200).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = call("GET", &r.url("/admin/webhooks"), &[], None).json();
        if status["endpoints"][0]["pending"] == 0 || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["endpoints"][0]["name"], "ci");
    assert_eq!(status["endpoints"][0]["delivered"], want.len());
    assert_eq!(status["endpoints"][0]["pending"], 0);
}

#[test]
fn a_receiver_that_is_down_and_a_killed_server_still_get_every_event_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let cfg = config(
        dir.path(),
        &url,
        "events = [\"manifest.pushed\"]\nretry_initial_ms = 50\nretry_max_delay_secs = 1",
    );
    let data = dir.path().join("data");
    let mut r = Registry::start_args(&data, &[], &["--config", &cfg]);
    let base = r.url("");
    let mut pushed = vec![push_image_as(&base, "a/one", "v1", 10, 2_000, &[])];
    // Acknowledged, not delivered (nobody listens): killed now, the event must survive.
    r.kill();
    r.restart();
    pushed.push(push_image_as(&base, "a/two", "v1", 11, 2_000, &[]));
    pushed.push(push_image_as(&base, "a/three", "v1", 12, 2_000, &[]));
    let rx = Receiver::start(port, 200);
    let got = rx.wait_for("the three pushes", |g| {
        let mut seen: Vec<String> = Vec::new();
        for e in g {
            let d = e.json()["data"]["digest"].as_str().unwrap_or("").to_owned();
            if !seen.contains(&d) {
                seen.push(d);
            }
        }
        seen.len() >= 3
    });
    // At least once, in order: first arrivals follow the push order.
    let mut order: Vec<String> = Vec::new();
    for g in &got {
        g.verify(SECRET);
        let d = g.json()["data"]["digest"].as_str().unwrap_or("").to_owned();
        if !order.contains(&d) {
            order.push(d);
        }
    }
    assert_eq!(order, pushed);
    r.stop();
    crate::assert_fsck_clean(&data);
}

#[test]
fn a_failing_receiver_gets_growing_retries_then_a_dead_letter_that_can_be_redelivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start(0, 500);
    let cfg = config(
        dir.path(),
        &rx.url(),
        "events = [\"blob.uploaded\"]\nmax_age_secs = 3\nretry_initial_ms = 100\nretry_max_delay_secs = 2",
    );
    let mut r = Registry::start_args(&dir.path().join("data"), &[], &["--config", &cfg]);
    let blob = b"a blob nobody wants";
    let d = crate::sha256(blob);
    let res = call(
        "POST",
        &r.url(&format!("/v2/x/blobs/uploads/?digest={d}")),
        &[],
        Some(blob),
    );
    assert_eq!(res.status, 201, "a failing receiver never slows the push");
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead = call("GET", &r.url("/admin/webhooks/dead"), &[], None).json();
        if dead["dead_letters"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break dead;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        std::thread::sleep(Duration::from_millis(100));
    };
    let letter = &dead["dead_letters"][0];
    assert_eq!(letter["endpoint"], "ci");
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("HTTP 500")),
        "{letter}"
    );
    assert_eq!(letter["event"]["digest"], d.as_str());
    let attempts = rx.got();
    assert!(attempts.len() >= 4, "{} attempts", attempts.len());
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps.last() > gaps.first(), "delays grow: {gaps:?}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(
            a.header("Ballast-Delivery-Attempt"),
            Some((i + 1).to_string().as_str())
        );
    }
    let m = String::from_utf8_lossy(&call("GET", &r.url("/metrics"), &[], None).body).into_owned();
    assert!(
        m.contains("ballast_webhook_deliveries_total{endpoint=\"ci\",outcome=\"dead\"} 1"),
        "{m}"
    );
    assert!(m.contains("ballast_webhook_dead_letters 1"), "{m}");

    // Offline, the CLI lists it too.
    r.stop();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["webhooks", "dead", "--json"])
        .arg(&r.data)
        .output()
        .expect("ballast webhooks dead");
    assert!(out.status.success());
    let listed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(listed["dead_letters"][0]["id"], letter["id"]);
    r.restart();

    // The receiver mends; an admin redelivers; the same event arrives, once more.
    rx.status.store(200, Ordering::SeqCst);
    let before = rx.got().len();
    let red = call("POST", &r.url("/admin/webhooks/dead/redeliver"), &[], None);
    assert_eq!(red.status, 200);
    assert_eq!(red.json()["redelivered"], 1);
    let got = rx.wait_for("the redelivery", |g| g.len() > before);
    let last = got.last().expect("one");
    last.verify(SECRET);
    assert_eq!(last.json()["id"], letter["event"]["id"]);
    let dead = call("GET", &r.url("/admin/webhooks/dead"), &[], None).json();
    assert_eq!(dead["dead_letters"], serde_json::json!([]));
    let audit = std::fs::read_to_string(r.data.join("audit").join("audit.log")).expect("audit log");
    assert!(audit.contains("\"action\":\"webhook.redeliver\""));
}

#[test]
fn distribution_format_receivers_get_distribution_envelopes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start(0, 200);
    let cfg = config(
        dir.path(),
        &rx.url(),
        "format = \"distribution\"\nevents = [\"manifest.pushed\", \"tag.set\", \"blob.uploaded\"]",
    );
    let r = Registry::start_args(&dir.path().join("data"), &[], &["--config", &cfg]);
    let digest = push_image_as(&r.url(""), "lib/web", "2.0", 5, 10_000, &[]);
    // Two blobs and the manifest; tag.set has no Distribution action and is not sent.
    let got = rx.wait_for("three events", |g| g.len() >= 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rx.got().len(), 3);
    for g in &got {
        g.verify(SECRET);
        assert_eq!(
            g.header("content-type"),
            Some("application/vnd.docker.distribution.events.v1+json")
        );
    }
    // Parsed with the field names Distribution documents.
    let env = got[2].json();
    let e = &env["events"][0];
    assert_eq!(e["action"], "push");
    assert_eq!(e["target"]["repository"], "lib/web");
    assert_eq!(e["target"]["digest"], digest.as_str());
    assert_eq!(e["target"]["tag"], "2.0");
    assert_eq!(
        e["target"]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(e["target"]["size"], e["target"]["length"]);
    assert!(e["target"]["url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("/v2/lib/web/manifests/{digest}"))));
    assert!(e["id"].is_string() && e["timestamp"].is_string());
    assert_eq!(e["actor"]["name"], "anonymous");
    assert_eq!(e["request"]["addr"], "127.0.0.1");
    assert_eq!(env["events"][0]["request"]["method"], "PUT");
    assert_eq!(got[1].json()["events"][0]["target"]["length"], 10_000);
}

#[test]
fn bad_webhook_config_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, want) in [
        ("events = [\"push\"]", "unknown event kind \"push\""),
        ("repositories = [\"[\"]", "repository pattern"),
        ("pull_sample = 2.0", "pull_sample"),
    ] {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!("[[webhooks]]\nname = \"ci\"\nurl = \"http://127.0.0.1:9/x\"\nsecret = \"{SECRET}\"\n{extra}\n"),
        )
        .expect("config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&path)
            .arg("--data")
            .arg(dir.path().join("data"))
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(want) && err.contains("[[webhooks]] #1"),
            "{extra}: {err}"
        );
    }
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[webhooks]]\nname = \"ci\"\nurl = \"http://127.0.0.1:9/x\"\n",
    )
    .expect("config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("secret"));
}

#[test]
fn a_namespace_past_its_soft_quota_is_a_quota_warning_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start(0, 200);
    let cfg = config(
        dir.path(),
        &rx.url(),
        "events = [\"quota.warning\"]\n[[quotas]]\nnamespaces = [\"q/**\"]\nbytes_max = 10000\nsoft_percent = 50\n",
    );
    let r = Registry::start_args(&dir.path().join("data"), &[], &["--config", &cfg]);
    push_image_as(&r.url(""), "q/a", "v1", 1, 2000, &[]);
    push_image_as(&r.url(""), "q/a", "v2", 2, 4000, &[]);
    let got = rx.wait_for("the warning", |g| !g.is_empty());
    got[0].verify(SECRET);
    let ce = got[0].json();
    assert_eq!(ce["type"], "dev.ballast.quota.warning");
    assert_eq!(ce["data"]["detail"]["namespaces"], "q/**");
    assert_eq!(ce["data"]["detail"]["bytes_max"], 10000);
    assert!(ce["data"]["detail"]["bytes"]
        .as_u64()
        .is_some_and(|b| b >= 5000));
    // Once: the next push (still past it) sends no second warning.
    push_image_as(&r.url(""), "q/a", "v3", 3, 100, &[]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(rx.got().len(), 1);
}

#[test]
fn a_receiver_that_never_answers_in_time_is_retried_then_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rx = Receiver::start(0, 200);
    rx.delay_ms.store(2500, Ordering::SeqCst);
    let cfg = config(
        dir.path(),
        &rx.url(),
        "events = [\"blob.uploaded\"]\ntimeout_secs = 1\nmax_age_secs = 3\nretry_initial_ms = 100\nretry_max_delay_secs = 1",
    );
    let r = Registry::start_args(&dir.path().join("data"), &[], &["--config", &cfg]);
    let blob = b"slow receiver";
    let started = Instant::now();
    let res = call(
        "POST",
        &r.url(&format!(
            "/v2/x/blobs/uploads/?digest={}",
            crate::sha256(blob)
        )),
        &[],
        Some(blob),
    );
    assert_eq!(res.status, 201);
    // The receiver takes 2.5 s to answer each delivery: the push does not wait for it.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "the push waited for the receiver"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let letter = loop {
        let dead = call("GET", &r.url("/admin/webhooks/dead"), &[], None).json();
        if let Some(l) = dead["dead_letters"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
        {
            break l;
        }
        assert!(Instant::now() < deadline, "no dead letter");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        letter["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no answer within 1 s")),
        "{letter}"
    );
    assert!(rx.got().len() >= 2, "retried: {} attempts", rx.got().len());
}
