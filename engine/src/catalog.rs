//! Trees and the store's metadata keys.
//!
//! Every tree lives in its own store keyspace, named after the log position of the
//! `CreateTree` op that made it (`t<offset>.<op index>`), so a tree dropped and created again
//! gets a fresh, empty keyspace and a snapshot taken before the drop keeps reading the old one.
//!
//! Metadata keyspace `meta` (persisted: changes must stay backward compatible):
//!
//! | key | value |
//! |---|---|
//! | `format` | `1` (UTF-8) |
//! | `applied` | last applied log offset, u64 little-endian (8 bytes) |
//! | `gtid_executed` | GTID set text, `uuid:1-5,uuid2:3` |
//! | `server_uuid` | the log's server uuid, text |
//! | `tree/<name>` | JSON `{"keyspace":"t12.0","merge":"add"}` (`merge` null when none) |
//! | `keyspace_id_next` | above every store keyspace id the engine was given, u64 little-endian (see `retire_keyspace_ids`) |
//! | `index/<tree>/<name>` | JSON `{"keyspace":"i12.0","paths":["/email"],"unique":false}` |
//! | `index_state/<tree>/<name>` | JSON progress: `state` (`backfilling`/`live`/`failed`), `cursor_hex` (first key not yet backfilled), `reason`, `entries`, `skipped`, `duplicates`, `examples`, `backfilled`, `total_estimate` |
//! | `bootstrap` | while a bootstrap runs: the caller's opaque progress record |
//! | `bootstrap_finishing` | while a bootstrap finishes: the GTID set text it finishes at |
//!
//! All of them are written in the same atomic batch as the data they describe. An index's
//! entries live in a keyspace of their own named like a tree's, `i<offset>.<op index>` after
//! the `CreateIndex` op that made it (see `index` for the entry encoding). Trees made by
//! a bootstrap live in keyspaces named `r<16 hex digits>` (random: the offset does not move
//! while bootstrapping).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::index::Index;
use crate::merge::MergeOperator;
use crate::store::TreeHandle;

pub(crate) const META_KEYSPACE: &str = "meta";
pub(crate) const KEY_FORMAT: &[u8] = b"format";
pub(crate) const KEY_APPLIED: &[u8] = b"applied";
pub(crate) const KEY_GTIDS: &[u8] = b"gtid_executed";
pub(crate) const KEY_SERVER_UUID: &[u8] = b"server_uuid";
pub(crate) const TREE_PREFIX: &[u8] = b"tree/";
pub(crate) const KEY_BOOTSTRAP: &[u8] = b"bootstrap";
pub(crate) const KEY_KEYSPACE_ID_NEXT: &[u8] = b"keyspace_id_next";
pub(crate) const KEY_BOOTSTRAP_FINISHING: &[u8] = b"bootstrap_finishing";
pub(crate) const FORMAT: &[u8] = b"1";

/// The tree used when a caller names none; created by the first transaction that writes to it.
pub const DEFAULT_TREE: &str = "default";

/// Longest tree name, in bytes.
pub const TREE_NAME_BYTES_MAX: usize = 128;

/// A tree as the catalog knows it.
#[derive(Clone)]
pub(crate) struct Tree {
    pub(crate) merge: Option<MergeOperator>,
    pub(crate) keyspace: String,
    pub(crate) handle: TreeHandle,
}

/// Name → tree, as of one applied log position. Shared read-only; replaced as a whole.
#[derive(Clone, Default)]
pub(crate) struct Catalog {
    pub(crate) trees: BTreeMap<String, Arc<Tree>>,
    /// Tree name → index name → index. A tree without indexes has no entry.
    pub(crate) indexes: BTreeMap<String, BTreeMap<String, Arc<Index>>>,
}

impl Catalog {
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Tree>> {
        self.trees.get(name)
    }

    /// The indexes of `tree` (none: `None`).
    pub(crate) fn indexes_of(&self, tree: &str) -> Option<&BTreeMap<String, Arc<Index>>> {
        self.indexes.get(tree).filter(|m| !m.is_empty())
    }

    /// Index `name` of `tree`.
    pub(crate) fn index(&self, tree: &str, name: &str) -> Option<&Arc<Index>> {
        self.indexes.get(tree).and_then(|m| m.get(name))
    }

    /// Every index, by tree then name.
    pub(crate) fn all_indexes(&self) -> impl Iterator<Item = &Arc<Index>> {
        self.indexes.values().flat_map(|m| m.values())
    }

    pub(crate) fn infos(&self) -> Vec<TreeInfo> {
        self.trees
            .iter()
            .map(|(name, t)| TreeInfo {
                name: name.clone(),
                merge_operator: t.merge,
            })
            .collect()
    }
}

/// A tree's public description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeInfo {
    /// Its name.
    pub name: String,
    /// Its merge operator, if any.
    pub merge_operator: Option<MergeOperator>,
}

/// Whether `name` is an acceptable tree name: 1-128 bytes of `[A-Za-z0-9_.:-]`.
pub fn is_valid_tree_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TREE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

pub(crate) fn tree_meta_key(name: &str) -> Vec<u8> {
    let mut k = TREE_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn encode_tree_meta(keyspace: &str, merge: Option<MergeOperator>) -> Vec<u8> {
    serde_json::json!({ "keyspace": keyspace, "merge": merge.map(|m| m.name()) })
        .to_string()
        .into_bytes()
}

/// Decodes a `tree/<name>` entry into (keyspace, merge operator).
pub(crate) fn decode_tree_meta(bytes: &[u8]) -> Result<(String, Option<MergeOperator>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("tree entry is not JSON: {e}"))?;
    let keyspace = v
        .get("keyspace")
        .and_then(|k| k.as_str())
        .ok_or("tree entry lacks `keyspace`")?
        .to_string();
    let merge = match v.get("merge") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(
            MergeOperator::from_name(s)
                .ok_or_else(|| format!("tree entry names unknown merge operator `{s}`"))?,
        ),
        Some(other) => return Err(format!("tree entry has merge = {other}")),
    };
    Ok((keyspace, merge))
}
