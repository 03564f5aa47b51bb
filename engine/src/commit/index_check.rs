//! Index checks of a local transaction under the commit lock: its index definitions, and the
//! values it claims in live unique indexes.
//!
//! Owns: [`check_index_def`], [`Inner::check_unique`] and the claims it returns.
//!
//! Only local transactions are checked here: a replica applying upstream transactions never
//! refuses them.
//!
//! Must never: write to the store (it reads the applied trees and indexes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tideline_wal::Op;

use crate::error::{WriteError, key_text};
use crate::index::{self, DocEntry, Index, Parsed};
use crate::state::{CommitState, Inner};
use crate::store::StoreTree;

/// Checks an index definition of a local transaction.
pub(super) fn check_index_def(name: &str, paths: &[String]) -> Result<(), WriteError> {
    if !index::is_valid_index_name(name) {
        return Err(WriteError::BadIndex(format!(
            "name `{name}`: use 1-128 characters from [A-Za-z0-9_.:-]"
        )));
    }
    if paths.is_empty() || paths.len() > INDEX_PATHS_MAX {
        return Err(WriteError::BadIndex(format!(
            "give 1 to {INDEX_PATHS_MAX} paths (--path /json/pointer), not {}",
            paths.len()
        )));
    }
    if let Some(p) = paths.iter().find(|p| !index::is_valid_json_pointer(p)) {
        return Err(WriteError::BadIndex(format!(
            "path `{p}` is not a JSON pointer: write it like `/email` or `/address/city`"
        )));
    }
    Ok(())
}

/// A unique value a transaction claims: (index keyspace, encoded value) and its primary key.
pub(super) type Claim = ((String, Vec<u8>), Vec<u8>);

/// Most components of a composite index.
const INDEX_PATHS_MAX: usize = 16;

impl Inner {
    /// Whether a transaction submitted and not yet applied wrote `key` of `tree`.
    fn pending_write(st: &CommitState, applied: u64, tree: &str, key: &[u8]) -> bool {
        st.history
            .iter()
            .rev()
            .take_while(|e| e.offset > applied)
            .any(|e| e.keys.iter().any(|(t, k)| t == tree && k == key))
    }

    /// Whether a transaction submitted and not yet applied created or dropped `tree` or one
    /// of its indexes: an index of `tree` in the applied catalog may then not be the one this
    /// transaction's writes will meet.
    fn pending_schema_change(st: &CommitState, applied: u64, tree: &str) -> bool {
        st.history
            .iter()
            .rev()
            .take_while(|e| e.offset > applied)
            .any(|e| e.trees.iter().chain(&e.index_trees).any(|t| **t == *tree))
    }

    /// Refuses a local transaction whose puts or merges would give a second primary key a
    /// value that a live unique index maps to another key: in the applied index, in the
    /// claims of transactions submitted and not yet applied, or earlier in this transaction.
    /// A holder that a pending transaction is rewriting makes it a retryable conflict, and so
    /// does an index whose tree or indexes a pending transaction changes (it may not be the
    /// index this transaction's writes will meet). Returns the claims this transaction makes,
    /// to record once it is submitted: for every unique index, backfilling ones included
    /// (they refuse nothing yet, but may go live before this transaction is applied).
    pub(super) fn check_unique(
        &self,
        st: &mut CommitState,
        ops: &[Op],
    ) -> Result<Vec<Claim>, WriteError> {
        // Before the catalog, which the applier publishes before it moves `applied`: the
        // catalog read is at least as new as that offset, so a pending transaction that
        // changed it counts as pending.
        let applied = self.applied.load(Ordering::SeqCst);
        let cat = self.current_catalog();
        if cat.indexes.is_empty() {
            return Ok(Vec::new());
        }
        // An index this transaction drops (or whose tree it drops) refuses nothing: once the
        // transaction is applied, the index no longer exists. Nor does one that a
        // transaction submitted before it dropped (no longer in `st.indexes`).
        let dropped = |i: &Index| {
            ops.iter().any(|o| match o {
                Op::DropIndex { tree, name } => *tree == i.tree && *name == i.name,
                Op::DropTree { tree } => *tree == i.tree,
                _ => false,
            })
        };
        let uniques: Vec<Arc<Index>> = cat
            .all_indexes()
            .filter(|i| {
                i.unique && !dropped(i) && st.indexes.contains(&(i.tree.clone(), i.name.clone()))
            })
            .cloned()
            .collect();
        let unique_of = |tree: &str| -> Vec<Arc<Index>> {
            uniques.iter().filter(|i| i.tree == tree).cloned().collect()
        };
        if !ops
            .iter()
            .any(|o| uniques.iter().any(|i| i.tree == o.tree()))
        {
            return Ok(Vec::new());
        }
        if st.claims.len() > 4096 {
            st.claims.retain(|_, (_, off)| *off > applied);
        }
        let written: HashSet<(&str, &[u8])> = ops
            .iter()
            .filter_map(|o| o.key().map(|k| (o.tree(), k)))
            .collect();
        let mut overlay: HashMap<(&str, &[u8]), Option<Vec<u8>>> = HashMap::new();
        let mut mine: HashMap<(String, Vec<u8>), Vec<u8>> = HashMap::new();
        for op in ops {
            let (tree, key) = match op {
                Op::Put { tree, key, .. } | Op::Merge { tree, key, .. } => (tree, key),
                Op::Delete { tree, key, .. } => {
                    overlay.insert((tree, key), None);
                    continue;
                }
                _ => continue,
            };
            let idxs = unique_of(tree);
            if idxs.is_empty() {
                continue;
            }
            let after = match op {
                Op::Put { value, .. } => value.clone(),
                Op::Merge { operand, .. } => {
                    let before = match overlay.get(&(tree.as_str(), key.as_slice())) {
                        Some(v) => v.clone(),
                        None => {
                            if Self::pending_write(st, applied, tree, key) {
                                return Err(WriteError::Conflict(format!(
                                    "key {:?} of tree `{tree}`, merged under a unique index, has \
                                     a write not yet applied",
                                    key_text(key)
                                )));
                            }
                            match cat.get(tree) {
                                Some(t) => t
                                    .handle
                                    .get(key)
                                    .map_err(|e| self.store_failure(format!("read: {e}")))?
                                    .map(|v| v.to_vec()),
                                None => None,
                            }
                        }
                    };
                    match cat.get(tree).and_then(|t| t.merge) {
                        Some(m) => m.resolve(before.as_deref(), operand),
                        None => operand.clone(),
                    }
                }
                _ => continue,
            };
            for idx in &idxs {
                let mut parsed = Parsed::default();
                let DocEntry::Entry(e) = idx.entry_for(key, Some(&after), &mut parsed) else {
                    continue;
                };
                let prefix = e[..e.len() - key.len()].to_vec();
                let claim = (idx.keyspace.clone(), prefix.clone());
                if !idx.is_live() {
                    // Backfilling: duplicates are counted, not refused, but the claim is
                    // recorded all the same. The index may go live before this transaction
                    // is applied, and a writer checked after that must see its value taken.
                    mine.insert(claim, key.clone());
                    continue;
                }
                let violation = |other: &[u8]| {
                    if Self::pending_schema_change(st, applied, tree) {
                        return WriteError::Conflict(format!(
                            "tree `{tree}` or its indexes were changed by a transaction not yet \
                             applied, so unique index `{}` may not hold key {:?} once it is",
                            idx.name,
                            key_text(other)
                        ));
                    }
                    WriteError::UniqueViolation {
                        tree: tree.clone(),
                        index: idx.name.clone(),
                        value: idx
                            .decode_entry(&e)
                            .map(|(v, _)| index::values_text(&v))
                            .unwrap_or_default(),
                        existing_key: key_text(other),
                        key: key_text(key),
                    }
                };
                if let Some(other) = mine.get(&claim)
                    && other != key
                {
                    return Err(violation(other));
                }
                let holders = st
                    .claims
                    .get(&claim)
                    .filter(|(_, off)| *off > applied)
                    .map(|(pk, _)| pk.clone())
                    .into_iter()
                    .map(Ok)
                    .chain(idx.handle.prefix(&prefix).map(|kv| {
                        kv.map(|(k, _)| k[prefix.len()..].to_vec())
                            .map_err(|e| self.store_failure(format!("read index: {e}")))
                    }));
                for other in holders {
                    let other = other?;
                    if other == *key || written.contains(&(tree.as_str(), other.as_slice())) {
                        continue;
                    }
                    if Self::pending_write(st, applied, tree, &other) {
                        return Err(WriteError::Conflict(format!(
                            "key {:?} holding a value of unique index `{}` has a write not yet \
                             applied",
                            key_text(&other),
                            idx.name
                        )));
                    }
                    return Err(violation(&other));
                }
                mine.insert(claim, key.clone());
            }
            overlay.insert((tree, key), Some(after));
        }
        Ok(mine.into_iter().collect())
    }
}
