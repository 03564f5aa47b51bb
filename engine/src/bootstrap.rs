//! Bootstrap: replacing this node's state with its upstream's, in resumable steps, outside
//! the log.
//!
//! A replica's upstream streams one ordered sequence of live transactions and chunks (key
//! ranges of a tree read from a snapshot, placed at the log position they were read). The
//! replica's pipeline decides what to keep and hands it to [`Engine::bootstrap_apply`] as
//! [`RestoreOp`]s. The engine writes them **straight into the store**, not into the log, in one
//! atomic store batch together with the caller's opaque **progress record**, so a node killed
//! at any moment resumes from its last finished step: progress and data move together. The
//! one exception, for speed: chunks that lead a call are ingested as tables just before the
//! call's batch, so a crash between the two can leave them in place under the previous
//! progress record, which is safe for a resumed copy (see `StoreBatch::ingest_chunk`).
//!
//! Steps and what each leaves on disk (meta keys, see `catalog.rs`):
//!
//! ```text
//!  bootstrap_begin(p)   one batch: drop every tree, gtid_executed = {}, bootstrap = p; SyncAll
//!  bootstrap_apply(..)  one batch per call: ops + chunks, bootstrap = p'; persist(Buffer)
//!  bootstrap_finish(S)  (1) one batch: gtid_executed = S, bootstrap_finishing = S; SyncAll
//!                       (2) wal.reset_history(S): the log's GTIDs become S, next offset unchanged
//!                       (3) one batch: remove bootstrap, bootstrap_finishing; SyncAll
//! ```
//!
//! Engine::open completes (2) and (3) when it finds `bootstrap_finishing`; with only
//! `bootstrap` present it opens bootstrapping, with the last stored progress record.
//!
//! While bootstrapping, local commits and upstream apply get [`WriteError::Bootstrapping`];
//! reads work and see the partial state. The applied offset does not move (nothing is logged),
//! so trees made by a bootstrap get random keyspace names (`r<hex>`) instead of offset-based
//! ones. `bootstrap_apply` persists with `Persist::Buffer`: a killed process keeps every
//! call that returned; a power cut may lose the last calls, data and progress together.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tideline_wal::{GtidSet, Op, PackedEntries, Wal};

use crate::apply::{ChunkWrite, NewKeyspace, StoreBatch};
use crate::catalog::{self, Catalog};
use crate::engine::Engine;
use crate::error::{OpenError, WriteError};
use crate::merge::{self, MergeOperator};
use crate::state::{EngineOptions, check_kv, lock};
use crate::store::{Backend, Ingest, Persist, Store, StoreTree, TreeHandle, WriteBatch};

/// What a bootstrap writes into the store, outside the log (see [`Engine::bootstrap_apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOp {
    /// A `Put`/`Delete`/`Merge`/`CreateTree`/`DropTree` op from the upstream's live stream,
    /// applied with exactly the meaning a logged op has (merges resolved against the current
    /// value, trees created and dropped), but not logged and without touching
    /// `gtid_executed`.
    Op(Op),
    /// A chunk of a tree: makes sure `tree` exists (created with `merge_operator` if absent;
    /// an existing tree is kept, operator included, except by a chunk from the tree's first
    /// key, below), removes every key in `[from, to)`
    /// (`to: None`: to the end of the tree), then puts `entries`.
    ///
    /// A chunk from the tree's first key (`from` empty) begins the tree's copy: a copy sends
    /// every tree from its first key, and it applies no live op on a tree before that
    /// chunk. So whatever the engine holds of the tree then is left by an earlier attempt
    /// that was cut short, possibly from another state of the upstream (a tree since
    /// re-created with another operator, an index since dropped): the call that holds such
    /// a chunk first drops the tree with its indexes, and the tree is then exactly what the
    /// call defines (its `CreateTree` and `CreateIndex` ops, or the chunk's operator).
    Chunk {
        /// The tree.
        tree: String,
        /// The tree's merge operator, by name, used when the chunk creates the tree.
        merge_operator: Option<String>,
        /// First key of the range (inclusive).
        from: Vec<u8>,
        /// End of the range (exclusive); `None`: the end of the tree.
        to: Option<Vec<u8>>,
        /// The range's key-value pairs: keys strictly ascending (the type keeps them so), all
        /// inside the range; packed as they came from the upstream, and lent from there to
        /// the store.
        entries: PackedEntries,
    },
}

impl Engine {
    /// Starts a bootstrap. On a read-write node with local transactions in flight it refuses
    /// ([`WriteError::CommitsInFlight`]); otherwise it first waits until every submitted
    /// transaction (upstream apply in flight) is applied. Then, in one store batch, it drops
    /// every tree, sets `gtid_executed` to the empty set and stores `progress`, and syncs the
    /// store. From then on local commits, `apply_upstream` and `apply_upstream_batch` return
    /// [`WriteError::Bootstrapping`] until [`Engine::bootstrap_finish`]. Reads keep working and
    /// see the partial state. Called again while bootstrapping, it starts over (wipes again).
    pub fn bootstrap_begin(&self, progress: &[u8]) -> Result<(), WriteError> {
        let inner = &self.inner;
        inner.check_not_failed()?;
        let mut slot = lock(&inner.bootstrap);
        let mut st = lock(&inner.commit);
        let submitted = inner.last_submitted.load(Ordering::SeqCst);
        let applied = inner.applied.load(Ordering::SeqCst);
        if submitted > applied && !inner.read_only.load(Ordering::SeqCst) {
            return Err(WriteError::CommitsInFlight { applied, submitted });
        }
        // Under the commit lock: nothing submits after this.
        inner.bootstrapping.store(true, Ordering::SeqCst);
        if let Err(e) = inner.wait_all_applied() {
            inner.bootstrapping.store(slot.is_some(), Ordering::SeqCst);
            return Err(e);
        }
        let applied = inner.applied.load(Ordering::SeqCst);

        let base = inner.current_catalog();
        let wipe = inner.opts.wipe_on_bootstrap();
        let mut sb = StoreBatch::new(inner, base.clone(), false);
        if wipe {
            for name in base.trees.keys() {
                sb.drop_tree(name);
            }
        }
        let (mut batch, _, dropped, _) = sb.into_parts();
        // This node's own GTIDs stay executed: its next local commit must not reuse one that
        // a downstream may already hold (their effects are gone with the rest of the state).
        let own = own_gtids(
            &inner.view.read().unwrap_or_else(|p| p.into_inner()).gtids,
            inner.server_uuid,
        );
        batch.insert(&inner.meta, catalog::KEY_GTIDS, own.to_string().as_bytes());
        batch.insert(&inner.meta, catalog::KEY_BOOTSTRAP, progress);
        batch.remove(&inner.meta, catalog::KEY_BOOTSTRAP_FINISHING);
        inner.write_identity(&mut batch, applied);
        let next_catalog = if wipe {
            Arc::new(Catalog::default())
        } else {
            base.clone()
        };
        // Readers take the view's lock: the store's backpressure is waited out before it.
        inner
            .wait_writable(&batch)
            .map_err(|reason| inner.store_failure(format!("bootstrap begin: {reason}")))?;
        {
            let mut v = inner.view.write().unwrap_or_else(|p| p.into_inner());
            batch
                .commit()
                .map_err(|e| inner.store_failure(format!("bootstrap begin: {e}")))?;
            v.gtids = Arc::new(own);
            v.catalog = next_catalog.clone();
            v.generation += 1;
            *inner.catalog.write().unwrap_or_else(|p| p.into_inner()) = next_catalog;
            inner.reset_commit_state(&mut st, &v);
        }
        inner.notify_view_changed();
        drop(st);
        inner.remove_keyspaces(dropped);
        inner
            .db
            .persist(Persist::Sync)
            .map_err(|e| inner.store_failure(format!("syncing the store: {e}")))?;
        *slot = Some(progress.to_vec());
        tracing::info!(applied, "bootstrap started: state wiped, writes refused");
        Ok(())
    }

    /// The progress record of an unfinished bootstrap (it survives restarts), or `None`.
    pub fn bootstrap_progress(&self) -> Option<Vec<u8>> {
        lock(&self.inner.bootstrap).clone()
    }

    /// Whether a bootstrap is in progress (writes are refused).
    pub fn is_bootstrapping(&self) -> bool {
        self.inner.bootstrapping.load(Ordering::SeqCst)
    }

    /// Applies `ops` in order and replaces the progress record, in one atomic store batch,
    /// then persists the store's journal to the OS (`Persist::Buffer`): a killed process
    /// keeps it; a power cut may lose recent calls, but progress and data move together.
    /// Refused ([`WriteError::NotBootstrapping`]) unless bootstrapping.
    ///
    /// A call that holds a chunk from the first key of a tree (`from` empty) begins that
    /// tree's copy: before anything else of the call, the tree is dropped with its indexes,
    /// and the call's ops and chunks define it anew (see [`RestoreOp::Chunk`]). Give the
    /// tree's definitions (`CreateTree`, `CreateIndex`) in the same call as that chunk.
    ///
    /// Chunks that come before the call's first op that writes data (definitions of trees
    /// and indexes do not count) are written faster, as new tables (bulk ingestion), just
    /// before the batch. A crash between the two can leave those chunks in
    /// place while the progress record still names the previous call. That is safe when the
    /// caller resumes a chunked copy: the chunks lie in ranges not yet copied according to the
    /// record, a resumed copy sends those ranges again, and each chunk replaces its range.
    ///
    /// The input is peer data and is checked before anything is written: keys and values
    /// against the limits, tree names, merge operator names, and chunks (entries strictly
    /// ascending and inside `[from, to)`). A bad input gets a typed error
    /// ([`WriteError::BadChunk`], [`WriteError::KeyTooLarge`], ...) and nothing of the call is
    /// written. A store failure makes the engine fail-stop ([`WriteError::FailStop`]); after a
    /// restart the bootstrap resumes from the last stored progress record.
    ///
    /// The ops share one store batch held in memory: keep a call to a few MiB (a chunk).
    pub fn bootstrap_apply(&self, ops: Vec<RestoreOp>, progress: &[u8]) -> Result<(), WriteError> {
        let inner = &self.inner;
        inner.check_not_failed()?;
        let mut slot = lock(&inner.bootstrap);
        if slot.is_none() {
            return Err(WriteError::NotBootstrapping);
        }
        let merges = validate(&inner.opts, &ops)?;
        let _indexes = lock(&inner.index_lock);
        let mut sb = StoreBatch::new(inner, inner.current_catalog(), true);
        // Trees whose copy begins in this call: what the engine holds of them goes first.
        for op in &ops {
            if let RestoreOp::Chunk { tree, from, .. } = op
                && from.is_empty()
            {
                sb.drop_tree(tree);
            }
        }
        // Chunks before the first op that writes data are ingested as tables (see
        // `ingest_chunk`); the rest goes into the batch, in order. A definition before a
        // chunk (the tree's `create_tree` and `create_index` that come with its chunk) writes
        // no key of it: the chunk's tables need not wait for the batch.
        let mut leading = true;
        for (op, merge) in ops.into_iter().zip(merges) {
            let applied = match op {
                RestoreOp::Op(op) => {
                    leading &= matches!(
                        op,
                        Op::CreateTree { .. } | Op::CreateIndex { .. } | Op::DropIndex { .. }
                    );
                    sb.apply_op((&op).into(), NewKeyspace::Restore)
                }
                RestoreOp::Chunk {
                    tree,
                    from,
                    to,
                    entries,
                    ..
                } if leading && inner.opts.ingest_leading_chunks() => {
                    sb.ingest_chunk(&tree, merge, &from, to.as_deref(), &entries)
                }
                RestoreOp::Chunk {
                    tree,
                    from,
                    to,
                    entries,
                    ..
                } => sb.apply_chunk(&tree, merge, from, to, entries),
            };
            applied.map_err(|reason| inner.store_failure(format!("bootstrap apply: {reason}")))?;
        }
        let (mut batch, catalog, dropped, index_progress) = sb.into_parts();
        batch.insert(&inner.meta, catalog::KEY_BOOTSTRAP, progress);
        // Readers take the view's lock: the store's backpressure is waited out before it.
        inner
            .wait_writable(&batch)
            .map_err(|reason| inner.store_failure(format!("bootstrap apply: {reason}")))?;
        {
            let mut v = inner.view.write().unwrap_or_else(|p| p.into_inner());
            batch
                .commit()
                .map_err(|e| inner.store_failure(format!("bootstrap apply: {e}")))?;
            for (idx, p) in index_progress {
                *lock(&idx.progress) = p;
            }
            if let Some(c) = catalog {
                let c = Arc::new(c);
                v.catalog = c.clone();
                *inner.catalog.write().unwrap_or_else(|p| p.into_inner()) = c;
            }
        }
        inner.remove_keyspaces(dropped);
        *slot = Some(progress.to_vec());
        inner
            .db
            .persist(Persist::Buffer)
            .map_err(|e| inner.store_failure(format!("persisting the store's journal: {e}")))?;
        Ok(())
    }

    /// Ends the bootstrap: the state now equals the upstream's at a point whose executed
    /// GTIDs are `gtid_executed`. Crash-safe at every step (see the module docs): (1) one
    /// store batch sets `gtid_executed` and the marker `bootstrap_finishing`, synced; (2) the
    /// log's history is reset so its GTID set is `gtid_executed` ([`Wal::reset_history`]);
    /// (3) one batch removes the progress record and the marker. [`Engine::open`] completes
    /// (2) and (3) when it finds the marker. Afterwards positions, snapshots and
    /// `gtid_executed()` carry `gtid_executed` at the unchanged offset, writes are accepted
    /// again (subject to read-only mode), the next local commit takes the next offset, and
    /// `apply_upstream` of a GTID in the set is [`crate::Applied::AlreadyExecuted`].
    ///
    /// On an error the node stays bootstrapping; call `bootstrap_finish` again, or restart
    /// the node (open completes a finish whose first step was stored).
    pub fn bootstrap_finish(&self, gtid_executed: &GtidSet) -> Result<(), WriteError> {
        self.finish_steps(gtid_executed, false)
    }

    /// Test-only (cargo feature `testing`): runs only step (1) of
    /// [`Engine::bootstrap_finish`], as if the process died right after it. Reopen the engine
    /// to see open complete the finish.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn bootstrap_finish_step1_only_for_tests(
        &self,
        gtid_executed: &GtidSet,
    ) -> Result<(), WriteError> {
        self.finish_steps(gtid_executed, true)
    }

    fn finish_steps(&self, gtids: &GtidSet, step1_only: bool) -> Result<(), WriteError> {
        let inner = &self.inner;
        inner.check_not_failed()?;
        let mut slot = lock(&inner.bootstrap);
        if slot.is_none() {
            return Err(WriteError::NotBootstrapping);
        }
        // The copy's GTIDs, plus this node's own (kept since `bootstrap_begin`).
        let gtids = &{
            let v = inner.view.read().unwrap_or_else(|p| p.into_inner());
            gtids.union(&own_gtids(&v.gtids, inner.server_uuid))
        };
        let text = gtids.to_string();
        // (1) Chunks bypass index maintenance: every index starts again from an empty
        // keyspace and is backfilled from the copied state.
        let _indexes = lock(&inner.index_lock);
        let mut sb = StoreBatch::new(inner, inner.current_catalog(), false);
        let defs: Vec<_> = sb
            .base
            .all_indexes()
            .map(|i| (i.tree.clone(), i.name.clone(), i.paths.clone(), i.unique))
            .collect();
        for (tree, name, paths, unique) in &defs {
            sb.drop_index(tree, name);
            sb.apply_op(
                crate::packed::OpRef::CreateIndex {
                    tree,
                    name,
                    paths,
                    unique: *unique,
                },
                NewKeyspace::Restore,
            )
            .map_err(|reason| inner.store_failure(format!("bootstrap finish: {reason}")))?;
        }
        let (mut batch, new_catalog, dropped, _) = sb.into_parts();
        batch.insert(&inner.meta, catalog::KEY_GTIDS, text.as_bytes());
        batch.insert(
            &inner.meta,
            catalog::KEY_BOOTSTRAP_FINISHING,
            text.as_bytes(),
        );
        // Readers take the view's lock: the store's backpressure is waited out before it.
        inner
            .wait_writable(&batch)
            .map_err(|reason| inner.store_failure(format!("bootstrap finish: {reason}")))?;
        {
            let mut v = inner.view.write().unwrap_or_else(|p| p.into_inner());
            batch
                .commit()
                .map_err(|e| inner.store_failure(format!("bootstrap finish: {e}")))?;
            v.gtids = Arc::new(gtids.clone());
            if let Some(c) = new_catalog {
                let c = Arc::new(c);
                v.catalog = c.clone();
                *inner.catalog.write().unwrap_or_else(|p| p.into_inner()) = c;
            }
        }
        drop(_indexes);
        inner.remove_keyspaces(dropped);
        inner.notify_view_changed();
        inner
            .db
            .persist(Persist::Sync)
            .map_err(|e| inner.store_failure(format!("syncing the store: {e}")))?;
        if step1_only {
            return Ok(());
        }
        // (2) No append is in flight: every write is refused while bootstrapping.
        inner.wal.reset_history(gtids)?;
        // (3)
        let mut batch = inner.db.batch();
        batch.remove(&inner.meta, catalog::KEY_BOOTSTRAP);
        batch.remove(&inner.meta, catalog::KEY_BOOTSTRAP_FINISHING);
        batch
            .commit()
            .map_err(|e| inner.store_failure(format!("bootstrap finish: {e}")))?;
        inner
            .db
            .persist(Persist::Sync)
            .map_err(|e| inner.store_failure(format!("syncing the store: {e}")))?;
        {
            let mut st = lock(&inner.commit);
            let mut v = inner.view.write().unwrap_or_else(|p| p.into_inner());
            v.generation += 1;
            inner.reset_commit_state(&mut st, &v);
            inner.bootstrapping.store(false, Ordering::SeqCst);
        }
        *slot = None;
        tracing::info!(gtid_executed = %text, "bootstrap finished: writes accepted again");
        Ok(())
    }
}

/// The part of `set` that `uuid` originated.
fn own_gtids(set: &GtidSet, uuid: uuid::Uuid) -> GtidSet {
    let mut own = GtidSet::new();
    for iv in set.intervals(&uuid) {
        own.insert_interval(uuid, *iv);
    }
    own
}

/// Completes a finish cut short after its step (1), found by `Engine::open` (`marker` is the
/// `bootstrap_finishing` value): steps (2) and (3).
pub(crate) fn complete_finish(
    db: &Backend,
    meta: &TreeHandle,
    wal: &Wal,
    marker: &[u8],
    path: &str,
) -> Result<(), OpenError> {
    let gtids: GtidSet = std::str::from_utf8(marker)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| OpenError::CorruptStore {
            path: path.to_string(),
            what: "`bootstrap_finishing` is not a GTID set".into(),
        })?;
    let store_err = |source| OpenError::Store {
        path: path.to_string(),
        source,
    };
    wal.reset_history(&gtids)?;
    let mut batch = db.batch();
    batch.remove(meta, catalog::KEY_BOOTSTRAP);
    batch.remove(meta, catalog::KEY_BOOTSTRAP_FINISHING);
    batch.commit().map_err(store_err)?;
    db.persist(Persist::Sync).map_err(store_err)?;
    tracing::info!(gtid_executed = %gtids, "completed a bootstrap finish cut short by a restart");
    Ok(())
}

/// Checks a `bootstrap_apply` input (peer data) before anything is written; returns, per
/// op, the merge operator a chunk creates its tree with.
fn validate(
    opts: &EngineOptions,
    ops: &[RestoreOp],
) -> Result<Vec<Option<MergeOperator>>, WriteError> {
    let operator = |name: &Option<String>| -> Result<Option<MergeOperator>, WriteError> {
        match name {
            None => Ok(None),
            Some(n) => MergeOperator::from_name(n).map(Some).ok_or_else(|| {
                WriteError::UnknownMergeOperator {
                    name: n.clone(),
                    known: merge::known_operators(),
                }
            }),
        }
    };
    let tree_name = |tree: &str| {
        if catalog::is_valid_tree_name(tree) {
            Ok(())
        } else {
            Err(WriteError::BadTreeName(tree.to_string()))
        }
    };
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            RestoreOp::Op(op) => {
                match op {
                    Op::CreateTree {
                        tree,
                        merge_operator,
                    } => {
                        tree_name(tree)?;
                        operator(merge_operator)?;
                    }
                    Op::DropTree { .. } | Op::DropIndex { .. } => {}
                    Op::CreateIndex { tree, name, .. } => {
                        tree_name(tree)?;
                        tree_name(name)?;
                    }
                    Op::Put {
                        tree, key, value, ..
                    } => check_kv(opts, tree, key, Some(value))?,
                    Op::Merge { tree, key, operand } => check_kv(opts, tree, key, Some(operand))?,
                    Op::Delete { tree, key, .. } => check_kv(opts, tree, key, None)?,
                }
                out.push(None);
            }
            RestoreOp::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
            } => {
                tree_name(tree)?;
                let merge = operator(merge_operator)?;
                let bad = |reason: String| WriteError::BadChunk {
                    tree: tree.clone(),
                    reason,
                };
                if let Some(to) = to
                    && to < from
                {
                    return Err(bad("the range ends before it starts".into()));
                }
                // Strictly ascending by construction (`PackedEntries`).
                for (key, value) in entries {
                    check_kv(opts, tree, key, Some(value))?;
                }
                if entries.key_outside(from, to.as_deref()).is_some() {
                    return Err(bad("an entry lies outside the chunk's range".into()));
                }
                out.push(merge);
            }
        }
    }
    Ok(out)
}

impl StoreBatch<'_> {
    /// Writes a chunk (validated) that no data op of the call precedes (definitions of trees
    /// and indexes write no key) straight into the tree's tables (the store's bulk
    /// ingestion: no journal, no memtable), before the batch. The
    /// stream is the chunk's entries merged with a tombstone for every other key the tree
    /// holds in the range; it gets a sequence number above everything written before, and
    /// the batch (ops after the chunks, the progress record, a tree's catalog entry) commits
    /// after it.
    ///
    /// Ingesting into a tree that holds data is sound: fjall flushes the keyspace's memtable
    /// first and gives the new tables one sequence number above every write so far, placed
    /// as the newest L0 run, so they shadow what the tree held and the batch's later writes
    /// shadow them. What the batch path must know: the data is in the store at once, also in
    /// a keyspace this call created, so later chunks and merges of the call read it from the
    /// store (`apply_chunk` reads the store's range for every keyspace).
    ///
    /// Not atomic with the progress record: a crash after the ingestion and before the batch
    /// leaves this call's chunks in place while the progress record still names the call
    /// before. That is safe for a bootstrap: the chunks lie in ranges the progress record says
    /// are not copied yet, a resumed copy sends every such range again as chunks, and each
    /// chunk replaces its whole range; live ops for ranges not yet copied are skipped by the
    /// caller. A tree the chunk or the call's `create_tree` created (also in place of one the
    /// call dropped) has no catalog entry until the batch commits, so its keyspace is removed
    /// on open, and the tree it replaces is still in place.
    pub(crate) fn ingest_chunk(
        &mut self,
        tree: &str,
        merge: Option<MergeOperator>,
        from: &[u8],
        to: Option<&[u8]>,
        entries: &PackedEntries,
    ) -> Result<(), String> {
        let (t, existed) = match self.catalog().get(tree) {
            Some(t) => (t.clone(), true),
            None => (self.create_tree(tree, merge, NewKeyspace::Restore)?, false),
        };
        // The chunk's entries merged with a tombstone for every other key the range holds.
        let mut next = entries.iter().peekable();
        let mut held = existed.then(|| t.handle.keys(from, to).peekable());
        let stream = std::iter::from_fn(move || {
            if let Some(held) = held.as_mut() {
                while let Some(key) = held.peek() {
                    let key = match key {
                        Ok(k) => k,
                        Err(_) => return held.next().map(|e| e.map(Ingest::Tombstone)),
                    };
                    match next.peek() {
                        Some(&(k, v)) if k < key.as_slice() => {
                            next.next();
                            return Some(Ok(Ingest::Put(k, v)));
                        }
                        Some(&(k, _)) if k == key.as_slice() => {
                            held.next();
                        }
                        _ => return held.next().map(|e| e.map(Ingest::Tombstone)),
                    }
                }
            }
            next.next().map(|(k, v)| Ok(Ingest::Put(k, v)))
        });
        t.handle
            .ingest(stream)
            .map_err(|e| format!("ingesting a chunk into tree `{tree}`: {e}"))
    }

    /// Adds a chunk (validated): creates the tree if absent, removes every key of the range
    /// the tree holds as of the ops so far (store and this batch), then puts the entries.
    pub(crate) fn apply_chunk(
        &mut self,
        tree: &str,
        merge: Option<MergeOperator>,
        from: Vec<u8>,
        to: Option<Vec<u8>>,
        entries: PackedEntries,
    ) -> Result<(), String> {
        let t = match self.catalog().get(tree) {
            Some(t) => t.clone(),
            None => self.create_tree(tree, merge, NewKeyspace::Restore)?,
        };
        // Kept for the rest of the batch to read (`ChunkWrite::value`): this path, a chunk
        // after an op in one call, is rare enough to copy the entries out.
        let chunk = ChunkWrite {
            keyspace: t.keyspace.clone(),
            from,
            to,
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
        };
        // Keys rewritten by the chunk need no tombstone: the later put wins within the batch.
        let stale = |key: &[u8]| chunk.covers(key) && chunk.value(key).is_none();
        // What the store holds in the range. Always read, even for a keyspace this call
        // created: the call's leading chunks were ingested into the store already, new
        // trees included (a keyspace made by the batch is not necessarily empty).
        for key in t.handle.keys(&chunk.from, chunk.to.as_deref()) {
            let key = key.map_err(|e| format!("reading tree `{tree}`: {e}"))?;
            if chunk.value(&key).is_none() {
                self.batch.remove(&t.handle, &key);
            }
        }
        // What earlier ops of this batch wrote in the range: the chunk replaces it.
        let written: Vec<Vec<u8>> = self
            .overlay
            .keys(&t.keyspace)
            .filter(|k| chunk.covers(k))
            .cloned()
            .collect();
        for key in written {
            if stale(&key) {
                self.batch.remove(&t.handle, key.as_slice());
            }
            self.overlay.remove(&t.keyspace, &key);
        }
        // What earlier chunks of this batch put in the range.
        for earlier in self.chunks.iter().filter(|c| c.keyspace == t.keyspace) {
            for (key, _) in &earlier.entries {
                if stale(key) {
                    self.batch.remove(&t.handle, key.as_slice());
                }
            }
        }
        for (key, value) in &chunk.entries {
            self.batch
                .insert(&t.handle, key.as_slice(), value.as_slice());
        }
        self.chunks.push(chunk);
        Ok(())
    }
}
