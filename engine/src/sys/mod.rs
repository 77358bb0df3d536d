//! The engine's only `unsafe` code (docs/unsafe.md): read-only memory maps of sealed files,
//! the writeback hint for segment appends, and reads at queue depth through io_uring
//! (`uring.rs`).
#![allow(unsafe_code)]

pub(crate) mod uring;

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// A shared, read-only map of a whole file.
#[derive(Clone)]
pub struct Map(Arc<memmap2::Mmap>);

impl Map {
    /// Maps `file` read-only.
    pub(crate) fn of_file(file: &File) -> io::Result<Map> {
        // SAFETY: the engine maps only files it wrote and sealed: segments after sealing and
        // index files after their atomic rename. Nothing in the engine writes, truncates or
        // extends such a file again; GC unlinks a file (the mapping stays valid) and never
        // truncates one. Another process modifying the data directory while the store is open
        // is excluded by the directory lock. The mapped bytes are checksummed before use.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(Map(Arc::new(map)))
    }

    /// Asks the kernel to start reading `len` bytes at `offset` into the page cache now,
    /// without waiting (`madvise(MADV_WILLNEED)`): read-ahead of what a reader needs next.
    pub fn will_need(&self, offset: usize, len: usize) {
        let len = len.min(self.0.len().saturating_sub(offset));
        if len > 0 {
            let _ = self.0.advise_range(memmap2::Advice::WillNeed, offset, len);
        }
    }
}

impl Deref for Map {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Map {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Map {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Map({} bytes)", self.0.len())
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
