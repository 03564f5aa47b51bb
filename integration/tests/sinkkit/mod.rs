//! Shared by the PostgreSQL and Redis sink tests (`postgres.rs`, `redis.rs`): a source node in
//! this process (so that trees can have merge operators, which the wire protocol cannot
//! create), a seeded random workload on it, the log's projection (what a value sink must hold
//! in the end), `tideline connect` children to kill, and the service checks.
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline::node::{EngineNode, open_engine};
use tideline_engine::Engine;
use tideline_stream::{ServerConfig, ServerHandle, tls};
use tideline_wal::Durability;

/// Trees of the workload: plain values (JSON and bytes), `add` counters, JSON documents
/// patched by `json-merge-patch`.
pub const TREES: [(&str, Option<&str>); 3] = [
    ("kv", None),
    ("cnt", Some("add")),
    ("doc", Some("json-merge-patch")),
];

/// Whether `service` answers on `addr`. When it does not: panics under env `CI` (a test that
/// needs a service never skips in CI), else prints a loud SKIPPED line and returns false.
pub fn service_up(service: &str, addr: &str) -> bool {
    let ok = addr
        .parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok())
        .is_some();
    if ok {
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

/// A name no other run uses: tables, keys and pipelines of parallel tests never collide.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}x{nanos:x}", std::process::id())
}

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
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let secrets = dir.join("secrets");
        tideline_stream::ensure_secrets(&secrets).expect("create secrets");
        let engine = open_engine(&dir.join("data"), Durability::Sync, false).expect("open engine");
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
    tx.commit().expect("commit a workload transaction");
}

/// Writes random transactions until `stop`, a few hundred a second.
pub fn workload(
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

/// The seed of this run: env `TIDELINE_SINK_SEED`, else random; printed so a failure replays.
pub fn seed() -> u64 {
    let seed = std::env::var("TIDELINE_SINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with TIDELINE_SINK_SEED={seed})");
    seed
}

/// Kill cycles: env `TIDELINE_SINK_KILL_CYCLES`, else 20 (the issue's minimum).
pub fn cycles() -> usize {
    std::env::var("TIDELINE_SINK_KILL_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
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
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("open the connector log"),
        );
    if canary {
        c.env("TIDELINE_TESTING_POSITION_APART", "1");
    } else {
        c.env_remove("TIDELINE_TESTING_POSITION_APART");
    }
    c.spawn().expect("start tideline connect")
}

/// SIGKILLs `child` and reaps it; asserts it was still running (it never exits by itself).
pub fn kill9(child: &mut Child, log: &Path) {
    if let Ok(Some(status)) = child.try_wait() {
        panic!(
            "the connector exited by itself ({status}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    child.kill().expect("SIGKILL the connector");
    let status = child.wait().expect("reap the connector");
    assert!(
        !status.success(),
        "a killed connector reports failure: {status}"
    );
}

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
