//! The Raft state machine: applies committed entries to the in-memory `state::Store` and keeps
//! the latest snapshot in its file (`storage`). On start it loads that snapshot; openraft then
//! replays the log after it, so the applied state itself never needs to be written anywhere else.

use parking_lot::RwLock;
use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use super::storage::Storage;
use super::{NodeId, ServerNode, TypeConfig, io_err};
use crate::state::{Outcome, StateData, Store};

type Membership = StoredMembership<NodeId, ServerNode>;

/// What a snapshot holds: the tables plus the Raft position they correspond to.
#[derive(Serialize, Deserialize)]
pub struct SnapshotPayload {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: Membership,
    pub data: StateData,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, ServerNode>,
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

/// The bytes of a `StoredSnapshot` that come before its encoded state: the meta, then the
/// state's length (postcard encodes a struct as its fields in order, and bytes as a varint
/// length, then the bytes). Writing this and then the state makes the same file as encoding
/// a `StoredSnapshot`, without copying the state into a second buffer.
fn stored_snapshot_header(meta: &SnapshotMeta<NodeId, ServerNode>, state_len: usize) -> Result<Vec<u8>, postcard::Error> {
    let mut header = postcard::to_allocvec(meta)?;
    let mut n = state_len as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            header.push(byte);
            return Ok(header);
        }
        header.push(byte | 0x80);
    }
}

/// Make the calling thread the last in line for CPU and for the disk: the `SCHED_IDLE` policy
/// (it runs only on a core that would otherwise idle, and a waking thread preempts it at once),
/// nice 19 for when it leaves that policy, and the idle I/O class (which mq-deadline and BFQ
/// honour; the log's fsyncs go first). Linux sets all three per thread. Failures leave the
/// thread as it was. Returns the thread's id, for `stop_starving`.
fn yield_cpu_to_everything_else() -> libc::pid_t {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the calls only read their integer arguments and `param`; `who`/`pid` 0 is the
    // calling thread.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let _ = libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        let _ = libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT);
        libc::gettid()
    }
}

/// How long a snapshot may wait for idle CPU before it gets a share of a busy one: a server
/// that is never idle must still compact its log.
const SNAPSHOT_STARVED_AFTER: std::time::Duration = std::time::Duration::from_secs(20);

/// Move a snapshot thread out of `SCHED_IDLE` (it keeps nice 19). `tid` is `None` once the
/// thread has finished, and the lock is held across the call, so the id cannot name a thread
/// that has since exited.
fn stop_starving(tid: &parking_lot::Mutex<Option<libc::pid_t>>) {
    let tid = tid.lock();
    if let Some(tid) = *tid {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: reads its integer arguments and `param`; `tid` is a live thread of ours.
        let _ = unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
        tracing::info!(after_s = SNAPSHOT_STARVED_AFTER.as_secs(), "the snapshot found no idle CPU; it now takes a share at nice 19");
    }
}

/// The applied state, shared with readers (HTTP, DNS) through `Arc<RwLock<Store>>`.
pub struct StateMachine {
    store: Arc<RwLock<Store>>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    storage: Storage,
    snapshot_seq: u64,
}

impl StateMachine {
    /// Open the state machine, loading the latest snapshot from `storage` if there is one.
    pub fn open(storage: Storage, store: Arc<RwLock<Store>>) -> Result<StateMachine, StorageError<NodeId>> {
        let mut sm = StateMachine { store, last_applied: None, membership: Membership::default(), storage, snapshot_seq: 0 };
        if let Some(snap) = sm.stored_snapshot()? {
            sm.load(&snap.bytes)?;
        }
        Ok(sm)
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError<NodeId>> {
        let raw = self.storage.snapshot_get().map_err(|e| StorageIOError::read_snapshot(None, io_err(&e)))?;
        raw.map(|b| postcard::from_bytes(&b).map_err(|e| StorageIOError::read_snapshot(None, io_err(&e)).into())).transpose()
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), StorageError<NodeId>> {
        let p: SnapshotPayload = postcard::from_bytes(bytes).map_err(|e| StorageIOError::read_snapshot(None, io_err(&e)))?;
        self.last_applied = p.last_applied;
        self.membership = p.membership;
        let mut store = self.store.write();
        store.replace(p.data);
        let (changes, watches) = (store.take_changes(), store.watches().clone());
        drop(store);
        watches.publish(&changes);
        Ok(())
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachineSnapshotter;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut store = self.store.write();
        let watches = store.watches().clone();
        for e in entries {
            self.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Outcome::Done),
                EntryPayload::Normal(req) => out.push(store.apply(e.log_id.index, &req)),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Outcome::Done);
                }
            }
        }
        // Wake the readers of what changed once the lock is released, from the publisher
        // thread: however many there are, neither this write's answer nor the next write
        // waits for them.
        let changes = store.take_changes();
        drop(store);
        watches.publish_deferred(changes);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Only copy the tables here, where apply is paused; openraft runs `build_snapshot`
        // (encoding and writing) on its own task while applies go on.
        self.snapshot_seq += 1;
        tracing::info!(index = self.last_applied.map(|l| l.index).unwrap_or(0), "snapshot started");
        StateMachineSnapshotter {
            payload: Some(SnapshotPayload {
                last_applied: self.last_applied,
                membership: self.membership.clone(),
                data: self.store.read().data().clone(),
            }),
            storage: self.storage.clone(),
            seq: self.snapshot_seq,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, ServerNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let started = std::time::Instant::now();
        self.load(&bytes)?;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let bytes_len = bytes.len();
        let stored =
            postcard::to_allocvec(&StoredSnapshot { meta: meta.clone(), bytes }).map_err(|e| StorageIOError::write_snapshot(None, io_err(&e)))?;
        self.storage.snapshot_put(stored).await.map_err(|e| StorageIOError::write_snapshot(None, io_err(&e)))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(index, bytes = bytes_len, elapsed_ms = started.elapsed().as_millis() as u64, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.stored_snapshot()?.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.bytes)) }))
    }
}

/// What a snapshot took, for the log.
struct SnapshotTimes {
    bytes: usize,
    encode_ms: u64,
    write_ms: u64,
    free_ms: u64,
}

/// A snapshot serialised at request time, written to disk when openraft asks for it.
pub struct StateMachineSnapshotter {
    payload: Option<SnapshotPayload>,
    storage: Storage,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineSnapshotter {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let p = self.payload.take().ok_or_else(|| StorageIOError::write_snapshot(None, io_err(&std::io::Error::other("snapshot already built"))))?;
        let snapshot_id = match p.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("--{}", self.seq),
        };
        let meta = SnapshotMeta { last_log_id: p.last_applied, last_membership: p.membership.clone(), snapshot_id };
        // Encoding (and dropping) a copy of every table, and writing it out, takes a whole
        // core for a second or more at a million keys. Do it on a thread of its own at the
        // lowest CPU priority, so that applying the log and serving requests always go first:
        // the snapshot just takes longer on a busy server.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (storage, stored_meta) = (self.storage.clone(), meta.clone());
        let tid = Arc::new(parking_lot::Mutex::new(None));
        let thread_tid = tid.clone();
        let spawned = std::thread::Builder::new().name("raft-snapshot".into()).spawn(move || {
            *thread_tid.lock() = Some(yield_cpu_to_everything_else());
            // The encoded state is written and freed here: openraft keeps only the meta of a
            // snapshot it asked for, and reads the file when a follower needs it.
            let result = (|| -> Result<SnapshotTimes, std::io::Error> {
                let started = std::time::Instant::now();
                // One buffer the size of the last snapshot and a little more: growing it by
                // doubling instead copied and page-faulted twice the state, and unmapping the
                // old buffers stalled the server's other threads.
                let estimate = storage.snapshot_len() as usize;
                let buffer = Vec::with_capacity(estimate + estimate / 8 + (64 << 10));
                let bytes = postcard::to_extend(&p, buffer).map_err(std::io::Error::other)?;
                drop(p);
                let encoded = std::time::Instant::now();
                let header = stored_snapshot_header(&stored_meta, bytes.len()).map_err(std::io::Error::other)?;
                storage.snapshot_put_sync(&header, &bytes).map_err(std::io::Error::other)?;
                let written = std::time::Instant::now();
                let len = bytes.len();
                drop(bytes);
                Ok(SnapshotTimes {
                    bytes: len,
                    encode_ms: (encoded - started).as_millis() as u64,
                    write_ms: (written - encoded).as_millis() as u64,
                    free_ms: written.elapsed().as_millis() as u64,
                })
            })();
            *thread_tid.lock() = None;
            let _ = tx.send(result);
        });
        let write_err = |e: &std::io::Error| StorageIOError::write_snapshot(None, io_err(e));
        spawned.map_err(|e| write_err(&e))?;
        let done = match tokio::time::timeout(SNAPSHOT_STARVED_AFTER, &mut rx).await {
            Ok(done) => done,
            Err(_) => {
                stop_starving(&tid);
                rx.await
            }
        };
        let t = done.map_err(|_| write_err(&std::io::Error::other("the snapshot thread died")))?.map_err(|e| write_err(&e))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(index, bytes = t.bytes, encode_ms = t.encode_ms, write_ms = t.write_ms, free_ms = t.free_ms, "snapshot taken");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_state_is_the_encoding_of_a_stored_snapshot() {
        // Lengths around each varint boundary (1, 2 and 3 bytes).
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 100_000] {
            let meta = SnapshotMeta::<NodeId, ServerNode> { last_log_id: None, last_membership: Default::default(), snapshot_id: format!("s-{len}") };
            let bytes = vec![7u8; len];
            let whole = postcard::to_allocvec(&StoredSnapshot { meta: meta.clone(), bytes: bytes.clone() }).unwrap();
            let header = stored_snapshot_header(&meta, bytes.len()).unwrap();
            assert_eq!([header.as_slice(), &bytes].concat(), whole, "state of {} bytes", bytes.len());
            let decoded: StoredSnapshot = postcard::from_bytes(&[stored_snapshot_header(&meta, 3).unwrap(), vec![1, 2, 3]].concat()).unwrap();
            assert_eq!(decoded.bytes, vec![1, 2, 3]);
        }
    }
}
