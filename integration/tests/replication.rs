//! Replication topologies with real processes: chain A→B→C, fan-out A→B and A→C, a
//! multi-source merge A→C and B→C, and failover of C from A to B by GTID auto-positioning.
//! Each ends with the replicas' state and `gtid_executed` equal to what they replicate, every
//! transaction applied once. Also: replicas refuse client writes, and a replica pointed at an
//! upstream that lacks GTIDs it has (its own writes, or another origin's) reports them as
//! errant and applies nothing from that upstream.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, free_port, gtids, load, scan, status, wait_gtids};
use serde_json::Value;

/// A replica that catches up from its upstreams' logs only (`--bootstrap never`): these tests
/// check log order and local offsets; `tests/bootstrap.rs` covers copying state instead.
fn replica(dir: &Path, name: &str, secrets: &Path, upstreams: &[&Node]) -> Node {
    let secrets = secrets.to_str().unwrap().to_string();
    let mut args = vec![
        "--secrets".to_string(),
        secrets,
        "--bootstrap".into(),
        "never".into(),
    ];
    for u in upstreams {
        args.push("--upstream".into());
        args.push(u.addr.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_with(&dir.join(name), free_port(), &args)
}

fn primary(dir: &Path, name: &str, secrets: &Path) -> Node {
    Node::start_with(
        &dir.join(name),
        free_port(),
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
        free_port(),
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
        free_port(),
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
        free_port(),
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
    let b = Node::start_with(
        &b_data,
        free_port(),
        &["--secrets", secrets.to_str().unwrap()],
    );
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

#[test]
fn replicas_resume_after_kill_9_of_their_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let port = free_port();
    let mut a = Node::start_with(
        &dir.path().join("a"),
        port,
        &["--secrets", secrets.to_str().unwrap()],
    );
    load(&a, 1, 100, 10);
    let b = replica(dir.path(), "b", &secrets, &[&a]);
    wait_gtids(&b, &gtids(&a));
    // The upstream dies hard mid-stream and comes back on the same address.
    let a_data = a.data.clone();
    a.kill9();
    drop(a);
    let a = Node::start_with(&a_data, port, &["--secrets", secrets.to_str().unwrap()]);
    load(&a, 101, 300, 10);
    let want = gtids(&a);
    assert!(want.ends_with(":1-30"), "{want}");
    wait_gtids(&b, &want);
    // No gap, no duplicate: B's local offsets are dense and hold each transaction once.
    assert_eq!(status(&b)["last_offset"], 30);
    assert_eq!(scan(&b, "default"), scan(&a, "default"));
}
