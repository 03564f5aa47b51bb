//! `tail`: a node's changes from a position, one JSON line per transaction.
//!
//! Owns: turning `--from` into a start, the optional checkpoint file and slot, `--limit`.
//! Must never: print a transaction twice across a resume from its checkpoint, or store a
//! checkpoint past what it has printed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use futures_util::StreamExt;
use tideline_consumers::{FileCheckpoint, TailConfig, TailStart, tail};

use super::{NodeArgs, runtime};
use crate::position::StartPosition;
use crate::render;

/// Arguments of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Where to start: earliest, latest, offset:N or gtid:SET.
    #[arg(long, value_name = "POSITION")]
    from: StartPosition,
    /// Only this tree.
    #[arg(long)]
    tree: Option<String>,
    /// Only keys starting with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Exit after this many transactions delivered (after filters).
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// A named slot on the node that holds the log for this consumer. While another live
    /// consumer uses it, the node refuses it: tail retries for 20 s (a consumer whose
    /// connection died keeps its slot until the node's idle timeout), then exits 1.
    #[arg(long, value_name = "NAME")]
    slot: Option<String>,
    /// Resume from (and keep) a position in this file across restarts of `tail`. A position
    /// saved there wins over --from.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Keep trying while the node cannot be reached at start, instead of giving up after
    /// --timeout-ms. (Once connected, a tail always reconnects.) A --slot in use by another
    /// live consumer still ends tail after 20 s.
    #[arg(long)]
    retry: bool,
}

/// `tail`: one JSON line per transaction.
pub fn tail_cmd(args: &TailArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let cfg = args.node.client_config()?;
        let start = match &args.from {
            StartPosition::Earliest => TailStart::Earliest,
            StartPosition::Latest => TailStart::Latest,
            StartPosition::Offset(o) => TailStart::Offset(o.get()),
            StartPosition::Gtid(s) => TailStart::Gtid(s.clone()),
        };
        let mut tcfg = TailConfig::new(args.node.node.clone(), cfg.clone(), start);
        tcfg.tree = args.tree.clone();
        tcfg.prefix = args.prefix.as_ref().map(|p| p.as_bytes().to_vec());
        tcfg.slot = args.slot.clone();
        if let Some(path) = &args.checkpoint {
            use tideline_consumers::Checkpoint as _;
            if let Ok(Some(pos)) = FileCheckpoint::new(path).load() {
                eprintln!(
                    "note: --from {} is ignored: resuming after offset {} of node {} from \
                     checkpoint {} (delete the file to start from --from)",
                    args.from,
                    pos.offset,
                    pos.server_uuid,
                    path.display()
                );
            }
        }
        if !args.retry {
            // The first connection must work within --timeout-ms; later ones are retried.
            let probe = tideline_stream::Client::connect(&args.node.node, cfg.clone())
                .await
                .map_err(|e| {
                    if e.is_retryable() {
                        anyhow::anyhow!(
                            "{e}; tail gave up after --timeout-ms {} (pass --retry to keep \
                             trying until the node answers)",
                            args.node.cred.timeout_ms
                        )
                    } else {
                        anyhow::Error::from(e)
                    }
                })?;
            probe.close().await;
        }
        let checkpoint = args
            .checkpoint
            .as_ref()
            .map(|p| Box::new(FileCheckpoint::new(p)) as Box<dyn tideline_consumers::Checkpoint>);
        let mut t = tail(tcfg, checkpoint);
        let mut out = std::io::stdout().lock();
        // Made once: a listener made anew in each `select!` misses a Ctrl-C landing while a
        // line is written (a full stdout pipe blocks the write).
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| anyhow::anyhow!("install the SIGINT handler: {e}"))?;
        let mut n = 0u64;
        // Every way out closes the tail: it saves the checkpoint, acks the slot up to what
        // was printed (what the checkpoint holds, with one) and closes the connection, so that
        // the node frees the slot at once for the next run instead of at its idle timeout.
        while args.limit.is_none_or(|l| n < l) {
            // The position after the last line printed: what the checkpoint may hold if the
            // next line cannot be written.
            let printed = t.position();
            let next = tokio::select! {
                next = t.next() => next,
                _ = sigint.recv() => break,
            };
            let Some(item) = next else { break };
            let txn = item?;
            let mut line = serde_json::to_vec(&render::txn_json(&txn))?;
            line.push(b'\n');
            if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                // This transaction was not printed: it is neither saved nor acked.
                t.close_at(printed).await?;
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    return Ok(ExitCode::SUCCESS);
                }
                return Err(e.into());
            }
            n += 1;
        }
        t.close().await?;
        Ok(ExitCode::SUCCESS)
    })
}
