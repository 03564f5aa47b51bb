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
//! whose fsync failed, which the next power cut takes back — under `Sync` and under `Async`,
//! whose interval sync can fail after the records were acknowledged. A failed commit whose
//! sync got a seeded prefix of its batch to disk (`MemStorage::persist_on_failed_sync`) may
//! come back after a power cut (its outcome is unknown, as the docs say), but only as whole
//! records in order, and never shown and then lost. Also, under `Async`: a later fsync that
//! succeeds (Linux reports a failure once) publishing what the failed one's cut removed, and a
//! leading committer acknowledging a group it wrote while the interval fsync failed. And a new
//! segment whose header fsync failed being kept, so that after a restart without a reboot
//! acknowledged records go in behind a header the disk lacks. Canaries: with
//! `unsafe_ignore_sync_errors` the same checkers must report loss.

mod common;

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{CrashMode, Durability, Error, MemStorage, Offset, Wal, WalOptions};

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
    for seed in common::fault_seeds("eio on fsync", 0..60) {
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
        // Only the canary (protection off) may acknowledge over the failed fsync.
        Ok(_) if opts.unsafe_ignore_sync_errors => acked = 11,
        Ok(offset) => {
            return Err(format!(
                "append 11 was acknowledged (offset {offset}) over a failed fsync"
            ));
        }
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

/// Under `Async`: records written (and acknowledged) whose interval sync fails, then a restart
/// without a power cut (the page cache intact, still showing them), then a power cut: what the
/// restarted log shows must survive the power cut.
fn restart_after_failed_async_sync(opts: WalOptions) -> Result<(), String> {
    let storage = MemStorage::new();
    let async_opts = WalOptions {
        durability: Durability::Async {
            interval: Duration::from_millis(1),
        },
        ..opts.clone()
    };
    {
        let wal =
            Wal::open(Arc::new(storage.clone()), async_opts.clone()).map_err(|e| e.to_string())?;
        for seq in 1..=10 {
            wal.append(txn_for(seq)).map_err(|e| e.to_string())?;
        }
        let ten = Offset::new(10).ok_or("offset 10")?;
        if !wal
            .wait_visible_blocking(ten, Duration::from_secs(30))
            .map_err(|e| e.to_string())?
        {
            return Err("records 1..=10 never became durable".into());
        }
        storage.fail_syncs_from(storage.sync_count() + 1);
        for seq in 11..=15 {
            match wal.append(txn_for(seq)) {
                Ok(_) => {}
                // The interval sync of the first ones already failed.
                Err(Error::Poisoned { .. }) => break,
                Err(e) => return Err(format!("append {seq}: {e}")),
            }
        }
        // The interval sync fails and poisons the log (or, with the failure ignored, makes the
        // records "durable"): either way the waiter wakes.
        let last = Offset::new(wal.written_offset()).ok_or("nothing written")?;
        match wal.wait_visible_blocking(last, Duration::from_secs(30)) {
            Err(Error::Poisoned { .. }) => {}
            // Only the canary (protection off) may make records "durable" over a failed sync.
            Ok(true) if opts.unsafe_ignore_sync_errors => {}
            other => {
                return Err(format!(
                    "the failed interval sync went unnoticed: {other:?}"
                ));
            }
        }
        storage.fail_syncs_from(0);
    }
    let (restarted, shown) = open_and_check(Arc::new(storage.clone()), opts.clone(), 10)?;
    drop(restarted);
    let image = storage.crash(CrashMode::DropUnsynced);
    open_and_check(Arc::new(image), opts, shown).map(|_| ())
}

#[test]
fn an_async_batch_whose_sync_failed_is_not_shown_after_a_restart() {
    restart_after_failed_async_sync(opts(1 << 20)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn canary_an_async_batch_shown_over_a_failed_sync_is_lost_after_a_restart() {
    let unsafe_opts = WalOptions {
        unsafe_ignore_sync_errors: true,
        ..opts(1 << 20)
    };
    let err = restart_after_failed_async_sync(unsafe_opts)
        .expect_err("records shown after a failed sync must be caught as lost");
    assert!(err.contains("LOSS"), "unexpected failure: {err}");
}

/// A failed commit whose sync got a seeded part of its batch to disk before the error: the
/// outcome of each failed append is unknown, so after a power cut the log may hold some of the
/// failed batch's records; it must hold every acknowledged one, only whole records in order
/// (`check_log`: dense, each exactly what was written), and what a restart shows must survive
/// the next power cut.
fn failed_commit_round(seed: u64) -> Result<(u64, u64), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let storage = MemStorage::new();
    storage.persist_on_failed_sync(rng.random());
    let opts = opts(1 << 20);
    let acked = rng.random_range(1..=20);
    let failed = rng.random_range(1..=8);
    {
        let wal = Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?;
        for seq in 1..=acked {
            wal.append(txn_for(seq)).map_err(|e| e.to_string())?;
        }
        storage.fail_syncs_from(storage.sync_count() + 1);
        // Submitted together, so the writer takes them in as few batches as it can; once the
        // first failed sync poisons the log, later submits are refused outright.
        let mut pending = Vec::new();
        for seq in acked + 1..=acked + failed {
            match wal.submit(txn_for(seq)) {
                Ok(p) => pending.push((seq, p)),
                Err(Error::Poisoned { .. }) => break,
                Err(e) => return Err(format!("seed {seed}: submit {seq}: {e}")),
            }
        }
        for (seq, p) in pending {
            match p.wait() {
                Err(Error::Poisoned { .. }) => {}
                other => {
                    return Err(format!(
                        "seed {seed}: append {seq} over a failed sync gave {other:?}"
                    ));
                }
            }
        }
    }
    // A power cut right after the failure.
    let image = storage.crash(CrashMode::DropUnsynced);
    let (wal, after_cut) = open_and_check(Arc::new(image), opts.clone(), acked)
        .map_err(|e| format!("seed {seed}, power cut: {e}"))?;
    drop(wal);
    if after_cut > acked + failed {
        return Err(format!(
            "seed {seed}: {after_cut} records, only {} submitted",
            acked + failed
        ));
    }
    // A restart without one (the disk healthy again), then a power cut.
    storage.fail_syncs_from(0);
    let (wal, shown) = open_and_check(Arc::new(storage.clone()), opts.clone(), acked)
        .map_err(|e| format!("seed {seed}, restart: {e}"))?;
    drop(wal);
    open_and_check(
        Arc::new(storage.crash(CrashMode::DropUnsynced)),
        opts,
        shown,
    )
    .map_err(|e| format!("seed {seed}, power cut after the restart: {e}"))?;
    Ok((after_cut - acked, shown - acked))
}

#[test]
fn a_failed_commit_has_an_unknown_outcome_but_never_a_partial_one() {
    let (mut some_back, mut none_back) = (0, 0);
    for seed in 0..200 {
        let (back, _) = failed_commit_round(seed).unwrap_or_else(|e| panic!("{e}"));
        if back > 0 {
            some_back += 1;
        } else {
            none_back += 1;
        }
    }
    // The model must have produced both outcomes, or the test shows nothing.
    assert!(
        some_back > 0 && none_back > 0,
        "failed commits came back {some_back} times, stayed out {none_back} times"
    );
}

/// Queues GTID number `seq` as the engine does under `Async` (encoded, then
/// `submit_encoded_acked`): waiting on it makes the caller the combining leader that writes it.
fn queue(wal: &Wal, seq: u64) -> tideline_wal::Appended {
    let mut encoded = tideline_wal::Encoded::with_capacity(1);
    let i = wal
        .encode_into(&txn_for(seq), &mut encoded)
        .expect("encode");
    let (a, ()) = wal
        .submit_encoded_acked(&encoded, i, |_| ())
        .expect("submit");
    a
}

/// Under `Async`, the writer thread's interval sync runs while leading committers write and
/// acknowledge. When it fails, the log cuts everything written since the last good sync. Linux
/// reports a failed fsync's error once, so the next fsync of the file succeeds: a writer that
/// went on syncing on its interval (or at close) would then publish the records just cut. The
/// visible and durable heads must stay where the last good sync left them, and a wait for a cut
/// record must fail with the poison error.
#[test]
fn after_a_failed_async_sync_a_later_sync_publishes_nothing() {
    const INTERVAL: Duration = Duration::from_millis(50);
    let storage = MemStorage::new();
    let wal = Wal::open(
        Arc::new(storage.clone()),
        WalOptions {
            durability: Durability::Async { interval: INTERVAL },
            ..opts(1 << 20)
        },
    )
    .expect("open");
    queue(&wal, 1).wait().expect("ack 1");
    let one = Offset::new(1).expect("offset");
    assert!(
        wal.wait_visible_blocking(one, Duration::from_secs(30))
            .expect("wait for 1"),
        "record 1 never became visible"
    );
    // The interval sync of record 2 is held at the gate; record 3 is written and acknowledged
    // by its leader meanwhile.
    storage.hold_syncs();
    queue(&wal, 2).wait().expect("ack 2");
    assert!(
        storage.wait_syncs_waiting(1, Duration::from_secs(30)),
        "the interval sync of record 2 never started"
    );
    queue(&wal, 3).wait().expect("ack 3");
    // The held sync fails; after it, the disk reports no error (Linux reports it once).
    storage.fail_syncs_from(storage.sync_count() + 1);
    storage.release_syncs();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !wal.is_poisoned() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed sync did not poison the log"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    storage.fail_syncs_from(0);
    // Several intervals, in which a writer that still thought records 2 and 3 unsynced would
    // sync and publish them (an absence is checked: there is no event to wait for).
    std::thread::sleep(INTERVAL * 6);
    assert!(
        wal.visible_offset() == 1 && wal.durable_offset() == 1,
        "after the failed sync: visible {} / durable {}, but only 1 survived the cut",
        wal.visible_offset(),
        wal.durable_offset()
    );
    let three = Offset::new(3).expect("offset");
    match wal.wait_visible_blocking(three, Duration::from_secs(1)) {
        Err(Error::Poisoned { .. }) => {}
        other => panic!("a wait for cut record 3 gave {other:?}, not Poisoned"),
    }
    // Closing syncs what is unsynced: on a poisoned log, it must publish nothing either.
    assert!(matches!(wal.close(), Err(Error::Poisoned { .. })));
    assert!(
        wal.visible_offset() == 1 && wal.durable_offset() == 1,
        "after close: visible {} / durable {}, but only 1 survived the cut",
        wal.visible_offset(),
        wal.durable_offset()
    );
}

/// A segment roll whose new header's fsync fails: Linux marks the header's pages clean without
/// writing them, so the page cache shows a valid header that the disk does not have. A restart
/// without a reboot must not append acknowledged records behind that header, or the next power
/// cut leaves a segment whose header is zeros followed by records: a log that cannot be opened.
/// With `removal_fails`, the log cannot remove the new segment after the failure (as if it had
/// died first), so the restart finds it.
fn header_sync_fails_at_a_roll(removal_fails: bool) -> Result<(), String> {
    let storage = common::Hooked::default();
    let mem = storage.inner.clone();
    let opts = opts(1024);
    let mut acked = 0;
    {
        let wal = Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?;
        storage.fail_removes(removal_fails);
        for seq in 1..=1_000 {
            // A roll syncs the old segment, then the new one's header: the second sync fails.
            mem.fail_syncs_from(mem.sync_count() + 2);
            let appended = wal.append(txn_for(seq));
            mem.fail_syncs_from(0);
            match appended {
                Ok(_) => acked = seq,
                Err(Error::Poisoned { .. }) => break,
                Err(e) => return Err(format!("append {seq}: {e}")),
            }
        }
        if !wal.is_poisoned() {
            return Err("no roll in 1000 appends of 1 KiB segments".into());
        }
    }
    storage.fail_removes(false);
    // A restart with the page cache intact, then acknowledged appends.
    let (restarted, n) = open_and_check(Arc::new(storage.clone()), opts.clone(), acked)
        .map_err(|e| format!("restart: {e}"))?;
    for seq in n + 1..=n + 5 {
        restarted
            .append(txn_for(seq))
            .map_err(|e| format!("append {seq} after the restart: {e}"))?;
    }
    drop(restarted);
    let image = mem.crash(CrashMode::DropUnsynced);
    open_and_check(Arc::new(image), opts, n + 5)
        .map_err(|e| format!("power cut after the restart: {e}"))?;
    Ok(())
}

#[test]
fn a_new_segment_whose_header_sync_failed_does_not_take_records_after_a_restart() {
    header_sync_fails_at_a_roll(false).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_kept_segment_whose_header_sync_failed_gets_its_header_on_disk_at_restart() {
    header_sync_fails_at_a_roll(true).unwrap_or_else(|e| panic!("{e}"));
}

/// Under `Async`, a leading committer that checked the log was healthy just before the writer
/// thread's interval sync failed: it writes its group while the log is poisoned, and the cut
/// that follows removes it. It must answer its committers with the poison error, never `Ok`:
/// nothing is acknowledged after a failure. The leader is held inside its write (a storage
/// hook) until the failed sync has poisoned the log.
#[test]
fn a_leader_writing_when_the_interval_sync_fails_does_not_acknowledge() {
    let in_write = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storage = common::Hooked::default().before_write({
        let (in_write, armed) = (in_write.clone(), armed.clone());
        move |_| {
            if armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                *in_write.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
                in_write.1.notify_all();
                let _ = go_rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .recv_timeout(Duration::from_secs(30));
            }
        }
    });
    let mem = storage.inner.clone();
    let wal = Arc::new(
        Wal::open(
            Arc::new(storage),
            WalOptions {
                durability: Durability::Async {
                    interval: Duration::from_millis(5),
                },
                ..opts(1 << 20)
            },
        )
        .expect("open"),
    );
    // The interval sync of record 1 is held at the gate.
    mem.hold_syncs();
    queue(&wal, 1).wait().expect("ack 1");
    assert!(
        mem.wait_syncs_waiting(1, Duration::from_secs(30)),
        "the interval sync of record 1 never started"
    );
    // Record 2's leader passes the health check and stops inside its write.
    armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let leader = {
        let wal = wal.clone();
        std::thread::spawn(move || queue(&wal, 2).wait())
    };
    {
        let mut entered = in_write.0.lock().unwrap_or_else(|p| p.into_inner());
        while !*entered {
            entered = in_write
                .1
                .wait_timeout(entered, Duration::from_secs(30))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
    // The held sync fails and poisons the log; the writer thread then waits for the leader.
    mem.fail_syncs_from(mem.sync_count() + 1);
    mem.release_syncs();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !wal.is_poisoned() {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed sync did not poison the log"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = go_tx.send(());
    let answer = leader.join().expect("the leader panicked");
    assert!(
        matches!(answer, Err(Error::Poisoned { .. })),
        "record 2, written after the log was poisoned, was answered {answer:?}"
    );
}
