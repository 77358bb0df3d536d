//! The engine's integration tests (one binary).

mod checkpoint;
mod crash;
mod fixture;
mod follow;
mod gc;
mod ownership;
mod remote;
mod store;

use ballast_engine::Digest;

/// Deterministic pseudo-random bytes (the engine's one generator).
pub use ballast_engine::testdata::seeded;

/// sha256 digest of bytes.
pub fn sha256(data: &[u8]) -> Digest {
    Digest::of(ballast_engine::Algorithm::Sha256, data)
}

pub use ballast_engine::testdata::{tar, tar_header};
