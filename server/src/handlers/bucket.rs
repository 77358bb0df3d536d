//! The bucket's admin endpoints: what shipping to it has done (`GET /admin/bucket`) and a
//! shipment on request (`POST /admin/bucket/ship`), for an operator about to take the host
//! down or checking that the bucket is current; on a read replica, what it follows
//! (`GET /admin/bucket`) and a follow on request (`POST /admin/bucket/follow`).

use hyper::{Response, StatusCode};

use super::reply;
use crate::body::ResBody;
use crate::error::ApiError;
use crate::App;

fn shipper(app: &App) -> Result<&std::sync::Arc<ballast_bucket::Shipper>, ApiError> {
    app.bucket.as_ref().ok_or_else(|| {
        if app.replica.is_some() {
            return ApiError::MethodNotAllowed(
                "this registry is a read replica: it does not ship; its primary does".into(),
            );
        }
        ApiError::NotFound(
            "no bucket is configured: add a [bucket] table to the config (docs/operations.md, \
             \"Segments in a bucket\") and restart"
                .into(),
        )
    })
}

/// `GET /admin/bucket`: the shipper's status, with the lag now.
pub async fn status(app: &App) -> Result<Response<ResBody>, ApiError> {
    if let Some(f) = &app.replica {
        let s = f.status();
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        v["role"] = "replica".into();
        v["lag_secs"] = s.lag_secs(crate::now_secs()).into();
        v["primary"] = f.primary().await.into();
        return Ok(reply(StatusCode::OK).json(&v));
    }
    let s = shipper(app)?.status();
    let lag = s.lag_secs(crate::now_secs());
    let mut v = serde_json::to_value(&s).unwrap_or_default();
    v["role"] = "primary".into();
    v["lag_secs"] = lag.into();
    v["ship_interval_secs"] = app
        .config
        .bucket
        .as_ref()
        .map_or(0, |b| b.ship_interval_secs)
        .into();
    Ok(reply(StatusCode::OK).json(&v))
}

/// `POST /admin/bucket/ship`: ships a checkpoint now, even when nothing changed (so an
/// operator can see the bucket take one); 503 with the store's error when it fails.
pub async fn ship(app: &App) -> Result<Response<ResBody>, ApiError> {
    match shipper(app)?.ship(true).await {
        Ok(Some(r)) => {
            Ok(reply(StatusCode::OK).json(&serde_json::to_value(&r).unwrap_or_default()))
        }
        Ok(None) => Ok(reply(StatusCode::OK).json(&serde_json::json!({}))),
        Err(e) => Err(ApiError::Unavailable(format!(
            "shipping to the bucket failed: {e:#}; pushes go on locally and the shipper tries \
             again"
        ))),
    }
}

/// `POST /admin/bucket/follow`: a replica moves to the bucket's newest checkpoint now
/// (`{}` when it serves it already); 503 with the reason when it cannot.
pub async fn follow(app: &App) -> Result<Response<ResBody>, ApiError> {
    let Some(f) = &app.replica else {
        return Err(ApiError::NotFound(
            "this registry is not a read replica (role = \"replica\" in [bucket]): it has \
             nothing to follow"
                .into(),
        ));
    };
    match f.follow().await {
        Ok(Some(r)) => {
            Ok(reply(StatusCode::OK).json(&serde_json::to_value(&r).unwrap_or_default()))
        }
        Ok(None) => Ok(reply(StatusCode::OK).json(&serde_json::json!({}))),
        Err(e) => Err(ApiError::Unavailable(format!(
            "following the primary's newest checkpoint failed: {e:#}; this replica serves the \
             one it has"
        ))),
    }
}
