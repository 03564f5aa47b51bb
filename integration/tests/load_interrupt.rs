//! Stopping `tideline load` with Ctrl-C (SIGINT) or SIGTERM part-way through a large input:
//! it must stop sending, wait for the transactions in flight, say exactly which input lines
//! were committed, and exit 128 + the signal's number (130, 143), as a shell reports a
//! command a signal ended.
//!
//! Scenario: 1,000,000 lines from a file; the signal is sent once the node shows the first
//! commit (polled, not slept for), so the load is observably in flight. The message's
//! committed range is then checked against a scan of the tree: every key of the range is
//! there, and nothing past the lines the message leaves in doubt.
//!
//! Guards against: `load` with no signal handler, which the signal killed outright, printing
//! nothing (unfixed: the child ended by signal 2, exit code `None`, stderr empty), so the
//! operator had to scan the tree to find where to resume.

mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Node, gtids, scan, send_signal};

/// Input lines: far more than a debug build loads before the signal lands.
const LINES: u64 = 1_000_000;
/// A bound on stopping: the transactions in flight (8 of 1000 lines) finish, then it exits.
/// A hang (waiting for stdin, or for the rest of the input) would pass it by far.
const EXIT_WAIT: Duration = Duration::from_secs(20);

/// A child killed when dropped (a failed assertion must not leave it running).
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The key of input line `n`: zero-padded, so the scan's order is the input's.
fn key(n: u64) -> String {
    format!("k{n:07}")
}

/// Writes the input file: line n is `key(n) TAB v-n`.
fn input(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("in.txt");
    let mut text = String::with_capacity(LINES as usize * 20);
    for n in 1..=LINES {
        text.push_str(&key(n));
        text.push('\t');
        text.push_str(&format!("v-{n}\n"));
    }
    std::fs::write(&path, text).expect("write the input file");
    path
}

/// Input line ranges, first and last line.
type Ranges = Vec<(u64, u64)>;

/// Line ranges `A-B, C-D` as pairs.
fn parse_ranges(text: &str) -> Ranges {
    text.split(", ")
        .map(|r| {
            let (a, b) = r
                .split_once('-')
                .unwrap_or_else(|| panic!("not a range: {r}"));
            (
                a.parse().expect("a line number"),
                b.parse().expect("a line number"),
            )
        })
        .collect()
}

/// What the message says: the committed ranges and the ranges in doubt.
fn parse_message(stderr: &str) -> (Ranges, Ranges) {
    let committed = if stderr.contains("nothing was committed") {
        Vec::new()
    } else {
        let at = stderr
            .find("; lines ")
            .unwrap_or_else(|| panic!("no committed lines named: {stderr}"));
        let rest = &stderr[at + "; lines ".len()..];
        let end = rest
            .find(" committed")
            .unwrap_or_else(|| panic!("no committed lines named: {stderr}"));
        parse_ranges(&rest[..end])
    };
    let doubt = match stderr.find(" may or may not have been committed (the node's") {
        None => Vec::new(),
        Some(end) => {
            let start = stderr[..end]
                .rfind("lines ")
                .expect("the lines in doubt are named");
            parse_ranges(&stderr[start + "lines ".len()..end])
        }
    };
    (committed, doubt)
}

/// Loads the big input into `tree`, sends `sig` after the first commit, and checks the
/// message and the tree.
fn interrupt(node: &Node, dir: &std::path::Path, tree: &str, sig: &str, code: i32) {
    let file = std::fs::File::open(input(dir)).expect("open the input file");
    let before = gtids(node);
    let child = node
        .cli()
        .args(["load", "--node", &node.addr, "--tree", tree])
        .stdin(Stdio::from(file))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tideline load");
    let mut guard = Guard(Some(child));
    let pid = guard.0.as_ref().map_or(0, Child::id);
    // The first commit of this load, seen on the node.
    let deadline = Instant::now() + Duration::from_secs(60);
    while gtids(node) == before {
        assert!(Instant::now() < deadline, "load committed nothing in 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(pid, sig);
    let sent = Instant::now();
    let status = loop {
        let c = guard.0.as_mut().expect("the load runs");
        if let Some(status) = c.try_wait().expect("poll the load") {
            break status;
        }
        assert!(
            sent.elapsed() < EXIT_WAIT,
            "load still runs {EXIT_WAIT:?} after SIG{sig}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = guard
        .0
        .take()
        .expect("the load ran")
        .wait_with_output()
        .expect("the load's output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("load stderr after SIG{sig}: {stderr}");
    assert_eq!(
        status.code(),
        Some(code),
        "exit status {status:?} after SIG{sig}; stderr: {stderr:?}"
    );
    assert!(
        stderr.contains(&format!("interrupted by SIG{sig}")),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    let (committed, doubt) = parse_message(&stderr);
    // All batches finished: one range from line 1, and its end is where to resume.
    assert_eq!(committed.len(), 1, "{stderr}");
    let (first, last) = committed[0];
    assert_eq!(first, 1, "{stderr}");
    assert!(
        last < LINES,
        "the whole input loaded before the signal: {stderr}"
    );
    assert!(
        stderr.contains(&format!("nothing after line {last} was")),
        "{stderr}"
    );
    // The tree against the message: every committed key, nothing past the doubt.
    let keys: Vec<u64> = scan(node, tree)
        .lines()
        .map(|l| {
            let k = l.split('\t').next().unwrap_or_default();
            k.strip_prefix('k')
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a key load did not write: {l}"))
        })
        .collect();
    let expected: Vec<u64> = (1..=last).collect();
    let (in_range, beyond): (Vec<u64>, Vec<u64>) = keys.iter().partition(|&&n| n <= last);
    assert_eq!(
        in_range.len(),
        expected.len(),
        "lines 1-{last} reported committed but the tree holds {} of them",
        in_range.len()
    );
    assert_eq!(in_range, expected);
    for n in &beyond {
        assert!(
            doubt.iter().any(|(a, b)| a <= n && n <= b),
            "line {n} is in the tree but the message says nothing after line {last} was \
             committed and leaves only {doubt:?} in doubt: {stderr}"
        );
    }
}

#[test]
fn a_signal_during_load_reports_the_committed_lines_and_exits_128_plus_the_signal() {
    let dir = std::env::temp_dir().join(format!("tideline-load-interrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let node = Node::start(&dir.join("node"), 0);
    interrupt(&node, &dir, "int", "INT", 130);
    interrupt(&node, &dir, "term", "TERM", 143);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
