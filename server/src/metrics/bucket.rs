//! The metrics of shipping to the bucket (`[bucket]`), read from the shipper's status and
//! request counters at each scrape.

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

impl Collector for BucketCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0.status();
        let now = crate::now_secs();
        let one = |e: &mut DescriptorEncoder,
                   name: &str,
                   help: &str,
                   unit: Option<Unit>,
                   kind: MetricType,
                   v: u64|
         -> std::fmt::Result {
            let m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
            match kind {
                MetricType::Gauge => ConstGauge::new(v as i64).encode(m),
                _ => ConstCounter::new(v).encode(m),
            }
        };
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
            s.failures,
        )?;
        one(
            &mut e,
            "bucket_consecutive_failures",
            "Shipments failed in a row (0 while the bucket is reachable)",
            None,
            g,
            s.consecutive_failures,
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
        for (name, help, unit, kind, v) in [
            (
                "bucket_remote_segments",
                "Segments whose local file was dropped (cache_bytes_max): read from the bucket",
                None,
                g,
                s.remote_segments,
            ),
            (
                "bucket_remote",
                "Bytes of the segments read from the bucket",
                Some(Unit::Bytes),
                g,
                s.remote_bytes,
            ),
            (
                "bucket_cache",
                "Bytes of blocks fetched back from the bucket and cached locally",
                Some(Unit::Bytes),
                g,
                s.cache_bytes,
            ),
            (
                "bucket_cache_hits",
                "Block reads served by the local cache",
                None,
                c,
                s.cache_hits,
            ),
            (
                "bucket_cache_misses",
                "Blocks fetched from the bucket",
                None,
                c,
                s.cache_misses,
            ),
            (
                "bucket_cache_fetched",
                "Bytes fetched from the bucket for reads",
                Some(Unit::Bytes),
                c,
                s.cache_bytes_fetched,
            ),
            (
                "bucket_cache_failures",
                "Reads from the bucket that failed (answered 503)",
                None,
                c,
                s.cache_failures,
            ),
        ] {
            one(&mut e, name, help, unit, kind, v)?;
        }
        let r = &self.0.bucket().requests;
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
            &mut e,
            "bucket_request_failures",
            "Requests to the object store that failed after their retries",
            None,
            c,
            r.failures.load(Relaxed),
        )
    }
}
