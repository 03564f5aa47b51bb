//! The [`Engine`] handle and its write conveniences.
//!
//! Owns: the public `Engine` type (a shared [`Inner`] plus the background threads), its
//! identity and mode accessors, and the single-op and read-modify-write helpers (`put`,
//! `delete`, `merge`, `compare_and_swap`, `increment`, JSON documents) that are each one
//! [`Txn`], run by [`Engine::transaction`] with conflict retries.
//!
//! Other rooms add their own `impl Engine` blocks: opening, recovery and closing in `open`,
//! reads and snapshots in `read`, tree creation and removal in `trees`, upstream apply in
//! `commit`, bootstrap in `bootstrap`.
//!
//! Must never: reach into the commit state or the store directly; every write goes through a
//! [`Txn`] and so through the commit path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tideline_wal::Wal;
use uuid::Uuid;

use crate::error::{ReadError, WriteError, key_text};
use crate::merge;
use crate::state::{CommitInfo, Inner, lock};
use crate::store::{Store, StoreStats};
use crate::txn::Txn;

/// The result of [`Engine::transaction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    /// What the closure returned.
    pub value: T,
    /// Where the transaction was logged; `None` when it wrote nothing.
    pub commit: Option<CommitInfo>,
}

/// What [`Engine::compare_and_swap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The value matched and was replaced.
    Swapped(CommitInfo),
    /// The value did not match; nothing was written. Carries the current value.
    Mismatch(Option<Vec<u8>>),
}

/// The embedded engine. Cheap to share: wrap it in an `Arc`; every method takes `&self`.
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
    /// The applier and checkpoint threads.
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("server_uuid", &self.inner.server_uuid)
            .field("path", &self.inner.path)
            .field("applied", &self.inner.applied.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Figures about the state store, for metrics and benchmarks.
    pub fn store_stats(&self) -> StoreStats {
        self.inner.db.stats()
    }

    /// The log this engine writes to.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.inner.wal
    }

    /// This node's server uuid (the log's).
    pub fn server_uuid(&self) -> Uuid {
        self.inner.server_uuid
    }

    /// Whether local writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.load(Ordering::SeqCst)
    }

    /// Switches read-only mode (a replica is read-only; promotion turns it off). Once it has
    /// made the engine read-only, no local commit is submitted any more: one already past its
    /// first check is refused under the commit lock, which this takes to set the flag.
    pub fn set_read_only(&self, read_only: bool) {
        let _commits = lock(&self.inner.commit);
        self.inner.read_only.store(read_only, Ordering::SeqCst);
    }

    /// `Some(reason)` once the engine refuses writes after a fatal failure (fail-stop).
    pub fn fail_stop_reason(&self) -> Option<String> {
        self.inner.fail_stop_reason()
    }

    /// Starts a transaction. Reads see one snapshot (taken at the first read) plus the
    /// transaction's own writes; [`Txn::commit`] checks that nothing it read changed.
    pub fn begin(&self) -> Txn<'_> {
        Txn::new(&self.inner)
    }

    /// Runs `f` in a transaction and commits it, running it again on a conflict (up to
    /// [`EngineOptions::conflict_retries_max`](crate::EngineOptions::conflict_retries_max) times). `f` may run more than once, so it
    /// should only act through the transaction.
    pub fn transaction<T>(
        &self,
        mut f: impl FnMut(&mut Txn<'_>) -> Result<T, WriteError>,
    ) -> Result<Outcome<T>, WriteError> {
        let mut attempt = 0;
        loop {
            let mut tx = self.begin();
            let value = f(&mut tx)?;
            match tx.commit() {
                Ok(commit) => return Ok(Outcome { value, commit }),
                Err(e) if e.is_retryable() && attempt < self.inner.opts.conflict_retries_max => {
                    attempt += 1;
                    // The writer we conflicted with may not be applied yet; a snapshot taken
                    // before it is would conflict again. Wait until everything submitted so
                    // far is applied, so the next attempt reads past it.
                    let target = self.inner.last_submitted.load(Ordering::SeqCst);
                    self.inner.wait_applied(target, Duration::from_secs(1));
                    // Then a random pause growing with the attempts: contenders that all woke
                    // on the same apply would otherwise race again in lockstep, and the same
                    // one could lose every time.
                    let cap_us = (20u64 << attempt.min(7)).min(2_000);
                    std::thread::sleep(Duration::from_micros(rand::random_range(0..=cap_us)));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until `commit` (of this engine) is visible to its reads, or `timeout` passes;
    /// returns whether it is. Under sync durability a commit is visible once acknowledged,
    /// so this returns at once. Under async durability a commit is acknowledged once its
    /// record is written and becomes visible after the interval's fsync and its apply: this
    /// is the fence for reading one's own write. `Err` when the engine stopped (fail-stop)
    /// before applying it.
    pub fn wait_visible(&self, commit: &CommitInfo, timeout: Duration) -> Result<bool, WriteError> {
        self.wait_offset_visible(commit.offset.get(), timeout)
    }

    /// [`Engine::wait_visible`] for every commit submitted so far, by any thread: after a
    /// load under async durability, the point from which reads (and `gtid_executed`) show it
    /// all.
    pub fn wait_all_visible(&self, timeout: Duration) -> Result<bool, WriteError> {
        let submitted = self.inner.last_submitted.load(Ordering::SeqCst);
        self.wait_offset_visible(submitted, timeout)
    }

    fn wait_offset_visible(&self, offset: u64, timeout: Duration) -> Result<bool, WriteError> {
        self.inner.wait_applied(offset, timeout);
        match Inner::outcome(&lock(&self.inner.apply), offset) {
            Some(Ok(())) => Ok(true),
            Some(Err(e)) => Err(e),
            None => Ok(false),
        }
    }

    /// Sets `key` in `tree` to `value`.
    pub fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.put(tree, key, value)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Removes `key` from `tree` (logged even when the key is absent).
    pub fn delete(&self, tree: &str, key: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.delete(tree, key)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Merges `operand` into `key` with the tree's merge operator.
    pub fn merge(&self, tree: &str, key: &[u8], operand: &[u8]) -> Result<CommitInfo, WriteError> {
        let mut tx = self.begin();
        tx.merge(tree, key, operand)?;
        tx.commit()?.ok_or_else(internal_nothing_logged)
    }

    /// Replaces the value of `key` with `new` (`None`: delete) if it currently is `expected`
    /// (`None`: absent).
    pub fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, WriteError> {
        let out = self.transaction(|tx| {
            let current = tx.get(tree, key)?;
            if current.as_deref() != expected {
                return Ok(Some(current));
            }
            match new {
                Some(v) => tx.put(tree, key, v)?,
                None => tx.delete(tree, key)?,
            }
            Ok(None)
        })?;
        match (out.value, out.commit) {
            (Some(current), _) => Ok(CasOutcome::Mismatch(current)),
            (None, Some(c)) => Ok(CasOutcome::Swapped(c)),
            (None, None) => Err(internal_nothing_logged()),
        }
    }

    /// Adds `delta` to the counter at `key` (decimal text; absent = 0) and returns the new
    /// value. A read-modify-write transaction: works on any tree, conflicts retried.
    pub fn increment(&self, tree: &str, key: &[u8], delta: i64) -> Result<i64, WriteError> {
        let out = self.transaction(|tx| {
            let current = match tx.get(tree, key)? {
                None => 0,
                Some(v) => merge::parse_i64(&v).ok_or_else(|| WriteError::NotAnInteger {
                    tree: tree.to_string(),
                    key: key_text(key),
                })?,
            };
            let next = current
                .checked_add(delta)
                .ok_or_else(|| WriteError::Overflow {
                    tree: tree.to_string(),
                    key: key_text(key),
                })?;
            tx.put(tree, key, next.to_string().as_bytes())?;
            Ok(next)
        })?;
        Ok(out.value)
    }

    /// Stores JSON text at `key` after checking that it parses; malformed JSON is refused
    /// with [`WriteError::MalformedJson`] and nothing is written.
    pub fn put_json(&self, tree: &str, key: &[u8], json: &str) -> Result<CommitInfo, WriteError> {
        serde_json::from_str::<serde_json::Value>(json).map_err(|e| WriteError::MalformedJson {
            tree: tree.to_string(),
            key: key_text(key),
            reason: e.to_string(),
        })?;
        self.put(tree, key, json.as_bytes())
    }

    /// Applies an RFC 7386 merge patch (JSON text) to the document at `key` (absent = null)
    /// in a read-modify-write transaction; returns the new document. For a blind, logged
    /// patch use a tree with the `json-merge-patch` operator and [`Engine::merge`].
    pub fn patch_json(
        &self,
        tree: &str,
        key: &[u8],
        patch: &str,
    ) -> Result<serde_json::Value, WriteError> {
        let bad = |reason: String| WriteError::MalformedJson {
            tree: tree.to_string(),
            key: key_text(key),
            reason,
        };
        let patch: serde_json::Value =
            serde_json::from_str(patch).map_err(|e| bad(e.to_string()))?;
        let out = self.transaction(|tx| {
            let mut doc = match tx.get(tree, key)? {
                None => serde_json::Value::Null,
                Some(v) => serde_json::from_slice(&v).map_err(|e| {
                    WriteError::Read(ReadError::NotJson {
                        tree: tree.to_string(),
                        key: key_text(key),
                        reason: e.to_string(),
                    })
                })?,
            };
            merge::merge_patch(&mut doc, &patch);
            let bytes = serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))?;
            tx.put(tree, key, &bytes)?;
            Ok(doc)
        })?;
        Ok(out.value)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the engine failed");
        }
    }
}

fn internal_nothing_logged() -> WriteError {
    WriteError::Conflict("internal: a write transaction logged nothing".into())
}
