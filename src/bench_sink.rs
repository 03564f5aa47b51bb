//! `tideline bench sink-file`: the JSON-lines file sink beside `tideline tail > file`, on the
//! same log in the same run.
//!
//! A node in this process (engine, log, QUIC server on loopback) is loaded with N changes
//! (transactions of `--ops-per-txn` puts), then two child processes of this same binary read
//! the whole log from `earliest`:
//! - `tideline tail --from earliest --limit TXNS > tail.jsonl` (one line per transaction),
//!   timed from its start to its exit;
//! - `tideline sink file --from earliest --out changes.jsonl` (one envelope per change, each
//!   batch synced and its position stored), timed from its start until its position covers
//!   the last offset, then killed (the sink's files are consistent at any point).
//!
//! Both rates count changes (ops) per second, process start and connection included.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tideline_stream::{ServerConfig, tls};

use crate::bench_util::{goal, run_in_dir, write_goals};
use crate::client_cmd::output::outln;
use crate::node::{EngineNode, open_engine};

/// Arguments of `bench sink-file`.
#[derive(Debug, Args)]
pub struct SinkFileBenchArgs {
    /// Directory to write in (on the disk to measure); created, and emptied afterwards.
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: PathBuf,
    /// Changes (puts) in the log.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    changes: u64,
    /// Puts per transaction.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    ops_per_txn: u64,
    /// Bytes of each value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// The sink's batch size, in changes (1 or more, as `sink file --batch-changes`).
    #[arg(long, default_value_t = 10_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    batch_changes: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the files written instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// The goal issue 12 sets.
const GOAL_CHANGES_PER_S: f64 = 500_000.0;

/// `bench sink-file`.
pub fn run(args: &SinkFileBenchArgs) -> anyhow::Result<ExitCode> {
    run_in_dir(
        &args.dir,
        "sink-file",
        args.keep,
        args.json,
        |root| measure(args, root),
        print_report,
    )
}

fn measure(args: &SinkFileBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let secrets = root.join("secrets");
    tideline_stream::ensure_secrets(&secrets)?;
    let engine = open_engine(&root.join("node"), tideline_wal::Durability::Sync, false)?;
    let txns = args.changes.div_ceil(args.ops_per_txn);
    let load_started = Instant::now();
    load(&engine, args, txns)?;
    let load_s = load_started.elapsed().as_secs_f64();
    let changes = txns * args.ops_per_txn;
    let last = engine.position().offset.map_or(0, |o| o.get());
    let _guard = rt.enter();
    let cfg = ServerConfig::new("127.0.0.1:0".parse().context("parse the listen address")?);
    let node = Arc::new(EngineNode::new(
        engine.clone(),
        vec![],
        cfg.observer.clone(),
    ));
    let server = tideline_stream::serve(cfg, tls::load_server(&secrets)?, node)?;
    let addr = server.local_addr().to_string();
    let exe = std::env::current_exe().context("find this program")?;

    // The sink first, then the tail; each reads the whole log.
    let out = root.join("changes.jsonl");
    let cpu0 = cpu_seconds()?;
    let started = Instant::now();
    let mut sink = Command::new(&exe)
        .args([
            "sink", "file", "--node", &addr, "--from", "earliest", "--out",
        ])
        .arg(&out)
        .args(["--rotate-bytes", "0", "--batch-changes"])
        .arg(args.batch_changes.to_string())
        .arg("--secrets")
        .arg(&secrets)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start tideline sink file")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while stored_offset(&out) < last {
        if let Some(status) = sink.try_wait()? {
            bail!("sink file exited before it caught up ({status})");
        }
        if Instant::now() > deadline {
            let _ = sink.kill();
            bail!("sink file did not catch up in 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let sink_s = started.elapsed().as_secs_f64();
    let _ = sink.kill();
    let _ = sink.wait();
    let cpu1 = cpu_seconds()?;
    let sink_bytes = std::fs::metadata(&out).map_or(0, |m| m.len());

    let tail_out = root.join("tail.jsonl");
    let file = std::fs::File::create(&tail_out)
        .with_context(|| format!("create {}", tail_out.display()))?;
    let started = Instant::now();
    let status = Command::new(&exe)
        .args(["tail", "--node", &addr, "--from", "earliest", "--limit"])
        .arg(last.to_string())
        .arg("--secrets")
        .arg(&secrets)
        .stdout(file)
        .stderr(Stdio::inherit())
        .status()
        .context("run tideline tail")?;
    let tail_s = started.elapsed().as_secs_f64();
    let cpu2 = cpu_seconds()?;
    if !status.success() {
        bail!("tideline tail failed ({status})");
    }
    let tail_bytes = std::fs::metadata(&tail_out).map_or(0, |m| m.len());
    rt.block_on(server.shutdown());
    drop(_guard);
    engine.close().context("close the engine")?;
    engine.wal().close().context("close the log")?;

    let sink_rate = changes as f64 / sink_s;
    let tail_rate = changes as f64 / tail_s;
    Ok(json!({
        "changes": changes,
        "txns": txns,
        "ops_per_txn": args.ops_per_txn,
        "value_bytes": args.value_bytes,
        "batch_changes": args.batch_changes,
        "load_seconds": load_s,
        "sink_file": {
            "seconds": sink_s,
            "changes_per_s": sink_rate,
            "bytes": sink_bytes,
            "mib_per_s": sink_bytes as f64 / sink_s / (1 << 20) as f64,
            "process_cpu_seconds": cpu1.children - cpu0.children,
            "node_cpu_seconds": cpu1.own - cpu0.own,
        },
        "tail_to_file": {
            "seconds": tail_s,
            "changes_per_s": tail_rate,
            "bytes": tail_bytes,
            "mib_per_s": tail_bytes as f64 / tail_s / (1 << 20) as f64,
            "process_cpu_seconds": cpu2.children - cpu1.children,
            "node_cpu_seconds": cpu2.own - cpu1.own,
        },
        "sink_vs_tail": sink_rate / tail_rate,
        "goals": [goal(
            "file sink, changes/s",
            sink_rate,
            GOAL_CHANGES_PER_S,
            "changes/s",
            true,
        )],
    }))
}

/// Loads `txns` transactions of `ops_per_txn` puts from 16 writer threads (their commits
/// share fsyncs).
fn load(
    engine: &Arc<tideline_engine::Engine>,
    args: &SinkFileBenchArgs,
    txns: u64,
) -> anyhow::Result<()> {
    const WRITERS: u64 = 16;
    engine
        .create_tree("bench", None)
        .context("create the tree `bench`")?;
    let bar = crate::bench_util::bar(txns, "loading transactions");
    let value = vec![b'x'; args.value_bytes];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (engine, value, bar) = (engine.clone(), value.clone(), bar.clone());
                let k = args.ops_per_txn;
                s.spawn(move || -> anyhow::Result<()> {
                    let mut t = w;
                    while t < txns {
                        engine
                            .transaction(|tx| {
                                for i in 0..k {
                                    let key = format!("key:{:012}", t * k + i);
                                    tx.put("bench", key.as_bytes(), &value)?;
                                }
                                Ok(())
                            })
                            .context("commit a load transaction")?;
                        bar.inc(1);
                        t += WRITERS;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    bar.finish_and_clear();
    Ok(())
}

/// CPU time (user + system) of this process (the node) and of its waited-for children.
struct Cpu {
    own: f64,
    children: f64,
}

/// From `/proc/self/stat` (Linux; clock ticks of 1/100 s, the kernel's `USER_HZ`).
fn cpu_seconds() -> anyhow::Result<Cpu> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("read /proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14, stime 15, cutime 16, cstime 17.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parse /proc/self/stat")?;
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = |i: usize| f.get(i - 4).copied().unwrap_or(0.0) / 100.0;
    Ok(Cpu {
        own: tick(14) + tick(15),
        children: tick(16) + tick(17),
    })
}

/// The source offset the file sink's position covers.
fn stored_offset(out: &Path) -> u64 {
    let Ok(text) = std::fs::read(format!("{}.position", out.display())) else {
        return 0;
    };
    serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|p| p["checkpoint"].as_str().map(str::to_owned))
        .and_then(|cp| serde_json::from_str::<Value>(&cp).ok())
        .and_then(|cp| cp["tail"]["offset"].as_u64())
        .unwrap_or(0)
}

fn print_report(r: &Value) -> anyhow::Result<()> {
    let line = |name: &str, v: &Value| {
        outln!(
            "  {name:<28} {:>10.0} changes/s  ({:.1} MiB/s, {:.2} s; CPU s: process {:.2}, node {:.2})",
            v["changes_per_s"].as_f64().unwrap_or(0.0),
            v["mib_per_s"].as_f64().unwrap_or(0.0),
            v["seconds"].as_f64().unwrap_or(0.0),
            v["process_cpu_seconds"].as_f64().unwrap_or(0.0),
            v["node_cpu_seconds"].as_f64().unwrap_or(0.0),
        )
    };
    outln!(
        "file sink beside tail > file: {} changes in {} transactions of {} puts, {} B values \
         (loaded in {:.1} s)",
        r["changes"],
        r["txns"],
        r["ops_per_txn"],
        r["value_bytes"],
        r["load_seconds"].as_f64().unwrap_or(0.0)
    )?;
    line("sink file (synced batches)", &r["sink_file"])?;
    line("tail > file", &r["tail_to_file"])?;
    outln!(
        "  {:<28} {:>10.2}x",
        "sink file / tail",
        r["sink_vs_tail"].as_f64().unwrap_or(0.0)
    )?;
    write_goals(r)
}
