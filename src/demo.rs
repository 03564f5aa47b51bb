//! `tideline demo`: the log doing its job on embedded defaults. Eight writers commit
//! concurrently with sync durability; group commit shares fsyncs among them; the result is
//! read back and summarised. By default it works in a fresh temporary directory that it
//! removes afterwards; run it twice with the same `--data` to see recovery continue the GTID
//! sequence. It refuses a directory that holds a node, and a log it did not write (a copy of
//! a node's log, say: demo would append to it under that node's `server_uuid`); the log's
//! writer lock refuses a log that another process has open.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::ProgressBar;
use tideline_wal::{Gtid, NewTransaction, Op};

use crate::DurabilityArg;
use crate::client_cmd::output::outln;
use crate::log_cmd::{holds_segments, log_dir, open_log, refuse_node_dir};
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

/// The file demo writes into a log directory before it creates a log there. A log without it
/// was written by something else (a node, or a copy of a node's log), and demo must not append
/// its transactions to it under that log's `server_uuid`.
const DEMO_MARKER: &str = "DEMO";

/// Refuses a log in `data`'s log directory that demo did not write; marks a directory with no
/// log as demo's before a log is created in it, so that every log demo creates carries the
/// marker.
fn claim_log_dir(data: &Path) -> anyhow::Result<()> {
    let dir = log_dir(data);
    let marker = dir.join(DEMO_MARKER);
    let has_log =
        holds_segments(&dir).with_context(|| format!("read the directory {}", dir.display()))?;
    if has_log {
        if marker.is_file() {
            return Ok(());
        }
        bail!(
            "{} holds a log that `tideline demo` did not write (a node's log, or a copy of \
             one): demo would append its transactions to it under that log's server_uuid; \
             leave out --data to use a fresh temporary directory, or name an empty one (read \
             this log with `tideline log info|dump --data {}`)",
            dir.display(),
            data.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    // Synced with its directory entry: a demo log whose marker a crash lost would be refused
    // as someone else's on the next run.
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&marker)?;
        std::io::Write::write_all(
            &mut f,
            b"This log was written by `tideline demo`, which appends to a log only while this \
              file is beside it.\n",
        )?;
        f.sync_all()?;
        std::fs::File::open(&dir)?.sync_all()
    };
    write().with_context(|| format!("write {}", marker.display()))
}

fn run_in(data: &Path, args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = log_dir(data);
    claim_log_dir(data)?;
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
    outln!(
        "committed {} transactions from {} writers in {secs:.2}s ({:.0}/s, all acknowledged {})",
        args.txns,
        args.writers,
        args.txns as f64 / secs,
        match args.durability {
            DurabilityArg::Sync => "after fsync",
            DurabilityArg::Async => "after the 10 ms interval fsync",
        }
    )?;
    outln!("gtid_executed: {}", stats.gtids)?;
    outln!(
        "offsets {}..={} in {} segment(s), {} bytes",
        stats.first_offset,
        stats.visible_offset,
        stats.segments.len(),
        stats.total_bytes
    )?;
    outln!("last 3 transactions (as `tideline log dump` prints them):")?;
    let from = tideline_wal::Offset::new(stats.visible_offset.saturating_sub(2).max(1))
        .unwrap_or(tideline_wal::Offset::FIRST);
    for txn in wal.read_from(from)? {
        outln!("{}", render::txn_json(&txn?))?;
    }
    Ok(ExitCode::SUCCESS)
}
