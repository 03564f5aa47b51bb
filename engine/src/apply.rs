//! What an op does to the store: the one place that gives `CreateTree`, `DropTree`, `Put`,
//! `Delete` and `Merge` their meaning. Both the log applier (`Inner::apply_group`, live
//! commits and replay) and a bootstrap (`Engine::bootstrap_apply`, ops written outside the
//! log) build their store batch through [`StoreBatch`], so an op means the same on both paths.
//!
//! A `StoreBatch` collects writes into one atomic store batch and the catalog as it will be
//! once the batch commits. Nothing is visible before the caller commits the batch; keyspaces
//! created for new trees exist at once but no tree refers to them until the batch (which
//! holds their `tree/<name>` entries) commits, so a crash before that leaves only unreferenced
//! keyspaces, which open removes. The applier's compact copy of a transaction (`OpRef`,
//! `PackedTxn`) is in `packed`.
//!
//! Must never: commit the batch or publish the catalog (its caller does both, under the view
//! lock, with the applied position), check limits or conflicts (the commit path and bootstrap
//! do), or touch the log.

use std::collections::HashMap;
use std::sync::Arc;

use crate::catalog::{self, Catalog, Tree};
use crate::merge::MergeOperator;
use crate::packed::OpRef;
use crate::state::{Inner, tree_options};
use crate::store::{Batch, Store, StoreTree, TreeHandle, WriteBatch};

/// How a tree created by an op names its keyspace.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NewKeyspace {
    /// A logged op: `t<offset>.<op index>`, unique because offsets are.
    Log { offset: u64, op_index: usize },
    /// A bootstrap op, written outside the log (the offset does not move): `r<random>`, checked
    /// against the existing keyspaces.
    Restore,
}

/// A chunk written earlier in the same batch: its keyspace, range and entries (ascending).
pub(crate) struct ChunkWrite {
    pub(crate) keyspace: String,
    pub(crate) from: Vec<u8>,
    pub(crate) to: Option<Vec<u8>>,
    pub(crate) entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ChunkWrite {
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        key >= self.from.as_slice() && self.to.as_deref().is_none_or(|to| key < to)
    }

    /// The chunk's value for `key`, which it covers.
    pub(crate) fn value(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }
}

/// One atomic store batch under construction. See the module docs.
pub(crate) struct StoreBatch<'a> {
    pub(crate) inner: &'a Inner,
    pub(crate) batch: Batch,
    /// The catalog before the batch.
    pub(crate) base: Arc<Catalog>,
    /// The catalog as of the ops so far, once an op changed it.
    pub(crate) catalog: Option<Catalog>,
    /// Keyspaces of trees dropped by the batch, to remove once it committed.
    pub(crate) dropped: Vec<TreeHandle>,
    /// Whether to remember written values (`overlay`): needed when a later op of the batch
    /// may read them (a merge, or a bootstrap chunk replacing a range).
    pub(crate) track: bool,
    /// Values written by earlier ops of the batch, by (keyspace, key); `None`: deleted.
    pub(crate) overlay: HashMap<(String, Vec<u8>), Option<Vec<u8>>>,
    /// Chunks written earlier in the batch (bootstrap only), oldest first; not the call's
    /// leading chunks, which are ingested into the store before the batch and read from it. An overlay entry is
    /// always newer than every chunk covering its key (a chunk clears the overlay in its range).
    pub(crate) chunks: Vec<ChunkWrite>,
}

impl<'a> StoreBatch<'a> {
    pub(crate) fn new(inner: &'a Inner, base: Arc<Catalog>, track: bool) -> StoreBatch<'a> {
        StoreBatch {
            inner,
            batch: inner.db.batch(),
            base,
            catalog: None,
            dropped: Vec::new(),
            track,
            overlay: HashMap::new(),
            chunks: Vec::new(),
        }
    }

    /// The catalog as of the ops added so far.
    pub(crate) fn catalog(&self) -> &Catalog {
        self.catalog.as_ref().unwrap_or(&self.base)
    }

    fn catalog_mut(&mut self) -> &mut Catalog {
        let base = &self.base;
        self.catalog.get_or_insert_with(|| (**base).clone())
    }

    /// The batch, the new catalog if an op changed it, and the keyspaces to remove after the
    /// batch committed.
    pub(crate) fn into_parts(self) -> (Batch, Option<Catalog>, Vec<TreeHandle>) {
        (self.batch, self.catalog, self.dropped)
    }

    /// Adds `op` to the batch with its one meaning: creating an existing tree keeps it
    /// (operator and data); dropping a missing tree does nothing; a data op on a missing tree
    /// creates the tree without an operator (submission refuses such ops; a log written by
    /// another build might hold one, and apply stays total and deterministic); a merge is
    /// resolved against the tree's current value (this batch's writes included) with the
    /// tree's operator, or stores the operand when the tree has none.
    pub(crate) fn apply_op(&mut self, op: OpRef<'_>, at: NewKeyspace) -> Result<(), String> {
        match op {
            OpRef::CreateTree {
                tree,
                merge_operator,
            } => {
                if self.catalog().get(tree).is_none() {
                    let merge = merge_operator.and_then(MergeOperator::from_name);
                    self.create_tree(tree, merge, at)?;
                }
            }
            OpRef::DropTree { tree } => self.drop_tree(tree),
            OpRef::Put { tree, key, value } => {
                let t = self.tree_for_data(tree, at)?;
                self.batch.insert(&t.handle, key, value);
                self.remember(&t, key, Some(value));
            }
            OpRef::Delete { tree, key } => {
                let t = self.tree_for_data(tree, at)?;
                self.batch.remove(&t.handle, key);
                self.remember(&t, key, None);
            }
            OpRef::Merge { tree, key, operand } => {
                let t = self.tree_for_data(tree, at)?;
                let existing = self.current_value(&t, key)?;
                let value = match t.merge {
                    Some(m) => m.resolve(existing.as_deref(), operand),
                    // Refused on submission; a deterministic meaning all the same.
                    None => operand.to_vec(),
                };
                self.batch.insert(&t.handle, key, &value);
                self.overlay
                    .insert((t.keyspace.clone(), key.to_vec()), Some(value));
            }
        }
        Ok(())
    }

    fn remember(&mut self, t: &Tree, key: &[u8], value: Option<&[u8]>) {
        if self.track {
            self.overlay.insert(
                (t.keyspace.clone(), key.to_vec()),
                value.map(<[u8]>::to_vec),
            );
        }
    }

    /// The value of `key` in tree `t` as of the ops added so far.
    pub(crate) fn current_value(&self, t: &Tree, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = self.overlay.get(&(t.keyspace.clone(), key.to_vec())) {
            return Ok(v.clone());
        }
        if let Some(c) = self
            .chunks
            .iter()
            .rev()
            .find(|c| c.keyspace == t.keyspace && c.covers(key))
        {
            return Ok(c.value(key).cloned());
        }
        Ok(t.handle
            .get(key)
            .map_err(|e| format!("read for merge: {e}"))?
            .map(|v| v.to_vec()))
    }

    /// Creates `tree` (which must not exist in the batch's catalog) in a fresh keyspace.
    pub(crate) fn create_tree(
        &mut self,
        tree: &str,
        merge: Option<MergeOperator>,
        at: NewKeyspace,
    ) -> Result<Arc<Tree>, String> {
        let keyspace = match at {
            NewKeyspace::Log { offset, op_index } => format!("t{offset}.{op_index}"),
            NewKeyspace::Restore => loop {
                let name = format!("r{:016x}", rand::random::<u64>());
                if !self.inner.db.tree_exists(&name) {
                    break name;
                }
            },
        };
        let handle = self
            .inner
            .db
            .tree(&keyspace, &tree_options(&self.inner.opts))
            .map_err(|e| format!("create keyspace {keyspace}: {e}"))?;
        self.batch.insert(
            &self.inner.meta,
            &catalog::tree_meta_key(tree),
            &catalog::encode_tree_meta(&keyspace, merge),
        );
        // Ids only grow within a process, so the last creation of a batch records the bound.
        self.batch.insert(
            &self.inner.meta,
            catalog::KEY_KEYSPACE_ID_NEXT,
            handle.id().saturating_add(1).to_le_bytes().as_slice(),
        );
        let t = Arc::new(Tree {
            merge,
            keyspace,
            handle,
        });
        self.catalog_mut().trees.insert(tree.to_string(), t.clone());
        Ok(t)
    }

    /// Drops `tree` if it exists: its entry goes in this batch, its keyspace after it.
    pub(crate) fn drop_tree(&mut self, tree: &str) {
        let Some(t) = self.catalog().get(tree).cloned() else {
            return;
        };
        self.batch
            .remove(&self.inner.meta, &catalog::tree_meta_key(tree));
        self.dropped.push(t.handle.clone());
        self.catalog_mut().trees.remove(tree);
    }

    /// The tree a data op applies to; see [`StoreBatch::apply_op`] for a missing one.
    fn tree_for_data(&mut self, tree: &str, at: NewKeyspace) -> Result<Arc<Tree>, String> {
        if let Some(t) = self.catalog().get(tree) {
            return Ok(t.clone());
        }
        tracing::warn!(tree, at = ?at, "an op writes to a missing tree; creating it");
        self.create_tree(tree, None, at)
    }
}
