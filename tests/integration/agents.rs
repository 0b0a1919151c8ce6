//! Client agents: gossip membership, local services and checks, anti-entropy, leave and failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::harness::{Cluster, SOON, eventually};

/// A tiny HTTP endpoint for HTTP checks whose answer the test flips.
async fn health_endpoint(ip: &str) -> (String, Arc<AtomicBool>) {
    let healthy = Arc::new(AtomicBool::new(true));
    let flag = healthy.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let ok = flag.load(Ordering::SeqCst);
            async move { if ok { (axum::http::StatusCode::OK, "fine") } else { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "broken") } }
        }),
    );
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/health"), healthy)
}

async fn check_status(c: &Cluster, base: &str, node: &str, check: &str) -> Option<String> {
    let v = c.get_json(&format!("{base}/v1/health/node/{node}")).await.ok()?;
    v.as_array()?.iter().find(|x| x["CheckID"] == check).map(|x| x["Status"].as_str().unwrap_or("").to_string())
}

async fn wait_status(c: &Cluster, base: &str, node: &str, check: &str, want: &str) {
    eventually(&format!("{node}/{check} to be {want}"), SOON, || async {
        (check_status(c, base, node, check).await.as_deref() == Some(want)).then_some(())
    })
    .await;
}

/// What this test does:
/// - starts 3 servers and 3 clients on their own addresses, clients joining through gossip,
/// - checks every agent lists all six members alive with their roles,
/// - checks a client answers catalog reads (forwarded to the servers) and the datacenter's
///   catalog holds all six nodes with a passing serfHealth.
#[tokio::test(flavor = "multi_thread")]
async fn clients_join_through_gossip_and_see_every_member() {
    let c = Cluster::start_with(3, 3, &[]).await;
    for s in &c.servers {
        let url = format!("{}/v1/agent/members", s.http());
        eventually(&format!("{} to see six alive members", s.name), SOON, || async {
            let v = c.get_json(&url).await.ok()?;
            let alive = v.as_array()?.iter().filter(|m| m["Status"] == 1).count();
            (alive == 6).then_some(v)
        })
        .await;
    }
    let client = &c.servers[4];
    let members = c.get_json(&format!("{}/v1/agent/members", client.http())).await.unwrap();
    let servers = members.as_array().unwrap().iter().filter(|m| m["Tags"]["role"] == "consul").count();
    assert_eq!(servers, 3);
    let nodes = c.get_json(&format!("{}/v1/catalog/nodes", client.http())).await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 6, "{nodes}");
    let me = c.get_json(&format!("{}/v1/agent/self", client.http())).await.unwrap();
    assert_eq!(me["Config"]["Server"], false);
    // KV through a client is forwarded to the servers.
    let (st, _) = c.put(&format!("{}/v1/kv/from-client", client.http()), "hi").await.unwrap();
    assert_eq!(st, 200);
    let raw = c.http.get(format!("{}/v1/kv/from-client?raw", c.servers[0].http())).send().await.unwrap().text().await.unwrap();
    assert_eq!(raw, "hi");
}

/// What this test does:
/// - registers a service with HTTP, TCP and TTL checks through a client's agent API,
/// - checks the catalog shows them and each check follows its target (HTTP 500 -> critical,
///   closed port -> critical, TTL pass/fail/expiry),
/// - restarts the client and finds the registration still there (persisted locally),
/// - deregisters it and sees it leave the catalog.
#[tokio::test(flavor = "multi_thread")]
async fn services_and_checks_registered_on_a_client_follow_their_targets() {
    let mut c = Cluster::start_with(1, 1, &[]).await;
    let (client_i, server) = (1, c.servers[0].http());
    let client = c.servers[client_i].http();
    let (http_url, healthy) = health_endpoint(&c.servers[client_i].ip).await;
    let tcp = tokio::net::TcpListener::bind(format!("{}:0", c.servers[client_i].ip)).await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap().to_string();
    let body = json!({
        "Name": "web", "ID": "web-1", "Port": 8080, "Tags": ["v1"],
        "Checks": [
            {"CheckID": "web-http", "Name": "http", "HTTP": http_url, "Interval": "1s", "Timeout": "1s"},
            {"CheckID": "web-tcp", "Name": "tcp", "TCP": tcp_addr, "Interval": "1s", "Timeout": "1s"},
            {"CheckID": "web-ttl", "Name": "ttl", "TTL": "3s"},
        ]
    });
    let (st, msg) = c.put(&format!("{client}/v1/agent/service/register"), body.to_string()).await.unwrap();
    assert_eq!(st, 200, "{msg}");
    wait_status(&c, &server, "c1", "web-http", "passing").await;
    wait_status(&c, &server, "c1", "web-tcp", "passing").await;
    let svc = c.get_json(&format!("{server}/v1/catalog/service/web")).await.unwrap();
    assert_eq!(svc[0]["ServiceID"], "web-1");
    assert_eq!(svc[0]["Node"], "c1");

    healthy.store(false, Ordering::SeqCst);
    wait_status(&c, &server, "c1", "web-http", "critical").await;
    healthy.store(true, Ordering::SeqCst);
    wait_status(&c, &server, "c1", "web-http", "passing").await;
    drop(tcp);
    wait_status(&c, &server, "c1", "web-tcp", "critical").await;

    for (verb, want) in [("pass", "passing"), ("warn", "warning"), ("fail", "critical"), ("pass", "passing")] {
        let (st, msg) = c.put(&format!("{client}/v1/agent/check/{verb}/web-ttl?note=from-test"), "").await.unwrap();
        assert_eq!(st, 200, "{msg}");
        wait_status(&c, &server, "c1", "web-ttl", want).await;
    }
    // Not renewed: the TTL runs out and the check turns critical.
    wait_status(&c, &server, "c1", "web-ttl", "critical").await;
    let checks = c.get_json(&format!("{client}/v1/agent/checks")).await.unwrap();
    assert!(checks["web-ttl"]["Output"].as_str().unwrap().contains("TTL expired"), "{checks}");

    // Unknown checks and bad definitions are clear errors.
    let (st, _) = c.put(&format!("{client}/v1/agent/check/pass/nope"), "").await.unwrap();
    assert_eq!(st, 404);
    let (st, msg) =
        c.put(&format!("{client}/v1/agent/service/register"), r#"{"Name":"bad","Check":{"HTTP":"http://x","Interval":"zz"}}"#).await.unwrap();
    assert_eq!(st, 400, "{msg}");

    // Maintenance mode takes the service out of `?passing` and back.
    let passing = format!("{server}/v1/health/service/web?passing");
    c.put(&format!("{client}/v1/agent/check/pass/web-ttl"), "").await.unwrap();
    let tcp2 = tokio::net::TcpListener::bind(&tcp_addr).await.unwrap();
    eventually("web passing", SOON, || async { (c.get_json(&passing).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
    let (st, _) = c.put(&format!("{client}/v1/agent/service/maintenance/web-1?enable=true&reason=upgrade"), "").await.unwrap();
    assert_eq!(st, 200);
    eventually("web out of rotation", SOON, || async { c.get_json(&passing).await.ok()?.as_array()?.is_empty().then_some(()) }).await;
    c.put(&format!("{client}/v1/agent/service/maintenance/web-1?enable=false"), "").await.unwrap();
    c.put(&format!("{client}/v1/agent/check/pass/web-ttl"), "").await.unwrap();
    eventually("web back in rotation", SOON, || async { (c.get_json(&passing).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
    drop(tcp2);

    c.stop(client_i);
    c.spawn(client_i);
    let url = format!("{client}/v1/agent/services");
    eventually("the persisted service after restart", SOON, || async { c.get_json(&url).await.ok()?.get("web-1").cloned() }).await;

    let (st, _) = c.put(&format!("{client}/v1/agent/service/deregister/web-1"), "").await.unwrap();
    assert_eq!(st, 200);
    eventually("the service to leave the catalog", SOON, || async {
        let v = c.get_json(&format!("{server}/v1/catalog/service/web")).await.ok()?;
        v.as_array()?.is_empty().then_some(())
    })
    .await;
}

/// What this test does:
/// - kills -9 a client and sees its serfHealth turn critical (its services drop out of
///   `?passing`), then restarts it and sees it pass again;
/// - makes another client leave gracefully and sees its node deregistered.
/// What this test does: registers and deregisters services and a check on a client agent
/// and reads the server's catalog right after each answer, with no waiting: as Consul's agent
/// endpoints, ours answer once the change has been synced to the catalog.
#[tokio::test(flavor = "multi_thread")]
async fn agent_endpoints_answer_once_the_catalog_has_the_change() {
    let c = Cluster::start_with(1, 1, &[]).await;
    let (server, client) = (c.servers[0].http(), c.servers[1].http());
    eventually("the client in the catalog", SOON, || async {
        let nodes = c.get_json(&format!("{server}/v1/catalog/nodes")).await.ok()?;
        nodes.as_array()?.iter().any(|n| n["Node"] == "c1").then_some(())
    })
    .await;
    for i in 0..5 {
        let name = format!("sync-{i}");
        let (st, msg) = c.put(&format!("{client}/v1/agent/service/register"), json!({"Name": name, "Port": 80 + i}).to_string()).await.unwrap();
        assert_eq!(st, 200, "{msg}");
        let svc = c.get_json(&format!("{server}/v1/catalog/service/{name}")).await.unwrap();
        assert_eq!(svc.as_array().unwrap().len(), 1, "{name} not in the catalog when its registration returned");
        let check = json!({"CheckID": format!("{name}-ttl"), "Name": "ttl", "TTL": "60s", "ServiceID": name});
        let (st, msg) = c.put(&format!("{client}/v1/agent/check/register"), check.to_string()).await.unwrap();
        assert_eq!(st, 200, "{msg}");
        let checks = c.get_json(&format!("{server}/v1/health/checks/{name}")).await.unwrap();
        assert_eq!(checks.as_array().unwrap().len(), 1, "{name}'s check not in the catalog when its registration returned");
        let (st, msg) = c.put(&format!("{client}/v1/agent/service/deregister/{name}"), "").await.unwrap();
        assert_eq!(st, 200, "{msg}");
        let svc = c.get_json(&format!("{server}/v1/catalog/service/{name}")).await.unwrap();
        assert_eq!(svc, json!([]), "{name} still in the catalog when its deregistration returned");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_clients_turn_critical_and_leaving_clients_are_deregistered() {
    let mut c = Cluster::start_with(3, 2, &[]).await;
    let server = c.servers[0].http();
    let client = c.servers[3].http();
    let (st, msg) = c.put(&format!("{client}/v1/agent/service/register"), r#"{"Name":"api","Port":9000}"#).await.unwrap();
    assert_eq!(st, 200, "{msg}");
    eventually("the api service passing", SOON, || async {
        let v = c.get_json(&format!("{server}/v1/health/service/api?passing")).await.ok()?;
        (v.as_array()?.len() == 1).then_some(())
    })
    .await;
    c.kill(3);
    wait_status(&c, &server, "c1", "serfHealth", "critical").await;
    let passing = c.get_json(&format!("{server}/v1/health/service/api?passing")).await.unwrap();
    assert!(passing.as_array().unwrap().is_empty(), "{passing}");
    c.spawn(3);
    wait_status(&c, &server, "c1", "serfHealth", "passing").await;

    let c2 = c.servers[4].http();
    let (st, _) = c.put(&format!("{c2}/v1/agent/leave"), "").await.unwrap();
    assert_eq!(st, 200);
    eventually("c2 to be deregistered after leaving", SOON, || async {
        let v = c.get_json(&format!("{server}/v1/catalog/nodes")).await.ok()?;
        (!v.as_array()?.iter().any(|n| n["Node"] == "c2")).then_some(())
    })
    .await;
    let members = c.get_json(&format!("{server}/v1/agent/members")).await.unwrap();
    assert!(members.as_array().unwrap().iter().any(|m| m["Name"] == "c2" && m["Status"] == 3), "{members}");
}

/// What this test does: deletes a client's service through the catalog API, behind the
/// agent's back, and checks anti-entropy puts it back.
#[tokio::test(flavor = "multi_thread")]
async fn anti_entropy_restores_a_service_deleted_through_the_catalog() {
    // Agents that read a short anti-entropy period from a config file.
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("ae.json");
    std::fs::write(&cfg_path, r#"{"ae_interval": "2s"}"#).unwrap();
    let c = Cluster::start_with(1, 1, &["--config-file", cfg_path.to_str().unwrap()]).await;
    let (server, client) = (c.servers[0].http(), c.servers[1].http());
    c.put(&format!("{client}/v1/agent/service/register"), r#"{"Name":"cache","Port":6379}"#).await.unwrap();
    let url = format!("{server}/v1/catalog/service/cache");
    eventually("cache in the catalog", SOON, || async { (c.get_json(&url).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
    let (st, _) = c.put(&format!("{server}/v1/catalog/deregister"), r#"{"Node":"c1","ServiceID":"cache"}"#).await.unwrap();
    assert_eq!(st, 200);
    eventually("anti-entropy to restore cache", SOON, || async { (c.get_json(&url).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
}

/// What this test does: runs an encrypted cluster and checks a client with the right key
/// joins while one with a wrong key never becomes a member.
#[tokio::test(flavor = "multi_thread")]
async fn gossip_encryption_keeps_out_a_node_with_the_wrong_key() {
    let key = trellis::membership::keygen();
    let mut c = Cluster::start_with(1, 1, &["--encrypt", &key]).await;
    let server = c.servers[0].http();
    let wrong = trellis::membership::keygen();
    let i = c.add_client(&["--encrypt", &wrong]);
    c.spawn(i);
    let intruder = c.servers[i].name.clone();
    // The intruder's agent runs, but no member ever sees it.
    let url = format!("{}/v1/agent/self", c.servers[i].http());
    eventually("the intruder agent to be up", SOON, || async { c.get_json(&url).await.ok() }).await;
    let me: Value = c.get_json(&format!("{server}/v1/agent/self")).await.unwrap();
    assert_eq!(me["Stats"]["serf_lan"]["encrypted"], "true");
    // Give gossip several probe rounds to (wrongly) admit it, by waiting on the good client's
    // view to be complete, then asserting the intruder is absent.
    eventually("the good client seen by the server", SOON, || async {
        let v = c.get_json(&format!("{server}/v1/agent/members")).await.ok()?;
        v.as_array()?.iter().any(|m| m["Name"] == "c1" && m["Status"] == 1).then_some(())
    })
    .await;
    let join = c.put(&format!("{}/v1/agent/join/{}", c.servers[i].http(), c.servers[0].ip), "").await.unwrap();
    assert_ne!(join.0, 200, "a node with the wrong key must not join: {}", join.1);
    let members = c.get_json(&format!("{server}/v1/agent/members")).await.unwrap();
    assert!(!members.as_array().unwrap().iter().any(|m| m["Name"] == intruder.as_str()), "{members}");
}

/// What this test does: fires a user event on one client and sees it listed on every agent,
/// and a service-filtered event reach only the agent running that service.
#[tokio::test(flavor = "multi_thread")]
async fn user_events_reach_the_agents_they_address() {
    let c = Cluster::start_with(1, 2, &[]).await;
    let (c1, c2) = (c.servers[1].http(), c.servers[2].http());
    c.put(&format!("{c2}/v1/agent/service/register"), r#"{"Name":"worker","Tags":["blue"]}"#).await.unwrap();
    let (st, body) = c.put(&format!("{c1}/v1/event/fire/deploy"), "v42").await.unwrap();
    assert_eq!(st, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["ID"].as_str().unwrap().to_string();
    for s in &c.servers {
        let url = format!("{}/v1/event/list?name=deploy", s.http());
        eventually(&format!("the event on {}", s.name), SOON, || async {
            let v = c.get_json(&url).await.ok()?;
            v.as_array()?.iter().any(|e| e["ID"] == id.as_str() && e["Payload"] == "djQy").then_some(())
        })
        .await;
    }
    let (st, _) = c.put(&format!("{c1}/v1/event/fire/restart?service=worker&tag=blue"), "").await.unwrap();
    assert_eq!(st, 200);
    eventually("the filtered event on c2", SOON, || async {
        let v = c.get_json(&format!("{c2}/v1/event/list?name=restart")).await.ok()?;
        (v.as_array()?.len() == 1).then_some(())
    })
    .await;
    let on_c1 = c.get_json(&format!("{c1}/v1/event/list?name=restart")).await.unwrap();
    assert!(on_c1.as_array().unwrap().is_empty(), "c1 runs no worker: {on_c1}");
}

/// What this test does: rotates the gossip key of a running encrypted cluster through the
/// keyring API (install, use, remove) and checks every member follows each step and stays.
#[tokio::test(flavor = "multi_thread")]
async fn gossip_key_rotation_reaches_every_member() {
    let old = trellis::membership::keygen();
    let c = Cluster::start_with(1, 2, &["--encrypt", &old]).await;
    let (server, client) = (c.servers[0].http(), c.servers[1].http());
    let new = trellis::membership::keygen();
    let keys_on = |want: Vec<(String, u64)>| {
        let url = format!("{server}/v1/operator/keyring");
        let http = c.http.clone();
        async move {
            eventually(&format!("keyring {want:?}"), SOON, || async {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                let keys = v[0]["Keys"].as_object()?;
                (keys.len() == want.len() && want.iter().all(|(k, n)| keys.get(k).and_then(Value::as_u64) == Some(*n))).then_some(v)
            })
            .await
        }
    };
    let body = json!({ "Key": new }).to_string();
    let r = c.http.post(format!("{client}/v1/operator/keyring")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    keys_on(vec![(old.clone(), 3), (new.clone(), 3)]).await;
    assert_eq!(c.http.put(format!("{client}/v1/operator/keyring")).body(body).send().await.unwrap().status(), 200);
    eventually("the new key primary everywhere", SOON, || async {
        let v: Value = c.http.get(format!("{server}/v1/operator/keyring")).send().await.ok()?.json().await.ok()?;
        (v[0]["PrimaryKeys"][new.as_str()].as_u64() == Some(3)).then_some(())
    })
    .await;
    let gone = json!({ "Key": old }).to_string();
    assert_eq!(c.http.delete(format!("{client}/v1/operator/keyring")).body(gone).send().await.unwrap().status(), 200);
    keys_on(vec![(new.clone(), 3)]).await;
    let members = c.get_json(&format!("{server}/v1/agent/members")).await.unwrap();
    assert_eq!(members.as_array().unwrap().iter().filter(|m| m["Status"] == 1).count(), 3, "{members}");
    // Removing the primary key is refused.
    let r = c.http.delete(format!("{client}/v1/operator/keyring")).body(json!({ "Key": new }).to_string()).send().await.unwrap();
    assert_eq!(r.status(), 400);
}

/// Register a service on an agent that may still be starting.
async fn register_when_up(c: &Cluster, agent: &str, body: &'static str) {
    let url = format!("{agent}/v1/agent/service/register");
    eventually("the agent to take a registration", SOON, || async { (c.put(&url, body).await.ok()?.0 == 200).then_some(()) }).await
}

/// What this test does: an encrypted cluster whose servers allow auto-encrypt; a client given
/// only the CA gets a `client.dc1.consul` certificate from them, syncs a service through RPC
/// with it, and after a restart reuses the stored certificate.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_with_only_the_ca_gets_its_certificate_from_the_servers() {
    let conf = tempfile::tempdir().unwrap();
    let (server_hcl, client_hcl) = (conf.path().join("server.hcl"), conf.path().join("client.hcl"));
    std::fs::write(&server_hcl, "auto_encrypt {\n  allow_tls = true\n}\n").unwrap();
    std::fs::write(&client_hcl, "auto_encrypt {\n  tls = true\n}\n").unwrap();
    let key = trellis::membership::keygen();
    let mut c = Cluster::start_with(1, 0, &["--encrypt", &key, "--config-file", server_hcl.to_str().unwrap()]).await;
    let server = c.servers[0].http();
    let i = c.add_auto_encrypt_client(&["--encrypt", &key, "--config-file", client_hcl.to_str().unwrap()]);
    c.spawn(i);
    let client = c.servers[i].http();
    register_when_up(&c, &client, r#"{"Name":"api","Port":9000}"#).await;
    // Anti-entropy reaches the catalog only over mTLS RPC, so the service showing up on the
    // server proves the client holds a certificate the server trusts.
    let url = format!("{server}/v1/catalog/service/api");
    eventually("the client's service in the catalog", SOON, || async { (c.get_json(&url).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
    let cert_path = c.servers[i].data_dir.join("auto-encrypt/cert.pem");
    let cert = std::fs::read_to_string(&cert_path).unwrap();
    let der = rustls_pemfile::certs(&mut cert.as_bytes()).next().unwrap().unwrap();
    assert_eq!(trellis::tls::dns_names(&der), vec!["client.dc1.consul".to_string()]);

    // Restart: the stored certificate is used again, and the agent still reaches the servers.
    c.stop(i);
    c.spawn(i);
    register_when_up(&c, &client, r#"{"Name":"api2","Port":9001}"#).await;
    let url = format!("{server}/v1/catalog/service/api2");
    eventually("the restarted client's new service in the catalog", SOON, || async {
        (c.get_json(&url).await.ok()?.as_array()?.len() == 1).then_some(())
    })
    .await;
    assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), cert, "a valid stored certificate is reused, not replaced");
    assert!(c.log(i).contains("using the stored auto-encrypt certificate"), "{}", c.log(i));
}
