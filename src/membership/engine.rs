//! The sans-IO gossip node: foca plus our broadcast handler, envelope and
//! member view, driven by "a datagram arrived", "a timer fired" or "the
//! user asked for X", producing datagrams to send and timers to schedule.
//!
//! Owns: the foca instance and its `AccumulatingRuntime`, user-event dedupe
//! and the Lamport clock, leave intents (what turns foca's "down" into
//! Left vs Failed), the published member snapshot and change counter,
//! resizing foca's config as the cluster grows, and both halves of a
//! push-pull as state: the full view we send and merging the one we get.
//!
//! Must not depend on: sockets or tokio timers (the worker owns those), so
//! it can be unit-tested and fuzzed without a network.

use parking_lot::{Mutex, MutexGuard, RwLock};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, BroadcastHandler, Foca, Incarnation, Invalidates, Member as FocaMember, OwnedNotification, PostcardCodec, State, Timer,
};
use rand::RngExt as _;
use rand::rngs::StdRng;
use tokio::sync::{broadcast, watch};

use crate::membership::codec::{self, BroadcastItem, LeaveIntent, MAX_EVENT_BYTES, MAX_IDENTITY_BYTES, NodeId, NodeKey, OpenError, PushPullState};
use crate::membership::{GossipError, GossipStats, Keyring, Member, MemberStatus, Profile, UserEvent};

/// Event ids remembered for dedupe; far above the event rate times the
/// dissemination time, so a re-gossiped event is always recognised.
pub const EVENT_DEDUPE_CAPACITY: usize = 4096;

/// Serf's event buffer: events more than this many Lamport ticks older
/// than our clock are replays whose id may have left the dedupe window.
pub const EVENT_LTIME_WINDOW: u64 = 512;

/// Leave intents remembered; bounded so a churny cluster cannot grow it
/// forever, large enough to outlive any realistic reap window.
pub const LEAVE_MEMORY_CAPACITY: usize = 4096;

/// Hex digits of a generated event id (128 random bits): collision-free
/// for any realistic number of events.
const GENERATED_ID_HEX_LEN: usize = 32;

/// Members we re-announce to after changing identity, so the change is
/// heard even if the gossip carrying it is lost.
const REANNOUNCE_AFTER_RENAME: usize = 3;

pub(crate) type FocaNode = Foca<NodeId, PostcardCodec, StdRng, Handler>;

/// State shared between the worker and every `Gossip` handle.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) profile: Profile,
    pub(crate) keyring: Option<Keyring>,
    pub(crate) changes: watch::Sender<u64>,
    pub(crate) events: broadcast::Sender<UserEvent>,
    pub(crate) stats: Counters,
    members: RwLock<Vec<Member>>,
}

impl Shared {
    pub(crate) fn new(
        name: String,
        addr: SocketAddr,
        profile: Profile,
        keyring: Option<Keyring>,
        changes: watch::Sender<u64>,
        events: broadcast::Sender<UserEvent>,
    ) -> Self {
        Self { name, addr, profile, keyring, changes, events, stats: Counters::default(), members: RwLock::new(Vec::new()) }
    }

    pub(crate) fn snapshot(&self) -> Vec<Member> {
        // Writers replace the whole Vec at once; a poisoned lock still holds
        // a consistent list.
        self.members.read().clone()
    }

    /// Publish a new member list; bumps the change counter if it differs.
    fn publish(&self, members: Vec<Member>) {
        let mut current = self.members.write();
        if *current != members {
            *current = members;
            drop(current);
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// Lock-free traffic counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) packets_sent: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) packets_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) dropped_bad_key: AtomicU64,
    pub(crate) dropped_malformed: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) push_pulls: AtomicU64,
    pub(crate) push_pull_failures: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> GossipStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GossipStats {
            packets_sent: get(&self.packets_sent),
            bytes_sent: get(&self.bytes_sent),
            packets_received: get(&self.packets_received),
            bytes_received: get(&self.bytes_received),
            dropped_bad_key: get(&self.dropped_bad_key),
            dropped_malformed: get(&self.dropped_malformed),
            send_errors: get(&self.send_errors),
            events_received: get(&self.events_received),
            push_pulls: get(&self.push_pulls),
            push_pull_failures: get(&self.push_pull_failures),
        }
    }
}

/// A set that forgets its oldest entries past a capacity.
struct FifoSet<T> {
    set: HashSet<T>,
    order: VecDeque<T>,
    capacity: usize,
}

impl<T: Eq + Hash + Clone> FifoSet<T> {
    fn new(capacity: usize) -> Self {
        Self { set: HashSet::new(), order: VecDeque::new(), capacity }
    }

    fn contains(&self, item: &T) -> bool {
        self.set.contains(item)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.order.iter()
    }

    /// Returns false if already present.
    fn insert(&mut self, item: T) -> bool {
        if !self.set.insert(item.clone()) {
            return false;
        }
        self.order.push_back(item);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// What the broadcast handler learned, read by the engine after each call
/// into foca (foca owns the handler, so state is shared through a mutex
/// that is never contended: both sides run on the worker task).
pub(crate) struct BroadcastState {
    clock: u64,
    seen_events: FifoSet<String>,
    left: FifoSet<NodeKey>,
    pending_leaves: Vec<LeaveIntent>,
}

impl BroadcastState {
    fn new() -> Self {
        Self { clock: 0, seen_events: FifoSet::new(EVENT_DEDUPE_CAPACITY), left: FifoSet::new(LEAVE_MEMORY_CAPACITY), pending_leaves: Vec::new() }
    }
}

fn lock(state: &Mutex<BroadcastState>) -> MutexGuard<'_, BroadcastState> {
    // Every critical section leaves the state consistent, so a poisoned
    // lock (a panic elsewhere on the task) is safe to keep using.
    state.lock()
}

/// Dedupe key of a custom broadcast: foca keeps re-sending an item until
/// it has been transmitted `max_transmissions` times or replaced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ItemKey {
    Event(String),
    Leave(NodeKey),
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

/// A custom broadcast we could not decode.
#[derive(Debug, thiserror::Error)]
#[error("bad gossip broadcast item: {0}")]
pub(crate) struct ItemError(String);

/// foca's view of our custom broadcasts: decode, dedupe, deliver events.
pub(crate) struct Handler {
    state: Arc<Mutex<BroadcastState>>,
    shared: Arc<Shared>,
}

impl BroadcastHandler<NodeId> for Handler {
    type Key = ItemKey;
    type Error = ItemError;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&NodeId>) -> Result<Option<ItemKey>, ItemError> {
        let item = BroadcastItem::decode(data).map_err(|e| ItemError(e.to_string()))?;
        let mut st = lock(&self.state);
        match item {
            BroadcastItem::Event(ev) => {
                if ev.id.is_empty() {
                    return Err(ItemError("user event without id".into()));
                }
                if st.seen_events.contains(&ev.id) || ev.ltime.saturating_add(EVENT_LTIME_WINDOW) < st.clock {
                    return Ok(None);
                }
                st.seen_events.insert(ev.id.clone());
                st.clock = st.clock.max(ev.ltime);
                Counters::add(&self.shared.stats.events_received, 1);
                let key = ItemKey::Event(ev.id.clone());
                tracing::debug!(id = %ev.id, name = %ev.name, ltime = ev.ltime, "user event");
                // No subscriber is fine: events are fire-and-forget.
                let _ = self.shared.events.send(ev);
                Ok(Some(key))
            }
            BroadcastItem::Leave(intent) => {
                if !st.left.insert(intent.node) {
                    return Ok(None);
                }
                let key = ItemKey::Leave(intent.node);
                st.pending_leaves.push(intent);
                Ok(Some(key))
            }
        }
    }
}

/// Whether a member identity from a peer's push-pull state is one a
/// well-behaved member could have sent: named, reachable, and small
/// enough to fit our packets (an oversized one would make probes fail to
/// encode).
fn acceptable_identity(id: &NodeId) -> bool {
    !id.name.is_empty() && id.addr.port() != 0 && !id.addr.ip().is_unspecified() && id.worst_case_encoded_len() <= MAX_IDENTITY_BYTES
}

/// Checks a handle can do before queueing an event.
pub(crate) fn validate_event(ev: &UserEvent) -> Result<(), GossipError> {
    if ev.name.is_empty() {
        return Err(GossipError::InvalidEvent { reason: "event name is empty".into() });
    }
    // Measure as sent: a generated 32-char id and a maximal Lamport time.
    let mut worst = ev.clone();
    if worst.id.is_empty() {
        worst.id = "0".repeat(GENERATED_ID_HEX_LEN);
    }
    worst.ltime = u64::MAX;
    let size = BroadcastItem::Event(worst).encode().map_err(|source| GossipError::Encode { what: "user event", source })?.len();
    if size > MAX_EVENT_BYTES {
        return Err(GossipError::EventTooLarge { name: ev.name.clone(), size, limit: MAX_EVENT_BYTES });
    }
    Ok(())
}

/// The sans-IO node.
pub(crate) struct Engine {
    foca: FocaNode,
    runtime: AccumulatingRuntime<NodeId>,
    state: Arc<Mutex<BroadcastState>>,
    shared: Arc<Shared>,
    reap_after: Duration,
    /// (max_transmissions, suspicion) foca is currently configured with.
    sized_for: (u8, Duration),
    /// Our incarnation as last seen in a header we sent (foca does not
    /// expose it), keyed by the identity it belongs to.
    own_incarnation: (NodeKey, Incarnation),
    has_left: bool,
    outbox: Vec<(SocketAddr, Vec<u8>)>,
    timers: Vec<(Duration, Timer<NodeId>)>,
}

impl Engine {
    pub(crate) fn new(identity: NodeId, shared: Arc<Shared>, reap_after: Duration) -> Self {
        let state = Arc::new(Mutex::new(BroadcastState::new()));
        let handler = Handler { state: Arc::clone(&state), shared: Arc::clone(&shared) };
        let profile = &shared.profile;
        let config = profile.foca_config(1, Some(reap_after));
        let sized_for = (config.max_transmissions.get(), config.suspect_to_down_after);
        let own_incarnation = (identity.key(), Incarnation::default());
        let foca = Foca::with_custom_broadcast(identity, config, rand::make_rng::<StdRng>(), PostcardCodec, handler);
        let engine = Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            state,
            shared,
            reap_after,
            sized_for,
            own_incarnation,
            has_left: false,
            outbox: Vec::new(),
            timers: Vec::new(),
        };
        engine.rebuild_view();
        engine
    }

    pub(crate) fn identity(&self) -> &NodeId {
        self.foca.identity()
    }

    pub(crate) fn has_left(&self) -> bool {
        self.has_left
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Datagrams ready for the socket.
    pub(crate) fn take_outbox(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.outbox)
    }

    /// Timers foca asked for, relative to now.
    pub(crate) fn take_timers(&mut self) -> Vec<(Duration, Timer<NodeId>)> {
        std::mem::take(&mut self.timers)
    }

    /// Feed one received datagram. Returns the sender's identity if foca
    /// accepted the packet (used to count join answers).
    pub(crate) fn handle_datagram(&mut self, datagram: &[u8]) -> Option<NodeId> {
        let stats = &self.shared.stats;
        Counters::add(&stats.packets_received, 1);
        Counters::add(&stats.bytes_received, datagram.len() as u64);
        if self.has_left {
            // After leaving, any reply would be a TurnUndead that makes foca
            // auto-rejoin with a renewed identity: ignore the cluster.
            return None;
        }
        let packet = match codec::open(self.shared.keyring.as_ref(), datagram) {
            Ok(packet) => packet,
            Err(OpenError::BadKey) => {
                Counters::add(&stats.dropped_bad_key, 1);
                tracing::debug!(len = datagram.len(), "dropped gossip packet: bad key");
                return None;
            }
            Err(OpenError::Malformed) => {
                Counters::add(&stats.dropped_malformed, 1);
                return None;
            }
        };
        let header = codec::peek_header(&packet);
        let result = self.foca.handle_data(&packet, &mut self.runtime);
        let accepted = match result {
            Ok(()) => true,
            Err(err) => {
                self.note_data_error(&err);
                // Custom broadcast errors surface after the message itself
                // was processed; everything else means it was rejected.
                matches!(err, foca::Error::CustomBroadcast(_))
            }
        };
        self.drain();
        header.filter(|_| accepted).map(|h| h.src)
    }

    fn note_data_error(&self, err: &foca::Error) {
        match err {
            foca::Error::Decode(_) | foca::Error::MalformedPacket | foca::Error::DataTooBig | foca::Error::CustomBroadcast(_) => {
                Counters::add(&self.shared.stats.dropped_malformed, 1);
                tracing::debug!(error = %err, "rejected gossip packet");
            }
            other => tracing::trace!(error = %other, "gossip packet ignored"),
        }
    }

    pub(crate) fn handle_timer(&mut self, timer: Timer<NodeId>) {
        // Reaping removes a member without any foca notification.
        let reaps = matches!(timer, Timer::RemoveDown(_));
        if let Err(err) = self.foca.handle_timer(timer, &mut self.runtime) {
            tracing::debug!(error = %err, "foca timer");
        }
        self.drain();
        if reaps {
            self.rebuild_view();
            self.resize_config();
        }
    }

    /// Ask whoever listens at `addr` to let us in (their reply is a Feed).
    pub(crate) fn announce(&mut self, addr: SocketAddr) {
        if let Err(err) = self.foca.announce(NodeId::placeholder(addr), &mut self.runtime) {
            tracing::debug!(error = %err, %addr, "announce");
        }
        self.drain();
    }

    pub(crate) fn fire_event(&mut self, mut ev: UserEvent) -> Result<UserEvent, GossipError> {
        if self.has_left {
            return Err(GossipError::Left);
        }
        validate_event(&ev)?;
        if ev.id.is_empty() {
            ev.id = format!("{:0width$x}", rand::rng().random::<u128>(), width = GENERATED_ID_HEX_LEN);
        }
        {
            let mut st = lock(&self.state);
            st.clock = st.clock.saturating_add(1);
            ev.ltime = st.clock;
        }
        let bytes = BroadcastItem::Event(ev.clone()).encode().map_err(|source| GossipError::Encode { what: "user event", source })?;
        // add_broadcast runs our handler (sender = None), which delivers the
        // event locally and marks its id as seen.
        let added = self.foca.add_broadcast(&bytes).map_err(|source| GossipError::Foca { op: "fire_event", source })?;
        if !added {
            return Err(GossipError::DuplicateEvent { id: ev.id });
        }
        // Push it out now instead of waiting for the next gossip round.
        if let Err(err) = self.foca.broadcast(&mut self.runtime) {
            tracing::debug!(error = %err, "broadcast");
        }
        self.drain();
        Ok(ev)
    }

    /// Members in the cluster (including us), for scaling intervals.
    pub(crate) fn cluster_size(&self) -> usize {
        self.foca.num_members() + 1
    }

    /// A random member that is alive (not suspect or down), to push-pull
    /// with; memberlist picks among alive nodes only.
    pub(crate) fn random_alive_peer(&self) -> Option<SocketAddr> {
        let alive: Vec<SocketAddr> = self.foca.iter_membership_state().filter(|m| m.state() == State::Alive).map(|m| m.id().addr).collect();
        if alive.is_empty() { None } else { Some(alive[rand::rng().random_range(0..alive.len())]) }
    }

    /// Our full view for a push-pull: ourselves first (alive, at our
    /// current incarnation), then alive, suspect and down members, and the
    /// leave notices of members we still list.
    pub(crate) fn push_pull_state(&self) -> PushPullState {
        let me = self.foca.identity();
        let incarnation = if self.own_incarnation.0 == me.key() { self.own_incarnation.1 } else { Incarnation::default() };
        let mut members = vec![FocaMember::new(me.clone(), incarnation, State::Alive)];
        for wanted in [State::Alive, State::Suspect, State::Down] {
            members.extend(self.foca.iter_membership_state().filter(|m| m.state() == wanted && acceptable_identity(m.id())).cloned());
        }
        let st = lock(&self.state);
        let known: HashSet<NodeKey> = self.foca.iter_membership_state().map(|m| m.id().key()).collect();
        let left = st.left.iter().filter(|k| known.contains(k)).copied().collect();
        PushPullState { members, left }
    }

    /// Merge a peer's push-pull state into foca. Identities that could not
    /// have come from a well-behaved member are skipped, and so are down
    /// members we do not know (memberlist ignores dead nodes it never saw:
    /// re-adding them would resurrect reaped entries). `broadcast` makes
    /// foca gossip what was new to us; a joiner passes `false`, since the
    /// seed's cluster already knows its own state. Returns how many
    /// members were handed to foca.
    pub(crate) fn apply_push_pull(&mut self, state: PushPullState, broadcast: bool) -> usize {
        if self.has_left {
            return 0;
        }
        let own = self.foca.identity().key();
        let known_addrs: HashSet<SocketAddr> = self.foca.iter_membership_state().map(|m| m.id().addr).collect();
        let updates: Vec<FocaMember<NodeId>> = state
            .members
            .into_iter()
            .filter(|m| acceptable_identity(m.id()) && (m.state() != State::Down || known_addrs.contains(&m.id().addr)))
            .collect();
        // Notices only for identities we list (or are about to), so a peer
        // cannot fill the bounded leave memory with strangers.
        let listed: HashSet<NodeKey> = updates.iter().map(|m| m.id().key()).chain(self.foca.iter_membership_state().map(|m| m.id().key())).collect();
        let mut relabelled = false;
        {
            // Leave notices first, so a member that arrives down below is
            // shown Left rather than Failed.
            let mut st = lock(&self.state);
            for key in state.left {
                if key != own && listed.contains(&key) {
                    relabelled |= st.left.insert(key);
                }
            }
        }
        let count = updates.len();
        // One at a time: apply_many stops at the first error, and one
        // update foca refuses must not cost us the rest of the list.
        for update in updates {
            if let Err(err) = self.foca.apply_many(std::iter::once(update), broadcast, &mut self.runtime) {
                tracing::debug!(error = %err, "applying push-pull state");
            }
        }
        self.drain();
        if relabelled {
            self.rebuild_view();
        }
        count
    }

    /// Start a graceful leave: leave intent + foca's leave_cluster.
    pub(crate) fn begin_leave(&mut self) -> Result<(), GossipError> {
        if self.has_left {
            return Ok(());
        }
        let me = self.foca.identity().clone();
        let bytes = BroadcastItem::Leave(LeaveIntent { node: me.key(), name: me.name.clone(), forced: false })
            .encode()
            .map_err(|source| GossipError::Encode { what: "leave intent", source })?;
        // The intent must be queued before leave_cluster so it rides on the
        // very gossip messages that announce us down.
        self.foca.add_broadcast(&bytes).map_err(|source| GossipError::Foca { op: "leave", source })?;
        let result = self.foca.leave_cluster(&mut self.runtime);
        self.has_left = true;
        self.drain();
        self.rebuild_view();
        result.map_err(|source| GossipError::Foca { op: "leave", source })
    }

    /// One more round of gossip while a leave propagates.
    pub(crate) fn regossip(&mut self) {
        if let Err(err) = self.foca.gossip(&mut self.runtime) {
            tracing::debug!(error = %err, "gossip");
        }
        self.drain();
    }

    /// Nothing left to tell anyone (or nobody to tell).
    pub(crate) fn leave_flushed(&self) -> bool {
        self.foca.num_members() == 0 || (self.foca.updates_backlog() == 0 && self.foca.custom_broadcast_backlog() == 0)
    }

    pub(crate) fn force_leave(&mut self, name: &str) -> Result<(), GossipError> {
        let target = self
            .foca
            .iter_membership_state()
            .filter(|m| m.id().name == name)
            .reduce(|best, m| if m.id().is_newer_than(best.id()) { m } else { best })
            .map(|m| (m.id().clone(), m.state()));
        let Some((id, state)) = target else {
            return Err(GossipError::UnknownMember { name: name.to_owned() });
        };
        if state != State::Down {
            return Err(GossipError::MemberNotFailed { name: name.to_owned(), status: MemberStatus::Alive });
        }
        let bytes = BroadcastItem::Leave(LeaveIntent { node: id.key(), name: id.name.clone(), forced: true })
            .encode()
            .map_err(|source| GossipError::Encode { what: "force-leave intent", source })?;
        self.foca.add_broadcast(&bytes).map_err(|source| GossipError::Foca { op: "force_leave", source })?;
        if let Err(err) = self.foca.broadcast(&mut self.runtime) {
            tracing::debug!(error = %err, "broadcast");
        }
        self.drain();
        Ok(())
    }

    /// Replace our tags: a new identity generation that wins the address
    /// conflict everywhere (foca declares the previous one down).
    pub(crate) fn set_tags(&mut self, tags: BTreeMap<String, String>) -> Result<(), GossipError> {
        if self.has_left {
            return Err(GossipError::Left);
        }
        let current = self.foca.identity().clone();
        if current.tags == tags {
            return Ok(());
        }
        let next = NodeId { generation: current.generation.saturating_add(1), tags, ..current };
        let size = next.worst_case_encoded_len();
        if size > MAX_IDENTITY_BYTES {
            return Err(GossipError::TagsTooLarge { name: next.name, size, limit: MAX_IDENTITY_BYTES });
        }
        self.foca.change_identity(next, &mut self.runtime).map_err(|source| GossipError::Foca { op: "set_tags", source })?;
        // change_identity leaves foca disconnected until someone talks to
        // the new identity; announcing guarantees an answer.
        let peers: Vec<NodeId> = self.foca.iter_members().take(REANNOUNCE_AFTER_RENAME).map(|m| m.id().clone()).collect();
        for peer in peers {
            if let Err(err) = self.foca.announce(peer, &mut self.runtime) {
                tracing::debug!(error = %err, "announce");
            }
        }
        self.drain();
        self.rebuild_view();
        Ok(())
    }

    /// Move everything foca produced out of the runtime, apply leave
    /// intents, and republish the member view if anything changed.
    fn drain(&mut self) {
        let mut changed = false;
        loop {
            while let Some((dst, data)) = self.runtime.to_send() {
                self.note_own_incarnation(&data);
                match codec::seal(self.shared.keyring.as_ref(), &data) {
                    Ok(datagram) => self.outbox.push((dst.addr, datagram)),
                    Err(err) => {
                        Counters::add(&self.shared.stats.send_errors, 1);
                        tracing::warn!(error = %err, "sealing gossip packet");
                    }
                }
            }
            while let Some(scheduled) = self.runtime.to_schedule() {
                self.timers.push(scheduled);
            }
            while let Some(notification) = self.runtime.to_notify() {
                changed |= self.note(notification);
            }
            let pending = std::mem::take(&mut lock(&self.state).pending_leaves);
            if pending.is_empty() {
                break;
            }
            changed = true;
            self.apply_leave_intents(&pending);
        }
        if changed {
            self.rebuild_view();
            self.resize_config();
        }
    }

    /// Remember the incarnation foca put in one of our outgoing headers.
    fn note_own_incarnation(&mut self, packet: &[u8]) {
        if let Some(header) = codec::peek_header(packet)
            && header.src == *self.foca.identity()
        {
            self.own_incarnation = (header.src.key(), header.src_incarnation);
        }
    }

    /// A graceful leave intent also declares the member down locally, so
    /// "Left" does not depend on foca's own down update arriving.
    fn apply_leave_intents(&mut self, intents: &[LeaveIntent]) {
        let own = self.foca.identity().key();
        let downs: Vec<FocaMember<NodeId>> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() != State::Down)
            .filter(|m| {
                let key = m.id().key();
                key != own && intents.iter().any(|i| !i.forced && i.node == key)
            })
            .map(|m| FocaMember::new(m.id().clone(), m.incarnation(), State::Down))
            .collect();
        for intent in intents {
            tracing::info!(name = %intent.name, forced = intent.forced, "member left");
        }
        if !downs.is_empty()
            && let Err(err) = self.foca.apply_many(downs.into_iter(), true, &mut self.runtime)
        {
            tracing::debug!(error = %err, "applying leave");
        }
    }

    /// Returns whether the member list may have changed.
    fn note(&self, notification: OwnedNotification<NodeId>) -> bool {
        match notification {
            OwnedNotification::MemberUp(id) => {
                tracing::debug!(member = ?id, "member up");
                true
            }
            OwnedNotification::MemberDown(id) => {
                tracing::info!(member = ?id, "member down");
                true
            }
            OwnedNotification::Rename(old, new) => {
                tracing::debug!(?old, ?new, "member renamed");
                true
            }
            OwnedNotification::Rejoin(id) => {
                tracing::warn!(identity = ?id, "we were declared down; rejoined");
                true
            }
            OwnedNotification::Defunct => {
                if !self.has_left {
                    tracing::warn!("declared down and unable to rejoin");
                }
                true
            }
            OwnedNotification::Active => {
                tracing::info!("joined the gossip cluster");
                false
            }
            OwnedNotification::Idle => {
                if !self.has_left {
                    tracing::warn!("no other live gossip members");
                }
                false
            }
            // Reachable only if some crate in the build enables foca's
            // `unstable-notifications` (feature unification).
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Recompute the published member list from foca's full state.
    fn rebuild_view(&self) {
        let st = lock(&self.state);
        let mut best: HashMap<&str, (&NodeId, MemberStatus)> = HashMap::new();
        let me = self.foca.identity();
        let own_status = if self.has_left { MemberStatus::Left } else { MemberStatus::Alive };
        let entries = self
            .foca
            .iter_membership_state()
            .map(|m| {
                let status = match m.state() {
                    State::Alive | State::Suspect => MemberStatus::Alive,
                    State::Down if st.left.contains(&m.id().key()) => MemberStatus::Left,
                    State::Down => MemberStatus::Failed,
                };
                (m.id(), status)
            })
            .chain(std::iter::once((me, own_status)));
        for (id, status) in entries {
            match best.entry(id.name.as_str()) {
                Entry::Vacant(slot) => {
                    slot.insert((id, status));
                }
                // Same name, different identity: the newer wins.
                Entry::Occupied(mut slot) => {
                    if id.is_newer_than(slot.get().0) {
                        slot.insert((id, status));
                    }
                }
            }
        }
        let mut members: Vec<Member> =
            best.into_values().map(|(id, status)| Member { name: id.name.clone(), addr: id.addr, tags: id.tags.clone(), status }).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        drop(st);
        self.shared.publish(members);
    }

    /// Scale suspicion and retransmissions with the cluster (memberlist).
    fn resize_config(&mut self) {
        let size = self.foca.num_members() + 1;
        let profile = &self.shared.profile;
        let wanted = (profile.max_transmissions(size).get(), profile.suspicion_timeout(size));
        if wanted == self.sized_for {
            return;
        }
        match self.foca.set_config(profile.foca_config(size, Some(self.reap_after))) {
            Ok(()) => self.sized_for = wanted,
            Err(err) => tracing::debug!(error = %err, "resizing foca config"),
        }
    }
}
