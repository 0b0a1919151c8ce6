//! Blocking queries at scale: who is woken by a write, index monotonicity under concurrent
//! writes, and the client agent's cache sharing one upstream watch among its local watchers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Cluster, SOON, eventually};

async fn index_of(c: &Cluster, url: &str) -> u64 {
    let r = c.http.get(url).send().await.unwrap();
    r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap()
}

async fn gauge(c: &Cluster, agent: &str, name: &str) -> f64 {
    let m = c.get_json(&format!("{agent}/v1/agent/metrics")).await.unwrap();
    m["Gauges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["Name"] == name)
        .and_then(|g| g["Value"].as_f64())
        .unwrap_or_else(|| panic!("no gauge {name}: {m}"))
}

async fn register(c: &Cluster, agent: &str, node: &str, service: &str) {
    let reg = json!({"Node": node, "Address": "10.0.0.9", "Service": {"Service": service, "Port": 80}});
    let (st, body) = c.put(&format!("{agent}/v1/catalog/register"), reg.to_string()).await.unwrap();
    assert_eq!(st, 200, "{body}");
}

/// Park `n` watchers of `url` (which must block) and wait until the agent counts them parked.
async fn park(c: &Cluster, agent: &str, url: &str, n: usize, already: f64) -> Vec<tokio::task::JoinHandle<reqwest::Response>> {
    let watchers: Vec<_> = (0..n)
        .map(|_| {
            let (http, url) = (c.http.clone(), url.to_string());
            tokio::spawn(async move { http.get(url).send().await.unwrap() })
        })
        .collect();
    let agent = agent.to_string();
    eventually("the watchers to park", SOON, || async {
        (gauge(c, &agent, "trellis.http.blocking_queries").await >= already + n as f64).then_some(())
    })
    .await;
    watchers
}

/// What this test does:
/// - parks 20 watchers on `health/service/b`,
/// - writes to service `a` (then to `b`),
/// - checks every watcher returns with `b`'s new instance and that the server counted exactly
///   20 wake-ups: the write to `a` woke none of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_to_one_service_wakes_no_watcher_of_another() {
    let c = Cluster::start(1).await;
    let s = c.servers[0].http();
    register(&c, &s, "n-b", "b").await;
    let idx = index_of(&c, &format!("{s}/v1/health/service/b")).await;
    let before = gauge(&c, &s, "trellis.http.blocking_wakeups").await;
    let watchers = park(&c, &s, &format!("{s}/v1/health/service/b?index={idx}&wait=2m"), 20, 0.0).await;
    register(&c, &s, "n-a", "a").await;
    register(&c, &s, "n-b2", "b").await;
    for w in watchers {
        let r = tokio::time::timeout(SOON, w).await.expect("the watcher woke").unwrap();
        assert!(r.headers()["x-consul-index"].to_str().unwrap().parse::<u64>().unwrap() > idx);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body.as_array().unwrap().len(), 2);
    }
    let woken = gauge(&c, &s, "trellis.http.blocking_wakeups").await - before;
    assert_eq!(woken, 20.0, "only the write to b may wake b's watchers");
    // Every watcher shared one encoded answer.
    assert!(gauge(&c, &s, "trellis.http.shared_answers").await >= 1.0);
}

/// What this test does:
/// - runs four writers (service registrations and KV writes) for a few seconds,
/// - meanwhile follows `health/service/busy` and a KV prefix with blocking queries,
/// - checks each answer's index never goes back, and that an answer before its wait ran out
///   always carries a higher index than the one asked with.
#[tokio::test(flavor = "multi_thread")]
async fn indexes_never_go_back_under_concurrent_writes() {
    let c = Cluster::start(1).await;
    let s = c.servers[0].http();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (http, s, stop) = (c.http.clone(), s.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = if w % 2 == 0 {
                    json!({"Node": format!("w{w}-{i}"), "Address": "10.0.0.1", "Service": {"Service": "busy", "Port": 80}}).to_string()
                } else {
                    format!("value-{i}")
                };
                let url = if w % 2 == 0 { format!("{s}/v1/catalog/register") } else { format!("{s}/v1/kv/busy/{w}-{}", i % 5) };
                http.put(url).body(body).send().await.unwrap();
                i += 1;
            }
        }));
    }
    for url in [format!("{s}/v1/health/service/busy"), format!("{s}/v1/kv/busy/?recurse")] {
        let mut last = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < deadline {
            let started = std::time::Instant::now();
            let r = c.http.get(format!("{url}{}index={last}&wait=1s", if url.contains('?') { "&" } else { "?" })).send().await.unwrap();
            let index: u64 = r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap();
            assert!(index >= last, "{url}: index went back from {last} to {index}");
            if started.elapsed() < Duration::from_millis(900) && last > 0 {
                assert!(index > last, "{url}: answered early without a new index");
            }
            last = index;
        }
        assert!(last > 0);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
}

/// What this test does:
/// - parks 30 watchers of `health/service/web` on a client agent,
/// - checks the servers hold one blocking query for all of them (the client's cache),
/// - registers an instance: every watcher wakes with it;
/// - reads with `?cached`: a hit, with its age.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_cache_shares_one_upstream_watch_among_local_watchers() {
    let c = Cluster::start_with(1, 1, &[]).await;
    let (s, client) = (c.servers[0].http(), c.servers[1].http());
    register(&c, &s, "w1", "web").await;
    let idx = index_of(&c, &format!("{client}/v1/health/service/web")).await;
    let watchers = park(&c, &client, &format!("{client}/v1/health/service/web?index={idx}&wait=2m"), 30, 0.0).await;
    eventually("one upstream watch on the server", SOON, || async { (gauge(&c, &s, "trellis.http.blocking_queries").await == 1.0).then_some(()) })
        .await;
    assert_eq!(gauge(&c, &client, "trellis.agent_cache.upstream_watches").await, 1.0);
    register(&c, &s, "w2", "web").await;
    for w in watchers {
        let r = tokio::time::timeout(SOON, w).await.expect("the watcher woke").unwrap();
        assert!(r.headers()["x-consul-index"].to_str().unwrap().parse::<u64>().unwrap() > idx);
        assert_eq!(r.json::<Value>().await.unwrap().as_array().unwrap().len(), 2);
    }
    let r = c.http.get(format!("{client}/v1/health/service/web?cached")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert!(r.headers().contains_key("age"));
    assert_eq!(r.json::<Value>().await.unwrap().as_array().unwrap().len(), 2);
}
