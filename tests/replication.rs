//! Replication topologies with real processes: chain A→B→C, fan-out A→B and A→C, a
//! multi-source merge A→C and B→C, and failover of C from A to B by GTID auto-positioning.
//! Each ends with the replicas' state and `gtid_executed` equal to what they replicate, every
//! transaction applied once. Also: replicas refuse client writes, and a replica's own writes
//! are reported as errant GTIDs when it is pointed at an upstream that lacks them.

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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&r);
        if s["upstreams"][0]["state"] == "connected" {
            assert_eq!(s["upstreams"][0]["errant"], format!("{r_uuid}:1"));
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
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
