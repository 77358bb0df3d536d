//! Pull tracking: manifest pulls are counted in memory and committed to the catalog in
//! batches (`Op::Pulled`), every `pull_flush_secs` and at shutdown, so a pull never waits for
//! a sync; a crash loses at most the pulls of the last interval. Retention reads the counts
//! and last-pull times ("most recently pulled", "pulled within").

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
    if !app.config.pull_tracking {
        return;
    }
    let every = Duration::from_secs(app.config.pull_flush_secs.max(1));
    loop {
        tokio::time::sleep(every).await;
        let app = app.clone();
        let _ = tokio::task::spawn_blocking(move || app.pulls.flush(&app.store)).await;
    }
}
