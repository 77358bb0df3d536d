//! fsck: verifies everything that can be verified and reports typed findings
//! (docs/design.md, "Verification"). Used by `ballast fsck`; never changes the store.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::Serialize;

use crate::digest::{ChunkId, Digest};
use crate::error::Error;
use crate::index::{Location, Table};
use crate::recipe::{Recipe, RecipePiece};
use crate::segment::{self, RecordKind};
use crate::store::Store;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; nothing is lost.
    Warning,
    /// Data is damaged or inconsistent.
    Error,
}

/// What a finding is about: a stable code (`--json` prints it in snake case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingCode {
    /// A segment file cannot be opened or scanned.
    SegmentUnreadable,
    /// A record of a kind that does not belong in a segment.
    RecordMisplaced,
    /// A record whose bytes fail their checks (CRC, structure).
    RecordCorrupt,
    /// A chunk record whose bytes do not match its id or length.
    ChunkCorrupt,
    /// A chunk record whose checksum field is damaged while its chunk verifies against its
    /// BLAKE3 id: served as it is; `--repair` rewrites the checksum.
    RecordCrcDamaged,
    /// A recipe record that does not decode.
    RecipeCorrupt,
    /// A segment an index names is gone, and no collection removed it.
    SegmentMissing,
    /// An index file fails its checks.
    IndexCorrupt,
    /// An index entry points at a record that is not the one it names.
    IndexMismatch,
    /// A stored record no index reaches.
    IndexMissing,
    /// A check could not run to its end.
    FsckFailed,
    /// A repository links a blob that is not stored.
    BlobLinkDangling,
    /// A repository names a manifest that is not stored.
    ManifestMissing,
    /// A tag points at a manifest the repository does not hold.
    TagDangling,
    /// A manifest references a blob or manifest the repository does not hold.
    ReferenceDangling,
    /// A blob uses a chunk that is not stored.
    ChunkMissing,
    /// A blob reassembles to another digest.
    BlobDigestMismatch,
    /// A blob cannot be reassembled.
    BlobUnreadable,
    /// The catalog journal ends before where the segments recorded it durable.
    CatalogTruncated,
    /// Sections of a damaged catalog snapshot were lost (nothing to rebuild them from).
    CatalogDamaged,
    /// A stored manifest that no repository names (listed when the catalog lost changes).
    ManifestUnnamed,
    /// Pull counts or a tag time kept for a manifest or tag the repository does not hold.
    CatalogMetadataStray,
    /// The event outbox (webhooks) is damaged: some undelivered events are lost.
    OutboxDamaged,
    /// The event outbox ends in an unfinished append (a crash; it was never acknowledged).
    OutboxTorn,
}

impl FindingCode {
    /// The code as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            FindingCode::SegmentUnreadable => "segment_unreadable",
            FindingCode::RecordMisplaced => "record_misplaced",
            FindingCode::RecordCorrupt => "record_corrupt",
            FindingCode::ChunkCorrupt => "chunk_corrupt",
            FindingCode::RecordCrcDamaged => "record_crc_damaged",
            FindingCode::RecipeCorrupt => "recipe_corrupt",
            FindingCode::SegmentMissing => "segment_missing",
            FindingCode::IndexCorrupt => "index_corrupt",
            FindingCode::IndexMismatch => "index_mismatch",
            FindingCode::IndexMissing => "index_missing",
            FindingCode::FsckFailed => "fsck_failed",
            FindingCode::BlobLinkDangling => "blob_link_dangling",
            FindingCode::ManifestMissing => "manifest_missing",
            FindingCode::TagDangling => "tag_dangling",
            FindingCode::ReferenceDangling => "reference_dangling",
            FindingCode::ChunkMissing => "chunk_missing",
            FindingCode::BlobDigestMismatch => "blob_digest_mismatch",
            FindingCode::BlobUnreadable => "blob_unreadable",
            FindingCode::CatalogTruncated => "catalog_truncated",
            FindingCode::CatalogDamaged => "catalog_damaged",
            FindingCode::ManifestUnnamed => "manifest_unnamed",
            FindingCode::CatalogMetadataStray => "catalog_metadata_stray",
            FindingCode::OutboxDamaged => "outbox_damaged",
            FindingCode::OutboxTorn => "outbox_torn",
        }
    }

    /// A damaged record: `fsck --repair` sets it aside by its segment and offset.
    pub fn is_damaged_record(self) -> bool {
        matches!(
            self,
            FindingCode::ChunkCorrupt | FindingCode::RecipeCorrupt | FindingCode::RecordCorrupt
        )
    }

    /// A blob that cannot be served as stored: `fsck --repair` quarantines it by its digest.
    pub fn is_unservable_blob(self) -> bool {
        matches!(
            self,
            FindingCode::ChunkMissing
                | FindingCode::BlobDigestMismatch
                | FindingCode::BlobUnreadable
                | FindingCode::BlobLinkDangling
                | FindingCode::ManifestMissing
        )
    }
}

impl std::fmt::Display for FindingCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Severity.
    pub severity: Severity,
    /// A stable code, e.g. `record_corrupt`.
    pub code: FindingCode,
    /// The segment concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<u64>,
    /// The file concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The offset in that file, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The blob concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: &'static str,
}

/// What fsck looked at and found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Segment files read.
    pub segments: u64,
    /// Bytes of segment files read.
    pub segment_bytes: u64,
    /// Chunk records checked against their BLAKE3 id.
    pub chunks: u64,
    /// Blobs reassembled and checked against their digest.
    pub blobs: u64,
    /// Bytes of blobs reassembled.
    pub blob_bytes: u64,
    /// Index entries checked.
    pub index_entries: u64,
    /// Repositories checked.
    pub repositories: u64,
    /// Problems.
    pub findings: Vec<Finding>,
    /// Damaged records set aside by an earlier `fsck --repair` (not findings any more).
    pub quarantined_records: u64,
    /// Blobs set aside by an earlier `fsck --repair`: answered as missing until pushed again.
    pub quarantined_blobs: Vec<Digest>,
    /// Segments kept in the bucket (`store/remote.rs`): their records are not scanned here
    /// (the bucket check compares each object with its SHA-256); the blobs in them are
    /// reassembled through the bucket when one is installed.
    pub remote_segments: u64,
    /// Their bytes.
    pub remote_segment_bytes: u64,
    /// Blobs not checked because their bytes are in the bucket and it could not be read
    /// (none configured, or it did not answer).
    pub blobs_unchecked: u64,
}

impl Report {
    /// True when nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

const HINT_DAMAGE: &str =
    "the bytes on disk are damaged: blobs that use them cannot be served. `ballast fsck --repair DIR` sets the damaged records and those blobs aside (quarantine.json, nothing deleted) so the server opens and serves the rest; a re-push of those images heals them (or restore the data directory from a backup)";
const HINT_CRC: &str =
    "only the record's checksum field is damaged: `ballast fsck --repair DIR` rewrites it (nothing is quarantined)";
const HINT_CATALOG_CUT: &str =
    "restore the catalog directory from a backup if you have one; otherwise `ballast fsck --repair DIR` lets the store open with the catalog as it is, and the images whose tags or links were lost must be pushed again";
const HINT_OUTBOX: &str =
    "the server skips the damaged events at its next start (counted as dropped in the metrics) and delivers the rest; images are not affected. A receiver that must not miss an event can re-read the registry (tags list, catalog)";
const HINT_OUTBOX_TORN: &str =
    "nothing to do: the server cuts the unfinished append off at its next start";
const HINT_RETAG: &str =
    "`ballast tag DIR REPOSITORY:TAG DIGEST` (server stopped) names it again in a repository, linking the blobs it references that are stored";
const HINT_REBUILD: &str =
    "indexes are derived data: run `ballast fsck --repair DIR` to rebuild them from the segments";
const HINT_REPUSH: &str =
    "re-push the image (or delete the manifest) so the repository is consistent again";

/// Progress callback: bytes processed so far of the given phase.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// Runs every check. `progress(phase, done, total)` is called as work proceeds.
pub fn fsck(store: &Store, progress: Progress<'_>) -> Report {
    let mut report = Report::default();
    let quarantine = store.quarantine();
    report.quarantined_blobs = quarantine.blobs.keys().cloned().collect();
    let mut chunks_at: HashMap<(u64, u64), ChunkId> = HashMap::new();
    let mut recipes_at: HashMap<(u64, u64), Digest> = HashMap::new();
    let error = |report: &mut Report,
                 code,
                 segment: Option<u64>,
                 file: Option<PathBuf>,
                 offset,
                 message: String,
                 hint| {
        report.findings.push(Finding {
            severity: Severity::Error,
            code,
            segment,
            file,
            offset,
            digest: None,
            message,
            hint,
        });
    };
    let catalog_damaged = !store.catalog_damage().is_empty();
    for (code, why) in store.catalog_damage() {
        error(
            &mut report,
            code,
            None,
            Some(store.dir().join("catalog")),
            None,
            why,
            HINT_CATALOG_CUT,
        );
    }

    match crate::outbox::Outbox::verify(store.storage().as_ref(), store.dir()) {
        Ok(problems) => {
            for (lost, message) in problems {
                report.findings.push(Finding {
                    severity: if lost {
                        Severity::Error
                    } else {
                        Severity::Warning
                    },
                    code: if lost {
                        FindingCode::OutboxDamaged
                    } else {
                        FindingCode::OutboxTorn
                    },
                    segment: None,
                    file: Some(crate::outbox::outbox_dir(store.dir())),
                    offset: None,
                    digest: None,
                    message,
                    hint: if lost { HINT_OUTBOX } else { HINT_OUTBOX_TORN },
                });
            }
        }
        Err(e) => error(
            &mut report,
            FindingCode::OutboxDamaged,
            None,
            Some(crate::outbox::outbox_dir(store.dir())),
            None,
            format!("the outbox cannot be read: {e}"),
            HINT_OUTBOX,
        ),
    }

    // 3 runs beside 1 and 2: every blob something links is reassembled (SHA-256) while the
    // segments are scanned (CRC, BLAKE3), so fsck takes about as long as the slower pass.
    std::thread::scope(|scope| {
        let blob_pass = scope.spawn(|| blob_pass(store, progress));

        // 1. Every record of every segment: CRC, structure, chunk ids, recipe encoding.
        let ids = store.segment_ids();
        let total: u64 = ids
            .iter()
            .filter_map(|id| store.segment_handle(*id).ok())
            .filter_map(|f| f.len().ok())
            .sum();
        let mut done = 0u64;
        let remote: HashMap<u64, u64> = store.remote_segments().into_iter().collect();
        for id in ids {
            if let Some(len) = remote.get(&id) {
                report.remote_segments += 1;
                report.remote_segment_bytes += len;
                continue;
            }
            let file = match store.segment_handle(id) {
                Ok(f) => f,
                Err(e) => {
                    error(
                        &mut report,
                        FindingCode::SegmentUnreadable,
                        Some(id),
                        None,
                        None,
                        e.to_string(),
                        HINT_DAMAGE,
                    );
                    continue;
                }
            };
            let path = file.path().to_path_buf();
            let len = file.len().unwrap_or(0);
            report.segments += 1;
            report.segment_bytes += len;
            let mut problems = Vec::new();
            // Past a damaged record the scan finds the next valid one, so one flipped byte
            // hides nothing after it.
            let scanned = segment::scan_salvaging(&file, segment::FILE_HEADER_LEN as u64, |rec| {
                match rec.header.kind {
                    RecordKind::Chunk => {
                        report.chunks += 1;
                        match check_chunk(rec.header.flags, &rec.payload) {
                            Ok(chunk) => {
                                if !rec.crc_ok {
                                    problems.push((
                                        rec.offset,
                                        FindingCode::RecordCrcDamaged,
                                        format!(
                                            "the record's checksum is damaged but chunk {chunk} \
                                             verifies against its BLAKE3 id (it is served)"
                                        ),
                                    ));
                                }
                                chunks_at.insert((id, rec.offset), chunk);
                            }
                            Err(why) => problems.push((rec.offset, FindingCode::ChunkCorrupt, why)),
                        }
                    }
                    RecordKind::Recipe => match Recipe::decode_record(
                        &path,
                        rec.offset,
                        rec.header.flags,
                        &rec.payload,
                    ) {
                        Ok(r) => {
                            recipes_at.insert((id, rec.offset), r.digest);
                        }
                        Err(e) => {
                            problems.push((rec.offset, FindingCode::RecipeCorrupt, e.to_string()))
                        }
                    },
                    RecordKind::SyncMark | RecordKind::CatalogDurable => {}
                    RecordKind::CatalogBatch
                    | RecordKind::UploadCheckpoint
                    | RecordKind::SegmentsDurable
                    | RecordKind::OutboxEvent
                    | RecordKind::OutboxDead => problems.push((
                        rec.offset,
                        FindingCode::RecordMisplaced,
                        "catalog, upload or outbox record in a segment".into(),
                    )),
                }
                done += rec.header.record_len();
                progress("segments", done, total);
                Ok(())
            });
            for (offset, code, why) in problems {
                if quarantine.is_damaged(id, offset) {
                    report.quarantined_records += 1;
                    continue;
                }
                let hint = if code == FindingCode::RecordCrcDamaged {
                    HINT_CRC
                } else {
                    HINT_DAMAGE
                };
                error(
                    &mut report,
                    code,
                    Some(id),
                    Some(path.clone()),
                    Some(offset),
                    why,
                    hint,
                );
            }
            match scanned {
                Ok((_, damage)) => {
                    for d in damage {
                        if quarantine.is_damaged(id, d.offset) {
                            report.quarantined_records += 1;
                            continue;
                        }
                        error(
                            &mut report,
                            FindingCode::RecordCorrupt,
                            Some(id),
                            Some(path.clone()),
                            Some(d.offset),
                            format!(
                                "{} ({} bytes unreadable up to offset {})",
                                d.reason,
                                d.resumed_at - d.offset,
                                d.resumed_at
                            ),
                            HINT_DAMAGE,
                        );
                    }
                }
                Err(e) => error(
                    &mut report,
                    FindingCode::SegmentUnreadable,
                    Some(id),
                    Some(path.clone()),
                    None,
                    e.to_string(),
                    HINT_DAMAGE,
                ),
            }
        }

        // 2. Index files: checksums, order, and that every entry names the record it claims
        // (entries into segments that GC removed are skipped by lookups, and here).
        let present: HashSet<u64> = store.segment_ids().into_iter().collect();
        // A damaged index file is reported as that, and its entries are not believed: a
        // flipped byte in one would otherwise read as a missing segment of a nonsense id.
        let files: Vec<_> = store
            .index_files()
            .into_iter()
            .map(|f| {
                let damage = f.verify().err();
                (f, damage)
            })
            .collect();
        let mut missing = std::collections::BTreeSet::new();
        for (file, _) in files.iter().filter(|(_, damage)| damage.is_none()) {
            for table in [Table::Chunks, Table::Blobs] {
                for (_, loc) in file.iter(table) {
                    if !present.contains(&loc.segment) && !store.segment_was_collected(loc.segment)
                    {
                        missing.insert(loc.segment);
                    }
                }
            }
        }
        for id in missing {
            error(
            &mut report,
            FindingCode::SegmentMissing,
            Some(id),
            Some(store.segment_path(id)),
            None,
            "the index refers to this segment file, but it is gone and no collection removed it"
                .into(),
            HINT_DAMAGE,
        );
        }
        for (file, damage) in &files {
            if let Some(e) = damage {
                error(
                    &mut report,
                    FindingCode::IndexCorrupt,
                    None,
                    Some(file.path().to_path_buf()),
                    None,
                    e.to_string(),
                    HINT_REBUILD,
                );
                continue;
            }
            // Each entry must point at a record holding what it names.
            for table in [Table::Chunks, Table::Blobs] {
                for (key, loc) in file
                    .iter(table)
                    .filter(|(_, l)| present.contains(&l.segment))
                    // (Segments kept in the bucket were not scanned.)
                    .filter(|(_, l)| !remote.contains_key(&l.segment))
                    .filter(|(_, l)| !quarantine.is_damaged(l.segment, l.offset))
                {
                    report.index_entries += 1;
                    let at = (loc.segment, loc.offset);
                    let holds = match table {
                        Table::Chunks => chunks_at.get(&at).map(|c| c.0),
                        Table::Blobs => recipes_at.get(&at).map(Digest::index_key),
                    };
                    if holds != Some(key) {
                        let what = match table {
                            Table::Chunks => format!("chunk {}", ChunkId(key)),
                            Table::Blobs => "blob entry".to_owned(),
                        };
                        error(
                            &mut report,
                            FindingCode::IndexMismatch,
                            None,
                            Some(file.path().to_path_buf()),
                            None,
                            format!(
                                "{what} points at segment {} offset {}, which holds no such {}",
                                loc.segment,
                                loc.offset,
                                match table {
                                    Table::Chunks => "chunk",
                                    Table::Blobs => "recipe",
                                }
                            ),
                            HINT_REBUILD,
                        );
                    }
                }
            }
        }
        // Every record is reachable through the indexes.
        for id in chunks_at.values() {
            if store.chunk_location(id).is_none() {
                error(
                    &mut report,
                    FindingCode::IndexMissing,
                    None,
                    None,
                    None,
                    format!("chunk {id} is stored but not indexed"),
                    HINT_REBUILD,
                );
            }
        }

        // 3. (On its own thread, started above.)
        let (findings, seen, blobs, blob_bytes, unchecked) = match blob_pass.join() {
            Ok(r) => r,
            Err(_) => {
                error(
                    &mut report,
                    FindingCode::FsckFailed,
                    None,
                    None,
                    None,
                    "the blob pass panicked".into(),
                    HINT_DAMAGE,
                );
                (Vec::new(), HashSet::new(), 0, 0, 0)
            }
        };
        report.blobs_unchecked = unchecked;
        report.findings.extend(findings);
        report.blobs = blobs;
        report.blob_bytes = blob_bytes;

        // 4. The catalog: every link resolves, every manifest's references are in its repository.
        let catalog = store.catalog().read();
        for (name, repo) in &catalog.repos {
            report.repositories += 1;
            for digest in repo.blobs.keys() {
                if !seen.contains(digest) && !quarantine.blobs.contains_key(digest) {
                    report.findings.push(not_stored(
                        FindingCode::BlobLinkDangling,
                        digest,
                        format!("{name} links blob {digest}, which is not stored"),
                    ));
                }
            }
            for (digest, link) in &repo.manifests {
                if !seen.contains(digest) && !quarantine.blobs.contains_key(digest) {
                    report.findings.push(not_stored(
                        FindingCode::ManifestMissing,
                        digest,
                        format!("{name} has manifest {digest}, which is not stored"),
                    ));
                }
                // (A cached manifest's references are fetched when first pulled.)
                for r in link
                    .origin
                    .is_none()
                    .then_some(&link.references)
                    .into_iter()
                    .flatten()
                {
                    if !repo.blobs.contains_key(r) && !repo.manifests.contains_key(r) {
                        error(&mut report, FindingCode::ReferenceDangling, None, None, None,
                        format!("manifest {digest} in {name} references {r}, which the repository does not hold"), HINT_REPUSH);
                    }
                }
            }
            for (tag, digest) in &repo.tags {
                if !repo.manifests.contains_key(digest) {
                    error(
                        &mut report,
                        FindingCode::TagDangling,
                        None,
                        None,
                        None,
                        format!(
                        "tag {name}:{tag} points at {digest}, which the repository does not hold"
                    ),
                        HINT_REPUSH,
                    );
                }
            }
            // Pull counts and tag times belong to manifests and tags that exist (deletes
            // remove them together).
            let strays = repo
                .pulls
                .keys()
                .filter(|d| !repo.manifests.contains_key(d))
                .map(|d| format!("pull counts of manifest {d}"))
                .chain(
                    repo.tag_set_at
                        .keys()
                        .filter(|t| !repo.tags.contains_key(*t))
                        .map(|t| format!("the set time of tag {t}")),
                );
            for what in strays {
                report.findings.push(Finding {
                    severity: Severity::Warning,
                    code: FindingCode::CatalogMetadataStray,
                    segment: None,
                    file: None,
                    offset: None,
                    digest: None,
                    message: format!("{name} keeps {what}, which it no longer holds"),
                    hint: "harmless (retention and reports ignore it), but deletes remove these together: please report it as a bug",
                });
            }
        }
        // 5. When the catalog lost changes, the manifests it no longer names: their tags can
        // be set again (`ballast tag`).
        if catalog_damaged {
            let named: HashSet<&Digest> = catalog
                .repos
                .values()
                .flat_map(|r| r.manifests.keys().chain(r.blobs.keys()))
                .collect();
            let mut unnamed: Vec<&Digest> =
                recipes_at.values().filter(|d| !named.contains(d)).collect();
            unnamed.sort_by_key(|d| d.to_string());
            unnamed.dedup();
            for d in unnamed {
                if let Some(media_type) = manifest_media_type(store, d) {
                    report.findings.push(Finding {
                        severity: Severity::Warning,
                        code: FindingCode::ManifestUnnamed,
                        segment: None,
                        file: None,
                        offset: None,
                        digest: Some(d.clone()),
                        message: format!(
                            "manifest {d} ({media_type}) is stored but no repository names it; \
                             to tag it again: ballast tag DIR <repository>:<tag> {d}"
                        ),
                        hint: HINT_RETAG,
                    });
                }
            }
        }
        report
    })
}

/// The media type of a stored blob that is an image manifest or index (small, JSON, schema
/// version 2), if it is one.
fn manifest_media_type(store: &Store, digest: &Digest) -> Option<String> {
    if store.stat(digest).ok()?? > 4 << 20 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&store.read_blob(digest).ok()?).ok()?;
    if v.get("schemaVersion")?.as_u64()? != 2 {
        return None;
    }
    match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => Some(m.to_owned()),
        None if v.get("manifests").is_some() => {
            Some("application/vnd.oci.image.index.v1+json".into())
        }
        None if v.get("layers").is_some() => {
            Some("application/vnd.oci.image.manifest.v1+json".into())
        }
        None => None,
    }
}

/// A finding for a blob or manifest the catalog names but the store does not hold (repair
/// quarantines it by its digest).
fn not_stored(code: FindingCode, digest: &Digest, message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        code,
        segment: None,
        file: None,
        offset: None,
        digest: Some(digest.clone()),
        message,
        hint: HINT_REPUSH,
    }
}

/// Reassembles every blob something links from the indexes' recipes and checks its digest.
/// Returns the findings, the digests seen, and how many blobs and bytes were checked.
/// What the blob pass found: findings, the blobs stored, how many were checked and their
/// bytes, and how many could not be checked (their bytes are in a bucket not readable now).
type BlobPass = (Vec<Finding>, HashSet<Digest>, u64, u64, u64);

fn blob_pass(store: &Store, progress: Progress<'_>) -> BlobPass {
    let quarantine = store.quarantine();
    // A recipe nothing links is garbage; GC may already have taken its chunks.
    let linked: HashSet<Digest> = {
        let catalog = store.catalog().read();
        catalog
            .repos
            .values()
            .flat_map(|r| r.blobs.keys().chain(r.manifests.keys()))
            .cloned()
            .collect()
    };
    // Recipes in segments kept in a bucket that cannot be read now: the blob is stored (the
    // index says where) but not checked.
    let by_key: HashMap<[u8; 32], &Digest> = linked.iter().map(|d| (d.index_key(), d)).collect();
    let mut seen = HashSet::new();
    let mut unchecked = 0u64;
    let mut recipes: Vec<(Location, Recipe)> = Vec::new();
    for (key, loc) in store.blob_locations() {
        match store.recipe_at(&loc) {
            Ok(r) if linked.contains(&r.digest) && !quarantine.blobs.contains_key(&r.digest) => {
                recipes.push((loc, r))
            }
            Err(Error::Unavailable(_)) => {
                if let Some(d) = by_key.get(&key) {
                    if seen.insert((*d).clone()) {
                        unchecked += 1;
                    }
                }
            }
            _ => {}
        }
    }
    recipes.sort_by_key(|(loc, _)| (loc.segment, loc.offset));
    let total: u64 = recipes.iter().map(|(_, r)| r.size).sum();
    let (mut findings, mut blobs, mut bytes) = (Vec::new(), 0u64, 0u64);
    for (loc, recipe) in &recipes {
        if !seen.insert(recipe.digest.clone()) {
            continue;
        }
        blobs += 1;
        bytes += recipe.size;
        let finding = |code, message: String, hint| Finding {
            severity: Severity::Error,
            code,
            segment: Some(loc.segment),
            file: Some(store.segment_path(loc.segment)),
            offset: Some(loc.offset),
            digest: Some(recipe.digest.clone()),
            message,
            hint,
        };
        let missing = recipe.pieces.iter().find_map(|p| match p {
            RecipePiece::Chunk { id, .. } if store.chunk_location(id).is_none() => Some(*id),
            _ => None,
        });
        if let Some(missing) = missing {
            findings.push(finding(
                FindingCode::ChunkMissing,
                format!(
                    "blob {} uses chunk {missing}, which is not stored",
                    recipe.digest
                ),
                HINT_REPUSH,
            ));
            continue;
        }
        match rehash(store, &recipe.digest, recipe.size) {
            Ok(actual) if actual == recipe.digest => {}
            Err(Error::Unavailable(_)) => unchecked += 1,
            Ok(actual) => findings.push(finding(
                FindingCode::BlobDigestMismatch,
                format!("blob {} reassembles to {actual}", recipe.digest),
                HINT_DAMAGE,
            )),
            Err(e) => findings.push(finding(
                FindingCode::BlobUnreadable,
                format!("blob {}: {e}", recipe.digest),
                HINT_DAMAGE,
            )),
        }
        progress("blobs", bytes, total);
    }
    (findings, seen, blobs, bytes, unchecked)
}

/// Checks a chunk record's payload: decompresses it and compares its BLAKE3 id.
fn check_chunk(flags: u8, payload: &[u8]) -> Result<ChunkId, String> {
    let chunk = segment::ChunkPayload::decode(payload).ok_or("chunk record too short")?;
    let actual = ChunkId::of(&chunk.bytes(flags)?);
    if actual != chunk.id {
        return Err(format!(
            "chunk bytes hash to {actual}, not to their id {}",
            chunk.id
        ));
    }
    Ok(chunk.id)
}

fn rehash(store: &Store, digest: &Digest, size: u64) -> Result<Digest, Error> {
    let reader = store.open_blob(digest)?;
    let mut h = digest.algorithm().hasher();
    for piece in reader.range(0, size)? {
        h.update(&piece?);
    }
    Ok(h.finish())
}

/// `fsck --repair`: rewrites the checksum of every chunk record that `report` found sound
/// but for its checksum field (its chunk verified against its BLAKE3 id). Returns how many.
pub fn repair_checksums(store: &Store, report: &Report) -> crate::Result<usize> {
    let mut n = 0;
    for f in &report.findings {
        if let (FindingCode::RecordCrcDamaged, Some(segment), Some(offset)) =
            (f.code, f.segment, f.offset)
        {
            let path = store.segment_path(segment);
            let file = crate::io::FileHandle::open(
                store.storage().as_ref(),
                &path,
                crate::io::OpenMode::ReadWrite,
            )?;
            n += usize::from(segment::rewrite_crc(&file, offset)?);
        }
    }
    Ok(n)
}

/// `fsck --repair`'s second step: sets aside what `report` found damaged. Damaged records
/// (by segment and offset) count as absent from now on, so nothing deduplicates against them
/// and a re-push stores fresh copies; blobs that could not be reassembled are quarantined
/// and answered as missing until they are pushed again. Nothing is deleted. Returns how many
/// records and blobs were added.
pub fn quarantine_damage(
    store: &Store,
    report: &Report,
    now: u64,
) -> crate::Result<(usize, usize)> {
    let mut q = (*store.quarantine()).clone();
    let (records, blobs) = (q.records.len(), q.blobs.len());
    for f in &report.findings {
        if f.code.is_damaged_record() {
            if let (Some(segment), Some(offset)) = (f.segment, f.offset) {
                q.records.insert(crate::quarantine::DamagedRecord {
                    segment,
                    offset,
                    reason: format!("{}: {}", f.code, f.message),
                });
            }
        } else if f.code.is_unservable_blob() {
            if let Some(d) = &f.digest {
                q.blobs.insert(
                    d.clone(),
                    crate::quarantine::QuarantinedBlob {
                        reason: format!("{}: {}", f.code, f.message),
                        at: now,
                    },
                );
            }
        }
    }
    let added = (q.records.len() - records, q.blobs.len() - blobs);
    if added != (0, 0) {
        store.set_quarantine(q)?;
    }
    Ok(added)
}
