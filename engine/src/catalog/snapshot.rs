//! Catalog snapshots (docs/format.md, "Catalog journal and snapshots"): written in
//! sections (a head record and one record per repository, each with its own CRC), read back
//! whole or, after damage, for what the undamaged sections hold; a damaged snapshot is
//! rebuilt from the generation before it.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::journal::{journal_name, replay_journal};
use super::{snapshot_name, Repo, State};
use crate::error::{Error, Result};
use crate::io::{write_atomic, FileHandle, OpenMode, Storage};
use crate::segment::{
    self, check_file_header_versions, file_header_versioned, record_header, RecordKind,
};

/// Magic of catalog snapshot files.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"\x89BLSNP\r\n";
/// Format of new snapshots: 2 writes one record per repository (each with its own CRC, so
/// damage is located) after a head record. Snapshots of format 1 (one record) are read too.
pub const SNAPSHOT_VERSION: u16 = 4;
const SNAPSHOT_VERSIONS: [u16; 4] = [1, 2, 3, SNAPSHOT_VERSION];

/// A snapshot's head record (format 2).
#[derive(Serialize, Deserialize)]
struct SnapshotHead {
    repos: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segments_durable: Option<(u64, u64)>,
}

/// One repository's section of a snapshot (format 2).
#[derive(Serialize, Deserialize)]
struct SnapshotSection {
    name: String,
    repo: Repo,
}

/// Writes `state` as a snapshot (format 2) atomically: a head record, then one record per
/// repository, each with its own CRC.
pub(super) fn write_snapshot(storage: &dyn Storage, path: &Path, state: &State) -> Result<()> {
    write_atomic(storage, path, &encode_snapshot(state)?)
}

/// The bytes of a snapshot file holding `state` (see [`write_snapshot`]).
pub(crate) fn encode_snapshot(state: &State) -> Result<Vec<u8>> {
    fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| Error::Internal(format!("catalog snapshot: {e}")))
    }
    let mut out = file_header_versioned(SNAPSHOT_MAGIC, SNAPSHOT_VERSION).to_vec();
    let mut push = |payload: Vec<u8>| {
        out.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&payload]));
        out.extend_from_slice(&payload);
    };
    push(json(&SnapshotHead {
        repos: state.repos.len(),
        segments_durable: state.segments_durable,
    })?);
    for (name, repo) in &state.repos {
        push(json(&SnapshotSection {
            name: name.clone(),
            repo: repo.clone(),
        })?);
    }
    Ok(out)
}

/// Rebuilds the state snapshot `generation` was folded from: the previous generation's
/// snapshot (none for generation 0) and its whole journal. `Err` says why it cannot.
pub(super) fn rebuild_from_previous(
    storage: &dyn Storage,
    dir: &Path,
    names: &[String],
    generation: u64,
) -> std::result::Result<State, String> {
    let prev = generation
        .checked_sub(1)
        .ok_or("it is the first generation")?;
    if !names.contains(&journal_name(prev)) {
        return Err(format!(
            "{} is gone (directories written before the previous generation was kept have \
             none)",
            journal_name(prev)
        ));
    }
    let mut state = if prev == 0 {
        State::default()
    } else if names.contains(&snapshot_name(prev)) {
        read_snapshot(storage, &dir.join(snapshot_name(prev))).map_err(|e| e.to_string())?
    } else {
        return Err(format!("{} is gone", snapshot_name(prev)));
    };
    let file = FileHandle::open(storage, &dir.join(journal_name(prev)), OpenMode::Read)
        .map_err(|e| e.to_string())?;
    replay_journal(&file, &mut state).map_err(|e| e.to_string())?;
    Ok(state)
}

pub(super) fn read_snapshot(storage: &dyn Storage, path: &Path) -> Result<State> {
    let file = FileHandle::open(storage, path, OpenMode::Read)?;
    let mut head = [0u8; segment::FILE_HEADER_LEN];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| Error::corrupted(path, 0, "snapshot shorter than its header"))?;
    let version = check_file_header_versions(path, SNAPSHOT_MAGIC, &head, &SNAPSHOT_VERSIONS)?;
    let bad = |offset: u64, why: String| Error::corrupted(path, offset, format!("snapshot: {why}"));
    if version == 1 {
        let (_, payload) = segment::read_record(&file, segment::FILE_HEADER_LEN as u64)?;
        return serde_json::from_slice(&payload)
            .map_err(|e| bad(segment::FILE_HEADER_LEN as u64, e.to_string()));
    }
    let mut state = State::default();
    let mut expected = None;
    let (_, how) = segment::scan(&file, segment::FILE_HEADER_LEN as u64, |rec| {
        if expected.is_none() {
            let h: SnapshotHead = serde_json::from_slice(&rec.payload)
                .map_err(|e| bad(rec.offset, format!("head: {e}")))?;
            state.segments_durable = h.segments_durable;
            expected = Some(h.repos);
        } else {
            let section: SnapshotSection = serde_json::from_slice(&rec.payload)
                .map_err(|e| bad(rec.offset, format!("section: {e}")))?;
            state.repos.insert(section.name, section.repo);
        }
        Ok(())
    })?;
    if let segment::ScanEnd::Invalid { offset, reason } = how {
        return Err(bad(
            offset,
            format!(
                "{reason} in the section after repository {:?}",
                state.repos.keys().next_back()
            ),
        ));
    }
    if expected != Some(state.repos.len()) {
        return Err(bad(
            0,
            format!(
                "{} repositories of {:?} read: the snapshot was cut short",
                state.repos.len(),
                expected
            ),
        ));
    }
    Ok(state)
}

/// Reads what the undamaged sections of a snapshot (format 2) hold: the state and how many
/// repositories were lost (the head's count minus the sections read).
pub(super) fn read_snapshot_salvaging(
    storage: &dyn Storage,
    path: &Path,
) -> Result<(State, usize)> {
    let file = FileHandle::open(storage, path, OpenMode::Read)?;
    let mut state = State::default();
    let mut expected = None;
    let mut damaged = 0usize;
    let (_, damage) = segment::scan_salvaging(&file, segment::FILE_HEADER_LEN as u64, |rec| {
        if let Ok(section) = serde_json::from_slice::<SnapshotSection>(&rec.payload) {
            state.repos.insert(section.name, section.repo);
        } else if let Ok(h) = serde_json::from_slice::<SnapshotHead>(&rec.payload) {
            state.segments_durable = h.segments_durable;
            expected = Some(h.repos);
        } else {
            damaged += 1;
        }
        Ok(())
    })?;
    let lost = match expected {
        Some(n) => n.saturating_sub(state.repos.len()),
        None => damage.len() + damaged,
    };
    Ok((state, lost))
}
