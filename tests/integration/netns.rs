//! Datacenters in network namespaces. A `Topology` makes namespaces with names unique to the test
//! (`trl-<pid>-<n>-<name>`), gives each addresses on its `lo` (every datacenter may use the same
//! private range, as overlapping pod networks do, and each agent its own 10.0.0.x with the
//! default ports) and joins them by WAN segments: a bridge in a namespace of its own with one veth
//! per member, whose end in the member is `wan<k>` and can gain and lose addresses while running
//! (a gateway moving).
//!
//! The test process reaches into a namespace through a worker thread that `setns`'d into it
//! (only that thread moves) and drives a current-thread tokio runtime: every socket that a task on
//! it opens belongs to the namespace. On it run the HTTP client (`Netns::get_json`, `put`, ...),
//! raw TCP and UDP calls, echo apps, and any future given to `Netns::run`. Processes (`trellis`)
//! run under `ip netns exec` with their output in a log that is printed when a test fails.
//! Faults: nftables rules that drop a port (or everything) on an interface, removed on demand.
//! `Netns::capture` records what crosses an interface (AF_PACKET) so a test can assert that a
//! plaintext marker never appears on the WAN.
//!
//! Everything is killed and deleted when the `Topology` drops, also when a test panics; every
//! external command runs with a timeout; waits poll a condition with a deadline. Needs root,
//! `ip` (iproute2) and `nft` (nftables); scripts/test.sh installs them.
//!
//! ```ignore
//! let mut topo = Topology::new();
//! let (dc1, dc2) = (topo.namespace("dc1"), topo.namespace("dc2"));
//! dc1.add_lo_addr("10.0.0.1/24");
//! dc2.add_lo_addr("10.0.0.1/24");
//! let wan = topo.wan(&[(&dc1, "192.168.100.1/24"), (&dc2, "192.168.100.2/24")]);
//! let _agent = dc1.trellis("s1", &["agent", "--dev", "--bind", "10.0.0.1", "--client", "10.0.0.1"]);
//! let leader = dc1.get_json("http://10.0.0.1:8500/v1/status/leader").await;
//! let rule = dc2.drop_udp(wan.iface(), 8443); // QUIC between the gateways is cut
//! rule.remove();
//! ```

// The toolkit for the gateway scenarios: not every helper has a user in every build.
#![allow(dead_code)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::BIN;

pub mod capture;
pub use capture::Capture;

/// One `ip`/`nft`/`sh` call takes milliseconds; this only catches a hung tool.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// A raw TCP call (connect, write, first answer) through sidecars and gateways.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP requests, long enough for a blocking query with a short `wait`.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// Links and bridge ports come up in milliseconds; this is for a loaded CI machine.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// A `SIGTERM`'d process gets this long to exit cleanly (as in harness.rs).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of a process log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

static NEXT_TOPOLOGY: AtomicUsize = AtomicUsize::new(1);
static NEXT_RULE: AtomicUsize = AtomicUsize::new(1);
static SWEEP_STALE: Once = Once::new();

/// Run `program args` (feeding it `stdin`) with `COMMAND_TIMEOUT`: its stdout, or why it failed.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let what = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let out = read_all(child.stdout.take());
    let err = read_all(child.stderr.take());
    if let (Some(input), Some(mut w)) = (stdin, child.stdin.take()) {
        // Dropping `w` closes the pipe: the tool sees the end of its input.
        w.write_all(input.as_bytes()).map_err(|e| format!("{what}: writing its input: {e}"))?;
    }
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what}: no exit within {COMMAND_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    if status.success() { Ok(out) } else { Err(format!("{what}: {status}: {}", err.trim())) }
}

fn read_all(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Poll `check` every few milliseconds until it holds, or panic with `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Names of the network namespaces that exist now.
pub fn list_namespaces() -> Vec<String> {
    run("ip", &["netns", "list"], None)
        .unwrap_or_else(|e| panic!("{e}"))
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Namespaces left by a test binary that was killed before its `Topology` dropped: their
/// `trl-<pid>-` names a process that no longer exists. Deleted with the processes in them.
fn sweep_stale() {
    let Ok(out) = run("ip", &["netns", "list"], None) else { return };
    for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = name.splitn(4, '-');
        let (Some("trl"), Some(pid), Some(n), Some(_)) = (parts.next(), parts.next(), parts.next(), parts.next()) else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u32>()) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_processes_in(name);
            let _ = run("ip", &["netns", "del", name], None);
        }
    }
}

/// SIGKILL every process whose network namespace is `ns` (never this test process) and wait
/// until they are gone.
fn kill_processes_in(ns: &str) {
    let me = std::process::id();
    let pids = || -> Vec<u32> {
        run("ip", &["netns", "pids", ns], None).unwrap_or_default().split_whitespace().filter_map(|p| p.parse().ok()).filter(|p| *p != me).collect()
    };
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let left = pids();
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("netns: processes {left:?} in {ns} survived SIGKILL");
            return;
        }
        for pid in left {
            // SAFETY: kill(2) with a pid and a signal number has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Move the calling thread (only it: `setns` on a network namespace is per thread) into `ns`.
fn enter(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("open /run/netns/{ns}: {e}"))?;
    // SAFETY: a valid open descriptor of a namespace file and a namespace type flag.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns into {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The namespaces, WAN segments and log directory of one test.
pub struct Topology {
    prefix: String,
    dir: Arc<tempfile::TempDir>,
    /// Members and bridge namespaces, in creation order.
    namespaces: Vec<Netns>,
    segments: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Topology {
    pub fn new() -> Topology {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "network namespace tests need root");
        SWEEP_STALE.call_once(sweep_stale);
        let n = NEXT_TOPOLOGY.fetch_add(1, Ordering::SeqCst);
        Topology {
            prefix: format!("trl-{}-{n}", std::process::id()),
            dir: Arc::new(tempfile::tempdir().expect("tempdir")),
            namespaces: Vec::new(),
            segments: 0,
        }
    }

    /// A new namespace `trl-<pid>-<n>-<name>` with `lo` up (127.0.0.1 works as usual).
    pub fn namespace(&mut self, name: &str) -> Netns {
        let full = format!("{}-{name}", self.prefix);
        assert!(!self.namespaces.iter().any(|n| n.name() == full), "namespace {name} made twice");
        run("ip", &["netns", "add", &full], None).unwrap_or_else(|e| panic!("{e}"));
        let ns = Netns(Arc::new(NsInner {
            name: full,
            short: name.to_string(),
            dir: self.dir.clone(),
            http: reqwest::Client::builder().timeout(HTTP_TIMEOUT).no_proxy().build().expect("http client"),
            worker: Mutex::new(WorkerState::Idle),
        }));
        // Recorded before anything else can fail, so that Drop deletes it.
        self.namespaces.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"]);
        // Without this, deleting an interface's first address of a subnet deletes the others of
        // that subnet too: a gateway could not move from .2 to .12 by adding one and removing the other.
        ns.sh("echo 1 > /proc/sys/net/ipv4/conf/all/promote_secondaries && echo 1 > /proc/sys/net/ipv4/conf/default/promote_secondaries")
            .unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// A WAN segment joining `members`, each given its address (`"192.168.100.1/24"`) on its
    /// end of the segment (`Wan::iface`).
    pub fn wan(&mut self, members: &[(&Netns, &str)]) -> Wan {
        let mut wan = self.segment();
        for (ns, cidr) in members {
            wan.attach(ns, cidr);
        }
        wan
    }

    /// An empty WAN segment: a bridge in a namespace of its own (`wan<k>`); `Wan::attach`
    /// connects members. Members' interfaces on it are named `wan<k>` too.
    pub fn segment(&mut self) -> Wan {
        let k = self.segments;
        self.segments += 1;
        let bridge = self.namespace(&format!("wan{k}"));
        bridge.ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0"]);
        bridge.ip(&["link", "set", "br0", "up"]);
        Wan { iface: format!("wan{k}"), bridge, ports: 0 }
    }

    /// Every namespace of this topology (members and bridges), by full name.
    pub fn names(&self) -> Vec<String> {
        self.namespaces.iter().map(|n| n.name().to_string()).collect()
    }

    /// Where process logs (and anything else a test wants to keep until the end) live.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for ns in &self.namespaces {
                let addrs = ns.try_ip(&["-br", "addr"]).unwrap_or_else(|e| e);
                eprintln!("---- addresses in {} ----\n{}", ns.name(), addrs.trim_end());
            }
        }
        for ns in &self.namespaces {
            kill_processes_in(ns.name());
        }
        for ns in &self.namespaces {
            ns.close();
        }
        // Deleting a member also deletes its veth and so the bridge's end of it.
        for ns in &self.namespaces {
            if let Err(e) = run("ip", &["netns", "del", ns.name()], None) {
                eprintln!("netns: {e}");
            }
        }
    }
}

/// A WAN segment: a bridge that members are attached to by veth pairs.
pub struct Wan {
    iface: String,
    bridge: Netns,
    ports: usize,
}

impl Wan {
    /// The name of every member's interface on this segment (`wan0` for the first segment).
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The namespace holding the bridge (its ports are `m1`, `m2`, ... in attach order).
    pub fn bridge(&self) -> &Netns {
        &self.bridge
    }

    /// Connect `ns` to the segment with address `cidr` on its interface `self.iface()`;
    /// returns once the link is up and the bridge forwards on it.
    pub fn attach(&mut self, ns: &Netns, cidr: &str) {
        self.ports += 1;
        let port = format!("m{}", self.ports);
        self.bridge.ip(&["link", "add", &port, "type", "veth", "peer", "name", &self.iface, "netns", ns.name()]);
        self.bridge.ip(&["link", "set", &port, "master", "br0", "up"]);
        ns.ip(&["addr", "add", cidr, "dev", &self.iface]);
        ns.ip(&["link", "set", &self.iface, "up"]);
        wait_until(&format!("{} up in {}", self.iface, ns.name()), LINK_UP_TIMEOUT, || {
            ns.try_ip(&["-o", "link", "show", &self.iface]).is_ok_and(|l| l.contains("LOWER_UP"))
        });
        wait_until(&format!("bridge port {port} forwarding"), LINK_UP_TIMEOUT, || {
            self.bridge.try_ip(&["-d", "-o", "link", "show", &port]).is_ok_and(|l| l.contains("state forwarding"))
        });
    }
}

/// A socket address given as a `SocketAddr` or as text (`"10.0.0.1:8500"`).
pub trait ToAddr {
    fn to_addr(&self) -> SocketAddr;
}

impl ToAddr for SocketAddr {
    fn to_addr(&self) -> SocketAddr {
        *self
    }
}

impl ToAddr for &str {
    fn to_addr(&self) -> SocketAddr {
        self.parse().unwrap_or_else(|e| panic!("{self:?} is not a socket address: {e}"))
    }
}

impl ToAddr for String {
    fn to_addr(&self) -> SocketAddr {
        self.as_str().to_addr()
    }
}

/// One namespace of a `Topology`: a cheap handle, clonable into tasks. Unusable once the
/// topology has dropped.
#[derive(Clone)]
pub struct Netns(Arc<NsInner>);

struct NsInner {
    name: String,
    short: String,
    dir: Arc<tempfile::TempDir>,
    /// Its own client: a pooled connection to 10.0.0.1:8500 in one namespace must never be
    /// reused for 10.0.0.1:8500 in another.
    http: reqwest::Client,
    worker: Mutex<WorkerState>,
}

enum WorkerState {
    /// Started on first use: a bridge namespace never needs one.
    Idle,
    Running(Worker),
    Closed,
}

struct Worker {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// What an HTTP request got back.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Netns {
    /// The full name (`trl-<pid>-<n>-dc1`), as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The name the test gave (`dc1`).
    pub fn short(&self) -> &str {
        &self.0.short
    }

    /// `ip -n <ns> args...`: its output; panics on failure.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.name()];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// Run `program args` inside the namespace to completion (with `COMMAND_TIMEOUT`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", self.name(), program];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// A shell command line inside the namespace.
    pub fn sh(&self, script: &str) -> Result<String, String> {
        self.exec("sh", &["-c", script])
    }

    /// Add `cidr` (`"10.0.0.1/24"`) to `dev`.
    pub fn add_addr(&self, dev: &str, cidr: &str) {
        self.ip(&["addr", "add", cidr, "dev", dev]);
    }

    /// Remove `cidr` from `dev`; the other addresses of its subnet stay.
    pub fn del_addr(&self, dev: &str, cidr: &str) {
        self.ip(&["addr", "del", cidr, "dev", dev]);
    }

    /// Add `cidr` to `lo`: an address only this namespace reaches, for an agent or an app.
    pub fn add_lo_addr(&self, cidr: &str) {
        self.add_addr("lo", cidr);
    }

    /// The IPv4 addresses of `dev`, as `a.b.c.d/len`.
    pub fn addrs(&self, dev: &str) -> Vec<String> {
        self.ip(&["-4", "-o", "addr", "show", "dev", dev])
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string))
            .collect()
    }

    // ---- processes ----

    /// Start `program args` inside the namespace (`ip netns exec`), its stdout and stderr going
    /// to `<topology dir>/<ns>-<name>.log`. Killed when the handle drops.
    pub fn spawn_process(&self, name: &str, program: &str, args: &[&str]) -> NsProcess {
        let mut p = NsProcess {
            name: name.to_string(),
            ns: self.name().to_string(),
            program: program.to_string(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log: self.0.dir.path().join(format!("{}-{name}.log", self.short())),
            child: None,
            _dir: self.0.dir.clone(),
        };
        p.start();
        p
    }

    /// Start the `trellis` binary under test with `args`.
    pub fn trellis(&self, name: &str, args: &[&str]) -> NsProcess {
        self.spawn_process(name, BIN, args)
    }

    // ---- running code inside ----

    fn handle(&self) -> tokio::runtime::Handle {
        let mut state = self.0.worker.lock().unwrap();
        match &*state {
            WorkerState::Running(w) => return w.handle.clone(),
            WorkerState::Closed => panic!("namespace {} is already deleted", self.name()),
            WorkerState::Idle => {}
        }
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let name = self.name().to_string();
        let thread = std::thread::Builder::new()
            .name(format!("netns-{}", self.short()))
            .spawn(move || {
                let rt = enter(&name).and_then(|()| tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string()));
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // Until stopped, or until every handle to the namespace is gone.
                rt.block_on(async move {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawn namespace worker");
        let handle = rx.recv_timeout(COMMAND_TIMEOUT).expect("namespace worker started").unwrap_or_else(|e| panic!("{e}"));
        *state = WorkerState::Running(Worker { handle: handle.clone(), stop, thread });
        handle
    }

    /// Stop the worker (its tasks are cancelled, their sockets closed); later use panics.
    fn close(&self) {
        let state = std::mem::replace(&mut *self.0.worker.lock().unwrap(), WorkerState::Closed);
        if let WorkerState::Running(w) = state {
            let _ = w.stop.send(());
            let deadline = Instant::now() + Duration::from_secs(5);
            while !w.thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if w.thread.is_finished() {
                let _ = w.thread.join();
            } else {
                eprintln!("netns: the worker of {} did not stop within 5s", self.name());
            }
        }
    }

    /// Run `fut` on the namespace's worker: every socket it opens is inside the namespace
    /// (sockets are bound to a namespace when created, so they may be moved out afterwards).
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle().spawn(fut)
    }

    /// `spawn` and wait for the result (a panic in `fut` panics here).
    pub async fn run<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.spawn(fut).await {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("a task in {} did not finish: {e}", self.name()),
        }
    }

    /// `run` for code that is not async (it blocks the calling thread, not the worker).
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        futures::executor::block_on(self.run(fut))
    }

    /// A new OS thread inside the namespace, for blocking code.
    pub fn thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let name = self.name().to_string();
        std::thread::Builder::new()
            .name(format!("netns-{}", self.short()))
            .spawn(move || {
                enter(&name).unwrap_or_else(|e| panic!("{e}"));
                f()
            })
            .expect("spawn thread")
    }

    // ---- HTTP from inside ----

    /// An HTTP/1.1 request from inside the namespace.
    pub async fn request(&self, method: reqwest::Method, url: &str, body: Option<String>) -> Result<HttpAnswer, String> {
        let (client, url) = (self.0.http.clone(), url.to_string());
        self.run(async move {
            let mut req = client.request(method, &url);
            if let Some(body) = body {
                req = req.body(body);
            }
            let r = req.send().await.map_err(|e| format!("{url}: {}", error_chain(&e)))?;
            let (status, headers) = (r.status().as_u16(), r.headers().clone());
            let body = r.text().await.map_err(|e| format!("{url}: {}", error_chain(&e)))?;
            Ok(HttpAnswer { status, headers, body })
        })
        .await
    }

    pub async fn get(&self, url: &str) -> Result<(u16, String), String> {
        self.request(reqwest::Method::GET, url, None).await.map(|a| (a.status, a.body))
    }

    /// A GET whose 2xx answer is JSON; anything else is an error.
    pub async fn get_json(&self, url: &str) -> Result<Value, String> {
        let (status, body) = self.get(url).await?;
        if !(200..300).contains(&status) {
            return Err(format!("{status} {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    pub async fn put(&self, url: &str, body: impl Into<String>) -> Result<(u16, String), String> {
        self.request(reqwest::Method::PUT, url, Some(body.into())).await.map(|a| (a.status, a.body))
    }

    pub async fn delete(&self, url: &str) -> Result<(u16, String), String> {
        self.request(reqwest::Method::DELETE, url, None).await.map(|a| (a.status, a.body))
    }

    // ---- raw traffic from inside ----

    /// A new TCP connection from inside the namespace, usable from the caller's runtime.
    pub async fn tcp_connect(&self, addr: impl ToAddr) -> Result<tokio::net::TcpStream, String> {
        let addr = addr.to_addr();
        let std = self
            .run(async move {
                let s = tokio::time::timeout(CALL_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("connect {addr}: timed out"))?;
                s.and_then(|s| s.into_std()).map_err(|e| format!("connect {addr}: {e}"))
            })
            .await?;
        tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())
    }

    /// Connect to `addr`, send `msg`, return the first answer read (an echo app answers
    /// `<name>:<msg>`), with `CALL_TIMEOUT` for the whole.
    pub async fn tcp_call(&self, addr: impl ToAddr, msg: &str) -> Result<String, String> {
        self.tcp_call_within(addr, msg.as_bytes(), CALL_TIMEOUT).await.map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    pub async fn tcp_call_within(&self, addr: impl ToAddr, msg: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
        let (addr, msg) = (addr.to_addr(), msg.to_vec());
        self.run(async move {
            let attempt = async {
                let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
                s.write_all(&msg).await.map_err(|e| format!("write to {addr}: {e}"))?;
                let mut buf = vec![0u8; 64 << 10];
                match s.read(&mut buf).await {
                    Ok(0) => Err(format!("{addr} closed without an answer")),
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) => Err(format!("read from {addr}: {e}")),
                }
            };
            tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("{addr}: no answer within {timeout:?}"))?
        })
        .await
    }

    /// Send one datagram to `addr` from a new socket and wait up to `timeout` for one back.
    pub async fn udp_call(&self, addr: impl ToAddr, msg: &str, timeout: Duration) -> Result<String, String> {
        let (addr, msg) = (addr.to_addr(), msg.as_bytes().to_vec());
        self.run(async move {
            let any: SocketAddr = if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
            let s = tokio::net::UdpSocket::bind(any).await.map_err(|e| e.to_string())?;
            s.send_to(&msg, addr).await.map_err(|e| format!("send to {addr}: {e}"))?;
            let mut buf = vec![0u8; 64 << 10];
            match tokio::time::timeout(timeout, s.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Ok(Err(e)) => Err(format!("recv from {addr}: {e}")),
                Err(_) => Err(format!("{addr}: no datagram back within {timeout:?}")),
            }
        })
        .await
    }

    /// A TCP app inside the namespace on `addr` (port 0 picks one) that answers every read
    /// with `<name>:<what it read>`, as mesh.rs's echo app does. Stops when dropped.
    pub async fn echo_app(&self, name: &str, addr: impl ToAddr) -> App {
        let (name, addr) = (name.to_string(), addr.to_addr());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = self.spawn(async move {
            let l = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
            // Connections live in the set: aborting this task closes them too.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = l.accept() => {
                        let Ok((s, _)) = r else { continue };
                        counter.fetch_add(1, Ordering::SeqCst);
                        conns.spawn(echo_connection(s, name.clone()));
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        let addr = rx.await.expect("echo app task").unwrap_or_else(|e| panic!("echo app on {addr} in {}: {e}", self.name()));
        App { addr, accepted, task: task.abort_handle() }
    }

    /// A UDP app inside the namespace on `addr` that answers each datagram with
    /// `<name>:<datagram>` to its sender. Stops when dropped.
    pub async fn udp_echo(&self, name: &str, addr: impl ToAddr) -> App {
        let (name, addr) = (name.to_string(), addr.to_addr());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = self.spawn(async move {
            let s = match tokio::net::UdpSocket::bind(addr).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = tx.send(s.local_addr().map_err(|e| e.to_string()));
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let Ok((n, from)) = s.recv_from(&mut buf).await else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut out = format!("{name}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                let _ = s.send_to(&out, from).await;
            }
        });
        let addr = rx.await.expect("udp echo task").unwrap_or_else(|e| panic!("udp echo on {addr} in {}: {e}", self.name()));
        App { addr, accepted, task: task.abort_handle() }
    }

    // ---- faults ----

    /// Load an nftables script (`nft -f -`) inside the namespace.
    pub fn nft(&self, script: &str) -> Result<(), String> {
        run("ip", &["netns", "exec", self.name(), "nft", "-f", "-"], Some(script)).map(|_| ())
    }

    /// Drop UDP to and from `port` on `iface`, in both directions (QUIC between gateways).
    pub fn drop_udp(&self, iface: &str, port: u16) -> DropRule {
        self.drop_matching(iface, &format!("udp dport {port}"), &format!("udp sport {port}"))
    }

    /// Drop TCP to and from `port` on `iface`, in both directions.
    pub fn drop_tcp(&self, iface: &str, port: u16) -> DropRule {
        self.drop_matching(iface, &format!("tcp dport {port}"), &format!("tcp sport {port}"))
    }

    /// Drop everything in and out of `iface`: the namespace is cut off that segment.
    pub fn drop_all(&self, iface: &str) -> DropRule {
        self.drop_matching(iface, "meta l4proto != 255", "meta l4proto != 255")
    }

    /// A table of its own per rule, so removing one never touches another.
    fn drop_matching(&self, iface: &str, to: &str, from: &str) -> DropRule {
        let table = format!("trl_drop_{}", NEXT_RULE.fetch_add(1, Ordering::SeqCst));
        let script = format!(
            "table inet {table} {{\n\
             \tchain input {{ type filter hook input priority filter; policy accept; iifname \"{iface}\" {to} drop; iifname \"{iface}\" {from} drop; }}\n\
             \tchain output {{ type filter hook output priority filter; policy accept; oifname \"{iface}\" {to} drop; oifname \"{iface}\" {from} drop; }}\n\
             }}\n"
        );
        self.nft(&script).unwrap_or_else(|e| panic!("{e}\n{script}"));
        DropRule { ns: self.clone(), table, removed: false }
    }

    // ---- capture ----

    /// Start recording every frame in and out of `iface`; recording has begun when this returns.
    pub fn capture(&self, iface: &str) -> Capture {
        capture::start(self, iface)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

async fn echo_connection(mut s: tokio::net::TcpStream, name: String) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut out = format!("{name}:").into_bytes();
                out.extend_from_slice(&buf[..n]);
                if s.write_all(&out).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// An app started by `Netns::echo_app` or `udp_echo`.
pub struct App {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::AbortHandle,
}

impl App {
    /// Connections accepted (TCP) or datagrams answered (UDP) so far.
    pub fn served(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An nftables drop rule; removed by `remove` or when dropped.
#[must_use = "the rule is removed when this is dropped"]
pub struct DropRule {
    ns: Netns,
    table: String,
    removed: bool,
}

impl DropRule {
    /// Remove the rule now; traffic flows again when this returns.
    pub fn remove(mut self) {
        self.removed = true;
        self.ns.nft(&format!("delete table inet {}\n", self.table)).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        if !self.removed && !matches!(*self.ns.0.worker.lock().unwrap(), WorkerState::Closed) {
            let _ = self.ns.nft(&format!("delete table inet {}\n", self.table));
        }
    }
}

/// A process inside a namespace; SIGKILL'd when dropped, its log's tail printed if the test failed.
pub struct NsProcess {
    pub name: String,
    ns: String,
    program: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The log outlives the topology if this handle does.
    _dir: Arc<tempfile::TempDir>,
}

impl NsProcess {
    /// Start it (again, with the same arguments, appending to the same log) if it is not running.
    pub fn start(&mut self) {
        if self.child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, &self.program])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} in {}: {e}", self.program, self.ns));
        self.child = Some(child);
    }

    /// `ip netns exec` execs the program, so this is the program's own pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit (panics, after a SIGKILL, if there is none in time).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pid = self.pid()?;
        // SAFETY: kill(2) on our own child, which is not reaped yet so the pid is still its.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        match self.wait(STOP_TIMEOUT) {
            Some(status) => Some(status),
            None => {
                self.kill();
                panic!("{} did not stop within {STOP_TIMEOUT:?} of SIGTERM\n{}", self.name, self.tail(LOG_TAIL_LINES));
            }
        }
    }

    /// Wait up to `timeout` for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.child.as_mut()?.try_wait().ok().flatten();
            if let Some(status) = status {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} in {} ----\n{}", self.name, self.ns, self.tail(LOG_TAIL_LINES));
        }
    }
}

#[cfg(test)]
mod tests {
    //! The harness itself: what this test does
    //! - two namespaces, each with 10.0.0.1 on lo, an echo app and a dev agent on it with the
    //!   default ports; each reaches only its own;
    //! - a WAN segment between them; an address added and the first removed on one side (a
    //!   gateway moving) keeps it reachable at the new one only;
    //! - an nftables rule drops UDP to one port (and nothing else) until it is removed;
    //! - a capture on the WAN interface sees a plaintext marker sent over it, and not one that
    //!   stayed inside;
    //! - processes run inside the namespace and are gone after drop, and so are the namespaces.

    use super::*;
    use crate::harness::{SOON, eventually};

    const SHORT: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn netns_harness_isolates_datacenters_and_injects_faults() {
        let mut topo = Topology::new();
        let (dc1, dc2) = (topo.namespace("dc1"), topo.namespace("dc2"));
        dc1.add_lo_addr("10.0.0.1/24");
        dc2.add_lo_addr("10.0.0.1/24");
        let wan = topo.wan(&[(&dc1, "192.168.100.1/24"), (&dc2, "192.168.100.2/24")]);
        let iface = wan.iface().to_string();
        let names = topo.names();
        assert_eq!(names.len(), 3, "{names:?}");
        let existing = list_namespaces();
        assert!(names.iter().all(|n| existing.contains(n)), "{names:?} in {existing:?}");

        // The same address in both datacenters, each answering for itself only.
        let app1 = dc1.echo_app("dc1", "10.0.0.1:9000").await;
        let app2 = dc2.echo_app("dc2", "10.0.0.1:9000").await;
        assert_eq!(dc1.tcp_call("10.0.0.1:9000", "ping").await.unwrap(), "dc1:ping");
        assert_eq!(dc2.tcp_call("10.0.0.1:9000", "ping").await.unwrap(), "dc2:ping");
        assert_eq!((app1.served(), app2.served()), (1, 1));

        // The WAN: one side reaches the other's WAN address.
        let wan_app = dc2.echo_app("dc2-wan", "0.0.0.0:9001").await;
        assert_eq!(dc1.tcp_call("192.168.100.2:9001", "hello").await.unwrap(), "dc2-wan:hello");

        // A gateway moving: the new address answers, the old one no longer does.
        dc2.add_addr(&iface, "192.168.100.12/24");
        assert_eq!(dc1.tcp_call("192.168.100.12:9001", "moved").await.unwrap(), "dc2-wan:moved");
        dc2.del_addr(&iface, "192.168.100.2/24");
        assert_eq!(dc2.addrs(&iface), vec!["192.168.100.12/24".to_string()]);
        assert!(dc1.tcp_call_within("192.168.100.2:9001", b"old", SHORT).await.is_err());
        assert_eq!(dc1.tcp_call("192.168.100.12:9001", "again").await.unwrap(), "dc2-wan:again");
        dc2.add_addr(&iface, "192.168.100.2/24");

        // UDP dropped on one port only, until the rule goes.
        let quic = dc2.udp_echo("quic", "192.168.100.2:8443").await;
        let other = dc2.udp_echo("other", "192.168.100.2:8444").await;
        assert_eq!(dc1.udp_call("192.168.100.2:8443", "a", SOON).await.unwrap(), "quic:a");
        let rule = dc2.drop_udp(&iface, 8443);
        assert!(dc1.udp_call("192.168.100.2:8443", "b", SHORT).await.is_err());
        assert_eq!(dc1.udp_call("192.168.100.2:8444", "c", SOON).await.unwrap(), "other:c");
        assert_eq!(dc1.tcp_call("192.168.100.2:9001", "tcp").await.unwrap(), "dc2-wan:tcp", "TCP is untouched");
        rule.remove();
        assert_eq!(dc1.udp_call("192.168.100.2:8443", "d", SOON).await.unwrap(), "quic:d");
        assert_eq!(quic.served(), 2, "the dropped datagram never arrived");
        drop(other);

        // Everything cut, then back.
        let cut = dc1.drop_all(&iface);
        assert!(dc1.tcp_call_within("192.168.100.2:9001", b"x", SHORT).await.is_err());
        drop(cut);
        assert_eq!(dc1.tcp_call("192.168.100.2:9001", "back").await.unwrap(), "dc2-wan:back");

        // Capture: a marker over the WAN is seen (TCP and UDP), one that stayed on lo is not.
        let cap = dc1.capture(&iface);
        assert_eq!(dc1.tcp_call("192.168.100.2:9001", "MARKER-over-the-wan").await.unwrap(), "dc2-wan:MARKER-over-the-wan");
        assert_eq!(dc1.udp_call("192.168.100.2:8443", "UDP-MARKER", SOON).await.unwrap(), "quic:UDP-MARKER");
        assert_eq!(dc1.tcp_call("10.0.0.1:9000", "MARKER-kept-inside").await.unwrap(), "dc1:MARKER-kept-inside");
        let seen = cap.stop();
        assert!(seen.is_complete(), "{seen:?}");
        assert!(seen.contains(b"MARKER-over-the-wan"));
        assert!(seen.contains(b"dc2-wan:MARKER-over-the-wan"), "the answer too");
        assert!(seen.contains(b"UDP-MARKER"));
        assert!(!seen.contains(b"MARKER-kept-inside"));
        assert!(seen.frames.iter().any(|f| f.outgoing) && seen.frames.iter().any(|f| !f.outgoing));
        let segs = seen.segments();
        assert!(segs.iter().any(|s| s.proto == 6 && s.dst == "192.168.100.2:9001".to_addr()));
        assert!(segs.iter().any(|s| s.proto == 17 && s.src == "192.168.100.2:8443".to_addr()));

        // A marker split over two TCP segments is still found.
        let cap = dc1.capture(&iface);
        let mut s = dc1.tcp_connect("192.168.100.2:9001").await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 64];
        for half in ["SPLIT-MAR", "KER"] {
            s.write_all(half.as_bytes()).await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], format!("dc2-wan:{half}").as_bytes());
        }
        drop(s);
        let seen = cap.stop();
        assert!(seen.frames.iter().all(|f| !f.data.windows(12).any(|w| w == b"SPLIT-MARKER")));
        assert!(seen.contains(b"SPLIT-MARKER"));

        // HTTP from inside: a dev agent in each datacenter on the same address and default ports.
        let mut agents = Vec::new();
        for ns in [&dc1, &dc2] {
            let data = topo.dir().join(format!("data-{}", ns.short()));
            let data = data.to_str().unwrap();
            let dc = ns.short();
            let args = ["agent", "--dev", "--node", dc, "--datacenter", dc, "--bind", "10.0.0.1", "--client", "10.0.0.1", "--data-dir", data];
            agents.push(ns.trellis("agent", &args));
        }
        for ns in [&dc1, &dc2] {
            let url = "http://10.0.0.1:8500/v1/agent/self";
            let dc = eventually(&format!("the agent in {}", ns.short()), SOON, || async {
                ns.get_json(url).await.ok()?["Config"]["Datacenter"].as_str().map(str::to_string)
            })
            .await;
            assert_eq!(dc, ns.short());
            eventually("a leader", SOON, || async {
                let v = ns.get_json("http://10.0.0.1:8500/v1/status/leader").await.ok()?;
                v.as_str().is_some_and(|l| !l.is_empty()).then_some(())
            })
            .await;
            let key = format!("http://10.0.0.1:8500/v1/kv/where?dc={}", ns.short());
            assert_eq!(ns.put(&key, ns.short()).await.unwrap(), (200, "true".to_string()));
            let a = ns.request(reqwest::Method::GET, &format!("{key}&raw"), None).await.unwrap();
            assert_eq!((a.status, a.body.as_str()), (200, ns.short()));
            assert!(a.header("X-Consul-Index").is_some());
            assert_eq!(ns.delete(&key).await.unwrap().0, 200);
            assert_eq!(ns.get(&key).await.unwrap().0, 404);
        }

        // Processes: one that exits, one that is stopped, one left for the topology to kill.
        let mut once = dc1.spawn_process("addrs", "ip", &["-o", "addr", "show", "dev", "lo"]);
        assert!(once.wait(SOON).is_some_and(|s| s.success()));
        assert!(once.log().contains("10.0.0.1/24"), "{}", once.log());
        let status = agents[1].stop().expect("was running");
        assert!(status.success(), "{status}\n{}", agents[1].tail(20));
        // As if a test had lost the handle: the topology still kills what runs inside.
        let mut sleeper = dc2.spawn_process("sleeper", "sleep", &["600"]);
        let mut sleeper = sleeper.child.take().unwrap();

        drop((app1, app2, wan_app, quic));
        drop(agents);
        drop(wan);
        drop(topo);
        let left = list_namespaces();
        assert!(names.iter().all(|n| !left.contains(n)), "left behind: {left:?}");
        let status = sleeper.try_wait().unwrap().expect("the sleeper was killed");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert!(dc1.try_ip(&["addr"]).is_err(), "the namespace is gone");
    }
}
