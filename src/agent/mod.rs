//! The composition root: builds a server agent from its `Config` (storage, Raft, RPC, HTTP API,
//! background workers), runs it, and owns the shutdown order.
//!
//! Shutdown, written out once in `Agent::shutdown`: stop accepting HTTP and drain it with a
//! deadline, hand leadership to another voter, stop the workers, stop Raft, flush storage.

pub mod cluster;
pub mod join;
pub mod leader;

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AgentInfo, ApiContext};
use crate::config::Config;
use crate::consensus::log_store::LogStore;
use crate::consensus::network::{ContactLog, Network, RaftHandler};
use crate::consensus::node::{ClusterReply, ClusterRpc, RaftNode};
use crate::consensus::state_machine::StateMachine;
use crate::consensus::storage::Storage;
use crate::consensus::{Raft, ServerNode, raft_config};
use crate::rpc::{RpcClient, RpcServer, Service};
use crate::state::Store;
use crate::tls::{self, CertKind, TlsMaterial};

/// How long in-flight HTTP requests get to finish at shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long a departing leader waits for a successor.
const HANDOVER_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data_dir {path}: {error}")]
    DataDir { path: String, error: std::io::Error },
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {what} address {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
}

/// This node's identity, created once and kept in the data dir.
fn node_identity(data_dir: &Path) -> Result<(String, u64), AgentError> {
    let path = data_dir.join("node-id");
    let err = |error| AgentError::DataDir {
        path: path.display().to_string(),
        error,
    };
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
    std::fs::create_dir_all(&dir).map_err(|error| AgentError::DataDir {
        path: dir.display().to_string(),
        error,
    })?;
    let (ca, ca_key, cert, key) = (
        dir.join(tls::CA_CERT_FILE),
        dir.join(tls::CA_KEY_FILE),
        dir.join("server.pem"),
        dir.join("server-key.pem"),
    );
    if !(ca.exists() && cert.exists() && key.exists()) {
        let (ca_pem, ca_key_pem) = tls::create_ca(&cfg.domain)?;
        let (c, k) = tls::create_cert(
            &ca_pem,
            &ca_key_pem,
            CertKind::Server,
            &cfg.datacenter,
            &cfg.domain,
            &[],
        )?;
        for (p, t) in [
            (&ca, &ca_pem),
            (&ca_key, &ca_key_pem),
            (&cert, &c),
            (&key, &k),
        ] {
            tls::write(p, t)?;
        }
    }
    Ok(TlsMaterial::load(&ca, &cert, &key)?)
}

pub struct Agent {
    node: RaftNode,
    storage: Storage,
    tasks: JoinSet<&'static str>,
    shutdown: CancellationToken,
    http_addr: std::net::SocketAddr,
    rpc_addr: std::net::SocketAddr,
}

impl Agent {
    /// Build and start every part of a server agent.
    pub async fn start(cfg: Config) -> Result<Agent, AgentError> {
        let dd = &cfg.data_dir;
        std::fs::create_dir_all(dd).map_err(|error| AgentError::DataDir {
            path: dd.display().to_string(),
            error,
        })?;
        let material = match &cfg.tls {
            Some(f) => TlsMaterial::load(&f.ca_file, &f.cert_file, &f.key_file)?,
            None => dev_tls(&cfg)?,
        };
        let (node_uuid, raft_id) = node_identity(dd)?;

        let rpc_listener =
            TcpListener::bind(cfg.rpc_addr())
                .await
                .map_err(|error| AgentError::Bind {
                    what: "server RPC",
                    addr: cfg.rpc_addr(),
                    error,
                })?;
        let rpc_addr = rpc_listener
            .local_addr()
            .map_err(|error| AgentError::Bind {
                what: "server RPC",
                addr: cfg.rpc_addr(),
                error,
            })?;
        let http_listener =
            TcpListener::bind(cfg.http_addr())
                .await
                .map_err(|error| AgentError::Bind {
                    what: "HTTP",
                    addr: cfg.http_addr(),
                    error,
                })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|error| AgentError::Bind {
                what: "HTTP",
                addr: cfg.http_addr(),
                error,
            })?;

        let storage =
            Storage::open(&dd.join("raft")).map_err(|e| AgentError::Storage(e.to_string()))?;
        let store = Arc::new(RwLock::new(Store::new()));
        let sm = StateMachine::open(storage.clone(), store.clone())
            .map_err(|e| AgentError::Storage(e.to_string()))?;
        let log = LogStore::new(storage.clone());
        let server_name = tls::server_name(&cfg.datacenter, &cfg.domain);
        let client = RpcClient::new(
            material.client_config()?,
            tls::rpc_server_name(&cfg.datacenter, &cfg.domain),
        );
        let contacts = ContactLog::default();
        let network = Network {
            client: client.clone(),
            contacts: contacts.clone(),
        };
        let rcfg = raft_config(&cfg.raft).map_err(|e| AgentError::Raft(e.to_string()))?;
        let raft = Raft::new(raft_id, Arc::new(rcfg), network, log, sm)
            .await
            .map_err(|e| AgentError::Raft(e.to_string()))?;
        let me = ServerNode {
            id: node_uuid.clone(),
            name: cfg.node_name.clone(),
            rpc_addr: rpc_addr.to_string(),
        };
        let node = RaftNode {
            id: raft_id,
            me,
            raft: raft.clone(),
            store,
            rpc: client,
            contacts: contacts.clone(),
        };

        let sessions = api::session::SessionTimers::default();
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
            },
            node: node.clone(),
            sessions: sessions.clone(),
            autopilot: health.clone(),
            metrics: api::metrics::Registry::default(),
            started: Instant::now(),
        });
        let router = api::router(ctx);

        let mut rpc_server = RpcServer::new(rpc_listener, material.server_config()?, server_name);
        rpc_server.register(
            Service::Raft,
            Arc::new(RaftHandler {
                raft: raft.clone(),
                contacts,
            }),
        );
        rpc_server.register(
            Service::Cluster,
            Arc::new(cluster::ClusterHandler {
                node: node.clone(),
                datacenter: cfg.datacenter.clone(),
            }),
        );
        rpc_server.register(
            Service::Http,
            Arc::new(api::forward::HttpHandler {
                router: router.clone(),
            }),
        );

        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let token = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = rpc_server.run(token).await {
                error!(error = %e, "rpc server failed");
            }
            "rpc"
        });
        let token = shutdown.clone();
        tasks.spawn(async move {
            let serve =
                axum::serve(http_listener, router).with_graceful_shutdown(token.cancelled_owned());
            if let Err(e) = serve.await {
                error!(error = %e, "http server failed");
            }
            "http"
        });
        let join = join::JoinWorker {
            node: node.clone(),
            datacenter: cfg.datacenter.clone(),
            retry_join: cfg.retry_join.clone(),
            default_port: cfg.server_port,
            bootstrap_expect: cfg.bootstrap_expect,
        };
        tasks.spawn(join.run(shutdown.clone()).map_name("join"));
        let leader = leader::LeaderWorker {
            node: node.clone(),
            datacenter: cfg.datacenter.clone(),
            sessions,
            health,
            autopilot: cfg.autopilot.clone(),
        };
        tasks.spawn(leader.run(shutdown.clone()).map_name("leader"));
        tasks.spawn(watch_fatal(raft, shutdown.clone()).map_name("raft-watch"));

        info!(node = %cfg.node_name, dc = %cfg.datacenter, http = %http_addr, rpc = %rpc_addr, data_dir = %dd.display(), "trellis server agent running");
        Ok(Agent {
            node,
            storage,
            tasks,
            shutdown,
            http_addr,
            rpc_addr,
        })
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http_addr
    }

    pub fn rpc_addr(&self) -> std::net::SocketAddr {
        self.rpc_addr
    }

    /// Run until `stop` fires or a part fails, then shut down in order.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let failed = tokio::select! {
            _ = stop => None,
            _ = self.shutdown.cancelled() => Some("shutdown requested"),
            Some(done) = self.tasks.join_next() => Some(done.unwrap_or("a task panicked")),
        };
        if let Some(part) = failed {
            error!(
                part,
                "a part of the agent stopped unexpectedly; shutting down"
            );
        }
        self.shutdown().await;
        match failed {
            Some(part) if part != "shutdown requested" => {
                Err(AgentError::Raft(format!("{part} stopped unexpectedly")))
            }
            _ => Ok(()),
        }
    }

    async fn shutdown(mut self) {
        info!("shutting down");
        self.handover().await;
        self.shutdown.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
            warn!("some tasks did not stop within the drain deadline; aborting them");
            self.tasks.abort_all();
        }
        if let Err(e) = self.node.raft.shutdown().await {
            warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.storage.flush().await {
            error!(error = %e, "final storage flush failed");
        }
        info!("shutdown complete");
    }

    /// A leader that leaves hands over first, so the cluster does not wait out an election.
    async fn handover(&self) {
        if !self.node.is_leader() {
            return;
        }
        let Some((_, next, _)) = self
            .node
            .members()
            .into_iter()
            .find(|(id, _, voter)| *voter && *id != self.node.id)
        else {
            return;
        };
        let Some(addr) = next.socket_addr() else {
            return;
        };
        info!(to = %next, "handing leadership over before leaving");
        self.node.raft.runtime_config().heartbeat(false);
        let res = self
            .node
            .rpc
            .call_typed::<ClusterRpc, ClusterReply>(
                addr,
                Service::Cluster,
                &ClusterRpc::Elect,
                HANDOVER_DEADLINE,
            )
            .await;
        if let Err(e) = res {
            warn!(error = %e, "leadership handover failed; the others will elect a leader");
        }
    }
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
