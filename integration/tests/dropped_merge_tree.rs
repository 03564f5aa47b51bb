//! Merges on trees whose operator the source's `status` does not name when the pipeline
//! starts, through a PostgreSQL pipeline against the real server on 127.0.0.1:5432 (trust,
//! user `postgres`, database `test`; `scripts/services` starts it).
//!
//! - A tree merged into and then dropped at the source while the pipeline was stopped (daily
//!   counter trees): the restarted pipeline replays the merge before the drop, with no operator
//!   to resolve it. It must reach `running` and leave no row of the dropped tree, as at the
//!   source; it must not hold for good (docs/reliability.md, fourth code review). Also when
//!   the tree took more merges than one batch holds, so that the merges and the drop come in
//!   different batches: the source's status, read after the merges, does not list the tree,
//!   so its drop follows and the merges have nothing to leave.
//! - A tree created after the pipeline started, whose `create_tree` the pipeline's `ops` filter
//!   leaves out: the source names its operator now, so the pipeline reads it again before it
//!   holds, and stores the merged value.

mod common;
mod sinkkit;

use std::time::{Duration, Instant};

use sinkkit::pg::rows;
use sinkkit::{Norm, SourceNode};
use tideline_connectors::sink::postgres::{PostgresConfig, PostgresSink};
use tideline_connectors::{
    PipelineConfig, PipelineState, SharedPipelineStatus, StartFrom, pipeline,
};
use tideline_consumers::TailStart;

const PG: u16 = 5432;
const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg(rt: &tokio::runtime::Runtime) -> tokio_postgres::Client {
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(URL, tokio_postgres::NoTls))
        .expect("connect to PostgreSQL");
    rt.spawn(conn);
    client
}

async fn table_exists(c: &tokio_postgres::Client, table: &str) -> bool {
    c.query_one(
        "SELECT to_regclass($1) IS NOT NULL",
        &[&format!("\"{table}\"")],
    )
    .await
    .map(|r| r.get(0))
    .expect("ask whether a table exists")
}

async fn clean_up(c: &tokio_postgres::Client, name: &str, trees: &[&str]) {
    for tree in trees {
        let _ = c
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{name}_{tree}\""))
            .await;
    }
    let _ = c
        .execute(
            "DELETE FROM tideline_positions WHERE pipeline = $1",
            &[&name],
        )
        .await;
}

/// A pipeline `name` from `source`'s earliest offset into tables `NAME_{tree}`, in batches cut
/// 500 ms after their first change (a backlog read at once is one batch).
fn start(
    source: &SourceNode,
    name: &str,
    ops: &[&str],
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), tideline_connectors::PipelineError>>,
) {
    start_with(source, name, ops, None)
}

/// [`start`], with batches of at most `batch_changes` changes when given.
fn start_with(
    source: &SourceNode,
    name: &str,
    ops: &[&str],
    batch_changes: Option<usize>,
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), tideline_connectors::PipelineError>>,
) {
    let client = tideline_stream::ClientConfig::new(
        tideline_stream::tls::load_client_dir(&source.secrets).expect("client secrets"),
    );
    let mut cfg = PipelineConfig::new(name, &source.addr, client);
    cfg.from = StartFrom::Tail(TailStart::Earliest);
    cfg.filter.ops = ops.iter().map(|o| o.to_string()).collect();
    cfg.batch_delay = Duration::from_millis(500);
    if let Some(n) = batch_changes {
        cfg.batch_changes = n;
    }
    cfg.retry_min = Duration::from_millis(50);
    cfg.retry_max = Duration::from_millis(500);
    let mut sink_cfg = PostgresConfig::new(URL);
    sink_cfg.table = format!("{name}_{{tree}}");
    let sink = PostgresSink::new(sink_cfg, name).expect("sink settings");
    pipeline::spawn(cfg, Box::new(sink))
}

/// Waits until the pipeline is `running` with everything the source committed stored and
/// `done` true; fails at once when it is `held` or `failed`, naming its status.
fn wait_caught_up(
    source: &SourceNode,
    status: &SharedPipelineStatus,
    what: &str,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status.get();
        assert!(
            !matches!(s.state, PipelineState::Held | PipelineState::Failed),
            "{what}: the pipeline is {}: {}",
            s.state.as_str(),
            s.to_json()
        );
        let stored = s.position.as_ref().map_or(0, |p| p.offset);
        if s.state == PipelineState::Running && stored >= source.last_offset() && done() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not caught up within 60 s: {}",
            s.to_json()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_restarted_pipeline_goes_past_a_merge_into_a_tree_the_source_dropped_meanwhile() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(dir.path());
    let _guard = source.runtime.enter();
    let rt = &source.runtime;
    let db = pg(rt);
    let name = sinkkit::unique("pgdropmerge");
    let daily = format!("{name}_daily");
    let kv = format!("{name}_kv");
    let e = &source.engine;
    e.create_tree("daily", Some("add")).expect("create daily");
    e.merge("daily", b"visits", b"1").expect("merge");

    let (status, task) = start(&source, &name, &[]);
    wait_caught_up(&source, &status, "first run", || {
        rt.block_on(rows(&db, &daily)).get(b"visits".as_slice()) == Some(&Norm::of(b"1"))
    });
    task.abort();
    let _ = rt.block_on(task);

    // While the pipeline is stopped: one more merge into `daily`, then the tree goes, and the
    // source's status no longer names it.
    e.merge("daily", b"visits", b"2").expect("merge");
    e.drop_tree("daily").expect("drop daily");
    e.put("kv", b"after", b"\"drop\"").expect("put");

    let (status, task) = start(&source, &name, &[]);
    wait_caught_up(&source, &status, "after the restart", || {
        rt.block_on(rows(&db, &kv))
            .contains_key(b"after".as_slice())
    });
    // `on_drop_tree = "truncate"` (the default): the table stays, empty.
    assert!(
        rt.block_on(table_exists(&db, &daily)),
        "the dropped tree's table is truncated, not dropped"
    );
    let left = rt.block_on(rows(&db, &daily));
    assert!(
        left.is_empty(),
        "the sink still holds rows of the dropped tree: {left:?}"
    );
    task.abort();
    let _ = rt.block_on(task);
    rt.block_on(clean_up(&db, &name, &["daily", "kv", "cnt", "doc"]));
}

/// Daily counter trees take many merges before they are dropped: while the pipeline is
/// stopped, more merges than one batch holds, then the drop. The restarted pipeline's first
/// batches carry only merges into a tree the source no longer has; it must go past them.
#[test]
fn a_restarted_pipeline_goes_past_more_merges_than_a_batch_into_a_tree_since_dropped() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    const BATCH_CHANGES: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(dir.path());
    let _guard = source.runtime.enter();
    let rt = &source.runtime;
    let db = pg(rt);
    let name = sinkkit::unique("pgdropmany");
    let daily = format!("{name}_daily");
    let kv = format!("{name}_kv");
    let e = &source.engine;
    e.create_tree("daily", Some("add")).expect("create daily");
    e.merge("daily", b"visits", b"1").expect("merge");

    let (status, task) = start_with(&source, &name, &[], Some(BATCH_CHANGES));
    wait_caught_up(&source, &status, "first run", || {
        rt.block_on(rows(&db, &daily)).get(b"visits".as_slice()) == Some(&Norm::of(b"1"))
    });
    task.abort();
    let _ = rt.block_on(task);

    // While the pipeline is stopped: merges into `daily` enough for several batches, each in
    // a transaction of its own, then the tree goes; then changes that must still arrive.
    for i in 0..(5 * BATCH_CHANGES) {
        let key = format!("page{}", i % 3);
        e.merge("daily", key.as_bytes(), b"1").expect("merge");
    }
    e.drop_tree("daily").expect("drop daily");
    for i in 0..(2 * BATCH_CHANGES) {
        e.put("kv", format!("after{i}").as_bytes(), b"\"drop\"")
            .expect("put");
    }

    let (status, task) = start_with(&source, &name, &[], Some(BATCH_CHANGES));
    let last = format!("after{}", 2 * BATCH_CHANGES - 1);
    wait_caught_up(&source, &status, "after the restart", || {
        rt.block_on(rows(&db, &kv)).contains_key(last.as_bytes())
    });
    let left = rt.block_on(rows(&db, &daily));
    assert!(
        left.is_empty(),
        "the sink still holds rows of the dropped tree: {left:?}"
    );
    let kv_rows = rt.block_on(rows(&db, &kv));
    assert_eq!(
        kv_rows.keys().filter(|k| k.starts_with(b"after")).count(),
        2 * BATCH_CHANGES,
        "every change after the drop arrives: {kv_rows:?}"
    );
    task.abort();
    let _ = rt.block_on(task);
    rt.block_on(clean_up(&db, &name, &["daily", "kv", "cnt", "doc"]));
}

#[test]
fn a_merge_on_a_tree_created_after_the_start_uses_the_operator_the_source_names_now() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(dir.path());
    let _guard = source.runtime.enter();
    let rt = &source.runtime;
    let db = pg(rt);
    let name = sinkkit::unique("pglatemerge");
    let late = format!("{name}_late");
    let e = &source.engine;
    e.put("kv", b"before", b"1").expect("put");

    // `create_tree` does not reach the sink: the stream never tells it `late`'s operator.
    let (status, task) = start(&source, &name, &["put", "delete", "merge", "drop_tree"]);
    wait_caught_up(&source, &status, "before the tree exists", || true);

    e.create_tree("late", Some("add")).expect("create late");
    e.merge("late", b"n", b"5").expect("merge");
    e.merge("late", b"n", b"2").expect("merge");
    wait_caught_up(&source, &status, "after merges into the new tree", || {
        rt.block_on(rows(&db, &late)).get(b"n".as_slice()) == Some(&Norm::of(b"7"))
    });
    task.abort();
    let _ = rt.block_on(task);
    rt.block_on(clean_up(&db, &name, &["late", "kv", "cnt", "doc"]));
}
