//! The PostgreSQL sink against the real server on 127.0.0.1:5432 (trust, user `postgres`,
//! database `test`; `scripts/services` starts it), through `tideline connect` and `tideline
//! serve --connect` as operators run them.
//!
//! - Exactly once under kill -9: a random workload (puts, deletes, `add` and
//!   `json-merge-patch` merges) runs on a source node while `tideline connect` is SIGKILLed at
//!   random points ≥ 20 times (`TIDELINE_SINK_KILL_CYCLES`); at the end the tables equal the
//!   log's projection, row by row. Merges are not idempotent, and every transaction adds 1
//!   to one counter nothing resets, so a batch applied twice, or skipped, shows. Its canary
//!   stores positions apart from the data (the `testing` switch) and must see the difference.
//! - The server drops the connector (`pg_terminate_backend`, not a restart of the shared
//!   server that parallel tests use): the node's pipeline retries, catches up, and `status`
//!   and `/metrics` count the outage.
//! - A bad file and an unreachable or refusing server: a clear one-line error, no position.

mod common;
mod sinkkit;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sinkkit::pg::rows;
use sinkkit::{Norm, SourceNode};
use tideline_connectors::sink::postgres::{PostgresConfig, PostgresSink, WriteMethod};
use tideline_connectors::{Batch, EarlierCopy, Sink, SinkError};

const PG: u16 = 5432;
const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn pg() -> tokio_postgres::Client {
    let rt = tokio::runtime::Handle::current();
    let (client, conn) = rt
        .block_on(tokio_postgres::connect(URL, tokio_postgres::NoTls))
        .expect("connect to PostgreSQL");
    rt.spawn(conn);
    client
}

/// The stored checkpoint of `pipeline`.
async fn position(c: &tokio_postgres::Client, pipeline: &str) -> Option<Vec<u8>> {
    c.query_opt(
        "SELECT checkpoint FROM tideline_positions WHERE pipeline = $1",
        &[&pipeline],
    )
    .await
    .ok()
    .flatten()
    .map(|r| r.get(0))
}

async fn drop_tables(c: &tokio_postgres::Client, prefix: &str, pipeline: &str) {
    for (tree, _) in sinkkit::TREES {
        let _ = c
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{prefix}{tree}\""))
            .await;
    }
    let _ = c
        .execute(
            "DELETE FROM tideline_positions WHERE pipeline = $1",
            &[&pipeline],
        )
        .await;
}

/// Runs the kill cycles; returns whether the sink ended equal to the projection (and the
/// mismatch message when not).
fn kill_cycles(canary: bool) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(dir.path());
    let _guard = source.runtime.enter();
    let db = pg();
    let seed = sinkkit::seed(if canary {
        "postgres kill cycles (canary)"
    } else {
        "postgres kill cycles"
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let name = sinkkit::unique("pgkill");
    let prefix = format!("{name}_");
    // Some state before the first start, copied by the bootstrap.
    for _ in 0..200 {
        sinkkit::random_txn(&source.engine, &mut rng);
    }
    let file = sinkkit::pipeline_file(
        dir.path(),
        &name,
        &format!(
            "name = \"{name}\"\nbatch_changes = 200\nbatch_delay_ms = 20\n\n[source]\nnode = \
             \"{}\"\nsecrets = \"{}\"\nfrom = \"bootstrap\"\n\n[sink]\nkind = \"postgres\"\nurl \
             = \"{URL}\"\ntable = \"{prefix}{{tree}}\"\n",
            source.addr,
            source.secrets.display()
        ),
    );
    let log = dir.path().join("connect.log");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = sinkkit::engine_workload(source.engine.clone(), seed ^ 1, stop.clone());
    let mut progressed = 0;
    let cycles = sinkkit::cycles();
    for cycle in 0..cycles {
        let before =
            sinkkit::checkpoint_offset(source.runtime.block_on(position(&db, &name)).as_deref());
        let mut child = sinkkit::connect(&file, &log, canary);
        // Kill once the connector has stored something this cycle (work observably in
        // flight), then at a random point of the batches that follow.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = source.runtime.block_on(position(&db, &name));
            // The first cycle may die while bootstrapping; later ones once the tail moved.
            if sinkkit::checkpoint_offset(now.as_deref()) > before || (cycle == 0 && now.is_some())
            {
                progressed += 1;
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..150)));
        sinkkit::kill9(&mut child, &log);
        eprintln!(
            "cycle {cycle}: killed at stored offset {}",
            sinkkit::checkpoint_offset(source.runtime.block_on(position(&db, &name)).as_deref())
        );
    }
    stop.store(true, Ordering::Relaxed);
    let txns = writer.join().expect("the workload thread");
    assert!(
        progressed * 2 >= cycles,
        "only {progressed} of {cycles} cycles stored anything before the kill; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A last run catches up with everything, then the tables must equal the projection.
    let last = source.last_offset();
    let mut child = sinkkit::connect(&file, &log, canary);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sinkkit::checkpoint_offset(source.runtime.block_on(position(&db, &name)).as_deref())
        < last
    {
        assert!(
            Instant::now() < deadline,
            "the connector did not catch up with offset {last}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sinkkit::kill9(&mut child, &log);
    let want = source.projection();
    let mut have = BTreeMap::new();
    for (tree, _) in sinkkit::TREES {
        have.insert(
            tree.to_string(),
            source
                .runtime
                .block_on(rows(&db, &format!("{prefix}{tree}"))),
        );
    }
    eprintln!(
        "{cycles} kill cycles, {progressed} mid-batch, {txns} workload transactions, seed {seed}"
    );
    let r =
        std::panic::catch_unwind(|| sinkkit::assert_same("postgres", &want, &have)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "mismatch".into())
        });
    source.runtime.block_on(drop_tables(&db, &prefix, &name));
    r
}

#[test]
fn kill9_mid_batch_stores_every_change_exactly_once() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    if let Err(e) = kill_cycles(false) {
        panic!("{e}");
    }
}

#[test]
fn canary_positions_stored_apart_from_the_data_are_caught() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let e = kill_cycles(true).expect_err(
        "with positions stored apart from the data, kills must repeat merges and the check \
         must see it (is the tideline binary built with tideline-connectors/testing?)",
    );
    eprintln!("canary caught it: {}", e.lines().next().unwrap_or_default());
}

/// Batch `seq`: `+1` merged into `cnt/n`.
fn plus_one(seq: u64) -> Batch {
    sinkkit::one_change(seq, false)
}

/// A sink of pipeline `name` on `url`, writing tables `{name}_{tree}`, with `cnt` merging by
/// `add`.
fn counter_sink(name: &str, url: &str) -> PostgresSink {
    let mut cfg = PostgresConfig::new(url);
    cfg.table = format!("{name}_{{tree}}");
    let mut sink = PostgresSink::new(cfg, name).expect("sink settings");
    sink.set_merge_operators(&BTreeMap::from([("cnt".to_string(), "add".to_string())]));
    sink
}

/// `cnt/n` of pipeline `name` as stored.
async fn counter(c: &tokio_postgres::Client, name: &str) -> Option<String> {
    let sql = format!("SELECT value::text FROM \"{name}_cnt\" WHERE key = 'n'");
    c.query_opt(&sql, &[])
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// What a pipeline does with its sink: takes the answer of its first open (opening again
/// while the sink says retry), then writes the batches after the stored checkpoint.
async fn resume_and_write(
    sink: &mut PostgresSink,
    mut opened: Result<Option<Vec<u8>>, SinkError>,
    batches: &[Batch],
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let stored = loop {
        match opened {
            Ok(s) => break s,
            Err(SinkError::Retry(m)) => {
                assert!(Instant::now() < deadline, "still refused after 10 s: {m}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                opened = sink.open().await;
            }
            Err(e) => panic!("open: {e}"),
        }
    };
    let after = match stored {
        None => 0,
        Some(cp) => {
            1 + batches
                .iter()
                .position(|b| b.checkpoint == cp)
                .expect("a checkpoint of these batches")
        }
    };
    for b in &batches[after..] {
        sink.write(b).await.expect("write a batch");
    }
}

/// A connector killed after sending its last COMMIT leaves a PostgreSQL session that may
/// commit after the next connector started and read the position (under load the server
/// takes a while to get to it). The next one must not read the position before that session
/// ended, or it writes the batch a second time: a merge counted twice.
#[test]
fn a_connector_never_reads_the_position_while_an_earlier_session_of_its_pipeline_lives() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pgfence");
    let batches = [plus_one(1), plus_one(2)];
    rt.block_on(async {
        let mut old = counter_sink(&name, URL);
        assert_eq!(old.open().await.expect("open"), None);
        // The next connector starts while the old one's session still lives ...
        let mut new = counter_sink(&name, URL);
        let early = new.open().await;
        // ... and the old one's last transaction commits after that.
        old.write(&batches[0])
            .await
            .expect("the old connector's last batch");
        drop(old);
        if let Err(e) = &early {
            assert!(
                matches!(e, SinkError::Retry(m) if m.contains("another PostgreSQL session")
                    && m.contains("pg_terminate_backend")),
                "a retry naming the session that holds the pipeline: {e}"
            );
        }
        resume_and_write(&mut new, early, &batches).await;
        assert_eq!(
            counter(&db, &name).await.as_deref(),
            Some("2"),
            "two batches of +1 each, each applied once"
        );
    });
    rt.block_on(drop_tables(&db, &format!("{name}_"), &name));
}

/// A batch whose COMMIT answer was lost (the connection died after the server committed) is
/// retried by the pipeline: the sink must see that it is already stored and not apply it
/// again.
#[test]
fn a_batch_retried_after_its_commit_answer_was_lost_is_applied_once() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pglost");
    rt.block_on(async {
        let (relay, lose_next_answer) = sinkkit::relay_losing_answers(PG, &[b"COMMIT\0"]).await;
        let mut sink = counter_sink(&name, &format!("postgres://postgres@{relay}/test"));
        sinkkit::store_then_lose_an_answer(
            &mut sink,
            &lose_next_answer,
            &plus_one(1),
            &plus_one(2),
        )
        .await;
        assert_eq!(
            counter(&db, &name).await.as_deref(),
            Some("2"),
            "the server committed batch 2 all the same"
        );
        // The pipeline retries batch 2, as the error says.
        sinkkit::write_retrying(&mut sink, &plus_one(2)).await;
        assert_eq!(
            counter(&db, &name).await.as_deref(),
            Some("2"),
            "batch 2 applied once"
        );
        sink.write(&plus_one(3)).await.expect("batch 3");
        assert_eq!(counter(&db, &name).await.as_deref(), Some("3"));
    });
    rt.block_on(drop_tables(&db, &format!("{name}_"), &name));
}

/// A position moved by anyone but this sink (another writer of the pipeline) stops the sink
/// before it writes anything on top of it.
#[test]
fn a_position_moved_by_another_writer_stops_the_sink_before_it_writes() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pgmoved");
    rt.block_on(async {
        let mut sink = counter_sink(&name, URL);
        assert_eq!(sink.open().await.expect("open"), None);
        sink.write(&plus_one(1)).await.expect("batch 1");
        db.execute(
            "UPDATE tideline_positions SET checkpoint = 'elsewhere' WHERE pipeline = $1",
            &[&name],
        )
        .await
        .expect("move the position");
        let e = sink.write(&plus_one(2)).await.expect_err("refused");
        assert!(
            matches!(&e, SinkError::Fatal(m) if m.contains("another connector wrote")),
            "{e}"
        );
        assert_eq!(counter(&db, &name).await.as_deref(), Some("1"));
        assert_eq!(
            position(&db, &name).await.as_deref(),
            Some(&b"elsewhere"[..])
        );
    });
    rt.block_on(drop_tables(&db, &format!("{name}_"), &name));
}

/// A unique index the user put on a sink table, which two source keys' rows violate, is a
/// data conflict for an operator (held, naming the index), not an outage retried for ever;
/// nothing of the batch is stored.
#[test]
fn a_users_unique_index_that_the_rows_violate_holds_the_sink_for_an_operator() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pguniq");
    rt.block_on(async {
        let mut sink = counter_sink(&name, URL);
        assert_eq!(sink.open().await.expect("open"), None);
        sink.write(&plus_one(1))
            .await
            .expect("batch 1 creates the table");
        db.batch_execute(&format!(
            "CREATE UNIQUE INDEX \"{name}_one_value\" ON \"{name}_cnt\" (value)"
        ))
        .await
        .expect("the user's unique index");
        let uuid = uuid::Uuid::from_bytes([7; 16]);
        let put = |key: &str| tideline_wal::Op::Put {
            tree: "cnt".into(),
            key: key.into(),
            value: b"42".to_vec(),
            before: None,
        };
        let batch = Batch {
            source: uuid,
            items: vec![tideline_connectors::Item::Txn(tideline_wal::Transaction {
                offset: tideline_wal::Offset::new(2).unwrap(),
                gtid: tideline_wal::Gtid::new(uuid, 2).unwrap(),
                timestamp_us: 0,
                ops: vec![put("a"), put("b")],
            })],
            checkpoint: b"after batch 2".to_vec(),
        };
        let e = sink.write(&batch).await.expect_err("refused by the index");
        assert!(
            matches!(&e, SinkError::Hold(m) if m.contains(&format!("{name}_one_value"))),
            "{e}"
        );
        assert_eq!(
            position(&db, &name).await.as_deref(),
            Some(&b"after batch 1"[..])
        );
    });
    rt.block_on(drop_tables(&db, &format!("{name}_"), &name));
}

fn wait_until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_dropped_connection_is_retried_caught_up_and_shown_in_status_and_metrics() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let dir = tempfile::tempdir().unwrap();
    let name = sinkkit::unique("pgout");
    let file = sinkkit::pipeline_file(
        dir.path(),
        &name,
        &format!(
            "name = \"{name}\"\n[source]\nfrom = \"earliest\"\n\
             trees = [\"users\"]\n[sink]\nkind = \"postgres\"\nurl = \"{URL}\"\ntable = \
             \"{name}_{{tree}}\"\ncolumns = {{ email = \"/email\" }}\n"
        ),
    );
    let node = common::Node::start_with(
        &dir.path().join("node"),
        0,
        &["--http", "127.0.0.1:0", "--connect", file.to_str().unwrap()],
    );
    let count = |n: i64| {
        let sql = format!("SELECT count(*) FROM \"{name}_users\" WHERE email IS NOT NULL");
        move || -> Option<()> {
            let c: i64 = rt_block(db_query_one(&sql))?;
            (c == n).then_some(())
        }
    };
    for i in 0..5 {
        let out = node.run(&[
            "put",
            "--tree",
            "users",
            &format!("u{i}"),
            &format!("{{\"email\":\"u{i}@x\"}}"),
        ]);
        assert!(out.status.success());
    }
    wait_until(30, "5 rows in PostgreSQL", count(5));
    // The server drops the sink's connection (as a restart or a failover would).
    let killed: i64 = rt
        .block_on(db.query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("tideline {name}")],
        ))
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "the pipeline's one backend");
    for i in 5..10 {
        let out = node.run(&[
            "put",
            "--tree",
            "users",
            &format!("u{i}"),
            &format!("{{\"email\":\"u{i}@x\"}}"),
        ]);
        assert!(out.status.success());
    }
    wait_until(30, "10 rows in PostgreSQL after the outage", count(10));
    let p = wait_until(10, "the outage in status", || {
        let s = common::status(&node);
        let p = s["pipelines"][0].clone();
        (p["outages"].as_u64() >= Some(1) && p["state"] == "running" && p["lag_txns"] == 0)
            .then_some(p)
    });
    assert_eq!(p["name"], name.as_str());
    assert!(p["errors"].as_u64() >= Some(1), "{p}");
    assert!(p["last_error"].is_null(), "cleared once stored again: {p}");
    let admin = node.admin.clone().expect("admin address");
    wait_until(10, "pipeline series in /metrics", || {
        let body = http_get(&admin, "/metrics");
        let want = format!("tideline_pipeline_outages_total{{pipeline=\"{name}\"}} 1");
        (body.contains(&want)
            && body.contains(&format!(
                "tideline_pipeline_state{{pipeline=\"{name}\",state=\"running\"}} 1"
            ))
            && body.contains("tideline_pipeline_lag_txns"))
        .then_some(())
    });
    let page = http_get(&admin, "/");
    assert!(
        page.contains(&name) && page.contains("class=\"pipeline\""),
        "the overview lists the pipeline"
    );
    let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{name}_users\"")));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin listener");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the answer");
    raw
}

fn rt_block<T>(f: impl std::future::Future<Output = Option<T>>) -> Option<T> {
    tokio::runtime::Handle::current().block_on(f)
}

async fn db_query_one(sql: &str) -> Option<i64> {
    let (c, conn) = tokio_postgres::connect(URL, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    c.query_one(sql, &[]).await.ok().map(|r| r.get(0))
}

#[test]
fn bad_files_and_unreachable_or_refusing_servers_give_one_clear_line_and_no_position() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(&dir.path().join("src"));
    let name = sinkkit::unique("pgbad");
    let body = |url: &str| {
        format!(
            "name = \"{name}\"\n[source]\nnode = \"{}\"\nsecrets = \"{}\"\n[sink]\nkind = \
             \"postgres\"\nurl = \"{url}\"\ntable = \"{name}_{{tree}}\"\n",
            source.addr,
            source.secrets.display()
        )
    };
    let tideline = |args: &[&str]| Command::new(common::bin()).args(args).output().unwrap();
    // A key no sink knows: exit 1, one line naming the file, the line and the key.
    let bad = sinkkit::pipeline_file(dir.path(), "bad", &format!("{}batch_rows = 5\n", body(URL)));
    let out = tideline(&["connect", "--config", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("line 9") && err.contains("batch_rows"),
        "{err}"
    );
    // Nothing listens on port 1: --check fails naming the sink; connect retries, stores nothing.
    let down = sinkkit::pipeline_file(
        dir.path(),
        "down",
        &body("postgres://postgres@127.0.0.1:1/test"),
    );
    let out = tideline(&["connect", "--check", "--config", down.to_str().unwrap()]);
    let verdict = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{verdict}");
    assert!(
        verdict.contains(&format!(
            "pipeline {name}: FAILED: sink postgres 127.0.0.1:1/test"
        )),
        "{verdict}"
    );
    // A role the server refuses: held for an operator, with what to do.
    let refused = sinkkit::pipeline_file(
        dir.path(),
        "refused",
        &body("postgres://nosuchrole@127.0.0.1:5432/test"),
    );
    let out = tideline(&["connect", "--check", "--config", refused.to_str().unwrap()]);
    let verdict = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{verdict}");
    assert!(
        verdict.contains("nosuchrole") && verdict.contains("fix the user"),
        "{verdict}"
    );
    // Running against the unreachable sink: status lines say retrying; no position anywhere.
    let log = dir.path().join("down.log");
    let mut child = sinkkit::connect(&down, &log, false);
    wait_until(20, "a retrying status line", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("retrying") && l.contains("127.0.0.1:1"))
            .map(|_| ())
    });
    sinkkit::kill9(&mut child, &log);
    assert!(
        rt.block_on(position(&db, &name)).is_none(),
        "no position stored"
    );
    // The good file checks out and moves nothing either.
    let good = sinkkit::pipeline_file(dir.path(), "good", &body(URL));
    let out = tideline(&["connect", "--check", "--config", good.to_str().unwrap()]);
    let verdict = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{verdict}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        verdict.contains("ok") && verdict.contains("holds no position"),
        "{verdict}"
    );
    assert!(
        rt.block_on(position(&db, &name)).is_none(),
        "--check stores no position"
    );
}

/// A bootstrap that cannot resume (the source purged the log its stored progress needs)
/// starts again from scratch into tables holding a partial copy: the table of a tree dropped
/// at the source meanwhile must not keep its rows (the new copy's chunks never name that
/// tree), nor the other tables rows deleted meanwhile.
#[test]
fn a_copy_that_cannot_resume_starts_again_without_leaving_stale_rows() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start_purgeable(&dir.path().join("src"));
    let _guard = source.runtime.enter();
    let db = pg();
    let name = sinkkit::unique("pgrecopy");
    let prefix = format!("{name}_");
    let file = sinkkit::pipeline_file(
        dir.path(),
        &name,
        &format!(
            "name = \"{name}\"\n\n[source]\nnode = \"{}\"\nsecrets = \"{}\"\nfrom = \
             \"bootstrap\"\n\n[sink]\nkind = \"postgres\"\nurl = \"{URL}\"\ntable = \
             \"{prefix}{{tree}}\"\n",
            source.addr,
            source.secrets.display()
        ),
    );
    let log = dir.path().join("connect.log");
    let rt = &source.runtime;
    sinkkit::copy_that_cannot_resume(
        &source,
        &file,
        &log,
        || rt.block_on(position(&db, &name)),
        || {
            sinkkit::RESTART_TREES
                .iter()
                .map(|tree| {
                    let rows = rt.block_on(rows(&db, &format!("{prefix}{tree}")));
                    (tree.to_string(), rows)
                })
                .collect()
        },
    );
    for tree in sinkkit::RESTART_TREES {
        let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{prefix}{tree}\"")));
    }
    let _ = rt.block_on(db.execute(
        "DELETE FROM tideline_positions WHERE pipeline = $1",
        &[&name],
    ));
}

/// `begin_copy` of a copy that starts again from scratch: the tables of the trees the earlier
/// copy wrote are truncated with storing the new copy's position, in one transaction; other
/// tables keep their rows. A position moved by another writer stops it before it truncates
/// anything. Trees not recorded (a position stored by an earlier version) hold the pipeline
/// until an operator has removed the position.
#[test]
fn begin_copy_truncates_the_earlier_copys_tables_or_holds_when_it_does_not_know_them() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pgbegin");
    let prefix = format!("{name}_");
    let trees = |t: &[&str], prefix: Option<&str>| EarlierCopy::Trees {
        trees: t.iter().map(|t| t.to_string()).collect(),
        prefix: prefix.map(|p| p.as_bytes().to_vec()),
    };
    let count = |tree: &str| {
        let db = &db;
        let table = format!("{prefix}{tree}");
        async move { rows(db, &table).await.len() }
    };
    rt.block_on(async {
        let mut sink = counter_sink(&name, URL);
        assert_eq!(sink.open().await.expect("open"), None);
        let written = [("t", "a"), ("t", "b"), ("u", "a"), ("v", "a")];
        sink.write(&sinkkit::puts(&written, "copy 1, step 1"))
            .await
            .expect("a step of the earlier copy");
        sink.begin_copy(b"copy 2", &trees(&["t", "u", "never-written"], None))
            .await
            .expect("the earlier copy's tables emptied");
        assert_eq!(
            (count("t").await, count("u").await, count("v").await),
            (0, 0, 1),
            "only the tree not named keeps its rows"
        );
        assert_eq!(position(&db, &name).await.as_deref(), Some(&b"copy 2"[..]));
        // A pipeline limited to keys starting with `p`: the others are not its own.
        let written = [("t", "p1"), ("t", "q1")];
        sink.write(&sinkkit::puts(&written, "copy 2, step 1"))
            .await
            .expect("the new copy writes after its first checkpoint");
        sink.begin_copy(b"copy 3", &trees(&["t"], Some("p")))
            .await
            .expect("the earlier copy's rows with its prefix cleared");
        assert_eq!(
            rows(&db, &format!("{prefix}t"))
                .await
                .into_keys()
                .collect::<Vec<_>>(),
            [b"q1".to_vec()]
        );
        // Another writer moved the position: nothing is truncated.
        db.execute(
            "UPDATE tideline_positions SET checkpoint = 'elsewhere' WHERE pipeline = $1",
            &[&name],
        )
        .await
        .expect("move the position");
        let e = sink
            .begin_copy(b"copy 4", &trees(&["t", "v"], None))
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, SinkError::Fatal(m) if m.contains("another connector wrote")),
            "{e}"
        );
        assert_eq!((count("t").await, count("v").await), (1, 1));

        // Trees not recorded: held, until the operator empties the tables and removes the
        // position.
        let mut sink = counter_sink(&name, URL);
        assert_eq!(
            sink.open().await.expect("open").as_deref(),
            Some(&b"elsewhere"[..])
        );
        let e = sink
            .begin_copy(b"copy 4", &EarlierCopy::Unrecorded)
            .await
            .expect_err("held");
        assert!(
            matches!(&e, SinkError::Hold(m) if m.contains("cannot resume")
                && m.contains("DELETE FROM") && m.contains(&name)),
            "{e}"
        );
        assert_eq!(
            (count("t").await, count("v").await),
            (1, 1),
            "nothing emptied"
        );
        for tree in ["t", "u", "v"] {
            db.batch_execute(&format!("TRUNCATE \"{prefix}{tree}\""))
                .await
                .expect("the operator empties the tables");
        }
        db.execute(
            "DELETE FROM tideline_positions WHERE pipeline = $1",
            &[&name],
        )
        .await
        .expect("the operator removes the position");
        sink.begin_copy(b"copy 4", &EarlierCopy::Unrecorded)
            .await
            .expect("the copy begins once the position is gone");
        sink.write(&sinkkit::puts(&[("t", "d")], "copy 4, step 1"))
            .await
            .expect("the new copy writes into the emptied tables");
        assert_eq!(count("t").await, 1);
    });
    for tree in ["t", "u", "v"] {
        let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{prefix}{tree}\"")));
    }
    let _ = rt.block_on(db.execute(
        "DELETE FROM tideline_positions WHERE pipeline = $1",
        &[&name],
    ));
}

/// A sink of pipeline `name` writing tables `{name}_{tree}` by `method`, with these merge
/// operators.
fn merging_sink(name: &str, method: WriteMethod, operators: &[(&str, &str)]) -> PostgresSink {
    let mut cfg = PostgresConfig::new(URL);
    cfg.table = format!("{name}_{{tree}}");
    cfg.method = method;
    let mut sink = PostgresSink::new(cfg, name).expect("sink settings");
    sink.set_merge_operators(
        &operators
            .iter()
            .map(|(t, o)| (t.to_string(), o.to_string()))
            .collect(),
    );
    sink
}

/// Batch `seq` of one transaction of `ops` from a fixed source; its checkpoint names it.
fn ops_batch(seq: u64, ops: Vec<tideline_wal::Op>) -> Batch {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    Batch {
        source: uuid,
        items: vec![tideline_connectors::Item::Txn(tideline_wal::Transaction {
            offset: tideline_wal::Offset::new(seq).unwrap(),
            gtid: tideline_wal::Gtid::new(uuid, seq).unwrap(),
            timestamp_us: 0,
            ops,
        })],
        checkpoint: format!("after batch {seq}").into_bytes(),
    }
}

/// A merge in a later batch starts from the bytes the source's value has, not from jsonb's
/// rendering of them (`{"e": 1}` for `{"e":1}\n`, `1000` for `1e3`): otherwise the sink's
/// value differs from the source's, and by where the batches happened to be cut. Both keys
/// get `append` merges in two batches; each row must end with the source's exact bytes,
/// whichever way the rows are written.
#[test]
fn a_merge_in_a_later_batch_starts_from_the_exact_bytes_of_the_stored_value() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    for method in [WriteMethod::Unnest, WriteMethod::Copy] {
        merges_start_from_the_exact_bytes(method);
    }
}

fn merges_start_from_the_exact_bytes(method: WriteMethod) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pgexact");
    let append = tideline_engine::MergeOperator::from_name("append").expect("append");
    let operands: [(&str, [&[u8]; 2]); 2] = [
        ("k", [b"{\"e\":1}\n", b"{\"e\":2}\n"]),
        ("n", [b"1e3", b"5"]),
    ];
    rt.block_on(async {
        let mut sink = merging_sink(&name, method, &[("log", "append")]);
        assert_eq!(sink.open().await.expect("open"), None);
        for (i, seq) in [(0, 1), (1, 2)] {
            let ops = operands
                .iter()
                .map(|(key, ops)| tideline_wal::Op::Merge {
                    tree: "log".into(),
                    key: key.as_bytes().to_vec(),
                    operand: ops[i].to_vec(),
                })
                .collect();
            sink.write(&ops_batch(seq, ops))
                .await
                .unwrap_or_else(|e| panic!("batch {seq}: {e}"));
        }
        for (key, ops) in operands {
            let want = append.resolve(Some(&append.resolve(None, ops[0])), ops[1]);
            let row = db
                .query_one(
                    &format!("SELECT value::text, value_bytes FROM \"{name}_log\" WHERE key = $1"),
                    &[&key],
                )
                .await
                .expect("the merged row");
            let (json, bytes): (Option<String>, Option<Vec<u8>>) = (row.get(0), row.get(1));
            let stored = bytes.clone().or(json.clone().map(String::into_bytes));
            assert_eq!(
                stored.as_deref().map(String::from_utf8_lossy),
                Some(String::from_utf8_lossy(&want)),
                "{method:?}: key {key} after two batches of `append` (value {json:?}, \
                 value_bytes {:?})",
                bytes.as_deref().map(String::from_utf8_lossy)
            );
            if serde_json::from_slice::<serde_json::Value>(&want).is_ok() {
                assert!(json.is_some(), "{method:?}: key {key} keeps its jsonb view");
            }
        }
    });
    let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{name}_log\"")));
    let _ = rt.block_on(db.execute(
        "DELETE FROM tideline_positions WHERE pipeline = $1",
        &[&name],
    ));
}

/// A key longer than PostgreSQL's btree takes (index rows up to 2,704 bytes; text that does
/// not compress) cannot be the table's primary key. The pipeline is held with a message that
/// says so and how to leave such keys out, not one telling the operator to fix or drop the
/// table (which the sink would re-create for the same key).
#[test]
fn a_key_too_long_for_the_primary_key_index_holds_the_pipeline_naming_the_limit() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let db = pg();
    let name = sinkkit::unique("pglongkey");
    let mut rng = StdRng::seed_from_u64(sinkkit::seed("postgres long key"));
    let key: String = (0..4000)
        .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
        .collect();
    rt.block_on(async {
        let mut sink = merging_sink(&name, WriteMethod::Unnest, &[]);
        assert_eq!(sink.open().await.expect("open"), None);
        let e = sink
            .write(&ops_batch(
                1,
                vec![tideline_wal::Op::Put {
                    tree: "t".into(),
                    key: key.into_bytes(),
                    value: b"1".to_vec(),
                    before: None,
                }],
            ))
            .await
            .expect_err("a key the primary key's index cannot take");
        assert!(
            matches!(&e, SinkError::Hold(m) if m.contains("4000 bytes")
                && m.contains("`prefix`") && m.contains("`trees`")),
            "{e}"
        );
        assert_eq!(position(&db, &name).await, None, "nothing stored");
    });
    let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{name}_t\"")));
    let _ = rt.block_on(db.execute(
        "DELETE FROM tideline_positions WHERE pipeline = $1",
        &[&name],
    ));
}

/// Two pipelines share a table, each with its own key prefix (`us:` and `eu:`): a copy of one
/// must leave the other's rows. The source cuts a copy's chunks over the whole tree, at any
/// key (also one that is not text), and the sink clears each chunk's range: a copy of `eu:`
/// in small chunks must clear only keys of `eu:`, and never name a key outside it. Guards
/// against a prefixed copy that deleted another pipeline's rows, or held for good on a
/// boundary key of no prefix of it.
#[test]
fn a_prefixed_copy_leaves_the_rows_of_another_prefix_in_a_shared_table() {
    if !sinkkit::service_up("PostgreSQL", PG) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let source = SourceNode::start(dir.path());
    let _guard = source.runtime.enter();
    let rt = &source.runtime;
    let db = pg();
    let name = sinkkit::unique("pgprefix");
    let table = format!("{name}_shared");
    source
        .engine
        .create_tree("shared", None)
        .expect("create the shared tree");
    // About 300 bytes a row: 16 KiB chunks cut each prefix, and the keys that are not text
    // between them, several times.
    let pad = "x".repeat(280);
    let keys: Vec<Vec<u8>> = (0..150)
        .flat_map(|i| {
            [
                format!("eu:{i:03}").into_bytes(),
                format!("us:{i:03}").into_bytes(),
                [&b"\xfe"[..], format!("{i:03}").as_bytes()].concat(),
            ]
        })
        .collect();
    for key in &keys {
        let value = format!("{{\"pad\":\"{pad}\"}}");
        source
            .engine
            .put("shared", key, value.as_bytes())
            .expect("put a row");
    }
    let of = |rows: &BTreeMap<Vec<u8>, Norm>, prefix: &str| {
        rows.keys()
            .filter(|k| k.starts_with(prefix.as_bytes()))
            .count()
    };
    let run = |prefix: &str, chunk_bytes: u64| {
        let pipeline = format!("{name}-{}", prefix.trim_end_matches(':'));
        let client = tideline_stream::ClientConfig::new(
            tideline_stream::tls::load_client_dir(&source.secrets).expect("client secrets"),
        );
        let mut cfg = tideline_connectors::PipelineConfig::new(&pipeline, &source.addr, client);
        cfg.from = tideline_connectors::StartFrom::Bootstrap;
        cfg.filter.prefix = Some(prefix.as_bytes().to_vec());
        cfg.chunk_bytes = chunk_bytes;
        cfg.retry_min = Duration::from_millis(50);
        cfg.retry_max = Duration::from_millis(500);
        let mut sink_cfg = PostgresConfig::new(URL);
        sink_cfg.table = format!("{name}_{{tree}}");
        let sink = PostgresSink::new(sink_cfg, &pipeline).expect("sink settings");
        let (status, task) = tideline_connectors::pipeline::spawn(cfg, Box::new(sink));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let rows = rt.block_on(rows(&db, &table));
            let running = status.get().state == tideline_connectors::PipelineState::Running;
            if running && of(&rows, prefix) == 150 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the copy of {prefix} did not finish: {} rows of it, {} of us:; status {}",
                of(&rows, prefix),
                of(&rows, "us:"),
                status.get().to_json()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        task.abort();
        pipeline
    };
    let us = run("us:", 1 << 20);
    let eu = run("eu:", 16 << 10);
    let rows = rt.block_on(rows(&db, &table));
    assert_eq!(
        (of(&rows, "us:"), of(&rows, "eu:"), rows.len()),
        (150, 150, 300),
        "rows of us:, of eu:, of all after the copy of eu:"
    );
    let _ = rt.block_on(db.batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\"")));
    for pipeline in [us, eu] {
        let _ = rt.block_on(db.execute(
            "DELETE FROM tideline_positions WHERE pipeline = $1",
            &[&pipeline],
        ));
    }
}
