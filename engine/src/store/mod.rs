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
    /// Applies every write at once; visible to every later read and snapshot.
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
