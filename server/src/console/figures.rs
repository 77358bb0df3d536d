//! The console's figures of who uses which stored bytes ([`Ownership`]), made off the
//! async threads and kept: made again when the catalog changed and the last ones are at
//! least [`REFRESH`] old, while pages show the last ones with their time. One pass reads the
//! recipes of every image, so it is never made per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ballast_engine::ownership::Ownership;
use parking_lot::Mutex;

use crate::App;

/// Least age of figures before a change of the catalog makes new ones.
pub const REFRESH: Duration = Duration::from_secs(5);

/// Figures and what they were made of.
#[derive(Debug)]
pub struct Made {
    /// The figures.
    pub own: Ownership,
    /// When (seconds since the epoch).
    pub at: u64,
    /// The catalog's journal position they saw.
    position: (u64, u64),
}

/// The kept figures.
#[derive(Debug, Default)]
pub struct Figures {
    last: Mutex<Option<Arc<Made>>>,
    making: AtomicBool,
    made: tokio::sync::Notify,
}

impl Figures {
    /// The figures: the last ones made (new ones are started when stale). When there are
    /// none yet, waits up to `wait` for the first.
    pub async fn get(&self, app: &Arc<App>, wait: Duration) -> Option<Arc<Made>> {
        let position = app.store.catalog().durable_position();
        let last = self.last.lock().clone();
        let stale = last.as_ref().is_none_or(|m| {
            m.position != position && crate::now_secs().saturating_sub(m.at) >= REFRESH.as_secs()
        });
        if stale && !self.making.swap(true, Ordering::AcqRel) {
            let app2 = app.clone();
            let made = tokio::task::spawn_blocking(move || {
                let position = app2.store.catalog().durable_position();
                let at = crate::now_secs();
                Ownership::compute(&app2.store).map(|own| Made { own, at, position })
            });
            let app3 = app.clone();
            tokio::spawn(async move {
                let me = &app3.console.figures;
                match made.await {
                    Ok(Ok(m)) => *me.last.lock() = Some(Arc::new(m)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "console: counting stored bytes failed")
                    }
                    Err(e) => tracing::warn!(error = %e, "console: counting stored bytes failed"),
                }
                me.making.store(false, Ordering::Release);
                me.made.notify_waiters();
            });
        }
        if last.is_some() {
            return last;
        }
        let notified = self.made.notified();
        if let Some(m) = self.last.lock().clone() {
            return Some(m);
        }
        let _ = tokio::time::timeout(wait, notified).await;
        self.last.lock().clone()
    }
}
