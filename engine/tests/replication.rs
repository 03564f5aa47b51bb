//! Snapshots and upstream apply: a snapshot taken before 100k writes still reads the old
//! state (and its position); transactions applied from an upstream keep their origin GTID,
//! get the next local offset, and re-applying them (again, after a restart, or via a
//! second source) changes nothing. Guards against torn snapshots, duplicated replication
//! and lost idempotence across restarts.

#[allow(dead_code)] // the child-process runner is for the crash tests
mod common;

use std::sync::Arc;

use common::log_of;
use tideline_engine::{Applied, Engine, EngineOptions, WriteError};
use tideline_wal::{MemStorage, NewTransaction, Offset, Wal, WalOptions};

fn open(dir: &std::path::Path, storage: &Arc<MemStorage>, opts: EngineOptions) -> Engine {
    let wal = Wal::open(storage.clone(), WalOptions::default()).expect("open log");
    Engine::open(dir, Arc::new(wal), opts).expect("open engine")
}

#[test]
fn snapshot_before_100k_writes_reads_the_old_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = open(
        dir.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    e.transaction(|tx| {
        for i in 0..1000u32 {
            tx.put("default", format!("k{i:06}").as_bytes(), b"old")?;
        }
        Ok(())
    })
    .expect("seed");
    let snap = e.snapshot();
    let pos = snap.position();
    assert_eq!(pos.offset, Offset::new(1));
    // 100k writes: overwrite, delete and add, in transactions of 1,000.
    for round in 0..100u32 {
        e.transaction(|tx| {
            for i in 0..1000u32 {
                let k = format!("k{:06}", (round * 7919 + i * 13) % 2000);
                match i % 3 {
                    0 => tx.delete("default", k.as_bytes())?,
                    _ => tx.put("default", k.as_bytes(), format!("new{round}").as_bytes())?,
                }
            }
            Ok(())
        })
        .expect("write round");
    }
    assert_eq!(e.position().offset, Offset::new(101));
    assert_eq!(snap.position(), pos, "a snapshot's position never moves");
    let mut n = 0;
    for kv in snap.range::<&[u8]>("default", .., false).expect("scan") {
        let (k, v) = kv.expect("item");
        assert_eq!(v, b"old", "key {:?}", String::from_utf8_lossy(&k));
        n += 1;
    }
    assert_eq!(n, 1000);
    for i in (0..2000u32).step_by(97) {
        let k = format!("k{i:06}");
        let want = (i < 1000).then(|| b"old".to_vec());
        assert_eq!(snap.get("default", k.as_bytes()).expect("get"), want);
    }
    // The live state did change.
    assert!(
        e.range::<&[u8]>("default", .., false)
            .expect("scan")
            .any(|kv| kv.expect("item").1 != b"old")
    );
}

/// Reads every transaction of `e`'s log.
#[test]
fn upstream_apply_is_idempotent_and_keeps_origin_gtids() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = open(
        dir_a.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    a.create_tree("sums", Some("add")).expect("create");
    for i in 0..20u32 {
        a.transaction(|tx| {
            tx.put("default", format!("k{i}").as_bytes(), b"v")?;
            tx.merge("sums", b"total", b"1")?;
            if i % 5 == 4 {
                tx.delete("default", format!("k{}", i - 2).as_bytes())?;
            }
            Ok(())
        })
        .expect("write");
    }
    let upstream = log_of(&a);
    assert_eq!(upstream.len(), 21);

    let storage_b = Arc::new(MemStorage::new());
    let b = open(
        dir_b.path(),
        &storage_b,
        EngineOptions {
            read_only: true,
            ..EngineOptions::default()
        },
    );
    // The replica refuses local writes but applies upstream transactions.
    assert!(matches!(
        b.put("default", b"x", b"y"),
        Err(WriteError::ReadOnly)
    ));
    let first = b
        .apply_upstream_batch(upstream[..10].to_vec())
        .expect("apply first half");
    assert!(first.iter().all(|r| matches!(r, Applied::Committed(_))));
    let all = b
        .apply_upstream_batch(upstream.clone())
        .expect("apply all, half again");
    for (i, r) in all.iter().enumerate() {
        match (i < 10, r) {
            (true, Applied::AlreadyExecuted) => {}
            (false, Applied::Committed(c)) => {
                assert_eq!(c.gtid, upstream[i].gtid, "origin GTID kept");
                assert_eq!(c.offset.get(), i as u64 + 1, "next local offset");
            }
            other => panic!("transaction {i}: {other:?}"),
        }
    }
    let state = |e: &Engine| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v: Vec<_> = e
            .range::<&[u8]>("default", .., false)
            .expect("scan")
            .map(|kv| kv.expect("item"))
            .collect();
        v.extend(
            e.range::<&[u8]>("sums", .., false)
                .expect("scan")
                .map(|kv| kv.expect("item")),
        );
        v
    };
    assert_eq!(state(&a), state(&b));
    assert_eq!(a.gtid_executed(), b.gtid_executed());
    assert_eq!(
        b.get("sums", b"total").expect("get").as_deref(),
        Some(&b"20"[..])
    );

    // Re-applying the whole batch changes nothing: no log record, no state change.
    let offset = b.wal().visible_offset();
    let again = b.apply_upstream_batch(upstream.clone()).expect("re-apply");
    assert!(again.iter().all(|r| *r == Applied::AlreadyExecuted));
    assert_eq!(b.wal().visible_offset(), offset);
    assert_eq!(state(&a), state(&b));

    // Also after a restart: gtid_executed is persisted with the data.
    let wal = b.wal().clone();
    b.close().expect("close");
    drop(b);
    wal.close().expect("close log");
    drop(wal);
    let b = open(
        dir_b.path(),
        &storage_b,
        EngineOptions {
            read_only: true,
            ..EngineOptions::default()
        },
    );
    assert_eq!(b.gtid_executed(), a.gtid_executed());
    for t in &upstream {
        assert_eq!(
            b.apply_upstream(t.clone()).expect("re-apply"),
            Applied::AlreadyExecuted
        );
    }
    assert_eq!(b.wal().visible_offset(), offset);
    assert_eq!(state(&a), state(&b));

    // The replica's own log carries the origin GTIDs: a chain A→B→C sees A's GTIDs.
    let chained = log_of(&b);
    assert_eq!(
        chained.iter().map(|t| t.gtid).collect::<Vec<_>>(),
        upstream.iter().map(|t| t.gtid).collect::<Vec<_>>()
    );
}

#[test]
fn upstream_transaction_for_a_missing_tree_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = open(
        dir.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    let other = uuid::Uuid::new_v4();
    let txn = NewTransaction {
        gtid: tideline_wal::Gtid::new(other, 1).expect("gtid"),
        timestamp_us: 0,
        ops: vec![tideline_wal::Op::Put {
            tree: "elsewhere".into(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            before: None,
        }],
    };
    assert!(matches!(
        e.apply_upstream(txn),
        Err(WriteError::UnknownTree(_))
    ));
    assert_eq!(e.wal().visible_offset(), 0);
    assert!(e.gtid_executed().is_empty());
}

/// An upstream batch whose last transaction names a tree the replica lacks: the call fails,
/// and by the time it returns the transactions before the failing one are applied, as its
/// contract says (a caller that records "received up to here" or reads `gtid_executed` after
/// the error must not see them still in flight). The valid transactions carry 4 MiB values so
/// that writing and applying them takes far longer than reaching the failing one.
#[test]
fn failed_upstream_batch_returns_after_the_transactions_before_the_failure_are_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = open(
        dir.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions {
            read_only: true,
            ..EngineOptions::default()
        },
    );
    let origin = uuid::Uuid::new_v4();
    let gtid = |n| tideline_wal::Gtid::new(origin, n).expect("gtid");
    let big = vec![b'v'; 4 << 20];
    let mut batch = vec![NewTransaction {
        gtid: gtid(1),
        timestamp_us: 0,
        ops: vec![tideline_wal::Op::CreateTree {
            tree: "t".into(),
            merge_operator: None,
        }],
    }];
    for n in 2..=8u64 {
        batch.push(NewTransaction {
            gtid: gtid(n),
            timestamp_us: 0,
            ops: vec![tideline_wal::Op::Put {
                tree: "t".into(),
                key: format!("k{n}").into_bytes(),
                value: big.clone(),
                before: None,
            }],
        });
    }
    batch.push(NewTransaction {
        gtid: gtid(9),
        timestamp_us: 0,
        ops: vec![tideline_wal::Op::Put {
            tree: "missing".into(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            before: None,
        }],
    });
    let err = e
        .apply_upstream_batch(batch)
        .expect_err("the last transaction names a missing tree");
    assert!(matches!(err, WriteError::UnknownTree(_)), "{err}");
    // Checked at once, with no waiting: the call itself must have waited.
    let executed = e.gtid_executed();
    let want: tideline_wal::GtidSet = format!("{origin}:1-8").parse().expect("set");
    assert_eq!(
        executed, want,
        "the transactions before the failing one are applied when the call returns"
    );
    assert_eq!(e.position().offset, Offset::new(8));
    for n in 2..=8u64 {
        assert_eq!(
            e.get("t", format!("k{n}").as_bytes())
                .expect("get")
                .map(|v| v.len()),
            Some(big.len())
        );
    }
}

/// An upstream batch is packed, keyed and encoded as one (its transactions share buffers):
/// each transaction must still count as the writer of exactly its own keys. A local
/// transaction that read a key before the batch conflicts, and the conflict names the offset
/// of the one upstream transaction that wrote that key; one that read only keys the batch did
/// not write commits; and what the batch wrote reads back, key by key. Guards against a
/// transaction's keys or ops taken from a neighbour's range of the shared buffers.
#[test]
fn a_batch_applied_as_one_keeps_each_transactions_own_write_set() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let dir_b = tempfile::tempdir().expect("tempdir");
    let a = open(
        dir_a.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    a.create_tree("other", None).expect("create");
    a.put("default", b"seed", b"0").expect("seed");
    // Offsets 3..=42 on A, each writing its own keys; sizes differ so ranges are irregular.
    for i in 0..40u32 {
        a.transaction(|tx| {
            tx.put(
                "default",
                format!("a{i:02}").as_bytes(),
                &vec![b'v'; i as usize],
            )?;
            if i % 3 == 0 {
                tx.put("other", format!("b{i:02}").as_bytes(), b"w")?;
                tx.delete("default", format!("gone{i}").as_bytes())?;
            }
            Ok(())
        })
        .expect("write");
    }
    let upstream = log_of(&a);
    assert_eq!(upstream.len(), 42);
    let b = open(
        dir_b.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    // The trees and the seed first; B's offsets then equal A's.
    b.apply_upstream_batch(upstream[..2].to_vec())
        .expect("apply the head");
    let read_then_write = |tree: &str, key: &str| {
        let mut tx = b.begin();
        tx.get(tree, key.as_bytes()).expect("read");
        tx.put("default", format!("local-{key}").as_bytes(), b"x")
            .expect("buffer a write");
        tx
    };
    let cases = [
        ("default", "a07", Some(10)),
        ("other", "b09", Some(12)),
        ("default", "a30", Some(33)),
        ("default", "a39", Some(42)),
        ("default", "a40", None),
        ("other", "b10", None),
    ];
    let txns: Vec<_> = cases
        .iter()
        .map(|(t, k, _)| read_then_write(t, k))
        .collect();
    let applied = b
        .apply_upstream_batch(upstream[2..].to_vec())
        .expect("apply the rest as one batch");
    assert!(applied.iter().all(|r| matches!(r, Applied::Committed(_))));
    for ((tree, key, writer), tx) in cases.iter().zip(txns) {
        match (tx.commit(), writer) {
            (Err(WriteError::Conflict(why)), Some(offset)) => assert!(
                why.ends_with(&format!("at offset {offset}")),
                "{tree}/{key}: {why}"
            ),
            (Ok(_), None) => {}
            (other, _) => panic!("{tree}/{key}: expected conflict with {writer:?}, got {other:?}"),
        }
    }
    for i in 0..40u32 {
        assert_eq!(
            b.get("default", format!("a{i:02}").as_bytes())
                .expect("get"),
            Some(vec![b'v'; i as usize])
        );
        let other = b.get("other", format!("b{i:02}").as_bytes()).expect("get");
        assert_eq!(other.is_some(), i % 3 == 0, "b{i:02}");
    }
}

/// An upstream transaction numbered with this node's own server uuid and the last GTID number
/// (a peer cloned with the same uuid, or a bad one) leaves the node no number for a local
/// commit. The node says so, with a typed error that is not retried, instead of panicking
/// under the commit lock or reporting a conflict that can never clear.
#[test]
fn the_last_gtid_number_of_this_nodes_uuid_taken_upstream_refuses_local_commits_plainly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = open(
        dir.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    let own = e.server_uuid();
    let txn = NewTransaction {
        gtid: tideline_wal::Gtid::new(own, u64::MAX).expect("gtid"),
        timestamp_us: 0,
        ops: vec![tideline_wal::Op::CreateTree {
            tree: "default".into(),
            merge_operator: None,
        }],
    };
    e.apply_upstream(txn).expect("apply upstream");
    e.set_read_only(false);
    let local = std::thread::spawn(move || {
        let r = e.put("default", b"k", b"v");
        (r, e)
    })
    .join();
    let (r, e) = local.expect("a local commit panicked");
    match r {
        Err(err @ WriteError::GtidsExhausted { .. }) => {
            assert!(!err.is_retryable());
            assert!(err.to_string().contains(&own.to_string()), "{err}");
        }
        other => panic!("expected GtidsExhausted, got {other:?}"),
    }
    // Nothing was written, and the node still takes upstream transactions.
    assert_eq!(e.get("default", b"k").expect("get"), None);
    assert_eq!(e.wal().visible_offset(), 1);
}

/// The replica's call returns once a batch is durable in the log, before the applier applies
/// it, and only once the applier is at most `async_unapplied_max` transactions behind: the
/// next batch is prepared while this one applies, and the backlog is bounded. The applying
/// call waits for its own batch. A restart applies what was logged.
#[test]
fn a_logged_upstream_batch_returns_before_its_apply_and_after_the_previous_one() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = open(
        dir_a.path(),
        &Arc::new(MemStorage::new()),
        EngineOptions::default(),
    );
    for i in 0..6u32 {
        a.put("default", format!("k{i}").as_bytes(), b"v")
            .expect("write");
    }
    let upstream = log_of(&a);
    let dir_b = tempfile::tempdir().expect("tempdir");
    let storage_b = Arc::new(MemStorage::new());
    let opts = EngineOptions {
        read_only: true,
        // Every apply starts this late (a margin against a loaded machine): the first call
        // returns well before the applier applies anything.
        unsafe_pause_before_apply: Some(std::time::Duration::from_secs(1)),
        async_unapplied_max: 2,
        ..EngineOptions::default()
    };
    let b = open(dir_b.path(), &storage_b, opts.clone());
    let logged = |e: &Engine| e.wal().visible_offset();

    let first = b
        .apply_upstream_logged(upstream[..2].to_vec())
        .expect("first batch");
    assert!(first.iter().all(|r| matches!(r, Applied::Committed(_))));
    assert_eq!(logged(&b), 2, "the batch is in the log on return");
    assert_eq!(
        b.applied_offset(),
        0,
        "the call did not wait for its own batch's apply"
    );
    let second = b
        .apply_upstream_logged(upstream[2..5].to_vec())
        .expect("second batch");
    assert!(second.iter().all(|r| matches!(r, Applied::Committed(_))));
    assert_eq!(logged(&b), 5);
    assert!(
        b.applied_offset() >= 3,
        "the second call returned with more than 2 transactions unapplied (applied offset {})",
        b.applied_offset()
    );
    // A resend of a logged, unapplied GTID is in flight: nothing is logged twice.
    let again = b
        .apply_upstream_logged(upstream[2..5].to_vec())
        .expect("resend");
    assert!(again.iter().all(|r| matches!(r, Applied::AlreadyExecuted)));
    // The applying call returns with its batch applied.
    b.apply_upstream_owned(upstream[5..].to_vec())
        .expect("last batch");
    assert_eq!(b.applied_offset(), 6);
    assert_eq!(b.gtid_executed(), a.gtid_executed());
    drop(b);

    // Logged and not yet applied at a stop: the reopened engine applies it from its log.
    let b = open(dir_b.path(), &storage_b, opts.clone());
    let more = a.put("default", b"k6", b"v").expect("write");
    let last = log_of(&a).pop().expect("record");
    assert_eq!(last.gtid, more.gtid);
    b.apply_upstream_logged(vec![last]).expect("logged");
    drop(b);
    let b = open(dir_b.path(), &storage_b, opts);
    assert!(
        b.wait_all_visible(std::time::Duration::from_secs(10))
            .expect("apply")
    );
    assert_eq!(b.gtid_executed(), a.gtid_executed());
    assert_eq!(
        b.get("default", b"k6").expect("read").as_deref(),
        Some(&b"v"[..])
    );
}
