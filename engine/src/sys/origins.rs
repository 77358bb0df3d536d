//! Where mapped bytes come from: a table of the live maps of named files, by address, so that
//! a caller holding bytes the engine handed out (a raw chunk of a sealed segment is a slice
//! of its map, not a copy) can learn the file and offset behind them and send them with
//! `sendfile` instead of copying them through user space.
//!
//! A map enters the table when it is made and leaves it before it is unmapped, so an address
//! found here is that map's for as long as the caller holds the bytes (which hold the map).
//! The file is named by path and identified by device and inode: a caller reopens it by
//! path and must check both, so a path that now names another file is never read in its
//! place (the bytes would then be sent from the map, as before).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// The file behind some mapped bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Names this map among all maps the process made (never reused).
    pub map: u64,
    /// The path the file was opened by.
    pub path: Arc<Path>,
    /// Its device and inode when it was mapped: a reopened path must show the same.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
}

/// One map's entry: its address range and file.
struct Entry {
    end: usize,
    origin: Arc<Origin>,
}

static TABLE: RwLock<BTreeMap<usize, Entry>> = RwLock::new(BTreeMap::new());
static NEXT_MAP: AtomicU64 = AtomicU64::new(1);

/// Enters the map at `[start, start + len)` of the file at `path` (device `dev`, inode
/// `ino`) and returns its origin; [`forget`] takes it out.
pub(crate) fn enter(start: usize, len: usize, path: &Path, dev: u64, ino: u64) -> Arc<Origin> {
    let origin = Arc::new(Origin {
        map: NEXT_MAP.fetch_add(1, Ordering::Relaxed),
        path: Arc::from(PathBuf::from(path)),
        dev,
        ino,
    });
    TABLE.write().insert(
        start,
        Entry {
            end: start.saturating_add(len),
            origin: origin.clone(),
        },
    );
    origin
}

/// Takes the map starting at `start` out of the table (before it is unmapped).
pub(crate) fn forget(start: usize) {
    TABLE.write().remove(&start);
}

/// The file and the offset in it of `bytes`, when they lie wholly inside one live map of a
/// named file.
pub fn origin_of(bytes: &[u8]) -> Option<(Arc<Origin>, u64)> {
    let start = bytes.as_ptr() as usize;
    let end = start.checked_add(bytes.len())?;
    let table = TABLE.read();
    let (&map_start, entry) = table.range(..=start).next_back()?;
    if end > entry.end {
        return None;
    }
    Some((entry.origin.clone(), (start - map_start) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_map_and_offset_of_bytes_inside_it_only() {
        let buf = vec![7u8; 4096];
        let start = buf.as_ptr() as usize;
        let origin = enter(start, 4096, Path::new("/x/seg"), 1, 2);
        let (found, offset) = origin_of(&buf[100..200]).expect("inside");
        assert_eq!((found.map, offset), (origin.map, 100));
        assert_eq!(&*found.path, Path::new("/x/seg"));
        assert!(origin_of(&buf[..]).is_some());
        let other = vec![1u8; 16];
        // Bytes elsewhere are not this map's.
        assert!(origin_of(&other).is_none_or(|(o, _)| o.map != origin.map));
        forget(start);
        assert!(origin_of(&buf[100..200]).is_none_or(|(o, _)| o.map != origin.map));
    }
}
