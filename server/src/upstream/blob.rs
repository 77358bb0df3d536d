//! Blob fills. A pull of a blob a cached repository does not hold yet:
//!
//! - when the store holds the blob already (another image shares it) and a cached manifest
//!   of the repository references it, it is linked without asking the upstream; otherwise a
//!   `HEAD` upstream confirms the repository there has it before it is linked (no bytes
//!   move);
//! - otherwise one fetch per blob runs on its own (a client that leaves does not stop it):
//!   the bytes go into the store as they arrive (the engine checks the digest at the end)
//!   and into a spool file, unlinked at creation, from which every client waiting for the
//!   blob is served while it arrives. The last byte is sent only once the digest matched and
//!   the blob is linked: a client never gets all of a wrong blob, and nothing of it is kept.
//! - a range request, or an upstream that does not say the length, waits for the fetch and
//!   is then served from the store.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::body::ReqBody;
use ballast_engine::catalog::Op;
use ballast_engine::Digest;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_TYPE, RANGE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, watch};

use super::Upstream;
use crate::body::{ChannelBody, ResBody};
use crate::error::ApiError;
use crate::handlers::{blocking, reply};
use crate::remote::Failure;
use crate::App;

/// How far a fetch has come.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// The blob's length, once the upstream answered.
    len: Option<u64>,
    /// Bytes in the spool file.
    received: u64,
    /// The end: the blob is stored and linked, or why not.
    done: Option<Result<(), Failure>>,
}

/// One blob being fetched.
pub struct Flight {
    spool: std::fs::File,
    progress: watch::Sender<Progress>,
}

impl Flight {
    /// Waits for the end of the fetch.
    async fn done(&self) -> Result<(), Failure> {
        let mut rx = self.progress.subscribe();
        loop {
            if let Some(d) = rx.borrow_and_update().done.clone() {
                return d;
            }
            if rx.changed().await.is_err() {
                return Err(Failure::Failed("the fetch ended without a result".into()));
            }
        }
    }

    /// Waits until the length is known or the fetch ended.
    async fn started(&self) -> Progress {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let p = rx.borrow_and_update();
                if p.len.is_some() || p.done.is_some() {
                    return p.clone();
                }
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }
}

/// Serves a blob the cached repository `name` does not hold (see the module comment).
/// `None`: it is held now; the caller serves it from the store.
pub async fn serve_missing_blob(
    app: &Arc<App>,
    up: &Arc<Upstream>,
    name: &str,
    digest: &Digest,
    req: &Request<ReqBody>,
    head: bool,
) -> Result<Option<Response<ResBody>>, ApiError> {
    let remote = up.remote_name(name);
    if app.store.contains(digest) {
        if !referenced(app, name, digest) {
            let h = up.client.head_blob(&remote, digest).await;
            up.count(&h);
            h.map_err(|f| blob_error(up, name, digest, &f))?;
        }
        link(app, name, digest)
            .await
            .map_err(|f| blob_error(up, name, digest, &f))?;
        return Ok(None);
    }
    if head {
        let h = up.client.head_blob(&remote, digest).await;
        up.count(&h);
        let size = h.map_err(|f| blob_error(up, name, digest, &f))?;
        let mut r = reply(StatusCode::OK)
            .header("Docker-Content-Digest", digest.to_string())
            .header(CONTENT_TYPE, "application/octet-stream");
        if let Some(n) = size {
            r = r.header(CONTENT_LENGTH, n.to_string());
        }
        return Ok(Some(r.body(crate::body::empty())));
    }
    let flight = join_or_start(app, up, name, digest)?;
    let p = flight.started().await;
    if let Some(Err(f)) = &p.done {
        return Err(blob_error(up, name, digest, f));
    }
    match p.len {
        Some(len) if req.headers().get(RANGE).is_none() => {
            let r = reply(StatusCode::OK)
                .header("Docker-Content-Digest", digest.to_string())
                .header(ACCEPT_RANGES, "bytes")
                .header("ETag", format!("\"{digest}\""))
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, len.to_string());
            Ok(Some(r.body(stream(flight, len))))
        }
        _ => {
            flight
                .done()
                .await
                .map_err(|f| blob_error(up, name, digest, &f))?;
            Ok(None)
        }
    }
}

/// True when a cached manifest of the repository references the blob.
fn referenced(app: &App, name: &str, digest: &Digest) -> bool {
    let state = app.store.catalog().read();
    state.repos.get(name).is_some_and(|r| {
        r.manifests
            .values()
            .any(|m| m.origin.is_some() && m.references.contains(digest))
    })
}

fn blob_error(up: &Upstream, name: &str, digest: &Digest, f: &Failure) -> ApiError {
    let msg = format!(
        "blob {digest} is not cached in {name}, and pull_through {:?} ({}) could not provide \
         it: {f}",
        up.cfg.name,
        up.origin(name)
    );
    match f {
        Failure::NotFound => ApiError::BlobUnknown(msg),
        Failure::Denied(_) => ApiError::Denied(msg),
        Failure::RateLimited => ApiError::TooManyRequests(msg),
        _ => ApiError::Unavailable(msg),
    }
}

/// The fetch of a blob for a repository: the one in flight, or a new one.
fn join_or_start(
    app: &Arc<App>,
    up: &Arc<Upstream>,
    name: &str,
    digest: &Digest,
) -> Result<Arc<Flight>, ApiError> {
    let cache = &app.pull_through;
    let key = (name.to_owned(), digest.clone());
    let mut flights = cache.flights.lock();
    // (A fetch that just failed is not joined: this request tries again.)
    if let Some(f) = flights
        .get(&key)
        .filter(|f| !matches!(f.progress.borrow().done, Some(Err(_))))
    {
        return Ok(f.clone());
    }
    let path = cache
        .spool_dir
        .join(format!("{:016x}.part", rand::random::<u64>()));
    let spool = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", path.display())))?;
    // Unlinked now: the open file serves the waiting clients, and a crash leaves nothing.
    let _ = std::fs::remove_file(&path);
    let (progress, _) = watch::channel(Progress::default());
    let flight = Arc::new(Flight { spool, progress });
    flights.insert(key.clone(), flight.clone());
    drop(flights);
    let (app, up, f) = (app.clone(), up.clone(), flight.clone());
    tokio::spawn(async move {
        let result = fetch(&app, &up, &key.0, &key.1, &f).await;
        match &result {
            Ok(()) => {
                up.counters.blob_fills.fetch_add(1, Ordering::Relaxed);
                tracing::info!(upstream = %up.cfg.name, repository = %key.0, digest = %key.1, "blob cached");
            }
            Err(e) => {
                tracing::warn!(upstream = %up.cfg.name, repository = %key.0, digest = %key.1, error = %e, "blob fetch failed")
            }
        }
        f.progress.send_modify(|p| p.done = Some(result));
        let mut flights = app.pull_through.flights.lock();
        // (Only this fetch's entry: a retry may have replaced a failed one already.)
        if flights.get(&key).is_some_and(|x| Arc::ptr_eq(x, &f)) {
            flights.remove(&key);
        }
    });
    Ok(flight)
}

/// Fetches a blob into the store and the spool; links it once the engine found the digest
/// right.
async fn fetch(
    app: &App,
    up: &Upstream,
    name: &str,
    digest: &Digest,
    flight: &Arc<Flight>,
) -> Result<(), Failure> {
    if up.cfg.delta && up.delta_support.load(Ordering::Relaxed) != 2 {
        match super::delta::fetch(app, up, name, digest).await {
            Ok(()) => return link(app, name, digest).await,
            Err(Failure::Failed(why)) => {
                if up.delta_support.load(Ordering::Relaxed) == 0 {
                    up.delta_support.store(2, Ordering::Relaxed);
                    tracing::info!(upstream = %up.cfg.name, %why, "the upstream has no delta endpoints: plain blob fetches from now on");
                } else {
                    tracing::warn!(upstream = %up.cfg.name, %digest, %why, "a delta fetch failed: a plain fetch instead");
                }
            }
            // (Another registry's "not found" for a path it does not know: asked plainly.)
            Err(Failure::NotFound) if up.delta_support.load(Ordering::Relaxed) != 1 => {}
            Err(f) => return Err(f),
        }
    }
    let r = up.client.get_blob(&up.remote_name(name), digest).await;
    up.count(&r);
    let mut r = r?;
    let len = r.content_length();
    crate::handlers::check_room(app)
        .await
        .map_err(|e| Failure::Failed(format!("this registry cannot store it: {e}")))?;
    flight.progress.send_modify(|p| p.len = len);
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let (store, d, f) = (app.store.clone(), digest.clone(), flight.clone());
    let worker = tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        let mut sink = store.ingest(&d);
        let mut offset = 0u64;
        let failed = |e: &dyn std::fmt::Display| Failure::Failed(format!("storing it: {e}"));
        while let Some(data) = rx.blocking_recv() {
            f.spool
                .write_all_at(&data, offset)
                .map_err(|e| failed(&e))?;
            offset += data.len() as u64;
            f.progress.send_modify(|p| p.received = offset);
            sink.write(data).map_err(|e| failed(&e))?;
        }
        sink.finish().map_err(|e| match e {
            ballast_engine::Error::DigestMismatch { actual, .. } => Failure::Failed(format!(
                "it sent bytes whose digest is {actual}, not {d}: refused, nothing stored"
            )),
            other => failed(&other),
        })
    });
    let mut received = 0u64;
    let mut cut: Option<Failure> = None;
    loop {
        match r.chunk().await {
            Ok(Some(c)) => {
                received += c.len() as u64;
                up.counters
                    .bytes
                    .fetch_add(c.len() as u64, Ordering::Relaxed);
                if len.is_some_and(|n| received > n) {
                    cut = Some(Failure::Failed(format!(
                        "it sent more than the {} bytes it announced",
                        len.unwrap_or(0)
                    )));
                    break;
                }
                if tx.send(c).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                cut = Some(Failure::Unreachable(format!(
                    "the blob was cut off after {received} bytes: {e}"
                )));
                break;
            }
        }
    }
    drop(tx);
    let stored = worker
        .await
        .map_err(|e| Failure::Failed(format!("storing it: {e}")))?;
    // A body cut short or overlong is not the blob, whatever the engine made of it.
    if let Some(c) = cut {
        return Err(c);
    }
    if let Some(n) = len.filter(|&n| n != received) {
        return Err(Failure::Unreachable(format!(
            "the blob was cut off after {received} of {n} bytes"
        )));
    }
    stored?;
    link(app, name, digest).await
}

async fn link(app: &App, name: &str, digest: &Digest) -> Result<(), Failure> {
    let store = app.store.clone();
    let op = Op::LinkBlob {
        repo: name.to_owned(),
        digest: digest.clone(),
        at: crate::now_secs(),
    };
    blocking(move || store.commit_ops(vec![op]).map_err(ApiError::from_engine))
        .await
        .map_err(|e| Failure::Failed(format!("linking it: {e}")))
}

/// A response body that follows a fetch through its spool file; the last byte waits for
/// the digest check (see the module comment).
fn stream(flight: Arc<Flight>, len: u64) -> ResBody {
    let (mut tx, body) = ChannelBody::new(len);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut rx = flight.progress.subscribe();
        let mut pos = 0u64;
        loop {
            let p = rx.borrow_and_update().clone();
            if let Some(Err(f)) = &p.done {
                return tx.fail(std::io::Error::other(f.to_string()));
            }
            let verified = matches!(p.done, Some(Ok(())));
            let limit = if verified {
                len
            } else {
                p.received.min(len.saturating_sub(1))
            };
            if pos < limit {
                let n = (limit - pos).min(1 << 20) as usize;
                let mut buf = vec![0u8; n];
                if let Err(e) = flight.spool.read_exact_at(&mut buf, pos) {
                    return tx.fail(e);
                }
                pos += n as u64;
                if !tx.send(Bytes::from(buf)) {
                    return;
                }
                continue;
            }
            if pos >= len && verified {
                return;
            }
            // The client gets what is here before the fetch brings more.
            if !tx.flush() || handle.block_on(rx.changed()).is_err() {
                return;
            }
        }
    });
    body.boxed()
}
