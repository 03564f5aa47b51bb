//! Serializable multi-key transactions (optimistic concurrency control).
//!
//! A transaction reads one snapshot, taken at its first read, plus its own writes. Writes
//! are buffered. On commit the engine checks, under its commit lock, that no transaction
//! submitted after the snapshot wrote a key (or a key inside a range, or the tree) that this
//! one read; if one did, the commit fails with a retryable [`WriteError::Conflict`] and
//! nothing is written. Transactions that only write (blind puts, deletes, merges) never
//! conflict. Merges are blind too: they are logged as operands and resolved when applied.
//!
//! Two reads are easy to miss and are recorded all the same: reads of a tree this transaction
//! creates (they assume the tree starts empty: if another transaction creates it first, the
//! commit conflicts instead of silently dropping the creation), and reads made through the raw
//! snapshot ([`Txn::snapshot`], which counts as a read of everything).

use std::collections::{BTreeMap, HashMap};
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use tideline_wal::Op;

use crate::catalog::{self, Catalog, DEFAULT_TREE};
use crate::error::WriteError;
use crate::merge::{self, MergeOperator};
use crate::snapshot::{KeyValue, Snapshot, owned_bounds};
use crate::state::{CommitInfo, Inner, check_kv};

/// Something a transaction read, checked for conflicts on commit.
#[derive(Debug, Clone)]
pub(crate) enum ReadItem {
    Key {
        tree: String,
        key: Vec<u8>,
    },
    Range {
        tree: String,
        lo: Bound<Vec<u8>>,
        hi: Bound<Vec<u8>>,
    },
    /// Everything in the snapshot: what [`Txn::snapshot`] hands out is read without the
    /// transaction seeing which keys, so any write after the snapshot conflicts.
    All,
}

impl ReadItem {
    /// Whether this read covers (part of) `tree`.
    pub(crate) fn covers_tree(&self, name: &str) -> bool {
        match self {
            ReadItem::Key { tree, .. } | ReadItem::Range { tree, .. } => tree == name,
            ReadItem::All => true,
        }
    }
}

/// Indices into a transaction's ops of the writes to each (tree, key), in order.
type WriteIndex = BTreeMap<(String, Vec<u8>), Vec<usize>>;

/// A transaction in progress. Obtain one from [`Engine::begin`](crate::Engine::begin) or, with
/// automatic retries, [`Engine::transaction`](crate::Engine::transaction). Dropping it without
/// [`Txn::commit`] discards it.
pub struct Txn<'e> {
    inner: &'e Inner,
    snap: Option<Snapshot>,
    ops: Vec<Op>,
    /// Indices into `ops` of the writes to each (tree, key), in order; built at the first
    /// read, so write-only transactions never pay for it.
    writes: Option<WriteIndex>,
    /// The engine's catalog when this transaction first wrote (writes are checked against
    /// it early, and again at commit against every submitted transaction).
    catalog: Option<Arc<Catalog>>,
    reads: Vec<ReadItem>,
    /// Values read from the snapshot, by (tree, key).
    read_values: HashMap<(String, Vec<u8>), Option<Vec<u8>>>,
    /// Trees created (`Some(operator)`) or dropped (`None`) by this transaction.
    trees: BTreeMap<String, Option<Option<MergeOperator>>>,
}

impl std::fmt::Debug for Txn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("ops", &self.ops.len())
            .field("reads", &self.reads.len())
            .field("snapshot", &self.snap)
            .finish_non_exhaustive()
    }
}

/// What a tree is, seen from inside a transaction.
enum TreeState {
    /// Exists in the snapshot / catalog, with this operator.
    Existing(Option<MergeOperator>),
    /// Created by this transaction: starts empty.
    Created(Option<MergeOperator>),
    /// `default` before anything created it: empty, created on first write.
    ImplicitDefault,
}

impl<'e> Txn<'e> {
    pub(crate) fn new(inner: &'e Inner) -> Txn<'e> {
        Txn {
            inner,
            snap: None,
            ops: Vec::new(),
            writes: None,
            catalog: None,
            reads: Vec::new(),
            read_values: HashMap::new(),
            trees: BTreeMap::new(),
        }
    }

    /// The snapshot this transaction reads, taken now if it has not read yet. It does not
    /// show this transaction's own writes.
    ///
    /// The transaction cannot see which keys are read through the returned snapshot, so
    /// calling this counts as reading *everything*: the commit then conflicts with any
    /// transaction submitted after the snapshot. Prefer [`Txn::get`], [`Txn::range`] and
    /// [`Txn::prefix`], which record exactly what they read.
    pub fn snapshot(&mut self) -> &Snapshot {
        if !self.reads.iter().any(|r| matches!(r, ReadItem::All)) {
            self.reads.push(ReadItem::All);
        }
        self.snap()
    }

    /// The snapshot, taken now if needed; reads through it must be recorded by the caller.
    fn snap(&mut self) -> &Snapshot {
        if self.snap.is_none() {
            self.snap = Some(self.inner.snapshot());
        }
        self.snap
            .as_ref()
            .unwrap_or_else(|| unreachable!("set just above"))
    }

    /// The tree as writes see it: local changes, else the engine's latest catalog (checked
    /// again at commit against every submitted transaction).
    fn tree_for_write(&mut self, tree: &str) -> Result<TreeState, WriteError> {
        match self.trees.get(tree) {
            Some(Some(m)) => return Ok(TreeState::Created(*m)),
            Some(None) => return Err(WriteError::UnknownTree(tree.to_string())),
            None => {}
        }
        let catalog = self
            .catalog
            .get_or_insert_with(|| self.inner.current_catalog());
        match catalog.get(tree) {
            Some(t) => Ok(TreeState::Existing(t.merge)),
            None if tree == DEFAULT_TREE => Ok(TreeState::ImplicitDefault),
            None => Err(WriteError::UnknownTree(tree.to_string())),
        }
    }

    /// The tree as reads see it: local changes, else the snapshot's catalog.
    fn tree_for_read(&mut self, tree: &str) -> Result<TreeState, WriteError> {
        match self.trees.get(tree) {
            Some(Some(m)) => return Ok(TreeState::Created(*m)),
            Some(None) => return Err(WriteError::UnknownTree(tree.to_string())),
            None => {}
        }
        let snap = self.snap();
        match snap.tree(tree)? {
            Some(t) => Ok(TreeState::Existing(t.merge)),
            None => Ok(TreeState::ImplicitDefault),
        }
    }

    fn push_write(&mut self, tree: &str, key: &[u8], op: Op) {
        if let Some(w) = &mut self.writes {
            w.entry((tree.to_string(), key.to_vec()))
                .or_default()
                .push(self.ops.len());
        }
        self.ops.push(op);
    }

    /// Builds the index of own writes if a read needs it.
    fn index_writes(&mut self) {
        if self.writes.is_some() {
            return;
        }
        let mut w = WriteIndex::new();
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Put { tree, key, .. }
                | Op::Delete { tree, key, .. }
                | Op::Merge { tree, key, .. } => {
                    w.entry((tree.clone(), key.clone())).or_default().push(i);
                }
                Op::DropTree { tree } => w.retain(|(t, _), _| t != tree),
                Op::CreateTree { .. } | Op::CreateIndex { .. } | Op::DropIndex { .. } => {}
            }
        }
        self.writes = Some(w);
    }

    fn own_writes(&self, tree: &str, key: &[u8]) -> Option<&Vec<usize>> {
        self.writes.as_ref()?.get(&(tree.to_string(), key.to_vec()))
    }

    /// Sets `key` in `tree` to `value`.
    pub fn put(&mut self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), WriteError> {
        check_kv(&self.inner.opts, tree, key, Some(value))?;
        self.tree_for_write(tree)?;
        let op = Op::Put {
            tree: tree.to_string(),
            key: key.to_vec(),
            value: value.to_vec(),
            before: None,
        };
        self.push_write(tree, key, op);
        Ok(())
    }

    /// Removes `key` from `tree`.
    pub fn delete(&mut self, tree: &str, key: &[u8]) -> Result<(), WriteError> {
        check_kv(&self.inner.opts, tree, key, None)?;
        self.tree_for_write(tree)?;
        let op = Op::Delete {
            tree: tree.to_string(),
            key: key.to_vec(),
            before: None,
        };
        self.push_write(tree, key, op);
        Ok(())
    }

    /// Merges `operand` into `key` with the tree's merge operator (blind: no read, no
    /// conflict). A malformed operand is refused here, before anything is logged.
    pub fn merge(&mut self, tree: &str, key: &[u8], operand: &[u8]) -> Result<(), WriteError> {
        check_kv(&self.inner.opts, tree, key, Some(operand))?;
        let m = match self.tree_for_write(tree)? {
            TreeState::Existing(m) | TreeState::Created(m) => m,
            TreeState::ImplicitDefault => None,
        }
        .ok_or_else(|| WriteError::NoMergeOperator(tree.to_string()))?;
        m.check_operand(operand)
            .map_err(|reason| WriteError::BadOperand {
                tree: tree.to_string(),
                operator: m.name().into(),
                reason,
            })?;
        let op = Op::Merge {
            tree: tree.to_string(),
            key: key.to_vec(),
            operand: operand.to_vec(),
        };
        self.push_write(tree, key, op);
        Ok(())
    }

    /// Creates `tree` with an optional merge operator (by name). Creating a tree that exists
    /// with the same operator does nothing.
    pub fn create_tree(
        &mut self,
        tree: &str,
        merge_operator: Option<&str>,
    ) -> Result<(), WriteError> {
        if !catalog::is_valid_tree_name(tree) {
            return Err(WriteError::BadTreeName(tree.to_string()));
        }
        let m = match merge_operator {
            None => None,
            Some(n) => Some(MergeOperator::from_name(n).ok_or_else(|| {
                WriteError::UnknownMergeOperator {
                    name: n.to_string(),
                    known: merge::known_operators(),
                }
            })?),
        };
        match self.tree_for_write(tree) {
            Ok(TreeState::Existing(e) | TreeState::Created(e)) => {
                if e == m {
                    return Ok(());
                }
                return Err(WriteError::TreeExists {
                    tree: tree.to_string(),
                    existing: e.map_or("none".into(), |e| e.name().into()),
                });
            }
            Ok(TreeState::ImplicitDefault) | Err(WriteError::UnknownTree(_)) => {}
            Err(e) => return Err(e),
        }
        self.ops.push(Op::CreateTree {
            tree: tree.to_string(),
            merge_operator: m.map(|m| m.name().to_string()),
        });
        self.trees.insert(tree.to_string(), Some(m));
        Ok(())
    }

    /// Adds an op that touches no key (an index definition), checked at commit.
    pub(crate) fn push_op(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// Drops `tree` and everything in it.
    pub fn drop_tree(&mut self, tree: &str) -> Result<(), WriteError> {
        match self.tree_for_write(tree)? {
            TreeState::Existing(_) | TreeState::Created(_) => {}
            TreeState::ImplicitDefault => return Err(WriteError::UnknownTree(tree.to_string())),
        }
        self.ops.push(Op::DropTree {
            tree: tree.to_string(),
        });
        self.trees.insert(tree.to_string(), None);
        if let Some(w) = &mut self.writes {
            w.retain(|(t, _), _| t != tree);
        }
        // The values read from the dropped tree are no before-images of writes to a tree of
        // the same name created later in this transaction (it starts empty). The reads stay
        // in `reads`, checked at commit.
        self.read_values.retain(|(t, _), _| t != tree);
        Ok(())
    }

    /// The value of `key` in `tree`: the snapshot's, with this transaction's own writes on top.
    pub fn get(&mut self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, WriteError> {
        self.index_writes();
        let (base, merge) = match self.tree_for_read(tree)? {
            TreeState::Created(m) => {
                // "Absent: the tree is new" is a read too: see `read_created`.
                self.read_created(ReadItem::Key {
                    tree: tree.to_string(),
                    key: key.to_vec(),
                });
                (None, m)
            }
            TreeState::ImplicitDefault => (self.read_base(tree, key)?, None),
            TreeState::Existing(m) => (self.read_base(tree, key)?, m),
        };
        Ok(self.fold_own_writes(tree, key, base, merge))
    }

    /// Records a read of a tree this transaction creates. The commit conflicts if another
    /// transaction created the tree first (the creation is then dropped, and the tree is not
    /// the empty one this read saw); a snapshot is taken so that the read is also checked
    /// against every transaction submitted after it.
    fn read_created(&mut self, item: ReadItem) {
        self.snap();
        self.reads.push(item);
    }

    fn read_base(&mut self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, WriteError> {
        let slot = (tree.to_string(), key.to_vec());
        if let Some(v) = self.read_values.get(&slot) {
            return Ok(v.clone());
        }
        let v = self.snap().get(tree, key)?;
        self.reads.push(ReadItem::Key {
            tree: tree.to_string(),
            key: key.to_vec(),
        });
        self.read_values.insert(slot, v.clone());
        Ok(v)
    }

    fn fold_own_writes(
        &self,
        tree: &str,
        key: &[u8],
        base: Option<Vec<u8>>,
        merge: Option<MergeOperator>,
    ) -> Option<Vec<u8>> {
        let Some(idx) = self.own_writes(tree, key) else {
            return base;
        };
        let mut v = base;
        for &i in idx {
            match &self.ops[i] {
                Op::Put { value, .. } => v = Some(value.clone()),
                Op::Delete { .. } => v = None,
                Op::Merge { operand, .. } => {
                    v = Some(match merge {
                        Some(m) => m.resolve(v.as_deref(), operand),
                        None => operand.clone(),
                    })
                }
                Op::CreateTree { .. }
                | Op::DropTree { .. }
                | Op::CreateIndex { .. }
                | Op::DropIndex { .. } => {}
            }
        }
        v
    }

    /// Up to `limit` key-value pairs of `tree` in `range` (ascending, or descending with
    /// `reverse`), as the snapshot holds them with this transaction's writes on top. The
    /// whole range counts as read: a concurrent write anywhere in it is a conflict.
    pub fn range<K: AsRef<[u8]>>(
        &mut self,
        tree: &str,
        range: impl RangeBounds<K>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, WriteError> {
        let Some((lo, hi)) = owned_bounds(&range) else {
            return Ok(Vec::new());
        };
        self.index_writes();
        let state = self.tree_for_read(tree)?;
        let merge = match state {
            TreeState::Existing(m) | TreeState::Created(m) => m,
            TreeState::ImplicitDefault => None,
        };
        let own: Vec<Vec<u8>> = self
            .writes
            .as_ref()
            .map(|w| {
                w.range((
                    map_bound(&lo, |k| (tree.to_string(), k.clone())),
                    map_bound(&hi, |k| (tree.to_string(), k.clone())),
                ))
                .filter(|((t, _), _)| t == tree)
                .map(|((_, k), _)| k.clone())
                .collect()
            })
            .unwrap_or_default();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let item = ReadItem::Range {
            tree: tree.to_string(),
            lo: lo.clone(),
            hi: hi.clone(),
        };
        if matches!(state, TreeState::Created(_)) {
            self.read_created(item);
        } else {
            self.reads.push(item);
            // Own deletes can hide at most `own.len()` pairs of the snapshot.
            let want = limit.saturating_add(own.len());
            for kv in self.snap().range(tree, (lo, hi), reverse)?.take(want) {
                let (k, v) = kv?;
                merged.insert(k, v);
            }
        }
        for k in own {
            let base = match state {
                TreeState::Created(_) => None,
                _ => self.read_base(tree, &k)?,
            };
            match self.fold_own_writes(tree, &k, base, merge) {
                Some(v) => merged.insert(k, v),
                None => merged.remove(&k),
            };
        }
        let out: Vec<KeyValue> = if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        };
        Ok(out)
    }

    /// Up to `limit` pairs of `tree` whose key starts with `prefix`; see [`Txn::range`].
    pub fn prefix(
        &mut self,
        tree: &str,
        prefix: &[u8],
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, WriteError> {
        let hi = match prefix_end(prefix) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        self.range(tree, (Bound::Included(prefix.to_vec()), hi), reverse, limit)
    }

    /// Commits: returns where the transaction was logged once it is durable (under sync
    /// durability) and visible to every later read, or `None` if it wrote nothing. On
    /// [`WriteError::Conflict`] nothing was written; run the transaction again.
    pub fn commit(mut self) -> Result<Option<CommitInfo>, WriteError> {
        if self.ops.is_empty() {
            // Read-only: serializable at its snapshot, nothing to check.
            return Ok(None);
        }
        // Record before-images where this transaction read the key from its snapshot and
        // the write is the first to that key: the commit check makes the read current.
        let writes = if self.read_values.is_empty() {
            None
        } else {
            self.index_writes();
            self.writes.take()
        };
        for ((tree, key), idx) in writes.iter().flatten() {
            let Some(&first) = idx.first() else { continue };
            if let Some(before) = self.read_values.get(&(tree.clone(), key.clone())) {
                match &mut self.ops[first] {
                    Op::Put { before: b, .. } | Op::Delete { before: b, .. } => {
                        b.clone_from(before);
                    }
                    _ => {}
                }
            }
        }
        let reads = self.snap.as_ref().map(|s| s.at());
        let ops = std::mem::take(&mut self.ops);
        self.inner
            .commit_txn(ops, reads.map(|s| (s, self.reads.as_slice())))
    }
}

fn map_bound<T, U>(b: &Bound<T>, f: impl Fn(&T) -> U) -> Bound<U> {
    match b {
        Bound::Included(x) => Bound::Included(f(x)),
        Bound::Excluded(x) => Bound::Excluded(f(x)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key greater than every key starting with `prefix`; `None` if there is none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
