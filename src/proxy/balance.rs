//! Endpoints of an upstream and the choice among them, by the resolver's `LoadBalancer`
//! policy (round robin by default, random, least request, ring hash and maglev on a request
//! hash), skipping instances that failed several connects in a row (outlier ejection) until
//! their ejection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

/// Connect failures in a row that eject an endpoint.
pub const EJECT_AFTER_FAILURES: u32 = 3;
/// How long an ejected endpoint is skipped (doubling for repeat offenders, up to the max).
const EJECT_BASE: Duration = Duration::from_secs(10);
const EJECT_MAX: Duration = Duration::from_secs(300);

/// One instance an upstream may be reached at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The service whose identity it presents (a sidecar presents its destination's).
    pub service: String,
    pub datacenter: String,
    /// The node, for logs.
    pub node: String,
}

/// Endpoints from a `/v1/health/connect/<service>` answer.
pub fn endpoints_from_health(v: &Value) -> Vec<Endpoint> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let svc = &e["Service"];
            let node = &e["Node"];
            let addr = svc["Address"].as_str().filter(|a| !a.is_empty()).or_else(|| node["Address"].as_str())?;
            let port = svc["Port"].as_u64().filter(|p| *p > 0 && *p <= 65535)? as u16;
            let ip: std::net::IpAddr = addr.parse().ok()?;
            let service = svc["Proxy"]["DestinationServiceName"].as_str().filter(|s| !s.is_empty()).or_else(|| svc["Service"].as_str())?.to_string();
            Some(Endpoint {
                addr: SocketAddr::new(ip, port),
                service,
                datacenter: node["Datacenter"].as_str().unwrap_or_default().to_string(),
                node: node["Node"].as_str().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

#[derive(Debug, Default, Clone)]
struct Health {
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Requests in flight to it (for least request); shared with the guards handed out.
    active: Arc<AtomicUsize>,
}

/// How one endpoint is chosen among the healthy ones: a resolver's `LoadBalancer.Policy`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Policy {
    #[default]
    RoundRobin,
    Random,
    /// The least busy of `choices` endpoints drawn at random (power of two choices).
    LeastRequest {
        choices: usize,
    },
    /// A consistent-hash ring with at least `min` and at most `max` points.
    RingHash {
        min: usize,
        max: usize,
    },
    /// Maglev's lookup table (65,537 entries): consistent, and evener than a ring.
    Maglev,
}

impl Policy {
    fn hashed(&self) -> bool {
        matches!(self, Policy::RingHash { .. } | Policy::Maglev)
    }
}

/// What a request is hashed on (`LoadBalancer.HashPolicies[]`), in order.
#[derive(Debug, Clone, PartialEq)]
pub enum HashOn {
    Header(String),
    Query(String),
    /// A cookie; with `generate`, one is set on the response when the request had none, so
    /// that the client sticks to the endpoint from its next request on.
    Cookie {
        name: String,
        generate: Option<CookieSpec>,
    },
    SourceIp,
}

/// A cookie the proxy sets: its lifetime (none: a session cookie) and path.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieSpec {
    pub ttl: Option<Duration>,
    pub path: String,
}

/// A resolver's load-balancing configuration, as the compiled chain carries it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadBalancing {
    pub policy: Policy,
    /// (what, terminal): a terminal policy that produced a hash ends the list.
    pub hash: Vec<(HashOn, bool)>,
}

impl LoadBalancing {
    /// From a chain node's `LoadBalancer` object (already validated by the config entry).
    pub fn parse(v: &Value) -> LoadBalancing {
        let usize_of = |v: &Value, d: usize| v.as_u64().filter(|n| *n > 0).map(|n| n as usize).unwrap_or(d);
        let policy = match v["Policy"].as_str().unwrap_or_default() {
            "random" => Policy::Random,
            "least_request" => Policy::LeastRequest { choices: usize_of(&v["LeastRequestConfig"]["ChoiceCount"], 2).max(1) },
            "ring_hash" => {
                let min = usize_of(&v["RingHashConfig"]["MinimumRingSize"], 1024).min(RING_MAX);
                Policy::RingHash { min, max: usize_of(&v["RingHashConfig"]["MaximumRingSize"], RING_MAX).clamp(min, RING_MAX) }
            }
            "maglev" => Policy::Maglev,
            _ => Policy::RoundRobin,
        };
        let hash = v["HashPolicies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                let value = h["FieldValue"].as_str().unwrap_or_default().to_string();
                let on = if h["SourceIP"].as_bool().unwrap_or(false) {
                    HashOn::SourceIp
                } else {
                    match h["Field"].as_str()? {
                        "header" => HashOn::Header(value.to_ascii_lowercase()),
                        "query_parameter" => HashOn::Query(value),
                        "cookie" => {
                            let c = &h["CookieConfig"];
                            let ttl = match &c["TTL"] {
                                Value::Number(n) => n.as_u64().filter(|n| *n > 0).map(Duration::from_nanos),
                                Value::String(s) => crate::duration::parse(s).filter(|d| !d.is_zero()),
                                _ => None,
                            };
                            let session = c["Session"].as_bool().unwrap_or(false);
                            let path = c["Path"].as_str().unwrap_or_default().to_string();
                            HashOn::Cookie { name: value, generate: (session || ttl.is_some()).then_some(CookieSpec { ttl, path }) }
                        }
                        _ => return None,
                    }
                };
                Some((on, h["Terminal"].as_bool().unwrap_or(false)))
            })
            .collect();
        LoadBalancing { policy, hash }
    }
}

/// The most points a hash ring may have (Envoy's default maximum).
const RING_MAX: usize = 8 * 1024 * 1024;
/// Maglev's table size: a prime, as the algorithm needs.
const MAGLEV_SIZE: usize = 65_537;

/// A stable 64-bit hash (FNV-1a, then a splitmix64 finaliser for the avalanche): the same on
/// every sidecar, so that every caller maps a key to the same endpoint.
pub fn hash64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A lookup structure from a hash to an endpoint index, built when the endpoints or the
/// policy change.
#[derive(Debug, Default)]
enum Lookup {
    #[default]
    None,
    /// Sorted (point, endpoint index).
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

fn build_lookup(policy: &Policy, endpoints: &[(Endpoint, Health)]) -> Lookup {
    let n = endpoints.len();
    if n == 0 {
        return Lookup::None;
    }
    let key = |e: &Endpoint| e.addr.to_string();
    match policy {
        Policy::RingHash { min, max } => {
            // Each endpoint gets the same number of points: enough for `min` in all, at most `max`.
            let per = min.div_ceil(n).max(1).min((max / n).max(1));
            let mut ring: Vec<(u64, u32)> = Vec::with_capacity(per * n);
            for (i, (e, _)) in endpoints.iter().enumerate() {
                let k = key(e);
                for r in 0..per {
                    ring.push((hash64(&[k.as_bytes(), &(r as u64).to_le_bytes()]), i as u32));
                }
            }
            ring.sort_unstable();
            Lookup::Ring(ring)
        }
        Policy::Maglev => {
            let m = MAGLEV_SIZE as u64;
            let perms: Vec<(u64, u64)> = endpoints
                .iter()
                .map(|(e, _)| {
                    let k = key(e);
                    (hash64(&[k.as_bytes(), b"offset"]) % m, hash64(&[k.as_bytes(), b"skip"]) % (m - 1) + 1)
                })
                .collect();
            let mut next = vec![0u64; n];
            let mut table = vec![u32::MAX; MAGLEV_SIZE];
            let mut filled = 0;
            'fill: loop {
                for (i, (offset, skip)) in perms.iter().enumerate() {
                    let mut c = (offset + next[i] * skip) % m;
                    while table[c as usize] != u32::MAX {
                        next[i] += 1;
                        c = (offset + next[i] * skip) % m;
                    }
                    table[c as usize] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == MAGLEV_SIZE {
                        break 'fill;
                    }
                }
            }
            Lookup::Maglev(table)
        }
        _ => Lookup::None,
    }
}

/// Counts a request in flight to an endpoint until dropped (least request).
pub struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct State {
    endpoints: Vec<(Endpoint, Health)>,
    policy: Policy,
    lookup: Lookup,
}

/// The current endpoints of one upstream and what the proxy learned about each.
#[derive(Default)]
pub struct Balancer {
    state: Mutex<State>,
    next: AtomicUsize,
}

impl Balancer {
    /// Replace the endpoint set (from the catalog), keeping what is known of those that stay.
    pub fn set(&self, list: Vec<Endpoint>) {
        let mut st = self.state.lock();
        let old = std::mem::take(&mut st.endpoints);
        st.endpoints = list
            .into_iter()
            .map(|e| {
                let h = old.iter().find(|(o, _)| *o == e).map(|(_, h)| h.clone()).unwrap_or_default();
                (e, h)
            })
            .collect();
        st.lookup = build_lookup(&st.policy, &st.endpoints);
    }

    /// Change how endpoints are chosen (a new discovery chain).
    pub fn set_policy(&self, policy: Policy) {
        let mut st = self.state.lock();
        if st.policy != policy {
            st.lookup = build_lookup(&policy, &st.endpoints);
            st.policy = policy;
        }
    }

    /// Count a request in flight to `e` until the guard is dropped (only least request looks
    /// at the counts; other policies get no guard).
    pub fn active(&self, e: &Endpoint) -> Option<Active> {
        let st = self.state.lock();
        if !matches!(st.policy, Policy::LeastRequest { .. }) {
            return None;
        }
        let (_, h) = st.endpoints.iter().find(|(x, _)| x == e)?;
        h.active.fetch_add(1, Ordering::Relaxed);
        Some(Active(h.active.clone()))
    }

    pub fn len(&self) -> usize {
        self.state.lock().endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `n` endpoints to try, in order: the next ones in the rotation that are not
    /// ejected; if every endpoint is ejected, all of them (better a likely failure than none).
    pub fn pick(&self, n: usize) -> Vec<Endpoint> {
        self.pick_for(n, None)
    }

    /// Up to `n` endpoints to try, in order, by the policy: the first is the policy's choice
    /// (for a hash policy, the endpoint `hash` maps to; random without a hash), the rest the
    /// next ones after it. Ejected endpoints are left out unless all are.
    pub fn pick_for(&self, n: usize, hash: Option<u64>) -> Vec<Endpoint> {
        let st = self.state.lock();
        let list = &st.endpoints;
        if list.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let up = |i: usize| list[i].1.ejected_until.is_none_or(|t| t <= now);
        let len = list.len();
        let random = || rand::random::<u64>() as usize % len;
        let start = match (&st.policy, &st.lookup, hash) {
            (Policy::LeastRequest { choices }, _, _) => {
                let healthy: Vec<usize> = (0..len).filter(|i| up(*i)).collect();
                if healthy.is_empty() {
                    random()
                } else {
                    (0..*choices)
                        .map(|_| healthy[rand::random::<u64>() as usize % healthy.len()])
                        .min_by_key(|i| list[*i].1.active.load(Ordering::Relaxed))
                        .unwrap_or(healthy[0])
                }
            }
            (_, Lookup::Ring(ring), Some(h)) => {
                let at = ring.partition_point(|(p, _)| *p < h);
                // The first endpoint at or after the hash on the ring that is up.
                ring.iter().cycle().skip(at).take(ring.len()).map(|(_, i)| *i as usize).find(|i| up(*i)).unwrap_or(ring[at % ring.len()].1 as usize)
            }
            (_, Lookup::Maglev(table), Some(h)) => {
                let first = table[(h % MAGLEV_SIZE as u64) as usize] as usize;
                if up(first) {
                    first
                } else {
                    // Maglev's fallback: rehash until an endpoint that is up (bounded).
                    (1..=8u64)
                        .map(|k| table[(hash64(&[&h.to_le_bytes(), &k.to_le_bytes()]) % MAGLEV_SIZE as u64) as usize] as usize)
                        .find(|i| up(*i))
                        .unwrap_or(first)
                }
            }
            (p, _, _) if p.hashed() || *p == Policy::Random => random(),
            _ => self.next.fetch_add(1, Ordering::Relaxed),
        };
        let order = (0..len).map(|i| (start + i) % len);
        let healthy: Vec<Endpoint> = order.clone().filter(|i| up(*i)).map(|i| list[i].0.clone()).take(n).collect();
        if healthy.is_empty() { order.map(|i| list[i].0.clone()).take(n).collect() } else { healthy }
    }

    pub fn success(&self, e: &Endpoint) {
        if let Some((_, h)) = self.state.lock().endpoints.iter_mut().find(|(x, _)| x == e) {
            h.failures = 0;
            h.ejected_until = None;
        }
    }

    /// Count a failed connect; returns true when it ejected the endpoint.
    pub fn failure(&self, e: &Endpoint) -> bool {
        let mut st = self.state.lock();
        let Some((_, h)) = st.endpoints.iter_mut().find(|(x, _)| x == e) else { return false };
        h.failures += 1;
        if h.failures >= EJECT_AFTER_FAILURES && h.ejected_until.is_none_or(|t| t <= Instant::now()) {
            let d = EJECT_BASE.saturating_mul(1 << h.ejections.min(5)).min(EJECT_MAX);
            h.ejections += 1;
            h.ejected_until = Some(Instant::now() + d);
            h.failures = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint { addr: SocketAddr::from(([127, 0, 0, 1], port)), service: "db".into(), datacenter: "dc1".into(), node: "n".into() }
    }

    #[test]
    fn round_robin_skips_ejected_endpoints_until_all_are() {
        let b = Balancer::default();
        b.set(vec![ep(1), ep(2), ep(3)]);
        let firsts: Vec<u16> = (0..3).map(|_| b.pick(1)[0].addr.port()).collect();
        assert_eq!(firsts.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "{firsts:?}");
        for _ in 0..EJECT_AFTER_FAILURES - 1 {
            assert!(!b.failure(&ep(2)));
        }
        assert!(b.failure(&ep(2)));
        for _ in 0..10 {
            assert!(b.pick(3).iter().all(|e| e.addr.port() != 2));
        }
        // A new catalog answer keeps what was learned about endpoints that stay.
        b.set(vec![ep(2), ep(3)]);
        assert!(b.pick(2).iter().all(|e| e.addr.port() == 3));
        for _ in 0..EJECT_AFTER_FAILURES {
            b.failure(&ep(3));
        }
        assert_eq!(b.pick(2).len(), 2, "with everything ejected, try anyway");
    }

    fn owners(b: &Balancer, keys: u64) -> Vec<u16> {
        (0..keys).map(|k| b.pick_for(1, Some(hash64(&[&k.to_le_bytes()])))[0].addr.port()).collect()
    }

    #[test]
    fn hash_policies_are_consistent_and_move_few_keys_when_an_endpoint_goes() {
        for policy in [Policy::RingHash { min: 1024, max: RING_MAX }, Policy::Maglev] {
            let b = Balancer::default();
            b.set_policy(policy.clone());
            b.set((1..=4).map(ep).collect());
            let before = owners(&b, 4000);
            assert_eq!(before, owners(&b, 4000), "{policy:?}: the same key maps to the same endpoint");
            // Evenness: each endpoint owns a fair share (25 % ± 10 points).
            for p in 1..=4 {
                let n = before.iter().filter(|x| **x == p).count();
                assert!((600..=1400).contains(&n), "{policy:?}: endpoint {p} owns {n} of 4000 keys");
            }
            // Endpoint 4 leaves: its keys move, few others do.
            b.set((1..=3).map(ep).collect());
            let after = owners(&b, 4000);
            let moved = before.iter().zip(&after).filter(|(x, y)| **x != 4 && x != y).count();
            assert!(moved < 400, "{policy:?}: {moved} keys of staying endpoints moved");
            assert!(after.iter().all(|p| *p != 4));
            // An ejected endpoint's keys go elsewhere while it is out.
            for _ in 0..EJECT_AFTER_FAILURES {
                b.failure(&ep(1));
            }
            assert!(owners(&b, 1000).iter().all(|p| *p != 1), "{policy:?}");
        }
    }

    #[test]
    fn least_request_prefers_idle_endpoints() {
        let b = Balancer::default();
        b.set_policy(Policy::LeastRequest { choices: 2 });
        b.set(vec![ep(1), ep(2)]);
        let busy: Vec<Active> = (0..5).map(|_| b.active(&ep(1)).unwrap()).collect();
        // Two random draws among two endpoints: both are endpoint 1 a quarter of the time.
        let to_idle = (0..400).filter(|_| b.pick_for(1, None)[0].addr.port() == 2).count();
        assert!(to_idle > 250, "{to_idle} of 400 picks went to the idle endpoint");
        drop(busy);
        let spread: std::collections::BTreeSet<u16> = (0..50).map(|_| b.pick_for(1, None)[0].addr.port()).collect();
        assert_eq!(spread.len(), 2);
    }

    #[test]
    fn load_balancer_config_is_read_from_the_chain() {
        let lb = LoadBalancing::parse(&serde_json::json!({
            "Policy": "ring_hash", "RingHashConfig": {"MinimumRingSize": 16, "MaximumRingSize": 64},
            "HashPolicies": [
                {"Field": "header", "FieldValue": "X-User", "Terminal": true},
                {"Field": "cookie", "FieldValue": "s", "CookieConfig": {"TTL": 30_000_000_000u64, "Path": "/"}},
                {"SourceIP": true}
            ]
        }));
        assert_eq!(lb.policy, Policy::RingHash { min: 16, max: 64 });
        assert_eq!(lb.hash[0], (HashOn::Header("x-user".into()), true));
        assert_eq!(
            lb.hash[1],
            (HashOn::Cookie { name: "s".into(), generate: Some(CookieSpec { ttl: Some(Duration::from_secs(30)), path: "/".into() }) }, false)
        );
        assert_eq!(lb.hash[2], (HashOn::SourceIp, false));
        assert_eq!(LoadBalancing::parse(&serde_json::json!({"Policy": "least_request"})).policy, Policy::LeastRequest { choices: 2 });
        assert_eq!(LoadBalancing::parse(&serde_json::Value::Null), LoadBalancing::default());
    }

    #[test]
    fn endpoints_come_from_health_answers() {
        let v = serde_json::json!([
            {"Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
             "Service": {"Service": "db-sidecar-proxy", "Port": 21000, "Address": "", "Proxy": {"DestinationServiceName": "db"}}},
            {"Node": {"Node": "n2", "Address": "10.0.0.2", "Datacenter": "dc1"},
             "Service": {"Service": "db", "Port": 9000, "Address": "10.9.9.9", "Proxy": {"DestinationServiceName": ""}}},
        ]);
        let e = endpoints_from_health(&v);
        assert_eq!(e[0].addr, "10.0.0.1:21000".parse().unwrap());
        assert_eq!(e[0].service, "db");
        assert_eq!((e[1].addr, e[1].service.as_str()), ("10.9.9.9:9000".parse().unwrap(), "db"));
    }
}
