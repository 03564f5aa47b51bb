//! The log: open and recover, append with group commit, read, retain.
//!
//! One writer thread owns the active segment. Appenders encode their record on their own
//! thread, then take a short lock to get the next offset and add the frame to the pending
//! batch. The writer takes the whole batch, writes it with one call, syncs once and then
//! acknowledges every record in it: appenders that arrive during a sync form the next batch,
//! which is group commit without any tuning knob.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::gtid::{Gtid, GtidSet};
use crate::record::{self, FrameError, NewTransaction, Transaction};
use crate::segment::{self, HeaderError, SegmentHeader};
use crate::slots::{SlotInfo, Slots};
use crate::storage::{Storage, StorageFile, WriterLock};
use crate::{Epoch, Error, Offset};

/// When an append is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After its bytes are on disk (fdatasync). A crash loses nothing acknowledged.
    Sync,
    /// After its bytes are written to the OS; a sync follows within `interval`. A crash of the
    /// machine (not just the process) can lose up to `interval` of acknowledged records.
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
    /// Test-only: never call fsync. Exists so crash tests can prove they catch loss.
    #[doc(hidden)]
    pub unsafe_skip_fsync: bool,
    /// Test-only: carry on after a failed fsync (the bug fail-stop prevents). Exists so the
    /// fsync-failure test can prove it catches loss.
    #[doc(hidden)]
    pub unsafe_ignore_sync_errors: bool,
    /// Test-only: under `Async`, show records to readers once written rather than once
    /// durable (the bug that lets a power cut take back what a reader saw). Exists so the
    /// async visibility test can prove it catches the reissue.
    #[doc(hidden)]
    pub unsafe_show_unsynced: bool,
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
            unsafe_skip_fsync: false,
            unsafe_ignore_sync_errors: false,
            unsafe_show_unsynced: false,
        }
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

type Ack = oneshot::Sender<Result<(), Error>>;

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

    fn publish_visible(&self, offset: u64, gtids: &[Gtid]) {
        {
            let mut set = lock(&self.visible_gtids);
            for g in gtids {
                set.insert(*g);
            }
        }
        self.visible_tx.send_replace(offset);
        let mut v = lock(&self.visible_lock);
        *v = offset;
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

    fn skip_fsync(&self) -> bool {
        self.opts.unsafe_skip_fsync
    }
}

/// The log. Dropping it (or [`Wal::close`]) syncs what was written and stops the writer.
pub struct Wal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    recovery: RecoveryReport,
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
}

impl Appended {
    /// The offset the record will have once acknowledged.
    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// Blocks until the record is acknowledged. Must not be called from inside an async
    /// runtime; `.await` the `Appended` there.
    pub fn wait(self) -> Result<Offset, Error> {
        let offset = self.offset;
        match self.rx.blocking_recv() {
            Ok(Ok(())) => Ok(offset),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Poisoned {
                reason: "the log writer stopped before acknowledging".into(),
            }),
        }
    }
}

impl Future for Appended {
    type Output = Result<Offset, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
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

struct ScanResult {
    records: u64,
    gtids: Vec<Gtid>,
    /// Byte position after the last valid frame.
    valid_end: u64,
    /// First byte position of an invalid frame, with the reason.
    bad: Option<(u64, FrameError)>,
}

/// Reads a whole file into memory in one go (segments are bounded by `segment_bytes_max`
/// plus one batch).
fn read_all(storage: &dyn Storage, file: &dyn StorageFile, name: &str) -> Result<Vec<u8>, Error> {
    let len = file
        .len()
        .map_err(|e| Error::io(format!("stat {}", storage.describe(name)), e))?;
    let mut buf = vec![0u8; len as usize];
    let n = file
        .read_full_at(&mut buf, 0)
        .map_err(|e| Error::io(format!("read {}", storage.describe(name)), e))?;
    buf.truncate(n);
    Ok(buf)
}

/// Scans frames of one segment body, checking dense offsets from `first`.
fn scan_frames(buf: &[u8], start: usize, first: u64, record_bytes_max: u32) -> ScanResult {
    let mut pos = start;
    let mut expect = first;
    let mut gtids = Vec::new();
    while pos < buf.len() {
        let decoded = record::check_frame(&buf[pos..], record_bytes_max).and_then(|raw| {
            if raw.offset.get() != expect {
                return Err(FrameError::Payload(format!(
                    "offset {} where {expect} was expected",
                    raw.offset
                )));
            }
            let txn = record::decode_payload(raw.offset, raw.payload)?;
            Ok((txn, raw.frame_bytes))
        });
        match decoded {
            Ok((txn, used)) => {
                gtids.push(txn.gtid);
                pos += used;
                expect += 1;
            }
            Err(e) => {
                return ScanResult {
                    records: expect - first,
                    gtids,
                    valid_end: pos as u64,
                    bad: Some((pos as u64, e)),
                };
            }
        }
    }
    ScanResult {
        records: expect - first,
        gtids,
        valid_end: pos as u64,
        bad: None,
    }
}

/// A segment read whole, with the result of scanning its frames.
struct ScannedSegment {
    file: Box<dyn StorageFile>,
    buf: Vec<u8>,
    scan: ScanResult,
}

/// Opens a segment, reads it whole and scans its frames.
fn scan_segment(
    st: &dyn Storage,
    seg: &SegmentMeta,
    record_bytes_max: u32,
) -> Result<ScannedSegment, Error> {
    let file = st
        .open(&seg.name)
        .map_err(|e| Error::io(format!("open {}", st.describe(&seg.name)), e))?;
    let buf = read_all(st, &*file, &seg.name)?;
    let scan = scan_frames(&buf, seg.header_bytes as usize, seg.first, record_bytes_max);
    Ok(ScannedSegment { file, buf, scan })
}

/// Whether any valid frame with an offset at or past `expect` starts after `from`: if so,
/// the damage at `from` is not a torn tail.
fn valid_frame_after(buf: &[u8], from: usize, expect: u64, record_bytes_max: u32) -> Option<u64> {
    let mut pos = from + record::FRAME_ALIGN;
    while pos + record::FRAME_HEADER_BYTES <= buf.len() {
        if let Ok(raw) = record::check_frame(&buf[pos..], record_bytes_max)
            && raw.offset.get() >= expect
        {
            return Some(pos as u64);
        }
        pos += record::FRAME_ALIGN;
    }
    None
}

/// Whether the bad frame at the start of `buf`, found by recovery in the last segment, is
/// one a torn write cannot leave: a whole frame whose checksum matches but which the log
/// cannot accept (wrong offset, undecodable payload, GTID number 0, or more payload than
/// `record_bytes_max`). A torn write leaves a frame short of its length or failing its
/// checksum; anything else is damage, a writer bug or a log written with other settings, and
/// cutting it would throw away a record some reader may already have seen. Returns the reason
/// to refuse the open with, or `None` for a torn tail.
fn refused_not_torn(buf: &[u8], why: &FrameError) -> Option<String> {
    match why {
        FrameError::Truncated { .. } | FrameError::Checksum => None,
        FrameError::Payload(_) => Some(format!(
            "{why}, yet its checksum is valid: a torn write cannot leave a whole frame, so \
             this is not cut as a torn tail"
        )),
        FrameError::TooLarge { len, max } => {
            // Checked with the limit lifted: the length is still bounded by the bytes present
            // before anything is read, so nothing of that size is allocated.
            record::check_frame(buf, u32::MAX).ok().map(|_| {
                format!(
                    "a whole, checksum-valid record of {len} payload bytes exceeds \
                     record_bytes_max ({max}): the log was written with a higher limit; \
                     open it with record_bytes_max of at least {len}"
                )
            })
        }
    }
}

fn header_of(
    storage: &dyn Storage,
    file: &dyn StorageFile,
    name: &str,
) -> Result<Result<SegmentHeader, HeaderError>, Error> {
    let mut fixed = [0u8; segment::HEADER_FIXED_BYTES];
    let n = file
        .read_full_at(&mut fixed, 0)
        .map_err(|e| Error::io(format!("read {}", storage.describe(name)), e))?;
    let total = match segment::header_len(&fixed[..n]) {
        Ok(t) => t,
        Err(e) => return Ok(Err(e)),
    };
    let mut buf = vec![0u8; total as usize];
    let n = file
        .read_full_at(&mut buf, 0)
        .map_err(|e| Error::io(format!("read {}", storage.describe(name)), e))?;
    Ok(segment::decode_header(&buf[..n]))
}

impl Wal {
    /// Opens the log in `storage`, creating it if empty, and recovers it: the last segment is
    /// checked record by record and a torn tail cut at a record boundary; anything else that
    /// is damaged is an [`Error::Corrupt`] naming the file and byte.
    pub fn open(storage: Arc<dyn Storage>, opts: WalOptions) -> Result<Wal, Error> {
        let started = Instant::now();
        let mut report = RecoveryReport::default();
        let st: &dyn Storage = &*storage;
        // One writer per directory, before anything is read or repaired: a second writer
        // would reuse offsets and GTIDs and tear the first one's records.
        let writer_lock = if opts.read_only {
            None
        } else {
            Some(st.lock_writer()?)
        };
        let listed = st.list().map_err(|e| Error::io("list log directory", e))?;
        if !opts.read_only {
            // The new first segment of a history reset that did not get renamed into place.
            for n in listed.iter().filter(|n| n.ends_with(RESET_SUFFIX)) {
                st.remove(n)
                    .map_err(|e| Error::io(format!("remove {}", st.describe(n)), e))?;
            }
        }
        let mut names: Vec<(Offset, String)> = listed
            .into_iter()
            .filter_map(|n| segment::parse_file_name(&n).map(|o| (o, n)))
            .collect();
        names.sort();

        let mut segments: Vec<SegmentMeta> = Vec::with_capacity(names.len());
        let mut server_uuid: Option<Uuid> = None;
        let last_idx = names.len().checked_sub(1);
        for (i, (name_offset, name)) in names.iter().enumerate() {
            let file = st
                .open(name)
                .map_err(|e| Error::io(format!("open {}", st.describe(name)), e))?;
            let header = match header_of(st, &*file, name)? {
                Ok(h) => h,
                Err(e) => {
                    let len = file.len().unwrap_or(0);
                    let torn_creation = Some(i) == last_idx
                        && (matches!(e, HeaderError::Truncated { .. })
                            || read_all(st, &*file, name)?.iter().all(|&b| b == 0));
                    if torn_creation && opts.read_only {
                        continue;
                    }
                    if torn_creation {
                        // The writer syncs a new segment's header before writing any record to
                        // it, so a torn header means the segment never held a record.
                        tracing::warn!(file = %st.describe(name), len, "removing segment torn at creation");
                        drop(file);
                        st.remove(name)
                            .map_err(|e| Error::io(format!("remove {}", st.describe(name)), e))?;
                        st.sync_dir()
                            .map_err(|e| Error::io("sync log directory", e))?;
                        report.removed_torn_segment = Some(name.clone());
                        continue;
                    }
                    return Err(Error::Corrupt {
                        file: st.describe(name),
                        byte: 0,
                        reason: e.to_string(),
                    });
                }
            };
            if header.first_offset != *name_offset {
                return Err(Error::Corrupt {
                    file: st.describe(name),
                    byte: 16,
                    reason: format!(
                        "header says first offset {} but the file name says {name_offset}",
                        header.first_offset
                    ),
                });
            }
            match server_uuid {
                None => server_uuid = Some(header.server_uuid),
                Some(u) if u != header.server_uuid => {
                    return Err(Error::Corrupt {
                        file: st.describe(name),
                        byte: 24,
                        reason: format!(
                            "segment belongs to node {} but the log is node {u}; \
                             segments from two nodes are mixed in one directory",
                            header.server_uuid
                        ),
                    });
                }
                Some(_) => {}
            }
            let bytes = file
                .len()
                .map_err(|e| Error::io(format!("stat {}", st.describe(name)), e))?;
            if let Some(prev) = segments.last()
                && (!prev.gtids_before.is_subset(&header.gtids_before)
                    || prev.epoch != header.epoch)
                && Some(i) == last_idx
                && bytes == u64::from(header.header_bytes)
                && !opts.read_only
            {
                // An empty last segment of another history epoch (or, written before epochs,
                // whose GTID set does not contain the earlier ones') is what an interrupted
                // `reset_history` leaves: finish it.
                tracing::warn!(file = %st.describe(name), "completing an interrupted history reset");
                for s in segments.drain(..) {
                    st.remove(&s.name)
                        .map_err(|e| Error::io(format!("remove {}", st.describe(&s.name)), e))?;
                }
                st.sync_dir()
                    .map_err(|e| Error::io("sync log directory", e))?;
            }
            if let Some(prev) = segments.last()
                && !prev.gtids_before.is_subset(&header.gtids_before)
            {
                return Err(Error::Corrupt {
                    file: st.describe(name),
                    byte: 56,
                    reason: "GTID set before this segment lacks GTIDs listed before an \
                                 earlier segment"
                        .into(),
                });
            }
            if let Some(prev) = segments.last()
                && prev.epoch != header.epoch
            {
                return Err(Error::Corrupt {
                    file: st.describe(name),
                    byte: 56,
                    reason: format!(
                        "segment of history epoch {} follows one of epoch {}; a log holds one \
                         history",
                        header.epoch, prev.epoch
                    ),
                });
            }
            segments.push(SegmentMeta {
                name: name.clone(),
                first: header.first_offset.get(),
                gtids_before: header.gtids_before,
                epoch: header.epoch,
                header_bytes: header.header_bytes,
                created_us: header.created_us,
                bytes,
            });
        }
        report.segments = segments.len();

        let server_uuid = server_uuid
            .or(opts.server_uuid)
            .unwrap_or_else(Uuid::new_v4);

        if opts.verify_on_open {
            for i in 0..segments.len().saturating_sub(1) {
                report.records_scanned += verify_closed(st, &segments[i], &segments[i + 1], &opts)?;
            }
        }

        // The last segment: scan, cut a torn tail.
        let mut gtids = GtidSet::new();
        let next_offset;
        let active_bytes;
        match segments.last_mut() {
            None if opts.read_only => {
                return Err(Error::io(
                    "open the log read-only",
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no log segments here"),
                ));
            }
            None => {
                next_offset = 1;
                let meta = create_segment(
                    st,
                    &opts,
                    server_uuid,
                    Offset::FIRST,
                    &GtidSet::new(),
                    Epoch::INITIAL,
                )?;
                active_bytes = meta.bytes;
                segments.push(meta);
            }
            Some(last) => {
                let ScannedSegment { file, buf, scan } =
                    scan_segment(st, last, opts.record_bytes_max)?;
                report.records_scanned += scan.records;
                if let Some((bad_at, why)) = &scan.bad {
                    let (bad_at, expect) = (*bad_at, last.first + scan.records);
                    if let Some(reason) = refused_not_torn(&buf[bad_at as usize..], why) {
                        return Err(Error::Corrupt {
                            file: st.describe(&last.name),
                            byte: bad_at,
                            reason,
                        });
                    }
                    if let Some(later) =
                        valid_frame_after(&buf, bad_at as usize, expect, opts.record_bytes_max)
                    {
                        return Err(Error::Corrupt {
                            file: st.describe(&last.name),
                            byte: bad_at,
                            reason: format!(
                                "{why}, yet a valid record follows at byte {later}: this is \
                                 damage inside the log, not a torn tail"
                            ),
                        });
                    }
                    report.truncated_bytes = buf.len() as u64 - bad_at;
                }
                if let (Some((bad_at, why)), false) = (&scan.bad, opts.read_only) {
                    let bad_at = *bad_at;
                    tracing::warn!(
                        file = %st.describe(&last.name),
                        at = bad_at,
                        bytes = report.truncated_bytes,
                        reason = %why,
                        "truncating torn tail of the last segment"
                    );
                    file.set_len(bad_at)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| {
                            Error::io(
                                format!("truncate torn tail of {}", st.describe(&last.name)),
                                e,
                            )
                        })?;
                }
                // What was found may have been written by a process that died before its
                // fsync. It becomes visible now, so it is made durable first: file data and
                // the directory entry (the segment may have been created just before the death).
                if !opts.unsafe_skip_fsync && !opts.read_only {
                    file.sync_data()
                        .map_err(|e| Error::io(format!("sync {}", st.describe(&last.name)), e))?;
                    st.sync_dir()
                        .map_err(|e| Error::io("sync log directory", e))?;
                }
                gtids = last.gtids_before.clone();
                for g in &scan.gtids {
                    gtids.insert(*g);
                }
                next_offset = last.first + scan.records;
                last.bytes = scan.valid_end;
                active_bytes = scan.valid_end;
            }
        }

        let last_offset = next_offset - 1;
        let epoch = segments.last().map_or(Epoch::INITIAL, |s| s.epoch);
        report.elapsed_us = started.elapsed().as_micros() as u64;
        let slots = Slots::load(st)?;
        let (visible_tx, _) = watch::channel(last_offset);
        let shared = Arc::new(Shared {
            storage: storage.clone(),
            opts,
            server_uuid,
            state: Mutex::new(State {
                next_offset,
                pending: Pending {
                    first: next_offset,
                    ..Pending::default()
                },
                spare: Vec::new(),
                segments,
                closing: false,
                writer_waiting: false,
                reset: None,
            }),
            wake_writer: Condvar::new(),
            written: AtomicU64::new(last_offset),
            durable: AtomicU64::new(last_offset),
            active_bytes: AtomicU64::new(active_bytes),
            visible_tx,
            visible_lock: Mutex::new(last_offset),
            visible_cv: Condvar::new(),
            visible_gtids: Mutex::new(gtids.clone()),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
            slots: Mutex::new(slots),
            segment_files: Mutex::new(()),
            retention_floor: AtomicU64::new(u64::MAX),
            history_epoch: AtomicU64::new(epoch.get()),
        });
        let writer = if shared.opts.read_only {
            None
        } else {
            let writer_shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name("tideline-wal-writer".into())
                .spawn(move || writer_main(writer_shared, gtids))
                .map_err(|e| Error::io("start the log writer thread", e))?;
            Some(handle)
        };
        Ok(Wal {
            shared,
            writer: Mutex::new(writer),
            recovery: report,
            _writer_lock: writer_lock,
        })
    }

    /// What recovery found when this log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
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

    /// Queues `txn` for the next group commit and returns at once with its offset-to-be.
    /// Offsets are assigned in call order. Wait on the returned [`Appended`] for the
    /// acknowledgement.
    pub fn submit(&self, txn: NewTransaction) -> Result<Appended, Error> {
        self.submit_with(txn, |_| ()).map(|(a, ())| a)
    }

    /// Like [`Wal::submit`], and calls `assigned` with the offset while still holding the
    /// ordering lock, so a caller can record offset order atomically with its own state.
    pub fn submit_with<R>(
        &self,
        txn: NewTransaction,
        assigned: impl FnOnce(Offset) -> R,
    ) -> Result<(Appended, R), Error>
    where
        R: Sized,
    {
        let shared = &*self.shared;
        if shared.poisoned.load(Ordering::SeqCst) {
            return Err(shared.poison_error());
        }
        if shared.opts.read_only {
            return Err(Error::ReadOnly);
        }
        // The readers refuse a record with GTID number 0 (`record::decode_payload`): one
        // written would stop recovery and every tail at it.
        if txn.gtid.seq == 0 {
            return Err(Error::InvalidRecord {
                reason: format!("GTID {}:0 (GTID numbers start at 1)", txn.gtid.uuid),
            });
        }
        // Sized up front: growing a large record's buffer by doubling copies it several times.
        let buf = rkyv::util::AlignedVec::<16>::with_capacity(encoded_size_hint(&txn));
        let payload =
            rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&txn, buf).map_err(|e| {
                Error::Encode {
                    reason: e.to_string(),
                }
            })?;
        if payload.len() as u64 > u64::from(shared.opts.record_bytes_max) {
            return Err(Error::RecordTooLarge {
                bytes: payload.len() as u64,
                max: shared.opts.record_bytes_max,
            });
        }
        let (tx, rx) = oneshot::channel();
        let mut st = lock(&shared.state);
        if st.closing {
            return Err(Error::Closed);
        }
        let offset = Offset::new(st.next_offset).ok_or(Error::Closed)?;
        record::append_frame(offset, &payload, &mut st.pending.bytes)?;
        st.next_offset += 1;
        st.pending.count += 1;
        st.pending.acks.push(tx);
        st.pending.gtids.push(txn.gtid);
        let r = assigned(offset);
        let wake = std::mem::take(&mut st.writer_waiting);
        drop(st);
        if wake {
            shared.wake_writer.notify_one();
        }
        Ok((Appended { offset, rx }, r))
    }

    /// Appends and waits: [`Wal::submit`] then [`Appended::wait`]. Blocking.
    pub fn append(&self, txn: NewTransaction) -> Result<Offset, Error> {
        self.submit(txn)?.wait()
    }

    /// Replaces the log's history: every segment is removed and a new, empty segment starts at
    /// the next offset with `gtids_before` as the GTIDs before it, so the log's GTID set becomes
    /// exactly `gtids_before` and offsets go on from where they were. This is how a node that was
    /// bootstrapped from a copy of another node's state records what that copy contains: the
    /// GTIDs count as executed here and as purged from this log, so a downstream that lacks them
    /// gets [`Error::GtidsPurged`] and bootstraps too. Readers opened before the reset fail with
    /// [`Error::HistoryReset`]. Blocks until done, synced and the directory synced.
    ///
    /// The caller must be the log's only writer and have no append in flight (appends submitted
    /// before are written first). Calling it again with the same set on an empty log changes
    /// nothing visible. A crash part-way leaves either the old history or the new one (an
    /// interrupted reset is completed by [`Wal::open`]).
    pub fn reset_history(&self, gtids_before: &GtidSet) -> Result<(), Error> {
        self.writable()?;
        let shared = &*self.shared;
        if shared.poisoned.load(Ordering::SeqCst) {
            return Err(shared.poison_error());
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut st = lock(&shared.state);
            if st.closing {
                return Err(Error::Closed);
            }
            st.reset = Some(ResetRequest {
                gtids_before: gtids_before.clone(),
                ack: tx,
            });
        }
        shared.wake_writer.notify_one();
        rx.blocking_recv().map_err(|_| Error::Closed)?
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

    /// Resolves once `offset` is visible. Fails if the log is poisoned or closed meanwhile.
    pub async fn wait_visible(&self, offset: Offset) -> Result<(), Error> {
        wait_visible(&self.shared, offset).await
    }

    /// Blocks until `offset` is visible or `timeout` passes; returns whether it is visible.
    pub fn wait_visible_blocking(&self, offset: Offset, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        let mut v = lock(&self.shared.visible_lock);
        loop {
            if self.shared.poisoned.load(Ordering::SeqCst) {
                return Err(self.shared.poison_error());
            }
            if *v >= offset.get() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            v = self
                .shared
                .visible_cv
                .wait_timeout(v, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A reader from `from`. Fails with [`Error::OffsetUnavailable`] if retention removed it
    /// or it lies more than one past the visible head.
    pub fn read_from(&self, from: Offset) -> Result<Reader, Error> {
        let first = self.first_offset();
        let last = self.visible_offset();
        if from < first || from.get() > last + 1 {
            return Err(Error::OffsetUnavailable {
                requested: from,
                first_available: first,
                last,
            });
        }
        Ok(Reader::new(self.shared.clone(), from.get(), None))
    }

    /// A reader of every record whose GTID is not in `have`, in log order (auto-positioning).
    /// The first segment is picked from segment headers; records in `have` are skipped.
    /// Fails with [`Error::GtidsPurged`] if some GTID not in `have` was purged.
    pub fn read_missing(&self, have: &GtidSet) -> Result<Reader, Error> {
        let st = lock(&self.shared.state);
        let purged = &st.segments[0].gtids_before;
        let missing = purged.difference(have);
        if !missing.is_empty() {
            return Err(Error::GtidsPurged { missing });
        }
        // Start in the first segment that holds a GTID outside `have`: segment i can be skipped
        // when everything before segment i+1 is in `have`.
        let mut start = st.segments[st.segments.len() - 1].first;
        for w in st.segments.windows(2) {
            if !w[1].gtids_before.is_subset(have) {
                start = w[0].first;
                break;
            }
        }
        drop(st);
        Ok(Reader::new(self.shared.clone(), start, Some(have.clone())))
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

    /// Reads every record of every segment and checks frames, checksums, payloads and dense
    /// offsets. Returns the number of records checked.
    pub fn verify(&self) -> Result<u64, Error> {
        let mut reader = self.read_from(self.first_offset())?;
        let mut n = 0;
        while reader.next_txn()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Creates slot `name` holding the log from `restart` on (the first offset its consumer
    /// still needs). Creating an existing slot returns it unchanged.
    pub fn create_slot(&self, name: &str, restart: Offset) -> Result<SlotInfo, Error> {
        self.writable()?;
        // Checked under the slots lock, which retention holds from choosing segments until
        // they are removed: once this check passes, retention sees the new slot.
        let mut slots = lock(&self.shared.slots);
        let first = self.first_offset();
        if restart < first {
            return Err(Error::OffsetUnavailable {
                requested: restart,
                first_available: first,
                last: self.visible_offset(),
            });
        }
        let info = slots.create(name, restart)?;
        slots.save(&*self.shared.storage)?;
        Ok(info)
    }

    /// Records that the consumer of `name` needs nothing before `restart`. Kept in memory and
    /// saved by the next [`Wal::run_retention`] or slot change; after a crash a slot may be a
    /// little behind, which holds more log, never less.
    pub fn advance_slot(&self, name: &str, restart: Offset) -> Result<(), Error> {
        lock(&self.shared.slots).advance(name, restart)
    }

    /// Removes slot `name`.
    pub fn drop_slot(&self, name: &str) -> Result<(), Error> {
        self.writable()?;
        let mut slots = lock(&self.shared.slots);
        slots.drop_slot(name)?;
        slots.save(&*self.shared.storage)
    }

    /// One slot.
    pub fn slot(&self, name: &str) -> Option<SlotInfo> {
        lock(&self.shared.slots).get(name).cloned()
    }

    /// All slots.
    pub fn slots(&self) -> Vec<SlotInfo> {
        lock(&self.shared.slots).list()
    }

    /// The owner's own hold: retention never removes a record at or after `floor` (the engine
    /// sets it to the first offset its state store has not yet persisted).
    pub fn set_retention_floor(&self, floor: Offset) {
        self.shared
            .retention_floor
            .store(floor.get(), Ordering::SeqCst);
    }

    /// Removes closed segments that nothing needs, and enforces the slot cap. Saves slots.
    pub fn run_retention(&self) -> Result<RetentionReport, Error> {
        self.run_retention_at(now_us())
    }

    /// [`Wal::run_retention`] with the current time given, for tests.
    pub fn run_retention_at(&self, now_us: i64) -> Result<RetentionReport, Error> {
        self.writable()?;
        let shared = &*self.shared;
        let policy = &shared.opts.retention;
        let mut report = RetentionReport::default();
        let _files = lock(&shared.segment_files);
        let mut slots = lock(&shared.slots);
        let slot_min = slots.min_active_restart();
        let floor = shared.retention_floor.load(Ordering::SeqCst);
        let mut to_remove = Vec::new();
        let cut = {
            let st = lock(&shared.state);
            let active = shared.active_bytes.load(Ordering::SeqCst);
            let mut total: u64 = st.segments[..st.segments.len() - 1]
                .iter()
                .map(|s| s.bytes)
                .sum::<u64>()
                + active;
            let mut cut = 0;
            while cut + 1 < st.segments.len() {
                let seg = &st.segments[cut];
                let next = &st.segments[cut + 1];
                let last_offset = next.first - 1;
                if last_offset >= floor {
                    break;
                }
                let needed_by_slot = slot_min.is_some_and(|m| m <= last_offset);
                let remove = if needed_by_slot {
                    let over_bytes = policy.slot_bytes_max.is_some_and(|max| total > max);
                    let closed_age_us = now_us.saturating_sub(next.created_us);
                    let over_age = policy
                        .slot_age_max
                        .is_some_and(|max| closed_age_us > max.as_micros() as i64);
                    if over_bytes || over_age {
                        let cap = if over_bytes {
                            "slot_bytes_max"
                        } else {
                            "slot_age_max"
                        };
                        report
                            .invalidated_slots
                            .extend(slots.invalidate_below(next.first, cap));
                        true
                    } else {
                        false
                    }
                } else {
                    total > policy.retain_bytes_min
                };
                if !remove {
                    break;
                }
                total -= seg.bytes;
                cut += 1;
            }
            cut
        };
        // A slot's invalidation is durable before the segments it needed go: after a crash
        // in between, the slot says invalidated and its log is still there, never the other
        // way round. Only the holder of `segment_files` removes from the front of
        // `state.segments`, so the first `cut` are still the ones chosen.
        slots.save(&*shared.storage)?;
        {
            let mut st = lock(&shared.state);
            for seg in st.segments.drain(..cut) {
                report.removed_bytes += seg.bytes;
                to_remove.push(seg.name);
            }
        }
        for name in &to_remove {
            shared
                .storage
                .remove(name)
                .map_err(|e| Error::io(format!("remove {}", shared.storage.describe(name)), e))?;
        }
        if !to_remove.is_empty() {
            shared
                .storage
                .sync_dir()
                .map_err(|e| Error::io("sync log directory", e))?;
            tracing::info!(
                segments = to_remove.len(),
                bytes = report.removed_bytes,
                "retention removed segments"
            );
        }
        for name in &report.invalidated_slots {
            tracing::warn!(slot = %name, "slot invalidated by the retention cap");
        }
        report.removed_segments = to_remove;
        Ok(report)
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

async fn wait_visible(shared: &Shared, offset: Offset) -> Result<(), Error> {
    let mut rx = shared.visible_tx.subscribe();
    let target = offset.get();
    let res = rx
        .wait_for(|v| *v >= target || shared.poisoned.load(Ordering::SeqCst))
        .await;
    if shared.poisoned.load(Ordering::SeqCst) && shared.visible() < target {
        return Err(shared.poison_error());
    }
    res.map(|_| ()).map_err(|_| Error::Closed)
}

fn verify_closed(
    st: &dyn Storage,
    seg: &SegmentMeta,
    next: &SegmentMeta,
    opts: &WalOptions,
) -> Result<u64, Error> {
    let scan = scan_segment(st, seg, opts.record_bytes_max)?.scan;
    if let Some((at, why)) = scan.bad {
        return Err(Error::Corrupt {
            file: st.describe(&seg.name),
            byte: at,
            reason: why.to_string(),
        });
    }
    if seg.first + scan.records != next.first {
        return Err(Error::Corrupt {
            file: st.describe(&seg.name),
            byte: scan.valid_end,
            reason: format!(
                "closed segment ends at offset {} but the next segment starts at {}",
                seg.first + scan.records - 1,
                next.first
            ),
        });
    }
    let mut gtids = seg.gtids_before.clone();
    for g in scan.gtids {
        gtids.insert(g);
    }
    if gtids != next.gtids_before {
        return Err(Error::Corrupt {
            file: st.describe(&next.name),
            byte: 56,
            reason: "GTID set in the header differs from the GTIDs of the records before it".into(),
        });
    }
    Ok(scan.records)
}

fn create_segment(
    st: &dyn Storage,
    opts: &WalOptions,
    server_uuid: Uuid,
    first: Offset,
    gtids_before: &GtidSet,
    epoch: Epoch,
) -> Result<SegmentMeta, Error> {
    let name = segment::file_name(first);
    let created_us = now_us();
    let header =
        segment::encode_header_in_epoch(first, server_uuid, created_us, gtids_before, epoch);
    let ctx = |what: &str| format!("{what} {}", st.describe(&name));
    let file = st.create(&name).map_err(|e| Error::io(ctx("create"), e))?;
    file.write_all_at(&header, 0)
        .map_err(|e| Error::io(ctx("write header of"), e))?;
    if !opts.unsafe_skip_fsync {
        file.sync_data().map_err(|e| Error::io(ctx("sync"), e))?;
        st.sync_dir()
            .map_err(|e| Error::io("sync log directory", e))?;
    }
    Ok(SegmentMeta {
        name,
        first: first.get(),
        gtids_before: gtids_before.clone(),
        epoch,
        header_bytes: header.len() as u32,
        created_us,
        bytes: header.len() as u64,
    })
}

/// Largest batch buffer the writer keeps for reuse.
const SPARE_BYTES_MAX: usize = 256 << 20;

/// A close upper estimate of a transaction's archived size.
fn encoded_size_hint(txn: &NewTransaction) -> usize {
    let ops: usize = txn
        .ops
        .iter()
        .map(|op| {
            let bytes = match op {
                crate::Op::Put {
                    tree,
                    key,
                    value,
                    before,
                } => tree.len() + key.len() + value.len() + before.as_ref().map_or(0, Vec::len),
                crate::Op::Delete { tree, key, before } => {
                    tree.len() + key.len() + before.as_ref().map_or(0, Vec::len)
                }
                crate::Op::Merge { tree, key, operand } => tree.len() + key.len() + operand.len(),
                crate::Op::CreateTree {
                    tree,
                    merge_operator,
                } => tree.len() + merge_operator.as_ref().map_or(0, String::len),
                crate::Op::DropTree { tree } => tree.len(),
            };
            bytes + 48
        })
        .sum();
    ops + 64
}

/// Longest a writer waits to gather a batch (see the gathering comment in `writer_main`).
const GATHER_MAX: Duration = Duration::from_micros(200);

/// The writer thread: owns the active segment.
fn writer_main(shared: Arc<Shared>, mut gtids_in_log: GtidSet) {
    let storage = shared.storage.clone();
    let st: &dyn Storage = &*storage;
    let mut name = {
        let state = lock(&shared.state);
        state.segments[state.segments.len() - 1].name.clone()
    };
    let mut file = match st.open(&name) {
        Ok(f) => f,
        Err(e) => {
            shared.poison(format!(
                "cannot open active segment {}: {e}",
                st.describe(&name)
            ));
            fail_pending_forever(&shared);
            return;
        }
    };
    let mut len = shared.active_bytes.load(Ordering::SeqCst);
    // The active file's length as of its last successful sync (recovery synced what it found).
    let mut synced_len = len;
    let sync_interval = match shared.opts.durability {
        Durability::Sync => None,
        Durability::Async { interval } => Some(interval.max(Duration::from_micros(100))),
    };
    let mut dirty = false;
    // GTIDs written but not yet durable: under `Async` readers see them only after the sync.
    let mut unpublished: Vec<Gtid> = Vec::new();
    let mut last_sync = Instant::now();
    // Size of the last synced batch and how long its sync took (Sync durability only).
    let mut last_batch: u64 = 0;
    let mut last_sync_took = Duration::ZERO;

    loop {
        let (batch, closing, reset) = {
            let mut state = lock(&shared.state);
            let mut gather_until: Option<Instant> = None;
            loop {
                if state.closing || (state.reset.is_some() && state.pending.count == 0) {
                    break;
                }
                if state.pending.count > 0 {
                    // Gathering: the writers acknowledged by the last sync come back within
                    // microseconds. Taking the first of them alone would split one group into
                    // a batch of 1 and a batch of the rest, halving the fsyncs' yield. So while
                    // the batch holds less than half of the previous one, wait a little
                    // (at most half the last sync's duration, capped) for the rest.
                    if sync_interval.is_some() || state.pending.count * 2 >= last_batch {
                        break;
                    }
                    let until = *gather_until.get_or_insert_with(|| {
                        Instant::now() + (last_sync_took / 2).min(GATHER_MAX)
                    });
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = shared.wait_for_work(state, Some(left));
                    continue;
                }
                match sync_interval {
                    Some(iv) if dirty => {
                        let left = iv.saturating_sub(last_sync.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        state = shared.wait_for_work(state, Some(left));
                    }
                    _ => state = shared.wait_for_work(state, None),
                }
            }
            let reset = if state.pending.count == 0 {
                state.reset.take()
            } else {
                None
            };
            let next_first = state.next_offset;
            let bytes = std::mem::take(&mut state.spare);
            let batch = std::mem::replace(
                &mut state.pending,
                Pending {
                    first: next_first,
                    bytes,
                    ..Pending::default()
                },
            );
            (batch, state.closing, reset)
        };

        if batch.count > 0 {
            if shared.poisoned.load(Ordering::SeqCst) {
                for ack in batch.acks {
                    let _ = ack.send(Err(shared.poison_error()));
                }
                continue;
            }
            // Roll before the batch if the active segment is full.
            let header_only = lock(&shared.state)
                .segments
                .last()
                .is_some_and(|s| u64::from(s.header_bytes) == len);
            if !header_only && len + batch.bytes.len() as u64 > shared.opts.segment_bytes_max {
                match roll(
                    &shared,
                    st,
                    &*file,
                    &name,
                    len,
                    batch.first,
                    &gtids_in_log,
                    &mut unpublished,
                ) {
                    Ok((new_name, new_file, new_len)) => {
                        name = new_name;
                        file = new_file;
                        len = new_len;
                        synced_len = new_len;
                        dirty = false;
                        last_sync = Instant::now();
                    }
                    Err(reason) => {
                        shared.poison(reason);
                        cut_unsynced(&shared, &*file, synced_len);
                        for ack in batch.acks {
                            let _ = ack.send(Err(shared.poison_error()));
                        }
                        continue;
                    }
                }
            }
            // Under `Sync`, everything before this batch is durable.
            let len_before = len;
            if let Err(e) = file.write_all_at(&batch.bytes, len) {
                shared.poison(format!("write to {} failed: {e}", st.describe(&name)));
                // Whatever part of the batch reached the file was never acknowledged: cut it,
                // so a restart cannot find it (best effort; recovery cuts a torn tail anyway).
                let _ = file.set_len(len_before);
                for ack in batch.acks {
                    let _ = ack.send(Err(shared.poison_error()));
                }
                continue;
            }
            len += batch.bytes.len() as u64;
            metrics::histogram!("tideline_log_group_commit_records").record(batch.count as f64);
            metrics::counter!("tideline_log_written_bytes_total")
                .increment(batch.bytes.len() as u64);
            shared.active_bytes.store(len, Ordering::SeqCst);
            let last = batch.first + batch.count - 1;
            shared.written.store(last, Ordering::SeqCst);
            for g in &batch.gtids {
                gtids_in_log.insert(*g);
            }
            match sync_interval {
                None => {
                    let sync_started = Instant::now();
                    let synced = sync_file(&shared, st, &*file, &name);
                    last_sync_took = sync_started.elapsed();
                    last_batch = batch.count;
                    if let Err(reason) = synced {
                        shared.poison(reason);
                        cut_unsynced(&shared, &*file, synced_len);
                        for ack in batch.acks {
                            let _ = ack.send(Err(shared.poison_error()));
                        }
                        continue;
                    }
                    synced_len = len;
                    shared.durable.store(last, Ordering::SeqCst);
                    shared.publish_visible(last, &batch.gtids);
                }
                Some(_) => {
                    // Acknowledged now, shown to readers once durable (see `made_durable`).
                    if shared.opts.unsafe_show_unsynced {
                        shared.publish_visible(last, &batch.gtids);
                    } else {
                        unpublished.extend_from_slice(&batch.gtids);
                    }
                    dirty = true;
                }
            }
            for ack in batch.acks {
                let _ = ack.send(Ok(()));
            }
            let mut bytes = batch.bytes;
            if bytes.capacity() <= SPARE_BYTES_MAX {
                bytes.clear();
                lock(&shared.state).spare = bytes;
            }
        }

        if let Some(req) = reset {
            match reset_segments(
                &shared,
                st,
                &*file,
                &name,
                &req.gtids_before,
                &mut unpublished,
            ) {
                Ok((new_name, new_file, new_len)) => {
                    name = new_name;
                    file = new_file;
                    len = new_len;
                    synced_len = new_len;
                    dirty = false;
                    last_sync = Instant::now();
                    gtids_in_log = req.gtids_before;
                    let _ = req.ack.send(Ok(()));
                }
                Err(reason) => {
                    shared.poison(reason);
                    cut_unsynced(&shared, &*file, synced_len);
                    let _ = req.ack.send(Err(shared.poison_error()));
                }
            }
        }

        if dirty && (closing || sync_interval.is_some_and(|iv| last_sync.elapsed() >= iv)) {
            if let Err(reason) = sync_file(&shared, st, &*file, &name) {
                shared.poison(reason);
                cut_unsynced(&shared, &*file, synced_len);
            } else {
                synced_len = len;
                made_durable(&shared, &mut unpublished);
            }
            dirty = false;
            last_sync = Instant::now();
        }
        if closing && lock(&shared.state).pending.count == 0 {
            return;
        }
    }
}

/// Everything written is durable now (the writer just synced it): moves the durable head and
/// shows readers what they could not see yet. Under `Async` this is the only place records
/// become visible, so a power cut can never take back a record a reader saw, and a restarted
/// node never reissues an offset or GTID number with other content.
fn made_durable(shared: &Shared, unpublished: &mut Vec<Gtid>) {
    let written = shared.written.load(Ordering::SeqCst);
    shared.durable.store(written, Ordering::SeqCst);
    if shared.visible() < written {
        shared.publish_visible(written, unpublished);
    }
    unpublished.clear();
}

/// After a failed sync of the active file. Linux may drop the dirty pages of a failed fsync
/// unwritten while the page cache still shows them, so a restart without a power cut would
/// read, recover and show records that the next power cut takes back. The file is cut back to
/// what the last successful sync covered, and a sync is attempted to make the cut durable (it
/// acknowledges nothing, so this is not a retry). Best effort: the log is poisoned and the node
/// stops either way, and whatever part of the unsynced bytes reached the disk before the error
/// may come back after a power cut. That is why the outcome of a failed append is unknown.
fn cut_unsynced(shared: &Shared, file: &dyn StorageFile, synced_len: u64) {
    if shared.durable.load(Ordering::SeqCst) >= shared.written.load(Ordering::SeqCst) {
        return;
    }
    let _ = file.set_len(synced_len);
    if !shared.skip_fsync() {
        let _ = file.sync_data();
    }
}

/// After the writer could not even start, answer every append with the poison error.
fn fail_pending_forever(shared: &Shared) {
    let mut state = lock(&shared.state);
    state.closing = true;
    for ack in std::mem::take(&mut state.pending.acks) {
        let _ = ack.send(Err(shared.poison_error()));
    }
}

/// Syncs the active file; returns the poison reason on failure (unless the test-only switch
/// says to carry on).
fn sync_file(
    shared: &Shared,
    st: &dyn Storage,
    file: &dyn StorageFile,
    name: &str,
) -> Result<(), String> {
    if shared.skip_fsync() {
        return Ok(());
    }
    let started = Instant::now();
    let synced = file.sync_data();
    metrics::histogram!("tideline_log_fsync_seconds").record(started.elapsed().as_secs_f64());
    match synced {
        Ok(()) => Ok(()),
        Err(e) if shared.opts.unsafe_ignore_sync_errors => {
            tracing::error!(file = %st.describe(name), error = %e, "fsync failed; ignored by test-only switch");
            Ok(())
        }
        Err(e) => Err(format!("fsync of {} failed: {e}", st.describe(name))),
    }
}

/// Closes the active segment (synced) and starts a new one at `first`.
#[expect(
    clippy::too_many_arguments,
    reason = "the writer thread's own state, passed down rather than bundled for one caller"
)]
fn roll(
    shared: &Shared,
    st: &dyn Storage,
    file: &dyn StorageFile,
    name: &str,
    len: u64,
    first: u64,
    gtids_before: &GtidSet,
    unpublished: &mut Vec<Gtid>,
) -> Result<(String, Box<dyn StorageFile>, u64), String> {
    sync_file(shared, st, file, name)?;
    made_durable(shared, unpublished);
    let first = Offset::new(first).ok_or_else(|| "segment at offset 0".to_string())?;
    let epoch = Epoch::new(shared.history_epoch.load(Ordering::SeqCst));
    let meta = create_segment(
        st,
        &shared.opts,
        shared.server_uuid,
        first,
        gtids_before,
        epoch,
    )
    .map_err(|e| e.to_string())?;
    let new_file = st
        .open(&meta.name)
        .map_err(|e| format!("open {}: {e}", st.describe(&meta.name)))?;
    let new_len = meta.bytes;
    let new_name = meta.name.clone();
    {
        let mut state = lock(&shared.state);
        if let Some(prev) = state.segments.last_mut() {
            prev.bytes = len;
        }
        state.segments.push(meta);
    }
    shared.active_bytes.store(new_len, Ordering::SeqCst);
    Ok((new_name, new_file, new_len))
}

/// Suffix of the file a history reset writes the new first segment to before renaming it.
const RESET_SUFFIX: &str = ".reset";

/// Carries out [`Wal::reset_history`] on the writer thread (no batch pending). Order, for
/// crash safety: the new segment is written under a temporary name and synced; the older
/// segments are removed oldest first (a crash here looks like retention); the new segment is
/// renamed into place (replacing the active one when it has the same first offset); the old
/// active segment is removed last. A crash between the last two leaves an old segment followed
/// by an empty one whose GTID set does not contain the old one's: [`Wal::open`] recognises that
/// and finishes the reset.
fn reset_segments(
    shared: &Shared,
    st: &dyn Storage,
    file: &dyn StorageFile,
    name: &str,
    gtids_before: &GtidSet,
    unpublished: &mut Vec<Gtid>,
) -> Result<(String, Box<dyn StorageFile>, u64), String> {
    sync_file(shared, st, file, name)?;
    made_durable(shared, unpublished);
    let written = shared.written.load(Ordering::SeqCst);
    let first = Offset::new(written + 1).ok_or_else(|| "offset overflow".to_string())?;
    let final_name = segment::file_name(first);
    let tmp = format!("{final_name}{RESET_SUFFIX}");
    let created_us = now_us();
    let epoch = Epoch::fresh();
    let header =
        segment::encode_header_in_epoch(first, shared.server_uuid, created_us, gtids_before, epoch);
    let ctx = |what: &str, n: &str| format!("{what} {}", st.describe(n));
    {
        let f = st
            .create(&tmp)
            .map_err(|e| ctx("create", &tmp) + &format!(": {e}"))?;
        f.write_all_at(&header, 0)
            .map_err(|e| ctx("write", &tmp) + &format!(": {e}"))?;
        if !shared.skip_fsync() {
            f.sync_data()
                .map_err(|e| ctx("sync", &tmp) + &format!(": {e}"))?;
        }
    }
    // Retention must not pick the segments this removes, nor remove one this is about to.
    let _files = lock(&shared.segment_files);
    // From here on, readers opened before see the reset instead of a missing file.
    shared.history_epoch.store(epoch.get(), Ordering::SeqCst);
    let old: Vec<String> = lock(&shared.state)
        .segments
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let (active, older) = old.split_last().ok_or("no active segment")?;
    for n in older {
        st.remove(n)
            .map_err(|e| ctx("remove", n) + &format!(": {e}"))?;
    }
    st.rename(&tmp, &final_name)
        .map_err(|e| ctx("rename", &tmp) + &format!(": {e}"))?;
    if *active != final_name {
        st.remove(active)
            .map_err(|e| ctx("remove", active) + &format!(": {e}"))?;
    }
    if !shared.skip_fsync() {
        st.sync_dir()
            .map_err(|e| format!("sync log directory: {e}"))?;
    }
    let new_file = st
        .open(&final_name)
        .map_err(|e| ctx("open", &final_name) + &format!(": {e}"))?;
    let bytes = header.len() as u64;
    {
        let mut state = lock(&shared.state);
        state.segments = vec![SegmentMeta {
            name: final_name.clone(),
            first: first.get(),
            gtids_before: gtids_before.clone(),
            epoch,
            header_bytes: header.len() as u32,
            created_us,
            bytes,
        }];
    }
    *lock(&shared.visible_gtids) = gtids_before.clone();
    shared.active_bytes.store(bytes, Ordering::SeqCst);
    Ok((final_name, new_file, bytes))
}

struct OpenSegment {
    file: Box<dyn StorageFile>,
    name: String,
    /// File position of `buf[0]`.
    buf_file_pos: u64,
}

/// Reads records in log order up to the visible head. Obtained from [`Wal::read_from`] or
/// [`Wal::read_missing`]. A reader keeps working on a segment that retention removes after
/// it was opened.
pub struct Reader {
    shared: Arc<Shared>,
    /// The log's history epoch when this reader was opened.
    epoch: u64,
    next: u64,
    exclude: Option<GtidSet>,
    seg: Option<OpenSegment>,
    buf: Vec<u8>,
    pos: usize,
}

const READ_CHUNK_BYTES: usize = 1 << 20;

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("next", &self.next)
            .field("segment", &self.seg.as_ref().map(|s| &s.name))
            .field("excluding", &self.exclude.as_ref().map(ToString::to_string))
            .finish()
    }
}

impl Reader {
    fn new(shared: Arc<Shared>, next: u64, exclude: Option<GtidSet>) -> Reader {
        Reader {
            epoch: shared.history_epoch.load(Ordering::SeqCst),
            shared,
            next,
            exclude,
            seg: None,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The log's history epoch this reader reads in: it fails with [`Error::HistoryReset`]
    /// once the log moves to another.
    pub fn epoch(&self) -> Epoch {
        Epoch::new(self.epoch)
    }

    /// The offset the next record read will have (or would have, for skipped ones).
    pub fn next_offset(&self) -> Offset {
        Offset::new(self.next).unwrap_or(Offset::FIRST)
    }

    /// Resolves once a record at or after the reader's position is visible.
    pub async fn wait(&self) -> Result<(), Error> {
        wait_visible(&self.shared, self.next_offset()).await
    }

    /// The next visible record, or `None` when the reader has caught up with the visible head.
    pub fn next_txn(&mut self) -> Result<Option<Transaction>, Error> {
        self.check_epoch()?;
        loop {
            if self.next > self.shared.visible() {
                return Ok(None);
            }
            let (decoded, used) = self.read_one(Mode::Decode)?;
            self.pos += used;
            self.next += 1;
            let Decoded::Txn(txn) = decoded else {
                return Err(self.corrupt(self.pos, "internal: frame not decoded".into()));
            };
            if let Some(have) = &self.exclude
                && have.contains(&txn.gtid)
            {
                continue;
            }
            return Ok(Some(txn));
        }
    }

    /// Like [`Reader::next_txn`], but appends the record's frame to `out` exactly as the log
    /// stores it and returns its offset. The frame's checksum and offset are checked; the
    /// payload is not decoded (only validated, for its GTID, when this reader skips GTIDs), so
    /// whoever receives the frame validates it. For passing records on, as a tail server does.
    pub fn next_raw(&mut self, out: &mut Vec<u8>) -> Result<Option<Offset>, Error> {
        self.check_epoch()?;
        loop {
            if self.next > self.shared.visible() {
                return Ok(None);
            }
            let mode = if self.exclude.is_some() {
                Mode::Raw
            } else {
                Mode::Frame
            };
            let (decoded, used) = self.read_one(mode)?;
            let offset = self.position_checked()?;
            let frame = self.pos..self.pos + used;
            self.pos += used;
            self.next += 1;
            if let (Some(have), Decoded::Raw(gtid)) = (&self.exclude, &decoded)
                && have.contains(gtid)
            {
                continue;
            }
            out.extend_from_slice(&self.buf[frame]);
            return Ok(Some(offset));
        }
    }

    /// Fails once the log's history was replaced after this reader was opened.
    fn check_epoch(&self) -> Result<(), Error> {
        if self.shared.history_epoch.load(Ordering::SeqCst) != self.epoch {
            return Err(Error::HistoryReset {
                gtids_before: self.shared_gtids_before(),
            });
        }
        Ok(())
    }

    fn shared_gtids_before(&self) -> GtidSet {
        lock(&self.shared.state).segments[0].gtids_before.clone()
    }

    fn position_checked(&self) -> Result<Offset, Error> {
        Offset::new(self.next).ok_or_else(|| self.corrupt(self.pos, "offset 0".into()))
    }

    /// Locates the segment holding `self.next` and positions the buffer at its header end.
    fn open_segment(&mut self) -> Result<(), Error> {
        let shared = &*self.shared;
        let st: &dyn Storage = &*shared.storage;
        let (meta, first_available) = {
            let state = lock(&shared.state);
            let idx = state.segments.partition_point(|s| s.first <= self.next);
            let first_available = state.segments[0].first;
            (
                idx.checked_sub(1).map(|i| state.segments[i].clone()),
                first_available,
            )
        };
        let Some(meta) = meta else {
            return Err(Error::OffsetUnavailable {
                requested: self.next_offset(),
                first_available: Offset::new(first_available).unwrap_or(Offset::FIRST),
                last: shared.visible(),
            });
        };
        let file = st.open(&meta.name).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::OffsetUnavailable {
                    requested: self.next_offset(),
                    first_available: Offset::new(first_available).unwrap_or(Offset::FIRST),
                    last: shared.visible(),
                }
            } else {
                Error::io(format!("open {}", st.describe(&meta.name)), e)
            }
        })?;
        self.seg = Some(OpenSegment {
            file,
            name: meta.name.clone(),
            buf_file_pos: u64::from(meta.header_bytes),
        });
        self.buf.clear();
        self.pos = 0;
        // Skip frames before `next` without decoding their payloads.
        let mut at = meta.first;
        while at < self.next {
            let used = self.frame_at_pos(Mode::Skip)?.1;
            self.pos += used;
            at += 1;
        }
        Ok(())
    }

    /// Reads the record at `self.next`, switching segments as needed. Leaves `self.pos` at
    /// the frame; returns what was decoded and the frame's length.
    fn read_one(&mut self, mode: Mode) -> Result<(Decoded, usize), Error> {
        if self.seg.is_none() {
            self.open_segment()?;
        }
        match self.frame_at_pos(mode) {
            Ok(x) => Ok(x),
            Err(ReadEnd::End) => {
                self.seg = None;
                self.open_segment()?;
                Ok(self.frame_at_pos(mode)?)
            }
            Err(ReadEnd::Err(e)) => Err(e),
        }
    }

    fn corrupt(&self, at: usize, reason: String) -> Error {
        let seg = self.seg.as_ref();
        Error::Corrupt {
            file: seg
                .map(|s| self.shared.storage.describe(&s.name))
                .unwrap_or_default(),
            byte: seg.map_or(0, |s| s.buf_file_pos) + at as u64,
            reason,
        }
    }

    /// Checks (and as `mode` says, decodes) the frame at `self.pos`, reading more of the file
    /// as needed. Does not advance `self.pos`.
    fn frame_at_pos(&mut self, mode: Mode) -> Result<(Decoded, usize), ReadEnd> {
        let skip = matches!(mode, Mode::Skip);
        let max = self.shared.opts.record_bytes_max;
        loop {
            match record::check_frame(&self.buf[self.pos..], max) {
                Ok(raw) => {
                    let expect = if skip { None } else { Some(self.next) };
                    if let Some(expect) = expect
                        && raw.offset.get() != expect
                    {
                        return Err(ReadEnd::Err(self.corrupt(
                            self.pos,
                            format!(
                                "record has offset {} where {expect} was expected",
                                raw.offset
                            ),
                        )));
                    }
                    let decoded = match mode {
                        Mode::Skip | Mode::Frame => Ok(Decoded::Skipped),
                        Mode::Decode => {
                            record::decode_payload(raw.offset, raw.payload).map(Decoded::Txn)
                        }
                        Mode::Raw => record::payload_gtid(raw.payload).map(Decoded::Raw),
                    }
                    .map_err(|e| ReadEnd::Err(self.corrupt(self.pos, e.to_string())))?;
                    return Ok((decoded, raw.frame_bytes));
                }
                Err(FrameError::Truncated { needed, .. }) => {
                    let got = self.refill(needed).map_err(ReadEnd::Err)?;
                    if got == 0 {
                        // Nothing more in this file. Either the record is in the next segment,
                        // or the file is missing bytes that must be there.
                        let more_segments = {
                            let state = lock(&self.shared.state);
                            state.segments.iter().any(|s| s.first == self.next)
                        };
                        if more_segments && self.buf.len() == self.pos {
                            return Err(ReadEnd::End);
                        }
                        let reason = if self.buf.len() == self.pos {
                            format!("segment ends before offset {}", self.next)
                        } else {
                            format!("record at offset {} is truncated", self.next)
                        };
                        return Err(ReadEnd::Err(self.corrupt(self.pos, reason)));
                    }
                }
                Err(e) => return Err(ReadEnd::Err(self.corrupt(self.pos, e.to_string()))),
            }
        }
    }

    /// Reads at least `needed` bytes past `self.pos` if the file has them. Returns bytes read.
    fn refill(&mut self, needed: usize) -> Result<usize, Error> {
        let Some(seg) = self.seg.as_mut() else {
            return Ok(0);
        };
        // Drop consumed bytes.
        if self.pos > 0 {
            seg.buf_file_pos += self.pos as u64;
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let have = self.buf.len();
        // Up to a chunk (more if the frame needs it), but not past the end of the file: a
        // caught-up tail then zero-fills a few bytes, not a whole chunk per record, and a
        // damaged length cannot grow the buffer beyond the file.
        let file_len = seg.file.len().map_err(|e| {
            Error::io(
                format!("stat {}", self.shared.storage.describe(&seg.name)),
                e,
            )
        })?;
        let left = file_len.saturating_sub(seg.buf_file_pos + have as u64);
        let more = needed.saturating_sub(have).max(READ_CHUNK_BYTES);
        let want = have + usize::try_from(left).unwrap_or(usize::MAX).min(more).max(1);
        self.buf.resize(want, 0);
        let n = seg
            .file
            .read_full_at(&mut self.buf[have..], seg.buf_file_pos + have as u64)
            .map_err(|e| {
                Error::io(
                    format!("read {}", self.shared.storage.describe(&seg.name)),
                    e,
                )
            })?;
        self.buf.truncate(have + n);
        Ok(n)
    }
}

/// How much of a frame to decode.
#[derive(Clone, Copy)]
enum Mode {
    /// Check the frame only, whatever its offset (positioning).
    Skip,
    /// Check the frame and that it holds the expected offset.
    Frame,
    /// Build the transaction.
    Decode,
    /// Validate the payload and extract the GTID; the frame is passed on as stored.
    Raw,
}

enum Decoded {
    Skipped,
    Txn(Transaction),
    Raw(Gtid),
}

enum ReadEnd {
    /// The current segment has no more records; move on.
    End,
    Err(Error),
}

impl From<ReadEnd> for Error {
    fn from(e: ReadEnd) -> Error {
        match e {
            ReadEnd::Err(e) => e,
            ReadEnd::End => Error::Corrupt {
                file: String::new(),
                byte: 0,
                reason: "a segment ends where a record was expected".into(),
            },
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Transaction, Error>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_txn().transpose()
    }
}
