//! The metrics of the pull-through cache's upstreams and of the replication rules, read
//! from their counters at each scrape.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

/// Reads the pull-through upstreams' counters at each scrape.
pub(super) struct PullThroughCollector(pub(super) Vec<Arc<crate::upstream::Upstream>>);

impl std::fmt::Debug for PullThroughCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PullThroughCollector")
    }
}

impl Collector for PullThroughCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        {
            let mut m = e.encode_descriptor(
                "pull_through_upstream_requests",
                "Requests to pull-through upstreams by outcome (ok, not_found, unreachable, \
                 rate_limited, denied, failed)",
                None,
                MetricType::Counter,
            )?;
            for u in &self.0 {
                let counts: Vec<(&'static str, u64)> = u
                    .counters
                    .requests
                    .lock()
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect();
                for (outcome, v) in counts {
                    let labels = [("upstream", u.cfg.name.as_str()), ("outcome", outcome)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        let per_upstream = |e: &mut DescriptorEncoder,
                            name: &str,
                            help: &str,
                            unit: Option<Unit>,
                            v: &dyn Fn(&crate::upstream::Upstream) -> u64|
         -> std::fmt::Result {
            let mut m = e.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for u in &self.0 {
                let labels = [("upstream", u.cfg.name.as_str())];
                ConstCounter::new(v(u)).encode(m.encode_family(&labels)?)?;
            }
            Ok(())
        };
        per_upstream(
            &mut e,
            "pull_through_fetched",
            "Bytes fetched from pull-through upstreams (manifests and blobs)",
            Some(Unit::Bytes),
            &|u| u.counters.bytes.load(Relaxed),
        )?;
        per_upstream(
            &mut e,
            "pull_through_manifests_cached",
            "Manifests fetched and stored by the pull-through cache",
            None,
            &|u| u.counters.manifest_fills.load(Relaxed),
        )?;
        per_upstream(
            &mut e,
            "pull_through_blobs_cached",
            "Blobs fetched and stored by the pull-through cache",
            None,
            &|u| u.counters.blob_fills.load(Relaxed),
        )?;
        per_upstream(
            &mut e,
            "pull_through_offline_serves",
            "Tag pulls answered from the cache because the upstream could not be asked",
            None,
            &|u| u.counters.offline_serves.load(Relaxed),
        )?;
        per_upstream(
            &mut e,
            "pull_through_evicted_images",
            "Cached images evicted",
            None,
            &|u| u.counters.evicted.load(Relaxed),
        )
    }
}

/// Reads the replication rules' counters (and their lag in the outbox) at each scrape.
pub(super) struct ReplicationCollector(
    pub(super) Vec<Arc<crate::replication::Rule>>,
    pub(super) Arc<crate::webhooks::Webhooks>,
);

impl std::fmt::Debug for ReplicationCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicationCollector")
    }
}

impl Collector for ReplicationCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let per_rule = |e: &mut DescriptorEncoder,
                        name: &str,
                        help: &str,
                        unit: Option<Unit>,
                        kind: MetricType,
                        v: &dyn Fn(&crate::replication::Rule) -> u64|
         -> std::fmt::Result {
            let mut m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
            for r in &self.0 {
                let labels = [("rule", r.cfg.name.as_str())];
                match kind {
                    MetricType::Gauge => {
                        ConstGauge::new(v(r) as i64).encode(m.encode_family(&labels)?)?
                    }
                    _ => ConstCounter::new(v(r)).encode(m.encode_family(&labels)?)?,
                }
            }
            Ok(())
        };
        let c = MetricType::Counter;
        per_rule(
            &mut e,
            "replication_manifests",
            "Manifests put on replication targets",
            None,
            c,
            &|r| r.counters.manifests.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_blobs_uploaded",
            "Blobs uploaded to replication targets",
            None,
            c,
            &|r| r.counters.blobs.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_blobs_mounted",
            "Blobs mounted on replication targets from another of their repositories",
            None,
            c,
            &|r| r.counters.mounted.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_blobs_present",
            "Blobs replication found on the target already",
            None,
            c,
            &|r| r.counters.skipped.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_uploaded",
            "Blob bytes uploaded to replication targets",
            Some(Unit::Bytes),
            c,
            &|r| r.counters.bytes.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_deletes",
            "Deletes replicated",
            None,
            c,
            &|r| r.counters.deletes.load(Relaxed),
        )?;
        per_rule(
            &mut e,
            "replication_failures",
            "Replication attempts that failed (each retry counts)",
            None,
            c,
            &|r| r.counters.failures.load(Relaxed),
        )?;
        let outbox = self.1.outbox();
        let now = crate::now_secs();
        per_rule(
            &mut e,
            "replication_lag",
            "Age of the oldest change a rule has not replicated yet (0: none)",
            Some(Unit::Seconds),
            MetricType::Gauge,
            &|r| {
                outbox
                    .and_then(|o| o.oldest_pending(&r.consumer()).ok().flatten())
                    .map_or(0, |at| now.saturating_sub(at))
            },
        )?;
        per_rule(
            &mut e,
            "replication_last_success",
            "When a rule last replicated a change (Unix seconds; 0: not yet)",
            Some(Unit::Seconds),
            MetricType::Gauge,
            &|r| r.counters.last_success.load(Relaxed),
        )
    }
}
