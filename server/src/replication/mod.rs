//! Push replication: rules that copy repositories (and chosen tags) to another registry as
//! they change, and reconcile periodically (docs/operations.md, "Replication").
//!
//! - `mod.rs` (here): the `[[replication]]` config, the compiled rules and their counters,
//!   the outbox subscriptions.
//! - `copy.rs`: copying a manifest with what it references (index children, blobs, the
//!   referrers of it) and deleting; what the target has is not sent again.
//! - `delta.rs`: a blob sent as the chunks the target lacks and its recipe, when the target
//!   is a Ballast (docs/replication.md).
//! - `worker.rs`: each rule's worker, which follows the durable outbox (so a change is
//!   replicated after a restart or a kill -9), and its periodic reconciliation.

mod copy;
mod delta;
mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use globset::GlobMatcher;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::webhooks::{Kind, Subscriber};

pub use worker::{reconcile_now, start};

/// One `[[replication]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// A short name (letters, digits, `-`, `_`): metrics, logs, the admin endpoint, the
    /// outbox cursor.
    pub name: String,
    /// The target registry's base URL.
    pub url: String,
    /// Source repository globs (as in policies); empty: every repository.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// Tag globs (`v*`, `release-*`); empty: every tag.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Prepended to the repository name on the target: with `dr`, `team-a/api` goes to
    /// `dr/team-a/api`.
    #[serde(default)]
    pub target_prefix: Option<String>,
    /// Replicate deletes of tags and manifests too.
    #[serde(default)]
    pub delete: bool,
    /// Send blobs as the chunks the target lacks when it is a Ballast (found out at the
    /// first blob; other registries get plain uploads).
    #[serde(default = "default_delta")]
    pub delta: bool,
    /// Credentials on the target (basic, or for its token service).
    #[serde(default)]
    pub username: Option<String>,
    /// The password (prefer `password_file`).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for the target, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds to connect, and between two reads of an answer.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Seconds between reconciliations (tag lists and digests compared; 0: only at start
    /// and on request).
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_secs: u64,
    /// First retry delay in milliseconds; doubles (with jitter) up to
    /// `retry_max_delay_secs`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_ms: u64,
    /// Longest delay between retries.
    #[serde(default = "default_retry_max")]
    pub retry_max_delay_secs: u64,
}

fn default_timeout() -> u64 {
    30
}

fn default_delta() -> bool {
    true
}

fn default_reconcile() -> u64 {
    3600
}

fn default_retry_initial() -> u64 {
    1000
}

fn default_retry_max() -> u64 {
    300
}

/// What a rule counts (metrics, `GET /admin/replication`).
#[derive(Default)]
pub struct Counters {
    /// Manifests put on the target (tags and digests).
    pub manifests: AtomicU64,
    /// Blobs uploaded.
    pub blobs: AtomicU64,
    /// Blobs mounted on the target from another of its repositories.
    pub mounted: AtomicU64,
    /// Blobs the target had already.
    pub skipped: AtomicU64,
    /// Blob bytes uploaded.
    pub bytes: AtomicU64,
    /// Deletes replicated.
    pub deletes: AtomicU64,
    /// Blobs sent by delta (chunks the target lacked, then the recipe).
    pub delta_blobs: AtomicU64,
    /// Bytes those took on the wire (chunk frames and recipes).
    pub delta_bytes: AtomicU64,
    /// What those blobs weigh (what plain uploads would have sent).
    pub delta_blob_bytes: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failures: AtomicU64,
    /// Unix seconds of the last replicated change.
    pub last_success: AtomicU64,
    /// The last failure: when and what.
    pub last_error: Mutex<Option<(u64, String)>>,
    /// Reconciliations run, and what the last one found to copy or delete.
    pub reconciliations: AtomicU64,
    /// (As above.)
    pub last_reconcile: Mutex<Option<serde_json::Value>>,
}

/// One rule, compiled.
pub struct Rule {
    /// Its config.
    pub cfg: ReplicationConfig,
    repos: Vec<GlobMatcher>,
    tags: Vec<globset::GlobMatcher>,
    /// The target's client.
    pub client: crate::remote::Client,
    /// Counters.
    pub counters: Counters,
    /// Woken when events are recorded.
    wake: Arc<tokio::sync::Notify>,
    /// Where a blob was last seen on the target (digest → target repository), for
    /// cross-repository mounts.
    seen: Mutex<HashMap<ballast_engine::Digest, String>>,
    /// Whether the target takes delta uploads: 0 not known yet, 1 yes, 2 no.
    delta_support: std::sync::atomic::AtomicU8,
}

impl Rule {
    /// The outbox cursor's name.
    pub fn consumer(&self) -> String {
        format!("replication:{}", self.cfg.name)
    }

    /// True when the rule covers the repository.
    pub fn covers(&self, repo: &str) -> bool {
        self.repos.is_empty() || self.repos.iter().any(|g| g.is_match(repo))
    }

    /// True when the rule covers the tag.
    pub fn covers_tag(&self, tag: &str) -> bool {
        self.tags.is_empty() || self.tags.iter().any(|g| g.is_match(tag))
    }

    /// The repository on the target.
    pub fn target(&self, repo: &str) -> String {
        match &self.cfg.target_prefix {
            Some(p) => format!("{}/{repo}", p.trim_matches('/')),
            None => repo.to_owned(),
        }
    }

    fn wants(&self, kind: Kind, repo: Option<&str>) -> bool {
        let kinds: &[Kind] = if self.cfg.delete {
            &[
                Kind::TagSet,
                Kind::ManifestPushed,
                Kind::TagDeleted,
                Kind::ManifestDeleted,
            ]
        } else {
            &[Kind::TagSet, Kind::ManifestPushed]
        };
        kinds.contains(&kind) && repo.is_some_and(|r| self.covers(r))
    }

    /// Notes a failure.
    fn failed(&self, what: String) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        *self.counters.last_error.lock() = Some((crate::now_secs(), what));
    }

    /// Its state for `GET /admin/replication` (`pending`, `oldest_pending_secs`: from the
    /// outbox).
    pub fn status(&self, outbox: Option<&ballast_engine::outbox::Outbox>) -> serde_json::Value {
        let c = &self.counters;
        let now = crate::now_secs();
        let consumer = self.consumer();
        let (pending, oldest) = match outbox {
            Some(o) => {
                let next = o.stats().next_seq;
                let cursor = o.cursor(&consumer).unwrap_or(next);
                let oldest = o
                    .oldest_pending(&consumer)
                    .ok()
                    .flatten()
                    .map(|at| now.saturating_sub(at));
                (next.saturating_sub(cursor), oldest)
            }
            None => (0, None),
        };
        let last_error = c.last_error.lock().clone();
        serde_json::json!({
            "name": self.cfg.name,
            "url": self.cfg.url,
            "pending_events": pending,
            "lag_secs": oldest.unwrap_or(0),
            "manifests_copied": c.manifests.load(Ordering::Relaxed),
            "blobs_uploaded": c.blobs.load(Ordering::Relaxed),
            "blobs_mounted": c.mounted.load(Ordering::Relaxed),
            "blobs_already_there": c.skipped.load(Ordering::Relaxed),
            "bytes_uploaded": c.bytes.load(Ordering::Relaxed),
            "deletes": c.deletes.load(Ordering::Relaxed),
            "delta": match self.delta_support.load(Ordering::Relaxed) {
                _ if !self.cfg.delta => "off",
                1 => "in use",
                2 => "target does not take it",
                _ => "not tried yet",
            },
            "delta_blobs": c.delta_blobs.load(Ordering::Relaxed),
            "delta_bytes_sent": c.delta_bytes.load(Ordering::Relaxed),
            "delta_blob_bytes": c.delta_blob_bytes.load(Ordering::Relaxed),
            "failed_attempts": c.failures.load(Ordering::Relaxed),
            "last_success": match c.last_success.load(Ordering::Relaxed) { 0 => None, t => Some(t) },
            "last_error": last_error.map(|(at, e)| serde_json::json!({"at": at, "error": e})),
            "reconciliations": c.reconciliations.load(Ordering::Relaxed),
            "last_reconcile": c.last_reconcile.lock().clone(),
        })
    }
}

/// Checks the `[[replication]]` tables and builds their clients.
pub fn compile(configs: &[ReplicationConfig]) -> anyhow::Result<Vec<Arc<Rule>>> {
    let mut out: Vec<Arc<Rule>> = Vec::new();
    for c in configs {
        let at = format!("replication {:?}", c.name);
        if c.name.is_empty()
            || c.name.len() > 64
            || !c
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            bail!("{at}: a name is 1 to 64 letters, digits, - and _");
        }
        if out.iter().any(|r| r.cfg.name == c.name) {
            bail!("{at}: the name is used twice");
        }
        if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
            bail!("{at}: url {:?} must start with http:// or https://", c.url);
        }
        if c.timeout_secs == 0 {
            bail!("{at}: timeout_secs must be at least 1");
        }
        if let Some(p) = &c.target_prefix {
            ballast_engine::names::validate_repo(p.trim_matches('/')).map_err(|e| {
                anyhow::anyhow!("{at}: target_prefix {p:?} is not a repository namespace: {e}")
            })?;
        }
        let repos = crate::auth::repo_globs(&c.repositories, &at)?;
        let tags = c
            .tags
            .iter()
            .map(|t| {
                globset::Glob::new(t)
                    .map(|g| g.compile_matcher())
                    .with_context(|| format!("{at}: tag pattern {t:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let password = crate::remote::password(
            &at,
            c.username.as_deref(),
            c.password.as_deref(),
            c.password_file.as_deref(),
        )?;
        let client = crate::remote::Client::new(crate::remote::Options {
            what: &at,
            url: &c.url,
            username: c.username.clone(),
            password,
            ca_file: c.ca_file.as_deref(),
            timeout_secs: c.timeout_secs,
        })?;
        out.push(Arc::new(Rule {
            cfg: c.clone(),
            repos,
            tags,
            client,
            counters: Counters::default(),
            wake: Arc::default(),
            seen: Mutex::new(HashMap::new()),
            delta_support: std::sync::atomic::AtomicU8::new(0),
        }));
    }
    Ok(out)
}

/// The outbox subscriptions of the rules.
pub fn subscribers(rules: &[Arc<Rule>]) -> Vec<Subscriber> {
    rules
        .iter()
        .map(|r| {
            let rule = r.clone();
            Subscriber {
                consumer: r.consumer(),
                wants: Box::new(move |kind, repo| rule.wants(kind, repo)),
                wake: r.wake.clone(),
            }
        })
        .collect()
}
