//! Warm upload sessions: the blob writers of chunked uploads this process has seen in order.

/// Blob writers of live upload sessions: a PATCH spools its bytes (durably, for restarts)
/// and feeds them to the session's writer as well, so finishing the upload does not read and
/// ingest the spool again. After a restart sessions are cold and finish from the spool.
#[derive(Default)]
pub struct WarmUploads {
    writers:
        parking_lot::Mutex<std::collections::HashMap<String, (ballast_engine::BlobWriter, u64)>>,
}

/// Most sessions with a warm writer at once (each may hold two threads and a chunk buffer).
const WARM_UPLOADS_MAX: usize = 32;

impl WarmUploads {
    /// Takes the session's writer when it has seen exactly `len` bytes.
    pub fn take(&self, id: &str, len: u64) -> Option<ballast_engine::BlobWriter> {
        let mut w = self.writers.lock();
        match w.remove(id) {
            Some((writer, seen)) if seen == len => Some(writer),
            _ => None,
        }
    }

    /// Keeps a writer that has seen `len` bytes of the session.
    pub fn put(&self, id: &str, writer: ballast_engine::BlobWriter, len: u64) {
        let mut w = self.writers.lock();
        if w.len() < WARM_UPLOADS_MAX {
            w.insert(id.to_owned(), (writer, len));
        }
    }

    /// True when another warm session fits.
    pub fn has_room(&self) -> bool {
        self.writers.lock().len() < WARM_UPLOADS_MAX
    }

    /// Forgets a session (cancelled, finished or expired).
    pub fn forget(&self, id: &str) {
        self.writers.lock().remove(id);
    }

    /// Ids of the sessions with a warm writer.
    pub fn ids(&self) -> Vec<String> {
        self.writers.lock().keys().cloned().collect()
    }
}
