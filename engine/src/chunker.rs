//! Content-defined chunking: FastCDC-style gear hash with normalized chunking, and tar-aware
//! splitting that cuts at tar member boundaries (docs/design.md, "Chunking").
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
    TarData { remaining: u64 },
    Plain,
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
mod tests {
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
}
