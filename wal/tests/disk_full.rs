//! A real full disk: the log on a 1 MiB tmpfs (mounted by the test; root only), partly taken by
//! a filler file, four writers appending until the file system has no space left.
//!
//! The log must fail-stop (poisoned; every writer gets `Poisoned` naming "No space left on
//! device"; nothing acknowledged after the failure), and once space is freed (the filler
//! removed) a restart must find every acknowledged record (and no torn one) and take writes
//! again. Canary: with `unsafe_ignore_write_errors` (the log acknowledges over the failed
//! write) the same check must report loss.
//!
//! Needs `mount -t tmpfs` (root, or CAP_SYS_ADMIN). Without it the test skips with a loud line,
//! except under CI (`CI` set), where it fails. `tests/write_failure.rs` covers the same
//! behaviour on the in-memory storage everywhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_wal::{Error, FileStorage, Wal, WalOptions};

use common::{Writers, open_and_check, opts, txn_for};

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax, `1m`), or returns why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { _dir: dir, mnt })
    }

    /// Mounts one, or skips loudly (`None`); under CI a tmpfs that cannot be mounted fails.
    fn mount_or_skip(size: &str) -> Option<Tmpfs> {
        match Tmpfs::mount(size) {
            Ok(t) => Some(t),
            Err(why) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must run the real full-disk test: {why} (run as root)"
                );
                eprintln!(
                    "SKIPPED: the real full-disk test needs a tmpfs it can mount ({why}); \
                     run it as root"
                );
                None
            }
        }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Fills the disk under `fs` with four writers (after a filler of 384 KiB), frees the filler,
/// reopens; returns what the checks found wrong.
fn fill_the_disk(fs: &Tmpfs, opts: &WalOptions) -> Result<(), String> {
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 384 << 10]).map_err(|e| e.to_string())?;
    let log_dir = fs.path().join("log");
    let storage = Arc::new(FileStorage::new(&log_dir).map_err(|e| e.to_string())?);
    let wal = Arc::new(Wal::open(storage.clone(), opts.clone()).map_err(|e| e.to_string())?);
    let writers = Writers::start(wal.clone(), 4, 1);
    // Under fail-stop every writer stops on the full disk; with the protection off nobody
    // does, so stop them well past what 1 MiB can hold (records are under 300 bytes).
    let deadline = Instant::now() + Duration::from_secs(120);
    while !writers.all_stopped() && writers.log.acked_count() < 20_000 {
        if Instant::now() > deadline {
            return Err("the writers neither filled the disk nor stopped in 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = writers.stop();
    let acked_max = log.acked().last().copied().unwrap_or(0);
    let failed = log.take_failed();
    if let Some(b) = log.broken().first() {
        return Err(b.clone());
    }
    if !ignoring(opts) {
        if !wal.is_poisoned() {
            return Err("a full disk did not poison the log".into());
        }
        if failed.len() != 4 {
            return Err(format!("{} writers saw an error, expected 4", failed.len()));
        }
        for (seq, e) in &failed {
            match e {
                Error::Poisoned { reason } if reason.contains("No space left on device") => {}
                other => {
                    return Err(format!(
                        "GTID number {seq} failed with {other}, not Poisoned naming the full disk"
                    ));
                }
            }
            if *seq <= acked_max {
                return Err(format!(
                    "GTID number {seq} failed but {acked_max} was acknowledged"
                ));
            }
        }
        if acked_max == 0 {
            return Err("nothing was acknowledged before the disk filled".into());
        }
    }
    drop(wal);

    // Space is freed; the node restarts.
    std::fs::remove_file(&filler).map_err(|e| e.to_string())?;
    let (reopened, n) = open_and_check(storage, opts.clone(), acked_max)
        .map_err(|e| format!("restart after space was freed: {e}"))?;
    let next = reopened
        .append(txn_for(n + 1))
        .map_err(|e| format!("append after the restart: {e}"))?;
    if next.get() != n + 1 {
        return Err(format!("append after the restart at offset {next}"));
    }
    eprintln!("full disk: {acked_max} records acknowledged, {n} recovered");
    Ok(())
}

fn ignoring(opts: &WalOptions) -> bool {
    opts.unsafe_ignore_write_errors
}

#[test]
fn a_full_disk_poisons_keeps_every_ack_and_writes_resume_once_space_is_freed() {
    let Some(fs) = Tmpfs::mount_or_skip("1m") else {
        return;
    };
    fill_the_disk(&fs, &opts(128 << 10)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn canary_acknowledging_over_a_full_disk_loses_records() {
    let Some(fs) = Tmpfs::mount_or_skip("1m") else {
        return;
    };
    let unsafe_opts = WalOptions {
        unsafe_ignore_write_errors: true,
        ..opts(128 << 10)
    };
    let err =
        fill_the_disk(&fs, &unsafe_opts).expect_err("acks over a full disk must be caught as lost");
    eprintln!("canary: {err}");
}
