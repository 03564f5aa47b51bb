//! A real process killed with SIGKILL at random times, and torn tails left by a power cut.
//!
//! Scenario: this test binary re-executes itself as a child process that opens a log in a
//! temporary directory (`FileStorage`) and appends with four concurrent writer threads, GTID
//! numbers following offsets, printing each GTID number after its append is acknowledged. The
//! parent kills the child with SIGKILL at seeded random moments (before or during recovery,
//! mid-batch, around segment rolls), then checks a copy of the directory: every acknowledged
//! record present, offsets and GTIDs dense from 1 with no duplicates, every record what the
//! child wrote for its number, and nothing lost that an earlier check saw. The next child
//! recovers the killed state itself and goes on from the last GTID, so the log grows over the
//! cycles. Then, on `MemStorage`, tails torn at every possible length by a power cut.
//!
//! Guards against: acknowledging before the record reaches the OS, recovery that loses,
//! duplicates or reorders records, a kill during recovery or a segment roll that leaves a log
//! the next process cannot open, and torn frames kept or cut at the wrong place. Canaries: a
//! child that reports appends *before* their acknowledgement, and a tail cut into durable
//! records, must both be reported as loss by the same checkers.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_wal::{
    CrashMode, Durability, FileStorage, GtidSet, MemStorage, Offset, Storage, Wal, WalOptions,
    record, segment,
};

use common::{UUID, check_log, open_and_check, opts, txn_for};

/// Where the child keeps its log; set only in the child.
const DIR_ENV: &str = "TIDELINE_WAL_CRASH_CHILD_DIR";
/// `ack` (report after the acknowledgement) or `early` (the canary: report before it).
const MODE_ENV: &str = "TIDELINE_WAL_CRASH_CHILD_MODE";
const CHILD_TEST: &str = "child_writer_process";
/// Small segments, so kills land around rolls too.
const SEGMENT_BYTES: u64 = 32 << 10;
const KILL_CYCLES: usize = 60;
/// Longest wait for a child's next line: a bound so a stuck child fails the test instead of
/// hanging it. Nothing is asserted about how long anything takes.
const CHILD_SILENCE_MAX: Duration = Duration::from_secs(60);

fn report(seq: u64) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ack {seq}")
        .and_then(|()| out.flush())
        .is_err()
    {
        // The parent is gone: stop rather than run on unobserved.
        std::process::exit(0);
    }
}

/// The child: appends until killed. Only runs when re-executed by the tests below.
#[test]
#[ignore = "the child process of the kill tests; it does nothing unless they re-execute it"]
fn child_writer_process() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let early = std::env::var(MODE_ENV).is_ok_and(|m| m == "early");
    let storage = FileStorage::new(&dir).expect("the data directory");
    let wal = Arc::new(Wal::open(Arc::new(storage), opts(SEGMENT_BYTES)).expect("open the log"));
    let have = wal.visible_offset();
    let expected: GtidSet = if have == 0 {
        GtidSet::new()
    } else {
        format!("{UUID}:1-{have}").parse().expect("a GTID set")
    };
    assert_eq!(wal.gtids(), expected, "the recovered log is not dense");
    let next = Arc::new(Mutex::new(have + 1));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (wal, next) = (wal.clone(), next.clone());
            std::thread::spawn(move || {
                // Bounded, though the parent always kills first.
                while let Some((seq, appended)) = {
                    let mut next = next.lock().expect("no writer panics holding it");
                    let seq = *next;
                    (seq <= have + 10_000_000).then(|| {
                        let appended = wal.submit(txn_for(seq)).expect("submit");
                        *next += 1;
                        (seq, appended)
                    })
                } {
                    if early {
                        report(seq);
                    }
                    let offset = appended.wait().expect("append");
                    assert_eq!(offset.get(), seq, "GTID numbers follow offsets");
                    if !early {
                        report(seq);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
}

fn spawn_child(data: &Path, stderr: &Path, early: bool) -> (Child, Receiver<u64>) {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture"])
        .env(DIR_ENV, data)
        .env(MODE_ENV, if early { "early" } else { "ack" })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Lines other than acks are the test harness talking; a line cut by the kill has no
        // newline and is not an ack the parent can count on.
        let mut out = BufReader::new(stdout);
        let mut line = String::new();
        while matches!(out.read_line(&mut line), Ok(n) if n > 0) {
            let ack = line
                .strip_suffix('\n')
                .and_then(|l| l.strip_prefix("ack "))
                .and_then(|s| s.parse().ok());
            if let Some(seq) = ack
                && tx.send(seq).is_err()
            {
                break;
            }
            line.clear();
        }
    });
    (child, rx)
}

/// One cycle: start a child, kill it at a random moment, return the GTID numbers it
/// reported.
fn run_child(rng: &mut StdRng, data: &Path, stderr: &Path, early: bool) -> Vec<u64> {
    let (mut child, rx) = spawn_child(data, stderr, early);
    let mut acked = Vec::new();
    let child_failed = |child: &mut Child, why: &str| -> ! {
        let _ = child.kill();
        let _ = child.wait();
        let err = std::fs::read_to_string(stderr).unwrap_or_default();
        panic!("child {why}; its stderr:\n{err}");
    };
    if !early && rng.random_bool(0.15) {
        // Early: during start-up or recovery of the killed state.
        std::thread::sleep(Duration::from_micros(rng.random_range(0..30_000)));
    } else {
        // Right after the k-th acknowledgement, or a moment later: mid-batch.
        let k = rng.random_range(if early { 20..=150 } else { 1..=150 });
        while acked.len() < k {
            match rx.recv_timeout(CHILD_SILENCE_MAX) {
                Ok(seq) => acked.push(seq),
                Err(RecvTimeoutError::Timeout) => child_failed(&mut child, "went silent"),
                Err(RecvTimeoutError::Disconnected) => child_failed(&mut child, "exited"),
            }
        }
        if rng.random_bool(0.5) {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..3_000)));
        }
    }
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    if status.signal() != Some(libc::SIGKILL) {
        child_failed(&mut child, &format!("ended by itself ({status})"));
    }
    // Everything the child printed before it died.
    acked.extend(rx.iter());
    acked
}

/// Opens a copy of `data` (so the next child recovers the killed state itself) and checks it.
fn check_copy(data: &Path, scratch: &Path, must_hold: u64) -> Result<(u64, usize), String> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(data).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        std::fs::copy(entry.path(), scratch.join(entry.file_name())).map_err(|e| e.to_string())?;
    }
    let storage = FileStorage::new(scratch).map_err(|e| e.to_string())?;
    let (wal, n) = open_and_check(Arc::new(storage), opts(SEGMENT_BYTES), must_hold)?;
    let segments = wal.stats().segments.len();
    Ok((n, segments))
}

struct Dirs {
    _root: tempfile::TempDir,
    data: PathBuf,
    scratch: PathBuf,
    stderr: PathBuf,
}

fn dirs() -> Dirs {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("log");
    std::fs::create_dir_all(&data).expect("data dir");
    Dirs {
        data,
        scratch: root.path().join("check"),
        stderr: root.path().join("child-stderr.txt"),
        _root: root,
    }
}

#[test]
fn sigkilled_writer_loses_no_acknowledged_record() {
    let d = dirs();
    let mut rng = StdRng::seed_from_u64(0x5EED_0001);
    let mut present = 0;
    let mut acked_total = 0;
    let mut segments = 0;
    for cycle in 0..KILL_CYCLES {
        let acked = run_child(&mut rng, &d.data, &d.stderr, false);
        acked_total += acked.len();
        let must_hold = acked.iter().copied().max().unwrap_or(0).max(present);
        let (n, segs) = check_copy(&d.data, &d.scratch, must_hold)
            .unwrap_or_else(|e| panic!("after kill {cycle}: {e}"));
        present = n;
        segments = segs;
    }
    assert!(
        acked_total > 0 && present > 0,
        "the children made no progress"
    );
    assert!(segments > 1, "the log never rolled a segment");
}

#[test]
fn canary_kill_checker_reports_acks_sent_before_durability() {
    // A child that reports each append as soon as it is submitted, before its acknowledgement:
    // the kill catches records it reported that never reached the log.
    let d = dirs();
    let mut rng = StdRng::seed_from_u64(0x5EED_0002);
    let mut present = 0;
    for _ in 0..20 {
        let acked = run_child(&mut rng, &d.data, &d.stderr, true);
        let must_hold = acked.iter().copied().max().unwrap_or(0).max(present);
        match check_copy(&d.data, &d.scratch, must_hold) {
            Ok((n, _)) => present = n,
            Err(e) => {
                assert!(e.contains("LOSS"), "unexpected failure: {e}");
                return;
            }
        }
    }
    panic!("20 kills of a child acknowledging early and the checker never reported loss");
}

/// The frame sizes of the workload's records `1..=n`.
fn frame_sizes(n: u64) -> Vec<u64> {
    (1..=n)
        .map(|seq| {
            let mut out = Vec::new();
            record::encode_frame(Offset::new(seq).expect("seq >= 1"), &txn_for(seq), &mut out)
                .expect("encode");
            out.len() as u64
        })
        .collect()
}

#[derive(Default, Debug)]
struct TornCoverage {
    cut_mid_frame: u32,
    kept_unsynced_frames: u32,
}

/// Records `1..=synced` durable; `synced+1..=synced+unsynced` written (acknowledged under
/// `Async`) but not synced; then a power cut tears the unsynced bytes at a seeded length.
/// Recovery must keep exactly the whole frames of the surviving prefix and cut the rest.
fn torn_tail_round(seed: u64, cov: &mut TornCoverage) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let synced = rng.random_range(1..=30);
    let unsynced = rng.random_range(1..=10);
    let storage = MemStorage::new();
    let e = |e: tideline_wal::Error| e.to_string();
    {
        let wal = Wal::open(Arc::new(storage.clone()), opts(1 << 20)).map_err(e)?;
        for seq in 1..=synced {
            wal.append(txn_for(seq)).map_err(e)?;
        }
        wal.close().map_err(e)?;
    }
    let never_syncs = WalOptions {
        durability: Durability::Async {
            interval: Duration::from_secs(24 * 3600),
        },
        ..opts(1 << 20)
    };
    let wal = Wal::open(Arc::new(storage.clone()), never_syncs).map_err(e)?;
    for seq in synced + 1..=synced + unsynced {
        wal.append(txn_for(seq)).map_err(e)?;
    }
    let image = storage.crash(CrashMode::TearUnsynced { seed: rng.random() });
    drop(wal);

    // Where the whole frames of the surviving bytes end.
    let name = segment::file_name(Offset::FIRST);
    let len = image.file_len(&name).map_err(|e| e.to_string())?;
    let mut end = segment::encode_header(Offset::FIRST, UUID, 0, &GtidSet::new()).len() as u64;
    let mut whole = 0;
    for size in frame_sizes(synced + unsynced) {
        if end + size > len {
            break;
        }
        end += size;
        whole += 1;
    }
    let (wal, n) = open_and_check(Arc::new(image.clone()), opts(1 << 20), synced)?;
    if n != whole {
        return Err(format!(
            "seed {seed}: {n} records recovered, {whole} whole frames survived"
        ));
    }
    let cut = wal.recovery_report().truncated_bytes;
    if cut != len - end {
        return Err(format!(
            "seed {seed}: {cut} bytes cut, the torn frame had {}",
            len - end
        ));
    }
    cov.cut_mid_frame += u32::from(cut > 0);
    cov.kept_unsynced_frames += u32::from(n > synced);

    // Appends after the cut go where the torn frame was, and survive the next power cut.
    for seq in n + 1..=n + 5 {
        wal.append(txn_for(seq)).map_err(e)?;
    }
    let again = image.crash(CrashMode::TearUnsynced { seed: rng.random() });
    drop(wal);
    open_and_check(Arc::new(again), opts(1 << 20), n + 5)
        .map_err(|err| format!("seed {seed}, after appending past the cut: {err}"))?;
    Ok(())
}

#[test]
fn torn_tail_is_cut_at_the_last_whole_record() {
    let mut cov = TornCoverage::default();
    for seed in 0..300 {
        torn_tail_round(seed, &mut cov).unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(
        cov.cut_mid_frame > 30 && cov.kept_unsynced_frames > 30,
        "the tears did not cover both cases: {cov:?}"
    );
}

#[test]
fn canary_torn_tail_checker_reports_a_cut_into_durable_records() {
    // The checker must notice if recovery cut too much: cut the last durable record off a
    // torn image by hand.
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage.clone()), opts(1 << 20)).expect("open");
    for seq in 1..=10 {
        wal.append(txn_for(seq)).expect("append");
    }
    let image = storage.crash(CrashMode::TearUnsynced { seed: 1 });
    drop(wal);
    let name = segment::file_name(Offset::FIRST);
    let len = image.file_len(&name).expect("len");
    let last = *frame_sizes(10).last().expect("sizes");
    image
        .open(&name)
        .and_then(|f| f.set_len(len - last))
        .expect("cut");
    let err = open_and_check(Arc::new(image), opts(1 << 20), 10)
        .map(|(_, n)| n)
        .expect_err("a cut into durable records must be reported");
    assert!(err.contains("LOSS"), "unexpected failure: {err}");
}

#[test]
fn check_log_rejects_a_log_from_another_workload() {
    // The prefix check compares bytes, not counts: a log of other records fails it.
    let storage = MemStorage::new();
    let wal = Wal::open(Arc::new(storage), opts(1 << 20)).expect("open");
    let mut other = txn_for(1);
    other.timestamp_us += 1;
    wal.append(other).expect("append");
    assert!(check_log(&wal, 1).is_err());
}
