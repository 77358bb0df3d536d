//! `ballast bench`: the storage benchmark suite an operator runs on the storage they are
//! sizing. Every engine figure is reported next to a baseline of the same hardware measured
//! in the same run on the same directory (sequential write + fsync, sequential read from the
//! device, SHA-256 in memory, small synced writes), so the ratios travel between machines.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_engine::catalog::Op;
use ballast_engine::{
    clock, gc, storage::drop_page_cache, verify, Algorithm, BlobWriter, ChunkMode,
};
use ballast_engine::{Digest, Options, ReadAhead, Store};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use sha2::Digest as _;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Directory on the storage to measure (a scratch subdirectory is made and removed).
    pub dir: PathBuf,
    /// Small sizes: a minute instead of several.
    pub quick: bool,
    /// Keep the scratch directory (to inspect it).
    pub keep: bool,
}

/// One measured figure and its baseline.
#[derive(Debug, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: &'static str,
    /// The figure.
    pub value: f64,
    /// Its unit (`MB/s`, `ops/s`, `ms`).
    pub unit: &'static str,
    /// The hardware baseline it is compared with.
    pub baseline: Option<&'static str>,
    /// The baseline's figure, in the same unit.
    pub baseline_value: Option<f64>,
    /// value / baseline (higher is better for rates).
    pub ratio: Option<f64>,
}

/// A whole run.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub dir: PathBuf,
    /// Bytes of blob data ingested.
    pub data_bytes: u64,
    /// Whether `--quick` sizes were used.
    pub quick: bool,
    /// The storage I/O backend measured.
    pub io_backend: String,
    /// Hardware baselines, then engine figures.
    pub results: Vec<Row>,
}

const MB: f64 = 1_000_000.0;

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / MB / took.as_secs_f64().max(1e-9)
}

use ballast_engine::testdata::seeded as random_bytes;
use bytes::Bytes;

struct Sizes {
    blobs: usize,
    blob_len: usize,
    small_ops: usize,
}

impl Sizes {
    fn of(quick: bool) -> Sizes {
        if quick {
            Sizes {
                blobs: 4,
                blob_len: 16 << 20,
                small_ops: 300,
            }
        } else {
            Sizes {
                blobs: 16,
                blob_len: 64 << 20,
                small_ops: 2000,
            }
        }
    }
    fn total(&self) -> u64 {
        (self.blobs * self.blob_len) as u64
    }
}

/// A small manifest-sized JSON document, distinct per `i`.
fn manifest_like(i: usize) -> Vec<u8> {
    let mut m = format!(
        "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"n\":{i},\"layers\":["
    );
    for l in 0..12 {
        m.push_str(&format!(
            "{{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:{:064x}\",\"size\":{}}},",
            (i as u128) << 8 | l as u128,
            1000 + l
        ));
    }
    m.pop();
    m.push_str("]}");
    m.into_bytes()
}

/// Writes a blob in 1 MiB pieces of shared bytes, as the server feeds request bodies (the
/// writer's threads share them instead of copying).
fn ingest(store: &Store, data: &Bytes) -> ballast_engine::Result<Digest> {
    let mut w = BlobWriter::new(store, Algorithm::Sha256, ChunkMode::Plain);
    let mut at = 0;
    while at < data.len() {
        let end = (at + (1 << 20)).min(data.len());
        w.write_bytes(data.slice(at..end))?;
        at = end;
    }
    Ok(w.finish(None)?.recipe.digest.clone())
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Drops the page cache of every file under `dir` (synced files only).
fn drop_cache_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            drop_cache_under(&p);
        } else {
            let _ = drop_page_cache(&p);
        }
    }
}

struct Run<'a> {
    bar: &'a ProgressBar,
    rows: Vec<Row>,
}

impl Run<'_> {
    fn step(&self, msg: &'static str) {
        self.bar.set_message(msg);
    }
    fn done(&mut self, row: Row) {
        self.bar.inc(1);
        self.rows.push(row);
    }
    fn value(&self, name: &str) -> f64 {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.value)
            .unwrap_or(f64::NAN)
    }
    fn compared(&mut self, name: &'static str, value: f64, unit: &'static str, base: &'static str) {
        let b = self.value(base);
        self.done(Row {
            name,
            value,
            unit,
            baseline: Some(base),
            baseline_value: Some(b),
            ratio: Some(value / b),
        });
    }
    fn plain(&mut self, name: &'static str, value: f64, unit: &'static str) {
        self.done(Row {
            name,
            value,
            unit,
            baseline: None,
            baseline_value: None,
            ratio: None,
        });
    }
}

const STEPS: u64 = 30;

/// Runs the suite in a scratch directory under `opts.dir`.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, String> {
    let scratch = opts
        .dir
        .join(format!("ballast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(err("creating the scratch directory"))?;
    let result = run_in(&scratch, opts);
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    result
}

fn run_in(scratch: &Path, opts: &BenchOptions) -> Result<BenchReport, String> {
    let sizes = Sizes::of(opts.quick);
    let bar = ProgressBar::new(STEPS);
    bar.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut run = Run {
        bar: &bar,
        rows: Vec::new(),
    };

    // Hardware baselines on the same directory.
    // Each disk baseline is the better of two passes: these figures are what the storage
    // can do, and a shared machine's noise should not flatter the engine's ratios.
    run.step("sequential write + fsync");
    let raw = scratch.join("raw.bin");
    let total = sizes.total();
    let (mut write_best, mut read_best) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        let _ = std::fs::remove_file(&raw);
        let mut f = File::create(&raw).map_err(err("creating the baseline file"))?;
        let mut t = Duration::ZERO;
        for i in 0..sizes.blobs {
            let block = random_bytes(sizes.blob_len, 1_000 + i as u64);
            let start = Instant::now();
            f.write_all(&block)
                .map_err(err("writing the baseline file"))?;
            t += start.elapsed();
        }
        let start = Instant::now();
        f.sync_all().map_err(err("syncing the baseline file"))?;
        write_best = write_best.min(t + start.elapsed());
        drop(f);
        drop_page_cache(&raw).map_err(err("dropping the page cache"))?;
        let mut f = File::open(&raw).map_err(err("opening the baseline file"))?;
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        while f.read(&mut buf).map_err(err("reading the baseline file"))? > 0 {}
        read_best = read_best.min(start.elapsed());
    }
    run.plain(
        "disk: sequential write + fsync",
        rate(total, write_best),
        "MB/s",
    );
    run.step("sequential read (cold)");
    run.plain(
        "disk: sequential read (cold)",
        rate(total, read_best),
        "MB/s",
    );
    // What moving bytes costs this storage: a copy of a cold file into a new one, read
    // and written in 1 MiB steps, then fsynced (a compaction reads and writes every byte it
    // moves, on the same disk).
    let copy = scratch.join("copy.bin");
    let mut copy_best = Duration::MAX;
    for _ in 0..2 {
        drop_page_cache(&raw).map_err(err("dropping the page cache"))?;
        let _ = std::fs::remove_file(&copy);
        let mut from = File::open(&raw).map_err(err("opening the baseline file"))?;
        let mut to = File::create(&copy).map_err(err("creating the copy"))?;
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        loop {
            let n = from
                .read(&mut buf)
                .map_err(err("reading the baseline file"))?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).map_err(err("writing the copy"))?;
        }
        to.sync_all().map_err(err("syncing the copy"))?;
        copy_best = copy_best.min(start.elapsed());
    }
    run.plain(
        "disk: file copy (cold read + write + fsync)",
        rate(total, copy_best),
        "MB/s",
    );
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_file(&raw);

    run.step("SHA-256 in memory");
    let sample = random_bytes(sizes.blob_len, 7);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_millis(if opts.quick { 300 } else { 1500 }) {
        std::hint::black_box(sha2::Sha256::digest(&sample));
        n += sample.len() as u64;
    }
    run.plain("cpu: SHA-256", rate(n, start.elapsed()), "MB/s");

    run.step("small write + fdatasync");
    let small = scratch.join("small.bin");
    let took = {
        let mut f = File::create(&small).map_err(err("creating the baseline file"))?;
        let doc = manifest_like(0);
        let start = Instant::now();
        for _ in 0..sizes.small_ops {
            f.write_all(&doc).map_err(err("writing"))?;
            f.sync_data().map_err(err("syncing"))?;
        }
        start.elapsed()
    };
    let small_rate = sizes.small_ops as f64 / took.as_secs_f64().max(1e-9);
    run.plain("disk: small write + fdatasync", small_rate, "ops/s");
    let _ = std::fs::remove_file(&small);

    // The engine, on the same directory.
    let data_dir = scratch.join("data");
    let store = Store::open(&data_dir, Options::default()).map_err(err("opening the store"))?;
    run.step("ingest unique");
    let mut digests = Vec::new();
    let mut took = Duration::ZERO;
    for i in 0..sizes.blobs {
        let blob = Bytes::from(random_bytes(sizes.blob_len, 1 + i as u64));
        let start = Instant::now();
        digests.push(ingest(&store, &blob).map_err(err("ingesting"))?);
        took += start.elapsed();
    }
    run.compared(
        "engine: ingest unique (durable)",
        rate(total, took),
        "MB/s",
        "disk: sequential write + fsync",
    );
    let unique = run.value("engine: ingest unique (durable)");
    run.rows.push(Row {
        name: "engine: ingest unique vs SHA-256",
        value: unique,
        unit: "MB/s",
        baseline: Some("cpu: SHA-256"),
        baseline_value: Some(run.value("cpu: SHA-256")),
        ratio: Some(unique / run.value("cpu: SHA-256")),
    });

    run.step("ingest duplicate");
    let mut took = Duration::ZERO;
    for i in 0..sizes.blobs {
        let blob = Bytes::from(random_bytes(sizes.blob_len, 1 + i as u64));
        let start = Instant::now();
        ingest(&store, &blob).map_err(err("ingesting again"))?;
        took += start.elapsed();
    }
    run.compared(
        "engine: ingest duplicate",
        rate(total, took),
        "MB/s",
        "cpu: SHA-256",
    );

    // A blob made of chunks of all the others, round robin: its recipe points all over the
    // segments, as a new image's does when most of its chunks were pushed before by
    // other images. Built from whole chunks, so nearly all of them deduplicate.
    let scattered = scattered_blob(&store, &digests, sizes.total() / 4)?;

    run.step("small blob commits");
    let start = Instant::now();
    for i in 0..sizes.small_ops {
        store
            .put_blob(&manifest_like(i + 1), None)
            .map_err(err("committing a small blob"))?;
    }
    let ops = sizes.small_ops as f64 / start.elapsed().as_secs_f64().max(1e-9);
    run.compared(
        "engine: small blob commits (durable)",
        ops,
        "ops/s",
        "disk: small write + fdatasync",
    );

    // Garbage for the GC figure: 4 MiB blobs of which every third stays linked, so the
    // segments holding them are two-thirds dead and their live third must move. The big
    // blobs above stay linked (live segments, examined but not compacted).
    let future = clock::now_secs() + 3600;
    let mut ops = make_garbage(&store, total / 4, 500_000)?;
    ops.extend(digests.iter().map(|d| Op::LinkBlob {
        repo: "bench".into(),
        digest: d.clone(),
        at: future,
    }));
    store.commit_ops(ops).map_err(err("linking"))?;
    store.close().map_err(err("closing the store"))?;

    run.step("store open");
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let s = Store::open(&data_dir, Options::default()).map_err(err("reopening"))?;
        best = best.min(start.elapsed());
        s.close().map_err(err("closing"))?;
    }
    run.plain("engine: store open", best.as_secs_f64() * 1000.0, "ms");

    // Cold reads, each way of reading ahead, then verified as the server reads (BLAKE3 of
    // every chunk) with the default read-ahead.
    let cold = [
        (
            ReadAhead::Off,
            false,
            "engine: blob read (cold, no read-ahead)",
        ),
        (
            ReadAhead::Uring,
            false,
            "engine: blob read (cold, io_uring)",
        ),
        (ReadAhead::Advise, false, "engine: blob read (cold, advise)"),
        (
            ReadAhead::default(),
            true,
            "engine: blob read (cold, verified)",
        ),
    ];
    for (mode, verify, name) in cold {
        run.step("blob read (cold)");
        let opts = read_options(mode, verify);
        read_figure(&mut run, &data_dir, opts, &digests, Cache::Cold, name)?;
    }
    let scattered_reads = [
        (ReadAhead::Off, "engine: scattered blob read (cold, none)"),
        (
            ReadAhead::Uring,
            "engine: scattered blob read (cold, uring)",
        ),
        (
            ReadAhead::Advise,
            "engine: scattered blob read (cold, advise)",
        ),
    ];
    for (mode, name) in scattered_reads {
        run.step("scattered blob read (cold)");
        let blobs = std::slice::from_ref(&scattered);
        let opts = read_options(mode, false);
        read_figure(&mut run, &data_dir, opts, blobs, Cache::Cold, name)?;
    }
    let store = Store::open(&data_dir, Options::default()).map_err(err("reopening"))?;

    run.step("fsck");
    let stored: u64 = std::fs::read_dir(data_dir.join("segments"))
        .map_err(err("listing segments"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let start = Instant::now();
    let report = verify::fsck(&store, &|_, _, _| {});
    let took = start.elapsed();
    if !report.is_clean() {
        return Err(format!(
            "fsck found problems in the benchmark's own store: {:?}",
            report.findings
        ));
    }
    run.compared("engine: fsck", rate(stored, took), "MB/s", "cpu: SHA-256");

    // Compaction of cold segments, each way of reading ahead (fresh garbage for each).
    let opts_gc = gc::GcOptions {
        grace_secs: 0,
        ..Default::default()
    };
    let mut store = store;
    let compactions = [
        (ReadAhead::Off, "engine: GC compaction (no read-ahead)"),
        (ReadAhead::Uring, "engine: GC compaction (io_uring)"),
        (ReadAhead::Advise, "engine: GC compaction (advise)"),
    ];
    for (i, (mode, name)) in compactions.into_iter().enumerate() {
        run.step("GC compaction");
        if i > 0 {
            let ops = make_garbage(&store, total / 4, 500_000 + 10_000 * i as u64)?;
            store.commit_ops(ops).map_err(err("linking"))?;
        }
        store.close().map_err(err("closing"))?;
        drop_cache_under(&data_dir);
        store = Store::open(&data_dir, read_options(mode, false)).map_err(err("reopening"))?;
        let start = Instant::now();
        // A low threshold: the fresh garbage shares its segment with what the collection
        // before moved there (live).
        let opts = gc::GcOptions {
            dead_fraction_min: 0.1,
            ..opts_gc.clone()
        };
        let report =
            gc::collect(&store, &opts, clock::now_secs() + 1).map_err(err("collecting"))?;
        let took = start.elapsed();
        if report.bytes_moved == 0 {
            return Err(format!("the collection moved nothing: {report:?}"));
        }
        run.compared(
            name,
            rate(report.bytes_moved, took),
            "MB/s",
            "disk: sequential write + fsync",
        );
        if mode == ReadAhead::default() {
            run.compared(
                "engine: GC compaction vs a file copy",
                rate(report.bytes_moved, took),
                "MB/s",
                "disk: file copy (cold read + write + fsync)",
            );
            run.plain(
                "engine: GC space reclaimed",
                rate(report.bytes_reclaimed, took),
                "MB/s",
            );
        }
    }
    store.close().map_err(err("closing"))?;
    let store = Store::open(&data_dir, Options::default()).map_err(err("reopening"))?;

    // Pushes and pulls while a collection compacts: fresh garbage (sealed), then ingest and
    // read in small steps for as long as one collection runs.
    run.step("ingest and read under GC");
    let step = 4 << 20;
    // The compactions above dropped the page cache: bring the blobs back first.
    for d in &digests {
        read_all(&store, d)?;
    }
    let baseline_read = {
        let start = Instant::now();
        let mut n = 0u64;
        for d in &digests {
            n += read_all(&store, d)?;
        }
        rate(n, start.elapsed())
    };
    run.plain("engine: blob read (warm)", baseline_read, "MB/s");
    // Warm reads another way: io_uring (a copy where the map needs none), and verified as
    // the server verifies, with and without a second thread verifying ahead (each chunk is
    // read once a pass, so the reuse window spares nothing but the helper's work).
    store.close().map_err(err("closing"))?;
    let warm = [
        (
            read_options(ReadAhead::Uring, false),
            "engine: blob read (warm, io_uring)",
        ),
        (
            read_options(ReadAhead::default(), true),
            "engine: blob read (warm, verified)",
        ),
        (
            Options {
                verify_reuse: Duration::ZERO,
                ..read_options(ReadAhead::default(), true)
            },
            "engine: blob read (warm, verified, 1 thread)",
        ),
    ];
    for (opts, name) in warm {
        read_figure(&mut run, &data_dir, opts, &digests, Cache::Warm, name)?;
    }
    let store = Store::open(&data_dir, Options::default()).map_err(err("reopening"))?;
    // The work's rate over the collection, and the collection's (live bytes moved a second).
    // The work times itself: what it prepares (random data) is not counted.
    let under_gc = |work: &mut dyn FnMut(usize) -> Result<(u64, Duration), String>,
                    seed: u64,
                    pace: u64|
     -> Result<(f64, f64), String> {
        let ops = make_garbage(&store, total / 4, seed)?;
        store.commit_ops(ops).map_err(err("linking"))?;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let collector = scope.spawn(|| {
                // A lower threshold than the default: the segment the fresh garbage lands
                // in also holds data moved by the collection before.
                let opts = gc::GcOptions {
                    dead_fraction_min: 0.2,
                    pace_bytes_per_sec: pace,
                    ..opts_gc.clone()
                };
                let start = Instant::now();
                let r = gc::collect(&store, &opts, clock::now_secs() + 1);
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                r.map(|r| (r, start.elapsed()))
            });
            let (mut bytes, mut took, mut i) = (0u64, Duration::ZERO, 0usize);
            while !done.load(std::sync::atomic::Ordering::Relaxed) || i == 0 {
                let (n, t) = work(i)?;
                bytes += n;
                took += t;
                i += 1;
            }
            let (report, gc_took) = collector
                .join()
                .map_err(|_| "the collection panicked".to_owned())?
                .map_err(err("collecting"))?;
            if report.bytes_moved == 0 {
                return Err(format!(
                    "the collection under load moved nothing: {report:?}"
                ));
            }
            Ok((rate(bytes, took), rate(report.bytes_moved, gc_took)))
        })
    };
    // Ingest of 4 MiB blobs: alone (the baseline, as many blobs as the data set), then
    // while a collection compacts, paced (the default) and unpaced.
    let mut seed = 800_000u64;
    let mut ingesting = |_| {
        seed += 1;
        let blob = Bytes::from(random_bytes(step, seed));
        let start = Instant::now();
        ingest(&store, &blob).map_err(err("ingesting"))?;
        Ok((step as u64, start.elapsed()))
    };
    run.step("ingest 4 MiB blobs");
    let (mut n, mut t) = (0u64, Duration::ZERO);
    for i in 0..(total as usize / step).max(8) {
        let (b, d) = ingesting(i)?;
        n += b;
        t += d;
    }
    run.plain("engine: ingest unique, 4 MiB blobs", rate(n, t), "MB/s");
    let (unpaced, gc_unpaced) = under_gc(&mut ingesting, 600_000, 0)?;
    let (paced, gc_paced) = under_gc(&mut ingesting, 650_000, gc::PACE_BYTES_PER_SEC)?;
    run.compared(
        "engine: ingest unique while GC compacts",
        paced,
        "MB/s",
        "engine: ingest unique, 4 MiB blobs",
    );
    run.plain("engine: GC compaction under ingest", gc_paced, "MB/s");
    run.compared(
        "engine: ingest while GC compacts unpaced",
        unpaced,
        "MB/s",
        "engine: ingest unique, 4 MiB blobs",
    );
    run.plain(
        "engine: GC compaction under ingest, unpaced",
        gc_unpaced,
        "MB/s",
    );
    let (read_rate, _) = under_gc(
        &mut |i| {
            let start = Instant::now();
            let n = read_all(&store, &digests[i % digests.len()])?;
            Ok((n, start.elapsed()))
        },
        700_000,
        gc::PACE_BYTES_PER_SEC,
    )?;
    run.compared(
        "engine: blob read while GC compacts",
        read_rate,
        "MB/s",
        "engine: blob read (warm)",
    );
    store.close().map_err(err("closing the store"))?;
    bar.finish_and_clear();
    Ok(BenchReport {
        dir: opts.dir.clone(),
        data_bytes: total,
        quick: opts.quick,
        io_backend: format!(
            "mmap of sealed segments; read-ahead through io_uring (the default{}) or madvise; pwrite",
            if ballast_engine::readahead::uring_available() {
                ""
            } else {
                ": NOT AVAILABLE on this machine, io_uring rows measure madvise"
            }
        ),
        results: run.rows,
    })
}

/// Ingests `bytes` of 4 MiB blobs; returns links (far in the future, so kept) for every third
/// one: the rest is garbage, interleaved with live data in the same segments, which are
/// sealed (the active segment is never compacted).
fn make_garbage(store: &Store, bytes: u64, seed: u64) -> Result<Vec<Op>, String> {
    let blob = 4 << 20;
    let mut ops = Vec::new();
    for i in 0..(bytes as usize / blob).max(6) {
        let d = ingest(store, &Bytes::from(random_bytes(blob, seed + i as u64)))
            .map_err(err("ingesting"))?;
        if i % 3 == 0 {
            ops.push(Op::LinkBlob {
                repo: "bench".into(),
                digest: d,
                at: clock::now_secs() + 3600,
            });
        }
    }
    store.seal_active().map_err(err("sealing"))?;
    Ok(ops)
}

/// Ingests a blob of about `bytes` made of whole chunks of the `digests` blobs, taken round
/// robin (chunk 0 of the first, chunk 1 of the second, ...); returns its digest.
fn scattered_blob(store: &Store, digests: &[Digest], bytes: u64) -> Result<Digest, String> {
    let mut sources = Vec::new();
    for d in digests {
        let r = store.open_blob(d).map_err(err("opening a blob"))?;
        let starts = r.recipe().starts();
        sources.push((store.read_blob(d).map_err(err("reading a blob"))?, starts));
    }
    let mut out = Vec::with_capacity(bytes as usize);
    let mut k = 0usize;
    while (out.len() as u64) < bytes {
        let (data, starts) = &sources[k % sources.len()];
        let i = (k / sources.len()) % (starts.len() - 1).max(1);
        let (a, b) = (starts[i] as usize, starts[i + 1] as usize);
        out.extend_from_slice(&data[a..b]);
        k += 1;
    }
    ingest(store, &Bytes::from(out)).map_err(err("ingesting"))
}

/// Whether a read figure starts from a dropped page cache.
#[derive(Clone, Copy, PartialEq)]
enum Cache {
    Cold,
    Warm,
}

/// Opens the store with `opts`, reads `blobs` whole (the page cache dropped first when
/// cold) and records the rate against the cold disk read or the warm default read.
fn read_figure(
    run: &mut Run,
    data_dir: &Path,
    opts: Options,
    blobs: &[Digest],
    cache: Cache,
    name: &'static str,
) -> Result<(), String> {
    if cache == Cache::Cold {
        drop_cache_under(data_dir);
    }
    let store = Store::open(data_dir, opts).map_err(err("reopening"))?;
    let start = Instant::now();
    let mut n = 0u64;
    for d in blobs {
        n += read_all(&store, d)?;
    }
    let baseline = match cache {
        Cache::Cold => "disk: sequential read (cold)",
        Cache::Warm => "engine: blob read (warm)",
    };
    run.compared(name, rate(n, start.elapsed()), "MB/s", baseline);
    store.close().map_err(err("closing"))
}

/// Store options for a read figure: how to read ahead, and whether to verify every chunk's
/// BLAKE3 id (the server's default) or only record CRCs (the engine's).
fn read_options(read_ahead: ReadAhead, verify: bool) -> Options {
    Options {
        read_ahead,
        verify_chunk_ids: verify,
        // The server's default reuse window (`verify_reuse_ms`).
        verify_reuse: Duration::from_secs(1),
        ..Options::default()
    }
}

/// Reads a whole blob; returns its size.
fn read_all(store: &Store, d: &Digest) -> Result<u64, String> {
    let reader = store.open_blob(d).map_err(err("opening a blob"))?;
    let mut n = 0u64;
    for piece in reader.range(0, reader.size()).map_err(err("reading"))? {
        n += piece.map_err(err("reading"))?.len() as u64;
    }
    Ok(n)
}

/// Prints a report as a table.
pub fn print_table(r: &BenchReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "ballast bench on {} ({} MB of blob data{}; I/O: {})",
        r.dir.display(),
        r.data_bytes / 1_000_000,
        if r.quick { ", --quick" } else { "" },
        r.io_backend
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<42} {:>12} {:<6}  {:<32} {:>7}",
        "benchmark", "result", "", "baseline (same run)", "ratio"
    )?;
    for row in &r.results {
        let (base, ratio) = match (row.baseline, row.ratio) {
            (Some(b), Some(x)) => (b.to_owned(), format!("{x:.2}x")),
            _ => ("-".to_owned(), String::new()),
        };
        writeln!(
            out,
            "{:<42} {:>12.1} {:<6}  {:<32} {:>7}",
            row.name, row.value, row.unit, base, ratio
        )?;
    }
    Ok(())
}
