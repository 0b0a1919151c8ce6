//! Test harness: real `trellis` server processes, each on its own 127.0.x.y address with the
//! default ports, its own data dir, and certificates made for the test. Everything is killed
//! and removed when the `Cluster` drops, also when a test fails.

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_trellis");
/// Generous bound for anything a healthy cluster should do "soon" on a loaded CI machine.
pub const SOON: Duration = Duration::from_secs(30);

/// Each test gets its own 127.0.N.0/24 so that tests run in parallel on default ports.
static NEXT_SUBNET: AtomicU8 = AtomicU8::new(10);

pub fn subnet() -> u8 {
    NEXT_SUBNET.fetch_add(1, Ordering::SeqCst)
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct Server {
    pub name: String,
    /// A server (Raft voter) or a client agent.
    pub is_server: bool,
    /// Extra arguments for this agent (e.g. a config file).
    pub extra: Vec<String>,
    pub ip: String,
    pub data_dir: PathBuf,
    /// `None` for a client that gets its certificate from the servers (auto-encrypt).
    cert: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
    log: PathBuf,
}

impl Server {
    pub fn http(&self) -> String {
        format!("http://{}:8500", self.ip)
    }
    pub fn rpc(&self) -> String {
        format!("{}:8300", self.ip)
    }
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    /// Kept alive for the data dirs, certificates and logs inside it.
    _dir: tempfile::TempDir,
    pub servers: Vec<Server>,
    pub http: reqwest::Client,
    ca: PathBuf,
    ca_pem: String,
    ca_key: String,
    expect: usize,
    net: u8,
    pub dc: String,
    /// WAN pool addresses every server joins (other datacenters' servers).
    pub wan_join: Vec<String>,
}

impl Cluster {
    /// Start `n` servers that bootstrap together.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, 0, &[]).await
    }

    /// Start `n` servers and `clients` client agents (127.0.N.21 onwards), all given `extra`.
    pub async fn start_with(n: usize, clients: usize, extra: &[&str]) -> Cluster {
        let mut c = Cluster::prepare(n, extra);
        for _ in 0..clients {
            c.add_client(extra);
        }
        for i in 0..c.servers.len() {
            c.spawn(i);
        }
        c.wait_for_leader().await;
        c.wait_for_catalog().await;
        c
    }

    fn prepare(n: usize, extra: &[&str]) -> Cluster {
        let ca = trellis::tls::create_ca("consul").expect("ca");
        Cluster::prepare_in("dc1", ca, n, extra)
    }

    /// Start datacenters that federate over the WAN pool: `(name, servers, clients)` each, all
    /// with certificates from one CA, every server joining the first server of each other
    /// datacenter. Returns once every datacenter has a leader and lists all the others.
    pub async fn start_federation(dcs: &[(&str, usize, usize)], extra: &[&str]) -> Vec<Cluster> {
        let ca = trellis::tls::create_ca("consul").expect("ca");
        let mut clusters: Vec<Cluster> = dcs.iter().map(|(dc, n, _)| Cluster::prepare_in(dc, ca.clone(), *n, extra)).collect();
        let firsts: Vec<String> = clusters.iter().map(|c| c.servers[0].ip.clone()).collect();
        for (i, (c, (_, _, clients))) in clusters.iter_mut().zip(dcs).enumerate() {
            c.wan_join = firsts.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, ip)| ip.clone()).collect();
            for _ in 0..*clients {
                c.add_client(extra);
            }
            for k in 0..c.servers.len() {
                c.spawn(k);
            }
        }
        for c in &clusters {
            c.wait_for_leader().await;
            c.wait_for_catalog().await;
        }
        let mut all: Vec<String> = dcs.iter().map(|(dc, _, _)| dc.to_string()).collect();
        all.sort();
        for c in &clusters {
            let url = format!("{}/v1/catalog/datacenters", c.servers[0].http());
            eventually(&format!("{} to know every datacenter", c.dc), SOON, || async {
                let mut got: Vec<String> = serde_json::from_value(c.get_json(&url).await.ok()?).ok()?;
                got.sort();
                (got == all).then_some(())
            })
            .await;
        }
        clusters
    }

    fn prepare_in(dc: &str, (ca_pem, ca_key): (String, String), n: usize, extra: &[&str]) -> Cluster {
        let net = subnet();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        let mut servers = Vec::new();
        for i in 1..=n {
            let (cert, key) = trellis::tls::create_cert(&ca_pem, &ca_key, trellis::tls::CertKind::Server, dc, "consul", &[]).expect("cert");
            let (cp, kp) = (dir.path().join(format!("s{i}.pem")), dir.path().join(format!("s{i}-key.pem")));
            std::fs::write(&cp, cert).unwrap();
            std::fs::write(&kp, key).unwrap();
            servers.push(Server {
                name: format!("s{i}"),
                is_server: true,
                extra: extra.iter().map(|s| s.to_string()).collect(),
                ip: format!("127.0.{net}.{i}"),
                data_dir: dir.path().join(format!("data-s{i}")),
                cert: Some((cp, kp)),
                child: None,
                log: dir.path().join(format!("s{i}.log")),
            });
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Cluster { _dir: dir, servers, http, ca, ca_pem, ca_key, expect: n, net, dc: dc.to_string(), wan_join: Vec::new() }
    }

    /// A certificate and key from this cluster's CA, as an agent of `dc` of `kind` would hold.
    pub fn material(&self, kind: trellis::tls::CertKind, dc: &str) -> trellis::tls::TlsMaterial {
        let (cert_pem, key_pem) = trellis::tls::create_cert(&self.ca_pem, &self.ca_key, kind, dc, "consul", &[]).expect("cert");
        trellis::tls::TlsMaterial { ca_pem: self.ca_pem.clone(), cert_pem, key_pem }
    }

    /// Add a client agent (not started); returns its index.
    pub fn add_client(&mut self, extra: &[&str]) -> usize {
        let k = self.servers.iter().filter(|s| !s.is_server).count() + 1;
        let (cert, key) =
            trellis::tls::create_cert(&self.ca_pem, &self.ca_key, trellis::tls::CertKind::Client, &self.dc, "consul", &[]).expect("cert");
        let dir = self._dir.path();
        let (cp, kp) = (dir.join(format!("c{k}.pem")), dir.join(format!("c{k}-key.pem")));
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        self.push_client(k, Some((cp, kp)), extra)
    }

    /// Add a client agent given only the CA (not started); `extra` must turn on auto-encrypt.
    pub fn add_auto_encrypt_client(&mut self, extra: &[&str]) -> usize {
        let k = self.servers.iter().filter(|s| !s.is_server).count() + 1;
        self.push_client(k, None, extra)
    }

    fn push_client(&mut self, k: usize, cert: Option<(PathBuf, PathBuf)>, extra: &[&str]) -> usize {
        let dir = self._dir.path();
        self.servers.push(Server {
            name: format!("c{k}"),
            is_server: false,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ip: format!("127.0.{}.{}", self.net, 20 + k),
            data_dir: dir.join(format!("data-c{k}")),
            cert,
            child: None,
            log: dir.join(format!("c{k}.log")),
        });
        self.servers.len() - 1
    }

    /// The leader records every server in the catalog; most scenarios start once it has.
    pub async fn wait_for_catalog(&self) {
        let url = format!("{}/v1/health/state/passing?stale", self.servers[0].http());
        let running: Vec<&str> = self.servers.iter().filter(|s| s.is_running()).map(|s| s.name.as_str()).collect();
        eventually("every running agent registered with a passing serfHealth", SOON, || async {
            let v = self.get_json(&url).await.ok()?;
            let healthy: Vec<&str> = v.as_array()?.iter().filter(|c| c["CheckID"] == "serfHealth").filter_map(|c| c["Node"].as_str()).collect();
            running.iter().all(|n| healthy.contains(n)).then_some(())
        })
        .await;
    }

    pub fn spawn(&mut self, i: usize) {
        let s = &self.servers[i];
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "--node", &s.name, "--bind", &s.ip, "--client", &s.ip, "--datacenter", &self.dc]);
        if s.is_server {
            cmd.args(["--server", "--bootstrap-expect", &self.expect.to_string()]);
            for ip in &self.wan_join {
                cmd.args(["--retry-join-wan", ip]);
            }
        }
        cmd.args(&s.extra).arg("--data-dir").arg(&s.data_dir).arg("--ca-file").arg(&self.ca);
        if let Some((cert, key)) = &s.cert {
            cmd.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        for other in self.servers.iter().filter(|o| o.is_server) {
            cmd.args(["--retry-join", &other.ip]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&s.log).unwrap();
        cmd.stdout(Stdio::from(log.try_clone().unwrap())).stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn trellis");
        self.servers[i].child = Some(child);
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal (e.g. "STOP", "CONT") to a running agent.
    pub fn signal(&self, i: usize, sig: &str) {
        let pid = self.servers[i].child.as_ref().expect("agent is running").id();
        let ok = Command::new("kill").args([format!("-{sig}"), pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(status.success(), "{} exited with {status} on SIGTERM", self.servers[i].name);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("{} did not stop within 20s of SIGTERM", self.servers[i].name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// The address of the leader that every running server agrees on.
    pub async fn wait_for_leader(&self) -> String {
        eventually("a leader all running servers agree on", SOON, || async {
            let mut seen = None;
            for s in self.servers.iter().filter(|s| s.is_running() && s.is_server) {
                let l: String = self.get_json(&format!("{}/v1/status/leader", s.http())).await.ok()?.as_str()?.to_string();
                if l.is_empty() || seen.as_ref().is_some_and(|x| *x != l) {
                    return None;
                }
                seen = Some(l);
            }
            seen
        })
        .await
    }

    pub fn index_of_rpc(&self, rpc: &str) -> usize {
        self.servers.iter().position(|s| s.rpc() == rpc).expect("leader is one of ours")
    }

    pub async fn get_json(&self, url: &str) -> Result<Value, String> {
        let r = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("{} {}", r.status(), r.text().await.unwrap_or_default()));
        }
        r.json().await.map_err(|e| e.to_string())
    }

    pub async fn put(&self, url: &str, body: impl Into<reqwest::Body>) -> Result<(u16, String), String> {
        let r = self.http.put(url).body(body).send().await.map_err(|e| e.to_string())?;
        Ok((r.status().as_u16(), r.text().await.unwrap_or_default()))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for (i, s) in self.servers.iter().enumerate() {
                eprintln!(
                    "---- log of {} ----\n{}",
                    s.name,
                    self.log(i)
                        .lines()
                        .filter(|l| !l.contains("RPCError"))
                        .rev()
                        .take(60)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
}
