//! DNS on real agents: servers and client agents answer from the catalog.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use serde_json::json;

use crate::harness::{Cluster, SOON, eventually};

pub async fn ask(addr: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).with_timeout(Some(Duration::from_secs(5))).build();
    let (mut client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
    tokio::spawn(bg);
    client.query(Name::from_ascii(name).ok()?, DNSClass::IN, qtype).await.ok().map(|r| r.into_message())
}

pub fn a_records(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0.to_string()) } else { None }).collect();
    v.sort();
    v
}

/// What this test does:
/// - registers three `web` instances, one of them critical, on a 1-server/1-client cluster,
/// - asks the client agent's and the server's DNS (port 8600) for `web.service.consul`:
///   A records of the two healthy instances only; SRV with ports and node targets,
/// - checks node lookups with TXT meta and NXDOMAIN for an unknown service,
/// - creates a prepared query and a template through the HTTP API and resolves both as
///   `<name>.query.consul` on each agent, with the query's TTL.
#[tokio::test(flavor = "multi_thread")]
async fn agents_answer_service_and_node_lookups_from_the_catalog() {
    let c = Cluster::start_with(1, 1, &[]).await;
    let server = c.servers[0].http();
    for (i, status) in ["passing", "passing", "critical"].iter().enumerate() {
        let reg = json!({
            "Node": format!("web-{i}"), "Address": format!("10.9.0.{}", i + 1), "NodeMeta": {"rack": format!("r{i}")},
            "Service": {"Service": "web", "Port": 8080 + i, "Tags": ["v1"]},
            "Check": {"CheckID": "web", "Name": "web", "Status": status, "ServiceID": "web"},
        });
        assert_eq!(c.put(&format!("{server}/v1/catalog/register"), reg.to_string()).await.unwrap().0, 200);
    }
    for agent in &c.servers {
        let dns: SocketAddr = format!("{}:8600", agent.ip).parse().unwrap();
        let m = eventually(&format!("{} to answer web.service.consul", agent.name), SOON, || async {
            let m = ask(dns, "web.service.consul.", RecordType::A).await?;
            (a_records(&m).len() == 2).then_some(m)
        })
        .await;
        assert_eq!(a_records(&m), vec!["10.9.0.1", "10.9.0.2"]);
        let tagged = ask(dns, "v1.web.service.consul.", RecordType::A).await.unwrap();
        assert_eq!(a_records(&tagged).len(), 2);
        let srv = ask(dns, "web.service.consul.", RecordType::SRV).await.unwrap();
        let ports: Vec<u16> = srv.answers.iter().filter_map(|r| if let RData::SRV(s) = &r.data { Some(s.port) } else { None }).collect();
        assert_eq!(ports.len(), 2, "{srv:?}");
        assert!(ports.contains(&8080) && ports.contains(&8081));
        let node = ask(dns, "web-1.node.consul.", RecordType::A).await.unwrap();
        assert_eq!(a_records(&node), vec!["10.9.0.2"]);
        let missing = ask(dns, "nope.service.consul.", RecordType::A).await.unwrap();
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    }
    // Prepared queries: a static one (excluding tag v2, which only the critical instance
    // would have) and a template whose Regexp picks the service out of the name.
    let web2 = json!({"Node": "web-3", "Address": "10.9.0.4", "Service": {"Service": "web", "Port": 9000, "Tags": ["v2"]}});
    assert_eq!(c.put(&format!("{server}/v1/catalog/register"), web2.to_string()).await.unwrap().0, 200);
    let q = json!({"Name": "web-stable", "Service": {"Service": "web", "Tags": ["!v2"]}, "DNS": {"TTL": "42s"}});
    let resp = c.http.post(format!("{server}/v1/query")).body(q.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let t = json!({"Name": "svc-", "Template": {"Type": "name_prefix_match", "Regexp": "^svc-(.+)$"}, "Service": {"Service": "${match(1)}"}});
    let resp = c.http.post(format!("{server}/v1/query")).body(t.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    for agent in &c.servers {
        let dns: SocketAddr = format!("{}:8600", agent.ip).parse().unwrap();
        let m = ask(dns, "web-stable.query.consul.", RecordType::A).await.unwrap();
        assert_eq!(a_records(&m), vec!["10.9.0.1", "10.9.0.2"], "{}: {m:?}", agent.name);
        assert!(m.answers.iter().all(|r| r.ttl == 42), "{m:?}");
        let m = ask(dns, "svc-web.query.consul.", RecordType::A).await.unwrap();
        assert_eq!(a_records(&m), vec!["10.9.0.1", "10.9.0.2", "10.9.0.4"], "{}: {m:?}", agent.name);
        let missing = ask(dns, "nope.query.consul.", RecordType::A).await.unwrap();
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
    }
}
