//! Internal RPC: one mTLS connection per pair of agents, multiplexing length-prefixed postcard
//! frames tagged with request ids. It carries Raft traffic, cluster membership calls and
//! forwarded HTTP API requests; this layer only moves bytes between a `Service` on one side and
//! the `Handler` registered for it on the other, and knows nothing of what they mean.
//!
//! Errors cross the wire as a stable `ErrorCode` plus a message.

mod client;
mod server;

use std::net::SocketAddr;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use client::RpcClient;
pub use server::{Identify, RpcServer, role_of_names};

/// The largest frame either side accepts; Raft sends snapshots in chunks and sizes append
/// batches well below it (`consensus::raft_config`).
pub const MAX_FRAME: usize = 64 << 20;
/// The largest frame accepted from a peer that presented no certificate (an auto-encrypt
/// certificate request is a few hundred bytes): nothing big is allocated for a stranger.
pub const MAX_ANONYMOUS_FRAME: usize = 64 << 10;
/// Requests one connection may have in flight; past it the server stops reading from that
/// connection until one finishes, so a single peer cannot pile up unbounded tasks.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;

/// Which handler a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Service {
    Raft,
    Cluster,
    Http,
    /// Certificate signing for client agents (auto-encrypt): the one service a peer without a
    /// certificate may call.
    AutoEncrypt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer could not be reached, or the connection broke before an answer came.
    Unreachable,
    Timeout,
    /// The peer's certificate does not allow this call (e.g. a client calling Raft).
    Forbidden,
    BadRequest,
    NoLeader,
    Internal,
    /// Too many requests right now (certificate signing limits); try again later.
    RateLimited,
    /// The thing asked about does not exist (yet).
    NotFound,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into() }
    }
}

/// Who is calling, as the TLS handshake established it: by which CA issued the peer's
/// certificate as well as by the name in it. Server identities come from the operator's agent
/// CA only; whatever the auto-encrypt CA signed is a client agent, whatever name it carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// No certificate: a client agent asking for one (auto-encrypt), nothing else.
    Anonymous,
    /// A server of this datacenter (operator CA, `server.<dc>.<domain>`).
    Server,
    /// A server of another datacenter (operator CA, `server.<other dc>.<domain>`).
    RemoteServer(String),
    /// A client agent of this datacenter (operator CA naming `client.<dc>.<domain>`, or any
    /// certificate from the auto-encrypt CA).
    Client,
    /// A certificate our roots trust that names none of the above (a client agent of another
    /// datacenter, a certificate for some other purpose): allowed nothing.
    Other,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Anonymous => f.write_str("an agent without a certificate"),
            Role::Server => f.write_str("a server of this datacenter"),
            Role::RemoteServer(dc) => write!(f, "a server of datacenter {dc}"),
            Role::Client => f.write_str("a client agent"),
            Role::Other => f.write_str("a certificate that names no agent of this cluster"),
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub role: Role,
}

impl Peer {
    pub fn is_server(&self) -> bool {
        self.role == Role::Server
    }
}

/// The refusal a handler returns when `peer` may not make a request.
pub fn forbidden(what: impl std::fmt::Display, peer: &Peer) -> RpcError {
    RpcError::new(ErrorCode::Forbidden, format!("{what} is not accepted from {}", peer.role))
}

/// Serves one `Service`: takes the request body, returns the response body.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>>;
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestFrame {
    id: u64,
    service: Service,
    /// Bodies are opaque bytes: encoded as one block, not byte by byte.
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ResponseFrame {
    id: u64,
    result: Result<Body, RpcError>,
}

/// A response body, encoded as one block of bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Body(#[serde(with = "serde_bytes")] Vec<u8>);

/// Decode a request frame as the server does: (request id, service, body).
pub fn decode_request_frame(bytes: &[u8]) -> Result<(u64, Service, Vec<u8>), RpcError> {
    let f: RequestFrame = decode(bytes)?;
    Ok((f.id, f.service, f.body))
}

/// Encode a request frame as the client does.
pub fn encode_request_frame(id: u64, service: Service, body: Vec<u8>) -> Result<Vec<u8>, RpcError> {
    encode(&RequestFrame { id, service, body })
}

/// Encode a value for a frame body.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, RpcError> {
    postcard::to_allocvec(v).map_err(|e| RpcError::new(ErrorCode::Internal, format!("encode: {e}")))
}

/// Decode a frame body.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, RpcError> {
    postcard::from_bytes(b).map_err(|e| RpcError::new(ErrorCode::BadRequest, format!("decode: {e}")))
}

async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    w.write_all(bytes).await
}

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len = r.read_u32().await? as usize;
    if len > max {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds {max}")));
    }
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;
    use crate::tls::{self, CertKind, TlsMaterial};

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>> {
            let mut out = vec![u8::from(peer.role != Role::Anonymous), u8::from(peer.is_server())];
            out.extend(body);
            async move { Ok(out) }.boxed()
        }
    }

    /// A listener that lets anonymous peers in for auto-encrypt serves them that service only,
    /// and a client that installs a certificate later is a full peer on its next connection.
    #[tokio::test]
    async fn anonymous_peers_reach_only_auto_encrypt() {
        let (ca, ca_key) = tls::create_ca("consul").unwrap();
        let (cert, key) = tls::create_cert(&ca, &ca_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        let server_tls = TlsMaterial { ca_pem: ca.clone(), cert_pem: cert, key_pem: key };
        let (agent_ca, agent_ca_key) = tls::create_agent_ca("dc1", "consul").unwrap();
        let verifier = server_tls.client_verifier(true).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let identify = Identify { verifier: verifier.clone(), datacenter: "dc1".into(), domain: "consul".into() };
        let mut server = RpcServer::new(listener, server_tls.server_config(verifier.clone()).unwrap(), identify);
        server.register(Service::Http, Arc::new(Echo));
        server.register(Service::AutoEncrypt, Arc::new(Echo));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(server.run(stop.clone()));

        let client = RpcClient::new(tls::anonymous_client_config(&ca).unwrap(), tls::rpc_server_name("dc1", "consul"));
        let t = Duration::from_secs(5);
        let err = client.call(addr, Service::Http, b"x".to_vec(), t).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Forbidden);
        assert_eq!(client.call(addr, Service::AutoEncrypt, b"x".to_vec(), t).await.unwrap(), vec![0, 0, b'x']);

        // A certificate from the auto-encrypt CA is refused until the server trusts that CA.
        let (csr, key) = tls::client_csr("c1").unwrap();
        let cert = tls::sign_client_csr(&agent_ca, &agent_ca_key, &csr, "c1", "dc1", "consul", Duration::from_secs(3600)).unwrap();
        let client_tls = TlsMaterial { ca_pem: ca.clone(), cert_pem: cert, key_pem: key };
        client.set_tls(client_tls.client_config().unwrap());
        assert_eq!(client.call(addr, Service::Http, b"y".to_vec(), t).await.unwrap_err().code, ErrorCode::Unreachable);
        verifier.set_extra_roots(&agent_ca).unwrap();
        assert_eq!(client.call(addr, Service::Http, b"y".to_vec(), t).await.unwrap(), vec![1, 0, b'y']);
        stop.cancel();
    }

    /// What this test does: a certificate named `server.dc1.consul` signed by the auto-encrypt
    /// CA never makes its holder a server. The CA's name constraint makes the handshake fail;
    /// and a CA without one (made before constraints existed) still gives only a client role,
    /// because server identity comes from the operator's CA alone.
    #[tokio::test]
    async fn a_server_name_from_the_auto_encrypt_ca_is_not_a_server() {
        let (ca, ca_key) = tls::create_ca("consul").unwrap();
        let (cert, key) = tls::create_cert(&ca, &ca_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        let server_tls = TlsMaterial { ca_pem: ca.clone(), cert_pem: cert, key_pem: key };
        let verifier = server_tls.client_verifier(false).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let identify = Identify { verifier: verifier.clone(), datacenter: "dc1".into(), domain: "consul".into() };
        let mut server = RpcServer::new(listener, server_tls.server_config(verifier.clone()).unwrap(), identify);
        server.register(Service::Raft, Arc::new(Echo));
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(server.run(stop.clone()));
        let t = Duration::from_secs(5);
        let call_as = |cert_pem: String, key_pem: String| {
            let m = TlsMaterial { ca_pem: ca.clone(), cert_pem, key_pem };
            let client = RpcClient::new(m.client_config().unwrap(), tls::rpc_server_name("dc1", "consul"));
            async move { client.call(addr, Service::Raft, b"r".to_vec(), t).await }
        };

        // The operator CA's server certificate is a server.
        let (c, k) = tls::create_cert(&ca, &ca_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        assert_eq!(call_as(c, k).await.unwrap(), vec![1, 1, b'r']);

        // A constrained auto-encrypt CA cannot vouch for a server name at all.
        let (agent_ca, agent_key) = tls::create_agent_ca("dc1", "consul").unwrap();
        verifier.set_extra_roots(&agent_ca).unwrap();
        let (c, k) = tls::create_cert(&agent_ca, &agent_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        assert_eq!(call_as(c, k).await.unwrap_err().code, ErrorCode::Unreachable);

        // An unconstrained one is trusted for client agents only.
        let (legacy_ca, legacy_key) = tls::create_ca("consul").unwrap();
        verifier.set_extra_roots(&legacy_ca).unwrap();
        let (c, k) = tls::create_cert(&legacy_ca, &legacy_key, CertKind::Server, "dc1", "consul", &[]).unwrap();
        assert_eq!(call_as(c, k).await.unwrap(), vec![1, 0, b'r'], "authenticated, but not a server");
        stop.cancel();
    }
}
