//! A slow fsync, injected by `MemStorage::hold_syncs` (a data sync stopped at a gate the test
//! opens) and `MemStorage::slow_syncs` (every data sync takes a set time).
//!
//! Scenarios and the bounds they check (docs/reliability.md, "Disk faults"):
//! - `sync`: writers that submit while an fsync is held queue behind it; nothing is
//!   acknowledged before the sync that covers it completes (each ack is checked against a
//!   power-cut image taken at that moment), acks come in offset order, and everything queued
//!   behind the slow sync shares one fsync (group commit).
//! - readers and tails: while an fsync is held, a reader reads every record made durable before
//!   it, `wait_visible` for them returns at once and the log's status calls answer; the records
//!   the held sync covers appear as soon as it completes, not before.
//! - `async` with fsyncs slower than the interval: records are acknowledged before their fsync,
//!   and every acknowledged record is durable within the interval plus one sync (the one the
//!   writer starts next), plus a stated scheduling margin: continuous writes never postpone the
//!   interval sync.
//!
//! Guards against: acknowledging before the fsync (canary: `unsafe_skip_fsync` must make the
//! first harness report it), one fsync per writer behind a slow disk, readers serialised
//! behind the writer's fsync, and async syncs starved by a steady write load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tideline_wal::{CrashMode, Durability, MemStorage, Offset, Wal, WalOptions};

use common::{check_log, opts, txn_for};

/// Longest the test waits for an observable condition before calling it a failure.
const WAIT_MAX: Duration = Duration::from_secs(30);

/// Segments large enough that no roll (with syncs of its own) happens in these runs.
const SEGMENT_BYTES: u64 = 16 << 20;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a power cut right now keeps records 1..=`offset`: the image is reopened and
/// checked (dense, as written, at least `offset` records).
fn durable_in_image(storage: &MemStorage, opts: &WalOptions, offset: u64) -> Result<(), String> {
    let image = storage.crash(CrashMode::DropUnsynced);
    let wal = Wal::open(Arc::new(image), opts.clone())
        .map_err(|e| format!("power-cut image does not open: {e}"))?;
    check_log(&wal, offset).map(|_| ())
}

/// The group-commit harness: one record's fsync is held at the gate, eight more are submitted
/// behind it, then the gate opens. Returns how many data syncs the nine records took.
fn held_sync_round(opts: &WalOptions) -> Result<u64, String> {
    let storage = MemStorage::new();
    let wal =
        Arc::new(Wal::open(Arc::new(storage.clone()), opts.clone()).map_err(|e| e.to_string())?);
    storage.hold_syncs();
    let syncs_before = storage.sync_count();
    let acks: Arc<Mutex<Vec<u64>>> = Arc::default();
    let broken: Arc<Mutex<Vec<String>>> = Arc::default();
    let released = Arc::new(AtomicBool::new(false));

    // Each ack is checked the moment it arrives: not before the gate opened (when the sync is
    // a real one), and covered by a power-cut image taken then.
    let waiter = |appended: tideline_wal::Appended| {
        let (storage, opts, acks, broken, released) = (
            storage.clone(),
            opts.clone(),
            acks.clone(),
            broken.clone(),
            released.clone(),
        );
        std::thread::spawn(move || match appended.wait() {
            Ok(offset) => {
                let early = !released.load(Ordering::SeqCst);
                if let Err(e) = durable_in_image(&storage, &opts, offset.get()) {
                    lock(&broken).push(format!(
                        "offset {offset} acknowledged{} but a power cut then loses it: {e}",
                        if early {
                            " while its fsync was held"
                        } else {
                            ""
                        }
                    ));
                }
                lock(&acks).push(offset.get());
            }
            Err(e) => lock(&broken).push(format!("append failed: {e}")),
        })
    };

    let first = wal.submit(txn_for(1)).map_err(|e| e.to_string())?;
    let mut threads = vec![waiter(first)];
    // The writer is inside the first record's fsync (or, with the fsync skipped, past it).
    let deadline = Instant::now() + WAIT_MAX;
    while storage.syncs_waiting() == 0 && lock(&acks).is_empty() && lock(&broken).is_empty() {
        if Instant::now() > deadline {
            return Err("the first record neither reached its fsync nor was acknowledged".into());
        }
        storage.wait_syncs_waiting(1, Duration::from_millis(5));
    }
    for seq in 2..=9 {
        let appended = wal.submit(txn_for(seq)).map_err(|e| e.to_string())?;
        threads.push(waiter(appended));
    }
    // The protected run: the writer is stopped in the first fsync, so nothing can have been
    // acknowledged. (In the canary the acks race ahead; each waiter checks its own image.)
    if !lock(&acks).is_empty() {
        lock(&broken).push(format!(
            "offsets {:?} acknowledged while the first fsync was held",
            lock(&acks)
        ));
    }
    released.store(true, Ordering::SeqCst);
    storage.release_syncs();
    for t in threads {
        t.join().map_err(|_| "an ack waiter panicked".to_string())?;
    }
    if let Some(b) = lock(&broken).first() {
        return Err(b.clone());
    }
    let acked = lock(&acks).clone();
    if acked.len() != 9 {
        return Err(format!("{} of 9 records acknowledged", acked.len()));
    }
    durable_in_image(&storage, opts, 9)?;
    Ok(storage.sync_count() - syncs_before)
}

#[test]
fn group_commit_behind_a_held_fsync_acks_only_once_durable_and_shares_one_fsync() {
    let opts = opts(SEGMENT_BYTES);
    let syncs = held_sync_round(&opts).unwrap_or_else(|e| panic!("{e}"));
    // One sync for the first record, one for the eight queued behind it.
    assert_eq!(
        syncs, 2,
        "nine records behind a slow fsync took {syncs} data syncs: the eight queued behind \
         the held one must share one"
    );
}

#[test]
fn canary_skipping_fsync_acks_before_the_data_is_durable() {
    let opts = WalOptions {
        unsafe_skip_fsync: true,
        ..opts(SEGMENT_BYTES)
    };
    let err = held_sync_round(&opts).expect_err("the harness must see acks that a power cut loses");
    assert!(err.contains("a power cut then loses it"), "{err}");
}

#[test]
fn a_held_fsync_blocks_no_reader_and_no_tail() {
    let storage = MemStorage::new();
    let wal = Arc::new(Wal::open(Arc::new(storage.clone()), opts(SEGMENT_BYTES)).unwrap());
    for seq in 1..=20 {
        wal.append(txn_for(seq)).unwrap();
    }
    storage.hold_syncs();
    let pending = wal.submit(txn_for(21)).unwrap();
    assert!(
        storage.wait_syncs_waiting(1, WAIT_MAX),
        "record 21's fsync never started"
    );

    // Everything a reader needs, on another thread, with a deadline: a reader stuck behind the
    // writer's fsync is reported, not hung.
    let (tx, rx) = std::sync::mpsc::channel();
    let reader_wal = wal.clone();
    std::thread::spawn(move || {
        let run = || -> Result<(u64, bool, bool, u64), String> {
            let mut reader = reader_wal
                .read_from(Offset::FIRST)
                .map_err(|e| e.to_string())?;
            let mut n = 0;
            while let Some(txn) = reader.next_txn().map_err(|e| e.to_string())? {
                n += 1;
                if txn.offset.get() != n {
                    return Err(format!("record {n} read at offset {}", txn.offset));
                }
            }
            let twenty = reader_wal
                .wait_visible_blocking(Offset::new(20).unwrap(), Duration::ZERO)
                .map_err(|e| e.to_string())?;
            let twenty_one = reader_wal
                .wait_visible_blocking(Offset::new(21).unwrap(), Duration::from_millis(50))
                .map_err(|e| e.to_string())?;
            // The status calls a node's `status` makes.
            let _ = (reader_wal.stats(), reader_wal.gtids(), reader_wal.slots());
            Ok((n, twenty, twenty_one, reader_wal.durable_offset()))
        };
        let _ = tx.send(run());
    });
    let (read, twenty, twenty_one, durable) = rx
        .recv_timeout(WAIT_MAX)
        .expect("a reader is blocked behind the held fsync")
        .unwrap();
    assert_eq!(
        read, 20,
        "a reader sees exactly the records durable before the held fsync"
    );
    assert!(
        twenty,
        "record 20 is durable: waiting for it must return at once"
    );
    assert!(
        !twenty_one,
        "record 21 became visible before its fsync completed (sync durability)"
    );
    assert_eq!(durable, 20);
    assert_eq!(storage.syncs_waiting(), 1, "the fsync is still held");

    storage.release_syncs();
    assert_eq!(pending.wait().unwrap().get(), 21);
    assert!(
        wal.wait_visible_blocking(Offset::new(21).unwrap(), WAIT_MAX)
            .unwrap(),
        "record 21 is visible once its fsync completed"
    );
}

#[test]
fn async_with_fsyncs_slower_than_the_interval_acks_first_and_keeps_the_interval_bound() {
    const INTERVAL: Duration = Duration::from_millis(10);
    const SYNC_TAKES: Duration = Duration::from_millis(40);
    // Scheduling on a shared 2-core machine: generous, and still far below what a starved
    // interval sync would show over the run (the whole run, seconds).
    const MARGIN: Duration = Duration::from_millis(750);
    const RUN: Duration = Duration::from_secs(3);
    let opts = WalOptions {
        durability: Durability::Async { interval: INTERVAL },
        ..opts(SEGMENT_BYTES)
    };
    let storage = MemStorage::new();
    let wal = Arc::new(Wal::open(Arc::new(storage.clone()), opts).unwrap());
    storage.slow_syncs(SYNC_TAKES);

    // (offset, when acknowledged, whether it was durable already when acknowledged)
    let acks: Arc<Mutex<Vec<(u64, Instant, bool)>>> = Arc::default();
    // (durable offset, first seen at)
    let durable_seen: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let next = Arc::new(Mutex::new(1u64));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let (wal, acks, next, stop) = (wal.clone(), acks.clone(), next.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // GTID numbers follow offsets: submit under the counter's lock.
                    let appended = {
                        let mut n = lock(&next);
                        let a = wal.submit(txn_for(*n)).unwrap();
                        *n += 1;
                        a
                    };
                    let offset = appended.wait().unwrap().get();
                    let at = Instant::now();
                    let already = wal.durable_offset() >= offset;
                    lock(&acks).push((offset, at, already));
                }
            })
        })
        .collect();
    let watcher_stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (wal, seen, stop) = (wal.clone(), durable_seen.clone(), watcher_stop.clone());
        std::thread::spawn(move || {
            let mut last = 0;
            loop {
                let stopping = stop.load(Ordering::SeqCst);
                let d = wal.durable_offset();
                if d > last {
                    lock(&seen).push((d, Instant::now()));
                    last = d;
                }
                if stopping {
                    return;
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let started = Instant::now();
    while started.elapsed() < RUN {
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.join().unwrap();
    }
    // The records acknowledged last become durable at the next interval sync.
    let last_acked = lock(&acks).iter().map(|a| a.0).max().unwrap();
    let deadline = Instant::now() + WAIT_MAX;
    while wal.durable_offset() < last_acked && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    watcher_stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();

    let acks = lock(&acks).clone();
    let seen = lock(&durable_seen).clone();
    let before_fsync = acks.iter().filter(|a| !a.2).count();
    assert!(
        before_fsync > 0,
        "under async no record was acknowledged before its fsync ({} acks)",
        acks.len()
    );
    let bound = INTERVAL + SYNC_TAKES + MARGIN;
    let mut worst = Duration::ZERO;
    for &(offset, at, _) in &acks {
        let durable_at = seen
            .iter()
            .find(|(d, _)| *d >= offset)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("acknowledged offset {offset} never became durable"));
        worst = worst.max(durable_at.saturating_duration_since(at));
    }
    eprintln!(
        "async, fsync {SYNC_TAKES:?}, interval {INTERVAL:?}: {} acks in {RUN:?}, {before_fsync} \
         before their fsync, {} data syncs, worst ack-to-durable {worst:?} (bound {bound:?})",
        acks.len(),
        storage.sync_count()
    );
    assert!(
        worst <= bound,
        "a record acknowledged under async stayed unsynced for {worst:?}, over the interval \
         ({INTERVAL:?}) plus one slow sync ({SYNC_TAKES:?}) plus the margin ({MARGIN:?})"
    );
}
