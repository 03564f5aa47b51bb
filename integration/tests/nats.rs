//! The NATS JetStream sink against the real server on 127.0.0.1:4222 (and, for the restart
//! test, a `nats-server` of its own).
//!
//! Scenarios: a node takes a seeded random workload (puts and deletes, one to three changes
//! per transaction, a third spanning two trees) while a connector child process (this test
//! binary re-executed) runs a pipeline into a fresh stream and is killed with SIGKILL as soon
//! as it has published something, again and again (20 cycles; `TIDELINE_SINK_KILL_CYCLES` for
//! more, see `scripts/sink-crash`). A last child catches up; then the stream must hold each
//! transaction exactly once (count, GTIDs, ids, changes) and replaying it must give the
//! workload's final state. A second scenario stops and restarts the NATS server under a running
//! pipeline: it retries, reports the outage and catches up, again exactly once. A third puts
//! two pipelines on one stream (the default stream is shared): filtering different trees of
//! the same transactions, or both bootstrapping the same source (two trees with an index
//! each); each pipeline's subjects must hold every one of its changes, rows and index
//! definitions, the changes and rows exactly once.
//!
//! Guards against: a checkpoint written before the acks (loss), a re-sent batch landing twice
//! (no or unstable `Nats-Msg-Id`), a pipeline that gives up or loses data across a server
//! restart, two messages sharing an id (two pipelines', or two trees' tree events in one
//! bootstrap) so that the stream drops one as a "duplicate" and the sink moves past it. Canary: with the `Nats-Msg-Id` header off (feature `testing`), the same kill
//! cycles must leave duplicates that the same checker reports.

mod common;
mod sinkkit;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tideline_connectors::sink::nats::{NatsConfig, NatsSink, Per, message};
use tideline_connectors::{PipelineCheckpoint, Sink, SinkError};

use common::{Node, free_port};
use sinkkit::{Committed, Model};

const CHILD_TEST: &str = "nats_connector_child";
const NATS_PORT: u16 = 4222;

/// The connector child of the kill tests; does nothing unless they re-execute it.
#[test]
#[ignore = "the connector child process of the kill tests; it does nothing unless they re-execute it"]
fn nats_connector_child() {
    sinkkit::child_main();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn js(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    jetstream::new(client)
}

/// The stored checkpoint's source offset, 0 without one.
async fn checkpoint_offset(js: &jetstream::Context, bucket: &str, pipeline: &str) -> u64 {
    let Ok(kv) = js.get_key_value(bucket).await else {
        return 0;
    };
    match kv.get(pipeline).await {
        Ok(Some(b)) => PipelineCheckpoint::decode(&b)
            .map(|c| c.offset())
            .unwrap_or(0),
        _ => 0,
    }
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of `stream`: `(Nats-Msg-Id, subject, payload)`.
async fn read_all(js: &jetstream::Context, stream: &str) -> Vec<(String, String, Value)> {
    let mut s = js.get_stream(stream).await.expect("the stream exists");
    let last = s.info().await.expect("stream info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = s.get_raw_message(seq).await.expect("a stored message");
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let payload: Value = serde_json::from_slice(&m.payload).expect("a JSON payload");
        out.push((id, m.subject.to_string(), payload));
    }
    out
}

/// Checks that the stream holds each committed transaction exactly once, in a shape that
/// replays to `model`, each message of a transaction with id `PIPELINE/GTID` (`pipeline`'s).
/// `Err` says what is wrong.
fn check_stream(
    msgs: &[(String, String, Value)],
    committed: &[Committed],
    model: &Model,
    cfg: &NatsConfig,
    pipeline: &str,
) -> Result<(), String> {
    let by_gtid: BTreeMap<&str, &Committed> =
        committed.iter().map(|c| (c.gtid.as_str(), c)).collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut replay = Model::new();
    let mut changes_seen = 0usize;
    let mut tree_ops = 0usize;
    // Reported after repeats, so that the canary (no ids at all) is judged by its repeats.
    let mut id_err = None;
    for (id, subject, p) in msgs {
        let envelopes: Vec<Value> = match cfg.per {
            Per::Txn => p["changes"].as_array().cloned().unwrap_or_default(),
            Per::Op => vec![p.clone()],
        };
        // The node creates a tree in the transaction that first writes to it: the workload's
        // model holds only its own puts and deletes.
        let envelopes: Vec<Value> = envelopes.into_iter().filter(sinkkit::is_data).collect();
        if envelopes.is_empty() {
            tree_ops += 1;
            continue;
        }
        let gtid = match cfg.per {
            Per::Txn => p["gtid"].as_str().unwrap_or_default().to_string(),
            Per::Op => p["source"]["gtid"].as_str().unwrap_or_default().to_string(),
        };
        let c = by_gtid
            .get(gtid.as_str())
            .ok_or_else(|| format!("message {id} carries GTID {gtid:?}, never committed"))?;
        let key = match cfg.per {
            Per::Txn => {
                if *id != format!("{pipeline}/{gtid}") && id_err.is_none() {
                    id_err = Some(format!("message of {gtid} has Nats-Msg-Id {id:?}"));
                }
                let trees: BTreeSet<&str> =
                    c.changes.iter().map(|(_, t, _, _)| t.as_str()).collect();
                let tree = if trees.len() == 1 {
                    trees.iter().next().copied().unwrap_or_default()
                } else {
                    message::MULTI_TREE
                };
                if subject != &message::subject(&cfg.subject, tree) {
                    return Err(format!("{gtid} on subject {subject}"));
                }
                let got: Vec<(String, String, String, String)> = envelopes
                    .iter()
                    .map(|e| {
                        (
                            e["op"].as_str().unwrap_or_default().to_string(),
                            e["tree"].as_str().unwrap_or_default().to_string(),
                            e["key"].as_str().unwrap_or_default().to_string(),
                            e["after"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect();
                let want: Vec<(String, String, String, String)> = c
                    .changes
                    .iter()
                    .map(|(o, t, k, v)| (o.to_string(), t.clone(), k.clone(), v.clone()))
                    .collect();
                if got != want || p["offset"] != c.offset {
                    return Err(format!("{gtid} carries {got:?}, committed {want:?}"));
                }
                gtid.clone()
            }
            Per::Op => id.clone(),
        };
        *seen.entry(key).or_default() += 1;
        changes_seen += envelopes.len();
        for e in &envelopes {
            sinkkit::apply(&mut replay, e);
        }
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    if !repeated.is_empty() {
        return Err(format!(
            "{} messages more than once, e.g. {:?}",
            repeated.len(),
            &repeated[..repeated.len().min(5)]
        ));
    }
    if let Some(e) = id_err {
        return Err(e);
    }
    let want_msgs = match cfg.per {
        Per::Txn => committed.len(),
        Per::Op => committed.iter().map(|c| c.changes.len()).sum(),
    };
    if msgs.len() - tree_ops != want_msgs {
        return Err(format!(
            "the stream holds {} messages of data, expected {want_msgs}",
            msgs.len() - tree_ops
        ));
    }
    let want_changes: usize = committed.iter().map(|c| c.changes.len()).sum();
    if changes_seen != want_changes {
        return Err(format!("{changes_seen} changes, expected {want_changes}"));
    }
    if &replay != model {
        return Err(format!(
            "replaying the stream gives {} rows, the workload left {}",
            replay.len(),
            model.len()
        ));
    }
    Ok(())
}

/// Runs the kill cycles against a fresh stream; returns the checker's verdict.
fn kill_cycles_verdict(test: &str, per: Per, without_msg_id: bool) -> Result<(), String> {
    let seed = sinkkit::seed(test);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let run = sinkkit::unique("");
    let cfg = sinkkit::nats_config(&run, per);
    let pipeline = format!("kill-{run}");
    let spec = sinkkit::child_spec(
        &node.addr,
        &node.secrets(),
        &pipeline,
        "nats",
        sinkkit::nats_json(&cfg),
        50,
    );
    let rt = rt();
    let js = rt.block_on(js(&cfg.url));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        1_500,
        Duration::from_millis(1),
        stop.clone(),
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37);
    let env: Vec<(&str, &str)> = if without_msg_id {
        vec![("TIDELINE_TEST_NATS_WITHOUT_MSG_ID", "1")]
    } else {
        vec![]
    };
    let stderr = dir.path().join("child.stderr");
    let cycles = sinkkit::cycles();
    for cycle in 0..cycles {
        let before = rt.block_on(stream_messages(&js, &cfg.stream));
        if cycle == 0 {
            // The first cycle dies at the worst moment, deterministically: its batch acked,
            // its checkpoint not stored. The next run publishes that batch again, and only
            // the GTID message ids keep it out of the stream a second time.
            let mut first = env.clone();
            first.push(("TIDELINE_TEST_NATS_DIE_BEFORE_POSITION", "1"));
            let mut child = sinkkit::spawn_child(CHILD_TEST, &spec, &stderr, &first);
            let deadline = Instant::now() + Duration::from_secs(60);
            while child.try_wait().expect("the child's status").is_none() {
                assert!(
                    Instant::now() < deadline,
                    "cycle 0: the connector did not die before its first position in 60 s"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(
                rt.block_on(stream_messages(&js, &cfg.stream)) > before,
                "cycle 0: the connector died without publishing"
            );
            continue;
        }
        let mut child = sinkkit::spawn_child(CHILD_TEST, &spec, &stderr, &env);
        // Kill once this child has observably published (the stream grew), a random moment
        // later: mostly mid-batch while it catches up on what was written while it was down.
        let deadline = Instant::now() + Duration::from_secs(60);
        while rt.block_on(stream_messages(&js, &cfg.stream)) == before {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the connector published nothing in 60 s; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            if writer.is_finished() && before > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..5)));
        sinkkit::kill9(&mut child, &stderr);
    }
    let committed = writer.join().expect("the workload");
    let model = sinkkit::model_of(&committed);
    let last = committed.last().map(|c| c.offset).unwrap_or(0);
    let mut child = sinkkit::spawn_child(CHILD_TEST, &spec, &stderr, &env);
    let deadline = Instant::now() + Duration::from_secs(120);
    while rt.block_on(checkpoint_offset(&js, &cfg.positions_bucket, &pipeline)) < last {
        assert!(
            Instant::now() < deadline,
            "the last connector did not catch up to offset {last}; stderr:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sinkkit::kill9(&mut child, &stderr);
    eprintln!(
        "{test}: {cycles} kill cycles, {} transactions",
        committed.len()
    );
    let msgs = rt.block_on(read_all(&js, &cfg.stream));
    let verdict = check_stream(&msgs, &committed, &model, &cfg, &pipeline);
    let _ = rt.block_on(js.delete_stream(&cfg.stream));
    verdict
}

#[test]
fn kill9_mid_batch_leaves_each_transaction_once_in_the_stream() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test = "kill9_mid_batch_leaves_each_transaction_once_in_the_stream";
    if let Err(e) = kill_cycles_verdict(test, Per::Txn, false) {
        panic!("{e}");
    }
}

#[test]
fn kill9_with_one_message_per_change_leaves_each_change_once() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test = "kill9_with_one_message_per_change_leaves_each_change_once";
    if let Err(e) = kill_cycles_verdict(test, Per::Op, false) {
        panic!("{e}");
    }
}

#[test]
fn canary_without_msg_ids_the_kill_cycles_leave_duplicates() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test = "canary_without_msg_ids_the_kill_cycles_leave_duplicates";
    let verdict = kill_cycles_verdict(test, Per::Txn, true);
    let e = verdict.expect_err("without Nats-Msg-Id the kills must leave duplicates");
    assert!(e.contains("more than once"), "{e}");
}

#[test]
fn an_unreachable_server_is_retried_with_a_clear_error() {
    let port = free_port();
    let rt = rt();
    let mut sink = NatsSink::new(
        NatsConfig::new(format!("nats://127.0.0.1:{port}")),
        "unreachable",
    )
    .expect("a valid config");
    let e = rt.block_on(sink.open()).expect_err("nothing listens there");
    assert!(
        matches!(&e, SinkError::Retry(m) if m.contains(&format!("127.0.0.1:{port}"))
            && m.contains("not reachable")),
        "{e}"
    );
    let e = NatsSink::new(NatsConfig::new("tls://x:1"), "p")
        .err()
        .expect("tls refused");
    assert!(matches!(e, SinkError::Fatal(_)), "{e}");
}

/// The `nats-server` binary: Debian puts it in /usr/sbin, which a user's PATH may lack.
fn nats_server_bin() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

/// A `nats-server` of this test's own, with JetStream, on `port`, storing in `dir`.
struct OwnServer {
    child: std::process::Child,
}

impl OwnServer {
    fn start(port: u16, dir: &Path) -> OwnServer {
        let child = std::process::Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnServer { child }
    }

    /// A clean stop (SIGTERM): the server flushes its streams.
    fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_restarted_server_is_an_outage_the_pipeline_rides_out() {
    let has_server = std::process::Command::new(nats_server_bin())
        .arg("--version")
        .output()
        .is_ok();
    if !has_server {
        let msg = "SKIPPED: no nats-server binary on PATH; install the nats-server package";
        assert!(std::env::var_os("CI").is_none(), "{msg} (CI is set)");
        eprintln!("{msg}");
        return;
    }
    let seed = sinkkit::seed("a_restarted_server_is_an_outage_the_pipeline_rides_out");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let nats_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let store = dir.path().join("nats");
    let mut server = OwnServer::start(nats_port, &store);
    let run = sinkkit::unique("");
    let mut cfg = sinkkit::nats_config(&run, Per::Txn);
    cfg.url = format!("nats://127.0.0.1:{nats_port}");
    cfg.ack_timeout_ms = 1_000;
    let pipeline = format!("restart-{run}");
    let rt = rt();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut pcfg = tideline_connectors::PipelineConfig::new(
        &pipeline,
        &node.addr,
        tideline_stream::ClientConfig::new(
            tideline_stream::tls::load_client_dir(&node.secrets()).unwrap(),
        ),
    );
    pcfg.retry_min = Duration::from_millis(50);
    pcfg.retry_max = Duration::from_millis(500);
    let sink = NatsSink::new(cfg.clone(), &pipeline).unwrap();
    let (status, task) = {
        let _g = rt.enter();
        tideline_connectors::pipeline::spawn(pcfg, Box::new(sink))
    };
    let js_url = cfg.url.clone();
    let wait_offset = |want: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let have = rt.block_on(async {
                let js = js(&js_url).await;
                checkpoint_offset(&js, &cfg.positions_bucket, &pipeline).await
            });
            if have >= want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: checkpoint at {have}, want {want}; status {}",
                status.get().to_json()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let first: Vec<Committed> = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        300,
        Duration::ZERO,
        stop.clone(),
    )
    .join()
    .unwrap();
    wait_offset(first.last().unwrap().offset, "before the restart");
    server.stop();
    // Written while the server is down.
    let second = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed + 1,
        300,
        Duration::ZERO,
        stop.clone(),
    )
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.get().outages_total == 0 {
        assert!(
            Instant::now() < deadline,
            "no outage reported: {}",
            status.get().to_json()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let during = status.get();
    assert!(
        during
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("NATS")),
        "the outage names NATS: {}",
        during.to_json()
    );
    let _server = OwnServer::start(nats_port, &store);
    wait_offset(second.last().unwrap().offset, "after the restart");
    let after = status.get();
    assert!(
        !task.is_finished(),
        "the pipeline stopped: {}",
        after.to_json()
    );
    assert!(after.outages_total >= 1, "{}", after.to_json());
    assert_eq!(after.state.as_str(), "running", "{}", after.to_json());
    task.abort();
    let mut committed = first;
    committed.extend(second);
    let msgs = rt.block_on(async {
        let js = js(&js_url).await;
        read_all(&js, &cfg.stream).await
    });
    if let Err(e) = check_stream(
        &msgs,
        &committed,
        &sinkkit::model_of(&committed),
        &cfg,
        &pipeline,
    ) {
        panic!("{e}");
    }
}

/// Regression: a batch with more messages than `max_in_flight` must not wait for ever for an
/// in-flight permit that only its own unawaited acks hold (the pipeline's default batch is
/// 10,000 changes, the default window 4,096).
#[test]
fn a_batch_larger_than_the_ack_window_is_written() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let run = sinkkit::unique("");
    let mut cfg = sinkkit::nats_config(&run, Per::Txn);
    cfg.max_in_flight = 8;
    let batch = one_put_batch(100);
    let rt = rt();
    let mut sink = NatsSink::new(cfg.clone(), &format!("window-{run}")).unwrap();
    rt.block_on(async {
        sink.open().await.expect("open");
        tokio::time::timeout(Duration::from_secs(30), sink.write(&batch))
            .await
            .expect("the write of 100 messages through a window of 8 never finished")
            .expect("the write succeeds");
        let js = js(&cfg.url).await;
        assert_eq!(stream_messages(&js, &cfg.stream).await, 100);
        let _ = js.delete_stream(&cfg.stream).await;
    });
}

/// `n` one-put transactions of tree `t` in one batch.
fn one_put_batch(n: u64) -> tideline_connectors::Batch {
    let uuid = uuid::Uuid::from_bytes([9; 16]);
    let items = (1..=n)
        .map(|n| {
            tideline_connectors::Item::Txn(tideline_wal::Transaction {
                offset: tideline_wal::Offset::new(n).unwrap(),
                gtid: tideline_wal::Gtid::new(uuid, n).unwrap(),
                timestamp_us: 0,
                ops: vec![tideline_wal::Op::Put {
                    tree: "t".into(),
                    key: format!("k{n}").into_bytes(),
                    value: b"v".to_vec(),
                    before: None,
                }],
            })
        })
        .collect();
    tideline_connectors::Batch {
        source: uuid,
        items,
        checkpoint: b"{}".to_vec(),
    }
}

/// A subject template outside the stream's subjects: the server has no stream to answer the
/// publish, and the sink holds for an operator with a message naming the subject and the
/// stream (not a retry loop, not a timeout), its checkpoint unmoved.
#[test]
fn a_subject_no_stream_captures_holds_with_a_clear_error() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let run = sinkkit::unique("");
    let mut cfg = sinkkit::nats_config(&run, Per::Txn);
    cfg.subject = format!("tlnowhere.{run}.{{tree}}");
    cfg.ack_timeout_ms = 30_000;
    let pipeline = format!("nowhere-{run}");
    let rt = rt();
    let mut sink = NatsSink::new(cfg.clone(), &pipeline).unwrap();
    rt.block_on(async {
        sink.open().await.expect("open");
        let err = sink
            .write(&one_put_batch(10))
            .await
            .expect_err("no stream captures the subject");
        match &err {
            SinkError::Hold(m) => {
                assert!(
                    m.contains("no JetStream stream captures subject")
                        && m.contains(&format!("tlnowhere.{run}.t"))
                        && m.contains(&cfg.stream),
                    "{m}"
                );
            }
            other => panic!("held for an operator, not {other:?}"),
        }
        let js = js(&cfg.url).await;
        let kv = js
            .get_key_value(&cfg.positions_bucket)
            .await
            .expect("the positions bucket the sink opened");
        assert!(
            kv.get(pipeline.as_str())
                .await
                .expect("read the bucket")
                .is_none(),
            "a checkpoint was stored although nothing was"
        );
        let _ = js.delete_stream(&cfg.stream).await;
    });
}

/// A stream that refuses the message for good (here its `max_msg_size` is below the
/// transaction's message) holds the pipeline for an operator, naming the JetStream error,
/// instead of retrying the same batch for ever as if NATS were down.
#[test]
fn a_message_the_stream_refuses_for_good_holds_with_the_streams_reason() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let run = sinkkit::unique("");
    let cfg = sinkkit::nats_config(&run, Per::Txn);
    let pipeline = format!("toobig-{run}");
    let rt = rt();
    rt.block_on(async {
        let js = js(&cfg.url).await;
        js.create_stream(async_nats::jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: cfg.subjects.clone(),
            max_message_size: 64,
            ..Default::default()
        })
        .await
        .expect("a stream with a 64-byte message limit");
        let mut sink = NatsSink::new(cfg.clone(), &pipeline).unwrap();
        sink.open().await.expect("open");
        let err = sink
            .write(&one_put_batch(10))
            .await
            .expect_err("the stream refuses the message");
        match &err {
            SinkError::Hold(m) => assert!(m.contains("10054"), "{m}"),
            other => panic!("held for an operator, not {other:?}"),
        }
        let kv = js
            .get_key_value(&cfg.positions_bucket)
            .await
            .expect("the positions bucket the sink opened");
        assert!(
            kv.get(pipeline.as_str())
                .await
                .expect("read the bucket")
                .is_none(),
            "a checkpoint was stored although nothing was"
        );
        let _ = js.delete_stream(&cfg.stream).await;
    });
}

/// The positions bucket moves a pipeline's checkpoint only from the one the sink last read
/// or wrote: a connector that opened before another one wrote (one killed whose last write
/// lands late, or a second connector of the pipeline) never moves it back, and a write that
/// finds its own checkpoint already stored (its answer lost) is not an error.
#[test]
fn a_stale_writer_never_moves_the_position_back() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let run = sinkkit::unique("");
    let cfg = sinkkit::nats_config(&run, Per::Txn);
    let pipeline = format!("stale-{run}");
    let rt = rt();
    rt.block_on(async {
        let mut live = NatsSink::new(cfg.clone(), &pipeline).unwrap();
        let mut stale = NatsSink::new(cfg.clone(), &pipeline).unwrap();
        assert_eq!(live.open().await.expect("open"), None);
        assert_eq!(stale.open().await.expect("open"), None);
        let batch = |seq: u64| {
            let mut b = sinkkit::one_change(seq, true);
            b.checkpoint = format!("cp{seq}").into_bytes();
            b
        };
        live.write(&batch(1)).await.expect("batch 1");
        // The same batch from the other writer: already stored, nothing to do.
        stale.write(&batch(1)).await.expect("batch 1 again");
        live.write(&batch(2)).await.expect("batch 2");
        let e = stale
            .write(&batch(1))
            .await
            .expect_err("a checkpoint older than the stored one");
        assert!(
            matches!(&e, SinkError::Fatal(m) if m.contains("another connector wrote")),
            "{e}"
        );
        let js = js(&cfg.url).await;
        let kv = js
            .get_key_value(&cfg.positions_bucket)
            .await
            .expect("the positions bucket");
        let stored = kv.get(pipeline.as_str()).await.expect("read the bucket");
        assert_eq!(
            stored.as_deref(),
            Some(&b"cp2"[..]),
            "the position moved back"
        );
        let _ = kv.purge(pipeline.as_str()).await;
        let _ = js.delete_stream(&cfg.stream).await;
    });
}

// ---- Several pipelines on one stream ----------------------------------------------------
//
// The default stream (`TIDELINE`) is shared by every pipeline of a deployment: only the
// checkpoint key is the pipeline's. Two pipelines on one stream must each find every change
// they pass in it exactly once, whatever the other one published: a message id shared by
// two pipelines' messages makes the stream drop the second as a "duplicate", acked as if
// stored, and its pipeline moves past changes that never reached the stream.

/// A change as a consumer of a subject sees it: `(gtid, op, tree, key, after)` (gtid ""
/// for a bootstrap's changes, after "" for a delete).
type Seen = (String, String, String, String, String);

/// The envelopes of one message's payload, with the GTID the message carries ("" none).
fn envelopes_of(p: &Value) -> (String, Vec<Value>) {
    match p["changes"].as_array() {
        Some(changes) => (
            p["gtid"].as_str().unwrap_or_default().to_string(),
            changes.clone(),
        ),
        None => (
            p["source"]["gtid"].as_str().unwrap_or_default().to_string(),
            vec![p.clone()],
        ),
    }
}

/// Every envelope on a subject starting with `prefix`, with its message's GTID.
fn envelopes_under(msgs: &[(String, String, Value)], prefix: &str) -> Vec<(String, Value)> {
    msgs.iter()
        .filter(|(_, subject, _)| subject.starts_with(prefix))
        .flat_map(|(_, _, p)| {
            let (gtid, envelopes) = envelopes_of(p);
            envelopes.into_iter().map(move |e| (gtid.clone(), e))
        })
        .collect()
}

/// The data changes (puts, deletes, bootstrap reads) on subjects under `prefix`, sorted.
fn changes_under(msgs: &[(String, String, Value)], prefix: &str) -> Vec<Seen> {
    let field = |e: &Value, f: &str| e[f].as_str().unwrap_or_default().to_string();
    let mut out: Vec<Seen> = envelopes_under(msgs, prefix)
        .into_iter()
        .filter(|(_, e)| sinkkit::is_data(e))
        .map(|(gtid, e)| {
            (
                gtid,
                field(&e, "op"),
                field(&e, "tree"),
                field(&e, "key"),
                field(&e, "after"),
            )
        })
        .collect();
    out.sort();
    out
}

/// `Err` naming what `got` lacks and what it holds too often or unasked, both sorted.
fn same_multiset(what: &str, want: &[Seen], got: &[Seen]) -> Result<(), String> {
    let count = |v: &[Seen]| {
        let mut m: BTreeMap<Seen, usize> = BTreeMap::new();
        for s in v {
            *m.entry(s.clone()).or_default() += 1;
        }
        m
    };
    let (w, g) = (count(want), count(got));
    let missing: Vec<_> = w
        .iter()
        .filter(|(s, n)| g.get(*s).copied().unwrap_or(0) < **n)
        .map(|(s, _)| s)
        .collect();
    let extra: Vec<_> = g
        .iter()
        .filter(|(s, n)| w.get(*s).copied().unwrap_or(0) < **n)
        .map(|(s, _)| s)
        .collect();
    if missing.is_empty() && extra.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{what}: the stream holds {} changes, {} expected; {} missing (e.g. {:?}), {} repeated \
         or unexpected (e.g. {:?})",
        got.len(),
        want.len(),
        missing.len(),
        &missing[..missing.len().min(3)],
        extra.len(),
        &extra[..extra.len().min(3)],
    ))
}

/// A pipeline of this process from `node` into `cfg`'s stream, passing only `trees` (all
/// when empty), started `from` where the sink holds no checkpoint.
fn spawn_pipeline(
    rt: &tokio::runtime::Runtime,
    node: &Node,
    name: &str,
    cfg: &NatsConfig,
    trees: &[&str],
    from: tideline_connectors::StartFrom,
) -> (
    tideline_connectors::SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), tideline_connectors::PipelineError>>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut pcfg = tideline_connectors::PipelineConfig::new(
        name,
        &node.addr,
        tideline_stream::ClientConfig::new(
            tideline_stream::tls::load_client_dir(&node.secrets()).unwrap(),
        ),
    );
    pcfg.from = from;
    pcfg.filter.trees = trees.iter().map(|t| t.to_string()).collect();
    pcfg.batch_changes = 50;
    pcfg.retry_min = Duration::from_millis(50);
    pcfg.retry_max = Duration::from_millis(500);
    let sink = NatsSink::new(cfg.clone(), name).expect("a valid NATS config");
    let _g = rt.enter();
    tideline_connectors::pipeline::spawn(pcfg, Box::new(sink))
}

/// Waits until pipeline `name`'s stored checkpoint satisfies `done`, then stops it.
fn run_until(
    rt: &tokio::runtime::Runtime,
    cfg: &NatsConfig,
    pipeline: (
        &str,
        tideline_connectors::SharedPipelineStatus,
        tokio::task::JoinHandle<Result<(), tideline_connectors::PipelineError>>,
    ),
    done: impl Fn(&PipelineCheckpoint) -> bool,
) {
    let (name, status, task) = pipeline;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored = rt.block_on(async {
            let js = js(&cfg.url).await;
            let kv = js.get_key_value(&cfg.positions_bucket).await.ok()?;
            let bytes = kv.get(name).await.ok()??;
            PipelineCheckpoint::decode(&bytes).ok()
        });
        if stored.as_ref().is_some_and(&done) {
            break;
        }
        assert!(
            !task.is_finished(),
            "pipeline {name} stopped: {}",
            status.get().to_json()
        );
        assert!(
            Instant::now() < deadline,
            "pipeline {name} did not get there in 120 s: {}",
            status.get().to_json()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    task.abort();
}

/// Two pipelines with different tree filters (one `users`, one `orders`) publish a workload
/// whose transactions often touch both trees into one stream; each pipeline's subjects must
/// hold every change of its tree exactly once. Run one after the other, so that the second
/// always publishes what the first already did.
fn two_filtered_pipelines_on_one_stream(test: &str, per: Per) -> Result<(), String> {
    let seed = sinkkit::seed(test);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let run = sinkkit::unique("");
    let committed = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        300,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .expect("the workload");
    let last = committed.last().map(|c| c.offset).unwrap_or(0);
    let rt = rt();
    let mut problems = Vec::new();
    let mut stream = String::new();
    for tree in ["users", "orders"] {
        let mut cfg = sinkkit::nats_config(&run, per);
        cfg.subject = format!("tltest.{run}.{tree}-pipeline.{{tree}}");
        stream.clone_from(&cfg.stream);
        let name = format!("{tree}-{run}");
        let (status, task) = spawn_pipeline(
            &rt,
            &node,
            &name,
            &cfg,
            &[tree],
            tideline_connectors::StartFrom::Tail(tideline_consumers::TailStart::Earliest),
        );
        run_until(&rt, &cfg, (&name, status, task), |c| c.offset() >= last);
        let msgs = rt.block_on(async { read_all(&js(&cfg.url).await, &cfg.stream).await });
        let want: Vec<Seen> = {
            let mut v: Vec<Seen> = committed
                .iter()
                .flat_map(|c| {
                    c.changes
                        .iter()
                        .filter(|(_, t, _, _)| t == tree)
                        .map(|(o, t, k, v)| {
                            (
                                c.gtid.clone(),
                                o.to_string(),
                                t.clone(),
                                k.clone(),
                                v.clone(),
                            )
                        })
                })
                .collect();
            v.sort();
            v
        };
        let got = changes_under(&msgs, &format!("tltest.{run}.{tree}-pipeline."));
        if let Err(e) = same_multiset(&format!("pipeline {name} (trees = [{tree}])"), &want, &got) {
            problems.push(e);
        }
    }
    rt.block_on(async {
        let _ = js(&sinkkit::nats_config(&run, per).url)
            .await
            .delete_stream(&stream)
            .await;
    });
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

#[test]
fn two_pipelines_filtering_different_trees_into_one_stream_each_publish_every_change_once() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test =
        "two_pipelines_filtering_different_trees_into_one_stream_each_publish_every_change_once";
    if let Err(e) = two_filtered_pipelines_on_one_stream(test, Per::Txn) {
        panic!("{e}");
    }
}

#[test]
fn two_pipelines_filtering_different_trees_one_message_per_change_each_publish_every_change_once() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test = "two_pipelines_filtering_different_trees_one_message_per_change_each_publish_every_change_once";
    if let Err(e) = two_filtered_pipelines_on_one_stream(test, Per::Op) {
        panic!("{e}");
    }
}

/// Two pipelines bootstrap the same idle source (two trees, each with an index) into one
/// stream, one after the other, each on subjects of its own. Each pipeline's subjects must
/// hold every row of the source exactly once, and the tree and index definitions of every
/// tree (a consumer that rebuilds the source needs them; they are no-ops when repeated).
#[test]
fn two_pipelines_bootstrapping_into_one_stream_each_publish_every_row_and_every_trees_index() {
    if !sinkkit::service_up("NATS", NATS_PORT) {
        return;
    }
    let test =
        "two_pipelines_bootstrapping_into_one_stream_each_publish_every_row_and_every_trees_index";
    let seed = sinkkit::seed(test);
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let committed = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        300,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .expect("the workload");
    let trees = ["users", "orders"];
    for tree in trees {
        let out = node.run(&[
            "index", "create", "--tree", tree, "--name", "by_i", "--path", "/i", "--wait",
        ]);
        assert!(
            out.status.success(),
            "index create on {tree}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The source is idle from here on: every step of the copies is at the same offset.
    let rows: Vec<Seen> = {
        let mut v: Vec<Seen> = sinkkit::model_of(&committed)
            .into_iter()
            .map(|((tree, key), value)| (String::new(), "read".into(), tree, key, value))
            .collect();
        v.sort();
        v
    };
    let run = sinkkit::unique("");
    let rt = rt();
    let mut problems = Vec::new();
    let mut stream = String::new();
    for p in ["a", "b"] {
        let mut cfg = sinkkit::nats_config(&run, Per::Txn);
        cfg.subject = format!("tltest.{run}.{p}.{{tree}}");
        stream.clone_from(&cfg.stream);
        let name = format!("boot-{p}-{run}");
        let (status, task) = spawn_pipeline(
            &rt,
            &node,
            &name,
            &cfg,
            &[],
            tideline_connectors::StartFrom::Bootstrap,
        );
        run_until(&rt, &cfg, (&name, status, task), |c| {
            matches!(c, PipelineCheckpoint::Tail(_))
        });
        let msgs = rt.block_on(async { read_all(&js(&cfg.url).await, &cfg.stream).await });
        let prefix = format!("tltest.{run}.{p}.");
        if let Err(e) = same_multiset(
            &format!("pipeline {name}'s rows"),
            &rows,
            &changes_under(&msgs, &prefix),
        ) {
            problems.push(e);
        }
        let mut declared = BTreeSet::new();
        for (_, e) in envelopes_under(&msgs, &prefix) {
            let (op, tree) = (e["op"].as_str().unwrap_or_default(), &e["tree"]);
            let tree = tree.as_str().unwrap_or_default().to_string();
            match op {
                "create_tree" => declared.insert(format!("tree {tree}")),
                "create_index" => declared.insert(format!(
                    "index {tree}/{}",
                    e["name"].as_str().unwrap_or_default()
                )),
                _ => false,
            };
        }
        for tree in trees {
            for want in [format!("tree {tree}"), format!("index {tree}/by_i")] {
                if !declared.contains(&want) {
                    problems.push(format!(
                        "pipeline {name}: no create_{} of {tree} in the stream (it has {declared:?})",
                        want.split(' ').next().unwrap_or_default()
                    ));
                }
            }
        }
    }
    rt.block_on(async {
        let _ = js(&sinkkit::nats_config(&run, Per::Txn).url)
            .await
            .delete_stream(&stream)
            .await;
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
