//! End-to-end tests: a real server on 127.0.0.1, queried with hickory's client (and raw packets
//! for the malformed cases), answering from a fixed-data [`DnsCatalog`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequestOptions, Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use super::*;

// ------------------------------------------------------------------ the test catalog

/// A catalog with fixed data: the trait's contract, not a model of the real server.
#[derive(Default)]
pub(super) struct TestCatalog {
    pub dc: String,
    pub dcs: Vec<String>,
    /// (service, tags, instance)
    pub services: Vec<(String, Vec<String>, Instance)>,
    pub nodes: Vec<NodeInfo>,
    pub queries: HashMap<String, QueryResult>,
    pub unavailable: AtomicBool,
    pub calls: AtomicUsize,
    /// What `generation` reports: `Some` turns the UDP answer cache on.
    pub generation: Option<u64>,
}

impl TestCatalog {
    fn check_dc(&self, dc: Option<&str>) -> Result<String, LookupError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if self.unavailable.load(Ordering::Relaxed) {
            return Err(LookupError::Unavailable("test catalog is down".into()));
        }
        let dc = dc.unwrap_or(&self.dc).to_string();
        if dc != self.dc && !self.dcs.contains(&dc) {
            return Err(LookupError::UnknownDatacenter);
        }
        Ok(dc)
    }
}

#[async_trait::async_trait]
impl DnsCatalog for TestCatalog {
    async fn service_instances(&self, dc: Option<&str>, service: &str, tag: Option<&str>) -> Result<Vec<Instance>, LookupError> {
        let dc = self.check_dc(dc)?;
        Ok(self
            .services
            .iter()
            .filter(|(s, tags, i)| {
                s.eq_ignore_ascii_case(service) && i.datacenter == dc && tag.is_none_or(|t| tags.iter().any(|x| x.eq_ignore_ascii_case(t)))
            })
            .map(|(_, _, i)| i.clone())
            .collect())
    }

    async fn node(&self, dc: Option<&str>, name: &str) -> Result<Option<NodeInfo>, LookupError> {
        let dc = self.check_dc(dc)?;
        Ok(self.nodes.iter().find(|n| n.name.eq_ignore_ascii_case(name) && n.datacenter == dc).cloned())
    }

    async fn by_address(&self, ip: IpAddr) -> Result<Vec<PtrTarget>, LookupError> {
        let dc = self.check_dc(None)?;
        let ip = ip.to_string();
        let nodes =
            self.nodes.iter().filter(|n| n.address == ip && n.datacenter == dc).map(|n| PtrTarget::Node { name: n.name.clone(), dc: dc.clone() });
        let services = self.services.iter().filter(|(_, _, i)| i.service_address == ip && i.datacenter == dc).map(|(s, _, i)| PtrTarget::Service {
            service: s.clone(),
            node: i.node.clone(),
            dc: dc.clone(),
        });
        Ok(nodes.chain(services).collect())
    }

    async fn prepared_query(&self, dc: Option<&str>, name: &str, _source: Option<IpAddr>) -> Result<Option<QueryResult>, LookupError> {
        self.check_dc(dc)?;
        Ok(self.queries.get(name).cloned())
    }

    fn datacenter(&self) -> String {
        self.dc.clone()
    }

    fn generation(&self) -> Option<u64> {
        self.generation
    }
}

pub(super) fn inst(node: &str, node_address: &str, service_address: &str, port: u16, status: Health, dc: &str) -> Instance {
    Instance {
        node: node.into(),
        node_address: node_address.into(),
        service_address: service_address.into(),
        port,
        status,
        node_meta: BTreeMap::new(),
        datacenter: dc.into(),
    }
}

fn node(name: &str, address: &str, dc: &str, meta: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        address: address.into(),
        meta: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        datacenter: dc.into(),
    }
}

/// The catalog most tests use: dc1 (own) and dc2.
pub(super) fn catalog() -> TestCatalog {
    use Health::*;
    let mut c = TestCatalog { dc: "dc1".into(), dcs: vec!["dc2".into()], ..Default::default() };
    let meta = [("rack", "r1"), ("rfc1035-note", "hello world")];
    c.nodes = vec![
        node("n1", "10.0.0.1", "dc1", &meta),
        node("n2", "10.0.0.2", "dc1", &[]),
        node("n3", "10.0.0.3", "dc1", &[]),
        node("n6", "2001:db8::6", "dc1", &[]),
        node("ext", "ext.example.test", "dc1", &[]),
        node("server1", "10.0.0.10", "dc1", &[]),
        node("n20", "10.2.0.20", "dc2", &[]),
    ];
    let mut web1 = inst("n1", "10.0.0.1", "", 8080, Passing, "dc1");
    web1.node_meta = c.nodes[0].meta.clone();
    let svc = |s: &str, tags: &[&str], i: Instance| (s.to_string(), tags.iter().map(|t| t.to_string()).collect(), i);
    c.services = vec![
        svc("web", &["v1"], web1),
        svc("web", &["v2"], inst("n2", "10.0.0.2", "", 8080, Warning, "dc1")),
        svc("web", &["v1"], inst("n3", "10.0.0.3", "", 8080, Critical, "dc1")),
        svc("web", &[], inst("n20", "10.2.0.20", "", 8080, Passing, "dc2")),
        svc("api", &[], inst("n1", "10.0.0.1", "10.1.0.1", 9000, Passing, "dc1")),
        svc("dual", &[], inst("n6", "2001:db8::6", "", 7000, Passing, "dc1")),
        svc("dual", &[], inst("n1", "10.0.0.1", "", 7000, Passing, "dc1")),
        svc("db", &[], inst("n2", "10.0.0.2", "db.example.test", 5432, Passing, "dc1")),
        svc("alias", &[], inst("n2", "10.0.0.2", "web.service.consul", 80, Passing, "dc1")),
        svc("down", &[], inst("n3", "10.0.0.3", "", 1, Critical, "dc1")),
        svc("loop-a", &[], inst("n2", "10.0.0.2", "loop-b.service.consul", 1, Passing, "dc1")),
        svc("loop-b", &[], inst("n2", "10.0.0.2", "loop-a.service.consul", 1, Passing, "dc1")),
        svc("consul", &[], inst("server1", "10.0.0.10", "", 8300, Passing, "dc1")),
        svc("database-main", &[], inst("n1", "10.0.0.1", "", 1, Passing, "dc1")),
        svc("database-replica", &[], inst("n1", "10.0.0.1", "", 1, Passing, "dc1")),
        svc("other", &[], inst("n1", "10.0.0.1", "", 1, Passing, "dc1")),
    ];
    c.queries.insert(
        "fast".into(),
        QueryResult {
            instances: vec![inst("n1", "10.0.0.1", "", 8080, Passing, "dc1"), inst("n2", "10.0.0.2", "", 8080, Warning, "dc1")],
            ttl: Some(Duration::from_secs(30)),
            only_passing: true,
            service: "web".into(),
            ordered: false,
        },
    );
    c.queries.insert(
        "plain".into(),
        QueryResult {
            instances: vec![inst("n2", "10.0.0.2", "", 8080, Warning, "dc1")],
            ttl: None,
            only_passing: false,
            service: "web".into(),
            ordered: false,
        },
    );
    c
}

/// A catalog with `n` passing instances of `big`, each on its own node and address.
fn big_catalog(n: usize) -> TestCatalog {
    let mut c = catalog();
    for i in 0..n {
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        c.services.push(("big".into(), vec![], inst(&format!("node-{i}"), &ip, "", 8000, Health::Passing, "dc1")));
    }
    c
}

// ------------------------------------------------------------------ server and clients

/// Query timeout of the test clients: every query in these tests is answered in milliseconds.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) struct Running {
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(super) async fn serve(cfg: DnsConfig, catalog: TestCatalog) -> Running {
    serve_arc(cfg, Arc::new(catalog)).await
}

async fn serve_arc(cfg: DnsConfig, catalog: Arc<dyn DnsCatalog>) -> Running {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = DnsServer::new(cfg, catalog, "agent-node".into());
    let task = tokio::spawn(server.run(udp, tcp, shutdown.clone()));
    Running { udp: udp_addr, tcp: tcp_addr, shutdown, task: Some(task) }
}

type TestClient = Client<TokioRuntimeProvider>;

async fn udp_client(addr: SocketAddr) -> TestClient {
    let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).with_timeout(Some(CLIENT_TIMEOUT)).build();
    let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
    tokio::spawn(bg);
    client
}

async fn classic_udp_client(addr: SocketAddr) -> TestClient {
    let mut client = udp_client(addr).await;
    client.disable_edns();
    client
}

async fn tcp_client(addr: SocketAddr) -> TestClient {
    let (future, sender) = TcpClientStream::new(addr, None, Some(CLIENT_TIMEOUT), TokioRuntimeProvider::new());
    let (client, bg) = Client::<TokioRuntimeProvider>::with_timeout(future.await.unwrap(), sender, CLIENT_TIMEOUT);
    tokio::spawn(bg);
    client
}

async fn ask(client: &mut TestClient, name: &str, qtype: RecordType) -> Message {
    let response = client.query(Name::from_ascii(name).unwrap(), DNSClass::IN, qtype).await;
    response.unwrap_or_else(|e| panic!("query {name} {qtype}: {e}")).into_message()
}

/// Ask with a given EDNS0 buffer size.
async fn ask_edns(client: &TestClient, name: &str, qtype: RecordType, payload: u16) -> Message {
    let mut options = DnsRequestOptions::default();
    options.edns_payload_len = payload;
    let mut responses = client.lookup(Query::query(Name::from_ascii(name).unwrap(), qtype), options);
    responses.next().await.expect("a response").expect("no error").into_message()
}

/// Send raw bytes over UDP; `None` when nothing came back within `wait`.
async fn raw_udp(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

fn query_bytes(id: u16, name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

// ------------------------------------------------------------------ answer inspection

fn ips(records: &[Record]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn ip_list(s: &[&str]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = s.iter().map(|s| s.parse().unwrap()).collect();
    v.sort();
    v
}

fn srvs(m: &Message) -> Vec<(u16, u16, u16, String)> {
    let mut out: Vec<_> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_ascii())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn txts(records: &[Record]) -> Vec<String> {
    let mut out: Vec<String> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<String>()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn has_soa(m: &Message, apex: &str) -> bool {
    m.authorities.iter().any(|r| matches!(r.data, RData::SOA(_)) && r.name.to_ascii() == apex)
}

fn cfg() -> DnsConfig {
    DnsConfig::default()
}

// ------------------------------------------------------------------ service lookups

#[tokio::test]
async fn a_service_name_answers_the_addresses_of_its_passing_and_warning_instances_but_never_critical_ones() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(!m.metadata.recursion_available, "no recursors configured");
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1", "10.0.0.2"]));
    assert!(m.answers.iter().all(|r| r.name.to_ascii() == "web.service.consul."));

    // A service whose only instance is critical does not exist for DNS.
    let m = ask(&mut c, "down.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m, "consul."));
}

#[tokio::test]
async fn only_passing_drops_warning_instances_too() {
    let s = serve(DnsConfig { only_passing: true, ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1"]));
}

#[tokio::test]
async fn a_tag_filters_instances_in_both_the_dotted_and_the_rfc_2782_forms() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "v2.web.service.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.2"]));
    // v1 has a passing and a critical instance: only the passing one.
    let m = ask(&mut c, "_web._v1.service.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 8080, "n1.node.dc1.consul.".to_string())]);
    // _tcp means "no tag", and the service label is optional in the RFC 2782 form.
    for name in ["_web._tcp.service.consul.", "_web._tcp.consul."] {
        let m = ask(&mut c, name, RecordType::SRV).await;
        assert_eq!(srvs(&m).len(), 2, "{name}");
    }
    let m = ask(&mut c, "v9.web.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn srv_answers_point_at_node_or_addr_names_with_their_addresses_and_node_meta_in_the_additional_section() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "web.service.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 8080, "n1.node.dc1.consul.".to_string()), (1, 1, 8080, "n2.node.dc1.consul.".to_string())]);
    let extra_a: Vec<(String, IpAddr)> = {
        let mut v: Vec<_> = m.additionals.iter().filter_map(|r| r.data.ip_addr().map(|ip| (r.name.to_ascii(), ip))).collect();
        v.sort();
        v
    };
    assert_eq!(
        extra_a,
        vec![("n1.node.dc1.consul.".into(), "10.0.0.1".parse().unwrap()), ("n2.node.dc1.consul.".into(), "10.0.0.2".parse().unwrap())]
    );
    assert_eq!(txts(&m.additionals), vec!["hello world".to_string(), "rack=r1".to_string()]);

    // A service address gets an addr name, so the target resolves to the service, not the node.
    let m = ask(&mut c, "api.service.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 9000, "0a010001.addr.dc1.consul.".to_string())]);
    assert_eq!(ips(&m.additionals), ip_list(&["10.1.0.1"]));
    let m = ask(&mut c, "0a010001.addr.dc1.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.1.0.1"]));
}

#[tokio::test]
async fn the_datacenter_can_be_named_in_the_legacy_and_the_dc_forms_and_an_unknown_one_is_nxdomain() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    for name in ["web.service.dc2.consul.", "web.service.dc2.dc.consul.", "n20.node.dc2.consul.", "n20.node.dc2.dc.consul."] {
        let m = ask(&mut c, name, RecordType::A).await;
        assert_eq!(ips(&m.answers), ip_list(&["10.2.0.20"]), "{name}");
    }
    let m = ask(&mut c, "web.service.dc2.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 8080, "n20.node.dc2.consul.".to_string())]);
    let m = ask(&mut c, "web.service.nowhere.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m, "consul."));
}

#[tokio::test]
async fn an_instance_whose_address_is_a_hostname_is_answered_with_a_cname() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "db.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let cname: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::CNAME(t) => Some(t.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(cname, vec!["db.example.test.".to_string()]);
    let m = ask(&mut c, "db.service.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 5432, "db.example.test.".to_string())]);

    // A hostname inside the domain is resolved through the domain: the CNAME plus web's addresses.
    let m = ask(&mut c, "alias.service.consul.", RecordType::A).await;
    assert!(matches!(&m.answers[0].data, RData::CNAME(t) if t.0.to_ascii() == "web.service.consul."));
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1", "10.0.0.2"]));

    // Addresses that point at each other: the chain stops at the depth limit.
    let m = ask(&mut c, "loop-a.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(!m.answers.is_empty() && m.answers.len() <= 4, "{:?}", m.answers);

    // A node with a hostname address too.
    let m = ask(&mut c, "ext.node.consul.", RecordType::A).await;
    assert!(matches!(&m.answers[0].data, RData::CNAME(t) if t.0.to_ascii() == "ext.example.test."));
}

#[tokio::test]
async fn aaaa_questions_get_ipv6_instances_and_any_gets_both_families() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "dual.service.consul.", RecordType::AAAA).await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::6"]));
    let m = ask(&mut c, "dual.service.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1"]));
    let m = ask(&mut c, "dual.service.consul.", RecordType::ANY).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1", "2001:db8::6"]));
    // web has no IPv6 instance: NODATA, with the SOA.
    let m = ask(&mut c, "web.service.consul.", RecordType::AAAA).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(has_soa(&m, "consul."));
}

#[tokio::test]
async fn a_record_limit_caps_the_number_of_addresses() {
    let s = serve(DnsConfig { a_record_limit: 4, ..cfg() }, big_catalog(20)).await;
    let mut c = tcp_client(s.tcp).await;
    let m = ask(&mut c, "big.service.consul.", RecordType::A).await;
    assert_eq!(m.answers.len(), 4);
    assert!(!m.metadata.truncation, "a policy limit sets TC only with enable_truncate");
    // SRV is not limited by it, as in Consul.
    let m = ask(&mut c, "big.service.consul.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 20);
}

#[tokio::test]
async fn answers_are_shuffled_across_queries() {
    let s = serve(cfg(), big_catalog(10)).await;
    let mut c = tcp_client(s.tcp).await;
    let mut orders = std::collections::HashSet::new();
    for _ in 0..20 {
        let m = ask(&mut c, "big.service.consul.", RecordType::A).await;
        assert_eq!(m.answers.len(), 10);
        orders.insert(m.answers.iter().map(|r| r.data.ip_addr().unwrap()).collect::<Vec<_>>());
    }
    assert!(orders.len() > 1, "20 answers of 10 records all came in the same order");
}

/// With the answer cache on (the catalog reports a generation), repeated UDP questions are
/// answered from cached bytes: the catalog stops being asked once every variant exists, the
/// answers keep the asker's ID and spelling, and they still come in more than one order.
#[tokio::test]
async fn cached_udp_answers_stay_shuffled_and_stop_asking_the_catalog() {
    let catalog = Arc::new(TestCatalog { generation: Some(1), ..big_catalog(10) });
    let s = serve_arc(cfg(), catalog.clone()).await;
    let mut c = udp_client(s.udp).await;
    let mut orders = std::collections::HashSet::new();
    for i in 0..60 {
        let name = if i % 2 == 0 { "big.service.consul." } else { "BIG.service.Consul." };
        let m = ask(&mut c, name, RecordType::A).await;
        assert_eq!(m.answers.len(), 10);
        assert_eq!(m.queries[0].name().to_ascii(), name);
        assert!(m.answers.iter().all(|r| r.name.to_ascii() == name), "answers use the name as asked");
        orders.insert(m.answers.iter().map(|r| r.data.ip_addr().unwrap()).collect::<Vec<_>>());
    }
    assert!(orders.len() > 1, "60 cached answers all came in the same order");
    let calls = catalog.calls.load(Ordering::Relaxed);
    assert!(calls <= 2 * super::udp::VARIANTS, "{calls} catalog reads for 60 questions");
}

// ------------------------------------------------------------------ nodes, addr, PTR, prepared queries

#[tokio::test]
async fn a_node_name_answers_its_address_and_its_meta_as_txt() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "n1.node.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1"]));
    assert_eq!(txts(&m.additionals), vec!["hello world".to_string(), "rack=r1".to_string()]);
    let m = ask(&mut c, "n1.node.dc1.consul.", RecordType::TXT).await;
    assert_eq!(txts(&m.answers), vec!["hello world".to_string(), "rack=r1".to_string()]);
    assert!(ips(&m.answers).is_empty());
    let m = ask(&mut c, "N1.Node.Consul.", RecordType::ANY).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1"]));
    assert_eq!(txts(&m.answers).len(), 2);
    assert!(m.answers.iter().all(|r| r.name.to_ascii() == "N1.Node.Consul."), "answers use the name as asked");

    let s = serve(DnsConfig { node_meta_txt: false, ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "n1.node.consul.", RecordType::A).await;
    assert!(m.additionals.iter().all(|r| !matches!(r.data, RData::TXT(_))));
}

#[tokio::test]
async fn addr_names_decode_ipv4_and_ipv6_addresses() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "c0a80001.addr.dc1.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["192.168.0.1"]));
    let m = ask(&mut c, "20010db8000000000000000000000001.addr.dc1.consul.", RecordType::AAAA).await;
    assert_eq!(ips(&m.answers), ip_list(&["2001:db8::1"]));
    let m = ask(&mut c, "c0a80001.addr.dc1.consul.", RecordType::AAAA).await;
    assert_eq!((m.metadata.response_code, m.answers.len(), has_soa(&m, "consul.")), (ResponseCode::NoError, 0, true));
    let m = ask(&mut c, "c0a8001.addr.dc1.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn ptr_questions_name_the_node_or_else_the_service_at_an_address() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let ptr = |m: &Message| -> Vec<String> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(p) => Some(p.0.to_ascii()),
                _ => None,
            })
            .collect()
    };
    let m = ask(&mut c, "1.0.0.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptr(&m), vec!["n1.node.dc1.consul.".to_string()]);
    assert!(m.metadata.authoritative);
    let m = ask(&mut c, "1.0.1.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(ptr(&m), vec!["api.service.dc1.consul.".to_string()]);
    let m = ask(&mut c, "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.", RecordType::PTR).await;
    assert_eq!(ptr(&m), vec!["n6.node.dc1.consul.".to_string()]);
    let m = ask(&mut c, "9.9.9.10.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m, "consul."));
}

#[tokio::test]
async fn prepared_queries_answer_like_services_with_their_own_ttl_or_the_service_ttl() {
    let service_ttl = BTreeMap::from([("web".to_string(), Duration::from_secs(7))]);
    let s = serve(DnsConfig { service_ttl, ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "fast.query.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["10.0.0.1"]), "the query's only_passing drops the warning instance");
    assert!(m.answers.iter().all(|r| r.ttl == 30));
    let m = ask(&mut c, "_fast._tcp.query.consul.", RecordType::SRV).await;
    assert_eq!(srvs(&m), vec![(1, 1, 8080, "n1.node.dc1.consul.".to_string())]);
    let m = ask(&mut c, "plain.query.dc1.consul.", RecordType::A).await;
    assert_eq!((ips(&m.answers), m.answers[0].ttl), (ip_list(&["10.0.0.2"]), 7));
    let m = ask(&mut c, "nope.query.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

// ------------------------------------------------------------------ negative answers, apex, alt domain, TTLs

#[tokio::test]
async fn unknown_names_get_nxdomain_and_known_names_without_that_type_get_nodata_both_with_the_soa() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    for name in ["nope.service.consul.", "nope.node.consul.", "what.consul.", "service.consul."] {
        let m = ask(&mut c, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(has_soa(&m, "consul."), "{name}");
        assert!(m.answers.is_empty());
    }
    for (name, qtype) in [("web.service.consul.", RecordType::MX), ("n1.node.consul.", RecordType::SRV), ("consul.", RecordType::A)] {
        let m = ask(&mut c, name, qtype).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name} {qtype}");
        assert!(m.answers.is_empty(), "{name} {qtype}");
        assert!(has_soa(&m, "consul."), "{name} {qtype}");
    }
}

#[tokio::test]
async fn the_apex_answers_soa_with_consul_defaults_and_ns_naming_the_servers() {
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "consul.", RecordType::SOA).await;
    let RData::SOA(soa) = &m.answers[0].data else { panic!("no SOA: {m:?}") };
    assert_eq!((soa.refresh, soa.retry, soa.expire, soa.minimum), (3600, 600, 86400, 0));
    assert_eq!((soa.mname.to_ascii(), soa.rname.to_ascii()), ("ns.consul.".to_string(), "hostmaster.consul.".to_string()));
    assert_eq!(m.answers[0].name.to_ascii(), "consul.");
    let m = ask(&mut c, "consul.", RecordType::NS).await;
    let ns: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(n) => Some(n.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(ns, vec!["server1.node.dc1.consul.".to_string()]);
    assert_eq!(ips(&m.additionals), ip_list(&["10.0.0.10"]));

    // No servers registered: the agent's own node is the name server.
    let mut cat = catalog();
    cat.services.retain(|(s, _, _)| s != "consul");
    cat.nodes.push(node("agent-node", "10.0.0.99", "dc1", &[]));
    let s = serve(DnsConfig { soa: SoaConfig { min_ttl: Duration::from_secs(5), ..Default::default() }, ..cfg() }, cat).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "consul.", RecordType::NS).await;
    assert!(matches!(&m.answers[0].data, RData::NS(n) if n.0.to_ascii() == "agent-node.node.dc1.consul."));
    assert_eq!(ips(&m.additionals), ip_list(&["10.0.0.99"]));
    let m = ask(&mut c, "nope.consul.", RecordType::A).await;
    let soa = m.authorities.iter().find(|r| matches!(r.data, RData::SOA(_))).unwrap();
    assert_eq!(soa.ttl, 5, "the SOA's TTL is the minimum TTL");
}

#[tokio::test]
async fn the_alt_domain_is_answered_like_the_domain_using_the_name_asked() {
    let s = serve(DnsConfig { alt_domain: Some("trellis.test".into()), ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "web.service.trellis.test.", RecordType::SRV).await;
    assert!(m.answers.iter().all(|r| r.name.to_ascii() == "web.service.trellis.test."));
    assert_eq!(srvs(&m)[0].3, "n1.node.dc1.trellis.test.");
    let m = ask(&mut c, "nope.trellis.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(has_soa(&m, "trellis.test."));
    let m = ask(&mut c, "trellis.test.", RecordType::SOA).await;
    assert_eq!(m.answers[0].name.to_ascii(), "trellis.test.");
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers).len(), 2, "the primary domain still answers");
}

#[tokio::test]
async fn service_ttls_follow_exact_names_then_the_longest_wildcard_prefix_and_node_ttl_applies_to_nodes() {
    let service_ttl = BTreeMap::from([
        ("*".to_string(), Duration::from_secs(5)),
        ("database-*".to_string(), Duration::from_secs(10)),
        ("database-main".to_string(), Duration::from_secs(20)),
    ]);
    let s = serve(DnsConfig { service_ttl, node_ttl: Duration::from_secs(60), ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    for (name, ttl) in [("database-main", 20), ("database-replica", 10), ("other", 5)] {
        let m = ask(&mut c, &format!("{name}.service.consul."), RecordType::A).await;
        assert_eq!(m.answers[0].ttl, ttl, "{name}");
        let m = ask(&mut c, &format!("{name}.service.consul."), RecordType::SRV).await;
        assert!(m.answers.iter().chain(m.additionals.iter()).all(|r| r.ttl == ttl), "{name} SRV");
    }
    let m = ask(&mut c, "n1.node.consul.", RecordType::A).await;
    assert_eq!(m.answers[0].ttl, 60);
    let m = ask(&mut c, "c0a80001.addr.consul.", RecordType::A).await;
    assert_eq!(m.answers[0].ttl, 60);

    // Without service_ttl, service answers have TTL 0 (Consul's default).
    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert!(m.answers.iter().all(|r| r.ttl == 0));
}

// ------------------------------------------------------------------ sizes and truncation

#[tokio::test]
async fn a_thousand_instances_over_udp_set_tc_and_the_tcp_retry_gets_them_all() {
    let s = serve(cfg(), big_catalog(1000)).await;
    let c = udp_client(s.udp).await;
    let m = ask_edns(&c, "big.service.consul.", RecordType::A, 1232).await;
    assert!(m.metadata.truncation, "TC must be set when answers were dropped");
    assert!(!m.answers.is_empty() && m.answers.len() < 1000);

    let mut t = tcp_client(s.tcp).await;
    let m = ask(&mut t, "big.service.consul.", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1000);
    assert_eq!(ips(&m.answers).into_iter().collect::<std::collections::HashSet<_>>().len(), 1000);

    // SRV over TCP: 1,000 SRV records with all their addresses exceed 64 KiB (SRV targets are
    // never compressed, and hickory compresses only a message's first 120 names), so every
    // answer is kept and the additional section holds what fits.
    let m = ask(&mut t, "big.service.consul.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1000);
    assert!(!m.metadata.truncation, "only additional records were left out");
    let targets: std::collections::HashSet<String> = srvs(&m).into_iter().map(|s| s.3).collect();
    assert!(!m.additionals.is_empty());
    assert!(m.additionals.iter().all(|r| targets.contains(&r.name.to_ascii())));

    // SRV over UDP: truncated, and the additional section matches the answers that were kept.
    let m = ask_edns(&c, "big.service.consul.", RecordType::SRV, 1232).await;
    assert!(m.metadata.truncation);
    let targets: std::collections::HashSet<String> = srvs(&m).into_iter().map(|s| s.3).collect();
    let extras: std::collections::HashSet<String> = m.additionals.iter().filter(|r| r.data.ip_addr().is_some()).map(|r| r.name.to_ascii()).collect();
    assert_eq!(targets, extras);
}

#[tokio::test]
async fn tcp_answers_stop_at_64_kib_with_tc_set() {
    let s = serve(cfg(), big_catalog(3000)).await;
    let mut raw = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q = query_bytes(7, "big.service.consul.", RecordType::SRV, None);
    raw.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    raw.write_all(&q).await.unwrap();
    let len = tokio::time::timeout(CLIENT_TIMEOUT, raw.read_u16()).await.unwrap().unwrap() as usize;
    let mut buf = vec![0u8; len];
    raw.read_exact(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.len() > 500 && m.answers.len() < 3000, "{} answers", m.answers.len());
    assert!(len > 60_000, "the message should be filled close to 64 KiB, was {len}");
}

#[tokio::test]
async fn a_larger_edns_buffer_gets_more_answers_over_udp() {
    let s = serve(cfg(), big_catalog(1000)).await;
    let c = udp_client(s.udp).await;
    let small = ask_edns(&c, "big.service.consul.", RecordType::A, 512).await;
    let large = ask_edns(&c, "big.service.consul.", RecordType::A, 4096).await;
    assert!(small.metadata.truncation && large.metadata.truncation);
    assert!(large.answers.len() > 3 * small.answers.len(), "{} vs {}", large.answers.len(), small.answers.len());
    assert_eq!(large.edns.as_ref().map(|e| e.max_payload()), Some(4096));
    // The raw datagram respects the buffer size.
    let raw = raw_udp(s.udp, &query_bytes(1, "big.service.consul.", RecordType::A, Some(4096)), CLIENT_TIMEOUT).await.unwrap();
    assert!(raw.len() <= 4096 && raw.len() > 3500, "{} bytes", raw.len());
}

#[tokio::test]
async fn udp_answer_limit_trims_classic_udp_answers_and_sets_tc_only_with_enable_truncate() {
    let s = serve(cfg(), big_catalog(20)).await;
    let mut c = classic_udp_client(s.udp).await;
    let m = ask(&mut c, "big.service.consul.", RecordType::A).await;
    assert_eq!(m.answers.len(), 3, "Consul's default udp_answer_limit");
    assert!(!m.metadata.truncation);
    // EDNS clients are not limited by it.
    let e = udp_client(s.udp).await;
    let m = ask_edns(&e, "big.service.consul.", RecordType::A, 1232).await;
    assert_eq!(m.answers.len(), 20);

    let s = serve(DnsConfig { enable_truncate: true, ..cfg() }, big_catalog(20)).await;
    let mut c = classic_udp_client(s.udp).await;
    let m = ask(&mut c, "big.service.consul.", RecordType::A).await;
    assert_eq!(m.answers.len(), 3);
    assert!(m.metadata.truncation);

    // Without the policy limit, a classic client gets what fits in 512 bytes, with TC.
    let s = serve(DnsConfig { udp_answer_limit: 0, ..cfg() }, big_catalog(100)).await;
    let raw = raw_udp(s.udp, &query_bytes(9, "big.service.consul.", RecordType::A, None), CLIENT_TIMEOUT).await.unwrap();
    let m = Message::from_vec(&raw).unwrap();
    assert!(raw.len() <= 512);
    assert!(m.metadata.truncation && m.answers.len() > 3, "{} answers", m.answers.len());
}

// ------------------------------------------------------------------ recursors

/// A tiny upstream resolver: `example.test. A 192.0.2.1`, `big.example.test.` with 100 A
/// records (too big for 1232 bytes), NXDOMAIN otherwise. Counts queries per transport.
#[derive(Clone, Default)]
struct Upstream {
    udp: Arc<AtomicUsize>,
    tcp: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for Upstream {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response_handle: R) -> ResponseInfo {
        use hickory_server::net::xfer::Protocol;
        let counter = if request.protocol() == Protocol::Tcp { &self.tcp } else { &self.udp };
        counter.fetch_add(1, Ordering::Relaxed);
        let query = &request.queries.queries()[0];
        let name = query.original().name().clone();
        let answers: Vec<Record> = match name.to_ascii().as_str() {
            "example.test." => vec![Record::from_rdata(name.clone(), 60, RData::A("192.0.2.1".parse().unwrap()))],
            "big.example.test." => {
                (1..=100).map(|i| Record::from_rdata(name.clone(), 60, RData::A(format!("192.0.2.{i}").parse().unwrap()))).collect()
            }
            _ => Vec::new(),
        };
        let mut meta = hickory_proto::op::Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        meta.response_code = if answers.is_empty() { ResponseCode::NXDomain } else { ResponseCode::NoError };
        let edns = request.edns.as_ref().map(|e| {
            let mut r = Edns::new();
            r.set_max_payload(e.max_payload());
            r
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let resp = builder.build(meta, answers.iter(), [], [], []);
        response_handle.send_response(resp).await.unwrap()
    }
}

/// Start the upstream on one port for both UDP and TCP (as a recursor address implies).
async fn start_upstream(up: Upstream) -> (SocketAddr, hickory_server::Server<Upstream>) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        let Ok(tcp) = TcpListener::bind(addr).await else { continue };
        let mut server = hickory_server::Server::new(up.clone());
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 8);
        return (addr, server);
    }
    panic!("no free port pair");
}

#[tokio::test]
async fn names_outside_the_domain_go_to_the_first_recursor_that_answers_and_truncated_answers_are_retried_over_tcp() {
    let up = Upstream::default();
    let (up_addr, _up_server) = start_upstream(up.clone()).await;
    // A recursor that never answers comes first: it costs one recursor_timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let recursors = vec![silent.local_addr().unwrap(), up_addr];
    let s = serve(DnsConfig { recursors, recursor_timeout: Duration::from_millis(300), ..cfg() }, catalog()).await;
    let mut c = tcp_client(s.tcp).await;

    let m = ask(&mut c, "example.test.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ip_list(&["192.0.2.1"]));
    assert!(m.metadata.recursion_available && !m.metadata.authoritative);
    let m = ask(&mut c, "missing.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let m = ask(&mut c, "big.example.test.", RecordType::A).await;
    assert_eq!(m.answers.len(), 100);
    assert!(up.tcp.load(Ordering::Relaxed) >= 1, "the truncated UDP answer must be retried over TCP");

    // A PTR for an address the catalog does not know goes to the recursors too.
    let m = ask(&mut c, "1.2.0.192.in-addr.arpa.", RecordType::PTR).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(!m.metadata.authoritative);

    // Local answers say recursion is available.
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert!(m.metadata.recursion_available && m.metadata.authoritative);

    // An EDNS UDP client gets the forwarded answer cut to its buffer, with TC.
    let u = udp_client(s.udp).await;
    let m = ask_edns(&u, "big.example.test.", RecordType::A, 512).await;
    assert!(m.metadata.truncation && m.answers.len() < 100);
}

#[tokio::test]
async fn a_recursor_that_times_out_gives_servfail_and_no_recursors_give_refused() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let s =
        serve(DnsConfig { recursors: vec![silent.local_addr().unwrap()], recursor_timeout: Duration::from_millis(200), ..cfg() }, catalog()).await;
    let mut c = udp_client(s.udp).await;
    let started = std::time::Instant::now();
    let m = ask(&mut c, "example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.metadata.recursion_available);
    assert!(started.elapsed() < Duration::from_secs(2));

    let s = serve(cfg(), catalog()).await;
    let mut c = udp_client(s.udp).await;
    let m = ask(&mut c, "example.test.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}

// ------------------------------------------------------------------ failures and malformed input

#[tokio::test]
async fn a_catalog_failure_gives_servfail_and_the_next_question_is_answered_again() {
    let cat = Arc::new(catalog());
    let s = serve_arc(cfg(), cat.clone()).await;
    let mut c = udp_client(s.udp).await;
    cat.unavailable.store(true, Ordering::Relaxed);
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    cat.unavailable.store(false, Ordering::Relaxed);
    let m = ask(&mut c, "web.service.consul.", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_are_dropped_and_the_server_keeps_answering() {
    let s = serve(cfg(), catalog()).await;
    let wait = Duration::from_millis(300);
    let rcode = |b: &[u8]| (b[3] & 0x0f, b[0], b[1], b[2] & 0x80 != 0);

    // Shorter than a header: nothing to answer to.
    assert_eq!(raw_udp(s.udp, &[0x12, 0x34, 0x01], wait).await, None);
    // A header announcing a question that is not there: FORMERR with the same ID.
    let junk = [0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let r = raw_udp(s.udp, &junk, CLIENT_TIMEOUT).await.expect("FORMERR");
    assert_eq!(rcode(&r), (1, 0xab, 0xcd, true));
    // Two questions: FORMERR.
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii("web.service.consul.").unwrap(), RecordType::A));
    m.add_query(Query::query(Name::from_ascii("n1.node.consul.").unwrap(), RecordType::A));
    let r = raw_udp(s.udp, &m.to_vec().unwrap(), CLIENT_TIMEOUT).await.expect("FORMERR");
    assert_eq!(rcode(&r), (1, 0x42, 0x42, true));
    // No question at all: FORMERR.
    let empty = Message::new(0x0101, MessageType::Query, OpCode::Query).to_vec().unwrap();
    assert_eq!(rcode(&raw_udp(s.udp, &empty, CLIENT_TIMEOUT).await.unwrap()).0, 1);
    // An EDNS version we do not speak: BADVERS (extended rcode 16: high bits in the OPT).
    let mut m = Message::new(0x0202, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii("web.service.consul.").unwrap(), RecordType::A));
    let mut e = Edns::new();
    e.set_version(1);
    m.set_edns(e);
    let r = Message::from_vec(&raw_udp(s.udp, &m.to_vec().unwrap(), CLIENT_TIMEOUT).await.unwrap()).unwrap();
    // 16 is both BADVERS and BADSIG on the wire; decoders name it BADSIG.
    assert_eq!(u16::from(r.metadata.response_code), 16);
    // A response (QR=1) is never answered: no reflection.
    let mut resp = query_bytes(0x0303, "web.service.consul.", RecordType::A, None);
    resp[2] |= 0x80;
    assert_eq!(raw_udp(s.udp, &resp, wait).await, None);
    // Another opcode: NOTIMP.
    let mut notify = query_bytes(0x0404, "consul.", RecordType::SOA, None);
    notify[2] |= 4 << 3;
    assert_eq!(rcode(&raw_udp(s.udp, &notify, CLIENT_TIMEOUT).await.unwrap()).0, 4);
    // A zone transfer: NOTIMP.
    let axfr = query_bytes(0x0505, "consul.", RecordType::AXFR, None);
    assert_eq!(rcode(&raw_udp(s.udp, &axfr, CLIENT_TIMEOUT).await.unwrap()).0, 4);

    // Still answering, over both transports.
    let mut c = udp_client(s.udp).await;
    assert_eq!(ips(&ask(&mut c, "web.service.consul.", RecordType::A).await.answers).len(), 2);
    let mut t = tcp_client(s.tcp).await;
    assert_eq!(ips(&ask(&mut t, "web.service.consul.", RecordType::A).await.answers).len(), 2);
}

#[tokio::test]
async fn the_server_stops_when_shutdown_is_cancelled() {
    let mut s = serve(cfg(), catalog()).await;
    let task = s.task.take().unwrap();
    s.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task).await.expect("server stopped").unwrap();
    assert!(result.is_ok(), "{result:?}");
}
