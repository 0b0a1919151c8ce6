//! What a gateway reads of a connection before it routes it: the TLS ClientHello's server name
//! (parsed by rustls, the handshake never continued here), and what that name asks for.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a gateway reads while looking for a ClientHello.
const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelloError {
    #[error("the connection closed before a TLS ClientHello")]
    Closed,
    #[error("not a TLS ClientHello: {0}")]
    NotTls(String),
    #[error("the ClientHello names no server (no SNI)")]
    NoSni,
    #[error("no ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("the ClientHello is larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error("reading: {0}")]
    Io(String),
}

/// Read until the peer's ClientHello is complete; returns every byte read (to be sent on
/// unchanged) and the lower-cased server name.
pub async fn read_client_hello<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> Result<(Vec<u8>, String), HelloError> {
    let work = async {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut seen = Vec::with_capacity(2048);
        let mut buf = vec![0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.map_err(|e| HelloError::Io(e.to_string()))?;
            if n == 0 {
                return Err(HelloError::Closed);
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.len() > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            let mut chunk = &buf[..n];
            while !chunk.is_empty() {
                acceptor.read_tls(&mut chunk).map_err(|e| HelloError::NotTls(e.to_string()))?;
            }
            match acceptor.accept() {
                Ok(None) => continue,
                Ok(Some(accepted)) => {
                    let name = accepted.client_hello().server_name().map(str::to_ascii_lowercase).ok_or(HelloError::NoSni)?;
                    return Ok((seen, name));
                }
                Err((e, _)) => return Err(HelloError::NotTls(e.to_string())),
            }
        }
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| HelloError::Timeout(timeout))?
}

/// Where a server name points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `[<subset>.]<service>.<namespace>.<dc>.internal.<trust-domain>`: a mesh service.
    Service { service: String, subset: Option<String>, datacenter: String },
    /// `[<node>.]server.<dc>.<domain>`: a server (any server without a node).
    Server { node: Option<String>, datacenter: String },
}

impl Target {
    pub fn datacenter(&self) -> &str {
        match self {
            Target::Service { datacenter, .. } | Target::Server { datacenter, .. } => datacenter,
        }
    }
}

/// What `sni` asks for, given this mesh's trust domain and the agents' DNS domain; `None` for
/// names a gateway does not route (they are refused).
pub fn parse(sni: &str, trust_domain: &str, domain: &str) -> Option<Target> {
    let sni = sni.trim_end_matches('.').to_ascii_lowercase();
    let td = trust_domain.trim_end_matches('.').to_ascii_lowercase();
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !td.is_empty()
        && let Some(rest) = sni.strip_suffix(&format!(".internal.{td}"))
    {
        let labels: Vec<&str> = rest.split('.').collect();
        if !labels.iter().all(|l| label_ok(l)) {
            return None;
        }
        return match labels.as_slice() {
            [service, _ns, dc] => Some(Target::Service { service: service.to_string(), subset: None, datacenter: dc.to_string() }),
            [subset, service, _ns, dc] => {
                Some(Target::Service { service: service.to_string(), subset: Some(subset.to_string()), datacenter: dc.to_string() })
            }
            _ => None,
        };
    }
    if !domain.is_empty()
        && let Some(rest) = sni.strip_suffix(&format!(".{domain}"))
    {
        let labels: Vec<&str> = rest.split('.').collect();
        if !labels.iter().all(|l| label_ok(l)) {
            return None;
        }
        return match labels.as_slice() {
            ["server", dc] => Some(Target::Server { node: None, datacenter: dc.to_string() }),
            [node, "server", dc] => Some(Target::Server { node: Some(node.to_string()), datacenter: dc.to_string() }),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

    #[test]
    fn names_map_to_services_and_servers_and_nothing_else() {
        let svc = |s: &str, sub: Option<&str>, dc: &str| Target::Service { service: s.into(), subset: sub.map(Into::into), datacenter: dc.into() };
        assert_eq!(parse(&format!("web.default.dc2.internal.{TD}"), TD, "consul"), Some(svc("web", None, "dc2")));
        assert_eq!(parse(&format!("v1.web.default.dc2.internal.{TD}"), TD, "consul"), Some(svc("web", Some("v1"), "dc2")));
        assert_eq!(parse("server.dc1.consul", TD, "consul"), Some(Target::Server { node: None, datacenter: "dc1".into() }));
        assert_eq!(parse("S1.Server.DC1.consul.", TD, "consul."), Some(Target::Server { node: Some("s1".into()), datacenter: "dc1".into() }));
        for bad in [
            "example.com",
            "web.default.dc2.internal.other.consul",
            &format!("a.b.web.default.dc2.internal.{TD}"),
            &format!("internal.{TD}"),
            "x.y.dc1.consul",
            "server.consul",
            "a..server.dc1.consul",
        ] {
            assert_eq!(parse(bad, TD, "consul"), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn the_client_hello_is_read_whole_and_kept() {
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            std::sync::Arc::new(cfg),
            rustls::pki_types::ServerName::try_from("web.default.dc1.internal.x.consul").unwrap(),
        )
        .unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        // Delivered in two pieces, as a slow network would.
        let (a, b) = hello.split_at(10);
        let mut stream = tokio_test_stream(vec![a.to_vec(), b.to_vec()]);
        let (seen, name) = read_client_hello(&mut stream, Duration::from_secs(5)).await.unwrap();
        assert_eq!(seen, hello);
        assert_eq!(name, "web.default.dc1.internal.x.consul");
        let mut junk = tokio_test_stream(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()]);
        assert!(matches!(read_client_hello(&mut junk, Duration::from_secs(5)).await, Err(HelloError::NotTls(_))));
        let mut empty = tokio_test_stream(vec![]);
        assert_eq!(read_client_hello(&mut empty, Duration::from_secs(5)).await, Err(HelloError::Closed));
    }

    /// A reader that yields the given chunks, then end of stream.
    fn tokio_test_stream(chunks: Vec<Vec<u8>>) -> impl AsyncRead + Unpin {
        let mut all = std::collections::VecDeque::from(chunks);
        let (mut w, r) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(c) = all.pop_front() {
                let _ = w.write_all(&c).await;
                tokio::task::yield_now().await;
            }
        });
        r
    }
}
