//! The object store as the rest of this crate sees it: named objects under the configured
//! prefix, whole puts and multipart uploads of segment files (each part with a SHA-256
//! checksum the store verifies), gets, lists and deletes, each request counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};
use sha2::{Digest as _, Sha256};

use crate::config::BucketConfig;

/// Segment files larger than this are uploaded in parts of this size (S3 wants parts of at
/// least 5 MiB but the last).
pub const PART_BYTES: usize = 16 << 20;

/// Requests made, by kind (metrics; the request-amplification figures of docs/benchmarks.md).
#[derive(Debug, Default)]
pub struct Requests {
    /// Whole-object PUTs.
    pub puts: AtomicU64,
    /// Multipart uploads: parts sent (initiate and complete not counted).
    pub parts: AtomicU64,
    /// GETs (whole or ranged).
    pub gets: AtomicU64,
    /// LIST pages asked for.
    pub lists: AtomicU64,
    /// DELETEs.
    pub deletes: AtomicU64,
    /// Requests that failed after their retries.
    pub failures: AtomicU64,
}

/// One bucket (and prefix) of an S3-compatible store.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    describe: String,
    /// Requests made through this handle.
    pub requests: Arc<Requests>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

impl Bucket {
    /// A client for `cfg` (no request is made yet).
    pub fn connect(cfg: &BucketConfig) -> anyhow::Result<Bucket> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_checksum_algorithm(Checksum::SHA256)
            .with_retry(RetryConfig {
                max_retries: 8,
                retry_timeout: Duration::from_secs(cfg.request_timeout_secs),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(cfg.endpoint.starts_with("http://"))
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(cfg.request_timeout_secs)),
            );
        if !cfg.endpoint.is_empty() {
            b = b.with_endpoint(cfg.endpoint.trim_end_matches('/'));
        }
        if !cfg.access_key_id.is_empty() {
            b = b
                .with_access_key_id(&cfg.access_key_id)
                .with_secret_access_key(&cfg.secret_access_key);
        }
        let store = b
            .build()
            .with_context(|| format!("setting up the S3 client for {}", cfg.describe()))?;
        Ok(Bucket {
            store: Arc::new(store),
            prefix: cfg.prefix.trim_matches('/').to_owned(),
            describe: cfg.describe(),
            requests: Arc::default(),
        })
    }

    /// Where the objects are (`endpoint/bucket/prefix`).
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn path(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn counted<T>(&self, r: object_store::Result<T>, what: &str, name: &str) -> anyhow::Result<T> {
        if r.is_err() {
            self.requests.failures.fetch_add(1, Ordering::Relaxed);
        }
        r.map_err(|e| anyhow::anyhow!("{what} {name} in {}: {}", self.describe, concise(&e)))
    }

    /// Writes a whole object (replacing one of that name).
    pub async fn put(&self, name: &str, bytes: Bytes) -> anyhow::Result<()> {
        self.requests.puts.fetch_add(1, Ordering::Relaxed);
        let r = self
            .store
            .put(&self.path(name), PutPayload::from_bytes(bytes))
            .await;
        self.counted(r, "writing", name).map(|_| ())
    }

    /// The object's bytes; `Ok(None)` when there is no such object.
    pub async fn get(&self, name: &str) -> anyhow::Result<Option<Bytes>> {
        self.requests.gets.fetch_add(1, Ordering::Relaxed);
        let r = match self.store.get(&self.path(name)).await {
            Ok(g) => g.bytes().await,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => Err(e),
        };
        self.counted(r, "reading", name).map(Some)
    }

    /// Puts `bytes` as `name`; the reference a checkpoint record keeps of it (its length
    /// and SHA-256, which [`Bucket::get_checked`] checks).
    pub async fn put_object(
        &self,
        name: String,
        bytes: Vec<u8>,
    ) -> anyhow::Result<crate::layout::ObjectRef> {
        let object = crate::layout::ObjectRef {
            len: bytes.len() as u64,
            sha256: sha256_hex(&bytes),
            name,
        };
        self.put(&object.name, Bytes::from(bytes)).await?;
        Ok(object)
    }

    /// An object a checkpoint record names, checked against the length and SHA-256 the
    /// record gives; an error names what is missing or damaged.
    pub async fn get_checked(&self, r: &crate::layout::ObjectRef) -> anyhow::Result<Bytes> {
        let bytes = self.get(&r.name).await?.with_context(|| {
            format!(
                "{} is missing from {} (pruned: a newer checkpoint replaced it)",
                r.name,
                self.describe()
            )
        })?;
        if bytes.len() as u64 != r.len || sha256_hex(&bytes) != r.sha256 {
            anyhow::bail!(
                "{} in {} does not match its checkpoint (length or SHA-256): the bucket's copy \
                 is damaged",
                r.name,
                self.describe()
            );
        }
        Ok(bytes)
    }

    /// Bytes `range` of an object.
    pub async fn get_range(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> anyhow::Result<Bytes> {
        self.requests.gets.fetch_add(1, Ordering::Relaxed);
        let r = self.store.get_range(&self.path(name), range).await;
        self.counted(r, "reading", name)
    }

    /// Bytes `range` of an object as they arrive (one request, however large the range).
    pub async fn stream_range(
        &self,
        name: &str,
        range: std::ops::Range<u64>,
    ) -> anyhow::Result<futures::stream::BoxStream<'static, anyhow::Result<Bytes>>> {
        self.requests.gets.fetch_add(1, Ordering::Relaxed);
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range)),
            ..Default::default()
        };
        let r = self.store.get_opts(&self.path(name), opts).await;
        let result = self.counted(r, "reading", name)?;
        let (describe, name) = (self.describe.clone(), name.to_owned());
        let failures = self.requests.clone();
        Ok(Box::pin(result.into_stream().map_err(move |e| {
            failures.failures.fetch_add(1, Ordering::Relaxed);
            anyhow::anyhow!("reading {name} in {describe}: {}", concise(&e))
        })))
    }

    /// The object's size; `None` when there is no such object.
    pub async fn size(&self, name: &str) -> anyhow::Result<Option<u64>> {
        self.requests.gets.fetch_add(1, Ordering::Relaxed);
        match self.store.head(&self.path(name)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => self.counted(Err(e), "looking up", name),
        }
    }

    /// Names (relative to the prefix) and sizes of the objects under `dir/`.
    pub async fn list(&self, dir: &str) -> anyhow::Result<Vec<(String, u64)>> {
        self.requests.lists.fetch_add(1, Ordering::Relaxed);
        let base = self.path(dir);
        let r: object_store::Result<Vec<_>> = self.store.list(Some(&base)).try_collect().await;
        let metas = self.counted(r, "listing", dir)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                full.strip_prefix(&strip).map(|n| (n.to_owned(), m.size))
            })
            .collect())
    }

    /// Deletes an object (nothing when there is none).
    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        self.requests.deletes.fetch_add(1, Ordering::Relaxed);
        match self.store.delete(&self.path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => self.counted(Err(e), "deleting", name),
        }
    }

    /// Uploads `len` bytes read by `read(offset, buf)` (a blocking read, run off the
    /// runtime's threads) as the object `name`: one PUT, or a multipart upload in
    /// [`PART_BYTES`] parts, each with its SHA-256 for the store to check. Returns the
    /// SHA-256 of the whole. A multipart upload that fails is aborted, so no part of it is
    /// ever seen under the name.
    pub async fn upload<R>(&self, name: &str, len: u64, read: R) -> anyhow::Result<[u8; 32]>
    where
        R: Fn(u64, &mut [u8]) -> anyhow::Result<()> + Send + Sync + Clone + 'static,
    {
        let read_part = |offset: u64, n: usize| {
            let read = read.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    read(offset, &mut buf).map(|()| Bytes::from(buf))
                })
                .await
                .context("reading a segment to upload")?
            }
        };
        let mut hash = Sha256::new();
        if len <= PART_BYTES as u64 {
            let bytes = read_part(0, len as usize).await?;
            hash.update(&bytes);
            self.put(name, bytes).await?;
            return Ok(hash.finalize().into());
        }
        let path = self.path(name);
        let mut upload = {
            let r = self.store.put_multipart(&path).await;
            self.counted(r, "starting an upload of", name)?
        };
        let mut offset = 0u64;
        let mut in_flight = Vec::new();
        let result: anyhow::Result<()> = async {
            while offset < len {
                let n = (len - offset).min(PART_BYTES as u64) as usize;
                let bytes = read_part(offset, n).await?;
                hash.update(&bytes);
                self.requests.parts.fetch_add(1, Ordering::Relaxed);
                in_flight.push(upload.put_part(PutPayload::from_bytes(bytes)));
                offset += n as u64;
                // Two parts on the wire at a time: the next is read while one is sent.
                if in_flight.len() >= 2 {
                    let r = in_flight.remove(0).await;
                    self.counted(r, "uploading a part of", name)?;
                }
            }
            for part in in_flight.drain(..) {
                let r = part.await;
                self.counted(r, "uploading a part of", name)?;
            }
            let r = upload.complete().await;
            self.counted(r, "finishing the upload of", name).map(|_| ())
        }
        .await;
        if let Err(e) = result {
            in_flight.clear();
            let _ = upload.abort().await;
            return Err(e);
        }
        Ok(hash.finalize().into())
    }
}

impl Bucket {
    /// Reads object `name`, which should hold `len` bytes, in [`PART_BYTES`] ranges, into
    /// `sink` when there is one; returns its SHA-256. Fails when it is shorter.
    pub async fn read_ranges<W>(
        &self,
        name: &str,
        len: u64,
        mut sink: Option<&mut W>,
    ) -> anyhow::Result<[u8; 32]>
    where
        W: tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        let mut hash = Sha256::new();
        let mut offset = 0u64;
        while offset < len {
            let end = (offset + PART_BYTES as u64).min(len);
            let bytes = self.get_range(name, offset..end).await?;
            if bytes.len() as u64 != end - offset {
                anyhow::bail!(
                    "{name} in {} is shorter than its checkpoint says",
                    self.describe
                );
            }
            hash.update(&bytes);
            if let Some(w) = sink.as_mut() {
                w.write_all(&bytes).await?;
            }
            offset = end;
        }
        Ok(hash.finalize().into())
    }
}

/// The SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A store error in one line a person can act on. object_store's messages repeat their
/// sources (a retried request names its URL and each layer's error again), so this keeps the
/// first layer (the request, its retries and time) and the root cause (`Connection refused`,
/// `403 Forbidden` with the store's own message...).
fn concise(e: &object_store::Error) -> String {
    let top = e.to_string();
    let head = top.split(" - ").next().unwrap_or(&top).trim().to_owned();
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    let cause = root.to_string();
    if head.contains(cause.trim()) {
        head
    } else {
        format!("{head}: {}", cause.trim())
    }
}

#[cfg(test)]
mod tests {
    use super::concise;

    /// An error that, like a retried request's, repeats its source in its own message.
    #[derive(Debug)]
    struct Retried(std::io::Error);

    impl std::fmt::Display for Retried {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "Error performing GET http://s3/b/k after 7 retries - {}",
                self.0
            )
        }
    }

    impl std::error::Error for Retried {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_store_error_is_one_line_with_its_request_and_root_cause() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Retried(refused())),
        };
        assert_eq!(
            concise(&e),
            "Generic S3 error: Error performing GET http://s3/b/k after 7 retries: refused"
        );
        let plain = object_store::Error::Generic {
            store: "S3",
            source: Box::new(refused()),
        };
        assert_eq!(concise(&plain), "Generic S3 error: refused");
    }
}
