//! `tideline connect --check` on a pipeline whose sink holds a position stored under a
//! narrower filter (`trees = ["a"]`), and whose file now lets every tree through: the
//! pipeline itself refuses to start (resuming would skip what the first filter dropped), and
//! `--check` must say so, not "ok". Guards against a check that passed a pipeline that then
//! failed at once. Uses the file sink: no service needed.

mod common;
mod sinkkit;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::Node;
use serde_json::Value;

/// The source offset the position beside `out` covers (0 before the first batch).
fn stored_offset(out: &Path) -> u64 {
    let Ok(text) = std::fs::read(format!("{}.position", out.display())) else {
        return 0;
    };
    let pos: Value = serde_json::from_slice(&text).expect("the position file is JSON");
    match pos["checkpoint"].as_str() {
        None => 0,
        Some(cp) => {
            let cp: Value = serde_json::from_str(cp).expect("the checkpoint is JSON");
            cp["tail"]["offset"].as_u64().unwrap_or(0)
        }
    }
}

/// A pipeline file from the node's log (`from = "earliest"`) into the file `out`, with
/// `filter` lines in `[source]`.
fn pipeline_file(dir: &Path, name: &str, node: &Node, out: &Path, filter: &str) -> String {
    let body = format!(
        "[source]\nnode = \"{}\"\nsecrets = \"{}\"\nfrom = \"earliest\"\n{filter}\n\n\
         [sink]\nkind = \"file\"\npath = \"{}\"\n",
        node.addr,
        node.secrets().display(),
        out.display()
    );
    sinkkit::pipeline_file(dir, name, &body)
        .to_str()
        .expect("a UTF-8 path")
        .to_owned()
}

#[test]
fn check_reports_a_filter_wider_than_the_stored_positions_as_the_pipeline_would() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&dir.path().join("node"), 0);
    for tree in ["a", "b"] {
        let out = node.run(&["put", "--tree", tree, "1", "v"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let last = common::status(&node)["last_offset"].as_u64().unwrap();
    let out = dir.path().join("changes.jsonl");
    let narrow = pipeline_file(dir.path(), "narrow", &node, &out, "trees = [\"a\"]");
    let wide = pipeline_file(dir.path(), "wide", &node, &out, "");

    // The narrow pipeline runs until its position is past the put to b, which it dropped.
    let log = dir.path().join("narrow.log");
    let mut child = sinkkit::connect(Path::new(&narrow), &log, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored_offset(&out) < last {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the narrow pipeline exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            Instant::now() < deadline,
            "the narrow pipeline did not store offset {last}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    sinkkit::kill9(&mut child, &log);

    let check = |file: &str| {
        Command::new(common::bin())
            .args(["connect", "--check", "--config", file])
            .output()
            .expect("run tideline connect --check")
    };
    // The same filter resumes: ok.
    let ok = check(&narrow);
    let verdict = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && verdict.contains("ok") && verdict.contains("holds a position"),
        "{verdict}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A wider one: the check fails, naming the filters, as the pipeline would.
    let refused = check(&wide);
    let verdict = String::from_utf8_lossy(&refused.stdout);
    assert_eq!(
        refused.status.code(),
        Some(1),
        "--check passes a filter wider than the stored position's: {verdict}{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        verdict.contains("pipeline default: FAILED")
            && verdict.contains("filter (trees [a]")
            && verdict.contains("clear the sink's position"),
        "{verdict}"
    );

    // And running it does refuse to start, with the same words.
    let log = dir.path().join("wide.log");
    let mut child = sinkkit::connect(Path::new(&wide), &log, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the wide pipeline neither failed nor stopped: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "{err}");
    assert!(err.contains("filter (trees [a]"), "{err}");
}
