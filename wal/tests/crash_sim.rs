//! Simulated power cuts under concurrent load, on `MemStorage`.
//!
//! Scenario: four writer threads append to a log with small segments (group commit, segment
//! rolls); at random points the test reads the set of acknowledged records and *then* takes
//! the image a power cut would leave (unsynced data dropped, or torn), reopens that image and
//! checks it; the next generation of writers continues on the recovered image. Many seeded
//! rounds.
//!
//! Guards against: an acknowledgement before fsync, a segment whose directory entry or header
//! is not durable before records go into it, recovery that loses, duplicates or reorders
//! records, and recovery that shows records it has not made durable. Canaries: with
//! `unsafe_skip_fsync` the same checker must report loss.

mod common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{CrashMode, MemStorage, Storage, Wal, WalOptions};

use common::{Writers, check_log, open_and_check, opts};

const WRITERS: usize = 4;

/// What the crash images exercised, so the test can show it covered segment rolls.
#[derive(Default, Debug)]
struct Coverage {
    images: u64,
    multi_segment: u64,
}

/// One generation: open `storage`, run the writers, take `crashes` crash images at random
/// points, check each. Returns the last image and the number of records it held.
fn run_generation(
    rng: &mut StdRng,
    storage: MemStorage,
    opts: &WalOptions,
    must_hold: u64,
    crashes: usize,
    cov: &mut Coverage,
) -> Result<(MemStorage, u64), String> {
    let (wal, start) = open_and_check(Arc::new(storage.clone()), opts.clone(), must_hold)?;
    let wal = Arc::new(wal);
    let writers = Writers::start(wal.clone(), WRITERS, start + 1);
    let mut last = None;
    let mut target = 0;
    for _ in 0..crashes {
        target += rng.random_range(1..=120);
        writers.wait_acked(target);
        // The acknowledged set is read before the image is taken: everything acknowledged by
        // then must be in the image.
        let acked_max = writers.log.acked_max();
        let mode = if rng.random_bool(0.5) {
            CrashMode::DropUnsynced
        } else {
            CrashMode::TearUnsynced { seed: rng.random() }
        };
        let image = storage.crash(mode);
        writers.pause(true);
        let (reopened, n) =
            open_and_check(Arc::new(image.clone()), opts.clone(), acked_max.max(start))
                .map_err(|e| format!("image after {mode:?}: {e}"))?;
        cov.images += 1;
        cov.multi_segment += u64::from(reopened.stats().segments.len() > 1);
        drop(reopened);
        // The image, recovered and synced by the check, seeds the next generation.
        last = Some((image, n));
        writers.pause(false);
    }
    let log = writers.stop();
    if let Some(b) = log.broken().first() {
        return Err(b.clone());
    }
    if let Some((seq, e)) = log.take_failed().into_iter().next() {
        return Err(format!("append of GTID number {seq} failed: {e}"));
    }
    wal.close().map_err(|e| format!("close: {e}"))?;
    last.ok_or_else(|| "no crash taken".to_string())
}

/// A round: a few generations, each continuing on the previous crash image.
fn run_round(seed: u64, opts: &WalOptions, cov: &mut Coverage) -> Result<u64, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut storage = MemStorage::new();
    let mut present = 0;
    for generation in 0..3 {
        let (image, n) = run_generation(&mut rng, storage, opts, present, 3, cov)
            .map_err(|e| format!("seed {seed}, generation {generation}: {e}"))?;
        storage = image;
        present = n;
    }
    Ok(present)
}

fn round_opts(seed: u64) -> WalOptions {
    // 1-8 KiB segments: records are up to ~300 bytes, so crashes often land near a roll.
    opts(1024 << (seed % 4))
}

#[test]
fn acked_records_survive_simulated_crashes() {
    let mut cov = Coverage::default();
    for seed in 0..100 {
        run_round(seed, &round_opts(seed), &mut cov).unwrap_or_else(|e| panic!("{e}"));
    }
    // The harness must have exercised what it claims to.
    // (Torn tails are hit in a few percent of the images here, depending on thread timing;
    // `crash_process.rs` covers them deterministically.)
    assert_eq!(cov.images, 900, "{cov:?}");
    assert!(
        cov.multi_segment > 0,
        "no crash image spanned segments: {cov:?}"
    );
}

#[test]
fn canary_crash_checker_reports_loss_without_fsync() {
    // The protection off: appends are acknowledged without any fsync, and new segments are
    // neither synced nor entered durably in the directory.
    for seed in 0..5 {
        let unsafe_opts = WalOptions {
            unsafe_skip_fsync: true,
            ..round_opts(seed)
        };
        let err = run_round(seed, &unsafe_opts, &mut Coverage::default())
            .expect_err("with fsync disabled, a simulated crash must lose acknowledged records");
        assert!(err.contains("LOSS"), "unexpected failure: {err}");
    }
}

#[test]
fn canary_crash_checker_reports_loss_of_unsynced_appends_to_a_durable_segment() {
    // Subtler than the canary above: the log and its segment are created durably, and only the
    // fsync of appended records is skipped.
    let mut rng = StdRng::seed_from_u64(7);
    let safe = opts(1 << 20);
    let storage = MemStorage::new();
    Wal::open(Arc::new(storage.clone()), safe.clone())
        .and_then(|w| w.close())
        .expect("create the log");
    let unsafe_opts = WalOptions {
        unsafe_skip_fsync: true,
        ..safe
    };
    let err = run_generation(
        &mut rng,
        storage,
        &unsafe_opts,
        0,
        1,
        &mut Coverage::default(),
    )
    .expect_err("unsynced acknowledged records must be reported lost");
    assert!(err.contains("LOSS"), "unexpected failure: {err}");
}

/// A process that died after writing records but before syncing them leaves them in the page
/// cache; the next process finds them on open. Before it shows them (to readers, tails,
/// replicas) they must be durable, or a power cut takes back what was already shown.
fn recovered_records_are_durable(reopen: WalOptions) -> Result<(), String> {
    let storage = MemStorage::new();
    {
        // The dying process: writes reach the OS, no fsync happens.
        let dying = WalOptions {
            unsafe_skip_fsync: true,
            ..opts(1 << 20)
        };
        let wal = Wal::open(Arc::new(storage.clone()), dying).map_err(|e| e.to_string())?;
        for seq in 1..=20 {
            wal.append(common::txn_for(seq))
                .map_err(|e| e.to_string())?;
        }
    }
    let wal = Wal::open(Arc::new(storage.clone()), reopen.clone()).map_err(|e| e.to_string())?;
    let shown = check_log(&wal, 20)?;
    // Power cut right after recovery.
    let image = storage.crash(CrashMode::DropUnsynced);
    let (_, n) = open_and_check(Arc::new(image), reopen, shown)?;
    assert_eq!(n, shown);
    Ok(())
}

#[test]
fn recovery_makes_what_it_shows_durable() {
    recovered_records_are_durable(opts(1 << 20)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn canary_recovery_without_fsync_loses_records_it_showed() {
    let unsafe_opts = WalOptions {
        unsafe_skip_fsync: true,
        ..opts(1 << 20)
    };
    let err = recovered_records_are_durable(unsafe_opts)
        .expect_err("recovery that does not sync shows records a power cut takes back");
    assert!(err.contains("LOSS"), "unexpected failure: {err}");
}

#[test]
fn crash_images_are_independent_of_the_live_log() {
    // The harness relies on an image being a snapshot: writes after it must not show up in it.
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), opts(1 << 20)).unwrap();
    wal.append(common::txn_for(1)).unwrap();
    let image = storage.crash(CrashMode::DropUnsynced);
    wal.append(common::txn_for(2)).unwrap();
    let (_, n) = open_and_check(Arc::new(image) as Arc<dyn Storage>, opts(1 << 20), 1).unwrap();
    assert_eq!(n, 1);
}
