//! zstd streams: where frames (and skippable frames) begin and end, read from their headers
//! alone (frame and block headers are self-describing: nothing is decompressed). A
//! zstd:chunked layer compresses each file as a frame of its own, so cutting at frame ends
//! makes an unchanged file an unchanged chunk.

/// A structural point of a zstd stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Point {
    /// A frame (or skippable frame) starts.
    Frame,
    /// A block header; `checksum`: the frame ends with a 4-byte checksum.
    Block { checksum: bool },
    /// A frame's checksum.
    Checksum,
}

/// Where the next structural point of a zstd stream is, from the chunker's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Walker {
    pub(super) to_point: u64,
    pub(super) point: Point,
}

/// The zstd frame magic number, little-endian.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames' magic numbers are these with any low nibble.
const ZSTD_SKIPPABLE: u32 = 0x184D_2A50;
/// Bytes after a point that are enough to read its header (a frame header is at most 18).
pub(super) const ZSTD_LOOKAHEAD: usize = 32;
/// The largest block a zstd frame may hold.
const ZSTD_BLOCK_MAX: u64 = 128 * 1024;

fn le32(b: &[u8]) -> Option<u32> {
    b.get(..4)?.try_into().ok().map(u32::from_le_bytes)
}

/// True when `b` starts with a zstd frame (or skippable frame) magic number.
pub fn starts_zstd(b: &[u8]) -> bool {
    le32(b).is_some_and(|m| m == ZSTD_MAGIC || m & 0xFFFF_FFF0 == ZSTD_SKIPPABLE)
}

/// The length of what starts at a point, and the point after it; `None` for bytes that are
/// not what the point says (a crafted or damaged stream).
fn step(point: Point, b: &[u8]) -> Option<(u64, Point)> {
    match point {
        Point::Frame => {
            let magic = le32(b)?;
            if magic & 0xFFFF_FFF0 == ZSTD_SKIPPABLE {
                return Some((8 + u64::from(le32(b.get(4..)?)?), Point::Frame));
            }
            if magic != ZSTD_MAGIC {
                return None;
            }
            let fhd = *b.get(4)?;
            if fhd & 0x08 != 0 {
                return None; // reserved bit
            }
            let single = fhd & 0x20 != 0;
            let fcs = match fhd >> 6 {
                0 => usize::from(single),
                1 => 2,
                2 => 4,
                _ => 8,
            };
            let did = [0, 1, 2, 4][usize::from(fhd & 3)];
            let len = 5 + usize::from(!single) + did + fcs;
            Some((
                len as u64,
                Point::Block {
                    checksum: fhd & 0x04 != 0,
                },
            ))
        }
        Point::Block { checksum } => {
            let h =
                u32::from(*b.first()?) | u32::from(*b.get(1)?) << 8 | u32::from(*b.get(2)?) << 16;
            let (last, kind, size) = (h & 1 != 0, (h >> 1) & 3, u64::from(h >> 3));
            let content = match kind {
                0 | 2 if size <= ZSTD_BLOCK_MAX => size,
                1 => 1, // RLE: one byte repeated `size` times
                _ => return None,
            };
            let next = match (last, checksum) {
                (false, _) => Point::Block { checksum },
                (true, true) => Point::Checksum,
                (true, false) => Point::Frame,
            };
            Some((3 + content, next))
        }
        Point::Checksum => Some((4, Point::Frame)),
    }
}

/// Walks the points of `bytes` from `w` up to `limit`: the walker at the first point at or
/// after `limit`, and where the first frame after the start begins (the end of the frame the
/// position is in), if before `limit`. `None`: the stream is not zstd from here on.
pub(super) fn walk(mut w: Walker, bytes: &[u8], limit: usize) -> Option<(Walker, Option<usize>)> {
    let mut at: u64 = 0;
    let mut frame_end = None;
    loop {
        let p = at + w.to_point;
        if p >= limit as u64 {
            return Some((
                Walker {
                    to_point: p - limit as u64,
                    point: w.point,
                },
                frame_end,
            ));
        }
        let p = p as usize;
        if w.point == Point::Frame && p > 0 && frame_end.is_none() {
            frame_end = Some(p);
        }
        let (len, next) = step(w.point, bytes.get(p..)?)?;
        at = p as u64;
        w = Walker {
            to_point: len,
            point: next,
        };
    }
}
