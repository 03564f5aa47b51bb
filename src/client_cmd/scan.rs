//! `scan`: a key range of one tree as escaped `KEY<TAB>VALUE` lines, read from the node page
//! by page.
//!
//! Owns: paging through the range and writing rows as they arrive. Must never: hold the whole
//! range in memory on either side, or print a row out of key order.

use std::io::{BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::escape::write_escaped;
use super::{NodeArgs, runtime};

/// Arguments of `scan`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Tree.
    #[arg(long, default_value = "default")]
    tree: String,
    /// Only keys starting with this.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Stop after N rows (at least 1). Without it, the whole range.
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    limit: Option<u64>,
    /// Range over secondary index NAME instead of the keys: documents in the order of the
    /// indexed values, `--prefix` matching the start of the (first) indexed value.
    #[arg(long, value_name = "NAME")]
    index: Option<String>,
    /// Read fence (with --index): first wait until the node has applied this GTID set.
    #[arg(long, value_name = "GTIDSET", requires = "index")]
    after: Option<String>,
    /// How long `--after` waits, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    after_timeout_ms: u64,
}

fn parse_limit(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("--limit 0 would print nothing; omit --limit for the whole range".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of rows: {e}")),
    }
}

/// `scan`: escaped `KEY<TAB>VALUE` lines, read from the node page by page and printed as they
/// arrive, so neither side holds the range.
pub fn scan(args: &ScanArgs) -> anyhow::Result<ExitCode> {
    if let Some(index) = &args.index {
        super::index::print_index_read(&super::index::IndexRead {
            node: &args.node,
            tree: &args.tree,
            index,
            values: Vec::new(),
            prefix: args.prefix.as_bytes().to_vec(),
            limit: args.limit.unwrap_or(u64::MAX),
            fence: args.after.clone(),
            fence_timeout_ms: args.after_timeout_ms,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let mut out = BufWriter::new(std::io::stdout().lock());
        let mut after: Option<Vec<u8>> = None;
        let mut printed = 0u64;
        let limit = args.limit.unwrap_or(u64::MAX);
        while printed < limit {
            let page = client
                .scan_page(
                    &args.tree,
                    args.prefix.as_bytes(),
                    after.as_deref(),
                    (limit - printed).min(SCAN_PAGE_ROWS),
                    tideline_stream::SCAN_PAGE_BYTES_MAX,
                )
                .await
                .context("read a page of the scan")?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (k, v) in &page {
                let written = write_escaped(&mut out, k)
                    .and_then(|()| out.write_all(b"\t"))
                    .and_then(|()| write_escaped(&mut out, v))
                    .and_then(|()| out.write_all(b"\n"));
                if let Err(e) = written {
                    // A reader that went away (`| head`) ends the scan quietly.
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        client.close().await;
                        return Ok(ExitCode::SUCCESS);
                    }
                    return Err(e.into());
                }
                printed += 1;
            }
        }
        client.close().await;
        match out.flush() {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Rows asked per page of a scan (the node also caps a page at 1 MiB).
const SCAN_PAGE_ROWS: u64 = 10_000;
