//! Secondary indexes across processes: what a user of `tideline index`, `get --index`,
//! `scan --index` and a replica relies on.
//!
//! - A replica of a node with an index has the same index, whether it copies the state
//!   (bootstrap) or tails the log from the start: same definitions, same documents in the
//!   same order, same counters.
//! - Read fence: 1,000 iterations of "write on the primary, then read the index on a replica
//!   with `after GTID`" (the library `Session`) see the new value and not the old one; a few
//!   go through the CLI's `--after`. Without the fence the check is not guaranteed, which is
//!   what the fence is for.
//! - kill -9 of the node mid-workload and mid-backfill, ≥ 20 cycles: after each restart the
//!   index equals a recomputation from a full scan (documents, order, entries, skipped).
//!   The harness's canary is the engine's (`engine/tests/indexes.rs`: the same checks fail
//!   with index maintenance skipped on replay); the node binary has no test switches.
//! - Unique refusal with its error text; skipped documents counted in `index status`.
//! - A fenced query that times out (fence not reached, or the index still backfilling) names
//!   `--after-timeout-ms`, never tells a user who passed `--after` to pass a fence.
//! - `get --index` with more `--and` values than the index has paths is refused, naming how
//!   many paths it has, not answered "not found".

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Node, wait_gtids};
use serde_json::Value;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("UTF-8 output")
}

fn gtid_of(commit_json: &str) -> String {
    let v: Value = serde_json::from_str(commit_json.trim()).expect("commit JSON");
    v["gtid"].as_str().expect("gtid").to_string()
}

/// Loads `KEY<TAB>JSON` documents through `tideline load`.
fn load_docs(node: &Node, tree: &str, docs: impl Iterator<Item = (String, String)>) {
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--tree", tree])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for (k, v) in docs {
            writeln!(stdin, "{k}\t{v}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

fn index_list(node: &Node) -> Vec<Value> {
    let out = ok(&node.run(&["index", "list", "--json"]));
    serde_json::from_str(&out).expect("index list JSON")
}

/// Waits until every index of `node` is live.
fn wait_live(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = index_list(node);
        if all.iter().all(|i| i["state"] == "live") {
            return;
        }
        assert!(Instant::now() < deadline, "indexes not live: {all:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `scan --index` must print for the tree's documents: keys in index order (by the
/// string at `path`, then key), and how many documents are skipped.
fn recompute(scan_out: &str, path: &str) -> (Vec<String>, u64) {
    let mut entries = Vec::new();
    let mut skipped = 0;
    for line in scan_out.lines() {
        let (k, v) = line.split_once('\t').expect("KEY<TAB>VALUE");
        let value = serde_json::from_str::<Value>(v)
            .ok()
            .and_then(|d| d.pointer(path).cloned());
        match value {
            Some(Value::String(s)) => {
                let mut order = tideline_engine::value_prefix(&[s.into_bytes()]);
                order.extend_from_slice(k.as_bytes());
                entries.push((order, k.to_string()));
            }
            Some(Value::Object(_) | Value::Array(_)) | None => skipped += 1,
            Some(other) => {
                let mut order = tideline_engine::value_prefix(&[other.to_string().into_bytes()]);
                order.extend_from_slice(k.as_bytes());
                entries.push((order, k.to_string()));
            }
        }
    }
    entries.sort();
    (entries.into_iter().map(|(_, k)| k).collect(), skipped)
}

/// Checks index `name` (over `path`) of `tree` on `node` against a recomputation.
fn check_index(node: &Node, tree: &str, name: &str, path: &str) -> Result<(), String> {
    let docs = ok(&node.run(&["scan", "--tree", tree]));
    let (want, skipped) = recompute(&docs, path);
    let out = node.run(&["scan", "--tree", tree, "--index", name]);
    if !out.status.success() {
        return Err(format!(
            "scan --index failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once('\t').map_or(l, |(k, _)| k).to_string())
        .collect();
    if got != want {
        return Err(format!(
            "index {name}: {} documents, recomputation {}; first difference at {:?}",
            got.len(),
            want.len(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        ));
    }
    let info = index_list(node)
        .into_iter()
        .find(|i| i["tree"] == tree && i["name"] == name)
        .ok_or_else(|| format!("index {name} missing"))?;
    if info["entries"] != want.len() as u64 || info["skipped"] != skipped {
        return Err(format!(
            "index {name}: entries/skipped {}/{}, recomputation {}/{skipped}",
            info["entries"],
            info["skipped"],
            want.len()
        ));
    }
    Ok(())
}

fn primary(dir: &Path, name: &str, secrets: &Path) -> Node {
    Node::start_with(
        &dir.join(name),
        0,
        &["--secrets", secrets.to_str().expect("UTF-8 path")],
    )
}

fn replica(dir: &Path, name: &str, secrets: &Path, upstream: &Node, bootstrap: &str) -> Node {
    Node::start_with(
        &dir.join(name),
        0,
        &[
            "--secrets",
            secrets.to_str().expect("UTF-8 path"),
            "--upstream",
            &upstream.addr,
            "--bootstrap",
            bootstrap,
        ],
    )
}

fn doc(i: u64) -> String {
    match i % 10 {
        // Skipped: not JSON, field missing, an object at the path.
        7 => "not json".to_string(),
        8 => format!(r#"{{"name":"n{i}"}}"#),
        9 => r#"{"email":{"x":1}}"#.to_string(),
        _ => format!(r#"{{"email":"e{}@x","n":{i}}}"#, i % 300),
    }
}

#[test]
fn a_replica_of_a_node_with_an_index_has_the_same_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let p = primary(dir.path(), "p", &secrets);
    load_docs(&p, "users", (0..3000).map(|i| (format!("u{i:05}"), doc(i))));
    ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email", "--wait",
    ]));
    // One replica copies the state (bootstrap), one tails the log from its start.
    let copied = replica(dir.path(), "r1", &secrets, &p, "auto");
    let tailed = replica(dir.path(), "r2", &secrets, &p, "never");
    // Writes after the replicas started, and a second index declared while they run.
    load_docs(
        &p,
        "users",
        (2500..3500).map(|i| (format!("u{i:05}"), doc(i + 1))),
    );
    ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_name", "--path", "/name",
    ]));
    ok(&p.run(&["del", "--tree", "users", "u00001"]));
    let want = common::gtids(&p);
    for r in [&copied, &tailed] {
        wait_gtids(r, &want);
        wait_live(r);
    }
    wait_live(&p);
    let defs = |n: &Node| -> Vec<(Value, Value, Value, Value, Value)> {
        index_list(n)
            .into_iter()
            .map(|i| {
                (
                    i["tree"].clone(),
                    i["name"].clone(),
                    i["paths"].clone(),
                    i["entries"].clone(),
                    i["skipped"].clone(),
                )
            })
            .collect()
    };
    let on_primary = defs(&p);
    assert_eq!(on_primary.len(), 2, "{on_primary:?}");
    for r in [&copied, &tailed] {
        assert_eq!(defs(r), on_primary, "replica {}", r.addr);
        for (name, path) in [("by_email", "/email"), ("by_name", "/name")] {
            check_index(r, "users", name, path).unwrap_or_else(|e| panic!("{}: {e}", r.addr));
            let a = ok(&p.run(&["scan", "--tree", "users", "--index", name]));
            let b = ok(&r.run(&["scan", "--tree", "users", "--index", name]));
            assert_eq!(a, b, "index {name} on {}", r.addr);
        }
    }
    check_index(&p, "users", "by_email", "/email").expect("primary");
    // A drop reaches the replicas too.
    ok(&p.run(&["index", "drop", "--tree", "users", "--name", "by_name"]));
    let want = common::gtids(&p);
    for r in [&copied, &tailed] {
        wait_gtids(r, &want);
        assert_eq!(index_list(r).len(), 1);
    }
}

#[test]
fn fenced_index_reads_on_a_replica_see_the_write_just_made_on_the_primary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let p = primary(dir.path(), "p", &secrets);
    ok(&p.run(&["put", "--tree", "users", "seed", r#"{"email":"seed"}"#]));
    ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email", "--wait",
    ]));
    let r = replica(dir.path(), "r", &secrets, &p, "auto");
    wait_gtids(&r, &common::gtids(&p));
    wait_live(&r);

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let cfg = || {
        let s = tideline_stream::tls::load_client_dir(&secrets).expect("client secrets");
        tideline_stream::ClientConfig::new(s)
    };
    let writer = tideline_consumers::Session::new(p.addr.clone(), cfg());
    let reader = tideline_consumers::Session::new(r.addr.clone(), cfg());
    rt.block_on(async {
        let key = b"k".to_vec();
        for i in 0..1000u64 {
            let value = format!(r#"{{"email":"v{i}"}}"#);
            let client = writer.client().await.expect("connect to the primary");
            let (_, gtid) = client
                .commit(vec![tideline_stream::WriteOp::Put {
                    tree: "users".into(),
                    key: key.clone(),
                    value: value.clone().into_bytes(),
                }])
                .await
                .expect("commit");
            let fence: tideline_wal::GtidSet = gtid.parse().expect("GTID");
            let new = reader
                .index_get(
                    "users",
                    "by_email",
                    &[format!("v{i}").into_bytes()],
                    Some(&fence),
                    Duration::from_secs(30),
                )
                .await
                .expect("fenced read");
            assert_eq!(
                new,
                vec![(key.clone(), value.into_bytes())],
                "iteration {i}"
            );
            if i > 0 {
                let old = reader
                    .index_get(
                        "users",
                        "by_email",
                        &[format!("v{}", i - 1).into_bytes()],
                        Some(&fence),
                        Duration::from_secs(30),
                    )
                    .await
                    .expect("fenced read");
                assert!(
                    old.is_empty(),
                    "iteration {i}: the old value still finds {old:?}"
                );
            }
        }
    });
    // The CLI's fence, a few times.
    for i in 0..10 {
        let value = format!(r#"{{"email":"cli{i}"}}"#);
        let g = gtid_of(&ok(&p.run(&["put", "--tree", "users", "k", &value])));
        let out = ok(&r.run(&[
            "get",
            "--tree",
            "users",
            "--index",
            "by_email",
            &format!("cli{i}"),
            "--after",
            &g,
        ]));
        assert_eq!(out, format!("k\t{value}\n"));
        let stale = r.run(&[
            "get", "--tree", "users", "--index", "by_email", "v999", "--after", &g,
        ]);
        assert_eq!(stale.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&stale.stderr).trim(), "not found");
    }
    // A fence the replica cannot reach in time is a clear error.
    let unknown = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1";
    let out = r.run(&[
        "get",
        "--tree",
        "users",
        "--index",
        "by_email",
        "x",
        "--after",
        unknown,
        "--after-timeout-ms",
        "300",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has not applied")
            && err.contains("within 300 ms")
            && err.contains("--after-timeout-ms"),
        "the message must name the fence's timeout flag: {err}"
    );
}

/// A fenced query whose fence is reached but whose index still backfills at the deadline
/// says so and names the flag that gives it more time (`--after-timeout-ms`); it does not
/// tell a user who passed `--after` to pass a fence.
#[test]
fn a_fenced_query_of_a_backfilling_index_names_the_timeout_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    // One document per backfill step: 100,000 documents take far longer than the query's
    // 300 ms, so the index is still backfilling at its deadline.
    let p = Node::start_with(
        &dir.path().join("p"),
        0,
        &[
            "--secrets",
            secrets.to_str().expect("UTF-8 path"),
            "--index-backfill-keys",
            "1",
        ],
    );
    load_docs(
        &p,
        "users",
        (0..100_000u64).map(|i| (format!("u{i:06}"), format!(r#"{{"email":"e{i}@x"}}"#))),
    );
    let g = gtid_of(&ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email",
    ])));
    let out = p.run(&[
        "get",
        "--tree",
        "users",
        "--index",
        "by_email",
        "e1@x",
        "--after",
        &g,
        "--after-timeout-ms",
        "300",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let state = index_list(&p)[0]["state"].clone();
    assert_eq!(state, "backfilling", "the index went live too soon: {err}");
    assert!(
        !out.status.success()
            && err.contains("backfilling")
            && err.contains("--after-timeout-ms")
            && !err.contains("pass a fence"),
        "exit {:?}; a fenced query of a backfilling index must say to raise \
         --after-timeout-ms, not to pass a fence: {err}",
        out.status.code()
    );
}

#[test]
fn unique_refusal_and_skipped_documents_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let p = primary(dir.path(), "p", &secrets);
    for (k, v) in [
        ("u1", r#"{"email":"a@x"}"#),
        ("u2", r#"{"email":"a@x"}"#),
        ("u3", "plain text"),
        ("u4", r#"{"nick":"no email"}"#),
    ] {
        ok(&p.run(&["put", "--tree", "users", k, v]));
    }
    ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email", "--unique",
        "--wait",
    ]));
    let status = ok(&p.run(&[
        "index", "status", "--tree", "users", "--name", "by_email", "--json",
    ]));
    let s: Value = serde_json::from_str(&status).expect("JSON");
    assert_eq!(s["state"], "live");
    assert_eq!(s["skipped"], 2, "{s}");
    assert_eq!(s["entries"], 2, "{s}");
    assert_eq!(s["duplicates"], 1, "{s}");
    let text = ok(&p.run(&["index", "status", "--tree", "users", "--name", "by_email"]));
    assert!(text.contains("skipped     2 documents"), "{text}");
    let out = p.run(&["put", "--tree", "users", "u9", r#"{"email":"a@x"}"#]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unique index `by_email` on tree `users` already maps value \"a@x\" to key"),
        "{err}"
    );
    assert!(err.lines().count() == 1, "one line: {err}");
    let missing = p.run(&["get", "--tree", "users", "u9"]);
    assert_eq!(missing.status.code(), Some(1), "nothing was written");
    // Skipped documents that gain the field are indexed.
    ok(&p.run(&["put", "--tree", "users", "u4", r#"{"email":"d@x"}"#]));
    let s: Value = serde_json::from_str(&ok(&p.run(&[
        "index", "status", "--tree", "users", "--name", "by_email", "--json",
    ])))
    .expect("JSON");
    assert_eq!(
        (s["entries"].as_u64(), s["skipped"].as_u64()),
        (Some(3), Some(1))
    );
    // Bad definitions get one-line errors that say what to do.
    let out = p.run(&[
        "index", "create", "--tree", "users", "--name", "x", "--path", "email",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a JSON pointer"));
    let out = p.run(&["get", "--tree", "users", "--index", "nope", "a@x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no index named `nope`"));
    // Metrics carry the counters.
    let st = common::status(&p);
    assert_eq!(st["indexes"][0]["skipped"], 1);
}

/// Documents of the kill test's tree, backfilled by every re-created index.
const BACKFILL_DOCS: u64 = 10_000;

/// kill -9 mid-workload and mid-backfill, ≥ 20 cycles.
#[test]
fn kill9_mid_workload_and_mid_backfill_keeps_the_index_equal_to_recomputation() {
    let cycles: u64 = std::env::var("TIDELINE_INDEX_KILL_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill9 index test: seed {seed} (replay with TIDELINE_TEST_SEED={seed})");
    let mut rng_state = seed | 1;
    let mut rand = move |n: u64| {
        // xorshift: enough for kill delays and choices.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % n
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n");
    // The first start picks a free port; restarts keep it.
    let port = std::cell::Cell::new(0u16);
    let mut mid_backfill = 0;
    // Small backfill steps: a backfill spans many batches, so kills land inside it.
    let start = || {
        let n = Node::start_with(&data, port.get(), &["--index-backfill-keys", "2"]);
        port.set(n.port());
        n
    };
    for cycle in 0..cycles {
        let t0 = Instant::now();
        let mut node = start();
        if cycle == 0 {
            load_docs(
                &node,
                "docs",
                // Enough documents that a backfill of 2-key steps outlasts the `index list`
                // call that sees it (with 5,000, a loaded machine finished it first in every
                // cycle aimed at it); the writers touch the first 5,100.
                (0..BACKFILL_DOCS).map(|i| (format!("d{i:05}"), doc(i))),
            );
            ok(&node.run(&[
                "index", "create", "--tree", "docs", "--name", "by_email", "--path", "/email",
            ]));
        } else if cycle % 2 == 0 {
            ok(&node.run(&["index", "drop", "--tree", "docs", "--name", "by_email"]));
            ok(&node.run(&[
                "index", "create", "--tree", "docs", "--name", "by_email", "--path", "/email",
            ]));
        }
        // Writers in this process change, patch and delete documents until the kill.
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, acked) = (stop.clone(), acked.clone());
            let secrets = node.secrets();
            let addr = node.addr.clone();
            let salt = rand(1 << 30);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                rt.block_on(async {
                    let s = tideline_stream::tls::load_client_dir(&secrets).expect("secrets");
                    let Ok(c) = tideline_stream::Client::connect(
                        &addr,
                        tideline_stream::ClientConfig::new(s),
                    )
                    .await
                    else {
                        return;
                    };
                    let mut i = salt;
                    while !stop.load(Ordering::SeqCst) {
                        i += 1;
                        let key = format!("d{:05}", i % 5100).into_bytes();
                        let op = if i % 6 == 0 {
                            tideline_stream::WriteOp::Delete {
                                tree: "docs".into(),
                                key,
                            }
                        } else {
                            tideline_stream::WriteOp::Put {
                                tree: "docs".into(),
                                key,
                                value: doc(i * 7).into_bytes(),
                            }
                        };
                        // A commit cut off by the kill ends the writer at once.
                        match tokio::time::timeout(Duration::from_millis(500), c.commit(vec![op]))
                            .await
                        {
                            Ok(Ok(_)) => {}
                            _ => return,
                        }
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                });
            })
        };
        // Kill once writes are observably going (one acknowledged write in the cycles that
        // aim at the backfill, whose 2,500 steps take a fraction of a second; five in the
        // others), a seeded while later.
        let flowing = if cycle % 4 == 0 { 1 } else { 5 };
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.load(Ordering::SeqCst) < flowing {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: no write acknowledged"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Every fourth cycle (one that has just declared the index) kills as soon as writes
        // flow, while the backfill still runs; the others a seeded while later, mostly with
        // the index live.
        if cycle % 4 != 0 {
            std::thread::sleep(Duration::from_millis(rand(300)));
        }
        let backfilling = index_list(&node)
            .iter()
            .any(|i| i["state"] == "backfilling");
        node.kill9();
        stop.store(true, Ordering::SeqCst);
        // Not joined: its client may take the idle timeout to notice the dead node, and
        // nothing it does afterwards reaches the next node (new connection, new process).
        drop(writer);

        mid_backfill += u32::from(backfilling);
        eprintln!(
            "cycle {cycle} (seed {seed}): killed after {} acks{}",
            acked.load(Ordering::SeqCst),
            if backfilling { ", mid-backfill" } else { "" }
        );
        let t1 = Instant::now();
        let node = start();
        wait_live(&node);
        let t2 = Instant::now();
        check_index(&node, "docs", "by_email", "/email")
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): {e}"));
        eprintln!(
            "cycle {cycle}: workload {:?}, restart and backfill {:?}, check {:?}",
            t1 - t0,
            t2 - t1,
            t2.elapsed()
        );
        drop(node);
    }
    assert!(
        mid_backfill > 0 || cycles < 10,
        "no kill landed mid-backfill (seed {seed})"
    );
}

/// Plain CLI scans page by page through the index in value order, with `--prefix` and
/// `--limit`.
#[test]
fn scan_by_index_ranges_over_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let p = primary(dir.path(), "p", &secrets);
    let mut docs = BTreeMap::new();
    for i in 0..30_000u64 {
        docs.insert(
            format!("k{i:05}"),
            format!(r#"{{"city":"c{:03}"}}"#, (i * 37) % 500),
        );
    }
    load_docs(&p, "t", docs.clone().into_iter());
    ok(&p.run(&[
        "index", "create", "--tree", "t", "--name", "by_city", "--path", "/city", "--wait",
    ]));
    let all = ok(&p.run(&["scan", "--tree", "t", "--index", "by_city"]));
    let (want, _) = recompute(&ok(&p.run(&["scan", "--tree", "t"])), "/city");
    let got: Vec<&str> = all
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    assert_eq!(got, want);
    let some = ok(&p.run(&[
        "scan", "--tree", "t", "--index", "by_city", "--prefix", "c01", "--limit", "5",
    ]));
    let lines: Vec<&str> = some.lines().collect();
    assert_eq!(lines.len(), 5);
    assert!(lines.iter().all(|l| l.contains(r#""city":"c01"#)), "{some}");
}

/// `get --index` with more `--and` values than the index has paths is a mistake the node
/// names (how many paths the index has), with a non-zero exit: never "not found" while the
/// document is there.
#[test]
fn get_by_index_with_more_values_than_paths_says_how_many_paths_the_index_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path().join("secrets");
    let p = primary(dir.path(), "p", &secrets);
    ok(&p.run(&["put", "--tree", "users", "u1", r#"{"email":"a@x"}"#]));
    ok(&p.run(&[
        "index", "create", "--tree", "users", "--name", "by_email", "--path", "/email", "--wait",
    ]));
    let found = ok(&p.run(&["get", "--tree", "users", "--index", "by_email", "a@x"]));
    assert_eq!(found, "u1\t{\"email\":\"a@x\"}\n");
    let out = p.run(&[
        "get", "--tree", "users", "--index", "by_email", "a@x", "--and", "u1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("1 path") && err.contains("2 values"),
        "exit {:?}, stderr: {err}",
        out.status.code()
    );
    assert!(!err.contains("not found"), "{err}");
}
