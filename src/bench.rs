//! `tideline bench wal`: the log's figures beside the raw disk, measured in one run on one disk.
//!
//! Phases: (1) raw 4 KiB write + fdatasync rate; (2) durable appends/s with N concurrent
//! writers (group commit); (3) bandwidth of 1 MiB appends vs raw 1 MiB write + fdatasync;
//! (4) full scan of a large log; (5) recovery (open) of that log, default and full-verify.
//! Only ratios from one run compare: shared disks vary by 10x from one minute to the next.

use crate::bench_util::{bar, open_wal, parse_seconds, put, run_in_dir, writers_parser};
use crate::client_cmd::output::outln;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tideline_wal::{
    Durability, FileStorage, Gtid, NewTransaction, Offset, Storage, Wal, WalOptions,
};

/// Arguments of `bench wal`.
#[derive(Debug, Args)]
pub struct WalBenchArgs {
    /// Directory to write in (on the disk to measure); created, and emptied afterwards.
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: PathBuf,
    /// Concurrent writer counts for the group-commit phase, each 1 to 1024.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64",
          value_parser = writers_parser())]
    writers: Vec<usize>,
    /// Seconds per timed phase: above 0, at most 86400.
    #[arg(long, default_value_t = 3.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Value bytes per record in the group-commit and scan phases.
    #[arg(long, default_value_t = 100)]
    record_bytes: usize,
    /// MiB written by each bandwidth measurement (raw and log), in 1 MiB batches (1 or more:
    /// 0 leaves nothing to measure).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    bandwidth_mib: u64,
    /// Size of the log built for the scan and recovery phases, in MiB (1 or more).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    log_mib: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the files written instead of removing them.
    #[arg(long)]
    keep: bool,
}

/// Raw 4 KiB write + fdatasync, one at a time: the disk's durable-write rate.
fn raw_fsync_rate(dir: &Path, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let path = dir.join("raw-fsync.bin");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let block = vec![0xa5u8; 4096];
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut pos = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        f.write_all_at(&block, pos)?;
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        pos += 4096;
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or(0.0);
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok((rate, p50))
}

/// Durable appends/s with `writers` threads, each appending and waiting in a loop.
fn group_commit_rate(
    dir: &Path,
    writers: usize,
    seconds: f64,
    value: &[u8],
) -> anyhow::Result<f64> {
    let wal = Arc::new(open_wal(dir, Durability::Sync)?);
    let uuid = wal.server_uuid();
    let next_seq = Arc::new(Mutex::new(1u64));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..writers {
        let (wal, next_seq, stop, acked) =
            (wal.clone(), next_seq.clone(), stop.clone(), acked.clone());
        let value = value.to_vec();
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                // GTIDs in offset order, as the engine assigns them.
                let pending = {
                    let mut seq = next_seq.lock().unwrap_or_else(|p| p.into_inner());
                    let gtid = Gtid::new(uuid, *seq)?;
                    let p = wal.submit(NewTransaction {
                        gtid,
                        timestamp_us: 0,
                        ops: put(*seq, &value),
                    })?;
                    *seq += 1;
                    p
                };
                pending.wait()?;
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
    }
    let rate = acked.load(Ordering::Relaxed) as f64 / elapsed;
    Ok(rate)
}

/// MiB/s of 1 MiB raw writes each followed by fdatasync.
fn raw_bandwidth(dir: &Path, mib: u64) -> anyhow::Result<f64> {
    let path = dir.join("raw-bw.bin");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    let chunk = vec![0x5au8; 1 << 20];
    let pb = bar(mib, "raw 1 MiB write+fdatasync");
    let started = Instant::now();
    for i in 0..mib {
        f.write_all_at(&chunk, i << 20)?;
        f.sync_data()?;
        pb.inc(1);
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(mib as f64 / secs)
}

/// MiB/s of 1 MiB appends to the log (sync durability, one writer).
fn wal_bandwidth(dir: &Path, mib: u64) -> anyhow::Result<f64> {
    let wal = open_wal(dir, Durability::Sync)?;
    let value = vec![0x5au8; (1 << 20) - 128];
    let pb = bar(mib, "log 1 MiB appends");
    let started = Instant::now();
    for seq in 1..=mib {
        wal.append(NewTransaction {
            gtid: Gtid::new(wal.server_uuid(), seq)?,
            timestamp_us: 0,
            ops: put(seq, &value),
        })?;
        pb.inc(1);
    }
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    Ok(mib as f64 / secs)
}

/// Fills a log with about `mib` MiB of `value`-sized records, pipelined, async durability.
fn build_log(dir: &Path, mib: u64, value: &[u8]) -> anyhow::Result<u64> {
    let wal = open_wal(
        dir,
        Durability::Async {
            interval: Duration::from_millis(50),
        },
    )?;
    let target = mib << 20;
    let pb = bar(mib, "building log (MiB)");
    let mut seq = 0u64;
    let mut last = None;
    let mut mib_done = 0;
    loop {
        let bytes = wal.stats().segments.iter().map(|s| s.bytes).sum::<u64>();
        if bytes >= target {
            break;
        }
        if bytes >> 20 > mib_done {
            pb.inc((bytes >> 20) - mib_done);
            mib_done = bytes >> 20;
        }
        for _ in 0..10_000 {
            seq += 1;
            last = Some(wal.submit(NewTransaction {
                gtid: Gtid::new(wal.server_uuid(), seq)?,
                timestamp_us: seq as i64,
                ops: put(seq, value),
            })?);
        }
        if let Some(p) = last.take() {
            p.wait()?;
        }
    }
    wal.close()?;
    pb.finish_and_clear();
    Ok(seq)
}

/// `bench wal`.
pub fn wal(args: &WalBenchArgs) -> anyhow::Result<ExitCode> {
    run_in_dir(
        &args.dir,
        "wal",
        args.keep,
        args.json,
        |root| run_all(args, root),
        print_table,
    )
}

fn run_all(args: &WalBenchArgs, root: &Path) -> anyhow::Result<serde_json::Value> {
    let value = vec![0x42u8; args.record_bytes];
    eprintln!("raw 4 KiB write+fdatasync for {:.1}s ...", args.seconds);
    let (raw_rate, raw_p50_ms) = raw_fsync_rate(root, args.seconds)?;

    let mut gc = Vec::new();
    for &w in &args.writers {
        eprintln!("group commit, {w} writers, {:.1}s ...", args.seconds);
        let dir = root.join(format!("gc-{w}"));
        let rate = group_commit_rate(&dir, w, args.seconds, &value)?;
        let _ = std::fs::remove_dir_all(&dir);
        gc.push((w, rate));
    }
    let single = gc.iter().find(|(w, _)| *w == 1).map(|(_, r)| *r);

    let raw_bw = raw_bandwidth(root, args.bandwidth_mib)?;
    let bw_dir = root.join("bw");
    let wal_bw = wal_bandwidth(&bw_dir, args.bandwidth_mib)?;
    let _ = std::fs::remove_dir_all(&bw_dir);

    let log_dir = root.join("big");
    let records = build_log(&log_dir, args.log_mib, &value)?;
    let log_bytes: u64 = std::fs::read_dir(&log_dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();

    eprintln!("recovery (open) of {} MiB ...", log_bytes >> 20);
    let t = Instant::now();
    let wal = open_wal(&log_dir, Durability::Sync)?;
    let open_default_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut reader = wal.read_from(Offset::FIRST)?;
    let mut scanned = 0u64;
    while reader.next_txn()?.is_some() {
        scanned += 1;
    }
    let scan_s = t.elapsed().as_secs_f64();
    drop(reader);
    wal.close()?;
    drop(wal);
    anyhow::ensure!(
        scanned == records,
        "scan read {scanned} records, expected {records}"
    );

    let t = Instant::now();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(&log_dir)?);
    let wal = Wal::open(
        storage,
        WalOptions {
            verify_on_open: true,
            ..WalOptions::default()
        },
    )?;
    let open_full_s = t.elapsed().as_secs_f64();
    drop(wal);

    let gc_json: Vec<_> = gc
        .iter()
        .map(|(w, r)| {
            json!({
                "writers": w,
                "appends_per_s": r.round(),
                "vs_single_writer": single.map(|s| r / s),
                "vs_raw_fsync": r / raw_rate,
            })
        })
        .collect();
    Ok(json!({
        "record_bytes": args.record_bytes,
        "raw_fsync_4k_per_s": raw_rate.round(),
        "raw_fsync_p50_ms": raw_p50_ms,
        "group_commit": gc_json,
        "raw_bandwidth_mib_s": raw_bw,
        "log_bandwidth_mib_s": wal_bw,
        "bandwidth_ratio": wal_bw / raw_bw,
        "scan_records": scanned,
        "scan_records_per_s": (scanned as f64 / scan_s).round(),
        "scan_mib_s": (log_bytes as f64 / (1 << 20) as f64) / scan_s,
        "log_bytes": log_bytes,
        "recovery_open_s": open_default_s,
        "recovery_full_verify_s": open_full_s,
    }))
}

fn print_table(r: &serde_json::Value) -> anyhow::Result<()> {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    outln!("tideline bench wal ({} B records)", r["record_bytes"])?;
    outln!(
        "  raw 4 KiB write+fdatasync     {:>12.0} /s   (p50 {:.2} ms)",
        f("raw_fsync_4k_per_s"),
        f("raw_fsync_p50_ms")
    )?;
    if let Some(rows) = r["group_commit"].as_array() {
        for row in rows {
            outln!(
                "  durable appends, {:>3} writers {:>12.0} /s   ({:.1}x one writer, {:.1}x raw fsync)",
                row["writers"].as_u64().unwrap_or(0),
                row["appends_per_s"].as_f64().unwrap_or(f64::NAN),
                row["vs_single_writer"].as_f64().unwrap_or(f64::NAN),
                row["vs_raw_fsync"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
    }
    outln!(
        "  1 MiB appends                 {:>12.1} MiB/s ({:.0}% of raw {:.1} MiB/s)",
        f("log_bandwidth_mib_s"),
        100.0 * f("bandwidth_ratio"),
        f("raw_bandwidth_mib_s")
    )?;
    outln!(
        "  full scan                     {:>12.0} records/s ({:.0} MiB/s, {} records)",
        f("scan_records_per_s"),
        f("scan_mib_s"),
        r["scan_records"]
    )?;
    outln!(
        "  recovery of {:>5} MiB         {:>12.3} s open, {:.3} s with full verify",
        r["log_bytes"].as_u64().unwrap_or(0) >> 20,
        f("recovery_open_s"),
        f("recovery_full_verify_s")
    )
}

#[cfg(test)]
mod tests {
    //! The `bench` flags clap must refuse (exit 2) before a run directory exists: a NaN,
    //! negative, zero or huge `--seconds` panicked in `Duration::from_secs_f64` and left
    //! `DIR/wal-PID` behind; a count of 0 printed NaN or ignored the 0.

    use clap::Parser;

    /// Parses `tideline ARGS` as the binary does.
    fn parse(args: &[&str]) -> Result<crate::Cli, clap::Error> {
        crate::Cli::try_parse_from(std::iter::once("tideline").chain(args.iter().copied()))
    }

    fn refused(args: &[&str]) {
        match parse(args) {
            Ok(cli) => panic!("clap accepted {args:?}: {cli:?}"),
            Err(e) => assert_eq!(e.exit_code(), 2, "{args:?}: {e}"),
        }
    }

    #[test]
    fn bench_seconds_must_be_finite_positive_and_at_most_a_day() {
        for cmd in [&["bench", "wal"][..], &["bench", "index"][..]] {
            for bad in ["NaN", "nan", "-1", "1e300", "0", "inf", "86401", "x"] {
                let flag = format!("--seconds={bad}");
                refused(&[cmd, &[flag.as_str()][..]].concat());
            }
            for good in ["0.5", "3", "86400"] {
                let flag = format!("--seconds={good}");
                let args = [cmd, &[flag.as_str()][..]].concat();
                parse(&args).unwrap_or_else(|e| panic!("{args:?} refused: {e}"));
            }
        }
    }

    #[test]
    fn bench_counts_of_zero_are_refused() {
        refused(&["bench", "wal", "--writers", "0"]);
        refused(&["bench", "wal", "--writers", "1,0,4"]);
        refused(&["bench", "wal", "--bandwidth-mib", "0"]);
        refused(&["bench", "wal", "--log-mib", "0"]);
        refused(&["bench", "index", "--writers", "0"]);
        refused(&["bench", "index", "--rate", "0"]);
        refused(&["bench", "index", "--docs", "0"]);
        refused(&["bench", "index", "--only", "with", "--writes", "0"]);
        refused(&["bench", "sink-file", "--batch-changes", "0"]);
        parse(&["bench", "wal", "--writers", "1,4"]).expect("writers 1,4");
        parse(&["bench", "index", "--writers", "1", "--rate", "1"]).expect("one writer");
    }
}
