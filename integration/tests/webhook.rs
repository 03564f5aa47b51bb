//! The webhook sink against a real HTTP receiver (axum, in this test process, on 127.0.0.1:0).
//!
//! Scenarios: (1) the receiver answers 503 to the first POSTs, then 200: the pipeline retries,
//! reports the outage and loses nothing; every request carries the pipeline's name and a GTID
//! range header that matches its envelopes. (2) The receiver answers 400: the pipeline holds
//! with the status and the body's first line in its error, and the position file does not
//! move. (3) A connector child process is killed with SIGKILL mid-batch again and again
//! (20 cycles; `TIDELINE_SINK_KILL_CYCLES` for more) while a node takes a random workload:
//! the receiver, de-duplicating by the GTID range header as docs/OPERATIONS.md tells
//! receivers to, ends with every change exactly once and the workload's state.
//!
//! Guards against: a position written before the 2xx (loss), retries that drop or reorder a
//! batch, a 4xx that moves the position, a GTID header that does not say what the body holds.
//! Canary: a receiver that does not de-duplicate must see repeats after the same kills.

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
        envelopes,
    });
    (StatusCode::OK, "ok".into())
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

/// The receiver's de-duplication as docs/OPERATIONS.md describes it: per origin, the highest
/// GTID sequence applied; envelopes at or below it are repeats. Returns the envelopes kept.
fn dedup(posts: &[Post]) -> Vec<Value> {
    let mut applied: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = Vec::new();
    for p in posts {
        let range: GtidSet = p
            .range
            .as_deref()
            .expect("a live batch has a GTID range")
            .parse()
            .expect("the range header is a GTID set");
        // Whole batch already applied: skip it without looking inside.
        if range.uuids().all(|u| {
            applied
                .get(&u.to_string())
                .is_some_and(|a| range.last_seq(u).is_some_and(|l| l <= *a))
        }) {
            continue;
        }
        for e in &p.envelopes {
            let gtid = e["source"]["gtid"].as_str().expect("a live change's GTID");
            let (uuid, seq) = gtid.rsplit_once(':').expect("UUID:N");
            let seq: u64 = seq.parse().expect("a sequence number");
            if applied.get(uuid).is_some_and(|a| seq <= *a) {
                continue;
            }
            kept.push(e.clone());
        }
        for u in range.uuids() {
            let last = range.last_seq(u).unwrap_or(0);
            let a = applied.entry(u.to_string()).or_default();
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
