//! Fine-grained watches for blocking queries: a reader subscribes to the one thing its answer
//! depends on (a service's view, a KV key or prefix, or a whole table), so a write wakes only
//! the readers of what it changed. 10,000 watchers of one service are woken by a write to that
//! service and by nothing else.
//!
//! Applying a command records what it touched ([`Changes`]); the state machine publishes them
//! after it releases the state lock, so waking thousands of readers never holds up the next
//! write, and a reader that looks at the state after the write sees it without waiting.
//! Channels exist only while someone watches them: each is created on first subscription and
//! dropped when a publish finds no receiver left.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{RaftIndex, TABLE_COUNT, Table};

/// What a blocking read waits on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WatchKey {
    /// Any change to a table.
    Table(Table),
    /// Anything a service's catalog or health view shows (its instances, their nodes and
    /// checks).
    Service(String),
    /// One KV key.
    KvKey(String),
    /// Any KV key under a prefix (`?recurse`, `?keys`).
    KvPrefix(String),
}

/// What one or more applied commands changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub tables: [bool; TABLE_COUNT],
    pub services: BTreeSet<String>,
    pub kv_keys: BTreeSet<String>,
    /// Everything changed (a snapshot was installed or restored).
    pub all: bool,
    /// The index of the last command applied.
    pub index: RaftIndex,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.all && !self.tables.iter().any(|t| *t) && self.services.is_empty() && self.kv_keys.is_empty()
    }

    /// Fold later changes into these (one wake-up per watcher for several writes).
    fn merge(&mut self, later: Changes) {
        for (t, l) in self.tables.iter_mut().zip(later.tables) {
            *t |= l;
        }
        self.services.extend(later.services);
        self.kv_keys.extend(later.kv_keys);
        self.all |= later.all;
        self.index = self.index.max(later.index);
    }
}

/// Publishes between two sweeps of channels nobody watches any more (each publish also drops
/// the abandoned channels it touched).
const SWEEP_EVERY: u64 = 4096;

/// The registry of watch channels, shared by the state (which publishes) and every reader.
#[derive(Default)]
pub struct Watches {
    exact: Mutex<HashMap<WatchKey, watch::Sender<RaftIndex>>>,
    /// KV prefixes, looked up by each prefix of a changed key.
    prefixes: Mutex<BTreeMap<String, watch::Sender<RaftIndex>>>,
    /// How many receivers publishing has notified (for tests and metrics).
    notified: AtomicU64,
    publishes: AtomicU64,
    /// The publisher thread's queue (`publish_deferred`), started on first use.
    deferred: OnceLock<Option<mpsc::Sender<Changes>>>,
}

impl Watches {
    pub fn new() -> Arc<Watches> {
        Arc::new(Watches::default())
    }

    /// A receiver that changes when `key` does. Subscribe while holding the state's read lock,
    /// before reading the state, so that no change between the read and the wait is missed.
    pub fn subscribe(&self, key: &WatchKey) -> watch::Receiver<RaftIndex> {
        match key {
            WatchKey::KvPrefix(p) => self.prefixes.lock().entry(p.clone()).or_insert_with(|| watch::channel(0).0).subscribe(),
            k => self.exact.lock().entry(k.clone()).or_insert_with(|| watch::channel(0).0).subscribe(),
        }
    }

    /// Wake the watchers of `changes` from the publisher thread, in order, instead of the
    /// caller's. Tasks woken from outside the runtime go to its shared queue, so the write
    /// that made the change is answered without waiting behind thousands of woken watchers
    /// (woken on the applying worker, they would all be queued ahead of it). Changes queued
    /// while a publish runs are merged into the next one.
    pub fn publish_deferred(self: &Arc<Self>, changes: Changes) {
        if changes.is_empty() {
            return;
        }
        let tx = self.deferred.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Changes>();
            let weak = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("watch-publish".into()).spawn(move || {
                // Ends when the registry (and with it the sender) is dropped.
                while let Ok(mut c) = rx.recv() {
                    while let Ok(more) = rx.try_recv() {
                        c.merge(more);
                    }
                    match weak.upgrade() {
                        Some(w) => w.publish(&c),
                        None => return,
                    }
                }
            });
            spawned.ok().map(|_| tx)
        });
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError(c)) = tx.send(changes) {
                    self.publish(&c);
                }
            }
            // No thread to be had: publish here rather than not at all.
            None => self.publish(&changes),
        }
    }

    /// Wake the watchers of everything in `changes`.
    pub fn publish(&self, changes: &Changes) {
        if changes.is_empty() {
            return;
        }
        let index = changes.index;
        let mut notified = 0u64;
        // Returns whether the channel is abandoned (nobody to notify).
        let mut send = |tx: &watch::Sender<RaftIndex>| {
            let n = tx.receiver_count();
            notified += n as u64;
            if n > 0 {
                tx.send_replace(index);
            }
            n == 0
        };
        let sweep = self.publishes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1;
        {
            let mut exact = self.exact.lock();
            if changes.all {
                exact.retain(|_, tx| !send(tx));
            } else {
                let mut keys: Vec<WatchKey> = Vec::new();
                keys.extend(changes.tables.iter().enumerate().filter(|(_, t)| **t).map(|(i, _)| WatchKey::Table(TABLES[i])));
                keys.extend(changes.services.iter().map(|s| WatchKey::Service(s.clone())));
                keys.extend(changes.kv_keys.iter().map(|k| WatchKey::KvKey(k.clone())));
                for k in keys {
                    if exact.get(&k).is_some_and(&mut send) {
                        exact.remove(&k);
                    }
                }
                if sweep {
                    exact.retain(|_, tx| tx.receiver_count() > 0);
                }
            }
        }
        {
            let mut prefixes = self.prefixes.lock();
            if changes.all {
                prefixes.retain(|_, tx| !send(tx));
            } else if !prefixes.is_empty() {
                for k in &changes.kv_keys {
                    // Every prefix of the key, the empty one and the key itself included.
                    let ends = k.char_indices().map(|(i, _)| i).chain(std::iter::once(k.len()));
                    for end in ends {
                        if prefixes.get(&k[..end]).is_some_and(&mut send) {
                            prefixes.remove(&k[..end]);
                        }
                    }
                }
                if sweep {
                    prefixes.retain(|_, tx| tx.receiver_count() > 0);
                }
            }
        }
        self.notified.fetch_add(notified, Ordering::Relaxed);
    }

    /// Receivers notified so far.
    pub fn notified(&self) -> u64 {
        self.notified.load(Ordering::Relaxed)
    }

    /// Channels currently held open by watchers.
    pub fn channels(&self) -> usize {
        self.exact.lock().len() + self.prefixes.lock().len()
    }
}

const TABLES: [Table; TABLE_COUNT] = [
    Table::Nodes,
    Table::Services,
    Table::Checks,
    Table::Kv,
    Table::Sessions,
    Table::Autopilot,
    Table::AgentCa,
    Table::PreparedQueries,
    Table::Coordinates,
    Table::ConnectCa,
    Table::ConfigEntries,
    Table::FederationStates,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn change(f: impl FnOnce(&mut Changes)) -> Changes {
        let mut c = Changes { index: 7, ..Default::default() };
        f(&mut c);
        c
    }

    #[test]
    fn a_change_wakes_only_the_watchers_of_what_changed() {
        let w = Watches::new();
        let web: Vec<_> = (0..50).map(|_| w.subscribe(&WatchKey::Service("web".into()))).collect();
        let db = w.subscribe(&WatchKey::Service("db".into()));
        w.publish(&change(|c| {
            c.services.insert("db".into());
        }));
        assert!(web.iter().all(|r| !r.has_changed().unwrap()));
        assert!(db.has_changed().unwrap());
        assert_eq!(w.notified(), 1);
        w.publish(&change(|c| {
            c.services.insert("web".into());
        }));
        assert!(web.iter().all(|r| r.has_changed().unwrap()));
        assert_eq!(w.notified(), 51);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_publishes_wake_watchers_in_order_and_stop_with_the_registry() {
        let w = Watches::new();
        let mut web = w.subscribe(&WatchKey::Service("web".into()));
        let db = w.subscribe(&WatchKey::Service("db".into()));
        for i in 1..=100 {
            w.publish_deferred(Changes { index: i, services: ["web".to_string()].into(), ..Default::default() });
        }
        // The watcher ends at the last index, never going back on the way.
        let mut last = 0;
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while last < 100 {
                web.changed().await.unwrap();
                let now = *web.borrow_and_update();
                assert!(now > last, "{now} after {last}");
                last = now;
            }
        })
        .await
        .expect("the publisher thread woke the watcher");
        assert!(!db.has_changed().unwrap());
        // Dropping the registry frees it (the publisher thread holds it only while publishing)
        // and ends the thread (the sender goes with it).
        let weak = Arc::downgrade(&w);
        drop(w);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while weak.upgrade().is_some() {
            assert!(std::time::Instant::now() < deadline, "the registry outlived its last owner");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn kv_prefix_watchers_wake_for_keys_under_them_only() {
        let w = Watches::new();
        let all = w.subscribe(&WatchKey::KvPrefix(String::new()));
        let app = w.subscribe(&WatchKey::KvPrefix("app/".into()));
        let other = w.subscribe(&WatchKey::KvPrefix("other/".into()));
        let exact = w.subscribe(&WatchKey::KvKey("app/x".into()));
        w.publish(&change(|c| {
            c.kv_keys.insert("app/x".into());
        }));
        assert!(all.has_changed().unwrap() && app.has_changed().unwrap() && exact.has_changed().unwrap());
        assert!(!other.has_changed().unwrap());
    }

    #[test]
    fn abandoned_channels_are_dropped() {
        let w = Watches::new();
        drop(w.subscribe(&WatchKey::Service("gone".into())));
        let _kept = w.subscribe(&WatchKey::Service("kept".into()));
        assert_eq!(w.channels(), 2);
        w.publish(&change(|c| {
            c.services.insert("gone".into());
        }));
        assert_eq!(w.channels(), 1);
    }
}
