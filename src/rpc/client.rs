//! The RPC client: a pool holding one multiplexed connection per peer address.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

use super::{ErrorCode, MAX_FRAME, RequestFrame, ResponseFrame, RpcError, Service, read_frame, write_frame};

/// How long a TCP connect plus TLS handshake may take before the peer counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>, RpcError>>>>>;

struct Conn {
    /// Tells this connection from a later one to the same address.
    id: u64,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
}

#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced when a client agent gets (or renews) its auto-encrypt certificate.
    connector: Mutex<TlsConnector>,
    server_name: ServerName<'static>,
    conns: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    next_id: AtomicU64,
    /// One lock per address, so that concurrent callers share one connection and a slow dial
    /// to one peer never holds up dials to the others.
    dialing: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
}

impl RpcClient {
    pub fn new(tls: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> RpcClient {
        RpcClient {
            inner: Arc::new(Inner {
                connector: Mutex::new(TlsConnector::from(tls)),
                server_name,
                conns: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                dialing: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Use `tls` for every connection from now on, closing the ones made with the old
    /// configuration (calls in flight on them fail as unreachable and may be retried).
    pub fn set_tls(&self, tls: Arc<rustls::ClientConfig>) {
        *self.inner.connector.lock() = TlsConnector::from(tls);
        self.inner.conns.lock().clear();
    }

    /// Send one request and wait for its answer, at most `timeout`.
    pub async fn call(&self, addr: SocketAddr, service: Service, body: Vec<u8>, timeout: Duration) -> Result<Vec<u8>, RpcError> {
        let conn = self.conn(addr).await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = postcard::to_allocvec(&RequestFrame { id, service, body }).map_err(|e| RpcError::new(ErrorCode::Internal, e.to_string()))?;
        if frame.len() > MAX_FRAME {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                format!("request of {} bytes exceeds the largest rpc frame ({MAX_FRAME} bytes)", frame.len()),
            ));
        }
        let (tx, rx) = oneshot::channel();
        conn.pending.lock().insert(id, tx);
        let unreachable = || RpcError::new(ErrorCode::Unreachable, format!("connection to {addr} closed"));
        if conn.tx.send(frame).await.is_err() {
            conn.pending.lock().remove(&id);
            self.forget(addr, &conn);
            return Err(unreachable());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unreachable()),
            Err(_) => {
                conn.pending.lock().remove(&id);
                Err(RpcError::new(ErrorCode::Timeout, format!("rpc to {addr} timed out after {timeout:?}")))
            }
        }
    }

    /// `call` with postcard-encoded request and response.
    pub async fn call_typed<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        addr: SocketAddr,
        service: Service,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let bytes = self.call(addr, service, super::encode(req)?, timeout).await?;
        super::decode(&bytes)
    }

    fn forget(&self, addr: SocketAddr, conn: &Arc<Conn>) {
        let mut conns = self.inner.conns.lock();
        if conns.get(&addr).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&addr);
        }
    }

    async fn conn(&self, addr: SocketAddr) -> Result<Arc<Conn>, RpcError> {
        if let Some(c) = self.live(addr) {
            return Ok(c);
        }
        let lock = self.inner.dialing.lock().entry(addr).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(c) = self.live(addr) {
            return Ok(c);
        }
        let conn = Arc::new(self.dial(addr).await?);
        self.inner.conns.lock().insert(addr, conn.clone());
        Ok(conn)
    }

    fn live(&self, addr: SocketAddr) -> Option<Arc<Conn>> {
        let conns = self.inner.conns.lock();
        conns.get(&addr).filter(|c| !c.tx.is_closed()).cloned()
    }

    async fn dial(&self, addr: SocketAddr) -> Result<Conn, RpcError> {
        let fail = |e: String| RpcError::new(ErrorCode::Unreachable, format!("dial {addr}: {e}"));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| fail(e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            let connector = self.inner.connector.lock().clone();
            connector.connect(self.inner.server_name.clone(), tcp).await.map_err(|e| fail(e.to_string()))
        })
        .await
        .map_err(|_| fail("timed out".into()))??;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let reader_pending = pending.clone();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if write_frame(&mut wr, &frame).await.is_err() {
                    return;
                }
            }
            // Nobody holds this connection any more (e.g. `set_tls` replaced it): close it, so
            // that the peer's side and our reader end too.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut wr).await;
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            while let Ok(bytes) = read_frame(&mut rd, MAX_FRAME).await {
                let Ok(resp) = postcard::from_bytes::<ResponseFrame>(&bytes) else {
                    break;
                };
                if let Some(waiter) = reader_pending.lock().remove(&resp.id) {
                    let _ = waiter.send(resp.result.map(|b| b.0));
                }
            }
            // The connection is gone: fail everything still waiting and let the next call redial.
            reader_pending.lock().clear();
            let mut conns = inner.conns.lock();
            if conns.get(&addr).is_some_and(|c| c.id == id) {
                conns.remove(&addr);
            }
        });
        Ok(Conn { id, tx, pending })
    }
}
