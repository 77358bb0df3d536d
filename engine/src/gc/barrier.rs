//! The GC barrier: what a running collection needs from writers. Dedup hits and new
//! references pin what they rely on, committed blobs hold a lease for the grace period,
//! running blob writers are registered, and the store's catalog commit is the one door that
//! pins every blob a batch starts to reference (docs/design.md, "Garbage collection").

use std::collections::{HashMap, HashSet};

use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Result};
use crate::store::Store;

/// What a running collection needs from writers (docs/design.md, "Garbage collection").
#[derive(Default)]
pub(crate) struct GcState {
    /// A collection is between its mark and the removal of its victims.
    pub(crate) running: bool,
    /// Chunks that writers deduplicated against while it ran.
    pub(crate) pinned_chunks: HashSet<ChunkId>,
    /// Blobs that something started to reference while it ran.
    pub(crate) pinned_blobs: HashSet<Digest>,
    /// Blobs committed recently (new or deduplicated), with the time: a push links its blob
    /// a moment after committing it, so a collection that starts in between must keep the
    /// blob and its chunks (a lease for the grace period).
    pub(crate) leases: HashMap<Digest, u64>,
    /// Blob writers still running → the chunks they deduplicated against while no
    /// collection ran: a collection that starts before they commit keeps those chunks (their
    /// recipes do not exist yet to say so).
    pub(crate) writing: HashMap<u64, Vec<ChunkId>>,
    /// The last writer id handed out.
    pub(crate) next_writer: u64,
    /// Blob links a client was just told exist (a HEAD or GET of the blob in that
    /// repository), with the time: a client that saw a layer there skips its upload and
    /// pushes a manifest naming it, so a collection keeps such a link for the grace period
    /// (Distribution's issue #4569, a push refused after HEAD → GC → PUT).
    pub(crate) touched_links: HashMap<(String, Digest), u64>,
}

/// Touched links remembered at most (about 100 bytes each).
const TOUCHED_LINKS_MAX: usize = 1 << 20;

impl Store {
    /// Records that a writer relies on the chunk at `segment` while a collection may run;
    /// false when the segment is already gone (the caller must store the chunk again).
    pub(crate) fn pin_chunk(&self, id: &ChunkId, segment: u64, writer: Option<u64>) -> bool {
        let mut gc = self.inner.gc.lock();
        if !self.inner.segments.read().contains_key(&segment) {
            return false;
        }
        if gc.running {
            gc.pinned_chunks.insert(*id);
        } else if let Some(list) = writer.and_then(|w| gc.writing.get_mut(&w)) {
            // Under the same lock that starts a collection: either this is seen by its
            // snapshot of running writers, or the collection is already running and pins it.
            list.push(*id);
        }
        true
    }

    /// Registers a blob writer; its dedup hits are kept alive until [`Store::end_write`].
    pub(crate) fn begin_write(&self) -> u64 {
        let mut gc = self.inner.gc.lock();
        gc.next_writer += 1;
        let id = gc.next_writer;
        gc.writing.insert(id, Vec::new());
        id
    }

    /// Forgets a blob writer (its blob committed, with its own lease, or abandoned).
    pub(crate) fn end_write(&self, writer: u64) {
        self.inner.gc.lock().writing.remove(&writer);
    }

    /// True while blob writers run (a collection paces its compaction then).
    pub(crate) fn has_writers(&self) -> bool {
        !self.inner.gc.lock().writing.is_empty()
    }

    /// How far the segments are durable now: the active segment up to its last sync, or,
    /// when it has not been synced since it started, the whole segment sealed before it.
    pub(crate) fn segments_durable(&self) -> (u64, u64) {
        let synced = *self.inner.synced.lock();
        let sealed_below = self
            .inner
            .sealed_below
            .load(std::sync::atomic::Ordering::SeqCst);
        if synced.0 >= sealed_below || sealed_below == 0 {
            synced
        } else {
            (sealed_below - 1, u64::MAX)
        }
    }

    /// Chunks that running blob writers deduplicated against (for a collection's mark,
    /// called after it started).
    pub(crate) fn writing_chunks(&self) -> Vec<ChunkId> {
        let gc = self.inner.gc.lock();
        gc.writing.values().flatten().copied().collect()
    }

    /// The one door to change the catalog. Commits a batch atomically (`plan` sees the state
    /// with every earlier batch applied and returns the ops, or an error of the caller's own
    /// type, which aborts the batch), and pins every blob the batch starts to reference
    /// (`LinkBlob`, `PutManifest`) under the catalog lock. A collection marks under the same
    /// lock, so a new reference is either seen by its mark or pinned against its compaction;
    /// a blob already collected fails the batch with `NotFound` (the client uploads it
    /// again). The ops are durable when this returns.
    ///
    /// The catalog's own commit is not public, so nothing can add a reference around this:
    ///
    /// ```compile_fail
    /// # fn f(store: &ballast_engine::Store) {
    /// store.catalog().commit(Vec::new());
    /// # }
    /// ```
    pub fn commit_catalog<T, E: From<Error>>(
        &self,
        plan: impl FnOnce(&crate::catalog::State) -> Result<(Vec<crate::catalog::Op>, T), E>,
    ) -> Result<T, E> {
        let durable = self.segments_durable();
        self.inner.catalog.commit_with(Some(durable), |state| {
            let (ops, out) = plan(state)?;
            if !ops.is_empty() {
                self.check_writable()?;
            }
            for op in &ops {
                let digest = match op {
                    crate::catalog::Op::LinkBlob { digest, .. }
                    | crate::catalog::Op::PutManifest { digest, .. } => digest,
                    _ => continue,
                };
                if !self.pin_blob(digest) {
                    return Err(Error::NotFound(format!(
                        "blob {digest} (collected meanwhile; upload it again)"
                    ))
                    .into());
                }
            }
            Ok((ops, out))
        })
    }

    /// [`Store::commit_catalog`] of ops without a precondition.
    pub fn commit_ops(&self, ops: Vec<crate::catalog::Op>) -> Result<()> {
        self.commit_catalog(|_| Ok((ops, ())))
    }

    /// Makes sure a committed blob outlives any collection in progress, before something
    /// (a mount, a link, a manifest) starts to reference it. False when it is not stored.
    pub fn pin_blob(&self, digest: &Digest) -> bool {
        let key = digest.index_key();
        let Some(loc) = self.blob_location(&key) else {
            return false;
        };
        if self.recipe(digest).is_err() {
            return false;
        }
        let mut gc = self.inner.gc.lock();
        if !self.inner.segments.read().contains_key(&loc.segment) {
            return false;
        }
        if gc.running {
            gc.pinned_blobs.insert(digest.clone());
        }
        true
    }

    /// Starts a collection: from now on dedup hits and blob references are pinned. Returns
    /// the guard that keeps other collections out, or `None` when one is running.
    pub(crate) fn gc_start(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        let guard = self.inner.gc_lock.try_lock()?;
        let mut gc = self.inner.gc.lock();
        assert!(!gc.running, "a collection runs only under gc_lock");
        gc.running = true;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
        Some(guard)
    }

    /// Records that a client was just told the blob `digest` is in `repo`: a collection
    /// keeps that link for its grace period from now. In memory, like leases (a restart
    /// forgets it; so does the client's next HEAD, which refreshes it).
    pub fn touch_link(&self, repo: &str, digest: &Digest) {
        let now = crate::clock::now_secs();
        let mut gc = self.inner.gc.lock();
        if gc.touched_links.len() >= TOUCHED_LINKS_MAX {
            // Bounded: forget the older half (a day-old touch protects nothing anyway).
            let mut ages: Vec<u64> = gc.touched_links.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            gc.touched_links.retain(|_, at| *at > cut);
        }
        gc.touched_links
            .insert((repo.to_owned(), digest.clone()), now);
    }

    /// Links touched at or after `since`, forgetting older touches (for a collection's mark).
    pub(crate) fn links_touched_since(&self, since: u64) -> HashSet<(String, Digest)> {
        let mut gc = self.inner.gc.lock();
        gc.touched_links.retain(|_, at| *at >= since);
        gc.touched_links.keys().cloned().collect()
    }

    /// Blobs committed at or after `since` (leases), forgetting older ones. Called by a
    /// collection after it started, so a blob committed later is pinned instead.
    pub fn leased_since(&self, since: u64) -> Vec<Digest> {
        let mut gc = self.inner.gc.lock();
        gc.leases.retain(|_, at| *at >= since);
        gc.leases.keys().cloned().collect()
    }

    /// Abandons a collection (on error): pins are dropped, nothing is removed.
    pub(crate) fn gc_abort(&self) {
        let mut gc = self.inner.gc.lock();
        gc.running = false;
        gc.pinned_chunks.clear();
        gc.pinned_blobs.clear();
    }
}
