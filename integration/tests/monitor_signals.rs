//! Stopping `tideline monitor` and `tideline top` with Ctrl-C (SIGINT) while a node is busy
//! and their output is read slowly: one SIGINT must stop them (exit 0) at once.
//!
//! Scenario: a node serves a steady `bench node --kind get` load, so the monitor feed never
//! pauses; the command's stdout is a pipe that a reader drains a little at a time, so the
//! command spends most of its time blocked writing. One SIGINT is sent once output flows;
//! the command must exit within [`EXIT_WAIT`]. Repeated [`RUNS_MONITOR`] / [`RUNS_TOP`] times,
//! since a lost signal depends on where it lands.
//!
//! Guards against: a listener made anew in each `select!` (`tokio::signal::ctrl_c()` inside
//! the loop). Once the first one exists, tokio's handler replaces the default action for the
//! life of the process, and a SIGINT landing while no listener future is alive (while a batch
//! of lines or a screen is written) is consumed and lost: the command runs on until a second
//! Ctrl-C. On that code, under this harness, `monitor` lost the signal in 5 to 6 runs of 20
//! and `top` in 0 to 3 of 10 to 20, so the test failed (through `monitor`) nearly every time;
//! fixed, both stop within some 20 ms.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Node, send_signal};

/// How long the command may take to stop after its SIGINT: the write in progress finishes
/// at the reader's pace (a few KiB), then the loop sees the signal.
const EXIT_WAIT: Duration = Duration::from_secs(2);
const RUNS_MONITOR: usize = 20;
const RUNS_TOP: usize = 10;
/// The slow reader takes this many bytes ...
const READ_BYTES: usize = 1024;
/// ... every this long: well below what a busy node's monitor prints, so the pipe stays full.
const READ_EVERY: Duration = Duration::from_millis(20);

/// A child killed when dropped (a failed assertion must not leave it running).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A steady read load on `node` until dropped.
fn load(node: &Node) -> Guard {
    let child = node
        .cli()
        .args(["bench", "node", "--node", &node.addr, "--kind", "get"])
        .args(["--requests", "1000000000", "--clients", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the load");
    Guard(child)
}

/// Starts `cmd` with stdout drained slowly by a thread; returns the child and the bytes read
/// so far.
fn start_slowly_read(mut cmd: Command) -> (Guard, Arc<AtomicU64>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the command");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let read = Arc::new(AtomicU64::new(0));
    let counter = read.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
            std::thread::sleep(READ_EVERY);
        }
    });
    (Guard(child), read)
}

/// Runs `cmd` `runs` times, each stopped by one SIGINT once its output flows; returns the runs
/// (1-based) in which it was still running [`EXIT_WAIT`] after the signal, and checks that
/// every run that stopped exited 0.
fn sigint_runs(what: &str, runs: usize, cmd: impl Fn() -> Command) -> Vec<usize> {
    let mut lost = Vec::new();
    let mut slowest = Duration::ZERO;
    for run in 1..=runs {
        let (mut child, read) = start_slowly_read(cmd());
        // Wait for output: the command has subscribed, its listener exists, and the pipe
        // fills from here on.
        let deadline = Instant::now() + Duration::from_secs(30);
        while read.load(Ordering::SeqCst) < 8 * READ_BYTES as u64 {
            assert!(
                child.0.try_wait().expect("poll the command").is_none(),
                "{what} exited before printing anything (run {run})"
            );
            assert!(
                Instant::now() < deadline,
                "{what} printed nothing in 30 s under load (run {run})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        send_signal(child.0.id(), "INT");
        let sent = Instant::now();
        let status = loop {
            if let Some(s) = child.0.try_wait().expect("poll the command") {
                break Some(s);
            }
            if sent.elapsed() > EXIT_WAIT {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        match status {
            Some(s) => {
                assert_eq!(s.code(), Some(0), "{what} after SIGINT (run {run}): {s}");
                slowest = slowest.max(sent.elapsed());
            }
            None => lost.push(run),
        }
        // `child` is dropped here: killed if it still runs.
    }
    eprintln!(
        "{what}: lost the signal in {} of {runs} runs; the slowest stop took {slowest:?}",
        lost.len()
    );
    lost
}

#[test]
fn monitor_and_top_stop_on_one_sigint_while_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(&dir.path().join("node"), 0);
    let _load = load(&node);
    let monitor = sigint_runs("monitor", RUNS_MONITOR, || {
        let mut c = node.cli();
        c.args(["monitor", "--node", &node.addr]);
        c
    });
    // A screen of many rows: writing it takes long enough for a signal to land there.
    let top = sigint_runs("top", RUNS_TOP, || {
        let mut c = node.cli();
        c.args(["top", "--node", &node.addr, "--json"]).args([
            "--interval-ms",
            "50",
            "--rows",
            "500",
        ]);
        c
    });
    assert!(
        monitor.is_empty() && top.is_empty(),
        "one SIGINT did not stop the command within {EXIT_WAIT:?} (the signal was lost): \
         monitor in runs {monitor:?} of {RUNS_MONITOR}, top in runs {top:?} of {RUNS_TOP}"
    );
}
