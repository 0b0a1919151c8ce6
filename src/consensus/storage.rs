//! Everything Raft keeps on disk, in one directory: the log (`wal/`, a segmented write-ahead log
//! with group commit, see `wal`), the vote, the purge point, the committed index and the latest
//! snapshot, each in a file of its own. This module and `wal` are the only code that touches
//! these files; `log_store` and `state_machine` see opaque bytes.

mod wal;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use wal::Wal;
pub use wal::{Done, WalError};

/// A new log segment starts once the active one passes this: a roll (a file creation and a
/// directory fsync) every 16 MiB is rare, and a snapshot's worth of purged log (8192 entries of a
/// few hundred bytes) frees whole files soon after.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const WAL_DIR: &str = "wal";
/// The latest snapshot lives in a file of its own: writing megabytes into the log store's own
/// database and flushing them competed with the Raft log's flushes (measured with sled and
/// benches/kv_vs_etcd.sh: 2446 req/s with the snapshot inside, 3454 req/s with it in a file).
const SNAPSHOT_FILE: &str = "snapshot.bin";
const VOTE_FILE: &str = "vote";
const PURGED_FILE: &str = "last_purged";
const COMMITTED_FILE: &str = "committed";
/// What sled (the log store before the WAL) left in this directory.
const SLED_FILES: [&str; 3] = ["conf", "db", "blobs"];

/// Snapshots are written and synced this much at a time (see `write_durably`). Measured on ext4
/// with a log fsync loop beside a 14 MiB snapshot write: the worst log fsync took 50-137 ms with
/// the snapshot written whole, under 10 ms in 1 MiB chunks into zero-filled log segments.
const SYNC_CHUNK_BYTES: usize = 1 << 20;
/// A snapshot file at least this big is written back paced, and when replaced, freed a slice at
/// a time; smaller ones take too little disk time to matter, and are done with at once.
const LARGE_FILE_BYTES: u64 = 64 << 20;
/// Write-back chunk of a paced (snapshot) file.
const PACED_CHUNK_BYTES: usize = 256 << 10;

/// Small files (vote, purge point, committed index) are `u32 CRC32 of the rest, u32 length,
/// bytes`, so that a torn or damaged one is noticed instead of misread.
const META_HEADER_BYTES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("raft log: {0}")]
    Wal(#[from] WalError),
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path} is damaged (checksum mismatch)")]
    Damaged { path: PathBuf },
    #[error(
        "{path} was written by an older Trellis that kept the Raft log in sled; this version keeps it in a write-ahead log and does \
         not convert the old one. To keep this server's data, stop it, move {path} away and start the server again: it rejoins the \
         cluster and receives a snapshot from the leader. A cluster with one server: save a snapshot with the older version \
         (`trellis snapshot save FILE`), move {path} away, start this version and `trellis snapshot restore FILE`"
    )]
    SledDataDir { path: PathBuf },
}

/// The Raft data directory. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    wal: Wal,
    /// Rewritten in place on every commit, never fsynced: openraft only takes it as a hint.
    committed: File,
    /// A directory of our own under the system's temporary directory, removed on drop.
    temporary: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.temporary {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |error| StorageError::Io { path: path.to_path_buf(), error }
}

fn meta_frame(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(META_HEADER_BYTES + bytes.len());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    let sum = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&sum.to_le_bytes());
    out
}

/// The bytes inside a meta file, or `None` if its checksum or length does not hold.
fn meta_unframe(raw: &[u8]) -> Option<&[u8]> {
    let sum = u32::from_le_bytes(raw.get(..4)?.try_into().ok()?);
    let len = u32::from_le_bytes(raw.get(4..8)?.try_into().ok()?) as usize;
    let framed = raw.get(4..META_HEADER_BYTES.checked_add(len)?)?;
    (crc32fast::hash(framed) == sum).then(|| &framed[4..])
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(StorageError::Io { path: path.to_path_buf(), error }),
    }
}

/// Replace `path` durably: write a temporary file, fsync it, rename it over and fsync the directory.
/// Large files go out a chunk at a time (see `write_durably_parts`): the disk never holds a
/// snapshot's worth of queued writeback that the log's next fsync would wait behind.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    write_durably_parts(dir, name, &[bytes], false)
}

/// `write_durably` of the concatenation of `parts`, without concatenating them in memory.
///
/// A large file is written back as it goes, a chunk at a time (`sync_file_range`: start the
/// chunk's writeback, then wait for the previous chunk's), so that no burst of dirty pages piles
/// up in front of the log's fsyncs, and without an fsync per chunk: each of those also committed
/// the file system's journal and flushed the disk's cache, and a 200 MB snapshot's 200 of them
/// tripled the whole cluster's write p99 while it lasted. One fsync at the end makes it durable.
/// `paced`: chunks of 256 KiB, and after waiting for one, wait three times as long again, so
/// that the file keeps the disk busy at most about a quarter of the time and a log fsync (whose
/// cache flush waits for whatever is in flight) never finds more than two small chunks ahead of
/// it.
fn write_durably_parts(dir: &Path, name: &str, parts: &[&[u8]], paced: bool) -> Result<(), StorageError> {
    use std::os::fd::AsRawFd;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_at(&tmp))?;
    let (mut written, mut unsynced_from, mut previous) = (0i64, 0i64, None::<(i64, i64)>);
    let fd = f.as_raw_fd();
    let range = |offset: i64, len: i64, flags: libc::c_uint| -> std::io::Result<()> {
        // SAFETY: only integer arguments, on a descriptor that `f` keeps open meanwhile.
        match unsafe { libc::sync_file_range(fd, offset, len, flags) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    let paced = paced && parts.iter().map(|p| p.len() as u64).sum::<u64>() >= LARGE_FILE_BYTES;
    let chunk_bytes = if paced { PACED_CHUNK_BYTES } else { SYNC_CHUNK_BYTES };
    for part in parts {
        for chunk in part.chunks(chunk_bytes) {
            f.write_all(chunk).map_err(io_at(&tmp))?;
            written += chunk.len() as i64;
            if written - unsynced_from >= chunk_bytes as i64 {
                let this = (unsynced_from, written - unsynced_from);
                range(this.0, this.1, libc::SYNC_FILE_RANGE_WRITE).map_err(io_at(&tmp))?;
                if let Some((offset, len)) = previous {
                    let started = std::time::Instant::now();
                    range(offset, len, libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER)
                        .map_err(io_at(&tmp))?;
                    if paced {
                        std::thread::sleep(started.elapsed() * 3);
                    }
                }
                previous = Some(this);
                unsynced_from = written;
            }
        }
    }
    f.sync_all().map_err(io_at(&tmp))?;
    // Replacing a large file frees all its blocks at once, inside the rename, and the journal
    // commit that carries that stalled every other fsync for tens of milliseconds. Keep the old
    // file alive under a second name across the rename, then free it a slice at a time.
    // (A small file is freed at once: cheap, and the disk never holds three snapshots.)
    let old = dir.join(format!("{name}.old"));
    let keep_old = paced && fs::metadata(&path).is_ok_and(|m| m.len() >= LARGE_FILE_BYTES) && {
        let _ = fs::remove_file(&old);
        fs::hard_link(&path, &old).is_ok()
    };
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))?;
    if keep_old {
        release_gradually(&old);
    }
    Ok(())
}

/// Shrink `path` by 8 MiB at a time, pausing between steps, then remove it. Best effort: a
/// file left behind is removed by the next large snapshot (or stays, harmless, until then).
fn release_gradually(path: &Path) {
    const STEP: u64 = 8 << 20;
    let Ok(f) = fs::OpenOptions::new().write(true).open(path) else { return };
    let mut len = f.metadata().map_or(0, |m| m.len());
    while len > 0 {
        len = len.saturating_sub(STEP);
        if f.set_len(len).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(f);
    let _ = fs::remove_file(path);
}

fn read_meta(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match read_if_exists(path)? {
        None => Ok(None),
        Some(raw) => meta_unframe(&raw).map(|b| Some(b.to_vec())).ok_or_else(|| StorageError::Damaged { path: path.to_path_buf() }),
    }
}

/// The purge point file: the purged index, then the caller's bytes.
fn read_purged(dir: &Path) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
    let path = dir.join(PURGED_FILE);
    let Some(b) = read_meta(&path)? else { return Ok(None) };
    let index = b.get(..8).ok_or_else(|| StorageError::Damaged { path: path.clone() })?;
    Ok(Some((u64::from_le_bytes(index.try_into().expect("8 bytes")), b[8..].to_vec())))
}

impl Storage {
    pub fn open(dir: &Path) -> Result<Storage, StorageError> {
        Self::open_with(dir, SEGMENT_BYTES, false)
    }

    fn open_with(dir: &Path, segment_bytes: u64, temporary: bool) -> Result<Storage, StorageError> {
        let wal_dir = dir.join(WAL_DIR);
        if !wal_dir.exists() && SLED_FILES.iter().any(|f| dir.join(f).exists()) {
            return Err(StorageError::SledDataDir { path: dir.to_path_buf() });
        }
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let floor = read_purged(dir)?.map(|(index, _)| index);
        let wal = Wal::open(&wal_dir, floor, segment_bytes)?;
        let committed_path = dir.join(COMMITTED_FILE);
        let committed =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&committed_path).map_err(io_at(&committed_path))?;
        Ok(Storage { inner: Arc::new(Inner { dir: dir.to_path_buf(), wal, committed, temporary }) })
    }

    /// A throwaway store for tests, in a directory of its own that goes away with the last clone.
    pub fn temporary() -> Result<Storage, StorageError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let name = format!("trellis-raft-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(name);
        Self::open_with(&dir, SEGMENT_BYTES, true)
    }

    /// Run blocking file work (fsyncs, renames) off the async workers.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> Result<T, StorageError> + Send + 'static) -> Result<T, StorageError> {
        let inner = self.inner.clone();
        let dir = inner.dir.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| StorageError::Io { path: dir, error: io::Error::other(e) })?
    }

    /// Roughly how many bytes the log takes on disk.
    pub fn log_bytes(&self) -> u64 {
        self.inner.wal.bytes()
    }

    pub fn log_range<R: RangeBounds<u64>>(&self, range: R) -> Result<Vec<(u64, Vec<u8>)>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        Ok(self.inner.wal.read(start, end)?)
    }

    pub fn log_last(&self) -> Result<Option<(u64, Vec<u8>)>, StorageError> {
        let Some((_, last)) = self.inner.wal.bounds() else { return Ok(None) };
        Ok(self.inner.wal.read(last, last + 1)?.pop())
    }

    /// Write entries and return once they are readable; `done` runs (on the log's sync thread)
    /// once they are on disk, sharing the fsync with whatever else was written meanwhile.
    pub fn log_append(&self, entries: Vec<(u64, Vec<u8>)>, done: Done) -> Result<(), StorageError> {
        Ok(self.inner.wal.append(entries, done)?)
    }

    /// Remove every entry at or after `index` (conflicting entries from an old leader), durably.
    pub async fn log_truncate_from(&self, index: u64) -> Result<(), StorageError> {
        self.blocking(move |s| Ok(s.wal.truncate(index)?)).await
    }

    /// Record the purge point durably (`index` and the caller's `point`, read back by
    /// `purge_point`), then drop every entry at or before `index` (already in a snapshot).
    pub async fn log_purge_upto(&self, index: u64, point: Vec<u8>) -> Result<(), StorageError> {
        self.blocking(move |s| {
            let mut bytes = index.to_le_bytes().to_vec();
            bytes.extend_from_slice(&point);
            write_durably(&s.dir, PURGED_FILE, &meta_frame(&bytes))?;
            Ok(s.wal.purge(index)?)
        })
        .await
    }

    pub fn purge_point(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(read_purged(&self.inner.dir)?.map(|(_, point)| point))
    }

    pub fn vote(&self) -> Result<Option<Vec<u8>>, StorageError> {
        read_meta(&self.inner.dir.join(VOTE_FILE))
    }

    /// Store the vote and wait until it is on disk.
    pub async fn save_vote(&self, vote: Vec<u8>) -> Result<(), StorageError> {
        self.blocking(move |s| write_durably(&s.dir, VOTE_FILE, &meta_frame(&vote))).await
    }

    /// The committed index as last written, or `None` if it never was or a crash tore it.
    pub fn committed(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let path = self.inner.dir.join(COMMITTED_FILE);
        Ok(read_if_exists(&path)?.and_then(|raw| meta_unframe(&raw).map(<[u8]>::to_vec)))
    }

    /// Overwrite the committed index in place without waiting for the disk: one small write per
    /// commit. A torn write fails its checksum and reads back as `None`.
    pub fn save_committed(&self, committed: &[u8]) -> Result<(), StorageError> {
        let path = || self.inner.dir.join(COMMITTED_FILE);
        self.inner.committed.write_all_at(&meta_frame(committed), 0).map_err(|error| StorageError::Io { path: path(), error })
    }

    /// Replace the snapshot durably: write a temporary file, fsync it, rename it over the old
    /// one and fsync the directory, off the async threads.
    pub async fn snapshot_put(&self, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.blocking(move |s| write_durably(&s.dir, SNAPSHOT_FILE, &bytes)).await
    }

    /// The size of the latest snapshot file (0 when there is none).
    pub fn snapshot_len(&self) -> u64 {
        std::fs::metadata(self.inner.dir.join(SNAPSHOT_FILE)).map_or(0, |m| m.len())
    }

    /// Store the snapshot file whose bytes are `header` then `body`, durably (blocking).
    pub fn snapshot_put_sync(&self, header: &[u8], body: &[u8]) -> Result<(), StorageError> {
        write_durably_parts(&self.inner.dir, SNAPSHOT_FILE, &[header, body], true)
    }

    pub fn snapshot_get(&self) -> Result<Option<Vec<u8>>, StorageError> {
        read_if_exists(&self.inner.dir.join(SNAPSHOT_FILE))
    }

    /// Put everything written so far on disk.
    pub async fn flush(&self) -> Result<(), StorageError> {
        let (appends, rounds) = self.inner.wal.counts();
        tracing::info!(appends, fsync_rounds = rounds, "raft log: appends since start and the sync rounds that made them durable");
        self.blocking(|s| Ok(s.wal.sync_all()?)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn append(s: &Storage, entries: Vec<(u64, Vec<u8>)>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        s.log_append(entries, Box::new(move |r| tx.send(r).unwrap())).unwrap();
        rx.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn log_range_truncate_and_purge_keep_order() {
        let s = Storage::temporary().unwrap();
        append(&s, (1..=10).map(|i| (i, vec![i as u8])).collect()).await;
        assert_eq!(s.log_range(3..5).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(s.log_range(3..=5).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![3, 4, 5]);
        s.log_truncate_from(8).await.unwrap();
        assert_eq!(s.log_last().unwrap().unwrap(), (7, vec![7]));
        s.log_purge_upto(2, b"point".to_vec()).await.unwrap();
        assert_eq!(s.log_range(..).unwrap().first().unwrap().0, 3);
        assert_eq!(s.purge_point().unwrap(), Some(b"point".to_vec()));
    }

    #[tokio::test]
    async fn temporary_store_removes_its_directory() {
        let s = Storage::temporary().unwrap();
        let dir = s.inner.dir.clone();
        append(&s, vec![(1, vec![1])]).await;
        assert!(dir.join(WAL_DIR).exists());
        drop(s);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn snapshot_file_survives_reopen_and_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Storage::open(dir.path()).unwrap();
            assert_eq!(s.snapshot_get().unwrap(), None);
            s.snapshot_put(b"one".to_vec()).await.unwrap();
            s.snapshot_put(b"two".to_vec()).await.unwrap();
        }
        let s = Storage::open(dir.path()).unwrap();
        assert_eq!(s.snapshot_get().unwrap(), Some(b"two".to_vec()));
    }

    #[tokio::test]
    async fn vote_purge_point_and_log_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Storage::open(dir.path()).unwrap();
            s.save_vote(b"x".to_vec()).await.unwrap();
            append(&s, (1..=10).map(|i| (i, vec![i as u8])).collect()).await;
            s.log_purge_upto(4, b"p4".to_vec()).await.unwrap();
            s.save_committed(b"c9").unwrap();
        }
        let s = Storage::open(dir.path()).unwrap();
        assert_eq!(s.vote().unwrap(), Some(b"x".to_vec()));
        assert_eq!(s.purge_point().unwrap(), Some(b"p4".to_vec()));
        assert_eq!(s.committed().unwrap(), Some(b"c9".to_vec()));
        assert_eq!(s.log_range(..).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), (5..=10).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_torn_committed_index_reads_as_none_and_a_torn_vote_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Storage::open(dir.path()).unwrap();
            s.save_vote(b"vote".to_vec()).await.unwrap();
            s.save_committed(b"a longer committed value").unwrap();
            s.save_committed(b"short").unwrap();
            assert_eq!(s.committed().unwrap(), Some(b"short".to_vec()));
        }
        for name in [COMMITTED_FILE, VOTE_FILE] {
            let f = OpenOptions::new().write(true).open(dir.path().join(name)).unwrap();
            f.write_all_at(b"\xff", 9).unwrap();
        }
        let s = Storage::open(dir.path()).unwrap();
        assert_eq!(s.committed().unwrap(), None);
        assert!(matches!(s.vote(), Err(StorageError::Damaged { .. })));
    }

    #[test]
    fn a_sled_data_directory_is_refused_with_directions() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("conf"), b"segment_size: 524288").unwrap();
        fs::write(dir.path().join("db"), b"").unwrap();
        let err = Storage::open(dir.path()).err().expect("a sled directory is refused");
        assert!(matches!(err, StorageError::SledDataDir { .. }));
        let msg = err.to_string();
        assert!(msg.contains("older Trellis") && msg.contains("snapshot restore"), "{msg}");
        assert!(!dir.path().join(WAL_DIR).exists(), "nothing is written next to the old store");
    }
}
