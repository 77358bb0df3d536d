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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Detect,
    TarHeader,
    TarData {
        remaining: u64,
    },
    Plain,
    /// A stream of zstd frames: where the next structural point is.
    Zstd(Walker),
}

/// A structural point of a zstd stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    /// A frame (or skippable frame) starts.
    Frame,
    /// A block header; `checksum`: the frame ends with a 4-byte checksum.
    Block { checksum: bool },
    /// A frame's checksum.
    Checksum,
}

/// Where the next structural point of a zstd stream is, from the chunker's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Walker {
    to_point: u64,
    point: Point,
}

/// The zstd frame magic number, little-endian.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;
/// Skippable frames' magic numbers are these with any low nibble.
const ZSTD_SKIPPABLE: u32 = 0x184D_2A50;
/// Bytes after a point that are enough to read its header (a frame header is at most 18).
const ZSTD_LOOKAHEAD: usize = 32;
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
fn walk(mut w: Walker, bytes: &[u8], limit: usize) -> Option<(Walker, Option<usize>)> {
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
        match *state {
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
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pieces(data: &[u8], mode: Mode, step: usize) -> Vec<(bool, usize)> {
        let mut out = Vec::new();
        let mut c = StreamChunker::new(mode);
        let mut emit = |p: Piece<'_>| match p {
            Piece::Inline(b) => out.push((true, b.len())),
            Piece::Chunk(b) => out.push((false, b.len())),
        };
        for part in data.chunks(step.max(1)) {
            c.push(part, &mut emit);
        }
        c.finish(&mut emit);
        out
    }

    pub(crate) fn seeded(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::testdata::XorShift::new(seed);
        (0..len).map(|_| (rng.next() >> 32) as u8).collect()
    }

    /// The definition `scan` unrolls: one byte per step, tested after every byte.
    fn cut_bytewise(data: &[u8]) -> usize {
        let n = data.len();
        if n <= CHUNK_LEN_MIN {
            return n;
        }
        let (normal, end) = (n.min(CHUNK_LEN_AVG), n.min(CHUNK_LEN_MAX));
        let mut h = 0u64;
        for (i, &b) in data.iter().enumerate().take(end).skip(CHUNK_LEN_MIN) {
            h = (h << 1).wrapping_add(GEAR[usize::from(b)]);
            let mask = if i < normal { MASK_HARD } else { MASK_EASY };
            if h & mask == 0 {
                return i + 1;
            }
        }
        end
    }

    #[test]
    fn unrolled_scan_finds_cuts_in_the_last_bytes_of_a_region() {
        // A region that ends just past a cut puts that cut in the scan's leftover bytes (the
        // region is rarely a multiple of the unrolled block).
        for seed in 1..40 {
            let data = seeded(300_000, seed);
            let p = cut_bytewise(&data);
            for len in p.saturating_sub(9)..=p + 9 {
                let region = &data[..len.min(data.len())];
                assert_eq!(cut(region), cut_bytewise(region), "seed {seed}, len {len}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn unrolled_scan_cuts_where_the_bytewise_definition_does(len in 0usize..600_000, seed in 1u64..u64::MAX, skip in 0usize..64) {
            // Every cut position modulo the unrolled block, and every region length, shows up
            // across cases: `skip` shifts where the blocks fall.
            let data = seeded(len, seed);
            let data = data.get(skip..).unwrap_or_default();
            let mut at = 0;
            while at < data.len() {
                let n = cut(&data[at..]);
                prop_assert_eq!(n, cut_bytewise(&data[at..]), "at {}", at);
                at += n;
            }
        }

        #[test]
        fn tar_cuts_do_not_depend_on_how_the_stream_arrives(sizes in proptest::collection::vec(0usize..400_000, 1..6), seed in 1u64..u64::MAX, step in 1usize..300_000) {
            let files: Vec<(String, Vec<u8>)> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (format!("f{i}"), seeded(n, seed.wrapping_add(i as u64))))
                .collect();
            let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
            let tar = test_tar(&refs);
            let ps = pieces(&tar, Mode::Auto, step);
            prop_assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), tar.len());
            prop_assert_eq!(ps, pieces(&tar, Mode::Auto, tar.len()));
        }

        #[test]
        fn lengths_sum_and_bounds_hold(len in 0usize..1_500_000, seed in 1u64..u64::MAX, step in 1usize..300_000) {
            let data = seeded(len, seed);
            let ps = pieces(&data, Mode::Plain, step);
            prop_assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), len);
            let n = ps.len();
            for (i, p) in ps.iter().enumerate() {
                prop_assert!(p.1 <= CHUNK_LEN_MAX);
                if i + 1 < n { prop_assert!(p.1 >= CHUNK_LEN_MIN); }
            }
            // The arrival pattern never changes the cuts.
            prop_assert_eq!(ps, pieces(&data, Mode::Plain, len.max(1)));
        }
    }

    fn fnv(parts: &[(bool, usize)]) -> u64 {
        parts
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &(inline, len)| {
                (h ^ (len as u64) ^ (u64::from(inline) << 40)).wrapping_mul(0x100_0000_01b3)
            })
    }

    #[test]
    fn golden_plain_boundaries() {
        let data = seeded(8 << 20, 42);
        let ps = pieces(&data, Mode::Plain, 100_000);
        let mut first = [0usize; 6];
        for (f, p) in first.iter_mut().zip(&ps) {
            *f = p.1;
        }
        // A change here changes the on-disk format: it breaks dedup with stored data.
        assert_eq!(
            (ps.len(), first, fnv(&ps)),
            GOLDEN_PLAIN,
            "plain CDC boundaries changed"
        );
    }

    #[test]
    fn golden_tar_boundaries() {
        let tar = test_tar(&[
            ("a.txt", seeded(1000, 1)),
            ("big.bin", seeded(700_000, 2)),
            ("e", vec![]),
        ]);
        let ps = pieces(&tar, Mode::Auto, 4096);
        assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), tar.len());
        assert_eq!(
            (ps.len(), fnv(&ps)),
            GOLDEN_TAR,
            "tar-aware boundaries changed"
        );
        // Headers are inline, data is chunked on its own.
        assert_eq!(ps[0], (true, 512));
        assert_eq!(ps[1], (false, 1024));
        assert_eq!(ps[2], (true, 512));
    }

    const GOLDEN_PLAIN: (usize, [usize; 6], u64) = (
        111,
        [91287, 80897, 77237, 75060, 77321, 73445],
        3_148_804_307_456_896_757,
    );
    const GOLDEN_TAR: (usize, u64) = (15, 5_699_772_631_502_147_997);

    /// A minimal ustar archive for tests.
    pub(crate) fn test_tar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        crate::testdata::tar(files, 0)
    }

    use crate::testdata::tar_header;

    #[test]
    fn tar_header_parsing() {
        let h = tar_header("x", 12345, 7);
        assert_eq!(tar_member_data_len(&h), Some(12345));
        let mut bad = h;
        bad[0] ^= 1;
        assert_eq!(tar_member_data_len(&bad), None);
        assert_eq!(tar_member_data_len(&[0u8; 512]), None);
    }

    /// A zstd:chunked-style stream: each file a frame of its own (some stored raw, some
    /// large enough for several blocks), and a skippable frame at the end; the frame
    /// boundaries.
    fn zstd_stream(files: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut ends = Vec::new();
        for f in files {
            out.extend(zstd::bulk::compress(f, 3).expect("compress"));
            ends.push(out.len());
        }
        // A skippable frame (zstd:chunked keeps its table of contents in one).
        out.extend_from_slice(&0x184D_2A5Eu32.to_le_bytes());
        out.extend_from_slice(&5u32.to_le_bytes());
        out.extend_from_slice(b"index");
        ends.push(out.len());
        (out, ends)
    }

    fn files(seed: u64) -> Vec<Vec<u8>> {
        (0..40)
            .map(|i| {
                let n = [3_000, 40_000, 700_000, 90_000][i % 4];
                let text: Vec<u8> = (0..n / 20)
                    .flat_map(|j| format!("line {j} of file {i}/{seed}\n").into_bytes())
                    .collect();
                if i % 5 == 0 {
                    seeded(n, seed + i as u64) // incompressible: raw blocks
                } else {
                    text
                }
            })
            .collect()
    }

    #[test]
    fn zstd_streams_are_cut_at_every_frame_boundary() {
        let (stream, ends) = zstd_stream(&files(1));
        for step in [1_000, 65_536, 300_000, stream.len()] {
            let ps = pieces(&stream, Mode::Auto, step);
            assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), stream.len());
            assert!(ps.iter().all(|p| !p.0 && p.1 <= CHUNK_LEN_MAX));
            let mut at = 0;
            let cuts: std::collections::HashSet<usize> = ps
                .iter()
                .map(|p| {
                    at += p.1;
                    at
                })
                .collect();
            for e in &ends {
                assert!(
                    cuts.contains(e),
                    "no cut at the frame end {e} (step {step})"
                );
            }
            assert_eq!(ps, pieces(&stream, Mode::Auto, stream.len()));
        }
    }

    #[test]
    fn an_unchanged_file_is_an_unchanged_chunk() {
        let v1 = files(2);
        let mut v2 = v1.clone();
        v2[6].extend_from_slice(b"one more line\n");
        let chunks = |fs: &[Vec<u8>]| -> std::collections::HashSet<Vec<u8>> {
            let (stream, _) = zstd_stream(fs);
            let mut out = std::collections::HashSet::new();
            let mut c = StreamChunker::new(Mode::Auto);
            c.push(&stream, &mut |p| {
                if let Piece::Chunk(b) = p {
                    out.insert(b.to_vec());
                }
            });
            c.finish(&mut |p| {
                if let Piece::Chunk(b) = p {
                    out.insert(b.to_vec());
                }
            });
            out
        };
        let (a, b) = (chunks(&v1), chunks(&v2));
        let new: usize = b.difference(&a).map(Vec::len).sum();
        let whole: usize = b.iter().map(Vec::len).sum();
        // Only the changed file's frame is new.
        assert!(new * 20 < whole, "{new} of {whole} bytes new");
    }

    #[test]
    fn crafted_zstd_headers_fall_back_to_plain_cuts() {
        let mut bad = 0xFD2F_B528u32.to_le_bytes().to_vec();
        bad.push(0x08); // reserved bit set
        bad.extend(seeded(600_000, 9));
        let ps = pieces(&bad, Mode::Auto, 4096);
        assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), bad.len());
        assert_eq!(ps, pieces(&bad, Mode::Auto, bad.len()));
        // A block claiming more than a block may hold; a stream cut in the middle of a frame.
        let mut huge = 0xFD2F_B528u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0x20, 0x10]);
        huge.extend_from_slice(&((1u32 << 20) << 3).to_le_bytes()[..3]);
        huge.extend(seeded(300_000, 10));
        let ps = pieces(&huge, Mode::Auto, 777);
        assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), huge.len());
        let (stream, _) = zstd_stream(&files(3));
        let cut_short = &stream[..stream.len() - 100];
        let ps = pieces(cut_short, Mode::Auto, 5000);
        assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), cut_short.len());
        assert_eq!(ps, pieces(cut_short, Mode::Auto, cut_short.len()));
    }
}
