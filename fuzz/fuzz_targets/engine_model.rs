//! Model-based: random engine operations (put, link, unlink, read, GC, reopen) on a simulated
//! disk, checked against an in-memory model. A linked blob always reads back byte-exact; a
//! blob stored since the last collection does too; links survive reopen and collection.
#![no_main]
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use ballast_engine::catalog::Op;
use ballast_engine::gc::{collect, GcOptions};
use ballast_engine::io::SimStorage;
use ballast_engine::{Algorithm, Digest, Options, Store};
use libfuzzer_sys::fuzz_target;

fn blob(k: u8) -> Vec<u8> {
    let len = 1 + (usize::from(k) * 7919) % 70_000;
    let mut s = u64::from(k) * 0x9E37_79B9_7F4A_7C15 | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Some repetition so chunks are shared between blobs.
            (s % 7) as u8
        })
        .collect()
}

fn opts() -> Options {
    Options {
        segment_bytes_max: 128 * 1024,
        index_merge_fanin: 2,
        ..Options::default()
    }
}

fuzz_target!(|ops: Vec<(u8, u8)>| {
    let sim = Arc::new(SimStorage::new());
    let dir = Path::new("/data");
    let mut store = Store::open_on(sim.clone(), dir, opts()).expect("open");
    let mut stored: BTreeMap<u8, Digest> = BTreeMap::new();
    let mut linked: BTreeSet<u8> = BTreeSet::new();
    let now = ballast_engine::clock::now_secs();
    for (op, arg) in ops.into_iter().take(48) {
        let k = arg % 12;
        match op % 6 {
            0 => {
                let c = store.put_blob(&blob(k), None).expect("put");
                assert_eq!(c.recipe.digest, Digest::of(Algorithm::Sha256, &blob(k)));
                stored.insert(k, c.recipe.digest.clone());
            }
            1 => {
                if let Some(d) = stored.get(&k) {
                    let link = Op::LinkBlob {
                        repo: "r".into(),
                        digest: d.clone(),
                        // Linked "in the future": a link no manifest references is garbage
                        // once older than the grace period, and collections here use none.
                        at: now + 1_000_000,
                    };
                    store.commit_ops(vec![link]).expect("link");
                    linked.insert(k);
                }
            }
            2 => {
                if linked.remove(&k) {
                    let d = stored[&k].clone();
                    let op = Op::UnlinkBlob {
                        repo: "r".into(),
                        digest: d,
                    };
                    store.commit_ops(vec![op]).expect("unlink");
                }
            }
            3 => {
                if let Some(d) = stored.get(&k) {
                    assert_eq!(store.read_blob(d).expect("stored blob"), blob(k));
                }
            }
            4 => {
                // A checkpoint seals the active segment (as a shipment to a bucket does), and
                // a collection may fold the small segments that leaves.
                if arg & 0x40 != 0 {
                    drop(store.checkpoint().expect("checkpoint"));
                }
                let gc = GcOptions {
                    grace_secs: 0,
                    dead_fraction_min: 0.1,
                    fold_below_bytes: if arg & 0x80 != 0 { 64 * 1024 } else { 0 },
                    ..GcOptions::default()
                };
                collect(&store, &gc, now + 10).expect("gc");
                // Only linked blobs are promised now.
                stored.retain(|k, _| linked.contains(k));
            }
            _ => {
                store.close().expect("close");
                store = Store::open_on(sim.clone(), dir, opts()).expect("reopen");
            }
        }
        for k in &linked {
            let state = store.catalog().read();
            assert!(state.repos.get("r").is_some_and(|r| r.blobs.contains_key(&stored[k])));
        }
    }
    for (k, d) in &stored {
        assert_eq!(store.read_blob(d).expect("promised blob"), blob(*k));
    }
    let report = ballast_engine::verify::fsck(&store, &|_, _, _| {});
    assert!(report.is_clean(), "{:?}", report.findings);
});
