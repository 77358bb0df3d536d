//! Upload sessions (docs/format.md, "Upload sessions"): a chunked or streamed upload is
//! cut into chunks as its bytes arrive, and those chunks go to the segments like any other;
//! the session's log records which pieces it has and the few bytes not yet cut. So a
//! session survives a restart, its bytes are written once, and finishing it commits a recipe
//! without reading anything back. Each append is durable before it is acknowledged.
//!
//! - `mod.rs` (here): the session files (create, status, end, expiry) and the GC roots.
//! - `log.rs`: the session log's records and their replay.
//! - `writer.rs`: appending to a session and finishing it; the warm writers kept between
//!   appends.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::digest::ChunkId;
use crate::error::{Error, Input, Result};
use crate::io::{existed, write_atomic, FileHandle, OpenMode, Storage};
use crate::recipe::RecipePiece;
use crate::store::Store;

mod log;
mod writer;

use writer::Slot;
pub use writer::UploadWriter;

/// What is kept about a session besides its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Repository the upload goes to.
    pub repo: String,
    /// Seconds since the epoch when it started.
    pub started_at: u64,
    /// Who started it (an account, or an address), for the per-client bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// Bounds on open upload sessions, so that no client (and no crowd of them) can hold the
/// store's room or memory with sessions it never finishes. Zero means no bound. Past a bound
/// a new session or an append fails with [`Error::Throttled`]; sessions end when finished,
/// cancelled or expired, which makes room again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadLimits {
    /// Open sessions in all.
    pub sessions_max: usize,
    /// Open sessions one client started.
    pub sessions_per_client_max: usize,
    /// Bytes one session may receive.
    pub session_bytes_max: u64,
    /// Bytes all open sessions together may hold.
    pub bytes_max: u64,
}

/// Open sessions as the bounds count them: id → (client, bytes received).
#[derive(Default)]
pub(crate) struct Usage {
    loaded: bool,
    sessions: HashMap<String, (Option<String>, u64)>,
}

impl Usage {
    pub(crate) fn bytes_besides(&self, id: &str) -> u64 {
        self.sessions
            .iter()
            .filter(|(other, _)| other.as_str() != id)
            .map(|(_, (_, n))| n)
            .sum()
    }

    pub(crate) fn set_len(&mut self, id: &str, len: u64) {
        if let Some(entry) = self.sessions.get_mut(id) {
            entry.1 = len;
        }
    }
}

/// The upload sessions of a store.
///
/// A session is its `.log` file (what it received) and its `.meta` file (made after the log,
/// so a session is known once its meta exists). An ended session's log is renamed to `.done`
/// and removed later: the reply need not wait for it. A `.data` file is a session written by
/// an older version (its bytes spooled whole); it is turned into a log when next used.
///
/// A server keeps one `Uploads` for its store: it holds the warm writers of sessions between
/// appends (and so clones of the store; the store does not hold it back) and lets one append
/// run per session at a time. The offline tools make their own to list and expire sessions.
///
/// Cheap to clone: clones share the sessions.
#[derive(Clone)]
pub struct Uploads {
    store: Store,
    dir: PathBuf,
    /// Held while a session is created and while `expire` lists the directory, so a sweep
    /// never takes the log of a session being created for a leftover.
    creating: Arc<Mutex<()>>,
    /// Sessions in use by an append (busy) or kept warm between appends; a session not here
    /// is on disk only and is replayed from its log when next used.
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    limits: UploadLimits,
    /// What the bounds count, read from the sessions' files when first needed.
    usage: Arc<Mutex<Usage>>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").field("dir", &self.dir).finish()
    }
}

/// Prepares a store's sessions directory at open: created if missing, unfinished atomic
/// writes removed.
pub(crate) fn prepare_dir(storage: &dyn Storage, dir: &Path) -> Result<()> {
    storage.create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::remove_unfinished_writes(storage, dir)
}

/// The sessions directory of a data directory.
pub(crate) fn sessions_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("uploads")
}

/// Checks a session id: 32 lowercase hex characters.
pub fn validate_id(id: &str) -> Result<()> {
    if id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::invalid(
            Input::UploadId,
            format!("{id:?} is not 32 lowercase hex characters"),
        ))
    }
}

fn unknown(id: &str) -> Error {
    Error::NotFound(format!("upload {id}"))
}

impl Uploads {
    /// The sessions of `store`, without bounds.
    pub fn new(store: &Store) -> Uploads {
        Uploads::with_limits(store, UploadLimits::default())
    }

    /// The sessions of `store`, bounded by `limits`.
    pub fn with_limits(store: &Store, limits: UploadLimits) -> Uploads {
        Uploads {
            store: store.clone(),
            dir: sessions_dir(store.dir()),
            creating: Arc::new(Mutex::new(())),
            slots: Arc::new(Mutex::new(HashMap::new())),
            limits,
            usage: Arc::new(Mutex::new(Usage::default())),
        }
    }

    /// The bounds in force.
    pub fn limits(&self) -> UploadLimits {
        self.limits
    }

    /// Open sessions and the bytes they received (kept in memory; read from the sessions'
    /// files the first time).
    pub fn open_sessions(&self) -> Result<(u64, u64)> {
        self.with_usage(|u| (u.sessions.len() as u64, u.bytes_besides("")))
    }

    /// Runs `f` on the usage, read from the sessions' files the first time.
    pub(crate) fn with_usage<R>(&self, f: impl FnOnce(&mut Usage) -> R) -> Result<R> {
        let mut usage = self.usage.lock();
        if !usage.loaded {
            for id in self.ids()? {
                if let Ok((meta, len)) = self.status(&id) {
                    usage.sessions.insert(id, (meta.client, len));
                }
            }
            usage.loaded = true;
        }
        Ok(f(&mut usage))
    }

    /// Fails with [`Error::Throttled`] when one more session for `client` passes a bound.
    fn admit(&self, usage: &Usage, client: Option<&str>) -> Result<()> {
        let l = &self.limits;
        let open = usage.sessions.len();
        if l.sessions_max > 0 && open >= l.sessions_max {
            return Err(Error::Throttled(format!(
                "{open} upload sessions are open, the most this registry keeps \
                 (upload_sessions_max); finish or cancel some, or retry later"
            )));
        }
        if let (Some(client), true) = (client, l.sessions_per_client_max > 0) {
            let mine = usage
                .sessions
                .values()
                .filter(|(c, _)| c.as_deref() == Some(client))
                .count();
            if mine >= l.sessions_per_client_max {
                return Err(Error::Throttled(format!(
                    "{client} has {mine} upload sessions open, the most one client may \
                     (upload_sessions_per_client_max); finish or cancel some, or retry later"
                )));
            }
        }
        if l.bytes_max > 0 && usage.bytes_besides("") >= l.bytes_max {
            return Err(Error::Throttled(format!(
                "open upload sessions hold {} bytes, the most this registry keeps \
                 (upload_bytes_max); retry once some finish",
                usage.bytes_besides("")
            )));
        }
        Ok(())
    }

    fn storage_ref(&self) -> &dyn Storage {
        self.store.storage().as_ref()
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    /// Starts a session with a fresh id chosen by the caller.
    /// Fails with [`Error::Throttled`] when a bound (see [`UploadLimits`]) leaves no room.
    pub fn create(&self, id: &str, meta: &SessionMeta) -> Result<()> {
        validate_id(id)?;
        let s = self;
        let _creating = s.creating.lock();
        self.with_usage(|u| self.admit(u, meta.client.as_deref()))??;
        // A new file: an id in use (the caller chose it badly) fails here.
        let file = FileHandle::open(self.storage_ref(), &s.path(id, "log"), OpenMode::CreateNew)?;
        file.write_all_at(&log::header(), 0)?;
        file.sync()?;
        let json =
            serde_json::to_vec(meta).map_err(|e| Error::Internal(format!("upload meta: {e}")))?;
        write_atomic(self.storage_ref(), &s.path(id, "meta"), &json)?;
        self.with_usage(|u| u.sessions.insert(id.to_owned(), (meta.client.clone(), 0)))?;
        Ok(())
    }

    fn meta(&self, id: &str) -> Result<SessionMeta> {
        validate_id(id)?;
        let path = self.path(id, "meta");
        let meta_file =
            FileHandle::open(self.storage_ref(), &path, OpenMode::Read).map_err(|_| unknown(id))?;
        let mut json = vec![0u8; usize::try_from(meta_file.len()?).unwrap_or(0).min(64 << 10)];
        meta_file.read_exact_at(&mut json, 0)?;
        serde_json::from_slice(&json)
            .map_err(|e| Error::corrupted(&path, 0, format!("upload meta: {e}")))
    }

    /// A session's metadata and the number of bytes it has received (and acknowledged).
    pub fn status(&self, id: &str) -> Result<(SessionMeta, u64)> {
        let meta = self.meta(id)?;
        if let Some(len) = self.warm_len(id) {
            return Ok((meta, len));
        }
        let s = self;
        let legacy = s.path(id, "data");
        if let Ok(data) = FileHandle::open(self.storage_ref(), &legacy, OpenMode::Read) {
            return Ok((meta, data.len()?));
        }
        let file = FileHandle::open(self.storage_ref(), &s.path(id, "log"), OpenMode::Read)
            .map_err(|_| unknown(id))?;
        Ok((meta, log::replay(&file)?.len))
    }

    /// Ends a session (finished or cancelled): it is unknown from then on. Its log is renamed
    /// to `.done` for [`Uploads::discard`] (or the next [`Uploads::expire`]).
    pub fn end(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        self.forget(id);
        self.with_usage(|u| u.sessions.remove(id))?;
        let s = self;
        let done = s.path(id, "done");
        let mut had_bytes = false;
        for ext in ["log", "data"] {
            let path = s.path(id, ext);
            had_bytes |= existed(&path, self.storage_ref().rename(&path, &done))?;
        }
        // The bytes went first: a crash here leaves a meta without a log, which is an
        // unknown session that `expire_uploads` sweeps.
        let meta_path = s.path(id, "meta");
        let meta = existed(&meta_path, self.storage_ref().remove(&meta_path))?;
        if !had_bytes && !meta {
            return Err(unknown(id));
        }
        self.storage_ref()
            .sync_dir(&s.dir)
            .map_err(|e| Error::io(&s.dir, e))
    }

    /// Removes what [`Uploads::end`] left of a session (nothing when it is gone).
    pub fn discard(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let path = self.path(id, "done");
        existed(&path, self.storage_ref().remove(&path)).map(drop)
    }

    /// Ends a session and removes its files now.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.end(id)?;
        self.discard(id)
    }

    /// Ids of all sessions.
    pub fn ids(&self) -> Result<Vec<String>> {
        let dir = &self.dir;
        let names = self
            .storage_ref()
            .list(dir)
            .map_err(|e| Error::io(dir, e))?;
        Ok(names
            .iter()
            .filter_map(|n| n.strip_suffix(".meta"))
            .filter(|id| validate_id(id).is_ok())
            .map(str::to_owned)
            .collect())
    }

    /// Sessions started before `cutoff` (seconds since the epoch), with their lengths: what
    /// [`Uploads::expire`] would remove.
    pub fn started_before(&self, cutoff: u64) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for id in self.ids()? {
            if let Ok((meta, len)) = self.status(&id) {
                if meta.started_at < cutoff {
                    out.push((id, len));
                }
            }
        }
        Ok(out)
    }

    /// Removes sessions started before `cutoff` (seconds since the epoch), and what crashes
    /// or deferred removals left behind: files of ended sessions, a log whose session was
    /// never completed, a meta whose log is gone. Warm writers idle for long are let go (the
    /// session stays; its next append replays the log). Returns how many sessions and
    /// leftovers went.
    pub fn expire(&self, cutoff: u64) -> Result<usize> {
        self.cool_idle();
        let s = self;
        // Listed while no session is half created: a log without its meta here is a
        // leftover, not a session whose meta is about to be written.
        let names = {
            let _creating = s.creating.lock();
            self.storage_ref()
                .list(&s.dir)
                .map_err(|e| Error::io(&s.dir, e))?
        };
        let present: HashSet<&str> = names.iter().map(String::as_str).collect();
        let has = |id: &str, ext: &str| present.contains(format!("{id}.{ext}").as_str());
        let remove = |id: &str, ext: &str| self.storage_ref().remove(&s.path(id, ext)).is_ok();
        let mut n = 0;
        for name in &names {
            let Some((id, ext)) = name.rsplit_once('.') else {
                continue;
            };
            if validate_id(id).is_err() {
                continue;
            }
            let gone = match ext {
                "done" => self.discard(id).is_ok(),
                "log" | "data" if !has(id, "meta") => remove(id, ext),
                "meta" if !has(id, "log") && !has(id, "data") => remove(id, ext),
                "meta" => match self.meta(id) {
                    Ok(meta) => meta.started_at < cutoff && self.remove(id).is_ok(),
                    // Unreadable meta: the session cannot be used; its files go.
                    Err(Error::Corrupted { .. }) => self.remove(id).is_ok(),
                    Err(_) => false,
                },
                _ => false,
            };
            n += usize::from(gone);
        }
        Ok(n)
    }
}

impl Store {
    /// Chunks that upload sessions hold (a collection keeps them: no recipe names them yet).
    /// A log that cannot be read holds nothing: its session cannot be resumed.
    pub(crate) fn upload_chunks(&self) -> Result<HashSet<ChunkId>> {
        let uploads = Uploads::new(self);
        let mut out = HashSet::new();
        for id in uploads.ids()? {
            let path = uploads.path(&id, "log");
            let Ok(file) = FileHandle::open(uploads.storage_ref(), &path, OpenMode::Read) else {
                continue;
            };
            if let Ok(r) = log::replay(&file) {
                out.extend(r.pieces.iter().filter_map(|p| match p {
                    RecipePiece::Chunk { id, .. } => Some(*id),
                    RecipePiece::Inline(_) => None,
                }));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
