//! The server's integration tests (one binary): HTTP behaviour, restarts, real clients.

mod clients;
mod http;
pub mod oci;
mod tools;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::Digest as _;

/// A `ballast serve` process on a free loopback port, stopped (SIGTERM) on drop.
pub struct Registry {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data: PathBuf,
    env: Vec<(String, String)>,
}

impl Registry {
    /// Starts a registry on a data directory.
    pub fn start(data: &Path) -> Registry {
        Self::start_with(data, &[])
    }

    /// Starts a registry with extra `BALLAST_*` environment settings.
    pub fn start_with(data: &Path, env: &[(&str, &str)]) -> Registry {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, addr) = spawn(data, &env);
        Registry {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
            env,
        }
    }

    /// Base URL.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
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

    /// Stops and starts again on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        let mut env = self.env.clone();
        env.push(("BALLAST_LISTEN".into(), self.addr.to_string()));
        let (child, addr) = spawn(&self.data, &env);
        assert_eq!(addr, self.addr);
        self.child = Some(child);
    }
}

fn spawn(data: &Path, env: &[(String, String)]) -> (Child, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ballast"));
    cmd.arg("serve").arg("--data").arg(data);
    if !env.iter().any(|(k, _)| k == "BALLAST_LISTEN") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("BALLAST_")) {
        cmd.env_remove(k);
    }
    cmd.env("BALLAST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ballast");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    lines.read_line(&mut line).expect("banner");
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in banner {line:?}"));
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
    });
    (child, addr)
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

/// `sha256:<hex>` of bytes.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes.
pub fn seeded(len: usize, seed: u64) -> Vec<u8> {
    // Distinct seeds give distinct streams (xorshift needs a non-zero state).
    let mut s = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03).max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// True when a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
