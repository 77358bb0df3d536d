//! The manifest cache: the hottest request of a registry answered from memory.

use hyper::header::HeaderValue;

/// A small cache of manifests: manifest GETs, the hottest request of a registry, are
/// answered without touching the engine or the blocking pool, and without formatting the
/// digest headers again.
#[derive(Default)]
pub struct ManifestCache {
    entries: parking_lot::Mutex<(
        std::collections::HashMap<ballast_engine::Digest, CachedManifest>,
        usize,
    )>,
}

/// A manifest's bytes and its ready-made `Docker-Content-Digest` and `ETag` values (cloning
/// a `HeaderValue` shares its bytes).
#[derive(Clone)]
pub struct CachedManifest {
    /// The exact pushed bytes.
    pub bytes: bytes::Bytes,
    /// `Docker-Content-Digest`.
    pub digest: HeaderValue,
    /// `ETag`: the digest in quotes.
    pub etag: HeaderValue,
}

impl CachedManifest {
    /// Builds the entry for a manifest's bytes.
    pub fn new(digest: &ballast_engine::Digest, bytes: bytes::Bytes) -> CachedManifest {
        let text = digest.to_string();
        CachedManifest {
            bytes,
            // A digest is ASCII: these never fail.
            digest: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("")),
            etag: HeaderValue::from_str(&format!("\"{text}\""))
                .unwrap_or(HeaderValue::from_static("")),
        }
    }
}

/// Bytes of manifests kept in memory.
const MANIFEST_CACHE_BYTES_MAX: usize = 64 << 20;

impl ManifestCache {
    /// A cached manifest.
    pub fn get(&self, digest: &ballast_engine::Digest) -> Option<CachedManifest> {
        self.entries.lock().0.get(digest).cloned()
    }

    /// Remembers a manifest; the cache starts over when it would exceed its budget.
    pub fn put(&self, digest: ballast_engine::Digest, entry: CachedManifest) {
        let mut e = self.entries.lock();
        let len = entry.bytes.len();
        if e.1 + len > MANIFEST_CACHE_BYTES_MAX {
            e.0.clear();
            e.1 = 0;
        }
        e.1 += len;
        if let Some(old) = e.0.insert(digest, entry) {
            e.1 -= old.bytes.len();
        }
    }
}
