//! Phase 4 of `peer-bench replication`, bootstrap: a primary loaded with keys in batched
//! transactions, settled, and an empty replica timed while it copies the state in chunks.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tideline::bench_util::{ASYNC_10MS, bar};
use tideline_connectors::{BootstrapMode, ReplicaOptions, UpstreamState};
use tideline_engine::Engine;

use super::{
    CONVERGE_TIMEOUT, Ctx, LOG_ONLY, SideRuntime, check_upstream, close_engine, key, load_parallel,
    open, start_node,
};

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
pub(super) async fn bootstrap_copy(
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
        "chunks_in_flight": ctx.bootstrap_chunks_in_flight,
        "chunk_bytes": chunk_bytes,
    }))
}
