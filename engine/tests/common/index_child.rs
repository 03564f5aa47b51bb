//! The SIGKILL test of `indexes.rs`: the workload its child process runs until killed, and
//! the crash cycles that run that child, kill it, reopen the engine and check every index
//! against a recomputation.

use std::ffi::OsStr;
use std::path::Path;

use rand::Rng;
use tideline_engine::{EngineOptions, IndexState};

use super::index_fixture::{INDEXES, TREE, check_indexes, file_engine, load_docs};

const CHILD: &str = "index_crash_child";
const ENV_DIR: &str = "TIDELINE_INDEX_CRASH_DIR";
const ENV_CYCLE: &str = "TIDELINE_INDEX_CRASH_CYCLE";
const DOCS: u64 = 2_000;

/// The child: on cycle 0 loads the documents; on every cycle drops and re-creates one of
/// the indexes, then rewrites, patches and deletes documents until killed. Whenever that
/// index has been live for a while it is dropped and re-created again, so that backfills
/// recur all through the run and a kill lands mid-backfill however fast the machine
/// backfills. Prints `A` after each acknowledged write, with whether an index was
/// backfilling.
pub fn crash_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let cycle: u64 = std::env::var(ENV_CYCLE)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // Small backfill steps: a backfill spans many batches, and kills land inside it.
    let e = file_engine(
        Path::new(&dir),
        EngineOptions {
            index_backfill_keys: 8,
            ..EngineOptions::default()
        },
    );
    if cycle == 0 {
        e.create_tree(TREE, Some("json-merge-patch")).expect("tree");
        load_docs(&e, DOCS);
        for (name, paths) in INDEXES {
            e.create_index(TREE, name, paths, false).expect("create");
        }
    }
    let (name, paths) = INDEXES[cycle as usize % 2];
    // One transaction: a kill never finds the index dropped and not yet declared again.
    let recreate = || {
        let mut tx = e.begin();
        tx.drop_index(TREE, name).expect("drop");
        tx.create_index(TREE, name, paths, false).expect("create");
        tx.commit()
            .expect("re-create")
            .expect("the index was re-created");
    };
    if cycle > 0 {
        recreate();
    }
    println!("READY");
    let mut rng = rand::rng();
    // Writes acknowledged while every index was live, since the last re-creation.
    let mut live_acks = 0u32;
    for i in 0u64.. {
        if live_acks >= 25 {
            recreate();
            live_acks = 0;
        }
        let key = format!("d{:08}", rng.random_range(0..DOCS + 100));
        match i % 4 {
            0 => e.delete(TREE, key.as_bytes()).map(|_| ()).expect("delete"),
            1 => e
                .merge(
                    TREE,
                    key.as_bytes(),
                    format!(r#"{{"v":"p{}"}}"#, i % 13).as_bytes(),
                )
                .map(|_| ())
                .expect("merge"),
            _ => e
                .put(
                    TREE,
                    key.as_bytes(),
                    format!(r#"{{"v":"c{cycle}-{}","w":{}}}"#, i % 31, i % 3).as_bytes(),
                )
                .map(|_| ())
                .expect("put"),
        }
        let backfilling = e
            .indexes()
            .iter()
            .any(|i| matches!(i.state, IndexState::Backfilling { .. }));
        live_acks += u32::from(!backfilling);
        println!("A {i} {}", if backfilling { "backfilling" } else { "live" });
    }
}

pub fn crash_cycles(
    cycles: u64,
    opts: impl Fn() -> EngineOptions,
    label: &str,
) -> Result<u32, String> {
    let (seed, mut rng) = super::seeded(label);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut mid_backfill = 0;
    for cycle in 0..cycles {
        let what = format!("{label} cycle {cycle} (seed {seed})");
        let c = cycle.to_string();
        let run = super::run_child(
            CHILD,
            &[
                (ENV_DIR, dir.path().as_os_str()),
                (ENV_CYCLE, OsStr::new(&c)),
            ],
            5..250,
            |l| l.starts_with("A "),
            &mut rng,
            &what,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let acked = run.lines.iter().filter(|l| l.starts_with("A ")).count();
        if acked == 0 {
            panic!(
                "{what}: the child acknowledged nothing; stderr: {}",
                run.stderr
            );
        }
        let in_backfill = run
            .lines
            .iter()
            .rev()
            .find(|l| l.starts_with("A "))
            .is_some_and(|l| l.ends_with("backfilling"));
        mid_backfill += u32::from(in_backfill);
        eprintln!(
            "{what}: killed {} ms after its first ack, {acked} acks{}",
            run.kill_after_ms,
            if in_backfill { ", mid-backfill" } else { "" }
        );
        let e = file_engine(dir.path(), opts());
        check_indexes(&e, &["by_v", "by_vw"]).map_err(|err| format!("{what}: {err}"))?;
    }
    Ok(mid_backfill)
}
