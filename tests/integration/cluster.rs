//! Cluster formation, leader failover under load, and full restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{Cluster, SOON, eventually};

/// What this test does:
/// - starts three servers that bootstrap from `--retry-join`,
/// - checks that every server lists the same three voters,
/// - writes through a follower and reads the value back from every server.
#[tokio::test(flavor = "multi_thread")]
async fn three_servers_form_a_cluster_and_followers_forward_writes() {
    let c = Cluster::start(3).await;
    let leader = c.wait_for_leader().await;
    for s in &c.servers {
        let peers = c.get_json(&format!("{}/v1/status/peers", s.http())).await.unwrap();
        assert_eq!(peers.as_array().unwrap().len(), 3, "{peers}");
    }
    let follower = c.servers.iter().find(|s| s.rpc() != leader).unwrap();
    let (status, body) = c.put(&format!("{}/v1/kv/greeting", follower.http()), "hello").await.unwrap();
    assert_eq!((status, body.trim()), (200, "true"));
    for s in &c.servers {
        let url = format!("{}/v1/kv/greeting?raw&stale", s.http());
        eventually("the write to reach every server", SOON, || async {
            let r = c.http.get(&url).send().await.ok()?;
            (r.text().await.ok()? == "hello").then_some(())
        })
        .await;
    }
    // A default (leader) read through a follower is forwarded and says who answered.
    let r = c.http.get(format!("{}/v1/kv/greeting", follower.http())).send().await.unwrap();
    assert_eq!(r.headers()["x-consul-knownleader"], "true");
    let me: serde_json::Value = c.get_json(&format!("{}/v1/agent/self", follower.http())).await.unwrap();
    assert_eq!(me["Stats"]["consul"]["leader_addr"], leader.as_str());
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    // The leader registers every server in the catalog with a passing serfHealth.
    eventually("servers in the catalog", SOON, || async {
        let v = c.get_json(&format!("{}/v1/health/service/consul?passing", c.servers[0].http())).await.ok()?;
        (v.as_array()?.len() == 3).then_some(())
    })
    .await;
}

/// Four writers putting distinct keys `<prefix>w<writer>/<n>` through the servers in turn until
/// `stop`; each returns the writes that were acknowledged, and counts them in `acked`.
fn spawn_writers(
    c: &Cluster,
    prefix: &str,
    stop: &Arc<AtomicBool>,
    acked: &Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<(String, String)>>> {
    let urls: Vec<String> = c.servers.iter().map(|s| s.http()).collect();
    (0..4)
        .map(|w| {
            let (http, urls, stop, count, prefix) = (c.http.clone(), urls.clone(), stop.clone(), acked.clone(), prefix.to_string());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("{prefix}w{w}/{n}");
                    let url = format!("{}/v1/kv/{key}", urls[(n as usize + w) % urls.len()]);
                    let req = http.put(url).body(format!("v{n}")).timeout(Duration::from_secs(5)).send().await;
                    if let Ok(r) = req
                        && r.status().is_success()
                        && r.text().await.unwrap_or_default().trim() == "true"
                    {
                        acked.push((key, format!("v{n}")));
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                acked
            })
        })
        .collect()
}

/// Stop the writers and check, with a consistent read through `http`, that every write they
/// had acknowledged is stored under `prefix`. Returns those writes.
async fn assert_acknowledged_writes_kept(
    c: &Cluster,
    http: &str,
    prefix: &str,
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<Vec<(String, String)>>>,
) -> Vec<(String, String)> {
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let all = c.get_json(&format!("{http}/v1/kv/{prefix}?recurse&consistent")).await.unwrap();
    let stored: std::collections::HashMap<String, String> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD.decode(e["Value"].as_str().unwrap_or("")).unwrap();
            (e["Key"].as_str().unwrap().to_string(), String::from_utf8(v).unwrap())
        })
        .collect();
    for (k, v) in &acked {
        assert_eq!(stored.get(k), Some(v), "acknowledged write {k} was lost");
    }
    acked
}

/// What this test does:
/// - keeps four writers putting distinct keys through every server,
/// - kills -9 the leader in the middle,
/// - checks a new leader is elected, writes continue, and every acknowledged write is readable.
#[tokio::test(flavor = "multi_thread")]
async fn leader_failover_under_concurrent_writes_loses_no_acknowledged_write() {
    let mut c = Cluster::start(3).await;
    let old_leader = c.wait_for_leader().await;
    let urls: Vec<String> = c.servers.iter().map(|s| s.http()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&c, "load/", &stop, &Default::default());
    eventually("some writes before the crash", SOON, || async {
        let v = c.get_json(&format!("{}/v1/kv/load/?keys", urls[0])).await.ok()?;
        (v.as_array()?.len() > 20).then_some(())
    })
    .await;
    let killed = c.index_of_rpc(&old_leader);
    let crash = Instant::now();
    c.kill(killed);
    let new_leader = eventually("a new leader", SOON, || async {
        let l = c.wait_for_leader().await;
        (l != old_leader).then_some(l)
    })
    .await;
    eprintln!("new leader {new_leader} elected {:?} after the crash", crash.elapsed());
    // Writes go on through the survivors for a while.
    let survivor = c.servers.iter().find(|s| s.is_running()).unwrap().http();
    let before = c.get_json(&format!("{survivor}/v1/kv/load/?keys")).await.unwrap().as_array().unwrap().len();
    eventually("writes continuing after failover", SOON, || async {
        let v = c.get_json(&format!("{survivor}/v1/kv/load/?keys")).await.ok()?;
        (v.as_array()?.len() > before + 20).then_some(())
    })
    .await;
    let acked = assert_acknowledged_writes_kept(&c, &survivor, "load/", &stop, writers).await;
    assert!(acked.len() > 40, "too few acknowledged writes: {}", acked.len());
    // The crashed server comes back and catches up.
    c.spawn(killed);
    let url = format!("{}/v1/kv/{}?raw&stale", c.servers[killed].http(), acked.last().unwrap().0);
    eventually("the restarted server to catch up", SOON, || async {
        let r = c.http.get(&url).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}

/// What this test does:
/// - writes keys and a catalog registration, stops every server with SIGTERM,
/// - checks each stops cleanly and its ports can be bound again,
/// - starts them all again and finds every piece of state back.
#[tokio::test(flavor = "multi_thread")]
async fn full_restart_brings_back_all_state() {
    let mut c = Cluster::start(3).await;
    let base = c.servers[0].http();
    for i in 0..30 {
        let (s, _) = c.put(&format!("{base}/v1/kv/persist/{i}"), format!("{i}")).await.unwrap();
        assert_eq!(s, 200);
    }
    let reg = r#"{"Node":"web-1","Address":"10.1.1.1","Service":{"Service":"web","Port":80,"Tags":["v1"]}}"#;
    assert_eq!(c.put(&format!("{base}/v1/catalog/register"), reg).await.unwrap().0, 200);
    for i in 0..3 {
        c.stop(i);
        for port in [8300, 8500] {
            let addr = format!("{}:{port}", c.servers[i].ip);
            std::net::TcpListener::bind(&addr).unwrap_or_else(|e| panic!("{addr} still bound after shutdown: {e}"));
        }
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_for_leader().await;
    let keys = c.get_json(&format!("{base}/v1/kv/persist/?keys")).await.unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 30);
    let svc = c.get_json(&format!("{base}/v1/catalog/service/web")).await.unwrap();
    assert_eq!(svc[0]["ServiceTags"][0], "v1");
}

/// The leader every server in `of` reports, when they all agree on a non-empty one.
async fn leader_seen_by(c: &Cluster, of: &[usize]) -> Option<String> {
    let mut seen: Option<String> = None;
    for &i in of {
        let r = c.http.get(format!("{}/v1/status/leader", c.servers[i].http())).timeout(Duration::from_secs(1)).send().await.ok()?;
        let l: String = r.json().await.ok()?;
        if l.is_empty() || seen.as_ref().is_some_and(|x| *x != l) {
            return None;
        }
        seen = Some(l);
    }
    seen
}

/// An nftables rule dropping every connection to one server's Raft RPC port (TCP 8300), for
/// as long as the value lives: the leader cannot reach it, while it can still ask the others
/// (outgoing connections leave from 127.0.0.1, which no rule can tell apart).
struct RaftPartition {
    table: String,
}

impl RaftPartition {
    fn new(ip: &str) -> RaftPartition {
        let table = format!("trellis_partition_{}", ip.replace('.', "_"));
        let script = format!(
            "table inet {table} {{\n chain input {{\n type filter hook input priority 0; policy accept;\n \
             ip daddr {ip} tcp dport 8300 drop\n }}\n}}\n"
        );
        let mut child = std::process::Command::new("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().expect("nft");
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft rejected: {script}");
        RaftPartition { table }
    }
}

impl Drop for RaftPartition {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

/// `Stats.raft.term` of server `i`.
async fn term_of(c: &Cluster, i: usize) -> Option<u64> {
    let r = c.http.get(format!("{}/v1/agent/self", c.servers[i].http())).timeout(Duration::from_secs(2)).send().await.ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    v["Stats"]["raft"]["term"].as_str()?.parse().ok()
}

/// A Go duration as autopilot prints it ("850ms", "1.2s"), in milliseconds.
fn millis(d: &str) -> Option<f64> {
    if let Some(ms) = d.strip_suffix("ms") {
        return ms.parse().ok();
    }
    d.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1000.0)
}

/// What this test does:
/// - keeps four writers putting distinct keys through all three servers,
/// - six times over, kills -9 or freezes (SIGSTOP) the leader, waits for the other two to agree
///   on a new one (and prints how long that took), checks writes go on, then restarts or thaws
///   the old leader and waits for all three to agree again,
/// - checks every acknowledged write is kept, and that no term was ever led by two servers
///   (each server logs every term it leads),
/// - then freezes a follower until the leader has not heard from it for well past the lease,
///   thaws it, and checks the leader and its term are unchanged once the follower has caught
///   up; then cuts the follower off from Raft traffic (nftables) for as long, and checks the
///   same after healing, and that its term did not move while it was cut off: with pre-vote, a
///   returning server cannot depose a healthy leader.
#[tokio::test(flavor = "multi_thread")]
async fn leader_crashes_and_freezes_lose_no_write_and_never_split_a_term() {
    let mut c = Cluster::start(3).await;
    c.wait_for_leader().await;
    let urls: Vec<String> = c.servers.iter().map(|s| s.http()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers = spawn_writers(&c, "cycle/", &stop, &acked_count);
    let progress = |more: usize| {
        let target = acked_count.load(Ordering::Relaxed) + more;
        let count = acked_count.clone();
        async move { eventually("writes to go on", SOON, || async { (count.load(Ordering::Relaxed) >= target).then_some(()) }).await }
    };
    progress(50).await;
    let all = [0usize, 1, 2];
    for cycle in 0..6 {
        let old = eventually("all three to agree on a leader", SOON, || leader_seen_by(&c, &all)).await;
        let victim = c.index_of_rpc(&old);
        let others: Vec<usize> = all.iter().copied().filter(|i| *i != victim).collect();
        let freeze = cycle % 2 == 1;
        let at = Instant::now();
        if freeze {
            c.signal(victim, "STOP");
        } else {
            c.kill(victim);
        }
        let new = loop {
            if let Some(l) = leader_seen_by(&c, &others).await.filter(|l| *l != old) {
                break l;
            }
            assert!(at.elapsed() < SOON, "cycle {cycle}: no new leader within {SOON:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("cycle {cycle}: {} the leader; {new} leads after {:?}", if freeze { "froze" } else { "killed" }, at.elapsed());
        progress(20).await;
        if freeze {
            c.signal(victim, "CONT");
        } else {
            c.spawn(victim);
        }
        eventually("the old leader to follow the new one", SOON, || async { leader_seen_by(&c, &all).await.filter(|l| *l == new) }).await;
        // Autopilot may have removed the old leader while it was down; a returning server is a
        // voter again only after its stabilisation time. Until then a cluster of three cannot
        // lose another server, so wait for three voters before the next failure.
        eventually("three voters again", Duration::from_secs(60), || async {
            let v = c.get_json(&format!("{}/v1/operator/raft/configuration", urls[others[0]])).await.ok()?;
            let voters = v["Servers"].as_array()?.iter().filter(|s| s["Voter"] == true).count();
            (voters == 3).then_some(())
        })
        .await;
    }
    progress(20).await;

    // Pre-vote: a follower frozen well past the lease comes back without an election.
    let leader_rpc = eventually("all three to agree on a leader", SOON, || leader_seen_by(&c, &all)).await;
    let leader = c.index_of_rpc(&leader_rpc);
    let follower = (leader + 1) % 3;
    let term = eventually("the leader's term", SOON, || term_of(&c, leader)).await;
    c.signal(follower, "STOP");
    let name = c.servers[follower].name.clone();
    eventually("the leader to miss the frozen follower for 2.5 s", SOON, || async {
        // 429 while a server is unhealthy, as in Consul; the body is the same.
        let r = c.http.get(format!("{}/v1/operator/autopilot/health", urls[leader])).send().await.ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        let s = v["Servers"].as_array()?.iter().find(|s| s["Name"] == name.as_str())?.clone();
        (millis(s["LastContact"].as_str()?)? > 2500.0).then_some(())
    })
    .await;
    c.signal(follower, "CONT");
    let (code, _) = c.put(&format!("{}/v1/kv/prevote/marker", urls[leader]), "back").await.unwrap();
    assert_eq!(code, 200);
    eventually("the thawed follower to catch up", SOON, || async {
        let r = c.http.get(format!("{}/v1/kv/prevote/marker?raw&stale", urls[follower])).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(leader_seen_by(&c, &all).await.as_deref(), Some(leader_rpc.as_str()), "the thawed follower deposed the leader");
    assert_eq!(term_of(&c, leader).await, Some(term), "the thawed follower forced a new term");

    // The same for a follower the leader cannot reach (gossip still flows, so autopilot keeps
    // it): without pre-vote it would campaign in vain, term after term, and once reachable its
    // higher term would depose the leader.
    let cut = RaftPartition::new(&c.servers[follower].ip);
    eventually("the leader to miss the partitioned follower for 3 s", SOON, || async {
        let r = c.http.get(format!("{}/v1/operator/autopilot/health", urls[leader])).send().await.ok()?;
        let v: serde_json::Value = r.json().await.ok()?;
        let s = v["Servers"].as_array()?.iter().find(|s| s["Name"] == name.as_str())?.clone();
        (millis(s["LastContact"].as_str()?)? > 3000.0).then_some(())
    })
    .await;
    let follower_term = term_of(&c, follower).await;
    drop(cut);
    let (code, _) = c.put(&format!("{}/v1/kv/prevote/healed", urls[leader]), "back").await.unwrap();
    assert_eq!(code, 200);
    eventually("the healed follower to catch up", SOON, || async {
        let r = c.http.get(format!("{}/v1/kv/prevote/healed?raw&stale", urls[follower])).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    assert_eq!(follower_term, Some(term), "the partitioned follower raised its term while cut off");
    assert_eq!(leader_seen_by(&c, &all).await.as_deref(), Some(leader_rpc.as_str()), "the healed follower deposed the leader");
    assert_eq!(term_of(&c, leader).await, Some(term), "the healed follower forced a new term");

    let acked = assert_acknowledged_writes_kept(&c, &urls[leader], "cycle/", &stop, writers).await;
    eprintln!("{} acknowledged writes over six leader failures", acked.len());
    // Every term has at most one leader, by each server's own account.
    let mut leaders: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>> = Default::default();
    for i in all {
        for line in c.log(i).lines() {
            if let Some(t) = line.split("leading term=").nth(1).and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next()?.parse::<u64>().ok()) {
                leaders.entry(t).or_default().insert(c.servers[i].name.clone());
            }
        }
    }
    assert!(leaders.len() >= 7, "expected a logged leader for each of at least 7 terms: {leaders:?}");
    for (t, who) in &leaders {
        assert_eq!(who.len(), 1, "term {t} had two leaders: {who:?}");
    }
}

/// Bytes in the files under `dir`, recursively.
fn disk_use(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => disk_use(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// What this test does:
/// - runs one server that snapshots every 20 entries and keeps 16 behind each snapshot,
/// - overwrites the same 100 keys 4,000 times with 64 KiB values (250 MiB of history),
/// - checks every key holds its last value, and that the Raft data directory then holds no more
///   than the live data twice (snapshots) plus a bounded log tail (whole WAL segments).
///
/// The count is in entries, and group commit packs up to 8 of these writes (one per writer) into
/// one entry, so 20 entries can hold 10 MiB of writes: with 100, a slow CI machine (big batches,
/// snapshots slowed by the rest of the suite) had 4 segments of log between snapshots.
#[tokio::test(flavor = "multi_thread")]
async fn disk_stays_bounded_under_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("retention.hcl");
    std::fs::write(
        &cfg,
        "raft_snapshot_threshold = 20\nraft_snapshot_interval = \"200ms\"\nraft_trailing_logs = 16\nraft_snapshot_log_bytes = 1048576\n",
    )
    .unwrap();
    let c = Cluster::start_with(1, 0, &["--config-file", cfg.to_str().unwrap()]).await;
    c.wait_for_leader().await;
    let http = c.servers[0].http();
    const KEYS: usize = 100;
    const WRITES: usize = 4000;
    const VALUE: usize = 64 << 10;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..8 {
        let (client, http, next) = (c.http.clone(), http.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= WRITES {
                    return;
                }
                // The value names its write, so the last one per key can be checked.
                let mut body = format!("{n:08}").into_bytes();
                body.resize(VALUE, b'x');
                let r = client.put(format!("{http}/v1/kv/disk/k{}", n % KEYS)).body(body).timeout(Duration::from_secs(30)).send().await.unwrap();
                assert!(r.status().is_success(), "write {n}: {}", r.status());
            }
        }));
    }
    // The largest the directory grows while the writes run, for the report.
    let raft_dir = c.servers[0].data_dir.join("raft");
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (dir, peak) = (raft_dir.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(disk_use(&dir), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    sampler.abort();
    // Each key's value comes from one of its last writes (8 writers run out of order).
    for k in 0..KEYS {
        let r = c.http.get(format!("{http}/v1/kv/disk/k{k}?raw")).send().await.unwrap();
        let b = r.bytes().await.unwrap();
        let n: usize = std::str::from_utf8(&b[..8]).unwrap().parse().unwrap();
        assert!(n % KEYS == k && n + 8 * KEYS >= WRITES, "key {k} holds write {n}");
    }
    let live = (KEYS * VALUE) as u64;
    let history = (WRITES * VALUE) as u64;
    // Once the server has caught up with its snapshots (the last one may still be under way
    // when the writes end): two snapshots (the current one, and the next being written) and a
    // log tail of at most 20 + 16 entries of at most 512 KiB, which spans at most three
    // segments (the active one, the one before it, and one awaiting its purge).
    let bound = 2 * live + 3 * trellis::consensus::storage::SEGMENT_BYTES + (1 << 20);
    let deadline = Instant::now() + Duration::from_secs(30);
    let used = loop {
        let used = disk_use(&raft_dir);
        if used <= bound || Instant::now() > deadline {
            break used;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "raft data dir: {} MiB after {} MiB of writes ({} MiB live; at most {} MiB while they ran)",
        used >> 20,
        history >> 20,
        live >> 20,
        peak >> 20
    );
    assert!(used <= bound, "the raft data dir holds {used} bytes 30 s after {history} bytes of overwrites (bound {bound})");
    // While the writes ran the log grows between snapshots by what arrives meanwhile, but never
    // towards the history.
    assert!(peak <= history / 2, "the raft data dir reached {peak} bytes during {history} bytes of overwrites");
}

/// What this test does:
/// - runs three servers that snapshot every 100 entries and keep only 16 behind each snapshot,
/// - stops a follower, then writes 1,500 values of 64 KiB (100 keys overwritten, 100 new), so
///   the entries it lacks are long gone from the leader's log,
/// - restarts it and checks it catches up; the only way is the leader's snapshot, about 12 MiB,
///   which openraft sends in chunks (3 MiB each by default).
/// A follower stopped while 1,000,000 keys are written (64 writes per transaction, 8 in
/// flight, so the leader's batcher also groups them) comes back to a log compacted far past
/// it: it can only catch up from the leader's snapshot of the whole state (tens of MB, sent
/// in openraft's chunks), then from the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_follower_far_behind_catches_up_from_a_chunked_snapshot() {
    const KEYS: usize = 1_000_000;
    const PER_TXN: usize = 64;
    const IN_FLIGHT: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("retention.hcl");
    // Only the size trigger snapshots (whenever the log outgrows 1 MiB and the last snapshot,
    // at most every 10 s), and 16 entries are kept behind each snapshot.
    std::fs::write(&cfg, "raft_snapshot_threshold = 10000000\nraft_trailing_logs = 16\nraft_snapshot_log_bytes = 1048576\n").unwrap();
    let mut c = Cluster::start_with(3, 0, &["--config-file", cfg.to_str().unwrap()]).await;
    let leader_rpc = c.wait_for_leader().await;
    let leader = c.index_of_rpc(&leader_rpc);
    let behind = (leader + 1) % 3;
    c.stop(behind);
    let txn_url = format!("{}/v1/txn", c.servers[leader].http());
    let value = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [b'v'; 64]);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (http, url, value, next) = (c.http.clone(), txn_url.clone(), value.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(PER_TXN, Ordering::Relaxed);
                    if first >= KEYS {
                        return;
                    }
                    let ops: Vec<_> = (first..KEYS.min(first + PER_TXN))
                        .map(|n| serde_json::json!({ "KV": { "Verb": "set", "Key": format!("far/k{n:07}"), "Value": value } }))
                        .collect();
                    let r = http.put(&url).json(&ops).send().await.expect("txn request");
                    let code = r.status();
                    assert_eq!(code, 200, "txn from key {first}: {}", r.text().await.unwrap_or_default());
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    // One more write after the load, so that the log has entries past the last snapshot too.
    let (code, body) = c.put(&format!("{}/v1/kv/far/last", c.servers[leader].http()), "after").await.unwrap();
    assert_eq!(code, 200, "{body}");
    c.spawn(behind);
    let follower = c.servers[behind].http();
    eventually("the restarted follower to hold the last write", Duration::from_secs(180), || async {
        let r = c.http.get(format!("{follower}/v1/kv/far/last?raw&stale")).send().await.ok()?;
        (r.status() == 200 && r.bytes().await.ok()?.as_ref() == b"after").then_some(())
    })
    .await;
    let keys = c.get_json(&format!("{follower}/v1/kv/far/k?keys&stale")).await.unwrap();
    assert_eq!(keys.as_array().map(Vec::len), Some(KEYS), "the follower holds every key");
    let r = c.http.get(format!("{follower}/v1/kv/far/k0999999?raw&stale")).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), [b'v'; 64]);
    assert!(c.log(behind).contains("installed a snapshot from the leader"), "the follower caught up from a snapshot:\n{}", c.log(behind));
    assert!(c.log(leader).contains("snapshot taken"), "the leader compacted its log");
    for line in c.log(behind).lines().filter(|l| l.contains("installed a snapshot")) {
        eprintln!("follower: {line}");
    }
}
