//! The engine's clock: seconds since the Unix epoch, for grace periods, link times, leases
//! and segment ages.

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
