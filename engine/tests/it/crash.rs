//! Crash safety: a simulated power cut at every sync point, and SIGKILL of a writer process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_engine::io::SimStorage;
use ballast_engine::{Options, Store};

use crate::{seeded, sha256, tar};

fn small_opts() -> Options {
    Options {
        segment_bytes_max: 256 * 1024,
        index_merge_fanin: 2,
        ..Options::default()
    }
}

/// A small workload touching every sync point kind: appends, group commits, seals, index
/// writes and merges, reopen. Returns the blobs acknowledged before the storage failed.
fn workload(sim: &SimStorage) -> Vec<Vec<u8>> {
    let mut acked = Vec::new();
    let dir = Path::new("/data");
    for round in 0..2u64 {
        let Ok(store) = Store::open_on(Arc::new(sim.clone()), dir, small_opts()) else {
            return acked;
        };
        for i in 0..6u64 {
            let data = match i % 3 {
                0 => seeded(90_000 + (i as usize) * 7000, round * 100 + i),
                1 => tar(
                    &[
                        ("a".into(), seeded(70_000, i)),
                        ("b".into(), vec![b'x'; 3000]),
                    ],
                    round * 10 + i,
                ),
                _ => acked.last().cloned().unwrap_or_else(|| seeded(10, 1)),
            };
            match store.put_blob(&data, None) {
                Ok(_) => acked.push(data),
                Err(_) => return acked,
            }
        }
        if round == 0 && store.close().is_err() {
            return acked;
        }
    }
    acked
}

#[test]
fn power_cut_at_every_sync_point() {
    let full = SimStorage::new();
    let all = workload(&full);
    assert_eq!(all.len(), 12);
    let points = full.sync_count();
    assert!(points > 20, "the workload has {points} sync points");
    for n in 1..=points {
        for torn in [None, Some(n * 7919)] {
            let sim = SimStorage::new();
            sim.crash_at_sync(n);
            let acked = workload(&sim);
            assert!(sim.has_crashed());
            let image = sim.crash_image(torn);
            let store = Store::open_on(Arc::new(image), Path::new("/data"), small_opts())
                .unwrap_or_else(|e| {
                    panic!("store must open after a cut at sync {n} (torn {torn:?}): {e}")
                });
            for data in &acked {
                let got = store
                    .read_blob(&sha256(data))
                    .unwrap_or_else(|e| panic!("acknowledged blob lost at sync {n}: {e}"));
                assert_eq!(&got, data);
            }
            // The store keeps working after recovery.
            store
                .put_blob(b"after recovery", None)
                .expect("write after recovery");
        }
    }
}

/// Child mode of [`sigkill_writer_repeatedly`]: writes blobs forever, printing each one
/// after its commit returned.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var("BALLAST_TEST_CHILD_DIR") else {
        return;
    };
    let start: u64 = std::env::var("BALLAST_TEST_CHILD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let store = Store::open(
        &dir,
        Options {
            segment_bytes_max: 2 << 20,
            ..Options::default()
        },
    )
    .expect("child open");
    let mut out = std::io::stdout().lock();
    for i in start.. {
        let len = 1000 + (i as usize * 7919) % 400_000;
        let data = seeded(len, i);
        store.put_blob(&data, None).expect("child put");
        use std::io::Write;
        writeln!(out, "ACK {i} {len}").expect("stdout");
        out.flush().expect("flush");
    }
}

#[test]
fn sigkill_writer_repeatedly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: Vec<(u64, usize)> = Vec::new();
    let mut seed = 0;
    for round in 0..6u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::child_writer",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BALLAST_TEST_CHILD_DIR", dir.path())
            .env("BALLAST_TEST_CHILD_SEED", seed.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let want = 20 + round * 13;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut got = 0;
        while got < want && Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ');
                let i: u64 = it.next().and_then(|s| s.parse().ok()).expect("index");
                let len: usize = it.next().and_then(|s| s.parse().ok()).expect("len");
                acked.push((i, len));
                seed = i + 1;
                got += 1;
            }
        }
        child.kill().expect("SIGKILL");
        // Acknowledgements printed before the kill landed count too.
        for line in lines.map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ');
                if let (Some(i), Some(len)) = (
                    it.next().and_then(|s| s.parse().ok()),
                    it.next().and_then(|s| s.parse().ok()),
                ) {
                    acked.push((i, len));
                    seed = i + 1;
                }
            }
        }
        child.wait().expect("reap");
        assert!(got > 0, "child acknowledged nothing in round {round}");
        let store = Store::open(dir.path(), Options::default()).expect("open after kill");
        for &(i, len) in &acked {
            let data = seeded(len, i);
            assert_eq!(
                store.read_blob(&sha256(&data)).expect("acknowledged blob"),
                data,
                "blob {i}"
            );
        }
    }
}
