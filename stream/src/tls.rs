//! Cluster secrets: a CA, a server certificate signed by it, and a random token.
//!
//! On first start a node creates them in its secrets directory (default `DATA/secrets`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the cluster CA certificate; clients and peers trust exactly this |
//! | `ca.key.pem` | the CA's private key (mode 0600) |
//! | `server.pem`, `server.key.pem` | the node certificate (SAN `tideline.internal`, `localhost`, loopback) and key |
//! | `token` | 32 random bytes, hex; every connection must present it |
//!
//! Nodes started with the same directory form one cluster. Clients verify the server against
//! `ca.pem` under the fixed name [`SERVER_NAME`], whatever address they dialled, so nodes can be
//! reached by IP, by any hostname, or through NAT without re-issuing certificates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The name every node certificate carries and every client verifies.
pub const SERVER_NAME: &str = "tideline.internal";

/// The files of a secrets directory, in the order they are created (`token` last: its
/// presence means the set was written whole).
pub const FILES: [&str; 5] = [
    "ca.pem",
    "ca.key.pem",
    "server.pem",
    "server.key.pem",
    "token",
];

/// The lock held while a directory's secrets are checked and created.
const LOCK_FILE: &str = ".lock";

/// The suffix of a file being written.
const TMP_SUFFIX: &str = ".tmp";

/// Why secrets could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Some files exist and others not, and the set cannot be a creation cut short on a new
    /// node.
    #[error(
        "secrets directory {dir} is incomplete (missing {missing}): restore the whole secrets \
         directory from a node of the cluster"
    )]
    Incomplete {
        /// Directory.
        dir: PathBuf,
        /// Missing file names.
        missing: String,
    },
    /// A node that already has a log finds no secrets at all: it was started with another
    /// `--secrets` directory, or its own was lost. New secrets would make it a new cluster,
    /// which its clients and replicas would refuse.
    #[error(
        "{dir} holds no cluster secrets but this node already has a log in {log}: pass the \
         --secrets DIR it was started with (or restore {dir} from a node of the cluster)"
    )]
    NoneForExistingNode {
        /// The secrets directory (absent, or holding none of [`FILES`]).
        dir: PathBuf,
        /// The node's log directory.
        log: PathBuf,
    },
    /// A client's secrets directory has no `ca.pem`.
    #[error(
        "{dir} holds no ca.pem: pass --secrets with the secrets directory of a node of the \
         cluster (DATA/secrets of the node, or the one its `serve --secrets` names)"
    )]
    Missing {
        /// Directory.
        dir: PathBuf,
    },
    /// A secrets file (or its directory) that this user may not read: it may well be there,
    /// so it is not reported as missing.
    #[error(
        "cannot read {path}: permission denied; run as the node's user, or give this user \
         read access to the secrets directory and its files"
    )]
    Unreadable {
        /// The file that could not be read or looked at.
        path: PathBuf,
    },
    /// A secrets path that should be a directory is a file, or lies under one.
    #[error(
        "{dir} is not a directory (it is a file, or lies under one): pass --secrets with the \
         secrets directory of a node of the cluster (DATA/secrets of the node, or the one its \
         `serve --secrets` names)"
    )]
    NotADirectory {
        /// The path given as a secrets directory.
        dir: PathBuf,
    },
    /// The secrets directory could not be created.
    #[error("create the secrets directory {dir}: {source}; pass a writable --secrets or --data")]
    CreateDir {
        /// Directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The cluster token file could not be read.
    #[error("read the cluster token from {path}: {source}")]
    TokenRead {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A PEM file did not parse.
    #[error("{path} is not a valid PEM {what}: {reason}")]
    BadPem {
        /// File.
        path: PathBuf,
        /// Certificate or key.
        what: &'static str,
        /// Parser message.
        reason: String,
    },
    /// A file of a node's secrets directory is empty or does not parse.
    #[error(
        "{path} is not a valid {what} ({reason}): restore the whole secrets directory from a \
         node of the cluster"
    )]
    Damaged {
        /// File.
        path: PathBuf,
        /// Certificate, key or token.
        what: &'static str,
        /// Parser message.
        reason: String,
    },
    /// The node certificate was not issued by the CA beside it.
    #[error(
        "{dir}/server.pem was not issued by {dir}/ca.pem ({reason}): copy the whole secrets \
         directory from a node of the cluster (clients trusting this ca.pem would refuse the \
         node as another cluster's)"
    )]
    ForeignCertificate {
        /// Directory.
        dir: String,
        /// What the verifier said.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("could not generate certificates: {0}")]
    Generate(String),
    /// The TLS stack refused the configuration.
    #[error("TLS configuration rejected: {0}")]
    Tls(String),
}

/// What a server needs.
#[derive(Debug, Clone)]
pub struct ServerSecrets {
    /// Certificate chain (node certificate, then the CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// Node private key.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Cluster token.
    pub token: String,
}

/// What a client needs.
#[derive(Debug, Clone)]
pub struct ClientSecrets {
    /// The CA to trust.
    pub ca: CertificateDer<'static>,
    /// Cluster token.
    pub token: String,
    /// Where these secrets were read from (a directory, or the CA file), for messages.
    pub origin: String,
}

/// The error of reading secrets file `path` that failed with `source`: a permission error
/// says so and who may read it, rather than the bare OS error.
fn read_failed(path: &Path, source: std::io::Error) -> SecretsError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        SecretsError::Unreadable {
            path: path.to_path_buf(),
        }
    } else {
        io_err(path)(source)
    }
}

/// The error of looking for secrets file `path` (its metadata) that failed with `source`
/// other than "not found": a permission error, a directory that is a file, or the OS error.
fn probe_failed(path: &Path, source: std::io::Error) -> SecretsError {
    if source.kind() == std::io::ErrorKind::NotADirectory {
        return SecretsError::NotADirectory {
            dir: path.parent().unwrap_or(path).to_path_buf(),
        };
    }
    read_failed(path, source)
}

/// The error of reading token file `path` that failed with `source`.
fn read_token_failed(path: &Path, source: std::io::Error) -> SecretsError {
    match read_failed(path, source) {
        SecretsError::Io { path, source } => SecretsError::TokenRead { path, source },
        other => other,
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `dir/name` whole or not at all: `name.tmp`, fsynced, then renamed over `name`.
fn write_file(dir: &Path, name: &str, data: &[u8], private: bool) -> Result<(), SecretsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn sync_dir(dir: &Path) -> Result<(), SecretsError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// What a secrets directory holds, read under its lock.
struct Contents {
    /// Which of [`FILES`] exist.
    present: [bool; FILES.len()],
    /// Names ending in [`TMP_SUFFIX`]: files of a creation cut short.
    leftovers: Vec<PathBuf>,
}

impl Contents {
    fn read(dir: &Path) -> Result<Contents, SecretsError> {
        let mut present = [false; FILES.len()];
        let mut leftovers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_failed(dir, e))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(i) = FILES.iter().position(|f| *f == name) {
                present[i] = true;
            } else if name.ends_with(TMP_SUFFIX) {
                leftovers.push(entry.path());
            }
        }
        Ok(Contents { present, leftovers })
    }

    fn missing(&self) -> String {
        FILES
            .iter()
            .zip(&self.present)
            .filter(|(_, p)| !**p)
            .map(|(f, _)| *f)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Creates the secrets in `dir` if none are there; leaves complete secrets alone. Returns
/// whether they were created. A creation cut short is never completed: use
/// [`ensure_node_secrets`] where that is safe.
pub fn ensure_secrets(dir: &Path) -> Result<bool, SecretsError> {
    ensure(dir, false)
}

/// The secrets of a node about to serve, in `dir`; `existing_log` is the node's log directory
/// when it already has one (`None`: a new node). Returns whether they were created.
///
/// Only a new node creates secrets: one with a log has served under some cluster's secrets,
/// and new ones would silently make it another cluster. For it this only checks, creating
/// nothing, not even `dir`: `dir` absent or holding none of [`FILES`] is refused with
/// [`SecretsError::NoneForExistingNode`], a partial set with [`SecretsError::Incomplete`].
///
/// For a new node: exclusive, an `flock` on `dir/.lock` is held from the check to the end of
/// the creation, so nodes started together on one directory wait for the first, then load what
/// it created. Atomic: each file is written as `NAME.tmp`, fsynced and renamed, `token` last,
/// so a directory holding `token` was created whole. One without `token` (some files, or
/// `.tmp` leftovers) is a creation cut short and is created again: the node has no log yet,
/// so nothing can have used these secrets.
pub fn ensure_node_secrets(dir: &Path, existing_log: Option<&Path>) -> Result<bool, SecretsError> {
    match existing_log {
        None => ensure(dir, true),
        Some(log) => check_existing(dir, log).map(|()| false),
    }
}

/// The check of [`ensure_node_secrets`] for a node that has a log: creates nothing.
fn check_existing(dir: &Path, log: &Path) -> Result<(), SecretsError> {
    let none = || SecretsError::NoneForExistingNode {
        dir: dir.to_path_buf(),
        log: log.to_path_buf(),
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(none()),
        Err(e) => return Err(read_failed(dir, e)),
        Ok(_) => {}
    }
    // A new node sharing `dir` may be creating the set right now: wait for it under the lock
    // it holds. No lock file means no creation has ever begun here, and none is made.
    let lock_path = dir.join(LOCK_FILE);
    let _lock = match std::fs::OpenOptions::new().read(true).open(&lock_path) {
        Ok(lock) => {
            // Shared: checkers do not wait for each other, only for a creator. Released when
            // `_lock` is dropped, or by the kernel if the process dies.
            lock.lock_shared().map_err(io_err(&lock_path))?;
            Some(lock)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(&lock_path)(e)),
    };
    let contents = Contents::read(dir)?;
    if contents.present.iter().all(|p| *p) {
        return Ok(());
    }
    if !contents.present.iter().any(|p| *p) && contents.leftovers.is_empty() {
        return Err(none());
    }
    Err(SecretsError::Incomplete {
        dir: dir.to_path_buf(),
        missing: contents.missing(),
    })
}

/// Creates the secrets in `dir` if none are there; leaves complete secrets alone. A creation
/// cut short is created again when `redo_cut_short`, refused otherwise.
fn ensure(dir: &Path, redo_cut_short: bool) -> Result<bool, SecretsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| match source.kind() {
            // A file where the directory (or one of its parents) should be.
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
                SecretsError::NotADirectory {
                    dir: dir.to_path_buf(),
                }
            }
            _ => SecretsError::CreateDir {
                dir: dir.to_path_buf(),
                source,
            },
        })?;
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    // Released when `lock` is dropped, or by the kernel if the process dies.
    lock.lock().map_err(io_err(&lock_path))?;
    let contents = Contents::read(dir)?;
    if contents.present.iter().all(|p| *p) {
        return Ok(false);
    }
    let token_present = contents.present[FILES.len() - 1];
    let untouched = !contents.present.iter().any(|p| *p) && contents.leftovers.is_empty();
    if !untouched {
        if token_present || !redo_cut_short {
            return Err(SecretsError::Incomplete {
                dir: dir.to_path_buf(),
                missing: contents.missing(),
            });
        }
        // A creation cut short, where nothing has used the secrets yet: start it again.
        for (f, p) in FILES.iter().zip(&contents.present) {
            if *p {
                let path = dir.join(f);
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        for path in &contents.leftovers {
            std::fs::remove_file(path).map_err(io_err(path))?;
        }
    }
    create(dir)?;
    drop(lock);
    Ok(true)
}

/// Generates and writes the five files into `dir`, which holds none of them.
fn create(dir: &Path) -> Result<(), SecretsError> {
    let generate = |e: rcgen::Error| SecretsError::Generate(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tideline cluster CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);

    let server_key = rcgen::KeyPair::generate().map_err(generate)?;
    let mut params = rcgen::CertificateParams::new(vec![
        SERVER_NAME.to_string(),
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(generate)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tideline node");
    let server_cert = params.signed_by(&server_key, &issuer).map_err(generate)?;

    let mut token = [0u8; 32];
    rand::fill(&mut token);
    let token_hex: String = token.iter().map(|b| format!("{b:02x}")).collect();

    write_file(dir, "ca.pem", ca_cert.pem().as_bytes(), false)?;
    #[cfg(test)]
    tests::after_first_file(dir);
    write_file(
        dir,
        "ca.key.pem",
        issuer.key().serialize_pem().as_bytes(),
        true,
    )?;
    write_file(dir, "server.pem", server_cert.pem().as_bytes(), false)?;
    write_file(
        dir,
        "server.key.pem",
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    // The four renames are durable before `token`, the commit point, appears.
    sync_dir(dir)?;
    write_file(dir, "token", format!("{token_hex}\n").as_bytes(), true)?;
    sync_dir(dir)
}

/// The files of `dir` that a node loads (or keeps: `ca.key.pem`) and that are missing, in
/// the order they are created; empty when the set is whole.
pub fn missing_files(dir: &Path) -> Vec<&'static str> {
    FILES
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .copied()
        .collect()
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, SecretsError> {
    let pem = std::fs::read(path).map_err(|e| read_failed(path, e))?;
    CertificateDer::from_pem_slice(&pem).map_err(|e| SecretsError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

/// Reads a token file: the first line, trimmed.
pub fn read_token(path: &Path) -> Result<String, SecretsError> {
    let text = std::fs::read_to_string(path).map_err(|e| read_token_failed(path, e))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(SecretsError::BadPem {
            path: path.to_path_buf(),
            what: "token",
            reason: "the file is empty".into(),
        });
    }
    Ok(token)
}

/// Loads what a server needs from `dir`. Refuses an empty or unparsable file, and a node
/// certificate that `dir/ca.pem` did not issue (clients trusting that CA would take the node
/// for another cluster's).
pub fn load_server(dir: &Path) -> Result<ServerSecrets, SecretsError> {
    let damaged = |e: SecretsError| match e {
        SecretsError::BadPem { path, what, reason } => SecretsError::Damaged { path, what, reason },
        e => e,
    };
    let cert = read_cert(&dir.join("server.pem")).map_err(damaged)?;
    let ca = read_cert(&dir.join("ca.pem")).map_err(damaged)?;
    let key_path = dir.join("server.key.pem");
    let key_pem = std::fs::read(&key_path).map_err(|e| read_failed(&key_path, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| SecretsError::Damaged {
        path: key_path.clone(),
        what: "private key",
        reason: e.to_string(),
    })?;
    let token = read_token(&dir.join("token")).map_err(damaged)?;
    check_issued_by(dir, &cert, &ca)?;
    Ok(ServerSecrets {
        chain: vec![cert, ca],
        key: Arc::new(key),
        token,
    })
}

/// Checks `cert` the way a client does: issued by `ca`, for [`SERVER_NAME`].
fn check_issued_by(
    dir: &Path,
    cert: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<(), SecretsError> {
    use rustls::client::danger::ServerCertVerifier;
    let foreign = |reason: String| SecretsError::ForeignCertificate {
        dir: dir.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| foreign(format!("ca.pem is not a usable CA: {e}")))?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| foreign(e.to_string()))?;
    let name = rustls_pki_types::ServerName::try_from(SERVER_NAME)
        .map_err(|e| SecretsError::Tls(e.to_string()))?;
    verifier
        .verify_server_cert(cert, &[], &name, &[], rustls_pki_types::UnixTime::now())
        .map(|_| ())
        .map_err(|e| foreign(e.to_string()))
}

/// Loads what a client needs from a CA file and a token file.
pub fn load_client(ca_file: &Path, token_file: &Path) -> Result<ClientSecrets, SecretsError> {
    Ok(ClientSecrets {
        ca: read_cert(ca_file)?,
        token: read_token(token_file)?,
        origin: ca_file.display().to_string(),
    })
}

/// Loads what a client needs from a secrets directory.
pub fn load_client_dir(dir: &Path) -> Result<ClientSecrets, SecretsError> {
    let ca = dir.join("ca.pem");
    // Only "not found" is missing: `exists()` would also say so for a directory this user
    // may not read, or a path that is a file, sending the operator to look for another one.
    match std::fs::metadata(&ca) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SecretsError::Missing {
                dir: dir.to_path_buf(),
            });
        }
        Err(e) => return Err(probe_failed(&ca, e)),
    }
    let mut secrets = load_client(&ca, &dir.join("token"))?;
    secrets.origin = dir.display().to_string();
    Ok(secrets)
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Compares two tokens in time independent of where they differ.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
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
}
