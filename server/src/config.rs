//! Configuration: embedded defaults, then a TOML file, then `BALLAST_*` environment
//! variables, then command-line flags (each beats the one before).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The server's settings.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
    /// Seconds a client may take to send a request's headers.
    pub header_timeout_secs: u64,
    /// Seconds a request body may stall without a byte arriving.
    pub body_idle_timeout_secs: u64,
    /// A request body arriving slower than this many bytes a second, measured over
    /// `body_rate_window_secs`, is cut with a 408 (0: only stalls are cut).
    pub body_min_bytes_per_sec: u64,
    /// The window over which `body_min_bytes_per_sec` is measured.
    pub body_rate_window_secs: u64,
    /// Seconds an upload session may stay unfinished before it is removed.
    pub upload_max_age_secs: u64,
    /// Open upload sessions in all (0: no bound); past it a new session gets 429.
    pub upload_sessions_max: usize,
    /// Open upload sessions one client may hold (an account, or an address when
    /// anonymous; 0: no bound).
    pub upload_sessions_per_client_max: usize,
    /// Bytes one upload session may receive (0: no bound).
    pub upload_session_bytes_max: u64,
    /// Bytes all open upload sessions together may hold (0: no bound).
    pub upload_bytes_max: u64,
    /// Pushes are refused (507) while the data directory's file system has fewer free
    /// bytes than this, so deletes and garbage collection always have room; /healthz warns
    /// below twice as much. 0: no floor.
    pub disk_free_min_bytes: u64,
    /// Seconds in-flight requests get to finish at shutdown.
    pub shutdown_grace_secs: u64,
    /// Largest manifest accepted, in bytes.
    pub manifest_bytes_max: usize,
    /// Segment size of the storage engine, in bytes.
    pub segment_bytes_max: u64,
    /// Check every chunk read from disk against its BLAKE3 id before serving it (besides
    /// the record CRC, which is always checked).
    pub verify_chunks: bool,
    /// With `verify_chunks`: a chunk verified less than this many milliseconds ago at the
    /// same place is served without hashing it again (many clients pulling one image at
    /// once). 0: hash every read.
    pub verify_reuse_ms: u64,
    /// How pulls and compaction read ahead of what they send or copy: `advise` (page-cache
    /// read-ahead hints), `uring` (reads at queue depth through io_uring) or `off`.
    pub read_ahead: ballast_engine::ReadAhead,
    /// Send raw chunks of sealed segments over plain-HTTP connections with `sendfile` (from
    /// the page cache, without copying them through the server); TLS connections always
    /// copy. Off: every body is written from memory.
    pub sendfile: bool,
    /// Seconds between scheduled garbage collections (0: never on a schedule).
    pub gc_interval_secs: u64,
    /// Blob links, manifests and segments younger than this are never collected.
    pub gc_grace_secs: u64,
    /// Scheduled collections also remove manifests that no tag reaches.
    pub gc_delete_untagged: bool,
    /// A collection compacts a segment when at least this fraction of it is dead (half as
    /// much for segments older than a week): lower frees more, by copying more live data.
    pub gc_min_dead_fraction: f64,
    /// While pushes run, a collection copies live data at most this many MiB a second (0:
    /// never paced); without pushes it copies at full speed.
    pub gc_pace_mb_per_sec: u64,
    /// Collections fold sealed segments smaller than this many MiB together once there are
    /// a few (0: never); unset: an eighth of `segment_bytes_max` with `[bucket]` (which seals
    /// a segment per checkpoint), never without.
    pub gc_fold_below_mb: Option<u64>,
    /// Log filter (tracing `EnvFilter` syntax).
    pub log: String,
    /// TLS certificate chain (PEM). With `tls_key`, the server speaks HTTPS (HTTP/1.1 and
    /// HTTP/2 by ALPN).
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP on an address other than loopback (credentials and tokens then
    /// cross the network in clear text).
    pub insecure_plain_http: bool,
    /// Audit log file (default `<data>/audit/audit.log`).
    pub audit_log: Option<PathBuf>,
    /// Size at which the audit log is rotated, in bytes.
    pub audit_log_bytes_max: u64,
    /// Rotated audit log files kept.
    pub audit_log_keep: u32,
    /// Count requests and serve `/metrics` (Prometheus text format; the `admin` permission
    /// when auth is on).
    pub metrics: bool,
    /// Also serve `/metrics`, and only that, without auth on this address (for a Prometheus
    /// on a private network or loopback).
    pub metrics_listen: Option<SocketAddr>,
    /// The registry's URL as clients reach it (`https://registry.example.com`), for the
    /// URLs and source in webhook events (default: from `listen`).
    pub public_url: Option<String>,
    /// Count manifest pulls (per manifest: how many, the last) for retention rules.
    pub pull_tracking: bool,
    /// Serve the web console under `/ui/` on the registry's listener.
    pub console: bool,
    /// Seconds a console session may stay unused before it must sign in again.
    pub console_idle_secs: u64,
    /// Seconds a console session lasts at most, used or not.
    pub console_session_max_secs: u64,
    /// Seconds between commits of the pulls counted in memory (a crash loses at most this
    /// long's counts).
    pub pull_flush_secs: u64,
    /// Quotas per namespace (`[[quotas]]` tables).
    pub quotas: Vec<crate::governance::QuotaRule>,
    /// Retention (`[retention]`, `[[retention.rules]]`).
    pub retention: crate::governance::RetentionConfig,
    /// Tag immutability rules (`[[immutable_tags]]` tables).
    pub immutable_tags: Vec<crate::governance::ImmutableTagRule>,
    /// Webhook endpoints (`[[webhooks]]` tables).
    pub webhooks: Vec<crate::webhooks::WebhookConfig>,
    /// Pull-through cache upstreams (`[[pull_through]]` tables).
    pub pull_through: Vec<crate::upstream::UpstreamConfig>,
    /// Replication rules (`[[replication]]` tables).
    pub replication: Vec<crate::replication::ReplicationConfig>,
    /// Bytes the webhook outbox may take; past it the oldest events go, delivered or not.
    pub webhook_outbox_bytes_max: u64,
    /// Segments and catalog shipped to an S3-compatible store (`[bucket]`; none when absent).
    pub bucket: Option<ballast_bucket::BucketConfig>,
    /// Authentication and authorization (`[auth]` in the config file).
    pub auth: AuthConfig,
}

/// The `[auth]` table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require credentials (or an anonymous grant) for every request.
    pub enabled: bool,
    /// htpasswd file of users (bcrypt hashes: `htpasswd -B` or `ballast passwd`).
    pub htpasswd: Option<PathBuf>,
    /// Robot accounts file (default `<data>/auth/robots.json`, managed by `ballast robot`).
    pub robots: Option<PathBuf>,
    /// Token signing key, created on first start (default `<data>/auth/token.key`).
    pub token_key: Option<PathBuf>,
    /// Token endpoint URL sent in challenges (default: this server's `/token`, from the
    /// request's Host and the listener's scheme; set it behind a proxy).
    pub realm: Option<String>,
    /// Service name: the tokens' audience.
    pub service: String,
    /// The tokens' issuer.
    pub issuer: String,
    /// Seconds a token is valid.
    pub token_ttl_secs: u64,
    /// Failed logins (per client address, per account) before a lockout.
    pub login_failures_max: u32,
    /// First lockout, in seconds; it doubles with every further failure (up to 15 min).
    pub login_lockout_secs: u64,
    /// Groups: name → members (`user:NAME`, `robot:NAME`).
    pub groups: BTreeMap<String, Vec<String>>,
    /// Rules (`[[auth.policy]]`); nothing is allowed that no rule grants.
    pub policy: Vec<crate::auth::Rule>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            htpasswd: None,
            robots: None,
            token_key: None,
            realm: None,
            service: "ballast".into(),
            issuer: "ballast".into(),
            token_ttl_secs: 300,
            login_failures_max: 5,
            login_lockout_secs: 30,
            groups: BTreeMap::new(),
            policy: Vec::new(),
        }
    }
}

/// Default age at which unfinished upload sessions are removed (the server's
/// `upload_max_age_secs` and `ballast gc --upload-max-age`).
pub const UPLOAD_MAX_AGE_SECS_DEFAULT: u64 = 24 * 3600;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            data: PathBuf::from("./ballast-data"),
            header_timeout_secs: 30,
            body_idle_timeout_secs: 60,
            body_min_bytes_per_sec: 1024,
            body_rate_window_secs: 30,
            upload_max_age_secs: UPLOAD_MAX_AGE_SECS_DEFAULT,
            upload_sessions_max: 1000,
            upload_sessions_per_client_max: 64,
            upload_session_bytes_max: 64 << 30,
            upload_bytes_max: 0,
            disk_free_min_bytes: 1 << 30,
            shutdown_grace_secs: 30,
            manifest_bytes_max: 4 << 20,
            segment_bytes_max: 64 << 20,
            verify_chunks: true,
            verify_reuse_ms: 1000,
            read_ahead: ballast_engine::ReadAhead::default(),
            sendfile: true,
            gc_interval_secs: 3600,
            gc_grace_secs: 3600,
            gc_delete_untagged: false,
            gc_min_dead_fraction: 0.5,
            gc_pace_mb_per_sec: ballast_engine::gc::PACE_BYTES_PER_SEC >> 20,
            gc_fold_below_mb: None,
            log: "info".into(),
            tls_cert: None,
            tls_key: None,
            insecure_plain_http: false,
            audit_log: None,
            audit_log_bytes_max: 64 << 20,
            audit_log_keep: 10,
            metrics: true,
            metrics_listen: None,
            public_url: None,
            webhooks: Vec::new(),
            pull_through: Vec::new(),
            replication: Vec::new(),
            bucket: None,
            immutable_tags: Vec::new(),
            retention: crate::governance::RetentionConfig::default(),
            quotas: Vec::new(),
            pull_tracking: true,
            console: true,
            console_idle_secs: 1800,
            console_session_max_secs: 12 * 3600,
            pull_flush_secs: 60,
            webhook_outbox_bytes_max: 256 << 20,
            auth: AuthConfig::default(),
        }
    }
}

/// The names of the settings, as in the config file.
pub const SETTINGS: &[&str] = &[
    "listen",
    "data",
    "header_timeout_secs",
    "body_idle_timeout_secs",
    "body_min_bytes_per_sec",
    "body_rate_window_secs",
    "upload_max_age_secs",
    "upload_sessions_max",
    "upload_sessions_per_client_max",
    "upload_session_bytes_max",
    "upload_bytes_max",
    "disk_free_min_bytes",
    "shutdown_grace_secs",
    "manifest_bytes_max",
    "segment_bytes_max",
    "verify_chunks",
    "verify_reuse_ms",
    "read_ahead",
    "sendfile",
    "gc_interval_secs",
    "gc_grace_secs",
    "gc_delete_untagged",
    "gc_min_dead_fraction",
    "gc_pace_mb_per_sec",
    "gc_fold_below_mb",
    "log",
    "tls_cert",
    "tls_key",
    "insecure_plain_http",
    "audit_log",
    "audit_log_bytes_max",
    "audit_log_keep",
    "metrics",
    "metrics_listen",
    "public_url",
    "pull_tracking",
    "console",
    "console_idle_secs",
    "console_session_max_secs",
    "pull_flush_secs",
    "webhook_outbox_bytes_max",
];

impl Config {
    /// Timeout for request headers.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    /// Idle timeout for request bodies.
    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.body_idle_timeout_secs)
    }

    /// How slowly a request body may arrive, starting now.
    pub fn body_pace(&self) -> crate::body::Pace {
        crate::body::Pace::new(
            self.body_idle_timeout(),
            self.body_min_bytes_per_sec,
            Duration::from_secs(self.body_rate_window_secs.max(1)),
        )
    }

    /// The bounds on open upload sessions.
    pub fn upload_limits(&self) -> ballast_engine::uploads::UploadLimits {
        ballast_engine::uploads::UploadLimits {
            sessions_max: self.upload_sessions_max,
            sessions_per_client_max: self.upload_sessions_per_client_max,
            session_bytes_max: self.upload_session_bytes_max,
            bytes_max: self.upload_bytes_max,
        }
    }

    /// The registry's URL as clients reach it.
    pub fn base_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => format!(
                "{}://{}",
                if self.tls() { "https" } else { "http" },
                self.listen
            ),
        }
    }

    /// True when the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Bytes below which collections fold sealed segments together (`gc_fold_below_mb`).
    pub fn gc_fold_below_bytes(&self) -> u64 {
        match self.gc_fold_below_mb {
            Some(mb) => mb << 20,
            None if self.bucket.is_some() => self.segment_bytes_max / 8,
            None => 0,
        }
    }

    /// True for a read replica (`role = "replica"` in `[bucket]`).
    pub fn is_replica(&self) -> bool {
        self.bucket
            .as_ref()
            .is_some_and(|b| b.role == ballast_bucket::Role::Replica)
    }

    /// The storage engine's options these settings ask for.
    pub fn engine_options(&self) -> ballast_engine::Options {
        ballast_engine::Options {
            segment_bytes_max: self.segment_bytes_max,
            verify_chunk_ids: self.verify_chunks,
            verify_reuse: Duration::from_millis(self.verify_reuse_ms),
            read_ahead: self.read_ahead,
            free_bytes_min: self.disk_free_min_bytes,
            follower: self.is_replica(),
            ..ballast_engine::Options::default()
        }
    }

    /// The audit log's path.
    pub fn audit_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| default_audit_path(&self.data))
    }

    /// The robots file's path.
    pub fn robots_path(&self) -> PathBuf {
        self.auth
            .robots
            .clone()
            .unwrap_or_else(|| default_robots_path(&self.data))
    }

    /// The token key's path.
    pub fn token_key_path(&self) -> PathBuf {
        self.auth
            .token_key
            .clone()
            .unwrap_or_else(|| self.data.join("auth").join("token.key"))
    }

    /// Refuses unsafe or incomplete settings; returns warnings for merely risky ones.
    pub fn check(&self) -> anyhow::Result<Vec<String>> {
        let mut warnings = Vec::new();
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("tls_cert and tls_key go together: set both for HTTPS, or neither");
        }
        let loopback = self.listen.ip().is_loopback();
        if !loopback && !self.tls() {
            if !self.insecure_plain_http {
                bail!(
                    "refusing plain HTTP on {}: set tls_cert and tls_key, or listen on \
                     127.0.0.1, or set insecure_plain_http = true to accept that passwords \
                     and images cross the network unencrypted",
                    self.listen
                );
            }
            warnings.push(format!(
                "plain HTTP on {} (insecure_plain_http): credentials and tokens cross the \
                 network in clear text",
                self.listen
            ));
        }
        if !loopback && !self.auth.enabled {
            warnings.push(format!(
                "authentication is off: anyone who can reach {} may push and delete",
                self.listen
            ));
        }
        if self.console && (self.console_idle_secs == 0 || self.console_session_max_secs == 0) {
            bail!(
                "console_idle_secs and console_session_max_secs must be above 0 (to turn the \
                 console off, set console = false)"
            );
        }
        if let Some(m) = self.metrics_listen {
            if !self.metrics {
                bail!("metrics_listen is set but metrics = false: remove one of them");
            }
            if m == self.listen {
                bail!("metrics_listen is the same address as listen ({m}): choose another port");
            }
            if !m.ip().is_loopback() {
                warnings.push(format!(
                    "metrics_listen on {m} serves /metrics without auth to anyone who can reach \
                     it (store sizes and request counts, no repository names)"
                ));
            }
        }
        crate::governance::ImmutableRules::compile(&self.immutable_tags)?;
        crate::governance::Retention::compile(&self.retention)?;
        crate::governance::quota::compile_rules(&self.quotas)?;
        let (_, hook_warnings) = crate::webhooks::compile(&self.webhooks)?;
        warnings.extend(hook_warnings);
        crate::upstream::compile(&self.pull_through)?;
        crate::replication::compile(&self.replication)?;
        if let Some(b) = &self.bucket {
            warnings.extend(b.check()?);
        }
        if self.is_replica() {
            if !self.pull_through.is_empty() {
                bail!(
                    "[[pull_through]] on a read replica: a replica stores nothing of its own \
                     (configure the pull-through cache on the primary)"
                );
            }
            if !self.replication.is_empty() {
                bail!(
                    "[[replication]] on a read replica: replication runs on the primary, \
                     which holds the content"
                );
            }
            if !self.retention.rules.is_empty() {
                warnings.push(
                    "retention rules do nothing on a read replica: they run on the primary, \
                     and the replica follows what they leave"
                        .into(),
                );
            }
        }
        if self.pull_flush_secs == 0 {
            bail!("pull_flush_secs must be at least 1");
        }
        if let Some(u) = &self.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("public_url {u:?} must start with http:// or https://");
            }
        }
        if !(0.0..=1.0).contains(&self.gc_min_dead_fraction) {
            bail!(
                "gc_min_dead_fraction is {}: it is a fraction of a segment, from 0 (compact \
                 any segment with dead bytes) to 1 (only wholly dead ones)",
                self.gc_min_dead_fraction
            );
        }
        if let Some(mb) = self.gc_fold_below_mb {
            if mb.saturating_mul(1 << 20) > self.segment_bytes_max / 2 {
                bail!(
                    "gc_fold_below_mb is {mb}: folding copies every segment below it at every \
                     collection, so it must be at most half of segment_bytes_max ({} MiB); an \
                     eighth of it is the default with [bucket]",
                    self.segment_bytes_max >> 20
                );
            }
        }
        if self.auth.enabled {
            crate::auth::Policy::compile(&self.auth.policy, &self.auth.groups)
                .context("[auth] policy")?;
            if self.auth.token_ttl_secs == 0 {
                bail!("[auth] token_ttl_secs must be at least 1");
            }
            if !loopback && self.auth.realm.is_none() {
                bail!(
                    "[auth] realm is required when listening on {} (not loopback): set it to \
                     the public URL of this server's token endpoint, e.g. realm = \
                     \"https://registry.example.com/token\"; without it the realm would be \
                     built from each request's Host header, which the client chooses",
                    self.listen
                );
            }
        }
        Ok(warnings)
    }

    /// Builds the effective config: defaults, then `file`, then the environment.
    pub fn load(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Config::default(),
        };
        for (key, value) in env {
            let Some(name) = key.strip_prefix("BALLAST_") else {
                continue;
            };
            let name = name.to_ascii_lowercase();
            if !SETTINGS.contains(&name.as_str()) {
                // Other tools share the prefix (BALLAST_BENCH_*); a typo still gets a word.
                eprintln!("warning: ignoring environment variable {key}: not a server setting");
                continue;
            }
            config
                .set(&name, &value)
                .with_context(|| format!("environment variable {key}"))?;
        }
        Ok(config)
    }

    /// Sets one field by its config name.
    pub fn set(&mut self, name: &str, value: &str) -> anyhow::Result<()> {
        fn num<T: std::str::FromStr>(v: &str) -> anyhow::Result<T>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e| anyhow::anyhow!("{v:?} is not a valid number: {e}"))
        }
        fn boolean(v: &str) -> anyhow::Result<bool> {
            v.parse()
                .with_context(|| format!("{v:?} is not true or false"))
        }
        match name {
            "listen" => {
                self.listen = value
                    .parse()
                    .with_context(|| format!("{value:?} is not an address like 127.0.0.1:5000"))?
            }
            "data" => self.data = PathBuf::from(value),
            "header_timeout_secs" => self.header_timeout_secs = num(value)?,
            "body_idle_timeout_secs" => self.body_idle_timeout_secs = num(value)?,
            "body_min_bytes_per_sec" => self.body_min_bytes_per_sec = num(value)?,
            "body_rate_window_secs" => self.body_rate_window_secs = num(value)?,
            "upload_max_age_secs" => self.upload_max_age_secs = num(value)?,
            "upload_sessions_max" => self.upload_sessions_max = num(value)?,
            "upload_sessions_per_client_max" => self.upload_sessions_per_client_max = num(value)?,
            "upload_session_bytes_max" => self.upload_session_bytes_max = num(value)?,
            "upload_bytes_max" => self.upload_bytes_max = num(value)?,
            "disk_free_min_bytes" => self.disk_free_min_bytes = num(value)?,
            "shutdown_grace_secs" => self.shutdown_grace_secs = num(value)?,
            "manifest_bytes_max" => self.manifest_bytes_max = num(value)?,
            "segment_bytes_max" => self.segment_bytes_max = num(value)?,
            "verify_chunks" => self.verify_chunks = boolean(value)?,
            "verify_reuse_ms" => self.verify_reuse_ms = num(value)?,
            "read_ahead" => self.read_ahead = value.parse().map_err(anyhow::Error::msg)?,
            "sendfile" => self.sendfile = boolean(value)?,
            "gc_interval_secs" => self.gc_interval_secs = num(value)?,
            "gc_grace_secs" => self.gc_grace_secs = num(value)?,
            "gc_delete_untagged" => self.gc_delete_untagged = boolean(value)?,
            "gc_min_dead_fraction" => self.gc_min_dead_fraction = num(value)?,
            "gc_pace_mb_per_sec" => self.gc_pace_mb_per_sec = num(value)?,
            "gc_fold_below_mb" => self.gc_fold_below_mb = Some(num(value)?),
            "log" => self.log = value.to_owned(),
            "tls_cert" => self.tls_cert = Some(PathBuf::from(value)),
            "tls_key" => self.tls_key = Some(PathBuf::from(value)),
            "insecure_plain_http" => self.insecure_plain_http = boolean(value)?,
            "audit_log" => self.audit_log = Some(PathBuf::from(value)),
            "audit_log_bytes_max" => self.audit_log_bytes_max = num(value)?,
            "audit_log_keep" => self.audit_log_keep = num(value)?,
            "metrics" => self.metrics = boolean(value)?,
            "public_url" => self.public_url = Some(value.to_owned()),
            "pull_tracking" => self.pull_tracking = boolean(value)?,
            "console" => self.console = boolean(value)?,
            "console_idle_secs" => self.console_idle_secs = num(value)?,
            "console_session_max_secs" => self.console_session_max_secs = num(value)?,
            "pull_flush_secs" => self.pull_flush_secs = num(value)?,
            "webhook_outbox_bytes_max" => self.webhook_outbox_bytes_max = num(value)?,
            "metrics_listen" => {
                self.metrics_listen =
                    Some(value.parse().with_context(|| {
                        format!("{value:?} is not an address like 127.0.0.1:9100")
                    })?)
            }
            other => bail!("unknown setting {other:?}"),
        }
        Ok(())
    }
}

/// Where the audit log is when the config does not say.
pub fn default_audit_path(data: &Path) -> PathBuf {
    data.join("audit").join("audit.log")
}

/// Where the robots file is when the config does not say.
pub fn default_robots_path(data: &Path) -> PathBuf {
    data.join("auth").join("robots.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The complete example in docs/operations.md, and the read replica's, are configs this
    /// version takes (unknown settings are errors, so a renamed one shows here).
    #[test]
    fn the_documented_examples_parse() {
        let doc = include_str!("../../docs/operations.md");
        let blocks: Vec<&str> = doc
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .collect();
        let complete: Config = toml::from_str(blocks[0]).expect("the complete example");
        let bucket = complete
            .bucket
            .as_ref()
            .expect("[bucket] in the complete example");
        assert_eq!(bucket.role, ballast_bucket::Role::Primary);
        let replica = blocks
            .iter()
            .find(|b| b.contains("role = \"replica\""))
            .expect("the replica example");
        let replica: Config = toml::from_str(replica).expect("the replica example");
        assert!(replica.is_replica());
        assert!(replica.check().is_ok());
    }

    #[test]
    fn layers_beat_each_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:6000\"\ndata = \"/from/file\"\n",
        )
        .expect("write");
        let env = vec![
            ("BALLAST_DATA".to_owned(), "/from/env".to_owned()),
            ("HOME".to_owned(), "x".to_owned()),
        ];
        let c = Config::load(Some(&file), env.into_iter()).expect("load");
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.data, PathBuf::from("/from/env"));
        // Unknown BALLAST_* variables are ignored with a warning; bad values are errors.
        assert!(Config::load(
            None,
            vec![("BALLAST_BENCH_MB".into(), "1".into())].into_iter()
        )
        .is_ok());
        assert!(Config::load(
            None,
            vec![("BALLAST_LISTEN".into(), "nope".into())].into_iter()
        )
        .is_err());
        std::fs::write(&file, "bogus = 1\n").expect("write");
        assert!(Config::load(Some(&file), std::iter::empty()).is_err());
    }

    #[test]
    fn every_setting_can_come_from_the_file_and_from_the_environment() {
        // Each name in SETTINGS must be settable both ways (a new field that is missing from
        // `set` or from the file's schema fails here).
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        let value = |name: &str| match name {
            "listen" => "127.0.0.1:6001",
            "data" | "tls_cert" | "tls_key" | "audit_log" => "/x",
            "log" => "debug",
            // Booleans: the opposite of the default.
            "verify_chunks" | "metrics" | "pull_tracking" | "console" | "sendfile" => "false",
            "metrics_listen" => "127.0.0.1:9100",
            "public_url" => "https://registry.example.com",
            "gc_delete_untagged" | "insecure_plain_http" => "true",
            "gc_min_dead_fraction" => "0.25",
            "read_ahead" => "advise",
            _ => "7",
        };
        for name in SETTINGS {
            let v = value(name);
            let toml_value = match v.parse::<f64>() {
                Ok(_) => v.to_owned(),
                Err(_) if v == "true" || v == "false" => v.to_owned(),
                Err(_) => format!("{v:?}"),
            };
            std::fs::write(&file, format!("{name} = {toml_value}\n")).expect("write");
            let from_file = Config::load(Some(&file), std::iter::empty())
                .unwrap_or_else(|e| panic!("{name} from the file: {e:#}"));
            let env = vec![(
                format!("BALLAST_{}", name.to_ascii_uppercase()),
                v.to_owned(),
            )];
            let from_env = Config::load(None, env.into_iter())
                .unwrap_or_else(|e| panic!("{name} from the environment: {e:#}"));
            assert_eq!(
                format!("{from_file:?}"),
                format!("{from_env:?}"),
                "{name}: file and environment disagree"
            );
            assert_ne!(
                format!("{from_env:?}"),
                format!("{:?}", Config::default()),
                "{name}: setting it changed nothing"
            );
        }
        let c = Config::load(
            None,
            vec![("BALLAST_VERIFY_REUSE_MS".into(), "0".into())].into_iter(),
        )
        .expect("load");
        assert_eq!(c.verify_reuse_ms, 0);
    }

    #[test]
    fn auth_tables_and_safety_checks() {
        let text = r#"
listen = "0.0.0.0:5000"
tls_cert = "/etc/ballast/cert.pem"
tls_key = "/etc/ballast/key.pem"
[auth]
enabled = true
htpasswd = "/etc/ballast/htpasswd"
realm = "https://registry.example.com/token"
[auth.groups]
ci = ["robot:builder"]
[[auth.policy]]
subjects = ["group:ci"]
repositories = ["team-a/**"]
actions = ["pull", "push"]
"#;
        let mut c: Config = toml::from_str(text).expect("parse");
        assert_eq!(c.auth.policy.len(), 1);
        assert!(c.check().expect("valid").is_empty());
        // Plain HTTP off loopback needs an explicit opt-in, and then warns.
        c.tls_cert = None;
        c.tls_key = None;
        assert!(c.check().is_err());
        c.insecure_plain_http = true;
        assert_eq!(c.check().expect("opted in").len(), 1);
        c.tls_key = Some("/k".into());
        assert!(c.check().is_err(), "a key without a certificate");
        c.tls_key = None;
        // Off loopback, the realm is configured, never taken from the client's Host.
        c.auth.realm = None;
        let e = c.check().expect_err("no realm off loopback");
        assert!(format!("{e:#}").contains("realm is required"), "{e:#}");
        c.listen = "127.0.0.1:5000".parse().expect("addr");
        assert!(c.check().is_ok(), "on loopback, the realm may be derived");
        let mut c = Config::default();
        c.auth.enabled = true;
        c.auth.policy.push(crate::auth::Rule {
            subjects: vec!["group:missing".into()],
            repositories: vec!["**".into()],
            actions: vec![crate::auth::Action::Pull],
        });
        assert!(c.check().is_err());
        assert!(toml::from_str::<Config>("[auth]\nenabeld = true\n").is_err());
        let mut c = Config {
            gc_fold_below_mb: Some(32),
            ..Config::default()
        };
        assert!(c.check().is_ok(), "half of the 64 MiB segments");
        c.gc_fold_below_mb = Some(33);
        let e = c.check().expect_err("past half a segment");
        assert!(format!("{e:#}").contains("gc_fold_below_mb"), "{e:#}");
    }
}
