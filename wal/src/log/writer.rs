//! Writing queued groups: the writer thread writes each batch with one call, syncs it once,
//! acknowledges it, rolls segments and carries out history resets. Under `Async`, a committer
//! waiting on a record queued with [`Wal::submit_encoded_acked`] writes the pending batch
//! itself instead ([`lead`]); whoever writes holds the active segment (`Shared::active`) from
//! taking a batch until it is written.
//!
//! Owns: the active segment file, the written and durable heads, and fail-stop (a failed write
//! or fsync poisons the log and cuts the active segment back to the last good sync).
//! Must never: acknowledge an append under `Sync` before its bytes are durable, retry a failed
//! fsync and acknowledge, acknowledge or publish anything once the log is poisoned (a later
//! fsync that succeeds proves nothing: Linux reports a failed fsync's error once), or make a
//! record visible before it is durable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::Offset;
use crate::gtid::{Gtid, GtidSet};
use crate::storage::{Storage, StorageFile};

#[cfg(doc)]
use super::Wal;
use super::append::{create_segment, discard_new_segment};
use super::retain::reset_segments;
use super::{Durability, Epoch, Pending, Shared, State, WalOptions, lock};

/// Largest batch buffer the writer keeps for reuse.
const SPARE_BYTES_MAX: usize = 256 << 20;

/// Longest a writer waits to gather a batch (see the gathering comment in `writer_main`).
const GATHER_MAX: Duration = Duration::from_micros(200);

/// Groups a leading committer writes before it hands what is still pending to the writer
/// thread, so that under a steady stream of commits its own caller is not kept for ever.
const LEAD_ROUNDS_MAX: u32 = 8;

/// The active segment and what goes with writing to it, behind `Shared::active`.
pub(super) struct Active {
    name: String,
    file: Arc<dyn StorageFile>,
    /// Bytes written to the file.
    len: u64,
    /// The file's length as of its last successful sync (recovery synced what it found).
    synced_len: u64,
    /// GTIDs written but not yet durable: under `Async` readers see them only after the sync.
    unpublished: Vec<Gtid>,
    /// GTIDs of every record written (the next segment's header lists them).
    gtids_in_log: GtidSet,
}

impl Active {
    /// Makes a segment just created and synced (name, file, length) the active one.
    fn switch_to(
        &mut self,
        shared: &Shared,
        (name, file, len): (String, Box<dyn StorageFile>, u64),
    ) {
        self.name = name;
        self.file = Arc::from(file);
        self.len = len;
        self.synced_len = len;
        shared.unsynced.store(false, Ordering::SeqCst);
    }
}

/// Takes the pending group, leaving an empty one (with the spare buffer) for the next.
fn take_pending(state: &mut State) -> Pending {
    let next_first = state.next_offset;
    let bytes = std::mem::take(&mut state.spare);
    std::mem::replace(
        &mut state.pending,
        Pending {
            first: next_first,
            bytes,
            ..Pending::default()
        },
    )
}

/// Whether `bytes` more would overfill the active segment (one that holds only its header
/// takes any batch, so a record larger than a segment still goes somewhere).
fn needs_roll(state: &State, active: &Active, bytes: usize, opts: &WalOptions) -> bool {
    let header_only = state
        .segments
        .last()
        .is_some_and(|s| u64::from(s.header_bytes) == active.len);
    !header_only && active.len + bytes as u64 > opts.segment_bytes_max
}

/// The combining leader, under `Async`: a committer waiting on its record writes the pending
/// group itself, then the groups that gathered meanwhile (their committers wait on their
/// acknowledgements), instead of waking the writer thread and being woken by it. Segment rolls,
/// history resets, syncs and closing stay with the writer thread: a leader that meets one of
/// them, or has written `LEAD_ROUNDS_MAX` groups, hands what is pending to it.
///
/// Every pending record is always someone's: the leader's (`state.leading`, which it clears
/// only with nothing pending or while waking the writer, under the lock appenders queue
/// under), a caller's that will lead when it waits, or the writer thread's.
pub(super) fn lead(shared: &Shared) {
    {
        let mut state = lock(&shared.state);
        if state.leading || state.pending.count == 0 {
            // The current leader takes the record with its next group, or someone wrote it.
            return;
        }
        state.leading = true;
    }
    let mut active = lock(&shared.active);
    let mut rounds = 0;
    loop {
        let mut state = lock(&shared.state);
        let go_on = match active.as_ref() {
            Some(a) => {
                state.pending.count > 0
                    && rounds < LEAD_ROUNDS_MAX
                    && !state.closing
                    && state.reset.is_none()
                    && !shared.opts.writer_killed_at(state.pending.first)
                    && !needs_roll(&state, a, state.pending.bytes.len(), &shared.opts)
            }
            None => false,
        };
        let Some(a) = active.as_mut().filter(|_| go_on) else {
            state.leading = false;
            if state.pending.count > 0 {
                shared.wake_writer_if_waiting(state);
            }
            return;
        };
        let batch = take_pending(&mut state);
        drop(state);
        write_batch(shared, a, batch, None, false);
        rounds += 1;
    }
}

/// Hands a record queued for a leader to the writer thread instead (its `Appended` was
/// awaited or dropped rather than waited for).
pub(super) fn hand_off(shared: &Shared) {
    let state = lock(&shared.state);
    if !state.leading && state.pending.count > 0 {
        shared.wake_writer_if_waiting(state);
    }
}

/// What [`write_batch`] did besides writing.
#[derive(Default)]
struct Wrote {
    /// It rolled to a new segment (which synced everything before).
    rolled: bool,
    /// How long the batch's own sync took (`Sync` durability).
    sync_took: Option<Duration>,
}

/// Writes one group to the active segment and acknowledges it: under `Sync` once synced,
/// under `Async` once written (shown to readers at the writer thread's next sync). Rolls first
/// if the segment is full (only the writer thread gets there: leaders hand such a group over).
/// A failure poisons the log and answers the group with the poison error.
fn write_batch(
    shared: &Shared,
    a: &mut Active,
    batch: Pending,
    sync_each: Option<&mut Instant>,
    on_writer: bool,
) -> Wrote {
    let st: &dyn Storage = &*shared.storage;
    let mut wrote = Wrote::default();
    let fail = |batch: Pending| {
        for ack in batch.acks {
            let _ = ack.send(Err(shared.poison_error()));
        }
    };
    if shared.poisoned.load(Ordering::SeqCst) {
        fail(batch);
        return wrote;
    }
    let full = needs_roll(&lock(&shared.state), a, batch.bytes.len(), &shared.opts);
    if full {
        match roll(
            shared,
            st,
            &*a.file,
            &a.name,
            a.len,
            batch.first,
            &a.gtids_in_log,
            &mut a.unpublished,
        ) {
            Ok(segment) => {
                a.switch_to(shared, segment);
                wrote.rolled = true;
            }
            Err(reason) => {
                shared.poison(reason);
                cut_unsynced(shared, a);
                fail(batch);
                return wrote;
            }
        }
    }
    // Under `Sync`, everything before this batch is durable.
    let len_before = a.len;
    if let Err(e) = a.file.write_all_at(&batch.bytes, a.len)
        && !ignore_write_error(shared, st, &a.name, &e)
    {
        shared.poison(format!("write to {} failed: {e}", st.describe(&a.name)));
        // Whatever part of the batch reached the file was never acknowledged: cut it, so a
        // restart cannot find it (best effort; recovery cuts a torn tail anyway).
        let _ = a.file.set_len(len_before);
        fail(batch);
        return wrote;
    }
    a.len += batch.bytes.len() as u64;
    metrics::histogram!("tideline_log_group_commit_records").record(batch.count as f64);
    metrics::counter!("tideline_log_written_bytes_total").increment(batch.bytes.len() as u64);
    shared.active_bytes.store(a.len, Ordering::SeqCst);
    let last = batch.first + batch.count - 1;
    shared.written.store(last, Ordering::SeqCst);
    for g in &batch.gtids {
        a.gtids_in_log.insert(*g);
    }
    match sync_each {
        Some(last_sync) => {
            let sync_started = Instant::now();
            let synced = sync_file(shared, st, &*a.file, &a.name);
            wrote.sync_took = Some(sync_started.elapsed());
            *last_sync = Instant::now();
            if let Err(reason) = synced {
                shared.poison(reason);
                cut_unsynced(shared, a);
                fail(batch);
                return wrote;
            }
            a.synced_len = a.len;
            shared.durable.store(last, Ordering::SeqCst);
            shared.publish_visible(last, &batch.gtids);
        }
        None => {
            // Acknowledged now, shown to readers once durable (the writer's next sync).
            if shared.opts.show_unsynced() {
                shared.publish_visible(last, &batch.gtids);
            } else {
                a.unpublished.extend_from_slice(&batch.gtids);
            }
            // The writer thread sleeps without a deadline while nothing is unsynced: the
            // first write after a sync tells it that one is due.
            if !shared.unsynced.swap(true, Ordering::SeqCst) && !on_writer {
                shared.wake_writer_if_waiting(lock(&shared.state));
            }
        }
    }
    // Checked again under `active`, just before acknowledging: the writer thread's interval
    // sync runs without `active` and may have failed (and poisoned the log) while this group
    // was written. The cut that follows it waits for `active` and takes this group away, so it
    // is answered with the poison error (its outcome unknown, as for any failed append), never
    // `Ok`: nothing is acknowledged once the log is poisoned.
    if shared.poisoned.load(Ordering::SeqCst) {
        fail(batch);
        return wrote;
    }
    for ack in batch.acks {
        let _ = ack.send(Ok(()));
    }
    let mut bytes = batch.bytes;
    if bytes.capacity() <= SPARE_BYTES_MAX {
        bytes.clear();
        lock(&shared.state).spare = bytes;
    }
    wrote
}

/// The writer thread: opens the active segment, writes the groups no committer wrote itself,
/// syncs (every group under `Sync`, every interval under `Async`), rolls segments and carries
/// out history resets.
pub(super) fn writer_main(shared: Arc<Shared>, gtids_in_log: GtidSet) {
    let storage = shared.storage.clone();
    let st: &dyn Storage = &*storage;
    let name = {
        let state = lock(&shared.state);
        state.segments[state.segments.len() - 1].name.clone()
    };
    let file = match st.open(&name) {
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
    let len = shared.active_bytes.load(Ordering::SeqCst);
    *lock(&shared.active) = Some(Active {
        name,
        file: Arc::from(file),
        len,
        synced_len: len,
        unpublished: Vec::new(),
        gtids_in_log,
    });
    let sync_interval = match shared.opts.durability {
        Durability::Sync => None,
        Durability::Async { interval } => Some(interval.max(Duration::from_micros(100))),
    };
    let mut last_sync = Instant::now();
    // Size of the last synced batch and how long its sync took (Sync durability only).
    let mut last_batch: u64 = 0;
    let mut last_sync_took = Duration::ZERO;

    loop {
        {
            let mut state = lock(&shared.state);
            let mut gather_until: Option<Instant> = None;
            loop {
                if state.closing || (state.reset.is_some() && state.pending.count == 0) {
                    break;
                }
                if state.pending.count > 0 && !state.leading {
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
                    // Once poisoned, nothing is synced again (see `due` below).
                    Some(iv)
                        if shared.unsynced.load(Ordering::SeqCst)
                            && !shared.poisoned.load(Ordering::SeqCst) =>
                    {
                        let left = iv.saturating_sub(last_sync.elapsed());
                        if left.is_zero() {
                            break;
                        }
                        state = shared.wait_for_work(state, Some(left));
                    }
                    _ => state = shared.wait_for_work(state, None),
                }
            }
        }

        // The active segment first, then the group: whoever holds `active` when it takes a
        // group writes it before anyone takes the next, so groups reach the file in order.
        let mut active = lock(&shared.active);
        let Some(a) = active.as_mut() else {
            return;
        };
        let (batch, reset, closing) = {
            let mut state = lock(&shared.state);
            let reset = if state.pending.count == 0 {
                state.reset.take()
            } else {
                None
            };
            (take_pending(&mut state), reset, state.closing)
        };

        if batch.count > 0 {
            assert!(
                !shared.opts.writer_killed_at(batch.first),
                "test-only switch unsafe_kill_writer: the log writer thread dies"
            );
            let count = batch.count;
            let sync_each = sync_interval.is_none().then_some(&mut last_sync);
            let wrote = write_batch(&shared, a, batch, sync_each, true);
            if wrote.rolled {
                last_sync = Instant::now();
            }
            if let Some(took) = wrote.sync_took {
                last_sync_took = took;
                last_batch = count;
            }
        }

        // A reset asked for before the log was poisoned is refused: its sync of the active
        // segment would "succeed" over the failed one and publish what the poison cut.
        let reset = match reset {
            Some(req) if shared.poisoned.load(Ordering::SeqCst) => {
                let _ = req.ack.send(Err(shared.poison_error()));
                None
            }
            other => other,
        };
        if let Some(req) = reset {
            match reset_segments(
                &shared,
                st,
                &*a.file,
                &a.name,
                &req.gtids_before,
                &mut a.unpublished,
            ) {
                Ok(segment) => {
                    a.switch_to(&shared, segment);
                    last_sync = Instant::now();
                    a.gtids_in_log = req.gtids_before;
                    let _ = req.ack.send(Ok(()));
                }
                Err(reason) => {
                    shared.poison(reason);
                    cut_unsynced(&shared, a);
                    let _ = req.ack.send(Err(shared.poison_error()));
                }
            }
        }

        // Under `Async`: the interval's sync, of what was written up to now. It runs without
        // `active`, so leading committers go on writing (and acknowledging) meanwhile; what
        // they write is shown after the next sync. Never once poisoned: after a failed fsync
        // the next one of the file succeeds on Linux without having written the lost pages,
        // and what it would publish was cut.
        let due = shared.unsynced.load(Ordering::SeqCst)
            && !shared.poisoned.load(Ordering::SeqCst)
            && (closing || sync_interval.is_some_and(|iv| last_sync.elapsed() >= iv));
        let snapshot = due.then(|| {
            shared.unsynced.store(false, Ordering::SeqCst);
            (
                a.file.clone(),
                a.name.clone(),
                a.len,
                shared.written.load(Ordering::SeqCst),
                std::mem::take(&mut a.unpublished),
            )
        });
        drop(active);
        if let Some((file, name, len, written, gtids)) = snapshot {
            match sync_file(&shared, st, &*file, &name) {
                Ok(()) => {
                    // Only this thread rolls or resets, so the file is still the active one.
                    // Under `active`, so that no cut comes between the check and the publish;
                    // a log poisoned meanwhile (a leader's failed write) publishes nothing.
                    let mut active = lock(&shared.active);
                    if let Some(a) = active.as_mut()
                        && !shared.poisoned.load(Ordering::SeqCst)
                    {
                        a.synced_len = a.synced_len.max(len);
                        shared.durable.fetch_max(written, Ordering::SeqCst);
                        shared.publish_visible(written, &gtids);
                    }
                }
                Err(reason) => {
                    shared.poison(reason);
                    if let Some(a) = lock(&shared.active).as_mut() {
                        cut_unsynced(&shared, a);
                    }
                }
            }
            last_sync = Instant::now();
        }
        if closing
            && (!shared.unsynced.load(Ordering::SeqCst) || shared.poisoned.load(Ordering::SeqCst))
            && lock(&shared.state).pending.count == 0
        {
            *lock(&shared.active) = None;
            return;
        }
    }
}

/// Everything written is durable now (the writer just synced it, holding the active segment):
/// moves the durable head and shows readers what they could not see yet. Under `Async` only
/// the writer thread's syncs make records visible, so a power cut can never take back a record
/// a reader saw, and a restarted node never reissues an offset or GTID number with other
/// content.
pub(super) fn made_durable(shared: &Shared, unpublished: &mut Vec<Gtid>) {
    // Callers sync first and stop at a failed sync; a log poisoned meanwhile publishes nothing.
    if shared.poisoned.load(Ordering::SeqCst) {
        return;
    }
    let written = shared.written.load(Ordering::SeqCst);
    shared.durable.fetch_max(written, Ordering::SeqCst);
    shared.unsynced.store(false, Ordering::SeqCst);
    if shared.visible() < written {
        shared.publish_visible(written, unpublished);
    }
    unpublished.clear();
}

/// After a failed sync of the active file (the log is poisoned). Linux may drop the dirty
/// pages of a failed fsync unwritten while the page cache still shows them, so a restart
/// without a power cut would read, recover and show records that the next power cut takes
/// back. The file is cut back to what the last successful sync covered, and a sync is
/// attempted to make the cut durable (it acknowledges nothing, so this is not a retry). Best
/// effort: the log is poisoned and the node stops either way, and whatever part of the unsynced
/// bytes reached the disk before the error may come back after a power cut. That is why the
/// outcome of a failed append is unknown.
///
/// The in-memory state follows the file: the written head goes back to the durable head, and
/// what was written but unpublished is forgotten, so that nothing can later count the cut
/// records as written or show them.
fn cut_unsynced(shared: &Shared, a: &mut Active) {
    if shared.durable.load(Ordering::SeqCst) >= shared.written.load(Ordering::SeqCst) {
        // Everything written is durable: a roll or reset synced it before it failed.
        a.synced_len = a.len;
    } else {
        let _ = a.file.set_len(a.synced_len);
        if !shared.skip_fsync() {
            let _ = a.file.sync_data();
        }
        a.len = a.synced_len;
        shared
            .written
            .store(shared.durable.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    a.unpublished.clear();
    shared.active_bytes.store(a.len, Ordering::SeqCst);
    shared.unsynced.store(false, Ordering::SeqCst);
}

/// After the writer could not even start, answer every append with the poison error.
pub(super) fn fail_pending_forever(shared: &Shared) {
    let mut state = lock(&shared.state);
    state.closing = true;
    for ack in std::mem::take(&mut state.pending.acks) {
        let _ = ack.send(Err(shared.poison_error()));
    }
}

/// Syncs the active file; returns the poison reason on failure (unless the test-only switch
/// says to carry on).
pub(super) fn sync_file(
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
        Err(e) if shared.opts.ignore_sync_errors() => {
            tracing::error!(file = %st.describe(name), error = %e, "fsync failed; ignored by test-only switch");
            Ok(())
        }
        Err(e) => Err(format!("fsync of {} failed: {e}", st.describe(name))),
    }
}

/// Whether a failed write is to be ignored (only the test-only switch says so).
fn ignore_write_error(shared: &Shared, st: &dyn Storage, name: &str, e: &std::io::Error) -> bool {
    if shared.opts.ignore_write_errors() {
        tracing::error!(file = %st.describe(name), error = %e, "write failed; ignored by test-only switch");
        return true;
    }
    false
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
    let new_file = st.open(&meta.name).map_err(|e| {
        discard_new_segment(st, &shared.opts, &meta.name);
        format!("open {}: {e}", st.describe(&meta.name))
    })?;
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
