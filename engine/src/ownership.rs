//! Who uses which stored bytes: for every chunk that an image needs, the one image and the
//! one namespace that use it, or "shared". The console's unique and shared figures per
//! image, layer and namespace come from one pass over the recipes ([`Ownership::compute`]).
//!
//! An image is a repository's top-level manifest (one no other manifest of the repository
//! references: a tagged image or index, an untagged one, a signature or SBOM) with what it
//! references, down through an index's children. The same manifest in two repositories is
//! two images. A chunk is unique to an image when no other image needs it: its bytes are
//! what deleting that image alone would let a collection free (recipe records aside).
//! Chunks are keyed by the first 8 bytes of their id (a collision between two live chunks,
//! about one in 10^19 pairs, would only move bytes between figures): about 24 bytes of
//! memory per live chunk while the figures are kept.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::catalog::State;
use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Result};
use crate::recipe::RecipePiece;
use crate::segment;
use crate::store::Store;

const SHARED: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Owner {
    image: u32,
    namespace: u32,
    /// Bytes of the chunk's record.
    cost: u32,
}

/// A namespace's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceBytes {
    /// Repositories.
    pub repositories: u64,
    /// Sum of the sizes of what its repositories link (what a registry without dedup
    /// would store).
    pub logical_bytes: u64,
    /// Stored bytes of the chunks its images need (each once).
    pub stored_bytes: u64,
    /// Of those, the bytes only this namespace needs.
    pub unique_bytes: u64,
}

/// How a blob's stored bytes are used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlobBytes {
    /// Chunks in its recipe (each once).
    pub chunks: u64,
    /// Stored bytes of those chunks.
    pub stored_bytes: u64,
    /// Of those, the bytes another image needs too.
    pub shared_bytes: u64,
}

/// The figures of one pass (see the module comment).
#[derive(Debug, Default)]
pub struct Ownership {
    chunks: HashMap<u64, Owner>,
    images: HashMap<(String, Digest), u64>,
    /// Per namespace (a repository name's first component).
    pub namespaces: BTreeMap<String, NamespaceBytes>,
    /// Logical bytes per repository: the sizes of what it links.
    pub repositories: HashMap<String, u64>,
    /// Stored bytes of every chunk some image needs.
    pub stored_bytes: u64,
    /// Of those, the bytes several images need.
    pub shared_bytes: u64,
    /// Images counted.
    pub image_count: u64,
}

/// The namespace of a repository: its name's first component (`team-a` of `team-a/api`).
pub fn namespace_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

fn key(id: &ChunkId) -> u64 {
    u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8]))
}

/// The images of a state: (repository, top-level manifest, every blob and manifest digest it
/// needs).
pub fn images(state: &State) -> Vec<(String, Digest, Vec<Digest>)> {
    let mut out = Vec::new();
    for (name, repo) in &state.repos {
        let children: HashSet<&Digest> = repo
            .manifests
            .values()
            .flat_map(|m| m.references.iter())
            .filter(|d| repo.manifests.contains_key(*d))
            .collect();
        for top in repo.manifests.keys().filter(|d| !children.contains(d)) {
            let mut needed = vec![top.clone()];
            let mut seen: HashSet<&Digest> = HashSet::from([top]);
            let mut stack = vec![top];
            while let Some(d) = stack.pop() {
                let Some(m) = repo.manifests.get(d) else {
                    continue;
                };
                for r in &m.references {
                    if seen.insert(r) {
                        needed.push(r.clone());
                        if repo.manifests.contains_key(r) {
                            stack.push(r);
                        }
                    }
                }
            }
            out.push((name.clone(), top.clone(), needed));
        }
    }
    out
}

impl Ownership {
    /// Reads the recipes of every image's blobs once (the catalog is read first, not held).
    /// Blobs without a readable recipe (a pull-through cache's not yet fetched layers, a
    /// quarantined blob) count nothing.
    pub fn compute(store: &Store) -> Result<Ownership> {
        let (images, links) = {
            let state = store.catalog().read();
            let links: Vec<(String, u64, Vec<Digest>)> = state
                .repos
                .iter()
                .map(|(name, r)| {
                    let manifests = r.manifests.values().map(|m| m.size).sum::<u64>();
                    (name.clone(), manifests, r.blobs.keys().cloned().collect())
                })
                .collect();
            (images(&state), links)
        };
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        let mut logical = Vec::with_capacity(links.len());
        for (name, manifests, blobs) in links {
            let mut bytes = manifests;
            for d in blobs {
                bytes += match sizes.get(&d) {
                    Some(s) => *s,
                    None => {
                        let s = store.stat(&d).ok().flatten().unwrap_or(0);
                        sizes.insert(d, s);
                        s
                    }
                };
            }
            logical.push((name, bytes));
        }
        let mut out = Ownership::default();
        let mut ns_ids: HashMap<&str, u32> = HashMap::new();
        for (repo, bytes) in &logical {
            let ns = out
                .namespaces
                .entry(namespace_of(repo).to_owned())
                .or_default();
            ns.repositories += 1;
            ns.logical_bytes += bytes;
            out.repositories.insert(repo.clone(), *bytes);
        }
        let names: Vec<&str> = out.namespaces.keys().map(String::as_str).collect();
        for (i, n) in names.iter().enumerate() {
            ns_ids.insert(n, i as u32);
        }
        let header = segment::RECORD_HEADER_LEN as u64;
        let mut ns_used: Vec<u64> = vec![0; names.len()];
        // Images in namespace order, so each namespace's chunks are counted once in its
        // stored bytes with one set at a time.
        let mut order: Vec<usize> = (0..images.len()).collect();
        order.sort_by_key(|i| namespace_of(&images[*i].0));
        let mut current_ns = u32::MAX;
        let mut ns_seen: HashSet<u64> = HashSet::new();
        for i in order {
            let (repo, _, needed) = &images[i];
            let ns = ns_ids.get(namespace_of(repo)).copied().unwrap_or(SHARED);
            if ns != current_ns {
                ns_seen.clear();
                current_ns = ns;
            }
            let mut image_seen: HashSet<u64> = HashSet::new();
            for d in needed {
                let recipe = match store.recipe(d) {
                    Ok(r) => r,
                    Err(Error::NotFound(_)) => continue,
                    Err(e) => return Err(e),
                };
                for p in &recipe.pieces {
                    let RecipePiece::Chunk { id, .. } = p else {
                        continue;
                    };
                    let k = key(id);
                    if !image_seen.insert(k) {
                        continue;
                    }
                    let owner = match out.chunks.get_mut(&k) {
                        Some(o) => o,
                        None => {
                            let cost = store
                                .chunk_location(id)
                                .map_or(0, |l| header + u64::from(l.len));
                            out.chunks.entry(k).or_insert(Owner {
                                image: i as u32,
                                namespace: ns,
                                cost: u32::try_from(cost).unwrap_or(u32::MAX),
                            })
                        }
                    };
                    if owner.image != i as u32 {
                        owner.image = SHARED;
                    }
                    if owner.namespace != ns {
                        owner.namespace = SHARED;
                    }
                    if ns_seen.insert(k) {
                        if let Some(u) = ns_used.get_mut(ns as usize) {
                            *u += u64::from(owner.cost);
                        }
                    }
                }
            }
        }
        let mut unique_image: Vec<u64> = vec![0; images.len()];
        let mut unique_ns: Vec<u64> = vec![0; names.len()];
        for o in out.chunks.values() {
            let cost = u64::from(o.cost);
            out.stored_bytes += cost;
            match unique_image.get_mut(o.image as usize) {
                Some(u) => *u += cost,
                None => out.shared_bytes += cost,
            }
            if let Some(u) = unique_ns.get_mut(o.namespace as usize) {
                *u += cost;
            }
        }
        let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
        for (i, n) in names.iter().enumerate() {
            if let Some(ns) = out.namespaces.get_mut(n) {
                ns.stored_bytes = ns_used[i];
                ns.unique_bytes = unique_ns[i];
            }
        }
        out.image_count = images.len() as u64;
        for (i, (repo, top, _)) in images.into_iter().enumerate() {
            out.images.insert((repo, top), unique_image[i]);
        }
        Ok(out)
    }

    /// Stored bytes only this image needs; `None` for a manifest that is not an image of
    /// its own (an index's child) or was not there when the figures were made.
    pub fn unique_bytes(&self, repo: &str, digest: &Digest) -> Option<u64> {
        self.images.get(&(repo.to_owned(), digest.clone())).copied()
    }

    /// How a blob's chunks are used (reads its recipe).
    pub fn blob(&self, store: &Store, digest: &Digest) -> Result<BlobBytes> {
        let recipe = store.recipe(digest)?;
        let mut out = BlobBytes::default();
        let mut seen = HashSet::new();
        for p in &recipe.pieces {
            let RecipePiece::Chunk { id, .. } = p else {
                continue;
            };
            if !seen.insert(key(id)) {
                continue;
            }
            out.chunks += 1;
            let Some(o) = self.chunks.get(&key(id)) else {
                continue;
            };
            out.stored_bytes += u64::from(o.cost);
            if o.image == SHARED {
                out.shared_bytes += u64::from(o.cost);
            }
        }
        Ok(out)
    }
}
