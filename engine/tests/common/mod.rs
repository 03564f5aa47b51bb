//! Helpers shared by the engine's multi-process tests (`crash.rs`, `bootstrap.rs`), and an
//! engine's log as an upstream ships it (`replication.rs`, `index_groups.rs`).
//!
//! Owns the one child-process runner: a test binary re-executes itself to run one ignored
//! "child" test in a process of its own, which the parent kills with SIGKILL while the child
//! is observably at work. The runner fails a run whose child did not do what every crash
//! cycle needs (print `READY`, show progress, still be running when killed, die of the
//! SIGKILL, no panic on stderr); what the child's output means is for the caller to judge. Every random choice
//! comes from a seeded generator whose seed is printed, so a failing run replays with
//! `TIDELINE_TEST_SEED`.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tideline_engine::Engine;
use tideline_wal::{NewTransaction, Offset};

#[allow(dead_code)] // used by `indexes.rs` only; not every test including this module does
pub mod index_child;
#[allow(dead_code)] // used by `indexes.rs` only; not every test including this module does
pub mod index_fixture;

/// The environment variable that replays a run: the seed it printed.
pub const SEED_ENV: &str = "TIDELINE_TEST_SEED";

/// How long a child may take to print `READY`, then its first progress line.
const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// SIGKILL's number, the signal a killed child must have died of.
const SIGKILL: i32 = 9;

/// An engine's whole log as the transactions an upstream would ship to a replica.
#[allow(dead_code)] // used by the tests that replicate; not every test including this module does
pub fn log_of(e: &Engine) -> Vec<NewTransaction> {
    e.wal()
        .read_from(Offset::FIRST)
        .expect("reader")
        .map(|t| {
            let t = t.expect("record");
            NewTransaction {
                gtid: t.gtid,
                timestamp_us: t.timestamp_us,
                ops: t.ops,
            }
        })
        .collect()
}

/// The seed of this run: `TIDELINE_TEST_SEED` when set, else a random one; printed (with how
/// to replay it) before anything else happens, and returned with a generator seeded by it.
pub fn seeded(test: &str) -> (u64, StdRng) {
    let seed = match std::env::var(SEED_ENV) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            panic!("{SEED_ENV}={s:?} is not a seed: give the number a run printed, or unset it")
        }),
        Err(_) => rand::rng().random(),
    };
    eprintln!("{test}: seed {seed} (replay with {SEED_ENV}={seed})");
    (seed, StdRng::seed_from_u64(seed))
}

/// What a killed child left: every line it printed on stdout, in order, its stderr, and the
/// delay after its first progress line at which it was killed.
#[derive(Debug)]
pub struct ChildRun {
    pub lines: Vec<String>,
    pub stderr: String,
    pub kill_after_ms: u64,
}

enum Event {
    Ready,
    Progress,
}

/// Runs the ignored test `child` of the current test binary in a child process with the
/// environment `envs`. Waits (at most 20 s each) for a line ending in `READY`, then for the
/// first line `is_progress` accepts after it; lets the child run on for a delay drawn from
/// `kill_after_ms` with `rng`; checks it is still running; kills it with SIGKILL and checks it
/// died of that signal and its stderr reports no panic. libtest may print `test NAME ... ` at the start of the child's first
/// line, so `READY` is matched at the end of a line.
///
/// `Err` says which step failed, prefixed with `label` (the caller's cycle and seed), with
/// the child's exit status and its whole stderr.
pub fn run_child(
    child: &str,
    envs: &[(&str, &OsStr)],
    kill_after_ms: Range<u64>,
    is_progress: fn(&str) -> bool,
    rng: &mut StdRng,
    label: &str,
) -> Result<ChildRun, String> {
    // Drawn first, so the schedule depends on the seed alone, not on the child's timing.
    let delay_ms = rng.random_range(kill_after_ms);
    let exe = std::env::current_exe().map_err(|e| format!("{label}: current exe: {e}"))?;
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            child,
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        command.env(k, v);
    }
    let mut proc = command
        .spawn()
        .map_err(|e| format!("{label}: cannot spawn the child {child}: {e}"))?;
    let (Some(stdout), Some(mut stderr)) = (proc.stdout.take(), proc.stderr.take()) else {
        let _ = proc.kill();
        let _ = proc.wait();
        return Err(format!("{label}: the child's output was not piped"));
    };
    let errs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let outs = std::thread::spawn(move || {
        let mut lines = Vec::new();
        let (mut ready, mut progressed) = (false, false);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !ready && line.ends_with("READY") {
                ready = true;
                let _ = tx.send(Event::Ready);
            } else if ready && !progressed && is_progress(&line) {
                progressed = true;
                let _ = tx.send(Event::Progress);
            }
            lines.push(line);
        }
        lines
    });
    let mut run = Running {
        proc,
        outs,
        errs,
        label,
    };
    run.expect(&rx, "READY", |e| matches!(e, Event::Ready))?;
    run.expect(&rx, "a first progress line", |e| {
        matches!(e, Event::Progress)
    })?;
    // The kill lands at a seeded moment of the child's work (not a synchronisation wait).
    std::thread::sleep(Duration::from_millis(delay_ms));
    match run.proc.try_wait() {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(run.fail(&format!(
                "the child ended by itself before the SIGKILL ({delay_ms} ms after its first progress)"
            )));
        }
        Err(e) => return Err(run.fail(&format!("cannot poll the child: {e}"))),
    }
    if let Err(e) = run.proc.kill() {
        return Err(run.fail(&format!("cannot SIGKILL the child: {e}")));
    }
    let status = run.proc.wait();
    let Running {
        outs, errs, label, ..
    } = run;
    let stderr = errs.join().unwrap_or_default();
    let lines = outs.join().unwrap_or_default();
    // A child may be killed while it is still printing a panic (a backtrace takes a while in a
    // debug build): its stderr says it failed even when its status is the SIGKILL.
    if stderr.contains("panicked at") {
        return Err(format!(
            "{label}: the child panicked before the SIGKILL; child {}; child stderr:\n{stderr}",
            describe(status)
        ));
    }
    match status {
        Ok(s) if s.signal() == Some(SIGKILL) => Ok(ChildRun {
            lines,
            stderr,
            kill_after_ms: delay_ms,
        }),
        other => Err(format!(
            "{label}: the child did not die of the SIGKILL: {}; child stderr:\n{stderr}",
            describe(other)
        )),
    }
}

struct Running<'a> {
    proc: Child,
    outs: JoinHandle<Vec<String>>,
    errs: JoinHandle<String>,
    label: &'a str,
}

impl Running<'_> {
    /// Waits for the event `want` (named `what`), failing on a timeout or a closed stdout.
    fn expect(
        &mut self,
        rx: &Receiver<Event>,
        what: &str,
        want: fn(&Event) -> bool,
    ) -> Result<(), String> {
        loop {
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok(e) if want(&e) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.fail(&format!("no {what} within {STEP_TIMEOUT:?}")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.fail(&format!("the child closed its stdout before {what}")));
                }
            }
        }
    }

    /// Kills and reaps the child, and formats `msg` with its exit status and stderr.
    fn fail(&mut self, msg: &str) -> String {
        let _ = self.proc.kill();
        let status = self.proc.wait();
        let errs = std::mem::replace(&mut self.errs, std::thread::spawn(String::new));
        let stderr = errs.join().unwrap_or_default();
        format!(
            "{}: {msg}; child {}; child stderr:\n{stderr}",
            self.label,
            describe(status)
        )
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with code {c}"),
            (_, Some(sig)) => format!("died of signal {sig}"),
            _ => format!("ended: {s}"),
        },
        Err(e) => format!("could not be reaped: {e}"),
    }
}
