//! One writer per log. A second process that opens a live node's log for writing — `demo`,
//! `bench`, a second `serve` — must fail at once and name the process that holds it, and the
//! node's log must stay intact; read-only tools keep working beside the node. Guards against
//! the failure where `tideline demo` (whose default directory used to be the README node's
//! `./data`) appended into a running node's log, reused its offsets and GTIDs, and left a log
//! that neither `log verify` nor the node itself could open.

mod common;

use common::Node;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_second_writer_is_refused_and_the_live_log_stays_intact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, 0);
    for i in 0..5 {
        let out = node.run(&["put", &format!("k{i}"), "v"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let pid = node.pid().to_string();

    // `demo` on the node's directory: refused before it opens anything.
    let out = node
        .cli()
        .args(["demo", "--txns", "100", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "demo wrote into a live node's log: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("holds a node"),
        "demo's refusal should say why: {}",
        stderr(&out)
    );

    // A second `serve` on the same directory: refused by the log's writer lock, naming the
    // process that holds it.
    let out = node
        .cli()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data")
        .arg(&data)
        .env("TIDELINE_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second serve started");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("in use by PID {pid}")),
        "the error should name the node's PID {pid}: {err}"
    );

    // Read-only tools still work beside the node.
    let out = node
        .cli()
        .args(["log", "verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "log verify beside the node: {}",
        stderr(&out)
    );

    // The node goes on with its own numbering: the next commit is offset 6, GTID :6.
    let out = node.run(&["put", "k5", "v"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let committed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(committed["offset"], 6, "{committed}");
    assert!(
        committed["gtid"].as_str().unwrap().ends_with(":6"),
        "{committed}"
    );

    // And after a restart the whole log verifies and holds exactly the node's 6 transactions.
    node.kill9();
    let out = node
        .cli()
        .args(["log", "verify", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "log verify: {}", stderr(&out));
    let node = Node::start(&data, 0);
    let status = common::status(&node);
    assert_eq!(status["last_offset"], 6, "{status}");
}

#[test]
fn demo_uses_a_fresh_directory_and_refuses_one_that_holds_a_node() {
    let dir = tempfile::tempdir().unwrap();
    // With no --data, demo runs in a temporary directory of its own, not ./data.
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--txns", "50"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "demo: {}", stderr(&out));
    assert!(
        !dir.path().join("data").exists(),
        "demo created ./data: {}",
        stderr(&out)
    );

    // A stopped node's directory is refused too: demo must not append to a node's log.
    let data = dir.path().join("node");
    let mut node = Node::start(&data, 0);
    assert!(node.run(&["put", "k", "v"]).status.success());
    node.kill9();
    let out = std::process::Command::new(common::bin())
        .args(["demo", "--txns", "50", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success(), "demo used a node's directory");
    assert!(
        stderr(&out).contains("holds a node"),
        "demo's refusal should say why: {}",
        stderr(&out)
    );
}
