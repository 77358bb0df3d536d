//! Failed-login throttling, per client address and per account: after `max` failures in a
//! window, further attempts (right or wrong) are refused with 429 for a lockout that doubles
//! with each further failure, up to a cap. Memory is bounded: old entries are pruned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Failures older than this are forgotten.
const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Longest lockout.
const LOCKOUT_MAX: Duration = Duration::from_secs(15 * 60);
/// Keys tracked before old ones are pruned.
const KEYS_MAX: usize = 100_000;

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    last: Instant,
}

/// The throttle.
pub struct Limiter {
    max: u32,
    lockout: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Limiter {
    /// Locks a key out after `max` failures, first for `lockout`.
    pub fn new(max: u32, lockout: Duration) -> Limiter {
        Limiter {
            max: max.max(1),
            lockout,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn locked_for(&self, e: &Entry, now: Instant) -> Option<Duration> {
        if e.failures < self.max {
            return None;
        }
        let doublings = (e.failures - self.max).min(16);
        let lock = (self.lockout * 2u32.pow(doublings)).min(LOCKOUT_MAX);
        let until = e.last + lock;
        (until > now).then(|| until - now)
    }

    /// `Err(retry_after)` when any key is locked out now.
    pub fn check(&self, keys: &[String]) -> Result<(), Duration> {
        let now = Instant::now();
        let entries = self.entries.lock();
        let wait = keys
            .iter()
            .filter_map(|k| entries.get(k))
            .filter_map(|e| self.locked_for(e, now))
            .max();
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// Counts a failure against every key.
    pub fn fail(&self, keys: &[String]) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= KEYS_MAX {
            entries.retain(|_, e| now.duration_since(e.last) < WINDOW);
            if entries.len() >= KEYS_MAX {
                // Flooded with distinct keys: forget the oldest half rather than grow.
                let mut ages: Vec<Instant> = entries.values().map(|e| e.last).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                entries.retain(|_, e| e.last > cut);
            }
        }
        for k in keys {
            let e = entries.entry(k.clone()).or_insert(Entry {
                failures: 0,
                last: now,
            });
            if now.duration_since(e.last) >= WINDOW {
                e.failures = 0;
            }
            e.failures += 1;
            e.last = now;
        }
    }

    /// Forgets a key's failures (a successful login of that account).
    pub fn clear(&self, key: &str) {
        self.entries.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_out_after_max_and_backs_off() {
        let l = Limiter::new(3, Duration::from_secs(10));
        let keys = vec!["ip:1".to_owned(), "account:a".to_owned()];
        for _ in 0..2 {
            l.fail(&keys);
            assert!(l.check(&keys).is_ok());
        }
        l.fail(&keys);
        let w = l.check(&keys).expect_err("locked");
        assert!(w <= Duration::from_secs(10) && w > Duration::from_secs(9));
        l.fail(&keys);
        let w = l.check(&keys).expect_err("locked longer");
        assert!(w > Duration::from_secs(19));
        // Another address for the same account is locked too; another account from a
        // fresh address is not.
        assert!(l
            .check(&["ip:2".to_owned(), "account:a".to_owned()])
            .is_err());
        assert!(l
            .check(&["ip:2".to_owned(), "account:b".to_owned()])
            .is_ok());
        l.clear("account:a");
        assert!(l
            .check(&["ip:2".to_owned(), "account:a".to_owned()])
            .is_ok());
        assert!(l.check(&keys).is_err(), "the address stays locked");
    }
}
