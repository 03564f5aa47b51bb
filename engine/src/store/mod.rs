//! The state store behind a small trait.
//!
//! The engine keeps its state (every tree and the `meta` keyspace) in an embedded ordered
//! key-value store. It needs little from it, and this module says exactly what:
//!
//! - [`Store`]: open; open or create, list and delete **trees** (the store's keyspaces or
//!   column families, one per engine tree plus `meta`); an **atomic write batch** across
//!   trees; a **consistent snapshot** of every tree; **persist** (to the OS, or synced);
//!   figures for metrics.
//! - [`StoreTree`]: a handle on one tree that reads the latest committed state (point get,
//!   range and prefix scans, key-only range scans; a scan is not of one state: it sees what
//!   commits while it walks), estimates its size in O(1), and
//!   **ingests** a sorted stream of puts and tombstones as tables (bulk load, no journal).
//! - [`WriteBatch`]: inserts and removes across trees, committed atomically: all or nothing,
//!   also across a crash. The batch need not be durable when `commit` returns: the log is the
//!   journal, and the engine calls [`Store::persist`] before it lets the log forget records.
//!   It reports whether the store stalls writes to its trees (backpressure), so that the
//!   engine waits for the store before, not while, it holds the lock readers take.
//! - [`StoreSnapshot`]: reads of one committed state, stable while later batches commit.
//!
//! The engine is written against these traits only; [`Backend`] picks the implementation
//! ([`fjall::FjallStore`], the only one). Calls are statically dispatched: hot paths (a point
//! get, a batch insert) compile to direct calls into the store. Store errors reach callers
//! as the engine's [`StoreError`], so no store type appears in the public API.
//!
//! Requirements an implementation must meet (the engine's crash safety rests on them):
//! a committed batch is applied whole or not at all after a crash; batches become visible in
//! commit order; a snapshot never sees a later batch; `persist(Persist::Sync)` makes every
//! batch committed before it durable; after a crash the store holds a prefix of the
//! committed batches (the engine re-applies the rest from the log); keys up to 65,535 bytes.

pub(crate) mod fjall;

use std::ops::Bound;
use std::path::Path;

/// The store implementation the engine uses.
pub(crate) type Backend = fjall::FjallStore;
/// A handle on one tree of [`Backend`].
pub(crate) type TreeHandle = <Backend as Store>::Tree;
/// A batch of [`Backend`].
pub(crate) type Batch = <Backend as Store>::Batch;
/// A snapshot of [`Backend`].
pub(crate) type StoreSnap = <Backend as Store>::Snapshot;
/// A scan of [`Backend`].
pub(crate) type StoreIter = <Backend as Store>::Iter;

/// A key range as owned lower and upper bounds.
pub(crate) type OwnedBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// A failure of the state store (I/O, corruption, a store poisoned by an earlier failure).
/// Its message is the store's own.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl StoreError {
    pub(crate) fn new(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
        StoreError(Box::new(e))
    }
}

/// Figures about the state store, for metrics and benchmarks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Bytes the store occupies on disk.
    pub disk_bytes: u64,
    /// Journal files of the store.
    pub journal_count: usize,
    /// Memtables waiting to be flushed.
    pub outstanding_flushes: usize,
    /// Compactions running.
    pub active_compactions: usize,
    /// Configured block cache, in bytes.
    pub cache_bytes_max: u64,
    /// Block cache in use, in bytes.
    pub cache_bytes: u64,
    /// Memtables (active and sealed), in bytes.
    pub write_buffer_bytes: u64,
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub(crate) struct StoreOptions {
    /// Block cache, in bytes.
    pub(crate) cache_bytes: u64,
    /// Background threads (flushes, compactions); 0: the store's default.
    pub(crate) worker_threads: usize,
    /// Test-only (cargo feature `testing`): faults a test switches on while the store runs.
    #[cfg(feature = "testing")]
    pub(crate) faults: Option<std::sync::Arc<StoreFaults>>,
}

/// Test-only (cargo feature `testing`, set through `EngineOptions::unsafe_store_faults`):
/// faults of the state store that a test switches on and off while the engine runs, at a
/// moment of its choosing, to reproduce what a slow or failing disk does to fjall.
#[cfg(feature = "testing")]
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct StoreFaults {
    /// The store reports a write stall, and a commit waits in it.
    stall: std::sync::atomic::AtomicBool,
    /// A commit waits in a write stall the store does not report.
    unreported_stall: std::sync::atomic::AtomicBool,
    /// Syncs fail from now on.
    fail_syncs: std::sync::atomic::AtomicBool,
    /// A sync failed: every later commit and persist fails.
    poisoned: std::sync::atomic::AtomicBool,
    /// Commits that waited in a stall, and reports of one.
    stalls_seen: std::sync::atomic::AtomicU64,
}

#[cfg(feature = "testing")]
impl StoreFaults {
    /// Holds the store in a write stall, as fjall's when its flushes fall behind: the store
    /// reports it, and a batch's commit, once its writes are visible, waits until the stall
    /// ends, whether the store is poisoned or not (fjall's backpressure checks no poison).
    pub fn set_write_stall(&self, on: bool) {
        self.stall.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The same stall without the store reporting it: only a commit waits in it (what a
    /// stall that begins while a batch commits does).
    pub fn set_unreported_write_stall(&self, on: bool) {
        self.unreported_stall
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on every sync of the store fails and poisons it (every later commit and
    /// persist fails), as a failed flush or fsync poisons fjall.
    pub fn fail_syncs(&self) {
        self.fail_syncs
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times a commit waited in a stall or the store reported one.
    pub fn stalls_seen(&self) -> u64 {
        self.stalls_seen.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the store reports a stall (and counts the report).
    pub(crate) fn reports_stall(&self) -> bool {
        let on = self.stall.load(std::sync::atomic::Ordering::SeqCst);
        if on {
            self.stalls_seen
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        on
    }

    /// A commit's wait after its writes became visible, while either stall lasts.
    pub(crate) fn wait_in_commit(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        let stalled = || self.stall.load(SeqCst) || self.unreported_stall.load(SeqCst);
        if stalled() {
            self.stalls_seen.fetch_add(1, SeqCst);
        }
        while stalled() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// `Err` once a sync failed (the store is poisoned).
    pub(crate) fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::new(std::io::Error::other(
                "test-only fault: the store is poisoned by an earlier failed sync",
            )));
        }
        Ok(())
    }

    /// A sync: fails (and poisons the store) once `fail_syncs` was called.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if self.fail_syncs.load(std::sync::atomic::Ordering::SeqCst) {
            self.poisoned
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Err(StoreError::new(std::io::Error::other(
                "test-only fault: the store's sync failed",
            )));
        }
        Ok(())
    }
}

/// How a tree is created (ignored when it exists).
#[derive(Debug, Clone, Default)]
pub(crate) struct TreeOptions {
    /// Size at which the tree's in-memory table is flushed; `None`: the store's default.
    pub(crate) memtable_bytes: Option<u64>,
}

/// How far [`Store::persist`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Persist {
    /// Hand committed batches to the OS: they survive a killed process, not a power cut.
    Buffer,
    /// Sync committed batches to disk: they survive a power cut.
    Sync,
}

/// One entry of a bulk ingestion (see [`StoreTree::ingest`]).
pub(crate) enum Ingest<'a> {
    /// Put `key` = `value`.
    Put(&'a [u8], &'a [u8]),
    /// Remove `key`.
    Tombstone(Vec<u8>),
}

/// A key and its value, as a scan yields them.
pub(crate) type KvPair = (Vec<u8>, Vec<u8>);

/// An embedded ordered key-value store with named trees. See the module docs for the
/// guarantees the engine relies on.
pub(crate) trait Store: Send + Sync + Sized + 'static {
    /// A handle on one tree; cheap to clone.
    type Tree: StoreTree<Iter = Self::Iter>;
    /// An atomic write batch.
    type Batch: WriteBatch<Tree = Self::Tree>;
    /// A consistent read snapshot of every tree; cheap to clone.
    type Snapshot: StoreSnapshot<Tree = Self::Tree, Iter = Self::Iter>;
    /// A scan over key-value pairs in key order; `next_back` walks it backwards.
    type Iter: DoubleEndedIterator<Item = Result<KvPair, StoreError>> + Send;

    /// Opens (or creates) the store in `path`. Batches committed before a crash but not
    /// persisted may be gone; the store then holds a prefix of the committed batches.
    fn open(path: &Path, opts: &StoreOptions) -> Result<Self, StoreError>;
    /// Opens tree `name`, creating it (empty, with `opts`) when missing. A created tree
    /// exists at once, before any batch mentions it, and survives a restart.
    fn tree(&self, name: &str, opts: &TreeOptions) -> Result<Self::Tree, StoreError>;
    /// Whether tree `name` exists.
    fn tree_exists(&self, name: &str) -> bool;
    /// Names of every tree.
    fn tree_names(&self) -> Vec<String>;
    /// Deletes a tree and its data. Snapshots taken before keep reading it.
    fn delete_tree(&self, tree: Self::Tree) -> Result<(), StoreError>;
    /// A new, empty write batch.
    fn batch(&self) -> Self::Batch;
    /// A snapshot of the state as of the last committed batch.
    fn snapshot(&self) -> Self::Snapshot;
    /// Persists every committed batch (see [`Persist`]).
    fn persist(&self, how: Persist) -> Result<(), StoreError>;
    /// Figures for metrics.
    fn stats(&self) -> StoreStats;
}

/// One tree of a [`Store`], read at its latest committed state.
pub(crate) trait StoreTree: Clone + Send + Sync {
    /// A value as the store hands it out.
    type Value: std::ops::Deref<Target = [u8]>;
    /// A scan over key-value pairs.
    type Iter: DoubleEndedIterator<Item = Result<KvPair, StoreError>> + Send;
    /// A scan over keys only.
    type Keys: Iterator<Item = Result<Vec<u8>, StoreError>>;

    /// The tree's name.
    fn name(&self) -> &str;
    /// A number the store gave the tree when it created it, growing within one process.
    /// The engine records a bound on it (see `retire_keyspace_ids` in `engine.rs`), because
    /// fjall 3.1 may hand out an id again after a restart; a store without that flaw may
    /// return any growing number.
    fn id(&self) -> u64;
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Self::Value>, StoreError>;
    /// Pairs in `bounds`, ascending. The scan walks the live tree: keys ahead of its cursor
    /// show batches committed after it began (part of one, even). For one committed state,
    /// scan through a [`StoreSnapshot`].
    fn range(&self, bounds: OwnedBounds) -> Self::Iter;
    /// Pairs whose key starts with `prefix`, ascending; live like [`StoreTree::range`].
    fn prefix(&self, prefix: &[u8]) -> Self::Iter;
    /// Keys in `[from, to)` (`to: None`: to the end), ascending.
    fn keys(&self, from: &[u8], to: Option<&[u8]>) -> Self::Keys;
    /// An O(1) estimate of the entries the tree holds (versions and tombstones count until
    /// compaction merges them).
    fn approximate_len(&self) -> u64;
    /// Writes `entries`, strictly ascending by key, straight into new tables that shadow
    /// everything the tree held before (no journal, no memtable). Durable and visible when
    /// it returns `Ok`; not atomic with any batch.
    fn ingest<'a>(
        &self,
        entries: impl Iterator<Item = Result<Ingest<'a>, StoreError>>,
    ) -> Result<(), StoreError>;
}

/// An atomic write batch of a [`Store`].
pub(crate) trait WriteBatch: Send {
    /// The tree handle type.
    type Tree;
    /// Puts `key` = `value` in `tree`.
    fn insert(&mut self, tree: &Self::Tree, key: &[u8], value: &[u8]);
    /// Removes `key` from `tree`.
    fn remove(&mut self, tree: &Self::Tree, key: &[u8]);
    /// Whether the store is stalling writes to a tree this batch writes (its flushes or
    /// compactions fell behind): a commit now might wait inside the store, after its writes
    /// became visible, until they catch up. A caller that holds a lock readers need across
    /// `commit` waits (without it) while this says so. `Err` once the store is poisoned: its
    /// stall may never end, and a commit would fail.
    fn write_stall(&self) -> Result<bool, StoreError>;
    /// Applies every write at once; visible to every later read and snapshot. May wait
    /// inside the store while it stalls writes (see [`WriteBatch::write_stall`]).
    fn commit(self) -> Result<(), StoreError>;
}

/// A consistent read snapshot of a [`Store`].
pub(crate) trait StoreSnapshot: Clone + Send + Sync {
    /// The tree handle type.
    type Tree: StoreTree;
    /// A scan over key-value pairs.
    type Iter: DoubleEndedIterator<Item = Result<KvPair, StoreError>> + Send;
    /// The value of `key` in `tree` as of the snapshot.
    fn get(
        &self,
        tree: &Self::Tree,
        key: &[u8],
    ) -> Result<Option<<Self::Tree as StoreTree>::Value>, StoreError>;
    /// Pairs of `tree` in `bounds` as of the snapshot, ascending.
    fn range(&self, tree: &Self::Tree, bounds: OwnedBounds) -> Self::Iter;
    /// Calls `f` with each pair of `tree` in `bounds` as of the snapshot, ascending, borrowed
    /// from the store (no copy), until `f` returns `false` or the range ends.
    fn visit_range(
        &self,
        tree: &Self::Tree,
        bounds: OwnedBounds,
        f: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
    /// Pairs of `tree` whose key starts with `prefix` as of the snapshot, ascending.
    fn prefix(&self, tree: &Self::Tree, prefix: &[u8]) -> Self::Iter;
}
