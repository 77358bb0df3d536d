//! The outbox: events waiting to be delivered to consumers (the server's webhook endpoints),
//! durable before the request that caused them is answered, read by each consumer from its
//! own cursor, compacted once every consumer is past them, and bounded on disk (docs/format.md,
//! "Outbox"). Events are opaque bytes here; the server gives them their meaning.
//!
//! Files in `<data>/outbox/`: `<first seq>.log` files of event records (a new one past
//! [`FILE_BYTES`]), `cursors.json` (each consumer's next sequence number, replaced
//! atomically), and `dead.log` (dead letters: events a consumer gave up on, with why).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{existed, read_whole, write_atomic, FileHandle, OpenMode, Storage};
use crate::segment::{self, record_header, RecordKind, FILE_HEADER_LEN};

#[cfg(test)]
mod tests;

/// Magic of an outbox file (event files and the dead-letter file).
pub const MAGIC: [u8; 8] = *b"\x89BLOUT\r\n";
/// Format version of outbox files.
pub const VERSION: u16 = 1;
/// An event file is closed and a new one started past this many bytes.
pub const FILE_BYTES: u64 = 4 << 20;
/// Dead letters kept at most; past it the oldest go (counted as dropped).
pub const DEAD_LETTERS_MAX: usize = 10_000;

const CURSORS: &str = "cursors.json";
const DEAD: &str = "dead.log";

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number: increasing, never reused.
    pub seq: u64,
    /// When it was recorded, Unix seconds.
    pub at: u64,
    /// The one consumer it is for (a redelivered dead letter), or every consumer.
    pub target: Option<String>,
    /// The event.
    pub payload: Vec<u8>,
}

/// An event a consumer gave up on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The consumer.
    pub consumer: String,
    /// When it gave up, Unix seconds.
    pub failed_at: u64,
    /// Why (the last error).
    pub reason: String,
    /// The event (its `seq` is the dead letter's id).
    pub entry: Entry,
}

/// Sizes, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Bytes of event files.
    pub bytes: u64,
    /// The next sequence number.
    pub next_seq: u64,
    /// Events dropped since open because the outbox was full (some consumer had not got
    /// them) or the dead letters were.
    pub dropped: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cursors {
    version: u16,
    cursors: BTreeMap<String, u64>,
}

struct EventFile {
    path: PathBuf,
    len: u64,
    /// The sequence number after its last record.
    end: u64,
    /// Where appends made since open began, one every [`MARK_EVERY`] bytes or so:
    /// (sequence number, offset), so a read from a sequence number need not scan the file
    /// from its start.
    marks: Vec<(u64, u64)>,
}

/// Bytes between two read marks of an event file.
const MARK_EVERY: u64 = 64 << 10;

struct State {
    /// By first sequence number; the last is the one appended to.
    files: BTreeMap<u64, EventFile>,
    active: FileHandle,
    next_seq: u64,
    cursors: BTreeMap<String, u64>,
    dead: Vec<DeadLetter>,
    dropped: u64,
}

/// The outbox of a data directory. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    bytes_max: u64,
    state: Arc<Mutex<State>>,
    /// What opening found damaged and went past.
    warnings: Vec<String>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("dir", &self.dir).finish()
    }
}

/// The outbox directory of a data directory.
pub fn outbox_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("outbox")
}

fn file_name(first: u64) -> String {
    format!("{first:020}.log")
}

fn encode_entry(e: &Entry) -> Vec<u8> {
    let target = e.target.as_deref().unwrap_or("").as_bytes();
    let mut p = Vec::with_capacity(17 + target.len() + e.payload.len());
    p.extend_from_slice(&e.seq.to_le_bytes());
    p.extend_from_slice(&e.at.to_le_bytes());
    // (Consumer names are short: the server refuses longer ones.)
    p.push(u8::try_from(target.len()).unwrap_or(u8::MAX));
    p.extend_from_slice(&target[..target.len().min(255)]);
    p.extend_from_slice(&e.payload);
    p
}

fn decode_entry(p: &[u8]) -> Option<Entry> {
    let seq = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let at = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
    let tlen = usize::from(*p.get(16)?);
    let target = std::str::from_utf8(p.get(17..17 + tlen)?).ok()?;
    Some(Entry {
        seq,
        at,
        target: (!target.is_empty()).then(|| target.to_owned()),
        payload: p.get(17 + tlen..)?.to_vec(),
    })
}

fn encode_dead(d: &DeadLetter) -> Vec<u8> {
    let consumer = d.consumer.as_bytes();
    let reason = d.reason.as_bytes();
    let mut p = Vec::new();
    p.extend_from_slice(&d.failed_at.to_le_bytes());
    p.push(u8::try_from(consumer.len()).unwrap_or(u8::MAX));
    p.extend_from_slice(&consumer[..consumer.len().min(255)]);
    let reason = &reason[..reason.len().min(u16::MAX as usize)];
    p.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    p.extend_from_slice(reason);
    p.extend_from_slice(&encode_entry(&d.entry));
    p
}

fn decode_dead(p: &[u8]) -> Option<DeadLetter> {
    let failed_at = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let clen = usize::from(*p.get(8)?);
    let consumer = std::str::from_utf8(p.get(9..9 + clen)?).ok()?.to_owned();
    let at = 9 + clen;
    let rlen = usize::from(u16::from_le_bytes(p.get(at..at + 2)?.try_into().ok()?));
    let reason = String::from_utf8_lossy(p.get(at + 2..at + 2 + rlen)?).into_owned();
    let entry = decode_entry(p.get(at + 2 + rlen..)?)?;
    Some(DeadLetter {
        consumer,
        failed_at,
        reason,
        entry,
    })
}

fn record(kind: RecordKind, payload: &[u8]) -> Vec<u8> {
    let mut out = record_header(kind, 0, &[payload]).to_vec();
    out.extend_from_slice(payload);
    out
}

/// What reading an outbox file found.
struct FileRead {
    /// The payloads of its valid records of the expected kind, in order.
    records: Vec<Vec<u8>>,
    /// Where its last valid record ends.
    valid_end: u64,
    /// Damaged stretches with valid records after them (events lost), as text.
    damage: Vec<String>,
    /// The file ends in an invalid stretch with nothing valid after it: a torn append, if
    /// this is the file appended to.
    torn_tail: bool,
}

/// Reads the records of an outbox file of `kind`, going on past damaged ones.
fn read_file(file: &FileHandle, kind: RecordKind) -> Result<FileRead> {
    read_file_from(file, kind, FILE_HEADER_LEN as u64)
}

/// [`read_file`] from `start`, where a record begins.
fn read_file_from(file: &FileHandle, kind: RecordKind, start: u64) -> Result<FileRead> {
    let path = file.path().to_path_buf();
    let mut head = [0u8; FILE_HEADER_LEN];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| Error::corrupted(&path, 0, "outbox file shorter than its header"))?;
    segment::check_file_header_versions(&path, MAGIC, &head, &[VERSION])?;
    let len = file.len()?;
    let mut out = FileRead {
        records: Vec::new(),
        valid_end: FILE_HEADER_LEN as u64,
        damage: Vec::new(),
        torn_tail: false,
    };
    let (_, damage) = segment::scan_salvaging(file, start, |rec| {
        if rec.header.kind == kind {
            out.records.push(rec.payload);
        } else {
            out.damage.push(format!(
                "a record of kind {:?} at offset {}",
                rec.header.kind, rec.offset
            ));
        }
        out.valid_end = rec.offset + rec.header.record_len();
        Ok(())
    })?;
    for d in damage {
        if d.resumed_at >= len {
            out.torn_tail = true;
        } else {
            out.damage.push(format!(
                "{} at offset {} (the records from {} on are read)",
                d.reason, d.offset, d.resumed_at
            ));
        }
    }
    Ok(out)
}

impl Outbox {
    /// Opens (or creates) the outbox of a data directory. A torn last record (a crash during
    /// an append that was never acknowledged) is cut off; damage anywhere else is an error
    /// that names the file (`fsck` reports it; moving the directory aside starts afresh).
    /// `bytes_max` bounds the event files (0: no bound).
    pub fn open(storage: Arc<dyn Storage>, data_dir: &Path, bytes_max: u64) -> Result<Outbox> {
        let dir = outbox_dir(data_dir);
        storage
            .create_dir_all(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        crate::io::remove_unfinished_writes(storage.as_ref(), &dir)?;
        let mut firsts: Vec<u64> = storage
            .list(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .iter()
            .filter_map(|n| n.strip_suffix(".log")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let mut files = BTreeMap::new();
        let mut next_seq = 1;
        let mut warnings = Vec::new();
        let mut dropped = 0;
        let last = firsts.last().copied();
        for first in firsts {
            let path = dir.join(file_name(first));
            let file = FileHandle::open(storage.as_ref(), &path, OpenMode::ReadWrite)?;
            let read = read_file(&file, RecordKind::OutboxEvent)?;
            let mut file_end = first;
            for r in &read.records {
                match decode_entry(r) {
                    Some(e) => file_end = e.seq + 1,
                    None => {
                        warnings.push(format!("{}: an event that does not decode", path.display()))
                    }
                }
            }
            for d in &read.damage {
                dropped += 1;
                warnings.push(format!("{}: damaged, events lost: {d}", path.display()));
            }
            if read.torn_tail {
                if Some(first) == last {
                    // An append cut short by a crash: it was never acknowledged.
                    file.set_len(read.valid_end)?;
                    file.sync()?;
                } else {
                    dropped += 1;
                    warnings.push(format!(
                        "{}: damaged at its end (offset {}), events lost",
                        path.display(),
                        read.valid_end
                    ));
                }
            }
            let end = read.valid_end;
            next_seq = next_seq.max(file_end);
            files.insert(
                first,
                EventFile {
                    path,
                    len: end,
                    end: file_end,
                    marks: Vec::new(),
                },
            );
        }
        let active = match files.iter().next_back() {
            Some((_, f)) => FileHandle::open(storage.as_ref(), &f.path, OpenMode::ReadWrite)?,
            None => {
                let name = file_name(next_seq);
                let header = segment::file_header_versioned(MAGIC, VERSION);
                let file = crate::io::create_with_header(storage.as_ref(), &dir, &name, &header)?;
                files.insert(
                    next_seq,
                    EventFile {
                        path: dir.join(&name),
                        len: FILE_HEADER_LEN as u64,
                        end: next_seq,
                        marks: Vec::new(),
                    },
                );
                file
            }
        };
        let cursors_path = dir.join(CURSORS);
        let cursors = match read_whole(storage.as_ref(), &cursors_path)? {
            Some(bytes) => {
                serde_json::from_slice::<Cursors>(&bytes)
                    .map_err(|e| Error::corrupted(&cursors_path, 0, format!("unreadable: {e}")))?
                    .cursors
            }
            None => BTreeMap::new(),
        };
        let dead = read_dead(storage.as_ref(), &dir)?;
        Ok(Outbox {
            storage,
            dir,
            bytes_max,
            state: Arc::new(Mutex::new(State {
                files,
                active,
                next_seq,
                cursors,
                dead,
                dropped,
            })),
            warnings,
        })
    }

    /// Damage opening went past (events lost), for the log.
    pub fn open_warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Sets who the consumers are: a new one starts at the end (it gets what is recorded
    /// from now on), one no longer named is forgotten (its cursor no longer holds events).
    pub fn set_consumers(&self, names: &[&str]) -> Result<()> {
        let mut s = self.state.lock();
        let next = s.next_seq;
        s.cursors.retain(|k, _| names.contains(&k.as_str()));
        for n in names {
            s.cursors.entry((*n).to_owned()).or_insert(next);
        }
        self.save_cursors(&s)?;
        self.compact(&mut s)
    }

    /// Records events (`(target, payload)`: a target names the one consumer an event is
    /// for); with `durable`, they are on stable storage when this returns (otherwise with
    /// the next durable append). Returns the sequence number of the last one.
    pub fn append(&self, events: &[(Option<&str>, &[u8])], at: u64, durable: bool) -> Result<u64> {
        let mut s = self.state.lock();
        let first_seq = s.next_seq;
        let mut bytes = Vec::new();
        for (i, (target, payload)) in events.iter().enumerate() {
            let e = Entry {
                seq: first_seq + i as u64,
                at,
                target: target.map(str::to_owned),
                payload: payload.to_vec(),
            };
            bytes.extend_from_slice(&record(RecordKind::OutboxEvent, &encode_entry(&e)));
        }
        let offset = s
            .files
            .values()
            .next_back()
            .map_or(FILE_HEADER_LEN as u64, |f| f.len);
        if let Some(f) = s.files.values_mut().next_back() {
            if f.marks
                .last()
                .is_none_or(|(_, at)| offset >= at + MARK_EVERY)
            {
                f.marks.push((first_seq, offset));
            }
        }
        // A failed write or sync leaves the file as it was as far as readers know: the next
        // append writes over whatever part of this one reached the file.
        s.active.write_all_at(&bytes, offset)?;
        if durable {
            s.active.sync()?;
        }
        s.next_seq = first_seq + events.len() as u64;
        let next = s.next_seq;
        if let Some(f) = s.files.values_mut().next_back() {
            f.len += bytes.len() as u64;
            f.end = next;
        }
        self.roll_and_bound(&mut s)?;
        Ok(next - 1)
    }

    /// Up to `max` events from sequence number `from` on that `consumer` gets (events
    /// targeted at another consumer are skipped), in order.
    pub fn read(&self, consumer: &str, from: u64, max: usize) -> Result<Vec<Entry>> {
        let (paths, next): (Vec<(PathBuf, u64)>, u64) = {
            let s = self.state.lock();
            let paths = s
                .files
                .iter()
                .filter(|(_, f)| f.end > from)
                .map(|(_, f)| {
                    let start = f
                        .marks
                        .iter()
                        .rev()
                        .find(|(seq, _)| *seq <= from)
                        .map_or(FILE_HEADER_LEN as u64, |(_, at)| *at);
                    (f.path.clone(), start)
                })
                .collect();
            (paths, s.next_seq)
        };
        let mut out = Vec::new();
        for (path, start) in paths {
            let file = match FileHandle::open(self.storage.as_ref(), &path, OpenMode::Read) {
                Ok(f) => f,
                // Dropped by the bound meanwhile: its events are gone.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let got = read_file_from(&file, RecordKind::OutboxEvent, start)?;
            for r in got.records {
                let Some(e) = decode_entry(&r) else { continue };
                // (Only what was acknowledged as appended when this read began.)
                if e.seq >= next {
                    break;
                }
                if e.seq < from || e.target.as_deref().is_some_and(|t| t != consumer) {
                    continue;
                }
                out.push(e);
                if out.len() >= max {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Where `consumer` is: the sequence number of the next event it has not got.
    pub fn cursor(&self, consumer: &str) -> Option<u64> {
        self.state.lock().cursors.get(consumer).copied()
    }

    /// `consumer` is done with every event before `next`: its cursor moves (durably), and
    /// files every consumer is past are removed.
    pub fn ack(&self, consumer: &str, next: u64) -> Result<()> {
        let mut s = self.state.lock();
        match s.cursors.get_mut(consumer) {
            Some(c) if *c < next => *c = next,
            Some(_) => return Ok(()),
            None => return Err(Error::NotFound(format!("outbox consumer {consumer}"))),
        }
        self.save_cursors(&s)?;
        self.compact(&mut s)
    }

    /// Sizes, for metrics.
    pub fn stats(&self) -> OutboxStats {
        let s = self.state.lock();
        OutboxStats {
            bytes: s.files.values().map(|f| f.len).sum(),
            next_seq: s.next_seq,
            dropped: s.dropped,
            dead_letters: s.dead.len() as u64,
        }
    }

    /// When the oldest event `consumer` has not got was recorded, if it has one.
    pub fn oldest_pending(&self, consumer: &str) -> Result<Option<u64>> {
        let Some(from) = self.cursor(consumer) else {
            return Ok(None);
        };
        Ok(self.read(consumer, from, 1)?.first().map(|e| e.at))
    }

    /// Moves an event `consumer` gave up on to the dead letters (durably); the oldest dead
    /// letters go past [`DEAD_LETTERS_MAX`].
    pub fn bury(&self, consumer: &str, entry: &Entry, reason: &str, now: u64) -> Result<()> {
        let mut s = self.state.lock();
        s.dead.push(DeadLetter {
            consumer: consumer.to_owned(),
            failed_at: now,
            reason: reason.to_owned(),
            entry: entry.clone(),
        });
        if s.dead.len() > DEAD_LETTERS_MAX {
            let over = s.dead.len() - DEAD_LETTERS_MAX;
            s.dead.drain(..over);
            s.dropped += over as u64;
        }
        self.save_dead(&s.dead)
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state.lock().dead.clone()
    }

    /// Puts dead letters back in the outbox for their consumer (all of them, or those whose
    /// event has one of `seqs`), as new events; returns how many.
    pub fn redeliver(&self, seqs: Option<&[u64]>, now: u64) -> Result<usize> {
        let chosen: Vec<DeadLetter> = {
            let s = self.state.lock();
            s.dead
                .iter()
                .filter(|d| seqs.is_none_or(|ids| ids.contains(&d.entry.seq)))
                .cloned()
                .collect()
        };
        if chosen.is_empty() {
            return Ok(0);
        }
        let events: Vec<(Option<&str>, &[u8])> = chosen
            .iter()
            .map(|d| (Some(d.consumer.as_str()), d.entry.payload.as_slice()))
            .collect();
        // Durable in the outbox before they leave the dead letters: a crash in between
        // delivers them twice rather than never.
        self.append(&events, now, true)?;
        let mut s = self.state.lock();
        s.dead.retain(|d| {
            !chosen
                .iter()
                .any(|c| c.entry.seq == d.entry.seq && c.consumer == d.consumer)
        });
        self.save_dead(&s.dead)?;
        Ok(chosen.len())
    }

    /// Checks every outbox file (for fsck): the problems found, each with whether events
    /// were lost (`false`: an unfinished append the next start cuts off, never acknowledged).
    pub fn verify(storage: &dyn Storage, data_dir: &Path) -> Result<Vec<(bool, String)>> {
        let dir = outbox_dir(data_dir);
        let names = match storage.list(&dir) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        let mut problems = Vec::new();
        let mut logs: Vec<u64> = names
            .iter()
            .filter_map(|n| n.strip_suffix(".log")?.parse().ok())
            .collect();
        logs.sort_unstable();
        let mut expect: Option<u64> = None;
        for (i, first) in logs.iter().enumerate() {
            let path = dir.join(file_name(*first));
            let file = FileHandle::open(storage, &path, OpenMode::Read)?;
            let read = match read_file(&file, RecordKind::OutboxEvent) {
                Ok(r) => r,
                Err(e) => {
                    problems.push((true, format!("{}: {e}", path.display())));
                    continue;
                }
            };
            for d in &read.damage {
                problems.push((
                    true,
                    format!("{}: damaged, events lost: {d}", path.display()),
                ));
            }
            if read.torn_tail {
                let last = i + 1 == logs.len();
                problems.push((
                    !last,
                    if last {
                        format!(
                            "{}: an unfinished append at offset {} (cut off at the next start; \
                         it was never acknowledged)",
                            path.display(),
                            read.valid_end
                        )
                    } else {
                        format!(
                            "{}: damaged at its end (offset {}), events lost",
                            path.display(),
                            read.valid_end
                        )
                    },
                ));
            }
            for r in read.records {
                match decode_entry(&r) {
                    Some(e) => {
                        if expect.is_some_and(|x| e.seq < x) {
                            problems.push((
                                true,
                                format!(
                                    "{}: event {} after event {} (sequence numbers must increase)",
                                    path.display(),
                                    e.seq,
                                    expect.unwrap_or(1) - 1
                                ),
                            ));
                        }
                        expect = Some(e.seq + 1);
                    }
                    None => problems.push((
                        true,
                        format!("{}: a record that does not decode", path.display()),
                    )),
                }
            }
        }
        if names.iter().any(|n| n == CURSORS) {
            match read_whole(storage, &dir.join(CURSORS)) {
                Ok(Some(b)) if serde_json::from_slice::<Cursors>(&b).is_err() => problems.push((
                    true,
                    format!("{}: not valid JSON cursors", dir.join(CURSORS).display()),
                )),
                Err(e) => problems.push((true, e.to_string())),
                _ => {}
            }
        }
        if let Err(e) = read_dead(storage, &dir) {
            problems.push((true, e.to_string()));
        }
        Ok(problems)
    }

    fn save_cursors(&self, s: &State) -> Result<()> {
        let c = Cursors {
            version: 1,
            cursors: s.cursors.clone(),
        };
        let bytes = serde_json::to_vec(&c).map_err(|e| Error::Internal(format!("cursors: {e}")))?;
        write_atomic(self.storage.as_ref(), &self.dir.join(CURSORS), &bytes)
    }

    fn save_dead(&self, dead: &[DeadLetter]) -> Result<()> {
        let mut bytes = segment::file_header_versioned(MAGIC, VERSION).to_vec();
        for d in dead {
            bytes.extend_from_slice(&record(RecordKind::OutboxDead, &encode_dead(d)));
        }
        write_atomic(self.storage.as_ref(), &self.dir.join(DEAD), &bytes)
    }

    /// Removes event files every consumer is past (all but the active one).
    fn compact(&self, s: &mut State) -> Result<()> {
        let min = s.cursors.values().copied().min().unwrap_or(s.next_seq);
        let done: Vec<u64> = s
            .files
            .iter()
            .take(s.files.len().saturating_sub(1))
            .filter(|(_, f)| f.end <= min)
            .map(|(k, _)| *k)
            .collect();
        self.remove_files(s, &done)
    }

    fn remove_files(&self, s: &mut State, firsts: &[u64]) -> Result<()> {
        if firsts.is_empty() {
            return Ok(());
        }
        for first in firsts {
            if let Some(f) = s.files.remove(first) {
                existed(&f.path, self.storage.remove(&f.path))?;
            }
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }

    /// Starts a new file past [`FILE_BYTES`]; drops the oldest files past `bytes_max`.
    fn roll_and_bound(&self, s: &mut State) -> Result<()> {
        let full = s
            .files
            .values()
            .next_back()
            .is_some_and(|f| f.len >= FILE_BYTES);
        if full {
            // The file ending here is durable before the next one exists.
            s.active.sync()?;
            let first = s.next_seq;
            let name = file_name(first);
            let header = segment::file_header_versioned(MAGIC, VERSION);
            s.active =
                crate::io::create_with_header(self.storage.as_ref(), &self.dir, &name, &header)?;
            s.files.insert(
                first,
                EventFile {
                    path: self.dir.join(&name),
                    len: FILE_HEADER_LEN as u64,
                    end: first,
                    marks: Vec::new(),
                },
            );
        }
        if self.bytes_max == 0 {
            return Ok(());
        }
        let mut victims = Vec::new();
        let mut total: u64 = s.files.values().map(|f| f.len).sum();
        for (first, f) in s.files.iter().take(s.files.len().saturating_sub(1)) {
            if total <= self.bytes_max {
                break;
            }
            total -= f.len;
            victims.push((*first, f.end));
        }
        let Some(&(_, new_start)) = victims.last() else {
            return Ok(());
        };
        // Events some consumer had not got yet are lost: count them, move those cursors on.
        let lost: u64 = victims
            .iter()
            .map(|(first, end)| {
                let behind = s
                    .cursors
                    .values()
                    .copied()
                    .min()
                    .unwrap_or(*end)
                    .max(*first);
                end.saturating_sub(behind)
            })
            .sum();
        s.dropped += lost;
        for c in s.cursors.values_mut() {
            *c = (*c).max(new_start);
        }
        let firsts: Vec<u64> = victims.iter().map(|(f, _)| *f).collect();
        self.remove_files(s, &firsts)?;
        self.save_cursors(s)
    }
}

fn read_dead(storage: &dyn Storage, dir: &Path) -> Result<Vec<DeadLetter>> {
    let path = dir.join(DEAD);
    let file = match FileHandle::open(storage, &path, OpenMode::Read) {
        Ok(f) => f,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let read = read_file(&file, RecordKind::OutboxDead)?;
    if let Some(why) = read.damage.first() {
        // (The file is only ever replaced whole: any damage is damage.)
        return Err(Error::corrupted(
            &path,
            read.valid_end,
            format!("dead letters damaged: {why}"),
        ));
    }
    if read.torn_tail {
        return Err(Error::corrupted(
            &path,
            read.valid_end,
            "dead letters damaged at the end",
        ));
    }
    read.records
        .iter()
        .map(|r| {
            decode_dead(r)
                .ok_or_else(|| Error::corrupted(&path, 0, "a dead letter that does not decode"))
        })
        .collect()
}
