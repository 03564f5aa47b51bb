//! `tideline sink file` killed with SIGKILL again and again while it writes and while the node
//! takes writes: afterwards the files hold every change of the log exactly once, in log order
//! (no missing and no duplicate envelope, by GTID and op), across rotations.
//!
//! Guards against: a position stored before its data is synced (missing changes), data kept
//! after the stored position (duplicates), and a rotation cut in half by the kill. The
//! protection this exercises (the cut back to the stored length on open) has its canary in
//! the sink's unit tests (`connectors/src/sink/file/tests.rs`: with the cut off, the same
//! crash duplicates).
//!
//! Also: a sink restarted on the same file with a wider filter (`--tree a`, then every tree)
//! either writes what the first filter dropped or refuses to start, never skips it silently.
//!
//! Cycles: 20 by default; `TIDELINE_SINK_KILL_CYCLES=N` runs more. `TIDELINE_TEST_SEED=N`
//! replays the kill timings and the workload.

mod common;
mod sinkkit;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Node;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// The source offset the position beside `out` covers (0 before the first batch).
fn stored_offset(out: &Path) -> u64 {
    let Ok(text) = std::fs::read(format!("{}.position", out.display())) else {
        return 0;
    };
    let pos: Value = serde_json::from_slice(&text).expect("the position file is JSON");
    match pos["checkpoint"].as_str() {
        None => 0,
        Some(cp) => {
            let cp: Value = serde_json::from_str(cp).expect("the checkpoint is JSON");
            cp["tail"]["offset"].as_u64().unwrap_or(0)
        }
    }
}

/// Every envelope of the rotated files, then the live one, as (gtid, op, tree, key).
fn envelopes(out: &Path) -> Vec<(String, String, String, String)> {
    let mut files = vec![];
    for n in 1.. {
        let p = PathBuf::from(format!("{}.{n}", out.display()));
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    files.push(out.to_path_buf());
    let mut all = vec![];
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}:{}: not JSON ({e}): {line}", f.display(), i + 1));
            all.push((
                v["source"]["gtid"].as_str().unwrap().to_string(),
                v["op"].as_str().unwrap().to_string(),
                v["tree"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    all
}

/// The same from the node's own log, through `tideline tail`.
fn log_ops(node: &Node, last: u64) -> Vec<(String, String, String, String)> {
    let out = node.run(&["tail", "--from", "earliest", "--limit", &last.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut all = vec![];
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let t: Value = serde_json::from_str(line).unwrap();
        for op in t["ops"].as_array().unwrap() {
            all.push((
                t["gtid"].as_str().unwrap().to_string(),
                op["op"].as_str().unwrap().to_string(),
                op["tree"].as_str().unwrap().to_string(),
                op["key"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    all
}

/// `tideline sink file` into `out`, its stderr appended to `log`.
fn sink_cmd(node: &Node, out: &Path, log: &Path) -> Command {
    let mut c = node.cli();
    c.args(["sink", "file", "--node", &node.addr, "--out"])
        .arg(out)
        // Small files and batches: kills land in rotations and between many batches.
        .args([
            "--rotate-bytes",
            "65536",
            "--batch-changes",
            "200",
            "--batch-delay-ms",
            "5",
        ])
        .env("TIDELINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(sinkkit::log_file(log));
    c
}

#[test]
fn kill_9_mid_batch_leaves_every_change_exactly_once() {
    let seed = sinkkit::seed("kill_9_mid_batch_leaves_every_change_exactly_once");
    let cycles = sinkkit::cycles();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let out = dir.path().join("changes.jsonl");
    let log = dir.path().join("sink.stderr");
    let stop = Arc::new(AtomicBool::new(false));
    let w = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        usize::MAX,
        Duration::ZERO,
        stop.clone(),
    );
    let mut killed_with_unstored = 0;
    for cycle in 0..cycles {
        let before = stored_offset(&out);
        let mut child = sink_cmd(&node, &out, &log)
            .spawn()
            .expect("start tideline sink file");
        // Kill while work is observably in flight: once this run has stored a batch, after a
        // random pause within the next few batches.
        let deadline = Instant::now() + Duration::from_secs(30);
        while stored_offset(&out) <= before {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "cycle {cycle}: sink file exited by itself ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: no batch stored in 30 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
        sinkkit::kill9(&mut child, &log);
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!err.contains("error"), "cycle {cycle}: {err}");
        let len = std::fs::metadata(&out).map_or(0, |m| m.len());
        let pos: Value =
            serde_json::from_slice(&std::fs::read(format!("{}.position", out.display())).unwrap())
                .unwrap();
        if len > pos["bytes"].as_u64().unwrap() {
            killed_with_unstored += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let commits = w.join().unwrap().len();
    let last = common::status(&node)["last_offset"].as_u64().unwrap();
    // A last run catches up and stops cleanly on SIGINT.
    let mut child = sink_cmd(&node, &out, &log).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_offset(&out) < last {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the last run exited early"
        );
        assert!(Instant::now() < deadline, "the last run did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SIGINT, as an operator's Ctrl-C.
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "after Ctrl-C: {status}: {err}");
    assert!(err.contains("sink file stopped"), "{err}");

    let got = envelopes(&out);
    let want = log_ops(&node, last);
    println!(
        "{cycles} kills ({killed_with_unstored} left unstored bytes to cut), {commits} \
         commits, {} envelopes, {} rotated files",
        got.len(),
        (1..)
            .take_while(|n| PathBuf::from(format!("{}.{n}", out.display())).exists())
            .count()
    );
    if got != want {
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "the files differ from the log (seed {seed}): {} envelopes vs {} ops; first \
             difference at envelope {first:?}: {:?} vs {:?}",
            got.len(),
            want.len(),
            first.map(|i| &got[i]),
            first.map(|i| &want[i]),
        );
    }
}

/// `--from bootstrap`: the node's current state as `read` envelopes (no GTID: the copy is
/// positioned as a whole), then its changes; `--tree` keeps other trees out.
#[test]
fn from_bootstrap_writes_the_state_then_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    for (tree, key) in [("docs", "a"), ("docs", "b"), ("other", "x")] {
        let out = node.run(&["put", "--tree", tree, key, "v"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(node.run(&["del", "--tree", "docs", "a"]).status.success());
    let out = dir.path().join("changes.jsonl");
    let mut child = sink_cmd(&node, &out, &dir.path().join("sink.stderr"))
        .args(["--from", "bootstrap", "--tree", "docs"])
        .spawn()
        .unwrap();
    let wait_for = |offset: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while stored_offset(&out) < offset {
            assert!(
                Instant::now() < deadline,
                "the sink did not reach offset {offset}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for(4);
    assert!(
        node.run(&["put", "--tree", "docs", "c", "w"])
            .status
            .success()
    );
    wait_for(5);
    child.kill().unwrap();
    let _ = child.wait();
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let brief: Vec<(String, String, Value)> = lines
        .iter()
        .map(|v| {
            (
                v["op"].as_str().unwrap().to_string(),
                v["key"].as_str().unwrap().to_string(),
                v["source"]["offset"].clone(),
            )
        })
        .collect();
    assert_eq!(
        brief,
        [
            ("read".to_string(), "b".to_string(), Value::Null),
            ("put".to_string(), "c".to_string(), Value::from(5)),
        ]
    );
}

/// A file sink stopped and started again with a wider filter (here: `--tree a`, then every
/// tree) must not skip, without a word, the changes the first filter dropped before the
/// stored position: either it writes them, or it refuses to start and says that the filter
/// changed and what to do.
#[test]
fn a_restart_with_a_wider_filter_skips_no_change_silently() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    for tree in ["a", "b"] {
        let out = node.run(&["put", "--tree", tree, "1", "v"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = common::status(&node)["last_offset"].as_u64().unwrap();
    let out = dir.path().join("changes.jsonl");
    let first_log = dir.path().join("first.stderr");
    let mut first = sink_cmd(&node, &out, &first_log)
        .args(["--tree", "a"])
        .spawn()
        .expect("start tideline sink file --tree a");
    // The put to b is filtered out; the position still moves past it (within a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_offset(&out) < last {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first run exited: {}",
            std::fs::read_to_string(&first_log).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "the first run did not store offset {last}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = first.wait().unwrap();
    assert!(
        status.success(),
        "after SIGTERM: {status}: {}",
        std::fs::read_to_string(&first_log).unwrap_or_default()
    );
    let has = |tree: &str| {
        envelopes(&out)
            .iter()
            .any(|(_, op, t, k)| op == "put" && t == tree && k == "1")
    };
    assert!(has("a") && !has("b"), "{:?}", envelopes(&out));

    // Again on the same file, without --tree; one more change to see it through.
    let second_log = dir.path().join("second.stderr");
    let mut second = sink_cmd(&node, &out, &second_log)
        .spawn()
        .expect("start tideline sink file");
    assert!(node.run(&["put", "--tree", "c", "1", "v"]).status.success());
    let last = common::status(&node)["last_offset"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let exited = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if stored_offset(&out) >= last {
            break None;
        }
        assert!(
            Instant::now() < deadline,
            "the second run neither stored offset {last} nor stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = std::fs::read_to_string(&second_log).unwrap_or_default();
    match exited {
        Some(status) => {
            assert!(!status.success(), "the second run stopped by itself: {err}");
            for what in ["filter", "--tree a", "--from bootstrap"] {
                assert!(err.contains(what), "the refusal names no `{what}`: {err}");
            }
            assert!(!has("b"), "refused, yet written: {:?}", envelopes(&out));
            println!("refused: {err}");
        }
        None => {
            let _ = second.kill();
            let _ = second.wait();
            assert!(
                has("b"),
                "the put to tree b (filtered out by the first run's --tree a) is missing, and \
                 the run without --tree stored offset {last} without an error: {:?}; stderr: \
                 {err}",
                envelopes(&out)
            );
        }
    }
}
