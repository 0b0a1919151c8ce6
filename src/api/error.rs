//! The one error type of the HTTP API, mapped to the status codes and plain-text bodies Consul
//! clients expect.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::cluster::WriteError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} not allowed")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Forbidden(String),
    /// ACL endpoints with ACLs off (Consul answers 401 "ACL support disabled").
    #[error("ACL support disabled")]
    AclDisabled,
    #[error("{0}")]
    Conflict(String),
    /// Too many requests (connection or rate limits): 429.
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("No cluster leader")]
    NoLeader,
    /// The agent a request was relayed to could not be reached.
    #[error("rpc error: {0}")]
    Unreachable(String),
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
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::AclDisabled => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // Consul answers both with a 500 and these exact texts; clients match on them.
            ApiError::NoLeader | ApiError::NoPathToDatacenter | ApiError::Unreachable(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), [("content-type", "text/plain; charset=utf-8")], self.to_string()).into_response()
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
        ApiError::BadRequest(format!("Failed to create boolean expression evaluator: {e}"))
    }
}

/// Every field name our request bodies use. Consul decodes bodies with Go's encoding/json,
/// which matches field names case-insensitively, and clients rely on it (py-consul sends
/// `{"name": .., "ttl": ..}`): keys are mapped to these spellings before decoding.
const FIELD_NAMES: &[&str] = &[
    "Address",
    "Adjustment",
    "Behavior",
    "Check",
    "CheckID",
    "Checks",
    "CleanupDeadServers",
    "Connect",
    "Coord",
    "DNS",
    "Datacenter",
    "Datacenters",
    "EnableTagOverride",
    "Error",
    "Failover",
    "Flags",
    "Height",
    "ID",
    "IgnoreCheckIDs",
    "Index",
    "KV",
    "Key",
    "Kind",
    "LastContactThreshold",
    "LockDelay",
    "MaxTrailingLogs",
    "Meta",
    "MinQuorum",
    "Name",
    "Namespace",
    "Near",
    "NearestN",
    "Node",
    "NodeChecks",
    "NodeMeta",
    "Notes",
    "OnlyPassing",
    "Output",
    "Passing",
    "Peer",
    "Port",
    "Regexp",
    "RemoveEmptyTags",
    "Segment",
    "ServerStabilizationTime",
    "Service",
    "ServiceChecks",
    "ServiceID",
    "ServiceMeta",
    "Session",
    "SkipNodeUpdate",
    "Status",
    "TTL",
    "TaggedAddresses",
    "Tags",
    "Targets",
    "Template",
    "Token",
    "Type",
    "Value",
    "Vec",
    "Verb",
    "Warning",
    "Weights",
    // The mesh part of a service registration.
    "Proxy",
    "SidecarService",
    "Native",
    "DestinationServiceName",
    "DestinationServiceID",
    "LocalServiceAddress",
    "LocalServicePort",
    "LocalServiceSocketPath",
    "Mode",
    "Upstreams",
    "DestinationType",
    "DestinationNamespace",
    "DestinationPartition",
    "DestinationPeer",
    "DestinationName",
    "LocalBindAddress",
    "LocalBindPort",
    "LocalBindSocketPath",
    "MeshGateway",
    "Expose",
    "TransparentProxy",
    "CentrallyConfigured",
    "Config",
];

/// Fields whose value is a map of user-chosen keys: those keys are data, never renamed.
const USER_KEYED: &[&str] = &["Meta", "NodeMeta", "ServiceMeta", "TaggedAddresses", "Header", "Config"];

pub fn canonical_keys(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Array(a) => Value::Array(a.into_iter().map(canonical_keys).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| {
                    // Consul also takes the snake_case spellings of its fields (`tagged_addresses`,
                    // `enable_tag_override`, ...: lib.TranslateKeys), which clients send.
                    let bare = k.replace('_', "");
                    let name =
                        FIELD_NAMES.iter().find(|n| n.eq_ignore_ascii_case(&k) || n.eq_ignore_ascii_case(&bare)).map(|n| n.to_string()).unwrap_or(k);
                    let v = match (USER_KEYED.contains(&name.as_str()), v) {
                        // A proxy's `Config` is opaque: nothing inside it is ours to rename.
                        (true, v) if name == "Config" => v,
                        (true, Value::Object(m)) => Value::Object(m.into_iter().map(|(k, v)| (k, canonical_keys(v))).collect()),
                        (_, v) => canonical_keys(v),
                    };
                    (name, v)
                })
                .collect(),
        ),
        other => other,
    }
}

/// Decode a JSON request body as Consul does (field names in any case), reporting failures
/// with Consul's message.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let fail = |e: serde_json::Error| ApiError::BadRequest(format!("Request decode failed: {e}"));
    let raw: serde_json::Value = serde_json::from_slice(body).map_err(fail)?;
    serde_json::from_value(canonical_keys(raw)).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_match_in_any_case_but_user_keys_are_kept() {
        let v = canonical_keys(serde_json::json!({"node": "n", "nodemeta": {"name": "x"}, "service": {"tags": ["a"], "meta": {"ttl": "1"}}}));
        assert_eq!(v, serde_json::json!({"Node": "n", "NodeMeta": {"name": "x"}, "Service": {"Tags": ["a"], "Meta": {"ttl": "1"}}}));
    }
}
