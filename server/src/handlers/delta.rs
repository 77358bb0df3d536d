//! The delta replication endpoints (docs/replication.md), under `/v2/_ballast/<name>/`, with
//! push permission on `<name>`:
//!
//! - `POST …/chunks/missing`: a body of 32-byte chunk ids; the answer lists those this
//!   registry lacks, in the same form.
//! - `POST …/chunks`: frames of (id, u32 length, bytes); each is checked against its BLAKE3
//!   id before it is stored.
//! - `PUT …/blobs/<digest>`: the blob's size and pieces (the engine's recipe encoding); the
//!   blob is assembled from held chunks, checked, stored and linked in `<name>`. Chunks not
//!   held are listed in the error (`BLOB_UPLOAD_INVALID`, `detail.missing`).
//!
//! And for a pull-through cache reading this registry, with pull permission:
//!
//! - `GET …/blobs/<digest>/recipe`: the blob's size and pieces, as above.
//! - `POST …/blobs/<digest>/chunks`: a body of chunk ids of that blob; the answer is frames
//!   for as many of them, in order, as fit in 16 MiB (ask again for the rest).

use crate::body::ReqBody;
use ballast_engine::delta::{Assembled, FrameError};
use ballast_engine::{ChunkId, Error as EngineError};
use bytes::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, Response, StatusCode};

use super::{blocking, check_name, parse_digest, reply};
use crate::body::{full, read_limited, ResBody};
use crate::error::ApiError;
use crate::App;

/// Ids asked about at a time.
pub const IDS_MAX: usize = 65_536;
/// Bytes of chunks sent at a time.
pub const CHUNKS_BODY_MAX: usize = 64 << 20;
/// Bytes of a recipe.
const RECIPE_MAX: usize = 64 << 20;

async fn body(app: &App, req: Request<ReqBody>, max: usize, what: &str) -> Result<Bytes, ApiError> {
    let mut b = req.into_body();
    read_limited(&mut b, max, app.body_pace())
        .await?
        .ok_or_else(|| ApiError::SizeInvalid(format!("{what} is limited to {max} bytes")))
}

/// What every sending endpoint checks first: a valid name, not a cached repository, room
/// under its quota and on the disk.
async fn writable(app: &App, name: &str) -> Result<(), ApiError> {
    check_name(name)?;
    app.pull_through.refuse_writes(name)?;
    app.quotas.check_upload(name)?;
    super::check_room(app).await
}

fn ids(bytes: &[u8]) -> Result<Vec<ChunkId>, ApiError> {
    ballast_engine::delta::decode_ids(bytes).map_err(ApiError::Unsupported)
}

fn octets(status: StatusCode, bytes: Vec<u8>) -> Response<ResBody> {
    reply(status)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(full(bytes))
}

/// `POST /v2/_ballast/<name>/chunks/missing`.
pub async fn missing(
    app: &App,
    name: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    app.pull_through.refuse_writes(name)?;
    let bytes = body(app, req, IDS_MAX * 32, "a list of chunk ids").await?;
    let ids = ids(&bytes)?;
    let store = app.store.clone();
    let missing = blocking(move || Ok(store.missing_chunks(&ids))).await?;
    Ok(octets(
        StatusCode::OK,
        ballast_engine::delta::encode_ids(&missing),
    ))
}

/// `POST /v2/_ballast/<name>/chunks`.
pub async fn chunks(
    app: &App,
    name: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    writable(app, name).await?;
    let bytes = body(app, req, CHUNKS_BODY_MAX, "a body of chunks").await?;
    let frames = ballast_engine::delta::decode_frames(&bytes).map_err(|e| match e {
        FrameError::TooLarge(why) => ApiError::SizeInvalid(why),
        FrameError::Malformed(why) => ApiError::Unsupported(why),
    })?;
    let store = app.store.clone();
    let n = frames.len();
    let new = blocking(move || {
        store.put_chunks(&frames).map_err(|e| match e {
            // (The bytes sent are not their id's.)
            EngineError::InvalidInput { reason, .. } => ApiError::DigestInvalid(reason),
            other => ApiError::from_engine(other),
        })
    })
    .await?;
    Ok(reply(StatusCode::OK).json(&serde_json::json!({ "received": n, "new": new })))
}

/// `PUT /v2/_ballast/<name>/blobs/<digest>`.
pub async fn blob(
    app: &App,
    name: &str,
    digest: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    writable(app, name).await?;
    let digest = parse_digest(digest)?;
    let bytes = body(app, req, RECIPE_MAX, "a recipe").await?;
    let (size, pieces) = ballast_engine::recipe::decode_wire(&bytes)
        .map_err(|why| ApiError::BlobUploadInvalid(format!("the recipe is not valid: {why}")))?;
    let store = app.store.clone();
    let d = digest.clone();
    let assembled = blocking(move || {
        store
            .commit_from_recipe(&d, size, pieces)
            .map_err(ApiError::from_engine)
    })
    .await?;
    match assembled {
        Assembled::Committed(_) => {}
        Assembled::Missing(ids) => {
            let hexes: Vec<String> = ids.iter().map(|i| hex::encode(i.0)).collect();
            let body = serde_json::json!({"errors": [{
                "code": "BLOB_UPLOAD_INVALID",
                "message": format!(
                    "{} chunks of blob {digest} are not held here: send them \
                     (POST /v2/_ballast/{name}/chunks), then the recipe again",
                    ids.len()
                ),
                "detail": { "missing": hexes },
            }]});
            return Ok(reply(StatusCode::BAD_REQUEST).json(&body));
        }
    }
    super::uploads::link(app, name, &digest).await?;
    Ok(reply(StatusCode::CREATED)
        .header("Docker-Content-Digest", digest.to_string())
        .header(
            hyper::header::LOCATION,
            format!("/v2/{name}/blobs/{digest}"),
        )
        .empty())
}

/// Frames of chunks answered at a time.
pub const FETCH_FRAMES_MAX: usize = 16 << 20;

/// The recipe of a blob `name` may read.
async fn readable_recipe(
    app: &App,
    name: &str,
    digest: &str,
) -> Result<std::sync::Arc<ballast_engine::recipe::Recipe>, ApiError> {
    check_name(name)?;
    let digest = parse_digest(digest)?;
    if !super::linked(app, name, &digest) {
        return Err(ApiError::BlobUnknown(format!(
            "blob {digest} is not in repository {name}"
        )));
    }
    let store = app.store.clone();
    blocking(move || {
        store.recipe(&digest).map_err(|e| match e {
            EngineError::NotFound(_) => {
                ApiError::BlobUnknown(format!("blob {digest} is not stored"))
            }
            other => ApiError::from_engine(other),
        })
    })
    .await
}

/// `GET /v2/_ballast/<name>/blobs/<digest>/recipe`.
pub async fn recipe(app: &App, name: &str, digest: &str) -> Result<Response<ResBody>, ApiError> {
    let r = readable_recipe(app, name, digest).await?;
    Ok(octets(
        StatusCode::OK,
        ballast_engine::recipe::encode_wire(r.size, &r.pieces),
    ))
}

/// `POST /v2/_ballast/<name>/blobs/<digest>/chunks`.
pub async fn fetch(
    app: &App,
    name: &str,
    digest: &str,
    req: Request<ReqBody>,
) -> Result<Response<ResBody>, ApiError> {
    let r = readable_recipe(app, name, digest).await?;
    let bytes = body(app, req, IDS_MAX * 32, "a list of chunk ids").await?;
    let wanted = ids(&bytes)?;
    // Only chunks of this blob: the blob is what the caller may read.
    let own: std::collections::HashSet<ChunkId> = r
        .pieces
        .iter()
        .filter_map(|p| match p {
            ballast_engine::recipe::RecipePiece::Chunk { id, .. } => Some(*id),
            ballast_engine::recipe::RecipePiece::Inline(_) => None,
        })
        .collect();
    if let Some(x) = wanted.iter().find(|w| !own.contains(w)) {
        return Err(ApiError::BlobUnknown(format!(
            "chunk {} is not part of blob {}",
            hex::encode(x.0),
            r.digest
        )));
    }
    let store = app.store.clone();
    let frames = blocking(move || {
        let mut out: Vec<u8> = Vec::new();
        for id in &wanted {
            let b = store.read_chunk(id).map_err(ApiError::from_engine)?;
            if !out.is_empty() && out.len() + 36 + b.len() > FETCH_FRAMES_MAX {
                break;
            }
            ballast_engine::delta::encode_frame(&mut out, id, &b);
        }
        Ok(out)
    })
    .await?;
    Ok(octets(StatusCode::OK, frames))
}
