//! Helpers shared by the process-level tests: the one node launcher (start `tideline serve`,
//! wait until it serves, kill it), CLI runs, the peer benchmark runner.
//!
//! The `tideline` binary belongs to another package, so Cargo gives these tests no
//! `CARGO_BIN_EXE_tideline`: [`bin`] finds it next to the test executable (both live in the
//! same target profile directory). `cargo nextest run --workspace` builds it (the root
//! package's `tests/binary.rs` makes Cargo do so) and `scripts/test` builds every binary first;
//! `-p tideline-integration` alone does not, and [`bin`] then says what to build.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `tideline` binary of this build profile: `target/<profile>/tideline`, next to
/// `target/<profile>/deps/<test>-<hash>`. Panics, naming the command that builds it, when it
/// is not there.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the running test executable");
        // target/<profile>/deps/<test> -> target/<profile>/tideline
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in target/<profile>/deps");
        let bin = profile_dir.join(format!("tideline{}", std::env::consts::EXE_SUFFIX));
        let built = std::fs::metadata(&bin).is_ok_and(|m| m.is_file() && m.len() > 0);
        assert!(
            built,
            "the tideline binary is not at {} (or is empty): build it first with \
             `cargo build -p tideline --bin tideline`, or run the tests with `scripts/test` or \
             `cargo nextest run --workspace`, which build it",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    })
}

/// The `peer-bench` binary, built by Cargo for this package's tests.
pub const PEER_BENCH: &str = env!("CARGO_BIN_EXE_peer-bench");

pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free UDP port on loopback")
}

pub struct Node {
    child: Option<Child>,
    pub data: PathBuf,
    pub addr: String,
    secrets: PathBuf,
    /// The HTTP admin's address, when started with `--http`.
    pub admin: Option<String>,
}

impl Node {
    pub fn start(data: &Path, port: u16) -> Node {
        Node::start_with(data, port, &[])
    }

    pub fn start_with(data: &Path, port: u16, extra: &[&str]) -> Node {
        let addr = format!("127.0.0.1:{port}");
        let mut child = Command::new(bin())
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &addr])
            .args(extra)
            .env("TIDELINE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tideline serve");
        // The node prints one line when it serves.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = None;
        loop {
            assert!(Instant::now() < deadline, "node did not start");
            match lines.next() {
                Some(Ok(l)) if l.contains("tideline serving on") => break,
                Some(Ok(l)) if l.starts_with("tideline admin on http://") => {
                    admin = l
                        .strip_prefix("tideline admin on http://")
                        .map(|a| a.trim_end_matches('/').to_string());
                }
                Some(Ok(_)) => {}
                other => panic!("node exited before serving: {other:?}"),
            }
        }
        // Keep draining stderr so the node never blocks on a full pipe; its warnings go to the
        // test's output (shown when the test fails).
        let tag = addr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("[node {tag}] {line}");
            }
        });
        let secrets = extra
            .iter()
            .position(|a| *a == "--secrets")
            .and_then(|i| extra.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| data.join("secrets"));
        Node {
            child: Some(child),
            data: data.to_path_buf(),
            addr,
            secrets,
            admin,
        }
    }

    pub fn secrets(&self) -> PathBuf {
        self.secrets.clone()
    }

    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("TIDELINE_SECRETS", self.secrets());
        c
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        self.cli()
            .args(args)
            .args(["--node", &self.addr])
            .output()
            .expect("run tideline")
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Waits for the node to exit by itself; returns its status.
    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| c.wait().ok())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn load(node: &Node, from: u64, to: u64, batch: usize) {
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", &batch.to_string()])
        // One transaction at a time, so offsets follow key order.
        .args(["--parallel", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for i in from..=to {
            writeln!(stdin, "key:{i:06}\tvalue-{i}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

/// The number at `path` in a JSON report, asserted positive.
pub fn positive(report: &serde_json::Value, path: &[&str]) -> f64 {
    let mut v = report;
    for key in path {
        v = &v[*key];
    }
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{} is not a number in {report}", path.join(".")));
    assert!(x > 0.0, "{} is {x}, expected > 0", path.join("."));
    x
}

/// Runs `peer-bench ARGS --json --dir DIR` and returns its report.
pub fn run_bench(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(PEER_BENCH)
        .args(args)
        .arg("--json")
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run peer-bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

pub fn status(node: &Node) -> Value {
    let out = node.run(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status is JSON")
}

pub fn gtids(node: &Node) -> String {
    status(node)["gtid_executed"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits until `node` has executed `want`, or fails after 60 s.
pub fn wait_gtids(node: &Node, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = gtids(node);
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {have}, expected {want}; status: {}",
            node.addr,
            status(node)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn scan(node: &Node, tree: &str) -> String {
    let out = node.run(&["scan", "--tree", tree, "--limit", "1000000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Resident memory of process `pid` in KiB, from `/proc` (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
