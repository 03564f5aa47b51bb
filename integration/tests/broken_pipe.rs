//! Every command that prints a result on stdout, run with stdout a pipe whose reader has
//! already gone (`tideline status | head -2`, `tideline index list --json | true`): a reader
//! that goes away is the normal end of the output, so the command ends as it would have
//! (exit 0 in every case here) and says nothing about the pipe on stderr. Guards against
//! `println!`, which panics on the closed pipe ("failed printing to stdout: Broken pipe",
//! exit 101), and against a plain `?` on the write ("error: Broken pipe", exit 1). `log dump`,
//! `scan`, `tail` and `top` have their own such tests (`cli.rs`).
//!
//! Each test runs all its commands, then fails once listing every command that did not end
//! quietly. The read-only commands are first run into an ordinary pipe and must print
//! something there, so a command that printed nothing could not pass the closed-pipe run.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
mod sinkkit;

use common::{Node, bin};

/// Runs `cmd` with stdout the write end of a pipe whose read end is closed (every write
/// fails with EPIPE), `stdin` on its stdin; stderr is captured.
fn into_closed_pipe(cmd: &mut Command, stdin: &[u8]) -> Output {
    let (reader, writer) = std::io::pipe().expect("create a pipe");
    drop(reader);
    let mut child = cmd
        // A panic's message alone, without a backtrace, in the failure list.
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tideline");
    // The parent's copy of the write end goes with `cmd`'s stdio; the child holds its own.
    let mut input = child.stdin.take().expect("piped stdin");
    let _ = input.write_all(stdin);
    drop(input);
    child.wait_with_output().expect("wait for tideline")
}

/// The ways the commands ended that were not a quiet exit 0, one line each.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    /// Records `what` unless it exited 0 with no panic and no broken-pipe error on stderr.
    fn check(&mut self, what: &str, out: &Output) {
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(0)
            || err.contains("panicked")
            || err.to_lowercase().contains("broken pipe")
        {
            self.0.push(format!(
                "{what}: exit {:?}, stderr {:?}",
                out.status.code(),
                err.trim_end()
            ));
        }
    }

    fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "commands that did not end quietly into a closed pipe:\n{}",
            self.0.join("\n")
        );
    }
}

/// `tideline ARGS` for `node`'s cluster (the node's address is not appended).
fn tideline(node: &Node, args: &[&str]) -> Command {
    let mut c = node.cli();
    c.args(args);
    c
}

/// Runs a read-only command first into an ordinary pipe (it must succeed and print), then
/// into a closed one.
fn read_only(f: &mut Failures, what: &str, mut cmd: impl FnMut() -> Command) {
    let normal = cmd().stdin(Stdio::null()).output().expect("run tideline");
    assert!(
        normal.status.success() && !normal.stdout.is_empty(),
        "{what} into an ordinary pipe: exit {:?}, stdout {:?}, stderr {}",
        normal.status.code(),
        String::from_utf8_lossy(&normal.stdout),
        String::from_utf8_lossy(&normal.stderr)
    );
    f.check(what, &into_closed_pipe(&mut cmd(), b""));
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_commands_into_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let addr = node.addr.clone();
    ok(&node.run(&["put", "--tree", "users", "u1", r#"{"email":"a@x"}"#]));
    ok(&node.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email", "--wait",
    ]));
    // Slot `s`, left by a consumer that has ended.
    ok(
        &tideline(&node, &["tail", "--node", &addr, "--from", "earliest"])
            .args(["--slot", "s", "--limit", "1"])
            .output()
            .unwrap(),
    );

    let mut f = Failures::default();
    let at = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (node, addr) = (&node, addr.clone());
        move || {
            let mut c = tideline(node, &args.iter().map(String::as_str).collect::<Vec<_>>());
            c.args(["--node", &addr]);
            c
        }
    };
    for args in [
        &["status"][..],
        &["index", "list"],
        &["index", "list", "--json"],
        &["index", "status", "--tree", "users", "--name", "by_email"],
        &[
            "index", "status", "--tree", "users", "--name", "by_email", "--json",
        ],
        &["slot", "list"],
        &["slot", "list", "--json"],
        &["get", "--tree", "users", "u1"],
        &["bench", "node", "--requests", "20", "--clients", "1"],
        &[
            "bench",
            "node",
            "--requests",
            "20",
            "--clients",
            "1",
            "--json",
        ],
    ] {
        read_only(&mut f, &args.join(" "), at(args));
    }
    read_only(&mut f, "verify", || {
        tideline(&node, &["verify", "--node", &addr, "--node", &addr])
    });

    // The writes: each is committed although its answer could not be printed.
    let write = |args: &[&str]| into_closed_pipe(&mut at(args)(), b"");
    f.check("put", &write(&["put", "--tree", "t", "k", "v"]));
    f.check(
        "index create",
        &write(&[
            "index", "create", "--tree", "t", "--name", "i", "--path", "/a",
        ]),
    );
    f.check(
        "index drop",
        &write(&["index", "drop", "--tree", "t", "--name", "i"]),
    );
    f.check("del", &write(&["del", "--tree", "t", "k"]));
    f.check(
        "load",
        &into_closed_pipe(&mut at(&["load", "--tree", "t"])(), b"k1\tv1\nk2\tv2\n"),
    );
    // The node frees the ended consumer's slot once it has seen the connection close.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dropped = loop {
        let out = write(&["slot", "drop", "s"]);
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("in use by a live subscription") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        break out;
    };
    f.check("slot drop", &dropped);
    let status = common::status(&node);
    assert_eq!(
        status["slots"].as_array().map(Vec::len),
        Some(0),
        "slot drop did not drop: {status}"
    );
    assert!(
        status["indexes"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["name"] != "i")),
        "index drop did not drop: {status}"
    );
    assert_eq!(
        common::scan(&node, "t"),
        "k1\tv1\nk2\tv2\n",
        "put, del, load"
    );
    f.assert_none();
}

#[test]
fn offline_commands_into_a_closed_pipe_end_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let bench_dir = dir.path().join("bench");
    let bench_dir = bench_dir.to_str().expect("a UTF-8 path");
    let mut f = Failures::default();
    let cases: &[&[&str]] = &[
        &["demo", "--txns", "10", "--writers", "1"],
        &[
            "bench",
            "wal",
            "--dir",
            bench_dir,
            "--writers",
            "1",
            "--seconds",
            "0.05",
            "--bandwidth-mib",
            "1",
            "--log-mib",
            "1",
        ],
        &["bench", "sink-file", "--dir", bench_dir, "--changes", "100"],
        &[
            "bench",
            "index",
            "--dir",
            bench_dir,
            "--docs",
            "100",
            "--rate",
            "100",
            "--seconds",
            "0.05",
            "--rounds",
            "1",
            "--writers",
            "1",
        ],
    ];
    for args in cases {
        for json in [false, true] {
            if json && args[0] == "demo" {
                continue;
            }
            let mut args = args.to_vec();
            if json {
                args.push("--json");
            }
            read_only(&mut f, &args.join(" "), || {
                let mut c = Command::new(bin());
                c.args(&args);
                c
            });
        }
    }
    f.assert_none();
}

/// `connect --check` prints one line per pipeline; a file sink needs no service.
#[test]
fn connect_check_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    let body = format!(
        "[source]\nnode = \"{}\"\nsecrets = \"{}\"\nfrom = \"earliest\"\n\n\
         [sink]\nkind = \"file\"\npath = \"{}\"\n",
        node.addr,
        node.secrets().display(),
        dir.path().join("out.jsonl").display()
    );
    let file = sinkkit::pipeline_file(dir.path(), "p", &body);
    let check = |file: &Path| {
        let mut c = Command::new(bin());
        c.args(["connect", "--check", "--config"]).arg(file);
        c
    };
    let mut f = Failures::default();
    read_only(&mut f, "connect --check", || check(&file));
    f.assert_none();
}
