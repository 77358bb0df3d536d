//! Reading ahead of a reader (docs/design.md, "Read path"). A blob's recipe says which
//! chunks come next and the index says where they are, so a reader can ask for them before
//! it needs them: the disk works while the reader verifies and sends what it has. Records
//! that lie close together in one segment are asked for as one span (fewer, larger reads).
//! Compaction reads its victims' live records the same way, in offset order.
//!
//! Two ways to ask, chosen by [`ReadAhead`]:
//! - `Advise`: `madvise(MADV_WILLNEED)` on the mapped span (or `posix_fadvise` on a file not
//!   mapped): the kernel reads the span into the page cache in the background and the
//!   reader then takes the chunk from the map, without a copy.
//! - `Uring`: each span is read through io_uring into a buffer of its own, up to
//!   [`DEPTH`] spans in flight; the reader takes the record from that buffer (one copy,
//!   as with `pread`). Spans with no buffer (a failed read) fall back to the map.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;

use bytes::Bytes;

use crate::digest::ChunkId;
use crate::index::Location;
use crate::io::FileHandle;
use crate::segment::RECORD_HEADER_LEN;
use crate::store::{SegmentData, Store};
use crate::sys::uring::UringReads;

/// How a reader asks for what it needs next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadAhead {
    /// Nothing ahead: every chunk is read when it is needed.
    Off,
    /// Page-cache read-ahead hints (`madvise`/`posix_fadvise` `WILLNEED`).
    Advise,
    /// Reads at queue depth through io_uring into buffers of the reader's own (where
    /// io_uring is not available, `Advise`).
    #[default]
    Uring,
}

impl FromStr for ReadAhead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(ReadAhead::Off),
            "advise" => Ok(ReadAhead::Advise),
            "uring" => Ok(ReadAhead::Uring),
            other => Err(format!(
                "read_ahead is \"{other}\"; use \"advise\", \"uring\" or \"off\""
            )),
        }
    }
}

impl ReadAhead {
    /// What this setting does on this machine: `Uring` where io_uring cannot be set up
    /// (an old kernel, a seccomp profile that forbids it) is `Advise`.
    pub fn effective(self) -> ReadAhead {
        match self {
            ReadAhead::Uring if !uring_available() => ReadAhead::Advise,
            m => m,
        }
    }

    /// The name used in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            ReadAhead::Off => "off",
            ReadAhead::Advise => "advise",
            ReadAhead::Uring => "uring",
        }
    }
}

/// Whether this process can set up an io_uring queue (asked once).
pub fn uring_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| UringReads::new(1).is_ok())
}

/// How far ahead of its position a blob reader keeps asking.
pub(crate) const AHEAD_BYTES: u64 = 8 << 20;
/// Blobs smaller than this are read without read-ahead (manifests, configs).
pub(crate) const AHEAD_MIN_BLOB: u64 = 1 << 20;
/// How records are grouped into spans: records at most `gap` bytes apart in one segment
/// are asked for as one span, of at most `span` bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Reach {
    gap: u64,
    span: u64,
    /// A span that continues the one before is left to the kernel's read-around of the
    /// map (`Uring` reads only where a run starts); otherwise it is read too.
    runs_from_map: bool,
}

/// A blob's chunks: the bytes between them belong to other blobs, so a span reads through
/// little of them.
pub(crate) const BLOB_REACH: Reach = Reach {
    gap: 64 << 10,
    span: 1 << 20,
    runs_from_map: true,
};
/// A compaction's live records: the bytes between them are dead records of the same
/// victim, and reading through them is cheaper than a read of its own for each run of live
/// ones; every span not in the page cache is read at queue depth, runs too (benchmarks.md,
/// issue #21 of 2026-12-04: the wider reach took a 116 MB copy from 227-269 ms to 172 ms,
/// and reading runs too gave 0.27-0.32x of the write speed against 0.19-0.20x).
pub(crate) const COPY_REACH: Reach = Reach {
    gap: 1 << 20,
    span: 4 << 20,
    runs_from_map: false,
};
/// io_uring reads in flight at once.
pub(crate) const DEPTH: u32 = 16;

/// A byte range of one segment covering one or more records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) segment: u64,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

fn record_end(loc: &Location) -> u64 {
    loc.offset + RECORD_HEADER_LEN as u64 + u64::from(loc.len)
}

/// Groups records, in the order given, into spans: a record joins the span before it when it
/// lies in the same segment, starts at most `reach.gap` past its end, and the span stays
/// within `reach.span`. Returns, for each record, the index of its span.
pub(crate) fn coalesce(locs: &[Location], reach: Reach) -> (Vec<Span>, Vec<usize>) {
    let mut spans: Vec<Span> = Vec::new();
    let mut of = Vec::with_capacity(locs.len());
    for loc in locs {
        let end = record_end(loc);
        match spans.last_mut() {
            Some(s)
                if s.segment == loc.segment
                    && loc.offset >= s.end
                    && loc.offset - s.end <= reach.gap
                    && end - s.start <= reach.span =>
            {
                s.end = end;
            }
            _ => spans.push(Span {
                segment: loc.segment,
                start: loc.offset,
                end,
            }),
        }
        of.push(spans.len() - 1);
    }
    (spans, of)
}

/// A record read ahead into a buffer, in the order it will be taken.
struct Asked {
    key: [u8; 32],
    loc: Location,
    /// The io_uring read holding it.
    read: u64,
}

/// A read's bytes once waited for, and how many asked records still need them.
struct SpanBytes {
    start: u64,
    bytes: Option<Bytes>,
    waiting: usize,
}

/// What one reader (a blob read, a compaction) has asked for.
pub(crate) struct Prefetcher {
    mode: ReadAhead,
    reach: Reach,
    asked: VecDeque<Asked>,
    reads: Option<UringReads>,
    spans: HashMap<u64, SpanBytes>,
    files: HashMap<u64, FileHandle>,
    /// The last span asked for: a span that continues it is part of a sequential run.
    last: Option<Span>,
}

impl Prefetcher {
    /// A reader that asks `mode`'s way, grouping records as `reach` says.
    pub(crate) fn new(mode: ReadAhead, reach: Reach) -> Self {
        Prefetcher {
            mode,
            reach,
            asked: VecDeque::new(),
            reads: None,
            spans: HashMap::new(),
            files: HashMap::new(),
            last: None,
        }
    }

    /// Asks for the records at `locs` (with their index keys), which will be taken in this
    /// order.
    pub(crate) fn ask(
        &mut self,
        store: &Store,
        keys: impl IntoIterator<Item = [u8; 32]>,
        locs: &[Location],
    ) {
        if self.mode == ReadAhead::Off || locs.is_empty() {
            return;
        }
        let (spans, of) = coalesce(locs, self.reach);
        let mut reads = Vec::with_capacity(spans.len());
        for span in &spans {
            let continues = self.last.is_some_and(|l| {
                l.segment == span.segment
                    && span.start >= l.end
                    && span.start - l.end <= self.reach.gap
            });
            self.last = Some(*span);
            // The kernel reads sequential runs of a map ahead by itself, in large pages;
            // asking for them again only costs. What it cannot guess is where the next run
            // starts.
            if continues && (self.reach.runs_from_map || self.mode != ReadAhead::Uring) {
                reads.push(None);
                continue;
            }
            reads.push(match self.mode {
                // A span already in the page cache is taken from the map: no copy, and a
                // server can send it from the file.
                ReadAhead::Uring => match store.segment_data_of(span.segment) {
                    Some(SegmentData::Mapped(map)) if resident(&map, span) => None,
                    _ => self.start_read(store, span),
                },
                _ => {
                    advise(store, span);
                    None
                }
            });
        }
        for ((key, loc), span) in keys.into_iter().zip(locs).zip(of) {
            let Some(t) = reads[span] else { continue };
            if let Some(s) = self.spans.get_mut(&t) {
                s.waiting += 1;
            }
            self.asked.push_back(Asked {
                key,
                loc: *loc,
                read: t,
            });
        }
    }

    fn start_read(&mut self, store: &Store, span: &Span) -> Option<u64> {
        if self.reads.is_none() {
            // Where io_uring is not available, fall back to hints.
            match UringReads::new(DEPTH) {
                Ok(r) => self.reads = Some(r),
                Err(_) => {
                    self.mode = ReadAhead::Advise;
                    advise(store, span);
                    return None;
                }
            }
        }
        let file = match self.files.get(&span.segment) {
            Some(f) => f.clone(),
            None => {
                if let Some(SegmentData::Remote(_)) = store.segment_data_of(span.segment) {
                    // Fetched by the remote store's own means, into its cache.
                    advise(store, span);
                    return None;
                }
                let f = store.segment_handle(span.segment).ok()?;
                self.files.insert(span.segment, f.clone());
                f
            }
        };
        let len = usize::try_from(span.end - span.start).ok()?;
        let token = self
            .reads
            .as_mut()?
            .start(file.file(), span.start, len)
            .ok()?;
        store
            .inner
            .stats
            .bytes_read_ahead
            .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
        self.spans.insert(
            token,
            SpanBytes {
                start: span.start,
                bytes: None,
                waiting: 0,
            },
        );
        Some(token)
    }

    /// The record of `key` (header and payload) and where it was read, when it was read
    /// ahead into a buffer of ours; `None` when the caller reads it itself (hinted only, or
    /// the read failed). The bytes are those of that place even if the record has moved
    /// since: a segment file never changes, and an open one stays readable. Records asked
    /// for before it and not taken are forgotten.
    pub(crate) fn take(&mut self, key: &[u8; 32]) -> Option<(Location, Bytes)> {
        let pos = self.asked.iter().position(|a| a.key == *key)?;
        let mut found = None;
        for _ in 0..=pos {
            let Some(a) = self.asked.pop_front() else {
                break;
            };
            let t = a.read;
            if a.key == *key {
                found = self.span_bytes(t).and_then(|(start, b)| {
                    let from = usize::try_from(a.loc.offset - start).ok()?;
                    let to = usize::try_from(record_end(&a.loc) - start).ok()?;
                    (to <= b.len()).then(|| (a.loc, b.slice(from..to)))
                });
            }
            if let Some(s) = self.spans.get_mut(&t) {
                s.waiting = s.waiting.saturating_sub(1);
                if s.waiting == 0 {
                    self.spans.remove(&t);
                }
            }
        }
        found
    }

    fn span_bytes(&mut self, token: u64) -> Option<(u64, Bytes)> {
        let s = self.spans.get_mut(&token)?;
        if s.bytes.is_none() {
            let got = self.reads.as_mut()?.wait(token).ok()?;
            s.bytes = Some(Bytes::from(got));
        }
        Some((s.start, s.bytes.clone()?))
    }
}

/// A thread that verifies the chunks a reader will need next, so the reader finds them
/// verified (verified.rs) and sends without hashing: the hashing of one stream runs on two
/// cores. It takes each window from its far end, the reader from its near end: they meet
/// in the middle, and a chunk the reader reaches first is not hashed twice. Dropping it
/// waits for the window in hand.
pub(crate) struct VerifyAhead {
    tx: Option<std::sync::mpsc::SyncSender<Vec<ChunkId>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VerifyAhead {
    /// A helper for `store`'s reader, where it can help: verification with reuse on and a
    /// second core.
    pub(crate) fn start(store: &Store) -> Option<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 || !store.verifies_ahead() {
            return None;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<ChunkId>>(2);
        let store = store.clone();
        let thread = std::thread::Builder::new()
            .name("verify-ahead".into())
            .spawn(move || {
                for window in rx {
                    for id in window.iter().rev() {
                        store.verify_ahead(id);
                    }
                }
            })
            .ok()?;
        Some(VerifyAhead {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over the next window; skipped when the helper is still two windows behind.
    pub(crate) fn ask(&self, ids: Vec<ChunkId>) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(ids);
        }
    }
}

impl Drop for VerifyAhead {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Span {
    /// Its start and length as offsets into a map (none past the address space).
    fn in_map(&self) -> Option<(usize, usize)> {
        Some((
            usize::try_from(self.start).ok()?,
            usize::try_from(self.end - self.start).ok()?,
        ))
    }
}

fn resident(map: &crate::sys::Map, span: &Span) -> bool {
    span.in_map()
        .is_some_and(|(start, len)| map.resident(start, len))
}

fn advise(store: &Store, span: &Span) {
    let Some((start, len)) = span.in_map() else {
        return;
    };
    match store.segment_data_of(span.segment) {
        Some(SegmentData::Mapped(map)) => map.will_need(start, len),
        Some(SegmentData::File(file)) => file.will_need(span.start, span.end - span.start),
        Some(SegmentData::Remote(_)) => store.prefetch_remote(span.segment, span.start, len),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(segment: u64, offset: u64, len: u32) -> Location {
        Location {
            segment,
            offset,
            len,
            aux: 0,
        }
    }

    #[test]
    fn neighbours_in_one_segment_share_a_span_within_the_limits() {
        let h = RECORD_HEADER_LEN as u64;
        const GAP_MAX: u64 = BLOB_REACH.gap;
        const SPAN_MAX: u64 = BLOB_REACH.span;
        let locs = [
            loc(1, 100, 1000),
            loc(1, 100 + h + 1000, 500),              // adjacent
            loc(1, 100 + 2 * h + 1500 + GAP_MAX, 10), // a gap of GAP_MAX: joins
            loc(2, 0, 10),                            // another segment
            loc(2, 5000 + GAP_MAX, 10),               // a gap too wide
            loc(2, 0, 10),                            // backwards: its own span
        ];
        let (spans, of) = coalesce(&locs, BLOB_REACH);
        assert_eq!(of, vec![0, 0, 0, 1, 2, 3]);
        assert_eq!(spans[0].start, 100);
        assert_eq!(spans[0].end, record_end(&locs[2]));
        // A span never grows past SPAN_MAX.
        let big: Vec<Location> = (0..40)
            .map(|i| loc(3, i * (h + 100_000), 100_000))
            .collect();
        let (spans, _) = coalesce(&big, BLOB_REACH);
        assert!(spans.iter().all(|s| s.end - s.start <= SPAN_MAX));
        assert_eq!(spans.len(), 4);
    }

    #[test]
    fn the_configuration_names_round_trip() {
        for m in [ReadAhead::Off, ReadAhead::Advise, ReadAhead::Uring] {
            assert_eq!(m.name().parse::<ReadAhead>(), Ok(m));
        }
        assert!("fast".parse::<ReadAhead>().is_err());
    }
}
