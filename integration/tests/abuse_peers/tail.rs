//! The legitimate client of `abuse.rs`: the log it reads, loaded with `tideline load`, and its
//! rounds of `tideline tail`, each checked to deliver every transaction in order, timed alone
//! and while the abuse runs.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::Node;

/// Runs `tideline tail --from earliest --limit N` and returns its duration; fails unless it
/// delivered exactly offsets 1..=N. A tail that could not run to the end (it could not
/// connect, or the node closed it) is an `Err` with its stderr.
pub fn tail_round(node: &Node, txns: u64) -> Result<Duration, String> {
    let start = Instant::now();
    let out = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--limit", &txns.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run tideline tail");
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut want = 1u64;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(
            v["offset"].as_u64(),
            Some(want),
            "the legitimate tail skipped or repeated"
        );
        want += 1;
    }
    assert_eq!(
        want - 1,
        txns,
        "the legitimate tail delivered {} of {txns}",
        want - 1
    );
    Ok(took)
}

/// What the legitimate tail did during the abuse.
pub struct TailRun {
    /// Rounds that ran to the end: when each ended and how long it took.
    pub rounds: Vec<(Instant, Duration)>,
    /// Rounds that could not run to the end, with the tail's stderr.
    pub failed: Vec<String>,
}

/// Tail rounds until `stop` is set (at least one).
pub fn tail_rounds(node: &Node, txns: u64, stop: &AtomicBool) -> TailRun {
    let (mut rounds, mut failed) = (Vec::new(), Vec::new());
    loop {
        match tail_round(node, txns) {
            Ok(took) => rounds.push((Instant::now(), took)),
            Err(e) => failed.push(e),
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    TailRun { rounds, failed }
}

/// The legitimate tail with no abuse: at least three rounds and two seconds. Returns the
/// rounds and their total time.
pub fn alone_rounds(node: &Node, txns: u64) -> (u64, Duration) {
    let t0 = Instant::now();
    let (mut took, mut rounds) = (Duration::ZERO, 0u64);
    while rounds < 3 || t0.elapsed() < Duration::from_secs(2) {
        took += tail_round(node, txns)
            .unwrap_or_else(|e| panic!("the legitimate tail failed with no abuse: {e}"));
        rounds += 1;
    }
    (rounds, took)
}

/// Loads `txns` transactions of 10 puts of 100 bytes.
pub fn load_log(node: &Node, txns: u64) {
    use std::io::Write;
    let value = "v".repeat(100);
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for i in 0..txns * 10 {
            writeln!(stdin, "k:{i:08}\t{value}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}
