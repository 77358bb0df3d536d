use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::io::SimStorage;

const DATA: &str = "/d";

fn open(sim: &SimStorage, bytes_max: u64) -> Outbox {
    Outbox::open(Arc::new(sim.clone()), Path::new(DATA), bytes_max).expect("open")
}

fn payloads(o: &Outbox, consumer: &str) -> Vec<Vec<u8>> {
    let from = o.cursor(consumer).expect("cursor");
    o.read(consumer, from, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|e| e.payload)
        .collect()
}

#[test]
fn consumers_read_from_their_cursor_and_files_go_once_everyone_is_past() {
    let sim = SimStorage::new();
    let o = open(&sim, 0);
    o.set_consumers(&["a", "b"]).expect("consumers");
    let big = vec![7u8; 300 << 10];
    let mut last = 0;
    for i in 0..40u8 {
        let mut p = big.clone();
        p[0] = i;
        last = o
            .append(&[(None, &p)], 100 + u64::from(i), true)
            .expect("append");
    }
    assert_eq!(last, 40);
    let files = |o: &Outbox| o.state.lock().files.len();
    assert!(files(&o) >= 3, "{} files", files(&o));
    let got = o.read("a", 1, 5).expect("read");
    assert_eq!(
        got.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(got[2].payload[0], 2);
    assert_eq!(got[2].at, 102);
    // Only when both are past a file does it go.
    o.ack("a", 41).expect("ack");
    let before = files(&o);
    assert_eq!(before, files(&o));
    o.ack("b", 30).expect("ack");
    assert!(files(&o) < before);
    assert_eq!(payloads(&o, "b").len(), 11);
    assert!(payloads(&o, "a").is_empty());
    // Cursors survive a restart; so do the events.
    drop(o);
    let o = open(&sim.crash_image(None), 0);
    assert_eq!(o.cursor("b"), Some(30));
    assert_eq!(payloads(&o, "b").len(), 11);
    assert_eq!(o.append(&[(None, b"next")], 1, true).expect("append"), 41);
}

#[test]
fn a_durable_append_survives_a_power_cut_and_a_torn_one_is_cut_off() {
    for seed in 0..20 {
        let sim = SimStorage::new();
        let o = open(&sim, 0);
        o.set_consumers(&["a"]).expect("consumers");
        o.append(&[(None, b"one"), (None, b"two")], 1, true)
            .expect("append");
        // Not synced: may or may not survive, but never half.
        o.append(&[(None, &vec![3u8; 10_000])], 2, false)
            .expect("append");
        let image = sim.crash_image(Some(seed));
        let o = open(&image, 0);
        let got = payloads(&o, "a");
        assert!(got.len() == 2 || got.len() == 3, "{seed}: {}", got.len());
        assert_eq!(got[..2], [b"one".to_vec(), b"two".to_vec()]);
        if got.len() == 3 {
            assert_eq!(got[2], vec![3u8; 10_000]);
        }
        // The next append follows what is there, and fsck finds nothing wrong after it.
        let seq = o.append(&[(None, b"after")], 3, true).expect("append");
        assert_eq!(seq, got.len() as u64 + 1);
        assert_eq!(
            payloads(&o, "a").last().map(Vec::as_slice),
            Some(&b"after"[..])
        );
        let problems = Outbox::verify(&image, Path::new(DATA)).expect("verify");
        assert!(problems.is_empty(), "{problems:?}");
    }
}

#[test]
fn a_damaged_event_is_reported_and_skipped_and_the_rest_are_kept() {
    let sim = SimStorage::new();
    let o = open(&sim, 0);
    o.set_consumers(&["a"]).expect("consumers");
    o.append(&[(None, b"first event"), (None, b"second event")], 1, true)
        .expect("append");
    let path = outbox_dir(Path::new(DATA)).join(file_name(1));
    sim.flip_bit(&path, FILE_HEADER_LEN + segment::RECORD_HEADER_LEN + 20);
    let problems = Outbox::verify(&sim, Path::new(DATA)).expect("verify");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].0 && problems[0].1.contains("events lost"),
        "{problems:?}"
    );
    let o = open(&sim, 0);
    assert_eq!(o.open_warnings().len(), 1, "{:?}", o.open_warnings());
    assert_eq!(payloads(&o, "a"), [b"second event".to_vec()]);
    assert_eq!(o.stats().dropped, 1);
    // Appends go on after the last valid record.
    assert_eq!(o.append(&[(None, b"third")], 2, true).expect("append"), 3);
    assert_eq!(payloads(&o, "a").len(), 2);
}

#[test]
fn the_bound_drops_the_oldest_files_and_counts_what_a_consumer_missed() {
    let sim = SimStorage::new();
    let o = open(&sim, 9 << 20);
    o.set_consumers(&["slow"]).expect("consumers");
    let p = vec![1u8; 512 << 10];
    for _ in 0..40 {
        o.append(&[(None, &p)], 1, true).expect("append");
    }
    let s = o.stats();
    assert!(s.bytes <= (9 << 20) + FILE_BYTES, "{} bytes", s.bytes);
    assert!(s.dropped > 0);
    let cursor = o.cursor("slow").expect("cursor");
    assert_eq!(
        s.dropped,
        cursor - 1,
        "every event before the cursor was dropped"
    );
    let left = payloads(&o, "slow").len() as u64;
    assert_eq!(left + s.dropped, 40);
}

#[test]
fn targets_dead_letters_and_redelivery() {
    let sim = SimStorage::new();
    let o = open(&sim, 0);
    o.set_consumers(&["a", "b"]).expect("consumers");
    o.append(&[(None, b"for all"), (Some("b"), b"for b")], 1, true)
        .expect("append");
    assert_eq!(payloads(&o, "a"), [b"for all".to_vec()]);
    assert_eq!(payloads(&o, "b"), [b"for all".to_vec(), b"for b".to_vec()]);
    let e = o.read("a", 1, 1).expect("read").remove(0);
    o.bury("a", &e, "HTTP 500 after 9 attempts", 50)
        .expect("bury");
    o.ack("a", 3).expect("ack");
    let dead = o.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "HTTP 500 after 9 attempts");
    // Dead letters survive a restart.
    let sim = sim.crash_image(None);
    let o = open(&sim, 0);
    assert_eq!(o.dead_letters(), dead);
    assert_eq!(o.redeliver(Some(&[999]), 60).expect("none"), 0);
    assert_eq!(o.redeliver(None, 60).expect("redeliver"), 1);
    assert!(o.dead_letters().is_empty());
    // Only "a" gets the redelivered event.
    assert_eq!(payloads(&o, "a"), [b"for all".to_vec()]);
    let b = payloads(&o, "b");
    assert_eq!(b.len(), 2, "b does not get a's redelivery: {b:?}");
    let o = open(&sim.crash_image(None), 0);
    assert!(o.dead_letters().is_empty());
}

#[test]
fn a_new_consumer_starts_at_the_end_and_a_gone_one_holds_nothing() {
    let sim = SimStorage::new();
    let o = open(&sim, 0);
    o.set_consumers(&["old"]).expect("consumers");
    for _ in 0..20 {
        o.append(&[(None, &vec![0u8; 400 << 10])], 1, true)
            .expect("append");
    }
    let files = o.state.lock().files.len();
    o.set_consumers(&["new"]).expect("consumers");
    assert_eq!(o.cursor("new"), Some(21));
    assert_eq!(o.cursor("old"), None);
    assert!(
        o.state.lock().files.len() < files,
        "old's events were compacted away"
    );
    assert!(payloads(&o, "new").is_empty());
}

#[test]
fn reads_from_any_sequence_number_find_the_same_events_with_or_without_marks() {
    let sim = SimStorage::new();
    let o = open(&sim, 0);
    o.set_consumers(&["a"]).expect("consumers");
    for i in 0..3000u32 {
        let p = format!("event {i} {}", "x".repeat(200));
        o.append(&[(None, p.as_bytes())], 1, true).expect("append");
    }
    // The same outbox opened again has no marks: it scans from each file's start.
    let cold = open(&sim.crash_image(None), 0);
    for from in [1, 2, 333, 1500, 2999, 3000, 3001] {
        let warm: Vec<u64> = o
            .read("a", from, 50)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        let want: Vec<u64> = (from..=3000).take(50).collect();
        assert_eq!(warm, want, "from {from}");
        let scanned: Vec<u64> = cold
            .read("a", from, 50)
            .expect("read")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(scanned, want, "from {from}, no marks");
    }
}
