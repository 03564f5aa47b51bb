//! A write that fails with ENOSPC (the disk is full) or EIO, injected by
//! `MemStorage::fail_writes_from`; a failing write is a short one (half its bytes reach the page
//! cache, as on a disk that fills up part-way).
//!
//! Scenario: four writers append (small segments, so the failing write may be a batch of
//! records or a new segment's header); from a random point every write fails. The log must
//! fail-stop (poisoned, every writer gets `Poisoned` naming the error, nothing acknowledged
//! after the failure), keep every acknowledged record both across a power cut (crash images,
//! dropped or torn) and across a plain restart once space is freed (the page cache as it is,
//! half-written batch included), and take writes again after that restart.
//!
//! Guards against: acknowledging a batch that was not written, a restart showing a batch that
//! was cut short, a log that keeps accepting appends on a full disk, and a log that cannot be
//! opened again once space is back. Canary: with `unsafe_ignore_write_errors` (the log carries
//! on as if the write had succeeded) the same checks must report loss.

mod common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{CrashMode, Error, MemStorage, Wal, WalOptions};

use common::{Writers, open_and_check, opts, txn_for};

/// Runs writers until at least some acks, makes every data write from a random near one fail
/// with `errno`, lets the writers go on (until they all stop on errors, or 200 more acks when
/// the failure is ignored), then checks the log's behaviour, crash images and a restart.
fn write_fault_round(seed: u64, opts: &WalOptions, errno: i32) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let storage = MemStorage::new();
    let wal =
        Arc::new(Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?);
    let writers = Writers::start(wal.clone(), 4, 1);
    writers.wait_acked(rng.random_range(1..=200));
    storage.fail_writes_from(storage.write_count() + rng.random_range(1..=4), errno);
    let acked_at_fault = writers.log.acked_count();
    while !writers.all_stopped() && writers.log.acked_count() < acked_at_fault + 200 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let log = writers.stop();
    let acked_max = log.acked().last().copied().unwrap_or(0);
    let failed = log.take_failed();
    if let Some(b) = log.broken().first() {
        return Err(format!("seed {seed}: {b}"));
    }

    // A power cut now: every acknowledged record is there, torn tail or not.
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::TearUnsynced { seed: rng.random() },
    ] {
        open_and_check(Arc::new(storage.crash(mode)), opts.clone(), acked_max)
            .map_err(|e| format!("seed {seed}, errno {errno}, image after {mode:?}: {e}"))?;
    }

    if !opts.ignore_write_errors_for_test() {
        if !wal.is_poisoned() {
            return Err(format!(
                "seed {seed}: a failed write did not poison the log"
            ));
        }
        if failed.len() != 4 {
            return Err(format!(
                "seed {seed}: {} writers saw an error, expected all 4",
                failed.len()
            ));
        }
        let text = std::io::Error::from_raw_os_error(errno).to_string();
        for (seq, e) in &failed {
            match e {
                Error::Poisoned { reason } if reason.contains(&text) => {}
                other => {
                    return Err(format!(
                        "seed {seed}: GTID number {seq} failed with {other}, not Poisoned \
                         naming {text:?}"
                    ));
                }
            }
            if *seq <= acked_max {
                return Err(format!(
                    "seed {seed}: GTID number {seq} failed but {acked_max} was acknowledged"
                ));
            }
        }
        // Space is still short: the log refuses, it does not retry.
        match wal.append(txn_for(acked_max + 1)) {
            Err(Error::Poisoned { .. }) => {}
            other => return Err(format!("seed {seed}: append after poison gave {other:?}")),
        }
    }
    drop(wal);

    // Space is freed and the node restarts (no power cut: the page cache as it is, with the
    // half-written batch): every acknowledged record, nothing else torn, and writes resume.
    storage.fail_writes_from(0, 0);
    let (reopened, n) = open_and_check(Arc::new(storage.clone()), opts.clone(), acked_max)
        .map_err(|e| format!("seed {seed}, errno {errno}, restart after the fault: {e}"))?;
    let next = reopened
        .append(txn_for(n + 1))
        .map_err(|e| format!("seed {seed}: append after the restart: {e}"))?;
    if next.get() != n + 1 {
        return Err(format!(
            "seed {seed}: append after restart at offset {next}"
        ));
    }
    Ok(())
}

/// Only the `testing` build's switch can say yes; read it the way the harness needs.
trait IgnoreWriteErrors {
    fn ignore_write_errors_for_test(&self) -> bool;
}

impl IgnoreWriteErrors for WalOptions {
    fn ignore_write_errors_for_test(&self) -> bool {
        self.unsafe_ignore_write_errors
    }
}

#[test]
fn enospc_on_write_poisons_keeps_every_ack_and_resumes_after_restart() {
    for seed in common::fault_seeds("enospc on write", 0..30) {
        // 1-8 KiB segments, so the failing write is sometimes a new segment's header.
        write_fault_round(seed, &opts(1024 << (seed % 4)), libc::ENOSPC)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn eio_on_write_poisons_keeps_every_ack_and_resumes_after_restart() {
    for seed in common::fault_seeds("eio on write", 100..130) {
        write_fault_round(seed, &opts(1024 << (seed % 4)), libc::EIO)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn canary_ignoring_write_errors_loses_acked_records() {
    // One large segment: every failing write is a batch of records, which the switch ignores.
    for seed in 0..10 {
        let unsafe_opts = WalOptions {
            unsafe_ignore_write_errors: true,
            ..opts(1 << 20)
        };
        let err = write_fault_round(seed, &unsafe_opts, libc::ENOSPC)
            .expect_err("acks over a failed write must be caught as lost");
        eprintln!("canary, seed {seed}: {err}");
        assert!(
            err.contains("seed"),
            "the checker names the seed to replay: {err}"
        );
    }
}
