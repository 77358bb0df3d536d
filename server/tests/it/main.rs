//! The server's integration tests (one binary): HTTP behaviour, restarts, real clients.

pub mod auth;
mod browser;
mod bucket;
mod clients;
mod console;
mod disk;
mod garage;
mod governance;
mod hardening;
mod hostile;
pub mod http;
mod metrics;
pub mod oci;
mod peers;
mod protocol;
mod pull_through;
mod replication;
mod tools;
mod torture;
mod webhooks;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::Digest as _;

/// A setting for [`Registry::start_with`]: the file the server's log (stderr) goes to.
pub const STDERR_FILE: &str = "STDERR_FILE";

/// A `ballast serve` process on a free loopback port, stopped (SIGTERM) on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    scheme: &'static str,
}

impl Registry {
    /// Starts a registry on a data directory.
    pub fn start(data: &Path) -> Registry {
        Self::start_with(data, &[])
    }

    /// Starts a registry with extra `BALLAST_*` environment settings.
    pub fn start_with(data: &Path, env: &[(&str, &str)]) -> Registry {
        Self::start_args(data, env, &[])
    }

    /// Starts a registry with extra settings and command-line arguments (`--config FILE`).
    pub fn start_args(data: &Path, env: &[(&str, &str)], args: &[&str]) -> Registry {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, addr, scheme) = spawn(data, &env, &args);
        Registry {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
            env,
            args,
            scheme,
        }
    }

    /// Base URL.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// `host:port` for clients.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the process gracefully and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY-free: signal the pid we started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let status = child.wait().expect("wait for ballast");
            assert!(status.success(), "ballast exited with {status}");
        }
    }

    /// Kills the process with SIGKILL (no shutdown at all) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL ballast");
            let _ = child.wait();
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Stops and starts again on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        let mut env = self.env.clone();
        env.push(("BALLAST_LISTEN".into(), self.addr.to_string()));
        let (child, addr, _) = spawn(&self.data, &env, &self.args);
        assert_eq!(addr, self.addr);
        self.child = Some(child);
    }
}

fn spawn(
    data: &Path,
    env: &[(String, String)],
    args: &[String],
) -> (Child, SocketAddr, &'static str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast"));
    cmd.arg("serve").arg("--data").arg(data).args(args);
    if !env.iter().any(|(k, _)| k == "BALLAST_LISTEN") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BALLAST_")) {
        cmd.env_remove(k);
    }
    cmd.env("BALLAST_LOG", "warn");
    // `(STDERR_FILE, path)` among the settings sends the server's log to a file (appended,
    // so it survives a restart) instead of the test's own stderr.
    let mut stderr = Stdio::inherit();
    for (k, v) in env {
        if k == STDERR_FILE {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(v)
                .expect("log file");
            stderr = Stdio::from(f);
        } else {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start ballast");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    lines.read_line(&mut line).expect("banner");
    let scheme = if line.contains("https://") {
        "https"
    } else {
        "http"
    };
    let addr = line
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in banner {line:?}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
    });
    (child, addr, scheme)
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

/// Runs `ballast fsck` on a data directory (the server stopped): it must find it clean.
pub fn assert_fsck_clean(data: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("fsck")
        .arg(data)
        .output()
        .expect("fsck");
    assert!(
        out.status.success(),
        "fsck found problems: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `sha256:<hex>` of bytes.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes (the engine's one generator).
pub use ballast_engine::testdata::seeded;

/// A metric's value from `/metrics` (its first sample whose name and labels start so).
pub fn metric(r: &Registry, name: &str) -> f64 {
    let text =
        String::from_utf8(http::call("GET", &r.url("/metrics"), &[], None).body).expect("utf-8");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// True when a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pushes an image (a config and one layer of `len` bytes) to `repo:tag` with extra request
/// headers (credentials); returns the manifest's digest.
pub fn push_image_as(
    base: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    len: usize,
    headers: &[(&str, &str)],
) -> String {
    let (res, digest) = try_push_image_as(base, repo, tag, seed, len, headers);
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    digest
}

/// Uploads `data` to `repo` in one request (`POST …/blobs/uploads/?digest=D`): the answer,
/// and the blob's descriptor with media type `media`.
pub fn upload_blob(
    base: &str,
    repo: &str,
    data: &[u8],
    media: &str,
    headers: &[(&str, &str)],
) -> (http::Res, serde_json::Value) {
    let d = sha256(data);
    let res = http::call(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"),
        headers,
        Some(data),
    );
    let desc = serde_json::json!({"mediaType": media, "digest": d, "size": data.len()});
    (res, desc)
}

/// [`push_image_as`] that hands back the first answer that is not a success (a blob
/// upload's, or the manifest PUT's) with the manifest's digest.
pub fn try_push_image_as(
    base: &str,
    repo: &str,
    tag: &str,
    seed: u64,
    len: usize,
    headers: &[(&str, &str)],
) -> (http::Res, String) {
    use serde_json::json;
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = seeded(len, seed);
    let mut descs = Vec::new();
    for (data, media) in [
        (&config, "application/vnd.oci.image.config.v1+json"),
        (&layer, "application/vnd.oci.image.layer.v1.tar"),
    ] {
        let (res, desc) = upload_blob(base, repo, data, media, headers);
        if res.status != 201 {
            return (res, String::new());
        }
        descs.push(desc);
    }
    let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": descs[0], "layers": [descs[1]]});
    put_manifest(base, repo, tag, &m.to_string().into_bytes(), headers)
}

/// Puts OCI image manifest bytes at `repo:reference`: the answer and the manifest's digest.
pub fn put_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (http::Res, String) {
    let mut h = headers.to_vec();
    h.push(("Content-Type", "application/vnd.oci.image.manifest.v1+json"));
    let res = http::call(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &h,
        Some(body),
    );
    (res, sha256(body))
}
