//! `load`: escaped `KEY<TAB>VALUE` lines from stdin, committed in batched transactions with a
//! progress bar.
//!
//! Owns: parsing and checking lines against the node's limits, batching, commits in flight,
//! and the report of which input lines were committed. Must never: send anything after a bad
//! line or a failed batch, or report a line committed that was not.

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tideline_stream::WriteOp;

use super::escape::unescape;
use super::output::outln;
use super::{NodeArgs, runtime};

/// Arguments of `load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Tree.
    #[arg(long, default_value = "default")]
    tree: String,
    /// Puts per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Bytes of keys and values per transaction (a larger single line gets one of its own);
    /// at most 16 MiB, what one message carries.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1..=(16 << 20)))]
    batch_bytes: u64,
    /// Transactions in flight at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// All lines in one transaction, or nothing: refused (nothing committed) above 16 MiB of
    /// keys, values and 64 bytes per line.
    #[arg(long, conflicts_with_all = ["batch", "batch_bytes", "parallel"])]
    atomic: bool,
}

/// One batch of `load`: the input lines it covers (blank lines included) and its writes.
struct LoadBatch {
    lines: (u64, u64),
    ops: Vec<WriteOp>,
}

/// Checks one input line against the node's limits; the error names what to change.
fn parse_load_line(
    line: &[u8],
    tree: &str,
    limits: (usize, usize),
) -> Result<(WriteOp, usize), String> {
    let Some(tab) = line.iter().position(|&b| b == b'\t') else {
        return Err("expected KEY<TAB>VALUE, found no tab".into());
    };
    let key = unescape(&line[..tab]).map_err(|e| format!("key: {e}"))?;
    let value = unescape(&line[tab + 1..]).map_err(|e| format!("value: {e}"))?;
    if key.is_empty() {
        return Err("empty key: keys must be 1 byte or longer".into());
    }
    if key.len() > limits.0 {
        return Err(format!(
            "key of {} bytes exceeds the node's limit of {} bytes (serve --key-bytes-max)",
            key.len(),
            limits.0
        ));
    }
    if value.len() > limits.1 {
        return Err(format!(
            "value of {} bytes exceeds the node's limit of {} bytes (serve --value-bytes-max)",
            value.len(),
            limits.1
        ));
    }
    // What the op costs in a message: its bytes plus a bound on its envelope.
    let bytes = key.len() + value.len() + tree.len() + OP_ENVELOPE_BYTES;
    let op = WriteOp::Put {
        tree: tree.to_string(),
        key,
        value,
    };
    Ok((op, bytes))
}

/// A bound on the bytes one put adds to a commit message beyond its tree, key and value.
const OP_ENVELOPE_BYTES: usize = 64;

/// Most bytes of one `load --atomic` transaction (keys, values, trees and 64 bytes per line):
/// what one message carries, less room for the largest key.
const ATOMIC_BYTES_MAX: u64 = 16 << 20;

/// The node's key and value limits from its status (older nodes: the largest allowed).
async fn node_limits(client: &tideline_stream::Client) -> anyhow::Result<(usize, usize)> {
    let json = client.status().await?;
    let status: serde_json::Value =
        serde_json::from_str(&json).context("the node sent a status that is not JSON")?;
    let get = |name: &str, default: usize| {
        status["limits"][name]
            .as_u64()
            .map_or(default, |n| n as usize)
    };
    Ok((
        get("key_bytes_max", 65_535),
        get("value_bytes_max", 16 << 20),
    ))
}

/// A batch whose commit failed: its lines, whether it may be committed all the same (the
/// request went out and its answer was lost, or the node stopped on a failure), and why.
struct Failed {
    lines: (u64, u64),
    in_doubt: bool,
    error: tideline_stream::ClientError,
}

impl Failed {
    fn of(lines: (u64, u64), error: tideline_stream::ClientError) -> Failed {
        use tideline_stream::{ClientError, ErrorCode};
        let in_doubt = matches!(
            error,
            ClientError::Connection(_)
                | ClientError::Wire(_)
                | ClientError::Server {
                    code: ErrorCode::Unavailable | ErrorCode::Internal,
                    ..
                }
        );
        Failed {
            lines,
            in_doubt,
            error,
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (first, last) = self.lines;
        if self.in_doubt {
            write!(
                f,
                "lines {first}-{last} (one transaction; its outcome is unknown: it may or may \
                 not have been committed): {}",
                self.error
            )
        } else {
            write!(
                f,
                "lines {first}-{last} (one transaction, not committed): {}",
                self.error
            )
        }
    }
}

/// What a finished commit task of `load` gave.
type LoadResult = Result<Result<((u64, u64), usize, String), Failed>, tokio::task::JoinError>;

/// Records one finished batch (`lines`: the input lines it covered); returns the keys it
/// committed.
fn record(
    lines: (u64, u64),
    r: LoadResult,
    committed: &mut Vec<((u64, u64), String)>,
    in_doubt: &mut Vec<(u64, u64)>,
    failure: &mut Option<String>,
) -> u64 {
    match r {
        Ok(Ok((lines, n, gtid))) => {
            committed.push((lines, gtid));
            n as u64
        }
        Ok(Err(f)) => {
            if f.in_doubt {
                in_doubt.push(f.lines);
            }
            failure.get_or_insert(f.to_string());
            0
        }
        Err(e) => {
            // The task may have sent its commit before it ended.
            in_doubt.push(lines);
            failure.get_or_insert(format!(
                "lines {}-{} (one transaction; its outcome is unknown): commit task failed: {e}",
                lines.0, lines.1
            ));
            0
        }
    }
}

/// Line ranges as text: `1-2000, 3001-4000`.
fn ranges_text(ranges: &[(u64, u64)]) -> String {
    ranges
        .iter()
        .map(|(a, b)| format!("{a}-{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `load`: escaped `KEY<TAB>VALUE` lines from stdin in batched transactions. A bad line or a
/// failed batch stops the load: nothing more is sent, the batches in flight are waited for,
/// and the error says exactly which lines were committed. SIGINT or SIGTERM stops it the same
/// way (a second one stops the wait, leaving the batches still in flight in doubt) and exits
/// 128 + the signal's number, as a shell reports a command a signal ended.
pub fn load(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let result = rt.block_on(load_async(args));
    // The stdin reader may be blocked in a read that never ends (a terminal, or a pipe whose
    // writer outlives us) after a stop; it holds nothing that needs finishing.
    rt.shutdown_background();
    result
}

async fn load_async(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    // Installed before anything is sent, so no signal finds the default action (death with
    // no report) once a commit may be in flight.
    let mut signals = crate::signals::StopSignals::install()?;
    let client = std::sync::Arc::new(args.node.connect().await?);
    let limits = node_limits(&client).await?;
    let pb = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new_spinner();
        if let Ok(style) =
            ProgressStyle::with_template("{spinner} {pos} keys loaded ({per_sec}) {elapsed}")
        {
            pb.set_style(style);
        }
        pb
    } else {
        ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let parallel = args.parallel.max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<LoadBatch>(parallel);
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Read stdin on a blocking thread; commit on the runtime with bounded parallelism.
    let tree = args.tree.clone();
    let atomic = args.atomic;
    let batch = if atomic {
        usize::MAX
    } else {
        args.batch.max(1)
    };
    let batch_bytes = if atomic {
        ATOMIC_BYTES_MAX
    } else {
        args.batch_bytes
    } as usize;
    let stop = failed.clone();
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let stdin = std::io::stdin().lock();
        let mut ops = Vec::with_capacity(batch.min(4096));
        let mut bytes = 0usize;
        let mut first_line = 1u64;
        let send = |ops: Vec<WriteOp>, lines: (u64, u64)| {
            !stop.load(std::sync::atomic::Ordering::SeqCst)
                && tx.blocking_send(LoadBatch { lines, ops }).is_ok()
        };
        let mut last_line = 0u64;
        for (n, line) in stdin.split(b'\n').enumerate() {
            let n = n as u64 + 1;
            last_line = n;
            let line = line.map_err(|e| format!("line {n}: cannot read stdin: {e}"))?;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.is_empty() {
                continue;
            }
            let (op, size) = match parse_load_line(line, &tree, limits) {
                Ok(x) => x,
                Err(e) => {
                    // Everything before the bad line goes (with --atomic: nothing); nothing
                    // after it.
                    if !atomic
                        && !ops.is_empty()
                        && !send(std::mem::take(&mut ops), (first_line, n - 1))
                    {
                        return Ok(());
                    }
                    return Err(format!("line {n}: {e}"));
                }
            };
            if !ops.is_empty() && bytes + size > batch_bytes {
                if atomic {
                    return Err(format!(
                        "line {n}: --atomic input passes {ATOMIC_BYTES_MAX} bytes (keys, \
                         values and {OP_ENVELOPE_BYTES} bytes per line), more than one \
                         transaction carries; load without --atomic to commit in batches"
                    ));
                }
                if !send(std::mem::take(&mut ops), (first_line, n - 1)) {
                    return Ok(());
                }
                first_line = n;
                bytes = 0;
            }
            ops.push(op);
            bytes += size;
            if ops.len() >= batch {
                if !send(std::mem::take(&mut ops), (first_line, n)) {
                    return Ok(());
                }
                first_line = n + 1;
                bytes = 0;
            }
        }
        if !ops.is_empty() {
            let _ = send(ops, (first_line, last_line));
        }
        Ok(())
    });
    let mut inflight = tokio::task::JoinSet::new();
    // The input lines of each batch in flight, by task.
    let mut inflight_lines: std::collections::HashMap<tokio::task::Id, (u64, u64)> =
        std::collections::HashMap::new();
    let mut loaded = 0u64;
    let mut txns = 0u64;
    // Committed line ranges with their GTIDs, and the first failure.
    let mut committed: Vec<((u64, u64), String)> = Vec::new();
    let mut failure: Option<String> = None;
    // Line ranges of batches whose outcome is unknown.
    let mut in_doubt: Vec<(u64, u64)> = Vec::new();
    // The signal that stopped the load: its name and exit code.
    let mut interrupted: Option<(&'static str, u8)> = None;
    // Transactions given up on by a signal during the wait for those in flight.
    let mut abandoned = 0usize;
    // Records a finished commit task.
    let mut finish = |joined: Result<(tokio::task::Id, _), tokio::task::JoinError>,
                      inflight_lines: &mut std::collections::HashMap<_, _>,
                      committed: &mut Vec<_>,
                      in_doubt: &mut Vec<_>,
                      failure: &mut Option<String>| {
        let (id, r) = match joined {
            Ok((id, r)) => (id, Ok(r)),
            Err(e) => (e.id(), Err(e)),
        };
        let lines = inflight_lines.remove(&id).unwrap_or((0, 0));
        let n = record(lines, r, committed, in_doubt, failure);
        loaded += n;
        txns += u64::from(n > 0);
        pb.set_position(loaded);
    };
    while failure.is_none() {
        tokio::select! {
            biased;
            sig = signals.recv() => {
                interrupted = Some(sig);
                break;
            }
            Some(joined) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                finish(joined, &mut inflight_lines, &mut committed, &mut in_doubt, &mut failure);
            }
            b = rx.recv(), if inflight.len() < parallel => {
                let Some(b) = b else { break };
                let client = client.clone();
                let lines = b.lines;
                let task = inflight.spawn(async move {
                    let n = b.ops.len();
                    let (first, last) = b.lines;
                    let (_, gtid) = client
                        .commit(b.ops)
                        .await
                        .map_err(|e| Failed::of((first, last), e))?;
                    Ok::<_, Failed>((b.lines, n, gtid))
                });
                inflight_lines.insert(task.id(), lines);
            }
        }
    }
    // After a failure or a signal send nothing more: stop the reader (batches it queued were
    // never sent), then wait for what is in flight. A signal during that wait gives up on it:
    // what is still in flight is in doubt.
    let stopped_early = failure.is_some() || interrupted.is_some();
    failed.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(rx);
    while !inflight.is_empty() {
        tokio::select! {
            biased;
            sig = signals.recv() => {
                interrupted.get_or_insert(sig);
                abandoned = inflight_lines.len();
                in_doubt.extend(inflight_lines.drain().map(|(_, lines)| lines));
                // Dropping the tasks cancels their commits wherever they are: sent or not.
                inflight.abort_all();
                break;
            }
            Some(joined) = inflight.join_next_with_id() => {
                finish(joined, &mut inflight_lines, &mut committed, &mut in_doubt, &mut failure);
            }
        }
    }
    // A reader stopped early may be blocked reading stdin for good; its outcome no longer
    // matters. Otherwise it has ended (it closed the channel) and may have failed.
    let read = if stopped_early || interrupted.is_some() {
        Ok(())
    } else {
        reader.await.context("stdin reader failed")?
    };
    pb.finish_and_clear();
    if let Ok(client) = std::sync::Arc::try_unwrap(client) {
        client.close().await;
    }
    committed.sort_by_key(|(lines, _)| *lines);
    let last_gtid = committed
        .iter()
        .map(|(_, g)| g.clone())
        .max_by_key(|g| {
            g.rsplit_once(':')
                .and_then(|(_, n)| n.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .unwrap_or_default();
    let signal = interrupted.map(|(name, _)| match abandoned {
        0 => format!("interrupted by {name}"),
        n => format!(
            "interrupted by {name}; stopped waiting for the {n} transaction(s) still in flight"
        ),
    });
    let cause = match (failure, read, signal) {
        (Some(f), _, Some(s)) => Some(format!("{f}; {s}")),
        (Some(f), _, None) => Some(f),
        (None, _, Some(s)) => Some(s),
        (None, Err(e), None) => Some(e),
        (None, Ok(()), None) => None,
    };
    if let Some(cause) = cause {
        let message = summary(&cause, &committed, loaded, &last_gtid, &mut in_doubt);
        let Some((_, code)) = interrupted else {
            bail!("{message}");
        };
        eprintln!("error: {message}");
        return Ok(ExitCode::from(code));
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {loaded} keys in {txns} transactions in {secs:.2}s ({:.0} keys/s)",
        loaded as f64 / secs.max(1e-9)
    );
    outln!(
        "{}",
        serde_json::json!({"keys": loaded, "transactions": txns, "last_gtid": last_gtid})
    )?;
    Ok(ExitCode::SUCCESS)
}

/// What a stopped load committed, after `cause`: the committed line ranges (`committed`
/// sorted by line), nothing else, and the ranges in doubt.
fn summary(
    cause: &str,
    committed: &[((u64, u64), String)],
    loaded: u64,
    last_gtid: &str,
    in_doubt: &mut [(u64, u64)],
) -> String {
    // Merge adjacent batches into line ranges.
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for ((a, b), _) in committed {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == *a => *end = *b,
            _ => ranges.push((*a, *b)),
        }
    }
    // Without batches in doubt, what is not confirmed was not committed.
    let rest = if in_doubt.is_empty() {
        "committed"
    } else {
        "confirmed"
    };
    let done = match ranges.as_slice() {
        [] => format!("nothing was {rest}"),
        [(1, end)] => format!(
            "lines 1-{end} committed ({loaded} keys, last GTID {last_gtid}); nothing after \
             line {end} was {rest}"
        ),
        _ => format!(
            "lines {} committed ({loaded} keys, last GTID {last_gtid}); nothing else was {rest}",
            ranges_text(&ranges)
        ),
    };
    if in_doubt.is_empty() {
        return format!("{cause}; {done}");
    }
    in_doubt.sort_unstable();
    format!(
        "{cause}; {done}; lines {} may or may not have been committed (the node's answer was \
         lost): read their keys back (`tideline get`) before loading them again",
        ranges_text(in_doubt)
    )
}
