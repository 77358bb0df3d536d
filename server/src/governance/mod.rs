//! Governance: rules an admin writes once in the config and the server enforces. Today
//! tag immutability (`immutable.rs`).

pub mod immutable;

pub use immutable::{ImmutableRules, ImmutableTagRule};
