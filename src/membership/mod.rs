//! LAN gossip membership (Consul's Serf LAN pool) on top of `foca` (SWIM).
//!
//! Owns: the UDP gossip socket and a TCP listener on the same address and
//! port, failure detection (SWIM probes, suspicion, dissemination via
//! foca), memberlist-style push-pull (full member-list exchange over TCP),
//! the member list with tags and alive/failed/left status, graceful and
//! forced leaves, user events (`consul event`) with a Lamport clock, and
//! gossip encryption with a rotatable keyring (datagrams and TCP frames).
//!
//! Must not depend on: the rest of the crate (no `crate::` imports outside
//! this module), the catalog, Raft, or the agent's configuration types.
//! The agent maps its config into [`GossipConfig`], spawns
//! [`GossipWorker::run`] and reads [`Gossip`]; filters of user events are
//! carried, not applied (the agent applies them).
//!
//! ```no_run
//! # async fn demo() -> Result<(), trellis::membership::GossipError> {
//! use trellis::membership::{self, GossipConfig};
//! let cfg = GossipConfig::new("node-1", "127.0.0.21:8301".parse().unwrap());
//! let (gossip, worker) = membership::start(cfg).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(worker.run(shutdown.clone()));
//! gossip.join(&["127.0.0.22:8301".parse().unwrap()]).await?;
//! # Ok(()) }
//! ```
//!
//! Layout: [`keyring`] (AES-GCM keys), `codec` (identity, envelope,
//! broadcast items, push-pull frames), `profile` (timings -> `foca::Config`,
//! push-pull interval and timeouts), `engine` (sans-IO node: foca +
//! broadcasts + member view + push-pull state), `pushpull` (one tokio task
//! per TCP exchange), `worker` (tokio loop: socket, listener, timer heap,
//! commands), [`sim`] (in-memory many-node simulator for the convergence
//! benchmark; UDP gossip only, no push-pull).
//!
//! Push-pull (memberlist's TCP state sync): two members swap their whole
//! view over one short TCP connection to the other's gossip address and
//! port: every member foca knows, with tags, state (alive/suspect/down)
//! and incarnation, plus the leave notices of listed members; each side
//! feeds the other's list into foca. It runs
//! * on [`Gossip::join`], with every seed, alongside the UDP announce: a
//!   new node has the seed's whole member list when `join` returns,
//!   instead of waiting for gossip to reach it. A seed counts as answered
//!   when either the announce reply or the push-pull succeeds;
//! * every [`Profile::push_pull_interval`] (30 s on a LAN, scaled up past
//!   32 members like memberlist; 0 disables it), with one random alive
//!   member, which repairs whatever gossip missed, e.g. two halves of a
//!   healed partition that only share some members.
//!
//! The stream is a sequence of length-prefixed frames (at most 64 KiB,
//! at most 20 MiB per state), each sealed like a datagram: encrypted with
//! the primary key and opened with any installed key when a keyring is
//! set. A frame that fails authentication, is malformed or oversized ends
//! the exchange and is counted (`dropped_bad_key`, `dropped_malformed`,
//! `push_pull_failures`). Connect, each frame read and the whole exchange
//! have timeouts, at most `MAX_INBOUND_PUSH_PULLS` inbound exchanges run
//! at once, and each runs on its own task: the UDP loop never waits on a
//! TCP peer. Down members a node never knew are not taken from a peer
//! (as memberlist), so reaped members are not resurrected.
//!
//! Semantics worth knowing:
//! * Suspect members are reported as `Alive` (SWIM treats them as alive
//!   until the suspicion times out), like Consul.
//! * Identities: foca keys members by gossip address. Two identities at one
//!   address (a restart, a tag update, an auto-rejoin) resolve to the newer
//!   one (start time, then generation). Two *different addresses* claiming
//!   the same node name both stay in foca, and [`Gossip::members`] shows the
//!   newer one only: "the newer wins".
//! * Left vs failed: foca only knows "down". A graceful leave first
//!   broadcasts a leave intent; members that are down and have a leave
//!   intent are `Left`, the others `Failed`. Push-pull carries the intents
//!   too, so a member that missed the broadcast still shows `Left`.
//! * A node whose advertise address differs from its bind address (NAT)
//!   needs both UDP and TCP forwarded to it on that port.

mod codec;
mod engine;
pub mod keyring;
pub mod profile;
mod pushpull;
pub mod sim;
mod worker;

#[cfg(test)]
mod tests;

/// Feed one datagram and one push-pull stream of untrusted bytes through the decode paths a
/// member runs on what it receives (for fuzzing): an offline engine with and without a
/// keyring, the broadcast and header decoders, and push-pull decoding.
pub fn fuzz_receive(data: &[u8]) {
    use std::sync::OnceLock;
    static KEY: OnceLock<keyring::Keyring> = OnceLock::new();
    let key = KEY.get_or_init(|| keyring::Keyring::new("pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=").expect("valid key"));
    for ring in [None, Some(key.clone())] {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8301));
        let (changes, _) = tokio::sync::watch::channel(0);
        let (events, _) = tokio::sync::broadcast::channel(4);
        let shared = Arc::new(engine::Shared::new("fuzz".into(), addr, Profile::lan(), ring.clone(), changes, events));
        let id = codec::NodeId::new("fuzz".into(), addr, BTreeMap::new());
        let mut e = engine::Engine::new(id, shared, DEFAULT_REAP_FAILED_AFTER);
        e.handle_datagram(data);
        for (_, timer) in e.take_timers().into_iter().take(2) {
            e.handle_timer(timer);
        }
        let _ = e.take_outbox();
        let _ = codec::decode_push_pull(ring.as_ref(), data);
    }
    let _ = codec::BroadcastItem::decode(data);
    let _ = codec::peek_header(data);
}

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use codec::{MAX_EVENT_BYTES, MAX_IDENTITY_BYTES};

use codec::NodeId;
pub use keyring::{Keyring, KeyringError, keygen};
pub use profile::Profile;
pub use worker::GossipWorker;

use engine::Shared;
use worker::Command;

/// Consul's `reconnect_timeout` default: failed members are listed (and
/// retried) for 72 h before being reaped.
pub const DEFAULT_REAP_FAILED_AFTER: Duration = Duration::from_secs(72 * 3600);

/// Buffered user events per subscriber before slow ones start lagging;
/// events are rare (operator-driven), so this is generous.
pub const EVENTS_CHANNEL_CAPACITY: usize = 256;

/// Commands queued from handles to the worker; only join/leave/events/
/// force-leave use it, so a small queue suffices and bounds memory.
pub const COMMAND_QUEUE_CAPACITY: usize = 256;

/// Tries at finding a port free for both UDP and TCP when binding port 0
/// (the OS picks the UDP port; its TCP twin may be taken).
pub const BIND_ATTEMPTS: usize = 16;

/// Extra time a handle waits beyond the worker's own deadline, so a stalled
/// or never-spawned worker surfaces as an error instead of a hang.
pub const REPLY_GRACE: Duration = Duration::from_secs(1);

/// Everything needed to start gossiping.
#[derive(Clone, Debug)]
pub struct GossipConfig {
    /// Node name (unique in the datacenter).
    pub node_name: String,
    /// UDP and TCP listen address, e.g. 127.0.0.21:8301 (port 0 picks a
    /// port free for both).
    pub bind: SocketAddr,
    /// What others use to reach us (usually == bind; port 0 or an
    /// unspecified IP are filled from the bound socket).
    pub advertise: SocketAddr,
    /// Member metadata, e.g. role=node|consul, dc=dc1, port=8300, id, build.
    pub tags: BTreeMap<String, String>,
    /// `None` = plaintext gossip.
    pub keyring: Option<Keyring>,
    /// Protocol timings.
    pub profile: Profile,
    /// Failed and left members are removed from the list after this.
    pub reap_failed_after: Duration,
}

impl GossipConfig {
    /// Defaults: advertise = bind, no tags, plaintext, LAN timings, 72 h reap.
    pub fn new(node_name: impl Into<String>, bind: SocketAddr) -> Self {
        Self {
            node_name: node_name.into(),
            bind,
            advertise: bind,
            tags: BTreeMap::new(),
            keyring: None,
            profile: Profile::lan(),
            reap_failed_after: DEFAULT_REAP_FAILED_AFTER,
        }
    }
}

/// Member status as the HTTP API reports it. SWIM's "suspect" is `Alive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Alive or suspected.
    Alive,
    /// Stopped answering probes.
    Failed,
    /// Left gracefully, or force-left while failed.
    Left,
}

impl MemberStatus {
    /// Serf's numeric status as Consul's `/v1/agent/members` shows it.
    pub fn serf_code(self) -> u8 {
        match self {
            Self::Alive => 1,
            Self::Left => 3,
            Self::Failed => 4,
        }
    }
}

/// One member as seen by this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Last known tags (kept for failed/left members).
    pub tags: BTreeMap<String, String>,
    /// Status.
    pub status: MemberStatus,
}

/// A user event (`consul event`). Filters are carried, not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEvent {
    /// Unique id; generated when empty. Receivers dedupe on it.
    pub id: String,
    /// Event name (required).
    pub name: String,
    /// Opaque payload.
    pub payload: Vec<u8>,
    /// Regexp on node names (applied by the agent).
    pub node_filter: String,
    /// Regexp on service names (applied by the agent).
    pub service_filter: String,
    /// Regexp on service tags (applied by the agent).
    pub tag_filter: String,
    /// Lamport time, assigned by the firing node.
    pub ltime: u64,
}

/// Traffic counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GossipStats {
    /// Datagrams sent.
    pub packets_sent: u64,
    /// Bytes sent (whole datagrams).
    pub bytes_sent: u64,
    /// Datagrams received (including dropped ones).
    pub packets_received: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Dropped datagrams and push-pull streams: no installed key
    /// authenticated them, or the encryption mode did not match ours.
    pub dropped_bad_key: u64,
    /// Dropped datagrams and push-pull streams: authenticated but
    /// undecodable, oversized, or rejected by foca.
    pub dropped_malformed: u64,
    /// Datagrams the OS refused to send (or that failed to encrypt).
    pub send_errors: u64,
    /// Distinct user events delivered (including our own).
    pub events_received: u64,
    /// Push-pull exchanges completed, dialled or answered.
    pub push_pulls: u64,
    /// Push-pull exchanges that failed, dialled or answered: unreachable
    /// peer, timeout, wrong key, malformed frames, or the peer hanging up.
    pub push_pull_failures: u64,
}

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The UDP socket or the TCP listener could not be bound.
    #[error("binding gossip socket on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration cannot work.
    #[error("invalid gossip config for node {node:?}: {reason}")]
    InvalidConfig {
        /// Node name.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// Name and tags do not fit the per-identity packet budget.
    #[error("identity of node {name:?} encodes to {size} bytes (limit {limit}); shorten its tags")]
    TagsTooLarge {
        /// Node name.
        name: String,
        /// Encoded size.
        size: usize,
        /// `MAX_IDENTITY_BYTES`.
        limit: usize,
    },
    /// Keyring failure.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// Nobody answered a join (unreachable, or a different gossip key).
    #[error("join failed: none of {addrs:?} answered within {waited:?} (unreachable or different gossip key?)")]
    JoinFailed {
        /// Addresses we announced to.
        addrs: Vec<SocketAddr>,
        /// How long we waited.
        waited: Duration,
    },
    /// The worker is not running (never spawned, or shut down).
    #[error("gossip worker is not running")]
    NotRunning,
    /// The worker's command queue is full.
    #[error("gossip worker is busy: {capacity} commands already queued")]
    Busy {
        /// Queue capacity.
        capacity: usize,
    },
    /// This node already left the cluster.
    #[error("this node has left the gossip cluster")]
    Left,
    /// No member with that name.
    #[error("no member named {name:?}")]
    UnknownMember {
        /// Requested name.
        name: String,
    },
    /// Force-leave only applies to failed members (Consul semantics).
    #[error("member {name:?} is {status:?}; only failed members can be force-left")]
    MemberNotFailed {
        /// Member name.
        name: String,
        /// Its current status.
        status: MemberStatus,
    },
    /// The event does not fit in one gossip packet.
    #[error("user event {name:?} encodes to {size} bytes, limit is {limit}")]
    EventTooLarge {
        /// Event name.
        name: String,
        /// Encoded size.
        size: usize,
        /// `MAX_EVENT_BYTES`.
        limit: usize,
    },
    /// The event is not acceptable.
    #[error("invalid user event: {reason}")]
    InvalidEvent {
        /// What is wrong.
        reason: String,
    },
    /// An event with this id was already fired or received.
    #[error("user event id {id:?} was already seen")]
    DuplicateEvent {
        /// Event id.
        id: String,
    },
    /// The worker did not answer in time.
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// Operation.
        op: &'static str,
        /// Time waited.
        after: Duration,
    },
    /// foca refused an operation.
    #[error("foca rejected {op}: {source}")]
    Foca {
        /// Operation.
        op: &'static str,
        /// foca's error.
        #[source]
        source: foca::Error,
    },
    /// Serialising one of our own messages failed.
    #[error("encoding {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// The socket failed persistently.
    #[error("gossip socket {addr} failed to {op}: {source}")]
    Io {
        /// Local address.
        addr: SocketAddr,
        /// Operation.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Cheap, cloneable handle to a running gossip node.
#[derive(Clone)]
pub struct Gossip {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Gossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gossip").field("name", &self.shared.name).field("addr", &self.shared.addr).finish_non_exhaustive()
    }
}

/// Bind the gossip socket and build the node. Nothing happens on the
/// network until the worker runs and `join` is called.
pub async fn start(cfg: GossipConfig) -> Result<(Gossip, GossipWorker), GossipError> {
    if cfg.node_name.is_empty() {
        return Err(GossipError::InvalidConfig { node: cfg.node_name, reason: "node name is empty".into() });
    }
    if cfg.advertise.ip().is_unspecified() && cfg.bind.ip().is_unspecified() {
        return Err(GossipError::InvalidConfig {
            node: cfg.node_name,
            reason: format!("bind {} is a wildcard address; set an advertise address others can reach", cfg.bind),
        });
    }
    let (socket, listener, bound) = bind_sockets(cfg.bind).await?;
    let mut advertise = cfg.advertise;
    if advertise.port() == 0 {
        advertise.set_port(bound.port());
    }
    if advertise.ip().is_unspecified() {
        advertise.set_ip(bound.ip());
    }

    let identity = NodeId::new(cfg.node_name.clone(), advertise, cfg.tags);
    let size = identity.worst_case_encoded_len();
    if size > MAX_IDENTITY_BYTES {
        return Err(GossipError::TagsTooLarge { name: cfg.node_name, size, limit: MAX_IDENTITY_BYTES });
    }

    let (changes, _) = watch::channel(0u64);
    let (events, _) = broadcast::channel(EVENTS_CHANNEL_CAPACITY);
    let shared = Arc::new(Shared::new(cfg.node_name, advertise, cfg.profile, cfg.keyring, changes, events));
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_CAPACITY);
    let engine = engine::Engine::new(identity, Arc::clone(&shared), cfg.reap_failed_after);
    let worker = GossipWorker::new(engine, socket, listener, command_rx, cfg.bind.ip());
    Ok((Gossip { shared, commands }, worker))
}

/// Bind the UDP socket and the TCP listener on one address and port.
async fn bind_sockets(bind: SocketAddr) -> Result<(UdpSocket, TcpListener, SocketAddr), GossipError> {
    let mut attempt = 1;
    loop {
        let socket = UdpSocket::bind(bind).await.map_err(|source| GossipError::Bind { addr: bind, source })?;
        let bound = socket.local_addr().map_err(|source| GossipError::Io { addr: bind, op: "read its local address", source })?;
        match TcpListener::bind(bound).await {
            Ok(listener) => return Ok((socket, listener, bound)),
            Err(source) if bind.port() == 0 && attempt < BIND_ATTEMPTS && source.kind() == io::ErrorKind::AddrInUse => attempt += 1,
            Err(source) => return Err(GossipError::Bind { addr: bound, source }),
        }
    }
}

impl Gossip {
    /// All known members, including this node; failed/left ones stay until
    /// reaped. Sorted by name.
    pub fn members(&self) -> Vec<Member> {
        self.shared.snapshot()
    }

    /// Bumped on every change of [`Gossip::members`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Our node name.
    pub fn local_name(&self) -> &str {
        &self.shared.name
    }

    /// The address others reach us at (port resolved if bound to 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Announce to `addrs` over UDP and push-pull with each over TCP, and
    /// wait (up to the profile's join timeout) for answers. An address
    /// counts as answered when either its UDP reply or the push-pull
    /// succeeds; the call returns once every address answered and every
    /// push-pull is over (so the member list already holds what the seeds
    /// knew), or at the timeout. Returns how many answered; an error if
    /// none did. Our own address is skipped; an empty list joins nobody
    /// and returns 0.
    pub async fn join(&self, addrs: &[SocketAddr]) -> Result<usize, GossipError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Join { addrs: addrs.to_vec(), reply };
        let limit = self.shared.profile.join_timeout + REPLY_GRACE;
        self.request("join", limit, command, answer).await
    }

    /// Leave gracefully: others see us `Left` (not `Failed`). Waits until
    /// the leave was gossiped or `timeout` passed; the worker keeps running
    /// but ignores the cluster afterwards (stop it with its token).
    pub async fn leave(&self, timeout: Duration) -> Result<(), GossipError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Leave { timeout, reply };
        self.request("leave", timeout + REPLY_GRACE, command, answer).await
    }

    /// Mark a failed member as left, cluster-wide (Consul's force-leave).
    /// Errors for unknown names and for members that are not failed.
    pub fn force_leave(&self, name: &str) -> Result<(), GossipError> {
        let members = self.members();
        let member = members.iter().find(|m| m.name == name).ok_or_else(|| GossipError::UnknownMember { name: name.to_owned() })?;
        match member.status {
            MemberStatus::Left => Ok(()),
            MemberStatus::Alive => Err(GossipError::MemberNotFailed { name: name.to_owned(), status: member.status }),
            MemberStatus::Failed => self.try_command(Command::ForceLeave { name: name.to_owned() }),
        }
    }

    /// Broadcast a user event. `id` is generated when empty and `ltime` is
    /// always assigned from our Lamport clock. Delivered once per node
    /// (including this one) through [`Gossip::events`].
    pub fn fire_event(&self, ev: UserEvent) -> Result<(), GossipError> {
        engine::validate_event(&ev)?;
        self.try_command(Command::FireEvent { event: ev })
    }

    /// Subscribe to user events received from now on (including our own).
    pub fn events(&self) -> broadcast::Receiver<UserEvent> {
        self.shared.events.subscribe()
    }

    /// The shared keyring (changes apply to the running node immediately).
    pub fn keyring(&self) -> Option<Keyring> {
        self.shared.keyring.clone()
    }

    /// Traffic counters.
    pub fn stats(&self) -> GossipStats {
        self.shared.stats.snapshot()
    }

    /// Replace our tags at runtime; gossiped as a new identity generation.
    pub async fn set_tags(&self, tags: BTreeMap<String, String>) -> Result<(), GossipError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::SetTags { tags, reply };
        self.request("set_tags", REPLY_GRACE, command, answer).await
    }

    fn try_command(&self, command: Command) -> Result<(), GossipError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => GossipError::Busy { capacity: COMMAND_QUEUE_CAPACITY },
            mpsc::error::TrySendError::Closed(_) => GossipError::NotRunning,
        })
    }

    async fn request<T>(
        &self,
        op: &'static str,
        limit: Duration,
        command: Command,
        answer: oneshot::Receiver<Result<T, GossipError>>,
    ) -> Result<T, GossipError> {
        let exchange = async {
            self.commands.send(command).await.map_err(|_| GossipError::NotRunning)?;
            answer.await.map_err(|_| GossipError::NotRunning)?
        };
        tokio::time::timeout(limit, exchange).await.map_err(|_| GossipError::Timeout { op, after: limit })?
    }
}
