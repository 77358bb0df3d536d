//! Real peers for the pull-through and replication tests: CNCF Distribution (Debian
//! `docker-registry`), and a tap: an HTTP proxy the test puts between Ballast and a peer to
//! count the requests that reach the peer and to corrupt blob bytes on the way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use parking_lot::Mutex;

use crate::http::{call, try_call};
use crate::{have, seeded, sha256};

/// A `docker-registry serve` process on a free loopback port (killed on drop).
pub struct Distribution {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// A loopback port free now and handed to no one else in this test process: taken below
/// the kernel's ephemeral range (32768 and up), so an outgoing connection or another
/// `bind(0)` cannot take it between this check and the server binding it (a Garage
/// cluster once joined a node of another test's cluster that way).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const LOW: u16 = 12000;
    const HIGH: u16 = 32000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test process starts at its own place so two at once rarely meet.
    let _ = NEXT.compare_exchange(
        0,
        LOW + (std::process::id() % u32::from(HIGH - LOW)) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(HIGH - LOW) {
        let port = NEXT
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                Some(if p + 1 >= HIGH { LOW } else { p + 1 })
            })
            .expect("port counter");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {HIGH}")
}

impl Distribution {
    /// Starts Distribution with filesystem storage; with `users`, htpasswd auth (bcrypt
    /// lines from Apache's `htpasswd -B`).
    pub fn start(users: &[(&str, &str)]) -> Distribution {
        assert!(
            have("docker-registry"),
            "docker-registry is not installed: run scripts/install-test-deps"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut yml = format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage:\n  filesystem: {{ rootdirectory: {} }}\n  delete: {{ enabled: true }}\nhttp: {{ addr: {addr} }}\n",
            dir.path().join("data").display()
        );
        if !users.is_empty() {
            let mut lines = String::new();
            for (u, p) in users {
                let out = Command::new("htpasswd")
                    .args(["-nbB", "-C", "4", u, p])
                    .output()
                    .expect("htpasswd");
                assert!(out.status.success());
                lines.push_str(String::from_utf8_lossy(&out.stdout).trim());
                lines.push('\n');
            }
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, lines).expect("htpasswd file");
            yml.push_str(&format!(
                "auth:\n  htpasswd: {{ realm: test, path: {} }}\n",
                f.display()
            ));
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, yml).expect("config");
        let mut d = Distribution {
            child: None,
            addr,
            dir,
        };
        d.spawn();
        d
    }

    /// Starts Distribution with its `s3` storage driver on `endpoint` (path-style, plain
    /// HTTP), under `prefix` of `bucket`.
    pub fn start_s3(
        endpoint: &str,
        bucket: &str,
        key: &str,
        secret: &str,
        prefix: &str,
    ) -> Distribution {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let yml = format!(
            "version: 0.1\nlog: {{ level: error }}\nstorage:\n  s3:\n    region: garage\n    \
             regionendpoint: {endpoint}\n    forcepathstyle: true\n    secure: false\n    \
             bucket: {bucket}\n    accesskey: {key}\n    secretkey: {secret}\n    \
             rootdirectory: /{prefix}\n  delete: {{ enabled: true }}\n  redirect: {{ disable: true }}\n\
             http: {{ addr: {addr} }}\n"
        );
        std::fs::write(dir.path().join("config.yml"), yml).expect("config");
        let mut d = Distribution {
            child: None,
            addr,
            dir,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("log")).expect("log");
        let child = Command::new("docker-registry")
            // (Its AWS SDK fails to start with a custom CA bundle; the store here is plain
            // HTTP on loopback.)
            .env_remove("AWS_CA_BUNDLE")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while try_call("GET", &self.url("/v2/"), &[], None).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not start: {}",
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Kills it (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An image pushed by [`push_image`].
pub struct Pushed {
    pub manifest: Vec<u8>,
    pub digest: String,
    pub config: Vec<u8>,
    pub layer: Vec<u8>,
    pub layer_digest: String,
}

/// Pushes an image (a config and one layer of `len` seeded bytes) the way every registry
/// takes it (POST, then PUT with the bytes), then its manifest.
pub fn push_image(
    base: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    len: usize,
    headers: &[(&str, &str)],
) -> Pushed {
    push_layer(base, repo, tag, seed, seeded(len, seed), headers)
}

/// [`push_image`] with a layer of the caller's (the config names `seed`).
pub fn push_layer(
    base: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    layer: Vec<u8>,
    headers: &[(&str, &str)],
) -> Pushed {
    let config =
        format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"seed\":{seed}}}").into_bytes();
    let mut descs = Vec::new();
    for (data, media) in [
        (&config, "application/vnd.oci.image.config.v1+json"),
        (&layer, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let d = sha256(data);
        let res = call(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/"),
            headers,
            None,
        );
        assert_eq!(res.status, 202, "{}", String::from_utf8_lossy(&res.body));
        let loc = res.header("location").expect("Location").to_owned();
        let loc = if loc.starts_with('/') {
            format!("{base}{loc}")
        } else {
            loc
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let res = call("PUT", &format!("{loc}{sep}digest={d}"), headers, Some(data));
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
        descs.push(serde_json::json!({"mediaType": media, "digest": d, "size": data.len()}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descs[0],
        "layers": [descs[1]],
    })
    .to_string()
    .into_bytes();
    let mut h = headers.to_vec();
    h.push(("Content-Type", "application/vnd.oci.image.manifest.v1+json"));
    let res = call(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{tag}"),
        &h,
        Some(&manifest),
    );
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    Pushed {
        digest: sha256(&manifest),
        layer_digest: sha256(&layer),
        manifest,
        config,
        layer,
    }
}

/// An HTTP proxy in front of a peer: logs `METHOD path BODY-LENGTH` of every request, flips
/// a byte in the middle of blob bodies while `corrupt` is set, and plays a faulty Ballast
/// for delta replication: `cut_chunks` drops the connection at the Nth chunk upload from
/// now (1: the next), `lie_missing` answers "none missing" for every chunk question.
pub struct Tap {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    pub corrupt: Arc<AtomicBool>,
    pub cut_chunks: Arc<std::sync::atomic::AtomicUsize>,
    pub lie_missing: Arc<AtomicBool>,
    /// While set, blob uploads (PATCH, and PUT to an upload) are held before they are
    /// forwarded.
    pub stall_uploads: Arc<AtomicBool>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Tap {
    pub fn start(upstream: &str) -> Tap {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let corrupt = Arc::new(AtomicBool::new(false));
        let faults = Faults {
            cut_chunks: Arc::default(),
            lie_missing: Arc::default(),
            stall_uploads: Arc::default(),
        };
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let upstream = upstream.trim_end_matches('/').to_owned();
        let (l, c, fl) = (log.clone(), corrupt.clone(), faults.clone());
        rt.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (l, c, fl, client, upstream) = (
                    l.clone(),
                    c.clone(),
                    fl.clone(),
                    client.clone(),
                    upstream.clone(),
                );
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        forward(
                            req,
                            upstream.clone(),
                            client.clone(),
                            l.clone(),
                            c.clone(),
                            fl.clone(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Tap {
            addr,
            log,
            corrupt,
            cut_chunks: faults.cut_chunks,
            lie_missing: faults.lie_missing,
            stall_uploads: faults.stall_uploads,
            rt: Some(rt),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests forwarded since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Clone)]
struct Faults {
    cut_chunks: Arc<std::sync::atomic::AtomicUsize>,
    lie_missing: Arc<AtomicBool>,
    stall_uploads: Arc<AtomicBool>,
}

async fn forward(
    req: Request<Incoming>,
    upstream: String,
    client: reqwest::Client,
    log: Arc<Mutex<Vec<String>>>,
    corrupt: Arc<AtomicBool>,
    faults: Faults,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.to_string());
    let headers = req.headers().clone();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    log.lock().push(format!("{method} {path} {}", body.len()));
    if (method == hyper::Method::PATCH || method == hyper::Method::PUT)
        && path.contains("/blobs/uploads/")
    {
        while faults.stall_uploads.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    if method == hyper::Method::POST && path.ends_with("/chunks") {
        let cut = faults
            .cut_chunks
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok_and(|before| before == 1);
        if cut {
            return Err(std::io::Error::other("the tap cuts this chunk upload"));
        }
    }
    if method == hyper::Method::POST
        && path.ends_with("/chunks/missing")
        && faults.lie_missing.load(Ordering::SeqCst)
    {
        return Ok(Response::builder()
            .status(200)
            .body(Full::new(Bytes::new()))
            .expect("response"));
    }
    let mut r = client.request(method.clone(), format!("{upstream}{path}"));
    // (Host too: a registry builds upload Locations from it, and they must lead back here.)
    for (k, v) in &headers {
        r = r.header(k, v);
    }
    let resp = match r.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Ok(Response::builder()
                .status(502)
                .body(Full::new(Bytes::from(e.to_string())))
                .expect("response"))
        }
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k != hyper::header::TRANSFER_ENCODING && k != hyper::header::CONNECTION {
            out = out.header(k, v);
        }
    }
    let mut bytes = resp.bytes().await.unwrap_or_default().to_vec();
    if corrupt.load(Ordering::SeqCst)
        && method == hyper::Method::GET
        && path.contains("/blobs/")
        && bytes.len() > 100
    {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
    }
    Ok(out.body(Full::new(Bytes::from(bytes))).expect("response"))
}

/// A directory for a config file and the like, and the path of a file in it.
pub fn config_file(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let p = dir.path().join("ballast.toml");
    std::fs::write(&p, text).expect("config");
    p
}
