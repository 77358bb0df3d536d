//! The free-space floor: new data is refused while the data directory's file system has
//! fewer free bytes than `Options::free_bytes_min`, so deletes and garbage collection (which
//! write a little: catalog batches, relocated records, index files) always have room. The
//! refusal happens before anything is appended, so it never poisons the store, unlike a
//! real ENOSPC in the middle of a write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::store::Store;

/// New bytes between two looks at the free space (a `statvfs` each).
const CHECK_EVERY: u64 = 4 << 20;

#[derive(Default)]
pub(crate) struct Room {
    since_check: AtomicU64,
    low: AtomicBool,
    /// Bytes of removed segments the file system is freeing now (a collection's victims,
    /// let go off its path: `gc/compact.rs`). They count as free: nothing can stop it.
    pub(crate) releasing: Arc<AtomicU64>,
}

impl Store {
    /// Free bytes on the data directory's file system, when they can be read, counting the
    /// removed segments it is freeing as free.
    pub fn free_bytes(&self) -> Option<u64> {
        let free = self.inner.storage.free_bytes(&self.inner.dir).ok()?;
        Some(free.saturating_add(self.inner.room.releasing.load(Ordering::Relaxed)))
    }

    /// `Err(NoSpace)` when the file system is below the floor: what a push checks before
    /// it reads a body, and what storing `n` new bytes checks on the way (the free space is
    /// looked at every few MiB, and at every call while it is low).
    pub fn check_room(&self, n: u64) -> Result<()> {
        let floor = self.inner.opts.free_bytes_min;
        if floor == 0 {
            return Ok(());
        }
        let room = &self.inner.room;
        let since = room.since_check.fetch_add(n, Ordering::Relaxed) + n;
        if since < CHECK_EVERY && n > 0 && !room.low.load(Ordering::Relaxed) {
            return Ok(());
        }
        room.since_check.store(0, Ordering::Relaxed);
        let Some(free) = self.free_bytes() else {
            return Ok(());
        };
        let low = free < floor.saturating_add(n);
        room.low.store(low, Ordering::Relaxed);
        if low {
            return Err(Error::NoSpace(format!(
                "the data directory's file system has {} free, below the {} kept for deletes and \
                 garbage collection (disk_free_min_bytes): new data is refused until images are \
                 deleted and collected, or the file system grows",
                human(free),
                human(floor)
            )));
        }
        Ok(())
    }
}

/// Bytes as a person reads them (MiB with two decimals past 1 MiB).
pub(crate) fn human(n: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if n >= 1 << 30 {
        format!("{:.2} GiB", n as f64 / (MIB * 1024.0))
    } else if n >= 1 << 20 {
        format!("{:.2} MiB", n as f64 / MIB)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use crate::io::SimStorage;
    use crate::testdata::seeded;
    use crate::{Error, Options, Store};

    #[test]
    fn below_the_floor_new_data_is_refused_without_poisoning_and_deletes_still_commit() {
        let sim = SimStorage::new();
        let opts = Options {
            free_bytes_min: 100 << 20,
            ..Options::default()
        };
        let store = Store::open_on(Arc::new(sim.clone()), Path::new("/s"), opts).expect("open");
        let kept = store.put_blob(&seeded(300_000, 1), None).expect("room");
        sim.set_free_bytes(Some(50 << 20));
        // What a push asks before it reads a body; from then on every new chunk asks too.
        assert!(matches!(store.check_room(0), Err(Error::NoSpace(_))));
        let err = store
            .put_blob(&seeded(300_000, 2), None)
            .expect_err("below the floor");
        assert!(
            matches!(&err, Error::NoSpace(m) if m.contains("50.00 MiB") && m.contains("disk_free_min_bytes")),
            "{err}"
        );
        assert!(store.health().is_ok(), "refusing is not a failure");
        // What is stored is read, a duplicate needs no room, and the catalog takes deletes.
        assert!(store.read_blob(&kept.recipe.digest).is_ok());
        assert!(store
            .put_blob(&store.read_blob(&kept.recipe.digest).expect("read"), None)
            .is_ok());
        store
            .commit_ops(vec![crate::catalog::Op::UnlinkBlob {
                repo: "r".into(),
                digest: kept.recipe.digest.clone(),
            }])
            .expect("a delete commits");
        sim.set_free_bytes(Some(500 << 20));
        store
            .put_blob(&seeded(300_000, 2), None)
            .expect("room again");
    }
}
