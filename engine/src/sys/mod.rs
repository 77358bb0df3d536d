//! The engine's only `unsafe` code (docs/unsafe.md): read-only memory maps of sealed files,
//! the writeback hint for segment appends, and reads at queue depth through io_uring
//! (`uring.rs`).
#![allow(unsafe_code)]

pub(crate) mod origins;
pub(crate) mod uring;

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// A shared, read-only map of a whole file.
#[derive(Clone)]
pub struct Map(Arc<Mapped>);

/// A map and, when the file was named, its entry in the table of origins (`origins.rs`).
struct Mapped {
    map: memmap2::Mmap,
    named: bool,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Out of the table before the unmap (the fields drop after this), so no address in
        // the table belongs to a map that is gone.
        if self.named {
            origins::forget(self.map.as_ptr() as usize);
        }
    }
}

impl Map {
    /// Maps `file`, opened by `path`, read-only, and enters it in the table of origins so
    /// that bytes handed out of it can be sent from the file (`origins.rs`).
    pub(crate) fn of_named_file(file: &File, path: &Path) -> io::Result<Map> {
        let meta = file.metadata()?;
        let map = Self::map(file)?;
        // (An empty file maps to no address of its own.)
        let named = !map.is_empty();
        if named {
            origins::enter(
                map.as_ptr() as usize,
                map.len(),
                path,
                meta.dev(),
                meta.ino(),
            );
        }
        Ok(Map(Arc::new(Mapped { map, named })))
    }

    fn map(file: &File) -> io::Result<memmap2::Mmap> {
        // SAFETY: the engine maps only files it wrote and sealed: segments after sealing and
        // index files after their atomic rename. Nothing in the engine writes, truncates or
        // extends such a file again; GC unlinks a file (the mapping stays valid) and never
        // truncates one. Another process modifying the data directory while the store is open
        // is excluded by the directory lock. The mapped bytes are checksummed before use.
        unsafe { memmap2::MmapOptions::new().map(file) }
    }

    /// Asks the kernel to start reading `len` bytes at `offset` into the page cache now,
    /// without waiting (`madvise(MADV_WILLNEED)`): read-ahead of what a reader needs next.
    pub fn will_need(&self, offset: usize, len: usize) {
        let len = len.min(self.0.map.len().saturating_sub(offset));
        if len > 0 {
            let _ = self
                .0
                .map
                .advise_range(memmap2::Advice::WillNeed, offset, len);
        }
    }

    /// Whether every page of `len` bytes at `offset` is in the page cache now (`mincore`):
    /// a reader takes such bytes from the map without a copy, and reads the others ahead
    /// at queue depth (`readahead.rs`). False when it cannot tell.
    pub fn resident(&self, offset: usize, len: usize) -> bool {
        let page = rustix::param::page_size();
        let map = &self.0.map;
        let end = offset.saturating_add(len).min(map.len());
        if offset >= end {
            return true;
        }
        // mincore wants a page-aligned start; maps start on a page.
        let first = offset / page * page;
        let pages = (end - first).div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: `first..end` lies inside this live map (it is held by `self`), the start
        // is page-aligned, and `vec` has one byte for each page of the range, as mincore
        // writes.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(first) as *mut libc::c_void,
                end - first,
                vec.as_mut_ptr(),
            )
        };
        rc == 0 && vec.iter().all(|b| b & 1 == 1)
    }
}

impl Deref for Map {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.map
    }
}

impl AsRef<[u8]> for Map {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Map({} bytes)", self.0.map.len())
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk now, without waiting
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`). Durability still comes only from fsync;
/// this spreads the disk writes over the append instead of piling them up at the fsync.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: plain syscall on a file descriptor that `file` keeps open for the duration of
    // the call; no memory is passed.
    let rc = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to drop a file's clean pages from the page cache (Linux
/// `posix_fadvise(POSIX_FADV_DONTNEED)`), so the next read comes from the disk. Pages still
/// dirty or mapped stay; callers sync and unmap first. Used by `ballast bench` for cold reads.
pub(crate) fn drop_page_cache(file: &File) -> io::Result<()> {
    // rustix's safe wrapper: no `unsafe` site of our own for it.
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).map_err(io::Error::from)
}
