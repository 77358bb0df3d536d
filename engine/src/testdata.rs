//! Deterministic incompressible bytes, for tests, benchmarks and `ballast bench`: one
//! generator, so every caller's "seed 7" is the same data (and the golden chunk boundaries
//! pinned on it stay meaningful).

/// `len` pseudo-random bytes from `seed` (xorshift64; distinct seeds give distinct streams).
pub fn seeded(len: usize, seed: u64) -> Vec<u8> {
    // xorshift needs a non-zero state.
    let mut s = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03).max(1);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}
