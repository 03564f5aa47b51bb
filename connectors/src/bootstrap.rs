//! A replica's bootstrap: copy the upstream's state in chunks merged with its live log, store
//! progress with every step, and hand over to ordinary replication at the end.
//!
//! Receiving and applying overlap: one task reads steps off the stream while this one writes
//! the previous step into the store (chunks go straight into the store, not the log, with the
//! progress record in the same atomic batch). A replica killed at any point resumes from the
//! last step it stored, so at most the chunk in flight is sent again.
//!
//! Owns: one bootstrap at a time per process, its progress in `status`. Must never: call back
//! into `replica` (replication decides when to bootstrap; this module only copies), or record
//! a GTID set over state it has not stored.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tideline_consumers::{Bootstrap, BootstrapError, BootstrapProgress, BootstrapStep};
use tideline_engine::{Engine, RestoreOp};
use tideline_stream::Client;
use tideline_wal::GtidSet;

use crate::status::{SharedStatus, UpstreamState, update};
use crate::stop::{Stop, classify};

/// Steps received ahead of the store.
const PIPELINE_STEPS: usize = 4;

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

/// Runs (or resumes) a bootstrap from `client`'s node into `engine`; returns the GTID set the
/// copy holds, from which replication continues.
pub(crate) async fn run(
    client: &Client,
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
    let mut b = started.map_err(bootstrap_stop)?;
    if b.progress().resumes == 0 {
        // A fresh start (or a restart from scratch): wipe and record the starting point.
        let (eng, p) = (engine.clone(), b.progress().to_json());
        blocking(move || eng.bootstrap_begin(&p)).await?;
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
    let bar = progress_bar(b.progress());
    let mut acker = b
        .take_acker()
        .ok_or_else(|| Stop::Fatal("internal: bootstrap acker taken twice".into()))?;
    let mut chunks_stored = 0u64;

    let (tx, mut rx) = tokio::sync::mpsc::channel(PIPELINE_STEPS);
    let receiver = tokio::spawn(async move {
        loop {
            let step = b.next().await;
            let done = matches!(step, Ok(None) | Err(_));
            let item = step.map(|s| s.map(|s| (s, b.progress().clone(), b.rate())));
            if tx.send(item).await.is_err() || done {
                return;
            }
        }
    });
    let started_at = Instant::now();
    // Where the time goes: waiting for the stream, or storing.
    let (mut waited, mut storing) = (Duration::ZERO, Duration::ZERO);
    let mut last_log = Instant::now();
    let result = loop {
        let wait_started = Instant::now();
        let item = rx.recv().await;
        waited += wait_started.elapsed();
        let Some(item) = item else {
            break Err(Stop::Retry("the bootstrap stream ended early".into()));
        };
        let (step, progress, rate) = match item {
            Ok(Some(x)) => x,
            Ok(None) => break Err(Stop::Retry("the bootstrap stream ended early".into())),
            Err(e) => break Err(bootstrap_stop(e)),
        };
        let completes_chunk = matches!(
            step,
            BootstrapStep::Chunk {
                completes_chunk: true,
                ..
            }
        );
        let ops = match step {
            BootstrapStep::Ops(ops) => ops.into_iter().map(RestoreOp::Op).collect(),
            BootstrapStep::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
                ..
            } => vec![RestoreOp::Chunk {
                tree,
                merge_operator,
                from,
                to,
                entries,
            }],
            BootstrapStep::Done {
                gtid_executed,
                offset,
            } => {
                let (eng, set) = (engine.clone(), gtid_executed.clone());
                if let Err(e) = blocking(move || eng.bootstrap_finish(&set)).await {
                    break Err(e);
                }
                bar.finish_and_clear();
                update(st, |s| {
                    s.received = s.received.union(&gtid_executed);
                    s.applied_offset = offset;
                    s.upstream_head = s.upstream_head.max(offset);
                    s.lag_txns = s.upstream_head.saturating_sub(offset);
                    s.bootstrap = Some(progress_json(&progress, rate));
                });
                tracing::info!(
                    upstream = %addr,
                    chunks = progress.chunks,
                    keys = progress.keys,
                    bytes = progress.bytes,
                    seconds = started_at.elapsed().as_secs_f64(),
                    waiting_for_stream_s = waited.as_secs_f64(),
                    storing_s = storing.as_secs_f64(),
                    gtid_executed = %gtid_executed,
                    "bootstrap complete; replicating from the handover point"
                );
                break Ok(gtid_executed);
            }
        };
        let (eng, p) = (engine.clone(), progress.to_json());
        let store_started = Instant::now();
        if let Err(e) = blocking(move || eng.bootstrap_apply(ops, &p)).await {
            break Err(e);
        }
        storing += store_started.elapsed();
        if completes_chunk {
            chunks_stored += 1;
            if let Err(e) = acker.stored(chunks_stored).await {
                break Err(classify(e));
            }
        }
        bar.set_length(progress.bytes_estimate_now());
        bar.set_position(progress.bytes);
        bar.set_message(format!(
            "tree {} · {} chunks",
            progress.tree, progress.chunks
        ));
        update(st, |s| s.bootstrap = Some(progress_json(&progress, rate)));
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            tracing::info!(
                upstream = %addr,
                tree = %progress.tree,
                chunks = progress.chunks,
                bytes = progress.bytes,
                percent = (progress.fraction() * 100.0).round(),
                rate_mb_s = (rate / 1e6).round(),
                "bootstrapping"
            );
        }
    };
    receiver.abort();
    if result.is_err() {
        bar.abandon();
    }
    result
}

fn bootstrap_stop(e: BootstrapError) -> Stop {
    match e {
        BootstrapError::Client(c) => classify(c),
        BootstrapError::Restart(why) => Stop::Retry(format!("bootstrap must restart: {why}")),
        BootstrapError::Protocol(p) => Stop::Retry(format!("bootstrap stream broken: {p}")),
        other => Stop::Retry(other.to_string()),
    }
}

async fn blocking(
    f: impl FnOnce() -> Result<(), tideline_engine::WriteError> + Send + 'static,
) -> Result<(), Stop> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Stop::Fatal(format!("bootstrap task failed: {e}")))?
        .map_err(|e| Stop::Fatal(format!("writing the bootstrap into the store failed: {e}")))
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
