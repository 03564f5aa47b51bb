//! Trees in the store: creating and dropping them, loading them at open, removing keyspaces.
//!
//! Owns: [`Engine::trees`], [`Engine::create_tree`] and [`Engine::drop_tree`] (each a logged
//! transaction through [`Txn`](crate::Txn)); loading the catalog from the store's meta
//! keyspace at open; removing the keyspaces of dropped trees once the batch that dropped them
//! is durable; and retiring keyspace ids so the store never hands one out twice. The
//! catalog's data and its meta keys are in `catalog`; what a `CreateTree` or `DropTree` op
//! writes is in `apply`.
//!
//! Must never: change the catalog readers see (only the applier and a bootstrap publish a new
//! catalog, together with the store batch that holds it), or remove a keyspace that a
//! committed tree still refers to.

use std::sync::Arc;

use crate::catalog::{self, Catalog, Tree, TreeInfo};
use crate::engine::Engine;
use crate::error::{OpenError, WriteError};
use crate::index;
use crate::state::{CommitInfo, EngineOptions, Inner, tree_options};
use crate::store::{
    Backend, Persist, Store, StoreError, StoreTree, TreeHandle, TreeOptions, WriteBatch,
};

impl Engine {
    /// The trees, by name.
    pub fn trees(&self) -> Vec<TreeInfo> {
        self.inner.current_catalog().infos()
    }

    /// Creates `tree` with an optional merge operator, by name (see [`MergeOperator`](crate::MergeOperator)).
    /// Returns `None` when the tree already exists with the same operator (nothing logged):
    /// also when another transaction's creation of it is not yet applied, in which case this
    /// returns once it is, so the tree can be written and read as soon as this returns.
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
}

impl Inner {
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
}

/// Loads the catalog from the meta keyspace at open (opening each tree's keyspace), then
/// removes the keyspaces no tree refers to and retires their ids (see
/// [`retire_keyspace_ids`]). `shown` names the store directory in errors.
pub(crate) fn load_catalog(
    db: &Backend,
    meta: &TreeHandle,
    opts: &EngineOptions,
    shown: &str,
) -> Result<Catalog, OpenError> {
    let store_err = |source: StoreError| OpenError::Store {
        path: shown.to_string(),
        source,
    };
    let corrupt = |what: String| OpenError::CorruptStore {
        path: shown.to_string(),
        what,
    };
    let mut cat = Catalog::default();
    for kv in meta.prefix(catalog::TREE_PREFIX) {
        let (k, v) = kv.map_err(store_err)?;
        let name = std::str::from_utf8(&k[catalog::TREE_PREFIX.len()..])
            .map_err(|_| corrupt("a tree name is not UTF-8".into()))?
            .to_string();
        let (keyspace, merge) = catalog::decode_tree_meta(&v).map_err(corrupt)?;
        let handle = db.tree(&keyspace, &tree_options(opts)).map_err(store_err)?;
        cat.trees.insert(
            name,
            Arc::new(Tree {
                merge,
                keyspace,
                handle,
            }),
        );
    }
    for kv in meta.prefix(index::INDEX_PREFIX) {
        let (k, v) = kv.map_err(store_err)?;
        let rest = std::str::from_utf8(&k[index::INDEX_PREFIX.len()..])
            .map_err(|_| corrupt("an index name is not UTF-8".into()))?;
        let (tree, name) = rest
            .split_once('/')
            .ok_or_else(|| corrupt(format!("index entry `{rest}` lacks `tree/name`")))?;
        let (keyspace, paths, unique) = index::decode_def(&v).map_err(corrupt)?;
        let progress = match meta
            .get(&index::index_meta_key(
                index::INDEX_STATE_PREFIX,
                tree,
                name,
            ))
            .map_err(store_err)?
        {
            Some(b) => index::Progress::decode(&b).map_err(corrupt)?,
            None => return Err(corrupt(format!("index `{rest}` has no progress record"))),
        };
        if !cat.trees.contains_key(tree) {
            return Err(corrupt(format!("index `{rest}` covers a missing tree")));
        }
        let handle = db.tree(&keyspace, &tree_options(opts)).map_err(store_err)?;
        let idx = index::Index::new(tree, name, paths, unique, keyspace, handle, progress);
        cat.indexes
            .entry(tree.to_string())
            .or_default()
            .insert(name.to_string(), idx);
    }
    // Keyspaces no tree or index refers to: created for a batch that never committed, or of
    // a dropped tree or index whose removal was cut short.
    let used: std::collections::HashSet<&str> = cat
        .trees
        .values()
        .map(|t| t.keyspace.as_str())
        .chain(cat.all_indexes().map(|i| i.keyspace.as_str()))
        .collect();
    let mut orphans = Vec::new();
    for name in db.tree_names() {
        if name != catalog::META_KEYSPACE && !used.contains(name.as_str()) {
            orphans.push(db.tree(&name, &TreeOptions::default()).map_err(store_err)?);
        }
    }
    retire_keyspace_ids(db, meta, orphans).map_err(store_err)?;
    Ok(cat)
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
