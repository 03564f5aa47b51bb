//! `tideline demo`: the log doing its job on embedded defaults. Eight writers commit
//! concurrently with sync durability; group commit shares fsyncs among them; the result is
//! read back and summarised. By default it works in a fresh temporary directory that it
//! removes afterwards; run it twice with the same `--data` to see recovery continue the GTID
//! sequence. It refuses a directory that holds a node, and the log's writer lock refuses a log
//! that another process has open.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Args;
use indicatif::ProgressBar;
use tideline_wal::{Gtid, NewTransaction, Op};

use crate::DurabilityArg;
use crate::log_cmd::{log_dir, open_log, refuse_node_dir};
use crate::render;

/// Arguments of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Data directory (the log goes to DATA/log). Default: a fresh temporary directory,
    /// removed afterwards. A node's data directory is refused.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Transactions to commit (at most 2^40).
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=(1 << 40)))]
    txns: u64,
    /// Concurrent writers (1 to 1024).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    writers: u64,
    /// When commits are acknowledged.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    durability: DurabilityArg,
}

/// `demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let Some(data) = &args.data else {
        let tmp = std::env::temp_dir().join(format!("tideline-demo-{}", std::process::id()));
        let result = run_in(&tmp, args);
        let _ = std::fs::remove_dir_all(&tmp);
        return result;
    };
    refuse_node_dir(data, "demo")?;
    run_in(data, args)
}

fn run_in(data: &Path, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = log_dir(data);
    let wal = open_log(data, args.durability.durability())?;
    let uuid = wal.server_uuid();
    let before = wal.gtids();
    let start_seq = before.last_seq(&uuid).unwrap_or(0).saturating_add(1);
    eprintln!(
        "log {} (server_uuid {uuid}): {} transactions already, {} durability",
        dir.display(),
        wal.visible_offset(),
        match args.durability {
            DurabilityArg::Sync => "sync",
            DurabilityArg::Async => "async",
        }
    );
    let next = Arc::new(Mutex::new(start_seq));
    let end_seq = start_seq.checked_add(args.txns).ok_or_else(|| {
        anyhow::anyhow!(
            "this log's GTID numbers end before {} more transactions; pass a smaller --txns",
            args.txns
        )
    })?;
    let pb = ProgressBar::new(args.txns);
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..args.writers.max(1) {
        let (wal, next, pb) = (wal.clone(), next.clone(), pb.clone());
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            loop {
                let pending = {
                    let mut seq = next.lock().unwrap_or_else(|p| p.into_inner());
                    if *seq >= end_seq {
                        return Ok(());
                    }
                    let txn = NewTransaction {
                        gtid: Gtid::new(uuid, *seq)?,
                        timestamp_us: crate::now_us(),
                        ops: vec![Op::Put {
                            tree: "default".into(),
                            key: format!("user:{:06}", *seq % 1000).into_bytes(),
                            value: format!(r#"{{"writer":{w},"seq":{}}}"#, *seq).into_bytes(),
                            before: None,
                        }],
                    };
                    *seq += 1;
                    wal.submit(txn)?
                };
                pending.wait()?;
                pb.inc(1);
            }
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let stats = wal.stats();
    println!(
        "committed {} transactions from {} writers in {secs:.2}s ({:.0}/s, all acknowledged {})",
        args.txns,
        args.writers,
        args.txns as f64 / secs,
        match args.durability {
            DurabilityArg::Sync => "after fsync",
            DurabilityArg::Async => "after the 10 ms interval fsync",
        }
    );
    println!("gtid_executed: {}", stats.gtids);
    println!(
        "offsets {}..={} in {} segment(s), {} bytes",
        stats.first_offset,
        stats.visible_offset,
        stats.segments.len(),
        stats.total_bytes
    );
    println!("last 3 transactions (as `tideline log dump` prints them):");
    let from = tideline_wal::Offset::new(stats.visible_offset.saturating_sub(2).max(1))
        .unwrap_or(tideline_wal::Offset::FIRST);
    for txn in wal.read_from(from)? {
        println!("{}", render::txn_json(&txn?));
    }
    Ok(ExitCode::SUCCESS)
}
