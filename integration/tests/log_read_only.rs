//! `tideline log info|dump|verify` on a log the operator may only read: a backup mounted
//! read-only (where even root gets EROFS for any request of write access) and a stopped node's
//! directory whose files and log directory the operator can read but not write. OPERATIONS.md
//! says these tools open the log read-only; they must work there and print what they print on
//! a writable copy. Guards against the tools opening every segment and the slots file for
//! writing ("open the log in ...: Permission denied", exit 1), and against a log directory
//! that cannot be listed being reported as "no Tideline log in DIR: pass the --data directory
//! of a node", which sends the operator looking for another directory instead of fixing the
//! permissions.
//!
//! The mount case needs `mount -t tmpfs` (root, or CAP_SYS_ADMIN); the permission case needs a
//! user that permissions bind: this one, or under root `nobody`. Without them each skips with a
//! loud line, except under CI (`CI` set), where the mount case fails.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use common::Node;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A stopped node's data directory holding `n` committed transactions and a slot `s`.
struct StoppedNode {
    data: PathBuf,
    n: u64,
}

/// Starts a node in `data`, commits some transactions, makes slot `s`, stops the node.
fn stopped_node(data: &Path) -> StoppedNode {
    let mut node = Node::start(data, 0);
    common::load(&node, 1, 20, 1);
    let out = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--slot", "s", "--limit", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tail --slot s: {}", stderr(&out));
    let n = common::status(&node)["last_offset"]
        .as_u64()
        .expect("last_offset");
    assert!(n >= 20, "the node committed {n} transactions");
    node.kill9();
    StoppedNode {
        data: data.to_path_buf(),
        n,
    }
}

/// Runs the three log tools through `tool` (`tideline` with the arguments appended) and
/// checks that each succeeds and shows the `n` transactions and the slot.
fn check_log_tools(node: &StoppedNode, tool: impl Fn() -> Command, case: &str) {
    let run = |args: &[&str]| {
        tool()
            .arg("log")
            .args(args)
            .arg("--data")
            .arg(&node.data)
            .output()
            .expect("run tideline log")
    };
    let n = node.n;

    let out = run(&["info"]);
    assert!(out.status.success(), "{case}: log info: {}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout).expect("log info prints JSON");
    assert_eq!(info["first_offset"], 1, "{case}: {info}");
    assert_eq!(info["last_offset"], n, "{case}: {info}");
    assert_eq!(info["slots"][0]["name"], "s", "{case}: {info}");

    let out = run(&["dump"]);
    assert!(out.status.success(), "{case}: log dump: {}", stderr(&out));
    let offsets: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("log dump prints JSON lines");
            v["offset"].as_u64().expect("offset")
        })
        .collect();
    assert_eq!(offsets, (1..=n).collect::<Vec<_>>(), "{case}: log dump");

    let out = run(&["verify"]);
    assert!(out.status.success(), "{case}: log verify: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!("ok: {n} records")),
        "{case}: log verify printed {text}"
    );
}

/// A tmpfs mounted by the test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Tmpfs {
    fn mount_or_skip() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
            .arg(&mnt)
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { _dir: dir, mnt }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => format!("cannot run mount: {e}"),
        };
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the read-only mount test: mount -t tmpfs failed: {why} (run as root)"
        );
        eprintln!(
            "SKIPPED: the log tools' read-only mount test needs to mount a tmpfs ({why}); run \
             as root"
        );
        None
    }

    /// Remounts it read-only: from now on every request for write access fails with EROFS.
    fn remount_read_only(&self) {
        let out = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount read-only: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

#[test]
fn log_tools_read_a_node_directory_on_a_read_only_mount() {
    let Some(fs) = Tmpfs::mount_or_skip() else {
        return;
    };
    let node = stopped_node(&fs.mnt.join("n"));
    fs.remount_read_only();
    // Even root is refused write access on a read-only mount.
    let probe = std::fs::OpenOptions::new()
        .write(true)
        .open(fs.mnt.join("n").join("log").join("slots.json"));
    assert!(probe.is_err(), "the remounted tmpfs is still writable");
    check_log_tools(&node, || Command::new(common::bin()), "read-only mount");
}

/// Gives the log directory back its usual mode when dropped, so that the temporary directory
/// can be removed after a failed assertion too.
struct RestoreMode(PathBuf);

impl Drop for RestoreMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o755));
    }
}

#[test]
fn log_tools_read_a_log_the_operator_may_not_write_and_name_an_unreadable_directory() {
    let dir = tempfile::tempdir().unwrap();
    // Root reads and writes whatever the mode bits say; the tools then run as `nobody`.
    let as_root = running_as_root();
    let tool = move || {
        let mut cmd = Command::new(common::bin());
        if as_root {
            cmd.uid(65534).gid(65534);
        }
        cmd
    };
    if as_root {
        chmod(dir.path(), 0o755);
        let probe = tool().arg("--version").output();
        if !probe.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!(
                "SKIPPED: running as root, and the tideline binary cannot be run as nobody \
                 ({probe:?}), so file permissions cannot be tested here; the read-only mount \
                 test covers root"
            );
            return;
        }
    }
    let node = stopped_node(&dir.path().join("n"));
    let log = node.data.join("log");
    let _restore = RestoreMode(log.clone());
    chmod(&node.data, 0o755);
    for entry in std::fs::read_dir(&log).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            chmod(&path, 0o444);
        }
    }
    assert!(log.join("slots.json").is_file(), "the slot was not saved");
    chmod(&log, 0o555);
    check_log_tools(&node, tool, "read-only files");

    // A log directory that cannot be listed: the error names the directory and why, and does
    // not send the operator to look for another one.
    chmod(&log, 0o311);
    for cmd in ["info", "dump", "verify"] {
        let out = tool()
            .args(["log", cmd, "--data"])
            .arg(&node.data)
            .output()
            .unwrap();
        assert!(!out.status.success(), "log {cmd} listed an unreadable log");
        let err = stderr(&out);
        assert!(
            err.contains("Permission denied") && err.contains(&log.display().to_string()),
            "log {cmd}: {err}"
        );
        assert!(!err.contains("no Tideline log"), "log {cmd}: {err}");
    }
}
