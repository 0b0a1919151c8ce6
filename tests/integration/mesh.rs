//! The service mesh with real agents: sidecar proxies in the agent's process and standalone,
//! mutual TLS with SPIFFE identities, intentions on new and established connections, root
//! rotation under traffic, failover past a dead instance, and a call across datacenters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{BIN, Cluster, SOON, eventually};

/// An app on 127.0.0.1 (where sidecars find their local app by default) that answers every
/// read with `<name>:<what it read>`; runs until the test ends.
async fn echo_app(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let mut out = format!("{name}:").into_bytes();
                            out.extend_from_slice(&buf[..n]);
                            if s.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    port
}

/// One request on a new connection: the answer, or why there was none.
async fn call(addr: SocketAddr, msg: &str) -> Result<String, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(msg.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        read_answer(&mut s).await
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.map_err(|_| "timed out".to_string())?
}

async fn read_answer(s: &mut TcpStream) -> Result<String, String> {
    let mut buf = vec![0u8; 4096];
    match s.read(&mut buf).await {
        Ok(0) => Err("closed without an answer".into()),
        Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) => Err(format!("read: {e}")),
    }
}

async fn register(c: &Cluster, agent: usize, def: Value) {
    let (status, body) = c.put(&format!("{}/v1/agent/service/register", c.servers[agent].http()), def.to_string()).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

async fn service_port(c: &Cluster, agent: usize, id: &str) -> u16 {
    let v = c.get_json(&format!("{}/v1/agent/service/{id}", c.servers[agent].http())).await.unwrap();
    v["Port"].as_u64().unwrap() as u16
}

/// Wait until `addr` carries a request to an app whose answers start with `prefix`.
async fn wait_for_path(addr: SocketAddr, prefix: &str) {
    eventually(&format!("{addr} to reach {prefix}"), SOON, || async { call(addr, "ping").await.ok().filter(|a| a.starts_with(prefix)) }).await;
}

/// A TLS client for the public listener: presents `identity` (or nothing), accepts any server.
async fn tls_call(addr: SocketAddr, identity: Option<(String, String)>) -> Result<String, String> {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let certs = rustls_pemfile::certs(&mut cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
            let key = rustls_pemfile::private_key(&mut key.as_bytes()).unwrap().unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let name = rustls::pki_types::ServerName::try_from("mesh").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = vec![0u8; 1024];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed without an answer".to_string()),
            Ok(n) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => Err(format!("read: {e}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.map_err(|_| "timed out".to_string())?
}

/// A leaf for `spiffe_uri` from a CA that is not the mesh's.
fn foreign_leaf(spiffe_uri: &str) -> (String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(spiffe_uri.try_into().unwrap())];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn leaf(c: &Cluster, agent: usize, service: &str) -> Value {
    c.get_json(&format!("{}/v1/agent/connect/ca/leaf/{service}", c.servers[agent].http())).await.unwrap()
}

async fn set_intention(c: &Cluster, agent: usize, source: &str, destination: &str, action: &str) {
    let url = format!("{}/v1/connect/intentions/exact?source={source}&destination={destination}", c.servers[agent].http());
    let (status, body) = c.put(&url, json!({ "Action": action }).to_string()).await.unwrap();
    assert_eq!(status, 200, "{body}");
}

/// What this test does:
/// - a server and a client agent each run `db` with a sidecar; `web` on the server has `db` as
///   an upstream; both agents run the sidecars in their own process;
/// - the upstream port reaches both `db` instances (round robin), and DNS
///   `db.connect.consul` lists both sidecars;
/// - the db sidecar's public port refuses plain TCP, TLS without a certificate and a leaf
///   for `web` from another CA, while `web`'s real leaf gets through, and `openssl s_client`
///   shows the sidecar's SPIFFE URI;
/// - a deny intention closes an established connection and refuses new ones; allow restores
///   them;
/// - SIGKILL of the client agent (its db instance with it): every following request still
///   succeeds, on the remaining instance.
#[tokio::test(flavor = "multi_thread")]
async fn sidecars_carry_mesh_traffic_and_refuse_everything_else() {
    let mut c = Cluster::start_with(1, 1, &[]).await;
    let (sip, cip) = (c.servers[0].ip.clone(), c.servers[1].ip.clone());
    let db1 = echo_app("db1").await;
    let db2 = echo_app("db2").await;
    let web = echo_app("web").await;
    register(&c, 0, json!({"ID": "db", "Name": "db", "Port": db1, "Connect": {"SidecarService": {}}})).await;
    register(&c, 1, json!({"ID": "db", "Name": "db", "Port": db2, "Connect": {"SidecarService": {}}})).await;
    let upstream: SocketAddr = format!("{sip}:19191").parse().unwrap();
    register(
        &c,
        0,
        json!({"Name": "web", "Port": web, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "db", "LocalBindAddress": sip, "LocalBindPort": 19191}
        ]}}}}),
    )
    .await;
    wait_for_path(upstream, "db").await;
    // Both instances serve (once the catalog lists both sidecars as passing).
    eventually("both db instances to answer through the upstream", SOON, || async {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            seen.insert(call(upstream, "x").await.ok()?.split(':').next()?.to_string());
        }
        (seen.len() == 2).then_some(())
    })
    .await;

    // DNS: the sidecars of db, as <svc>.connect.consul.
    let dns: SocketAddr = format!("{sip}:8600").parse().unwrap();
    let ips = eventually("db.connect.consul to list both sidecars", SOON, || async {
        let m = crate::dns::ask(dns, "db.connect.consul.", hickory_proto::rr::RecordType::A).await?;
        let ips = crate::dns::a_records(&m);
        (ips.len() == 2).then_some(ips)
    })
    .await;
    assert_eq!(ips, {
        let mut v = vec![sip.clone(), cip.clone()];
        v.sort();
        v
    });

    // The public listener: only mesh TLS with a mesh identity.
    let public: SocketAddr = format!("{sip}:{}", service_port(&c, 0, "db-sidecar-proxy").await).parse().unwrap();
    // Plain TCP gets at most a TLS alert, never the app.
    let plain = call(public, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(!plain.as_deref().is_ok_and(|a| a.contains("db")), "plain TCP reached the app: {plain:?}");
    let anonymous = tls_call(public, None).await;
    assert!(anonymous.is_err(), "TLS without a certificate got an answer: {anonymous:?}");
    let web_leaf = leaf(&c, 0, "web").await;
    let foreign = tls_call(public, Some(foreign_leaf(web_leaf["ServiceURI"].as_str().unwrap()))).await;
    assert!(foreign.is_err(), "a certificate from another CA got an answer: {foreign:?}");
    let genuine = tls_call(public, Some((web_leaf["CertPEM"].as_str().unwrap().into(), web_leaf["PrivateKeyPEM"].as_str().unwrap().into()))).await;
    assert_eq!(genuine.as_deref(), Ok("db1:ping"), "the mesh leaf of web is refused");

    // openssl shows the sidecar's identity.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("web.pem"), dir.path().join("web-key.pem"));
    std::fs::write(&cert, web_leaf["CertPEM"].as_str().unwrap()).unwrap();
    std::fs::write(&key, web_leaf["PrivateKeyPEM"].as_str().unwrap()).unwrap();
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", "-connect", &public.to_string(), "-showcerts"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out).await.expect("openssl s_client hung").expect("openssl is installed");
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    let first_cert: String = shown
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .map(|b| {
            format!("-----BEGIN CERTIFICATE-----{}", b.split("-----END CERTIFICATE-----").next().unwrap_or_default()) + "-----END CERTIFICATE-----\n"
        })
        .expect("s_client printed the server certificate");
    let mut x509 = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(x509.stdin.as_mut().unwrap(), first_cert.as_bytes()).unwrap();
    let san = String::from_utf8_lossy(&x509.wait_with_output().unwrap().stdout).to_string();
    let trust_domain = web_leaf["ServiceURI"].as_str().unwrap().trim_start_matches("spiffe://").split('/').next().unwrap().to_string();
    assert!(san.contains(&format!("URI:spiffe://{trust_domain}/ns/default/dc/dc1/svc/db")), "{san}");

    // Deny: the established connection is closed and new ones are refused; allow restores.
    let mut held = TcpStream::connect(upstream).await.unwrap();
    let mut answered = Vec::new();
    for _ in 0..2 {
        held.write_all(b"held").await.unwrap();
        answered.push(read_answer(&mut held).await.unwrap());
    }
    assert!(answered.iter().all(|a| a.ends_with(":held")), "{answered:?}");
    let denied_at = Instant::now();
    set_intention(&c, 0, "web", "db", "deny").await;
    let closed = tokio::time::timeout(SOON, async {
        let mut buf = [0u8; 64];
        loop {
            match held.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the established connection stayed open after the deny");
    eprintln!("deny closed the established connection after {:?}", denied_at.elapsed());
    // Each destination sidecar (db1 and db2 run on different agents) learns the deny through
    // its own blocking query, so the other one may take a moment longer: wait until new
    // connections are refused whichever instance they go to (six in a row, round robin).
    eventually("every new connection to be refused after the deny", SOON, || async {
        for _ in 0..6 {
            if call(upstream, "after-deny").await.is_ok() {
                return None;
            }
        }
        Some(())
    })
    .await;
    set_intention(&c, 0, "web", "db", "allow").await;
    wait_for_path(upstream, "db").await;

    // An instance that dies is skipped: its connects fail and go to the other instance.
    let kill_at = c.servers.iter().position(|s| s.name == "c1").unwrap();
    c.kill(kill_at);
    for i in 0..30 {
        let a = call(upstream, &format!("after-kill-{i}")).await;
        assert_eq!(a.as_deref().ok().map(|a| a.starts_with("db1:")), Some(true), "request {i} after the kill: {a:?}");
    }
}

/// What this test does: one server running db and web with sidecars, a steady stream of
/// requests through web's upstream (new connections, plus one long-lived connection), and a
/// CA key change (P-256 to P-384) that rotates the root. The stream runs until both sidecars
/// have leaves from the new root (each agent renews within Consul's 30 s jitter) and a while
/// after; no request may fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_rotation_under_traffic_loses_no_request() {
    let c = Cluster::start(1).await;
    let ip = c.servers[0].ip.clone();
    let db = echo_app("db").await;
    register(&c, 0, json!({"Name": "db", "Port": db, "Connect": {"SidecarService": {}}})).await;
    register(
        &c,
        0,
        json!({"Name": "web", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "db", "LocalBindAddress": ip, "LocalBindPort": 19192}
        ]}}}}),
    )
    .await;
    let upstream: SocketAddr = format!("{ip}:19192").parse().unwrap();
    wait_for_path(upstream, "db").await;
    let before = (leaf(&c, 0, "db").await["SerialNumber"].clone(), leaf(&c, 0, "web").await["SerialNumber"].clone());

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let traffic = {
        let (stop, ok, failed, errors) = (stop.clone(), ok.clone(), failed.clone(), errors.clone());
        tokio::spawn(async move {
            let mut long = TcpStream::connect(upstream).await.unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let fresh = call(upstream, &format!("r{i}")).await;
                let held = async {
                    long.write_all(format!("l{i}").as_bytes()).await.map_err(|e| e.to_string())?;
                    read_answer(&mut long).await
                }
                .await;
                for (what, r, want) in [("new", fresh, format!("db:r{i}")), ("held", held, format!("db:l{i}"))] {
                    match r {
                        Ok(a) if a == want => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            errors.lock().push(format!("{what} request {i}: {other:?}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
        })
    };
    let url = format!("{}/v1/connect/ca/configuration", c.servers[0].http());
    let (status, body) =
        c.put(&url, json!({"Provider": "consul", "Config": {"PrivateKeyType": "ec", "PrivateKeyBits": 384}}).to_string()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let roots = c.get_json(&format!("{}/v1/connect/ca/roots", c.servers[0].http())).await.unwrap();
    assert_eq!(roots["Roots"].as_array().unwrap().len(), 2, "the old root stays trusted: {roots}");
    eventually("both sidecars to hold leaves from the new root", Duration::from_secs(90), || async {
        let now = (leaf(&c, 0, "db").await["SerialNumber"].clone(), leaf(&c, 0, "web").await["SerialNumber"].clone());
        (now.0 != before.0 && now.1 != before.1).then_some(())
    })
    .await;
    // Traffic after both renewals, with both proxies on new leaves.
    let after = ok.load(Ordering::Relaxed);
    eventually("requests after the renewals", SOON, || async { (ok.load(Ordering::Relaxed) >= after + 40).then_some(()) }).await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed during the rotation: {:?}", errors.lock());
    assert!(ok.load(Ordering::Relaxed) > 80, "too little traffic to show anything");
}

/// What this test does: dc1 (primary) and dc2 federated over the WAN; db runs in dc2 with a
/// sidecar, web in dc1 with an upstream to db in dc2. The call crosses datacenters with dc2's
/// leaf (from dc2's intermediate) verified in dc1 and back; an intention denying web written
/// in dc2 is enforced by dc2's sidecar; deleting it restores the path.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_calls_another_datacenter_through_the_mesh() {
    let dcs = Cluster::start_federation(&[("dc1", 1, 0), ("dc2", 1, 0)], &["--primary-datacenter", "dc1"]).await;
    let (dc1, dc2) = (&dcs[0], &dcs[1]);
    let ip1 = dc1.servers[0].ip.clone();
    let db = echo_app("db-dc2").await;
    register(dc2, 0, json!({"Name": "db", "Port": db, "Connect": {"SidecarService": {}}})).await;
    register(
        dc1,
        0,
        json!({"Name": "web", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "db", "Datacenter": "dc2", "LocalBindAddress": ip1, "LocalBindPort": 19193}
        ]}}}}),
    )
    .await;
    let upstream: SocketAddr = format!("{ip1}:19193").parse().unwrap();
    wait_for_path(upstream, "db-dc2").await;
    // dc2 signs with its own intermediate under dc1's root.
    let l2 = leaf(dc2, 0, "db").await;
    assert!(l2["ServiceURI"].as_str().unwrap().contains("/dc/dc2/svc/db"), "{l2}");
    assert!(l2["CertPEM"].as_str().unwrap().matches("BEGIN CERTIFICATE").count() >= 2, "dc2's leaf carries its intermediate");

    set_intention(dc2, 0, "web", "db", "deny").await;
    eventually("the deny written in dc2 to refuse web", SOON, || async { call(upstream, "x").await.is_err().then_some(()) }).await;
    let del = dc2.http.delete(format!("{}/v1/connect/intentions/exact?source=web&destination=db", dc2.servers[0].http())).send().await.unwrap();
    assert!(del.status().is_success());
    wait_for_path(upstream, "db-dc2").await;
}

/// What this test does: an agent with `connect { run_sidecars = false }` and the two sidecars
/// run as `trellis connect proxy --sidecar-for <id>` processes; the call goes through them,
/// and a proxy for an unknown service fails with a message naming it.
#[tokio::test(flavor = "multi_thread")]
async fn standalone_sidecar_processes_carry_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.hcl");
    std::fs::write(&cfg, "connect {\n  run_sidecars = false\n}\n").unwrap();
    let c = Cluster::start_with(1, 0, &["--config-file", cfg.to_str().unwrap()]).await;
    let ip = c.servers[0].ip.clone();
    let db = echo_app("db").await;
    register(&c, 0, json!({"ID": "db", "Name": "db", "Port": db, "Connect": {"SidecarService": {}}})).await;
    register(
        &c,
        0,
        json!({"ID": "web", "Name": "web", "Port": 1, "Connect": {"SidecarService": {"Proxy": {"Upstreams": [
            {"DestinationName": "db", "LocalBindAddress": ip, "LocalBindPort": 19194}
        ]}}}}),
    )
    .await;
    let upstream: SocketAddr = format!("{ip}:19194").parse().unwrap();
    // Nothing listens until the proxies run.
    assert!(TcpStream::connect(upstream).await.is_err(), "the agent runs sidecars despite run_sidecars = false");
    struct Killed(Vec<std::process::Child>);
    impl Drop for Killed {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let spawn = |id: &str| {
        std::process::Command::new(BIN)
            .args(["connect", "proxy", "--sidecar-for", id, "--http-addr", &c.servers[0].http()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let _procs = Killed(vec![spawn("db"), spawn("web")]);
    wait_for_path(upstream, "db:").await;
    let out =
        std::process::Command::new(BIN).args(["connect", "proxy", "--sidecar-for", "nope", "--http-addr", &c.servers[0].http()]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sidecar proxy is registered for service \"nope\""), "{out:?}");
}

/// What this test does: config entries belong to the primary datacenter. A write sent to dc2
/// is forwarded to dc1 and replicated back into dc2's own state; with dc1's server stopped,
/// dc2 keeps serving what it has and refuses writes with an error; when dc1 returns, an entry
/// written there and a deletion reach dc2.
#[tokio::test(flavor = "multi_thread")]
async fn config_entries_are_owned_by_the_primary_and_replicated_to_secondaries() {
    let mut dcs = Cluster::start_federation(&[("dc1", 1, 0), ("dc2", 1, 0)], &["--primary-datacenter", "dc1"]).await;
    let (h1, h2) = (dcs[0].servers[0].http(), dcs[1].servers[0].http());
    let entry = |name: &str, protocol: &str| json!({"Kind": "service-defaults", "Name": name, "Protocol": protocol}).to_string();
    let (status, body) = dcs[1].put(&format!("{h2}/v1/config"), entry("web", "http")).await.unwrap();
    assert_eq!((status, body.trim()), (200, "true"));
    let written = Instant::now();
    let in_primary = dcs[0].get_json(&format!("{h1}/v1/config/service-defaults/web")).await.unwrap();
    assert_eq!(in_primary["Protocol"], "http", "the write did not land in the primary");
    eventually("dc2 to replicate the entry", SOON, || async {
        let v = dcs[1].get_json(&format!("{h2}/v1/config/service-defaults/web")).await.ok()?;
        (v["Protocol"] == "http").then_some(())
    })
    .await;
    eprintln!("dc2 served the entry written through it {:?} after the write", written.elapsed());

    // The primary away: reads still answered from dc2's own state, writes refused.
    dcs[0].stop(0);
    let v = dcs[1].get_json(&format!("{h2}/v1/config/service-defaults/web")).await.unwrap();
    assert_eq!(v["Protocol"], "http");
    let (status, body) = dcs[1].put(&format!("{h2}/v1/config"), entry("api", "grpc")).await.unwrap();
    assert!(status >= 500, "a write with the primary down answered {status} {body}");
    assert!(!body.trim().is_empty(), "the refusal says nothing");

    // The primary back: new entries and deletions reach dc2.
    dcs[0].spawn(0);
    dcs[0].wait_for_leader().await;
    eventually("dc1 to accept writes again", SOON, || async {
        let (s, b) = dcs[0].put(&format!("{h1}/v1/config"), entry("api", "grpc")).await.ok()?;
        (s == 200 && b.trim() == "true").then_some(())
    })
    .await;
    let del = dcs[0].http.delete(format!("{h1}/v1/config/service-defaults/web")).send().await.unwrap();
    assert!(del.status().is_success());
    eventually("dc2 to catch up with the primary", SOON, || async {
        let list = dcs[1].get_json(&format!("{h2}/v1/config/service-defaults")).await.ok()?;
        let names: Vec<&str> = list.as_array()?.iter().filter_map(|e| e["Name"].as_str()).collect();
        (names == ["api"]).then_some(())
    })
    .await;
}
