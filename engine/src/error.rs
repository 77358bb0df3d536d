//! The engine's one error type. Every variant's `Display` is a sentence an operator can act on.

use std::path::PathBuf;

/// What went wrong in an engine operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bytes on disk failed a checksum or a structural check.
    #[error("corrupted data in {file} at offset {offset}: {reason} (run `ballast fsck` on the data directory)")]
    Corrupted {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The requested object does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The bytes written do not hash to the digest the caller expected.
    #[error("digest mismatch: expected {expected}, computed {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// Input is not well-formed (a digest, a name, a range...).
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
    /// A configured bound was exceeded.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// Another process holds the data directory.
    #[error("data directory {dir} is locked by another process ({holder}); stop it first")]
    Locked { dir: PathBuf, holder: String },
    /// An earlier fsync failed; the store refuses further writes until it is reopened.
    #[error(
        "store is poisoned after a failed sync ({0}); restart the process to recover from disk"
    )]
    Poisoned(String),
    /// The on-disk format is newer or older than this build understands.
    #[error("{file}: unsupported format version {found} (this build reads version {supported})")]
    Version {
        file: PathBuf,
        found: u16,
        supported: u16,
    },
    /// An operating system I/O error.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Result alias for engine operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupted(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupted {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            what,
            reason: reason.into(),
        }
    }

    /// True for errors that mean bytes on disk are damaged.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corrupted { .. })
    }
}

/// The poisoned state of something that writes and fsyncs (the store, the catalog): after a
/// failed fsync the kernel may have dropped the dirty pages, so every later write fails with
/// the first failure's reason instead of being retried.
#[derive(Default)]
pub(crate) struct Poison(parking_lot::RwLock<Option<String>>);

impl Poison {
    /// `Err(Poisoned)` once [`Poison::set`] was called.
    pub(crate) fn check(&self) -> Result<()> {
        match &*self.0.read() {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Poisons (the first reason is kept) and returns the error to report for `why`.
    pub(crate) fn set(&self, why: String) -> Error {
        self.0.write().get_or_insert_with(|| why.clone());
        Error::Poisoned(why)
    }
}
