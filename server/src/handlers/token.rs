//! `/token`: the token endpoint of the Docker token flow (docs/security.md). Credentials are
//! checked and tokens issued in auth.rs; this reads the request.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::body::ReqBody;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, StatusCode};

use super::{parse_form, query, reply};
use crate::body::ResBody;
use crate::error::ApiError;
use crate::App;

/// Largest token request body (an OAuth2 form), in bytes.
const TOKEN_FORM_MAX: usize = 64 << 10;

/// `GET /token` (Basic credentials or none) and `POST /token` (OAuth2 password grant).
pub async fn token(app: &Arc<App>, peer: SocketAddr, req: Request<ReqBody>) -> Response<ResBody> {
    let mut params = query(&req);
    let headers = req.headers().clone();
    let id = req.extensions().get::<crate::guard::RequestId>().cloned();
    match *req.method() {
        Method::GET => {}
        Method::POST => {
            let body = http_body_util::Limited::new(req.into_body(), TOKEN_FORM_MAX);
            let form =
                match tokio::time::timeout(app.config.body_idle_timeout(), body.collect()).await {
                    Ok(Ok(b)) => b.to_bytes(),
                    _ => {
                        return crate::error::response(&ApiError::Unsupported(format!(
                        "the token request body must be a form of at most {TOKEN_FORM_MAX} bytes"
                    )))
                    }
                };
            for (k, v) in parse_form(&String::from_utf8_lossy(&form)) {
                params.entry(k).or_default().extend(v);
            }
        }
        ref m => {
            return crate::error::response(&ApiError::MethodNotAllowed(format!(
                "{m} is not allowed on /token"
            )))
        }
    }
    match app.auth.issue(&headers, &params, peer.ip()).await {
        Ok(body) => reply(StatusCode::OK)
            .header(hyper::header::CACHE_CONTROL, "no-store")
            .json(&body),
        Err(d) => crate::guard::denied(app, d, id.as_ref()).await,
    }
}
