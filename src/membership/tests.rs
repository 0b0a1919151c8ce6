//! End-to-end tests of the membership layer over real UDP sockets on
//! 127.0.0.x (one loopback address per test, port 0 unless a restart needs
//! the same port), plus decode-path fuzzing without sockets.
//!
//! Every wait is on a condition with a deadline (member-list changes via
//! the watch channel, counters by polling); no sleep is used as
//! synchronisation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, BroadcastItem, NodeId};
use super::engine::{Engine, Shared};
use super::*;

/// Upper bound for "the cluster converged" on loopback with the fast
/// profile: a handful of gossip rounds, with room for a loaded CI box.
const CONVERGE: Duration = Duration::from_secs(5);
/// How often counter-based waits re-check (counters have no change feed).
const POLL: Duration = Duration::from_millis(10);

struct Node {
    gossip: Gossip,
    task: JoinHandle<Result<(), GossipError>>,
    shutdown: CancellationToken,
}

impl Node {
    /// Abrupt death: the task and its socket are dropped, no leave.
    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = self.task.await.expect("worker task panicked");
        result.expect("worker returned an error");
    }
}

fn loopback(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, host], port))
}

fn tags(role: &str, build: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("role".to_owned(), role.to_owned()), ("dc".to_owned(), "dc1".to_owned()), ("build".to_owned(), build.to_owned())])
}

fn config(name: &str, bind: SocketAddr, keyring: Option<Keyring>) -> GossipConfig {
    GossipConfig { tags: tags("node", "1"), keyring, profile: Profile::fast(), ..GossipConfig::new(name, bind) }
}

async fn spawn(cfg: GossipConfig) -> Node {
    let (gossip, worker) = start(cfg).await.expect("start gossip");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    Node { gossip, task, shutdown }
}

async fn spawn_on(host: u8, name: &str, keyring: Option<Keyring>) -> Node {
    spawn(config(name, loopback(host, 0), keyring)).await
}

/// Start `names` on `host` and join them all through the first one.
/// Each node gets its own keyring parsed from `key` (as separate processes
/// would), so rotating one node's keyring does not touch the others.
async fn cluster(host: u8, names: &[&str], key: Option<&str>) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in names {
        let keyring = key.map(|k| Keyring::new(k).expect("valid key"));
        nodes.push(spawn_on(host, name, keyring).await);
    }
    let seed = nodes[0].gossip.local_addr();
    for node in &nodes[1..] {
        assert_eq!(node.gossip.join(&[seed]).await.expect("join"), 1);
    }
    for node in &nodes {
        wait_members(&node.gossip, CONVERGE, "everyone alive", |m| m.len() == names.len() && m.iter().all(|m| m.status == MemberStatus::Alive)).await;
    }
    nodes
}

fn status_of(members: &[Member], name: &str) -> Option<MemberStatus> {
    members.iter().find(|m| m.name == name).map(|m| m.status)
}

/// Wait (event-driven) until `cond` holds for `gossip`'s member list.
async fn wait_members(gossip: &Gossip, within: Duration, what: &str, cond: impl Fn(&[Member]) -> bool) -> Duration {
    let started = Instant::now();
    let deadline = started + within;
    let mut changes: watch::Receiver<u64> = gossip.changes();
    loop {
        if cond(&gossip.members()) {
            return started.elapsed();
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{}: worker gone waiting for {what}", gossip.local_name()),
            Err(_) => panic!("{} did not see {what} within {within:?}; members: {:#?}", gossip.local_name(), gossip.members()),
        }
    }
}

/// Wait (polling) until `cond` holds for `gossip`'s counters.
async fn wait_stats(gossip: &Gossip, within: Duration, what: &str, cond: impl Fn(&GossipStats) -> bool) {
    let deadline = Instant::now() + within;
    while !cond(&gossip.stats()) {
        assert!(Instant::now() < deadline, "{}: {what} not reached within {within:?}: {:?}", gossip.local_name(), gossip.stats());
        tokio::time::sleep(POLL).await;
    }
}

async fn next_event(rx: &mut broadcast::Receiver<UserEvent>, who: &str) -> UserEvent {
    tokio::time::timeout(CONVERGE, rx.recv()).await.unwrap_or_else(|_| panic!("{who} got no event within {CONVERGE:?}")).expect("event channel")
}

fn event(id: &str, name: &str) -> UserEvent {
    UserEvent {
        id: id.to_owned(),
        name: name.to_owned(),
        payload: b"deploy v2".to_vec(),
        node_filter: "^web-".to_owned(),
        service_filter: "api".to_owned(),
        tag_filter: "canary".to_owned(),
        ltime: 0,
    }
}

#[tokio::test]
async fn three_nodes_join_and_all_see_three_alive_members() {
    let nodes = cluster(31, &["a", "b", "c"], None).await;
    for node in &nodes {
        let members = node.gossip.members();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let b = members.iter().find(|m| m.name == "b").unwrap();
        assert_eq!(b.addr, nodes[1].gossip.local_addr());
        assert_eq!(b.tags, tags("node", "1"));
        let stats = node.gossip.stats();
        assert!(stats.packets_sent > 0 && stats.packets_received > 0);
        assert_eq!(stats.dropped_bad_key + stats.dropped_malformed, 0);
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_killed_node_is_seen_failed_by_the_others_within_the_fast_profile_bound() {
    let mut nodes = cluster(32, &["a", "b", "c"], None).await;
    let bound = Profile::fast().failure_detection_bound(3);
    nodes.pop().unwrap().kill().await;
    for node in &nodes {
        let took = wait_members(&node.gossip, bound, "c failed", |m| status_of(m, "c") == Some(MemberStatus::Failed)).await;
        assert!(took <= bound, "{took:?} > {bound:?}");
        // Failed members keep their last known tags.
        let c = node.gossip.members().into_iter().find(|m| m.name == "c");
        assert_eq!(c.unwrap().tags, tags("node", "1"));
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_graceful_leave_shows_left_on_the_other_nodes() {
    let mut nodes = cluster(33, &["a", "b", "c"], None).await;
    let leaver = nodes.pop().unwrap();
    leaver.gossip.leave(Duration::from_secs(2)).await.expect("leave");
    assert_eq!(status_of(&leaver.gossip.members(), "c"), Some(MemberStatus::Left));
    assert!(matches!(leaver.gossip.join(&[nodes[0].gossip.local_addr()]).await, Err(GossipError::Left)));
    // Well before failure detection could have fired.
    let quick = Profile::fast().suspicion_timeout(3);
    for node in &nodes {
        wait_members(&node.gossip, quick, "c left", |m| status_of(m, "c") == Some(MemberStatus::Left)).await;
    }
    leaver.stop().await;
    for node in &nodes {
        assert_eq!(status_of(&node.gossip.members(), "c"), Some(MemberStatus::Left));
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_node_with_the_wrong_key_cannot_join_but_one_with_the_right_key_can() {
    let key = keygen();
    let nodes = cluster(34, &["a", "b"], Some(&key)).await;
    let seed = nodes[0].gossip.local_addr();

    let intruder = spawn_on(34, "intruder", Some(Keyring::new(&keygen()).unwrap())).await;
    let err = intruder.gossip.join(&[seed]).await.unwrap_err();
    assert!(matches!(&err, GossipError::JoinFailed { addrs, .. } if addrs == &[seed]), "{err}");
    let plaintext = spawn_on(34, "plaintext", None).await;
    assert!(plaintext.gossip.join(&[seed]).await.is_err());
    assert!(nodes[0].gossip.stats().dropped_bad_key >= 2);
    assert_eq!(nodes[0].gossip.members().len(), 2);

    // Same key, separately parsed: joins fine.
    let friend = spawn_on(34, "friend", Some(Keyring::new(&key).unwrap())).await;
    assert_eq!(friend.gossip.join(&[seed]).await.unwrap(), 1);
    for node in &nodes {
        wait_members(&node.gossip, CONVERGE, "friend alive", |m| status_of(m, "friend") == Some(MemberStatus::Alive) && m.len() == 3).await;
    }
    for node in nodes.into_iter().chain([intruder, plaintext, friend]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn keys_can_be_installed_used_and_removed_while_the_cluster_runs() {
    let k1 = keygen();
    let k2 = keygen();
    let nodes = cluster(35, &["a", "b", "c"], Some(&k1)).await;
    let rings: Vec<Keyring> = nodes.iter().map(|n| n.gossip.keyring().expect("keyring")).collect();

    // Consul's rotation: install everywhere, use everywhere, then remove.
    for ring in &rings {
        ring.install(&k2).unwrap();
    }
    for ring in &rings {
        ring.use_key(&k2).unwrap();
    }
    // Let every node receive fresh (k2) traffic so no k1 packet is still
    // queued when k1 goes away.
    for node in &nodes {
        let seen = node.gossip.stats().packets_received;
        wait_stats(&node.gossip, CONVERGE, "fresh traffic", |s| s.packets_received >= seen + 5).await;
    }
    for ring in &rings {
        ring.remove(&k1).unwrap();
        assert_eq!(ring.list(), vec![k2.clone()]);
    }
    for node in &nodes {
        let seen = node.gossip.stats().packets_received;
        wait_stats(&node.gossip, CONVERGE, "traffic after rotation", |s| s.packets_received >= seen + 10).await;
    }
    for node in &nodes {
        let stats = node.gossip.stats();
        assert_eq!(stats.dropped_bad_key, 0, "{stats:?}");
        let members = node.gossip.members();
        assert!(members.iter().all(|m| m.status == MemberStatus::Alive));
    }

    let seed = nodes[0].gossip.local_addr();
    let stale = spawn_on(35, "stale", Some(Keyring::new(&k1).unwrap())).await;
    assert!(stale.gossip.join(&[seed]).await.is_err());
    let fresh = spawn_on(35, "fresh", Some(Keyring::new(&k2).unwrap())).await;
    assert_eq!(fresh.gossip.join(&[seed]).await.unwrap(), 1);
    for node in nodes.into_iter().chain([stale, fresh]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_user_event_fired_on_one_node_arrives_once_at_every_node() {
    let nodes = cluster(36, &["a", "b", "c"], None).await;
    let mut receivers: Vec<_> = nodes.iter().map(|n| n.gossip.events()).collect();

    nodes[0].gossip.fire_event(event("e1", "deploy")).unwrap();
    let mut first_ltime = 0;
    for (rx, node) in receivers.iter_mut().zip(&nodes) {
        let got = next_event(rx, node.gossip.local_name()).await;
        assert_eq!(got.id, "e1");
        assert_eq!(got.name, "deploy");
        assert_eq!(got.payload, b"deploy v2");
        // Filters travel untouched; the agent applies them.
        assert_eq!((got.node_filter.as_str(), got.service_filter.as_str(), got.tag_filter.as_str()), ("^web-", "api", "canary"));
        assert!(got.ltime > 0);
        first_ltime = got.ltime;
    }
    // The id is deduped: firing it again is refused by the worker, and the
    // next event each node sees is the sentinel, not a duplicate.
    nodes[0].gossip.fire_event(event("e1", "deploy")).unwrap();
    nodes[1].gossip.fire_event(event("", "sentinel")).unwrap();
    for (rx, node) in receivers.iter_mut().zip(&nodes) {
        let got = next_event(rx, node.gossip.local_name()).await;
        assert_eq!(got.name, "sentinel");
        assert!(!got.id.is_empty());
        // Lamport clock: b saw e1, so its event is later.
        assert!(got.ltime > first_ltime);
        assert_eq!(node.gossip.stats().events_received, 2);
    }
    for rx in &mut receivers {
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Empty)));
    }
    let huge = UserEvent { payload: vec![0; MAX_EVENT_BYTES], ..event("big", "big") };
    assert!(matches!(nodes[0].gossip.fire_event(huge), Err(GossipError::EventTooLarge { .. })));
    assert!(matches!(nodes[0].gossip.fire_event(event("x", "")), Err(GossipError::InvalidEvent { .. })));
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_restarted_node_updates_its_tags_on_the_other_nodes() {
    let mut nodes = cluster(37, &["a", "b", "c"], None).await;
    let old = nodes.pop().unwrap();
    let addr = old.gossip.local_addr();
    old.kill().await;

    let mut cfg = config("c", addr, None);
    cfg.tags = tags("node", "2");
    let restarted = spawn(cfg).await;
    assert_eq!(restarted.gossip.join(&[nodes[0].gossip.local_addr()]).await.unwrap(), 1);
    for node in &nodes {
        wait_members(&node.gossip, CONVERGE, "c with build 2", |m| {
            m.iter().any(|m| m.name == "c" && m.status == MemberStatus::Alive && m.tags == tags("node", "2")) && m.len() == 3
        })
        .await;
    }
    for node in nodes.into_iter().chain([restarted]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_node_restarted_on_another_address_under_the_same_name_replaces_the_old_entry() {
    let mut nodes = cluster(44, &["a", "b", "c"], None).await;
    let old = nodes.pop().unwrap();
    let old_addr = old.gossip.local_addr();
    old.kill().await;

    let mut cfg = config("c", loopback(44, 0), None);
    cfg.tags = tags("node", "2");
    let moved = spawn(cfg).await;
    let new_addr = moved.gossip.local_addr();
    assert_ne!(new_addr, old_addr);
    moved.gossip.join(&[nodes[0].gossip.local_addr()]).await.unwrap();
    for node in nodes.iter().chain([&moved]) {
        wait_members(&node.gossip, CONVERGE, "c at its new address", |m| {
            m.len() == 3 && m.iter().any(|m| m.name == "c" && m.addr == new_addr && m.status == MemberStatus::Alive)
        })
        .await;
    }
    // Once the old incarnation is declared failed, the newer one still wins.
    let bound = Profile::fast().failure_detection_bound(4);
    let a = &nodes[0].gossip;
    let mut changes = a.changes();
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        let c = a.members().into_iter().find(|m| m.name == "c").unwrap();
        assert_eq!((c.addr, c.status), (new_addr, MemberStatus::Alive));
        let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
    }
    for node in nodes.into_iter().chain([moved]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn tags_changed_at_runtime_propagate_to_the_other_nodes() {
    let nodes = cluster(38, &["a", "b", "c"], None).await;
    nodes[2].gossip.set_tags(tags("consul", "3")).await.expect("set tags");
    for node in &nodes {
        wait_members(&node.gossip, CONVERGE, "c as consul", |m| {
            m.iter().any(|m| m.name == "c" && m.status == MemberStatus::Alive && m.tags == tags("consul", "3")) && m.len() == 3
        })
        .await;
    }
    // And the renamed node is still a healthy member afterwards.
    for node in &nodes {
        let seen = node.gossip.stats().packets_received;
        wait_stats(&node.gossip, CONVERGE, "traffic", |s| s.packets_received >= seen + 10).await;
        assert!(node.gossip.members().iter().all(|m| m.status == MemberStatus::Alive));
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn force_leave_turns_a_failed_member_left_everywhere_and_refuses_others() {
    let mut nodes = cluster(39, &["a", "b", "c"], None).await;
    assert!(matches!(nodes[0].gossip.force_leave("b"), Err(GossipError::MemberNotFailed { .. })));
    assert!(matches!(nodes[0].gossip.force_leave("nobody"), Err(GossipError::UnknownMember { .. })));
    nodes.pop().unwrap().kill().await;
    let bound = Profile::fast().failure_detection_bound(3);
    wait_members(&nodes[0].gossip, bound, "c failed", |m| status_of(m, "c") == Some(MemberStatus::Failed)).await;
    nodes[0].gossip.force_leave("c").unwrap();
    for node in &nodes {
        wait_members(&node.gossip, CONVERGE, "c left", |m| status_of(m, "c") == Some(MemberStatus::Left)).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn failed_members_are_reaped_after_the_configured_time() {
    let a = spawn(GossipConfig { reap_failed_after: Duration::from_millis(500), ..config("a", loopback(40, 0), None) }).await;
    let b = spawn_on(40, "b", None).await;
    b.gossip.join(&[a.gossip.local_addr()]).await.unwrap();
    wait_members(&a.gossip, CONVERGE, "b alive", |m| m.len() == 2).await;
    b.kill().await;
    let bound = Profile::fast().failure_detection_bound(2);
    wait_members(&a.gossip, bound, "b failed", |m| status_of(m, "b") == Some(MemberStatus::Failed)).await;
    wait_members(&a.gossip, CONVERGE, "b reaped", |m| m.len() == 1).await;
    a.stop().await;
}

#[tokio::test]
async fn join_reports_unanswered_addresses_and_bind_errors_name_the_address() {
    let lone = spawn_on(41, "lone", None).await;
    // Bound but never answering: a plain socket.
    let silent = tokio::net::UdpSocket::bind(loopback(41, 0)).await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    match lone.gossip.join(&[silent_addr]).await {
        Err(GossipError::JoinFailed { addrs, waited }) => {
            assert_eq!(addrs, vec![silent_addr]);
            assert!(waited >= Profile::fast().join_timeout);
        }
        other => panic!("expected JoinFailed, got {other:?}"),
    }
    assert_eq!(lone.gossip.join(&[lone.gossip.local_addr()]).await.unwrap(), 0);

    let taken = lone.gossip.local_addr();
    let err = start(config("dup", taken, None)).await.unwrap_err();
    assert!(matches!(&err, GossipError::Bind { addr, .. } if *addr == taken));
    assert!(err.to_string().contains(&taken.to_string()), "{err}");

    let wildcard = config("wild", SocketAddr::from(([0, 0, 0, 0], 0)), None);
    assert!(matches!(start(wildcard).await, Err(GossipError::InvalidConfig { .. })));

    let mut cfg = config("fat", loopback(41, 0), None);
    cfg.tags.insert("blob".into(), "x".repeat(MAX_IDENTITY_BYTES));
    assert!(matches!(start(cfg).await, Err(GossipError::TagsTooLarge { .. })));
    lone.stop().await;
}

#[tokio::test]
async fn a_handle_whose_worker_is_gone_reports_not_running() {
    let node = spawn_on(42, "gone", None).await;
    let gossip = node.gossip.clone();
    node.stop().await;
    assert!(matches!(gossip.fire_event(event("e", "e")), Err(GossipError::NotRunning)));
    assert!(matches!(gossip.join(&[loopback(42, 9)]).await, Err(GossipError::NotRunning)));
}

// ---- decode-path fuzzing (no sockets) ----

fn offline_engine(name: &str, port: u16, keyring: Option<Keyring>) -> Engine {
    let addr = loopback(43, port);
    let (changes, _) = watch::channel(0);
    let (events, _) = broadcast::channel(16);
    let shared = Arc::new(Shared::new(name.to_owned(), addr, Profile::fast(), keyring, changes, events));
    let id = NodeId::new(name.to_owned(), addr, tags("node", "1"));
    Engine::new(id, shared, DEFAULT_REAP_FAILED_AFTER)
}

/// Run an announce/feed/ping exchange between two offline engines and
/// return every datagram that crossed.
fn captured_traffic(a: &mut Engine, b: &mut Engine) -> Vec<Vec<u8>> {
    let mut corpus = Vec::new();
    a.announce(b.identity().addr);
    b.fire_event(event("fuzz-seed", "seed")).unwrap();
    for _ in 0..6 {
        for (_, datagram) in a.take_outbox() {
            b.handle_datagram(&datagram);
            corpus.push(datagram);
        }
        for (_, datagram) in b.take_outbox() {
            a.handle_datagram(&datagram);
            corpus.push(datagram);
        }
        // Fire a few timers early: probes and gossip add message kinds.
        for engine in [&mut *a, &mut *b] {
            for (_, timer) in engine.take_timers().into_iter().take(4) {
                engine.handle_timer(timer);
            }
        }
    }
    corpus
}

#[test]
fn random_and_mutated_packets_never_panic_the_decode_path() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut a = offline_engine("a", 1, None);
    let mut b = offline_engine("b", 2, None);
    let corpus = captured_traffic(&mut a, &mut b);
    assert!(corpus.len() >= 4, "exchange produced {} datagrams", corpus.len());
    assert!(a.shared().snapshot().iter().any(|m| m.name == "b"));

    let ring = Keyring::new(&keygen()).unwrap();
    let mut victim = offline_engine("victim", 3, None);
    let mut sealed_victim = offline_engine("sealed", 4, Some(ring));
    for round in 0..20_000 {
        let datagram = match round % 4 {
            // Pure noise, any length up to past the datagram limit.
            0 => {
                let len = rng.random_range(0..1500);
                (0..len).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
            }
            // Noise behind a valid plaintext marker, to reach foca's decoder.
            1 => {
                let len = rng.random_range(0..600);
                std::iter::once(codec::PLAINTEXT_VERSION).chain((0..len).map(|_| rng.random::<u8>())).collect()
            }
            // Real packets with a few bytes flipped.
            2 => {
                let mut d = corpus[rng.random_range(0..corpus.len())].clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(1..d.len().max(2)).min(d.len() - 1);
                    d[i] = rng.random();
                }
                d
            }
            // Real packets truncated or extended.
            _ => {
                let mut d = corpus[rng.random_range(0..corpus.len())].clone();
                if rng.random::<bool>() {
                    d.truncate(rng.random_range(0..d.len()));
                } else {
                    d.extend((0..rng.random_range(1..40)).map(|_| rng.random::<u8>()));
                }
                d
            }
        };
        victim.handle_datagram(&datagram);
        a.handle_datagram(&datagram);
        sealed_victim.handle_datagram(&datagram);
        let _ = BroadcastItem::decode(&datagram);
        let _ = codec::peek_header(&datagram);
        // Keep timers flowing so state built from fuzz input gets exercised.
        for (_, timer) in victim.take_timers().into_iter().take(2) {
            victim.handle_timer(timer);
        }
        let _ = victim.take_outbox();
        let _ = a.take_outbox();
        let _ = a.take_timers();
        let _ = sealed_victim.take_outbox();
    }
    let stats = victim.shared().stats.snapshot();
    assert!(stats.dropped_malformed > 1000, "{stats:?}");
    let sealed = sealed_victim.shared().stats.snapshot();
    assert!(sealed.dropped_bad_key > 1000, "{sealed:?}");
    // The engine that took the fuzz still knows its real peer.
    assert!(a.shared().snapshot().iter().any(|m| m.name == "b"));
}
