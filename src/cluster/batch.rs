//! Group commit on the leader: client writes that arrive while earlier ones are being
//! replicated share one Raft entry (`Command::Batch`), so one append, one fsync and one round
//! of replication serve them all.
//!
//! openraft 0.9 appends and flushes one proposal at a time on the leader, so without this every
//! client write costs its own fsync, and writes queue behind each other's disk latency. Here a
//! single task takes whatever writes are waiting (nothing is held back for a timer: an idle
//! cluster answers a lone write as fast as before), proposes them as one entry, and starts the
//! next entry as soon as fewer than `MAX_IN_FLIGHT` are outstanding. The busier the leader, the
//! larger the batches.

use std::net::SocketAddr;
use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::consensus::Raft;
use crate::state::{Command, Outcome, Request};

/// Entries proposed and not yet committed at once. Two keep the pipeline full (one being
/// flushed and replicated while the next gathers writes) without splitting load into many
/// small entries.
const MAX_IN_FLIGHT: usize = 2;
/// Requests per entry at most.
const MAX_REQUESTS: usize = 1024;
/// Approximate bytes per entry at most (a larger single request goes alone).
const MAX_BYTES: usize = 512 << 10;
/// Writes waiting for the batcher at most; more wait for room.
const QUEUE: usize = 8192;

/// Why a write did not commit here.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// This server does not lead (any more); the leader it knows of, if any.
    NotLeader(Option<SocketAddr>),
    Raft(String),
}

type Reply = oneshot::Sender<Result<(Outcome, u64), BatchError>>;

/// The handle `RaftNode` writes through.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<(Request, Reply)>,
}

impl Batcher {
    /// Start the batching task for `raft`; it ends when every handle is dropped.
    pub fn start(raft: Raft) -> Batcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    /// Propose `req` (alone or with others) and wait for its outcome and log index.
    pub async fn write(&self, req: Request) -> Result<(Outcome, u64), BatchError> {
        let (tx, rx) = oneshot::channel();
        let gone = || BatchError::Raft("the write batcher has stopped".into());
        self.tx.send((req, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Request, Reply)>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A request that did not fit the previous batch starts the next one.
    let mut carried: Option<(Request, Reply)> = None;
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let first = match carried.take() {
            Some(w) => w,
            None => match rx.recv().await {
                Some(w) => w,
                None => return,
            },
        };
        let mut bytes = first.0.command.approx_bytes();
        let mut batch = vec![first];
        if batch[0].0.command.batchable() {
            while batch.len() < MAX_REQUESTS && bytes < MAX_BYTES {
                let Ok(next) = rx.try_recv() else { break };
                let size = next.0.command.approx_bytes();
                if !next.0.command.batchable() || bytes + size > MAX_BYTES {
                    carried = Some(next);
                    break;
                }
                bytes += size;
                batch.push(next);
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            propose(&raft, batch).await;
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<(Request, Reply)>) {
    if batch.len() == 1 {
        let (req, reply) = batch.pop().expect("one request");
        let _ = reply.send(raft.client_write(req).await.map(|r| (r.data, r.log_id.index)).map_err(error));
        return;
    }
    let (reqs, replies): (Vec<Request>, Vec<Reply>) = batch.into_iter().unzip();
    let now_ms = reqs.iter().map(|r| r.now_ms).max().unwrap_or(0);
    match raft.client_write(Request { now_ms, command: Command::Batch(reqs) }).await {
        Ok(r) => {
            let index = r.log_id.index;
            let outcomes = match r.data {
                Outcome::Batch(o) if o.len() == replies.len() => o,
                other => {
                    let e = BatchError::Raft(format!("a batch of {} writes applied as {other:?}", replies.len()));
                    return replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
                }
            };
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(Ok((outcome, index)));
            }
        }
        Err(e) => {
            let e = error(e);
            replies.into_iter().for_each(|r| drop(r.send(Err(e.clone()))));
        }
    }
}

fn error(e: RaftError<crate::consensus::NodeId, ClientWriteError<crate::consensus::NodeId, crate::consensus::ServerNode>>) -> BatchError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => BatchError::NotLeader(f.leader_node.and_then(|n| n.socket_addr())),
        e => BatchError::Raft(e.to_string()),
    }
}
