//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (session, monolithic, mount), `PATCH`
//! (chunked and streamed), `GET` (status), `PUT` (finish), `DELETE` (cancel). The sessions
//! themselves (their durability, warm writers, resumption) are the engine's
//! (`ballast_engine::Uploads`); this file speaks HTTP.

use crate::body::ReqBody;
use ballast_engine::catalog::Op;
use ballast_engine::uploads::SessionMeta;
use ballast_engine::{Algorithm, Digest, Error as EngineError, Input, UploadWriter};
use bytes::Bytes;
use hyper::header::{CONTENT_RANGE, LOCATION, RANGE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::{blocking, check_name, first, parse_digest, query, reply};
use crate::body::{next_data, parse_content_range, Pace, ResBody};
use crate::error::ApiError;
use crate::{now_secs, App};

pub async fn start(
    app: &App,
    access: &crate::auth::Access,
    name: &str,
    req: Request<ReqBody>,
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
        super::check_room(app).await?;
        let mut body = req.into_body();
        ingest(app, &mut body, &digest).await?;
        link(app, name, &digest).await?;
        return Ok(created(name, &digest));
    }
    super::check_room(app).await?;
    let id = format!("{:032x}", rand::random::<u128>());
    let uploads = app.uploads.clone();
    let meta = SessionMeta {
        repo: name.to_owned(),
        started_at: now_secs(),
        client: client_key(access, &req),
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

/// Who a session counts against for `upload_sessions_per_client_max`: the account, or the
/// address of an anonymous client.
fn client_key(access: &crate::auth::Access, req: &Request<ReqBody>) -> Option<String> {
    match &access.principal {
        crate::auth::Principal::Anonymous => req
            .extensions()
            .get::<crate::guard::ClientAddr>()
            .map(|a| format!("address:{}", a.0.ip())),
        p => Some(p.subject()),
    }
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
pub(super) async fn link(app: &App, name: &str, digest: &Digest) -> Result<(), ApiError> {
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

/// What the engine says about a session, in the registry's terms.
fn session_error(id: &str, e: EngineError) -> ApiError {
    match e {
        EngineError::NotFound(_)
        | EngineError::InvalidInput {
            what: Input::UploadId,
            ..
        } => ApiError::BlobUploadUnknown(format!("upload {id} is not known")),
        EngineError::InvalidInput {
            what: Input::UploadOffset,
            reason,
        } => ApiError::RangeInvalid(format!("upload {id}: {reason}")),
        other => ApiError::from_engine(other),
    }
}

/// The session's byte count, checking that it belongs to `name`.
async fn session_len(app: &App, name: &str, id: &str) -> Result<u64, ApiError> {
    let uploads = app.uploads.clone();
    let session = id.to_owned();
    let (meta, len) = blocking(move || {
        uploads
            .status(&session)
            .map_err(|e| session_error(&session, e))
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

/// Ends a session before the reply: from then on it is unknown. Its log is removed after
/// the reply; if the server stops first, the next expiry pass removes it.
async fn end_session(app: &App, id: &str) -> Result<(), ApiError> {
    let uploads = app.uploads.clone();
    let session = id.to_owned();
    blocking(move || uploads.end(&session).map_err(ApiError::from_engine)).await?;
    let uploads = app.uploads.clone();
    let session = id.to_owned();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = uploads.discard(&session) {
            tracing::warn!(upload = %session, error = %e, "removing a finished upload's log failed; the next expiry pass retries");
        }
    });
    Ok(())
}

pub async fn patch(
    app: &App,
    name: &str,
    id: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let len = session_len(app, name, id).await?;
    check_content_range(&req, name, id, len)?;
    super::check_room(app).await?;
    let mut body = req.into_body();
    let writer = take_writer(app, id, len, Algorithm::Sha256).await?;
    // What arrived before a failure is kept (checkpointed): the client can ask for the
    // status and resume from there.
    let (result, read_err) = feed(app, &mut body, writer, UploadWriter::checkpoint).await;
    let len = result?;
    if let Some(e) = read_err {
        return Err(e);
    }
    Ok(session_reply(StatusCode::ACCEPTED, name, id, len))
}

/// The session's writer, to append at `offset`.
async fn take_writer(
    app: &App,
    id: &str,
    offset: u64,
    algorithm: Algorithm,
) -> Result<UploadWriter, ApiError> {
    let uploads = app.uploads.clone();
    let session = id.to_owned();
    blocking(move || {
        uploads
            .writer(&session, offset, algorithm)
            .map_err(|e| session_error(&session, e))
    })
    .await
}

/// A chunk must start where the session ends (416 otherwise, with the current range).
fn check_content_range(
    req: &Request<ReqBody>,
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
async fn pump(body: &mut ReqBody, mut pace: Pace, tx: mpsc::Sender<Bytes>) -> Option<ApiError> {
    loop {
        match next_data(body, &mut pace).await {
            Ok(Some(data)) => {
                if tx.send(data).await.is_err() {
                    return None;
                }
            }
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

/// Something that takes a request body's bytes on a blocking thread.
trait Sink: Send + 'static {
    fn take(&mut self, data: Bytes) -> Result<(), EngineError>;
}

impl Sink for UploadWriter {
    fn take(&mut self, data: Bytes) -> Result<(), EngineError> {
        self.write(data)
    }
}

impl Sink for ballast_engine::Ingest {
    fn take(&mut self, data: Bytes) -> Result<(), EngineError> {
        self.write(data)
    }
}

/// Feeds a request body to `sink` on a blocking thread (the engine cuts, hashes and stores
/// while the next frames arrive), then runs `end` there, whether the body ended or reading
/// it failed (returned beside). A failure to store stops reading.
async fn feed<S: Sink, T: Send + 'static>(
    app: &App,
    body: &mut ReqBody,
    mut sink: S,
    end: impl FnOnce(S) -> Result<T, EngineError> + Send + 'static,
) -> (Result<T, ApiError>, Option<ApiError>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let worker = tokio::task::spawn_blocking(move || -> Result<T, ApiError> {
        while let Some(data) = rx.blocking_recv() {
            sink.take(data).map_err(ApiError::from_engine)?;
        }
        end(sink).map_err(ApiError::from_engine)
    });
    let read_err = pump(body, app.body_pace(), tx).await;
    let result = match worker.await {
        Ok(r) => r,
        Err(e) => Err(ApiError::Internal(e.to_string())),
    };
    (result, read_err)
}

pub async fn finish(
    app: &App,
    name: &str,
    id: &str,
    req: Request<ReqBody>,
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
    super::check_room(app).await?;
    let mut body = req.into_body();
    let writer = take_writer(app, id, len, digest.algorithm()).await?;
    let expected = digest.clone();
    let (result, read_err) = feed(app, &mut body, writer, move |w| {
        w.finish(&expected).map(drop)
    })
    .await;
    let result = match (result, read_err) {
        // A body cut short is not the blob, whatever the engine made of it.
        (_, Some(e)) | (Err(e), None) => Err(e),
        (Ok(()), None) => link(app, name, &digest).await,
    };
    // Finished or failed, the session is over: nothing of a mismatched upload is kept. It
    // ends after the link is committed, so a crash in between leaves the session (the
    // client's retried PUT finishes it again) rather than neither session nor blob.
    end_session(app, id).await?;
    result?;
    Ok(created(name, &digest))
}

/// Feeds a monolithic upload's body into the engine, which checks the digest (and only
/// hashes the bytes when the blob is stored already: a dedup hit writes nothing).
async fn ingest(app: &App, body: &mut ReqBody, expected: &Digest) -> Result<(), ApiError> {
    let store = app.store.clone();
    let d = expected.clone();
    let sink = blocking(move || Ok(store.ingest(&d))).await?;
    let (result, read_err) = feed(app, body, sink, ballast_engine::Ingest::finish).await;
    match read_err {
        Some(e) => Err(e),
        None => result,
    }
}
