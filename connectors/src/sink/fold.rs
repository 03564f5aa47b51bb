//! What a batch leaves behind, key by key: the shared core of the sinks that store VALUES
//! (PostgreSQL, Redis) rather than the log's changes.
//!
//! A batch is folded into [`Step`]s: runs of per-key final states ([`Run`]) separated by the
//! operations that touch a whole range or tree (a bootstrap chunk's range, a tree dropped),
//! which a sink must apply in order between the runs. Within a run, a later op on a key
//! replaces an earlier one, and a merge on a key whose value the batch already set is resolved
//! here; a merge on a key the batch has not set needs the value the sink holds, so the run
//! lists it as [`Final::Merges`] (operands in order, each with its operator) and the sink
//! reads the stored value in the same transaction as its write and resolves them with
//! [`Final::resolve`].
//!
//! Merge operators: a tree's operator comes from the stream (`create_tree`, a bootstrap
//! chunk) or, for trees that existed before the pipeline started, from the source node's
//! `status` (handed over by [`Operators::learn_from_source`], at the start and again before a
//! write holds). A merge on a tree whose operator is unknown is never guessed: when the batch
//! drops the tree after it, the merge leaves nothing (the drop removes the tree's rows, as it
//! did at the source); otherwise the batch is refused with a `Hold` error. A merge needs its
//! tree to have an operator when it is written, so a tree whose operator the source's status
//! does not name even when read again was dropped (or created again without one) after the
//! merge, and its drop comes later in the stream.
//!
//! Owns: folding and operator bookkeeping. Must never: do I/O.

use std::collections::{BTreeMap, HashMap};

use tideline_engine::MergeOperator;
use tideline_wal::Op;

use crate::sink::{Batch, CopyRecord, Item, SinkError};

/// A key's state after a run of ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Final {
    /// Set to this value (`None`: deleted).
    Value(Option<Vec<u8>>),
    /// The stored value (unknown here) with these merges applied in order.
    Merges(Vec<(MergeOperator, Vec<u8>)>),
}

impl Final {
    /// The value after this state, given the value the sink holds (`stored`).
    pub(crate) fn resolve(&self, stored: Option<&[u8]>) -> Option<Vec<u8>> {
        match self {
            Final::Value(v) => v.clone(),
            Final::Merges(ms) => {
                let mut cur = stored.map(<[u8]>::to_vec);
                for (op, operand) in ms {
                    cur = Some(op.resolve(cur.as_deref(), operand));
                }
                cur
            }
        }
    }
}

/// One tree's key states in a run; `BTreeMap` so that statements touch rows in key order
/// (two pipelines writing one table then lock rows in the same order).
pub(crate) type TreeRun = BTreeMap<Vec<u8>, Final>;

/// Per-key states of several trees, in the order trees first appeared.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) trees: Vec<(String, TreeRun)>,
}

impl Run {
    fn tree(&mut self, tree: &str) -> &mut TreeRun {
        let i = match self.trees.iter().position(|(t, _)| t == tree) {
            Some(i) => i,
            None => {
                self.trees.push((tree.to_owned(), TreeRun::new()));
                self.trees.len() - 1
            }
        };
        &mut self.trees[i].1
    }

    fn is_empty(&self) -> bool {
        self.trees.is_empty()
    }
}

/// One step a sink applies, in order.
#[derive(Debug)]
pub(crate) enum Step {
    /// Make sure `tree`'s destination exists (a table). Comes before any [`Step::Run`] that
    /// writes the tree in the same batch.
    Create(String),
    /// Per-key final states.
    Run(Run),
    /// Remove `[from, to)` of `tree` (`to: None`: to its end); a bootstrap chunk's rows follow
    /// in the next run.
    ClearRange {
        /// Tree.
        tree: String,
        /// First key.
        from: Vec<u8>,
        /// End, exclusive.
        to: Option<Vec<u8>>,
    },
    /// The tree was dropped at the source.
    Drop(String),
}

/// The merge operators the sink knows, tree by tree.
#[derive(Debug, Default, Clone)]
pub(crate) struct Operators {
    by_tree: HashMap<String, Option<MergeOperator>>,
    /// Operators the source's status names that this build does not know, by tree.
    unknown_names: HashMap<String, String>,
}

impl Operators {
    /// Learns the source's operators as its `status` reports them (when the pipeline starts,
    /// and again before a write holds). What the stream said wins: a tree the sink knows
    /// keeps its operator. For a tree it does not know, the operator the source names now is
    /// the one its merges were written with, or the tree was dropped and created again after
    /// them, and the drop that follows removes what they left.
    pub(crate) fn learn_from_source(&mut self, operators: &BTreeMap<String, String>) {
        for (tree, name) in operators {
            match MergeOperator::from_name(name) {
                Some(op) => {
                    self.by_tree.entry(tree.clone()).or_insert(Some(op));
                }
                None => {
                    self.unknown_names.insert(tree.clone(), name.clone());
                }
            }
        }
    }

    /// Whether `tree` has a merge operator as far as the sink knows.
    pub(crate) fn merges(&self, tree: &str) -> bool {
        matches!(self.by_tree.get(tree), Some(Some(_)))
    }

    fn set(&mut self, tree: &str, name: Option<&str>) -> Result<(), SinkError> {
        let op = match name {
            None => None,
            Some(n) => Some(MergeOperator::from_name(n).ok_or_else(|| {
                SinkError::Hold(format!(
                    "tree `{tree}` uses the merge operator `{n}`, which this tideline does not \
                     know; upgrade the connector to the source's version"
                ))
            })?),
        };
        self.by_tree.insert(tree.to_owned(), op);
        Ok(())
    }

    /// `tree`'s operator, for a merge in a copy's step (`copying`) or in a batch of the log.
    fn get(&self, tree: &str, copying: bool) -> Result<MergeOperator, SinkError> {
        match self.by_tree.get(tree) {
            Some(Some(op)) => Ok(*op),
            Some(None) => Err(SinkError::Hold(format!(
                "a merge on tree `{tree}`, which has no merge operator at the source as far as \
                 this pipeline saw; restart the connector so that it reads the source's trees \
                 again"
            ))),
            None if self.unknown_names.contains_key(tree) => Err(SinkError::Hold(format!(
                "tree `{tree}` uses the merge operator `{}`, which this tideline does not know; \
                 upgrade the connector to the source's version",
                self.unknown_names[tree]
            ))),
            // The pipeline hands the sink the source's operators again before it holds: the
            // source names none for the tree now.
            None => {
                let remedy = if copying {
                    "this step of the copy ends before the drop. To go on, start the pipeline \
                     over"
                } else {
                    "this batch ends before the drop. To go on, restart the connector with \
                     `batch_changes` and `batch_delay_ms` large enough for one batch to reach \
                     the drop (and `ops`, if set, including `drop_tree`), or start the pipeline \
                     over"
                };
                Err(SinkError::Hold(format!(
                    "a merge on tree `{tree}`, for which the source's status names no merge \
                     operator: a merge needs one, so the source dropped `{tree}` after this \
                     merge (and may have created it again without one), and {remedy}: clear \
                     the sink's position and what the pipeline wrote (docs/OPERATIONS.md, \
                     \"Pipelines and sinks\")"
                )))
            }
        }
    }
}

/// Folds `batch` into steps, learning operators from it.
pub(crate) fn fold(batch: &Batch, operators: &mut Operators) -> Result<Vec<Step>, SinkError> {
    let mut f = Folder {
        steps: Vec::new(),
        run: Run::default(),
        operators,
        batch,
        at: 0,
        drops: None,
    };
    for item in &batch.items {
        match item {
            Item::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
            } => {
                f.operators.set(tree, merge_operator.as_deref())?;
                f.flush();
                f.steps.push(Step::Create(tree.clone()));
                f.steps.push(Step::ClearRange {
                    tree: tree.clone(),
                    from: from.clone(),
                    to: to.clone(),
                });
                let rows = f.run.tree(tree);
                for (k, v) in entries {
                    rows.insert(k.to_vec(), Final::Value(Some(v.to_vec())));
                }
            }
            Item::Txn(_) | Item::Record(_) | Item::Ops(_) => {
                let copying = !matches!(item, Item::Txn(_));
                for op in item_ops(item) {
                    f.at += 1;
                    f.op(op, copying)?;
                }
            }
        }
    }
    f.flush();
    Ok(f.steps)
}

/// The ops of a batch's item, in order (a chunk has none: it holds rows).
fn item_ops(item: &Item) -> &[Op] {
    match item {
        Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => &t.ops,
        Item::Ops(ops) => ops,
        Item::Chunk { .. } => &[],
    }
}

/// One fold in progress.
struct Folder<'b, 'o> {
    steps: Vec<Step>,
    run: Run,
    operators: &'o mut Operators,
    batch: &'b Batch,
    /// Ordinal of the op being folded (1 for the batch's first op).
    at: usize,
    /// Each dropped tree's last `drop_tree` in the batch, by ordinal; found when a merge first
    /// needs it.
    drops: Option<HashMap<&'b str, usize>>,
}

impl Folder<'_, '_> {
    fn flush(&mut self) {
        if !self.run.is_empty() {
            self.steps.push(Step::Run(std::mem::take(&mut self.run)));
        }
    }

    /// Whether the batch drops `tree` after the op being folded.
    fn dropped_later(&mut self, tree: &str) -> bool {
        let batch = self.batch;
        let drops = self.drops.get_or_insert_with(|| {
            batch
                .items
                .iter()
                .flat_map(item_ops)
                .enumerate()
                .filter_map(|(i, op)| match op {
                    Op::DropTree { tree } => Some((tree.as_str(), i + 1)),
                    _ => None,
                })
                .collect()
        });
        drops.get(tree).is_some_and(|&d| d > self.at)
    }

    fn op(&mut self, op: &Op, copying: bool) -> Result<(), SinkError> {
        match op {
            Op::Put {
                tree, key, value, ..
            } => {
                self.run
                    .tree(tree)
                    .insert(key.clone(), Final::Value(Some(value.clone())));
            }
            Op::Delete { tree, key, .. } => {
                self.run.tree(tree).insert(key.clone(), Final::Value(None));
            }
            Op::Merge { tree, key, operand } => {
                let m = match self.operators.get(tree, copying) {
                    Ok(m) => m,
                    // The batch drops the tree after this merge, and the drop removes every row
                    // of it (whatever a run before it wrote): the merge has nothing to store,
                    // and its operator does not matter.
                    Err(_) if self.dropped_later(tree) => return Ok(()),
                    Err(e) => return Err(e),
                };
                let rows = self.run.tree(tree);
                match rows.get_mut(key) {
                    Some(Final::Value(v)) => {
                        *v = Some(m.resolve(v.as_deref(), operand));
                    }
                    Some(Final::Merges(ms)) => ms.push((m, operand.clone())),
                    None => {
                        rows.insert(key.clone(), Final::Merges(vec![(m, operand.clone())]));
                    }
                }
            }
            Op::CreateTree {
                tree,
                merge_operator,
            } => {
                self.operators.set(tree, merge_operator.as_deref())?;
                self.flush();
                self.steps.push(Step::Create(tree.clone()));
            }
            Op::DropTree { tree } => {
                self.flush();
                self.steps.push(Step::Drop(tree.clone()));
            }
            // Secondary indexes live in the node; a sink of values has nothing to do for them.
            Op::CreateIndex { .. } | Op::DropIndex { .. } => {}
        }
        Ok(())
    }
}

/// The trees a run writes, for sinks that create destinations before writing. The pipeline
/// can start after a tree's `create_tree`, so a sink must not rely on seeing it.
pub(crate) fn run_trees(run: &Run) -> impl Iterator<Item = &str> {
    run.trees.iter().map(|(t, _)| t.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tideline_wal::{Gtid, Offset, Transaction};

    fn txn(ops: Vec<Op>) -> Item {
        Item::Txn(Transaction {
            offset: Offset::new(1).unwrap(),
            gtid: Gtid::new(uuid::Uuid::nil(), 1).unwrap(),
            timestamp_us: 0,
            ops,
        })
    }

    fn batch(items: Vec<Item>) -> Batch {
        Batch {
            source: uuid::Uuid::nil(),
            items,
            checkpoint: vec![],
        }
    }

    fn merge(tree: &str, key: &str, operand: &str) -> Op {
        Op::Merge {
            tree: tree.into(),
            key: key.into(),
            operand: operand.into(),
        }
    }

    #[test]
    fn merges_resolve_on_values_the_batch_set_and_wait_for_stored_ones() {
        let mut ops = Operators::default();
        let b = batch(vec![
            txn(vec![Op::CreateTree {
                tree: "c".into(),
                merge_operator: Some("add".into()),
            }]),
            txn(vec![
                Op::Put {
                    tree: "c".into(),
                    key: b"a".to_vec(),
                    value: b"5".to_vec(),
                    before: None,
                },
                merge("c", "a", "2"),
                merge("c", "b", "3"),
                merge("c", "b", "4"),
            ]),
        ]);
        let steps = fold(&b, &mut ops).unwrap();
        assert!(matches!(&steps[0], Step::Create(t) if t == "c"));
        let Step::Run(run) = &steps[1] else {
            panic!("{steps:?}")
        };
        let rows = &run.trees[0].1;
        assert_eq!(rows[&b"a".to_vec()], Final::Value(Some(b"7".to_vec())));
        assert_eq!(
            rows[&b"b".to_vec()].resolve(Some(b"10")),
            Some(b"17".to_vec())
        );
        assert_eq!(rows[&b"b".to_vec()].resolve(None), Some(b"7".to_vec()));
    }

    #[test]
    fn a_merge_on_a_tree_of_unknown_operator_is_held_not_guessed() {
        let mut ops = Operators::default();
        let e = fold(&batch(vec![txn(vec![merge("x", "k", "1")])]), &mut ops).unwrap_err();
        assert!(matches!(&e, SinkError::Hold(m) if m.contains("`x`")), "{e}");
        ops.learn_from_source(&BTreeMap::from([("x".into(), "max".into())]));
        let steps = fold(&batch(vec![txn(vec![merge("x", "k", "1")])]), &mut ops).unwrap();
        let Step::Run(run) = &steps[0] else { panic!() };
        assert_eq!(
            run.trees[0].1[&b"k".to_vec()].resolve(Some(b"9")),
            Some(b"9".to_vec())
        );
    }

    /// The source merged into tree `c` and then dropped it while the pipeline was down, so
    /// its `status` no longer names `c`'s operator, but the stream from the stored position
    /// still carries the merge before the drop. The drop in the same batch removes whatever
    /// the merge would have left, as it did at the source: the batch is stored (the sink ends
    /// with no row of `c`), never held for good; a tree of that name created again after the
    /// drop resolves its own merges with its own operator.
    #[test]
    fn a_merge_on_a_tree_the_batch_then_drops_needs_no_operator() {
        let mut ops = Operators::default();
        let b = batch(vec![
            txn(vec![
                Op::Put {
                    tree: "c".into(),
                    key: b"j".to_vec(),
                    value: b"4".to_vec(),
                    before: None,
                },
                merge("c", "k", "1"),
                merge("c", "j", "1"),
            ]),
            txn(vec![Op::DropTree { tree: "c".into() }]),
            txn(vec![Op::CreateTree {
                tree: "c".into(),
                merge_operator: Some("add".into()),
            }]),
            txn(vec![merge("c", "k", "2")]),
        ]);
        let steps = fold(&b, &mut ops).expect("the drop settles the merges: nothing to hold");
        // Whatever a run writes of `c` before the drop, the drop removes; after it, `c` holds
        // only what the re-created tree's ops leave.
        let drop_at = steps
            .iter()
            .position(|s| matches!(s, Step::Drop(t) if t == "c"))
            .unwrap_or_else(|| panic!("no drop of `c`: {steps:?}"));
        let after: Vec<_> = steps[drop_at + 1..]
            .iter()
            .filter_map(|s| match s {
                Step::Run(run) => Some(run),
                _ => None,
            })
            .flat_map(|run| run.trees.iter())
            .filter(|(t, _)| t == "c")
            .flat_map(|(_, rows)| rows.iter())
            .map(|(k, f)| (k.clone(), f.resolve(None)))
            .collect();
        assert_eq!(after, [(b"k".to_vec(), Some(b"2".to_vec()))], "{steps:?}");

        // Without the drop in the batch, the merge is held, and the message says what an
        // operator can do (not "restart once the source reports the tree": it never will).
        let mut ops = Operators::default();
        let e = fold(&batch(vec![txn(vec![merge("c", "k", "1")])]), &mut ops).unwrap_err();
        let SinkError::Hold(m) = &e else {
            panic!("{e}")
        };
        assert!(
            m.contains("`c`") && m.contains("batch_changes") && m.contains("position"),
            "{m}"
        );
        // An operator the source names but this build does not know is not a dropped tree.
        ops.learn_from_source(&BTreeMap::from([("u".into(), "zeta".into())]));
        let e = fold(&batch(vec![txn(vec![merge("u", "k", "1")])]), &mut ops).unwrap_err();
        assert!(
            matches!(&e, SinkError::Hold(m) if m.contains("`zeta`") && m.contains("upgrade")),
            "{e}"
        );
    }

    #[test]
    fn a_chunk_clears_its_range_before_its_rows_and_drops_split_runs() {
        let mut ops = Operators::default();
        let b = batch(vec![
            txn(vec![Op::Put {
                tree: "t".into(),
                key: b"z".to_vec(),
                value: b"1".to_vec(),
                before: None,
            }]),
            Item::Chunk {
                tree: "t".into(),
                merge_operator: None,
                from: b"a".to_vec(),
                to: Some(b"m".to_vec()),
                entries: tideline_wal::PackedEntries::from_pairs(vec![(
                    b"b".to_vec(),
                    b"2".to_vec(),
                )])
                .unwrap(),
            },
            txn(vec![Op::DropTree { tree: "t".into() }]),
        ]);
        let steps = fold(&b, &mut ops).unwrap();
        let kinds: Vec<&str> = steps
            .iter()
            .map(|s| match s {
                Step::Create(_) => "create",
                Step::Run(_) => "run",
                Step::ClearRange { .. } => "clear",
                Step::Drop(_) => "drop",
            })
            .collect();
        assert_eq!(kinds, ["run", "create", "clear", "run", "drop"]);
    }
}
