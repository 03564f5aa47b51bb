//! Shared by the sink tests (`postgres.rs`, `redis.rs`, `nats.rs`, `webhook.rs`,
//! `file_sink.rs`): the service checks, seeds and kill-cycle counts, the two workloads, the
//! connector children to kill with SIGKILL, and the log's projection a sink must end up
//! holding.
//!
//! - Workloads: [`engine_workload`] commits to a [`SourceNode`] served from this process (so
//!   that trees can have merge operators, which the wire protocol cannot create), for the
//!   value sinks whose end state is compared with the engine's ([`SourceNode::projection`],
//!   [`assert_same`]); [`client_workload`] commits over the wire to a node and records what
//!   it committed ([`Committed`]), for the message sinks whose output is replayed into a
//!   [`Model`] ([`model_of`], [`apply`]).
//! - Children: [`connect`] runs `tideline connect --config FILE`; [`spawn_child`] re-executes
//!   the test binary as a connector ([`child_main`]) for sinks tested with settings a file
//!   does not reach. Both log to a file; [`kill9`] kills either and checks it died of the
//!   kill.
//! - Seeds: `TIDELINE_TEST_SEED` replays a run ([`seed`]); `TIDELINE_SINK_KILL_CYCLES` sets
//!   the kill cycles ([`cycles`], 20 by default: the issue's minimum).
#![allow(dead_code, reason = "each test file uses a different subset")]

pub mod pg;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tideline::node::{EngineNode, open_engine_with};
use tideline_connectors::sink::nats::{NatsConfig, NatsSink, Per};
use tideline_connectors::sink::webhook::{WebhookConfig, WebhookSink};
use tideline_connectors::{PipelineConfig, Sink, StartFrom};
use tideline_consumers::TailStart;
use tideline_engine::{Engine, EngineOptions};
use tideline_stream::{ServerConfig, ServerHandle, WriteOp, tls};
use tideline_wal::{Durability, RetentionPolicy, WalOptions};

// ---- Services, names, seeds ------------------------------------------------------------

/// Whether `service` answers on 127.0.0.1:`port`. When it does not: panics under env `CI` (a
/// test that needs a service never skips in CI), else prints a loud SKIPPED line and returns
/// false.
pub fn service_up(service: &str, port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{service} is not answering on {addr}, and CI is set: start it with scripts/services"
        );
    }
    eprintln!("SKIPPED: {service} not answering on {addr}; start it with scripts/services");
    false
}

/// A name no other run uses (letters, digits and `x`): tables, keys, streams and pipelines
/// of parallel tests never collide.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{:x}",
        std::process::id(),
        rand::rng().random_range(0..u32::MAX)
    )
}

/// The seed of this run: env `TIDELINE_TEST_SEED`, else random; printed with the test's name
/// so that a failure replays.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {seed} (replay with TIDELINE_TEST_SEED={seed})");
    seed
}

/// Kill cycles: env `TIDELINE_SINK_KILL_CYCLES`, else 20 (the issue's minimum).
pub fn cycles() -> usize {
    std::env::var("TIDELINE_SINK_KILL_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

// ---- Workloads ------------------------------------------------------------------------

/// The key in `cnt` that every workload transaction adds 1 to and nothing else touches.
pub const TXN_COUNTER: &[u8] = b"txns";

/// Trees of the workload: plain values (JSON and bytes), `add` counters, JSON documents
/// patched by `json-merge-patch`.
pub const TREES: [(&str, Option<&str>); 3] = [
    ("kv", None),
    ("cnt", Some("add")),
    ("doc", Some("json-merge-patch")),
];

/// A node served from this process: engine + QUIC server on a free port.
pub struct SourceNode {
    pub runtime: tokio::runtime::Runtime,
    pub engine: Arc<Engine>,
    pub addr: String,
    pub secrets: PathBuf,
    server: Option<ServerHandle>,
}

impl SourceNode {
    pub fn start(dir: &Path) -> SourceNode {
        SourceNode::start_with_log(
            dir,
            WalOptions {
                durability: Durability::Sync,
                ..WalOptions::default()
            },
        )
    }

    /// A node whose log is cut into 64 KiB segments and keeps none of them for readers
    /// without a slot (`--log-retain-bytes 0`), so that [`SourceNode::purge_through`] can
    /// remove old offsets as a node's retention does.
    pub fn start_purgeable(dir: &Path) -> SourceNode {
        SourceNode::start_with_log(
            dir,
            WalOptions {
                durability: Durability::Sync,
                segment_bytes_max: 64 << 10,
                retention: RetentionPolicy {
                    retain_bytes_min: 0,
                    ..RetentionPolicy::default()
                },
                ..WalOptions::default()
            },
        )
    }

    fn start_with_log(dir: &Path, log: WalOptions) -> SourceNode {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let secrets = dir.join("secrets");
        tideline_stream::ensure_secrets(&secrets).expect("create secrets");
        let engine = open_engine_with(&dir.join("data"), log, EngineOptions::default())
            .expect("open engine");
        let server_secrets = tls::load_server(&secrets).expect("server secrets");
        let server = runtime.block_on(async {
            let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
            let node = Arc::new(EngineNode::new(
                engine.clone(),
                vec![],
                cfg.observer.clone(),
            ));
            tideline_stream::serve(cfg, server_secrets, node).expect("serve")
        });
        let addr = server.local_addr().to_string();
        for (tree, op) in TREES {
            engine.create_tree(tree, op).expect("create a tree");
        }
        SourceNode {
            runtime,
            engine,
            addr,
            secrets,
            server: Some(server),
        }
    }

    /// The last offset the engine applied.
    pub fn last_offset(&self) -> u64 {
        self.engine.position().offset.map_or(0, |o| o.get())
    }

    /// Runs the log's retention until the log no longer holds `offset` (a reader asking for
    /// it gets "not available"). The engine's store checkpoint (every second) lets retention
    /// past what the store persisted. For a node of [`SourceNode::start_purgeable`].
    pub fn purge_through(&self, offset: u64) {
        let wal = self.engine.wal();
        let deadline = Instant::now() + Duration::from_secs(60);
        while wal.first_offset().get() <= offset {
            assert!(
                Instant::now() < deadline,
                "the log still holds offset {offset}: it starts at {}",
                wal.first_offset()
            );
            wal.run_retention().expect("run the log's retention");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every row of `trees`: tree → key → value (a tree the node lacks: no rows).
    pub fn rows_of(&self, trees: &[&str]) -> BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> {
        let snap = self.engine.snapshot();
        trees
            .iter()
            .map(|tree| {
                let rows = snap
                    .range::<Vec<u8>>(tree, .., false)
                    .map(|scan| scan.map(|kv| kv.expect("read a row")).collect())
                    .unwrap_or_default();
                (tree.to_string(), rows)
            })
            .collect()
    }

    /// What a value sink must hold: tree → key → value.
    pub fn projection(&self) -> BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>> {
        let snap = self.engine.snapshot();
        let mut out = BTreeMap::new();
        for (tree, _) in TREES {
            let rows = snap
                .range::<Vec<u8>>(tree, .., false)
                .map(|scan| scan.map(|kv| kv.expect("read a row")).collect())
                .unwrap_or_default();
            out.insert(tree.to_string(), rows);
        }
        out
    }
}

impl Drop for SourceNode {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            self.runtime.block_on(s.shutdown());
        }
    }
}

/// One random transaction: 1..=4 ops over the workload's trees and 40 keys each.
pub fn random_txn(engine: &Engine, rng: &mut StdRng) {
    let mut tx = engine.begin();
    for _ in 0..rng.random_range(1..=4) {
        let (tree, _) = TREES[rng.random_range(0..TREES.len())];
        let key = format!("k{:02}", rng.random_range(0..40));
        let roll = rng.random_range(0..10);
        let r = match (tree, roll) {
            (_, 0) => tx.delete(tree, key.as_bytes()),
            ("kv", r) if r < 5 => tx.put(
                tree,
                key.as_bytes(),
                format!("{{\"n\":{}}}", rng.random_range(0..1000)).as_bytes(),
            ),
            ("kv", _) => tx.put(
                tree,
                key.as_bytes(),
                format!("bytes-{}", rng.random_range(0..1000)).as_bytes(),
            ),
            ("cnt", 1) => tx.put(tree, key.as_bytes(), b"100"),
            ("cnt", _) => tx.merge(
                tree,
                key.as_bytes(),
                rng.random_range(-5i64..=20).to_string().as_bytes(),
            ),
            (_, 1) => tx.put(tree, key.as_bytes(), br#"{"base":true}"#),
            (_, _) => {
                let field = ["a", "b", "c"][rng.random_range(0..3)];
                let patch = if rng.random_range(0..5) == 0 {
                    format!("{{\"{field}\":null}}")
                } else {
                    format!("{{\"{field}\":{}}}", rng.random_range(0..100))
                };
                tx.merge(tree, key.as_bytes(), patch.as_bytes())
            }
        };
        r.expect("a workload op");
    }
    // A counter no op ever resets: every transaction adds 1, so a batch applied twice or
    // skipped shows in the final state however the other keys were overwritten after it.
    tx.merge("cnt", TXN_COUNTER, b"1").expect("a workload op");
    tx.commit().expect("commit a workload transaction");
}

/// Writes random transactions to `engine` until `stop`, a few hundred a second.
pub fn engine_workload(
    engine: Arc<Engine>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            random_txn(&engine, &mut rng);
            n += 1;
            std::thread::sleep(Duration::from_micros(rng.random_range(200..3000)));
        }
        n
    })
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
/// of them spanning both) to the node at `addr`, pausing `pause` between them, until `stop`.
/// Returns what it committed.
pub fn client_workload(
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
            let _ = rustls::crypto::ring::default_provider().install_default();
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
            client.close().await;
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

// ---- Connector children -----------------------------------------------------------------

/// The env var carrying a re-executed child's spec (JSON); set only in the child.
pub const CHILD_ENV: &str = "TIDELINE_TEST_SINK_CHILD";

/// `path` opened for appending, for a child's stderr: the cycles of one test share one log.
pub fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the connector log")
}

/// Writes a pipeline file into `dir` and returns its path.
pub fn pipeline_file(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let mut f = std::fs::File::create(&path).expect("create the pipeline file");
    f.write_all(body.as_bytes())
        .expect("write the pipeline file");
    path
}

/// A `tideline connect --config FILE` child; its stderr goes to `log`.
pub fn connect(config: &Path, log: &Path, canary: bool) -> Child {
    let mut c = Command::new(crate::common::bin());
    c.args(["connect", "--config"])
        .arg(config)
        .env("TIDELINE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(log));
    if canary {
        c.env("TIDELINE_TESTING_POSITION_APART", "1");
    } else {
        c.env_remove("TIDELINE_TESTING_POSITION_APART");
    }
    c.spawn().expect("start tideline connect")
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
        .stderr(log_file(stderr));
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

// ---- The log's projection ---------------------------------------------------------------

/// The offset in a stored pipeline checkpoint (`{"tail":{"offset":N,..}}`), 0 while
/// bootstrapping or without one.
pub fn checkpoint_offset(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| v["tail"]["offset"].as_u64())
        .unwrap_or(0)
}

/// A value as a sink stores it, for comparison: JSON by meaning, anything else by bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Norm {
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

impl Norm {
    pub fn of(bytes: &[u8]) -> Norm {
        match serde_json::from_slice(bytes) {
            Ok(v) => Norm::Json(v),
            Err(_) => Norm::Bytes(bytes.to_vec()),
        }
    }
}

/// Compares a sink's rows with the projection: same keys, same values; prints what differs.
pub fn assert_same(
    what: &str,
    want: &BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
    have: &BTreeMap<String, BTreeMap<Vec<u8>, Norm>>,
) {
    let mut problems = Vec::new();
    let mut rows = 0;
    for (tree, rows_want) in want {
        let empty = BTreeMap::new();
        let rows_have = have.get(tree).unwrap_or(&empty);
        rows += rows_want.len();
        if rows_want.len() != rows_have.len() {
            problems.push(format!(
                "tree {tree}: {} rows in the sink, {} in the log's projection",
                rows_have.len(),
                rows_want.len()
            ));
        }
        for (k, v) in rows_want {
            let key = String::from_utf8_lossy(k);
            match rows_have.get(k) {
                None => problems.push(format!("tree {tree}: key {key} missing")),
                Some(h) if *h != Norm::of(v) => problems.push(format!(
                    "tree {tree}: key {key}: sink has {h:?}, log says {:?}",
                    String::from_utf8_lossy(v)
                )),
                _ => {}
            }
        }
        for k in rows_have.keys() {
            if !rows_want.contains_key(k) {
                problems.push(format!(
                    "tree {tree}: key {} should not be there",
                    String::from_utf8_lossy(k)
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{what}: the sink differs from the log's projection ({} problems; first ones):\n{}",
        problems.len(),
        problems
            .iter()
            .take(15)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("{what}: the sink equals the log's projection ({rows} rows)");
}

// ---- A copy that cannot resume ----------------------------------------------------------

/// The trees of [`copy_that_cannot_resume`]: `a_gone` (copied first, then dropped at the
/// source) and the workload's, `kv` holding ~10 MB (the copy's longest part).
pub const RESTART_TREES: [&str; 4] = ["a_gone", "cnt", "doc", "kv"];

/// A bootstrap that must start again from scratch into a sink that holds a partial copy, run
/// against the sink of the connector file `config` (`from = "bootstrap"`); `position` reads
/// the checkpoint the sink stores, `contents` its rows of [`RESTART_TREES`]:
///
/// 1. `source` (from [`SourceNode::start_purgeable`]) holds tree `a_gone` and ~10 MB in `kv`;
///    `tideline connect` bootstraps it and is SIGKILLed once it stored part of `kv`;
/// 2. the source then deletes rows the sink already holds (in `kv` and `cnt`), changes one,
///    drops `a_gone`, and its retention removes the log the stored progress would resume
///    from;
/// 3. the connector starts again: it cannot resume the copy, copies from scratch, and follows
///    the log.
///
/// The sink must then hold exactly what the source holds: none of the rows deleted and no
/// row of the dropped tree.
pub fn copy_that_cannot_resume(
    source: &SourceNode,
    config: &Path,
    log: &Path,
    mut position: impl FnMut() -> Option<Vec<u8>>,
    mut contents: impl FnMut() -> BTreeMap<String, BTreeMap<Vec<u8>, Norm>>,
) {
    let e = &source.engine;
    e.create_tree("a_gone", None).expect("create a_gone");
    let mut tx = e.begin();
    for i in 0..300 {
        tx.put(
            "a_gone",
            format!("g{i:04}").as_bytes(),
            format!("{{\"g\":{i}}}").as_bytes(),
        )
        .expect("put");
    }
    tx.commit().expect("commit");
    e.put("cnt", b"c1", b"5").expect("put");
    e.put("doc", b"d1", br#"{"a":1}"#).expect("put");
    let pad = "x".repeat(80);
    for chunk in 0..100 {
        let mut tx = e.begin();
        for j in 0..1000 {
            let i = chunk * 1000 + j;
            let v = format!("{{\"n\":{i},\"pad\":\"{pad}\"}}");
            tx.put("kv", format!("b{i:06}").as_bytes(), v.as_bytes())
                .expect("put");
        }
        tx.commit().expect("commit");
    }
    let bootstrap = |cp: Option<Vec<u8>>| -> Option<Value> {
        let v: Value = serde_json::from_slice(&cp?).ok()?;
        assert!(
            v.get("tail").is_none(),
            "the copy ended before the connector was killed (make `kv` larger): {v}"
        );
        Some(v["bootstrap"].clone())
    };

    // 1. Killed once it stored a chunk of `kv` (trees are copied in name order).
    let mut child = connect(config, log, false);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = bootstrap(position());
        if p.as_ref().is_some_and(|p| {
            p["tree"] == "kv" && p["key_hex"].as_str().is_some_and(|k| !k.is_empty())
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy never reached `kv`: {p:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    kill9(&mut child, log);
    let progress = bootstrap(position()).expect("a stored bootstrap progress");
    let held = contents();
    assert!(
        held["a_gone"].len() == 300 && held["kv"].contains_key(&b"b000000"[..]),
        "the partial copy holds `a_gone` and the first rows of `kv`: {progress}"
    );
    eprintln!("killed mid-copy at {progress}");

    // 2. The source changes and purges the log the copy would resume from.
    let mut tx = e.begin();
    for i in 0..50 {
        tx.delete("kv", format!("b{i:06}").as_bytes())
            .expect("delete");
    }
    tx.put("kv", b"b000060", br#"{"changed":true}"#)
        .expect("put");
    tx.delete("cnt", b"c1").expect("delete");
    tx.commit().expect("commit");
    e.drop_tree("a_gone").expect("drop a_gone");
    let filler = format!("{{\"f\":\"{}\"}}", "y".repeat(4000));
    for i in 0..64 {
        e.put("kv", format!("f{i:02}").as_bytes(), filler.as_bytes())
            .expect("put");
    }
    let after = progress["after_offset"]
        .as_u64()
        .expect("after_offset in the progress");
    source.purge_through(after + 1);

    // 3. Started again: the copy cannot resume and starts from scratch.
    let mut child = connect(config, log, false);
    let last = source.last_offset();
    let deadline = Instant::now() + Duration::from_secs(180);
    while checkpoint_offset(position().as_deref()) < last {
        assert!(
            Instant::now() < deadline,
            "the connector did not store offset {last}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill9(&mut child, log);
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        text.contains("cannot resume"),
        "the second run copied again from scratch (its log says why); log:\n{text}"
    );
    assert_same(
        "a copy started again from scratch",
        &source.rows_of(&RESTART_TREES),
        &contents(),
    );
}

// ---- A relay that loses answers --------------------------------------------------------

/// A TCP relay to 127.0.0.1:`port` that, once armed (set the returned flag), passes on the
/// client bytes holding one of `markers` (`COMMIT\0`, `EXEC\r\n`) to the server and then cuts that
/// connection without passing the server's answer back: the server has committed, and the
/// client never learns it. Returns the relay's address and its trigger (disarmed once used).
pub async fn relay_losing_answers(
    port: u16,
    markers: &'static [&'static [u8]],
) -> (String, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let armed = Arc::new(AtomicBool::new(false));
    let trigger = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let cut = Arc::new(AtomicBool::new(false));
            let (armed, cut_up) = (armed.clone(), cut.clone());
            let up = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                // The end of the previous read, one byte short of the longest marker: a marker
                // may straddle two reads, and one already passed on cannot match again.
                let carry = markers.iter().map(|m| m.len()).max().unwrap_or(1) - 1;
                let mut seen: Vec<u8> = Vec::new();
                while let Ok(n @ 1..) = cr.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    let hit = markers
                        .iter()
                        .any(|m| seen.windows(m.len()).any(|w| w == *m));
                    seen.drain(..seen.len().saturating_sub(carry));
                    let cutting = hit && armed.swap(false, Ordering::SeqCst);
                    // Set before the server can answer, so that no answer gets through.
                    cut_up.store(cutting, Ordering::SeqCst);
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if cutting {
                        // Let the server commit, then drop both sides.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    if cut.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    (addr, trigger)
}

// ---- Batches for sinks driven directly ---------------------------------------------------

/// Batch `seq`: one transaction merging `+1` into `cnt/n` (or putting `seq` there, `put`);
/// its checkpoint names it.
pub fn one_change(seq: u64, put: bool) -> tideline_connectors::Batch {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let (tree, key) = ("cnt".to_string(), b"n".to_vec());
    let op = if put {
        tideline_wal::Op::Put {
            tree,
            key,
            value: seq.to_string().into_bytes(),
            before: None,
        }
    } else {
        tideline_wal::Op::Merge {
            tree,
            key,
            operand: b"1".to_vec(),
        }
    };
    tideline_connectors::Batch {
        source: uuid,
        items: vec![tideline_connectors::Item::Txn(tideline_wal::Transaction {
            offset: tideline_wal::Offset::new(seq).unwrap(),
            gtid: tideline_wal::Gtid::new(uuid, seq).unwrap(),
            timestamp_us: 0,
            ops: vec![op],
        })],
        checkpoint: format!("after batch {seq}").into_bytes(),
    }
}

/// One transaction putting `{"v":1}` at each `(tree, key)` of `rows`, with `checkpoint`.
pub fn puts(rows: &[(&str, &str)], checkpoint: &str) -> tideline_connectors::Batch {
    let uuid = uuid::Uuid::from_bytes([7; 16]);
    let ops = rows
        .iter()
        .map(|(tree, key)| tideline_wal::Op::Put {
            tree: tree.to_string(),
            key: key.as_bytes().to_vec(),
            value: br#"{"v":1}"#.to_vec(),
            before: None,
        })
        .collect();
    tideline_connectors::Batch {
        source: uuid,
        items: vec![tideline_connectors::Item::Txn(tideline_wal::Transaction {
            offset: tideline_wal::Offset::new(1).unwrap(),
            gtid: tideline_wal::Gtid::new(uuid, 1).unwrap(),
            timestamp_us: 0,
            ops,
        })],
        checkpoint: checkpoint.as_bytes().to_vec(),
    }
}

/// Writes `batch` as the pipeline would after a `Retry`: again until it is stored (at most
/// 100 tries); any other error fails the test.
pub async fn write_retrying(sink: &mut dyn Sink, batch: &tideline_connectors::Batch) {
    for _ in 0..100 {
        match sink.write(batch).await {
            Ok(()) => return,
            Err(tideline_connectors::SinkError::Retry(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the retried batch: {e}"),
        }
    }
    panic!("the batch was still refused with `Retry` after 100 tries");
}

/// Opens `sink` (which must hold no position), stores `first`, then writes `second` through
/// a relay armed by `lose` ([`relay_losing_answers`]): the write must fail with `Retry`, its
/// answer lost, though the server applied it.
pub async fn store_then_lose_an_answer(
    sink: &mut dyn Sink,
    lose: &AtomicBool,
    first: &tideline_connectors::Batch,
    second: &tideline_connectors::Batch,
) {
    assert_eq!(sink.open().await.expect("open"), None);
    sink.write(first).await.expect("the first batch");
    lose.store(true, Ordering::SeqCst);
    let e = sink
        .write(second)
        .await
        .expect_err("the second batch's answer is lost");
    assert!(matches!(e, tideline_connectors::SinkError::Retry(_)), "{e}");
}
