//! A transaction as the applier keeps it: borrowed ops ([`OpRef`]), the [`ApplyTxn`] view the
//! applier works on, and the packed form of a transaction in flight ([`PackedTxn`]).
//!
//! Owns: the compact in-memory representation of ops between submission and apply. A leaf
//! module: it depends on nothing else in the crate, so the shared state (`state`, whose
//! applier queue holds [`PackedTxn`]s) and the store batch builder (`apply`) can both use it.
//!
//! Must never: change what an op means (that is `apply`), or touch the store or the log.

use std::sync::Arc;

use tideline_wal::{Gtid, NewTransaction, Op};

/// An op as the store applies it, borrowed from a logged [`Op`] or from a [`PackedTxn`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpRef<'a> {
    CreateTree {
        tree: &'a str,
        merge_operator: Option<&'a str>,
    },
    DropTree {
        tree: &'a str,
    },
    Put {
        tree: &'a str,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        tree: &'a str,
        key: &'a [u8],
    },
    Merge {
        tree: &'a str,
        key: &'a [u8],
        operand: &'a [u8],
    },
    CreateIndex {
        tree: &'a str,
        name: &'a str,
        paths: &'a [String],
        unique: bool,
    },
    DropIndex {
        tree: &'a str,
        name: &'a str,
    },
}

impl OpRef<'_> {
    pub(crate) fn tree(&self) -> &str {
        match self {
            OpRef::CreateTree { tree, .. }
            | OpRef::DropTree { tree }
            | OpRef::Put { tree, .. }
            | OpRef::Delete { tree, .. }
            | OpRef::Merge { tree, .. }
            | OpRef::CreateIndex { tree, .. }
            | OpRef::DropIndex { tree, .. } => tree,
        }
    }
}

impl<'a> From<&'a Op> for OpRef<'a> {
    fn from(op: &'a Op) -> OpRef<'a> {
        match op {
            Op::CreateTree {
                tree,
                merge_operator,
            } => OpRef::CreateTree {
                tree,
                merge_operator: merge_operator.as_deref(),
            },
            Op::DropTree { tree } => OpRef::DropTree { tree },
            Op::Put {
                tree, key, value, ..
            } => OpRef::Put { tree, key, value },
            Op::Delete { tree, key, .. } => OpRef::Delete { tree, key },
            Op::Merge { tree, key, operand } => OpRef::Merge { tree, key, operand },
            Op::CreateIndex {
                tree,
                name,
                paths,
                unique,
            } => OpRef::CreateIndex {
                tree,
                name,
                paths,
                unique: *unique,
            },
            Op::DropIndex { tree, name } => OpRef::DropIndex { tree, name },
        }
    }
}

/// What an op weighs in a store batch: its key and value or operand, or 64 bytes for a tree
/// or index definition.
pub(crate) fn op_bytes(op: &OpRef<'_>) -> usize {
    match op {
        OpRef::Put { key, value, .. } => key.len() + value.len(),
        OpRef::Merge { key, operand, .. } => key.len() + operand.len(),
        OpRef::Delete { key, .. } => key.len(),
        OpRef::CreateTree { .. }
        | OpRef::DropTree { .. }
        | OpRef::CreateIndex { .. }
        | OpRef::DropIndex { .. } => 64,
    }
}

/// A transaction the applier can apply: a GTID and ops.
pub(crate) trait ApplyTxn {
    fn gtid(&self) -> Gtid;
    fn op_count(&self) -> usize;
    fn ops(&self) -> impl Iterator<Item = OpRef<'_>>;
    /// The bytes its ops put in a store batch ([`op_bytes`]).
    fn data_bytes(&self) -> usize {
        self.ops().map(|o| op_bytes(&o)).sum()
    }
}

impl ApplyTxn for NewTransaction {
    fn gtid(&self) -> Gtid {
        self.gtid
    }
    fn op_count(&self) -> usize {
        self.ops.len()
    }
    fn ops(&self) -> impl Iterator<Item = OpRef<'_>> {
        self.ops.iter().map(OpRef::from)
    }
}

/// The ops of transactions in flight, as the applier keeps them: every key, value and
/// operand in one buffer and every tree name in one string, so a transaction costs three
/// allocations whatever its size (a clone of its `Vec<Op>` costs three per op, and the
/// applier, the engine's one serial stage, would free them all). An upstream batch packs all
/// its transactions into one `PackedOps` (three allocations per batch, not per transaction);
/// each [`PackedTxn`] is a range of its op table.
#[derive(Default)]
pub(crate) struct PackedOps {
    ops: Vec<PackedOp>,
    bytes: Vec<u8>,
    names: String,
    /// Index definitions and drops, kept as logged (rare: no need to pack them).
    rare: Vec<Op>,
    /// Where the last tree name pushed sits in `names` (consecutive ops share it).
    last_tree: Option<(usize, usize)>,
}

#[derive(Clone, Copy)]
enum PackedKind {
    CreateTree,
    CreateTreeWithOperator,
    DropTree,
    Put,
    Delete,
    Merge,
    /// `rare[key.0]`.
    Rare,
}

/// One op of [`PackedOps`]: ranges of its tree name (in `names`), key and value or operand
/// or merge operator name (in `bytes`, the operator's name in `names`).
#[derive(Clone, Copy)]
struct PackedOp {
    kind: PackedKind,
    tree: (usize, usize),
    key: (usize, usize),
    value: (usize, usize),
}

impl PackedOps {
    /// The ops of one transaction, packed on their own.
    pub(crate) fn pack(ops: &[Op]) -> PackedOps {
        let mut p = PackedOps::default();
        p.reserve(ops);
        p.push(ops);
        p
    }

    /// Makes room for `ops` (of one or more later [`PackedOps::push`] calls).
    pub(crate) fn reserve<'o>(&mut self, ops: impl IntoIterator<Item = &'o Op>) {
        let (mut n, mut bytes_len) = (0, 0);
        for op in ops {
            n += 1;
            bytes_len += match op {
                Op::Put { key, value, .. } => key.len() + value.len(),
                Op::Merge { key, operand, .. } => key.len() + operand.len(),
                Op::Delete { key, .. } => key.len(),
                Op::CreateTree { .. }
                | Op::DropTree { .. }
                | Op::CreateIndex { .. }
                | Op::DropIndex { .. } => 0,
            };
        }
        self.ops.reserve(n);
        self.bytes.reserve(bytes_len);
    }

    /// Appends the ops of one transaction; returns their range in the op table.
    pub(crate) fn push(&mut self, ops: &[Op]) -> std::ops::Range<usize> {
        let first = self.ops.len();
        for op in ops {
            let r = OpRef::from(op);
            let tree = r.tree();
            // Consecutive ops on one tree (the usual case) share its name.
            let last_tree = match self.last_tree {
                Some(t) if self.names.get(t.0..t.1) == Some(tree) => t,
                _ => {
                    let t = push_str(&mut self.names, tree);
                    self.last_tree = Some(t);
                    t
                }
            };
            let none = (0, 0);
            let (kind, key, value) = match r {
                OpRef::CreateTree {
                    merge_operator: None,
                    ..
                } => (PackedKind::CreateTree, none, none),
                OpRef::CreateTree {
                    merge_operator: Some(m),
                    ..
                } => {
                    let m = push_str(&mut self.names, m);
                    // The operator's name sits in `names`, after the tree name.
                    (PackedKind::CreateTreeWithOperator, none, m)
                }
                OpRef::DropTree { .. } => (PackedKind::DropTree, none, none),
                OpRef::Put { key, value, .. } => (
                    PackedKind::Put,
                    push(&mut self.bytes, key),
                    push(&mut self.bytes, value),
                ),
                OpRef::Delete { key, .. } => (PackedKind::Delete, push(&mut self.bytes, key), none),
                OpRef::Merge { key, operand, .. } => (
                    PackedKind::Merge,
                    push(&mut self.bytes, key),
                    push(&mut self.bytes, operand),
                ),
                OpRef::CreateIndex { .. } | OpRef::DropIndex { .. } => {
                    self.rare.push(op.clone());
                    (PackedKind::Rare, (self.rare.len() - 1, 0), none)
                }
            };
            self.ops.push(PackedOp {
                kind,
                tree: last_tree,
                key,
                value,
            });
        }
        first..self.ops.len()
    }

    fn op(&self, o: &PackedOp) -> OpRef<'_> {
        // Ranges were recorded by `push` while it filled these buffers.
        let tree = &self.names[o.tree.0..o.tree.1];
        let key = match o.kind {
            PackedKind::Rare => &[][..],
            _ => &self.bytes[o.key.0..o.key.1],
        };
        match o.kind {
            PackedKind::CreateTree => OpRef::CreateTree {
                tree,
                merge_operator: None,
            },
            PackedKind::CreateTreeWithOperator => OpRef::CreateTree {
                tree,
                merge_operator: Some(&self.names[o.value.0..o.value.1]),
            },
            PackedKind::DropTree => OpRef::DropTree { tree },
            PackedKind::Put => OpRef::Put {
                tree,
                key,
                value: &self.bytes[o.value.0..o.value.1],
            },
            PackedKind::Delete => OpRef::Delete { tree, key },
            PackedKind::Merge => OpRef::Merge {
                tree,
                key,
                operand: &self.bytes[o.value.0..o.value.1],
            },
            PackedKind::Rare => OpRef::from(&self.rare[o.key.0]),
        }
    }
}

fn push(buf: &mut Vec<u8>, b: &[u8]) -> (usize, usize) {
    let start = buf.len();
    buf.extend_from_slice(b);
    (start, buf.len())
}

fn push_str(buf: &mut String, s: &str) -> (usize, usize) {
    let start = buf.len();
    buf.push_str(s);
    (start, buf.len())
}

/// A transaction in flight: its GTID and its ops, a range of a [`PackedOps`] it may share
/// with the rest of its upstream batch. Cheap to clone (one reference count).
#[derive(Clone)]
pub(crate) struct PackedTxn {
    pub(crate) gtid: Gtid,
    packed: Arc<PackedOps>,
    range: std::ops::Range<usize>,
}

impl PackedTxn {
    /// The transaction whose ops are `range` of `packed` (from [`PackedOps::push`]).
    pub(crate) fn new(gtid: Gtid, packed: Arc<PackedOps>, range: std::ops::Range<usize>) -> Self {
        debug_assert!(range.end <= packed.ops.len(), "a range `push` returned");
        PackedTxn {
            gtid,
            packed,
            range,
        }
    }
}

impl ApplyTxn for PackedTxn {
    fn gtid(&self) -> Gtid {
        self.gtid
    }
    fn op_count(&self) -> usize {
        self.range.len()
    }
    fn ops(&self) -> impl Iterator<Item = OpRef<'_>> {
        let p = &*self.packed;
        p.ops[self.range.clone()].iter().map(move |o| p.op(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b_all(t: &NewTransaction) -> Vec<String> {
        t.ops().map(|o| format!("{o:?}")).collect()
    }

    /// Packing keeps every op, field for field, in order, across tree changes.
    #[test]
    fn packed_ops_read_back_as_logged() {
        let put = |tree: &str, k: &[u8], v: &[u8]| Op::Put {
            tree: tree.into(),
            key: k.to_vec(),
            value: v.to_vec(),
            before: Some(b"old".to_vec()),
        };
        let ops = vec![
            Op::CreateTree {
                tree: "default".into(),
                merge_operator: None,
            },
            put("default", b"a", b"1"),
            put("default", b"b", b""),
            Op::CreateTree {
                tree: "c".into(),
                merge_operator: Some("add".into()),
            },
            Op::Merge {
                tree: "c".into(),
                key: b"n".to_vec(),
                operand: b"2".to_vec(),
            },
            Op::Delete {
                tree: "default".into(),
                key: b"a".to_vec(),
                before: None,
            },
            Op::DropTree { tree: "c".into() },
            Op::CreateIndex {
                tree: "default".into(),
                name: "by_x".into(),
                paths: vec!["/x".into(), "/y".into()],
                unique: true,
            },
            put("default", b"z", b"26"),
            Op::DropIndex {
                tree: "default".into(),
                name: "by_x".into(),
            },
        ];
        let gtid = Gtid::new(uuid::Uuid::nil(), 1).expect("seq 1 is valid");
        let packed = PackedTxn::new(gtid, Arc::new(PackedOps::pack(&ops)), 0..ops.len());
        let logged = NewTransaction {
            gtid,
            timestamp_us: 0,
            ops: ops.clone(),
        };
        assert_eq!(packed.op_count(), ops.len());
        let a: Vec<String> = packed.ops().map(|o| format!("{o:?}")).collect();
        let b: Vec<String> = logged.ops().map(|o| format!("{o:?}")).collect();
        assert_eq!(a, b);
        assert!(PackedOps::pack(&[]).ops.is_empty());
        // Several transactions in one `PackedOps` (an upstream batch): each reads back its own.
        let mut shared = PackedOps::default();
        let first = shared.push(&ops[..3]);
        let second = shared.push(&ops[3..]);
        let shared = Arc::new(shared);
        let a = PackedTxn::new(gtid, shared.clone(), first);
        let b = PackedTxn::new(gtid, shared, second);
        let both: Vec<String> = a.ops().chain(b.ops()).map(|o| format!("{o:?}")).collect();
        assert_eq!(both, b_all(&logged));
    }
}
