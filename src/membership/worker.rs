//! The tokio side of a gossip node: one task that owns the UDP socket, the
//! foca timer heap and the command channel, and drives the sans-IO engine.
//!
//! Owns: `tokio::select!` over socket receive, the earliest timer deadline,
//! handle commands and shutdown; join bookkeeping (who answered, retries,
//! deadline) and leave propagation (extra gossip rounds until flushed).
//!
//! Must not depend on: protocol details (those live in the engine), so the
//! loop stays small enough to reason about cancellation: every branch runs
//! to completion without awaiting anything but UDP sends.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use foca::Timer;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::membership::codec::NodeId;
use crate::membership::engine::{Counters, Engine};
use crate::membership::profile::MAX_DATAGRAM_BYTES;
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
    attempted: Vec<SocketAddr>,
    pending: HashSet<SocketAddr>,
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
    commands: mpsc::Receiver<Command>,
    timers: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    joins: Vec<JoinWaiter>,
    leaving: Option<LeaveWaiter>,
}

impl std::fmt::Debug for GossipWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipWorker").field("identity", self.engine.identity()).finish_non_exhaustive()
    }
}

impl GossipWorker {
    pub(crate) fn new(engine: Engine, socket: UdpSocket, commands: mpsc::Receiver<Command>) -> Self {
        Self { engine, socket, commands, timers: BinaryHeap::new(), next_seq: 0, joins: Vec::new(), leaving: None }
    }

    /// Run until `shutdown` is cancelled. Cancelling is an abrupt stop (the
    /// others will see this node fail); call [`crate::membership::Gossip::leave`]
    /// first for a graceful exit. Errors only if the socket keeps failing.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), GossipError> {
        let mut buf = vec![0u8; RECV_BUFFER_BYTES];
        let mut commands_open = true;
        let mut recv_errors = 0u32;
        loop {
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
        [timers, joins, leave].into_iter().flatten().min()
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
        for addr in &attempted {
            self.engine.announce(*addr);
        }
        let now = Instant::now();
        let profile = &self.engine.shared().profile;
        self.joins.push(JoinWaiter {
            pending: attempted.iter().copied().collect(),
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
            if join.pending.is_empty() || join.deadline <= now {
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
