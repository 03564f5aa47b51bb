//! `peer-bench stream`: tails over QUIC beside a bare quinn stream and PostgreSQL logical
//! decoding, measured in one run on one machine, all on loopback.
//!
//! Phases: (1) one consumer tails a log of `--changes` one-put transactions already on disk,
//! served by the real server ([`LogNode`](tideline_stream::log_node::LogNode) over the log)
//! and read with the real client, beside a bare quinn stream carrying the same bytes in large
//! writes; then `--consumers` consumers
//! tail the same log at once; (2) the same with 64 KiB values (bandwidth); (3) commit-to-
//! consumer latency with a writer paced at `--latency-rate` under async durability;
//! (4) PostgreSQL logical decoding (`pg_recvlogical`, test_decoding) draining as many 100-byte
//! row changes.
//!
//! The server runtime and the client runtime are each a current-thread tokio runtime on its
//! own OS thread, for every phase and for the bare quinn pair alike: with a multi-threaded
//! runtime the figures flip between a one-core and a two-core mode from run to run.
//!
//! The bare quinn baseline uses the system's default UDP socket buffers, as the Tideline server
//! and client do (their sockets are created inside `tideline-stream`); it is measured a second
//! time with `--udp-buffer-bytes` buffers to show what larger buffers would give.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tideline::bench_util::{ASYNC_10MS, bar, goal, open_wal, print_goals, put, run_in_dir};

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::{Value, json};
use tideline_stream::{ClientSecrets, ServerSecrets, tls};
use tideline_wal::{Gtid, NewTransaction};

mod bare;
mod commit_latency;
mod pg_decoding;
mod tails;

use bare::*;
use commit_latency::*;
use pg_decoding::*;
use tails::*;

/// Arguments of `bench stream`.
#[derive(Debug, Args)]
pub struct StreamBenchArgs {
    /// Directory for the logs and secrets; created, and emptied afterwards.
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: PathBuf,
    /// One-put transactions in the log tailed in phase 1 (and row changes for PostgreSQL).
    #[arg(long, default_value_t = 2_000_000)]
    changes: u64,
    /// Value bytes of each change in phase 1.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Concurrent consumers (one connection each) in the fan-out measurement.
    #[arg(long, default_value_t = 8)]
    consumers: usize,
    /// Value bytes in the large-value phase.
    #[arg(long, default_value_t = 64 << 10)]
    large_value_bytes: usize,
    /// MiB of large values in the large-value phase.
    #[arg(long, default_value_t = 1024)]
    large_mib: u64,
    /// Transactions per second committed by the paced writer in the latency phase.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u64,
    /// Seconds of paced writing in the latency phase.
    #[arg(long, default_value_t = 5.0)]
    latency_seconds: f64,
    /// Bytes of each write on the bare quinn stream.
    #[arg(long, default_value_t = 1 << 20)]
    bare_write_bytes: usize,
    /// UDP socket buffers (send and receive) for the second bare quinn measurement; 0 skips it.
    #[arg(long, default_value_t = 4 << 20)]
    udp_buffer_bytes: usize,
    /// The server's `consumer_buffer_bytes` (`serve --consumer-buffer-bytes`): what it holds at
    /// most for one consumer, its send window being this less 1.75 MiB (reader chunk, batch,
    /// connection state). 11835008 gives the 10 MB send window quinn has by default, which the
    /// server used before the bound.
    #[arg(long, default_value_t = tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT)]
    consumer_buffer_bytes: usize,
    /// Skip the PostgreSQL comparison.
    #[arg(long)]
    no_postgres: bool,
    /// PostgreSQL host (trust authentication is assumed).
    #[arg(long, default_value = "127.0.0.1")]
    pg_host: String,
    /// PostgreSQL port.
    #[arg(long, default_value_t = 5432)]
    pg_port: u16,
    /// PostgreSQL user.
    #[arg(long, default_value = "postgres")]
    pg_user: String,
    /// PostgreSQL database (a table and a slot are created there and dropped afterwards).
    #[arg(long, default_value = "postgres")]
    pg_db: String,
    /// Rows per inserting transaction on PostgreSQL.
    #[arg(long, default_value_t = 100_000)]
    pg_rows_per_txn: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the files written instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// `bench stream`.
pub fn stream(args: &StreamBenchArgs) -> anyhow::Result<ExitCode> {
    ensure!(args.changes > 0, "--changes must be at least 1");
    ensure!(args.consumers > 0, "--consumers must be at least 1");
    ensure!(
        args.bare_write_bytes > 0,
        "--bare-write-bytes must be at least 1"
    );
    run_in_dir(
        &args.dir,
        "stream",
        args.keep,
        args.json,
        |root| run_all(args, root),
        print_table,
    )
}

// ---------------------------------------------------------------------------------------------
// Runtimes

/// The two runtimes and the cluster secrets every phase uses.
struct Ctx {
    server_rt: RtThread,
    client_rt: RtThread,
    server_secrets: ServerSecrets,
    client_secrets: ClientSecrets,
    /// The server's `consumer_buffer_bytes`, in every phase.
    consumer_buffer_bytes: usize,
}

/// A current-thread tokio runtime driven by its own OS thread until dropped.
struct RtThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RtThread {
    fn start(name: &str) -> anyhow::Result<RtThread> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .with_context(|| format!("spawn the {name} thread"))?;
        let handle = handle_rx
            .recv()
            .context("the runtime thread ended before starting")?
            .with_context(|| format!("build the {name} runtime"))?;
        Ok(RtThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `fut` on this runtime and blocks the calling thread (not a runtime thread) until
    /// it completes.
    fn run<F>(&self, fut: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.start_task(fut)
            .recv()
            .context("the runtime thread stopped before the task finished")
    }

    /// Starts `fut` on this runtime; its result arrives on the returned channel.
    fn start_task<F>(&self, fut: F) -> std::sync::mpsc::Receiver<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx
    }
}

impl Drop for RtThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// Writes `records` one-put transactions of `value` into a new log in `dir`, pipelined, with
/// async durability, and closes it. Returns the log's bytes on disk.
fn build_log(dir: &Path, records: u64, value: &[u8], what: &str) -> anyhow::Result<u64> {
    let wal = open_wal(dir, ASYNC_10MS)?;
    let uuid = wal.server_uuid();
    let pb = bar(records, what);
    let mut seq = 0u64;
    while seq < records {
        let mut last = None;
        let n = (records - seq).min(10_000);
        for _ in 0..n {
            seq += 1;
            last = Some(wal.submit(NewTransaction {
                gtid: Gtid::new(uuid, seq)?,
                timestamp_us: tideline::now_us(),
                ops: put(seq, value),
            })?);
        }
        if let Some(p) = last {
            p.wait()?;
        }
        pb.inc(n);
    }
    let bytes = wal.stats().total_bytes;
    wal.close()?;
    pb.finish_and_clear();
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// The run

fn bare_json(b: &Bare, bytes: u64, changes: u64) -> Value {
    json!({
        "seconds": b.seconds,
        "mib_s": bytes as f64 / (1 << 20) as f64 / b.seconds,
        "equivalent_changes_per_s": (changes as f64 / b.seconds).round(),
        "lost_packets": b.lost_packets,
        "sent_packets": b.sent_packets,
    })
}

fn run_all(args: &StreamBenchArgs, root: &Path) -> anyhow::Result<Value> {
    // Other processes on the machine move every figure here: record how busy it was.
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned));
    let secrets_dir = root.join("secrets");
    tls::ensure_secrets(&secrets_dir)?;
    let ctx = Ctx {
        server_rt: RtThread::start("bench-server")?,
        client_rt: RtThread::start("bench-client")?,
        server_secrets: tls::load_server(&secrets_dir)?,
        client_secrets: tls::load_client_dir(&secrets_dir)?,
        consumer_buffer_bytes: args.consumer_buffer_bytes,
    };
    let (server_rt, client_rt) = (&ctx.server_rt, &ctx.client_rt);
    let (server_secrets, client_secrets) = (&ctx.server_secrets, &ctx.client_secrets);
    let big_buffers = (args.udp_buffer_bytes > 0).then_some(args.udp_buffer_bytes);

    // Phase 1: small values.
    let value = vec![0x61u8; args.value_bytes];
    let small_dir = root.join("small");
    let log_bytes = build_log(&small_dir, args.changes, &value, "building log (changes)")?;
    let server = start_server(
        server_rt,
        open_wal(&small_dir, ASYNC_10MS)?,
        server_secrets,
        args.consumer_buffer_bytes,
    )?;
    eprintln!("one consumer tailing {} changes ...", args.changes);
    let (changes, tail_s) = tail_one(
        client_rt,
        server.addr,
        client_secrets,
        args.changes,
        Read::Owned,
    )?;
    eprintln!("one consumer tailing {} changes in place ...", args.changes);
    let (raw_changes, raw_s) = tail_one(
        client_rt,
        server.addr,
        client_secrets,
        args.changes,
        Read::Raw,
    )?;
    eprintln!("one consumer tailing beside a stalled one ...");
    let (stalled_changes, stalled_s) =
        tail_beside_stalled(client_rt, server.addr, client_secrets, args.changes)?;
    eprintln!(
        "{} consumers tailing {} changes each ...",
        args.consumers, args.changes
    );
    let (many_changes, many_s) =
        tail_many(server.addr, client_secrets, args.changes, args.consumers)?;
    server.stop(server_rt)?;
    let _ = std::fs::remove_dir_all(&small_dir);
    eprintln!("bare quinn stream, {} MiB ...", log_bytes >> 20);
    let bare = bare_quinn(&ctx, log_bytes, args.bare_write_bytes, None)?;
    let bare_big = match big_buffers {
        Some(b) => {
            eprintln!(
                "bare quinn stream, {} MiB, {b} B UDP buffers ...",
                log_bytes >> 20
            );
            Some(bare_quinn(&ctx, log_bytes, args.bare_write_bytes, Some(b))?)
        }
        None => None,
    };
    let tail_rate = changes as f64 / tail_s;
    let many_rate = many_changes as f64 / many_s;
    let stalled_rate = stalled_changes as f64 / stalled_s;
    let small_ratio = bare.seconds / tail_s;

    // Phase 2: large values.
    let large_value = vec![0x62u8; args.large_value_bytes];
    let large_records = ((args.large_mib << 20) / args.large_value_bytes.max(1) as u64).max(1);
    let large_dir = root.join("large");
    let large_bytes = build_log(
        &large_dir,
        large_records,
        &large_value,
        "building large-value log",
    )?;
    let server = start_server(
        server_rt,
        open_wal(&large_dir, ASYNC_10MS)?,
        server_secrets,
        args.consumer_buffer_bytes,
    )?;
    eprintln!(
        "one consumer tailing {large_records} values of {} B ...",
        args.large_value_bytes
    );
    let (_, large_tail_s) = tail_one(
        client_rt,
        server.addr,
        client_secrets,
        large_records,
        Read::Owned,
    )?;
    server.stop(server_rt)?;
    let _ = std::fs::remove_dir_all(&large_dir);
    eprintln!("bare quinn stream, {} MiB ...", large_bytes >> 20);
    let large_bare = bare_quinn(&ctx, large_bytes, args.bare_write_bytes, None)?;
    let large_bare_big = match big_buffers {
        Some(b) => Some(bare_quinn(
            &ctx,
            large_bytes,
            args.bare_write_bytes,
            Some(b),
        )?),
        None => None,
    };
    let mib = |bytes: u64, s: f64| bytes as f64 / (1 << 20) as f64 / s;
    let large_ratio = large_bare.seconds / large_tail_s;

    // Phase 3: latency.
    let count = ((args.latency_rate as f64 * args.latency_seconds).round() as u64).max(1);
    eprintln!(
        "latency: {count} transactions at {} /s, async durability ...",
        args.latency_rate
    );
    let lat_dir = root.join("latency");
    let paced = |skip_fsync: bool| -> anyhow::Result<Value> {
        let r = latency(
            &ctx,
            &lat_dir,
            args.latency_rate.max(1),
            count,
            &value,
            skip_fsync,
        );
        let _ = std::fs::remove_dir_all(&lat_dir);
        Ok(latency_summary(r?))
    };
    let lat = paced(false)?;
    let lat_nosync = if cfg!(feature = "bench-without-fsync") {
        eprintln!("latency again, log WITHOUT fsync (diagnostic: not durable, not a result) ...");
        paced(true)?
    } else {
        json!({ "skipped": "needs a build with `--features bench-without-fsync`" })
    };
    let p99 = lat["p99_us"].as_f64().unwrap_or(f64::NAN);

    // Phase 4: PostgreSQL.
    let pg = if args.no_postgres {
        json!({ "skipped": "--no-postgres" })
    } else {
        match postgres(args, args.changes, args.value_bytes) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("!!! PostgreSQL comparison SKIPPED: {e:#}");
                json!({ "skipped": format!("{e:#}") })
            }
        }
    };
    drop(ctx);

    let mut goals = vec![
        goal(
            "tail, one consumer, changes/s",
            tail_rate.round(),
            3_000_000.0,
            "changes/s",
            true,
        ),
        // Issue 16's row: ≥ 60% of the bare stream, for owned records and read in place.
        goal(
            "tail vs bare quinn, same bytes",
            small_ratio,
            0.6,
            "ratio",
            true,
        ),
        goal(
            "tail in place vs bare quinn, same bytes",
            bare.seconds / raw_s,
            0.6,
            "ratio",
            true,
        ),
        goal(
            "consumers aggregate vs one consumer",
            many_rate / tail_rate,
            1.0,
            "ratio",
            true,
        ),
        goal(
            "tail beside a stalled consumer vs alone",
            stalled_rate / tail_rate,
            0.8,
            "ratio",
            true,
        ),
        goal(
            "large values vs bare quinn bandwidth",
            large_ratio,
            0.8,
            "ratio",
            true,
        ),
        goal("commit-to-consumer p99", p99 / 1000.0, 1.0, "ms", false),
    ];
    let pg_ratio = pg["changes_per_s"].as_f64().map(|r| tail_rate / r);
    if let Some(r) = pg_ratio {
        goals.push(goal(
            "tail vs PostgreSQL logical decoding",
            r,
            5.0,
            "ratio",
            true,
        ));
    }

    Ok(json!({
        "changes": args.changes,
        "value_bytes": args.value_bytes,
        "log_bytes": log_bytes,
        "loadavg_1min_at_start": loadavg,
        "consumer_buffer_bytes": args.consumer_buffer_bytes,
        "runtimes": "server and client: one current-thread tokio runtime each, on its own OS thread; fan-out: one thread and runtime per consumer",
        "tail": {
            "changes": changes,
            "seconds": tail_s,
            "changes_per_s": tail_rate.round(),
            "mib_s": mib(log_bytes, tail_s),
        },
        "tail_raw": {
            "changes": raw_changes,
            "seconds": raw_s,
            "changes_per_s": (raw_changes as f64 / raw_s).round(),
            "mib_s": mib(log_bytes, raw_s),
            "vs_bare": bare.seconds / raw_s,
        },
        "bare_quinn": bare_json(&bare, log_bytes, changes),
        "bare_quinn_big_buffers": bare_big.as_ref().map(|b| {
            let mut v = bare_json(b, log_bytes, changes);
            v["udp_buffer_bytes"] = json!(args.udp_buffer_bytes);
            v
        }),
        "tail_vs_bare": small_ratio,
        "beside_stalled": {
            "changes_per_s": stalled_rate.round(),
            "vs_alone": stalled_rate / tail_rate,
        },
        "consumers": {
            "count": args.consumers,
            "changes": many_changes,
            "seconds": many_s,
            "aggregate_changes_per_s": many_rate.round(),
            "vs_one_consumer": many_rate / tail_rate,
        },
        "large": {
            "value_bytes": args.large_value_bytes,
            "records": large_records,
            "log_bytes": large_bytes,
            "tail_seconds": large_tail_s,
            "tail_mib_s": mib(large_bytes, large_tail_s),
            "bare_mib_s": mib(large_bytes, large_bare.seconds),
            "bare_lost_packets": large_bare.lost_packets,
            "bare_big_buffers_mib_s": large_bare_big.as_ref().map(|b| mib(large_bytes, b.seconds)),
            "tail_vs_bare": large_ratio,
        },
        "latency_target_rate_per_s": args.latency_rate,
        "latency": lat,
        "latency_without_fsync": lat_nosync,
        "postgres": pg,
        "tideline_vs_postgres": pg_ratio,
        "goals": goals,
    }))
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "peer-bench stream ({} changes of {} B, loopback, {})",
        r["changes"],
        r["value_bytes"],
        r["runtimes"].as_str().unwrap_or("")
    );
    println!(
        "  tail, 1 consumer                {:>12.0} changes/s  ({:.1} MiB/s, {:.2} s)",
        f(&r["tail"]["changes_per_s"]),
        f(&r["tail"]["mib_s"]),
        f(&r["tail"]["seconds"])
    );
    println!(
        "  tail, 1 consumer, in place      {:>12.0} changes/s  ({:.1} MiB/s, {:.2} s; next_raw, {:.0}% of bare quinn)",
        f(&r["tail_raw"]["changes_per_s"]),
        f(&r["tail_raw"]["mib_s"]),
        f(&r["tail_raw"]["seconds"]),
        100.0 * f(&r["tail_raw"]["vs_bare"])
    );
    println!(
        "  bare quinn, same bytes          {:>12.0} changes/s  ({:.1} MiB/s, {} of {} packets lost)",
        f(&r["bare_quinn"]["equivalent_changes_per_s"]),
        f(&r["bare_quinn"]["mib_s"]),
        r["bare_quinn"]["lost_packets"],
        r["bare_quinn"]["sent_packets"]
    );
    let big = &r["bare_quinn_big_buffers"];
    if !big.is_null() {
        println!(
            "  bare quinn, {:>4} KiB UDP bufs  {:>12.0} changes/s  ({:.1} MiB/s, {} of {} packets lost)",
            big["udp_buffer_bytes"].as_u64().unwrap_or(0) >> 10,
            f(&big["equivalent_changes_per_s"]),
            f(&big["mib_s"]),
            big["lost_packets"],
            big["sent_packets"]
        );
    }
    println!(
        "  tail / bare quinn               {:>12.0}%",
        100.0 * f(&r["tail_vs_bare"])
    );
    println!(
        "  tail, {:>2} consumers aggregate   {:>12.0} changes/s  ({:.2}x one consumer)",
        r["consumers"]["count"],
        f(&r["consumers"]["aggregate_changes_per_s"]),
        f(&r["consumers"]["vs_one_consumer"])
    );
    println!(
        "  tail beside a stalled consumer  {:>12.0} changes/s  ({:.2}x alone)",
        f(&r["beside_stalled"]["changes_per_s"]),
        f(&r["beside_stalled"]["vs_alone"])
    );
    let l = &r["large"];
    println!(
        "  tail, {:>5} B values           {:>12.1} MiB/s      (bare quinn {:.1} MiB/s: {:.0}%)",
        l["value_bytes"],
        f(&l["tail_mib_s"]),
        f(&l["bare_mib_s"]),
        100.0 * f(&l["tail_vs_bare"])
    );
    if !l["bare_big_buffers_mib_s"].is_null() {
        println!(
            "  bare quinn, big UDP buffers     {:>12.1} MiB/s",
            f(&l["bare_big_buffers_mib_s"])
        );
    }
    println!(
        "  paced writer at {} txn/s, async durability (fsync every 10 ms):",
        r["latency_target_rate_per_s"]
    );
    for (key, what) in [
        ("latency", "commit-to-consumer"),
        ("latency_without_fsync", "  same, log WITHOUT fsync"),
    ] {
        let lat = &r[key];
        if let Some(why) = lat["skipped"].as_str() {
            println!("  {what:<26} SKIPPED: {why}");
            continue;
        }
        println!(
            "  {what:<26} p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({:.0} txn/s)",
            f(&lat["p50_us"]) / 1e3,
            f(&lat["p99_us"]) / 1e3,
            f(&lat["p999_us"]) / 1e3,
            f(&lat["max_us"]) / 1e3,
            f(&lat["achieved_rate_per_s"])
        );
    }
    let pg = &r["postgres"];
    match pg["skipped"].as_str() {
        Some(why) => println!("  PostgreSQL logical decoding     SKIPPED: {why}"),
        None => println!(
            "  PostgreSQL {} pg_recvlogical {:>9.0} changes/s  (Tideline is {:.1}x)",
            pg["version"].as_str().unwrap_or("?"),
            f(&pg["changes_per_s"]),
            f(&r["tideline_vs_postgres"])
        ),
    }
    print_goals(r);
}
