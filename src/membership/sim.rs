//! In-memory, single-process simulation of many gossip members on a virtual
//! clock, for the convergence benchmark (`benches/gossip_convergence.rs`).
//!
//! Owns: a discrete-event loop that delivers foca datagrams (after a
//! jittered latency) and foca timers to N foca instances configured exactly
//! like production ones (same `NodeId`, codec and `Profile::foca_config`),
//! killing a member, and measuring failure-detection time and traffic.
//!
//! Must not depend on: sockets, tokio or the wall clock for protocol time
//! (foca is sans-IO, so the simulation is deterministic for a given seed).
//! Encryption is not run; byte counts add `ENCRYPTION_OVERHEAD` per datagram
//! so they match an encrypted cluster on the wire.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use crate::membership::codec::NodeId;
use crate::membership::keyring::ENCRYPTION_OVERHEAD;
use crate::membership::profile::Profile;

/// One-way LAN latency: a same-rack hop is well under a millisecond, so
/// 1 ms (jittered +-50%) is a conservative LAN figure.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(1);
/// Time before the kill: long enough for every member to have probed a
/// few times, so steady-state traffic is measured after start-up effects.
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(10);
/// Virtual time allowed after the kill; several times the LAN bound even
/// for thousands of members.
pub const DEFAULT_MAX_AFTER_KILL: Duration = Duration::from_secs(120);
/// Wall-clock budget per run, so a benchmark can never hang.
pub const DEFAULT_WALL_BUDGET: Duration = Duration::from_secs(60);
/// Seed of the simulation RNGs: fixed so runs are reproducible.
pub const DEFAULT_SEED: u64 = 0x5EED_2024;
/// Events processed between wall-clock budget checks (Instant::now is
/// cheap but not free).
const WALL_CHECK_EVERY: u64 = 4096;
/// 2^64 / phi, the usual odd constant for spreading integer seeds.
const GOLDEN_RATIO_64: u64 = 0x9E37_79B9_7F4A_7C15;
/// Base port of the synthetic members (Serf LAN port).
const SIM_PORT: u16 = 8301;

type SimFoca = Foca<NodeId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// Parameters of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Cluster size, including the member that will be killed.
    pub members: usize,
    /// Timings under test.
    pub profile: Profile,
    /// Mean one-way latency.
    pub latency: Duration,
    /// RNG seed.
    pub seed: u64,
    /// Virtual time before the kill.
    pub warmup: Duration,
    /// Virtual time allowed after the kill.
    pub max_after_kill: Duration,
    /// Wall-clock budget.
    pub wall_budget: Duration,
}

impl SimConfig {
    /// LAN profile and the defaults above.
    pub fn new(members: usize) -> Self {
        Self {
            members,
            profile: Profile::lan(),
            latency: DEFAULT_LATENCY,
            seed: DEFAULT_SEED,
            warmup: DEFAULT_WARMUP,
            max_after_kill: DEFAULT_MAX_AFTER_KILL,
            wall_budget: DEFAULT_WALL_BUDGET,
        }
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// Cluster size.
    pub members: usize,
    /// Kill -> first live member declares the victim down.
    pub first_detection: Option<Duration>,
    /// Kill -> every live member has declared the victim down.
    pub full_detection: Option<Duration>,
    /// Live members that saw the victim down by the end.
    pub detected_by: usize,
    /// Live members wrongly declared down (should be 0 without loss).
    pub false_downs: usize,
    /// Datagrams per member per second before the kill.
    pub steady_msgs_per_member_sec: f64,
    /// Bytes per member per second before the kill.
    pub steady_bytes_per_member_sec: f64,
    /// Datagrams per member per second from the kill to full detection.
    pub failure_msgs_per_member_sec: f64,
    /// Bytes per member per second from the kill to full detection.
    pub failure_bytes_per_member_sec: f64,
    /// Largest datagram seen (with encryption overhead).
    pub max_datagram_bytes: usize,
    /// Virtual time simulated.
    pub virtual_elapsed: Duration,
    /// Wall time the run took.
    pub wall_elapsed: Duration,
    /// Whether the wall budget cut the run short.
    pub hit_wall_budget: bool,
}

enum Payload {
    Timer(Timer<NodeId>),
    Datagram(Vec<u8>),
}

struct Event {
    at: Duration,
    seq: u64,
    node: usize,
    payload: Payload,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct SimNode {
    foca: SimFoca,
    alive: bool,
}

/// N foca members on a virtual clock and an in-memory network.
pub struct Simulation {
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    queue: BinaryHeap<Reverse<Event>>,
    runtime: AccumulatingRuntime<NodeId>,
    rng: StdRng,
    now: Duration,
    seq: u64,
    latency: Duration,
    victim: Option<(usize, Duration)>,
    detected_at: Vec<Option<Duration>>,
    false_downs: Vec<bool>,
    msgs: u64,
    bytes: u64,
    max_datagram: usize,
    processed: u64,
}

/// Tags shaped like a Consul agent's, so packet sizes are realistic.
fn sim_tags(i: usize) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("role".into(), "node".into()),
        ("dc".into(), "dc1".into()),
        ("port".into(), "8300".into()),
        ("id".into(), format!("{i:08x}-0000-4000-8000-000000000000")),
        ("build".into(), "1.21.0:0000000".into()),
        ("vsn".into(), "2".into()),
    ])
}

fn sim_addr(i: usize) -> SocketAddr {
    // Synthetic addresses: nothing is bound, they are only identities.
    let offset = u32::try_from(i).unwrap_or(u32::MAX - 2) + 1;
    SocketAddr::from((Ipv4Addr::from(0x0A00_0000u32 + offset), SIM_PORT))
}

impl Simulation {
    /// Build `cfg.members` members that already know each other (as after
    /// a completed join), with probe cycles started at random offsets.
    pub fn new(cfg: &SimConfig) -> Self {
        let n = cfg.members.max(2);
        let ids: Vec<NodeId> =
            (0..n).map(|i| NodeId { name: format!("node-{i:04}"), addr: sim_addr(i), started_ms: 1, generation: 0, tags: sim_tags(i) }).collect();
        let mut sim = Self {
            nodes: Vec::with_capacity(n),
            by_addr: ids.iter().enumerate().map(|(i, id)| (id.addr, i)).collect(),
            queue: BinaryHeap::new(),
            runtime: AccumulatingRuntime::new(),
            rng: StdRng::seed_from_u64(cfg.seed),
            now: Duration::ZERO,
            seq: 0,
            latency: cfg.latency,
            victim: None,
            detected_at: vec![None; n],
            false_downs: vec![false; n],
            msgs: 0,
            bytes: 0,
            max_datagram: 0,
            processed: 0,
        };
        for (i, id) in ids.iter().enumerate() {
            let config = cfg.profile.foca_config(n, None);
            // Per-member seed: spread the index with the golden-ratio
            // constant so neighbouring members get unrelated streams.
            let rng = StdRng::seed_from_u64(cfg.seed ^ (i as u64).wrapping_mul(GOLDEN_RATIO_64));
            let mut foca = Foca::new(id.clone(), config, rng, PostcardCodec);
            let others = ids.iter().filter(|other| other.addr != id.addr).cloned().map(foca::Member::alive);
            // Already-known members: nothing to disseminate.
            if let Err(err) = foca.apply_many(others, false, &mut sim.runtime) {
                tracing::debug!(error = %err, "sim bootstrap");
            }
            sim.nodes.push(SimNode { foca, alive: true });
            // Desynchronise probe cycles like real, independently started
            // processes.
            let offset = cfg.profile.probe_period.mul_f64(sim.rng.random::<f64>());
            sim.drain(i, offset);
        }
        sim
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Datagrams and bytes sent so far.
    pub fn traffic(&self) -> (u64, u64) {
        (self.msgs, self.bytes)
    }

    /// Stop member `index` abruptly (no leave): its timers and inbound
    /// datagrams are dropped from now on.
    pub fn kill(&mut self, index: usize) {
        if let Some(node) = self.nodes.get_mut(index) {
            node.alive = false;
            self.victim = Some((index, self.now));
        }
    }

    /// Whether every live member has declared the victim down.
    pub fn all_live_detected(&self) -> bool {
        self.victim.is_some() && self.nodes.iter().zip(&self.detected_at).all(|(node, seen)| !node.alive || seen.is_some())
    }

    /// Process events up to virtual time `until`, or until `stop` says so
    /// (checked after each event). Returns false if the wall budget ran out.
    pub fn run_until(&mut self, until: Duration, wall_deadline: Instant, stop: impl Fn(&Self) -> bool) -> bool {
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(event)) = self.queue.pop() else {
                break;
            };
            self.now = event.at;
            self.dispatch(event);
            self.processed += 1;
            if stop(self) {
                return true;
            }
            if self.processed.is_multiple_of(WALL_CHECK_EVERY) && Instant::now() > wall_deadline {
                return false;
            }
        }
        self.now = self.now.max(until);
        true
    }

    fn dispatch(&mut self, event: Event) {
        let i = event.node;
        let Some(node) = self.nodes.get_mut(i) else {
            return;
        };
        if !node.alive {
            return;
        }
        let result = match event.payload {
            Payload::Timer(timer) => node.foca.handle_timer(timer, &mut self.runtime),
            Payload::Datagram(data) => node.foca.handle_data(&data, &mut self.runtime),
        };
        if let Err(err) = result {
            tracing::trace!(error = %err, node = i, "sim");
        }
        self.drain(i, Duration::ZERO);
    }

    fn drain(&mut self, i: usize, extra_delay: Duration) {
        while let Some((dst, data)) = self.runtime.to_send() {
            let wire = data.len() + ENCRYPTION_OVERHEAD;
            self.msgs += 1;
            self.bytes += wire as u64;
            self.max_datagram = self.max_datagram.max(wire);
            if let Some(&to) = self.by_addr.get(&dst.addr) {
                let jitter = 0.5 + self.rng.random::<f64>();
                let at = self.now + extra_delay + self.latency.mul_f64(jitter);
                self.push(at, to, Payload::Datagram(data.to_vec()));
            }
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let at = self.now + extra_delay + after;
            self.push(at, i, Payload::Timer(timer));
        }
        while let Some(notification) = self.runtime.to_notify() {
            if let OwnedNotification::MemberDown(id) = notification {
                match self.by_addr.get(&id.addr) {
                    Some(&down) if Some(down) == self.victim.map(|v| v.0) => {
                        self.detected_at[i].get_or_insert(self.now);
                    }
                    Some(&down) if self.nodes.get(down).is_some_and(|n| n.alive) => {
                        self.false_downs[down] = true;
                    }
                    _ => {}
                }
            }
        }
    }

    fn push(&mut self, at: Duration, node: usize, payload: Payload) {
        self.seq += 1;
        self.queue.push(Reverse(Event { at, seq: self.seq, node, payload }));
    }
}

/// Warm up, kill one member, run until every live member has declared it
/// down (or the budgets run out), and report.
pub fn run_failure_detection(cfg: &SimConfig) -> SimReport {
    let wall_start = Instant::now();
    let wall_deadline = wall_start + cfg.wall_budget;
    let mut sim = Simulation::new(cfg);
    let n = sim.nodes.len();
    let mut in_budget = sim.run_until(cfg.warmup, wall_deadline, |_| false);
    let (warm_msgs, warm_bytes) = sim.traffic();
    let kill_at = sim.now();
    sim.kill(n / 2);
    if in_budget {
        in_budget = sim.run_until(kill_at + cfg.max_after_kill, wall_deadline, Simulation::all_live_detected);
    }
    let (msgs, bytes) = sim.traffic();
    let detections: Vec<Duration> =
        sim.nodes.iter().zip(&sim.detected_at).filter(|(node, _)| node.alive).filter_map(|(_, at)| at.map(|t| t.saturating_sub(kill_at))).collect();
    let full_detection = sim.all_live_detected().then(|| detections.iter().max().copied()).flatten();
    let per_member_sec = |count: u64, window: Duration| {
        let secs = window.as_secs_f64();
        if secs > 0.0 { count as f64 / (n as f64 * secs) } else { 0.0 }
    };
    let failure_window = sim.now().saturating_sub(kill_at);
    SimReport {
        members: n,
        first_detection: detections.iter().min().copied(),
        full_detection,
        detected_by: detections.len(),
        false_downs: sim.false_downs.iter().filter(|f| **f).count(),
        steady_msgs_per_member_sec: per_member_sec(warm_msgs, kill_at),
        steady_bytes_per_member_sec: per_member_sec(warm_bytes, kill_at),
        failure_msgs_per_member_sec: per_member_sec(msgs - warm_msgs, failure_window),
        failure_bytes_per_member_sec: per_member_sec(bytes - warm_bytes, failure_window),
        max_datagram_bytes: sim.max_datagram,
        virtual_elapsed: sim.now(),
        wall_elapsed: wall_start.elapsed(),
        hit_wall_budget: !in_budget,
    }
}

/// Classic SWIM expectation for the same config, the benchmark's reference:
/// expected wait until some member probes the victim (T·e/(e−1), Das et
/// al.), one more period before foca acts on the failed probe, the probe
/// RTT, the suspicion timeout, and log2(N) probe periods of piggybacked
/// dissemination.
pub fn swim_reference(profile: &Profile, members: usize) -> Duration {
    let e = std::f64::consts::E;
    let t = profile.probe_period;
    t.mul_f64(e / (e - 1.0)) + t + profile.probe_rtt + profile.suspicion_timeout(members) + t.mul_f64((members.max(2) as f64).log2())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_cluster_detects_a_killed_member_within_the_profile_bound() {
        let mut cfg = SimConfig::new(20);
        cfg.profile = Profile::fast();
        cfg.warmup = Duration::from_secs(2);
        cfg.max_after_kill = Duration::from_secs(30);
        cfg.wall_budget = Duration::from_secs(20);
        let report = run_failure_detection(&cfg);
        assert!(!report.hit_wall_budget, "{report:?}");
        assert_eq!(report.false_downs, 0, "{report:?}");
        let full = report.full_detection.expect("everyone detects the kill");
        assert!(full <= cfg.profile.failure_detection_bound(20), "{full:?} > bound: {report:?}");
        assert!(report.max_datagram_bytes <= crate::membership::profile::MAX_DATAGRAM_BYTES);
        assert!(report.steady_msgs_per_member_sec > 0.0);
    }

    #[test]
    fn simulations_with_the_same_seed_are_identical() {
        let mut cfg = SimConfig::new(10);
        cfg.profile = Profile::fast();
        cfg.warmup = Duration::from_secs(1);
        cfg.max_after_kill = Duration::from_secs(10);
        let a = run_failure_detection(&cfg);
        let b = run_failure_detection(&cfg);
        assert_eq!(a.full_detection, b.full_detection);
        assert_eq!(a.steady_bytes_per_member_sec.to_bits(), b.steady_bytes_per_member_sec.to_bits());
    }
}
