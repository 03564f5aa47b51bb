//! Index maintenance when one store batch writes the same key more than once.
//!
//! The applier writes a whole group of transactions as one store batch, and reads each
//! indexed document's value before a write to remove its old entry. When a group writes a key
//! twice, the second write must see the first's value (the batch's own, not yet in the store):
//! otherwise the first write's entry stays behind, stale, and the counts drift. Two ways to
//! get such groups: writers racing on a few keys (group commit puts them in one group), and a
//! replica applying an upstream's log in one call, where whole runs of transactions become
//! one group. After each, every index must equal a recomputation from the documents.

#[allow(dead_code)] // the child-process runner is for the crash tests
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{MemStorage, Wal, WalOptions};

const TREE: &str = "docs";
const KEYS: u64 = 4;

fn open(dir: &std::path::Path) -> Engine {
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    Engine::open(dir, Arc::new(wal), EngineOptions::default()).expect("open engine")
}

fn doc(v: u64) -> Vec<u8> {
    format!(r#"{{"v":"value{v}","pad":"{}"}}"#, "x".repeat(40)).into_bytes()
}

/// Checks index `by_v` against the documents: each document is found under its value and
/// under no other, and the index's entry count is the number of documents.
fn check(e: &Engine) -> Result<(), String> {
    if !e.wait_indexes_live(std::time::Duration::from_secs(60)) {
        return Err("the index did not become live".into());
    }
    let docs: BTreeMap<Vec<u8>, Vec<u8>> = e
        .range::<&[u8]>(TREE, .., false)
        .map_err(|e| e.to_string())?
        .map(|kv| kv.expect("scan item"))
        .collect();
    let mut found = 0;
    for v in 0..20u64 {
        let value = format!("value{v}").into_bytes();
        let rows = e
            .snapshot()
            .index_get(TREE, "by_v", std::slice::from_ref(&value), 1000)
            .map_err(|e| e.to_string())?
            .rows;
        let want: Vec<Vec<u8>> = docs
            .iter()
            .filter(|(_, d)| {
                serde_json::from_slice::<serde_json::Value>(d)
                    .ok()
                    .and_then(|j| j.get("v").and_then(|s| s.as_str().map(str::to_owned)))
                    .is_some_and(|s| s.as_bytes() == value.as_slice())
            })
            .map(|(k, _)| k.clone())
            .collect();
        let got: Vec<Vec<u8>> = rows.into_iter().map(|(k, _)| k).collect();
        if got != want {
            return Err(format!(
                "value{v}: the index finds {:?}, the documents say {:?}",
                got.iter()
                    .map(|k| String::from_utf8_lossy(k))
                    .collect::<Vec<_>>(),
                want.iter()
                    .map(|k| String::from_utf8_lossy(k))
                    .collect::<Vec<_>>()
            ));
        }
        found += got.len();
    }
    let info = &e.indexes()[0];
    if info.entries != docs.len() as u64 || found != docs.len() {
        return Err(format!(
            "{} entries counted, {found} found, {} documents",
            info.entries,
            docs.len()
        ));
    }
    Ok(())
}

#[test]
fn racing_writers_on_few_keys_and_a_replica_applying_in_groups_keep_the_index_exact() {
    let (seed, _) = common::seeded("index_groups");
    let dir_a = tempfile::tempdir().expect("tempdir");
    let a = Arc::new(open(dir_a.path()));
    a.create_tree(TREE, None).expect("tree");
    a.create_index(TREE, "by_v", &["/v"], false).expect("index");
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ w);
                for _ in 0..300 {
                    let key = format!("k{}", rng.random_range(0..KEYS));
                    if rng.random_range(0..10) == 0 {
                        a.delete(TREE, key.as_bytes()).expect("delete");
                    } else {
                        let v = rng.random_range(0..20);
                        a.put(TREE, key.as_bytes(), &doc(v)).expect("put");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    check(&a)
        .map_err(|e| format!("primary: {e}"))
        .expect("index");

    // The replica applies the primary's whole log in one call: runs of transactions on the
    // same four keys land in the same groups.
    let log = common::log_of(&a);
    let dir_b = tempfile::tempdir().expect("tempdir");
    let b = open(dir_b.path());
    b.apply_upstream_batch(log).expect("apply");
    check(&b)
        .map_err(|e| format!("replica: {e}"))
        .expect("index");
}
