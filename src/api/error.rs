//! The one error type of the HTTP API, mapped to the status codes and plain-text bodies Consul
//! clients expect.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::consensus::node::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} not allowed")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("No cluster leader")]
    NoLeader,
    #[error("No path to datacenter")]
    NoPathToDatacenter,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // Consul answers both with a 500 and these exact texts; clients match on them.
            ApiError::NoLeader | ApiError::NoPathToDatacenter | ApiError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status(),
            [("content-type", "text/plain; charset=utf-8")],
            self.to_string(),
        )
            .into_response()
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NoLeader => ApiError::NoLeader,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<super::filter::FilterError> for ApiError {
    fn from(e: super::filter::FilterError) -> Self {
        ApiError::BadRequest(format!(
            "Failed to create boolean expression evaluator: {e}"
        ))
    }
}

/// Decode a JSON request body the way Consul reports failures.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("Request decode failed: {e}")))
}
