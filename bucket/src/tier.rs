//! Reads of segments whose local file is gone (the engine's `RemoteSegments`): byte ranges
//! fetched from the bucket in aligned blocks of [`BLOCK_BYTES`] and kept in files under
//! `DIR/cache/`, least recently used out past the budget. A pull of a blob whose chunks lie
//! in the bucket costs a range GET per run of missing blocks (adjacent blocks are one
//! request), not one per chunk; readers that want a block being fetched wait for that fetch
//! instead of asking again; the engine's read-ahead asks for the blocks a recipe needs next
//! ([`Tier::prefetch`]), fetched in the background at a bounded depth.
//!
//! Nothing fetched is trusted: the engine checks every record read from here against its
//! CRC (and every chunk against its BLAKE3 id when verification is on), and a check that
//! fails discards the blocks ([`Tier::discard`]) so the next read fetches them again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::client::Bucket;
use crate::layout;

/// The unit fetched and cached: big enough that a pull costs few requests, small enough
/// that a read of one chunk does not fetch much around it.
pub const BLOCK_BYTES: u64 = 4 << 20;

/// Fetches ahead of readers at once.
const PREFETCH_DEPTH: u64 = 4;

/// Blocks one fetch ahead asks for (one streamed GET).
const PREFETCH_BLOCKS: u64 = 16;

/// Spans waiting for a fetch ahead while [`PREFETCH_DEPTH`] run (a blob GET asks for the
/// blob's extent in every remote segment at once), as long as they come to no more than
/// half the budget (what a reader that went away can make the tier fetch for nothing);
/// past that, a reader fetches for itself.
const PREFETCH_QUEUE: usize = 64;

/// A span a reader will want: segment, segment length, offset, length.
type Span = (u64, u64, u64, usize);

type Key = (u64, u64);

/// Figures for metrics.
#[derive(Debug, Default)]
pub struct TierStats {
    /// Blocks read from the cache.
    pub hits: AtomicU64,
    /// Blocks fetched from the bucket.
    pub misses: AtomicU64,
    /// Bytes fetched from the bucket.
    pub bytes_fetched: AtomicU64,
    /// Blocks evicted.
    pub evictions: AtomicU64,
    /// Reads that failed (the bucket did not answer).
    pub failures: AtomicU64,
}

/// What reads through the bucket hold and cost, as of now (a shipper's or a replica's
/// status, and the metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReadFigures {
    /// Segments whose local file was dropped (or never was, on a replica): read from the
    /// bucket.
    pub remote_segments: u64,
    /// Their bytes.
    pub remote_bytes: u64,
    /// Bytes of blocks fetched and cached.
    pub cache_bytes: u64,
    /// Blocks read from the cache since start.
    pub cache_hits: u64,
    /// Blocks fetched from the bucket since start.
    pub cache_misses: u64,
    /// Bytes fetched from the bucket since start.
    pub cache_bytes_fetched: u64,
    /// Reads from the bucket that failed since start.
    pub cache_failures: u64,
}

#[derive(Default)]
struct State {
    /// Cached blocks: their length and last use.
    blocks: HashMap<Key, (u64, u64)>,
    /// Last use → block, oldest first.
    by_use: BTreeMap<u64, Key>,
    bytes: u64,
    tick: u64,
    /// Blocks being fetched now.
    fetching: HashSet<Key>,
    /// Prefetches running.
    prefetching: u64,
    /// Spans waiting for one of them, oldest first, and their bytes.
    queued: std::collections::VecDeque<Span>,
    queued_bytes: u64,
}

/// The cache of fetched blocks and the fetching.
pub struct Tier {
    bucket: Bucket,
    dir: PathBuf,
    /// Its own runtime: readers call from any thread, inside another runtime or not.
    runtime: Option<tokio::runtime::Runtime>,
    state: Mutex<State>,
    fetched: Condvar,
    /// Bytes the blocks may take (the operator's `cache_bytes_max` less the local copies of
    /// segments still kept, see [`Tier::set_budget`]).
    budget: AtomicU64,
    /// Figures.
    pub stats: TierStats,
}

impl Tier {
    /// The tier a shipper or a replica of `store` (data directory `data`) reads through:
    /// its block cache under `DIR/cache`, bounded by `cache_bytes_max` (1 GiB unset),
    /// installed in the store as its remote.
    pub fn install(
        bucket: &Bucket,
        store: &ballast_engine::Store,
        data: &Path,
        cfg: &crate::config::BucketConfig,
    ) -> anyhow::Result<Arc<Tier>> {
        let remote: Vec<u64> = store.remote_segments().iter().map(|(id, _)| *id).collect();
        let tier = Tier::open(
            bucket.clone(),
            &data.join(crate::ship::CACHE_DIR),
            cfg.cache_bytes_max
                .unwrap_or(crate::config::DEFAULT_BLOCK_CACHE),
            &remote,
        )?;
        store.set_remote(Arc::new(Remote(tier.clone())));
        Ok(tier)
    }

    /// The figures of reads through this tier into `store`.
    pub fn figures(&self, store: &ballast_engine::Store) -> ReadFigures {
        let f = store.footprint();
        let t = &self.stats;
        ReadFigures {
            remote_segments: f.remote_segments,
            remote_bytes: f.remote_bytes,
            cache_bytes: self.cached_bytes(),
            cache_hits: t.hits.load(Ordering::Relaxed),
            cache_misses: t.misses.load(Ordering::Relaxed),
            cache_bytes_fetched: t.bytes_fetched.load(Ordering::Relaxed),
            cache_failures: t.failures.load(Ordering::Relaxed),
        }
    }

    /// A tier reading from `bucket`, caching under `dir` (created; blocks left there by an
    /// earlier run are kept, the oldest first out, except those of segments not in
    /// `remote`, which are gone from the store).
    pub fn open(
        bucket: Bucket,
        dir: &Path,
        budget: u64,
        remote: &[u64],
    ) -> anyhow::Result<Arc<Tier>> {
        std::fs::create_dir_all(dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ballast-tier")
            .enable_all()
            .build()?;
        let remote: HashSet<u64> = remote.iter().copied().collect();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata()?;
            match parse_block_name(&name) {
                Some(key) if remote.contains(&key.0) => {
                    let used = meta
                        .modified()
                        .ok()
                        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos());
                    found.push((used, key, meta.len()));
                }
                _ => std::fs::remove_file(entry.path())?,
            }
        }
        found.sort_unstable();
        let mut state = State::default();
        for (_, key, len) in found {
            state.tick += 1;
            state.blocks.insert(key, (len, state.tick));
            state.by_use.insert(state.tick, key);
            state.bytes += len;
        }
        let tier = Arc::new(Tier {
            bucket,
            dir: dir.to_path_buf(),
            runtime: Some(runtime),
            state: Mutex::new(state),
            fetched: Condvar::new(),
            budget: AtomicU64::new(budget),
            stats: TierStats::default(),
        });
        tier.trim(&HashSet::new());
        Ok(tier)
    }

    /// Bytes the cached blocks take now.
    pub fn cached_bytes(&self) -> u64 {
        self.state.lock().bytes
    }

    /// Sets the bytes the blocks may take, evicting down to it.
    pub fn set_budget(&self, bytes: u64) {
        self.budget.store(bytes, Ordering::Relaxed);
        self.trim(&HashSet::new());
    }

    fn path(&self, (segment, block): Key) -> PathBuf {
        self.dir.join(format!("{segment:020}-{block:08}.blk"))
    }

    /// The blocks covering `len` bytes at `offset` of a segment of `segment_len` bytes.
    fn blocks(segment: u64, segment_len: u64, offset: u64, len: usize) -> Vec<Key> {
        let end = (offset + len as u64).min(segment_len);
        if end <= offset {
            return Vec::new();
        }
        (offset / BLOCK_BYTES..=(end - 1) / BLOCK_BYTES)
            .map(|b| (segment, b))
            .collect()
    }

    /// Reads `len` bytes at `offset` of `segment`, fetching the blocks not cached.
    pub fn read(
        &self,
        segment: u64,
        segment_len: u64,
        offset: u64,
        len: usize,
    ) -> anyhow::Result<Bytes> {
        let end = offset + len as u64;
        if end > segment_len {
            anyhow::bail!(
                "segment {segment} has {segment_len} bytes; {len} asked at offset {offset}"
            );
        }
        let keys = Tier::blocks(segment, segment_len, offset, len);
        let mut tries = 0;
        loop {
            self.ensure(&keys, segment_len)?;
            match self.read_cached(&keys, offset, end) {
                Ok(out) => {
                    let mut st = self.state.lock();
                    for key in &keys {
                        st.touch(*key);
                    }
                    self.stats
                        .hits
                        .fetch_add(keys.len() as u64, Ordering::Relaxed);
                    return Ok(out);
                }
                // Evicted by another reader between the fetch and the read (a budget
                // smaller than what readers read at once): fetched again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                Err(e) => anyhow::bail!("reading the cached blocks of segment {segment}: {e}"),
            }
        }
    }

    fn read_cached(&self, keys: &[Key], offset: u64, end: u64) -> std::io::Result<Bytes> {
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for key in keys {
            let start = key.1 * BLOCK_BYTES;
            let from = offset.max(start) - start;
            let to = end.min(start + BLOCK_BYTES) - start;
            let mut buf = vec![0u8; (to - from) as usize];
            let file = std::fs::File::open(self.path(*key))?;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, from)?;
            out.extend_from_slice(&buf);
        }
        Ok(out.freeze())
    }

    /// Makes `keys` cached: claims those neither cached nor being fetched, fetches the
    /// claimed runs (one GET per run of adjacent blocks), and waits for the rest.
    fn ensure(&self, keys: &[Key], segment_len: u64) -> anyhow::Result<()> {
        loop {
            let (mine, waiting) = {
                let mut st = self.state.lock();
                let mut mine = Vec::new();
                let mut waiting = false;
                for k in keys {
                    if st.blocks.contains_key(k) {
                        continue;
                    }
                    if st.fetching.contains(k) {
                        waiting = true;
                    } else {
                        st.fetching.insert(*k);
                        mine.push(*k);
                    }
                }
                if mine.is_empty() && waiting {
                    // Someone else fetches them: wait, then look again.
                    self.fetched.wait(&mut st);
                    continue;
                }
                (mine, waiting)
            };
            if !mine.is_empty() {
                let r = self.fetch_runs(&mine, segment_len);
                let mut st = self.state.lock();
                for k in &mine {
                    st.fetching.remove(k);
                }
                drop(st);
                self.fetched.notify_all();
                r?;
                if waiting {
                    continue;
                }
            }
            return Ok(());
        }
    }

    /// Fetches the claimed blocks `keys` (sorted) and caches them: one streamed GET per run
    /// of adjacent blocks, each block kept (and its waiters woken) as soon as its bytes are
    /// in, so a reader of the first block of a long run does not wait for the whole run.
    fn fetch_runs(&self, keys: &[Key], segment_len: u64) -> anyhow::Result<()> {
        let mut runs: Vec<(u64, u64, u64)> = Vec::new(); // (segment, first block, last block)
        for &(s, b) in keys {
            match runs.last_mut() {
                Some((rs, _, last)) if *rs == s && *last + 1 == b => *last = b,
                _ => runs.push((s, b, b)),
            }
        }
        for (s, first, last) in runs {
            self.fetch_run(s, first, last, segment_len)
                .inspect_err(|_| {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                })?;
        }
        Ok(())
    }

    fn fetch_run(&self, s: u64, first: u64, last: u64, segment_len: u64) -> anyhow::Result<()> {
        let start = first * BLOCK_BYTES;
        let end = ((last + 1) * BLOCK_BYTES).min(segment_len);
        let (mut tx, mut rx) = futures::channel::mpsc::channel::<anyhow::Result<Bytes>>(16);
        let bucket = self.bucket.clone();
        // The stream is driven on the tier's runtime; its pieces come here, where the
        // blocks are written and their waiters woken.
        self.runtime().spawn(async move {
            use futures::{SinkExt, StreamExt};
            let mut stream = match bucket
                .stream_range(&layout::segment_name(s), start..end)
                .await
            {
                Ok(st) => st,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            while let Some(piece) = stream.next().await {
                let failed = piece.is_err();
                if tx.send(piece).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut block = first;
        let mut buf: Vec<u8> = Vec::with_capacity(BLOCK_BYTES as usize);
        let mut got = start;
        let block_end = |b: u64| ((b + 1) * BLOCK_BYTES).min(segment_len);
        while got < end {
            let piece = match futures::executor::block_on(futures::StreamExt::next(&mut rx)) {
                Some(p) => p?,
                None => anyhow::bail!(
                    "segment {s} in {} is shorter than this registry's index says",
                    self.bucket.describe()
                ),
            };
            self.stats
                .bytes_fetched
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
            let mut rest = &piece[..];
            while !rest.is_empty() {
                let want = (block_end(block) - got) as usize;
                let n = want.min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                got += n as u64;
                if got == block_end(block) {
                    self.store_block((s, block), &buf)?;
                    self.stats.misses.fetch_add(1, Ordering::Relaxed);
                    self.state.lock().fetching.remove(&(s, block));
                    self.fetched.notify_all();
                    self.trim(&HashSet::from([(s, block)]));
                    buf.clear();
                    block += 1;
                }
            }
        }
        Ok(())
    }

    fn store_block(&self, key: Key, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        let mut st = self.state.lock();
        if let Some((old, _)) = st.blocks.get(&key).copied() {
            st.bytes -= old;
        }
        st.bytes += bytes.len() as u64;
        st.blocks.insert(key, (bytes.len() as u64, 0));
        st.touch(key);
        Ok(())
    }

    /// Evicts the least recently used blocks past the budget, sparing `keep` (blocks a
    /// reader is about to read).
    fn trim(&self, keep: &HashSet<Key>) {
        let budget = self.budget.load(Ordering::Relaxed);
        let mut gone = Vec::new();
        {
            let mut st = self.state.lock();
            if st.bytes <= budget {
                return;
            }
            let mut ticks = st.by_use.keys().copied().collect::<Vec<_>>().into_iter();
            while st.bytes > budget {
                let Some(tick) = ticks.next() else { break };
                let key = st.by_use[&tick];
                if keep.contains(&key) {
                    continue;
                }
                st.by_use.remove(&tick);
                if let Some((len, _)) = st.blocks.remove(&key) {
                    st.bytes -= len;
                }
                gone.push(key);
            }
        }
        self.stats
            .evictions
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        for key in gone {
            let _ = std::fs::remove_file(self.path(key));
        }
    }

    /// Starts fetching the blocks of a span a reader will want: up to [`PREFETCH_BLOCKS`]
    /// (and half the budget) in one streamed GET, at most [`PREFETCH_DEPTH`] fetches at
    /// once; further spans wait in order for one to end (up to [`PREFETCH_QUEUE`]; past
    /// that, the reader fetches for itself).
    pub fn prefetch(self: &Arc<Self>, segment: u64, segment_len: u64, offset: u64, len: usize) {
        let span = (segment, segment_len, offset, len);
        let mut st = self.state.lock();
        if st.prefetching >= PREFETCH_DEPTH || !st.queued.is_empty() {
            let room = self.budget.load(Ordering::Relaxed) / 2;
            if st.queued.len() < PREFETCH_QUEUE && st.queued_bytes + len as u64 <= room {
                st.queued.push_back(span);
                st.queued_bytes += len as u64;
            }
            return;
        }
        drop(st);
        self.start_prefetch(span, false);
    }

    /// Starts the oldest waiting spans while fewer than [`PREFETCH_DEPTH`] fetches run.
    fn start_queued(self: &Arc<Self>) {
        loop {
            let span = {
                let mut st = self.state.lock();
                if st.prefetching >= PREFETCH_DEPTH {
                    return;
                }
                match st.queued.pop_front() {
                    Some(span) => {
                        st.queued_bytes -= span.3 as u64;
                        span
                    }
                    None => return,
                }
            };
            if !self.start_prefetch(span, true) {
                return;
            }
        }
    }

    /// Claims the missing blocks of `span` and fetches them on the tier's runtime; false
    /// when [`PREFETCH_DEPTH`] fetches run already (a `queued` span then goes back to the
    /// front of the queue).
    fn start_prefetch(self: &Arc<Self>, span: Span, queued: bool) -> bool {
        let (segment, segment_len, offset, len) = span;
        let keys = Tier::blocks(segment, segment_len, offset, len);
        let mine: Vec<Key> = {
            let mut st = self.state.lock();
            if st.prefetching >= PREFETCH_DEPTH {
                if queued {
                    st.queued.push_front(span);
                    st.queued_bytes += len as u64;
                }
                return false;
            }
            // What the budget can hold until the reader gets to it.
            let most =
                (self.budget.load(Ordering::Relaxed) / 2 / BLOCK_BYTES).clamp(1, PREFETCH_BLOCKS);
            let mine: Vec<Key> = keys
                .into_iter()
                .filter(|k| !st.blocks.contains_key(k) && !st.fetching.contains(k))
                .take(most as usize)
                .collect();
            if mine.is_empty() {
                return true;
            }
            st.prefetching += 1;
            for k in &mine {
                st.fetching.insert(*k);
            }
            mine
        };
        let tier = self.clone();
        self.runtime().spawn_blocking(move || {
            if let Err(e) = tier.fetch_runs(&mine, segment_len) {
                tracing::debug!(error = %e, "fetching ahead from the bucket failed");
            }
            let mut st = tier.state.lock();
            st.prefetching -= 1;
            for k in &mine {
                st.fetching.remove(k);
            }
            drop(st);
            tier.fetched.notify_all();
            tier.start_queued();
        });
        true
    }

    /// Forgets the cached blocks of a span that failed a check.
    pub fn discard(&self, segment: u64, offset: u64, len: usize) {
        let keys = Tier::blocks(segment, u64::MAX, offset, len);
        let mut st = self.state.lock();
        for key in keys {
            if let Some((len, tick)) = st.blocks.remove(&key) {
                st.bytes -= len;
                st.by_use.remove(&tick);
                let _ = std::fs::remove_file(self.path(key));
            }
        }
    }
}

impl Tier {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the tier")
    }
}

/// A runtime may not be dropped where blocking is not allowed (the last store handle may
/// go inside the server's runtime): its threads are let go instead.
impl Drop for Tier {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl State {
    fn touch(&mut self, key: Key) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(entry) = self.blocks.get_mut(&key) {
            let old = std::mem::replace(&mut entry.1, tick);
            self.by_use.remove(&old);
            self.by_use.insert(tick, key);
        }
    }
}

/// What [`settle`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Segments whose local file was dropped (now read from the bucket).
    pub segments_made_remote: u64,
    /// Bytes that freed.
    pub bytes_freed: u64,
}

/// Keeps the local disk within `cache_bytes_max`: the local copies of segments the bucket
/// holds (`shipped`: id → length, from the newest checkpoint) and the cached blocks
/// together. The oldest copies go first (a registry pulls recent images most); the blocks
/// get what the copies left. Segments not shipped yet, and the active one, are never
/// dropped and do not count. Blocking (unlinks and directory syncs): call it off the
/// runtime's threads.
pub fn settle(
    store: &ballast_engine::Store,
    tier: &Tier,
    shipped: &BTreeMap<u64, u64>,
    cache_bytes_max: u64,
) -> anyhow::Result<Settled> {
    let local: Vec<(u64, u64)> = store
        .local_sealed_segments()
        .into_iter()
        .filter(|(id, len)| shipped.get(id) == Some(len))
        .collect();
    let mut copies: u64 = local.iter().map(|(_, l)| l).sum();
    let mut done = Settled::default();
    for (id, _) in local {
        if copies + tier.cached_bytes().min(cache_bytes_max / 2) <= cache_bytes_max {
            break;
        }
        if let Some(freed) = store.make_remote(id)? {
            copies -= freed;
            done.segments_made_remote += 1;
            done.bytes_freed += freed;
        }
    }
    tier.set_budget(cache_bytes_max.saturating_sub(copies));
    Ok(done)
}

fn parse_block_name(name: &str) -> Option<Key> {
    let stem = name.strip_suffix(".blk")?;
    let (s, b) = stem.split_once('-')?;
    Some((s.parse().ok()?, b.parse().ok()?))
}

/// The engine's view of a [`Tier`].
pub struct Remote(pub Arc<Tier>);

impl ballast_engine::store::RemoteSegments for Remote {
    fn read(
        &self,
        segment: u64,
        segment_len: u64,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, String> {
        self.0.read(segment, segment_len, offset, len).map_err(|e| {
            format!("segment {segment} is kept in the bucket and could not be read from it: {e:#}")
        })
    }

    fn prefetch(&self, segment: u64, segment_len: u64, offset: u64, len: usize) {
        self.0.prefetch(segment, segment_len, offset, len);
    }

    fn is_cached(&self, segment: u64, segment_len: u64, offset: u64, len: usize) -> bool {
        let st = self.0.state.lock();
        Tier::blocks(segment, segment_len, offset, len)
            .iter()
            .all(|k| st.blocks.contains_key(k))
    }

    fn discard(&self, segment: u64, offset: u64, len: usize) {
        self.0.discard(segment, offset, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_map_to_the_blocks_they_touch() {
        assert_eq!(Tier::blocks(7, 10 << 20, 0, 10), vec![(7, 0)]);
        assert_eq!(
            Tier::blocks(7, 10 << 20, BLOCK_BYTES - 1, 2),
            vec![(7, 0), (7, 1)]
        );
        // Clamped to the segment's end.
        assert_eq!(
            Tier::blocks(7, BLOCK_BYTES + 5, BLOCK_BYTES, 100),
            vec![(7, 1)]
        );
        assert!(Tier::blocks(7, 10, 10, 5).is_empty());
        assert_eq!(
            parse_block_name("00000000000000000007-00000001.blk"),
            Some((7, 1))
        );
        assert_eq!(parse_block_name("x.tmp"), None);
    }
}
