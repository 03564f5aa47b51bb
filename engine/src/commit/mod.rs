//! The commit path: validating a transaction, giving it its GTID and submitting it to the log.
//!
//! Owns: conflict checks against recent write sets, tree and operand checks against the catalog
//! as of every submitted transaction, the size of the values local merges leave
//! ([`Inner::check_merged_sizes`]), GTID assignment, submission to the log, waiting for the
//! applier's outcome, and upstream apply ([`Engine::apply_upstream`],
//! [`Engine::apply_upstream_batch`]). Step 3 below, the applier, is in `applier`.
//!
//! Must never: write to the store (only the applier applies logged transactions), or count a
//! transaction as submitted before the log accepted it.
//!
//! Submodules: `upstream` (the upstream apply entry points), `index_check` (the index
//! definitions and unique-index claims of local transactions) and `merged_size` (the size of
//! the values local merges leave).
//!
//! Commit pipeline (one transaction):
//! 1. Under the commit lock: validate the read set against the write sets of every transaction
//!    submitted after the reader's snapshot (optimistic concurrency control), check trees and
//!    operands against the catalog as of all submitted transactions, give the transaction its
//!    GTID, and submit it to the log, which assigns the next offset.
//! 2. Outside any engine lock: wait (group commit: many committers share one fsync).
//! 3. The applier (`applier`) writes every consecutive transaction the log made visible
//!    (durable) as one atomic store batch, together with the applied offset and
//!    `gtid_executed`. Under sync durability a commit returns once its offset is applied, so
//!    it is visible to every later read. Under async durability a local commit that changes
//!    no tree or index returns once the log has written its record, before the fsync and the
//!    apply that show it ([`Inner::finish`]; `Engine::wait_visible` is its read fence).
//!
//! Invariants: the store applies offsets densely and in order; `applied` in the store is the
//! offset of the last transaction whose effects are in the same store batch; the log's
//! retention floor is never above the first offset the store has not persisted.
//!
//! [`Engine::apply_upstream`]: crate::Engine::apply_upstream
//! [`Engine::apply_upstream_batch`]: crate::Engine::apply_upstream_batch

mod index_check;
mod merged_size;
mod upstream;

pub use upstream::{Applied, Refused};

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tideline_wal::{Appended, Durability, Encoded, Gtid, NewTransaction, Offset, Op};

use crate::catalog::{self, DEFAULT_TREE};
use crate::error::{WriteError, key_text};
use crate::merge::{self, MergeOperator};
use crate::packed::{PackedOps, PackedTxn};
use crate::snapshot::SnapshotAt;
use crate::state::{
    CommitInfo, CommitState, HistoryEntry, Inner, KeysRef, Ready, WrittenKeys, check_kv, lock,
};
use crate::txn::ReadItem;
use index_check::check_index_def;

/// Whether the local transaction or the upstream one is being committed.
#[derive(Clone, Copy)]
pub(crate) enum Origin {
    Local,
    Upstream { gtid: Gtid, timestamp_us: i64 },
}

/// A transaction ready to be submitted: see [`Inner::prepare`].
struct Prepared {
    ops: Vec<Op>,
    /// What the applier keeps of `ops`: their range of a packed copy (of the whole upstream
    /// batch, or of this transaction alone).
    packed: (Arc<PackedOps>, std::ops::Range<usize>),
    /// The keys `ops` write, for conflict checks.
    keys: KeysRef,
    /// The log record, encoded before the commit lock: an upstream transaction is logged
    /// as received (its GTID and ops never change on submission). `None` for a local one,
    /// whose GTID is given under the lock.
    encoded: Option<(Arc<Encoded>, usize)>,
}

/// What [`Inner::submit_locked`] did with a transaction.
enum Submitted {
    /// Logged: its committer waits for its outcome ([`Inner::finish`]).
    Logged(InFlight),
    /// Nothing to log: a local transaction without effect, or an upstream GTID already here.
    /// `visible_at`: the transaction only re-created trees that other transactions create,
    /// submitted and not yet applied; once this offset is applied they exist for reads and
    /// writes (`None`: they already do, or there were none).
    Nothing { visible_at: Option<u64> },
}

/// A submitted transaction, not yet applied.
struct InFlight {
    offset: Offset,
    gtid: Gtid,
    /// Under async durability, the log's acknowledgement once the record is written: the
    /// commit returns on it instead of on its apply (see [`Inner::finish`]).
    written: Option<Appended>,
    /// The committer's reference to what the applier applies: the applier drops its own
    /// before it wakes the committer, so the buffers are freed by the thread that allocated
    /// them, off the applier (the engine's one serial stage).
    _txn: PackedTxn,
    /// The logged ops and their encoding, no longer needed once submitted (the log copied
    /// the record, the applier reads `_txn`): freed by the committer after it released the
    /// commit lock and before it waits ([`InFlight::release_spent`]), so the frees overlap
    /// the log's sync and the applier's work instead of following them.
    spent: Option<(Vec<Op>, Option<Arc<Encoded>>)>,
}

impl InFlight {
    /// Frees what the transaction no longer needs (see `spent`).
    fn release_spent(&mut self) {
        self.spent = None;
    }

    /// Where the transaction was logged, for a caller that does not wait for its apply.
    fn logged(&self) -> CommitInfo {
        CommitInfo {
            offset: self.offset,
            gtid: self.gtid,
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Inner {
    /// Commits a local transaction built by a [`Txn`](crate::Txn): `reads` is its snapshot
    /// and read set, checked for conflicts. `Ok(None)`: nothing to log. A transaction that
    /// only re-created trees which another transaction creates returns `Ok(None)` once that
    /// creation is applied, so that the trees it was told exist can be written and read.
    pub(crate) fn commit_txn(
        &self,
        ops: Vec<Op>,
        reads: Option<(SnapshotAt, &[ReadItem])>,
    ) -> Result<Option<CommitInfo>, WriteError> {
        let inner = self;
        if inner.bootstrapping.load(Ordering::SeqCst) {
            return Err(WriteError::Bootstrapping);
        }
        if inner.read_only.load(Ordering::SeqCst) {
            return Err(WriteError::ReadOnly);
        }
        inner.check_not_failed()?;
        let prepared = inner.prepare(ops)?;
        inner.paused_by_test_before_commit_lock();
        let f = {
            let mut st = lock(&inner.commit);
            inner.submit_locked(&mut st, prepared, reads, Origin::Local)?
        };
        match f {
            Submitted::Nothing { visible_at: None } => Ok(None),
            Submitted::Nothing {
                visible_at: Some(offset),
            } => inner.wait_outcome(offset).map(|()| None),
            Submitted::Logged(mut f) => {
                f.release_spent();
                inner.finish(f).map(Some)
            }
        }
    }

    /// The work of a local commit that needs no lock: the packed copy of the ops the applier
    /// keeps, and the write set for conflict checks (limits were checked op by op).
    fn prepare(&self, ops: Vec<Op>) -> Result<Prepared, WriteError> {
        let mut keys = WrittenKeys::default();
        self.collect_keys(&ops, false, &mut keys)?;
        let range = 0..ops.len();
        let packed = Arc::new(PackedOps::pack(&ops));
        Ok(Prepared {
            ops,
            packed: (packed, range),
            keys: KeysRef::Own(keys),
            encoded: None,
        })
    }

    /// Adds the keys `ops` write to `keys`, checking each against this node's limits first
    /// when `check_limits` (upstream transactions; local ones were checked op by op).
    fn collect_keys(
        &self,
        ops: &[Op],
        check_limits: bool,
        keys: &mut WrittenKeys,
    ) -> Result<(), WriteError> {
        for op in ops {
            let (tree, key, value) = match op {
                Op::Put {
                    tree, key, value, ..
                } => (tree, key, Some(value.as_slice())),
                Op::Merge {
                    tree, key, operand, ..
                } => (tree, key, Some(operand.as_slice())),
                Op::Delete { tree, key, .. } => (tree, key, None),
                Op::CreateTree { .. }
                | Op::DropTree { .. }
                | Op::CreateIndex { .. }
                | Op::DropIndex { .. } => continue,
            };
            if check_limits {
                check_kv(&self.opts, tree, key, value)?;
            }
            keys.push(tree, key);
        }
        Ok(())
    }

    /// Validates and submits one transaction; called with the commit lock held.
    fn submit_locked(
        &self,
        st: &mut CommitState,
        prepared: Prepared,
        reads: Option<(SnapshotAt, &[ReadItem])>,
        origin: Origin,
    ) -> Result<Submitted, WriteError> {
        // Checked under the commit lock, which `bootstrap_begin` takes to set the flag.
        if self.bootstrapping.load(Ordering::SeqCst) {
            return Err(WriteError::Bootstrapping);
        }
        // Likewise read-only for local commits (`set_read_only` takes the lock to set it): a
        // commit that passed the first check before the node was made read-only is refused.
        if matches!(origin, Origin::Local) && self.read_only.load(Ordering::SeqCst) {
            return Err(WriteError::ReadOnly);
        }
        let Prepared {
            ops,
            packed,
            keys,
            encoded,
        } = prepared;
        // Set when the logged op list differs from `ops` (an op dropped or added).
        let mut modified = false;
        let local = matches!(origin, Origin::Local);
        if let Origin::Upstream { gtid, .. } = origin
            && st.submitted.contains(&gtid)
        {
            return Ok(Submitted::Nothing { visible_at: None });
        }
        // Serializability: nothing this transaction read may have been written by a
        // transaction submitted after its snapshot.
        if let Some((at, reads)) = reads
            && !reads.is_empty()
        {
            let snap = at.offset;
            if at.generation != st.generation {
                return Err(WriteError::Conflict(
                    "this node was bootstrapped from its upstream after the transaction's \
                     snapshot"
                        .into(),
                ));
            }
            if snap < st.history_floor {
                return Err(WriteError::Conflict(format!(
                    "the transaction's snapshot (offset {snap}) is older than the conflict \
                         history (offset {})",
                    st.history_floor
                )));
            }
            for e in st.history.iter().rev() {
                if e.offset <= snap {
                    break;
                }
                for r in reads {
                    if let Some(why) = conflicts(r, e) {
                        return Err(WriteError::Conflict(format!(
                            "{why} was changed by the transaction at offset {}",
                            e.offset
                        )));
                    }
                }
            }
        }

        // Check trees, operators, operands and limits against the catalog as of every
        // submitted transaction, and build the logged op list.
        let mut changes: BTreeMap<String, Option<Option<MergeOperator>>> = BTreeMap::new();
        let tree_state = |changes: &BTreeMap<String, Option<Option<MergeOperator>>>,
                          name: &str|
         -> Option<Option<MergeOperator>> {
            match changes.get(name) {
                Some(c) => *c,
                None => st.trees.get(name).copied(),
            }
        };
        // Ops dropped from the logged list (a local re-creation of an existing tree) and where
        // the implicit creation of `default` goes: the list is rebuilt only when it changes,
        // else `ops` is logged as it is (no move of every op under the commit lock).
        let mut index_changes: BTreeMap<(String, String), bool> = BTreeMap::new();
        let mut dropped_ops: Vec<usize> = Vec::new();
        // The trees (and merge operators) of the dropped re-creations.
        let mut dropped_trees: Vec<(String, Option<MergeOperator>)> = Vec::new();
        let mut create_default_at: Vec<usize> = Vec::new();
        let mut tree_ops: Vec<Arc<str>> = Vec::new();
        let mut index_trees: Vec<Arc<str>> = Vec::new();
        let mut written_bytes: u64 = 0;
        let mut names: HashMap<String, Arc<str>> = HashMap::new();
        let mut intern = |s: &str| -> Arc<str> {
            if let Some(a) = names.get(s) {
                return a.clone();
            }
            let a: Arc<str> = Arc::from(s);
            names.insert(s.to_string(), a.clone());
            a
        };
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::CreateTree {
                    tree,
                    merge_operator,
                } => {
                    if !catalog::is_valid_tree_name(tree) {
                        return Err(WriteError::BadTreeName(tree.clone()));
                    }
                    let m = match merge_operator {
                        None => None,
                        Some(n) => Some(MergeOperator::from_name(n).ok_or_else(|| {
                            WriteError::UnknownMergeOperator {
                                name: n.clone(),
                                known: merge::known_operators(),
                            }
                        })?),
                    };
                    match tree_state(&changes, tree) {
                        Some(existing) if local => {
                            if existing == m {
                                // Created by another transaction since this one found it
                                // absent. Dropping the creation is right only if nothing here
                                // relied on the tree being new and empty: a read of it or a
                                // write to it would otherwise be a lost update.
                                let read_it = reads
                                    .is_some_and(|(_, r)| r.iter().any(|r| r.covers_tree(tree)));
                                let wrote_it = ops.iter().enumerate().any(|(j, o)| {
                                    j != i
                                        && match o {
                                            Op::Put { tree: t, .. }
                                            | Op::Delete { tree: t, .. }
                                            | Op::Merge { tree: t, .. }
                                            | Op::CreateTree { tree: t, .. }
                                            | Op::DropTree { tree: t }
                                            | Op::CreateIndex { tree: t, .. }
                                            | Op::DropIndex { tree: t, .. } => t == tree,
                                        }
                                });
                                if read_it || wrote_it {
                                    return Err(WriteError::Conflict(format!(
                                        "tree `{tree}` was created by another transaction after \
                                         this one found it absent and {} it",
                                        if read_it { "read" } else { "wrote to" }
                                    )));
                                }
                                modified = true;
                                dropped_ops.push(i);
                                dropped_trees.push((tree.clone(), m));
                                continue;
                            }
                            return Err(WriteError::TreeExists {
                                tree: tree.clone(),
                                existing: existing.map_or("none".into(), |e| e.name().into()),
                            });
                        }
                        // Upstream: creating an existing tree is a no-op when applied.
                        Some(_) => {}
                        None => {
                            changes.insert(tree.clone(), Some(m));
                        }
                    }
                    tree_ops.push(intern(tree));
                }
                Op::DropTree { tree } => {
                    if tree_state(&changes, tree).is_none() {
                        if local {
                            return Err(WriteError::UnknownTree(tree.clone()));
                        }
                    } else {
                        changes.insert(tree.clone(), None);
                    }
                    for (t, n) in st.indexes.iter().filter(|(t, _)| t == tree) {
                        index_changes.insert((t.clone(), n.clone()), false);
                    }
                    index_changes.retain(|(t, _), live| t != tree || !*live);
                    tree_ops.push(intern(tree));
                }
                Op::CreateIndex {
                    tree, name, paths, ..
                } => {
                    let key = (tree.clone(), name.clone());
                    let exists = index_changes
                        .get(&key)
                        .copied()
                        .unwrap_or_else(|| st.indexes.contains(&key));
                    if local {
                        check_index_def(name, paths)?;
                        if tree_state(&changes, tree).is_none() {
                            return Err(WriteError::UnknownTree(tree.clone()));
                        }
                        if exists {
                            return Err(WriteError::IndexExists {
                                tree: tree.clone(),
                                name: name.clone(),
                            });
                        }
                    }
                    if tree_state(&changes, tree).is_some() {
                        index_changes.insert(key, true);
                    }
                    index_trees.push(intern(tree));
                }
                Op::DropIndex { tree, name } => {
                    let key = (tree.clone(), name.clone());
                    let exists = index_changes
                        .get(&key)
                        .copied()
                        .unwrap_or_else(|| st.indexes.contains(&key));
                    if local && !exists {
                        return Err(WriteError::UnknownIndex {
                            tree: tree.clone(),
                            name: name.clone(),
                        });
                    }
                    index_changes.insert(key, false);
                    index_trees.push(intern(tree));
                }
                Op::Put { tree, .. } | Op::Delete { tree, .. } | Op::Merge { tree, .. } => {
                    written_bytes += match op {
                        Op::Put { value, .. } => value.len() as u64,
                        Op::Merge { operand, .. } => operand.len() as u64,
                        _ => 0,
                    };
                    let state = match tree_state(&changes, tree) {
                        Some(s) => s,
                        None if local && tree == DEFAULT_TREE => {
                            // Implicit creation belongs to the transaction that needs it.
                            create_default_at.push(i);
                            changes.insert(DEFAULT_TREE.into(), Some(None));
                            tree_ops.push(intern(DEFAULT_TREE));
                            modified = true;
                            None
                        }
                        None => return Err(WriteError::UnknownTree(tree.clone())),
                    };
                    if let Op::Merge { operand, .. } = op {
                        let m = state.ok_or_else(|| WriteError::NoMergeOperator(tree.clone()))?;
                        m.check_operand(operand)
                            .map_err(|reason| WriteError::BadOperand {
                                tree: tree.clone(),
                                operator: m.name().into(),
                                reason,
                            })?;
                    }
                }
            }
        }
        let mut out = if modified {
            // Both index lists ascend: they were filled in op order.
            let mut out = Vec::with_capacity(ops.len() + create_default_at.len());
            let mut create = create_default_at.into_iter().peekable();
            let mut skip = dropped_ops.into_iter().peekable();
            for (i, op) in ops.into_iter().enumerate() {
                if create.next_if_eq(&i).is_some() {
                    out.push(Op::CreateTree {
                        tree: DEFAULT_TREE.into(),
                        merge_operator: None,
                    });
                }
                if skip.next_if_eq(&i).is_none() {
                    out.push(op);
                }
            }
            out
        } else {
            ops
        };
        if out.is_empty() && local {
            // Every op re-created a tree another submitted transaction creates. Until that
            // one is applied, the tree is missing from the catalog writes and reads check: the
            // caller, told it exists, would get `UnknownTree`. So it waits for everything
            // submitted so far (the creations are among it) unless they are applied already.
            let applied = self.current_catalog();
            let pending = dropped_trees
                .iter()
                .any(|(tree, m)| applied.trees.get(tree.as_str()).map(|t| t.merge) != Some(*m));
            let visible_at = pending.then(|| self.last_submitted.load(Ordering::SeqCst));
            return Ok(Submitted::Nothing { visible_at });
        }
        // A replica applying upstream transactions never refuses them.
        let claims = if local {
            self.check_merged_sizes(st, &out)?;
            self.check_unique(st, &out)?
        } else {
            Vec::new()
        };

        let (gtid, timestamp_us) = match origin {
            Origin::Local => {
                let seq = st
                    .submitted
                    .last_seq(&self.server_uuid)
                    .map_or(Some(1), |s| s.checked_add(1))
                    .ok_or(WriteError::GtidsExhausted {
                        server_uuid: self.server_uuid,
                    })?;
                let gtid = Gtid::new(self.server_uuid, seq)
                    .map_err(|e| WriteError::Conflict(format!("internal: {e}")))?;
                (gtid, now_us())
            }
            Origin::Upstream { gtid, timestamp_us } => (gtid, timestamp_us),
        };
        let txn = if modified {
            PackedTxn::new(gtid, Arc::new(PackedOps::pack(&out)), 0..out.len())
        } else {
            PackedTxn::new(gtid, packed.0, packed.1)
        };
        // Upstream: logged exactly as received, encoded before the lock (in one buffer with
        // the rest of its batch). Local: encoded now, under the lock, which gives its GTID.
        let mut own = None;
        let (record, index) = match &encoded {
            Some((e, index)) if !modified => (&**e, *index),
            _ => {
                let e = own.insert(Encoded::with_capacity(1));
                let logged = NewTransaction {
                    gtid,
                    timestamp_us,
                    ops: out,
                };
                let index = self.wal.encode_into(&logged, e)?;
                out = logged.ops;
                (&*e, index)
            }
        };
        // The applier learns of the transaction while the log assigns its offset (under the
        // log's lock), so it is known before the log can make it visible. Acknowledgements
        // reach committers through the applier (which sees a failed log as the visible head's
        // error), so the log's own acknowledgement is not asked for.
        //
        // Under async durability a local transaction that changes no tree or index is
        // acknowledged once its record is written (DESIGN: "async acks after write"): it then
        // asks the log for that acknowledgement. A tree or index change still waits for its
        // apply, so that the catalog every later read sees holds it.
        let early_ack = local
            && tree_ops.is_empty()
            && index_changes.is_empty()
            && matches!(self.wal.durability(), Durability::Async { .. });
        let ready = |off: Offset| {
            lock(&self.apply).ready.insert(
                off.get(),
                Ready {
                    txn: txn.clone(),
                    waiter: (!early_ack).then(std::thread::current),
                },
            );
        };
        let (appended, written) = if early_ack {
            let (a, ()) = self.wal.submit_encoded_acked(record, index, ready)?;
            (a.offset(), Some(a))
        } else {
            let (o, ()) = self.wal.submit_encoded_with(record, index, ready)?;
            (o, None)
        };
        let offset = appended.get();
        self.last_submitted.store(offset, Ordering::SeqCst);

        // Only now, with the record submitted, does the transaction count as in flight.
        st.submitted.insert(gtid);
        for (name, c) in changes {
            match c {
                Some(m) => {
                    st.trees.insert(name, m);
                }
                None => {
                    st.trees.remove(&name);
                }
            }
        }
        for (name, c) in &index_changes {
            if *c {
                st.indexes.insert(name.clone());
            } else {
                st.indexes.remove(name);
            }
        }
        for (claim, pk) in claims {
            st.claims.insert(claim, (pk, offset));
        }
        st.history_keys += keys.len() + tree_ops.len() + index_trees.len();
        st.history.push_back(HistoryEntry {
            offset,
            keys,
            trees: tree_ops,
            index_trees,
            written_bytes,
        });
        let applied = self.applied.load(Ordering::SeqCst);
        while st.history_keys > self.opts.history_keys_max {
            match st.history.front() {
                Some(e) if e.offset <= applied => {
                    st.history_floor = e.offset;
                    st.history_keys -= e.keys.len() + e.trees.len() + e.index_trees.len();
                    st.history.pop_front();
                }
                _ => break,
            }
        }
        Ok(Submitted::Logged(InFlight {
            offset: Offset::new(offset).unwrap_or(Offset::FIRST),
            gtid,
            written,
            _txn: txn,
            spent: Some((out, encoded.map(|(e, _)| e))),
        }))
    }

    /// Waits until the log shows `offset` (durable, under either durability); `Err` when
    /// the log failed or the engine stopped.
    fn wait_logged(&self, offset: Offset) -> Result<(), WriteError> {
        loop {
            if self
                .wal
                .wait_visible_blocking(offset, Duration::from_secs(1))?
            {
                return Ok(());
            }
            self.check_not_failed()?;
        }
    }

    /// Waits until the transaction is applied (hence durable and visible), or failed; under
    /// async durability (`written`), until its record is written and the applier is less
    /// than `async_unapplied_max` transactions behind it.
    fn finish(&self, f: InFlight) -> Result<CommitInfo, WriteError> {
        let done = CommitInfo {
            offset: f.offset,
            gtid: f.gtid,
        };
        if let Some(written) = f.written {
            written.wait()?;
            let behind = f.offset.get().saturating_sub(self.opts.async_unapplied_max);
            loop {
                if self.applied.load(Ordering::SeqCst) >= behind {
                    return Ok(done);
                }
                if let Some(Err(e)) = Self::outcome(&lock(&self.apply), behind) {
                    return Err(e);
                }
                // Only past the bound, where the applier is the bottleneck; the applier wakes
                // the committer of each transaction it applies, not this one, hence the poll.
                std::thread::park_timeout(Duration::from_millis(1));
            }
        }
        loop {
            // Fast path, without the apply lock the applier and every waking committer need:
            // `applied` moves only after a store batch committed and the view shows it, and
            // offsets apply densely, in order.
            if self.applied.load(Ordering::SeqCst) >= f.offset.get() {
                return Ok(done);
            }
            if let Some(r) = Self::outcome(&lock(&self.apply), f.offset.get()) {
                return r.map(|()| done);
            }
            // Woken by the applier (unpark); the timeout is only a safety net.
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }
}

fn range_contains(lo: &Bound<Vec<u8>>, hi: &Bound<Vec<u8>>, key: &[u8]) -> bool {
    let above = match lo {
        Bound::Included(l) => key >= l.as_slice(),
        Bound::Excluded(l) => key > l.as_slice(),
        Bound::Unbounded => true,
    };
    let below = match hi {
        Bound::Included(h) => key <= h.as_slice(),
        Bound::Excluded(h) => key < h.as_slice(),
        Bound::Unbounded => true,
    };
    above && below
}

/// Whether read `r` is invalidated by write set `e`; names what was read.
fn conflicts(r: &ReadItem, e: &HistoryEntry) -> Option<String> {
    if let Some(t) = e.trees.iter().find(|t| r.covers_tree(t)) {
        return Some(format!("tree `{t}`"));
    }
    match r {
        ReadItem::All => (!e.keys.is_empty())
            .then(|| "the transaction's snapshot (read through `Txn::snapshot`)".to_string()),
        ReadItem::Key { tree, key } => e
            .keys
            .iter()
            .any(|(t, k)| t == tree.as_str() && k == key.as_slice())
            .then(|| format!("key {:?} in tree `{tree}`", key_text(key))),
        ReadItem::Range { tree, lo, hi } => e
            .keys
            .iter()
            .any(|(t, k)| t == tree.as_str() && range_contains(lo, hi, k))
            .then(|| format!("a key in a range read from tree `{tree}`")),
    }
}
