//! Helpers shared by the fault-injection tests: the deterministic workload (what is written for
//! each GTID number), concurrent writers that record what was acknowledged, and the checker of
//! a recovered log.
//!
//! The checker is a function returning `Result`, never a panic, so that every harness can also
//! run a canary: the same scenario with the protection switched off, asserting that the
//! checker reports loss.
#![allow(
    dead_code,
    reason = "each test binary uses its own subset of these helpers"
)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tideline_wal::{
    Encoded, Error, Gtid, GtidSet, MemStorage, NewTransaction, Offset, Op, Storage, StorageFile,
    Wal, WalOptions,
};
use uuid::Uuid;

/// The node id of every log in these tests, so that a log reopened from an image that lost
/// everything still stamps the same GTIDs.
pub const UUID: Uuid = Uuid::from_bytes([
    0x3e, 0x11, 0xfa, 0x47, 0x71, 0xca, 0x11, 0xe1, 0x9e, 0x33, 0xc8, 0x0a, 0xa9, 0x42, 0x95, 0x62,
]);

/// What the workload writes as GTID number `seq`: a deterministic function of `seq`, with sizes
/// that vary from record to record (so frames have every amount of padding and segments roll
/// at different places) and every kind of op.
pub fn txn_for(seq: u64) -> NewTransaction {
    let mix = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let len = (mix >> 56) as usize; // 0..=255
    let value: Vec<u8> = (0..len)
        .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect();
    let key = seq.to_be_bytes().to_vec();
    let op = match seq % 5 {
        0 => Op::Delete {
            tree: "t".into(),
            key,
            before: Some(value),
        },
        1 => Op::Merge {
            tree: "counters".into(),
            key,
            operand: value,
        },
        _ => Op::Put {
            tree: "t".into(),
            key,
            value,
            before: None,
        },
    };
    NewTransaction {
        gtid: Gtid { uuid: UUID, seq },
        timestamp_us: 1_700_000_000_000_000 + seq as i64,
        ops: vec![op],
    }
}

/// The seeds a seeded fault test runs: `default`, or as many from its start as env
/// `TIDELINE_FAULT_SEEDS` says (the long runs of `scripts/soak`). Printed, so that a failure's
/// seed range is in the output even when the failure message is lost.
pub fn fault_seeds(test: &str, default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    let seeds = match std::env::var("TIDELINE_FAULT_SEEDS") {
        Ok(n) => {
            let n: u64 = n
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("TIDELINE_FAULT_SEEDS={n:?} is not a number of seeds"));
            default.start..default.start + n
        }
        Err(_) => default,
    };
    eprintln!(
        "{test}: seeds {}..{} ({} rounds; each failure names its seed)",
        seeds.start,
        seeds.end,
        seeds.end - seeds.start
    );
    seeds
}

/// Options for the logs of these tests: the fixed node id and small segments, so that crashes
/// land around segment rolls too.
pub fn opts(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max,
        server_uuid: Some(UUID),
        ..WalOptions::default()
    }
}

/// Reads the whole log and checks the invariants every crash must preserve:
/// - offsets and GTID numbers are dense from 1, offset n holding GTID number n (no gap, no
///   duplicate);
/// - every record is byte for byte what the workload wrote for its number (the log is a prefix
///   of what was written);
/// - the log holds at least `must_hold` records: every acknowledged record, and everything
///   already seen present before.
///
/// Returns the number of records.
pub fn check_log(wal: &Wal, must_hold: u64) -> Result<u64, String> {
    if wal.server_uuid() != UUID {
        return Err(format!(
            "log belongs to node {}, not {UUID}: the log was lost and recreated",
            wal.server_uuid()
        ));
    }
    if wal.first_offset() != Offset::FIRST {
        return Err(format!(
            "log starts at offset {}, not 1",
            wal.first_offset()
        ));
    }
    let mut reader = wal
        .read_from(Offset::FIRST)
        .map_err(|e| format!("cannot read the log: {e}"))?;
    let mut n = 0u64;
    loop {
        let txn = match reader.next_txn() {
            Ok(Some(txn)) => txn,
            Ok(None) => break,
            Err(e) => return Err(format!("reading record {}: {e}", n + 1)),
        };
        n += 1;
        if txn.offset.get() != n {
            return Err(format!(
                "record {n} has offset {}: a gap or a duplicate",
                txn.offset
            ));
        }
        if txn.gtid.uuid != UUID || txn.gtid.seq != n {
            return Err(format!(
                "offset {n} holds GTID {}, expected {UUID}:{n}: a gap, a duplicate or a \
                 reordering",
                txn.gtid
            ));
        }
        let want = txn_for(n);
        if txn.timestamp_us != want.timestamp_us || txn.ops != want.ops {
            return Err(format!(
                "record {n} differs from what was written: the log is not a prefix of the \
                 writes"
            ));
        }
    }
    if wal.visible_offset() != n {
        return Err(format!(
            "visible offset {} but {n} records read",
            wal.visible_offset()
        ));
    }
    let want_gtids = if n == 0 {
        GtidSet::new()
    } else {
        format!("{UUID}:1-{n}")
            .parse()
            .map_err(|e| format!("{e}"))?
    };
    if wal.gtids() != want_gtids {
        return Err(format!(
            "gtid_executed is `{}`, expected `{want_gtids}`",
            wal.gtids()
        ));
    }
    if must_hold > n {
        return Err(format!(
            "LOSS: record {must_hold} was acknowledged (or seen present before) but the log \
             ends at {n}"
        ));
    }
    Ok(n)
}

/// Opens `storage` (running recovery) and checks it with [`check_log`]. An open that fails is
/// reported as an error too: a log that cannot be opened has lost everything.
pub fn open_and_check(
    storage: Arc<dyn Storage>,
    opts: WalOptions,
    must_hold: u64,
) -> Result<(Wal, u64), String> {
    let wal = Wal::open(storage, opts).map_err(|e| format!("reopen failed: {e}"))?;
    let n = check_log(&wal, must_hold)?;
    Ok((wal, n))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the writers saw.
#[derive(Default)]
pub struct WriteLog {
    /// The next GTID number to submit; held across `submit` so numbers follow offsets.
    next: Mutex<u64>,
    acked: Mutex<BTreeSet<u64>>,
    acked_count: AtomicU64,
    /// Appends that failed: the GTID number and the error.
    failed: Mutex<Vec<(u64, Error)>>,
    /// Broken expectations seen by a writer (an ack for the wrong offset).
    broken: Mutex<Vec<String>>,
}

impl WriteLog {
    /// Highest acknowledged GTID number (0: none).
    pub fn acked_max(&self) -> u64 {
        lock(&self.acked).last().copied().unwrap_or(0)
    }
    /// Number of acknowledgements so far.
    pub fn acked_count(&self) -> u64 {
        self.acked_count.load(Ordering::SeqCst)
    }
    /// The acknowledged GTID numbers.
    pub fn acked(&self) -> BTreeSet<u64> {
        lock(&self.acked).clone()
    }
    /// Takes the failures seen so far.
    pub fn take_failed(&self) -> Vec<(u64, Error)> {
        std::mem::take(&mut *lock(&self.failed))
    }
    /// Broken expectations seen by writers.
    pub fn broken(&self) -> Vec<String> {
        lock(&self.broken).clone()
    }
}

/// Concurrent writers appending the workload to one log.
pub struct Writers {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    /// What they saw.
    pub log: Arc<WriteLog>,
}

impl Writers {
    /// Starts `threads` writers appending GTID numbers from `first_seq` on, in offset order.
    /// A writer stops at its first failed append.
    pub fn start(wal: Arc<Wal>, threads: usize, first_seq: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let log = Arc::new(WriteLog {
            next: Mutex::new(first_seq),
            ..WriteLog::default()
        });
        let handles = (0..threads)
            .map(|_| {
                let (wal, stop, log) = (wal.clone(), stop.clone(), log.clone());
                let paused = paused.clone();
                std::thread::spawn(move || writer(&wal, &stop, &paused, &log))
            })
            .collect();
        Writers {
            stop,
            paused,
            handles,
            log,
        }
    }

    /// Holds the writers after their current append (keeps the log small while a crash image
    /// is checked), or lets them go on.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Waits until at least `target` appends were acknowledged, or every writer has stopped.
    pub fn wait_acked(&self, target: u64) {
        while self.log.acked_count() < target && self.handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether every writer has stopped (after a failure).
    pub fn all_stopped(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Stops the writers and waits for them.
    pub fn stop(mut self) -> Arc<WriteLog> {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            h.join().expect("a writer thread panicked");
        }
        self.log.clone()
    }
}

impl Drop for Writers {
    /// Writers never outlive their harness, even when a check fails early.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn writer(wal: &Wal, stop: &AtomicBool, paused: &AtomicBool, log: &WriteLog) {
    while !stop.load(Ordering::SeqCst) {
        if paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let (seq, appended) = {
            let mut next = lock(&log.next);
            let seq = *next;
            // As the engine commits: encoded, queued with `submit_encoded_acked` under the
            // caller's own lock, waited for outside it. Under `Async` the waiting thread then
            // writes the pending group itself (the combining leader).
            let mut encoded = Encoded::with_capacity(1);
            let queued = wal
                .encode_into(&txn_for(seq), &mut encoded)
                .and_then(|i| wal.submit_encoded_acked(&encoded, i, |_| ()));
            match queued {
                Ok((a, ())) => {
                    *next += 1;
                    (seq, a)
                }
                Err(e) => {
                    lock(&log.failed).push((seq, e));
                    return;
                }
            }
        };
        match appended.wait() {
            Ok(offset) => {
                if offset.get() != seq {
                    lock(&log.broken).push(format!("GTID number {seq} acked at offset {offset}"));
                }
                lock(&log.acked).insert(seq);
                log.acked_count.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                lock(&log.failed).push((seq, e));
                return;
            }
        }
    }
}

/// What a [`Hooked`] storage runs before an operation: it sees the operation's names and may
/// wait there, holding its caller at that moment of a race.
type Hook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// An in-memory storage that runs hooks before some of its operations (a segment's removal or
/// rename, a read of or a write to a file opened through it), for tests that hold one side of a race at a
/// chosen moment without changing what either side does.
#[derive(Clone, Default)]
pub struct Hooked {
    pub inner: MemStorage,
    before_remove: Option<Hook>,
    before_rename: Option<Hook>,
    before_read: Option<Hook>,
    before_write: Option<Hook>,
    /// Removals fail with EIO while set.
    removes_fail: Arc<AtomicBool>,
}

impl std::fmt::Debug for Hooked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooked")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Hooked {
    /// Runs `f(name)` before each removal.
    pub fn before_remove(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.before_remove = Some(Arc::new(move |name, _| f(name)));
        self
    }

    /// Runs `f(from, to)` before each rename.
    pub fn before_rename(mut self, f: impl Fn(&str, &str) + Send + Sync + 'static) -> Self {
        self.before_rename = Some(Arc::new(f));
        self
    }

    /// Runs `f(name)` before each read of a file opened through this storage.
    pub fn before_read(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.before_read = Some(Arc::new(move |name, _| f(name)));
        self
    }

    /// From now on removals fail with EIO (`true`) or work again (`false`), in every clone.
    pub fn fail_removes(&self, fail: bool) {
        self.removes_fail.store(fail, Ordering::SeqCst);
    }

    /// Runs `f(name)` before each write to a file opened through this storage (not to one
    /// just created: the log opens a segment again before it appends to it).
    pub fn before_write(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.before_write = Some(Arc::new(move |name, _| f(name)));
        self
    }

    /// `inner`, running the `before_read` and `before_write` hooks (if any) before each of its
    /// reads and writes.
    fn hook_file(&self, name: &str, inner: Box<dyn StorageFile>) -> Box<dyn StorageFile> {
        if self.before_read.is_none() && self.before_write.is_none() {
            return inner;
        }
        Box::new(HookedFile {
            inner,
            name: name.to_owned(),
            before_read: self.before_read.clone(),
            before_write: self.before_write.clone(),
        })
    }
}

/// A file of a [`Hooked`] storage.
struct HookedFile {
    inner: Box<dyn StorageFile>,
    name: String,
    before_read: Option<Hook>,
    before_write: Option<Hook>,
}

impl StorageFile for HookedFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
        if let Some(h) = &self.before_read {
            h(&self.name, "");
        }
        self.inner.read_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        if let Some(h) = &self.before_write {
            h(&self.name, "");
        }
        self.inner.write_all_at(buf, pos)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

impl Storage for Hooked {
    fn list(&self) -> std::io::Result<Vec<String>> {
        self.inner.list()
    }
    fn create(&self, name: &str) -> std::io::Result<Box<dyn StorageFile>> {
        self.inner.create(name)
    }
    fn open(&self, name: &str) -> std::io::Result<Box<dyn StorageFile>> {
        Ok(self.hook_file(name, self.inner.open(name)?))
    }
    fn open_read(&self, name: &str) -> std::io::Result<Box<dyn StorageFile>> {
        Ok(self.hook_file(name, self.inner.open_read(name)?))
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        if let Some(h) = &self.before_remove {
            h(name, "");
        }
        if self.removes_fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected: removal fails (EIO)"));
        }
        self.inner.remove(name)
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        if let Some(h) = &self.before_rename {
            h(from, to);
        }
        self.inner.rename(from, to)
    }
    fn sync_dir(&self) -> std::io::Result<()> {
        self.inner.sync_dir()
    }
    fn describe(&self, name: &str) -> String {
        self.inner.describe(name)
    }
}

/// The log's segment files in `storage`, in offset order.
pub fn segment_names(storage: &dyn Storage) -> Vec<String> {
    let mut names: Vec<String> = storage
        .list()
        .expect("list")
        .into_iter()
        .filter(|n| tideline_wal::segment::parse_file_name(n).is_some())
        .collect();
    names.sort();
    names
}

/// The whole of file `name` in `storage`.
pub fn read_file(storage: &dyn Storage, name: &str) -> Vec<u8> {
    let file = storage.open_read(name).expect("open");
    let mut buf = vec![0u8; file.len().expect("len") as usize];
    let n = file.read_full_at(&mut buf, 0).expect("read");
    buf.truncate(n);
    buf
}
