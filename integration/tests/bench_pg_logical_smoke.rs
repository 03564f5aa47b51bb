//! `peer-bench pg-logical` as a user runs it, at tiny sizes: it starts its own PostgreSQL
//! (the shared one on 5432 is never touched), measures the sink and logical-replication apply
//! of the same rows, reports both as positive numbers, and leaves no server or directory
//! behind. Guards against a benchmark that silently stops measuring (a side at zero, a
//! subscription that never applies) and against a leaked throwaway cluster. No wall-clock
//! figure is asserted.

mod common;

use std::process::Command;

use common::{PEER_BENCH, positive};

#[test]
fn pg_logical_reports_both_sides_and_removes_its_server() {
    let child = Command::new(PEER_BENCH)
        .args([
            "pg-logical",
            "--changes",
            "2000",
            "--batch",
            "500",
            "--rounds",
            "1",
        ])
        .arg("--json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run peer-bench");
    let dir = std::env::temp_dir().join(format!("tideline-pg-logical-{}", child.id()));
    let out = child
        .wait_with_output()
        .expect("peer-bench runs to its end");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(report["changes"], 2000);
    positive(&report, &["sink", "per_s"]);
    positive(&report, &["apply", "per_s"]);
    positive(&report, &["ratio"]);
    assert!(
        !dir.exists(),
        "the private server's directory {} was left behind",
        dir.display()
    );
}

#[test]
fn pg_logical_without_server_binaries_says_what_to_give() {
    let out = Command::new(PEER_BENCH)
        .args(["pg-logical", "--pg-bin", "/nonexistent/postgresql/bin"])
        .output()
        .expect("run peer-bench");
    assert!(!out.status.success(), "a missing initdb must fail the run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("initdb") && err.contains("--pg-bin"),
        "the error names what is missing and what to give: {err}"
    );
}
