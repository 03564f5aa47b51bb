//! Commit-to-consumer latency under a paced writer.

use std::path::Path;
use std::time::{Duration, Instant};
use tideline::bench_util::{ASYNC_10MS, collect_delays, open_wal_with, percentile, put};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tideline_stream::{Node, Start};
use tideline_wal::{Gtid, NewTransaction};

use super::*;

/// A writer commits `count` transactions paced at `rate`/s, each stamped with the time of its
/// submit; one consumer tailing from `latest` records receive time − stamp for each.
/// `skip_fsync` runs the same without the log's periodic fsync (a diagnostic).
pub(super) fn latency(
    ctx: &Ctx,
    dir: &Path,
    rate: u64,
    count: u64,
    value: &[u8],
    skip_fsync: bool,
) -> anyhow::Result<(Vec<i64>, f64)> {
    let (server_rt, client_rt) = (&ctx.server_rt, &ctx.client_rt);
    let wal = open_wal_with(dir, ASYNC_10MS, skip_fsync)?;
    let server = start_server(
        server_rt,
        wal,
        &ctx.server_secrets,
        ctx.consumer_buffer_bytes,
    )?;
    let (addr, secrets) = (server.addr, ctx.client_secrets.clone());
    // Subscribe first, then let the writer go.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let consumer = client_rt.start_task(async move {
        let client = connect(addr, secrets).await?;
        let mut sub = client
            .subscribe(Start::Latest, None, None, None)
            .await
            .context("subscribe from latest")?;
        let _ = ready_tx.send(());
        let lat = collect_delays(&mut sub, count).await?;
        drop(sub);
        client.close().await;
        Ok::<_, anyhow::Error>(lat)
    });
    if ready_rx.recv().is_err() {
        // The consumer ended before subscribing: its own error says why.
        consumer.recv().context("the latency consumer vanished")??;
        bail!("the latency consumer ended before subscribing");
    }
    let wal = server.node.wal();
    let uuid = wal.server_uuid();
    let started = Instant::now();
    for seq in 1..=count {
        let due = started + Duration::from_secs_f64((seq - 1) as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        wal.submit(NewTransaction {
            gtid: Gtid::new(uuid, seq)?,
            timestamp_us: tideline::now_us(),
            ops: put(seq, value),
        })?
        .wait()?;
    }
    let achieved = count as f64 / started.elapsed().as_secs_f64();
    let lat = consumer.recv().context("the latency consumer vanished")??;
    server.stop(server_rt)?;
    Ok((lat, achieved))
}

/// Percentiles of one latency run; the first 1% (connection warm-up) is left out.
pub(super) fn latency_summary((mut lat, achieved): (Vec<i64>, f64)) -> Value {
    let count = lat.len();
    let warmup = count / 100;
    let mut sample = lat.split_off(warmup);
    sample.sort_unstable();
    json!({
        "achieved_rate_per_s": achieved.round(),
        "transactions": count,
        "warmup_left_out": warmup,
        "p50_us": percentile(&sample, 0.50),
        "p99_us": percentile(&sample, 0.99),
        "p999_us": percentile(&sample, 0.999),
        "max_us": sample.last().copied().unwrap_or(0),
    })
}
