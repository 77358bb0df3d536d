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
    InvalidInput { what: Input, reason: String },
    /// Something that runs one at a time is running (a collection): try again later.
    #[error("busy: {0}")]
    Busy(String),
    /// A bug or a failure of the process itself (a worker thread that died, a value that
    /// does not serialize): nothing an operator or a client did.
    #[error("internal error: {0}")]
    Internal(String),
    /// A configured bound was exceeded.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The data directory's file system is below the free-space floor kept for deletes and
    /// garbage collection: new data is refused (nothing is poisoned), cleanup still works.
    #[error("{0}")]
    NoSpace(String),
    /// A bound on open work (upload sessions, their bytes) is reached: retry once some of
    /// that work ends.
    #[error("{0}")]
    Throttled(String),
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
    /// Bytes kept elsewhere (a sealed segment in a bucket, `store/remote.rs`) could not be
    /// fetched: nothing is damaged; retry once the other place answers.
    #[error("{0}")]
    Unavailable(String),
    /// A read replica's store (`Options::follower`) was asked to write: its content comes
    /// from the primary it follows.
    #[error("{0}")]
    ReadOnly(String),
    /// An operating system I/O error.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What input [`Error::InvalidInput`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// A digest (`sha256:…`).
    Digest,
    /// A repository name.
    RepositoryName,
    /// A tag.
    Tag,
    /// An upload session id.
    UploadId,
    /// Where an upload's next bytes go.
    UploadOffset,
    /// A byte range of a blob.
    Range,
    /// A chunk sent by id (delta replication).
    Chunk,
    /// A recipe sent to assemble a blob from (delta replication).
    Recipe,
    /// A segment named by the caller.
    Segment,
}

impl std::fmt::Display for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Digest => "digest",
            Input::RepositoryName => "repository name",
            Input::Tag => "tag",
            Input::UploadId => "upload id",
            Input::UploadOffset => "upload offset",
            Input::Range => "range",
            Input::Chunk => "chunk",
            Input::Recipe => "recipe",
            Input::Segment => "segment",
        })
    }
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

    pub(crate) fn invalid(what: Input, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
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
