//! Read-only memory maps of sealed files: the engine's only `unsafe` code (docs/unsafe.md).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::ops::Deref;
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

    /// Hints the kernel that the map will be read in order.
    pub fn advise_sequential(&self) {
        let _ = self.0.advise(memmap2::Advice::Sequential);
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
