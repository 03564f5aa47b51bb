//! Helpers shared by the engine's multi-process tests (`crash.rs`, `bootstrap.rs`).
//!
//! Owns the one child-process runner: a test binary re-executes itself to run one ignored
//! "child" test in a process of its own, which the parent kills with SIGKILL while the child
//! is observably at work. Must never decide what a test checks: it hands back what the child
//! printed and the caller judges it.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::Rng;

/// Runs the ignored test `child` of the current test binary in a child process with the
/// environment `envs`; once the child prints a line ending in `READY` (or after 20 s without
/// one), lets it run for a random `kill_after_ms`, kills it with SIGKILL, and returns every
/// line it printed on stdout, in order. libtest may print `test NAME ... ` at the start of the
/// child's first line, so callers match `READY` at the end of a line.
pub fn run_child(child: &str, envs: &[(&str, &OsStr)], kill_after_ms: Range<u64>) -> Vec<String> {
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            child,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.ends_with("READY") {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(20));
    // The kill lands at a random moment of the child's work (not a synchronisation wait).
    let delay_ms = rand::rng().random_range(kill_after_ms);
    std::thread::sleep(Duration::from_millis(delay_ms));
    child.kill().expect("SIGKILL the child");
    let _ = child.wait();
    reader.join().expect("reader thread")
}
