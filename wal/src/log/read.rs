//! Reading: [`Reader`] walks the log in order from an offset or from "everything not in this
//! GTID set", up to the visible head, and waiters await new visible records without polling.
//!
//! Owns: [`Reader`], [`Wal::read_from`], [`Wal::read_missing`] and the visibility waits.
//! Must never: write or remove a file, read past the visible head, or go on across a history
//! reset (a reader opened before one fails with [`Error::HistoryReset`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::gtid::{Gtid, GtidSet};
use crate::record::{self, FrameError, Transaction};
use crate::storage::{Storage, StorageFile};
use crate::{Epoch, Error, Offset};

use super::{Shared, State, Wal, lock};

impl Wal {
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
        let (first, epoch) = {
            let st = lock(&self.shared.state);
            let first = Offset::new(st.segments[0].first).unwrap_or(Offset::FIRST);
            (first, segments_epoch(&st))
        };
        let last = self.visible_offset();
        if from < first || from.get() > last + 1 {
            return Err(Error::OffsetUnavailable {
                requested: from,
                first_available: first,
                last,
            });
        }
        Ok(Reader::new(self.shared.clone(), from.get(), None, epoch))
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
        let epoch = segments_epoch(&st);
        drop(st);
        Ok(Reader::new(
            self.shared.clone(),
            start,
            Some(have.clone()),
            epoch,
        ))
    }
}

/// The history epoch of the segments a reader was positioned on. Not the log's epoch: a reset
/// publishes its new epoch before it replaces the segments (so that readers already open see
/// the reset rather than a missing file), and a reader positioned on the old segments in that
/// moment must be one of those readers, not one of the new history.
fn segments_epoch(st: &State) -> u64 {
    st.segments
        .last()
        .map_or(Epoch::INITIAL.get(), |s| s.epoch.get())
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
    fn new(shared: Arc<Shared>, next: u64, exclude: Option<GtidSet>, epoch: u64) -> Reader {
        Reader {
            epoch,
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

    /// Test-only: the bytes this reader's buffer holds allocated. Exists so a test can check
    /// that a large record does not leave the reader holding its size.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
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
            // A reset replaces every segment, so a reader of the old history that comes here
            // between its epoch checks must hear of the reset, not of a removed position.
            self.check_epoch()?;
            return Err(Error::OffsetUnavailable {
                requested: self.next_offset(),
                first_available: Offset::new(first_available).unwrap_or(Offset::FIRST),
                last: shared.visible(),
            });
        };
        // A segment of another history: a reset replaced the one this reader read in while it
        // was between checks of the epoch (skipping GTIDs, say). It never reads on in it.
        if meta.epoch.get() != self.epoch {
            return Err(Error::HistoryReset {
                gtids_before: self.shared_gtids_before(),
            });
        }
        let file = st.open_read(&meta.name).map_err(|e| {
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
                        // or retention removed that segment too (this one, already open, was
                        // removed with it: the record is gone, and opening the next segment
                        // says so as for any removed position), or the file is missing bytes
                        // that must be there.
                        let (more_segments, removed) = {
                            let state = lock(&self.shared.state);
                            (
                                state.segments.iter().any(|s| s.first == self.next),
                                state.segments[0].first > self.next,
                            )
                        };
                        if (more_segments || removed) && self.buf.len() == self.pos {
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
        // A chunk in all (the whole frame if it is larger), but not past the end of the file:
        // a caught-up tail then zero-fills a few bytes, not a whole chunk per record, and a
        // damaged length cannot grow the buffer beyond the file.
        let file_len = seg.file.len().map_err(|e| {
            Error::io(
                format!("stat {}", self.shared.storage.describe(&seg.name)),
                e,
            )
        })?;
        let left = file_len.saturating_sub(seg.buf_file_pos + have as u64);
        let more = needed.max(READ_CHUNK_BYTES).saturating_sub(have);
        let want = have + usize::try_from(left).unwrap_or(usize::MAX).min(more).max(1);
        // The buffer is held for the reader's life (a subscription's): it stays at a chunk, and
        // a frame larger than that grows it only while the frame is read. Exact sizes, so that
        // growing never doubles past what is asked.
        let keep = want.max(READ_CHUNK_BYTES);
        if self.buf.capacity() > keep {
            self.buf.shrink_to(keep);
        } else if want > self.buf.capacity() {
            self.buf.reserve_exact(want - have);
        }
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
