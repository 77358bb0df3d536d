//! The catalog: repositories, tags, manifest links and blob links (docs/design.md, "Catalog").
//!
//! The state lives in memory and is changed only by committed batches of [`Op`]s. A batch is
//! appended to the journal and made durable before it is applied, so nothing is visible before
//! it is on stable storage, and a batch (a manifest and its tags, say) is atomic across a
//! crash. Concurrent commits share fsyncs (group commit): each plans and appends its batch in
//! turn, against the state with every appended batch applied, then one fsync makes all the
//! batches appended so far durable and visible. A failed fsync poisons the catalog. The
//! journal is folded into a snapshot once it grows past a bound.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::io::{existed, write_atomic, FileHandle, OpenMode, Storage};
use crate::segment::{
    self, check_file_header_versions, file_header_versioned, record_header, RecordKind,
    JOURNAL_MAGIC,
};

/// Format of new journal files: 2 adds the SegmentsDurable record before each batch.
/// Journals of format 1 are read as well.
pub const JOURNAL_VERSION: u16 = 2;
const JOURNAL_VERSIONS: [u16; 2] = [1, JOURNAL_VERSION];

/// Magic of catalog snapshot files.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"\x89BLSNP\r\n";
/// Format of new snapshots: 2 writes one record per repository (each with its own CRC, so
/// damage is located) after a head record. Snapshots of format 1 (one record) are read too.
pub const SNAPSHOT_VERSION: u16 = 2;
const SNAPSHOT_VERSIONS: [u16; 2] = [1, SNAPSHOT_VERSION];
/// The journal is folded into a snapshot past this size.
pub const JOURNAL_BYTES_MAX: u64 = 8 << 20;

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What the catalog keeps about a manifest in a repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestLink {
    /// The media type it was pushed with.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// `artifactType`, or the config media type of an artifact manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its annotations (shown by the referrers API).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The manifest it refers to (`subject`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Digest>,
    /// Blobs and manifests it references, for GC and delete checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<Digest>,
    /// Seconds since the epoch when it was pushed.
    pub pushed_at: u64,
}

/// One repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repo {
    /// Tag → manifest digest.
    pub tags: BTreeMap<String, Digest>,
    /// Manifests in the repository.
    pub manifests: BTreeMap<Digest, ManifestLink>,
    /// Blobs linked to the repository, with the time they were linked.
    pub blobs: BTreeMap<Digest, u64>,
}

/// The whole catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Repositories by name.
    pub repos: BTreeMap<String, Repo>,
    /// How far the segments were durable (segment id, offset; `u64::MAX` for a whole
    /// sealed segment) when the last batch was committed: every blob that batch could
    /// reference lies before it. Recovery treats damage before this point in the active
    /// segment as damage to acknowledged data, never as a torn tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segments_durable: Option<(u64, u64)>,
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Link a blob to a repository.
    LinkBlob {
        repo: String,
        digest: Digest,
        at: u64,
    },
    /// Remove a blob link.
    UnlinkBlob { repo: String, digest: Digest },
    /// Add or replace a manifest link.
    PutManifest {
        repo: String,
        digest: Digest,
        link: ManifestLink,
    },
    /// Remove a manifest and every tag pointing at it.
    DeleteManifest { repo: String, digest: Digest },
    /// Point a tag at a manifest.
    Tag {
        repo: String,
        tag: String,
        digest: Digest,
    },
    /// Remove a tag.
    Untag { repo: String, tag: String },
}

impl State {
    /// Applies one op. Ops are validated before commit; applying never fails.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::LinkBlob { repo, digest, at } => {
                self.repos
                    .entry(repo.clone())
                    .or_default()
                    .blobs
                    .insert(digest.clone(), *at);
            }
            Op::UnlinkBlob { repo, digest } => {
                if let Some(r) = self.repos.get_mut(repo) {
                    r.blobs.remove(digest);
                }
                self.drop_if_empty(repo);
            }
            Op::PutManifest { repo, digest, link } => {
                self.repos
                    .entry(repo.clone())
                    .or_default()
                    .manifests
                    .insert(digest.clone(), link.clone());
            }
            Op::DeleteManifest { repo, digest } => {
                if let Some(r) = self.repos.get_mut(repo) {
                    r.manifests.remove(digest);
                    r.tags.retain(|_, d| d != digest);
                }
                self.drop_if_empty(repo);
            }
            Op::Tag { repo, tag, digest } => {
                self.repos
                    .entry(repo.clone())
                    .or_default()
                    .tags
                    .insert(tag.clone(), digest.clone());
            }
            Op::Untag { repo, tag } => {
                if let Some(r) = self.repos.get_mut(repo) {
                    r.tags.remove(tag);
                }
                self.drop_if_empty(repo);
            }
        }
    }

    fn drop_if_empty(&mut self, repo: &str) {
        if self
            .repos
            .get(repo)
            .is_some_and(|r| r.tags.is_empty() && r.manifests.is_empty() && r.blobs.is_empty())
        {
            self.repos.remove(repo);
        }
    }
}

struct Journal {
    generation: u64,
    file: FileHandle,
    len: u64,
}

/// The journal and what has been appended to it but may not be durable yet.
/// A committed batch: its ops, and the segments' durable point recorded with it.
type Batch = (Vec<Op>, Option<(u64, u64)>);

struct Appended {
    journal: Journal,
    /// The state with every appended batch applied, durable or not: what plans see, so a
    /// batch is checked against every batch before it.
    planned: State,
    /// Appended batches not yet durable, in order, with the segments' durable point each
    /// recorded.
    unsynced: VecDeque<Batch>,
    /// Where the last appended batch ends (generation, offset).
    last_batch: (u64, u64),
}

/// The open catalog.
pub struct Catalog {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    /// What readers see: the durable batches.
    state: RwLock<State>,
    /// Lock order: `synced` before `appended`.
    appended: Mutex<Appended>,
    /// Up to where (generation, offset) the journal is known durable; held by the one
    /// committer that syncs for all.
    synced: Mutex<(u64, u64)>,
    /// Set by a failed fsync or write after one: every later commit fails.
    poisoned: crate::error::Poison,
    journal_bytes_max: u64,
    /// A copy of `synced`, for readers that must not wait for a journal fsync (the
    /// segments record it: `RecordKind::CatalogDurable`).
    durable: Mutex<(u64, u64)>,
    /// What opening mended.
    warnings: Vec<String>,
    /// What a salvaging open could not mend.
    damage: Option<String>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("dir", &self.dir).finish()
    }
}

fn journal_name(generation: u64) -> String {
    format!("journal-{generation:020}.jnl")
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:020}.snp")
}

fn generation_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

impl Catalog {
    /// Opens the catalog in `dir` (created if absent): loads the newest snapshot and replays
    /// its journal. The caller holds the data directory's lock.
    pub fn open(storage: Arc<dyn Storage>, dir: &Path) -> Result<Catalog> {
        Self::open_with(storage, dir, JOURNAL_BYTES_MAX)
    }

    /// [`Catalog::open`] with a journal size bound.
    pub fn open_with(
        storage: Arc<dyn Storage>,
        dir: &Path,
        journal_bytes_max: u64,
    ) -> Result<Catalog> {
        Self::open_salvaging(storage, dir, journal_bytes_max, false)
    }

    /// [`Catalog::open_with`]; with `salvage` (fsck), a damaged snapshot that cannot be
    /// rebuilt from the generation before it is read for what its undamaged sections hold
    /// (and written again so: the damaged file is kept as `.damaged`); [`Catalog::damage`]
    /// then says what was lost.
    pub fn open_salvaging(
        storage: Arc<dyn Storage>,
        dir: &Path,
        journal_bytes_max: u64,
        salvage: bool,
    ) -> Result<Catalog> {
        storage.create_dir_all(dir).map_err(io_err(dir))?;
        let mut warnings = Vec::new();
        let mut damage = None;
        set_aside_stray_journals(storage.as_ref(), dir, &mut warnings)?;
        let names = storage.list(dir).map_err(io_err(dir))?;
        let snapshot_gen = names
            .iter()
            .filter_map(|n| generation_of(n, "snapshot-", ".snp"))
            .max();
        let generation = snapshot_gen.unwrap_or(0);
        let mut state = match snapshot_gen {
            Some(g) => match read_snapshot(storage.as_ref(), &dir.join(snapshot_name(g))) {
                Ok(state) => state,
                Err(e) if e.is_corruption() => {
                    // The previous generation (its snapshot and journal, kept until the next
                    // fold) holds exactly what this snapshot was folded from.
                    let path = dir.join(snapshot_name(g));
                    let state = match rebuild_from_previous(storage.as_ref(), dir, &names, g) {
                        Ok(state) => {
                            warnings.push(format!(
                                "catalog snapshot {} was damaged ({e}); it was rebuilt from \
                                 generation {} (its snapshot and journal, kept for this) and \
                                 written again",
                                path.display(),
                                g - 1
                            ));
                            state
                        }
                        Err(why) => {
                            let unrecoverable = format!(
                                "catalog snapshot damaged ({e}), and it cannot be rebuilt from \
                                 the generation before it: {why}"
                            );
                            let salvaged = salvage
                                .then(|| read_snapshot_salvaging(storage.as_ref(), &path))
                                .and_then(Result::ok);
                            let Some((state, lost)) = salvaged else {
                                return Err(Error::corrupted(&path, 0, unrecoverable));
                            };
                            let aside = path.with_extension("snp.damaged");
                            storage.rename(&path, &aside).map_err(io_err(&path))?;
                            damage = Some(format!(
                                "{unrecoverable}. What its undamaged sections hold was kept \
                                 ({} repositories; {lost} lost, their tags and links with them; \
                                 the damaged file is {})",
                                state.repos.len(),
                                aside.display()
                            ));
                            state
                        }
                    };
                    write_snapshot(storage.as_ref(), &dir.join(snapshot_name(g)), &state)?;
                    state
                }
                Err(e) => return Err(e),
            },
            None => State::default(),
        };
        let path = dir.join(journal_name(generation));
        let journal = if names.contains(&journal_name(generation)) {
            let file = FileHandle::open(storage.as_ref(), &path, OpenMode::ReadWrite)?;
            let len = replay_journal(&file, &mut state)?;
            Journal {
                generation,
                file,
                len,
            }
        } else {
            new_journal(storage.as_ref(), dir, generation)?
        };
        // The generation before this one stays (a damaged snapshot is rebuilt from it);
        // older ones are removed.
        for name in &names {
            let old = generation_of(name, "snapshot-", ".snp")
                .or_else(|| generation_of(name, "journal-", ".jnl"));
            if old.is_some_and(|g| g + 1 < generation) || name.ends_with(".tmp") {
                let p = dir.join(name);
                storage.remove(&p).map_err(io_err(&p))?;
            }
        }
        let position = (journal.generation, journal.len);
        Ok(Catalog {
            storage,
            dir: dir.to_path_buf(),
            appended: Mutex::new(Appended {
                journal,
                planned: state.clone(),
                unsynced: VecDeque::new(),
                last_batch: position,
            }),
            state: RwLock::new(state),
            synced: Mutex::new(position),
            durable: Mutex::new(position),
            poisoned: crate::error::Poison::default(),
            journal_bytes_max,
            warnings,
            damage,
        })
    }

    /// What a salvaging open could not mend (a snapshot whose damaged sections were lost).
    pub fn damage(&self) -> Option<&str> {
        self.damage.as_deref()
    }

    /// How far the journal is durable: (generation, offset).
    pub fn durable_position(&self) -> (u64, u64) {
        *self.durable.lock()
    }

    /// What opening mended (a damaged snapshot rebuilt, a stray journal set aside).
    pub fn open_warnings(&self) -> &[String] {
        &self.warnings
    }

    /// A read view of the state.
    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read()
    }

    /// Validates and commits a batch atomically: `plan` sees the current state with every
    /// earlier batch applied (no other commit can run in between) and returns the ops to
    /// commit, or an error of the caller's own type. The ops are durable before they are
    /// applied and this returns; when `plan` commits nothing, this still waits until the
    /// batches it saw are durable.
    ///
    /// Engine-internal: everything else changes the catalog through the store's one door,
    /// [`crate::Store::commit_catalog`], which pins what a batch starts to reference against
    /// a running collection.
    ///
    /// `segments_durable` is how far the store's segments are durable now; it is written
    /// with the batch (see [`State::segments_durable`]).
    pub(crate) fn commit_with<T, E: From<Error>>(
        &self,
        segments_durable: Option<(u64, u64)>,
        plan: impl FnOnce(&State) -> Result<(Vec<Op>, T), E>,
    ) -> Result<T, E> {
        self.check_poisoned()?;
        let (position, out) = {
            let mut a = self.appended.lock();
            let (ops, out) = plan(&a.planned)?;
            if !ops.is_empty() {
                let payload = serde_json::to_vec(&ops)
                    .map_err(|e| Error::Internal(format!("catalog batch: {e}")))?;
                let header = record_header(RecordKind::CatalogBatch, 0, &[&payload]);
                let mut rec = Vec::with_capacity(header.len() + payload.len() + 32);
                if let Some((segment, offset)) = segments_durable {
                    let mut point = segment.to_le_bytes().to_vec();
                    point.extend_from_slice(&offset.to_le_bytes());
                    rec.extend_from_slice(&record_header(
                        RecordKind::SegmentsDurable,
                        0,
                        &[&point],
                    ));
                    rec.extend_from_slice(&point);
                    a.planned.segments_durable = Some((segment, offset));
                }
                rec.extend_from_slice(&header);
                rec.extend_from_slice(&payload);
                let at = a.journal.len;
                if let Err(e) = a.journal.file.write_all_at(&rec, at) {
                    let _ = a.journal.file.set_len(at);
                    return Err(e.into());
                }
                a.journal.len += rec.len() as u64;
                for op in &ops {
                    a.planned.apply(op);
                }
                a.unsynced.push_back((ops, segments_durable));
                a.last_batch = (a.journal.generation, a.journal.len);
            }
            (a.last_batch, out)
        };
        self.sync_through(position)?;
        Ok(out)
    }

    /// Makes the journal durable at least up to `position`, and the batches before it
    /// visible: whoever comes first syncs for every batch appended so far.
    fn sync_through(&self, position: (u64, u64)) -> Result<()> {
        let mut synced = self.synced.lock();
        if *synced >= position {
            return Ok(());
        }
        self.check_poisoned()?;
        let (file, target, batches) = {
            let mut a = self.appended.lock();
            let target = (a.journal.generation, a.journal.len);
            (
                a.journal.file.clone(),
                target,
                std::mem::take(&mut a.unsynced),
            )
        };
        // Appends go on meanwhile; they wait for the next fsync.
        file.sync().map_err(|e| self.poison(e))?;
        *synced = target;
        *self.durable.lock() = target;
        self.make_visible(batches);
        let mut a = self.appended.lock();
        if (a.journal.generation, a.journal.len) == target {
            // The mark after a sync tells recovery that everything before it was
            // acknowledged; it carries its own offset, so it is written only when nothing
            // was appended after the sync.
            let mark_at = a.journal.len;
            let mark = mark_at.to_le_bytes();
            let mut m = record_header(RecordKind::SyncMark, 0, &[&mark]).to_vec();
            m.extend_from_slice(&mark);
            a.journal
                .file
                .write_all_at(&m, mark_at)
                .map_err(|e| self.poison(e))?;
            a.journal.len += m.len() as u64;
        }
        if a.journal.len > self.journal_bytes_max {
            if !a.unsynced.is_empty() {
                // Batches appended during the fsync: under steady load there always are some,
                // so make them durable and visible now, holding appends back for one fsync,
                // or the journal (and the replay at open) would grow without bound.
                a.journal.file.sync().map_err(|e| self.poison(e))?;
                self.make_visible(std::mem::take(&mut a.unsynced));
            }
            // Nothing is in flight: the visible state is the planned one. A fold cut short
            // leaves the journal it replaces in use while a newer snapshot may exist: nothing
            // more may be appended to it.
            self.fold(&mut a.journal).map_err(|e| self.poison(e))?;
            *synced = (a.journal.generation, a.journal.len);
            *self.durable.lock() = *synced;
            a.last_batch = *synced;
        }
        Ok(())
    }

    /// Applies batches that are now durable to the state readers see, in order.
    fn make_visible(&self, batches: VecDeque<Batch>) {
        let mut state = self.state.write();
        for (ops, durable) in &batches {
            for op in ops {
                state.apply(op);
            }
            if durable.is_some() {
                state.segments_durable = *durable;
            }
        }
    }

    /// `Err(Poisoned)` once a failed fsync poisoned the catalog.
    pub fn check_poisoned(&self) -> Result<()> {
        self.poisoned.check()
    }

    fn poison(&self, err: Error) -> Error {
        self.poisoned.set(format!("catalog journal: {err}"))
    }

    /// Commits ops without a precondition (the catalog's own tests).
    #[cfg(all(test, not(feature = "internals")))]
    pub(crate) fn commit(&self, ops: Vec<Op>) -> Result<()> {
        self.commit_with(None, |_| Ok((ops, ())))
    }

    /// Commits ops without a precondition, bypassing the store's GC barrier: with the
    /// `internals` feature only, for the fuzz targets that drive a catalog alone.
    #[cfg(feature = "internals")]
    pub fn commit(&self, ops: Vec<Op>) -> Result<()> {
        self.commit_with(None, |_| Ok((ops, ())))
    }

    /// Writes a snapshot of the state and starts a new journal generation. The snapshot is
    /// read back and compared before anything switches to it, and the generation before
    /// stays until the next fold: a snapshot damaged later is rebuilt from it at open.
    fn fold(&self, journal: &mut Journal) -> Result<()> {
        let next = journal.generation + 1;
        let state = self.state.read().clone();
        let path = self.dir.join(snapshot_name(next));
        write_snapshot(self.storage.as_ref(), &path, &state)?;
        if read_snapshot(self.storage.as_ref(), &path)? != state {
            return Err(Error::corrupted(
                &path,
                0,
                "the snapshot just written reads back differently",
            ));
        }
        let old = std::mem::replace(
            journal,
            new_journal(self.storage.as_ref(), &self.dir, next)?,
        );
        if let Some(g) = old.generation.checked_sub(1) {
            for p in [
                self.dir.join(journal_name(g)),
                self.dir.join(snapshot_name(g)),
            ] {
                existed(&p, self.storage.remove(&p))?;
            }
        }
        self.storage.sync_dir(&self.dir).map_err(io_err(&self.dir))
    }
}

/// A snapshot's head record (format 2).
#[derive(Serialize, Deserialize)]
struct SnapshotHead {
    repos: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    segments_durable: Option<(u64, u64)>,
}

/// One repository's section of a snapshot (format 2).
#[derive(Serialize, Deserialize)]
struct SnapshotSection {
    name: String,
    repo: Repo,
}

/// Writes `state` as a snapshot (format 2) atomically: a head record, then one record per
/// repository, each with its own CRC.
fn write_snapshot(storage: &dyn Storage, path: &Path, state: &State) -> Result<()> {
    fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| Error::Internal(format!("catalog snapshot: {e}")))
    }
    let mut out = file_header_versioned(SNAPSHOT_MAGIC, SNAPSHOT_VERSION).to_vec();
    let mut push = |payload: Vec<u8>| {
        out.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&payload]));
        out.extend_from_slice(&payload);
    };
    push(json(&SnapshotHead {
        repos: state.repos.len(),
        segments_durable: state.segments_durable,
    })?);
    for (name, repo) in &state.repos {
        push(json(&SnapshotSection {
            name: name.clone(),
            repo: repo.clone(),
        })?);
    }
    write_atomic(storage, path, &out)
}

/// Rebuilds the state snapshot `generation` was folded from: the previous generation's
/// snapshot (none for generation 0) and its whole journal. `Err` says why it cannot.
fn rebuild_from_previous(
    storage: &dyn Storage,
    dir: &Path,
    names: &[String],
    generation: u64,
) -> std::result::Result<State, String> {
    let prev = generation
        .checked_sub(1)
        .ok_or("it is the first generation")?;
    if !names.contains(&journal_name(prev)) {
        return Err(format!(
            "{} is gone (directories written before the previous generation was kept have \
             none)",
            journal_name(prev)
        ));
    }
    let mut state = if prev == 0 {
        State::default()
    } else if names.contains(&snapshot_name(prev)) {
        read_snapshot(storage, &dir.join(snapshot_name(prev))).map_err(|e| e.to_string())?
    } else {
        return Err(format!("{} is gone", snapshot_name(prev)));
    };
    let file = FileHandle::open(storage, &dir.join(journal_name(prev)), OpenMode::Read)
        .map_err(|e| e.to_string())?;
    replay_journal(&file, &mut state).map_err(|e| e.to_string())?;
    Ok(state)
}

/// Sets aside journals newer than every snapshot that hold no batch (a stray file: renamed
/// to `.stray`, with a warning). One that holds batches is acknowledged data whose snapshot
/// is missing: opening fails and names it.
fn set_aside_stray_journals(
    storage: &dyn Storage,
    dir: &Path,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let names = storage.list(dir).map_err(io_err(dir))?;
    let newest_snapshot = names
        .iter()
        .filter_map(|n| generation_of(n, "snapshot-", ".snp"))
        .max()
        .unwrap_or(0);
    for (g, name) in names
        .iter()
        .filter_map(|n| generation_of(n, "journal-", ".jnl").map(|g| (g, n)))
        .filter(|(g, _)| *g > newest_snapshot)
    {
        let path = dir.join(name);
        let file = FileHandle::open(storage, &path, OpenMode::Read)?;
        let mut batches = 0usize;
        let _ = segment::scan(&file, segment::FILE_HEADER_LEN as u64, |rec| {
            batches += usize::from(rec.header.kind == RecordKind::CatalogBatch);
            Ok(())
        });
        if batches > 0 {
            return Err(Error::corrupted(
                &path,
                0,
                format!(
                    "catalog journal of generation {g} holds {batches} batches but its snapshot \
                     ({}) is missing",
                    snapshot_name(g)
                ),
            ));
        }
        let aside = dir.join(format!("{name}.stray"));
        storage.rename(&path, &aside).map_err(io_err(&path))?;
        warnings.push(format!(
            "{} is newer than every catalog snapshot and holds no batch: set aside as {}",
            path.display(),
            aside.display()
        ));
    }
    Ok(())
}

fn new_journal(storage: &dyn Storage, dir: &Path, generation: u64) -> Result<Journal> {
    let name = journal_name(generation);
    let file = crate::io::create_with_header(
        storage,
        dir,
        &name,
        &file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION),
    )?;
    Ok(Journal {
        generation,
        file,
        len: segment::FILE_HEADER_LEN as u64,
    })
}

fn read_snapshot(storage: &dyn Storage, path: &Path) -> Result<State> {
    let file = FileHandle::open(storage, path, OpenMode::Read)?;
    let mut head = [0u8; segment::FILE_HEADER_LEN];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| Error::corrupted(path, 0, "snapshot shorter than its header"))?;
    let version = check_file_header_versions(path, SNAPSHOT_MAGIC, &head, &SNAPSHOT_VERSIONS)?;
    let bad = |offset: u64, why: String| Error::corrupted(path, offset, format!("snapshot: {why}"));
    if version == 1 {
        let (_, payload) = segment::read_record(&file, segment::FILE_HEADER_LEN as u64)?;
        return serde_json::from_slice(&payload)
            .map_err(|e| bad(segment::FILE_HEADER_LEN as u64, e.to_string()));
    }
    let mut state = State::default();
    let mut expected = None;
    let (_, how) = segment::scan(&file, segment::FILE_HEADER_LEN as u64, |rec| {
        if expected.is_none() {
            let h: SnapshotHead = serde_json::from_slice(&rec.payload)
                .map_err(|e| bad(rec.offset, format!("head: {e}")))?;
            state.segments_durable = h.segments_durable;
            expected = Some(h.repos);
        } else {
            let section: SnapshotSection = serde_json::from_slice(&rec.payload)
                .map_err(|e| bad(rec.offset, format!("section: {e}")))?;
            state.repos.insert(section.name, section.repo);
        }
        Ok(())
    })?;
    if let segment::ScanEnd::Invalid { offset, reason } = how {
        return Err(bad(
            offset,
            format!(
                "{reason} in the section after repository {:?}",
                state.repos.keys().next_back()
            ),
        ));
    }
    if expected != Some(state.repos.len()) {
        return Err(bad(
            0,
            format!(
                "{} repositories of {:?} read: the snapshot was cut short",
                state.repos.len(),
                expected
            ),
        ));
    }
    Ok(state)
}

/// Reads what the undamaged sections of a snapshot (format 2) hold: the state and how many
/// repositories were lost (the head's count minus the sections read).
fn read_snapshot_salvaging(storage: &dyn Storage, path: &Path) -> Result<(State, usize)> {
    let file = FileHandle::open(storage, path, OpenMode::Read)?;
    let mut state = State::default();
    let mut expected = None;
    let mut damaged = 0usize;
    let (_, damage) = segment::scan_salvaging(&file, segment::FILE_HEADER_LEN as u64, |rec| {
        if let Ok(section) = serde_json::from_slice::<SnapshotSection>(&rec.payload) {
            state.repos.insert(section.name, section.repo);
        } else if let Ok(h) = serde_json::from_slice::<SnapshotHead>(&rec.payload) {
            state.segments_durable = h.segments_durable;
            expected = Some(h.repos);
        } else {
            damaged += 1;
        }
        Ok(())
    })?;
    let lost = match expected {
        Some(n) => n.saturating_sub(state.repos.len()),
        None => damage.len() + damaged,
    };
    Ok((state, lost))
}

fn replay_journal(file: &FileHandle, state: &mut State) -> Result<u64> {
    let path = file.path().to_path_buf();
    let mut head = [0u8; segment::FILE_HEADER_LEN];
    let len = file.len()?;
    if len < segment::FILE_HEADER_LEN as u64 || file.read_exact_at(&mut head, 0).is_err() {
        // Created, but the header never became durable.
        file.set_len(0)?;
        file.write_all_at(&file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION), 0)?;
        file.sync()?;
        return Ok(segment::FILE_HEADER_LEN as u64);
    }
    check_file_header_versions(&path, JOURNAL_MAGIC, &head, &JOURNAL_VERSIONS)?;
    let mut durable_end = segment::FILE_HEADER_LEN as u64;
    let mut batches: Vec<Vec<Op>> = Vec::new();
    let mut segments_durable = None;
    let (end, how) = segment::scan(file, segment::FILE_HEADER_LEN as u64, |rec| {
        match rec.header.kind {
            RecordKind::CatalogBatch => {
                let ops: Vec<Op> = serde_json::from_slice(&rec.payload).map_err(|e| {
                    Error::corrupted(&path, rec.offset, format!("catalog batch: {e}"))
                })?;
                batches.push(ops);
            }
            RecordKind::SyncMark => durable_end = rec.offset,
            RecordKind::SegmentsDurable => {
                let point: [u8; 16] = rec.payload.as_slice().try_into().map_err(|_| {
                    Error::corrupted(&path, rec.offset, "segments-durable record is not 16 bytes")
                })?;
                let [s, o] = [&point[..8], &point[8..]]
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
                segments_durable = Some((s, o));
            }
            _ => {
                return Err(Error::corrupted(
                    &path,
                    rec.offset,
                    "unexpected record kind in the catalog journal",
                ))
            }
        }
        Ok(())
    })?;
    segment::settle_tail(file, &how, durable_end, true)?;
    for ops in &batches {
        for op in ops {
            state.apply(op);
        }
    }
    if segments_durable.is_some() {
        state.segments_durable = segments_durable;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;
    use crate::io::SimStorage;

    fn link() -> ManifestLink {
        ManifestLink {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 10,
            artifact_type: None,
            annotations: BTreeMap::new(),
            subject: None,
            references: vec![],
            pushed_at: 1,
        }
    }

    #[test]
    fn batches_survive_reopen_and_folding() {
        let sim = SimStorage::new();
        let dir = Path::new("/c");
        let d = |i: u32| Digest::of(Algorithm::Sha256, &i.to_le_bytes());
        {
            let c = Catalog::open_with(Arc::new(sim.clone()), dir, 64 << 10).expect("open");
            for i in 0..3000u32 {
                let repo = format!("r{}", i % 7);
                c.commit(vec![
                    Op::PutManifest {
                        repo: repo.clone(),
                        digest: d(i),
                        link: link(),
                    },
                    Op::Tag {
                        repo,
                        tag: format!("t{}", i % 50),
                        digest: d(i),
                    },
                ])
                .expect("commit");
            }
        }
        let c = Catalog::open(Arc::new(sim.crash_image(None)), dir).expect("reopen");
        let st = c.read();
        assert_eq!(st.repos.len(), 7);
        let last = (0..3000u32)
            .filter(|i| i % 7 == 0 && i % 50 == 49)
            .max()
            .expect("some");
        assert_eq!(st.repos["r0"].tags["t49"], d(last));
        let total: usize = st.repos.values().map(|r| r.manifests.len()).sum();
        assert_eq!(total, 3000);
        drop(st);
        let names = sim.crash_image(None).list(dir).expect("list");
        assert!(
            names.iter().any(|n| n.starts_with("snapshot-")),
            "{names:?}"
        );
    }

    /// Commits until the journal has been folded at least `folds` times; returns the state.
    fn fold_times(c: &Catalog, folds: usize) -> State {
        let d = |i: u32| Digest::of(Algorithm::Sha256, &i.to_le_bytes());
        let mut i = 0u32;
        while c.appended.lock().journal.generation < folds as u64 {
            c.commit(vec![
                Op::PutManifest {
                    repo: format!("r{}", i % 5),
                    digest: d(i),
                    link: link(),
                },
                Op::Tag {
                    repo: format!("r{}", i % 5),
                    tag: format!("t{i}"),
                    digest: d(i),
                },
            ])
            .expect("commit");
            i += 1;
        }
        // A batch in the newest journal too.
        c.commit(vec![tag("after-the-fold")]).expect("commit");
        c.read().clone()
    }

    fn generation_files(sim: &SimStorage, dir: &Path) -> Vec<String> {
        let mut names = sim.list(dir).expect("list");
        names.sort();
        names
    }

    /// #14 item 2: one flipped bit in the newest snapshot no longer makes the registry
    /// unrecoverable. The generation before it (snapshot and journal) is kept until the next
    /// fold, and the damaged snapshot is rebuilt from it at open, with a warning.
    #[test]
    fn a_damaged_snapshot_is_rebuilt_from_the_generation_before_it() {
        let sim = SimStorage::new();
        let dir = Path::new("/c");
        let before = {
            let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
            fold_times(&c, 3)
        };
        assert_eq!(
            generation_files(&sim, dir),
            vec![
                journal_name(2),
                journal_name(3),
                snapshot_name(2),
                snapshot_name(3)
            ],
            "the generation before the newest stays, older ones go"
        );
        let snap = dir.join(snapshot_name(3));
        sim.flip_bit(&snap, 200);
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("rebuilt");
        assert_eq!(*c.read(), before);
        assert_eq!(c.open_warnings().len(), 1, "{:?}", c.open_warnings());
        assert!(
            c.open_warnings()[0].contains("rebuilt"),
            "{:?}",
            c.open_warnings()
        );
        // Written again: the next open needs no rebuild.
        drop(c);
        let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("reopen");
        assert!(c.open_warnings().is_empty(), "{:?}", c.open_warnings());
        assert_eq!(*c.read(), before);
        // Both generations damaged: opening fails and says why, naming the file.
        drop(c);
        sim.flip_bit(&snap, 200);
        sim.flip_bit(&dir.join(snapshot_name(2)), 200);
        let err = Catalog::open_with(Arc::new(sim), dir, 16 << 10).expect_err("unrecoverable");
        assert!(err.is_corruption(), "{err}");
        assert!(err.to_string().contains(&snapshot_name(3)), "{err}");
    }

    /// Snapshots are written in sections (one record per repository): damage is located.
    #[test]
    fn damage_in_a_snapshot_names_its_section() {
        let sim = SimStorage::new();
        let dir = Path::new("/c");
        let state = {
            let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
            fold_times(&c, 1)
        };
        let path = dir.join("x.snp");
        write_snapshot(&sim, &path, &state).expect("write");
        assert_eq!(read_snapshot(&sim, &path).expect("read"), state);
        let file = FileHandle::open(&sim, &path, OpenMode::Read).expect("open");
        let size = file.len().expect("len") as usize;
        sim.flip_bit(&path, size - 10);
        let err = read_snapshot(&sim, &path).expect_err("damaged");
        assert!(err.to_string().contains("after repository"), "{err}");
    }

    /// Snapshots of format 1 (one record holding the whole state) are still read.
    #[test]
    fn a_format_1_snapshot_is_read() {
        let sim = SimStorage::new();
        let dir = Path::new("/c");
        let state = {
            let c = Catalog::open_with(Arc::new(sim.clone()), dir, 16 << 10).expect("open");
            fold_times(&c, 1)
        };
        let body = serde_json::to_vec(&state).expect("json");
        let mut v1 = segment::file_header(SNAPSHOT_MAGIC).to_vec();
        v1.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&body]));
        v1.extend_from_slice(&body);
        let path = dir.join("v1.snp");
        let f = FileHandle::open(&sim, &path, OpenMode::Truncate).expect("create");
        f.write_all_at(&v1, 0).expect("write");
        assert_eq!(read_snapshot(&sim, &path).expect("read"), state);
    }

    /// #14 item 6: a journal newer than every snapshot is set aside when it holds no batch
    /// (a stray), and named when it does.
    #[test]
    fn a_stray_journal_is_set_aside_and_one_with_batches_is_named() {
        let sim = SimStorage::new();
        let dir = Path::new("/c");
        {
            let c = Catalog::open(Arc::new(sim.clone()), dir).expect("open");
            c.commit(vec![tag("v1")]).expect("commit");
        }
        let stray = dir.join(journal_name(5));
        let f = FileHandle::open(&sim, &stray, OpenMode::Truncate).expect("create");
        f.write_all_at(&file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION), 0)
            .expect("header");
        let c = Catalog::open(Arc::new(sim.clone()), dir).expect("opens");
        assert_eq!(tags(&c), vec!["v1".to_owned()]);
        assert!(
            c.open_warnings()
                .iter()
                .any(|w| w.contains(&journal_name(5)) && w.contains("set aside")),
            "{:?}",
            c.open_warnings()
        );
        drop(c);
        assert!(sim
            .list(dir)
            .expect("list")
            .contains(&format!("{}.stray", journal_name(5))));
        // One holding batches is acknowledged data without its snapshot: named, not hidden.
        let batch = serde_json::to_vec(&vec![tag("v2")]).expect("json");
        let mut bytes = file_header_versioned(JOURNAL_MAGIC, JOURNAL_VERSION).to_vec();
        bytes.extend_from_slice(&record_header(RecordKind::CatalogBatch, 0, &[&batch]));
        bytes.extend_from_slice(&batch);
        let f =
            FileHandle::open(&sim, &dir.join(journal_name(7)), OpenMode::Truncate).expect("create");
        f.write_all_at(&bytes, 0).expect("write");
        let err = Catalog::open(Arc::new(sim), dir).expect_err("refused");
        assert!(err.to_string().contains(&journal_name(7)), "{err}");
    }

    fn tag(name: &str) -> Op {
        Op::Tag {
            repo: "a".into(),
            tag: name.into(),
            digest: Digest::of(Algorithm::Sha256, b"x"),
        }
    }

    fn tags(c: &Catalog) -> Vec<String> {
        c.read()
            .repos
            .get("a")
            .map(|r| r.tags.keys().cloned().collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_failed_fsync_poisons_the_catalog() {
        let sim = SimStorage::new();
        let c = Catalog::open(Arc::new(sim.clone()), Path::new("/c")).expect("open");
        c.commit(vec![tag("t0")]).expect("commit");
        sim.fail_syncs();
        assert!(c.commit(vec![tag("t1")]).is_err());
        // The device recovers, but the kernel may have dropped the failed batch's pages: a
        // later fsync would say nothing about them, so nothing more is committed.
        sim.heal_syncs();
        let e = c.commit(vec![tag("t2")]).expect_err("poisoned");
        assert!(matches!(e, Error::Poisoned(_)), "{e}");
        assert!(e.to_string().contains("simulated sync failure"), "{e}");
        assert_eq!(tags(&c), ["t0"], "nothing unacknowledged is visible");
        drop(c);
        let c = Catalog::open(Arc::new(sim), Path::new("/c")).expect("reopen");
        c.commit(vec![tag("t3")])
            .expect("a reopened catalog commits again");
    }

    #[test]
    fn concurrent_commits_each_see_every_batch_before_them() {
        // Each commit names its tag after how many tags its plan sees: if two plans saw the
        // same state (a batch appended but not yet synced left out), two commits would pick
        // the same name and fewer tags than commits would remain.
        let sim = SimStorage::new();
        let c = Catalog::open_with(Arc::new(sim.clone()), Path::new("/c"), 4096).expect("open");
        let (threads, each) = (8, 40);
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..each {
                        c.commit_with(None, |state| {
                            let n = state.repos.get("a").map_or(0, |r| r.tags.len());
                            Ok::<_, Error>((vec![tag(&format!("t{n:05}"))], ()))
                        })
                        .expect("commit");
                    }
                });
            }
        });
        let want: Vec<String> = (0..threads * each).map(|n| format!("t{n:05}")).collect();
        assert_eq!(tags(&c), want);
        // Folding kept up: the journal is near its bound, not the size of 320 batches.
        let journal = sim
            .list(Path::new("/c"))
            .expect("list")
            .into_iter()
            .find(|n| n.starts_with("journal-"))
            .expect("journal");
        let path = Path::new("/c").join(journal);
        let len = sim
            .open(&path, OpenMode::Read)
            .expect("journal")
            .len()
            .expect("len");
        assert!(len < 2 * 4096, "journal of {len} bytes");
        drop(c);
        // Small journal bound: folds happened along the way, and nothing was lost by them.
        let c = Catalog::open(Arc::new(sim), Path::new("/c")).expect("reopen");
        assert_eq!(tags(&c), want);
    }

    #[test]
    fn power_cut_during_concurrent_commits_keeps_every_acknowledged_batch() {
        // Batches appended while another commit's fsync runs, and the sync marks placed
        // around them: after a cut at any sync point the catalog opens, and every commit
        // that returned is there.
        let run = |sim: &SimStorage| -> Vec<String> {
            let Ok(c) = Catalog::open_with(Arc::new(sim.clone()), Path::new("/c"), 16 << 10) else {
                return Vec::new();
            };
            let acked = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for t in 0..4 {
                    let (c, acked) = (&c, &acked);
                    s.spawn(move || {
                        for i in 0..40 {
                            let name = format!("t{t}-{i:02}");
                            if c.commit(vec![tag(&name)]).is_err() {
                                break;
                            }
                            acked.lock().push(name);
                        }
                    });
                }
            });
            acked.into_inner()
        };
        after_every_cut(run, 160, |n, c, acked| {
            let have = tags(&c);
            for name in &acked {
                assert!(
                    have.contains(name),
                    "cut at sync {n}: {name} acknowledged, lost"
                );
            }
        });
    }

    /// Runs `run` to the end (`acked` commits must be acknowledged), then once cut at each
    /// of its sync points (durable bytes only, and with some unsynced pages kept): the
    /// catalog opens after every cut, and `check` sees it with the tags that run committed.
    fn after_every_cut(
        run: impl Fn(&SimStorage) -> Vec<String>,
        acked: usize,
        check: impl Fn(u64, Catalog, Vec<String>),
    ) {
        let full = SimStorage::new();
        assert_eq!(run(&full).len(), acked);
        for n in 1..=full.sync_count() {
            for torn in [None, Some(n)] {
                let sim = SimStorage::new();
                sim.crash_at_sync(n);
                let got = run(&sim);
                let c = Catalog::open(Arc::new(sim.crash_image(torn)), Path::new("/c"))
                    .unwrap_or_else(|e| panic!("cut at sync {n}: {e}"));
                check(n, c, got);
            }
        }
    }

    #[test]
    fn power_cut_keeps_every_acknowledged_batch() {
        let run = |sim: &SimStorage| -> Vec<String> {
            let Ok(c) = Catalog::open(Arc::new(sim.clone()), Path::new("/c")) else {
                return Vec::new();
            };
            let mut acked = Vec::new();
            for i in 0..20u32 {
                let name = format!("t{i}");
                if c.commit(vec![tag(&name)]).is_err() {
                    break;
                }
                acked.push(name);
            }
            acked
        };
        after_every_cut(run, 20, |n, c, acked| {
            let (tags, acked) = (
                c.read().repos.get("a").map_or(0, |r| r.tags.len()),
                acked.len(),
            );
            assert!(
                tags >= acked,
                "cut at {n}: {tags} tags, {acked} acknowledged"
            );
        });
    }
}
