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
//! `status` (handed over by [`Operators::learn_from_source`]). A merge on a tree whose
//! operator is unknown is refused with a `Hold` error rather than stored wrongly.
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
}

impl Operators {
    /// Learns the source's operators as its `status` reported them when the pipeline started.
    /// What the stream says later wins.
    pub(crate) fn learn_from_source(&mut self, operators: &BTreeMap<String, String>) {
        for (tree, name) in operators {
            if let Some(op) = MergeOperator::from_name(name) {
                self.by_tree.entry(tree.clone()).or_insert(Some(op));
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

    fn get(&self, tree: &str) -> Result<MergeOperator, SinkError> {
        match self.by_tree.get(tree) {
            Some(Some(op)) => Ok(*op),
            Some(None) => Err(SinkError::Hold(format!(
                "a merge on tree `{tree}`, which has no merge operator at the source as far as \
                 this pipeline saw; restart the connector so that it reads the source's trees \
                 again"
            ))),
            None => Err(SinkError::Hold(format!(
                "a merge on tree `{tree}`, whose merge operator this pipeline does not know (the \
                 source's status did not name it); restart the connector once the source \
                 reports the tree"
            ))),
        }
    }
}

/// Folds `batch` into steps, learning operators from it.
pub(crate) fn fold(batch: &Batch, operators: &mut Operators) -> Result<Vec<Step>, SinkError> {
    let mut steps = Vec::new();
    let mut run = Run::default();
    let flush = |run: &mut Run, steps: &mut Vec<Step>| {
        if !run.is_empty() {
            steps.push(Step::Run(std::mem::take(run)));
        }
    };
    for item in &batch.items {
        match item {
            Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => {
                for op in &t.ops {
                    fold_op(op, &mut run, &mut steps, operators, flush)?;
                }
            }
            Item::Ops(ops) => {
                for op in ops {
                    fold_op(op, &mut run, &mut steps, operators, flush)?;
                }
            }
            Item::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
            } => {
                operators.set(tree, merge_operator.as_deref())?;
                flush(&mut run, &mut steps);
                steps.push(Step::Create(tree.clone()));
                steps.push(Step::ClearRange {
                    tree: tree.clone(),
                    from: from.clone(),
                    to: to.clone(),
                });
                let rows = run.tree(tree);
                for (k, v) in entries {
                    rows.insert(k.to_vec(), Final::Value(Some(v.to_vec())));
                }
            }
        }
    }
    flush(&mut run, &mut steps);
    Ok(steps)
}

fn fold_op(
    op: &Op,
    run: &mut Run,
    steps: &mut Vec<Step>,
    operators: &mut Operators,
    flush: impl Fn(&mut Run, &mut Vec<Step>),
) -> Result<(), SinkError> {
    match op {
        Op::Put {
            tree, key, value, ..
        } => {
            run.tree(tree)
                .insert(key.clone(), Final::Value(Some(value.clone())));
        }
        Op::Delete { tree, key, .. } => {
            run.tree(tree).insert(key.clone(), Final::Value(None));
        }
        Op::Merge { tree, key, operand } => {
            let m = operators.get(tree)?;
            let rows = run.tree(tree);
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
            operators.set(tree, merge_operator.as_deref())?;
            flush(run, steps);
            steps.push(Step::Create(tree.clone()));
        }
        Op::DropTree { tree } => {
            flush(run, steps);
            steps.push(Step::Drop(tree.clone()));
        }
        // Secondary indexes live in the node; a sink of values has nothing to do for them.
        Op::CreateIndex { .. } | Op::DropIndex { .. } => {}
    }
    Ok(())
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
