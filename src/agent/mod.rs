//! The composition root: builds a server agent from its `Config` (storage, Raft, RPC, HTTP API,
//! background workers), runs it, and owns the shutdown order.
//!
//! Shutdown, written out once in `Agent::shutdown`: stop accepting HTTP and drain it with a
//! deadline, hand leadership to another voter, stop the workers, stop Raft, flush storage.

pub mod auto_encrypt;
pub mod cluster;
pub mod coordinates;
pub mod dns;
pub mod join;
pub mod leader;
pub mod local;
pub mod mesh;
pub mod notify;
pub mod ops;

use parking_lot::{Mutex, RwLock};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AgentInfo, ApiContext};
use crate::cluster::{ClusterReply, ClusterRpc, RaftNode};
use crate::config::{Config, RpcTls};
use crate::consensus::log_store::LogStore;
use crate::consensus::network::{ContactLog, Network, RaftHandler};
use crate::consensus::state_machine::StateMachine;
use crate::consensus::storage::Storage;
use crate::consensus::{Raft, ServerNode, raft_config};
use crate::membership::{self, Gossip};
use crate::rpc::{RpcClient, RpcServer, Service};
use crate::state::Store;
use crate::tls::{self, CertKind, TlsMaterial};

/// How long in-flight HTTP requests get to finish at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long a graceful leave may take to reach the gossip pool.
const LEAVE_DEADLINE: Duration = Duration::from_secs(3);
/// How long a departing leader waits for a successor.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data_dir {path}: {error}")]
    DataDir { path: String, error: std::io::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {what} address {addr}: {error}")]
    Bind { what: &'static str, addr: std::net::SocketAddr, error: std::io::Error },
    #[error("raft: {0}")]
    Raft(String),
    #[error("gossip: {0}")]
    Gossip(String),
    #[error("{0}")]
    Config(String),
}

/// This node's identity, created once and kept in the data dir.
fn node_identity(data_dir: &Path) -> Result<(String, u64), AgentError> {
    let path = data_dir.join("node-id");
    let err = |error| AgentError::DataDir { path: path.display().to_string(), error };
    let id = match std::fs::read_to_string(&path) {
        Ok(s) if uuid::Uuid::parse_str(s.trim()).is_ok() => s.trim().to_string(),
        _ => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&path, &id).map_err(err)?;
            id
        }
    };
    let u = uuid::Uuid::parse_str(&id).expect("validated above");
    // Raft wants a number: the UUID's first 8 bytes, never zero.
    let raft_id = u64::from_be_bytes(u.as_bytes()[..8].try_into().expect("8 bytes")).max(1);
    Ok((id, raft_id))
}

/// Dev mode makes its own CA and server certificate, kept in the data dir.
fn dev_tls(cfg: &Config) -> Result<TlsMaterial, AgentError> {
    let dir = cfg.data_dir.join("tls");
    std::fs::create_dir_all(&dir).map_err(|error| AgentError::DataDir { path: dir.display().to_string(), error })?;
    let (ca, ca_key, cert, key) = (dir.join(tls::CA_CERT_FILE), dir.join(tls::CA_KEY_FILE), dir.join("server.pem"), dir.join("server-key.pem"));
    if !(ca.exists() && cert.exists() && key.exists()) {
        let (ca_pem, ca_key_pem) = tls::create_ca(&cfg.domain)?;
        let (c, k) = tls::create_cert(&ca_pem, &ca_key_pem, CertKind::Server, &cfg.datacenter, &cfg.domain, &[])?;
        for (p, t) in [(&ca, &ca_pem), (&ca_key, &ca_key_pem), (&cert, &c), (&key, &k)] {
            tls::write(p, t)?;
        }
    }
    Ok(TlsMaterial::load(&ca, &cert, &key)?)
}

pub struct Agent {
    node: Option<RaftNode>,
    reload: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
    storage: Option<Storage>,
    gossip: Gossip,
    wan: Option<Gossip>,
    tasks: JoinSet<&'static str>,
    shutdown: CancellationToken,
    http_addr: std::net::SocketAddr,
    /// The HTTP API, for callers in this process (fuzzing, tests, a gateway's own agent).
    router: axum::Router,
    ctx: api::Ctx,
}

/// The server-only parts: Raft on its write-ahead log, and the RPC listener other agents call.
struct ServerParts {
    node: RaftNode,
    network: Network,
    storage: Storage,
    rpc_listener: TcpListener,
}

async fn start_server(cfg: &Config, node_uuid: &str, raft_id: u64, client: &RpcClient) -> Result<ServerParts, AgentError> {
    let dd = &cfg.data_dir;
    let rpc_listener =
        TcpListener::bind(cfg.rpc_addr()).await.map_err(|error| AgentError::Bind { what: "server RPC", addr: cfg.rpc_addr(), error })?;
    let rpc_addr = rpc_listener.local_addr().map_err(|error| AgentError::Bind { what: "server RPC", addr: cfg.rpc_addr(), error })?;
    let storage = Storage::open(&dd.join("raft")).map_err(|e| AgentError::Storage(e.to_string()))?;
    let store = Arc::new(RwLock::new(Store::new()));
    let sm = StateMachine::open(storage.clone(), store.clone(), cfg.raft.snapshot_log_bytes).map_err(|e| AgentError::Storage(e.to_string()))?;
    let log = LogStore::new(storage.clone());
    let contacts = ContactLog::default();
    let network = Network { client: client.clone(), contacts: contacts.clone() };
    let rcfg = raft_config(&cfg.raft).map_err(|e| AgentError::Raft(e.to_string()))?;
    let raft = Raft::new(raft_id, Arc::new(rcfg), network.clone(), log, sm).await.map_err(|e| AgentError::Raft(e.to_string()))?;
    let me = ServerNode { id: node_uuid.to_string(), name: cfg.node_name.clone(), rpc_addr: rpc_addr.to_string() };
    Ok(ServerParts {
        node: RaftNode { id: raft_id, me, writes: crate::cluster::batch::Batcher::start(raft.clone()), raft, store, rpc: client.clone(), contacts },
        network,
        storage,
        rpc_listener,
    })
}

impl Agent {
    /// Build and start every part of an agent: a server with `cfg.server`, else a client.
    pub async fn start(cfg: Config) -> Result<Agent, AgentError> {
        let dd = &cfg.data_dir;
        std::fs::create_dir_all(dd).map_err(|error| AgentError::DataDir { path: dd.display().to_string(), error })?;
        // A client agent with auto-encrypt has only the CA until the servers sign its certificate.
        let (material, auto_encrypt_ca) = match &cfg.tls {
            RpcTls::Files(f) => (Some(TlsMaterial::load(&f.ca_file, &f.cert_file, &f.key_file)?), None),
            RpcTls::Dev => (Some(dev_tls(&cfg)?), None),
            RpcTls::AutoEncrypt { ca_file } => (None, Some(tls::read(ca_file)?)),
        };
        let client_tls = match (&material, &auto_encrypt_ca) {
            (Some(m), _) => m.client_config()?,
            (None, Some(ca)) => tls::anonymous_client_config(ca)?,
            (None, None) => unreachable!("every RpcTls variant yields material or a CA"),
        };
        let (node_uuid, raft_id) = node_identity(dd)?;
        let client = RpcClient::new(client_tls, tls::rpc_server_name(&cfg.datacenter, &cfg.domain));
        let http_listener =
            TcpListener::bind(cfg.http_addr()).await.map_err(|error| AgentError::Bind { what: "HTTP", addr: cfg.http_addr(), error })?;
        let http_addr = http_listener.local_addr().map_err(|error| AgentError::Bind { what: "HTTP", addr: cfg.http_addr(), error })?;
        let server = if cfg.server { Some(start_server(&cfg, &node_uuid, raft_id, &client).await?) } else { None };
        let rpc_addr = match &server {
            Some(s) => s.rpc_listener.local_addr().map_err(|error| AgentError::Bind { what: "server RPC", addr: cfg.rpc_addr(), error })?,
            None => cfg.rpc_addr(),
        };

        let mut tags = std::collections::BTreeMap::from([
            ("role".to_string(), if cfg.server { "consul" } else { "node" }.to_string()),
            ("dc".to_string(), cfg.datacenter.clone()),
            ("id".to_string(), node_uuid.clone()),
            ("build".to_string(), api::version().to_string()),
            ("vsn".to_string(), "2".to_string()),
        ]);
        if cfg.server {
            tags.insert("port".into(), rpc_addr.port().to_string());
            tags.insert("expect".into(), cfg.bootstrap_expect.to_string());
        }
        let keyring = cfg.encrypt.as_deref().map(membership::keyring::Keyring::new).transpose().map_err(|e| AgentError::Gossip(e.to_string()))?;
        if let Some(k) = &keyring {
            tags.extend(ops::keyring_tags(k));
        }
        // A server's WAN identity carries the same tags, less the bootstrap expectation.
        let mut wan_tags = tags.clone();
        wan_tags.remove("expect");
        let gossip_addr = gossip_address(&cfg)?;
        if keyring.is_none() && !gossip_addr.ip().is_loopback() {
            warn!(
                bind = %gossip_addr,
                "gossip is not encrypted and this agent is reachable off loopback: anyone on the network can read and inject \
                 membership messages; set encrypt (a key from `trellis keygen`) on every agent"
            );
        }
        let (gossip, gossip_worker) = membership::start(membership::GossipConfig {
            node_name: cfg.node_name.clone(),
            bind: gossip_addr,
            advertise: gossip_addr,
            tags,
            keyring: keyring.clone(),
            profile: membership::Profile::lan(),
            reap_failed_after: cfg.reconnect_timeout,
        })
        .await
        .map_err(|e| AgentError::Gossip(e.to_string()))?;

        // Servers also join the WAN pool of every datacenter's servers, as `<node>.<dc>`.
        let wan = match (cfg.server, cfg.serf_wan_port) {
            (true, Some(port)) => {
                let bind = wan_address(&cfg, port)?;
                // The same keyring as the LAN pool: a key installed, used or removed through
                // the keyring API applies to both pools of this server.
                let keyring = keyring.clone();
                let (g, worker) = membership::start(membership::GossipConfig {
                    node_name: format!("{}.{}", cfg.node_name, cfg.datacenter),
                    bind,
                    advertise: bind,
                    tags: wan_tags,
                    keyring,
                    profile: membership::Profile::wan(),
                    reap_failed_after: cfg.reconnect_timeout,
                })
                .await
                .map_err(|e| AgentError::Gossip(format!("WAN pool: {e}")))?;
                Some((g, worker))
            }
            _ => None,
        };
        let wan_gossip = wan.as_ref().map(|(g, _)| g.clone());
        let federation = match &material {
            Some(m) if cfg.server => Some(crate::federation::Router::new(
                cfg.datacenter.clone(),
                cfg.domain.clone(),
                &cfg.node_name,
                wan_gossip.clone(),
                m.client_config()?,
            )),
            _ => None,
        };

        let shutdown = CancellationToken::new();
        let facts = local::NodeFacts {
            name: cfg.node_name.clone(),
            id: node_uuid.clone(),
            datacenter: cfg.datacenter.clone(),
            address: cfg.bind_addr.to_string(),
            meta: Default::default(),
            server: cfg.server,
            sidecar_ports: cfg.sidecar_ports,
        };
        let options = local::checks::RunnerOptions {
            enable_script_checks: cfg.enable_script_checks,
            enable_local_script_checks: cfg.enable_local_script_checks,
            ..Default::default()
        };
        if cfg.enable_script_checks {
            warn!(
                "enable_script_checks lets anyone who can reach this agent's HTTP API run commands on it; \
                 use enable_local_script_checks (config files and loopback only) instead"
            );
        }
        let node = server.as_ref().map(|s| s.node.clone());
        let (local_agent, updates) = local::LocalAgent::new(facts, dd.clone(), options, node.clone(), shutdown.clone());
        for s in &cfg.services {
            local_agent.add_service(s.clone(), local::Origin::Config, false).map_err(|e| AgentError::Config(format!("service {s}: {e}")))?;
        }
        for c in &cfg.checks {
            local_agent.add_check(c.clone(), local::Origin::Config).map_err(|e| AgentError::Config(format!("check {c}: {e}")))?;
        }
        local_agent.restore();

        let upstream = match &node {
            Some(n) => local::Upstream::Raft(n.clone()),
            None => {
                let (g, dc) = (gossip.clone(), cfg.datacenter.clone());
                local::Upstream::Rpc { rpc: client.clone(), servers: Arc::new(move || ops::alive_servers(&g, &dc)) }
            }
        };
        // The mesh: servers sign leaves; every agent keeps the leaves its services ask for.
        let signer = node.as_ref().map(|n| mesh::Signer::new(n.clone(), cfg.datacenter.clone()));
        let mesh_upstream = match (&node, &signer) {
            (Some(n), Some(s)) => mesh::MeshUpstream::Local { node: n.clone(), signer: s.clone() },
            _ => {
                let (g, dc) = (gossip.clone(), cfg.datacenter.clone());
                mesh::MeshUpstream::Remote { rpc: client.clone(), servers: Arc::new(move || ops::alive_servers(&g, &dc)) }
            }
        };
        let leaves = mesh::LeafCache::new(mesh_upstream, cfg.datacenter.clone(), shutdown.clone());
        let reload = notify::around_reload(reloader(&cfg, local_agent.clone()));
        let events = Arc::new(ops::EventLog::default());
        let handle = Arc::new(ops::AgentHandle {
            events: events.clone(),
            local: local_agent.clone(),
            gossip: gossip.clone(),
            raft: node.clone(),
            datacenter: cfg.datacenter.clone(),
            serf_lan_port: cfg.serf_lan_port,
            wan: wan_gossip.clone(),
            serf_wan_port: cfg.serf_wan_port.unwrap_or(crate::config::DEFAULT_SERF_WAN_PORT),
            federation: federation.clone(),
            rpc: client.clone(),
            leaves: leaves.clone(),
            connect_enabled: cfg.connect.enabled,
            shutdown: shutdown.clone(),
            reload: reload.clone(),
        });
        let sessions = crate::cluster::sessions::SessionTimers::default();
        let health = Arc::new(Mutex::new(api::operator::AutopilotHealth::default()));
        let ctx = Arc::new(ApiContext {
            info: AgentInfo {
                node_name: cfg.node_name.clone(),
                node_id: node_uuid,
                datacenter: cfg.datacenter.clone(),
                primary_datacenter: cfg.primary_datacenter.clone(),
                domain: cfg.domain.clone(),
                server: cfg.server,
                bootstrap_expect: cfg.bootstrap_expect,
                bind_addr: rpc_addr,
                http_addr,
                dns_port: cfg.dns_port,
                log_level: cfg.log_level.clone(),
                data_dir: dd.display().to_string(),
                connect_enabled: cfg.connect.enabled,
                default_intention_policy: cfg.connect.default_intention_policy,
            },
            node: node.clone(),
            rpc: client.clone(),
            federation: federation.clone(),
            agent: handle.clone(),
            sessions: sessions.clone(),
            autopilot: health.clone(),
            metrics: api::metrics::Registry::default(),
            limits: cfg.limits.clone(),
            blocking_slots: Arc::new(tokio::sync::Semaphore::new(cfg.limits.http_max_blocking_queries)),
            results: Default::default(),
            agent_cache: (!cfg.server).then(|| api::agent_cache::AgentCache::new(shutdown.clone())),
            started: Instant::now(),
        });
        let router = api::router(ctx.clone());

        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = gossip_worker.run(token).await {
                error!(error = %e, "gossip failed");
            }
            "gossip"
        });
        let token = shutdown.clone();
        // The forwarded-request marker is set only by the RPC handler; a client must not be
        // able to claim it and skip forwarding to the leader.
        // The origin headers are likewise ours: they say which agent and client a request came
        // in through, for `near=_agent` and `near=_ip` after relaying.
        let origin_node = axum::http::HeaderValue::from_str(&cfg.node_name).ok();
        // A plain function of the request (no future of its own to allocate per request).
        let serve_router = router.clone().layer(tower::util::MapRequestLayer::new(move |mut req: axum::extract::Request| {
            let ip = req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
            let h = req.headers_mut();
            h.remove(api::forward::FORWARDED_HEADER);
            h.remove(api::prepared_query::ORIGIN_IP_HEADER);
            h.remove(api::prepared_query::ORIGIN_NODE_HEADER);
            if let Some(v) = origin_node.clone() {
                h.insert(api::prepared_query::ORIGIN_NODE_HEADER, v);
            }
            if let Some(v) = ip.and_then(|ip| axum::http::HeaderValue::from_str(&ip.to_string()).ok()) {
                h.insert(api::prepared_query::ORIGIN_IP_HEADER, v);
            }
            req
        }));
        let conn_counts = api::listener::ConnCounts::default();
        let http = api::listener::HttpListener {
            listener: http_listener,
            router: serve_router.clone(),
            tls: None,
            max_conns_per_client: cfg.limits.http_max_conns_per_client,
            header_read_timeout: cfg.limits.http_read_header_timeout,
        };
        let counts = conn_counts.clone();
        tasks.spawn(async move {
            if let Err(e) = http.run(counts, token).await {
                error!(error = %e, "http server failed");
            }
            "http"
        });
        if let Some(h) = &cfg.https {
            let addr = std::net::SocketAddr::new(cfg.client_addr, h.port);
            let listener = TcpListener::bind(addr).await.map_err(|error| AgentError::Bind { what: "HTTPS", addr, error })?;
            let client_ca = h.client_ca_file.as_deref().map(tls::read).transpose()?;
            let tls_cfg = api::listener::https_config(&tls::read(&h.cert_file)?, &tls::read(&h.key_file)?, client_ca.as_deref())
                .map_err(|e| AgentError::Config(format!("tls.https: {e}")))?;
            let https = api::listener::HttpListener {
                listener,
                router: serve_router.clone(),
                tls: Some(tls_cfg),
                max_conns_per_client: cfg.limits.http_max_conns_per_client,
                header_read_timeout: cfg.limits.http_read_header_timeout,
            };
            let (counts, token) = (conn_counts.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(e) = https.run(counts, token).await {
                    error!(error = %e, "https server failed");
                }
                "https"
            });
        }
        tasks.spawn(local_agent.clone().run_updates(updates).map_name("check-updates"));
        tasks.spawn(events.run(gossip.clone(), local_agent.clone(), shutdown.clone()).map_name("events"));
        let size_gossip = gossip.clone();
        if let Some(port) = cfg.dns_port {
            let (udp, tcp) = dns_sockets(std::net::SocketAddr::new(cfg.client_addr, port)).await?;
            let dns_cfg = cfg.dns.clone();
            let catalog = Arc::new(dns::CatalogDns {
                upstream: upstream.clone(),
                datacenter: cfg.datacenter.clone(),
                node_name: cfg.node_name.clone(),
                federation: federation.clone(),
            });
            let server = crate::dns::DnsServer::new(dns_cfg, catalog, cfg.node_name.clone());
            let token = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = server.run(udp, tcp, token).await {
                    error!(error = %e, "dns server failed");
                }
                "dns"
            });
        }
        if cfg.connect.enabled && cfg.connect.run_sidecars {
            // Sidecar proxies registered on this agent run in its process, fed by its own API.
            let services_of = local_agent.clone();
            let manager = crate::proxy::SidecarManager {
                api: Arc::new(crate::proxy::source::InProcess(serve_router.clone())),
                settings: crate::proxy::ProxySettings {
                    node_address: cfg.bind_addr,
                    datacenter: cfg.datacenter.clone(),
                    default_intention_policy: cfg.connect.default_intention_policy,
                },
                services: Arc::new(move || services_of.services_json()),
                changes: local_agent.changes(),
            };
            // Their HTTP upstreams' request counts and latencies, in this agent's metrics.
            ctx.metrics.sources.lock().push(Arc::new(|| crate::proxy::http::METRICS.counters()));
            ctx.metrics.histograms.lock().push(Arc::new(|| crate::proxy::http::METRICS.histograms()));
            let token = shutdown.clone();
            tasks.spawn(async move {
                manager.run(token).await;
                "sidecars"
            });
        }
        let syncer = local::sync::SyncWorker {
            local: local_agent,
            upstream: upstream.clone(),
            interval: cfg.ae_interval,
            cluster_size: Arc::new(move || size_gossip.members().len()),
        };
        tasks.spawn(syncer.run(shutdown.clone()).map_name("anti-entropy"));
        if let Some(ca_pem) = auto_encrypt_ca {
            let worker = auto_encrypt::CertWorker {
                rpc: client.clone(),
                ca_pem,
                gossip: gossip.clone(),
                datacenter: cfg.datacenter.clone(),
                node_name: cfg.node_name.clone(),
                dir: dd.join("auto-encrypt"),
            };
            let current = worker.restore();
            tasks.spawn(worker.run(current, shutdown.clone()).map_name("auto-encrypt"));
        }
        if let Some((g, worker)) = wan {
            let token = shutdown.clone();
            tasks.spawn(async move {
                if let Err(e) = worker.run(token).await {
                    error!(error = %e, "WAN gossip failed");
                }
                "wan-gossip"
            });
            let wan_join = join::GossipJoinWorker {
                gossip: g,
                retry_join: cfg.retry_join_wan.clone(),
                default_port: cfg.serf_wan_port.unwrap_or(crate::config::DEFAULT_SERF_WAN_PORT),
            };
            tasks.spawn(wan_join.run(shutdown.clone()).map_name("wan-join"));
        }
        if let Some(router) = &federation {
            tasks.spawn(router.clone().run_probes(shutdown.clone()).map_name("wan-probes"));
        }
        let lan_coord = coordinates::LanCoordinate::default();
        let coordinate_worker = coordinates::CoordinateWorker {
            coord: lan_coord.clone(),
            rpc: client.clone(),
            gossip: gossip.clone(),
            upstream: upstream.clone(),
            datacenter: cfg.datacenter.clone(),
            node_name: cfg.node_name.clone(),
            own_rpc: server.as_ref().map(|_| rpc_addr),
        };
        tasks.spawn(coordinate_worker.run(shutdown.clone()).map_name("coordinates"));
        let lan_join = join::GossipJoinWorker { gossip: gossip.clone(), retry_join: cfg.retry_join.clone(), default_port: cfg.serf_lan_port };
        tasks.spawn(lan_join.run(shutdown.clone()).map_name("lan-join"));

        let storage = match server {
            None => None,
            Some(ServerParts { node, network, storage, rpc_listener }) => {
                let snapshots = crate::consensus::drive_snapshots(node.raft.clone(), storage.clone(), cfg.raft.clone(), node.id);
                let elections = crate::consensus::election::drive(node.id, node.raft.clone(), network, cfg.raft.clone());
                let token = shutdown.clone();
                tasks.spawn(
                    async move {
                        tokio::select! {
                            _ = elections => {}
                            _ = snapshots => {}
                            _ = token.cancelled() => {}
                        }
                    }
                    .map_name("elections and snapshots"),
                );
                let material = material.as_ref().expect("servers always have a certificate (config validation)");
                let verifier = material.client_verifier(cfg.auto_encrypt_allow_tls)?;
                let identify = crate::rpc::Identify { verifier: verifier.clone(), datacenter: cfg.datacenter.clone(), domain: cfg.domain.clone() };
                let mut rpc_server = RpcServer::new(rpc_listener, material.server_config(verifier.clone())?, identify);
                rpc_server.register(
                    Service::AutoEncrypt,
                    Arc::new(auto_encrypt::SignHandler {
                        node: node.clone(),
                        gossip: gossip.clone(),
                        datacenter: cfg.datacenter.clone(),
                        domain: cfg.domain.clone(),
                        allow: cfg.auto_encrypt_allow_tls,
                    }),
                );
                tasks.spawn(auto_encrypt::trust_agent_ca(node.clone(), verifier, shutdown.clone()).map_name("agent-ca"));
                rpc_server.register(
                    Service::Raft,
                    Arc::new(RaftHandler {
                        raft: node.raft.clone(),
                        contacts: node.contacts.clone(),
                        lease: crate::consensus::election::lease(&cfg.raft),
                    }),
                );
                let dc_router = federation.clone().expect("servers have a federation router");
                if cfg.connect.mesh_gateway_wan_federation {
                    let (store, dc) = (node.store.clone(), cfg.datacenter.clone());
                    let view = Arc::new(move || {
                        let st = store.read();
                        let d = st.data();
                        let local = mesh::gateways_json(d, &dc);
                        let mut v = crate::federation::GatewayView {
                            local: crate::federation::gateway_addresses(
                                &serde_json::from_str::<Vec<serde_json::Value>>(&local).unwrap_or_default(),
                                false,
                            ),
                            ..Default::default()
                        };
                        for s in d.federation_states.values().filter(|s| !s.datacenter.eq_ignore_ascii_case(&dc)) {
                            v.remote.insert(s.datacenter.clone(), crate::federation::gateway_addresses(&s.gateways(), true));
                        }
                        v
                    });
                    dc_router.set_gateways(crate::federation::Gateways::new(
                        cfg.primary_datacenter.clone(),
                        view,
                        cfg.primary_gateways.clone(),
                        cfg.primary_gateways_interval,
                    ));
                    tasks.spawn(dc_router.clone().run_fallback_resolver(shutdown.clone()).map_name("primary-gateways"));
                }
                rpc_server.register(
                    Service::Cluster,
                    Arc::new(cluster::ClusterHandler {
                        node: node.clone(),
                        datacenter: cfg.datacenter.clone(),
                        federation: dc_router,
                        lan: lan_coord.clone(),
                        agent: handle.clone(),
                        signer: signer.clone().expect("servers have a signer"),
                        primary: cfg.primary_datacenter.eq_ignore_ascii_case(&cfg.datacenter),
                    }),
                );
                rpc_server.register(Service::Http, Arc::new(api::forward::HttpHandler { router: router.clone() }));
                let token = shutdown.clone();
                tasks.spawn(async move {
                    if let Err(e) = rpc_server.run(token).await {
                        error!(error = %e, "rpc server failed");
                    }
                    "rpc"
                });
                let join = join::JoinWorker {
                    node: node.clone(),
                    gossip: gossip.clone(),
                    datacenter: cfg.datacenter.clone(),
                    retry_join: cfg.retry_join.clone(),
                    default_port: cfg.server_port,
                    bootstrap_expect: cfg.bootstrap_expect,
                };
                tasks.spawn(join.run(shutdown.clone()).map_name("raft-join"));
                let leader = leader::LeaderWorker {
                    node: node.clone(),
                    gossip: gossip.clone(),
                    datacenter: cfg.datacenter.clone(),
                    sessions,
                    health,
                    autopilot: cfg.autopilot.clone(),
                    domain: cfg.domain.clone(),
                    tombstone_ttl: cfg.tombstone_ttl,
                    mesh: mesh::MeshLeader::new(
                        node.clone(),
                        cfg.datacenter.clone(),
                        cfg.primary_datacenter.clone(),
                        cfg.connect.clone(),
                        federation.clone().expect("servers have a federation router"),
                    ),
                };
                tasks.spawn(leader.run(shutdown.clone()).map_name("leader"));
                tasks.spawn(watch_fatal(node.raft.clone(), shutdown.clone()).map_name("raft-watch"));
                Some(storage)
            }
        };

        let readiness = notify::Readiness { raft: node.clone(), gossip: gossip.clone(), has_join_targets: !cfg.retry_join.is_empty() };
        tasks.spawn(readiness.run(shutdown.clone()).map_name("readiness"));
        info!(node = %cfg.node_name, dc = %cfg.datacenter, mode = if cfg.server { "server" } else { "client" }, http = %http_addr, rpc = %rpc_addr, gossip = %gossip_addr, data_dir = %dd.display(), "trellis agent running");
        Ok(Agent { node, reload, storage, gossip, wan: wan_gossip, tasks, shutdown, http_addr, router: serve_router, ctx })
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_addr
    }

    /// The HTTP API as a service, for requests made in this process.
    /// Report counters kept elsewhere in this process in `/v1/agent/metrics`.
    pub fn add_counters(&self, source: api::metrics::CounterSource) {
        self.ctx.metrics.sources.lock().push(source);
    }

    pub fn router(&self) -> axum::Router {
        self.router.clone()
    }

    /// Run until `stop` fires or a part fails, then shut down in order.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::pin!(stop);
        let failed = loop {
            tokio::select! {
                _ = &mut stop => break None,
                _ = self.shutdown.cancelled() => break Some("shutdown requested"),
                Some(done) = self.tasks.join_next() => break Some(done.unwrap_or("a task panicked")),
                Some(_) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    match (self.reload)() {
                        Ok(()) => info!("configuration reloaded (SIGHUP)"),
                        Err(e) => error!(error = %e, "reload failed; keeping the running configuration"),
                    }
                }
            }
        };
        match failed {
            Some("shutdown requested") => info!("leaving on request"),
            Some(part) => error!(part, "a part of the agent stopped unexpectedly; shutting down"),
            None => {}
        }
        self.shutdown().await;
        match failed {
            Some(part) if part != "shutdown requested" => Err(AgentError::Raft(format!("{part} stopped unexpectedly"))),
            _ => Ok(()),
        }
    }

    async fn shutdown(mut self) {
        info!("shutting down");
        notify::stopping();
        self.handover().await;
        // A graceful stop leaves the gossip pool, so the cluster marks us left, not failed.
        if let Err(e) = self.gossip.leave(LEAVE_DEADLINE).await {
            warn!(error = %e, "leaving the gossip pool failed");
        }
        if let Some(wan) = &self.wan
            && let Err(e) = wan.leave(LEAVE_DEADLINE).await
        {
            warn!(error = %e, "leaving the WAN pool failed");
        }
        self.shutdown.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
            warn!("some tasks did not stop within the drain deadline; aborting them");
            self.tasks.abort_all();
        }
        if let Some(node) = &self.node
            && let Err(e) = node.raft.shutdown().await
        {
            warn!(error = %e, "raft shutdown");
        }
        if let Some(storage) = &self.storage
            && let Err(e) = storage.flush().await
        {
            error!(error = %e, "final storage flush failed");
        }
        info!("shutdown complete");
    }

    /// A leader that leaves hands over first, so the cluster does not wait out an election.
    async fn handover(&self) {
        let Some(node) = &self.node else { return };
        if !node.is_leader() {
            return;
        }
        let Some((_, next, _)) = node.members().into_iter().find(|(id, _, voter)| *voter && *id != node.id) else { return };
        let Some(addr) = next.socket_addr() else { return };
        info!(to = %next, "handing leadership over before leaving");
        node.raft.runtime_config().heartbeat(false);
        let res = node.rpc.call_typed::<ClusterRpc, ClusterReply>(addr, Service::Cluster, &ClusterRpc::Elect, HANDOVER_DEADLINE).await;
        if let Err(e) = res {
            warn!(error = %e, "leadership handover failed; the others will elect a leader");
        }
    }
}

/// The LAN gossip address; port 0 picks a free port (for tests and several dev agents on one
/// host), found by binding a throwaway socket, since other members need the real number.
fn gossip_address(cfg: &Config) -> Result<std::net::SocketAddr, AgentError> {
    pool_address(cfg.bind_addr, cfg.serf_lan_port, "LAN gossip")
}

fn wan_address(cfg: &Config, port: u16) -> Result<std::net::SocketAddr, AgentError> {
    pool_address(cfg.bind_addr, port, "WAN gossip")
}

fn pool_address(ip: std::net::IpAddr, port: u16, what: &'static str) -> Result<std::net::SocketAddr, AgentError> {
    let addr = std::net::SocketAddr::new(ip, port);
    if port != 0 {
        return Ok(addr);
    }
    // Gossip listens on UDP and TCP at the same port: find one free for both.
    let mut last = None;
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(addr).and_then(|s| s.local_addr());
        match udp.and_then(|a| std::net::TcpListener::bind(a).map(|_| a)) {
            Ok(a) => return Ok(a),
            Err(e) => last = Some(e),
        }
    }
    Err(AgentError::Bind { what, addr, error: last.unwrap_or_else(|| std::io::Error::other("no free port")) })
}

/// DNS listens on UDP and TCP at the same port; port 0 picks one free for both.
async fn dns_sockets(addr: std::net::SocketAddr) -> Result<(tokio::net::UdpSocket, TcpListener), AgentError> {
    let mut last = None;
    for _ in 0..16 {
        let udp = match tokio::net::UdpSocket::bind(addr).await {
            Ok(u) => u,
            Err(error) => return Err(AgentError::Bind { what: "DNS (udp)", addr, error }),
        };
        let port = udp.local_addr().map(|a| a.port()).unwrap_or(addr.port());
        match TcpListener::bind(std::net::SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(error) => return Err(AgentError::Bind { what: "DNS (tcp)", addr, error }),
        }
    }
    Err(AgentError::Bind { what: "DNS", addr, error: last.unwrap_or_else(|| std::io::Error::other("no free port")) })
}

/// What SIGHUP and `/v1/agent/reload` do: re-register the services and checks of the config
/// files (definitions removed from the files are removed from the agent).
fn reloader(cfg: &Config, local: local::LocalAgent) -> Arc<dyn Fn() -> Result<(), String> + Send + Sync> {
    let (services, checks) = (cfg.services.clone(), cfg.checks.clone());
    Arc::new(move || {
        for s in &services {
            local.add_service(s.clone(), local::Origin::Config, false).map_err(|e| e.to_string())?;
        }
        for c in &checks {
            local.add_check(c.clone(), local::Origin::Config).map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// A fatal Raft error stops the whole process instead of leaving it half alive.
async fn watch_fatal(raft: Raft, shutdown: CancellationToken) {
    let mut m = raft.metrics();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = m.changed() => if r.is_err() { return },
        }
        if let Err(e) = &m.borrow().running_state {
            error!(error = %e, "raft stopped with a fatal error");
            return;
        }
    }
}

trait Named: std::future::Future<Output = ()> + Sized {
    fn map_name(self, name: &'static str) -> impl std::future::Future<Output = &'static str> {
        async move {
            self.await;
            name
        }
    }
}

impl<F: std::future::Future<Output = ()>> Named for F {}
