//! Blocking-query fan-out and shared reads, whole system, against references in the same run.
//!
//! Run with `benches/watch_fanout.sh` (it builds the release binary and installs wrk), or
//! `cargo bench --bench watch_fanout -- [--nodes N] [--watchers 1000,10000] [--rounds R]`.
//!
//! Fan-out: a `trellis agent --dev` server is filled with `nodes` x 10 service instances
//! (Consul's scale-test shape), a small service `watched` gets 3 instances, and W watchers
//! park on `GET /v1/health/service/watched?index=N&wait=60s` over real TCP connections (spread
//! over several 127.0.0.x source addresses). Then one instance of `watched` is registered,
//! and the benchmark reports the write's latency, each watcher's delay from the write's
//! acknowledgement to its full answer (p50, p99, max), the server's CPU time for the change,
//! and its memory per parked watcher. A write to another service first checks that it wakes
//! none of them. A probe on a thread of its own registers instances of a service nobody
//! watches, one every 5 ms: for 0.5 s before the watchers park, for 0.5 s while they are all
//! parked, and while they are being answered; the benchmark reports those writes' p99 in each
//! phase (whether writes slow down with many watchers parked, or while they are answered). The same load runs against `benches/ref/blocking_ref.py`, a single-threaded
//! asyncio stand-in with no Raft, in the same run.
//!
//! Reads: wrk against `GET /v1/health/service/watched` (non-blocking) and against a bare axum
//! handler that returns the very same bytes, interleaved, and the ratio of their rates.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Opts {
    nodes: usize,
    watchers: Vec<usize>,
    rounds: usize,
    wrk_seconds: u64,
}

fn opts() -> Opts {
    let mut o = Opts { nodes: 10_000, watchers: vec![1000, 10_000], rounds: 3, wrk_seconds: 10 };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--nodes" => o.nodes = v.parse().expect("--nodes N"),
            "--watchers" => o.watchers = v.split(',').map(|w| w.parse().expect("--watchers 1000,10000")).collect(),
            "--rounds" => o.rounds = v.parse().expect("--rounds R"),
            "--wrk-seconds" => o.wrk_seconds = v.parse().expect("--wrk-seconds S"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// A server under test: its process and where it listens.
struct Target {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn start_trellis(port: u16) -> Target {
    let bin = std::env::var("TRELLIS_BIN").map(PathBuf::from).unwrap_or_else(|_| repo().join("target/release/trellis"));
    assert!(bin.exists(), "no release binary at {}: run `cargo build --release` (or set TRELLIS_BIN)", bin.display());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bench.json");
    std::fs::write(&cfg, r#"{"limits": {"http_max_conns_per_client": 0, "http_max_blocking_queries": 200000}, "log_level": "warn"}"#).unwrap();
    let child = Command::new(bin)
        .args(["agent", "--dev", "--node", "bench", "--bind", "127.0.0.1", "--client", "127.0.0.1"])
        .args(["--http-port", &port.to_string(), "--dns-port", "-1", "--server-port", "0", "--serf-lan-port", "0", "--serf-wan-port", "-1"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config-file")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start trellis");
    Target { name: "trellis", child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _dir: dir }
}

/// The bench binary itself serving as a reference (`--serve-bare-fanout` or
/// `--serve-raw-fanout`).
fn start_self(mode: &str, name: &'static str, port: u16) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([mode, &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("start the {name} server: {e}"));
    Target { name, child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _dir: dir }
}

/// The least a Rust server on tokio and axum can do for the same blocking queries.
fn start_bare_fanout(port: u16) -> Target {
    start_self("--serve-bare-fanout", "bare axum", port)
}

/// The same with no HTTP library at all.
fn start_raw_fanout(port: u16) -> Target {
    start_self("--serve-raw-fanout", "raw tokio", port)
}

/// A minimal blocking-query server on axum: one index, one `Notify`, answers of the same
/// shape as a health read of a 3-instance service.
fn serve_bare_fanout(port: u16) {
    use std::sync::atomic::AtomicU64;
    struct S {
        index: AtomicU64,
        parked: AtomicU64,
        changed: tokio::sync::Notify,
        body: parking_lot::Mutex<axum::body::Bytes>,
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let s = Arc::new(S {
            index: AtomicU64::new(1),
            parked: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            body: parking_lot::Mutex::new(axum::body::Bytes::from_static(b"[]")),
        });
        let (s1, s2, s3) = (s.clone(), s.clone(), s.clone());
        let app = axum::Router::new()
            .route(
                "/v1/health/service/{name}",
                axum::routing::get(move |q: axum::extract::RawQuery| {
                    let s = s1.clone();
                    async move {
                        let want: u64 = q.0.unwrap_or_default().split('&').find_map(|kv| kv.strip_prefix("index=")?.parse().ok()).unwrap_or(0);
                        // Take the notification before looking at the index, so no change is missed.
                        let notified = s.changed.notified();
                        if want != 0 && s.index.load(std::sync::atomic::Ordering::SeqCst) == want {
                            s.parked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let _ = tokio::time::timeout(Duration::from_secs(60), notified).await;
                            s.parked.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        let body = s.body.lock().clone();
                        (
                            [
                                ("x-consul-index", s.index.load(std::sync::atomic::Ordering::SeqCst).to_string()),
                                ("content-type", "application/json".to_string()),
                            ],
                            body,
                        )
                    }
                }),
            )
            .route(
                "/v1/catalog/register",
                axum::routing::put(move |body: axum::body::Bytes| {
                    let s = s2.clone();
                    async move {
                        // Only the watched service has watchers.
                        let pattern = br#""Service":"watched","#;
                        if body.windows(pattern.len()).any(|w| w == pattern) {
                            *s.body.lock() = axum::body::Bytes::from([&b"["[..], &body, b"]"].concat());
                            s.index.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            s.changed.notify_waiters();
                        }
                        "true"
                    }
                }),
            )
            .route(
                "/v1/agent/metrics",
                axum::routing::get(move || {
                    let s = s3.clone();
                    async move {
                        let n = s.parked.load(std::sync::atomic::Ordering::SeqCst);
                        axum::Json(serde_json::json!({"Gauges": [{"Name": "trellis.http.blocking_queries", "Value": n}]}))
                    }
                }),
            );
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        axum::serve(l, app).await.unwrap();
    });
}

/// The floor under any HTTP server on this machine: tokio sockets, the request head scanned
/// by hand, each answer one prebuilt buffer written once. It understands just what this
/// benchmark sends (one request per connection or keep-alive, `Content-Length` bodies).
fn serve_raw_fanout(port: u16) {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    struct S {
        index: AtomicU64,
        parked: AtomicU64,
        changed: tokio::sync::Notify,
        answer: parking_lot::Mutex<bytes::Bytes>,
    }
    fn answer(index: u64, body: &[u8]) -> bytes::Bytes {
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-consul-index: {index}\r\ncontent-length: {}\r\n\r\n", body.len());
        bytes::Bytes::from([head.as_bytes(), body].concat())
    }
    fn plain(body: &str) -> Vec<u8> {
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes()
    }
    async fn conn(s: Arc<S>, mut sock: tokio::net::TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(1024);
        loop {
            let end = loop {
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end;
                }
                let mut chunk = [0u8; 1024];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = header(&head, "content-length").unwrap_or(0) as usize;
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = sock.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body: Vec<u8> = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            let target = head.split(' ').nth(1).unwrap_or("").to_string();
            if head.starts_with("PUT /v1/catalog/register") {
                let pattern = br#""Service":"watched","#;
                if body.windows(pattern.len()).any(|w| w == pattern) {
                    let index = s.index.load(SeqCst) + 1;
                    *s.answer.lock() = answer(index, &[&b"["[..], &body, b"]"].concat());
                    s.index.store(index, SeqCst);
                    s.changed.notify_waiters();
                }
                sock.write_all(&plain("true")).await?;
            } else if target.starts_with("/v1/agent/metrics") {
                let n = s.parked.load(SeqCst);
                sock.write_all(&plain(&format!(r#"{{"Gauges":[{{"Name":"trellis.http.blocking_queries","Value":{n}}}]}}"#))).await?;
            } else {
                let want: u64 =
                    target.split_once('?').map_or("", |(_, q)| q).split('&').find_map(|kv| kv.strip_prefix("index=")?.parse().ok()).unwrap_or(0);
                let notified = s.changed.notified();
                if want != 0 && s.index.load(SeqCst) == want {
                    s.parked.fetch_add(1, SeqCst);
                    let _ = tokio::time::timeout(Duration::from_secs(60), notified).await;
                    s.parked.fetch_sub(1, SeqCst);
                }
                let a = s.answer.lock().clone();
                sock.write_all(&a).await?;
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let s = Arc::new(S {
            index: AtomicU64::new(1),
            parked: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            answer: parking_lot::Mutex::new(answer(1, b"[]")),
        });
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        loop {
            let Ok((sock, _)) = l.accept().await else { continue };
            let _ = sock.set_nodelay(true);
            tokio::spawn(conn(s.clone(), sock));
        }
    });
}

fn start_reference(port: u16) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new("python3")
        .arg(repo().join("benches/ref/blocking_ref.py"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the reference (python3)");
    Target { name: "asyncio reference", child, addr: SocketAddr::from(([127, 0, 0, 1], port)), _dir: dir }
}

/// One HTTP/1.1 request on a fresh connection from `src`; returns (status, headers, body).
async fn request(src: Option<IpAddr>, to: SocketAddr, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String, Vec<u8>)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let mut s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    read_response(&mut s).await
}

async fn read_response(s: &mut tokio::net::TcpStream) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16384];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a full answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize =
                head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))).unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed mid-body"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Ok((status, head, buf[end + 4..end + 4 + len].to_vec()));
        }
    }
}

fn header(head: &str, name: &str) -> Option<u64> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().parse().ok()).flatten()
    })
}

fn registration(node: usize, svc: &str, id: &str) -> Vec<u8> {
    format!(
        r#"{{"Node":"node-{node}","Address":"10.{}.{}.{}","Service":{{"Service":"{svc}","ID":"{id}","Port":8080,"Tags":["v1"]}},"Check":{{"CheckID":"{id}-check","Name":"{id}","Status":"passing","ServiceID":"{id}"}}}}"#,
        (node >> 16) & 255,
        (node >> 8) & 255,
        node & 255
    )
    .into_bytes()
}

/// Register `nodes` x 10 instances, 64 writers on keep-alive connections.
async fn fill(to: SocketAddr, nodes: usize) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let total = nodes * 10;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                let (node, k) = (i / 10, i % 10);
                let body = registration(node, &format!("svc-{k}"), &format!("svc-{k}-{node}"));
                let r = client.put(format!("http://{to}/v1/catalog/register")).body(body).send().await.expect("register");
                assert!(r.status().is_success(), "register: {}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    eprintln!("  filled {total} instances in {:.1} s", started.elapsed().as_secs_f64());
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15; after the ')' they are at 11 and 12.
    let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (rss_kb, ticks * 10) // ms, at 100 ticks per second
}

async fn parked(to: SocketAddr) -> u64 {
    let Ok((_, _, body)) = request(None, to, "GET", "/v1/agent/metrics", b"").await else { return 0 };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["Gauges"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["Name"] == "trellis.http.blocking_queries")
        .and_then(|g| g["Value"].as_f64())
        .unwrap_or(0.0) as u64
}

async fn wakeups(to: SocketAddr) -> Option<u64> {
    let (_, _, body) = request(None, to, "GET", "/v1/agent/metrics", b"").await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["Gauges"].as_array()?.iter().find(|g| g["Name"] == "trellis.http.blocking_wakeups").and_then(|g| g["Value"].as_f64()).map(|x| x as u64)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Round {
    write_ms: f64,
    /// Latencies of other writes: with no watcher parked, with all of them parked, and while
    /// they were being answered.
    writes_idle: Vec<f64>,
    writes_parked: Vec<f64>,
    writes_during: Vec<f64>,
    p50: f64,
    p99: f64,
    max: f64,
    cpu_ms: u64,
    kib_per_watcher: f64,
    woken_by_other: Option<u64>,
}

/// Register instances of a service nobody watches, one after another every 5 ms, until
/// `stop`; returns each write's latency (ms).
async fn write_probe(to: SocketAddr, stop: Arc<std::sync::atomic::AtomicBool>, tag: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let body = registration(950_000 + i % 1000, "probe", &format!("probe-{tag}-{i}"));
        let t = Instant::now();
        let (st, _, _) = request(None, to, "PUT", "/v1/catalog/register", &body).await.expect("probe write");
        assert_eq!(st, 200);
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        i += 1;
        // Pacing, not synchronisation: a steady trickle of writes beside the fan-out.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    out
}

/// `write_probe` on a thread and runtime of its own, so that its timings are not the bench's
/// own queueing behind thousands of watcher answers; join with `finish_probe`.
fn start_probe(to: SocketAddr, stop: Arc<std::sync::atomic::AtomicBool>, tag: usize) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(write_probe(to, stop, tag)))
}

async fn finish_probe(stop: &std::sync::atomic::AtomicBool, probe: std::thread::JoinHandle<Vec<f64>>) -> Vec<f64> {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::task::spawn_blocking(move || probe.join().unwrap()).await.unwrap()
}

async fn round(t: &Target, watchers: usize, seq: &mut usize) -> Round {
    let to = t.addr;
    let (_, head, _) = request(None, to, "GET", "/v1/health/service/watched", b"").await.expect("read watched");
    let index = header(&head, "x-consul-index").expect("index");
    // Other writes' latency with no watcher parked, for comparison.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let idle_probe = start_probe(to, stop.clone(), *seq * 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_idle = finish_probe(&stop, idle_probe).await;
    let (rss_before, _) = proc_stat(t.child.id());
    let path = format!("/v1/health/service/watched?index={index}&wait=60s");
    let mut tasks = Vec::with_capacity(watchers);
    for i in 0..watchers {
        // 2,000 connections per source address keeps clear of ephemeral-port limits.
        let src = IpAddr::from([127, 0, 3, 1 + (i / 2000) as u8]);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let r = request(Some(src), to, "GET", &path, b"").await;
            (Instant::now(), r)
        }));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while parked(to).await < watchers as u64 {
        assert!(Instant::now() < deadline, "{}: watchers did not all park", t.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (rss_parked, _) = proc_stat(t.child.id());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let parked_probe = start_probe(to, stop.clone(), *seq * 3 + 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes_parked = finish_probe(&stop, parked_probe).await;
    let (_, cpu_before) = proc_stat(t.child.id());
    // A write to another service must wake none of them.
    let w0 = wakeups(to).await;
    *seq += 1;
    let (st, _, _) = request(None, to, "PUT", "/v1/catalog/register", &registration(900_000 + *seq, "unrelated", &format!("u-{seq}"))).await.unwrap();
    assert_eq!(st, 200);
    let woken_by_other = match (w0, wakeups(to).await) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    *seq += 1;
    let body = registration(800_000 + *seq, "watched", &format!("watched-{seq}"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy_probe = start_probe(to, stop.clone(), *seq * 3 + 1);
    let write_start = Instant::now();
    let (st, _, _) = request(None, to, "PUT", "/v1/catalog/register", &body).await.unwrap();
    let acked = Instant::now();
    assert_eq!(st, 200);
    let mut delays = Vec::with_capacity(watchers);
    for task in tasks {
        let (at, r) = task.await.unwrap();
        let (status, head, _) = r.expect("watcher answer");
        assert_eq!(status, 200);
        assert!(header(&head, "x-consul-index").unwrap_or(0) > index, "answered without a new index");
        delays.push(at.saturating_duration_since(acked).as_secs_f64() * 1000.0);
    }
    let (_, cpu_after) = proc_stat(t.child.id());
    let writes_during = finish_probe(&stop, busy_probe).await;
    delays.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Round {
        write_ms: (acked - write_start).as_secs_f64() * 1000.0,
        writes_idle,
        writes_parked,
        writes_during,
        p50: pct(&delays, 0.5),
        p99: pct(&delays, 0.99),
        max: *delays.last().unwrap_or(&f64::NAN),
        cpu_ms: cpu_after.saturating_sub(cpu_before),
        kib_per_watcher: (rss_parked.saturating_sub(rss_before)) as f64 / watchers as f64,
        woken_by_other,
    }
}

async fn wait_ready(t: &Target) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _, body)) = request(None, t.addr, "GET", "/v1/health/service/none", b"").await
            && !body.is_empty()
        {
            // Trellis also needs a leader: a write must go through.
            if let Ok((200, _, _)) = request(None, t.addr, "PUT", "/v1/catalog/register", &registration(700_000, "warmup", "warmup")).await {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{} did not start", t.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fanout(o: &Opts) -> Vec<(String, usize, Vec<Round>)> {
    let mut results = Vec::new();
    for (mk, port) in
        [(start_trellis as fn(u16) -> Target, 18600u16), (start_bare_fanout, 18604), (start_raw_fanout, 18605), (start_reference, 18601)]
    {
        let t = mk(port);
        wait_ready(&t).await;
        eprintln!("{}:", t.name);
        fill(t.addr, o.nodes).await;
        for i in 0..3 {
            let (st, _, _) =
                request(None, t.addr, "PUT", "/v1/catalog/register", &registration(600_000 + i, "watched", &format!("watched-base-{i}")))
                    .await
                    .unwrap();
            assert_eq!(st, 200);
        }
        let mut seq = 0;
        for &w in &o.watchers {
            let mut rounds = Vec::new();
            for _ in 0..o.rounds {
                let r = round(&t, w, &mut seq).await;
                eprintln!(
                    "  {w} watchers: write {:.1} ms, answered p50 {:.1} / p99 {:.1} / max {:.1} ms after the ack, {} ms CPU, {:.2} KiB per watcher, woken by another service: {:?}; {} other writes meanwhile, max {:.1} ms",
                    r.write_ms,
                    r.p50,
                    r.p99,
                    r.max,
                    r.cpu_ms,
                    r.kib_per_watcher,
                    r.woken_by_other,
                    r.writes_during.len(),
                    r.writes_during.iter().copied().fold(0.0, f64::max)
                );
                rounds.push(r);
            }
            results.push((t.name.to_string(), w, rounds));
        }
    }
    results
}

/// A bare axum server returning `body` for every GET: the fastest an HTTP handler on this
/// machine answers the same bytes.
fn start_bare(body: Vec<u8>, port: u16) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let body = axum::body::Bytes::from(body);
            let app = axum::Router::new().fallback(move || {
                let body = body.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
            });
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            axum::serve(l, app).await.unwrap();
        });
    })
}

fn wrk(url: &str, seconds: u64) -> f64 {
    let out = Command::new("wrk").args(["-t", "1", "-c", "32", "-d", &format!("{seconds}s"), url]).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

async fn reads(o: &Opts) {
    let t = start_trellis(18602);
    wait_ready(&t).await;
    for i in 0..3 {
        request(None, t.addr, "PUT", "/v1/catalog/register", &registration(600_000 + i, "watched", &format!("watched-base-{i}"))).await.unwrap();
    }
    let (_, _, body) = request(None, t.addr, "GET", "/v1/health/service/watched", b"").await.unwrap();
    let _bare = start_bare(body, 18603);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        ours.push(wrk(&format!("http://{}/v1/health/service/watched", t.addr), o.wrk_seconds));
        bare.push(wrk("http://127.0.0.1:18603/v1/health/service/watched", o.wrk_seconds));
    }
    let (a, b) = (ours.iter().sum::<f64>() / ours.len() as f64, bare.iter().sum::<f64>() / bare.len() as f64);
    println!("\nNon-blocking reads of /v1/health/service/watched, wrk -t1 -c32, interleaved:");
    println!("  trellis {a:.0} req/s, bare axum with the same bytes {b:.0} req/s: {:.2}x", a / b);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-bare-fanout") {
        serve_bare_fanout(args[i + 1].parse().expect("port"));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--serve-raw-fanout") {
        serve_raw_fanout(args[i + 1].parse().expect("port"));
        return;
    }
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let results = fanout(&o).await;
        println!("\nBlocking-query fan-out, {} instances in the catalog (medians of {} rounds):", o.nodes * 10, o.rounds);
        println!(
            "| server | watchers | write ms | p50 ms | p99 ms | max ms | server CPU ms | RSS KiB/watcher | woken by another service | other writes, no watcher: n, p99 ms | all parked: n, p99 ms | while answering: n, p99 ms |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
        let pooled = |rounds: &[Round], f: fn(&Round) -> &Vec<f64>| {
            let mut all: Vec<f64> = rounds.iter().flat_map(|r| f(r).iter().copied()).collect();
            all.sort_by(|a, b| a.partial_cmp(b).unwrap());
            format!("{}, {:.1}", all.len(), pct(&all, 0.99))
        };
        let med = |v: Vec<f64>| {
            let mut v = v;
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        for (name, w, rounds) in &results {
            println!(
                "| {name} | {w} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.2} | {} | {} | {} | {} |",
                med(rounds.iter().map(|r| r.write_ms).collect()),
                med(rounds.iter().map(|r| r.p50).collect()),
                med(rounds.iter().map(|r| r.p99).collect()),
                med(rounds.iter().map(|r| r.max).collect()),
                med(rounds.iter().map(|r| r.cpu_ms as f64).collect()),
                // Memory freed by one round is reused by the next without RSS moving: the
                // first (largest) growth is the cost of a parked watcher.
                rounds.iter().map(|r| r.kib_per_watcher).fold(0.0, f64::max),
                rounds.iter().map(|r| r.woken_by_other.map_or("-".to_string(), |n| n.to_string())).collect::<Vec<_>>().join("/"),
                pooled(rounds, |r| &r.writes_idle),
                pooled(rounds, |r| &r.writes_parked),
                pooled(rounds, |r| &r.writes_during),
            );
        }
        for (name, w, rounds) in &results {
            if name == "trellis" {
                let ours = med(rounds.iter().map(|r| r.p99).collect());
                for (other, _, r) in results.iter().filter(|(n, rw, _)| n != "trellis" && rw == w) {
                    println!("  {w} watchers: trellis p99 {:.2}x {other}'s", ours / med(r.iter().map(|r| r.p99).collect()));
                }
            }
        }
        reads(&o).await;
    });
}
