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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

mod create;

pub use create::{ensure_node_secrets, ensure_secrets};

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
mod tests;
