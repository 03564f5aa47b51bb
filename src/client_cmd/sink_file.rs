//! `sink file`: a pipeline from a node into a JSON-lines file (one change envelope per line),
//! until Ctrl-C or an error.
//!
//! Owns: turning the command line into a [`PipelineConfig`] and a [`FileConfig`], the progress
//! line, a clean stop. Must never: store positions itself (the file sink keeps its position
//! beside the file, written after the data is synced), or print anything on stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tideline_connectors::pipeline::{self, PipelineError};
use tideline_connectors::sink::file::{FileConfig, FileSink};
use tideline_connectors::{Filter, PipelineConfig, PipelineState, StartFrom};
use tideline_consumers::TailStart;

use super::{NodeArgs, runtime};
use crate::position::StartPosition;

/// Where a new file sink starts: `bootstrap` or a tail position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStart(StartFrom);

impl FromStr for SinkStart {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "bootstrap" {
            return Ok(SinkStart(StartFrom::Bootstrap));
        }
        let start = s.parse::<StartPosition>().map_err(|e| {
            format!("{e}; or bootstrap (a copy of the node's current state, then its changes)")
        })?;
        Ok(SinkStart(StartFrom::Tail(match start {
            StartPosition::Earliest => TailStart::Earliest,
            StartPosition::Latest => TailStart::Latest,
            StartPosition::Offset(o) => TailStart::Offset(o.get()),
            StartPosition::Gtid(s) => TailStart::Gtid(s),
        })))
    }
}

/// Arguments of `sink file`.
#[derive(Debug, Args)]
pub struct SinkFileArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The JSON-lines file to append change envelopes to. Rotated files are FILE.1, FILE.2,
    /// ... (oldest first); the position is kept in FILE.position. Its directory must exist.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Where to start when FILE.position holds no position yet: bootstrap (the node's
    /// current state as `read` envelopes, then its changes), earliest, latest, offset:N or
    /// gtid:SET. A stored position always wins: the sink resumes right after it.
    /// [default: earliest]
    #[arg(long, value_name = "POSITION")]
    from: Option<SinkStart>,
    /// Only this tree (repeat for several).
    #[arg(long, value_name = "T")]
    tree: Vec<String>,
    /// Only keys starting with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Only these op kinds, comma-separated: put, delete, merge, create_tree, drop_tree.
    #[arg(long, value_name = "KINDS", value_delimiter = ',')]
    ops: Vec<String>,
    /// Rotate FILE once it holds this many bytes (0: never).
    #[arg(long, value_name = "BYTES", default_value_t = FileConfig::ROTATE_BYTES_DEFAULT)]
    rotate_bytes: u64,
    /// Write (and sync) a batch once it holds this many changes, or after --batch-delay-ms.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    batch_changes: usize,
    /// The longest a change waits for its batch, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    batch_delay_ms: u64,
    /// Keep trying while the node cannot be reached at start, instead of giving up after
    /// --timeout-ms. (Once connected, the sink always reconnects.)
    #[arg(long)]
    retry: bool,
}

const OP_KINDS: [&str; 5] = ["put", "delete", "merge", "create_tree", "drop_tree"];

/// `sink file`.
pub fn sink_file(args: &SinkFileArgs) -> anyhow::Result<ExitCode> {
    for op in &args.ops {
        if !OP_KINDS.contains(&op.as_str()) {
            anyhow::bail!(
                "--ops: unknown op kind `{op}`; use some of {}",
                OP_KINDS.join(", ")
            );
        }
    }
    if args.batch_changes == 0 {
        anyhow::bail!("--batch-changes must be at least 1");
    }
    let client = args.node.client_config()?;
    let file_cfg = FileConfig {
        path: args.out.clone(),
        rotate_bytes: args.rotate_bytes,
    };
    let name = "sink-file";
    let sink = FileSink::new(file_cfg, name).map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let mut cfg = PipelineConfig::new(name, args.node.addr(), client.clone());
    cfg.from = args
        .from
        .clone()
        .map_or(StartFrom::Tail(TailStart::Earliest), |s| s.0);
    let position = PathBuf::from(format!("{}.position", args.out.display()));
    if args.from.is_some() && position.exists() {
        eprintln!(
            "note: --from is ignored if {} holds a position: the sink resumes right after it \
             (move the file, its rotated files and the position away to start over)",
            position.display()
        );
    }
    cfg.filter = Filter {
        trees: args.tree.clone(),
        prefix: args.prefix.as_ref().map(|p| p.as_bytes().to_vec()),
        ops: args.ops.clone(),
    };
    cfg.batch_changes = args.batch_changes;
    cfg.batch_delay = Duration::from_millis(args.batch_delay_ms);
    runtime()?.block_on(async {
        if !args.retry {
            let probe = tideline_stream::Client::connect(args.node.addr(), client)
                .await
                .map_err(|e| {
                    if e.is_retryable() {
                        anyhow::anyhow!(
                            "{e}; sink file gave up after --timeout-ms {} (pass --retry to keep \
                             trying until the node answers)",
                            args.node.cred.timeout_ms
                        )
                    } else {
                        anyhow::Error::from(e)
                    }
                })?;
            probe.close().await;
        }
        let (status, mut task) = pipeline::spawn(cfg, Box::new(sink));
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        // Made once: a listener made anew in each `select!` misses a signal landing between two.
        let mut signals = crate::signals::StopSignals::install()?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let result = loop {
            tokio::select! {
                r = &mut task => break Some(r),
                _ = signals.recv() => break None,
                _ = tick.tick() => bar.set_message(progress_line(&status.get())),
            }
        };
        bar.finish_and_clear();
        match result {
            // Stopping between two awaits loses and repeats nothing: the sink stores its data
            // and position together.
            None => {
                task.abort();
                let _ = task.await;
                let s = status.get();
                eprintln!(
                    "sink file stopped: {} changes written this run; {}",
                    s.changes_total,
                    where_it_stands(&s)
                );
                Ok(ExitCode::SUCCESS)
            }
            Some(Ok(Ok(()))) => Ok(ExitCode::SUCCESS),
            Some(Ok(Err(e))) => Err(stop_error(e, &args.out)),
            Some(Err(e)) => Err(anyhow::anyhow!("the pipeline task failed: {e}")),
        }
    })
}

fn where_it_stands(s: &tideline_connectors::PipelineStatus) -> String {
    match &s.position {
        Some(p) => format!(
            "the file holds changes through offset {} of node {} (GTIDs {})",
            p.offset, p.server_uuid, p.gtids
        ),
        None => "no position stored yet".into(),
    }
}

fn stop_error(e: PipelineError, out: &std::path::Path) -> anyhow::Error {
    match e {
        PipelineError::FilterWidened {
            stored, configured, ..
        } => {
            let stored = filter_flags(&stored);
            anyhow::anyhow!(
                "the filter changed: {} was written with {stored}, and its position is past \
                 the changes that filter left out; this run's filter ({}) lets such changes \
                 through, but would resume after them, so they would be missing from the \
                 file. Run again with {stored} (or a narrower filter); or, \
                 to have everything the new filter lets through, write a new --out file with \
                 --from bootstrap (the node's current state, then its changes) or --from \
                 earliest (its whole log, if the node still holds it)",
                out.display(),
                filter_flags(&configured)
            )
        }
        e => anyhow::anyhow!("{e}"),
    }
}

/// The flags of `sink file` that give `f`: `--tree a --prefix us --ops put,delete`.
fn filter_flags(f: &Filter) -> String {
    let mut flags: Vec<String> = f.trees.iter().map(|t| format!("--tree {t}")).collect();
    if let Some(p) = &f.prefix {
        flags.push(format!("--prefix {}", String::from_utf8_lossy(p)));
    }
    if !f.ops.is_empty() {
        flags.push(format!("--ops {}", f.ops.join(",")));
    }
    if flags.is_empty() {
        "no --tree, --prefix or --ops".into()
    } else {
        flags.join(" ")
    }
}

fn progress_line(s: &tideline_connectors::PipelineStatus) -> String {
    let mut line = format!(
        "{} · offset {} · {} txns, {} changes · {:.0} changes/s · lag {} txns",
        s.state.as_str(),
        s.position.as_ref().map_or(0, |p| p.offset),
        s.txns_total,
        s.changes_total,
        s.rate,
        s.lag_txns,
    );
    if s.state == PipelineState::Bootstrapping
        && let Some(b) = &s.bootstrap
    {
        line.push_str(&format!(" · bootstrap {}%", b["percent"]));
    }
    if let Some(e) = &s.last_error {
        line.push_str(&format!(" · {e}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse_with_bootstrap_and_errors_name_every_form() {
        assert_eq!(
            "bootstrap".parse::<SinkStart>().unwrap().0,
            StartFrom::Bootstrap
        );
        assert_eq!(
            "offset:5".parse::<SinkStart>().unwrap().0,
            StartFrom::Tail(TailStart::Offset(5))
        );
        let e = "soon".parse::<SinkStart>().unwrap_err();
        assert!(e.contains("earliest") && e.contains("bootstrap"), "{e}");
    }

    #[test]
    fn filters_show_as_the_flags_that_give_them() {
        let f = Filter {
            trees: vec!["a".into(), "b".into()],
            prefix: Some(b"us".to_vec()),
            ops: vec!["put".into(), "delete".into()],
        };
        assert_eq!(
            filter_flags(&f),
            "--tree a --tree b --prefix us --ops put,delete"
        );
        assert_eq!(
            filter_flags(&Filter::default()),
            "no --tree, --prefix or --ops"
        );
    }
}
