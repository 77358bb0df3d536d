//! Identifiers: OCI digests ([`Digest`]) and chunk ids ([`ChunkId`]).

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

use crate::error::{Error, Input, Result};

/// The hash algorithm of an OCI digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// `sha256`, the default.
    Sha256,
    /// `sha512`.
    Sha512,
}

impl Algorithm {
    /// The digest length in bytes.
    #[allow(clippy::len_without_is_empty, reason = "a digest length, never empty")]
    pub const fn len(self) -> usize {
        match self {
            Algorithm::Sha256 => 32,
            Algorithm::Sha512 => 64,
        }
    }
    /// The on-disk code (docs/format.md, "Digests").
    pub const fn code(self) -> u8 {
        match self {
            Algorithm::Sha256 => 1,
            Algorithm::Sha512 => 2,
        }
    }
    /// The algorithm for an on-disk code.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Algorithm::Sha256),
            2 => Some(Algorithm::Sha512),
            _ => None,
        }
    }
    /// The name used in digest strings.
    pub const fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
    /// A new streaming hasher for this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// A streaming OCI digest computation.
#[derive(Clone)]
pub enum Hasher {
    /// sha256 state.
    Sha256(sha2::Sha256),
    /// sha512 state.
    Sha512(sha2::Sha512),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }
    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        match self {
            Hasher::Sha256(h) => Digest::from_parts(Algorithm::Sha256, &h.finalize()),
            Hasher::Sha512(h) => Digest::from_parts(Algorithm::Sha512, &h.finalize()),
        }
    }
}

/// An OCI content digest such as `sha256:<64 hex>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    bytes: [u8; 64],
}

impl Digest {
    /// Builds a digest from its algorithm and raw bytes (`bytes.len()` must match).
    pub fn from_parts(algorithm: Algorithm, bytes: &[u8]) -> Self {
        assert_eq!(
            bytes.len(),
            algorithm.len(),
            "digest length must match its algorithm"
        );
        let mut buf = [0u8; 64];
        buf[..bytes.len()].copy_from_slice(bytes);
        Digest {
            algorithm,
            bytes: buf,
        }
    }
    /// The digest of `data` with `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = algorithm.hasher();
        h.update(data);
        h.finish()
    }
    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.algorithm.len()]
    }
    /// The 32-byte key of this digest in the blob index: the first 32 bytes of the digest.
    /// Lookups compare the full digest stored in the recipe.
    pub fn index_key(&self) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(&self.bytes[..32]);
        key
    }
    /// The hex part of the digest.
    pub fn hex(&self) -> String {
        hex::encode(self.as_bytes())
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (algo, hex_part) = s.split_once(':').ok_or_else(|| {
            Error::invalid(Input::Digest, format!("{s:?} has no algorithm prefix"))
        })?;
        let algorithm = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(Error::invalid(
                    Input::Digest,
                    format!("unsupported algorithm {other:?}"),
                ))
            }
        };
        if hex_part.len() != algorithm.len() * 2
            || !hex_part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::invalid(
                Input::Digest,
                format!(
                    "{algo} digests have {} lowercase hex characters",
                    algorithm.len() * 2
                ),
            ));
        }
        let bytes =
            hex::decode(hex_part).map_err(|e| Error::invalid(Input::Digest, e.to_string()))?;
        Ok(Digest::from_parts(algorithm, &bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A chunk's identity: BLAKE3-256 of its raw (uncompressed) bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let d = Digest::of(Algorithm::Sha256, b"");
        assert_eq!(
            d.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d));
        let d = Digest::of(Algorithm::Sha512, b"abc");
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d));
    }

    #[test]
    fn rejects_bad_digests() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "md5:00",
            "sha256:ABC",
            "sha256:zz",
            "sha512:00",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
        let upper = format!("sha256:{}", "A".repeat(64));
        assert!(upper.parse::<Digest>().is_err());
    }
}
