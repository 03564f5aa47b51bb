use super::*;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

/// A test-only pause inside the creation, after its first file is in place: the directory
/// it is set for, and what to run there.
type Pause = (PathBuf, Box<dyn Fn() + Send>);
static PAUSE: Mutex<Vec<Pause>> = Mutex::new(Vec::new());

pub(super) fn after_first_file(dir: &Path) {
    let pauses = PAUSE.lock().unwrap_or_else(|p| p.into_inner());
    for (d, f) in pauses.iter() {
        if d == dir {
            f();
        }
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Two nodes started together on one fresh secrets directory: the second one checks while
/// the first is between its first file and its last. Both must start, with one token.
#[test]
fn two_creators_at_once_both_start_with_one_token() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("secrets");
    let (paused_tx, paused_rx) = mpsc::channel::<()>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = Mutex::new(go_rx);
    let paused_tx = Mutex::new(paused_tx);
    PAUSE.lock().unwrap().push((
        dir.clone(),
        Box::new(move || {
            paused_tx.lock().unwrap().send(()).unwrap();
            // Held until the second creator has finished, or for a while if it waits for
            // this one (it must, for the directory to come out whole).
            let _ = go_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_millis(300));
        }),
    ));
    let first = {
        let dir = dir.clone();
        std::thread::spawn(move || ensure_secrets(&dir))
    };
    paused_rx.recv().unwrap();
    let second = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let r = ensure_secrets(&dir);
            let _ = go_tx.send(());
            r
        })
    };
    let second = second.join().unwrap();
    let first = first.join().unwrap();
    PAUSE.lock().unwrap().retain(|(d, _)| d != &dir);
    let first = first.unwrap_or_else(|e| panic!("first creator failed: {e}"));
    let second = second.unwrap_or_else(|e| panic!("second creator failed: {e}"));
    assert!(
        first && !second,
        "exactly the first one creates: {first} {second}"
    );
    let token = load_server(&dir).unwrap().token;
    assert_eq!(load_client_dir(&dir).unwrap().token, token);
    assert_eq!(mode(&dir), 0o700, "the secrets directory is private");
    for (f, m) in [
        ("ca.key.pem", 0o600),
        ("server.key.pem", 0o600),
        ("token", 0o600),
    ] {
        assert_eq!(mode(&dir.join(f)), m, "{f}");
    }
}

/// Claim: a `--secrets` path that is a file (or lies under one) is reported as not a
/// directory, not as a directory that "holds no ca.pem" (the operator passed the path
/// they meant; what is wrong is what is there). Fails if `ca.pem` is probed with
/// `exists()`, which turns every error into "absent".
#[test]
fn a_secrets_path_that_is_a_file_is_not_reported_as_missing_ca_pem() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("pipeline.toml");
    std::fs::write(&file, "name = \"x\"\n").unwrap();
    for dir in [file.clone(), file.join("secrets")] {
        let e = load_client_dir(&dir).unwrap_err().to_string();
        assert!(!e.contains("holds no ca.pem"), "{}: {e}", dir.display());
        assert!(
            e.contains("not a directory") && e.contains(&dir.display().to_string()),
            "{}: the error should name the path and say it is not a directory: {e}",
            dir.display()
        );
    }
}

/// Claim: a secrets file this user may not read is reported as unreadable, with the way
/// out, not as missing. The error is injected (tests run as root here, which reads
/// everything); [`a_secrets_directory_without_read_access_says_permission_denied`] checks
/// the real thing when not root.
#[test]
fn a_permission_error_on_a_secrets_file_says_who_may_read_it() {
    let path = Path::new("/var/lib/tideline/secrets/ca.pem");
    for e in [
        read_failed(path, std::io::ErrorKind::PermissionDenied.into()),
        probe_failed(path, std::io::ErrorKind::PermissionDenied.into()),
    ] {
        let e = e.to_string();
        assert!(
            e.contains("cannot read /var/lib/tideline/secrets/ca.pem: permission denied")
                && e.contains("run as the node's user"),
            "{e}"
        );
    }
    let token = Path::new("/etc/tideline/token");
    let e = read_token_failed(token, std::io::ErrorKind::NotFound.into()).to_string();
    assert!(
        e.starts_with("read the cluster token from /etc/tideline/token: "),
        "{e}"
    );
}

/// The unreadable-directory case for real (skipped as root, who reads everything).
#[test]
fn a_secrets_directory_without_read_access_says_permission_denied() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    assert!(ensure_secrets(dir.path()).unwrap());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o000)).unwrap();
    let readable = std::fs::read_dir(dir.path()).is_ok();
    let result = load_client_dir(dir.path());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    if readable {
        eprintln!("skipped: this user (root) reads a directory of mode 0000");
        return;
    }
    let e = result.unwrap_err().to_string();
    assert!(
        e.contains("permission denied") && !e.contains("holds no ca.pem"),
        "{e}"
    );
}

/// Claim: a secrets directory whose `token` is missing says it was reading the cluster
/// token, not only the bare OS error on a path.
#[test]
fn a_missing_token_says_what_was_being_read() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ensure_secrets(dir.path()).unwrap());
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let token = dir.path().join("token");
    let e = load_client_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "read the cluster token from {}: ",
            token.display()
        )),
        "{e}"
    );
}

/// A token file left empty (a crash between its creation and its fsync, on a filesystem
/// that delays allocation): the node says which file and what to do.
#[test]
fn an_empty_token_file_names_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ensure_secrets(dir.path()).unwrap());
    std::fs::write(dir.path().join("token"), b"").unwrap();
    let e = ensure_secrets(dir.path())
        .and_then(|_| load_server(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("token"), "names the file: {e}");
    assert!(
        e.contains("restore the whole secrets directory from a node of the cluster"),
        "says what to do: {e}"
    );
    std::fs::write(dir.path().join("server.key.pem"), b"").unwrap();
    let e = load_server(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("server.key.pem")
            && e.contains("restore the whole secrets directory from a node of the cluster"),
        "{e}"
    );
}

/// A creation cut short (a half set, no token, `.tmp` leftovers) on a node that has no
/// log yet is done again; once the node has a log it is refused, with the way out.
#[test]
fn a_half_set_is_recreated_only_on_a_new_node() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ensure_secrets(dir.path()).unwrap());
    std::fs::remove_file(dir.path().join("token")).unwrap();
    std::fs::remove_file(dir.path().join("server.key.pem")).unwrap();
    std::fs::write(dir.path().join("server.key.pem.tmp"), b"half").unwrap();
    let log = dir.path().join("log");
    let e = ensure_node_secrets(dir.path(), Some(&log))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("missing server.key.pem, token")
            && e.contains("restore the whole secrets directory from a node of the cluster")
            && !e.contains("empty it"),
        "{e}"
    );
    assert!(ensure_node_secrets(dir.path(), None).unwrap());
    load_server(dir.path()).unwrap();
    assert!(!dir.path().join("server.key.pem.tmp").exists());
    // A token present but another file missing is never a creation cut short.
    std::fs::remove_file(dir.path().join("ca.pem")).unwrap();
    let e = ensure_node_secrets(dir.path(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing ca.pem"), "{e}");
}

/// A node that already has a log never creates secrets: with none where it looks (it was
/// started with another `--secrets`), it is refused, naming its log and the way out, and
/// creates nothing there, not even the directory or its lock file. Its whole set loads.
#[test]
fn a_node_with_a_log_creates_no_secrets() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("secrets");
    let log = root.path().join("log");
    let e = ensure_node_secrets(&dir, Some(&log)).unwrap_err();
    assert!(
        matches!(e, SecretsError::NoneForExistingNode { .. }),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(
        e.contains("holds no cluster secrets")
            && e.contains(&log.display().to_string())
            && e.contains("pass the --secrets DIR it was started with"),
        "{e}"
    );
    assert!(!dir.exists(), "the check created {}", dir.display());
    std::fs::create_dir(&dir).unwrap();
    let e = ensure_node_secrets(&dir, Some(&log)).unwrap_err();
    assert!(
        matches!(e, SecretsError::NoneForExistingNode { .. }),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "it wrote into {dir:?}"
    );
    // Created by a new node, the set is then the existing node's, left alone.
    assert!(ensure_node_secrets(&dir, None).unwrap());
    let token = load_server(&dir).unwrap().token;
    assert!(!ensure_node_secrets(&dir, Some(&log)).unwrap());
    assert_eq!(load_server(&dir).unwrap().token, token);
}

/// A server certificate that the `ca.pem` beside it did not sign (a partial copy from
/// another node): clients holding this very directory would be told it is another
/// cluster's, so the node refuses to start.
#[test]
fn a_server_certificate_of_another_ca_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    ensure_secrets(a.path()).unwrap();
    ensure_secrets(b.path()).unwrap();
    std::fs::copy(a.path().join("ca.pem"), b.path().join("ca.pem")).unwrap();
    std::fs::copy(a.path().join("token"), b.path().join("token")).unwrap();
    let e = match load_server(b.path()) {
        Ok(_) => panic!("a server certificate of another CA was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("server.pem was not issued by")
            && e.contains("copy the whole secrets directory from a node of the cluster"),
        "{e}"
    );
    load_server(a.path()).unwrap();
}

#[test]
fn creates_once_and_refuses_a_half_directory() {
    let dir = tempfile::tempdir().unwrap();
    assert!(ensure_secrets(dir.path()).unwrap());
    assert!(!ensure_secrets(dir.path()).unwrap());
    let s = load_server(dir.path()).unwrap();
    assert_eq!(s.token.len(), 64);
    let c = load_client_dir(dir.path()).unwrap();
    assert_eq!(c.token, s.token);
    std::fs::remove_file(dir.path().join("token")).unwrap();
    let e = ensure_secrets(dir.path()).unwrap_err();
    assert!(e.to_string().contains("missing token"), "{e}");
    assert!(token_eq("abc", "abc") && !token_eq("abc", "abd") && !token_eq("abc", "ab"));
}
