//! The node as users run it: real `tideline serve` processes and CLI commands over loopback
//! QUIC. Covers the CLI contract (tails from every start position deliver exactly the expected
//! transactions, in order, once; `get` of a missing key exits 1), resuming a tail across a
//! SIGKILL of the server and across a restart of the consumer from its checkpoint file, a
//! stalled consumer that must not hold up a fast one or the writers nor grow server memory, and
//! clear refusals of a wrong token, an unreachable node and bad positions.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Node, bin, load, rss_kib};

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
    let node = Node::start(&dir.path().join("n"), 0);
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
    // Write once the node lists the subscription (its start position is fixed by then).
    common::wait_consumer(&node, "from latest", |c| c["start"] == "latest");
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

/// Loads `count` transactions of one put each, `key:NNNNNN` → `bytes` bytes of `v`.
fn load_big(node: &Node, from: u64, count: u64, bytes: usize) {
    let value = "v".repeat(bytes);
    common::load_lines(
        node,
        1,
        (from..from + count).map(|i| format!("key:{i:06}\t{value}")),
    );
}

/// The node dies by SIGKILL while a tail is observably mid-transfer: the tail has printed 50
/// transactions and is held there (the test stops reading its stdout), while the log holds
/// 600 of 32 KiB. Flow control bounds what the tail can have received at that moment: the
/// 64 KiB pipe, the client's 9 MiB stream window and one 256 KiB batch, about 300
/// transactions, so more than half of the log is still to come from the restarted node.
/// Guards against a resume that skips or repeats what was in flight.
#[test]
fn tail_resumes_after_kill_9_of_the_node_and_from_its_checkpoint() {
    const VALUE_BYTES: usize = 32 << 10;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut node = Node::start(&data, 0);
    let port = node.port();
    load_big(&node, 1, 600, VALUE_BYTES);
    let checkpoint = dir.path().join("tail.cp");
    let addr = node.addr.clone();
    let mut tail = node
        .cli()
        .args([
            "tail", "--node", &addr, "--from", "earliest", "--limit", "700",
        ])
        // Notice the dead node sooner than the default 5 s.
        .args(["--timeout-ms", "1500"])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut got: Vec<u64> = Vec::new();
    let mut read_one = |got: &mut Vec<u64>| {
        let line = lines
            .next()
            .expect("the tail ended early")
            .expect("the tail prints UTF-8");
        let v: Value = serde_json::from_str(&line).expect("the tail prints JSON lines");
        got.push(v["offset"].as_u64().expect("offset"));
    };
    while got.len() < 50 {
        read_one(&mut got);
    }
    // Part received, most of the log not yet: kill the node hard, restart it, write more.
    node.kill9();
    let node = Node::start(&data, port);
    load_big(&node, 601, 100, 1);
    while got.len() < 700 {
        read_one(&mut got);
    }
    let out = tail.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(got, (1..=700).collect::<Vec<_>>(), "no gap, no duplicate");

    // The consumer restarts from its checkpoint: nothing repeated, nothing skipped.
    load(&node, 701, 750, 10); // 5 more
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
    assert_eq!(offsets(&lines), (701..=705).collect::<Vec<_>>());
}

/// What PROTOCOL.md lets the server hold for a consumer that stops reading: the consumer
/// buffer (`--consumer-buffer-bytes`, default 4 MiB: reader chunk, batch, connection state and
/// send window), plus one transaction past a batch (100 KB here), in KiB. Many stopped
/// consumers at once: `stalled_consumers.rs`.
const STALLED_PROMISE_KIB: u64 =
    (tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT as u64 >> 10) + 100;
/// Allowance on top of the promise: the allocator keeping freed pages, the fast tail's and the
/// writer's transient buffers, quinn's per-stream bookkeeping.
const STALLED_MARGIN_KIB: u64 = 8 << 10;

#[test]
fn a_stalled_consumer_blocks_nobody_and_server_memory_stays_bounded() {
    let bound_kib = STALLED_PROMISE_KIB + STALLED_MARGIN_KIB;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    // About 4 times the bound of log (transactions of 10 puts of 10 KB): a server that buffered
    // the stalled consumer's tail instead of stopping at the window would break the bound.
    let value = "x".repeat(10_000);
    let lines = (4 * bound_kib * 1024 / 10_000).div_ceil(10) * 10;
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..lines {
            writeln!(stdin, "big:{i:06}\t{value}").unwrap();
        }
    }
    assert!(child.wait().unwrap().success());
    let txns = lines / 10;
    let rss_before = rss_kib(node.pid());

    // A consumer that subscribes and never reads: its stdout pipe fills and it stops. (Its
    // prefix filter passes everything and tells it apart in the node's status.)
    let mut stalled = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--prefix", "big:"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_consumer(&node, "of the stalled tail, sent data", |c| {
        c["prefix"] == "big:" && c["sent_through"].as_u64().unwrap_or(0) >= 1
    });
    // A fast consumer reads everything, and writers keep committing meanwhile.
    let fast = node.run(&["tail", "--from", "earliest", "--limit", &txns.to_string()]);
    assert!(fast.status.success());
    assert_eq!(
        String::from_utf8_lossy(&fast.stdout).lines().count() as u64,
        txns
    );
    load(&node, 1, 100, 1);
    let rss_after = rss_kib(node.pid());
    // The stalled consumer is still subscribed, and still far behind.
    let c = common::wait_consumer(&node, "of the stalled tail", |c| c["prefix"] == "big:");
    let sent = c["sent_through"].as_u64().unwrap_or(0);
    assert!(
        sent < txns / 2,
        "the stalled consumer was sent {sent} of {txns} transactions: it did not stall"
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
    eprintln!(
        "server RSS {rss_before} KiB -> {rss_after} KiB with one stalled consumer \
         ({txns} transactions of 100 KB; bound {bound_kib} KiB)"
    );
    assert!(
        rss_after <= rss_before + bound_kib,
        "server RSS grew from {rss_before} KiB to {rss_after} KiB with one stalled consumer, \
         more than the {bound_kib} KiB PROTOCOL.md's promise and margin allow"
    );
}

#[test]
fn wrong_token_unreachable_node_and_bad_positions_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
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

    let (absent, _silent) = common::silent_addr();
    let started = Instant::now();
    let out = node
        .cli()
        .args(["status", "--node", &absent])
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

/// Two writers putting `w<writer>-<n>` (n = 0, 1, ...) through the CLI, one put at a time,
/// each until a put fails.
struct PutWriters {
    acked: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    handles: Vec<std::thread::JoinHandle<u64>>,
}

impl PutWriters {
    fn start(node: &Node) -> PutWriters {
        use std::sync::atomic::{AtomicU64, Ordering};
        let acked: std::sync::Arc<[AtomicU64; 2]> =
            std::sync::Arc::new(std::array::from_fn(|_| AtomicU64::new(0)));
        let handles = (0..2)
            .map(|w| {
                let acked = acked.clone();
                let secrets = node.secrets();
                let addr = node.addr.clone();
                std::thread::spawn(move || {
                    // Returns how many puts were attempted (the last one failed).
                    let mut n = 0u64;
                    loop {
                        let ok = Command::new(bin())
                            .env("TIDELINE_SECRETS", &secrets)
                            .args(["put", "--node", &addr, &format!("w{w}-{n:06}"), "v"])
                            .output()
                            .expect("run tideline put")
                            .status
                            .success();
                        n += 1;
                        if !ok {
                            return n;
                        }
                        acked[w].store(n, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        PutWriters { acked, handles }
    }

    /// Waits until each writer has had `n` puts acknowledged.
    fn wait_acked(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .acked
            .iter()
            .any(|a| a.load(std::sync::atomic::Ordering::SeqCst) < n)
        {
            assert!(Instant::now() < deadline, "the writers made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for both writers to stop (call it once the node is gone, before restarting it);
    /// returns, per writer, how many puts it attempted.
    fn finish(&mut self) -> Vec<u64> {
        self.handles.drain(..).map(|t| t.join().unwrap()).collect()
    }

    /// Checks that `node` (restarted) holds every acknowledged put, per writer a gap-free run,
    /// at most the one in flight more, and one transaction per kept put.
    fn check(&self, attempted: &[u64], node: &Node) {
        let keys: Vec<String> = String::from_utf8(node.run(&["scan", "--limit", "1000000"]).stdout)
            .unwrap()
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_string())
            .collect();
        let mut total = 0;
        for (w, attempted) in attempted.iter().enumerate() {
            let acked = self.acked[w].load(std::sync::atomic::Ordering::SeqCst);
            let have: Vec<&String> = keys
                .iter()
                .filter(|k| k.starts_with(&format!("w{w}-")))
                .collect();
            let n = have.len() as u64;
            assert!(
                n >= acked && n <= *attempted,
                "writer {w}: {acked} puts acknowledged, {attempted} attempted, {n} kept"
            );
            let want: Vec<String> = (0..n).map(|i| format!("w{w}-{i:06}")).collect();
            assert_eq!(have, want.iter().collect::<Vec<_>>(), "writer {w}: a gap");
            total += n;
        }
        let s: Value = serde_json::from_slice(&node.run(&["status"]).stdout).unwrap();
        assert_eq!(s["last_offset"], total, "one transaction per kept put");
    }
}

/// SIGTERM arrives while two writers are committing (each has had puts acknowledged, and
/// keeps putting until the node refuses): the node exits 0 and, after a restart, holds every
/// acknowledged put; of the puts that failed only the one in flight at the signal, per
/// writer, may be there too (its reply was lost), nothing else.
#[test]
fn sigterm_drains_syncs_and_exits_cleanly_keeping_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut node = Node::start(&data, 0);
    let port = node.port();
    let mut writers = PutWriters::start(&node);
    writers.wait_acked(5);
    assert_eq!(send_signal(node.pid() as i32, 15), 0); // SIGTERM, writes in flight
    let status = node.wait();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "clean shutdown exits 0"
    );
    let attempted = writers.finish();
    let node = Node::start(&data, port);
    writers.check(&attempted, &node);
}

/// README, "Durability": under `async` a commit is acknowledged once its record is written,
/// before the interval's fsync; a SIGKILL is a process crash and the page cache survives it,
/// so a SIGKILL while two writers commit loses no acknowledged put.
#[test]
fn kill_9_under_async_loses_no_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let mut node = Node::start_with(&data, 0, &["--durability", "async"]);
    let port = node.port();
    let mut writers = PutWriters::start(&node);
    writers.wait_acked(5);
    node.kill9();
    let attempted = writers.finish();
    let node = Node::start_with(&data, port, &["--durability", "async"]);
    writers.check(&attempted, &node);
}

/// A tail rides out a network failure that is not a node restart: the node is frozen
/// (SIGSTOP) until the tail's connection times out and it says it is reconnecting, then thawed
/// (SIGCONT); the tail reconnects to the same process and delivers everything once.
#[test]
fn a_tail_reconnects_after_the_connection_died_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    load(&node, 1, 50, 10); // 5 transactions
    let mut tail = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--limit", "10",
        ])
        .args(["--timeout-ms", "1000"])
        .env("TIDELINE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap()).lines();
    let errs = {
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = tail.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[tail] {l}");
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let mut got = Vec::new();
    for _ in 0..5 {
        let l = out.next().expect("tail output").expect("UTF-8");
        got.push(
            serde_json::from_str::<Value>(&l).unwrap()["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(send_signal(node.pid() as i32, 19), 0); // SIGSTOP
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = errs
            .recv_timeout(left)
            .expect("the tail never reported its connection lost");
        if line.contains("reconnecting") {
            break;
        }
    }
    assert_eq!(send_signal(node.pid() as i32, 18), 0); // SIGCONT
    load(&node, 51, 100, 10); // 5 more
    for _ in 0..5 {
        let l = out.next().expect("tail output").expect("UTF-8");
        got.push(
            serde_json::from_str::<Value>(&l).unwrap()["offset"]
                .as_u64()
                .unwrap(),
        );
    }
    assert!(tail.wait().unwrap().success());
    assert_eq!(got, (1..=10).collect::<Vec<_>>(), "no gap, no duplicate");
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
        0,
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

/// Runs `tail --from earliest --prefix u: --checkpoint CP --limit N` and returns its lines.
fn filtered_tail(node: &Node, checkpoint: &std::path::Path, limit: u64) -> Vec<Value> {
    let out = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--prefix", "u:", "--limit", &limit.to_string()])
        .arg("--checkpoint")
        .arg(checkpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The prefix filter over the wire, and a filtered tail resumed from its checkpoint (README,
/// `tail --prefix`, `--checkpoint`): a tail of `u:` gets only the transactions with `u:` keys,
/// with only those ops; run again with its checkpoint it goes on after the last one it
/// delivered, past the transactions its filter dropped, repeating nothing.
#[test]
fn a_filtered_tail_resumes_from_its_checkpoint_past_what_its_filter_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let put = |k: &str| assert!(node.run(&["put", k, "v"]).status.success());
    // Offsets: 1 u:1, 2 x:1, 3 u:2, 4 x:2, 5 u:3, 6 x:3.
    for i in 1..=3 {
        put(&format!("u:{i}"));
        put(&format!("x:{i}"));
    }
    // One transaction with both: only its u: op passes.
    let mixed = "u:mixed\tm\nx:mixed\tm\n";
    let mut load = node
        .cli()
        .args(["load", "--node", &node.addr, "--atomic"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    load.stdin
        .take()
        .unwrap()
        .write_all(mixed.as_bytes())
        .unwrap();
    assert!(load.wait().unwrap().success()); // offset 7
    let checkpoint = dir.path().join("u.cp");
    let first = filtered_tail(&node, &checkpoint, 2);
    assert_eq!(offsets(&first), vec![1, 3]);
    // Only x: writes, then u: again.
    for i in 4..=8 {
        put(&format!("x:{i}")); // offsets 8..=12
    }
    put("u:4"); // offset 13
    let second = filtered_tail(&node, &checkpoint, 3);
    assert_eq!(
        offsets(&second),
        vec![5, 7, 13],
        "resumed after 3, x: skipped"
    );
    let keys: Vec<&str> = second
        .iter()
        .flat_map(|l| l["ops"].as_array().unwrap().iter())
        .map(|op| op["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["u:3", "u:mixed", "u:4"], "only u: ops pass");
}

/// Slots over the wire (OPERATIONS.md, "Retention and slots"): a tail with `--slot` moves the
/// slot with its acks (after its checkpoint stored them), and once that consumer is gone
/// retention (every 10 s, everything else unretained: `--log-retain-bytes 0`, 4 KiB segments)
/// removes old segments but none the slot still needs: the consumer's next offset stays
/// readable.
#[test]
fn a_slot_moves_with_acks_and_holds_retention_for_a_consumer_that_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        0,
        &["--log-segment-bytes", "4096", "--log-retain-bytes", "0"],
    );
    load_big(&node, 1, 20, 1000); // offsets 1..=20, a few segments
    let checkpoint = dir.path().join("s.cp");
    let mut tail = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--slot", "s", "--limit", "100"])
        .arg("--checkpoint")
        .arg(&checkpoint)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    for _ in 0..20 {
        lines.next().expect("tail output").expect("UTF-8");
    }
    // The acks move the slot to the first offset the consumer still needs.
    let slot = |node: &Node| -> Value {
        common::status(node)["slots"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "s").cloned())
            .unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while slot(&node)["restart_offset"] != 21 {
        assert!(
            Instant::now() < deadline,
            "the slot never moved to 21: {}",
            slot(&node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The consumer dies; the log goes on.
    tail.kill().unwrap();
    tail.wait().unwrap();
    load_big(&node, 21, 40, 1000); // offsets 21..=60
    let first = |node: &Node| common::status(node)["first_offset"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while first(&node) == 1 {
        assert!(Instant::now() < deadline, "retention never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        first(&node) <= 21,
        "retention removed offsets the slot needs: first offset {}, slot {}",
        first(&node),
        slot(&node)
    );
    assert_eq!(slot(&node)["restart_offset"], 21);
    assert_eq!(
        offsets(&tail_lines(&node, "offset:21", 40)),
        (21..=60).collect::<Vec<_>>()
    );
}
