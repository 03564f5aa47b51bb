//! Phase 1 of `peer-bench replication`, catch-up: the primary's own commit rate, the fill of
//! its log to `--txns` by upstream apply, an empty replica timed until it has caught up, and
//! the apply-only diagnostic (the same log applied locally, no network).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tideline::bench_util::{ASYNC_10MS, bar};
use tideline::node::open_engine;
use tideline_engine::Engine;
use tideline_wal::{Durability, Gtid, NewTransaction, Op};

use super::{
    BenchNode, CONVERGE_TIMEOUT, Ctx, LOG_ONLY, SideRuntime, check_upstream, close_engine,
    durability_label, key, load_parallel, open,
};

/// The primary's own commit rate: one-put transactions from `writers` threads for `seconds`
/// (keys 1, 2, ...). Returns (transactions committed, transactions per second).
pub(super) fn primary_commit_rate(
    engine: &Arc<Engine>,
    writers: usize,
    seconds: f64,
    cap: u64,
    value: &[u8],
) -> anyhow::Result<(u64, f64)> {
    let next = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= cap {
                            break;
                        }
                        engine
                            .put("default", &key(i + 1), value)
                            .context("commit on the primary")?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a committing thread panicked"))??;
        }
        Ok(())
    })?;
    let done = next.load(Ordering::Relaxed).min(cap);
    Ok((done, done as f64 / started.elapsed().as_secs_f64()))
}

/// Fills the primary's log up to `txns` one-put transactions (keys `from + 1` on) as a
/// replica would receive them: transactions of one other origin handed to
/// `apply_upstream_batch` in groups of ~256 KiB. A replica catching up reads them exactly as
/// it reads the primary's own, and the fill takes the same time whatever the primary's own
/// commit rate was.
pub(super) fn fill_primary(
    engine: &Arc<Engine>,
    from: u64,
    txns: u64,
    value: &[u8],
) -> anyhow::Result<f64> {
    let origin = uuid::Uuid::new_v4();
    let group = ((256usize << 10) / (value.len() + 64)).max(1) as u64;
    load_parallel(txns.saturating_sub(from), 2, group, |first, end| {
        let batch = (first..end)
            .map(|i| -> anyhow::Result<NewTransaction> {
                Ok(NewTransaction {
                    gtid: Gtid::new(origin, i + 1).context("bench GTID")?,
                    timestamp_us: 0,
                    ops: vec![Op::Put {
                        tree: "default".into(),
                        key: key(from + i + 1).to_vec(),
                        value: value.to_vec(),
                        before: None,
                    }],
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        engine
            .apply_upstream_batch(batch)
            .context("fill the primary's log")?;
        Ok(())
    })
}

/// Starts an empty replica of `primary` and times it until its `gtid_executed` equals the
/// primary's.
pub(super) async fn catch_up(
    ctx: &Ctx,
    dir: &Path,
    primary: &BenchNode,
    durability: Durability,
) -> anyhow::Result<Value> {
    let engine = open(dir, durability, true).await?;
    let want = primary.engine.gtid_executed();
    let total = primary.engine.position().offset.map_or(0, |o| o.get());
    let label = durability_label(durability);
    let pb = bar(total, &format!("catch-up, {label} replica"));
    // The replication task runs on a runtime of its own, shut down after the measurement:
    // that ends the task and releases the engine, so its store's background work (flushes,
    // compactions) does not run on into the next phases.
    let rt = SideRuntime::new()?;
    let started = Instant::now();
    let status = rt.replicate(ctx, &primary.addr, &engine, LOG_ONLY);
    loop {
        if engine.gtid_executed() == want {
            break;
        }
        check_upstream(Some(&status))?;
        ensure!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the {label} replica did not catch up within {CONVERGE_TIMEOUT:?}"
        );
        pb.set_position(engine.position().offset.map_or(0, |o| o.get()));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let applied = engine.position().offset.map_or(0, |o| o.get());
    ensure!(
        applied == total,
        "the replica applied {applied} transactions, the primary has {total}"
    );
    close_engine(engine).await?;
    drop(rt);
    Ok(json!({
        "durability": label,
        "transactions": total,
        "seconds": secs,
        "txns_per_s": (total as f64 / secs).round(),
    }))
}

/// The engine side of catch-up alone: the primary's log read locally and applied to an empty
/// async engine with [`Engine::apply_upstream_logged`] as the replication task applies it:
/// a reader thread hands over batches like the stream's (about 256 KiB, up to 64 queued)
/// while the engine applies, and each call takes every batch that arrived, up to 16,384
/// transactions (`connectors/src/replica.rs`). No network, no QUIC, no decoding of frames
/// from the wire: what remains when the transport costs nothing. (Applying one 256 KiB batch
/// at a time would measure the log's sync interval instead: the applier sees records only once
/// durable, so each batch waits for the next 10 ms sync.)
///
/// Then the same records, read and grouped the same way, appended to an empty bare log of the
/// same durability (each group encoded, queued and waited for until visible, as the engine's
/// log does it): the rate the engine's apply is measured against (`vs_bare_log`).
pub(super) fn apply_only(primary: &Engine, dir: &Path) -> anyhow::Result<Value> {
    let engine = open_engine(dir, ASYNC_10MS, true)?;
    let wal = primary.wal();
    let total = wal.visible_offset();
    let pb = bar(total, "apply only, async engine");
    let started = Instant::now();
    let applied = replay_grouped(wal, |batch| {
        let n = batch.len() as u64;
        engine
            .apply_upstream_logged(batch)
            .map_err(|r| r.error)
            .context("apply a batch")?;
        pb.inc(n);
        Ok(())
    })?;
    // The last group's call returned once it was logged: the time runs until it is applied.
    ensure!(
        engine
            .wait_all_visible(CONVERGE_TIMEOUT)
            .context("apply the last group")?,
        "the engine did not apply the last group within {CONVERGE_TIMEOUT:?}"
    );
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ensure!(
        applied == total,
        "applied {applied} transactions, the primary's log holds {total}"
    );
    engine.close().context("close the engine")?;
    engine.wal().close().context("close the log")?;

    let bare_dir = dir.join("bare-log");
    let storage = tideline_wal::FileStorage::new(&bare_dir)
        .with_context(|| format!("create {}", bare_dir.display()))?;
    let bare = tideline_wal::Wal::open(
        Arc::new(storage),
        tideline_wal::WalOptions {
            durability: ASYNC_10MS,
            ..tideline_wal::WalOptions::default()
        },
    )
    .context("open the bare log")?;
    let pb = bar(total, "apply only, bare log");
    let started = Instant::now();
    let appended = replay_grouped(wal, |batch| {
        let mut encoded = tideline_wal::Encoded::with_capacity(batch.len());
        let mut last = None;
        for t in &batch {
            let i = bare.encode_into(t, &mut encoded).context("encode")?;
            last = Some(bare.submit_encoded_with(&encoded, i, |_| ())?.0);
        }
        if let Some(last) = last {
            ensure!(
                bare.wait_visible_blocking(last, CONVERGE_TIMEOUT)?,
                "the bare log did not show offset {} within {CONVERGE_TIMEOUT:?}",
                last.get()
            );
        }
        pb.inc(batch.len() as u64);
        Ok(())
    })?;
    let bare_secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    ensure!(
        appended == total,
        "appended {appended} transactions, the primary's log holds {total}"
    );
    bare.close().context("close the bare log")?;
    let rate = applied as f64 / secs;
    let bare_rate = appended as f64 / bare_secs;
    Ok(json!({
        "transactions": applied,
        "seconds": secs,
        "txns_per_s": rate.round(),
        "bare_log_seconds": bare_secs,
        "bare_log_txns_per_s": bare_rate.round(),
        "vs_bare_log": rate / bare_rate,
    }))
}

/// Reads `wal` from its first record on a reader thread that hands over batches of about
/// 256 KiB (up to 64 queued), and calls `apply` with every batch that arrived since its last
/// call, up to 16,384 transactions (as the replication task groups a backlog). Returns the
/// transactions handed to `apply`.
fn replay_grouped(
    wal: &tideline_wal::Wal,
    mut apply: impl FnMut(Vec<NewTransaction>) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    const GROUP_TXNS_MAX: usize = 16_384;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<NewTransaction>>(64);
    let mut applied = 0u64;
    std::thread::scope(|s| -> anyhow::Result<()> {
        let reader = s.spawn(move || -> anyhow::Result<()> {
            let mut reader = wal
                .read_from(tideline_wal::Offset::FIRST)
                .context("read the primary's log")?;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            loop {
                let txn = reader.next_txn().context("read the primary's log")?;
                let end = txn.is_none();
                if let Some(t) = txn {
                    bytes += 48
                        + t.ops
                            .iter()
                            .map(|op| match op {
                                Op::Put { key, value, .. } => key.len() + value.len() + 16,
                                _ => 32,
                            })
                            .sum::<usize>();
                    batch.push(NewTransaction {
                        gtid: t.gtid,
                        timestamp_us: t.timestamp_us,
                        ops: t.ops,
                    });
                }
                if (end || bytes >= 256 << 10) && !batch.is_empty() {
                    if tx.send(std::mem::take(&mut batch)).is_err() {
                        // The applying side stopped on an error of its own.
                        return Ok(());
                    }
                    bytes = 0;
                }
                if end {
                    return Ok(());
                }
            }
        });
        // Owned here, so that an error return drops it and a reader blocked on a full channel
        // wakes and ends before the scope joins it.
        let rx = rx;
        while let Ok(mut batch) = rx.recv() {
            while batch.len() < GROUP_TXNS_MAX {
                match rx.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            applied += batch.len() as u64;
            apply(batch)?;
        }
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the log reader thread panicked"))?
    })?;
    Ok(applied)
}
