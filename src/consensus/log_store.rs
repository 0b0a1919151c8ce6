//! Raft's log and vote on sled (storage-v2 `RaftLogStorage`). Entries are durable before
//! openraft is told they are.

use std::fmt::Debug;
use std::ops::RangeBounds;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};

use super::storage::Storage;
use super::{NodeId, TypeConfig, io_err};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

#[derive(Clone)]
pub struct LogStore {
    storage: Storage,
}

impl LogStore {
    pub fn new(storage: Storage) -> LogStore {
        LogStore { storage }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StorageError<NodeId>> {
        let raw = self.storage.meta_get(name).map_err(|e| StorageIOError::read(io_err(&e)))?;
        raw.map(|b| postcard::from_bytes(&b).map_err(|e| StorageIOError::read(io_err(&e)).into())).transpose()
    }

    async fn put_meta<T: serde::Serialize>(&self, name: &str, v: &T, durable: bool) -> Result<(), StorageError<NodeId>> {
        let b = postcard::to_allocvec(v).map_err(|e| StorageIOError::write(io_err(&e)))?;
        self.storage.meta_put(name, b, durable).await.map_err(|e| StorageIOError::write(io_err(&e)).into())
    }
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
        let last_purged: Option<LogId<NodeId>> = self.meta(LAST_PURGED)?;
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
        self.put_meta(VOTE, vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed: a lost committed index is only re-learned from the leader.
        self.put_meta(COMMITTED, &committed, false).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
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
        let res = self.storage.log_append(rows).await.map_err(|e| std::io::Error::other(e.to_string()));
        let failed = res.as_ref().err().map(|e| StorageIOError::write_logs(io_err(e)));
        callback.log_io_completed(res);
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.storage.log_truncate_from(log_id.index).await.map_err(|e| StorageIOError::write_logs(io_err(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Record the purge point first, so that a crash in between never loses track of it.
        self.put_meta(LAST_PURGED, &log_id, true).await?;
        self.storage.log_purge_upto(log_id.index).map_err(|e| StorageIOError::write_logs(io_err(&e)).into())
    }
}
