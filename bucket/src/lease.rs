//! One writer per prefix: the shipping registry holds a lease (`lease.json` under the
//! prefix: who, and when it was last renewed), renews it while it runs and releases it at a
//! clean stop. A registry that finds another's lease renewed within its time to live does
//! not ship (and `serve` refuses to start when it sees one at start).
//!
//! S3 stores do not all offer conditional writes, so this is read, then write: two
//! registries started within the same moment on one prefix could both take the lease, and
//! the next renewal of each (it reads before it writes) finds the other's and stops
//! shipping. What it prevents is the common mistake: a second registry (a restored copy, a
//! stand-by started by hand) shipping over a live one. Failover is manual
//! (docs/operations.md, "Segments in a bucket").

use ballast_engine::clock::now_secs;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::client::Bucket;

/// The lease object's name under the prefix.
pub const LEASE: &str = "lease.json";

/// The lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it: host name, process id and a random tag.
    pub owner: String,
    /// When it was last renewed (Unix seconds).
    pub renewed_at: u64,
    /// Seconds it lasts after a renewal.
    pub ttl_secs: u64,
    /// Where the holder serves (its `public_url`, or its listen address): read replicas
    /// name it when they refuse a push.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

impl Lease {
    /// True while it lasts at `now`.
    pub fn live(&self, now: u64) -> bool {
        now < self.renewed_at.saturating_add(self.ttl_secs)
    }
}

/// The lease identity of the registry whose data directory is `data`: host name and a
/// random tag, kept in `<data>/bucket/owner` so the same registry restarting (even after a
/// kill) takes its own lease back at once, while a copy of it elsewhere is another owner.
pub fn owner(data: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let path = data.join("bucket").join("owner");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_owned());
        }
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    let owner = format!("{host}:{:08x}", rand::random::<u32>());
    // The engine's own modes and atomic replace (temp file, fsync, rename, directory fsync).
    use ballast_engine::storage::{write_atomic, RealStorage, Storage};
    let dir = data.join("bucket");
    RealStorage
        .create_dir_all(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&RealStorage, &path, format!("{owner}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(owner)
}

/// The lease in the bucket, if any (an unreadable one counts as none: it is replaced).
pub async fn read(bucket: &Bucket) -> anyhow::Result<Option<Lease>> {
    Ok(bucket
        .get(LEASE)
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Another registry holds a live lease (as opposed to the store being unreachable).
#[derive(Debug)]
pub struct LeaseHeld(pub String);

impl std::fmt::Display for LeaseHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LeaseHeld {}

/// Fails, naming the holder, when a registry other than `owner` (any registry, for `None`)
/// holds a live lease.
pub async fn check_free(bucket: &Bucket, owner: Option<&str>) -> anyhow::Result<()> {
    let now = now_secs();
    if let Some(l) = read(bucket).await? {
        if Some(l.owner.as_str()) != owner && l.live(now) {
            return Err(LeaseHeld(format!(
                "another registry ({}) holds the lease on {} (renewed {} s ago; it lapses in \
                 {} s unless renewed): only one registry may ship to a prefix. Stop the other \
                 (a clean stop gives the lease up), or, if its host is lost, start this one \
                 once the lease has lapsed; or give this one its own prefix",
                l.owner,
                bucket.describe(),
                now.saturating_sub(l.renewed_at),
                l.renewed_at.saturating_add(l.ttl_secs).saturating_sub(now)
            ))
            .into());
        }
    }
    Ok(())
}

/// Takes or renews the lease for `owner`; fails, naming the holder, when another holds a
/// live one.
pub async fn renew(
    bucket: &Bucket,
    owner: &str,
    ttl_secs: u64,
    url: Option<String>,
) -> anyhow::Result<()> {
    check_free(bucket, Some(owner)).await?;
    let lease = Lease {
        owner: owner.to_owned(),
        renewed_at: now_secs(),
        ttl_secs,
        url,
    };
    bucket
        .put(LEASE, Bytes::from(serde_json::to_vec(&lease)?))
        .await
}

/// Gives the lease up (a clean stop), when `owner` still holds it.
pub async fn release(bucket: &Bucket, owner: &str) -> anyhow::Result<()> {
    if read(bucket).await?.is_some_and(|l| l.owner == owner) {
        bucket.delete(LEASE).await?;
    }
    Ok(())
}
