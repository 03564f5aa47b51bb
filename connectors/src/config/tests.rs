use super::*;

const MINIMAL: &str = r#"[source]
node = "127.0.0.1:7400"
secrets = "./data/secrets"
from = "bootstrap"            # or "earliest", "latest", "offset:N", "gtid:SET"
trees = ["users"]             # optional filter

[sink]
kind = "postgres"             # or "redis", "nats", "webhook", "file"
url = "postgres://postgres@127.0.0.1:5432/test"
"#;

fn error(text: &str) -> ConfigError {
    ConnectFile::parse(text, "p.toml").expect_err("refused")
}

/// Found by the `connect_toml` fuzz target: `pipeline = []` parsed as a file with no
/// pipeline, and `connect --check` accepted it silently.
#[test]
fn an_empty_pipeline_list_is_refused_on_its_line() {
    for text in ["pipeline = []\n", "name = \"x\"\npipeline = []\n"] {
        let e = error(text);
        assert!(e.message.starts_with("no pipeline"), "{e}");
        assert_eq!(e.line, text.lines().count(), "{e}");
    }
}

#[test]
fn the_issues_minimal_file_works_as_written() {
    let f = ConnectFile::parse(MINIMAL, "p.toml").unwrap();
    let [p] = f.pipelines.as_slice() else {
        panic!()
    };
    assert_eq!(p.name, "default");
    assert_eq!(p.from, StartFrom::Bootstrap);
    assert_eq!(p.source.trees, ["users"]);
    assert_eq!(p.line, 7);
    let SinkConfig::Postgres(pg) = &p.sink else {
        panic!()
    };
    assert_eq!(pg.url, "postgres://postgres@127.0.0.1:5432/test");
    assert_eq!(pg.schema, "public");
}

#[test]
fn a_source_without_node_follows_the_host_node_and_is_refused_elsewhere() {
    let text = "[source]\nfrom = \"earliest\"\n[sink]\nkind = \"file\"\npath = \"x.jsonl\"\n";
    let f = ConnectFile::parse(text, "p.toml").unwrap();
    let [p] = f.pipelines.as_slice() else {
        panic!()
    };
    let e = p.pipeline_config(None).expect_err("no node, no host");
    assert!(
        e.contains("names no `node`") && e.contains("serve --connect"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    tideline_stream::ensure_secrets(dir.path()).unwrap();
    for (bound, dialed) in [
        ("0.0.0.0:7411", "127.0.0.1:7411"),
        ("[::]:7412", "[::1]:7412"),
        ("10.1.2.3:7413", "10.1.2.3:7413"),
    ] {
        let host = HostNode {
            addr: bound.parse().unwrap(),
            secrets: dir.path(),
        };
        let cfg = p.pipeline_config(Some(host)).unwrap();
        assert_eq!(cfg.addr, dialed);
    }
    // A named node wins over the host.
    let named = text.replace("[source]\n", "[source]\nnode = \"10.9.9.9:5\"\n");
    let f = ConnectFile::parse(&named, "p.toml").unwrap();
    let host = HostNode {
        addr: "0.0.0.0:1".parse().unwrap(),
        secrets: dir.path(),
    };
    assert_eq!(
        f.pipelines[0].pipeline_config(Some(host)).unwrap().addr,
        "10.9.9.9:5"
    );
}

#[test]
fn several_pipelines_with_their_own_sinks() {
    let text = r#"
[[pipeline]]
name = "to-pg"
batch_changes = 500
[pipeline.source]
node = "127.0.0.1:7400"
from = "gtid:3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5"
ops = ["put", "delete"]
[pipeline.sink]
kind = "postgres"
url = "postgres://postgres@127.0.0.1/test"
columns = { email = "/email" }

[[pipeline]]
name = "to-redis"
[pipeline.source]
node = "127.0.0.1:7400"
from = "offset:12"
[pipeline.sink]
kind = "redis"
url = "redis://127.0.0.1:6379"
key = "app:{tree}:{key}"
"#;
    let f = ConnectFile::parse(text, "p.toml").unwrap();
    assert_eq!(f.pipelines.len(), 2);
    assert_eq!(f.pipelines[0].batch_changes, 500);
    assert!(
        matches!(&f.pipelines[0].sink, SinkConfig::Postgres(c) if c.columns["email"] == "/email")
    );
    assert_eq!(f.pipelines[1].from, StartFrom::Tail(TailStart::Offset(12)));
    assert!(matches!(&f.pipelines[1].sink, SinkConfig::Redis(c) if c.key == "app:{tree}:{key}"));
    assert_eq!(f.pipelines[1].line, 19);
}

/// A file sink's position belongs to one pipeline: two pipelines of a file writing one
/// `path` would fight over it (the second waits forever for the first's lock, or, run
/// one at a time, each would find the other's position). Refused before anything
/// starts, also when the two paths are spelled differently.
#[test]
fn two_pipelines_on_one_file_sink_path_are_refused() {
    let two = |a: &str, b: &str| {
        format!(
            "[[pipeline]]\nname = \"b\"\n[pipeline.source]\nnode = \"n:1\"\n\
                 trees = [\"other\"]\n[pipeline.sink]\nkind = \"file\"\npath = \"{a}\"\n\
                 [[pipeline]]\nname = \"a\"\n[pipeline.source]\nnode = \"n:1\"\n\
                 from = \"earliest\"\n[pipeline.sink]\nkind = \"file\"\npath = \"{b}\"\n"
        )
    };
    for (first, second) in [
        ("out/x.jsonl", "out/x.jsonl"),
        ("out/x.jsonl", "./out/x.jsonl"),
        ("out//x.jsonl", "out/./x.jsonl"),
        ("out/x.jsonl", "out/../out/x.jsonl"),
    ] {
        let text = two(first, second);
        let e = error(&text);
        assert!(
            e.message.contains("`b`") && e.message.contains("`a`"),
            "names both pipelines: {e}"
        );
        assert!(e.message.contains("its own `path`"), "says what to do: {e}");
        assert_eq!(e.line, 16, "the second pipeline's path: {e}");
    }
    // Different files are fine.
    let f = ConnectFile::parse(&two("out/x.jsonl", "out/y.jsonl"), "p.toml").unwrap();
    assert_eq!(f.pipelines.len(), 2);
}

#[test]
fn mistakes_name_the_key_and_the_line() {
    // Unknown key in the sink.
    let e = error(&MINIMAL.replace("url =", "ulr ="));
    assert_eq!(e.line, 9, "{e}");
    assert!(e.message.contains("ulr"), "{e}");
    // Wrong type in the sink: the message names the key, not only the type.
    let e = error(&format!("{MINIMAL}connect_timeout_ms = \"soon\"\n"));
    assert_eq!(e.line, 10, "{e}");
    assert!(e.message.contains("connect_timeout_ms"), "{e}");
    // Missing key in the sink: the table's line.
    let e = error(&MINIMAL.replace("url = \"postgres://postgres@127.0.0.1:5432/test\"\n", ""));
    assert_eq!(e.line, 7, "{e}");
    assert!(e.message.contains("`url`"), "{e}");
    // Unknown key and wrong type in the source.
    let e = error(&MINIMAL.replace("trees =", "tress ="));
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("tress"), "{e}");
    let e = error(&MINIMAL.replace(r#"trees = ["users"]"#, "trees = 3"));
    assert_eq!(e.line, 5, "{e}");
    assert!(e.message.contains("trees"), "{e}");
    // A bad value.
    let e = error(&MINIMAL.replace("from = \"bootstrap\"", "from = \"yesterday\""));
    assert_eq!(e.line, 4, "{e}");
    assert!(
        e.message.contains("source.from") && e.message.contains("yesterday"),
        "{e}"
    );
    // Kinds.
    // Each kind checks its own keys: a file sink has no `url`.
    let e = error(&MINIMAL.replace("kind = \"postgres\"", "kind = \"file\""));
    assert_eq!(e.line, 9, "{e}");
    assert!(e.message.contains("url"), "{e}");
    let e = error(&MINIMAL.replace("kind = \"postgres\"", "kind = \"mysql\""));
    assert!(e.message.contains("unknown sink kind `mysql`"), "{e}");
    // Missing tables, bad TOML.
    let e = error("[source]\nnode = \"a:1\"\n");
    assert!(e.message.contains("missing [sink]"), "{e}");
    let e = error("[source\n");
    assert_eq!(e.line, 1, "{e}");
    assert!(e.to_string().starts_with("p.toml line 1: "), "{e}");
}
