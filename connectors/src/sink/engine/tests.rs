//! The engine sink on a real engine over files: a batch delivered twice is applied once (by
//! GTID), and the checkpoint it reports survives closing and reopening the engine, during a copy
//! and after it. Guards against a replica that applies a re-delivered transaction again, or that
//! forgets where it stood after a restart. And a tree's first chunk of a copy replaces the
//! tree's definitions that a copy cut short left (another operator, an index the source
//! dropped since): guards against a replica whose merges diverge from its source's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tideline_consumers::{BootstrapProgress, Position};
use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{FileStorage, Gtid, GtidSet, Offset, Op, Transaction, Wal, WalOptions};

use super::EngineSink;
use crate::pipeline::PipelineCheckpoint;
use crate::sink::{Batch, EarlierCopy, Item, Sink, SinkError};

const SOURCE: uuid::Uuid = uuid::Uuid::from_bytes([0xaa; 16]);

fn open(dir: &Path) -> Arc<Engine> {
    open_with(dir, EngineOptions::default())
}

fn open_with(dir: &Path, opts: EngineOptions) -> Arc<Engine> {
    let storage = Arc::new(FileStorage::new(dir.join("log")).expect("log directory"));
    let wal = Wal::open(storage, WalOptions::default()).expect("open log");
    Arc::new(Engine::open(dir.join("store"), Arc::new(wal), opts).expect("open engine"))
}

fn txn(n: u64, ops: Vec<Op>) -> Transaction {
    Transaction {
        offset: Offset::new(n).expect("offsets start at 1"),
        gtid: Gtid::new(SOURCE, n).expect("gtid"),
        timestamp_us: 1_700_000_000_000_000 + n as i64,
        ops,
    }
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        tree: "t".into(),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        before: None,
    }
}

fn set(text: &str) -> GtidSet {
    text.parse().expect("gtid set")
}

fn tail_checkpoint(offset: u64, gtids: &str) -> Vec<u8> {
    PipelineCheckpoint::Tail(Position {
        server_uuid: SOURCE,
        offset,
        gtids: set(gtids),
        epoch: None,
    })
    .encode()
}

fn live_batch() -> Batch {
    let create = Op::CreateTree {
        tree: "t".into(),
        merge_operator: None,
    };
    Batch {
        source: SOURCE,
        items: vec![
            Item::Txn(txn(1, vec![create, put("a", "1")])),
            Item::Txn(txn(2, vec![put("b", "2")])),
            Item::Txn(txn(3, vec![put("a", "3")])),
        ],
        checkpoint: tail_checkpoint(3, &format!("{SOURCE}:1-3")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_batch_twice_is_applied_once_and_its_position_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    assert_eq!(
        sink.open().await.expect("open"),
        None,
        "an empty engine holds no checkpoint"
    );

    let batch = live_batch();
    sink.write(&batch).await.expect("first write");
    assert_eq!(sink.last_committed(), 3);
    sink.write(&batch).await.expect("second write");
    assert_eq!(sink.last_committed(), 0, "every GTID was already executed");
    assert_eq!(engine.gtid_executed(), set(&format!("{SOURCE}:1-3")));
    assert_eq!(
        engine.position().offset.map(Offset::get),
        Some(3),
        "three local offsets, not six"
    );
    assert_eq!(
        engine.get("t", b"a").expect("read").as_deref(),
        Some(&b"3"[..])
    );
    engine.close().expect("close");
    drop((sink, engine));

    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    let stored = sink
        .open()
        .await
        .expect("open")
        .expect("a checkpoint after reopen");
    match PipelineCheckpoint::decode(&stored).expect("decodes") {
        PipelineCheckpoint::Tail(p) => assert_eq!(p.gtids, set(&format!("{SOURCE}:1-3"))),
        other => panic!("expected a tail position, got {other:?}"),
    }
    sink.write(&batch).await.expect("third write, after reopen");
    assert_eq!(sink.last_committed(), 0);
    assert_eq!(engine.position().offset.map(Offset::get), Some(3));
}

fn progress(chunks: u64) -> BootstrapProgress {
    BootstrapProgress {
        server_uuid: SOURCE,
        after_offset: 7,
        epoch: Some(1),
        tree: "t".into(),
        key_hex: "62".into(),
        tree_done: false,
        trees_done: 0,
        chunks,
        keys: 2 * chunks,
        bytes: 4 * chunks,
        keys_estimate: 4,
        bytes_estimate: 8,
        records: 0,
        resumes: 0,
    }
}

/// A copy resumed after its last chunk was stored, where the source has nothing more to send
/// (idle): the first thing the resumed copy writes is the done batch, and it must end the copy,
/// whether the new session's sink is opened (a pipeline) or not (the replica makes its sink
/// with `EngineSink::new` and reads the stored progress itself; without the copy taken at
/// construction it stayed bootstrapping for good, every live batch refused).
async fn a_resumed_copy_ends_on_its_first_batch(open_sink: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    let begin = PipelineCheckpoint::Bootstrap(progress(0)).encode();
    sink.begin_copy(&begin, &EarlierCopy::None)
        .await
        .expect("begin");
    let chunk = Batch {
        source: SOURCE,
        items: vec![Item::Chunk {
            tree: "t".into(),
            merge_operator: None,
            from: vec![],
            to: None,
            entries: tideline_wal::PackedEntries::from_pairs(vec![(b"a".to_vec(), b"x".to_vec())])
                .unwrap(),
        }],
        checkpoint: PipelineCheckpoint::Bootstrap(progress(1)).encode(),
    };
    sink.write(&chunk).await.expect("the last chunk");
    // Killed before the done batch: a new session makes a new sink on the same engine.
    drop(sink);
    let mut sink = EngineSink::new(engine.clone());
    if open_sink {
        sink.open()
            .await
            .expect("open")
            .expect("the copy's progress");
    }
    let done = Batch {
        source: SOURCE,
        items: vec![],
        checkpoint: tail_checkpoint(7, &format!("{SOURCE}:1-7")),
    };
    sink.write(&done).await.expect("finish");
    assert!(
        !engine.is_bootstrapping(),
        "the resumed copy's done batch did not end the copy (sink opened: {open_sink})"
    );
    assert_eq!(engine.gtid_executed(), set(&format!("{SOURCE}:1-7")));
}

#[tokio::test]
async fn a_resumed_copy_whose_first_batch_is_done_ends_the_copy() {
    a_resumed_copy_ends_on_its_first_batch(true).await;
}

#[tokio::test]
async fn a_new_sink_ends_a_stored_copy_whose_first_batch_is_done_without_open() {
    a_resumed_copy_ends_on_its_first_batch(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_resumes_after_reopen_and_ends_at_its_gtid_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    sink.write(&live_batch()).await.expect("state to be wiped");

    let begin = PipelineCheckpoint::Bootstrap(progress(0)).encode();
    sink.begin_copy(&begin, &EarlierCopy::None)
        .await
        .expect("begin");
    assert!(engine.trees().is_empty(), "the copy wipes the old state");
    let chunk = Batch {
        source: SOURCE,
        items: vec![Item::Chunk {
            tree: "t".into(),
            merge_operator: None,
            from: vec![],
            to: Some(b"b".to_vec()),
            entries: tideline_wal::PackedEntries::from_pairs(vec![(b"a".to_vec(), b"x".to_vec())])
                .unwrap(),
        }],
        checkpoint: PipelineCheckpoint::Bootstrap(progress(1)).encode(),
    };
    sink.write(&chunk).await.expect("chunk");
    sink.write(&chunk)
        .await
        .expect("the same chunk again replaces its range");
    engine.close().expect("close");
    drop((sink, engine));

    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    let stored = sink
        .open()
        .await
        .expect("open")
        .expect("the copy's progress");
    assert_eq!(
        PipelineCheckpoint::decode(&stored).expect("decodes"),
        PipelineCheckpoint::Bootstrap(progress(1))
    );
    assert_eq!(
        engine
            .bootstrap_progress()
            .and_then(|p| BootstrapProgress::from_json(&p)),
        Some(progress(1)),
        "stored as the replica's bootstrap always stored it"
    );
    let ops = Batch {
        source: SOURCE,
        items: vec![Item::Ops(vec![put("b", "y")])],
        checkpoint: PipelineCheckpoint::Bootstrap(progress(2)).encode(),
    };
    sink.write(&ops).await.expect("ops");
    let done = Batch {
        source: SOURCE,
        items: vec![],
        checkpoint: tail_checkpoint(7, &format!("{SOURCE}:1-7")),
    };
    sink.write(&done).await.expect("finish");
    assert!(!engine.is_bootstrapping());
    assert_eq!(engine.gtid_executed(), set(&format!("{SOURCE}:1-7")));
    assert_eq!(
        engine.get("t", b"a").expect("read").as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(
        engine.get("t", b"b").expect("read").as_deref(),
        Some(&b"y"[..])
    );
    // The live tail takes over: a GTID the copy holds is a no-op, the next one applies.
    let next = Batch {
        source: SOURCE,
        items: vec![
            Item::Txn(txn(7, vec![put("a", "stale")])),
            Item::Txn(txn(8, vec![put("c", "z")])),
        ],
        checkpoint: tail_checkpoint(8, &format!("{SOURCE}:1-8")),
    };
    sink.write(&next).await.expect("live");
    assert_eq!(sink.last_committed(), 1);
    assert_eq!(
        engine.get("t", b"a").expect("read").as_deref(),
        Some(&b"x"[..])
    );
    assert_eq!(
        engine.get("t", b"c").expect("read").as_deref(),
        Some(&b"z"[..])
    );
}

/// The replica's by-value write (`write_owned`): live transactions move into the engine; when
/// a copy into the engine is running, the engine refuses them and the batch comes back whole
/// (to be retried), not emptied by the move. Guards against a retried batch that lost its
/// transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_live_batch_refused_during_a_copy_comes_back_whole_and_applies_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    let begin = PipelineCheckpoint::Bootstrap(progress(0)).encode();
    sink.begin_copy(&begin, &EarlierCopy::None)
        .await
        .expect("begin");

    let batch = live_batch();
    let (err, back) = sink
        .write_owned(batch.clone())
        .await
        .expect_err("the engine refuses live transactions while it is copying");
    assert!(matches!(err, SinkError::Retry(_)), "{err:?}");
    assert_eq!(
        (back.source, &back.items, &back.checkpoint),
        (batch.source, &batch.items, &batch.checkpoint),
        "the batch comes back as it went"
    );
    assert!(engine.gtid_executed().is_empty(), "nothing was applied");

    // The copy ends at a set that does not hold the batch's GTIDs: the batch then applies.
    let other = uuid::Uuid::from_bytes([0xbb; 16]);
    let done = Batch {
        source: SOURCE,
        items: vec![],
        checkpoint: tail_checkpoint(7, &format!("{other}:1-2")),
    };
    sink.write_owned(done)
        .await
        .map_err(|(e, _)| e)
        .expect("finish");
    assert!(!engine.is_bootstrapping());
    sink.write_owned(back)
        .await
        .map_err(|(e, _)| e)
        .expect("the retried batch");
    assert_eq!(sink.last_committed(), 3);
    // A live batch's write returns once it is logged; reads show it once it is applied.
    assert!(
        engine
            .wait_all_visible(Duration::from_secs(10))
            .expect("apply")
    );
    assert_eq!(
        engine.gtid_executed(),
        set(&format!("{SOURCE}:1-3,{other}:1-2"))
    );
    assert_eq!(
        engine.get("t", b"a").expect("read").as_deref(),
        Some(&b"3"[..])
    );
}

/// The replica's by-value write of a copy step: the chunk moves into the engine (no copy of its
/// entries) with its progress; a step the engine refuses is fatal and comes back emptied,
/// since its entries moved into the refused call and a retry would store its progress without
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_copy_step_is_stored_with_its_progress_and_a_refused_one_is_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = EngineSink::new(engine.clone());
    let begin = PipelineCheckpoint::Bootstrap(progress(0)).encode();
    sink.begin_copy(&begin, &EarlierCopy::None)
        .await
        .expect("begin");
    let chunk = |entries: &[(&[u8], &[u8])], chunks| Batch {
        source: SOURCE,
        items: vec![Item::Chunk {
            tree: "t".into(),
            merge_operator: None,
            from: vec![],
            to: Some(b"c".to_vec()),
            entries: tideline_wal::PackedEntries::from_pairs(entries.iter().copied()).unwrap(),
        }],
        checkpoint: PipelineCheckpoint::Bootstrap(progress(chunks)).encode(),
    };
    sink.write_owned(chunk(&[(b"a", b"x"), (b"b", b"y")], 1))
        .await
        .map_err(|(e, _)| e)
        .expect("the chunk");
    assert_eq!(
        engine.get("t", b"b").expect("read").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        engine
            .bootstrap_progress()
            .and_then(|p| BootstrapProgress::from_json(&p)),
        Some(progress(1))
    );

    // A key past the chunk's range (`to` is "c"): the engine refuses the whole step.
    let bad = chunk(&[(b"b", b"z"), (b"d", b"z")], 2);
    let (err, back) = sink
        .write_owned(bad.clone())
        .await
        .expect_err("a chunk with a key outside its range is refused");
    assert!(matches!(err, SinkError::Fatal(_)), "{err:?}");
    assert!(err.message().contains("outside the chunk's range"), "{err}");
    assert!(back.items.is_empty(), "never retried: {:?}", back.items);
    assert_eq!(back.checkpoint, bad.checkpoint);
    assert_eq!(
        engine.get("t", b"b").expect("read").as_deref(),
        Some(&b"y"[..]),
        "nothing of the refused step is stored"
    );
    assert_eq!(
        engine
            .bootstrap_progress()
            .and_then(|p| BootstrapProgress::from_json(&p)),
        Some(progress(1)),
        "nor its progress"
    );
}

/// A copy begun while a transaction committed on this (read-write) node is still being
/// applied: the engine refuses to wipe under it. That is passing (the commit finishes), so the
/// sink retries; it is not the end of replication, and the message tells no operator to call
/// an engine API they cannot reach. Guards against a read-write replica whose replication
/// stopped for good because a client wrote at the moment it began a bootstrap.
#[test]
fn a_copy_begun_under_a_commit_in_flight_is_retried() {
    let e = super::write_error(tideline_engine::WriteError::CommitsInFlight {
        applied: 7,
        submitted: 8,
    });
    assert!(matches!(e, SinkError::Retry(_)), "{e:?}");
    assert!(!e.message().contains("set_read_only"), "{e}");
    assert!(e.message().contains("in flight"), "{e}");
}

/// What a copy step left of a tree before the copy reached it: the tree's definition (its
/// operator and an index) as an earlier view of the upstream had it, stored before a kill,
/// with the progress still before the tree.
async fn a_copy_with_stale_definitions_of_t(engine: &Arc<Engine>) -> EngineSink {
    let mut sink = EngineSink::new(engine.clone());
    let mut before_t = progress(0);
    before_t.tree = String::new();
    before_t.key_hex = String::new();
    let at_p0 = PipelineCheckpoint::Bootstrap(before_t).encode();
    sink.begin_copy(&at_p0, &EarlierCopy::None)
        .await
        .expect("begin");
    let stale = Batch {
        source: SOURCE,
        items: vec![Item::Ops(vec![
            Op::CreateTree {
                tree: "t".into(),
                merge_operator: Some("add".into()),
            },
            Op::CreateIndex {
                tree: "t".into(),
                name: "i".into(),
                paths: vec!["/a".into()],
                unique: false,
            },
        ])],
        checkpoint: at_p0,
    };
    sink.write(&stale).await.expect("the stale definitions");
    sink
}

/// The resumed copy's first chunk of `t`, as the upstream now has it (re-created with the
/// `append` operator), after `definitions`, in one step that completes the tree.
fn first_chunk_of_t(definitions: Vec<Op>) -> Batch {
    let mut done = progress(1);
    done.key_hex = String::new();
    done.tree_done = true;
    done.trees_done = 1;
    let mut items = Vec::new();
    if !definitions.is_empty() {
        items.push(Item::Ops(definitions));
    }
    items.push(Item::Chunk {
        tree: "t".into(),
        merge_operator: Some("append".into()),
        from: vec![],
        to: None,
        entries: tideline_wal::PackedEntries::from_pairs(vec![(b"a".to_vec(), b"x".to_vec())])
            .unwrap(),
    });
    Batch {
        source: SOURCE,
        items,
        checkpoint: PipelineCheckpoint::Bootstrap(done).encode(),
    }
}

fn operator_and_indexes(engine: &Engine, tree: &str) -> (Option<String>, Vec<String>) {
    let operator = engine
        .trees()
        .into_iter()
        .find(|t| t.name == tree)
        .and_then(|t| t.merge_operator)
        .map(|m| m.name().to_string());
    let indexes = engine
        .indexes()
        .into_iter()
        .filter(|i| i.tree == tree)
        .map(|i| i.name)
        .collect();
    (operator, indexes)
}

/// A replica killed after storing a tree's definitions and before the tree's first chunk;
/// meanwhile the upstream re-created the tree with another operator and without its index.
/// The resumed copy's first chunk of the tree must leave the tree as the upstream now has
/// it: the chunk's operator, no index. Guards against a replica that kept the old operator
/// (its merges then diverge from the upstream's) and rebuilt a dropped index for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trees_first_chunk_replaces_definitions_an_interrupted_copy_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = a_copy_with_stale_definitions_of_t(&engine).await;
    sink.write(&first_chunk_of_t(vec![]))
        .await
        .expect("the first chunk of t");
    let done = Batch {
        source: SOURCE,
        items: vec![],
        checkpoint: tail_checkpoint(7, &format!("{SOURCE}:1-7")),
    };
    sink.write(&done).await.expect("finish");
    assert!(!engine.is_bootstrapping());
    assert_eq!(
        operator_and_indexes(&engine, "t"),
        (Some("append".to_string()), vec![]),
        "t's operator and indexes after the copy"
    );
    assert_eq!(
        engine.get("t", b"a").expect("read").as_deref(),
        Some(&b"x"[..])
    );
}

/// The same, where the upstream's tree has an index of its own: its definition comes with
/// the first chunk, in the same step, and is the only index the tree keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trees_first_chunk_keeps_exactly_the_indexes_stored_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path());
    let mut sink = a_copy_with_stale_definitions_of_t(&engine).await;
    let definitions = vec![
        Op::CreateTree {
            tree: "t".into(),
            merge_operator: Some("append".into()),
        },
        Op::CreateIndex {
            tree: "t".into(),
            name: "j".into(),
            paths: vec!["/b".into()],
            unique: false,
        },
    ];
    sink.write(&first_chunk_of_t(definitions))
        .await
        .expect("the first chunk of t with its definitions");
    let done = Batch {
        source: SOURCE,
        items: vec![],
        checkpoint: tail_checkpoint(7, &format!("{SOURCE}:1-7")),
    };
    sink.write(&done).await.expect("finish");
    assert_eq!(
        operator_and_indexes(&engine, "t"),
        (Some("append".to_string()), vec!["j".to_string()]),
        "t's operator and indexes after the copy"
    );
}

/// The replica's live write returns once the batch is in the engine's log, before its apply;
/// the checkpoint `open` returns must still hold every batch written (contract item 2), or a
/// restarted pipeline would resume before data the engine has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_after_a_live_write_holds_its_checkpoint_while_the_apply_lags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open_with(
        dir.path(),
        EngineOptions {
            read_only: true,
            // The applier starts each apply this late.
            unsafe_pause_before_apply: Some(Duration::from_millis(500)),
            ..EngineOptions::default()
        },
    );
    let mut sink = EngineSink::new(engine.clone());
    sink.write_owned(live_batch())
        .await
        .map_err(|(e, _)| e)
        .expect("write");
    assert_eq!(
        engine.wal().visible_offset(),
        3,
        "the batch is in the log when the write returns"
    );
    let stored = sink.open().await.expect("open").expect("a checkpoint");
    match PipelineCheckpoint::decode(&stored).expect("decode") {
        PipelineCheckpoint::Tail(pos) => assert_eq!(pos.gtids, set(&format!("{SOURCE}:1-3"))),
        other => panic!("{other:?}"),
    }
}
