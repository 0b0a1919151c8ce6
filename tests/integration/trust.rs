//! Trust boundaries against a real server: every request kind is refused from the kinds of
//! peer that may not send it (a client agent, another datacenter's server, a certificate that
//! names no agent), while what each legitimately needs still works.

use std::net::SocketAddr;
use std::time::Duration;

use trellis::api::forward::{ForwardedRequest, ForwardedResponse};
use trellis::cluster::{ClusterReply, ClusterRpc, KeyringOp};
use trellis::consensus::network::RaftRpc;
use trellis::rpc::{ErrorCode, RpcClient, Service};
use trellis::state::{AgentCa, Command, Registration, Request};
use trellis::tls::CertKind;

use crate::harness::Cluster;

const T: Duration = Duration::from_secs(10);

fn client_with(c: &Cluster, kind: CertKind, dc: &str) -> RpcClient {
    RpcClient::new(c.material(kind, dc).client_config().unwrap(), trellis::tls::rpc_server_name("dc1", "consul"))
}

fn apply(command: Command) -> ClusterRpc {
    ClusterRpc::Apply { req: Box::new(Request { now_ms: 0, command }), hops: 0 }
}

fn http(method: &str, uri: &str) -> ForwardedRequest {
    ForwardedRequest { method: method.into(), uri: uri.into(), headers: Vec::new(), body: Vec::new() }
}

async fn cluster_call(rpc: &RpcClient, addr: SocketAddr, req: &ClusterRpc) -> Result<ClusterReply, ErrorCode> {
    rpc.call_typed::<ClusterRpc, ClusterReply>(addr, Service::Cluster, req, T).await.map_err(|e| e.code)
}

async fn relay(rpc: &RpcClient, addr: SocketAddr, req: &ForwardedRequest) -> Result<ForwardedResponse, ErrorCode> {
    rpc.call_typed::<ForwardedRequest, ForwardedResponse>(addr, Service::Http, req, T).await.map_err(|e| e.code)
}

/// What this test does:
/// - starts one server, and talks to its RPC port with a client agent's certificate, a dc2
///   server's certificate and a dc2 client's certificate (which names no agent of dc1),
/// - sends each the cluster requests, Raft messages and relayed HTTP requests its kind may not
///   send (leave, snapshot, restore, joining Raft, initialising the CA, ...) and expects every
///   one refused as forbidden,
/// - checks the server is unharmed and that each peer's legitimate requests still work.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_kind_is_refused_from_peers_that_may_not_send_it() {
    let c = Cluster::start(1).await;
    let addr: SocketAddr = c.servers[0].rpc().parse().unwrap();
    let client = client_with(&c, CertKind::Client, "dc1");
    let remote = client_with(&c, CertKind::Server, "dc2");
    let stranger = client_with(&c, CertKind::Client, "dc2");

    let ca = AgentCa { cert_pem: "x".into(), key_pem: "x".into() };
    let refused_for_clients = vec![
        ClusterRpc::Hello,
        ClusterRpc::Join { id: 7, node: Default::default() },
        apply(Command::RestoreCommit { id: "r".into(), sha256: Vec::new() }),
        apply(Command::AgentCaInit(ca.clone())),
        apply(Command::Txn(Vec::new())),
        apply(Command::SessionDestroy { id: "x".into() }),
        ClusterRpc::Ping,
        ClusterRpc::Elect,
        // The mesh: only another datacenter's leader gets an intermediate or follows the CA.
        ClusterRpc::SignIntermediate { datacenter: "dc1".into(), csr: Vec::new() },
        ClusterRpc::MeshState { min_index: 0 },
    ];
    let refused_for_other_dcs = vec![
        ClusterRpc::Join { id: 7, node: Default::default() },
        apply(Command::Register(Registration::default())),
        apply(Command::RestoreCommit { id: "r".into(), sha256: Vec::new() }),
        ClusterRpc::Datacenters,
        ClusterRpc::LanPing,
        ClusterRpc::NodeState { node: "s1".into() },
        ClusterRpc::Elect,
        // Leaves are signed by the servers of the service's own datacenter.
        ClusterRpc::SignLeaf { csr: Vec::new() },
    ];
    let refused_for_strangers = vec![
        ClusterRpc::Hello,
        ClusterRpc::Read { dc: None, query: trellis::state::catalog::CatalogQuery::Node { name: "s1".into() } },
        ClusterRpc::Keyring { op: KeyringOp::Use, key: "x".into() },
        apply(Command::Register(Registration::default())),
        ClusterRpc::SignLeaf { csr: Vec::new() },
        ClusterRpc::CaRoots,
        ClusterRpc::SignIntermediate { datacenter: "dc2".into(), csr: Vec::new() },
        ClusterRpc::MeshState { min_index: 0 },
    ];
    for (who, rpc, requests) in [
        ("client agent", &client, refused_for_clients),
        ("dc2 server", &remote, refused_for_other_dcs),
        ("stranger", &stranger, refused_for_strangers),
    ] {
        for req in requests {
            let got = cluster_call(rpc, addr, &req).await;
            assert!(matches!(got, Err(ErrorCode::Forbidden)), "{who} sending {req:?}: {got:?}");
        }
    }

    // Raft messages come from servers of this datacenter only.
    let vote = RaftRpc::Vote(openraft::raft::VoteRequest { vote: openraft::Vote::new(99, 7), last_log_id: None });
    let pre_vote = RaftRpc::PreVote(trellis::consensus::election::PreVote { candidate: 7, last_log_index: Some(u64::MAX) });
    for (who, rpc) in [("client agent", &client), ("dc2 server", &remote)] {
        for (what, req) in [("voting", &vote), ("asking for a pre-vote", &pre_vote)] {
            let got = rpc.call_typed::<RaftRpc, trellis::consensus::network::RaftReply>(addr, Service::Raft, req, T).await.map(|_| ());
            assert_eq!(got.map_err(|e| e.code), Err(ErrorCode::Forbidden), "{who} {what}");
        }
    }

    // Relayed HTTP: nobody relays agent endpoints, snapshots or operator writes.
    for (who, rpc, req) in [
        ("client agent", &client, http("PUT", "/v1/agent/leave")),
        ("client agent", &client, http("PUT", "/v1/agent/reload")),
        ("client agent", &client, http("GET", "/v1/snapshot")),
        ("client agent", &client, http("PUT", "/v1/snapshot")),
        ("client agent", &client, http("DELETE", "/v1/operator/raft/peer?id=x")),
        ("client agent", &client, http("PUT", "/v1/operator/keyring")),
        ("dc2 server", &remote, http("PUT", "/v1/agent/leave")),
        ("dc2 server", &remote, http("GET", "/v1/snapshot")),
        ("dc2 server", &remote, http("GET", "/v1/operator/raft/configuration")),
        ("stranger", &stranger, http("GET", "/v1/kv/?recurse")),
    ] {
        let got = relay(rpc, addr, &req).await;
        assert!(matches!(got, Err(ErrorCode::Forbidden)), "{who} relaying {} {}: {:?}", req.method, req.uri, got.map(|r| r.status));
    }

    // The server is still there, and every peer's legitimate requests work.
    assert!(!c.get_json(&format!("{}/v1/status/leader", c.servers[0].http())).await.unwrap().as_str().unwrap().is_empty());
    assert_eq!(relay(&client, addr, &http("GET", "/v1/catalog/nodes")).await.unwrap().status, 200);
    assert_eq!(relay(&client, addr, &http("GET", "/v1/operator/raft/configuration")).await.unwrap().status, 200);
    assert_eq!(relay(&remote, addr, &http("GET", "/v1/kv/?recurse")).await.unwrap().status, 404);
    assert!(matches!(cluster_call(&client, addr, &ClusterRpc::Datacenters).await, Ok(ClusterReply::Datacenters(_))));
    assert!(matches!(cluster_call(&remote, addr, &ClusterRpc::Ping).await, Ok(ClusterReply::Pong { .. })));
    let reg =
        Registration { node: trellis::state::Node { node: "c9".into(), address: "127.0.0.9".into(), ..Default::default() }, ..Default::default() };
    assert!(matches!(cluster_call(&client, addr, &apply(Command::Register(reg))).await, Ok(ClusterReply::Applied { .. })));
}
