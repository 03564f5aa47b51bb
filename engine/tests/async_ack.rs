//! Async durability's acknowledgement (DESIGN: "`async` acks after write and fsyncs on an
//! interval"): a local commit returns once its log record is written, before the interval's
//! fsync; it is shown to reads only after that fsync and its apply; `Engine::wait_visible` is
//! the fence that reads one's own write; and the acknowledged-but-unapplied transactions are
//! bounded (`async_unapplied_max`). Guards against async commits that wait for the fsync
//! (which made `async` slower than `sync`), against a record shown before it is durable, and
//! against committers running unboundedly ahead of the applier.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{Durability, MemStorage, Wal, WalOptions};

struct Node {
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn node(interval: Duration, opts: EngineOptions) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(
        Arc::new(MemStorage::new()),
        WalOptions {
            durability: Durability::Async { interval },
            ..WalOptions::default()
        },
    )
    .expect("open log");
    let engine = Engine::open(dir.path(), Arc::new(wal), opts).expect("open engine");
    // A tree change is acknowledged only once applied (after one interval): done up front.
    engine.create_tree("t", None).expect("create tree");
    Node { engine, _dir: dir }
}

/// With a 2 s interval, a put returns while its record is written but not yet synced (the
/// regression: it used to return only after the fsync), is not shown to reads before that
/// fsync, and is shown once `wait_visible` says so.
#[test]
fn a_commit_is_acknowledged_before_the_fsync_and_shown_only_after_it() {
    let n = node(Duration::from_secs(2), EngineOptions::default());
    let e = &n.engine;
    let started = Instant::now();
    let c = e.put("t", b"k", b"v1").expect("put");
    let took = started.elapsed();
    let durable = e.wal().durable_offset();
    let seen = e.get("t", b"k").expect("get");
    assert!(
        durable < c.offset.get(),
        "the put returned after {took:?}, once its record (offset {}) was durable (durable \
         head {durable}): under async it must return once written, before the fsync",
        c.offset
    );
    assert_eq!(
        seen, None,
        "the write was shown before its record was durable"
    );
    assert!(
        e.wait_visible(&c, Duration::from_secs(10)).expect("fence"),
        "the commit did not become visible within 10 s (interval 2 s)"
    );
    assert!(
        e.wal().durable_offset() >= c.offset.get(),
        "visible before durable"
    );
    assert_eq!(e.get("t", b"k").expect("get").as_deref(), Some(&b"v1"[..]));
}

/// Write, fence, read, 200 times at the node's own interval (10 ms): every read sees the
/// value just written, never the one before.
#[test]
fn wait_visible_reads_ones_own_write() {
    let n = node(Duration::from_millis(10), EngineOptions::default());
    let e = &n.engine;
    for i in 0..200u32 {
        let v = format!("v{i}");
        let c = e.put("t", b"k", v.as_bytes()).expect("put");
        assert!(
            e.wait_visible(&c, Duration::from_secs(10)).expect("fence"),
            "iteration {i}: not visible within 10 s"
        );
        assert_eq!(
            e.get("t", b"k").expect("get").as_deref(),
            Some(v.as_bytes()),
            "iteration {i}: the fenced read missed the write"
        );
    }
}

/// With at most 4 acknowledged transactions unapplied and a 2 s interval, the first four
/// puts return before their records are durable; the fifth returns only once the first of
/// them is applied.
#[test]
fn committers_wait_once_the_applier_is_async_unapplied_max_behind() {
    let opts = EngineOptions {
        async_unapplied_max: 4,
        ..EngineOptions::default()
    };
    let n = node(Duration::from_secs(2), opts);
    let e = &n.engine;
    let mut commits = Vec::new();
    for i in 0..4 {
        let c = e.put("t", format!("k{i}").as_bytes(), b"v").expect("put");
        assert!(
            e.wal().durable_offset() < c.offset.get(),
            "put {i} waited for the fsync though the applier was within the bound"
        );
        commits.push(c);
    }
    let fifth = e.put("t", b"k4", b"v").expect("put");
    let applied = e.position().offset.map_or(0, |o| o.get());
    assert!(
        applied >= commits[0].offset.get(),
        "the fifth put (offset {}) returned with only offset {applied} applied: the first \
         (offset {}) must be applied before a fifth unapplied one is acknowledged",
        fifth.offset,
        commits[0].offset
    );
}

/// The API is blocking and ENGINE.md says to call it through `spawn_blocking`, but a commit
/// made from inside an async task anyway must get the answer it gets under sync durability
/// (the thread blocks), not a panic from the runtime's check on blocking receives.
#[test]
fn a_commit_from_inside_an_async_task_is_answered() {
    let n = node(Duration::from_millis(10), EngineOptions::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let c = rt.block_on(async { n.engine.put("t", b"k", b"v") });
    let c = c.expect("put from an async task");
    assert!(
        n.engine
            .wait_visible(&c, Duration::from_secs(10))
            .expect("fence")
    );
}
