//! The one place that calls sled. Raft's log, vote, committed index and latest snapshot live
//! here; if sled ever falls short, this file is what a redb port replaces.

use std::ops::RangeBounds;
use std::path::Path;

/// sled's page cache; its 1 GiB default is far more than a log tail and a snapshot need.
const SLED_CACHE_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
#[error("storage: {0}")]
pub struct StorageError(#[from] sled::Error);

#[derive(Clone)]
pub struct Storage {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn index_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[..8]);
    u64::from_be_bytes(b)
}

impl Storage {
    pub fn open(dir: &Path) -> Result<Storage, StorageError> {
        let db = sled::Config::new().path(dir).cache_capacity(SLED_CACHE_BYTES).open()?;
        Ok(Storage { log: db.open_tree("raft_log")?, meta: db.open_tree("raft_meta")?, db })
    }

    /// A throwaway store for tests.
    pub fn temporary() -> Result<Storage, StorageError> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(Storage { log: db.open_tree("raft_log")?, meta: db.open_tree("raft_meta")?, db })
    }

    pub fn log_range<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        use std::ops::Bound::*;
        let start = match range.start_bound() {
            Included(i) => key(*i),
            Excluded(i) => key(i.saturating_add(1)),
            Unbounded => key(0),
        };
        let mut out = Vec::new();
        for kv in self.log.range(start..) {
            let (k, v) = kv?;
            let i = index_of(&k);
            if !range.contains(&i) {
                break;
            }
            out.push((i, v.to_vec()));
        }
        Ok(out)
    }

    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        Ok(self.log.last()?.map(|(k, v)| (index_of(&k), v.to_vec())))
    }

    /// Append entries and wait until they are on disk.
    pub async fn log_append(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for (i, v) in entries {
            batch.insert(&key(i), v);
        }
        self.log.apply_batch(batch)?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Remove every entry at or after `index` (conflicting entries from an old leader).
    pub async fn log_truncate_from(&self, index: u64) -> Result<(), StorageError> {
        self.remove_keys(self.log.range(key(index)..))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// Remove every entry at or before `index` (already in a snapshot).
    pub fn log_purge_upto(&self, index: u64) -> Result<(), StorageError> {
        self.remove_keys(self.log.range(..=key(index)))
    }

    fn remove_keys(&self, it: sled::Iter) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for kv in it {
            batch.remove(kv?.0);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    pub fn meta_get(&self, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.meta.get(name)?.map(|v| v.to_vec()))
    }

    /// Store a metadata value; `durable` waits for the disk, as votes and snapshots need.
    pub async fn meta_put(&self, name: &str, value: Vec<u8>, durable: bool) -> Result<(), StorageError> {
        self.meta.insert(name, value)?;
        if durable {
            self.db.flush_async().await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_range_truncate_and_purge_keep_order() {
        let s = Storage::temporary().unwrap();
        s.log_append((1..=10).map(|i| (i, vec![i as u8])).collect()).await.unwrap();
        assert_eq!(s.log_range(3..5).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4]);
        s.log_truncate_from(8).await.unwrap();
        assert_eq!(s.log_last().unwrap().unwrap().0, 7);
        s.log_purge_upto(2).unwrap();
        assert_eq!(s.log_range(..).unwrap().first().unwrap().0, 3);
    }

    #[tokio::test]
    async fn index_keys_sort_numerically_past_255() {
        let s = Storage::temporary().unwrap();
        s.log_append(vec![(255, vec![]), (256, vec![]), (70_000, vec![])]).await.unwrap();
        assert_eq!(s.log_range(200..).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![255, 256, 70_000]);
    }

    #[tokio::test]
    async fn meta_values_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Storage::open(dir.path()).unwrap();
            s.meta_put("vote", b"x".to_vec(), true).await.unwrap();
        }
        let s = Storage::open(dir.path()).unwrap();
        assert_eq!(s.meta_get("vote").unwrap(), Some(b"x".to_vec()));
    }
}
