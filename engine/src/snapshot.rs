//! Consistent read snapshots and scans.
//!
//! Owns: [`Snapshot`] (one committed state with its [`Position`]), [`Scan`] and
//! `SnapshotAt`, what a transaction's conflict check needs of its snapshot. Taking a snapshot
//! of the engine is in `read`. Must never: write, wait for writers, or see a later commit.

use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use tideline_wal::{GtidSet, Offset};

use crate::catalog::{Catalog, DEFAULT_TREE, Tree, TreeInfo};
use crate::error::ReadError;
pub(crate) use crate::store::OwnedBounds;
use crate::store::{StoreIter, StoreSnap, StoreSnapshot, StoreTree, TreeHandle};

/// A log position: the last applied offset and the GTIDs executed up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Last applied offset; `None` before the first transaction.
    pub offset: Option<Offset>,
    /// GTIDs executed up to and including `offset`.
    pub gtid_executed: GtidSet,
}

/// Which state a transaction's snapshot read: its offset and the view's generation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SnapshotAt {
    pub(crate) offset: u64,
    pub(crate) generation: u64,
}

/// One committed state of the engine, tagged with its log position. Readers of a snapshot
/// never wait for writers and never see a later commit. Cheap to clone.
#[derive(Clone)]
pub struct Snapshot {
    inner: StoreSnap,
    /// The engine's `meta` keyspace, read through `inner`: index progress as of the snapshot.
    meta: TreeHandle,
    catalog: Arc<Catalog>,
    offset: u64,
    gtids: Arc<GtidSet>,
    generation: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("offset", &self.offset)
            .field("gtid_executed", &self.gtids.to_string())
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    pub(crate) fn new(
        inner: StoreSnap,
        meta: TreeHandle,
        catalog: Arc<Catalog>,
        offset: u64,
        gtids: Arc<GtidSet>,
        generation: u64,
    ) -> Snapshot {
        Snapshot {
            inner,
            meta,
            catalog,
            offset,
            gtids,
            generation,
        }
    }

    /// The value of `key` in the engine's `meta` keyspace as of this snapshot.
    pub(crate) fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        Ok(self.inner.get(&self.meta, key)?.map(|v| v.to_vec()))
    }

    /// The last offset applied in this snapshot; `None` before the first transaction.
    pub fn offset(&self) -> Option<Offset> {
        Offset::new(self.offset)
    }

    /// Which state this snapshot reads, for the commit check of a transaction.
    pub(crate) fn at(&self) -> SnapshotAt {
        SnapshotAt {
            offset: self.offset,
            generation: self.generation,
        }
    }

    /// The GTIDs executed in this snapshot.
    pub fn gtid_executed(&self) -> &GtidSet {
        &self.gtids
    }

    /// Offset and GTID set together.
    pub fn position(&self) -> Position {
        Position {
            offset: self.offset(),
            gtid_executed: (*self.gtids).clone(),
        }
    }

    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub(crate) fn store(&self) -> &StoreSnap {
        &self.inner
    }

    /// The trees in this snapshot.
    pub fn trees(&self) -> Vec<TreeInfo> {
        self.catalog.infos()
    }

    pub(crate) fn tree(&self, tree: &str) -> Result<Option<&Arc<Tree>>, ReadError> {
        match self.catalog.get(tree) {
            Some(t) => Ok(Some(t)),
            None if tree == DEFAULT_TREE => Ok(None),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
    }

    /// An estimate of how many keys the trees of this snapshot hold together, for progress
    /// bars and ETAs (a bootstrap server sizing its copy). Cheap: it adds up counters the
    /// store keeps per tree (entries in its tables and in-memory tables), reading no data.
    ///
    /// **Approximate**, not a count of this snapshot's keys: it counts every stored entry of
    /// each tree as of now, so an overwritten key counts once per version and a deleted key
    /// (its tombstone and older values) still counts until compaction merges them, and
    /// writes made after the snapshot count too. For a tree that was only inserted into (a
    /// fresh bootstrap, a bulk load) it is exact; after updates and deletes it is usually
    /// above the real count. Use it to show progress, never to check a copy.
    pub fn approximate_len(&self) -> u64 {
        self.catalog
            .trees
            .values()
            .map(|t| approximate_tree_len(t))
            .fold(0, u64::saturating_add)
    }

    /// [`Snapshot::approximate_len`] for one tree: 0 for a `default` tree not created yet,
    /// [`ReadError::UnknownTree`] for another missing one. Approximate in the same ways.
    pub fn approximate_tree_len(&self, tree: &str) -> Result<u64, ReadError> {
        Ok(self.tree(tree)?.map_or(0, |t| approximate_tree_len(t)))
    }

    /// The value of `key` in `tree`.
    pub fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ReadError> {
        match self.tree(tree)? {
            Some(t) => Ok(self.inner.get(&t.handle, key)?.map(|v| v.to_vec())),
            None => Ok(None),
        }
    }

    /// Key-value pairs of `tree` in `range`, ascending or, with `reverse`, descending.
    pub fn range<K: AsRef<[u8]>>(
        &self,
        tree: &str,
        range: impl RangeBounds<K>,
        reverse: bool,
    ) -> Result<Scan, ReadError> {
        let bounds = owned_bounds(&range);
        Ok(match (self.tree(tree)?, bounds) {
            (Some(t), Some(b)) => Scan::new(Some(self.inner.range(&t.handle, b)), reverse),
            _ => Scan::new(None, reverse),
        })
    }

    /// Calls `f` with each key-value pair of `tree` from `from` (inclusive) on, ascending,
    /// until `f` returns `false` or the tree ends. The pairs are borrowed from the store,
    /// not copied: for a reader that only passes them on (a bootstrap's chunks), this saves
    /// two allocations and two copies per pair against [`range`](Self::range).
    pub fn visit_from(
        &self,
        tree: &str,
        from: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), ReadError> {
        match self.tree(tree)? {
            Some(t) => Ok(self.inner.visit_range(
                &t.handle,
                (Bound::Included(from.to_vec()), Bound::Unbounded),
                &mut f,
            )?),
            None => Ok(()),
        }
    }

    /// Key-value pairs of `tree` whose key starts with `prefix`.
    pub fn prefix(&self, tree: &str, prefix: &[u8], reverse: bool) -> Result<Scan, ReadError> {
        Ok(match self.tree(tree)? {
            Some(t) => Scan::new(Some(self.inner.prefix(&t.handle, prefix)), reverse),
            None => Scan::new(None, reverse),
        })
    }
}

/// The store's O(1) entry count of a tree (see [`Snapshot::approximate_len`]).
fn approximate_tree_len(t: &Tree) -> u64 {
    t.handle.approximate_len()
}

/// A scan over key-value pairs, in key order (or reverse key order). Each item is
/// `(key, value)`.
pub struct Scan {
    inner: Option<StoreIter>,
    reverse: bool,
}

impl std::fmt::Debug for Scan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scan")
            .field("reverse", &self.reverse)
            .finish_non_exhaustive()
    }
}

impl Scan {
    pub(crate) fn new(inner: Option<StoreIter>, reverse: bool) -> Scan {
        Scan { inner, reverse }
    }
}

impl Iterator for Scan {
    type Item = Result<KeyValue, ReadError>;
    fn next(&mut self) -> Option<Self::Item> {
        let it = self.inner.as_mut()?;
        let g = if self.reverse {
            it.next_back()
        } else {
            it.next()
        }?;
        Some(g.map_err(ReadError::from))
    }
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Owned copies of any bounds; `None` for a range that is empty by its bounds alone (the
/// store does not accept inverted ranges).
pub(crate) fn owned_bounds<K: AsRef<[u8]>>(range: &impl RangeBounds<K>) -> Option<OwnedBounds> {
    let conv = |b: Bound<&K>| match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    };
    let lo = conv(range.start_bound());
    let hi = conv(range.end_bound());
    let empty = match (&lo, &hi) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h))
        | (Bound::Excluded(l), Bound::Included(h)) => l >= h,
        _ => false,
    };
    (!empty).then_some((lo, hi))
}
