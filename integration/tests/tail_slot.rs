//! `tideline tail --limit N --slot S` run again and again, as a batch script runs it. README: "A
//! `--slot` is acked only up to what `--checkpoint` has stored (without `--checkpoint`, up to
//! what was printed)"; PROTOCOL.md: a second `Subscribe` naming a slot is refused only "until
//! the first one ends", which for a consumer that is gone without a word is the idle timeout.
//!
//! Guards against a tail that exits without acking what it printed and without closing its
//! connection: its slot never moved (or lagged one run behind with a checkpoint), and the node
//! kept the exited tail's subscription, and so the slot, live until its idle timeout, so the
//! next run of the same command was refused "slot S is in use" and retried for seconds.
//!
//! And against a tail whose slot another live consumer holds: the node refuses it "slot S is
//! in use by a live subscription"; the tail retries that only as long as a holder whose
//! connection died keeps the slot (the node's idle timeout and a margin, 20 s), then exits 1
//! with the node's message, instead of retrying for ever.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Node, load};

/// How long a run of `tail --limit 1` against a local node may take. A run needs a few
/// round trips; one that waits behind the previous run's subscription waits for the node to
/// notice that run's connection is gone, 5 s or more (the client's idle timeout).
const RUN_MAX: Duration = Duration::from_secs(3);

/// The slot `name` as `slot list --json` shows it.
fn slot(node: &Node, name: &str) -> Value {
    let out = node.run(&["slot", "list", "--json"]);
    assert!(
        out.status.success(),
        "slot list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let slots: Value = serde_json::from_slice(&out.stdout).expect("slot list --json is JSON");
    slots
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        .unwrap_or_else(|| panic!("no slot {name} in {slots}"))
}

/// Runs `tail --from earliest --limit 1 --slot NAME [--checkpoint CP]` and returns the offset
/// it printed, its stderr and how long it took. Fails unless it succeeded with one line.
fn tail_one(node: &Node, name: &str, checkpoint: Option<&Path>) -> (u64, String, Duration) {
    let mut cmd = node.cli();
    cmd.args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--limit", "1", "--slot", name]);
    if let Some(cp) = checkpoint {
        cmd.arg("--checkpoint").arg(cp);
    }
    let started = Instant::now();
    let out: Output = cmd.output().expect("run tideline tail");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "tail failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "tail --limit 1 printed {lines:?}; stderr: {stderr}"
    );
    let line: Value = serde_json::from_str(lines[0]).expect("tail prints JSON lines");
    let offset = line["offset"]
        .as_u64()
        .expect("a printed line has an offset");
    (offset, stderr, took)
}

/// Asserts that a run neither waited behind the previous run's subscription nor was refused
/// the slot.
fn assert_prompt(run: &str, stderr: &str, took: Duration) {
    assert!(
        !stderr.contains("in use"),
        "the {run} run found its slot in use by the run before it: {stderr}"
    );
    assert!(
        took < RUN_MAX,
        "the {run} run took {took:?} (at most {RUN_MAX:?} expected); stderr: {stderr}"
    );
}

fn node_with_three_transactions(dir: &Path) -> Node {
    let node = Node::start(&dir.join("n"), 0);
    load(&node, 1, 3, 1);
    node
}

#[test]
fn tail_limit_without_checkpoint_acks_what_it_printed_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_three_transactions(dir.path());

    let (first, stderr, took) = tail_one(&node, "s", None);
    assert_prompt("first", &stderr, took);
    // Acked up to what was printed, by the time `tail` exited.
    let s = slot(&node, "s");
    assert_eq!(
        s["restart_offset"],
        first + 1,
        "the slot should be acked through the printed offset {first}: {s}"
    );

    // Without a checkpoint, `--from earliest` starts where the log starts again; the slot
    // stays where the acks put it (never back).
    let (again, stderr, took) = tail_one(&node, "s", None);
    assert_prompt("second", &stderr, took);
    assert_eq!(
        again, first,
        "--from earliest without a checkpoint starts over"
    );
    let s = slot(&node, "s");
    assert_eq!(s["restart_offset"], first + 1, "{s}");
}

#[test]
fn tail_limit_with_checkpoint_acks_what_it_stored_and_the_next_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_three_transactions(dir.path());
    let cp = dir.path().join("s.cp");

    let (first, stderr, took) = tail_one(&node, "s", Some(&cp));
    assert_prompt("first", &stderr, took);
    let s = slot(&node, "s");
    assert_eq!(
        s["restart_offset"],
        first + 1,
        "the slot should be acked through the stored offset {first}: {s}"
    );

    let (second, stderr, took) = tail_one(&node, "s", Some(&cp));
    assert_prompt("second", &stderr, took);
    assert_eq!(
        second,
        first + 1,
        "the next run prints the next transaction"
    );
    let s = slot(&node, "s");
    assert_eq!(s["restart_offset"], second + 1, "{s}");
}

/// A `tideline` process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The unread output of a holding tail: kept open so that the tail does not stop on a
/// closed pipe (its few lines fit in the pipe).
type HolderOutput = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Starts `tail --from earliest --slot NAME` with no limit and waits until it has printed a
/// line: it holds the slot, live, until it is killed (or its output is dropped).
fn hold_slot(node: &Node, name: &str) -> (Running, HolderOutput) {
    let mut child = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--slot", name,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run tideline tail");
    let stdout = child.stdout.take().expect("piped stdout");
    let holder = Running(child);
    let mut lines = BufReader::new(stdout).lines();
    lines
        .next()
        .expect("the holding tail printed nothing")
        .expect("UTF-8");
    (holder, lines)
}

/// How long a tail refused its slot by a live holder may run: the tail's bound (20 s) and a
/// few seconds for the last retry and the exit.
const REFUSED_EXIT_MAX: Duration = Duration::from_secs(30);

#[test]
fn tail_refused_its_slot_by_a_live_consumer_exits_1_with_the_nodes_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_three_transactions(dir.path());
    let (mut holder, _holder_output) = hold_slot(&node, "s");

    let started = Instant::now();
    let mut second = Running(
        node.cli()
            .args([
                "tail", "--node", &node.addr, "--from", "earliest", "--slot", "s",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tideline tail"),
    );
    let status = loop {
        if let Some(status) = second.0.try_wait().expect("wait for tail") {
            break status;
        }
        assert!(
            started.elapsed() < REFUSED_EXIT_MAX,
            "a tail refused its slot by a live consumer was still running after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let mut stderr = String::new();
    second
        .0
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("tail's stderr is UTF-8");
    let mut stdout = String::new();
    second
        .0
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut stdout)
        .expect("tail's stdout is UTF-8");
    assert_eq!(status.code(), Some(1), "after {took:?}; stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("slot s is in use by a live subscription"),
        "the error line should carry the node's refusal: {stderr}"
    );
    assert!(stdout.is_empty(), "the refused tail printed {stdout:?}");
    // It retried first, as for a holder whose connection died: not at the first refusal.
    assert!(
        took >= Duration::from_secs(15),
        "the refused tail gave up after {took:?}, before a dead holder's slot comes free"
    );
    assert!(
        holder.0.try_wait().expect("wait for the holder").is_none(),
        "the holding tail ended"
    );
}

#[test]
fn tail_gets_the_slot_of_a_killed_consumer_once_the_node_notices() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_three_transactions(dir.path());
    let (mut holder, _holder_output) = hold_slot(&node, "s");
    // Killed without closing its connection: the node keeps its subscription, and the slot,
    // until the idle timeout. The next tail is refused until then and retries.
    holder.0.kill().expect("kill the holder");
    holder.0.wait().expect("wait for the holder");
    let (_, stderr, took) = tail_one(&node, "s", None);
    assert!(
        took < REFUSED_EXIT_MAX,
        "took {took:?} to get a dead consumer's slot; stderr: {stderr}"
    );
}
