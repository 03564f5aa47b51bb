//! Helpers shared by the sink tests (`nats.rs`, `webhook.rs`): a seeded random workload
//! committed to a node with its model, and a connector child process (the test binary
//! re-executed) that runs one pipeline into a sink until it is killed.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tideline_connectors::sink::nats::{NatsConfig, NatsSink, Per};
use tideline_connectors::sink::webhook::{WebhookConfig, WebhookSink};
use tideline_connectors::{PipelineConfig, Sink, StartFrom};
use tideline_consumers::TailStart;
use tideline_stream::WriteOp;

/// The env var carrying the child's spec (JSON); set only in the child.
pub const CHILD_ENV: &str = "TIDELINE_TEST_SINK_CHILD";

/// Whether a service answers on `port`; when it does not, panics under `CI` and otherwise
/// prints a loud SKIPPED line and returns false.
pub fn service_up(name: &str, port: u16) -> bool {
    if std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().expect("an address"),
        Duration::from_secs(2),
    )
    .is_ok()
    {
        return true;
    }
    let msg = format!(
        "SKIPPED: {name} not answering on 127.0.0.1:{port}; start it with scripts/services"
    );
    assert!(std::env::var_os("CI").is_none(), "{msg} (CI is set)");
    eprintln!("{msg}");
    false
}

/// A seed from `TIDELINE_TEST_SEED` or the clock, printed so that a failure replays.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {seed} (replay with TIDELINE_TEST_SEED={seed})");
    seed
}

/// A transaction the workload committed.
#[derive(Debug, Clone)]
pub struct Committed {
    pub gtid: String,
    pub offset: u64,
    /// `(op, tree, key, value)` of each change, in order (value "" for a delete).
    pub changes: Vec<(&'static str, String, String, String)>,
}

/// The state `committed` leaves, applied in order.
pub fn model_of(committed: &[Committed]) -> Model {
    let mut m = Model::new();
    for c in committed {
        for (op, tree, key, value) in &c.changes {
            if *op == "delete" {
                m.remove(&(tree.clone(), key.clone()));
            } else {
                m.insert((tree.clone(), key.clone()), value.clone());
            }
        }
    }
    m
}

/// The state the workload left: `(tree, key) -> value`.
pub type Model = BTreeMap<(String, String), String>;

/// Commits `txns` random transactions (1-3 puts/deletes over 200 keys in two trees, a third
/// of them spanning both) to the node at `addr`, pausing `pause` between them. Returns what
/// what it committed.
pub fn workload(
    addr: &str,
    secrets: &Path,
    seed: u64,
    txns: usize,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Committed>> {
    let (addr, secrets) = (addr.to_owned(), secrets.to_owned());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let s = tideline_stream::tls::load_client_dir(&secrets).expect("client secrets");
            let client =
                tideline_stream::Client::connect(&addr, tideline_stream::ClientConfig::new(s))
                    .await
                    .expect("connect the workload to the node");
            let mut rng = StdRng::seed_from_u64(seed);
            let mut out = Vec::new();
            for i in 0..txns {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let n = rng.random_range(1..=3);
                let mut ops = Vec::new();
                let mut changes = Vec::new();
                let both = rng.random_range(0..3) == 0;
                for j in 0..n {
                    let tree = if both && j % 2 == 1 {
                        "orders"
                    } else {
                        "users"
                    };
                    let key = format!("k{:03}", rng.random_range(0..200));
                    if rng.random_range(0..4) == 0 {
                        ops.push(WriteOp::Delete {
                            tree: tree.into(),
                            key: key.clone().into_bytes(),
                        });
                        changes.push(("delete", tree.to_string(), key, String::new()));
                    } else {
                        let value = format!("{{\"seed\":{seed},\"i\":{i},\"j\":{j}}}");
                        ops.push(WriteOp::Put {
                            tree: tree.into(),
                            key: key.clone().into_bytes(),
                            value: value.clone().into_bytes(),
                        });
                        changes.push(("put", tree.to_string(), key, value));
                    }
                }
                let (offset, gtid) = client.commit(ops).await.expect("commit");
                out.push(Committed {
                    gtid,
                    offset,
                    changes,
                });
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            out
        })
    })
}

/// Whether an envelope is a put, delete or bootstrap read (not a tree's creation or drop).
pub fn is_data(e: &Value) -> bool {
    matches!(e["op"].as_str(), Some("put" | "delete" | "read" | "merge"))
}

/// Applies one envelope to a model (what a receiver that upserts and deletes would hold).
pub fn apply(model: &mut Model, e: &Value) {
    let tree = e["tree"]
        .as_str()
        .expect("an envelope names its tree")
        .to_string();
    let key = e["key"].as_str().expect("a UTF-8 key").to_string();
    match e["op"].as_str() {
        Some("put") | Some("read") => {
            let after = e["after"].as_str().expect("a UTF-8 value").to_string();
            model.insert((tree, key), after);
        }
        Some("delete") => {
            model.remove(&(tree, key));
        }
        other => panic!("unexpected op {other:?} in {e}"),
    }
}

/// What the child runs.
pub fn child_spec(
    node: &str,
    secrets: &Path,
    pipeline: &str,
    kind: &str,
    sink: Value,
    batch_changes: usize,
) -> String {
    json!({
        "node": node,
        "secrets": secrets,
        "pipeline": pipeline,
        "kind": kind,
        "sink": sink,
        "batch_changes": batch_changes,
    })
    .to_string()
}

/// Starts the test binary `test` (an `#[ignore]`d test calling [`child_main`]) as a connector
/// child with `spec`, stderr to `stderr`, extra env `env`.
pub fn spawn_child(test: &str, spec: &str, stderr: &Path, env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args(["--exact", test, "--ignored", "--nocapture"])
        .env(CHILD_ENV, spec)
        .env("TIDELINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).expect("stderr file"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn the connector child")
}

/// Kills `child` with SIGKILL and checks it was still running (it died of the kill, not of
/// an error of its own).
pub fn kill9(child: &mut Child, stderr: &Path) {
    use std::os::unix::process::ExitStatusExt;
    if let Ok(Some(status)) = child.try_wait() {
        panic!(
            "the connector exited by itself ({status}); its stderr:\n{}",
            std::fs::read_to_string(stderr).unwrap_or_default()
        );
    }
    let _ = child.kill();
    let status = child.wait().expect("wait for the connector");
    assert_eq!(
        status.signal(),
        Some(9),
        "the connector ended with {status}, not by the kill; its stderr:\n{}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
}

/// The child's body: runs the pipeline of `CHILD_ENV` until killed. Returns at once (doing
/// nothing) when the env var is not set.
pub fn child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: Value = serde_json::from_str(&spec).expect("the child spec is JSON");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let result = rt.block_on(async move {
        let secrets = tideline_stream::tls::load_client_dir(Path::new(
            spec["secrets"].as_str().expect("secrets"),
        ))
        .expect("client secrets");
        let pipeline = spec["pipeline"].as_str().expect("pipeline");
        let mut cfg = PipelineConfig::new(
            pipeline,
            spec["node"].as_str().expect("node"),
            tideline_stream::ClientConfig::new(secrets),
        );
        cfg.from = StartFrom::Tail(TailStart::Earliest);
        cfg.batch_changes = spec["batch_changes"].as_u64().unwrap_or(10_000) as usize;
        cfg.retry_min = Duration::from_millis(50);
        cfg.retry_max = Duration::from_millis(500);
        let sink: Box<dyn Sink> = match spec["kind"].as_str() {
            Some("nats") => {
                let c: NatsConfig =
                    serde_json::from_value(spec["sink"].clone()).expect("a NATS config");
                Box::new(NatsSink::new(c, pipeline).expect("a NATS sink"))
            }
            Some("webhook") => {
                let c: WebhookConfig =
                    serde_json::from_value(spec["sink"].clone()).expect("a webhook config");
                Box::new(WebhookSink::new(c, pipeline).expect("a webhook sink"))
            }
            other => panic!("unknown sink kind {other:?}"),
        };
        let (status, task) = tideline_connectors::pipeline::spawn(cfg, sink);
        // Status on stderr now and then, for a failing test's output.
        let printer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!("status {}", status.get().to_json());
            }
        });
        let r = task.await;
        printer.abort();
        r
    });
    panic!("the pipeline stopped: {result:?}");
}

/// A NATS sink config for one test run: its own stream, subjects and pipeline key.
pub fn nats_config(run: &str, per: Per) -> NatsConfig {
    let mut c = NatsConfig::new("nats://127.0.0.1:4222");
    c.stream = format!("TLTEST_{run}");
    c.subjects = vec![format!("tltest.{run}.>")];
    c.subject = format!("tltest.{run}.{{tree}}");
    c.per = per;
    c
}

/// A NATS config as the child's JSON spec expects it.
pub fn nats_json(c: &NatsConfig) -> Value {
    json!({
        "url": c.url,
        "stream": c.stream,
        "subjects": c.subjects,
        "subject": c.subject,
        "per": match c.per { Per::Txn => "txn", Per::Op => "op" },
        "duplicate_window_secs": c.duplicate_window_secs,
        "ack_timeout_ms": c.ack_timeout_ms,
        "max_in_flight": c.max_in_flight,
        "positions_bucket": c.positions_bucket,
    })
}

/// A unique name for this run.
pub fn run_id() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        rand::rng().random_range(0..u32::MAX)
    )
}
