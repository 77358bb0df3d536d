//! Crash safety: a simulated power cut at every sync point, and SIGKILL of a writer process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ballast_engine::storage::SimStorage;
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
                1 => tar::<String>(
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
/// after its commit returned. Runs only as that test's child process.
#[test]
#[ignore = "the child process of crash::sigkill_writer_repeatedly"]
fn child_writer() {
    let dir = std::env::var("BALLAST_TEST_CHILD_DIR")
        .expect("run by crash::sigkill_writer_repeatedly, which sets BALLAST_TEST_CHILD_DIR");
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
                "--ignored",
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

/// What a mixed workload had acknowledged when the storage failed: tags and the bytes of
/// the manifests and layers they reach, plus the one operation in flight (its effect may or
/// may not have survived).
#[derive(Default)]
struct Acked {
    tags: std::collections::BTreeMap<(String, String), ballast_engine::Digest>,
    bytes: std::collections::HashMap<ballast_engine::Digest, Vec<u8>>,
    layer_of: std::collections::HashMap<ballast_engine::Digest, ballast_engine::Digest>,
    in_flight: Option<((String, String), Option<ballast_engine::Digest>)>,
    /// Segments compacted by the collections that finished.
    compacted: u64,
}

/// Pushes (with dedup), tag moves, manifest deletes and garbage collections, across a close
/// and reopen; stops at the first failure (the power cut).
fn mixed_workload(sim: &SimStorage) -> Acked {
    use ballast_engine::catalog::Op;
    use ballast_engine::clock::now_secs;
    use ballast_engine::gc::{collect, GcOptions};
    let mut a = Acked::default();
    let dir = Path::new("/data");
    let gc = GcOptions {
        grace_secs: 0,
        dead_fraction_min: 0.1,
        delete_untagged: true,
        ..GcOptions::default()
    };
    let mut pushed: Vec<(String, ballast_engine::Digest)> = Vec::new();
    for round in 0..3u64 {
        let Ok(store) = Store::open_on(Arc::new(sim.clone()), dir, small_opts()) else {
            return a;
        };
        for step in 0..12u64 {
            let n = round * 12 + step;
            let repo = format!("r{}", n % 2);
            match step % 6 {
                0..=2 => {
                    // A push: the layer (every third one a duplicate of an earlier layer), its
                    // link, then a manifest tagged t<n % 3>.
                    let base = if n % 3 == 2 { n - 2 } else { n };
                    let layer = seeded(60_000 + (base as usize) * 1_000, base);
                    let tag = format!("t{}", n % 3);
                    let key = (repo.clone(), tag.clone());
                    let ld = sha256(&layer);
                    let link = Op::LinkBlob {
                        repo: repo.clone(),
                        digest: ld.clone(),
                        at: now_secs(),
                    };
                    if store.put_blob(&layer, None).is_err()
                        || store.commit_ops(vec![link]).is_err()
                    {
                        return a;
                    }
                    a.in_flight = Some((key.clone(), None));
                    match crate::gc::try_publish(&store, &repo, &tag, &ld) {
                        Ok((md, bytes)) => {
                            a.bytes.insert(md.clone(), bytes);
                            a.bytes.insert(ld.clone(), layer);
                            a.layer_of.insert(md.clone(), ld);
                            a.tags.insert(key, md.clone());
                            pushed.push((repo, md));
                            a.in_flight = None;
                        }
                        Err(_) => return a,
                    }
                }
                3 => {
                    // Move t0 of r0 to its first manifest.
                    let repo = "r0".to_owned();
                    let Some((_, md)) = pushed.iter().find(|(r, _)| *r == repo).cloned() else {
                        continue;
                    };
                    let key = (repo.clone(), "t0".to_owned());
                    a.in_flight = Some((key.clone(), Some(md.clone())));
                    let op = Op::Tag {
                        repo: repo.clone(),
                        tag: "t0".into(),
                        digest: md.clone(),
                        at: 0,
                    };
                    if store.commit_ops(vec![op]).is_err() {
                        return a;
                    }
                    a.tags.insert(key, md);
                    a.in_flight = None;
                }
                4 => {
                    // Delete the manifest r1:t1 points at (its tags go with it).
                    let repo = "r1".to_owned();
                    let key = (repo.clone(), "t1".to_owned());
                    let Some(md) = a.tags.get(&key).cloned() else {
                        continue;
                    };
                    let gone: Vec<(String, String)> = a
                        .tags
                        .iter()
                        .filter(|(k, d)| k.0 == repo && **d == md)
                        .map(|(k, _)| k.clone())
                        .collect();
                    a.in_flight = Some((key, None));
                    let op = Op::DeleteManifest {
                        repo: repo.clone(),
                        digest: md,
                    };
                    if store.commit_ops(vec![op]).is_err() {
                        return a;
                    }
                    for k in gone {
                        a.tags.remove(&k);
                    }
                    a.in_flight = None;
                }
                _ => match collect(&store, &gc, now_secs() + 1) {
                    Ok(r) => a.compacted += r.segments_compacted,
                    Err(_) => return a,
                },
            }
        }
        if round < 2 && store.close().is_err() {
            return a;
        }
    }
    a
}

/// Checks a recovered store against what was acknowledged.
fn check_recovered(store: &Store, a: &Acked, at: &str) {
    let state = store.catalog().read().clone();
    let tag_of = |k: &(String, String)| {
        state
            .repos
            .get(&k.0)
            .and_then(|r| r.tags.get(&k.1))
            .cloned()
    };
    for (k, want) in &a.tags {
        let got = tag_of(k);
        let in_flight = a.in_flight.as_ref().filter(|(key, _)| key == k);
        let ok = got.as_ref() == Some(want)
            || in_flight.is_some_and(|(_, alt)| got == *alt || got.is_none());
        assert!(ok, "{at}: tag {k:?} is {got:?}, acknowledged {want}");
    }
    // Every manifest a tag reaches now, and its layer, reads back byte-exact.
    for (name, repo) in &state.repos {
        for (tag, md) in &repo.tags {
            if let Some(bytes) = a.bytes.get(md) {
                let got = store
                    .read_blob(md)
                    .unwrap_or_else(|e| panic!("{at}: manifest of {name}:{tag} lost: {e}"));
                assert_eq!(&got, bytes, "{at}");
                let ld = &a.layer_of[md];
                let layer = store
                    .read_blob(ld)
                    .unwrap_or_else(|e| panic!("{at}: layer of {name}:{tag} lost: {e}"));
                assert_eq!(&layer, &a.bytes[ld], "{at}");
            }
        }
    }
    let report = ballast_engine::verify::fsck(store, &|_, _, _| {});
    assert!(report.is_clean(), "{at}: fsck: {:?}", report.findings);
}

#[test]
fn power_cut_during_pushes_tag_moves_deletes_and_gc() {
    let full = SimStorage::new();
    let all = mixed_workload(&full);
    assert!(
        all.in_flight.is_none() && all.tags.len() >= 2,
        "{:?}",
        all.tags
    );
    assert!(all.compacted > 0, "the collections compacted nothing");
    let points = full.sync_count();
    assert!(points > 60, "the workload has {points} sync points");
    // Every sync point, clean and with a torn tail of unsynced pages.
    let mut cuts = 0;
    for n in 1..=points {
        for torn in [None, Some(n * 104_729)] {
            let sim = SimStorage::new();
            sim.crash_at_sync(n);
            let acked = mixed_workload(&sim);
            assert!(sim.has_crashed());
            let image = sim.crash_image(torn);
            let at = format!("cut at sync {n} (torn {torn:?})");
            let store = Store::open_on(Arc::new(image), Path::new("/data"), small_opts())
                .unwrap_or_else(|e| panic!("{at}: store must open: {e}"));
            check_recovered(&store, &acked, &at);
            cuts += 1;
        }
    }
    eprintln!("mixed workload: {points} sync points, {cuts} power cuts");
    assert!(cuts > 200, "{cuts} power cuts");
}
