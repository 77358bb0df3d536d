//! Upload sessions: the bytes of a chunked upload are spooled to a file of their own until the
//! client finishes the upload, so a session survives a restart. Each append is made durable
//! before it is acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::{write_atomic, FileHandle, OpenMode, Storage};

/// What is kept about a session besides its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Repository the upload goes to.
    pub repo: String,
    /// Seconds since the epoch when it started.
    pub started_at: u64,
}

/// The upload sessions of a data directory.
#[derive(Clone)]
pub struct Uploads {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").field("dir", &self.dir).finish()
    }
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
            "upload id",
            format!("{id:?} is not 32 lowercase hex characters"),
        ))
    }
}

impl Uploads {
    /// Opens (creating) the sessions directory.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Uploads> {
        storage.create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(Uploads {
            storage,
            dir: dir.to_path_buf(),
        })
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.data"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.meta"))
    }

    /// Starts a session with a fresh id chosen by the caller.
    pub fn create(&self, id: &str, meta: &SessionMeta) -> Result<()> {
        validate_id(id)?;
        let data = FileHandle::open(
            self.storage.as_ref(),
            &self.data_path(id),
            OpenMode::CreateNew,
        )?;
        data.sync()?;
        let json =
            serde_json::to_vec(meta).map_err(|e| Error::invalid("upload meta", e.to_string()))?;
        write_atomic(self.storage.as_ref(), &self.meta_path(id), &json)
    }

    /// The session's metadata and the number of bytes received so far.
    pub fn status(&self, id: &str) -> Result<(SessionMeta, u64)> {
        validate_id(id)?;
        let not_found = || Error::NotFound(format!("upload {id}"));
        let meta_file =
            FileHandle::open(self.storage.as_ref(), &self.meta_path(id), OpenMode::Read)
                .map_err(|_| not_found())?;
        let mut json = vec![0u8; usize::try_from(meta_file.len()?).unwrap_or(0).min(64 << 10)];
        meta_file.read_exact_at(&mut json, 0)?;
        let meta: SessionMeta = serde_json::from_slice(&json)
            .map_err(|e| Error::corrupted(self.meta_path(id), 0, format!("upload meta: {e}")))?;
        let data = FileHandle::open(self.storage.as_ref(), &self.data_path(id), OpenMode::Read)
            .map_err(|_| not_found())?;
        Ok((meta, data.len()?))
    }

    /// Opens the session's data file for appending at `offset` (which must be its length).
    pub fn appender(&self, id: &str, offset: u64) -> Result<FileHandle> {
        let (_, len) = self.status(id)?;
        if len != offset {
            return Err(Error::invalid(
                "upload offset",
                format!("the upload has {len} bytes, not {offset}"),
            ));
        }
        FileHandle::open(
            self.storage.as_ref(),
            &self.data_path(id),
            OpenMode::ReadWrite,
        )
    }

    /// The session's data file, for reading.
    pub fn reader(&self, id: &str) -> Result<FileHandle> {
        validate_id(id)?;
        FileHandle::open(self.storage.as_ref(), &self.data_path(id), OpenMode::Read)
            .map_err(|_| Error::NotFound(format!("upload {id}")))
    }

    /// Ends a session (finished or cancelled), removing its files.
    pub fn remove(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let mut found = false;
        for p in [self.meta_path(id), self.data_path(id)] {
            match self.storage.remove(&p) {
                Ok(()) => found = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, e)),
            }
        }
        if !found {
            return Err(Error::NotFound(format!("upload {id}")));
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }

    /// Ids of all sessions.
    pub fn list(&self) -> Result<Vec<String>> {
        let names = self
            .storage
            .list(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?;
        Ok(names
            .iter()
            .filter_map(|n| n.strip_suffix(".meta"))
            .filter(|id| validate_id(id).is_ok())
            .map(str::to_owned)
            .collect())
    }

    /// Removes sessions started before `cutoff` (seconds since the epoch); returns how many.
    pub fn expire(&self, cutoff: u64) -> Result<usize> {
        let mut n = 0;
        for id in self.list()? {
            if let Ok((meta, _)) = self.status(&id) {
                if meta.started_at < cutoff && self.remove(&id).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
