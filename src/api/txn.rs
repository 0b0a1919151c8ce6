//! `PUT /v1/txn`: KV operations applied atomically; 409 with per-op errors when any fails.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::put;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::decode;
use super::query::{Meta, Params};
use super::{ApiError, Ctx};
use crate::state::{Command, KvVerb, Outcome, TxnOp};

/// Consul's limit of 64 operations per transaction (the body size is `limits.txn_max_req_len`).
const MAX_OPS: usize = 64;

pub fn routes() -> Router<Ctx> {
    Router::new().route("/v1/txn", put(txn))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OpBody {
    #[serde(rename = "KV")]
    kv: Option<KvOpBody>,
    node: Option<Value>,
    service: Option<Value>,
    check: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct KvOpBody {
    verb: String,
    key: String,
    value: Option<String>,
    flags: u64,
    index: u64,
    session: String,
}

fn parse_ops(body: &[u8]) -> Result<Vec<TxnOp>, ApiError> {
    let ops: Vec<OpBody> = decode(body)?;
    if ops.len() > MAX_OPS {
        return Err(ApiError::TooLarge(format!("Transaction contains too many operations ({} > {MAX_OPS})", ops.len())));
    }
    ops.into_iter()
        .enumerate()
        .map(|(i, o)| {
            if o.node.is_some() || o.service.is_some() || o.check.is_some() {
                return Err(ApiError::BadRequest(format!("operation {i}: only KV operations are supported in transactions")));
            }
            let kv = o.kv.ok_or_else(|| ApiError::BadRequest(format!("operation {i}: missing KV operation")))?;
            let verb = KvVerb::parse(&kv.verb).ok_or_else(|| ApiError::BadRequest(format!("operation {i}: unknown KV verb {:?}", kv.verb)))?;
            let value = kv
                .value
                .map(|v| base64::engine::general_purpose::STANDARD.decode(v))
                .transpose()
                .map_err(|e| ApiError::BadRequest(format!("operation {i}: Value is not valid base64: {e}")))?;
            if kv.key.is_empty() && !matches!(verb, KvVerb::GetTree | KvVerb::DeleteTree) {
                return Err(ApiError::BadRequest(format!("operation {i}: missing key name")));
            }
            if matches!(verb, KvVerb::Lock | KvVerb::Unlock | KvVerb::CheckSession) && kv.session.is_empty() {
                return Err(ApiError::BadRequest(format!("operation {i}: verb {:?} needs a Session", kv.verb)));
            }
            Ok(TxnOp { verb, key: kv.key, value, flags: kv.flags, index: kv.index, session: kv.session })
        })
        .collect()
}

async fn txn(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ApiError> {
    let ops = parse_ops(&body)?;
    let (outcome, index) = ctx.raft()?.write(Command::Txn(ops)).await?;
    let (status, body) = match outcome {
        Outcome::Txn(Ok(entries)) => {
            let results: Vec<Value> = entries.iter().map(|e| json!({ "KV": e })).collect();
            (StatusCode::OK, json!({ "Results": results, "Errors": null }))
        }
        Outcome::Txn(Err(errs)) => {
            let errors: Vec<Value> = errs.iter().map(|e| json!({ "OpIndex": e.op_index, "What": e.what })).collect();
            (StatusCode::CONFLICT, json!({ "Results": null, "Errors": errors }))
        }
        Outcome::Rejected(m) => return Err(ApiError::BadRequest(m)),
        other => return Err(ApiError::Internal(format!("unexpected outcome {other:?}"))),
    };
    let mut resp = super::query::reply(&Meta::of(&ctx, index, &Params::default()), &body);
    *resp.status_mut() = status;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_kv_and_unknown_verbs_are_rejected() {
        assert!(parse_ops(br#"[{"Node":{"Verb":"set"}}]"#).is_err());
        assert!(parse_ops(br#"[{"KV":{"Verb":"explode","Key":"a"}}]"#).is_err());
        assert!(parse_ops(br#"[{"KV":{"Verb":"set","Key":"a","Value":"!!"}}]"#).is_err());
        assert_eq!(parse_ops(br#"[{"KV":{"Verb":"set","Key":"a","Value":"aGk="}}]"#).unwrap()[0].value.as_deref(), Some(&b"hi"[..]));
    }

    #[test]
    fn too_many_ops_is_413() {
        let ops = (0..65).map(|i| format!(r#"{{"KV":{{"Verb":"get","Key":"k{i}"}}}}"#)).collect::<Vec<_>>().join(",");
        assert!(matches!(parse_ops(format!("[{ops}]").as_bytes()), Err(ApiError::TooLarge(_))));
    }
}
