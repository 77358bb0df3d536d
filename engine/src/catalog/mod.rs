//! The catalog: repositories, tags, manifest links and blob links (docs/design.md, "Catalog").
//!
//! The state lives in memory and is changed only by committed batches of [`Op`]s. A batch is
//! appended to the journal and made durable before it is applied, so nothing is visible before
//! it is on stable storage, and a batch (a manifest and its tags, say) is atomic across a
//! crash. Concurrent commits share fsyncs (group commit): each plans and appends its batch in
//! turn, against the state with every appended batch applied, then one fsync makes all the
//! batches appended so far durable and visible. A failed fsync poisons the catalog. The
//! journal is folded into a snapshot once it grows past a bound.
//!
//! - `mod.rs` (here): the state and its ops, the catalog: open, commit (group commit), fold.
//! - `journal.rs`: the journal file: creating, replaying, setting strays aside.
//! - `snapshot.rs`: snapshots: writing in sections, reading, salvaging, rebuilding one from
//!   the generation before it.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::io::{existed, FileHandle, OpenMode, Storage};
use crate::segment::{record_header, RecordKind};

mod journal;
mod snapshot;

pub use self::journal::JOURNAL_VERSION;
use self::journal::{journal_name, new_journal, replay_journal, set_aside_stray_journals};
use self::snapshot::{
    read_snapshot, read_snapshot_salvaging, rebuild_from_previous, write_snapshot,
};
pub use self::snapshot::{SNAPSHOT_MAGIC, SNAPSHOT_VERSION};
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
    /// Seconds since the epoch when it was pushed (or fetched).
    pub pushed_at: u64,
    /// Where a pull-through cache fetched it from (`<upstream url>/<repository>`; format 4):
    /// cached content is read-only to clients, and the blobs and manifests it references are
    /// fetched when first pulled, so the repository may not hold them yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
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
    /// When each tag was last set (pointed at a manifest, moved or not), seconds since the
    /// epoch (format 3; 0 for tags set by an older version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tag_set_at: BTreeMap<String, u64>,
    /// Pulls of manifests (format 3): how many and the last, gathered in memory by the
    /// server and committed in batches.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pulls: BTreeMap<Digest, Pulls>,
}

/// How often, and when last, a manifest was pulled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulls {
    /// Pulls counted.
    pub count: u64,
    /// The last one, seconds since the epoch.
    pub last: u64,
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
    /// Point a tag at a manifest, at a time (0 in batches of format 2).
    Tag {
        repo: String,
        tag: String,
        digest: Digest,
        #[serde(default, skip_serializing_if = "is_zero")]
        at: u64,
    },
    /// Count pulls of a manifest (format 3); a manifest no longer there is skipped.
    Pulled {
        repo: String,
        digest: Digest,
        count: u64,
        at: u64,
    },
    /// Remove a tag.
    Untag { repo: String, tag: String },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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
                    r.pulls.remove(digest);
                    let gone: Vec<String> = r
                        .tags
                        .iter()
                        .filter(|(_, d)| *d == digest)
                        .map(|(t, _)| t.clone())
                        .collect();
                    for t in gone {
                        r.tags.remove(&t);
                        r.tag_set_at.remove(&t);
                    }
                }
                self.drop_if_empty(repo);
            }
            Op::Tag {
                repo,
                tag,
                digest,
                at,
            } => {
                let r = self.repos.entry(repo.clone()).or_default();
                r.tags.insert(tag.clone(), digest.clone());
                if *at > 0 {
                    r.tag_set_at.insert(tag.clone(), *at);
                }
            }
            Op::Untag { repo, tag } => {
                if let Some(r) = self.repos.get_mut(repo) {
                    r.tags.remove(tag);
                    r.tag_set_at.remove(tag);
                }
                self.drop_if_empty(repo);
            }
            Op::Pulled {
                repo,
                digest,
                count,
                at,
            } => {
                if let Some(r) = self.repos.get_mut(repo) {
                    if r.manifests.contains_key(digest) {
                        let p = r.pulls.entry(digest.clone()).or_default();
                        p.count += count;
                        p.last = p.last.max(*at);
                    }
                }
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

/// The journal being appended to.
struct Journal {
    generation: u64,
    file: FileHandle,
    len: u64,
}

/// A committed batch: its ops, and the segments' durable point recorded with it.
type Batch = (Vec<Op>, Option<(u64, u64)>);

/// The journal and what has been appended to it but may not be durable yet.
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
    /// Told of every op as it is applied to `planned`.
    observer: Option<Arc<dyn Observer>>,
}

/// Follows the catalog op by op, in commit order, as plans see it (a batch is observed when
/// it is appended, before it is durable): for figures kept incrementally, such as the
/// server's quota usage, that plans must check against. Called under the commit lock: keep
/// it short.
pub trait Observer: Send + Sync {
    /// `op` is about to be applied to `before`.
    fn applied(&self, before: &State, op: &Op);
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
    /// How long folds (snapshot written, read back, journal switched) took.
    fold_latency: crate::stats::Histogram,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("dir", &self.dir).finish()
    }
}

fn snapshot_name(generation: u64) -> String {
    format!("snapshot-{generation:020}.snp")
}

/// The bytes of a snapshot file (docs/format.md) holding `state`: how a catalog is shipped
/// to another place ([`crate::checkpoint`]).
pub fn snapshot_bytes(state: &State) -> Result<Vec<u8>> {
    snapshot::encode_snapshot(state)
}

/// Makes `bytes`, a snapshot file, the catalog in `dir` (a data directory's `catalog/`) at
/// `generation`, with an empty journal: how a data directory is rebuilt from shipped files.
/// Refuses a directory that holds a catalog already, and bytes that do not read back as a
/// snapshot (nothing is left behind then).
pub fn install_snapshot(
    storage: &dyn Storage,
    dir: &Path,
    generation: u64,
    bytes: &[u8],
) -> Result<()> {
    storage.create_dir_all(dir).map_err(io_err(dir))?;
    let names = storage.list(dir).map_err(io_err(dir))?;
    if let Some(n) = names
        .iter()
        .find(|n| n.ends_with(".snp") || n.ends_with(".jnl"))
    {
        return Err(Error::Internal(format!(
            "{} holds a catalog already ({n}): a snapshot is installed only into an empty one",
            dir.display()
        )));
    }
    let path = dir.join(snapshot_name(generation));
    crate::io::write_atomic(storage, &path, bytes)?;
    if let Err(e) = read_snapshot(storage, &path) {
        let _ = storage.remove(&path);
        return Err(e);
    }
    Ok(())
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
                observer: None,
            }),
            state: RwLock::new(state),
            synced: Mutex::new(position),
            durable: Mutex::new(position),
            poisoned: crate::error::Poison::default(),
            journal_bytes_max,
            warnings,
            damage,
            fold_latency: crate::stats::Histogram::default(),
        })
    }

    /// Installs an observer, made from the state as plans see it now (no batch slips in
    /// between: the commit lock is held).
    pub fn observe(&self, make: impl FnOnce(&State) -> Arc<dyn Observer>) {
        let mut a = self.appended.lock();
        let o = make(&a.planned);
        a.observer = Some(o);
    }

    /// Bytes in the current journal generation (a fold starts a new one past
    /// `journal_bytes_max`).
    pub fn journal_bytes(&self) -> u64 {
        self.appended.lock().journal.len
    }

    /// How long folds took.
    pub fn fold_latency(&self) -> &crate::stats::Histogram {
        &self.fold_latency
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
                if let Some(position) = segments_durable {
                    let point = crate::segment::encode_position(position);
                    rec.extend_from_slice(&record_header(
                        RecordKind::SegmentsDurable,
                        0,
                        &[&point],
                    ));
                    rec.extend_from_slice(&point);
                    a.planned.segments_durable = Some(position);
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
                    if let Some(o) = &a.observer {
                        o.applied(&a.planned, op);
                    }
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
            let started = std::time::Instant::now();
            self.fold(&mut a.journal).map_err(|e| self.poison(e))?;
            self.fold_latency.observe(started.elapsed());
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

    /// Replaces the whole state by `snapshot` (a snapshot file's bytes, as a primary
    /// ships it): a read replica following its primary ([`crate::Store::follow`]). The
    /// snapshot is written as the next generation with an empty journal, read back, and
    /// only then taken; the generation before stays, as after a fold. Returns the number
    /// of repositories.
    pub(crate) fn replace(&self, snapshot: &[u8]) -> Result<usize> {
        self.check_poisoned()?;
        let mut synced = self.synced.lock();
        let mut a = self.appended.lock();
        if !a.unsynced.is_empty() {
            return Err(Error::Busy(
                "catalog batches are being written; a replica's catalog is replaced only \
                 when none is"
                    .into(),
            ));
        }
        let next = a.journal.generation + 1;
        let path = self.dir.join(snapshot_name(next));
        crate::io::write_atomic(self.storage.as_ref(), &path, snapshot)?;
        let state = match read_snapshot(self.storage.as_ref(), &path) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.storage.remove(&path);
                return Err(e);
            }
        };
        self.start_generation(&mut a.journal, next)?;
        let position = (a.journal.generation, a.journal.len);
        let repos = state.repos.len();
        a.planned = state.clone();
        a.last_batch = position;
        *self.state.write() = state;
        *synced = position;
        *self.durable.lock() = position;
        Ok(repos)
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
        self.start_generation(journal, next)
    }

    /// Switches to an empty journal of generation `next`, whose snapshot is written and
    /// checked, and removes the generation before the current one (the current one stays
    /// until the next switch: a snapshot damaged later is rebuilt from it at open).
    fn start_generation(&self, journal: &mut Journal, next: u64) -> Result<()> {
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

#[cfg(test)]
mod tests;
