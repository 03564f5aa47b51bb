//! Real network faults between real `tideline` processes: primary A and replica B run in two
//! network namespaces the test creates, joined by a veth pair (10.231.N.1 and .2); a writer
//! commits on A and a tail in B's namespace follows A across the link, while the link gets
//! `tc netem` delay, loss and reordering, then a partition (link down) with writes going on,
//! then B is paused (SIGSTOP) and resumed. After each heal B converges to A's GTID set within
//! 10 s (the time is printed), and at the end B's state equals A's (`tideline verify`) and the
//! tail's history has no gap and no duplicate.
//!
//! Needs root (`ip netns`, `tc`). Without them the test skips with a loud line, except under
//! CI (`CI` set), where it fails. A kernel without `sch_netem` skips the netem round loudly.
//!
//! The second test puts the same faults — loss, delay with reordering, a rate limit, a
//! partition — between real processes on loopback with user-space relays
//! ([`common::Relay`]), so that they are tested on every machine, netem or not.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Impair, Node, Relay, gtids, send_signal, status};

/// Two namespaces joined by a veth pair; removed on drop.
struct Net {
    a: String,
    b: String,
    veth_a: String,
    ip_a: String,
    ip_b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    fn create() -> Result<Net, String> {
        let id = std::process::id();
        let n = id % 250 + 1;
        let net = Net {
            a: format!("tl{id}a"),
            b: format!("tl{id}b"),
            veth_a: format!("tv{id}a"),
            ip_a: format!("10.231.{n}.1"),
            ip_b: format!("10.231.{n}.2"),
        };
        let veth_b = format!("tv{id}b");
        ip(&["netns", "add", &net.a])?;
        ip(&["netns", "add", &net.b])?;
        ip(&[
            "link",
            "add",
            &net.veth_a,
            "netns",
            &net.a,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
            "netns",
            &net.b,
        ])?;
        for (ns, dev, addr) in [
            (&net.a, &net.veth_a, &net.ip_a),
            (&net.b, &veth_b, &net.ip_b),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn create_or_skip() -> Option<Net> {
        match Net::create() {
            Ok(n) => Some(n),
            Err(why) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must run the network-fault test: {why} (run as root)"
                );
                eprintln!("SKIPPED: the network-fault test needs network namespaces ({why})");
                None
            }
        }
    }

    /// Replaces A's side of the link's queueing with `netem ARGS` (empty: none). Returns
    /// false, with a loud line, when the kernel has no netem (`sch_netem`).
    fn netem(&self, args: &[&str]) -> bool {
        let _ = Command::new("tc")
            .args(["-n", &self.a, "qdisc", "del", "dev", &self.veth_a, "root"])
            .output();
        if args.is_empty() {
            return true;
        }
        let out = Command::new("tc")
            .args([
                "-n",
                &self.a,
                "qdisc",
                "add",
                "dev",
                &self.veth_a,
                "root",
                "netem",
            ])
            .args(args)
            .output()
            .expect("run tc");
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && err.contains("qdisc kind is unknown") {
            eprintln!(
                "SKIPPED netem round: this kernel has no sch_netem ({})",
                err.trim()
            );
            return false;
        }
        assert!(out.status.success(), "tc netem {args:?}: {err}");
        true
    }

    fn link(&self, up: bool) {
        ip(&[
            "-n",
            &self.a,
            "link",
            "set",
            &self.veth_a,
            if up { "up" } else { "down" },
        ])
        .expect("set the link");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

/// Loads `count` single-put transactions into `node` from its namespace.
fn load(node: &Node, from: u64, count: u64) {
    load_sized(node, from, count, 0)
}

/// Loads `count` single-put transactions into `node`, values padded to `bytes`.
fn load_sized(node: &Node, from: u64, count: u64, bytes: usize) {
    common::load_lines(
        node,
        1,
        (from..from + count).map(|i| {
            let value = format!("v{i}");
            let pad = "p".repeat(bytes.saturating_sub(value.len()));
            format!("k{i:06}\t{value}{pad}")
        }),
    );
}

/// Waits until `node` has `want`; returns how long that took. Fails after `limit`.
fn converge(node: &Node, want: &str, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        if gtids(node) == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{what}: B did not converge within {limit:?}: {}",
            status(node)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `node`'s first upstream is not `connected` (it noticed a dead link), or fails
/// after 30 s.
fn wait_upstream_down(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(node);
        if s["upstreams"][0]["state"] != "connected" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "B never noticed the partition: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed (and reaped) when the test ends, whatever way it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_replica_and_a_tail_ride_out_loss_partitions_and_pauses() {
    let Some(net) = Net::create_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    let timeouts = ["--timeout-ms", "2000"];
    let a = Node::start_in(
        Some(&net.a),
        &dir.path().join("a"),
        &format!("{}:0", net.ip_a),
        &["--secrets", s],
    );
    let b_args = vec![
        "--secrets",
        s,
        "--bootstrap",
        "never",
        "--upstream",
        &a.addr,
    ];
    let b = Node::start_in(
        Some(&net.b),
        &dir.path().join("b"),
        &format!("{}:0", net.ip_b),
        &b_args,
    );
    // A tail in B's namespace, across the link, from A.
    let mut tail = KillOnDrop(
        b.cli()
            .args(["tail", "--node", &a.addr, "--from", "earliest"])
            .args(timeouts)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // A tail that never reached its node gives up; one that did rides out anything. Start the
    // faults once A lists the subscription.
    common::wait_consumer(&a, "of the tail across the link", |c| {
        c["start"] == "earliest"
    });
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let stdout = tail.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&l).expect("tail prints JSON");
            if tx.send(v["offset"].as_u64().expect("offset")).is_err() {
                break;
            }
        }
    });

    let mut next = 1;
    // Each round: the fault, 40 commits on A, until `felt` holds, then the heal.
    let mut round = |name: &str, fault: &dyn Fn() -> bool, felt: &dyn Fn(), heal: &dyn Fn()| {
        if !fault() {
            return;
        }
        load(&a, next, 40);
        next += 40;
        felt();
        heal();
        let took = converge(&b, &gtids(&a), Duration::from_secs(10), name);
        eprintln!("{name}: B converged {took:?} after the heal");
    };
    // The three rounds, `TIDELINE_NETFAULT_CYCLES` times (default once; `scripts/soak` runs
    // more).
    let cycles: u64 = std::env::var("TIDELINE_NETFAULT_CYCLES")
        .ok()
        .map(|c| {
            c.trim()
                .parse()
                .unwrap_or_else(|_| panic!("TIDELINE_NETFAULT_CYCLES={c:?} is not a number"))
        })
        .unwrap_or(1);
    for cycle in 1..=cycles {
        eprintln!("netfault cycle {cycle} of {cycles}");
        round(
            "delay 20ms, 10% loss, reordering",
            &|| {
                net.netem(&[
                    "delay", "20ms", "5ms", "loss", "10%", "reorder", "25%", "50%",
                ])
            },
            &|| {},
            &|| {
                net.netem(&[]);
            },
        );
        round(
            "partition (link down) while A commits",
            &|| {
                net.link(false);
                true
            },
            // Until B has noticed: its upstream is no longer connected (it must reconnect).
            &|| wait_upstream_down(&b),
            &|| net.link(true),
        );
        round(
            "B paused (SIGSTOP) while A commits",
            &|| {
                send_signal(b.pid(), "STOP");
                true
            },
            &|| {},
            &|| send_signal(b.pid(), "CONT"),
        );
    }
    // Every round commits on A, whatever the network did: the last one always runs.
    load(&a, next, 10);
    next += 10;
    converge(
        &b,
        &gtids(&a),
        Duration::from_secs(10),
        "after the last heal",
    );

    // Equal state, and the tail has every transaction once, in order.
    equal_and_every_offset_once(&a, &b, &rx, next - 1);
    drop(tail);
}

/// The faults of `tc netem`, in user space: B replicates and a tail follows A through relays
/// that drop, delay and reorder, limit the rate, and partition. Under each fault (except the
/// partition) B must keep up with A's commits; after each heal B converges within 10 s; at
/// the end B's state equals A's and the tail has every transaction once, in order. The
/// relays' randomness comes from a printed seed (`TIDELINE_TEST_SEED` replays it).
#[test]
fn a_replica_and_a_tail_ride_out_loss_delay_reordering_and_rate_limits_through_relays() {
    let seed = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("relay seed {seed} (replay: TIDELINE_TEST_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    let a = Node::start_with(&dir.path().join("a"), 0, &["--secrets", s]);
    let to_b = Relay::start(&a.addr, Impair::default(), seed);
    let to_tail = Relay::start(&a.addr, Impair::default(), seed.wrapping_add(1));
    let b = Node::start_with(
        &dir.path().join("b"),
        0,
        &[
            "--secrets",
            s,
            "--bootstrap",
            "never",
            "--upstream",
            &to_b.addr,
        ],
    );
    let mut tail = KillOnDrop(
        a.cli()
            .args(["tail", "--node", &to_tail.addr, "--from", "earliest"])
            .args(["--timeout-ms", "2000"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    common::wait_consumer(&a, "of the tail through the relay", |c| {
        c["start"] == "earliest"
    });
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let stdout = tail.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&l).expect("tail prints JSON");
            if tx.send(v["offset"].as_u64().expect("offset")).is_err() {
                break;
            }
        }
    });
    let ms = Duration::from_millis;
    let rounds = [
        (
            "delay 20 ms + up to 10 ms (reordering), 10% loss",
            Impair {
                loss: 0.10,
                delay: ms(20),
                jitter: ms(10),
                ..Impair::default()
            },
        ),
        (
            "rate 256 KiB/s, 1% loss",
            Impair {
                rate: 256 << 10,
                loss: 0.01,
                ..Impair::default()
            },
        ),
        (
            "partition",
            Impair {
                hold: true,
                ..Impair::default()
            },
        ),
    ];
    let mut next = 1;
    for (name, fault) in rounds {
        to_b.set(fault);
        to_tail.set(fault);
        // 40 transactions of 4 KiB: 160 KiB, more than half a second at the limited rate.
        load_sized(&a, next, 40, 4096);
        next += 40;
        if fault.hold {
            wait_upstream_down(&b);
        } else {
            let took = converge(&b, &gtids(&a), Duration::from_secs(30), name);
            eprintln!("{name}: B kept up, {took:?} after the writes");
        }
        to_b.hold(false);
        to_tail.hold(false);
        load_sized(&a, next, 10, 0);
        next += 10;
        let took = converge(&b, &gtids(&a), Duration::from_secs(10), name);
        eprintln!("{name}: B converged {took:?} after the heal");
    }
    equal_and_every_offset_once(&a, &b, &rx, next - 1);
    drop(tail);
}

/// `tideline verify` finds A and B equal, and the tail's offsets (from `rx`) are exactly
/// 1..=`total` within 10 s: no gap, no duplicate.
fn equal_and_every_offset_once(
    a: &Node,
    b: &Node,
    rx: &std::sync::mpsc::Receiver<u64>,
    total: u64,
) {
    let out = a.run(&["verify", "--node", &b.addr]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (got.len() as u64) < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(o) => got.push(o),
            Err(_) => panic!("the tail has {} of {total} after 10 s", got.len()),
        }
    }
    assert_eq!(
        got,
        (1..=total).collect::<Vec<_>>(),
        "the tail's history has a gap or a duplicate"
    );
}
