//! Webhooks: events recorded durably in the engine's outbox before the request that caused
//! them is answered, and delivered to each configured endpoint by a worker of its own, in
//! order, signed, with retries, until they are delivered or too old (then dead letters an
//! admin can list and redeliver). `event.rs` says what an event is and how it is sent,
//! `deliver.rs` sends them. docs/operations.md, "Webhooks".

mod deliver;
pub mod event;
pub mod offline;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use ballast_engine::outbox::{DeadLetter, Outbox};
use ballast_engine::Store;
use globset::GlobMatcher;
use serde::{Deserialize, Serialize};

pub use event::{Event, Kind};

use crate::error::ApiError;

/// How an endpoint wants its events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CloudEvents 1.0, structured JSON, one event a request.
    #[default]
    Cloudevents,
    /// CNCF Distribution's envelope (`{"events": [...]}`), one event a request.
    Distribution,
}

/// One `[[webhooks]]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique name (letters, digits, `-`, `_`; at most 64): the metrics, the dead letters
    /// and the outbox cursor know the endpoint by it.
    pub name: String,
    /// Where events are POSTed (http or https).
    pub url: String,
    /// The signing secret (or `secret_file`).
    #[serde(default)]
    pub secret: Option<String>,
    /// A file holding the signing secret (trailing newline ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Event kinds sent (default: every kind but `manifest.pulled`).
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Repository globs (as in policies); empty: every repository. Events without a
    /// repository (`gc.finished`) are sent whatever this says.
    #[serde(default)]
    pub repositories: Vec<String>,
    /// `cloudevents` (default) or `distribution`.
    #[serde(default)]
    pub format: Format,
    /// Seconds a delivery may take.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Extra request headers (an `Authorization` the receiver wants, say).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Retries go on until an event is this old; then it becomes a dead letter.
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// First retry delay in milliseconds; it doubles (with jitter) up to
    /// `retry_max_delay_secs`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial_ms: u64,
    /// Longest delay between retries.
    #[serde(default = "default_retry_max")]
    pub retry_max_delay_secs: u64,
    /// With `manifest.pulled` in `events`: the fraction of pulls sent (0 to 1).
    #[serde(default = "default_sample")]
    pub pull_sample: f64,
    /// A PEM file of CA certificates trusted for this endpoint, besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_events() -> Vec<String> {
    Kind::ALL
        .iter()
        .filter(|k| **k != Kind::ManifestPulled)
        .map(|k| k.name().to_owned())
        .collect()
}
fn default_timeout() -> u64 {
    10
}
fn default_max_age() -> u64 {
    24 * 3600
}
fn default_retry_initial() -> u64 {
    1000
}
fn default_retry_max() -> u64 {
    300
}
fn default_sample() -> f64 {
    1.0
}

/// An endpoint ready to deliver to.
pub struct Endpoint {
    /// Its config.
    pub cfg: WebhookConfig,
    kinds: HashSet<Kind>,
    repos: Vec<GlobMatcher>,
    secret: Vec<u8>,
    client: reqwest::Client,
    /// Woken when events are recorded.
    wake: tokio::sync::Notify,
    /// Deliveries that succeeded.
    pub delivered: AtomicU64,
    /// Attempts that failed (each retry counts).
    pub failed: AtomicU64,
    /// Events given up on (dead letters).
    pub dead: AtomicU64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.cfg.name)
            .finish()
    }
}

impl Endpoint {
    /// True when this endpoint takes events of `kind` about `repo`.
    pub fn wants(&self, kind: Kind, repo: Option<&str>) -> bool {
        self.kinds.contains(&kind)
            && match repo {
                Some(r) => self.repos.is_empty() || self.repos.iter().any(|g| g.is_match(r)),
                None => true,
            }
    }
}

/// Checks the `[[webhooks]]` tables and builds their endpoints; an error names the table
/// and what is wrong. Warnings for risky but working settings.
pub fn compile(cfgs: &[WebhookConfig]) -> anyhow::Result<(Vec<Endpoint>, Vec<String>)> {
    let mut names = HashSet::new();
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (i, c) in cfgs.iter().enumerate() {
        let at = || format!("[[webhooks]] #{} ({:?})", i + 1, c.name);
        if c.name.is_empty()
            || c.name.len() > 64
            || !c
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("{}: name must be 1 to 64 letters, digits, '-' or '_'", at());
        }
        if !names.insert(c.name.clone()) {
            bail!("{}: another endpoint has this name", at());
        }
        let url =
            reqwest::Url::parse(&c.url).with_context(|| format!("{}: url {:?}", at(), c.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            bail!("{}: url must be http:// or https:// with a host", at());
        }
        let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
        if url.scheme() == "http" && !loopback {
            warnings.push(format!(
                "{}: events go to {} in clear text (signed, but readable on the way)",
                at(),
                c.url
            ));
        }
        let secret = match (&c.secret, &c.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("{}: reading secret_file {}", at(), f.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            (Some(_), Some(_)) => bail!("{}: set secret or secret_file, not both", at()),
            (None, None) => bail!(
                "{}: a secret (or secret_file) is required: every delivery is signed with it",
                at()
            ),
        };
        if secret.len() < 16 {
            bail!(
                "{}: the secret must be at least 16 characters (e.g. `openssl rand -hex 32`)",
                at()
            );
        }
        let mut kinds = HashSet::new();
        for e in &c.events {
            let k = Kind::parse(e).with_context(|| {
                format!(
                    "{}: unknown event kind {e:?} (known: {})",
                    at(),
                    Kind::ALL.map(Kind::name).join(", ")
                )
            })?;
            kinds.insert(k);
        }
        let repos = crate::auth::repo_globs(&c.repositories, &at())?;
        if !(0.0..=1.0).contains(&c.pull_sample) {
            bail!("{}: pull_sample is a fraction from 0 to 1", at());
        }
        if c.timeout_secs == 0 || c.max_age_secs == 0 || c.retry_initial_ms == 0 {
            bail!(
                "{}: timeout_secs, max_age_secs and retry_initial_ms must be at least 1",
                at()
            );
        }
        for (k, v) in &c.headers {
            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .with_context(|| format!("{}: header name {k:?}", at()))?;
            reqwest::header::HeaderValue::from_str(v)
                .with_context(|| format!("{}: the value of header {k:?}", at()))?;
        }
        let mut client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(c.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ballast/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &c.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("{}: reading ca_file {}", at(), ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("{}: ca_file {} is not PEM certificates", at(), ca.display())
            })? {
                client = client.add_root_certificate(cert);
            }
        }
        let client = client
            .build()
            .with_context(|| format!("{}: building its HTTP client", at()))?;
        out.push(Endpoint {
            cfg: c.clone(),
            kinds,
            repos,
            secret: secret.into_bytes(),
            client,
            wake: tokio::sync::Notify::new(),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead: AtomicU64::new(0),
        });
    }
    Ok((out, warnings))
}

/// Which events a [`Subscriber`] wants recorded (kind, repository).
pub type Wants = Box<dyn Fn(Kind, Option<&str>) -> bool + Send + Sync>;

/// A reader of the outbox besides the webhook endpoints (a replication rule): its cursor's
/// name, which events it wants recorded, and how it is woken when some are.
pub struct Subscriber {
    /// The outbox cursor's name (not a webhook name: those have no `:`).
    pub consumer: String,
    /// True for the events it wants.
    pub wants: Wants,
    /// Woken when events are recorded.
    pub wake: Arc<tokio::sync::Notify>,
}

/// The server's webhooks: endpoints and the outbox (which also feeds the subscribers).
pub struct Webhooks {
    endpoints: Vec<Arc<Endpoint>>,
    subscribers: Vec<Subscriber>,
    outbox: Option<Outbox>,
    /// CloudEvents `source` and Distribution's `source.addr`/`request.host`.
    source: String,
    /// The registry's base URL, for Distribution's `target.url`.
    base_url: String,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("endpoints", &self.endpoints.len())
            .finish()
    }
}

/// One endpoint's state, for `GET /admin/webhooks` and the metrics.
#[derive(Clone, Debug, Serialize)]
pub struct EndpointStatus {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
    /// Events recorded that it has not had yet (some may not be for it).
    pub pending: u64,
    /// Age in seconds of the oldest of them.
    pub oldest_pending_secs: Option<u64>,
    /// Deliveries that succeeded since start.
    pub delivered: u64,
    /// Attempts that failed since start.
    pub failed_attempts: u64,
    /// Events given up on since start.
    pub dead_lettered: u64,
}

impl Webhooks {
    /// Opens the outbox when endpoints are configured (or when one exists from before, so
    /// its dead letters can be listed) and sets its consumers to the endpoints.
    pub fn open(
        store: &Store,
        endpoints: Vec<Endpoint>,
        subscribers: Vec<Subscriber>,
        bytes_max: u64,
        source: String,
        base_url: String,
    ) -> anyhow::Result<Webhooks> {
        let dir = ballast_engine::outbox::outbox_dir(store.dir());
        let outbox = if !endpoints.is_empty() || !subscribers.is_empty() || dir.exists() {
            let o = Outbox::open(store.storage().clone(), store.dir(), bytes_max)
                .with_context(|| format!("opening the webhook outbox {}", dir.display()))?;
            for w in o.open_warnings() {
                tracing::warn!("{w}");
            }
            let names: Vec<&str> = endpoints
                .iter()
                .map(|e| e.cfg.name.as_str())
                .chain(subscribers.iter().map(|s| s.consumer.as_str()))
                .collect();
            o.set_consumers(&names)
                .context("setting the webhook outbox's endpoints")?;
            Some(o)
        } else {
            None
        };
        Ok(Webhooks {
            endpoints: endpoints.into_iter().map(Arc::new).collect(),
            subscribers,
            outbox,
            source,
            base_url,
        })
    }

    /// The endpoints.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// True when some endpoint takes events of `kind` about `repo` (nothing is recorded
    /// otherwise).
    pub fn wanted(&self, kind: Kind, repo: Option<&str>) -> bool {
        self.endpoints.iter().any(|e| e.wants(kind, repo))
            || self.subscribers.iter().any(|s| (s.wants)(kind, repo))
    }

    /// The outbox, when open (the subscribers read it from their cursors).
    pub fn outbox(&self) -> Option<&Outbox> {
        self.outbox.as_ref()
    }

    /// Records events in the outbox (durably unless every one is a pull) and wakes the
    /// workers. Called before the request that caused them is answered: an error means the
    /// answer must not say the change succeeded without its event.
    pub fn record(&self, events: &[Event]) -> Result<(), ApiError> {
        let Some(outbox) = &self.outbox else {
            return Ok(());
        };
        let events: Vec<&Event> = events
            .iter()
            .filter(|e| self.wanted(e.kind, e.repository.as_deref()))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        let durable = events.iter().any(|e| e.kind != Kind::ManifestPulled);
        let bodies: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap_or_default())
            .collect();
        let records: Vec<(Option<&str>, &[u8])> =
            bodies.iter().map(|b| (None, b.as_slice())).collect();
        outbox
            .append(&records, crate::now_secs(), durable)
            .map_err(|e| {
                ApiError::Internal(format!(
                    "the change was stored but its event (webhooks, replication) could not be \
                     recorded ({e}); retry the request"
                ))
            })?;
        for ep in &self.endpoints {
            ep.wake.notify_one();
        }
        for s in &self.subscribers {
            s.wake.notify_one();
        }
        Ok(())
    }

    /// Starts one delivery worker per endpoint.
    pub fn start(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(outbox) = &self.outbox else {
            return Vec::new();
        };
        self.endpoints
            .iter()
            .map(|ep| {
                tokio::spawn(deliver::run(
                    outbox.clone(),
                    ep.clone(),
                    self.source.clone(),
                    self.base_url.clone(),
                ))
            })
            .collect()
    }

    /// Each endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = crate::now_secs();
        self.endpoints
            .iter()
            .map(|ep| {
                let name = ep.cfg.name.as_str();
                let (pending, oldest) = match &self.outbox {
                    Some(o) => {
                        let next = o.stats().next_seq;
                        let cursor = o.cursor(name).unwrap_or(next);
                        let oldest = o.oldest_pending(name).ok().flatten();
                        (
                            next.saturating_sub(cursor),
                            oldest.map(|at| now.saturating_sub(at)),
                        )
                    }
                    None => (0, None),
                };
                EndpointStatus {
                    name: name.to_owned(),
                    url: ep.cfg.url.clone(),
                    pending,
                    oldest_pending_secs: oldest,
                    delivered: ep.delivered.load(Ordering::Relaxed),
                    failed_attempts: ep.failed.load(Ordering::Relaxed),
                    dead_lettered: ep.dead.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The outbox's sizes (none without an outbox).
    pub fn outbox_stats(&self) -> Option<ballast_engine::outbox::OutboxStats> {
        self.outbox.as_ref().map(Outbox::stats)
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.outbox
            .as_ref()
            .map(Outbox::dead_letters)
            .unwrap_or_default()
    }

    /// Puts dead letters (all, or those with these ids) back for delivery to their
    /// endpoint; returns how many.
    pub fn redeliver(&self, ids: Option<&[u64]>) -> Result<usize, ApiError> {
        let Some(outbox) = &self.outbox else {
            return Ok(0);
        };
        let n = outbox
            .redeliver(ids, crate::now_secs())
            .map_err(ApiError::from)?;
        for ep in &self.endpoints {
            ep.wake.notify_one();
        }
        Ok(n)
    }
}

/// A dead letter as `GET /admin/webhooks/dead` and `ballast webhooks dead` show it.
pub fn dead_letter_json(d: &DeadLetter) -> serde_json::Value {
    let event: serde_json::Value =
        serde_json::from_slice(&d.entry.payload).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "id": d.entry.seq,
        "endpoint": d.consumer,
        "recorded_at": d.entry.at,
        "failed_at": d.failed_at,
        "reason": d.reason,
        "event": event,
    })
}
