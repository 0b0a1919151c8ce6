//! WAN federation: datacenters of real processes joined through the WAN gossip pool, with
//! `?dc=` requests, DNS lookups and prepared-query failover crossing between them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use serde_json::{Value, json};

use crate::harness::{Cluster, SOON, eventually};

async fn ask(addr: SocketAddr, name: &str) -> Option<Message> {
    let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).with_timeout(Some(Duration::from_secs(5))).build();
    let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
    tokio::spawn(bg);
    client.query(Name::from_ascii(name).ok()?, DNSClass::IN, RecordType::A).await.ok().map(|r| r.into_message())
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0.to_string()) } else { None }).collect()
}

async fn register_web(c: &Cluster, node: &str, addr: &str) {
    let reg = json!({
        "Node": node, "Address": addr,
        "Service": {"Service": "web", "Port": 80},
        "Check": {"CheckID": "web", "Name": "web", "Status": "passing", "ServiceID": "web"},
    });
    let (st, body) = c.put(&format!("{}/v1/catalog/register", c.servers[0].http()), reg.to_string()).await.unwrap();
    assert_eq!(st, 200, "{body}");
}

/// What this test does:
/// - federates dc1 (a server and a client agent) with dc2 (a server) over the WAN pool,
/// - lists the WAN members, the datacenters and their network coordinates from dc1, and the
///   coordinates of dc1's agents, with `?near=` sorting by them,
/// - reads dc2's catalog, health and KV with `?dc=dc2` through dc1's server and client,
///   including a blocking KV read that wakes on a write made in dc2,
/// - resolves `web.service.dc2.consul` (and the `.dc.` form) through dc1's DNS,
/// - fails a prepared query in dc1 over to dc2, over HTTP and DNS,
/// - kills dc2's server: `?dc=dc2` fails fast with "No path to datacenter", and works again
///   once the server is back.
#[tokio::test(flavor = "multi_thread")]
async fn two_datacenters_serve_each_others_requests() {
    let mut dcs = Cluster::start_federation(&[("dc1", 1, 1), ("dc2", 1, 0)], &[]).await;
    let (dc1, dc2) = (&dcs[0], &dcs[1]);
    let (s1, c1, s2) = (dc1.servers[0].http(), dc1.servers[1].http(), dc2.servers[0].http());

    let wan = dc1.get_json(&format!("{s1}/v1/agent/members?wan=1")).await.unwrap();
    let mut names: Vec<&str> = wan.as_array().unwrap().iter().filter_map(|m| m["Name"].as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["s1.dc1", "s1.dc2"]);
    let dcs_seen = dc1.get_json(&format!("{c1}/v1/catalog/datacenters")).await.unwrap();
    assert_eq!(dcs_seen, json!(["dc1", "dc2"]), "this datacenter first");

    // Network coordinates from the WAN probes: both datacenters, each with its server.
    let url = format!("{s1}/v1/coordinate/datacenters");
    let coords = eventually("WAN coordinates of both datacenters", SOON, || async {
        let v = dc1.get_json(&url).await.ok()?;
        let known = v.as_array()?.iter().filter(|d| d["Coordinates"].as_array().is_some_and(|c| !c.is_empty())).count();
        (known == 2).then_some(v)
    })
    .await;
    assert_eq!((coords[0]["Datacenter"].as_str(), coords[0]["AreaID"].as_str()), (Some("dc1"), Some("WAN")), "{coords}");
    assert_eq!(coords[1]["Coordinates"][0]["Node"], "s1.dc2");
    assert_eq!(coords[1]["Coordinates"][0]["Coord"]["Vec"].as_array().unwrap().len(), 8);

    // LAN coordinates: every agent of dc1 stores its own; `?near=` sorts by them, the node
    // itself first.
    let url = format!("{s1}/v1/coordinate/nodes");
    eventually("coordinates of dc1's server and client", SOON, || async {
        let v = dc1.get_json(&url).await.ok()?;
        let mut nodes: Vec<&str> = v.as_array()?.iter().filter_map(|c| c["Node"].as_str()).collect();
        nodes.sort();
        (nodes == ["c1", "s1"]).then_some(())
    })
    .await;
    let one = dc1.get_json(&format!("{c1}/v1/coordinate/node/c1")).await.unwrap();
    assert_eq!(one[0]["Coord"]["Vec"].as_array().unwrap().len(), 8, "{one}");
    let near = dc1.get_json(&format!("{s1}/v1/catalog/nodes?near=c1")).await.unwrap();
    assert_eq!(near[0]["Node"], "c1", "{near}");
    // A coordinate for a node the catalog does not hold is accepted and dropped, as Consul does.
    let unknown = json!({"Node": "nobody", "Coord": one[0]["Coord"]});
    assert_eq!(dc1.put(&format!("{s1}/v1/coordinate/update"), unknown.to_string()).await.unwrap().0, 200);
    assert_eq!(dc1.http.get(format!("{s1}/v1/coordinate/node/nobody")).send().await.unwrap().status(), 404);

    register_web(dc2, "web-dc2", "10.20.0.1").await;
    for base in [&s1, &c1] {
        let v = dc1.get_json(&format!("{base}/v1/catalog/service/web?dc=dc2")).await.unwrap();
        assert_eq!(v[0]["Node"], "web-dc2", "{v}");
        assert_eq!(v[0]["Datacenter"], "dc2");
        let h = dc1.get_json(&format!("{base}/v1/health/service/web?dc=dc2&passing")).await.unwrap();
        assert_eq!(h.as_array().unwrap().len(), 1);
    }
    assert!(dc1.get_json(&format!("{s1}/v1/catalog/service/web")).await.unwrap().as_array().unwrap().is_empty(), "dc1 has no web");

    // KV written through dc1 lands in dc2; a blocking read from dc1 wakes on a write in dc2.
    assert_eq!(dc1.put(&format!("{c1}/v1/kv/app/color?dc=dc2"), "blue").await.unwrap().0, 200);
    let v = dc2.get_json(&format!("{s2}/v1/kv/app/color")).await.unwrap();
    let index = v[0]["ModifyIndex"].as_u64().unwrap();
    let http = dc1.http.clone();
    let url = format!("{s1}/v1/kv/app/color?dc=dc2&index={index}&wait=20s");
    let mut blocked = tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() });
    // Nothing changes in dc2 for a second: the read stays parked.
    assert!(tokio::time::timeout(Duration::from_secs(1), &mut blocked).await.is_err(), "the read did not block");
    assert_eq!(dc2.put(&format!("{s2}/v1/kv/app/color"), "green").await.unwrap().0, 200);
    let woke = tokio::time::timeout(Duration::from_secs(15), blocked).await.expect("the blocking read returns").unwrap();
    assert_eq!(woke[0]["Value"], "Z3JlZW4=", "{woke}");

    // DNS in dc1 answers for dc2, on the server and the client agent.
    for agent in &dc1.servers {
        let dns: SocketAddr = format!("{}:8600", agent.ip).parse().unwrap();
        for name in ["web.service.dc2.consul.", "web.service.dc2.dc.consul."] {
            let m = eventually(&format!("{} to resolve {name}", agent.name), SOON, || async {
                let m = ask(dns, name).await?;
                (!a_records(&m).is_empty()).then_some(m)
            })
            .await;
            assert_eq!(a_records(&m), vec!["10.20.0.1"]);
        }
    }

    // A prepared query with nothing healthy in dc1 fails over to dc2.
    let q = json!({"Name": "web-anywhere", "Service": {"Service": "web", "Failover": {"Datacenters": ["dc2"]}}});
    let r = dc1.http.post(format!("{s1}/v1/query")).body(q.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let result = dc1.get_json(&format!("{c1}/v1/query/web-anywhere/execute")).await.unwrap();
    assert_eq!((result["Datacenter"].as_str(), result["Failovers"].as_u64()), (Some("dc2"), Some(1)), "{result}");
    assert_eq!(result["Nodes"][0]["Node"]["Node"], "web-dc2");
    let dns: SocketAddr = format!("{}:8600", dc1.servers[1].ip).parse().unwrap();
    let m = ask(dns, "web-anywhere.query.consul.").await.unwrap();
    assert_eq!(a_records(&m), vec!["10.20.0.1"]);

    // dc2 down: a fast, clear error; back up: answers again.
    dcs[1].kill(0);
    let started = Instant::now();
    let r = dcs[0].http.get(format!("{s1}/v1/catalog/nodes?dc=dc2")).send().await.unwrap();
    let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
    assert_eq!((status, body.as_str()), (500, "No path to datacenter"));
    assert!(started.elapsed() < Duration::from_secs(5), "the error took {:?}", started.elapsed());
    dcs[1].spawn(0);
    let url = format!("{s1}/v1/catalog/service/web?dc=dc2");
    eventually("dc2 to answer again", SOON, || async { (dcs[0].get_json(&url).await.ok()?.as_array()?.len() == 1).then_some(()) }).await;
}

/// What this test does: three datacenters, dc2 with three servers; every datacenter lists all
/// three. A prepared query with `NearestN: 2` in dc1 fails over past dc2 (nothing healthy) to
/// dc3. Then dc2's leader is killed: reads and writes sent to dc2 through dc1 keep working
/// (held through dc2's election, then answered by its new leader).
#[tokio::test(flavor = "multi_thread")]
async fn cross_dc_requests_survive_a_remote_server_dying() {
    let mut dcs = Cluster::start_federation(&[("dc1", 1, 0), ("dc2", 3, 0), ("dc3", 1, 0)], &[]).await;
    for c in &dcs {
        let list = c.get_json(&format!("{}/v1/catalog/datacenters", c.servers[0].http())).await.unwrap();
        assert_eq!(list[0], c.dc.as_str(), "{list}");
        assert_eq!(list.as_array().unwrap().len(), 3);
    }
    let s1 = dcs[0].servers[0].http();
    register_web(&dcs[2], "web-dc3", "10.30.0.1").await;
    let q = json!({"Name": "web-nearest", "Service": {"Service": "web", "Failover": {"NearestN": 2}}});
    let r = dcs[0].http.post(format!("{s1}/v1/query")).body(q.to_string()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let result = dcs[0].get_json(&format!("{s1}/v1/query/web-nearest/execute")).await.unwrap();
    assert_eq!(result["Datacenter"], "dc3", "{result}");
    assert_eq!(result["Nodes"][0]["Node"]["Node"], "web-dc3");
    let failovers = result["Failovers"].as_u64().unwrap();
    assert!((1..=2).contains(&failovers), "{result}");

    let leader = dcs[1].wait_for_leader().await;
    let i = dcs[1].index_of_rpc(&leader);
    dcs[1].kill(i);
    for i in 0..20 {
        let url = format!("{s1}/v1/catalog/nodes?dc=dc2");
        let nodes = dcs[0].get_json(&url).await.unwrap_or_else(|e| panic!("read {i} through dc1 failed: {e}"));
        assert!(nodes.as_array().unwrap().len() >= 2, "{nodes}");
    }
    let (st, body) = dcs[0].put(&format!("{s1}/v1/kv/after-kill?dc=dc2"), "ok").await.unwrap();
    assert_eq!(st, 200, "a write to dc2 after its leader died: {body}");
    let alive = dcs[1].servers.iter().find(|s| s.is_running()).unwrap().http();
    let v = dcs[1].get_json(&format!("{alive}/v1/kv/after-kill")).await.unwrap();
    assert_eq!(v[0]["Value"], "b2s=");
}

/// What this test does: two encrypted datacenters; a key installed, made primary and the old
/// one removed through dc1's server reaches dc2's server too (the WAN pool shares that key),
/// and the datacenters still answer each other.
#[tokio::test(flavor = "multi_thread")]
async fn a_keyring_rotation_in_one_datacenter_reaches_the_others() {
    let old = trellis::membership::keygen();
    let dcs = Cluster::start_federation(&[("dc1", 1, 0), ("dc2", 1, 0)], &["--encrypt", &old]).await;
    let (s1, s2) = (dcs[0].servers[0].http(), dcs[1].servers[0].http());
    let new = trellis::membership::keygen();
    let keys_in_dc2 = |want: Vec<String>, primary: String| {
        let (http, url) = (dcs[1].http.clone(), format!("{s2}/v1/operator/keyring"));
        async move {
            eventually(&format!("dc2 keys {want:?}, primary {primary}"), SOON, || async {
                let v: Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                let mut keys: Vec<String> = v[0]["Keys"].as_object()?.keys().cloned().collect();
                keys.sort();
                let primary_ok = v[0]["PrimaryKeys"][primary.as_str()].as_u64() == Some(1);
                (keys == want && primary_ok).then_some(())
            })
            .await
        }
    };
    let send = |method: reqwest::Method, key: &str| {
        dcs[0].http.request(method, format!("{s1}/v1/operator/keyring")).body(json!({ "Key": key }).to_string()).send()
    };
    assert_eq!(send(reqwest::Method::POST, &new).await.unwrap().status(), 200);
    let mut both = vec![old.clone(), new.clone()];
    both.sort();
    keys_in_dc2(both, old.clone()).await;
    assert_eq!(send(reqwest::Method::PUT, &new).await.unwrap().status(), 200);
    assert_eq!(send(reqwest::Method::DELETE, &old).await.unwrap().status(), 200);
    keys_in_dc2(vec![new.clone()], new.clone()).await;
    let nodes = dcs[0].get_json(&format!("{s1}/v1/catalog/nodes?dc=dc2")).await.unwrap();
    assert_eq!(nodes[0]["Datacenter"], "dc2", "{nodes}");
}
