//! Ballast's storage engine: content-addressed blobs stored as recipes of deduplicated,
//! content-defined chunks in append-only, checksummed segment files, with memory-mapped
//! indexes and crash recovery. Synchronous, no async runtime; safe to share across threads.
//!
//! The on-disk format is specified in `docs/format.md`; the design in `docs/design.md`.
#![deny(unsafe_code)]

pub mod blob;
pub mod catalog;
pub mod checkpoint;
pub mod chunker;
pub mod clock;
pub mod delta;
pub mod digest;
pub mod error;
pub mod gc;
pub mod index;
pub mod inspect;
// File access is the engine's own business; `storage` below is what callers need of it.
// The fuzz targets (feature `internals`) drive files directly.
#[cfg(feature = "internals")]
pub mod io;
#[cfg(not(feature = "internals"))]
pub(crate) mod io;
pub mod names;
pub mod outbox;
pub mod ownership;
pub mod quarantine;
pub mod readahead;
pub mod recipe;
pub mod segment;
pub mod stats;
pub mod store;
mod sys;
pub mod testdata;
pub mod uploads;
mod verified;
pub mod verify;

/// Where a store keeps its files: the real file system, a read-only view of it for checks
/// that must not change a byte, or a simulated one for tests that inject faults and power
/// cuts ([`Store::open_on`]); the modes the engine creates files and
/// directories with; dropping a file from the page cache (cold-read benchmarks); replacing a
/// small file atomically; the file behind bytes handed out of a map (sending them with
/// `sendfile`).
pub mod storage {
    pub use crate::io::{
        drop_page_cache, write_atomic, OverlayStorage, RealStorage, SimStorage, Storage,
        StorageFile, DIR_MODE, FILE_MODE,
    };
    pub use crate::sys::origins::{origin_of, Origin};
}

pub use blob::{BlobReader, BlobWriter, Committed, Ingest};
pub use catalog::Catalog;
pub use chunker::Mode as ChunkMode;
pub use digest::{Algorithm, ChunkId, Digest};
pub use error::{Error, Input, Result};
pub use readahead::ReadAhead;
pub use store::{Options, Store};
pub use uploads::{UploadWriter, Uploads};
