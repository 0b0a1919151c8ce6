//! The leader's session TTL timers. TTLs are leader-local, as in Consul: renewals reset a timer
//! on the leader without a Raft write, and a new leader grants every session a fresh full
//! period. The leader worker (`agent/leader.rs`) destroys expired sessions through Raft; the
//! HTTP API renews them.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A session lives this many TTLs past its last renewal, as Consul grants.
pub const TTL_GRACE_MULTIPLIER: u32 = 2;

/// Leader-local expiry deadlines of sessions with a TTL.
#[derive(Clone, Default)]
pub struct SessionTimers {
    deadlines: Arc<Mutex<HashMap<String, Instant>>>,
}

fn grace(ttl: Duration) -> Duration {
    ttl.saturating_mul(TTL_GRACE_MULTIPLIER)
}

impl SessionTimers {
    pub fn renew(&self, id: &str, ttl: Duration) {
        let deadline = Instant::now().checked_add(grace(ttl));
        let mut d = self.deadlines.lock();
        match deadline {
            Some(t) => d.insert(id.to_string(), t),
            None => d.remove(id),
        };
    }

    /// Forget every deadline (on losing or gaining leadership).
    pub fn clear(&self) {
        self.deadlines.lock().clear();
    }

    /// Given the sessions that exist with their TTLs, start timers for new ones, drop timers of
    /// gone ones, and return the ids whose time is up.
    pub fn expired(&self, live: &[(String, Duration)]) -> Vec<String> {
        let now = Instant::now();
        let mut d = self.deadlines.lock();
        d.retain(|id, _| live.iter().any(|(l, _)| l == id));
        let mut out = Vec::new();
        for (id, ttl) in live {
            let Some(fresh) = now.checked_add(grace(*ttl)) else { continue };
            let deadline = *d.entry(id.clone()).or_insert(fresh);
            if deadline <= now {
                out.push(id.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_expire_only_after_the_grace_period() {
        let t = SessionTimers::default();
        let live = vec![("a".to_string(), Duration::from_secs(10))];
        assert!(t.expired(&live).is_empty());
        t.deadlines.lock().insert("a".into(), Instant::now() - Duration::from_millis(1));
        assert_eq!(t.expired(&live), vec!["a"]);
        assert!(t.expired(&[]).is_empty());
    }
}
