//! What an op does to the store: the one place that gives `CreateTree`, `DropTree`, `Put`,
//! `Delete`, `Merge`, `CreateIndex` and `DropIndex` their meaning, including the live
//! maintenance of secondary indexes: a write to an indexed tree reads the key's value before
//! it (store, or this batch's earlier writes) and replaces the old index entry with the new
//! one in the same atomic batch, so the index is exactly as current as the data it covers. Both the log applier (`Inner::apply_group`, live
//! commits and replay) and a bootstrap (`Engine::bootstrap_apply`, ops written outside the
//! log) build their store batch through [`StoreBatch`], so an op means the same on both paths.
//!
//! A `StoreBatch` collects writes into one atomic store batch and the catalog as it will be
//! once the batch commits. Nothing is visible before the caller commits the batch; keyspaces
//! created for new trees exist at once but no tree refers to them until the batch (which
//! holds their `tree/<name>` entries) commits, so a crash before that leaves only unreferenced
//! keyspaces, which open removes. The applier's compact copy of a transaction (`OpRef`,
//! `PackedTxn`) is in `packed`.
//!
//! Must never: commit the batch or publish the catalog (its caller does both, under the view
//! lock, with the applied position), check limits or conflicts (the commit path and bootstrap
//! do), or touch the log.

use std::sync::Arc;

// A batch's maps are keyed by keys and values from clients: foldhash is seeded per process
// (no fixed collisions to aim at) and several times cheaper than SipHash per short key.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use crate::catalog::{self, Catalog, Tree};
use crate::index::{self, DocEntry, Index, Parsed, Phase, Progress};
use crate::merge::MergeOperator;
use crate::packed::OpRef;
use crate::state::{Inner, tree_options};
use crate::store::{Batch, Store, StoreTree, TreeHandle, WriteBatch};

/// `value → existing key, new key` for a duplicate met on a unique index.
fn duplicate_text(idx: &Index, new: &DocEntry, other: &[u8], pk: &[u8]) -> String {
    let value = match new {
        DocEntry::Entry(e) => idx
            .decode_entry(e)
            .map(|(v, _)| index::values_text(&v))
            .unwrap_or_default(),
        _ => String::new(),
    };
    format!(
        "{value:?} → {:?}, {:?}",
        crate::error::key_text(other),
        crate::error::key_text(pk)
    )
}

/// How a tree created by an op names its keyspace.
#[derive(Clone, Copy, Debug)]
pub(crate) enum NewKeyspace {
    /// A logged op: `t<offset>.<op index>`, unique because offsets are.
    Log { offset: u64, op_index: usize },
    /// A bootstrap op, written outside the log (the offset does not move): `r<random>`, checked
    /// against the existing keyspaces.
    Restore,
}

/// A value [`StoreBatch::current_value`] read: a copy of one an earlier op of the batch
/// wrote, or the store's own (no copy).
pub(crate) enum Current {
    Written(Vec<u8>),
    Stored(<TreeHandle as StoreTree>::Value),
}

impl std::ops::Deref for Current {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Current::Written(v) => v,
            Current::Stored(v) => v,
        }
    }
}

/// Values written by earlier ops of a batch, by keyspace then key (`None`: deleted). Two
/// levels, so that a lookup borrows its keyspace and key instead of building an owned pair.
#[derive(Default)]
pub(crate) struct Overlay(HashMap<String, HashMap<Vec<u8>, Option<Vec<u8>>>>);

impl Overlay {
    pub(crate) fn get(&self, keyspace: &str, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.0.get(keyspace)?.get(key)
    }

    pub(crate) fn insert(&mut self, keyspace: &str, key: Vec<u8>, value: Option<Vec<u8>>) {
        match self.0.get_mut(keyspace) {
            Some(m) => {
                m.insert(key, value);
            }
            None => {
                let mut m = HashMap::default();
                m.insert(key, value);
                self.0.insert(keyspace.to_string(), m);
            }
        }
    }

    pub(crate) fn remove(&mut self, keyspace: &str, key: &[u8]) {
        if let Some(m) = self.0.get_mut(keyspace) {
            m.remove(key);
        }
    }

    /// The keys of `keyspace` written so far, in no order.
    pub(crate) fn keys(&self, keyspace: &str) -> impl Iterator<Item = &Vec<u8>> {
        self.0.get(keyspace).into_iter().flat_map(|m| m.keys())
    }
}

/// The entries a batch writes (`true`) or removes (`false`) in one index's keyspace; the last
/// change of an entry in the batch wins, so each entry is written once.
pub(crate) struct IndexWrites {
    handle: TreeHandle,
    entries: HashMap<Vec<u8>, bool>,
}

/// A chunk written earlier in the same batch: its keyspace, range and entries (ascending).
pub(crate) struct ChunkWrite {
    pub(crate) keyspace: String,
    pub(crate) from: Vec<u8>,
    pub(crate) to: Option<Vec<u8>>,
    pub(crate) entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ChunkWrite {
    pub(crate) fn covers(&self, key: &[u8]) -> bool {
        key >= self.from.as_slice() && self.to.as_deref().is_none_or(|to| key < to)
    }

    /// The chunk's value for `key`, which it covers.
    pub(crate) fn value(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.entries
            .binary_search_by(|(k, _)| k.as_slice().cmp(key))
            .ok()
            .map(|i| &self.entries[i].1)
    }
}

/// One atomic store batch under construction. See the module docs.
pub(crate) struct StoreBatch<'a> {
    pub(crate) inner: &'a Inner,
    pub(crate) batch: Batch,
    /// The catalog before the batch.
    pub(crate) base: Arc<Catalog>,
    /// The catalog as of the ops so far, once an op changed it.
    pub(crate) catalog: Option<Catalog>,
    /// Keyspaces of trees dropped by the batch, to remove once it committed.
    pub(crate) dropped: Vec<TreeHandle>,
    /// Whether to remember every written value (`overlay`): needed when a later op of the
    /// batch may read any of them (a merge, an index created mid-batch, or a bootstrap chunk
    /// replacing a range). Writes to a tree with indexes are remembered regardless: a later
    /// write of the same key reads its value before it.
    pub(crate) track: bool,
    /// Values written by earlier ops of the batch.
    pub(crate) overlay: Overlay,
    /// Chunks written earlier in the batch (bootstrap only), oldest first; not the call's
    /// leading chunks, which are ingested into the store before the batch and read from it. An overlay entry is
    /// always newer than every chunk covering its key (a chunk clears the overlay in its range).
    pub(crate) chunks: Vec<ChunkWrite>,
    /// Index entries to write or remove, by index keyspace.
    pub(crate) index_writes: HashMap<String, IndexWrites>,
    /// Progress of every index the batch changed, by index keyspace, as of the ops so far.
    pub(crate) progress: HashMap<String, (Arc<Index>, Progress)>,
    /// Test-only canary (`unsafe_skip_index_replay`): no live maintenance.
    pub(crate) skip_maintenance: bool,
    /// Scratch list of the indexes one write maintains (kept to save an allocation per op).
    idx_scratch: Vec<Arc<Index>>,
    /// When set, a write to an indexed tree is remembered only if the hash of its tree and
    /// key is in the set: the keys a group writes more than once (see
    /// [`StoreBatch::remember_repeats_only`]). `None`: every such write is remembered.
    repeated: Option<(foldhash::fast::RandomState, HashSet<u64>)>,
    /// Writes to indexed trees the batch will apply, when known: sizes the index entry maps.
    indexed_writes: usize,
    /// Primary keys this batch gave each value of a unique index, by (index keyspace, the
    /// entry's value prefix): a second holder of a value within one batch is a duplicate
    /// too, though the store's index does not hold either entry yet.
    unique_puts: HashMap<(String, Vec<u8>), Vec<Vec<u8>>>,
}

type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// The tree and key an op writes, if it writes one.
fn written_key<'o>(op: &OpRef<'o>) -> Option<(&'o str, &'o [u8])> {
    match *op {
        OpRef::Put { tree, key, .. }
        | OpRef::Delete { tree, key }
        | OpRef::Merge { tree, key, .. } => Some((tree, key)),
        _ => None,
    }
}

/// An index's progress as a committed batch leaves it (see [`StoreBatch::into_parts`]).
pub(crate) type ProgressUpdate = (Arc<Index>, Progress);

impl<'a> StoreBatch<'a> {
    pub(crate) fn new(inner: &'a Inner, base: Arc<Catalog>, track: bool) -> StoreBatch<'a> {
        StoreBatch {
            inner,
            batch: inner.db.batch(),
            base,
            catalog: None,
            dropped: Vec::new(),
            track,
            overlay: Overlay::default(),
            chunks: Vec::new(),
            index_writes: HashMap::default(),
            progress: HashMap::default(),
            skip_maintenance: false,
            idx_scratch: Vec::new(),
            repeated: None,
            indexed_writes: 0,
            unique_puts: HashMap::default(),
        }
    }

    /// Remembers writes to indexed trees only where a later op of `ops` (all the ops this
    /// batch will apply, in order) writes the same key again: the only reads of the overlay
    /// that are not `track`'s are the value-before reads of later writes. Sound while no op
    /// adds an index mid-batch, which sets `track` (then everything is remembered anyway).
    pub(crate) fn remember_repeats_only<'o>(&mut self, ops: impl Iterator<Item = OpRef<'o>>) {
        if self.track {
            return;
        }
        let state = foldhash::fast::RandomState::default();
        let (mut seen, mut repeated) = (HashSet::default(), HashSet::default());
        for (tree, key) in ops.filter_map(|op| written_key(&op)) {
            if self.has_indexes(tree) {
                self.indexed_writes += 1;
                let h = std::hash::BuildHasher::hash_one(&state, (tree, key));
                if !seen.insert(h) {
                    repeated.insert(h);
                }
            }
        }
        self.repeated = Some((state, repeated));
    }

    /// The catalog as of the ops added so far.
    pub(crate) fn catalog(&self) -> &Catalog {
        self.catalog.as_ref().unwrap_or(&self.base)
    }

    fn catalog_mut(&mut self) -> &mut Catalog {
        let base = &self.base;
        self.catalog.get_or_insert_with(|| (**base).clone())
    }

    /// The batch (with its index entries and the progress records of the indexes it
    /// changed), the new catalog if an op changed it, the keyspaces to remove after the batch
    /// committed, and the progress to publish once it committed.
    pub(crate) fn into_parts(
        mut self,
    ) -> (Batch, Option<Catalog>, Vec<TreeHandle>, Vec<ProgressUpdate>) {
        for (_, w) in self.index_writes.drain() {
            for (entry, put) in w.entries {
                if put {
                    self.batch.insert(&w.handle, &entry, b"");
                } else {
                    self.batch.remove(&w.handle, &entry);
                }
            }
        }
        let mut updates = Vec::with_capacity(self.progress.len());
        for (_, (idx, p)) in self.progress.drain() {
            self.batch.insert(
                &self.inner.meta,
                &index::index_meta_key(index::INDEX_STATE_PREFIX, &idx.tree, &idx.name),
                &p.encode(),
            );
            updates.push((idx, p));
        }
        (self.batch, self.catalog, self.dropped, updates)
    }

    /// The working copy of `idx`'s progress in this batch.
    pub(crate) fn progress_mut(&mut self, idx: &Arc<Index>) -> &mut Progress {
        if !self.progress.contains_key(&idx.keyspace) {
            self.progress
                .insert(idx.keyspace.clone(), (idx.clone(), idx.progress()));
        }
        &mut self
            .progress
            .get_mut(&idx.keyspace)
            .expect("inserted above when missing")
            .1
    }

    /// Records that `entry` of `idx` is written (`put`) or removed by this batch.
    fn index_write(&mut self, idx: &Index, entry: Vec<u8>, put: bool) {
        match self.index_writes.get_mut(&idx.keyspace) {
            Some(w) => {
                w.entries.insert(entry, put);
            }
            None => {
                // An update removes one entry and writes another.
                let mut entries =
                    HashMap::with_capacity_and_hasher(2 * self.indexed_writes, Default::default());
                entries.insert(entry, put);
                self.index_writes.insert(
                    idx.keyspace.clone(),
                    IndexWrites {
                        handle: idx.handle.clone(),
                        entries,
                    },
                );
            }
        }
    }

    /// Whether this batch removes `entry` of the index in `keyspace`.
    fn index_removes(&self, keyspace: &str, entry: &[u8]) -> bool {
        self.index_writes
            .get(keyspace)
            .and_then(|w| w.entries.get(entry))
            == Some(&false)
    }

    /// Keeps the indexes of `tree` in step with `key` changing from `before` to `after`
    /// (live maintenance): the old entry goes, the new one comes, and the counters move when
    /// the key lies in the backfilled part.
    fn maintain(
        &mut self,
        tree: &str,
        key: &[u8],
        before: Option<&[u8]>,
        after: Option<&[u8]>,
    ) -> Result<(), String> {
        let mut idxs = std::mem::take(&mut self.idx_scratch);
        idxs.clear();
        if let Some(m) = self.catalog().indexes_of(tree) {
            idxs.extend(m.values().cloned());
        }
        let result = self.maintain_with(&idxs, key, before, after);
        idxs.clear();
        self.idx_scratch = idxs;
        result
    }

    fn maintain_with(
        &mut self,
        idxs: &[Arc<Index>],
        key: &[u8],
        before: Option<&[u8]>,
        after: Option<&[u8]>,
    ) -> Result<(), String> {
        let mut parsed_before = Parsed::for_indexes(idxs.len());
        let mut parsed_after = Parsed::for_indexes(idxs.len());
        for idx in idxs {
            let old = idx.entry_for(key, before, &mut parsed_before);
            let new = idx.entry_for(key, after, &mut parsed_after);
            if old == new {
                continue;
            }
            let counted = |d: &DocEntry, sign: i64| match d {
                DocEntry::Entry(_) => (sign, 0),
                DocEntry::Skipped => (0, sign),
                DocEntry::Absent => (0, 0),
            };
            let (e1, s1) = counted(&old, -1);
            let (e2, s2) = counted(&new, 1);
            if let DocEntry::Entry(e) = old {
                self.index_write(idx, e, false);
            }
            // A pair of keys sharing a value is counted once: while the index backfills, only
            // when both keys lie below the cursor. A key at or past it is met again by the
            // backfill, which counts it against the holders sorting before it (so a pair
            // across the cursor is counted there, not here as well).
            let duplicate = match &new {
                DocEntry::Entry(e) if idx.unique => match self.backfill_cursor(idx) {
                    None => self.other_holder(idx, e, key, None)?,
                    Some(cursor) if key < cursor.as_slice() => {
                        self.other_holder(idx, e, key, Some(&cursor))?
                    }
                    Some(_) => None,
                },
                _ => None,
            };
            let example = duplicate.map(|other| duplicate_text(idx, &new, &other, key));
            if let DocEntry::Entry(e) = new {
                if idx.unique {
                    let prefix = e[..e.len() - key.len()].to_vec();
                    let holders = self
                        .unique_puts
                        .entry((idx.keyspace.clone(), prefix))
                        .or_default();
                    if !holders.iter().any(|k| k == key) {
                        holders.push(key.to_vec());
                    }
                }
                self.index_write(idx, e, true);
            }
            // An entry replaced by another (the common update) moves no counter: the progress
            // record is then neither copied nor rewritten by this batch.
            if example.is_none() && e1 + e2 == 0 && s1 + s2 == 0 {
                continue;
            }
            let p = self.progress_mut(idx);
            if let Some(example) = example {
                p.add_duplicate(|| example);
            }
            if p.counts(key) {
                p.entries = p.entries.saturating_add_signed(e1 + e2);
                p.skipped = p.skipped.saturating_add_signed(s1 + s2);
            }
        }
        Ok(())
    }

    /// The backfill cursor of `idx` as this batch sees it: `None` once the index is live.
    fn backfill_cursor(&self, idx: &Index) -> Option<Vec<u8>> {
        let cursor = |p: &Progress| match &p.phase {
            Phase::Backfilling { cursor } => Some(cursor.clone()),
            Phase::Live | Phase::Failed { .. } => None,
        };
        match self.progress.get(&idx.keyspace) {
            Some((_, p)) => cursor(p),
            None => cursor(&crate::state::lock(&idx.progress)),
        }
    }

    /// Another primary key, sorting before `below` when that is given, that holds the value
    /// of `entry` (whose primary key is `pk`): in the store's index, unless this batch
    /// removes that entry, or put by an earlier write of this batch and not removed since.
    pub(crate) fn other_holder(
        &self,
        idx: &Index,
        entry: &[u8],
        pk: &[u8],
        below: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>, String> {
        let prefix = &entry[..entry.len() - pk.len()];
        let in_range = |k: &[u8]| below.is_none_or(|b| k < b);
        for kv in idx.handle.prefix(prefix) {
            let (k, _) = kv.map_err(|e| format!("read index `{}`: {e}", idx.name))?;
            let other = &k[prefix.len()..];
            // Entries of one value come in primary-key order.
            if !in_range(other) {
                break;
            }
            if other == pk {
                continue;
            }
            if !self.index_removes(&idx.keyspace, &k) {
                return Ok(Some(other.to_vec()));
            }
        }
        if let Some(holders) = self
            .unique_puts
            .get(&(idx.keyspace.clone(), prefix.to_vec()))
        {
            let writes = self.index_writes.get(&idx.keyspace);
            for other in holders.iter().filter(|k| k.as_slice() != pk && in_range(k)) {
                let mut e = prefix.to_vec();
                e.extend_from_slice(other);
                if writes.and_then(|w| w.entries.get(&e)) == Some(&true) {
                    return Ok(Some(other.clone()));
                }
            }
        }
        Ok(None)
    }

    /// Creates index `name` on `tree` (no-op when the tree is missing or the index exists).
    fn create_index(
        &mut self,
        tree: &str,
        name: &str,
        paths: &[String],
        unique: bool,
        at: NewKeyspace,
    ) -> Result<(), String> {
        if self.catalog().get(tree).is_none() || self.catalog().index(tree, name).is_some() {
            return Ok(());
        }
        let keyspace = self.new_keyspace_name('i', at);
        let handle = self
            .inner
            .db
            .tree(&keyspace, &tree_options(&self.inner.opts))
            .map_err(|e| format!("create keyspace {keyspace}: {e}"))?;
        self.batch.insert(
            &self.inner.meta,
            &index::index_meta_key(index::INDEX_PREFIX, tree, name),
            &index::encode_def(&keyspace, paths, unique),
        );
        self.batch.insert(
            &self.inner.meta,
            catalog::KEY_KEYSPACE_ID_NEXT,
            handle.id().saturating_add(1).to_le_bytes().as_slice(),
        );
        let idx = Index::new(
            tree,
            name,
            paths.to_vec(),
            unique,
            keyspace.clone(),
            handle,
            Progress::new(),
        );
        self.progress
            .insert(keyspace, (idx.clone(), Progress::new()));
        self.catalog_mut()
            .indexes
            .entry(tree.to_string())
            .or_default()
            .insert(name.to_string(), idx);
        Ok(())
    }

    /// Drops index `name` of `tree` if it exists: its entries in this batch, its keyspace
    /// after it.
    pub(crate) fn drop_index(&mut self, tree: &str, name: &str) {
        let Some(idx) = self.catalog().index(tree, name).cloned() else {
            return;
        };
        self.batch.remove(
            &self.inner.meta,
            &index::index_meta_key(index::INDEX_PREFIX, tree, name),
        );
        self.batch.remove(
            &self.inner.meta,
            &index::index_meta_key(index::INDEX_STATE_PREFIX, tree, name),
        );
        self.progress.remove(&idx.keyspace);
        self.index_writes.remove(&idx.keyspace);
        self.dropped.push(idx.handle.clone());
        let cat = self.catalog_mut();
        if let Some(m) = cat.indexes.get_mut(tree) {
            m.remove(name);
            if m.is_empty() {
                cat.indexes.remove(tree);
            }
        }
    }

    /// A fresh keyspace name: `<kind><offset>.<op index>` for a logged op, `r<random>` for a
    /// bootstrap op.
    fn new_keyspace_name(&self, kind: char, at: NewKeyspace) -> String {
        match at {
            NewKeyspace::Log { offset, op_index } => format!("{kind}{offset}.{op_index}"),
            NewKeyspace::Restore => loop {
                let name = format!("r{:016x}", rand::random::<u64>());
                if !self.inner.db.tree_exists(&name) {
                    break name;
                }
            },
        }
    }

    fn has_indexes(&self, tree: &str) -> bool {
        !self.skip_maintenance && self.catalog().indexes_of(tree).is_some()
    }

    /// Adds `op` to the batch with its one meaning: creating an existing tree keeps it
    /// (operator and data), creating one with an operator this build does not know is an
    /// error (only a newer build's log holds one); dropping a missing tree does nothing; a
    /// data op on a missing tree creates the tree without an operator (submission refuses
    /// such ops; a log written by another build might hold one, and apply stays total and
    /// deterministic); a merge is resolved against the tree's current value (this batch's
    /// writes included) with the tree's operator, or stores the operand when the tree has
    /// none.
    pub(crate) fn apply_op(&mut self, op: OpRef<'_>, at: NewKeyspace) -> Result<(), String> {
        match op {
            OpRef::CreateTree {
                tree,
                merge_operator,
            } => {
                if self.catalog().get(tree).is_none() {
                    // Without its operator the tree's merges would mean something else.
                    let merge = match merge_operator {
                        None => None,
                        Some(name) => Some(MergeOperator::from_name(name).ok_or_else(|| {
                            format!(
                                "tree `{tree}` is created with merge operator `{name}`, which \
                                 this build does not know (built-ins are {}): the log was \
                                 written by a newer Tideline build; run that build or a newer \
                                 one",
                                crate::merge::known_operators()
                            )
                        })?),
                    };
                    self.create_tree(tree, merge, at)?;
                }
            }
            OpRef::DropTree { tree } => self.drop_tree(tree),
            OpRef::Put { tree, key, value } => {
                let t = self.tree_for_data(tree, at)?;
                if self.has_indexes(tree) {
                    let before = self.current_value(&t, key)?;
                    self.maintain(tree, key, before.as_deref(), Some(value))?;
                }
                self.batch.insert(&t.handle, key, value);
                self.remember(tree, &t, key, Some(value));
            }
            OpRef::Delete { tree, key } => {
                let t = self.tree_for_data(tree, at)?;
                if self.has_indexes(tree) {
                    let before = self.current_value(&t, key)?;
                    self.maintain(tree, key, before.as_deref(), None)?;
                }
                self.batch.remove(&t.handle, key);
                self.remember(tree, &t, key, None);
            }
            OpRef::Merge { tree, key, operand } => {
                let t = self.tree_for_data(tree, at)?;
                let existing = self.current_value(&t, key)?;
                let value = match t.merge {
                    Some(m) => m.resolve(existing.as_deref(), operand),
                    // Refused on submission; a deterministic meaning all the same.
                    None => operand.to_vec(),
                };
                if self.has_indexes(tree) {
                    self.maintain(tree, key, existing.as_deref(), Some(&value))?;
                }
                self.batch.insert(&t.handle, key, &value);
                self.overlay.insert(&t.keyspace, key.to_vec(), Some(value));
            }
            OpRef::CreateIndex {
                tree,
                name,
                paths,
                unique,
            } => self.create_index(tree, name, paths, unique, at)?,
            OpRef::DropIndex { tree, name } => self.drop_index(tree, name),
        }
        Ok(())
    }

    fn remember(&mut self, tree: &str, t: &Tree, key: &[u8], value: Option<&[u8]>) {
        let read_again = || match &self.repeated {
            Some((state, set)) => {
                set.contains(&std::hash::BuildHasher::hash_one(state, (tree, key)))
            }
            None => true,
        };
        if self.track || (self.has_indexes(tree) && read_again()) {
            self.overlay
                .insert(&t.keyspace, key.to_vec(), value.map(<[u8]>::to_vec));
        }
    }

    /// The value of `key` in tree `t` as of the ops added so far.
    pub(crate) fn current_value(&self, t: &Tree, key: &[u8]) -> Result<Option<Current>, String> {
        if let Some(v) = self.overlay.get(&t.keyspace, key) {
            return Ok(v.clone().map(Current::Written));
        }
        if let Some(c) = self
            .chunks
            .iter()
            .rev()
            .find(|c| c.keyspace == t.keyspace && c.covers(key))
        {
            return Ok(c.value(key).cloned().map(Current::Written));
        }
        Ok(t.handle
            .get(key)
            .map_err(|e| format!("read for merge: {e}"))?
            .map(Current::Stored))
    }

    /// Creates `tree` (which must not exist in the batch's catalog) in a fresh keyspace.
    pub(crate) fn create_tree(
        &mut self,
        tree: &str,
        merge: Option<MergeOperator>,
        at: NewKeyspace,
    ) -> Result<Arc<Tree>, String> {
        let keyspace = self.new_keyspace_name('t', at);
        let handle = self
            .inner
            .db
            .tree(&keyspace, &tree_options(&self.inner.opts))
            .map_err(|e| format!("create keyspace {keyspace}: {e}"))?;
        self.batch.insert(
            &self.inner.meta,
            &catalog::tree_meta_key(tree),
            &catalog::encode_tree_meta(&keyspace, merge),
        );
        // Ids only grow within a process, so the last creation of a batch records the bound.
        self.batch.insert(
            &self.inner.meta,
            catalog::KEY_KEYSPACE_ID_NEXT,
            handle.id().saturating_add(1).to_le_bytes().as_slice(),
        );
        let t = Arc::new(Tree {
            merge,
            keyspace,
            handle,
        });
        self.catalog_mut().trees.insert(tree.to_string(), t.clone());
        Ok(t)
    }

    /// Drops `tree` (and its indexes) if it exists: its entry goes in this batch, its
    /// keyspace after it.
    pub(crate) fn drop_tree(&mut self, tree: &str) {
        let Some(t) = self.catalog().get(tree).cloned() else {
            return;
        };
        let names: Vec<String> = self
            .catalog()
            .indexes_of(tree)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.drop_index(tree, &name);
        }
        self.batch
            .remove(&self.inner.meta, &catalog::tree_meta_key(tree));
        self.dropped.push(t.handle.clone());
        self.catalog_mut().trees.remove(tree);
    }

    /// The tree a data op applies to; see [`StoreBatch::apply_op`] for a missing one.
    fn tree_for_data(&mut self, tree: &str, at: NewKeyspace) -> Result<Arc<Tree>, String> {
        if let Some(t) = self.catalog().get(tree) {
            return Ok(t.clone());
        }
        tracing::warn!(tree, at = ?at, "an op writes to a missing tree; creating it");
        self.create_tree(tree, None, at)
    }
}
