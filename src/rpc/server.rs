//! The RPC listener: accepts mTLS connections, decides who each peer is from its certificate
//! (issuing CA and name, [`Identify`]), and runs each request on its own task, at most
//! [`MAX_IN_FLIGHT_PER_CONNECTION`] at a time per connection.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    ErrorCode, Handler, MAX_ANONYMOUS_FRAME, MAX_FRAME, MAX_IN_FLIGHT_PER_CONNECTION, Peer, RequestFrame, ResponseFrame, Role, RpcError, Service,
    read_frame, write_frame,
};
use crate::tls::RpcClientVerifier;

/// Tells the kinds of peer apart: by the CA that issued a certificate (the operator's agent CA
/// or the auto-encrypt CA) and by the name it carries.
#[derive(Clone)]
pub struct Identify {
    pub verifier: Arc<RpcClientVerifier>,
    pub datacenter: String,
    pub domain: String,
}

impl Identify {
    /// The role of a peer that presented `chain` (the handshake already verified it against
    /// every CA the server trusts).
    pub fn role(&self, chain: Option<&[CertificateDer<'_>]>) -> Role {
        let Some(chain) = chain.filter(|c| !c.is_empty()) else { return Role::Anonymous };
        if !self.verifier.issued_by_operator_ca(chain) {
            // Only the auto-encrypt CA is trusted besides the operator's: it signs client
            // agents of this datacenter and nothing else.
            return Role::Client;
        }
        role_of_names(&crate::tls::dns_names(&chain[0]), &self.datacenter, &self.domain)
    }
}

/// The role the DNS names of an operator-issued certificate give: `server.<dc>.<domain>` is a
/// server (of this datacenter or another), `client.<dc>.<domain>` a client agent of ours.
pub fn role_of_names(names: &[String], datacenter: &str, domain: &str) -> Role {
    let suffix = format!(".{domain}");
    let mut role = Role::Other;
    for name in names {
        let Some(rest) = name.strip_suffix(&suffix) else { continue };
        if let Some(dc) = rest.strip_prefix("server.").filter(|dc| !dc.is_empty() && !dc.contains('.')) {
            return if dc.eq_ignore_ascii_case(datacenter) { Role::Server } else { Role::RemoteServer(dc.to_string()) };
        }
        if rest.strip_prefix("client.").is_some_and(|dc| dc.eq_ignore_ascii_case(datacenter)) {
            role = Role::Client;
        }
    }
    role
}

pub struct RpcServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handlers: Arc<HashMap<Service, Arc<dyn Handler>>>,
    identify: Identify,
}

impl RpcServer {
    pub fn new(listener: TcpListener, tls: Arc<rustls::ServerConfig>, identify: Identify) -> RpcServer {
        RpcServer { listener, acceptor: TlsAcceptor::from(tls), handlers: Arc::new(HashMap::new()), identify }
    }

    pub fn register(&mut self, service: Service, handler: Arc<dyn Handler>) {
        Arc::get_mut(&mut self.handlers).expect("handlers are registered before run").insert(service, handler);
    }

    pub async fn run(self, shutdown: CancellationToken) -> std::io::Result<()> {
        info!(addr = %self.listener.local_addr()?, "rpc listening");
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => { warn!(error = %e, "rpc accept failed"); continue; }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = self.acceptor.clone();
            let handlers = self.handlers.clone();
            let identify = self.identify.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%addr, error = %e, "rpc handshake failed"),
                    Err(_) => return debug!(%addr, "rpc handshake timed out"),
                };
                let role = identify.role(tls.get_ref().1.peer_certificates());
                serve_connection(tls, Peer { addr, role }, handlers, shutdown).await;
            });
        }
    }
}

async fn serve_connection<S>(stream: S, peer: Peer, handlers: Arc<HashMap<Service, Arc<dyn Handler>>>, shutdown: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if write_frame(&mut wr, &frame).await.is_err() {
                break;
            }
        }
    });
    let max_frame = if peer.role == Role::Anonymous { MAX_ANONYMOUS_FRAME } else { MAX_FRAME };
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION));
    loop {
        // Wait for a free slot before reading the next request: a peer that floods us is
        // slowed down by TCP backpressure instead of piling up tasks.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = in_flight.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let bytes = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = read_frame(&mut rd, max_frame) => match r {
                Ok(b) => b,
                Err(e) => {
                    if e.kind() == std::io::ErrorKind::InvalidData {
                        warn!(peer = %peer.addr, role = %peer.role, error = %e, "oversized rpc frame; closing connection");
                    }
                    break;
                }
            },
        };
        let Ok(req) = postcard::from_bytes::<RequestFrame>(&bytes) else {
            warn!(peer = %peer.addr, "undecodable rpc frame; closing connection");
            break;
        };
        drop(bytes);
        let handler = handlers.get(&req.service).cloned();
        let tx = tx.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let result = match handler {
                Some(_) if peer.role == Role::Anonymous && req.service != Service::AutoEncrypt => Err(RpcError::new(
                    ErrorCode::Forbidden,
                    "this connection presented no certificate; only auto-encrypt certificate requests are allowed",
                )),
                Some(h) => h.handle(peer, req.body).await,
                None => Err(RpcError::new(ErrorCode::BadRequest, format!("no handler for {:?}", req.service))),
            };
            let frame = postcard::to_allocvec(&ResponseFrame { id: req.id, result: result.map(super::Body) })
                .ok()
                .filter(|f| f.len() <= MAX_FRAME)
                .unwrap_or_else(|| {
                    let e = RpcError::new(ErrorCode::Internal, format!("the answer exceeds the largest rpc frame ({MAX_FRAME} bytes)"));
                    postcard::to_allocvec(&ResponseFrame { id: req.id, result: Err(e) }).unwrap_or_default()
                });
            let _ = tx.send(frame).await;
            drop(permit);
        });
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decide_roles_within_the_operator_ca() {
        let r = |names: &[&str]| role_of_names(&names.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "dc1", "consul");
        assert_eq!(r(&["server.dc1.consul", "localhost"]), Role::Server);
        assert_eq!(r(&["server.DC1.consul"]), Role::Server);
        assert_eq!(r(&["server.dc2.consul"]), Role::RemoteServer("dc2".into()));
        assert_eq!(r(&["client.dc1.consul"]), Role::Client);
        assert_eq!(r(&["client.dc2.consul"]), Role::Other);
        assert_eq!(r(&["server.dc1.example"]), Role::Other);
        assert_eq!(r(&["x.server.dc1.consul"]), Role::Other);
        assert_eq!(r(&["server..consul"]), Role::Other);
        assert_eq!(r(&[]), Role::Other);
    }
}
