use super::snapshot::{read_snapshot, write_snapshot};
use super::*;
use crate::digest::Algorithm;
use crate::io::SimStorage;
use crate::segment::{self, file_header_versioned, JOURNAL_MAGIC};

fn link() -> ManifestLink {
    ManifestLink {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: 10,
        artifact_type: None,
        annotations: BTreeMap::new(),
        subject: None,
        references: vec![],
        pushed_at: 1,
        origin: None,
    }
}

#[test]
fn batches_survive_reopen_and_folding() {
    let sim = SimStorage::new();
    let dir = Path::new("/c");
    let d = |i: u32| Digest::of(Algorithm::Sha256, &i.to_le_bytes());
    {
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 64 << 10).expect("open");
        for i in 0..3000u32 {
            let repo = format!("r{}", i % 7);
            c.commit(vec![
                Op::PutManifest {
                    repo: repo.clone(),
                    digest: d(i),
                    link: link(),
                },
                Op::Tag {
                    repo,
                    tag: format!("t{}", i % 50),
                    digest: d(i),
                    at: 0,
                },
            ])
            .expect("commit");
        }
    }
    let c = Catalog::open(Arc::new(sim.crash_image(None)), dir).expect("reopen");
    let st = c.read();
    assert_eq!(st.repos.len(), 7);
    let last = (0..3000u32)
        .filter(|i| i % 7 == 0 && i % 50 == 49)
        .max()
        .expect("some");
    assert_eq!(st.repos["r0"].tags["t49"], d(last));
    let total: usize = st.repos.values().map(|r| r.manifests.len()).sum();
    assert_eq!(total, 3000);
    drop(st);
    let names = sim.crash_image(None).list(dir).expect("list");
    assert!(
        names.iter().any(|n| n.starts_with("snapshot-")),
        "{names:?}"
    );
}

/// Commits until the journal has been folded at least `folds` times; returns the state.
fn fold_times(c: &Catalog, folds: usize) -> State {
    let d = |i: u32| Digest::of(Algorithm::Sha256, &i.to_le_bytes());
    let mut i = 0u32;
    while c.appended.lock().journal.generation < folds as u64 {
        c.commit(vec![
            Op::PutManifest {
                repo: format!("r{}", i % 5),
                digest: d(i),
                link: link(),
            },
            Op::Tag {
                repo: format!("r{}", i % 5),
                tag: format!("t{i}"),
                digest: d(i),
                at: 0,
            },
        ])
        .expect("commit");
        i += 1;
    }
    // A batch in the newest journal too.
    c.commit(vec![tag("after-the-fold")]).expect("commit");
    c.read().clone()
}

fn generation_files(sim: &SimStorage, dir: &Path) -> Vec<String> {
    let mut names = sim.list(dir).expect("list");
    names.sort();
    names
}

/// #14 item 2: one flipped bit in the newest snapshot no longer makes the registry
/// unrecoverable. The generation before it (snapshot and journal) is kept until the next
/// fold, and the damaged snapshot is rebuilt from it at open, with a warning.
#[test]
fn a_damaged_snapshot_is_rebuilt_from_the_generation_before_it() {
    let sim = SimStorage::new();
    let dir = Path::new("/c");
    let before = {
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
        fold_times(&c, 3)
    };
    assert_eq!(
        generation_files(&sim, dir),
        vec![
            journal_name(2),
            journal_name(3),
            snapshot_name(2),
            snapshot_name(3)
        ],
        "the generation before the newest stays, older ones go"
    );
    let snap = dir.join(snapshot_name(3));
    sim.flip_bit(&snap, 200);
    let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("rebuilt");
    assert_eq!(*c.read(), before);
    assert_eq!(c.open_warnings().len(), 1, "{:?}", c.open_warnings());
    assert!(
        c.open_warnings()[0].contains("rebuilt"),
        "{:?}",
        c.open_warnings()
    );
    // Written again: the next open needs no rebuild.
    drop(c);
    let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("reopen");
    assert!(c.open_warnings().is_empty(), "{:?}", c.open_warnings());
    assert_eq!(*c.read(), before);
    // Both generations damaged: opening fails and says why, naming the file.
    drop(c);
    sim.flip_bit(&snap, 200);
    sim.flip_bit(&dir.join(snapshot_name(2)), 200);
    let err = Catalog::open_with(Arc::new(sim), dir, 16 << 10).expect_err("unrecoverable");
    assert!(err.is_corruption(), "{err}");
    assert!(err.to_string().contains(&snapshot_name(3)), "{err}");
}

/// Snapshots are written in sections (one record per repository): damage is located.
#[test]
fn damage_in_a_snapshot_names_its_section() {
    let sim = SimStorage::new();
    let dir = Path::new("/c");
    let state = {
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
        fold_times(&c, 1)
    };
    let path = dir.join("x.snp");
    write_snapshot(&sim, &path, &state).expect("write");
    assert_eq!(read_snapshot(&sim, &path).expect("read"), state);
    let file = FileHandle::open(&sim, &path, OpenMode::Read).expect("open");
    let size = file.len().expect("len") as usize;
    sim.flip_bit(&path, size - 10);
    let err = read_snapshot(&sim, &path).expect_err("damaged");
    assert!(err.to_string().contains("after repository"), "{err}");
}

/// Snapshots of format 1 (one record holding the whole state) are still read.
#[test]
fn a_format_1_snapshot_is_read() {
    let sim = SimStorage::new();
    let dir = Path::new("/c");
    let state = {
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
        fold_times(&c, 1)
    };
    let body = serde_json::to_vec(&state).expect("json");
    let mut v1 = segment::file_header(SNAPSHOT_MAGIC).to_vec();
    v1.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&body]));
    v1.extend_from_slice(&body);
    let path = dir.join("v1.snp");
    let f = FileHandle::open(&sim, &path, OpenMode::Truncate).expect("create");
    f.write_all_at(&v1, 0).expect("write");
    assert_eq!(read_snapshot(&sim, &path).expect("read"), state);
}

/// #14 item 6: a journal newer than every snapshot is set aside when it holds no batch
/// (a stray), and named when it does.
#[test]
fn a_stray_journal_is_set_aside_and_one_with_batches_is_named() {
    let sim = SimStorage::new();
    let dir = Path::new("/c");
    {
        let c = Catalog::open(Arc::new(sim.clone()), dir).expect("open");
        c.commit(vec![tag("v1")]).expect("commit");
    }
    let stray = dir.join(journal_name(5));
    let f = FileHandle::open(&sim, &stray, OpenMode::Truncate).expect("create");
    f.write_all_at(&file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION), 0)
        .expect("header");
    let c = Catalog::open(Arc::new(sim.clone()), dir).expect("opens");
    assert_eq!(tags(&c), vec!["v1".to_owned()]);
    assert!(
        c.open_warnings()
            .iter()
            .any(|w| w.contains(&journal_name(5)) && w.contains("set aside")),
        "{:?}",
        c.open_warnings()
    );
    drop(c);
    assert!(sim
        .list(dir)
        .expect("list")
        .contains(&format!("{}.stray", journal_name(5))));
    // One holding batches is acknowledged data without its snapshot: named, not hidden.
    let batch = serde_json::to_vec(&vec![tag("v2")]).expect("json");
    let mut bytes = file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION).to_vec();
    bytes.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&batch]));
    bytes.extend_from_slice(&batch);
    let f = FileHandle::open(&sim, &dir.join(journal_name(7)), OpenMode::Truncate).expect("create");
    f.write_all_at(&bytes, 0).expect("write");
    let err = Catalog::open(Arc::new(sim), dir).expect_err("refused");
    assert!(err.to_string().contains(&journal_name(7)), "{err}");
}

fn tag(name: &str) -> Op {
    Op::Tag {
        repo: "a".into(),
        tag: name.into(),
        digest: Digest::of(Algorithm::Sha256, b"x"),
        at: 0,
    }
}

fn tags(c: &Catalog) -> Vec<String> {
    c.read()
        .repos
        .get("a")
        .map(|r| r.tags.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn a_failed_fsync_poisons_the_catalog() {
    let sim = SimStorage::new();
    let c = Catalog::open(Arc::new(sim.clone()), Path::new("/c")).expect("open");
    c.commit(vec![tag("t0")]).expect("commit");
    sim.fail_syncs();
    assert!(c.commit(vec![tag("t1")]).is_err());
    // The device recovers, but the kernel may have dropped the failed batch's pages: a
    // later fsync would say nothing about them, so nothing more is committed.
    sim.heal_syncs();
    let e = c.commit(vec![tag("t2")]).expect_err("poisoned");
    assert!(matches!(e, Error::Poisoned(_)), "{e}");
    assert!(e.to_string().contains("simulated sync failure"), "{e}");
    assert_eq!(tags(&c), ["t0"], "nothing unacknowledged is visible");
    drop(c);
    let c = Catalog::open(Arc::new(sim), Path::new("/c")).expect("reopen");
    c.commit(vec![tag("t3")])
        .expect("a reopened catalog commits again");
}

#[test]
fn concurrent_commits_each_see_every_batch_before_them() {
    // Each commit names its tag after how many tags its plan sees: if two plans saw the
    // same state (a batch appended but not yet synced left out), two commits would pick
    // the same name and fewer tags than commits would remain.
    let sim = SimStorage::new();
    let c = Catalog::open_with(Arc::new(sim.clone()), Path::new("/c"), 4096).expect("open");
    let (threads, each) = (8, 40);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..each {
                    c.commit_with(None, |state| {
                        let n = state.repos.get("a").map_or(0, |r| r.tags.len());
                        Ok::<_, Error>((vec![tag(&format!("t{n:05}"))], ()))
                    })
                    .expect("commit");
                }
            });
        }
    });
    let want: Vec<String> = (0..threads * each).map(|n| format!("t{n:05}")).collect();
    assert_eq!(tags(&c), want);
    // Folding kept up: the journal is near its bound, not the size of 320 batches.
    let journal = sim
        .list(Path::new("/c"))
        .expect("list")
        .into_iter()
        .find(|n| n.starts_with("journal-"))
        .expect("journal");
    let path = Path::new("/c").join(journal);
    let len = sim
        .open(&path, OpenMode::Read)
        .expect("journal")
        .len()
        .expect("len");
    assert!(len < 2 * 4096, "journal of {len} bytes");
    drop(c);
    // Small journal bound: folds happened along the way, and nothing was lost by them.
    let c = Catalog::open(Arc::new(sim), Path::new("/c")).expect("reopen");
    assert_eq!(tags(&c), want);
}

#[test]
fn power_cut_during_concurrent_commits_keeps_every_acknowledged_batch() {
    // Batches appended while another commit's fsync runs, and the sync marks placed
    // around them: after a cut at any sync point the catalog opens, and every commit
    // that returned is there.
    let run = |sim: &SimStorage| -> Vec<String> {
        let Ok(c) = Catalog::open_with(Arc::new(sim.clone()), Path::new("/c"), 16 << 10) else {
            return Vec::new();
        };
        let acked = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..4 {
                let (c, acked) = (&c, &acked);
                s.spawn(move || {
                    for i in 0..40 {
                        let name = format!("t{t}-{i:02}");
                        if c.commit(vec![tag(&name)]).is_err() {
                            break;
                        }
                        acked.lock().push(name);
                    }
                });
            }
        });
        acked.into_inner()
    };
    after_every_cut(run, 160, |n, c, acked| {
        let have = tags(&c);
        for name in &acked {
            assert!(
                have.contains(name),
                "cut at sync {n}: {name} acknowledged, lost"
            );
        }
    });
}

/// Runs `run` to the end (`acked` commits must be acknowledged), then once cut at each
/// of its sync points (durable bytes only, and with some unsynced pages kept): the
/// catalog opens after every cut, and `check` sees it with the tags that run committed.
fn after_every_cut(
    run: impl Fn(&SimStorage) -> Vec<String>,
    acked: usize,
    check: impl Fn(u64, Catalog, Vec<String>),
) {
    let full = SimStorage::new();
    assert_eq!(run(&full).len(), acked);
    for n in 1..=full.sync_count() {
        for torn in [None, Some(n)] {
            let sim = SimStorage::new();
            sim.crash_at_sync(n);
            let got = run(&sim);
            let c = Catalog::open(Arc::new(sim.crash_image(torn)), Path::new("/c"))
                .unwrap_or_else(|e| panic!("cut at sync {n}: {e}"));
            check(n, c, got);
        }
    }
}

#[test]
fn power_cut_keeps_every_acknowledged_batch() {
    let run = |sim: &SimStorage| -> Vec<String> {
        let Ok(c) = Catalog::open(Arc::new(sim.clone()), Path::new("/c")) else {
            return Vec::new();
        };
        let mut acked = Vec::new();
        for i in 0..20u32 {
            let name = format!("t{i}");
            if c.commit(vec![tag(&name)]).is_err() {
                break;
            }
            acked.push(name);
        }
        acked
    };
    after_every_cut(run, 20, |n, c, acked| {
        let (tags, acked) = (
            c.read().repos.get("a").map_or(0, |r| r.tags.len()),
            acked.len(),
        );
        assert!(
            tags >= acked,
            "cut at {n}: {tags} tags, {acked} acknowledged"
        );
    });
}
