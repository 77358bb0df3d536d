//! Past one host: a registry's sealed segments and catalog shipped to an S3-compatible
//! object store (Garage, Ceph RGW, MinIO, AWS S3, R2), and a data directory rebuilt from the
//! bucket alone (docs/design.md, "Segments in a bucket"). Async (tokio), beside the server;
//! the engine stays synchronous and knows nothing of buckets: it only cuts a consistent
//! checkpoint (`ballast_engine::checkpoint`).
//!
//! - `attempts`: the failures of an action tried again.
//! - `config`: the `[bucket]` table.
//! - `client`: the store's requests (object_store), counted.
//! - `layout`: object names and the checkpoint record.
//! - `lease`: one writer per prefix.
//! - `pulls`: pulls counted by read replicas, reported to the primary.
//! - `ship`: shipping checkpoints, pruning old ones, the lag.
//! - `follow`: a read replica following the primary's checkpoints.
//! - `restore`: rebuilding a data directory from a checkpoint.
//! - `tier`: reading segments whose local file is gone, through a block cache.
//! - `verify`: checking the bucket against its checkpoints (fsck).

pub mod attempts;
pub mod client;
pub mod config;
pub mod follow;
pub mod layout;
pub mod lease;
pub mod pulls;
pub mod restore;
pub mod ship;
pub mod tier;
pub mod verify;

pub use client::Bucket;
pub use config::{Acknowledge, BucketConfig, Role};
pub use follow::{FollowReport, FollowStatus, Follower};
pub use ship::{ShipReport, Shipper, Status};
