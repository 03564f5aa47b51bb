//! The webhook sink against a real HTTP receiver (axum, in this test process, on 127.0.0.1:0).
//!
//! Scenarios: (1) the receiver answers 503 to the first POSTs, then 200: the pipeline retries,
//! reports the outage and loses nothing; every request carries the pipeline's name and a GTID
//! range header that matches its envelopes. (2) The receiver answers 400: the pipeline holds
//! with the status and the body's first line in its error, and the position file does not
//! move. (3) A connector child process is killed with SIGKILL mid-batch again and again
//! (20 cycles; `TIDELINE_SINK_KILL_CYCLES` for more) while a node takes a random workload:
//! the receiver, de-duplicating by the GTID range header as docs/OPERATIONS.md tells
//! receivers to, ends with every change exactly once and the workload's state. (4) A
//! bootstrap copy during which the source merges into a range already copied: the receiver
//! applies that request but its answer is lost, the sink POSTs it again, and the same rule
//! must recognise the repeat (the copy-time changes carry their GTIDs). (5) Two pipelines
//! (different trees) POST into one receiver and one lags: the documented rule keeps a
//! high-water mark per pipeline and origin, and every change of both is kept once.
//!
//! Guards against: a position written before the 2xx (loss), retries that drop or reorder a
//! batch, a 4xx that moves the position, a GTID header that does not say what the body holds,
//! copy-time changes without a GTID (a merge re-POSTed during a copy counted twice), a rule
//! that shares its high-water marks between pipelines (the lagging one's changes skipped).
//! Canaries: a receiver that does not de-duplicate must see repeats after the same kills; one
//! keyed only by origin must lose the lagging pipeline's changes.

mod common;
mod sinkkit;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tideline_connectors::PipelineCheckpoint;
use tideline_connectors::sink::webhook::{WebhookConfig, WebhookSink};
use tideline_wal::GtidSet;

use common::Node;
use sinkkit::Committed;

const CHILD_TEST: &str = "webhook_connector_child";

/// The connector child of the kill test; does nothing unless it re-executes it.
#[test]
#[ignore = "the connector child process of the kill test; it does nothing unless it re-executes it"]
fn webhook_connector_child() {
    sinkkit::child_main();
}

/// One POST as the receiver saw it.
#[derive(Debug, Clone)]
struct Post {
    pipeline: String,
    range: Option<String>,
    /// `Tideline-Bootstrap`: the copy step a request belongs to.
    bootstrap: Option<String>,
    envelopes: Vec<Value>,
}

/// What the receiver answers: `fail_first` requests with `fail_status`, then 200.
struct Receiver {
    posts: Mutex<Vec<Post>>,
    requests: AtomicUsize,
    fail_first: usize,
    fail_status: StatusCode,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let n = r.requests.fetch_add(1, Ordering::SeqCst);
    if n < r.fail_first {
        return (
            r.fail_status,
            "receiver says no: bad field `x`\nsecond line".into(),
        );
    }
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let envelopes: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array body");
    r.posts.lock().unwrap().push(Post {
        pipeline: h("tideline-pipeline").unwrap_or_default(),
        range: h("tideline-gtid-range"),
        bootstrap: h("tideline-bootstrap"),
        envelopes,
    });
    (StatusCode::OK, "ok".into())
}

/// The receiver of the copy test. It applies (records) every request; it holds its answer to
/// the first request with copied `cnt` rows until `release`, so that the test writes to that
/// range while the copy stands right after it; and it answers the first request with a merge
/// 503 after applying it: the answer is lost, and the sink POSTs the request again.
#[derive(Default)]
struct CopyReceiver {
    posts: Mutex<Vec<Post>>,
    chunk_held: AtomicBool,
    release: AtomicBool,
    merge_answer_lost: AtomicBool,
}

async fn receive_copy(
    axum::extract::State(r): axum::extract::State<Arc<CopyReceiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let envelopes: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array body");
    let has = |op: &str| {
        envelopes
            .iter()
            .any(|e| e["op"] == op && e["tree"] == "cnt")
    };
    let (rows, merge) = (has("read"), has("merge"));
    r.posts.lock().unwrap().push(Post {
        pipeline: h("tideline-pipeline").unwrap_or_default(),
        range: h("tideline-gtid-range"),
        bootstrap: h("tideline-bootstrap"),
        envelopes,
    });
    if rows && !r.chunk_held.swap(true, Ordering::SeqCst) {
        while !r.release.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    if merge && !r.merge_answer_lost.swap(true, Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    StatusCode::OK
}

/// Starts a receiver on a runtime thread of its own; returns its URL.
fn start_receiver(rt: &tokio::runtime::Runtime, r: Arc<Receiver>) -> String {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the receiver");
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r);
    rt.spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The receiver's de-duplication as docs/OPERATIONS.md describes it: per `Tideline-Pipeline`
/// and per origin (the uuid part of each GTID, never `source.server_uuid`), the highest GTID
/// sequence applied; envelopes at or below it are repeats. A request without a GTID range
/// holds only a copy's rows (`op: read` upserts, harmless twice): applied as it is. Returns
/// the envelopes kept.
fn dedup(posts: &[Post]) -> Vec<Value> {
    dedup_keyed(posts, |p, uuid| format!("{}/{uuid}", p.pipeline))
}

/// [`dedup`] with the high-water marks kept under `key(request, origin uuid)`.
fn dedup_keyed(posts: &[Post], key: impl Fn(&Post, &str) -> String) -> Vec<Value> {
    let mut applied: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = Vec::new();
    for p in posts {
        let Some(range) = p.range.as_deref() else {
            kept.extend(p.envelopes.iter().cloned());
            continue;
        };
        let range: GtidSet = range.parse().expect("the range header is a GTID set");
        // Whole batch already applied: skip it without looking inside.
        if range.uuids().all(|u| {
            applied
                .get(&key(p, &u.to_string()))
                .is_some_and(|a| range.last_seq(u).is_some_and(|l| l <= *a))
        }) {
            continue;
        }
        for e in &p.envelopes {
            let gtid = e["source"]["gtid"].as_str().expect("a live change's GTID");
            let (uuid, seq) = gtid.rsplit_once(':').expect("UUID:N");
            let seq: u64 = seq.parse().expect("a sequence number");
            if applied.get(&key(p, uuid)).is_some_and(|a| seq <= *a) {
                continue;
            }
            kept.push(e.clone());
        }
        for u in range.uuids() {
            let last = range.last_seq(u).unwrap_or(0);
            let a = applied.entry(key(p, &u.to_string())).or_default();
            *a = (*a).max(last);
        }
    }
    kept
}

/// Checks the kept envelopes are each committed change once, in order, and replay to the
/// workload's state.
fn check(kept: &[Value], committed: &[Committed]) -> Result<(), String> {
    let want: Vec<(String, String, String, String)> = committed
        .iter()
        .flat_map(|c| {
            c.changes
                .iter()
                .map(|(o, t, k, _)| (c.gtid.clone(), o.to_string(), t.clone(), k.clone()))
        })
        .collect();
    let kept: Vec<&Value> = kept.iter().filter(|e| sinkkit::is_data(e)).collect();
    let got: Vec<(String, String, String, String)> = kept
        .iter()
        .map(|e| {
            (
                e["source"]["gtid"].as_str().unwrap_or_default().to_string(),
                e["op"].as_str().unwrap_or_default().to_string(),
                e["tree"].as_str().unwrap_or_default().to_string(),
                e["key"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    if got.len() != want.len() {
        return Err(format!(
            "the receiver kept {} changes, the workload made {}",
            got.len(),
            want.len()
        ));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(format!("change {i}: got {:?}, want {:?}", got[i], want[i]));
    }
    let mut model = sinkkit::Model::new();
    for e in &kept {
        sinkkit::apply(&mut model, e);
    }
    if model != sinkkit::model_of(committed) {
        return Err("the receiver's state differs from the workload's".into());
    }
    Ok(())
}

fn pipeline_cfg(node: &Node, name: &str) -> tideline_connectors::PipelineConfig {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = tideline_connectors::PipelineConfig::new(
        name,
        &node.addr,
        tideline_stream::ClientConfig::new(
            tideline_stream::tls::load_client_dir(&node.secrets()).unwrap(),
        ),
    );
    cfg.retry_min = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    cfg.hold_pause = Duration::from_secs(3600);
    cfg.batch_changes = 100;
    cfg
}

fn stored_offset(path: &std::path::Path) -> u64 {
    let Ok(bytes) = std::fs::read(path) else {
        return 0;
    };
    let v: Value = serde_json::from_slice(&bytes).expect("the position file is JSON");
    use base64::Engine as _;
    let cp = base64::engine::general_purpose::STANDARD
        .decode(v["checkpoint_b64"].as_str().expect("checkpoint_b64"))
        .expect("base64");
    PipelineCheckpoint::decode(&cp)
        .expect("a checkpoint")
        .offset()
}

#[test]
fn server_errors_are_retried_without_loss_and_each_post_names_its_gtids() {
    let seed = sinkkit::seed("server_errors_are_retried_without_loss");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let rt = rt();
    let receiver = Arc::new(Receiver {
        posts: Mutex::new(vec![]),
        requests: AtomicUsize::new(0),
        fail_first: 3,
        fail_status: StatusCode::SERVICE_UNAVAILABLE,
    });
    let url = start_receiver(&rt, receiver.clone());
    let committed = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        400,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .unwrap();
    let position = dir.path().join("pos/webhook.json");
    let sink = WebhookSink::new(WebhookConfig::new(&url, &position), "hooked").unwrap();
    let (status, task) = {
        let _g = rt.enter();
        tideline_connectors::pipeline::spawn(pipeline_cfg(&node, "hooked"), Box::new(sink))
    };
    let last = committed.last().unwrap().offset;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_offset(&position) < last {
        assert!(
            Instant::now() < deadline,
            "not caught up: {}",
            status.get().to_json()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = status.get();
    task.abort();
    assert!(
        s.outages_total >= 1,
        "the 503s are an outage: {}",
        s.to_json()
    );
    assert!(s.errors_total >= 3, "{}", s.to_json());
    let posts = receiver.posts.lock().unwrap().clone();
    for p in &posts {
        assert_eq!(p.pipeline, "hooked");
        let mut set = GtidSet::new();
        for e in &p.envelopes {
            set.insert(e["source"]["gtid"].as_str().unwrap().parse().unwrap());
        }
        assert_eq!(
            p.range.as_deref(),
            Some(set.to_string().as_str()),
            "the header names the batch's GTIDs"
        );
    }
    // Nothing was lost and, with no crash, nothing repeated even before de-duplication.
    let all: Vec<Value> = posts.iter().flat_map(|p| p.envelopes.clone()).collect();
    if let Err(e) = check(&all, &committed) {
        panic!("{e}");
    }
}

#[test]
fn a_client_error_holds_the_pipeline_and_keeps_the_position() {
    let seed = sinkkit::seed("a_client_error_holds_the_pipeline");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let rt = rt();
    let receiver = Arc::new(Receiver {
        posts: Mutex::new(vec![]),
        requests: AtomicUsize::new(0),
        fail_first: usize::MAX,
        fail_status: StatusCode::BAD_REQUEST,
    });
    let url = start_receiver(&rt, receiver.clone());
    sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        20,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .unwrap();
    let position = dir.path().join("webhook.json");
    let sink = WebhookSink::new(WebhookConfig::new(&url, &position), "held").unwrap();
    let (status, task) = {
        let _g = rt.enter();
        tideline_connectors::pipeline::spawn(pipeline_cfg(&node, "held"), Box::new(sink))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.get().state.as_str() != "held" {
        assert!(
            Instant::now() < deadline,
            "not held: {}",
            status.get().to_json()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = status.get();
    task.abort();
    let err = s.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("400") && err.contains("receiver says no: bad field `x`"),
        "the error names the status and the body's first line: {err}"
    );
    assert!(!err.contains("second line"), "{err}");
    assert_eq!(
        receiver.requests.load(Ordering::SeqCst),
        1,
        "held, not retried"
    );
    assert!(!position.exists(), "the position moved on a 400");
}

#[test]
fn kill9_mid_batch_then_dedup_by_header_gives_each_change_once() {
    let seed = sinkkit::seed("kill9_mid_batch_then_dedup_by_header");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let rt = rt();
    let receiver = Arc::new(Receiver {
        posts: Mutex::new(vec![]),
        requests: AtomicUsize::new(0),
        fail_first: 0,
        fail_status: StatusCode::OK,
    });
    let url = start_receiver(&rt, receiver.clone());
    let position = dir.path().join("webhook.json");
    let mut sink_cfg = serde_json::json!({ "url": url, "position_file": position });
    sink_cfg["timeout_ms"] = 5_000.into();
    let spec = sinkkit::child_spec(
        &node.addr,
        &node.secrets(),
        "killed",
        "webhook",
        sink_cfg,
        20,
    );
    let writer = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        1_500,
        Duration::from_millis(1),
        Arc::new(AtomicBool::new(false)),
    );
    let mut rng = StdRng::seed_from_u64(seed ^ 0x51);
    let stderr = dir.path().join("child.stderr");
    let cycles = sinkkit::cycles();
    for cycle in 0..cycles {
        let before = receiver.requests.load(Ordering::SeqCst);
        let mut child = sinkkit::spawn_child(CHILD_TEST, &spec, &stderr, &[]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while receiver.requests.load(Ordering::SeqCst) == before {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: nothing POSTed in 60 s; stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
            if writer.is_finished() && before > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
        sinkkit::kill9(&mut child, &stderr);
    }
    let committed = writer.join().unwrap();
    let last = committed.last().unwrap().offset;
    let mut child = sinkkit::spawn_child(CHILD_TEST, &spec, &stderr, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while stored_offset(&position) < last {
        assert!(
            Instant::now() < deadline,
            "the last connector did not catch up; stderr:\n{}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sinkkit::kill9(&mut child, &stderr);
    let posts = receiver.posts.lock().unwrap().clone();
    let all: Vec<Value> = posts.iter().flat_map(|p| p.envelopes.clone()).collect();
    eprintln!(
        "{cycles} kill cycles, {} transactions, {} POSTs, {} changes received before de-dup",
        committed.len(),
        posts.len(),
        all.len()
    );
    if let Err(e) = check(&dedup(&posts), &committed) {
        panic!("after de-duplication by header: {e}");
    }
    // Canary: the kills did land between a 2xx and its position, so a receiver that does not
    // de-duplicate sees repeats.
    let e = check(&all, &committed).expect_err("the kills must have caused re-sent batches");
    assert!(e.contains("kept"), "{e}");
}

/// The receiver of the two-pipeline test: records every request, and answers 503 to those
/// of pipeline `behind` until `release`, so that pipeline lags the other.
struct SharedReceiver {
    posts: Mutex<Vec<Post>>,
    behind: &'static str,
    release: AtomicBool,
}

async fn receive_shared(
    axum::extract::State(r): axum::extract::State<Arc<SharedReceiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let pipeline = h("tideline-pipeline").unwrap_or_default();
    if pipeline == r.behind && !r.release.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let envelopes: Vec<Value> = serde_json::from_slice(&body).expect("a JSON array body");
    r.posts.lock().unwrap().push(Post {
        pipeline,
        range: h("tideline-gtid-range"),
        bootstrap: h("tideline-bootstrap"),
        envelopes,
    });
    StatusCode::OK
}

/// Scenario (5). Two pipelines of one node (trees `users` and `orders`; a third of the
/// transactions touch both, so both pipelines carry their GTIDs) POST into one receiver, and
/// `orders` lags: its first requests get 503 until `users` has caught up. A receiver
/// following the documented rule (per `Tideline-Pipeline` and per origin uuid of each
/// GTID) must keep every change of both once. Guards against a rule with one high-water mark
/// per origin for all pipelines, which skips the lagging pipeline's changes as repeats.
#[test]
fn two_pipelines_into_one_receiver_keep_every_change_under_the_documented_rule() {
    let seed = sinkkit::seed("two_pipelines_into_one_receiver");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    let rt = rt();
    let receiver = Arc::new(SharedReceiver {
        posts: Mutex::new(vec![]),
        behind: "orders",
        release: AtomicBool::new(false),
    });
    let url = {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive_shared))
            .with_state(receiver.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    };
    let committed = sinkkit::client_workload(
        &node.addr,
        &node.secrets(),
        seed,
        300,
        Duration::ZERO,
        Arc::new(AtomicBool::new(false)),
    )
    .join()
    .unwrap();
    let last = committed.last().unwrap().offset;
    let mut tasks = Vec::new();
    let mut positions = BTreeMap::new();
    for tree in ["users", "orders"] {
        let position = dir.path().join(format!("{tree}.position"));
        let sink = WebhookSink::new(WebhookConfig::new(&url, &position), tree).unwrap();
        let mut cfg = pipeline_cfg(&node, tree);
        cfg.filter.trees = vec![tree.to_string()];
        let (status, task) = {
            let _g = rt.enter();
            tideline_connectors::pipeline::spawn(cfg, Box::new(sink))
        };
        tasks.push(task);
        positions.insert(tree, (position, status));
    }
    let wait = |tree: &str| {
        let (position, status) = &positions[tree];
        let deadline = Instant::now() + Duration::from_secs(60);
        while stored_offset(position) < last {
            assert!(
                Instant::now() < deadline,
                "pipeline {tree} did not catch up: {}",
                status.get().to_json()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait("users");
    receiver.release.store(true, Ordering::SeqCst);
    wait("orders");
    for t in tasks {
        t.abort();
    }
    let posts = receiver.posts.lock().unwrap().clone();
    assert!(
        posts.iter().any(|p| p.pipeline == "orders") && posts.iter().any(|p| p.pipeline == "users"),
        "both pipelines POSTed"
    );
    let of_tree = |kept: &[Value], tree: &str| {
        kept.iter()
            .filter(|e| sinkkit::is_data(e) && e["tree"] == tree)
            .count()
    };
    let kept = dedup(&posts);
    for tree in ["users", "orders"] {
        let want: Vec<(String, String, String)> = committed
            .iter()
            .flat_map(|c| {
                c.changes
                    .iter()
                    .filter(|(_, t, _, _)| t == tree)
                    .map(|(o, _, k, _)| (c.gtid.clone(), o.to_string(), k.clone()))
            })
            .collect();
        let got: Vec<(String, String, String)> = kept
            .iter()
            .filter(|e| sinkkit::is_data(e) && e["tree"] == tree)
            .map(|e| {
                (
                    e["source"]["gtid"].as_str().unwrap_or_default().to_string(),
                    e["op"].as_str().unwrap_or_default().to_string(),
                    e["key"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        assert!(
            got == want,
            "pipeline {tree}: the receiver kept {} of its {} changes under the documented \
             de-duplication rule",
            got.len(),
            want.len()
        );
    }
    // Canary: one high-water mark per origin for both pipelines skips the lagging one's
    // changes as repeats.
    let shared = dedup_keyed(&posts, |_, uuid| uuid.to_string());
    assert!(
        of_tree(&shared, "orders") < of_tree(&kept, "orders"),
        "the canary: a rule shared by the pipelines must lose the lagging one's changes"
    );
}

/// Scenario (4). The source holds rows in `cnt` (an `add` tree) and `kv`; a pipeline copies
/// it into the webhook. While the copy stands right after `cnt` (the receiver holds its answer
/// to that chunk), one transaction merges into a copied `cnt` key and puts a `kv` key not yet
/// copied: the merge is a copy-time change, the put comes with `kv`'s chunk. The receiver
/// applies the merge's request but its answer is lost, so the sink POSTs it again; after
/// the copy, one more merge is live. The receiver following the documented rule must end
/// with the source's rows: the repeated merge recognised by its GTID range, not counted
/// twice.
#[test]
fn a_copy_time_merge_posted_again_is_recognised_by_the_documented_rule() {
    let dir = tempfile::tempdir().unwrap();
    let source = sinkkit::SourceNode::start(&dir.path().join("node"));
    for i in 0..10 {
        source
            .engine
            .put("cnt", format!("c{i}").as_bytes(), b"100")
            .expect("put");
        source
            .engine
            .put("kv", format!("k{i}").as_bytes(), br#"{"n":0}"#)
            .expect("put");
    }
    let rt = rt();
    let receiver = Arc::new(CopyReceiver::default());
    let url = {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive_copy))
            .with_state(receiver.clone());
        rt.spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    };
    let position = dir.path().join("webhook.json");
    let mut hook = WebhookConfig::new(&url, &position);
    hook.timeout_ms = 60_000;
    let sink = WebhookSink::new(hook, "copied").unwrap();
    let mut cfg = tideline_connectors::PipelineConfig::new(
        "copied",
        &source.addr,
        tideline_stream::ClientConfig::new(
            tideline_stream::tls::load_client_dir(&source.secrets).unwrap(),
        ),
    );
    cfg.retry_min = Duration::from_millis(20);
    cfg.retry_max = Duration::from_millis(200);
    cfg.hold_pause = Duration::from_secs(3600);
    cfg.from = tideline_connectors::StartFrom::Bootstrap;
    let (status, task) = {
        let _g = rt.enter();
        tideline_connectors::pipeline::spawn(cfg, Box::new(sink))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !receiver.chunk_held.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "no copy of `cnt` POSTed: {}",
            status.get().to_json()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut tx = source.engine.begin();
    tx.merge("cnt", b"c3", b"5").expect("merge");
    tx.put("kv", b"k7", br#"{"n":7}"#).expect("put");
    tx.commit().expect("commit");
    receiver.release.store(true, Ordering::SeqCst);
    let wait_tail = |at: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let tail = std::fs::read(&position).ok().and_then(|b| {
                let v: Value = serde_json::from_slice(&b).ok()?;
                use base64::Engine as _;
                let cp = base64::engine::general_purpose::STANDARD
                    .decode(v["checkpoint_b64"].as_str()?)
                    .ok()?;
                match PipelineCheckpoint::decode(&cp).ok()? {
                    PipelineCheckpoint::Tail(p) => Some(p.offset),
                    PipelineCheckpoint::Bootstrap(_) => None,
                }
            });
            if tail.is_some_and(|o| o >= at) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline does not follow the log at offset {at}: {}",
                status.get().to_json()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_tail(source.last_offset());
    let mut tx = source.engine.begin();
    tx.merge("cnt", b"c3", b"1").expect("merge");
    tx.commit().expect("commit");
    wait_tail(source.last_offset());
    task.abort();

    let posts = receiver.posts.lock().unwrap().clone();
    let merges: Vec<&Post> = posts
        .iter()
        .filter(|p| p.envelopes.iter().any(|e| e["op"] == "merge"))
        .collect();
    assert!(
        receiver.merge_answer_lost.load(Ordering::SeqCst) && merges.len() == 3,
        "the copy-time merge POSTed twice (its first answer lost), the live one once: {merges:#?}"
    );
    // The documented rule, then the merges resolved as the tree's operator does.
    let add = tideline_engine::MergeOperator::from_name("add").expect("the add operator");
    let mut held: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
    for e in dedup(&posts).iter().filter(|e| sinkkit::is_data(e)) {
        let tree = e["tree"].as_str().expect("a tree").to_string();
        let key = e["key"].as_str().expect("a UTF-8 key").as_bytes().to_vec();
        let rows = held.entry(tree).or_default();
        match e["op"].as_str() {
            Some("put" | "read") => {
                rows.insert(key, e["after"].as_str().expect("a value").into());
            }
            Some("delete") => {
                rows.remove(&key);
            }
            _ => {
                let operand = e["operand"].as_str().expect("an operand").as_bytes();
                let after = add.resolve(rows.get(&key).map(Vec::as_slice), operand);
                rows.insert(key, after);
            }
        }
    }
    let want = source.rows_of(&["cnt", "kv"]);
    assert_eq!(
        held.get("cnt").and_then(|r| r.get(&b"c3"[..])),
        Some(&b"106".to_vec()),
        "the receiver's cnt/c3 after 100 + 5 (during the copy, POSTed twice) + 1; posts: \
         {merges:#?}"
    );
    assert_eq!(held, want, "the receiver holds the source's rows");
    // What the rule relies on: the copy-time merge names its record, as a live change does,
    // and its request names the record's GTID; the request still says it is a copy step.
    let copy_time = merges[0];
    let e = copy_time
        .envelopes
        .iter()
        .find(|e| e["op"] == "merge")
        .unwrap();
    let gtid = e["source"]["gtid"]
        .as_str()
        .expect("a copy-time change's GTID");
    assert!(e["source"]["offset"].as_u64().is_some(), "{e}");
    assert_eq!(copy_time.range.as_deref(), Some(gtid), "{copy_time:#?}");
    assert!(copy_time.bootstrap.is_some(), "{copy_time:#?}");
    assert_eq!(copy_time.pipeline, "copied");
}
