//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (session, monolithic, mount), `PATCH`
//! (chunked and streamed), `GET` (status), `PUT` (finish), `DELETE` (cancel).

use ballast_engine::catalog::Op;
use ballast_engine::io::{FileHandle, WritebackHints};
use ballast_engine::uploads::SessionMeta;
use ballast_engine::{Algorithm, BlobWriter, ChunkMode, Digest, Error as EngineError, Input};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CONTENT_RANGE, LOCATION, RANGE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::{blocking, check_name, first, parse_digest, query, reply};
use crate::body::{next_data, parse_content_range, ResBody};
use crate::error::ApiError;
use crate::{now_secs, App};

/// Bytes read from an upload spool per write into the engine.
const SPOOL_READ_LEN: usize = 1 << 20;

pub async fn start(
    app: &App,
    access: &crate::auth::Access,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let q = query(&req);
    if let Some(mount) = first(&q, "mount") {
        let digest = parse_digest(mount)?;
        if let Some(res) = try_mount(app, access, name, &digest, first(&q, "from")).await? {
            return Ok(res);
        }
    } else if let Some(d) = first(&q, "digest") {
        // Monolithic upload: the body is the whole blob.
        let digest = parse_digest(d)?;
        let mut body = req.into_body();
        ingest(app, None, Some(&mut body), &digest, None).await?;
        link(app, name, &digest).await?;
        return Ok(created(name, &digest));
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let uploads = app.store.uploads().clone();
    let meta = SessionMeta {
        repo: name.to_owned(),
        started_at: now_secs(),
    };
    let session = id.clone();
    blocking(move || {
        uploads
            .create(&session, &meta)
            .map_err(ApiError::from_engine)
    })
    .await?;
    Ok(session_reply(StatusCode::ACCEPTED, name, &id, 0))
}

/// Cross-repository mount: links a blob the registry already holds. `from` names where the
/// client saw it; when it is missing there, the blob is still mounted if another repository
/// holds it (automatic mount). Either way the caller must be allowed to pull the source:
/// a mount must not reveal or copy a blob the caller could not read. `None` means "start a
/// normal upload instead".
async fn try_mount(
    app: &App,
    access: &crate::auth::Access,
    name: &str,
    digest: &Digest,
    from: Option<&str>,
) -> Result<Option<Response<ResBody>>, ApiError> {
    let readable = {
        let cat = app.store.catalog().read();
        let source = |(repo, r): (&String, &ballast_engine::catalog::Repo)| {
            r.blobs.contains_key(digest) && access.may(&app.auth, repo, crate::auth::Action::Pull)
        };
        from.and_then(|f| cat.repos.get_key_value(f))
            .is_some_and(source)
            || cat.repos.iter().any(source)
    };
    if !readable {
        return Ok(None);
    }
    match link(app, name, digest).await {
        Ok(()) => Ok(Some(created(name, digest))),
        // Not stored (any more): the client uploads it instead.
        Err(ApiError::BlobUnknown(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn created(name: &str, digest: &Digest) -> Response<ResBody> {
    reply(StatusCode::CREATED)
        .header(LOCATION, format!("/v2/{name}/blobs/{digest}"))
        .header("Docker-Content-Digest", digest.to_string())
        .empty()
}

fn session_reply(status: StatusCode, name: &str, id: &str, len: u64) -> Response<ResBody> {
    let range = if len == 0 {
        "0-0".to_owned()
    } else {
        format!("0-{}", len - 1)
    };
    reply(status)
        .header(LOCATION, format!("/v2/{name}/blobs/uploads/{id}"))
        .header(RANGE, range)
        .header("Docker-Upload-UUID", id)
        .empty()
}

/// Links a stored blob to a repository. The blob is pinned in the same catalog commit, so a
/// collection running at the same time cannot take it away under the new link.
async fn link(app: &App, name: &str, digest: &Digest) -> Result<(), ApiError> {
    let store = app.store.clone();
    let op = Op::LinkBlob {
        repo: name.to_owned(),
        digest: digest.clone(),
        at: now_secs(),
    };
    let d = digest.clone();
    blocking(move || {
        store.commit_ops(vec![op]).map_err(|e| match e {
            EngineError::NotFound(_) => ApiError::BlobUnknown(format!(
                "blob {d} is not stored (it may just have been garbage-collected); upload it again"
            )),
            other => ApiError::from_engine(other),
        })
    })
    .await
}

/// The session's byte count, checking that it belongs to `name`.
async fn session_len(app: &App, name: &str, id: &str) -> Result<u64, ApiError> {
    let uploads = app.store.uploads().clone();
    let session = id.to_owned();
    let (meta, len) = blocking(move || {
        uploads.status(&session).map_err(|e| match e {
            EngineError::NotFound(_)
            | EngineError::InvalidInput {
                what: Input::UploadId,
                ..
            } => ApiError::BlobUploadUnknown(format!("upload {session} is not known")),
            other => ApiError::from_engine(other),
        })
    })
    .await?;
    if meta.repo != name {
        return Err(ApiError::BlobUploadUnknown(format!(
            "upload {id} does not belong to {name}"
        )));
    }
    Ok(len)
}

pub async fn status(app: &App, name: &str, id: &str) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let len = session_len(app, name, id).await?;
    Ok(session_reply(StatusCode::NO_CONTENT, name, id, len))
}

pub async fn cancel(app: &App, name: &str, id: &str) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    session_len(app, name, id).await?;
    end_session(app, id).await?;
    Ok(reply(StatusCode::NO_CONTENT).empty())
}

/// Ends a session before the reply: from then on it is unknown. Its spool is removed after
/// the reply (dropping hundreds of MiB from the page cache takes a good part of a second);
/// if the server stops first, the next expiry pass removes it.
async fn end_session(app: &App, id: &str) -> Result<(), ApiError> {
    app.warm.forget(id);
    let uploads = app.store.uploads().clone();
    let session = id.to_owned();
    blocking(move || uploads.end(&session).map_err(ApiError::from_engine)).await?;
    let uploads = app.store.uploads().clone();
    let session = id.to_owned();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = uploads.discard(&session) {
            tracing::warn!(upload = %session, error = %e, "removing a finished upload's spool failed; the next expiry pass retries");
        }
    });
    Ok(())
}

pub async fn patch(
    app: &App,
    name: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let len = session_len(app, name, id).await?;
    check_content_range(&req, name, id, len)?;
    let mut body = req.into_body();
    // Feed a warm writer along with the spool when this process has seen the whole session.
    let warm = app.warm.take(id, len).or_else(|| {
        (len == 0 && app.warm.has_room())
            .then(|| BlobWriter::new(&app.store, Algorithm::Sha256, ChunkMode::Auto))
    });
    let appended = append(app, id, len, &mut body, warm).await;
    if let Some(writer) = appended.warm {
        app.warm.put(id, writer, appended.len);
    }
    if let Some(e) = appended.error {
        // What arrived before the failure is kept: the client can ask for the status and
        // resume from there.
        return Err(e);
    }
    Ok(session_reply(StatusCode::ACCEPTED, name, id, appended.len))
}

/// A chunk must start where the session ends (416 otherwise, with the current range).
fn check_content_range(
    req: &Request<Incoming>,
    name: &str,
    id: &str,
    len: u64,
) -> Result<(), ApiError> {
    let Some(value) = req.headers().get(CONTENT_RANGE) else {
        return Ok(());
    };
    let range = value.to_str().ok().and_then(parse_content_range);
    match range {
        Some((start, _)) if start == len => Ok(()),
        Some((start, _)) => Err(ApiError::RangeInvalid(format!(
            "chunk starts at {start} but upload {id} of {name} has {len} bytes; resume from {len}"
        ))),
        None => Err(ApiError::RangeInvalid(format!(
            "Content-Range {value:?} is not <start>-<end>"
        ))),
    }
}

/// Sends a request body's data frames to a blocking consumer until the body ends, the
/// consumer stops, or reading fails (returned). Dropping the sender tells the consumer the end.
async fn pump(
    body: &mut Incoming,
    idle: std::time::Duration,
    tx: mpsc::Sender<Bytes>,
    mut also: Option<mpsc::Sender<Bytes>>,
) -> Option<ApiError> {
    loop {
        match next_data(body, idle).await {
            Ok(Some(data)) => {
                if let Some(also_tx) = &also {
                    // A second consumer that stops (its own failure) is dropped, not waited on.
                    if also_tx.send(data.clone()).await.is_err() {
                        also = None;
                    }
                }
                if tx.send(data).await.is_err() {
                    return None;
                }
            }
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// What an append did: the session's length afterwards (bytes that arrived before a failure
/// are kept), the warm writer if it is still in step with the spool, and the failure.
struct Appended {
    len: u64,
    warm: Option<BlobWriter>,
    error: Option<ApiError>,
}

/// Appends a request body to the session's spool and makes it durable, feeding `warm` the
/// same bytes on a thread of its own, so chunking overlaps with the spool's write and fsync.
async fn append(
    app: &App,
    id: &str,
    offset: u64,
    body: &mut Incoming,
    warm: Option<BlobWriter>,
) -> Appended {
    let uploads = app.store.uploads().clone();
    let session = id.to_owned();
    let file = match blocking(move || {
        uploads
            .appender(&session, offset)
            .map_err(ApiError::from_engine)
    })
    .await
    {
        Ok(f) => f,
        Err(e) => {
            return Appended {
                len: offset,
                warm: None,
                error: Some(e),
            }
        }
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let spool = tokio::task::spawn_blocking(move || -> (u64, Option<ApiError>) {
        let mut at = offset;
        let mut hints = WritebackHints::from(offset);
        let mut error = None;
        while let Some(data) = rx.blocking_recv() {
            if let Err(e) = file.write_all_at(&data, at) {
                error = Some(ApiError::from_engine(e));
                break;
            }
            at += data.len() as u64;
            // The fsync before the reply then waits for the last few MiB, not the whole PATCH.
            file.appended(&mut hints, at);
        }
        match file.sync() {
            Ok(()) => (at, error),
            Err(e) => (offset, Some(ApiError::from_engine(e))),
        }
    });
    // The warm writer gets the same frames; it stays in step only if it took every byte the
    // spool kept.
    let (feeder, warm_tx) = match warm {
        Some(mut w) => {
            let (wtx, mut wrx) = mpsc::channel::<Bytes>(8);
            let handle = tokio::task::spawn_blocking(move || -> Option<(BlobWriter, u64)> {
                let mut fed = 0u64;
                while let Some(data) = wrx.blocking_recv() {
                    let n = data.len() as u64;
                    // On failure the session finishes cold, from the spool.
                    w.write_bytes(data).ok()?;
                    fed += n;
                }
                Some((w, fed))
            });
            (Some(handle), Some(wtx))
        }
        None => (None, None),
    };
    let read_err = pump(body, app.config.body_idle_timeout(), tx, warm_tx).await;
    let spooled = spool.await;
    let warm = match feeder {
        Some(h) => h.await.ok().flatten(),
        None => None,
    };
    let (len, error) = match spooled {
        Ok(r) => r,
        Err(e) => {
            return Appended {
                len: offset,
                warm: None,
                error: Some(ApiError::Internal(e.to_string())),
            }
        }
    };
    let warm = match (&error, warm) {
        (None, Some((w, fed))) if fed == len - offset => Some(w),
        _ => None,
    };
    Appended {
        len,
        warm,
        error: error.or(read_err),
    }
}

pub async fn finish(
    app: &App,
    name: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let q = query(&req);
    let digest = match first(&q, "digest") {
        Some(d) => parse_digest(d)?,
        None => {
            return Err(ApiError::DigestInvalid(
                "finishing an upload needs ?digest=<digest>".into(),
            ))
        }
    };
    let len = session_len(app, name, id).await?;
    check_content_range(&req, name, id, len)?;
    let mut body = req.into_body();
    // Warm: the writer has seen every byte so far; the last chunk goes straight to it.
    let warm = app
        .warm
        .take(id, len)
        .filter(|_| digest.algorithm() == Algorithm::Sha256)
        .or_else(|| {
            (len == 0).then(|| BlobWriter::new(&app.store, digest.algorithm(), ChunkMode::Auto))
        });
    let result = match warm {
        Some(writer) => ingest(app, None, Some(&mut body), &digest, Some(writer)).await,
        None => {
            let appended = append(app, id, len, &mut body, None).await;
            match appended.error {
                Some(e) => Err(e),
                None => {
                    let uploads = app.store.uploads().clone();
                    let session = id.to_owned();
                    let spool =
                        blocking(move || uploads.reader(&session).map_err(ApiError::from_engine))
                            .await?;
                    ingest(app, Some(spool), None, &digest, None).await
                }
            }
        }
    };
    let result = match result {
        Ok(()) => link(app, name, &digest).await,
        Err(e) => Err(e),
    };
    // Finished or failed, the session is over: nothing of a mismatched upload is kept. It
    // ends after the link is committed, so a crash in between leaves the session (the
    // client's retried PUT finishes it again) rather than neither session nor blob.
    end_session(app, id).await?;
    result?;
    Ok(created(name, &digest))
}

/// Feeds a spooled upload and/or a request body into the engine and checks the digest. When
/// the blob is already stored, the bytes are only hashed: a dedup hit writes nothing.
async fn ingest(
    app: &App,
    spool: Option<FileHandle>,
    body: Option<&mut Incoming>,
    expected: &Digest,
    warm: Option<BlobWriter>,
) -> Result<(), ApiError> {
    let store = app.store.clone();
    let known = match warm {
        Some(_) => false,
        None => {
            let (s, d) = (store.clone(), expected.clone());
            blocking(move || Ok(s.contains(&d))).await?
        }
    };
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let expected_owned = expected.clone();
    let worker = tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
        enum Sink {
            Hash(Box<ballast_engine::digest::Hasher>),
            Store(Box<BlobWriter>),
        }
        let algorithm = expected_owned.algorithm();
        let mut sink = match warm {
            Some(w) => Sink::Store(Box::new(w)),
            None if known => Sink::Hash(Box::new(algorithm.hasher())),
            None => Sink::Store(Box::new(BlobWriter::new(
                &store,
                algorithm,
                ChunkMode::Auto,
            ))),
        };
        let mut feed = |data: Bytes| -> Result<(), ApiError> {
            match &mut sink {
                Sink::Hash(h) => {
                    h.update(&data);
                    Ok(())
                }
                Sink::Store(w) => w.write_bytes(data).map_err(ApiError::from_engine),
            }
        };
        if let Some(file) = spool {
            let len = file.len().map_err(ApiError::from_engine)?;
            let mut at = 0;
            while at < len {
                let n = SPOOL_READ_LEN.min((len - at) as usize);
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, at)
                    .map_err(ApiError::from_engine)?;
                feed(Bytes::from(buf))?;
                at += n as u64;
            }
        }
        while let Some(data) = rx.blocking_recv() {
            feed(data)?;
        }
        match sink {
            Sink::Hash(h) => {
                let actual = h.finish();
                if actual != expected_owned {
                    return Err(ApiError::DigestInvalid(format!(
                        "content does not match digest {expected_owned} (computed {actual})"
                    )));
                }
                Ok(())
            }
            Sink::Store(w) => w
                .finish(Some(&expected_owned))
                .map(|_| ())
                .map_err(ApiError::from_engine),
        }
    });
    let read_err = match body {
        Some(body) => pump(body, app.config.body_idle_timeout(), tx, None).await,
        None => {
            drop(tx);
            None
        }
    };
    let result = worker
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(e) = read_err {
        return Err(e);
    }
    result
}
