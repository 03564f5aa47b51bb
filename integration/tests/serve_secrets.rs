//! Which cluster a restarted node belongs to. A node's secrets are created once, on its first
//! start; a node that already has a log serves only under the secrets it was started with.
//!
//! Guards against: a node started earlier with `--secrets DIR` and restarted without it
//! silently creating a new CA and token in `DATA/secrets` and serving as a new cluster, which
//! its clients and replicas then refuse as "another cluster"; and a second `serve` on a
//! running node's data directory writing a stray CA into `DATA/secrets` before it fails on
//! the log's lock (an operator copying `DATA/secrets` to clients later copies a CA of no
//! cluster).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Node, bin};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `tideline serve --data DATA --listen 127.0.0.1:0 EXTRA...` and waits at most 30 s for
/// it to exit; one still running then (it serves) is killed and the test fails.
fn serve_expecting_refusal(data: &Path, extra: &[&str]) -> Output {
    let child = Command::new(bin())
        .args(["serve", "--data"])
        .arg(data)
        .args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("TIDELINE_LOG", "warn,tideline=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tideline serve");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut child = child;
    loop {
        if child.try_wait().expect("poll serve").is_some() {
            return child.wait_with_output().expect("collect serve's output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect serve's output");
            panic!(
                "serve --data {} (PID {pid}) was still running after 30 s instead of refusing; \
                 its stderr: {}",
                data.display(),
                stderr(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_node_restarted_without_its_secrets_refuses_and_creates_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let secrets = dir.path().join("cluster-secrets");
    let secrets_arg = secrets.display().to_string();
    let mut node = Node::start_with(&data, 0, &["--secrets", &secrets_arg]);
    let out = node.run(&["put", "k", "v"]);
    assert!(out.status.success(), "put: {}", stderr(&out));
    node.kill9();

    // Restarted with only --data: refused, nothing created.
    let out = serve_expecting_refusal(&data, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no cluster secrets"), "{err}");
    assert!(
        err.contains("--secrets"),
        "the refusal should name the way out: {err}"
    );
    assert!(
        !err.contains("created cluster secrets"),
        "it created a new cluster: {err}"
    );
    assert!(
        !data.join("secrets").exists(),
        "serve created {} for a node that already has a log",
        data.join("secrets").display()
    );

    // An empty DATA/secrets (made by hand, or left by a copy) is refused the same way, and
    // stays empty.
    std::fs::create_dir(data.join("secrets")).unwrap();
    let out = serve_expecting_refusal(&data, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no cluster secrets"), "{err}");
    let left: Vec<_> = std::fs::read_dir(data.join("secrets"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "serve wrote {left:?} into DATA/secrets");
    std::fs::remove_dir(data.join("secrets")).unwrap();

    // With the --secrets it was started with, the node serves its record as before.
    let node = Node::start_with(&data, 0, &["--secrets", &secrets_arg]);
    let out = node.run(&["get", "k"]);
    assert!(out.status.success(), "get: {}", stderr(&out));
    assert_eq!(out.stdout, b"v");
}

#[test]
fn a_second_serve_on_a_running_nodes_data_leaves_no_secrets_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let secrets = dir.path().join("cluster-secrets");
    let secrets_arg = secrets.display().to_string();
    let node = Node::start_with(&data, 0, &["--secrets", &secrets_arg]);
    let out = node.run(&["put", "k", "v"]);
    assert!(out.status.success(), "put: {}", stderr(&out));
    let pid = node.pid();

    // Without --secrets: refused by the log's lock, naming the running node, before
    // DATA/secrets is created.
    let out = serve_expecting_refusal(&data, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("in use by PID {pid}")),
        "the error should name the node's PID {pid}: {err}"
    );
    assert!(
        !data.join("secrets").exists(),
        "the refused serve created {}: {err}",
        data.join("secrets").display()
    );

    // With a --secrets directory of its own: refused the same way, that directory untouched.
    let other = dir.path().join("other-secrets");
    let out = serve_expecting_refusal(&data, &["--secrets", &other.display().to_string()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("in use by PID {pid}")), "{err}");
    assert!(
        !other.exists(),
        "the refused serve created {}: {err}",
        other.display()
    );

    // The node goes on serving.
    let out = node.run(&["get", "k"]);
    assert!(out.status.success(), "get: {}", stderr(&out));
    assert_eq!(out.stdout, b"v");
}
