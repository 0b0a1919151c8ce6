//! `/v1/config`: config entries (`PUT` with `?cas`, `GET` by kind or kind and name, `DELETE`
//! with `?cas`), in Consul's shapes. The primary datacenter owns them: a write sent to a
//! secondary is passed to the primary, and secondaries serve the copies they replicate.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::response::Response;
use axum::routing::{any, get};
use serde_json::{Value, json};

use super::query::{Params, blocking, filtered, reply};
use super::{ApiError, Ctx};
use crate::connect::config_entry::{self, EntryError};
use crate::state::mesh::ConfigEntry;
use crate::state::{Command, Outcome, Table};

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/config", any(put))
        .route("/v1/config/", get(|| async { ApiError::NotFound("Must provide either a kind or both kind and name".into()) }))
        .route("/v1/config/{kind}", get(list).delete(|| async { ApiError::NotFound("Must provide both a kind and name to delete".into()) }))
        .route("/v1/config/{kind}/{name}", get(read).delete(delete))
}

impl From<EntryError> for ApiError {
    fn from(e: EntryError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

fn known_kind(kind: &str) -> Result<String, ApiError> {
    let k = kind.to_ascii_lowercase();
    if config_entry::KINDS.contains(&k.as_str()) { Ok(k) } else { Err(ApiError::BadRequest(format!("invalid config entry kind: {kind}"))) }
}

/// Decode a config entry body: JSON, or HCL as `trellis config write` also sends.
pub fn decode_entry(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("Request decoding failed: the body is not UTF-8".into()))?;
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        Err(json_err) => hcl::from_str::<Value>(text)
            .map_err(|hcl_err| {
                // Report the error of the syntax the body was meant to be in.
                if text.trim_start().starts_with(['{', '[']) {
                    ApiError::BadRequest(format!("Request decoding failed: {json_err}"))
                } else {
                    ApiError::BadRequest(format!("Request decoding failed: {hcl_err}"))
                }
            })
            .map(unwrap_hcl_blocks),
    }
}

/// HCL gives `Sources = [...]` as arrays and nested blocks (`MeshGateway { ... }`) as objects,
/// but a block written once may come as a one-element list: Consul's decoder accepts both.
fn unwrap_hcl_blocks(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Array(a)
                            if a.len() == 1
                                && a[0].is_object()
                                && !matches!(
                                    k.to_ascii_lowercase().as_str(),
                                    "sources"
                                        | "routes"
                                        | "splits"
                                        | "permissions"
                                        | "overrides"
                                        | "header"
                                        | "queryparam"
                                        | "targets"
                                        | "paths"
                                        | "hashpolicies"
                                ) =>
                        {
                            unwrap_hcl_blocks(a.into_iter().next().unwrap_or_default())
                        }
                        other => unwrap_hcl_blocks(other),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(unwrap_hcl_blocks).collect()),
        other => other,
    }
}

/// Whether this datacenter owns config entries (the primary), else the request goes there.
pub fn is_primary(ctx: &Ctx) -> bool {
    ctx.info.primary_datacenter.eq_ignore_ascii_case(&ctx.info.datacenter)
}

async fn put(State(ctx): State<Ctx>, method: Method, p: Params, body: Bytes) -> Result<Response, ApiError> {
    if method != Method::PUT && method != Method::POST {
        return Err(ApiError::MethodNotAllowed(method.to_string()));
    }
    if !is_primary(&ctx) {
        return super::forward::to_primary(&ctx, method.as_str(), "/v1/config", &p, body).await;
    }
    let (kind, name, v) = config_entry::normalize(decode_entry(&body)?)?;
    let cas = p.u64("cas")?.or(if p.has("cas") { Some(0) } else { None });
    let entry = ConfigEntry { kind, name, json: v.to_string(), create_index: 0, modify_index: 0 };
    let (outcome, index) = ctx.raft()?.write(Command::ConfigSet { entry, cas }).await?;
    Ok(super::catalog::write_reply(&ctx, index, outcome == Outcome::Applied(true)))
}

async fn list(State(ctx): State<Ctx>, Path(kind): Path<String>, p: Params) -> Result<Response, ApiError> {
    let kind = known_kind(&kind)?;
    if p.filter().is_some() && kind != "service-defaults" {
        return Err(ApiError::BadRequest(format!("filtering not supported for config entry kind={kind}")));
    }
    let (list, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        let list: Vec<Value> = d.config_entries.values().filter(|e| e.kind == kind).map(config_entry::entry_json).collect();
        Ok((list, d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    Ok(reply(&meta, &filtered(&p, &list)?))
}

async fn read(State(ctx): State<Ctx>, Path((kind, name)): Path<(String, String)>, p: Params) -> Result<Response, ApiError> {
    let kind = known_kind(&kind)?;
    let (found, meta) = blocking(&ctx, &p, &[Table::ConfigEntries], |d| {
        let e = d.config_entries.get(&(kind.clone(), name.clone())).map(config_entry::entry_json);
        Ok((e, d.index_of(&[Table::ConfigEntries])))
    })
    .await?;
    match found {
        Some(e) => Ok(reply(&meta, &e)),
        None => {
            let mut resp = axum::response::IntoResponse::into_response(ApiError::NotFound(format!("Config entry not found for {kind:?} / {name:?}")));
            meta.apply(&mut resp);
            Ok(resp)
        }
    }
}

async fn delete(State(ctx): State<Ctx>, Path((kind, name)): Path<(String, String)>, p: Params) -> Result<Response, ApiError> {
    let kind = known_kind(&kind)?;
    if !is_primary(&ctx) {
        return super::forward::to_primary(&ctx, "DELETE", &format!("/v1/config/{kind}/{name}"), &p, Bytes::new()).await;
    }
    if kind == "proxy-defaults" && name != "global" {
        return Err(ApiError::BadRequest(format!("invalid name ({name:?}), only \"global\" is supported")));
    }
    let cas = p.u64("cas")?.or(if p.has("cas") { Some(0) } else { None });
    let (outcome, index) = ctx.raft()?.write(Command::ConfigDelete { kind, name, cas }).await?;
    let meta = super::query::Meta::of(&ctx, index, &Params::default());
    // Without `?cas` Consul answers an empty object; with it, whether the delete happened.
    Ok(match cas {
        None => reply(&meta, &json!({})),
        Some(_) => reply(&meta, &(outcome == Outcome::Applied(true))),
    })
}
