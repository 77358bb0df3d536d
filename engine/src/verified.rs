//! Chunks whose BLAKE3 id was checked a moment ago (docs/design.md, "Read path").
//!
//! When many clients pull the same image at once, every chunk is read several times within
//! milliseconds. A record's bytes never change once written (segments are append-only and
//! sealed segments are mapped read-only, docs/unsafe.md), so a chunk verified at the same
//! location a moment ago is served without hashing it again. The window is short and
//! configurable (zero turns the reuse off): a damaged chunk escapes only if its page leaves
//! the page cache and comes back changed from the disk within the window.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::digest::ChunkId;
use crate::index::Location;

/// Slots of the table: with 64 KiB chunks, the last ~4 GiB of distinct chunks read (about
/// 5 MiB of memory). With 4096 slots a pull of a 512 MiB layer overwrote its own entries
/// before the next pull came, so concurrent pulls of large layers never shared a hash
/// (a server profile: BLAKE3 44 % of its CPU on repeated pulls; benchmarks.md, issue #21).
const SLOTS: usize = 65_536;

#[derive(Clone, Copy)]
struct Seen {
    id: ChunkId,
    segment: u64,
    offset: u64,
    at: Instant,
}

/// A direct-mapped table of recent successful verifications, indexed by chunk id (BLAKE3
/// output: uniform). A collision replaces the older entry; the next read of that chunk
/// then verifies again.
pub(crate) struct RecentlyVerified {
    window: Duration,
    slots: Box<[Mutex<Option<Seen>>]>,
}

impl RecentlyVerified {
    pub(crate) fn new(window: Duration) -> Self {
        let slots = if window.is_zero() { 0 } else { SLOTS };
        RecentlyVerified {
            window,
            slots: (0..slots).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// True when verifications are remembered at all (a window above zero).
    pub(crate) fn reuses(&self) -> bool {
        !self.slots.is_empty()
    }

    fn slot(&self, id: &ChunkId) -> Option<&Mutex<Option<Seen>>> {
        if self.slots.is_empty() {
            return None;
        }
        let n = u64::from_le_bytes(id.0[..8].try_into().unwrap_or_default());
        self.slots.get((n % self.slots.len() as u64) as usize)
    }

    /// True when `id` was verified at `loc` less than the window ago.
    pub(crate) fn fresh(&self, id: &ChunkId, loc: &Location) -> bool {
        self.slot(id).is_some_and(|slot| {
            matches!(*slot.lock(), Some(s) if s.id == *id
                && s.segment == loc.segment
                && s.offset == loc.offset
                && s.at.elapsed() < self.window)
        })
    }

    /// Notes that `id` was just verified at `loc`.
    pub(crate) fn record(&self, id: &ChunkId, loc: &Location) {
        if let Some(slot) = self.slot(id) {
            *slot.lock() = Some(Seen {
                id: *id,
                segment: loc.segment,
                offset: loc.offset,
                at: Instant::now(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, offset: u64) -> Location {
        Location {
            segment,
            offset,
            len: 100,
            aux: 0,
        }
    }

    #[test]
    fn fresh_only_for_the_same_chunk_at_the_same_place_within_the_window() {
        let v = RecentlyVerified::new(Duration::from_secs(3600));
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        assert!(!v.fresh(&a, &loc(1, 8)));
        v.record(&a, &loc(1, 8));
        assert!(v.fresh(&a, &loc(1, 8)));
        // Moved by a collection, or another chunk: verified again.
        assert!(!v.fresh(&a, &loc(2, 8)));
        assert!(!v.fresh(&a, &loc(1, 16)));
        assert!(!v.fresh(&b, &loc(1, 8)));
        // A chunk that lands in the same slot replaces the entry.
        let mut c = ChunkId([1; 32]);
        c.0[31] = 9;
        v.record(&c, &loc(3, 8));
        assert!(v.fresh(&c, &loc(3, 8)));
        assert!(!v.fresh(&a, &loc(1, 8)));
    }

    #[test]
    fn a_zero_window_never_reuses_and_an_old_entry_is_not_fresh() {
        let off = RecentlyVerified::new(Duration::ZERO);
        off.record(&ChunkId([1; 32]), &loc(1, 8));
        assert!(!off.fresh(&ChunkId([1; 32]), &loc(1, 8)));
        let short = RecentlyVerified::new(Duration::from_nanos(1));
        short.record(&ChunkId([1; 32]), &loc(1, 8));
        std::thread::sleep(Duration::from_millis(1));
        assert!(!short.fresh(&ChunkId([1; 32]), &loc(1, 8)));
    }
}
