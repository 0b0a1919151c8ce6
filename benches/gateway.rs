//! The mesh gateway hop, whole system, against references in the same run.
//!
//! Run with `benches/gateway.sh` (installs HAProxy, builds the release binary), or
//! `cargo bench --bench gateway -- [--seconds S] [--rate N] [--new-conns N]`.
//!
//! Two datacenters on loopback federated through one Trellis gateway each; `db` runs in dc2
//! with its sidecar (the app is a minimal HTTP/1.1 responder in this process). The load
//! generator is the caller's sidecar: it speaks mTLS with web's leaf and SNI
//! `db.default.dc2.internal.<trust-domain>`, so only the gateway hop differs between paths.
//!
//! Phase A, no delay: the hop's cost.
//! - **direct**: straight to db's sidecar;
//! - **trellis**: dc1's gateway, dc2's gateway (QUIC between them), db's sidecar;
//! - **haproxy**: the same hop built from two HAProxy processes routing by SNI in TCP mode
//!   (`req.ssl_sni`), the second one forwarding to db's sidecar;
//! - **trellis/tcp**: a second dc1 gateway with `--wan-transport tcp`.
//!
//! Latency at a fixed rate (open loop, from scheduled time) p50/p99/p99.9 and the latency each
//! hop adds over direct; throughput with 64 connections (closed loop).
//!
//! Phase B, a WAN of 50 ms round trip between the gateways (a delaying relay for UDP and TCP,
//! `benches/lib/wan_relay.rs`, which charges TCP its handshake round trip): the time from a new
//! connection to its first answer (TLS handshake with db's sidecar plus one request) when the
//! gateways use QUIC, and when UDP does not get through and they fall back to TCP passthrough.

#[path = "lib/wan_relay.rs"]
mod wan_relay;

#[path = "lib/common.rs"]
mod common;
use common::{Proc, pct, wait_until};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Opts {
    seconds: u64,
    rate: u64,
    new_conns: usize,
}

fn opts() -> Opts {
    let mut o = Opts { seconds: 10, rate: 1000, new_conns: 100 };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seconds" => o.seconds = v.parse().expect("--seconds S"),
            "--rate" => o.rate = v.parse().expect("--rate N"),
            "--new-conns" => o.new_conns = v.parse().expect("--new-conns N"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

async fn serve_app(l: tokio::net::TcpListener) {
    loop {
        let Ok((mut s, _)) = l.accept().await else { return };
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut have = 0;
            loop {
                match s.read(&mut buf[have..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => have += n,
                }
                while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                    if s.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                    buf.copy_within(end + 4..have, 0);
                    have -= end + 4;
                }
                if have == buf.len() {
                    return;
                }
            }
        });
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// Two datacenters federated through gateways; dc2's gateway advertises `dc2_wan` (a relay in
/// phase B) and listens on `dc2_wan_bind`.
struct Federation {
    _procs: Vec<Proc>,
    _dir: tempfile::TempDir,
    dc1: SocketAddr,
    gw1: SocketAddr,
    gw1_tcp: SocketAddr,
    sidecar: SocketAddr,
}

fn federation(bin: &Path, net: u8, dc2_wan: SocketAddr, dc2_wan_bind: SocketAddr, app: SocketAddr) -> Federation {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, ca_key) = trellis::tls::create_ca("consul").unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let mut procs = Vec::new();
    let ip = |dc: u8, k: u8| format!("127.{net}.{dc}.{k}");
    let gw1: SocketAddr = format!("{}:8443", ip(1, 9)).parse().unwrap();
    for dc in [1u8, 2] {
        let name = format!("dc{dc}");
        let cert = |kind, who: &str| -> (PathBuf, PathBuf) {
            let (c, k) = trellis::tls::create_cert(&ca_pem, &ca_key, kind, &name, "consul", &[]).unwrap();
            let (cp, kp) = (dir.path().join(format!("{name}-{who}.pem")), dir.path().join(format!("{name}-{who}-key.pem")));
            std::fs::write(&cp, c).unwrap();
            std::fs::write(&kp, k).unwrap();
            (cp, kp)
        };
        let mut fed = String::from("log_level = \"warn\"\nconnect {\n  enable_mesh_gateway_wan_federation = true\n}\n");
        if dc == 2 {
            fed.push_str(&format!("primary_gateways = [\"{gw1}\"]\n"));
        }
        let fed_file = dir.path().join(format!("{name}.hcl"));
        std::fs::write(&fed_file, fed).unwrap();
        let (sc, sk) = cert(trellis::tls::CertKind::Server, "server");
        procs.push(Proc(
            Command::new(bin)
                .args(["agent", "--server", "--bootstrap-expect", "1", "--node", &format!("{name}-server"), "--datacenter", &name])
                .args(["--primary-datacenter", "dc1", "--bind", &ip(dc, 1), "--client", &ip(dc, 1), "--dns-port", "-1"])
                .arg("--data-dir")
                .arg(dir.path().join(format!("{name}-server-data")))
                .arg("--ca-file")
                .arg(&ca)
                .arg("--cert-file")
                .arg(&sc)
                .arg("--key-file")
                .arg(&sk)
                .arg("--config-file")
                .arg(&fed_file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start trellis"),
        ));
        let (gc, gk) = cert(trellis::tls::CertKind::Client, "gw");
        let lan = format!("{}:8443", ip(dc, 9));
        let (wan, bind) = if dc == 1 { (lan.clone(), lan.clone()) } else { (dc2_wan.to_string(), dc2_wan_bind.to_string()) };
        procs.push(Proc(
            Command::new(bin)
                .args(["gateway", "mesh", "--address", &lan, "--wan-address", &wan, "--wan-bind", &bind, "--join", &ip(dc, 1)])
                .args(["--node", &format!("{name}-gw"), "--datacenter", &name, "--primary-datacenter", "dc1", "--dns-port", "-1"])
                .args(["--log-level", "warn"])
                .arg("--data-dir")
                .arg(dir.path().join(format!("{name}-gw-data")))
                .arg("--ca-file")
                .arg(&ca)
                .arg("--cert-file")
                .arg(&gc)
                .arg("--key-file")
                .arg(&gk)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start trellis gateway"),
        ));
    }
    let dc1: SocketAddr = format!("{}:8500", ip(1, 1)).parse().unwrap();
    let dc2: SocketAddr = format!("{}:8500", ip(2, 1)).parse().unwrap();
    for api in [dc1, dc2] {
        wait_until("both datacenters federated", Duration::from_secs(90), || {
            http(api, "GET", "/v1/catalog/datacenters", "").is_some_and(|(s, b)| s == 200 && b.contains("dc1") && b.contains("dc2"))
        });
    }
    let def = format!(r#"{{"Name":"db","Port":{},"Connect":{{"SidecarService":{{}}}}}}"#, app.port());
    assert_eq!(http(dc2, "PUT", "/v1/agent/service/register", &def).map(|r| r.0), Some(200));
    let sidecar: SocketAddr = format!("{}:21000", ip(2, 1)).parse().unwrap();
    // A second gateway in dc1 that only uses TCP to dc2's: TCP passthrough, same hop.
    let (gc, gk) = {
        let (c, k) = trellis::tls::create_cert(&ca_pem, &ca_key, trellis::tls::CertKind::Client, "dc1", "consul", &[]).unwrap();
        let (cp, kp) = (dir.path().join("dc1-gwtcp.pem"), dir.path().join("dc1-gwtcp-key.pem"));
        std::fs::write(&cp, c).unwrap();
        std::fs::write(&kp, k).unwrap();
        (cp, kp)
    };
    let gw1_tcp: SocketAddr = format!("{}:8443", ip(1, 10)).parse().unwrap();
    procs.push(Proc(
        Command::new(bin)
            .args([
                "gateway",
                "mesh",
                "--address",
                &gw1_tcp.to_string(),
                "--wan-transport",
                "tcp",
                "--join",
                &ip(1, 1),
                "--service",
                "mesh-gateway-tcp",
            ])
            .args(["--node", "dc1-gwtcp", "--datacenter", "dc1", "--primary-datacenter", "dc1", "--dns-port", "-1", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(dir.path().join("dc1-gwtcp-data"))
            .arg("--ca-file")
            .arg(&ca)
            .arg("--cert-file")
            .arg(&gc)
            .arg("--key-file")
            .arg(&gk)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start trellis gateway"),
    ));
    Federation { _procs: procs, _dir: dir, dc1, gw1, gw1_tcp, sidecar }
}

/// The caller's identity and the destination's name: web's leaf, the roots, db's SNI.
struct Caller {
    tls: Arc<rustls::ClientConfig>,
    sni: rustls::pki_types::ServerName<'static>,
}

fn caller(f: &Federation) -> Caller {
    let json = |api: SocketAddr, path: &str| -> serde_json::Value {
        let mut last = String::new();
        for _ in 0..100 {
            if let Some((200, b)) = http(api, "GET", path, "") {
                return serde_json::from_str(&b).unwrap();
            }
            last = format!("{:?}", http(api, "GET", path, ""));
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{path}: {last}");
    };
    let leaf = json(f.dc1, "/v1/agent/connect/ca/leaf/web");
    let roots = json(f.dc1, "/v1/agent/connect/ca/roots");
    let mut store = rustls::RootCertStore::empty();
    for r in roots["Roots"].as_array().unwrap() {
        for c in rustls_pemfile::certs(&mut r["RootCert"].as_str().unwrap().as_bytes()) {
            store.add(c.unwrap()).unwrap();
        }
    }
    let certs = rustls_pemfile::certs(&mut leaf["CertPEM"].as_str().unwrap().as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls_pemfile::private_key(&mut leaf["PrivateKeyPEM"].as_str().unwrap().as_bytes()).unwrap().unwrap();
    // Mesh leaves carry no DNS name: the sidecar's identity is its SPIFFE URI, which the
    // benchmark does not need to check (only the time matters here).
    #[derive(Debug)]
    struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);
    impl rustls::client::danger::ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end: &rustls::pki_types::CertificateDer<'_>,
            inter: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            ocsp: &[u8],
            now: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            match self.0.verify_server_cert(end, inter, &rustls::pki_types::ServerName::try_from("x").unwrap(), ocsp, now) {
                Ok(v) => Ok(v),
                Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                    Ok(rustls::client::danger::ServerCertVerified::assertion())
                }
                Err(e) => Err(e),
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone()).build().unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
        .with_client_auth_cert(certs, key)
        .unwrap();
    // Every new connection pays a full handshake, as a first call does.
    cfg.resumption = rustls::client::Resumption::disabled();
    let td = roots["TrustDomain"].as_str().unwrap().to_string();
    Caller { tls: Arc::new(cfg), sni: rustls::pki_types::ServerName::try_from(format!("db.default.dc2.internal.{td}")).unwrap() }
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(c: &Caller, addr: SocketAddr) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    tokio_rustls::TlsConnector::from(c.tls.clone()).connect(c.sni.clone(), tcp).await
}

async fn request(s: &mut Tls) -> std::io::Result<()> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: db\r\n\r\n").await?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while got < RESPONSE.len() {
        let n = s.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        got += n;
    }
    Ok(())
}

/// Open loop at `rate` over `conns` connections; microseconds from each request's schedule.
async fn fixed_rate(c: &Caller, addr: SocketAddr, rate: u64, seconds: u64, conns: usize) -> Vec<u32> {
    let total = (rate * seconds) as usize;
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        senders.push(tx);
        let mut s = connect(c, addr).await.expect("connect");
        request(&mut s).await.expect("first request");
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Some(at) = rx.recv().await {
                request(&mut s).await.expect("request");
                lat.push(at.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            lat
        }));
    }
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
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    all
}

/// Closed loop with `conns` connections for `seconds`: requests per second.
async fn throughput(c: &Caller, addr: SocketAddr, seconds: u64, conns: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut s = connect(c, addr).await.expect("connect");
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                if request(&mut s).await.is_err() {
                    break;
                }
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / seconds as f64
}

/// New connection to first answer, `n` times one after another: sorted milliseconds.
async fn new_connections(c: &Caller, addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let mut s = connect(c, addr).await.expect("connect");
        request(&mut s).await.expect("request");
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pctf(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize]
}

fn haproxy(dir: &Path, name: &str, listen: SocketAddr, to: SocketAddr, sni_part: &str) -> Proc {
    let cfg = format!(
        "global\n  log stderr format raw local0 emerg\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend gw\n  bind {listen}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req_ssl_hello_type 1 }}\n\
         use_backend next if {{ req.ssl_sni -m sub {sni_part} }}\nbackend next\n  server next {to}\n"
    );
    let p = dir.join(format!("{name}.cfg"));
    std::fs::write(&p, cfg).unwrap();
    Proc(Command::new("haproxy").arg("-db").arg("-f").arg(&p).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("haproxy"))
}

fn main() {
    let o = opts();
    let bin =
        std::env::var("TRELLIS_BIN").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/trellis"));
    assert!(bin.exists(), "no release binary at {}: run `cargo build --release`", bin.display());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let app: SocketAddr = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(serve_app(l));
        a
    });

    // Phase A: the hop's cost on loopback.
    println!("gateway: phase A, no added delay ({} requests/s for {} s over 10 connections; throughput with 64)", o.rate, o.seconds);
    let gw2: SocketAddr = "127.81.2.9:8443".parse().unwrap();
    let f = federation(&bin, 81, gw2, gw2, app);
    let c = caller(&f);
    let hdir = tempfile::tempdir().unwrap();
    let (h1, h2): (SocketAddr, SocketAddr) = ("127.81.3.1:8443".parse().unwrap(), "127.81.3.2:8443".parse().unwrap());
    let _ha = haproxy(hdir.path(), "h2", h2, f.sidecar, ".internal.");
    let _hb = haproxy(hdir.path(), "h1", h1, h2, ".dc2.internal.");
    let paths = [("direct", f.sidecar), ("trellis", f.gw1), ("haproxy", h1), ("trellis/tcp", f.gw1_tcp)];
    rt.block_on(async {
        for (name, addr) in &paths {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ok = async {
                    let mut s = connect(&c, *addr).await?;
                    request(&mut s).await
                }
                .await;
                if ok.is_ok() {
                    break;
                }
                assert!(Instant::now() < deadline, "the {name} path does not work: {ok:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for (_, addr) in &paths {
            fixed_rate(&c, *addr, o.rate, 2, 10).await;
        }
        let mut lat = Vec::new();
        for (_, addr) in &paths {
            lat.push(fixed_rate(&c, *addr, o.rate, o.seconds, 10).await);
        }
        println!("{:<12} {:>8} {:>8} {:>8}   ms", "path", "p50", "p99", "p99.9");
        for (i, (name, _)) in paths.iter().enumerate() {
            println!("{:<12} {:>8.3} {:>8.3} {:>8.3}", name, pct(&lat[i], 50.0), pct(&lat[i], 99.0), pct(&lat[i], 99.9));
        }
        let added = |i: usize, p: f64| pct(&lat[i], p) - pct(&lat[0], p);
        for (i, name) in [(1, "trellis (QUIC between gateways)"), (3, "trellis (TCP between gateways)"), (2, "haproxy")] {
            println!("{name} hop adds: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms", added(i, 50.0), added(i, 99.0), added(i, 99.9));
        }
        for (i, name) in [(1, "trellis QUIC"), (3, "trellis TCP")] {
            println!(
                "{name} / haproxy added latency: p50 {:.2}x, p99 {:.2}x, p99.9 {:.2}x",
                added(i, 50.0) / added(2, 50.0),
                added(i, 99.0) / added(2, 99.0),
                added(i, 99.9) / added(2, 99.9)
            );
        }
        let mut rps = Vec::new();
        for (_, addr) in &paths {
            rps.push(throughput(&c, *addr, o.seconds, 64).await);
        }
        println!(
            "throughput (64 connections): direct {:.0}, trellis QUIC {:.0}, trellis TCP {:.0}, haproxy {:.0} requests/s; trellis/haproxy QUIC {:.2}x, TCP {:.2}x",
            rps[0],
            rps[1],
            rps[3],
            rps[2],
            rps[1] / rps[2],
            rps[3] / rps[2]
        );
    });
    drop(f);

    // Phase B: a 50 ms WAN between the gateways.
    println!("gateway: phase B, 50 ms round trip between the gateways ({} new connections each, one after another)", o.new_conns);
    let relay_at: SocketAddr = "127.82.2.99:8443".parse().unwrap();
    let bind: SocketAddr = "127.82.2.9:9443".parse().unwrap();
    let relay = wan_relay::WanRelay::start(wan_relay::RelayConfig::new(relay_at, bind, Duration::from_millis(25))).expect("relay");
    let f = federation(&bin, 82, relay_at, bind, app);
    let c = caller(&f);
    let quic_ms = rt.block_on(async {
        // Until the gateways have their leaves and the QUIC tunnel is up, the first calls may
        // ride TCP: warm up until a new connection costs two round trips.
        let warm = Instant::now();
        loop {
            let t = Instant::now();
            let ok = async {
                let mut s = connect(&c, f.gw1).await?;
                request(&mut s).await
            }
            .await;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if (ok.is_ok() && ms < 130.0) || warm.elapsed() > Duration::from_secs(90) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        new_connections(&c, f.gw1, o.new_conns).await
    });
    drop(relay);
    // The same WAN with UDP not getting through: TCP passthrough between the gateways.
    let mut cfg = wan_relay::RelayConfig::new(relay_at, bind, Duration::from_millis(25));
    cfg.udp = false;
    let relay = wan_relay::WanRelay::start(cfg).expect("relay (tcp only)");
    let tcp_ms = rt.block_on(async {
        // The gateway notices that UDP is gone on the first calls (they wait for a first answer
        // that never comes, then go over TCP): not counted.
        new_connections(&c, f.gw1, 5).await;
        new_connections(&c, f.gw1, o.new_conns).await
    });
    println!("{:<22} {:>8} {:>8} {:>8}   ms, new connection to first answer", "", "p50", "p90", "p99");
    for (name, v) in [("QUIC tunnel", &quic_ms), ("TCP passthrough", &tcp_ms)] {
        println!("{name:<22} {:>8.1} {:>8.1} {:>8.1}", pctf(v, 50.0), pctf(v, 90.0), pctf(v, 99.0));
    }
    println!("QUIC / TCP: p50 {:.2}x, p99 {:.2}x", pctf(&quic_ms, 50.0) / pctf(&tcp_ms, 50.0), pctf(&quic_ms, 99.0) / pctf(&tcp_ms, 99.0));
    let st = relay.stats();
    println!("relay (tcp only): {} TCP connections, {} UDP datagrams", st.tcp_connections, st.udp_datagrams_up);
    drop(f);
}
