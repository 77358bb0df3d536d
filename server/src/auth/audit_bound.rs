//! A rate bound on audit lines that anyone can cause: mutation attempts without credentials.
//! They are audited (a security team wants to see a scan for writable repositories), but at
//! most [`PER_MINUTE`] lines a minute per client address, so an anonymous flood cannot fill
//! the audit disk; the next line admitted says how many were left out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lines admitted per client address and minute.
pub const PER_MINUTE: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked before idle ones are pruned.
const ADDRESSES_MAX: usize = 10_000;

struct Window {
    start: Instant,
    admitted: u32,
    /// Left out since the last admitted line.
    left_out: u64,
}

/// The bound.
#[derive(Default)]
pub struct AuditBound {
    windows: Mutex<HashMap<IpAddr, Window>>,
}

impl AuditBound {
    /// `Some(left_out)` when a line from `ip` should be written now, with the number of lines
    /// of that address left out before it; `None` when it is left out.
    pub fn admit(&self, ip: IpAddr) -> Option<u64> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let mut windows = self.windows.lock();
        if windows.len() >= ADDRESSES_MAX && !windows.contains_key(&ip) {
            windows.retain(|_, w| now.duration_since(w.start) < WINDOW || w.left_out > 0);
            if windows.len() >= ADDRESSES_MAX {
                // Flooded from many addresses: start over rather than grow.
                windows.clear();
            }
        }
        let w = windows.entry(ip).or_insert(Window {
            start: now,
            admitted: 0,
            left_out: 0,
        });
        if now.duration_since(w.start) >= WINDOW {
            w.start = now;
            w.admitted = 0;
        }
        if w.admitted < PER_MINUTE {
            w.admitted += 1;
            Some(std::mem::take(&mut w.left_out))
        } else {
            w.left_out += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_per_minute_then_the_count_of_what_was_left_out() {
        let b = AuditBound::default();
        let (a, other): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().expect("ip"), "::1".parse().expect("ip"));
        let t0 = Instant::now();
        for _ in 0..PER_MINUTE {
            assert_eq!(b.admit_at(a, t0), Some(0));
        }
        for _ in 0..25 {
            assert_eq!(b.admit_at(a, t0 + Duration::from_secs(30)), None);
        }
        // Another address has its own budget.
        assert_eq!(b.admit_at(other, t0), Some(0));
        // The next minute's first line carries the count.
        assert_eq!(b.admit_at(a, t0 + WINDOW), Some(25));
        assert_eq!(b.admit_at(a, t0 + WINDOW), Some(0));
    }
}
