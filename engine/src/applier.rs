//! The applier: writes logged transactions into the store, in offset order.
//!
//! Owns: the applier thread ([`Inner::apply_loop`]), which waits for the log's visible head to
//! move and applies every newly visible transaction in offset order, as one atomic store batch
//! per group together with the applied offset and `gtid_executed`; the shared group apply that
//! recovery's replay uses too ([`Inner::apply_group`]); and the waits on what the applier did
//! (`outcome`, `wait_applied`, `wait_all_applied`). Each committer is woken once.
//!
//! Invariants: offsets apply densely and in order; the view (offset, GTIDs, catalog) changes
//! under its write lock together with the store batch, so readers never see one without the
//! other. The store's write backpressure is waited out before that lock, never under it
//! (`Inner::wait_writable`): readers never wait for a stalled store. A store failure, a
//! panic while applying, or any other fail-stop (`Inner::fail`) ends applying: nothing more
//! applies, and every committer still waiting gets an error.
//!
//! Must never: apply an offset the log has not made visible, skip an offset, or assign GTIDs
//! or offsets (the commit path and the log do).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tideline_wal::Offset;

use crate::apply::{NewKeyspace, StoreBatch};
use crate::catalog;
use crate::error::WriteError;
use crate::packed::{ApplyTxn, OpRef};
use crate::state::{ApplyState, Inner, lock};
use crate::store::WriteBatch;

impl Inner {
    /// Waits until `offset` is applied (or the store failed, or `timeout` passed).
    pub(crate) fn wait_applied(&self, offset: u64, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut a = lock(&self.apply);
        while a.applied < offset && a.store_failed.is_none() && offset < a.dead_from {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            a = self
                .applied_cv
                .wait_timeout(a, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// What became of `offset`, if anything final.
    pub(crate) fn outcome(a: &ApplyState, offset: u64) -> Option<Result<(), WriteError>> {
        if a.applied >= offset {
            return Some(Ok(()));
        }
        if let Some(reason) = &a.store_failed {
            return Some(Err(WriteError::FailStop {
                reason: reason.clone(),
            }));
        }
        if offset >= a.dead_from {
            return Some(Err(WriteError::FailStop {
                reason: a.dead_reason.clone(),
            }));
        }
        None
    }

    /// Waits until every submitted transaction is applied; `Err` if one never will be.
    pub(crate) fn wait_all_applied(&self) -> Result<(), WriteError> {
        self.wait_outcome(self.last_submitted.load(Ordering::SeqCst))
    }

    /// Waits until `offset` is applied; `Err` if it never will be.
    pub(crate) fn wait_outcome(&self, offset: u64) -> Result<(), WriteError> {
        if self.applied.load(Ordering::SeqCst) >= offset {
            return Ok(());
        }
        let mut a = lock(&self.apply);
        loop {
            if let Some(r) = Self::outcome(&a, offset) {
                return r;
            }
            a = self
                .applied_cv
                .wait_timeout(a, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The applier thread: waits for the log's visible head to move, applies every newly
    /// visible transaction in offset order as one store batch per group, and wakes each
    /// committer once (no thundering herd, one wake-up per commit).
    pub(crate) fn apply_loop(self: Arc<Self>) {
        loop {
            self.killed_by_test("applier");
            let next = lock(&self.apply).applied + 1;
            let Some(next_off) = Offset::new(next) else {
                return;
            };
            match self
                .wal
                .wait_visible_blocking(next_off, Duration::from_millis(50))
            {
                Ok(true) => {}
                Ok(false) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    // Poisoned: apply what became visible before, then fail the rest.
                    let _ = self.apply_visible();
                    self.fail(format!("the log stopped acknowledging: {e}"));
                    return;
                }
            }
            if self.apply_visible().is_err() {
                return;
            }
        }
    }

    /// Applies every visible transaction not yet applied. `Err` once the store or the engine
    /// failed (fail-stop: nothing more applies).
    fn apply_visible(&self) -> Result<(), ()> {
        // Before the visible head is read: what becomes visible meanwhile joins the group.
        self.paused_by_test_before_apply();
        let visible = self.wal.visible_offset();
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(());
            }
            let mut a = lock(&self.apply);
            let next = a.applied + 1;
            if next > visible {
                return Ok(());
            }
            let mut group = Vec::new();
            let mut waiters = Vec::new();
            let mut at = next;
            let mut ops = 0;
            let mut bytes = 0;
            while at <= visible
                && group.len() < self.opts.apply_group_txns_max
                && ops < self.opts.apply_group_ops_max
                && bytes < self.opts.apply_group_bytes_max
            {
                match a.ready.remove(at) {
                    Some(r) => {
                        ops += r.txn.op_count();
                        bytes += r.txn.data_bytes();
                        group.push((at, r.txn));
                        // One wake-up per thread, not per transaction: a thread that submitted
                        // a whole batch (upstream apply) waits on its last one only once.
                        if let Some(waiter) = r.waiter
                            && !waiters
                                .iter()
                                .any(|w: &std::thread::Thread| w.id() == waiter.id())
                        {
                            waiters.push(waiter);
                        }
                        at += 1;
                    }
                    None => break,
                }
            }
            if group.is_empty() {
                // Visible but never submitted through this engine: someone else writes to
                // the log, which breaks the one-writer contract.
                let reason = format!(
                    "log offset {next} was not written by this engine; the engine must be the \
                     log's only writer"
                );
                a.store_failed = Some(reason.clone());
                drop(a);
                self.fail(reason);
                return Err(());
            }
            drop(a);
            // A panic while applying becomes a store failure (fail-stop), not a hang.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.apply_group(&group, false)
            }))
            .unwrap_or_else(|_| Err("the applier panicked".into()));
            // Before any committer wakes: each frees its own transaction (see `InFlight`).
            drop(group);
            let mut a = lock(&self.apply);
            match result {
                Ok(()) => {
                    a.applied = at - 1;
                    drop(a);
                    for w in waiters {
                        w.unpark();
                    }
                    self.applied_cv.notify_all();
                }
                Err(reason) => {
                    let reason = format!(
                        "applying offsets {next}..={} to the store failed: {reason}",
                        at - 1
                    );
                    a.store_failed = Some(reason.clone());
                    drop(a);
                    for w in waiters {
                        w.unpark();
                    }
                    // Wakes every other committer waiting.
                    self.fail(reason);
                    return Err(());
                }
            }
        }
    }

    /// Applies consecutive transactions as one atomic store batch. Only one caller at a time
    /// (the `applying` flag, or recovery before the engine is shared).
    /// `replay`: called by recovery (only a test switch treats it differently).
    pub(crate) fn apply_group<T: ApplyTxn>(
        &self,
        group: &[(u64, T)],
        replay: bool,
    ) -> Result<(), String> {
        let Some(&(last, _)) = group.last() else {
            return Ok(());
        };
        // Serialized with backfill steps, which read the trees' current values.
        let _indexes = lock(&self.index_lock);
        let (mut gtids, base_catalog) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            debug_assert_eq!(v.offset + 1, group[0].0, "offsets apply densely, in order");
            ((*v.gtids).clone(), v.catalog.clone())
        };
        // Values written earlier in the group are kept for every tree only when a merge or an
        // index created mid-group may read them; writes to indexed trees are kept regardless
        // (see `StoreBatch::track`).
        let track = group.iter().any(|(_, t)| {
            t.ops()
                .any(|o| matches!(o, OpRef::Merge { .. } | OpRef::CreateIndex { .. }))
        });
        let mut sb = StoreBatch::new(self, base_catalog, track);
        sb.skip_maintenance = replay && !self.opts.maintain_indexes_on_replay();
        sb.remember_repeats_only(group.iter().flat_map(|(_, t)| t.ops()));
        for (offset, txn) in group {
            let gtid = txn.gtid();
            if gtids.contains(&gtid) {
                // Never logged twice by this engine; skipped defensively all the same.
                tracing::warn!(offset, gtid = %gtid, "skipping a record whose GTID is already executed");
                continue;
            }
            gtids.insert(gtid);
            for (i, op) in txn.ops().enumerate() {
                sb.apply_op(
                    op,
                    NewKeyspace::Log {
                        offset: *offset,
                        op_index: i,
                    },
                )?;
            }
        }
        let (mut batch, catalog, dropped, progress) = sb.into_parts();
        self.write_identity(&mut batch, last);
        batch.insert(&self.meta, catalog::KEY_GTIDS, gtids.to_string().as_bytes());
        let new_catalog = catalog.map(Arc::new);
        // Readers take the view's lock: the store's backpressure is waited out before it.
        self.wait_writable(&batch)?;
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            batch
                .commit()
                .map_err(|e| format!("store batch commit: {e}"))?;
            v.offset = last;
            v.gtids = Arc::new(gtids);
            if let Some(c) = &new_catalog {
                v.catalog = c.clone();
                *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = c.clone();
            }
            self.identity_written.store(true, Ordering::SeqCst);
            for (idx, p) in progress {
                *lock(&idx.progress) = p;
            }
            // Last: a committer that sees its offset applied returns at once (its fast path),
            // so whatever the group changed (index counters included) is published before.
            self.applied.store(last, Ordering::SeqCst);
            self.paused_by_test_after_applied();
        }
        self.notify_view_changed();
        self.remove_keyspaces(dropped);
        Ok(())
    }
}
