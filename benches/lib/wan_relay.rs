//! A WAN in a box for benchmarks: a relay that delivers every byte `delay` after it arrived, in
//! both directions, for TCP and UDP on the same address. With a one-way delay D the round trip
//! through it is 2D (25 ms gives a 50 ms RTT). Made for QUIC-vs-TCP between two mesh gateways:
//! gateway A dials the relay instead of gateway B, on 8443/tcp and 8443/udp alike. The kernel
//! here has no netem, so the delay is done in user space.
//!
//! Usage, standalone (`examples/wan_relay.rs` is a thin `main` over this file):
//!
//! ```text
//! cargo run --release --example wan_relay -- --listen 127.0.0.1:18443 --to 127.0.0.2:8443 --delay-ms 25
//!     [--tcp-only | --udp-only] [--no-handshake-rtt] [--udp-idle-secs 120] [--max-in-flight-mb 16]
//! cargo run --release --example wan_relay -- --self-test [--delay-ms 25]
//! ```
//!
//! It prints one `wan_relay: ...` line once listening and runs until SIGINT/SIGTERM. In a bench
//! or test, include it with `#[path = "lib/wan_relay.rs"] mod wan_relay;` and
//! `let relay = WanRelay::start(RelayConfig::new(listen, to, Duration::from_millis(25)))?;`
//! (it runs on a thread and runtime of its own, so its timing does not depend on the caller's
//! load; it stops when dropped). Port 0 in `listen` picks one free for both TCP and UDP.
//!
//! - **UDP**: a session per client address, each with its own socket to the target, so
//!   replies go back to the right client; each datagram, either way, is sent `delay` after it
//!   was received. Sessions end after `udp_idle` without traffic. Datagrams beyond a queue of
//!   `UDP_QUEUE` per direction are dropped, as a router's queue would (counted in the stats).
//! - **TCP**: each accepted connection gets its own connection to the target; each chunk read
//!   is written `delay` later on the other side, in order. A half-close (FIN) is passed on
//!   `delay` later and the other direction keeps flowing; a reset (read error) resets the
//!   other side too. A new connection's first bytes toward the target are held until its
//!   handshake would have finished on a real link (2D after the accept; `--no-handshake-rtt`
//!   turns that off), so that a request on a new TCP connection costs 4D, as on a WAN.
//!
//! Timing: tokio's timer has millisecond granularity and rounds up, so each direction takes
//! D plus up to about 1 ms (the self-test measures 51.8-52.8 ms for D = 25 ms); never less.
//!
//! What it does not model: bandwidth and loss (the link is infinitely fast and lossless). And
//! a TCP relay terminates TCP: the client's and the target's TCP see a loopback peer, so TCP's
//! own behaviour over the long path (slow start growing per RTT, throughput capped at
//! window/RTT, loss recovery) is not reproduced, only the timing of the data. At most
//! `max_in_flight` bytes per direction are held (16 MiB by default), which plays the part of a
//! window. QUIC's datagrams are only delayed, so its congestion control sees the real RTT.
//! Latency comparisons (handshakes, request/response, new streams against new connections)
//! are fair; bulk-throughput comparisons favour TCP.

// A library for benchmarks and tests: each user takes the part it needs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

/// A UDP session lives this long without a datagram either way (QUIC's default idle timeout
/// is shorter, so a live QUIC connection keeps its session).
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(120);
/// Bytes held per TCP direction: larger than the bandwidth-delay product of a 1 Gbit/s, 100 ms
/// link (12.5 MB), so it only stops a runaway sender.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16 << 20;
/// Datagrams queued per direction and session before new ones are dropped.
pub const UDP_QUEUE: usize = 16 * 1024;
/// One read: the largest chunk delivered as a unit.
const CHUNK: usize = 64 << 10;
/// UDP socket buffers, so that a burst is queued by the kernel rather than dropped.
const UDP_SOCKET_BUFFER: libc::c_int = 8 << 20;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Where clients connect (TCP) and send (UDP); port 0 picks a free one for both.
    pub listen: SocketAddr,
    /// Where the traffic goes.
    pub to: SocketAddr,
    /// One way: every byte and datagram is delivered this long after it arrived.
    pub delay: Duration,
    pub tcp: bool,
    pub udp: bool,
    /// Hold a new TCP connection's first bytes toward the target until 2 × `delay` after the
    /// accept, the handshake a real link would have cost.
    pub tcp_handshake_rtt: bool,
    pub udp_idle: Duration,
    /// Bytes held per TCP direction before the relay stops reading that side.
    pub max_in_flight: usize,
}

impl RelayConfig {
    /// TCP and UDP, the handshake charged, default limits.
    pub fn new(listen: SocketAddr, to: SocketAddr, delay: Duration) -> RelayConfig {
        RelayConfig {
            listen,
            to,
            delay,
            tcp: true,
            udp: true,
            tcp_handshake_rtt: true,
            udp_idle: DEFAULT_UDP_IDLE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// Traffic through the relay so far ("up" is client to target).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub tcp_connections: u64,
    pub tcp_bytes_up: u64,
    pub tcp_bytes_down: u64,
    pub udp_sessions: u64,
    pub udp_datagrams_up: u64,
    pub udp_datagrams_down: u64,
    /// Datagrams dropped because a queue was full.
    pub udp_dropped: u64,
}

#[derive(Default)]
struct Counters {
    tcp_connections: AtomicU64,
    tcp_bytes_up: AtomicU64,
    tcp_bytes_down: AtomicU64,
    udp_sessions: AtomicU64,
    udp_datagrams_up: AtomicU64,
    udp_datagrams_down: AtomicU64,
    udp_dropped: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RelayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            tcp_connections: get(&self.tcp_connections),
            tcp_bytes_up: get(&self.tcp_bytes_up),
            tcp_bytes_down: get(&self.tcp_bytes_down),
            udp_sessions: get(&self.udp_sessions),
            udp_datagrams_up: get(&self.udp_datagrams_up),
            udp_datagrams_down: get(&self.udp_datagrams_down),
            udp_dropped: get(&self.udp_dropped),
        }
    }
}

/// A running relay, on a thread and runtime of its own; stops when dropped.
pub struct WanRelay {
    tcp_addr: Option<SocketAddr>,
    udp_addr: Option<SocketAddr>,
    counters: Arc<Counters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WanRelay {
    /// Bind and start; listening when this returns.
    pub fn start(cfg: RelayConfig) -> io::Result<WanRelay> {
        assert!(cfg.tcp || cfg.udp, "a relay for neither TCP nor UDP");
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let c = counters.clone();
        let thread = std::thread::Builder::new().name("wan-relay".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let (tcp, udp) = match bind(&cfg).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let addrs = (tcp.as_ref().and_then(|l| l.local_addr().ok()), udp.as_ref().and_then(|s| s.local_addr().ok()));
                let _ = ready_tx.send(Ok(addrs));
                let cfg = Arc::new(cfg);
                tokio::select! {
                    _ = stopped => {}
                    _ = serve(tcp, udp, cfg, c) => {}
                }
            });
            // Dropping the runtime cancels every connection and session.
        })?;
        let (tcp_addr, udp_addr) = ready_rx.recv().map_err(|_| io::Error::other("the relay thread died"))??;
        Ok(WanRelay { tcp_addr, udp_addr, counters, stop: Some(stop), thread: Some(thread) })
    }

    /// Where TCP clients connect (`None` with `tcp: false`).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Where UDP clients send (`None` with `udp: false`).
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp_addr
    }

    /// The one address, when it serves both (the same port for TCP and UDP).
    pub fn addr(&self) -> SocketAddr {
        self.tcp_addr.or(self.udp_addr).expect("bound")
    }

    pub fn stats(&self) -> RelayStats {
        self.counters.snapshot()
    }
}

impl Drop for WanRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP and UDP on the same address; with port 0, a port free for both.
async fn bind(cfg: &RelayConfig) -> io::Result<(Option<TcpListener>, Option<UdpSocket>)> {
    let mut last = None;
    for _ in 0..20 {
        let tcp = if cfg.tcp { Some(TcpListener::bind(cfg.listen).await?) } else { None };
        let addr = tcp.as_ref().map_or(Ok(cfg.listen), |l| l.local_addr())?;
        if !cfg.udp {
            return Ok((tcp, None));
        }
        match UdpSocket::bind(addr).await {
            Ok(u) => {
                grow_buffers(&u);
                return Ok((tcp, Some(u)));
            }
            // The port TCP picked is taken for UDP: try another one.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && cfg.listen.port() == 0 && cfg.tcp => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port free for both TCP and UDP")))
}

/// Larger UDP socket buffers (forced past rmem_max when root; best effort otherwise).
fn grow_buffers(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    const SO_SNDBUFFORCE: libc::c_int = 32;
    const SO_RCVBUFFORCE: libc::c_int = 33;
    let v = UDP_SOCKET_BUFFER;
    for (forced, plain) in [(SO_RCVBUFFORCE, libc::SO_RCVBUF), (SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        let set = |opt| {
            // SAFETY: an int option on our own socket, valid for the duration of the call.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                ) == 0
            }
        };
        if !set(forced) {
            set(plain);
        }
    }
}

async fn serve(tcp: Option<TcpListener>, udp: Option<UdpSocket>, cfg: Arc<RelayConfig>, counters: Arc<Counters>) {
    let tcp_side = async {
        if let Some(l) = tcp {
            serve_tcp(l, cfg.clone(), counters.clone()).await;
        }
    };
    let udp_side = async {
        if let Some(u) = udp {
            serve_udp(u, cfg.clone(), counters.clone()).await;
        }
    };
    tokio::join!(tcp_side, udp_side);
}

// ---- TCP ----

async fn serve_tcp(l: TcpListener, cfg: Arc<RelayConfig>, counters: Arc<Counters>) {
    loop {
        match l.accept().await {
            Ok((client, _)) => {
                let accepted = Instant::now();
                Counters::add(&counters.tcp_connections, 1);
                tokio::spawn(relay_tcp(client, accepted, cfg.clone(), counters.clone()));
            }
            // Out of descriptors, most likely: give connections a moment to close.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

enum Item {
    Data(Vec<u8>, OwnedSemaphorePermit),
    Eof,
    Reset,
}

enum Ended {
    Done,
    Reset,
}

async fn relay_tcp(client: TcpStream, accepted: Instant, cfg: Arc<RelayConfig>, counters: Arc<Counters>) {
    let target = match TcpStream::connect(cfg.to).await {
        Ok(t) => t,
        Err(_) => {
            // The client hears of the refusal when a real link would have told it.
            tokio::time::sleep_until(accepted + 2 * cfg.delay).await;
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (tr, tw) = target.into_split();
    let gate = cfg.tcp_handshake_rtt.then(|| accepted + 2 * cfg.delay);
    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let mut set = tokio::task::JoinSet::new();
    set.spawn(pump(cr, up_tx, gate, cfg.clone(), counters.clone(), true));
    set.spawn(deliver(tw, up_rx));
    set.spawn(pump(tr, down_tx, None, cfg.clone(), counters, false));
    set.spawn(deliver(cw, down_rx));
    while let Some(ended) = set.join_next().await {
        if let Ok(Ended::Reset) = ended {
            // Dropping the other halves closes both sockets; the reset one was set to RST.
            set.abort_all();
        }
    }
}

/// Read `r` and queue each chunk for delivery `delay` after it was read (or after `gate`).
async fn pump(
    mut r: OwnedReadHalf,
    tx: mpsc::UnboundedSender<(Instant, Item)>,
    gate: Option<Instant>,
    cfg: Arc<RelayConfig>,
    counters: Arc<Counters>,
    up: bool,
) -> Ended {
    let window = Arc::new(Semaphore::new(cfg.max_in_flight.max(CHUNK)));
    let mut buf = vec![0u8; CHUNK];
    loop {
        let read = r.read(&mut buf).await;
        let now = Instant::now();
        let at = gate.map_or(now, |g| g.max(now)) + cfg.delay;
        let item = match read {
            Ok(0) => Item::Eof,
            Ok(n) => {
                let Ok(permit) = window.clone().acquire_many_owned(n as u32).await else { return Ended::Done };
                Counters::add(if up { &counters.tcp_bytes_up } else { &counters.tcp_bytes_down }, n as u64);
                Item::Data(buf[..n].to_vec(), permit)
            }
            Err(_) => Item::Reset,
        };
        let last = !matches!(item, Item::Data(..));
        if tx.send((at, item)).is_err() || last {
            return Ended::Done;
        }
    }
}

/// Write each queued chunk to `w` at its time, in order; pass on the end or a reset.
async fn deliver(mut w: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<(Instant, Item)>) -> Ended {
    while let Some((at, item)) = rx.recv().await {
        tokio::time::sleep_until(at).await;
        match item {
            Item::Data(bytes, _permit) => {
                if w.write_all(&bytes).await.is_err() {
                    return Ended::Done;
                }
            }
            Item::Eof => {
                let _ = w.shutdown().await;
                return Ended::Done;
            }
            Item::Reset => {
                let _ = w.as_ref().set_zero_linger();
                // No FIN first: the close sends RST once the read half goes too.
                w.forget();
                return Ended::Reset;
            }
        }
    }
    Ended::Done
}

// ---- UDP ----

async fn serve_udp(sock: UdpSocket, cfg: Arc<RelayConfig>, counters: Arc<Counters>) {
    let sock = Arc::new(sock);
    // One queue of replies for every session: they all leave through the listening socket.
    let (reply_tx, mut reply_rx) = mpsc::channel::<(Instant, SocketAddr, Vec<u8>)>(UDP_QUEUE);
    {
        let sock = sock.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            while let Some((at, client, d)) = reply_rx.recv().await {
                tokio::time::sleep_until(at).await;
                if sock.send_to(&d, client).await.is_ok() {
                    Counters::add(&counters.udp_datagrams_down, 1);
                }
            }
        });
    }
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
    let mut prune = tokio::time::interval(cfg.udp_idle);
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, client)) = r else { continue };
                let at = Instant::now() + cfg.delay;
                let tx = match sessions.get(&client) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => match open_session(client, cfg.clone(), reply_tx.clone(), counters.clone()).await {
                        Ok(tx) => {
                            sessions.insert(client, tx.clone());
                            tx
                        }
                        Err(_) => continue,
                    },
                };
                if tx.try_send((at, buf[..n].to_vec())).is_err() {
                    Counters::add(&counters.udp_dropped, 1);
                }
            }
            _ = prune.tick() => sessions.retain(|_, tx| !tx.is_closed()),
        }
    }
}

/// A socket to the target for one client: datagrams from the client go out on it `delay`
/// after they arrived; what comes back is queued for the client.
async fn open_session(
    client: SocketAddr,
    cfg: Arc<RelayConfig>,
    replies: mpsc::Sender<(Instant, SocketAddr, Vec<u8>)>,
    counters: Arc<Counters>,
) -> io::Result<mpsc::Sender<(Instant, Vec<u8>)>> {
    let any: SocketAddr = if cfg.to.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(any).await?;
    sock.connect(cfg.to).await?;
    grow_buffers(&sock);
    let sock = Arc::new(sock);
    Counters::add(&counters.udp_sessions, 1);
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(UDP_QUEUE);
    let start = Instant::now();
    // Milliseconds since `start` of the last datagram either way.
    let last = Arc::new(AtomicU64::new(0));
    let forward = {
        let (sock, last, counters) = (sock.clone(), last.clone(), counters.clone());
        tokio::spawn(async move {
            while let Some((at, d)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                if sock.send(&d).await.is_ok() {
                    Counters::add(&counters.udp_datagrams_up, 1);
                }
            }
        })
    };
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let idle_until = start + Duration::from_millis(last.load(Ordering::Relaxed)) + cfg.udp_idle;
            tokio::select! {
                r = sock.recv(&mut buf) => {
                    // An error is the ICMP of an earlier datagram (nothing listening yet): keep going.
                    let Ok(n) = r else { continue };
                    let now = Instant::now();
                    last.store((now - start).as_millis() as u64, Ordering::Relaxed);
                    if replies.try_send((now + cfg.delay, client, buf[..n].to_vec())).is_err() {
                        Counters::add(&counters.udp_dropped, 1);
                    }
                }
                _ = tokio::time::sleep_until(idle_until) => {
                    if start + Duration::from_millis(last.load(Ordering::Relaxed)) + cfg.udp_idle <= Instant::now() {
                        // Ends the forward task, which closes `tx`: the next datagram opens a new session.
                        forward.abort();
                        return;
                    }
                }
            }
        }
    });
    Ok(tx)
}

// ---- self-test ----

/// Round trips measured through a relay with the delay `self_test` was given.
#[derive(Debug)]
pub struct SelfTestReport {
    pub delay: Duration,
    /// Connect, send, first answer, on a new TCP connection (≥ 4 × delay: handshake + exchange).
    pub tcp_first_answer: Duration,
    /// One exchange on an established TCP connection (≥ 2 × delay).
    pub tcp_round_trip: Duration,
    /// Write, half-close, read the whole answer and the end (≥ 2 × delay).
    pub tcp_half_close: Duration,
    /// Bytes sent and received back in order through one connection.
    pub tcp_ordered_bytes: usize,
    /// One datagram and its answer (≥ 2 × delay).
    pub udp_round_trip: Duration,
    /// Datagrams of two clients, each answered to its own sender, in order.
    pub udp_datagrams: usize,
}

impl std::fmt::Display for SelfTestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(f, "one-way delay {:.1} ms (round trip {:.1} ms)", ms(self.delay), ms(2 * self.delay))?;
        writeln!(
            f,
            "tcp: new connection to first answer {:.1} ms, round trip {:.1} ms, half-close exchange {:.1} ms",
            ms(self.tcp_first_answer),
            ms(self.tcp_round_trip),
            ms(self.tcp_half_close)
        )?;
        writeln!(f, "tcp: {} bytes back in order", self.tcp_ordered_bytes)?;
        write!(f, "udp: round trip {:.1} ms; {} datagrams of two clients back to their senders in order", ms(self.udp_round_trip), self.udp_datagrams)
    }
}

/// Check the relay against echo servers on 127.0.0.1: every round trip takes at least what the
/// delay promises, bytes and datagrams come back in order to the right client, a half-close
/// passes through. Upper bounds are only reported (a loaded machine adds its own delay).
pub async fn self_test(delay: Duration) -> Result<SelfTestReport, String> {
    let e = |what: &'static str| move |err: io::Error| format!("{what}: {err}");
    let lo: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let echo_tcp = TcpListener::bind(lo).await.map_err(e("bind tcp echo"))?;
    let echo_udp = UdpSocket::bind(lo).await.map_err(e("bind udp echo"))?;
    grow_buffers(&echo_udp);
    let (tcp_target, udp_target) = (echo_tcp.local_addr().unwrap(), echo_udp.local_addr().unwrap());
    let echoes = tokio::spawn(async move {
        let udp = async {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = echo_udp.recv_from(&mut buf).await {
                let _ = echo_udp.send_to(&buf[..n], from).await;
            }
        };
        let tcp = async {
            while let Ok((mut s, _)) = echo_tcp.accept().await {
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let (mut r, mut w) = s.split();
                    // Echo to the end, then half-close back.
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        };
        tokio::join!(udp, tcp);
    });
    let tcp_relay = WanRelay::start(RelayConfig { udp: false, ..RelayConfig::new(lo, tcp_target, delay) }).map_err(e("tcp relay"))?;
    let udp_relay = WanRelay::start(RelayConfig { tcp: false, ..RelayConfig::new(lo, udp_target, delay) }).map_err(e("udp relay"))?;
    let result = measure(delay, tcp_relay.addr(), udp_relay.addr()).await;
    echoes.abort();
    let report = result?;
    let stats = udp_relay.stats();
    if stats.udp_sessions != 3 || stats.udp_dropped != 0 {
        return Err(format!("udp relay: expected 3 sessions and no drops: {stats:?}"));
    }
    Ok(report)
}

async fn measure(delay: Duration, tcp: SocketAddr, udp: SocketAddr) -> Result<SelfTestReport, String> {
    let rtt = 2 * delay;
    let at_least = |what: &str, took: Duration, min: Duration| {
        if took < min { Err(format!("{what} took {took:?}, less than {min:?}")) } else { Ok(took) }
    };
    let fail = |what: &'static str| move |err: io::Error| format!("{what}: {err}");

    // A new connection: handshake, then the exchange.
    let t = std::time::Instant::now();
    let mut s = TcpStream::connect(tcp).await.map_err(fail("connect"))?;
    s.set_nodelay(true).map_err(fail("nodelay"))?;
    let mut buf = [0u8; 64];
    s.write_all(b"ping").await.map_err(fail("write"))?;
    s.read_exact(&mut buf[..4]).await.map_err(fail("read"))?;
    let tcp_first_answer = at_least("tcp: new connection to the first answer", t.elapsed(), 2 * rtt)?;
    if &buf[..4] != b"ping" {
        return Err(format!("tcp: got {:?} back", &buf[..4]));
    }
    let t = std::time::Instant::now();
    s.write_all(b"pong").await.map_err(fail("write"))?;
    s.read_exact(&mut buf[..4]).await.map_err(fail("read"))?;
    let tcp_round_trip = at_least("tcp: a round trip", t.elapsed(), rtt)?;

    // Half-close: the answer and the end come back after ours went.
    let t = std::time::Instant::now();
    s.write_all(b"last words").await.map_err(fail("write"))?;
    s.shutdown().await.map_err(fail("shutdown"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.map_err(fail("read to end"))?;
    let tcp_half_close = at_least("tcp: half-close exchange", t.elapsed(), rtt)?;
    if rest != b"last words" {
        return Err(format!("tcp: after the half-close got {:?}", String::from_utf8_lossy(&rest)));
    }

    // Order: 4 MiB in uneven writes, read back while writing.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    let s = TcpStream::connect(tcp).await.map_err(fail("connect"))?;
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for (i, piece) in sent.chunks(1000 + 7).enumerate() {
            w.write_all(piece).await?;
            if i % 512 == 0 {
                tokio::task::yield_now().await;
            }
        }
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(data.len());
    r.read_to_end(&mut back).await.map_err(fail("read back"))?;
    writer.await.map_err(|err| err.to_string())?.map_err(fail("write"))?;
    if back != data {
        let at = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(back.len().min(data.len()));
        return Err(format!("tcp: {} bytes back of {}, first difference at {at}", back.len(), data.len()));
    }

    // UDP: one round trip, then two clients interleaved.
    let lo: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
    let a = UdpSocket::bind(lo).await.map_err(fail("bind"))?;
    let b = UdpSocket::bind(lo).await.map_err(fail("bind"))?;
    let mut dbuf = vec![0u8; 65536];
    let t = std::time::Instant::now();
    a.send_to(b"hello", udp).await.map_err(fail("send"))?;
    let n = tokio::time::timeout(Duration::from_secs(5) + 4 * rtt, a.recv(&mut dbuf))
        .await
        .map_err(|_| "udp: no answer".to_string())?
        .map_err(fail("recv"))?;
    let udp_round_trip = at_least("udp: a round trip", t.elapsed(), rtt)?;
    if &dbuf[..n] != b"hello" {
        return Err(format!("udp: got {:?}", String::from_utf8_lossy(&dbuf[..n])));
    }
    // In rounds, so that no socket buffer (the echo's, the clients') overflows on a burst.
    let (rounds, per_round) = (8, 25);
    let c = UdpSocket::bind(lo).await.map_err(fail("bind"))?;
    for s in [&a, &b, &c] {
        grow_buffers(s);
    }
    for round in 0..rounds {
        let ids = round * per_round..(round + 1) * per_round;
        for i in ids.clone() {
            b.send_to(format!("b{i}").as_bytes(), udp).await.map_err(fail("send"))?;
            c.send_to(format!("c{i}").as_bytes(), udp).await.map_err(fail("send"))?;
        }
        for (name, sock) in [("b", &b), ("c", &c)] {
            for i in ids.clone() {
                let n = tokio::time::timeout(Duration::from_secs(5) + 4 * rtt, sock.recv(&mut dbuf))
                    .await
                    .map_err(|_| format!("udp: client {name} got no answer to datagram {i}"))?
                    .map_err(fail("recv"))?;
                let want = format!("{name}{i}");
                if dbuf[..n] != *want.as_bytes() {
                    return Err(format!("udp: client {name} expected {want}, got {:?}", String::from_utf8_lossy(&dbuf[..n])));
                }
            }
        }
    }
    let per_client = rounds * per_round;
    Ok(SelfTestReport {
        delay,
        tcp_first_answer,
        tcp_round_trip,
        tcp_half_close,
        tcp_ordered_bytes: data.len(),
        udp_round_trip,
        udp_datagrams: 2 * per_client,
    })
}

// ---- command line ----

const USAGE: &str = "usage: wan_relay --listen ADDR:PORT --to ADDR:PORT --delay-ms D [--tcp-only | --udp-only] [--no-handshake-rtt] [--udp-idle-secs S] [--max-in-flight-mb M]
       wan_relay --self-test [--delay-ms D]";

/// The standalone relay: `args` without the program name; returns the exit code.
pub fn main_with_args(args: &[String]) -> i32 {
    match run_cli(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("wan_relay: {e}\n{USAGE}");
            2
        }
    }
}

fn run_cli(args: &[String]) -> Result<(), String> {
    let (mut listen, mut to, mut delay_ms, mut self_check) = (None, None, None, false);
    let (mut tcp, mut udp, mut handshake) = (true, true, true);
    let (mut udp_idle, mut in_flight) = (DEFAULT_UDP_IDLE, DEFAULT_MAX_IN_FLIGHT);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(value()?.parse::<SocketAddr>().map_err(|e| format!("--listen: {e}"))?),
            "--to" => to = Some(value()?.parse::<SocketAddr>().map_err(|e| format!("--to: {e}"))?),
            "--delay-ms" => delay_ms = Some(value()?.parse::<f64>().map_err(|e| format!("--delay-ms: {e}"))?),
            "--udp-idle-secs" => udp_idle = Duration::from_secs(value()?.parse().map_err(|e| format!("--udp-idle-secs: {e}"))?),
            "--max-in-flight-mb" => in_flight = value()?.parse::<usize>().map_err(|e| format!("--max-in-flight-mb: {e}"))? << 20,
            "--tcp-only" => udp = false,
            "--udp-only" => tcp = false,
            "--no-handshake-rtt" => handshake = false,
            "--self-test" => self_check = true,
            // `cargo bench` passes `--bench` to harness-less targets.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let delay = Duration::from_secs_f64(delay_ms.unwrap_or(25.0).max(0.0) / 1e3);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    if self_check {
        let report = rt.block_on(self_test(delay))?;
        println!("wan_relay self-test passed\n{report}");
        return Ok(());
    }
    let (Some(listen), Some(to), Some(_)) = (listen, to, delay_ms) else { return Err("--listen, --to and --delay-ms are required".into()) };
    if !tcp && !udp {
        return Err("--tcp-only and --udp-only together leave nothing to relay".into());
    }
    let cfg = RelayConfig { listen, to, delay, tcp, udp, tcp_handshake_rtt: handshake, udp_idle, max_in_flight: in_flight };
    let relay = WanRelay::start(cfg).map_err(|e| format!("{listen}: {e}"))?;
    let show = |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
    println!("wan_relay: tcp {} udp {} -> {to}, {:.1} ms each way", show(relay.tcp_addr()), show(relay.udp_addr()), delay.as_secs_f64() * 1e3);
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) =
            (signal(SignalKind::terminate()).map_err(|e| e.to_string())?, signal(SignalKind::interrupt()).map_err(|e| e.to_string())?);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    println!("wan_relay: stopping; {:?}", relay.stats());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)] // the bench build sees no test in this module
    use super::*;

    #[tokio::test]
    async fn wan_relay_round_trips_take_twice_the_delay() {
        let delay = Duration::from_millis(25);
        let r = self_test(delay).await.unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{r}");
        assert!(r.tcp_round_trip >= Duration::from_millis(50), "{r}");
        assert!(r.udp_round_trip >= Duration::from_millis(50), "{r}");
        assert!(r.tcp_first_answer >= Duration::from_millis(100), "{r}");
    }

    #[tokio::test]
    async fn wan_relay_without_handshake_charge_costs_one_round_trip() {
        let lo: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        let echo = TcpListener::bind(lo).await.unwrap();
        let to = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let relay =
            WanRelay::start(RelayConfig { udp: false, tcp_handshake_rtt: false, ..RelayConfig::new(lo, to, Duration::from_millis(25)) }).unwrap();
        let t = std::time::Instant::now();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(50) && took < Duration::from_millis(100) + Duration::from_secs(1), "{took:?}");
        drop(s);
        assert_eq!(relay.stats().tcp_connections, 1);
        assert_eq!((relay.stats().tcp_bytes_up, relay.stats().tcp_bytes_down), (1, 1));
    }

    #[tokio::test]
    async fn wan_relay_refused_target_closes_the_client() {
        let lo: SocketAddr = (Ipv4Addr::LOCALHOST, 0).into();
        // A port with nothing listening: bind, note, close.
        let to = TcpListener::bind(lo).await.unwrap().local_addr().unwrap();
        let relay = WanRelay::start(RelayConfig { udp: false, ..RelayConfig::new(lo, to, Duration::from_millis(5)) }).unwrap();
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.expect("closed in time");
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    }
}
