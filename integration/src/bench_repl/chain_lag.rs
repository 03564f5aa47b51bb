//! Phase 2 of `peer-bench replication`, lag: a chain A→B→C, a paced writer on A, and a
//! consumer on every node recording commit-on-A to receipt, summed up as percentiles per hop.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tideline::bench_util::{bar, collect_delays, percentile};
use tideline_stream::{Client, ClientConfig, Start};
use tideline_wal::Durability;

use super::{Ctx, ReplBenchArgs, check_upstream, durability_label, key, start_node};

/// Chain A→B→C of `durability`; a paced writer on A; a consumer on each node records
/// commit-on-A to receipt for every transaction (per hop: A's own tail, then B, then C).
pub(super) async fn chain_lag(
    ctx: &Ctx,
    root: &Path,
    args: &ReplBenchArgs,
    durability: Durability,
) -> anyhow::Result<Value> {
    let label = durability_label(durability);
    let dir = |n: &str| root.join(format!("chain-{label}-{n}"));
    let a = start_node(ctx, &dir("a"), durability, None).await?;
    let b = start_node(ctx, &dir("b"), durability, Some(&a.addr)).await?;
    let c = start_node(ctx, &dir("c"), durability, Some(&b.addr)).await?;

    // One transaction through the whole chain proves every link is up before timing starts.
    let ea = a.engine.clone();
    let first = tokio::task::spawn_blocking(move || ea.put("default", b"chain-ready", b"1"))
        .await
        .context("write task failed")?
        .context("commit on A")?;
    let started = Instant::now();
    while !c.engine.gtid_executed().contains(&first.gtid) {
        check_upstream(b.upstream.as_ref())?;
        check_upstream(c.upstream.as_ref())?;
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the chain A→B→C did not deliver its first transaction within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let count = ((args.lag_rate as f64 * args.lag_seconds).round() as u64).max(1);
    // A consumer on every node shows where the delay accrues; the goal is C's.
    let mut consumers = Vec::new();
    for node in [&a, &b, &c] {
        consumers.push(lag_consumer(&node.addr, ctx.client_cfg.clone(), count).await?);
    }
    let (ea, rate, value, writers) = (
        a.engine.clone(),
        args.lag_rate,
        vec![0x6cu8; args.value_bytes],
        args.lag_writers,
    );
    let pb = bar(count, &format!("paced writes on A ({label})"));
    // Transaction i is due at (i - 1) / rate after the start; a pool of committers takes
    // them in order, so that the rate holds although each commit waits for its durability
    // (under async up to the fsync interval: README, "Durability").
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let next = AtomicU64::new(1);
        let started = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let handles: Vec<_> = (0..writers)
                .map(|_| {
                    s.spawn(|| -> anyhow::Result<()> {
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i > count {
                                return Ok(());
                            }
                            let due =
                                started + Duration::from_secs_f64((i - 1) as f64 / rate as f64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep(due - now);
                            }
                            ea.put("default", &key(i), &value).context("commit on A")?;
                            pb.inc(1);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a paced writer panicked"))??;
            }
            Ok(())
        })?;
        pb.finish_and_clear();
        Ok(count as f64 / started.elapsed().as_secs_f64())
    });
    let achieved = writer.await.context("writer task failed")??;
    let mut lats = Vec::new();
    for (name, consumer) in ["A", "B", "C"].into_iter().zip(consumers) {
        let lat = tokio::time::timeout(Duration::from_secs(120), consumer)
            .await
            .with_context(|| {
                format!("{name} did not deliver every transaction within 120 s of the last commit")
            })?
            .context("consumer task failed")??;
        lats.push(lat_summary(lat));
    }
    let [at_a, at_b, at_c]: [Value; 3] = lats
        .try_into()
        .map_err(|_| anyhow::anyhow!("internal: one summary per node"))?;

    c.stop().await?;
    b.stop().await?;
    a.stop().await?;

    Ok(json!({
        "durability": label,
        "writers": args.lag_writers,
        "target_rate_per_s": args.lag_rate,
        "achieved_rate_per_s": achieved.round(),
        "at_a": at_a,
        "at_b": at_b,
        "at_c": at_c,
    }))
}

/// Subscribes to `addr` from `latest` and collects, for `count` transactions, receive time
/// minus the origin's commit timestamp, in microseconds.
async fn lag_consumer(
    addr: &str,
    cfg: ClientConfig,
    count: u64,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Vec<i64>>>> {
    let client = Client::connect(addr, cfg)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    let mut sub = client
        .subscribe(Start::Latest, None, None, None)
        .await
        .with_context(|| format!("subscribe to {addr} from latest"))?;
    Ok(tokio::spawn(async move {
        let lat = collect_delays(&mut sub, count).await?;
        drop(sub);
        client.close().await;
        Ok(lat)
    }))
}

/// Percentiles of one consumer's delays; the first 1% (connections and caches warming up) is
/// left out.
fn lat_summary(mut lat: Vec<i64>) -> Value {
    let received = lat.len();
    let warmup = received / 100;
    let mut sample = lat.split_off(warmup);
    sample.sort_unstable();
    json!({
        "transactions": received,
        "warmup_left_out": warmup,
        "p50_us": percentile(&sample, 0.50),
        "p90_us": percentile(&sample, 0.90),
        "p99_us": percentile(&sample, 0.99),
        "p999_us": percentile(&sample, 0.999),
        "max_us": sample.last().copied().unwrap_or(0),
    })
}
