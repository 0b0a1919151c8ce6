//! The tokio side of a gossip node: one task that owns the UDP socket, the
//! TCP listener, the foca timer heap and the command channel, and drives
//! the sans-IO engine.
//!
//! Owns: `tokio::select!` over socket receive, handle commands, push-pull
//! results, TCP accepts, the earliest timer deadline and shutdown; join
//! bookkeeping (who answered over UDP or TCP, retries, deadline), leave
//! propagation (extra gossip rounds until flushed), and scheduling
//! push-pulls (one task per exchange, tracked in a `JoinSet` so they die
//! with the worker; inbound ones capped at `MAX_INBOUND_PUSH_PULLS`).
//!
//! Must not depend on: protocol details (those live in the engine) or TCP
//! I/O (in `pushpull`), so the loop stays small enough to reason about
//! cancellation: every branch runs to completion without awaiting anything
//! but UDP sends.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use foca::Timer;
use rand::RngExt as _;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::membership::codec::{NodeId, PushPullState};
use crate::membership::engine::{Counters, Engine};
use crate::membership::profile::{MAX_DATAGRAM_BYTES, PUSH_PULL_TIMEOUT};
use crate::membership::pushpull::{self, Purpose, StreamEvent};
use crate::membership::{GossipError, UserEvent};

/// One byte more than the largest valid datagram, so an oversized one is
/// seen as oversized (and dropped) instead of silently truncated to a
/// valid-looking length.
const RECV_BUFFER_BYTES: usize = MAX_DATAGRAM_BYTES + 1;

/// How long the loop sleeps when nothing is scheduled: foca always has a
/// probe timer once joined, so this only matters for a lone node.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

/// Consecutive receive errors after which the socket is considered broken
/// (single errors, e.g. ICMP-induced ones on some OSes, are skipped).
const MAX_CONSECUTIVE_RECV_ERRORS: u32 = 64;

/// memberlist's maxPushPullRequests: inbound exchanges served at once;
/// more connections are closed at once, so a flood of them costs a bounded
/// number of tasks and buffers.
pub const MAX_INBOUND_PUSH_PULLS: usize = 128;

/// Results of exchange tasks queued for the worker; tasks wait (not the
/// worker) when it is full.
const STREAM_EVENTS_CAPACITY: usize = 64;

/// Pause after a failed accept: errors such as EMFILE return immediately,
/// so retrying at once would spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Requests from `Gossip` handles.
pub(crate) enum Command {
    Join { addrs: Vec<SocketAddr>, reply: oneshot::Sender<Result<usize, GossipError>> },
    Leave { timeout: Duration, reply: oneshot::Sender<Result<(), GossipError>> },
    ForceLeave { name: String },
    FireEvent { event: UserEvent },
    SetTags { tags: BTreeMap<String, String>, reply: oneshot::Sender<Result<(), GossipError>> },
}

/// A foca timer due at `at`; `seq` keeps equal deadlines in FIFO order.
struct Scheduled {
    at: Instant,
    seq: u64,
    timer: Timer<NodeId>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct JoinWaiter {
    id: u64,
    attempted: Vec<SocketAddr>,
    /// Not answered yet, over UDP or TCP.
    pending: HashSet<SocketAddr>,
    /// Push-pulls of this join still running.
    exchanging: HashSet<SocketAddr>,
    answered: usize,
    started: Instant,
    deadline: Instant,
    next_retry: Instant,
    reply: oneshot::Sender<Result<usize, GossipError>>,
}

struct LeaveWaiter {
    deadline: Instant,
    next_round: Instant,
    reply: oneshot::Sender<Result<(), GossipError>>,
}

/// The task that runs a gossip node; spawn [`GossipWorker::run`].
pub struct GossipWorker {
    engine: Engine,
    socket: UdpSocket,
    listener: TcpListener,
    /// Source IP for push-pull connections (the bind IP).
    local_ip: IpAddr,
    commands: mpsc::Receiver<Command>,
    timers: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    joins: Vec<JoinWaiter>,
    next_join_id: u64,
    leaving: Option<LeaveWaiter>,
    exchanges: JoinSet<()>,
    stream_tx: mpsc::Sender<StreamEvent>,
    stream_rx: mpsc::Receiver<StreamEvent>,
    inbound_slots: Arc<Semaphore>,
    accept_paused_until: Option<Instant>,
    next_push_pull: Option<Instant>,
    /// When the running periodic exchange started, if one is running.
    periodic_since: Option<Instant>,
}

impl std::fmt::Debug for GossipWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipWorker").field("identity", self.engine.identity()).finish_non_exhaustive()
    }
}

impl GossipWorker {
    pub(crate) fn new(engine: Engine, socket: UdpSocket, listener: TcpListener, commands: mpsc::Receiver<Command>, local_ip: IpAddr) -> Self {
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_EVENTS_CAPACITY);
        Self {
            engine,
            socket,
            listener,
            local_ip,
            commands,
            timers: BinaryHeap::new(),
            next_seq: 0,
            joins: Vec::new(),
            next_join_id: 0,
            leaving: None,
            exchanges: JoinSet::new(),
            stream_tx,
            stream_rx,
            inbound_slots: Arc::new(Semaphore::new(MAX_INBOUND_PUSH_PULLS)),
            accept_paused_until: None,
            next_push_pull: None,
            periodic_since: None,
        }
    }

    /// Run until `shutdown` is cancelled. Cancelling is an abrupt stop (the
    /// others will see this node fail); call [`crate::membership::Gossip::leave`]
    /// first for a graceful exit. Errors only if the socket keeps failing.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), GossipError> {
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut commands_open = true;
        let mut recv_errors = 0u32;
        // memberlist staggers the first push-pull randomly over one interval
        // so nodes started together do not exchange in lockstep.
        let first = self.engine.shared().profile.push_pull_interval_for(1);
        self.next_push_pull = first.map(|i| Instant::now() + i.mul_f64(rand::rng().random::<f64>()));
        loop {
            while let Some(done) = self.exchanges.try_join_next() {
                if let Err(err) = done {
                    tracing::warn!(error = %err, "push-pull task failed");
                }
            }
            self.flush().await;
            let wake = self.next_wake().unwrap_or_else(|| Instant::now() + IDLE_WAKE);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => {
                        recv_errors = 0;
                        self.on_datagram(&buf[..len], from);
                    }
                    Err(source) => {
                        recv_errors += 1;
                        tracing::debug!(error = %source, "gossip recv");
                        if recv_errors >= MAX_CONSECUTIVE_RECV_ERRORS {
                            return Err(GossipError::Io {
                                addr: self.engine.shared().addr,
                                op: "receive",
                                source,
                            });
                        }
                    }
                },
                command = self.commands.recv(), if commands_open => match command {
                    Some(command) => self.on_command(command),
                    // Every handle is gone; keep gossiping until shutdown.
                    None => commands_open = false,
                },
                // Never closed: the worker holds a sender.
                Some(event) = self.stream_rx.recv() => self.on_stream_event(event),
                accepted = self.listener.accept(), if self.accept_paused_until.is_none() => self.on_accept(accepted),
                () = sleep_until(wake) => self.on_tick(),
            }
        }
    }

    /// Send what the engine produced and schedule its timers.
    async fn flush(&mut self) {
        let outbox = self.engine.take_outbox();
        let stats = &self.engine.shared().stats;
        for (addr, datagram) in outbox {
            match self.socket.send_to(&datagram, addr).await {
                Ok(sent) => {
                    Counters::add(&stats.packets_sent, 1);
                    Counters::add(&stats.bytes_sent, sent as u64);
                }
                Err(err) => {
                    Counters::add(&stats.send_errors, 1);
                    tracing::debug!(error = %err, %addr, "gossip send");
                }
            }
        }
        let now = Instant::now();
        for (after, timer) in self.engine.take_timers() {
            self.next_seq += 1;
            self.timers.push(Reverse(Scheduled { at: now + after, seq: self.next_seq, timer }));
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let timers = self.timers.peek().map(|Reverse(s)| s.at);
        let joins = self.joins.iter().map(|j| j.deadline.min(j.next_retry)).min();
        let leave = self.leaving.as_ref().map(|l| l.deadline.min(l.next_round));
        [timers, joins, leave, self.next_push_pull, self.accept_paused_until].into_iter().flatten().min()
    }

    fn on_accept(&mut self, accepted: io::Result<(TcpStream, SocketAddr)>) {
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(error = %err, "gossip accept");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                return;
            }
        };
        if self.engine.has_left() {
            // Dropping the stream closes it: we no longer take part.
            return;
        }
        match Arc::clone(&self.inbound_slots).try_acquire_owned() {
            Ok(permit) => {
                let shared = Arc::clone(self.engine.shared());
                self.exchanges.spawn(pushpull::respond(shared, stream, peer, self.stream_tx.clone(), permit));
            }
            Err(_) => {
                Counters::add(&self.engine.shared().stats.push_pull_failures, 1);
                tracing::debug!(%peer, limit = MAX_INBOUND_PUSH_PULLS, "too many push-pulls in progress; connection closed");
            }
        }
    }

    fn spawn_exchange(&mut self, addr: SocketAddr, state: PushPullState, purpose: Purpose) {
        let shared = Arc::clone(self.engine.shared());
        self.exchanges.spawn(pushpull::initiate(shared, self.local_ip, addr, state, purpose, self.stream_tx.clone()));
    }

    fn on_stream_event(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::Inbound { peer, remote, reply } => {
                if self.engine.has_left() {
                    // Dropping `reply` makes the task close the connection.
                    return;
                }
                // Answer with our view as it was before merging theirs.
                let _ = reply.send(self.engine.push_pull_state());
                let applied = self.engine.apply_push_pull(remote, true);
                tracing::trace!(%peer, applied, "merged push-pull state");
            }
            StreamEvent::Outbound { addr, purpose, result } => {
                let ok = match result {
                    // A joiner's seed already spread what it knows; a periodic
                    // exchange repairs divergence, so what is new goes on.
                    Ok(remote) => {
                        self.engine.apply_push_pull(remote, purpose == Purpose::Periodic);
                        true
                    }
                    Err(_) => false,
                };
                match purpose {
                    Purpose::Periodic => self.periodic_since = None,
                    Purpose::Join(id) => {
                        if let Some(join) = self.joins.iter_mut().find(|j| j.id == id) {
                            join.exchanging.remove(&addr);
                            if ok && join.pending.remove(&addr) {
                                join.answered += 1;
                            }
                        }
                    }
                }
                self.finish_joins(Instant::now());
            }
        }
    }

    /// The periodic push-pull with one random alive member.
    fn push_pull_round(&mut self, now: Instant) {
        let profile = &self.engine.shared().profile;
        self.next_push_pull = profile.push_pull_interval_for(self.engine.cluster_size()).map(|i| now + i);
        // One periodic exchange at a time. Each ends within its timeout and
        // reports back; the age check only guards against a task that
        // died without reporting (a panic), which would stop the rounds.
        let running = self.periodic_since.is_some_and(|since| now.duration_since(since) < PUSH_PULL_TIMEOUT * 2);
        if self.engine.has_left() || running {
            return;
        }
        if let Some(peer) = self.engine.random_alive_peer() {
            self.periodic_since = Some(now);
            let state = self.engine.push_pull_state();
            self.spawn_exchange(peer, state, Purpose::Periodic);
        }
    }

    fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(src) = self.engine.handle_datagram(datagram) else {
            return;
        };
        for join in &mut self.joins {
            // Match the advertised address, or the socket address if the
            // peer advertises something else than what we dialled.
            if join.pending.remove(&src.addr) || join.pending.remove(&from) {
                join.answered += 1;
            }
        }
        self.finish_joins(Instant::now());
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Join { addrs, reply } => self.start_join(addrs, reply),
            Command::Leave { timeout, reply } => self.start_leave(timeout, reply),
            Command::ForceLeave { name } => {
                if let Err(err) = self.engine.force_leave(&name) {
                    tracing::warn!(error = %err, "force-leave");
                }
            }
            Command::FireEvent { event } => {
                if let Err(err) = self.engine.fire_event(event) {
                    tracing::warn!(error = %err, "fire event");
                }
            }
            Command::SetTags { tags, reply } => {
                let _ = reply.send(self.engine.set_tags(tags));
            }
        }
    }

    fn start_join(&mut self, addrs: Vec<SocketAddr>, reply: oneshot::Sender<Result<usize, GossipError>>) {
        if self.engine.has_left() {
            let _ = reply.send(Err(GossipError::Left));
            return;
        }
        let own = self.engine.shared().addr;
        let mut attempted = Vec::new();
        for addr in addrs {
            if addr != own && !attempted.contains(&addr) {
                attempted.push(addr);
            }
        }
        if attempted.is_empty() {
            let _ = reply.send(Ok(0));
            return;
        }
        let id = self.next_join_id;
        self.next_join_id += 1;
        let state = self.engine.push_pull_state();
        for addr in &attempted {
            self.engine.announce(*addr);
            self.spawn_exchange(*addr, state.clone(), Purpose::Join(id));
        }
        let now = Instant::now();
        let profile = &self.engine.shared().profile;
        self.joins.push(JoinWaiter {
            id,
            pending: attempted.iter().copied().collect(),
            exchanging: attempted.iter().copied().collect(),
            attempted,
            answered: 0,
            started: now,
            deadline: now + profile.join_timeout,
            next_retry: now + profile.join_retry,
            reply,
        });
    }

    fn start_leave(&mut self, timeout: Duration, reply: oneshot::Sender<Result<(), GossipError>>) {
        if self.leaving.is_some() || self.engine.has_left() {
            // A leave is already done or under way.
            let _ = reply.send(Ok(()));
            return;
        }
        if let Err(err) = self.engine.begin_leave() {
            let _ = reply.send(Err(err));
            return;
        }
        let now = Instant::now();
        self.leaving = Some(LeaveWaiter { deadline: now + timeout, next_round: now + self.engine.shared().profile.leave_regossip, reply });
        self.finish_leave(now);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self.next_push_pull.is_some_and(|at| at <= now) {
            self.push_pull_round(now);
        }
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.accept_paused_until = None;
        }
        while self.timers.peek().is_some_and(|Reverse(s)| s.at <= now) {
            if let Some(Reverse(due)) = self.timers.pop() {
                self.engine.handle_timer(due.timer);
            }
        }
        let retry = self.engine.shared().profile.join_retry;
        for join in &mut self.joins {
            if join.next_retry <= now && join.deadline > now {
                for addr in &join.pending {
                    self.engine.announce(*addr);
                }
                join.next_retry = now + retry;
            }
        }
        self.finish_joins(now);
        if let Some(leave) = &mut self.leaving
            && leave.next_round <= now
        {
            leave.next_round = now + self.engine.shared().profile.leave_regossip;
            self.engine.regossip();
        }
        self.finish_leave(now);
    }

    fn finish_joins(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.joins.len() {
            let join = &self.joins[i];
            // Wait for the push-pulls even once UDP answered, so the caller
            // sees the seeds' member lists as soon as join returns.
            if (join.pending.is_empty() && join.exchanging.is_empty()) || join.deadline <= now {
                let join = self.joins.swap_remove(i);
                let result = if join.answered > 0 {
                    Ok(join.answered)
                } else {
                    Err(GossipError::JoinFailed { addrs: join.attempted, waited: now - join.started })
                };
                let _ = join.reply.send(result);
            } else {
                i += 1;
            }
        }
    }

    fn finish_leave(&mut self, now: Instant) {
        let done = self.leaving.as_ref().is_some_and(|l| l.deadline <= now || self.engine.leave_flushed());
        if done && let Some(leave) = self.leaving.take() {
            if leave.deadline <= now && !self.engine.leave_flushed() {
                tracing::warn!("leave timed out before it was fully gossiped");
            }
            let _ = leave.reply.send(Ok(()));
        }
    }
}
