//! The engine: open and recover, the commit pipeline, the applier and checkpoints.
//!
//! Commit pipeline (one transaction):
//! 1. Under the commit lock: validate the read set against the write sets of every transaction
//!    submitted after the reader's snapshot (optimistic concurrency control), check trees and
//!    operands against the catalog as of all submitted transactions, give the transaction its
//!    GTID, and submit it to the log, which assigns the next offset.
//! 2. Outside any engine lock: wait for the log's acknowledgement (group commit: many
//!    committers share one fsync).
//! 3. Apply in offset order: the first acknowledged committer that finds the next offset ready
//!    becomes the applier and writes every consecutive ready transaction as one atomic store
//!    batch, together with the applied offset and `gtid_executed` (flat combining). A commit
//!    returns once its offset is applied, so it is visible to every later read.
//!
//! Invariants: the store applies offsets densely and in order; `applied` in the store is the
//! offset of the last transaction whose effects are in the same store batch; the log's
//! retention floor is never above the first offset the store has not persisted.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tideline_wal::{Epoch, Gtid, GtidSet, NewTransaction, Offset, Op, Wal};
use uuid::Uuid;

use crate::apply::{ApplyTxn, NewKeyspace, OpRef, PackedOps, PackedTxn, StoreBatch};
use crate::catalog::{self, Catalog, DEFAULT_TREE, Tree, TreeInfo};
use crate::error::{OpenError, ReadError, WriteError, key_text};
use crate::merge::{self, MergeOperator};
use crate::snapshot::{Scan, Snapshot, owned_bounds};
use crate::store::{
    Backend, Batch, Persist, Store, StoreError, StoreOptions, StoreStats, StoreTree, TreeHandle,
    TreeOptions, WriteBatch,
};
use crate::txn::{ReadItem, Txn};

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
    /// How often [`Engine::transaction`] runs a transaction again after a conflict. Default 32.
    pub conflict_retries_max: u32,
    /// Keys of recent write sets kept for conflict checks. A reading transaction whose
    /// snapshot is older than the oldest kept write set gets a retryable conflict.
    /// Default 65,536.
    pub history_keys_max: usize,
    /// Most transactions applied in one store batch. Default 4096.
    pub apply_group_txns_max: usize,
    /// A store batch takes no further transaction once it holds this many ops. Default
    /// 16,384.
    pub apply_group_ops_max: usize,
    /// Background threads of the store (flushes, compactions); 0: the store's default
    /// (one per core, at most 4).
    pub store_threads: usize,
    /// Size at which a tree's in-memory table is flushed to disk. With the cache, this
    /// bounds the store's memory. Default 16 MiB.
    pub memtable_bytes: u64,
    /// Test-only: do not replay the log on open (the bug recovery prevents). Exists so the
    /// crash test can prove it catches lost transactions.
    #[doc(hidden)]
    pub unsafe_skip_replay: bool,
    /// Test-only: write every bootstrap chunk through the store batch, never through bulk
    /// ingestion (to compare the two paths).
    #[doc(hidden)]
    pub unsafe_bootstrap_no_ingest: bool,
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
            apply_group_txns_max: 4096,
            apply_group_ops_max: 1 << 14,
            memtable_bytes: 16 << 20,
            store_threads: 0,
            unsafe_skip_replay: false,
            unsafe_bootstrap_no_ingest: false,
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

/// What [`Engine::apply_upstream`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The transaction was logged at a local offset and applied.
    Committed(CommitInfo),
    /// Its GTID was already executed (or in flight) here: nothing was done.
    AlreadyExecuted,
}

/// The result of [`Engine::transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    /// What the closure returned.
    pub value: T,
    /// Where the transaction was logged; `None` when it wrote nothing.
    pub commit: Option<CommitInfo>,
}

/// What [`Engine::compare_and_swap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The value matched and was replaced.
    Swapped(CommitInfo),
    /// The value did not match; nothing was written. Carries the current value.
    Mismatch(Option<Vec<u8>>),
}

/// A log position: the last applied offset and the GTIDs executed up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Last applied offset; `None` before the first transaction.
    pub offset: Option<Offset>,
    /// GTIDs executed up to and including `offset`.
    pub gtid_executed: GtidSet,
}

pub(crate) struct View {
    pub(crate) offset: u64,
    pub(crate) gtids: Arc<GtidSet>,
    pub(crate) catalog: Arc<Catalog>,
    /// Raised whenever a bootstrap replaces the state without moving the offset (begin,
    /// finish): a transaction that read a snapshot of an older generation must not commit.
    pub(crate) generation: u64,
}

struct HistoryEntry {
    offset: u64,
    keys: Vec<(Arc<str>, Vec<u8>)>,
    trees: Vec<Arc<str>>,
}

pub(crate) struct CommitState {
    /// `gtid_executed` plus every GTID submitted and not yet applied.
    submitted: GtidSet,
    /// Tree name → merge operator, as of every submitted transaction.
    trees: BTreeMap<String, Option<MergeOperator>>,
    /// Write sets of recent transactions, oldest first.
    history: VecDeque<HistoryEntry>,
    history_keys: usize,
    /// Write sets at or before this offset were dropped from `history`.
    history_floor: u64,
    /// The view's generation as of the last bootstrap begin or finish.
    generation: u64,
}

/// An acknowledged transaction waiting to be applied, and the committer to wake.
struct Ready {
    txn: Arc<PackedTxn>,
    waiter: std::thread::Thread,
}

struct ApplyState {
    applied: u64,
    ready: BTreeMap<u64, Ready>,
    /// The store could not apply: nothing more will be.
    store_failed: Option<String>,
    /// The log failed to acknowledge this offset: it and everything after will never apply.
    dead_from: u64,
    dead_reason: String,
}

pub(crate) struct Inner {
    pub(crate) wal: Arc<Wal>,
    pub(crate) db: Backend,
    pub(crate) meta: TreeHandle,
    path: PathBuf,
    pub(crate) opts: EngineOptions,
    pub(crate) server_uuid: Uuid,
    pub(crate) read_only: AtomicBool,
    failed: AtomicBool,
    failed_reason: Mutex<String>,
    pub(crate) commit: Mutex<CommitState>,
    apply: Mutex<ApplyState>,
    applied_cv: Condvar,
    pub(crate) view: RwLock<View>,
    pub(crate) catalog: RwLock<Arc<Catalog>>,
    pub(crate) applied: AtomicU64,
    /// Offset of the last transaction submitted to the log.
    pub(crate) last_submitted: AtomicU64,
    /// Whether `format` and `server_uuid` are in the store (written with the first batch).
    identity_written: AtomicBool,
    /// Serialises checkpoints (the store sync and the floor that follows it).
    checkpoint_lock: Mutex<()>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    /// Tells the applier thread to exit once nothing visible is left to apply.
    stopping: AtomicBool,
    /// The progress record of an unfinished bootstrap (`Some` while bootstrapping). The lock
    /// also serialises the bootstrap calls.
    pub(crate) bootstrap: Mutex<Option<Vec<u8>>>,
    /// Whether a bootstrap is in progress (writes are refused). Changed under the commit lock.
    pub(crate) bootstrapping: AtomicBool,
    /// Counts changes of the view's position (`applied`, `gtid_executed`), sent after each
    /// change is visible to readers: async waiters (read fences) wake on it.
    view_changes: tokio::sync::watch::Sender<u64>,
}

/// The embedded engine. Cheap to share: wrap it in an `Arc`; every method takes `&self`.
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    /// The applier and checkpoint threads.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("server_uuid", &self.inner.server_uuid)
            .field("path", &self.inner.path)
            .field("applied", &self.inner.applied.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Critical sections leave their state consistent before anything that can panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whether the local transaction or the upstream one is being committed.
#[derive(Clone, Copy)]
pub(crate) enum Origin {
    Local,
    Upstream { gtid: Gtid, timestamp_us: i64 },
}

/// A transaction ready to be submitted: see [`Inner::prepare`].
struct Prepared {
    ops: Vec<Op>,
    /// What the applier keeps of `ops`.
    packed: PackedOps,
    keys: Vec<(Arc<str>, Vec<u8>)>,
}

/// Which state a transaction's snapshot read: its offset and the view's generation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SnapshotAt {
    pub(crate) offset: u64,
    pub(crate) generation: u64,
}

/// A submitted transaction, not yet applied.
struct InFlight {
    offset: Offset,
    gtid: Gtid,
    /// The committer's reference to what the applier applies: the applier drops its own
    /// before it wakes the committer, so the buffers are freed by the thread that allocated
    /// them, off the applier (the engine's one serial stage).
    _txn: Arc<PackedTxn>,
}

impl Engine {
    /// Opens the engine: the state store in `store_dir` (created if missing) on top of `wal`,
    /// which the engine then owns as its only writer. Recovery replays every log record after
    /// the store's applied offset; nothing is written to the log.
    pub fn open(
        store_dir: impl AsRef<Path>,
        wal: Arc<Wal>,
        opts: EngineOptions,
    ) -> Result<Engine, OpenError> {
        if opts.key_bytes_max == 0 || opts.key_bytes_max > KEY_BYTES_MAX_LIMIT {
            return Err(OpenError::BadOption(format!(
                "key_bytes_max must be 1..={KEY_BYTES_MAX_LIMIT}, not {}",
                opts.key_bytes_max
            )));
        }
        if opts.value_bytes_max == 0 || opts.value_bytes_max > u32::MAX as usize {
            return Err(OpenError::BadOption(format!(
                "value_bytes_max must be 1..={}, not {}",
                u32::MAX,
                opts.value_bytes_max
            )));
        }
        if opts.memtable_bytes < 1 << 20 {
            return Err(OpenError::BadOption(format!(
                "memtable_bytes must be at least 1 MiB, not {}",
                opts.memtable_bytes
            )));
        }
        let path = store_dir.as_ref().to_path_buf();
        let shown = path.display().to_string();
        let store_err = |source: StoreError| OpenError::Store {
            path: shown.clone(),
            source,
        };
        let corrupt = |what: String| OpenError::CorruptStore {
            path: shown.clone(),
            what,
        };
        let db = Backend::open(
            &path,
            &StoreOptions {
                cache_bytes: opts.cache_bytes,
                worker_threads: opts.store_threads,
            },
        )
        .map_err(store_err)?;
        // The metadata keys are overwritten by every batch: a small memtable flushes (and
        // compacts away) their old versions early.
        let meta = db
            .tree(
                catalog::META_KEYSPACE,
                &TreeOptions {
                    memtable_bytes: Some(4 << 20),
                },
            )
            .map_err(store_err)?;

        // Read the store's position.
        if let Some(f) = meta.get(catalog::KEY_FORMAT).map_err(store_err)?
            && &*f != catalog::FORMAT
        {
            return Err(corrupt(format!(
                "store format {:?}, this build reads {:?}",
                String::from_utf8_lossy(&f),
                String::from_utf8_lossy(catalog::FORMAT)
            )));
        }
        let applied = match meta.get(catalog::KEY_APPLIED).map_err(store_err)? {
            None => 0,
            Some(b) => {
                let arr: [u8; 8] = (*b)
                    .try_into()
                    .map_err(|_| corrupt(format!("`applied` has {} bytes, not 8", b.len())))?;
                u64::from_le_bytes(arr)
            }
        };
        let gtids: GtidSet = match meta.get(catalog::KEY_GTIDS).map_err(store_err)? {
            None => GtidSet::new(),
            Some(b) => std::str::from_utf8(&b)
                .map_err(|_| corrupt("`gtid_executed` is not UTF-8".into()))?
                .parse()
                .map_err(|e| corrupt(format!("`gtid_executed` does not parse: {e}")))?,
        };
        let identity = meta.get(catalog::KEY_SERVER_UUID).map_err(store_err)?;
        if let Some(b) = &identity {
            let store_uuid: Uuid = std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt("`server_uuid` does not parse".into()))?;
            if store_uuid != wal.server_uuid() {
                return Err(OpenError::WrongLog {
                    store_uuid,
                    log_uuid: wal.server_uuid(),
                });
            }
        }
        let mut cat = Catalog::default();
        for kv in meta.prefix(catalog::TREE_PREFIX) {
            let (k, v) = kv.map_err(store_err)?;
            let name = std::str::from_utf8(&k[catalog::TREE_PREFIX.len()..])
                .map_err(|_| corrupt("a tree name is not UTF-8".into()))?
                .to_string();
            let (keyspace, merge) = catalog::decode_tree_meta(&v).map_err(corrupt)?;
            let handle = db
                .tree(&keyspace, &tree_options(&opts))
                .map_err(store_err)?;
            cat.trees.insert(
                name,
                Arc::new(Tree {
                    merge,
                    keyspace,
                    handle,
                }),
            );
        }
        // Keyspaces no tree refers to: created for a batch that never committed, or of a
        // dropped tree whose removal was cut short.
        let used: std::collections::HashSet<&str> =
            cat.trees.values().map(|t| t.keyspace.as_str()).collect();
        let mut orphans = Vec::new();
        for name in db.tree_names() {
            if name != catalog::META_KEYSPACE && !used.contains(name.as_str()) {
                orphans.push(db.tree(&name, &TreeOptions::default()).map_err(store_err)?);
            }
        }
        retire_keyspace_ids(&db, &meta, orphans).map_err(store_err)?;

        // A bootstrap in progress, or one whose finish was cut short: complete the finish.
        let mut bootstrap = meta
            .get(catalog::KEY_BOOTSTRAP)
            .map_err(store_err)?
            .map(|b| b.to_vec());
        if let Some(marker) = meta
            .get(catalog::KEY_BOOTSTRAP_FINISHING)
            .map_err(store_err)?
        {
            crate::bootstrap::complete_finish(&db, &meta, &wal, &marker, &shown)?;
            bootstrap = None;
        }

        // Check the store against the log.
        let log_last = wal.visible_offset();
        if applied > log_last {
            return Err(OpenError::StoreAheadOfLog {
                store_offset: applied,
                log_offset: log_last,
            });
        }
        let first = wal.first_offset().get();
        if applied < log_last && first > applied + 1 {
            return Err(OpenError::LogMissing {
                store_offset: applied,
                first_offset: first,
            });
        }
        // Hold the log the store may still need until the first checkpoint below.
        wal.set_retention_floor(Offset::new(applied + 1).unwrap_or(Offset::FIRST));

        let catalog = Arc::new(cat);
        let server_uuid = wal.server_uuid();
        let inner = Arc::new(Inner {
            wal: wal.clone(),
            db,
            meta,
            path,
            read_only: AtomicBool::new(opts.read_only),
            opts,
            server_uuid,
            failed: AtomicBool::new(false),
            failed_reason: Mutex::new(String::new()),
            commit: Mutex::new(CommitState {
                submitted: GtidSet::new(),
                trees: BTreeMap::new(),
                history: VecDeque::new(),
                history_keys: 0,
                history_floor: applied,
                generation: 0,
            }),
            apply: Mutex::new(ApplyState {
                applied,
                ready: BTreeMap::new(),
                store_failed: None,
                dead_from: u64::MAX,
                dead_reason: String::new(),
            }),
            applied_cv: Condvar::new(),
            view: RwLock::new(View {
                offset: applied,
                gtids: Arc::new(gtids),
                catalog: catalog.clone(),
                generation: 0,
            }),
            catalog: RwLock::new(catalog),
            applied: AtomicU64::new(applied),
            last_submitted: AtomicU64::new(0),
            identity_written: AtomicBool::new(identity.is_some()),
            checkpoint_lock: Mutex::new(()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            bootstrapping: AtomicBool::new(bootstrap.is_some()),
            bootstrap: Mutex::new(bootstrap),
            view_changes: tokio::sync::watch::Sender::new(0),
        });

        // Replay.
        let replayed = inner.replay(applied)?;
        {
            let v = inner.view.read().unwrap_or_else(|p| p.into_inner());
            inner.reset_commit_state(&mut lock(&inner.commit), &v);
            lock(&inner.apply).applied = v.offset;
            let log_gtids = wal.gtids();
            // While bootstrapping, the store's GTIDs are the upstream's, not the log's.
            if !log_gtids.is_subset(&v.gtids) && !inner.bootstrapping.load(Ordering::SeqCst) {
                tracing::warn!(
                    log = %log_gtids, store = %v.gtids,
                    "the log holds GTIDs the store has not executed; they were skipped as duplicates"
                );
            }
        }
        if replayed > 0 {
            tracing::info!(replayed, "replayed log records into the store");
        }
        inner
            .checkpoint()
            .map_err(|reason| OpenError::Apply { offset: 0, reason })?;

        let spawn = |name: &str, f: fn(Arc<Inner>)| {
            let bg = inner.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(bg))
                .map_err(|e| OpenError::BadOption(format!("cannot start thread {name}: {e}")))
        };
        let applier = spawn("tideline-engine-apply", Inner::apply_loop)?;
        let checkpointer = spawn("tideline-engine-checkpoint", Inner::checkpoint_loop)?;
        Ok(Engine {
            inner,
            threads: Mutex::new(vec![applier, checkpointer]),
        })
    }

    /// Figures about the state store, for metrics and benchmarks.
    pub fn store_stats(&self) -> StoreStats {
        self.inner.db.stats()
    }

    /// The log this engine writes to.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.inner.wal
    }

    /// This node's server uuid (the log's).
    pub fn server_uuid(&self) -> Uuid {
        self.inner.server_uuid
    }

    /// The last applied position: offset and `gtid_executed`.
    pub fn position(&self) -> Position {
        let v = self.inner.view.read().unwrap_or_else(|p| p.into_inner());
        Position {
            offset: Offset::new(v.offset),
            gtid_executed: (*v.gtids).clone(),
        }
    }

    /// GTIDs of every applied transaction.
    pub fn gtid_executed(&self) -> GtidSet {
        self.position().gtid_executed
    }

    /// A receiver that is marked changed whenever the applied position or `gtid_executed`
    /// moves (after the change is visible to [`Engine::position`]): an async read fence
    /// waits on it instead of polling. Mark it seen (`borrow_and_update`) *before* reading the
    /// position, then await `changed()`, and no change is missed.
    pub fn view_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.view_changes.subscribe()
    }

    /// Whether local writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.load(Ordering::SeqCst)
    }

    /// Switches read-only mode (a replica is read-only; promotion turns it off).
    pub fn set_read_only(&self, read_only: bool) {
        self.inner.read_only.store(read_only, Ordering::SeqCst);
    }

    /// `Some(reason)` once the engine refuses writes after a fatal failure (fail-stop).
    pub fn fail_stop_reason(&self) -> Option<String> {
        self.inner.fail_stop_reason()
    }

    /// The trees, by name.
    pub fn trees(&self) -> Vec<TreeInfo> {
        self.inner.current_catalog().infos()
    }

    /// Creates `tree` with an optional merge operator, by name (see [`MergeOperator`]).
    /// Returns `None` when the tree already exists with the same operator (nothing logged).
    pub fn create_tree(
        &self,
        tree: &str,
        merge_operator: Option<&str>,
    ) -> Result<Option<CommitInfo>, WriteError> {
        let mut tx = self.begin();
        tx.create_tree(tree, merge_operator)?;
        tx.commit()
    }

    /// Drops `tree` and everything in it (a logged op).
    pub fn drop_tree(&self, tree: &str) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.drop_tree(tree)?;
        tx.commit()?
            .ok_or_else(|| WriteError::UnknownTree(tree.to_string()))
    }

    /// Starts a transaction. Reads see one snapshot (taken at the first read) plus the
    /// transaction's own writes; [`Txn::commit`] checks that nothing it read changed.
    pub fn begin(&self) -> Txn<'_> {
        Txn::new(self)
    }

    /// Runs `f` in a transaction and commits it, running it again on a conflict (up to
    /// [`EngineOptions::conflict_retries_max`] times). `f` may run more than once, so it
    /// should only act through the transaction.
    pub fn transaction<T>(
        &self,
        mut f: impl FnMut(&mut Txn<'_>) -> Result<T, WriteError>,
    ) -> Result<Outcome<T>, WriteError> {
        let mut attempt = 0;
        loop {
            let mut tx = self.begin();
            let value = f(&mut tx)?;
            match tx.commit() {
                Ok(commit) => return Ok(Outcome { value, commit }),
                Err(e) if e.is_retryable() && attempt < self.inner.opts.conflict_retries_max => {
                    attempt += 1;
                    // The writer we conflicted with may not be applied yet; a snapshot taken
                    // before it is would conflict again. Wait until everything submitted so
                    // far is applied, so the next attempt reads past it.
                    let target = self.inner.last_submitted.load(Ordering::SeqCst);
                    self.inner.wait_applied(target, Duration::from_secs(1));
                    // Then a random pause growing with the attempts: contenders that all woke
                    // on the same apply would otherwise race again in lockstep, and the same
                    // one could lose every time.
                    let cap_us = (20u64 << attempt.min(7)).min(2_000);
                    std::thread::sleep(Duration::from_micros(rand::random_range(0..=cap_us)));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets `key` in `tree` to `value`.
    pub fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.put(tree, key, value)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Removes `key` from `tree` (logged even when the key is absent).
    pub fn delete(&self, tree: &str, key: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.delete(tree, key)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Merges `operand` into `key` with the tree's merge operator.
    pub fn merge(&self, tree: &str, key: &[u8], operand: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.merge(tree, key, operand)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Replaces the value of `key` with `new` (`None`: delete) if it currently is `expected`
    /// (`None`: absent).
    pub fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, WriteError> {
        let out = self.transaction(|tx| {
            let current = tx.get(tree, key)?;
            if current.as_deref() != expected {
                return Ok(Some(current));
            }
            match new {
                Some(v) => tx.put(tree, key, v)?,
                None => tx.delete(tree, key)?,
            }
            Ok(None)
        })?;
        match (out.value, out.commit) {
            (Some(current), _) => Ok(CasOutcome::Mismatch(current)),
            (None, Some(c)) => Ok(CasOutcome::Swapped(c)),
            (None, None) => Err(internal_nothing_logged()),
        }
    }

    /// Adds `delta` to the counter at `key` (decimal text; absent = 0) and returns the new
    /// value. A read-modify-write transaction: works on any tree, conflicts retried.
    pub fn increment(&self, tree: &str, key: &[u8], delta: i64) -> Result<i64, WriteError> {
        let out = self.transaction(|tx| {
            let current = match tx.get(tree, key)? {
                None => 0,
                Some(v) => merge::parse_i64(&v).ok_or_else(|| WriteError::NotAnInteger {
                    tree: tree.to_string(),
                    key: key_text(key),
                })?,
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| WriteError::Overflow {
                    tree: tree.to_string(),
                    key: key_text(key),
                })?;
            tx.put(tree, key, next.to_string().as_bytes())?;
            Ok(next)
        })?;
        Ok(out.value)
    }

    /// Stores JSON text at `key` after checking that it parses; malformed JSON is refused
    /// with [`WriteError::MalformedJson`] and nothing is written.
    pub fn put_json(&self, tree: &str, key: &[u8], json: &str) -> Result<CommitInfo, WriteError> {
        serde_json::from_str::<serde_json::Value>(json).map_err(|e| WriteError::MalformedJson {
            tree: tree.to_string(),
            key: key_text(key),
            reason: e.to_string(),
        })?;
        self.put(tree, key, json.as_bytes())
    }

    /// Reads `key` as JSON.
    pub fn get_json(&self, tree: &str, key: &[u8]) -> Result<Option<serde_json::Value>, ReadError> {
        match self.get(tree, key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| ReadError::NotJson {
                    tree: tree.to_string(),
                    key: key_text(key),
                    reason: e.to_string(),
                }),
        }
    }

    /// Applies an RFC 7386 merge patch (JSON text) to the document at `key` (absent = null)
    /// in a read-modify-write transaction; returns the new document. For a blind, logged
    /// patch use a tree with the `json-merge-patch` operator and [`Engine::merge`].
    pub fn patch_json(
        &self,
        tree: &str,
        key: &[u8],
        patch: &str,
    ) -> Result<serde_json::Value, WriteError> {
        let bad = |reason: String| WriteError::MalformedJson {
            tree: tree.to_string(),
            key: key_text(key),
            reason,
        };
        let patch: serde_json::Value =
            serde_json::from_str(patch).map_err(|e| bad(e.to_string()))?;
        let out = self.transaction(|tx| {
            let mut doc = match tx.get(tree, key)? {
                None => serde_json::Value::Null,
                Some(v) => serde_json::from_slice(&v).map_err(|e| {
                    WriteError::Read(ReadError::NotJson {
                        tree: tree.to_string(),
                        key: key_text(key),
                        reason: e.to_string(),
                    })
                })?,
            };
            merge::merge_patch(&mut doc, &patch);
            let bytes = serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))?;
            tx.put(tree, key, &bytes)?;
            Ok(doc)
        })?;
        Ok(out.value)
    }

    /// The current value of `key` in `tree`. Never waits for writers.
    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        let catalog = self.inner.current_catalog();
        match catalog.get(tree) {
            Some(t) => Ok(t.handle.get(key)?.map(|v| v.to_vec())),
            None if tree == DEFAULT_TREE => Ok(None),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
    }

    /// Key-value pairs of `tree` in `range` (any bounds), ascending or, with `reverse`,
    /// descending. The scan reads one consistent state.
    pub fn range<K: AsRef<[u8]>>(
        &self,
        tree: &str,
        range: impl std::ops::RangeBounds<K>,
        reverse: bool,
    ) -> Result<Scan, ReadError> {
        let catalog = self.inner.current_catalog();
        let bounds = owned_bounds(&range);
        match catalog.get(tree) {
            Some(t) => Ok(Scan::new(bounds.map(|b| t.handle.range(b)), reverse)),
            None if tree == DEFAULT_TREE => Ok(Scan::new(None, reverse)),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
    }

    /// Key-value pairs of `tree` whose key starts with `prefix`.
    pub fn prefix(&self, tree: &str, prefix: &[u8], reverse: bool) -> Result<Scan, ReadError> {
        let catalog = self.inner.current_catalog();
        match catalog.get(tree) {
            Some(t) => Ok(Scan::new(Some(t.handle.prefix(prefix)), reverse)),
            None if tree == DEFAULT_TREE => Ok(Scan::new(None, reverse)),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
    }

    /// A consistent read snapshot, tagged with its position. Writers go on; the snapshot
    /// keeps reading the state it was taken at for as long as it is held (old versions are
    /// kept for it, so do not hold one forever).
    pub fn snapshot(&self) -> Snapshot {
        self.inner.snapshot()
    }

    /// A snapshot to copy this node's state from (a bootstrap served to a replica), with the
    /// log's history epoch its state belongs to; `None` while this node is being bootstrapped
    /// itself. Both are checked under the lock that a bootstrap's wipe and its end take, so
    /// the snapshot never shows wiped or half-copied state, and the epoch is the one in which
    /// the snapshot's offset is meaningful.
    pub fn snapshot_for_copy(&self) -> Option<(Snapshot, Epoch)> {
        let inner = &self.inner;
        let v = inner.view.read().unwrap_or_else(|p| p.into_inner());
        // A bootstrap sets the flag before it wipes the state (under this lock's write side)
        // and clears it, under the write side too, only after its history reset: with the
        // flag clear here, the state and the epoch read below are of one history.
        if inner.bootstrapping.load(Ordering::SeqCst) {
            return None;
        }
        let snap = Snapshot::new(
            inner.db.snapshot(),
            v.catalog.clone(),
            v.offset,
            v.gtids.clone(),
            v.generation,
        );
        Some((snap, inner.wal.history_epoch()))
    }

    /// Applies a transaction received from an upstream: it keeps its origin GTID and gets
    /// the next local offset, or is skipped when its GTID is already executed here. Allowed
    /// in read-only mode.
    pub fn apply_upstream(&self, txn: NewTransaction) -> Result<Applied, WriteError> {
        let mut out = self.apply_upstream_batch(vec![txn])?;
        Ok(out.pop().unwrap_or(Applied::AlreadyExecuted))
    }

    /// [`Engine::apply_upstream`] for many transactions in order, sharing group commits.
    /// Keys and values of the whole batch are checked before anything is submitted; on a
    /// later error (an unknown tree), the transactions before the failing one are applied
    /// (the call waits for them, so `gtid_executed` shows them when it returns) and nothing
    /// from the failing one on is. The error returned is the first in batch order: a failure
    /// to apply an earlier transaction (fail-stop) comes before the later one's refusal.
    pub fn apply_upstream_batch(
        &self,
        txns: Vec<NewTransaction>,
    ) -> Result<Vec<Applied>, WriteError> {
        let mut results = Vec::with_capacity(txns.len());
        let mut pending = Vec::new();
        let inner = &self.inner;
        inner.check_not_failed()?;
        // Limits are checked for the whole batch before anything is submitted.
        let prepared = txns
            .into_iter()
            .map(|t| {
                let origin = Origin::Upstream {
                    gtid: t.gtid,
                    timestamp_us: t.timestamp_us,
                };
                inner.prepare(t.ops, true).map(|p| (p, origin))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut refused = None;
        {
            let mut st = lock(&inner.commit);
            for (p, origin) in prepared {
                results.push(Applied::AlreadyExecuted);
                match inner.submit_locked(&mut st, p, None, origin) {
                    Ok(Some(f)) => pending.push((results.len() - 1, f)),
                    Ok(None) => {}
                    Err(e) => {
                        refused = Some(e);
                        break;
                    }
                }
            }
        }
        // Submitted transactions are in the log: wait for them even when a later one was
        // refused. A failure here means every later offset fails too (fail-stop).
        for (i, f) in pending {
            results[i] = Applied::Committed(self.inner.finish(f)?);
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// Syncs the store and raises the log's retention floor to the first offset the store
    /// has not persisted. Runs on its own every [`EngineOptions::checkpoint_interval`].
    pub fn checkpoint(&self) -> Result<(), WriteError> {
        self.inner
            .checkpoint()
            .map_err(|reason| WriteError::FailStop { reason })
    }

    /// Stops the checkpoint thread and syncs the store. The log is left open (it may be
    /// shared); close it with [`Wal::close`].
    pub fn close(&self) -> Result<(), WriteError> {
        {
            *lock(&self.inner.stop) = true;
            self.inner.stop_cv.notify_all();
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
        {
            // Nothing applies any more: a commit still waiting learns it now.
            let mut a = lock(&self.inner.apply);
            if a.dead_from == u64::MAX {
                a.dead_from = a.applied + 1;
                a.dead_reason = "the engine was closed before the transaction was applied; \
                                 reopen it (recovery applies what the log holds)"
                    .into();
            }
            for r in a.ready.values() {
                r.waiter.unpark();
            }
        }
        self.checkpoint()
    }

    pub(crate) fn commit_txn(
        &self,
        ops: Vec<Op>,
        reads: Option<(SnapshotAt, &[ReadItem])>,
    ) -> Result<Option<CommitInfo>, WriteError> {
        let inner = &self.inner;
        if inner.bootstrapping.load(Ordering::SeqCst) {
            return Err(WriteError::Bootstrapping);
        }
        if inner.read_only.load(Ordering::SeqCst) {
            return Err(WriteError::ReadOnly);
        }
        inner.check_not_failed()?;
        let prepared = inner.prepare(ops, false)?;
        let f = {
            let mut st = lock(&inner.commit);
            inner.submit_locked(&mut st, prepared, reads, Origin::Local)?
        };
        match f {
            None => Ok(None),
            Some(f) => inner.finish(f).map(Some),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the engine failed");
        }
    }
}

fn internal_nothing_logged() -> WriteError {
    WriteError::Conflict("internal: a write transaction logged nothing".into())
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

impl Inner {
    pub(crate) fn current_catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        // Taken under the view lock, which the applier holds across each store batch, so the
        // store snapshot and the position describe the same state.
        let snap = self.db.snapshot();
        Snapshot::new(
            snap,
            v.catalog.clone(),
            v.offset,
            v.gtids.clone(),
            v.generation,
        )
    }

    /// Waits until `offset` is applied (or the store failed, or `timeout` passed).
    fn wait_applied(&self, offset: u64, timeout: Duration) {
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

    fn fail_stop_reason(&self) -> Option<String> {
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

    fn fail(&self, reason: String) {
        tracing::error!(%reason, "engine stopped accepting writes (fail-stop)");
        {
            let mut r = lock(&self.failed_reason);
            if r.is_empty() {
                *r = reason;
            }
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Validates and submits one transaction; called with the commit lock held. `Ok(None)`:
    /// nothing to log (a local transaction without effect, or an upstream GTID already here).
    /// The work of a commit that needs no lock: limit checks (for upstream transactions;
    /// local ones were checked op by op), the packed copy of the ops the applier keeps, and the
    /// write set for conflict checks.
    fn prepare(&self, ops: Vec<Op>, check_limits: bool) -> Result<Prepared, WriteError> {
        let mut keys = Vec::with_capacity(ops.len());
        let mut last_tree: Option<Arc<str>> = None;
        for op in &ops {
            let (tree, key, value) = match op {
                Op::Put {
                    tree, key, value, ..
                } => (tree, key, Some(value.as_slice())),
                Op::Merge {
                    tree, key, operand, ..
                } => (tree, key, Some(operand.as_slice())),
                Op::Delete { tree, key, .. } => (tree, key, None),
                Op::CreateTree { .. } | Op::DropTree { .. } => continue,
            };
            if check_limits {
                check_kv(&self.opts, tree, key, value)?;
            }
            let name = match &last_tree {
                Some(t) if **t == **tree => t.clone(),
                _ => {
                    let t: Arc<str> = Arc::from(tree.as_str());
                    last_tree = Some(t.clone());
                    t
                }
            };
            keys.push((name, key.clone()));
        }
        let packed = PackedOps::pack(&ops);
        Ok(Prepared { ops, packed, keys })
    }

    fn submit_locked(
        &self,
        st: &mut CommitState,
        prepared: Prepared,
        reads: Option<(SnapshotAt, &[ReadItem])>,
        origin: Origin,
    ) -> Result<Option<InFlight>, WriteError> {
        // Checked under the commit lock, which `bootstrap_begin` takes to set the flag.
        if self.bootstrapping.load(Ordering::SeqCst) {
            return Err(WriteError::Bootstrapping);
        }
        let Prepared { ops, packed, keys } = prepared;
        // Set when the logged op list differs from `ops` (an op dropped or added).
        let mut modified = false;
        let local = matches!(origin, Origin::Local);
        if let Origin::Upstream { gtid, .. } = origin
            && st.submitted.contains(&gtid)
        {
            return Ok(None);
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
        let mut dropped_ops: Vec<usize> = Vec::new();
        let mut create_default_at: Vec<usize> = Vec::new();
        let mut tree_ops: Vec<Arc<str>> = Vec::new();
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
                                            | Op::DropTree { tree: t } => t == tree,
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
                    tree_ops.push(intern(tree));
                }
                Op::Put { tree, .. } | Op::Delete { tree, .. } | Op::Merge { tree, .. } => {
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
        let out = if modified {
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
            return Ok(None);
        }

        let (gtid, timestamp_us) = match origin {
            Origin::Local => {
                let seq = st
                    .submitted
                    .last_seq(&self.server_uuid)
                    .map_or(1, |s| s + 1);
                let gtid = Gtid::new(self.server_uuid, seq)
                    .map_err(|e| WriteError::Conflict(format!("internal: {e}")))?;
                (gtid, now_us())
            }
            Origin::Upstream { gtid, timestamp_us } => (gtid, timestamp_us),
        };
        let txn = Arc::new(PackedTxn {
            gtid,
            ops: if modified {
                PackedOps::pack(&out)
            } else {
                packed
            },
        });
        let logged = NewTransaction {
            gtid,
            timestamp_us,
            ops: out,
        };
        // The applier learns of the transaction while the log assigns its offset (under the
        // log's lock), so it is known before the log can make it visible. Acknowledgements
        // reach committers through the applier; the log's own handle is not waited on.
        let (appended, ()) = self.wal.submit_with(logged, |off| {
            lock(&self.apply).ready.insert(
                off.get(),
                Ready {
                    txn: txn.clone(),
                    waiter: std::thread::current(),
                },
            );
        })?;
        let offset = appended.offset().get();
        drop(appended);
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
        st.history_keys += keys.len() + tree_ops.len();
        st.history.push_back(HistoryEntry {
            offset,
            keys,
            trees: tree_ops,
        });
        let applied = self.applied.load(Ordering::SeqCst);
        while st.history_keys > self.opts.history_keys_max {
            match st.history.front() {
                Some(e) if e.offset <= applied => {
                    st.history_floor = e.offset;
                    st.history_keys -= e.keys.len() + e.trees.len();
                    st.history.pop_front();
                }
                _ => break,
            }
        }
        Ok(Some(InFlight {
            offset: Offset::new(offset).unwrap_or(Offset::FIRST),
            gtid,
            _txn: txn,
        }))
    }

    /// Waits until the transaction is applied (hence durable and visible), or failed.
    fn finish(&self, f: InFlight) -> Result<CommitInfo, WriteError> {
        let done = CommitInfo {
            offset: f.offset,
            gtid: f.gtid,
        };
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

    /// What became of `offset`, if anything final.
    fn outcome(a: &ApplyState, offset: u64) -> Option<Result<(), WriteError>> {
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

    /// The applier thread: waits for the log's visible head to move, applies every newly
    /// visible transaction in offset order as one store batch per group, and wakes each
    /// committer once (no thundering herd, one wake-up per commit).
    fn apply_loop(self: Arc<Self>) {
        loop {
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
                    let reason = format!("the log stopped acknowledging: {e}");
                    self.fail(reason.clone());
                    let mut a = lock(&self.apply);
                    a.dead_from = a.applied + 1;
                    a.dead_reason = reason;
                    for r in a.ready.values() {
                        r.waiter.unpark();
                    }
                    drop(a);
                    self.applied_cv.notify_all();
                    return;
                }
            }
            if self.apply_visible().is_err() {
                return;
            }
        }
    }

    /// Applies every visible transaction not yet applied. `Err` once the store failed.
    fn apply_visible(&self) -> Result<(), ()> {
        let visible = self.wal.visible_offset();
        loop {
            let mut a = lock(&self.apply);
            let next = a.applied + 1;
            if next > visible {
                return Ok(());
            }
            let mut group = Vec::new();
            let mut waiters = Vec::new();
            let mut at = next;
            let mut ops = 0;
            while at <= visible
                && group.len() < self.opts.apply_group_txns_max
                && ops < self.opts.apply_group_ops_max
            {
                match a.ready.remove(&at) {
                    Some(r) => {
                        ops += r.txn.op_count();
                        group.push((at, r.txn));
                        // One wake-up per thread, not per transaction: a thread that submitted
                        // a whole batch (upstream apply) waits on its last one only once.
                        if !waiters
                            .iter()
                            .any(|w: &std::thread::Thread| w.id() == r.waiter.id())
                        {
                            waiters.push(r.waiter);
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
                self.fail(reason.clone());
                a.store_failed = Some(reason);
                for r in a.ready.values() {
                    r.waiter.unpark();
                }
                return Err(());
            }
            drop(a);
            // A panic while applying becomes a store failure (fail-stop), not a hang.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.apply_group(&group)))
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
                    self.fail(reason.clone());
                    a.store_failed = Some(reason);
                    for w in waiters {
                        w.unpark();
                    }
                    for r in a.ready.values() {
                        r.waiter.unpark();
                    }
                    drop(a);
                    self.applied_cv.notify_all();
                    return Err(());
                }
            }
        }
    }

    /// Applies consecutive transactions as one atomic store batch. Only one caller at a time
    /// (the `applying` flag, or recovery before the engine is shared).
    fn apply_group<T: ApplyTxn>(&self, group: &[(u64, Arc<T>)]) -> Result<(), String> {
        let Some(&(last, _)) = group.last() else {
            return Ok(());
        };
        let (mut gtids, base_catalog) = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            debug_assert_eq!(v.offset + 1, group[0].0, "offsets apply densely, in order");
            ((*v.gtids).clone(), v.catalog.clone())
        };
        let has_merge = group
            .iter()
            .any(|(_, t)| t.ops().any(|o| matches!(o, OpRef::Merge { .. })));
        // Values written earlier in the group are kept only when a merge may need them.
        let mut sb = StoreBatch::new(self, base_catalog, has_merge);
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
        let (mut batch, catalog, dropped) = sb.into_parts();
        self.write_identity(&mut batch, last);
        batch.insert(&self.meta, catalog::KEY_GTIDS, gtids.to_string().as_bytes());
        let new_catalog = catalog.map(Arc::new);
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
            self.applied.store(last, Ordering::SeqCst);
            self.identity_written.store(true, Ordering::SeqCst);
        }
        self.notify_view_changed();
        self.remove_keyspaces(dropped);
        Ok(())
    }

    /// Wakes async waiters on [`Engine::view_changes`]; call after the view changed.
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

    /// Waits until every submitted transaction is applied; `Err` if one never will be.
    pub(crate) fn wait_all_applied(&self) -> Result<(), WriteError> {
        let target = self.last_submitted.load(Ordering::SeqCst);
        let mut a = lock(&self.apply);
        loop {
            if let Some(r) = Self::outcome(&a, target) {
                return r;
            }
            a = self
                .applied_cv
                .wait_timeout(a, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
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
        st.history.clear();
        st.history_keys = 0;
        st.history_floor = v.offset;
        st.generation = v.generation;
    }

    /// Removes the keyspaces of trees a committed batch dropped. The trees are already gone
    /// from the catalog; a keyspace that cannot be removed now is removed on the next open.
    pub(crate) fn remove_keyspaces(&self, dropped: Vec<TreeHandle>) {
        if dropped.is_empty() {
            return;
        }
        // The batch that recorded these keyspaces' ids (`keyspace_id_next`) must be durable
        // before the store forgets them: see `retire_keyspace_ids`.
        if let Err(e) = self.db.persist(Persist::Sync) {
            tracing::warn!(error = %e, "could not sync the store; dropped keyspaces are removed on the next open");
            return;
        }
        for h in dropped {
            if let Err(e) = self.db.delete_tree(h) {
                tracing::warn!(error = %e, "could not remove a dropped tree's keyspace");
            }
        }
    }

    /// Replays log records after `applied`. Returns how many were applied.
    fn replay(&self, applied: u64) -> Result<u64, OpenError> {
        if self.wal.visible_offset() <= applied || self.opts.unsafe_skip_replay {
            return Ok(0);
        }
        let from = Offset::new(applied + 1).unwrap_or(Offset::FIRST);
        let mut reader = self.wal.read_from(from)?;
        let mut group: Vec<(u64, Arc<NewTransaction>)> = Vec::new();
        let mut group_bytes = 0usize;
        let mut count = 0;
        let flush = |group: &mut Vec<(u64, Arc<NewTransaction>)>| -> Result<(), OpenError> {
            if let Some(&(offset, _)) = group.last() {
                self.apply_group(group)
                    .map_err(|reason| OpenError::Apply { offset, reason })?;
            }
            group.clear();
            Ok(())
        };
        while let Some(t) = reader.next_txn()? {
            group_bytes += t
                .ops
                .iter()
                .map(|o| match o {
                    Op::Put { key, value, .. } => key.len() + value.len(),
                    Op::Merge { key, operand, .. } => key.len() + operand.len(),
                    Op::Delete { key, .. } => key.len(),
                    _ => 64,
                })
                .sum::<usize>();
            group.push((
                t.offset.get(),
                Arc::new(NewTransaction {
                    gtid: t.gtid,
                    timestamp_us: t.timestamp_us,
                    ops: t.ops,
                }),
            ));
            count += 1;
            if group.len() >= self.opts.apply_group_txns_max || group_bytes >= 32 << 20 {
                flush(&mut group)?;
                group_bytes = 0;
            }
        }
        flush(&mut group)?;
        Ok(count)
    }

    fn checkpoint(&self) -> Result<(), String> {
        let _g = lock(&self.checkpoint_lock);
        let applied = self.applied.load(Ordering::SeqCst);
        // Every batch up to `applied` was committed to the store's journal before this sync.
        if let Err(e) = self.db.persist(Persist::Sync) {
            let reason = format!("syncing the state store failed: {e}");
            self.fail(reason.clone());
            return Err(reason);
        }
        self.wal
            .set_retention_floor(Offset::new(applied + 1).unwrap_or(Offset::FIRST));
        Ok(())
    }

    fn checkpoint_loop(self: Arc<Self>) {
        let mut stop = lock(&self.stop);
        loop {
            if *stop {
                return;
            }
            stop = self
                .stop_cv
                .wait_timeout(stop, self.opts.checkpoint_interval)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if *stop {
                return;
            }
            drop(stop);
            if self.checkpoint().is_err() {
                return;
            }
            stop = lock(&self.stop);
        }
    }
}

/// Prefix of the scratch keyspaces of [`retire_keyspace_ids`] (no tree uses it).
const SCRATCH_PREFIX: &str = "idfloor.";

/// Removes the `orphans` and makes sure that the store hands out no keyspace id it used
/// before.
///
/// fjall 3.1 recovers its sequence number from the data keyspaces only, not from its own
/// keyspace registry, and after a restart it hands out again the ids of removed keyspaces
/// when they were the highest. A keyspace created with such an id is registered at a sequence
/// number below the removal's tombstone, so the next recovery finds it unregistered and drops
/// its data. The engine therefore records in `keyspace_id_next` (in the batch that creates a
/// keyspace, and here) a bound on every id it was given, and on open burns ids (creates and
/// removes scratch keyspaces) until the store hands out one at or above that bound. The last
/// scratch keyspace is kept, so that after the next restart the store's ids start above it.
fn retire_keyspace_ids(
    db: &Backend,
    meta: &TreeHandle,
    orphans: Vec<TreeHandle>,
) -> Result<(), StoreError> {
    let stored = match meta.get(catalog::KEY_KEYSPACE_ID_NEXT)? {
        Some(b) => <[u8; 8]>::try_from(&*b).map_or(0, u64::from_le_bytes),
        None => 0,
    };
    let record = |floor: u64| -> Result<(), StoreError> {
        let mut batch = db.batch();
        batch.insert(
            meta,
            catalog::KEY_KEYSPACE_ID_NEXT,
            floor.to_le_bytes().as_slice(),
        );
        batch.commit()?;
        db.persist(Persist::Sync)
    };
    let (scratch, orphans): (Vec<_>, Vec<_>) = orphans
        .into_iter()
        .partition(|h| h.name().starts_with(SCRATCH_PREFIX));
    // Orphans were created by batches that never committed: their ids may be unrecorded.
    let mut floor = orphans
        .iter()
        .chain(&scratch)
        .map(|h| h.id().saturating_add(1))
        .fold(stored, u64::max);
    if floor > stored {
        record(floor)?;
    }
    for h in orphans {
        db.delete_tree(h)?;
    }
    loop {
        let name = format!("{SCRATCH_PREFIX}{:016x}", rand::random::<u64>());
        let h = db.tree(&name, &TreeOptions::default())?;
        let id = h.id();
        let reused = id < floor;
        floor = floor.max(id.saturating_add(1));
        record(floor)?;
        if !reused {
            break;
        }
        db.delete_tree(h)?;
    }
    for h in scratch {
        db.delete_tree(h)?;
    }
    Ok(())
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
            .any(|(t, k)| &**t == tree.as_str() && k == key)
            .then(|| format!("key {:?} in tree `{tree}`", key_text(key))),
        ReadItem::Range { tree, lo, hi } => e
            .keys
            .iter()
            .any(|(t, k)| &**t == tree.as_str() && range_contains(lo, hi, k))
            .then(|| format!("a key in a range read from tree `{tree}`")),
    }
}
