//! The quarantine: records `fsck --repair` found damaged, and the blobs that depend on them.
//! Damaged records are treated as absent (lookups skip them, so a re-push stores fresh
//! copies instead of deduplicating against them); quarantined blobs are answered as missing
//! until they are pushed again. Nothing is deleted: the damaged bytes stay in their segment
//! until a collection compacts it. The file is `DIR/quarantine.json` (docs/format.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{existed, write_atomic, Storage};
use crate::{Digest, Error, Result};

/// File name in the data directory.
pub const FILE: &str = "quarantine.json";
/// Version of the quarantine file format.
pub const VERSION: u16 = 1;

/// One damaged record.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct DamagedRecord {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record in the segment file.
    pub offset: u64,
    /// What fsck found.
    pub reason: String,
}

/// One quarantined blob.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct QuarantinedBlob {
    /// What fsck found.
    pub reason: String,
    /// When it was quarantined (seconds since the epoch).
    pub at: u64,
}

/// The quarantine file's contents.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Quarantine {
    /// Format version ([`VERSION`]).
    pub version: u16,
    /// Damaged records, by location.
    pub records: BTreeSet<DamagedRecord>,
    /// Quarantined blobs.
    pub blobs: BTreeMap<Digest, QuarantinedBlob>,
}

impl Quarantine {
    /// True when nothing is quarantined.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.blobs.is_empty()
    }

    /// True when the record at `(segment, offset)` is damaged.
    pub fn is_damaged(&self, segment: u64, offset: u64) -> bool {
        self.records
            .range(
                DamagedRecord {
                    segment,
                    offset,
                    reason: String::new(),
                }..,
            )
            .next()
            .is_some_and(|r| r.segment == segment && r.offset == offset)
    }

    /// Reads the file; a missing file is an empty quarantine.
    pub fn load(storage: &dyn Storage, dir: &Path) -> Result<Quarantine> {
        let path = dir.join(FILE);
        let Some(buf) = crate::io::read_whole(storage, &path)? else {
            return Ok(Quarantine::default());
        };
        let q: Quarantine = serde_json::from_slice(&buf).map_err(|e| Error::Corrupted {
            file: path.clone(),
            offset: 0,
            reason: format!("quarantine file is not valid: {e}"),
        })?;
        if q.version != VERSION {
            return Err(Error::Version {
                file: path,
                found: q.version,
                supported: VERSION,
            });
        }
        Ok(q)
    }

    /// Writes the file atomically (removing it when the quarantine is empty).
    pub fn save(&self, storage: &dyn Storage, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        if self.is_empty() {
            if existed(&path, storage.remove(&path))? {
                storage.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
            }
            return Ok(());
        }
        let mut q = self.clone();
        q.version = VERSION;
        let bytes = serde_json::to_vec_pretty(&q)
            .map_err(|e| Error::Internal(format!("quarantine: {e}")))?;
        write_atomic(storage, &path, &bytes)
    }
}
