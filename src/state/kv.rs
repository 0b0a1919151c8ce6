//! The KV table: transactions of KV verbs applied all-or-nothing, and prefix/key reads.

use std::collections::BTreeMap;

use super::{KvEntry, KvVerb, Outcome, RaftIndex, StateData, Store, Table, TxnError, TxnOp};

/// Pending changes of a transaction over the committed table: reads see the changes first.
struct Overlay<'a> {
    base: &'a imbl::OrdMap<String, KvEntry>,
    changes: BTreeMap<String, Option<KvEntry>>,
}

impl<'a> Overlay<'a> {
    fn get(&self, key: &str) -> Option<&KvEntry> {
        match self.changes.get(key) {
            Some(c) => c.as_ref(),
            None => self.base.get(key),
        }
    }

    fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .base
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .filter(|k| !matches!(self.changes.get(k), Some(None)))
            .collect();
        for (k, v) in self.changes.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
            if v.is_some() && !self.base.contains_key(k) {
                keys.push(k.clone());
            }
        }
        keys.sort();
        keys
    }
}

fn conflict(op_index: usize, what: String) -> TxnError {
    TxnError { op_index, what, conflict: true }
}

fn invalid(op_index: usize, what: String) -> TxnError {
    TxnError { op_index, what, conflict: false }
}

impl Store {
    /// Apply KV ops atomically: either every op succeeds and all writes land at `index`, or
    /// nothing changes and the failed ops are reported.
    pub(super) fn txn(&mut self, index: RaftIndex, now_ms: u64, ops: &[TxnOp]) -> Outcome {
        let mut ov = Overlay { base: &self.data.kv, changes: BTreeMap::new() };
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let existing = ov.get(&op.key).cloned();
            let write = |value: Option<Vec<u8>>, session: String, lock_index: u64| KvEntry {
                key: op.key.clone(),
                value,
                flags: op.flags,
                lock_index,
                session,
                create_index: existing.as_ref().map(|e| e.create_index).unwrap_or(index),
                modify_index: index,
            };
            let mut out: Option<KvEntry> = None;
            match op.verb {
                KvVerb::Set => {
                    let e = existing.as_ref();
                    out = Some(write(op.value.clone(), e.map(|e| e.session.clone()).unwrap_or_default(), e.map(|e| e.lock_index).unwrap_or(0)));
                }
                KvVerb::Cas => {
                    let ok = match &existing {
                        None => op.index == 0,
                        Some(e) => op.index != 0 && e.modify_index == op.index,
                    };
                    if !ok {
                        errors.push(conflict(i, format!("failed to set key {:?}, index is stale", op.key)));
                        continue;
                    }
                    let e = existing.as_ref();
                    out = Some(write(op.value.clone(), e.map(|e| e.session.clone()).unwrap_or_default(), e.map(|e| e.lock_index).unwrap_or(0)));
                }
                KvVerb::Lock => {
                    if !self.data.sessions.contains_key(&op.session) {
                        errors.push(invalid(i, format!("invalid session {:?}", op.session)));
                        continue;
                    }
                    if self.data.lock_delays.get(&op.key).is_some_and(|until| *until > now_ms) {
                        errors.push(conflict(i, format!("failed to lock key {:?}, lock delay in effect", op.key)));
                        continue;
                    }
                    match &existing {
                        Some(e) if !e.session.is_empty() && e.session != op.session => {
                            errors.push(conflict(i, format!("failed to lock key {:?}, lock is already held", op.key)));
                            continue;
                        }
                        Some(e) if e.session == op.session => out = Some(write(op.value.clone(), op.session.clone(), e.lock_index)),
                        Some(e) => out = Some(write(op.value.clone(), op.session.clone(), e.lock_index + 1)),
                        None => out = Some(write(op.value.clone(), op.session.clone(), 1)),
                    }
                }
                KvVerb::Unlock => match &existing {
                    Some(e) if e.session == op.session => out = Some(write(op.value.clone(), String::new(), e.lock_index)),
                    _ => {
                        errors.push(conflict(i, format!("failed to unlock key {:?}, lock isn't held, or is held by another session", op.key)));
                        continue;
                    }
                },
                KvVerb::Get => match &existing {
                    Some(e) => results.push(e.clone()),
                    None => errors.push(invalid(i, format!("key {:?} doesn't exist", op.key))),
                },
                KvVerb::GetTree => {
                    for k in ov.keys_with_prefix(&op.key) {
                        results.extend(ov.get(&k).cloned());
                    }
                }
                KvVerb::CheckIndex => match &existing {
                    Some(e) if e.modify_index == op.index => results.push(e.clone()),
                    Some(e) => errors.push(conflict(i, format!("current modify index {} != {}", e.modify_index, op.index))),
                    None => errors.push(conflict(i, format!("key {:?} doesn't exist", op.key))),
                },
                KvVerb::CheckSession => match &existing {
                    Some(e) if e.session == op.session => results.push(e.clone()),
                    Some(e) => errors.push(conflict(i, format!("current session {:?} != {:?}", e.session, op.session))),
                    None => errors.push(conflict(i, format!("key {:?} doesn't exist", op.key))),
                },
                KvVerb::CheckNotExists => {
                    if existing.is_some() {
                        errors.push(conflict(i, format!("key {:?} exists", op.key)));
                    }
                }
                KvVerb::Delete => {
                    ov.changes.insert(op.key.clone(), None);
                }
                KvVerb::DeleteTree => {
                    for k in ov.keys_with_prefix(&op.key) {
                        ov.changes.insert(k, None);
                    }
                }
                KvVerb::DeleteCas => match &existing {
                    Some(e) if e.modify_index == op.index => {
                        ov.changes.insert(op.key.clone(), None);
                    }
                    _ => errors.push(conflict(i, format!("failed to delete key {:?}, index is stale", op.key))),
                },
            }
            if let Some(e) = out {
                // Written entries are reported without their value, as Consul does.
                results.push(KvEntry { value: None, ..e.clone() });
                ov.changes.insert(op.key.clone(), Some(e));
            }
        }
        if !errors.is_empty() {
            return Outcome::Txn(Err(errors));
        }
        let changes = ov.changes;
        if !changes.is_empty() {
            for (k, v) in changes {
                self.pending.kv_keys.insert(k.clone());
                match v {
                    Some(e) => {
                        self.data.kv_tombstones.remove(&k);
                        self.data.kv.insert(k, e);
                    }
                    None => {
                        if self.data.kv.remove(&k).is_some() {
                            self.data.kv_tombstones.insert(k, index);
                        }
                    }
                }
            }
            self.touch(Table::Kv);
        }
        Outcome::Txn(Ok(results))
    }
}

impl StateData {
    /// One key, and the index a blocking read of it waits on.
    pub fn kv_get(&self, key: &str) -> (Option<KvEntry>, RaftIndex) {
        match self.kv.get(key) {
            Some(e) => (Some(e.clone()), e.modify_index),
            None => (None, self.kv_tombstones.get(key).copied().unwrap_or_else(|| self.index_of(&[Table::Kv]))),
        }
    }

    /// Every entry under `prefix`, with the highest index among them and their deletions.
    pub fn kv_list(&self, prefix: &str) -> (Vec<KvEntry>, RaftIndex) {
        let entries: Vec<KvEntry> = self.kv.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(_, e)| e.clone()).collect();
        (entries.clone(), self.prefix_index(prefix, entries.iter().map(|e| e.modify_index).max().unwrap_or(0)))
    }

    /// Keys under `prefix`, folded at the first `separator` after the prefix (Consul's `?keys`).
    pub fn kv_keys(&self, prefix: &str, separator: &str) -> (Vec<String>, RaftIndex) {
        let mut keys: Vec<String> = Vec::new();
        let mut max = 0;
        for (k, e) in self.kv.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)) {
            max = max.max(e.modify_index);
            let folded = match separator.is_empty() {
                true => k.clone(),
                false => match k[prefix.len()..].find(separator) {
                    Some(pos) => k[..prefix.len() + pos + separator.len()].to_string(),
                    None => k.clone(),
                },
            };
            if keys.last() != Some(&folded) {
                keys.push(folded);
            }
        }
        (keys, self.prefix_index(prefix, max))
    }

    fn prefix_index(&self, prefix: &str, entries_max: RaftIndex) -> RaftIndex {
        let tomb = self.kv_tombstones.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(_, i)| *i).max().unwrap_or(0);
        // With nothing left under the prefix, the table's index (which saw every reap) answers.
        match entries_max.max(tomb) {
            0 => self.index_of(&[Table::Kv]),
            i => i.max(self.kv_graveyard_index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::req;
    use super::super::{Command, Session};
    use super::*;

    #[test]
    fn reaping_tombstones_frees_them_without_moving_any_index_back() {
        let mut s = Store::new();
        s.apply(1, &req(Command::Txn(vec![op(KvVerb::Set, "a/x", "1"), op(KvVerb::Set, "b/y", "1")])));
        s.apply(2, &req(Command::Txn(vec![op(KvVerb::Delete, "a/x", "")])));
        s.apply(3, &req(Command::Txn(vec![op(KvVerb::Delete, "b/y", "")])));
        let before: Vec<RaftIndex> = ["a/", "b/", "c/"].iter().map(|p| s.data().kv_list(p).1).collect();
        let missing_before = s.data().kv_get("a/x").1;
        s.apply(4, &req(Command::KvReap { up_to: 2 }));
        assert_eq!(s.data().kv_tombstones.keys().collect::<Vec<_>>(), vec!["b/y"]);
        for (p, b) in ["a/", "b/", "c/"].iter().zip(before) {
            assert!(s.data().kv_list(p).1 >= b, "{p}: index went back");
        }
        assert!(s.data().kv_get("a/x").1 >= missing_before);
        s.apply(5, &req(Command::KvReap { up_to: 10 }));
        assert!(s.data().kv_tombstones.is_empty());
    }

    fn op(verb: KvVerb, key: &str, value: &str) -> TxnOp {
        TxnOp { verb, key: key.into(), value: Some(value.as_bytes().to_vec()), flags: 0, index: 0, session: String::new() }
    }

    fn set(s: &mut Store, index: u64, key: &str, value: &str) -> Outcome {
        s.apply(index, &req(Command::Txn(vec![op(KvVerb::Set, key, value)])))
    }

    #[test]
    fn a_batch_applies_each_write_in_order_with_its_own_outcome() {
        let mut s = Store::new();
        set(&mut s, 5, "a", "0");
        let mut cas_ok = op(KvVerb::Cas, "a", "1");
        cas_ok.index = 5;
        // The second CAS names the index the first one replaced: it must fail, as it would
        // have in an entry of its own.
        let mut cas_stale = op(KvVerb::Cas, "a", "2");
        cas_stale.index = 5;
        let chunk = Command::RestoreChunk { id: "r".into(), seq: 0, bytes: vec![1] };
        let batch = Command::Batch(vec![
            req(Command::Txn(vec![cas_ok])),
            req(Command::Txn(vec![cas_stale])),
            req(Command::Txn(vec![op(KvVerb::Set, "b", "x")])),
            req(chunk),
        ]);
        let Outcome::Batch(out) = s.apply(9, &req(batch)) else { panic!("not a batch outcome") };
        assert_eq!(out.len(), 4);
        assert!(matches!(out[0], Outcome::Txn(Ok(_))), "{:?}", out[0]);
        assert!(matches!(out[1], Outcome::Txn(Err(_))), "{:?}", out[1]);
        assert!(matches!(out[3], Outcome::Rejected(_)), "{:?}", out[3]);
        let (a, _) = s.data().kv_get("a");
        assert_eq!((a.as_ref().map(|e| e.value.clone()), a.map(|e| e.modify_index)), (Some(Some(b"1".to_vec())), Some(9)));
        assert_eq!(s.data().kv_get("b").1, 9);
        assert!(s.data().restore_staging.is_none(), "a restore chunk slipped into a batch");
    }

    #[test]
    fn kv_cas_rejects_stale_index() {
        let mut s = Store::new();
        set(&mut s, 5, "a", "1");
        let mut cas = op(KvVerb::Cas, "a", "2");
        cas.index = 4;
        assert!(matches!(s.apply(6, &req(Command::Txn(vec![cas.clone()]))), Outcome::Txn(Err(e)) if e[0].conflict));
        cas.index = 5;
        assert!(matches!(s.apply(7, &req(Command::Txn(vec![cas]))), Outcome::Txn(Ok(_))));
        assert_eq!(s.data().kv["a"].value.as_deref(), Some(&b"2"[..]));
        assert_eq!(s.data().kv["a"].create_index, 5);
    }

    #[test]
    fn failed_txn_applies_nothing() {
        let mut s = Store::new();
        let mut bad = op(KvVerb::Cas, "b", "x");
        bad.index = 99;
        let out = s.apply(3, &req(Command::Txn(vec![op(KvVerb::Set, "a", "1"), bad])));
        assert!(matches!(out, Outcome::Txn(Err(e)) if e.len() == 1 && e[0].op_index == 1));
        assert!(s.data().kv.is_empty());
        assert_eq!(s.data().table_index[Table::Kv as usize], 0);
    }

    #[test]
    fn txn_reads_see_earlier_writes_of_the_same_txn() {
        let mut s = Store::new();
        let out = s.apply(3, &req(Command::Txn(vec![op(KvVerb::Set, "p/a", "1"), op(KvVerb::GetTree, "p/", "")])));
        let Outcome::Txn(Ok(r)) = out else { panic!("{out:?}") };
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].value.as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn keys_fold_at_separator() {
        let mut s = Store::new();
        for (i, k) in ["a/b/c", "a/b/d", "a/e", "f"].iter().enumerate() {
            set(&mut s, i as u64 + 1, k, "v");
        }
        assert_eq!(s.data().kv_keys("a/", "/").0, vec!["a/b/", "a/e"]);
        assert_eq!(s.data().kv_keys("", "/").0, vec!["a/", "f"]);
        assert_eq!(s.data().kv_keys("", "").0.len(), 4);
    }

    #[test]
    fn deleting_under_a_prefix_raises_the_prefix_index() {
        let mut s = Store::new();
        set(&mut s, 1, "p/a", "1");
        set(&mut s, 2, "q", "1");
        s.apply(3, &req(Command::Txn(vec![op(KvVerb::Delete, "p/a", "")])));
        assert_eq!(s.data().kv_list("p/").1, 3);
        assert_eq!(s.data().kv_get("p/a").1, 3);
    }

    #[test]
    fn lock_is_exclusive_and_counts_acquisitions() {
        let mut s = Store::new();
        for (i, id) in ["s1", "s2"].iter().enumerate() {
            let sess = Session { id: id.to_string(), node: "n".into(), ..Default::default() };
            s.data.sessions.insert(id.to_string(), sess);
            let _ = i;
        }
        let mut lock = op(KvVerb::Lock, "l", "me");
        lock.session = "s1".into();
        assert!(matches!(s.apply(1, &req(Command::Txn(vec![lock.clone()]))), Outcome::Txn(Ok(_))));
        let mut other = lock.clone();
        other.session = "s2".into();
        assert!(matches!(s.apply(2, &req(Command::Txn(vec![other]))), Outcome::Txn(Err(e)) if e[0].conflict));
        let mut unlock = op(KvVerb::Unlock, "l", "me");
        unlock.session = "s1".into();
        assert!(matches!(s.apply(3, &req(Command::Txn(vec![unlock]))), Outcome::Txn(Ok(_))));
        assert!(matches!(s.apply(4, &req(Command::Txn(vec![lock]))), Outcome::Txn(Ok(_))));
        assert_eq!(s.data().kv["l"].lock_index, 2);
    }
}
