//! The CLI as a newcomer meets it: real `tideline` processes, typed as users type them.
//!
//! Guards against: a scan that cannot return a big tree or holds it all in server memory
//! (issue 10.15); `get` output running into the shell prompt (10.17); a failed `load` that
//! leaves an unreported partial import (17.2); large values failing with transport errors
//! (17.3); a certificate mismatch read as a network fault and retried forever (17.4); `serve`
//! changing the data directory before it knows it can run (17.5); `verify` printing huge
//! values (17.6); ambiguous `scan` rows that do not round-trip through `load` (17.7);
//! messages naming Rust APIs or repeating OS errors (17.8); silent surprises in `tail
//! --checkpoint`, `TIDELINE_SECRETS=` and `del` (17.9); `tail` retrying an
//! absent node forever (17.10); `verify` showing bytes that are not UTF-8 as U+FFFD, so that
//! different values look alike; `log dump | head -1` failing with "Broken pipe"; `top --json |
//! head -1` panicking.

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{Node, bin, rss_kib, wait_bounded};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Feeds `input` to `tideline ARGS --node ADDR` on stdin.
fn run_with_stdin(node: &Node, args: &[&str], input: &[u8]) -> Output {
    let mut child = node
        .cli()
        .args(args)
        .args(["--node", &node.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tideline");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for tideline");
    let _ = writer.join();
    out
}

fn last_offset(node: &Node) -> u64 {
    common::status(node)["last_offset"]
        .as_u64()
        .expect("last_offset")
}

// ---- issue 10.15: scan streams in pages -------------------------------------------------

/// Keys loaded for the scan test: with 120-byte values the whole answer (~22 MB) is larger
/// than one protocol message (17 MiB), which the old single-frame scan could not send. The
/// issue's full size runs with `TIDELINE_SCAN_KEYS=1500000`.
const SCAN_KEYS_DEFAULT: u64 = 160_000;

#[test]
fn scan_streams_a_tree_larger_than_one_message_in_bounded_server_memory() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let keys: u64 = std::env::var("TIDELINE_SCAN_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SCAN_KEYS_DEFAULT);
    eprintln!("scan test with {keys} keys");
    let value = "v".repeat(120);
    let mut input = Vec::new();
    for i in 0..keys {
        writeln!(input, "big:{i:08}\t{value}").unwrap();
    }
    let out = run_with_stdin(&node, &["load", "--tree", "big"], &input);
    assert!(out.status.success(), "load: {}", stderr(&out));
    drop(input);

    // Sample the server's RSS while the scan runs (a measurement, not synchronisation). The
    // store's block cache (bounded by its configuration, 64 MiB by default, shared by every
    // reader) fills as any full read goes; what is bounded here is what the scan itself holds,
    // so the cache's growth, which the node reports, is taken out.
    let pid = node.pid();
    let cache_kib = || {
        common::status(&node)["store"]["cache_bytes"]
            .as_u64()
            .unwrap_or(0)
            / 1024
    };
    let cache_before = cache_kib();
    let base = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(base));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // No --limit: the whole range, streamed to a reader that counts lines (like `| wc -l`).
    let mut scan = node
        .cli()
        .args(["scan", "--node", &node.addr, "--tree", "big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = scan.stdout.take().unwrap();
    let mut lines = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let out = scan.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert!(out.status.success(), "scan: {}", stderr(&out));
    assert_eq!(lines, keys, "no --limit prints the whole range");
    let cache_growth_kib = cache_kib().saturating_sub(cache_before);
    let rss_growth_kib = peak.load(Ordering::Relaxed).saturating_sub(base);
    let growth_kib = rss_growth_kib.saturating_sub(cache_growth_kib);
    eprintln!(
        "server RSS {base} KiB before the scan, grew by {rss_growth_kib} KiB during it, of \
         which the block cache {cache_growth_kib} KiB"
    );
    assert!(
        growth_kib < 64 * 1024,
        "server RSS grew by {growth_kib} KiB besides the block cache during the scan (from \
         {base} KiB)"
    );

    // --limit N stops after N rows; --limit 0 is refused, never silently empty.
    let out = node.run(&["scan", "--tree", "big", "--limit", "3"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    let out = node.run(&["scan", "--tree", "big", "--limit", "0"]);
    assert!(!out.status.success(), "--limit 0 was accepted");
    assert!(stderr(&out).contains("--limit"), "{}", stderr(&out));
}

// ---- issue 10.17: get on a terminal ---------------------------------------------------

/// Runs `cmd` under a pseudo-terminal (util-linux `script`), returning what the terminal saw.
fn on_terminal(node: &Node, cmd: &str) -> Vec<u8> {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .env("TIDELINE_SECRETS", node.secrets())
        .stdin(Stdio::null())
        .output()
        .expect("run script (util-linux)");
    assert!(out.status.success(), "{cmd}: {}", stderr(&out));
    out.stdout
}

#[test]
fn get_ends_with_a_newline_on_a_terminal_and_prints_exact_bytes_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    assert!(node.run(&["put", "k1", "v1"]).status.success());
    let tty = on_terminal(&node, &format!("{} get --node {} k1", bin(), node.addr));
    assert!(
        tty.ends_with(b"v1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&tty)
    );
    let raw = on_terminal(
        &node,
        &format!("{} get --raw --node {} k1", bin(), node.addr),
    );
    assert!(raw.ends_with(b"v1"), "{:?}", String::from_utf8_lossy(&raw));
    // A pipe gets the value as stored.
    assert_eq!(node.run(&["get", "k1"]).stdout, b"v1");
}

// ---- issue 17.2: a failed load reports exactly what was committed ----------------------

#[test]
fn a_failed_load_commits_nothing_after_the_bad_line_and_says_what_it_committed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let mut input = Vec::new();
    for i in 1..=5000u32 {
        if i == 2501 {
            input.extend_from_slice(b"\tempty key\n");
        } else {
            writeln!(input, "k{i:05}\tv").unwrap();
        }
    }
    let out = run_with_stdin(&node, &["load"], &input);
    assert!(!out.status.success(), "a bad line must fail the load");
    let err = stderr(&out);
    assert!(err.contains("line 2501"), "{err}");
    assert!(err.contains("lines 1-2500 committed"), "{err}");
    assert!(err.contains("nothing after"), "{err}");
    // Exactly that, and nothing arrives later: the node's state once `load` has exited.
    let rows = node.run(&["scan", "--limit", "100000"]);
    let keys = String::from_utf8_lossy(&rows.stdout).lines().count();
    assert_eq!(keys, 2500, "{err}");
    assert_eq!(node.run(&["get", "k02502"]).status.code(), Some(1));
}

#[test]
fn load_atomic_commits_all_lines_in_one_transaction_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let out = run_with_stdin(&node, &["load", "--atomic"], b"a\t1\nb\t2\n\tbad\nc\t3\n");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("line 3") && err.contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(last_offset(&node), 0, "{err}");

    // Above the stated size: refused, nothing committed.
    let value = "x".repeat(1 << 20);
    let input: String = (0..17).map(|i| format!("big{i}\t{value}\n")).collect();
    let out = run_with_stdin(&node, &["load", "--atomic"], input.as_bytes());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--atomic") && err.contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(last_offset(&node), 0, "{err}");

    let input: String = (0..5000).map(|i| format!("k{i}\tv\n")).collect();
    let out = run_with_stdin(&node, &["load", "--atomic"], input.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["transactions"], 1, "{report}");
    assert_eq!(report["keys"], 5000, "{report}");
    assert_eq!(last_offset(&node), 1);
}

// ---- issue 17.3: large values -----------------------------------------------------------

#[test]
fn large_values_load_in_byte_sized_batches_and_put_reads_stdin_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    // Two 9 MB values: too much for one message, fine in two transactions.
    let big = "x".repeat(9_000_000);
    let input = format!("a\t{big}\nb\t{big}\n");
    let out = run_with_stdin(&node, &["load"], input.as_bytes());
    assert!(out.status.success(), "load: {}", stderr(&out));
    let got = node.run(&["get", "b"]);
    assert_eq!(got.stdout.len(), big.len());

    // A value over the node's limit is refused by name and line before anything is sent.
    let value = "y".repeat(17 << 20);
    let input = format!("c\tsmall\nd\t{value}\n");
    let out = run_with_stdin(&node, &["load"], input.as_bytes());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("line 2"), "{err}");
    assert!(err.contains("--value-bytes-max"), "{err}");
    assert!(!err.contains("stopped by peer"), "{err}");

    // put KEY - takes the value from stdin; --value-file from a file.
    let value = "z".repeat(200_000);
    let out = run_with_stdin(&node, &["put", "from-stdin", "-"], value.as_bytes());
    assert!(out.status.success(), "put -: {}", stderr(&out));
    assert_eq!(node.run(&["get", "from-stdin"]).stdout, value.as_bytes());
    let file = dir.path().join("value.bin");
    std::fs::write(&file, b"file\tvalue\n").unwrap();
    let out = node
        .cli()
        .args(["put", "--node", &node.addr, "from-file", "--value-file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "put --value-file: {}", stderr(&out));
    assert_eq!(node.run(&["get", "from-file"]).stdout, b"file\tvalue\n");
}

// ---- issue 17.4: another cluster's secrets -----------------------------------------------

#[test]
fn another_clusters_secrets_fail_fast_with_words_that_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("a"), 0);
    let other = Node::start(&dir.path().join("b"), 0);
    let wrong = other.secrets();
    let out = Command::new(bin())
        .args(["get", "--node", &node.addr, "k", "--secrets"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("belongs to another cluster"), "{err}");
    assert!(err.contains(&wrong.display().to_string()), "{err}");

    // tail gives up at once instead of retrying forever.
    let tail = Command::new(bin())
        .args([
            "tail",
            "--node",
            &node.addr,
            "--from",
            "earliest",
            "--secrets",
        ])
        .arg(&wrong)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(
        tail,
        Duration::from_secs(30),
        "tail with another cluster's CA",
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("belongs to another cluster"),
        "{}",
        stderr(&out)
    );

    // A replica holding the other cluster's secrets stops and says the same in `status`.
    let replica = Node::start_with(
        &dir.path().join("r"),
        0,
        &[
            "--upstream",
            &node.addr,
            "--secrets",
            &wrong.display().to_string(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = common::status(&replica);
        let up = &s["upstreams"][0];
        if up["state"] == "error" {
            let e = up["error"].as_str().unwrap_or_default();
            assert!(e.contains("belongs to another cluster"), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "replica never gave up: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A replica without --secrets would create a new cluster that can never connect.
    let fresh = dir.path().join("fresh");
    let out = Command::new(bin())
        .args(["serve", "--data"])
        .arg(&fresh)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--upstream", &node.addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(out, Duration::from_secs(30), "replica without --secrets");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--secrets"), "{}", stderr(&out));
    assert!(!fresh.join("secrets").exists(), "it created a new cluster");
}

/// Forwards each line of `r` into a channel, from a thread.
fn lines_of(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(r)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn a_tail_that_once_worked_rides_out_another_clusters_node_on_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a");
    let mut node = Node::start(&data, 0);
    let port = node.port();
    common::load(&node, 1, 1, 1);
    let mut tail = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--limit", "2",
        ])
        .env("TIDELINE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(tail.stdout.take().unwrap());
    let err = lines_of(tail.stderr.take().unwrap());
    out.recv_timeout(Duration::from_secs(30))
        .expect("the first transaction");
    node.kill9();
    // A node of another cluster answers on the same address: the tail keeps reconnecting.
    let stranger = Node::start(&dir.path().join("b"), port);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = err
            .recv_timeout(left)
            .expect("the tail ended or never reported the other cluster");
        if line.contains("reconnecting") && line.contains("another cluster") {
            break;
        }
    }
    drop(stranger);
    let node = Node::start(&data, port);
    common::load(&node, 2, 2, 1);
    let second = out
        .recv_timeout(Duration::from_secs(60))
        .expect("the second transaction once the node is back");
    assert!(second.contains("key:000002"), "{second}");
    let status = wait_bounded(tail, Duration::from_secs(30), "tail --limit 2").status;
    assert!(status.success());
}

// ---- issue 17.5 and 17.8: serve checks before it changes anything -----------------------

#[test]
fn serve_on_a_port_in_use_changes_nothing_and_says_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = dir.path().join("n");
    let out = Command::new(bin())
        .args(["serve", "--data"])
        .arg(&data)
        .args(["--listen", &addr])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&addr), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    assert!(
        !data.exists(),
        "serve created {} before failing",
        data.display()
    );
}

#[test]
fn messages_name_cli_steps_not_rust_apis() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(&dir.path().join("n"), 0, &["--read-only"]);
    let out = node.run(&["put", "k", "v"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("read-only"), "{err}");
    assert!(!err.contains("Engine::"), "{err}");
    assert!(err.contains("tideline serve"), "{err}");

    let node = Node::start(&dir.path().join("m"), 0);
    let key = "k".repeat(70_000);
    let out = node.run(&["put", &key, "v"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("EngineOptions"), "{err}");
    assert!(
        !err.contains("raise"),
        "the limit is already at its maximum: {err}"
    );

    // A secrets directory without ca.pem is missing a file, not holding a bad certificate.
    let empty = dir.path().join("empty-secrets");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(bin())
        .args(["status", "--node", &node.addr, "--secrets"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(!err.contains("not a valid PEM"), "{err}");
    assert!(err.contains("ca.pem"), "{err}");
}

// ---- issue 17.6: verify shows big values as a prefix, length and hash ------------------

#[test]
fn verify_shows_a_prefix_length_and_hash_of_big_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), 0);
    let secrets = a.secrets().display().to_string();
    let b = Node::start_with(&dir.path().join("b"), 0, &["--secrets", &secrets]);
    let value_a = "a".repeat(1_000_000);
    let value_b = "b".repeat(1_000_000);
    assert!(
        run_with_stdin(&a, &["put", "k", "-"], value_a.as_bytes())
            .status
            .success()
    );
    assert!(
        run_with_stdin(&b, &["put", "k", "-"], value_b.as_bytes())
            .status
            .success()
    );
    let verify = |extra: &[&str]| {
        a.cli()
            .args(["verify", "--node", &a.addr, "--node", &b.addr])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        out.stdout.len() < 10_000,
        "verify printed {} bytes",
        out.stdout.len()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let diff = &report["comparisons"][0]["first_difference"];
    assert_eq!(diff["key"], "k");
    assert_eq!(diff["first"]["bytes"], 1_000_000);
    assert!(diff["first"]["sha256"].is_string(), "{diff}");
    assert!(
        diff["first"]["prefix"]
            .as_str()
            .unwrap()
            .starts_with("aaaa"),
        "{diff}"
    );
    let out = verify(&["--full-values"]);
    assert!(out.stdout.len() > 2_000_000);

    // A tree bigger than one message (20 x 1 MB) is compared page by page, not refused.
    let value = "c".repeat(1_000_000);
    let input: String = (0..20).map(|i| format!("big{i:02}\t{value}\n")).collect();
    for node in [&a, &b] {
        let out = run_with_stdin(node, &["load", "--tree", "big"], input.as_bytes());
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = a
        .cli()
        .args(["verify", "--node", &a.addr, "--node", &b.addr])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("verify failed: {}", stderr(&out)));
    assert_eq!(
        report["comparisons"][0]["first_difference"]["tree"],
        "default"
    );
}

/// Bytes that are not UTF-8 are shown exactly, as base64 (`key_b64`, `first_b64`,
/// `other_b64`, as `tail` and `log dump` print them): two different values are never shown
/// alike, and a key present on one side only can be named.
#[test]
fn verify_shows_keys_and_values_that_are_not_utf8_as_base64() {
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(&dir.path().join("a"), 0);
    let secrets = a.secrets().display().to_string();
    let b = Node::start_with(&dir.path().join("b"), 0, &["--secrets", &secrets]);
    let load = |node: &Node, input: &[u8]| {
        let out = run_with_stdin(node, &["load"], input);
        assert!(out.status.success(), "load: {}", stderr(&out));
    };
    let verify = || {
        let out = a
            .cli()
            .args(["verify", "--node", &a.addr, "--node", &b.addr])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("verify printed no JSON: {}", stderr(&out)));
        report["comparisons"][0]["first_difference"].clone()
    };

    // The same key, values 0xfe and 0xff.
    load(&a, b"k\t\xfe\n");
    load(&b, b"k\t\xff\n");
    let diff = verify();
    assert_eq!(diff["key"], "k", "{diff}");
    assert_eq!(diff["first_b64"], "/g==", "{diff}");
    assert_eq!(diff["other_b64"], "/w==", "{diff}");
    assert_ne!(diff["first_b64"], diff["other_b64"], "{diff}");
    assert!(
        diff.get("first").is_none() && diff.get("other").is_none(),
        "{diff}"
    );

    // A key that is not UTF-8, present on the first node only.
    load(&b, b"k\t\xfe\n");
    load(&a, b"\xfe\x01\tv\n");
    let diff = verify();
    assert_eq!(diff["key_b64"], "/gE=", "{diff}");
    assert_eq!(diff["first"], "v", "{diff}");
    assert_eq!(diff["other"], Value::Null, "{diff}");
}

// ---- issue 17.7: scan | load round-trips any data -----------------------------------------

#[test]
fn scan_output_round_trips_through_load_whatever_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let pairs: [(&str, &str); 4] = [
        ("tab\tkey", "new\nline"),
        ("back\\slash", "c:\\temp\\n"),
        ("cr\rkey", "trailing tab\t"),
        ("plain", "value with spaces"),
    ];
    for (k, v) in pairs {
        let out = node.run(&["put", "--tree", "src", k, v]);
        assert!(out.status.success(), "put {k:?}: {}", stderr(&out));
    }
    let scan = node.run(&["scan", "--tree", "src"]);
    assert!(scan.status.success(), "{}", stderr(&scan));
    let out = run_with_stdin(&node, &["load", "--tree", "copy"], &scan.stdout);
    assert!(out.status.success(), "scan | load: {}", stderr(&out));
    for (k, v) in pairs {
        let got = node.run(&["get", "--tree", "copy", k]);
        assert_eq!(
            String::from_utf8_lossy(&got.stdout),
            v,
            "key {k:?} after scan | load; scan printed {:?}",
            String::from_utf8_lossy(&scan.stdout)
        );
    }
    // --help says how rows are escaped.
    let help = Command::new(bin())
        .args(["scan", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("\\t"));
}

// ---- issue 17.9: say what is happening ---------------------------------------------------

#[test]
fn checkpoint_over_from_empty_secrets_env_and_del_of_a_missing_key_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    common::load(&node, 1, 5, 1);

    // --from is overridden by a checkpoint that holds a position: stderr says so.
    let cp = dir.path().join("tail.cp");
    let tail = |from: &str| {
        node.cli()
            .args(["tail", "--node", &node.addr, "--from", from, "--limit", "2"])
            .arg("--checkpoint")
            .arg(&cp)
            .output()
            .unwrap()
    };
    let first = tail("earliest");
    assert!(first.status.success(), "{}", stderr(&first));
    let second = tail("offset:1");
    assert!(second.status.success(), "{}", stderr(&second));
    let err = stderr(&second);
    assert!(
        err.contains("--from") && err.contains("checkpoint"),
        "{err}"
    );

    // TIDELINE_SECRETS set but empty reads as unset: the client falls back to ./data/secrets,
    // as with no variable at all.
    let cwd = dir.path().join("cwd");
    std::fs::create_dir_all(cwd.join("data/secrets")).unwrap();
    for file in ["ca.pem", "token"] {
        std::fs::copy(
            node.secrets().join(file),
            cwd.join("data/secrets").join(file),
        )
        .unwrap();
    }
    let out = Command::new(bin())
        .args(["status", "--node", &node.addr])
        .env("TIDELINE_SECRETS", "")
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // del of a missing key: "no such key", exit 1, nothing committed.
    let before = last_offset(&node);
    let out = node.run(&["del", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no such key"), "{}", stderr(&out));
    assert_eq!(last_offset(&node), before, "del of a missing key committed");
    let out = node.run(&["del", "key:000001"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_bootstrapped_replicas_status_counts_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let primary = Node::start(&dir.path().join("p"), 0);
    common::load(&primary, 1, 6, 1);
    let secrets = primary.secrets().display().to_string();
    let replica = Node::start_with(
        &dir.path().join("r"),
        0,
        &["--upstream", &primary.addr, "--secrets", &secrets],
    );
    common::wait_gtids(&replica, &common::gtids(&primary));
    let s = common::status(&replica);
    // The copy brought the state, not the history: the log holds no record, and says so.
    assert_eq!(s["log_records"], 0, "{s}");
    assert_eq!(common::status(&primary)["log_records"], 6);
    let up = &s["upstreams"][0];
    assert_eq!(up["applied"], 6, "applied counts applied_gtids: {s}");
    assert!(up["applied_since_start"].is_u64(), "{s}");
}

// ---- issue 17.10: tail gives up on an absent node ----------------------------------------

#[test]
fn tail_of_an_absent_node_gives_up_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let (absent, _silent) = common::silent_addr();
    let tail = node
        .cli()
        .args([
            "tail",
            "--node",
            &absent,
            "--from",
            "earliest",
            "--timeout-ms",
            "1000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_bounded(tail, Duration::from_secs(30), "tail of an absent node");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(err.contains("--retry"), "{err}");
}

/// `tail --checkpoint` never saves a position past what it printed: a transaction whose line
/// could not be written (the reader of its output went away) is not counted as delivered, so
/// the next run starts with it.
#[test]
fn a_tail_whose_output_is_gone_saves_no_position_past_what_it_printed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    common::load(&node, 1, 3, 1);
    let cp = dir.path().join("tail.cp");
    // Output into a pipe whose reading end is already closed: the first line fails.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--limit", "3",
        ])
        .arg("--checkpoint")
        .arg(&cp)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let saved = std::fs::read_to_string(&cp).unwrap_or_default();
    let offset = serde_json::from_str::<serde_json::Value>(&saved)
        .ok()
        .and_then(|v| v["offset"].as_u64())
        .unwrap_or(0);
    assert_eq!(
        offset,
        0,
        "nothing was printed, yet the checkpoint holds offset {offset} ({}; tail said: {})",
        saved.trim(),
        stderr(&out)
    );
    // The next run prints from the first transaction.
    let again = node
        .cli()
        .args([
            "tail", "--node", &node.addr, "--from", "earliest", "--limit", "1",
        ])
        .arg("--checkpoint")
        .arg(&cp)
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let first: serde_json::Value =
        serde_json::from_slice(again.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
    assert_eq!(first["offset"].as_u64(), Some(1), "{first}");
}

/// `log dump | head -1`: a reader that goes away is the normal end of a dump, as for `scan`
/// and `tail`: exit 0 and nothing on stderr, wherever in a line the write finds the pipe
/// closed.
#[test]
fn a_log_dump_whose_reader_goes_away_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let value = "v".repeat(1024);
    common::load_lines(&node, 1, (0..2000).map(|i| format!("key:{i:06}\t{value}")));
    let mut dump = Command::new(bin())
        .args(["log", "dump", "--data"])
        .arg(&node.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(dump.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let first: Value = serde_json::from_str(&first).expect("log dump prints JSON lines");
    assert_eq!(first["offset"], 1, "{first}");
    drop(stdout);
    let out = wait_bounded(dump, Duration::from_secs(60), "log dump");
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (Some(0), String::new()),
        "log dump into a closed pipe"
    );
}

/// `demo` refuses counts it cannot do, saying which flag: it never reports work it did not do.
#[test]
fn demo_refuses_a_transaction_count_it_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["demo", "--txns", &u64::MAX.to_string()])
        .arg("--data")
        .arg(dir.path().join("d"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "demo --txns u64::MAX succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr(&out).contains("--txns"), "{}", stderr(&out));
}

/// A `load` whose node dies under it cannot know whether the batches in flight were
/// committed: it says so (README, "unknown outcome"), and never calls them not committed.
#[test]
fn a_load_cut_off_from_its_node_says_the_batches_in_flight_may_be_committed() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(&dir.path().join("n"), 0);
    let mut child = common::load_cmd(&node, &["--batch", "100", "--timeout-ms", "2000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let value = "v".repeat(100);
    // Lines flow until the load stops reading; the node is killed once some are committed.
    let feeder = std::thread::spawn(move || {
        for i in 0u64.. {
            if writeln!(stdin, "k:{i:09}\t{value}").is_err() {
                return;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while last_offset(&node) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the load committed nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    node.kill9();
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("may or may not have been committed"),
        "the load did not say its batches in flight have an unknown outcome: {err}"
    );
    assert!(
        !err.contains("not committed)"),
        "the load called a batch whose answer was lost not committed: {err}"
    );
}

/// `top --json | head -1`: a reader that goes away is the normal end of the output, as for
/// `scan` and `tail`: exit 0 and nothing on stderr (not a panic on the next interval's line).
#[test]
fn top_whose_reader_goes_away_after_one_interval_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let mut top = node
        .cli()
        .args([
            "top",
            "--json",
            "--interval-ms",
            "100",
            "--iterations",
            "20",
        ])
        .args(["--node", &node.addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(top.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let first: Value = serde_json::from_str(&first).expect("top --json prints JSON lines");
    assert!(first["requests"].is_u64(), "{first}");
    drop(stdout);
    let out = wait_bounded(top, Duration::from_secs(60), "top --json");
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (Some(0), String::new()),
        "top --json into a closed pipe"
    );
}
