//! `/v1/discovery-chain/:service`: a service's compiled discovery chain in Consul's shape
//! (`GET`; `POST` with overrides in the body), blocking on the config entries and the CA (the
//! trust domain is part of every SNI). `?compile-dc` compiles as another datacenter would see
//! the chain; `?dc` asks another datacenter's servers (forwarded like every read).

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::Method;
use axum::response::Response;
use axum::routing::any;
use serde_json::Value;

use super::query::{Params, blocking, reply};
use super::{ApiError, Ctx};
use crate::connect::chain::{self, Overrides};
use crate::state::Table;

pub fn routes() -> Router<Ctx> {
    Router::new()
        .route("/v1/discovery-chain/", any(|| async { ApiError::BadRequest("Missing chain name".into()) }))
        .route("/v1/discovery-chain/{service}", any(read))
}

/// The POST body's overrides (`OverrideConnectTimeout`, `OverrideProtocol`,
/// `OverrideMeshGateway`), field names in any case or snake_case, values weakly typed as
/// Consul's decoder takes them; other fields are ignored.
fn overrides(body: &[u8]) -> Result<Overrides, ApiError> {
    let mut o = Overrides::default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(o);
    }
    let fail = |e: String| ApiError::BadRequest(format!("Request decoding failed: {e}"));
    let v: Value = serde_json::from_slice(body).map_err(|e| fail(e.to_string()))?;
    let Value::Object(fields) = v else { return Err(fail("the body is not a JSON object".into())) };
    let bare = |k: &str| k.to_ascii_lowercase().replace('_', "");
    for (k, v) in fields {
        match bare(&k).as_str() {
            "overrideconnecttimeout" => {
                o.connect_timeout = match &v {
                    Value::Null => None,
                    Value::Number(n) => Some(std::time::Duration::from_nanos(n.as_u64().ok_or_else(|| fail(format!("{k}: {n} is not a duration")))?)),
                    Value::String(s) if s.is_empty() => None,
                    Value::String(s) => Some(crate::duration::parse_go(s).map_err(|e| fail(format!("{k}: {e}")))?),
                    other => return Err(fail(format!("{k}: {other} is not a duration"))),
                }
            }
            "overrideprotocol" => {
                o.protocol = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s),
                    other => Some(other.to_string()),
                }
                .filter(|p| !p.is_empty())
            }
            "overridemeshgateway" => {
                let mode = match &v {
                    Value::Null => String::new(),
                    Value::Object(m) => match m.iter().find(|(k, _)| bare(k) == "mode").map(|(_, v)| v) {
                        None | Some(Value::Null) => String::new(),
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                    },
                    other => return Err(fail(format!("{k}: {other} is not an object"))),
                };
                if !matches!(mode.as_str(), "" | "none" | "local" | "remote") {
                    return Err(ApiError::BadRequest("Invalid OverrideMeshGateway.Mode parameter".into()));
                }
                o.mesh_gateway_mode = Some(mode).filter(|m| !m.is_empty());
            }
            _ => {}
        }
    }
    Ok(o)
}

async fn read(State(ctx): State<Ctx>, method: Method, Path(service): Path<String>, p: Params, body: Bytes) -> Result<Response, ApiError> {
    let overrides = match method {
        Method::GET | Method::HEAD => Overrides::default(),
        Method::POST => overrides(&body)?,
        other => return Err(ApiError::MethodNotAllowed(other.to_string())),
    };
    if service.is_empty() {
        return Err(ApiError::BadRequest("Missing chain name".into()));
    }
    let dc = p.get("compile-dc").filter(|d| !d.is_empty()).unwrap_or(&ctx.info.datacenter).to_string();
    let (compiled, meta) = blocking(&ctx, &p, &[Table::ConfigEntries, Table::ConnectCa], |d| {
        let ca = d.connect_ca.as_ref().ok_or_else(|| ApiError::Internal("no cluster ca config setup".into()))?;
        if ca.cluster_id.is_empty() {
            return Err(ApiError::Internal("no cluster trust domain setup".into()));
        }
        let compiled = chain::compile(&d.config_entries, &service, &dc, &ca.trust_domain(), &overrides)
            .map_err(|e| ApiError::Internal(format!("failed to compile discovery chain: {e}")))?;
        Ok((compiled, d.index_of(&[Table::ConfigEntries, Table::ConnectCa])))
    })
    .await?;
    Ok(reply(&meta, &compiled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_take_consuls_spellings_and_refuse_bad_modes() {
        let o = overrides(br#"{"override_connect_timeout": "7s", "OverrideProtocol": "grpc", "overrideMeshGateway": {"mode": "remote"}}"#).unwrap();
        assert_eq!(
            o,
            Overrides {
                connect_timeout: Some(std::time::Duration::from_secs(7)),
                protocol: Some("grpc".into()),
                mesh_gateway_mode: Some("remote".into())
            }
        );
        assert_eq!(overrides(br#"{"OverrideConnectTimeout": 2000000000}"#).unwrap().connect_timeout, Some(std::time::Duration::from_secs(2)));
        assert_eq!(overrides(b"").unwrap(), Overrides::default());
        let bad = overrides(br#"{"OverrideMeshGateway": {"Mode": "sideways"}}"#).unwrap_err();
        assert_eq!(bad.to_string(), "Invalid OverrideMeshGateway.Mode parameter");
        assert!(overrides(b"{nope").unwrap_err().to_string().starts_with("Request decoding failed: "));
    }
}
