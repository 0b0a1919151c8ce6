//! Endpoints of an upstream and the choice among them: round robin over the healthy ones,
//! skipping instances that failed several connects in a row (outlier ejection) until their
//! ejection ends.

use std::net::SocketAddr;
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
}

/// The current endpoints of one upstream and what the proxy learned about each.
#[derive(Default)]
pub struct Balancer {
    endpoints: Mutex<Vec<(Endpoint, Health)>>,
    next: AtomicUsize,
}

impl Balancer {
    /// Replace the endpoint set (from the catalog), keeping what is known of those that stay.
    pub fn set(&self, list: Vec<Endpoint>) {
        let mut cur = self.endpoints.lock();
        let old = std::mem::take(&mut *cur);
        *cur = list
            .into_iter()
            .map(|e| {
                let h = old.iter().find(|(o, _)| *o == e).map(|(_, h)| h.clone()).unwrap_or_default();
                (e, h)
            })
            .collect();
    }

    pub fn len(&self) -> usize {
        self.endpoints.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `n` endpoints to try, in order: the next ones in the rotation that are not
    /// ejected; if every endpoint is ejected, all of them (better a likely failure than none).
    pub fn pick(&self, n: usize) -> Vec<Endpoint> {
        let list = self.endpoints.lock();
        if list.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..list.len()).map(|i| &list[(start + i) % list.len()]);
        let healthy: Vec<Endpoint> =
            order.clone().filter(|(_, h)| h.ejected_until.is_none_or(|t| t <= now)).map(|(e, _)| e.clone()).take(n).collect();
        if healthy.is_empty() { order.map(|(e, _)| e.clone()).take(n).collect() } else { healthy }
    }

    pub fn success(&self, e: &Endpoint) {
        if let Some((_, h)) = self.endpoints.lock().iter_mut().find(|(x, _)| x == e) {
            h.failures = 0;
            h.ejected_until = None;
        }
    }

    /// Count a failed connect; returns true when it ejected the endpoint.
    pub fn failure(&self, e: &Endpoint) -> bool {
        let mut list = self.endpoints.lock();
        let Some((_, h)) = list.iter_mut().find(|(x, _)| x == e) else { return false };
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
