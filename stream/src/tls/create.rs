//! Creating a secrets directory: the CA, the node certificate and the token, each file
//! written whole (temporary name, fsync, rename) under the directory's lock, and a creation
//! cut short finished or refused on the next start.
//!
//! Owns: [`ensure_secrets`], [`ensure_node_secrets`].
//!
//! Must never: create secrets beside an existing log (a node restarted without its
//! `--secrets` would become another cluster), or leave a half-written file under a final name.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::*;

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
