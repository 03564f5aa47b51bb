//! `tideline verify`: compares the state of two or more nodes, key by key.

use std::collections::BTreeSet;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use serde_json::{Map, Value, json};
use tideline_stream::{Client, SCAN_PAGE_BYTES_MAX};

use crate::client_cmd::output::outln;
use crate::client_cmd::{CredArgs, runtime};
use crate::render::put_bytes;

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

/// Puts a key or value (`None`: absent on that side) into the report as `field`: in full when
/// short (or `full`), else as its prefix, length and hash. Bytes are shown exactly: text as
/// `field`, anything that is not UTF-8 as base64 in `field_b64` (a prefix likewise as `prefix`
/// or `prefix_b64`), as `tail` and `log dump` show them.
fn put_shown(obj: &mut Map<String, Value>, field: &str, bytes: Option<&[u8]>, full: bool) {
    let Some(bytes) = bytes else {
        obj.insert(field.to_owned(), Value::Null);
        return;
    };
    if full || bytes.len() <= SHOW_BYTES_MAX {
        put_bytes(obj, field, bytes);
        return;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let mut big = Map::new();
    let head = &bytes[..PREFIX_BYTES];
    // Text cut inside a character is shown up to the last whole one, still as text.
    let head = match std::str::from_utf8(head) {
        Err(e) if e.error_len().is_none() => &head[..e.valid_up_to()],
        _ => head,
    };
    put_bytes(&mut big, "prefix", head);
    big.insert("bytes".into(), json!(bytes.len()));
    big.insert("sha256".into(), json!(hex));
    obj.insert(field.to_owned(), Value::Object(big));
}

/// One difference for the report: the key and each side's value (`None` where absent).
fn difference(key: &[u8], first: Option<&[u8]>, other: Option<&[u8]>, full: bool) -> Value {
    let mut obj = Map::new();
    put_shown(&mut obj, "key", Some(key), full);
    put_shown(&mut obj, "first", first, full);
    put_shown(&mut obj, "other", other, full);
    Value::Object(obj)
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
                (va != vb).then(|| difference(ka, Some(va), Some(vb), full))
            }
            (Some((ka, va)), Some((kb, _))) if ka < kb => {
                Some(difference(ka, Some(va), None, full))
            }
            (Some((ka, va)), None) => Some(difference(ka, Some(va), None, full)),
            (_, Some((kb, vb))) => Some(difference(kb, None, Some(vb), full)),
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
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({"equal": equal, "comparisons": reports}))?
        )?;
        Ok(if equal {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}
