//! Request body limits per endpoint, checked before the body is read: a declared length over
//! the limit is refused with 413 at once, and a body that runs past it (chunked, or lying
//! about its length) is cut off at the limit.
//!
//! KV values and transactions have Consul's limits (`limits.kv_max_value_size`,
//! `limits.txn_max_req_len`, 512 KiB each); snapshots may be large; every other endpoint takes
//! at most [`DEFAULT_BODY_LIMIT`].

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, header};

use super::{ApiError, Ctx};

/// Catalog registrations, sessions, queries, config entries: far below this.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;
/// A snapshot archive to restore.
pub const SNAPSHOT_BODY_LIMIT: usize = 1 << 30;

/// The largest body `method path` may carry, and the setting that says so.
pub fn limit_for(limits: &crate::config::Limits, method: &Method, path: &str) -> (usize, &'static str) {
    if path.starts_with("/v1/kv/") {
        (limits.kv_max_value_size, "limits.kv_max_value_size")
    } else if path == "/v1/txn" {
        (limits.txn_max_req_len, "limits.txn_max_req_len")
    } else if path == "/v1/snapshot" && method == Method::PUT {
        (SNAPSHOT_BODY_LIMIT, "the snapshot size limit")
    } else {
        (DEFAULT_BODY_LIMIT, "the request size limit")
    }
}

fn too_large(len: u64, limit: usize, key: &str) -> ApiError {
    ApiError::TooLarge(format!("Request body({len} bytes) too large, max size: {limit} bytes. See {key}."))
}

/// Refuse (413) or cap the body of `req` by endpoint.
pub fn limit_body(ctx: &Ctx, req: Request) -> Result<Request, ApiError> {
    let (limit, key) = limit_for(&ctx.limits, req.method(), req.uri().path());
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > limit as u64
    {
        return Err(too_large(len, limit, key));
    }
    Ok(req.map(|b| Body::new(http_body_util::Limited::new(b, limit))))
}
