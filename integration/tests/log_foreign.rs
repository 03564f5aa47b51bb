//! Logs the CLI did not expect: one written by a newer Tideline, one `demo` did not write, and
//! `--data` naming the log directory itself.
//!
//! Scenarios and the failures they guard against:
//! - a log whose segment header (checksum valid) says a format above this build's: `serve` and
//!   `log dump|info|verify` must exit 1 saying it was written by a newer Tideline and is not
//!   damaged, not "log corrupt ... restore this node from a replica or backup" (advice that
//!   replaces a healthy log), and change nothing;
//! - `demo --data DIR` where DIR holds only a `log/` that demo did not write (a copy of a node's
//!   log): demo must refuse it instead of appending its transactions under that node's
//!   `server_uuid`, while a log demo wrote itself still takes more runs;
//! - `log info --data DATA/log`: the error must point at `--data DATA`, not only say there is
//!   no log in `DATA/log/log`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::wait_bounded;
use tideline_wal::segment::{self, FORMAT_VERSION};
use tideline_wal::{FileStorage, Gtid, NewTransaction, Op, Wal, WalOptions};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a log of `n` one-put transactions into `data/log` with the log library, as a node
/// does (no `demo` marker). Returns its server_uuid.
fn library_log(data: &Path, n: u64) -> uuid::Uuid {
    let storage = Arc::new(FileStorage::new(data.join("log")).expect("create the log directory"));
    let wal = Wal::open(storage, WalOptions::default()).expect("open a new log");
    let uuid = wal.server_uuid();
    for seq in 1..=n {
        wal.append(NewTransaction {
            gtid: Gtid::new(uuid, seq).expect("seq >= 1"),
            timestamp_us: 1_700_000_000_000_000,
            ops: vec![Op::Put {
                tree: "default".into(),
                key: format!("k{seq}").into_bytes(),
                value: b"v".to_vec(),
                before: None,
            }],
        })
        .expect("append");
    }
    uuid
}

/// Every file under `dir` with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.insert(p.clone(), std::fs::read(&p).expect("read file"));
        }
    }
    out
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), what segment headers carry.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Rewrites the format field of every segment header in `data/log` to `format`, with the
/// header checksum recomputed: what a newer Tideline would have written.
fn set_format(data: &Path, format: u16) {
    for e in std::fs::read_dir(data.join("log")).expect("read log dir") {
        let p = e.expect("dir entry").path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if segment::parse_file_name(&name).is_none() {
            continue;
        }
        let mut bytes = std::fs::read(&p).expect("read segment");
        let total = segment::header_len(&bytes).expect("a header") as usize;
        bytes[8..10].copy_from_slice(&format.to_le_bytes());
        bytes[52..56].copy_from_slice(&[0; 4]);
        let crc = crc32c(&bytes[..total]);
        bytes[52..56].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&p, &bytes).expect("write segment");
    }
}

/// The error line says the log is a newer Tideline's and undamaged, and nothing that sends the
/// operator to replace it.
fn assert_says_newer(what: &str, out: &Output) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    let lower = err.to_lowercase();
    for word in ["corrupt", "restore", "damage at"] {
        assert!(!lower.contains(word), "{what} says {word:?}: {err}");
    }
    for words in [
        "newer Tideline".to_owned(),
        format!("segment format {}", FORMAT_VERSION + 1),
        "not damaged".to_owned(),
        "upgrade Tideline".to_owned(),
    ] {
        assert!(err.contains(&words), "{what} does not say {words:?}: {err}");
    }
}

#[test]
fn a_log_of_a_newer_format_is_refused_as_newer_by_the_log_tools_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("newer");
    // A whole node (log, store, secrets), as a newer build would leave it.
    let mut node = common::Node::start(&data, 0);
    for i in 0..5 {
        let out = node.run(&["put", &format!("k{i}"), "v"]);
        assert!(out.status.success(), "put: {}", stderr(&out));
    }
    common::send_signal(node.pid(), "TERM");
    let status = node.wait().expect("the node's exit status");
    assert!(status.success(), "the node stopped with {status}");
    set_format(&data, FORMAT_VERSION + 1);
    let before = files(&data);

    for tool in ["dump", "info", "verify"] {
        let out = Command::new(common::bin())
            .args(["log", tool, "--data"])
            .arg(&data)
            .output()
            .expect("run tideline log");
        assert_says_newer(&format!("log {tool}"), &out);
    }

    let child = Command::new(common::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .env("TIDELINE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let out = wait_bounded(child, Duration::from_secs(60), "serve on a newer log");
    assert_says_newer("serve", &out);

    // Nothing of the log was changed. The writer lock file is not the log: `serve` takes the
    // lock before it reads a header, and writes its PID into it.
    let lock = data.join("log").join(tideline_wal::LOCK_FILE_NAME);
    let mut after = files(&data.join("log"));
    after.remove(&lock);
    let log_before: BTreeMap<_, _> = before
        .into_iter()
        .filter(|(p, _)| p.starts_with(data.join("log")) && *p != lock)
        .collect();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        log_before.keys().collect::<Vec<_>>(),
        "the log's files changed"
    );
    for (path, bytes) in &log_before {
        assert!(
            after[path] == *bytes,
            "a refused open changed {}",
            path.display()
        );
    }
}

#[test]
fn demo_refuses_a_log_it_did_not_write_and_goes_on_with_its_own() {
    let dir = tempfile::tempdir().unwrap();
    // A copy of a node's log: `log/` only, no store/ or secrets/.
    let foreign = dir.path().join("logonly");
    library_log(&foreign, 10);
    let before = files(&foreign);
    let out = Command::new(common::bin())
        .args(["demo", "--txns", "10", "--data"])
        .arg(&foreign)
        .output()
        .expect("run demo");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "demo appended to a log it did not write: {err}"
    );
    assert!(
        err.contains("did not write") && err.contains(&foreign.join("log").display().to_string()),
        "demo's refusal should say why and name the log: {err}"
    );
    assert!(
        files(&foreign) == before,
        "a refused demo changed the directory"
    );

    // A log demo wrote itself: a second run with the same --data goes on from it.
    let own = dir.path().join("own");
    for run in 1..=2u64 {
        let out = Command::new(common::bin())
            .args(["demo", "--txns", "10", "--data"])
            .arg(&own)
            .output()
            .expect("run demo");
        assert!(out.status.success(), "demo run {run}: {}", stderr(&out));
    }
    let out = Command::new(common::bin())
        .args(["log", "info", "--data"])
        .arg(&own)
        .output()
        .expect("run log info");
    assert!(out.status.success(), "log info: {}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(info["last_offset"], 20, "{info}");
}

#[test]
fn log_info_on_the_log_directory_itself_names_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("a");
    library_log(&data, 3);
    let out = Command::new(common::bin())
        .args(["log", "info", "--data"])
        .arg(data.join("log"))
        .output()
        .expect("run log info");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let want = format!(
        "{} itself holds log segments: pass --data {} (the node's data directory)",
        data.join("log").display(),
        data.display()
    );
    assert!(err.contains(&want), "should say {want:?}: {err}");
}
