//! The changes a transaction is made of.
#![allow(
    missing_docs,
    reason = "rkyv's derive generates undocumented resolver types for enum variants"
)]

/// One change inside a transaction.
///
/// persisted: changes must stay backward compatible. New variants are added at the end and
/// bump `FORMAT_VERSION`; old readers then refuse the segment instead of misreading it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Op {
    /// Set `key` in `tree` to `value`.
    Put {
        /// Tree (keyspace) name.
        tree: String,
        /// Key bytes.
        key: Vec<u8>,
        /// New value bytes.
        value: Vec<u8>,
        /// The value before this change, when the writer recorded it.
        before: Option<Vec<u8>>,
    },
    /// Remove `key` from `tree`.
    Delete {
        /// Tree (keyspace) name.
        tree: String,
        /// Key bytes.
        key: Vec<u8>,
        /// The value before this change, when the writer recorded it.
        before: Option<Vec<u8>>,
    },
    /// Combine `operand` into `key` with the tree's merge operator. The operand is logged, not
    /// the result, so every node resolves it the same way.
    Merge {
        /// Tree (keyspace) name.
        tree: String,
        /// Key bytes.
        key: Vec<u8>,
        /// Merge operand.
        operand: Vec<u8>,
    },
    /// Create `tree`, optionally with a named merge operator.
    CreateTree {
        /// Tree (keyspace) name.
        tree: String,
        /// Name of the tree's merge operator, if any.
        merge_operator: Option<String>,
    },
    /// Drop `tree` and everything in it.
    DropTree {
        /// Tree (keyspace) name.
        tree: String,
    },
    /// Declare secondary index `name` on `tree`: entries `(values at paths, primary key)`
    /// for every value of the tree that is a JSON document holding a scalar at each path.
    /// The node backfills it from its own data and keeps it live; entries are not logged.
    CreateIndex {
        /// Tree the index covers.
        tree: String,
        /// Index name, unique within the tree.
        name: String,
        /// JSON pointers (RFC 6901), one per component of the index value.
        paths: Vec<String>,
        /// Refuse (once live) a write that gives a second key the same value.
        unique: bool,
    },
    /// Drop secondary index `name` of `tree` and its entries.
    DropIndex {
        /// Tree the index covers.
        tree: String,
        /// Index name.
        name: String,
    },
}

impl Op {
    /// The op's kind as every JSON view of the log names it (`tail`, `log dump`, the change
    /// envelope, pipeline filters): `put`, `delete`, `merge`, `create_tree`, `drop_tree`,
    /// `create_index`, `drop_index`.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Put { .. } => "put",
            Op::Delete { .. } => "delete",
            Op::Merge { .. } => "merge",
            Op::CreateTree { .. } => "create_tree",
            Op::DropTree { .. } => "drop_tree",
            Op::CreateIndex { .. } => "create_index",
            Op::DropIndex { .. } => "drop_index",
        }
    }

    /// The tree this op touches.
    pub fn tree(&self) -> &str {
        match self {
            Op::Put { tree, .. }
            | Op::Delete { tree, .. }
            | Op::Merge { tree, .. }
            | Op::CreateTree { tree, .. }
            | Op::DropTree { tree }
            | Op::CreateIndex { tree, .. }
            | Op::DropIndex { tree, .. } => tree,
        }
    }

    /// The key this op touches, if it touches one key.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } | Op::Merge { key, .. } => Some(key),
            Op::CreateTree { .. }
            | Op::DropTree { .. }
            | Op::CreateIndex { .. }
            | Op::DropIndex { .. } => None,
        }
    }
}
