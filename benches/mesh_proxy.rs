//! The sidecar data plane, whole system, against references in the same run.
//!
//! Run with `benches/mesh_proxy.sh` (it installs HAProxy and wrk, builds the release binary),
//! or `cargo bench --bench mesh_proxy -- [--seconds S] [--rounds R] [--rate N] [--conns N] [--http]`.
//!
//! `--http` measures the L7 path: `db` speaks HTTP (`service-defaults`), so web's sidecar
//! routes each request by the discovery chain over a pooled mesh HTTP/2 connection and db's
//! sidecar authorises it and forwards it to the app over pooled HTTP/1.1; HAProxy is then the
//! same HTTP-aware pair (`mode http`, h2 over mTLS between the two, `http-reuse always`).
//!
//! One app (a minimal HTTP/1.1 keep-alive responder in this process) is reached three ways:
//! - **direct**: client -> app;
//! - **trellis**: client -> web's sidecar upstream -> mTLS -> db's sidecar -> app, both
//!   sidecars running as standalone `trellis connect proxy` processes against a dev agent
//!   (the agent has `run_sidecars = false`), with the mesh's own leaves and intentions;
//! - **haproxy**: the same pair built from two HAProxy processes (Debian `haproxy`): a TCP
//!   frontend that originates TLS with web's leaf, and a TLS frontend that requires a client
//!   certificate from the mesh roots and forwards to the app. Same certificates, same key
//!   type (EC P-256), same topology.
//!
//! Reported, per path, interleaved over rounds:
//! - latency at a fixed rate (default 1,000 requests/s over 10 keep-alive connections, open
//!   loop: a late answer delays the requests scheduled behind it, which count from their
//!   scheduled time), p50/p99/p99.9, and the latency each proxy pair adds over direct;
//! - maximum throughput: wrk with 64 keep-alive connections, and with a new connection per
//!   request (so every request pays the mTLS handshake between the proxies, with resumption);
//! - the RSS of one standalone trellis proxy and of one HAProxy process after the fixed-rate
//!   phase.

#[path = "lib/common.rs"]
mod common;
use common::{Proc, pct, wait_until};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Opts {
    seconds: u64,
    rounds: usize,
    rate: u64,
    wrk_seconds: u64,
    /// Keep-alive connections of the fixed-rate phase.
    conns: usize,
    /// L7: db speaks HTTP (service-defaults), so both sidecars proxy per request over mesh
    /// HTTP/2, and HAProxy runs as the same HTTP-aware pair (mode http, h2 between them).
    http: bool,
}

fn opts() -> Opts {
    let mut o = Opts { seconds: 10, rounds: 3, rate: 1000, wrk_seconds: 10, conns: 10, http: false };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--rounds" => o.rounds = v.parse().expect("--rounds R"),
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--wrk-seconds" => o.wrk_seconds = v.parse().expect("--wrk-seconds S"),
            "--conns" => o.conns = v.parse().expect("--conns N"),
            "--http" => {
                o.http = true;
                i += 1;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

/// The app: answers every request (up to the blank line) with a fixed 200, keeping the
/// connection open.
async fn serve_app(l: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { return };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut have = 0usize;
            loop {
                match s.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have += n,
                }
                let mut answered = 0;
                let mut start = 0;
                let mut close = false;
                while let Some(end) = buf[start..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    close |= buf[start..start + end].windows(17).any(|w| w.eq_ignore_ascii_case(b"connection: close"));
                    start += end + 4;
                    answered += 1;
                }
                if answered > 0 {
                    let mut out = Vec::with_capacity(RESPONSE.len() * answered);
                    for _ in 0..answered {
                        out.extend_from_slice(RESPONSE);
                    }
                    if s.write_all(&out).await.is_err() || close {
                        let _ = s.shutdown().await;
                        return;
                    }
                    buf.copy_within(start..have, 0);
                    have -= start;
                }
                if have == buf.len() {
                    return;
                }
            }
        });
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn http_put(addr: SocketAddr, path: &str, body: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "PUT {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// One keep-alive request through `addr` answered?
fn path_works(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 256];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// (VmRSS, RssAnon) in KiB: all resident memory, and the part that is the process's own
/// (not code pages shared with other processes of the same binary).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| status.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0);
    (field("VmRSS:"), field("RssAnon:"))
}

/// The fixed-rate run: `rate` requests/s for `seconds` over `conns` keep-alive connections;
/// latencies in microseconds from each request's scheduled time.
async fn fixed_rate(addr: SocketAddr, rate: u64, seconds: u64, conns: usize) -> Vec<u32> {
    let total = (rate * seconds) as usize;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        tasks.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let _ = s.set_nodelay(true);
            let mut lat = Vec::new();
            let mut buf = vec![0u8; 8192];
            let mut have = 0;
            while let Some(scheduled) = rx.recv().await {
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
                // One whole response (a proxy may rewrite the headers): head, then the
                // Content-Length body.
                loop {
                    if let Some(used) = whole_response(&buf[..have]) {
                        buf.copy_within(used..have, 0);
                        have -= used;
                        break;
                    }
                    let n = s.read(&mut buf[have..]).await.expect("read");
                    assert!(n > 0, "{addr} closed the connection after {}", String::from_utf8_lossy(&buf[..have]));
                    have += n;
                }
                lat.push(scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            lat
        }));
    }
    // A pacing thread releases each request at its scheduled time (tokio's timer has a
    // millisecond granularity, which would show up as latency).
    std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(50);
        for i in 0..total {
            let at = start + interval * i as u32;
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let _ = senders[i % conns].send(at);
        }
    });
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// The length of the first whole HTTP/1.1 response in `b` (head and Content-Length body).
fn whole_response(b: &[u8]) -> Option<usize> {
    let head = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    assert!(b.starts_with(b"HTTP/1.1 200"), "not a 200: {}", String::from_utf8_lossy(&b[..head]));
    let len = std::str::from_utf8(&b[..head])
        .ok()?
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>()))?
        .ok()?;
    (b.len() >= head + len).then_some(head + len)
}

/// wrk's requests/s against `addr`.
fn wrk(addr: SocketAddr, seconds: u64, close: bool) -> f64 {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", "-c64", &format!("-d{seconds}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(format!("http://{addr}/")).output().expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = text.lines().find(|l| l.contains("Socket errors") || l.contains("Non-2xx"));
    if let Some(e) = errors {
        eprintln!("  wrk against {addr}: {}", e.trim());
    }
    text.lines().find_map(|l| l.strip_prefix("Requests/sec:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

fn main() {
    let o = opts();
    let bin = std::env::var("TRELLIS_BIN").map(PathBuf::from).unwrap_or_else(|_| repo().join("target/release/trellis"));
    assert!(bin.exists(), "no release binary at {}: run `cargo build --release` (or set TRELLIS_BIN)", bin.display());
    assert!(Command::new("haproxy").arg("-v").output().is_ok(), "haproxy is not installed (apt-get install haproxy)");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app: SocketAddr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(serve_app(l));
        a
    });

    // Trellis: a dev agent without in-process sidecars, and the two sidecars as processes.
    let dir = tempfile::tempdir().unwrap();
    let ip = "127.0.0.71";
    let api: SocketAddr = format!("{ip}:8500").parse().unwrap();
    let cfg = dir.path().join("agent.hcl");
    std::fs::write(&cfg, "log_level = \"warn\"\nconnect {\n  run_sidecars = false\n}\n").unwrap();
    let _agent = Proc(
        Command::new(&bin)
            .args(["agent", "--dev", "--node", "bench", "--bind", ip, "--client", ip, "--dns-port", "-1", "--serf-wan-port", "-1"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config-file")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start trellis"),
    );
    wait_until("the agent's leader", Duration::from_secs(30), || http_get(api, "/v1/status/leader").is_some_and(|l| l.contains(':')));
    let upstream: SocketAddr = format!("{ip}:19500").parse().unwrap();
    let db = format!(
        r#"{{"ID":"db","Name":"db","Port":{},"Connect":{{"SidecarService":{{"Proxy":{{"LocalServiceAddress":"127.0.0.1"}}}}}}}}"#,
        app.port()
    );
    let web = format!(
        r#"{{"ID":"web","Name":"web","Port":1,"Connect":{{"SidecarService":{{"Proxy":{{"Upstreams":[{{"DestinationName":"db","LocalBindAddress":"{ip}","LocalBindPort":19500}}]}}}}}}}}"#
    );
    if o.http {
        let r = http_put(api, "/v1/config", r#"{"Kind":"service-defaults","Name":"db","Protocol":"http"}"#).unwrap_or_default();
        assert!(r.contains(" 200 "), "service-defaults: {r}");
    }
    for def in [&db, &web] {
        let r = http_put(api, "/v1/agent/service/register", def).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"), "register: {r}");
    }
    let proxy = |id: &str| {
        Proc(
            Command::new(&bin)
                .args(["connect", "proxy", "--sidecar-for", id, "--http-addr", &format!("http://{api}")])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start trellis connect proxy"),
        )
    };
    let db_proxy = proxy("db");
    let web_proxy = proxy("web");
    wait_until("the trellis sidecar path", Duration::from_secs(60), || path_works(upstream));

    // HAProxy: the same pair with the mesh's certificates.
    let leaf =
        |svc: &str| -> serde_json::Value { serde_json::from_str(&http_get(api, &format!("/v1/agent/connect/ca/leaf/{svc}")).unwrap()).unwrap() };
    let roots: serde_json::Value = serde_json::from_str(&http_get(api, "/v1/agent/connect/ca/roots").unwrap()).unwrap();
    let roots_pem: String = roots["Roots"].as_array().unwrap().iter().map(|r| r["RootCert"].as_str().unwrap().to_string()).collect();
    std::fs::write(dir.path().join("roots.pem"), roots_pem).unwrap();
    for svc in ["web", "db"] {
        let l = leaf(svc);
        std::fs::write(dir.path().join(format!("{svc}.pem")), format!("{}{}", l["CertPEM"].as_str().unwrap(), l["PrivateKeyPEM"].as_str().unwrap()))
            .unwrap();
    }
    let hip = "127.0.0.72";
    let (h_up, h_pub): (SocketAddr, SocketAddr) = (format!("{hip}:19500").parse().unwrap(), format!("{hip}:21500").parse().unwrap());
    let d = dir.path().display();
    let common =
        "global\n  log stderr format raw local0 emerg\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let (hdb, hweb) = if o.http {
        (
            format!(
                "{common}frontend public\n  mode http\n  bind {h_pub} ssl crt {d}/db.pem ca-file {d}/roots.pem verify required alpn h2,http/1.1\n  default_backend app\nbackend app\n  mode http\n  http-reuse always\n  server app {app}\n"
            ),
            format!(
                "{common}frontend upstream\n  mode http\n  bind {h_up}\n  default_backend db\nbackend db\n  mode http\n  http-reuse always\n  server db {h_pub} ssl crt {d}/web.pem ca-file {d}/roots.pem verify required alpn h2\n"
            ),
        )
    } else {
        (
            format!(
                "{common}frontend public\n  bind {h_pub} ssl crt {d}/db.pem ca-file {d}/roots.pem verify required\n  default_backend app\nbackend app\n  server app {app}\n"
            ),
            format!(
                "{common}frontend upstream\n  bind {h_up}\n  default_backend db\nbackend db\n  server db {h_pub} ssl crt {d}/web.pem ca-file {d}/roots.pem verify required\n"
            ),
        )
    };
    let haproxy = |name: &str, cfg: &str| {
        let p = dir.path().join(format!("{name}.cfg"));
        std::fs::write(&p, cfg).unwrap();
        Proc(Command::new("haproxy").arg("-db").arg("-f").arg(&p).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("start haproxy"))
    };
    let _hdb = haproxy("db", &hdb);
    let hweb_proc = haproxy("web", &hweb);
    wait_until("the haproxy path", Duration::from_secs(30), || path_works(h_up));

    let paths: [(&str, SocketAddr); 3] = [("direct", app), ("trellis", upstream), ("haproxy", h_up)];
    println!(
        "mesh_proxy ({}): {} requests/s for {} s x {} rounds over {} keep-alive connections",
        if o.http { "L7: HTTP-aware sidecars, HAProxy mode http" } else { "L4: TCP sidecars, HAProxy mode tcp" },
        o.rate,
        o.seconds,
        o.rounds,
        o.conns
    );
    // Warm-up: TLS sessions, caches, allocators.
    rt.block_on(async {
        for (_, a) in &paths {
            fixed_rate(*a, o.rate, 2, o.conns).await;
        }
    });
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); paths.len()];
    let mut rss = ((0u64, 0u64), (0u64, 0u64));
    for _ in 0..o.rounds {
        for (i, (_, a)) in paths.iter().enumerate() {
            let l = rt.block_on(fixed_rate(*a, o.rate, o.seconds, o.conns));
            lat[i].extend(l);
            if i == 1 {
                rss.0 = rss.0.max(rss_kib(web_proxy.0.id()));
            }
            if i == 2 {
                rss.1 = rss.1.max(rss_kib(hweb_proc.0.id()));
            }
        }
    }
    for l in &mut lat {
        l.sort_unstable();
    }
    let ps = [50.0, 99.0, 99.9];
    println!("{:<10} {:>9} {:>9} {:>9}   (ms, from scheduled time; {} samples each)", "path", "p50", "p99", "p99.9", lat[0].len());
    for (i, (name, _)) in paths.iter().enumerate() {
        println!("{:<10} {:>9.3} {:>9.3} {:>9.3}", name, pct(&lat[i], 50.0), pct(&lat[i], 99.0), pct(&lat[i], 99.9));
    }
    println!("added over direct:");
    for (i, (name, _)) in paths.iter().enumerate().skip(1) {
        let added: Vec<f64> = ps.iter().map(|p| pct(&lat[i], *p) - pct(&lat[0], *p)).collect();
        println!("{:<10} {:>9.3} {:>9.3} {:>9.3}", name, added[0], added[1], added[2]);
    }
    let ratio: Vec<String> = ps
        .iter()
        .map(|p| {
            let t = pct(&lat[1], *p) - pct(&lat[0], *p);
            let h = pct(&lat[2], *p) - pct(&lat[0], *p);
            format!("p{p}: {:.2}x", t / h)
        })
        .collect();
    println!("trellis added latency / haproxy added latency: {}", ratio.join(", "));
    println!(
        "RSS after the fixed-rate phase: trellis web proxy {} KiB ({} KiB anonymous), haproxy web process {} KiB ({} KiB anonymous); trellis/haproxy {:.2}x",
        rss.0.0,
        rss.0.1,
        rss.1.0,
        rss.1.1,
        rss.0.0 as f64 / rss.1.0 as f64
    );

    println!("max throughput (wrk -t1 -c64, {} s each, interleaved, best of {}):", o.wrk_seconds, o.rounds.min(2));
    for close in [false, true] {
        let mut best = [0f64; 3];
        for _ in 0..o.rounds.min(2) {
            for (i, (_, a)) in paths.iter().enumerate() {
                best[i] = best[i].max(wrk(*a, o.wrk_seconds, close));
            }
        }
        let label = if close { "new connection per request" } else { "keep-alive" };
        println!(
            "  {label:<27} direct {:>9.0}  trellis {:>9.0}  haproxy {:>9.0}  req/s   trellis/haproxy {:.2}x",
            best[0],
            best[1],
            best[2],
            best[1] / best[2]
        );
    }
    drop(db_proxy);
}
