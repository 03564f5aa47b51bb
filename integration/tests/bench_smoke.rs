//! `peer-bench stream` as a user runs it, at tiny sizes: every phase (tail, fan-out, bare
//! quinn, large values, paced latency) runs to the end and the `--json` report carries each
//! figure as a positive number. Guards against a benchmark that silently stops measuring
//! (a phase that hangs, a field renamed or left at zero). PostgreSQL is skipped with
//! `--no-postgres`; no wall-clock figure is asserted.

mod common;

use common::{positive, run_bench};

#[test]
fn bench_stream_reports_every_figure() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let report = run_bench(
        dir.path(),
        &[
            "stream",
            "--no-postgres",
            "--changes",
            "2000",
            "--consumers",
            "2",
            "--large-mib",
            "1",
            "--latency-rate",
            "2000",
            "--latency-seconds",
            "0.2",
            "--udp-buffer-bytes",
            "1048576",
        ],
    );

    assert_eq!(report["changes"], 2000);
    assert_eq!(report["tail"]["changes"], 2000);
    assert_eq!(report["consumers"]["changes"], 4000);
    for path in [
        &["tail", "changes_per_s"][..],
        &["tail", "mib_s"],
        &["bare_quinn", "mib_s"],
        &["bare_quinn", "equivalent_changes_per_s"],
        &["bare_quinn_big_buffers", "mib_s"],
        &["tail_vs_bare"],
        &["consumers", "aggregate_changes_per_s"],
        &["beside_stalled", "changes_per_s"],
        &["large", "tail_mib_s"],
        &["large", "bare_mib_s"],
        &["large", "tail_vs_bare"],
        &["latency", "achieved_rate_per_s"],
        &["latency", "p50_us"],
        &["latency", "p99_us"],
    ] {
        positive(&report, path);
    }
    // The run of the log without fsync exists only in a build with the feature that turns on
    // the log's test-only switches; otherwise the report says it was skipped and why.
    if cfg!(feature = "bench-without-fsync") {
        positive(&report, &["latency_without_fsync", "p50_us"]);
        positive(&report, &["latency_without_fsync", "p99_us"]);
    } else {
        let why = report["latency_without_fsync"]["skipped"].as_str();
        assert!(
            why.is_some_and(|w| w.contains("--features bench-without-fsync")),
            "latency_without_fsync is neither measured nor skipped with its reason: {}",
            report["latency_without_fsync"]
        );
    }
    assert!(report["latency"]["p99_us"].as_i64() >= report["latency"]["p50_us"].as_i64());
    assert_eq!(report["postgres"]["skipped"], "--no-postgres");
    let goals = report["goals"].as_array().expect("goals is a list");
    // Issue 16's rows (the tail owned and in place against bare quinn among them); no
    // PostgreSQL row when it was skipped.
    assert_eq!(goals.len(), 7, "PostgreSQL's goal is absent when skipped");
    for g in goals {
        assert!(g["met"].is_boolean(), "goal without a verdict: {g}");
    }
    // The run's files are removed.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("the bench directory exists")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}
