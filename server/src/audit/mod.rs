//! The audit log: one JSON line per mutating action, denied request and failed login.
//!
//! Lines go through a bounded queue to one writer thread, which writes whatever is queued,
//! calls `fdatasync` once for the batch (group commit), and then acknowledges each line. A
//! request waits for its line's acknowledgement for at most [`WAIT`]: a slow audit disk
//! slows requests by that much at worst, never stops them. Lines the queue cannot take are
//! counted and reported in the log itself (`audit.dropped`). The file is rotated by size:
//! `audit.log` → `audit.log.1` → … → `audit.log.<keep>` (the oldest is removed).

pub mod query;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use std::sync::mpsc::{Receiver, SyncSender as Sender, TrySendError};

/// Longest a request waits for its audit line to be durable.
pub const WAIT: Duration = Duration::from_secs(1);
/// Lines queued before new ones are dropped (and counted).
const QUEUE: usize = 8192;

/// One audited event.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event {
    /// RFC 3339 UTC, milliseconds.
    pub time: String,
    /// `user:NAME`, `robot:NAME`, `anonymous`, `system` or `cli:USER`.
    pub actor: String,
    /// Client address, when a request caused it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// What was done or attempted: `blob.upload`, `blob.mount`, `blob.delete`,
    /// `manifest.put`, `manifest.delete`, `tag.move`, `tag.delete`, `upload.cancel`,
    /// `gc.run`, `login`, `robot.create`, `robot.revoke`, `user.set`, `user.delete`, or for
    /// denied requests the action that was needed (`pull`, `push`, `delete`, `admin`).
    pub action: String,
    /// Repository.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Digest of the blob or manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// What the tag pointed at before (`tag.move`), or the source repository (`blob.mount`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// `ok`, `denied` or `failed`.
    pub outcome: String,
    /// Why, for anything but `ok`; details for some `ok` events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request that caused it (its `X-Request-Id` and request log line say the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Event {
    /// An event now, by `actor`, with outcome `ok`.
    pub fn new(actor: impl Into<String>, action: impl Into<String>) -> Event {
        Event {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            actor: actor.into(),
            action: action.into(),
            outcome: "ok".to_owned(),
            ..Event::default()
        }
    }

    fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

type Ack = tokio::sync::oneshot::Sender<()>;

/// The audit log of a running server.
pub struct Audit {
    tx: Option<Sender<(Vec<u8>, Option<Ack>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
    dropped: Arc<AtomicU64>,
}

impl Audit {
    /// Opens (creating) the log at `path`, rotated beyond `bytes_max` keeping `keep` old files.
    pub fn open(path: &Path, bytes_max: u64, keep: u32) -> std::io::Result<Audit> {
        let file = open_append(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            path: path.to_owned(),
            size: file.metadata()?.len(),
            file,
            bytes_max: bytes_max.max(4096),
            keep,
            dropped: dropped.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Audit {
            tx: Some(tx),
            thread: Some(thread),
            dropped,
        })
    }

    /// An audit log that writes nothing (tests of other things).
    pub fn disabled() -> Audit {
        Audit {
            tx: None,
            thread: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records an event and waits (at most [`WAIT`]) until it is durable.
    pub async fn record(&self, event: Event) {
        self.record_all(vec![event]).await;
    }

    /// Records events in order and waits (at most [`WAIT`]) until all are durable: one wait
    /// for the last, since the writer syncs in order.
    pub async fn record_all(&self, events: Vec<Event>) {
        let Some(tx) = &self.tx else { return };
        // The wait is for the last line that was queued.
        let mut last = None;
        for event in events {
            let (ack, done) = tokio::sync::oneshot::channel();
            match tx.try_send((event.line(), Some(ack))) {
                Ok(()) => last = Some(done),
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if let Some(done) = last {
            if tokio::time::timeout(WAIT, done).await.is_err() {
                tracing::warn!("audit log is slow: a line took over 1 s to become durable");
            }
        }
    }

    /// Records an event without waiting (from threads outside the runtime).
    pub fn record_now(&self, event: Event) {
        if let Some(tx) = &self.tx {
            if tx.try_send((event.line(), None)).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn close(mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    bytes_max: u64,
    keep: u32,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, rx: Receiver<(Vec<u8>, Option<Ack>)>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let mut buf: Vec<u8> = batch.iter().flat_map(|(l, _)| l.iter().copied()).collect();
            let lost = self.dropped.swap(0, Ordering::Relaxed);
            if lost > 0 {
                let mut e = Event::new("system", "audit.dropped");
                e.outcome = "failed".into();
                e.reason = Some(format!(
                    "{lost} audit lines were dropped: the queue was full"
                ));
                buf.extend(e.line());
            }
            if let Err(e) = self.write(&buf) {
                tracing::error!(file = %self.path.display(), error = %e, "audit log write failed");
            }
            for (_, ack) in batch {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        self.file.sync_data()?;
        self.size += buf.len() as u64;
        if self.size >= self.bytes_max {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use ballast_engine::storage::{DIR_MODE, FILE_MODE};
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Not readable by other users, whatever the umask: the log names who did what.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)?;
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    if let Some(dir) = path.parent() {
        // The new name must survive a power cut as well as the lines in it.
        File::open(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })?
        .sync_all()?;
    }
    Ok(file)
}

/// Appends one event straight to the log file and syncs it: for the CLI's account changes,
/// which may run beside a server (a single `write` with `O_APPEND` does not interleave with
/// the server's lines).
pub fn append(path: &Path, event: &Event) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    if let Some(dir) = path.parent() {
        crate::auth::create_dir_owned_as_parent(dir).map_err(std::io::Error::other)?;
    }
    let existed = path.exists();
    let mut file = open_append(path)?;
    // A log the command line starts (run as root, say) belongs to whoever owns its
    // directory, so the server can go on appending to it.
    if !existed {
        if let Some(d) = path.parent().and_then(|d| std::fs::metadata(d).ok()) {
            let _ = std::os::unix::fs::fchown(&file, Some(d.uid()), Some(d.gid()));
        }
    }
    file.write_all(&event.line())?;
    file.sync_data()
}

/// The log's files, oldest first (`audit.log.<keep>` … `audit.log.1`, `audit.log`).
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut numbered: Vec<(u32, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name()) {
        let prefix = format!("{}.", name.to_string_lossy());
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(k) = n.strip_prefix(&prefix).and_then(|k| k.parse().ok()) {
                    numbered.push((k, e.path()));
                }
            }
        }
    }
    numbered.sort_by_key(|n| std::cmp::Reverse(n.0));
    let mut out: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_owned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_durable_and_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit").join("audit.log");
        let audit = Audit::open(&path, 4096, 2).expect("open");
        for i in 0..100 {
            let mut e = Event::new("user:a", "manifest.put");
            e.repository = Some(format!("repo{i}"));
            audit.record(e).await;
        }
        audit.close();
        let files = files(&path);
        assert_eq!(files.len(), 3, "{files:?}");
        assert!(files[0].ends_with("audit.log.2") && files[2].ends_with("audit.log"));
        let mut seen = Vec::new();
        for f in &files {
            for line in std::fs::read_to_string(f).expect("read").lines() {
                let v: serde_json::Value = serde_json::from_str(line).expect("json line");
                seen.push(v["repository"].as_str().expect("repo").to_owned());
            }
        }
        // The oldest lines went with the removed file; what is left is in order and ends
        // with the last event.
        assert_eq!(seen.last().map(String::as_str), Some("repo99"));
        let nums: Vec<u32> = seen.iter().map(|s| s[4..].parse().expect("n")).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        append(&path, &Event::new("cli:root", "robot.create")).expect("append");
        let last = std::fs::read_to_string(&path).expect("read");
        assert!(last.lines().last().expect("line").contains("robot.create"));
    }

    #[tokio::test]
    async fn events_of_one_request_are_all_written_in_order_when_record_all_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let audit = Audit::open(&path, 1 << 20, 2).expect("open");
        let events = ["manifest.put", "tag.create", "tag.move"]
            .iter()
            .map(|a| Event::new("user:a", *a))
            .collect();
        audit.record_all(events).await;
        // Read while the writer still runs: what record_all waited for is in the file.
        let text = std::fs::read_to_string(&path).expect("read");
        let actions: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                v["action"].as_str().expect("action").to_owned()
            })
            .collect();
        assert_eq!(actions, ["manifest.put", "tag.create", "tag.move"]);
        audit.close();
    }
}
