//! `--timeout-ms 0` on the client commands: refused by the argument parser (exit 2, naming
//! the flag), before any connection is tried.
//!
//! Guards against: a zero timeout accepted and used as both the connect and the idle
//! timeout, so a command against a running node failed with "no answer; check that the node
//! runs and the address is right", sending the operator after the wrong cause.

mod common;

use common::bin;

#[test]
fn a_zero_timeout_is_refused_by_every_client_command() {
    let node = ["--node", "127.0.0.1:9"];
    let commands: [&[&str]; 6] = [
        &["status"],
        &["get", "k"],
        &["put", "k", "v"],
        &["load"],
        &["tail"],
        &["monitor"],
    ];
    for cmd in commands {
        let out = std::process::Command::new(bin())
            .args(cmd)
            .args(node)
            .args(["--timeout-ms", "0"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run tideline");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(stderr.contains("--timeout-ms"), "{cmd:?}: {stderr}");
    }
}
