//! The record of an action tried again and again (shipping, following): the last error,
//! failures in a row and in all; the status of each shows it flattened.

use serde::Serialize;

/// Attempts of one repeated action.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Attempts {
    /// The last attempt's error, while attempts fail.
    pub last_error: Option<String>,
    /// Attempts failed in a row (0 once one succeeds).
    pub consecutive_failures: u64,
    /// Attempts that failed since start.
    pub failures: u64,
}

impl Attempts {
    /// Notes how an attempt ended.
    pub fn note<T>(&mut self, result: &anyhow::Result<T>) {
        match result {
            Ok(_) => {
                self.last_error = None;
                self.consecutive_failures = 0;
            }
            Err(e) => {
                self.last_error = Some(format!("{e:#}"));
                self.consecutive_failures += 1;
                self.failures += 1;
            }
        }
    }
}
