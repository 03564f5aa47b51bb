//! A replica's bootstrap: the decision to copy (resume the stored copy, or start again from
//! scratch), and what `status`, the log and a terminal show while it runs. The copy itself is
//! the pipeline's ([`crate::pipeline::copy`]): chunks merged with the upstream's live log, each
//! step stored by the engine sink with the copy's progress in the same atomic store batch, so a
//! replica killed at any point resumes from the last step it stored.
//!
//! Owns: one bootstrap at a time per process, its progress in `status`. Must never: call back
//! into `replica` (replication decides when to bootstrap; this module only copies), or record
//! a GTID set over state it has not stored.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tideline_consumers::{Bootstrap, BootstrapError, BootstrapProgress, Position};
use tideline_engine::Engine;
use tideline_stream::Client;
use tideline_wal::GtidSet;

use crate::pipeline::copy::{self, CopyStop, SourceEnd};
use crate::pipeline::drive::{Driver, Report};
use crate::pipeline::{Filter, PipelineError};
use crate::sink::SinkError;
use crate::sink::engine::EngineSink;
use crate::status::{SharedStatus, UpstreamState, update};
use crate::stop::{Stop, classify};

/// Held by the one bootstrap running in this process (a process has one engine): two copies
/// into the same store would wipe each other, and the first to finish would record a full
/// GTID set over partial state.
static RUNNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What `status` shows of a bootstrap in progress.
pub(crate) fn progress_json(p: &BootstrapProgress, rate: f64) -> serde_json::Value {
    let total = p.bytes_estimate_now();
    let left = total.saturating_sub(p.bytes) as f64;
    let eta = (rate > 0.0).then(|| (left / rate * 10.0).round() / 10.0);
    json!({
        "tree": p.tree,
        "trees_done": p.trees_done,
        "chunks": p.chunks,
        "keys": p.keys,
        "bytes": p.bytes,
        "bytes_estimate": total,
        "keys_estimate": p.keys_estimate,
        "percent": (p.fraction() * 1000.0).round() / 10.0,
        "rate_bytes_per_s": rate.round(),
        "eta_s": eta,
        "live_records": p.records,
        "resumes": p.resumes,
    })
}

/// Runs (or resumes) a bootstrap from `client`'s node into `sink`'s engine; returns the GTID
/// set the copy holds, from which replication continues.
pub(crate) async fn run(
    client: &Client,
    sink: &mut EngineSink,
    engine: &Arc<Engine>,
    st: &SharedStatus,
    addr: &str,
    chunk_bytes: u64,
) -> Result<GtidSet, Stop> {
    let _running = RUNNING.try_lock().map_err(|_| {
        Stop::Retry(format!(
            "another upstream task of this replica is running its bootstrap; {addr} waits until \
             it has finished"
        ))
    })?;
    let stored = engine
        .bootstrap_progress()
        .and_then(|b| BootstrapProgress::from_json(&b));
    let resuming = stored.is_some();
    let started = match Bootstrap::start(client, stored, chunk_bytes).await {
        Err(BootstrapError::Restart(why)) if resuming => {
            tracing::warn!(upstream = %addr, reason = %why, "bootstrap cannot resume; starting again from scratch");
            Bootstrap::start(client, None, chunk_bytes).await
        }
        other => other.inspect(|b| {
            if resuming {
                tracing::info!(upstream = %addr, chunks = b.progress().chunks, "resuming the bootstrap after its last stored chunk");
            }
        }),
    };
    let b = started.map_err(bootstrap_stop)?;
    if b.progress().resumes == 0 {
        tracing::info!(
            upstream = %addr,
            keys_estimate = b.progress().keys_estimate,
            "bootstrapping from a snapshot of the upstream"
        );
    }
    update(st, |s| {
        s.state = UpstreamState::Bootstrapping;
        s.error = None;
        s.bootstrap = Some(progress_json(b.progress(), 0.0));
    });
    let report = CopyReport {
        st: st.clone(),
        addr,
        bar: progress_bar(b.progress()),
        started_at: Instant::now(),
        last_log: Mutex::new(Instant::now()),
    };
    let d = driver(addr, &report);
    // The engine sink wipes the whole engine when a copy begins: it needs no list of trees.
    let result = copy::copy(&d, &Filter::default(), sink, b, &mut None).await;
    match result {
        Ok(pos) => Ok(pos.gtids),
        Err(stop) => {
            report.bar.abandon();
            Err(match stop {
                CopyStop::Sink(e) => sink_stop(e),
                CopyStop::Source(SourceEnd::Ended, _) => {
                    Stop::Retry("the bootstrap stream ended early".into())
                }
                CopyStop::Source(SourceEnd::Failed(e), _) => bootstrap_stop(e),
                CopyStop::Source(SourceEnd::Ack(e), _) => classify(e),
            })
        }
    }
}

/// The driver of a replica's calls into its engine sink: the replica's own backoff (100 ms
/// doubling to 5 s), reporting to `report`.
pub(crate) fn driver<'a>(addr: &'a str, report: &'a dyn Report) -> Driver<'a> {
    Driver {
        name: addr,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(5),
        hold_pause: Duration::from_secs(5),
        report,
        stamp: None,
    }
}

/// A sink error that stops a replica's session. The engine sink's fatal errors are a store
/// failure (the engine is fail-stop) or input the engine refuses.
pub(crate) fn sink_stop(e: PipelineError) -> Stop {
    match e {
        PipelineError::Sink { message, .. } => Stop::Fatal(message),
        other => Stop::Fatal(other.to_string()),
    }
}

/// What a copy shows: the upstream's status, a progress bar on a terminal, a log line every
/// few seconds.
struct CopyReport<'a> {
    st: SharedStatus,
    addr: &'a str,
    bar: ProgressBar,
    started_at: Instant,
    last_log: Mutex<Instant>,
}

impl Report for CopyReport<'_> {
    fn sink_failed(&self, e: &SinkError, _first: bool) {
        update(&self.st, |s| s.error = Some(e.to_string()));
    }

    fn sink_recovered(&self) {
        update(&self.st, |s| s.error = None);
    }

    fn wrote(&self, _txns: u64, _changes: u64, _last_ts_us: Option<i64>) {}

    fn copy_step(&self, progress: &BootstrapProgress, rate: f64) {
        self.bar.set_length(progress.bytes_estimate_now());
        self.bar.set_position(progress.bytes);
        self.bar.set_message(format!(
            "tree {} · {} chunks",
            progress.tree, progress.chunks
        ));
        update(&self.st, |s| {
            s.bootstrap = Some(progress_json(progress, rate))
        });
        let mut last_log = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last_log.elapsed() >= Duration::from_secs(5) {
            *last_log = Instant::now();
            tracing::info!(
                upstream = %self.addr,
                tree = %progress.tree,
                chunks = progress.chunks,
                bytes = progress.bytes,
                percent = (progress.fraction() * 100.0).round(),
                rate_mb_s = (rate / 1e6).round(),
                "bootstrapping"
            );
        }
    }

    fn copy_done(&self, pos: &Position, progress: &BootstrapProgress, rate: f64) {
        self.bar.finish_and_clear();
        update(&self.st, |s| {
            s.received = s.received.union(&pos.gtids);
            s.applied_offset = pos.offset;
            s.upstream_head = s.upstream_head.max(pos.offset);
            s.lag_txns = s.upstream_head.saturating_sub(pos.offset);
            s.bootstrap = Some(progress_json(progress, rate));
        });
        tracing::info!(
            upstream = %self.addr,
            chunks = progress.chunks,
            keys = progress.keys,
            bytes = progress.bytes,
            seconds = self.started_at.elapsed().as_secs_f64(),
            gtid_executed = %pos.gtids,
            "bootstrap complete; replicating from the handover point"
        );
    }
}

fn bootstrap_stop(e: BootstrapError) -> Stop {
    match e {
        BootstrapError::Client(c) => classify(c),
        BootstrapError::Restart(why) => Stop::Retry(format!("bootstrap must restart: {why}")),
        BootstrapError::Protocol(p) => Stop::Retry(format!("bootstrap stream broken: {p}")),
        other => Stop::Retry(other.to_string()),
    }
}

/// A byte progress bar on a terminal; hidden otherwise (status and logs carry progress).
fn progress_bar(p: &BootstrapProgress) -> ProgressBar {
    let bar =
        ProgressBar::with_draw_target(Some(p.bytes_estimate_now()), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "bootstrap {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(p.bytes);
    bar
}
