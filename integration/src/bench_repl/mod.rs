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
use tideline::bench_util::{ASYNC_10MS, bar, run_in_dir};

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use tideline_engine::Engine;
use tideline_stream::{ClientConfig, ServerConfig, ServerHandle, ServerSecrets, tls};
use tideline_wal::Durability;

use tideline::node::{EngineNode, open_engine};

mod bootstrap;
mod catch_up;
mod chain_lag;
mod redis;
mod report;

use bootstrap::bootstrap_copy;
use catch_up::{apply_only, catch_up, fill_primary, primary_commit_rate};
use chain_lag::chain_lag;
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
    /// Chunks the serving node keeps sent and not yet stored (`serve
    /// --bootstrap-chunks-in-flight`): 1, the default, or 2.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=2))]
    bootstrap_chunks_in_flight: u64,
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
        report::print_table,
    )
}

// ---------------------------------------------------------------------------------------------
// Tideline nodes in this process

/// Cluster secrets shared by every node of the run.
struct Ctx {
    server_secrets: ServerSecrets,
    client_cfg: ClientConfig,
    /// `ServerConfig::bootstrap_chunks_in_flight` of every node.
    bootstrap_chunks_in_flight: u64,
}

impl Ctx {
    fn new(root: &Path, bootstrap_chunks_in_flight: u64) -> anyhow::Result<Ctx> {
        let dir = root.join("secrets");
        tideline_stream::ensure_secrets(&dir)
            .with_context(|| format!("create secrets in {}", dir.display()))?;
        let mut client_cfg = ClientConfig::new(tls::load_client_dir(&dir)?);
        client_cfg.client_name = "bench replication".into();
        Ok(Ctx {
            server_secrets: tls::load_server(&dir)?,
            client_cfg,
            bootstrap_chunks_in_flight,
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
    let mut cfg = ServerConfig::new(listen);
    cfg.bootstrap_chunks_in_flight = ctx.bootstrap_chunks_in_flight;
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

/// Phases 1 and 2, on one multi-threaded runtime.
async fn tideline(args: &ReplBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let ctx = Ctx::new(root, args.bootstrap_chunks_in_flight)?;
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
    // The whole log durable (the 10 ms fsync has run) and applied before any replica reads
    // it: the committers' last commits were acknowledged once written, and the replicas are
    // timed until they hold the primary's `gtid_executed`, which must then be all of it.
    let e = primary.engine.clone();
    let shown = tokio::task::spawn_blocking(move || e.wait_all_visible(Duration::from_secs(60)))
        .await
        .context("wait task failed")??;
    ensure!(shown, "the primary did not show its load within 60 s");

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

    Ok(report::summary(args, &t, redis))
}
