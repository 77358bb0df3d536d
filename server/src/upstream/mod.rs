//! Pull-through cache: repositories under an upstream's prefix are copies of an upstream
//! registry's, filled when a pull asks for what is not held yet (docs/operations.md,
//! "Pull-through cache").
//!
//! - `mod.rs` (here): the `[[pull_through]]` config, which local repository maps to which
//!   upstream repository, the upstreams' counters, the refusal of writes to cached
//!   repositories.
//! - `manifest.rs`: manifest fills, tag re-checks after the TTL, offline mode.
//! - `blob.rs`: blob fills: one upstream fetch per blob, streamed to every client waiting
//!   for it while it arrives, verified before its last byte is sent.
//! - `delta.rs`: blob fills from an upstream Ballast by chunks: its recipe, then only the
//!   chunks this store lacks (docs/replication.md).
//! - `evict.rs`: eviction of cached images (not pulled for a while, bytes above a cap).
//!
//! Cached content is stored like pushed content (chunks deduplicate with everything else);
//! its manifests carry their `origin` (catalog format 4).

mod blob;
mod delta;
pub mod evict;
mod manifest;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ballast_engine::{names, Digest};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

pub use blob::serve_missing_blob;
pub use manifest::fill_manifest;

/// One `[[pull_through]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A short name (metrics, logs, the admin endpoint).
    pub name: String,
    /// The local namespace it fills: `cache/hub` holds `cache/hub/<repository>`.
    pub prefix: String,
    /// The upstream registry's base URL (`https://registry.example.com`).
    pub url: String,
    /// Prepended to the repository name upstream: with `library`, `cache/hub/alpine` is
    /// `library/alpine` upstream.
    #[serde(default)]
    pub repository_prefix: Option<String>,
    /// Credentials for the upstream (basic, or for its token service).
    #[serde(default)]
    pub username: Option<String>,
    /// The password (prefer `password_file`).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password (one line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for the upstream, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A tag is checked upstream again (a `HEAD`) when it was last checked this long ago.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl_secs: u64,
    /// Seconds to connect, and between two reads of an answer.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Fetch blobs from an upstream Ballast as the chunks this store lacks (found out at the
    /// first blob; other registries are read plainly).
    #[serde(default = "default_delta")]
    pub delta: bool,
    /// Cached images not pulled for this many days are evicted (none: kept).
    #[serde(default)]
    pub evict_unpulled_days: Option<u64>,
    /// Cached images past this many bytes are evicted, least recently pulled first (none:
    /// no cap).
    #[serde(default)]
    pub bytes_max: Option<u64>,
}

fn default_tag_ttl() -> u64 {
    300
}

fn default_timeout() -> u64 {
    30
}

fn default_delta() -> bool {
    true
}

/// One upstream, compiled.
pub struct Upstream {
    /// Its configuration.
    pub cfg: UpstreamConfig,
    /// The local prefix with a trailing `/`.
    local: String,
    /// The client.
    pub client: crate::remote::Client,
    /// Counters (metrics and the admin endpoint).
    pub counters: Counters,
    /// Whether the upstream answers delta fetches: 0 not known yet, 1 yes, 2 no.
    pub delta_support: std::sync::atomic::AtomicU8,
}

/// What an upstream counts.
#[derive(Default)]
pub struct Counters {
    /// Upstream requests by outcome (`ok` and [`crate::remote::Failure::outcome`]).
    pub requests: Mutex<HashMap<&'static str, u64>>,
    /// Bytes fetched (blob and manifest bodies).
    pub bytes: AtomicU64,
    /// Manifests and blobs stored from the upstream.
    pub manifest_fills: AtomicU64,
    /// (As above.)
    pub blob_fills: AtomicU64,
    /// Pulls answered from the cache because the upstream could not be asked.
    pub offline_serves: AtomicU64,
    /// Cached images evicted.
    pub evicted: AtomicU64,
    /// Blobs filled by delta (their recipe, then the chunks this store lacked).
    pub delta_blobs: AtomicU64,
    /// What those blobs weigh (what plain fetches would have read).
    pub delta_blob_bytes: AtomicU64,
    /// The last failure (Unix seconds, what) and when the upstream last answered.
    pub last_error: Mutex<Option<(u64, String)>>,
    /// (Unix seconds.)
    pub last_ok: AtomicU64,
}

impl Upstream {
    /// The repository upstream for a local one under the prefix.
    pub fn remote_name(&self, local: &str) -> String {
        let rest = local.strip_prefix(&self.local).unwrap_or(local);
        match &self.cfg.repository_prefix {
            Some(p) => format!("{}/{rest}", p.trim_end_matches('/')),
            None => rest.to_owned(),
        }
    }

    /// What a cached manifest's `origin` says.
    pub fn origin(&self, local: &str) -> String {
        format!(
            "{}/{}",
            self.cfg.url.trim_end_matches('/'),
            self.remote_name(local)
        )
    }

    /// Counts an upstream answer.
    pub fn count<T>(&self, r: &Result<T, crate::remote::Failure>) {
        let outcome = match r {
            Ok(_) => {
                self.counters
                    .last_ok
                    .store(crate::now_secs(), Ordering::Relaxed);
                "ok"
            }
            Err(f) => {
                if f != &crate::remote::Failure::NotFound {
                    *self.counters.last_error.lock() = Some((crate::now_secs(), f.to_string()));
                }
                f.outcome()
            }
        };
        *self.counters.requests.lock().entry(outcome).or_default() += 1;
    }

    /// Its status for `GET /admin/pull-through`.
    pub fn status(&self) -> serde_json::Value {
        let c = &self.counters;
        let last_error = c.last_error.lock().clone();
        serde_json::json!({
            "name": self.cfg.name,
            "prefix": self.cfg.prefix,
            "url": self.cfg.url,
            "requests": *c.requests.lock(),
            "bytes_fetched": c.bytes.load(Ordering::Relaxed),
            "manifests_fetched": c.manifest_fills.load(Ordering::Relaxed),
            "blobs_fetched": c.blob_fills.load(Ordering::Relaxed),
            "offline_serves": c.offline_serves.load(Ordering::Relaxed),
            "evicted_images": c.evicted.load(Ordering::Relaxed),
            "delta": match self.delta_support.load(Ordering::Relaxed) {
                _ if !self.cfg.delta => "off",
                1 => "in use",
                2 => "upstream does not take it",
                _ => "not tried yet",
            },
            "delta_blobs": c.delta_blobs.load(Ordering::Relaxed),
            "delta_blob_bytes": c.delta_blob_bytes.load(Ordering::Relaxed),
            "last_ok": match c.last_ok.load(Ordering::Relaxed) { 0 => None, t => Some(t) },
            "last_error": last_error.map(|(at, what)| serde_json::json!({"at": at, "error": what})),
        })
    }
}

/// The pull-through cache: its upstreams and what fills share.
pub struct PullThrough {
    upstreams: Vec<Arc<Upstream>>,
    /// When each cached tag (repository, tag) was last checked upstream.
    checked: Mutex<HashMap<(String, String), Instant>>,
    /// One fill at a time per manifest reference: later pulls wait for it, then find it.
    manifest_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Blob fetches in flight, by repository and digest.
    flights: Mutex<HashMap<(String, Digest), Arc<blob::Flight>>>,
    /// Where blobs in flight are spooled for the clients that wait for them.
    spool_dir: PathBuf,
}

/// Checks the `[[pull_through]]` tables and builds their clients.
pub fn compile(configs: &[UpstreamConfig]) -> anyhow::Result<Vec<Arc<Upstream>>> {
    let mut out: Vec<Arc<Upstream>> = Vec::new();
    for c in configs {
        let at = || format!("pull_through {:?}", c.name);
        if c.name.is_empty() || c.name.len() > 64 {
            bail!("a [[pull_through]] table needs a name (1 to 64 characters)");
        }
        if out.iter().any(|u| u.cfg.name == c.name) {
            bail!("{}: the name is used twice", at());
        }
        let prefix = c.prefix.trim_matches('/');
        names::validate_repo(prefix).map_err(|e| {
            anyhow::anyhow!(
                "{}: prefix {:?} is not a repository namespace: {e}",
                at(),
                c.prefix
            )
        })?;
        let local = format!("{prefix}/");
        if let Some(o) = out
            .iter()
            .find(|u| local.starts_with(&u.local) || u.local.starts_with(&local))
        {
            bail!(
                "{}: prefix {:?} overlaps pull_through {:?}'s {:?}",
                at(),
                c.prefix,
                o.cfg.name,
                o.cfg.prefix
            );
        }
        if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
            bail!(
                "{}: url {:?} must start with http:// or https://",
                at(),
                c.url
            );
        }
        if c.timeout_secs == 0 {
            bail!("{}: timeout_secs must be at least 1", at());
        }
        if c.bytes_max == Some(0) {
            bail!(
                "{}: bytes_max must be at least 1 (leave it out for no cap)",
                at()
            );
        }
        let password = crate::remote::password(
            &at(),
            c.username.as_deref(),
            c.password.as_deref(),
            c.password_file.as_deref(),
        )?;
        let client = crate::remote::Client::new(crate::remote::Options {
            what: &at(),
            url: &c.url,
            username: c.username.clone(),
            password,
            ca_file: c.ca_file.as_deref(),
            timeout_secs: c.timeout_secs,
        })?;
        out.push(Arc::new(Upstream {
            cfg: UpstreamConfig {
                prefix: prefix.to_owned(),
                ..c.clone()
            },
            local,
            client,
            counters: Counters::default(),
            delta_support: std::sync::atomic::AtomicU8::new(0),
        }));
    }
    Ok(out)
}

impl PullThrough {
    /// The pull-through cache of a data directory (spooled blobs of a crash are removed).
    pub fn new(upstreams: Vec<Arc<Upstream>>, data: &std::path::Path) -> anyhow::Result<Self> {
        let spool_dir = data.join("pull-through");
        if spool_dir.exists() {
            std::fs::remove_dir_all(&spool_dir)
                .with_context(|| format!("clearing {}", spool_dir.display()))?;
        }
        if !upstreams.is_empty() {
            std::fs::create_dir_all(&spool_dir)
                .with_context(|| format!("creating {}", spool_dir.display()))?;
        }
        Ok(PullThrough {
            upstreams,
            checked: Mutex::new(HashMap::new()),
            manifest_locks: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            spool_dir,
        })
    }

    /// The upstreams.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// The upstream a repository is a cache of.
    pub fn upstream_for(&self, repo: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| repo.starts_with(&u.local))
    }

    /// Refuses a change a client asks for in a cached repository (it holds the upstream's
    /// content; only eviction and admins' deletes change it).
    pub fn refuse_writes(&self, repo: &str) -> Result<(), ApiError> {
        match self.upstream_for(repo) {
            Some(u) => Err(ApiError::Denied(format!(
                "repository {repo} is a pull-through cache of {} (pull_through {:?}): it is \
                 read-only; push to the upstream instead",
                u.origin(repo),
                u.cfg.name
            ))),
            None => Ok(()),
        }
    }

    /// The lock one manifest reference's fill holds.
    fn manifest_lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.manifest_locks.lock();
        // (Locks nobody holds or waits for are dropped as the map grows.)
        if locks.len() > 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key).or_default().clone()
    }
}
