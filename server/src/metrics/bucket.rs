//! The metrics of shipping to the bucket (`[bucket]`), read from the shipper's status and
//! request counters at each scrape; on a read replica, what it follows and reads.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

pub(super) struct BucketCollector(pub(super) Arc<ballast_bucket::Shipper>);

impl std::fmt::Debug for BucketCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BucketCollector")
    }
}

pub(super) struct ReplicaCollector(pub(super) Arc<ballast_bucket::Follower>);

impl std::fmt::Debug for ReplicaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaCollector")
    }
}

impl Collector for ReplicaCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.status();
        let (g, c) = (MetricType::Gauge, MetricType::Counter);
        for (name, help, unit, kind, v) in [
            (
                "replica_lag",
                "Seconds since this replica last saw that it serves the bucket's newest \
                 checkpoint (add the primary's bucket_lag for its lag behind pushes)",
                Some(Unit::Seconds),
                g,
                s.lag_secs(crate::now_secs()),
            ),
            (
                "replica_checkpoint_taken",
                "When the primary cut the checkpoint this replica serves (Unix seconds; 0: \
                 none yet)",
                Some(Unit::Seconds),
                g,
                s.taken_at.unwrap_or(0),
            ),
            (
                "replica_checkpoint",
                "Sequence number of the checkpoint served (0: none yet)",
                None,
                g,
                s.seq.unwrap_or(0),
            ),
            (
                "replica_newest_checkpoint",
                "Sequence number of the newest checkpoint seen in the bucket",
                None,
                g,
                s.newest_seq.unwrap_or(0),
            ),
            (
                "replica_follows",
                "Checkpoints this replica moved to",
                None,
                c,
                s.follows,
            ),
            (
                "replica_follow_failures",
                "Attempts to follow a checkpoint that failed (each is tried again)",
                None,
                c,
                s.attempts.failures,
            ),
            (
                "replica_consecutive_failures",
                "Attempts to follow failed in a row (0 while following works)",
                None,
                g,
                s.attempts.consecutive_failures,
            ),
            (
                "replica_segments_added",
                "Segments taken from the primary's checkpoints",
                None,
                c,
                s.segments_added,
            ),
            (
                "replica_segments_dropped",
                "Segments dropped because the primary's checkpoints no longer list them",
                None,
                c,
                s.segments_dropped,
            ),
        ] {
            one(&mut e, name, help, unit, kind, v)?;
        }
        encode_reads(&mut e, &s.reads, &self.0.bucket().requests)
    }
}

fn one(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    v: u64,
) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
    match kind {
        MetricType::Gauge => ConstGauge::new(v as i64).encode(m),
        _ => ConstCounter::new(v).encode(m),
    }
}

/// Reads through the bucket, a primary's (tiering) or a replica's: remote segments, the
/// block cache, and the requests to the store.
fn encode_reads(
    e: &mut DescriptorEncoder,
    f: &ballast_bucket::tier::ReadFigures,
    r: &ballast_bucket::client::Requests,
) -> std::fmt::Result {
    let (g, c) = (MetricType::Gauge, MetricType::Counter);
    for (name, help, unit, kind, v) in [
        (
            "bucket_remote_segments",
            "Segments whose local file was dropped (cache_bytes_max): read from the bucket",
            None,
            g,
            f.remote_segments,
        ),
        (
            "bucket_remote",
            "Bytes of the segments read from the bucket",
            Some(Unit::Bytes),
            g,
            f.remote_bytes,
        ),
        (
            "bucket_cache",
            "Bytes of blocks fetched back from the bucket and cached locally",
            Some(Unit::Bytes),
            g,
            f.cache_bytes,
        ),
        (
            "bucket_cache_hits",
            "Block reads served by the local cache",
            None,
            c,
            f.cache_hits,
        ),
        (
            "bucket_cache_misses",
            "Blocks fetched from the bucket",
            None,
            c,
            f.cache_misses,
        ),
        (
            "bucket_cache_fetched",
            "Bytes fetched from the bucket for reads",
            Some(Unit::Bytes),
            c,
            f.cache_bytes_fetched,
        ),
        (
            "bucket_cache_failures",
            "Reads from the bucket that failed (answered 503)",
            None,
            c,
            f.cache_failures,
        ),
    ] {
        one(e, name, help, unit, kind, v)?;
    }
    {
        let mut m = e.encode_descriptor(
            "bucket_requests",
            "Requests to the object store by kind (put, part, get, list, delete)",
            None,
            c,
        )?;
        for (kind, n) in [
            ("put", &r.puts),
            ("part", &r.parts),
            ("get", &r.gets),
            ("list", &r.lists),
            ("delete", &r.deletes),
        ] {
            ConstCounter::new(n.load(Relaxed)).encode(m.encode_family(&[("kind", kind)])?)?;
        }
    }
    one(
        e,
        "bucket_request_failures",
        "Requests to the object store that failed after their retries",
        None,
        c,
        r.failures.load(Relaxed),
    )
}

impl Collector for BucketCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.status();
        let now = crate::now_secs();
        let (g, c) = (MetricType::Gauge, MetricType::Counter);
        one(
            &mut e,
            "bucket_lag",
            "Age of the oldest change the bucket's newest checkpoint does not hold (0: current)",
            Some(Unit::Seconds),
            g,
            s.lag_secs(now),
        )?;
        one(
            &mut e,
            "bucket_last_checkpoint",
            "When the bucket's newest checkpoint was cut (Unix seconds; 0: none yet)",
            Some(Unit::Seconds),
            g,
            s.last_taken_at.unwrap_or(0),
        )?;
        one(
            &mut e,
            "bucket_checkpoints",
            "Checkpoints shipped to the bucket",
            None,
            c,
            s.checkpoints,
        )?;
        one(
            &mut e,
            "bucket_ship_failures",
            "Shipments to the bucket that failed (each is tried again)",
            None,
            c,
            s.attempts.failures,
        )?;
        one(
            &mut e,
            "bucket_consecutive_failures",
            "Shipments failed in a row (0 while the bucket is reachable)",
            None,
            g,
            s.attempts.consecutive_failures,
        )?;
        one(
            &mut e,
            "bucket_segments_uploaded",
            "Segment files uploaded to the bucket",
            None,
            c,
            s.segments_uploaded,
        )?;
        one(
            &mut e,
            "bucket_uploaded",
            "Bytes uploaded to the bucket (segments and catalogs)",
            Some(Unit::Bytes),
            c,
            s.bytes_uploaded,
        )?;
        one(
            &mut e,
            "bucket_objects_deleted",
            "Objects deleted from the bucket (old checkpoints and what only they held)",
            None,
            c,
            s.objects_deleted,
        )?;
        encode_reads(&mut e, &s.reads, &self.0.bucket().requests)
    }
}
