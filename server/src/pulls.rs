//! Pull tracking: manifest pulls are counted in memory and committed to the catalog in
//! batches (`Op::Pulled`), every `pull_flush_secs` and at shutdown, so a pull never waits for
//! a sync; a crash loses at most the pulls of the last interval. Retention reads the counts
//! and last-pull times ("most recently pulled", "pulled within").
//!
//! A read replica's pulls count too: it reports them to the bucket instead
//! (`ballast_bucket::pulls`), and its primary takes the reports in at each flush.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ballast_engine::catalog::Op;
use ballast_engine::Digest;
use parking_lot::Mutex;

use crate::App;

/// Pulls not yet committed, by repository and manifest: (count, last).
#[derive(Debug, Default)]
pub struct PullRecorder {
    pending: Mutex<HashMap<(String, Digest), (u64, u64)>>,
}

impl PullRecorder {
    /// Counts one pull of `digest` in `repo` at `at`.
    pub fn record(&self, repo: &str, digest: Digest, at: u64) {
        let mut p = self.pending.lock();
        let e = p.entry((repo.to_owned(), digest)).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(at);
    }

    /// Takes what is pending, as catalog ops.
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .map(|((repo, digest), (count, at))| Op::Pulled {
                repo,
                digest,
                count,
                at,
            })
            .collect()
    }

    /// Takes what is pending, as a replica reports it.
    fn take_report(&self) -> Vec<ballast_bucket::pulls::Pull> {
        std::mem::take(&mut *self.pending.lock())
            .into_iter()
            .map(
                |((repo, digest), (count, at))| ballast_bucket::pulls::Pull {
                    repo,
                    digest: digest.to_string(),
                    count,
                    at,
                },
            )
            .collect()
    }

    /// Puts back what a report that failed held (to be sent with the next).
    fn put_back(&self, pulls: Vec<ballast_bucket::pulls::Pull>) {
        for p in pulls {
            if let Ok(d) = p.digest.parse() {
                let mut pending = self.pending.lock();
                let e = pending.entry((p.repo, d)).or_insert((0, 0));
                e.0 += p.count;
                e.1 = e.1.max(p.at);
            }
        }
    }

    /// Commits what is pending in one catalog batch (one fsync). A failure puts nothing
    /// back: the counts of that interval are lost, as in a crash, and it is logged.
    pub fn flush(&self, store: &ballast_engine::Store) {
        let ops = self.take();
        if ops.is_empty() {
            return;
        }
        let n = ops.len();
        if let Err(e) = store.commit_ops(ops) {
            tracing::warn!(error = %e, manifests = n, "recording pulls in the catalog failed");
        }
    }
}

/// Flushes every `pull_flush_secs`.
pub async fn flush_loop(app: Arc<App>) {
    // (A primary not tracking pulls still clears its replicas' reports.)
    if !app.config.pull_tracking && app.bucket.is_none() {
        return;
    }
    let every = Duration::from_secs(app.config.pull_flush_secs.max(1));
    loop {
        tokio::time::sleep(every).await;
        flush(&app, true).await;
    }
}

/// One flush: a primary commits the pulls it counted and (with `take_in`) takes in its
/// replicas' reports; a replica reports its pulls to the bucket (kept for the next flush
/// when that fails).
pub async fn flush(app: &Arc<App>, take_in_reports: bool) {
    if let Some(f) = &app.replica {
        let pulls = app.pulls.take_report();
        if pulls.is_empty() {
            return;
        }
        if let Err(e) = ballast_bucket::pulls::send(f.bucket(), f.owner(), pulls.clone()).await {
            tracing::warn!(error = %format!("{e:#}"), "reporting pulls to the primary through the bucket failed; they are sent with the next report");
            app.pulls.put_back(pulls);
        }
        return;
    }
    let a = app.clone();
    let _ = tokio::task::spawn_blocking(move || a.pulls.flush(&a.store)).await;
    if let Some(s) = app.bucket.as_ref().filter(|_| take_in_reports) {
        if let Err(e) = take_in(app, s.bucket()).await {
            tracing::warn!(error = %format!("{e:#}"), "taking in the read replicas' pull reports failed; tried again at the next flush");
        }
    }
}

/// Commits the pulls every replica reported (in one batch), then deletes their reports. A
/// time past now (a replica's clock ahead) counts as now.
async fn take_in(app: &Arc<App>, bucket: &ballast_bucket::Bucket) -> anyhow::Result<()> {
    let (names, pulls, bad) = ballast_bucket::pulls::gather(bucket).await?;
    for name in &bad {
        tracing::warn!(object = %name, "a pull report in the bucket is not one this version reads; left alone");
    }
    if names.is_empty() {
        return Ok(());
    }
    if !app.config.pull_tracking {
        // This registry does not track pulls: the reports go uncounted.
        for name in &names {
            bucket.delete(name).await?;
        }
        return Ok(());
    }
    let now = crate::now_secs();
    let ops: Vec<Op> = pulls
        .into_iter()
        .filter_map(|p| {
            Some(Op::Pulled {
                repo: p.repo,
                digest: p.digest.parse().ok()?,
                count: p.count,
                at: p.at.min(now),
            })
        })
        .collect();
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.commit_ops(ops)).await??;
    for name in &names {
        bucket.delete(name).await?;
    }
    Ok(())
}
