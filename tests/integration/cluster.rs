//! Cluster formation, leader failover under load, and full restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, SOON, eventually};

/// What this test does:
/// - starts three servers that bootstrap from `--retry-join`,
/// - checks that every server lists the same three voters,
/// - writes through a follower and reads the value back from every server.
#[tokio::test(flavor = "multi_thread")]
async fn three_servers_form_a_cluster_and_followers_forward_writes() {
    let c = Cluster::start(3).await;
    let leader = c.wait_for_leader().await;
    for s in &c.servers {
        let peers = c.get_json(&format!("{}/v1/status/peers", s.http())).await.unwrap();
        assert_eq!(peers.as_array().unwrap().len(), 3, "{peers}");
    }
    let follower = c.servers.iter().find(|s| s.rpc() != leader).unwrap();
    let (status, body) = c.put(&format!("{}/v1/kv/greeting", follower.http()), "hello").await.unwrap();
    assert_eq!((status, body.trim()), (200, "true"));
    for s in &c.servers {
        let url = format!("{}/v1/kv/greeting?raw&stale", s.http());
        eventually("the write to reach every server", SOON, || async {
            let r = c.http.get(&url).send().await.ok()?;
            (r.text().await.ok()? == "hello").then_some(())
        })
        .await;
    }
    // A default (leader) read through a follower is forwarded and says who answered.
    let r = c.http.get(format!("{}/v1/kv/greeting", follower.http())).send().await.unwrap();
    assert_eq!(r.headers()["x-consul-knownleader"], "true");
    let me: serde_json::Value = c.get_json(&format!("{}/v1/agent/self", follower.http())).await.unwrap();
    assert_eq!(me["Stats"]["consul"]["leader_addr"], leader.as_str());
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    // The leader registers every server in the catalog with a passing serfHealth.
    eventually("servers in the catalog", SOON, || async {
        let v = c.get_json(&format!("{}/v1/health/service/consul?passing", c.servers[0].http())).await.ok()?;
        (v.as_array()?.len() == 3).then_some(())
    })
    .await;
}

/// What this test does:
/// - keeps four writers putting distinct keys through every server,
/// - kills -9 the leader in the middle,
/// - checks a new leader is elected, writes continue, and every acknowledged write is readable.
#[tokio::test(flavor = "multi_thread")]
async fn leader_failover_under_concurrent_writes_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3).await;
    let old_leader = c.wait_for_leader().await;
    let urls: Vec<String> = c.servers.iter().map(|s| s.http()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (http, urls, stop) = (c.http.clone(), urls.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("load/w{w}/{n}");
                let url = format!("{}/v1/kv/{key}", urls[n as usize % urls.len()]);
                let req = http.put(url).body(format!("v{n}")).timeout(Duration::from_secs(10)).send().await;
                if let Ok(r) = req
                    && r.status().is_success()
                    && r.text().await.unwrap_or_default().trim() == "true"
                {
                    acked.push((key, format!("v{n}")));
                }
            }
            acked
        }));
    }
    eventually("some writes before the crash", SOON, || async {
        let v = c.get_json(&format!("{}/v1/kv/load/?keys", urls[0])).await.ok()?;
        (v.as_array()?.len() > 20).then_some(())
    })
    .await;
    let killed = c.index_of_rpc(&old_leader);
    let crash = Instant::now();
    c.kill(killed);
    let new_leader = eventually("a new leader", SOON, || async {
        let l = c.wait_for_leader().await;
        (l != old_leader).then_some(l)
    })
    .await;
    eprintln!("new leader {new_leader} elected {:?} after the crash", crash.elapsed());
    // Writes go on through the survivors for a while.
    let survivor = c.servers.iter().find(|s| s.is_running()).unwrap().http();
    let before = c.get_json(&format!("{survivor}/v1/kv/load/?keys")).await.unwrap().as_array().unwrap().len();
    eventually("writes continuing after failover", SOON, || async {
        let v = c.get_json(&format!("{survivor}/v1/kv/load/?keys")).await.ok()?;
        (v.as_array()?.len() > before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(acked.len() > 40, "too few acknowledged writes: {}", acked.len());
    let all = c.get_json(&format!("{survivor}/v1/kv/load/?recurse&consistent")).await.unwrap();
    let stored: std::collections::HashMap<String, String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD.decode(e["Value"].as_str().unwrap_or("")).unwrap();
            (e["Key"].as_str().unwrap().to_string(), String::from_utf8(v).unwrap())
        })
        .collect();
    for (k, v) in &acked {
        assert_eq!(stored.get(k), Some(v), "acknowledged write {k} was lost");
    }
    // The crashed server comes back and catches up.
    c.spawn(killed);
    let url = format!("{}/v1/kv/{}?raw&stale", c.servers[killed].http(), acked.last().unwrap().0);
    eventually("the restarted server to catch up", SOON, || async {
        let r = c.http.get(&url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// What this test does:
/// - writes keys and a catalog registration, stops every server with SIGTERM,
/// - checks each stops cleanly and its ports can be bound again,
/// - starts them all again and finds every piece of state back.
#[tokio::test(flavor = "multi_thread")]
async fn full_restart_brings_back_all_state() {
    let mut c = Cluster::start(3).await;
    let base = c.servers[0].http();
    for i in 0..30 {
        let (s, _) = c.put(&format!("{base}/v1/kv/persist/{i}"), format!("{i}")).await.unwrap();
        assert_eq!(s, 200);
    }
    let reg = r#"{"Node":"web-1","Address":"10.1.1.1","Service":{"Service":"web","Port":80,"Tags":["v1"]}}"#;
    assert_eq!(c.put(&format!("{base}/v1/catalog/register"), reg).await.unwrap().0, 200);
    for i in 0..3 {
        c.stop(i);
        for port in [8300, 8500] {
            let addr = format!("{}:{port}", c.servers[i].ip);
            std::net::TcpListener::bind(&addr).unwrap_or_else(|e| panic!("{addr} still bound after shutdown: {e}"));
        }
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_for_leader().await;
    let keys = c.get_json(&format!("{base}/v1/kv/persist/?keys")).await.unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 30);
    let svc = c.get_json(&format!("{base}/v1/catalog/service/web")).await.unwrap();
    assert_eq!(svc[0]["ServiceTags"][0], "v1");
}
