//! Memory-mapped index files (docs/format.md, "Index files").
//!
//! An index file maps chunk ids and blob digest keys to record locations for a contiguous
//! range of sealed segments. Entries are sorted by key; keys are uniformly distributed hashes,
//! so lookups use interpolation search over the mapped array.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::{write_atomic, FileHandle, OpenMode, Storage};
use crate::sys::Map;

/// Magic of index files.
pub const INDEX_MAGIC: [u8; 8] = *b"\x89BLIDX\r\n";
/// Format version of index files.
pub const INDEX_VERSION: u16 = 1;
/// Index file header length.
pub const INDEX_HEADER_LEN: usize = 8 + 2 + 1 + 1 + 8 + 8 + 4;
/// Largest fanout: 2^20 buckets.
pub const FANOUT_BITS_MAX: u8 = 20;
/// Length of one entry: key, segment, offset, length, aux.
pub const ENTRY_LEN: usize = 32 + 8 + 8 + 4 + 4;
const TRAILER_LEN: usize = 4;

const _: () = assert!(INDEX_HEADER_LEN == 32);
const _: () = assert!(ENTRY_LEN == 56);

/// Where a record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record header in the segment.
    pub offset: u64,
    /// Payload length of the record.
    pub len: u32,
    /// Chunks: raw (uncompressed) length. Blobs: digest algorithm code.
    pub aux: u32,
}

/// A sorted entry.
pub type Entry = ([u8; 32], Location);

/// Which table of an index file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Chunk id → chunk record.
    Chunks,
    /// Blob digest key → recipe record.
    Blobs,
}

/// The file name of the index covering segments `lo..=hi`.
pub fn index_file_name(lo: u64, hi: u64) -> String {
    format!("{lo:020}-{hi:020}.idx")
}

/// Parses an index file name into its segment range.
pub fn parse_index_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".idx")?;
    let (lo, hi) = stem.split_once('-')?;
    if lo.len() != 20 || hi.len() != 20 {
        return None;
    }
    let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
    (lo <= hi).then_some((lo, hi))
}

fn encode_entry(out: &mut Vec<u8>, (key, loc): &Entry) {
    out.extend_from_slice(key);
    out.extend_from_slice(&loc.segment.to_le_bytes());
    out.extend_from_slice(&loc.offset.to_le_bytes());
    out.extend_from_slice(&loc.len.to_le_bytes());
    out.extend_from_slice(&loc.aux.to_le_bytes());
}

/// Fanout bits for a table of `n` entries: about 8 entries per bucket.
pub fn fanout_bits(n: usize) -> u8 {
    let mut bits = 0u8;
    while bits < FANOUT_BITS_MAX && (n >> (bits + 1)) >= 8 {
        bits += 1;
    }
    bits
}

/// The bucket of a key: its top `bits` bits.
fn bucket(key: &[u8], bits: u8) -> usize {
    if bits == 0 {
        return 0;
    }
    let top = u64::from_be_bytes(
        key.get(..8)
            .and_then(|k| k.try_into().ok())
            .unwrap_or_default(),
    );
    (top >> (64 - u32::from(bits))) as usize
}

fn encode_table(out: &mut Vec<u8>, entries: &[Entry], bits: u8) {
    assert!(
        u32::try_from(entries.len()).is_ok(),
        "an index file holds fewer than 2^32 entries per table"
    );
    // fanout[b] = index of the first entry whose bucket is >= b; fanout[2^bits] = len.
    let buckets = 1usize << bits;
    let mut next = 0usize;
    for b in 0..=buckets {
        while next < entries.len() && bucket(&entries[next].0, bits) < b {
            next += 1;
        }
        out.extend_from_slice(&(next as u32).to_le_bytes());
    }
    for e in entries {
        encode_entry(out, e);
    }
}

/// Writes an index file atomically. `chunks` and `blobs` must be sorted by key and unique.
pub fn write_index(
    storage: &dyn Storage,
    path: &Path,
    chunks: &[Entry],
    blobs: &[Entry],
) -> Result<()> {
    write_atomic(storage, path, &encode_index(chunks, blobs))
}

/// The bytes of an index file of `chunks` and `blobs`, which must be sorted by key and
/// unique.
pub fn encode_index(chunks: &[Entry], blobs: &[Entry]) -> Vec<u8> {
    assert!(
        chunks.windows(2).all(|w| w[0].0 < w[1].0),
        "chunk entries must be sorted and unique"
    );
    assert!(
        blobs.windows(2).all(|w| w[0].0 < w[1].0),
        "blob entries must be sorted and unique"
    );
    let (cb, bb) = (fanout_bits(chunks.len()), fanout_bits(blobs.len()));
    let mut out = Vec::with_capacity(
        INDEX_HEADER_LEN
            + (chunks.len() + blobs.len()) * ENTRY_LEN
            + ((2usize << cb) + (2usize << bb)) * 4
            + TRAILER_LEN,
    );
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.push(cb);
    out.push(bb);
    out.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    out.extend_from_slice(&(blobs.len() as u64).to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    encode_table(&mut out, chunks, cb);
    encode_table(&mut out, blobs, bb);
    let crc = crc32fast::hash(&out[INDEX_HEADER_LEN..]);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

enum Bytes {
    Mapped(Map),
    Owned(Vec<u8>),
}

/// An open, immutable index file.
pub struct IndexFile {
    path: PathBuf,
    /// First segment covered.
    pub lo: u64,
    /// Last segment covered.
    pub hi: u64,
    bytes: Bytes,
    chunk_count: usize,
    blob_count: usize,
    chunk_bits: u8,
    blob_bits: u8,
}

impl std::fmt::Debug for IndexFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IndexFile({}..={}, {} chunks, {} blobs)",
            self.lo, self.hi, self.chunk_count, self.blob_count
        )
    }
}

impl IndexFile {
    /// Opens and maps an index file, checking its header and length (the entries' checksum is
    /// checked by [`IndexFile::verify`], which fsck runs; every record an entry points at is
    /// checked again when it is read).
    pub fn open(storage: &dyn Storage, path: &Path) -> Result<IndexFile> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let (lo, hi) = parse_index_file_name(name)
            .ok_or_else(|| Error::corrupted(path, 0, "index file name is not <lo>-<hi>.idx"))?;
        let file = FileHandle::open(storage, path, OpenMode::Read)?;
        let bytes = match file.map()? {
            Some(map) => Bytes::Mapped(map),
            None => {
                let mut v = vec![0u8; usize::try_from(file.len()?).unwrap_or(usize::MAX)];
                file.read_exact_at(&mut v, 0)?;
                Bytes::Owned(v)
            }
        };
        let data: &[u8] = match &bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        };
        let header = data
            .get(..INDEX_HEADER_LEN)
            .ok_or_else(|| Error::corrupted(path, 0, "index file too short"))?;
        if header[..8] != INDEX_MAGIC {
            return Err(Error::corrupted(path, 0, "bad index file magic"));
        }
        let word = |a: usize| u64::from_le_bytes(header[a..a + 8].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(header[28..32].try_into().unwrap_or_default());
        if crc32fast::hash(&header[..28]) != crc {
            return Err(Error::corrupted(path, 0, "index header checksum mismatch"));
        }
        let version = u16::from_le_bytes([header[8], header[9]]);
        let (chunk_bits, blob_bits) = (header[10], header[11]);
        if version != INDEX_VERSION {
            return Err(Error::Version {
                file: path.to_path_buf(),
                found: version,
                supported: INDEX_VERSION,
            });
        }
        let (chunk_count, blob_count) = (word(12), word(20));
        if chunk_bits > FANOUT_BITS_MAX || blob_bits > FANOUT_BITS_MAX {
            return Err(Error::corrupted(path, 10, "index fanout too large"));
        }
        let expect = (chunk_count as u128 + blob_count as u128) * ENTRY_LEN as u128
            + ((1u128 << chunk_bits) + (1u128 << blob_bits) + 2) * 4
            + INDEX_HEADER_LEN as u128
            + TRAILER_LEN as u128;
        if expect != data.len() as u128 {
            return Err(Error::corrupted(
                path,
                0,
                "index file length does not match its entry counts",
            ));
        }
        Ok(IndexFile {
            path: path.to_path_buf(),
            lo,
            hi,
            bytes,
            chunk_count: chunk_count as usize,
            blob_count: blob_count as usize,
            chunk_bits,
            blob_bits,
        })
    }

    fn data(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of entries in a table.
    pub fn count(&self, table: Table) -> usize {
        match table {
            Table::Chunks => self.chunk_count,
            Table::Blobs => self.blob_count,
        }
    }

    /// The fanout bytes and the entry bytes of a table.
    fn parts(&self, table: Table) -> (&[u8], &[u8], u8) {
        let chunk_fan = ((1usize << self.chunk_bits) + 1) * 4;
        let blob_fan = ((1usize << self.blob_bits) + 1) * 4;
        let chunk_start = INDEX_HEADER_LEN + chunk_fan;
        let blob_fan_start = chunk_start + self.chunk_count * ENTRY_LEN;
        let (fan_start, fan_len, start, count, bits) = match table {
            Table::Chunks => (
                INDEX_HEADER_LEN,
                chunk_fan,
                chunk_start,
                self.chunk_count,
                self.chunk_bits,
            ),
            Table::Blobs => (
                blob_fan_start,
                blob_fan,
                blob_fan_start + blob_fan,
                self.blob_count,
                self.blob_bits,
            ),
        };
        let data = self.data();
        (
            data.get(fan_start..fan_start + fan_len).unwrap_or_default(),
            data.get(start..start + count * ENTRY_LEN)
                .unwrap_or_default(),
            bits,
        )
    }

    fn table(&self, table: Table) -> &[u8] {
        self.parts(table).1
    }

    /// Checks the entries' checksum and order.
    pub fn verify(&self) -> Result<()> {
        let data = self.data();
        let body = &data[INDEX_HEADER_LEN..data.len() - TRAILER_LEN];
        let stored = u32::from_le_bytes(
            data[data.len() - TRAILER_LEN..]
                .try_into()
                .unwrap_or_default(),
        );
        if crc32fast::hash(body) != stored {
            return Err(Error::corrupted(
                &self.path,
                INDEX_HEADER_LEN as u64,
                "index entries checksum mismatch",
            ));
        }
        for table in [Table::Chunks, Table::Blobs] {
            let (fan, entries, bits) = self.parts(table);
            let n = entries.len() / ENTRY_LEN;
            let fan: Vec<usize> = fan
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .collect();
            let fan_ok = fan.windows(2).all(|w| w[0] <= w[1])
                && fan.last() == Some(&n)
                && fan.first() == Some(&0);
            let buckets_ok = fan.windows(2).enumerate().all(|(b, w)| {
                entries
                    .chunks_exact(ENTRY_LEN)
                    .skip(w[0])
                    .take(w[1] - w[0])
                    .all(|e| bucket(e, bits) == b)
            });
            if !fan_ok || !buckets_ok {
                return Err(Error::corrupted(
                    &self.path,
                    INDEX_HEADER_LEN as u64,
                    "index fanout does not match its entries",
                ));
            }
            let t = self.table(table);
            for (i, pair) in t
                .chunks_exact(ENTRY_LEN)
                .collect::<Vec<_>>()
                .windows(2)
                .enumerate()
            {
                if pair[0][..32] >= pair[1][..32] {
                    return Err(Error::corrupted(
                        &self.path,
                        (INDEX_HEADER_LEN + i * ENTRY_LEN) as u64,
                        "index entries out of order",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Entry `i` of a table.
    pub fn entry(&self, table: Table, i: usize) -> Option<Entry> {
        let e = self.table(table).get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN)?;
        decode_entry(e)
    }

    /// Looks a key up: the fanout gives the key's bucket (about 8 entries), an interpolated
    /// guess inside the bucket lands on or next to the entry, and a short scan finishes.
    pub fn get(&self, table: Table, key: &[u8; 32]) -> Option<Location> {
        let (fan, entries, bits) = self.parts(table);
        let n = entries.len() / ENTRY_LEN;
        let b = bucket(key, bits);
        let at = |i: usize| {
            fan.get(i * 4..i * 4 + 4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
        };
        let (lo, hi) = (at(b)?.min(n), at(b + 1)?.min(n));
        if lo >= hi {
            return None;
        }
        let key_at = |i: usize| entries.get(i * ENTRY_LEN..i * ENTRY_LEN + 32);
        // The bits after the bucket's, as a fraction of the bucket.
        let rest = u64::from_be_bytes(key[..8].try_into().unwrap_or_default()) << bits;
        let mut i = lo + ((u128::from(rest) * (hi - lo) as u128) >> 64) as usize;
        match key_at(i)?.cmp(&key[..]) {
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Less => loop {
                i += 1;
                if i >= hi || key_at(i)? > &key[..] {
                    return None;
                }
                if key_at(i)? == &key[..] {
                    break;
                }
            },
            std::cmp::Ordering::Greater => loop {
                if i <= lo {
                    return None;
                }
                i -= 1;
                let k = key_at(i)?;
                if k < &key[..] {
                    return None;
                }
                if k == &key[..] {
                    break;
                }
            },
        }
        decode_entry(entries.get(i * ENTRY_LEN..(i + 1) * ENTRY_LEN)?).map(|e| e.1)
    }

    /// All entries of a table, in key order.
    pub fn iter(&self, table: Table) -> impl Iterator<Item = Entry> + '_ {
        self.table(table)
            .chunks_exact(ENTRY_LEN)
            .filter_map(decode_entry)
    }
}

fn decode_entry(e: &[u8]) -> Option<Entry> {
    let key: [u8; 32] = e.get(..32)?.try_into().ok()?;
    let u64_at = |a: usize| {
        e.get(a..a + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let u32_at = |a: usize| {
        e.get(a..a + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    Some((
        key,
        Location {
            segment: u64_at(32)?,
            offset: u64_at(40)?,
            len: u32_at(48)?,
            aux: u32_at(52)?,
        },
    ))
}

/// Merges several index files (newest last) into sorted entry lists; for a key present in
/// several, the newest location wins.
pub fn merge(files: &[&IndexFile]) -> (Vec<Entry>, Vec<Entry>) {
    let merge_table = |table: Table| {
        let mut all: Vec<(usize, Entry)> = Vec::new();
        for (age, f) in files.iter().enumerate() {
            all.extend(f.iter(table).map(|e| (age, e)));
        }
        // Sort by key, newest first within a key, then keep the first of each key.
        all.sort_unstable_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(&a.0)));
        all.dedup_by(|b, a| a.1 .0 == b.1 .0);
        all.into_iter().map(|(_, e)| e).collect::<Vec<_>>()
    };
    (merge_table(Table::Chunks), merge_table(Table::Blobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::SimStorage;

    fn entries(n: usize, seed: u8) -> Vec<Entry> {
        let mut v: Vec<Entry> = (0..n)
            .map(|i| {
                let key =
                    *blake3::hash(&[seed, (i >> 16) as u8, (i >> 8) as u8, i as u8]).as_bytes();
                (
                    key,
                    Location {
                        segment: 1,
                        offset: i as u64,
                        len: 10,
                        aux: 0,
                    },
                )
            })
            .collect();
        v.sort_by_key(|e| e.0);
        v
    }

    #[test]
    fn lookup_finds_every_key_and_no_other() {
        let s = SimStorage::new();
        let path = Path::new("/d").join(index_file_name(1, 1));
        for n in [0, 1, 2, 3, 100, 5000] {
            let chunks = entries(n, 1);
            let blobs = entries(n / 2, 2);
            write_index(&s, &path, &chunks, &blobs).expect("write");
            let f = IndexFile::open(&s, &path).expect("open");
            f.verify().expect("verify");
            for (k, loc) in &chunks {
                assert_eq!(f.get(Table::Chunks, k), Some(*loc));
                assert_eq!(f.get(Table::Blobs, k), None);
            }
            for (k, loc) in &blobs {
                assert_eq!(f.get(Table::Blobs, k), Some(*loc));
            }
            for (k, _) in entries(50, 3) {
                assert_eq!(f.get(Table::Chunks, &k), None);
            }
        }
    }

    #[test]
    fn damaged_index_is_reported() {
        let s = SimStorage::new();
        let path = Path::new("/d").join(index_file_name(1, 1));
        write_index(&s, &path, &entries(100, 1), &[]).expect("write");
        s.flip_bit(&path, 500);
        let f = IndexFile::open(&s, &path).expect("header still fine");
        assert!(f.verify().expect_err("damage").is_corruption());
        s.flip_bit(&path, 3);
        assert!(IndexFile::open(&s, &path)
            .expect_err("bad magic")
            .is_corruption());
    }
}
