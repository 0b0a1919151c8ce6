//! Limits and hostile input against real agents: crafted durations, oversized bodies, too many
//! connections from one address, HTTPS with client certificates, and Raft replication of
//! values large enough that a naive batch would not fit in one RPC frame.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{Cluster, SOON, eventually};

/// Send raw bytes on a new connection to `addr` and read until the server closes it or
/// `within` passes; returns what came back.
async fn raw_exchange(addr: &str, request: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains("\r\n\r\n") && out.len() > 16 {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// What this test does:
/// - sends durations that overflow (in `?wait=`, a session TTL and lock delay, autopilot
///   settings and a prepared query's DNS TTL) and expects a 400 for each, with the agent fine;
/// - declares a 100 MiB KV body and expects a 413 before any of it is sent; streams a chunked
///   body past the KV limit and expects a 413; checks a body at the limit is taken;
/// - opens 300 connections from one address and expects exactly 100 of them answered 429.
#[tokio::test(flavor = "multi_thread")]
async fn crafted_durations_big_bodies_and_connection_floods_get_clear_refusals() {
    let c = Cluster::start(1).await;
    let s = c.servers[0].http();
    let host = format!("{}:8500", c.servers[0].ip);

    let r = c.http.get(format!("{s}/v1/kv/a?index=5&wait=99999999999999999999h")).send().await.unwrap();
    assert_eq!(r.status(), 400, "{}", r.text().await.unwrap());
    let r = c.http.get(format!("{s}/v1/kv/a?index=5&wait=2562047h47m16.854775808s")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    for body in [json!({"TTL": "9999999999999999h"}), json!({"LockDelay": "99999999999999999999h"}), json!({"TTL": "-10s"})] {
        let (st, text) = c.put(&format!("{s}/v1/session/create"), body.to_string()).await.unwrap();
        assert_eq!(st, 400, "{body}: {text}");
    }
    let (st, text) = c
        .put(&format!("{s}/v1/operator/autopilot/configuration"), json!({"LastContactThreshold": "999999999999999999999h"}).to_string())
        .await
        .unwrap();
    assert_eq!(st, 400, "{text}");
    let q = json!({"Name": "q", "Service": {"Service": "web"}, "DNS": {"TTL": "99999999999999999999s"}});
    let r = c.http.post(format!("{s}/v1/query")).body(q.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // A declared 100 MiB value is refused before a byte of it is sent.
    let head = format!("PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", 100 << 20);
    let got = raw_exchange(&host, head.as_bytes(), Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("limits.kv_max_value_size"), "{got}");
    // A chunked body that runs past the limit is cut off there.
    let chunk = vec![b'x'; 64 << 10];
    let mut req = b"PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..12 {
        req.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend(&chunk);
        req.extend(b"\r\n");
    }
    req.extend(b"0\r\n\r\n");
    let got = raw_exchange(&host, &req, Duration::from_secs(10)).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    let (st, _) = c.put(&format!("{s}/v1/kv/fits"), vec![b'y'; 512 << 10]).await.unwrap();
    assert_eq!(st, 200);
    let missing = c.http.get(format!("{s}/v1/kv/big")).send().await.unwrap();
    assert_eq!(missing.status(), 404, "no refused write took effect");

    // 300 connections from one address (one nobody else here uses): the default limit is 200
    // per client.
    let source: std::net::IpAddr = format!("{}.99", c.servers[0].ip.rsplit_once('.').unwrap().0).parse().unwrap();
    let mut conns = Vec::new();
    for _ in 0..300 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(std::net::SocketAddr::new(source, 0)).unwrap();
        conns.push(sock.connect(host.parse().unwrap()).await.unwrap());
    }
    let mut refused = 0;
    let mut served = 0;
    for conn in &mut conns {
        let _ = conn.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n").await;
    }
    for conn in &mut conns {
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(SOON, conn.read(&mut buf)).await.expect("every connection gets an answer").unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        if head.starts_with("HTTP/1.1 429") {
            refused += 1;
        } else if head.starts_with("HTTP/1.1 200") {
            served += 1;
        }
    }
    assert_eq!((served, refused), (200, 100), "answers to 300 connections from one address");
    drop(conns);
    // Closed connections free their places.
    eventually("new connections accepted again", SOON, || async {
        let got = raw_exchange(&host, b"GET /v1/status/leader HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(5)).await;
        got.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}

/// What this test does: an agent serving HTTPS with `verify_incoming` refuses a client
/// without a certificate and answers one with a certificate from the CA.
#[tokio::test(flavor = "multi_thread")]
async fn https_with_verify_incoming_requires_a_client_certificate() {
    let conf = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_with(1, 0, &[]).await;
    let server_tls = c.material(trellis::tls::CertKind::Server, "dc1");
    let (cert, key, ca) = (conf.path().join("https.pem"), conf.path().join("https-key.pem"), conf.path().join("ca.pem"));
    std::fs::write(&cert, &server_tls.cert_pem).unwrap();
    std::fs::write(&key, &server_tls.key_pem).unwrap();
    std::fs::write(&ca, &server_tls.ca_pem).unwrap();
    let hcl = conf.path().join("https.hcl");
    std::fs::write(
        &hcl,
        format!(
            "ports {{\n  https = 8501\n}}\ntls {{\n  https {{\n    cert_file = {:?}\n    key_file = {:?}\n    ca_file = {:?}\n    verify_incoming = true\n  }}\n}}\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.display().to_string()
        ),
    )
    .unwrap();
    c.stop(0);
    c.servers[0].extra = vec!["--config-file".into(), hcl.display().to_string()];
    c.spawn(0);
    c.wait_for_leader().await;
    let addr = format!("{}:8501", c.servers[0].ip);
    let anonymous = trellis::tls::anonymous_client_config(&server_tls.ca_pem).unwrap();
    let err = https_get(&addr, anonymous, "/v1/status/leader").await.unwrap_err();
    assert!(!err.is_empty(), "a client without a certificate is refused");
    let client_tls = c.material(trellis::tls::CertKind::Client, "dc1").client_config().unwrap();
    let leader = eventually("an answer over HTTPS", SOON, || async { https_get(&addr, client_tls.clone(), "/v1/status/leader").await.ok() }).await;
    assert!(leader.starts_with("HTTP/1.1 200") && leader.contains(":8300"), "{leader}");
}

/// One GET over TLS (the agent's RPC client configurations, with ALPN reset for HTTP).
async fn https_get(addr: &str, cfg: std::sync::Arc<rustls::ClientConfig>, path: &str) -> Result<String, String> {
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("server.dc1.consul").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.map_err(|e| e.to_string())?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    if out.is_empty() {
        return Err("no answer".into());
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// What this test does:
/// - stops one of three servers, writes 150 values of 512 KiB through the leader (75 MiB:
///   more than one RPC frame would hold in a single append),
/// - restarts the follower and checks it catches up on every value.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_catches_up_across_large_values() {
    let mut c = Cluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.servers.iter().position(|s| s.rpc() != leader).unwrap();
    c.stop(follower);
    let lead = c.index_of_rpc(&leader);
    let url = c.servers[lead].http();
    let value = vec![b'v'; 512 << 10];
    for i in 0..150 {
        let (st, body) = c.put(&format!("{url}/v1/kv/big/{i:03}"), value.clone()).await.unwrap();
        assert_eq!(st, 200, "{body}");
    }
    c.spawn(follower);
    let keys_url = format!("{}/v1/kv/big/?keys&stale", c.servers[follower].http());
    eventually("the follower to hold all 150 values", Duration::from_secs(90), || async {
        let keys = c.get_json(&keys_url).await.ok()?;
        (keys.as_array()?.len() == 150).then_some(())
    })
    .await;
    let r = c.http.get(format!("{}/v1/kv/big/149?raw&stale", c.servers[follower].http())).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 512 << 10);
}

/// What this test does: with a short `tombstone_ttl`, deleted keys' tombstones are reaped by
/// the leader through Raft (the tombstone gauge returns to zero), and the prefix's blocking
/// index never goes back.
#[tokio::test(flavor = "multi_thread")]
async fn deleted_keys_tombstones_are_reaped_and_indexes_stay_monotonic() {
    let conf = tempfile::tempdir().unwrap();
    let hcl = conf.path().join("gc.hcl");
    std::fs::write(&hcl, "tombstone_ttl = \"2s\"\n").unwrap();
    let c = Cluster::start_with(1, 0, &["--config-file", hcl.to_str().unwrap()]).await;
    let s = c.servers[0].http();
    for i in 0..20 {
        assert_eq!(c.put(&format!("{s}/v1/kv/gc/{i}"), "v").await.unwrap().0, 200);
    }
    let r = c.http.delete(format!("{s}/v1/kv/gc/?recurse")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let index = |r: &reqwest::Response| r.headers()["x-consul-index"].to_str().unwrap().parse::<u64>().unwrap();
    let after_delete = index(&c.http.get(format!("{s}/v1/kv/gc/?recurse")).send().await.unwrap());
    let gauge = |m: &serde_json::Value| {
        m["Gauges"].as_array().unwrap().iter().find(|g| g["Name"] == "consul.state.kv_tombstones").map(|g| g["Value"].as_f64().unwrap())
    };
    let m = c.get_json(&format!("{s}/v1/agent/metrics")).await.unwrap();
    assert!(gauge(&m).unwrap() >= 20.0, "{m}");
    eventually("the tombstones to be reaped", SOON, || async {
        let m = c.get_json(&format!("{s}/v1/agent/metrics")).await.ok()?;
        (gauge(&m)? == 0.0).then_some(())
    })
    .await;
    let after_reap = index(&c.http.get(format!("{s}/v1/kv/gc/?recurse")).send().await.unwrap());
    assert!(after_reap >= after_delete, "{after_reap} < {after_delete}");
}
