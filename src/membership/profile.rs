//! Gossip timing profiles and their translation into a `foca::Config`.
//!
//! Owns: every timing default of the membership layer (each a named
//! constant with the reason for its value), the cluster-size scaling of
//! suspicion timeout, retransmissions and the push-pull interval
//! (memberlist's formulas), the timeouts of a push-pull exchange, and the
//! conservative failure-detection bound used by tests and the benchmark.
//!
//! Must not depend on: sockets, tokio, or the worker; the sans-IO simulator
//! builds the exact same `foca::Config` from here.

use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use crate::membership::keyring::ENCRYPTION_OVERHEAD;

/// Largest datagram we put on the wire: stays under a 1500-byte Ethernet MTU
/// with room for IP/UDP headers and a tunnel or two (RFC 8085 guidance).
pub const MAX_DATAGRAM_BYTES: usize = 1400;

/// What foca may use per packet: the datagram minus the encryption
/// envelope, so plaintext and encrypted clusters share one packet budget.
pub const FOCA_MAX_PACKET_BYTES: usize = MAX_DATAGRAM_BYTES - ENCRYPTION_OVERHEAD;

/// memberlist's DefaultLANConfig ProbeInterval.
pub const LAN_PROBE_PERIOD: Duration = Duration::from_secs(1);
/// memberlist's ProbeTimeout: a LAN RTT is far below this, so a miss means trouble.
pub const LAN_PROBE_RTT: Duration = Duration::from_millis(500);
/// memberlist's SuspicionMult (4) x ProbeInterval; scaled by log10(n) below.
pub const LAN_SUSPICION_BASE: Duration = Duration::from_secs(4);
/// memberlist's GossipInterval: LAN bandwidth makes 5 gossip rounds/s cheap.
pub const LAN_GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// Periodic announce (foca's discovery round: the answer is a Feed of
/// random members); complements the push-pull below, which exchanges the
/// whole list.
pub const LAN_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(30);
/// memberlist's DefaultLANConfig PushPullInterval: full state exchange with
/// one random member over TCP; repairs whatever gossip missed (e.g. after a
/// partition) at a cost of one member list per node per interval.
pub const LAN_PUSH_PULL_INTERVAL: Duration = Duration::from_secs(30);
/// Serf's ReconnectInterval: how often we knock on failed members' doors
/// so a healed partition merges back without operator action.
pub const LAN_ANNOUNCE_DOWN_INTERVAL: Duration = Duration::from_secs(30);
/// How long `join` waits for answers: several LAN RTTs plus retries.
pub const LAN_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-announce interval while a join is unanswered (UDP may drop the first).
pub const LAN_JOIN_RETRY: Duration = Duration::from_millis(500);
/// Spacing of extra gossip rounds while a graceful leave propagates.
pub const LAN_LEAVE_REGOSSIP: Duration = Duration::from_millis(200);

/// Test profile: short enough that a failure is detected in ~1-2 s.
pub const FAST_PROBE_PERIOD: Duration = Duration::from_millis(200);
/// Test profile RTT: loopback is sub-millisecond, 100 ms absorbs CI load.
pub const FAST_PROBE_RTT: Duration = Duration::from_millis(100);
/// Test profile suspicion: 4 probe periods, like the LAN ratio.
pub const FAST_SUSPICION_BASE: Duration = Duration::from_millis(800);
/// Test profile gossip: 4x the probe rate, like the LAN ratio (5x).
pub const FAST_GOSSIP_INTERVAL: Duration = Duration::from_millis(50);
/// Test profile periodic announce.
pub const FAST_ANNOUNCE_INTERVAL: Duration = Duration::from_secs(1);
/// Test profile push-pull: a few per test, so divergence repair is
/// observable within a test's convergence bound.
pub const FAST_PUSH_PULL_INTERVAL: Duration = Duration::from_millis(500);
/// Test profile announce-to-down.
pub const FAST_ANNOUNCE_DOWN_INTERVAL: Duration = Duration::from_secs(1);
/// Test profile join wait (also how long a wrong-key join test waits).
pub const FAST_JOIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Test profile join retry.
pub const FAST_JOIN_RETRY: Duration = Duration::from_millis(200);
/// Test profile leave re-gossip spacing.
pub const FAST_LEAVE_REGOSSIP: Duration = Duration::from_millis(50);

/// Connecting to a peer for a push-pull (memberlist uses its 10 s
/// TCPTimeout for everything; a LAN connect takes well under a second, so
/// anything slower is a dead or overloaded peer).
pub const PUSH_PULL_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Waiting for one frame of a peer's state (at most 64 KiB: even a slow
/// LAN link delivers it in milliseconds).
pub const PUSH_PULL_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole exchange, connect to close (memberlist's TCPTimeout): bounds
/// what a slow or hostile peer can hold, whatever it does.
pub const PUSH_PULL_TIMEOUT: Duration = Duration::from_secs(10);
/// memberlist's pushPullScaleThreshold: above this many members the
/// push-pull interval grows, so total push-pull traffic stays flat.
pub const PUSH_PULL_SCALE_THRESHOLD: usize = 32;

/// memberlist's IndirectChecks: members asked to ping a silent target.
pub const INDIRECT_PROBES: usize = 3;
/// memberlist's GossipNodes: members each gossip round talks to.
pub const GOSSIP_FANOUT: usize = 3;
/// Members asked for more members per periodic announce: one is enough to
/// eventually discover everyone (foca's LAN default).
pub const ANNOUNCE_FANOUT: usize = 1;
/// Failed members knocked on per round (foca's LAN default): two gives a
/// healed partition two chances per interval to merge back.
pub const ANNOUNCE_DOWN_FANOUT: usize = 2;
/// memberlist's RetransmitMult: an update is sent mult x log10(n+1) times.
pub const RETRANSMIT_MULT: f64 = 4.0;
/// Floor for retransmissions: tiny clusters still get enough redundancy
/// to survive a lost datagram.
pub const MIN_TRANSMISSIONS: u8 = 4;

/// Timings of the SWIM protocol and of the worker's own retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// How often each member probes one other member.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// Suspicion timeout for clusters of <= 10 members; grows with log10(n).
    pub suspicion_base: Duration,
    /// How often pending updates are pushed to `gossip_fanout` members.
    pub gossip_interval: Duration,
    /// Members per gossip round.
    pub gossip_fanout: usize,
    /// How often we ask a random member for more members.
    pub announce_interval: Duration,
    /// How often we knock on failed members (partition healing).
    pub announce_down_interval: Duration,
    /// How often we exchange full state with one random alive member over
    /// TCP (memberlist's PushPullInterval; scaled up past 32 members).
    /// Zero disables the periodic exchange (joins still push-pull).
    pub push_pull_interval: Duration,
    /// How long `join` waits for answers.
    pub join_timeout: Duration,
    /// How often `join` re-announces to addresses that have not answered.
    pub join_retry: Duration,
    /// Spacing of extra gossip rounds during a graceful leave.
    pub leave_regossip: Duration,
}

impl Default for Profile {
    fn default() -> Self {
        Self::lan()
    }
}

impl Profile {
    /// Production LAN timings (memberlist's DefaultLANConfig): a dead member
    /// is declared failed within ~5-10 s in small clusters.
    pub fn lan() -> Self {
        Self {
            probe_period: LAN_PROBE_PERIOD,
            probe_rtt: LAN_PROBE_RTT,
            indirect_probes: INDIRECT_PROBES,
            suspicion_base: LAN_SUSPICION_BASE,
            gossip_interval: LAN_GOSSIP_INTERVAL,
            gossip_fanout: GOSSIP_FANOUT,
            announce_interval: LAN_ANNOUNCE_INTERVAL,
            announce_down_interval: LAN_ANNOUNCE_DOWN_INTERVAL,
            push_pull_interval: LAN_PUSH_PULL_INTERVAL,
            join_timeout: LAN_JOIN_TIMEOUT,
            join_retry: LAN_JOIN_RETRY,
            leave_regossip: LAN_LEAVE_REGOSSIP,
        }
    }

    /// WAN timings for the pool of servers across datacenters (memberlist's
    /// DefaultWANConfig: probe every 5 s with a 3 s timeout, gossip every 500 ms, suspicion
    /// six probe periods, push-pull every 60 s).
    pub fn wan() -> Self {
        Self {
            probe_period: Duration::from_secs(5),
            probe_rtt: Duration::from_secs(3),
            suspicion_base: Duration::from_secs(30),
            gossip_interval: Duration::from_millis(500),
            push_pull_interval: Duration::from_secs(60),
            join_timeout: Duration::from_secs(10),
            ..Self::lan()
        }
    }

    /// Loopback test timings: same ratios as `lan()`, 5x faster.
    pub fn fast() -> Self {
        Self {
            probe_period: FAST_PROBE_PERIOD,
            probe_rtt: FAST_PROBE_RTT,
            indirect_probes: INDIRECT_PROBES,
            suspicion_base: FAST_SUSPICION_BASE,
            gossip_interval: FAST_GOSSIP_INTERVAL,
            gossip_fanout: GOSSIP_FANOUT,
            announce_interval: FAST_ANNOUNCE_INTERVAL,
            announce_down_interval: FAST_ANNOUNCE_DOWN_INTERVAL,
            push_pull_interval: FAST_PUSH_PULL_INTERVAL,
            join_timeout: FAST_JOIN_TIMEOUT,
            join_retry: FAST_JOIN_RETRY,
            leave_regossip: FAST_LEAVE_REGOSSIP,
        }
    }

    /// Suspicion timeout for a cluster of `cluster_size` members
    /// (memberlist: mult x max(1, log10 n) x probe interval).
    pub fn suspicion_timeout(&self, cluster_size: usize) -> Duration {
        let scale = (cluster_size.max(1) as f64).log10().max(1.0);
        self.suspicion_base.mul_f64(scale)
    }

    /// How many times each update is retransmitted for `cluster_size` members.
    pub fn max_transmissions(&self, cluster_size: usize) -> NonZeroU8 {
        let wanted = (RETRANSMIT_MULT * ((cluster_size as f64) + 1.0).log10()).ceil();
        let clamped = wanted.clamp(f64::from(MIN_TRANSMISSIONS), f64::from(u8::MAX)) as u8;
        NonZeroU8::new(clamped).unwrap_or(NonZeroU8::MIN)
    }

    /// Push-pull interval for `cluster_size` members (memberlist's
    /// pushPullScale): unchanged up to 32 members, then one more interval
    /// per doubling, so the cluster-wide exchange rate stays bounded.
    /// `None` when periodic push-pull is disabled.
    pub fn push_pull_interval_for(&self, cluster_size: usize) -> Option<Duration> {
        if self.push_pull_interval.is_zero() {
            return None;
        }
        if cluster_size <= PUSH_PULL_SCALE_THRESHOLD {
            return Some(self.push_pull_interval);
        }
        let multiplier = ((cluster_size as f64).log2() - (PUSH_PULL_SCALE_THRESHOLD as f64).log2()).ceil() + 1.0;
        Some(self.push_pull_interval.mul_f64(multiplier))
    }

    /// Conservative upper bound for "a member stopped answering" until
    /// "every live member sees it failed", for `cluster_size` members:
    ///
    /// * `3 + log2 n` probe periods until some live member probes it and
    ///   foca turns the failed probe into a suspicion (round-robin probing
    ///   over a shuffled list: at most 3 periods for n = 3, and with n-1
    ///   probers each picking a target per period the wait shrinks with n;
    ///   the log term is slack for the shuffle),
    /// * one probe RTT for the indirect round,
    /// * the scaled suspicion timeout,
    /// * `1 + log2 n` gossip rounds to disseminate the verdict.
    pub fn failure_detection_bound(&self, cluster_size: usize) -> Duration {
        let log2n = (cluster_size.max(2) as f64).log2();
        self.probe_period.mul_f64(3.0 + log2n)
            + self.probe_rtt
            + self.suspicion_timeout(cluster_size)
            + self.gossip_interval.mul_f64(1.0 + log2n.ceil())
    }

    /// The foca configuration for this profile at a given cluster size.
    /// `remove_down_after` is how long failed/left members are remembered.
    pub fn foca_config(&self, cluster_size: usize, remove_down_after: Option<Duration>) -> foca::Config {
        let nz = |n: usize| NonZeroUsize::new(n.max(1)).unwrap_or(NonZeroUsize::MIN);
        let mut config = foca::Config::simple();
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes = nz(self.indirect_probes);
        config.max_transmissions = self.max_transmissions(cluster_size);
        config.suspect_to_down_after = self.suspicion_timeout(cluster_size);
        config.remove_down_after = remove_down_after;
        config.max_packet_size = nz(FOCA_MAX_PACKET_BYTES);
        // Lets a member wrongly declared down learn it and rejoin with a
        // renewed identity instead of staying invisible until reaped.
        config.notify_down_members = true;
        config.periodic_announce = Some(foca::PeriodicParams { frequency: self.announce_interval, num_members: nz(ANNOUNCE_FANOUT) });
        config.periodic_announce_to_down_members =
            Some(foca::PeriodicParams { frequency: self.announce_down_interval, num_members: nz(ANNOUNCE_DOWN_FANOUT) });
        config.periodic_gossip = Some(foca::PeriodicParams { frequency: self.gossip_interval, num_members: nz(self.gossip_fanout) });
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_profile_declares_a_small_cluster_failure_within_ten_seconds() {
        let lan = Profile::lan();
        assert_eq!(lan.suspicion_timeout(3), Duration::from_secs(4));
        let bound = lan.failure_detection_bound(3);
        assert!(bound >= Duration::from_secs(5) && bound <= Duration::from_secs(10));
    }

    #[test]
    fn retransmissions_and_suspicion_grow_slowly_with_cluster_size() {
        let lan = Profile::lan();
        assert_eq!(lan.max_transmissions(3).get(), MIN_TRANSMISSIONS);
        assert_eq!(lan.max_transmissions(1000).get(), 13);
        assert_eq!(lan.suspicion_timeout(100), Duration::from_secs(8));
        assert!(lan.suspicion_timeout(1000) > lan.suspicion_timeout(100));
    }

    #[test]
    fn push_pull_interval_scales_like_memberlist_and_zero_disables_it() {
        let lan = Profile::lan();
        assert_eq!(lan.push_pull_interval_for(3), Some(Duration::from_secs(30)));
        assert_eq!(lan.push_pull_interval_for(32), Some(Duration::from_secs(30)));
        assert_eq!(lan.push_pull_interval_for(33), Some(Duration::from_secs(60)));
        assert_eq!(lan.push_pull_interval_for(64), Some(Duration::from_secs(60)));
        assert_eq!(lan.push_pull_interval_for(1000), Some(Duration::from_secs(30 * 6)));
        let off = Profile { push_pull_interval: Duration::ZERO, ..Profile::fast() };
        assert_eq!(off.push_pull_interval_for(3), None);
        assert!(Profile::fast().push_pull_interval < lan.push_pull_interval);
    }

    #[test]
    fn foca_packets_plus_encryption_fit_the_datagram_budget() {
        let cfg = Profile::fast().foca_config(3, None);
        assert_eq!(cfg.max_packet_size.get() + ENCRYPTION_OVERHEAD, MAX_DATAGRAM_BYTES);
    }
}
