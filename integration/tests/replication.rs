//! Replication topologies with real processes: chain A→B→C, fan-out A→B and A→C, a
//! multi-source merge A→C and B→C, and failover of C from A to B by GTID auto-positioning.
//! Each ends with the replicas' state and `gtid_executed` equal to what they replicate, every
//! transaction applied once. Also: replicas refuse client writes, and a replica pointed at an
//! upstream that lacks GTIDs it has (its own writes, or another origin's) reports them as
//! errant and applies nothing from that upstream; a read-write replica is not bootstrapped
//! over its own writes that its upstream lacks.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, gtids, load, scan, status, wait_gtids};
use serde_json::Value;

/// A replica that catches up from its upstreams' logs only (`--bootstrap never`): these tests
/// check log order and local offsets; `tests/bootstrap.rs` covers copying state instead.
fn replica(dir: &Path, name: &str, secrets: &Path, upstreams: &[&Node]) -> Node {
    let addrs: Vec<&str> = upstreams.iter().map(|u| u.addr.as_str()).collect();
    replica_of(dir, name, secrets, &addrs)
}

/// A replica of the upstreams at `addrs`, which need not be nodes (a [`common::Relay`]).
fn replica_of(dir: &Path, name: &str, secrets: &Path, addrs: &[&str]) -> Node {
    let secrets = secrets.to_str().unwrap().to_string();
    let mut args = vec![
        "--secrets".to_string(),
        secrets,
        "--bootstrap".into(),
        "never".into(),
    ];
    for addr in addrs {
        args.push("--upstream".into());
        args.push(addr.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_with(&dir.join(name), 0, &args)
}

fn primary(dir: &Path, name: &str, secrets: &Path) -> Node {
    Node::start_with(
        &dir.join(name),
        0,
        &["--secrets", secrets.to_str().unwrap()],
    )
}

#[test]
fn chain_and_fan_out_converge_with_origin_gtids() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let a = primary(dir.path(), "a", &secrets);
    load(&a, 1, 200, 10);
    let b = replica(dir.path(), "b", &secrets, &[&a]);
    let c = replica(dir.path(), "c", &secrets, &[&b]); // chain A→B→C
    let d = replica(dir.path(), "d", &secrets, &[&a]); // fan-out A→D
    load(&a, 201, 400, 10); // writes continue while replicas catch up
    let want = gtids(&a);
    assert!(want.ends_with(":1-40"), "{want}");
    for n in [&b, &c, &d] {
        wait_gtids(n, &want);
        assert_eq!(scan(n, "default"), scan(&a, "default"));
    }
    let out = a.run(&["verify", "--node", &c.addr, "--node", &d.addr]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["equal"], true);
    assert_eq!(report["comparisons"][0]["keys_compared"], 400);
    // No Long Fork: every replica applied A's transactions in A's commit order.
    let order = |n: &Node| -> Vec<String> {
        let out = n.run(&["tail", "--from", "earliest", "--limit", "40"]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["gtid"].to_string())
            .collect()
    };
    let a_order = order(&a);
    assert_eq!(a_order.len(), 40);
    for n in [&b, &c, &d] {
        assert_eq!(order(n), a_order);
    }
    // C got A's transactions through B, with A's GTIDs, dense local offsets.
    let sc = status(&c);
    assert_eq!(sc["role"], "replica");
    assert_eq!(sc["last_offset"], 40);
    assert_eq!(sc["upstreams"][0]["state"], "connected");
    assert_eq!(sc["upstreams"][0]["received"], want);
    assert_eq!(sc["upstreams"][0]["applied_gtids"], want);
    // Replicas refuse client writes.
    let out = b.run(&["put", "x", "y"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
}

#[test]
fn multi_source_merge_and_failover_by_auto_positioning() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let a = primary(dir.path(), "a", &secrets);
    let b = replica(dir.path(), "b", &secrets, &[&a]);
    load(&a, 1, 100, 10);
    let want_a = gtids(&a);
    wait_gtids(&b, &want_a);

    // Multi-source: C replicates from A and from B; B holds exactly A's transactions, so C
    // receives every one of them twice and must apply each once.
    let mut c = replica(dir.path(), "c", &secrets, &[&a, &b]);
    wait_gtids(&c, &want_a);
    // Both upstreams delivered: B's stream too, not only A's (a replica that never reached
    // its second upstream would pass every check below).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(&c);
        let received: Vec<&Value> = (0..2).map(|i| &s["upstreams"][i]["received"]).collect();
        if received.iter().all(|r| r.as_str() == Some(want_a.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C did not receive A's transactions from both upstreams (A, then B): {received:?}, \
             expected {want_a}; status: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        status(&c)["last_offset"],
        10,
        "each transaction applied once"
    );
    assert_eq!(scan(&c, "default"), scan(&a, "default"));

    // Failover: C restarts pointed at B only; A keeps writing through B.
    c.kill9();
    let c_data = c.data.clone();
    drop(c);
    load(&a, 101, 200, 10);
    let want = gtids(&a);
    wait_gtids(&b, &want);
    let c = Node::start_with(
        &c_data,
        0,
        &[
            "--secrets",
            secrets.to_str().unwrap(),
            "--upstream",
            &b.addr,
        ],
    );
    wait_gtids(&c, &want);
    assert_eq!(status(&c)["last_offset"], 20);
    assert_eq!(scan(&c, "default"), scan(&a, "default"));
}

#[test]
fn a_replicas_own_writes_are_reported_as_errant() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let a = primary(dir.path(), "a", &secrets);
    load(&a, 1, 10, 10);
    let r = Node::start_with(
        &dir.path().join("r"),
        0,
        &[
            "--secrets",
            secrets.to_str().unwrap(),
            "--upstream",
            &a.addr,
            "--allow-local-writes",
        ],
    );
    wait_gtids(&r, &gtids(&a));
    assert!(r.run(&["put", "local", "1"]).status.success());
    let out = a.run(&["verify", "--node", &a.addr, "--node", &r.addr]);
    assert_eq!(out.status.code(), Some(1), "diverged nodes are not equal");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let diff = &report["comparisons"][0]["first_difference"];
    assert_eq!(diff["key"], "local", "{report}");
    assert_eq!(diff["first"], Value::Null);
    assert_eq!(diff["other"], "1");
    let r_uuid = status(&r)["server_uuid"].as_str().unwrap().to_string();
    // Restart the replica: on reconnect it compares its GTIDs with the upstream's.
    let data = r.data.clone();
    drop(r);
    let r = Node::start_with(
        &data,
        0,
        &[
            "--secrets",
            secrets.to_str().unwrap(),
            "--upstream",
            &a.addr,
        ],
    );
    // It is read-only now: its own GTID the upstream lacks is errant, and it stops applying
    // from that upstream until an operator decides (see docs/OPERATIONS.md).
    let u = wait_settled(&r);
    assert_eq!(u["state"], "error", "{u}");
    assert_eq!(u["errant"], format!("{r_uuid}:1"), "{u}");
}

/// A read-write replica (`--allow-local-writes`) holds an acknowledged write of its own that
/// its upstream lacks, and the upstream has purged the log the replica needs. Catching up
/// would take a bootstrap, which wipes the replica's state but keeps its own GTIDs executed:
/// the write would be gone while every GTID comparison says nothing is missing. The replica
/// must refuse the copy, name its own GTIDs and the upstream, keep the write, and carry on
/// by itself once the upstream has those transactions (the operator's choice 1 in
/// docs/OPERATIONS.md, "Errant GTIDs": the upstream replicates from the replica).
#[test]
fn a_read_write_replica_is_not_bootstrapped_over_its_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let secrets = secrets.to_str().unwrap();
    // Small segments, no retention beyond what is needed: A purges quickly (every 10 s).
    let a_args = [
        "--secrets",
        secrets,
        "--log-segment-bytes",
        "16384",
        "--log-retain-bytes",
        "0",
    ];
    let mut a = Node::start_with(&dir.path().join("a"), 0, &a_args);
    let a_port = a.port();
    let a_addr = a.addr.clone();
    load(&a, 1, 100, 10);
    let r_args = [
        "--secrets",
        secrets,
        "--upstream",
        &a_addr,
        "--allow-local-writes",
    ];
    let r = Node::start_with(&dir.path().join("r"), 0, &r_args);
    wait_gtids(&r, &gtids(&a));
    assert!(r.run(&["put", "local", "1"]).status.success());
    let r_uuid = status(&r)["server_uuid"].as_str().unwrap().to_string();
    let own = format!("{r_uuid}:1");
    assert!(gtids(&r).contains(&own), "{}", gtids(&r));
    let r_data = r.data.clone();
    drop(r); // killed

    // A moves on and purges what R would need (R stopped at A's offset 10).
    load(&a, 101, 3_000, 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&a)["first_offset"].as_u64().unwrap() <= 11 {
        assert!(Instant::now() < deadline, "A never purged: {}", status(&a));
        std::thread::sleep(Duration::from_millis(200));
    }

    let r = Node::start_with(&r_data, 0, &r_args);
    let u = wait_settled(&r);
    let s = status(&r);
    assert_eq!(
        u["state"], "error",
        "R must not copy over its own writes: {s}"
    );
    assert_eq!(u["errant"], own, "{u}");
    let err = u["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(&own) && err.contains(&a_addr) && err.contains("wipe"),
        "the error names R's own GTIDs, the upstream and why: {err}"
    );
    assert_eq!(s["bootstrapping"], false, "{s}");
    assert_eq!(
        r.run(&["get", "local"]).stdout,
        b"1",
        "R's own write is kept"
    );
    assert!(gtids(&r).contains(&own));
    // Still held after a re-check (every few seconds): nothing changed upstream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = |r: &Node| {
        r.stderr_lines()
            .iter()
            .filter(|l| l.contains("replication held for an operator"))
            .count()
    };
    while held(&r) < 2 {
        assert!(
            Instant::now() < deadline,
            "R never re-checked: {}",
            status(&r)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status(&r)["upstreams"][0]["state"], "error");
    assert_eq!(r.run(&["get", "local"]).stdout, b"1");

    // Choice 1: A takes R's transactions (it replicates from R); R then copies A by itself,
    // R's write included.
    a.kill9();
    let a_data = a.data.clone();
    drop(a);
    let mut a_up = a_args.to_vec();
    a_up.extend(["--upstream", &r.addr, "--allow-local-writes"]);
    let a = Node::start_with(&a_data, a_port, &a_up);
    assert_eq!(a.addr, a_addr, "A is back on the address R replicates from");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gtids(&a).contains(&own) {
        assert!(
            Instant::now() < deadline,
            "A never got {own}: {}",
            status(&a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_gtids(&r, &gtids(&a));
    let u = wait_settled(&r);
    assert_eq!(u["state"], "connected", "{u}");
    assert_eq!(r.run(&["get", "local"]).stdout, b"1");
    assert_eq!(scan(&r, "default"), scan(&a, "default"));
}

/// Polls `node`'s first upstream until it is `connected` or in `error`; returns it.
fn wait_settled(node: &Node) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(node);
        let u = &s["upstreams"][0];
        if u["state"] == "connected" || u["state"] == "error" {
            return u.clone();
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 10, item 5: R holds A:1-10; it fails over to B, which holds only A:1-9 (B lost A:10,
/// say, when A died). A:10 is errant even though R did not write it: R must name it in
/// `status` and refuse to apply anything from B (which would make R a mix of two histories),
/// until an operator decides.
#[test]
fn a_replica_refuses_an_upstream_that_lacks_gtids_of_any_origin() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let a = primary(dir.path(), "a", &secrets);
    let mut b = replica(dir.path(), "b", &secrets, &[&a]);
    let mut r = replica(dir.path(), "r", &secrets, &[&a]);
    load(&a, 1, 90, 10);
    wait_gtids(&b, &gtids(&a));
    let b_data = b.data.clone();
    b.kill9();
    drop(b);
    load(&a, 91, 100, 10);
    let want_r = gtids(&a);
    wait_gtids(&r, &want_r);
    let a_uuid = status(&a)["server_uuid"].as_str().unwrap().to_string();
    assert_eq!(want_r, format!("{a_uuid}:1-10"));

    // B is promoted (a primary now) and R is repointed at it.
    let b = Node::start_with(&b_data, 0, &["--secrets", secrets.to_str().unwrap()]);
    let r_data = r.data.clone();
    r.kill9();
    drop(r);
    let r = replica(dir.path(), "r", &secrets, &[&b]);
    assert_eq!(r.data, r_data);
    let u = wait_settled(&r);
    assert_eq!(u["errant"], format!("{a_uuid}:10"), "{u}");
    assert_eq!(u["state"], "error", "{u}");
    let err = u["error"].as_str().unwrap_or_default();
    assert!(err.contains(&format!("{a_uuid}:10")), "{err}");

    // B takes a write; R sees it exists (its error names B's GTIDs) and still applies nothing.
    assert!(b.run(&["put", "after-failover", "1"]).status.success());
    let b_uuid = status(&b)["server_uuid"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let u = status(&r)["upstreams"][0].clone();
        if u["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("{b_uuid}:1"))
        {
            assert_eq!(u["state"], "error", "{u}");
            break;
        }
        assert!(Instant::now() < deadline, "R never re-checked B: {u}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gtids(&r), want_r, "nothing applied from B");
}

/// The upstream dies by SIGKILL while B is observably mid-catch-up: B has applied some of
/// A's 40 transactions (320 KiB each, about 13 MiB of log) and received fewer than all of
/// them. B reaches A through a relay that passes 2 MiB/s, so the transfer takes seconds
/// whatever the machine's speed, and the relay holds all traffic from the moment B has
/// applied one transaction until A is dead. A comes back on the same address and keeps
/// writing: B must end with every transaction once, dense local offsets, and A's state.
#[test]
fn replicas_resume_after_kill_9_of_their_upstream() {
    const TXNS: u64 = 40;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let mut a = Node::start_with(
        &dir.path().join("a"),
        0,
        &["--secrets", secrets.to_str().unwrap()],
    );
    let port = a.port();
    load_values(&a, 1, TXNS * 10, 10, 32 << 10);
    let slow = common::Impair {
        rate: 2 << 20,
        ..Default::default()
    };
    let relay = common::Relay::start(&a.addr, slow, 0);
    let b = replica_of(dir.path(), "b", &secrets, &[&relay.addr]);
    let total = format!("{}:1-{TXNS}", status(&a)["server_uuid"].as_str().unwrap());
    // Wait until B has applied part of the log, then cut it off from A and kill A.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = status(&b)["last_offset"].as_u64().unwrap_or(0);
        if applied >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B applied nothing: {}",
            status(&b)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    relay.hold(true);
    let a_data = a.data.clone();
    a.kill9();
    drop(a);
    let received = status(&b)["upstreams"][0]["received"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(
        received, total,
        "B had received the whole log before the kill: nothing was in flight"
    );
    let a = Node::start_with(&a_data, port, &["--secrets", secrets.to_str().unwrap()]);
    relay.hold(false);
    load(&a, TXNS * 10 + 1, TXNS * 10 + 200, 10);
    let want = gtids(&a);
    assert!(want.ends_with(&format!(":1-{}", TXNS + 20)), "{want}");
    wait_gtids(&b, &want);
    // No gap, no duplicate: B's local offsets are dense and hold each transaction once.
    assert_eq!(status(&b)["last_offset"], TXNS + 20);
    assert_eq!(scan(&b, "default"), scan(&a, "default"));
}

/// Loads keys `key:NNNNNN` for `from..=to` with values of `value_bytes`, `batch` per
/// transaction.
fn load_values(node: &Node, from: u64, to: u64, batch: usize, value_bytes: usize) {
    use std::io::Write;
    use std::process::Stdio;
    let value = "v".repeat(value_bytes);
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", &batch.to_string()])
        .args(["--parallel", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for i in from..=to {
            writeln!(stdin, "key:{i:06}\t{value}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

/// A real failover: the primary A dies for good (SIGKILL, never restarted) while replica C is
/// behind (it was down while A took more writes) and B is caught up. B is promoted (restarted
/// without `--upstream`: writable, role primary), C is repointed at B and positions itself
/// by GTID alone (no offsets). C must get exactly the A transactions it lacked from B, then
/// B's own writes; in the end B and C hold equal state (`tideline verify`), equal GTID sets,
/// dense local offsets, and no errant GTIDs.
#[test]
fn failover_promotes_a_replica_and_repoints_the_others_by_gtid() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    let mut a = primary(dir.path(), "a", &secrets);
    let mut b = replica(dir.path(), "b", &secrets, &[&a]);
    let mut c = replica(dir.path(), "c", &secrets, &[&a]);
    load(&a, 1, 100, 10);
    let a_uuid = status(&a)["server_uuid"].as_str().unwrap().to_string();
    wait_gtids(&b, &format!("{a_uuid}:1-10"));
    wait_gtids(&c, &format!("{a_uuid}:1-10"));
    // C goes down and falls behind; B follows A to the end.
    c.kill9();
    load(&a, 101, 200, 10);
    let a_final = format!("{a_uuid}:1-20");
    wait_gtids(&b, &a_final);
    // A dies for good.
    a.kill9();
    drop(a);

    // Promote B: restart it without an upstream. It is writable now.
    let b_data = b.data.clone();
    b.kill9();
    drop(b);
    let b = Node::start_with(&b_data, 0, &["--secrets", s]);
    let sb = status(&b);
    assert_eq!(sb["role"], "primary", "{sb}");
    assert_eq!(sb["read_only"], false, "{sb}");
    assert_eq!(sb["gtid_executed"], a_final, "B lost nothing of A");
    // Repoint C at B: no offsets given, C asks for what its GTID set lacks.
    let c_data = c.data.clone();
    drop(c);
    let c = Node::start_with(
        &c_data,
        0,
        &[
            "--secrets",
            s,
            "--bootstrap",
            "never",
            "--upstream",
            &b.addr,
        ],
    );
    wait_gtids(&c, &a_final);
    // B takes writes of its own as the new primary; C follows.
    load(&b, 201, 300, 10);
    let want = gtids(&b);
    let b_uuid = sb["server_uuid"].as_str().unwrap();
    assert_eq!(
        want,
        sorted_set(&[&format!("{a_uuid}:1-20"), &format!("{b_uuid}:1-10")])
    );
    wait_gtids(&c, &want);

    let sc = status(&c);
    let u = &sc["upstreams"][0];
    assert_eq!(u["state"], "connected", "{sc}");
    assert!(
        u["errant"].is_null() || u["errant"] == "",
        "no errant GTIDs after a clean failover: {sc}"
    );
    assert_eq!(
        sc["last_offset"], 30,
        "dense offsets, each transaction once: {sc}"
    );
    assert_eq!(sc["read_only"], true, "{sc}");
    let out = b.run(&["verify", "--node", &c.addr]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["equal"], true, "{report}");
    assert_eq!(scan(&c, "default"), scan(&b, "default"));
    assert_eq!(scan(&b, "default").lines().count(), 300);
}

/// A GTID set's text with its uuids sorted, as nodes print it.
fn sorted_set(parts: &[&str]) -> String {
    let mut v: Vec<&str> = parts.to_vec();
    v.sort();
    v.join(",")
}
