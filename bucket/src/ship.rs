//! Shipping the store to the bucket: every `ship_interval_secs` while the catalog changed, a
//! checkpoint (a consistent cut: `ballast_engine::checkpoint`) goes up: the sealed segments
//! the bucket does not hold yet, the catalog, then the checkpoint record that names them
//! (the commit point: a restore only ever sees whole checkpoints). Old checkpoints past
//! `checkpoints_kept` and older than `checkpoint_grace_secs` are deleted, and with them the
//! segments no kept checkpoint lists.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ballast_engine::checkpoint::SealedSegment;
use ballast_engine::clock::now_secs;
use ballast_engine::Store;
use bytes::Bytes;
use serde::Serialize;

use crate::client::Bucket;
use crate::config::BucketConfig;
use crate::layout::{self, CheckpointRecord, ObjectRef, SegmentRef, CHECKPOINT_FORMAT};
use crate::lease;
use crate::tier::{ReadFigures, Tier};

/// The block cache's directory in the data directory.
pub const CACHE_DIR: &str = "cache";

/// What the shipper has done and how far behind the bucket is (metrics, /healthz, the
/// admin endpoint).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// `endpoint/bucket/prefix`.
    pub bucket: String,
    /// This registry's identity in the prefix's lease (`lease.json`).
    pub lease_owner: String,
    /// When this registry last took or renewed the lease (Unix seconds); `None` before it
    /// first has.
    pub lease_renewed_at: Option<u64>,
    /// The newest checkpoint in the bucket.
    pub last_seq: Option<u64>,
    /// When its cut was taken (Unix seconds).
    pub last_taken_at: Option<u64>,
    /// Since when (Unix seconds) the store holds a change no checkpoint holds: the lag is
    /// the time since then. `None` when the bucket is current.
    pub pending_since: Option<u64>,
    /// Shipments: the last one's error while they fail, failures in a row and in all.
    #[serde(flatten)]
    pub attempts: crate::attempts::Attempts,
    /// Checkpoints written since start.
    pub checkpoints: u64,
    /// Segment files uploaded since start.
    pub segments_uploaded: u64,
    /// Bytes uploaded since start (segments and catalogs).
    pub bytes_uploaded: u64,
    /// Objects deleted since start (old checkpoints, their catalogs, segments no kept
    /// checkpoint lists).
    pub objects_deleted: u64,
    /// How long the last successful shipment took, in milliseconds.
    pub last_duration_ms: u64,
    /// `cache_bytes_max`, when tiering is on.
    pub cache_bytes_max: Option<u64>,
    /// Reads through the bucket.
    #[serde(flatten)]
    pub reads: ReadFigures,
    /// Segments whose local file was dropped since start.
    pub segments_made_remote: u64,
    /// The catalog position the newest checkpoint holds.
    #[serde(skip)]
    shipped_position: Option<(u64, u64)>,
}

impl Status {
    /// Seconds the bucket lags behind the store at `now` (0 when it is current).
    pub fn lag_secs(&self, now: u64) -> u64 {
        self.pending_since.map_or(0, |p| now.saturating_sub(p))
    }
}

/// What one shipment did.
#[derive(Clone, Debug, Serialize)]
pub struct ShipReport {
    /// The checkpoint written.
    pub seq: u64,
    /// Segments the checkpoint lists.
    pub segments: usize,
    /// Bytes of those and the catalog.
    pub bytes: u64,
    /// Segments uploaded by this shipment (the rest were in the bucket).
    pub segments_uploaded: usize,
    /// Bytes uploaded by this shipment.
    pub bytes_uploaded: u64,
    /// Objects deleted.
    pub objects_deleted: usize,
    /// Milliseconds it took.
    pub ms: u64,
    /// The catalog position the checkpoint holds.
    #[serde(skip)]
    position: (u64, u64),
}

/// What the bucket holds, as far as this shipper knows.
#[derive(Default)]
struct Shipped {
    /// Read the bucket's checkpoints yet.
    opened: bool,
    /// The kept checkpoints, by sequence number.
    kept: BTreeMap<u64, CheckpointRecord>,
}

/// Ships one store to one bucket.
pub struct Shipper {
    store: Store,
    bucket: Bucket,
    cfg: BucketConfig,
    shipped: tokio::sync::Mutex<Shipped>,
    status: parking_lot::Mutex<Status>,
    /// The catalog position the bucket's newest checkpoint holds (pushes waiting for the
    /// bucket watch it).
    shipped_position: tokio::sync::watch::Sender<Option<(u64, u64)>>,
    /// Wakes the shipping loop before its interval (a push waits for the bucket).
    wake: tokio::sync::Notify,
    /// This registry's lease identity, and when it last renewed the lease.
    owner: String,
    renewed: parking_lot::Mutex<Option<Instant>>,
    /// Reads of segments kept in the bucket, installed in the store.
    tier: Arc<Tier>,
    /// Where this registry serves, written into the lease (replicas name it).
    url: parking_lot::Mutex<Option<String>>,
}

impl Shipper {
    /// A shipper of `store` (whose data directory is `data`) to the bucket `cfg` names (no
    /// request is made yet).
    pub fn new(
        store: Store,
        data: &std::path::Path,
        cfg: &BucketConfig,
    ) -> anyhow::Result<Arc<Shipper>> {
        let bucket = Bucket::connect(cfg)?;
        let owner = lease::owner(data)?;
        let status = Status {
            bucket: bucket.describe().to_owned(),
            lease_owner: owner.clone(),
            cache_bytes_max: cfg.cache_bytes_max,
            ..Status::default()
        };
        let tier = Tier::install(&bucket, &store, data, cfg)?;
        Ok(Arc::new(Shipper {
            store,
            bucket,
            cfg: cfg.clone(),
            shipped: tokio::sync::Mutex::new(Shipped::default()),
            status: parking_lot::Mutex::new(status),
            shipped_position: tokio::sync::watch::Sender::new(None),
            wake: tokio::sync::Notify::new(),
            owner,
            renewed: parking_lot::Mutex::new(None),
            tier,
            url: parking_lot::Mutex::new(None),
        }))
    }

    /// Where this registry serves (its `public_url`), written into the lease from the next
    /// renewal: read replicas name it when they refuse a push.
    pub fn advertise(&self, url: String) {
        *self.url.lock() = Some(url);
    }

    /// The bucket.
    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    /// What it has done and how far behind the bucket is, as of now (a change committed
    /// before this call and not shipped yet shows as pending).
    pub fn status(&self) -> Status {
        self.note_changes();
        let mut s = self.status.lock().clone();
        s.reads = self.tier.figures(&self.store);
        s
    }

    /// The cache of blocks fetched back from the bucket.
    pub fn tier(&self) -> &Arc<Tier> {
        &self.tier
    }

    /// With `cache_bytes_max`: drops the oldest local copies of segments the newest
    /// checkpoint holds while the local disk is past it ([`crate::tier::settle`]).
    async fn settle(&self, shipped: &Shipped) -> anyhow::Result<()> {
        let Some(max) = self.cfg.cache_bytes_max else {
            return Ok(());
        };
        let Some(newest) = shipped.kept.values().next_back() else {
            return Ok(());
        };
        let listed: BTreeMap<u64, u64> = newest.segments.iter().map(|s| (s.id, s.len)).collect();
        let (store, tier) = (self.store.clone(), self.tier.clone());
        let done =
            tokio::task::spawn_blocking(move || crate::tier::settle(&store, &tier, &listed, max))
                .await??;
        if done.segments_made_remote > 0 {
            tracing::info!(
                segments = done.segments_made_remote,
                bytes = done.bytes_freed,
                "local copies of segments the bucket holds dropped (cache_bytes_max); their \
                 records are read from the bucket"
            );
            self.status.lock().segments_made_remote += done.segments_made_remote;
        }
        Ok(())
    }

    /// Seconds the lease lasts after a renewal: six intervals, at least a minute.
    fn lease_ttl(&self) -> u64 {
        (6 * self.cfg.ship_interval_secs).max(60)
    }

    /// True when the lease is due for renewal (a third of its time to live has passed).
    fn lease_due(&self) -> bool {
        self.renewed
            .lock()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(self.lease_ttl() / 3))
    }

    async fn renew_lease(&self) -> anyhow::Result<()> {
        let url = self.url.lock().clone();
        lease::renew(&self.bucket, &self.owner, self.lease_ttl(), url).await?;
        *self.renewed.lock() = Some(Instant::now());
        self.status.lock().lease_renewed_at = Some(now_secs());
        Ok(())
    }

    /// Takes the lease before serving (within `timeout`): an error when another registry
    /// holds a live one; a warning only when the store cannot be reached (shipping then
    /// takes it first, or stops with that error).
    pub async fn acquire(&self, timeout: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(timeout, self.renew_lease()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.downcast_ref::<lease::LeaseHeld>().is_some() => Err(e),
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "could not take the bucket's lease at start; shipping takes it once the store answers");
                Ok(())
            }
            Err(_) => {
                tracing::warn!(
                    "the bucket did not answer within {} s at start; shipping takes the lease \
                     once it does",
                    timeout.as_secs()
                );
                Ok(())
            }
        }
    }

    /// Notes a change of the catalog that no checkpoint holds yet (the lag starts); true
    /// when there is one.
    fn note_changes(&self) -> bool {
        let now = self.store.catalog().durable_position();
        let mut s = self.status.lock();
        let pending = s.shipped_position != Some(now);
        if pending && s.pending_since.is_none() {
            s.pending_since = Some(now_secs());
        }
        pending
    }

    /// Ships a checkpoint when the catalog changed since the last one (or always, with
    /// `force`); `Ok(None)` when there was nothing to ship.
    pub async fn ship(&self, force: bool) -> anyhow::Result<Option<ShipReport>> {
        let mut shipped = self.shipped.lock().await;
        let started = Instant::now();
        let result = async {
            let pending = self.note_changes();
            // The lease before anything is written, and renewed while idle.
            if pending || force || !shipped.opened || self.lease_due() {
                self.renew_lease().await?;
            }
            if !shipped.opened {
                self.open(&mut shipped).await?;
            }
            if !pending && !force {
                self.settle(&shipped).await?;
                return Ok(None);
            }
            let report = self.ship_locked(&mut shipped).await?;
            self.settle(&shipped).await?;
            Ok(Some(report))
        }
        .await;
        let mut s = self.status.lock();
        if let Ok(Some(r)) = &result {
            s.last_seq = Some(r.seq);
            s.last_taken_at = shipped.kept.get(&r.seq).map(|c| c.taken_at);
            s.checkpoints += 1;
            s.segments_uploaded += r.segments_uploaded as u64;
            s.bytes_uploaded += r.bytes_uploaded;
            s.objects_deleted += r.objects_deleted as u64;
            s.last_duration_ms = started.elapsed().as_millis() as u64;
            // Changes after the cut are pending since the cut at the latest.
            s.shipped_position = Some(r.position);
            self.shipped_position.send_replace(Some(r.position));
            s.pending_since = (Some(self.store.catalog().durable_position()) != s.shipped_position)
                .then_some(s.last_taken_at.unwrap_or_else(now_secs));
        }
        s.attempts.note(&result);
        result
    }

    /// Reads the bucket's checkpoints; removes what an interrupted shipment left (catalogs
    /// and segments no checkpoint lists).
    async fn open(&self, shipped: &mut Shipped) -> anyhow::Result<()> {
        let seqs = crate::restore::checkpoints(&self.bucket).await?;
        // Newest first: the kept ones, until one is past both the kept number and the grace
        // (every older one is too).
        let mut kept = BTreeMap::new();
        let mut expired = Vec::new();
        let now = now_secs();
        for seq in seqs.iter().rev() {
            if !expired.is_empty() {
                expired.push(*seq);
                continue;
            }
            let name = layout::checkpoint_name(*seq);
            let Some(bytes) = self.bucket.get(&name).await? else {
                continue;
            };
            let record = CheckpointRecord::parse(&bytes)
                .with_context(|| format!("reading {name} in {}", self.bucket.describe()))?;
            if kept.len() >= self.cfg.checkpoints_kept && !self.in_grace(&record, now) {
                expired.push(*seq);
                continue;
            }
            kept.insert(*seq, record);
        }
        let listed: BTreeSet<u64> = kept
            .values()
            .flat_map(|c| c.segments.iter().map(|s| s.id))
            .collect();
        let mut deleted = 0u64;
        // Checkpoints past the kept number and the grace (`checkpoints_kept` was lowered, the
        // registry was stopped a while, or a prune was interrupted): their records go first,
        // so none is listed without its objects.
        for seq in &expired {
            self.bucket.delete(&layout::checkpoint_name(*seq)).await?;
            deleted += 1;
        }
        for (name, _) in self.bucket.list("segments/").await? {
            if layout::segment_id(&name).is_some_and(|id| !listed.contains(&id)) {
                self.bucket.delete(&name).await?;
                deleted += 1;
            }
        }
        for (name, _) in self.bucket.list("indexes/").await? {
            if layout::index_id(&name).is_some_and(|id| !listed.contains(&id)) {
                self.bucket.delete(&name).await?;
                deleted += 1;
            }
        }
        for (name, _) in self.bucket.list("catalogs/").await? {
            if layout::catalog_seq(&name).is_some_and(|s| !kept.contains_key(&s)) {
                self.bucket.delete(&name).await?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            tracing::info!(
                objects = deleted,
                bucket = self.bucket.describe(),
                "removed objects an interrupted shipment left in the bucket"
            );
        }
        self.status.lock().objects_deleted += deleted;
        if let Some((seq, newest)) = kept.iter().next_back() {
            let mut s = self.status.lock();
            s.last_seq = Some(*seq);
            s.last_taken_at = Some(newest.taken_at);
        }
        shipped.kept = kept;
        shipped.opened = true;
        Ok(())
    }

    async fn ship_locked(&self, shipped: &mut Shipped) -> anyhow::Result<ShipReport> {
        let started = Instant::now();
        let position = self.store.catalog().durable_position();
        let taken_at = now_secs();
        let seq = shipped.kept.keys().next_back().map_or(1, |s| s + 1);
        let newest = shipped.kept.values().next_back();
        // Index files go up for the segments whose index the bucket does not hold yet.
        let indexed: BTreeSet<u64> = newest
            .map(|c| {
                c.segments
                    .iter()
                    .filter(|s| s.index.is_some())
                    .map(|s| s.id)
                    .collect()
            })
            .unwrap_or_default();
        let store = self.store.clone();
        let mut cp = tokio::task::spawn_blocking(move || {
            store.checkpoint_indexing(&|id| !indexed.contains(&id))
        })
        .await?
        .context("taking a checkpoint of the store")?;
        let known: BTreeMap<u64, &SegmentRef> = newest
            .map(|c| c.segments.iter().map(|s| (s.id, s)).collect())
            .unwrap_or_default();
        let mut segments = Vec::with_capacity(cp.segments.len());
        let (mut uploaded, mut uploaded_bytes) = (0usize, 0u64);
        for seg in std::mem::take(&mut cp.segments) {
            if let Some(r) = known.get(&seg.id()) {
                if r.len != seg.len() {
                    bail!(
                        "checkpoint {} in {} lists segment {} with {} bytes, but this data \
                         directory has it with {}: the prefix holds another registry's \
                         checkpoints (give this one its own prefix), or this directory was \
                         restored from an older checkpoint (ship it to a new prefix)",
                        newest.map_or(0, |c| c.seq),
                        self.bucket.describe(),
                        seg.id(),
                        r.len,
                        seg.len()
                    );
                }
                let mut r = (*r).clone();
                if r.index.is_none() {
                    let index = self.put_index(r.id, &mut cp.indexes).await?;
                    uploaded_bytes += index.len;
                    r.index = Some(index);
                }
                segments.push(r);
                continue;
            }
            let (id, len) = (seg.id(), seg.len());
            let seg: Arc<SealedSegment> = Arc::new(seg);
            let sha = self
                .bucket
                .upload(&layout::segment_name(id), len, move |offset, buf| {
                    seg.read_at(buf, offset).map_err(anyhow::Error::from)
                })
                .await?;
            // The index after its segment: an index object never names a segment the
            // bucket does not hold.
            let index = self.put_index(id, &mut cp.indexes).await?;
            uploaded += 1;
            uploaded_bytes += len + index.len;
            segments.push(SegmentRef {
                id,
                len,
                sha256: hex::encode(sha),
                index: Some(index),
            });
        }
        let catalog = self
            .bucket
            .put_object(layout::catalog_name(seq), cp.snapshot)
            .await?;
        uploaded_bytes += catalog.len;
        let record = CheckpointRecord {
            format: CHECKPOINT_FORMAT,
            seq,
            taken_at,
            generation: cp.generation,
            repos: cp.repos,
            catalog,
            segments,
            written_by: format!("ballast {}", env!("CARGO_PKG_VERSION")),
        };
        let json = serde_json::to_vec_pretty(&record)?;
        self.bucket
            .put(&layout::checkpoint_name(seq), Bytes::from(json))
            .await?;
        let (count, bytes) = (record.segments.len(), record.bytes());
        shipped.kept.insert(seq, record);
        let deleted = self.prune(shipped).await?;
        Ok(ShipReport {
            seq,
            segments: count,
            bytes,
            segments_uploaded: uploaded,
            bytes_uploaded: uploaded_bytes,
            objects_deleted: deleted,
            ms: started.elapsed().as_millis() as u64,
            position,
        })
    }

    /// Uploads the index file of segment `id`, which the checkpoint took.
    async fn put_index(
        &self,
        id: u64,
        indexes: &mut BTreeMap<u64, Vec<u8>>,
    ) -> anyhow::Result<ObjectRef> {
        let bytes = indexes
            .remove(&id)
            .with_context(|| format!("the checkpoint took no index file of segment {id}"))?;
        self.bucket.put_object(layout::index_name(id), bytes).await
    }

    /// True while `record` is within `checkpoint_grace_secs` of its cut at `now`.
    fn in_grace(&self, record: &CheckpointRecord, now: u64) -> bool {
        now < record
            .taken_at
            .saturating_add(self.cfg.checkpoint_grace_secs)
    }

    /// Deletes the oldest checkpoints while there are more than `checkpoints_kept` and the
    /// oldest is past `checkpoint_grace_secs`, with their catalogs and the segments only they
    /// listed.
    async fn prune(&self, shipped: &mut Shipped) -> anyhow::Result<usize> {
        let mut deleted = 0;
        let now = now_secs();
        while shipped.kept.len() > self.cfg.checkpoints_kept {
            let Some(entry) = shipped.kept.first_entry() else {
                break;
            };
            if self.in_grace(entry.get(), now) {
                break;
            }
            let (seq, old) = entry.remove_entry();
            // The record first: a checkpoint is never listed without its objects.
            self.bucket.delete(&layout::checkpoint_name(seq)).await?;
            self.bucket.delete(&old.catalog.name).await?;
            deleted += 2;
            let still: BTreeSet<u64> = shipped
                .kept
                .values()
                .flat_map(|c| c.segments.iter().map(|s| s.id))
                .collect();
            for s in old.segments.iter().filter(|s| !still.contains(&s.id)) {
                self.bucket.delete(&layout::segment_name(s.id)).await?;
                self.bucket.delete(&layout::index_name(s.id)).await?;
                deleted += 2;
            }
        }
        Ok(deleted)
    }

    /// Waits until a checkpoint holding catalog position `position` is in the bucket
    /// (`acknowledge = "bucket"`), asking the shipping loop to ship now; pushes waiting
    /// together share one shipment. Fails after `timeout`.
    pub async fn wait_shipped(
        &self,
        position: (u64, u64),
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut shipped = self.shipped_position.subscribe();
        self.wake.notify_one();
        let reached = async {
            loop {
                if shipped.borrow_and_update().is_some_and(|p| p >= position) {
                    return;
                }
                if shipped.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, reached).await.map_err(|_| {
            let why = self.status.lock().attempts.last_error.clone();
            anyhow::anyhow!(
                "not in the bucket after {} s{}",
                timeout.as_secs(),
                why.map_or(String::new(), |_| " (shipments are failing)".into())
            )
        })
    }

    /// Ships whenever the catalog changed, at most every `ship_interval_secs` (backing off
    /// up to five minutes while shipments fail), until `stop` turns true; then ships once
    /// more, within `final_grace`, so a clean stop leaves the bucket current.
    pub async fn run(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        final_grace: Duration,
    ) {
        let interval = Duration::from_secs(self.cfg.ship_interval_secs);
        let mut last_attempt: Option<Instant> = None;
        let mut woken = false;
        loop {
            let failures = self.status.lock().attempts.consecutive_failures.min(8) as u32;
            let wait = (interval * 2u32.pow(failures)).min(Duration::from_secs(300));
            let due =
                std::mem::take(&mut woken) || last_attempt.is_none_or(|t| t.elapsed() >= wait);
            if due {
                let pending = {
                    let shipped = self.shipped.lock().await;
                    !shipped.opened || self.note_changes() || self.lease_due()
                };
                if pending {
                    last_attempt = Some(Instant::now());
                    match self.ship(false).await {
                        Ok(Some(r)) => tracing::info!(
                            seq = r.seq,
                            segments = r.segments_uploaded,
                            bytes = r.bytes_uploaded,
                            ms = r.ms,
                            "checkpoint shipped to the bucket"
                        ),
                        Ok(None) => {}
                        Err(e) => tracing::warn!(
                            error = %format!("{e:#}"),
                            bucket = self.bucket.describe(),
                            "shipping to the bucket failed; pushes go on locally and the \
                             shipment is tried again"
                        ),
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.wake.notified() => woken = true,
                _ = stop.changed() => break,
            }
        }
        match tokio::time::timeout(final_grace, self.ship(false)).await {
            Ok(Ok(Some(r))) => tracing::info!(seq = r.seq, "last checkpoint shipped at shutdown"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "the last shipment failed"),
            Err(_) => tracing::warn!(
                "the last shipment did not finish within {} s: the bucket lags behind",
                final_grace.as_secs()
            ),
        }
        if let Err(e) = lease::release(&self.bucket, &self.owner).await {
            tracing::warn!(error = %format!("{e:#}"), "could not release the bucket's lease; it lapses by itself");
        }
    }
}
