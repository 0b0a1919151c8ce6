//! End-to-end tests of the membership layer over real UDP and TCP sockets
//! on 127.0.0.x (one loopback address per test, port 0 unless a restart
//! needs the same port), plus decode-path fuzzing (datagrams and push-pull
//! streams) without sockets.
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
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, BroadcastItem, NodeId, PushPullState};
use super::engine::{Engine, Shared};
use super::pushpull;
use super::*;

/// Upper bound for "the cluster converged" on loopback with the fast
/// profile: a handful of gossip rounds, with room for a loaded CI box.
const CONVERGE: Duration = Duration::from_secs(5);
/// How often counter-based waits re-check (counters have no change feed).
const POLL: Duration = Duration::from_millis(10);
/// Period of every UDP dissemination path in the `quiet` profile: far
/// beyond any test, so what a node learns came from a push-pull.
const QUIET: Duration = Duration::from_secs(600);

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

/// Fast timings with probes, gossip rounds and periodic announces pushed
/// out to `QUIET`: members learn about each other only through push-pull
/// (plus the one Feed answering a join's announce).
fn quiet(push_pull_interval: Duration) -> Profile {
    Profile {
        probe_period: QUIET,
        gossip_interval: QUIET,
        announce_interval: QUIET,
        announce_down_interval: QUIET,
        push_pull_interval,
        ..Profile::fast()
    }
}

/// Tags that make an identity ~350 bytes, so the Feed answering an announce
/// (one datagram, whose header carries two identities) holds at most one
/// other member: learning more at once takes the push-pull.
fn fat_tags() -> BTreeMap<String, String> {
    let mut t = tags("node", "1");
    t.insert("blob".to_owned(), "x".repeat(300));
    t
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

fn names(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.name.as_str()).collect()
}

fn all_alive(members: &[Member], expected: &[&str]) -> bool {
    names(members) == expected && members.iter().all(|m| m.status == MemberStatus::Alive)
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

    // The TCP twin of a free UDP port is taken: named too.
    let tcp = std::net::TcpListener::bind(loopback(41, 0)).unwrap();
    let tcp_taken = tcp.local_addr().unwrap();
    let err = start(config("tcp-dup", tcp_taken, None)).await.unwrap_err();
    assert!(matches!(&err, GossipError::Bind { addr, .. } if *addr == tcp_taken), "{err}");
    assert!(err.to_string().contains(&tcp_taken.to_string()), "{err}");
    drop(tcp);

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

#[tokio::test]
async fn a_node_joining_through_one_seed_learns_the_whole_cluster_by_push_pull_before_gossip_could_tell_it() {
    let quiet = quiet(Duration::ZERO);
    let start_quiet = |name: &str| {
        let cfg = GossipConfig { tags: fat_tags(), profile: quiet.clone(), ..config(name, loopback(45, 0), None) };
        spawn(cfg)
    };
    let mut nodes = Vec::new();
    for name in ["p1", "p2", "p3", "p4", "p5"] {
        nodes.push(start_quiet(name).await);
    }
    let seed = nodes[0].gossip.local_addr();
    for node in &nodes[1..] {
        assert_eq!(node.gossip.join(&[seed]).await.expect("join"), 1);
    }
    let five = ["p1", "p2", "p3", "p4", "p5"];
    wait_members(&nodes[0].gossip, CONVERGE, "all five on the seed", |m| all_alive(m, &five)).await;

    let joiner = start_quiet("p6").await;
    let started = Instant::now();
    assert_eq!(joiner.gossip.join(&[seed]).await.expect("join"), 1);
    let took = started.elapsed();
    // Checked the moment join returns: no probe or gossip round has run
    // (they are QUIET apart) and the Feed holds at most one other member.
    let members = joiner.gossip.members();
    assert!(all_alive(&members, &["p1", "p2", "p3", "p4", "p5", "p6"]), "{members:#?}");
    assert!(members.iter().all(|m| m.tags == fat_tags()));
    assert!(took < quiet.probe_period.min(quiet.gossip_interval), "{took:?}");
    assert!(joiner.gossip.stats().push_pulls >= 1, "{:?}", joiner.gossip.stats());
    // The seed merged the joiner's state too.
    wait_members(&nodes[0].gossip, CONVERGE, "p6 on the seed", |m| status_of(m, "p6") == Some(MemberStatus::Alive)).await;
    for node in &nodes {
        let stats = node.gossip.stats();
        assert_eq!(stats.push_pull_failures + stats.dropped_bad_key + stats.dropped_malformed, 0, "{stats:?}");
    }
    nodes.push(joiner);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test]
async fn partitioned_halves_that_share_one_member_converge_through_periodic_push_pull() {
    let interval = Duration::from_millis(100);
    let start_quiet = |name: &str| spawn(GossipConfig { profile: quiet(interval), ..config(name, loopback(46, 0), None) });
    let (a1, a2, b1, b2, shared) =
        (start_quiet("a1").await, start_quiet("a2").await, start_quiet("b1").await, start_quiet("b2").await, start_quiet("s").await);
    a2.gossip.join(&[a1.gossip.local_addr()]).await.expect("join a");
    b2.gossip.join(&[b1.gossip.local_addr()]).await.expect("join b");
    // Two halves that never heard of each other.
    for (node, half) in [(&a1, ["a1", "a2"]), (&a2, ["a1", "a2"]), (&b1, ["b1", "b2"]), (&b2, ["b1", "b2"])] {
        wait_members(&node.gossip, CONVERGE, "its half", |m| all_alive(m, &half)).await;
    }
    // One member in both: it talks to a1 and b1 only, and the gossip that
    // would spread what it knows is QUIET.
    assert_eq!(shared.gossip.join(&[a1.gossip.local_addr(), b1.gossip.local_addr()]).await.expect("join both"), 2);

    let everyone = ["a1", "a2", "b1", "b2", "s"];
    let before: Vec<u64> = [&a2, &b2].iter().map(|n| n.gossip.stats().push_pulls).collect();
    for node in [&a1, &a2, &b1, &b2, &shared] {
        wait_members(&node.gossip, CONVERGE, "the whole cluster", |m| all_alive(m, &everyone)).await;
    }
    // a2 and b2 were never dialled by the bridge: their periodic rounds did it.
    for (node, before) in [&a2, &b2].iter().zip(before) {
        assert!(node.gossip.stats().push_pulls > before, "{:?}", node.gossip.stats());
    }
    for node in [a1, a2, b1, b2, shared] {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_push_pull_with_the_wrong_key_fails_and_is_counted_while_any_installed_key_works() {
    let (k1, k2) = (keygen(), keygen());
    // Periodic push-pull off: the counters move only for the joins below.
    let profile = Profile { push_pull_interval: Duration::ZERO, ..Profile::fast() };
    let keyed = |name: &str, ring: Keyring| spawn(GossipConfig { profile: profile.clone(), ..config(name, loopback(47, 0), Some(ring)) });
    let seed = keyed("seed", Keyring::new(&k1).unwrap()).await;

    let intruder = keyed("intruder", Keyring::new(&k2).unwrap()).await;
    assert!(matches!(intruder.gossip.join(&[seed.gossip.local_addr()]).await, Err(GossipError::JoinFailed { .. })));
    let seen = intruder.gossip.stats();
    assert_eq!(seen.push_pulls, 0, "{seen:?}");
    assert!(seen.push_pull_failures >= 1, "{seen:?}");
    wait_stats(&seed.gossip, CONVERGE, "the bad-key push-pull counted", |s| s.push_pull_failures >= 1 && s.dropped_bad_key >= 1).await;
    assert_eq!(seed.gossip.stats().push_pulls, 0);
    assert_eq!(names(&seed.gossip.members()), ["seed"]);
    assert_eq!(names(&intruder.gossip.members()), ["intruder"]);

    // Mid-rotation: primary k2 with k1 installed talks to primary k1 with
    // k2 installed; each opens the other's frames with its secondary key.
    seed.gossip.keyring().unwrap().install(&k2).unwrap();
    let rotated = keyed("rotated", Keyring::from_keys(&k2, [k1.as_str()]).unwrap()).await;
    assert_eq!(rotated.gossip.join(&[seed.gossip.local_addr()]).await.unwrap(), 1);
    assert!(all_alive(&rotated.gossip.members(), &["rotated", "seed"]));
    assert_eq!(rotated.gossip.stats().push_pulls, 1, "{:?}", rotated.gossip.stats());
    for node in [seed, intruder, rotated] {
        node.stop().await;
    }
}

#[tokio::test]
async fn garbage_on_the_tcp_port_is_dropped_without_affecting_the_node() {
    let nodes = cluster(48, &["a", "b"], None).await;
    let target = nodes[0].gossip.local_addr();
    let baseline = nodes[0].gossip.stats();
    // Held open, silent, for the whole test: must not block anything.
    let silent = tokio::net::TcpStream::connect(target).await.unwrap();
    let silent_since = Instant::now();

    let mut rng = StdRng::seed_from_u64(11);
    // A plausible length, then an unknown envelope version and noise.
    let valid_len_noise: Vec<u8> = 40u32.to_be_bytes().into_iter().chain([7]).chain((1..40).map(|_| rng.random::<u8>())).collect();
    let encrypted_frame: Vec<u8> = {
        let ring = Keyring::new(&keygen()).unwrap();
        codec::encode_push_pull(Some(&ring), &PushPullState::default()).unwrap().0.concat()
    };
    let garbage: [&[u8]; 4] = [&u32::MAX.to_be_bytes(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &valid_len_noise, &encrypted_frame];
    for bytes in garbage {
        let mut stream = tokio::net::TcpStream::connect(target).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        // The node hangs up (EOF or reset) instead of answering or waiting.
        let mut buf = [0u8; 64];
        match tokio::time::timeout(CONVERGE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("node answered garbage with {n} bytes"),
            Err(_) => panic!("node kept a garbage connection open for {CONVERGE:?}"),
        }
    }
    wait_stats(&nodes[0].gossip, CONVERGE, "garbage counted", |s| {
        s.dropped_malformed >= baseline.dropped_malformed + 3 && s.dropped_bad_key > baseline.dropped_bad_key
    })
    .await;
    assert!(all_alive(&nodes[0].gossip.members(), &["a", "b"]));

    // Still a working member: a newcomer joins with a push-pull, and the
    // silent connection is still pending in its task, not in the worker.
    let pulls = nodes[0].gossip.stats().push_pulls;
    let late = spawn_on(48, "c", None).await;
    assert_eq!(late.gossip.join(&[target]).await.unwrap(), 1);
    assert!(all_alive(&late.gossip.members(), &["a", "b", "c"]), "{:#?}", late.gossip.members());
    assert!(nodes[0].gossip.stats().push_pulls > pulls);
    // Unless the test ran past the read timeout, the silent peer's task is
    // still waiting on it (it would have been cut at the timeout).
    let mut probe = [0u8; 1];
    if silent_since.elapsed() < profile::PUSH_PULL_READ_TIMEOUT {
        let pending = silent.try_read(&mut probe);
        assert!(matches!(&pending, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "{pending:?}");
    }
    for node in nodes.into_iter().chain([late]) {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_silent_or_trickling_peer_times_out_instead_of_hanging_the_reader() {
    let short = Duration::from_millis(50);
    // Nothing at all.
    let (mut near, _far) = tokio::io::duplex(64);
    assert!(matches!(pushpull::read_state(&mut near, None, short).await, Err(pushpull::StreamError::Timeout(_))));
    // A length prefix promising a frame that never comes.
    let (mut near, mut far) = tokio::io::duplex(64);
    far.write_all(&1000u32.to_be_bytes()).await.unwrap();
    far.write_all(&[0; 10]).await.unwrap();
    assert!(matches!(pushpull::read_state(&mut near, None, short).await, Err(pushpull::StreamError::Timeout(_))));
    // Hanging up half way is a clean error too.
    let (mut near, mut far) = tokio::io::duplex(64);
    far.write_all(&1000u32.to_be_bytes()).await.unwrap();
    drop(far);
    assert!(matches!(pushpull::read_state(&mut near, None, short).await, Err(pushpull::StreamError::Closed)));
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

/// Mutate a captured push-pull stream the ways a broken or hostile peer
/// could: noise, flipped bytes, cut or padded streams, bogus lengths.
fn mutated_stream(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut d = corpus[rng.random_range(0..corpus.len())].clone();
    match rng.random_range(0..5) {
        0 => (0..rng.random_range(0..2000)).map(|_| rng.random::<u8>()).collect(),
        1 => {
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..d.len());
                d[i] = rng.random();
            }
            d
        }
        2 => {
            d.truncate(rng.random_range(0..d.len()));
            d
        }
        3 => {
            d.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>()));
            d
        }
        // A length prefix (of the first frame) rewritten.
        _ => {
            let len: u32 = if rng.random::<bool>() { rng.random() } else { rng.random_range(0..2000) };
            d[..4].copy_from_slice(&len.to_be_bytes());
            d
        }
    }
}

#[test]
fn random_and_mutated_push_pull_streams_never_panic_the_decode_path() {
    let mut rng = StdRng::seed_from_u64(13);
    let mut a = offline_engine("a", 1, None);
    let mut b = offline_engine("b", 2, None);
    let _ = captured_traffic(&mut a, &mut b);
    let state = a.push_pull_state();
    assert!(state.members.len() >= 2, "{state:?}");
    let ring = Keyring::new(&keygen()).unwrap();
    let plain = codec::encode_push_pull(None, &state).unwrap().0.concat();
    let sealed = codec::encode_push_pull(Some(&ring), &state).unwrap().0.concat();
    let corpus = [plain, sealed];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();

    let mut victim = offline_engine("victim", 3, None);
    let mut decoded = 0;
    for round in 0..5_000 {
        let bytes = mutated_stream(&mut rng, &corpus);
        let keyring = if round % 2 == 0 { None } else { Some(&ring) };
        let whole = codec::decode_push_pull(keyring, &bytes);
        let streamed = runtime.block_on(pushpull::read_state(&mut bytes.as_slice(), keyring, Duration::from_secs(1)));
        // The socket reader stops at `End` (trailing bytes are the next
        // read's problem); otherwise both paths agree.
        if let Ok(state) = &whole {
            assert_eq!(streamed.as_ref().ok(), Some(state));
        }
        if let Ok(state) = streamed {
            decoded += 1;
            victim.apply_push_pull(state, true);
            for (_, timer) in victim.take_timers().into_iter().take(2) {
                victim.handle_timer(timer);
            }
            let _ = victim.take_outbox();
        }
    }
    // Flipped bytes inside names and tags still decode: the merge path got
    // exercised with hostile members, not just the framing.
    assert!(decoded > 200, "{decoded}");
    // Still merges a genuine state.
    victim.apply_push_pull(state, true);
    assert!(victim.shared().snapshot().iter().any(|m| m.name == "a"));
}

#[test]
fn offline_engines_carry_members_and_leaves_through_push_pull_states() {
    let mut a = offline_engine("a", 11, None);
    let mut b = offline_engine("b", 12, None);
    let _ = captured_traffic(&mut a, &mut b);
    let mut c = offline_engine("c", 13, None);
    // c learns a and b from a's view alone, ourselves included.
    assert_eq!(c.apply_push_pull(a.push_pull_state(), true), 2);
    assert!(all_alive(&c.shared().snapshot(), &["a", "b", "c"]));
    // Our own entry in a peer's state is about us: ignored, no duplicate.
    assert!(all_alive(&a.shared().snapshot(), &["a", "b"]));
    a.apply_push_pull(c.push_pull_state(), true);
    assert!(all_alive(&a.shared().snapshot(), &["a", "b", "c"]));

    // b leaves; a hears it over UDP, c only through a's next state.
    b.begin_leave().unwrap();
    for (_, datagram) in b.take_outbox() {
        a.handle_datagram(&datagram);
    }
    assert_eq!(status_of(&a.shared().snapshot(), "b"), Some(MemberStatus::Left));
    c.apply_push_pull(a.push_pull_state(), true);
    assert_eq!(status_of(&c.shared().snapshot(), "b"), Some(MemberStatus::Left));

    // A down member nobody told us about is not resurrected as a record,
    // and junk identities are skipped.
    let mut d = offline_engine("d", 14, None);
    let mut state = a.push_pull_state();
    state.members.push(foca::Member::new(NodeId::placeholder(loopback(43, 15)), 0, foca::State::Alive));
    assert_eq!(d.apply_push_pull(state, true), 2);
    let names_d: Vec<String> = d.shared().snapshot().into_iter().map(|m| m.name).collect();
    assert_eq!(names_d, ["a", "c", "d"]);
}
