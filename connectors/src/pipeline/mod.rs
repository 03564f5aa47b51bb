//! The pipeline: a source node's log driven into a [`Sink`], exactly once in effect.
//!
//! ```text
//! source: resumable tail (and the chunked bootstrap when the sink starts empty)
//!   → filter (trees, key prefix, op kinds)
//!   → batching (by changes and by time)
//!   → sink.write(batch + checkpoint), retried with jittered backoff
//! ```
//!
//! Where it starts: [`Sink::open`] returns the checkpoint the sink stored with its data. With
//! one, the pipeline resumes right after it (by offset on the same node and history, by GTID
//! set elsewhere: the tail's own rules), or resumes the bootstrap it records. Without one, it
//! starts from [`PipelineConfig::from`]: a bootstrap copy of the source's current state merged
//! with its live log, or a tail position.
//!
//! Back-pressure: the pipeline reads one batch ahead of the sink at most (plus what the tail's
//! connection buffers); a slow sink slows only its own pipeline. The source node never waits
//! on it.
//!
//! Owns: the order of steps, the checkpoint's encoding, retries and the [`PipelineStatus`]
//! counters. Must never: store data or a checkpoint itself (only a sink does, with its data),
//! or skip a position (a lost source position ends the pipeline with an error).

mod checkpoint;
mod status;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tideline_consumers::{
    Bootstrap, BootstrapError, BootstrapProgress, BootstrapStep, Checkpoint, CheckpointError,
    Position, Tail, TailConfig, TailStart,
};
use tideline_stream::{Client, ClientConfig};
use tideline_wal::{Op, Transaction};

use crate::sink::{Batch, Item, Sink, SinkError};
pub use checkpoint::PipelineCheckpoint;
pub use status::{PipelineState, PipelineStatus, SharedPipelineStatus};

/// Where a pipeline whose sink holds no checkpoint starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartFrom {
    /// Copy the source's current state in chunks (merged with its live log), then tail.
    Bootstrap,
    /// Tail from this position (earliest, latest, an offset or a GTID set).
    Tail(TailStart),
}

/// Which changes reach the sink. Filtered-out transactions still move the position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only these trees (empty: all).
    pub trees: Vec<String>,
    /// Only keys starting with this (tree ops, which have no key, pass when their tree does).
    pub prefix: Option<Vec<u8>>,
    /// Only these op kinds (empty: all): `put`, `delete`, `merge`, `create_tree`, `drop_tree`,
    /// `create_index`, `drop_index`.
    pub ops: Vec<String>,
}

impl Filter {
    fn tree_passes(&self, tree: &str) -> bool {
        self.trees.is_empty() || self.trees.iter().any(|t| t == tree)
    }

    fn key_passes(&self, key: &[u8]) -> bool {
        self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
    }

    /// Whether `op` reaches the sink.
    pub fn passes(&self, op: &Op) -> bool {
        let (kind, tree, key) = (op.kind(), op.tree(), op.key());
        (self.ops.is_empty() || self.ops.iter().any(|o| o == kind))
            && self.tree_passes(tree)
            && key.is_none_or(|k| self.key_passes(k))
    }

    fn is_empty(&self) -> bool {
        self.trees.is_empty() && self.prefix.is_none() && self.ops.is_empty()
    }
}

/// How a pipeline runs.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Name, for `status`, logs and metrics labels.
    pub name: String,
    /// `host:port` of the source node.
    pub addr: String,
    /// Connection settings (secrets, timeouts).
    pub client: ClientConfig,
    /// Where to start when the sink holds no checkpoint.
    pub from: StartFrom,
    /// Which changes reach the sink.
    pub filter: Filter,
    /// A batch is written once it holds this many changes ...
    pub batch_changes: usize,
    /// ... or this long after its first item arrived, whichever comes first.
    pub batch_delay: Duration,
    /// Chunk size asked of the source when bootstrapping.
    pub chunk_bytes: u64,
    /// First retry delay after a `Retry` error (doubles, with jitter, up to `retry_max`).
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Pause before a held pipeline tries again.
    pub hold_pause: Duration,
}

impl PipelineConfig {
    /// A pipeline from `addr` with the defaults: 10,000 changes or 50 ms per batch, 1 MiB
    /// bootstrap chunks, retries from 100 ms to 5 s, 30 s pause when held.
    pub fn new(name: impl Into<String>, addr: impl Into<String>, client: ClientConfig) -> Self {
        PipelineConfig {
            name: name.into(),
            addr: addr.into(),
            client,
            from: StartFrom::Tail(TailStart::Earliest),
            filter: Filter::default(),
            batch_changes: 10_000,
            batch_delay: Duration::from_millis(50),
            chunk_bytes: 1 << 20,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
            hold_pause: Duration::from_secs(30),
        }
    }
}

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The sink refused for good.
    #[error("sink {sink}: {message}")]
    Sink {
        /// The sink.
        sink: String,
        /// What it said.
        message: String,
    },
    /// The source cannot go on (a purged position, refused credentials, a diverged node).
    #[error("source {addr}: {message}")]
    Source {
        /// The source.
        addr: String,
        /// What happened.
        message: String,
    },
    /// The checkpoint the sink returned is not one this pipeline wrote.
    #[error(
        "sink {sink} holds a checkpoint that does not decode ({reason}); clear the sink's \
         position (docs/OPERATIONS.md, \"Pipelines\") to start over"
    )]
    Checkpoint {
        /// The sink.
        sink: String,
        /// What is wrong.
        reason: String,
    },
}

/// Starts `cfg` into `sink` on the current tokio runtime; returns its status and its task.
/// Abort the task to stop it: a sink stores its data and checkpoint atomically, so stopping at
/// any point loses and repeats nothing.
pub fn spawn(
    cfg: PipelineConfig,
    sink: Box<dyn Sink>,
) -> (
    SharedPipelineStatus,
    tokio::task::JoinHandle<Result<(), PipelineError>>,
) {
    let status = PipelineStatus::shared(&cfg.name, &cfg.addr, &sink.describe());
    let st = status.clone();
    let task = tokio::spawn(async move {
        let r = run(cfg, sink, &st).await;
        if let Err(e) = &r {
            st.update(|s| {
                s.state = PipelineState::Failed;
                s.last_error = Some(e.to_string());
            });
        }
        r
    });
    (status, task)
}

/// Runs `cfg` into `sink` until an error stops it; see [`spawn`].
pub async fn run(
    cfg: PipelineConfig,
    mut sink: Box<dyn Sink>,
    st: &SharedPipelineStatus,
) -> Result<(), PipelineError> {
    let stored = open(&cfg, st, &mut *sink).await?;
    let stored = match stored {
        Some(bytes) => Some(PipelineCheckpoint::decode(&bytes).map_err(|reason| {
            PipelineError::Checkpoint {
                sink: sink.describe(),
                reason,
            }
        })?),
        None => None,
    };
    let operators = merge_operators(&cfg, st).await?;
    sink.set_merge_operators(&operators);
    let position = match stored {
        Some(PipelineCheckpoint::Tail(p)) => Some(p),
        Some(PipelineCheckpoint::Bootstrap(p)) => {
            Some(bootstrap(&cfg, st, &mut *sink, Some(p)).await?)
        }
        None if cfg.from == StartFrom::Bootstrap => {
            Some(bootstrap(&cfg, st, &mut *sink, None).await?)
        }
        None => None,
    };
    follow(&cfg, st, &mut *sink, position).await
}

/// What to do after a failed sink call: the pause before trying again, or the error that
/// stops the pipeline. Every failure is in the status (state, errors, last error, outages):
/// `Retry` waits with jittered backoff, `Hold` waits `hold_pause`, `Fatal` stops.
fn after_failure(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &dyn Sink,
    e: SinkError,
    failures: &mut u32,
) -> Result<Duration, PipelineError> {
    if let SinkError::Fatal(message) = e {
        return Err(PipelineError::Sink {
            sink: sink.describe(),
            message,
        });
    }
    tracing::warn!(pipeline = %cfg.name, sink = %sink.describe(), error = %e, "sink failed");
    st.update(|s| s.failed(&e, *failures == 0));
    let delay = match e {
        SinkError::Hold(_) => cfg.hold_pause,
        _ => backoff(cfg, *failures),
    };
    *failures += 1;
    Ok(delay)
}

fn after_success(cfg: &PipelineConfig, st: &SharedPipelineStatus, sink: &dyn Sink, failures: u32) {
    if failures > 0 {
        tracing::info!(pipeline = %cfg.name, sink = %sink.describe(), "sink reachable again");
        st.update(|s| s.recovered());
    }
}

/// Opens the sink, retrying as its errors say; returns the checkpoint it holds.
async fn open(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
) -> Result<Option<Vec<u8>>, PipelineError> {
    let mut failures = 0;
    loop {
        match sink.open().await {
            Ok(v) => {
                after_success(cfg, st, sink, failures);
                return Ok(v);
            }
            Err(e) => {
                let delay = after_failure(cfg, st, sink, e, &mut failures)?;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The source's merge operators, from its `status` (`merge_operators`: tree -> name), so that
/// a sink storing values can resolve merges on trees created before the pipeline started.
/// Retries a passing fault like the tail does; a node that does not report them gives none.
async fn merge_operators(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
) -> Result<BTreeMap<String, String>, PipelineError> {
    let mut failures = 0u32;
    loop {
        let r = async {
            let client = Client::connect(&cfg.addr, cfg.client.clone()).await?;
            let status = client.status().await;
            client.close().await;
            status
        }
        .await;
        match r {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
                let ops = v["merge_operators"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter_map(|(t, o)| Some((t.clone(), o.as_str()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default();
                return Ok(ops);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(pipeline = %cfg.name, error = %e, "source unreachable; retrying");
                st.update(|s| s.last_error = Some(format!("source {}: {e}", cfg.addr)));
                tokio::time::sleep(backoff(cfg, failures)).await;
                failures += 1;
            }
            Err(e) => {
                return Err(PipelineError::Source {
                    addr: cfg.addr.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
}

fn backoff(cfg: &PipelineConfig, failures: u32) -> Duration {
    let base = cfg
        .retry_min
        .saturating_mul(1u32 << failures.min(16))
        .min(cfg.retry_max);
    // ±25% so that the pipelines of one restarted server do not retry in lockstep.
    base.mul_f64(rand::random_range(0.75..1.25))
}

/// Writes `batch`, retrying as the error says; counts it.
async fn write(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
    batch: Batch,
) -> Result<(), PipelineError> {
    let changes = batch.changes() as u64;
    let txns = batch.txns().count() as u64;
    let last_ts = batch.txns().last().map(|t| t.timestamp_us);
    let mut failures = 0;
    loop {
        match sink.write(&batch).await {
            Ok(()) => break after_success(cfg, st, sink, failures),
            Err(e) => {
                let delay = after_failure(cfg, st, sink, e, &mut failures)?;
                tokio::time::sleep(delay).await;
            }
        }
    }
    st.update(|s| s.wrote(txns, changes, last_ts));
    Ok(())
}

/// A checkpoint for the tail that only hands it the sink's stored position: the sink stores
/// positions with its data, never the tail.
struct FromSink(Option<Position>);

impl Checkpoint for FromSink {
    fn load(&self) -> Result<Option<Position>, CheckpointError> {
        Ok(self.0.clone())
    }
    fn save(&mut self, _: &Position) -> Result<(), CheckpointError> {
        Ok(())
    }
}

/// Follows the source's log from `position` (or `cfg.from` without one) for ever.
async fn follow(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
    position: Option<Position>,
) -> Result<(), PipelineError> {
    let start = match &cfg.from {
        StartFrom::Tail(s) => s.clone(),
        StartFrom::Bootstrap => TailStart::Earliest,
    };
    let mut tcfg = TailConfig::new(cfg.addr.clone(), cfg.client.clone(), start);
    // One tree and/or a prefix are filtered by the source (less to send); the rest here.
    if let [tree] = cfg.filter.trees.as_slice() {
        tcfg.tree = Some(tree.clone());
    }
    tcfg.prefix.clone_from(&cfg.filter.prefix);
    tcfg.backoff_min = cfg.retry_min;
    tcfg.backoff_max = cfg.retry_max;
    let mut tail = tideline_consumers::tail(tcfg, Some(Box::new(FromSink(position.clone()))));
    let mut written = position;
    st.update(|s| {
        s.state = PipelineState::Running;
        if let Some(p) = &written {
            s.position = Some(p.clone());
        }
    });
    let mut last_write = Instant::now();
    loop {
        let (items, end) = next_batch(cfg, &mut tail).await?;
        let head = tail.head();
        let pos = tail.position();
        st.update(|s| s.source_head = s.source_head.max(head));
        let Some(pos) = pos else { continue };
        if end && items.is_empty() {
            return Err(PipelineError::Source {
                addr: cfg.addr.clone(),
                message: "the tail ended".into(),
            });
        }
        // Everything was filtered out: store the moved position now and then, not per batch.
        let moved = written.as_ref() != Some(&pos);
        if items.is_empty() && !(moved && last_write.elapsed() >= Duration::from_secs(1)) {
            st.update(|s| s.caught_up_to(&pos, head));
            continue;
        }
        let batch = Batch {
            source: pos.server_uuid,
            items,
            checkpoint: PipelineCheckpoint::Tail(pos.clone()).encode(),
        };
        write(cfg, st, sink, batch).await?;
        last_write = Instant::now();
        st.update(|s| s.caught_up_to(&pos, head));
        written = Some(pos);
    }
}

/// Reads up to one batch from the tail: returns once it holds `batch_changes` changes, or
/// `batch_delay` after its first transaction, or on an idle second (to store a position that
/// moved by filtered transactions). `true` when the tail has ended.
async fn next_batch(
    cfg: &PipelineConfig,
    tail: &mut Tail,
) -> Result<(Vec<Item>, bool), PipelineError> {
    let mut items = Vec::new();
    let mut changes = 0usize;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut first = true;
    while changes < cfg.batch_changes {
        let next = match tokio::time::timeout_at(deadline, tail.next()).await {
            Err(_) => break,
            Ok(n) => n,
        };
        let txn = match next {
            None => return Ok((items, true)),
            Some(Err(e)) => {
                return Err(PipelineError::Source {
                    addr: cfg.addr.clone(),
                    message: e.to_string(),
                });
            }
            Some(Ok(t)) => t,
        };
        if first {
            first = false;
            deadline = tokio::time::Instant::now() + cfg.batch_delay;
        }
        if let Some(t) = filtered(&cfg.filter, txn) {
            changes += t.ops.len().max(1);
            items.push(Item::Txn(t));
        }
    }
    Ok((items, false))
}

/// The transaction with only the ops that pass; `None` when none does.
fn filtered(filter: &Filter, mut txn: Transaction) -> Option<Transaction> {
    if !filter.is_empty() {
        txn.ops.retain(|op| filter.passes(op));
    }
    (!txn.ops.is_empty()).then_some(txn)
}

/// Copies the source's state into the sink (resuming `stored` when given), storing progress
/// with every batch; returns the position the live tail takes over at.
async fn bootstrap(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
    mut stored: Option<BootstrapProgress>,
) -> Result<Position, PipelineError> {
    let source_err = |message: String| PipelineError::Source {
        addr: cfg.addr.clone(),
        message,
    };
    let mut failures = 0u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(backoff(cfg, failures - 1)).await;
        }
        st.update(|s| s.state = PipelineState::Bootstrapping);
        let client = match Client::connect(&cfg.addr, cfg.client.clone()).await {
            Ok(c) => c,
            Err(e) if e.is_retryable() => {
                st.update(|s| s.last_error = Some(e.to_string()));
                failures += 1;
                continue;
            }
            Err(e) => return Err(source_err(e.to_string())),
        };
        let b = match Bootstrap::start(&client, stored.clone(), cfg.chunk_bytes).await {
            Err(BootstrapError::Restart(why)) if stored.is_some() => {
                tracing::warn!(pipeline = %cfg.name, reason = %why, "the bootstrap cannot resume; copying again from scratch");
                stored = None;
                Bootstrap::start(&client, None, cfg.chunk_bytes).await
            }
            other => other,
        };
        let b = match b {
            Ok(b) => b,
            Err(BootstrapError::Client(e)) if e.is_retryable() => {
                st.update(|s| s.last_error = Some(e.to_string()));
                failures += 1;
                continue;
            }
            Err(e) => return Err(source_err(e.to_string())),
        };
        match copy(cfg, st, sink, b).await? {
            Ok(pos) => return Ok(pos),
            Err(CopyInterrupted(why, progress)) => {
                tracing::warn!(pipeline = %cfg.name, error = %why, "bootstrap interrupted; resuming");
                st.update(|s| s.last_error = Some(why));
                stored = progress.or(stored);
                failures += 1;
            }
        }
    }
}

/// A retryable end of one bootstrap connection, with the last progress stored.
struct CopyInterrupted(String, Option<BootstrapProgress>);

async fn copy(
    cfg: &PipelineConfig,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
    mut b: Bootstrap,
) -> Result<Result<Position, CopyInterrupted>, PipelineError> {
    let server_uuid = b.progress().server_uuid;
    let mut acker = b.take_acker();
    let mut chunks_stored = 0u64;
    let mut saved: Option<BootstrapProgress> = None;
    loop {
        let step = match b.next().await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Ok(Err(CopyInterrupted(
                    "the bootstrap stream ended early".into(),
                    saved,
                )));
            }
            Err(BootstrapError::Client(e)) if e.is_retryable() => {
                return Ok(Err(CopyInterrupted(e.to_string(), saved)));
            }
            Err(BootstrapError::Restart(why)) => {
                return Ok(Err(CopyInterrupted(why, None)));
            }
            Err(e) => {
                return Err(PipelineError::Source {
                    addr: cfg.addr.clone(),
                    message: e.to_string(),
                });
            }
        };
        let progress = b.progress().clone();
        let (item, completes_chunk) = match step {
            BootstrapStep::Ops(mut ops) => {
                ops.retain(|op| cfg.filter.passes(op));
                ((!ops.is_empty()).then_some(Item::Ops(ops)), false)
            }
            BootstrapStep::Chunk {
                tree,
                merge_operator,
                from,
                to,
                mut entries,
                completes_chunk,
            } => {
                let item = cfg.filter.tree_passes(&tree).then(|| {
                    if cfg.filter.prefix.is_some() {
                        entries.retain(|(k, _)| cfg.filter.key_passes(k));
                    }
                    Item::Chunk {
                        tree,
                        merge_operator,
                        from,
                        to,
                        entries,
                    }
                });
                (item, completes_chunk)
            }
            BootstrapStep::Done {
                offset,
                gtid_executed,
            } => {
                let pos = Position {
                    server_uuid,
                    offset,
                    gtids: gtid_executed,
                    epoch: progress.epoch.map(tideline_wal::Epoch::new),
                };
                let batch = Batch {
                    source: server_uuid,
                    items: vec![],
                    checkpoint: PipelineCheckpoint::Tail(pos.clone()).encode(),
                };
                write(cfg, st, sink, batch).await?;
                st.update(|s| {
                    s.bootstrap = Some(crate::bootstrap::progress_json(&progress, b.rate()));
                    s.position = Some(pos.clone());
                });
                tracing::info!(pipeline = %cfg.name, keys = progress.keys, "bootstrap complete; following the log");
                return Ok(Ok(pos));
            }
        };
        let batch = Batch {
            source: server_uuid,
            items: item.into_iter().collect(),
            checkpoint: PipelineCheckpoint::Bootstrap(progress.clone()).encode(),
        };
        write(cfg, st, sink, batch).await?;
        saved = Some(progress.clone());
        st.update(|s| s.bootstrap = Some(crate::bootstrap::progress_json(&progress, b.rate())));
        if completes_chunk && let Some(a) = acker.as_mut() {
            chunks_stored += 1;
            if let Err(e) = a.stored(chunks_stored).await {
                return Ok(Err(CopyInterrupted(e.to_string(), saved)));
            }
        }
    }
}
