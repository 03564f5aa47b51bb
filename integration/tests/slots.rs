//! `tideline slot list|drop` as an operator uses them: a slot left by a consumer that is gone
//! holds the log (retention keeps everything from its restart offset) until it is dropped;
//! the node refuses to drop a slot a live consumer uses, and says which slots it has when the
//! name is wrong.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Node, load};

fn slot_list(node: &Node) -> Vec<Value> {
    let out = node.run(&["slot", "list", "--json"]);
    assert!(
        out.status.success(),
        "slot list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("slot list --json is JSON") {
        Value::Array(a) => a,
        other => panic!("slot list --json is not an array: {other}"),
    }
}

fn first_offset(node: &Node) -> u64 {
    common::status(node)["first_offset"]
        .as_u64()
        .expect("first_offset")
}

#[test]
fn a_dropped_slot_lets_retention_go_and_a_live_one_is_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        0,
        &["--log-segment-bytes", "4096", "--log-retain-bytes", "0"],
    );
    load(&node, 1, 100, 1); // offsets 1..=100, several segments
    let checkpoint = dir.path().join("s.cp");
    let mut tail = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--slot", "s", "--limit", "1000"])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    for _ in 0..100 {
        lines.next().expect("tail output").expect("UTF-8");
    }
    // The slot exists and the consumer is live: dropping it is refused, naming the consumer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot_list(&node)
        .iter()
        .all(|s| s["name"] != "s" || s["restart_offset"] != 101)
    {
        assert!(
            Instant::now() < deadline,
            "the slot never moved to 101: {:?}",
            slot_list(&node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = node.run(&["slot", "drop", "s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a live slot was dropped: {err}");
    assert!(
        err.contains("slot s is in use by a live subscription")
            && err.contains("stop that consumer"),
        "{err}"
    );
    let text = node.run(&["slot", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&text.stdout),
        "s\trestart_offset 101\tactive\n"
    );

    // The consumer dies; its slot keeps the log from 101 on while the log goes on.
    tail.kill().unwrap();
    tail.wait().unwrap();
    load(&node, 101, 300, 1);
    // A killed consumer's connection ends at the node's idle timeout: until then the drop is
    // refused as above. Then it goes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let dropped = loop {
        let out = node.run(&["slot", "drop", "s"]);
        if out.status.success() {
            break out;
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("in use by a live subscription"), "{err}");
        assert!(
            Instant::now() < deadline,
            "the dead consumer's slot was never released: {err}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let v: Value = serde_json::from_slice(&dropped.stdout).expect("slot drop prints JSON");
    assert_eq!(v["dropped"], "s");
    assert_eq!(v["restart_offset"], 101);
    assert!(slot_list(&node).is_empty(), "{:?}", slot_list(&node));
    assert_eq!(
        String::from_utf8_lossy(&node.run(&["slot", "list"]).stdout),
        "no slots\n"
    );
    // Nothing holds offset 101 any more: retention (every 10 s) removes the segments past it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while first_offset(&node) <= 101 {
        assert!(
            Instant::now() < deadline,
            "retention still keeps offset 101 after the drop: first offset {}",
            first_offset(&node)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A wrong name says so (and that the node has no slots).
    let out = node.run(&["slot", "drop", "s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no slot named s: this node holds no slots"),
        "{err}"
    );
}
