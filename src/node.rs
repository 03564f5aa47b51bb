//! The node: engine + log + QUIC server, and `tideline serve`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tideline_engine::{Engine, EngineOptions, ReadError, Snapshot, WriteError};
use tideline_stream::server::Rows;
use tideline_stream::{BootstrapView, ErrorCode, Node, NodeError, ServerConfig, WriteOp};
use tideline_wal::{Durability, Epoch, Gtid, GtidSet, Offset, RetentionPolicy, Wal, WalOptions};

use crate::DurabilityArg;
use crate::log_cmd::open_log_with;
use crate::replica::{self, SharedStatus};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (log in DATA/log, state store in DATA/store).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// UDP address for the QUIC stream and KV protocol.
    #[arg(long, default_value = "127.0.0.1:7400", value_name = "ADDR")]
    listen: SocketAddr,
    /// Secrets directory (CA, certificate, token); created on first start. Default DATA/secrets.
    #[arg(long, value_name = "DIR")]
    secrets: Option<PathBuf>,
    /// `sync`: acknowledge after fsync (default). `async`: after write, fsync every 10 ms.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    durability: DurabilityArg,
    /// Refuse local writes. Implied by --upstream unless --allow-local-writes is given.
    #[arg(long)]
    read_only: bool,
    /// Replicate from this node (repeat for a multi-source merge). Positions are found by
    /// GTID auto-positioning; no offsets or file names are configured.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Vec<String>,
    /// Accept client writes even with --upstream (they become errant on the upstream side).
    #[arg(long)]
    allow_local_writes: bool,
    /// `auto`: an empty replica, or one whose upstream purged GTIDs it needs, copies the
    /// upstream's state in resumable chunks while tailing its log (single upstream only).
    /// `never`: catch up from the upstream's log only.
    #[arg(long, value_enum, default_value_t = replica::BootstrapMode::Auto)]
    bootstrap: replica::BootstrapMode,
    /// Size of the chunks a bootstrap asks for (the upstream keeps it within 16 KiB..8 MiB).
    /// A killed replica re-fetches at most one chunk.
    #[arg(long, default_value_t = BOOTSTRAP_CHUNK_BYTES_DEFAULT, value_name = "BYTES")]
    bootstrap_chunk_bytes: u64,
    /// Size at which the log starts a new segment file (retention removes whole segments).
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(4096..=(1 << 40)))]
    log_segment_bytes: u64,
    /// Log kept for consumers without a slot, in bytes; older segments go once no slot needs
    /// them (checked every 10 s). A replica needing purged GTIDs bootstraps instead.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    log_retain_bytes: u64,
    /// Longest key accepted, in bytes (at most 65535, the store's limit).
    #[arg(long, default_value_t = 65_535, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    key_bytes_max: u32,
    /// Longest value accepted, in bytes (at most 16 MiB, what one protocol message carries).
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    value_bytes_max: u32,
}

/// Chunk size a bootstrapping replica asks for by default.
pub const BOOTSTRAP_CHUNK_BYTES_DEFAULT: u64 = 8 << 20;

/// The engine seen through the stream server's [`Node`] trait.
pub struct EngineNode {
    engine: Arc<Engine>,
    wal: Arc<Wal>,
    started: Instant,
    upstreams: Vec<SharedStatus>,
    /// Bootstrap chunks served to replicas, and their bytes.
    chunks_served: AtomicU64,
    chunk_bytes_served: AtomicU64,
}

/// A snapshot of the engine, as the server's bootstrap reads it.
struct EngineView {
    snap: Snapshot,
    epoch: Epoch,
    estimate: (u64, u64),
}

impl BootstrapView for EngineView {
    fn offset(&self) -> u64 {
        self.snap.offset().map_or(0, Offset::get)
    }

    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn gtid_executed(&self) -> GtidSet {
        self.snap.gtid_executed().clone()
    }

    fn trees(&self) -> Vec<(String, Option<String>)> {
        let mut trees: Vec<(String, Option<String>)> = self
            .snap
            .trees()
            .into_iter()
            .map(|t| (t.name, t.merge_operator.map(|m| m.name().to_string())))
            .collect();
        trees.sort();
        trees
    }

    fn estimate(&self) -> (u64, u64) {
        self.estimate
    }

    fn chunk(
        &self,
        tree: &str,
        from: &[u8],
        bytes_max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let scan = match self.snap.range(tree, from.., false) {
            Err(ReadError::UnknownTree(_)) => return Ok(None),
            other => other.map_err(read_err)?,
        };
        for kv in scan {
            let (k, v) = kv.map_err(read_err)?;
            let size = 8 + k.len() + v.len();
            if !out.is_empty() && out.len() + size > bytes_max {
                return Ok(Some(k));
            }
            tideline_stream::proto::pack_entry(out, &k, &v);
        }
        Ok(None)
    }
}

fn read_err(e: ReadError) -> NodeError {
    match e {
        ReadError::UnknownTree(_) => NodeError::new(ErrorCode::InvalidRequest, e.to_string()),
        other => NodeError::new(ErrorCode::Internal, other.to_string()),
    }
}

fn write_err(e: WriteError) -> NodeError {
    let code = if e.is_retryable() {
        ErrorCode::Conflict
    } else {
        match &e {
            WriteError::ReadOnly => ErrorCode::ReadOnly,
            WriteError::FailStop { .. } | WriteError::Bootstrapping => ErrorCode::Unavailable,
            WriteError::KeyTooLarge { .. }
            | WriteError::ValueTooLarge { .. }
            | WriteError::TooLarge { .. } => ErrorCode::TooLarge,
            WriteError::Log(_) | WriteError::Read(_) => ErrorCode::Internal,
            _ => ErrorCode::InvalidRequest,
        }
    };
    NodeError::new(code, e.to_string())
}

impl EngineNode {
    /// Wraps an open engine.
    pub fn new(engine: Arc<Engine>, upstreams: Vec<SharedStatus>) -> Self {
        let wal = engine.wal().clone();
        EngineNode {
            engine,
            wal,
            started: Instant::now(),
            upstreams,
            chunks_served: AtomicU64::new(0),
            chunk_bytes_served: AtomicU64::new(0),
        }
    }

    /// The status document (`tideline status`, `/api/status`).
    pub fn status(&self) -> serde_json::Value {
        let pos = self.engine.position();
        let read_only = self.engine.is_read_only();
        let upstreams: Vec<serde_json::Value> = self
            .upstreams
            .iter()
            .map(|u| {
                let u = u.lock().unwrap_or_else(|p| p.into_inner());
                let mut j = u.to_json();
                // What this node executed of what came from this upstream.
                j["applied_gtids"] = json!(u.received.intersection(&pos.gtid_executed).to_string());
                j
            })
            .collect();
        let replica = !self.upstreams.is_empty() || read_only;
        json!({
            "server_uuid": self.engine.server_uuid().to_string(),
            "role": if replica { "replica" } else { "primary" },
            "read_only": read_only,
            "gtid_executed": pos.gtid_executed.to_string(),
            "first_offset": self.wal.first_offset().get(),
            "history_epoch": self.wal.history_epoch().get(),
            "last_offset": pos.offset.map_or(0, |o| o.get()),
            "written_offset": self.wal.written_offset(),
            "durable_offset": self.wal.durable_offset(),
            "durability": match self.wal.durability() {
                Durability::Sync => "sync",
                Durability::Async { .. } => "async",
            },
            "fail_stop": self.engine.fail_stop_reason(),
            "uptime_s": self.started.elapsed().as_secs(),
            "trees": self.engine.trees().iter().map(|t| &t.name).collect::<Vec<_>>(),
            "slots": self.wal.slots(),
            "upstreams": upstreams,
            "bootstrapping": self.engine.is_bootstrapping(),
            "bootstrap_served": {
                "chunks": self.chunks_served.load(Ordering::Relaxed),
                "bytes": self.chunk_bytes_served.load(Ordering::Relaxed),
            },
        })
    }
}

/// Commits client writes as one engine transaction (blocking).
fn commit_ops(engine: &Engine, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
    let known: BTreeSet<String> = engine.trees().into_iter().map(|t| t.name).collect();
    let outcome = engine
        .transaction(|tx| {
            // A tree a write names but that does not exist yet is created by the same
            // transaction, so the log holds nothing but transactions.
            let mut created = BTreeSet::new();
            for op in &ops {
                let tree = match op {
                    WriteOp::Put { tree, .. }
                    | WriteOp::Delete { tree, .. }
                    | WriteOp::Merge { tree, .. } => tree,
                };
                if tree != "default" && !known.contains(tree) && created.insert(tree.clone()) {
                    tx.create_tree(tree, None)?;
                }
            }
            for op in &ops {
                match op {
                    WriteOp::Put { tree, key, value } => tx.put(tree, key, value)?,
                    WriteOp::Delete { tree, key } => tx.delete(tree, key)?,
                    WriteOp::Merge { tree, key, operand } => tx.merge(tree, key, operand)?,
                }
            }
            Ok(())
        })
        .map_err(write_err)?;
    let c = outcome.commit.ok_or_else(|| {
        NodeError::new(ErrorCode::InvalidRequest, "the transaction wrote nothing")
    })?;
    Ok((c.offset, c.gtid))
}

impl Node for EngineNode {
    fn wal(&self) -> &Wal {
        &self.wal
    }

    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, NodeError> {
        match self.engine.get(tree, key) {
            // A tree nobody wrote to yet holds no keys.
            Err(ReadError::UnknownTree(_)) => Ok(None),
            other => other.map_err(read_err),
        }
    }

    fn scan(&self, tree: &str, prefix: &[u8], limit: u64) -> Result<Rows, NodeError> {
        let scan = match self.engine.prefix(tree, prefix, false) {
            Err(ReadError::UnknownTree(_)) => return Ok(Vec::new()),
            other => other.map_err(read_err)?,
        };
        scan.take(limit.min(usize::MAX as u64) as usize)
            .collect::<Result<Rows, ReadError>>()
            .map_err(read_err)
    }

    fn range_after(&self, tree: &str, after: Option<&[u8]>, limit: u64) -> Result<Rows, NodeError> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a.to_vec()),
            None => Bound::Unbounded,
        };
        let scan = match self
            .engine
            .range::<Vec<u8>>(tree, (lower, Bound::Unbounded), false)
        {
            Err(ReadError::UnknownTree(_)) => return Ok(Vec::new()),
            other => other.map_err(read_err)?,
        };
        scan.take(limit.min(usize::MAX as u64) as usize)
            .collect::<Result<Rows, ReadError>>()
            .map_err(read_err)
    }

    async fn commit(&self, ops: Vec<WriteOp>) -> Result<(Offset, Gtid), NodeError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || commit_ops(&engine, ops))
            .await
            .map_err(|e| NodeError::new(ErrorCode::Internal, format!("commit task failed: {e}")))?
    }

    fn status_json(&self) -> String {
        self.status().to_string()
    }

    fn bootstrap_view(&self) -> Result<Arc<dyn BootstrapView>, NodeError> {
        let Some((snap, epoch)) = self.engine.snapshot_for_copy() else {
            return Err(NodeError::new(
                ErrorCode::Unavailable,
                "this node is itself being bootstrapped; retry once it has finished (see \
                 `tideline status`)",
            ));
        };
        // Keys from the store's counters (no data read); bytes are left to the consumer, which
        // scales the keys by the average entry size it sees.
        Ok(Arc::new(EngineView {
            estimate: (snap.approximate_len(), 0),
            snap,
            epoch,
        }))
    }

    fn on_bootstrap_chunk(&self, bytes: usize) {
        self.chunks_served.fetch_add(1, Ordering::Relaxed);
        self.chunk_bytes_served
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pos = self.engine.position();
            let applied = pos.offset.map_or(0, |o| o.get());
            // Applied here, and durable: under async durability the engine applies what was
            // written, so also wait for the log's sync to cover it.
            if gtids.is_subset(&pos.gtid_executed) && self.wal.durable_offset() >= applied {
                return (true, pos.gtid_executed);
            }
            if tokio::time::Instant::now() >= deadline {
                return (false, pos.gtid_executed);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Opens the log and engine of a data directory with default limits.
pub fn open_engine(
    data: &Path,
    durability: Durability,
    read_only: bool,
) -> anyhow::Result<Arc<Engine>> {
    open_engine_with(
        data,
        WalOptions {
            durability,
            ..WalOptions::default()
        },
        EngineOptions {
            read_only,
            ..EngineOptions::default()
        },
    )
}

/// Opens the log and engine of a data directory.
pub fn open_engine_with(
    data: &Path,
    log: WalOptions,
    opts: EngineOptions,
) -> anyhow::Result<Arc<Engine>> {
    let wal = open_log_with(data, log)?;
    let report = wal.recovery_report();
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            "recovery cut a torn tail of the log"
        );
    }
    let store = data.join("store");
    let engine = Engine::open(&store, wal, opts)
        .with_context(|| format!("open the state store in {}", store.display()))?;
    Ok(Arc::new(engine))
}

/// `serve`.
pub fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tideline")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let secrets_dir = args
        .secrets
        .clone()
        .unwrap_or_else(|| args.data.join("secrets"));
    if tideline_stream::ensure_secrets(&secrets_dir)? {
        tracing::info!(dir = %secrets_dir.display(), "created cluster secrets (CA, certificate, token)");
    }
    let secrets = tideline_stream::tls::load_server(&secrets_dir)?;
    let durability = args.durability.durability();
    let data = args.data.clone();
    let read_only = args.read_only || (!args.upstream.is_empty() && !args.allow_local_writes);
    let opts = EngineOptions {
        read_only,
        key_bytes_max: args.key_bytes_max as usize,
        value_bytes_max: args.value_bytes_max as usize,
        ..EngineOptions::default()
    };
    let log = WalOptions {
        durability,
        segment_bytes_max: args.log_segment_bytes,
        retention: RetentionPolicy {
            retain_bytes_min: args.log_retain_bytes,
            ..RetentionPolicy::default()
        },
        ..WalOptions::default()
    };
    let engine = tokio::task::spawn_blocking(move || open_engine_with(&data, log, opts))
        .await
        .context("open task failed")??;
    let mut upstreams = Vec::new();
    if !args.upstream.is_empty() {
        let mut cfg = tideline_stream::ClientConfig::new(tideline_stream::tls::load_client_dir(
            &secrets_dir,
        )?);
        cfg.client_name = format!("replica {}", engine.server_uuid());
        let opts = replica::ReplicaOptions {
            bootstrap: args.bootstrap,
            sources: args.upstream.len(),
            chunk_bytes: args.bootstrap_chunk_bytes,
        };
        for addr in &args.upstream {
            // The tasks live as long as the node's runtime.
            let (status, _task) = replica::spawn(addr.clone(), cfg.clone(), engine.clone(), opts);
            upstreams.push(status);
        }
    }
    let node = Arc::new(EngineNode::new(engine.clone(), upstreams));
    let server = tideline_stream::serve(ServerConfig::new(args.listen), secrets, node.clone())?;
    tracing::info!(
        listen = %server.local_addr(),
        server_uuid = %engine.server_uuid(),
        gtid_executed = %engine.gtid_executed(),
        "serving"
    );
    eprintln!(
        "tideline serving on {} (server_uuid {}, data {}, secrets {})",
        server.local_addr(),
        engine.server_uuid(),
        args.data.display(),
        secrets_dir.display()
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let mut watchdog = tokio::time::interval(Duration::from_millis(100));
    let mut retention = tokio::time::interval(Duration::from_secs(10));
    let exit = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break None,
            _ = sigterm.recv() => break None,
            _ = watchdog.tick() => {
                // Fail-stop: a poisoned log or a dead engine thread ends the node.
                if let Some(reason) = engine.fail_stop_reason() {
                    break Some(reason);
                }
                if server.is_finished() {
                    break Some("the QUIC server task stopped".to_string());
                }
            }
            _ = retention.tick() => {
                let wal = engine.wal().clone();
                let report = tokio::task::spawn_blocking(move || wal.run_retention()).await;
                if let Ok(Err(e)) = report {
                    tracing::warn!(error = %e, "retention failed");
                }
            }
        }
    };
    server.shutdown().await;
    if let Some(reason) = exit {
        tracing::error!(%reason, "fail-stop: exiting");
        eprintln!("error: fail-stop: {reason}");
        return Ok(ExitCode::from(2));
    }
    tracing::info!("shutting down: syncing the log and the store");
    let closed = tokio::task::spawn_blocking(move || {
        engine.close().map_err(anyhow::Error::from)?;
        engine.wal().close().map_err(anyhow::Error::from)
    })
    .await
    .context("shutdown task failed")?;
    closed?;
    eprintln!("tideline stopped cleanly");
    Ok(ExitCode::SUCCESS)
}
