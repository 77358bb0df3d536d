//! What the engine counts as it works, for `ballast inspect`, benchmarks and the server's
//! metrics: plain atomics the hot paths bump, and a fixed-bucket latency histogram. The
//! engine knows no metrics format; the server reads these at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of one store.
#[derive(Debug, Default)]
pub struct Stats {
    /// Chunks written.
    pub chunks_written: AtomicU64,
    /// Chunks found already stored.
    pub chunks_deduped: AtomicU64,
    /// Bytes appended to segments.
    pub bytes_appended: AtomicU64,
    /// fsyncs of segment files.
    pub syncs: AtomicU64,
    /// Chunks read and checked against their BLAKE3 id.
    pub chunks_verified: AtomicU64,
    /// Chunk reads that found damage: bytes not matching their BLAKE3 id, a record that
    /// does not hold the chunk the index names, a record that cannot be read as one.
    pub chunk_read_failures: AtomicU64,
    /// Bytes read ahead of readers through io_uring (`read_ahead = "uring"`).
    pub bytes_read_ahead: AtomicU64,
    /// Records read from remote segments (`store/remote.rs`).
    pub remote_reads: AtomicU64,
}

/// Upper bounds of the latency buckets, in seconds: 50 µs to 10 s, roughly doubling. An fsync
/// on NVMe takes tens of microseconds to a few milliseconds; on a busy disk, hundreds.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// A latency histogram with the fixed [`LATENCY_BOUNDS`] (and one bucket above them):
/// lock-free, a few atomic adds an observation.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// What a histogram held at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations in this bucket alone)`; the last bound is
    /// infinity.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of all observations, in seconds.
    pub sum_secs: f64,
    /// Observations.
    pub count: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now (each read on its own: a scrape during observations may see a count
    /// one ahead of its bucket, which the next scrape settles).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let bound = LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
                (bound, n.load(Ordering::Relaxed))
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// fsync latency of every file the engine syncs (segments, the catalog journal and
/// snapshots, upload logs), process-wide: it describes the disk, not one store.
pub fn fsync_latency() -> &'static Histogram {
    static FSYNC: std::sync::OnceLock<Histogram> = std::sync::OnceLock::new();
    FSYNC.get_or_init(Histogram::default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.buckets[0], (0.000_05, 2), "bounds are inclusive");
        let at = |b: f64| s.buckets.iter().find(|(x, _)| *x == b).expect("bucket").1;
        assert_eq!(at(0.005), 1);
        assert_eq!(s.buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((s.sum_secs - 60.003_06).abs() < 1e-9, "{}", s.sum_secs);
    }
}
