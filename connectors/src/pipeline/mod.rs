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
//! set elsewhere: the tail's own rules), or resumes the bootstrap it records; a bootstrap that
//! cannot resume (the source purged the log it needs, or is another node or history) starts
//! again from scratch once the sink has cleared the trees the earlier copy wrote
//! ([`Sink::begin_copy`]). Without one, it starts from [`PipelineConfig::from`]: a bootstrap
//! copy of the source's current state merged with its live log, or a tail position.
//!
//! Every checkpoint records the pipeline's filter; a stored one that the configured filter
//! widens (it lets through changes the stored position went past unwritten) refuses the start
//! ([`PipelineError::FilterWidened`]), as resuming would skip those changes for good.
//!
//! Back-pressure: the pipeline reads one batch ahead of the sink at most (plus what the tail's
//! connection buffers); a slow sink slows only its own pipeline. The source node never waits
//! on it. It reads that batch ahead only while a write goes on past a second (the sink fails,
//! holds or is slow), and shows meanwhile, every second, how far the sink falls behind:
//! `source_head`, `lag_txns` and `lag_seconds` grow with the source, not frozen at what they
//! were when the sink last stored.
//!
//! Owns: the order of steps, the checkpoint's encoding, retries and the [`PipelineStatus`]
//! counters. Must never: store data or a checkpoint itself (only a sink does, with its data),
//! or skip a position (a lost source position ends the pipeline with an error).

mod checkpoint;
pub(crate) mod copy;
pub(crate) mod drive;
mod read;
mod status;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tideline_consumers::{
    Bootstrap, BootstrapError, BootstrapProgress, Checkpoint, CheckpointError, Position, Tail,
    TailConfig, TailStart,
};
use tideline_stream::{Client, ClientConfig};
use tideline_wal::Op;

use crate::sink::{Batch, Sink};
pub use checkpoint::PipelineCheckpoint;
use copy::{CopyStop, SourceEnd};
use drive::{Driver, Relearn, SourceTrees};
use read::{ReadAhead, Reader, Unstored};
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
    pub(crate) fn tree_passes(&self, tree: &str) -> bool {
        self.trees.is_empty() || self.trees.iter().any(|t| t == tree)
    }

    pub(crate) fn key_passes(&self, key: &[u8]) -> bool {
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

/// `trees [a, b], prefix "us", ops [put]`; `all` and `none` where it does not filter.
impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |l: &[String]| {
            if l.is_empty() {
                "all".to_string()
            } else {
                format!("[{}]", l.join(", "))
            }
        };
        let prefix = match &self.prefix {
            None => "none".to_string(),
            Some(p) => match std::str::from_utf8(p) {
                Ok(p) => format!("{p:?}"),
                Err(_) => format!("\"{}\"", p.escape_ascii()),
            },
        };
        write!(
            f,
            "trees {}, prefix {prefix}, ops {}",
            list(&self.trees),
            list(&self.ops)
        )
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
    /// The configured filter lets through changes that the filter stored with the sink's
    /// position dropped: resuming would never write those up to that position.
    #[error(
        "sink {sink} holds a position stored with the filter ({stored}), and this pipeline's \
         filter ({configured}) lets through changes that one left out: resuming would skip \
         those up to the stored position without writing them, so the pipeline does not \
         start. Restore the earlier filter (or a narrower one); or, to have everything the new \
         filter lets through, clear the sink's position and what the pipeline wrote \
         (docs/OPERATIONS.md, \"Pipelines and sinks\") so that it starts again from `from` (bootstrap \
         or earliest)"
    )]
    FilterWidened {
        /// The sink.
        sink: String,
        /// The filter stored with the sink's position.
        stored: Box<Filter>,
        /// The pipeline's filter now.
        configured: Box<Filter>,
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
    let d = Driver::of(&cfg, st);
    let stored_bytes = d.open(&mut *sink).await?;
    let stored = resume_point(&sink.describe(), stored_bytes.as_deref(), &cfg.filter)?;
    let trees = source_trees(&cfg, &d, st).await?;
    trees.hand_to(&mut *sink);
    let source = SourceOperators {
        cfg: &cfg,
        handed: std::sync::Mutex::new(trees),
    };
    let position = match stored {
        Some(PipelineCheckpoint::Tail(p)) => Some(p),
        Some(PipelineCheckpoint::Bootstrap(p)) => {
            // The trees the stored copy wrote; a checkpoint of an earlier build names none, and
            // then a pipeline limited to some trees can have written no others.
            let trees = stored_bytes
                .as_deref()
                .and_then(PipelineCheckpoint::copied_trees)
                .or_else(|| {
                    (!cfg.filter.trees.is_empty())
                        .then(|| cfg.filter.trees.iter().cloned().collect())
                });
            Some(bootstrap(&cfg, &d, &source, st, &mut *sink, Some(p), trees).await?)
        }
        None if cfg.from == StartFrom::Bootstrap => {
            let trees = Some(std::collections::BTreeSet::new());
            Some(bootstrap(&cfg, &d, &source, st, &mut *sink, None, trees).await?)
        }
        None => None,
    };
    follow(&cfg, &d, &source, st, &mut *sink, position).await
}

/// Where a pipeline with `filter` resumes, given the checkpoint `stored` that its sink
/// (`sink` describes it) returned from [`Sink::open`]: `None` when there is none (it starts
/// from [`PipelineConfig::from`]). Refuses a checkpoint this pipeline did not write
/// ([`PipelineError::Checkpoint`]), and one stored under a filter that `filter` widens
/// ([`PipelineError::FilterWidened`]). [`run`] asks it before it moves anything, and so does
/// `tideline connect --check`.
pub fn resume_point(
    sink: &str,
    stored: Option<&[u8]>,
    filter: &Filter,
) -> Result<Option<PipelineCheckpoint>, PipelineError> {
    let Some(bytes) = stored else {
        return Ok(None);
    };
    let bad = |reason| PipelineError::Checkpoint {
        sink: sink.to_owned(),
        reason,
    };
    let checkpoint = PipelineCheckpoint::decode(bytes).map_err(bad)?;
    // A position stored under a narrower filter went past what that filter dropped.
    if let Some(earlier) = PipelineCheckpoint::stored_filter(bytes).map_err(bad)?
        && checkpoint::widened(&earlier, filter)
    {
        return Err(PipelineError::FilterWidened {
            sink: sink.to_owned(),
            stored: Box::new(earlier),
            configured: Box::new(filter.clone()),
        });
    }
    Ok(Some(checkpoint))
}

/// What the source's `status` says of its trees (see [`SourceTrees`]), so that a sink storing
/// values can resolve merges on trees created before the pipeline started, and go past merges
/// on trees dropped since. Retries a passing fault like the tail does; a node that does not
/// report them gives none.
async fn source_trees(
    cfg: &PipelineConfig,
    d: &Driver<'_>,
    st: &SharedPipelineStatus,
) -> Result<SourceTrees, PipelineError> {
    let mut failures = 0u32;
    loop {
        match read_source_trees(cfg).await {
            Ok(trees) => {
                if failures > 0 {
                    st.update(|s| s.last_error = None);
                }
                return Ok(trees);
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(pipeline = %cfg.name, error = %e, "source unreachable; retrying");
                st.update(|s| s.last_error = Some(format!("source {}: {e}", cfg.addr)));
                tokio::time::sleep(d.backoff(failures)).await;
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

/// One read of the source's trees (see [`source_trees`]).
async fn read_source_trees(
    cfg: &PipelineConfig,
) -> Result<SourceTrees, tideline_stream::ClientError> {
    let client = Client::connect(&cfg.addr, cfg.client.clone()).await?;
    let status = client.status().await;
    client.close().await;
    let v: serde_json::Value = serde_json::from_str(&status?).unwrap_or_default();
    Ok(parse_source_trees(&v, &cfg.filter))
}

/// [`SourceTrees`] from a `status` document. The list of trees is left out when `filter`
/// keeps `drop_tree` from the sink: a tree missing from it then has no drop to follow.
fn parse_source_trees(status: &serde_json::Value, filter: &Filter) -> SourceTrees {
    let operators = status["merge_operators"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(t, o)| Some((t.clone(), o.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let drops_pass = filter.ops.is_empty() || filter.ops.iter().any(|o| o == "drop_tree");
    // `status` reads its position before its trees: the list is no older than `last_offset`.
    let trees = match (status["trees"].as_array(), status["last_offset"].as_u64()) {
        (Some(names), Some(as_of)) if drops_pass => names
            .iter()
            .map(|n| n.as_str().map(str::to_owned))
            .collect::<Option<BTreeSet<String>>>()
            .map(|names| (names, as_of)),
        _ => None,
    };
    SourceTrees { operators, trees }
}

/// What the source's `status` said of its trees when last handed to the sink, read again when
/// a write holds ([`Relearn`]).
struct SourceOperators<'a> {
    cfg: &'a PipelineConfig,
    handed: std::sync::Mutex<SourceTrees>,
}

impl Relearn for SourceOperators<'_> {
    fn read_again(&self) -> crate::sink::SinkFuture<'_, Option<(SourceTrees, bool)>> {
        Box::pin(async move {
            let now = match read_source_trees(self.cfg).await {
                Ok(now) => now,
                Err(e) => {
                    tracing::warn!(pipeline = %self.cfg.name, error = %e, "could not read the source's trees again");
                    return None;
                }
            };
            let mut handed = self.handed.lock().unwrap_or_else(|p| p.into_inner());
            let changed = now.differs(&handed);
            handed.clone_from(&now);
            Some((now, changed))
        })
    }
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
    d: &Driver<'_>,
    source: &dyn Relearn,
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
    let mut reader = Reader {
        cfg,
        tail: tideline_consumers::tail(tcfg, Some(Box::new(FromSink(position.clone())))),
        ahead: ReadAhead::default(),
    };
    let mut written = position;
    st.update(|s| {
        s.enter(PipelineState::Running);
        if let Some(p) = &written {
            s.position = Some(p.clone());
        }
    });
    let mut last_write = Instant::now();
    let mut outage = SourceOutage::default();
    loop {
        let (items, end) = reader.next_batch().await?;
        outage.observe(cfg, st, &reader.tail);
        // The head of the node subscribed to now: offsets are per node, so after a switch to
        // another node a maximum over both would measure the lag against the wrong log.
        let head = reader.tail.head();
        let pos = reader.tail.position();
        st.update(|s| s.source_head = head);
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
        let unstored = Unstored::of(written.as_ref(), &pos, &items);
        let batch = Batch {
            source: pos.server_uuid,
            items,
            checkpoint: PipelineCheckpoint::Tail(pos.clone()).encode(),
        };
        reader
            .write_watching(d, source, st, sink, batch, &unstored)
            .await?;
        last_write = Instant::now();
        // The tail may have read on during the write, and learnt a later head.
        let head = if unstored.is_on(&reader.tail) {
            reader.tail.head()
        } else {
            head
        };
        st.update(|s| s.caught_up_to(&pos, head));
        written = Some(pos);
    }
}

/// What the status shows of the source's link, as the tail reports it: the tail reconnects by
/// itself and only says so through [`Tail::disconnected`], so the pipeline looks after every
/// wait (at most a second apart). A source out of reach is one outage (`retrying`, its error in
/// `last_error`), each of the tail's failures one error; a source subscribed again ends it.
#[derive(Default)]
struct SourceOutage {
    /// The tail's failures already counted in this outage; `None` while the source is up.
    counted: Option<u32>,
}

impl SourceOutage {
    fn observe(&mut self, cfg: &PipelineConfig, st: &SharedPipelineStatus, tail: &Tail) {
        match tail.disconnected() {
            Some(d) => {
                let first = self.counted.is_none();
                let new = d.failures.saturating_sub(self.counted.unwrap_or(0));
                self.counted = Some(d.failures);
                if first {
                    tracing::warn!(pipeline = %cfg.name, source = %cfg.addr, error = %d.error, "source out of reach; the tail reconnects");
                }
                st.update(|s| {
                    s.errors_total += u64::from(new);
                    if first {
                        s.outages_total += 1;
                    }
                    s.state = PipelineState::Retrying;
                    s.last_error = Some(format!("source {}: {}", cfg.addr, d.error));
                });
            }
            None => {
                if self.counted.take().is_some() {
                    tracing::info!(pipeline = %cfg.name, source = %cfg.addr, "source reachable again");
                    st.update(|s| {
                        s.state = PipelineState::Running;
                        s.last_error = None;
                    });
                }
            }
        }
    }
}

/// Copies the source's state into the sink (resuming `stored` when given), storing progress
/// with every batch; returns the position the live tail takes over at. `trees`: what the sink
/// holds of a copy (see [`copy::CopiedTrees`]); a copy that cannot resume starts again from
/// scratch, and the sink clears those first.
async fn bootstrap(
    cfg: &PipelineConfig,
    d: &Driver<'_>,
    source: &dyn Relearn,
    st: &SharedPipelineStatus,
    sink: &mut dyn Sink,
    mut stored: Option<BootstrapProgress>,
    mut trees: copy::CopiedTrees,
) -> Result<Position, PipelineError> {
    let source_err = |message: String| PipelineError::Source {
        addr: cfg.addr.clone(),
        message,
    };
    let mut failures = 0u32;
    loop {
        if failures > 0 {
            tokio::time::sleep(d.backoff(failures - 1)).await;
        }
        st.update(|s| s.enter(PipelineState::Bootstrapping));
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
                tracing::warn!(pipeline = %cfg.name, reason = %why, "the bootstrap cannot resume; copying again from scratch, after the sink clears what the earlier copy wrote");
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
            // A copy from scratch the node will not serve now (a reset of its history raced
            // the start): a passing fault, tried again like a lost connection.
            Err(e @ BootstrapError::Restart(_)) => {
                tracing::warn!(pipeline = %cfg.name, error = %e, "the source refused to start the bootstrap; trying again from scratch");
                st.update(|s| s.last_error = Some(e.to_string()));
                stored = None;
                failures += 1;
                continue;
            }
            Err(e) => return Err(source_err(e.to_string())),
        };
        let copied = copy::copy_learning(d, &cfg.filter, sink, b, &mut trees, Some(source)).await;
        let (why, progress) = match copied {
            Ok(pos) => {
                tracing::info!(pipeline = %cfg.name, "bootstrap complete; following the log");
                return Ok(pos);
            }
            Err(CopyStop::Sink(e)) => return Err(e),
            Err(CopyStop::Source(end, saved)) => match end {
                SourceEnd::Ended => ("the bootstrap stream ended early".to_string(), saved),
                SourceEnd::Ack(e) => (e.to_string(), saved),
                SourceEnd::Failed(BootstrapError::Client(e)) if e.is_retryable() => {
                    (e.to_string(), saved)
                }
                // The node will not go on with this copy: it begins again from scratch, and
                // the sink clears what it wrote (`trees`). Never again from the progress this
                // connection started from: the node may accept that one (its history
                // unchanged, a log read failed) and send the steps stored since once more,
                // live records among them, whose merges would count twice.
                SourceEnd::Failed(e @ BootstrapError::Restart(_)) => {
                    tracing::warn!(pipeline = %cfg.name, error = %e, "the source ended the bootstrap; copying again from scratch, after the sink clears what the earlier copy wrote");
                    st.update(|s| s.last_error = Some(e.to_string()));
                    stored = None;
                    failures += 1;
                    continue;
                }
                SourceEnd::Failed(e) => return Err(source_err(e.to_string())),
            },
        };
        tracing::warn!(pipeline = %cfg.name, error = %why, "bootstrap interrupted; resuming");
        st.update(|s| s.last_error = Some(why));
        stored = progress.or(stored);
        failures += 1;
    }
}
