//! Reads and snapshots: point reads, scans and consistent snapshots of the applied state.
//!
//! Owns: [`Engine::get`], [`Engine::range`], [`Engine::prefix`], [`Engine::get_json`], the
//! applied position ([`Engine::position`], [`Engine::gtid_executed`],
//! [`Engine::view_changes`]) and snapshots ([`Engine::snapshot`],
//! [`Engine::snapshot_for_copy`]). A snapshot is taken under the view lock, which the applier
//! holds across each store batch, so a snapshot's store state and its position agree.
//!
//! Must never: wait for writers, write to the store or the log, or take the commit lock.

use std::sync::atomic::Ordering;

use tideline_wal::{Epoch, GtidSet, Offset};

use crate::catalog::DEFAULT_TREE;
use crate::engine::Engine;
use crate::error::{ReadError, key_text};
use crate::snapshot::{Position, Scan, Snapshot, owned_bounds};
use crate::state::Inner;
use crate::store::{Store, StoreSnapshot, StoreTree};

impl Engine {
    /// The last applied position: offset and `gtid_executed`.
    pub fn position(&self) -> Position {
        let v = self.inner.view.read().unwrap_or_else(|p| p.into_inner());
        Position {
            offset: Offset::new(v.offset),
            gtid_executed: (*v.gtids).clone(),
        }
    }

    /// The offset of the last applied transaction (0: none): reads show everything up to it.
    /// One atomic load, where [`Engine::position`] copies the GTID set.
    pub fn applied_offset(&self) -> u64 {
        self.inner.applied.load(std::sync::atomic::Ordering::SeqCst)
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
    /// descending. The scan reads one consistent state: the one committed when it began
    /// (a store snapshot, taken once per scan).
    pub fn range<K: AsRef<[u8]>>(
        &self,
        tree: &str,
        range: impl std::ops::RangeBounds<K>,
        reverse: bool,
    ) -> Result<Scan, ReadError> {
        let catalog = self.inner.current_catalog();
        let bounds = owned_bounds(&range);
        match catalog.get(tree) {
            Some(t) => Ok(Scan::new(
                bounds.map(|b| self.inner.db.snapshot().range(&t.handle, b)),
                reverse,
            )),
            None if tree == DEFAULT_TREE => Ok(Scan::new(None, reverse)),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
    }

    /// Key-value pairs of `tree` whose key starts with `prefix`, read like
    /// [`range`](Self::range) from the state committed when the scan began.
    pub fn prefix(&self, tree: &str, prefix: &[u8], reverse: bool) -> Result<Scan, ReadError> {
        let catalog = self.inner.current_catalog();
        match catalog.get(tree) {
            Some(t) => Ok(Scan::new(
                Some(self.inner.db.snapshot().prefix(&t.handle, prefix)),
                reverse,
            )),
            None if tree == DEFAULT_TREE => Ok(Scan::new(None, reverse)),
            None => Err(ReadError::UnknownTree(tree.to_string())),
        }
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
            inner.meta.clone(),
            v.catalog.clone(),
            v.offset,
            v.gtids.clone(),
            v.generation,
        );
        Some((snap, inner.wal.history_epoch()))
    }
}

impl Inner {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        // Taken under the view lock, which the applier holds across each store batch, so the
        // store snapshot and the position describe the same state.
        let snap = self.db.snapshot();
        Snapshot::new(
            snap,
            self.meta.clone(),
            v.catalog.clone(),
            v.offset,
            v.gtids.clone(),
            v.generation,
        )
    }
}
