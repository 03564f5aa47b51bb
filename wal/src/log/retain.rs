//! Retention, slots and the history reset: which closed segments nothing needs any more, the
//! named slots that hold them, the size/age cap that invalidates a dead slot, and replacing the
//! log's history.
//!
//! Owns: removing segment files (under `Shared::segment_files`) and the slots file.
//! Must never: remove the active segment or a record a live slot or the retention floor still
//! holds, or leave a crash point from which [`Wal::open`] cannot tell the old history from the
//! new one.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use crate::gtid::{Gtid, GtidSet};
use crate::segment;
use crate::slots::SlotInfo;
use crate::storage::{Storage, StorageFile};
use crate::{Epoch, Error, Offset};

use super::writer::{made_durable, sync_file};
use super::{ResetRequest, RetentionReport, SegmentMeta, Shared, Wal, lock, now_us};

impl Wal {
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

    /// Creates slot `name` holding the log from `restart` on (the first offset its consumer
    /// still needs). Creating an existing slot returns it unchanged; one that retention's cap
    /// invalidated is refused with [`Error::SlotInvalidated`] (here `restart` is always still
    /// in the log, so the advice is a new slot, not a re-bootstrap).
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
        let info = slots.create(name, restart, first)?;
        slots.save(&*self.shared.storage)?;
        Ok(info)
    }

    /// Records that the consumer of `name` needs nothing before `restart`. Kept in memory and
    /// saved by the next [`Wal::run_retention`] or slot change; after a crash a slot may be a
    /// little behind, which holds more log, never less. Fails with [`Error::NoSuchSlot`] once
    /// the slot is dropped and with [`Error::SlotInvalidated`] once retention's cap invalidated
    /// it: either way it holds nothing for the consumer any more.
    pub fn advance_slot(&self, name: &str, restart: Offset) -> Result<(), Error> {
        lock(&self.shared.slots).advance(name, restart, || self.first_offset())
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
}

/// Suffix of the file a history reset writes the new first segment to before renaming it.
pub(super) const RESET_SUFFIX: &str = ".reset";

/// Carries out [`Wal::reset_history`] on the writer thread (no batch pending). Order, for
/// crash safety: the new segment is written under a temporary name and synced; the older
/// segments are removed oldest first (a crash here looks like retention); the new segment is
/// renamed into place (replacing the active one when it has the same first offset); the old
/// active segment is removed last. A crash between the last two leaves an old segment followed
/// by an empty one whose GTID set does not contain the old one's: [`Wal::open`] recognises that
/// and finishes the reset.
pub(super) fn reset_segments(
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
