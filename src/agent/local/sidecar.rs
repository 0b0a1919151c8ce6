//! `Connect.SidecarService`: a service registration that asks for a sidecar gets one, as a
//! service of its own with Consul's defaults.
//!
//! - ID `<id>-sidecar-proxy` (managed by the agent: a definition may not set it), name
//!   `<name>-sidecar-proxy`, kind `connect-proxy`, the parent's address, tags and meta unless
//!   the sidecar sets its own;
//! - port: the lowest one in `ports.sidecar_min_port`..=`sidecar_max_port` that no local service
//!   uses (a re-registration keeps the sidecar's port);
//! - `Proxy.DestinationServiceName`/`ID` naming the parent, `LocalServiceAddress` 127.0.0.1 and
//!   `LocalServicePort` the parent's port unless given;
//! - unless the sidecar defines checks: a TCP check "Connect Sidecar Listening" on its public
//!   address every 10 s, and an alias check "Connect Sidecar Aliasing <parent>" that mirrors the
//!   parent's health.

use serde_json::{Map, Value, json};

use crate::api::ApiError;

/// The default sidecar port range (Consul's).
pub const DEFAULT_SIDECAR_MIN_PORT: u16 = 21000;
pub const DEFAULT_SIDECAR_MAX_PORT: u16 = 21255;

/// What the expansion needs from the rest of the agent.
pub struct SidecarContext<'a> {
    /// The node's address, where the sidecar's public listener is reached when it has no
    /// address of its own.
    pub node_address: &'a str,
    pub min_port: u16,
    pub max_port: u16,
    /// Ports every local service uses now, and this sidecar's current port if it exists.
    pub used_ports: Vec<u16>,
    pub current_port: Option<u16>,
}

fn get<'a>(v: &'a Value, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

/// Build the sidecar's own service definition from its parent's and the `SidecarService` block
/// (both with canonical keys).
pub fn definition(parent: &Value, sidecar: &Value, ctx: &SidecarContext) -> Result<Value, ApiError> {
    let bad = |m: &str| ApiError::BadRequest(m.to_string());
    let Value::Object(sc) = sidecar else { return Err(bad("Connect.SidecarService must be an object")) };
    if sc.get("ID").is_some_and(|v| v.as_str().is_some_and(|s| !s.is_empty())) {
        return Err(bad("Invalid SidecarService: A SidecarService cannot specify an ID as this is managed by the agent"));
    }
    if get(sidecar, "Connect").and_then(|c| get(c, "SidecarService")).is_some() {
        return Err(bad("Invalid SidecarService: A SidecarService cannot have a nested SidecarService"));
    }
    let pname = parent["Name"].as_str().unwrap_or_default();
    let pid = parent.get("ID").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(pname);
    let id = format!("{pid}-sidecar-proxy");
    let mut out = sc.clone();
    out.insert("ID".into(), json!(id));
    if sc.get("Name").and_then(Value::as_str).is_none_or(str::is_empty) {
        out.insert("Name".into(), json!(format!("{pname}-sidecar-proxy")));
    }
    if sc.get("Kind").and_then(Value::as_str).is_none_or(str::is_empty) {
        out.insert("Kind".into(), json!("connect-proxy"));
    }
    if sc.get("Address").and_then(Value::as_str).is_none_or(str::is_empty)
        && let Some(a) = parent.get("Address").filter(|a| a.as_str().is_some_and(|s| !s.is_empty()))
    {
        out.insert("Address".into(), a.clone());
    }
    for k in ["Tags", "Meta"] {
        let empty = match sc.get(k) {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            _ => false,
        };
        if empty && let Some(v) = get(parent, k) {
            out.insert(k.into(), v.clone());
        }
    }
    let asked = sc.get("Port").and_then(Value::as_i64).unwrap_or(0);
    let port = if asked >= 1 {
        asked
    } else if let Some(p) = ctx.current_port {
        i64::from(p)
    } else {
        if ctx.min_port == 0 && ctx.max_port == 0 {
            return Err(bad("no port provided for sidecar_service and auto-assignment disabled in config"));
        }
        let free = (ctx.min_port..=ctx.max_port).find(|p| !ctx.used_ports.contains(p));
        i64::from(free.ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no port provided for sidecar_service and none left in the configured range [{}, {}]",
                ctx.min_port, ctx.max_port
            ))
        })?)
    };
    out.insert("Port".into(), json!(port));
    let mut proxy: Map<String, Value> = match sc.get("Proxy") {
        Some(Value::Object(p)) => p.clone(),
        _ => Map::new(),
    };
    proxy.insert("DestinationServiceName".into(), json!(pname));
    proxy.insert("DestinationServiceID".into(), json!(pid));
    if proxy.get("LocalServiceAddress").and_then(Value::as_str).is_none_or(str::is_empty) {
        proxy.insert("LocalServiceAddress".into(), json!("127.0.0.1"));
    }
    if proxy.get("LocalServicePort").and_then(Value::as_i64).is_none_or(|p| p < 1) {
        proxy.insert("LocalServicePort".into(), parent.get("Port").cloned().unwrap_or(json!(0)));
    }
    out.insert("Proxy".into(), Value::Object(proxy));
    let has_checks = get(sidecar, "Check").is_some() || get(sidecar, "Checks").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
    if !has_checks {
        let addr = out.get("Address").and_then(Value::as_str).filter(|a| !a.is_empty()).unwrap_or(ctx.node_address).to_string();
        out.insert(
            "Checks".into(),
            json!([
                {"CheckID": format!("service:{id}:1"), "Name": "Connect Sidecar Listening", "TCP": format!("{addr}:{port}"), "Interval": "10s"},
                {"CheckID": format!("service:{id}:2"), "Name": format!("Connect Sidecar Aliasing {pid}"), "AliasService": pid},
            ]),
        );
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(used: Vec<u16>, current: Option<u16>) -> SidecarContext<'static> {
        SidecarContext { node_address: "10.0.0.5", min_port: 21000, max_port: 21002, used_ports: used, current_port: current }
    }

    #[test]
    fn a_sidecar_gets_consuls_defaults() {
        let parent = json!({"Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"]});
        let sc = json!({"Proxy": {"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}});
        let d = definition(&parent, &sc, &ctx(vec![21000], None)).unwrap();
        assert_eq!(
            (d["ID"].as_str(), d["Name"].as_str(), d["Kind"].as_str()),
            (Some("web-1-sidecar-proxy"), Some("web-sidecar-proxy"), Some("connect-proxy"))
        );
        assert_eq!(d["Port"], 21001, "the lowest free port in the range");
        assert_eq!(d["Tags"], json!(["v1"]));
        let p = &d["Proxy"];
        assert_eq!((p["DestinationServiceName"].as_str(), p["DestinationServiceID"].as_str()), (Some("web"), Some("web-1")));
        assert_eq!((p["LocalServiceAddress"].as_str(), p["LocalServicePort"].as_i64()), (Some("127.0.0.1"), Some(8080)));
        assert_eq!(p["Upstreams"][0]["DestinationName"], "db");
        assert_eq!(d["Checks"][0]["TCP"], "10.0.0.5:21001");
        assert_eq!(d["Checks"][1]["AliasService"], "web-1");
        assert_eq!(d["Checks"][1]["Name"], "Connect Sidecar Aliasing web-1");
    }

    #[test]
    fn a_reregistration_keeps_its_port_and_a_full_range_is_an_error() {
        let parent = json!({"Name": "web", "Port": 8080});
        assert_eq!(definition(&parent, &json!({}), &ctx(vec![21000, 21001, 21002], Some(21001))).unwrap()["Port"], 21001);
        let err = definition(&parent, &json!({}), &ctx(vec![21000, 21001, 21002], None)).unwrap_err();
        assert!(err.to_string().contains("none left in the configured range [21000, 21002]"));
        assert!(definition(&parent, &json!({"ID": "x"}), &ctx(vec![], None)).unwrap_err().to_string().contains("cannot specify an ID"));
    }
}
