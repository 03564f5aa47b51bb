//! Secondary indexes in the engine: what a user relies on when declaring, maintaining and
//! querying one.
//!
//! - The model test runs random workloads (puts that change the indexed fields, deletes,
//!   json-merge-patch merges, documents that are not JSON or lack a field, drop and re-create
//!   of an index) and after every step, every clean reopen and every simulated crash (no clean
//!   shutdown, store rolled back to an older copy so recovery must replay the log suffix)
//!   checks that each index equals a recomputation from a full scan of the tree: the same
//!   documents in the same order, no stale entry (a query verifies each entry against its
//!   document), and `entries`/`skipped` equal to the recomputed counts.
//! - The SIGKILL test kills a real child process mid-workload and mid-backfill, ≥ 20 cycles,
//!   and checks the same after each restart. Canary: with index maintenance skipped during
//!   replay (test-only switch), the same checks must fail.
//! - Backfill while writes go on (50,000 documents; 1,000,000 in the ignored long run).
//! - Unique indexes refuse a second key for a value once live, also against transactions
//!   committed but not yet applied, and report duplicates met while backfilling; an index
//!   that such a transaction drops refuses nothing.
//! - A query page filled to its byte bound stops before a 16 MiB document that would take its
//!   answer past the message limit, and the next page holds that document alone.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::index_child::{crash_child, crash_cycles};
use common::index_fixture::{INDEXES, LIVE_WAIT, TREE, check_indexes, file_engine, load_docs};
use proptest::prelude::*;
use rand::Rng;
use tideline_engine::{Engine, EngineOptions, ReadError, WriteError};
use tideline_wal::{CrashMode, MemStorage, Wal, WalOptions};

// ---------------------------------------------------------------------------------------
// Model test
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Put { key: u8, v: u8, w: u8 },
    NotJson { key: u8 },
    Delete { key: u8 },
    Patch { key: u8, v: u8 },
    DropRecreate { which: usize },
    Crash { rollback_store: bool },
    Reopen,
}

/// A field value: strings, numbers, booleans, null, an object (skipped), or absent.
fn field(x: u8) -> Option<serde_json::Value> {
    use serde_json::json;
    match x % 9 {
        0 => Some(json!("a")),
        1 => Some(json!("b")),
        2 => Some(json!("a\u{0}b")),
        3 => Some(json!(1)),
        4 => Some(json!(2.5)),
        5 => Some(json!(true)),
        6 => Some(json!(null)),
        7 => Some(json!({"x": 1})),
        _ => None,
    }
}

fn doc(v: u8, w: u8) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    if let Some(v) = field(v) {
        m.insert("v".into(), v);
    }
    if let Some(w) = field(w) {
        m.insert("w".into(), w);
    }
    serde_json::Value::Object(m).to_string().into_bytes()
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..12u8, any::<u8>(), any::<u8>()).prop_map(|(key, v, w)| Step::Put { key, v, w }),
        1 => (0..12u8).prop_map(|key| Step::NotJson { key }),
        3 => (0..12u8).prop_map(|key| Step::Delete { key }),
        4 => (0..12u8, any::<u8>()).prop_map(|(key, v)| Step::Patch { key, v }),
        1 => (0..2usize).prop_map(|which| Step::DropRecreate { which }),
        2 => any::<bool>().prop_map(|rollback_store| Step::Crash { rollback_store }),
        1 => Just(Step::Reopen),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("k{k:02}").into_bytes()
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

struct Harness {
    _dir: tempfile::TempDir,
    store: PathBuf,
    old_store: Option<PathBuf>,
    storage: Arc<MemStorage>,
    engine: Option<Engine>,
    skip_index_replay: bool,
    copies: u32,
}

impl Harness {
    fn new(skip_index_replay: bool) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Harness {
            store: dir.path().join("store"),
            _dir: dir,
            old_store: None,
            storage: Arc::new(MemStorage::new()),
            engine: None,
            skip_index_replay,
            copies: 0,
        };
        h.open();
        h.engine()
            .create_tree(TREE, Some("json-merge-patch"))
            .expect("create tree");
        h
    }

    fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("open between steps")
    }

    fn open(&mut self) {
        let wal = Wal::open(self.storage.clone(), WalOptions::default()).expect("open wal");
        let opts = EngineOptions {
            apply_group_txns_max: 3,
            unsafe_skip_index_replay: self.skip_index_replay,
            ..EngineOptions::default()
        };
        self.engine = Some(Engine::open(&self.store, Arc::new(wal), opts).expect("open engine"));
    }

    /// Drops the engine without its final checkpoint mattering: the log keeps its synced
    /// bytes and the store may go back to the copy taken at the last reopen.
    fn crash(&mut self, rollback_store: bool) {
        let e = self.engine.take().expect("open");
        drop(e);
        self.storage = Arc::new(self.storage.crash(CrashMode::DropUnsynced));
        if rollback_store && let Some(old) = &self.old_store {
            std::fs::remove_dir_all(&self.store).expect("remove store");
            copy_dir(old, &self.store);
        }
        self.open();
    }

    fn reopen(&mut self) {
        if let Some(e) = self.engine.take() {
            let wal = e.wal().clone();
            e.close().expect("close");
            drop(e);
            wal.close().expect("close wal");
        }
        self.copies += 1;
        let copy = self.store.with_extension(format!("copy{}", self.copies));
        copy_dir(&self.store, &copy);
        self.old_store = Some(copy);
        self.open();
    }
}

fn run(steps: &[Step], skip_index_replay: bool) -> Result<(), String> {
    let mut h = Harness::new(skip_index_replay);
    let mut declared: Vec<&str> = Vec::new();
    for (name, paths) in INDEXES {
        h.engine()
            .create_index(TREE, name, paths, false)
            .map_err(|e| e.to_string())?;
        declared.push(name);
    }
    for (i, s) in steps.iter().enumerate() {
        let e = h.engine();
        match s {
            Step::Put { key: k, v, w } => {
                e.put(TREE, &key(*k), &doc(*v, *w))
                    .map_err(|e| e.to_string())?;
            }
            Step::NotJson { key: k } => {
                e.put(TREE, &key(*k), b"not json {")
                    .map_err(|e| e.to_string())?;
            }
            Step::Delete { key: k } => {
                e.delete(TREE, &key(*k)).map_err(|e| e.to_string())?;
            }
            Step::Patch { key: k, v } => {
                let patch = serde_json::json!({ "v": field(*v) }).to_string();
                e.merge(TREE, &key(*k), patch.as_bytes())
                    .map_err(|e| e.to_string())?;
            }
            Step::DropRecreate { which } => {
                let (name, paths) = INDEXES[*which];
                e.drop_index(TREE, name).map_err(|e| e.to_string())?;
                e.create_index(TREE, name, paths, false)
                    .map_err(|e| e.to_string())?;
            }
            Step::Crash { rollback_store } => h.crash(*rollback_store),
            Step::Reopen => h.reopen(),
        }
        check_indexes(h.engine(), &declared).map_err(|e| format!("after step {i} {s:?}: {e}"))?;
    }
    h.reopen();
    check_indexes(h.engine(), &declared).map_err(|e| format!("after the last reopen: {e}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, ..ProptestConfig::default() })]
    #[test]
    fn indexes_equal_recomputation_across_crashes(steps in prop::collection::vec(step(), 1..40)) {
        if let Err(e) = run(&steps, false) {
            panic!("{e}");
        }
    }
}

/// A fixed workload whose crash rolls the store back past writes that change indexed
/// fields: recovery replays them, and must maintain the indexes while doing so.
fn replay_workload() -> Vec<Step> {
    let mut steps = vec![Step::Put { key: 1, v: 0, w: 1 }, Step::Reopen];
    for k in 0..6 {
        steps.push(Step::Put {
            key: k,
            v: k + 1,
            w: 0,
        });
        steps.push(Step::Patch { key: 1, v: k });
    }
    steps.push(Step::Delete { key: 1 });
    steps.push(Step::Crash {
        rollback_store: true,
    });
    steps
}

#[test]
fn a_crash_with_the_store_rolled_back_replays_index_maintenance() {
    run(&replay_workload(), false).expect("indexes equal recomputation");
}

/// Canary: with index maintenance skipped during replay, the same check fails.
#[test]
fn canary_without_index_replay_the_model_check_fails() {
    let err = run(&replay_workload(), true).expect_err("the check must catch missing entries");
    assert!(err.contains("after step"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Queries, states, unique, skipped
// ---------------------------------------------------------------------------------------

/// Once a write returns, the index's counters show it: a committer may see its transaction
/// applied the moment the applier publishes the offset, so everything the group changed must
/// be published by then. (The model test above met the lag once in ~1,500 cases: `entries`
/// one behind right after a put.) The applier pauses right after publishing the offset
/// (test-only switch), longer than a committer's wait between two looks.
#[test]
fn index_counters_show_a_write_once_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("wal");
    let opts = EngineOptions {
        unsafe_pause_after_applied: Some(Duration::from_millis(200)),
        ..EngineOptions::default()
    };
    let e = Engine::open(dir.path(), Arc::new(wal), opts).expect("engine");
    e.create_tree("users", None).expect("tree");
    e.create_index("users", "by_email", &["/email"], false)
        .expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    for (i, doc) in [
        &br#"{"email":"a@x"}"#[..],
        b"not json",
        br#"{"email":"b@x"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        e.put("users", format!("u{i}").as_bytes(), doc)
            .expect("put");
        let info = &e.indexes()[0];
        let want = [(1, 0), (1, 1), (2, 1)][i];
        assert_eq!(
            (info.entries, info.skipped),
            want,
            "entries/skipped right after write {i} returned"
        );
    }
}

fn mem_engine(dir: &Path) -> Engine {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("wal");
    Engine::open(dir, Arc::new(wal), EngineOptions::default()).expect("engine")
}

#[test]
fn get_by_index_finds_the_current_documents_and_counts_skipped_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("users", None).expect("tree");
    e.put("users", b"u1", br#"{"email":"a@x","n":1}"#)
        .expect("put");
    e.put("users", b"u2", br#"{"email":"b@x"}"#).expect("put");
    e.put("users", b"u3", b"not json").expect("put");
    e.put("users", b"u4", br#"{"name":"no email"}"#)
        .expect("put");
    e.put("users", b"u5", br#"{"email":{"nested":1}}"#)
        .expect("put");
    e.create_index("users", "by_email", &["/email"], false)
        .expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    let info = &e.indexes()[0];
    assert_eq!((info.entries, info.skipped), (2, 3), "{info:?}");
    let get = |v: &str| {
        e.snapshot()
            .index_get("users", "by_email", &[v.as_bytes().to_vec()], 100)
            .expect("get")
            .rows
    };
    assert_eq!(
        get("a@x"),
        vec![(b"u1".to_vec(), br#"{"email":"a@x","n":1}"#.to_vec())]
    );
    // Change the indexed field: the old value no longer finds it.
    e.put("users", b"u1", br#"{"email":"c@x"}"#).expect("put");
    assert!(get("a@x").is_empty());
    assert_eq!(get("c@x").len(), 1);
    e.delete("users", b"u2").expect("delete");
    assert!(get("b@x").is_empty());
    // A formerly skipped document gains the field.
    e.put("users", b"u4", br#"{"email":"a@x"}"#).expect("put");
    assert_eq!(get("a@x")[0].0, b"u4".to_vec());
    let info = &e.indexes()[0];
    assert_eq!((info.entries, info.skipped), (2, 2), "{info:?}");
    // Unknown index: a clear error.
    let err = e
        .snapshot()
        .index_get("users", "nope", &[b"x".to_vec()], 1)
        .expect_err("unknown");
    assert!(err.to_string().contains("no index named `nope`"), "{err}");
    // Dropped: gone; created again: rebuilt from the current documents.
    e.drop_index("users", "by_email").expect("drop");
    assert!(e.indexes().is_empty());
    e.create_index("users", "by_email", &["/email"], false)
        .expect("create again");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    assert_eq!(get("c@x").len(), 1);
    assert!(get("b@x").is_empty());
}

#[test]
fn bad_definitions_get_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("t", None).expect("tree");
    let err = e
        .create_index("t", "x", &["email"], false)
        .expect_err("bad path");
    assert!(err.to_string().contains("is not a JSON pointer"), "{err}");
    let err = e
        .create_index("missing", "x", &["/a"], false)
        .expect_err("no tree");
    assert!(matches!(err, WriteError::UnknownTree(_)), "{err}");
    let err = e
        .create_index("t", "bad name", &["/a"], false)
        .expect_err("name");
    assert!(matches!(err, WriteError::BadIndex(_)), "{err}");
    e.create_index("t", "x", &["/a"], false).expect("create");
    let err = e
        .create_index("t", "x", &["/b"], false)
        .expect_err("exists");
    assert!(matches!(err, WriteError::IndexExists { .. }), "{err}");
    let err = e.drop_index("t", "y").expect_err("unknown");
    assert!(matches!(err, WriteError::UnknownIndex { .. }), "{err}");
    // Dropping the tree drops its indexes.
    e.drop_tree("t").expect("drop tree");
    assert!(e.indexes().is_empty());
}

#[test]
fn a_unique_index_refuses_a_second_key_once_live_and_reports_backfill_duplicates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("users", None).expect("tree");
    e.put("users", b"u1", br#"{"email":"a@x"}"#).expect("put");
    e.put("users", b"u2", br#"{"email":"a@x"}"#).expect("put");
    e.put("users", b"u3", br#"{"email":"b@x"}"#).expect("put");
    e.create_index("users", "by_email", &["/email"], true)
        .expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    let info = &e.indexes()[0];
    assert_eq!(info.duplicates, 1, "{info:?}");
    assert!(
        info.duplicate_examples[0].contains("a@x"),
        "{:?}",
        info.duplicate_examples
    );
    let err = e
        .put("users", b"u9", br#"{"email":"b@x"}"#)
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "unique index `by_email` on tree `users` already maps value \"b@x\" to key \"u3\"; \
         nothing was written: change or delete that document first, or drop the index and \
         create it without --unique"
    );
    assert_eq!(e.get("users", b"u9").expect("get"), None);
    // Rewriting the holder itself, or moving the value within one transaction, is fine.
    e.put("users", b"u3", br#"{"email":"b@x","n":2}"#)
        .expect("same key");
    e.transaction(|tx| {
        tx.put("users", b"u3", br#"{"email":"c@x"}"#)?;
        tx.put("users", b"u9", br#"{"email":"b@x"}"#)?;
        Ok(())
    })
    .expect("value moved within a transaction");
    // Two keys with one value inside one transaction: refused.
    let err = e
        .transaction(|tx| {
            tx.put("users", b"n1", br#"{"email":"z@x"}"#)?;
            tx.put("users", b"n2", br#"{"email":"z@x"}"#)?;
            Ok(())
        })
        .expect_err("refused");
    assert!(matches!(err, WriteError::UniqueViolation { .. }), "{err}");
}

/// One duplicate pair is counted once, whichever key the backfill meets first: here `u2` is
/// written (and indexed) by the very transaction that declares the index, `u1` was there
/// before, so the backfill meets `u1` with `u2`'s entry already present, then meets `u2`.
/// Guards against `duplicates: 2` and two examples for a pair the same data without the
/// live write reports as one.
#[test]
fn a_duplicate_pair_written_with_the_declaration_is_counted_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("users", None).expect("tree");
    e.put("users", b"u1", br#"{"email":"a@x"}"#).expect("put");
    e.transaction(|tx| {
        tx.create_index("users", "by_email", &["/email"], true)?;
        tx.put("users", b"u2", br#"{"email":"a@x"}"#)?;
        Ok(())
    })
    .expect("declare and write");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    let info = &e.indexes()[0];
    assert_eq!(
        (info.duplicates, info.duplicate_examples.len()),
        (1, 1),
        "one pair of keys sharing a value counted as {} duplicates: {:?}",
        info.duplicates,
        info.duplicate_examples
    );
}

/// A transaction that drops a unique index (or its tree) is not refused for a value that
/// index maps to another key: once the transaction is applied, the index no longer exists.
#[test]
fn a_transaction_that_drops_a_unique_index_is_not_refused_by_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("users", None).expect("tree");
    e.put("users", b"u3", br#"{"email":"b@x"}"#).expect("put");
    e.create_index("users", "by_email", &["/email"], true)
        .expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    e.transaction(|tx| {
        tx.drop_index("users", "by_email")?;
        tx.put("users", b"u9", br#"{"email":"b@x"}"#)?;
        Ok(())
    })
    .expect("the index is dropped with the write");
    assert!(e.indexes().is_empty());
    e.create_index("users", "by_email", &["/email"], true)
        .expect("create again");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    e.transaction(|tx| {
        tx.drop_tree("users")?;
        tx.create_tree("users", None)?;
        tx.put("users", b"u7", br#"{"email":"b@x"}"#)?;
        Ok(())
    })
    .expect("the tree and its index are dropped with the write");
    assert_eq!(
        e.get("users", b"u7").expect("get").as_deref(),
        Some(&br#"{"email":"b@x"}"#[..])
    );
}

/// A write is not refused by a unique index that a transaction committed and not yet applied
/// drops (the index alone, or created again on another field; its tree, alone or with an
/// index of the same name created again): that index will no longer exist when the write is
/// applied. The applier is held back (test-only pause) so the dropping transaction stays
/// unapplied while the write commits; the write commits, or at worst gets a retryable
/// conflict, never a uniqueness violation.
#[test]
fn a_unique_index_dropped_by_a_pending_transaction_refuses_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("wal");
    let e = Arc::new(
        Engine::open(
            dir.path(),
            Arc::new(wal),
            EngineOptions {
                unsafe_pause_before_apply: Some(Duration::from_millis(1500)),
                ..EngineOptions::default()
            },
        )
        .expect("engine"),
    );
    type Dropping = fn(&mut tideline_engine::Txn<'_>, &str) -> Result<(), WriteError>;
    let cases: [(&str, Dropping); 4] = [
        ("the index", |tx, t| tx.drop_index(t, "by_email")),
        ("the tree", |tx, t| {
            tx.drop_tree(t)?;
            tx.create_tree(t, None)
        }),
        ("the tree, its index created again", |tx, t| {
            tx.drop_tree(t)?;
            tx.create_tree(t, None)?;
            tx.create_index(t, "by_email", &["/email"], true)
        }),
        ("the index, created again on another field", |tx, t| {
            tx.drop_index(t, "by_email")?;
            tx.create_index(t, "by_email", &["/other"], true)
        }),
    ];
    // One transaction sets every case up: the pause holds back each apply.
    e.transaction(|tx| {
        for i in 0..cases.len() {
            let t = format!("c{i}");
            tx.create_tree(&t, None)?;
            tx.put(&t, b"k1", br#"{"email":"a"}"#)?;
            tx.create_index(&t, "by_email", &["/email"], true)?;
        }
        Ok(())
    })
    .expect("setup");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    let mut refused = Vec::new();
    for (i, (what, dropping)) in cases.into_iter().enumerate() {
        let t = format!("c{i}");
        let dropper = {
            let e = e.clone();
            let t = t.clone();
            std::thread::spawn(move || e.transaction(|tx| dropping(tx, &t)).map(|_| ()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.wal().visible_offset() <= e.applied_offset() {
            assert!(
                Instant::now() < deadline,
                "{what}: the drop never reached the log"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = e.put(&t, b"k2", br#"{"email":"a"}"#);
        if !(r.is_ok() || r.as_ref().is_err_and(WriteError::is_retryable)) {
            refused.push(format!("dropping {what}: {r:?}"));
        }
        dropper
            .join()
            .expect("dropper")
            .unwrap_or_else(|err| panic!("dropping {what}: {err}"));
    }
    assert!(
        refused.is_empty(),
        "writes refused by a unique index being dropped: {refused:#?}"
    );
}

/// Concurrent writers race for one value: exactly one wins, whatever the apply timing
/// (claims of transactions committed but not yet applied count).
#[test]
fn concurrent_writers_of_one_unique_value_commit_exactly_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Arc::new(mem_engine(dir.path()));
    e.create_tree("users", None).expect("tree");
    e.create_index("users", "by_email", &["/email"], true)
        .expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    for round in 0..50 {
        let value = format!(r#"{{"email":"r{round}"}}"#);
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let e = e.clone();
                let value = value.clone();
                std::thread::spawn(move || {
                    e.put(
                        "users",
                        format!("r{round}-w{w}").as_bytes(),
                        value.as_bytes(),
                    )
                    .is_ok()
                })
            })
            .collect();
        let won = handles
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .filter(|ok| *ok)
            .count();
        let held = e
            .snapshot()
            .index_get("users", "by_email", &[format!("r{round}").into_bytes()], 10)
            .expect("get")
            .rows
            .len();
        // A writer may also lose to a retryable conflict; never may two win.
        assert!(
            won <= 1 && held == won,
            "round {round}: {won} won, {held} held"
        );
    }
}

/// An in-memory engine with `opts` whose tree `users` holds `docs` documents `d00000`,
/// `d00001`, ... (`{"email":"dN@x"}`), loaded in one transaction, with index `by_email` on
/// `/email` declared (and backfilling: with 16 documents per backfill step, it goes live
/// only after `docs / 16` steps).
fn backfilling(dir: &Path, opts: EngineOptions, docs: u32, unique: bool) -> Arc<Engine> {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("wal");
    let opts = EngineOptions {
        index_backfill_keys: 16,
        ..opts
    };
    let e = Arc::new(Engine::open(dir, Arc::new(wal), opts).expect("engine"));
    e.create_tree("users", None).expect("tree");
    e.transaction(|tx| {
        for i in 0..docs {
            tx.put(
                "users",
                format!("d{i:05}").as_bytes(),
                format!(r#"{{"email":"d{i}@x"}}"#).as_bytes(),
            )?;
        }
        Ok(())
    })
    .expect("load");
    e.create_index("users", "by_email", &["/email"], unique)
        .expect("create");
    e
}

/// A transaction committed while a unique index backfills, and applied only after the
/// index went live, still holds its value against a newer writer: the newer one is refused,
/// and the live index never maps one value to two keys. The applier pauses before each group
/// (test-only switch), so the first writer stays unapplied across the go-live: the backfill's
/// 63 steps take well over the first writer's check and well under the 3 s pause, even for a
/// debug build on a loaded machine.
#[test]
fn a_value_written_during_the_backfill_still_counts_once_the_index_is_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = backfilling(
        dir.path(),
        EngineOptions {
            unsafe_pause_before_apply: Some(Duration::from_secs(3)),
            ..EngineOptions::default()
        },
        1000,
        true,
    );
    assert!(
        matches!(
            e.indexes()[0].state,
            tideline_engine::IndexState::Backfilling { .. }
        ),
        "the index must still be backfilling when the first writer commits"
    );
    let first = {
        let e = e.clone();
        std::thread::spawn(move || e.put("users", b"k1", br#"{"email":"dup@x"}"#))
    };
    assert!(e.wait_indexes_live(LIVE_WAIT));
    assert_eq!(
        e.get("users", b"k1").expect("get"),
        None,
        "the first writer must still be unapplied when the second one commits"
    );
    let second = e.put("users", b"k2", br#"{"email":"dup@x"}"#);
    first.join().expect("first writer").expect("first write");
    assert!(
        second.is_err(),
        "a second key took a value that a committed write holds"
    );
    let rows = e
        .snapshot()
        .index_get("users", "by_email", &[b"dup@x".to_vec()], 10)
        .expect("get")
        .rows;
    assert_eq!(
        rows.len(),
        1,
        "the live unique index maps one value to {rows:?}"
    );
}

/// Two transactions that give one value to two keys while a unique index backfills, applied
/// in one group behind the backfill's cursor: the index reports the duplicate (a unique
/// index that went live with an unreported duplicate would claim a uniqueness it lacks).
#[test]
fn duplicates_written_in_one_apply_group_during_the_backfill_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = backfilling(
        dir.path(),
        EngineOptions {
            unsafe_pause_before_apply: Some(Duration::from_millis(500)),
            ..EngineOptions::default()
        },
        2000,
        true,
    );
    // Keys before every loaded one: the backfill's first step passes them before they exist,
    // so only the writes' own maintenance can see the duplicate.
    let writers: Vec<_> = [&b"!a"[..], b"!b"]
        .into_iter()
        .map(|key| {
            let e = e.clone();
            std::thread::spawn(move || e.put("users", key, br#"{"email":"dup@x"}"#))
        })
        .collect();
    for w in writers {
        w.join()
            .expect("writer")
            .expect("both commit while the index backfills");
    }
    assert!(e.wait_indexes_live(LIVE_WAIT));
    let info = &e.indexes()[0];
    assert_eq!(info.duplicates, 1, "{info:?}");
    assert!(
        info.duplicate_examples[0].contains("dup@x"),
        "{:?}",
        info.duplicate_examples
    );
}

/// A snapshot taken while an index backfills reads the index as it was then: once the index
/// has gone live, a query through that older snapshot is still refused (or complete), never
/// silently missing the documents the backfill had not reached when it was taken.
#[test]
fn a_snapshot_taken_during_the_backfill_never_answers_from_a_partial_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = backfilling(dir.path(), EngineOptions::default(), 2000, false);
    let old = e.snapshot();
    // Still backfilling after the snapshot was taken, so backfilling when it was taken.
    assert!(
        matches!(
            e.indexes()[0].state,
            tideline_engine::IndexState::Backfilling { .. }
        ),
        "the snapshot must be taken while the index backfills"
    );
    assert!(e.wait_indexes_live(LIVE_WAIT));
    // The last document in key order: the last one the backfill reaches.
    match old.index_get("users", "by_email", &[b"d1999@x".to_vec()], 10) {
        Err(ReadError::IndexNotLive { .. }) => {}
        Ok(page) => assert_eq!(
            page.rows.len(),
            1,
            "a query through a snapshot taken mid-backfill missed a document"
        ),
        Err(other) => panic!("{other}"),
    }
    // A new snapshot reads the live index.
    let rows = e
        .snapshot()
        .index_get("users", "by_email", &[b"d1999@x".to_vec()], 10)
        .expect("get")
        .rows;
    assert_eq!(rows.len(), 1);
}

#[test]
fn queries_are_refused_while_backfilling() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("t", None).expect("tree");
    e.create_index("t", "i", &["/a"], false).expect("create");
    // Right after the declaration the index may still be backfilling; either it is live or
    // the query says what to do.
    match e.snapshot().index_get("t", "i", &[b"x".to_vec()], 1) {
        Ok(_) => {}
        Err(err) => assert!(
            err.to_string().contains("query it once it is live"),
            "{err}"
        ),
    }
    assert!(e.wait_indexes_live(LIVE_WAIT));
    assert!(e.snapshot().index_is_live("t", "i").expect("exists"));
}

/// What the protocol promises an index page (docs/PROTOCOL.md, `IndexQuery`): each row counts
/// as its key, its value and the 16 bytes that frame them in an `IndexRows` answer, and a
/// page of several rows stays within `bytes_max` (capped at 1 MiB) so that its answer fits a
/// message of 17 MiB, where a row alone (up to a 16 MiB value) fits too.
const ROW_ENVELOPE_BYTES: u64 = 16;
const PAGE_BYTES_MAX: u64 = 1 << 20;
const MESSAGE_BYTES_MAX: u64 = 17 << 20;

/// Bytes of `rows` as the protocol counts them.
fn page_bytes(rows: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    rows.iter()
        .map(|(k, v)| (k.len() + v.len()) as u64 + ROW_ENVELOPE_BYTES)
        .sum()
}

/// A document indexed under `v = "a"` of exactly `len` bytes.
fn padded_doc(len: usize) -> Vec<u8> {
    let (head, tail) = (r#"{"v":"a","pad":""#, r#""}"#);
    let mut doc = head.as_bytes().to_vec();
    doc.resize(len - tail.len(), b'x');
    doc.extend_from_slice(tail.as_bytes());
    assert_eq!(doc.len(), len);
    doc
}

/// A page filled to its bound with small documents, then the largest document there is:
/// the page must stop before it (else the answer passes the message limit, the client's
/// frame decoder refuses it, and asking again from the same `after` fails forever), and the
/// next page holds it alone, with nothing skipped or repeated across the pages.
#[test]
fn an_index_page_stops_before_a_document_that_would_pass_its_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("t", None).expect("tree");
    e.create_index("t", "by_v", &["/v"], false).expect("create");
    assert!(e.wait_indexes_live(LIVE_WAIT));
    // Small documents whose rows, envelopes included, fill the bound exactly (the last one
    // sized to make up the rest); without the envelopes they are ~16 KiB short of it.
    let small_key = |i: usize| format!("s{i:05}").into_bytes();
    let small_bytes = 1000;
    let row_bytes = (small_key(0).len() + small_bytes) as u64 + ROW_ENVELOPE_BYTES;
    let n = (PAGE_BYTES_MAX / row_bytes) as usize;
    let rest = (PAGE_BYTES_MAX - (n as u64 - 1) * row_bytes) - ROW_ENVELOPE_BYTES;
    let mut expected = Vec::new();
    for i in 0..n {
        let len = if i + 1 == n {
            rest as usize - small_key(i).len()
        } else {
            small_bytes
        };
        e.put("t", &small_key(i), &padded_doc(len))
            .expect("put small");
        expected.push(small_key(i));
    }
    // The largest document: a 16 MiB value under a long key that sorts after the small
    // ones, then one more small document after it.
    let big_key = vec![b'y'; 63 << 10];
    e.put("t", &big_key, &padded_doc(16 << 20))
        .expect("put big");
    expected.push(big_key.clone());
    let last_key = b"z".to_vec();
    e.put("t", &last_key, &padded_doc(100)).expect("put last");
    expected.push(last_key);

    let snap = e.snapshot();
    let mut pages = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = snap
            .index_scan(
                "t",
                "by_v",
                &[],
                b"",
                after.as_deref(),
                usize::MAX,
                PAGE_BYTES_MAX,
            )
            .expect("index page");
        assert!(
            !page.rows.is_empty(),
            "an empty page while documents are left"
        );
        let answer_bytes =
            page_bytes(&page.rows) + page.next.as_ref().map_or(0, |n| n.len() as u64);
        assert!(
            answer_bytes < MESSAGE_BYTES_MAX,
            "page {} of {} rows: {answer_bytes} bytes do not fit a message",
            pages.len(),
            page.rows.len()
        );
        if page.rows.len() > 1 {
            assert!(
                page_bytes(&page.rows) <= PAGE_BYTES_MAX,
                "page {} of {} rows: {} bytes pass the bound",
                pages.len(),
                page.rows.len(),
                page_bytes(&page.rows)
            );
        }
        let next = page.next.clone();
        pages.push(page.rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>());
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [n, 1, 1], "rows per page");
    assert!(
        pages[0] == expected[..n],
        "the first page holds every small document"
    );
    assert!(
        pages[1] == [big_key],
        "the large document is a page of its own"
    );
    assert!(pages.concat() == expected, "nothing skipped or repeated");
}

// ---------------------------------------------------------------------------------------
// Backfill while writes continue
// ---------------------------------------------------------------------------------------

/// Indexes `n` documents while a writer keeps changing them; returns the writer's latencies
/// during the backfill and the backfill's duration.
fn backfill_under_writes(n: u64) -> (Vec<Duration>, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Arc::new(file_engine(dir.path(), EngineOptions::default()));
    e.create_tree(TREE, None).expect("tree");
    load_docs(&e, n);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (e, stop) = (e.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rng();
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let k = rng.random_range(0..n + n / 10);
                let t = Instant::now();
                let key = format!("d{k:08}");
                if i % 5 == 4 {
                    e.delete(TREE, key.as_bytes()).expect("delete");
                } else {
                    let v = format!(r#"{{"v":"n{}","w":{i}}}"#, i % 97);
                    e.put(TREE, key.as_bytes(), v.as_bytes()).expect("put");
                }
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        })
    };
    // Let the writer run before and during the backfill.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    e.create_index(TREE, "by_v", &["/v"], false)
        .expect("create");
    e.create_index(TREE, "by_vw", &["/v", "/w"], false)
        .expect("create");
    assert!(e.wait_indexes_live(Duration::from_secs(600)));
    let took = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let lat = writer.join().expect("writer");
    check_indexes(&e, &["by_v", "by_vw"]).expect("indexes equal recomputation");
    (lat, took)
}

fn p99(mut lat: Vec<Duration>) -> Duration {
    lat.sort();
    lat.get(lat.len() * 99 / 100).copied().unwrap_or_default()
}

#[test]
fn backfill_of_50k_documents_while_writes_continue_equals_recomputation() {
    let (lat, took) = backfill_under_writes(50_000);
    eprintln!(
        "backfill 50,000 docs x 2 indexes: {:.2} s; writer: {} writes, p99 {:?}",
        took.as_secs_f64(),
        lat.len(),
        p99(lat.clone())
    );
    assert!(!lat.is_empty(), "the writer wrote during the backfill");
}

/// The long run (`scripts/slow-tests`): 1,000,000 documents.
#[test]
#[ignore = "long run: 1,000,000 documents (scripts/slow-tests, release build)"]
fn backfill_of_1m_documents_while_writes_continue_equals_recomputation() {
    let (lat, took) = backfill_under_writes(1_000_000);
    println!(
        "backfill 1,000,000 docs x 2 indexes while writing: {:.1} s; writer: {} writes, p99 {:?}",
        took.as_secs_f64(),
        lat.len(),
        p99(lat)
    );
}

// ---------------------------------------------------------------------------------------
// SIGKILL
// ---------------------------------------------------------------------------------------

/// The child process of the SIGKILL test; its workload is [`common::index_child::crash_child`].
#[test]
#[ignore = "child process of the SIGKILL index test"]
fn index_crash_child() {
    crash_child();
}

#[test]
fn sigkill_mid_workload_and_mid_backfill_keeps_indexes_equal_to_recomputation() {
    let cycles = std::env::var("TIDELINE_INDEX_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let mid_backfill = crash_cycles(cycles, EngineOptions::default, "index sigkill")
        .unwrap_or_else(|e| panic!("{e}"));
    // The last ack before the kill says whether an index was backfilling: some kills must
    // have landed there for the run to cover resuming a backfill.
    assert!(
        mid_backfill > 0,
        "no kill landed mid-backfill in {cycles} cycles"
    );
}

/// Canary: recovery without index maintenance must be caught within a few cycles.
#[test]
fn canary_sigkill_without_index_replay_is_caught() {
    let opts = || EngineOptions {
        unsafe_skip_index_replay: true,
        ..EngineOptions::default()
    };
    crash_cycles(10, opts, "index sigkill canary")
        .expect_err("skipping index replay must be caught");
}
