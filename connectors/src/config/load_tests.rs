//! Reading a pipeline file from disk ([`ConnectFile::load`]) and building its pipelines
//! ([`PipelineSpec::build`]): every message names the file, names a line only when there is
//! one, and stays on one line.
//!
//! Guards against `nonexist.toml line 0: cannot read it` (a line that does not exist), and
//! against sink-level mistakes (found only when the sink is built) that named neither file
//! nor line, or split over two lines around a newline in a pipeline's name.

use super::*;

#[test]
fn a_file_that_cannot_be_read_is_named_without_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexist.toml");
    let e = ConnectFile::load(&missing).expect_err("no such file");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read it: ", missing.display())),
        "{shown}"
    );
    assert!(!shown.contains("line 0"), "{shown}");
}

#[test]
fn a_file_that_is_not_utf8_is_named_with_the_line_of_the_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.toml");
    std::fs::write(&path, b"[source]\nnode = \"caf\xe9\"\n").unwrap();
    let e = ConnectFile::load(&path).expect_err("not UTF-8");
    assert_eq!(e.line, 2, "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("{} line 2: ", path.display())),
        "{e}"
    );
    assert!(e.message.contains("UTF-8"), "{e}");
}

/// A valid file sink pipeline, then a webhook pipeline named `second` (TOML string text)
/// whose `[pipeline.sink]` is on line 11.
fn two(second: &str, url: &str) -> String {
    format!(
        "[[pipeline]]\nname = \"first\"\n[pipeline.source]\nnode = \"127.0.0.1:1\"\n\
         [pipeline.sink]\nkind = \"file\"\npath = \"o.jsonl\"\n\n\
         [[pipeline]]\nname = \"{second}\"\n[pipeline.sink]\nkind = \"webhook\"\n\
         url = \"{url}\"\nposition_file = \"w.position\"\n[pipeline.source]\n"
    )
}

#[test]
fn a_sink_mistake_found_when_building_names_the_file_and_the_sink_line() {
    let f = ConnectFile::parse(&two("second", "ftp://x"), "p.toml").unwrap();
    let Err(e) = f.pipelines[1].build(None) else {
        panic!("a webhook sink refuses ftp://")
    };
    assert_eq!((e.file.as_str(), e.line), ("p.toml", 11), "{e}");
    assert!(
        e.to_string()
            .starts_with("p.toml line 11: pipeline `second`: sink url ftp://x"),
        "{e}"
    );
    // A source mistake is named at the source table: no `node` outside a node.
    let text = two("second", "http://127.0.0.1:9/").replace("node = \"127.0.0.1:1\"\n", "");
    let f = ConnectFile::parse(&text, "p.toml").unwrap();
    let Err(e) = f.pipelines[0].build(None) else {
        panic!("a pipeline without a node is refused outside a node")
    };
    assert_eq!(e.line, 3, "{e}");
    assert!(e.message.contains("names no `node`"), "{e}");
}

#[test]
fn a_name_holding_a_newline_is_refused_on_one_line() {
    let f = ConnectFile::parse(&two("bad\\nname", "http://127.0.0.1:9/"), "p.toml").unwrap();
    assert_eq!(f.pipelines[1].name, "bad\nname");
    let Err(e) = f.pipelines[1].build(None) else {
        panic!("a webhook sink refuses a name it cannot send in a header")
    };
    let shown = e.to_string();
    assert!(!shown.contains('\n'), "{shown}");
    assert!(
        shown.starts_with("p.toml line 11: pipeline `bad\\nname`: "),
        "{shown}"
    );
}
