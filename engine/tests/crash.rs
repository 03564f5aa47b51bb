//! Crash test with the real process: a child process (this test binary, re-executed) runs
//! concurrent writers against an engine on real files; the parent kills it with SIGKILL at a
//! random moment, reopens the engine and checks the invariants, then starts the next cycle on
//! the same directory:
//! - every acknowledged transaction is present (acked ⇒ durable), exactly once;
//! - each writer's transactions form a gap-free prefix (no holes, nothing reordered);
//! - the `add` counter bumped in every transaction equals the number of transactions, so no
//!   merge was lost or applied twice on replay;
//! - `gtid_executed` is `uuid:1-N` with N the last offset (dense, no duplicates).
//!
//! Every cycle must show progress of its own (the child acknowledged writes, and more writes
//! are present after it than before); the runner fails a cycle whose child printed no `READY`
//! or no ack, ended before the kill, or did not die of the SIGKILL, and shows its stderr.
//! Kill moments come from a seeded generator: the seed is printed at the start and in every
//! failure, and `TIDELINE_TEST_SEED=N` replays that kill schedule (thread timing still varies).
//!
//! Canary: with log replay disabled the same check must fail, proving it catches loss; the
//! `runner_reports_*` tests are the runner's canaries (a misbehaving child must fail a run).
//! `TIDELINE_CRASH_CYCLES` sets the number of cycles (default 50).

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::SEED_ENV;
use rand::rngs::StdRng;
use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{FileStorage, Wal, WalOptions};

const CHILD: &str = "crash_child";
const ENV_DIR: &str = "TIDELINE_ENGINE_CRASH_DIR";
const ENV_CYCLE: &str = "TIDELINE_ENGINE_CRASH_CYCLE";
const WRITERS: usize = 4;

fn open(dir: &Path, opts: EngineOptions) -> Engine {
    let storage = FileStorage::new(dir.join("log")).expect("log dir");
    // Small segments keep recovery's scan of the last segment short.
    let wal_opts = WalOptions {
        segment_bytes_max: 1 << 20,
        ..WalOptions::default()
    };
    let wal = Wal::open(Arc::new(storage), wal_opts).expect("open log");
    Engine::open(dir.join("store"), Arc::new(wal), opts).expect("open engine")
}

fn key(cycle: u64, writer: usize, i: u64) -> Vec<u8> {
    format!("c{cycle:04}-w{writer}-{i:08}").into_bytes()
}

/// The child: writes until killed. Not a test on its own (ignored; returns at once without
/// the environment the parent sets).
#[test]
#[ignore = "child process of the SIGKILL crash test"]
fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let cycle: u64 = std::env::var(ENV_CYCLE)
        .ok()
        .and_then(|c| c.parse().ok())
        .expect("cycle number");
    let engine = Arc::new(open(Path::new(&dir), EngineOptions::default()));
    engine
        .create_tree("counts", Some("add"))
        .expect("create counts");
    println!("READY");
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let k = key(cycle, w, i);
                    engine
                        .transaction(|tx| {
                            tx.put("default", &k, &k)?;
                            tx.merge("counts", b"total", b"1")?;
                            Ok(())
                        })
                        .expect("commit");
                    println!("A {w} {i}");
                    // Paced, so that 50 cycles stay quick to recover in a debug build (the
                    // store replays its own journal on open); still 4 concurrent writers.
                    std::thread::sleep(Duration::from_millis(4));
                }
            })
        })
        .collect();
    for t in threads {
        // A writer only ends by failing: its panic fails this child (the parent sees the
        // child end before the SIGKILL and shows the panic from its stderr).
        t.join().expect("a writer thread failed");
    }
}

/// One killed child: the acknowledged (writer, i) pairs and what the runner kept.
struct Cycle {
    acked: Vec<(usize, u64)>,
    run: common::ChildRun,
}

/// Runs one child until its first acknowledgement and a seeded while after, kills it, returns
/// the acknowledged (writer, i) pairs; panics (naming `label`) when the runner reports one.
fn run_child(dir: &Path, cycle: u64, rng: &mut StdRng, label: &str) -> Cycle {
    let cycle = cycle.to_string();
    let run = common::run_child(
        CHILD,
        &[(ENV_DIR, dir.as_os_str()), (ENV_CYCLE, OsStr::new(&cycle))],
        5..150,
        |l| l.starts_with("A "),
        rng,
        label,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut acked = Vec::new();
    for line in &run.lines {
        let mut parts = line.split(' ');
        if parts.next() == Some("A") {
            let w = parts.next().and_then(|x| x.parse().ok());
            let i = parts.next().and_then(|x| x.parse().ok());
            if let (Some(w), Some(i)) = (w, i) {
                acked.push((w, i));
            }
        }
    }
    Cycle { acked, run }
}

/// Checks every invariant; `Err` names the first one broken.
fn verify(
    dir: &Path,
    acked: &BTreeMap<(u64, usize), u64>,
    opts: EngineOptions,
) -> Result<u64, String> {
    let engine = open(dir, opts);
    let pos = engine.position();
    let last = pos.offset.map_or(0, |o| o.get());
    let uuid = engine.server_uuid();
    let want_gtids = if last == 0 {
        String::new()
    } else {
        format!("{uuid}:1-{last}")
    };
    if pos.gtid_executed.to_string() != want_gtids {
        return Err(format!(
            "gtid_executed {} at offset {last}",
            pos.gtid_executed
        ));
    }
    if engine.wal().visible_offset() != last {
        return Err(format!(
            "store applied {last} but the log ends at {}",
            engine.wal().visible_offset()
        ));
    }
    // Present keys, per (cycle, writer), must be 0..n without gaps, covering every ack.
    let mut present: BTreeMap<(u64, usize), Vec<u64>> = BTreeMap::new();
    let mut total_keys = 0u64;
    for kv in engine
        .range::<&[u8]>("default", .., false)
        .map_err(|e| e.to_string())?
    {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        if k != v {
            return Err(format!(
                "key {:?} has a wrong value",
                String::from_utf8_lossy(&k)
            ));
        }
        let s = String::from_utf8_lossy(&k).into_owned();
        let parse = || -> Option<(u64, usize, u64)> {
            let mut it = s.split('-');
            let c = it.next()?.strip_prefix('c')?.parse().ok()?;
            let w = it.next()?.strip_prefix('w')?.parse().ok()?;
            let i = it.next()?.parse().ok()?;
            Some((c, w, i))
        };
        let (c, w, i) = parse().ok_or_else(|| format!("unexpected key {s}"))?;
        present.entry((c, w)).or_default().push(i);
        total_keys += 1;
    }
    for ((c, w), is) in &present {
        for (n, i) in is.iter().enumerate() {
            if *i != n as u64 {
                return Err(format!(
                    "cycle {c} writer {w}: transaction {n} missing or duplicated"
                ));
            }
        }
    }
    for (&(c, w), &max) in acked {
        let have = present.get(&(c, w)).map_or(0, |v| v.len() as u64);
        if have < max + 1 {
            return Err(format!(
                "cycle {c} writer {w}: acknowledged up to {max} but only {have} present"
            ));
        }
    }
    let total = engine
        .get("counts", b"total")
        .map_err(|e| e.to_string())?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_else(|| "0".into());
    if total != total_keys.to_string() {
        return Err(format!(
            "counter is {total} but {total_keys} transactions are present (merge lost or doubled)"
        ));
    }
    // Setup transactions (create `counts`) come first: every other offset is one write.
    let setup = last - total_keys;
    if total_keys > 0 && setup != 1 {
        return Err(format!(
            "{setup} transactions that are not writes (expected 1)"
        ));
    }
    engine.close().map_err(|e| e.to_string())?;
    Ok(total_keys)
}

fn cycles() -> u64 {
    std::env::var("TIDELINE_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50)
}

#[test]
fn sigkill_during_concurrent_writes_loses_nothing() {
    let (seed, mut rng) = common::seeded("sigkill_during_concurrent_writes_loses_nothing");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: BTreeMap<(u64, usize), u64> = BTreeMap::new();
    let mut acked_total = 0usize;
    let mut durable = 0u64;
    for cycle in 0..cycles() {
        let label = format!("cycle {cycle} (seed {seed}, replay with {SEED_ENV}={seed})");
        let Cycle { acked: got, run } = run_child(dir.path(), cycle, &mut rng, &label);
        let fail = |e: &str| -> ! {
            panic!(
                "{label}: {e} (killed {} ms after the first ack); child stderr:\n{}",
                run.kill_after_ms, run.stderr
            )
        };
        // Progress in this cycle, not only over the run: acks, and more durable writes.
        if got.is_empty() {
            fail("the child acknowledged nothing");
        }
        acked_total += got.len();
        for (w, i) in got {
            let e = acked.entry((cycle, w)).or_insert(0);
            *e = (*e).max(i);
        }
        match verify(dir.path(), &acked, EngineOptions::default()) {
            Ok(n) if n > durable => durable = n,
            Ok(n) => fail(&format!(
                "{n} writes present after the cycle, {durable} before"
            )),
            Err(e) => fail(&e),
        }
    }
    eprintln!(
        "{} cycles (seed {seed}), {acked_total} acknowledged and {durable} durable transactions checked",
        cycles()
    );
}

#[test]
fn canary_without_replay_the_crash_test_detects_loss() {
    let (seed, mut rng) = common::seeded("canary_without_replay_the_crash_test_detects_loss");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: BTreeMap<(u64, usize), u64> = BTreeMap::new();
    let broken = EngineOptions {
        unsafe_skip_replay: true,
        ..EngineOptions::default()
    };
    for cycle in 0..10 {
        let label = format!("canary cycle {cycle} (seed {seed}, replay with {SEED_ENV}={seed})");
        for (w, i) in run_child(dir.path(), cycle, &mut rng, &label).acked {
            let e = acked.entry((cycle, w)).or_insert(0);
            *e = (*e).max(i);
        }
        if let Err(e) = verify(dir.path(), &acked, broken.clone()) {
            eprintln!("{label}: the harness caught the loss: {e}");
            return;
        }
    }
    panic!(
        "with replay disabled, 10 crash cycles went unnoticed (seed {seed}): the crash test is blind"
    );
}

// ---------------------------------------------------------------------------------------
// The runner's own checks (its canaries): a child that misbehaves must fail the run.

const PROBE: &str = "runner_probe_child";
const ENV_PROBE: &str = "TIDELINE_ENGINE_RUNNER_PROBE";

/// A child that misbehaves on purpose, as `TIDELINE_ENGINE_RUNNER_PROBE` says. Not a test on
/// its own (ignored; returns at once without that environment).
#[test]
#[ignore = "child process of the runner's own tests"]
fn runner_probe_child() {
    match std::env::var(ENV_PROBE).as_deref() {
        Ok("die") => {
            println!("READY");
            println!("A 0 0");
            // Fails like a writer would, then ends (at once, unlike a backtrace-printing panic).
            eprintln!("thread 'writer' panicked at crash.rs: probe child failing on purpose");
            std::process::exit(3);
        }
        Ok("panicking") => {
            println!("READY");
            eprintln!("thread 'writer' panicked at crash.rs: probe child failing on purpose");
            println!("A 0 0");
            loop {
                std::thread::park();
            }
        }
        Ok("no-ready") => {
            eprintln!("probe child leaving before READY");
        }
        Ok("no-progress") => {
            println!("READY");
            eprintln!("probe child leaving before any progress");
        }
        _ => {}
    }
}

/// Runs the probe child `how`; the runner's error, or a panic saying it accepted the child.
fn probe(how: &str, kill_after_ms: std::ops::Range<u64>) -> String {
    let (seed, mut rng) = common::seeded(how);
    let label = format!("probe {how} (seed {seed})");
    match common::run_child(
        PROBE,
        &[(ENV_PROBE, OsStr::new(how))],
        kill_after_ms,
        |l| l.starts_with("A "),
        &mut rng,
        &label,
    ) {
        Ok(run) => panic!("the runner accepted a misbehaving child ({how}): {run:?}"),
        Err(e) => {
            assert!(e.starts_with(&label), "the error names the run: {e}");
            e
        }
    }
}

#[test]
fn runner_reports_a_child_that_dies_on_its_own() {
    // A second is ample for the child to end after its ack (it exits at once).
    let e = probe("die", 1000..1001);
    assert!(e.contains("ended by itself"), "{e}");
    assert!(e.contains("exited with code 3"), "exit status shown: {e}");
    assert!(
        e.contains("probe child failing on purpose"),
        "stderr shown: {e}"
    );
}

#[test]
fn runner_reports_a_child_that_never_gets_ready() {
    let e = probe("no-ready", 0..1);
    assert!(e.contains("before READY"), "{e}");
    assert!(
        e.contains("probe child leaving before READY"),
        "stderr shown: {e}"
    );
}

#[test]
fn runner_reports_a_child_that_makes_no_progress() {
    let e = probe("no-progress", 0..1);
    assert!(e.contains("before a first progress line"), "{e}");
    assert!(
        e.contains("probe child leaving before any progress"),
        "stderr shown: {e}"
    );
}

#[test]
fn runner_reports_a_child_killed_while_panicking() {
    let e = probe("panicking", 0..1);
    assert!(e.contains("panicked before the SIGKILL"), "{e}");
    assert!(e.contains("died of signal 9"), "exit status shown: {e}");
    assert!(
        e.contains("probe child failing on purpose"),
        "stderr shown: {e}"
    );
}
