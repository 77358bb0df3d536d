//! A read replica (`role = "replica"`, docs/design.md "Read replicas"): it writes nothing
//! under the prefix but its pull reports ([`crate::pulls`]). Every `follow_interval_secs`
//! it looks for a checkpoint newer than the one it serves; when there is one it fetches the catalog and the index file of each segment it
//! does not know (each checked against the record's length and SHA-256) and moves its
//! store to it ([`ballast_engine::Store::follow`]). Segment bytes are read on demand
//! through the same block cache as tiering ([`crate::tier`]). A primary's pruning keeps a
//! checkpoint's segments for `checkpoint_grace_secs` after a newer one replaced it, which
//! is the time a replica has to move on before reads of the older one fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_engine::clock::now_secs;
use ballast_engine::Store;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::client::Bucket;
use crate::config::BucketConfig;
use crate::tier::{ReadFigures, Tier};

/// Index files fetched at once.
const PARALLEL: usize = 8;

/// What a replica follows and how far behind it is (metrics, /healthz, the admin
/// endpoint).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowStatus {
    /// `endpoint/bucket/prefix`.
    pub bucket: String,
    /// The checkpoint served.
    pub seq: Option<u64>,
    /// When the primary took it (Unix seconds): what is served is as of then.
    pub taken_at: Option<u64>,
    /// When this replica moved to it (Unix seconds).
    pub followed_at: Option<u64>,
    /// When this replica last saw that it serves the bucket's newest checkpoint (Unix
    /// seconds).
    pub current_at: Option<u64>,
    /// The newest checkpoint seen in the bucket (past `seq` while one is being taken or
    /// failing).
    pub newest_seq: Option<u64>,
    /// Follows: the last one's error while they fail, failures in a row and in all.
    #[serde(flatten)]
    pub attempts: crate::attempts::Attempts,
    /// Checkpoints followed since start.
    pub follows: u64,
    /// Segments added since start.
    pub segments_added: u64,
    /// Segments dropped since start.
    pub segments_dropped: u64,
    /// Reads through the bucket (every segment the served checkpoint lists is remote).
    #[serde(flatten)]
    pub reads: ReadFigures,
    /// How long the last follow took, in milliseconds.
    pub last_duration_ms: u64,
}

impl FollowStatus {
    /// Seconds this replica may lag behind the bucket at `now`: since it last saw that it
    /// serves the newest checkpoint there (0 before it first looked). What it serves lags
    /// behind the primary by that plus the primary's own lag behind acknowledged pushes
    /// (`bucket_lag_secs` there). An idle primary takes no new checkpoints, so the age of
    /// the one served ([`FollowStatus::taken_at`]) is no lag.
    pub fn lag_secs(&self, now: u64) -> u64 {
        self.current_at.map_or(0, |t| now.saturating_sub(t))
    }
}

/// What one follow did.
#[derive(Clone, Debug, Serialize)]
pub struct FollowReport {
    /// The checkpoint now served.
    pub seq: u64,
    /// When the primary took it (Unix seconds).
    pub taken_at: u64,
    /// Segments added.
    pub added: usize,
    /// Segments dropped.
    pub dropped: usize,
    /// Repositories in its catalog.
    pub repos: usize,
    /// Bytes fetched (catalog and index files).
    pub bytes: u64,
    /// Milliseconds it took.
    pub ms: u64,
}

/// Follows one bucket prefix into one (follower) store.
pub struct Follower {
    store: Store,
    bucket: Bucket,
    cfg: BucketConfig,
    tier: Arc<Tier>,
    status: parking_lot::Mutex<FollowStatus>,
    /// One follow at a time (the loop and the admin endpoint).
    busy: tokio::sync::Mutex<()>,
    /// What [`Follower::primary`] last found, and when.
    primary: parking_lot::Mutex<Option<(Instant, String)>>,
    /// This replica's identity in its pull reports (`DIR/bucket/owner`).
    owner: String,
}

/// How long [`Follower::primary`] reuses what the lease said.
const PRIMARY_FRESH: Duration = Duration::from_secs(30);

impl Follower {
    /// A follower of the bucket `cfg` names into `store` (opened with
    /// `Options::follower`), whose data directory is `data`. No request is made yet.
    pub fn new(
        store: Store,
        data: &std::path::Path,
        cfg: &BucketConfig,
    ) -> anyhow::Result<Arc<Follower>> {
        let bucket = Bucket::connect(cfg)?;
        let tier = Tier::install(&bucket, &store, data, cfg)?;
        let status = FollowStatus {
            bucket: bucket.describe().to_owned(),
            ..FollowStatus::default()
        };
        Ok(Arc::new(Follower {
            store,
            bucket,
            cfg: cfg.clone(),
            tier,
            status: parking_lot::Mutex::new(status),
            busy: tokio::sync::Mutex::new(()),
            primary: parking_lot::Mutex::new(None),
            owner: crate::lease::owner(data)?,
        }))
    }

    /// The bucket.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// This replica's identity (in its pull reports).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The cache of blocks fetched from the bucket.
    pub fn tier(&self) -> &Arc<Tier> {
        &self.tier
    }

    /// What it follows and how far behind it is.
    pub fn status(&self) -> FollowStatus {
        let mut s = self.status.lock().clone();
        s.reads = self.tier.figures(&self.store);
        s
    }

    /// Where pushes go, for a refusal: `primary_url` when configured, else what the
    /// primary's lease says (its address, or its identity; read at most every 30 s, and
    /// waited for at most 5 s), else that none holds it.
    pub async fn primary(&self) -> String {
        if !self.cfg.primary_url.is_empty() {
            return self.cfg.primary_url.clone();
        }
        if let Some((at, p)) = self.primary.lock().as_ref() {
            if at.elapsed() < PRIMARY_FRESH {
                return p.clone();
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(5), crate::lease::read(&self.bucket));
        let p = match read.await {
            Ok(Ok(Some(l))) if l.live(now_secs()) => match l.url {
                Some(url) => format!("{url} ({})", l.owner),
                None => l.owner,
            },
            Ok(Ok(_)) => format!(
                "none holds the lease on {} now (the primary is stopped)",
                self.bucket.describe()
            ),
            Ok(Err(e)) => {
                return format!("the primary of {} ({e:#})", self.bucket.describe());
            }
            Err(_) => {
                return format!(
                    "the primary of {} (its lease could not be read in time)",
                    self.bucket.describe()
                );
            }
        };
        *self.primary.lock() = Some((Instant::now(), p.clone()));
        p
    }

    /// Moves to the bucket's newest checkpoint when it is newer than the one served;
    /// `Ok(None)` when there is none newer.
    pub async fn follow(&self) -> anyhow::Result<Option<FollowReport>> {
        let _one = self.busy.lock().await;
        let started = Instant::now();
        // What the bucket's list says holds as of when it was asked.
        let listed = now_secs();
        let result = self.follow_newest().await;
        let mut s = self.status.lock();
        match &result {
            Ok(Some(r)) => {
                s.seq = Some(r.seq);
                s.taken_at = Some(r.taken_at);
                s.followed_at = Some(now_secs());
                if s.newest_seq <= Some(r.seq) {
                    s.current_at = Some(listed);
                }
                s.follows += 1;
                s.segments_added += r.added as u64;
                s.segments_dropped += r.dropped as u64;
                s.last_duration_ms = started.elapsed().as_millis() as u64;
            }
            // Nothing newer, or nothing at all in the bucket yet.
            Ok(None) => s.current_at = Some(listed),
            Err(_) => {}
        }
        s.attempts.note(&result);
        result
    }

    async fn follow_newest(&self) -> anyhow::Result<Option<FollowReport>> {
        let started = Instant::now();
        let Some(&seq) = crate::restore::checkpoints(&self.bucket).await?.last() else {
            return Ok(None);
        };
        self.status.lock().newest_seq = Some(seq);
        if self.status.lock().seq.is_some_and(|s| s >= seq) {
            return Ok(None);
        }
        let record = crate::restore::read_record(&self.bucket, seq).await?;
        let catalog = self.bucket.get_checked(&record.catalog).await?;
        let ids: Vec<u64> = record.segments.iter().map(|s| s.id).collect();
        let wanted: std::collections::HashSet<u64> =
            self.store.segments_to_follow(&ids).into_iter().collect();
        let mut refs = Vec::with_capacity(wanted.len());
        for seg in record.segments.iter().filter(|s| wanted.contains(&s.id)) {
            let Some(index) = seg.index.clone() else {
                bail!(
                    "checkpoint {seq} lists segment {} without its index file: the primary \
                     runs a version from before read replicas (upgrade it; its next \
                     shipment uploads the index files)",
                    seg.id
                );
            };
            refs.push((seg.id, index));
        }
        let indexes: BTreeMap<u64, Vec<u8>> =
            futures::stream::iter(refs)
                .map(|(id, r)| async move {
                    self.bucket.get_checked(&r).await.map(|b| (id, b.to_vec()))
                })
                .buffer_unordered(PARALLEL)
                .try_collect()
                .await?;
        let bytes = catalog.len() as u64 + indexes.values().map(|b| b.len() as u64).sum::<u64>();
        let listed: Vec<(u64, u64)> = record.segments.iter().map(|s| (s.id, s.len)).collect();
        let store = self.store.clone();
        let done = tokio::task::spawn_blocking(move || store.follow(&catalog, &listed, &indexes))
            .await?
            .with_context(|| format!("following checkpoint {seq}"))?;
        Ok(Some(FollowReport {
            seq,
            taken_at: record.taken_at,
            added: done.added,
            dropped: done.dropped,
            repos: done.repos,
            bytes,
            ms: started.elapsed().as_millis() as u64,
        }))
    }

    /// Follows every `follow_interval_secs` (backing off up to a minute while attempts
    /// fail) until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let interval = Duration::from_secs(self.cfg.follow_interval_secs);
        loop {
            match self.follow().await {
                Ok(Some(r)) => tracing::info!(
                    seq = r.seq,
                    added = r.added,
                    dropped = r.dropped,
                    lag_secs = now_secs().saturating_sub(r.taken_at),
                    ms = r.ms,
                    "replica moved to the primary's newest checkpoint"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    bucket = self.bucket.describe(),
                    "following the primary's checkpoints failed; this replica serves the one \
                     it has and tries again"
                ),
            }
            let failures = self.status.lock().attempts.consecutive_failures.min(6) as u32;
            let wait = (interval * 2u32.pow(failures)).min(Duration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => break,
            }
        }
    }
}
