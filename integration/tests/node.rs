//! The node as users run it: real `tideline serve` processes and CLI commands over loopback
//! QUIC. Covers the CLI contract (tails from every start position deliver exactly the expected
//! transactions, in order, once; `get` of a missing key exits 1), resuming a tail across a
//! SIGKILL of the server and across a restart of the consumer from its checkpoint file, a
//! stalled consumer that must not hold up a fast one or the writers nor grow server memory, and
//! clear refusals of a wrong token, an unreachable node and bad positions.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Node, bin, free_port, load, rss_kib};

fn tail_lines(node: &Node, from: &str, limit: u64) -> Vec<Value> {
    let out = node.run(&["tail", "--from", from, "--limit", &limit.to_string()]);
    assert!(
        out.status.success(),
        "tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("tail prints UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("tail prints JSON lines"))
        .collect()
}

fn offsets(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["offset"].as_u64().expect("offset"))
        .collect()
}

#[test]
fn cli_tails_from_every_position_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), free_port());
    load(&node, 1, 1000, 1); // 1,000 transactions of one put each
    let status: Value = serde_json::from_slice(&node.run(&["status"]).stdout).unwrap();
    let uuid = status["server_uuid"].as_str().unwrap().to_string();
    assert_eq!(status["gtid_executed"], format!("{uuid}:1-1000"));
    assert_eq!(status["last_offset"], 1000);

    assert_eq!(
        offsets(&tail_lines(&node, "earliest", 1000)),
        (1..=1000).collect::<Vec<_>>()
    );
    assert_eq!(
        offsets(&tail_lines(&node, "offset:501", 500)),
        (501..=1000).collect::<Vec<_>>()
    );
    let by_gtid = tail_lines(&node, &format!("gtid:{uuid}:1-600"), 400);
    assert_eq!(offsets(&by_gtid), (601..=1000).collect::<Vec<_>>());
    assert_eq!(by_gtid[0]["gtid"], format!("{uuid}:601"));
    assert_eq!(by_gtid[0]["ops"][0]["key"], "key:000601");

    // latest: only transactions committed after the tail subscribed.
    let tail = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "latest", "--limit", "3",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    load(&node, 1001, 1003, 1);
    let out = tail.wait_with_output().unwrap();
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(offsets(&lines), vec![1001, 1002, 1003]);

    // get/scan/del and the missing-key contract.
    let got = node.run(&["get", "key:000007"]);
    assert_eq!(got.stdout, b"value-7");
    let missing = node.run(&["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(missing.stdout.is_empty());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
    assert!(node.run(&["del", "key:000007"]).status.success());
    assert_eq!(node.run(&["get", "key:000007"]).status.code(), Some(1));
    let scan = node.run(&["scan", "--prefix", "key:00001", "--limit", "3"]);
    assert_eq!(
        String::from_utf8(scan.stdout).unwrap(),
        "key:000010\tvalue-10\nkey:000011\tvalue-11\nkey:000012\tvalue-12\n"
    );
}

#[test]
fn tail_resumes_after_kill_9_of_the_node_and_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let port = free_port();
    let mut node = Node::start(&data, port);
    load(&node, 1, 300, 10); // 30 transactions
    let checkpoint = dir.path().join("tail.cp");
    let addr = node.addr.clone();
    let tail = node
        .cli()
        .args([
            "tail", "--node", &addr, "--from", "earliest", "--limit", "60",
        ])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the tail catch up, kill the node hard, restart it, write more.
    std::thread::sleep(Duration::from_millis(1500));
    node.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let node = Node::start(&data, port);
    load(&node, 301, 600, 10); // 30 more transactions
    let out = tail.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        offsets(&lines),
        (1..=60).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );

    // The consumer restarts from its checkpoint: nothing repeated, nothing skipped.
    load(&node, 601, 650, 10); // 5 more
    let out = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--limit", "5",
        ])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .output()
        .unwrap();
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(offsets(&lines), (61..=65).collect::<Vec<_>>());
}

#[test]
fn a_stalled_consumer_blocks_nobody_and_server_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), free_port());
    // ~80 MB of log: far more than any buffer the server may hold for one consumer.
    let value = "x".repeat(10_000);
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", "100"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..8_000 {
            writeln!(stdin, "big:{i:06}\t{value}").unwrap();
        }
    }
    assert!(child.wait().unwrap().success());
    let rss_before = rss_kib(node.pid());

    // A consumer that subscribes and never reads: its stdout pipe fills and it stops.
    let mut stalled = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A fast consumer reads everything, and writers keep committing meanwhile.
    let fast = node.run(&["tail", "--from", "earliest", "--limit", "80"]);
    assert!(fast.status.success());
    assert_eq!(String::from_utf8_lossy(&fast.stdout).lines().count(), 80);
    load(&node, 1, 100, 1);
    let rss_after = rss_kib(node.pid());
    let _ = stalled.kill();
    let _ = stalled.wait();
    assert!(
        rss_after < rss_before + 128 * 1024,
        "server RSS grew from {rss_before} KiB to {rss_after} KiB with one stalled consumer"
    );
}

#[test]
fn wrong_token_unreachable_node_and_bad_positions_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), free_port());
    load(&node, 1, 3, 1);

    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "0000\n").unwrap();
    let out = Command::new(bin())
        .args(["get", "--node", &node.addr, "k"])
        .arg("--ca")
        .arg(node.secrets().join("ca.pem"))
        .arg("--token-file")
        .arg(&bad_token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the token"), "{err}");

    let started = Instant::now();
    let out = node
        .cli()
        .args(["status", "--node", &format!("127.0.0.1:{}", free_port())])
        .args(["--timeout-ms", "1500"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "must give up, not hang"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");

    for (from, expect) in [
        ("garbage", "bad position"),
        ("gtid:not-a-uuid:1", "bad position"),
        ("offset:999999", "not available"),
    ] {
        let out = node.run(&["tail", "--from", from, "--limit", "1"]);
        assert!(!out.status.success(), "{from}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{from}: {err}");
    }
}

#[test]
fn sigterm_drains_syncs_and_exits_cleanly_keeping_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let port = free_port();
    let mut node = Node::start(&data, port);
    load(&node, 1, 50, 1);
    let pid = node.pid() as i32;
    let rc = send_signal(pid, 15); // SIGTERM
    assert_eq!(rc, 0);
    let status = node.wait();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "clean shutdown exits 0"
    );
    let node = Node::start(&data, port);
    let s: Value = serde_json::from_slice(&node.run(&["status"]).stdout).unwrap();
    assert_eq!(s["last_offset"], 50);
}

fn send_signal(pid: i32, sig: i32) -> i32 {
    // The `kill` tool keeps this test free of unsafe code.
    let out = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    if out.success() { 0 } else { -1 }
}

#[test]
fn size_limits_are_configurable_and_refusals_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        free_port(),
        &["--key-bytes-max", "8", "--value-bytes-max", "16"],
    );
    assert!(node.run(&["put", "k", "0123456789abcdef"]).status.success());
    for (key, value) in [("k", "0123456789abcdefX"), ("key-too-long", "v")] {
        let out = node.run(&["put", key, value]);
        assert!(!out.status.success(), "{key}={value} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("limit") || err.contains("too large") || err.contains("exceeds"),
            "{err}"
        );
    }
    // Nothing of the refused writes reached the log.
    let s: Value = serde_json::from_slice(&node.run(&["status"]).stdout).unwrap();
    assert_eq!(s["last_offset"], 1);
    // A bad limit is refused before the node starts.
    let out = Command::new(bin())
        .args(["serve", "--data"])
        .arg(dir.path().join("m"))
        .args(["--key-bytes-max", "70000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("key-bytes-max"));
}
