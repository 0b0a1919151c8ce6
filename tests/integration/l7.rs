//! L7 traffic management with real agents and sidecars: splits, header routing to a canary
//! subset, retries, timeouts, L7 intentions and gRPC routed by method, all through the
//! discovery chain compiled from config entries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

use crate::harness::{Cluster, SOON, eventually};

/// How a test backend behaves.
#[derive(Clone, Default)]
pub(crate) struct Behaviour {
    /// Answer 503 to every `n`th request.
    pub fail_every: Option<u64>,
    /// gRPC over HTTP/2 (h2c) instead of HTTP/1.1.
    pub grpc: bool,
}

/// An HTTP backend on 127.0.0.1 answering `<name> <path>` (and header `x-backend`); `/slow`
/// answers after 2 s. Returns its port.
pub(crate) async fn backend(name: &'static str, b: Behaviour) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (count, b) = (count.clone(), b.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (count, b) = (count.clone(), b.clone());
                    async move {
                        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                        let path = req.uri().path().to_string();
                        if path == "/slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        let mut resp = if b.grpc {
                            // One length-prefixed message, then grpc-status 0 in the trailers.
                            let msg = format!("{name} {path}");
                            let mut frame = vec![0u8];
                            frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                            frame.extend_from_slice(msg.as_bytes());
                            let trailers = {
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                t
                            };
                            let body = http_body_util::StreamBody::new(futures::stream::iter(vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(frame))),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ]))
                            .boxed();
                            let mut r = http::Response::new(body);
                            r.headers_mut().insert("content-type", "application/grpc".parse().unwrap());
                            r
                        } else if b.fail_every.is_some_and(|k| n % k == 0) {
                            let mut r = http::Response::new(Full::new(Bytes::from("injected failure")).map_err(|e| match e {}).boxed());
                            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            r
                        } else {
                            http::Response::new(Full::new(Bytes::from(format!("{name} {path}"))).map_err(|e| match e {}).boxed())
                        };
                        resp.headers_mut().insert("x-backend", name.parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    port
}

async fn register(c: &Cluster, def: serde_json::Value) {
    let (status, body) = c.put(&format!("{}/v1/agent/service/register", c.servers[0].http()), def.to_string()).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

async fn config(c: &Cluster, entry: serde_json::Value) {
    let (status, body) = c.put(&format!("{}/v1/config", c.servers[0].http()), entry.to_string()).await.unwrap();
    assert_eq!((status, body.trim()), (200, "true"), "{entry}");
}

/// What this test does:
/// - `api` has instances v1, v2, canary and flaky (each with its sidecar), `web` has api as an
///   upstream; config entries make api HTTP with a resolver (subsets by `Service.Meta.version`,
///   default v1), a 90/10 splitter between v1 and v2, and a router: `x-canary: 1` goes to the
///   canary subset, `/flaky` to an instance failing one request in three (2 retries on 503),
///   `/slow` with a 500 ms timeout;
/// - 1,000 requests land 10 % ± 3 % on v2; the canary header reaches only canary; every
///   `/flaky` request succeeds; `/slow` answers 504 within the timeout;
/// - an L7 intention denies web on `/admin` (403) while other paths pass;
/// - gRPC: `rpc` (protocol grpc) is routed by method to two different backends.
#[tokio::test(flavor = "multi_thread")]
async fn http_traffic_is_routed_split_retried_timed_and_authorised_per_request() {
    let c = Cluster::start(1).await;
    let ip = c.servers[0].ip.clone();
    let api = |id: &str, version: &str, port: u16| json!({"ID": id, "Name": "api", "Port": port, "Meta": {"version": version}, "Connect": {"SidecarService": {}}});
    register(&c, api("api-v1", "v1", backend("v1", Behaviour::default()).await)).await;
    register(&c, api("api-v2", "v2", backend("v2", Behaviour::default()).await)).await;
    register(&c, api("api-canary", "canary", backend("canary", Behaviour::default()).await)).await;
    register(&c, api("api-flaky", "flaky", backend("flaky", Behaviour { fail_every: Some(3), ..Default::default() }).await)).await;
    for (id, name) in [("rpc-a", "a"), ("rpc-b", "b")] {
        let port = backend(if name == "a" { "rpc-a" } else { "rpc-b" }, Behaviour { grpc: true, ..Default::default() }).await;
        register(&c, json!({"ID": id, "Name": "rpc", "Port": port, "Meta": {"version": name}, "Connect": {"SidecarService": {}}})).await;
    }
    register(
        &c,
        json!({"Name": "web", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "api", "LocalBindAddress": ip, "LocalBindPort": 19301},
            {"DestinationName": "rpc", "LocalBindAddress": ip, "LocalBindPort": 19302}
        ]}}}}),
    )
    .await;
    config(&c, json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http"})).await;
    config(&c, json!({"Kind": "service-defaults", "Name": "rpc", "Protocol": "grpc"})).await;
    config(
        &c,
        json!({"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1", "Subsets": {
            "v1": {"Filter": "Service.Meta.version == v1"},
            "v2": {"Filter": "Service.Meta.version == v2"},
            "canary": {"Filter": "Service.Meta.version == canary"},
            "flaky": {"Filter": "Service.Meta.version == flaky"}
        }}),
    )
    .await;
    config(
        &c,
        json!({"Kind": "service-splitter", "Name": "api", "Splits": [
            {"Weight": 90, "ServiceSubset": "v1"}, {"Weight": 10, "ServiceSubset": "v2"}
        ]}),
    )
    .await;
    config(
        &c,
        json!({"Kind": "service-router", "Name": "api", "Routes": [
            {"Match": {"HTTP": {"Header": [{"Name": "x-canary", "Exact": "1"}]}}, "Destination": {"ServiceSubset": "canary"}},
            {"Match": {"HTTP": {"PathPrefix": "/flaky"}}, "Destination": {"ServiceSubset": "flaky", "NumRetries": 2, "RetryOnStatusCodes": [503]}},
            {"Match": {"HTTP": {"PathExact": "/slow"}}, "Destination": {"RequestTimeout": "500ms"}}
        ]}),
    )
    .await;
    config(
        &c,
        json!({"Kind": "service-resolver", "Name": "rpc", "Subsets": {
            "a": {"Filter": "Service.Meta.version == a"}, "b": {"Filter": "Service.Meta.version == b"}
        }}),
    )
    .await;
    config(
        &c,
        json!({"Kind": "service-router", "Name": "rpc", "Routes": [
            {"Match": {"HTTP": {"PathExact": "/echo.Echo/Hello"}}, "Destination": {"ServiceSubset": "a"}},
            {"Match": {"HTTP": {"PathExact": "/echo.Echo/Bye"}}, "Destination": {"ServiceSubset": "b"}}
        ]}),
    )
    .await;

    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let base = format!("http://{ip}:19301");
    let get = |path: &str, canary: bool| {
        let mut r = http.get(format!("{base}{path}"));
        if canary {
            r = r.header("x-canary", "1");
        }
        async move {
            let r = r.send().await.map_err(|e| e.to_string())?;
            let status = r.status().as_u16();
            Ok::<_, String>((status, r.text().await.unwrap_or_default()))
        }
    };
    // Every instance reachable through the chain before measuring.
    for (canary, want) in [(false, "v1 /"), (true, "canary /")] {
        eventually(&format!("{want} through the chain"), SOON, || async {
            get("/", canary).await.ok().filter(|(s, b)| *s == 200 && b == want).map(|_| ())
        })
        .await;
    }
    eventually("v2 through the split", SOON, || async {
        for _ in 0..50 {
            if get("/", false).await.ok().is_some_and(|(_, b)| b == "v2 /") {
                return Some(());
            }
        }
        None
    })
    .await;

    // The 90/10 split.
    let mut v2 = 0;
    for _ in 0..1000 {
        let (status, body) = get("/", false).await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body == "v1 /" || body == "v2 /", "{body}");
        if body == "v2 /" {
            v2 += 1;
        }
    }
    eprintln!("1000 requests: {v2} to v2");
    assert!((70..=130).contains(&v2), "{v2} of 1000 requests went to v2 (want 100 ± 30)");

    // Header routing to the canary subset only.
    for _ in 0..20 {
        assert_eq!(get("/c", true).await.unwrap(), (200, "canary /c".to_string()));
    }
    // Retries mask an instance failing one request in three.
    for i in 0..30 {
        let (status, body) = get("/flaky", false).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "flaky /flaky"), "request {i}");
    }
    let metrics = c.http.get(format!("{}/v1/agent/metrics?format=prometheus", c.servers[0].http())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("trellis_proxy_upstream_retries_total{proxy=\"web-sidecar-proxy\",upstream=\"api\"}"), "{metrics}");
    assert!(metrics.contains("trellis_proxy_upstream_request_duration_ms_bucket{proxy=\"web-sidecar-proxy\",upstream=\"api\",le=\"+Inf\"}"));
    // The route's timeout.
    let started = std::time::Instant::now();
    let (status, _) = get("/slow", false).await.unwrap();
    assert_eq!(status, 504);
    assert!(started.elapsed() < Duration::from_secs(2), "the timeout did not cut the request short");

    // L7 intentions: /admin denied for web, everything else allowed.
    config(
        &c,
        json!({"Kind": "service-intentions", "Name": "api", "Sources": [
            {"Name": "web", "Permissions": [
                {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
                {"Action": "allow", "HTTP": {"PathPrefix": "/"}}
            ]}
        ]}),
    )
    .await;
    eventually("/admin to be denied", SOON, || async { (get("/admin/x", false).await.ok()?.0 == 403).then_some(()) }).await;
    for _ in 0..10 {
        let (status, body) = get("/public", false).await.unwrap();
        assert!(status == 200 && (body == "v1 /public" || body == "v2 /public"), "{status} {body}");
    }

    // gRPC by method.
    let rpc: SocketAddr = format!("{ip}:19302").parse().unwrap();
    for (method, want) in [("/echo.Echo/Hello", "rpc-a"), ("/echo.Echo/Bye", "rpc-b")] {
        let backend = eventually(&format!("gRPC {method}"), SOON, || async { grpc_call(rpc, method).await.ok() }).await;
        assert_eq!(backend, want, "{method}");
    }
}

/// What this test does: `cache` has three instances; its resolver balances by
/// - ring hash on header `x-user`: every request of one user lands on one instance, and
///   twenty users are spread over more than one;
/// - maglev on cookie `sticky` (TTL 60 s): a request without it gets a `Set-Cookie`, and the
///   requests that carry it back all land on one instance;
/// - least request: every instance is used (a policy change applies without restarts).
#[tokio::test(flavor = "multi_thread")]
async fn resolver_load_balancer_pins_requests_by_hash() {
    let c = Cluster::start(1).await;
    let ip = c.servers[0].ip.clone();
    for name in ["c1", "c2", "c3"] {
        let port = backend(name, Behaviour::default()).await;
        register(&c, json!({"ID": format!("cache-{name}"), "Name": "cache", "Port": port, "Connect": {"SidecarService": {}}})).await;
    }
    register(
        &c,
        json!({"Name": "shop", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "cache", "LocalBindAddress": ip, "LocalBindPort": 19303}
        ]}}}}),
    )
    .await;
    config(&c, json!({"Kind": "service-defaults", "Name": "cache", "Protocol": "http"})).await;
    config(
        &c,
        json!({"Kind": "service-resolver", "Name": "cache", "LoadBalancer": {"Policy": "ring_hash",
            "RingHashConfig": {"MinimumRingSize": 1024}, "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}}),
    )
    .await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let url = format!("http://{ip}:19303/");
    let backend_of = |r: reqwest::Response| r.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    // All three instances known to the sidecar (requests without the header go anywhere).
    eventually("every cache instance reachable", SOON, || async {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..60 {
            let r = http.get(&url).header("x-user", format!("warm-{i}")).send().await.ok()?;
            seen.insert(backend_of(r));
        }
        (seen.len() == 3).then_some(())
    })
    .await;
    // The resolver reaches the sidecar through its own blocking query, after the write: wait
    // until one user's ten requests all land on one instance (round robin over three never
    // does that), so that what follows measures the ring hash, not the policy before it.
    eventually("the ring hash policy in effect at the sidecar", SOON, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = http.get(&url).header("x-user", "probe").send().await.ok()?;
            seen.insert(backend_of(r));
        }
        (seen.len() == 1).then_some(())
    })
    .await;
    let mut users = std::collections::BTreeSet::new();
    for u in 0..20 {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = http.get(&url).header("x-user", format!("user-{u}")).send().await.unwrap();
            assert_eq!(r.status(), 200);
            seen.insert(backend_of(r));
        }
        assert_eq!(seen.len(), 1, "user-{u} was served by {seen:?}");
        users.extend(seen);
    }
    assert!(users.len() > 1, "twenty users all hashed to {users:?}");

    // Maglev on a generated cookie.
    config(
        &c,
        json!({"Kind": "service-resolver", "Name": "cache", "LoadBalancer": {"Policy": "maglev",
            "HashPolicies": [{"Field": "cookie", "FieldValue": "sticky", "CookieConfig": {"TTL": "60s", "Path": "/"}}]}}),
    )
    .await;
    let cookie = eventually("a generated sticky cookie", SOON, || async {
        let r = http.get(&url).send().await.ok()?;
        let c = r.headers().get("set-cookie")?.to_str().ok()?.to_string();
        c.starts_with("sticky=").then_some(c)
    })
    .await;
    assert!(cookie.contains("Max-Age=60") && cookie.contains("Path=/"), "{cookie}");
    let value = cookie.split(';').next().unwrap().to_string();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = http.get(&url).header("cookie", format!("theme=dark; {value}")).send().await.unwrap();
        assert!(r.headers().get("set-cookie").is_none(), "a cookie was set again");
        seen.insert(backend_of(r));
    }
    assert_eq!(seen.len(), 1, "{value} was served by {seen:?}");

    // Least request: with no request in flight, the choice is spread over all instances.
    config(&c, json!({"Kind": "service-resolver", "Name": "cache", "LoadBalancer": {"Policy": "least_request"}})).await;
    eventually("least request spreading over every instance", SOON, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..60 {
            let r = http.get(&url).header("cookie", value.clone()).send().await.ok()?;
            seen.insert(backend_of(r));
        }
        (seen.len() == 3).then_some(())
    })
    .await;
}

/// One unary gRPC call over h2c; returns the `x-backend` that answered (with grpc-status 0).
async fn grpc_call(addr: SocketAddr, method: &str) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    const MSG: [u8; 5] = [0, 0, 0, 0, 0];
    let req = http::Request::post(format!("http://rpc{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(&MSG)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let backend = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let collected = resp.into_body().collect().await.map_err(|e| e.to_string())?;
    let status = collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).unwrap_or("missing").to_string();
    if status != "0" {
        return Err(format!("grpc-status {status}"));
    }
    Ok(backend)
}
