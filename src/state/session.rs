//! Sessions: creation against the node's checks, and invalidation that releases or deletes the
//! locks a session held and starts their lock delay.

use super::{CheckStatus, KvEntry, Outcome, RaftIndex, Session, SessionBehavior, StateData, Store, Str, Table};

impl Store {
    pub(super) fn session_create(&mut self, index: RaftIndex, s: &Session) -> Outcome {
        if s.id.is_empty() {
            return Outcome::Rejected("Must provide session ID".into());
        }
        if self.data.sessions.contains_key(&s.id) {
            return Outcome::Rejected(format!("Session {:?} already exists", s.id));
        }
        if !self.data.nodes.contains_key(s.node.as_str()) {
            return Outcome::Rejected(format!("Missing node registration for {:?}", s.node));
        }
        let service_check_ids = s.service_checks.iter().map(|c| &c.id);
        for check in s.node_checks.iter().chain(service_check_ids) {
            match self.data.checks.get(&(Str::from(&s.node), Str::from(check))) {
                None => return Outcome::Rejected(format!("Missing check '{check}' registration")),
                Some(c) if c.status == CheckStatus::Critical => {
                    return Outcome::Rejected(format!("Check '{check}' is in critical state"));
                }
                Some(_) => {}
            }
        }
        let mut s = s.clone();
        s.create_index = index;
        s.modify_index = index;
        self.data.sessions.insert(s.id.clone(), s);
        self.touch(Table::Sessions);
        Outcome::Done
    }

    /// Remove a session; the keys it locked are released or deleted per its behaviour and may
    /// not be re-acquired until its lock delay has passed.
    pub(super) fn session_destroy(&mut self, index: RaftIndex, now_ms: u64, id: &str) {
        let Some(s) = self.data.sessions.remove(id) else {
            return;
        };
        self.touch(Table::Sessions);
        self.queries_of_session_gone(id);
        let held: Vec<String> = self.data.kv.values().filter(|e| e.session == id).map(|e| e.key.clone()).collect();
        if held.is_empty() {
            return;
        }
        let delay_ms = s.lock_delay / 1_000_000;
        for key in held {
            self.pending.kv_keys.insert(key.clone());
            if delay_ms > 0 {
                self.data.lock_delays.insert(key.clone(), now_ms.saturating_add(delay_ms));
            }
            match s.behavior {
                SessionBehavior::Release => {
                    if let Some(e) = self.data.kv.get_mut(&key) {
                        *e = KvEntry { session: String::new(), modify_index: index, ..e.clone() };
                    }
                }
                SessionBehavior::Delete => {
                    self.data.kv.remove(&key);
                    self.data.kv_tombstones.insert(key, index);
                }
            }
        }
        // Expired delays are dropped here, where time already flows through the log.
        self.data.lock_delays.retain(|_, until| *until > now_ms);
        self.touch(Table::Kv);
    }
}

impl StateData {
    pub fn session_get(&self, id: &str) -> (Option<Session>, RaftIndex) {
        (self.sessions.get(id).cloned(), self.index_of(&[Table::Sessions]))
    }

    pub fn session_list(&self, node: Option<&str>) -> (Vec<Session>, RaftIndex) {
        let list = self.sessions.values().filter(|s| node.is_none_or(|n| s.node == n)).cloned().collect();
        (list, self.index_of(&[Table::Sessions]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::catalog::tests::web_registration;
    use super::super::tests::req;
    use super::super::{Command, HealthCheck, KvVerb, TxnOp};
    use super::*;

    fn store_with_node() -> Store {
        let mut s = Store::new();
        let mut r = web_registration("n1", "10.0.0.1");
        r.checks.push(HealthCheck { check_id: "serfHealth".into(), status: CheckStatus::Passing, ..Default::default() });
        s.apply(1, &req(Command::Register(r)));
        s
    }

    fn session(id: &str, behavior: SessionBehavior) -> Session {
        Session {
            id: id.into(),
            node: "n1".into(),
            node_checks: vec!["serfHealth".into()],
            behavior,
            lock_delay: 15_000_000_000,
            ..Default::default()
        }
    }

    fn acquire(key: &str, session: &str) -> Command {
        Command::Txn(vec![TxnOp { verb: KvVerb::Lock, key: key.into(), value: None, flags: 0, index: 0, session: session.into() }])
    }

    #[test]
    fn session_on_unknown_node_is_rejected() {
        let mut s = Store::new();
        assert!(matches!(s.apply(1, &req(Command::SessionCreate(session("a", SessionBehavior::Release)))), Outcome::Rejected(_)));
    }

    #[test]
    fn destroying_a_release_session_unlocks_its_keys_and_starts_lock_delay() {
        let mut s = store_with_node();
        s.apply(2, &req(Command::SessionCreate(session("a", SessionBehavior::Release))));
        s.apply(3, &req(acquire("lock", "a")));
        s.apply(4, &req(Command::SessionDestroy { id: "a".into() }));
        assert_eq!(s.data().kv["lock"].session, "");
        s.apply(5, &req(Command::SessionCreate(session("b", SessionBehavior::Release))));
        assert!(matches!(s.apply(6, &req(acquire("lock", "b"))), Outcome::Txn(Err(_))));
        let later = super::super::Request { now_ms: 1_000_000 + 15_001, command: acquire("lock", "b") };
        assert!(matches!(s.apply(7, &later), Outcome::Txn(Ok(_))));
    }

    #[test]
    fn delete_behavior_removes_held_keys() {
        let mut s = store_with_node();
        s.apply(2, &req(Command::SessionCreate(session("a", SessionBehavior::Delete))));
        s.apply(3, &req(acquire("lock", "a")));
        s.apply(4, &req(Command::SessionDestroy { id: "a".into() }));
        assert!(!s.data().kv.contains_key("lock"));
    }

    #[test]
    fn critical_node_check_invalidates_session() {
        let mut s = store_with_node();
        s.apply(2, &req(Command::SessionCreate(session("a", SessionBehavior::Release))));
        let mut r = web_registration("n1", "10.0.0.1");
        r.checks = vec![HealthCheck { check_id: "serfHealth".into(), status: CheckStatus::Critical, ..Default::default() }];
        s.apply(3, &req(Command::Register(r)));
        assert!(s.data().sessions.is_empty());
    }
}
