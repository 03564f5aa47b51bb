//! The engine's shared state: what every other part of the engine reaches for.
//!
//! Owns: the engine's options and limits, [`Inner`] (the store handles, the view readers see,
//! the commit state, the applier's queue, the fail-stop flag) and the small helpers on it that
//! several rooms need (current catalog, fail-stop, the store's identity keys, resetting the
//! commit state). It is the bottom of the engine's module graph: `open`, `commit`, `applier`,
//! `read`, `trees`, `txn`, `apply` and `bootstrap` depend on it; it depends on none of them
//! (only on `catalog`, `error`, `merge`, `packed` and `store`).
//!
//! Must never: validate, log or apply a transaction itself (that is `commit` and `applier`),
//! read the log, or grow a dependency on a module above it.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tideline_wal::{Gtid, GtidSet, Offset, Wal};
use uuid::Uuid;

use crate::catalog::{self, Catalog};
use crate::error::WriteError;
use crate::merge::MergeOperator;
use crate::packed::PackedTxn;
use crate::store::{Backend, Batch, TreeHandle, TreeOptions, WriteBatch};

/// How long the store must stall writes before [`Inner::wait_writable`] logs it (shorter
/// stalls are routine under a steady write load).
const STALL_WORTH_A_WORD: Duration = Duration::from_secs(1);

/// Default key limit: 64 KiB less one byte (65,535), the state store's hard limit.
pub const KEY_BYTES_MAX_DEFAULT: usize = KEY_BYTES_MAX_LIMIT;

/// Default value (and merge operand) limit: 16 MiB.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 16 << 20;

/// The store cannot hold longer keys than this (fjall: 65,535 bytes).
pub const KEY_BYTES_MAX_LIMIT: usize = 65535;

/// Settings of an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Longest key accepted, in bytes. Default and maximum [`KEY_BYTES_MAX_LIMIT`] (64 KiB − 1).
    pub key_bytes_max: usize,
    /// Longest value or merge operand accepted, in bytes. Default 16 MiB.
    pub value_bytes_max: usize,
    /// Refuse local writes (a replica). Upstream transactions are still applied.
    pub read_only: bool,
    /// The store's block cache, in bytes. Default 64 MiB.
    pub cache_bytes: u64,
    /// How often the store is synced and the log's retention floor raised. Default 1 s.
    pub checkpoint_interval: Duration,
    /// How often [`Engine::transaction`](crate::Engine::transaction) runs a transaction again after a conflict. Default 32.
    pub conflict_retries_max: u32,
    /// Keys of recent write sets kept for conflict checks. A reading transaction whose
    /// snapshot is older than the oldest kept write set gets a retryable conflict.
    /// Default 65,536.
    pub history_keys_max: usize,
    /// Under async durability a local commit is acknowledged once its record is written,
    /// before the interval's fsync and the apply make it visible; past this many acknowledged
    /// transactions not yet applied, a commit waits for the applier (back-pressure: the
    /// applier's queue holds every such transaction). The same bound holds what a replica's
    /// [`Engine::apply_upstream_logged`](crate::Engine::apply_upstream_logged) leaves logged
    /// and unapplied, under either durability. Default 65,536.
    pub async_unapplied_max: u64,
    /// Most transactions applied in one store batch. Default 16,384: the store takes a
    /// batch's writes in key order, and a larger batch gives the sort more to work with
    /// (`docs/benchmarks.md`, "Memtable inserts in key order").
    pub apply_group_txns_max: usize,
    /// A store batch takes no further transaction once it holds this many ops. Default
    /// 65,536.
    pub apply_group_ops_max: usize,
    /// A store batch takes no further transaction once its keys and values reach this many
    /// bytes (bounds the batch's memory whatever the value sizes). Default 32 MiB.
    pub apply_group_bytes_max: usize,
    /// Documents one backfill step of a secondary index reads and indexes, in one store
    /// batch serialized with the applier: a writer waits at most one such step. Default 2048.
    pub index_backfill_keys: usize,
    /// Background threads of the store (flushes, compactions); 0: one per core, at least 3
    /// and at most 4 (fewer than 3 makes fjall's workers spin or starve flushes; see
    /// `docs/ENGINE.md`).
    pub store_threads: usize,
    /// Size at which a tree's in-memory table is flushed to disk. With the cache, this
    /// bounds the store's memory. Default 16 MiB.
    pub memtable_bytes: u64,
    /// Test-only (cargo feature `testing`, absent from production builds): do not replay the
    /// log on open (the bug recovery prevents). Exists so the crash test can prove it catches
    /// lost transactions.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_skip_replay: bool,
    /// Test-only (cargo feature `testing`): write every bootstrap chunk through the store
    /// batch, never through bulk ingestion (to compare the two paths).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_bootstrap_no_ingest: bool,
    /// Test-only (cargo feature `testing`): recovery's replay applies data without index
    /// maintenance (the bug in-batch maintenance through the one apply path prevents).
    /// Exists so the index crash tests can prove they catch a stale or missing entry.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_skip_index_replay: bool,
    /// Test-only (cargo feature `testing`): the named background thread (`applier`,
    /// `checkpointer`, `backfill`) panics once the log holds a record, outside the engine's
    /// own guards (a bug killing a critical thread). Exists so the node's watchdog test can
    /// prove a dead thread stops the node.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_kill_thread: Option<String>,
    /// Test-only (cargo feature `testing`): `bootstrap_begin` keeps every tree instead of
    /// dropping them (the bug its wipe prevents: local data the upstream never had outlives
    /// the copy). Exists so the node-level stale-data test can prove it catches a skipped wipe.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_bootstrap_skip_wipe: bool,
    /// Test-only (cargo feature `testing`): the applier sleeps this long right after a
    /// group's offset became the applied one, before it returns. Widens the moment in which
    /// a committer may already see its transaction applied, so that a test can prove that
    /// everything the group changed is published by then (index counters included).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_pause_after_applied: Option<std::time::Duration>,
    /// Test-only (cargo feature `testing`): once woken by newly visible transactions, the
    /// applier sleeps this long (holding nothing) before it reads what is visible and applies
    /// it. Widens the moment in which a transaction is committed and not yet applied, and
    /// lets transactions committed meanwhile share one group, so that a test can prove what
    /// counts such transactions (the claims of unique indexes, duplicates within a group)
    /// covers them.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_pause_before_apply: Option<std::time::Duration>,
    /// Test-only (cargo feature `testing`): a local commit sleeps this long after its first
    /// checks (read-only, bootstrapping) and before it takes the commit lock. Widens the
    /// moment in which the node may be made read-only under a commit that already passed its
    /// first check, so that a test can prove such a commit is refused.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_pause_before_commit_lock: Option<std::time::Duration>,
    /// Test-only (cargo feature `testing`): faults of the state store that the test switches
    /// on while the engine runs ([`StoreFaults`](crate::StoreFaults): a write stall, reported
    /// or not, and failing syncs that poison the store). Exists so that tests can prove that
    /// readers do not wait on a stalled store and that a store failure releases every waiting
    /// committer and lets the engine close.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub unsafe_store_faults: Option<Arc<crate::store::StoreFaults>>,
}

// The test-only switches, read through these so that without the `testing` feature the
// protections they disable are always on.
impl EngineOptions {
    /// Whether open replays the log into the store: always, unless a test turned it off.
    #[cfg(feature = "testing")]
    pub(crate) fn replay_on_open(&self) -> bool {
        !self.unsafe_skip_replay
    }
    #[cfg(not(feature = "testing"))]
    pub(crate) fn replay_on_open(&self) -> bool {
        true
    }

    /// Whether a bootstrap call's leading chunks may be ingested as tables: always, unless a
    /// test turned it off to compare the two paths.
    #[cfg(feature = "testing")]
    pub(crate) fn ingest_leading_chunks(&self) -> bool {
        !self.unsafe_bootstrap_no_ingest
    }
    #[cfg(not(feature = "testing"))]
    pub(crate) fn ingest_leading_chunks(&self) -> bool {
        true
    }

    /// Whether replay maintains indexes: always, unless a test turned it off.
    #[cfg(feature = "testing")]
    pub(crate) fn maintain_indexes_on_replay(&self) -> bool {
        !self.unsafe_skip_index_replay
    }
    #[cfg(not(feature = "testing"))]
    pub(crate) fn maintain_indexes_on_replay(&self) -> bool {
        true
    }

    /// Whether `bootstrap_begin` drops every tree: always, unless a test turned it off.
    #[cfg(feature = "testing")]
    pub(crate) fn wipe_on_bootstrap(&self) -> bool {
        !self.unsafe_bootstrap_skip_wipe
    }
    #[cfg(not(feature = "testing"))]
    pub(crate) fn wipe_on_bootstrap(&self) -> bool {
        true
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            key_bytes_max: KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
            read_only: false,
            cache_bytes: 64 << 20,
            checkpoint_interval: Duration::from_secs(1),
            conflict_retries_max: 32,
            history_keys_max: 1 << 16,
            async_unapplied_max: 1 << 16,
            apply_group_txns_max: 16_384,
            apply_group_ops_max: 1 << 16,
            apply_group_bytes_max: 32 << 20,
            memtable_bytes: 16 << 20,
            store_threads: 0,
            index_backfill_keys: 2048,
            #[cfg(feature = "testing")]
            unsafe_skip_replay: false,
            #[cfg(feature = "testing")]
            unsafe_bootstrap_no_ingest: false,
            #[cfg(feature = "testing")]
            unsafe_skip_index_replay: false,
            #[cfg(feature = "testing")]
            unsafe_kill_thread: None,
            #[cfg(feature = "testing")]
            unsafe_bootstrap_skip_wipe: false,
            #[cfg(feature = "testing")]
            unsafe_pause_after_applied: None,
            #[cfg(feature = "testing")]
            unsafe_pause_before_apply: None,
            #[cfg(feature = "testing")]
            unsafe_pause_before_commit_lock: None,
            #[cfg(feature = "testing")]
            unsafe_store_faults: None,
        }
    }
}

/// Where a committed transaction sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitInfo {
    /// Its local offset.
    pub offset: Offset,
    /// Its GTID.
    pub gtid: Gtid,
}

/// What readers see: the applied position and the catalog, changed by the applier (and a
/// bootstrap) together with the store batch that holds them.
pub(crate) struct View {
    pub(crate) offset: u64,
    pub(crate) gtids: Arc<GtidSet>,
    pub(crate) catalog: Arc<Catalog>,
    /// Raised whenever a bootstrap replaces the state without moving the offset (begin,
    /// finish): a transaction that read a snapshot of an older generation must not commit.
    pub(crate) generation: u64,
}

pub(crate) struct HistoryEntry {
    pub(crate) offset: u64,
    pub(crate) keys: KeysRef,
    pub(crate) trees: Vec<Arc<str>>,
    /// Trees whose indexes the transaction creates or drops (no read conflicts with them).
    pub(crate) index_trees: Vec<Arc<str>>,
    /// Bytes of the values and merge operands it writes: how much it may grow one value.
    pub(crate) written_bytes: u64,
}

/// The keys some transactions write, tree and key, in one buffer: an upstream batch collects
/// all of its transactions' keys in one (two allocations per batch instead of three per
/// transaction), and each history entry refers to its own part ([`KeysRef`]). Holds keys
/// only, never values, so the history stays bounded by `history_keys_max` keys.
#[derive(Default)]
pub(crate) struct WrittenKeys {
    bytes: Vec<u8>,
    keys: Vec<(Arc<str>, usize, usize)>,
}

impl WrittenKeys {
    /// Appends `key` of `tree`.
    pub(crate) fn push(&mut self, tree: &str, key: &[u8]) {
        let name = match self.keys.last() {
            Some((t, _, _)) if **t == *tree => t.clone(),
            _ => Arc::from(tree),
        };
        let start = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.keys.push((name, start, self.bytes.len()));
    }

    /// How many keys were pushed so far.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// One transaction's keys: its own [`WrittenKeys`] (a local commit) or a range of its
/// upstream batch's.
pub(crate) enum KeysRef {
    Own(WrittenKeys),
    Shared(Arc<WrittenKeys>, std::ops::Range<usize>),
}

impl KeysRef {
    fn parts(&self) -> (&WrittenKeys, std::ops::Range<usize>) {
        match self {
            KeysRef::Own(w) => (w, 0..w.keys.len()),
            KeysRef::Shared(w, r) => (w, r.clone()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.parts().1.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tree and key of each.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let (all, range) = self.parts();
        all.keys[range]
            .iter()
            .map(move |(t, a, b)| (&**t, &all.bytes[*a..*b]))
    }
}

pub(crate) struct CommitState {
    /// `gtid_executed` plus every GTID submitted and not yet applied.
    pub(crate) submitted: GtidSet,
    /// Tree name → merge operator, as of every submitted transaction.
    pub(crate) trees: BTreeMap<String, Option<MergeOperator>>,
    /// Write sets of recent transactions, oldest first.
    pub(crate) history: VecDeque<HistoryEntry>,
    pub(crate) history_keys: usize,
    /// Write sets at or before this offset were dropped from `history`.
    pub(crate) history_floor: u64,
    /// The view's generation as of the last bootstrap begin or finish.
    pub(crate) generation: u64,
    /// (tree, index name) of every index, as of every submitted transaction.
    pub(crate) indexes: std::collections::BTreeSet<(String, String)>,
    /// Values of unique indexes claimed by submitted transactions not yet applied: by
    /// (index keyspace, encoded value) → (primary key, offset). Entries at or below the
    /// applied offset are stale (the index holds them) and are dropped as met.
    pub(crate) claims: std::collections::HashMap<(String, Vec<u8>), (Vec<u8>, u64)>,
}

/// An acknowledged transaction waiting to be applied, and the committer to wake.
pub(crate) struct Ready {
    pub(crate) txn: PackedTxn,
    /// The committer to wake once the transaction is applied or failed; `None` for one
    /// already answered (an async commit, acknowledged once written): waking its thread
    /// would only interrupt whatever it waits on next.
    pub(crate) waiter: Option<std::thread::Thread>,
}

impl Ready {
    /// Wakes the waiting committer, if any.
    pub(crate) fn wake(&self) {
        if let Some(w) = &self.waiter {
            w.unpark();
        }
    }
}

/// Submitted transactions not yet taken by the applier, by offset. Offsets are given (and
/// entries added) in ascending order under the log's ordering lock, and the applier takes them
/// in the same order, so this is a queue: adding and taking cost no search and no tree nodes.
#[derive(Default)]
pub(crate) struct ReadyQueue(VecDeque<(u64, Ready)>);

impl ReadyQueue {
    /// Adds the transaction at `offset`, above every offset added before.
    pub(crate) fn insert(&mut self, offset: u64, r: Ready) {
        debug_assert!(
            self.0.back().is_none_or(|(last, _)| *last < offset),
            "offsets are added in ascending order"
        );
        self.0.push_back((offset, r));
    }

    /// Takes the transaction at `offset` if it is the lowest one waiting.
    pub(crate) fn remove(&mut self, offset: u64) -> Option<Ready> {
        match self.0.front() {
            Some((first, _)) if *first == offset => self.0.pop_front().map(|(_, r)| r),
            _ => None,
        }
    }

    /// Every transaction waiting, lowest offset first.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Ready> {
        self.0.iter().map(|(_, r)| r)
    }
}

pub(crate) struct ApplyState {
    pub(crate) applied: u64,
    pub(crate) ready: ReadyQueue,
    /// The store could not apply: nothing more will be.
    pub(crate) store_failed: Option<String>,
    /// The log failed to acknowledge this offset: it and everything after will never apply.
    pub(crate) dead_from: u64,
    pub(crate) dead_reason: String,
}

/// Everything the engine handle, its threads and its transactions share.
pub(crate) struct Inner {
    pub(crate) wal: Arc<Wal>,
    pub(crate) db: Backend,
    pub(crate) meta: TreeHandle,
    pub(crate) path: PathBuf,
    pub(crate) opts: EngineOptions,
    pub(crate) server_uuid: Uuid,
    pub(crate) read_only: AtomicBool,
    pub(crate) failed: AtomicBool,
    pub(crate) failed_reason: Mutex<String>,
    pub(crate) commit: Mutex<CommitState>,
    pub(crate) apply: Mutex<ApplyState>,
    pub(crate) applied_cv: Condvar,
    pub(crate) view: RwLock<View>,
    pub(crate) catalog: RwLock<Arc<Catalog>>,
    pub(crate) applied: AtomicU64,
    /// Offset of the last transaction submitted to the log.
    pub(crate) last_submitted: AtomicU64,
    /// Whether `format` and `server_uuid` are in the store (written with the first batch).
    pub(crate) identity_written: AtomicBool,
    /// Serialises checkpoints (the store sync and the floor that follows it).
    pub(crate) checkpoint_lock: Mutex<()>,
    pub(crate) stop: Mutex<bool>,
    pub(crate) stop_cv: Condvar,
    /// Tells the applier thread to exit once nothing visible is left to apply.
    pub(crate) stopping: AtomicBool,
    /// The progress record of an unfinished bootstrap (`Some` while bootstrapping). The lock
    /// also serialises the bootstrap calls.
    pub(crate) bootstrap: Mutex<Option<Vec<u8>>>,
    /// Whether a bootstrap is in progress (writes are refused). Changed under the commit lock.
    pub(crate) bootstrapping: AtomicBool,
    /// Counts changes of the view's position (`applied`, `gtid_executed`), sent after each
    /// change is visible to readers: async waiters (read fences) wake on it.
    pub(crate) view_changes: tokio::sync::watch::Sender<u64>,
    /// Serializes store batches that touch index entries from two sides: the applier's
    /// group apply (live maintenance) and the backfill's range steps, which read current
    /// values and must not interleave with a batch that changes them.
    pub(crate) index_lock: Mutex<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections leave their state consistent before anything that can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Store options of a tree's keyspace.
pub(crate) fn tree_options(opts: &EngineOptions) -> TreeOptions {
    TreeOptions {
        memtable_bytes: Some(opts.memtable_bytes),
    }
}

/// Checks a key and value against the limits.
pub(crate) fn check_kv(
    opts: &EngineOptions,
    tree: &str,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), WriteError> {
    if key.is_empty() {
        return Err(WriteError::EmptyKey(tree.to_string()));
    }
    if key.len() > opts.key_bytes_max {
        return Err(WriteError::KeyTooLarge {
            bytes: key.len(),
            max: opts.key_bytes_max,
        });
    }
    if let Some(v) = value
        && v.len() > opts.value_bytes_max
    {
        return Err(WriteError::ValueTooLarge {
            bytes: v.len(),
            max: opts.value_bytes_max,
        });
    }
    Ok(())
}

impl Inner {
    pub(crate) fn current_catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn fail_stop_reason(&self) -> Option<String> {
        if let Some(e) = self.wal.poison() {
            return Some(e.to_string());
        }
        self.failed
            .load(Ordering::SeqCst)
            .then(|| lock(&self.failed_reason).clone())
    }

    pub(crate) fn check_not_failed(&self) -> Result<(), WriteError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(WriteError::Closed);
        }
        match self.fail_stop_reason() {
            Some(reason) => Err(WriteError::FailStop { reason }),
            None => Ok(()),
        }
    }

    /// The test-only switch `unsafe_pause_after_applied`.
    pub(crate) fn paused_by_test_after_applied(&self) {
        #[cfg(feature = "testing")]
        if let Some(d) = self.opts.unsafe_pause_after_applied {
            std::thread::sleep(d);
        }
    }

    /// The test-only switch `unsafe_pause_before_commit_lock`.
    pub(crate) fn paused_by_test_before_commit_lock(&self) {
        #[cfg(feature = "testing")]
        if let Some(d) = self.opts.unsafe_pause_before_commit_lock {
            std::thread::sleep(d);
        }
    }

    /// The test-only switch `unsafe_pause_before_apply`.
    pub(crate) fn paused_by_test_before_apply(&self) {
        #[cfg(feature = "testing")]
        if let Some(d) = self.opts.unsafe_pause_before_apply {
            std::thread::sleep(d);
        }
    }

    /// The test-only switch `unsafe_kill_thread`: panics in background thread `thread` once
    /// the log holds a record. Never does anything without the `testing` feature.
    pub(crate) fn killed_by_test(&self, thread: &str) {
        #[cfg(feature = "testing")]
        if self.opts.unsafe_kill_thread.as_deref() == Some(thread) && self.wal.visible_offset() >= 1
        {
            panic!("test-only switch unsafe_kill_thread: the engine's {thread} thread dies");
        }
        #[cfg(not(feature = "testing"))]
        let _ = thread;
    }

    /// Fail-stop: the engine refuses writes from now on, nothing more is applied, and every
    /// commit waiting for its outcome gets an error now (an applier stuck in a failed store
    /// would never give it one). Takes the apply lock: never call it holding that lock.
    pub(crate) fn fail(&self, reason: String) {
        tracing::error!(%reason, "engine stopped accepting writes (fail-stop)");
        {
            let mut r = lock(&self.failed_reason);
            if r.is_empty() {
                r.clone_from(&reason);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        let mut a = lock(&self.apply);
        if a.dead_from == u64::MAX {
            a.dead_from = a.applied + 1;
            a.dead_reason = reason;
        }
        for r in a.ready.values() {
            r.wake();
        }
        drop(a);
        self.applied_cv.notify_all();
    }

    /// Waits until `batch` can commit without waiting inside the store (see
    /// [`WriteBatch::write_stall`]); call it before taking a lock readers need (the view's).
    /// Polls every millisecond. `Err` when the store is poisoned or the engine failed meanwhile: the
    /// stall may then never end.
    pub(crate) fn wait_writable(&self, batch: &Batch) -> Result<(), String> {
        let mut since: Option<std::time::Instant> = None;
        let mut said = false;
        loop {
            match batch.write_stall() {
                Ok(false) => {
                    // Short stalls are routine under a steady write load; a long one is news.
                    if let Some(t) = since.filter(|t| t.elapsed() >= STALL_WORTH_A_WORD) {
                        tracing::info!(
                            waited_ms = t.elapsed().as_millis() as u64,
                            "the state store accepts writes again"
                        );
                    }
                    return Ok(());
                }
                Ok(true) => {}
                Err(e) => return Err(format!("the store failed while it stalled writes: {e}")),
            }
            if self.failed.load(Ordering::SeqCst) {
                return Err(format!(
                    "the engine failed while the store stalled writes: {}",
                    lock(&self.failed_reason)
                ));
            }
            match since {
                None => since = Some(std::time::Instant::now()),
                Some(t) if !said && t.elapsed() >= STALL_WORTH_A_WORD => {
                    said = true;
                    tracing::info!(
                        "the state store stalls writes (its flushes or compactions fell \
                         behind); writes wait, reads go on"
                    );
                }
                Some(_) => {}
            }
            // Short: a stall usually ends within a flush, and the applier should go on as soon
            // as it does.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Wakes async waiters on [`Engine::view_changes`](crate::Engine::view_changes); call after the view changed.
    pub(crate) fn notify_view_changed(&self) {
        self.view_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Adds the store's format, server uuid and applied offset to `batch`.
    pub(crate) fn write_identity(&self, batch: &mut Batch, applied: u64) {
        batch.insert(&self.meta, catalog::KEY_FORMAT, catalog::FORMAT);
        batch.insert(
            &self.meta,
            catalog::KEY_APPLIED,
            applied.to_le_bytes().as_slice(),
        );
        batch.insert(
            &self.meta,
            catalog::KEY_SERVER_UUID,
            self.server_uuid.to_string().as_bytes(),
        );
    }

    /// A store failure outside the log's apply path: the engine stops accepting writes
    /// (fail-stop), and the error says so.
    pub(crate) fn store_failure(&self, reason: String) -> WriteError {
        self.fail(reason.clone());
        WriteError::FailStop { reason }
    }

    /// Makes the commit state match the view (at open, and after a bootstrap replaced the
    /// state): the submitted GTIDs and trees are the view's, and no earlier write set counts.
    pub(crate) fn reset_commit_state(&self, st: &mut CommitState, v: &View) {
        st.submitted = (*v.gtids).clone();
        st.trees = v
            .catalog
            .trees
            .iter()
            .map(|(n, t)| (n.clone(), t.merge))
            .collect();
        st.indexes = v
            .catalog
            .all_indexes()
            .map(|i| (i.tree.clone(), i.name.clone()))
            .collect();
        st.claims.clear();
        st.history.clear();
        st.history_keys = 0;
        st.history_floor = v.offset;
        st.generation = v.generation;
    }
}
