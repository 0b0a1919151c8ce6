//! The hop between two gateways. QUIC (quinn) whenever UDP gets through: one pooled,
//! multiplexed connection per remote gateway, each inner connection one bidirectional stream
//! carrying the untouched TLS bytes, so a new inner connection costs no WAN round trip beyond
//! its own. When UDP does not get through, plain TCP to the same address (the remote gateway
//! routes it by SNI exactly as it routes its LAN), chosen on its own and probed again later.
//!
//! The gateways authenticate each other on QUIC with their mesh leaves (chaining to the mesh
//! roots); the inner TLS sessions are end to end between the services and never terminated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::proxy::tls::{Expected, MeshTls};

/// ALPN of the gateway-to-gateway QUIC tunnel.
pub const ALPN: &[u8] = b"trellis-gateway/1";
/// How long a QUIC handshake to a remote gateway may take before UDP counts as blocked.
const QUIC_CONNECT: Duration = Duration::from_secs(1);
/// How long the first answer on a new stream may take before the path counts as broken (the
/// remote gateway has to reach the service too): this many round trips, at least
/// [`FIRST_ANSWER_MIN`]. A false alarm only moves the connection to TCP.
const FIRST_ANSWER_RTTS: u32 = 8;
const FIRST_ANSWER_MIN: Duration = Duration::from_secs(1);
/// After UDP failed to a gateway, TCP while QUIC is probed again: after 1 s, then backing off
/// to every 15 s.
const UDP_RETRY_MIN: Duration = Duration::from_secs(1);
const UDP_RETRY: Duration = Duration::from_secs(15);
const TCP_CONNECT: Duration = Duration::from_secs(3);

/// Anything a gateway splices.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Which transport carried a tunnelled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// Gateway counters, reported in `/v1/agent/metrics`.
#[derive(Default)]
pub struct Metrics {
    /// Connections carried to another datacenter's gateway, by transport.
    pub out_quic: AtomicU64,
    pub out_tcp: AtomicU64,
    /// Connections received from other datacenters' gateways, by transport.
    pub in_quic: AtomicU64,
    pub in_tcp: AtomicU64,
    /// Bytes carried over the WAN hop (both directions), by transport.
    pub bytes_quic: AtomicU64,
    pub bytes_tcp: AtomicU64,
    /// Connections routed to this datacenter's services and servers.
    pub local: AtomicU64,
    /// Connections refused: unknown names, no route, not TLS.
    pub refused: AtomicU64,
}

impl Metrics {
    pub fn counters(&self) -> Vec<(&'static str, crate::api::metrics::Labels, u64)> {
        let l = |v: &'static str| vec![("transport", v.to_string())];
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("trellis.gateway.wan_connections", [l("quic"), vec![("direction", "out".into())]].concat(), get(&self.out_quic)),
            ("trellis.gateway.wan_connections", [l("tcp"), vec![("direction", "out".into())]].concat(), get(&self.out_tcp)),
            ("trellis.gateway.wan_connections", [l("quic"), vec![("direction", "in".into())]].concat(), get(&self.in_quic)),
            ("trellis.gateway.wan_connections", [l("tcp"), vec![("direction", "in".into())]].concat(), get(&self.in_tcp)),
            ("trellis.gateway.wan_bytes", l("quic"), get(&self.bytes_quic)),
            ("trellis.gateway.wan_bytes", l("tcp"), get(&self.bytes_tcp)),
            ("trellis.gateway.local_connections", Vec::new(), get(&self.local)),
            ("trellis.gateway.refused_connections", Vec::new(), get(&self.refused)),
        ]
    }

    pub fn count_bytes(&self, t: Transport, n: u64) {
        match t {
            Transport::Quic => &self.bytes_quic,
            Transport::Tcp => &self.bytes_tcp,
        }
        .fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Peer {
    conn: Option<quinn::Connection>,
    /// UDP failed to this gateway: TCP until then (a background probe may clear it sooner).
    udp_blocked_until: Option<Instant>,
    probing: bool,
}

/// The gateway's side of every gateway-to-gateway hop.
pub struct Tunnel {
    tls: Arc<MeshTls>,
    endpoint: Option<quinn::Endpoint>,
    client: Option<quinn::ClientConfig>,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    pub metrics: Arc<Metrics>,
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // A dead peer shows within 3 s (its streams fail then, and the next connections go
    // elsewhere).
    t.keep_alive_interval(Some(Duration::from_millis(750)));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(3)).expect("small timeout")));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(100_000));
    Arc::new(t)
}

impl Tunnel {
    /// A QUIC endpoint on `wan` (UDP) that accepts other gateways and dials them, identified
    /// by `tls` (the gateway's leaf, swapped when it renews). When UDP cannot be bound, the
    /// tunnel is TCP only.
    pub fn new(wan: SocketAddr, tls: &Arc<MeshTls>, gateway_service: &str, metrics: Arc<Metrics>) -> Tunnel {
        let made = (|| -> Result<(quinn::Endpoint, quinn::ClientConfig), String> {
            let server_tls = tls.server_config(vec![ALPN.to_vec()]).map_err(|e| e.to_string())?;
            let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).map_err(|e| e.to_string())?;
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
            server.transport_config(transport_config());
            let client_tls = tls
                .client_config(Expected { service: gateway_service.to_string(), datacenter: String::new() }, vec![ALPN.to_vec()])
                .map_err(|e| e.to_string())?;
            let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).map_err(|e| e.to_string())?;
            let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
            client.transport_config(transport_config());
            let endpoint = quinn::Endpoint::server(server, wan).map_err(|e| format!("UDP {wan}: {e}"))?;
            Ok((endpoint, client))
        })();
        match made {
            Ok((endpoint, client)) => Tunnel { tls: tls.clone(), endpoint: Some(endpoint), client: Some(client), peers: Mutex::default(), metrics },
            Err(e) => {
                tracing::warn!(error = %e, "no QUIC tunnel between gateways (TCP only)");
                Tunnel { tls: tls.clone(), endpoint: None, client: None, peers: Mutex::default(), metrics }
            }
        }
    }

    /// A tunnel that only ever uses TCP (`--wan-transport tcp`).
    pub fn tcp_only(tls: &Arc<MeshTls>, metrics: Arc<Metrics>) -> Tunnel {
        Tunnel { tls: tls.clone(), endpoint: None, client: None, peers: Mutex::default(), metrics }
    }

    /// Incoming QUIC connections from other gateways, until the endpoint closes.
    pub fn endpoint(&self) -> Option<&quinn::Endpoint> {
        self.endpoint.as_ref()
    }

    fn udp_allowed(&self, addr: SocketAddr) -> bool {
        // Without its leaf yet, a gateway cannot authenticate on QUIC: TCP meanwhile.
        self.client.is_some()
            && self.tls.ready()
            && self.peers.lock().get(&addr).and_then(|p| p.udp_blocked_until).is_none_or(|t| t <= Instant::now())
    }

    fn block_udp(self: &Arc<Self>, addr: SocketAddr, why: &str) {
        let mut peers = self.peers.lock();
        let p = peers.entry(addr).or_default();
        if let Some(c) = p.conn.take() {
            c.close(quinn::VarInt::from_u32(0), b"path broken");
        }
        let fresh = p.udp_blocked_until.is_none_or(|t| t <= Instant::now());
        p.udp_blocked_until = Some(Instant::now() + UDP_RETRY);
        if fresh {
            info!(gateway = %addr, reason = why, "QUIC to this gateway does not get through; using TCP");
        }
        if !p.probing {
            p.probing = true;
            let me = self.clone();
            tokio::spawn(async move { me.probe(addr).await });
        }
    }

    /// While UDP is blocked to `addr`: try QUIC again every [`UDP_RETRY`], and switch back as
    /// soon as it works.
    async fn probe(self: Arc<Self>, addr: SocketAddr) {
        let mut wait = UDP_RETRY_MIN;
        loop {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(UDP_RETRY);
            match self.connect_quic(addr).await {
                Ok(conn) => {
                    let mut peers = self.peers.lock();
                    let p = peers.entry(addr).or_default();
                    p.conn = Some(conn);
                    p.udp_blocked_until = None;
                    p.probing = false;
                    info!(gateway = %addr, "QUIC to this gateway works again");
                    return;
                }
                Err(e) => debug!(gateway = %addr, error = %e, "QUIC probe failed; staying on TCP"),
            }
        }
    }

    async fn connect_quic(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        let (Some(endpoint), Some(client)) = (&self.endpoint, &self.client) else { return Err("no QUIC endpoint".into()) };
        let connecting = endpoint.connect_with(client.clone(), addr, "mesh-gateway").map_err(|e| e.to_string())?;
        tokio::time::timeout(QUIC_CONNECT, connecting).await.map_err(|_| "QUIC handshake timed out".to_string())?.map_err(|e| e.to_string())
    }

    /// The pooled connection to `addr`, dialled if there is none (or it died).
    async fn quic_conn(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        if let Some(c) = self.peers.lock().get(&addr).and_then(|p| p.conn.clone()).filter(|c| c.close_reason().is_none()) {
            return Ok(c);
        }
        let conn = self.connect_quic(addr).await?;
        let mut peers = self.peers.lock();
        let p = peers.entry(addr).or_default();
        // Another caller may have connected meanwhile: keep one.
        if let Some(existing) = p.conn.clone().filter(|c| c.close_reason().is_none()) {
            conn.close(quinn::VarInt::from_u32(0), b"duplicate");
            return Ok(existing);
        }
        p.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Carry a connection whose first bytes are `hello` to the gateway at `addr`: a QUIC
    /// stream when UDP gets through, else TCP. Returns the stream to splice with (its first
    /// answer already read into it) and the transport used. An error means this gateway
    /// cannot take the connection (try another).
    pub async fn open(self: &Arc<Self>, addr: SocketAddr, hello: &[u8]) -> Result<(Box<dyn Io>, Transport), String> {
        if self.udp_allowed(addr) {
            match self.open_quic(addr, hello).await {
                Ok(Some(s)) => {
                    self.metrics.out_quic.fetch_add(1, Ordering::Relaxed);
                    return Ok((s, Transport::Quic));
                }
                // The remote gateway answered and closed: it has no route. TCP would not help.
                Ok(None) => return Err(format!("gateway {addr} refused the connection")),
                Err(e) => self.block_udp(addr, &e),
            }
        }
        let mut tcp = tokio::time::timeout(TCP_CONNECT, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connecting to gateway {addr} timed out"))?
            .map_err(|e| format!("gateway {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(hello).await.map_err(|e| format!("gateway {addr}: {e}"))?;
        self.metrics.out_tcp.fetch_add(1, Ordering::Relaxed);
        Ok((Box::new(tcp), Transport::Tcp))
    }

    /// `Ok(None)`: the remote gateway closed the stream without answering.
    async fn open_quic(&self, addr: SocketAddr, hello: &[u8]) -> Result<Option<Box<dyn Io>>, String> {
        let conn = self.quic_conn(addr).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(hello).await.map_err(|e| e.to_string())?;
        let mut first = vec![0u8; 16 * 1024];
        let wait = (conn.rtt() * FIRST_ANSWER_RTTS).max(FIRST_ANSWER_MIN);
        match tokio::time::timeout(wait, recv.read(&mut first)).await {
            Ok(Ok(Some(n))) => {
                first.truncate(n);
                Ok(Some(Box::new(Prefixed { prefix: first, at: 0, inner: tokio::io::join(recv, send) })))
            }
            Ok(Ok(None)) => Ok(None),
            Ok(Err(quinn::ReadError::Reset(_))) => Ok(None),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer on the QUIC stream".into()),
        }
    }
}

/// A stream whose first bytes were already read (the first answer): they are read first.
struct Prefixed<T> {
    prefix: Vec<u8>,
    at: usize,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
