//! The `[bucket]` table of the server's config (docs/operations.md, "Segments in a bucket").

use anyhow::bail;
use serde::Deserialize;

/// Where the registry's segments and catalog go, and how often.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BucketConfig {
    /// The store's URL (`http://127.0.0.1:3900`, `https://s3.example.com`); empty for AWS
    /// S3, whose endpoint follows from the region.
    pub endpoint: String,
    /// The bucket's name.
    pub bucket: String,
    /// Objects go under this prefix (`registry-1/`), so one bucket may hold several
    /// registries; empty for the bucket's root.
    pub prefix: String,
    /// The region requests are signed for (Garage's default is `garage`).
    pub region: String,
    /// The access key; empty: `AWS_ACCESS_KEY_ID` from the environment.
    pub access_key_id: String,
    /// The secret key; empty: `AWS_SECRET_ACCESS_KEY` from the environment.
    pub secret_access_key: String,
    /// Path-style requests (`endpoint/bucket/key`), what self-hosted stores (Garage, MinIO,
    /// Ceph RGW) expect; `false` for virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Seconds between shipments while something changed: the bound on how far the bucket
    /// lags behind acknowledged pushes (docs/design.md, "Recovery point").
    pub ship_interval_secs: u64,
    /// Checkpoints kept in the bucket (the newest; a restore may pick any of them). Segment
    /// objects no kept checkpoint lists are deleted.
    pub checkpoints_kept: usize,
    /// A checkpoint also stays while it is younger than this (seconds), however many came
    /// after it: a restore started on it has at least this long before its segments may go.
    pub checkpoint_grace_secs: u64,
    /// Seconds one request to the store may take, retries included, before it fails.
    pub request_timeout_secs: u64,
    /// When a manifest push is answered: once stored here (`local`, the default; the
    /// bucket lags by up to a shipment), or once a checkpoint holding it is in the bucket
    /// (`bucket`: nothing acknowledged is lost with the host, at the latency of a shipment).
    pub acknowledge: Acknowledge,
    /// With `acknowledge = "bucket"`: seconds a push waits for the bucket before it is
    /// answered 503 (it stays stored here and reaches the bucket later).
    pub acknowledge_timeout_secs: u64,
    /// `serve` on an empty (or absent) data directory restores the bucket's newest
    /// checkpoint first (a new host with the old one's config brings the registry back);
    /// `false` starts an empty registry instead.
    pub restore_empty: bool,
    /// Tiering (docs/design.md, "Reads from the bucket"): the local disk kept for sealed
    /// segments the bucket holds, their local copies and the blocks fetched back together,
    /// in bytes. Past it the oldest copies are dropped and their records read from the
    /// bucket. Unset: every segment stays local (the bucket is a copy), and blocks of
    /// segments already dropped are cached up to [`DEFAULT_BLOCK_CACHE`].
    pub cache_bytes_max: Option<u64>,
    /// `primary` (the default): this registry takes pushes and ships to the prefix, alone
    /// (the lease). `replica`: a read replica (docs/design.md, "Read replicas"): it serves
    /// pulls from the bucket through its cache, follows the primary's checkpoints, and
    /// refuses pushes naming the primary.
    pub role: Role,
    /// A replica looks for a newer checkpoint this often (seconds): new tags are visible on
    /// it within the primary's `ship_interval_secs` plus this, plus the transfer.
    pub follow_interval_secs: u64,
    /// A replica's refusal of a push names this as where to push; empty: the address the
    /// primary's lease gives.
    pub primary_url: String,
}

/// What a registry does with its prefix (`role`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes pushes and ships checkpoints.
    #[default]
    Primary,
    /// Serves pulls and follows the primary's checkpoints.
    Replica,
}

/// The block cache's size when `cache_bytes_max` is unset.
pub const DEFAULT_BLOCK_CACHE: u64 = 1 << 30;

/// The smallest `cache_bytes_max`: two blocks.
pub const CACHE_BYTES_MIN: u64 = 2 * crate::tier::BLOCK_BYTES;

/// When a manifest push is answered (`acknowledge`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Acknowledge {
    /// Once durable on the local disk.
    #[default]
    Local,
    /// Once a checkpoint holding it is in the bucket.
    Bucket,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            endpoint: String::new(),
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            path_style: true,
            ship_interval_secs: 10,
            checkpoints_kept: 10,
            checkpoint_grace_secs: 3600,
            request_timeout_secs: 120,
            acknowledge: Acknowledge::Local,
            acknowledge_timeout_secs: 60,
            restore_empty: true,
            cache_bytes_max: None,
            role: Role::Primary,
            follow_interval_secs: 2,
            primary_url: String::new(),
        }
    }
}

/// The secret key is never printed.
impl std::fmt::Debug for BucketConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &if self.secret_access_key.is_empty() {
                    ""
                } else {
                    "(set)"
                },
            )
            .field("path_style", &self.path_style)
            .field("ship_interval_secs", &self.ship_interval_secs)
            .field("checkpoints_kept", &self.checkpoints_kept)
            .field("checkpoint_grace_secs", &self.checkpoint_grace_secs)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("acknowledge", &self.acknowledge)
            .field("acknowledge_timeout_secs", &self.acknowledge_timeout_secs)
            .field("restore_empty", &self.restore_empty)
            .field("cache_bytes_max", &self.cache_bytes_max)
            .field("role", &self.role)
            .field("follow_interval_secs", &self.follow_interval_secs)
            .field("primary_url", &self.primary_url)
            .finish()
    }
}

impl BucketConfig {
    /// Refuses incomplete or unsafe settings; returns warnings for risky ones.
    pub fn check(&self) -> anyhow::Result<Vec<String>> {
        let mut warnings = Vec::new();
        if self.bucket.is_empty() {
            bail!("[bucket] bucket is empty: name the bucket the segments go to");
        }
        let scheme_ok =
            self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://");
        if !self.endpoint.is_empty() && !scheme_ok {
            bail!(
                "[bucket] endpoint {:?} must start with http:// or https://",
                self.endpoint
            );
        }
        if self.endpoint.starts_with("http://") && !is_loopback_url(&self.endpoint) {
            warnings.push(format!(
                "[bucket] endpoint {} is plain HTTP: segments and request signatures cross the \
                 network unencrypted",
                self.endpoint
            ));
        }
        if self.access_key_id.is_empty() != self.secret_access_key.is_empty() {
            bail!(
                "[bucket] access_key_id and secret_access_key go together: set both, or neither \
                 (then AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are used)"
            );
        }
        if self.ship_interval_secs == 0 {
            bail!("[bucket] ship_interval_secs must be at least 1");
        }
        if self.checkpoints_kept == 0 {
            bail!("[bucket] checkpoints_kept must be at least 1");
        }
        if self.request_timeout_secs == 0 {
            bail!("[bucket] request_timeout_secs must be at least 1");
        }
        if self.acknowledge_timeout_secs == 0 {
            bail!("[bucket] acknowledge_timeout_secs must be at least 1");
        }
        if self.cache_bytes_max.is_some_and(|b| b < CACHE_BYTES_MIN) {
            bail!(
                "[bucket] cache_bytes_max must be at least {CACHE_BYTES_MIN} (two blocks of \
                 what is fetched back from the bucket)"
            );
        }
        if self.follow_interval_secs == 0 {
            bail!("[bucket] follow_interval_secs must be at least 1");
        }
        if self.role == Role::Replica && self.acknowledge == Acknowledge::Bucket {
            bail!(
                "[bucket] acknowledge = \"bucket\" is for a primary: a replica takes no push \
                 (remove it, or set role = \"primary\")"
            );
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") || self.prefix.contains("..")
        {
            bail!(
                "[bucket] prefix {:?}: use names separated by single slashes, without a leading \
                 slash or `..`",
                self.prefix
            );
        }
        Ok(warnings)
    }

    /// Where the objects are, for messages: `endpoint/bucket/prefix`.
    pub fn describe(&self) -> String {
        let endpoint = if self.endpoint.is_empty() {
            format!("s3 ({})", self.region)
        } else {
            self.endpoint.trim_end_matches('/').to_owned()
        };
        let prefix = self.prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("{endpoint}/{}", self.bucket)
        } else {
            format!("{endpoint}/{}/{prefix}", self.bucket)
        }
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BucketConfig {
        BucketConfig {
            endpoint: "http://127.0.0.1:3900".into(),
            bucket: "ballast".into(),
            ..BucketConfig::default()
        }
    }

    #[test]
    fn settings_are_checked_with_a_reason() {
        assert!(base().check().expect("ok").is_empty());
        let cases: Vec<(BucketConfig, &str)> = vec![
            (
                BucketConfig {
                    bucket: String::new(),
                    ..base()
                },
                "bucket is empty",
            ),
            (
                BucketConfig {
                    endpoint: "s3.example.com".into(),
                    ..base()
                },
                "must start with http",
            ),
            (
                BucketConfig {
                    access_key_id: "GK1".into(),
                    ..base()
                },
                "go together",
            ),
            (
                BucketConfig {
                    ship_interval_secs: 0,
                    ..base()
                },
                "ship_interval_secs",
            ),
            (
                BucketConfig {
                    prefix: "/abs".into(),
                    ..base()
                },
                "prefix",
            ),
        ];
        for (c, why) in cases {
            let e = c.check().expect_err(why).to_string();
            assert!(e.contains(why), "{e}");
        }
        let w = BucketConfig {
            endpoint: "http://store.example.com:3900".into(),
            ..base()
        }
        .check()
        .expect("a warning, not an error");
        assert!(w[0].contains("plain HTTP"), "{w:?}");
        assert_eq!(
            BucketConfig {
                prefix: "reg/one/".into(),
                ..base()
            }
            .describe(),
            "http://127.0.0.1:3900/ballast/reg/one"
        );
    }
}
