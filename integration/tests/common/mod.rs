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
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// An address on loopback where nothing answers, for "cannot reach" tests: a UDP socket bound
/// and kept (return value 2) for as long as the caller holds it, so no node of another test
/// can be given that port meanwhile; it reads nothing, so a QUIC client times out. Nodes
/// never take a port from here: they bind port 0 and report theirs ([`Node::start`]).
pub fn silent_addr() -> (String, UdpSocket) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("a free UDP port on loopback");
    let addr = socket.local_addr().expect("the bound address").to_string();
    (addr, socket)
}

/// What a [`Relay`] does to the datagrams it passes, each way: drop a share (`loss`, 0..1),
/// delay each by `delay` plus a random part up to `jitter` (datagrams overtake each other:
/// reordering), pass at most `rate` bytes per second (0: unlimited; the excess queues up to
/// [`RELAY_QUEUE_BYTES`], beyond which it drops, as a router's queue does), or `hold`
/// everything (dropped). The default passes everything at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Impair {
    pub loss: f64,
    pub delay: Duration,
    pub jitter: Duration,
    pub rate: u64,
    pub hold: bool,
}

/// The bytes a [`Relay`] queues per direction before it drops.
pub const RELAY_QUEUE_BYTES: usize = 256 << 10;

/// A UDP relay on loopback between one client and a node: the network faults of `tc netem`
/// (loss, delay, reordering, rate limits, partitions) in user space, for tests on any kernel
/// and without root, and for tests that need a transfer observably in flight. The client
/// dials [`Relay::addr`]; the target may go silent and come back on the same address (a
/// node killed and restarted). Random choices come from `seed`, printed by the test.
pub struct Relay {
    pub addr: String,
    impair: Arc<Mutex<Impair>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

type Datagram = std::cmp::Reverse<(Instant, u64, Vec<u8>)>;

/// One direction of a relay: datagrams waiting for their time.
#[derive(Default)]
struct Lane {
    queue: Mutex<LaneQueue>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct LaneQueue {
    heap: std::collections::BinaryHeap<Datagram>,
    bytes: usize,
    seq: u64,
    next_slot: Option<Instant>,
}

impl Lane {
    /// Queues `data` as `impair` says (or drops it).
    fn push(&self, data: &[u8], impair: Impair, rng: &mut impl rand::Rng) {
        if impair.hold || (impair.loss > 0.0 && rng.random::<f64>() < impair.loss) {
            return;
        }
        let now = Instant::now();
        let mut due = now + impair.delay;
        if !impair.jitter.is_zero() {
            due += impair.jitter.mul_f64(rng.random::<f64>());
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.bytes + data.len() > RELAY_QUEUE_BYTES {
            return;
        }
        if impair.rate > 0 {
            let slot = q.next_slot.unwrap_or(now).max(now)
                + Duration::from_secs_f64(data.len() as f64 / impair.rate as f64);
            q.next_slot = Some(slot);
            due = due.max(slot);
        }
        q.seq += 1;
        let seq = q.seq;
        q.bytes += data.len();
        q.heap.push(std::cmp::Reverse((due, seq, data.to_vec())));
        self.ready.notify_one();
    }

    /// The next datagram whose time has come, waiting at most 20 ms.
    fn pop(&self) -> Option<Vec<u8>> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let wait = match q.heap.peek() {
            Some(std::cmp::Reverse((due, _, _))) if *due <= now => {
                let std::cmp::Reverse((_, _, data)) = q.heap.pop()?;
                q.bytes -= data.len();
                return Some(data);
            }
            Some(std::cmp::Reverse((due, _, _))) => (*due - now).min(Duration::from_millis(20)),
            None => Duration::from_millis(20),
        };
        let _ = self.ready.wait_timeout(q, wait);
        None
    }

    fn clear(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.heap.clear();
        q.bytes = 0;
        q.next_slot = None;
    }
}

impl Relay {
    /// Relays to `target` (`host:port`) with `impair` from the start.
    pub fn start(target: &str, impair: Impair, seed: u64) -> Relay {
        use rand::SeedableRng;
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind the relay's front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind the relay's back");
        back.connect(target).expect("aim the relay at its target");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(20)))
                .expect("set a read timeout");
        }
        let addr = front.local_addr().expect("the relay's address").to_string();
        let front = Arc::new(front);
        let back = Arc::new(back);
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let impair = Arc::new(Mutex::new(impair));
        let stop = Arc::new(AtomicBool::new(false));
        let up = Arc::new(Lane::default());
        let down = Arc::new(Lane::default());
        let mut threads = Vec::new();
        // Receivers: the client's datagrams onto the up lane, the node's onto the down lane.
        for (dir, lane) in [(0u64, up.clone()), (1, down.clone())] {
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            let (impair, stop) = (impair.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ dir);
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let n = if dir == 0 {
                        let Ok((n, from)) = front.recv_from(&mut buf) else {
                            continue;
                        };
                        *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                        n
                    } else {
                        // A dead target refuses; the client's retries go on regardless.
                        let Ok(n) = back.recv(&mut buf) else {
                            continue;
                        };
                        n
                    };
                    let now = *impair.lock().unwrap_or_else(|p| p.into_inner());
                    lane.push(&buf[..n], now, &mut rng);
                }
            }));
        }
        // Senders: each lane's datagrams out when their time comes.
        for (dir, lane) in [(0u64, up), (1, down)] {
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            let (impair, stop) = (impair.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(data) = lane.pop() else {
                        continue;
                    };
                    if impair.lock().unwrap_or_else(|p| p.into_inner()).hold {
                        lane.clear();
                        continue;
                    }
                    if dir == 0 {
                        let _ = back.send(&data);
                    } else if let Some(to) = *client.lock().unwrap_or_else(|p| p.into_inner()) {
                        let _ = front.send_to(&data, to);
                    }
                }
            }));
        }
        Relay {
            addr,
            impair,
            stop,
            threads,
        }
    }

    /// From now on, impairs as `impair` says.
    pub fn set(&self, impair: Impair) {
        *self.impair.lock().unwrap_or_else(|p| p.into_inner()) = impair;
    }

    /// Stops all traffic both ways (a partition), or lifts every impairment (`false`).
    pub fn hold(&self, on: bool) {
        self.set(Impair {
            hold: on,
            ..Impair::default()
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends signal `sig` (by name: `TERM`, `INT`, `STOP`, `CONT`, or by number) to `pid`; the
/// `kill` tool keeps the tests free of unsafe code.
#[allow(dead_code)]
pub fn send_signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A port that was free a moment ago, for tests that need a TCP port where nothing listens.
/// Nodes start on port 0 ([`Node::start`]), which cannot race with other tests; a pipeline a
/// node runs (`serve --connect`) follows that node when its `[source]` names no `node`.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    let udp = UdpSocket::bind("127.0.0.1:0").expect("a free UDP port on loopback");
    let port = udp.local_addr().expect("the bound address").port();
    // The node listens on UDP (QUIC); keep the port free on TCP too for services' tests.
    drop(udp);
    port
}

pub struct Node {
    child: Option<Child>,
    pub data: PathBuf,
    pub addr: String,
    secrets: PathBuf,
    /// The HTTP admin's address, when started with `--http`.
    pub admin: Option<String>,
    stderr_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The network namespace the node runs in (`None`: the test's own).
    netns: Option<String>,
}

/// A command running the `tideline` binary in network namespace `netns` (or in this one).
pub fn in_netns(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    }
}

impl Node {
    /// Starts `tideline serve` on `127.0.0.1:port`; port 0 lets the node pick a free one
    /// (no race with other tests), and [`Node::addr`] is the one it reports it bound.
    pub fn start(data: &Path, port: u16) -> Node {
        Node::start_with(data, port, &[])
    }

    pub fn start_with(data: &Path, port: u16, extra: &[&str]) -> Node {
        Node::start_in(None, data, &format!("127.0.0.1:{port}"), extra)
    }

    /// Starts `tideline serve --listen LISTEN` inside network namespace `netns` (through
    /// `ip netns exec`; root only), or in this one. Its `cli()` runs there too.
    pub fn start_in(netns: Option<&str>, data: &Path, listen: &str, extra: &[&str]) -> Node {
        Node::start_env(netns, data, listen, extra, &[])
    }

    /// [`Node::start_in`] with extra environment variables for the node.
    pub fn start_env(
        netns: Option<&str>,
        data: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let mut cmd = in_netns(netns);
        let mut child = cmd
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", listen])
            .args(extra)
            .env("TIDELINE_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tideline serve");
        // The node prints one line when it serves.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut admin = None;
        let mut early = Vec::new();
        let addr = loop {
            assert!(Instant::now() < deadline, "node did not start");
            match lines.next() {
                Some(Ok(l)) if l.starts_with("tideline serving on ") => {
                    // "tideline serving on ADDR (server_uuid ...": the address it bound.
                    let bound = l["tideline serving on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    assert!(
                        bound.parse::<std::net::SocketAddr>().is_ok(),
                        "the node's ready line names no address: {l}"
                    );
                    break bound;
                }
                Some(Ok(l)) if l.starts_with("tideline admin on http://") => {
                    admin = l
                        .strip_prefix("tideline admin on http://")
                        .map(|a| a.trim_end_matches('/').to_string());
                }
                Some(Ok(l)) => early.push(l),
                other => panic!("node exited before serving ({other:?}); its stderr: {early:?}"),
            }
        };
        // Keep draining stderr so the node never blocks on a full pipe; its warnings go to the
        // test's output (shown when the test fails) and are kept for `stderr_lines`.
        let tag = addr.clone();
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr_lines = kept.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("[node {tag}] {line}");
                kept.lock().unwrap_or_else(|p| p.into_inner()).push(line);
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
            stderr_lines,
            netns: netns.map(str::to_string),
        }
    }

    /// The port the node listens on (to restart it on the same address).
    pub fn port(&self) -> u16 {
        self.addr
            .parse::<std::net::SocketAddr>()
            .expect("the node's address")
            .port()
    }

    pub fn secrets(&self) -> PathBuf {
        self.secrets.clone()
    }

    pub fn cli(&self) -> Command {
        let mut c = in_netns(self.netns.as_deref());
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

    /// The lines the node wrote to stderr after its ready line, so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr_lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a stderr line (after the ready line) containing `text`.
    pub fn wait_stderr(&self, text: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.stderr_lines().into_iter().find(|l| l.contains(text)) {
                return Some(l);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the node to exit by itself; its status, or `None` if it is
    /// still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// `tideline load --node ADDR ARGS...`, its stdin piped for the caller's `KEY<TAB>VALUE`
/// lines and its stdout dropped; the caller may set more before it spawns it.
pub fn load_cmd(node: &Node, args: &[&str]) -> Command {
    let mut cmd = node.cli();
    cmd.args(["load", "--node", &node.addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    cmd
}

/// Loads `lines` (`KEY<TAB>VALUE`) in transactions of `batch` lines, one transaction at a
/// time (offsets follow the lines' order); fails unless the load succeeds.
pub fn load_lines(node: &Node, batch: usize, lines: impl IntoIterator<Item = String>) {
    let mut child = load_cmd(node, &["--batch", &batch.to_string(), "--parallel", "1"])
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for line in lines {
            writeln!(stdin, "{line}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

/// Loads `key:NNNNNN` → `value-N` for N in `from..=to`, `batch` lines per transaction.
pub fn load(node: &Node, from: u64, to: u64, batch: usize) {
    load_lines(
        node,
        batch,
        (from..=to).map(|i| format!("key:{i:06}\tvalue-{i}")),
    );
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

/// Resident memory of process `pid` in KiB, from `/proc/PID/status` (`VmRSS`). Panics when it
/// cannot be read: a bound checked against 0 would pass whatever the node does.
pub fn rss_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {path} for the node's RSS: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS line in {path}"))
}

/// Waits until `node`'s status lists a live subscription for which `pred` holds (its fields
/// are those of `status`'s `consumers[]`: `start`, `tree`, `prefix`, `slot`, `sent_through`,
/// ...), or fails after 30 s. Returns that subscription.
pub fn wait_consumer(node: &Node, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(node);
        if let Some(c) = s["consumers"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| pred(c)))
        {
            return c.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no subscription {what} on {} within 30 s; status: {s}",
            node.addr
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bare quinn client endpoint that trusts the cluster CA of `secrets` and speaks
/// `tideline/1`, for peers that misbehave on purpose: keep-alives every second and an idle
/// timeout of `idle` (far longer than the node's limits), so that only the node ends their
/// connections.
pub fn raw_endpoint(secrets: &Path, idle: Duration) -> quinn::Endpoint {
    use tideline_stream::{proto, tls};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(tls::load_client_dir(secrets).expect("secrets").ca)
        .expect("CA");
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).expect("QUIC TLS");
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(idle).expect("idle")));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    client_cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(client_cfg);
    ep
}

/// Waits for `child` to exit by itself within `limit`; kills it and fails otherwise, with
/// what it wrote to stderr.
pub fn wait_bounded(
    mut child: std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> std::process::Output {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("collect output"),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("collect output");
                panic!(
                    "{what} still running after {limit:?}; stderr so far:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
