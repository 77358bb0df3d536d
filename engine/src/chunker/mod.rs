//! Content-defined chunking: FastCDC-style gear hash with normalized chunking, tar-aware
//! splitting that cuts at tar member boundaries, and zstd-aware splitting that cuts at frame
//! boundaries (zstd:chunked layers compress each file as a frame of its own, so an unchanged
//! file is an identical frame: docs/design.md, "Chunking").
//!
//! Chunk boundaries are part of the on-disk format: changing the gear table, the sizes or the
//! masks changes which chunks a blob produces and so breaks dedup with what is stored. The
//! golden tests below pin them.

/// Smallest chunk the CDC cuts (the last chunk of a region may be shorter).
pub const CHUNK_LEN_MIN: usize = 16 * 1024;
/// Target average chunk length.
pub const CHUNK_LEN_AVG: usize = 64 * 1024;
/// Largest chunk.
pub const CHUNK_LEN_MAX: usize = 256 * 1024;
/// Tar blocks and headers are this long.
pub const TAR_BLOCK: usize = 512;

mod gzip;
mod zstd;

pub use self::zstd::starts_zstd;
use self::zstd::{walk, Point, Walker, ZSTD_LOOKAHEAD};

const AVG_BITS: u32 = CHUNK_LEN_AVG.trailing_zeros();
// Normalized chunking, level 2: a harder mask before the average, an easier one after.
const MASK_HARD: u64 = !(u64::MAX >> (AVG_BITS + 2));
const MASK_EASY: u64 = !(u64::MAX >> (AVG_BITS - 2));

const _: () = assert!(CHUNK_LEN_AVG.is_power_of_two());
const _: () = assert!(CHUNK_LEN_MIN < CHUNK_LEN_AVG && CHUNK_LEN_AVG < CHUNK_LEN_MAX);

/// The gear table: 256 pseudo-random words from SplitMix64 seeded with a fixed constant.
const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x6261_6c6c_6173_7421; // "ballast!"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};

/// `GEAR[b] << 1`, for the two-bytes-per-step loop.
const GEAR_LS: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = GEAR[i] << 1;
        i += 1;
    }
    table
};

/// Length of the first chunk of `data` (all of `data` when it is at most `CHUNK_LEN_MIN`).
/// The caller passes at least `CHUNK_LEN_MAX` bytes unless `data` is the end of its region.
pub fn cut(data: &[u8]) -> usize {
    let n = data.len();
    if n <= CHUNK_LEN_MIN {
        return n;
    }
    let normal = n.min(CHUNK_LEN_AVG);
    let end = n.min(CHUNK_LEN_MAX);
    let (h, i) = scan(data, 0, CHUNK_LEN_MIN, normal, MASK_HARD);
    if i < normal {
        return i;
    }
    let (_, i) = scan(data, h, normal, end, MASK_EASY);
    i
}

/// Rolls the gear hash over `data[from..to]`; returns the state and the cut position (the
/// index after the byte whose hash matched `mask`), or `to` when none matched.
///
/// Two bytes per step: `h` advances as `(h << 2) + (GEAR[a] << 1 + GEAR[b])`, which equals two
/// single-byte steps; the sum in parentheses does not depend on `h`, so the dependency chain
/// is one shift and one add per two bytes. The hash after the first byte is computed beside
/// it, only to be tested. Eight bytes per loop iteration: the loop's own bookkeeping was a
/// third of the instructions at two bytes per iteration.
#[inline(always)]
fn scan(data: &[u8], mut h: u64, from: usize, to: usize, mask: u64) -> (u64, usize) {
    let Some(window) = data.get(from..to) else {
        return (h, to);
    };
    let mut i = from;
    let mut blocks = window.chunks_exact(8);
    for block in &mut blocks {
        let pairs: [u64; 4] = std::array::from_fn(|k| {
            GEAR_LS[usize::from(block[2 * k])].wrapping_add(GEAR[usize::from(block[2 * k + 1])])
        });
        for k in (0..8).step_by(2) {
            let first = (h << 1).wrapping_add(GEAR[usize::from(block[k])]);
            h = (h << 2).wrapping_add(pairs[k / 2]);
            if first & mask == 0 {
                return (first, i + k + 1);
            }
            if h & mask == 0 {
                return (h, i + k + 2);
            }
        }
        i += 8;
    }
    for &byte in blocks.remainder() {
        h = (h << 1).wrapping_add(GEAR[usize::from(byte)]);
        i += 1;
        if h & mask == 0 {
            return (h, i);
        }
    }
    (h, to)
}

/// How a blob is split.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Tar-aware when the first 512 bytes are a valid tar header, plain CDC otherwise.
    #[default]
    Auto,
    /// Plain CDC over the whole stream.
    Plain,
}

/// A piece of a blob, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Bytes kept inline in the recipe (tar headers).
    Inline(&'a [u8]),
    /// Bytes stored as a deduplicated chunk.
    Chunk(&'a [u8]),
}

#[derive(Debug)]
enum State {
    Detect,
    TarHeader,
    TarData {
        remaining: u64,
    },
    Plain,
    /// A stream of zstd frames: where the next structural point is.
    Zstd(Walker),
    /// A stream of gzip members: the scan that finds where they end.
    Gzip(Box<gzip::Scan>),
}

/// Splits a byte stream that arrives in arbitrary pieces into the same pieces whatever the
/// arrival pattern: cuts are only decided once enough bytes are buffered.
pub struct StreamChunker {
    buf: Vec<u8>,
    start: usize,
    state: State,
}

impl StreamChunker {
    /// A chunker for a new stream.
    pub fn new(mode: Mode) -> Self {
        let state = match mode {
            Mode::Auto => State::Detect,
            Mode::Plain => State::Plain,
        };
        StreamChunker {
            buf: Vec::with_capacity(2 * CHUNK_LEN_MAX),
            start: 0,
            state,
        }
    }

    /// Adds bytes, emitting every piece that is now decided. Bytes are copied only around
    /// the pieces that straddle two calls; the rest is cut in place.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(Piece<'_>)) {
        if self.start < self.buf.len() {
            // Finish the pending tail with enough new bytes for its next cut. Only pieces that
            // start in the pending bytes are cut from the buffer; from the first piece that
            // starts in `data`, cutting goes on in place (those pieces are not copied).
            let pending = self.buf.len() - self.start;
            let take = data.len().min(CHUNK_LEN_MAX + TAR_BLOCK);
            self.buf.extend_from_slice(&data[..take]);
            let cut = cut_all(
                &mut self.state,
                &self.buf[self.start..],
                false,
                pending,
                emit,
            );
            self.start += cut;
            if cut >= pending {
                // The next piece starts in the new bytes: cut them in place.
                self.buf.clear();
                self.start = 0;
                data = &data[cut - pending..];
            } else {
                data = &data[take..];
                if !data.is_empty() {
                    // The tail still needs more than `take` bytes (never more than a chunk).
                    return self.push(data, emit);
                }
                return;
            }
        }
        let at = cut_all(&mut self.state, data, false, usize::MAX, emit);
        self.buf.drain(..self.start);
        self.start = 0;
        self.buf.extend_from_slice(&data[at..]);
    }

    /// Bytes pushed but not yet emitted (at most a chunk and a tar block): with the pieces
    /// emitted so far they are the whole stream, and pushing them into a new chunker after
    /// those pieces puts it in this one's state (an upload session resumes that way).
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Emits everything still buffered.
    pub fn finish(&mut self, emit: &mut impl FnMut(Piece<'_>)) {
        let consumed = cut_all(
            &mut self.state,
            &self.buf[self.start..],
            true,
            usize::MAX,
            emit,
        );
        debug_assert_eq!(self.start + consumed, self.buf.len());
        self.buf.clear();
        self.start = 0;
    }
}

/// Emits the pieces of `bytes` that can be decided now and start before `limit`; returns how
/// many bytes they cover.
fn cut_all(
    state: &mut State,
    bytes: &[u8],
    at_end: bool,
    limit: usize,
    emit: &mut impl FnMut(Piece<'_>),
) -> usize {
    let mut at = 0;
    while at < limit {
        let Some((inline, n)) = next_cut(state, &bytes[at..], at_end) else {
            break;
        };
        let piece = &bytes[at..at + n];
        emit(if inline {
            Piece::Inline(piece)
        } else {
            Piece::Chunk(piece)
        });
        at += n;
    }
    at
}

/// Decides the next piece at the start of `avail`: `(inline, length)`, or `None` when more
/// bytes are needed (or, at the end, when nothing is left).
fn next_cut(state: &mut State, avail: &[u8], at_end: bool) -> Option<(bool, usize)> {
    loop {
        if avail.is_empty() {
            return None;
        }
        match state {
            State::Detect if gzip::starts_gzip(avail) => {
                *state = State::Gzip(Box::new(gzip::Scan::new()));
            }
            State::Detect if starts_zstd(avail) => {
                *state = State::Zstd(Walker {
                    to_point: 0,
                    point: Point::Frame,
                });
            }
            State::Detect | State::TarHeader => {
                if avail.len() < TAR_BLOCK && !at_end {
                    return None;
                }
                match avail.get(..TAR_BLOCK).and_then(tar_member_data_len) {
                    Some(data_len) => {
                        let padded = data_len.div_ceil(TAR_BLOCK as u64) * TAR_BLOCK as u64;
                        *state = if padded == 0 {
                            State::TarHeader
                        } else {
                            State::TarData { remaining: padded }
                        };
                        return Some((true, TAR_BLOCK));
                    }
                    None => *state = State::Plain,
                }
            }
            State::TarData { remaining } => {
                let remaining = *remaining;
                let region = usize::try_from(remaining).unwrap_or(usize::MAX);
                if avail.len() < region.min(CHUNK_LEN_MAX) && !at_end {
                    return None;
                }
                let n = cut(&avail[..avail.len().min(region)]);
                let left = remaining - n as u64;
                *state = if left == 0 {
                    State::TarHeader
                } else {
                    State::TarData { remaining: left }
                };
                return Some((false, n));
            }
            State::Plain => {
                if avail.len() < CHUNK_LEN_MAX && !at_end {
                    return None;
                }
                return Some((false, cut(avail)));
            }
            State::Zstd(w) => {
                let w = *w;
                if avail.len() < CHUNK_LEN_MAX + ZSTD_LOOKAHEAD && !at_end {
                    return None;
                }
                // Decided on at most a chunk's bytes: the cuts do not depend on how the
                // stream arrives.
                let window = avail.len().min(CHUNK_LEN_MAX);
                let Some((_, frame_end)) = walk(w, avail, window) else {
                    *state = State::Plain;
                    continue;
                };
                let n = cut(&avail[..frame_end.unwrap_or(window)]);
                match walk(w, avail, n) {
                    Some((after, _)) => *state = State::Zstd(after),
                    None => *state = State::Plain,
                }
                return Some((false, n));
            }
            State::Gzip(scan) => {
                scan.feed(avail);
                if scan.exhausted() {
                    *state = State::Plain;
                    continue;
                }
                if avail.len() < CHUNK_LEN_MAX && !at_end {
                    return None;
                }
                // Decided on at most a chunk's bytes, all of them scanned: the cuts do not
                // depend on how the stream arrives.
                let window = avail.len().min(CHUNK_LEN_MAX);
                if !scan.ahead_by(window) && !at_end {
                    return None;
                }
                let end = scan
                    .next_end()
                    .and_then(|e| usize::try_from(e).ok())
                    .filter(|e| *e <= window);
                let n = cut(&avail[..end.unwrap_or(window)]);
                scan.cut_at += n as u64;
                return Some((false, n));
            }
        }
    }
}

/// When `block` is a valid tar header (POSIX ustar, GNU or v7, checked by its checksum),
/// the length of the member data that follows it (before padding to 512 bytes).
pub fn tar_member_data_len(block: &[u8]) -> Option<u64> {
    let block: &[u8; TAR_BLOCK] = block.try_into().ok()?;
    if block.iter().all(|&b| b == 0) {
        return None;
    }
    let stored = parse_octal(&block[148..156])?;
    let sum: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if stored != sum {
        return None;
    }
    let size_field = &block[124..136];
    let size = if size_field[0] & 0x80 != 0 {
        // GNU base-256: big-endian binary in the remaining bytes.
        size_field[1..]
            .iter()
            .try_fold(u64::from(size_field[0] & 0x7f), |acc, &b| {
                acc.checked_mul(256).map(|v| v | u64::from(b))
            })?
    } else {
        parse_octal(size_field)?
    };
    // Hard and symbolic links, devices, directories and FIFOs carry no data even when a
    // writer fills in a size.
    match block[156] {
        b'1' | b'2' | b'3' | b'4' | b'5' | b'6' => Some(0),
        _ => Some(size),
    }
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = field.iter().skip_while(|&&b| b == b' ' || b == 0);
    let mut value: u64 = 0;
    let mut seen = false;
    for &b in s {
        match b {
            b'0'..=b'7' => {
                value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
                seen = true;
            }
            b' ' | 0 => break,
            _ => return None,
        }
    }
    seen.then_some(value)
}

#[cfg(test)]
pub(crate) mod tests;
