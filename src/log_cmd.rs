//! `tideline log dump|info|verify`: offline inspection of a node's log.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use tideline_wal::{Durability, Error, FileStorage, Offset, Reader, Storage, Wal, WalOptions};

use crate::position::StartPosition;
use crate::render;

/// Arguments of `log dump`.
#[derive(Debug, Args)]
pub struct DumpArgs {
    /// Data directory of the node (its log is in DATA/log).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Where to start: earliest, offset:N, or gtid:SET (records whose GTID is not in SET).
    #[arg(long, default_value = "earliest", value_name = "POSITION")]
    from: StartPosition,
    /// Stop after this many transactions.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

/// The log directory inside a data directory.
pub fn log_dir(data: &Path) -> PathBuf {
    data.join("log")
}

/// Refuses `dir` if it holds a node (its state store or cluster secrets): tools that write a
/// log of their own (`demo`, `bench`) must never append to a node's log, running or not.
pub fn refuse_node_dir(dir: &Path, tool: &str) -> anyhow::Result<()> {
    for part in ["store", "secrets"] {
        if dir.join(part).exists() {
            bail!(
                "{} holds a node (it has {part}/); `tideline {tool}` writes a log of its own and \
                 must not touch a node's: leave out --data/--dir to use a fresh temporary \
                 directory, or name an empty one",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Opens (or creates) the log of a data directory for writing.
pub fn open_log(data: &Path, durability: Durability) -> anyhow::Result<Arc<Wal>> {
    open_log_with(
        data,
        WalOptions {
            durability,
            ..WalOptions::default()
        },
    )
}

/// Opens (or creates) the log of a data directory with `opts`.
pub fn open_log_with(data: &Path, opts: WalOptions) -> anyhow::Result<Arc<Wal>> {
    let dir = log_dir(data);
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::new(&dir).with_context(|| format!("create {}", dir.display()))?);
    let wal =
        Wal::open(storage, opts).with_context(|| format!("open the log in {}", dir.display()))?;
    Ok(Arc::new(wal))
}

/// Opens an existing log read-only, safe beside a running node and on a copy it may only
/// read; refuses to create one. With `inspect_damaged`, a last segment damaged inside does not
/// refuse the open: the log ends before the damage and [`Wal::damage`] names it (the caller
/// must report it and fail).
pub fn open_existing(
    data: &Path,
    verify_on_open: bool,
    inspect_damaged: bool,
) -> anyhow::Result<Wal> {
    let dir = log_dir(data);
    let unreadable = || {
        format!(
            "cannot read the log directory {} (the log tools need read access to it and its \
             files, not write access)",
            dir.display()
        )
    };
    if !holds_segments(&dir).with_context(unreadable)? {
        // `--data DATA/log`, the log directory itself: say which directory to pass.
        let hint = match holds_segments(data) {
            Ok(true) => {
                let parent = match (data.file_name(), data.parent()) {
                    (Some(_), Some(p)) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    (Some(_), _) => PathBuf::from("."),
                    (None, _) => data.join(".."),
                };
                format!(
                    "; {} itself holds log segments: pass --data {} (the node's data \
                     directory)",
                    data.display(),
                    parent.display()
                )
            }
            // Only a hint: a directory that cannot be read gets none.
            Ok(false) | Err(_) => String::new(),
        };
        bail!(
            "no Tideline log in {}: pass the --data directory of a node (it holds \
             log/*.wal){hint}",
            dir.display()
        );
    }
    let storage: Arc<dyn Storage> = Arc::new(
        FileStorage::new(&dir).with_context(|| format!("open log directory {}", dir.display()))?,
    );
    let opts = WalOptions {
        verify_on_open,
        read_only: true,
        inspect_damaged,
        ..WalOptions::default()
    };
    Wal::open(storage, opts).with_context(|| format!("open the log in {}", dir.display()))
}

/// Whether `dir` holds log segment files (`*.wal`); a directory that does not exist holds
/// none.
pub fn holds_segments(dir: &Path) -> std::io::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        other => other?,
    };
    for entry in entries {
        let name = entry?.file_name();
        if tideline_wal::segment::parse_file_name(&name.to_string_lossy()).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

pub fn reader_for(wal: &Wal, from: &StartPosition) -> anyhow::Result<Reader> {
    Ok(match from {
        StartPosition::Earliest => wal.read_from(wal.first_offset())?,
        StartPosition::Offset(o) => wal.read_from(*o)?,
        StartPosition::Gtid(set) => wal.read_missing(set)?,
        StartPosition::Latest => {
            let next = Offset::new(wal.visible_offset() + 1).unwrap_or(Offset::FIRST);
            wal.read_from(next)?
        }
    })
}

/// The damage an inspecting open ended `wal` before, as the error to fail with: the readable
/// log ends at its visible offset.
fn damage_error(wal: &Wal) -> Option<anyhow::Error> {
    wal.damage().map(|d| {
        anyhow::Error::new(d).context(format!(
            "the log ends at offset {}, the last record before damage",
            wal.visible_offset()
        ))
    })
}

/// Writes `bytes` to stdout and flushes. A reader that went away (`| head`, `| true`) is the
/// normal end of the output, not an error: returns `Ok(false)` then.
fn write_stdout(out: &mut impl Write, bytes: &[u8]) -> anyhow::Result<bool> {
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::new(e).context("write to stdout")),
    }
}

/// `log dump`. Prints the records from `--from`; a damaged log is read up to the damage, and
/// a dump that reaches it (or starts past it) fails with the corruption error after printing
/// what lies before, so that a script never takes it for the whole log.
pub fn dump(args: &DumpArgs) -> anyhow::Result<ExitCode> {
    let wal = open_existing(&args.data, false, true)?;
    if let StartPosition::Offset(o) = &args.from
        && o.get() > wal.visible_offset() + 1
        && let Some(e) = damage_error(&wal)
    {
        return Err(e.context(format!("nothing can be read from offset {o}")));
    }
    let mut reader = reader_for(&wal, &args.from)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut n = 0u64;
    let mut line = Vec::new();
    let mut reached_end = false;
    while args.limit.is_none_or(|l| n < l) {
        let txn = match reader.next_txn() {
            Ok(Some(txn)) => txn,
            Ok(None) => {
                reached_end = true;
                break;
            }
            // Damage a reader meets (in a closed segment): what came before is printed, then
            // the damage is the error.
            Err(e) => {
                if !write_stdout(&mut out, &[])? {
                    return Ok(ExitCode::SUCCESS);
                }
                return Err(anyhow::Error::new(e)
                    .context(format!("read the log at offset {}", reader.next_offset())));
            }
        };
        // Whole lines into the output, so that one check sees a reader that went away (`|
        // head`) whichever write finds the pipe closed.
        line.clear();
        serde_json::to_writer(&mut line, &render::txn_json(&txn))?;
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            return Err(e.into());
        }
        n += 1;
    }
    if !write_stdout(&mut out, &[])? {
        return Ok(ExitCode::SUCCESS);
    }
    match damage_error(&wal) {
        Some(e) if reached_end => Err(e),
        // Stopped by --limit before the damage: all that was asked for is printed, and whole.
        Some(e) => {
            eprintln!("warning: {}", crate::error_line(&e));
            Ok(ExitCode::SUCCESS)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `log info`. On a log damaged in its last segment it shows the log up to the damage and the
/// damage (`damage`, null otherwise), then fails with it.
pub fn info(data: &Path) -> anyhow::Result<ExitCode> {
    let wal = open_existing(data, false, true)?;
    let stats = wal.stats();
    let segments: Vec<_> = stats
        .segments
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "first_offset": s.first_offset.get(),
                "bytes": s.bytes,
                "closed": s.closed,
                "gtids_before": s.gtids_before.to_string(),
            })
        })
        .collect();
    let recovery = wal.recovery_report();
    let damage = match wal.damage() {
        None => serde_json::Value::Null,
        Some(Error::Corrupt { file, byte, reason }) => {
            json!({ "file": file, "byte": byte, "reason": reason })
        }
        Some(other) => json!({ "reason": other.to_string() }),
    };
    let out = json!({
        "server_uuid": stats.server_uuid.to_string(),
        "first_offset": stats.first_offset.get(),
        "last_offset": stats.visible_offset,
        "durable_offset": stats.durable_offset,
        "gtid_executed": stats.gtids.to_string(),
        "total_bytes": stats.total_bytes,
        "segments": segments,
        "slots": wal.slots(),
        "recovery": {
            "truncated_bytes": recovery.truncated_bytes,
            "records_scanned": recovery.records_scanned,
            "elapsed_us": recovery.elapsed_us,
        },
        "damage": damage,
    });
    let mut text = serde_json::to_string_pretty(&out)?;
    text.push('\n');
    // A reader that went away ends the output, not the check: the damage is still reported.
    write_stdout(&mut std::io::stdout().lock(), text.as_bytes())?;
    match damage_error(&wal) {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `log verify`. Refuses a damaged log at open, as a writable open would, naming file and
/// byte; closed segments are checked too.
pub fn verify(data: &Path) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let wal = open_existing(data, true, false)?;
    let n = wal.verify()?;
    let stats = wal.stats();
    let text = format!(
        "ok: {n} records in {} segments ({} bytes), offsets {}..={}, verified in {:.2?}\n",
        stats.segments.len(),
        stats.total_bytes,
        stats.first_offset,
        stats.visible_offset,
        started.elapsed()
    );
    write_stdout(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
