//! What readers of an `async` log can see, against a power cut (`MemStorage` crash images).
//!
//! Scenario: under `Durability::Async`, writers append while a reader tails the log from
//! offset 1 (as a tail, a replica or the engine's applier does). At seeded points the test
//! takes what the reader has seen, *then* a power-cut image of the storage (unsynced bytes
//! dropped or torn), reopens the image and appends new transactions with different content,
//! numbered on from what the recovered log holds, exactly as a restarted node would.
//!
//! Guards against: a node reissuing an offset or a GTID number that a reader has already seen
//! with other content. A replica or tail that saw `uuid:n` at offset `n` skips the new `uuid:n`
//! forever and silently diverges. Under `async` the log therefore shows readers only durable
//! records. Canary: `unsafe_show_unsynced` (readers see records once written, the old rule)
//! must make the harness report the reissue.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{
    CrashMode, Durability, MemStorage, NewTransaction, Offset, Transaction, Wal, WalOptions,
};

use common::{Writers, opts, txn_for};

/// Longest the test waits for an observable condition before calling it a failure.
const WAIT_MAX: Duration = Duration::from_secs(30);

fn async_opts(interval: Duration, show_unsynced: bool) -> WalOptions {
    WalOptions {
        durability: Durability::Async { interval },
        unsafe_show_unsynced: show_unsynced,
        ..opts(4096)
    }
}

/// What the restarted node writes as GTID number `seq`: not what the first run wrote.
fn other_txn_for(seq: u64) -> NewTransaction {
    let mut txn = txn_for(seq);
    txn.timestamp_us += 1_000_000_000;
    txn
}

/// Records seen by a reader thread, with a condition variable to wait on their number.
#[derive(Default)]
struct Seen {
    records: Mutex<Vec<Transaction>>,
    grew: Condvar,
}

impl Seen {
    fn snapshot(&self) -> Vec<Transaction> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until at least `n` records were seen; false after [`WAIT_MAX`].
    fn wait_for(&self, n: usize) -> bool {
        let deadline = Instant::now() + WAIT_MAX;
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        while r.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            r = self
                .grew
                .wait_timeout(r, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Tails `wal` from offset 1 into `seen` until `stop`.
fn tail(wal: &Wal, seen: &Seen, stop: &AtomicBool) -> Result<(), String> {
    let mut reader = wal
        .read_from(Offset::FIRST)
        .map_err(|e| format!("open reader: {e}"))?;
    while !stop.load(Ordering::SeqCst) {
        match reader.next_txn() {
            Ok(Some(txn)) => {
                seen.records
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(txn);
                seen.grew.notify_all();
            }
            Ok(None) => {
                // Woken by the next publish; the timeout only lets the loop see `stop`.
                wal.wait_visible_blocking(reader.next_offset(), Duration::from_millis(50))
                    .map_err(|e| format!("wait: {e}"))?;
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(())
}

/// Reopens a crash image as a restarted node would, appends on from what it holds up to past
/// everything `seen`, and checks that every record seen is still there, unchanged. Returns the
/// number of records the image recovered.
fn check_no_reissue(
    image: MemStorage,
    o: &WalOptions,
    seen: &[Transaction],
) -> Result<u64, String> {
    let wal = Wal::open(Arc::new(image.clone()), o.clone()).map_err(|e| format!("reopen: {e}"))?;
    let recovered = wal.visible_offset();
    let seen_max = seen.last().map_or(0, |t| t.offset.get());
    for seq in recovered + 1..=seen_max + 3 {
        wal.append(other_txn_for(seq))
            .map_err(|e| format!("append {seq}: {e}"))?;
    }
    // Closing syncs; reopened, the log shows everything appended.
    wal.close().map_err(|e| format!("close: {e}"))?;
    drop(wal);
    let wal = Wal::open(Arc::new(image), o.clone()).map_err(|e| format!("reopen again: {e}"))?;
    let mut reader = wal
        .read_from(Offset::FIRST)
        .map_err(|e| format!("read back: {e}"))?;
    let mut now = Vec::new();
    while let Some(t) = reader.next_txn().map_err(|e| format!("read back: {e}"))? {
        now.push(t);
    }
    for s in seen {
        let at = now.get(s.offset.get() as usize - 1);
        if at != Some(s) {
            return Err(format!(
                "REISSUE: a reader saw offset {} as GTID {} (ts {}); after the power cut the \
                 node holds {} records and wrote offset {} as {}",
                s.offset,
                s.gtid,
                s.timestamp_us,
                recovered,
                s.offset,
                at.map_or("nothing".to_string(), |t| format!(
                    "GTID {} (ts {})",
                    t.gtid, t.timestamp_us
                )),
            ));
        }
    }
    Ok(recovered)
}

fn round(seed: u64, show_unsynced: bool) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let o = async_opts(
        Duration::from_millis(rng.random_range(1..=5)),
        show_unsynced,
    );
    let storage = MemStorage::new();
    let wal = Arc::new(Wal::open(Arc::new(storage.clone()), o.clone()).map_err(|e| e.to_string())?);
    let writers = Writers::start(wal.clone(), 2, 1);
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (wal, seen, stop) = (wal.clone(), seen.clone(), stop.clone());
        std::thread::spawn(move || tail(&wal, &seen, &stop))
    };
    let mut result = Ok(());
    let mut target = 0;
    for _ in 0..3 {
        target += rng.random_range(1..=100);
        if !seen.wait_for(target) {
            result = Err(format!(
                "the reader saw fewer than {target} records in {WAIT_MAX:?}"
            ));
            break;
        }
        // What the reader has seen is taken *before* the image: all of it was shown.
        let seen_now = seen.snapshot();
        let mode = if rng.random_bool(0.5) {
            CrashMode::DropUnsynced
        } else {
            CrashMode::TearUnsynced { seed: rng.random() }
        };
        let image = storage.crash(mode);
        if let Err(e) = check_no_reissue(image, &o, &seen_now) {
            result = Err(format!("{mode:?}: {e}"));
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let log = writers.stop();
    let read = reader
        .join()
        .map_err(|_| "the reader panicked".to_string())?;
    result?;
    read?;
    if let Some(b) = log.broken().first() {
        return Err(b.clone());
    }
    Ok(())
}

#[test]
fn async_readers_never_see_what_a_power_cut_takes_back() {
    for seed in 0..40 {
        println!("seed {seed}");
        round(seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

#[test]
fn canary_showing_unsynced_records_leads_to_reissued_offsets() {
    let failures: Vec<String> = (0..40).filter_map(|seed| round(seed, true).err()).collect();
    assert!(
        failures.iter().any(|e| e.contains("REISSUE")),
        "showing unsynced records must be caught: {failures:?}"
    );
}

#[test]
fn an_async_reader_sees_nothing_the_first_sync_has_not_covered() {
    // Deterministic: the interval sync never comes; ten acknowledged appends.
    let o = async_opts(Duration::from_secs(24 * 3600), false);
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), o.clone()).expect("open");
    for seq in 1..=10 {
        assert_eq!(wal.append(txn_for(seq)).expect("append").get(), seq);
    }
    assert_eq!(wal.written_offset(), 10);
    let seen: Vec<Transaction> = wal
        .read_from(Offset::FIRST)
        .expect("reader")
        .collect::<Result<_, _>>()
        .expect("read");
    let image = storage.crash(CrashMode::DropUnsynced);
    check_no_reissue(image, &o, &seen).unwrap_or_else(|e| panic!("{e}"));
    // Once synced (close), everything acknowledged is visible.
    wal.close().expect("close");
    let wal = Wal::open(Arc::new(storage), o).expect("reopen");
    assert_eq!(common::check_log(&wal, 10), Ok(10));
}
