//! Ballast's storage engine: content-addressed blobs stored as recipes of deduplicated,
//! content-defined chunks in append-only, checksummed segment files, with memory-mapped
//! indexes and crash recovery. Synchronous, no async runtime; safe to share across threads.
//!
//! The on-disk format is specified in `docs/format.md`; the design in `docs/design.md`.
#![deny(unsafe_code)]

pub mod blob;
pub mod catalog;
pub mod chunker;
pub mod clock;
pub mod digest;
pub mod error;
pub mod gc;
pub mod index;
pub mod inspect;
pub mod io;
pub mod names;
pub mod quarantine;
pub mod recipe;
pub mod segment;
pub mod store;
mod sys;
pub mod testdata;
pub mod uploads;
mod verified;
pub mod verify;

pub use blob::{BlobReader, BlobWriter, Committed, Ingest};
pub use catalog::Catalog;
pub use chunker::Mode as ChunkMode;
pub use digest::{Algorithm, ChunkId, Digest};
pub use error::{Error, Input, Result};
pub use store::{Options, Store};
pub use uploads::{UploadWriter, Uploads};
