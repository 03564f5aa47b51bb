//! `slot list|drop`: the consumer slots a node keeps (each holds the log from its restart
//! offset on for a consumer that may come back).
//!
//! Owns: listing slots from the node's status document and asking the node to drop one.
//! Must never: drop a slot a live consumer uses (the node refuses; this only reports it).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::Value;

use super::output::outln;
use super::{NodeArgs, runtime};

/// `tideline slot ...`.
#[derive(Debug, Subcommand)]
pub enum SlotCommand {
    /// List the node's slots: name, restart offset (the first offset kept for it), state and,
    /// for an invalidated slot, why.
    List(ListArgs),
    /// Drop a slot so that retention no longer keeps the log for it. Refused while a live
    /// consumer uses the slot (stop it first).
    Drop(DropArgs),
}

/// Arguments of `slot list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `slot drop`.
#[derive(Debug, Args)]
pub struct DropArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The slot's name (as given to `tail --slot`).
    name: String,
}

/// Runs a `slot` subcommand.
pub fn slot_cmd(cmd: &SlotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SlotCommand::List(a) => list(a),
        SlotCommand::Drop(a) => drop_slot(a),
    }
}

fn list(a: &ListArgs) -> anyhow::Result<ExitCode> {
    let slots = runtime()?.block_on(async {
        let client = a.node.connect().await?;
        let json = client.status().await?;
        client.close().await;
        let v: Value =
            serde_json::from_str(&json).context("the node sent a status that is not JSON")?;
        anyhow::Ok(v["slots"].as_array().cloned().unwrap_or_default())
    })?;
    if a.json {
        outln!("{}", Value::Array(slots))?;
    } else if slots.is_empty() {
        outln!("no slots")?;
    } else {
        for s in &slots {
            outln!("{}", line(s))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `slot list`: name, restart offset, state (and why, when invalidated).
fn line(s: &Value) -> String {
    let mut out = format!(
        "{}\trestart_offset {}\t{}",
        s["name"].as_str().unwrap_or("?"),
        s["restart_offset"],
        s["state"].as_str().unwrap_or("?"),
    );
    if let Some(reason) = s["reason"].as_str() {
        out.push_str(&format!("\t{reason}"));
    }
    out
}

fn drop_slot(a: &DropArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = a.node.connect().await?;
        let restart = client
            .drop_slot(&a.name)
            .await
            .with_context(|| format!("drop slot `{}`", a.name))?;
        outln!(
            "{}",
            serde_json::json!({"dropped": a.name, "restart_offset": restart})
        )?;
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}
