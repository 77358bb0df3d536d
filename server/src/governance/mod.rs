//! Governance: rules an admin writes once in the config and the server enforces. Today
//! tag immutability (`immutable.rs`) and retention (`retention.rs`).

pub mod immutable;
pub mod retention;

pub use immutable::{ImmutableRules, ImmutableTagRule};
pub use retention::{Retention, RetentionConfig};
