//! When to hold an election: Raft's pre-vote, driven here rather than by openraft's own timer.
//!
//! openraft 0.9 elects on a timer of `leader lease + election timeout`, with no pre-vote. A
//! server that was frozen (SIGSTOP, a long pause) or partitioned wakes up past its timer, bumps
//! the term and votes for itself; the others refuse it while their lease holds, but the leader's
//! next append then meets the higher term and steps down: one frozen follower costs the whole
//! cluster an election.
//!
//! So openraft's timer is off (`enable_elect: false`) and this driver decides instead. A server
//! that has heard no leader for the lease plus a random part of the spread first asks the other
//! voters whether they too have heard none for the lease (`PreVote`). Only when a majority
//! agrees, and its log is at least as long as theirs, does it start a real election
//! (`trigger().elect()`). A healthy leader's followers always say no, so a returning server
//! never disturbs it; a dead leader is replaced after lease + spread at worst.

use std::time::{Duration, Instant};

use openraft::ServerState;
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use super::network::{ContactLog, Network, RaftReply, RaftRpc};
use super::{NodeId, Raft, RaftTimings};
use crate::rpc::{self, Service};

/// "Would you vote for me?", asked before a term is spent on an election.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVote {
    pub candidate: NodeId,
    pub last_log_index: Option<u64>,
}

/// The quiet time after which a follower may vote in a new election: openraft's leader lease.
pub fn lease(t: &RaftTimings) -> Duration {
    Duration::from_millis(t.election_min_ms)
}

/// Answer a pre-vote: yes only if this server is not the leader, has heard no leader for the
/// lease, and the candidate's log is at least as long as its own.
pub fn answer(raft: &Raft, contacts: &ContactLog, lease: Duration, req: &PreVote) -> bool {
    let m = raft.metrics();
    let m = m.borrow();
    m.state != ServerState::Leader && contacts.quiet_for() > lease && req.last_log_index >= m.last_log_index
}

/// The election driver of one server; runs until Raft shuts down. It also logs each term this
/// server leads ("leading term=N"), which is how one can check no term ever had two leaders.
pub async fn drive(id: NodeId, raft: Raft, net: Network, timings: RaftTimings) {
    tokio::select! {
        _ = campaign(id, raft.clone(), net, timings) => {}
        _ = log_terms(raft) => {}
    }
}

async fn log_terms(raft: Raft) {
    let mut rx = raft.metrics();
    let mut logged = None;
    loop {
        let (state, term) = {
            let m = rx.borrow_and_update();
            (m.state, m.current_term)
        };
        if state == ServerState::Leader && logged != Some(term) {
            tracing::info!(term, "leading term={term}");
            logged = Some(term);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn campaign(id: NodeId, raft: Raft, net: Network, timings: RaftTimings) {
    let lease = lease(&timings);
    let spread = Duration::from_millis(timings.election_max_ms.saturating_sub(timings.election_min_ms).max(timings.heartbeat_ms));
    let tick = Duration::from_millis((timings.heartbeat_ms / 2).max(5));
    let jitter = |upto: Duration| Duration::from_millis(rand::rng().random_range(0..=upto.as_millis() as u64));
    // Wait this much more than the lease before campaigning, and this long between attempts.
    let mut patience = jitter(spread);
    let mut last_attempt: Option<Instant> = None;
    let mut retry_after = Duration::ZERO;
    loop {
        tokio::time::sleep(tick).await;
        let (state, voters, last_log_index) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<(NodeId, Option<std::net::SocketAddr>)> =
                membership.voter_ids().map(|v| (v, membership.get_node(&v).and_then(|n| n.socket_addr()))).collect();
            (m.state, voters, m.last_log_index)
        };
        match state {
            ServerState::Shutdown => return,
            // A leader counts as hearing from one, so that losing leadership starts the clock.
            ServerState::Leader => {
                net.contacts.heard_from_leader();
                continue;
            }
            _ => {}
        }
        if !voters.iter().any(|(v, _)| *v == id) {
            continue;
        }
        if net.contacts.quiet_for() <= lease + patience || last_attempt.is_some_and(|t| t.elapsed() < retry_after) {
            continue;
        }
        last_attempt = Some(Instant::now());
        retry_after = tick + jitter(spread);
        patience = jitter(spread);
        if voters.len() > 1 {
            // Counting its own, a majority needs `voters.len() / 2` other yeses.
            let granted = 1 + ask_peers(&net, id, &voters, last_log_index, lease, voters.len() / 2).await;
            if granted * 2 <= voters.len() {
                tracing::debug!(granted, voters = voters.len(), "pre-vote refused: not starting an election");
                continue;
            }
            tracing::info!(granted, voters = voters.len(), "pre-vote won: starting an election");
        }
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

/// Ask every other voter at once; count the yeses, stopping as soon as `needed` have come (a
/// dead or frozen voter must not hold the election up until its timeout).
async fn ask_peers(
    net: &Network,
    id: NodeId,
    voters: &[(NodeId, Option<std::net::SocketAddr>)],
    last_log_index: Option<u64>,
    lease: Duration,
    needed: usize,
) -> usize {
    use futures::StreamExt as _;
    let Ok(body) = rpc::encode(&RaftRpc::PreVote(PreVote { candidate: id, last_log_index })) else { return 0 };
    let mut asks: futures::stream::FuturesUnordered<_> = voters
        .iter()
        .filter(|(v, _)| *v != id)
        .filter_map(|(_, addr)| *addr)
        .map(|addr| {
            let (client, body) = (net.client.clone(), body.clone());
            async move {
                let reply = client.call(addr, Service::Raft, body, lease).await.and_then(|b| rpc::decode::<RaftReply>(&b));
                matches!(reply, Ok(RaftReply::PreVote(true)))
            }
        })
        .collect();
    let mut granted = 0;
    while granted < needed {
        match asks.next().await {
            Some(true) => granted += 1,
            Some(false) => {}
            None => break,
        }
    }
    granted
}
