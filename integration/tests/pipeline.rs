//! The pipeline's promises, checked against a real node (an engine served over QUIC in this
//! process) and an in-memory sink that stores its data and checkpoint atomically and can be
//! told to fail (retry, hold for an operator, fatal):
//!
//! - transactions reach the sink in log order, and a pipeline stopped at any point and started
//!   again from the sink's checkpoint stores every GTID exactly once;
//! - filters (trees, key prefix, op kinds) pass only what they name, and the stored position
//!   still moves past what they drop;
//! - batches close at `batch_changes` and, with less, after `batch_delay`;
//! - sink failures are retried (`Retry`), paused (`Hold`) or end the pipeline (`Fatal`), each
//!   counted in the status (errors, outages, last error, state);
//! - an empty sink is bootstrapped from the source while the source keeps writing, and ends
//!   equal to the source's state; a bootstrap interrupted midway resumes from the progress the
//!   sink stored, not from scratch;
//! - a source that goes away while the pipeline follows it shows in the status (state, error,
//!   one outage) until it is back, and nothing is lost or repeated across it;
//! - while the sink fails (retried or held), the status's lag follows the source (head,
//!   transactions, age of the oldest not stored) and is 0 again once the sink has caught up;
//!   what the pipeline reads ahead meanwhile is one batch at most, stored once.
//!
//! Guards against: lost or repeated transactions at restarts, filters that freeze the
//! position, batches that never close, silent sink or source failures, a lag frozen at 0 for
//! the whole of a sink outage (no lag alert fires), and a bootstrap that drops or overwrites
//! changes made while it copies.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tideline::node::{EngineNode, open_engine};
use tideline_connectors::pipeline::{self, PipelineError};
use tideline_connectors::{
    Batch, EarlierCopy, Filter, Item, PipelineCheckpoint, PipelineConfig, PipelineState,
    SharedPipelineStatus, Sink, SinkError, SinkFuture, StartFrom,
};
use tideline_engine::{Engine, MergeOperator};
use tideline_stream::{ClientConfig, ServerConfig, ServerHandle, tls};
use tideline_wal::{Durability, Op, Transaction};

// ---------------------------------------------------------------------------------------------
// A source node in this process

struct Source {
    engine: Arc<Engine>,
    server: Option<ServerHandle>,
    addr: String,
    client: ClientConfig,
    _dir: tempfile::TempDir,
}

async fn source() -> Source {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tideline_stream::ensure_secrets(&secrets).unwrap();
    let data = dir.path().join("data");
    let engine = tokio::task::spawn_blocking(move || open_engine(&data, Durability::Sync, false))
        .await
        .unwrap()
        .unwrap();
    let cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    let node = Arc::new(EngineNode::new(
        engine.clone(),
        vec![],
        cfg.observer.clone(),
    ));
    let server = tideline_stream::serve(cfg, tls::load_server(&secrets).unwrap(), node).unwrap();
    let addr = server.local_addr().to_string();
    Source {
        engine,
        server: Some(server),
        addr,
        client: client_cfg(&secrets),
        _dir: dir,
    }
}

fn client_cfg(secrets: &Path) -> ClientConfig {
    let mut cfg = ClientConfig::new(tls::load_client_dir(secrets).unwrap());
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.idle_timeout = Duration::from_secs(5);
    cfg
}

impl Source {
    fn config(&self, name: &str) -> PipelineConfig {
        let mut cfg = PipelineConfig::new(name, self.addr.clone(), self.client.clone());
        cfg.retry_min = Duration::from_millis(10);
        cfg.retry_max = Duration::from_millis(50);
        cfg.hold_pause = Duration::from_millis(300);
        cfg.batch_delay = Duration::from_millis(20);
        cfg
    }

    fn last_offset(&self) -> u64 {
        self.engine.position().offset.map_or(0, |o| o.get())
    }

    /// Every tree's rows.
    fn state(&self) -> BTreeMap<(String, Vec<u8>), Vec<u8>> {
        let mut out = BTreeMap::new();
        for t in self.engine.trees() {
            for row in self.engine.range::<&[u8]>(&t.name, .., false).unwrap() {
                let (k, v) = row.unwrap();
                out.insert((t.name.clone(), k), v);
            }
        }
        out
    }

    /// Commits `n` transactions of random puts, deletes and merges (1-4 ops each) over a few
    /// trees and 200 keys, from seed `seed`.
    fn random_writes(&self, seed: u64, n: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..n {
            let ops = rng.random_range(1..=4);
            let picks: Vec<(u32, u32, u32)> = (0..ops)
                .map(|_| {
                    (
                        rng.random_range(0..10),
                        rng.random_range(0..200),
                        rng.random_range(0..1000),
                    )
                })
                .collect();
            self.engine
                .transaction(|tx| {
                    for &(kind, k, v) in &picks {
                        let key = format!("k{k:03}");
                        match kind {
                            0..=4 => tx.put("docs", key.as_bytes(), format!("v{v}").as_bytes())?,
                            5 | 6 => tx.delete("docs", key.as_bytes())?,
                            7 => tx.put("other", key.as_bytes(), b"o")?,
                            _ => tx.merge("counters", key.as_bytes(), v.to_string().as_bytes())?,
                        }
                    }
                    Ok(())
                })
                .unwrap();
        }
    }

    /// Creates the trees `random_writes` uses (the engine's API creates none implicitly).
    fn create_trees(&self) {
        self.create(&["docs", "other"]);
        self.engine.create_tree("counters", Some("add")).unwrap();
    }

    fn create(&self, trees: &[&str]) {
        for t in trees {
            self.engine.create_tree(t, None).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test sink

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Retry,
    Hold,
    Fatal,
}

#[derive(Default)]
struct Stored {
    /// Stored with the data, atomically (both under this one lock).
    checkpoint: Option<Vec<u8>>,
    /// Every transaction stored, in the order stored (a repeat would show).
    txns: Vec<Transaction>,
    state: BTreeMap<(String, Vec<u8>), Vec<u8>>,
    merge_ops: BTreeMap<String, MergeOperator>,
    /// Changes per stored batch.
    batches: Vec<usize>,
    /// Faults to answer the next writes with, once `writes >= faults_after`.
    faults: VecDeque<Fault>,
    faults_after: usize,
    writes: usize,
    /// Each write takes at least this long (a slow sink, so that a bootstrap overlaps writes).
    write_delay: Duration,
    /// What each `begin_copy` was told the sink holds of an earlier copy.
    begun: Vec<EarlierCopy>,
}

#[derive(Clone, Default)]
struct TestSink(Arc<Mutex<Stored>>);

impl TestSink {
    fn with<T>(&self, f: impl FnOnce(&mut Stored) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    fn checkpoint(&self) -> Option<PipelineCheckpoint> {
        self.with(|s| s.checkpoint.clone())
            .map(|b| PipelineCheckpoint::decode(&b).unwrap())
    }

    fn tail_offset(&self) -> Option<u64> {
        match self.checkpoint() {
            Some(PipelineCheckpoint::Tail(p)) => Some(p.offset),
            _ => None,
        }
    }
}

impl Stored {
    fn apply_op(&mut self, op: &Op) {
        match op {
            Op::Put {
                tree, key, value, ..
            } => {
                self.state
                    .insert((tree.clone(), key.clone()), value.clone());
            }
            Op::Delete { tree, key, .. } => {
                self.state.remove(&(tree.clone(), key.clone()));
            }
            Op::Merge { tree, key, operand } => {
                let k = (tree.clone(), key.clone());
                let m = self
                    .merge_ops
                    .get(tree)
                    .copied()
                    .expect("merge on a tree without operator");
                let v = m.resolve(self.state.get(&k).map(Vec::as_slice), operand);
                self.state.insert(k, v);
            }
            Op::CreateTree {
                tree,
                merge_operator,
            } => {
                if let Some(m) = merge_operator.as_deref().and_then(MergeOperator::from_name) {
                    self.merge_ops.insert(tree.clone(), m);
                }
            }
            Op::DropTree { tree } => {
                self.state.retain(|(t, _), _| t != tree);
                self.merge_ops.remove(tree);
            }
            Op::CreateIndex { .. } | Op::DropIndex { .. } => {}
        }
    }
}

impl Sink for TestSink {
    fn describe(&self) -> String {
        "test sink".into()
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        let cp = self.with(|s| s.checkpoint.clone());
        Box::pin(async move { Ok(cp) })
    }

    /// As a sink storing values does: the earlier copy's trees (all, when not recorded) are
    /// cleared with the new copy's first checkpoint.
    fn begin_copy<'a>(
        &'a mut self,
        checkpoint: &'a [u8],
        earlier: &'a EarlierCopy,
    ) -> SinkFuture<'a, Result<(), SinkError>> {
        self.with(|s| {
            s.begun.push(earlier.clone());
            match earlier {
                EarlierCopy::None => return,
                EarlierCopy::Trees { trees, .. } => s.state.retain(|(t, _), _| !trees.contains(t)),
                EarlierCopy::Unrecorded => s.state.clear(),
            }
            s.checkpoint = Some(checkpoint.to_vec());
        });
        Box::pin(async { Ok(()) })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        let r = self.with(|s| {
            if s.writes >= s.faults_after
                && let Some(f) = s.faults.pop_front()
            {
                let m = format!("injected {f:?}");
                return Err(match f {
                    Fault::Retry => SinkError::Retry(m),
                    Fault::Hold => SinkError::Hold(m),
                    Fault::Fatal => SinkError::Fatal(m),
                });
            }
            s.writes += 1;
            for item in &batch.items {
                match item {
                    Item::Txn(t) => {
                        for op in &t.ops {
                            s.apply_op(op);
                        }
                        s.txns.push(t.clone());
                    }
                    Item::Record(r) => r.txn.ops.iter().for_each(|op| s.apply_op(op)),
                    Item::Ops(ops) => ops.iter().for_each(|op| s.apply_op(op)),
                    Item::Chunk {
                        tree,
                        merge_operator,
                        from,
                        to,
                        entries,
                    } => {
                        if let Some(m) =
                            merge_operator.as_deref().and_then(MergeOperator::from_name)
                        {
                            s.merge_ops.insert(tree.clone(), m);
                        }
                        s.state.retain(|(t, k), _| {
                            t != tree
                                || k.as_slice() < from.as_slice()
                                || to.as_ref().is_some_and(|to| k >= to)
                        });
                        for (k, v) in entries {
                            s.state.insert((tree.clone(), k.to_vec()), v.to_vec());
                        }
                    }
                }
            }
            s.batches.push(batch.changes());
            s.checkpoint = Some(batch.checkpoint.clone());
            Ok(())
        });
        let delay = self.with(|s| s.write_delay);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            r
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the sink's tail checkpoint covers the source's last offset.
async fn wait_caught_up(src: &Source, sink: &TestSink, st: &SharedPipelineStatus) {
    let last = src.last_offset();
    let deadline = Instant::now() + Duration::from_secs(60);
    // The sink stores first; the pipeline's status follows when the write returns.
    let status_offset = || st.get().position.map(|p| p.offset);
    while sink.tail_offset() < Some(last) || status_offset() < Some(last) {
        assert!(
            Instant::now() < deadline,
            "the sink stands at {:?}, the source at {last}; status {}",
            sink.tail_offset(),
            st.get().to_json()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spawn(
    cfg: PipelineConfig,
    sink: &TestSink,
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), PipelineError>>,
) {
    pipeline::spawn(cfg, Box::new(sink.clone()))
}

/// The stored transactions are in log order, each GTID once, and are the source's whole log.
fn assert_exactly_once_in_order(src: &Source, sink: &TestSink) {
    let txns = sink.with(|s| s.txns.clone());
    for w in txns.windows(2) {
        assert!(
            w[0].offset < w[1].offset,
            "offset {} stored after {} (a repeat or a reorder)",
            w[1].offset,
            w[0].offset
        );
    }
    let mut gtids = tideline_wal::GtidSet::new();
    for t in &txns {
        assert!(!gtids.contains(&t.gtid), "GTID {} stored twice", t.gtid);
        gtids.insert(t.gtid);
    }
    assert_eq!(
        gtids,
        src.engine.gtid_executed(),
        "stored GTIDs != the source's"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_arrive_in_order_exactly_once_across_restarts() {
    let src = Arc::new(source().await);
    src.create_trees();
    let sink = TestSink::default();
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let writer = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || {
            for round in 0..20 {
                src.random_writes(seed + round, 50);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut cfg = src.config("restarts");
    cfg.batch_changes = 37; // many batches, so that restarts fall between them
    let mut stored_before = 0;
    for _restart in 0..6 {
        let (_st, task) = spawn(cfg.clone(), &sink);
        // Stop while work is in flight: after more was stored than before this run.
        wait_until("the sink stores more", || {
            sink.with(|s| s.txns.len()) > stored_before
        })
        .await;
        task.abort();
        let _ = task.await;
        stored_before = sink.with(|s| s.txns.len());
    }
    writer.await.unwrap();
    let (st, task) = spawn(cfg, &sink);
    wait_caught_up(&src, &sink, &st).await;
    task.abort();
    assert_exactly_once_in_order(&src, &sink);
    assert_eq!(sink.with(|s| s.state.clone()), src.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_pass_what_they_name_and_the_position_still_moves() {
    let src = source().await;
    src.create(&["a", "b", "c"]);
    let put = |tree: &str, key: &str| src.engine.put(tree, key.as_bytes(), b"v").unwrap();
    put("a", "k1");
    put("a", "x1");
    put("b", "k2");
    src.engine.delete("a", b"k1").unwrap();
    put("c", "k3");
    // One tree (filtered by the source) and several trees (filtered here), same rules.
    for trees in [
        vec!["a".to_string()],
        vec!["a".to_string(), "c".to_string()],
    ] {
        let sink = TestSink::default();
        let mut cfg = src.config("filters");
        cfg.filter = Filter {
            trees: trees.clone(),
            prefix: Some(b"k".to_vec()),
            ops: vec!["put".into()],
        };
        let (st, task) = spawn(cfg, &sink);
        wait_caught_up(&src, &sink, &st).await;
        let ops: Vec<Op> = sink.with(|s| s.txns.iter().flat_map(|t| t.ops.clone()).collect());
        let seen: Vec<(String, Vec<u8>)> = ops
            .iter()
            .map(|op| match op {
                Op::Put { tree, key, .. } => (tree.clone(), key.clone()),
                other => panic!("filter let {other:?} through"),
            })
            .collect();
        let mut want = vec![("a".to_string(), b"k1".to_vec())];
        if trees.len() == 2 {
            want.push(("c".to_string(), b"k3".to_vec()));
        }
        assert_eq!(seen, want, "trees {trees:?}");
        // Only dropped transactions from now on: the stored position moves anyway.
        for i in 0..20 {
            put("b", &format!("k{i}"));
        }
        wait_caught_up(&src, &sink, &st).await;
        assert_eq!(sink.with(|s| s.txns.len()), want.len());
        let status = st.get().to_json();
        assert_eq!(status["offset"], src.last_offset(), "{status}");
        assert_eq!(status["lag_txns"], 0, "{status}");
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_close_at_their_size_and_a_partial_one_after_the_delay() {
    let src = source().await;
    src.engine.create_tree("t", None).unwrap();
    for i in 0..95 {
        src.engine
            .put("t", format!("k{i}").as_bytes(), b"v")
            .unwrap();
    }
    let sink = TestSink::default();
    let mut cfg = src.config("batches");
    cfg.batch_changes = 10;
    // Long enough that a full backlog always fills a batch before its delay runs out.
    cfg.batch_delay = Duration::from_millis(500);
    let (st, task) = spawn(cfg, &sink);
    wait_caught_up(&src, &sink, &st).await;
    let batches = sink.with(|s| s.batches.clone());
    // 96 one-op transactions (the tree's creation and 95 puts): 9 full batches, then the 6
    // left, which only the delay can close.
    assert_eq!(batches, [vec![10; 9], vec![6]].concat());
    // And a single later transaction is delivered alone, by the delay.
    src.engine.put("t", b"late", b"v").unwrap();
    wait_caught_up(&src, &sink, &st).await;
    assert_eq!(sink.with(|s| s.batches.last().copied()), Some(1));
    assert_eq!(st.get().to_json()["batches"], 11);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_failures_are_retried_held_or_fatal_and_counted() {
    let src = source().await;
    let sink = TestSink::default();
    sink.with(|s| s.faults.extend([Fault::Retry; 3]));
    src.create(&["t"]);
    let (st, task) = spawn(src.config("faults"), &sink);
    src.engine.put("t", b"a", b"1").unwrap();
    wait_caught_up(&src, &sink, &st).await;
    let s = st.get().to_json();
    assert_eq!(
        (&s["state"], &s["errors"], &s["outages"], &s["last_error"]),
        (
            &"running".into(),
            &3.into(),
            &1.into(),
            &serde_json::Value::Null
        ),
        "{s}"
    );
    // Held: the state and the error show while it waits for its pause.
    sink.with(|s| s.faults.push_back(Fault::Hold));
    src.engine.put("t", b"b", b"2").unwrap();
    wait_until("the pipeline is held", || {
        st.get().to_json()["state"] == "held"
    })
    .await;
    let s = st.get().to_json();
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("injected Hold")),
        "{s}"
    );
    wait_caught_up(&src, &sink, &st).await;
    let s = st.get().to_json();
    assert_eq!(
        (&s["state"], &s["errors"], &s["outages"], &s["last_error"]),
        (
            &"running".into(),
            &4.into(),
            &2.into(),
            &serde_json::Value::Null
        ),
        "{s}"
    );
    // Fatal: the pipeline stops and says why.
    sink.with(|s| s.faults.push_back(Fault::Fatal));
    src.engine.put("t", b"c", b"3").unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("a fatal error stops the pipeline")
        .unwrap();
    let e = r.expect_err("a fatal error is the pipeline's result");
    assert!(e.to_string().contains("injected Fatal"), "{e}");
    let s = st.get().to_json();
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("injected Fatal"))
    );
    // Nothing was stored twice across the failures.
    let stored: Vec<_> = sink.with(|s| s.txns.iter().map(|t| t.offset.get()).collect());
    assert_eq!(stored, (1..=src.last_offset() - 1).collect::<Vec<_>>());
}

/// Preloads the source, then bootstraps `sink` while a writer keeps changing the source;
/// returns when the writer has finished.
async fn bootstrap_while_writing(
    src: &Arc<Source>,
    sink: &TestSink,
    seed: u64,
    cfg: PipelineConfig,
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), PipelineError>>,
) {
    let (st, task) = spawn(cfg, sink);
    // Writes go on for as long as the copy runs (and at least 10 rounds).
    let writer = {
        let (src, st) = (src.clone(), st.clone());
        tokio::task::spawn_blocking(move || {
            for round in 0.. {
                let copying = matches!(
                    st.get().state,
                    PipelineState::Starting | PipelineState::Bootstrapping
                );
                if round >= 10 && !copying {
                    break;
                }
                src.random_writes(seed + 1000 + round, 20);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    writer.await.unwrap();
    (st, task)
}

fn bootstrap_config(src: &Source, name: &str) -> PipelineConfig {
    let mut cfg = src.config(name);
    cfg.from = StartFrom::Bootstrap;
    cfg.chunk_bytes = 512; // many chunks, so that live writes fall between them
    cfg
}

async fn preloaded_source(seed: u64) -> Arc<Source> {
    let src = Arc::new(source().await);
    src.create_trees();
    let s = src.clone();
    tokio::task::spawn_blocking(move || {
        // ~250 KB in one tree: more than a dozen chunks of the smallest size a node serves.
        for i in 0..25 {
            s.engine
                .transaction(|tx| {
                    for j in 0..100 {
                        tx.put("docs", format!("p{i:02}{j:03}").as_bytes(), &[b'x'; 100])?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        s.random_writes(seed, 400)
    })
    .await
    .unwrap();
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_sink_is_bootstrapped_while_the_source_writes() {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let src = preloaded_source(seed).await;
    let sink = TestSink::default();
    sink.with(|s| s.write_delay = Duration::from_millis(20));
    let t0 = Instant::now();
    let (st, task) =
        bootstrap_while_writing(&src, &sink, seed, bootstrap_config(&src, "bootstrap")).await;
    wait_caught_up(&src, &sink, &st).await;
    println!("caught up after {:?}", t0.elapsed());
    assert_eq!(sink.with(|s| s.state.clone()), src.state(), "seed {seed}");
    let s = st.get().to_json();
    assert!(s["bootstrap"]["chunks"].as_u64() > Some(1), "{s}");
    assert!(
        s["bootstrap"]["live_records"].as_u64() > Some(0),
        "the source wrote while the copy ran: {s}"
    );
    assert_eq!(s["state"], "running", "{s}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_bootstrap_resumes_from_its_stored_progress() {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let src = preloaded_source(seed).await;
    let sink = TestSink::default();
    // The sink fails for good after a few stored bootstrap steps.
    sink.with(|s| {
        s.faults_after = 5;
        s.faults.push_back(Fault::Fatal);
        s.write_delay = Duration::from_millis(20);
    });
    let (st, task) = spawn(bootstrap_config(&src, "resume"), &sink);
    let r = match tokio::time::timeout(Duration::from_secs(60), task).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!(
            "the first run did not stop; status {}, writes {}",
            st.get().to_json(),
            sink.with(|s| s.writes)
        ),
    };
    assert!(r.is_err(), "the injected fatal error stops the first run");
    let Some(PipelineCheckpoint::Bootstrap(p)) = sink.checkpoint() else {
        panic!(
            "the sink stores bootstrap progress, not {:?}",
            sink.checkpoint()
        );
    };
    let chunks_before = p.chunks;
    assert_eq!(p.resumes, 0);
    assert!(chunks_before > 0, "{p:?}");
    let (st, task) =
        bootstrap_while_writing(&src, &sink, seed, bootstrap_config(&src, "resume")).await;
    wait_caught_up(&src, &sink, &st).await;
    let s = st.get().to_json();
    assert!(s["bootstrap"]["resumes"].as_u64() >= Some(1), "{s}");
    assert!(
        s["bootstrap"]["chunks"].as_u64() > Some(chunks_before),
        "the copy went on from chunk {chunks_before}: {s}"
    );
    assert_eq!(sink.with(|s| s.state.clone()), src.state(), "seed {seed}");
    task.abort();
}

/// Runs a bootstrap of `cfg` into a new sink that fails for good after a few stored steps;
/// returns the sink and the checkpoint it holds then (a copy's, naming the trees written).
async fn interrupted_copy(cfg: PipelineConfig) -> (TestSink, serde_json::Value) {
    let sink = TestSink::default();
    sink.with(|s| {
        s.faults_after = 5;
        s.faults.push_back(Fault::Fatal);
    });
    let (st, task) = spawn(cfg, &sink);
    let r = match tokio::time::timeout(Duration::from_secs(60), task).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("the first run did not stop; status {}", st.get().to_json()),
    };
    assert!(r.is_err(), "the injected fatal error stops the first run");
    let bytes = sink
        .with(|s| s.checkpoint.clone())
        .expect("a stored checkpoint");
    assert!(
        matches!(
            PipelineCheckpoint::decode(&bytes),
            Ok(PipelineCheckpoint::Bootstrap(_))
        ),
        "the sink holds a copy's progress"
    );
    (sink, serde_json::from_slice(&bytes).unwrap())
}

/// A copy that cannot resume (here: its progress names another node) starts again from
/// scratch, and the sink is first told which trees the earlier copy wrote (as its checkpoints
/// record them) so that it clears them: a tree dropped at the source meanwhile and rows
/// deleted meanwhile must not stay, though the new copy's chunks never name them. A progress
/// stored by an earlier build records no trees: the sink is told so, or given the pipeline's
/// `trees` when it names some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_cannot_resume_starts_again_after_the_sink_clears_the_earlier_ones_trees() {
    let seed = rand::random::<u64>();
    println!("seed {seed}");
    let src = preloaded_source(seed).await;
    let (sink, mut stored) = interrupted_copy(bootstrap_config(&src, "recopy")).await;
    let written: Vec<String> = serde_json::from_value(stored["trees"].clone()).unwrap();
    assert!(
        written.contains(&"counters".to_string()),
        "trees are copied in name order: {stored}"
    );
    assert!(
        sink.with(|s| s.state.keys().any(|(t, _)| t == "counters")),
        "the partial copy holds `counters`"
    );
    // Meanwhile the source drops a copied tree and deletes rows the sink holds.
    src.engine.drop_tree("counters").unwrap();
    for k in 0..200 {
        src.engine
            .delete("docs", format!("k{k:03}").as_bytes())
            .unwrap();
    }
    stored["bootstrap"]["server_uuid"] = uuid::Uuid::from_bytes([9; 16]).to_string().into();
    sink.with(|s| s.checkpoint = Some(stored.to_string().into_bytes()));
    let (st, task) = spawn(bootstrap_config(&src, "recopy"), &sink);
    wait_caught_up(&src, &sink, &st).await;
    task.abort();
    assert_eq!(
        sink.with(|s| s.begun.clone()),
        [
            EarlierCopy::None,
            EarlierCopy::Trees {
                trees: written,
                prefix: None
            }
        ],
        "a new sink's copy, then the copy begun again over the earlier one's trees"
    );
    assert_eq!(sink.with(|s| s.state.clone()), src.state(), "seed {seed}");
    assert_eq!(st.get().to_json()["bootstrap"]["resumes"], 0);

    // Progress of an earlier build: no trees recorded, no epoch (it cannot resume).
    for (trees, told) in [
        (vec![], EarlierCopy::Unrecorded),
        (
            vec!["docs".to_string()],
            EarlierCopy::Trees {
                trees: vec!["docs".into()],
                prefix: None,
            },
        ),
    ] {
        let mut cfg = bootstrap_config(&src, "earlier");
        cfg.filter.trees.clone_from(&trees);
        let (sink, mut stored) = interrupted_copy(cfg.clone()).await;
        stored.as_object_mut().unwrap().remove("trees");
        stored["bootstrap"]["epoch"] = serde_json::Value::Null;
        sink.with(|s| s.checkpoint = Some(stored.to_string().into_bytes()));
        let (st, task) = spawn(cfg, &sink);
        wait_caught_up(&src, &sink, &st).await;
        task.abort();
        assert_eq!(
            sink.with(|s| s.begun.last().cloned()),
            Some(told),
            "{trees:?}"
        );
        let want: BTreeMap<_, _> = src
            .state()
            .into_iter()
            .filter(|((t, _), _)| trees.is_empty() || trees.contains(t))
            .collect();
        assert_eq!(
            sink.with(|s| s.state.clone()),
            want,
            "{trees:?}, seed {seed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_stops_and_returns_is_followed_without_loss() {
    let mut src = source().await;
    let sink = TestSink::default();
    src.create(&["t"]);
    let (st, task) = spawn(src.config("restart"), &sink);
    src.engine.put("t", b"a", b"1").unwrap();
    wait_caught_up(&src, &sink, &st).await;
    // The server goes away; the pipeline reconnects when it is back.
    if let Some(s) = src.server.take() {
        s.shutdown().await;
    }
    // Meanwhile status shows the source down, with its error, as one outage however many
    // reconnects fail (docs/OPERATIONS.md, "Status"), not `running` with nothing wrong.
    wait_until("status shows the source down", || {
        let s = st.get();
        s.last_error.is_some() && s.state != PipelineState::Running
    })
    .await;
    let down = st.get();
    assert_eq!(down.state, PipelineState::Retrying, "{}", down.to_json());
    assert!(
        down.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with(&format!("source {}", src.addr))),
        "{}",
        down.to_json()
    );
    wait_until("a failed reconnect is counted", || {
        st.get().errors_total >= 2
    })
    .await;
    assert_eq!(st.get().outages_total, 1, "{}", st.get().to_json());
    src.engine.put("t", b"b", b"2").unwrap();
    let cfg = ServerConfig::new(src.addr.parse().unwrap());
    let node = Arc::new(EngineNode::new(
        src.engine.clone(),
        vec![],
        cfg.observer.clone(),
    ));
    let secrets = src._dir.path().join("secrets");
    let mut server = None;
    for _ in 0..100 {
        match tideline_stream::serve(
            cfg.clone(),
            tls::load_server(&secrets).unwrap(),
            node.clone(),
        ) {
            Ok(s) => {
                server = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    src.server = Some(server.expect("the port is free again"));
    wait_caught_up(&src, &sink, &st).await;
    // Once it is back, the outage is over: no error, `running`, still one outage.
    wait_until("status shows the source back", || {
        let s = st.get();
        s.last_error.is_none() && s.state == PipelineState::Running
    })
    .await;
    assert_eq!(st.get().outages_total, 1, "{}", st.get().to_json());
    let src = Arc::new(src);
    assert_exactly_once_in_order(&src, &sink);
    task.abort();
}

/// While the sink fails (`Retry`, or `Hold`) and the source moves on, the status must show the
/// pipeline falling behind: `source_head` follows the source, `lag_txns` counts what the sink
/// has not stored and `lag_seconds` grows (docs/OPERATIONS.md, "Metrics": the alert on a
/// growing `tideline_pipeline_lag_seconds`). Frozen at their values from before the outage (0
/// for a pipeline that was caught up), no alert fires for as long as the sink is down. Once the
/// sink stores again the lag returns to 0, with nothing lost or repeated across the outage.
async fn lag_grows_while_the_sink_fails(fault: Fault) {
    let src = source().await;
    let sink = TestSink::default();
    src.create(&["t"]);
    let (st, task) = spawn(src.config("lag"), &sink);
    src.engine.put("t", b"a", b"1").unwrap();
    wait_caught_up(&src, &sink, &st).await;
    let stored = src.last_offset();
    assert_eq!(st.get().lag_txns, 0, "{}", st.get().to_json());
    // The sink fails every write from now on: the first batch after this is retried for ever.
    sink.with(|s| s.faults.extend(std::iter::repeat_n(fault, 1_000_000)));
    src.engine.put("t", b"b", b"2").unwrap();
    let failing = match fault {
        Fault::Hold => PipelineState::Held,
        _ => PipelineState::Retrying,
    };
    wait_until("the sink's failure shows", || st.get().state == failing).await;
    for i in 0..30 {
        src.engine
            .put("t", format!("c{i}").as_bytes(), b"3")
            .unwrap();
    }
    let head = src.last_offset();
    // Refreshed within a second or two of each change (a heartbeat's interval and the
    // status's refresh); the bound leaves room for a loaded machine.
    let behind = |s: &tideline_connectors::PipelineStatus| {
        s.source_head == head && s.lag_txns == head - stored && s.lag_seconds > 0.0
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !behind(&st.get()) {
        assert!(
            Instant::now() < deadline,
            "{fault:?}: the source is at {head}, the sink stores through {stored}, so {} \
             transactions are not stored, but the status says {}",
            head - stored,
            st.get().to_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still failing, and the lag in seconds keeps growing (the age of the oldest transaction
    // not stored), so an alert on a growing lag fires.
    let earlier = st.get().lag_seconds;
    wait_until("lag_seconds grows while the sink fails", || {
        let s = st.get();
        s.state == failing && s.lag_seconds >= earlier + 1.0
    })
    .await;
    assert_eq!(sink.tail_offset(), Some(stored), "nothing stored meanwhile");
    // The sink recovers: everything is stored once, and the lag is 0 again.
    sink.with(|s| s.faults.clear());
    wait_caught_up(&src, &sink, &st).await;
    wait_until("the status shows the pipeline caught up", || {
        let s = st.get();
        s.state == PipelineState::Running && s.lag_txns == 0 && s.lag_seconds == 0.0
    })
    .await;
    assert_eq!(st.get().source_head, head, "{}", st.get().to_json());
    let src = Arc::new(src);
    assert_exactly_once_in_order(&src, &sink);
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_grows_while_the_sink_is_retried() {
    lag_grows_while_the_sink_fails(Fault::Retry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_grows_while_the_sink_is_held() {
    lag_grows_while_the_sink_fails(Fault::Hold).await;
}

/// While the sink fails, the pipeline reads on from the source (to learn its head) but keeps
/// no more than one batch of what it read: after the outage the batches are no larger than
/// `batch_changes`, and every transaction read ahead is stored once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_read_ahead_while_the_sink_fails_is_one_batch_and_stored_once() {
    let src = source().await;
    let sink = TestSink::default();
    src.create(&["t"]);
    let mut cfg = src.config("ahead");
    cfg.batch_changes = 5;
    let (st, task) = spawn(cfg, &sink);
    src.engine.put("t", b"a", b"1").unwrap();
    wait_caught_up(&src, &sink, &st).await;
    let stored = src.last_offset();
    let before = sink.with(|s| s.batches.len());
    sink.with(|s| {
        s.faults
            .extend(std::iter::repeat_n(Fault::Retry, 1_000_000))
    });
    src.engine.put("t", b"b", b"2").unwrap();
    wait_until("the sink's failure shows", || {
        st.get().state == PipelineState::Retrying
    })
    .await;
    for i in 0..30 {
        src.engine
            .put("t", format!("c{i}").as_bytes(), b"3")
            .unwrap();
    }
    // At least the failing batch and the one read ahead show as lag.
    wait_until("the lag shows what was read ahead", || {
        let s = st.get();
        s.lag_txns > 5 && s.lag_seconds > 0.0
    })
    .await;
    sink.with(|s| s.faults.clear());
    wait_caught_up(&src, &sink, &st).await;
    let batches = sink.with(|s| s.batches[before..].to_vec());
    assert!(batches.iter().all(|&b| b <= 5), "{batches:?}");
    assert_eq!(
        batches.iter().sum::<usize>() as u64,
        src.last_offset() - stored,
        "{batches:?}"
    );
    let src = Arc::new(src);
    assert_exactly_once_in_order(&src, &sink);
    task.abort();
}
