//! `peer-bench replication`: replica catch-up, lag through a chain, and Redis replication
//! beside them, measured in one run on one machine, all on loopback.
//!
//! Every Tideline node runs in this process: engines opened with [`open_engine`] in
//! directories under `--dir`, each served by the real QUIC server ([`tideline_stream::serve`]
//! over an [`EngineNode`]), replicas started with [`replica::spawn`] — the code paths of
//! `tideline serve --upstream`, without a process per node. Redis runs as child processes.
//!
//! Phases:
//! 1. **Catch-up.** A primary (async durability) commits one-put transactions of
//!    `--value-bytes` (random 16-byte keys) from `--load-writers` parallel committers for
//!    `--load-seconds` (its own commit rate), then its log is filled to `--txns` transactions
//!    through upstream apply (transactions of another origin, as a replica receives them:
//!    under async every local commit waits for the interval fsync, so filling by commits would
//!    take minutes). Then an empty replica starts; the time runs from starting its replication task to its
//!    `gtid_executed` equalling the primary's. Once with an async replica, once with a sync one
//!    (acknowledged only after fsync: durable), unless `--no-sync-replica`. A diagnostic
//!    follows: the same log read locally and applied to an empty engine with no network, the
//!    engine's share of catch-up.
//! 2. **Lag.** A chain A→B→C, sync durability everywhere, then async (`--lag-durability`). A
//!    writer paced at `--lag-rate` (a pool of `--lag-writers` committers taking transactions
//!    at their due times) commits on A for `--lag-seconds`; a consumer on each of A, B and C
//!    tails from `latest` and records, for every transaction, receive time minus the commit
//!    timestamp A stamped on it (same clock), so each hop's share shows. Under async each
//!    node shows a record only after its interval fsync, which puts a floor of up to 10 ms per
//!    node under the async chain's lag; the ≤ 5 ms goal is the sync chain's.
//! 3. **Redis** (`redis-server`, `redis-benchmark`, primary and replica on loopback,
//!    `--save "" --appendonly no`, diskless sync without delay, no replica output-buffer limit):
//!    - *live*: replica attached, `redis-benchmark -t set -n N -r N -d B -P 64` on the primary;
//!      rate = N / (load start → replica's `slave_repl_offset` reaches the primary's
//!      `master_repl_offset` read after the load);
//!    - *backlog*: the replica process is stopped (SIGSTOP) while the same load runs, so the
//!      primary holds the whole stream for it; rate = N / (SIGCONT → offsets equal). This is
//!      the measurement that matches Tideline's catch-up: a replica draining a backlog of N;
//!    - *full resync*: the primary holds `--redis-keys` distinct keys; a fresh empty replica
//!      gets `REPLICAOF`; time until `master_link_status:up` and its `DBSIZE` equals the
//!      primary's.
//!
//! 4. **Bootstrap.** A primary loaded with `--bootstrap-small-keys`, then `--bootstrap-keys`,
//!    keys of `--value-bytes` (transactions of 1,000 puts); an empty replica with `--bootstrap
//!    auto` copies it in `--bootstrap-chunk-bytes` chunks (8 MiB); timed from starting its replication task to the end of
//!    the bootstrap. MB/s counts key and value bytes. The small copy is compared with Redis's
//!    full resync of `--redis-keys` keys.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tideline::bench_util::{
    ASYNC_10MS, bar, collect_delays, goal, percentile, print_goals, run_in_dir,
};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use tideline_engine::Engine;
use tideline_stream::{
    Client, ClientConfig, ServerConfig, ServerHandle, ServerSecrets, Start, tls,
};
use tideline_wal::{Durability, Gtid, NewTransaction, Op};

use tideline::node::{EngineNode, open_engine};

mod redis;
use tideline_connectors::{
    self as replica, BootstrapMode, ReplicaOptions, SharedStatus, UpstreamState,
};

/// Arguments of `bench replication`.
#[derive(Debug, Args)]
pub struct ReplBenchArgs {
    /// Directory for the nodes' data, the secrets and Redis; created, and emptied afterwards.
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: PathBuf,
    /// Transactions (one put each) on the primary that an empty replica catches up on.
    #[arg(long, default_value_t = 1_000_000)]
    txns: u64,
    /// Value bytes of each put (Tideline and Redis alike).
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Parallel committers of the primary's own commit-rate measurement (one put each).
    #[arg(long, default_value_t = 8)]
    load_writers: usize,
    /// Seconds the primary's committers run, stopping early at `--txns` (the rest of `--txns`
    /// is filled by upstream apply).
    #[arg(long, default_value_t = 3.0)]
    load_seconds: f64,
    /// Durability of the chain A→B→C in the lag phase: `sync`, `async` (fsync every 10 ms), or
    /// `both` (one chain after the other).
    #[arg(long, default_value = "both", value_parser = ["sync", "async", "both"])]
    lag_durability: String,
    /// Committing threads of the lag phase's paced writer (each commit waits for its
    /// durability, so a rate needs enough of them in flight).
    #[arg(long, default_value_t = 256)]
    lag_writers: usize,
    /// Skip the catch-up of a sync-durability replica.
    #[arg(long)]
    no_sync_replica: bool,
    /// Transactions per second committed on A in the lag phase.
    #[arg(long, default_value_t = 10_000)]
    lag_rate: u64,
    /// Seconds of paced writing in the lag phase.
    #[arg(long, default_value_t = 10.0)]
    lag_seconds: f64,
    /// Keys (of `--value-bytes`) the primary holds for the large bootstrap measurement.
    #[arg(long, default_value_t = 10_000_000)]
    bootstrap_keys: u64,
    /// Keys for the bootstrap compared with Redis's full resync (same count as `--redis-keys`
    /// makes the comparison fair).
    #[arg(long, default_value_t = 1_000_000)]
    bootstrap_small_keys: u64,
    /// Chunk size the bootstrapping replicas ask for.
    #[arg(long, default_value_t = tideline::node::BOOTSTRAP_CHUNK_BYTES_DEFAULT)]
    bootstrap_chunk_bytes: u64,
    /// Skip the bootstrap measurements.
    #[arg(long)]
    no_bootstrap: bool,
    /// Skip the Redis comparison.
    #[arg(long)]
    no_redis: bool,
    /// SETs run on the Redis primary in the live and backlog measurements.
    #[arg(long, default_value_t = 1_000_000)]
    redis_sets: u64,
    /// Distinct keys the Redis primary holds for the full-resync measurement.
    #[arg(long, default_value_t = 1_000_000)]
    redis_keys: u64,
    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// The redis-benchmark binary.
    #[arg(long, default_value = "redis-benchmark")]
    redis_benchmark: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the files written instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// Replicas that catch up from the log (the catch-up and lag phases measure exactly that).
const LOG_ONLY: ReplicaOptions = ReplicaOptions {
    bootstrap: BootstrapMode::Never,
    sources: 1,
    chunk_bytes: 4 << 20,
};

/// Longest wait for any one convergence; a replica that takes longer has failed.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(600);

/// `bench replication`.
pub fn replication(args: &ReplBenchArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.txns > 0, "--txns must be at least 1");
    ensure!(args.load_writers > 0, "--load-writers must be at least 1");
    ensure!(args.lag_rate > 0, "--lag-rate must be at least 1");
    ensure!(args.lag_writers > 0, "--lag-writers must be at least 1");
    ensure!(
        args.load_seconds > 0.0,
        "--load-seconds must be more than zero"
    );
    ensure!(
        args.lag_seconds > 0.0,
        "--lag-seconds must be more than zero"
    );
    run_in_dir(
        &args.dir,
        "replication",
        args.keep,
        args.json,
        |root| run_all(args, root),
        print_table,
    )
}

// ---------------------------------------------------------------------------------------------
// Tideline nodes in this process

/// Cluster secrets shared by every node of the run.
struct Ctx {
    server_secrets: ServerSecrets,
    client_cfg: ClientConfig,
}

impl Ctx {
    fn new(root: &Path) -> anyhow::Result<Ctx> {
        let dir = root.join("secrets");
        tideline_stream::ensure_secrets(&dir)
            .with_context(|| format!("create secrets in {}", dir.display()))?;
        let mut client_cfg = ClientConfig::new(tls::load_client_dir(&dir)?);
        client_cfg.client_name = "bench replication".into();
        Ok(Ctx {
            server_secrets: tls::load_server(&dir)?,
            client_cfg,
        })
    }
}

/// One node: an engine, its server, and its replication task if it has an upstream.
struct BenchNode {
    engine: Arc<Engine>,
    server: ServerHandle,
    addr: String,
    upstream: Option<SharedStatus>,
    /// Stops the replication task (it would go on dialling a stopped upstream).
    replication: Option<tokio::task::AbortHandle>,
}

async fn open(dir: &Path, durability: Durability, read_only: bool) -> anyhow::Result<Arc<Engine>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || open_engine(&dir, durability, read_only))
        .await
        .context("open task failed")?
}

/// Opens a node in `dir`, replicating from `upstream` if given, and serves it on a free port.
async fn start_node(
    ctx: &Ctx,
    dir: &Path,
    durability: Durability,
    upstream: Option<&str>,
) -> anyhow::Result<BenchNode> {
    let engine = open(dir, durability, upstream.is_some()).await?;
    let (upstream, replication) = upstream
        .map(|addr| {
            replica::spawn(
                addr.to_string(),
                ctx.client_cfg.clone(),
                engine.clone(),
                LOG_ONLY,
            )
        })
        .unzip();
    let listen = "127.0.0.1:0".parse().context("parse the listen address")?;
    let cfg = ServerConfig::new(listen);
    let node = Arc::new(EngineNode::new(
        engine.clone(),
        upstream.iter().cloned().collect(),
        cfg.observer.clone(),
    ));
    let server = tideline_stream::serve(cfg, ctx.server_secrets.clone(), node)?;
    let addr = server.local_addr().to_string();
    Ok(BenchNode {
        engine,
        server,
        addr,
        upstream,
        replication,
    })
}

/// Closes the engine and its log (blocking; call outside the runtime's workers).
async fn close_engine(engine: Arc<Engine>) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        engine.close().context("close the engine")?;
        engine.wal().close().context("close the log")
    })
    .await
    .context("close task failed")?
}

impl BenchNode {
    async fn stop(self) -> anyhow::Result<()> {
        if let Some(task) = &self.replication {
            task.abort();
        }
        self.server.shutdown().await;
        close_engine(self.engine).await
    }
}

/// Fails if a replication task stopped on an error that needs an operator.
fn check_upstream(status: Option<&SharedStatus>) -> anyhow::Result<()> {
    if let Some(st) = status {
        let s = st.lock().unwrap_or_else(|p| p.into_inner());
        if s.state == UpstreamState::Error {
            bail!(
                "replication from {} stopped: {}",
                s.addr,
                s.error.as_deref().unwrap_or("unknown error")
            );
        }
    }
    Ok(())
}

/// A key spread over the key space: 16 hex digits of a bijective mix of `i`, so every key is
/// distinct and inserts land at random places, as Redis's `-r` keys do.
fn key(i: u64) -> [u8; 16] {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut out = [0u8; 16];
    for (n, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((z >> (60 - 4 * n)) & 0xf) as usize];
    }
    out
}

/// Runs `work(first, end)` over `0..total` in steps of `step`, from `threads` threads, with a
/// progress bar; returns items per second.
fn load_parallel(
    total: u64,
    threads: usize,
    step: u64,
    work: impl Fn(u64, u64) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<f64> {
    let next = AtomicU64::new(0);
    let pb = bar(total, "loading the primary");
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let first = next.fetch_add(step, Ordering::Relaxed);
                        if first >= total {
                            return Ok(());
                        }
                        let end = (first + step).min(total);
                        work(first, end)?;
                        pb.inc(end - first);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a loading thread panicked"))??;
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// The primary's own commit rate: one-put transactions from `writers` threads for `seconds`
/// (keys 1, 2, ...). Returns (transactions committed, transactions per second).
fn primary_commit_rate(
    engine: &Arc<Engine>,
    writers: usize,
    seconds: f64,
    cap: u64,
    value: &[u8],
) -> anyhow::Result<(u64, f64)> {
    let next = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= cap {
                            break;
                        }
                        engine
                            .put("default", &key(i + 1), value)
                            .context("commit on the primary")?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a committing thread panicked"))??;
        }
        Ok(())
    })?;
    let done = next.load(Ordering::Relaxed).min(cap);
    Ok((done, done as f64 / started.elapsed().as_secs_f64()))
}

/// Fills the primary's log up to `txns` one-put transactions (keys `from + 1` on) as a
/// replica would receive them: transactions of one other origin handed to
/// `apply_upstream_batch` in groups of ~256 KiB. A replica catching up reads them exactly as
/// it reads the primary's own, and the fill takes the same time whatever the primary's own
/// commit rate was.
fn fill_primary(engine: &Arc<Engine>, from: u64, txns: u64, value: &[u8]) -> anyhow::Result<f64> {
    let origin = uuid::Uuid::new_v4();
    let group = ((256usize << 10) / (value.len() + 64)).max(1) as u64;
    load_parallel(txns.saturating_sub(from), 2, group, |first, end| {
        let batch = (first..end)
            .map(|i| -> anyhow::Result<NewTransaction> {
                Ok(NewTransaction {
                    gtid: Gtid::new(origin, i + 1).context("bench GTID")?,
                    timestamp_us: 0,
                    ops: vec![Op::Put {
                        tree: "default".into(),
                        key: key(from + i + 1).to_vec(),
                        value: value.to_vec(),
                        before: None,
                    }],
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        engine
            .apply_upstream_batch(batch)
            .context("fill the primary's log")?;
        Ok(())
    })
}

/// A runtime used from inside another one: dropping it there must not block, so it is shut
/// down in the background, on every path out of the function that owns it.
struct SideRuntime(Option<tokio::runtime::Runtime>);

impl SideRuntime {
    fn new() -> anyhow::Result<SideRuntime> {
        Ok(SideRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("bench-replica")
                .build()
                .context("start the replica's runtime")?,
        )))
    }

    /// Starts replicating from `addr` into `engine` on this runtime; the task ends with it.
    fn replicate(
        &self,
        ctx: &Ctx,
        addr: &str,
        engine: &Arc<Engine>,
        opts: ReplicaOptions,
    ) -> SharedStatus {
        let _entered = self.0.as_ref().map(|r| r.enter());
        replica::spawn(
            addr.to_string(),
            ctx.client_cfg.clone(),
            engine.clone(),
            opts,
        )
        .0
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

fn durability_label(d: Durability) -> &'static str {
    match d {
        Durability::Sync => "sync",
        Durability::Async { .. } => "async",
    }
}

/// Starts an empty replica of `primary` and times it until its `gtid_executed` equals the
/// primary's.
async fn catch_up(
    ctx: &Ctx,
    dir: &Path,
    primary: &BenchNode,
    durability: Durability,
) -> anyhow::Result<Value> {
    let engine = open(dir, durability, true).await?;
    let want = primary.engine.gtid_executed();
    let total = primary.engine.position().offset.map_or(0, |o| o.get());
    let label = durability_label(durability);
    let pb = bar(total, &format!("catch-up, {label} replica"));
    // The replication task runs on a runtime of its own, shut down after the measurement:
    // that ends the task and releases the engine, so its store's background work (flushes,
    // compactions) does not run on into the next phases.
    let rt = SideRuntime::new()?;
    let started = Instant::now();
    let status = rt.replicate(ctx, &primary.addr, &engine, LOG_ONLY);
    loop {
        if engine.gtid_executed() == want {
            break;
        }
        check_upstream(Some(&status))?;
        ensure!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the {label} replica did not catch up within {CONVERGE_TIMEOUT:?}"
        );
        pb.set_position(engine.position().offset.map_or(0, |o| o.get()));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let applied = engine.position().offset.map_or(0, |o| o.get());
    ensure!(
        applied == total,
        "the replica applied {applied} transactions, the primary has {total}"
    );
    close_engine(engine).await?;
    drop(rt);
    Ok(json!({
        "durability": label,
        "transactions": total,
        "seconds": secs,
        "txns_per_s": (total as f64 / secs).round(),
    }))
}

/// Loads `keys` puts of `value` on `engine` in transactions of 1,000 from two threads.
fn load_batched(engine: &Arc<Engine>, keys: u64, value: &[u8]) -> anyhow::Result<f64> {
    load_parallel(keys, 2, 1_000, |first, end| {
        engine
            .transaction(|tx| {
                for i in first..end {
                    tx.put("default", &key(i), value)?;
                }
                Ok(())
            })
            .context("commit on the primary")?;
        Ok(())
    })
}

/// A primary holding `keys` keys, and an empty replica bootstrapping from it: timed from
/// starting the replication task to the end of the bootstrap (state copied, `gtid_executed`
/// equal to the primary's).
async fn bootstrap_copy(
    ctx: &Ctx,
    root: &Path,
    name: &str,
    keys: u64,
    value_bytes: usize,
    chunk_bytes: u64,
) -> anyhow::Result<Value> {
    let primary = start_node(ctx, &root.join(format!("{name}-primary")), ASYNC_10MS, None).await?;
    eprintln!("bootstrap: loading {keys} keys of {value_bytes} B ...");
    let (engine, value) = (primary.engine.clone(), vec![0x42u8; value_bytes]);
    let load_rate = tokio::task::spawn_blocking(move || load_batched(&engine, keys, &value))
        .await
        .context("load task failed")??;
    // Under async durability the load's last commits were acknowledged before they were
    // shown: the copy is of everything loaded.
    let e = primary.engine.clone();
    let shown = tokio::task::spawn_blocking(move || e.wait_all_visible(Duration::from_secs(60)))
        .await
        .context("wait task failed")??;
    ensure!(shown, "the primary did not show its load within 60 s");
    let want = primary.engine.gtid_executed();
    // The primary's store settles before the copy (flushed, compactions done), as a node that
    // has held its data a while would be, and as Redis's primary is: the copy is measured,
    // not the load's aftermath.
    let e = primary.engine.clone();
    tokio::task::spawn_blocking(move || e.checkpoint())
        .await
        .context("checkpoint task failed")??;
    let settle = Instant::now();
    let mut quiet_since = Instant::now();
    while settle.elapsed() < Duration::from_secs(120) {
        let st = primary.engine.store_stats();
        if st.active_compactions > 0 || st.outstanding_flushes > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let user_bytes = keys * (16 + value_bytes as u64);
    eprintln!("bootstrap: an empty replica copies {keys} keys ...");
    let rt = SideRuntime::new()?;
    let engine = open(&root.join(format!("{name}-replica")), ASYNC_10MS, true).await?;
    let pb = bar(user_bytes, "bootstrap (bytes)");
    let started = Instant::now();
    let opts = ReplicaOptions {
        bootstrap: BootstrapMode::Auto,
        chunk_bytes,
        ..LOG_ONLY
    };
    let status = rt.replicate(ctx, &primary.addr, &engine, opts);
    let progress = loop {
        let (state, progress) = {
            let s = status.lock().unwrap_or_else(|p| p.into_inner());
            (s.state, s.bootstrap.clone())
        };
        if state == UpstreamState::Connected && engine.gtid_executed() == want {
            break progress.unwrap_or(Value::Null);
        }
        check_upstream(Some(&status))?;
        ensure!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the replica did not bootstrap within {CONVERGE_TIMEOUT:?}"
        );
        if let Some(b) = progress.as_ref().and_then(|p| p["bytes"].as_u64()) {
            pb.set_position(b);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    close_engine(engine).await?;
    drop(rt);
    primary.stop().await?;
    Ok(json!({
        "keys": keys,
        "value_bytes": value_bytes,
        "user_bytes": user_bytes,
        "load_puts_per_s": load_rate.round(),
        "seconds": secs,
        "mb_per_s": (user_bytes as f64 / secs / 1e6 * 10.0).round() / 10.0,
        "keys_per_s": (keys as f64 / secs).round(),
        "chunks": progress["chunks"],
        "chunk_bytes": chunk_bytes,
    }))
}

/// The engine side of catch-up alone: the primary's log read locally and applied to an empty
/// async engine with [`Engine::apply_upstream_batch`] as the replication task applies it:
/// a reader thread hands over batches like the stream's (about 256 KiB, up to 64 queued)
/// while the engine applies, and each call takes every batch that arrived, up to 16,384
/// transactions (`connectors/src/replica.rs`). No network, no QUIC, no decoding of frames
/// from the wire: what remains when the transport costs nothing. (Applying one 256 KiB batch
/// at a time would measure the log's sync interval instead: the applier sees records only once
/// durable, so each batch waits for the next 10 ms sync.)
fn apply_only(primary: &Engine, dir: &Path) -> anyhow::Result<Value> {
    const GROUP_TXNS_MAX: usize = 16_384;
    let engine = open_engine(dir, ASYNC_10MS, true)?;
    let wal = primary.wal();
    let total = wal.visible_offset();
    let pb = bar(total, "apply only, async engine");
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<tideline_wal::NewTransaction>>(64);
    let mut applied = 0u64;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let reader = s.spawn(move || -> anyhow::Result<()> {
            let mut reader = wal
                .read_from(tideline_wal::Offset::FIRST)
                .context("read the primary's log")?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            loop {
                let txn = reader.next_txn().context("read the primary's log")?;
                let end = txn.is_none();
                if let Some(t) = txn {
                    bytes += 48
                        + t.ops
                            .iter()
                            .map(|op| match op {
                                tideline_wal::Op::Put { key, value, .. } => {
                                    key.len() + value.len() + 16
                                }
                                _ => 32,
                            })
                            .sum::<usize>();
                    batch.push(tideline_wal::NewTransaction {
                        gtid: t.gtid,
                        timestamp_us: t.timestamp_us,
                        ops: t.ops,
                    });
                }
                if (end || bytes >= 256 << 10) && !batch.is_empty() {
                    if tx.send(std::mem::take(&mut batch)).is_err() {
                        // The applying side stopped on an error of its own.
                        return Ok(());
                    }
                    bytes = 0;
                }
                if end {
                    return Ok(());
                }
            }
        });
        // Owned here, so that an error return drops it and a reader blocked on a full channel
        // wakes and ends before the scope joins it.
        let rx = rx;
        while let Ok(mut batch) = rx.recv() {
            while batch.len() < GROUP_TXNS_MAX {
                match rx.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            engine
                .apply_upstream_batch(batch)
                .context("apply a batch")?;
            applied += n;
            pb.inc(n);
        }
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the log reader thread panicked"))?
    })?;
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ensure!(
        applied == total,
        "applied {applied} transactions, the primary's log holds {total}"
    );
    engine.close().context("close the engine")?;
    engine.wal().close().context("close the log")?;
    Ok(json!({
        "transactions": applied,
        "seconds": secs,
        "txns_per_s": (applied as f64 / secs).round(),
    }))
}

/// Chain A→B→C of `durability`; a paced writer on A; a consumer on each node records
/// commit-on-A to receipt for every transaction (per hop: A's own tail, then B, then C).
async fn chain_lag(
    ctx: &Ctx,
    root: &Path,
    args: &ReplBenchArgs,
    durability: Durability,
) -> anyhow::Result<Value> {
    let label = durability_label(durability);
    let dir = |n: &str| root.join(format!("chain-{label}-{n}"));
    let a = start_node(ctx, &dir("a"), durability, None).await?;
    let b = start_node(ctx, &dir("b"), durability, Some(&a.addr)).await?;
    let c = start_node(ctx, &dir("c"), durability, Some(&b.addr)).await?;

    // One transaction through the whole chain proves every link is up before timing starts.
    let ea = a.engine.clone();
    let first = tokio::task::spawn_blocking(move || ea.put("default", b"chain-ready", b"1"))
        .await
        .context("write task failed")?
        .context("commit on A")?;
    let started = Instant::now();
    while !c.engine.gtid_executed().contains(&first.gtid) {
        check_upstream(b.upstream.as_ref())?;
        check_upstream(c.upstream.as_ref())?;
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the chain A→B→C did not deliver its first transaction within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let count = ((args.lag_rate as f64 * args.lag_seconds).round() as u64).max(1);
    // A consumer on every node shows where the delay accrues; the goal is C's.
    let mut consumers = Vec::new();
    for node in [&a, &b, &c] {
        consumers.push(lag_consumer(&node.addr, ctx.client_cfg.clone(), count).await?);
    }
    let (ea, rate, value, writers) = (
        a.engine.clone(),
        args.lag_rate,
        vec![0x6cu8; args.value_bytes],
        args.lag_writers,
    );
    let pb = bar(count, &format!("paced writes on A ({label})"));
    // Transaction i is due at (i - 1) / rate after the start; a pool of committers takes
    // them in order, so that the rate holds although each commit waits for its durability
    // (under async up to the fsync interval: README, "Durability").
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let next = AtomicU64::new(1);
        let started = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let handles: Vec<_> = (0..writers)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i > count {
                                return Ok(());
                            }
                            let due =
                                started + Duration::from_secs_f64((i - 1) as f64 / rate as f64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                            ea.put("default", &key(i), &value).context("commit on A")?;
                            pb.inc(1);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a paced writer panicked"))??;
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        Ok(count as f64 / started.elapsed().as_secs_f64())
    });
    let achieved = writer.await.context("writer task failed")??;
    let mut lats = Vec::new();
    for (name, consumer) in ["A", "B", "C"].into_iter().zip(consumers) {
        let lat = tokio::time::timeout(Duration::from_secs(120), consumer)
            .await
            .with_context(|| {
                format!("{name} did not deliver every transaction within 120 s of the last commit")
            })?
            .context("consumer task failed")??;
        lats.push(lat_summary(lat));
    }
    let [at_a, at_b, at_c]: [Value; 3] = lats
        .try_into()
        .map_err(|_| anyhow::anyhow!("internal: one summary per node"))?;

    c.stop().await?;
    b.stop().await?;
    a.stop().await?;

    Ok(json!({
        "durability": label,
        "writers": args.lag_writers,
        "target_rate_per_s": args.lag_rate,
        "achieved_rate_per_s": achieved.round(),
        "at_a": at_a,
        "at_b": at_b,
        "at_c": at_c,
    }))
}

/// Subscribes to `addr` from `latest` and collects, for `count` transactions, receive time
/// minus the origin's commit timestamp, in microseconds.
async fn lag_consumer(
    addr: &str,
    cfg: ClientConfig,
    count: u64,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<i64>>>> {
    let client = Client::connect(addr, cfg)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let mut sub = client
        .subscribe(Start::Latest, None, None, None)
        .await
        .with_context(|| format!("subscribe to {addr} from latest"))?;
    Ok(tokio::spawn(async move {
        let lat = collect_delays(&mut sub, count).await?;
        drop(sub);
        client.close().await;
        Ok(lat)
    }))
}

/// Percentiles of one consumer's delays; the first 1% (connections and caches warming up) is
/// left out.
fn lat_summary(mut lat: Vec<i64>) -> Value {
    let received = lat.len();
    let warmup = received / 100;
    let mut sample = lat.split_off(warmup);
    sample.sort_unstable();
    json!({
        "transactions": received,
        "warmup_left_out": warmup,
        "p50_us": percentile(&sample, 0.50),
        "p90_us": percentile(&sample, 0.90),
        "p99_us": percentile(&sample, 0.99),
        "p999_us": percentile(&sample, 0.999),
        "max_us": sample.last().copied().unwrap_or(0),
    })
}

/// Phases 1 and 2, on one multi-threaded runtime.
async fn tideline(args: &ReplBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let ctx = Ctx::new(root)?;
    let primary = start_node(&ctx, &root.join("primary"), ASYNC_10MS, None).await?;
    eprintln!(
        "primary: {} committers of one-put transactions of {} B for {:.1} s, async durability ...",
        args.load_writers, args.value_bytes, args.load_seconds
    );
    let (engine, value, writers, seconds, cap) = (
        primary.engine.clone(),
        vec![0x42u8; args.value_bytes],
        args.load_writers,
        args.load_seconds,
        args.txns,
    );
    let (committed, load_rate) = tokio::task::spawn_blocking(move || {
        primary_commit_rate(&engine, writers, seconds, cap, &value)
    })
    .await
    .context("commit task failed")??;
    eprintln!(
        "filling the primary's log to {} transactions (upstream apply of another origin) ...",
        args.txns
    );
    let (engine, txns, value) = (
        primary.engine.clone(),
        args.txns,
        vec![0x42u8; args.value_bytes],
    );
    tokio::task::spawn_blocking(move || fill_primary(&engine, committed, txns, &value))
        .await
        .context("fill task failed")??;
    // The whole log durable (the 10 ms fsync has run) before any replica reads it.
    let wal = primary.engine.wal().clone();
    while wal.durable_offset() < wal.written_offset() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    eprintln!("catch-up: an empty async replica ...");
    let async_catch_up = catch_up(&ctx, &root.join("replica-async"), &primary, ASYNC_10MS).await?;
    let sync_catch_up = if args.no_sync_replica {
        Value::Null
    } else {
        eprintln!("catch-up: an empty sync replica ...");
        catch_up(&ctx, &root.join("replica-sync"), &primary, Durability::Sync).await?
    };
    eprintln!("catch-up diagnostic: the same log applied locally, no network ...");
    let (engine, dir) = (primary.engine.clone(), root.join("apply-only"));
    let apply_only = tokio::task::spawn_blocking(move || apply_only(&engine, &dir))
        .await
        .context("apply task failed")??;
    primary.stop().await?;

    let mut lag = serde_json::Map::new();
    for (name, durability) in [("sync", Durability::Sync), ("async", ASYNC_10MS)] {
        if args.lag_durability != "both" && args.lag_durability != name {
            continue;
        }
        eprintln!(
            "lag: chain A→B→C, {} txn/s for {:.1} s, {name} durability ...",
            args.lag_rate, args.lag_seconds
        );
        lag.insert(name.into(), chain_lag(&ctx, root, args, durability).await?);
    }
    let (boot_large, boot_small) = if args.no_bootstrap {
        (Value::Null, Value::Null)
    } else {
        let small = bootstrap_copy(
            &ctx,
            root,
            "boot-small",
            args.bootstrap_small_keys,
            args.value_bytes,
            args.bootstrap_chunk_bytes,
        )
        .await?;
        let large = bootstrap_copy(
            &ctx,
            root,
            "boot-large",
            args.bootstrap_keys,
            args.value_bytes,
            args.bootstrap_chunk_bytes,
        )
        .await?;
        (large, small)
    };
    Ok(json!({
        "bootstrap_large": boot_large,
        "bootstrap_small": boot_small,
        "load_txns_per_s": load_rate.round(),
        "catch_up_async": async_catch_up,
        "catch_up_sync": sync_catch_up,
        "apply_only_async": apply_only,
        "chain_lag": Value::Object(lag),
    }))
}

// ---------------------------------------------------------------------------------------------
// The run

fn run_all(args: &ReplBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bench-repl")
        .build()
        .context("start the async runtime")?;
    let t = runtime.block_on(tideline(args, root));
    // Replication tasks still waiting on closed upstreams end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let t = t?;

    let redis = if args.no_redis {
        json!({ "skipped": "--no-redis" })
    } else {
        match redis::redis(args, root) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("!!! SKIPPED: Redis replication comparison: {e:#}");
                json!({ "skipped": format!("{e:#}") })
            }
        }
    };

    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let async_rate = f(&t["catch_up_async"]["txns_per_s"]);
    let sync_rate = f(&t["catch_up_sync"]["txns_per_s"]);
    let mut goals = vec![
        goal(
            &format!("primary, {} committers, async", args.load_writers),
            f(&t["load_txns_per_s"]),
            250_000.0,
            "txn/s",
            true,
        ),
        goal(
            "catch-up, async replica",
            async_rate,
            300_000.0,
            "txn/s",
            true,
        ),
    ];
    // The lag goal is the sync chain's: under async every node shows a transaction only
    // after its own interval fsync (README, "Durability"), up to 10 ms per node by design, so
    // the async chain is printed, not held to the goal.
    if !t["chain_lag"]["sync"].is_null() {
        let p99 = f(&t["chain_lag"]["sync"]["at_c"]["p99_us"]) / 1e3;
        goals.push(goal("chain A→B→C lag p99 (sync)", p99, 5.0, "ms", false));
    }
    if !t["catch_up_sync"].is_null() {
        goals.insert(
            1,
            goal(
                "catch-up, sync replica",
                sync_rate,
                300_000.0,
                "txn/s",
                true,
            ),
        );
    }
    if !t["bootstrap_large"].is_null() {
        goals.push(goal(
            "bootstrap, large state",
            f(&t["bootstrap_large"]["mb_per_s"]),
            200.0,
            "MB/s",
            true,
        ));
    }
    let mut bootstrap_vs_full_resync = Value::Null;
    if redis["skipped"].is_null() && !t["bootstrap_small"].is_null() {
        let ratio = f(&redis["full_resync"]["seconds"]) / f(&t["bootstrap_small"]["seconds"]);
        bootstrap_vs_full_resync = json!(ratio);
        goals.push(goal(
            "bootstrap speed-up over Redis full resync",
            ratio,
            2.0,
            "x",
            true,
        ));
    }
    let mut ratios = Value::Null;
    if redis["skipped"].is_null() {
        let live = f(&redis["live"]["sets_per_s"]);
        let backlog = f(&redis["backlog"]["sets_per_s"]);
        // "While durable": the sync replica, when it ran.
        let (durable_rate, which) = if t["catch_up_sync"].is_null() {
            (async_rate, "async")
        } else {
            (sync_rate, "sync")
        };
        ratios = json!({
            "durable_replica": which,
            "catch_up_async_vs_redis_live": async_rate / live,
            "catch_up_async_vs_redis_backlog": async_rate / backlog,
            "catch_up_durable_vs_redis_live": durable_rate / live,
            "catch_up_durable_vs_redis_backlog": durable_rate / backlog,
        });
        goals.push(goal(
            &format!("catch-up ({which}) / Redis live"),
            durable_rate / live,
            1.0,
            "x",
            true,
        ));
        goals.push(goal(
            &format!("catch-up ({which}) / Redis backlog"),
            durable_rate / backlog,
            1.0,
            "x",
            true,
        ));
    }

    Ok(json!({
        "txns": args.txns,
        "value_bytes": args.value_bytes,
        "load_writers": args.load_writers,
        "nodes": "in-process: engines + QUIC servers + replication tasks on loopback",
        "load_txns_per_s": t["load_txns_per_s"],
        "catch_up_async": t["catch_up_async"],
        "catch_up_sync": t["catch_up_sync"],
        "apply_only_async": t["apply_only_async"],
        "chain_lag": t["chain_lag"],
        "redis": redis,
        "ratios": ratios,
        "bootstrap_large": t["bootstrap_large"],
        "bootstrap_small": t["bootstrap_small"],
        "bootstrap_vs_full_resync": bootstrap_vs_full_resync,
        "goals": goals,
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "peer-bench replication ({} transactions of one {} B put, loopback, {})",
        r["txns"],
        r["value_bytes"],
        r["nodes"].as_str().unwrap_or("")
    );
    println!(
        "  primary, {:>2} committers         {:>12.0} txn/s   (one put each, async durability)",
        r["load_writers"],
        f(&r["load_txns_per_s"])
    );
    for key in ["catch_up_async", "catch_up_sync"] {
        let c = &r[key];
        if c.is_null() {
            continue;
        }
        println!(
            "  catch-up, empty {:<5} replica   {:>12.0} txn/s   ({:.2} s)",
            c["durability"].as_str().unwrap_or("?"),
            f(&c["txns_per_s"]),
            f(&c["seconds"])
        );
    }
    println!(
        "  apply only (no network), async  {:>12.0} txn/s   ({:.2} s; diagnostic: the engine side of catch-up)",
        f(&r["apply_only_async"]["txns_per_s"]),
        f(&r["apply_only_async"]["seconds"])
    );
    for (name, l) in r["chain_lag"].as_object().into_iter().flatten() {
        println!(
            "  chain A→B→C, {name} durability, paced writer on A at {} txn/s ({:.0} achieved, {} committers):",
            l["target_rate_per_s"],
            f(&l["achieved_rate_per_s"]),
            l["writers"]
        );
        for (key, what) in [
            ("at_a", "commit on A → tail of A"),
            ("at_b", "commit on A → tail of B"),
            ("at_c", "commit on A → tail of C"),
        ] {
            let x = &l[key];
            println!(
                "    {what:<28} p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  max {:>8.3} ms",
                f(&x["p50_us"]) / 1e3,
                f(&x["p99_us"]) / 1e3,
                f(&x["p999_us"]) / 1e3,
                f(&x["max_us"]) / 1e3,
            );
        }
    }
    let redis = &r["redis"];
    match redis["skipped"].as_str() {
        Some(why) => println!("  Redis replication               SKIPPED: {why}"),
        None => {
            println!(
                "  Redis {:<7} live, attached    {:>12.0} SET/s   ({} SETs: load {:.2} s, replica caught up at {:.2} s; redis-benchmark {:.0}/s)",
                redis["version"].as_str().unwrap_or("?"),
                f(&redis["live"]["sets_per_s"]),
                redis["sets"],
                f(&redis["live"]["load_seconds"]),
                f(&redis["live"]["seconds_to_replica_caught_up"]),
                f(&redis["live"]["benchmark_sets_per_s"])
            );
            println!(
                "  Redis backlog drain (SIGSTOP)   {:>12.0} SET/s   ({:.2} s, {} MiB of stream)",
                f(&redis["backlog"]["sets_per_s"]),
                f(&redis["backlog"]["seconds"]),
                redis["backlog"]["backlog_bytes"].as_u64().unwrap_or(0) >> 20
            );
            println!(
                "  Redis full resync               {:>12.3} s       ({} keys, {} full sync)",
                f(&redis["full_resync"]["seconds"]),
                redis["full_resync"]["keys"],
                redis["full_resync"]["full_syncs"]
            );
            let x = &r["ratios"];
            println!(
                "  catch-up / Redis                async {:.2}x live, {:.2}x backlog; {} {:.2}x live, {:.2}x backlog",
                f(&x["catch_up_async_vs_redis_live"]),
                f(&x["catch_up_async_vs_redis_backlog"]),
                x["durable_replica"].as_str().unwrap_or("?"),
                f(&x["catch_up_durable_vs_redis_live"]),
                f(&x["catch_up_durable_vs_redis_backlog"])
            );
        }
    }
    for key in ["bootstrap_small", "bootstrap_large"] {
        let b = &r[key];
        if b.is_null() {
            continue;
        }
        println!(
            "  bootstrap, empty replica        {:>12.1} MB/s    ({} keys of {} B in {:.2} s, {} chunks, {:.0} keys/s)",
            f(&b["mb_per_s"]),
            b["keys"],
            b["value_bytes"],
            f(&b["seconds"]),
            b["chunks"],
            f(&b["keys_per_s"])
        );
    }
    if let Some(x) = r["bootstrap_vs_full_resync"].as_f64() {
        println!("  bootstrap / Redis full resync   {x:>12.2}x faster");
    }
    print_goals(r);
}
