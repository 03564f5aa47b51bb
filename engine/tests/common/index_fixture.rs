//! What the index tests in `indexes.rs` share: the tree and the indexes they declare, the
//! check of every index against a recomputation from a full scan of the tree, and an engine
//! on disk with a bulk load of documents (the backfill and SIGKILL tests).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tideline_engine::{Engine, EngineOptions, IndexState, ReadError, value_prefix};
use tideline_wal::{FileStorage, Wal, WalOptions};

pub const TREE: &str = "docs";
/// Index name → paths.
pub const INDEXES: [(&str, &[&str]); 2] = [("by_v", &["/v"]), ("by_vw", &["/v", "/w"])];
pub const LIVE_WAIT: Duration = Duration::from_secs(60);

/// What an index must hold for these documents: (entry order key, primary key) sorted, and
/// the number of skipped documents.
fn recompute(docs: &BTreeMap<Vec<u8>, Vec<u8>>, paths: &[&str]) -> (Vec<Vec<u8>>, u64) {
    let mut entries = Vec::new();
    let mut skipped = 0;
    for (k, v) in docs {
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(v) else {
            skipped += 1;
            continue;
        };
        let mut values = Vec::new();
        for p in paths {
            match doc.pointer(p) {
                Some(serde_json::Value::String(s)) => values.push(s.as_bytes().to_vec()),
                Some(serde_json::Value::Object(_) | serde_json::Value::Array(_)) | None => break,
                Some(other) => values.push(other.to_string().into_bytes()),
            }
        }
        if values.len() < paths.len() {
            skipped += 1;
            continue;
        }
        let mut order = value_prefix(&values);
        order.extend_from_slice(k);
        entries.push((order, k.clone()));
    }
    entries.sort();
    (entries.into_iter().map(|(_, k)| k).collect(), skipped)
}

/// Every document of the index in order, through the query API (which verifies each entry).
fn index_keys(e: &Engine, name: &str) -> Result<Vec<Vec<u8>>, ReadError> {
    let snap = e.snapshot();
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = snap.index_scan(TREE, name, &[], b"", after.as_deref(), 97, 1 << 20)?;
        out.extend(page.rows.into_iter().map(|(k, _)| k));
        match page.next {
            Some(n) => after = Some(n),
            None => return Ok(out),
        }
    }
}

fn tree_docs(e: &Engine) -> BTreeMap<Vec<u8>, Vec<u8>> {
    e.range::<&[u8]>(TREE, .., false)
        .expect("scan")
        .map(|kv| kv.expect("scan item"))
        .collect()
}

/// Checks every declared index against a recomputation; `Err` says what differs.
pub fn check_indexes(e: &Engine, declared: &[&str]) -> Result<(), String> {
    if !e.wait_indexes_live(LIVE_WAIT) {
        return Err("indexes did not become live".into());
    }
    let docs = tree_docs(e);
    let infos = e.indexes();
    let names: Vec<&str> = infos.iter().map(|i| i.name.as_str()).collect();
    if names != declared {
        return Err(format!("indexes {names:?}, declared {declared:?}"));
    }
    for info in &infos {
        let paths = INDEXES
            .iter()
            .find(|(n, _)| *n == info.name)
            .map(|(_, p)| *p)
            .ok_or("unknown index")?;
        let (want, skipped) = recompute(&docs, paths);
        let got = index_keys(e, &info.name).map_err(|e| format!("{}: {e}", info.name))?;
        if got != want {
            return Err(format!(
                "index {}: {} documents in index order, recomputation has {}",
                info.name,
                got.len(),
                want.len()
            ));
        }
        if (info.entries, info.skipped) != (want.len() as u64, skipped) {
            return Err(format!(
                "index {}: entries/skipped {}/{}, recomputation {}/{skipped}",
                info.name,
                info.entries,
                info.skipped,
                want.len()
            ));
        }
        if info.state != IndexState::Live {
            return Err(format!("index {} is {:?}", info.name, info.state));
        }
    }
    Ok(())
}

pub fn file_engine(dir: &Path, opts: EngineOptions) -> Engine {
    let storage = FileStorage::new(dir.join("log")).expect("log dir");
    let wal = Wal::open(
        Arc::new(storage),
        WalOptions {
            segment_bytes_max: 8 << 20,
            ..WalOptions::default()
        },
    )
    .expect("open log");
    Engine::open(dir.join("store"), Arc::new(wal), opts).expect("open engine")
}

pub fn load_docs(e: &Engine, n: u64) {
    let mut i = 0;
    while i < n {
        e.transaction(|tx| {
            for j in i..(i + 1000).min(n) {
                tx.put(
                    TREE,
                    format!("d{j:08}").as_bytes(),
                    format!(r#"{{"v":"g{}","w":{}}}"#, j % 1000, j % 7).as_bytes(),
                )?;
            }
            Ok(())
        })
        .expect("load");
        i += 1000;
    }
}
