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
//! held write is retried). A `drop_tree` forgets the tree's operator: a tree of that name
//! created again later has its own. A merge on a tree whose operator is unknown is never
//! guessed; it leaves nothing when a drop of its tree follows in the stream, which is known
//! when the batch drops the tree after it, or when the source's status, read after the merge
//! was committed ([`Operators::learn_source_trees`]), does not list the tree at all: the merge
//! shows that the tree existed then, so it was dropped since, and that drop, later in the
//! stream, removes every row the merge could leave (the sink's rows of the tree are stale
//! only until it arrives). Otherwise (the source lists the tree but names no operator for it,
//! or names one this build does not know) the batch is refused with a `Hold` error.
//!
//! Owns: folding and operator bookkeeping. Must never: do I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

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
    /// What the source's status said last (shared: [`fold`] works on a copy).
    source: Arc<SourceView>,
    /// Trees dropped in the stream and not created again in it since, each with the source
    /// offset of its last drop (`u64::MAX` when the drop came without one).
    dropped: HashMap<String, u64>,
    /// Trees whose merges were skipped since their last drop, warned about once.
    warned: HashSet<String>,
}

/// The source's `status` as last handed to the sink.
#[derive(Debug, Default, Clone)]
struct SourceView {
    /// Tree → operator name.
    operators: BTreeMap<String, String>,
    /// Every tree the source had, as listed no earlier than the source offset `as_of`.
    trees: Option<BTreeSet<String>>,
    /// The source offset the list of trees is no older than (0: none handed).
    as_of: u64,
}

impl Operators {
    /// Learns the source's operators as its `status` reports them (when the pipeline starts,
    /// and again before a held write is retried). What the stream said wins: a tree the sink
    /// knows keeps its operator. For a tree it does not know, the operator the source names
    /// now is the one its merges were written with, or the tree was dropped and created again
    /// after them, and the drop that follows removes what they left.
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
        Arc::make_mut(&mut self.source)
            .operators
            .clone_from(operators);
    }

    /// Learns every tree the source has, as its `status` lists them no earlier than the
    /// source offset `as_of` (its `last_offset`), read together with the operators handed to
    /// [`Operators::learn_from_source`] just before. Only for a pipeline whose filter lets
    /// `drop_tree` through: a merge committed at or before `as_of` on a tree missing from
    /// the list is followed in the stream by the tree's drop.
    pub(crate) fn learn_source_trees(&mut self, trees: &BTreeSet<String>, as_of: u64) {
        let view = Arc::make_mut(&mut self.source);
        view.trees = Some(trees.clone());
        view.as_of = as_of;
        // A drop the status has seen, of a tree it no longer lists, needs no memory: merges
        // after it are skipped by the list.
        self.dropped
            .retain(|tree, at| *at > as_of || trees.contains(tree));
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
        self.dropped.remove(tree);
        Ok(())
    }

    /// `tree` was dropped at source offset `at`: what the sink knew of its operator was the
    /// dropped tree's, not that of a tree of the same name created later.
    fn forget(&mut self, tree: &str, at: Option<u64>) {
        self.by_tree.remove(tree);
        self.unknown_names.remove(tree);
        self.warned.remove(tree);
        self.dropped.insert(tree.to_owned(), at.unwrap_or(u64::MAX));
    }

    /// Whether the source's status, listed after the op at source offset `at` was committed,
    /// does not list `tree`: the tree was dropped after that op, and the drop follows in the
    /// stream.
    fn gone_at_source(&self, tree: &str, at: Option<u64>) -> bool {
        let v = &self.source;
        at.is_some_and(|at| at <= v.as_of)
            && v.trees.as_ref().is_some_and(|trees| !trees.contains(tree))
    }

    /// `tree`'s operator, for a merge in a copy's step (`copying`) or in a batch of the log.
    fn get(&self, tree: &str, copying: bool) -> Result<MergeOperator, SinkError> {
        // Dropped in the stream: the status names the operator of the tree created after the
        // drop only when it was read after the drop.
        let from_source = match self.dropped.get(tree) {
            Some(&at) if at > self.source.as_of => None,
            _ => self.source.operators.get(tree),
        };
        let learned = match self.by_tree.get(tree) {
            Some(known) => Some(*known),
            None => from_source
                .and_then(|n| MergeOperator::from_name(n))
                .map(Some),
        };
        let unknown_name = self
            .unknown_names
            .get(tree)
            .or_else(|| from_source.filter(|n| MergeOperator::from_name(n).is_none()));
        match learned {
            Some(Some(op)) => Ok(op),
            Some(None) => Err(SinkError::Hold(format!(
                "a merge on tree `{tree}`, which has no merge operator at the source as far as \
                 this pipeline saw; restart the connector so that it reads the source's trees \
                 again"
            ))),
            None if unknown_name.is_some() => Err(SinkError::Hold(format!(
                "tree `{tree}` uses the merge operator `{}`, which this tideline does not know; \
                 upgrade the connector to the source's version",
                unknown_name.map_or("", String::as_str)
            ))),
            // The pipeline hands the sink the source's status again before it holds: the
            // source names no operator for the tree now, yet lists the tree (or its list is
            // older than the merge, or the pipeline's filter keeps drops from the sink).
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

/// Folds `batch` into steps, learning operators from it. `operators` changes only when the
/// fold succeeds: a batch refused is folded again, from the same operators, when retried.
pub(crate) fn fold(batch: &Batch, operators: &mut Operators) -> Result<Vec<Step>, SinkError> {
    let mut f = Folder {
        steps: Vec::new(),
        run: Run::default(),
        operators: operators.clone(),
        batch,
        at: 0,
        offset: None,
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
                f.offset = match item {
                    Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => Some(t.offset.get()),
                    _ => None,
                };
                for op in item_ops(item) {
                    f.at += 1;
                    f.op(op, copying)?;
                }
            }
        }
    }
    f.flush();
    *operators = f.operators;
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
struct Folder<'b> {
    steps: Vec<Step>,
    run: Run,
    /// The sink's operators as this fold leaves them (its own copy until it succeeds).
    operators: Operators,
    batch: &'b Batch,
    /// Ordinal of the op being folded (1 for the batch's first op).
    at: usize,
    /// Source offset of the record the op being folded belongs to (`None`: a copy's ops that
    /// belong to no record).
    offset: Option<u64>,
    /// Each dropped tree's last `drop_tree` in the batch, by ordinal; found when a merge first
    /// needs it.
    drops: Option<HashMap<&'b str, usize>>,
}

impl Folder<'_> {
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
                    // The source's status, listed after this merge was committed, lacks the
                    // tree: it was dropped since, and the drop follows in the stream.
                    Err(_) if self.operators.gone_at_source(tree, self.offset) => {
                        if self.operators.warned.insert(tree.clone()) {
                            tracing::warn!(
                                tree = %tree,
                                "skipping merges into tree `{tree}`, whose operator is unknown: \
                                 the source has dropped it since, and its drop, later in the \
                                 stream, removes what they would leave (the sink's rows of the \
                                 tree are stale until then)"
                            );
                        }
                        return Ok(());
                    }
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
                self.operators.forget(tree, self.offset);
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

    fn txn_at(offset: u64, ops: Vec<Op>) -> Item {
        let Item::Txn(mut t) = txn(ops) else {
            unreachable!("txn builds a transaction")
        };
        t.offset = Offset::new(offset).unwrap();
        Item::Txn(t)
    }

    fn trees(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// The merges into a tree come in batches before the one that drops it (a tree takes many
    /// merges before it goes): the source's status, listed after them, lacks the tree, so its
    /// drop follows and the merges are skipped; the batch is stored, not held. A merge the
    /// list is older than, or on a tree the source lists with no operator, still holds.
    #[test]
    fn merges_into_a_tree_the_source_no_longer_lists_are_skipped() {
        let mut ops = Operators::default();
        ops.learn_from_source(&BTreeMap::new());
        ops.learn_source_trees(&trees(&["kv"]), 10);
        let put = |key: &str| Op::Put {
            tree: "kv".into(),
            key: key.into(),
            value: b"1".to_vec(),
            before: None,
        };
        let b = batch(vec![
            txn_at(5, vec![merge("c", "k", "1"), merge("c", "j", "1")]),
            txn_at(6, vec![put("a"), merge("c", "k", "1")]),
        ]);
        let steps = fold(&b, &mut ops).expect("merges into a tree since dropped are skipped");
        let written: Vec<&str> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Run(run) => Some(run),
                _ => None,
            })
            .flat_map(run_trees)
            .collect();
        assert_eq!(written, ["kv"], "{steps:?}");

        // Committed after the list was read: the source may have created `c` since.
        let e = fold(
            &batch(vec![txn_at(11, vec![merge("c", "k", "1")])]),
            &mut ops,
        )
        .unwrap_err();
        assert!(matches!(&e, SinkError::Hold(m) if m.contains("`c`")), "{e}");
        // Listed with no operator: dropped and created again without one; held as before.
        ops.learn_source_trees(&trees(&["kv", "c"]), 20);
        let e = fold(
            &batch(vec![txn_at(12, vec![merge("c", "k", "1")])]),
            &mut ops,
        )
        .unwrap_err();
        assert!(matches!(&e, SinkError::Hold(m) if m.contains("`c`")), "{e}");
    }

    /// A drop forgets the tree's operator: a tree of that name created again (its
    /// `create_tree` filtered out) is not merged with the dropped one's operator, but with the
    /// one the source's status names once read after the drop; and a batch refused leaves the
    /// operators as they were, so that folding it again with that status succeeds.
    #[test]
    fn a_drop_forgets_the_operator_learned_for_the_tree() {
        let mut ops = Operators::default();
        ops.learn_from_source(&BTreeMap::from([("c".into(), "add".into())]));
        ops.learn_source_trees(&trees(&["c"]), 4);
        let steps = fold(
            &batch(vec![
                txn_at(5, vec![merge("c", "k", "2")]),
                txn_at(6, vec![Op::DropTree { tree: "c".into() }]),
            ]),
            &mut ops,
        )
        .unwrap();
        assert!(
            matches!(steps.last(), Some(Step::Drop(t)) if t == "c"),
            "{steps:?}"
        );

        // `c` created again with `max` at offset 7; the status handed was read before.
        let again = batch(vec![txn_at(8, vec![merge("c", "k", "3")])]);
        let e = fold(&again, &mut ops).unwrap_err();
        assert!(matches!(&e, SinkError::Hold(m) if m.contains("`c`")), "{e}");
        ops.learn_from_source(&BTreeMap::from([("c".into(), "max".into())]));
        ops.learn_source_trees(&trees(&["c"]), 8);
        let steps = fold(&again, &mut ops).unwrap();
        let Step::Run(run) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(
            run.trees[0].1[&b"k".to_vec()].resolve(Some(b"9")),
            Some(b"9".to_vec()),
            "resolved with `max`, not the dropped tree's `add`"
        );

        // The drop and the merge after it in one batch, the status read before the drop: held,
        // and held with nothing learned from the refused fold; once a status read after the
        // drop is handed, the same batch folds.
        let mut ops = Operators::default();
        ops.learn_from_source(&BTreeMap::from([("c".into(), "add".into())]));
        ops.learn_source_trees(&trees(&["c"]), 4);
        let both = batch(vec![
            txn_at(5, vec![Op::DropTree { tree: "c".into() }]),
            txn_at(7, vec![merge("c", "k", "3")]),
        ]);
        assert!(matches!(fold(&both, &mut ops), Err(SinkError::Hold(_))));
        assert!(ops.merges("c"), "a refused fold forgets nothing");
        ops.learn_from_source(&BTreeMap::from([("c".into(), "max".into())]));
        ops.learn_source_trees(&trees(&["c"]), 7);
        let steps = fold(&both, &mut ops).unwrap();
        let Some(Step::Run(run)) = steps.last() else {
            panic!("{steps:?}")
        };
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
