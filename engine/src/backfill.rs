//! The backfill of secondary indexes, and the index API of the engine.
//!
//! Owns: the backfill thread ([`Inner::backfill_loop`]), which walks each backfilling index's
//! tree in key ranges; [`Engine::create_index`], [`Engine::drop_index`] (logged
//! transactions), [`Engine::indexes`] and the index queries of [`Snapshot`].
//!
//! How a backfill stays correct while writes go on: from the batch that applied its
//! `CreateIndex` on, live maintenance (in `apply`) keeps the index entry of *every* written
//! key current. A backfill step takes the index lock, which the applier holds across each
//! group apply, reads the *current* values of the next range of at most
//! `EngineOptions::index_backfill_keys` keys (and, for large documents, about
//! [`BACKFILL_STEP_BYTES_MAX`] bytes), and writes their entries, the counters and the cursor (the
//! first key not yet backfilled) in one store batch. An entry computed from the current value
//! is never stale, and a key written before the step already has the same entry, so the
//! result equals a recomputation once the cursor passes the last key. Writers wait for at
//! most one range. The cursor is persisted with the entries, so after a crash the backfill
//! resumes at the range after the last one stored; recovery replays the log through the same
//! live maintenance.
//!
//! Must never: write entries for a range outside the index lock, or touch the log.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tideline_wal::Op;

use crate::apply::StoreBatch;
use crate::engine::Engine;
use crate::error::{ReadError, WriteError};
use crate::index::{self, DocEntry, Index, IndexInfo, Parsed, Phase};
use crate::snapshot::{KeyValue, Snapshot};
use crate::state::{CommitInfo, Inner, lock};
use crate::store::{StoreSnapshot, StoreTree, WriteBatch};

/// One page of an index scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexPage {
    /// Documents (primary key, value) in index order.
    pub rows: Vec<KeyValue>,
    /// The entry key to pass as `after` for the next page; `None`: no more.
    pub next: Option<Vec<u8>>,
}

/// Bytes a row takes in a protocol answer holding an index page (`IndexRows`) besides its
/// key and value: the archived key and value vectors, 4 bytes of position and 4 of length
/// each. Counted so that a page of several rows stays within `bytes_max` as sent, and a page
/// that stops before a large row leaves that row to a page of its own, which fits a message.
const INDEX_ROW_ENVELOPE_BYTES: u64 = 16;

impl Engine {
    /// Declares index `name` on `tree` over the JSON pointers `paths` (a logged
    /// transaction, so replicas get it). The index is backfilled in the background while
    /// writes go on; see [`Engine::indexes`] for its state. With `unique`, once live, a
    /// transaction that would give a second key the same value is refused
    /// ([`WriteError::UniqueViolation`]).
    pub fn create_index(
        &self,
        tree: &str,
        name: &str,
        paths: &[&str],
        unique: bool,
    ) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.create_index(tree, name, paths, unique)?;
        tx.commit()?.ok_or_else(|| WriteError::IndexExists {
            tree: tree.into(),
            name: name.into(),
        })
    }

    /// Drops index `name` of `tree` (a logged transaction).
    pub fn drop_index(&self, tree: &str, name: &str) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.drop_index(tree, name)?;
        tx.commit()?.ok_or_else(|| WriteError::UnknownIndex {
            tree: tree.into(),
            name: name.into(),
        })
    }

    /// Every index, by tree then name, with its state and counters.
    pub fn indexes(&self) -> Vec<IndexInfo> {
        self.inner
            .current_catalog()
            .all_indexes()
            .map(|i| i.info())
            .collect()
    }

    /// Waits until no index is backfilling (or `timeout` passed); returns whether none is.
    pub fn wait_indexes_live(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let busy = self
                .inner
                .current_catalog()
                .all_indexes()
                .any(|i| matches!(i.progress().phase, Phase::Backfilling { .. }));
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl crate::txn::Txn<'_> {
    /// Declares index `name` on `tree` over `paths` (JSON pointers). Checked at commit:
    /// the tree must exist and the index must not.
    pub fn create_index(
        &mut self,
        tree: &str,
        name: &str,
        paths: &[&str],
        unique: bool,
    ) -> Result<(), WriteError> {
        self.push_op(Op::CreateIndex {
            tree: tree.into(),
            name: name.into(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            unique,
        });
        Ok(())
    }

    /// Drops index `name` of `tree`. Checked at commit: the index must exist.
    pub fn drop_index(&mut self, tree: &str, name: &str) -> Result<(), WriteError> {
        self.push_op(Op::DropIndex {
            tree: tree.into(),
            name: name.into(),
        });
        Ok(())
    }
}

impl Snapshot {
    fn live_index(&self, tree: &str, name: &str) -> Result<&Arc<Index>, ReadError> {
        let idx = self
            .catalog()
            .index(tree, name)
            .ok_or_else(|| ReadError::UnknownIndex {
                tree: tree.into(),
                name: name.into(),
            })?;
        let info = idx.info();
        match info.state {
            // Live now; but this snapshot may be older than the go-live, and its index
            // keyspace then holds only what the backfill had reached. Its own progress
            // record (written in the batch with those entries) says which.
            index::IndexState::Live => {
                let key = index::index_meta_key(index::INDEX_STATE_PREFIX, tree, name);
                let live_here = match self.meta_get(&key)? {
                    Some(bytes) => {
                        matches!(index::Progress::decode(&bytes), Ok(p) if p.phase == Phase::Live)
                    }
                    None => false,
                };
                if live_here {
                    Ok(idx)
                } else {
                    Err(ReadError::IndexNotLive {
                        tree: tree.into(),
                        name: name.into(),
                        state: "live now but backfilling as of this snapshot (take a new one)"
                            .into(),
                    })
                }
            }
            index::IndexState::Backfilling { percent, .. } => Err(ReadError::IndexNotLive {
                tree: tree.into(),
                name: name.into(),
                state: format!("backfilling ({percent:.1}%)"),
            }),
            index::IndexState::Failed { reason } => Err(ReadError::IndexNotLive {
                tree: tree.into(),
                name: name.into(),
                state: format!("failed ({reason}); drop and create it again"),
            }),
        }
    }

    /// The indexes of `tree` in this snapshot (their definitions, and their state now).
    pub fn indexes(&self, tree: &str) -> Vec<IndexInfo> {
        self.catalog()
            .indexes_of(tree)
            .map(|m| m.values().map(|i| i.info()).collect())
            .unwrap_or_default()
    }

    /// Whether index `name` of `tree` exists and is live.
    pub fn index_is_live(&self, tree: &str, name: &str) -> Result<bool, ReadError> {
        match self.live_index(tree, name) {
            Ok(_) => Ok(true),
            Err(ReadError::IndexNotLive { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The documents whose leading index components equal `values` (one per path, or fewer
    /// for a composite index), in index order, all read from this snapshot: at most `limit`
    /// rows; `next` is set when more are left. Refused while the index is not live.
    pub fn index_get(
        &self,
        tree: &str,
        name: &str,
        values: &[Vec<u8>],
        limit: usize,
    ) -> Result<IndexPage, ReadError> {
        self.index_scan(tree, name, values, b"", None, limit, u64::MAX)
    }

    /// One page of the index in order: entries whose leading components equal `values` and
    /// whose next component starts with `prefix`, strictly after entry key `after` (from a
    /// previous page's `next`): at most `limit` rows and `bytes_max` bytes, each row counted
    /// as its primary key, its value and the 16 bytes that frame them in an answer: the page
    /// stops before the row that would pass either bound, unless that row is the first (a
    /// page is never empty while entries are left), and `next` is the entry of its last row,
    /// so the next page starts with the row this one left. Refused while the index is not
    /// live, and refused with more `values` than the index has paths.
    #[expect(
        clippy::too_many_arguments,
        reason = "a query's parts; a struct adds nothing"
    )]
    pub fn index_scan(
        &self,
        tree: &str,
        name: &str,
        values: &[Vec<u8>],
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: u64,
    ) -> Result<IndexPage, ReadError> {
        let idx = self.live_index(tree, name)?;
        // Values past the last path would be matched against primary-key bytes.
        if values.len() > idx.paths.len() {
            return Err(ReadError::IndexTooManyValues {
                tree: tree.into(),
                name: name.into(),
                paths: idx.paths.len(),
                values: values.len(),
            });
        }
        let t = self
            .catalog()
            .get(tree)
            .ok_or_else(|| ReadError::UnknownTree(tree.into()))?;
        let mut start = index::value_prefix(values);
        if values.len() < idx.paths.len() {
            index::push_escaped(&mut start, prefix);
        }
        let lo = match after {
            Some(a) if a >= start.as_slice() => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(start.clone()),
        };
        let hi = match crate::txn::prefix_end(&start) {
            Some(e) => Bound::Excluded(e),
            None => Bound::Unbounded,
        };
        let mut page = IndexPage::default();
        let mut bytes = 0u64;
        let store = self.store();
        let mut last = None;
        for kv in store.range(&idx.handle, (lo, hi)) {
            let (entry, _) = kv?;
            if page.rows.len() >= limit {
                page.next = last;
                return Ok(page);
            }
            // Maintained in the same batch as the data: the entry's document is in this
            // snapshot and maps to this very entry. Anything else is damage, said loudly.
            let damaged = |key: &[u8]| ReadError::IndexDamaged {
                tree: tree.into(),
                name: name.into(),
                key: crate::error::key_text(key),
            };
            let Some((_, pk)) = idx.decode_entry(&entry) else {
                return Err(damaged(&entry));
            };
            let Some(v) = store.get(&t.handle, pk)? else {
                return Err(damaged(pk));
            };
            // A row the page leaves is verified by the page that returns it.
            let row_bytes = (pk.len() + v.len()) as u64 + INDEX_ROW_ENVELOPE_BYTES;
            if !page.rows.is_empty() && bytes.saturating_add(row_bytes) > bytes_max {
                page.next = last;
                return Ok(page);
            }
            if idx.entry_for(pk, Some(&v), &mut Parsed::default()) != DocEntry::Entry(entry.clone())
            {
                return Err(damaged(pk));
            }
            bytes += row_bytes;
            page.rows.push((pk.to_vec(), v.to_vec()));
            last = Some(entry);
        }
        Ok(page)
    }
}

/// Bytes (keys and values) a backfill step reads at most, besides the document that passes
/// it: every commit waits for a step (the applier takes the index lock for each group), so a
/// step over large documents must end early. A step always takes at least one document.
pub(crate) const BACKFILL_STEP_BYTES_MAX: u64 = 4 << 20;

/// Whether a backfill step that has read `docs` documents of `bytes` bytes (keys and values)
/// ends before the next one: at `keys_max` documents (`EngineOptions::index_backfill_keys`,
/// at least 1), or once [`BACKFILL_STEP_BYTES_MAX`] bytes were read.
fn step_is_full(docs: usize, bytes: u64, keys_max: usize) -> bool {
    docs >= keys_max.max(1) || (docs > 0 && bytes >= BACKFILL_STEP_BYTES_MAX)
}

impl Inner {
    /// The backfill thread: runs steps while any index is backfilling, naps otherwise. A
    /// step that fails (reading the tree or the index, or committing its batch) makes the
    /// engine fail-stop; no index is marked failed.
    pub(crate) fn backfill_loop(self: Arc<Self>) {
        loop {
            if self.stopping.load(Ordering::SeqCst) || self.failed.load(Ordering::SeqCst) {
                return;
            }
            self.killed_by_test("backfill");
            match self.backfill_step() {
                Ok(true) => {}
                Ok(false) => std::thread::park_timeout(Duration::from_millis(20)),
                Err(reason) => {
                    self.fail(format!("index backfill: {reason}"));
                    return;
                }
            }
        }
    }

    /// Backfills the next range of the first backfilling index. `Ok(false)`: nothing to do.
    pub(crate) fn backfill_step(&self) -> Result<bool, String> {
        let _serial = lock(&self.index_lock);
        if self.bootstrapping.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let cat = self.current_catalog();
        let Some((idx, cursor)) = cat.all_indexes().find_map(|i| match i.progress().phase {
            Phase::Backfilling { cursor } => Some((i.clone(), cursor)),
            _ => None,
        }) else {
            return Ok(false);
        };
        let Some(t) = cat.get(&idx.tree).cloned() else {
            return Ok(false);
        };
        {
            let mut base = lock(&idx.rate_base);
            if base.is_none() {
                *base = Some((Instant::now(), idx.progress().backfilled));
            }
        }
        let mut sb = StoreBatch::new(self, cat.clone(), false);
        let mut p = sb.progress_mut(&idx).clone();
        if cursor.is_empty() && p.backfilled == 0 {
            p.total_estimate = t.handle.approximate_len();
        }
        let mut n = 0usize;
        let mut next_cursor = None;
        // Values this step indexed, for duplicates within the range (unique indexes).
        let mut seen: std::collections::HashMap<Vec<u8>, Vec<u8>> = Default::default();
        let mut bytes = 0u64;
        for kv in t.handle.range((Bound::Included(cursor), Bound::Unbounded)) {
            let (k, v) = kv.map_err(|e| format!("read tree `{}`: {e}", idx.tree))?;
            if step_is_full(n, bytes, self.opts.index_backfill_keys) {
                next_cursor = Some(k);
                break;
            }
            n += 1;
            bytes = bytes.saturating_add((k.len() + v.len()) as u64);
            match idx.entry_for(&k, Some(&v), &mut Parsed::default()) {
                DocEntry::Entry(e) => {
                    // A pair sharing a value is counted once, at its later key: against a
                    // key this step met before (`seen`), else against a holder sorting before
                    // this key (backfilled, or written since the declaration). A holder
                    // sorting after it is counted when the backfill or its write meets it.
                    let holder = if idx.unique {
                        let prefix = e[..e.len() - k.len()].to_vec();
                        match seen.insert(prefix, k.clone()) {
                            Some(other) if other != k => Some(other),
                            _ => sb.other_holder(&idx, &e, &k, Some(&k))?,
                        }
                    } else {
                        None
                    };
                    if let Some(other) = holder {
                        let value = idx
                            .decode_entry(&e)
                            .map(|(v, _)| index::values_text(&v))
                            .unwrap_or_default();
                        p.add_duplicate(|| {
                            format!(
                                "{value:?} → {:?}, {:?}",
                                crate::error::key_text(&other),
                                crate::error::key_text(&k)
                            )
                        });
                    }
                    // Each key comes once per step: straight into the batch.
                    sb.batch.insert(&idx.handle, &e, b"");
                    p.entries += 1;
                }
                DocEntry::Skipped => p.skipped += 1,
                DocEntry::Absent => {}
            }
        }
        p.backfilled += n as u64;
        p.phase = match next_cursor {
            Some(c) => Phase::Backfilling { cursor: c },
            None => Phase::Live,
        };
        *sb.progress_mut(&idx) = p;
        let (batch, _, _, updates) = sb.into_parts();
        // Not in the store's backpressure, which never ends once the store failed: closing
        // the engine joins this thread.
        self.wait_writable(&batch)?;
        batch
            .commit()
            .map_err(|e| format!("store batch commit: {e}"))?;
        for (i, p) in updates {
            if matches!(p.phase, Phase::Live) {
                tracing::info!(tree = %i.tree, index = %i.name, entries = p.entries, skipped = p.skipped, "index backfilled: live");
            }
            *lock(&i.progress) = p;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step over large documents ends after a few of them, not after `index_backfill_keys`:
    /// every commit of the node waits for the step (it holds the index lock).
    #[test]
    fn a_backfill_step_over_large_documents_ends_at_its_byte_bound() {
        let doc = 1u64 << 20;
        let keys_max = 2048;
        let docs = (0..keys_max)
            .find(|&n| step_is_full(n, n as u64 * doc, keys_max))
            .expect("a step ends");
        assert_eq!(
            docs,
            (BACKFILL_STEP_BYTES_MAX / doc) as usize,
            "a step over 1 MiB documents read {docs} of them"
        );
        // One document larger than the bound is still a step (the backfill moves on).
        assert!(!step_is_full(0, 0, keys_max));
        assert!(step_is_full(1, 16 << 20, keys_max));
        // Small documents: the key count bounds the step.
        assert!(!step_is_full(2047, 2047 * 100, keys_max));
        assert!(step_is_full(2048, 2048 * 100, keys_max));
        assert!(step_is_full(1, 10, 0), "index_backfill_keys 0 means 1");
    }
}
