//! `/v1/config`: config entries (`PUT` with `?cas`, `GET` by kind or kind and name, `DELETE`
//! with `?cas`), in Consul's shapes. A write or delete that would break a discovery chain or an
//! L7 intention elsewhere is refused, as Consul's graph validation does. The primary datacenter owns them: a write sent to a
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

/// Decode a config entry file for `trellis config write`: JSON, or HCL (HCL 2, or the HCL 1
/// forms of Consul's documentation: blocks inside object expressions). The HTTP API itself
/// takes JSON only.
pub fn decode_entry(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("Request decoding failed: the body is not UTF-8".into()))?;
    match serde_json::from_str::<Value>(text) {
        Ok(v) => Ok(v),
        Err(json_err) => hcl::from_str::<Value>(text)
            .or_else(|hcl_err| hcl::from_str::<Value>(&hcl1_object_blocks(text)).map_err(|_| hcl_err))
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

/// Keys whose value is a list of objects: a block written once stays a one-element list (and
/// is made one when HCL gave it as an object).
const LIST_KEYS: &[&str] =
    &["sources", "routes", "splits", "permissions", "overrides", "header", "queryparam", "targets", "paths", "hashpolicies", "envoyextensions"];

/// HCL gives `Sources = [...]` as arrays and nested blocks (`MeshGateway { ... }`) as objects,
/// but a block written once may come as a one-element list: Consul's decoder accepts both.
fn unwrap_hcl_blocks(v: Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| {
                    let listed = LIST_KEYS.contains(&k.to_ascii_lowercase().replace('_', "").as_str());
                    let v = match v {
                        Value::Array(a) if a.len() == 1 && a[0].is_object() && !listed => unwrap_hcl_blocks(a.into_iter().next().unwrap_or_default()),
                        Value::Object(m) if listed => Value::Array(vec![unwrap_hcl_blocks(Value::Object(m))]),
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

/// Where a `{` opens: a body (the file, a block's) or an expression (object or list).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Nesting {
    Body,
    Object,
    List,
}

/// HCL 1, Consul's own decoder, takes blocks inside object expressions
/// (`Routes = [{ Match { HTTP { PathPrefix = "/admin" } } }]`, as Consul's documentation writes
/// router entries); HCL 2 wants attributes there. Rewrite each such block as an attribute
/// (`Match = { ... }`), leaving strings, heredocs, comments and real blocks as they are.
fn hcl1_object_blocks(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len() + 32);
    let mut stack = vec![Nesting::Body];
    // The last significant character: 'a' for the end of a word, '"' for a string's.
    let mut prev = '\n';
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        let next = c.get(i + 1).copied();
        let start = i;
        match ch {
            '"' => {
                i += 1;
                let mut interpolation = 0;
                while i < c.len() {
                    match c[i] {
                        '\\' => i += 1,
                        '$' | '%' if c.get(i + 1) == Some(&'{') => {
                            interpolation += 1;
                            i += 1;
                        }
                        '}' if interpolation > 0 => interpolation -= 1,
                        '"' if interpolation == 0 => break,
                        _ => {}
                    }
                    i += 1;
                }
                prev = '"';
            }
            '#' => {
                while i + 1 < c.len() && c[i + 1] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('/') => {
                while i + 1 < c.len() && c[i + 1] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                i += 2;
                while i + 1 < c.len() && !(c[i] == '*' && c[i + 1] == '/') {
                    i += 1;
                }
                i += 1;
            }
            '<' if next == Some('<') => {
                // A heredoc: copied up to the line that holds only its marker.
                let mut j = i + 2;
                if c.get(j) == Some(&'-') {
                    j += 1;
                }
                let marker: String = c[j..].iter().take_while(|x| x.is_alphanumeric() || **x == '_').collect();
                if marker.is_empty() {
                    prev = '<';
                } else {
                    let rest: String = c[j + marker.len()..].iter().collect();
                    let mut consumed = marker.len() + (j - i);
                    let mut lines = rest.split_inclusive('\n');
                    if let Some(first) = lines.next() {
                        consumed += first.chars().count();
                    }
                    for line in lines {
                        consumed += line.chars().count();
                        if line.trim() == marker {
                            break;
                        }
                    }
                    i += consumed - 1;
                    prev = 'a';
                }
            }
            '{' => {
                let top = *stack.last().unwrap_or(&Nesting::Body);
                let word_before = prev == 'a' || prev == '"';
                if top == Nesting::Object && word_before {
                    out.push_str("= ");
                    stack.push(Nesting::Object);
                } else if top == Nesting::Body && word_before {
                    stack.push(Nesting::Body);
                } else {
                    stack.push(Nesting::Object);
                }
                prev = '{';
            }
            '[' | '(' => {
                stack.push(Nesting::List);
                prev = ch;
            }
            '}' | ']' | ')' => {
                if stack.len() > 1 {
                    stack.pop();
                }
                prev = ch;
            }
            x if x.is_whitespace() => {}
            x => prev = if x.is_alphanumeric() || x == '_' || x == '-' || x == '.' { 'a' } else { x },
        }
        let end = (i + 1).min(c.len());
        out.extend(&c[start..end]);
        i = end;
    }
    out
}

/// Refuse a change that breaks a discovery chain or an L7 intention somewhere else (Consul's
/// graph validation): `proposed` is the new canonical entry, `None` a delete.
fn validate_graph(ctx: &Ctx, kind: &str, name: &str, proposed: Option<&Value>) -> Result<(), ApiError> {
    let store = ctx.raft()?.store.read();
    crate::connect::chain::validate_write(&store.data().config_entries, kind, name, proposed, &ctx.info.datacenter)
        .map_err(|e| ApiError::BadRequest(e.to_string()))
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
    // JSON only, as Consul's API: HCL is decoded by `trellis config write` on the client side,
    // and the HCL parser is no place for untrusted input (a crafted 605-byte body kept it busy
    // for minutes in fuzzing).
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::BadRequest(format!("Request decoding failed: {e} (the HTTP API takes JSON; `trellis config write` also reads HCL files)"))
    })?;
    let (kind, name, v) = config_entry::normalize(body)?;
    validate_graph(&ctx, &kind, &name, Some(&v))?;
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
    validate_graph(&ctx, &kind, &name, None)?;
    let (outcome, index) = ctx.raft()?.write(Command::ConfigDelete { kind, name, cas }).await?;
    let meta = super::query::Meta::of(&ctx, index, &Params::default());
    // Without `?cas` Consul answers an empty object; with it, whether the delete happened.
    Ok(match cas {
        None => reply(&meta, &json!({})),
        Some(_) => reply(&meta, &(outcome == Outcome::Applied(true))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hcl1_blocks_inside_objects_decode_as_consuls_documentation_writes_them() {
        let router = r#"
Kind = "service-router"
Name = "web"  # the router
Routes = [
  {
    Match {
      HTTP {
        PathPrefix = "/admin"
        Header = [ { Name = "x-debug", Exact = "{not a block}" } ]
      }
    }
    Destination {
      Service = "admin"
      PrefixRewrite = "/"
    }
  },
  {
    Match { HTTP { Methods = ["GET"] } }
  },
]
"#;
        let v = decode_entry(router.as_bytes()).unwrap();
        assert_eq!(v["Routes"][0]["Match"]["HTTP"]["PathPrefix"], "/admin");
        assert_eq!(v["Routes"][0]["Match"]["HTTP"]["Header"][0]["Exact"], "{not a block}");
        assert_eq!(v["Routes"][0]["Destination"]["Service"], "admin");
        assert_eq!(v["Routes"][1]["Match"]["HTTP"]["Methods"], serde_json::json!(["GET"]));
        let resolver = r#"
Kind = "service-resolver"
Name = "web"
DefaultSubset = "v1"
Subsets = {
  v1 = { Filter = "Service.Meta.version == v1" }
  v2 = {
    Filter = "Service.Meta.version == v2"
    OnlyPassing = true
  }
}
Failover = {
  "*" = { Datacenters = ["dc2"] }
}
LoadBalancer {
  Policy = "ring_hash"
  HashPolicies = [ { Field = "header", FieldValue = "x-user" } ]
}
"#;
        let v = decode_entry(resolver.as_bytes()).unwrap();
        assert_eq!(v["Subsets"]["v2"]["OnlyPassing"], true);
        assert_eq!(v["Failover"]["*"]["Datacenters"][0], "dc2");
        assert_eq!(v["LoadBalancer"]["HashPolicies"][0]["FieldValue"], "x-user");
        // One block of a list-valued key is still a list.
        let one = decode_entry(b"Kind = \"service-splitter\"\nName = \"web\"\nSplits {\n  Weight = 100\n}\n").unwrap();
        assert_eq!(one["Splits"][0]["Weight"], 100);
        let (_, _, v) = config_entry::normalize(decode_entry(router.as_bytes()).unwrap()).unwrap();
        assert_eq!(v["Routes"][1]["Match"]["HTTP"]["Methods"][0], "GET");
    }

    #[test]
    fn hcl1_rewrite_leaves_heredocs_and_comments_alone() {
        let text = "A = [{ B { C = <<EOT\nx { y }\nEOT\n } }] // D { }\n/* E { } */ F { G = 1 }\n";
        let out = hcl1_object_blocks(text);
        assert_eq!(out, "A = [{ B = { C = <<EOT\nx { y }\nEOT\n } }] // D { }\n/* E { } */ F { G = 1 }\n");
    }
}
