//! `trellis dev --datacenters N --servers S --clients C`: a whole federated cluster on loopback
//! in one command. Every agent is a child process of this one (`trellis agent ...`) on its own
//! loopback address with the default ports; they share one CA and one gossip key made for the
//! run. Ctrl-C (or SIGTERM) stops them all, and they also die if this process is killed.
//!
//! With `--gateways`, every datacenter also gets a mesh gateway (`trellis gateway mesh`) and
//! the datacenters federate through the gateways alone: servers keep no WAN pool, the
//! secondaries find the primary through its gateway (`primary_gateways`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::tls::{self, CertKind};

pub const MAX_DATACENTERS: usize = 9;
pub const MAX_AGENTS_PER_DC: usize = 19;
const READY_DEADLINE: Duration = Duration::from_secs(120);
const STOP_DEADLINE: Duration = Duration::from_secs(20);

pub struct Plan {
    pub datacenters: usize,
    pub servers: usize,
    pub clients: usize,
    /// The first three octets of every agent's address, e.g. `127.0.0`.
    pub prefix: String,
    /// Kept after exit when given; otherwise a temporary directory removed at exit.
    pub data_dir: Option<PathBuf>,
    /// Every agent's HTTP API and DNS ports (each agent has its own address).
    pub http_port: u16,
    pub dns_port: u16,
    /// One mesh gateway per datacenter, and federation through them only.
    pub gateways: bool,
}

struct Agent {
    name: String,
    dc: String,
    ip: IpAddr,
    /// "server", "client" or "gateway".
    role: &'static str,
    child: Child,
}

fn dc_name(d: usize) -> String {
    format!("dc{d}")
}

impl Plan {
    fn validate(&self) -> anyhow::Result<()> {
        if !(1..=MAX_DATACENTERS).contains(&self.datacenters) {
            bail!("--datacenters: {} must be between 1 and {MAX_DATACENTERS}", self.datacenters);
        }
        if self.servers == 0 {
            bail!("--servers: every datacenter needs at least one server");
        }
        if self.http_port == 0 || self.dns_port == 0 {
            bail!("--http-port and --dns-port: a multi-agent dev cluster needs fixed ports (each agent has its own address)");
        }
        if self.servers + self.clients + usize::from(self.gateways) > MAX_AGENTS_PER_DC {
            bail!("--servers plus --clients (plus a gateway): at most {MAX_AGENTS_PER_DC} agents per datacenter");
        }
        let octets: Vec<&str> = self.prefix.split('.').collect();
        if octets.len() != 3 || octets[0] != "127" || octets[1..].iter().any(|o| o.parse::<u8>().is_err()) {
            bail!("--address-prefix: {:?} must be three octets inside 127.0.0.0/8, like 127.0.0", self.prefix);
        }
        Ok(())
    }

    /// Datacenter `d` (from 1) uses addresses `.20d+1` onwards: servers first, then clients,
    /// then the gateway.
    fn ip(&self, d: usize, k: usize) -> IpAddr {
        format!("{}.{}", self.prefix, 20 * d + k).parse().expect("validated prefix")
    }

    fn gateway_ip(&self, d: usize) -> IpAddr {
        self.ip(d, self.servers + self.clients + 1)
    }
}

pub async fn run(plan: Plan) -> anyhow::Result<()> {
    plan.validate()?;
    let started = Instant::now();
    let (root, temporary) = match &plan.data_dir {
        Some(d) => (d.clone(), false),
        None => (std::env::temp_dir().join(format!("trellis-dev-cluster-{}", std::process::id())), true),
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let result = run_in(&plan, &root, started).await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn run_in(plan: &Plan, root: &Path, started: Instant) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the trellis binary")?;
    let tls_dir = root.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let (ca_pem, ca_key) = tls::create_ca(crate::config::DEFAULT_DOMAIN)?;
    let ca_file = tls_dir.join(tls::CA_CERT_FILE);
    tls::write(&ca_file, &ca_pem)?;
    let key = crate::membership::keygen();

    let shared = Shared { exe, ca_file, ca_pem, ca_key, gossip_key: key };
    let mut agents: Vec<Agent> = Vec::new();
    let spawned = spawn_all(plan, root, &shared, &mut agents).await;
    let outcome = match spawned {
        Ok(()) => serve(plan, root, &mut agents, started).await,
        Err(e) => Err(e),
    };
    stop_all(&mut agents).await;
    outcome
}

/// What every agent of the run shares: the binary, the CA and the gossip key.
struct Shared {
    exe: PathBuf,
    ca_file: PathBuf,
    ca_pem: String,
    ca_key: String,
    gossip_key: String,
}

async fn spawn_all(plan: &Plan, root: &Path, shared: &Shared, agents: &mut Vec<Agent>) -> anyhow::Result<()> {
    let Shared { exe, ca_file, ca_pem, ca_key, gossip_key } = shared;
    let domain = crate::config::DEFAULT_DOMAIN;
    for d in 1..=plan.datacenters {
        let dc = dc_name(d);
        let servers: Vec<IpAddr> = (1..=plan.servers).map(|k| plan.ip(d, k)).collect();
        let wan: Vec<IpAddr> = (1..=plan.datacenters).filter(|o| *o != d).map(|o| plan.ip(o, 1)).collect();
        let gateway_port = crate::config::DEFAULT_GATEWAY_PORT;
        for k in 1..=plan.servers + plan.clients + usize::from(plan.gateways) {
            let server = k <= plan.servers;
            let gateway = k > plan.servers + plan.clients;
            let name = if server {
                format!("{dc}-server-{k}")
            } else if gateway {
                format!("{dc}-gateway")
            } else {
                format!("{dc}-client-{}", k - plan.servers)
            };
            let ip = plan.ip(d, k);
            let dir = root.join(&name);
            std::fs::create_dir_all(&dir)?;
            let kind = if server { CertKind::Server } else { CertKind::Client };
            let (cert, key) = tls::create_cert(ca_pem, ca_key, kind, &dc, domain, &[])?;
            let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
            tls::write(&cert_file, &cert)?;
            tls::write(&key_file, &key)?;
            let log = std::fs::File::create(root.join(format!("{name}.log")))?;
            let mut cmd = Command::new(exe);
            if gateway {
                let addr = format!("{ip}:{gateway_port}");
                cmd.args(["gateway", "mesh", "--address", &addr, "--wan-address", &addr]);
            } else {
                cmd.arg("agent");
            }
            cmd.args(["--node", &name, "--datacenter", &dc, "--primary-datacenter", "dc1"])
                .args(["--bind", &ip.to_string(), "--client", &ip.to_string(), "--encrypt", gossip_key])
                .args(["--http-port", &plan.http_port.to_string(), "--dns-port", &plan.dns_port.to_string()])
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--ca-file")
                .arg(ca_file)
                .arg("--cert-file")
                .arg(&cert_file)
                .arg("--key-file")
                .arg(&key_file);
            for s in servers.iter().filter(|s| **s != ip) {
                cmd.args(["--retry-join", &s.to_string()]);
            }
            if server {
                cmd.args(["--server", "--bootstrap-expect", &plan.servers.to_string()]);
                if plan.gateways {
                    let mut hcl = String::from("connect {\n  enable_mesh_gateway_wan_federation = true\n}\n");
                    if d != 1 {
                        hcl.push_str(&format!("primary_gateways = [\"{}:{gateway_port}\"]\n", plan.gateway_ip(1)));
                    }
                    let file = dir.join("federation.hcl");
                    std::fs::write(&file, hcl)?;
                    cmd.arg("--config-file").arg(file);
                } else {
                    for w in &wan {
                        cmd.args(["--retry-join-wan", &w.to_string()]);
                    }
                }
            }
            cmd.stdin(Stdio::null()).stdout(Stdio::from(log.try_clone()?)).stderr(Stdio::from(log)).kill_on_drop(true);
            // If this process dies without stopping them, the kernel stops the agents.
            // SAFETY: prctl only changes this child's own death signal; it is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
            let role = if server {
                "server"
            } else if gateway {
                "gateway"
            } else {
                "client"
            };
            agents.push(Agent { name, dc: dc.clone(), ip, role, child });
        }
    }
    Ok(())
}

/// Wait until every datacenter has a leader, knows every other datacenter and has all its
/// agents in the catalog; print where things are; then wait for Ctrl-C.
async fn serve(plan: &Plan, root: &Path, agents: &mut [Agent], started: Instant) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let deadline = Instant::now() + READY_DEADLINE;
    for d in 1..=plan.datacenters {
        let dc = dc_name(d);
        let base = format!("http://{}:{}", plan.ip(d, 1), plan.http_port);
        let members = plan.servers + plan.clients + usize::from(plan.gateways);
        loop {
            if ready(&http, &base, plan.datacenters, members).await {
                break;
            }
            if let Some(dead) = agents.iter_mut().find_map(|a| matches!(a.child.try_wait(), Ok(Some(_))).then_some(a.name.clone())) {
                bail!("{dead} exited during start-up; see {}", root.join(format!("{dead}.log")).display());
            }
            if Instant::now() > deadline {
                bail!("{dc} was not ready after {READY_DEADLINE:?}; see the logs in {}", root.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!("==> Trellis dev cluster ready in {:.1}s: {} datacenter(s)", started.elapsed().as_secs_f64(), plan.datacenters);
    for d in 1..=plan.datacenters {
        let dc = dc_name(d);
        let first = plan.ip(d, 1);
        let (http, dns) = (plan.http_port, plan.dns_port);
        println!("    {dc}: HTTP API http://{first}:{http}  UI http://{first}:{http}/ui/  DNS {first}:{dns}");
        for a in agents.iter().filter(|a| a.dc == dc) {
            println!("      {:<18} {:<7} {}  (pid {})", a.name, a.role, a.ip, a.child.id().unwrap_or(0));
        }
        if plan.gateways {
            let g = plan.gateway_ip(d);
            println!("      mesh gateway: {g}:{} (TCP and QUIC/UDP)", crate::config::DEFAULT_GATEWAY_PORT);
        }
    }
    println!("    data and logs: {}", root.display());
    println!("==> Press Ctrl-C to stop every agent");
    super::signal().await;
    println!("==> Stopping the dev cluster");
    Ok(())
}

async fn ready(http: &reqwest::Client, base: &str, datacenters: usize, members: usize) -> bool {
    let get = |path: &str| {
        let url = format!("{base}{path}");
        async move { http.get(url).send().await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    let leader = get("/v1/status/leader").await.and_then(|v| v.as_str().map(|s| !s.is_empty())).unwrap_or(false);
    let dcs = get("/v1/catalog/datacenters").await.and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
    let nodes = get("/v1/catalog/nodes").await.and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
    leader && dcs == datacenters && nodes >= members
}

/// SIGTERM every agent, wait for them, and SIGKILL any still running after `STOP_DEADLINE`.
async fn stop_all(agents: &mut [Agent]) {
    for a in agents.iter() {
        if let Some(pid) = a.child.id() {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_DEADLINE;
    for a in agents.iter_mut() {
        match tokio::time::timeout_at(deadline, a.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("{} did not stop within {STOP_DEADLINE:?}; killing it", a.name);
                let _ = a.child.kill().await;
            }
        }
    }
}
