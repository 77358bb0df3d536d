//! Checking the bucket (`ballast fsck DIR --config FILE` with a `[bucket]`): every kept
//! checkpoint's record readable, every object it names there with its length and SHA-256,
//! and the objects no record names (what an interrupted shipment left, or something put
//! there by hand) reported; with `repair`, the unreferenced objects of Ballast's own layout
//! are deleted. Run with the server stopped: a shipment in progress has objects no record
//! names yet.

use std::collections::{BTreeMap, BTreeSet};

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::client::Bucket;
use crate::layout::{self, CheckpointRecord};

/// Objects hashed at once.
const PARALLEL: usize = 4;

/// One problem found in the bucket.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// `checkpoint_unreadable`, `object_missing`, `object_length`, `object_digest`,
    /// `object_unreferenced`, `object_unknown`.
    pub kind: &'static str,
    /// The object's name under the prefix.
    pub object: String,
    /// What is wrong, for a person.
    pub detail: String,
}

/// What a check of the bucket found.
#[derive(Clone, Debug, Serialize)]
pub struct BucketReport {
    /// `endpoint/bucket/prefix`.
    pub bucket: String,
    /// Checkpoint records read.
    pub checkpoints: usize,
    /// Objects the records name that were checked (length and SHA-256).
    pub objects_checked: usize,
    /// Their bytes.
    pub bytes_checked: u64,
    /// Unreferenced objects deleted (`repair`).
    pub removed: usize,
    /// What is wrong (after the repair, what it left).
    pub findings: Vec<Finding>,
}

impl BucketReport {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Checks the bucket; with `repair`, deletes the objects of Ballast's layout that no record
/// names (never a record, never an object of another layout).
pub async fn verify(bucket: &Bucket, repair: bool) -> anyhow::Result<BucketReport> {
    let objects: BTreeMap<String, u64> = bucket.list("").await?.into_iter().collect();
    let mut findings = Vec::new();
    let mut named: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut checkpoints = 0;
    for name in objects
        .keys()
        .filter(|n| layout::checkpoint_seq(n).is_some())
    {
        let record = match bucket.get(name).await? {
            Some(bytes) => CheckpointRecord::parse(&bytes),
            // (Pruned since the listing.)
            None => continue,
        };
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                findings.push(Finding {
                    kind: "checkpoint_unreadable",
                    object: name.clone(),
                    detail: format!("{e:#}"),
                });
                continue;
            }
        };
        checkpoints += 1;
        named.insert(
            record.catalog.name.clone(),
            (record.catalog.len, record.catalog.sha256.clone()),
        );
        for s in &record.segments {
            named.insert(layout::segment_name(s.id), (s.len, s.sha256.clone()));
            if let Some(i) = &s.index {
                named.insert(i.name.clone(), (i.len, i.sha256.clone()));
            }
        }
    }
    let mut to_hash = Vec::new();
    for (name, (len, sha)) in &named {
        match objects.get(name) {
            None => findings.push(Finding {
                kind: "object_missing",
                object: name.clone(),
                detail: "a checkpoint names it; the bucket does not hold it: restoring that \
                         checkpoint fails (an older one may be whole)"
                    .into(),
            }),
            Some(l) if l != len => findings.push(Finding {
                kind: "object_length",
                object: name.clone(),
                detail: format!("{l} bytes; its checkpoint says {len}"),
            }),
            Some(_) => to_hash.push((name.clone(), *len, sha.clone())),
        }
    }
    let objects_checked = to_hash.len();
    let bytes_checked = to_hash.iter().map(|(_, l, _)| l).sum();
    let damaged: Vec<Finding> = futures::stream::iter(to_hash)
        .map(|(name, len, sha)| async move {
            let got = bucket
                .read_ranges::<tokio::io::Sink>(&name, len, None)
                .await?;
            anyhow::Ok(
                (hex::encode(got) != sha).then(|| Finding {
                    kind: "object_digest",
                    object: name,
                    detail:
                        "its SHA-256 differs from its checkpoint's: the bucket's copy is damaged"
                            .into(),
                }),
            )
        })
        .buffer_unordered(PARALLEL)
        .try_filter_map(|f| async move { Ok(f) })
        .try_collect()
        .await?;
    findings.extend(damaged);
    let mut removed = 0;
    let ours = |n: &str| {
        layout::segment_id(n).is_some()
            || layout::catalog_seq(n).is_some()
            || layout::index_id(n).is_some()
    };
    let unnamed: BTreeSet<&String> = objects
        .keys()
        .filter(|n| {
            layout::checkpoint_seq(n).is_none()
                && !named.contains_key(*n)
                && n.as_str() != crate::lease::LEASE
                && !crate::pulls::is_report(n)
        })
        .collect();
    for name in unnamed {
        if !ours(name) {
            findings.push(Finding {
                kind: "object_unknown",
                object: name.clone(),
                detail: "not an object Ballast writes: something else uses this prefix (left \
                         as it is)"
                    .into(),
            });
        } else if repair {
            bucket.delete(name).await?;
            removed += 1;
        } else {
            findings.push(Finding {
                kind: "object_unreferenced",
                object: name.clone(),
                detail: "no checkpoint names it (left by an interrupted shipment): fsck \
                         --repair deletes it, as the server does when it next starts"
                    .into(),
            });
        }
    }
    Ok(BucketReport {
        bucket: bucket.describe().to_owned(),
        checkpoints,
        objects_checked,
        bytes_checked,
        removed,
        findings,
    })
}
