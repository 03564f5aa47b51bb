//! The `tideline` binary starts and answers `--version` and `--help`: the smallest check that
//! the thin `main.rs` reaches the library's command line.
//!
//! This file also makes Cargo build the `tideline` binary whenever the workspace's tests are
//! built (`cargo nextest run --workspace`, `scripts/test`): a package's binaries are built for
//! its own integration tests only, and the multi-process tests in `tideline-integration` run
//! this binary from the same target directory. Without it they would find none, or an old one.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tideline");

#[test]
fn the_binary_prints_its_version_and_its_commands() {
    let out = Command::new(BIN)
        .arg("--version")
        .output()
        .expect("run tideline --version");
    assert!(out.status.success(), "{out:?}");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("tideline {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );

    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run tideline --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "serve", "put", "get", "load", "scan", "tail", "status", "bench",
    ] {
        assert!(
            help.contains(command),
            "`{command}` missing from --help:\n{help}"
        );
    }
}
