//! Check definitions as Consul accepts them, and their validation into one [`CheckKind`] each.
//! Sibling of `checks.rs`, which re-exports everything public here.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DEFAULT_NETWORK_TIMEOUT, DEFAULT_OUTPUT_MAX_SIZE, DEFAULT_SCRIPT_TIMEOUT, Status};

/// A check as Consul's agent API and service definitions accept it.
///
/// Field names are Consul's (`CheckID`, `HTTP`, `TLSSkipVerify`, ...); the snake_case spellings of
/// config files (`tls_skip_verify`, `args`, `alias_service`, ...) are accepted too, so JSON made
/// from HCL deserializes the same way. Durations are Go duration strings ("10s", "1m30s") or
/// numbers of nanoseconds. Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckDefinition {
    #[serde(rename = "CheckID", alias = "ID", alias = "id", alias = "check_id", alias = "CheckId", skip_serializing_if = "String::is_empty")]
    pub check_id: String,
    #[serde(alias = "name", skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(alias = "notes", skip_serializing_if = "String::is_empty")]
    pub notes: String,
    #[serde(rename = "ServiceID", alias = "service_id", alias = "ServiceId", skip_serializing_if = "String::is_empty")]
    pub service_id: String,
    /// Initial status; critical when unset.
    #[serde(alias = "status", with = "status_opt", skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,

    #[serde(rename = "HTTP", alias = "http", skip_serializing_if = "String::is_empty")]
    pub http: String,
    #[serde(alias = "method", skip_serializing_if = "String::is_empty")]
    pub method: String,
    #[serde(alias = "header", skip_serializing_if = "BTreeMap::is_empty")]
    pub header: BTreeMap<String, Vec<String>>,
    #[serde(alias = "body", skip_serializing_if = "String::is_empty")]
    pub body: String,
    #[serde(alias = "disable_redirects", skip_serializing_if = "is_false")]
    pub disable_redirects: bool,

    #[serde(rename = "TCP", alias = "tcp", skip_serializing_if = "String::is_empty")]
    pub tcp: String,
    #[serde(rename = "TCPUseTLS", alias = "tcp_use_tls", skip_serializing_if = "is_false")]
    pub tcp_use_tls: bool,
    #[serde(rename = "UDP", alias = "udp", skip_serializing_if = "String::is_empty")]
    pub udp: String,
    /// `host:port` or `host:port/service`.
    #[serde(rename = "GRPC", alias = "grpc", skip_serializing_if = "String::is_empty")]
    pub grpc: String,
    #[serde(rename = "GRPCUseTLS", alias = "grpc_use_tls", skip_serializing_if = "is_false")]
    pub grpc_use_tls: bool,
    #[serde(rename = "H2PING", alias = "h2ping", skip_serializing_if = "String::is_empty")]
    pub h2ping: String,
    /// TLS for H2PING checks; true when unset, as in Consul.
    #[serde(rename = "H2PingUseTLS", alias = "h2ping_use_tls", skip_serializing_if = "Option::is_none")]
    pub h2ping_use_tls: Option<bool>,
    #[serde(rename = "TLSServerName", alias = "tls_server_name", skip_serializing_if = "String::is_empty")]
    pub tls_server_name: String,
    #[serde(rename = "TLSSkipVerify", alias = "tls_skip_verify", skip_serializing_if = "is_false")]
    pub tls_skip_verify: bool,

    #[serde(rename = "TTL", alias = "ttl", with = "go_duration_opt", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    #[serde(alias = "alias_node", skip_serializing_if = "String::is_empty")]
    pub alias_node: String,
    #[serde(alias = "alias_service", skip_serializing_if = "String::is_empty")]
    pub alias_service: String,
    /// Script check command line (program first).
    #[serde(alias = "args", alias = "ScriptArgs", alias = "script_args", skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,

    /// Docker checks: parsed so that they can be refused with a clear error.
    #[serde(rename = "DockerContainerID", alias = "docker_container_id", skip_serializing_if = "String::is_empty")]
    pub docker_container_id: String,
    #[serde(alias = "shell", skip_serializing_if = "String::is_empty")]
    pub shell: String,
    /// OS service checks: parsed so that they can be refused with a clear error.
    #[serde(rename = "OSService", alias = "os_service", skip_serializing_if = "String::is_empty")]
    pub os_service: String,

    #[serde(alias = "interval", with = "go_duration_opt", skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    #[serde(alias = "timeout", with = "go_duration_opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Not acted on here: the agent reaps services whose check stays critical this long.
    #[serde(alias = "deregister_critical_service_after", with = "go_duration_opt", skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<Duration>,
    #[serde(alias = "success_before_passing", skip_serializing_if = "is_zero")]
    pub success_before_passing: u32,
    /// Defaults to `FailuresBeforeCritical` when 0.
    #[serde(alias = "failures_before_warning", skip_serializing_if = "is_zero")]
    pub failures_before_warning: u32,
    #[serde(alias = "failures_before_critical", skip_serializing_if = "is_zero")]
    pub failures_before_critical: u32,
    /// Per-check output cap; it can only lower the agent's `check_output_max_size`.
    #[serde(alias = "output_max_size", skip_serializing_if = "is_zero_usize")]
    pub output_max_size: usize,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}

/// TLS settings of one check (HTTPS, TCP+TLS, gRPC over TLS, H2PING over TLS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// Skip certificate-chain and host-name verification (`TLSSkipVerify`).
    pub skip_verify: bool,
    /// Name to verify the server certificate against, and to send as SNI where the check opens
    /// the TLS connection itself (`TLSServerName`); the target's host when unset.
    pub server_name: Option<String>,
}

/// The validated, defaulted form of a [`CheckDefinition`]: exactly one kind of check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Http {
        url: String,
        /// Upper-case method, "GET" when unset.
        method: String,
        header: BTreeMap<String, Vec<String>>,
        body: String,
        disable_redirects: bool,
        tls: TlsSettings,
        interval: Duration,
        timeout: Duration,
    },
    Tcp {
        /// `host:port`.
        addr: String,
        use_tls: bool,
        tls: TlsSettings,
        interval: Duration,
        timeout: Duration,
    },
    Udp {
        addr: String,
        interval: Duration,
        timeout: Duration,
    },
    Grpc {
        /// `host:port`.
        addr: String,
        /// Service name asked about; empty for the whole server.
        service: String,
        use_tls: bool,
        tls: TlsSettings,
        interval: Duration,
        timeout: Duration,
    },
    H2Ping {
        addr: String,
        use_tls: bool,
        tls: TlsSettings,
        interval: Duration,
        timeout: Duration,
    },
    Ttl {
        ttl: Duration,
    },
    Script {
        args: Vec<String>,
        interval: Duration,
        timeout: Duration,
    },
    Alias {
        /// Node of the aliased service or node; `None` for this agent's node.
        node: Option<String>,
        /// Service ID to alias; `None` to alias the node's own (node-level) checks.
        service: Option<String>,
    },
}

impl CheckKind {
    /// Consul's name for the kind ("http", "tcp", "udp", "grpc", "h2ping", "ttl", "script",
    /// "alias"), as in the `Type` field of a health check.
    pub fn type_name(&self) -> &'static str {
        match self {
            CheckKind::Http { .. } => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Udp { .. } => "udp",
            CheckKind::Grpc { .. } => "grpc",
            CheckKind::H2Ping { .. } => "h2ping",
            CheckKind::Ttl { .. } => "ttl",
            CheckKind::Script { .. } => "script",
            CheckKind::Alias { .. } => "alias",
        }
    }

    /// How often the kind probes; `None` for TTL and alias checks, which do not poll.
    pub fn interval(&self) -> Option<Duration> {
        match self {
            CheckKind::Http { interval, .. }
            | CheckKind::Tcp { interval, .. }
            | CheckKind::Udp { interval, .. }
            | CheckKind::Grpc { interval, .. }
            | CheckKind::H2Ping { interval, .. }
            | CheckKind::Script { interval, .. } => Some(*interval),
            CheckKind::Ttl { .. } | CheckKind::Alias { .. } => None,
        }
    }
}

/// Why a check cannot be built, run or updated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The definition is not a valid check; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or 'enable_local_script_checks' to true")]
    ScriptsDisabled,
    #[error("alias checks are not available: this agent has no alias source")]
    NoAliasSource,
    #[error("CheckID {0:?} does not have associated TTL")]
    NotTtl(String),
    #[error("check {0:?} is no longer running")]
    Stopped(String),
}

fn invalid(msg: impl Into<String>) -> CheckError {
    CheckError::Invalid(msg.into())
}

impl CheckDefinition {
    /// Validate the definition and resolve it into exactly one kind, with Consul's defaults
    /// (method GET, timeouts, H2PING over TLS) filled in.
    pub fn kind(&self) -> Result<CheckKind, CheckError> {
        if !self.docker_container_id.is_empty() {
            return Err(invalid("Docker checks (DockerContainerID) are not supported by this agent"));
        }
        if !self.os_service.is_empty() {
            return Err(invalid("OSService checks are not supported by this agent"));
        }
        let ttl_set = self.ttl.is_some_and(|d| !d.is_zero());
        let alias = !self.alias_node.is_empty() || !self.alias_service.is_empty();
        let present: Vec<&str> = [
            (!self.http.is_empty(), "HTTP"),
            (!self.tcp.is_empty(), "TCP"),
            (!self.udp.is_empty(), "UDP"),
            (!self.grpc.is_empty(), "GRPC"),
            (!self.h2ping.is_empty(), "H2PING"),
            (ttl_set, "TTL"),
            (!self.args.is_empty(), "Args (script)"),
            (alias, "AliasNode/AliasService"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect();
        match present.len() {
            0 if self.ttl.is_some() => return Err(invalid("TTL must be > 0 for TTL checks")),
            0 => {
                return Err(invalid(
                    "check has no type: set exactly one of HTTP, TCP, UDP, GRPC, H2PING, TTL, \
                     Args (script) or AliasNode/AliasService",
                ));
            }
            1 => {}
            _ => {
                return Err(invalid(format!("check has more than one type ({}); set exactly one", present.join(", "))));
            }
        }
        if self.failures_before_warning > self.failures_before_critical {
            return Err(invalid("FailuresBeforeWarning can't be higher than FailuresBeforeCritical"));
        }
        let tls = TlsSettings { skip_verify: self.tls_skip_verify, server_name: non_empty(&self.tls_server_name) };
        if let Some(name) = &tls.server_name
            && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err(invalid(format!("TLSServerName {name:?} is not a valid DNS name or IP address")));
        }
        let net_timeout = self.timeout_or(DEFAULT_NETWORK_TIMEOUT);

        if ttl_set {
            if self.interval.is_some_and(|d| !d.is_zero()) {
                return Err(invalid("Interval and TTL cannot both be specified"));
            }
            return Ok(CheckKind::Ttl { ttl: self.ttl.unwrap_or_default() });
        }
        if alias {
            if self.interval.is_some_and(|d| !d.is_zero()) {
                return Err(invalid("Interval cannot be set for Alias checks"));
            }
            return Ok(CheckKind::Alias { node: non_empty(&self.alias_node), service: non_empty(&self.alias_service) });
        }
        if !self.http.is_empty() {
            let interval = self.interval_for("HTTP")?;
            let url = reqwest::Url::parse(&self.http).map_err(|e| invalid(format!("HTTP check URL {:?} is not valid: {e}", self.http)))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(format!("HTTP check URL {:?} must use http or https", self.http)));
            }
            let method = if self.method.trim().is_empty() { "GET".to_string() } else { self.method.trim().to_ascii_uppercase() };
            if hyper::Method::from_bytes(method.as_bytes()).is_err() {
                return Err(invalid(format!("HTTP check Method {:?} is not valid", self.method)));
            }
            for (name, values) in &self.header {
                if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(invalid(format!("HTTP check Header name {name:?} is not valid")));
                }
                if let Some(v) = values.iter().find(|v| hyper::header::HeaderValue::from_str(v).is_err()) {
                    return Err(invalid(format!("HTTP check Header {name:?} has an invalid value {v:?}")));
                }
            }
            return Ok(CheckKind::Http {
                url: self.http.clone(),
                method,
                header: self.header.clone(),
                body: self.body.clone(),
                disable_redirects: self.disable_redirects,
                tls,
                interval,
                timeout: net_timeout,
            });
        }
        if !self.tcp.is_empty() {
            let interval = self.interval_for("TCP")?;
            check_host_port("TCP", &self.tcp)?;
            return Ok(CheckKind::Tcp { addr: self.tcp.clone(), use_tls: self.tcp_use_tls, tls, interval, timeout: net_timeout });
        }
        if !self.udp.is_empty() {
            let interval = self.interval_for("UDP")?;
            check_host_port("UDP", &self.udp)?;
            return Ok(CheckKind::Udp { addr: self.udp.clone(), interval, timeout: net_timeout });
        }
        if !self.grpc.is_empty() {
            let interval = self.interval_for("GRPC")?;
            let (addr, service) = match self.grpc.split_once('/') {
                Some((addr, service)) => (addr, service),
                None => (self.grpc.as_str(), ""),
            };
            check_host_port("GRPC", addr)?;
            return Ok(CheckKind::Grpc {
                addr: addr.to_string(),
                service: service.to_string(),
                use_tls: self.grpc_use_tls,
                tls,
                interval,
                timeout: net_timeout,
            });
        }
        if !self.h2ping.is_empty() {
            let interval = self.interval_for("H2PING")?;
            check_host_port("H2PING", &self.h2ping)?;
            return Ok(CheckKind::H2Ping {
                addr: self.h2ping.clone(),
                use_tls: self.h2ping_use_tls.unwrap_or(true),
                tls,
                interval,
                timeout: net_timeout,
            });
        }
        // Only a script check is left.
        let interval = self.interval_for("script")?;
        if self.args[0].trim().is_empty() {
            return Err(invalid("Args of a script check must start with the program to run"));
        }
        Ok(CheckKind::Script { args: self.args.clone(), interval, timeout: self.timeout_or(DEFAULT_SCRIPT_TIMEOUT) })
    }

    /// The output cap for this check under an agent-wide cap (Consul's rule: the check's own
    /// `OutputMaxSize` can only lower the agent's).
    pub fn effective_output_max_size(&self, agent_max: usize) -> usize {
        let agent_max = if agent_max == 0 { DEFAULT_OUTPUT_MAX_SIZE } else { agent_max };
        match self.output_max_size {
            0 => agent_max,
            n => n.min(agent_max),
        }
    }

    fn interval_for(&self, what: &str) -> Result<Duration, CheckError> {
        match self.interval {
            None => Err(invalid(format!("Interval is required for {what} checks"))),
            Some(d) if d.is_zero() => Err(invalid(format!("Interval must be > 0 for {what} checks"))),
            Some(d) => Ok(d),
        }
    }

    fn timeout_or(&self, default: Duration) -> Duration {
        match self.timeout {
            Some(d) if !d.is_zero() => d,
            _ => default,
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// Split `host:port` (`[v6]:port` for IPv6) into its parts.
pub(super) fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port.parse().ok()?))
}

fn check_host_port(what: &str, addr: &str) -> Result<(), CheckError> {
    match split_host_port(addr) {
        Some(_) => Ok(()),
        None => Err(invalid(format!("{what} check address {addr:?} must be host:port"))),
    }
}

pub use crate::duration::{format_go as format_go_duration, parse_go as parse_go_duration};

/// `Option<Duration>` as a Go duration string, or from a string or a number of nanoseconds.
mod go_duration_opt {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_go_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl<'de> Visitor<'de> for DurationVisitor {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a Go duration string such as \"10s\" or a number of nanoseconds")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v.trim().is_empty() {
                return Ok(None);
            }
            super::parse_go_duration(v).map(Some).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(Duration::from_nanos(v)))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v).map(|n| Some(Duration::from_nanos(n))).map_err(|_| E::custom(format!("invalid duration {v}: must not be negative")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
                return Err(E::custom(format!("invalid duration {v}")));
            }
            Ok(Some(Duration::from_nanos(v as u64)))
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(DurationVisitor)
        }
    }
}

/// `Option<Status>` where "" (as Consul's API sends for "unset") means `None`.
mod status_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Status;

    pub fn serialize<S: Serializer>(v: &Option<Status>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Status>, D::Error> {
        let raw: Option<String> = Option::deserialize(d)?;
        match raw.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => Status::parse(s)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom(format!("invalid Status {s:?}: must be passing, warning or critical"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(json: &str) -> CheckDefinition {
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn kind_error(json: &str) -> String {
        match def(json).kind() {
            Ok(kind) => panic!("{json} was accepted as {kind:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn definitions_parse_from_consul_api_json() {
        let d = def(r#"{
            "ID": "api", "Name": "HTTP API", "ServiceID": "web", "Status": "passing",
            "HTTP": "https://127.0.0.1:5000/health", "Method": "post",
            "Header": {"Content-Type": ["application/json"]}, "Body": "{}",
            "TLSSkipVerify": true, "TLSServerName": "web.internal", "DisableRedirects": true,
            "Interval": "10s", "Timeout": 1500000000, "SuccessBeforePassing": 2,
            "FailuresBeforeCritical": 3, "OutputMaxSize": 100,
            "DeregisterCriticalServiceAfter": "1m30s"
        }"#);
        assert_eq!(d.check_id, "api");
        assert_eq!(d.status, Some(Status::Passing));
        assert_eq!(d.deregister_critical_service_after, Some(Duration::from_secs(90)));
        assert_eq!(
            d.kind().unwrap(),
            CheckKind::Http {
                url: "https://127.0.0.1:5000/health".into(),
                method: "POST".into(),
                header: BTreeMap::from([("Content-Type".to_string(), vec!["application/json".to_string()])]),
                body: "{}".into(),
                disable_redirects: true,
                tls: TlsSettings { skip_verify: true, server_name: Some("web.internal".into()) },
                interval: Duration::from_secs(10),
                timeout: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn definitions_parse_from_snake_case_config_keys() {
        let d = def(r#"{
            "id": "mem", "name": "Memory", "args": ["/bin/check_mem", "-limit", "256MB"],
            "interval": "5s", "timeout": "1s", "status": "warning",
            "failures_before_warning": 1, "failures_before_critical": 2, "output_max_size": 10
        }"#);
        assert_eq!(d.check_id, "mem");
        assert_eq!(d.status, Some(Status::Warning));
        assert_eq!(d.failures_before_warning, 1);
        assert_eq!(
            d.kind().unwrap(),
            CheckKind::Script {
                args: vec!["/bin/check_mem".into(), "-limit".into(), "256MB".into()],
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(1),
            }
        );
        let h2 = def(r#"{"h2ping": "localhost:22222", "interval": "10s", "h2ping_use_tls": false,
                         "tls_skip_verify": true}"#);
        assert!(matches!(h2.kind().unwrap(), CheckKind::H2Ping { use_tls: false, tls: TlsSettings { skip_verify: true, .. }, .. }));
        let alias = def(r#"{"alias_service": "web", "alias_node": "n1"}"#);
        assert_eq!(alias.kind().unwrap(), CheckKind::Alias { node: Some("n1".into()), service: Some("web".into()) });
    }

    #[test]
    fn kinds_get_consul_defaults() {
        let grpc = def(r#"{"GRPC": "127.0.0.1:9000/my.Service", "Interval": "10s"}"#);
        assert_eq!(
            grpc.kind().unwrap(),
            CheckKind::Grpc {
                addr: "127.0.0.1:9000".into(),
                service: "my.Service".into(),
                use_tls: false,
                tls: TlsSettings::default(),
                interval: Duration::from_secs(10),
                timeout: DEFAULT_NETWORK_TIMEOUT,
            }
        );
        let h2 = def(r#"{"H2PING": "[::1]:8443", "Interval": "10s"}"#);
        assert!(matches!(h2.kind().unwrap(), CheckKind::H2Ping { use_tls: true, .. }));
        let script = def(r#"{"Args": ["true"], "Interval": "10s"}"#);
        assert!(matches!(
            script.kind().unwrap(),
            CheckKind::Script { timeout, .. } if timeout == DEFAULT_SCRIPT_TIMEOUT
        ));
        let http = def(r#"{"HTTP": "http://localhost/", "Interval": "10s", "Timeout": "0s"}"#);
        assert!(matches!(
            http.kind().unwrap(),
            CheckKind::Http { method, timeout, .. }
                if method == "GET" && timeout == DEFAULT_NETWORK_TIMEOUT
        ));
        let ttl = def(r#"{"TTL": "30s"}"#);
        assert_eq!(ttl.kind().unwrap(), CheckKind::Ttl { ttl: Duration::from_secs(30) });
    }

    #[test]
    fn bad_definitions_give_clear_errors() {
        let cases = [
            (r#"{"Name": "x"}"#, "check has no type"),
            (r#"{"HTTP": "http://a/", "TCP": "a:1", "Interval": "1s"}"#, "check has more than one type (HTTP, TCP)"),
            (r#"{"HTTP": "http://a/"}"#, "Interval is required for HTTP checks"),
            (r#"{"TCP": "a:1", "Interval": "0s"}"#, "Interval must be > 0 for TCP checks"),
            (r#"{"TTL": "0s"}"#, "TTL must be > 0 for TTL checks"),
            (r#"{"TTL": "10s", "Interval": "10s"}"#, "Interval and TTL cannot both be specified"),
            (r#"{"AliasService": "web", "Interval": "10s"}"#, "Interval cannot be set for Alias checks"),
            (r#"{"HTTP": "not a url", "Interval": "1s"}"#, "HTTP check URL \"not a url\" is not valid"),
            (r#"{"HTTP": "ftp://a/", "Interval": "1s"}"#, "must use http or https"),
            (r#"{"HTTP": "http://a/", "Method": "GE T", "Interval": "1s"}"#, "HTTP check Method \"GE T\" is not valid"),
            (r#"{"TCP": "localhost", "Interval": "1s"}"#, "TCP check address \"localhost\" must be host:port"),
            (r#"{"UDP": "a:99999", "Interval": "1s"}"#, "UDP check address \"a:99999\" must be host:port"),
            (r#"{"GRPC": "/svc", "Interval": "1s"}"#, "GRPC check address \"\" must be host:port"),
            (
                r#"{"TCP": "a:1", "Interval": "1s", "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 2}"#,
                "FailuresBeforeWarning can't be higher than FailuresBeforeCritical",
            ),
            (r#"{"DockerContainerID": "f972c95ebf0e", "Args": ["true"], "Interval": "1s"}"#, "Docker checks (DockerContainerID) are not supported"),
            (r#"{"Args": [""], "Interval": "1s"}"#, "must start with the program to run"),
            (
                r#"{"TCP": "a:1", "TCPUseTLS": true, "TLSServerName": "bad name!", "Interval": "1s"}"#,
                "TLSServerName \"bad name!\" is not a valid DNS name or IP address",
            ),
        ];
        for (json, want) in cases {
            let got = kind_error(json);
            assert!(got.contains(want), "{json}: got {got:?}, want {want:?}");
        }
        for (json, want) in [
            (r#"{"TCP": "a:1", "Interval": "10"}"#, "missing unit in duration"),
            (r#"{"TCP": "a:1", "Interval": "-5s"}"#, "must not be negative"),
            (r#"{"TTL": "5x"}"#, "unknown unit"),
            (r#"{"TTL": "5s", "Status": "maintenance"}"#, "must be passing, warning or critical"),
        ] {
            let err = serde_json::from_str::<CheckDefinition>(json).unwrap_err();
            assert!(err.to_string().contains(want), "{json}: got {err}");
        }
    }

    #[test]
    fn go_durations_parse_and_format_like_go() {
        for (s, d) in [
            ("10s", Duration::from_secs(10)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5h", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("1us", Duration::from_micros(1)),
            ("2\u{b5}s", Duration::from_micros(2)),
            ("7ns", Duration::from_nanos(7)),
            ("0", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
        ] {
            assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        }
        for s in ["", "s", "1", "1.2.3s", "-1s", "5d"] {
            assert!(parse_go_duration(s).is_err(), "{s} should not parse");
        }
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(3600), "1h0m0s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(200), "200ms"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_nanos(12), "12ns"),
        ] {
            assert_eq!(format_go_duration(d), s);
        }
        let d = def(r#"{"TTL": 30000000000, "Interval": null}"#);
        assert_eq!(d.ttl, Some(Duration::from_secs(30)));
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json, serde_json::json!({"TTL": "30s"}));
    }

    #[test]
    fn definitions_round_trip_through_json() {
        let d = def(r#"{"CheckID": "c", "GRPC": "a:1/s", "GRPCUseTLS": true,
                        "H2PingUseTLS": false, "Interval": "1m", "Header": {"X": ["1", "2"]}}"#);
        let again: CheckDefinition = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(again, d);
        assert_eq!(serde_json::to_value(&d).unwrap()["Interval"], "1m0s");
    }

    #[test]
    fn output_cap_can_only_be_lowered_by_the_check() {
        let mut d = CheckDefinition::default();
        assert_eq!(d.effective_output_max_size(0), DEFAULT_OUTPUT_MAX_SIZE);
        assert_eq!(d.effective_output_max_size(100), 100);
        d.output_max_size = 10;
        assert_eq!(d.effective_output_max_size(100), 10);
        d.output_max_size = 1000;
        assert_eq!(d.effective_output_max_size(100), 100);
    }
}
