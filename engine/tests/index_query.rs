//! Querying an index with the wrong number of values.
//!
//! An index query names one value per indexed path, or fewer for a leading part of a
//! composite index. A query with more values than the index has paths cannot match anything
//! the index holds: the extra values would be compared against the documents' primary keys.
//! Guards against such a query answering "no documents" while the document it looks for
//! exists: it must be refused, saying how many paths the index has.

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
