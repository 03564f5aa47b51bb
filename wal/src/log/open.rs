//! Opening and recovery: taking the directory's writer lock, reading segment headers, scanning
//! the active segment, cutting a torn tail, finishing an interrupted history reset, checking
//! closed segments on request, and starting the writer thread.
//!
//! Owns: [`Wal::open`] and [`Wal::verify`], and the frame scanner they share.
//! Must never: cut or remove a record that may have been acknowledged. It cuts only a torn tail
//! of the last segment (a whole frame with a valid checksum is never taken for one), removes
//! only a last segment torn at creation and what an interrupted reset left, and reports any
//! other damage as [`Error::Corrupt`] naming file and byte; a segment whose checksum-valid
//! header names a format this build does not read is [`Error::UnsupportedFormat`], not damage.
//! A read-only log changes nothing and opens every file for reading only, so that it opens
//! where it may not write. An inspecting open (read-only and [`WalOptions::inspect_damaged`])
//! is the one exception to refusing damage in the last segment: it ends the log before the
//! damage and records it, changing nothing, so that the records before it can be read.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::watch;
use uuid::Uuid;

use crate::gtid::{Gtid, GtidSet};
use crate::record::{self, FrameError};
use crate::segment::{self, HeaderError, SegmentHeader};
use crate::slots::Slots;
use crate::storage::{Storage, StorageFile};
use crate::{Epoch, Error, Offset};

use super::append::create_segment;
use super::retain::RESET_SUFFIX;
use super::writer::{fail_pending_forever, writer_main};
use super::{Damage, Pending, RecoveryReport, SegmentMeta, Shared, State, Wal, WalOptions};

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

/// Opens a segment, for writing too when `writable` (to cut a torn tail), reads it whole and
/// scans its frames.
fn scan_segment(
    st: &dyn Storage,
    seg: &SegmentMeta,
    record_bytes_max: u32,
    writable: bool,
) -> Result<ScannedSegment, Error> {
    let file = if writable {
        st.open(&seg.name)
    } else {
        st.open_read(&seg.name)
    }
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
    /// is damaged is an [`Error::Corrupt`] naming the file and byte (except damage in the last
    /// segment under [`WalOptions::inspect_damaged`], which ends the log before it).
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
            // Only read here: a read-only log must open where it may not write.
            let file = st
                .open_read(name)
                .map_err(|e| Error::io(format!("open {}", st.describe(name)), e))?;
            let header = match header_of(st, &*file, name)? {
                Ok(h) => h,
                Err(e) => {
                    let len = file.len().unwrap_or(0);
                    let torn_creation = Some(i) == last_idx
                        && match e {
                            // Cut short while it was written, not a length field damaged
                            // into claiming more than the file holds (the file then holds
                            // records, and they must not go with it).
                            HeaderError::Truncated { available, .. } => {
                                available < segment::HEADER_FIXED_BYTES
                                    || segment::header_len_is_consistent(&read_all(
                                        st, &*file, name,
                                    )?)
                            }
                            _ => read_all(st, &*file, name)?.iter().all(|&b| b == 0),
                        };
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
                    return Err(match e {
                        // Whole and checksum-valid: written by another build, not damaged.
                        HeaderError::UnsupportedVersion { format, rkyv } => {
                            Error::UnsupportedFormat {
                                file: st.describe(name),
                                format,
                                rkyv,
                            }
                        }
                        e => Error::Corrupt {
                            file: st.describe(name),
                            byte: 0,
                            reason: e.to_string(),
                        },
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
            {
                // An empty last segment of another history epoch (or, written before epochs,
                // whose GTID set does not contain the earlier ones') is what an interrupted
                // `reset_history` leaves: finish it. Read-only, the log is shown as the next
                // read-write open will make it, and nothing is removed.
                if opts.read_only {
                    segments.clear();
                } else {
                    tracing::warn!(file = %st.describe(name), "completing an interrupted history reset");
                    for s in segments.drain(..) {
                        st.remove(&s.name).map_err(|e| {
                            Error::io(format!("remove {}", st.describe(&s.name)), e)
                        })?;
                    }
                    st.sync_dir()
                        .map_err(|e| Error::io("sync log directory", e))?;
                }
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
        let mut damage = None;
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
                    scan_segment(st, last, opts.record_bytes_max, !opts.read_only)?;
                report.records_scanned += scan.records;
                if let Some((bad_at, why)) = &scan.bad {
                    let (bad_at, expect) = (*bad_at, last.first + scan.records);
                    let not_torn = refused_not_torn(&buf[bad_at as usize..], why).or_else(|| {
                        valid_frame_after(&buf, bad_at as usize, expect, opts.record_bytes_max).map(
                            |later| {
                                format!(
                                    "{why}, yet a valid record follows at byte {later}: this \
                                     is damage inside the log, not a torn tail"
                                )
                            },
                        )
                    });
                    match not_torn {
                        // Inspection: the log ends before the damage. Nothing is cut (the open
                        // is read-only), and the damage stays visible through `Wal::damage`.
                        Some(reason) if opts.read_only && opts.inspect_damaged => {
                            damage = Some(Damage {
                                file: st.describe(&last.name),
                                byte: bad_at,
                                reason,
                            });
                        }
                        Some(reason) => {
                            return Err(Error::Corrupt {
                                file: st.describe(&last.name),
                                byte: bad_at,
                                reason,
                            });
                        }
                        None => report.truncated_bytes = buf.len() as u64 - bad_at,
                    }
                }
                // Only a torn tail gets here with `scan.bad` in a writable open: damage was
                // refused above.
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
                if !opts.skip_fsync() && !opts.read_only {
                    // A segment that holds only its header may be one whose header fsync
                    // failed: Linux then marked the header's pages clean unwritten, so a sync
                    // alone would not write it and records appended behind it would follow
                    // zeros on disk. Written again, the header is dirty and the sync writes it.
                    let header_bytes = last.header_bytes as usize;
                    if scan.valid_end == u64::from(last.header_bytes) && buf.len() >= header_bytes {
                        file.write_all_at(&buf[..header_bytes], 0).map_err(|e| {
                            Error::io(
                                format!("rewrite the header of {}", st.describe(&last.name)),
                                e,
                            )
                        })?;
                    }
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
                leading: false,
            }),
            wake_writer: Condvar::new(),
            active: Mutex::new(None),
            unsynced: AtomicBool::new(false),
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
                .spawn(move || {
                    // A writer that dies (a bug) poisons the log: fail-stop, never appends
                    // queued for ever behind a dead thread.
                    let guard = writer_shared.clone();
                    let run = std::panic::AssertUnwindSafe(|| writer_main(writer_shared, gtids));
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        let text = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic without a message".into());
                        guard.poison(format!(
                            "the log writer thread died ({text}); restart the node: recovery \
                             keeps every acknowledged record"
                        ));
                        fail_pending_forever(&guard);
                    }
                })
                .map_err(|e| Error::io("start the log writer thread", e))?;
            Some(handle)
        };
        Ok(Wal {
            shared,
            writer: Mutex::new(writer),
            recovery: report,
            damage,
            _writer_lock: writer_lock,
        })
    }

    /// Reads every record of every segment and checks frames, checksums, payloads and dense
    /// offsets. Returns the number of records checked. Fails with the damage an inspecting
    /// open stopped the log at ([`Wal::damage`]) once the records before it are checked.
    pub fn verify(&self) -> Result<u64, Error> {
        let mut reader = self.read_from(self.first_offset())?;
        let mut n = 0;
        while reader.next_txn()?.is_some() {
            n += 1;
        }
        if let Some(damage) = self.damage() {
            return Err(damage);
        }
        Ok(n)
    }
}

fn verify_closed(
    st: &dyn Storage,
    seg: &SegmentMeta,
    next: &SegmentMeta,
    opts: &WalOptions,
) -> Result<u64, Error> {
    let scan = scan_segment(st, seg, opts.record_bytes_max, false)?.scan;
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
