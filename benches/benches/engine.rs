//! Engine benchmarks (issue #2). Each group measures Ballast and its baseline side by side in
//! one run, so the ratio is meaningful on a noisy machine. Sizes scale with
//! `BALLAST_BENCH_MB` (default 1024) and `BALLAST_BENCH_CHUNKS_K` (default 2000, thousands of
//! chunks for the open/lookup store).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use ballast_engine::chunker::{Piece, StreamChunker};
use ballast_engine::clock::now_secs;
use ballast_engine::{Algorithm, BlobWriter, ChunkMode, Digest, Options, Store};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sha2::Digest as _;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

use ballast_engine::testdata::seeded as random_bytes;

fn bench_dir() -> tempfile::TempDir {
    // BALLAST_BENCH_DIR points the benchmarks at the storage being sized (default: /tmp).
    match std::env::var("BALLAST_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("tempdir"),
    }
}

fn ingest(store: &Store, data: &bytes::Bytes) -> Digest {
    let mut w = BlobWriter::new(store, Algorithm::Sha256, ChunkMode::Plain);
    let mut at = 0;
    while at < data.len() {
        let end = (at + (1 << 20)).min(data.len());
        w.write_bytes(data.slice(at..end)).expect("write");
        at = end;
    }
    w.finish(None).expect("finish").recipe.digest.clone()
}

fn ingest_and_read(c: &mut Criterion) {
    let mb = env_usize("BALLAST_BENCH_MB", 1024);
    let data = bytes::Bytes::from(random_bytes(mb << 20, 1));
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("baseline_sha256", |b| {
        b.iter(|| sha2::Sha256::digest(&data))
    });
    g.bench_function("unique", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = bench_dir();
                let compress = std::env::var("BALLAST_BENCH_NO_COMPRESS").is_err();
                let store = Store::open(
                    dir.path(),
                    Options {
                        compress,
                        ..Options::default()
                    },
                )
                .expect("open");
                let t = Instant::now();
                ingest(&store, &data);
                total += t.elapsed();
            }
            total
        })
    });
    let dir = bench_dir();
    let store = Store::open(dir.path(), Options::default()).expect("open");
    let digest = ingest(&store, &data);
    g.bench_function("reingest_dedup", |b| b.iter(|| ingest(&store, &data)));
    g.finish();

    // Reads: the stored blob against a plain file of the same bytes, both from page cache and
    // both copied into a 1 MiB buffer as a socket write would.
    store.clone().close().expect("seal");
    drop(store);
    let store = Store::open(dir.path(), Options::default()).expect("reopen");
    let plain = dir.path().join("plain.bin");
    std::fs::File::create(&plain)
        .and_then(|mut f| f.write_all(&data))
        .expect("plain file");
    let mut g = c.benchmark_group("read");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(15))
        .throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("baseline_plain_file", |b| {
        let file = std::fs::File::open(&plain).expect("open plain");
        let mut buf = vec![0u8; 1 << 20];
        b.iter(|| {
            let mut at = 0u64;
            while at < data.len() as u64 {
                let n = file.read_at(&mut buf, at).expect("read");
                at += n as u64;
            }
        })
    });
    g.bench_function("blob", |b| {
        let reader = store.open_blob(&digest).expect("open blob");
        let mut buf = vec![0u8; 1 << 20];
        b.iter(|| {
            for piece in reader.range(0, reader.size()).expect("range") {
                let piece = piece.expect("piece");
                let n = piece.len().min(buf.len());
                buf[..n].copy_from_slice(&piece[..n]);
            }
        })
    });
    // The same read with every chunk checked against its BLAKE3 id (the CRC is always
    // checked): what `verify_chunk_ids` costs on pulls.
    drop(store);
    let store = Store::open(
        dir.path(),
        Options {
            verify_chunk_ids: true,
            ..Options::default()
        },
    )
    .expect("reopen");
    g.bench_function("blob_verified", |b| {
        let reader = store.open_blob(&digest).expect("open blob");
        let mut buf = vec![0u8; 1 << 20];
        b.iter(|| {
            for piece in reader.range(0, reader.size()).expect("range") {
                let piece = piece.expect("piece");
                let n = piece.len().min(buf.len());
                buf[..n].copy_from_slice(&piece[..n]);
            }
        })
    });
    g.finish();

    // fsck over the store: every record CRC, every chunk's BLAKE3, every blob's SHA-256.
    drop(store);
    let store = Store::open(dir.path(), Options::default()).expect("reopen");
    // fsck reassembles the blobs something links.
    let link = ballast_engine::catalog::Op::LinkBlob {
        repo: "bench".into(),
        digest: digest.clone(),
        at: 0,
    };
    store.commit_ops(vec![link]).expect("link");
    let mut g = c.benchmark_group("fsck");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("baseline_sha256", |b| {
        b.iter(|| sha2::Sha256::digest(&data))
    });
    g.bench_function("fsck", |b| {
        b.iter(|| {
            let report = ballast_engine::verify::fsck(&store, &|_, _, _| {});
            assert!(report.is_clean());
        })
    });
    g.finish();
}

fn chunking(c: &mut Criterion) {
    let data = random_bytes(256 << 20, 2);
    let mut tar = Vec::with_capacity(data.len() + (data.len() >> 8));
    // A tar of files from 1 KiB to 1 MiB, for the tar-aware path.
    let mut at = 0;
    let mut i = 0u64;
    while at < data.len() {
        let len = (1024usize << (i % 11)).min(data.len() - at);
        let mut h = [0u8; 512];
        let name = format!("f{i}");
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..135].copy_from_slice(format!("{len:011o}").as_bytes());
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        tar.extend_from_slice(&h);
        tar.extend_from_slice(&data[at..at + len]);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
        at += len;
        i += 1;
    }
    // Compressed layers of the same tar (64 MiB of it): one gzip member (an ordinary
    // tar+gzip layer: the member scan gives up after its probe), one gzip member per file
    // (eStargz: the scan inflates everything), one zstd frame per file (zstd:chunked). Each is
    // also cut as plain bytes, in the same run: what being aware of the format costs.
    let part = &tar[..64 << 20];
    let files = tar_files(part);
    let gzip_single = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(part).expect("gzip");
        e.finish().expect("gzip")
    };
    let mut gzip_members = Vec::new();
    let mut zstd_frames = Vec::new();
    for f in &files {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(f).expect("gzip");
        gzip_members.extend(e.finish().expect("gzip"));
        zstd_frames.extend(zstd::bulk::compress(f, 1).expect("zstd"));
    }
    let mut g = c.benchmark_group("chunker");
    g.sample_size(10);
    for (name, input, mode) in [
        ("plain", &data, ChunkMode::Plain),
        ("tar_aware", &tar, ChunkMode::Auto),
        ("gzip_single_aware", &gzip_single, ChunkMode::Auto),
        ("gzip_single_as_plain", &gzip_single, ChunkMode::Plain),
        ("gzip_members_aware", &gzip_members, ChunkMode::Auto),
        ("gzip_members_as_plain", &gzip_members, ChunkMode::Plain),
        ("zstd_frames_aware", &zstd_frames, ChunkMode::Auto),
        ("zstd_frames_as_plain", &zstd_frames, ChunkMode::Plain),
    ] {
        g.throughput(Throughput::Bytes(input.len() as u64));
        g.bench_with_input(BenchmarkId::new("cdc", name), input, |b, input| {
            b.iter(|| {
                let mut n = 0usize;
                let mut ch = StreamChunker::new(mode);
                let mut emit = |p: Piece<'_>| {
                    if let Piece::Chunk(_) = p {
                        n += 1
                    }
                };
                for part in input.chunks(1 << 20) {
                    ch.push(part, &mut emit);
                }
                ch.finish(&mut emit);
                n
            })
        });
    }
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("baseline_sha256", |b| {
        b.iter(|| sha2::Sha256::digest(&data))
    });
    g.finish();
}

/// The members of a tar (each header with its data), as a layer compressed per file holds
/// them.
fn tar_files(tar: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 512 <= tar.len() {
        let Some(len) = ballast_engine::chunker::tar_member_data_len(&tar[at..at + 512]) else {
            break;
        };
        let end = (at + 512 + (len as usize).div_ceil(512) * 512).min(tar.len());
        out.push(&tar[at..end]);
        at = end;
    }
    out
}

/// A store of `count` small chunks, closed, for the open and lookup benchmarks.
fn chunk_store(count: usize) -> (tempfile::TempDir, Vec<ballast_engine::ChunkId>) {
    let dir = bench_dir();
    let store = Store::open(
        dir.path(),
        Options {
            compress: false,
            ..Options::default()
        },
    )
    .expect("open");
    let mut ids = Vec::with_capacity(count);
    for i in 0..count as u64 {
        let mut chunk = [0u8; 64];
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        ids.push(store.put_chunk(&chunk).expect("put").0);
    }
    // Commit them with one recipe so they are durable, then seal.
    store.put_blob(b"commit", None).expect("commit");
    store.close().expect("close");
    (dir, ids)
}

fn open_and_lookup(c: &mut Criterion) {
    let large = env_usize("BALLAST_BENCH_CHUNKS_K", 2000) * 1000;
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    for count in [large / 10, large] {
        let (dir, ids) = chunk_store(count);
        g.bench_function(BenchmarkId::new("open", count), |b| {
            b.iter(|| Store::open(dir.path(), Options::default()).expect("open"))
        });
        let store = Store::open(dir.path(), Options::default()).expect("open");
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("chunk_lookup", count), |b| {
            b.iter(|| {
                i = (i + 7919) % ids.len();
                store.chunk_location(&ids[i]).expect("present")
            })
        });
    }
    g.finish();
}

/// GC compaction: a store whose sealed segments are one third live (every third blob);
/// measured is one collection, as MB/s of live data copied forward, against SHA-256 over the
/// same number of bytes.
fn gc_compaction(c: &mut Criterion) {
    let mb = env_usize("BALLAST_BENCH_MB", 1024) / 4;
    let blob_len = 8 << 20;
    let blobs = (mb << 20) / blob_len;
    let datas: Vec<bytes::Bytes> = (0..blobs)
        .map(|i| bytes::Bytes::from(random_bytes(blob_len, 2 * i as u64 + 101)))
        .collect();
    let live_bytes = (blobs.div_ceil(3) * blob_len) as u64;
    let mut g = c.benchmark_group("gc");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Bytes(live_bytes));
    let live = bytes::Bytes::from(random_bytes(live_bytes as usize, 7));
    g.bench_function("baseline_sha256", |b| {
        b.iter(|| sha2::Sha256::digest(&live))
    });
    g.bench_function("compaction", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = bench_dir();
                let store = Store::open(
                    dir.path(),
                    Options {
                        compress: false,
                        ..Options::default()
                    },
                )
                .expect("open");
                let future = now_secs() + 3600;
                for (i, data) in datas.iter().enumerate() {
                    let d = ingest(&store, data);
                    if i % 3 == 0 {
                        // Linked "in the future": kept by a collection with no grace period.
                        let op = ballast_engine::catalog::Op::LinkBlob {
                            repo: "r".into(),
                            digest: d,
                            at: future,
                        };
                        store.commit_ops(vec![op]).expect("link");
                    }
                }
                store.clone().close().expect("seal");
                drop(store);
                let store = Store::open(dir.path(), Options::default()).expect("reopen");
                let opts = ballast_engine::gc::GcOptions {
                    grace_secs: 0,
                    ..Default::default()
                };
                let t = Instant::now();
                // (+1: a segment written this second counts as older than no grace at all.)
                let now = now_secs() + 1;
                let report = ballast_engine::gc::collect(&store, &opts, now).expect("gc");
                total += t.elapsed();
                assert!(report.bytes_moved > live_bytes / 2, "{report:?}");
            }
            total
        })
    });
    g.finish();
}

/// Catalog commits (one blob link each) from one thread and from eight at once: concurrent
/// committers share fsyncs. Baseline: one write and fdatasync of a small file, the cost of a
/// commit that syncs alone.
fn catalog_commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("catalog");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    let dir = bench_dir();
    let file = std::fs::File::create(dir.path().join("plain")).expect("file");
    let mut at = 0u64;
    g.bench_function("baseline_write_fdatasync", |b| {
        b.iter(|| {
            file.write_all_at(&[7u8; 200], at).expect("write");
            file.sync_data().expect("sync");
            at += 200;
        })
    });
    let store = Store::open(dir.path().join("store"), Options::default()).expect("open");
    let next = std::sync::atomic::AtomicU64::new(0);
    let commit = || {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let op = ballast_engine::catalog::Op::LinkBlob {
            repo: format!("r{}", n % 64),
            digest: Digest::of(Algorithm::Sha256, &n.to_le_bytes()),
            at: n,
        };
        store.commit_ops(vec![op]).expect("commit");
    };
    for threads in [1usize, 8] {
        g.bench_function(
            BenchmarkId::new("link_commit", format!("{threads}_threads")),
            |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    std::thread::scope(|s| {
                        for i in 0..threads as u64 {
                            let share =
                                iters / threads as u64 + u64::from(i < iters % threads as u64);
                            let commit = &commit;
                            s.spawn(move || (0..share).for_each(|_| commit()));
                        }
                    });
                    t.elapsed()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    catalog_commits,
    chunking,
    open_and_lookup,
    ingest_and_read,
    gc_compaction
);
criterion_main!(benches);
