//! All file I/O of the engine goes through [`Storage`], so tests can inject faults and simulate
//! a power cut. [`RealStorage`] uses positional reads and writes (`pread`/`pwrite`) and maps
//! sealed files read-only; [`SimStorage`] keeps written and durable bytes apart in memory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, FileExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::sys::Map;

/// How to open a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Existing file, read only.
    Read,
    /// Existing file, read and write.
    ReadWrite,
    /// A new file (fails if it exists), read and write.
    CreateNew,
    /// Create or truncate, read and write.
    Truncate,
}

/// One open file.
#[allow(
    clippy::len_without_is_empty,
    reason = "files are asked for their length only"
)]
pub trait StorageFile: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; a short file is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// A read-only map of the whole file, when the storage supports it. Only called on files
    /// that are never written again (see docs/unsafe.md).
    fn map(&self) -> io::Result<Option<Map>>;
    /// When the file was last written, in seconds since the epoch (garbage collection keeps
    /// segments younger than its grace period).
    fn modified(&self) -> io::Result<u64>;
    /// Hints that the byte range will be synced soon: start writing it back. No durability
    /// promise; the default does nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Hints that the byte range will be read soon: start reading it into the page cache.
    /// The default does nothing.
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// The file's descriptor, for reads through io_uring; `None` where there is none (the
    /// simulated storage), and such files are read with `read_exact_at`.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// The directory-level operations.
pub trait Storage: Send + Sync + 'static {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames a file, replacing the target.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// The names of the files in a directory (not recursive), in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Takes the exclusive lock of a data directory for the life of the returned guard.
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>>;
    /// Bytes an unprivileged writer may still use on the file system holding `dir`.
    fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
        Ok(u64::MAX)
    }
}

/// The outcome of removing or renaming `path` when it may already be gone: `Ok(true)` when
/// it was there, `Ok(false)` when it was not, an error naming the path otherwise.
pub fn existed(path: &Path, result: io::Result<()>) -> Result<bool> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Appended bytes between writeback hints.
pub const WRITEBACK_STEP: u64 = 1 << 20;

/// Where the last writeback hint of an appended file ended (see [`FileHandle::appended`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct WritebackHints {
    hinted: u64,
}

impl WritebackHints {
    /// Hints for a file whose appends start at `at`.
    pub fn from(at: u64) -> Self {
        WritebackHints { hinted: at }
    }
}

/// A file handle that remembers its path, so every error names the file.
#[derive(Clone)]
pub struct FileHandle {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
}

impl std::fmt::Debug for FileHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl FileHandle {
    /// Opens `path` on `storage`.
    pub fn open(storage: &dyn Storage, path: &Path, mode: OpenMode) -> Result<Self> {
        let file = storage.open(path, mode).map_err(|e| Error::io(path, e))?;
        Ok(FileHandle {
            file,
            path: path.to_path_buf(),
        })
    }
    /// The path this handle was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The open file, shared.
    pub(crate) fn file(&self) -> Arc<dyn StorageFile> {
        self.file.clone()
    }
    /// See [`StorageFile::will_need`].
    pub fn will_need(&self, offset: u64, len: u64) {
        self.file.will_need(offset, len);
    }
    /// See [`StorageFile::read_exact_at`].
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }
    /// See [`StorageFile::write_all_at`].
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(&self.path, e))
    }
    /// See [`StorageFile::sync`]. Callers turn a failure into poisoning.
    pub fn sync(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let r = self.file.sync().map_err(|e| Error::io(&self.path, e));
        crate::stats::fsync_latency().observe(started.elapsed());
        r
    }
    /// See [`StorageFile::len`].
    pub fn len(&self) -> Result<u64> {
        self.file.len().map_err(|e| Error::io(&self.path, e))
    }
    /// True when the file is empty.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
    /// See [`StorageFile::set_len`].
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).map_err(|e| Error::io(&self.path, e))
    }
    /// See [`StorageFile::start_writeback`]; failures are ignored (it is only a hint).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        let _ = self.file.start_writeback(offset, len);
    }
    /// Notes that the file now ends at `end` after appends, starting writeback of what was
    /// appended since the last hint once that reaches [`WRITEBACK_STEP`]: the fsync that ends
    /// a long append then finds most bytes already on their way to disk.
    pub fn appended(&self, hints: &mut WritebackHints, end: u64) {
        if end.saturating_sub(hints.hinted) >= WRITEBACK_STEP {
            self.start_writeback(hints.hinted, end - hints.hinted);
            hints.hinted = end;
        }
    }
    /// See [`StorageFile::map`].
    pub fn map(&self) -> Result<Option<Map>> {
        self.file.map().map_err(|e| Error::io(&self.path, e))
    }
    /// See [`StorageFile::modified`].
    pub fn modified(&self) -> Result<u64> {
        self.file.modified().map_err(|e| Error::io(&self.path, e))
    }
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, directory fsync.
pub fn write_atomic(storage: &dyn Storage, path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let file = FileHandle::open(storage, &tmp, OpenMode::Truncate)?;
    file.write_all_at(bytes, 0)?;
    file.sync()?;
    drop(file);
    storage.rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    storage.sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// A whole (small) file, or `None` when it does not exist.
pub fn read_whole(storage: &dyn Storage, path: &Path) -> Result<Option<Vec<u8>>> {
    let file = match storage.open(path, OpenMode::Read) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let len = file.len().map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut buf, 0)
        .map_err(|e| Error::io(path, e))?;
    Ok(Some(buf))
}

/// Creates `dir/name` (replacing what is there) holding `header`, durable with its directory
/// entry: how a new segment or journal starts.
pub fn create_with_header(
    storage: &dyn Storage,
    dir: &Path,
    name: &str,
    header: &[u8],
) -> Result<FileHandle> {
    let file = FileHandle::open(storage, &dir.join(name), OpenMode::Truncate)?;
    file.write_all_at(header, 0)?;
    file.sync()?;
    storage.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(file)
}

/// Removes the unfinished atomic writes (`*.tmp`, see [`write_atomic`]) left in `dir` by a
/// crash; at open, before anything is written there.
pub fn remove_unfinished_writes(storage: &dyn Storage, dir: &Path) -> Result<()> {
    let names = match storage.list(dir) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = false;
    for name in names.iter().filter(|n| n.ends_with(".tmp")) {
        let path = dir.join(name);
        existed(&path, storage.remove(&path))?;
        removed = true;
    }
    if removed {
        storage.sync_dir(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

/// A file of the real file system and the path it was opened by (its maps are entered in
/// the table of origins under it: `sys/origins.rs`).
struct RealFile(File, Arc<Path>);

impl StorageFile for RealFile {
    fn modified(&self) -> io::Result<u64> {
        let t = self.0.metadata()?.modified()?;
        Ok(t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()))
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn map(&self) -> io::Result<Option<Map>> {
        Map::of_named_file(&self.0, &self.1).map(Some)
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::sys::start_writeback(&self.0, offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        let _ = rustix::fs::fadvise(
            &self.0,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::WillNeed,
        );
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.0))
    }
}

/// Mode of the files the engine creates: the owner reads and writes, its group may read (an
/// operator's backup or monitoring group), others nothing.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the directories the engine creates (the data directory among them).
pub const DIR_MODE: u32 = 0o750;

impl Storage for RealStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut o = OpenOptions::new();
        // Images may be private: files the engine creates are never readable by other users,
        // whatever the umask (which can only take more away).
        o.mode(FILE_MODE);
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
            OpenMode::Truncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Arc::new(RealFile(o.open(path)?, Arc::from(path))))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>> {
        let path = dir.join("LOCK");
        let mut file = OpenOptions::new()
            .mode(FILE_MODE)
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "unknown process".to_owned(),
                pid => format!("pid {pid}"),
            };
            return Err(Error::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        Ok(Box::new(file))
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// The real file system, read, with every change kept in memory: what `fsck` without
/// `--repair` opens a directory on. Opening mends what it must (a torn tail cut, a missing
/// journal started, leftovers removed) in this view only, so the check sees what a server
/// would, and not a byte on disk changes. Files are copied into memory when first opened
/// for writing (the active segment and the journal; sealed segments stay mapped from disk).
/// The directory lock is the real one: a running server still keeps the tool out.
#[derive(Default)]
pub struct OverlayStorage {
    real: RealStorage,
    mem: SimStorage,
    state: Mutex<OverlayState>,
}

#[derive(Default)]
struct OverlayState {
    /// Files whose current bytes are in memory.
    copied: std::collections::HashSet<PathBuf>,
    /// Real files removed in this view.
    removed: std::collections::HashSet<PathBuf>,
}

impl OverlayStorage {
    /// A view of the real file system that never writes to it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves `path` into memory with its real bytes (caller holds the state lock); false
    /// when it does not exist in this view.
    fn copy_in(&self, st: &mut OverlayState, path: &Path) -> io::Result<bool> {
        if st.copied.contains(path) {
            return Ok(true);
        }
        if st.removed.contains(path) {
            return Ok(false);
        }
        let real = match self.real.open(path, OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let len = usize::try_from(real.len()?).map_err(|_| io::Error::other("file too large"))?;
        let mut bytes = vec![0u8; len];
        real.read_exact_at(&mut bytes, 0)?;
        let copy = self.mem.open(path, OpenMode::Truncate)?;
        copy.write_all_at(&bytes, 0)?;
        st.copied.insert(path.to_path_buf());
        Ok(true)
    }
}

impl Storage for OverlayStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        let mut st = self.state.lock();
        if st.copied.contains(path) {
            return self.mem.open(path, mode);
        }
        if mode == OpenMode::Read {
            if st.removed.contains(path) {
                return Err(io::ErrorKind::NotFound.into());
            }
            return self.real.open(path, mode);
        }
        let exists = mode != OpenMode::Truncate && self.copy_in(&mut st, path)?;
        match (mode, exists) {
            (OpenMode::CreateNew, true) => Err(io::ErrorKind::AlreadyExists.into()),
            (OpenMode::ReadWrite, false) => Err(io::ErrorKind::NotFound.into()),
            (OpenMode::ReadWrite, true) => self.mem.open(path, OpenMode::ReadWrite),
            _ => {
                st.removed.remove(path);
                st.copied.insert(path.to_path_buf());
                self.mem.open(path, OpenMode::Truncate)
            }
        }
    }
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        if !self.copy_in(&mut st, path)? {
            return Err(io::ErrorKind::NotFound.into());
        }
        st.copied.remove(path);
        st.removed.insert(path.to_path_buf());
        self.mem.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut st = self.state.lock();
        if !self.copy_in(&mut st, from)? {
            return Err(io::ErrorKind::NotFound.into());
        }
        self.mem.rename(from, to)?;
        st.copied.remove(from);
        st.removed.insert(from.to_path_buf());
        st.removed.remove(to);
        st.copied.insert(to.to_path_buf());
        Ok(())
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let st = self.state.lock();
        let mut names: Vec<String> = match self.real.list(dir) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        names.retain(|n| !st.removed.contains(&dir.join(n)));
        for n in self.mem.list(dir)? {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        Ok(names)
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>> {
        self.real.lock(dir)
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        self.real.free_bytes(dir)
    }
}

/// An in-memory storage for crash tests. Each file keeps the bytes written (`live`) apart from
/// the bytes made durable by `sync`; directory entries become durable on `sync_dir`.
/// [`SimStorage::crash_image`] returns the storage as a power cut would leave it.
#[derive(Clone, Default)]
pub struct SimStorage {
    state: Arc<Mutex<SimState>>,
}

#[derive(Default)]
struct SimState {
    live: HashMap<PathBuf, Arc<Mutex<SimInode>>>,
    durable: HashMap<PathBuf, Arc<Mutex<SimInode>>>,
    sync_count: u64,
    crash_at_sync: Option<u64>,
    crashed: bool,
    fail_syncs: bool,
    /// What `free_bytes` answers (unbounded when unset).
    free_bytes: Option<u64>,
}

#[derive(Default, Clone)]
struct SimInode {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Last write, seconds since the epoch.
    modified: u64,
}

fn crashed_err() -> io::Error {
    io::Error::other("simulated power cut")
}

impl SimStorage {
    /// A new, empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// The storage "loses power" at sync point `n` (1-based): that sync and every later
    /// operation fail.
    pub fn crash_at_sync(&self, n: u64) {
        self.state.lock().crash_at_sync = Some(n);
    }

    /// Makes `free_bytes` answer `n` (a file system that is nearly full).
    pub fn set_free_bytes(&self, n: Option<u64>) {
        self.state.lock().free_bytes = n;
    }

    /// Every later sync fails with an I/O error (to test poisoning), without crashing.
    pub fn fail_syncs(&self) {
        self.state.lock().fail_syncs = true;
    }

    /// Syncs work again after [`SimStorage::fail_syncs`] (a transient device error).
    pub fn heal_syncs(&self) {
        self.state.lock().fail_syncs = false;
    }

    /// How many sync points (file or directory syncs) have been passed.
    pub fn sync_count(&self) -> u64 {
        self.state.lock().sync_count
    }

    /// True once the simulated power cut happened.
    pub fn has_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// The storage as it is after a power cut now: only durable directory entries, each file
    /// with its durable bytes. With `torn_seed`, each file also keeps a pseudo-random subset of
    /// its unsynced 4 KiB pages, as a disk that reorders writes may.
    pub fn crash_image(&self, torn_seed: Option<u64>) -> SimStorage {
        let st = self.state.lock();
        let mut live = HashMap::new();
        let mut rng = crate::testdata::XorShift::new(torn_seed.unwrap_or(0) | 1);
        let mut last = 0;
        for (path, inode) in &st.durable {
            let inode = inode.lock();
            let mut bytes = inode.durable.clone();
            if torn_seed.is_some() && inode.live.len() > bytes.len() {
                let start = bytes.len();
                bytes.extend_from_slice(&inode.live[start..]);
                let mut page = start;
                while page < bytes.len() {
                    last = rng.next();
                    let end = ((page / 4096) + 1) * 4096;
                    let end = end.min(bytes.len());
                    if last.is_multiple_of(3) {
                        bytes[page..end].fill(0);
                    }
                    page = end;
                }
                // A torn tail is usually cut short too.
                let keep = start + (last as usize % (bytes.len() - start + 1));
                bytes.truncate(keep);
            }
            let node = Arc::new(Mutex::new(SimInode {
                live: bytes.clone(),
                durable: bytes,
                modified: inode.modified,
            }));
            live.insert(path.clone(), node);
        }
        let durable = live.clone();
        SimStorage {
            state: Arc::new(Mutex::new(SimState {
                live,
                durable,
                ..SimState::default()
            })),
        }
    }

    /// Sets when a file was last written (seconds since the epoch), for tests of ages.
    pub fn set_modified(&self, path: &Path, secs: u64) {
        if let Some(node) = self.state.lock().live.get(path) {
            node.lock().modified = secs;
        }
    }

    /// Flips one bit of a file's bytes (live and durable), for corruption tests.
    pub fn flip_bit(&self, path: &Path, offset: usize) {
        let st = self.state.lock();
        if let Some(node) = st.live.get(path) {
            let mut node = node.lock();
            if let Some(b) = node.live.get_mut(offset) {
                *b ^= 0x10;
            }
            if let Some(b) = node.durable.get_mut(offset) {
                *b ^= 0x10;
            }
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.state.lock().crashed {
            return Err(crashed_err());
        }
        Ok(())
    }

    fn sync_point(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        if st.crashed {
            return Err(crashed_err());
        }
        if st.fail_syncs {
            return Err(io::Error::other("simulated sync failure"));
        }
        st.sync_count += 1;
        if st.crash_at_sync == Some(st.sync_count) {
            st.crashed = true;
            return Err(crashed_err());
        }
        Ok(())
    }
}

struct SimFile {
    storage: SimStorage,
    inode: Arc<Mutex<SimInode>>,
    writable: bool,
}

impl StorageFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.storage.check()?;
        let node = self.inode.lock();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = node
            .live
            .get(start..start.saturating_add(buf.len()))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.storage.check()?;
        if !self.writable {
            return Err(io::Error::other("file opened read-only"));
        }
        let mut node = self.inode.lock();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + buf.len();
        if node.live.len() < end {
            node.live.resize(end, 0);
        }
        node.live[start..end].copy_from_slice(buf);
        node.modified = crate::clock::now_secs();
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.storage.sync_point()?;
        let mut node = self.inode.lock();
        node.durable = node.live.clone();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.storage.check()?;
        Ok(self.inode.lock().live.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.storage.check()?;
        let len = usize::try_from(len).map_err(io::Error::other)?;
        let mut node = self.inode.lock();
        node.live.resize(len, 0);
        node.modified = crate::clock::now_secs();
        Ok(())
    }
    fn map(&self) -> io::Result<Option<Map>> {
        Ok(None)
    }
    fn modified(&self) -> io::Result<u64> {
        self.storage.check()?;
        Ok(self.inode.lock().modified)
    }
}

impl Storage for SimStorage {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn StorageFile>> {
        self.check()?;
        let mut st = self.state.lock();
        let inode = match (mode, st.live.get(path)) {
            (OpenMode::CreateNew, Some(_)) => return Err(io::ErrorKind::AlreadyExists.into()),
            (OpenMode::Read | OpenMode::ReadWrite, None) => {
                return Err(io::ErrorKind::NotFound.into())
            }
            (OpenMode::Truncate, Some(node)) => {
                node.lock().live.clear();
                node.clone()
            }
            (_, Some(node)) => node.clone(),
            (_, None) => {
                let node = Arc::new(Mutex::new(SimInode::default()));
                st.live.insert(path.to_path_buf(), node.clone());
                node
            }
        };
        Ok(Arc::new(SimFile {
            storage: self.clone(),
            inode,
            writable: mode != OpenMode::Read,
        }))
    }
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        self.check()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.check()?;
        self.state
            .lock()
            .live
            .remove(path)
            .map(|_| ())
            .ok_or(io::ErrorKind::NotFound.into())
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check()?;
        let mut st = self.state.lock();
        let node = st
            .live
            .remove(from)
            .ok_or(io::Error::from(io::ErrorKind::NotFound))?;
        st.live.insert(to.to_path_buf(), node);
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sync_point()?;
        let mut st = self.state.lock();
        st.durable.retain(|p, _| p.parent() != Some(dir));
        let entries: Vec<_> = st
            .live
            .iter()
            .filter(|(p, _)| p.parent() == Some(dir))
            .map(|(p, n)| (p.clone(), n.clone()))
            .collect();
        st.durable.extend(entries);
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.check()?;
        let st = self.state.lock();
        Ok(st
            .live
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }
    fn lock(&self, _dir: &Path) -> Result<Box<dyn Send + Sync>> {
        Ok(Box::new(()))
    }
    fn free_bytes(&self, _dir: &Path) -> io::Result<u64> {
        Ok(self.state.lock().free_bytes.unwrap_or(u64::MAX))
    }
}

/// Drops a file's clean pages from the page cache (after an fsync), so the next read of it
/// comes from the storage device: for benchmarks that measure cold reads.
pub fn drop_page_cache(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    crate::sys::drop_page_cache(&file)
}
