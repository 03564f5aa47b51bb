//! Replicas with several upstreams whose upstreams disagree only in timing, and the way out of
//! errant GTIDs that docs/OPERATIONS.md ("Errant GTIDs", choice 1) gives, with real processes.
//!
//! - An upstream that purged GTIDs a multi-source replica lacks is waited for, not given up:
//!   once another upstream has delivered those GTIDs, replication from the purged upstream
//!   resumes by itself, so the replica keeps receiving writes after the other upstream dies.
//!   Guards against that upstream's task ending for good (lost redundancy, no loud signal).
//! - An upstream that is only behind on an origin (a replica of the same primary that lags)
//!   is not called errant by a replica that got the newer GTIDs directly from the primary.
//!   Guards against a false alarm whose advice is to wipe a correct replica.
//! - The documented remedy for errant GTIDs after a failover, as the replica's own error words
//!   it: the new primary replicates from the replica with `--allow-local-writes`, keeps taking
//!   writes meanwhile, both converge, and the primary is restarted as before. Guards against
//!   advice that makes the primary read-only and the two nodes hold each other for good.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Node, gtids, load, scan, status, wait_gtids};
use serde_json::Value;

/// Polls `f` every 100 ms until it returns `Some`, or fails naming `what` after `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `--secrets SECRETS --bootstrap never` and one `--upstream` per address, then `extra`.
fn replica_args(secrets: &Path, upstreams: &[&str], extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--secrets".to_string(),
        secrets.to_str().unwrap().to_string(),
        "--bootstrap".into(),
        "never".into(),
    ];
    for addr in upstreams {
        args.push("--upstream".into());
        args.push(addr.to_string());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Starts a node on `data` (port 0: any) with `args`.
fn start(data: &Path, port: u16, args: &[String]) -> Node {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_with(data, port, &args)
}

/// Upstream `i` of `node` once it is `connected` or in `error`.
fn settled(node: &Node, i: usize) -> Value {
    wait_for(Duration::from_secs(30), "the upstream to settle", || {
        let u = status(node)["upstreams"][i].clone();
        (u["state"] == "connected" || u["state"] == "error").then_some(u)
    })
}

/// Loads `count` transactions of 100 keys `PREFIX:NNNNNNNN` with 100-byte values into the
/// default tree (about 11 KB each, so a 16 KiB segment holds one or two).
fn load_big(node: &Node, prefix: &str, first: u64, count: u64) {
    common::load_lines(
        node,
        100,
        (first * 100..(first + count) * 100)
            .map(|i| format!("{prefix}:{i:08}\t{}", "v".repeat(100))),
    );
}

/// Review 4, finding 1. A purges its beginning; B, a replica of A since before, still has all
/// of A's history in its log. D starts empty with `--upstream A --upstream B` while B is out
/// of reach, so D's subscription to A is refused as purged (a multi-source replica never
/// bootstraps). B then delivers A's history; from then on A has everything D lacks, and
/// D's task for A must pick up again by itself: after B dies, A's new writes still reach D.
#[test]
fn an_upstream_that_purged_what_another_upstream_delivered_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    // 16 KiB segments and no retained bytes: a few transactions purge A's beginning.
    let a = Node::start_with(
        &dir.path().join("a"),
        0,
        &[
            "--secrets",
            s,
            "--log-segment-bytes",
            "16384",
            "--log-retain-bytes",
            "0",
        ],
    );
    let mut b = start(
        &dir.path().join("b"),
        0,
        &replica_args(&secrets, &[&a.addr], &[]),
    );
    load_big(&a, "early", 0, 20);
    wait_gtids(&b, &gtids(&a));
    // Retention runs every 10 s.
    wait_for(Duration::from_secs(30), "A to purge its beginning", || {
        (status(&a)["first_offset"].as_u64().unwrap_or(0) > 1).then_some(())
    });

    // B out of reach (a partition) while D starts: D's only live upstream purged what it needs.
    let relay = common::Relay::start(
        &b.addr,
        common::Impair {
            hold: true,
            ..Default::default()
        },
        0,
    );
    let d = Node::start_with(
        &dir.path().join("d"),
        0,
        &[
            "--secrets",
            s,
            "--upstream",
            &a.addr,
            "--upstream",
            &relay.addr,
        ],
    );
    let held = wait_for(Duration::from_secs(30), "D to find A purged", || {
        let u = status(&d)["upstreams"][0].clone();
        (u["state"] == "error").then_some(u)
    });
    assert_eq!(gtids(&d), "", "nothing of A arrived from A's purged log");

    // B comes within reach and delivers A's history.
    relay.hold(false);
    let want = gtids(&a);
    wait_gtids(&d, &want);

    // B dies; A, which now has everything D lacks, is D's only live upstream, and its new
    // writes reach D (D's upstream A carries on by itself within a re-check).
    b.kill9();
    load_big(&a, "later", 0, 2);
    let want = gtids(&a);
    wait_for(Duration::from_secs(20), "A's new writes to reach D", || {
        (gtids(&d) == want).then_some(())
    });
    assert_eq!(scan(&d, "default"), scan(&a, "default"));
    let ua = status(&d)["upstreams"][0].clone();
    assert_eq!(ua["state"], "connected", "{ua}");
    assert!(ua["errant"].is_null() || ua["errant"] == "", "{ua}");

    // While it waited, it said why, and that it would go on by itself.
    let error = held["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("purged")
            && error.contains("multi-source replica cannot bootstrap")
            && error.contains("another upstream"),
        "{held}"
    );
}

/// Review 4, finding 2. A triangle: B and C replicate A, and C also replicates B. B was down
/// while A took `A:11-20`, which C got straight from A; B is back but still behind (its own
/// upstream is out of reach). When C connects to B, B lacks `A:11-20` only because it is
/// behind: C must not call them errant nor stop replicating from B.
#[test]
fn an_upstream_that_is_only_behind_is_not_errant() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    let a = Node::start_with(&dir.path().join("a"), 0, &["--secrets", s]);
    let mut b = start(
        &dir.path().join("b"),
        0,
        &replica_args(&secrets, &[&a.addr], &[]),
    );
    load(&a, 1, 100, 10);
    let a_uuid = status(&a)["server_uuid"].as_str().unwrap().to_string();
    wait_gtids(&b, &format!("{a_uuid}:1-10"));
    let b_port = b.port();
    b.kill9();

    load(&a, 101, 200, 10);
    let want = format!("{a_uuid}:1-20");
    let mut c = start(
        &dir.path().join("c"),
        0,
        &replica_args(&secrets, &[&a.addr], &[]),
    );
    wait_gtids(&c, &want);
    c.kill9();

    // B back on its address, a replica still behind: its upstream does not answer.
    let (absent, _silent) = common::silent_addr();
    let b = start(&b.data, b_port, &replica_args(&secrets, &[&absent], &[]));
    assert_eq!(gtids(&b), format!("{a_uuid}:1-10"));
    let c = start(
        &c.data,
        0,
        &replica_args(&secrets, &[&a.addr, &b.addr], &[]),
    );
    let ub = settled(&c, 1);
    assert!(
        ub["errant"].is_null() || ub["errant"] == "",
        "B is only behind on A, nothing is errant: {ub}"
    );
    assert_eq!(ub["state"], "connected", "{ub}");
    assert_eq!(gtids(&c), want);
}

/// Review 4, finding 3. After a failover R holds `A:10`, which the new primary B never got, and
/// holds B as errant. The operator follows the remedy R's error gives to let B receive them:
/// B is restarted with `--upstream R` and `--allow-local-writes`; it keeps taking writes, gets
/// `A:10`, R then takes B's writes, and once B is restarted as before (no `--upstream`) both
/// go on as primary and replica with equal state.
#[test]
fn the_errant_gtid_remedy_keeps_the_new_primary_writable_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let s = secrets.to_str().unwrap();
    let a = Node::start_with(&dir.path().join("a"), 0, &["--secrets", s]);
    let mut b = start(
        &dir.path().join("b"),
        0,
        &replica_args(&secrets, &[&a.addr], &[]),
    );
    let r = start(
        &dir.path().join("r"),
        0,
        &replica_args(&secrets, &[&a.addr], &[]),
    );
    load(&a, 1, 90, 10);
    wait_gtids(&b, &gtids(&a));
    b.kill9();
    load(&a, 91, 100, 10);
    let a_uuid = status(&a)["server_uuid"].as_str().unwrap().to_string();
    wait_gtids(&r, &format!("{a_uuid}:1-10"));
    drop(a); // the old primary dies for good

    // B is promoted and takes a write; R is repointed at it and holds A:10 as errant.
    let mut b = Node::start_with(&b.data, 0, &["--secrets", s]);
    let b_port = b.port();
    assert!(b.run(&["put", "after-failover", "1"]).status.success());
    let r_data = r.data.clone();
    drop(r);
    let r = start(&r_data, 0, &replica_args(&secrets, &[&b.addr], &[]));
    let u = settled(&r, 0);
    assert_eq!(u["state"], "error", "{u}");
    assert_eq!(u["errant"], format!("{a_uuid}:10"), "{u}");
    let advice = u["error"].as_str().unwrap_or_default().to_string();
    assert!(
        advice.contains("--allow-local-writes"),
        "the remedy must say that the upstream keeps taking writes: {advice}"
    );

    // The remedy as the error words it: B replicates from R with --allow-local-writes.
    b.kill9();
    let b = Node::start_with(
        &b.data,
        b_port,
        &[
            "--secrets",
            s,
            "--upstream",
            &r.addr,
            "--allow-local-writes",
        ],
    );
    assert!(
        b.run(&["put", "while-receiving", "1"]).status.success(),
        "B keeps taking writes: {}",
        status(&b)
    );
    wait_for(Duration::from_secs(20), "B to receive A:10", || {
        gtids(&b).contains(&format!("{a_uuid}:1-10")).then_some(())
    });
    // R re-checks B (every few seconds) and takes B's writes.
    wait_gtids(&r, &gtids(&b));

    // Then B is restarted as before: a primary, R its replica.
    let mut b = b;
    b.kill9();
    let b = Node::start_with(&b.data, b_port, &["--secrets", s]);
    assert_eq!(status(&b)["role"], "primary");
    assert!(b.run(&["put", "after-remedy", "1"]).status.success());
    wait_gtids(&r, &gtids(&b));
    let u = settled(&r, 0);
    assert_eq!(u["state"], "connected", "{u}");
    assert!(u["errant"].is_null() || u["errant"] == "", "{u}");
    assert_eq!(scan(&r, "default"), scan(&b, "default"));
    assert_eq!(scan(&b, "default").lines().count(), 103);
}
