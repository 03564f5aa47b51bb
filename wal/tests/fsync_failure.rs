//! An fsync that fails with EIO, injected by `MemStorage::fail_syncs_from`.
//!
//! Scenario: four writers append (small segments, so the failing sync may be a record sync, the
//! sync closing a segment, a new segment's header sync or the directory sync); from a random
//! point every sync fails. `MemStorage` models Linux: the dirty pages of a failed fsync are
//! dropped, and a later successful fsync does not bring them back.
//!
//! Guards against: retrying an fsync and acknowledging (fsyncgate), acknowledging anything after
//! a failed fsync, a log that keeps accepting appends once poisoned, loss of what was
//! acknowledged before the failure, and a restarted node showing (from the page cache) a batch
//! whose fsync failed, which the next power cut takes back. Canaries: with
//! `unsafe_ignore_sync_errors` the same checkers must report loss.

mod common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{CrashMode, Error, MemStorage, Wal, WalOptions};

use common::{Writers, open_and_check, opts, txn_for};

/// Runs writers until at least `before` acks, makes every sync from a random near one fail,
/// lets the writers go on (until they all stop on errors, or `after` more acks when the
/// failure is ignored), then checks the log's behaviour and a crash image of the storage.
fn eio_round(seed: u64, opts: &WalOptions) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let storage = MemStorage::new();
    let wal =
        Arc::new(Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?);
    let writers = Writers::start(wal.clone(), 4, 1);
    writers.wait_acked(rng.random_range(1..=200));
    storage.fail_syncs_from(storage.sync_count() + rng.random_range(1..=6));
    let acked_at_fault = writers.log.acked_count();
    // Under fail-stop every writer stops on its first error. With the protection off nobody
    // fails, so give the writers a bounded number of acks past the fault.
    while !writers.all_stopped() && writers.log.acked_count() < acked_at_fault + 200 {
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let log = writers.stop();
    let acked = log.acked();
    let acked_max = acked.last().copied().unwrap_or(0);
    let failed = log.take_failed();
    if let Some(b) = log.broken().first() {
        return Err(b.clone());
    }

    // The acknowledged records must all be in what a power cut leaves, torn or not.
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::TearUnsynced { seed: rng.random() },
    ] {
        let image = storage.crash(mode);
        let (reopened, n) = open_and_check(Arc::new(image), opts.clone(), acked_max)
            .map_err(|e| format!("seed {seed}, image after {mode:?}: {e}"))?;
        // The recovered log is a fresh start: not poisoned, and it appends after what it holds.
        let next = reopened
            .append(txn_for(n + 1))
            .map_err(|e| format!("seed {seed}: append after recovery: {e}"))?;
        if next.get() != n + 1 {
            return Err(format!(
                "seed {seed}: append after recovery at offset {next}"
            ));
        }
    }

    // Fail-stop, checked only when the protection is on (the checks above are what the canary
    // needs to fail).
    if !opts.unsafe_ignore_sync_errors {
        if !wal.is_poisoned() {
            return Err(format!(
                "seed {seed}: a failed fsync did not poison the log"
            ));
        }
        if failed.len() != 4 {
            return Err(format!(
                "seed {seed}: {} writers saw an error, expected all 4",
                failed.len()
            ));
        }
        for (seq, e) in &failed {
            if !matches!(e, Error::Poisoned { .. }) {
                return Err(format!(
                    "seed {seed}: GTID number {seq} failed with {e}, not Poisoned"
                ));
            }
            // Nothing is acknowledged after the failure: every failed append comes after every
            // acknowledged one.
            if *seq <= acked_max {
                return Err(format!(
                    "seed {seed}: GTID number {seq} failed but {acked_max} was acknowledged"
                ));
            }
        }
        if wal.durable_offset() != acked_max || wal.visible_offset() != acked_max {
            return Err(format!(
                "seed {seed}: durable {} / visible {} after the failure, but {acked_max} acked",
                wal.durable_offset(),
                wal.visible_offset()
            ));
        }
        // Even with the disk healthy again, the log refuses: it never retries and acks.
        storage.fail_syncs_from(0);
        match wal.append(txn_for(acked_max + 1)) {
            Err(Error::Poisoned { .. }) => {}
            other => return Err(format!("seed {seed}: append after poison gave {other:?}")),
        }
        match wal.close() {
            Err(Error::Poisoned { .. }) => {}
            other => return Err(format!("seed {seed}: close after poison gave {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn eio_on_fsync_poisons_and_nothing_is_acked_after() {
    for seed in 0..60 {
        // 1-8 KiB segments, so the failing sync often belongs to a segment roll.
        eio_round(seed, &opts(1024 << (seed % 4))).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn canary_ignoring_fsync_errors_loses_acked_records() {
    // One large segment: every sync that fails is a record sync, which the switch ignores (a
    // failed sync while creating a segment still stops the log, switch or not).
    for seed in 0..10 {
        let unsafe_opts = WalOptions {
            unsafe_ignore_sync_errors: true,
            ..opts(1 << 20)
        };
        let err = eio_round(seed, &unsafe_opts)
            .expect_err("acks after a failed fsync must be caught as lost");
        assert!(
            err.contains("LOSS") || err.contains("reopen failed"),
            "unexpected failure: {err}"
        );
    }
}

/// One failed fsync, then a healthy disk: a log that carried on would have a hole (the dropped
/// pages) followed by acknowledged records.
fn single_failed_sync(opts: WalOptions) -> Result<(), String> {
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?;
    let mut acked = 0;
    for seq in 1..=10 {
        wal.append(txn_for(seq)).map_err(|e| e.to_string())?;
        acked = seq;
    }
    storage.fail_syncs_from(storage.sync_count() + 1);
    let failed = wal.append(txn_for(11));
    storage.fail_syncs_from(0);
    match failed {
        Ok(_) => acked = 11,
        Err(Error::Poisoned { .. }) => {}
        Err(e) => return Err(format!("append 11 failed with {e}, not Poisoned")),
    }
    if acked == 11 {
        // Only reachable with the protection off: the writer went on.
        for seq in 12..=20 {
            wal.append(txn_for(seq)).map_err(|e| e.to_string())?;
            acked = seq;
        }
    } else {
        match wal.append(txn_for(11)) {
            Err(Error::Poisoned { .. }) => {}
            other => return Err(format!("append after poison gave {other:?}")),
        }
        if wal.poison().is_none() {
            return Err("poison() is None on a poisoned log".into());
        }
    }
    let image = storage.crash(CrashMode::DropUnsynced);
    let (_, n) = open_and_check(Arc::new(image), opts, acked)?;
    if n != acked {
        return Err(format!("{n} records after the crash, {acked} acknowledged"));
    }
    Ok(())
}

#[test]
fn one_failed_fsync_poisons_for_good() {
    single_failed_sync(opts(1 << 20)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn canary_carrying_on_after_one_failed_fsync_is_caught() {
    let unsafe_opts = WalOptions {
        unsafe_ignore_sync_errors: true,
        ..opts(1 << 20)
    };
    let err = single_failed_sync(unsafe_opts)
        .expect_err("a record acked over a failed fsync must be caught as lost");
    // The hole left by the dropped pages, followed by records that were synced, is damage
    // inside the log: recovery refuses it rather than cutting acknowledged records.
    assert!(
        err.contains("reopen failed") || err.contains("LOSS"),
        "unexpected failure: {err}"
    );
}

/// A batch whose fsync failed, then a restart without a power cut (the page cache intact),
/// then a power cut: what the restarted log shows must survive the power cut.
fn restart_after_failed_fsync(opts: WalOptions) -> Result<(), String> {
    let storage = MemStorage::new();
    {
        let wal = Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?;
        for seq in 1..=10 {
            wal.append(txn_for(seq)).map_err(|e| e.to_string())?;
        }
        storage.fail_syncs_from(storage.sync_count() + 1);
        let _ = wal.append(txn_for(11));
        storage.fail_syncs_from(0);
    }
    let (restarted, shown) = open_and_check(Arc::new(storage.clone()), opts.clone(), 10)?;
    drop(restarted);
    let image = storage.crash(CrashMode::DropUnsynced);
    open_and_check(Arc::new(image), opts, shown).map(|_| ())
}

#[test]
fn a_batch_whose_fsync_failed_is_not_shown_after_a_restart() {
    restart_after_failed_fsync(opts(1 << 20)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn canary_a_batch_acked_over_a_failed_fsync_is_lost_after_a_restart() {
    let unsafe_opts = WalOptions {
        unsafe_ignore_sync_errors: true,
        ..opts(1 << 20)
    };
    let err = restart_after_failed_fsync(unsafe_opts)
        .expect_err("a record shown after a failed fsync must be caught as lost");
    assert!(err.contains("LOSS"), "unexpected failure: {err}");
}
