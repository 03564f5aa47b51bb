//! The node: engine + log + QUIC server, and `tideline serve`.
//!
//! Owns: opening the engine on a data directory, [`EngineNode`] (the stream server's view of
//! the engine), `status`, and the wiring of `serve` (replication pipelines from
//! `tideline-connectors`, the HTTP admin). Must never: replicate or bootstrap itself (it only
//! starts the pipelines and shows their status), or acknowledge a write the log has not.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tideline_engine::{Engine, IndexInfo, IndexState, ReadError, Snapshot, WriteError};
use tideline_stream::{
    BootstrapView, ErrorCode, Node, NodeError, Observer, Page, ScanPage, WriteOp,
};
use tideline_stream::{IndexPage, IndexQuery};
use tideline_wal::{Durability, Epoch, Gtid, GtidSet, Offset, Wal};

mod args;
mod serve;
pub use args::ServeArgs;
pub use serve::{open_engine, open_engine_with, serve};
use tideline_connectors::{SharedPipelineStatus, SharedStatus};

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
        // Borrowed from the store and packed straight into `out`: no copy of each key and
        // value in between.
        let mut next = None;
        let visited = self.snap.visit_from(tree, from, |k, v| {
            let size = 8 + k.len() + v.len();
            if !out.is_empty() && out.len() + size > bytes_max {
                next = Some(k.to_vec());
                return false;
            }
            tideline_stream::proto::pack_entry(out, k, v);
            true
        });
        match visited {
            Err(ReadError::UnknownTree(_)) => Ok(None),
            other => other.map_err(read_err).map(|()| next),
        }
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
            WriteError::FailStop { .. }
            | WriteError::Bootstrapping
            | WriteError::GtidsExhausted { .. } => ErrorCode::Unavailable,
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
        ReadError::UnknownTree(_)
        | ReadError::UnknownIndex { .. }
        | ReadError::IndexTooManyValues { .. } => {
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
                         check its upstream's lag (`tideline status`) or raise \
                         --after-timeout-ms (the library's `timeout`)",
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
                // The fence was passed and waited for: the way out is more time, not a fence.
                Err(ReadError::IndexNotLive { tree, name, state }) if q.fence.is_some() => {
                    return Err(NodeError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "index `{name}` on tree `{tree}` is still {state} after {} ms; \
                             raise --after-timeout-ms (the library's `timeout`) or query it \
                             once it is live (see `tideline index status`)",
                            q.timeout_ms
                        ),
                    ));
                }
                other => return other.map_err(index_read_err),
            }
        }
    }

    async fn read_fence(&self, offset: Offset, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.engine.view_changes();
        loop {
            // Seen before reading the offset: a change after this wakes `changed()` below.
            changes.borrow_and_update();
            if self.engine.applied_offset() >= offset.get() {
                return true;
            }
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        return false;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return false,
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

#[cfg(test)]
mod tests;
