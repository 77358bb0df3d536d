//! Reading records back: from a mapped sealed segment without a copy, or from the active
//! segment's file (writing staged records first); chunks checked against their id when
//! verification is on, recipes cached.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use crate::digest::{ChunkId, Digest};
use crate::error::{Error, Result};
use crate::index::{Location, Table};
use crate::readahead::ReadAhead;
use crate::recipe::{Recipe, RecipePiece};
use crate::segment::{self, segment_path, Check, CHUNK_PREFIX_LEN, RECORD_HEADER_LEN};
use crate::sys::Map;

use super::*;

const RECIPE_CACHE_MAX: usize = 4096;

struct MapSlice {
    map: Map,
    begin: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.get(self.begin..self.end).unwrap_or_default()
    }
}

impl Store {
    pub(super) fn cache_recipe(&self, key: [u8; 32], recipe: Arc<Recipe>) {
        let mut cache = self.inner.recipes.lock();
        if cache.len() >= RECIPE_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, recipe);
    }

    /// A segment's bytes (its map, or its file while active), if the store has it.
    pub(crate) fn segment_data_of(&self, id: u64) -> Option<SegmentData> {
        self.inner.segments.read().get(&id).cloned()
    }

    fn segment_data(&self, id: u64) -> Result<SegmentData> {
        self.inner.segments.read().get(&id).cloned().ok_or_else(|| {
            Error::corrupted(
                segment_path(&self.inner.seg_dir, id),
                0,
                "segment file referenced by the index is missing",
            )
        })
    }

    /// Reads and checks the record at `loc`; returns its flags and payload.
    pub(crate) fn read_record(&self, loc: &Location) -> Result<(u8, Bytes)> {
        self.read_record_with(loc, Check::Crc, false)
    }

    /// [`Store::read_record`], checking as `check` says. A `lone` record is read for itself,
    /// not as part of a run (a recipe): the kernel is told to read just its pages, which
    /// spares a cold read the megabytes around it that a fault on the map would read.
    fn read_record_with(&self, loc: &Location, check: Check, lone: bool) -> Result<(u8, Bytes)> {
        let path = || segment_path(&self.inner.seg_dir, loc.segment);
        match self.segment_data(loc.segment)? {
            SegmentData::Mapped(map) => {
                let start = usize::try_from(loc.offset).unwrap_or(usize::MAX);
                if lone && self.inner.opts.read_ahead != ReadAhead::Off {
                    map.will_need(start, RECORD_HEADER_LEN + loc.len as usize);
                }
                let bytes = map.get(start..).ok_or_else(|| {
                    Error::corrupted(path(), loc.offset, "record offset past end of segment")
                })?;
                let (h, payload) = segment::decode_record_with(&path(), loc.offset, bytes, check)?;
                if h.len != loc.len {
                    return Err(Error::corrupted(
                        path(),
                        loc.offset,
                        "record length differs from the index",
                    ));
                }
                let begin = start + RECORD_HEADER_LEN;
                let end = begin + payload.len();
                Ok((h.flags, Bytes::from_owner(MapSlice { map, begin, end })))
            }
            SegmentData::File(file) => {
                self.flush_for_read(loc)?;
                let (h, payload) = segment::read_record_with(&file, loc.offset, check)?;
                if h.len != loc.len {
                    return Err(Error::corrupted(
                        path(),
                        loc.offset,
                        "record length differs from the index",
                    ));
                }
                Ok((h.flags, Bytes::from(payload)))
            }
            SegmentData::Remote(_) => self.read_remote_record(loc),
        }
    }

    /// The raw bytes of a chunk; uncompressed chunks of sealed segments are not copied.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Bytes> {
        let r = self.read_chunk_checked(id);
        if let Err(Error::Corrupted { .. }) = &r {
            self.inner
                .stats
                .chunk_read_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Reads and verifies a chunk for a reader that will ask for it soon (verify-ahead,
    /// `readahead.rs`): a success is remembered for the reuse window, so that reader does
    /// not hash it again; damage is left for that reader to find and count.
    pub(crate) fn verify_ahead(&self, id: &ChunkId) {
        if !self.inner.opts.verify_chunk_ids {
            return;
        }
        if let Some(loc) = self.chunk_location(id) {
            if !self.inner.verified.fresh(id, &loc) {
                let _ = self.read_chunk_checked(id);
            }
        }
    }

    /// True when verify-ahead can help: chunks are verified and a verification is reused.
    pub(crate) fn verifies_ahead(&self) -> bool {
        self.inner.opts.verify_chunk_ids && self.inner.verified.reuses()
    }

    fn read_chunk_checked(&self, id: &ChunkId) -> Result<Bytes> {
        // With BLAKE3 verification on, the id check below covers what the record's CRC would.
        let check = if self.inner.opts.verify_chunk_ids {
            Check::Content
        } else {
            Check::Crc
        };
        let (loc, flags, payload, forced) = match self.read_located(Table::Chunks, &id.0, check) {
            Ok((loc, flags, payload)) => (loc, flags, payload, false),
            // A record whose CRC fails may still hold its chunk whole (a damaged checksum
            // field): read it by shape and let the BLAKE3 id below decide, whatever the
            // setting.
            Err(Error::Corrupted { .. }) if check == Check::Crc => {
                let (loc, flags, payload) =
                    self.read_located(Table::Chunks, &id.0, Check::Content)?;
                (loc, flags, payload, true)
            }
            Err(e) => return Err(e),
        };
        self.chunk_of_record(id, &loc, flags, payload, forced)
    }

    /// A record read ahead into a buffer (header and payload, see `readahead.rs`), checked
    /// as a record read from its segment would be: its flags and payload.
    pub(crate) fn decode_fetched(&self, loc: &Location, record: &Bytes) -> Result<(u8, Bytes)> {
        let check = if self.inner.opts.verify_chunk_ids {
            Check::Content
        } else {
            Check::Crc
        };
        self.decode_fetched_with(loc, record, check)
    }

    /// [`Store::decode_fetched`] with the record's CRC checked whatever the setting: what
    /// a compaction copies keeps its CRC, so it must be right.
    pub(crate) fn decode_fetched_crc(&self, loc: &Location, record: &Bytes) -> Result<(u8, Bytes)> {
        self.decode_fetched_with(loc, record, Check::Crc)
    }

    pub(super) fn decode_fetched_with(
        &self,
        loc: &Location,
        record: &Bytes,
        check: Check,
    ) -> Result<(u8, Bytes)> {
        let path = segment_path(&self.inner.seg_dir, loc.segment);
        let (h, payload) = segment::decode_record_with(&path, loc.offset, record, check)?;
        if h.len != loc.len {
            return Err(Error::corrupted(
                path,
                loc.offset,
                "record length differs from the index",
            ));
        }
        let len = payload.len();
        Ok((
            h.flags,
            record.slice(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len),
        ))
    }

    /// The chunk `id` from its record read ahead at `loc`; verified as [`Store::read_chunk`]
    /// verifies. An error sends the caller back to `read_chunk`, which tells damage apart.
    pub(crate) fn read_chunk_fetched(
        &self,
        id: &ChunkId,
        loc: &Location,
        record: &Bytes,
    ) -> Result<Bytes> {
        let (flags, payload) = self.decode_fetched(loc, record)?;
        self.chunk_of_record(id, loc, flags, payload, false)
    }

    /// A chunk's bytes from its record's payload: decompressed if stored so, and checked
    /// against its BLAKE3 id when verification is on (or `forced`).
    fn chunk_of_record(
        &self,
        id: &ChunkId,
        loc: &Location,
        flags: u8,
        payload: Bytes,
        forced: bool,
    ) -> Result<Bytes> {
        let path = || segment_path(&self.inner.seg_dir, loc.segment);
        let chunk = segment::ChunkPayload::decode(&payload)
            .filter(|c| c.id == *id)
            .ok_or_else(|| {
                Error::corrupted(
                    path(),
                    loc.offset,
                    "chunk record holds another chunk than the index says",
                )
            })?;
        let data = match chunk
            .bytes(flags)
            .map_err(|why| Error::corrupted(path(), loc.offset, why))?
        {
            // Stored raw: a slice of the record, not a copy.
            std::borrow::Cow::Borrowed(_) => payload.slice(CHUNK_PREFIX_LEN..),
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        };
        if forced || (self.inner.opts.verify_chunk_ids && !self.inner.verified.fresh(id, loc)) {
            self.inner
                .stats
                .chunks_verified
                .fetch_add(1, Ordering::Relaxed);
            if ChunkId::of(&data) != *id {
                return Err(Error::corrupted(
                    path(),
                    loc.offset,
                    "chunk bytes do not match their BLAKE3 id",
                ));
            }
            self.inner.verified.record(id, loc);
        }
        Ok(data)
    }

    /// Locates a key and reads its record. A collection may remove the segment between the
    /// lookup and the read; the lookup is then repeated and finds the moved copy.
    fn read_located(
        &self,
        table: Table,
        key: &[u8; 32],
        check: Check,
    ) -> Result<(Location, u8, Bytes)> {
        let what = || match table {
            Table::Chunks => format!("chunk {}", ChunkId(*key)),
            Table::Blobs => format!("blob {}", hex::encode(key)),
        };
        for _ in 0..3 {
            let loc = self
                .locate(table, key)
                .ok_or_else(|| Error::NotFound(what()))?;
            if !self.inner.segments.read().contains_key(&loc.segment) {
                continue;
            }
            match self.read_record_with(&loc, check, table == Table::Blobs) {
                Ok((flags, payload)) => return Ok((loc, flags, payload)),
                Err(e) if !self.inner.segments.read().contains_key(&loc.segment) => drop(e),
                Err(e) => return Err(e),
            }
        }
        Err(Error::NotFound(what()))
    }

    /// The recipe of a committed blob.
    pub fn recipe(&self, digest: &Digest) -> Result<Arc<Recipe>> {
        if self.is_quarantined(digest) {
            return Err(Error::NotFound(format!(
                "blob {digest} (quarantined: damaged)"
            )));
        }
        let key = digest.index_key();
        if let Some(r) = self.inner.recipes.lock().get(&key) {
            if r.digest == *digest {
                return Ok(r.clone());
            }
        }
        let (loc, flags, payload) = self.read_located(Table::Blobs, &key, Check::Crc)?;
        let recipe = Recipe::decode_record(
            &segment_path(&self.inner.seg_dir, loc.segment),
            loc.offset,
            flags,
            &payload,
        )?;
        if recipe.digest != *digest {
            return Err(Error::NotFound(format!("blob {digest}")));
        }
        // A blob is visible only while all of its chunks are stored: GC may have collected
        // the chunks of a blob nothing links any more while its recipe record lives on.
        for piece in &recipe.pieces {
            if let RecipePiece::Chunk { id, .. } = piece {
                if self.chunk_location(id).is_none() {
                    return Err(Error::NotFound(format!("blob {digest}")));
                }
            }
        }
        let recipe = Arc::new(recipe);
        self.cache_recipe(key, recipe.clone());
        Ok(recipe)
    }

    /// The size of a committed blob, or `None` when it is not stored.
    pub fn stat(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.recipe(digest) {
            Ok(r) => Ok(Some(r.size)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What a registry without dedup would store: per repository, the sizes of the blobs
    /// and manifests it links (a blob two repositories link counts twice). Blob sizes come
    /// from `sizes`, which remembers them between calls (a blob's size never changes); a
    /// size not known yet is read from the blob's recipe, and sizes of blobs no longer
    /// linked are forgotten. The catalog is read first and let go before any recipe is.
    pub fn logical_bytes(&self, sizes: &mut HashMap<Digest, u64>) -> u64 {
        let mut links: HashMap<Digest, u64> = HashMap::new();
        let mut total = 0u64;
        {
            let cat = self.catalog().read();
            for repo in cat.repos.values() {
                total += repo.manifests.values().map(|m| m.size).sum::<u64>();
                for d in repo.blobs.keys() {
                    *links.entry(d.clone()).or_default() += 1;
                }
            }
        }
        sizes.retain(|d, _| links.contains_key(d));
        for (d, n) in links {
            let size = match sizes.get(&d) {
                Some(s) => *s,
                // A link to a blob that is not readable (quarantined): it adds nothing.
                None => match self.stat(&d) {
                    Ok(Some(s)) => {
                        sizes.insert(d, s);
                        s
                    }
                    _ => 0,
                },
            };
            total += size * n;
        }
        total
    }

    /// True when the blob is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        matches!(self.stat(digest), Ok(Some(_)))
    }

    /// Reads a recipe by its location (for fsck and inspect).
    pub fn recipe_at(&self, loc: &Location) -> Result<Recipe> {
        let (flags, payload) = self.read_record(loc)?;
        Recipe::decode_record(
            &segment_path(&self.inner.seg_dir, loc.segment),
            loc.offset,
            flags,
            &payload,
        )
    }
}
