//! Multi-member gzip streams (eStargz layers: one gzip member per file, or per 4 MiB of a big
//! file, and a table of contents at the end): where each member ends. Unlike a zstd frame, a
//! gzip member does not say how long it is: its end is found by inflating it, so a scan runs
//! ahead of the cuts, feeding on the bytes as they arrive, and keeps the member ends it finds.
//! An unchanged file is then an unchanged member, and with cuts at member ends an unchanged
//! chunk.
//!
//! The scan costs an inflate of the stream. An ordinary gzip layer is a single member: when
//! the first member runs past [`PROBE_BYTES`] of input the scan stops for good (at most that
//! much is inflated for nothing). Bytes that are not a gzip member where one should start
//! (trailing data, a damaged or crafted stream, a header longer than [`HEADER_MAX`]) also stop
//! it; cutting goes on as plain CDC. Everything the scan decides depends on the stream's bytes
//! alone, never on how they arrive.

use std::collections::VecDeque;

use flate2::{Decompress, FlushDecompress, Status};

/// A first member longer than this (compressed bytes) is an ordinary gzip stream. eStargz
/// starts a member at each file and at each 4 MiB of a big file's data, so its members are
/// shorter.
pub const PROBE_BYTES: u64 = 5 << 20;
/// The longest member header read (a name or comment without its end is no gzip header).
pub const HEADER_MAX: usize = 64 << 10;
/// The gzip trailer: CRC-32 and length.
const TRAILER: u64 = 8;

/// True when `b` starts like a gzip member (magic and the deflate method).
pub fn starts_gzip(b: &[u8]) -> bool {
    b.len() >= 3 && b[0] == 0x1f && b[1] == 0x8b && b[2] == 8
}

/// What the scan reads next.
enum Phase {
    /// A member header, its bytes so far.
    Header(Vec<u8>),
    /// Deflate data.
    Deflate,
    /// The trailer, bytes of it left.
    Trailer(u64),
    /// Stopped: no more member ends will be found.
    Done,
}

/// The scan of a gzip stream, and the cut position it serves.
pub struct Scan {
    inflate: Decompress,
    phase: Phase,
    /// Stream bytes scanned.
    scanned: u64,
    /// Where the member being scanned starts.
    member_start: u64,
    /// Members ended so far.
    members: u64,
    /// Member ends found and not yet passed by the cuts.
    ends: VecDeque<u64>,
    /// Where the next cut starts.
    pub(super) cut_at: u64,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("gzip::Scan")
            .field("scanned", &self.scanned)
            .field("members", &self.members)
            .field("cut_at", &self.cut_at)
            .finish()
    }
}

/// The length of a complete gzip member header at the start of `h`, `Some(None)` when more
/// bytes are needed, `None` when it is not one.
fn header_len(h: &[u8]) -> Option<Option<usize>> {
    if h.len() < 10 {
        // The start of a header so far, or not one.
        let n = h.len().min(3);
        return (h[..n] == [0x1f, 0x8b, 8][..n]).then_some(None);
    }
    if !starts_gzip(h) {
        return None;
    }
    let flags = h[3];
    if flags & 0xE0 != 0 {
        return None; // reserved bits
    }
    let mut at = 10;
    if flags & 0x04 != 0 {
        // FEXTRA: a length, then that many bytes.
        let Some(x) = h.get(at..at + 2) else {
            return Some(None);
        };
        at += 2 + usize::from(u16::from_le_bytes([x[0], x[1]]));
    }
    for bit in [0x08, 0x10] {
        // FNAME, FCOMMENT: zero-terminated.
        if flags & bit != 0 {
            match h.get(at..).and_then(|r| r.iter().position(|b| *b == 0)) {
                Some(z) => at += z + 1,
                None => return Some(None),
            }
        }
    }
    if flags & 0x02 != 0 {
        at += 2; // FHCRC
    }
    Some((h.len() >= at).then_some(at))
}

impl Scan {
    /// A scan from the start of a stream.
    pub fn new() -> Scan {
        Scan {
            inflate: Decompress::new(false),
            phase: Phase::Header(Vec::new()),
            scanned: 0,
            member_start: 0,
            members: 0,
            ends: VecDeque::new(),
            cut_at: 0,
            scratch: vec![0; 64 << 10],
        }
    }

    /// True when no more member ends will be found and none are waiting.
    pub fn exhausted(&self) -> bool {
        matches!(self.phase, Phase::Done) && self.ends.is_empty()
    }

    /// Scans the part of `avail` (stream bytes from `cut_at`) not scanned yet.
    pub fn feed(&mut self, avail: &[u8]) {
        let Some(from) = self
            .scanned
            .checked_sub(self.cut_at)
            .and_then(|f| usize::try_from(f).ok())
        else {
            // The cuts went past what was scanned (the stream's end): nothing more to find.
            self.phase = Phase::Done;
            return;
        };
        let mut new = avail.get(from..).unwrap_or(&[]);
        while !new.is_empty() {
            let used = match &mut self.phase {
                Phase::Done => return,
                Phase::Header(h) => {
                    let before = h.len();
                    let take = new.len().min(HEADER_MAX + 1 - before);
                    h.extend_from_slice(&new[..take]);
                    match header_len(h) {
                        None => {
                            self.phase = Phase::Done;
                            return;
                        }
                        Some(None) if h.len() > HEADER_MAX => {
                            self.phase = Phase::Done;
                            return;
                        }
                        Some(None) => take,
                        Some(Some(len)) => {
                            self.inflate.reset(false);
                            self.phase = Phase::Deflate;
                            len - before
                        }
                    }
                }
                Phase::Deflate => {
                    let (before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
                    match self
                        .inflate
                        .decompress(new, &mut self.scratch, FlushDecompress::None)
                    {
                        Ok(Status::StreamEnd) => self.phase = Phase::Trailer(TRAILER),
                        Ok(_) => {}
                        Err(_) => {
                            self.phase = Phase::Done;
                            return;
                        }
                    }
                    let used = (self.inflate.total_in() - before) as usize;
                    if used == 0 && self.inflate.total_out() == out_before {
                        // Nothing more can be done with these bytes: wait for more.
                        return;
                    }
                    used
                }
                Phase::Trailer(left) => {
                    let n = (*left).min(new.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        let end = self.scanned + n;
                        self.ends.push_back(end);
                        self.members += 1;
                        self.member_start = end;
                        self.phase = Phase::Header(Vec::new());
                    }
                    n as usize
                }
            };
            self.scanned += used as u64;
            new = &new[used..];
            let first_too_long = self.members == 0
                && matches!(self.phase, Phase::Deflate)
                && self.scanned - self.member_start > PROBE_BYTES;
            if first_too_long {
                self.phase = Phase::Done;
                return;
            }
        }
    }

    /// How far from `cut_at` the first member end after it lies, if the scan found one.
    pub fn next_end(&mut self) -> Option<u64> {
        while self.ends.front().is_some_and(|e| *e <= self.cut_at) {
            self.ends.pop_front();
        }
        self.ends.front().map(|e| e - self.cut_at)
    }

    /// True when the scan has read at least `n` bytes past `cut_at` (or stopped).
    pub fn ahead_by(&self, n: usize) -> bool {
        matches!(self.phase, Phase::Done) || self.scanned.saturating_sub(self.cut_at) >= n as u64
    }
}
