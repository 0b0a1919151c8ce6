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
pub use server::RpcServer;

/// The largest frame either side accepts; Raft sends snapshots in chunks well below it.
pub const MAX_FRAME: usize = 64 << 20;

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

/// Who is calling, as established by the TLS handshake.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The certificate names `server.<dc>.<domain>` of our datacenter.
    pub is_server: bool,
    /// The peer presented a certificate our roots trust (always, unless the listener lets
    /// anonymous peers in for auto-encrypt).
    pub authenticated: bool,
}

/// Serves one `Service`: takes the request body, returns the response body.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, peer: Peer, body: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, RpcError>>;
}

#[derive(Debug, Serialize, Deserialize)]
struct RequestFrame {
    id: u64,
    service: Service,
    body: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ResponseFrame {
    id: u64,
    result: Result<Vec<u8>, RpcError>,
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

async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds {MAX_FRAME}")));
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
            let mut out = vec![u8::from(peer.authenticated), u8::from(peer.is_server)];
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
        let mut server = RpcServer::new(listener, server_tls.server_config(verifier.clone()).unwrap(), tls::server_name("dc1", "consul"));
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
}
