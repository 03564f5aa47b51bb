//! `index create|list|status|drop`, and the index reads of `get --index` and `scan --index`.
//!
//! Owns: turning index commands into logged commits (create, drop), reading index state from
//! the node's status document (list, status), and paging through an index read with its
//! fence. Must never: print anything but the result on stdout, or retry a commit.

use std::io::{BufWriter, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::Value;
use tideline_stream::{Client, IndexQuery, SCAN_PAGE_BYTES_MAX, WriteOp};

use super::escape::write_escaped;
use super::output::outln;
use super::{NodeArgs, runtime};

/// `tideline index ...`.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Declare a secondary index over JSON fields of a tree's values (a logged transaction,
    /// so replicas get it); it is backfilled while writes go on, then kept live.
    Create(CreateArgs),
    /// List the indexes with their state, entries and skipped documents.
    List(ListArgs),
    /// Show one index: state (percent and rate while backfilling), entries, skipped
    /// documents, duplicates.
    Status(NameArgs),
    /// Drop an index and its entries (a logged transaction).
    Drop(NameArgs),
}

/// Arguments of `index create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    name: NameArgs,
    /// JSON pointer of an indexed field (`/email`, `/address/city`); repeat for a composite
    /// index, in the order its values sort.
    #[arg(long = "path", value_name = "/JSON/POINTER", required = true)]
    paths: Vec<String>,
    /// Once live, refuse a transaction that would give a second key the same value.
    #[arg(long)]
    unique: bool,
    /// Wait until the backfill is done and the index is live (at most --wait-ms).
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits, in milliseconds.
    #[arg(long, default_value_t = 600_000, value_name = "MS")]
    wait_ms: u64,
}

/// An index by tree and name.
#[derive(Debug, Args)]
pub struct NameArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Tree.
    #[arg(long, default_value = "default")]
    tree: String,
    /// Index name.
    #[arg(long)]
    name: String,
    /// Print JSON instead of text (`status`).
    #[arg(long)]
    json: bool,
}

/// Arguments of `index list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Only the indexes of this tree.
    #[arg(long)]
    tree: Option<String>,
    /// Print one JSON array instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs an `index` subcommand.
pub fn index_cmd(cmd: &IndexCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        IndexCommand::Create(a) => create(a),
        IndexCommand::Drop(a) => drop_index(a),
        IndexCommand::List(a) => list(a),
        IndexCommand::Status(a) => status(a),
    }
}

async fn indexes(client: &Client) -> anyhow::Result<Vec<Value>> {
    let json = client.status().await?;
    let v: Value =
        serde_json::from_str(&json).context("the node sent a status that is not JSON")?;
    Ok(v["indexes"].as_array().cloned().unwrap_or_default())
}

fn find<'a>(all: &'a [Value], tree: &str, name: &str) -> Option<&'a Value> {
    all.iter().find(|i| i["tree"] == tree && i["name"] == name)
}

fn create(a: &CreateArgs) -> anyhow::Result<ExitCode> {
    let n = &a.name;
    runtime()?.block_on(async {
        let client = n.node.connect().await?;
        let (offset, gtid) = client
            .commit(vec![WriteOp::CreateIndex {
                tree: n.tree.clone(),
                name: n.name.clone(),
                paths: a.paths.clone(),
                unique: a.unique,
            }])
            .await
            .with_context(|| format!("create index `{}` on tree `{}`", n.name, n.tree))?;
        if a.wait {
            let deadline = Instant::now() + Duration::from_millis(a.wait_ms);
            loop {
                let all = indexes(&client).await?;
                match find(&all, &n.tree, &n.name).and_then(|i| i["state"].as_str()) {
                    Some("live") => break,
                    Some("failed") => bail!(
                        "index `{}` failed: {}; drop it and create it again",
                        n.name,
                        find(&all, &n.tree, &n.name).map_or(String::new(), |i| i["reason"]
                            .as_str()
                            .unwrap_or("")
                            .to_string())
                    ),
                    None => bail!("index `{}` was dropped while waiting for it", n.name),
                    _ if Instant::now() >= deadline => bail!(
                        "index `{}` is still backfilling after {} ms; follow it with \
                         `tideline index status`",
                        n.name,
                        a.wait_ms
                    ),
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        outln!("{}", serde_json::json!({"offset": offset, "gtid": gtid}))?;
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

fn drop_index(a: &NameArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = a.node.connect().await?;
        let (offset, gtid) = client
            .commit(vec![WriteOp::DropIndex {
                tree: a.tree.clone(),
                name: a.name.clone(),
            }])
            .await
            .with_context(|| format!("drop index `{}` of tree `{}`", a.name, a.tree))?;
        outln!("{}", serde_json::json!({"offset": offset, "gtid": gtid}))?;
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// One line of `index list`: tree, name, paths, state, entries, skipped.
fn line(i: &Value) -> String {
    let paths: Vec<&str> = i["paths"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    format!(
        "{}\t{}\t{}{}\t{}\tentries {}\tskipped {}",
        i["tree"].as_str().unwrap_or(""),
        i["name"].as_str().unwrap_or(""),
        paths.join(","),
        if i["unique"] == true { " unique" } else { "" },
        state_text(i),
        i["entries"],
        i["skipped"],
    )
}

fn state_text(i: &Value) -> String {
    match i["state"].as_str() {
        Some("backfilling") => format!(
            "backfilling {:.1}% at {} docs/s",
            i["percent"].as_f64().unwrap_or(0.0),
            i["docs_per_s"].as_f64().unwrap_or(0.0)
        ),
        Some("failed") => format!("failed: {}", i["reason"].as_str().unwrap_or("")),
        Some(s) => s.to_string(),
        None => "unknown".into(),
    }
}

fn list(a: &ListArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = a.node.connect().await?;
        let all = indexes(&client).await?;
        client.close().await;
        let shown: Vec<&Value> = all
            .iter()
            .filter(|i| a.tree.as_deref().is_none_or(|t| i["tree"] == t))
            .collect();
        if a.json {
            outln!("{}", serde_json::to_string(&shown)?)?;
        } else if shown.is_empty() {
            eprintln!("no indexes; declare one with `tideline index create`");
        } else {
            for i in shown {
                outln!("{}", line(i))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn status(a: &NameArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = a.node.connect().await?;
        let all = indexes(&client).await?;
        client.close().await;
        let Some(i) = find(&all, &a.tree, &a.name) else {
            bail!(
                "no index named `{}` on tree `{}`; list them with `tideline index list`",
                a.name,
                a.tree
            );
        };
        if a.json {
            outln!("{i}")?;
            return Ok(ExitCode::SUCCESS);
        }
        outln!("index       {} on tree {}", a.name, a.tree)?;
        outln!(
            "paths       {}{}",
            i["paths"],
            if i["unique"] == true { " (unique)" } else { "" }
        )?;
        outln!("state       {}", state_text(i))?;
        outln!("entries     {}", i["entries"])?;
        outln!(
            "skipped     {} documents (not JSON, a path missing, or an object/array)",
            i["skipped"]
        )?;
        outln!("duplicates  {}", i["duplicates"])?;
        for e in i["duplicate_examples"].as_array().into_iter().flatten() {
            outln!("            {}", e.as_str().unwrap_or(""))?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// An index read as `get --index` and `scan --index` make it.
pub struct IndexRead<'a> {
    pub node: &'a NodeArgs,
    pub tree: &'a str,
    pub index: &'a str,
    pub values: Vec<Vec<u8>>,
    pub prefix: Vec<u8>,
    pub limit: u64,
    pub fence: Option<String>,
    pub fence_timeout_ms: u64,
}

/// Prints the documents of an index read as escaped `KEY<TAB>VALUE` lines, page by page;
/// returns how many were printed. The first page is read after the fence, from one snapshot.
pub fn print_index_read(r: &IndexRead<'_>) -> anyhow::Result<u64> {
    if let Some(f) = &r.fence
        && f.parse::<tideline_wal::GtidSet>().is_err()
    {
        bail!("--after {f:?} is not a GTID set; write it like uuid:1-5 (as `put` prints it)");
    }
    runtime()?.block_on(async {
        let client = r.node.connect().await?;
        let mut out = BufWriter::new(std::io::stdout().lock());
        let mut after: Option<Vec<u8>> = None;
        let mut printed = 0u64;
        let mut first = true;
        while printed < r.limit {
            let page = client
                .index_query(IndexQuery {
                    tree: r.tree.to_string(),
                    index: r.index.to_string(),
                    values: r.values.clone(),
                    prefix: r.prefix.clone(),
                    after: after.clone(),
                    limit: r.limit - printed,
                    bytes_max: SCAN_PAGE_BYTES_MAX,
                    fence: if first { r.fence.clone() } else { None },
                    timeout_ms: r.fence_timeout_ms,
                })
                .await
                .with_context(|| format!("read index `{}` of tree `{}`", r.index, r.tree))?;
            first = false;
            for (k, v) in &page.rows {
                let written = write_escaped(&mut out, k)
                    .and_then(|()| out.write_all(b"\t"))
                    .and_then(|()| write_escaped(&mut out, v))
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        client.close().await;
                        return Ok(printed.max(1));
                    }
                    return Err(e.into());
                }
                printed += 1;
            }
            match page.next {
                Some(n) if !page.rows.is_empty() => after = Some(n),
                _ => break,
            }
        }
        client.close().await;
        match out.flush() {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        Ok(printed)
    })
}
