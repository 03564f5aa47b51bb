//! `tideline verify`: compares the state of two or more nodes, key by key.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};
use tideline_stream::{Client, SCAN_PAGE_BYTES_MAX};

use crate::client_cmd::{CredArgs, runtime};

/// Arguments of `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A node to compare, HOST:PORT; give it two or more times. Every node is compared with
    /// the first.
    #[arg(long = "node", value_name = "ADDR", required = true, num_args = 1)]
    nodes: Vec<String>,
    #[command(flatten)]
    cred: CredArgs,
    /// Most keys fetched per request while paging through a tree (a page also stops at
    /// 1 MiB).
    #[arg(long, default_value_t = 1000)]
    page: u64,
    /// Print differing values in full (by default a value over 256 bytes is shown as its
    /// first 64 bytes, its length and its SHA-256).
    #[arg(long)]
    full_values: bool,
}

/// Values up to this size are shown in full.
const SHOW_BYTES_MAX: usize = 256;
/// Bytes of a big value's prefix that are shown.
const PREFIX_BYTES: usize = 64;

/// A key or value for the report: text when short (or `full`), else prefix, length and hash.
fn show(bytes: &[u8], full: bool) -> Value {
    if full || bytes.len() <= SHOW_BYTES_MAX {
        return json!(String::from_utf8_lossy(bytes));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    json!({
        "prefix": String::from_utf8_lossy(&bytes[..PREFIX_BYTES]),
        "bytes": bytes.len(),
        "sha256": hex,
    })
}

/// The first key where two trees differ, with both sides (`null` where absent).
async fn first_difference(
    a: &Client,
    b: &Client,
    tree: &str,
    page: u64,
    full: bool,
) -> anyhow::Result<(u64, Option<Value>)> {
    let (mut after_a, mut after_b): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    let (mut rows_a, mut rows_b) = (Vec::new().into_iter(), Vec::new().into_iter());
    let (mut done_a, mut done_b) = (false, false);
    let mut compared = 0u64;
    loop {
        // Pages bounded in rows and bytes (a tree of big values never makes one huge
        // answer); an empty page ends a side.
        if rows_a.len() == 0 && !done_a {
            let rows = a
                .scan_page(tree, b"", after_a.as_deref(), page, SCAN_PAGE_BYTES_MAX)
                .await?;
            done_a = rows.is_empty();
            if let Some((k, _)) = rows.last() {
                after_a = Some(k.clone());
            }
            rows_a = rows.into_iter();
        }
        if rows_b.len() == 0 && !done_b {
            let rows = b
                .scan_page(tree, b"", after_b.as_deref(), page, SCAN_PAGE_BYTES_MAX)
                .await?;
            done_b = rows.is_empty();
            if let Some((k, _)) = rows.last() {
                after_b = Some(k.clone());
            }
            rows_b = rows.into_iter();
        }
        let (ra, rb) = (rows_a.as_slice().first(), rows_b.as_slice().first());
        let diff = match (ra, rb) {
            (None, None) => return Ok((compared, None)),
            (Some((ka, va)), Some((kb, vb))) if ka == kb => {
                if va != vb {
                    Some(
                        json!({"key": show(ka, full), "first": show(va, full), "other": show(vb, full)}),
                    )
                } else {
                    None
                }
            }
            (Some((ka, va)), Some((kb, _))) if ka < kb => {
                Some(json!({"key": show(ka, full), "first": show(va, full), "other": null}))
            }
            (Some((ka, va)), None) => {
                Some(json!({"key": show(ka, full), "first": show(va, full), "other": null}))
            }
            (_, Some((kb, vb))) => {
                Some(json!({"key": show(kb, full), "first": null, "other": show(vb, full)}))
            }
        };
        if diff.is_some() {
            return Ok((compared, diff));
        }
        rows_a.next();
        rows_b.next();
        compared += 1;
    }
}

fn trees(status: &Value) -> BTreeSet<String> {
    status["trees"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `verify`: prints a JSON report; exits 0 when equal, 1 when not.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.nodes.len() >= 2,
        "give at least two --node addresses to compare"
    );
    runtime()?.block_on(async {
        let cfg = args.cred.client_config()?;
        let mut clients = Vec::new();
        for addr in &args.nodes {
            clients.push(Client::connect(addr, cfg.clone()).await?);
        }
        let mut statuses = Vec::new();
        for c in &clients {
            let s: Value = serde_json::from_str(&c.status().await?)
                .context("a node sent a status that is not JSON")?;
            statuses.push(s);
        }
        let mut equal = true;
        let mut reports = Vec::new();
        for (i, other) in clients.iter().enumerate().skip(1) {
            let (sa, sb) = (&statuses[0], &statuses[i]);
            let gtids_equal = sa["gtid_executed"] == sb["gtid_executed"];
            let all_trees: BTreeSet<String> = trees(sa).union(&trees(sb)).cloned().collect();
            let mut difference = None;
            let mut keys = 0u64;
            for tree in &all_trees {
                let (n, diff) =
                    first_difference(&clients[0], other, tree, args.page.max(1), args.full_values)
                        .await?;
                keys += n;
                if let Some(mut d) = diff {
                    d["tree"] = json!(tree);
                    difference = Some(d);
                    break;
                }
            }
            let same = gtids_equal && difference.is_none();
            equal &= same;
            reports.push(json!({
                "first": args.nodes[0],
                "other": args.nodes[i],
                "equal": same,
                "gtid_executed_equal": gtids_equal,
                "first_gtid_executed": sa["gtid_executed"],
                "other_gtid_executed": sb["gtid_executed"],
                "keys_compared": keys,
                "first_difference": difference,
            }));
        }
        for c in clients {
            c.close().await;
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"equal": equal, "comparisons": reports}))?
        );
        Ok(if equal {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
