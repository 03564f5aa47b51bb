//! The log: its options and reports, the state the writer and readers share, and the [`Wal`]
//! handle's accessors. What happens to a record lives in the child modules:
//!
//! - [`append`]: appending (offsets, the queue of the next group);
//! - [`writer`]: writing, syncing and acknowledging groups (the writer thread, and under
//!   `Async` the committer that leads);
//! - [`read`]: reading ([`Reader`], waiting for visibility);
//! - [`open`]: opening and recovery;
//! - [`retain`]: retention, slots and the history reset.
//!
//! One writer thread owns the active segment. Appenders encode their record on their own
//! thread, then take a short lock to get the next offset and add the frame to the pending
//! batch. The writer takes the whole batch, writes it with one call, syncs once and then
//! acknowledges every record in it: appenders that arrive during a sync form the next batch,
//! which is group commit without any tuning knob.
//!
//! Owns: [`WalOptions`] (whose test-only `unsafe_*` switches exist only with the `testing`
//! feature) and the reports, `Shared` (the state behind every lock, and the lock order:
//! `segment_files`, then `slots`, then `state`), and the visibility rule: past the head that
//! recovery found, records become visible only through `Shared::publish_visible`, which the
//! writer calls once they are durable.
//! Must never: touch a segment file (that is the writer's, recovery's or retention's job), or
//! show readers a record that is not durable.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::gtid::{Gtid, GtidSet};
use crate::record;
use crate::slots::Slots;
use crate::storage::{Storage, WriterLock};
use crate::{Epoch, Error, Offset};

mod append;
mod open;
mod read;
mod retain;
mod writer;

pub use read::Reader;

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After its bytes are on disk (fdatasync). A crash loses nothing acknowledged.
    Sync,
    /// After its bytes are written to the OS; a sync begins within `interval`. A crash of the
    /// machine (not just the process) can lose the records acknowledged since the last sync
    /// that completed: up to `interval` plus one sync (longer on a slow disk). A failed sync
    /// loses the same records (the log is poisoned and cuts them), never one a reader saw.
    /// Readers see a record only once that sync covered it (the visible head is the durable
    /// head, as under `Sync`), so what a power cut takes back was never shown to anyone and
    /// its offset and GTID number can be given again.
    Async {
        /// Longest time between a write and its sync.
        interval: Duration,
    },
}

/// How much log to keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Log kept for readers without a slot, in bytes, whatever the slots say.
    pub retain_bytes_min: u64,
    /// Most log that slots may hold, in bytes. Past it the oldest segments go and the slots
    /// that needed them are invalidated. `None`: no cap.
    pub slot_bytes_max: Option<u64>,
    /// Oldest log that slots may hold. `None`: no cap.
    pub slot_age_max: Option<Duration>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            retain_bytes_min: 1 << 30,
            slot_bytes_max: Some(64 << 30),
            slot_age_max: None,
        }
    }
}

/// Settings of a log.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// When appends are acknowledged. Default: [`Durability::Sync`].
    pub durability: Durability,
    /// A segment is closed once it holds this many bytes. Default 64 MiB.
    pub segment_bytes_max: u64,
    /// Largest record payload accepted, on write and on read. Default 64 MiB.
    pub record_bytes_max: u32,
    /// The node id written into a new log; ignored when the log exists. Default: random.
    pub server_uuid: Option<Uuid>,
    /// What to keep.
    pub retention: RetentionPolicy,
    /// Check every record of every segment on open, not only the last segment.
    pub verify_on_open: bool,
    /// Open for inspection only: no writer, no truncation of a torn tail (it is just not
    /// read), no file created or removed. For tools reading the log of a running node.
    pub read_only: bool,
    /// With `read_only`: open a log whose last segment holds damage (a frame that is not a
    /// torn tail: a bad frame with a valid one after it, or a whole frame the log cannot
    /// accept) instead of refusing it, for inspection. The records before the damage are
    /// then the log (its last offset is the last good record), [`Wal::damage`] names the
    /// damage and [`Wal::verify`] fails with it. Without `read_only` it changes nothing: a
    /// writable open always refuses damage (fail-stop), for a writer would append after it.
    /// Damage in a closed segment is found by the reader that reaches it, as always.
    pub inspect_damaged: bool,
    // The `unsafe_*` switches below disable a protection so that a fault-injection test can
    // prove it catches the loss (its canary). They exist only with the `testing` feature, so
    // no production build can set them.
    /// Test-only: never call fsync. Exists so crash tests can prove they catch loss.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_skip_fsync: bool,
    /// Test-only: carry on after a failed fsync (the bug fail-stop prevents). Exists so the
    /// fsync-failure test can prove it catches loss.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_ignore_sync_errors: bool,
    /// Test-only: carry on after a failed write (EIO, ENOSPC) as if it had been written, and
    /// acknowledge. Exists so the write-failure test can prove it catches the loss.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_ignore_write_errors: bool,
    /// Test-only: under `Async`, show records to readers once written rather than once
    /// durable (the bug that lets a power cut take back what a reader saw). Exists so the
    /// async visibility test can prove it catches the reissue.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_show_unsynced: bool,
    /// Test-only: the log's writer thread panics when it is about to write a batch after the
    /// first record (a bug killing the thread). Exists so the node's watchdog test can prove a
    /// dead writer stops the node.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_kill_writer: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            durability: Durability::Sync,
            segment_bytes_max: 64 << 20,
            record_bytes_max: record::DEFAULT_RECORD_BYTES_MAX,
            server_uuid: None,
            retention: RetentionPolicy::default(),
            verify_on_open: false,
            read_only: false,
            inspect_damaged: false,
            #[cfg(feature = "testing")]
            unsafe_skip_fsync: false,
            #[cfg(feature = "testing")]
            unsafe_ignore_sync_errors: false,
            #[cfg(feature = "testing")]
            unsafe_ignore_write_errors: false,
            #[cfg(feature = "testing")]
            unsafe_show_unsynced: false,
            #[cfg(feature = "testing")]
            unsafe_kill_writer: false,
        }
    }
}

impl WalOptions {
    /// Whether fsync is skipped: only a `testing` build can say yes.
    /// Whether the writer thread is to die before writing a batch that starts at `first`
    /// (test-only switch; never without the `testing` feature).
    pub(crate) fn writer_killed_at(&self, first: u64) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_kill_writer && first > 1;
        #[cfg(not(feature = "testing"))]
        {
            let _ = first;
            false
        }
    }

    pub(crate) fn skip_fsync(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_skip_fsync;
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Whether a failed write is ignored: only a `testing` build can say yes.
    pub(crate) fn ignore_write_errors(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_ignore_write_errors;
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Whether a failed fsync is ignored: only a `testing` build can say yes.
    pub(crate) fn ignore_sync_errors(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_ignore_sync_errors;
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Whether records are shown once written rather than once durable: only a `testing`
    /// build can say yes.
    pub(crate) fn show_unsynced(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.unsafe_show_unsynced;
        #[cfg(not(feature = "testing"))]
        false
    }
}

/// What recovery found and did on open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segments found.
    pub segments: usize,
    /// Records in the last segment (and in all segments with `verify_on_open`).
    pub records_scanned: u64,
    /// Bytes cut from the torn tail of the last segment.
    pub truncated_bytes: u64,
    /// A last segment whose header was torn at creation and which was removed.
    pub removed_torn_segment: Option<String>,
    /// Time spent, in microseconds.
    pub elapsed_us: u64,
}

/// One segment, as reported by [`Wal::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// File name.
    pub name: String,
    /// Offset of its first record.
    pub first_offset: Offset,
    /// Bytes on disk (the active segment's as of the last write).
    pub bytes: u64,
    /// GTIDs in the log before it.
    pub gtids_before: GtidSet,
    /// Whether it is closed (not the one being appended to).
    pub closed: bool,
}

/// A summary of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStats {
    /// The node id of this log.
    pub server_uuid: Uuid,
    /// First offset still held.
    pub first_offset: Offset,
    /// Highest offset written (0: none).
    pub written_offset: u64,
    /// Highest offset durable (0: none).
    pub durable_offset: u64,
    /// Highest offset readers see (0: none).
    pub visible_offset: u64,
    /// GTIDs of all visible records, including those purged by retention.
    pub gtids: GtidSet,
    /// Bytes of all segments.
    pub total_bytes: u64,
    /// The segments, oldest first.
    pub segments: Vec<SegmentInfo>,
}

/// What [`Wal::run_retention`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Segment files removed.
    pub removed_segments: Vec<String>,
    /// Bytes freed.
    pub removed_bytes: u64,
    /// Slots invalidated by the cap.
    pub invalidated_slots: Vec<String>,
}

#[derive(Debug, Clone)]
struct SegmentMeta {
    name: String,
    first: u64,
    gtids_before: GtidSet,
    /// The history the segment belongs to (the same for every segment of a log).
    epoch: Epoch,
    header_bytes: u32,
    created_us: i64,
    /// Size on disk; kept current for closed segments only.
    bytes: u64,
}

pub(super) type Ack = oneshot::Sender<Result<(), Error>>;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    first: u64,
    count: u64,
    acks: Vec<Ack>,
    gtids: Vec<Gtid>,
}

struct State {
    next_offset: u64,
    pending: Pending,
    /// The last batch's buffer, cleared, handed back by the writer so the next batch does not
    /// grow a fresh allocation (and fault in fresh pages) from nothing.
    spare: Vec<u8>,
    segments: Vec<SegmentMeta>,
    closing: bool,
    /// The writer is (about to be) waiting for work: the next submit must wake it. Appenders
    /// that find it false skip the wake-up, so a burst of submits costs one, not one each.
    writer_waiting: bool,
    /// A [`Wal::reset_history`] waiting for the writer.
    reset: Option<ResetRequest>,
    /// A committer is writing the pending group itself (under `Async`, see
    /// `append::lead`): appenders leave their records to it and wake nobody.
    leading: bool,
}

/// A request to replace the log's history, carried out by the writer thread.
struct ResetRequest {
    gtids_before: GtidSet,
    ack: Ack,
}

struct Shared {
    storage: Arc<dyn Storage>,
    opts: WalOptions,
    server_uuid: Uuid,
    state: Mutex<State>,
    wake_writer: Condvar,
    /// The active segment: the writer thread's, and under `Async` also a leading committer's
    /// while it writes its group. `None` before the writer opened it and after it stopped.
    /// Lock order: `active` before every other lock here.
    active: Mutex<Option<writer::Active>>,
    /// Under `Async`: something was written since the last sync began.
    unsynced: AtomicBool,
    written: AtomicU64,
    durable: AtomicU64,
    active_bytes: AtomicU64,
    visible_tx: watch::Sender<u64>,
    visible_lock: Mutex<u64>,
    visible_cv: Condvar,
    visible_gtids: Mutex<GtidSet>,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
    slots: Mutex<Slots>,
    /// Held by whoever removes segment files ([`Wal::run_retention`], a history reset) from
    /// choosing them until they are gone and `state.segments` says so, so two of them never
    /// pick the same file. Lock order: `segment_files`, then `slots`, then `state`.
    segment_files: Mutex<()>,
    retention_floor: AtomicU64,
    /// The log's history epoch (persisted in every segment header); a new one is drawn by
    /// every [`Wal::reset_history`], and readers opened before a reset refuse to go on.
    history_epoch: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section below leaves the state consistent before anything that can
    // panic, so a poisoned mutex still guards valid data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Shared {
    fn visible(&self) -> u64 {
        *self.visible_tx.borrow()
    }

    fn poison_error(&self) -> Error {
        Error::Poisoned {
            reason: lock(&self.poison_reason).clone(),
        }
    }

    fn poison(&self, reason: String) {
        tracing::error!(%reason, "log poisoned: refusing all further appends (fail-stop)");
        {
            let mut r = lock(&self.poison_reason);
            if r.is_empty() {
                *r = reason;
            }
        }
        self.poisoned.store(true, Ordering::SeqCst);
        // Wake every waiter so it can see the poison.
        self.visible_tx.send_modify(|_| {});
        let _g = lock(&self.visible_lock);
        self.visible_cv.notify_all();
    }

    /// Shows readers the records up to `offset` and `gtids`. The head never moves back.
    fn publish_visible(&self, offset: u64, gtids: &[Gtid]) {
        {
            let mut set = lock(&self.visible_gtids);
            for g in gtids {
                set.insert(*g);
            }
        }
        self.visible_tx.send_modify(|v| *v = (*v).max(offset));
        let mut v = lock(&self.visible_lock);
        *v = (*v).max(offset);
        self.visible_cv.notify_all();
    }

    /// The writer's wait for appends (or the timeout): flags itself as waiting so the next
    /// submit wakes it.
    fn wait_for_work<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        timeout: Option<Duration>,
    ) -> MutexGuard<'a, State> {
        state.writer_waiting = true;
        let mut state = match timeout {
            Some(t) => {
                self.wake_writer
                    .wait_timeout(state, t)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => self
                .wake_writer
                .wait(state)
                .unwrap_or_else(|p| p.into_inner()),
        };
        state.writer_waiting = false;
        state
    }

    /// Wakes the writer if it waits for work (the other side of `wait_for_work`), releasing
    /// `state` first.
    fn wake_writer_if_waiting(&self, mut state: MutexGuard<'_, State>) {
        let wake = std::mem::take(&mut state.writer_waiting);
        drop(state);
        if wake {
            self.wake_writer.notify_one();
        }
    }

    fn skip_fsync(&self) -> bool {
        self.opts.skip_fsync()
    }
}

/// Damage an inspecting open ([`WalOptions::inspect_damaged`]) found in the last segment and
/// ended the log before.
#[derive(Debug, Clone)]
struct Damage {
    file: String,
    byte: u64,
    reason: String,
}

impl Damage {
    fn error(&self) -> Error {
        Error::Corrupt {
            file: self.file.clone(),
            byte: self.byte,
            reason: self.reason.clone(),
        }
    }
}

/// The log. Dropping it (or [`Wal::close`]) syncs what was written and stops the writer.
pub struct Wal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
    /// Set only by an inspecting read-only open: the log as opened ends before it.
    damage: Option<Damage>,
    /// The directory's writer lock (none for a read-only log); released after `close`.
    _writer_lock: Option<WriterLock>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("server_uuid", &self.shared.server_uuid)
            .field("visible", &self.shared.visible())
            .finish_non_exhaustive()
    }
}

/// Transactions checked and encoded by [`Wal::encode_into`], not yet in the log: their GTIDs
/// and records' payloads (what a frame carries), all in one buffer. Submitted one by one with
/// [`Wal::submit_encoded_with`].
#[derive(Default)]
pub struct Encoded {
    buf: rkyv::util::AlignedVec<16>,
    /// Each transaction's GTID and where its payload ends in `buf` (it starts where the one
    /// before ends).
    items: Vec<(Gtid, usize)>,
}

impl Encoded {
    /// Room for `txns` transactions.
    pub fn with_capacity(txns: usize) -> Encoded {
        Encoded {
            buf: rkyv::util::AlignedVec::new(),
            items: Vec::with_capacity(txns),
        }
    }

    /// How many transactions it holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The GTID of transaction `index`.
    ///
    /// # Panics
    /// If `index` is not below [`Encoded::len`].
    pub fn gtid(&self, index: usize) -> Gtid {
        self.items[index].0
    }

    /// The encoded record of transaction `index` (rkyv, the log's persisted format).
    ///
    /// # Panics
    /// If `index` is not below [`Encoded::len`].
    pub fn payload(&self, index: usize) -> &[u8] {
        let start = if index == 0 {
            0
        } else {
            self.items[index - 1].1
        };
        &self.buf[start..self.items[index].1]
    }
}

/// How often [`Appended::wait`] yields before it parks while another committer writes its
/// record.
const LEAD_YIELDS: u32 = 4;

/// An append in flight. Wait for it with [`Appended::wait`] (blocking threads) or `.await`
/// (async tasks): it resolves to the record's offset once the record is acknowledged under
/// the log's durability, or to an error. After [`Error::Poisoned`] the outcome is unknown: part
/// of the record's batch may have reached the disk before a sync failed, so after a restart the
/// record may or may not be in the log (whole, never damaged: recovery keeps only whole, valid
/// records). Other errors mean nothing was written.
#[must_use = "an append is acknowledged only when waited for"]
pub struct Appended {
    offset: Offset,
    rx: oneshot::Receiver<Result<(), Error>>,
    /// Set when the log did not wake its writer for this record, leaving the write to the
    /// thread that waits ([`Appended::wait`] leads); awaiting or dropping hands it back.
    lead: Option<Arc<Shared>>,
}

impl Appended {
    /// The offset the record will have once acknowledged.
    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// Blocks the calling thread until the record is acknowledged. Callable from any thread,
    /// a runtime's among them (where it blocks that thread, as any blocking call does; `.await`
    /// the `Appended` there instead): the acknowledgement is polled on a waker that unparks
    /// this thread, not received with tokio's blocking receive, which panics inside a runtime.
    /// A stray unpark of the thread only polls again.
    pub fn wait(mut self) -> Result<Offset, Error> {
        if let Some(shared) = self.lead.take() {
            writer::lead(&shared);
            // Another committer is writing this record, within microseconds: with more
            // committers than cores, giving it the CPU costs less than parking and being
            // woken by it.
            for _ in 0..LEAD_YIELDS {
                match self.rx.try_recv() {
                    Ok(r) => return r.map(|()| self.offset),
                    Err(oneshot::error::TryRecvError::Empty) => std::thread::yield_now(),
                    Err(oneshot::error::TryRecvError::Closed) => break,
                }
            }
        }
        struct Unpark(std::thread::Thread);
        impl std::task::Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut this = std::pin::pin!(self);
        loop {
            if let Poll::Ready(r) = this.as_mut().poll(&mut cx) {
                return r;
            }
            std::thread::park();
        }
    }
}

impl Drop for Appended {
    fn drop(&mut self) {
        if let Some(shared) = self.lead.take() {
            writer::hand_off(&shared);
        }
    }
}

impl Future for Appended {
    type Output = Result<Offset, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(shared) = self.lead.take() {
            // Writing here would block the task's thread: the writer thread does it.
            writer::hand_off(&shared);
        }
        let offset = self.offset;
        Pin::new(&mut self.rx).poll(cx).map(|r| match r {
            Ok(Ok(())) => Ok(offset),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Poisoned {
                reason: "the log writer stopped before acknowledging".into(),
            }),
        })
    }
}

impl Wal {
    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The damage an inspecting read-only open ([`WalOptions::inspect_damaged`]) found in the
    /// last segment, as the [`Error::Corrupt`] a writable open refuses the log with; the log
    /// as opened ends at the last record before it. `None` for every other open.
    pub fn damage(&self) -> Option<Error> {
        self.damage.as_ref().map(Damage::error)
    }

    /// The node id of this log, fixed when the log was created.
    pub fn server_uuid(&self) -> Uuid {
        self.shared.server_uuid
    }

    /// The log's history epoch: [`Epoch::INITIAL`] until the first [`Wal::reset_history`],
    /// a new one after each. Stored in every segment header, so it survives restarts.
    pub fn history_epoch(&self) -> Epoch {
        Epoch::new(self.shared.history_epoch.load(Ordering::SeqCst))
    }

    /// The durability setting.
    pub fn durability(&self) -> Durability {
        self.shared.opts.durability
    }

    /// The configured largest record payload.
    pub fn record_bytes_max(&self) -> u32 {
        self.shared.opts.record_bytes_max
    }

    /// Highest offset written to the OS (0: none).
    pub fn written_offset(&self) -> u64 {
        self.shared.written.load(Ordering::SeqCst)
    }

    /// Highest offset known durable (0: none).
    pub fn durable_offset(&self) -> u64 {
        self.shared.durable.load(Ordering::SeqCst)
    }

    /// Highest offset readers see (0: none): the durable head, under both durabilities.
    pub fn visible_offset(&self) -> u64 {
        self.shared.visible()
    }

    /// GTIDs of all visible records, including those purged by retention.
    pub fn gtids(&self) -> GtidSet {
        lock(&self.shared.visible_gtids).clone()
    }

    /// Whether a failed write or fsync has poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    /// The error every append returns once poisoned, if poisoned.
    pub fn poison(&self) -> Option<Error> {
        self.is_poisoned().then(|| self.shared.poison_error())
    }

    /// First offset still in the log.
    pub fn first_offset(&self) -> Offset {
        let st = lock(&self.shared.state);
        Offset::new(st.segments[0].first).unwrap_or(Offset::FIRST)
    }

    /// A summary of the log.
    pub fn stats(&self) -> LogStats {
        let st = lock(&self.shared.state);
        let active = self.shared.active_bytes.load(Ordering::SeqCst);
        let n = st.segments.len();
        let segments: Vec<SegmentInfo> = st
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                name: s.name.clone(),
                first_offset: Offset::new(s.first).unwrap_or(Offset::FIRST),
                bytes: if i + 1 == n { active } else { s.bytes },
                gtids_before: s.gtids_before.clone(),
                closed: i + 1 < n,
            })
            .collect();
        drop(st);
        LogStats {
            server_uuid: self.shared.server_uuid,
            first_offset: segments[0].first_offset,
            written_offset: self.written_offset(),
            durable_offset: self.durable_offset(),
            visible_offset: self.visible_offset(),
            gtids: self.gtids(),
            total_bytes: segments.iter().map(|s| s.bytes).sum(),
            segments,
        }
    }

    fn writable(&self) -> Result<(), Error> {
        if self.shared.opts.read_only {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Syncs what was written and stops the writer. Appends after this fail with
    /// [`Error::Closed`]. Returns the poison error if the log was poisoned.
    pub fn close(&self) -> Result<(), Error> {
        {
            let mut st = lock(&self.shared.state);
            st.closing = true;
        }
        self.shared.wake_writer.notify_all();
        if let Some(h) = lock(&self.writer).take()
            && h.join().is_err()
        {
            return Err(Error::Poisoned {
                reason: "the log writer thread panicked".into(),
            });
        }
        if !self.shared.opts.read_only {
            let _ = lock(&self.shared.slots).save(&*self.shared.storage);
        }
        self.poison().map_or(Ok(()), Err)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
