//! What lies in the bucket (docs/format.md, "Bucket layout"), under the configured prefix:
//!
//! ```text
//! segments/<id:020>.seg          a sealed segment file, byte for byte; never changed once a
//!                                checkpoint lists it
//! indexes/<id:020>.idx           that segment's index file (what a read replica locates its
//!                                records by, without reading it)
//! catalogs/<seq:020>.snp         the catalog of checkpoint seq, as a snapshot file
//! checkpoints/<seq:020>.json     checkpoint seq: the catalog's object and every segment it
//!                                needs, with lengths and SHA-256s; written last, so a
//!                                checkpoint that is listed is whole
//! pulls/<replica>-<millis>.json  pulls a read replica counted, until the primary takes
//!                                them in (`crate::pulls`)
//! lease.json                     the primary's lease (`crate::lease`)
//! ```

use serde::{Deserialize, Serialize};

/// The version of the checkpoint record this build writes and reads.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// The object name of segment `id`.
pub fn segment_name(id: u64) -> String {
    format!("segments/{id:020}.seg")
}

/// The object name of segment `id`'s index file.
pub fn index_name(id: u64) -> String {
    format!("indexes/{id:020}.idx")
}

/// The id in an index file's object name.
pub fn index_id(name: &str) -> Option<u64> {
    seq_in(name, "indexes/", ".idx")
}

/// The object name of checkpoint `seq`'s catalog.
pub fn catalog_name(seq: u64) -> String {
    format!("catalogs/{seq:020}.snp")
}

/// The object name of checkpoint `seq`.
pub fn checkpoint_name(seq: u64) -> String {
    format!("checkpoints/{seq:020}.json")
}

/// The sequence number in a checkpoint's object name (relative to the prefix).
pub fn checkpoint_seq(name: &str) -> Option<u64> {
    seq_in(name, "checkpoints/", ".json")
}

/// The id in a segment's object name.
pub fn segment_id(name: &str) -> Option<u64> {
    seq_in(name, "segments/", ".seg")
}

/// The sequence number in a catalog's object name.
pub fn catalog_seq(name: &str) -> Option<u64> {
    seq_in(name, "catalogs/", ".snp")
}

fn seq_in(name: &str, dir: &str, ext: &str) -> Option<u64> {
    let digits = name.strip_prefix(dir)?.strip_suffix(ext)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// A checkpoint record (`checkpoints/<seq>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// [`CHECKPOINT_FORMAT`].
    pub format: u32,
    /// Its sequence number (one more than the checkpoint before it).
    pub seq: u64,
    /// When the cut was taken (Unix seconds): everything acknowledged before it is in this
    /// checkpoint.
    pub taken_at: u64,
    /// The catalog generation a data directory rebuilt from it starts at.
    pub generation: u64,
    /// Repositories in the catalog.
    pub repos: usize,
    /// The catalog object.
    pub catalog: ObjectRef,
    /// Every segment the catalog needs, in id order.
    pub segments: Vec<SegmentRef>,
    /// The version of Ballast that wrote it.
    pub written_by: String,
}

/// An object and what it must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// The object's name under the prefix.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// The SHA-256 of its bytes, hex.
    pub sha256: String,
}

/// A segment a checkpoint needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRef {
    /// The segment id (its object is [`segment_name`]).
    pub id: u64,
    /// Its length in bytes.
    pub len: u64,
    /// The SHA-256 of its bytes, hex.
    pub sha256: String,
    /// Its index file ([`index_name`]); absent in checkpoints written before replicas
    /// (the next shipment uploads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<ObjectRef>,
}

impl CheckpointRecord {
    /// Reads a record, refusing formats this build does not know.
    pub fn parse(bytes: &[u8]) -> anyhow::Result<CheckpointRecord> {
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("not a checkpoint record: {e}"))?;
        if head.format != CHECKPOINT_FORMAT {
            anyhow::bail!(
                "checkpoint format {} is not one this version reads (it reads {CHECKPOINT_FORMAT}): \
                 restore with the version that wrote it",
                head.format
            );
        }
        serde_json::from_slice(bytes)
            .map_err(|e| anyhow::anyhow!("a damaged checkpoint record: {e}"))
    }

    /// Bytes of all its objects.
    pub fn bytes(&self) -> u64 {
        self.catalog.len + self.segments.iter().map(|s| s.len).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_strangers_do_not() {
        assert_eq!(segment_id(&segment_name(42)), Some(42));
        assert_eq!(checkpoint_seq(&checkpoint_name(7)), Some(7));
        assert_eq!(catalog_seq(&catalog_name(9)), Some(9));
        assert_eq!(index_id(&index_name(11)), Some(11));
        for n in [
            "segments/42.seg",
            "segments/0000000000000000004x.seg",
            "checkpoints/00000000000000000007.json.tmp",
            "other/00000000000000000007.json",
        ] {
            assert_eq!(segment_id(n).or(checkpoint_seq(n)), None, "{n}");
        }
        let r = CheckpointRecord {
            format: CHECKPOINT_FORMAT,
            seq: 3,
            taken_at: 1,
            generation: 2,
            repos: 1,
            catalog: ObjectRef {
                name: catalog_name(3),
                len: 10,
                sha256: "00".into(),
            },
            segments: vec![SegmentRef {
                id: 1,
                len: 5,
                sha256: "11".into(),
                index: None,
            }],
            written_by: "test".into(),
        };
        let bytes = serde_json::to_vec(&r).expect("json");
        assert_eq!(CheckpointRecord::parse(&bytes).expect("parse"), r);
        assert_eq!(r.bytes(), 15);
        let future = String::from_utf8(bytes)
            .expect("utf8")
            .replace("\"format\":1", "\"format\":2");
        let e = CheckpointRecord::parse(future.as_bytes()).expect_err("newer format");
        assert!(e.to_string().contains("checkpoint format 2"), "{e}");
    }

    /// A record as a version before read replicas wrote it (no `index`) still parses, and
    /// a record with index objects keeps them.
    #[test]
    fn records_without_index_objects_parse() {
        let old = br#"{"format":1,"seq":4,"taken_at":1796275580,"generation":9,"repos":1,
            "catalog":{"name":"catalogs/00000000000000000004.snp","len":10,"sha256":"aa"},
            "segments":[{"id":1,"len":5,"sha256":"bb"}],"written_by":"ballast 0.1.0"}"#;
        let r = CheckpointRecord::parse(old).expect("old record");
        assert_eq!(r.segments[0].index, None);
        let mut new = r.clone();
        new.segments[0].index = Some(ObjectRef {
            name: index_name(1),
            len: 3,
            sha256: "cc".into(),
        });
        let bytes = serde_json::to_vec(&new).expect("json");
        assert!(String::from_utf8_lossy(&bytes).contains("indexes/00000000000000000001.idx"));
        assert_eq!(CheckpointRecord::parse(&bytes).expect("parse"), new);
    }
}
