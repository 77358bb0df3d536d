//! The index file reader never panics on arbitrary bytes, in open, verify, get or iteration.
#![no_main]
use std::path::Path;

use ballast_engine::index::{index_file_name, IndexFile, Table};
use ballast_engine::io::{FileHandle, OpenMode, SimStorage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let storage = SimStorage::new();
    let path = Path::new("/i").join(index_file_name(1, 1));
    let Ok(file) = FileHandle::open(&storage, &path, OpenMode::Truncate) else { return };
    if file.write_all_at(data, 0).is_err() {
        return;
    }
    if let Ok(index) = IndexFile::open(&storage, &path) {
        let _ = index.verify();
        let key = data.get(..32).and_then(|k| <[u8; 32]>::try_from(k).ok()).unwrap_or([0; 32]);
        for table in [Table::Chunks, Table::Blobs] {
            let _ = index.get(table, &key);
            let _ = index.iter(table).count();
        }
    }
});
