//! Failed-login throttling, per client address and per account: after `max` failures in a
//! window, further attempts (right or wrong) are refused with 429 for a lockout that doubles
//! with each further failure, up to a cap. An attempt counts from the moment it is admitted
//! until it is decided, so parallel attempts cannot outrun the count: one that would pass the
//! limit should those in flight fail waits for them. Memory is bounded: old entries are
//! pruned.

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
    /// Attempts admitted and not yet decided.
    in_flight: u32,
    last: Instant,
}

/// Why an attempt is not admitted now.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Locked out for this long.
    Locked(Duration),
    /// Enough attempts are being checked that, should they fail, the key is locked: wait for
    /// them to be decided.
    Busy,
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

    /// Admits an attempt for every key, or says why not. An admitted attempt counts against
    /// its keys from now until [`Limiter::failed`] or [`Limiter::succeeded`] decides it, so
    /// however many attempts arrive at once, at most `max` failures can be verified per key
    /// and window: the attempt that would pass the limit if those in flight failed is
    /// [`Refusal::Busy`] and waits.
    pub fn reserve(&self, keys: &[String]) -> Result<(), Refusal> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let mut busy = false;
        let mut wait = None;
        for k in keys {
            let Some(e) = entries.get_mut(k) else {
                continue;
            };
            if now.duration_since(e.last) >= WINDOW && e.in_flight == 0 {
                e.failures = 0;
            }
            if let Some(w) = self.locked_for(e, now) {
                wait = wait.max(Some(w));
            }
            // (After a lockout ends, one attempt at a time: its failure locks again.)
            busy |= e.in_flight > 0 && e.failures + e.in_flight >= self.max;
        }
        if let Some(w) = wait {
            return Err(Refusal::Locked(w));
        }
        if busy {
            return Err(Refusal::Busy);
        }
        if entries.len() >= KEYS_MAX {
            entries.retain(|_, e| e.in_flight > 0 || now.duration_since(e.last) < WINDOW);
            if entries.len() >= KEYS_MAX {
                // Flooded with distinct keys: forget the oldest half rather than grow.
                let mut ages: Vec<Instant> = entries.values().map(|e| e.last).collect();
                ages.sort_unstable();
                let cut = ages[ages.len() / 2];
                entries.retain(|_, e| e.in_flight > 0 || e.last > cut);
            }
        }
        for k in keys {
            entries
                .entry(k.clone())
                .or_insert(Entry {
                    failures: 0,
                    in_flight: 0,
                    last: now,
                })
                .in_flight += 1;
        }
        Ok(())
    }

    /// An admitted attempt failed: a failure against every key, from now.
    pub fn failed(&self, keys: &[String]) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        for k in keys {
            let e = entries.entry(k.clone()).or_insert(Entry {
                failures: 0,
                in_flight: 1,
                last: now,
            });
            e.in_flight = e.in_flight.saturating_sub(1);
            e.failures += 1;
            e.last = now;
        }
    }

    /// An admitted attempt succeeded: `forget` loses its failures (the account that logged
    /// in); the other keys keep theirs (the address).
    pub fn succeeded(&self, keys: &[String], forget: &str) {
        self.decided(keys, Some(forget));
    }

    /// An admitted attempt ended undecided (its request went away): it counts for nothing.
    pub fn released(&self, keys: &[String]) {
        self.decided(keys, None);
    }

    fn decided(&self, keys: &[String], forget: Option<&str>) {
        let mut entries = self.entries.lock();
        for k in keys {
            if let Some(e) = entries.get_mut(k) {
                e.in_flight = e.in_flight.saturating_sub(1);
                if Some(k.as_str()) == forget {
                    e.failures = 0;
                }
                if e.failures == 0 && e.in_flight == 0 {
                    entries.remove(k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(l: &Limiter, keys: &[String], ok: bool) -> Result<(), Refusal> {
        l.reserve(keys)?;
        if ok {
            l.succeeded(keys, &keys[1]);
        } else {
            l.failed(keys);
        }
        Ok(())
    }

    #[test]
    fn locks_out_after_max_and_backs_off() {
        let l = Limiter::new(3, Duration::from_secs(10));
        let keys = vec!["ip:1".to_owned(), "account:a".to_owned()];
        for _ in 0..3 {
            assert!(attempt(&l, &keys, false).is_ok());
        }
        let Err(Refusal::Locked(w)) = l.reserve(&keys) else {
            panic!("locked")
        };
        assert!(w <= Duration::from_secs(10) && w > Duration::from_secs(9));
        l.failed(&keys);
        let Err(Refusal::Locked(w)) = l.reserve(&keys) else {
            panic!("locked longer")
        };
        assert!(w > Duration::from_secs(19));
        // Another address for the same account is locked too; another account from a
        // fresh address is not.
        assert!(l
            .reserve(&["ip:2".to_owned(), "account:a".to_owned()])
            .is_err());
        let other = ["ip:2".to_owned(), "account:b".to_owned()];
        assert!(attempt(&l, &other, false).is_ok());
        assert!(attempt(&l, &other, true).is_ok());
        // A success forgets the account; the address keeps its failure, and its clock.
        let e = l.entries.lock();
        assert!(!e.contains_key("account:b"));
        assert_eq!(
            e.get("ip:2").map(|e| (e.failures, e.in_flight)),
            Some((1, 0))
        );
    }

    /// A success neither counts as a failure nor restarts the lockout of the address: after
    /// a lockout ends, a right password and then a wrong one are both checked.
    #[test]
    fn a_success_does_not_extend_the_lockout() {
        let l = Limiter::new(2, Duration::from_millis(100));
        let keys = vec!["ip:1".to_owned(), "account:a".to_owned()];
        for _ in 0..2 {
            assert!(attempt(&l, &keys, false).is_ok());
        }
        assert!(matches!(l.reserve(&keys), Err(Refusal::Locked(_))));
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(attempt(&l, &keys, true), Ok(()));
        let other = vec!["ip:1".to_owned(), "account:b".to_owned()];
        assert_eq!(attempt(&l, &other, false), Ok(()));
    }

    /// Issue #13: attempts in flight count before they are verified, so concurrency cannot
    /// buy more than `max` verifications; the attempts beyond wait (`Busy`) and are then
    /// refused once the first ones fail.
    #[test]
    fn concurrent_attempts_are_counted_before_they_are_verified() {
        let l = Limiter::new(5, Duration::from_secs(30));
        let keys = vec!["ip:1".to_owned(), "account:a".to_owned()];
        for _ in 0..5 {
            assert_eq!(l.reserve(&keys), Ok(()));
        }
        for _ in 0..35 {
            assert_eq!(l.reserve(&keys), Err(Refusal::Busy));
        }
        for _ in 0..5 {
            l.failed(&keys);
        }
        assert!(matches!(l.reserve(&keys), Err(Refusal::Locked(_))));
        // Right passwords in parallel only wait: each success makes room for the next.
        let l = Limiter::new(2, Duration::from_secs(30));
        assert_eq!(l.reserve(&keys), Ok(()));
        assert_eq!(l.reserve(&keys), Ok(()));
        assert_eq!(l.reserve(&keys), Err(Refusal::Busy));
        l.succeeded(&keys, &keys[1]);
        assert_eq!(l.reserve(&keys), Ok(()));
    }
}
