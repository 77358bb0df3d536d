//! The engine's integration tests (one binary).

mod crash;
mod fixture;
mod gc;
mod store;

use ballast_engine::Digest;

/// Deterministic pseudo-random bytes (the engine's one generator).
pub use ballast_engine::testdata::seeded;

/// sha256 digest of bytes.
pub fn sha256(data: &[u8]) -> Digest {
    Digest::of(ballast_engine::Algorithm::Sha256, data)
}

/// A ustar header for tests.
pub fn tar_header(name: &str, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    h[136..147].copy_from_slice(format!("{mtime:011o}").as_bytes());
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    h
}

/// A tar of `files` with every header's mtime set to `mtime`.
pub fn tar(files: &[(String, Vec<u8>)], mtime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&tar_header(name, data.len() as u64, mtime));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}
