//! The chunker's tests: golden boundaries, arrival independence, tar, zstd and gzip streams.

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
fn zstd_stream(files: &[Vec<u8>]) -> Encoded {
    let mut out = Vec::new();
    let mut ends = Vec::new();
    for f in files {
        out.extend(::zstd::bulk::compress(f, 3).expect("compress"));
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

/// A stream and where its frames or members end.
type Encoded = (Vec<u8>, Vec<usize>);

/// Cut at every frame (or member) end of `files` encoded by `encode`, whatever the arrival.
fn cut_at_every_end(encode: fn(&[Vec<u8>]) -> Encoded, seed: u64, what: &str) {
    let (stream, ends) = encode(&files(seed));
    for step in [1_000, 65_536, 300_000, stream.len()] {
        let ps = pieces(&stream, Mode::Auto, step);
        assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), stream.len());
        assert!(ps.iter().all(|p| !p.0 && p.1 <= CHUNK_LEN_MAX));
        let cuts = cut_ends(&ps);
        for e in &ends {
            assert!(
                cuts.contains(e),
                "no cut at the {what} end {e} (step {step})"
            );
        }
        assert_eq!(ps, pieces(&stream, Mode::Auto, stream.len()));
    }
}

/// One file changed between two streams: only its frame (or member) is new.
fn unchanged_files_are_unchanged_chunks(encode: fn(&[Vec<u8>]) -> Encoded, seed: u64) {
    let v1 = files(seed);
    let mut v2 = v1.clone();
    v2[6].extend_from_slice(b"one more line\n");
    let chunks = |fs: &[Vec<u8>]| chunk_set(&encode(fs).0);
    let (a, b) = (chunks(&v1), chunks(&v2));
    let new: usize = b.difference(&a).map(Vec::len).sum();
    let whole: usize = b.iter().map(Vec::len).sum();
    assert!(new * 20 < whole, "{new} of {whole} bytes new");
}

#[test]
fn zstd_streams_are_cut_at_every_frame_boundary() {
    cut_at_every_end(zstd_stream, 1, "frame");
}

#[test]
fn an_unchanged_file_is_an_unchanged_chunk() {
    unchanged_files_are_unchanged_chunks(zstd_stream, 2);
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

/// The chunks a stream is cut into.
fn chunk_set(stream: &[u8]) -> std::collections::HashSet<Vec<u8>> {
    let mut out = std::collections::HashSet::new();
    let mut c = StreamChunker::new(Mode::Auto);
    let mut keep = |p: Piece<'_>| {
        if let Piece::Chunk(b) = p {
            out.insert(b.to_vec());
        }
    };
    c.push(stream, &mut keep);
    c.finish(&mut keep);
    out
}

/// An eStargz-style stream: each file a gzip member of its own, then a member holding a
/// table of contents; the member ends.
fn gzip_members(files: &[Vec<u8>]) -> Encoded {
    use std::io::Write as _;
    let mut out = Vec::new();
    let mut ends = Vec::new();
    for (i, f) in files.iter().chain([&b"{\"toc\":[]}".to_vec()]).enumerate() {
        let mut e = flate2::GzBuilder::new()
            .filename(format!("file-{i}"))
            .write(Vec::new(), flate2::Compression::default());
        e.write_all(f).expect("compress");
        out.extend(e.finish().expect("finish"));
        ends.push(out.len());
    }
    (out, ends)
}

fn cut_ends(ps: &[(bool, usize)]) -> std::collections::HashSet<usize> {
    let mut at = 0;
    ps.iter()
        .map(|p| {
            at += p.1;
            at
        })
        .collect()
}

#[test]
fn gzip_members_are_cut_at_every_member_end() {
    cut_at_every_end(gzip_members, 4, "member");
}

#[test]
fn an_unchanged_file_is_an_unchanged_chunk_in_gzip_members() {
    unchanged_files_are_unchanged_chunks(gzip_members, 5);
}

#[test]
fn a_single_member_gzip_is_cut_as_plain_bytes() {
    use std::io::Write as _;
    // Past the probe: the scan gives up, and the cuts are those of plain CDC.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&seeded(gzip::PROBE_BYTES as usize + 3_000_000, 21))
        .expect("compress");
    let one = e.finish().expect("finish");
    assert_eq!(
        pieces(&one, Mode::Auto, 100_000),
        pieces(&one, Mode::Plain, one.len())
    );
}

#[test]
fn crafted_gzip_falls_back_to_plain_cuts() {
    let plain_after = |bytes: &[u8]| {
        for step in [7, 4096, bytes.len()] {
            let ps = pieces(bytes, Mode::Auto, step);
            assert_eq!(ps.iter().map(|p| p.1).sum::<usize>(), bytes.len());
            assert_eq!(ps, pieces(bytes, Mode::Auto, bytes.len()), "step {step}");
        }
    };
    // The magic, then noise: not a deflate stream.
    let mut noise = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    noise.extend(seeded(700_000, 22));
    plain_after(&noise);
    // Reserved flag bits; a name that never ends.
    let mut reserved = vec![0x1f, 0x8b, 8, 0x80, 0, 0, 0, 0, 0, 3];
    reserved.extend(seeded(300_000, 23));
    plain_after(&reserved);
    let mut endless = vec![0x1f, 0x8b, 8, 0x08, 0, 0, 0, 0, 0, 3];
    endless.extend(std::iter::repeat_n(b'a', gzip::HEADER_MAX + 10_000));
    endless.extend(seeded(100_000, 24));
    plain_after(&endless);
    // A good stream cut short, and one with trailing bytes.
    let (stream, _) = gzip_members(&files(6));
    plain_after(&stream[..stream.len() - 100]);
    let mut trailing = stream.clone();
    trailing.extend(seeded(500_000, 25));
    plain_after(&trailing);
    let ps = pieces(&trailing, Mode::Auto, 10_000);
    assert!(
        cut_ends(&ps).contains(&stream.len()),
        "cut at the last member's end"
    );
}
