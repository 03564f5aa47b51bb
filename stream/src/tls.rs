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

const FILES: [&str; 5] = [
    "ca.pem",
    "ca.key.pem",
    "server.pem",
    "server.key.pem",
    "token",
];

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
    /// Some files exist and others not.
    #[error(
        "secrets directory {dir} is incomplete (missing {missing}): restore it from a node of \
         the cluster, or empty it to create a new cluster"
    )]
    Incomplete {
        /// Directory.
        dir: PathBuf,
        /// Missing file names.
        missing: String,
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, data: &[u8], private: bool) -> Result<(), SecretsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Creates the secrets in `dir` if none are there; leaves complete secrets alone. Returns
/// whether they were created.
pub fn ensure_secrets(dir: &Path) -> Result<bool, SecretsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let present: Vec<bool> = FILES.iter().map(|f| dir.join(f).exists()).collect();
    if present.iter().all(|p| *p) {
        return Ok(false);
    }
    if present.iter().any(|p| *p) {
        let missing: Vec<&str> = FILES
            .iter()
            .zip(&present)
            .filter(|(_, p)| !**p)
            .map(|(f, _)| *f)
            .collect();
        return Err(SecretsError::Incomplete {
            dir: dir.to_path_buf(),
            missing: missing.join(", "),
        });
    }
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

    write_private(&dir.join("ca.pem"), ca_cert.pem().as_bytes(), false)?;
    write_private(
        &dir.join("ca.key.pem"),
        issuer.key().serialize_pem().as_bytes(),
        true,
    )?;
    write_private(&dir.join("server.pem"), server_cert.pem().as_bytes(), false)?;
    write_private(
        &dir.join("server.key.pem"),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_private(
        &dir.join("token"),
        format!("{token_hex}\n").as_bytes(),
        true,
    )?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(true)
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, SecretsError> {
    CertificateDer::from_pem_file(path).map_err(|e| SecretsError::BadPem {
        path: path.to_path_buf(),
        what: "certificate",
        reason: e.to_string(),
    })
}

/// Reads a token file: the first line, trimmed.
pub fn read_token(path: &Path) -> Result<String, SecretsError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
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

/// Loads what a server needs from `dir`.
pub fn load_server(dir: &Path) -> Result<ServerSecrets, SecretsError> {
    let cert = read_cert(&dir.join("server.pem"))?;
    let ca = read_cert(&dir.join("ca.pem"))?;
    let key_path = dir.join("server.key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| SecretsError::BadPem {
        path: key_path.clone(),
        what: "private key",
        reason: e.to_string(),
    })?;
    Ok(ServerSecrets {
        chain: vec![cert, ca],
        key: Arc::new(key),
        token: read_token(&dir.join("token"))?,
    })
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
    if !ca.exists() {
        return Err(SecretsError::Missing {
            dir: dir.to_path_buf(),
        });
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
