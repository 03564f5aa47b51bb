//! `tideline connect --config FILE [--check]`: runs a file's pipelines (or checks them), and
//! the same pipelines inside a node (`serve --connect FILE`, [`spawn_all`]).
//!
//! Owns: starting pipelines from a checked [`ConnectFile`], the `--check` verdicts, the status
//! lines on stderr. Must never: store a position itself (only a sink does, with its data).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tideline_connectors::config::{ConnectFile, HostNode, PipelineSpec};
use tideline_connectors::pipeline::PipelineConfig;
use tideline_connectors::{PipelineError, PipelineState, SharedPipelineStatus, Sink};
use tideline_stream::Client;
use tokio::task::JoinHandle;

use crate::client_cmd::output::outln;
use crate::monitor_cmd::terminal_text;

/// How long `--check` waits for each source and sink.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running `connect` prints every pipeline's line (and on every state change).
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Arguments of `connect`.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The pipelines' TOML file (docs/OPERATIONS.md, "Connectors").
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the file and reach each pipeline's source and sink (creating the sink's
    /// position table if absent), moving no data; one verdict line per pipeline, exit 0 when
    /// all pass, 1 otherwise.
    #[arg(long)]
    check: bool,
}

/// A running pipeline.
pub type Running = (SharedPipelineStatus, JoinHandle<Result<(), PipelineError>>);

/// A pipeline built and not yet started.
type Built = (PipelineConfig, Box<dyn Sink>);

/// Starts every pipeline of `file` on the current runtime, or none: see [`build_all`]. A node
/// running the file passes itself as `host`: the source of a pipeline whose `[source]` names
/// no node, and the secrets of one that names none.
pub fn spawn_all(file: &ConnectFile, host: Option<HostNode<'_>>) -> anyhow::Result<Vec<Running>> {
    Ok(spawn_built(build_all(file, host)?))
}

/// Every pipeline's settings and sink, built before any pipeline starts: a mistake found
/// only here (a sink URL scheme, a name a sink refuses, missing secrets) in any pipeline
/// is returned with its file and line, and nothing has started ("nothing starts",
/// docs/OPERATIONS.md). A pipeline started first would already have opened its sink (its
/// files, its position table) when a later one is refused.
fn build_all(file: &ConnectFile, host: Option<HostNode<'_>>) -> anyhow::Result<Vec<Built>> {
    file.pipelines
        .iter()
        .map(|p| {
            p.build(host)
                .map_err(|e| anyhow::anyhow!("{e} (docs/OPERATIONS.md, \"Connectors\")"))
        })
        .collect()
}

fn spawn_built(built: Vec<Built>) -> Vec<Running> {
    built
        .into_iter()
        .map(|(cfg, sink)| tideline_connectors::pipeline::spawn(cfg, sink))
        .collect()
}

/// `connect`.
pub fn connect(args: &ConnectArgs) -> anyhow::Result<ExitCode> {
    let file = ConnectFile::load(&args.config)
        .map_err(|e| anyhow::anyhow!("{e} (docs/OPERATIONS.md, \"Connectors\")"))?;
    let runtime = crate::client_cmd::runtime()?;
    if args.check {
        return runtime.block_on(check(&file));
    }
    runtime.block_on(run(&file))
}

async fn check(file: &ConnectFile) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    for p in &file.pipelines {
        match check_one(p).await {
            Ok(verdict) => outln!("pipeline {}: ok: {verdict}", terminal_text(&p.name))?,
            Err(e) => {
                ok = false;
                outln!("pipeline {}: FAILED: {e}", terminal_text(&p.name))?;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check_one(p: &PipelineSpec) -> Result<String, String> {
    let (cfg, mut sink) = p.build(None).map_err(|e| e.to_string())?;
    let source = match tokio::time::timeout(
        CHECK_TIMEOUT,
        Client::connect(&cfg.addr, cfg.client.clone()),
    )
    .await
    {
        Err(_) => {
            return Err(format!(
                "source {}: no answer in {CHECK_TIMEOUT:?}",
                cfg.addr
            ));
        }
        Ok(Err(e)) => return Err(format!("source {}: {e}", cfg.addr)),
        Ok(Ok(c)) => {
            let uuid = c.server_uuid();
            c.close().await;
            uuid
        }
    };
    let stored = match tokio::time::timeout(CHECK_TIMEOUT, sink.open()).await {
        Err(_) => {
            return Err(format!(
                "sink {}: no answer in {CHECK_TIMEOUT:?}",
                sink.describe()
            ));
        }
        Ok(Err(e)) => return Err(format!("sink {}: {}", sink.describe(), e.message())),
        Ok(Ok(s)) => s,
    };
    // The pipeline refuses to start from a position it did not write, or from one that its
    // filter widens: say so here, as it would.
    let resumes = tideline_connectors::pipeline::resume_point(
        &sink.describe(),
        stored.as_deref(),
        &cfg.filter,
    )
    .map_err(|e| e.to_string())?;
    Ok(format!(
        "source {} ({source}), sink {} ({})",
        cfg.addr,
        sink.describe(),
        match resumes {
            Some(_) => "holds a position: resumes there",
            None => "holds no position: starts from `from`",
        }
    ))
}

async fn run(file: &ConnectFile) -> anyhow::Result<ExitCode> {
    let built = build_all(file, None)?;
    // Made once: a listener made anew in each `select!` misses a signal landing between two.
    // Made before any pipeline starts, so that failing here leaves none running.
    let mut signals = crate::signals::StopSignals::install()?;
    let mut running = spawn_built(built);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_states: Vec<Option<PipelineState>> = vec![None; running.len()];
    let mut last_print = tokio::time::Instant::now();
    let mut failed = false;
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            _ = tick.tick() => {}
        }
        let every = last_print.elapsed() >= STATUS_EVERY;
        for (i, (status, _)) in running.iter().enumerate() {
            let s = status.get();
            if every || last_states[i] != Some(s.state) {
                last_states[i] = Some(s.state);
                eprintln!("{}", status_line(&s.to_json()));
            }
        }
        if every {
            last_print = tokio::time::Instant::now();
        }
        let mut i = 0;
        while i < running.len() {
            if running[i].1.is_finished() {
                let (status, task) = running.remove(i);
                last_states.remove(i);
                let name = terminal_text(&status.get().name);
                match task.await {
                    Ok(Ok(())) => eprintln!("pipeline {name}: stopped"),
                    Ok(Err(e)) => {
                        failed = true;
                        eprintln!("error: pipeline {name}: {e}");
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("error: pipeline {name}: task failed: {e}");
                    }
                }
            } else {
                i += 1;
            }
        }
        if running.is_empty() {
            break;
        }
    }
    for (_, task) in &running {
        // A sink stores each batch with its position in one step: stopping anywhere is safe.
        task.abort();
    }
    // Wait until each has stopped: a task still being polled when the runtime shuts down
    // would find its timers gone and panic.
    for (_, task) in running {
        let _ = task.await;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// One pipeline's status as a line for stderr.
fn status_line(p: &serde_json::Value) -> String {
    let mut line = format!(
        "pipeline {}: {} · offset {} · lag {} txns {:.3} s · {} changes · {}/s · {} errors, {} outages",
        terminal_text(p["name"].as_str().unwrap_or("?")),
        p["state"].as_str().unwrap_or("?"),
        p["offset"].as_u64().map_or("-".into(), |o| o.to_string()),
        p["lag_txns"].as_u64().unwrap_or(0),
        p["lag_seconds"].as_f64().unwrap_or(0.0),
        p["changes"].as_u64().unwrap_or(0),
        p["rate_changes_per_s"].as_f64().unwrap_or(0.0),
        p["errors"].as_u64().unwrap_or(0),
        p["outages"].as_u64().unwrap_or(0),
    );
    if let Some(e) = p["last_error"].as_str() {
        line.push_str(&format!(" · last error: {e}"));
    }
    line
}
