//! The Raft state machine: applies committed entries to the in-memory `state::Store` and keeps
//! the latest snapshot in its file (`storage`). On start it loads that snapshot; openraft then
//! replays the log after it, so the applied state itself never needs to be written anywhere else.

use parking_lot::RwLock;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use super::storage::Storage;
use super::{NodeId, ServerNode, TypeConfig, io_err};
use crate::state::{Outcome, StateData, Store};

type Membership = StoredMembership<NodeId, ServerNode>;

/// What a snapshot holds: the tables plus the Raft position they correspond to. Cloning it is
/// cheap: the tables are persistent maps that share their nodes.
#[derive(Clone, Serialize, Deserialize)]
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

/// Make the calling thread the last in line for CPU: the `SCHED_IDLE` policy (it runs only on
/// a core that would otherwise idle, and a waking thread preempts it at once) and nice 19 for
/// good measure. Any thread may lower its own priority, but only a privileged one may raise it
/// again, so an encoding that must hurry is done over by a thread at normal priority
/// (`StateMachineSnapshotter::build_snapshot`). Failures leave the thread as it was.
fn yield_cpu_to_everything_else() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the calls only read their integer arguments and `param`; `who`/`pid` 0 is the
    // calling thread.
    unsafe {
        let _ = libc::setpriority(libc::PRIO_PROCESS, 0, 19);
        let _ = libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
    }
}

/// Put the calling thread's disk I/O in the idle class: mq-deadline and BFQ serve it when no
/// other I/O waits (the log's fsyncs go first), and mq-deadline's aging still serves it within
/// seconds on a disk that is never idle. Failure leaves the thread as it was.
fn idle_io_class() {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    const IOPRIO_CLASS_SHIFT: libc::c_long = 13;
    // SAFETY: reads only its integer arguments; `who` 0 is the calling thread.
    let _ = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0 as libc::c_long, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT) };
}

/// How long a snapshot may wait for idle CPU before it must hurry: a server that is never idle
/// must still compact its log.
const SNAPSHOT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

/// A postcard output that appends to a `Vec` and gives up once `cancel` is set (looked at every
/// 64 KiB, a few tens of microseconds of encoding).
struct Cancellable<'a> {
    out: Vec<u8>,
    cancel: &'a AtomicBool,
    look_at: usize,
}

impl Cancellable<'_> {
    const EVERY: usize = 64 << 10;

    fn look(&mut self) -> postcard::Result<()> {
        if self.out.len() >= self.look_at {
            self.look_at = self.out.len() + Self::EVERY;
            if self.cancel.load(Ordering::Relaxed) {
                return Err(postcard::Error::SerializeBufferFull);
            }
        }
        Ok(())
    }
}

impl postcard::ser_flavors::Flavor for Cancellable<'_> {
    type Output = Vec<u8>;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.out.push(data);
        self.look()
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.out.extend_from_slice(data);
        self.look()
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.out)
    }
}

/// A snapshot's state, encoded.
struct Encoded {
    bytes: Vec<u8>,
    encode_ms: u64,
}

/// Encode `p` into one buffer the size of the last snapshot (`estimate`) and a little more:
/// growing it by doubling instead copied and page-faulted twice the state, and unmapping the
/// old buffers stalled the server's other threads. With `cancel`, gives up (`Ok(None)`) once
/// `cancel` is set. `p` is dropped here, on the calling thread.
fn encode_state(p: SnapshotPayload, estimate: usize, cancel: Option<&AtomicBool>) -> std::io::Result<Option<Encoded>> {
    let started = std::time::Instant::now();
    let buffer = Vec::with_capacity(estimate + estimate / 8 + (64 << 10));
    let encoded = match cancel {
        Some(cancel) => match postcard::serialize_with_flavor(&p, Cancellable { out: buffer, cancel, look_at: 0 }) {
            Err(_) if cancel.load(Ordering::Relaxed) => return Ok(None),
            r => r,
        },
        None => postcard::to_extend(&p, buffer),
    };
    drop(p);
    let bytes = encoded.map_err(std::io::Error::other)?;
    Ok(Some(Encoded { bytes, encode_ms: started.elapsed().as_millis() as u64 }))
}

/// Write an encoded state after `meta` into the snapshot file, durably, then free it.
fn write_encoded(storage: &Storage, meta: &SnapshotMeta<NodeId, ServerNode>, e: Encoded) -> std::io::Result<SnapshotTimes> {
    let started = std::time::Instant::now();
    let header = stored_snapshot_header(meta, e.bytes.len()).map_err(std::io::Error::other)?;
    storage.snapshot_put_sync(&header, &e.bytes).map_err(std::io::Error::other)?;
    let written = std::time::Instant::now();
    let bytes = e.bytes.len();
    drop(e.bytes);
    Ok(SnapshotTimes {
        bytes,
        encode_ms: e.encode_ms,
        write_ms: (written - started).as_millis() as u64,
        free_ms: written.elapsed().as_millis() as u64,
    })
}

/// The applied state, shared with readers (HTTP, DNS) through `Arc<RwLock<Store>>`.
pub struct StateMachine {
    store: Arc<RwLock<Store>>,
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    storage: Storage,
    snapshot_seq: u64,
    /// `raft_snapshot_log_bytes`: a patient snapshot hurries once the log has grown by this
    /// much (or by the last snapshot's size, if larger) while it waited.
    snapshot_log_bytes: u64,
}

impl StateMachine {
    /// Open the state machine, loading the latest snapshot from `storage` if there is one.
    /// `snapshot_log_bytes` is `raft_snapshot_log_bytes`.
    pub fn open(storage: Storage, store: Arc<RwLock<Store>>, snapshot_log_bytes: u64) -> Result<StateMachine, StorageError<NodeId>> {
        let mut sm = StateMachine { store, last_applied: None, membership: Membership::default(), storage, snapshot_seq: 0, snapshot_log_bytes };
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
            snapshot_log_bytes: self.snapshot_log_bytes,
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
    snapshot_log_bytes: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineSnapshotter {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let p = self.payload.take().ok_or_else(|| StorageIOError::write_snapshot(None, io_err(&std::io::Error::other("snapshot already built"))))?;
        let snapshot_id = match p.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, self.seq),
            None => format!("--{}", self.seq),
        };
        let meta = SnapshotMeta { last_log_id: p.last_applied, last_membership: p.membership.clone(), snapshot_id };
        // Encoding (and dropping) a copy of every table takes a whole core for a second or
        // more at a million keys. Do it on a thread of its own at the lowest CPU priority, so
        // that applying the log and serving requests always go first: the snapshot just takes
        // longer on a busy server. On a server that is never idle that thread might not run at
        // all while the log grows without bound, so once it has waited `SNAPSHOT_PATIENCE`, or
        // the log has grown by its limit meanwhile, a thread at normal priority encodes a copy of
        // the same state (cheap to take), and the patient one gives up when it next runs.
        let write_err = |e: &std::io::Error| -> StorageError<NodeId> { StorageIOError::write_snapshot(None, io_err(e)).into() };
        let died = || write_err(&std::io::Error::other("the snapshot thread died"));
        let estimate = self.storage.snapshot_len() as usize;
        let hurry = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let encoder = |p: SnapshotPayload, patient: bool, tx: tokio::sync::mpsc::Sender<std::io::Result<Option<Encoded>>>| {
            let hurry = hurry.clone();
            std::thread::Builder::new().name("raft-snapshot".into()).spawn(move || {
                if patient {
                    yield_cpu_to_everything_else();
                }
                // A send that finds the other encoder's state taken drops this one here.
                let _ = tx.blocking_send(encode_state(p, estimate, patient.then_some(&*hurry)));
            })
        };
        // The copy and the sender for the encoder at normal priority, until it is started (the
        // channel ends, and reports a dead thread, only once every encoder holding it is gone).
        let mut standby = Some((p.clone(), tx.clone()));
        encoder(p, true, tx).map_err(|e| write_err(&e))?;
        // Hurry once the log has grown meanwhile by its limit (or the last snapshot, if that is
        // larger, as for the size trigger).
        let urgent_log_bytes = self.storage.log_bytes() + self.snapshot_log_bytes.max(self.storage.snapshot_len());
        let started = std::time::Instant::now();
        let mut look = tokio::time::interval(std::time::Duration::from_millis(250));
        let encoded = loop {
            tokio::select! {
                done = rx.recv() => match done {
                    Some(Ok(Some(encoded))) => break encoded,
                    // The patient encoder gave up; the other one is under way.
                    Some(Ok(None)) => {}
                    Some(Err(e)) => return Err(write_err(&e)),
                    None => return Err(died()),
                },
                _ = look.tick(), if standby.is_some() => {
                    if (started.elapsed() >= SNAPSHOT_PATIENCE || self.storage.log_bytes() > urgent_log_bytes)
                        && let Some((p, tx)) = standby.take()
                    {
                        tracing::info!(
                            waited_ms = started.elapsed().as_millis() as u64,
                            log_bytes = self.storage.log_bytes(),
                            "the snapshot found too little idle CPU; it is encoded again at normal priority"
                        );
                        hurry.store(true, Ordering::Relaxed);
                        encoder(p, false, tx).map_err(|e| write_err(&e))?;
                    }
                }
            }
        };
        drop(rx);
        let spare = standby.map(|(p, _)| p);
        // Written at normal CPU priority but in the idle I/O class (a large file is also paced
        // by `snapshot_put_sync` itself), on a thread of its own, which also frees the state
        // and the unused copy. openraft keeps only the meta of a snapshot it asked for, and
        // reads the file when a follower needs it.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (storage, stored_meta) = (self.storage.clone(), meta.clone());
        std::thread::Builder::new()
            .name("raft-snapshot-write".into())
            .spawn(move || {
                idle_io_class();
                drop(spare);
                let _ = done_tx.send(write_encoded(&storage, &stored_meta, encoded));
            })
            .map_err(|e| write_err(&e))?;
        let t = done_rx.await.map_err(|_| died())?.map_err(|e| write_err(&e))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        tracing::info!(index, bytes = t.bytes, encode_ms = t.encode_ms, write_ms = t.write_ms, free_ms = t.free_ms, "snapshot taken");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload whose encoding is about `keys` x 1 KiB.
    fn payload(keys: usize) -> SnapshotPayload {
        use crate::state::{Command, KvVerb, Request, TxnOp};
        let mut store = Store::new();
        for i in 0..keys {
            let op = TxnOp { verb: KvVerb::Set, key: format!("k/{i}"), value: Some(vec![7u8; 1024]), flags: 0, index: 0, session: String::new() };
            store.apply(i as u64 + 1, &Request { now_ms: 0, command: Command::Txn(vec![op]) });
        }
        SnapshotPayload { last_applied: None, membership: Membership::default(), data: store.data().clone() }
    }

    #[test]
    fn an_encoding_told_to_give_up_does_and_one_left_alone_matches_postcard() {
        let p = payload(200);
        let whole = postcard::to_allocvec(&p).unwrap();
        assert!(whole.len() > 2 * Cancellable::EVERY, "the payload spans several looks");
        let go_on = AtomicBool::new(false);
        let done = encode_state(p.clone(), 0, Some(&go_on)).unwrap().expect("not told to give up");
        assert_eq!(done.bytes, whole);
        assert_eq!(encode_state(p.clone(), whole.len(), None).unwrap().expect("no cancel").bytes, whole);
        let give_up = AtomicBool::new(true);
        assert!(encode_state(p, 0, Some(&give_up)).unwrap().is_none(), "told to give up, it must");
    }

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
