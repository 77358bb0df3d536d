//! The session log (docs/format.md, "Upload sessions"): what a session has received, as the
//! pieces its bytes were cut into (their chunks are stored in segments like any other) and
//! the bytes not yet cut. Each acknowledged append adds one checkpoint record; replaying the
//! records gives the session back after a restart.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::FileHandle;
use crate::recipe::{decode_pieces, encode_pieces, Reader, RecipePiece};
use crate::segment::{self, check_file_header, file_header, record_header, RecordKind};

/// Magic of a session log file.
pub(crate) const LOG_MAGIC: [u8; 8] = *b"\x89BLUPL\r\n";

/// The file header a new session log starts with.
pub(crate) fn header() -> [u8; segment::FILE_HEADER_LEN] {
    file_header(LOG_MAGIC)
}

/// One checkpoint: the session's length after it, the pieces cut since the previous one,
/// how many bytes those pieces took from the front of the previous uncut tail, and the bytes
/// to add at the end of what is left of it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Checkpoint<'a> {
    pub len: u64,
    pub tail_drop: u32,
    pub pieces: &'a [RecipePiece],
    pub tail_append: &'a [u8],
}

impl Checkpoint<'_> {
    /// The whole record (header and payload), ready to append.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(16 + self.pieces.len() * 37 + self.tail_append.len());
        payload.extend_from_slice(&self.len.to_le_bytes());
        payload.extend_from_slice(&self.tail_drop.to_le_bytes());
        encode_pieces(self.pieces, &mut payload);
        payload.extend_from_slice(self.tail_append);
        let mut out = record_header(RecordKind::UploadCheckpoint, 0, &[&payload]).to_vec();
        out.extend_from_slice(&payload);
        out
    }
}

/// A session's state as its log says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Replayed {
    /// Bytes received (and acknowledged).
    pub len: u64,
    /// The pieces cut so far, in order.
    pub pieces: Vec<RecipePiece>,
    /// The bytes after them.
    pub tail: Vec<u8>,
    /// Where the valid records end; anything after is an append that was never
    /// acknowledged (cut off by a crash) and is overwritten by the next one.
    pub valid_end: u64,
}

/// Reads a session log. Records stop being believed at the first one that is not valid (a
/// torn last append), or that does not add up with what came before.
pub(crate) fn replay(file: &FileHandle) -> Result<Replayed> {
    let path = file.path().to_path_buf();
    let mut head = [0u8; segment::FILE_HEADER_LEN];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| Error::corrupted(&path, 0, "upload log shorter than its header"))?;
    check_file_header(&path, LOG_MAGIC, &head)?;
    let mut state = Replayed {
        valid_end: segment::FILE_HEADER_LEN as u64,
        ..Replayed::default()
    };
    let mut broken = None;
    segment::scan(file, segment::FILE_HEADER_LEN as u64, |rec| {
        if broken.is_some() {
            return Ok(());
        }
        match apply(&path, rec.offset, &rec, &mut state) {
            Ok(()) => state.valid_end = rec.offset + rec.header.record_len(),
            Err(e) => broken = Some(e),
        }
        Ok(())
    })?;
    Ok(state)
}

fn apply(
    path: &Path,
    offset: u64,
    rec: &segment::ScannedRecord,
    state: &mut Replayed,
) -> Result<()> {
    let bad = |reason: &str| Error::corrupted(path, offset, format!("upload log: {reason}"));
    if rec.header.kind != RecordKind::UploadCheckpoint {
        return Err(bad("not a checkpoint record"));
    }
    let mut r = Reader::new(&rec.payload);
    let len = r.u64().ok_or_else(|| bad("truncated length"))?;
    let tail_drop = r.u32().ok_or_else(|| bad("truncated tail drop"))? as usize;
    let (pieces, _) = decode_pieces(&mut r, &bad)?;
    let append = r.rest();
    if tail_drop > state.tail.len() {
        return Err(bad("drops more than the tail holds"));
    }
    state.tail.drain(..tail_drop);
    state.tail.extend_from_slice(append);
    state.pieces.extend(pieces);
    let total: u64 =
        state.pieces.iter().map(RecipePiece::len).sum::<u64>() + state.tail.len() as u64;
    if total != len {
        return Err(bad("pieces and tail do not add up to the session length"));
    }
    state.len = len;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::ChunkId;
    use crate::io::{OpenMode, RealStorage};

    fn chunk(n: u8, len: u32) -> RecipePiece {
        RecipePiece::Chunk {
            id: ChunkId([n; 32]),
            len,
        }
    }

    #[test]
    fn checkpoints_replay_to_pieces_and_tail_and_a_torn_last_one_is_not_believed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("s.log");
        let f = FileHandle::open(&RealStorage, &path, OpenMode::Truncate).expect("create");
        let mut at = 0u64;
        let mut put = |bytes: &[u8]| {
            f.write_all_at(bytes, at).expect("write");
            at += bytes.len() as u64;
            at
        };
        put(&header());
        // 10 uncut bytes; then a piece of 12 takes them all and 2 more, leaving 3 uncut; then
        // an inline piece takes 1 of those and 4 new bytes arrive.
        put(&Checkpoint {
            len: 10,
            tail_drop: 0,
            pieces: &[],
            tail_append: b"0123456789",
        }
        .encode());
        let good_end = put(&Checkpoint {
            len: 15,
            tail_drop: 10,
            pieces: &[chunk(1, 12)],
            tail_append: b"cde",
        }
        .encode());
        let end = put(&Checkpoint {
            len: 19,
            tail_drop: 1,
            pieces: &[RecipePiece::Inline(b"c".to_vec())],
            tail_append: b"fghi",
        }
        .encode());
        let r = replay(&f).expect("replay");
        assert_eq!(r.len, 19);
        assert_eq!(
            r.pieces,
            vec![chunk(1, 12), RecipePiece::Inline(b"c".to_vec())]
        );
        assert_eq!(r.tail, b"defghi");
        // The last append torn: the session is what the one before acknowledged.
        f.set_len(end - 3).expect("cut");
        let r = replay(&f).expect("replay");
        assert_eq!(
            (r.len, r.valid_end, r.tail.as_slice()),
            (15, good_end, &b"cde"[..])
        );
    }

    #[test]
    fn a_checkpoint_that_does_not_add_up_ends_the_valid_records() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("s.log");
        let f = FileHandle::open(&RealStorage, &path, OpenMode::Truncate).expect("create");
        let mut bytes = header().to_vec();
        bytes.extend(
            Checkpoint {
                len: 3,
                tail_drop: 0,
                pieces: &[],
                tail_append: b"abc",
            }
            .encode(),
        );
        let end = bytes.len() as u64;
        bytes.extend(
            Checkpoint {
                len: 99,
                tail_drop: 0,
                pieces: &[],
                tail_append: b"d",
            }
            .encode(),
        );
        f.write_all_at(&bytes, 0).expect("write");
        let r = replay(&f).expect("replay");
        assert_eq!((r.len, r.valid_end), (3, end));
        // A file of another kind is not a session log.
        let other = FileHandle::open(&RealStorage, &tmp.path().join("x"), OpenMode::Truncate)
            .expect("create");
        other
            .write_all_at(&file_header(*b"\x89BLSEG\r\n"), 0)
            .expect("write");
        assert!(matches!(replay(&other), Err(Error::Corrupted { .. })));
    }
}
