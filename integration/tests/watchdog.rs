//! The fail-stop promise of docs/OPERATIONS.md ("A failed fsync or a dead critical task stops
//! it with exit code 2 and a line saying why") and docs/ARCHITECTURE.md (the watchdog), for a
//! dead task rather than a full disk (that is `disk_full.rs`).
//!
//! Scenario: a node started with the test-only switch `TIDELINE_TESTING_KILL_TASK=TASK` (the
//! `tideline` package's `testing` feature, which builds that include this package's tests turn
//! on) takes a commit, and then TASK (the engine's applier or checkpointer, or the log's writer
//! thread) panics the way a bug would kill it, or (`quic-server`) the QUIC server's accept loop
//! ends, its task aborted. The node must exit by itself with code 2 and an
//! `error: fail-stop:` line naming the task, within the watchdog's tick plus shutdown; after a
//! restart without the switch, every acknowledged put is there and writes go on.
//!
//! And a failure during the shutdown: SIGTERM arrives while the node is busy in retention
//! (the test-only `TIDELINE_TESTING_RETENTION_PAUSE_MS` holds it there), a put reaches the
//! node before it closes, and the applier dies on it. The watchdog no longer ticks, yet the
//! node must still exit 2 with its `error: fail-stop:` line, not report a clean stop.
//!
//! Guards against: a node that keeps answering (status, tails) with a dead applier or log
//! writer, so commits hang for ever while the node looks healthy; and a node whose accept loop
//! died, which takes no connection any more yet keeps running (its replicas' and pipelines'
//! tasks, its HTTP admin) instead of stopping so that a supervisor restarts it.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Node, send_signal};

/// Longest the test waits for the node to stop by itself (a guard against a hang: the
/// watchdog ticks every 100 ms).
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// Runs `put KEY VALUE` against `node` in the background; the handle yields its output.
fn put_in_background(node: &Node, key: &str) -> std::thread::JoinHandle<Output> {
    let mut cmd: Command = node.cli();
    cmd.args(["put", "--node", &node.addr, key, "value"])
        .stdin(Stdio::null());
    std::thread::spawn(move || cmd.output().expect("run tideline put"))
}

fn kill_task_round(task: &str, thread_words: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start_env(
        None,
        &data,
        "127.0.0.1:0",
        &[],
        &[("TIDELINE_TESTING_KILL_TASK", task)],
    );
    assert!(
        node.wait_stderr(
            "TESTING: TIDELINE_TESTING_KILL_TASK armed",
            Duration::from_secs(10)
        )
        .is_some(),
        "the node did not arm TIDELINE_TESTING_KILL_TASK: the tideline binary was built without \
         its `testing` feature; build it with the tests (`scripts/test`, or `cargo build \
         --workspace --bins --tests`)"
    );

    // The first put makes the log non-empty (the engine's threads die then); the log writer
    // dies before the second one's batch. The second starts once the first has ended
    // (acknowledged, or failed with the node): started together, the two could share the
    // first batch, and the log writer would never reach a second one.
    let started = Instant::now();
    let first = put_in_background(&node, "k1");
    while !first.is_finished() && started.elapsed() < EXIT_WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = put_in_background(&node, "k2");
    let status = node.wait_timeout(EXIT_WAIT).unwrap_or_else(|| {
        panic!(
            "{task} killed: the node still runs {EXIT_WAIT:?} later; its stderr: {:#?}",
            node.stderr_lines()
        )
    });
    let lines = node.stderr_lines();
    assert_eq!(
        status.code(),
        Some(2),
        "{task} killed: exit status {status}, expected code 2; stderr: {lines:#?}"
    );
    let fail_stop = lines
        .iter()
        .find(|l| l.starts_with("error: fail-stop:"))
        .unwrap_or_else(|| panic!("{task} killed: no `error: fail-stop:` line: {lines:#?}"));
    assert!(
        fail_stop.contains(thread_words),
        "{task} killed: the fail-stop line should name the {thread_words}: {fail_stop}"
    );
    eprintln!(
        "{task} killed: exit 2 after {:?}: {fail_stop}",
        started.elapsed()
    );

    // The puts end (the node is gone); those acknowledged must survive the restart.
    let acked: Vec<&str> = [("k1", first), ("k2", second)]
        .into_iter()
        .filter_map(|(k, h)| h.join().unwrap().status.success().then_some(k))
        .collect();
    let node = Node::start(&data, 0);
    for k in &acked {
        let out = node.run(&["get", k]);
        assert!(
            out.status.success(),
            "{task}: acknowledged put {k} lost after the restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = node.run(&["put", "after", "v"]);
    assert!(
        out.status.success(),
        "{task}: no write after the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_dead_applier_stops_the_node_with_exit_code_2() {
    kill_task_round("applier", "applier thread");
}

#[test]
fn a_dead_checkpointer_stops_the_node_with_exit_code_2() {
    kill_task_round("checkpointer", "checkpointer thread");
}

#[test]
fn a_dead_log_writer_stops_the_node_with_exit_code_2() {
    kill_task_round("log-writer", "log writer thread");
}

#[test]
fn a_dead_quic_server_task_stops_the_node_with_exit_code_2() {
    kill_task_round("quic-server", "QUIC server task");
}

/// The shutdown's own check: the loop has stopped on SIGTERM (the watchdog ticks no more)
/// when the applier dies, while the node waits for its retention run before it closes.
#[test]
fn a_failure_during_shutdown_still_exits_with_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start_env(
        None,
        &data,
        "127.0.0.1:0",
        &[],
        &[
            ("TIDELINE_TESTING_KILL_TASK", "applier"),
            ("TIDELINE_TESTING_RETENTION_PAUSE_MS", "3000"),
        ],
    );
    assert!(
        node.wait_stderr("retention paused", Duration::from_secs(10))
            .is_some(),
        "the node never announced its retention pause: build the tideline binary with its \
         `testing` feature; its stderr: {:#?}",
        node.stderr_lines()
    );
    send_signal(node.pid(), "TERM");
    // The server still answers until the retention run ends; this put kills the applier.
    let put = put_in_background(&node, "k1");
    let status = node.wait_timeout(EXIT_WAIT).unwrap_or_else(|| {
        panic!(
            "the node still runs {EXIT_WAIT:?} after SIGTERM; its stderr: {:#?}",
            node.stderr_lines()
        )
    });
    let _ = put.join();
    let lines = node.stderr_lines();
    assert!(
        lines.iter().any(|l| l.contains("applier")),
        "the applier never died (the put did not reach the node before it closed): {lines:#?}"
    );
    assert_eq!(
        status.code(),
        Some(2),
        "the applier died during the shutdown: exit status {status}, expected the fail-stop \
         code 2; stderr: {lines:#?}"
    );
    let fail_stop = lines
        .iter()
        .find(|l| l.starts_with("error: fail-stop:"))
        .unwrap_or_else(|| panic!("no `error: fail-stop:` line: {lines:#?}"));
    assert!(
        fail_stop.contains("applier thread"),
        "the fail-stop line should name the applier thread: {fail_stop}"
    );
}
