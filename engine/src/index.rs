//! Secondary indexes: definitions, the entry encoding, field extraction and progress.
//!
//! Owns: what an index *is* (the [`Index`] a catalog holds, its persisted definition and
//! progress records in `meta`), how a document turns into an index entry
//! ([`Index::entry_for`]), the order-preserving entry encoding, and the public descriptions
//! ([`IndexInfo`], [`IndexState`]). What a write does to an index (live maintenance, in the
//! applier's store batch) is in `apply`; the backfill is in `backfill`; the unique check at
//! commit time is in `commit`.
//!
//! Must never: write to the store itself, or read the log. Index entries are derived state:
//! they are never logged, every node builds its own from the logged definition.
//!
//! Entry key (persisted: changes must stay backward compatible):
//!
//! ```text
//!  component 1                      component n                       primary key
//!  +------------------+-------+ ... +------------------+-------+ ---- +------------+
//!  | value, 0x00 → 00 FF | 00 01 |   | value, 0x00 → 00 FF | 00 01 |      | raw bytes  |
//!  +------------------+-------+ ... +------------------+-------+ ---- +------------+
//! ```
//! Each component is the field's bytes with every 0x00 written as 0x00 0xFF, closed by
//! 0x00 0x01, so entries sort by the components' bytes, component by component, then by
//! primary key; the entry's value is empty. A component is a string's UTF-8 bytes, or the
//! JSON text serde_json renders for any other scalar (`42`, `true`, `null`): a number is
//! rendered from its parsed u64, i64 or f64, not copied from the document (`1.50` → `1.5`,
//! `1e2` → `100.0`, `-0` → `-0.0`, integers beyond u64/i64 as floats), and the type is not
//! kept (`"42"` and `42` give one component). Numbers thus sort by that text's bytes, not
//! numerically. A document that is not JSON, lacks a
//! path, or holds an object or array at one, is *skipped* (counted, no entry). The paths are
//! read without building the document (`fields`), with the same result as a full parse.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::fields::Fields;
use crate::state::KEY_BYTES_MAX_LIMIT;
use crate::store::TreeHandle;

/// `index/<tree>/<name>` → definition JSON.
pub(crate) const INDEX_PREFIX: &[u8] = b"index/";
/// `index_state/<tree>/<name>` → progress JSON.
pub(crate) const INDEX_STATE_PREFIX: &[u8] = b"index_state/";
/// Duplicate examples kept per unique index.
const DUPLICATE_EXAMPLES_MAX: usize = 5;

/// Whether `name` is an acceptable index name: the tree name rules.
pub fn is_valid_index_name(name: &str) -> bool {
    crate::catalog::is_valid_tree_name(name)
}

/// Whether `path` is a JSON pointer (RFC 6901): empty (the whole document) or `/`-led, with
/// `~` only in `~0` and `~1`.
pub fn is_valid_json_pointer(path: &str) -> bool {
    if path.is_empty() {
        return true;
    }
    if !path.starts_with('/') {
        return false;
    }
    let b = path.as_bytes();
    b.iter()
        .enumerate()
        .all(|(i, &c)| c != b'~' || matches!(b.get(i + 1), Some(b'0' | b'1')))
}

/// Where an index is.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexState {
    /// Copying entries for the documents that were in the tree when it was declared;
    /// writes since the declaration are already indexed. Queries are refused until live.
    Backfilling {
        /// Share of the tree's documents visited, 0-100 (estimated from the tree's size).
        percent: f64,
        /// Documents per second since this process started the backfill.
        docs_per_s: f64,
    },
    /// Complete: equals a recomputation from the tree at every applied position.
    Live,
    /// Reserved: never entered by this version. A backfill that cannot read the tree or
    /// store its step makes the engine fail-stop instead (see `docs/ENGINE.md`); the state
    /// stays decodable so that a progress record holding it still opens.
    Failed {
        /// Why.
        reason: String,
    },
}

impl IndexState {
    /// `backfilling`, `live` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            IndexState::Backfilling { .. } => "backfilling",
            IndexState::Live => "live",
            IndexState::Failed { .. } => "failed",
        }
    }
}

/// An index as [`Engine::indexes`](crate::Engine::indexes) describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexInfo {
    /// The indexed tree.
    pub tree: String,
    /// The index name.
    pub name: String,
    /// JSON pointers, one per component.
    pub paths: Vec<String>,
    /// Whether a second key with the same value is refused once live.
    pub unique: bool,
    /// Backfilling, live or failed.
    pub state: IndexState,
    /// Entries the index holds (documents indexed), counted over the backfilled part.
    pub entries: u64,
    /// Documents skipped (not JSON, a path missing, or an object/array at a path), counted
    /// like `entries`: the documents of the tree right now that have no entry.
    pub skipped: u64,
    /// Duplicates met on a unique index (during the backfill, or applied from an upstream).
    pub duplicates: u64,
    /// A few of them, as `value → key, key`.
    pub duplicate_examples: Vec<String>,
}

/// Backfill, live or failed, as persisted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Keys below `cursor` are backfilled.
    Backfilling {
        cursor: Vec<u8>,
    },
    Live,
    Failed {
        reason: String,
    },
}

/// An index's progress and counters (persisted in `index_state/<tree>/<name>` with the batch
/// that changes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) phase: Phase,
    pub(crate) entries: u64,
    pub(crate) skipped: u64,
    pub(crate) duplicates: u64,
    pub(crate) examples: Vec<String>,
    /// Documents the backfill visited.
    pub(crate) backfilled: u64,
    /// The tree's estimated size when the backfill started.
    pub(crate) total_estimate: u64,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            phase: Phase::Backfilling { cursor: Vec::new() },
            entries: 0,
            skipped: 0,
            duplicates: 0,
            examples: Vec::new(),
            backfilled: 0,
            total_estimate: 0,
        }
    }

    /// Whether the counters include `key` (its range is backfilled).
    pub(crate) fn counts(&self, key: &[u8]) -> bool {
        match &self.phase {
            Phase::Backfilling { cursor } => key < cursor.as_slice(),
            Phase::Live | Phase::Failed { .. } => true,
        }
    }

    pub(crate) fn add_duplicate(&mut self, example: impl FnOnce() -> String) {
        self.duplicates += 1;
        if self.examples.len() < DUPLICATE_EXAMPLES_MAX {
            self.examples.push(example());
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let (state, cursor, reason) = match &self.phase {
            Phase::Backfilling { cursor } => ("backfilling", Some(hex(cursor)), None),
            Phase::Live => ("live", None, None),
            Phase::Failed { reason } => ("failed", None, Some(reason.clone())),
        };
        serde_json::json!({
            "state": state,
            "cursor_hex": cursor,
            "reason": reason,
            "entries": self.entries,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "examples": self.examples,
            "backfilled": self.backfilled,
            "total_estimate": self.total_estimate,
        })
        .to_string()
        .into_bytes()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Progress, String> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| format!("index progress is not JSON: {e}"))?;
        let n = |f: &str| v.get(f).and_then(Value::as_u64).unwrap_or(0);
        let phase = match v.get("state").and_then(Value::as_str) {
            Some("backfilling") => Phase::Backfilling {
                cursor: unhex(
                    v.get("cursor_hex")
                        .and_then(Value::as_str)
                        .ok_or("index progress lacks `cursor_hex`")?,
                )?,
            },
            Some("live") => Phase::Live,
            Some("failed") => Phase::Failed {
                reason: v
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
            },
            other => return Err(format!("index progress has state {other:?}")),
        };
        Ok(Progress {
            phase,
            entries: n("entries"),
            skipped: n("skipped"),
            duplicates: n("duplicates"),
            examples: v
                .get("examples")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            backfilled: n("backfilled"),
            total_estimate: n("total_estimate"),
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("index cursor has an odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| "index cursor is not hex".to_string())
        })
        .collect()
}

/// What a document means to an index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DocEntry {
    /// No document (absent key).
    Absent,
    /// A document the index skips.
    Skipped,
    /// The document's entry key.
    Entry(Vec<u8>),
}

/// A secondary index as the catalog holds it.
pub(crate) struct Index {
    pub(crate) tree: String,
    pub(crate) name: String,
    pub(crate) paths: Vec<String>,
    /// `paths` compiled for reading them without a full parse.
    fields: Fields,
    pub(crate) unique: bool,
    pub(crate) keyspace: String,
    pub(crate) handle: TreeHandle,
    /// As of the last committed store batch; changed only with `Inner::index_lock` held.
    pub(crate) progress: Mutex<Progress>,
    /// When this process started backfilling it and the `backfilled` count then (for rates).
    pub(crate) rate_base: Mutex<Option<(Instant, u64)>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("tree", &self.tree)
            .field("name", &self.name)
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

impl Index {
    pub(crate) fn new(
        tree: &str,
        name: &str,
        paths: Vec<String>,
        unique: bool,
        keyspace: String,
        handle: TreeHandle,
        progress: Progress,
    ) -> Arc<Index> {
        Arc::new(Index {
            tree: tree.to_string(),
            name: name.to_string(),
            fields: Fields::new(&paths),
            paths,
            unique,
            keyspace,
            handle,
            progress: Mutex::new(progress),
            rate_base: Mutex::new(None),
        })
    }

    pub(crate) fn progress(&self) -> Progress {
        crate::state::lock(&self.progress).clone()
    }

    pub(crate) fn is_live(&self) -> bool {
        matches!(crate::state::lock(&self.progress).phase, Phase::Live)
    }

    /// The entry of `doc` stored under primary key `pk`; `parsed` caches the document's
    /// parse across the indexes of one tree (see [`Parsed`]).
    pub(crate) fn entry_for(&self, pk: &[u8], doc: Option<&[u8]>, parsed: &mut Parsed) -> DocEntry {
        let Some(doc) = doc else {
            return DocEntry::Absent;
        };
        let mut entry = Vec::with_capacity(doc.len().min(64) + pk.len());
        if parsed.shared {
            let Some(v) = parsed.get(doc) else {
                return DocEntry::Skipped;
            };
            for p in &self.paths {
                match v.pointer(p).and_then(scalar_bytes) {
                    Some(b) => push_component(&mut entry, &b),
                    None => return DocEntry::Skipped,
                }
            }
        } else if !self.fields.extract_entry(doc, &mut entry) {
            return DocEntry::Skipped;
        }
        entry.extend_from_slice(pk);
        if entry.len() > KEY_BYTES_MAX_LIMIT {
            return DocEntry::Skipped;
        }
        DocEntry::Entry(entry)
    }

    /// The components of an entry key of this index, and its primary key.
    pub(crate) fn decode_entry<'a>(&self, entry: &'a [u8]) -> Option<(Vec<Vec<u8>>, &'a [u8])> {
        decode_entry(entry, self.paths.len())
    }

    pub(crate) fn info(&self) -> IndexInfo {
        let p = self.progress();
        let state = match &p.phase {
            Phase::Backfilling { .. } => {
                let total = p.total_estimate.max(p.backfilled).max(1);
                let docs_per_s = match *crate::state::lock(&self.rate_base) {
                    Some((t, base)) => {
                        let secs = t.elapsed().as_secs_f64();
                        if secs > 0.0 {
                            p.backfilled.saturating_sub(base) as f64 / secs
                        } else {
                            0.0
                        }
                    }
                    None => 0.0,
                };
                IndexState::Backfilling {
                    percent: (p.backfilled as f64 * 100.0 / total as f64).min(99.9),
                    docs_per_s,
                }
            }
            Phase::Live => IndexState::Live,
            Phase::Failed { reason } => IndexState::Failed {
                reason: reason.clone(),
            },
        };
        IndexInfo {
            tree: self.tree.clone(),
            name: self.name.clone(),
            paths: self.paths.clone(),
            unique: self.unique,
            state,
            entries: p.entries,
            skipped: p.skipped,
            duplicates: p.duplicates,
            duplicate_examples: p.examples,
        }
    }
}

/// How [`Index::entry_for`] reads a document. By default (one index) only that index's paths
/// are read, in one checking pass that builds nothing else ([`Fields`]); `shared` (several
/// indexes of one tree reading the same document) parses the document into a `Value` once
/// and serves every index from it. Both give the same entries (see `fields`).
#[derive(Default)]
pub(crate) struct Parsed {
    shared: bool,
    done: bool,
    value: Option<Value>,
}

impl Parsed {
    /// A cache for a document that `indexes` indexes read.
    pub(crate) fn for_indexes(indexes: usize) -> Parsed {
        Parsed {
            shared: indexes > 1,
            ..Parsed::default()
        }
    }

    fn get(&mut self, doc: &[u8]) -> Option<&Value> {
        if !self.done {
            self.value = serde_json::from_slice(doc).ok();
            self.done = true;
        }
        self.value.as_ref()
    }
}

/// A component's bytes: a string's UTF-8, another scalar's JSON text; `None` for an object
/// or array.
pub(crate) fn scalar_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Object(_) | Value::Array(_) => None,
        other => Some(other.to_string().into_bytes()),
    }
}

/// Appends `value` escaped (0x00 → 0x00 0xFF), without the terminator.
pub(crate) fn push_escaped(out: &mut Vec<u8>, value: &[u8]) {
    for &b in value {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
}

/// Appends one component: `value` escaped, then the terminator.
pub(crate) fn push_component(out: &mut Vec<u8>, value: &[u8]) {
    push_escaped(out, value);
    out.extend_from_slice(&[0x00, 0x01]);
}

/// The encoded components (each escaped and terminated): the prefix of every entry whose
/// leading components equal `values`.
pub fn value_prefix(values: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.iter().map(|v| v.len() + 2).sum());
    for v in values {
        push_component(&mut out, v);
    }
    out
}

/// The entry key of `values` and primary key `pk` (as [`Index::entry_for`] builds it).
#[cfg(test)]
pub(crate) fn entry_key(values: &[Vec<u8>], pk: &[u8]) -> Vec<u8> {
    let mut out = value_prefix(values);
    out.extend_from_slice(pk);
    out
}

/// Splits an entry key into its `n` components and the primary key.
pub(crate) fn decode_entry(entry: &[u8], n: usize) -> Option<(Vec<Vec<u8>>, &[u8])> {
    let mut values = Vec::with_capacity(n);
    let mut i = 0;
    for _ in 0..n {
        let mut v = Vec::new();
        loop {
            let b = *entry.get(i)?;
            if b == 0 {
                match *entry.get(i + 1)? {
                    0xFF => v.push(0),
                    0x01 => {
                        i += 2;
                        break;
                    }
                    _ => return None,
                }
                i += 2;
            } else {
                v.push(b);
                i += 1;
            }
        }
        values.push(v);
    }
    Some((values, &entry[i..]))
}

pub(crate) fn index_meta_key(prefix: &[u8], tree: &str, name: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(tree.as_bytes());
    k.push(b'/');
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn encode_def(keyspace: &str, paths: &[String], unique: bool) -> Vec<u8> {
    serde_json::json!({ "keyspace": keyspace, "paths": paths, "unique": unique })
        .to_string()
        .into_bytes()
}

/// Decodes a definition into (keyspace, paths, unique).
pub(crate) fn decode_def(bytes: &[u8]) -> Result<(String, Vec<String>, bool), String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("index entry is not JSON: {e}"))?;
    let keyspace = v
        .get("keyspace")
        .and_then(Value::as_str)
        .ok_or("index entry lacks `keyspace`")?
        .to_string();
    let paths = v
        .get("paths")
        .and_then(Value::as_array)
        .ok_or("index entry lacks `paths`")?
        .iter()
        .map(|p| p.as_str().map(str::to_string).ok_or("a path is not text"))
        .collect::<Result<Vec<_>, _>>()?;
    let unique = v.get("unique").and_then(Value::as_bool).unwrap_or(false);
    Ok((keyspace, paths, unique))
}

/// Human text of an index value, for errors and status (lossy).
pub(crate) fn values_text(values: &[Vec<u8>]) -> String {
    let parts: Vec<String> = values.iter().map(|v| crate::error::key_text(v)).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_sort_by_components_then_key_and_decode_back() {
        let e = |vals: &[&[u8]], pk: &[u8]| {
            entry_key(&vals.iter().map(|v| v.to_vec()).collect::<Vec<_>>(), pk)
        };
        // A shorter component sorts before its extensions, whatever follows it.
        assert!(e(&[b"ab"], b"zz") < e(&[b"ab\x00"], b"a"));
        assert!(e(&[b"ab"], b"zz") < e(&[b"abc"], b"a"));
        assert!(e(&[b"a", b"z"], b"k") < e(&[b"a\x00", b"a"], b"k"));
        assert!(e(&[b"a"], b"k1") < e(&[b"a"], b"k2"));
        let entry = e(&[b"x\x00y", b""], b"pk\x00\x01");
        let (vals, pk) = decode_entry(&entry, 2).unwrap();
        assert_eq!(vals, vec![b"x\x00y".to_vec(), Vec::new()]);
        assert_eq!(pk, b"pk\x00\x01");
        assert!(decode_entry(b"abc", 1).is_none());
    }

    #[test]
    fn json_pointers_are_checked() {
        assert!(is_valid_json_pointer("/email"));
        assert!(is_valid_json_pointer(""));
        assert!(is_valid_json_pointer("/a~1b/~0"));
        assert!(!is_valid_json_pointer("email"));
        assert!(!is_valid_json_pointer("/a~2"));
    }

    #[test]
    fn progress_round_trips() {
        let mut p = Progress::new();
        p.phase = Phase::Backfilling {
            cursor: vec![0, 1, 255],
        };
        p.entries = 7;
        p.add_duplicate(|| "x".into());
        assert_eq!(Progress::decode(&p.encode()).unwrap(), p);
        p.phase = Phase::Failed { reason: "r".into() };
        assert_eq!(Progress::decode(&p.encode()).unwrap(), p);
    }
}
