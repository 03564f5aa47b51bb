//! `peer-bench replication` as a user runs it, at tiny sizes: the primary is loaded, an
//! async and a sync replica catch up, a sync and an async chain A→B→C carry the paced load
//! to C, empty
//! replicas bootstrap a small and a larger state, and the `--json` report carries each figure
//! as a positive number. Guards against a benchmark that silently stops measuring (a phase that
//! hangs, a field renamed or left at zero). Redis is skipped with `--no-redis`; no wall-clock
//! figure is asserted.

mod common;

use common::{positive, run_bench};

#[test]
fn bench_replication_reports_every_figure() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let report = run_bench(
        dir.path(),
        &[
            "replication",
            "--no-redis",
            "--txns",
            "2000",
            "--load-writers",
            "4",
            "--load-seconds",
            "0.3",
            "--lag-rate",
            "1000",
            "--lag-seconds",
            "0.3",
            "--lag-writers",
            "32",
            "--bootstrap-keys",
            "20000",
            "--bootstrap-small-keys",
            "3000",
        ],
    );

    assert_eq!(report["txns"], 2000);
    assert_eq!(report["catch_up_async"]["transactions"], 2000);
    assert_eq!(report["catch_up_async"]["durability"], "async");
    assert_eq!(report["catch_up_sync"]["transactions"], 2000);
    assert_eq!(report["catch_up_sync"]["durability"], "sync");
    for durability in ["sync", "async"] {
        let lag = &report["chain_lag"][durability];
        assert_eq!(lag["durability"], durability, "{report}");
        for node in ["at_a", "at_b", "at_c"] {
            assert_eq!(lag[node]["transactions"], 300, "{durability} {node}");
        }
    }
    for path in [
        &["load_txns_per_s"][..],
        &["catch_up_async", "seconds"],
        &["catch_up_async", "txns_per_s"],
        &["catch_up_sync", "seconds"],
        &["catch_up_sync", "txns_per_s"],
        &["chain_lag", "sync", "achieved_rate_per_s"],
        &["chain_lag", "sync", "at_a", "p50_us"],
        &["chain_lag", "sync", "at_c", "p50_us"],
        &["chain_lag", "sync", "at_c", "p99_us"],
        &["chain_lag", "sync", "at_c", "max_us"],
        &["chain_lag", "async", "achieved_rate_per_s"],
        &["chain_lag", "async", "at_a", "p50_us"],
        &["chain_lag", "async", "at_c", "p50_us"],
        &["chain_lag", "async", "at_c", "p99_us"],
        &["chain_lag", "async", "at_c", "max_us"],
        &["bootstrap_small", "seconds"],
        &["bootstrap_small", "mb_per_s"],
        &["bootstrap_large", "mb_per_s"],
        &["bootstrap_large", "chunks"],
    ] {
        positive(&report, path);
    }
    assert_eq!(report["redis"]["skipped"], "--no-redis");
    assert_eq!(report["bootstrap_large"]["keys"], 20000);
    // Without Redis there is nothing to compare the bootstrap with.
    assert!(report["bootstrap_vs_full_resync"].is_null(), "{report}");
    let goals = report["goals"].as_array().expect("goals is an array");
    assert!(goals.len() >= 3, "{report}");
    for g in goals {
        assert!(g["met"].is_boolean(), "{g}");
        positive(g, &["target"]);
    }
    // Nothing is left behind in --dir.
    let left: Vec<_> = std::fs::read_dir(dir.path()).expect("read --dir").collect();
    assert!(left.is_empty(), "files left in --dir: {left:?}");
}
