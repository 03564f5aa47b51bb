//! Model-based test: random sequences of transactions (puts, deletes, merges with `add` and
//! `append`, compare-and-swap, multi-key and multi-tree transactions, tree drop and re-create)
//! run against the engine and against a `BTreeMap` model. After every step, and after every
//! simulated crash and reopen, the engine's state must equal the model of acknowledged
//! transactions, and the log position must count exactly the committed transactions.
//!
//! A crash happens while writer threads are committing (each has had a commit acknowledged,
//! so writes are observably in flight). It does not run the engine's drop path: `Engine::crash`
//! (test-only) stops the engine without a checkpoint and leaks it, so the store's directory
//! keeps only what a killed process would leave (batches still in the store's journal buffer
//! are lost), and the log keeps only its synced bytes (`MemStorage::crash`, unsynced tail
//! dropped or torn). The store image may further be rolled back to a copy taken at an earlier
//! reopen. Recovery must replay the log suffix the store lacks: guards against lost, doubled
//! (merges) or reordered replays. The in-flight writes must survive as acked ⇒ present, and
//! per writer as a gap-free prefix of what it attempted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tideline_engine::{Engine, EngineOptions, MergeOperator};
use tideline_wal::{CrashMode, MemStorage, Wal, WalOptions};

/// Actions use the first three; `inflight` takes only the writes in flight at a crash.
const TREES: [&str; 4] = ["default", "counts", "log", "inflight"];
const INFLIGHT: usize = 3;
/// Writer threads committing while a crash happens.
const WRITERS: usize = 2;

#[derive(Debug, Clone)]
enum Action {
    Put {
        tree: usize,
        key: u8,
        value: u8,
    },
    Delete {
        tree: usize,
        key: u8,
    },
    Add {
        key: u8,
        n: i8,
    },
    Append {
        key: u8,
        byte: u8,
    },
    /// Compare-and-swap on `default`: expect the model's value (or a wrong one).
    Cas {
        key: u8,
        right: bool,
        value: u8,
    },
    /// Read a key inside the transaction and copy it to another key.
    Copy {
        from: u8,
        to: u8,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Txn(Vec<Action>),
    Crash {
        tear: Option<u64>,
        rollback_store: bool,
    },
    Reopen,
    RecreateLog,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0..3usize, 0..8u8, any::<u8>()).prop_map(|(tree, key, value)| Action::Put { tree, key, value }),
        2 => (0..3usize, 0..8u8).prop_map(|(tree, key)| Action::Delete { tree, key }),
        3 => (0..8u8, any::<i8>()).prop_map(|(key, n)| Action::Add { key, n }),
        2 => (0..8u8, any::<u8>()).prop_map(|(key, byte)| Action::Append { key, byte }),
        2 => (0..8u8, any::<bool>(), any::<u8>()).prop_map(|(key, right, value)| Action::Cas { key, right, value }),
        1 => (0..8u8, 0..8u8).prop_map(|(from, to)| Action::Copy { from, to }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        12 => prop::collection::vec(action(), 1..5).prop_map(Step::Txn),
        2 => (prop::option::of(any::<u64>()), any::<bool>())
            .prop_map(|(tear, rollback_store)| Step::Crash { tear, rollback_store }),
        1 => Just(Step::Reopen),
        1 => Just(Step::RecreateLog),
    ]
}

type Model = BTreeMap<(usize, Vec<u8>), Vec<u8>>;

fn key(k: u8) -> Vec<u8> {
    format!("k{k}").into_bytes()
}

struct Harness {
    _dir: tempfile::TempDir,
    store: PathBuf,
    /// Copy of the store taken at the last reopen, to roll back to.
    old_store: Option<PathBuf>,
    storage: Arc<MemStorage>,
    engine: Option<Arc<Engine>>,
    committed: u64,
    /// Per in-flight writer, the next key number it writes.
    inflight_next: [u64; WRITERS],
    crashes: u64,
    /// Canary only: open without replaying the log.
    skip_replay: bool,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).expect("copy file");
        }
    }
}

impl Harness {
    fn new(skip_replay: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let mut h = Harness {
            store,
            old_store: None,
            _dir: dir,
            storage: Arc::new(MemStorage::new()),
            engine: None,
            committed: 0,
            inflight_next: [0; WRITERS],
            crashes: 0,
            skip_replay,
        };
        h.open();
        let e = h.engine();
        e.create_tree("counts", Some("add")).expect("create counts");
        e.create_tree("log", Some("append")).expect("create log");
        e.create_tree("inflight", None).expect("create inflight");
        h.committed = 3;
        h
    }

    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("engine is open between steps")
    }

    fn open(&mut self) {
        let wal = Wal::open(self.storage.clone(), WalOptions::default()).expect("open wal");
        let opts = EngineOptions {
            // Small history and groups exercise pruning and multi-batch replay.
            history_keys_max: 16,
            apply_group_txns_max: 3,
            unsafe_skip_replay: self.skip_replay,
            ..EngineOptions::default()
        };
        self.engine = Some(Arc::new(
            Engine::open(&self.store, Arc::new(wal), opts).expect("open engine"),
        ));
    }

    fn close(&mut self) {
        if let Some(e) = self.engine.take() {
            let wal = e.wal().clone();
            e.close().expect("close engine");
            drop(e);
            wal.close().expect("close wal");
        }
    }

    fn check(&self, model: &Model) {
        let e = self.engine();
        for (ti, tree) in TREES.iter().enumerate() {
            let got: Vec<(Vec<u8>, Vec<u8>)> = e
                .range::<&[u8]>(tree, .., false)
                .expect("scan")
                .map(|kv| kv.expect("scan item"))
                .collect();
            let want: Vec<(Vec<u8>, Vec<u8>)> = model
                .iter()
                .filter(|((t, _), _)| *t == ti)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(got, want, "tree {tree}");
            // Reverse scans and point reads agree too.
            let rev: Vec<(Vec<u8>, Vec<u8>)> = e
                .range::<&[u8]>(tree, .., true)
                .expect("scan")
                .map(|kv| kv.expect("scan item"))
                .collect();
            assert_eq!(rev, want.iter().rev().cloned().collect::<Vec<_>>());
            for (k, v) in &want {
                assert_eq!(e.get(tree, k).expect("get").as_ref(), Some(v));
            }
        }
        let pos = e.position();
        assert_eq!(pos.offset.map_or(0, |o| o.get()), self.committed);
        assert_eq!(pos.gtid_executed.count(), self.committed);
        assert_eq!(e.wal().visible_offset(), self.committed);
    }
}

/// Starts the writers that are in flight at a crash and returns once each has had a commit
/// acknowledged. Each thread puts `w<writer>-<n>` with n counting up from `next[writer]`
/// until the engine refuses, and returns how many of its commits were acknowledged.
fn start_writers(e: &Arc<Engine>, next: [u64; WRITERS]) -> Vec<std::thread::JoinHandle<u64>> {
    let acked: Arc<[AtomicU64; WRITERS]> = Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
    let handles: Vec<_> = (0..WRITERS)
        .map(|w| {
            let e = e.clone();
            let acked = acked.clone();
            std::thread::spawn(move || {
                let mut n = next[w];
                while e
                    .put("inflight", &inflight_key(w, n), &n.to_le_bytes())
                    .is_ok()
                {
                    n += 1;
                    acked[w].store(n - next[w], Ordering::SeqCst);
                }
                n - next[w]
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.iter().any(|a| a.load(Ordering::SeqCst) == 0) {
        assert!(
            Instant::now() < deadline,
            "the in-flight writers had no commit acknowledged within 30 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    handles
}

fn inflight_key(writer: usize, n: u64) -> Vec<u8> {
    format!("w{writer}-{n:08}").into_bytes()
}

impl Harness {
    /// After a crash's reopen: each in-flight writer's keys that survived must be a gap-free
    /// run from where it started, holding at least every acknowledged commit; they join the
    /// model (one transaction each).
    fn absorb_inflight(&mut self, acked: &[u64], model: &mut Model) {
        let e = self.engine().clone();
        for (w, &acked) in acked.iter().enumerate() {
            let start = self.inflight_next[w];
            let prefix = format!("w{w}-").into_bytes();
            let found: Vec<(Vec<u8>, Vec<u8>)> = e
                .range::<&[u8]>("inflight", .., false)
                .expect("scan inflight")
                .map(|kv| kv.expect("scan item"))
                .filter(|(k, _)| k.starts_with(&prefix))
                .filter(|(k, _)| k.as_slice() >= inflight_key(w, start).as_slice())
                .collect();
            let survived = found.len() as u64;
            let want: Vec<Vec<u8>> = (start..start + survived)
                .map(|n| inflight_key(w, n))
                .collect();
            let got: Vec<Vec<u8>> = found.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(got, want, "writer {w}: the surviving writes have a gap");
            assert!(
                survived >= acked,
                "writer {w}: {acked} commits acknowledged, {survived} survived the crash"
            );
            for (k, v) in found {
                model.insert((INFLIGHT, k), v);
            }
            self.committed += survived;
            self.inflight_next[w] = start + survived;
        }
    }
}

fn run(steps: Vec<Step>) {
    run_with(steps, false);
}

fn run_with(steps: Vec<Step>, skip_replay: bool) {
    let mut h = Harness::new(skip_replay);
    let mut model: Model = BTreeMap::new();
    for step in steps {
        match step {
            Step::Txn(actions) => {
                let mut next = model.clone();
                let out = h
                    .engine()
                    .transaction(|tx| {
                        next = model.clone();
                        for a in &actions {
                            match *a {
                                Action::Put {
                                    tree,
                                    key: k,
                                    value,
                                } => {
                                    tx.put(TREES[tree], &key(k), &[value])?;
                                    next.insert((tree, key(k)), vec![value]);
                                }
                                Action::Delete { tree, key: k } => {
                                    tx.delete(TREES[tree], &key(k))?;
                                    next.remove(&(tree, key(k)));
                                }
                                Action::Add { key: k, n } => {
                                    tx.merge("counts", &key(k), n.to_string().as_bytes())?;
                                    let old = next.get(&(1, key(k))).cloned();
                                    next.insert(
                                        (1, key(k)),
                                        MergeOperator::Add
                                            .resolve(old.as_deref(), n.to_string().as_bytes()),
                                    );
                                }
                                Action::Append { key: k, byte } => {
                                    tx.merge("log", &key(k), &[byte])?;
                                    next.entry((2, key(k))).or_default().push(byte);
                                }
                                Action::Cas {
                                    key: k,
                                    right,
                                    value,
                                } => {
                                    let cur = tx.get("default", &key(k))?;
                                    assert_eq!(cur, next.get(&(0, key(k))).cloned());
                                    let expected = if right {
                                        cur.clone()
                                    } else {
                                        Some(vec![b'x'; 3])
                                    };
                                    if cur == expected {
                                        tx.put("default", &key(k), &[value])?;
                                        next.insert((0, key(k)), vec![value]);
                                    }
                                }
                                Action::Copy { from, to } => {
                                    let v = tx.get("counts", &key(from))?;
                                    assert_eq!(v, next.get(&(1, key(from))).cloned());
                                    if let Some(v) = v {
                                        tx.put("default", &key(to), &v)?;
                                        next.insert((0, key(to)), v);
                                    }
                                }
                            }
                        }
                        Ok(())
                    })
                    .expect("single-threaded transactions do not conflict");
                if out.commit.is_some() {
                    h.committed += 1;
                }
                model = next;
            }
            Step::Crash {
                tear,
                rollback_store,
            } => {
                let e = h.engine.take().expect("open");
                let writers = start_writers(&e, h.inflight_next);
                // The store stops where a killed process would leave it, then the log keeps
                // only its synced bytes: the store is never ahead of the log's image.
                e.crash();
                let mode = match tear {
                    Some(seed) => CrashMode::TearUnsynced { seed },
                    None => CrashMode::DropUnsynced,
                };
                h.storage = Arc::new(h.storage.crash(mode));
                let acked: Vec<u64> = writers
                    .into_iter()
                    .map(|w| w.join().expect("writer thread panicked"))
                    .collect();
                // The crashed store's directory stays locked by the leaked store: reopen a copy.
                h.crashes += 1;
                let image = h.store.with_extension(format!("crash{}", h.crashes));
                if rollback_store && let Some(old) = &h.old_store {
                    copy_dir(old, &image);
                } else {
                    copy_dir(&h.store, &image);
                }
                h.store = image;
                h.open();
                h.absorb_inflight(&acked, &mut model);
            }
            Step::Reopen => {
                h.close();
                // Keep a copy of the store as it is now, for a later rollback.
                let copy = h.store.with_extension(format!("copy{}", h.committed));
                copy_dir(&h.store, &copy);
                h.old_store = Some(copy);
                h.open();
            }
            Step::RecreateLog => {
                // Drop and re-create the append tree: the old contents must vanish.
                let e = h.engine();
                let out = e
                    .transaction(|tx| {
                        tx.drop_tree("log")?;
                        tx.create_tree("log", Some("append"))?;
                        Ok(())
                    })
                    .expect("drop and create");
                assert!(out.commit.is_some());
                h.committed += 1;
                model.retain(|(t, _), _| *t != 2);
            }
        }
        h.check(&model);
    }
    h.close();
    h.open();
    h.check(&model);
}

/// Cases of the proptest: `TIDELINE_MODEL_CASES`, default 12 (about 25 s on 2 shared cores;
/// each crash costs a reopen and a copy of the store).
fn cases() -> u32 {
    std::env::var("TIDELINE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model_across_crashes(steps in prop::collection::vec(step(), 1..40)) {
        run(steps);
    }
}

#[test]
fn crash_with_store_rolled_back_replays_merges_once() {
    run(vec![
        Step::Txn(vec![
            Action::Add { key: 1, n: 5 },
            Action::Append { key: 1, byte: 7 },
        ]),
        Step::Reopen,
        Step::Txn(vec![Action::Add { key: 1, n: 3 }]),
        Step::Txn(vec![
            Action::Append { key: 1, byte: 9 },
            Action::Copy { from: 1, to: 2 },
        ]),
        Step::Crash {
            tear: Some(3),
            rollback_store: true,
        },
        Step::Txn(vec![Action::Add { key: 1, n: -1 }]),
        Step::Crash {
            tear: None,
            rollback_store: true,
        },
    ]);
}

/// Canary: with log replay disabled, a crash that rolls the store back must be caught.
#[test]
fn canary_without_replay_the_model_check_fails() {
    let steps = vec![
        Step::Txn(vec![Action::Add { key: 1, n: 5 }]),
        Step::Reopen,
        Step::Txn(vec![Action::Add { key: 1, n: 3 }]),
        Step::Crash {
            tear: None,
            rollback_store: true,
        },
    ];
    let caught = std::panic::catch_unwind(|| run_with(steps, true)).is_err();
    assert!(
        caught,
        "with replay disabled the model test passed: it is blind to lost commits"
    );
}

/// Canary for the crash itself: with log replay disabled, a crash with the store *not* rolled
/// back must still be caught. Only a crash that skips the drop path (no checkpoint, no flush
/// of the store's journal) leaves the store behind the log; a clean close would not.
#[test]
fn canary_crash_without_rollback_loses_store_state_replay_must_restore() {
    let steps = vec![
        Step::Txn(vec![Action::Add { key: 1, n: 5 }]),
        Step::Txn(vec![Action::Put {
            tree: 0,
            key: 2,
            value: 9,
        }]),
        Step::Crash {
            tear: None,
            rollback_store: false,
        },
    ];
    let caught = std::panic::catch_unwind(|| run_with(steps, true)).is_err();
    assert!(
        caught,
        "with replay disabled a crash lost nothing: the crash runs the clean drop path"
    );
}
