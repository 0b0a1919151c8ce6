//! The mesh part of a service registration: a proxy's `Proxy` block and `Connect` settings, as
//! Consul's API accepts them (case-insensitive field names; snake_case aliases are handled by
//! `api::error::canonical_keys`), validated into `state::mesh::ServiceProxy`.

use serde::Deserialize;
use serde_json::Value;

use crate::api::ApiError;
use crate::state::mesh::{JsonText, MeshGatewayConfig, ServiceProxy, Upstream};

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct MeshGatewayBody {
    pub mode: String,
}

impl MeshGatewayBody {
    pub fn into_config(self, key: &str) -> Result<MeshGatewayConfig, ApiError> {
        let mode = self.mode.to_ascii_lowercase();
        if !matches!(mode.as_str(), "" | "none" | "local" | "remote") {
            return Err(ApiError::BadRequest(format!("{key}.Mode: invalid mesh gateway mode {:?} (one of none, local, remote)", self.mode)));
        }
        Ok(MeshGatewayConfig { mode })
    }
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct UpstreamBody {
    pub destination_type: String,
    pub destination_namespace: String,
    pub destination_partition: String,
    pub destination_peer: String,
    pub destination_name: String,
    pub datacenter: String,
    pub local_bind_address: String,
    pub local_bind_port: i64,
    pub local_bind_socket_path: String,
    pub config: Option<Value>,
    pub mesh_gateway: Option<MeshGatewayBody>,
    pub centrally_configured: bool,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct ProxyBody {
    pub destination_service_name: String,
    #[serde(rename = "DestinationServiceID")]
    pub destination_service_id: String,
    pub local_service_address: String,
    pub local_service_port: i64,
    pub local_service_socket_path: String,
    pub mode: String,
    pub config: Option<Value>,
    pub upstreams: Option<Vec<UpstreamBody>>,
    pub mesh_gateway: Option<MeshGatewayBody>,
    pub expose: Option<Value>,
    pub transparent_proxy: Option<Value>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(rename_all = "PascalCase", default)]
pub struct ConnectBody {
    pub native: bool,
    pub sidecar_service: Option<Value>,
}

fn port(key: &str, p: i64) -> Result<u16, ApiError> {
    u16::try_from(p).map_err(|_| ApiError::BadRequest(format!("Invalid {key}: {p} is not a port number")))
}

impl ProxyBody {
    /// Validate into the stored form. Upstreams are checked as Consul does: a name, a bind
    /// port, no duplicates, no peer together with a datacenter.
    pub fn into_proxy(self) -> Result<ServiceProxy, ApiError> {
        if !self.local_service_socket_path.is_empty() {
            return Err(ApiError::BadRequest("Proxy.LocalServiceSocketPath: unix sockets are not supported; use LocalServicePort".into()));
        }
        let mode = self.mode.to_ascii_lowercase();
        if !matches!(mode.as_str(), "" | "direct") {
            return Err(ApiError::BadRequest(format!(
                "Proxy.Mode: {:?} is not supported (transparent proxying needs traffic redirection, which Trellis does not do); use \"direct\" or leave it empty",
                self.mode
            )));
        }
        let mut upstreams = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for (i, u) in self.upstreams.unwrap_or_default().into_iter().enumerate() {
            let key = format!("Proxy.Upstreams[{i}]");
            if u.destination_name.is_empty() {
                return Err(ApiError::BadRequest(format!("{key}: upstream destination name cannot be empty")));
            }
            if !u.destination_peer.is_empty() && !u.datacenter.is_empty() {
                return Err(ApiError::BadRequest(format!("{key}: upstream cannot specify both destination peer and datacenter")));
            }
            if !u.destination_peer.is_empty() {
                return Err(ApiError::BadRequest(format!("{key}.DestinationPeer: cluster peering is not supported; use Datacenter")));
            }
            if !u.local_bind_socket_path.is_empty() {
                return Err(ApiError::BadRequest(format!("{key}.LocalBindSocketPath: unix sockets are not supported; use LocalBindPort")));
            }
            let dtype = if u.destination_type.is_empty() { "service".to_string() } else { u.destination_type.to_ascii_lowercase() };
            if !matches!(dtype.as_str(), "service" | "prepared_query") {
                return Err(ApiError::BadRequest(format!("{key}.DestinationType: {:?} is not one of service, prepared_query", u.destination_type)));
            }
            let bind = port(&format!("{key}.LocalBindPort"), u.local_bind_port)?;
            if bind == 0 && !u.centrally_configured {
                return Err(ApiError::BadRequest(format!("{key}: upstream local bind port or local socket path must be defined and nonzero")));
            }
            let addr = if u.local_bind_address.is_empty() { String::new() } else { u.local_bind_address.clone() };
            if !addr.is_empty() && addr.parse::<std::net::IpAddr>().is_err() {
                return Err(ApiError::BadRequest(format!("{key}.LocalBindAddress: {addr:?} is not an IP address")));
            }
            let ident = (dtype.clone(), u.datacenter.clone(), u.destination_name.clone());
            if !seen.insert(ident) {
                return Err(ApiError::BadRequest(format!("upstreams cannot contain duplicates of {}", u.destination_name)));
            }
            let bind_key = (addr.clone(), bind);
            if upstreams.iter().any(|x: &Upstream| (x.local_bind_address.clone(), x.local_bind_port) == bind_key) {
                return Err(ApiError::BadRequest(format!(
                    "{key}: local bind address {}:{bind} is used by another upstream",
                    if addr.is_empty() { "127.0.0.1" } else { &addr }
                )));
            }
            upstreams.push(Upstream {
                destination_type: dtype,
                destination_namespace: if u.destination_namespace.is_empty() { "default".into() } else { u.destination_namespace },
                destination_name: u.destination_name,
                datacenter: u.datacenter,
                local_bind_address: addr,
                local_bind_port: bind,
                config: JsonText::of(&u.config.unwrap_or(Value::Null)),
                mesh_gateway: u.mesh_gateway.unwrap_or_default().into_config(&format!("{key}.MeshGateway"))?,
            });
        }
        Ok(ServiceProxy {
            destination_service_name: self.destination_service_name,
            destination_service_id: self.destination_service_id,
            local_service_address: self.local_service_address,
            local_service_port: port("Proxy.LocalServicePort", self.local_service_port)?,
            mode,
            config: JsonText::of(&self.config.unwrap_or(Value::Null)),
            upstreams,
            mesh_gateway: self.mesh_gateway.unwrap_or_default().into_config("Proxy.MeshGateway")?,
            expose: JsonText::of(&self.expose.unwrap_or(Value::Null)),
        })
    }
}

/// A proxy's `Proxy` block as Consul's API shows it (`MeshGateway` and `Expose` always
/// present, the rest when set).
pub fn proxy_json(p: &ServiceProxy) -> Value {
    let mut v = serde_json::json!({
        "DestinationServiceName": p.destination_service_name,
        "DestinationServiceID": p.destination_service_id,
        "LocalServiceAddress": p.local_service_address,
        "LocalServicePort": p.local_service_port,
        "Mode": p.mode,
        "MeshGateway": mesh_gateway_json(&p.mesh_gateway),
        "Expose": if p.expose.0.is_empty() { serde_json::json!({}) } else { p.expose.value() },
    });
    if !p.config.0.is_empty() {
        v["Config"] = p.config.value();
    }
    if !p.upstreams.is_empty() {
        v["Upstreams"] = Value::Array(p.upstreams.iter().map(upstream_json).collect());
    }
    v
}

pub fn mesh_gateway_json(m: &MeshGatewayConfig) -> Value {
    if m.mode.is_empty() { serde_json::json!({}) } else { serde_json::json!({ "Mode": m.mode }) }
}

pub fn upstream_json(u: &Upstream) -> Value {
    let mut v = serde_json::json!({
        "DestinationType": u.destination_type,
        "DestinationName": u.destination_name,
        "LocalBindPort": u.local_bind_port,
        "MeshGateway": mesh_gateway_json(&u.mesh_gateway),
    });
    for (k, val) in [("DestinationNamespace", &u.destination_namespace), ("Datacenter", &u.datacenter), ("LocalBindAddress", &u.local_bind_address)] {
        if !val.is_empty() && (k != "DestinationNamespace" || val != "default") {
            v[k] = serde_json::json!(val);
        }
    }
    if !u.config.0.is_empty() {
        v["Config"] = u.config.value();
    }
    v
}
