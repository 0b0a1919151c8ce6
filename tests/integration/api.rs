//! The HTTP API on one server: blocking queries, sessions, transactions, filters and bad input.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Cluster, SOON, eventually};

async fn index_of(c: &Cluster, url: &str) -> u64 {
    let r = c.http.get(url).send().await.unwrap();
    r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap()
}

/// What this test does:
/// - starts a blocking read of a key at its current index,
/// - writes the key, and checks the read returns with the new value and a higher index,
///   long before its wait would have run out;
/// - checks a blocking read on unchanged data returns after its wait with the same index.
#[tokio::test(flavor = "multi_thread")]
async fn blocking_query_wakes_when_its_data_changes() {
    let c = Cluster::start(1).await;
    let base = c.servers[0].http();
    c.put(&format!("{base}/v1/kv/watched"), "one").await.unwrap();
    let idx = index_of(&c, &format!("{base}/v1/kv/watched")).await;
    let http = c.http.clone();
    let url = format!("{base}/v1/kv/watched?index={idx}&wait=5m");
    let started = Instant::now();
    let waiter = tokio::spawn(async move { http.get(url).send().await.unwrap() });
    // An unrelated write must not answer it with the same data.
    c.put(&format!("{base}/v1/kv/other"), "x").await.unwrap();
    c.put(&format!("{base}/v1/kv/watched"), "two").await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), waiter).await.expect("blocking query never woke").unwrap();
    assert!(started.elapsed() < Duration::from_secs(300));
    let new_idx: u64 = resp.headers()["x-consul-index"].to_str().unwrap().parse().unwrap();
    assert!(new_idx > idx);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body[0]["Value"], "dHdv"); // "two"

    let t = Instant::now();
    let same = index_of(&c, &format!("{base}/v1/kv/watched?index={new_idx}&wait=1s")).await;
    assert_eq!(same, new_idx);
    assert!(t.elapsed() >= Duration::from_secs(1), "returned before its wait without a change");

    // Catalog reads block too.
    let cidx = index_of(&c, &format!("{base}/v1/health/service/api")).await;
    let http = c.http.clone();
    let url = format!("{base}/v1/health/service/api?index={cidx}&wait=5m");
    let waiter = tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() });
    let reg = json!({"Node": "n1", "Address": "10.0.0.1", "Service": {"Service": "api", "Port": 9000}});
    c.put(&format!("{base}/v1/catalog/register"), reg.to_string()).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(60), waiter).await.expect("catalog blocking query never woke").unwrap();
    assert_eq!(body[0]["Service"]["Port"], 9000);
}

/// What this test does:
/// - creates a session with a 10s TTL and takes a lock with it,
/// - checks a second session cannot take the same lock,
/// - never renews, and waits for the TTL (plus Consul's grace) to expire the session and
///   release the lock.
#[tokio::test(flavor = "multi_thread")]
async fn session_ttl_expiry_releases_its_lock() {
    let c = Cluster::start(1).await;
    let base = c.servers[0].http();
    // Sessions check the node's serfHealth; wait for the leader to register the server.
    eventually("the server's serfHealth check", SOON, || async {
        let v = c.get_json(&format!("{base}/v1/health/node/s1")).await.ok()?;
        (v.as_array()?.len() == 1).then_some(())
    })
    .await;
    let create = |ttl: &str| json!({"Name": "locker", "TTL": ttl, "LockDelay": "0s", "Behavior": "release"}).to_string();
    let (st, body) = c.put(&format!("{base}/v1/session/create"), create("10s")).await.unwrap();
    assert_eq!(st, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["ID"].as_str().unwrap().to_string();
    let (_, other) = c.put(&format!("{base}/v1/session/create"), create("")).await.unwrap();
    let other = serde_json::from_str::<Value>(&other).unwrap()["ID"].as_str().unwrap().to_string();

    assert_eq!(c.put(&format!("{base}/v1/kv/lock?acquire={id}"), "me").await.unwrap().1.trim(), "true");
    assert_eq!(c.put(&format!("{base}/v1/kv/lock?acquire={other}"), "them").await.unwrap().1.trim(), "false");
    let held = c.get_json(&format!("{base}/v1/kv/lock")).await.unwrap();
    assert_eq!(held[0]["Session"], id.as_str());
    assert_eq!(held[0]["LockIndex"], 1);

    // A too-short TTL is refused with Consul's message.
    let (st, msg) = c.put(&format!("{base}/v1/session/create"), create("5s")).await.unwrap();
    assert_eq!(st, 400);
    assert!(msg.contains("Invalid Session TTL"), "{msg}");

    let info = c.get_json(&format!("{base}/v1/session/info/{id}")).await.unwrap();
    assert_eq!(info[0]["TTL"], "10s");
    eventually("the session to expire and release the lock", Duration::from_secs(60), || async {
        let v = c.get_json(&format!("{base}/v1/kv/lock")).await.ok()?;
        v[0]["Session"].as_str().unwrap_or("").is_empty().then_some(())
    })
    .await;
    let gone = c.get_json(&format!("{base}/v1/session/info/{id}")).await.unwrap();
    assert_eq!(gone.as_array().unwrap().len(), 0);
    // With the lock free, the other session takes it.
    assert_eq!(c.put(&format!("{base}/v1/kv/lock?acquire={other}"), "them").await.unwrap().1.trim(), "true");
}

/// What this test does: sends malformed, mistyped and oversized requests and checks each gets
/// a 4xx (or Consul's 500 for an unknown datacenter) with a readable message and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let c = Cluster::start(1).await;
    let base = c.servers[0].http();
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("PUT", "/v1/catalog/register", "{not json".into(), 400, "Request decode failed"),
        (
            "PUT",
            "/v1/catalog/register",
            r#"{"Node":"n","Address":"a","Service":{"Service":"s","Port":"eighty"}}"#.into(),
            400,
            "Request decode failed",
        ),
        ("PUT", "/v1/catalog/register", r#"{"Node":"n","Address":"a","Service":{"Service":"s","Port":70000}}"#.into(), 400, "Port"),
        ("PUT", "/v1/catalog/register", r#"{"Node":"n","Address":"a","Check":{"Name":"c","Status":"sideways"}}"#.into(), 400, "Invalid check status"),
        ("PUT", "/v1/catalog/register", r#"{"Node":"n","Address":"a","Check":{"Name":"c","ServiceID":"nope"}}"#.into(), 400, "Unknown service ID"),
        ("PUT", "/v1/catalog/register", r#"{"Address":"a"}"#.into(), 400, "Must provide node"),
        ("PUT", "/v1/kv/big", "x".repeat(512 * 1024 + 1), 413, "too large"),
        ("PUT", "/v1/kv/k?cas=notanumber", "v".into(), 400, "cas"),
        ("PUT", "/v1/kv/k?acquire=no-such-session", "v".into(), 400, "invalid session"),
        ("GET", "/v1/kv/k?index=abc", String::new(), 400, "index"),
        ("GET", "/v1/catalog/nodes?filter=Node%20%3D%3D", String::new(), 400, "boolean expression"),
        ("GET", "/v1/health/state/sideways", String::new(), 400, "Invalid state"),
        ("GET", "/v1/catalog/nodes?dc=nowhere", String::new(), 500, "No path to datacenter"),
        ("GET", "/v1/no/such/path", String::new(), 404, "not found"),
        ("DELETE", "/v1/status/leader", String::new(), 405, "not allowed"),
        ("PUT", "/v1/txn", r#"[{"KV":{"Verb":"set","Key":"t","Value":"!!"}}]"#.into(), 400, "base64"),
        ("PUT", "/v1/session/create", r#"{"Behavior":"explode"}"#.into(), 400, "Behavior"),
    ];
    for (method, path, body, want, text) in cases {
        let r = c.http.request(method.parse().unwrap(), format!("{base}{path}")).body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let msg = r.text().await.unwrap();
        assert_eq!(status, want, "{method} {path}: {msg}");
        assert!(msg.to_lowercase().contains(&text.to_lowercase()), "{method} {path}: {msg:?} lacks {text:?}");
    }
    // Nothing above was half-applied.
    assert_eq!(c.http.get(format!("{base}/v1/catalog/node/n")).send().await.unwrap().text().await.unwrap(), "null");
    assert_eq!(c.http.get(format!("{base}/v1/kv/k")).send().await.unwrap().status(), 404);

    // A transaction with one failing check applies none of its writes and says which op failed.
    c.put(&format!("{base}/v1/kv/t1"), "orig").await.unwrap();
    let txn = json!([
        {"KV": {"Verb": "set", "Key": "t1", "Value": "bmV3"}},
        {"KV": {"Verb": "cas", "Key": "t2", "Value": "bmV3", "Index": 999}},
    ]);
    let (st, body) = c.put(&format!("{base}/v1/txn"), txn.to_string()).await.unwrap();
    assert_eq!(st, 409, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Errors"][0]["OpIndex"], 1);
    assert_eq!(c.http.get(format!("{base}/v1/kv/t1?raw")).send().await.unwrap().text().await.unwrap(), "orig");
}

/// What this test does: registers instances with tags, metadata and check states, then checks
/// `?passing`, `?tag`, `?node-meta` and `?filter` narrow the results as Consul's would.
#[tokio::test(flavor = "multi_thread")]
async fn catalog_and_health_filters_select_the_right_instances() {
    let c = Cluster::start(1).await;
    let base = c.servers[0].http();
    for (i, (tag, status, rack)) in [("blue", "passing", "r1"), ("green", "critical", "r2"), ("blue", "warning", "r2")].iter().enumerate() {
        let reg = json!({
            "Node": format!("n{i}"), "Address": format!("10.0.0.{i}"), "NodeMeta": {"rack": rack},
            "Service": {"Service": "web", "Port": 8000 + i, "Tags": [tag]},
            "Check": {"CheckID": "web-check", "Name": "web", "Status": status, "ServiceID": "web", "Output": format!("out {i}")},
        });
        let (st, b) = c.put(&format!("{base}/v1/catalog/register"), reg.to_string()).await.unwrap();
        assert_eq!(st, 200, "{b}");
    }
    let names = |v: Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|e| e["Node"]["Node"].as_str().or(e["Node"].as_str()).unwrap().to_string()).collect()
    };
    assert_eq!(names(c.get_json(&format!("{base}/v1/health/service/web?passing")).await.unwrap()), vec!["n0"]);
    assert_eq!(names(c.get_json(&format!("{base}/v1/health/service/web?tag=blue")).await.unwrap()), vec!["n0", "n2"]);
    assert_eq!(names(c.get_json(&format!("{base}/v1/catalog/service/web?node-meta=rack:r2")).await.unwrap()), vec!["n1", "n2"]);
    let f = "Service.Tags%20contains%20blue%20and%20Node.Meta.rack%20%3D%3D%20r2";
    assert_eq!(names(c.get_json(&format!("{base}/v1/health/service/web?filter={f}")).await.unwrap()), vec!["n2"]);
    let crit = c.get_json(&format!("{base}/v1/health/state/critical")).await.unwrap();
    assert!(crit.as_array().unwrap().iter().any(|ch| ch["Node"] == "n1" && ch["Output"] == "out 1"));
    let checks = c.get_json(&format!("{base}/v1/health/checks/web")).await.unwrap();
    assert_eq!(checks.as_array().unwrap().len(), 3);
    let svcs = c.get_json(&format!("{base}/v1/catalog/services")).await.unwrap();
    assert_eq!(svcs["web"].as_array().unwrap().len(), 2);

    // Deregistering a service takes its checks with it.
    let (st, _) = c.put(&format!("{base}/v1/catalog/deregister"), r#"{"Node":"n1","ServiceID":"web"}"#).await.unwrap();
    assert_eq!(st, 200);
    assert_eq!(c.get_json(&format!("{base}/v1/health/checks/web")).await.unwrap().as_array().unwrap().len(), 2);

    // Autopilot configuration with check-and-set.
    let cfg = c.get_json(&format!("{base}/v1/operator/autopilot/configuration")).await.unwrap();
    let idx = cfg["ModifyIndex"].as_u64().unwrap();
    let (_, ok) = c.put(&format!("{base}/v1/operator/autopilot/configuration?cas={}", idx + 1000), r#"{"MaxTrailingLogs": 500}"#).await.unwrap();
    assert_eq!(ok.trim(), "false");
    let (_, ok) = c.put(&format!("{base}/v1/operator/autopilot/configuration?cas={idx}"), r#"{"MaxTrailingLogs": 500}"#).await.unwrap();
    assert_eq!(ok.trim(), "true");
    let cfg = c.get_json(&format!("{base}/v1/operator/autopilot/configuration")).await.unwrap();
    assert_eq!(cfg["MaxTrailingLogs"], 500);
    let metrics = c.http.get(format!("{base}/v1/agent/metrics?format=prometheus")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("consul_raft_applied_index"), "{metrics}");
}
