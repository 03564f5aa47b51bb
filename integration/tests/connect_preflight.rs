//! `tideline connect --config FILE` on a file whose later pipeline has a sink mistake that
//! only building the sink finds (a webhook `url = "ftp://x"`, a name a webhook cannot send):
//! docs/OPERATIONS.md ("Connectors") promises that every mistake is one line naming the file
//! and the line, and that nothing starts.
//!
//! Guards against: `connect` building and spawning pipeline 1 before it looks at pipeline 2,
//! so that a bad pipeline 2 exits 1 after pipeline 1 has opened its sink (its `.lock` and
//! `.position` files stay behind) and the runtime's shutdown panics pipeline 1's task; against
//! sink-level messages without the file and line; and against a pipeline name with a newline
//! in it splitting the error over two lines.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::Node;

/// A file sink pipeline into `out` (valid), then a webhook pipeline named `second` (the TOML
/// string, escapes and all) posting to `url`; the webhook's sink table is on line 16.
fn two_pipelines(node: &Node, out: &Path, second: &str, url: &str) -> String {
    format!(
        "[[pipeline]]\n\
         name = \"first\"\n\
         [pipeline.source]\n\
         node = \"{addr}\"\n\
         secrets = \"{secrets}\"\n\
         from = \"earliest\"\n\
         [pipeline.sink]\n\
         kind = \"file\"\n\
         path = \"{out}\"\n\
         \n\
         [[pipeline]]\n\
         name = \"{second}\"\n\
         [pipeline.source]\n\
         node = \"{addr}\"\n\
         secrets = \"{secrets}\"\n\
         [pipeline.sink]\n\
         kind = \"webhook\"\n\
         url = \"{url}\"\n\
         position_file = \"{out}.webhook-position\"\n",
        addr = node.addr,
        secrets = node.secrets().display(),
        out = out.display(),
    )
}

/// The line of the webhook pipeline's `[pipeline.sink]` in [`two_pipelines`].
const SECOND_SINK_LINE: usize = 16;

fn connect(dir: &Path, body: &str, extra: &[&str]) -> (Output, String) {
    let file = dir.join("p.toml");
    std::fs::write(&file, body).expect("write the pipeline file");
    let out = Command::new(common::bin())
        .args(["connect", "--config"])
        .arg(&file)
        .args(extra)
        .env("TIDELINE_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run tideline connect");
    (out, file.display().to_string())
}

/// Every file in `dir` whose name starts with `stem`.
fn files_of(dir: &Path, stem: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list the test directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem))
        .collect();
    v.sort();
    v
}

#[test]
fn a_bad_later_sink_starts_nothing_and_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(&dir.path().join("node"), 0);
    let out = dir.path().join("o.jsonl");
    let body = two_pipelines(&node, &out, "second", "ftp://x");
    let (run, file) = connect(dir.path(), &body, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "a refused file panicked a pipeline: {stderr}"
    );
    let left = files_of(dir.path(), "o.jsonl");
    assert!(
        left.is_empty(),
        "a refused file left the first pipeline's files behind ({left:?}): it was started \
         before the second was checked; stderr: {stderr}"
    );
    let want = format!("{file} line {SECOND_SINK_LINE}: ");
    assert!(
        stderr.contains(&want) && stderr.contains("ftp://x"),
        "the message does not name the file and the sink's line ({want:?}): {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "the refusal is not one line: {stderr}"
    );

    // `--check` names the same place.
    let (check, _) = connect(dir.path(), &body, &["--check"]);
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(1),
        "--check exit status: {stdout}"
    );
    assert!(
        stdout.contains(&format!("pipeline second: FAILED: {want}")),
        "--check does not name the file and line ({want:?}): {stdout}"
    );
}

#[test]
fn a_pipeline_name_with_a_newline_is_refused_on_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(&dir.path().join("node"), 0);
    let out = dir.path().join("o.jsonl");
    // The webhook sink refuses a name that cannot travel in an HTTP header.
    let body = two_pipelines(&node, &out, "bad\\nname", "http://127.0.0.1:9/hook");
    let (run, file) = connect(dir.path(), &body, &[]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "the refusal of a name holding a newline is not one line: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{file} line {SECOND_SINK_LINE}: "))
            && stderr.contains("bad\\nname"),
        "the message does not name the place and the (escaped) name: {stderr}"
    );
    let left = files_of(dir.path(), "o.jsonl");
    assert!(
        left.is_empty(),
        "files left behind: {left:?}; stderr: {stderr}"
    );
}

#[test]
fn a_file_that_cannot_be_read_is_named_without_a_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nonexist.toml");
    let run = Command::new(common::bin())
        .args(["connect", "--config"])
        .arg(&missing)
        .output()
        .expect("run tideline connect");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "exit status; stderr: {stderr}");
    assert!(
        stderr.contains(&format!("{}: cannot read it", missing.display())),
        "the message does not name the file: {stderr}"
    );
    assert!(!stderr.contains("line 0"), "a line 0 is named: {stderr}");
}
