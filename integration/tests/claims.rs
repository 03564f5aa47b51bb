//! Claims of the README and docs/ that had no test of their own, each checked against real
//! `tideline` processes as a user would rely on it. Each test names the sentence it checks.
//!
//! - `log info|dump|verify` beside a live node (README "Inspecting a log offline": read-only,
//!   safe beside a running node) while it commits and rolls segments: every run succeeds and
//!   shows a dense prefix of what was committed, the node goes on, and after a kill -9 the log
//!   verifies and holds every acknowledged commit.
//! - `--bootstrap never` against an upstream that purged GTIDs the replica needs
//!   (OPERATIONS.md "Bootstrap": "catches up from the upstream's log only and stops with an
//!   error if it was purged"): `error` state naming the purge and the remedy, no copy, the
//!   replica's data untouched.
//! - a multi-source replica never bootstraps (OPERATIONS.md: "a copy of one upstream would
//!   replace what the others sent"): an empty replica with two upstreams, one of which purged
//!   what it needs, copies nothing, says why, and still replicates the other from its log.
//! - a bootstrapping node refuses to serve bootstraps (OPERATIONS.md, ARCHITECTURE.md:
//!   `Unavailable`, retried): a downstream replica waits, copies nothing meanwhile, and
//!   bootstraps once its upstream finished, ending equal to the primary.
//! - a downstream of a bootstrapping node (OPERATIONS.md "Errant GTIDs"): while its upstream
//!   copies, and shows a partial `gtid_executed`, it waits and says why instead of calling its
//!   own history errant and holding; it carries on from that upstream once the copy is done.
//! - the slot age cap (OPERATIONS.md "Retention and slots"): a slot whose log is older than
//!   `--log-slot-age-max` is invalidated with a reason naming the cap, retention then removes
//!   that log, and the slot's consumer gets a clear error instead of a silent skip.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Node, gtids, send_signal, status, wait_gtids};
use serde_json::Value;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `f` every 50 ms until it returns `Some`, or fails naming `what` after `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory for a cluster and the path of its secrets.
fn cluster() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets").to_str().unwrap().to_string();
    (dir, secrets)
}

/// Loads `count` keys `PREFIX:NNNNNNNN` of `value_len` bytes into `tree`, 100 per transaction.
fn load_keys(node: &Node, tree: &str, prefix: &str, first: u64, count: u64, value_len: usize) {
    load_batched(node, tree, prefix, first, count, value_len, 100);
}

/// Loads `count` keys `PREFIX:NNNNNNNN` of `value_len` bytes into `tree`, `batch` per
/// transaction, one transaction at a time (offsets follow key order).
fn load_batched(
    node: &Node,
    tree: &str,
    prefix: &str,
    first: u64,
    count: u64,
    value_len: usize,
    batch: usize,
) {
    use std::io::Write;
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--tree", tree])
        .args(["--batch", &batch.to_string(), "--parallel", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("piped stdin"));
        let value = "v".repeat(value_len);
        for i in first..first + count {
            writeln!(stdin, "{prefix}:{i:08}\t{value}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

fn upstream(node: &Node, i: usize) -> Value {
    status(node)["upstreams"][i].clone()
}

/// Waits until `node`'s `first_offset` passes `offset` (its retention runs every 10 s).
fn wait_purged_past(node: &Node, offset: u64) {
    wait_for(Duration::from_secs(60), "the upstream to purge", || {
        (status(node)["first_offset"].as_u64().unwrap() > offset).then_some(())
    });
}

fn log_tool(node: &Node, args: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("log")
        .args(args)
        .arg("--data")
        .arg(&node.data)
        .output()
        .expect("run tideline log")
}

/// README: "`log info|dump|verify` ... open the log read-only, safe beside a running node".
#[test]
fn log_info_dump_and_verify_beside_a_live_node_see_a_dense_prefix_and_disturb_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the node rolls while the tools open the log.
    let mut node = Node::start_with(&dir.path().join("n"), 0, &["--log-segment-bytes", "8192"]);
    let uuid = status(&node)["server_uuid"].as_str().unwrap().to_string();

    // A writer commits single puts until told to stop, counting acknowledgements.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let (addr, secrets) = (node.addr.clone(), node.secrets());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let secrets = tideline_stream::tls::load_client_dir(&secrets).unwrap();
                let client = tideline_stream::Client::connect(
                    &addr,
                    tideline_stream::ClientConfig::new(secrets),
                )
                .await
                .unwrap();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    i += 1;
                    client
                        .commit(vec![tideline_stream::WriteOp::Put {
                            tree: "default".into(),
                            key: format!("key:{i:08}").into_bytes(),
                            value: vec![b'x'; 200],
                        }])
                        .await
                        .unwrap();
                    acked.store(i, Ordering::SeqCst);
                }
                i
            })
        })
    };
    wait_for(Duration::from_secs(60), "the first commits", || {
        (status(&node)["last_offset"].as_u64().unwrap_or(0) >= 20).then_some(())
    });

    for round in 0..6 {
        let committed_before = status(&node)["last_offset"].as_u64().unwrap();

        let out = log_tool(&node, &["info"]);
        assert!(
            out.status.success(),
            "round {round}: log info: {}",
            stderr(&out)
        );
        let info: Value = serde_json::from_slice(&out.stdout).expect("log info prints JSON");
        let last = info["last_offset"].as_u64().unwrap();
        assert!(
            last >= committed_before,
            "round {round}: log info shows {last} records, the node had committed \
             {committed_before} before it ran: {info}"
        );
        assert_eq!(info["server_uuid"], uuid.as_str());
        assert_eq!(info["first_offset"], 1, "{info}");
        assert_eq!(
            info["gtid_executed"],
            format!("{uuid}:1-{last}"),
            "round {round}: {info}"
        );

        let out = log_tool(&node, &["dump"]);
        assert!(
            out.status.success(),
            "round {round}: log dump: {}",
            stderr(&out)
        );
        let lines: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log dump prints JSON lines"))
            .collect();
        assert!(
            lines.len() as u64 >= committed_before,
            "round {round}: log dump printed {} records, {committed_before} were committed",
            lines.len()
        );
        for (i, l) in lines.iter().enumerate() {
            let n = i as u64 + 1;
            assert_eq!(
                l["offset"], n,
                "round {round}: a gap or duplicate in log dump: {l}"
            );
            assert_eq!(l["gtid"], format!("{uuid}:{n}"), "round {round}: {l}");
        }

        let out = log_tool(&node, &["verify"]);
        assert!(
            out.status.success(),
            "round {round}: log verify: {}",
            stderr(&out)
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(said.starts_with("ok: "), "round {round}: {said}");
    }

    // The node went on all along, with its own numbering.
    stop.store(true, Ordering::SeqCst);
    let fed = writer.join().unwrap();
    let s = status(&node);
    assert_eq!(
        s["last_offset"], fed,
        "every acknowledged put was committed once: {s}"
    );
    assert_eq!(acked.load(Ordering::SeqCst), fed);
    let segments = s["log"]["segments"].as_u64().unwrap();
    assert!(
        segments > 2,
        "the node rolled segments while the tools ran: {s}"
    );

    // After a kill -9 the log verifies and holds every commit.
    node.kill9();
    let out = log_tool(&node, &["verify"]);
    assert!(
        out.status.success(),
        "log verify after kill -9: {}",
        stderr(&out)
    );
    let node = Node::start(&node.data.clone(), 0);
    assert_eq!(status(&node)["last_offset"], fed);
}

/// OPERATIONS.md: "`--bootstrap never` disables it: the replica then catches up from the
/// upstream's log only and stops with an error if it was purged."
#[test]
fn bootstrap_never_stops_with_a_clear_error_when_the_upstream_purged_what_it_needs() {
    let (dir, secrets) = cluster();
    let a = purging_node(&dir.path().join("a"), &secrets);
    let b_args = |a: &Node| {
        vec![
            "--secrets".to_string(),
            secrets.clone(),
            "--upstream".to_string(),
            a.addr.clone(),
            "--bootstrap".to_string(),
            "never".to_string(),
        ]
    };
    // B catches up from A's log while A still has it all (2 transactions).
    load_keys(&a, "default", "early", 0, 200, 100);
    let args = b_args(&a);
    let b = Node::start_with(
        &dir.path().join("b"),
        0,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    wait_gtids(&b, &gtids(&a));
    let b_data = b.data.clone();
    let b_gtids = gtids(&b);
    let b_scan = common::scan(&b, "default");
    let b_last = status(&b)["last_offset"].as_u64().unwrap();
    drop(b); // killed
    let b_needs = status(&a)["last_offset"].as_u64().unwrap() + 1;

    // A moves on (a transaction of about 11 KB per 16 KiB segment) and purges what B needs.
    for i in 0..20 {
        load_keys(&a, "default", "later", i * 100, 100, 100);
    }
    wait_purged_past(&a, b_needs);

    let b = Node::start_with(
        &b_data,
        0,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let u = wait_for(Duration::from_secs(60), "B's upstream to stop", || {
        let u = upstream(&b, 0);
        (u["state"] == "error").then_some(u)
    });
    let error = u["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("purged") && error.contains("--bootstrap auto"),
        "the error should say the upstream purged what is needed and name the remedy: {u}"
    );
    assert!(
        u["bootstrap"].is_null(),
        "a --bootstrap never replica copied: {u}"
    );
    let s = status(&b);
    assert_eq!(s["bootstrapping"], false, "{s}");
    // Data untouched: the same GTIDs, the same keys, the same log.
    assert_eq!(gtids(&b), b_gtids, "{s}");
    assert_eq!(common::scan(&b, "default"), b_scan);
    assert_eq!(s["last_offset"], b_last, "{s}");
    // And it stays stopped: still an error after A commits more.
    load_keys(&a, "default", "after", 0, 10, 10);
    let u = upstream(&b, 0);
    assert_eq!(u["state"], "error", "{u}");
    assert_eq!(gtids(&b), b_gtids);
}

/// OPERATIONS.md: "A multi-source replica never bootstraps (a copy of one upstream would
/// replace what the others sent): bootstrap it from one upstream first, then add the others."
#[test]
fn an_empty_multi_source_replica_never_bootstraps_and_says_why() {
    let (dir, secrets) = cluster();
    let a = purging_node(&dir.path().join("a"), &secrets);
    let b = Node::start_with(&dir.path().join("b"), 0, &["--secrets", &secrets]);
    // A purges its beginning: an empty replica can only get A's state by a copy.
    for i in 0..20 {
        load_keys(&a, "from_a", "a", i * 100, 100, 100);
    }
    wait_purged_past(&a, 1);
    load_keys(&b, "from_b", "b", 0, 300, 50);

    let r = Node::start_with(
        &dir.path().join("r"),
        0,
        &[
            "--secrets",
            &secrets,
            "--upstream",
            &a.addr,
            "--upstream",
            &b.addr,
        ],
    );
    // B's transactions arrive from B's log ...
    wait_gtids(&r, &gtids(&b));
    // ... and A's upstream stops with the reason and the remedy, without a copy.
    let ua = wait_for(Duration::from_secs(60), "A's upstream to stop", || {
        let u = upstream(&r, 0);
        (u["state"] == "error").then_some(u)
    });
    let error = ua["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("multi-source replica cannot bootstrap") && error.contains("purged"),
        "{ua}"
    );
    let s = status(&r);
    assert!(
        ua["bootstrap"].is_null() && s["upstreams"][1]["bootstrap"].is_null(),
        "{s}"
    );
    assert_eq!(s["bootstrapping"], false, "{s}");
    assert_eq!(
        gtids(&r),
        gtids(&b),
        "nothing of A arrived, all of B did: {s}"
    );
    assert_eq!(common::scan(&r, "from_a"), "", "no copy of A's tree");
    assert_eq!(common::scan(&r, "from_b"), common::scan(&b, "from_b"));
}

/// OPERATIONS.md: "While bootstrapping it refuses writes, and it refuses to serve bootstraps
/// itself (downstream replicas retry)". B copies A; A is paused (SIGSTOP) mid-copy so that B
/// stays bootstrapping while C, empty, asks B for a copy.
#[test]
fn a_bootstrapping_node_refuses_to_serve_a_bootstrap_until_it_has_finished() {
    let (dir, secrets) = cluster();
    let a = Node::start_with(&dir.path().join("a"), 0, &["--secrets", &secrets]);
    load_keys(&a, "default", "key", 0, 20_000, 100);
    let b = Node::start_with(
        &dir.path().join("b"),
        0,
        &[
            "--secrets",
            &secrets,
            "--upstream",
            &a.addr,
            "--bootstrap-chunk-bytes",
            "16384",
        ],
    );
    wait_for(Duration::from_secs(120), "B to store some chunks", || {
        let u = upstream(&b, 0);
        (u["bootstrap"]["chunks"].as_u64().unwrap_or(0) >= 3).then_some(())
    });
    send_signal(a.pid(), "STOP"); // A paused mid-copy
    let s = status(&b);
    assert_eq!(s["bootstrapping"], true, "B is mid-copy: {s}");

    // Writes to B are refused meanwhile.
    let out = b.run(&["put", "k", "v"]);
    assert!(
        !out.status.success(),
        "a bootstrapping replica took a write"
    );

    let c = Node::start_with(
        &dir.path().join("c"),
        0,
        &["--secrets", &secrets, "--upstream", &b.addr],
    );
    let uc = wait_for(Duration::from_secs(60), "C to be refused by B", || {
        let u = upstream(&c, 0);
        u["error"]
            .as_str()
            .is_some_and(|e| e.contains("itself being bootstrapped"))
            .then_some(u)
    });
    assert!(
        uc["bootstrap"].is_null(),
        "C copied from a node mid-copy: {uc}"
    );
    assert_eq!(gtids(&c), "", "C received nothing from a node mid-copy");
    assert_eq!(status(&b)["bootstrapping"], true, "B still mid-copy");

    // A goes on; B finishes; C (retrying) then copies B and ends equal to A.
    send_signal(a.pid(), "CONT");
    let want = gtids(&a);
    wait_gtids(&b, &want);
    wait_gtids(&c, &want);
    let out = a.run(&["verify", "--node", &a.addr, "--node", &c.addr]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("verify prints JSON");
    assert_eq!(report["equal"], true, "{report}");
    let uc = upstream(&c, 0);
    assert!(
        !uc["bootstrap"].is_null(),
        "C bootstrapped from B once B had finished: {uc}"
    );
}

/// OPERATIONS.md "Errant GTIDs": errant GTIDs are those "the replica has executed and the
/// upstream lacks"; a node mid-copy has not lost them, it has not received them yet ("While
/// bootstrapping ... downstream replicas retry"). C replicates A's history through B; B then
/// loses its data and bootstraps from A again, held mid-copy (A paused) while C reconnects.
/// B's `gtid_executed` is partial meanwhile: C must wait for the copy without calling its own
/// history errant (which would hold it and tell an operator to re-bootstrap it for nothing),
/// then go on from B once B has finished.
#[test]
fn a_downstream_of_a_bootstrapping_node_waits_without_reporting_errant_gtids() {
    let (dir, secrets) = cluster();
    let a = Node::start_with(&dir.path().join("a"), 0, &["--secrets", &secrets]);
    load_keys(&a, "default", "key", 0, 20_000, 100);
    let want = gtids(&a);
    let b_args = ["--secrets", &secrets, "--upstream", &a.addr];
    let mut b = Node::start_with(&dir.path().join("b"), 0, &b_args);
    wait_gtids(&b, &want);
    let c = Node::start_with(
        &dir.path().join("c"),
        0,
        &["--secrets", &secrets, "--upstream", &b.addr],
    );
    wait_gtids(&c, &want);

    // B loses its data and starts again on its address: it copies A, paused mid-copy.
    let port = b.port();
    b.kill9();
    std::fs::remove_dir_all(&b.data).unwrap();
    let b = Node::start_with(
        &dir.path().join("b"),
        port,
        &[&b_args[..], &["--bootstrap-chunk-bytes", "16384"]].concat(),
    );
    wait_for(Duration::from_secs(120), "B to store some chunks", || {
        let u = upstream(&b, 0);
        (u["bootstrap"]["chunks"].as_u64().unwrap_or(0) >= 3).then_some(())
    });
    send_signal(a.pid(), "STOP");
    let sb = status(&b);
    assert_eq!(sb["bootstrapping"], true, "B is mid-copy: {sb}");
    assert_ne!(
        sb["gtid_executed"],
        want.as_str(),
        "B's set is partial: {sb}"
    );

    // C reconnects to B and says it waits for B's copy; nothing of its own is errant.
    let deadline = Instant::now() + Duration::from_secs(60);
    let uc = loop {
        let u = upstream(&c, 0);
        let waits = u["server_uuid"] == sb["server_uuid"]
            && u["error"]
                .as_str()
                .is_some_and(|e| e.contains("is being bootstrapped"));
        if waits {
            break u;
        }
        assert!(
            Instant::now() < deadline,
            "C did not say that it waits for B's copy; its upstream: {u}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(uc["state"], "connecting", "{uc}");
    assert_eq!(
        uc["errant"], "",
        "C called GTIDs errant that B is copying: {uc}"
    );
    assert_eq!(gtids(&c), want, "C's data is untouched");
    assert_eq!(status(&b)["bootstrapping"], true, "B still mid-copy");

    // A goes on; B finishes; C carries on from B and ends equal to A.
    send_signal(a.pid(), "CONT");
    load_keys(&a, "default", "more", 0, 500, 100);
    let want = gtids(&a);
    wait_gtids(&b, &want);
    wait_gtids(&c, &want);
    let out = a.run(&["verify", "--node", &a.addr, "--node", &c.addr]);
    let report: Value = serde_json::from_slice(&out.stdout).expect("verify prints JSON");
    assert_eq!(report["equal"], true, "{report}");
    let uc = upstream(&c, 0);
    assert_eq!(uc["state"], "connected", "{uc}");
    assert_eq!(uc["errant"], "", "{uc}");
}

/// OPERATIONS.md "Retention and slots": slots hold the log "up to a cap (`slot_bytes_max`
/// ...; optional `slot_age_max`). Past the cap the oldest segments go anyway and the slots
/// that needed them become `invalidated`, with a reason naming the cap and the first offset
/// still available ... A reader asking for a removed position gets `offset N is not
/// available: the log holds A..=B` ..., never a silent skip."
#[test]
fn a_slot_past_the_age_cap_is_invalidated_its_log_purged_and_its_consumer_told() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with(
        &dir.path().join("n"),
        0,
        &[
            "--log-segment-bytes",
            "4096",
            "--log-retain-bytes",
            "0",
            "--log-slot-age-max",
            "2s",
        ],
    );
    load_batched(&node, "default", "k", 0, 20, 1000, 1); // offsets 1..=20, a few segments
    let checkpoint = dir.path().join("s.cp");
    let tail = |limit: u64| {
        node.cli()
            .args(["tail", "--node", &node.addr, "--from", "earliest"])
            .args(["--slot", "s", "--limit", &limit.to_string()])
            .arg("--checkpoint")
            .arg(&checkpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut consumer = tail(100);
    let mut lines = BufReader::new(consumer.stdout.take().unwrap()).lines();
    for _ in 0..20 {
        lines.next().expect("tail output").expect("UTF-8");
    }
    let slot = |node: &Node| -> Value {
        status(node)["slots"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "s").cloned())
            .unwrap_or(Value::Null)
    };
    wait_for(Duration::from_secs(30), "the slot to move to 21", || {
        (slot(&node)["restart_offset"] == 21).then_some(())
    });
    // The consumer dies; the log goes on and its segments age past the cap.
    consumer.kill().unwrap();
    consumer.wait().unwrap();
    load_batched(&node, "default", "k", 20, 40, 1000, 1); // offsets 21..=60

    let s = wait_for(
        Duration::from_secs(60),
        "the slot to be invalidated",
        || {
            let s = slot(&node);
            (s["state"] == "invalidated").then_some(s)
        },
    );
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("slot_age_max") && reason.contains("needed offset 21"),
        "the reason should name the cap and the offset: {s}"
    );
    let first = wait_for(Duration::from_secs(60), "retention to purge", || {
        let f = status(&node)["first_offset"].as_u64().unwrap();
        (f > 21).then_some(f)
    });

    // The consumer comes back from its checkpoint (offset 21): a clear error, no skip.
    let out = tail(100).wait_with_output().unwrap();
    assert!(!out.status.success(), "a resume into purged log succeeded");
    let err = stderr(&out);
    assert!(
        err.contains("offset 21 is not available") && err.contains(&format!("{first}..=")),
        "the consumer should be told what is gone and what is left: {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing may be delivered past the gap: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A fresh subscription naming the invalidated slot is refused too: its slot holds nothing,
    // and accepting it would let the consumer believe its position is kept.
    std::fs::remove_file(&checkpoint).unwrap();
    let out = tail(1).wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "a subscription with an invalidated slot was accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = stderr(&out);
    assert!(
        err.contains("slot s was invalidated") && err.contains("slot_age_max"),
        "the refusal should name the slot and why it was invalidated: {err}"
    );
}

/// Value bytes of each transaction in the re-delivery test: a batch (`batch_bytes_target`,
/// 256 KiB, PROTOCOL.md) closes once it holds that much, so it carries at most
/// `256 KiB / VALUE + 1` of these transactions.
const REDELIVERY_VALUE_BYTES: usize = 1024;
/// The most transactions one batch of the re-delivery test can carry.
const REDELIVERY_BATCH_TXNS_MAX: u64 = (256 << 10) / REDELIVERY_VALUE_BYTES as u64 + 1;

/// Kills `child` (`tideline tail`) and returns the offsets it printed, `got` (already read)
/// followed by those of its complete lines in `buffered` (read but not parsed) and in the
/// pipe (a line cut by the kill was not delivered), and its stderr.
fn drain_killed_tail(
    mut child: std::process::Child,
    mut got: Vec<u64>,
    buffered: Vec<u8>,
) -> (Vec<u64>, String) {
    use std::io::Read;
    let _ = child.kill(); // SIGKILL
    let status = child.wait().expect("wait for the killed tail");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the tail ended before the kill: {status}"
    );
    let mut rest = buffered;
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_end(&mut rest)
        .expect("read the tail's stdout");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut err)
        .expect("read the tail's stderr");
    let text = String::from_utf8(rest).expect("the tail prints UTF-8");
    let complete = text.rsplit_once('\n').map_or("", |(lines, _cut)| lines);
    for line in complete.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).expect("the tail prints JSON lines");
        got.push(v["offset"].as_u64().expect("offset"));
    }
    (got, err)
}

/// The offset a checkpoint file holds.
fn checkpoint_offset(path: &std::path::Path) -> u64 {
    let bytes = std::fs::read(path).expect("the tail saved its checkpoint");
    tideline_consumers::Position::parse(&bytes)
        .unwrap_or_else(|e| panic!("the checkpoint {} does not parse: {e}", path.display()))
        .offset
}

/// PROTOCOL.md: the consumer saves its checkpoint "when it has fully taken a batch ... at
/// most every 200 ms (`checkpoint_interval`) ...; after a crash of the consumer itself at most
/// what arrived in that interval is delivered again", and `tail.rs`'s contract: it never
/// stores a checkpoint past what it has printed. Scenario: `tideline tail --checkpoint` is
/// killed with SIGKILL twice while it is printing a 3,000-transaction log (the test has read
/// 700 lines of each run and more are on the way), then runs to the end. The test reads at
/// most one line per 2 ms, so a batch (at most 257 transactions of 1 KiB here) takes longer
/// than the 200 ms interval to print and every batch boundary is a save: what a killed run
/// printed past its saved checkpoint is at most one batch. Checked per kill: the checkpoint is
/// not past what was printed, what is printed again is at most one batch, the next run starts
/// right after the checkpoint (and says so on stderr), and over the three runs every offset
/// 1..=3000 is printed, the re-delivered ones twice and no other twice.
///
/// Guards against: a checkpoint saved ahead of the output (a crash then loses transactions),
/// a save that stops after the first (a crash repeats everything since), and a resume from
/// anywhere but the checkpoint.
#[test]
fn a_tail_killed_mid_stream_re_delivers_at_most_the_batch_after_its_checkpoint() {
    const TXNS: u64 = 3_000;
    const READ_PER_RUN: usize = 700;
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("n"), 0);
    load_batched(&node, "default", "k", 1, TXNS, REDELIVERY_VALUE_BYTES, 1);
    let checkpoint = dir.path().join("tail.cp");
    let spawn_tail = |limit: u64| {
        node.cli()
            .args(["tail", "--node", &node.addr, "--from", "earliest"])
            .args(["--limit", &limit.to_string()])
            .arg("--checkpoint")
            .arg(&checkpoint)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tideline tail")
    };

    let mut printed: Vec<u64> = Vec::new(); // every run's output, in order
    let mut saved = 0u64; // the checkpoint the next run resumes from
    for run in 1..=2 {
        let mut child = spawn_tail(TXNS);
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut got = Vec::new();
        let mut line = String::new();
        while got.len() < READ_PER_RUN {
            line.clear();
            let n = lines.read_line(&mut line).expect("read the tail's stdout");
            assert!(n > 0, "run {run}: the tail ended after {} lines", got.len());
            let v: Value = serde_json::from_str(&line).expect("the tail prints JSON lines");
            got.push(v["offset"].as_u64().expect("offset"));
            // The pace that makes each batch take longer than the checkpoint interval.
            std::thread::sleep(Duration::from_millis(2));
        }
        // Kill the tail mid-stream; what the reader buffered comes before the pipe's rest.
        let buffered = lines.buffer().to_vec();
        child.stdout = Some(lines.into_inner());
        let (got, err) = drain_killed_tail(child, got, buffered);
        let last = *got.last().expect("the run printed");
        assert_eq!(
            got,
            (saved + 1..=last).collect::<Vec<_>>(),
            "run {run} (resumed after {saved}) printed a gap or a duplicate; stderr: {err}"
        );
        assert!(
            last < TXNS,
            "run {run} printed the whole log before the kill: the kill was not mid-stream"
        );
        let cp = checkpoint_offset(&checkpoint);
        assert!(
            cp <= last,
            "run {run}: the checkpoint holds offset {cp}, past the last printed ({last}): a \
             crash loses {}..={cp}",
            last + 1
        );
        assert!(
            cp > saved,
            "run {run}: the checkpoint did not move from {saved} while {} lines were printed",
            got.len()
        );
        let again = last - cp;
        eprintln!(
            "run {run}: printed {}..={last}, killed; checkpoint at {cp}: {again} transactions \
             will be delivered again (bound {REDELIVERY_BATCH_TXNS_MAX}, one batch)",
            saved + 1
        );
        assert!(
            again <= REDELIVERY_BATCH_TXNS_MAX,
            "run {run}: {again} transactions printed past the checkpoint ({cp}..{last}), more \
             than one batch ({REDELIVERY_BATCH_TXNS_MAX}): saves do not follow the batches"
        );
        printed.extend(&got);
        saved = cp;
    }

    // The last run resumes after the checkpoint and reads to the end.
    let out = spawn_tail(TXNS - saved)
        .wait_with_output()
        .expect("run tideline tail");
    let err = stderr(&out);
    assert!(out.status.success(), "the last run failed: {err}");
    assert!(
        err.contains(&format!("resuming after offset {saved} ")),
        "the tail should say it resumes from its checkpoint (offset {saved}): {err}"
    );
    let got: Vec<u64> = String::from_utf8(out.stdout)
        .expect("the tail prints UTF-8")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("the tail prints JSON lines")["offset"]
                .as_u64()
                .expect("offset")
        })
        .collect();
    assert_eq!(got, (saved + 1..=TXNS).collect::<Vec<_>>(), "the last run");
    printed.extend(&got);

    // Over the three runs: everything, and only what the bound allows twice.
    let mut seen = std::collections::BTreeMap::<u64, u32>::new();
    for o in &printed {
        *seen.entry(*o).or_default() += 1;
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=TXNS).collect::<Vec<_>>()
    );
    let twice = seen.values().filter(|n| **n > 1).count() as u64;
    assert!(
        seen.values().all(|n| *n <= 2) && twice <= 2 * REDELIVERY_BATCH_TXNS_MAX,
        "{twice} transactions delivered more than once over two kills"
    );
}

/// Commits the deletion of `keys` of `tree` on `node` in one transaction (through the Rust
/// client: the CLI deletes one key per process).
fn delete_keys(node: &Node, tree: &str, keys: &[String]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let secrets =
            tideline_stream::tls::load_client_dir(&node.secrets()).expect("the cluster's secrets");
        let client = tideline_stream::Client::connect(
            &node.addr,
            tideline_stream::ClientConfig::new(secrets),
        )
        .await
        .expect("connect");
        let ops = keys
            .iter()
            .map(|k| tideline_stream::WriteOp::Delete {
                tree: tree.into(),
                key: k.clone().into_bytes(),
            })
            .collect();
        client.commit(ops).await.expect("commit the deletes");
    });
}

/// OPERATIONS.md "Bootstrap": a replica "whose upstream purged GTIDs it needs copies the
/// upstream's state", and ARCHITECTURE.md: `bootstrap_begin` wipes the state first. Scenario:
/// B replicates A (two trees), then is stopped; meanwhile A deletes every key of tree `stale`
/// and half of `default`, rewrites the other half, and purges the log B would need. B,
/// restarted, must bootstrap (its local data is stale, not empty) and end equal to A
/// (`tideline verify`) with none of the deleted keys, in either tree, and the new values.
///
/// Guards against: a bootstrap that copies over the old state instead of replacing it, so
/// keys deleted on the upstream while the replica was away live on in the replica.
#[test]
fn a_bootstrap_over_stale_local_data_leaves_none_of_the_old_keys() {
    let (dir, secrets) = cluster();
    let a = purging_node(&dir.path().join("a"), &secrets);
    let b_args = |a: &Node| {
        vec![
            "--secrets".to_string(),
            secrets.clone(),
            "--upstream".to_string(),
            a.addr.clone(),
            "--bootstrap-chunk-bytes".to_string(),
            "65536".to_string(),
        ]
    };
    let args = b_args(&a);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = Node::start_with(&dir.path().join("b"), 0, &args);
    load_keys(&a, "stale", "gone", 0, 300, 100);
    load_keys(&a, "default", "old", 0, 600, 100);
    wait_gtids(&b, &gtids(&a));
    assert_eq!(common::scan(&b, "stale").lines().count(), 300);
    assert_eq!(common::scan(&b, "default").lines().count(), 600);
    let b_data = b.data.clone();
    drop(b); // killed
    let b_needs = status(&a)["last_offset"].as_u64().unwrap() + 1;

    // While B is away: A deletes all of `stale` and old:0..300, rewrites old:300..600, writes
    // new keys (a transaction of about 11 KB per 16 KiB segment) and purges what B needs.
    let gone: Vec<String> = (0..300).map(|i| format!("gone:{i:08}")).collect();
    delete_keys(&a, "stale", &gone);
    let old: Vec<String> = (0..300).map(|i| format!("old:{i:08}")).collect();
    delete_keys(&a, "default", &old);
    load_keys(&a, "default", "old", 300, 300, 7);
    for i in 0..20 {
        load_keys(&a, "default", "new", i * 100, 100, 100);
    }
    wait_purged_past(&a, b_needs);

    let b = Node::start_with(&b_data, 0, &args);
    wait_for(
        Duration::from_secs(300),
        "B to bootstrap and catch up",
        || {
            let u = upstream(&b, 0);
            (u["state"] == "connected" && !u["bootstrap"].is_null() && gtids(&b) == gtids(&a))
                .then_some(())
        },
    );
    // B's `stale` tree, empty on A, may be absent (an unknown tree) or empty.
    let out = b.run(&["scan", "--tree", "stale", "--limit", "1000000"]);
    let stale = if out.status.success() {
        String::from_utf8(out.stdout).expect("scan prints UTF-8")
    } else {
        assert!(
            stderr(&out).contains("no tree"),
            "scan of B's tree `stale`: {}",
            stderr(&out)
        );
        String::new()
    };
    let default = common::scan(&b, "default");
    let old_left: Vec<&str> = stale
        .lines()
        .chain(default.lines())
        .filter(|l| {
            let key = l.split('\t').next().unwrap_or_default();
            key.starts_with("gone:")
                || key
                    .strip_prefix("old:")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n < 300)
        })
        .collect();
    assert!(
        old_left.is_empty(),
        "B kept {} keys its upstream deleted while it was away, e.g. {:?}",
        old_left.len(),
        &old_left[..old_left.len().min(3)]
    );
    assert!(
        default
            .lines()
            .filter(|l| l.starts_with("old:"))
            .all(|l| l.ends_with("\tvvvvvvv")),
        "B kept old values of rewritten keys"
    );
    assert_eq!(
        default.lines().count(),
        300 + 2_000,
        "B's default tree: old:300..600 and new:0..2000"
    );
    let out = a.run(&["verify", "--node", &a.addr, "--node", &b.addr]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify prints JSON ({e}): {}", stderr(&out)));
    assert!(
        out.status.success() && report["equal"] == true,
        "tideline verify finds A and B different: {report}"
    );
}

/// A node of the cluster whose log keeps nothing it need not: 16 KiB segments, no retained
/// bytes, so that a few writes purge its beginning.
fn purging_node(data: &std::path::Path, secrets: &str) -> Node {
    Node::start_with(
        data,
        0,
        &[
            "--secrets",
            secrets,
            "--log-segment-bytes",
            "16384",
            "--log-retain-bytes",
            "0",
        ],
    )
}
