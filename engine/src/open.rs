//! Opening, recovery, checkpoints and closing.
//!
//! Owns: [`Engine::open`] (option checks, the store's position, identity and history checked
//! against the log, the catalog loaded, an interrupted bootstrap finish completed, replay of
//! every log record after the store's applied offset, the applier and checkpoint threads
//! started), checkpoints (sync the store, then raise the log's retention floor) and
//! [`Engine::close`].
//!
//! Invariants: recovery applies offsets densely and in order through the same applier code as
//! live commits (`Inner::apply_group`), so a crash at any point loses no acknowledged
//! transaction and applies none twice; the log's retention floor is never above the first
//! offset the store has not persisted. Open writes nothing to the log.
//!
//! Must never: append to the log, or raise the retention floor before the store sync that
//! covers it.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use tideline_wal::{GtidSet, NewTransaction, Offset, Wal};
use uuid::Uuid;

use crate::catalog;
use crate::engine::Engine;
use crate::error::{OpenError, WriteError};
use crate::packed::{OpRef, op_bytes};
use crate::state::{
    ApplyState, CommitState, EngineOptions, Inner, KEY_BYTES_MAX_LIMIT, ReadyQueue, View, lock,
};
use crate::store::{Backend, Persist, Store, StoreError, StoreOptions, StoreTree, TreeOptions};
use crate::trees::load_catalog;

impl Engine {
    /// Opens the engine: the state store in `store_dir` (created if missing) on top of `wal`,
    /// which the engine then owns as its only writer. Recovery replays every log record after
    /// the store's applied offset; nothing is written to the log.
    pub fn open(
        store_dir: impl AsRef<Path>,
        wal: Arc<Wal>,
        opts: EngineOptions,
    ) -> Result<Engine, OpenError> {
        let log = wal.clone();
        Engine::open_unadvised(store_dir.as_ref(), wal, opts).map_err(|e| match e {
            // Raised while loading the store (also by the catalog and the bootstrap finish):
            // what to do depends on whether the log can rebuild the store.
            OpenError::CorruptStore { path, what } => OpenError::CorruptStore {
                path,
                what: format!("{what}; {}", store_remedy(&log)),
            },
            other => other,
        })
    }

    /// [`Engine::open`] before a damaged store's error says what to do about it.
    fn open_unadvised(
        store_dir: &Path,
        wal: Arc<Wal>,
        opts: EngineOptions,
    ) -> Result<Engine, OpenError> {
        if opts.key_bytes_max == 0 || opts.key_bytes_max > KEY_BYTES_MAX_LIMIT {
            return Err(OpenError::BadOption(format!(
                "key_bytes_max must be 1..={KEY_BYTES_MAX_LIMIT}, not {}",
                opts.key_bytes_max
            )));
        }
        if opts.value_bytes_max == 0 || opts.value_bytes_max > u32::MAX as usize {
            return Err(OpenError::BadOption(format!(
                "value_bytes_max must be 1..={}, not {}",
                u32::MAX,
                opts.value_bytes_max
            )));
        }
        if opts.memtable_bytes < 1 << 20 {
            return Err(OpenError::BadOption(format!(
                "memtable_bytes must be at least 1 MiB, not {}",
                opts.memtable_bytes
            )));
        }
        let path = store_dir.to_path_buf();
        let shown = path.display().to_string();
        let store_err = |source: StoreError| OpenError::Store {
            path: shown.clone(),
            source,
        };
        let corrupt = |what: String| OpenError::CorruptStore {
            path: shown.clone(),
            what,
        };
        let db = Backend::open(
            &path,
            &StoreOptions {
                cache_bytes: opts.cache_bytes,
                worker_threads: opts.store_threads,
                #[cfg(feature = "testing")]
                faults: opts.unsafe_store_faults.clone(),
            },
        )
        .map_err(store_err)?;
        // The metadata keys are overwritten by every batch: a small memtable flushes (and
        // compacts away) their old versions early.
        let meta = db
            .tree(
                catalog::META_KEYSPACE,
                &TreeOptions {
                    memtable_bytes: Some(4 << 20),
                },
            )
            .map_err(store_err)?;

        // Read the store's position.
        if let Some(f) = meta.get(catalog::KEY_FORMAT).map_err(store_err)?
            && &*f != catalog::FORMAT
        {
            return Err(corrupt(format!(
                "store format {:?}, this build reads {:?}",
                String::from_utf8_lossy(&f),
                String::from_utf8_lossy(catalog::FORMAT)
            )));
        }
        let applied = match meta.get(catalog::KEY_APPLIED).map_err(store_err)? {
            None => 0,
            Some(b) => {
                let arr: [u8; 8] = (*b)
                    .try_into()
                    .map_err(|_| corrupt(format!("`applied` has {} bytes, not 8", b.len())))?;
                u64::from_le_bytes(arr)
            }
        };
        let gtids: GtidSet = match meta.get(catalog::KEY_GTIDS).map_err(store_err)? {
            None => GtidSet::new(),
            Some(b) => std::str::from_utf8(&b)
                .map_err(|_| corrupt("`gtid_executed` is not UTF-8".into()))?
                .parse()
                .map_err(|e| corrupt(format!("`gtid_executed` does not parse: {e}")))?,
        };
        let identity = meta.get(catalog::KEY_SERVER_UUID).map_err(store_err)?;
        if let Some(b) = &identity {
            let store_uuid: Uuid = std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt("`server_uuid` does not parse".into()))?;
            if store_uuid != wal.server_uuid() {
                return Err(OpenError::WrongLog {
                    store_uuid,
                    log_uuid: wal.server_uuid(),
                    remedy: store_remedy(&wal),
                });
            }
        }
        let cat = load_catalog(&db, &meta, &opts, &shown)?;

        // A bootstrap in progress, or one whose finish was cut short: complete the finish.
        let mut bootstrap = meta
            .get(catalog::KEY_BOOTSTRAP)
            .map_err(store_err)?
            .map(|b| b.to_vec());
        if let Some(marker) = meta
            .get(catalog::KEY_BOOTSTRAP_FINISHING)
            .map_err(store_err)?
        {
            crate::bootstrap::complete_finish(&db, &meta, &wal, &marker, &shown)?;
            bootstrap = None;
        }

        // Check the store against the log.
        let log_last = wal.visible_offset();
        if applied > log_last {
            return Err(OpenError::StoreAheadOfLog {
                store_offset: applied,
                log_offset: log_last,
            });
        }
        let first = wal.first_offset().get();
        if applied < log_last && first > applied + 1 {
            return Err(OpenError::LogMissing {
                store_offset: applied,
                first_offset: first,
            });
        }
        // The history before the log's first record (a bootstrap copy, records retention
        // removed) must be in the store: replay cannot bring it back. A healthy store holds it
        // (the bootstrap finish stores the copy's GTIDs before the log's reset records them;
        // retention never removes what the store has not persisted); a deleted store, or an
        // older copy of it put back, does not. While bootstrapping the store holds only this
        // node's own GTIDs until the finish.
        if bootstrap.is_none() {
            let missing = history_before_log(&wal).difference(&gtids);
            if !missing.is_empty() {
                return Err(OpenError::StoreLacksLogHistory {
                    path: shown.clone(),
                    missing,
                });
            }
        }
        // Hold the log the store may still need until the first checkpoint below.
        wal.set_retention_floor(Offset::new(applied + 1).unwrap_or(Offset::FIRST));

        let catalog = Arc::new(cat);
        let server_uuid = wal.server_uuid();
        let inner = Arc::new(Inner {
            wal: wal.clone(),
            db,
            meta,
            path,
            read_only: AtomicBool::new(opts.read_only),
            opts,
            server_uuid,
            failed: AtomicBool::new(false),
            failed_reason: Mutex::new(String::new()),
            commit: Mutex::new(CommitState {
                submitted: GtidSet::new(),
                trees: BTreeMap::new(),
                history: VecDeque::new(),
                history_keys: 0,
                history_floor: applied,
                generation: 0,
                indexes: Default::default(),
                claims: Default::default(),
            }),
            apply: Mutex::new(ApplyState {
                applied,
                ready: ReadyQueue::default(),
                store_failed: None,
                dead_from: u64::MAX,
                dead_reason: String::new(),
            }),
            applied_cv: Condvar::new(),
            view: RwLock::new(View {
                offset: applied,
                gtids: Arc::new(gtids),
                catalog: catalog.clone(),
                generation: 0,
            }),
            catalog: RwLock::new(catalog),
            applied: AtomicU64::new(applied),
            last_submitted: AtomicU64::new(0),
            identity_written: AtomicBool::new(identity.is_some()),
            checkpoint_lock: Mutex::new(()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            bootstrapping: AtomicBool::new(bootstrap.is_some()),
            bootstrap: Mutex::new(bootstrap),
            view_changes: tokio::sync::watch::Sender::new(0),
            index_lock: Mutex::new(()),
        });

        // Replay.
        let replayed = inner.replay(applied)?;
        {
            let v = inner.view.read().unwrap_or_else(|p| p.into_inner());
            inner.reset_commit_state(&mut lock(&inner.commit), &v);
            lock(&inner.apply).applied = v.offset;
            // After replay the store holds every GTID of the log (checked above for the
            // history before its first record); a store whose applied offset covers a record
            // whose GTID it lacks is of another history. While bootstrapping, the store's
            // GTIDs are the upstream's, not the log's.
            let missing = wal.gtids().difference(&v.gtids);
            if !missing.is_empty()
                && !inner.bootstrapping.load(Ordering::SeqCst)
                && inner.opts.replay_on_open()
            {
                return Err(OpenError::StoreLacksLogHistory {
                    path: shown.clone(),
                    missing,
                });
            }
        }
        if replayed > 0 {
            tracing::info!(replayed, "replayed log records into the store");
        }
        inner
            .sync_store()
            .map_err(|source| sync_after_replay_failed(&shown, source))?;

        // A thread that dies (a panic outside the applier's own guard, a bug) fails the engine
        // (fail-stop) instead of leaving commits waiting for ever behind a dead thread.
        let spawn = |name: &str, role: &'static str, f: fn(Arc<Inner>)| {
            let bg = inner.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let guard = bg.clone();
                    let run = std::panic::AssertUnwindSafe(|| f(bg));
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        guard.thread_died(role, &panic_text(&*panic));
                    }
                })
                .map_err(|e| OpenError::BadOption(format!("cannot start thread {name}: {e}")))
        };
        let applier = spawn("tideline-engine-apply", "applier", Inner::apply_loop)?;
        let checkpointer = spawn(
            "tideline-engine-checkpoint",
            "checkpointer",
            Inner::checkpoint_loop,
        )?;
        let backfill = spawn("tideline-engine-backfill", "backfill", Inner::backfill_loop)?;
        Ok(Engine {
            inner,
            threads: Mutex::new(vec![applier, checkpointer, backfill]),
        })
    }

    /// Syncs the store and raises the log's retention floor to the first offset the store
    /// has not persisted. Runs on its own every [`EngineOptions::checkpoint_interval`].
    pub fn checkpoint(&self) -> Result<(), WriteError> {
        self.inner
            .checkpoint()
            .map_err(|reason| WriteError::FailStop { reason })
    }

    /// Stops the checkpoint thread and syncs the store. The log is left open (it may be
    /// shared); close it with [`Wal::close`].
    pub fn close(&self) -> Result<(), WriteError> {
        self.stop_threads();
        self.checkpoint()
    }

    /// Test-only (cargo feature `testing`): stops the engine the way a killed process stops,
    /// for crash tests that run in one process. New writes are refused and the background
    /// threads end, but nothing is checkpointed, and the engine (with its store and log) is
    /// leaked rather than dropped: no store sync, no journal flush, no drop path. What the
    /// store's directory holds afterwards is what a SIGKILL at this moment would leave
    /// (batches still in the store's in-process journal buffer are lost). Returns once the
    /// store's own background work (flushes, compactions) has ended, so that a copy of the
    /// directory is a consistent image; the directory stays locked by the leaked store, so
    /// reopen a copy. Other clones of the `Arc` may still be used (their writes are refused)
    /// and dropped: this one is leaked, so the engine's drop path never runs.
    #[cfg(feature = "testing")]
    pub fn crash(self: Arc<Self>) {
        self.stop_threads();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = self.inner.db.stats();
            if s.outstanding_flushes == 0 && s.active_compactions == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the store's flushes and compactions did not end within 30 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::mem::forget(self);
    }

    /// Refuses new writes, ends the applier and checkpoint threads and fails every commit
    /// still waiting to be applied. Once the engine failed, a thread that does not end within
    /// [`STUCK_THREAD_WAIT`] is left behind (it may be stuck in a store that will never answer
    /// again) instead of joined: closing a failed engine always returns.
    fn stop_threads(&self) {
        {
            *lock(&self.inner.stop) = true;
            self.inner.stop_cv.notify_all();
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        let mut failed_at: Option<std::time::Instant> = None;
        for h in threads {
            loop {
                if h.is_finished() {
                    let _ = h.join();
                    break;
                }
                if self.inner.failed.load(Ordering::SeqCst) {
                    let since = *failed_at.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() >= STUCK_THREAD_WAIT {
                        tracing::error!(
                            thread = h.thread().name().unwrap_or("?"),
                            "closing the failed engine without this thread: it did not end \
                             (stuck in the failed store)"
                        );
                        break;
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        {
            // Nothing applies any more: a commit still waiting learns it now.
            let mut a = lock(&self.inner.apply);
            if a.dead_from == u64::MAX {
                a.dead_from = a.applied + 1;
                a.dead_reason = "the engine was closed before the transaction was applied; \
                                 reopen it (recovery applies what the log holds)"
                    .into();
            }
            for r in a.ready.values() {
                r.wake();
            }
        }
    }
}

/// How long closing a failed engine waits for each of its threads to end (all together, at
/// most this long after the failure was seen) before it leaves a stuck one behind.
const STUCK_THREAD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The error of open's store sync after replay.
fn sync_after_replay_failed(path: &str, source: StoreError) -> OpenError {
    OpenError::StoreSync {
        path: path.to_string(),
        source,
    }
}

/// The GTIDs the log holds as history before its first record: what a bootstrap copied and
/// what retention removed.
fn history_before_log(wal: &Wal) -> GtidSet {
    wal.stats()
        .segments
        .into_iter()
        .next()
        .map(|s| s.gtids_before)
        .unwrap_or_default()
}

/// What to do about a store the engine cannot use: delete it only when the log can rebuild
/// it, that is when the log still starts at offset 1 with no history before it and holds
/// records; otherwise deleting it would only lead to another refusal (`LogMissing`,
/// `StoreLacksLogHistory`) or, beside a log without records (a new one put where a lost or
/// unmounted log was), destroy what may be the only copy of the node's data.
fn store_remedy(wal: &Wal) -> String {
    let first = wal.first_offset();
    let before = history_before_log(wal);
    // Nothing has been appended yet in this open: the written offset is the log's last.
    if wal.written_offset() == 0 && before.is_empty() {
        return "mount or restore this node's own log, or restore the node from a replica; do \
                not delete the store: this log holds no records and cannot rebuild it (the \
                store may be the only copy of this node's data)"
            .into();
    }
    if first == Offset::FIRST && before.is_empty() {
        return "delete the store directory to rebuild it from the log, or restore the node \
                from a replica"
            .into();
    }
    let history = if before.is_empty() {
        String::new()
    } else {
        format!(" after the history {before}")
    };
    format!(
        "restore the store from a backup, or empty the node's data directory (log and store) \
         and bootstrap the node again from a replica: the log cannot rebuild the store, as it \
         starts at offset {first}{history}"
    )
}

/// The text of a panic's payload (`panic!` with a literal or a format).
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Inner {
    /// A background thread died: the engine fails (fail-stop, which the node's watchdog turns
    /// into exit code 2), and every commit waiting to be applied learns it now.
    fn thread_died(&self, role: &str, panic: &str) {
        self.fail(format!(
            "the engine's {role} thread died ({panic}); restart the node: recovery replays \
             what the log holds"
        ));
    }

    /// Replays log records after `applied`. Returns how many were applied.
    fn replay(&self, applied: u64) -> Result<u64, OpenError> {
        if self.wal.visible_offset() <= applied || !self.opts.replay_on_open() {
            return Ok(0);
        }
        let from = Offset::new(applied + 1).unwrap_or(Offset::FIRST);
        let mut reader = self.wal.read_from(from)?;
        let mut group: Vec<(u64, NewTransaction)> = Vec::new();
        let mut group_bytes = 0usize;
        let mut count = 0;
        let flush = |group: &mut Vec<(u64, NewTransaction)>| -> Result<(), OpenError> {
            if let Some(&(offset, _)) = group.last() {
                self.apply_group(group, true)
                    .map_err(|reason| OpenError::Apply { offset, reason })?;
            }
            group.clear();
            Ok(())
        };
        while let Some(t) = reader.next_txn()? {
            group_bytes += t
                .ops
                .iter()
                .map(|o| op_bytes(&OpRef::from(o)))
                .sum::<usize>();
            group.push((
                t.offset.get(),
                NewTransaction {
                    gtid: t.gtid,
                    timestamp_us: t.timestamp_us,
                    ops: t.ops,
                },
            ));
            count += 1;
            if group.len() >= self.opts.apply_group_txns_max
                || group_bytes >= self.opts.apply_group_bytes_max
            {
                flush(&mut group)?;
                group_bytes = 0;
            }
        }
        flush(&mut group)?;
        Ok(count)
    }

    pub(crate) fn checkpoint(&self) -> Result<(), String> {
        self.sync_store()
            .map_err(|e| format!("syncing the state store failed: {e}"))
    }

    /// [`Inner::checkpoint`] with the store's error: syncs the store, then raises the log's
    /// retention floor; a failed sync fails the engine.
    fn sync_store(&self) -> Result<(), StoreError> {
        let _g = lock(&self.checkpoint_lock);
        let applied = self.applied.load(Ordering::SeqCst);
        // Every batch up to `applied` was committed to the store's journal before this sync.
        if let Err(e) = self.db.persist(Persist::Sync) {
            self.fail(format!("syncing the state store failed: {e}"));
            return Err(e);
        }
        self.wal
            .set_retention_floor(Offset::new(applied + 1).unwrap_or(Offset::FIRST));
        Ok(())
    }

    fn checkpoint_loop(self: Arc<Self>) {
        let mut stop = lock(&self.stop);
        loop {
            if *stop {
                return;
            }
            stop = self
                .stop_cv
                .wait_timeout(stop, self.opts.checkpoint_interval)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if *stop {
                return;
            }
            drop(stop);
            self.killed_by_test("checkpointer");
            if self.checkpoint().is_err() {
                return;
            }
            stop = lock(&self.stop);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Open's refusals and their advice: a damaged or foreign store is rebuilt from the log
    //! only when the log still holds the whole history (else the advice would lead to a
    //! refusal or, worse, a store without the missing history); a failed sync after replay
    //! names that step; a log naming a merge operator this build does not know is refused
    //! (replaying it without the operator would give merges another meaning).

    use std::sync::Arc;

    use tideline_wal::{
        Gtid, GtidSet, MemStorage, NewTransaction, Op, RetentionPolicy, Wal, WalOptions,
    };

    use crate::catalog;
    use crate::engine::Engine;
    use crate::error::OpenError;
    use crate::state::EngineOptions;
    use crate::store::{Backend, Store, StoreError, StoreOptions, TreeOptions, WriteBatch};

    fn small_segments() -> WalOptions {
        WalOptions {
            segment_bytes_max: 4096,
            retention: RetentionPolicy {
                retain_bytes_min: 0,
                slot_bytes_max: None,
                slot_age_max: None,
            },
            ..WalOptions::default()
        }
    }

    /// A node with 200 commits in `store`, on the log in `storage`; with `retain`, retention
    /// then removes the log's early segments. Returns the log's first offset.
    fn node_with_history(store: &std::path::Path, storage: &Arc<MemStorage>, retain: bool) -> u64 {
        let wal = Arc::new(Wal::open(storage.clone(), small_segments()).expect("open log"));
        let e = Engine::open(store, wal.clone(), EngineOptions::default()).expect("open engine");
        for i in 0..200u32 {
            e.put("default", format!("k{i:04}").as_bytes(), &[7u8; 100])
                .expect("put");
        }
        e.checkpoint().expect("checkpoint");
        if retain {
            wal.run_retention().expect("retention");
        }
        let first = wal.first_offset().get();
        e.close().expect("close engine");
        drop(e);
        wal.close().expect("close log");
        first
    }

    /// Overwrites the store's format marker with one no build writes.
    fn damage_format_marker(store: &std::path::Path) {
        let db = Backend::open(
            store,
            &StoreOptions {
                cache_bytes: 8 << 20,
                worker_threads: 0,
                #[cfg(feature = "testing")]
                faults: None,
            },
        )
        .expect("open the store");
        let meta = db
            .tree(catalog::META_KEYSPACE, &TreeOptions::default())
            .expect("meta");
        let mut batch = db.batch();
        batch.insert(&meta, catalog::KEY_FORMAT, b"99");
        batch.commit().expect("commit");
        db.persist(crate::store::Persist::Sync).expect("sync");
    }

    fn open_err(store: &std::path::Path, storage: &Arc<MemStorage>) -> OpenError {
        let wal = Wal::open(storage.clone(), small_segments()).expect("open log");
        match Engine::open(store, Arc::new(wal), EngineOptions::default()) {
            Ok(_) => panic!("the store opened; it must be refused"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_damaged_store_is_not_sent_to_a_rebuild_from_a_log_past_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(MemStorage::new());
        let store = dir.path().join("store");
        let first = node_with_history(&store, &storage, true);
        assert!(
            first > 1,
            "retention removed the early segments (first offset {first})"
        );
        damage_format_marker(&store);
        let e = open_err(&store, &storage);
        let text = e.to_string();
        assert!(matches!(e, OpenError::CorruptStore { .. }), "{text}");
        assert!(
            !text.contains("delete the store"),
            "the log starts at offset {first}: deleting the store cannot rebuild it: {text}"
        );
        assert!(text.contains("restore"), "{text}");
    }

    #[test]
    fn a_damaged_store_is_sent_to_a_rebuild_when_the_log_holds_the_whole_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Arc::new(MemStorage::new());
        let store = dir.path().join("store");
        assert_eq!(node_with_history(&store, &storage, false), 1);
        damage_format_marker(&store);
        let text = open_err(&store, &storage).to_string();
        assert!(text.contains("delete the store directory"), "{text}");
        // And the advice holds: the log rebuilds the store.
        std::fs::remove_dir_all(&store).expect("delete the store");
        let wal = Wal::open(storage.clone(), small_segments()).expect("open log");
        let e = Engine::open(&store, Arc::new(wal), EngineOptions::default()).expect("rebuild");
        assert_eq!(
            e.get("default", b"k0199").expect("get").map(|v| v.len()),
            Some(100)
        );
    }

    #[test]
    fn a_store_of_another_log_is_not_sent_to_a_rebuild_from_a_log_that_starts_after_a_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        node_with_history(&store, &Arc::new(MemStorage::new()), false);
        // Another node's log whose history begins with a bootstrap copy.
        let storage = Arc::new(MemStorage::new());
        let wal = Wal::open(storage.clone(), small_segments()).expect("open log");
        let copied: GtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-10"
            .parse()
            .expect("set");
        wal.reset_history(&copied).expect("reset");
        wal.close().expect("close log");
        let e = open_err(&store, &storage);
        let text = e.to_string();
        assert!(matches!(e, OpenError::WrongLog { .. }), "{text}");
        assert!(!text.contains("delete the store"), "{text}");
    }

    #[test]
    fn a_failed_sync_after_replay_names_the_sync_not_a_log_record() {
        let source = StoreError::new(std::io::Error::other("no space left on device"));
        let text = super::sync_after_replay_failed("/data/store", source).to_string();
        assert!(
            text.contains("syncing the state store in /data/store"),
            "names the step: {text}"
        );
        assert!(text.contains("no space left on device"), "{text}");
        assert!(!text.contains("log record 0"), "{text}");
    }

    #[test]
    fn a_log_naming_an_unknown_merge_operator_is_refused_on_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("log");
        let gtid = Gtid::new(wal.server_uuid(), 1).expect("gtid");
        wal.append(NewTransaction {
            gtid,
            timestamp_us: 1,
            ops: vec![Op::CreateTree {
                tree: "counts".into(),
                merge_operator: Some("max_v9".into()),
            }],
        })
        .expect("append");
        let text = match Engine::open(dir.path(), Arc::new(wal), EngineOptions::default()) {
            Ok(e) => panic!(
                "replay created the tree with operator {:?} instead of refusing the log",
                e.trees()
                    .iter()
                    .find(|t| t.name == "counts")
                    .map(|t| t.merge_operator)
            ),
            Err(e) => e.to_string(),
        };
        assert!(text.contains("max_v9"), "names the operator: {text}");
        assert!(
            text.contains("newer"),
            "says to run the newer build: {text}"
        );
    }
}
