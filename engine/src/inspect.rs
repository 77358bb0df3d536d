//! What a store holds and what it costs: logical bytes against stored bytes, live and dead
//! bytes, per repository. Used by `ballast inspect`; never changes the store.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::digest::{ChunkId, Digest};
use crate::error::Result;
use crate::recipe::{Recipe, RecipePiece};
use crate::segment::{self, RecordKind};
use crate::store::Store;

/// Per-repository figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepoStats {
    /// Tags.
    pub tags: u64,
    /// Manifests.
    pub manifests: u64,
    /// Linked blobs (layers, configs).
    pub blobs: u64,
    /// Sum of the sizes of the manifests and blobs it links.
    pub logical_bytes: u64,
    /// Stored bytes of the chunks that only this repository uses.
    pub unique_bytes: u64,
}

/// The whole store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Inspection {
    /// Segment files.
    pub segments: u64,
    /// Bytes of segment files.
    pub segment_bytes: u64,
    /// Segments kept in the bucket (not scanned: the figures below leave them out).
    pub remote_segments: u64,
    /// Their bytes.
    pub remote_segment_bytes: u64,
    /// Index files.
    pub index_files: u64,
    /// Chunk records.
    pub chunks: u64,
    /// Chunks stored zstd-compressed.
    pub chunks_compressed: u64,
    /// Raw bytes of all chunks.
    pub chunk_raw_bytes: u64,
    /// Bytes the chunk records take (headers included).
    pub chunk_stored_bytes: u64,
    /// Distinct blobs with a recipe.
    pub blobs: u64,
    /// Sum of the sizes of distinct blobs.
    pub blob_bytes: u64,
    /// Recipe records (one per distinct blob).
    pub recipes: u64,
    /// Recipe records stored zstd-compressed (segment format 3).
    pub recipes_compressed: u64,
    /// Bytes the recipe records take (headers included): the tar headers layers hold inline
    /// are here.
    pub recipe_stored_bytes: u64,
    /// Sum over repositories of what they link: what a registry without dedup would store.
    pub logical_bytes: u64,
    /// Bytes of records that tags and manifests still need.
    pub live_bytes: u64,
    /// Bytes of records nothing needs: what `ballast gc --grace 0` would free (blobs no
    /// repository links, or that a repository links but no manifest references).
    pub dead_bytes: u64,
    /// `logical_bytes / segment_bytes`.
    pub reduction_ratio: f64,
    /// Unfinished upload sessions.
    pub upload_sessions: u64,
    /// Bytes they received (they expire after `upload_max_age_secs`).
    pub upload_bytes: u64,
    /// Per repository.
    pub repositories: BTreeMap<String, RepoStats>,
}

/// Scans the store and computes the figures.
pub fn inspect(store: &Store) -> Result<Inspection> {
    let mut out = Inspection::default();
    let mut chunk_cost: HashMap<ChunkId, u64> = HashMap::new();
    let mut recipes: HashMap<Digest, (Recipe, u64)> = HashMap::new();
    let mut other_bytes = 0u64;
    let remote: HashMap<u64, u64> = store.remote_segments().into_iter().collect();
    for id in store.segment_ids() {
        if let Some(len) = remote.get(&id) {
            // Kept in the bucket: not read from there for figures.
            out.remote_segments += 1;
            out.remote_segment_bytes += len;
            continue;
        }
        let file = store.segment_handle(id)?;
        out.segments += 1;
        out.segment_bytes += file.len()?;
        segment::scan(&file, segment::FILE_HEADER_LEN as u64, |rec| {
            let cost = rec.header.record_len();
            match rec.header.kind {
                RecordKind::Chunk => {
                    let (id, raw) = segment::ChunkPayload::decode(&rec.payload)
                        .map_or((ChunkId([0; 32]), 0), |c| (c.id, c.raw_len));
                    out.chunks += 1;
                    out.chunk_raw_bytes += u64::from(raw);
                    out.chunk_stored_bytes += cost;
                    if rec.header.flags & segment::FLAG_ZSTD != 0 {
                        out.chunks_compressed += 1;
                    }
                    chunk_cost.insert(id, cost);
                }
                RecordKind::Recipe => {
                    out.recipes += 1;
                    out.recipe_stored_bytes += cost;
                    if rec.header.flags & crate::segment::FLAG_ZSTD != 0 {
                        out.recipes_compressed += 1;
                    }
                    if let Ok(r) = Recipe::decode_record(
                        file.path(),
                        rec.offset,
                        rec.header.flags,
                        &rec.payload,
                    ) {
                        recipes.insert(r.digest.clone(), (r, cost));
                    }
                }
                _ => other_bytes += cost,
            }
            Ok(())
        })?;
    }
    out.index_files = store.index_files().len() as u64;
    out.blobs = recipes.len() as u64;
    out.blob_bytes = recipes.values().map(|(r, _)| r.size).sum();

    // Which repositories use each chunk, through the blobs and manifests they link.
    let catalog = store.catalog().read();
    // Live as a collection with no grace period would see it (docs/design.md).
    let (_, needed) = crate::gc::mark(
        &catalog,
        u64::MAX,
        &crate::gc::GcOptions {
            grace_secs: 0,
            ..Default::default()
        },
    );
    let mut users: HashMap<ChunkId, HashSet<&str>> = HashMap::new();
    let mut live_recipes: HashSet<&Digest> = HashSet::new();
    for (name, repo) in &catalog.repos {
        let stats = out.repositories.entry(name.clone()).or_default();
        stats.tags = repo.tags.len() as u64;
        stats.manifests = repo.manifests.len() as u64;
        stats.blobs = repo.blobs.len() as u64;
        for digest in repo.blobs.keys().chain(repo.manifests.keys()) {
            let Some((recipe, _)) = recipes.get(digest) else {
                continue;
            };
            stats.logical_bytes += recipe.size;
            if !needed.contains(digest) {
                continue;
            }
            live_recipes.insert(&recipe.digest);
            for p in &recipe.pieces {
                if let RecipePiece::Chunk { id, .. } = p {
                    users.entry(*id).or_default().insert(name.as_str());
                }
            }
        }
        out.logical_bytes += stats.logical_bytes;
    }
    for (id, repos) in &users {
        if repos.len() == 1 {
            if let (Some(name), Some(cost)) = (repos.iter().next(), chunk_cost.get(id)) {
                if let Some(s) = out.repositories.get_mut(*name) {
                    s.unique_bytes += cost;
                }
            }
        }
    }
    let live_chunks: u64 = users.keys().filter_map(|id| chunk_cost.get(id)).sum();
    let live_recipe_bytes: u64 = recipes
        .iter()
        .filter(|(d, _)| live_recipes.contains(d))
        .map(|(_, (_, c))| c)
        .sum();
    out.live_bytes = live_chunks + live_recipe_bytes;
    let records: u64 =
        out.chunk_stored_bytes + recipes.values().map(|(_, c)| c).sum::<u64>() + other_bytes;
    out.dead_bytes = records.saturating_sub(out.live_bytes);
    out.reduction_ratio = if out.segment_bytes == 0 {
        1.0
    } else {
        out.logical_bytes as f64 / out.segment_bytes as f64
    };
    // Every session started before the end of time (one that ends meanwhile is not counted).
    let sessions = crate::uploads::Uploads::new(store).started_before(u64::MAX)?;
    out.upload_sessions = sessions.len() as u64;
    out.upload_bytes = sessions.iter().map(|(_, len)| len).sum();
    Ok(out)
}

/// Live and dead bytes, as [`liveness`] estimates them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Liveness {
    /// Bytes of the chunk and recipe records that tags and manifests need.
    pub live_bytes: u64,
    /// The rest of the segment files: what collections could free (records nothing needs,
    /// and the few bytes of segment headers and marks).
    pub dead_bytes: u64,
}

/// What a state needs stored: the chunks and recipes of the blobs and manifests it keeps
/// (as a collection with no grace period sees it), and their record bytes.
struct LiveSet {
    chunks: HashSet<ChunkId>,
    recipes: HashSet<Digest>,
    bytes: u64,
}

/// What a state needs stored, as a collection with no grace period sees it.
fn needed_by(state: &crate::catalog::State) -> HashSet<Digest> {
    crate::gc::mark(
        state,
        u64::MAX,
        &crate::gc::GcOptions {
            grace_secs: 0,
            ..Default::default()
        },
    )
    .1
}

fn live_set(store: &Store, state: &crate::catalog::State) -> Result<LiveSet> {
    live_set_of(store, &needed_by(state))
}

fn live_set_of(store: &Store, needed: &HashSet<Digest>) -> Result<LiveSet> {
    let header = segment::RECORD_HEADER_LEN as u64;
    let mut out = LiveSet {
        chunks: HashSet::new(),
        recipes: HashSet::new(),
        bytes: 0,
    };
    for digest in needed {
        let recipe = match store.recipe(digest) {
            Ok(r) => r,
            // Linked but not readable (quarantined, or removed under a damaged catalog):
            // nothing of it is live.
            Err(crate::error::Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        if let Some(loc) = store.blob_location(&digest.index_key()) {
            out.bytes += header + u64::from(loc.len);
        }
        out.recipes.insert(digest.clone());
        for p in &recipe.pieces {
            if let RecipePiece::Chunk { id, .. } = p {
                if out.chunks.insert(*id) {
                    if let Some(loc) = store.chunk_location(id) {
                        out.bytes += header + u64::from(loc.len);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// What deleting manifests would free once a collection runs: the bytes of the chunks and
/// recipes the state needs now and would no longer need (chunks shared with anything that
/// stays are not freed), in all and per repository (a chunk freed by deletions in several
/// repositories counts in `shared_bytes`, not in theirs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Freed {
    /// Bytes freed in all.
    pub bytes: u64,
    /// Bytes freed that only one repository's deletions free, by repository.
    pub by_repository: BTreeMap<String, u64>,
    /// Bytes freed by deletions in several repositories together.
    pub shared_bytes: u64,
}

/// [`Freed`] by deleting `deleted` (repository, manifest) from `state`.
pub fn freed_by(
    store: &Store,
    state: &crate::catalog::State,
    deleted: &[(String, Digest)],
) -> Result<Freed> {
    let now = live_set(store, state)?;
    let mut after = state.clone();
    for (repo, digest) in deleted {
        after.apply(&crate::catalog::Op::DeleteManifest {
            repo: repo.clone(),
            digest: digest.clone(),
        });
    }
    let later = live_set(store, &after)?;
    let header = segment::RECORD_HEADER_LEN as u64;
    let cost = |id: &ChunkId| {
        store
            .chunk_location(id)
            .map_or(0, |l| header + u64::from(l.len))
    };
    // Which repositories' deletions used each freed chunk or recipe.
    let mut users: HashMap<ChunkId, HashSet<&str>> = HashMap::new();
    let mut recipe_users: HashMap<&Digest, HashSet<&str>> = HashMap::new();
    for (repo, digest) in deleted {
        let Some(link) = state.repos.get(repo).and_then(|r| r.manifests.get(digest)) else {
            continue;
        };
        for d in std::iter::once(digest).chain(&link.references) {
            if now.recipes.contains(d) && !later.recipes.contains(d) {
                recipe_users.entry(d).or_default().insert(repo);
            }
            let Ok(recipe) = store.recipe(d) else {
                continue;
            };
            for p in &recipe.pieces {
                if let RecipePiece::Chunk { id, .. } = p {
                    if now.chunks.contains(id) && !later.chunks.contains(id) {
                        users.entry(*id).or_default().insert(repo);
                    }
                }
            }
        }
    }
    let mut out = Freed {
        bytes: now.bytes.saturating_sub(later.bytes),
        ..Freed::default()
    };
    let mut attribute = |repos: &HashSet<&str>, bytes: u64| match repos.iter().next() {
        Some(r) if repos.len() == 1 => {
            *out.by_repository.entry((*r).to_owned()).or_default() += bytes
        }
        _ => out.shared_bytes += bytes,
    };
    for (id, repos) in &users {
        attribute(repos, cost(id));
    }
    for (d, repos) in &recipe_users {
        let bytes = store
            .blob_location(&d.index_key())
            .map_or(0, |l| header + u64::from(l.len));
        attribute(repos, bytes);
    }
    Ok(out)
}

/// Live and dead bytes from the catalog, the recipes of live blobs and the chunk index,
/// without reading chunk data (unlike [`inspect`], which scans every record): cheap enough
/// to run every minute for metrics. Live is what a collection with no grace period would
/// keep.
pub fn liveness(store: &Store) -> Result<Liveness> {
    // (The catalog is read for the mark only, not held while recipes are read.)
    let needed = needed_by(&store.catalog().read());
    let live = live_set_of(store, &needed)?.bytes;
    let total = store.footprint().segment_bytes;
    Ok(Liveness {
        live_bytes: live.min(total),
        dead_bytes: total.saturating_sub(live),
    })
}

/// Physical bytes per group of blobs (a namespace's): those of the chunks only that group
/// uses, and those of the chunks it shares with another group or with any other live blob.
/// Reads the recipes of every live blob.
pub fn sharing(store: &Store, groups: &[HashSet<Digest>]) -> Result<Vec<(u64, u64)>> {
    const OUTSIDE: usize = usize::MAX;
    let needed = needed_by(&store.catalog().read());
    let mut users: HashMap<ChunkId, HashSet<usize>> = HashMap::new();
    for digest in &needed {
        let mut owners: Vec<usize> = groups
            .iter()
            .enumerate()
            .filter(|(_, g)| g.contains(digest))
            .map(|(i, _)| i)
            .collect();
        if owners.is_empty() {
            owners.push(OUTSIDE);
        }
        let Ok(recipe) = store.recipe(digest) else {
            continue;
        };
        for p in &recipe.pieces {
            if let RecipePiece::Chunk { id, .. } = p {
                users.entry(*id).or_default().extend(owners.iter().copied());
            }
        }
    }
    let header = segment::RECORD_HEADER_LEN as u64;
    let mut out = vec![(0u64, 0u64); groups.len()];
    for (id, who) in &users {
        let cost = store
            .chunk_location(id)
            .map_or(0, |l| header + u64::from(l.len));
        for g in who.iter().filter(|g| **g != OUTSIDE) {
            if who.len() == 1 {
                out[*g].0 += cost;
            } else {
                out[*g].1 += cost;
            }
        }
    }
    Ok(out)
}
