//! Sealed segments kept elsewhere (a bucket: docs/design.md, "Segments in a bucket"). Once
//! the caller has confirmed a sealed segment is stored there, [`Store::make_remote`] drops
//! its local file: the index files still locate every record in it, and reads of those
//! records go through the [`RemoteSegments`] the caller installed, which fetches the byte
//! ranges (and keeps what it fetched in a cache of its own). Every record fetched is checked
//! against its CRC, and a chunk against its BLAKE3 id as any read is; a check that fails is
//! taken for a bad copy first (the cached bytes are discarded and fetched again), and only
//! a second failure is reported as damage.
//!
//! Which segments are remote is kept in the data directory's `remote-segments` file
//! (docs/format.md), written before a local file is removed: a crash in between leaves a
//! segment both listed and present, and the local file is then used.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::Location;
use crate::io::{existed, write_atomic, FileHandle, OpenMode, Storage};
use crate::segment::{segment_path, Check, RECORD_HEADER_LEN};

use super::*;

/// Where the bytes of remote segments are read from (the bucket crate implements it on its
/// own runtime; the engine stays free of HTTP). Calls block; errors are one line a person
/// can act on.
pub trait RemoteSegments: Send + Sync {
    /// `len` bytes at `offset` of sealed segment `segment` (of `segment_len` bytes).
    fn read(
        &self,
        segment: u64,
        segment_len: u64,
        offset: u64,
        len: usize,
    ) -> std::result::Result<Bytes, String>;
    /// A reader will soon read `len` bytes at `offset`: start fetching them (no wait).
    fn prefetch(&self, segment: u64, segment_len: u64, offset: u64, len: usize);
    /// True when `len` bytes at `offset` are held locally (no request needed to read them).
    fn is_cached(&self, segment: u64, segment_len: u64, offset: u64, len: usize) -> bool;
    /// The bytes at `offset` failed a check: forget any copy of them kept locally.
    fn discard(&self, segment: u64, offset: u64, len: usize);
}

/// File in the data directory listing the segments whose bytes are kept remotely.
pub const REMOTE_SEGMENTS: &str = "remote-segments";

const HEADER: &str = "ballast remote-segments 1";

/// A sealed segment whose local file is gone: its length and when it was sealed (seconds
/// since the epoch, for the collector's grace period).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteSegment {
    /// Bytes of the segment file.
    pub len: u64,
    /// Its file's last modification when it was made remote.
    pub mtime: u64,
}

/// Writes the `remote-segments` file of `dir` (atomically).
pub(crate) fn write_list(
    storage: &dyn Storage,
    dir: &Path,
    list: &[(u64, RemoteSegment)],
) -> Result<()> {
    let mut text = format!("{HEADER}\n");
    for (id, r) in list {
        text.push_str(&format!("{id} {} {}\n", r.len, r.mtime));
    }
    write_atomic(storage, &dir.join(REMOTE_SEGMENTS), text.as_bytes())
}

/// Reads the `remote-segments` file of `dir` (empty when there is none).
pub(crate) fn read_list(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, RemoteSegment)>> {
    let path = dir.join(REMOTE_SEGMENTS);
    let Ok(file) = FileHandle::open(storage, &path, OpenMode::Read) else {
        return Ok(Vec::new());
    };
    let mut bytes = vec![0u8; usize::try_from(file.len()?).unwrap_or(0)];
    file.read_exact_at(&mut bytes, 0)?;
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(Error::corrupted(
            &path,
            0,
            format!("the first line is not {HEADER:?}"),
        ));
    }
    lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let bad = || Error::corrupted(&path, 0, format!("{l:?} is not \"<id> <len> <mtime>\""));
            let mut f = l.split_ascii_whitespace().map(str::parse::<u64>);
            match (f.next(), f.next(), f.next(), f.next()) {
                (Some(Ok(id)), Some(Ok(len)), Some(Ok(mtime)), None) => {
                    Ok((id, RemoteSegment { len, mtime }))
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

impl Store {
    /// Installs where remote segments are read from. Until it is, their records read as
    /// unavailable.
    pub fn set_remote(&self, remote: Arc<dyn RemoteSegments>) {
        *self.inner.remote.write() = Some(remote);
    }

    /// Sealed segments whose file is local and that an index file covers (so their records
    /// can be located without their bytes): what [`Store::make_remote`] may take, with their
    /// lengths, oldest first.
    pub fn local_sealed_segments(&self) -> Vec<(u64, u64)> {
        let sealed_below = self.inner.sealed_below.load(Ordering::SeqCst);
        let pending = self.inner.pending.lock();
        let mut out: Vec<(u64, u64)> = self
            .inner
            .segments
            .read()
            .iter()
            .filter(|(id, _)| **id < sealed_below && !pending.by_segment.contains_key(id))
            .filter_map(|(id, data)| match data {
                SegmentData::Mapped(m) => Some((*id, m.len() as u64)),
                SegmentData::File(f) => Some((*id, f.len().ok()?)),
                SegmentData::Remote(_) => None,
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// True when segment `id` is kept remotely.
    pub fn is_remote(&self, id: u64) -> bool {
        matches!(self.segment_data_of(id), Some(SegmentData::Remote(_)))
    }

    /// True when the record at `loc` lies in a remote segment and reading it needs a
    /// request.
    pub(crate) fn remote_needs_fetch(&self, loc: &Location) -> bool {
        let Ok(segment_len) = self.remote_len(loc.segment) else {
            return false;
        };
        let len = RECORD_HEADER_LEN + loc.len as usize;
        self.inner
            .remote
            .read()
            .as_ref()
            .is_some_and(|r| !r.is_cached(loc.segment, segment_len, loc.offset, len))
    }

    /// True when a [`RemoteSegments`] is installed.
    pub fn has_remote(&self) -> bool {
        self.inner.remote.read().is_some()
    }

    /// The remote segments and their lengths, in id order.
    pub fn remote_segments(&self) -> Vec<(u64, u64)> {
        self.remote_list()
            .into_iter()
            .map(|(id, r)| (id, r.len))
            .collect()
    }

    /// Drops the local file of sealed segment `id`, which the caller has confirmed is stored
    /// remotely byte for byte: its records are read through the installed
    /// [`RemoteSegments`] from now on. `Ok(None)` when it cannot be done now (the segment is
    /// active, not indexed yet, already remote or gone, or a collection is running: try
    /// again later); the bytes freed otherwise.
    pub fn make_remote(&self, id: u64) -> Result<Option<u64>> {
        if self.inner.remote.read().is_none() {
            return Err(Error::InvalidInput {
                what: crate::error::Input::Segment,
                reason: "no remote store is installed to read it from".into(),
            });
        }
        // A collection removes segments and rewrites the lists: not both at once.
        let Some(_one_at_a_time) = self.inner.gc_lock.try_lock() else {
            return Ok(None);
        };
        if !self.local_sealed_segments().iter().any(|(s, _)| *s == id) {
            return Ok(None);
        }
        let path = segment_path(&self.inner.seg_dir, id);
        let file = FileHandle::open(self.inner.storage.as_ref(), &path, OpenMode::Read)?;
        let seg = RemoteSegment {
            len: file.len()?,
            mtime: file.modified().unwrap_or(0),
        };
        drop(file);
        let mut listed = self.remote_list();
        listed.push((id, seg));
        self.write_remote_list(&listed)?;
        // Readers that hold the old map keep it: an unlinked file stays readable.
        self.inner
            .segments
            .write()
            .insert(id, SegmentData::Remote(seg));
        existed(&path, self.inner.storage.remove(&path))?;
        self.inner
            .storage
            .sync_dir(&self.inner.seg_dir)
            .map_err(io_err(&self.inner.seg_dir))?;
        Ok(Some(seg.len))
    }

    pub(super) fn remote_list(&self) -> Vec<(u64, RemoteSegment)> {
        let mut out: Vec<(u64, RemoteSegment)> = self
            .inner
            .segments
            .read()
            .iter()
            .filter_map(|(id, d)| match d {
                SegmentData::Remote(r) => Some((*id, *r)),
                _ => None,
            })
            .collect();
        out.sort_unstable_by_key(|(id, _)| *id);
        out
    }

    pub(crate) fn write_remote_list(&self, list: &[(u64, RemoteSegment)]) -> Result<()> {
        write_list(self.inner.storage.as_ref(), &self.inner.dir, list)
    }

    /// After a collection removed `victims`: the list without them, when any was remote.
    pub(crate) fn forget_remote(&self, victims: &std::collections::HashSet<u64>) -> Result<()> {
        let list = read_list(self.inner.storage.as_ref(), &self.inner.dir)?;
        if list.iter().any(|(id, _)| victims.contains(id)) {
            let kept: Vec<_> = list
                .into_iter()
                .filter(|(id, _)| !victims.contains(id))
                .collect();
            self.write_remote_list(&kept)?;
        }
        Ok(())
    }

    /// Reads the record at `loc` of a remote segment: its CRC checked whatever the setting
    /// (a copy fetched or cached may be bad where the segment is not), fetched again once
    /// when the check fails.
    pub(crate) fn read_remote_record(&self, loc: &Location) -> Result<(u8, Bytes)> {
        let remote = self.inner.remote.read().clone().ok_or_else(|| {
            Error::Unavailable(format!(
                "segment {} is kept in the bucket, and no bucket is configured to read it from",
                loc.segment
            ))
        })?;
        let len = RECORD_HEADER_LEN + loc.len as usize;
        let mut tries = 0;
        loop {
            let bytes = remote
                .read(loc.segment, self.remote_len(loc.segment)?, loc.offset, len)
                .map_err(Error::Unavailable)?;
            self.inner
                .stats
                .remote_reads
                .fetch_add(1, Ordering::Relaxed);
            match self.decode_fetched_with(loc, &bytes, Check::Crc) {
                Err(e) if e.is_corruption() && tries == 0 => {
                    remote.discard(loc.segment, loc.offset, len);
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Raw bytes of a remote segment (a checkpoint shipping it again elsewhere).
    pub(crate) fn read_remote_bytes(
        &self,
        segment: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let remote = self.inner.remote.read().clone().ok_or_else(|| {
            Error::Unavailable(format!(
                "segment {segment} is kept in the bucket, and no bucket is configured to read it from"
            ))
        })?;
        let bytes = remote
            .read(segment, self.remote_len(segment)?, offset, buf.len())
            .map_err(Error::Unavailable)?;
        if bytes.len() != buf.len() {
            return Err(Error::Unavailable(format!(
                "segment {segment}: {} bytes asked at offset {offset}, {} came",
                buf.len(),
                bytes.len()
            )));
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// Asks the remote store to start fetching a span a reader will want.
    pub(crate) fn prefetch_remote(&self, segment: u64, offset: u64, len: usize) {
        let Ok(segment_len) = self.remote_len(segment) else {
            return;
        };
        if let Some(r) = self.inner.remote.read().as_ref() {
            r.prefetch(segment, segment_len, offset, len);
        }
    }

    fn remote_len(&self, segment: u64) -> Result<u64> {
        match self.segment_data_of(segment) {
            Some(SegmentData::Remote(r)) => Ok(r.len),
            _ => Err(Error::NotFound(format!("remote segment {segment}"))),
        }
    }
}
