//! `tideline log dump|info|verify` on a stopped node's log damaged inside: a flipped byte in a
//! record with valid records after it, in the active (last) segment or in a sealed one.
//! OPERATIONS.md ("Recovery and what its messages mean") and the corruption error itself send
//! the operator to `tideline log dump` to read what lies before the damage.
//!
//! Guards against the read-only open refusing the whole log when its active segment is
//! damaged, so that `log dump` and `log info` printed nothing at all (not even offset 1), and
//! against the opposite failure: a dump or info that shows the records before the damage and
//! exits 0, so that a script takes a damaged log for a whole one. Also: `log info` into a
//! closed pipe ends quietly (exit 0), as `log dump` does, instead of panicking.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use tideline_wal::record::{self, FRAME_HEADER_BYTES};
use tideline_wal::segment;

use common::Node;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tideline log ARGS --data DATA`.
fn log_tool(data: &Path, args: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("log")
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .expect("run tideline log")
}

/// The offsets of the JSON lines `log dump` printed.
fn dumped_offsets(out: &Output) -> Vec<u64> {
    String::from_utf8(out.stdout.clone())
        .expect("log dump prints UTF-8")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("log dump printed a line that is not JSON ({e}): {l}"));
            v["offset"]
                .as_u64()
                .expect("every dumped record has an offset")
        })
        .collect()
}

/// Starts a node in `data` with `extra` flags, commits `n` transactions (one line each, so
/// offsets 1..=n), and stops it cleanly.
fn stopped_node(data: &Path, n: u64, value_bytes: usize, extra: &[&str]) {
    let mut node = Node::start_with(data, 0, extra);
    let value = "v".repeat(value_bytes);
    common::load_lines(&node, 1, (1..=n).map(|i| format!("key:{i:06}\t{value}")));
    assert_eq!(
        common::status(&node)["last_offset"],
        n,
        "the node committed"
    );
    common::send_signal(node.pid(), "TERM");
    let status = node.wait().expect("the node's exit status");
    assert!(status.success(), "the node stopped with {status}");
}

/// The segment files of `data`'s log, oldest first.
fn segments(data: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(data.join("log"))
        .expect("list the log")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(segment::parse_file_name)
                .is_some()
        })
        .collect();
    names.sort();
    names
}

/// The byte where the frame of `offset` starts in `seg`, and its length, found by walking the
/// segment's frames.
fn frame_of(seg: &Path, offset: u64) -> (usize, usize) {
    let bytes = std::fs::read(seg).expect("read the segment");
    let mut pos = segment::header_len(&bytes).expect("a valid segment header") as usize;
    while pos < bytes.len() {
        let raw = record::check_frame(&bytes[pos..], record::DEFAULT_RECORD_BYTES_MAX)
            .unwrap_or_else(|e| panic!("frame at byte {pos} of {}: {e}", seg.display()));
        if raw.offset.get() == offset {
            return (pos, raw.frame_bytes);
        }
        pos += raw.frame_bytes;
    }
    panic!("no record {offset} in {}", seg.display());
}

/// Flips one byte inside the payload of the frame of `offset` in `seg` (its checksum then
/// fails while the frames after it stay valid). Returns the byte where the frame starts.
fn damage_record(seg: &Path, offset: u64) -> u64 {
    let (at, len) = frame_of(seg, offset);
    assert!(
        len > FRAME_HEADER_BYTES + 8,
        "record {offset} has a payload"
    );
    let mut bytes = std::fs::read(seg).expect("read the segment");
    bytes[at + FRAME_HEADER_BYTES + 4] ^= 0xff;
    std::fs::write(seg, &bytes).expect("write the damaged segment");
    at as u64
}

/// What the corruption line must say: the file and the byte of the damaged frame.
fn assert_names_damage(what: &str, err: &str, seg: &Path, at: u64) {
    let file = seg.file_name().unwrap().to_str().unwrap();
    assert!(
        err.contains("log corrupt in")
            && err.contains(file)
            && err.contains(&format!("at byte {at}")),
        "{what}: stderr does not name the damage ({file}, byte {at}): {err}"
    );
}

#[test]
fn log_dump_reads_the_records_before_damage_in_the_active_segment_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    stopped_node(&data, 12, 200, &[]);
    let segs = segments(&data);
    assert_eq!(segs.len(), 1, "12 small records fill one segment: {segs:?}");
    let seg = &segs[0];
    let at = damage_record(seg, 10);
    let before = std::fs::read(seg).unwrap();

    // The records before the damage, each as a JSON line; then the corruption line and a
    // failing exit, so that a script does not take the output for the whole log.
    let out = log_tool(&data, &["dump", "--from", "offset:1"]);
    assert_eq!(
        dumped_offsets(&out),
        (1..=9).collect::<Vec<_>>(),
        "log dump of a log damaged at record 10; stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(1), "log dump: {}", stderr(&out));
    assert_names_damage("log dump", &stderr(&out), seg, at);

    // A dump that stops (--limit) before the damage has printed all it was asked for: exit 0,
    // with the damage still said on stderr.
    let out = log_tool(&data, &["dump", "--limit", "3"]);
    assert_eq!(dumped_offsets(&out), vec![1, 2, 3], "{}", stderr(&out));
    assert_eq!(
        out.status.code(),
        Some(0),
        "log dump --limit 3: {}",
        stderr(&out)
    );
    assert_names_damage("log dump --limit 3", &stderr(&out), seg, at);

    // A start past the damage: nothing can be read there; the error is the damage.
    let out = log_tool(&data, &["dump", "--from", "offset:11"]);
    assert!(out.stdout.is_empty(), "dumped past the damage");
    assert_eq!(
        out.status.code(),
        Some(1),
        "log dump --from offset:11: {}",
        stderr(&out)
    );
    assert_names_damage("log dump --from offset:11", &stderr(&out), seg, at);

    // `log info` shows the log up to the damage and the damage itself, and fails.
    let out = log_tool(&data, &["info"]);
    assert_eq!(out.status.code(), Some(1), "log info: {}", stderr(&out));
    let info: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("log info printed no JSON ({e}); stderr: {}", stderr(&out)));
    assert_eq!(info["last_offset"], 9, "{info}");
    let damage = &info["damage"];
    assert_eq!(damage["byte"], at, "{info}");
    assert!(
        damage["file"]
            .as_str()
            .is_some_and(|f| f.ends_with(seg.file_name().unwrap().to_str().unwrap())),
        "{info}"
    );
    assert!(
        damage["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{info}"
    );
    assert_names_damage("log info", &stderr(&out), seg, at);

    // `log verify` fails naming file and byte, as before.
    let out = log_tool(&data, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "log verify: {}", stderr(&out));
    assert_names_damage("log verify", &stderr(&out), seg, at);

    // None of them wrote anything.
    assert_eq!(
        std::fs::read(seg).unwrap(),
        before,
        "a read-only tool changed the segment"
    );
    assert_eq!(segments(&data), segs);
}

#[test]
fn log_dump_reads_the_records_before_damage_in_a_sealed_segment_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    stopped_node(&data, 120, 300, &["--log-segment-bytes", "4096"]);
    let segs = segments(&data);
    assert!(segs.len() >= 4, "the records span segments: {segs:?}");
    let sealed = &segs[1];
    let first: u64 = segment::parse_file_name(sealed.file_name().unwrap().to_str().unwrap())
        .unwrap()
        .get();
    let damaged = first + 2;
    let at = damage_record(sealed, damaged);

    let out = log_tool(&data, &["dump"]);
    assert_eq!(
        dumped_offsets(&out),
        (1..damaged).collect::<Vec<_>>(),
        "log dump of a log damaged at record {damaged}; stderr: {}",
        stderr(&out)
    );
    assert_eq!(out.status.code(), Some(1), "log dump: {}", stderr(&out));
    assert_names_damage("log dump", &stderr(&out), sealed, at);

    // Later segments are whole, and a dump that starts in them reads them.
    let last_first =
        segment::parse_file_name(segs.last().unwrap().file_name().unwrap().to_str().unwrap())
            .unwrap()
            .get();
    let out = log_tool(&data, &["dump", "--from", &format!("offset:{last_first}")]);
    assert_eq!(
        dumped_offsets(&out),
        (last_first..=120).collect::<Vec<_>>(),
        "{}",
        stderr(&out)
    );
    assert!(
        out.status.success(),
        "log dump past the damage: {}",
        stderr(&out)
    );

    let out = log_tool(&data, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "log verify: {}", stderr(&out));
    assert_names_damage("log verify", &stderr(&out), sealed, at);
}

/// `log info | true`: a reader that went away before anything was written is the normal end,
/// as for `log dump`: exit 0 and no panic.
#[test]
fn log_info_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    stopped_node(&data, 3, 10, &[]);
    // A pipe whose read end is closed before the tool starts, so that its first write fails
    // (EPIPE) whatever the timing.
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(common::bin())
        .args(["log", "info", "--data"])
        .arg(&data)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run tideline log info");
    assert_eq!(
        (out.status.code(), stderr(&out)),
        (Some(0), String::new()),
        "log info into a closed pipe"
    );
}
