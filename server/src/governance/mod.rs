//! Governance: rules an admin writes once in the config and the server enforces. Today
//! tag immutability (`immutable.rs`), retention (`retention.rs`) and quotas (`quota.rs`).

pub mod immutable;
pub mod quota;
pub mod retention;

pub use immutable::{ImmutableRules, ImmutableTagRule};
pub use quota::{QuotaRule, Quotas};
pub use retention::{Retention, RetentionConfig};
