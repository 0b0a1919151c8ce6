//! The HTTP(S) listener in front of the API router: our own accept loop on hyper, so that the
//! connection-level limits are ours to set.
//!
//! - At most `limits.http_max_conns_per_client` connections per client IP (Consul's default
//!   200); the next one gets a 429 and is closed.
//! - A request's headers must arrive within `limits.http_read_header_timeout`, which also
//!   closes keep-alive connections idle that long (a connection with a request in flight, a
//!   parked blocking query, is never idle).
//! - HTTPS with an optional client-certificate requirement (`tls.https.verify_incoming`).
//! - On shutdown: stop accepting, let every connection finish the request it is serving, then
//!   close it.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long a TLS client has to finish its handshake (Consul's `https_handshake_timeout`).
const HTTPS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one listener serves and how.
pub struct HttpListener {
    pub listener: TcpListener,
    pub router: Router,
    /// `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Concurrent connections per client IP; 0 for no limit.
    pub max_conns_per_client: usize,
    pub header_read_timeout: Duration,
}

/// Open connections per client IP, shared by every listener of the agent.
#[derive(Clone, Default)]
pub struct ConnCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// Holds one connection's place in `ConnCounts` until it closes.
struct ConnSlot {
    counts: ConnCounts,
    ip: IpAddr,
}

impl ConnCounts {
    fn acquire(&self, ip: IpAddr, max: usize) -> Option<ConnSlot> {
        let mut m = self.0.lock();
        let n = m.entry(ip).or_insert(0);
        if max != 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(ConnSlot { counts: self.clone(), ip })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The whole answer to a connection over the per-client limit.
fn too_many_connections() -> Vec<u8> {
    let body = "Your IP is issuing too many concurrent connections (limits.http_max_conns_per_client); retry later\n";
    format!(
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl HttpListener {
    pub async fn run(self, counts: ConnCounts, shutdown: CancellationToken) -> std::io::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        info!(addr = %self.listener.local_addr()?, scheme, "http listening");
        let acceptor = self.tls.map(TlsAcceptor::from);
        let router = self.router;
        let (max, header_timeout) = (self.max_conns_per_client, self.header_read_timeout);
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(slot) = counts.acquire(addr.ip(), max) else {
                debug!(client = %addr, "refusing a connection over limits.http_max_conns_per_client");
                tokio::spawn(async move {
                    let mut tcp = tcp;
                    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&too_many_connections())).await;
                    let _ = tcp.shutdown().await;
                });
                continue;
            };
            let router = router.clone();
            let shutdown = shutdown.clone();
            match &acceptor {
                None => {
                    tokio::spawn(serve(tcp, addr, router, header_timeout, shutdown, slot));
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HTTPS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => serve(tls, addr, router, header_timeout, shutdown, slot).await,
                            Ok(Err(e)) => debug!(client = %addr, error = %e, "https handshake failed"),
                            Err(_) => debug!(client = %addr, "https handshake timed out"),
                        }
                    });
                }
            }
        }
    }
}

async fn serve<S>(io: S, addr: SocketAddr, router: Router, header_timeout: Duration, shutdown: CancellationToken, _slot: ConnSlot)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(addr));
        let mut router = router.clone();
        async move { tower::Service::call(&mut router, req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(client = %addr, error = %e, "http connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The rustls configuration of the HTTPS listener: our certificate, and with `client_ca_pem`
/// a required client certificate from that CA (`verify_incoming`).
pub fn https_config(cert_pem: &str, key_pem: &str, client_ca_pem: Option<&str>) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes()).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err("the HTTPS cert_file holds no certificate".into());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes()).ok().flatten().ok_or("the HTTPS key_file holds no private key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| e.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut ca.as_bytes()).filter_map(Result::ok) {
                roots.add(c).map_err(|e| e.to_string())?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
