//! The size of the values a local transaction's merges leave, checked under the commit lock
//! ([`Inner::check_merged_sizes`]): merges are resolved when applied, which must never fail,
//! so a merge that would leave a value over `value_bytes_max` is refused here.
//!
//! Must never: write to the store (it reads the applied values of the keys such merges reach).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use tideline_wal::Op;

use crate::catalog;
use crate::error::{WriteError, key_text};
use crate::merge::{self, MergeOperator};
use crate::state::{CommitState, Inner};
use crate::store::StoreTree;

/// Whether `m`'s result grows with the stored value; the others' results are decimal
/// integers (at most 20 bytes), whatever they merge into.
fn grows_with_value(m: MergeOperator) -> bool {
    match m {
        MergeOperator::Append | MergeOperator::JsonMergePatch => true,
        MergeOperator::Add | MergeOperator::Max => false,
    }
}

/// A bound on the bytes `m` leaves after merging operands of `operands` bytes in all into a
/// value of `base` bytes; exact for `append`.
fn merged_bound(m: MergeOperator, base: u64, operands: u64) -> u64 {
    let input = base.saturating_add(operands);
    match m {
        MergeOperator::JsonMergePatch => input.saturating_mul(merge::JSON_GROWTH_MAX),
        _ => input,
    }
}

/// The size of what a local transaction leaves under one key it merges into: where the value
/// was last set (a put, a delete, or its tree created or dropped) and the merges since.
#[derive(Default)]
struct MergedKey {
    /// The op that last set the key and the bytes it left; `None`: the value before the
    /// transaction.
    set_by: Option<(usize, u64)>,
    /// The operator of the merges since (one per version of the tree); `None`: none yet.
    operator: Option<MergeOperator>,
    /// Bytes of their operands, in all.
    operands: u64,
}

impl MergedKey {
    fn set(at: usize, bytes: usize) -> MergedKey {
        MergedKey {
            set_by: Some((at, bytes as u64)),
            ..MergedKey::default()
        }
    }
}

/// The merge operator of each tree as a transaction's ops go: the submitted state, then the
/// transaction's own creations and drops.
struct TreesAsOf<'a> {
    submitted: &'a BTreeMap<String, Option<MergeOperator>>,
    changed: HashMap<&'a str, Option<MergeOperator>>,
}

impl<'a> TreesAsOf<'a> {
    fn new(submitted: &'a BTreeMap<String, Option<MergeOperator>>) -> Self {
        TreesAsOf {
            submitted,
            changed: HashMap::new(),
        }
    }

    fn operator(&self, tree: &str) -> Option<MergeOperator> {
        match self.changed.get(tree) {
            Some(m) => *m,
            None => self.submitted.get(tree).copied().flatten(),
        }
    }

    /// Takes in what `op` does to the trees.
    fn step(&mut self, op: &'a Op) {
        match op {
            Op::CreateTree {
                tree,
                merge_operator,
            } => {
                let m = merge_operator.as_deref().and_then(MergeOperator::from_name);
                self.changed.insert(tree, m);
            }
            Op::DropTree { tree } => {
                self.changed.insert(tree, None);
            }
            _ => {}
        }
    }
}

impl Inner {
    /// Refuses a local transaction whose merges would leave a value over `value_bytes_max`
    /// (`append` and `json-merge-patch`, whose results grow with the stored value): no chunk
    /// could carry it to a replica being bootstrapped, nor an answer to a reader. Merges are
    /// resolved when applied, which must never fail (every node computes the same bytes), so
    /// the size is checked here, where the value before the transaction is the applied one
    /// plus what transactions submitted and not yet applied write to the key: while those
    /// could take it over the limit, the commit is a retryable conflict, exact once they are
    /// applied. Reads the applied value of each key such a merge reaches, nothing otherwise.
    pub(super) fn check_merged_sizes(
        &self,
        st: &CommitState,
        ops: &[Op],
    ) -> Result<(), WriteError> {
        if !ops.iter().any(|o| matches!(o, Op::Merge { .. })) {
            return Ok(());
        }
        let mut trees = TreesAsOf::new(&st.trees);
        let mut keys: HashMap<(&str, &[u8]), MergedKey> = HashMap::new();
        for op in ops {
            if let Op::Merge { tree, key, .. } = op
                && trees.operator(tree).is_some_and(grows_with_value)
            {
                keys.entry((tree, key)).or_default();
            }
            trees.step(op);
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut trees = TreesAsOf::new(&st.trees);
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::CreateTree { tree, .. } | Op::DropTree { tree } => {
                    for (_, k) in keys.iter_mut().filter(|((t, _), _)| *t == tree.as_str()) {
                        *k = MergedKey::set(i, 0);
                    }
                }
                Op::Put {
                    tree, key, value, ..
                } => {
                    if let Some(k) = keys.get_mut(&(tree.as_str(), key.as_slice())) {
                        *k = MergedKey::set(i, value.len());
                    }
                }
                Op::Delete { tree, key, .. } => {
                    if let Some(k) = keys.get_mut(&(tree.as_str(), key.as_slice())) {
                        *k = MergedKey::set(i, 0);
                    }
                }
                Op::Merge { tree, key, operand } => {
                    if let Some(k) = keys.get_mut(&(tree.as_str(), key.as_slice())) {
                        k.operator = trees.operator(tree);
                        k.operands = k.operands.saturating_add(operand.len() as u64);
                    }
                }
                Op::CreateIndex { .. } | Op::DropIndex { .. } => {}
            }
            trees.step(op);
        }
        let max = self.opts.value_bytes_max as u64;
        // Before the catalog, which the applier publishes before it moves `applied`: the
        // catalog read is at least as new as that offset.
        let applied = self.applied.load(Ordering::SeqCst);
        let cat = self.current_catalog();
        for ((tree, key), k) in &keys {
            let Some(m) = k.operator.filter(|m| grows_with_value(*m)) else {
                continue;
            };
            let (base, exact) = match k.set_by {
                Some((_, bytes)) => (bytes, true),
                None => self.bytes_before(st, &cat, applied, tree, key)?,
            };
            let bound = merged_bound(m, base, k.operands);
            if bound <= max {
                continue;
            }
            if !exact {
                return Err(WriteError::Conflict(format!(
                    "merging into key {:?} of tree `{tree}` could leave a value over the limit \
                     of {max} bytes with the writes to that key not yet applied (at most \
                     {bound} bytes); once they are, its size is known",
                    key_text(key)
                )));
            }
            let bytes = match m {
                MergeOperator::Append => bound,
                _ => self.merged_len(&cat, ops, m, k.set_by, tree, key)?,
            };
            if bytes > max {
                return Err(WriteError::ValueTooLarge {
                    bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
                    max: self.opts.value_bytes_max,
                });
            }
        }
        Ok(())
    }

    /// The bytes of `key` of `tree` before a transaction, and whether exact: its applied
    /// value, plus (a bound) all that transactions submitted and not yet applied write to the
    /// key. A conflict when one of those created or dropped the tree.
    fn bytes_before(
        &self,
        st: &CommitState,
        cat: &catalog::Catalog,
        applied: u64,
        tree: &str,
        key: &[u8],
    ) -> Result<(u64, bool), WriteError> {
        let mut pending = 0u64;
        let mut exact = true;
        for e in st.history.iter().rev().take_while(|e| e.offset > applied) {
            if e.trees.iter().any(|t| **t == *tree) {
                return Err(WriteError::Conflict(format!(
                    "tree `{tree}` was created or dropped by the transaction at offset {}, not \
                     yet applied: the size of the value a merge leaves under key {:?} is known \
                     once it is",
                    e.offset,
                    key_text(key)
                )));
            }
            if e.keys.iter().any(|(t, k)| t == tree && k == key) {
                pending = pending.saturating_add(e.written_bytes);
                exact = false;
            }
        }
        let stored = match cat.get(tree) {
            Some(t) => t
                .handle
                .get(key)
                .map_err(|e| self.store_failure(format!("read: {e}")))?
                .map_or(0, |v| v.len() as u64),
            None => 0,
        };
        Ok((stored.saturating_add(pending), exact))
    }

    /// The bytes the merges of `ops` into `key` of `tree` leave, resolved with `m` from where
    /// the key was last set (`set_by`, else its applied value, with no write pending).
    fn merged_len(
        &self,
        cat: &catalog::Catalog,
        ops: &[Op],
        m: MergeOperator,
        set_by: Option<(usize, u64)>,
        tree: &str,
        key: &[u8],
    ) -> Result<u64, WriteError> {
        let stored;
        let (base, from) = match set_by {
            Some((i, _)) => match ops.get(i) {
                Some(Op::Put { value, .. }) => (Some(value.as_slice()), i + 1),
                _ => (None, i + 1),
            },
            None => {
                stored = match cat.get(tree) {
                    Some(t) => t
                        .handle
                        .get(key)
                        .map_err(|e| self.store_failure(format!("read: {e}")))?,
                    None => None,
                };
                (stored.as_deref(), 0)
            }
        };
        let mut value: Option<Vec<u8>> = None;
        for op in ops.iter().skip(from) {
            if let Op::Merge {
                tree: t,
                key: k,
                operand,
            } = op
                && t == tree
                && k == key
            {
                value = Some(m.resolve(value.as_deref().or(base), operand));
            }
        }
        Ok(value.map_or(0, |v| v.len() as u64))
    }
}
