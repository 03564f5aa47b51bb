//! The engine's API on its everyday paths and its refusals: trees, point reads, ranges and
//! prefixes in both directions, compare-and-swap, counters, JSON documents, merge operators,
//! conflicts between transactions, read-only mode, fail-stop on a poisoned log, and bad
//! input (unknown tree or operator, oversized key or value, a merge that would grow a value
//! past the limit, malformed JSON), where nothing may reach the log or the store. Guards
//! against silent partial writes and wrong results.

use std::sync::Arc;

use tideline_engine::{
    CasOutcome, Engine, EngineOptions, MergeOperator, ReadError, TreeInfo, WriteError,
};
use tideline_wal::{MemStorage, Wal, WalOptions};

struct Node {
    engine: Engine,
    _dir: tempfile::TempDir,
    storage: Arc<MemStorage>,
}

fn node() -> Node {
    node_with(EngineOptions::default())
}

fn node_with(opts: EngineOptions) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(MemStorage::new());
    let wal = Wal::open(storage.clone(), WalOptions::default()).expect("open log");
    let engine = Engine::open(dir.path(), Arc::new(wal), opts).expect("open engine");
    Node {
        engine,
        _dir: dir,
        storage,
    }
}

/// The transaction the log holds at `offset`.
fn logged(e: &Engine, offset: tideline_wal::Offset) -> tideline_wal::Transaction {
    e.wal()
        .read_from(offset)
        .expect("reader")
        .next_txn()
        .expect("read")
        .expect("record")
}

fn scan(it: tideline_engine::Scan) -> Vec<(String, String)> {
    it.map(|kv| {
        let (k, v) = kv.expect("scan item");
        (
            String::from_utf8(k).expect("utf8 key"),
            String::from_utf8(v).expect("utf8 value"),
        )
    })
    .collect()
}

#[test]
fn first_commit_is_offset_one_and_creates_default_inside_it() {
    let n = node();
    let e = &n.engine;
    assert_eq!(
        e.wal().visible_offset(),
        0,
        "opening writes nothing to the log"
    );
    let c = e.put("default", b"k", b"v").expect("put");
    assert_eq!(c.offset.get(), 1);
    assert_eq!(c.gtid.to_string(), format!("{}:1", e.server_uuid()));
    let txn = logged(e, c.offset);
    assert!(
        matches!(&txn.ops[0], tideline_wal::Op::CreateTree { tree, merge_operator: None } if tree == "default")
    );
    assert!(matches!(&txn.ops[1], tideline_wal::Op::Put { .. }));
    assert_eq!(
        e.trees(),
        vec![TreeInfo {
            name: "default".into(),
            merge_operator: None
        }]
    );
}

#[test]
fn ranges_prefixes_and_reverse() {
    let n = node();
    let e = &n.engine;
    for k in ["a", "b", "ba", "bb", "c", "d"] {
        e.put("default", k.as_bytes(), k.to_uppercase().as_bytes())
            .expect("put");
    }
    let keys = |v: Vec<(String, String)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(scan(
            e.range("default", &b"b"[..]..&b"c"[..], false)
                .expect("range")
        )),
        ["b", "ba", "bb"]
    );
    assert_eq!(
        keys(scan(
            e.range("default", &b"b"[..]..=&b"c"[..], true)
                .expect("range")
        )),
        ["c", "bb", "ba", "b"]
    );
    assert_eq!(
        keys(scan(
            e.range("default", &b"bb"[..].., false).expect("range")
        )),
        ["bb", "c", "d"]
    );
    assert_eq!(
        keys(scan(e.range("default", ..&b"b"[..], false).expect("range"))),
        ["a"]
    );
    assert!(
        scan(
            e.range("default", &b"d"[..]..&b"a"[..], false)
                .expect("inverted")
        )
        .is_empty()
    );
    assert_eq!(
        keys(scan(e.prefix("default", b"b", false).expect("prefix"))),
        ["b", "ba", "bb"]
    );
    assert_eq!(
        keys(scan(e.prefix("default", b"b", true).expect("prefix"))),
        ["bb", "ba", "b"]
    );
    // Inside a transaction, own writes show through ranges, deletes hide keys.
    e.transaction(|tx| {
        tx.delete("default", b"ba")?;
        tx.put("default", b"bc", b"new")?;
        let got: Vec<Vec<u8>> = tx
            .prefix("default", b"b", false, 10)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![b"b".to_vec(), b"bb".to_vec(), b"bc".to_vec()]);
        let got: Vec<Vec<u8>> = tx
            .range("default", &b"a"[..].., true, 2)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, vec![b"d".to_vec(), b"c".to_vec()]);
        Ok(())
    })
    .expect("txn");
}

/// `Snapshot::visit_from` (what a bootstrap's chunks are read with) sees the same pairs as a
/// range from the same key, stops when told, and keeps to its snapshot.
#[test]
fn visiting_from_a_key_matches_the_range_and_stops_when_told() {
    let n = node();
    let e = &n.engine;
    for k in ["a", "b", "ba", "bb", "c", "d"] {
        e.put("default", k.as_bytes(), k.to_uppercase().as_bytes())
            .expect("put");
    }
    let snap = e.snapshot();
    // Written after the snapshot: not visited.
    e.put("default", b"bz", b"LATE").expect("put");
    let mut seen = Vec::new();
    snap.visit_from("default", b"b", |k, v| {
        seen.push((
            String::from_utf8(k.to_vec()).expect("utf8"),
            String::from_utf8(v.to_vec()).expect("utf8"),
        ));
        true
    })
    .expect("visit");
    assert_eq!(
        seen,
        scan(snap.range("default", &b"b"[..].., false).expect("range"))
    );
    assert_eq!(
        seen.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["b", "ba", "bb", "c", "d"]
    );
    let mut first_two = Vec::new();
    snap.visit_from("default", b"", |k, _| {
        first_two.push(k.to_vec());
        first_two.len() < 2
    })
    .expect("visit");
    assert_eq!(first_two, vec![b"a".to_vec(), b"b".to_vec()]);
    assert!(matches!(
        snap.visit_from("nope", b"", |_, _| true),
        Err(tideline_engine::ReadError::UnknownTree(t)) if t == "nope"
    ));
}

#[test]
fn cas_counters_json_and_merge_operators() {
    let n = node();
    let e = &n.engine;
    // Compare-and-swap.
    assert!(matches!(
        e.compare_and_swap("default", b"k", None, Some(b"1"))
            .expect("cas"),
        CasOutcome::Swapped(_)
    ));
    assert_eq!(
        e.compare_and_swap("default", b"k", None, Some(b"2"))
            .expect("cas"),
        CasOutcome::Mismatch(Some(b"1".to_vec()))
    );
    assert!(matches!(
        e.compare_and_swap("default", b"k", Some(b"1"), None)
            .expect("cas"),
        CasOutcome::Swapped(_)
    ));
    assert_eq!(e.get("default", b"k").expect("get"), None);
    // Counters.
    assert_eq!(e.increment("default", b"n", 5).expect("incr"), 5);
    assert_eq!(e.increment("default", b"n", -7).expect("incr"), -2);
    e.put("default", b"text", b"abc").expect("put");
    assert!(matches!(
        e.increment("default", b"text", 1),
        Err(WriteError::NotAnInteger { .. })
    ));
    // JSON documents.
    e.put_json("default", b"doc", r#"{"a":1,"b":{"c":2}}"#)
        .expect("put json");
    let doc = e
        .patch_json("default", b"doc", r#"{"b":{"c":null,"d":3},"e":"x"}"#)
        .expect("patch");
    assert_eq!(doc, serde_json::json!({"a":1,"b":{"d":3},"e":"x"}));
    assert_eq!(e.get_json("default", b"doc").expect("get json"), Some(doc));
    assert!(matches!(
        e.get_json("default", b"text"),
        Err(ReadError::NotJson { .. })
    ));
    // Every built-in operator, logged as operands.
    for m in MergeOperator::ALL {
        e.create_tree(m.name(), Some(m.name())).expect("create");
    }
    e.merge("add", b"k", b"40").expect("merge");
    e.merge("add", b"k", b"2").expect("merge");
    e.merge("append", b"k", b"ab").expect("merge");
    e.merge("append", b"k", b"cd").expect("merge");
    e.merge("max", b"k", b"3").expect("merge");
    e.merge("max", b"k", b"-9").expect("merge");
    e.merge("json-merge-patch", b"k", br#"{"a":{"b":1}}"#)
        .expect("merge");
    e.merge("json-merge-patch", b"k", br#"{"a":{"c":2},"z":null}"#)
        .expect("merge");
    assert_eq!(
        e.get("add", b"k").expect("get").as_deref(),
        Some(&b"42"[..])
    );
    assert_eq!(
        e.get("append", b"k").expect("get").as_deref(),
        Some(&b"abcd"[..])
    );
    assert_eq!(e.get("max", b"k").expect("get").as_deref(), Some(&b"3"[..]));
    assert_eq!(
        e.get_json("json-merge-patch", b"k").expect("get"),
        Some(serde_json::json!({"a":{"b":1,"c":2}}))
    );
    // A merge and a read of the same key in one transaction see the merged value.
    let out = e
        .transaction(|tx| {
            tx.merge("add", b"k", b"8")?;
            tx.get("add", b"k")
        })
        .expect("txn");
    assert_eq!(out.value.as_deref(), Some(&b"50"[..]));
    // The log holds the operand, not the result.
    let last = logged(e, out.commit.expect("logged").offset);
    assert!(matches!(&last.ops[0], tideline_wal::Op::Merge { operand, .. } if operand == b"8"));
}

#[test]
fn trees_create_list_drop() {
    let n = node();
    let e = &n.engine;
    assert!(e.create_tree("users", None).expect("create").is_some());
    assert!(
        e.create_tree("users", None).expect("same again").is_none(),
        "no-op, nothing logged"
    );
    assert!(matches!(
        e.create_tree("users", Some("add")),
        Err(WriteError::TreeExists { .. })
    ));
    e.put("users", b"u1", b"ann").expect("put");
    let snap = e.snapshot();
    e.drop_tree("users").expect("drop");
    assert!(matches!(
        e.get("users", b"u1"),
        Err(ReadError::UnknownTree(_))
    ));
    assert_eq!(
        snap.get("users", b"u1")
            .expect("old snapshot still reads")
            .as_deref(),
        Some(&b"ann"[..])
    );
    e.create_tree("users", Some("append")).expect("re-create");
    assert_eq!(
        e.get("users", b"u1").expect("get"),
        None,
        "a re-created tree starts empty"
    );
    assert_eq!(
        e.trees(),
        vec![TreeInfo {
            name: "users".into(),
            merge_operator: Some(MergeOperator::Append)
        }]
    );
}

#[test]
fn conflicting_transactions_report_a_retryable_error() {
    let n = node();
    let e = &n.engine;
    e.put("default", b"x", b"0").expect("put");
    let mut t1 = e.begin();
    let mut t2 = e.begin();
    assert_eq!(
        t1.get("default", b"x").expect("read").as_deref(),
        Some(&b"0"[..])
    );
    assert_eq!(
        t2.get("default", b"x").expect("read").as_deref(),
        Some(&b"0"[..])
    );
    t1.put("default", b"x", b"1").expect("write");
    t2.put("default", b"x", b"2").expect("write");
    t1.commit().expect("first commit wins");
    let err = t2.commit().expect_err("second must conflict");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        e.get("default", b"x").expect("get").as_deref(),
        Some(&b"1"[..])
    );
    // A range read conflicts with an insert into the range (no phantoms).
    let mut t3 = e.begin();
    assert_eq!(
        t3.prefix("default", b"y", false, 10).expect("scan").len(),
        0
    );
    e.put("default", b"y1", b"p").expect("phantom");
    t3.put("default", b"count", b"0").expect("write");
    assert!(t3.commit().expect_err("phantom").is_retryable());
    // Concurrent increments all land, through retries.
    let e = Arc::new(n);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let n = e.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    n.engine.increment("default", b"ctr", 1).expect("increment");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(
        e.engine.get("default", b"ctr").expect("get").as_deref(),
        Some(&b"200"[..])
    );
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let n = node_with(EngineOptions::default());
    let e = &n.engine;
    e.create_tree("plain", None).expect("create");
    e.create_tree("sums", Some("add")).expect("create");
    e.create_tree("docs", Some("json-merge-patch"))
        .expect("create");
    e.put("plain", b"keep", b"1").expect("put");
    let before_offset = e.wal().visible_offset();
    let before_gtids = e.gtid_executed();
    let before_data: Vec<_> = e
        .range::<&[u8]>("plain", .., false)
        .expect("scan")
        .map(|r| r.expect("item"))
        .collect();

    let big_key = vec![b'k'; 64 * 1024];
    let big_value = vec![0u8; 16 * 1024 * 1024 + 1];
    let cases: Vec<(&str, Result<(), WriteError>)> = vec![
        ("unknown tree", e.put("nope", b"k", b"v").map(drop)),
        (
            "unknown merge operator",
            e.create_tree("t2", Some("sum")).map(drop),
        ),
        ("bad tree name", e.create_tree("has space", None).map(drop)),
        (
            "merge without operator",
            e.merge("plain", b"k", b"1").map(drop),
        ),
        ("bad add operand", e.merge("sums", b"k", b"one").map(drop)),
        (
            "bad json operand",
            e.merge("docs", b"k", b"{oops").map(drop),
        ),
        (
            "malformed json",
            e.put_json("plain", b"k", "{\"a\":").map(drop),
        ),
        (
            "malformed json patch",
            e.patch_json("plain", b"keep", "[1,").map(drop),
        ),
        ("oversized key", e.put("plain", &big_key, b"v").map(drop)),
        (
            "oversized value",
            e.put("plain", b"k", &big_value).map(drop),
        ),
        (
            "oversized operand",
            e.merge("sums", b"k", &big_value).map(drop),
        ),
        ("empty key", e.put("plain", b"", b"v").map(drop)),
        ("drop unknown tree", e.drop_tree("nope").map(drop)),
        // A transaction with good writes and one bad one writes none of them.
        (
            "bad op in a transaction",
            e.transaction(|tx| {
                tx.put("plain", b"good", b"1")?;
                tx.merge("plain", b"bad", b"1")?;
                Ok(())
            })
            .map(drop),
        ),
    ];
    for (what, r) in cases {
        let err = r.expect_err(what);
        assert!(!err.is_retryable(), "{what}: {err}");
        let msg = err.to_string();
        assert!(msg.len() > 20, "{what}: message too thin: {msg}");
        match what {
            "unknown tree" | "drop unknown tree" => {
                assert!(matches!(err, WriteError::UnknownTree(_)), "{what}: {err:?}")
            }
            "unknown merge operator" => assert!(
                matches!(err, WriteError::UnknownMergeOperator { .. }),
                "{err:?}"
            ),
            "oversized key" => assert!(
                matches!(
                    err,
                    WriteError::KeyTooLarge {
                        bytes: 65536,
                        max: 65535
                    }
                ),
                "{err:?}"
            ),
            "oversized value" | "oversized operand" => {
                assert!(matches!(err, WriteError::ValueTooLarge { .. }), "{err:?}")
            }
            "malformed json" | "malformed json patch" => {
                assert!(matches!(err, WriteError::MalformedJson { .. }), "{err:?}")
            }
            _ => {}
        }
    }
    // The largest accepted key and value go through.
    e.put(
        "plain",
        &big_key[..64 * 1024 - 1],
        &big_value[..16 * 1024 * 1024],
    )
    .expect("at the limits");
    e.delete("plain", &big_key[..64 * 1024 - 1])
        .expect("delete");
    assert_eq!(
        e.wal().visible_offset(),
        before_offset + 2,
        "refusals logged nothing"
    );
    let mut g = before_gtids.clone();
    g.union_with(&e.gtid_executed());
    assert_eq!(g.count(), before_gtids.count() + 2);
    let after_data: Vec<_> = e
        .range::<&[u8]>("plain", .., false)
        .expect("scan")
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(before_data, after_data);
    assert!(matches!(
        e.get("nope", b"k"),
        Err(ReadError::UnknownTree(_))
    ));
}

#[test]
fn read_only_refuses_local_writes() {
    let n = node_with(EngineOptions {
        read_only: true,
        ..EngineOptions::default()
    });
    let e = &n.engine;
    assert!(e.is_read_only());
    let err = e.put("default", b"k", b"v").expect_err("read-only");
    assert!(matches!(err, WriteError::ReadOnly));
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(e.wal().visible_offset(), 0);
    e.set_read_only(false);
    e.put("default", b"k", b"v").expect("promoted");
}

/// Once `set_read_only(true)` returns, no local commit gets in: not even one that passed its
/// first read-only check just before (a demoted primary, or a replica pausing local writes
/// before a copy, must be able to count on it). The commit is held between that check and
/// the commit lock (test-only pause) while the node is made read-only.
#[test]
fn a_commit_that_passed_its_first_check_is_refused_once_the_node_is_read_only() {
    let n = node_with(EngineOptions {
        unsafe_pause_before_commit_lock: Some(std::time::Duration::from_millis(600)),
        ..EngineOptions::default()
    });
    let e = Arc::new(n.engine);
    let writer = {
        let e = e.clone();
        std::thread::spawn(move || e.put("default", b"late", b"v"))
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    e.set_read_only(true);
    let before = e.wal().visible_offset();
    let r = writer.join().expect("the writer");
    assert!(
        matches!(r, Err(WriteError::ReadOnly)),
        "a commit got in after the node was made read-only: {r:?}"
    );
    assert_eq!(e.wal().visible_offset(), before);
    assert_eq!(e.get("default", b"late").expect("get"), None);
}

#[test]
fn poisoned_log_makes_the_engine_fail_stop() {
    let n = node();
    let e = &n.engine;
    e.put("default", b"a", b"1").expect("put");
    n.storage.fail_syncs_from(n.storage.sync_count() + 1);
    let err = e.put("default", b"b", b"2").expect_err("fsync fails");
    assert!(matches!(err, WriteError::FailStop { .. }), "{err:?}");
    let err = e
        .put("default", b"c", b"3")
        .expect_err("refused afterwards");
    assert!(matches!(err, WriteError::FailStop { .. }), "{err:?}");
    assert!(e.fail_stop_reason().is_some());
    // Reads still work and show only what was acknowledged.
    assert_eq!(
        e.get("default", b"a").expect("get").as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(e.get("default", b"b").expect("get"), None);
}

#[test]
fn snapshot_approximate_len_estimates_the_keys_of_all_trees() {
    let n = node();
    let e = &n.engine;
    assert_eq!(
        e.snapshot().approximate_len(),
        0,
        "a fresh node holds nothing"
    );
    assert_eq!(
        e.snapshot()
            .approximate_tree_len("default")
            .expect("default"),
        0
    );
    assert!(matches!(
        e.snapshot().approximate_tree_len("nope"),
        Err(ReadError::UnknownTree(_))
    ));
    e.create_tree("b", Some("add")).expect("create b");
    for i in 0..300u32 {
        e.put("default", format!("k{i:04}").as_bytes(), b"v")
            .expect("put");
    }
    for i in 0..200u32 {
        e.merge("b", format!("c{i:04}").as_bytes(), b"1")
            .expect("merge");
    }
    let snap = e.snapshot();
    // Insert-only: exact.
    assert_eq!(snap.approximate_tree_len("default").expect("default"), 300);
    assert_eq!(snap.approximate_tree_len("b").expect("b"), 200);
    assert_eq!(snap.approximate_len(), 500);
    // Deletes and overwrites leave entries behind: the estimate does not drop below the
    // real count (250 keys), and stays within the entries written.
    for i in 0..100u32 {
        e.delete("default", format!("k{i:04}").as_bytes())
            .expect("delete");
        e.put("default", format!("k{:04}", 100 + i).as_bytes(), b"w")
            .expect("overwrite");
    }
    e.checkpoint().expect("checkpoint");
    let later = e.snapshot().approximate_len();
    assert!((400..=700).contains(&later), "estimate {later}");
}

/// The op list a commit logs differs from the transaction's where the engine edits it: a
/// creation of an existing tree with the same operator is left out, and the implicit creation
/// of `default` goes just before the first write that needs it.
#[test]
fn logged_ops_leave_out_redundant_creations_and_add_implicit_ones() {
    use tideline_wal::Op;
    let n = node();
    let e = &n.engine;
    e.create_tree("users", None).expect("create");
    let mut tx = e.begin();
    tx.put("users", b"u1", b"ann").expect("put");
    tx.create_tree("users", None).expect("same tree again");
    tx.put("default", b"a", b"1").expect("put");
    tx.put("users", b"u2", b"bob").expect("put");
    let c = tx.commit().expect("commit").expect("logged");
    let txn = logged(e, c.offset);
    let shape: Vec<String> = txn
        .ops
        .iter()
        .map(|op| match op {
            Op::CreateTree { tree, .. } => format!("create {tree}"),
            Op::Put { tree, key, .. } => format!("put {tree} {}", String::from_utf8_lossy(key)),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "put users u1",
            "create default",
            "put default a",
            "put users u2"
        ]
    );
    for (tree, key, value) in [
        ("users", "u1", "ann"),
        ("default", "a", "1"),
        ("users", "u2", "bob"),
    ] {
        assert_eq!(
            e.get(tree, key.as_bytes()).expect("get").as_deref(),
            Some(value.as_bytes())
        );
    }
}

/// ENGINE.md, recovery: a store that has applied more than its log holds (the log lost
/// acknowledged records, say restored from an older copy) is refused with the typed
/// `StoreAheadOfLog`, naming both offsets and what to do; nothing is replayed or written.
#[test]
fn a_store_ahead_of_its_log_is_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Arc::new(MemStorage::new());
    let wal = Arc::new(Wal::open(storage.clone(), WalOptions::default()).expect("open log"));
    let engine = Engine::open(dir.path(), wal.clone(), EngineOptions::default()).expect("open");
    engine.put("default", b"a", b"1").expect("put a");
    engine.put("default", b"b", b"2").expect("put b");
    // The log as it was after two commits (everything synced: `sync` durability).
    let older = storage.crash(tideline_wal::CrashMode::DropUnsynced);
    engine.put("default", b"c", b"3").expect("put c");
    engine.close().expect("close");
    drop(engine);
    wal.close().expect("close log");

    let old_wal = Wal::open(Arc::new(older), WalOptions::default()).expect("open the older log");
    match Engine::open(dir.path(), Arc::new(old_wal), EngineOptions::default()) {
        Err(tideline_engine::OpenError::StoreAheadOfLog {
            store_offset,
            log_offset,
        }) => {
            assert_eq!((store_offset, log_offset), (3, 2));
        }
        other => panic!("expected StoreAheadOfLog, got {other:?}"),
    }
}

/// The before-image a transaction logs for a key it read is the key's value just before the
/// write: a tree dropped and created again inside the transaction starts empty, so a key read
/// before the drop has no before-image in the new tree.
#[test]
fn a_before_image_read_before_a_drop_is_not_logged_for_the_tree_created_again() {
    use tideline_wal::Op;
    let n = node();
    let e = &n.engine;
    e.create_tree("t", None).expect("create");
    e.put("t", b"k", b"5").expect("put");
    let logged_before = |c: tideline_engine::CommitInfo| {
        let txn = logged(e, c.offset);
        txn.ops
            .iter()
            .filter_map(|op| match op {
                Op::Put { key, before, .. } if key == b"k" => Some(before.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Read, then write: the value read is the before-image.
    let mut tx = e.begin();
    assert_eq!(tx.get("t", b"k").expect("get").as_deref(), Some(&b"5"[..]));
    tx.put("t", b"k", b"6").expect("put");
    let c = tx.commit().expect("commit").expect("logged");
    assert_eq!(logged_before(c), [Some(b"5".to_vec())]);
    // Read, drop, create again, write: the key did not exist in the new tree.
    let mut tx = e.begin();
    assert_eq!(tx.get("t", b"k").expect("get").as_deref(), Some(&b"6"[..]));
    tx.drop_tree("t").expect("drop");
    tx.create_tree("t", None).expect("create again");
    tx.put("t", b"k", b"7").expect("put");
    let c = tx.commit().expect("commit").expect("logged");
    assert_eq!(
        logged_before(c),
        [None],
        "the put into the tree created again logged the dropped tree's value as its before-image"
    );
    assert_eq!(e.get("t", b"k").expect("get").as_deref(), Some(&b"7"[..]));
}

/// 16 MiB, the default value limit (`EngineOptions::value_bytes_max`).
const VALUE_MAX: usize = 16 << 20;

/// Asserts that `r` is the refusal of a merge that would leave `bytes` under its key.
fn assert_merge_too_large(r: Result<tideline_engine::CommitInfo, WriteError>, bytes: usize) {
    let err = r.expect_err("a merge leaving a value over the limit");
    match &err {
        WriteError::ValueTooLarge { bytes: b, max } => {
            assert_eq!((*b, *max), (bytes, VALUE_MAX), "{err}")
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    assert!(!err.is_retryable(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&bytes.to_string()) && msg.contains("merge") && msg.contains("split"),
        "the message must say what the merge would make of the value and what to do: {msg}"
    );
}

/// A merge whose result grows with the stored value (`append`, `json-merge-patch`) may not
/// leave a value over the value limit: such a value could never be sent to a replica being
/// bootstrapped (one chunk message), nor read back. Merges are resolved when applied, which
/// must never fail, so the primary refuses the commit instead, and the stored value is the
/// one before it.
#[test]
fn a_merge_that_would_grow_a_value_past_the_limit_is_refused() {
    let n = node();
    let e = &n.engine;
    e.create_tree("log", Some("append")).expect("tree");
    let nine = vec![b'x'; 9 << 20];
    e.merge("log", b"k", &nine).expect("first merge");
    let before = e.wal().visible_offset();
    assert_merge_too_large(e.merge("log", b"k", &nine), 18 << 20);
    // Also when the transaction itself wrote the value it merges into.
    assert_merge_too_large(
        e.transaction(|tx| {
            tx.put("log", b"fresh", &nine)?;
            tx.merge("log", b"fresh", &nine)
        })
        .map(|o| o.commit.expect("logged")),
        18 << 20,
    );
    assert_eq!(e.wal().visible_offset(), before, "a refusal logged nothing");
    assert_eq!(
        e.get("log", b"k").expect("get").map(|v| v.len()),
        Some(9 << 20),
        "the stored value is the one before the refused merge"
    );
    // Up to the limit, a merge goes through; a delete starts the key over.
    e.merge("log", b"k", &vec![b'y'; VALUE_MAX - (9 << 20)])
        .expect("a merge up to the limit");
    assert_merge_too_large(e.merge("log", b"k", b"z"), VALUE_MAX + 1);
    e.delete("log", b"k").expect("delete");
    e.merge("log", b"k", &nine)
        .expect("a merge into a deleted key");

    // A JSON merge patch that adds fields grows its document the same way.
    e.create_tree("docs", Some("json-merge-patch"))
        .expect("tree");
    let field = |name: &str| format!(r#"{{"{name}":"{}"}}"#, "x".repeat(9 << 20));
    e.merge("docs", b"d", field("a").as_bytes())
        .expect("first patch");
    let doc = e.get("docs", b"d").expect("get").expect("stored");
    let err = e.merge("docs", b"d", field("b").as_bytes());
    assert_merge_too_large(err, 2 * (9 << 20) + r#"{"a":"","b":""}"#.len());
    assert_eq!(e.get("docs", b"d").expect("get"), Some(doc));
}

/// The size check of a merge counts the merges to the same key that are committed and not
/// yet applied (the applier is held back by a test-only pause): one that could take the value
/// over the limit with them is a retryable conflict, exact once they are applied. Small
/// merges beside a pending one commit without a conflict (a merge stays blind).
#[test]
fn a_merge_beside_a_pending_merge_of_its_key_is_checked_against_both() {
    let n = node_with(EngineOptions {
        unsafe_pause_before_apply: Some(std::time::Duration::from_secs(2)),
        ..EngineOptions::default()
    });
    let e = Arc::new(n.engine);
    e.transaction(|tx| {
        tx.create_tree("log", Some("append"))?;
        tx.merge("log", b"small", b"a")
    })
    .expect("tree");
    let nine = vec![b'x'; 9 << 20];
    let first = {
        let e = e.clone();
        let nine = nine.clone();
        std::thread::spawn(move || {
            e.transaction(|tx| {
                tx.merge("log", b"k", &nine)?;
                tx.merge("log", b"small", b"b")
            })
            .map(|o| o.commit)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e.wal().visible_offset() <= e.applied_offset() {
        assert!(
            std::time::Instant::now() < deadline,
            "the first merge never reached the log"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Refused at once, before anything waits for the applier.
    let err = e
        .merge("log", b"k", &nine)
        .expect_err("the second merge could take the value over the limit");
    assert!(
        e.applied_offset() < e.wal().visible_offset(),
        "the first merge must still be unapplied when the second one is checked"
    );
    assert!(err.is_retryable(), "{err:?}");
    e.merge("log", b"small", b"c")
        .expect("a small merge beside a pending one commits");
    first
        .join()
        .expect("first merge")
        .expect("first merge commits");
    assert_merge_too_large(e.merge("log", b"k", &nine), 18 << 20);
    assert_eq!(
        e.get("log", b"k").expect("get").map(|v| v.len()),
        Some(9 << 20)
    );
}
