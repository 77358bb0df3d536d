//! Upload sessions: the bytes of a chunked upload are spooled to a file of their own until the
//! client finishes the upload, so a session survives a restart. Each append is made durable
//! before it is acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Input, Result};
use crate::io::{existed, write_atomic, FileHandle, OpenMode, Storage};

/// What is kept about a session besides its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// Repository the upload goes to.
    pub repo: String,
    /// Seconds since the epoch when it started.
    pub started_at: u64,
}

/// The upload sessions of a data directory.
///
/// A session is its `.data` file (the bytes) and its `.meta` file (made after the data file,
/// so a session is known once its meta exists). A finished session's data file is renamed to
/// `.done` and removed later ([`Uploads::discard`]): dropping a large spool from the page
/// cache takes a while and need not hold up the reply.
#[derive(Clone)]
pub struct Uploads {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// Held while a session is created and while `expire` lists the directory, so a sweep
    /// never takes the data file of a session being created for a leftover.
    creating: Arc<Mutex<()>>,
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
            Input::UploadId,
            format!("{id:?} is not 32 lowercase hex characters"),
        ))
    }
}

impl Uploads {
    /// Opens (creating) the sessions directory.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Uploads> {
        storage.create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::remove_unfinished_writes(storage.as_ref(), dir)?;
        Ok(Uploads {
            storage,
            dir: dir.to_path_buf(),
            creating: Arc::new(Mutex::new(())),
        })
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.data"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.meta"))
    }

    fn done_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.done"))
    }

    /// Starts a session with a fresh id chosen by the caller.
    pub fn create(&self, id: &str, meta: &SessionMeta) -> Result<()> {
        validate_id(id)?;
        let _creating = self.creating.lock();
        let data = FileHandle::open(
            self.storage.as_ref(),
            &self.data_path(id),
            OpenMode::CreateNew,
        )?;
        data.sync()?;
        let json =
            serde_json::to_vec(meta).map_err(|e| Error::Internal(format!("upload meta: {e}")))?;
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
                Input::UploadOffset,
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

    /// Ends a session (finished or cancelled): it is unknown from then on. Its data file is
    /// renamed to `.done` for [`Uploads::discard`] (or the next [`Uploads::expire`]) to remove.
    pub fn end(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let data_path = self.data_path(id);
        let data = existed(
            &data_path,
            self.storage.rename(&data_path, &self.done_path(id)),
        )?;
        // The data file went first: a crash here leaves a meta without data, which is an
        // unknown session that `expire` sweeps.
        let meta_path = self.meta_path(id);
        let meta = existed(&meta_path, self.storage.remove(&meta_path))?;
        if !data && !meta {
            return Err(Error::NotFound(format!("upload {id}")));
        }
        self.storage
            .sync_dir(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))
    }

    /// Removes the data of a session that [`Uploads::end`] ended (nothing when it is gone).
    pub fn discard(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let path = self.done_path(id);
        existed(&path, self.storage.remove(&path)).map(drop)
    }

    /// Ends a session and removes its data now.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.end(id)?;
        self.discard(id)
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

    /// Sessions started before `cutoff` (seconds since the epoch), with their lengths: what
    /// [`Uploads::expire`] would remove.
    pub fn started_before(&self, cutoff: u64) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for id in self.list()? {
            if let Ok((meta, len)) = self.status(&id) {
                if meta.started_at < cutoff {
                    out.push((id, len));
                }
            }
        }
        Ok(out)
    }

    /// Removes sessions started before `cutoff` (seconds since the epoch), and what crashes
    /// or deferred removals left behind: data of ended sessions, a data file whose session
    /// was never completed, a meta file whose data is gone. Returns how many sessions and
    /// leftovers went.
    pub fn expire(&self, cutoff: u64) -> Result<usize> {
        // Listed while no session is half created: a data file without its meta here is a
        // leftover, not a session whose meta is about to be written.
        let names = {
            let _creating = self.creating.lock();
            self.storage
                .list(&self.dir)
                .map_err(|e| Error::io(&self.dir, e))?
        };
        let present: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
        let has = |id: &str, ext: &str| present.contains(format!("{id}.{ext}").as_str());
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
                "data" if !has(id, "meta") => self.storage.remove(&self.data_path(id)).is_ok(),
                "meta" if !has(id, "data") => self.storage.remove(&self.meta_path(id)).is_ok(),
                "meta" => match self.status(id) {
                    Ok((meta, _)) => meta.started_at < cutoff && self.remove(id).is_ok(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RealStorage;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn meta(started_at: u64) -> SessionMeta {
        SessionMeta {
            repo: "r".into(),
            started_at,
        }
    }

    #[test]
    fn an_ended_session_is_unknown_at_once_and_its_data_goes_with_discard() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let up = Uploads::open(Arc::new(RealStorage), tmp.path()).expect("open");
        up.create(A, &meta(100)).expect("create");
        let f = up.appender(A, 0).expect("appender");
        f.write_all_at(b"hello", 0).expect("write");
        f.sync().expect("sync");
        assert_eq!(up.status(A).expect("status").1, 5);

        up.end(A).expect("end");
        assert!(matches!(up.status(A), Err(Error::NotFound(_))));
        assert!(matches!(up.appender(A, 5), Err(Error::NotFound(_))));
        assert!(matches!(up.end(A), Err(Error::NotFound(_))));
        assert!(up.list().expect("list").is_empty());
        assert_eq!(files(tmp.path()), vec![format!("{A}.done")]);

        up.discard(A).expect("discard");
        up.discard(A).expect("discard twice is fine");
        assert!(files(tmp.path()).is_empty());
    }

    #[test]
    fn expire_sweeps_old_sessions_and_every_kind_of_leftover() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let up = Uploads::open(Arc::new(RealStorage), tmp.path()).expect("open");
        up.create(A, &meta(100)).expect("old session");
        up.create(B, &meta(1_000)).expect("fresh session");
        let ids = [
            "11111111111111111111111111111111",
            "22222222222222222222222222222222",
            "33333333333333333333333333333333",
            "44444444444444444444444444444444",
        ];
        // An ended session whose data was never discarded (the server stopped first).
        std::fs::write(tmp.path().join(format!("{}.done", ids[0])), b"x").expect("done");
        // A session whose creation stopped before its meta was written.
        std::fs::write(tmp.path().join(format!("{}.data", ids[1])), b"").expect("data");
        // A session whose end stopped between renaming its data and removing its meta.
        std::fs::write(tmp.path().join(format!("{}.meta", ids[2])), b"{}").expect("meta");
        // A session whose meta cannot be read.
        std::fs::write(tmp.path().join(format!("{}.meta", ids[3])), b"not json").expect("meta");
        std::fs::write(tmp.path().join(format!("{}.data", ids[3])), b"abc").expect("data");
        // Something that is not a session at all stays.
        std::fs::write(tmp.path().join("README"), b"keep").expect("other");

        let n = up.expire(500).expect("expire");
        assert_eq!(n, 5, "the old session and four leftovers");
        assert_eq!(
            files(tmp.path()),
            vec![
                "README".to_owned(),
                format!("{B}.data"),
                format!("{B}.meta")
            ]
        );
        assert_eq!(up.list().expect("list"), vec![B.to_owned()]);
        assert_eq!(up.expire(500).expect("again"), 0);
    }
}
