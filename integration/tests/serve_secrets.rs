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

use common::{Node, bin, send_signal};

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

/// Copies directory `from` to `to` (files and subdirectories).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The names in directory `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Claim: a data directory whose store holds a node's state but whose log is missing (a log
/// disk not mounted at boot, a lost log directory) is refused before anything is created,
/// and the advice never says to delete the store, the only copy of the node's data left.
/// Guards against `serve` creating a new empty log and then advising "delete the store
/// directory to rebuild it from the log".
#[test]
fn a_store_without_its_log_is_refused_without_advice_to_delete_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Node::start(&data, 0);
    let out = node.run(&["put", "k", "v"]);
    assert!(out.status.success(), "put: {}", stderr(&out));
    send_signal(node.pid(), "INT");
    let status = node.wait_timeout(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the node did not stop cleanly: {status:?}"
    );

    let copy = dir.path().join("copy");
    copy_dir(&data.join("store"), &copy.join("store"));
    copy_dir(&data.join("secrets"), &copy.join("secrets"));
    let out = serve_expecting_refusal(&copy, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // "do not delete the store" is the one way the words may appear.
    assert!(
        !err.replace("do not delete the store", "")
            .contains("delete the store"),
        "the advice deletes the only copy of the data: {err}"
    );
    assert!(
        err.contains("log") && err.contains("missing") && err.contains("do not delete the store"),
        "the refusal should say the log is missing and to keep the store: {err}"
    );
    assert_eq!(
        entries(&copy),
        ["secrets", "store"],
        "the refused serve created something in the data directory: {err}"
    );

    // The log of another node that never committed (a new empty log put in its place): the
    // store and log do not match, and a log without records cannot rebuild the store.
    let fresh = dir.path().join("fresh");
    let mut other = Node::start(&fresh, 0);
    send_signal(other.pid(), "INT");
    assert!(other.wait_timeout(Duration::from_secs(30)).is_some());
    copy_dir(&fresh.join("log"), &copy.join("log"));
    let out = serve_expecting_refusal(&copy, &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("belongs to server"), "{err}");
    assert!(
        !err.replace("do not delete the store", "")
            .contains("delete the store"),
        "the advice deletes the only copy of the data beside an empty log: {err}"
    );
}

/// Claim (docs/OPERATIONS.md: "Before it creates or changes anything, `serve` checks that it
/// can run"): a file where `DATA/log`, `DATA/store` or the secrets directory should be is
/// refused naming the path and saying it is not a directory, with nothing new in DATA.
/// Guards against "File exists (os error 17)" or a fjall error after secrets and a new log
/// were created.
#[test]
fn a_file_where_serve_needs_a_directory_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, name) in ["log", "store", "secrets-flag"].into_iter().enumerate() {
        let data = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&data).unwrap();
        let (file, extra) = if name == "secrets-flag" {
            let file = dir.path().join("pipeline.toml");
            std::fs::write(&file, "not a directory\n").unwrap();
            (
                file.clone(),
                vec!["--secrets".to_string(), file.display().to_string()],
            )
        } else {
            let file = data.join(name);
            std::fs::write(&file, "not a directory\n").unwrap();
            (file, Vec::new())
        };
        let before = entries(&data);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = serve_expecting_refusal(&data, &extra);
        let err = stderr(&out);
        if out.status.code() != Some(1) {
            failures.push(format!("{name}: exit {:?}: {err}", out.status.code()));
        }
        if !err.contains(&file.display().to_string()) || !err.contains("not a directory") {
            failures.push(format!(
                "{name}: the error should name {} and say \"not a directory\": {err}",
                file.display()
            ));
        }
        let after = entries(&data);
        if after != before {
            failures.push(format!(
                "{name}: the refused serve changed DATA from {before:?} to {after:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
