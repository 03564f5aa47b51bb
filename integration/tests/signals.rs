//! Stopping `serve` with a signal while it is busy: docs/OPERATIONS.md says SIGTERM or Ctrl-C
//! (SIGINT) stops the node cleanly with exit code 0.
//!
//! Scenario: a node started with the test-only switch `TIDELINE_TESTING_RETENTION_PAUSE_MS`
//! (the `tideline` package's `testing` feature) sleeps inside each retention run, as on a disk
//! whose fsyncs are slow; the first run starts as soon as the node serves. SIGINT arrives while
//! that run sleeps. The node must stop by itself with exit 0 and its clean-stop line.
//!
//! Guards against: a serve loop that listens for Ctrl-C only while it waits in its `select!`
//! and awaits retention inside it, so that a SIGINT landing during retention is consumed with
//! no listener and lost: the node ignores Ctrl-C and runs on until interrupted again.

mod common;

use std::time::Duration;

use common::{Node, send_signal};

/// How long the retention run sleeps after the node announces it.
const PAUSE_MS: &str = "3000";

/// Longest the test waits for the node to stop: the pause (the run is waited for before the
/// log closes), plus a generous shutdown.
const EXIT_WAIT: Duration = Duration::from_secs(20);

#[test]
fn sigint_during_retention_stops_the_node_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let mut node = Node::start_env(
        None,
        &data,
        "127.0.0.1:0",
        &[],
        &[("TIDELINE_TESTING_RETENTION_PAUSE_MS", PAUSE_MS)],
    );
    assert!(
        node.wait_stderr("retention paused", Duration::from_secs(10))
            .is_some(),
        "the node never announced its retention pause: the tideline binary was built without \
         its `testing` feature; build it with `cargo build -p tideline --bin tideline \
         --features tideline/testing`; its stderr: {:#?}",
        node.stderr_lines()
    );
    send_signal(node.pid(), "INT");
    let Some(status) = node.wait_timeout(EXIT_WAIT) else {
        let lines = node.stderr_lines();
        send_signal(node.pid(), "TERM");
        let _ = node.wait_timeout(EXIT_WAIT);
        panic!(
            "SIGINT sent during a retention run: the node still runs {EXIT_WAIT:?} later (the \
             signal was lost); its stderr: {lines:#?}"
        );
    };
    let lines = node.stderr_lines();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGINT during retention: exit status {status}, expected 0; stderr: {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("tideline stopped cleanly")),
        "no clean-stop line after SIGINT; stderr: {lines:#?}"
    );
}
