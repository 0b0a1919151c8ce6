//! Command-line entry: parses arguments and dispatches to the layers below; no logic of its own
//! beyond turning flags into configuration and errors into exit codes.

pub mod client;
mod dev_cluster;
pub mod mesh;
pub mod tls;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, RawConfig, RawPorts};
use client::{CatalogCommand, HttpOpts, KvCommand, OperatorCommand, SnapshotCommand};

#[derive(Parser, Debug)]
#[command(name = "trellis", version, about = "One binary that runs a whole multi-datacenter service mesh, speaking Consul's HTTP API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an agent (server with --server; --dev for a throwaway single-server cluster)
    Agent(AgentArgs),
    /// Run a local development cluster with the UI (one server on 127.0.0.1:8500)
    Dev(DevArgs),
    /// Run a gateway: `trellis gateway mesh` routes cross-datacenter traffic by SNI
    #[command(subcommand)]
    Gateway(GatewayCommand),
    /// Read and write the key-value store
    Kv {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: KvCommand,
    },
    /// List nodes and services in the catalog
    Catalog {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: CatalogCommand,
    },
    /// Cluster operations (Raft peers)
    Operator {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: OperatorCommand,
    },
    /// Save or restore a snapshot of the cluster state
    Snapshot {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: SnapshotCommand,
    },
    /// List the members of the gossip pool
    Members {
        #[command(flatten)]
        http: HttpOpts,
        /// List WAN members (servers of every datacenter)
        #[arg(long)]
        wan: bool,
        /// Only members whose status matches this regular expression
        #[arg(long)]
        status: Option<String>,
    },
    /// Ask the agent to join the gossip pool through these addresses
    Join {
        #[command(flatten)]
        http: HttpOpts,
        #[arg(long)]
        wan: bool,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Make the agent leave the cluster gracefully and shut down
    Leave {
        #[command(flatten)]
        http: HttpOpts,
    },
    /// Mark a failed member as left
    ForceLeave {
        #[command(flatten)]
        http: HttpOpts,
        node: String,
    },
    /// Print a new gossip encryption key
    Keygen,
    /// Manage the gossip encryption keys of the cluster
    Keyring {
        #[command(flatten)]
        http: HttpOpts,
        #[arg(long)]
        list: bool,
        #[arg(long)]
        install: Option<String>,
        #[arg(long = "use")]
        use_key: Option<String>,
        #[arg(long)]
        remove: Option<String>,
    },
    /// Fire a user event through gossip
    Event {
        #[command(flatten)]
        http: HttpOpts,
        #[arg(long)]
        name: String,
        /// Regular expression on node names
        #[arg(long)]
        node: Option<String>,
        /// Regular expression on service names
        #[arg(long)]
        service: Option<String>,
        /// Regular expression on service tags (needs --service)
        #[arg(long)]
        tag: Option<String>,
        payload: Option<String>,
    },
    /// Watch for changes (user events) and print them as they happen
    Watch {
        #[command(flatten)]
        http: HttpOpts,
        /// What to watch: only "event" for now
        #[arg(long = "type")]
        kind: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Register and deregister services with the local agent
    Services {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: mesh::ServicesCommand,
    },
    /// Service mesh: run a sidecar proxy, manage the mesh CA
    Connect {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: mesh::ConnectCommand,
    },
    /// Create, read, list and delete config entries
    Config {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: mesh::ConfigCommand,
    },
    /// Manage intentions (which services may connect to which)
    Intention {
        #[command(flatten)]
        http: HttpOpts,
        #[command(subcommand)]
        cmd: mesh::IntentionCommand,
    },
    /// Create the CA and certificates for agent TLS
    Tls {
        #[command(subcommand)]
        cmd: tls::TlsCommand,
    },
    /// Print the version
    Version,
}

#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// Dev mode: a single server with its own TLS, on loopback, with a temporary data dir
    #[arg(long)]
    pub dev: bool,
    /// Run as a server
    #[arg(long)]
    pub server: bool,
    /// Servers to wait for before bootstrapping
    #[arg(long = "bootstrap-expect")]
    pub bootstrap_expect: Option<usize>,
    /// Bootstrap a single-server cluster
    #[arg(long)]
    pub bootstrap: bool,
    /// Node name (default: host name)
    #[arg(long = "node")]
    pub node: Option<String>,
    /// Datacenter name
    #[arg(long)]
    pub datacenter: Option<String>,
    /// The primary datacenter
    #[arg(long = "primary-datacenter")]
    pub primary_datacenter: Option<String>,
    /// Data directory
    #[arg(long = "data-dir")]
    pub data_dir: Option<String>,
    /// Address for cluster communication (RPC)
    #[arg(long = "bind")]
    pub bind: Option<IpAddr>,
    /// Address for the HTTP API and DNS
    #[arg(long = "client")]
    pub client: Option<IpAddr>,
    /// Server to join at start (repeatable; retried until one answers)
    #[arg(long = "retry-join")]
    pub retry_join: Vec<String>,
    /// Server of another datacenter to join in the WAN pool (repeatable; servers only)
    #[arg(long = "retry-join-wan")]
    pub retry_join_wan: Vec<String>,
    /// HTTP API port
    #[arg(long = "http-port")]
    pub http_port: Option<i64>,
    /// DNS port (-1 disables)
    #[arg(long = "dns-port", allow_negative_numbers = true)]
    pub dns_port: Option<i64>,
    /// Server RPC port
    #[arg(long = "server-port")]
    pub server_port: Option<i64>,
    /// DNS domain
    #[arg(long)]
    pub domain: Option<String>,
    /// CA certificate for agent TLS
    #[arg(long = "ca-file")]
    pub ca_file: Option<String>,
    /// This agent's certificate
    #[arg(long = "cert-file")]
    pub cert_file: Option<String>,
    /// This agent's private key
    #[arg(long = "key-file")]
    pub key_file: Option<String>,
    /// Gossip encryption key (base64; `trellis keygen`)
    #[arg(long)]
    pub encrypt: Option<String>,
    /// LAN gossip port
    #[arg(long = "serf-lan-port")]
    pub serf_lan_port: Option<i64>,
    /// WAN gossip port of a server (-1 disables)
    #[arg(long = "serf-wan-port", allow_negative_numbers = true)]
    pub serf_wan_port: Option<i64>,
    /// Allow script checks from anywhere, the HTTP API of other hosts included (prefer
    /// --enable-local-script-checks)
    #[arg(long = "enable-script-checks")]
    pub enable_script_checks: bool,
    /// Allow script checks from config files and the loopback HTTP API only
    #[arg(long = "enable-local-script-checks")]
    pub enable_local_script_checks: bool,
    /// Log level: trace, debug, info, warn, error
    #[arg(long = "log-level")]
    pub log_level: Option<String>,
    /// Configuration file (HCL or JSON; repeatable)
    #[arg(long = "config-file")]
    pub config_file: Vec<PathBuf>,
    /// Directory of configuration files (repeatable)
    #[arg(long = "config-dir")]
    pub config_dir: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum GatewayCommand {
    /// A mesh gateway: joins the LAN pool like a client agent (or registers through an
    /// existing agent with --agent), registers a `mesh-gateway` service and routes by SNI
    /// over TCP and QUIC
    Mesh(GatewayArgs),
}

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Where this datacenter's services and servers reach the gateway (ip:port; port 8443 by
    /// default)
    #[arg(long)]
    pub address: Option<String>,
    /// Where other datacenters' gateways reach it (ip:port, TCP and UDP; default: --address)
    #[arg(long = "wan-address")]
    pub wan_address: Option<String>,
    /// Where to listen for other gateways when that is not --wan-address (NAT, a load
    /// balancer, a relay); default: --wan-address if it is on this host, else --address
    #[arg(long = "wan-bind")]
    pub wan_bind: Option<String>,
    /// Between gateways: "auto" (QUIC when UDP gets through, else TCP) or "tcp"
    #[arg(long = "wan-transport", default_value = "auto", value_parser = ["auto", "tcp"])]
    pub wan_transport: String,
    /// A server or agent of this datacenter to join (repeatable; retried until one answers)
    #[arg(long = "join")]
    pub join: Vec<String>,
    /// Register and learn through this existing agent's HTTP API instead of running an agent
    #[arg(long = "agent")]
    pub agent_http: Option<String>,
    /// The gateway's service name and ID
    #[arg(long = "service")]
    pub service: Option<String>,
    #[command(flatten)]
    pub agent: AgentArgs,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// HTTP API and UI port
    #[arg(long = "http-port", default_value_t = config::DEFAULT_HTTP_PORT)]
    pub http_port: u16,
    /// Address to listen on
    #[arg(long = "client", default_value = "127.0.0.1")]
    pub client: IpAddr,
    /// Keep data here instead of a temporary directory
    #[arg(long = "data-dir")]
    pub data_dir: Option<String>,
    /// Start a federated cluster of this many datacenters (dc1, dc2, ...), each agent its own
    /// process on its own loopback address with the default ports
    #[arg(long)]
    pub datacenters: Option<usize>,
    /// Servers per datacenter in a multi-agent dev cluster (default 1)
    #[arg(long)]
    pub servers: Option<usize>,
    /// Client agents per datacenter in a multi-agent dev cluster (default 0)
    #[arg(long)]
    pub clients: Option<usize>,
    /// First three octets of the multi-agent dev cluster's addresses (datacenter d uses .20d+1
    /// onwards)
    #[arg(long = "address-prefix", default_value = "127.0.0")]
    pub address_prefix: String,
    /// DNS port (of every agent, in a multi-agent dev cluster)
    #[arg(long = "dns-port", default_value_t = config::DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// Give every datacenter a mesh gateway and federate through the gateways alone
    #[arg(long)]
    pub gateways: bool,
}

impl AgentArgs {
    /// Flags as a config layer that overrides the files.
    fn as_raw(&self) -> RawConfig {
        let some_true = |b: bool| if b { Some(true) } else { None };
        RawConfig {
            datacenter: self.datacenter.clone(),
            primary_datacenter: self.primary_datacenter.clone(),
            node_name: self.node.clone(),
            data_dir: self.data_dir.clone(),
            server: some_true(self.server),
            bootstrap_expect: self.bootstrap_expect,
            bootstrap: some_true(self.bootstrap),
            retry_join: if self.retry_join.is_empty() { None } else { Some(self.retry_join.clone()) },
            retry_join_wan: if self.retry_join_wan.is_empty() { None } else { Some(self.retry_join_wan.clone()) },
            bind_addr: self.bind.map(|a| a.to_string()),
            client_addr: self.client.map(|a| a.to_string()),
            ports: Some(RawPorts {
                http: self.http_port,
                dns: self.dns_port,
                server: self.server_port,
                serf_lan: self.serf_lan_port,
                serf_wan: self.serf_wan_port,
                ..Default::default()
            }),
            encrypt: self.encrypt.clone(),
            enable_script_checks: some_true(self.enable_script_checks),
            enable_local_script_checks: some_true(self.enable_local_script_checks),
            domain: self.domain.clone(),
            log_level: self.log_level.clone(),
            // TLS flags are the most specific layer, key by key.
            tls: Some(config::RawTls {
                defaults: None,
                https: None,
                internal_rpc: Some(config::RawTlsFiles {
                    ca_file: self.ca_file.clone(),
                    cert_file: self.cert_file.clone(),
                    key_file: self.key_file.clone(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    pub fn config(&self) -> Result<config::Config, config::ConfigError> {
        let mut raw = config::load_files(&self.config_file, &self.config_dir)?;
        raw.merge(self.as_raw());
        raw.validate(self.dev)
    }
}

/// A command's answer given as its exit status (`trellis intention check`: 2 when denied);
/// already reported on stdout.
#[derive(Debug)]
struct ExitStatus(i32);

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for ExitStatus {}

/// Parse arguments, run the command, and return the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(run(cli));
    match result {
        Ok(()) => 0,
        Err(e) if e.downcast_ref::<ExitStatus>().is_some() => e.downcast_ref::<ExitStatus>().map_or(1, |s| s.0),
        Err(e) => {
            eprintln!("{e:#}");
            1
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(a) => run_agent(a).await,
        Command::Gateway(GatewayCommand::Mesh(g)) => run_gateway(g).await,
        Command::Dev(d) if d.datacenters.is_some() || d.servers.is_some() || d.clients.is_some() || d.gateways => {
            init_logging("warn");
            dev_cluster::run(dev_cluster::Plan {
                datacenters: d.datacenters.unwrap_or(1),
                servers: d.servers.unwrap_or(1),
                clients: d.clients.unwrap_or(0),
                prefix: d.address_prefix,
                data_dir: d.data_dir.map(std::path::PathBuf::from),
                http_port: d.http_port,
                dns_port: d.dns_port,
                gateways: d.gateways,
            })
            .await
        }
        Command::Dev(d) => {
            let a = AgentArgs {
                dev: true,
                node: Some("dev".into()),
                client: Some(d.client),
                http_port: Some(i64::from(d.http_port)),
                dns_port: Some(i64::from(d.dns_port)),
                data_dir: d.data_dir,
                ..Default::default()
            };
            run_agent(a).await
        }
        Command::Kv { http, cmd } => client::kv(&http, cmd).await,
        Command::Catalog { http, cmd } => client::catalog(&http, cmd).await,
        Command::Operator { http, cmd } => client::operator(&http, cmd).await,
        Command::Snapshot { http, cmd } => client::snapshot(&http, cmd).await,
        Command::Tls { cmd } => tls::run(cmd),
        Command::Connect { http, cmd } => {
            if matches!(cmd, mesh::ConnectCommand::Proxy { .. }) {
                init_logging("info");
            }
            mesh::connect(&http, cmd).await
        }
        Command::Services { http, cmd } => mesh::services(&http, cmd).await,
        Command::Config { http, cmd } => mesh::config(&http, cmd).await,
        Command::Intention { http, cmd } => match mesh::intention(&http, cmd).await? {
            None => Ok(()),
            Some(code) => Err(ExitStatus(code).into()),
        },
        Command::Members { http, wan, status } => client::members(&http, wan, status).await,
        Command::Join { http, wan, addresses } => client::join(&http, &addresses, wan).await,
        Command::Leave { http } => client::leave(&http).await,
        Command::ForceLeave { http, node } => client::force_leave(&http, &node).await,
        Command::Event { http, name, node, service, tag, payload } => client::event(&http, &name, payload, node, service, tag).await,
        Command::Watch { http, kind, name } => match kind.as_str() {
            "event" => client::watch_events(&http, name).await,
            other => anyhow::bail!("unsupported watch type {other:?}: only \"event\" is available"),
        },
        Command::Keyring { http, list, install, use_key, remove } => client::keyring(&http, list, install, use_key, remove).await,
        Command::Keygen => {
            println!("{}", crate::membership::keygen());
            Ok(())
        }
        Command::Version => {
            println!("Trellis v{}", crate::api::version());
            println!(
                "Protocol 2 spoken by default, understands 2 to 3 (agent will automatically use protocol >2 when speaking to compatible agents)"
            );
            Ok(())
        }
    }
}

async fn run_gateway(mut g: GatewayArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    g.agent.retry_join.append(&mut g.join);
    // Files and flags as for an agent; the gateway block and flags say where it listens.
    let mut raw = config::load_files(&g.agent.config_file, &g.agent.config_dir)?;
    let file_gateway = raw.gateway.clone().unwrap_or_default();
    let address = g.address.clone().or(file_gateway.address.clone()).filter(|a| !a.is_empty());
    let address = address.ok_or_else(|| anyhow::anyhow!("gateway.address: set --address (ip:port) or `gateway {{ address = ... }}`"))?;
    let lan = config::gateway_addr(&address).map_err(|e| anyhow::anyhow!("--address: {e}"))?;
    let wan = match g.wan_address.clone().or(file_gateway.wan_address.clone()).filter(|a| !a.is_empty()) {
        Some(w) => config::gateway_addr(&w).map_err(|e| anyhow::anyhow!("--wan-address: {e}"))?,
        None => lan,
    };
    let service = g.service.clone().or(file_gateway.service.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| "mesh-gateway".into());
    let quic = g.wan_transport == "auto";
    let wan_bind = match g.wan_bind.clone().or(file_gateway.wan_bind.clone()).filter(|a| !a.is_empty()) {
        Some(b) => Some(config::gateway_addr(&b).map_err(|e| anyhow::anyhow!("--wan-bind: {e}"))?),
        None => None,
    };
    if let Some(http) = &g.agent_http {
        init_logging(g.agent.log_level.as_deref().unwrap_or("info"));
        let base =
            client::base_url(http).map_err(|e| anyhow::anyhow!("--agent {http:?}: {}", e.to_string().replace("--http-addr", "the address")))?;
        let api = std::sync::Arc::new(crate::proxy::source::OverHttp { client: reqwest::Client::new(), base: base.clone() });
        let mut gateway =
            crate::gateway::Gateway::new(api, crate::gateway::GatewayConfig { lan, wan, wan_bind, quic, service, deregister_on_stop: true });
        // Ready once it listens and is registered.
        gateway.on_ready = Some(Box::new(|| crate::agent::notify::ready("mesh gateway routing")));
        let stop = tokio_util::sync::CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            signal().await;
            on_signal.cancel();
        });
        // SIGHUP (systemctl reload): nothing to reload without an agent of its own.
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: a gateway using another agent has nothing to reload");
                }
            });
        }
        eprintln!("==> Trellis mesh gateway on {lan} (WAN {wan}) through the agent at {base}");
        let r = gateway.run(stop).await;
        crate::agent::notify::stopping();
        return r.context("mesh gateway");
    }
    // Its own agent: a client of this datacenter, on the gateway's LAN address by default.
    // Unless a flag or a file says otherwise.
    if g.agent.bind.is_none() && raw.bind_addr.is_none() {
        g.agent.bind = Some(lan.ip());
    }
    if g.agent.client.is_none() && raw.client_addr.is_none() {
        g.agent.client = Some(lan.ip());
    }
    if g.agent.server {
        anyhow::bail!("a gateway is not a server: drop --server (run the gateway beside a server with --agent)");
    }
    raw.merge(g.agent.as_raw());
    let cfg = raw.validate(false)?;
    init_logging(&cfg.log_level);
    let agent = crate::agent::Agent::start(cfg).await?;
    let api = std::sync::Arc::new(crate::proxy::source::InProcess(agent.router()));
    let gateway = crate::gateway::Gateway::new(api, crate::gateway::GatewayConfig { lan, wan, wan_bind, quic, service, deregister_on_stop: false });
    let metrics = gateway.metrics.clone();
    agent.add_counters(std::sync::Arc::new(move || metrics.counters()));
    let stop = tokio_util::sync::CancellationToken::new();
    let gw_stop = stop.clone();
    let (ended_tx, ended) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        let r = gateway.run(gw_stop).await;
        let _ = ended_tx.send(());
        r
    });
    eprintln!("==> Trellis mesh gateway on {lan} (WAN {wan}), agent HTTP API at http://{}", agent.http_addr());
    // The agent stops on a signal, or when the gateway cannot run (its error is reported).
    let result = agent
        .run_until(async {
            tokio::select! {
                _ = signal() => {}
                _ = ended => {}
            }
        })
        .await;
    stop.cancel();
    let gw = running.await.unwrap_or(Ok(()));
    result?;
    gw.context("mesh gateway")
}

fn init_logging(level: &str) {
    crate::logging::init(level, crate::dns::LOG_FILTER_DIRECTIVES);
}

async fn run_agent(a: AgentArgs) -> anyhow::Result<()> {
    let cfg = a.config()?;
    init_logging(&cfg.log_level);
    let temp_data = a.dev && a.data_dir.is_none() && a.config_file.is_empty() && a.config_dir.is_empty();
    let data_dir = cfg.data_dir.clone();
    let agent = crate::agent::Agent::start(cfg.clone()).await?;
    if cfg.dev {
        println!("==> Trellis dev agent running: HTTP API and UI at http://{}/ui/ (data in {})", agent.http_addr(), data_dir.display());
    }
    let result = agent.run_until(signal()).await;
    if temp_data {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    Ok(result?)
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers we can still be stopped by Ctrl-C's default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
