//! The API's errors: each variant's OCI error code and HTTP status, in one table.

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};

use crate::body::{self, ResBody};

use ballast_engine::{Error as EngineError, Input};

/// A failed request, answered with the distribution spec's JSON error body.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BlobUnknown(String),
    #[error("{0}")]
    BlobUploadInvalid(String),
    #[error("{0}")]
    BlobUploadUnknown(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{0}")]
    ManifestBlobUnknown(String),
    #[error("{0}")]
    ManifestInvalid(String),
    #[error("{0}")]
    ManifestUnknown(String),
    #[error("{0}")]
    ManifestTooLarge(String),
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    NameUnknown(String),
    #[error("{0}")]
    SizeInvalid(String),
    #[error("{0}")]
    RangeInvalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Denied(String),
    /// A quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// An immutable tag would be moved or deleted.
    #[error("{0}")]
    Immutable(String),
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The OCI error code and HTTP status (the one mapping table).
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        use ApiError::*;
        match self {
            BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUploadInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            BlobUploadUnknown(_) => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestBlobUnknown(_) => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            ManifestInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestUnknown(_) => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestTooLarge(_) => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            NameUnknown(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            SizeInvalid(_) => ("SIZE_INVALID", StatusCode::BAD_REQUEST),
            RangeInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            Unsupported(_) => ("UNSUPPORTED", StatusCode::BAD_REQUEST),
            MethodNotAllowed(_) => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            NotFound(_) => ("NOT_FOUND", StatusCode::NOT_FOUND),
            Timeout(_) => ("TIMEOUT", StatusCode::REQUEST_TIMEOUT),
            Unavailable(_) => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            Busy(_) => ("BUSY", StatusCode::CONFLICT),
            Unauthorized(_) => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Denied(_) => ("DENIED", StatusCode::FORBIDDEN),
            Immutable(_) => ("DENIED", StatusCode::CONFLICT),
            Quota(_) => ("DENIED", StatusCode::FORBIDDEN),
            TooManyRequests(_) => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            InsufficientStorage(_) => ("DENIED", StatusCode::INSUFFICIENT_STORAGE),
            Internal(_) => ("INTERNAL_ERROR", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The JSON error body.
    pub fn body(&self) -> Bytes {
        let (code, _) = self.code_and_status();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": serde_json::Value::Null }]
        });
        Bytes::from(body.to_string())
    }

    /// Maps an engine error where no handler-specific meaning applies. Damage and I/O
    /// failures are server errors; the message names the file so an operator can act.
    pub fn from_engine(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            EngineError::DigestMismatch { expected, actual } => ApiError::DigestInvalid(format!(
                "content does not match digest {expected} (computed {actual})"
            )),
            EngineError::InvalidInput { what, reason } => match what {
                Input::Digest => ApiError::DigestInvalid(reason),
                Input::RepositoryName => ApiError::NameInvalid(reason),
                Input::Tag => ApiError::ManifestInvalid(reason),
                _ => ApiError::Unsupported(format!("invalid {what}: {reason}")),
            },
            EngineError::Busy(why) => ApiError::Busy(why),
            EngineError::LimitExceeded(why) => ApiError::SizeInvalid(why),
            EngineError::Throttled(why) => ApiError::TooManyRequests(why),
            EngineError::NoSpace(why) => ApiError::InsufficientStorage(why),
            EngineError::Poisoned(_) => ApiError::Unavailable(format!("{e}")),
            EngineError::Unavailable(why) => ApiError::Unavailable(why),
            EngineError::ReadOnly(why) => ApiError::MethodNotAllowed(why),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ApiError::from_engine(e)
    }
}

/// Turns an error into its JSON response.
pub fn response(e: &ApiError) -> Response<ResBody> {
    let (code, status) = e.code_and_status();
    if status.is_server_error() {
        tracing::error!(code, error = %e, "request failed");
    }
    let body = e.body();
    let mut res = Response::new(body::full(body.clone()));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    res.headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Open work that ends makes room (a denial from the login throttle says its own).
        res.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    res
}

/// `Retry-After` of a 429 that has no better estimate.
const RETRY_AFTER_SECS: u64 = 10;
