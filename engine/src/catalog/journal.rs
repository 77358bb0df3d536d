//! The catalog journal file (docs/format.md, "Catalog journal and snapshots"): creating a
//! generation's journal, replaying one into a state, and setting stray journals aside.

use std::path::Path;

use super::{generation_of, io_err, snapshot_name, Journal, Op, State};
use crate::error::{Error, Result};
use crate::io::{FileHandle, OpenMode, Storage};
use crate::segment::{
    self, check_file_header_versions, file_header_versioned, RecordKind, JOURNAL_MAGIC,
};

/// Format of new journal files: 2 adds the SegmentsDurable record before each batch.
/// Journals of format 1 are read as well.
pub const JOURNAL_VERSION: u16 = 4;
const JOURNAL_VERSIONS: [u16; 4] = [1, 2, 3, JOURNAL_VERSION];

/// The name of generation `generation`'s journal.
pub(super) fn journal_name(generation: u64) -> String {
    format!("journal-{generation:020}.jnl")
}

/// Sets aside journals newer than every snapshot that hold no batch (a stray file: renamed
/// to `.stray`, with a warning). One that holds batches is acknowledged data whose snapshot
/// is missing: opening fails and names it.
pub(super) fn set_aside_stray_journals(
    storage: &dyn Storage,
    dir: &Path,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let names = storage.list(dir).map_err(io_err(dir))?;
    let newest_snapshot = names
        .iter()
        .filter_map(|n| generation_of(n, "snapshot-", ".snp"))
        .max()
        .unwrap_or(0);
    for (g, name) in names
        .iter()
        .filter_map(|n| generation_of(n, "journal-", ".jnl").map(|g| (g, n)))
        .filter(|(g, _)| *g > newest_snapshot)
    {
        let path = dir.join(name);
        let file = FileHandle::open(storage, &path, OpenMode::Read)?;
        let mut batches = 0usize;
        let _ = segment::scan(&file, segment::FILE_HEADER_LEN as u64, |rec| {
            batches += usize::from(rec.header.kind == RecordKind::CatalogBatch);
            Ok(())
        });
        if batches > 0 {
            return Err(Error::corrupted(
                &path,
                0,
                format!(
                    "catalog journal of generation {g} holds {batches} batches but its snapshot \
                     ({}) is missing",
                    snapshot_name(g)
                ),
            ));
        }
        let aside = dir.join(format!("{name}.stray"));
        storage.rename(&path, &aside).map_err(io_err(&path))?;
        warnings.push(format!(
            "{} is newer than every catalog snapshot and holds no batch: set aside as {}",
            path.display(),
            aside.display()
        ));
    }
    Ok(())
}

pub(super) fn new_journal(storage: &dyn Storage, dir: &Path, generation: u64) -> Result<Journal> {
    let name = journal_name(generation);
    let file = crate::io::create_with_header(
        storage,
        dir,
        &name,
        &file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION),
    )?;
    Ok(Journal {
        generation,
        file,
        len: segment::FILE_HEADER_LEN as u64,
    })
}

pub(super) fn replay_journal(file: &FileHandle, state: &mut State) -> Result<u64> {
    let path = file.path().to_path_buf();
    let mut head = [0u8; segment::FILE_HEADER_LEN];
    let len = file.len()?;
    if len < segment::FILE_HEADER_LEN as u64 || file.read_exact_at(&mut head, 0).is_err() {
        // Created, but the header never became durable.
        file.set_len(0)?;
        file.write_all_at(&file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION), 0)?;
        file.sync()?;
        return Ok(segment::FILE_HEADER_LEN as u64);
    }
    check_file_header_versions(&path, JOURNAL_MAGIC, &head, &JOURNAL_VERSIONS)?;
    let mut durable_end = segment::FILE_HEADER_LEN as u64;
    let mut batches: Vec<Vec<Op>> = Vec::new();
    let mut segments_durable = None;
    let (end, how) = segment::scan(file, segment::FILE_HEADER_LEN as u64, |rec| {
        match rec.header.kind {
            RecordKind::CatalogBatch => {
                let ops: Vec<Op> = serde_json::from_slice(&rec.payload).map_err(|e| {
                    Error::corrupted(&path, rec.offset, format!("catalog batch: {e}"))
                })?;
                batches.push(ops);
            }
            RecordKind::SyncMark => durable_end = rec.offset,
            RecordKind::SegmentsDurable => {
                segments_durable =
                    Some(segment::decode_position(&rec.payload).ok_or_else(|| {
                        Error::corrupted(
                            &path,
                            rec.offset,
                            "segments-durable record is not 16 bytes",
                        )
                    })?);
            }
            _ => {
                return Err(Error::corrupted(
                    &path,
                    rec.offset,
                    "unexpected record kind in the catalog journal",
                ))
            }
        }
        Ok(())
    })?;
    segment::settle_tail(file, &how, durable_end, true)?;
    for ops in &batches {
        for op in ops {
            state.apply(op);
        }
    }
    if segments_durable.is_some() {
        state.segments_durable = segments_durable;
    }
    Ok(end)
}
