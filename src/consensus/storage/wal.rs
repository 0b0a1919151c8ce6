//! The Raft log on disk: a directory of segment files, each named by the index of its first entry
//! (`00000000000000000001.seg`), holding records `u32 length, u32 CRC32, payload` where the
//! payload is the `u64` log index followed by the entry's bytes. The active (last) segment grows
//! until it passes `segment_bytes`, then a new one starts. New segments are zero-filled ahead of
//! time by a background thread, so that appends overwrite allocated blocks and `fdatasync` has
//! no file size or extent changes to commit to the filesystem journal (on ext4 such commits
//! queue behind other files' writeback, e.g. a snapshot being written).
//!
//! Memory holds only where each live entry is (`Slot`: offset and length in its segment, 8 bytes
//! an entry); reads `pread` the segment files. `append` writes the bytes and returns at once; the
//! caller's completion runs on the sync thread, which takes every completion queued so far, makes
//! one `fdatasync` per segment written since its last round, and then runs them all: concurrent
//! writers share an fsync (group commit). Purging deletes whole segment files, which is what keeps
//! the log's disk use bounded.
//!
//! Knows nothing of Raft or openraft: entries are opaque bytes. Main type: `Wal`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

/// Record header: the payload's length and the CRC32 of that length and the payload.
const HEADER_BYTES: usize = 8;
/// Every payload starts with the entry's log index.
const INDEX_BYTES: usize = 8;
const SEGMENT_SUFFIX: &str = ".seg";
/// The next segment, zero-filled and fsynced in the background, renamed into place on a roll.
const SPARE_FILE: &str = "spare.tmp";
/// Zeros are written this much at a time while preparing a spare.
const FILL_CHUNK: usize = 1 << 20;
/// The unit a disk writes whole. A record of the last segment that overlaps a sector of only
/// zeros was being written when the machine stopped: that sector never reached the disk.
const SECTOR_BYTES: usize = 512;

/// Runs when an append is on disk (`Ok`) or can no longer get there (`Err`).
pub type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("{path}, record at offset {offset}: {problem}")]
    Corrupt { path: PathBuf, offset: u64, problem: Problem },
    #[error("{path} goes on at index {found} where {expected} belongs: a segment is missing")]
    MissingSegment { path: PathBuf, expected: u64, found: u64 },
    #[error("log entries must be contiguous: the next index is {expected}, got {got}")]
    NotContiguous { expected: u64, got: u64 },
    #[error("log entry of {len} bytes is larger than a record can hold")]
    TooLarge { len: usize },
    #[error("an earlier write or fsync of the log failed; no more writes until a restart recovers the log")]
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The header is cut off, or its length is impossible or runs past the end of the file.
    BadLength,
    BadChecksum,
    /// The checksum holds but the record carries another index than its place in the log.
    WrongIndex {
        expected: u64,
        found: u64,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::BadLength => write!(f, "truncated or impossible length"),
            Problem::BadChecksum => write!(f, "checksum mismatch"),
            Problem::WrongIndex { expected, found } => write!(f, "holds index {found} where {expected} belongs"),
        }
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    file: File,
}

/// Where one live entry's record is in its segment. Offsets fit in u32 because a segment only
/// takes another record while it is under `segment_bytes` (at most 4 GiB, checked in `open`).
#[derive(Clone, Copy)]
struct Slot {
    offset: u32,
    len: u32,
}

impl Slot {
    fn end(&self) -> u64 {
        self.offset as u64 + HEADER_BYTES as u64 + self.len as u64
    }
}

struct State {
    /// By first index; the last one is the active segment, the only one written to.
    segments: BTreeMap<u64, Arc<Segment>>,
    active_len: u64,
    /// The index after the active segment's last record (its first index while it is empty).
    active_end: u64,
    /// Index of `slots[0]`.
    first: u64,
    slots: VecDeque<Slot>,
}

impl State {
    fn last(&self) -> Option<u64> {
        (!self.slots.is_empty()).then(|| self.first + self.slots.len() as u64 - 1)
    }

    fn active(&self) -> Option<&Arc<Segment>> {
        self.segments.values().next_back()
    }

    /// The segment holding `index` (the last one starting at or before it).
    fn segment_of(&self, index: u64) -> &Arc<Segment> {
        self.segments.range(..=index).next_back().map(|(_, s)| s).expect("a live entry lies in a segment")
    }
}

/// What the sync thread (or a synchronous sync) owes: completions waiting for the disk, the
/// segments written since the last round, and whether the directory gained a file.
#[derive(Default)]
struct Queue {
    waiting: Vec<Done>,
    dirty: Vec<Arc<Segment>>,
    dir_dirty: bool,
    /// A round is running; one at a time, so a later round never completes before an earlier one.
    busy: bool,
    stop: bool,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.dirty.is_empty() && !self.dir_dirty
    }

    fn mark_dirty(&mut self, segment: &Arc<Segment>) {
        if !self.dirty.iter().any(|s| Arc::ptr_eq(s, segment)) {
            self.dirty.push(segment.clone());
        }
    }
}

struct Round {
    waiting: Vec<Done>,
    dirty: Vec<Arc<Segment>>,
    dir_dirty: bool,
}

struct Shared {
    dir: PathBuf,
    dir_file: File,
    queue: Mutex<Queue>,
    changed: Condvar,
    /// Set by the first failed write or fsync: after that nobody can tell what is on disk.
    failed: AtomicBool,
    rounds: AtomicU64,
    appends: AtomicU64,
}

impl Shared {
    /// Start a round: wait for any running one to end, then take everything queued. Every
    /// completion taken here was queued after its bytes were written, so the fsyncs that follow
    /// started after those writes.
    fn begin_round(&self) -> Round {
        let mut q = self.queue.lock();
        while q.busy {
            self.changed.wait(&mut q);
        }
        q.busy = true;
        Round { waiting: std::mem::take(&mut q.waiting), dirty: std::mem::take(&mut q.dirty), dir_dirty: std::mem::take(&mut q.dir_dirty) }
    }

    fn sync(&self, round: &Round) -> Result<(), WalError> {
        for s in &round.dirty {
            s.file.sync_data().map_err(|error| WalError::Io { path: s.path.clone(), error })?;
        }
        if round.dir_dirty {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), WalError> {
        self.dir_file.sync_all().map_err(|error| WalError::Io { path: self.dir.clone(), error })
    }

    fn end_round(&self, waiting: Vec<Done>, result: &Result<(), WalError>) {
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        self.rounds.fetch_add(1, Ordering::Relaxed);
        for done in waiting {
            done(result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string())));
        }
        self.queue.lock().busy = false;
        self.changed.notify_all();
    }

    fn run_syncer(&self) {
        loop {
            {
                let mut q = self.queue.lock();
                while q.busy || q.is_empty() {
                    if q.stop && q.is_empty() && !q.busy {
                        return;
                    }
                    self.changed.wait(&mut q);
                }
            }
            let round = self.begin_round();
            let result = self.sync(&round);
            self.end_round(round.waiting, &result);
        }
    }
}

pub struct Wal {
    shared: Arc<Shared>,
    segment_bytes: u64,
    state: RwLock<State>,
    syncer: Option<JoinHandle<()>>,
    spare: Arc<Spare>,
}

#[derive(Default)]
struct Spare {
    /// A zero-filled, fsynced file at `SPARE_FILE`, waiting for the next roll.
    ready: Mutex<Option<File>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    /// Set on drop: a preparation under way gives up.
    stop: AtomicBool,
}

/// Write `bytes` zeros to a new file at `path` and fsync it; `None` if stopped half way.
fn zero_fill(path: &Path, bytes: u64, stop: &AtomicBool) -> io::Result<Option<File>> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
    let zeros = vec![0; FILL_CHUNK];
    let mut at = 0;
    while at < bytes {
        if stop.load(Ordering::Relaxed) {
            drop(file);
            let _ = fs::remove_file(path);
            return Ok(None);
        }
        let n = (bytes - at).min(FILL_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(Some(file))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |error| WalError::Io { path: path.to_path_buf(), error }
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

fn crc(len: &[u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Parse the record at `off`: its payload's range and its index, or what is wrong with it.
fn parse_record(data: &[u8], off: usize) -> Result<(std::ops::Range<usize>, u64), Problem> {
    let header = data.get(off..off + HEADER_BYTES).ok_or(Problem::BadLength)?;
    let len_bytes: [u8; 4] = header[..4].try_into().expect("4 bytes");
    let len = u32::from_le_bytes(len_bytes) as usize;
    let sum = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let start = off + HEADER_BYTES;
    let payload = start.checked_add(len).and_then(|end| data.get(start..end)).filter(|_| len >= INDEX_BYTES).ok_or(Problem::BadLength)?;
    if crc(&len_bytes, payload) != sum {
        return Err(Problem::BadChecksum);
    }
    Ok((start..start + len, u64::from_le_bytes(payload[..INDEX_BYTES].try_into().expect("8 bytes"))))
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Whether a bad record at `off` in the last segment is the remains of a write cut short by a
/// crash: it runs to the end of the file, only zeros follow it, or its part in some sector is
/// all zeros, a sector that never reached the disk (writes into a zero-filled segment may land
/// out of order). Like etcd's check for torn entries.
fn is_torn_tail(data: &[u8], off: usize) -> bool {
    let len = data.get(off..off + 4).map_or(0, |b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize);
    let end = off.saturating_add(HEADER_BYTES).saturating_add(len);
    if end >= data.len() || all_zero(&data[end..]) {
        return true;
    }
    let mut at = off;
    while at < end {
        let next = ((at / SECTOR_BYTES + 1) * SECTOR_BYTES).min(end);
        if all_zero(&data[at..next]) {
            return true;
        }
        at = next;
    }
    false
}

/// One segment file as recovery finds it.
struct Scanned {
    first: u64,
    path: PathBuf,
    /// (index, offset, payload length) of every good record.
    records: Vec<(u64, u64, u32)>,
    /// Where the good records end; only zeros (a preallocated tail) or a torn record follow.
    valid_len: u64,
    /// A torn record follows `valid_len` and has to be cut off.
    torn: bool,
}

fn scan_segment(first: u64, path: PathBuf, is_last: bool) -> Result<Scanned, WalError> {
    let data = fs::read(&path).map_err(io_at(&path))?;
    let mut records = Vec::new();
    let mut off = 0;
    let mut expected = first;
    let mut torn = false;
    while off < data.len() {
        if all_zero(&data[off..]) {
            break;
        }
        if off > u32::MAX as usize {
            return Err(WalError::Corrupt { path, offset: off as u64, problem: Problem::BadLength });
        }
        match parse_record(&data, off) {
            Ok((payload, index)) if index == expected => {
                records.push((index, off as u64, payload.len() as u32));
                expected += 1;
                off = payload.end;
            }
            Ok((_, found)) => return Err(WalError::Corrupt { path, offset: off as u64, problem: Problem::WrongIndex { expected, found } }),
            Err(_) if is_last && is_torn_tail(&data, off) => {
                torn = true;
                break;
            }
            Err(problem) => return Err(WalError::Corrupt { path, offset: off as u64, problem }),
        }
    }
    Ok(Scanned { first, path, records, valid_len: off as u64, torn })
}

impl Wal {
    /// Open (or create) the log in `dir`, dropping entries at or below `floor` (already purged).
    /// A record cut short at the end of the last segment is removed; any other damage is an error
    /// naming the file and offset.
    pub fn open(dir: &Path, floor: Option<u64>, segment_bytes: u64) -> Result<Wal, WalError> {
        assert!(segment_bytes > 0 && segment_bytes < u32::MAX as u64 / 2, "segment size must leave room in a u32 offset");
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let dir_file = File::open(dir).map_err(io_at(dir))?;
        let spare_path = dir.join(SPARE_FILE);
        match fs::remove_file(&spare_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(WalError::Io { path: spare_path, error: e }),
            _ => {}
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_at(dir))? {
            let entry = entry.map_err(io_at(dir))?;
            let name = entry.file_name();
            let Some(first) = name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)).and_then(|n| n.parse::<u64>().ok()) else { continue };
            found.push((first, entry.path()));
        }
        found.sort();

        let mut state = State { segments: BTreeMap::new(), active_len: 0, active_end: 0, first: 0, slots: VecDeque::new() };
        let mut dead = Vec::new();
        let count = found.len();
        for (n, (first, path)) in found.into_iter().enumerate() {
            let is_last = n + 1 == count;
            let scanned = scan_segment(first, path, is_last)?;
            if let Some(last) = state.last()
                && scanned.first != last + 1
            {
                return Err(WalError::MissingSegment { path: scanned.path, expected: last + 1, found: scanned.first });
            }
            let file = OpenOptions::new().read(true).write(true).open(&scanned.path).map_err(io_at(&scanned.path))?;
            if scanned.torn {
                tracing::warn!(
                    path = %scanned.path.display(),
                    offset = scanned.valid_len,
                    "removing a record cut short by a crash at the end of the Raft log"
                );
                file.set_len(scanned.valid_len).map_err(io_at(&scanned.path))?;
                file.sync_data().map_err(io_at(&scanned.path))?;
            }
            for &(index, offset, len) in &scanned.records {
                if floor.is_some_and(|f| index <= f) {
                    continue;
                }
                if state.slots.is_empty() {
                    // After a purge the log goes on right behind the purge point.
                    if let Some(f) = floor
                        && index != f + 1
                    {
                        return Err(WalError::MissingSegment { path: scanned.path, expected: f + 1, found: index });
                    }
                    state.first = index;
                }
                state.slots.push_back(Slot { offset: offset as u32, len });
            }
            let segment = Arc::new(Segment { first, path: scanned.path, file });
            if state.slots.is_empty() && !is_last {
                // Nothing live in it or before it: purged, or emptied before a jump in the log.
                dead.push(segment);
                continue;
            }
            state.active_len = scanned.valid_len;
            state.active_end = first + scanned.records.len() as u64;
            state.segments.insert(first, segment);
        }
        for s in dead {
            fs::remove_file(&s.path).map_err(io_at(&s.path))?;
        }

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            dir_file,
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            failed: AtomicBool::new(false),
            rounds: AtomicU64::new(0),
            appends: AtomicU64::new(0),
        });
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("raft-log-sync".into())
                .spawn(move || shared.run_syncer())
                .map_err(|error| WalError::Io { path: dir.to_path_buf(), error })?
        };
        let wal = Wal { shared, segment_bytes, state: RwLock::new(state), syncer: Some(syncer), spare: Arc::new(Spare::default()) };
        wal.prepare_spare();
        Ok(wal)
    }

    /// Start zero-filling the next segment in the background, unless one is ready or under way.
    fn prepare_spare(&self) {
        let mut worker = self.spare.worker.lock();
        if self.spare.ready.lock().is_some() || worker.as_ref().is_some_and(|w| !w.is_finished()) {
            return;
        }
        let (spare, path, bytes) = (self.spare.clone(), self.shared.dir.join(SPARE_FILE), self.segment_bytes);
        let started = std::thread::Builder::new().name("raft-log-prealloc".into()).spawn(move || match zero_fill(&path, bytes, &spare.stop) {
            Ok(Some(file)) => *spare.ready.lock() = Some(file),
            Ok(None) => {}
            Err(error) => tracing::warn!(path = %path.display(), %error, "could not prepare the next Raft log segment; it will grow as written"),
        });
        match started {
            Ok(handle) => *worker = Some(handle),
            Err(error) => tracing::warn!(%error, "could not start preparing the next Raft log segment"),
        }
    }

    /// Bytes the segments hold (the closed ones counted at the size limit they passed).
    pub fn bytes(&self) -> u64 {
        let st = self.state.read();
        st.segments.len().saturating_sub(1) as u64 * self.segment_bytes + st.active_len
    }

    /// The first and last live index, if there are entries.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let st = self.state.read();
        st.last().map(|last| (st.first, last))
    }

    /// How many appends there were and how many sync rounds (one fsync per segment written
    /// since the round before) made them durable: the ratio is what group commit saves.
    pub fn counts(&self) -> (u64, u64) {
        (self.shared.appends.load(Ordering::Relaxed), self.shared.rounds.load(Ordering::Relaxed))
    }

    /// Write `entries` (each index one past the one before) and return once they are readable;
    /// `done` runs on the sync thread once they are on disk. The first entry must follow the last
    /// live one; after a purge or truncation that left no entries it may start anywhere.
    pub fn append(&self, entries: Vec<(u64, Vec<u8>)>, done: Done) -> Result<(), WalError> {
        let mut st = self.state.write();
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(WalError::Failed);
        }
        let mut expected = st.last().map(|l| l + 1);
        for (index, bytes) in &entries {
            if let Some(e) = expected
                && *index != e
            {
                return Err(WalError::NotContiguous { expected: e, got: *index });
            }
            if bytes.len() > (u32::MAX as usize) - INDEX_BYTES {
                return Err(WalError::TooLarge { len: bytes.len() });
            }
            expected = Some(index + 1);
        }
        let result = self.write_records(&mut st, entries);
        if result.is_err() {
            // Part of the batch may be on disk: the in-memory index can no longer be trusted.
            self.shared.failed.store(true, Ordering::SeqCst);
        }
        result?;
        // Queued while the state lock is still held: no truncation can slip in between.
        self.shared.queue.lock().waiting.push(done);
        drop(st);
        self.shared.appends.fetch_add(1, Ordering::Relaxed);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn write_records(&self, st: &mut State, entries: Vec<(u64, Vec<u8>)>) -> Result<(), WalError> {
        let mut buf = Vec::new();
        let mut slots = Vec::new();
        for (index, bytes) in entries {
            let full = st.active_len + buf.len() as u64 >= self.segment_bytes;
            if st.segments.is_empty() || full || index != st.active_end {
                self.flush_buffer(st, &mut buf, &mut slots)?;
                self.roll(st, index)?;
            }
            let offset = st.active_len + buf.len() as u64;
            let len = (INDEX_BYTES + bytes.len()) as u32;
            let len_bytes = len.to_le_bytes();
            buf.extend_from_slice(&len_bytes);
            buf.extend_from_slice(&[0; 4]);
            let payload_at = buf.len();
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&bytes);
            let sum = crc(&len_bytes, &buf[payload_at..]);
            buf[payload_at - 4..payload_at].copy_from_slice(&sum.to_le_bytes());
            slots.push(Slot { offset: offset as u32, len });
            st.active_end = index + 1;
        }
        self.flush_buffer(st, &mut buf, &mut slots)
    }

    /// Write the buffered records to the end of the active segment and index them.
    fn flush_buffer(&self, st: &mut State, buf: &mut Vec<u8>, slots: &mut Vec<Slot>) -> Result<(), WalError> {
        if buf.is_empty() {
            return Ok(());
        }
        let active = st.active().expect("records are buffered for an active segment").clone();
        active.file.write_all_at(buf, st.active_len).map_err(io_at(&active.path))?;
        self.shared.queue.lock().mark_dirty(&active);
        st.active_len += buf.len() as u64;
        let first_index = st.active_end - slots.len() as u64;
        if st.slots.is_empty() {
            st.first = first_index;
        }
        st.slots.extend(slots.drain(..));
        buf.clear();
        Ok(())
    }

    /// Start a new active segment for `index`. With no live entries, every old segment is dead
    /// (purged or truncated away) and is removed; otherwise the old active segment is synced
    /// first, so that only the last segment can ever end in a torn record.
    fn roll(&self, st: &mut State, index: u64) -> Result<(), WalError> {
        if st.slots.is_empty() {
            for (_, s) in std::mem::take(&mut st.segments) {
                fs::remove_file(&s.path).map_err(io_at(&s.path))?;
            }
        } else if let Some(old) = st.active() {
            old.file.sync_data().map_err(io_at(&old.path))?;
        }
        let path = self.shared.dir.join(segment_name(index));
        let spare = self.spare.ready.lock().take();
        let file = match spare {
            Some(file) => {
                let from = self.shared.dir.join(SPARE_FILE);
                fs::rename(&from, &path).map_err(io_at(&path))?;
                file
            }
            None => OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_at(&path))?,
        };
        self.prepare_spare();
        st.segments.insert(index, Arc::new(Segment { first: index, path, file }));
        st.active_len = 0;
        st.active_end = index;
        // The new file's name must be on disk before anything written into it counts as durable.
        self.shared.queue.lock().dir_dirty = true;
        Ok(())
    }

    /// Read the live entries with index in `start..end`, in order.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>, WalError> {
        let st = self.state.read();
        let Some(last) = st.last() else { return Ok(Vec::new()) };
        let (start, end) = (start.max(st.first), end.min(last + 1));
        let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
        let mut index = start;
        while index < end {
            // One read for each run of records that sit back to back in one segment.
            let segment = st.segment_of(index);
            let next_segment = st.segments.range(index + 1..).next().map_or(u64::MAX, |(f, _)| *f);
            let run_start = index;
            let mut run_end = index + 1;
            while run_end < end.min(next_segment)
                && st.slots[(run_end - st.first) as usize].offset as u64 == st.slots[(run_end - 1 - st.first) as usize].end()
            {
                run_end += 1;
            }
            let from = st.slots[(run_start - st.first) as usize].offset as u64;
            let to = st.slots[(run_end - 1 - st.first) as usize].end();
            let mut data = vec![0; (to - from) as usize];
            segment.file.read_exact_at(&mut data, from).map_err(io_at(&segment.path))?;
            let mut off = 0;
            for i in run_start..run_end {
                let corrupt = |problem| WalError::Corrupt { path: segment.path.clone(), offset: from + off as u64, problem };
                let (payload, found) = parse_record(&data, off).map_err(corrupt)?;
                if found != i {
                    return Err(corrupt(Problem::WrongIndex { expected: i, found }));
                }
                out.push((i, data[payload.start + INDEX_BYTES..payload.end].to_vec()));
                off = payload.end;
            }
            index = run_end;
        }
        Ok(out)
    }

    /// Remove every entry at or after `from` and wait until that, and every append before it,
    /// is on disk.
    pub fn truncate(&self, from: u64) -> Result<(), WalError> {
        let mut st = self.state.write();
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(WalError::Failed);
        }
        let Some(last) = st.last() else { return Ok(()) };
        if from > last {
            return Ok(());
        }
        let from = from.max(st.first);
        let cut = st.slots[(from - st.first) as usize].offset as u64;
        let keep = st.segment_of(from).clone();
        let later: Vec<u64> = st.segments.range(keep.first + 1..).map(|(f, _)| *f).collect();
        for first in &later {
            let s = st.segments.remove(first).expect("listed above");
            fs::remove_file(&s.path).map_err(io_at(&s.path))?;
        }
        keep.file.set_len(cut).map_err(io_at(&keep.path))?;
        let keep_slots = (from - st.first) as usize;
        st.slots.truncate(keep_slots);
        st.active_len = cut;
        st.active_end = from;
        drop(st);

        let round = self.shared.begin_round();
        let result = self.shared.sync(&round).and_then(|()| {
            keep.file.sync_data().map_err(io_at(&keep.path))?;
            if !later.is_empty() { self.shared.sync_dir() } else { Ok(()) }
        });
        self.shared.end_round(round.waiting, &result);
        result
    }

    /// Forget every entry at or before `upto` and delete the segment files that hold nothing
    /// else. The active segment stays, even when all it holds is purged. The caller records the
    /// purge point durably first: a deleted file may come back after a crash, and `open` drops it
    /// again by that point.
    pub fn purge(&self, upto: u64) -> Result<(), WalError> {
        let mut st = self.state.write();
        if let Some(last) = st.last()
            && upto >= st.first
        {
            let n = (upto.min(last) + 1 - st.first) as usize;
            st.slots.drain(..n);
            st.first += n as u64;
        }
        let firsts: Vec<u64> = st.segments.keys().copied().collect();
        let mut gone = Vec::new();
        for pair in firsts.windows(2) {
            // A segment holds indexes below the next one's first.
            if pair[1] <= upto.saturating_add(1) {
                gone.push(st.segments.remove(&pair[0]).expect("listed above"));
            }
        }
        // Unlinking a 16 MiB file takes the file system a while: not with appends locked out.
        // A crash before the files go leaves segments behind the purge point, which reopening
        // drops.
        drop(st);
        for s in gone {
            fs::remove_file(&s.path).map_err(io_at(&s.path))?;
        }
        Ok(())
    }

    /// Put everything written so far on disk and wait for it.
    pub fn sync_all(&self) -> Result<(), WalError> {
        let segments: Vec<Arc<Segment>> = self.state.read().segments.values().cloned().collect();
        let round = self.shared.begin_round();
        let result = self.shared.sync(&round).and_then(|()| {
            for s in &segments {
                s.file.sync_data().map_err(io_at(&s.path))?;
            }
            self.shared.sync_dir()
        });
        self.shared.end_round(round.waiting, &result);
        result
    }

    #[cfg(test)]
    fn segment_files(&self) -> Vec<u64> {
        let mut v: Vec<u64> = fs::read_dir(&self.shared.dir)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(SEGMENT_SUFFIX)?.parse().ok())
            .collect();
        v.sort();
        v
    }

    /// Hold the sync thread as if a round were running, so appends queue up (tests only).
    #[cfg(test)]
    fn hold_syncer(&self) {
        let mut q = self.shared.queue.lock();
        while q.busy {
            self.shared.changed.wait(&mut q);
        }
        q.busy = true;
    }

    #[cfg(test)]
    fn release_syncer(&self) {
        self.shared.queue.lock().busy = false;
        self.shared.changed.notify_all();
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shared.queue.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
        self.spare.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.spare.worker.lock().take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// How long a test waits for completions before calling it a hang.
    const DEADLINE: Duration = Duration::from_secs(30);

    fn entry(i: u64) -> Vec<u8> {
        format!("entry {i}").into_bytes()
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, entry(i))).collect()
    }

    /// Append and wait until the sync thread reports the entries durable.
    fn append_durably(wal: &Wal, batch: Vec<(u64, Vec<u8>)>) {
        let (tx, rx) = mpsc::channel();
        wal.append(batch, Box::new(move |r| tx.send(r).unwrap())).unwrap();
        rx.recv_timeout(DEADLINE).unwrap().unwrap();
    }

    fn indexes(wal: &Wal) -> Vec<u64> {
        wal.read(0, u64::MAX).unwrap().into_iter().map(|(i, _)| i).collect()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        let mut v: Vec<PathBuf> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
        v.sort();
        v.pop().unwrap()
    }

    /// Where the records of `range` end in a segment that starts with them.
    fn records_end(range: std::ops::RangeInclusive<u64>) -> u64 {
        range.map(record_len).sum()
    }

    fn record_len(i: u64) -> u64 {
        (HEADER_BYTES + INDEX_BYTES + entry(i).len()) as u64
    }

    #[test]
    fn appended_entries_read_back_before_and_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, entries(1..=5));
            append_durably(&wal, entries(6..=6));
            assert_eq!(wal.read(2, 4).unwrap(), vec![(2, entry(2)), (3, entry(3))]);
            assert_eq!(wal.bounds(), Some((1, 6)));
        }
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=6));
        append_durably(&wal, entries(7..=7));
        assert_eq!(wal.bounds(), Some((1, 7)));
    }

    #[test]
    fn append_refuses_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        append_durably(&wal, entries(1..=3));
        let err = wal.append(entries(5..=5), Box::new(|_| {})).unwrap_err();
        assert!(matches!(err, WalError::NotContiguous { expected: 4, got: 5 }), "{err}");
        append_durably(&wal, entries(4..=4));
    }

    #[test]
    fn reopen_cuts_off_a_half_written_record_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, entries(1..=5));
        }
        let seg = last_segment(dir.path());
        let good_len = records_end(1..=5);
        {
            // A crash mid-write: a header promising 100 bytes and only some of them.
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            let mut half = 100u32.to_le_bytes().to_vec();
            half.extend_from_slice(&[0xab; 30]);
            f.write_all_at(&half, good_len).unwrap();
        }
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(indexes(&wal), vec![1, 2, 3, 4, 5]);
        assert_eq!(fs::metadata(&seg).unwrap().len(), good_len);
        append_durably(&wal, entries(6..=6));
        drop(wal);
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=6));
    }

    #[test]
    fn reopen_cuts_off_a_last_record_with_a_bad_checksum() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, entries(1..=3));
        }
        let seg = last_segment(dir.path());
        OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(&[0xff], records_end(1..=3) - 1).unwrap();
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(indexes(&wal), vec![1, 2]);
    }

    #[test]
    fn reopen_cuts_off_a_write_whose_middle_never_reached_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let big = |i: u64| (i, vec![i as u8 | 1; 700]);
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, vec![big(1)]);
            append_durably(&wal, vec![big(2), big(3)]);
        }
        // Record 2 spans sectors 1 and 2 (bytes 716..1432): sector 2 is lost, later ones landed.
        let seg = last_segment(dir.path());
        OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(&[0; SECTOR_BYTES], 2 * SECTOR_BYTES as u64).unwrap();
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), vec![big(1)]);
    }

    #[test]
    fn appends_fill_a_preallocated_segment_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join(segment_name(1));
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            // Make the first segment a zero-filled one, as a roll onto a ready spare does.
            let file = zero_fill(&seg, 1 << 20, &AtomicBool::new(false)).unwrap().unwrap();
            let mut st = wal.state.write();
            st.segments.insert(1, Arc::new(Segment { first: 1, path: seg.clone(), file }));
            st.active_end = 1;
            drop(st);
            append_durably(&wal, entries(1..=5));
        }
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=5));
        assert_eq!(fs::metadata(&seg).unwrap().len(), 1 << 20, "a zero tail is free space, not damage");
        append_durably(&wal, entries(6..=6));
        drop(wal);
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=6));
    }

    #[test]
    fn rolls_use_the_zero_filled_spare() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), None, 4096).unwrap();
        // Wait (bounded) for the spare the open started preparing.
        let deadline = std::time::Instant::now() + DEADLINE;
        while wal.spare.ready.lock().is_none() {
            assert!(std::time::Instant::now() < deadline, "no spare segment prepared");
            std::thread::yield_now();
        }
        append_durably(&wal, entries(1..=1));
        assert_eq!(fs::metadata(dir.path().join(segment_name(1))).unwrap().len(), 4096);
    }

    #[test]
    fn reopen_refuses_a_damaged_record_in_the_middle() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, entries(1..=5));
        }
        let seg = last_segment(dir.path());
        let second = record_len(1);
        // Flip a byte in the second record's entry bytes.
        OpenOptions::new().write(true).open(&seg).unwrap().write_all_at(b"X", second + (HEADER_BYTES + INDEX_BYTES) as u64).unwrap();
        let err = Wal::open(dir.path(), None, 1 << 20).err().expect("damage in the middle is an error");
        match err {
            WalError::Corrupt { path, offset, problem } => {
                assert_eq!((path, offset, problem), (seg, second, Problem::BadChecksum));
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn reopen_refuses_damage_in_an_earlier_segment_even_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=20));
            assert!(wal.segment_files().len() > 2);
        }
        let first = dir.path().join(segment_name(1));
        let len = fs::metadata(&first).unwrap().len();
        OpenOptions::new().write(true).open(&first).unwrap().set_len(len - 3).unwrap();
        assert!(matches!(Wal::open(dir.path(), None, 64), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn reopen_refuses_a_missing_segment() {
        let dir = tempfile::tempdir().unwrap();
        let files = {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=20));
            wal.segment_files()
        };
        fs::remove_file(dir.path().join(segment_name(files[1]))).unwrap();
        assert!(matches!(Wal::open(dir.path(), None, 64), Err(WalError::MissingSegment { .. })));
    }

    #[test]
    fn truncate_then_append_replaces_the_tail_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=20));
            wal.truncate(8).unwrap();
            assert_eq!(wal.bounds(), Some((1, 7)));
            assert!(wal.segment_files().iter().all(|&f| f <= 8));
            append_durably(&wal, vec![(8, b"new eight".to_vec()), (9, b"new nine".to_vec())]);
            wal.truncate(100).unwrap();
            assert_eq!(wal.bounds(), Some((1, 9)));
        }
        let wal = Wal::open(dir.path(), None, 64).unwrap();
        let all = wal.read(0, u64::MAX).unwrap();
        assert_eq!(all[..7], entries(1..=7)[..]);
        assert_eq!(all[7..], [(8, b"new eight".to_vec()), (9, b"new nine".to_vec())]);
    }

    #[test]
    fn truncate_everything_then_start_again() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
        append_durably(&wal, entries(0..=4));
        wal.truncate(0).unwrap();
        assert_eq!(wal.bounds(), None);
        append_durably(&wal, entries(0..=1));
        assert_eq!(indexes(&wal), vec![0, 1]);
    }

    #[test]
    fn purge_deletes_whole_segments_behind_the_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=40));
            let before = wal.segment_files();
            wal.purge(25).unwrap();
            let after = wal.segment_files();
            assert!(after.len() < before.len(), "{before:?} -> {after:?}");
            // Kept: the segment holding 26 and everything after it.
            assert!(after[0] <= 26 && after.iter().filter(|&&f| f <= 26).count() == 1, "{after:?}");
            assert_eq!(wal.bounds(), Some((26, 40)));
            assert_eq!(wal.read(0, 28).unwrap(), entries(26..=27));
        }
        let wal = Wal::open(dir.path(), Some(25), 64).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(26..=40));
    }

    #[test]
    fn purge_past_the_end_then_append_further_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 1 << 20).unwrap();
            append_durably(&wal, entries(1..=3));
            wal.purge(3).unwrap();
            assert_eq!(wal.bounds(), None);
            // The active segment stays, holding only purged entries.
            assert_eq!(wal.segment_files(), vec![1]);
            wal.purge(10).unwrap();
            append_durably(&wal, entries(11..=12));
            assert_eq!(wal.segment_files(), vec![11]);
        }
        let wal = Wal::open(dir.path(), Some(10), 1 << 20).unwrap();
        assert_eq!(indexes(&wal), vec![11, 12]);
    }

    #[test]
    fn reopen_drops_segments_a_crash_left_behind_the_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=20));
        }
        // As if purge(12) was recorded but the crash came before any file was deleted.
        let wal = Wal::open(dir.path(), Some(12), 64).unwrap();
        assert_eq!(wal.bounds(), Some((13, 20)));
        assert!(wal.segment_files().iter().filter(|&&f| f <= 13).count() == 1);
    }

    #[test]
    fn reopen_refuses_a_log_that_does_not_go_on_from_the_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        let files = {
            let wal = Wal::open(dir.path(), None, 64).unwrap();
            append_durably(&wal, entries(1..=20));
            wal.segment_files()
        };
        // Purged up to 2, but the segment holding 3 is gone.
        fs::remove_file(dir.path().join(segment_name(files[0]))).unwrap();
        assert!(matches!(Wal::open(dir.path(), Some(2), 64), Err(WalError::MissingSegment { expected: 3, .. })));
    }

    #[test]
    fn concurrent_appends_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), None, 1 << 20).unwrap());
        append_durably(&wal, entries(1..=1));
        let next = Arc::new(Mutex::new(2u64));
        let (tx, rx) = mpsc::channel();
        wal.hold_syncer();
        let rounds_before = wal.counts().1;
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let (wal, next, tx) = (wal.clone(), next.clone(), tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let mut n = next.lock();
                        let tx = tx.clone();
                        let i = *n;
                        wal.append(entries(i..=i), Box::new(move |r| tx.send((i, r)).unwrap())).unwrap();
                        *n += 1;
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert!(rx.try_recv().is_err(), "nothing completes while the sync thread is held");
        wal.release_syncer();
        let mut done: Vec<u64> = (0..400).map(|_| rx.recv_timeout(DEADLINE).map(|(i, r)| r.map(|()| i)).unwrap().unwrap()).collect();
        done.sort();
        assert_eq!(done, (2..=401).collect::<Vec<_>>());
        assert_eq!(wal.counts().1 - rounds_before, 1, "400 appends, one round of fsyncs");
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=401));
    }

    #[test]
    fn every_completion_runs_under_concurrent_appends_and_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), None, 512).unwrap());
        let next = Arc::new(Mutex::new(1u64));
        let (tx, rx) = mpsc::channel();
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (wal, next, tx) = (wal.clone(), next.clone(), tx.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        let mut n = next.lock();
                        let tx = tx.clone();
                        let i = *n;
                        wal.append(entries(i..=i + 1), Box::new(move |r| tx.send(r).unwrap())).unwrap();
                        *n += 2;
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        for _ in 0..400 {
            rx.recv_timeout(DEADLINE).unwrap().unwrap();
        }
        assert!(wal.segment_files().len() > 1);
        drop(wal);
        let wal = Wal::open(dir.path(), None, 512).unwrap();
        assert_eq!(wal.read(0, u64::MAX).unwrap(), entries(1..=800));
    }
}
