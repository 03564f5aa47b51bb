//! Serializability at the edges of the optimistic conflict check: transactions that create a
//! tree another transaction creates concurrently, and reads made through the transaction's raw
//! snapshot (`Txn::snapshot`). Guards against lost updates and write skew that commit silently:
//! a transaction whose assumption ("this tree is new and empty", "these keys hold these
//! values") was broken by a concurrent commit must fail with a retryable conflict.
//!
//! Also: a `create_tree` that answers "already exists" because a concurrent, not yet applied
//! transaction creates the tree returns only once that tree is usable. Guards against an
//! `UnknownTree` ("create it first") on the next write to a tree the caller was just told
//! exists.
//!
//! Also: a scan (`Engine::range`, `Engine::prefix`) reads one committed state while writers
//! go on. Guards against a scan that walks the live tree and shows, for keys ahead of its
//! cursor, transactions committed after it began: a value moved from one key to another is
//! then seen twice or not at all.

use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU32};

use tideline_engine::{Engine, EngineOptions, WriteError};
use tideline_wal::{MemStorage, Wal, WalOptions};

struct Node {
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    let engine =
        Engine::open(dir.path(), Arc::new(wal), EngineOptions::default()).expect("open engine");
    Node { engine, _dir: dir }
}

fn assert_conflict(r: Result<Option<tideline_engine::CommitInfo>, WriteError>, what: &str) {
    match r {
        Err(e) if e.is_retryable() => {}
        Err(e) => panic!("{what}: expected a retryable conflict, got {e}"),
        Ok(c) => panic!("{what}: expected a retryable conflict, but it committed at {c:?}"),
    }
}

/// T1 creates `t` (absent) and reads `k` (none); T2 creates `t` and commits `k=x`; T1 writes
/// `k=init`. Committing T1 would overwrite `x` with a value computed from a read that T2 made
/// stale: it must conflict, and `x` must survive.
#[test]
fn concurrent_create_tree_does_not_hide_a_lost_update() {
    let n = node();
    let e = &n.engine;
    let mut t1 = e.begin();
    t1.create_tree("t", None).expect("t1 creates t");
    assert_eq!(t1.get("t", b"k").expect("t1 reads k"), None);

    let mut t2 = e.begin();
    t2.create_tree("t", None).expect("t2 creates t");
    t2.put("t", b"k", b"x").expect("t2 writes k");
    t2.commit().expect("t2 commits").expect("t2 logged");

    t1.put("t", b"k", b"init").expect("t1 writes k");
    assert_conflict(t1.commit(), "t1 read k in a tree it believed new");
    assert_eq!(e.get("t", b"k").expect("get").as_deref(), Some(&b"x"[..]));
}

/// The same race when T1 only reads the tree it created and writes elsewhere: its write is
/// derived from "t/k is absent", which T2 made false.
#[test]
fn concurrent_create_tree_conflicts_with_a_read_of_the_created_tree() {
    let n = node();
    let e = &n.engine;
    e.create_tree("audit", None).expect("create audit");
    let mut t1 = e.begin();
    t1.create_tree("t", None).expect("t1 creates t");
    assert_eq!(t1.get("t", b"k").expect("t1 reads k"), None);

    e.transaction(|tx| {
        tx.create_tree("t", None)?;
        tx.put("t", b"k", b"x")
    })
    .expect("t2 commits");

    t1.put("audit", b"t/k", b"absent")
        .expect("t1 records what it saw");
    assert_conflict(t1.commit(), "t1 read t/k in a tree it believed new");
    assert_eq!(e.get("audit", b"t/k").expect("get"), None);
}

/// Creating a tree is idempotent: two transactions that only create the same tree both
/// succeed, and a retried transaction that lost the race above succeeds on its retry.
#[test]
fn concurrent_create_tree_alone_still_succeeds_and_retries_converge() {
    let n = node();
    let e = &n.engine;
    let mut t1 = e.begin();
    t1.create_tree("t", None).expect("t1 creates t");
    e.create_tree("t", None).expect("t2 creates t");
    assert_eq!(
        t1.commit().expect("t1 commits"),
        None,
        "nothing left to log"
    );

    // Engine::transaction runs the loser again; the retry sees the winner's write.
    let mut first = true;
    let out = e
        .transaction(|tx| {
            tx.create_tree("u", None)?;
            let seen = tx.get("u", b"k")?;
            if std::mem::take(&mut first) {
                e.transaction(|t2| {
                    t2.create_tree("u", None)?;
                    t2.put("u", b"k", b"x")
                })?;
            }
            if seen.is_none() {
                tx.put("u", b"k", b"init")?;
            }
            Ok(seen)
        })
        .expect("transaction");
    assert_eq!(out.value.as_deref(), Some(&b"x"[..]));
    assert_eq!(e.get("u", b"k").expect("get").as_deref(), Some(&b"x"[..]));
}

/// Two threads "ensure the tree exists, then write": A's `create_tree` is logged but not yet
/// applied (the applier is held back) when B's finds the tree already created and returns
/// `None` ("already exists"). B's next write and read must work: `None` promises the tree
/// exists, so B must not get `UnknownTree` ("create it first") for a tree it was just told is
/// there.
#[test]
fn create_tree_answering_already_exists_leaves_the_tree_usable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("log"));
    let opts = EngineOptions {
        unsafe_pause_before_apply: Some(std::time::Duration::from_millis(300)),
        ..EngineOptions::default()
    };
    let e = Engine::open(dir.path(), wal.clone(), opts).expect("open engine");
    std::thread::scope(|s| {
        let a = s.spawn(|| e.create_tree("t", None));
        // A's creation is in the log, and the applier has not applied it yet.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while wal.visible_offset() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "A's create_tree never reached the log"
            );
            std::thread::yield_now();
        }
        assert_eq!(e.applied_offset(), 0, "the applier is held back");
        assert_eq!(
            e.create_tree("t", None).expect("B creates t"),
            None,
            "B: already created by A"
        );
        e.put("t", b"k", b"v")
            .expect("B writes to the tree it was told exists");
        assert_eq!(
            e.get("t", b"k").expect("B reads the tree").as_deref(),
            Some(&b"v"[..])
        );
        assert!(a.join().expect("A").expect("A creates t").is_some());
    });
}

/// Write skew through the raw snapshot: two on-call doctors, each transaction checks through
/// `tx.snapshot()` that the other is on call and takes itself off. Both commits would leave
/// nobody on call; the second must conflict.
#[test]
fn reads_through_the_transaction_snapshot_are_conflict_checked() {
    let n = node();
    let e = &n.engine;
    e.put("default", b"alice", b"on").expect("put");
    e.put("default", b"bob", b"on").expect("put");

    let mut t1 = e.begin();
    let mut t2 = e.begin();
    let s1 = t1.snapshot();
    assert_eq!(
        s1.get("default", b"bob").expect("read").as_deref(),
        Some(&b"on"[..])
    );
    let s2 = t2.snapshot();
    assert_eq!(
        s2.get("default", b"alice").expect("read").as_deref(),
        Some(&b"on"[..])
    );
    t1.put("default", b"alice", b"off").expect("write");
    t2.put("default", b"bob", b"off").expect("write");
    t1.commit().expect("first commit").expect("logged");
    assert_conflict(t2.commit(), "t2 read alice through its snapshot");
    assert_eq!(
        e.get("default", b"bob").expect("get").as_deref(),
        Some(&b"on"[..])
    );
}

/// A token moves between `k/a` and `k/z` (one transaction deletes one and puts the other)
/// while scans walk the ~50,000 keys between them, forwards, backwards and by prefix. Every
/// scan reads one committed state, so it sees the token exactly once.
#[test]
fn a_scan_sees_a_moved_value_exactly_once_while_writers_go_on() {
    const FILLER: u32 = 50_000;
    const MOVES_MIN: u32 = 2_000;
    const OVERLAPPING_SCANS_MIN: u32 = 8;
    let n = node();
    let e = &n.engine;
    e.create_tree("t", None).expect("create t");
    for start in (0..FILLER).step_by(5_000) {
        e.transaction(|tx| {
            for i in start..start + 5_000 {
                tx.put("t", format!("k/m{i:06}").as_bytes(), b"filler")?;
            }
            Ok(())
        })
        .expect("filler");
    }
    e.put("t", b"k/a", b"token").expect("token");

    let writing = AtomicBool::new(true);
    let reading = AtomicBool::new(true);
    let overlapping = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut moves = 0u32;
            // Until enough scans ran beside the moves (or the reader stopped: it failed).
            while moves < MOVES_MIN
                || (overlapping.load(SeqCst) < OVERLAPPING_SCANS_MIN && reading.load(SeqCst))
            {
                let (from, to): (&[u8], &[u8]) = if moves.is_multiple_of(2) {
                    (b"k/a", b"k/z")
                } else {
                    (b"k/z", b"k/a")
                };
                e.transaction(|tx| {
                    tx.delete("t", from)?;
                    tx.put("t", to, b"token")
                })
                .expect("move the token");
                moves += 1;
            }
            writing.store(false, SeqCst);
        });
        // A failed assertion below ends the writer too, instead of leaving it waiting.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        let _stop = Stop(&reading);
        let mut scans = 0u32;
        while writing.load(SeqCst) {
            let (kind, scan) = match scans % 3 {
                0 => ("forward range", e.range::<&[u8]>("t", .., false)),
                1 => ("reverse range", e.range::<&[u8]>("t", .., true)),
                _ => ("prefix", e.prefix("t", b"k/", false)),
            };
            let mut tokens = Vec::new();
            let mut keys = 0u32;
            for item in scan.expect("scan") {
                let (k, _) = item.expect("scan item");
                keys += 1;
                if k == b"k/a" || k == b"k/z" {
                    tokens.push(String::from_utf8_lossy(&k).into_owned());
                }
            }
            assert_eq!(
                (tokens.len(), keys),
                (1, FILLER + 1),
                "{kind} scan {scans} saw the moved token as {tokens:?}: not one committed state"
            );
            scans += 1;
            if writing.load(SeqCst) {
                overlapping.fetch_add(1, SeqCst);
            }
        }
    });
}
