//! Chunker rules hold for any input and any arrival pattern: pieces cover the input exactly,
//! chunks respect the maximum, and the cuts do not depend on how the bytes arrive; also for
//! any bytes behind a zstd frame magic (the zstd frame walker) and behind a gzip member
//! header (the gzip member scan, which inflates them).
#![no_main]
use ballast_engine::chunker::{Mode, Piece, StreamChunker, CHUNK_LEN_MAX};
use libfuzzer_sys::fuzz_target;

fn cut(data: &[u8], step: usize) -> Vec<(bool, usize)> {
    let mut out = Vec::new();
    let mut c = StreamChunker::new(Mode::Auto);
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

fn check(data: &[u8], step: usize) {
    let a = cut(data, step);
    assert_eq!(a.iter().map(|p| p.1).sum::<usize>(), data.len());
    assert!(a.iter().all(|p| p.1 <= CHUNK_LEN_MAX && p.1 > 0));
    assert_eq!(a, cut(data, data.len()));
}

fuzz_target!(|input: (u16, &[u8])| {
    let (step, data) = input;
    check(data, usize::from(step));
    // The same bytes after a zstd frame magic: the frame walker gets them as headers and
    // blocks (a crafted zstd:chunked layer).
    let mut zstd = 0xFD2F_B528u32.to_le_bytes().to_vec();
    zstd.extend_from_slice(data);
    check(&zstd, usize::from(step));
    // And after a gzip member header: the member scan inflates them (a crafted eStargz
    // layer: bad deflate data, members cut short, headers with every flag).
    let mut gzip = vec![0x1f, 0x8b, 8, data.first().copied().unwrap_or(0) & 0x1f, 0, 0, 0, 0, 0, 3];
    gzip.extend_from_slice(data);
    check(&gzip, usize::from(step));
});
