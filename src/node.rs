//! The node: engine + log + QUIC server, and `tideline serve`.
//!
//! Owns: opening the engine on a data directory, [`EngineNode`] (the stream server's view of
//! the engine), `status`, and the wiring of `serve` (replication pipelines from
//! `tideline-connectors`, the HTTP admin). Must never: replicate or bootstrap itself (it only
//! starts the pipelines and shows their status), or acknowledge a write the log has not.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tideline_engine::{
    Engine, EngineOptions, IndexInfo, IndexState, ReadError, Snapshot, WriteError,
};
use tideline_stream::server::Rows;
use tideline_stream::{
    BootstrapView, ErrorCode, Node, NodeError, Observer, Page, ScanPage, WriteOp,
};
use tideline_stream::{IndexPage, IndexQuery};
use tideline_wal::{Durability, Epoch, Gtid, GtidSet, Offset, RetentionPolicy, Wal, WalOptions};

use crate::log_cmd::open_log_with;
use tideline_connectors::config::{ConnectFile, HostNode};

mod args;
pub use args::ServeArgs;
use args::server_config;
use tideline_connectors::{ReplicaOptions, SharedPipelineStatus, SharedStatus};

/// How often a read fence re-checks durability once its GTIDs are applied but the log has
/// not synced them yet (async durability only).
const ASYNC_SYNC_RECHECK: Duration = Duration::from_millis(2);

/// How often a fenced index read re-checks whether a backfilling index went live.
const INDEX_LIVE_RECHECK: Duration = Duration::from_millis(10);

/// Chunk size a bootstrapping replica asks for by default.
pub const BOOTSTRAP_CHUNK_BYTES_DEFAULT: u64 = 8 << 20;

/// The engine seen through the stream server's [`Node`] trait.
pub struct EngineNode {
    engine: Arc<Engine>,
    wal: Arc<Wal>,
    started: Instant,
    upstreams: Vec<SharedStatus>,
    /// Pipelines run by this node (`serve --connect`).
    pipelines: std::sync::OnceLock<Vec<SharedPipelineStatus>>,
    /// Bootstrap chunks served to replicas, and their bytes.
    chunks_served: AtomicU64,
    chunk_bytes_served: AtomicU64,
    /// The QUIC server's counters and live subscriptions.
    observer: Arc<Observer>,
    /// Key and value limits the engine enforces, shown in `status` so clients check first.
    limits: (usize, usize),
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

    fn indexes(&self, tree: &str) -> Vec<tideline_stream::IndexDef> {
        self.snap
            .indexes(tree)
            .into_iter()
            .map(|i| tideline_stream::IndexDef {
                name: i.name,
                paths: i.paths,
                unique: i.unique,
            })
            .collect()
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
    NodeError::new(code, write_message(&e))
}

/// The engine's words, turned into the CLI step that fixes the problem.
fn write_message(e: &WriteError) -> String {
    match e {
        WriteError::ReadOnly => "this node is read-only (a replica, or started with --read-only); \
             send writes to the primary, or promote this node by restarting it without \
             --upstream and --read-only (`tideline serve --data DIR ...`)"
            .to_string(),
        WriteError::KeyTooLarge { bytes, max } if *max >= KEY_BYTES_CEILING => format!(
            "key of {bytes} bytes exceeds the limit of {max} bytes, the most the store allows; \
             use a shorter key"
        ),
        WriteError::KeyTooLarge { bytes, max } => format!(
            "key of {bytes} bytes exceeds this node's limit of {max} bytes; use a shorter key, \
             or restart the node with `tideline serve --key-bytes-max N` (at most \
             {KEY_BYTES_CEILING})"
        ),
        WriteError::ValueTooLarge { bytes, max } if *max >= VALUE_BYTES_CEILING => format!(
            "value of {bytes} bytes exceeds the limit of {max} bytes, the most one message \
             carries; split the value"
        ),
        WriteError::ValueTooLarge { bytes, max } => format!(
            "value of {bytes} bytes exceeds this node's limit of {max} bytes; split it, or \
             restart the node with `tideline serve --value-bytes-max N` (at most \
             {VALUE_BYTES_CEILING})"
        ),
        WriteError::Conflict(what) => {
            format!("transaction conflict: {what}; nothing was written: run the command again")
        }
        other => other.to_string(),
    }
}

/// Largest `--key-bytes-max`: the store's key limit.
const KEY_BYTES_CEILING: usize = 65_535;
/// Largest `--value-bytes-max`: what one protocol message carries.
const VALUE_BYTES_CEILING: usize = 16 << 20;

impl EngineNode {
    /// Wraps an open engine; `observer` is the one in the QUIC server's configuration.
    pub fn new(engine: Arc<Engine>, upstreams: Vec<SharedStatus>, observer: Arc<Observer>) -> Self {
        let wal = engine.wal().clone();
        EngineNode {
            engine,
            wal,
            started: Instant::now(),
            upstreams,
            pipelines: std::sync::OnceLock::new(),
            chunks_served: AtomicU64::new(0),
            chunk_bytes_served: AtomicU64::new(0),
            observer,
            limits: (KEY_BYTES_CEILING, VALUE_BYTES_CEILING),
        }
    }

    /// Records the key and value limits the engine was opened with (for `status`).
    pub fn with_limits(mut self, key_bytes_max: usize, value_bytes_max: usize) -> Self {
        self.limits = (key_bytes_max, value_bytes_max);
        self
    }

    /// Shows these pipelines in `status` (`serve --connect`); set once, after the server
    /// has bound (until then `status` lists none).
    pub fn set_pipelines(&self, pipelines: Vec<SharedPipelineStatus>) {
        // Set once by `serve`; a second call would be a wiring bug, and keeping the first
        // list is the harmless outcome.
        let _ = self.pipelines.set(pipelines);
    }

    /// The node's log.
    pub fn wal_ref(&self) -> &Wal {
        &self.wal
    }

    /// The QUIC server's counters and live subscriptions.
    pub fn observer(&self) -> &Observer {
        &self.observer
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
                // What this node executed of what came from this upstream, however it arrived
                // (log or bootstrap copy); `applied` counts it, `applied_since_start` counts
                // the transactions applied from the upstream's log since this node started.
                let applied = u.received.intersection(&pos.gtid_executed);
                j["applied_since_start"] = j["applied"].take();
                j["applied"] = json!(applied.count());
                j["applied_gtids"] = json!(applied.to_string());
                j
            })
            .collect();
        let replica = !self.upstreams.is_empty() || read_only;
        let store = self.engine.store_stats();
        let first_offset = self.wal.first_offset().get();
        let last_offset = pos.offset.map_or(0, |o| o.get());
        let consumers: Vec<serde_json::Value> = self
            .observer
            .subscriptions()
            .into_iter()
            .map(|c| {
                let lag = last_offset.saturating_sub(c.sent_through);
                let mut j = json!(c);
                j["lag_txns"] = json!(lag);
                j
            })
            .collect();
        let stats = self.wal.stats();
        let trees = self.engine.trees();
        json!({
            "server_uuid": self.engine.server_uuid().to_string(),
            "role": if replica { "replica" } else { "primary" },
            "read_only": read_only,
            "gtid_executed": pos.gtid_executed.to_string(),
            "first_offset": first_offset,
            "history_epoch": self.wal.history_epoch().get(),
            "last_offset": last_offset,
            // Records the log holds: 0 on a fresh node or right after a bootstrap (which copies
            // state, not history), where first_offset is the next offset to be written.
            "log_records": (last_offset + 1).saturating_sub(first_offset),
            "written_offset": self.wal.written_offset(),
            "durable_offset": self.wal.durable_offset(),
            "durability": match self.wal.durability() {
                Durability::Sync => "sync",
                Durability::Async { .. } => "async",
            },
            "fail_stop": self.engine.fail_stop_reason(),
            "uptime_s": self.started.elapsed().as_secs(),
            "trees": trees.iter().map(|t| &t.name).collect::<Vec<_>>(),
            // Tree -> merge operator, for trees that have one: sinks that store values (not
            // the log's operands) resolve merges with them.
            "merge_operators": trees
                .iter()
                .filter_map(|t| t.merge_operator.map(|m| (t.name.clone(), json!(m.name()))))
                .collect::<serde_json::Map<_, _>>(),
            "indexes": self.engine.indexes().iter().map(index_json).collect::<Vec<_>>(),
            "slots": self.wal.slots(),
            "log": { "bytes": stats.total_bytes, "segments": stats.segments.len() },
            "consumers": consumers,
            "connections": {
                "active": self.observer.connections_active(),
                "streams": self.observer.streams_active(),
                "monitors": self.observer.monitors(),
            },
            "upstreams": upstreams,
            "pipelines": self.pipelines.get().into_iter().flatten().map(|p| p.get().to_json()).collect::<Vec<_>>(),
            "bootstrapping": self.engine.is_bootstrapping(),
            "store": {
                "cache_bytes": store.cache_bytes,
                "cache_bytes_max": store.cache_bytes_max,
                "write_buffer_bytes": store.write_buffer_bytes,
            },
            "limits": {
                "key_bytes_max": self.limits.0,
                "value_bytes_max": self.limits.1,
            },
            "bootstrap_served": {
                "chunks": self.chunks_served.load(Ordering::Relaxed),
                "bytes": self.chunk_bytes_served.load(Ordering::Relaxed),
            },
        })
    }
}

/// One index as `status` shows it: definition, state (with percent and rate while
/// backfilling, or the reason it failed), entries, skipped documents and duplicates.
pub fn index_json(i: &IndexInfo) -> serde_json::Value {
    let mut j = json!({
        "tree": i.tree,
        "name": i.name,
        "paths": i.paths,
        "unique": i.unique,
        "state": i.state.name(),
        "entries": i.entries,
        "skipped": i.skipped,
        "duplicates": i.duplicates,
        "duplicate_examples": i.duplicate_examples,
        // Maintained in the same store batch as the data: never behind what is applied.
        "lag_txns": 0,
    });
    match &i.state {
        IndexState::Backfilling {
            percent,
            docs_per_s,
        } => {
            j["percent"] = json!((percent * 10.0).round() / 10.0);
            j["docs_per_s"] = json!(docs_per_s.round());
        }
        IndexState::Failed { reason } => j["reason"] = json!(reason),
        _ => {}
    }
    j
}

/// Reads one page of an index from one snapshot (blocking).
fn index_page(engine: &Engine, q: &IndexQuery) -> Result<IndexPage, ReadError> {
    let limit = usize::try_from(q.limit).unwrap_or(usize::MAX).max(1);
    let p = engine.snapshot().index_scan(
        &q.tree,
        &q.index,
        &q.values,
        &q.prefix,
        q.after.as_deref(),
        limit,
        q.bytes_max,
    )?;
    Ok(IndexPage {
        rows: p.rows,
        next: p.next,
    })
}

fn index_read_err(e: ReadError) -> NodeError {
    match e {
        ReadError::UnknownTree(_) | ReadError::UnknownIndex { .. } => {
            NodeError::new(ErrorCode::InvalidRequest, e.to_string())
        }
        ReadError::IndexNotLive { .. } => NodeError::new(ErrorCode::Unavailable, e.to_string()),
        other => NodeError::new(ErrorCode::Internal, other.to_string()),
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
                    // An index names a tree that must exist: never created implicitly.
                    WriteOp::CreateIndex { .. } | WriteOp::DropIndex { .. } => continue,
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
                    WriteOp::CreateIndex {
                        tree,
                        name,
                        paths,
                        unique,
                    } => {
                        let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
                        tx.create_index(tree, name, &paths, *unique)?;
                    }
                    WriteOp::DropIndex { tree, name } => tx.drop_index(tree, name)?,
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

    fn scan(&self, tree: &str, prefix: &[u8], page: ScanPage<'_>) -> Result<Page, NodeError> {
        use std::ops::Bound;
        // Start after the previous page's last key, or at the prefix; stop at the first key
        // outside the prefix. The iterator reads lazily: one page is held, never the range.
        let lower = match page.after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let rows = match self
            .engine
            .range::<Vec<u8>>(tree, (lower, Bound::Unbounded), false)
        {
            Err(ReadError::UnknownTree(_)) => return Ok(Page::default()),
            other => other.map_err(read_err)?,
        };
        let rows = rows.take_while(|r| r.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)));
        tideline_stream::server::collect_page(rows, page).map_err(read_err)
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
        let started = Instant::now();
        let n_ops = ops.len() as u64;
        let result = tokio::task::spawn_blocking(move || commit_ops(&engine, ops))
            .await
            .map_err(|e| NodeError::new(ErrorCode::Internal, format!("commit task failed: {e}")))?;
        match &result {
            Ok(_) => {
                metrics::counter!("tideline_commits_total").increment(1);
                metrics::counter!("tideline_commit_ops_total").increment(n_ops);
                metrics::histogram!("tideline_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                metrics::counter!("tideline_commit_errors_total", "code" => format!("{:?}", e.code))
                    .increment(1);
            }
        }
        result
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

    async fn index_query(&self, q: IndexQuery) -> Result<IndexPage, NodeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(q.timeout_ms);
        if let Some(text) = &q.fence {
            let set: GtidSet = text.parse().map_err(|e| {
                NodeError::new(
                    ErrorCode::InvalidRequest,
                    format!("--after {text:?} is not a GTID set ({e}); write it like uuid:1-5"),
                )
            })?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (reached, executed) = self.wait_for(set, left).await;
            if !reached {
                return Err(NodeError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "the node has not applied {text} within {} ms (it has {executed}); \
                         check its upstream's lag (`tideline status`) or pass a longer \
                         --timeout",
                        q.timeout_ms
                    ),
                ));
            }
        }
        loop {
            let engine = self.engine.clone();
            let query = q.clone();
            let result = tokio::task::spawn_blocking(move || index_page(&engine, &query))
                .await
                .map_err(|e| NodeError::new(ErrorCode::Internal, format!("index read: {e}")))?;
            match result {
                // With a fence, a backfilling index is waited for like the GTIDs.
                Err(ReadError::IndexNotLive { .. })
                    if q.fence.is_some() && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(INDEX_LIVE_RECHECK).await;
                }
                other => return other.map_err(index_read_err),
            }
        }
    }

    async fn wait_for(&self, gtids: GtidSet, timeout: Duration) -> (bool, GtidSet) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.engine.view_changes();
        loop {
            // Seen before reading the position: a change after this wakes `changed()` below.
            changes.borrow_and_update();
            let pos = self.engine.position();
            let applied = pos.offset.map_or(0, |o| o.get());
            let executed = gtids.is_subset(&pos.gtid_executed);
            // Applied here, and durable. The engine applies only durable records (the log's
            // visible head is its durable head), so this holds once applied; the check keeps
            // a fence from ever answering before the fsync should that change.
            if executed && self.wal.durable_offset() >= applied {
                return (true, pos.gtid_executed);
            }
            if tokio::time::Instant::now() >= deadline {
                return (false, pos.gtid_executed);
            }
            if executed {
                // Applied, not yet synced (async durability): the log syncs within its
                // interval and announces nothing, so re-check shortly. This phase lasts at
                // most one sync interval; the wait for the apply itself polls nothing.
                tokio::time::sleep_until(
                    deadline.min(tokio::time::Instant::now() + ASYNC_SYNC_RECHECK),
                )
                .await;
                continue;
            }
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        // The engine is gone: nothing more will be applied.
                        return (false, self.engine.gtid_executed());
                    }
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
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

/// Checks, before anything is created on disk, that `serve` can run: the port is free, the
/// data directory is usable, the upstream addresses parse, and a replica has its cluster's
/// secrets (a new cluster's could never connect to the upstream).
fn preflight(args: &ServeArgs, secrets_dir: &Path) -> anyhow::Result<Option<ConnectFile>> {
    // Bind the port and let it go at once: `serve` binds it again below, after opening the
    // data directory. A port taken in between still fails there, with the same words.
    if let Err(e) = std::net::UdpSocket::bind(args.listen) {
        anyhow::bail!(
            "cannot listen on {}: {}; is another node using the port? Stop it or pass \
             another --listen HOST:PORT",
            args.listen,
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("the address is in use ({e})")
            } else {
                e.to_string()
            }
        );
    }
    if args.data.exists() && !args.data.is_dir() {
        anyhow::bail!(
            "--data {} is a file, not a directory: pass a directory (created if absent)",
            args.data.display()
        );
    }
    for up in &args.upstream {
        let port_ok = up
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            anyhow::bail!("--upstream {up:?} is not HOST:PORT (for example 127.0.0.1:7400)");
        }
    }
    if !args.upstream.is_empty() && !secrets_dir.join("ca.pem").exists() {
        anyhow::bail!(
            "a replica needs its cluster's secrets, and {} holds none: pass --secrets DIR with \
             the upstream's secrets directory (a new cluster's certificates could never \
             connect to {})",
            secrets_dir.display(),
            args.upstream.join(", ")
        );
    }
    match &args.connect {
        None => Ok(None),
        Some(path) => Ok(Some(ConnectFile::load(path).map_err(|e| {
            anyhow::anyhow!("--connect: {e} (docs/OPERATIONS.md, \"Connectors\")")
        })?)),
    }
}

async fn serve_async(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let secrets_dir = args
        .secrets
        .clone()
        .unwrap_or_else(|| args.data.join("secrets"));
    let connect = preflight(args, &secrets_dir)?;
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
        index_backfill_keys: args.index_backfill_keys as usize,
        ..EngineOptions::default()
    };
    let log = WalOptions {
        durability,
        segment_bytes_max: args.log_segment_bytes,
        retention: RetentionPolicy {
            retain_bytes_min: args.log_retain_bytes,
            slot_bytes_max: (args.log_slot_bytes_max > 0).then_some(args.log_slot_bytes_max),
            slot_age_max: args.log_slot_age_max,
        },
        ..WalOptions::default()
    };
    #[cfg(feature = "testing")]
    let (log, opts, armed) = testing::switches(log, opts)?;
    let engine = tokio::task::spawn_blocking(move || open_engine_with(&data, log, opts))
        .await
        .context("open task failed")??;
    let mut upstreams = Vec::new();
    if !args.upstream.is_empty() {
        let mut cfg = tideline_stream::ClientConfig::new(tideline_stream::tls::load_client_dir(
            &secrets_dir,
        )?);
        cfg.client_name = format!("replica {}", engine.server_uuid());
        let opts = ReplicaOptions {
            bootstrap: args.bootstrap.mode(),
            sources: args.upstream.len(),
            chunk_bytes: args.bootstrap_chunk_bytes,
        };
        for addr in &args.upstream {
            // The tasks live as long as the node's runtime.
            let (status, _task) =
                tideline_connectors::spawn(addr.clone(), cfg.clone(), engine.clone(), opts);
            upstreams.push(status);
        }
    }
    let server_cfg = server_config(args)?;
    let node = Arc::new(
        EngineNode::new(engine.clone(), upstreams, server_cfg.observer.clone())
            .with_limits(args.key_bytes_max as usize, args.value_bytes_max as usize),
    );
    let token = secrets.token.clone();
    let server = tideline_stream::serve(server_cfg, secrets, node.clone())?;
    // The node's pipelines start once the server has bound: one whose `[source]` names no
    // node follows this one at the address it bound (port 0 included).
    let pipelines = match &connect {
        Some(file) => {
            let host = HostNode {
                addr: server.local_addr(),
                secrets: &secrets_dir,
            };
            crate::connect::spawn_all(file, Some(host))?
        }
        None => Vec::new(),
    };
    node.set_pipelines(pipelines.iter().map(|(s, _)| s.clone()).collect());
    let admin = match args.http {
        Some(addr) => {
            let admin = crate::admin::serve(addr, node.clone(), token).await?;
            eprintln!("tideline admin on http://{}/", admin.local_addr());
            Some(admin)
        }
        None => None,
    };
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
    #[cfg(feature = "testing")]
    if let Some(task) = &armed {
        eprintln!(
            "TESTING: {} armed: the {task} will die",
            testing::KILL_TASK_ENV
        );
    }

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
                #[cfg(feature = "testing")]
                if armed.as_deref() == Some(testing::QUIC_SERVER)
                    && engine.wal().durable_offset() >= 1
                {
                    server.unsafe_abort_accept_loop();
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
    for (_, task) in &pipelines {
        // Each batch is stored with its position in one step: stopping anywhere is safe.
        task.abort();
    }
    server.shutdown().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
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

#[cfg(test)]
mod tests;

/// Test-only switches (cargo feature `testing`, absent from the binary a release build makes):
/// env `TIDELINE_TESTING_KILL_TASK=applier|checkpointer|backfill|log-writer|quic-server` kills
/// that critical task once the node has a commit, so that a test can watch the watchdog stop
/// the node with exit code 2; env `TIDELINE_TESTING_SKIP_BOOTSTRAP_WIPE=1` makes a bootstrap
/// keep the replica's old trees (the engine's `unsafe_bootstrap_skip_wipe`), the canary of the
/// stale-data bootstrap test.
#[cfg(feature = "testing")]
mod testing {
    use tideline_engine::EngineOptions;
    use tideline_wal::WalOptions;

    pub(super) const KILL_TASK_ENV: &str = "TIDELINE_TESTING_KILL_TASK";
    const SKIP_BOOTSTRAP_WIPE_ENV: &str = "TIDELINE_TESTING_SKIP_BOOTSTRAP_WIPE";
    /// The task name that kills the QUIC server's accept loop.
    pub(super) const QUIC_SERVER: &str = "quic-server";

    /// The options with the switches of the environment set, and the task armed.
    pub(super) fn switches(
        mut log: WalOptions,
        mut opts: EngineOptions,
    ) -> anyhow::Result<(WalOptions, EngineOptions, Option<String>)> {
        match std::env::var(SKIP_BOOTSTRAP_WIPE_ENV).as_deref() {
            Err(_) | Ok("" | "0") => {}
            Ok("1") => opts.unsafe_bootstrap_skip_wipe = true,
            Ok(other) => anyhow::bail!("{SKIP_BOOTSTRAP_WIPE_ENV}={other}: use 1 or 0"),
        }
        let Ok(task) = std::env::var(KILL_TASK_ENV) else {
            return Ok((log, opts, None));
        };
        match task.as_str() {
            "" => return Ok((log, opts, None)),
            "applier" | "checkpointer" | "backfill" => {
                opts.unsafe_kill_thread = Some(task.clone());
            }
            "log-writer" => log.unsafe_kill_writer = true,
            // Killed by the node itself once it has a commit (`serve`'s watchdog loop).
            QUIC_SERVER => {}
            other => anyhow::bail!(
                "{KILL_TASK_ENV}={other}: unknown task; use applier, checkpointer, backfill, \
                 log-writer or {QUIC_SERVER}"
            ),
        }
        Ok((log, opts, Some(task)))
    }
}
