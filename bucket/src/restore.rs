//! Rebuilding a data directory from the bucket alone (`ballast restore`): a checkpoint's
//! segments are fetched in ranges, each checked against the length and SHA-256 its record
//! gives, into a staging directory beside the target; the catalog is installed and the
//! store opened once (which indexes every segment); only then is the staging directory
//! renamed into place. An interrupted restore leaves no half-restored data directory.
//!
//! With tiering on (`cache_bytes_max`), the bucket may hold more than the local disk: the
//! segments then stay in the bucket, and only the catalog and each segment's index file
//! are fetched (a restore in seconds, whatever the registry's size); pulls read segment
//! bytes through the block cache as for any remote segment.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ballast_engine::checkpoint::restore as engine_restore;
use ballast_engine::storage::RealStorage;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::client::Bucket;
use crate::layout::{self, CheckpointRecord};

/// Segments fetched at once.
const PARALLEL: usize = 4;
/// The file that marks a staging directory as ours (so a leftover one may be removed).
const MARKER: &str = "RESTORING";

/// What a restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    /// The checkpoint restored.
    pub seq: u64,
    /// When its cut was taken (Unix seconds).
    pub taken_at: u64,
    /// Repositories in its catalog.
    pub repos: usize,
    /// Segments the checkpoint lists.
    pub segments: usize,
    /// Of those, left in the bucket (tiering: only their index files were fetched).
    pub segments_remote: usize,
    /// Bytes fetched.
    pub bytes: u64,
    /// What opening the restored store said.
    pub warnings: Vec<String>,
    /// Milliseconds it took.
    pub ms: u64,
}

/// The checkpoints in the bucket, oldest first.
pub async fn checkpoints(bucket: &Bucket) -> anyhow::Result<Vec<u64>> {
    let mut seqs: Vec<u64> = bucket
        .list("checkpoints/")
        .await?
        .iter()
        .filter_map(|(n, _)| layout::checkpoint_seq(n))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

/// Checkpoint `seq`'s record, which a listing just named.
pub async fn read_record(bucket: &Bucket, seq: u64) -> anyhow::Result<CheckpointRecord> {
    let name = layout::checkpoint_name(seq);
    let record = bucket
        .get(&name)
        .await?
        .with_context(|| format!("checkpoint {seq} vanished from {}", bucket.describe()))?;
    CheckpointRecord::parse(&record).with_context(|| format!("reading {name}"))
}

/// A checkpoint as `ballast restore --list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointSummary {
    /// Its sequence number (`--checkpoint`).
    pub seq: u64,
    /// When its cut was taken (Unix seconds).
    pub taken_at: u64,
    /// Repositories in its catalog.
    pub repos: usize,
    /// Segments it lists.
    pub segments: usize,
    /// Bytes a restore of it fetches.
    pub bytes: u64,
}

/// The bucket's checkpoints, oldest first, each read and summarised.
pub async fn list(bucket: &Bucket) -> anyhow::Result<Vec<CheckpointSummary>> {
    let mut out = Vec::new();
    for seq in checkpoints(bucket).await? {
        let name = layout::checkpoint_name(seq);
        // (One pruned since the listing is skipped.)
        let Some(bytes) = bucket.get(&name).await? else {
            continue;
        };
        let c = CheckpointRecord::parse(&bytes).with_context(|| format!("reading {name}"))?;
        out.push(CheckpointSummary {
            seq,
            taken_at: c.taken_at,
            repos: c.repos,
            segments: c.segments.len(),
            bytes: c.bytes(),
        });
    }
    Ok(out)
}

/// Restores checkpoint `seq` (the newest when `None`) into `dir`, which must not exist or
/// be empty. With `remote` (tiering on), segments stay in the bucket when the checkpoint
/// names the index file of every one.
pub async fn restore(
    bucket: &Bucket,
    dir: &Path,
    seq: Option<u64>,
    remote: bool,
    opts: ballast_engine::Options,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    if !is_empty(dir)? {
        bail!(
            "{} is not empty: restore into a new directory (nothing there was changed)",
            dir.display()
        );
    }
    let seqs = checkpoints(bucket).await?;
    let seq = match seq {
        Some(s) if seqs.contains(&s) => s,
        Some(s) => bail!(
            "{} holds no checkpoint {s}; it holds {}",
            bucket.describe(),
            describe_seqs(&seqs)
        ),
        None => *seqs.last().with_context(|| {
            format!(
                "{} holds no checkpoint: nothing was shipped there (check endpoint, bucket and \
                 prefix)",
                bucket.describe()
            )
        })?,
    };
    let record = read_record(bucket, seq).await?;
    let catalog = bucket.get_checked(&record.catalog).await?;
    let remote = remote && record.segments.iter().all(|s| s.index.is_some());

    let staging = staging_dir(dir)?;
    for d in [staging.clone(), staging.join("segments")] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(ballast_engine::storage::DIR_MODE)
            .create(&d)
            .with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(staging.join(MARKER), format!("checkpoint {seq}\n"))?;
    let (generation, target) = (record.generation, staging.clone());
    let (fetched, warnings) = if remote {
        let indexes: BTreeMap<u64, Vec<u8>> = futures::stream::iter(&record.segments)
            .map(|s| async move {
                let index = s.index.as_ref().context("an index file is named")?;
                Ok::<_, anyhow::Error>((s.id, bucket.get_checked(index).await?.to_vec()))
            })
            .buffer_unordered(PARALLEL * 2)
            .try_collect()
            .await?;
        std::fs::remove_file(staging.join(MARKER))?;
        let fetched = indexes.values().map(|b| b.len() as u64).sum::<u64>();
        let listed: Vec<(u64, u64)> = record.segments.iter().map(|s| (s.id, s.len)).collect();
        let sealed_by = record.taken_at;
        let warnings = tokio::task::spawn_blocking(move || {
            engine_restore::finish_remote(
                Arc::new(RealStorage),
                &target,
                generation,
                &catalog,
                &listed,
                &indexes,
                sealed_by,
                opts,
            )
        })
        .await?
        .context("opening the restored data directory")?;
        (fetched, warnings)
    } else {
        let fetched: u64 = futures::stream::iter(record.segments.iter().cloned())
            .map(|s| {
                let bucket = bucket.clone();
                let staging = staging.clone();
                async move { fetch_segment(&bucket, &staging, &s).await.map(|()| s.len) }
            })
            .buffer_unordered(PARALLEL)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await?;
        std::fs::remove_file(staging.join(MARKER))?;
        let warnings = tokio::task::spawn_blocking(move || {
            engine_restore::finish(Arc::new(RealStorage), &target, generation, &catalog, opts)
        })
        .await?
        .context("opening the restored data directory")?;
        (fetched, warnings)
    };
    if dir.exists() {
        std::fs::remove_dir(dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&staging, dir)
        .with_context(|| format!("moving {} to {}", staging.display(), dir.display()))?;
    Ok(RestoreReport {
        seq,
        taken_at: record.taken_at,
        repos: record.repos,
        segments: record.segments.len(),
        segments_remote: if remote { record.segments.len() } else { 0 },
        bytes: fetched + record.catalog.len,
        warnings,
        ms: started.elapsed().as_millis() as u64,
    })
}

/// What `serve` does first with a bucket configured: when `dir` is absent or empty, restores
/// the bucket's newest checkpoint into it (`None` when the bucket holds none: a new
/// registry). Refuses while another registry holds the prefix's lease (it is alive, or has
/// just been lost: the error says when its lease lapses), and when the bucket cannot be
/// asked (starting empty could fork the prefix's history).
pub async fn restore_if_empty(
    bucket: &Bucket,
    dir: &Path,
    remote: bool,
    opts: ballast_engine::Options,
) -> anyhow::Result<Option<RestoreReport>> {
    if !is_empty(dir)? {
        return Ok(None);
    }
    let asked = async {
        crate::lease::check_free(bucket, None).await?;
        checkpoints(bucket).await
    }
    .await;
    let seqs = match asked {
        Ok(seqs) => seqs,
        Err(e) if e.downcast_ref::<crate::lease::LeaseHeld>().is_some() => {
            return Err(e.context(format!("{} is empty and was not restored", dir.display())))
        }
        Err(e) => {
            return Err(e.context(format!(
                "{} is empty, and the bucket could not be asked for a checkpoint to restore: \
                 start again once it answers (or set restore_empty = false in [bucket] to start \
                 an empty registry)",
                dir.display()
            )))
        }
    };
    if seqs.is_empty() {
        return Ok(None);
    }
    restore(bucket, dir, None, remote, opts).await.map(Some)
}

/// True when `dir` is absent or holds nothing.
fn is_empty(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

fn describe_seqs(seqs: &[u64]) -> String {
    match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) => format!("checkpoints {a} to {b}"),
        _ => "none".into(),
    }
}

/// `<dir>.restoring`, emptied of a restore that was interrupted (only when it is one).
fn staging_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    let mut name = dir
        .file_name()
        .with_context(|| format!("{} names no directory", dir.display()))?
        .to_os_string();
    name.push(".restoring");
    let staging = dir.with_file_name(name);
    if staging.exists() {
        if !staging.join(MARKER).exists() {
            bail!(
                "{} exists and is not an interrupted restore: move it away first",
                staging.display()
            );
        }
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the interrupted restore {}", staging.display()))?;
    }
    Ok(staging)
}

/// Fetches one segment in ranges into `staging/segments/`, checking its length and SHA-256.
async fn fetch_segment(
    bucket: &Bucket,
    staging: &Path,
    s: &layout::SegmentRef,
) -> anyhow::Result<()> {
    let name = layout::segment_name(s.id);
    let path = engine_restore::segment_file(staging, s.id);
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(ballast_engine::storage::FILE_MODE)
        .open(&path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    let sha = bucket.read_ranges(&name, s.len, Some(&mut file)).await?;
    if hex::encode(sha) != s.sha256 {
        bail!(
            "{name} in {} does not match its checkpoint's SHA-256: the bucket's copy is damaged",
            bucket.describe()
        );
    }
    file.sync_all().await?;
    Ok(())
}
