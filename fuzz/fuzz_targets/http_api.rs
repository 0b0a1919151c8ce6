#![no_main]
//! cargo fuzz run http_api: requests with fuzzed methods, path parameters, query strings and
//! bodies through the whole HTTP API of a real single-server agent (in this process, on
//! loopback ports chosen by the OS): decoding, validation, and the writes that pass them going
//! through Raft. The property: no panic, and no 5xx other than the few a request may
//! legitimately cause (none here: there is one healthy server).

use std::sync::LazyLock;

use axum::body::Body;
use tower::ServiceExt;

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    _agent: trellis::agent::Agent,
    _dir: tempfile::TempDir,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"data_dir": {:?}, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1", "node_name": "fuzz",
             "ports": {{"http": 0, "dns": -1, "server": 0, "serf_lan": 0, "serf_wan": -1}},
             "limits": {{"http_max_conns_per_client": 0}}}}"#,
        dir.path().display().to_string()
    );
    let cfg = trellis::config::parse_str(&json, true).unwrap().validate(true).unwrap();
    let agent = rt.block_on(trellis::agent::Agent::start(cfg)).unwrap();
    let router = agent.router();
    // Wait for the one server to lead, so that writes are really applied.
    rt.block_on(async {
        for _ in 0..200 {
            let req = axum::http::Request::get("/v1/status/leader").body(Body::empty()).unwrap();
            let resp = router.clone().oneshot(req).await.unwrap();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            if body.len() > 4 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no leader");
    });
    Fixture { rt, router, _agent: agent, _dir: dir }
});

const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "HEAD"];
const PATHS: [&str; 24] = [
    "/v1/kv/{}",
    "/v1/catalog/register",
    "/v1/catalog/deregister",
    "/v1/catalog/service/{}",
    "/v1/catalog/services",
    "/v1/catalog/node/{}",
    "/v1/health/service/{}",
    "/v1/health/state/{}",
    "/v1/session/create",
    "/v1/session/renew/{}",
    "/v1/session/destroy/{}",
    "/v1/txn",
    "/v1/query",
    "/v1/query/{}/execute",
    "/v1/agent/service/register",
    "/v1/agent/check/register",
    "/v1/agent/check/update/{}",
    "/v1/operator/autopilot/configuration",
    "/v1/coordinate/update",
    "/v1/event/fire/{}",
    "/v1/snapshot",
    "/v1/operator/keyring",
    "/v1/agent/services",
    "/v1/operator/raft/configuration",
];

fn pct(s: &[u8]) -> String {
    s.iter().map(|b| if b.is_ascii_alphanumeric() || b"-_./".contains(b) { (*b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let f = &*FIXTURE;
    let method = METHODS[data[0] as usize % METHODS.len()];
    let template = PATHS[data[1] as usize % PATHS.len()];
    // The rest: path parameter, query and body, separated by NUL bytes.
    let mut parts = data[2..].splitn(3, |b| *b == 0);
    let param = pct(parts.next().unwrap_or_default());
    // No parked blocking queries: they would only make the run wait.
    let query = pct(parts.next().unwrap_or_default()).replace("%3D", "=").replace("%26", "&").replace("index", "indx");
    let body = parts.next().unwrap_or_default().to_vec();
    let param = if param.is_empty() { "x".to_string() } else { param };
    let uri = format!("{}?{}", template.replace("{}", &param), query);
    let send = |method: &str, body: Vec<u8>| {
        let req = axum::http::Request::builder().method(method).uri(&uri).body(Body::from(body)).ok()?;
        Some(f.rt.block_on(async {
            // Blocking queries answer within their own wait; bound the whole request anyway.
            let call = f.router.clone().oneshot(req);
            match tokio::time::timeout(std::time::Duration::from_secs(20), call).await {
                Ok(Ok(resp)) => {
                    let status = resp.status();
                    let body = if status.is_server_error() {
                        axum::body::to_bytes(resp.into_body(), 64 * 1024).await.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    (status, body)
                }
                _ => (axum::http::StatusCode::OK, String::new()),
            }
        }))
    };
    let Some((status, mut text)) = send(method, body) else { return };
    // A HEAD answer carries no body to say why it failed: the same request as GET does.
    if method == "HEAD" && status.is_server_error() && text.is_empty() {
        text = send("GET", Vec::new()).map(|(_, t)| t).unwrap_or_default();
    }
    // Consul answers a `?dc=` naming no known datacenter with 500 "No path to datacenter";
    // any other 5xx is a bug.
    let no_path = text.trim() == "No path to datacenter";
    assert!(status.as_u16() < 500 || status.as_u16() == 501 || no_path, "{method} {uri} answered {status}: {text}");
});
