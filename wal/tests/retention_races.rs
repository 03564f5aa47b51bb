//! Retention running beside the other operations that change which segments exist.
//!
//! Scenario: a thread loops `run_retention` (no minimum kept, small segments, writers rolling
//! new ones) while the test thread (a) replaces the history with `reset_history`, (b) creates
//! slots at the log's first offset, or (c) takes power-cut images while retention invalidates
//! a slot past its cap.
//!
//! Guards against: a reset and retention removing the same segment (the loser fails on a
//! missing file and poisons the log or reports an I/O error); a slot created for an offset that
//! retention removes between the slot's check and its creation (an active slot whose log is
//! gone: its consumer finds `OffsetUnavailable` instead of the slot holding the log); and
//! segments removed before the invalidation of the slot that needed them is saved (after a
//! crash the slot says active, its log is gone).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{
    CrashMode, Error, MemStorage, Offset, RetentionPolicy, SlotState, Storage, Wal, WalOptions,
};

use common::{Hooked, Writers, opts, txn_for};

fn retain_nothing(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: None,
            slot_age_max: None,
        },
        ..opts(segment_bytes_max)
    }
}

/// A thread calling `body` in a loop until stopped; the first error ends it and is kept.
struct Looping {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
}

impl Looping {
    fn start(mut body: impl FnMut() -> Result<(), String> + Send + 'static) -> Looping {
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handle = {
            let (stop, error, rounds) = (stop.clone(), error.clone(), rounds.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = body() {
                        *error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return;
                    }
                    rounds.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        Looping {
            stop,
            handle: Some(handle),
            error,
            rounds,
        }
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn stop(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join()
                .map_err(|_| "the looping thread panicked".to_string())?;
        }
        match self.error() {
            Some(e) => Err(e),
            None => Ok(self.rounds.load(Ordering::SeqCst)),
        }
    }
}

impl Drop for Looping {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn retention_loop(wal: &Arc<Wal>) -> Looping {
    let wal = wal.clone();
    Looping::start(move || {
        wal.run_retention()
            .map(|_| ())
            .map_err(|e| format!("retention: {e}"))
    })
}

/// The race's widening: once armed, the first segment removal made while a history reset is
/// under way (its `.reset` file exists) stops and lets retention run meanwhile: it opens the
/// segments retention may remove and waits (boundedly) for the retention loop to go round
/// twice. This widens the window of the race to the whole of a retention run, without
/// changing what either side does. `paused` is set when the reset is paused; the retention
/// loop then lifts the owner's floor.
fn pause_reset_removal(
    armed: &Arc<AtomicBool>,
    paused: &Arc<AtomicBool>,
    retention_rounds: &Arc<AtomicU64>,
) -> Hooked {
    let storage = Hooked::default();
    let (inner, armed, paused, rounds) = (
        storage.inner.clone(),
        armed.clone(),
        paused.clone(),
        retention_rounds.clone(),
    );
    storage.before_remove(move |name| {
        let resetting = inner
            .list()
            .is_ok_and(|l| l.iter().any(|n| n.ends_with(".reset")));
        if resetting && name.ends_with(".wal") && armed.swap(false, Ordering::SeqCst) {
            let start = rounds.load(Ordering::SeqCst);
            paused.store(true, Ordering::SeqCst);
            // Bounded: with the fix, retention waits for the reset, so it cannot go round.
            let deadline = Instant::now() + Duration::from_millis(100);
            while rounds.load(Ordering::SeqCst) < start + 2 && Instant::now() < deadline {
                std::thread::yield_now();
            }
        }
    })
}

#[test]
fn reset_history_beside_looping_retention() {
    let armed = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let retention_rounds = Arc::new(AtomicU64::new(0));
    let storage = pause_reset_removal(&armed, &paused, &retention_rounds);
    let wal = Arc::new(Wal::open(Arc::new(storage), retain_nothing(1024)).expect("open"));
    let retention = {
        let (wal, paused, rounds) = (wal.clone(), paused.clone(), retention_rounds.clone());
        Looping::start(move || {
            // The floor is lifted before the flag drops: the test's next round, which waits
            // for the flag, must not set its floor before this lift lands (under load the lift
            // came after it, and retention then took the round's segments).
            if paused.load(Ordering::SeqCst) {
                wal.set_retention_floor(Offset::new(u64::MAX).expect("not 0"));
                paused.store(false, Ordering::SeqCst);
            }
            let r = wal.run_retention().map(|_| ());
            rounds.fetch_add(1, Ordering::SeqCst);
            r.map_err(|e| format!("retention: {e}"))
        })
    };
    let mut seq = 0;
    for round in 0..20 {
        // Segments held back by the owner's floor, released once a reset to the GTIDs they
        // hold (as a bootstrap that copied exactly this state would do) is about to remove
        // them: retention and the reset both go for them.
        wal.set_retention_floor(wal.first_offset());
        for _ in 0..40 {
            seq += 1;
            wal.append(txn_for(seq))
                .unwrap_or_else(|e| panic!("round {round}: append {seq}: {e}"));
        }
        assert!(
            wal.stats().segments.len() > 2,
            "round {round}: too few segments"
        );
        let set = wal.gtids();
        armed.store(true, Ordering::SeqCst);
        if let Err(e) = wal.reset_history(&set) {
            panic!(
                "round {round}: reset_history failed beside retention: {e}; retention: {:?}",
                retention.error()
            );
        }
        assert_eq!(wal.gtids(), set, "round {round}");
        // The retention loop lifts the floor in its next round; wait for that before the next
        // round holds segments again, so the lift cannot land in the middle of it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while paused.load(Ordering::SeqCst) && retention.error().is_none() {
            assert!(
                Instant::now() < deadline,
                "round {round}: retention stalled"
            );
            std::thread::yield_now();
        }
        if let Some(e) = retention.error() {
            panic!("round {round}: retention failed beside reset_history: {e}");
        }
    }
    retention.stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(!wal.is_poisoned());
}

#[test]
fn create_slot_beside_looping_retention() {
    let wal = Arc::new(Wal::open(Arc::new(MemStorage::new()), retain_nothing(1024)).expect("open"));
    let writers = Writers::start(wal.clone(), 1, 1);
    writers.wait_acked(50);
    let retention = retention_loop(&wal);
    let mut created = 0;
    for i in 0..3000 {
        let name = format!("s{i}");
        let restart = wal.first_offset();
        match wal.create_slot(&name, restart) {
            Ok(info) => {
                created += 1;
                // The slot holds the log from its restart offset on, from its creation.
                let first = wal.first_offset();
                assert!(
                    first.get() <= info.restart_offset,
                    "slot {name} was created for offset {} but the log now starts at {first}: \
                     retention removed what the slot holds",
                    info.restart_offset
                );
                wal.read_from(Offset::new(info.restart_offset).expect("restart >= 1"))
                    .unwrap_or_else(|e| panic!("slot {name}: its restart offset is gone: {e}"));
                wal.drop_slot(&name).expect("drop slot");
            }
            // Retention moved the first offset between the read above and the slot's check:
            // refused, which is right.
            Err(Error::OffsetUnavailable { .. }) => {}
            Err(e) => panic!("create_slot {name}: {e}"),
        }
    }
    let log = writers.stop();
    retention.stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(log.take_failed().is_empty());
    assert!(created > 0, "no slot was created");
}

/// Opens a crash image and checks that every active slot still has its log.
fn check_slots_hold(image: MemStorage, o: &WalOptions) -> Result<(), String> {
    let wal = Wal::open(Arc::new(image), o.clone()).map_err(|e| format!("reopen: {e}"))?;
    let first = wal.first_offset();
    for slot in wal.slots() {
        if slot.state == SlotState::Active && slot.restart_offset < first.get() {
            return Err(format!(
                "after the crash slot {} is active at offset {} but the log starts at {first}: \
                 its segments were removed before its invalidation was saved",
                slot.name, slot.restart_offset
            ));
        }
    }
    Ok(())
}

#[test]
fn slot_invalidation_is_saved_before_its_segments_go() {
    let seed = 13;
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let o = WalOptions {
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: Some(4096),
            slot_age_max: None,
        },
        ..opts(1024)
    };
    let storage = MemStorage::new();
    let wal = Arc::new(Wal::open(Arc::new(storage.clone()), o.clone()).expect("open"));
    wal.create_slot("dead", Offset::FIRST).expect("slot");
    let writers = Writers::start(wal.clone(), 1, 1);
    // A consumer that never advances: retention invalidates its slot past the cap; it is then
    // dropped and re-created at the log's start, to be invalidated again.
    let retention = {
        let wal = wal.clone();
        Looping::start(move || {
            let report = wal.run_retention().map_err(|e| format!("retention: {e}"))?;
            if !report.invalidated_slots.is_empty() {
                wal.drop_slot("dead").map_err(|e| format!("drop: {e}"))?;
                wal.create_slot("dead", wal.first_offset())
                    .map_err(|e| format!("create: {e}"))?;
            }
            Ok(())
        })
    };
    for image in 0..400 {
        writers.wait_acked(image * 5);
        let mode = if rng.random_bool(0.5) {
            CrashMode::DropUnsynced
        } else {
            CrashMode::TearUnsynced { seed: rng.random() }
        };
        check_slots_hold(storage.crash(mode), &o)
            .unwrap_or_else(|e| panic!("image {image} ({mode:?}): {e}"));
    }
    let log = writers.stop();
    let rounds = retention.stop().unwrap_or_else(|e| panic!("{e}"));
    assert!(log.take_failed().is_empty());
    assert!(rounds > 0);
    assert!(
        wal.stats().first_offset.get() > 1,
        "retention never removed a segment"
    );
}
