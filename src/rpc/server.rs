//! The RPC listener: accepts mTLS connections and runs each request on its own task.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{ErrorCode, Handler, Peer, RequestFrame, ResponseFrame, RpcError, Service, read_frame, write_frame};

pub struct RpcServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handlers: Arc<HashMap<Service, Arc<dyn Handler>>>,
    /// The certificate name that marks a peer as a server of our datacenter.
    server_name: String,
}

impl RpcServer {
    pub fn new(listener: TcpListener, tls: Arc<rustls::ServerConfig>, server_name: String) -> RpcServer {
        RpcServer { listener, acceptor: TlsAcceptor::from(tls), handlers: Arc::new(HashMap::new()), server_name }
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
            let server_name = self.server_name.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => return debug!(%addr, error = %e, "rpc handshake failed"),
                    Err(_) => return debug!(%addr, "rpc handshake timed out"),
                };
                let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                let (is_server, authenticated) = (cert.is_some_and(|c| crate::tls::dns_names(c).contains(&server_name)), cert.is_some());
                serve_connection(tls, Peer { addr, is_server, authenticated }, handlers, shutdown).await;
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
    loop {
        let bytes = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = read_frame(&mut rd) => match r { Ok(b) => b, Err(_) => break },
        };
        let Ok(req) = postcard::from_bytes::<RequestFrame>(&bytes) else {
            warn!(peer = %peer.addr, "undecodable rpc frame; closing connection");
            break;
        };
        let handler = handlers.get(&req.service).cloned();
        let tx = tx.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            let result = match handler {
                Some(_) if !peer.authenticated && req.service != Service::AutoEncrypt => Err(RpcError::new(
                    ErrorCode::Forbidden,
                    "this connection presented no certificate; only auto-encrypt certificate requests are allowed",
                )),
                Some(h) => h.handle(peer, req.body).await,
                None => Err(RpcError::new(ErrorCode::BadRequest, format!("no handler for {:?}", req.service))),
            };
            if let Ok(frame) = postcard::to_allocvec(&ResponseFrame { id: req.id, result }) {
                let _ = tx.send(frame).await;
            }
        });
    }
    drop(tx);
    let _ = writer.await;
}
