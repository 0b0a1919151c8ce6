//! Raft's log and vote (storage-v2 `RaftLogStorage`) on `storage`'s write-ahead log. `append`
//! returns once entries are readable and tells openraft they are durable from the log's sync
//! thread, after the fsync that covers them. openraft 0.9 waits for that before its next append
//! (`RaftCore::append_to_log`), so a leader makes one fsync per client write and a follower one
//! per AppendEntries batch; the log's group commit pays only once appends overlap.

use std::fmt::Debug;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};

use super::storage::Storage;
use super::{NodeId, TypeConfig, io_err};

#[derive(Clone)]
pub struct LogStore {
    storage: Storage,
}

impl LogStore {
    pub fn new(storage: Storage) -> LogStore {
        LogStore { storage }
    }
}

fn decode<T: serde::de::DeserializeOwned>(raw: Option<Vec<u8>>) -> Result<Option<T>, StorageError<NodeId>> {
    raw.map(|b| postcard::from_bytes(&b).map_err(|e| StorageIOError::read(io_err(&e)).into())).transpose()
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError<NodeId>> {
    postcard::to_allocvec(v).map_err(|e| StorageIOError::write(io_err(&e)).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let rows = self.storage.log_range(range).map_err(|e| StorageIOError::read_logs(io_err(&e)))?;
        rows.into_iter().map(|(_, b)| postcard::from_bytes(&b).map_err(|e| StorageIOError::read_logs(io_err(&e)).into())).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let raw = self.storage.purge_point().map_err(|e| StorageIOError::read(io_err(&e)))?;
        let last_purged: Option<LogId<NodeId>> = decode(raw)?;
        let last = match self.storage.log_last().map_err(|e| StorageIOError::read_logs(io_err(&e)))? {
            Some((_, b)) => {
                let e: Entry<TypeConfig> = postcard::from_bytes(&b).map_err(|e| StorageIOError::read_logs(io_err(&e)))?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let b = encode(vote)?;
        self.storage.save_vote(b).await.map_err(|e| StorageIOError::write_vote(io_err(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        decode(self.storage.vote().map_err(|e| StorageIOError::read_vote(io_err(&e)))?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed: a lost committed index is only re-learned from the leader.
        let b = encode(&committed)?;
        self.storage.save_committed(&b).map_err(|e| StorageIOError::write(io_err(&e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let raw = self.storage.committed().map_err(|e| StorageIOError::read(io_err(&e)))?;
        Ok(decode::<Option<LogId<NodeId>>>(raw)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for e in entries {
            let b = postcard::to_allocvec(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, io_err(&err)))?;
            rows.push((e.log_id.index, b));
        }
        self.storage.log_append(rows, Box::new(move |res| callback.log_io_completed(res))).map_err(|e| StorageIOError::write_logs(io_err(&e)).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.storage.log_truncate_from(log_id.index).await.map_err(|e| StorageIOError::write_logs(io_err(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // The purge point is on disk before any entry goes, so a crash in between never loses it.
        let point = encode(&log_id)?;
        self.storage.log_purge_upto(log_id.index, point).await.map_err(|e| StorageIOError::write_logs(io_err(&e)).into())
    }
}
