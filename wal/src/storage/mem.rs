//! [`MemStorage`]: the in-memory [`Storage`], which can simulate a crash and inject faults.
//!
//! The log only ever appends to files, truncates the tail of the last one, creates, renames and
//! removes whole files, and syncs file data and the directory. [`MemStorage`] models exactly
//! what survives a crash under those operations: file data up to the last successful sync, and
//! directory entries as of the last directory sync. A truncation, like a write, is durable only
//! once a later sync succeeds. A failed sync is modelled the way Linux behaves: the dirty pages
//! are marked clean, so a later successful sync does not bring them back; by default none of
//! them reached the disk, and with [`MemStorage::persist_on_failed_sync`] a seeded prefix did
//! (the pages written before the error), so what a failed sync leaves is unknown.
//!
//! A slow disk is modelled too: [`MemStorage::slow_syncs`] makes every data sync take a set
//! time, and [`MemStorage::hold_syncs`] stops data syncs at a gate until
//! [`MemStorage::release_syncs`], so that a test can observe what the log does while one is in
//! progress. Like a real `fdatasync`, a sync in progress never blocks reads of the file.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Storage, StorageFile};

#[derive(Default)]
struct MemFileState {
    /// What reads see (the page cache).
    data: Vec<u8>,
    /// What would survive a crash now.
    durable: Vec<u8>,
    /// Lowest position written or truncated since the last sync: the next sync makes
    /// `data[dirty_from..]` durable (and cuts `durable` there first). `None`: nothing below the
    /// end of `durable` changed; the next sync appends what `data` has past it.
    dirty_from: Option<usize>,
}

#[derive(Default)]
struct MemFile {
    state: Mutex<MemFileState>,
}

#[derive(Default)]
struct MemDir {
    live: BTreeMap<String, Arc<MemFile>>,
    durable: BTreeMap<String, Arc<MemFile>>,
}

/// An in-memory directory that can simulate a crash and fail syncs on demand.
#[derive(Clone, Default)]
pub struct MemStorage {
    dir: Arc<Mutex<MemDir>>,
    faults: Arc<Faults>,
}

#[derive(Default)]
struct Faults {
    syncs: AtomicU64,
    /// Syncs numbered at or after this (1-based) fail with EIO; 0 = never.
    fail_syncs_from: AtomicU64,
    /// Non-zero: a failed data sync persists a prefix of the dirty bytes, its length drawn
    /// from this xorshift state.
    failed_sync_rng: AtomicU64,
    writes: AtomicU64,
    /// Data writes numbered at or after this (1-based) fail; 0 = never.
    fail_writes_from: AtomicU64,
    /// The errno those writes fail with (EIO, ENOSPC, ...).
    fail_writes_errno: AtomicU64,
    /// Microseconds every data sync takes before it does anything; 0 = no delay.
    sync_delay_us: AtomicU64,
    /// Set by [`MemStorage::mount_read_only`]: every request for write access fails.
    read_only_mount: AtomicBool,
    /// The gate data syncs stop at while it is held.
    gate: Mutex<SyncGate>,
    gate_moved: Condvar,
}

#[derive(Default)]
struct SyncGate {
    held: bool,
    /// Data syncs stopped at the gate right now.
    waiting: u64,
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain byte vectors behind, which are
    // still consistent enough for a test double to go on.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a simulated crash treats data written since the last sync.
#[derive(Debug, Clone, Copy)]
pub enum CrashMode {
    /// Everything not synced is lost.
    DropUnsynced,
    /// A prefix of each file's unsynced bytes survives (a torn write); `seed` picks its length.
    TearUnsynced {
        /// Picks how much of each file's unsynced tail survives.
        seed: u64,
    },
}

impl MemStorage {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, the `n`-th sync (data or directory, counting from 1 since creation) and
    /// every later one fail with EIO, dropping the dirty data as Linux does.
    pub fn fail_syncs_from(&self, n: u64) {
        self.faults.fail_syncs_from.store(n, Ordering::SeqCst);
    }

    /// From now on, the `n`-th data write (`write_all_at`, counting from 1 since creation) and
    /// every later one fail with `errno` (`libc::ENOSPC`, `libc::EIO`, ...); `n` = 0: writes succeed again
    /// (space was freed, the disk fixed). A failing write is a short write: the first half of
    /// its bytes reach the page cache (never the disk until a sync), as `write(2)` on a disk
    /// that fills up part-way leaves them.
    pub fn fail_writes_from(&self, n: u64, errno: i32) {
        self.faults
            .fail_writes_errno
            .store(errno as u64, Ordering::SeqCst);
        self.faults.fail_writes_from.store(n, Ordering::SeqCst);
    }

    /// From now on every data sync (`sync_data`) takes `delay` before it starts (a slow or
    /// overloaded disk); `Duration::ZERO` restores full speed. Reads of the file meanwhile go on
    /// as they would beside a real `fdatasync` in progress.
    pub fn slow_syncs(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.faults.sync_delay_us.store(us, Ordering::SeqCst);
    }

    /// From now on every data sync stops at a gate, before it has made anything durable,
    /// until [`MemStorage::release_syncs`]: the longest possible slow sync, under the test's
    /// control. [`MemStorage::syncs_waiting`] says how many are stopped there.
    pub fn hold_syncs(&self) {
        lock(&self.faults.gate).held = true;
    }

    /// Opens the gate of [`MemStorage::hold_syncs`]: the syncs stopped there go on.
    pub fn release_syncs(&self) {
        lock(&self.faults.gate).held = false;
        self.faults.gate_moved.notify_all();
    }

    /// Data syncs stopped at the gate of [`MemStorage::hold_syncs`] right now.
    pub fn syncs_waiting(&self) -> u64 {
        lock(&self.faults.gate).waiting
    }

    /// Waits until at least `n` data syncs are stopped at the gate, or `timeout` passes;
    /// returns whether they are.
    pub fn wait_syncs_waiting(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut gate = lock(&self.faults.gate);
        while gate.waiting < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            gate = self
                .faults
                .gate_moved
                .wait_timeout(gate, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// A data sync's slow-disk faults: the delay of [`MemStorage::slow_syncs`], then the gate
    /// of [`MemStorage::hold_syncs`]. Runs before the sync touches the file, so reads go on.
    fn slow_sync_faults(&self) {
        let us = self.faults.sync_delay_us.load(Ordering::SeqCst);
        if us > 0 {
            // The fault itself is the delay: a disk that takes this long to flush.
            std::thread::sleep(Duration::from_micros(us));
        }
        let mut gate = lock(&self.faults.gate);
        if !gate.held {
            return;
        }
        gate.waiting += 1;
        self.faults.gate_moved.notify_all();
        while gate.held {
            gate = self
                .faults
                .gate_moved
                .wait(gate)
                .unwrap_or_else(|p| p.into_inner());
        }
        gate.waiting -= 1;
        self.faults.gate_moved.notify_all();
    }

    /// From now on the directory behaves like a read-only mount (a backup mounted `ro`), where
    /// not even root may write: opening a file for writing, creating, removing and renaming
    /// fail with EROFS, and so do directory syncs, so that a test sees any attempt to change
    /// the directory. Reading goes on.
    pub fn mount_read_only(&self) {
        self.faults.read_only_mount.store(true, Ordering::SeqCst);
    }

    /// Fails with EROFS on a directory made read-only by [`MemStorage::mount_read_only`].
    fn writable_mount(&self) -> io::Result<()> {
        if self.faults.read_only_mount.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(EROFS));
        }
        Ok(())
    }

    /// Data writes attempted so far.
    pub fn write_count(&self) -> u64 {
        self.faults.writes.load(Ordering::SeqCst)
    }

    /// From now on, a failed data sync persists a prefix of the file's dirty bytes, of a length
    /// drawn from `seed` (from none to all): the pages written before the error reached the
    /// disk. Without this, a failed sync persists none of them.
    pub fn persist_on_failed_sync(&self, seed: u64) {
        self.faults
            .failed_sync_rng
            .store(seed | 1, Ordering::SeqCst);
    }

    /// How many of `dirty` bytes a failed sync persists.
    fn failed_sync_prefix(&self, dirty: usize) -> usize {
        let mut drawn = 0;
        let _ = self
            .faults
            .failed_sync_rng
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| {
                if x == 0 {
                    return None;
                }
                let next = xorshift(x);
                drawn = next;
                Some(next)
            });
        if drawn == 0 {
            0
        } else {
            (drawn % (dirty as u64 + 1)) as usize
        }
    }

    /// Syncs attempted so far.
    pub fn sync_count(&self) -> u64 {
        self.faults.syncs.load(Ordering::SeqCst)
    }

    /// The directory as it would be found after a power cut right now.
    pub fn crash(&self, mode: CrashMode) -> MemStorage {
        let dir = lock(&self.dir);
        let mut durable = BTreeMap::new();
        let mut rng = match mode {
            CrashMode::DropUnsynced => 0,
            CrashMode::TearUnsynced { seed } => seed | 1,
        };
        for (name, file) in &dir.durable {
            let st = lock(&file.state);
            let mut bytes = st.durable.clone();
            if rng != 0 && st.data.len() > bytes.len() && st.data.starts_with(&bytes) {
                rng = xorshift(rng);
                let extra = (rng % (st.data.len() - bytes.len() + 1) as u64) as usize;
                let end = bytes.len() + extra;
                bytes.extend_from_slice(&st.data[st.durable.len()..end]);
            }
            let f = Arc::new(MemFile {
                state: Mutex::new(MemFileState {
                    data: bytes.clone(),
                    durable: bytes,
                    dirty_from: None,
                }),
            });
            durable.insert(name.clone(), f);
        }
        MemStorage {
            dir: Arc::new(Mutex::new(MemDir {
                live: durable.clone(),
                durable,
            })),
            faults: Arc::default(),
        }
    }

    /// Flips one bit of a file's contents (both live and durable), for corruption tests.
    pub fn flip_bit(&self, name: &str, bit: u64) -> io::Result<()> {
        let dir = lock(&self.dir);
        let file = dir.live.get(name).ok_or_else(not_found)?;
        let mut st = lock(&file.state);
        let byte = (bit / 8) as usize;
        if byte >= st.data.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bit past end"));
        }
        st.data[byte] ^= 1 << (bit % 8);
        if byte < st.durable.len() {
            st.durable[byte] ^= 1 << (bit % 8);
        }
        Ok(())
    }

    /// Length of a file as reads see it.
    pub fn file_len(&self, name: &str) -> io::Result<u64> {
        let dir = lock(&self.dir);
        let file = dir.live.get(name).ok_or_else(not_found)?;
        Ok(lock(&file.state).data.len() as u64)
    }

    fn sync_outcome(&self) -> io::Result<()> {
        let n = self.faults.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.faults.fail_syncs_from.load(Ordering::SeqCst);
        if from != 0 && n >= from {
            return Err(io::Error::from_raw_os_error(EIO));
        }
        Ok(())
    }

    fn write_outcome(&self) -> io::Result<()> {
        let n = self.faults.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let from = self.faults.fail_writes_from.load(Ordering::SeqCst);
        if from != 0 && n >= from {
            let errno = self.faults.fail_writes_errno.load(Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(
                i32::try_from(errno).unwrap_or(EIO),
            ));
        }
        Ok(())
    }
}

/// EIO, the same number on every Unix this runs on.
const EIO: i32 = 5;
/// EROFS, the same number on every Unix this runs on.
pub(super) const EROFS: i32 = 30;
/// EBADF, what a write through a file opened for reading only fails with.
pub(super) const EBADF: i32 = 9;

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn not_found() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "no such file")
}

struct MemHandle {
    file: Arc<MemFile>,
    storage: MemStorage,
    /// Opened with [`Storage::open_read`]: writes fail, as through a real read-only descriptor.
    read_only: bool,
}

impl MemHandle {
    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(EBADF));
        }
        Ok(())
    }
}

impl StorageFile for MemHandle {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let st = lock(&self.file.state);
        let pos = usize::try_from(pos).unwrap_or(usize::MAX);
        if pos >= st.data.len() {
            return Ok(0);
        }
        let n = buf.len().min(st.data.len() - pos);
        buf[..n].copy_from_slice(&st.data[pos..pos + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.writable()?;
        let outcome = self.storage.write_outcome();
        let buf = match &outcome {
            Ok(()) => buf,
            Err(_) => &buf[..buf.len() / 2],
        };
        let mut st = lock(&self.file.state);
        let pos = pos as usize;
        if st.data.len() < pos + buf.len() {
            st.data.resize(pos + buf.len(), 0);
        }
        st.data[pos..pos + buf.len()].copy_from_slice(buf);
        if pos < st.durable.len() {
            st.dirty_from = Some(st.dirty_from.map_or(pos, |d| d.min(pos)));
        }
        outcome
    }
    fn sync_data(&self) -> io::Result<()> {
        self.storage.slow_sync_faults();
        let outcome = self.storage.sync_outcome();
        let mut st = lock(&self.file.state);
        let st = &mut *st;
        // What this sync is about: everything from the lowest change on.
        let from = st
            .dirty_from
            .take()
            .unwrap_or(st.durable.len())
            .min(st.data.len());
        match outcome {
            Ok(()) => {
                // Bytes already durable below `from` (or lost to an earlier failed sync) stay
                // as they are; from `from` on the disk becomes the page cache.
                st.durable.truncate(from);
                st.durable.extend_from_slice(&st.data[from..]);
                Ok(())
            }
            Err(e) => {
                // Linux marks the dirty pages clean and forgets them: a seeded prefix reached
                // the disk before the error (none by default), the rest never will. A pending
                // truncation is lost too. The file gets the page cache's length; bytes that
                // never arrived keep what the disk had there, zeros past its old end.
                let dirty = st.data.len() - from;
                let kept = self.storage.failed_sync_prefix(dirty);
                let new_len = st.durable.len().max(st.data.len());
                st.durable.resize(new_len, 0);
                let (data, durable) = (&st.data, &mut st.durable);
                durable[from..from + kept].copy_from_slice(&data[from..from + kept]);
                Err(e)
            }
        }
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.file.state).data.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        let mut st = lock(&self.file.state);
        let len = len as usize;
        st.data.resize(len, 0);
        // Like a write, the new length reaches the disk at the next successful sync.
        if len < st.durable.len() {
            st.dirty_from = Some(st.dirty_from.map_or(len, |d| d.min(len)));
        }
        Ok(())
    }
}

impl Storage for MemStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(lock(&self.dir).live.keys().cloned().collect())
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.writable_mount()?;
        let mut dir = lock(&self.dir);
        if dir.live.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "file exists"));
        }
        let file = Arc::new(MemFile::default());
        dir.live.insert(name.to_owned(), file.clone());
        Ok(Box::new(MemHandle {
            file,
            storage: self.clone(),
            read_only: false,
        }))
    }
    fn open(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.writable_mount()?;
        let dir = lock(&self.dir);
        let file = dir.live.get(name).ok_or_else(not_found)?.clone();
        Ok(Box::new(MemHandle {
            file,
            storage: self.clone(),
            read_only: false,
        }))
    }
    fn open_read(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let dir = lock(&self.dir);
        let file = dir.live.get(name).ok_or_else(not_found)?.clone();
        Ok(Box::new(MemHandle {
            file,
            storage: self.clone(),
            read_only: true,
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.writable_mount()?;
        lock(&self.dir).live.remove(name).ok_or_else(not_found)?;
        Ok(())
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.writable_mount()?;
        let mut dir = lock(&self.dir);
        let file = dir.live.remove(from).ok_or_else(not_found)?;
        dir.live.insert(to.to_owned(), file);
        Ok(())
    }
    fn sync_dir(&self) -> io::Result<()> {
        self.writable_mount()?;
        self.sync_outcome()?;
        let mut dir = lock(&self.dir);
        dir.durable = dir.live.clone();
        Ok(())
    }
    fn describe(&self, name: &str) -> String {
        format!("mem:{name}")
    }
}
