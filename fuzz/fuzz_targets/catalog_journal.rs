//! Catalog journal replay on damaged journals: a journal of a few committed batches gets
//! bytes flipped and its tail cut; opening never panics, and a catalog that opens holds the
//! state after some prefix of the committed batches (never a mix, never an invented op).
#![no_main]
use std::path::Path;
use std::sync::Arc;

use ballast_engine::catalog::{Catalog, Op, State};
use ballast_engine::io::{OpenMode, SimStorage, Storage};
use ballast_engine::Digest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, Vec<(u16, u8)>, Option<u16>)| {
    let (batches, flips, cut) = input;
    let sim = Arc::new(SimStorage::new());
    let dir = Path::new("/cat");
    let mut states = vec![State::default()];
    {
        let cat = Catalog::open(sim.clone(), dir).expect("open");
        for b in 0..(batches % 8) {
            let d = Digest::of(ballast_engine::Algorithm::Sha256, &[b]);
            let ops = vec![
                Op::LinkBlob {
                    repo: format!("r{}", b % 3),
                    digest: d.clone(),
                    at: u64::from(b),
                },
                if b % 2 == 0 {
                    Op::UnlinkBlob {
                        repo: "r0".into(),
                        digest: d,
                    }
                } else {
                    Op::Untag {
                        repo: "r1".into(),
                        tag: "t".into(),
                    }
                },
            ];
            cat.commit(ops).expect("commit");
            states.push(cat.read().clone());
        }
    }
    let names = sim.list(dir).expect("list");
    let Some(journal) = names.iter().find(|n| n.ends_with(".jnl")) else {
        return;
    };
    let path = dir.join(journal);
    let file = sim.open(&path, OpenMode::ReadWrite).expect("journal");
    let len = file.len().expect("len");
    for (at, x) in flips {
        if len > 0 {
            let at = u64::from(at) % len;
            let mut b = [0u8];
            file.read_exact_at(&mut b, at).expect("read");
            file.write_all_at(&[b[0] ^ x], at).expect("write");
        }
    }
    if let Some(c) = cut {
        file.set_len(u64::from(c).min(len)).expect("cut");
    }
    file.sync().expect("sync");
    drop(file);
    if let Ok(cat) = Catalog::open(sim.clone(), dir) {
        let got = cat.read().clone();
        assert!(
            states.contains(&got),
            "replay produced a state no prefix of the committed batches has"
        );
    }
});
