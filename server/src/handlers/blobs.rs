//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`: blob downloads (whole, one range, or many
//! ranges as `multipart/byteranges`) and unlinking.

use crate::body::ReqBody;
use ballast_engine::catalog::Op;
use ballast_engine::{BlobReader, Error as EngineError};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use hyper::{Request, Response, StatusCode};

use super::{blocking, check_name, linked, parse_digest, reply};
use crate::body::{parse_ranges, ChannelBody, Ranges, ResBody};
use crate::error::ApiError;
use crate::App;
use std::sync::Arc;

enum Part {
    Bytes(Bytes),
    Range(u64, u64),
}

pub async fn get(
    app: &Arc<App>,
    name: &str,
    digest: &str,
    req: &Request<ReqBody>,
    head: bool,
) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let digest = parse_digest(digest)?;
    if !linked(app, name, &digest) {
        let Some(up) = app.pull_through.upstream_for(name) else {
            return Err(ApiError::BlobUnknown(format!(
                "blob {digest} is not in repository {name}"
            )));
        };
        let up = up.clone();
        if let Some(r) =
            crate::upstream::serve_missing_blob(app, &up, name, &digest, req, head).await?
        {
            return Ok(r);
        }
    }
    // A client told the blob is here may skip uploading it and push a manifest naming it:
    // a collection keeps the link through the grace period from now. (One that is already
    // committing its mark can still remove it: a window of one catalog fsync.)
    app.store.touch_link(name, &digest);
    let store = app.store.clone();
    let d = digest.clone();
    let reader = blocking(move || {
        // A blob kept in a bucket that does not answer is a 503 before the response
        // starts, not a body cut short.
        let r = store
            .open_blob(&d)
            .and_then(|r| r.ensure_reachable().map(|()| r));
        r.map_err(|e| match e {
            EngineError::NotFound(_) => ApiError::BlobUnknown(format!("blob {d} is not stored")),
            other => ApiError::from_engine(other),
        })
    })
    .await?;
    let size = reader.size();
    let ranges = match req.headers().get(RANGE).and_then(|v| v.to_str().ok()) {
        Some(h) => parse_ranges(h, size),
        None => Ranges::Whole,
    };
    let base = reply(StatusCode::OK)
        .header("Docker-Content-Digest", digest.to_string())
        .header(ACCEPT_RANGES, "bytes")
        .header("ETag", format!("\"{digest}\""));
    match ranges {
        Ranges::Whole => {
            let r = base
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_LENGTH, size.to_string());
            Ok(if head {
                r.body(crate::body::empty())
            } else {
                r.body(stream(reader, vec![Part::Range(0, size)], size))
            })
        }
        Ranges::Unsatisfiable => Ok(reply(StatusCode::RANGE_NOT_SATISFIABLE)
            .header(CONTENT_RANGE, format!("bytes */{size}"))
            .header("Docker-Content-Digest", digest.to_string())
            .empty()),
        Ranges::Some(list) if list.len() == 1 => {
            let (a, b) = list[0];
            let r = reply(StatusCode::PARTIAL_CONTENT)
                .header("Docker-Content-Digest", digest.to_string())
                .header(ACCEPT_RANGES, "bytes")
                .header(CONTENT_TYPE, "application/octet-stream")
                .header(CONTENT_RANGE, format!("bytes {a}-{}/{size}", b - 1))
                .header(CONTENT_LENGTH, (b - a).to_string());
            Ok(if head {
                r.body(crate::body::empty())
            } else {
                r.body(stream(reader, vec![Part::Range(a, b)], b - a))
            })
        }
        Ranges::Some(list) => {
            let boundary = format!("ballast-{:016x}", rand::random::<u64>());
            let mut parts = Vec::with_capacity(list.len() * 2 + 1);
            let mut total = 0u64;
            for (a, b) in list {
                let head = format!(
                    "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{}/{size}\r\n\r\n",
                    b - 1
                );
                total += head.len() as u64 + (b - a);
                parts.push(Part::Bytes(Bytes::from(head)));
                parts.push(Part::Range(a, b));
            }
            let tail = format!("\r\n--{boundary}--\r\n");
            total += tail.len() as u64;
            parts.push(Part::Bytes(Bytes::from(tail)));
            let r = reply(StatusCode::PARTIAL_CONTENT)
                .header("Docker-Content-Digest", digest.to_string())
                .header(ACCEPT_RANGES, "bytes")
                .header(
                    CONTENT_TYPE,
                    format!("multipart/byteranges; boundary={boundary}"),
                )
                .header(CONTENT_LENGTH, total.to_string());
            Ok(if head {
                r.body(crate::body::empty())
            } else {
                r.body(stream(reader, parts, total))
            })
        }
    }
}

/// Streams the parts from a blocking task: chunk slices go out as they are (no copy for raw
/// chunks of sealed segments); damage ends the response with an error, never with bad bytes.
fn stream(reader: BlobReader, parts: Vec<Part>, len: u64) -> ResBody {
    let (mut tx, body) = ChannelBody::new(len);
    tokio::task::spawn_blocking(move || {
        for part in parts {
            match part {
                Part::Bytes(b) => {
                    if !tx.send(b) {
                        return;
                    }
                }
                Part::Range(a, b) => {
                    let iter = match reader.range(a, b) {
                        Ok(it) => it,
                        Err(e) => return tx.fail(std::io::Error::other(e.to_string())),
                    };
                    for piece in iter {
                        match piece {
                            Ok(data) => {
                                if !tx.send(data) {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::error!(digest = %reader.digest(), error = %e, "blob read failed mid-response");
                                return tx.fail(std::io::Error::other(e.to_string()));
                            }
                        }
                    }
                }
            }
        }
    });
    body.boxed()
}

pub async fn delete(app: &App, name: &str, digest: &str) -> Result<Response<ResBody>, ApiError> {
    check_name(name)?;
    let digest = parse_digest(digest)?;
    let store = app.store.clone();
    let (n, d) = (name.to_owned(), digest.clone());
    blocking(move || {
        store.commit_catalog(|state| {
            if !state
                .repos
                .get(&n)
                .is_some_and(|r| r.blobs.contains_key(&d))
            {
                return Err(ApiError::BlobUnknown(format!(
                    "blob {d} is not in repository {n}"
                )));
            }
            let op = Op::UnlinkBlob {
                repo: n.clone(),
                digest: d.clone(),
            };
            Ok((vec![op], ()))
        })
    })
    .await?;
    Ok(reply(StatusCode::ACCEPTED).empty())
}
