//! Querying an index with the wrong number of values.
//!
//! An index query names one value per indexed path, or fewer for a leading part of a
//! composite index. A query with more values than the index has paths cannot match anything
//! the index holds: the extra values would be compared against the documents' primary keys.
//! Guards against such a query answering "no documents" while the document it looks for
//! exists: it must be refused, saying how many paths the index has.
//!
//! Numbers: the value a number is indexed under is serde_json's rendering of it (`1.50` as
//! `1.5`, `1e2` as `100.0`), which is what a lookup must give and what a unique index and
//! `index_scan` order compare; the test pins the examples OPERATIONS.md documents.

use std::sync::Arc;
use std::time::Duration;

use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{MemStorage, Wal, WalOptions};

fn mem_engine(dir: &std::path::Path) -> Engine {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    Engine::open(dir, Arc::new(wal), EngineOptions::default()).expect("open engine")
}

#[test]
fn a_query_with_more_values_than_the_index_has_paths_is_refused_saying_how_many_it_has() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("users", None).expect("tree");
    e.put("users", b"u1", br#"{"email":"a@x"}"#).expect("put");
    e.create_index("users", "by_email", &["/email"], false)
        .expect("create index");
    assert!(e.wait_indexes_live(Duration::from_secs(60)));
    let one = e
        .snapshot()
        .index_get("users", "by_email", &[b"a@x".to_vec()], 10)
        .expect("one value per path");
    assert_eq!(one.rows.len(), 1, "the document is there");

    // The second value is the document's own key: still not a value of this index.
    for extra in [b"u1".to_vec(), b"x".to_vec()] {
        let values = [b"a@x".to_vec(), extra.clone()];
        let got = e.snapshot().index_get("users", "by_email", &values, 10);
        let err = match got {
            Ok(page) => panic!(
                "two values for a one-path index were answered with {} rows instead of an \
                 error (extra value {:?})",
                page.rows.len(),
                String::from_utf8_lossy(&extra)
            ),
            Err(err) => err.to_string(),
        };
        assert!(
            err.contains("by_email") && err.contains("1 path") && err.contains("2 values"),
            "the error does not name the index, its 1 path and the 2 values: {err}"
        );
        let scan = e
            .snapshot()
            .index_scan("users", "by_email", &values, b"", None, 10, u64::MAX);
        assert!(scan.is_err(), "index_scan answered {scan:?}");
    }
}

/// The value a number is indexed under, as OPERATIONS.md ("Secondary indexes", Values)
/// documents it: serde_json's rendering of the parsed number, not the document's text. A
/// lookup finds a document only through that form, a unique index compares those bytes, and
/// `index_scan` orders by them. Pins the documented examples so that the docs stay true.
#[test]
fn numbers_are_indexed_as_their_rendering_and_ordered_by_its_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = mem_engine(dir.path());
    e.create_tree("t", None).expect("tree");
    for (k, v) in [
        ("a", r#"{"p":1.50}"#),
        ("b", r#"{"p":1e2}"#),
        ("c", r#"{"p":-0}"#),
        ("d", r#"{"p":18446744073709551616}"#),
    ] {
        e.put("t", k.as_bytes(), v.as_bytes()).expect("put");
    }
    e.create_index("t", "by_p", &["/p"], false).expect("index");
    assert!(e.wait_indexes_live(Duration::from_secs(60)));
    let keys = |value: &str| -> Vec<String> {
        e.snapshot()
            .index_get("t", "by_p", &[value.as_bytes().to_vec()], 10)
            .expect("get")
            .rows
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect()
    };
    for (stored, key) in [
        ("1.5", "a"),
        ("100.0", "b"),
        ("-0.0", "c"),
        ("1.8446744073709552e+19", "d"),
    ] {
        assert_eq!(keys(stored), [key], "lookup of the stored form {stored}");
    }
    for text in ["1.50", "1e2", "100", "-0", "0", "18446744073709551616"] {
        assert!(keys(text).is_empty(), "{text} is not a stored form");
    }

    // Order: the bytes of the stored text, not numeric order.
    e.create_tree("n", None).expect("tree");
    for (k, v) in [
        ("k1", -1),
        ("k2", -10),
        ("k3", -2),
        ("k4", 0),
        ("k5", 100),
        ("k6", 2),
    ] {
        e.put("n", k.as_bytes(), format!(r#"{{"n":{v}}}"#).as_bytes())
            .expect("put");
    }
    e.create_index("n", "by_n", &["/n"], false).expect("index");
    assert!(e.wait_indexes_live(Duration::from_secs(60)));
    let order: Vec<String> = e
        .snapshot()
        .index_scan("n", "by_n", &[], b"", None, 10, u64::MAX)
        .expect("scan")
        .rows
        .into_iter()
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
        .collect();
    assert_eq!(
        order,
        [
            r#"{"n":-1}"#,
            r#"{"n":-10}"#,
            r#"{"n":-2}"#,
            r#"{"n":0}"#,
            r#"{"n":100}"#,
            r#"{"n":2}"#
        ]
    );

    // Unique: `1` and `1.0` are distinct values; `1` and `"1"` are one.
    e.create_tree("u", None).expect("tree");
    e.create_index("u", "by_id", &["/id"], true).expect("index");
    assert!(e.wait_indexes_live(Duration::from_secs(60)));
    e.put("u", b"x", br#"{"id":1}"#).expect("put");
    e.put("u", b"y", br#"{"id":1.0}"#)
        .expect("1.0 is stored as 1.0, distinct from 1");
    let err = e
        .put("u", b"z", br#"{"id":"1"}"#)
        .expect_err("the string \"1\" is the value 1 holds");
    assert!(err.to_string().contains("already maps value"), "{err}");
}
