//! Segment files and their records (docs/format.md, "Segments" and "Records").
//!
//! A segment is an append-only file: a 16-byte file header, then records. Every record has a
//! 12-byte header (payload length, kind, flags, CRC-32 (IEEE) over header and payload).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::FileHandle;

/// Magic of segment files.
pub const SEGMENT_MAGIC: [u8; 8] = *b"\x89BLSEG\r\n";
/// Magic of catalog journal files.
pub const JOURNAL_MAGIC: [u8; 8] = *b"\x89BLJNL\r\n";
/// Format version of segment and journal files.
pub const SEGMENT_VERSION: u16 = 1;
/// Length of a file header: magic, version, reserved, CRC.
pub const FILE_HEADER_LEN: usize = 8 + 2 + 2 + 4;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 4 + 1 + 1 + 2 + 4;
/// Largest record payload accepted (a recipe of a ~100 GiB blob fits).
pub const RECORD_PAYLOAD_MAX: usize = 64 << 20;

const _: () = assert!(FILE_HEADER_LEN == 16);
const _: () = assert!(RECORD_HEADER_LEN == 12);

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A chunk: id, raw length, stored bytes.
    Chunk = 1,
    /// A committed blob's recipe.
    Recipe = 2,
    /// Everything before this record was on stable storage when it was written.
    SyncMark = 3,
    /// A batch of catalog changes (journal files only).
    CatalogBatch = 4,
    /// What an upload session received up to an acknowledged append (session logs only).
    UploadCheckpoint = 5,
    /// How far the segments were durable when the catalog batch after it was committed
    /// (catalog journals only, format 2).
    SegmentsDurable = 6,
    /// How far the catalog journal was durable when a segment sync mark was written
    /// (segments only, format 2).
    CatalogDurable = 7,
    /// An event waiting for delivery (outbox files only).
    OutboxEvent = 8,
    /// An event a consumer gave up on (the outbox's dead-letter file only).
    OutboxDead = 9,
}

impl RecordKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(RecordKind::Chunk),
            2 => Some(RecordKind::Recipe),
            3 => Some(RecordKind::SyncMark),
            4 => Some(RecordKind::CatalogBatch),
            5 => Some(RecordKind::UploadCheckpoint),
            6 => Some(RecordKind::SegmentsDurable),
            7 => Some(RecordKind::CatalogDurable),
            8 => Some(RecordKind::OutboxEvent),
            9 => Some(RecordKind::OutboxDead),
            _ => None,
        }
    }
}

/// Record flag: the chunk payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;

/// The payload of a SegmentsDurable or CatalogDurable record: a position in another file
/// kind, `(segment or journal generation, offset)`.
pub fn encode_position((file, offset): (u64, u64)) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&file.to_le_bytes());
    out[8..].copy_from_slice(&offset.to_le_bytes());
    out
}

/// Reads what [`encode_position`] wrote; `None` unless the payload is 16 bytes.
pub fn decode_position(payload: &[u8]) -> Option<(u64, u64)> {
    let p: &[u8; 16] = payload.try_into().ok()?;
    let [a, b] = [&p[..8], &p[8..]].map(|half| {
        let mut w = [0u8; 8];
        w.copy_from_slice(half);
        u64::from_le_bytes(w)
    });
    Some((a, b))
}

/// Format of new segments: 2 adds the CatalogDurable record, 3 zstd-compressed recipe records
/// (flag [`FLAG_ZSTD`]). Segments of formats 1 and 2 are read.
pub const SEGMENT_FORMAT: u16 = 3;
/// Segment formats this build reads.
pub const SEGMENT_FORMATS: [u16; 3] = [1, 2, SEGMENT_FORMAT];

/// Checks a segment's file header (either format).
pub fn check_segment_header(path: &Path, h: &[u8]) -> Result<u16> {
    check_file_header_versions(path, SEGMENT_MAGIC, h, &SEGMENT_FORMATS)
}

/// Encodes a file header (format version 1: upload logs).
pub fn file_header(magic: [u8; 8]) -> [u8; FILE_HEADER_LEN] {
    file_header_versioned(magic, SEGMENT_VERSION)
}

/// Encodes a file header of a given format version.
pub fn file_header_versioned(magic: [u8; 8], version: u16) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[..8].copy_from_slice(&magic);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a file header read from `path` (format version 1).
pub fn check_file_header(path: &Path, magic: [u8; 8], h: &[u8]) -> Result<()> {
    check_file_header_versions(path, magic, h, &[SEGMENT_VERSION]).map(drop)
}

/// Checks a file header read from `path` whose format version may be any of `versions`
/// (the newest last); returns the version found.
pub fn check_file_header_versions(
    path: &Path,
    magic: [u8; 8],
    h: &[u8],
    versions: &[u16],
) -> Result<u16> {
    if h.len() < FILE_HEADER_LEN || h[..8] != magic {
        return Err(Error::corrupted(
            path,
            0,
            "bad magic: not a file of this kind",
        ));
    }
    let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if crc32fast::hash(&h[..12]) != crc {
        return Err(Error::corrupted(path, 0, "file header checksum mismatch"));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if !versions.contains(&version) {
        return Err(Error::Version {
            file: path.to_path_buf(),
            found: version,
            supported: versions.last().copied().unwrap_or(SEGMENT_VERSION),
        });
    }
    Ok(version)
}

/// Encodes a record header for `payload` (the payload itself follows it on disk).
pub fn record_header(kind: RecordKind, flags: u8, payload: &[&[u8]]) -> [u8; RECORD_HEADER_LEN] {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    assert!(
        len <= RECORD_PAYLOAD_MAX,
        "record payload of {len} bytes exceeds the maximum"
    );
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = kind as u8;
    h[5] = flags;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..8]);
    for p in payload {
        crc.update(p);
    }
    h[8..12].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Payload length.
    pub len: u32,
    /// Record kind.
    pub kind: RecordKind,
    /// Flags ([`FLAG_ZSTD`]).
    pub flags: u8,
    /// CRC-32 over header bytes 0..8 and the payload.
    pub crc: u32,
}

impl RecordHeader {
    /// Decodes a header; `None` when it cannot be a valid header.
    pub fn decode(h: &[u8]) -> Option<Self> {
        let h: &[u8; RECORD_HEADER_LEN] = h.get(..RECORD_HEADER_LEN)?.try_into().ok()?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let kind = RecordKind::from_u8(h[4])?;
        if len as usize > RECORD_PAYLOAD_MAX || h[6] != 0 || h[7] != 0 {
            return None;
        }
        Some(RecordHeader {
            len,
            kind,
            flags: h[5],
            crc: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        })
    }

    /// True when `payload` matches this header's CRC.
    pub fn check(&self, raw_header: &[u8], payload: &[u8]) -> bool {
        let mut crc = crc32fast::Hasher::new();
        crc.update(raw_header.get(..8).unwrap_or_default());
        crc.update(payload);
        crc.finalize() == self.crc
    }

    /// Total on-disk length of the record.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.len)
    }
}

/// Decodes and checks the record at the start of `bytes` (for mapped files).
pub fn decode_record<'a>(
    path: &Path,
    offset: u64,
    bytes: &'a [u8],
) -> Result<(RecordHeader, &'a [u8])> {
    decode_record_with(path, offset, bytes, Check::Crc)
}

/// How much of a record a read checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// The record's CRC over its header and payload.
    Crc,
    /// The header's shape only: the caller checks the payload against its content hash
    /// (chunk reads with BLAKE3 verification on), which a CRC pass over the same bytes would
    /// only repeat. A damaged header or payload still fails, on the caller's check.
    Content,
}

/// [`decode_record`], checking as `check` says.
pub fn decode_record_with<'a>(
    path: &Path,
    offset: u64,
    bytes: &'a [u8],
    check: Check,
) -> Result<(RecordHeader, &'a [u8])> {
    let raw = bytes
        .get(..RECORD_HEADER_LEN)
        .ok_or_else(|| Error::corrupted(path, offset, "record header past end of file"))?;
    let header = RecordHeader::decode(raw)
        .ok_or_else(|| Error::corrupted(path, offset, "invalid record header"))?;
    let payload = bytes
        .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.len as usize)
        .ok_or_else(|| Error::corrupted(path, offset, "record payload past end of file"))?;
    if check == Check::Crc && !header.check(raw, payload) {
        return Err(Error::corrupted(path, offset, "record checksum mismatch"));
    }
    Ok((header, payload))
}

/// Reads and checks the record at `offset` of `file`.
pub fn read_record(file: &FileHandle, offset: u64) -> Result<(RecordHeader, Vec<u8>)> {
    read_record_with(file, offset, Check::Crc)
}

/// [`read_record`], checking as `check` says.
pub fn read_record_with(
    file: &FileHandle,
    offset: u64,
    check: Check,
) -> Result<(RecordHeader, Vec<u8>)> {
    let mut raw = [0u8; RECORD_HEADER_LEN];
    read_or_corrupt(file, &mut raw, offset)?;
    let header = RecordHeader::decode(&raw)
        .ok_or_else(|| Error::corrupted(file.path(), offset, "invalid record header"))?;
    let mut payload = vec![0u8; header.len as usize];
    read_or_corrupt(file, &mut payload, offset + RECORD_HEADER_LEN as u64)?;
    if check == Check::Crc && !header.check(&raw, &payload) {
        return Err(Error::corrupted(
            file.path(),
            offset,
            "record checksum mismatch",
        ));
    }
    Ok((header, payload))
}

fn read_or_corrupt(file: &FileHandle, buf: &mut [u8], offset: u64) -> Result<()> {
    match file.read_exact_at(buf, offset) {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof => Err(
            Error::corrupted(file.path(), offset, "record extends past end of file"),
        ),
        other => other,
    }
}

/// How a scan of a file's records ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid record.
    Clean,
    /// From `offset` on, the bytes are not a valid record (torn write or damage).
    Invalid { offset: u64, reason: &'static str },
}

/// One record found by [`scan`].
pub struct ScannedRecord {
    /// Offset of the record header in the file.
    pub offset: u64,
    /// The decoded header.
    pub header: RecordHeader,
    /// The payload (checked against its CRC, or see `crc_ok`).
    pub payload: Vec<u8>,
    /// False for a chunk record found by [`scan_salvaging`] whose CRC fails but whose
    /// chunk verifies against its BLAKE3 id: only its checksum field is damaged.
    pub crc_ok: bool,
}

/// Reads the records of `file` from `start` to its end, calling `visit` for each valid one,
/// and reports where and why the valid sequence stopped.
pub fn scan(
    file: &FileHandle,
    start: u64,
    mut visit: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, ScanEnd)> {
    let len = file.len()?;
    let mut offset = start;
    let mut raw = [0u8; RECORD_HEADER_LEN];
    while offset < len {
        if len - offset < RECORD_HEADER_LEN as u64 {
            return Ok((
                offset,
                ScanEnd::Invalid {
                    offset,
                    reason: "partial record header",
                },
            ));
        }
        file.read_exact_at(&mut raw, offset)?;
        let Some(header) = RecordHeader::decode(&raw) else {
            return Ok((
                offset,
                ScanEnd::Invalid {
                    offset,
                    reason: "invalid record header",
                },
            ));
        };
        if offset + header.record_len() > len {
            return Ok((
                offset,
                ScanEnd::Invalid {
                    offset,
                    reason: "record extends past end of file",
                },
            ));
        }
        let mut payload = vec![0u8; header.len as usize];
        file.read_exact_at(&mut payload, offset + RECORD_HEADER_LEN as u64)?;
        if !header.check(&raw, &payload) {
            return Ok((
                offset,
                ScanEnd::Invalid {
                    offset,
                    reason: "record checksum mismatch",
                },
            ));
        }
        let next = offset + header.record_len();
        visit(ScannedRecord {
            offset,
            header,
            payload,
            crc_ok: true,
        })?;
        offset = next;
    }
    Ok((offset, ScanEnd::Clean))
}

/// Decides what an invalid record found by [`scan`] means, and acts on it. Everything before
/// the last sync mark (`durable_end`) was acknowledged; so was everything before any valid
/// sync mark found after the damage. In the file being appended to (`is_last`), damage after
/// both is a torn tail from a crash: the file is cut back to the last valid record. Anything
/// else is corruption, reported and never dropped.
/// A damaged stretch of a segment found by [`scan_salvaging`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where the invalid record starts.
    pub offset: u64,
    /// Where the next valid record starts (or the file's end).
    pub resumed_at: u64,
    /// What was wrong.
    pub reason: &'static str,
}

/// Scans like [`scan`], but after an invalid record looks for the next valid one (a header
/// whose CRC matches its payload: a false match in damaged bytes is practically impossible)
/// and goes on from there, so the records after a damaged one are not lost. For `fsck`, and
/// for rebuilding the indexes of a damaged sealed segment (`fsck --repair`).
pub fn scan_salvaging(
    file: &FileHandle,
    start: u64,
    mut visit: impl FnMut(ScannedRecord) -> Result<()>,
) -> Result<(u64, Vec<Damage>)> {
    let len = file.len()?;
    let mut offset = start;
    let mut damage = Vec::new();
    loop {
        let (end, how) = scan(file, offset, &mut visit)?;
        let ScanEnd::Invalid {
            offset: bad,
            reason,
        } = how
        else {
            return Ok((end, damage));
        };
        if let Some(rec) = sound_chunk_with_bad_crc(file, bad)? {
            // Not damage: the chunk is whole, only its checksum field is not.
            offset = bad + rec.header.record_len();
            visit(rec)?;
            continue;
        }
        let resumed_at = find_record_after(file, bad)?.unwrap_or(len);
        damage.push(Damage {
            offset: bad,
            resumed_at,
            reason,
        });
        if resumed_at >= len {
            return Ok((len, damage));
        }
        offset = resumed_at;
    }
}

/// The chunk record at `offset` when its CRC fails but its header is sound and its chunk
/// verifies against its BLAKE3 id (so only the checksum field can be damaged).
fn sound_chunk_with_bad_crc(file: &FileHandle, offset: u64) -> Result<Option<ScannedRecord>> {
    let Ok((header, payload)) = read_record_with(file, offset, Check::Content) else {
        return Ok(None);
    };
    if header.kind != RecordKind::Chunk {
        return Ok(None);
    }
    let whole = ChunkPayload::decode(&payload)
        .and_then(|c| Some(crate::ChunkId::of(&c.bytes(header.flags).ok()?) == c.id))
        .unwrap_or(false);
    Ok(whole.then_some(ScannedRecord {
        offset,
        header,
        payload,
        crc_ok: false,
    }))
}

/// Rewrites the CRC of the record at `offset` when its payload is sound (an offline repair
/// of a damaged checksum field found by [`scan_salvaging`]); returns whether it did.
pub fn rewrite_crc(file: &FileHandle, offset: u64) -> Result<bool> {
    let Some(rec) = sound_chunk_with_bad_crc(file, offset)? else {
        return Ok(false);
    };
    let header = record_header(rec.header.kind, rec.header.flags, &[&rec.payload]);
    file.write_all_at(&header[8..12], offset + 8)?;
    file.sync()?;
    Ok(true)
}

/// The offset of the first valid record after `from`, if any.
fn find_record_after(file: &FileHandle, from: u64) -> Result<Option<u64>> {
    let len = file.len()?;
    let n = usize::try_from(len.saturating_sub(from))
        .map_err(|_| Error::LimitExceeded("file too large".into()))?;
    let mut bytes = vec![0u8; n];
    file.read_exact_at(&mut bytes, from)?;
    for i in 1..bytes.len().saturating_sub(RECORD_HEADER_LEN - 1) {
        // Cheap rejections first: most positions do not even decode as a header.
        if RecordHeader::decode(&bytes[i..i + RECORD_HEADER_LEN]).is_none() {
            continue;
        }
        if decode_record(file.path(), from + i as u64, &bytes[i..]).is_ok() {
            return Ok(Some(from + i as u64));
        }
    }
    Ok(None)
}

pub fn settle_tail(
    file: &FileHandle,
    how: &ScanEnd,
    durable_end: u64,
    is_last: bool,
) -> Result<()> {
    let ScanEnd::Invalid { offset, reason } = *how else {
        return Ok(());
    };
    let later_mark = find_sync_mark_after(file, offset)?;
    if !is_last || later_mark.is_some() || offset < durable_end {
        return Err(Error::corrupted(
            file.path(),
            offset,
            format!("{reason} in acknowledged data"),
        ));
    }
    file.set_len(offset)?;
    file.sync()
}

/// Looks for a valid sync mark anywhere after `from` (a mark carries its own offset, so a
/// false match in garbage is practically impossible).
fn find_sync_mark_after(file: &FileHandle, from: u64) -> Result<Option<u64>> {
    let len = file.len()?;
    let n = usize::try_from(len.saturating_sub(from))
        .map_err(|_| Error::LimitExceeded("file too large".into()))?;
    let mut bytes = vec![0u8; n];
    file.read_exact_at(&mut bytes, from)?;
    let rec = RECORD_HEADER_LEN + 8;
    for i in 1..bytes.len().saturating_sub(rec - 1) {
        if bytes[i + 4] != RecordKind::SyncMark as u8 || bytes[i..i + 4] != 8u32.to_le_bytes() {
            continue;
        }
        let at = from + i as u64;
        if let Ok((_, payload)) = decode_record(file.path(), at, &bytes[i..i + rec]) {
            if payload == at.to_le_bytes() {
                return Ok(Some(at));
            }
        }
    }
    Ok(None)
}

/// The file name of segment `id`: 20 zero-padded digits, so names sort numerically.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// Parses a segment file name back to its id.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 {
        return None;
    }
    digits.parse().ok()
}

/// The path of segment `id` under `dir`.
pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(segment_file_name(id))
}

/// Encodes a chunk record payload's fixed prefix: id and raw length.
pub fn chunk_prefix(id: &crate::ChunkId, raw_len: u32) -> [u8; 36] {
    let mut p = [0u8; 36];
    p[..32].copy_from_slice(&id.0);
    p[32..].copy_from_slice(&raw_len.to_le_bytes());
    p
}

/// Length of the chunk payload prefix.
pub const CHUNK_PREFIX_LEN: usize = 36;

/// A chunk record's payload, decoded (the one decoder of what [`chunk_prefix`] encodes; the
/// read path, recovery, fsck and inspect all use it): the chunk's id, its raw length, and
/// the body as stored (zstd-compressed when the record's flags say so).
#[derive(Debug)]
pub struct ChunkPayload<'a> {
    /// The chunk's BLAKE3 id, as recorded.
    pub id: crate::ChunkId,
    /// Its length uncompressed.
    pub raw_len: u32,
    /// The stored body.
    pub body: &'a [u8],
}

impl<'a> ChunkPayload<'a> {
    /// Splits a chunk record's payload; `None` when it is shorter than the prefix.
    pub fn decode(payload: &'a [u8]) -> Option<ChunkPayload<'a>> {
        let id: [u8; 32] = payload.get(..32)?.try_into().ok()?;
        let raw_len = u32::from_le_bytes(payload.get(32..CHUNK_PREFIX_LEN)?.try_into().ok()?);
        Some(ChunkPayload {
            id: crate::ChunkId(id),
            raw_len,
            body: &payload[CHUNK_PREFIX_LEN..],
        })
    }

    /// The chunk's bytes: the body, decompressed when `flags` has [`FLAG_ZSTD`], and of the
    /// recorded raw length (borrowed when stored raw). The error says what is wrong.
    pub fn bytes(&self, flags: u8) -> std::result::Result<std::borrow::Cow<'a, [u8]>, String> {
        let raw_len = self.raw_len as usize;
        let data = if flags & FLAG_ZSTD != 0 {
            std::borrow::Cow::Owned(
                zstd::bulk::decompress(self.body, raw_len).map_err(|e| format!("zstd: {e}"))?,
            )
        } else {
            std::borrow::Cow::Borrowed(self.body)
        };
        if data.len() != raw_len {
            return Err("chunk length differs from its header".into());
        }
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn chunk_payloads_decode_what_chunk_prefix_encodes() {
        let data = vec![7u8; 5000];
        let id = crate::ChunkId::of(&data);
        let raw = [&chunk_prefix(&id, 5000)[..], &data].concat();
        let c = ChunkPayload::decode(&raw).expect("decode");
        assert_eq!((c.id, c.raw_len), (id, 5000));
        assert_eq!(c.bytes(0).expect("raw"), &data[..]);
        let z = zstd::bulk::compress(&data, 1).expect("zstd");
        let packed = [&chunk_prefix(&id, 5000)[..], &z].concat();
        let c = ChunkPayload::decode(&packed).expect("decode");
        assert_eq!(c.bytes(FLAG_ZSTD).expect("zstd"), &data[..]);
        assert!(
            c.bytes(0).is_err(),
            "the stored length is not the raw length"
        );
        assert!(ChunkPayload::decode(&raw[..35]).is_none());
    }

    proptest! {
        #[test]
        fn record_roundtrip(payload in proptest::collection::vec(any::<u8>(), 0..2000), flags in 0u8..2) {
            let h = record_header(RecordKind::Chunk, flags, &[&payload]);
            let mut bytes = h.to_vec();
            bytes.extend_from_slice(&payload);
            let (hdr, p) = decode_record(Path::new("x"), 0, &bytes).expect("valid record");
            prop_assert_eq!(hdr.flags, flags);
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn flipped_bit_is_detected(payload in proptest::collection::vec(any::<u8>(), 1..500), bit in 0usize..4000) {
            let h = record_header(RecordKind::Recipe, 0, &[&payload]);
            let mut bytes = h.to_vec();
            bytes.extend_from_slice(&payload);
            let i = (bit / 8) % bytes.len();
            bytes[i] ^= 1 << (bit % 8);
            prop_assert!(decode_record(Path::new("x"), 0, &bytes).is_err());
        }
    }

    #[test]
    fn names_sort_numerically() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
    }
}
