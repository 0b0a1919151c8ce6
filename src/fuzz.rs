//! Entry points for fuzzing: each takes untrusted bytes the way the agent receives them and
//! must return without panicking, whatever they are. `fuzz/` runs them under cargo-fuzz
//! (libFuzzer); the normal test suite runs them on random and mutated inputs (property tests
//! below and beside each decoder), so the properties keep holding between fuzzing campaigns.

use std::sync::{Arc, LazyLock};

use crate::state::{Request, Store};

/// A filter expression (`?filter=`) parsed and evaluated against typical catalog items.
pub fn filter(data: &[u8]) {
    static ITEMS: LazyLock<Vec<serde_json::Value>> = LazyLock::new(|| {
        vec![
            serde_json::json!({"Node": "n1", "Address": "10.0.0.1", "Meta": {"rack": "a"}, "ServiceTags": ["v1", "blue"], "ServicePort": 80,
                "Checks": [{"Status": "passing", "Name": "c"}], "Weights": {"Passing": 1.5}}),
            serde_json::json!({"Node": "", "ServiceTags": [], "Meta": null, "Nested": {"Deep": [{"X": [1, "2", null, true]}]}}),
        ]
    });
    let expr = String::from_utf8_lossy(data);
    if let Ok(f) = crate::api::filter::Filter::parse(&expr) {
        for item in ITEMS.iter() {
            let _ = f.matches(item);
        }
    }
}

/// A duration as the API and config take it.
pub fn duration(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Some(d) = crate::duration::parse(&s) {
        assert!(d <= crate::duration::MAX, "parsed past the maximum: {s:?}");
        let _ = std::time::Instant::now().checked_add(d);
    }
    if let Ok(d) = crate::duration::parse_go(&s) {
        assert_eq!(crate::duration::parse_go(&crate::duration::format_go(d)), Ok(d), "format does not parse back: {s:?}");
    }
}

/// A configuration file (first byte: JSON or HCL), parsed and validated.
pub fn config(data: &[u8]) {
    let Some((&kind, text)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(text);
    if let Ok(raw) = crate::config::parse_str(&text, kind & 1 == 0) {
        let _ = raw.validate(kind & 2 == 0);
    }
}

/// A gossip datagram or push-pull stream.
pub fn gossip(data: &[u8]) {
    crate::membership::fuzz_receive(data);
}

/// An RPC request frame and the body of every service it may address.
pub fn rpc_frame(data: &[u8]) {
    use crate::rpc::{Service, decode};
    let bodies: Vec<Vec<u8>> = match crate::rpc::decode_request_frame(data) {
        Ok((_, _, body)) => vec![body, data.to_vec()],
        Err(_) => vec![data.to_vec()],
    };
    for b in bodies {
        for service in [Service::Raft, Service::Cluster, Service::Http, Service::AutoEncrypt] {
            match service {
                Service::Raft => drop(decode::<crate::consensus::network::RaftRpc>(&b)),
                Service::Cluster => drop(decode::<crate::cluster::ClusterRpc>(&b)),
                Service::Http => {
                    if let Ok(f) = decode::<crate::api::forward::ForwardedRequest>(&b) {
                        let path = f.uri.split('?').next().unwrap_or_default();
                        for role in [crate::rpc::Role::Server, crate::rpc::Role::Client, crate::rpc::Role::RemoteServer("dc2".into())] {
                            let _ = crate::api::forward::relay_allowed(&role, &f.method, path);
                        }
                    }
                }
                Service::AutoEncrypt => drop(decode::<crate::agent::auto_encrypt::SignRequest>(&b)),
            }
        }
    }
}

/// A replicated command (any bytes that decode as one), applied to a store holding a little
/// of everything: apply must refuse what it cannot do, never panic.
pub fn state_apply(data: &[u8]) {
    let Ok(req) = postcard::from_bytes::<Request>(data) else { return };
    let mut store = seeded_store();
    let _ = store.apply(100, &req);
    // The result must still encode (it is what snapshots are made of).
    let _ = postcard::to_allocvec(store.data()).expect("state encodes");
}

/// Valid commands to seed the state and the fuzzers' corpora with.
pub fn sample_requests() -> Vec<Request> {
    use crate::state::*;
    let reg = |node: &str, svc: &str, status: CheckStatus| {
        Command::Register(Registration {
            node: Node { node: node.into(), address: "10.0.0.1".into(), ..Default::default() },
            service: Some(Service { service: svc.into(), id: svc.into(), port: 80, tags: vec!["v1".into()], ..Default::default() }),
            checks: vec![HealthCheck { check_id: "c".into(), name: "c".into(), status, service_id: svc.into(), ..Default::default() }],
            skip_node_update: false,
        })
    };
    let set = |k: &str| TxnOp { verb: KvVerb::Set, key: k.into(), value: Some(b"v".to_vec()), flags: 0, index: 0, session: String::new() };
    let cmds = vec![
        reg("n1", "web", CheckStatus::Passing),
        reg("n2", "db", CheckStatus::Critical),
        Command::Txn(vec![set("a/b"), set("a/c"), set("lock")]),
        Command::SessionCreate(Session { id: "s1".into(), node: "n1".into(), ttl: "10s".into(), ..Default::default() }),
        Command::Txn(vec![TxnOp { verb: KvVerb::Lock, key: "lock".into(), value: None, flags: 0, index: 0, session: "s1".into() }]),
        Command::Txn(vec![TxnOp { verb: KvVerb::Delete, key: "a/c".into(), value: None, flags: 0, index: 0, session: String::new() }]),
        Command::CoordinateBatch(vec![("n1".into(), crate::coordinate::Coordinate::default())]),
        Command::Deregister { node: "n2".into(), service_id: Some("db".into()), check_id: None },
        Command::KvReap { up_to: 3 },
        Command::SessionDestroy { id: "s1".into() },
    ];
    cmds.into_iter().map(|command| Request { now_ms: 1_000_000, command }).collect()
}

fn seeded_store() -> Store {
    let mut s = Store::new();
    for (i, r) in sample_requests().iter().enumerate() {
        s.apply(i as u64 + 1, r);
    }
    s
}

/// A DNS query datagram, answered from a small fixed catalog.
pub fn dns(data: &[u8]) {
    static RT: LazyLock<tokio::runtime::Runtime> =
        LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"));
    static SERVER: LazyLock<crate::dns::DnsServer> = LazyLock::new(|| {
        let cfg = crate::dns::DnsConfig { alt_domain: Some("alt.test".into()), ..Default::default() };
        crate::dns::DnsServer::new(cfg, Arc::new(FixedCatalog), "agent".into())
    });
    let src = std::net::SocketAddr::from(([127, 0, 0, 1], 5353));
    let _ = RT.block_on(SERVER.answer_datagram(data.to_vec(), src));
}

/// A catalog of a few fixed instances, nodes and a prepared query.
struct FixedCatalog;

fn instance(node: &str, ip: &str) -> crate::dns::Instance {
    crate::dns::Instance {
        node: node.into(),
        node_address: ip.into(),
        service_address: String::new(),
        port: 80,
        status: crate::dns::Health::Passing,
        node_meta: Default::default(),
        datacenter: String::new(),
    }
}

#[async_trait::async_trait]
impl crate::dns::DnsCatalog for FixedCatalog {
    async fn service_instances(
        &self,
        dc: Option<&str>,
        service: &str,
        _tag: Option<&str>,
    ) -> Result<Vec<crate::dns::Instance>, crate::dns::LookupError> {
        match (dc, service) {
            (Some(d), _) if d != "dc1" => Err(crate::dns::LookupError::UnknownDatacenter),
            (_, "web") => Ok((0..40).map(|i| instance(&format!("n{i}"), &format!("10.0.0.{i}"))).collect()),
            (_, "v6") => Ok(vec![instance("n6", "2001:db8::1")]),
            _ => Ok(Vec::new()),
        }
    }
    async fn node(&self, _dc: Option<&str>, name: &str) -> Result<Option<crate::dns::NodeInfo>, crate::dns::LookupError> {
        Ok((name == "n1").then(|| crate::dns::NodeInfo {
            name: "n1".into(),
            address: "10.0.0.1".into(),
            meta: Default::default(),
            datacenter: String::new(),
        }))
    }
    async fn by_address(&self, _ip: std::net::IpAddr) -> Result<Vec<crate::dns::PtrTarget>, crate::dns::LookupError> {
        Ok(Vec::new())
    }
    async fn prepared_query(
        &self,
        _dc: Option<&str>,
        _name: &str,
        _source: Option<std::net::IpAddr>,
    ) -> Result<Option<crate::dns::QueryResult>, crate::dns::LookupError> {
        Ok(None)
    }
    fn datacenter(&self) -> String {
        "dc1".into()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Valid encodings with bytes flipped, cut or spliced: reaches deep into structures that
    /// purely random bytes rarely decode as.
    fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
        (0..seeds.len(), proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8), any::<usize>(), any::<bool>()).prop_map(
            move |(i, flips, cut, truncate)| {
                let mut d = seeds[i].clone();
                for (at, b) in flips {
                    if !d.is_empty() {
                        let n = d.len();
                        d[at % n] ^= b;
                    }
                }
                if truncate && !d.is_empty() {
                    d.truncate(cut % d.len());
                }
                d
            },
        )
    }

    fn request_seeds() -> Vec<Vec<u8>> {
        sample_requests().iter().map(|r| postcard::to_allocvec(r).unwrap()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn apply_never_panics_on_mutated_commands(d in mutated(request_seeds())) {
            state_apply(&d);
        }

        #[test]
        fn apply_never_panics_on_random_bytes(d in proptest::collection::vec(any::<u8>(), 0..200)) {
            state_apply(&d);
        }

        #[test]
        fn rpc_frames_never_panic(d in mutated(request_seeds().into_iter().map(|b| crate::rpc::encode_request_frame(7, crate::rpc::Service::Cluster, b).unwrap()).collect())) {
            rpc_frame(&d);
        }

        #[test]
        fn filters_never_panic(s in "[A-Za-z.\\[\\]\"0-9 =!<>()_-]{0,60}|(Node|ServiceTags|Meta\\.rack|Checks) (==|!=|contains|in|not in|matches|is empty) [\"a-z0-9 ]{0,12}( (and|or) not [A-Za-z]{1,8} == \"x\")?") {
            filter(s.as_bytes());
        }

        #[test]
        fn config_files_never_panic(kind in any::<u8>(), s in "[a-z_{}\\[\\]=\" \\n0-9.:,-]{0,80}|\\{\"(server|ports|limits|tls|dns_config|bind_addr)\": *(true|1|\"x\"|\\{\\}|\\[\\]|\\{\"https\": *-?[0-9]{1,6}\\})\\}") {
            let mut d = vec![kind];
            d.extend(s.as_bytes());
            config(&d);
        }

        #[test]
        fn dns_datagrams_never_panic(d in proptest::collection::vec(any::<u8>(), 0..120)) {
            dns(&d);
        }
    }
}
