//! Where a proxy learns everything: the agent's HTTP API, with blocking queries. The same code
//! runs inside the agent (requests go straight to its router, no socket) and as
//! `trellis connect proxy` (requests go over HTTP to the local agent), so both behave alike.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// One answer of the agent's API.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    /// `X-Consul-Index`, or 0.
    pub index: u64,
    /// `X-Consul-ContentHash`, for hash-blocking endpoints.
    pub hash: String,
    pub body: bytes::Bytes,
}

impl ApiResponse {
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("undecodable answer: {e}"))
    }
}

/// Requests against the agent's HTTP API.
pub trait AgentApi: Send + Sync + 'static {
    fn get(&self, path_and_query: String) -> BoxFuture<'static, Result<ApiResponse, String>> {
        self.request("GET", path_and_query, Vec::new())
    }
    fn request(&self, method: &'static str, path_and_query: String, body: Vec<u8>) -> BoxFuture<'static, Result<ApiResponse, String>>;
}

fn header_u64(h: &axum::http::HeaderMap, k: &str) -> u64 {
    h.get(k).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Requests handled by the agent's own router, in this process.
pub struct InProcess(pub axum::Router);

impl AgentApi for InProcess {
    fn request(&self, method: &'static str, path_and_query: String, body: Vec<u8>) -> BoxFuture<'static, Result<ApiResponse, String>> {
        let router = self.0.clone();
        async move {
            use tower::ServiceExt;
            let req =
                axum::http::Request::builder().method(method).uri(&path_and_query).body(axum::body::Body::from(body)).map_err(|e| e.to_string())?;
            let resp = router.oneshot(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.map_err(|e| e.to_string())?;
            Ok(ApiResponse {
                status: parts.status.as_u16(),
                index: header_u64(&parts.headers, "x-consul-index"),
                hash: parts.headers.get("x-consul-contenthash").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string(),
                body,
            })
        }
        .boxed()
    }
}

/// Requests over HTTP to an agent (the standalone proxy).
pub struct OverHttp {
    pub client: reqwest::Client,
    /// `http://host:port`.
    pub base: String,
}

impl AgentApi for OverHttp {
    fn request(&self, method: &'static str, path_and_query: String, body: Vec<u8>) -> BoxFuture<'static, Result<ApiResponse, String>> {
        let (client, url) = (self.client.clone(), format!("{}{path_and_query}", self.base));
        async move {
            let m = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
            let r = client.request(m, &url).body(body).send().await.map_err(|e| format!("{url}: {e}"))?;
            let status = r.status().as_u16();
            let index = r.headers().get("x-consul-index").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
            let hash = r.headers().get("x-consul-contenthash").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let body = r.bytes().await.map_err(|e| e.to_string())?;
            Ok(ApiResponse { status, index, hash, body })
        }
        .boxed()
    }
}

/// How long each blocking query waits at the agent.
const WATCH_WAIT: &str = "5m";
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Follow `path` with blocking queries (by index, or by content hash for agent service
/// definitions), publishing each new answer on the returned channel until `stop`.
pub fn follow(api: Arc<dyn AgentApi>, path: String, by_hash: bool, stop: CancellationToken) -> watch::Receiver<Option<Arc<ApiResponse>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut index = 0u64;
        let mut hash = String::new();
        let mut backoff = RETRY_MIN;
        let sep = if path.contains('?') { '&' } else { '?' };
        loop {
            let target = match (by_hash, index, hash.is_empty()) {
                (true, _, false) => format!("{path}{sep}hash={hash}&wait={WATCH_WAIT}"),
                (false, i, _) if i > 0 => format!("{path}{sep}index={i}&wait={WATCH_WAIT}"),
                _ => path.clone(),
            };
            let got = tokio::select! {
                _ = stop.cancelled() => return,
                r = api.get(target) => r,
            };
            match got {
                Ok(r) if r.status < 500 && r.status != 429 => {
                    backoff = RETRY_MIN;
                    let changed = tx.borrow().as_ref().is_none_or(|old: &Arc<ApiResponse>| old.status != r.status || old.body != r.body);
                    index = r.index;
                    hash = r.hash.clone();
                    if changed {
                        tx.send_replace(Some(Arc::new(r)));
                    } else if r.index == 0 && !by_hash {
                        // An endpoint without an index cannot block: pace the polling.
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
                other => {
                    match other {
                        Ok(r) => debug!(%path, status = r.status, body = %String::from_utf8_lossy(&r.body), "proxy watch got an error; retrying"),
                        Err(e) => debug!(%path, error = %e, "proxy watch failed; retrying"),
                    }
                    index = 0;
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    });
    rx
}

/// Percent-encode a path segment or query value.
pub fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}
