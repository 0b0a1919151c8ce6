//! Tests of the probes against real servers on 127.0.0.1 (HTTP/1.1, TLS, gRPC and HTTP/2 servers
//! written with tokio, tokio-rustls and h2), driven through `CheckRunner` as the agent drives
//! them. Every wait is on the update channel with a deadline, never a sleep.

use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::super::{CheckDefinition, CheckHandle, CheckRunner, CheckTls, CheckUpdate, RunnerOptions, Status};
use super::{AbortOnDrop, Io, TailBuffer, decode_health_response, grpc_frame};

/// Deadline for any one expected update: generous, since CI machines can be slow.
const WAIT: Duration = Duration::from_secs(20);

fn fast_opts() -> RunnerOptions {
    RunnerOptions {
        enable_script_checks: true,
        min_interval: Duration::from_millis(1),
        max_initial_stagger: Duration::ZERO,
        ..RunnerOptions::default()
    }
}

fn start(json: &str, opts: RunnerOptions) -> (CheckHandle, mpsc::Receiver<CheckUpdate>) {
    let def: CheckDefinition = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    let kind = def.kind().unwrap();
    let (tx, rx) = mpsc::channel(64);
    let handle = CheckRunner::spawn("probe".into(), def, kind, opts, tx, CancellationToken::new()).unwrap();
    (handle, rx)
}

async fn next(rx: &mut mpsc::Receiver<CheckUpdate>) -> CheckUpdate {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("no check update in time").expect("the runner closed the channel")
}

async fn expect(rx: &mut mpsc::Receiver<CheckUpdate>, status: Status) -> CheckUpdate {
    let update = next(rx).await;
    assert_eq!(update.status, status, "unexpected update {update:?}");
    assert_eq!(update.check_id, "probe");
    update
}

fn test_cert(name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    (ck.cert.der().clone(), PrivateKeyDer::Pkcs8(key))
}

fn acceptor(name: &str, alpn: &[&[u8]]) -> (TlsAcceptor, CertificateDer<'static>) {
    let (cert, key) = test_cert(name);
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (TlsAcceptor::from(Arc::new(config)), cert)
}

fn trusting(cert: CertificateDer<'static>) -> CheckTls {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    CheckTls { roots: Some(Arc::new(roots)), client_cert: None }
}

async fn accept_io(tcp: tokio::net::TcpStream, tls: Option<&TlsAcceptor>) -> Option<Box<dyn Io>> {
    match tls {
        None => Some(Box::new(tcp)),
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(stream) => Some(Box::new(stream)),
            Err(_) => None,
        },
    }
}

/// What the HTTP test server saw, and the status code it answered.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    answered: u16,
}

struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    body: Arc<Mutex<String>>,
    seen: mpsc::UnboundedReceiver<Seen>,
    _task: AbortOnDrop,
}

/// HTTP/1.1 server: `/redirect` redirects (302) to `/ok`, which answers 200 "redirected";
/// `/see-other` (303) and `/temporary` (307) redirect to `/echo`, which answers the method and
/// body it got; `/loop` redirects to itself and `/hang` never answers. Any other path answers the
/// current `status` and `body`.
async fn http_server(tls: Option<TlsAcceptor>) -> HttpServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(200));
    let body = Arc::new(Mutex::new("hello".to_string()));
    let (tx, seen) = mpsc::unbounded_channel();
    let (status2, body2) = (status.clone(), body.clone());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (status, body, tx, tls) = (status2.clone(), body2.clone(), tx.clone(), tls.clone());
            tokio::spawn(async move {
                if let Some(io) = accept_io(tcp, tls.as_ref()).await {
                    let _ = serve_http1(io, &status, &body, &tx).await;
                }
            });
        }
    });
    HttpServer { addr, status, body, seen, _task: AbortOnDrop(task) }
}

async fn serve_http1(mut io: Box<dyn Io>, status: &AtomicU16, body: &Mutex<String>, seen: &mpsc::UnboundedSender<Seen>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let path = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let len: usize = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_body = String::from_utf8_lossy(&buf[head_end..(head_end + len).min(buf.len())]);
    let (code, location, text) = match path.as_str() {
        "/redirect" => (302, Some("/ok"), String::new()),
        "/ok" => (200, None, "redirected".to_string()),
        "/see-other" => (303, Some("/echo"), String::new()),
        "/temporary" => (307, Some("/echo"), String::new()),
        "/loop" => (302, Some("/loop"), String::new()),
        "/echo" => (200, None, format!("{method} {request_body}")),
        "/hang" => std::future::pending().await,
        _ => (status.load(Ordering::SeqCst), None, body.lock().clone()),
    };
    let _ = seen.send(Seen { method, path, headers, body: request_body.into_owned(), answered: code });
    let reason = hyper::StatusCode::from_u16(code).ok().and_then(|c| c.canonical_reason()).unwrap_or("");
    let mut response = format!("HTTP/1.1 {code} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", text.len());
    if let Some(location) = location {
        response.push_str(&format!("Location: {location}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&text);
    io.write_all(response.as_bytes()).await?;
    io.shutdown().await
}

/// A TCP listener that accepts and drops connections until the guard is dropped.
async fn tcp_listener(addr: &str) -> (SocketAddr, AbortOnDrop) {
    let deadline = tokio::time::Instant::now() + WAIT;
    let listener = loop {
        // Re-binding a port just released can race the old listener's teardown.
        match TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("binding {addr}: {e}"),
        }
    };
    let local = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    (local, AbortOnDrop(task))
}

async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn http_check_flips_between_passing_warning_and_critical_with_the_response_code() {
    let server = http_server(None).await;
    let url = format!("http://{}/health", server.addr);
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "20ms"}}"#), fast_opts());
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("HTTP GET {url}: 200 OK Output: hello"));

    server.status.store(503, Ordering::SeqCst);
    let down = expect(&mut rx, Status::Critical).await;
    assert_eq!(down.output, format!("HTTP GET {url}: 503 Service Unavailable Output: hello"));

    server.status.store(429, Ordering::SeqCst);
    let busy = expect(&mut rx, Status::Warning).await;
    assert_eq!(busy.output, format!("HTTP GET {url}: 429 Too Many Requests Output: hello"));

    *server.body.lock() = "back".into();
    server.status.store(201, Ordering::SeqCst);
    let back = expect(&mut rx, Status::Passing).await;
    assert_eq!(back.output, format!("HTTP GET {url}: 201 Created Output: back"));
}

#[tokio::test]
async fn http_check_sends_the_method_headers_and_body_of_its_definition() {
    let mut server = http_server(None).await;
    let url = format!("http://{}/rpc", server.addr);
    let (_check, mut rx) = start(
        &format!(
            r#"{{"HTTP": "{url}", "Method": "POST", "Interval": "1h",
                 "Header": {{"X-Check": ["a", "b"], "Content-Type": ["application/json"]}},
                 "Body": "{{\"method\":\"health\"}}"}}"#
        ),
        fast_opts(),
    );
    let update = expect(&mut rx, Status::Passing).await;
    assert!(update.output.starts_with(&format!("HTTP POST {url}: 200 OK")));
    let seen = server.seen.recv().await.unwrap();
    assert_eq!((seen.method.as_str(), seen.path.as_str()), ("POST", "/rpc"));
    assert_eq!(seen.body, r#"{"method":"health"}"#);
    let values = |name: &str| -> Vec<&str> { seen.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str()).collect() };
    assert_eq!(values("x-check"), ["a", "b"]);
    assert_eq!(values("content-type"), ["application/json"]);
    assert_eq!(values("user-agent"), ["Consul Health Check"]);
    assert_eq!(values("accept"), ["text/plain, text/*, */*"]);

    let (_custom, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Header": {{"User-Agent": ["probe/1"]}}}}"#), fast_opts());
    expect(&mut rx, Status::Passing).await;
    let seen = server.seen.recv().await.unwrap();
    assert_eq!(seen.method, "GET");
    assert!(seen.body.is_empty());
    assert!(seen.headers.contains(&("user-agent".into(), "probe/1".into())));
}

#[tokio::test]
async fn http_output_keeps_the_last_output_max_size_bytes_of_the_body() {
    let server = http_server(None).await;
    *server.body.lock() = format!("{}END", "a".repeat(5000));
    let url = format!("http://{}/", server.addr);
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "OutputMaxSize": 100}}"#), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    let body = update.output.strip_prefix(&format!("HTTP GET {url}: 200 OK Output: ")).unwrap();
    assert_eq!(body, format!("{}END", "a".repeat(97)));

    // The agent-wide cap applies when the check sets none.
    let opts = RunnerOptions { output_max_size: 10, ..fast_opts() };
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h"}}"#), opts);
    let update = expect(&mut rx, Status::Passing).await;
    assert!(update.output.ends_with("Output: aaaaaaaEND"), "{}", update.output);
}

#[tokio::test]
async fn http_check_follows_redirects_unless_they_are_disabled() {
    let server = http_server(None).await;
    let url = format!("http://{}/redirect", server.addr);
    let (_follow, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h"}}"#), fast_opts());
    let followed = expect(&mut rx, Status::Passing).await;
    assert_eq!(followed.output, format!("HTTP GET {url}: 200 OK Output: redirected"));

    let (_stay, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "DisableRedirects": true}}"#), fast_opts());
    let stayed = expect(&mut rx, Status::Critical).await;
    assert_eq!(stayed.output, format!("HTTP GET {url}: 302 Found Output: "));
}

#[tokio::test]
async fn http_redirects_keep_or_drop_the_method_and_body_as_go_does() {
    let server = http_server(None).await;
    let base = format!("http://{}", server.addr);
    let post = |path: &str| format!(r#"{{"HTTP": "{base}{path}", "Method": "POST", "Body": "ping", "Interval": "1h"}}"#);
    let (_temporary, mut rx) = start(&post("/temporary"), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("HTTP POST {base}/temporary: 200 OK Output: POST ping"));

    let (_see_other, mut rx) = start(&post("/see-other"), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("HTTP POST {base}/see-other: 200 OK Output: GET "));

    let (_loop, mut rx) = start(&format!(r#"{{"HTTP": "{base}/loop", "Interval": "1h", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert_eq!(update.output, format!("Get \"{base}/loop\": stopped after 10 redirects"));
}

#[tokio::test]
async fn http_check_sends_a_host_header_override() {
    let mut server = http_server(None).await;
    let url = format!("http://{}/", server.addr);
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Header": {{"Host": ["svc.internal"]}}}}"#), fast_opts());
    expect(&mut rx, Status::Passing).await;
    let seen = server.seen.recv().await.unwrap();
    assert!(seen.headers.contains(&("host".into(), "svc.internal".into())), "{:?}", seen.headers);
}

#[tokio::test]
async fn http_check_times_out_as_critical() {
    let server = http_server(None).await;
    let url = format!("http://{}/hang", server.addr);
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Timeout": "200ms", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert_eq!(update.output, format!("Get \"{url}\": timed out after 200ms"));
}

#[tokio::test]
async fn http_check_against_a_closed_port_is_critical() {
    let url = format!("http://{}/health", closed_port().await);
    let (_check, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.starts_with(&format!("Get \"{url}\": ")), "{}", update.output);
    assert!(update.output.contains("refused"), "{}", update.output);
}

#[tokio::test]
async fn https_check_with_tls_skip_verify_accepts_a_self_signed_certificate() {
    let (tls, _cert) = acceptor("checks.test", &[b"http/1.1"]);
    let server = http_server(Some(tls)).await;
    let url = format!("https://{}/health", server.addr);
    let (_skip, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "TLSSkipVerify": true}}"#), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("HTTP GET {url}: 200 OK Output: hello"));

    let (_verify, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.contains("certificate"), "{}", update.output);
}

#[tokio::test]
async fn https_check_verifies_against_the_agent_roots_and_tls_server_name() {
    let (tls, cert) = acceptor("checks.test", &[b"http/1.1"]);
    let server = http_server(Some(tls)).await;
    let url = format!("https://{}/health", server.addr);
    let opts = RunnerOptions { tls: trusting(cert), ..fast_opts() };
    let (_named, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "TLSServerName": "checks.test"}}"#), opts.clone());
    expect(&mut rx, Status::Passing).await;

    // The certificate does not name 127.0.0.1, so without TLSServerName it is refused.
    let (_unnamed, mut rx) = start(&format!(r#"{{"HTTP": "{url}", "Interval": "1h", "Status": "passing"}}"#), opts);
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.contains("certificate"), "{}", update.output);
}

#[tokio::test]
async fn https_check_presents_the_agent_client_certificate() {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (client_cert, client_key) = test_cert("agent.test");
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots.add(client_cert.clone()).unwrap();
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider.clone()).build().unwrap();
    let (server_cert, server_key) = test_cert("checks.test");
    let config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![server_cert], server_key)
        .unwrap();
    let server = http_server(Some(TlsAcceptor::from(Arc::new(config)))).await;
    let check = format!(r#"{{"HTTP": "https://{}/", "Interval": "1h", "TLSSkipVerify": true, "Status": "passing"}}"#, server.addr);

    let key = rustls::sign::CertifiedKey::from_der(vec![client_cert], client_key, &provider).unwrap();
    let opts = RunnerOptions { tls: CheckTls { roots: None, client_cert: Some(Arc::new(key)) }, ..fast_opts() };
    let (_with_cert, mut rx) = start(&check, opts);
    let update = next(&mut rx).await;
    assert_eq!(update.status, Status::Passing, "{update:?}");
    assert!(update.output.ends_with("200 OK Output: hello"), "{}", update.output);

    let (_without, mut rx) = start(&check, fast_opts());
    expect(&mut rx, Status::Critical).await;
}

#[tokio::test]
async fn tcp_check_flips_between_passing_and_critical() {
    let (addr, listener) = tcp_listener("127.0.0.1:0").await;
    let (_check, mut rx) = start(&format!(r#"{{"TCP": "{addr}", "Interval": "20ms"}}"#), fast_opts());
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("TCP connect {addr}: Success"));

    drop(listener);
    let down = expect(&mut rx, Status::Critical).await;
    assert!(down.output.starts_with(&format!("dial tcp {addr}: ")) && down.output.contains("refused"), "{}", down.output);

    let (_, _listener) = tcp_listener(&addr.to_string()).await;
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("TCP connect {addr}: Success"));
}

#[tokio::test]
async fn tcp_check_with_tls_completes_a_handshake() {
    let (tls, cert) = acceptor("checks.test", &[]);
    let server = http_server(Some(tls)).await;
    let addr = server.addr;
    let (_skip, mut rx) = start(&format!(r#"{{"TCP": "{addr}", "TCPUseTLS": true, "TLSSkipVerify": true, "Interval": "1h"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("TCP+TLS connect {addr}: Success"));

    let opts = RunnerOptions { tls: trusting(cert), ..fast_opts() };
    let (_wrong_name, mut rx) = start(
        &format!(
            r#"{{"TCP": "{addr}", "TCPUseTLS": true, "TLSServerName": "other.test",
                 "Interval": "1h", "Status": "passing"}}"#
        ),
        opts,
    );
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.contains("tls handshake"), "{}", update.output);
}

#[tokio::test]
async fn udp_check_passes_on_silence_and_fails_on_port_unreachable() {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (_check, mut rx) = start(&format!(r#"{{"UDP": "{addr}", "Interval": "20ms", "Timeout": "100ms"}}"#), fast_opts());
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("UDP connect {addr}: Success"));

    drop(socket);
    let down = expect(&mut rx, Status::Critical).await;
    assert!(down.output.starts_with("read udp ") && down.output.contains("refused"), "{}", down.output);

    let _socket = UdpSocket::bind(addr).await.unwrap();
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("UDP connect {addr}: Success"));
}

struct GrpcServer {
    addr: SocketAddr,
    serving: Arc<AtomicU64>,
    services: mpsc::UnboundedReceiver<String>,
    _task: AbortOnDrop,
}

/// gRPC health server over HTTP/2: answers the current `serving` status, or NotFound (as a
/// trailers-only response) for the service "missing".
async fn grpc_server(tls: Option<TlsAcceptor>) -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = Arc::new(AtomicU64::new(1));
    let (tx, services) = mpsc::unbounded_channel();
    let serving2 = serving.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (serving, tx, tls) = (serving2.clone(), tx.clone(), tls.clone());
            tokio::spawn(async move {
                let Some(io) = accept_io(tcp, tls.as_ref()).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(io).await else {
                    return;
                };
                while let Some(Ok((request, respond))) = conn.accept().await {
                    tokio::spawn(answer_health(request, respond, serving.clone(), tx.clone()));
                }
            });
        }
    });
    GrpcServer { addr, serving, services, _task: AbortOnDrop(task) }
}

async fn answer_health(
    request: hyper::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    serving: Arc<AtomicU64>,
    services: mpsc::UnboundedSender<String>,
) {
    assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
    assert_eq!(request.headers()["content-type"], "application/grpc");
    let mut body = request.into_body();
    let mut data = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    // HealthCheckRequest: optional field 1 (string), short enough for a one-byte length.
    let service = match data.get(5..) {
        Some([0x0a, len, rest @ ..]) => String::from_utf8_lossy(&rest[..*len as usize]).into_owned(),
        _ => String::new(),
    };
    let _ = services.send(service.clone());
    let builder = hyper::Response::builder().status(200).header("content-type", "application/grpc");
    if service == "missing" {
        let response = builder.header("grpc-status", "5").header("grpc-message", "unknown%20service").body(()).unwrap();
        let _ = respond.send_response(response, true);
        return;
    }
    let Ok(mut stream) = respond.send_response(builder.body(()).unwrap(), false) else {
        return;
    };
    let status = serving.load(Ordering::SeqCst) as u8;
    let _ = stream.send_data(grpc_frame(&[0x08, status]), false);
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let _ = stream.send_trailers(trailers);
}

#[tokio::test]
async fn grpc_check_follows_the_serving_status() {
    let mut server = grpc_server(None).await;
    let target = format!("{}/web", server.addr);
    let (_check, mut rx) = start(&format!(r#"{{"GRPC": "{target}", "Interval": "20ms"}}"#), fast_opts());
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, format!("gRPC check {target}: success"));
    assert_eq!(server.services.recv().await.unwrap(), "web");

    server.serving.store(2, Ordering::SeqCst);
    let down = expect(&mut rx, Status::Critical).await;
    assert_eq!(down.output, format!("gRPC {target} serving status: NOT_SERVING"));

    server.serving.store(1, Ordering::SeqCst);
    expect(&mut rx, Status::Passing).await;
}

#[tokio::test]
async fn grpc_check_reports_rpc_errors_and_unreachable_servers() {
    let server = grpc_server(None).await;
    let (_missing, mut rx) = start(&format!(r#"{{"GRPC": "{}/missing", "Interval": "1h", "Status": "passing"}}"#, server.addr), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert_eq!(update.output, "rpc error: code = NotFound desc = unknown service");

    let closed = closed_port().await;
    let (_closed, mut rx) = start(&format!(r#"{{"GRPC": "{closed}", "Interval": "1h", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.starts_with(&format!("rpc error: code = Unavailable desc = connection error: dial tcp {closed}: ")), "{}", update.output);
}

#[tokio::test]
async fn grpc_check_over_tls_asks_about_the_whole_server() {
    let (tls, _cert) = acceptor("checks.test", &[b"h2"]);
    let mut server = grpc_server(Some(tls)).await;
    let addr = server.addr;
    let (_check, mut rx) = start(&format!(r#"{{"GRPC": "{addr}", "GRPCUseTLS": true, "TLSSkipVerify": true, "Interval": "1h"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("gRPC check {addr}: success"));
    assert_eq!(server.services.recv().await.unwrap(), "");
}

struct H2Server {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

/// HTTP/2 server that answers pings while `healthy`, and otherwise drops connections at once.
async fn h2_server(tls: Option<TlsAcceptor>) -> H2Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let healthy = Arc::new(AtomicBool::new(true));
    let healthy2 = healthy.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if !healthy2.load(Ordering::SeqCst) {
                drop(tcp);
                continue;
            }
            let tls = tls.clone();
            tokio::spawn(async move {
                let Some(io) = accept_io(tcp, tls.as_ref()).await else {
                    return;
                };
                if let Ok(mut conn) = h2::server::handshake(io).await {
                    while conn.accept().await.is_some() {}
                }
            });
        }
    });
    H2Server { addr, healthy, _task: AbortOnDrop(task) }
}

#[tokio::test]
async fn h2ping_check_flips_between_passing_and_critical() {
    let server = h2_server(None).await;
    let (_check, mut rx) =
        start(&format!(r#"{{"H2PING": "{}", "H2PingUseTLS": false, "Interval": "20ms", "Timeout": "2s"}}"#, server.addr), fast_opts());
    let up = expect(&mut rx, Status::Passing).await;
    assert_eq!(up.output, "HTTP2 ping was successful");

    server.healthy.store(false, Ordering::SeqCst);
    let down = expect(&mut rx, Status::Critical).await;
    assert!(down.output.starts_with("HTTP2 ping failed") || down.output.starts_with("Failed to create"), "{}", down.output);

    server.healthy.store(true, Ordering::SeqCst);
    expect(&mut rx, Status::Passing).await;
}

#[tokio::test]
async fn h2ping_check_uses_tls_unless_told_otherwise() {
    let (tls, _cert) = acceptor("checks.test", &[b"h2"]);
    let secure = h2_server(Some(tls)).await;
    let (_check, mut rx) = start(&format!(r#"{{"H2PING": "{}", "TLSSkipVerify": true, "Interval": "1h"}}"#, secure.addr), fast_opts());
    expect(&mut rx, Status::Passing).await;

    let plain = h2_server(None).await;
    let (_check, mut rx) = start(
        &format!(
            r#"{{"H2PING": "{}", "TLSSkipVerify": true, "Interval": "1h", "Timeout": "2s",
                 "Status": "passing"}}"#,
            plain.addr
        ),
        fast_opts(),
    );
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.starts_with(&format!("Failed to dial to {}: ", plain.addr)), "{}", update.output);

    let closed = closed_port().await;
    let (_check, mut rx) = start(&format!(r#"{{"H2PING": "{closed}", "Interval": "1h", "Status": "passing"}}"#), fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.contains("refused"), "{}", update.output);
}

fn scratch_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("trellis-checks-{}-{name}", std::process::id()))
}

#[tokio::test]
async fn script_exit_codes_map_to_passing_warning_and_critical() {
    let code = scratch_file("exit-code");
    std::fs::write(&code, "0").unwrap();
    let script = format!("echo out; echo err >&2; exit $(cat {})", code.display());
    let (_check, mut rx) = start(&serde_json::json!({"Args": ["sh", "-c", script], "Interval": "20ms"}).to_string(), fast_opts());
    let passing = expect(&mut rx, Status::Passing).await;
    assert!(passing.output.contains("out\n") && passing.output.contains("err\n"), "{:?}", passing.output);
    std::fs::write(&code, "1").unwrap();
    expect(&mut rx, Status::Warning).await;
    std::fs::write(&code, "2").unwrap();
    expect(&mut rx, Status::Critical).await;
    std::fs::write(&code, "0").unwrap();
    expect(&mut rx, Status::Passing).await;
    let _ = std::fs::remove_file(&code);
}

#[tokio::test]
async fn script_is_killed_and_critical_after_its_timeout() {
    let started = tokio::time::Instant::now();
    let (_check, mut rx) = start(
        r#"{"Args": ["sh", "-c", "echo started; sleep 30; echo never"], "Interval": "1h",
            "Timeout": "2s", "Status": "passing"}"#,
        fast_opts(),
    );
    let update = expect(&mut rx, Status::Critical).await;
    assert_eq!(update.output, "Timed out (2s) running check\n\nstarted\n");
    assert!(started.elapsed() < Duration::from_secs(10), "the script was not killed");
}

#[tokio::test]
async fn script_output_is_truncated_with_a_capture_note() {
    let (_check, mut rx) = start(
        r#"{"Args": ["sh", "-c", "head -c 5000 /dev/zero | tr '\\000' a; printf END"],
            "Interval": "1h", "OutputMaxSize": 100}"#,
        fast_opts(),
    );
    let update = expect(&mut rx, Status::Passing).await;
    assert_eq!(update.output, format!("Captured 100 of 5003 bytes\n...\n{}END", "a".repeat(97)));
}

#[tokio::test]
async fn script_that_cannot_start_is_critical() {
    let (_check, mut rx) = start(r#"{"Args": ["/nonexistent/check-script"], "Interval": "1h", "Status": "passing"}"#, fast_opts());
    let update = expect(&mut rx, Status::Critical).await;
    assert!(update.output.starts_with("Failed to run check \"/nonexistent/check-script\": "), "{}", update.output);
}

#[tokio::test]
async fn unchanged_results_are_not_sent_again() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    let _server = AbortOnDrop(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
            let _ = accepted_tx.send(());
        }
    }));
    let (_check, mut rx) = start(&format!(r#"{{"TCP": "{addr}", "Interval": "10ms"}}"#), fast_opts());
    expect(&mut rx, Status::Passing).await;
    for _ in 0..5 {
        tokio::time::timeout(WAIT, accepted.recv()).await.unwrap();
    }
    assert!(rx.try_recv().is_err(), "five identical probes sent one update");
}

/// Responses answered with `code` among what the server has seen so far.
fn answered(server: &mut HttpServer, code: u16) -> usize {
    std::iter::from_fn(|| server.seen.try_recv().ok()).filter(|s| s.answered == code).count()
}

#[tokio::test]
async fn thresholds_hold_flips_back_until_enough_consecutive_results() {
    let mut server = http_server(None).await;
    let url = format!("http://{}/", server.addr);
    let (_check, mut rx) = start(
        &format!(
            r#"{{"HTTP": "{url}", "Interval": "10ms", "SuccessBeforePassing": 2,
                 "FailuresBeforeCritical": 3}}"#
        ),
        fast_opts(),
    );
    expect(&mut rx, Status::Passing).await;
    answered(&mut server, 200);

    server.status.store(500, Ordering::SeqCst);
    expect(&mut rx, Status::Critical).await;
    assert!(answered(&mut server, 500) >= 3, "critical before three failures");

    server.status.store(200, Ordering::SeqCst);
    expect(&mut rx, Status::Passing).await;
    assert!(answered(&mut server, 200) >= 2, "passing before two successes");
}

#[tokio::test]
async fn failures_before_warning_turns_the_check_warning_first() {
    let mut server = http_server(None).await;
    let url = format!("http://{}/", server.addr);
    let (_check, mut rx) = start(
        &format!(
            r#"{{"HTTP": "{url}", "Interval": "10ms", "FailuresBeforeWarning": 1,
                 "FailuresBeforeCritical": 4}}"#
        ),
        fast_opts(),
    );
    expect(&mut rx, Status::Passing).await;
    answered(&mut server, 200);
    server.status.store(500, Ordering::SeqCst);
    let warning = expect(&mut rx, Status::Warning).await;
    assert!(warning.output.contains(": 500 Internal Server Error Output: "));
    expect(&mut rx, Status::Critical).await;
    assert!(answered(&mut server, 500) >= 4);
}

#[test]
fn tail_buffer_keeps_the_last_bytes_and_counts_all() {
    let mut tail = TailBuffer::new(4);
    tail.write(b"ab");
    assert_eq!(tail.text_with_capture_note(), "ab");
    tail.write(b"cdef");
    tail.write(b"g");
    assert_eq!(tail.text(), "defg");
    assert_eq!(tail.text_with_capture_note(), "Captured 4 of 7 bytes\n...\ndefg");
    tail.write(b"0123456789");
    assert_eq!(tail.text(), "6789");
}

#[test]
fn health_responses_decode_with_unknown_fields_skipped() {
    assert_eq!(decode_health_response(&grpc_frame(&[0x08, 0x01])), Ok(1));
    assert_eq!(decode_health_response(&grpc_frame(&[])), Ok(0));
    // Field 2 (length-delimited "hi") before field 1.
    assert_eq!(decode_health_response(&grpc_frame(&[0x12, 0x02, b'h', b'i', 0x08, 0x02])), Ok(2));
    assert!(decode_health_response(&[0, 0, 0]).is_err());
    assert!(decode_health_response(&grpc_frame(&[0x08])).is_err());
}
