//! Client commands: `put`, `get`, `del`, `load`, `scan`, `tail`, `status`.

use std::io::{BufRead, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tideline_consumers::{FileCheckpoint, TailConfig, TailStart, tail};
use tideline_stream::{Client, ClientConfig, WriteOp, tls};

use crate::position::StartPosition;
use crate::render;

/// How to reach and authenticate with a node.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The node's address, HOST:PORT (its --listen).
    #[arg(long, default_value = "127.0.0.1:7400", value_name = "ADDR")]
    node: String,
    #[command(flatten)]
    cred: CredArgs,
}

/// How to authenticate with the cluster.
#[derive(Debug, Clone, Args)]
pub struct CredArgs {
    /// The cluster's secrets directory (ca.pem and token). Also from env TIDELINE_SECRETS
    /// (set but empty counts as unset).
    #[arg(long, value_name = "DIR")]
    secrets: Option<PathBuf>,
    /// The cluster CA certificate (instead of --secrets).
    #[arg(long, value_name = "FILE", requires = "token_file")]
    ca: Option<PathBuf>,
    /// A file holding the cluster token (instead of --secrets).
    #[arg(long, value_name = "FILE", requires = "ca")]
    token_file: Option<PathBuf>,
    /// Give up on an unreachable or silent node after this many milliseconds.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    timeout_ms: u64,
}

impl NodeArgs {
    /// The node's address as given.
    pub fn addr(&self) -> &str {
        &self.node
    }

    fn client_config(&self) -> anyhow::Result<ClientConfig> {
        self.cred.client_config()
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let cfg = self.client_config()?;
        Ok(Client::connect(&self.node, cfg).await?)
    }
}

impl CredArgs {
    /// The client configuration these credentials give.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let from_env = std::env::var_os("TIDELINE_SECRETS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let secrets = match (
            &self.ca,
            &self.token_file,
            self.secrets.as_ref().or(from_env.as_ref()),
        ) {
            (Some(ca), Some(token), _) => tls::load_client(ca, token)?,
            (_, _, Some(dir)) => tls::load_client_dir(dir)?,
            _ => {
                let default = PathBuf::from("./data/secrets");
                if default.join("ca.pem").exists() {
                    tls::load_client_dir(&default)?
                } else {
                    bail!(
                        "no credentials: pass --secrets DIR (the node's DATA/secrets), or --ca \
                         FILE --token-file FILE, or set TIDELINE_SECRETS"
                    )
                }
            }
        };
        let mut cfg = ClientConfig::new(secrets);
        cfg.client_name = "tideline-cli".into();
        cfg.connect_timeout = Duration::from_millis(self.timeout_ms);
        cfg.idle_timeout = Duration::from_millis(self.timeout_ms);
        Ok(cfg)
    }
}

/// A small multi-threaded runtime for one client command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Arguments of `put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Tree (created by the first write to it).
    #[arg(long, default_value = "default")]
    tree: String,
    /// Key.
    key: String,
    /// Value; `-` reads it from stdin (for values too large for an argument).
    #[arg(required_unless_present = "value_file", conflicts_with = "value_file")]
    value: Option<String>,
    /// Read the value from this file, byte for byte.
    #[arg(long, value_name = "FILE")]
    value_file: Option<PathBuf>,
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Print the value's bytes exactly, with no newline even on a terminal.
    #[arg(long)]
    raw: bool,
}

/// Arguments of `get` and `del`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Tree.
    #[arg(long, default_value = "default")]
    tree: String,
    /// Key.
    key: String,
}

/// Commits one write and prints `{"offset":N,"gtid":"uuid:n"}`.
fn commit_one(node: &NodeArgs, op: WriteOp) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = node.connect().await?;
        let (offset, gtid) = client.commit(vec![op]).await?;
        println!("{}", serde_json::json!({"offset": offset, "gtid": gtid}));
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `put`.
pub fn put(args: &PutArgs) -> anyhow::Result<ExitCode> {
    let value = match (&args.value_file, args.value.as_deref()) {
        (Some(file), _) => std::fs::read(file)
            .with_context(|| format!("read the value from {}", file.display()))?,
        (None, Some("-")) => {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut v)
                .context("read the value from stdin")?;
            v
        }
        (None, Some(v)) => v.as_bytes().to_vec(),
        (None, None) => bail!("give a VALUE, `-` to read it from stdin, or --value-file FILE"),
    };
    commit_one(
        &args.node,
        WriteOp::Put {
            tree: args.tree.clone(),
            key: args.key.as_bytes().to_vec(),
            value,
        },
    )
}

/// `del`: a missing key commits nothing, says `no such key` and exits 1 (like `get`).
pub fn del(args: &KeyArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let present = client.get(&args.tree, args.key.as_bytes()).await?.is_some();
        if !present {
            client.close().await;
            eprintln!("no such key: nothing deleted");
            return Ok(ExitCode::from(1));
        }
        let (offset, gtid) = client
            .commit(vec![WriteOp::Delete {
                tree: args.tree.clone(),
                key: args.key.as_bytes().to_vec(),
            }])
            .await?;
        println!("{}", serde_json::json!({"offset": offset, "gtid": gtid}));
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `get`: the value as stored, plus a newline when stdout is a terminal (unless `--raw`), so
/// the prompt does not run into it; a missing key prints nothing and exits 1.
pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let key = &args.key;
    runtime()?.block_on(async {
        let client = key.node.connect().await?;
        let value = client.get(&key.tree, key.key.as_bytes()).await?;
        client.close().await;
        match value {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                if !args.raw && out.is_terminal() {
                    out.write_all(b"\n")?;
                }
                out.flush()?;
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("not found");
                Ok(ExitCode::from(1))
            }
        }
    })
}

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
}

fn parse_limit(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("--limit 0 would print nothing; omit --limit for the whole range".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a number of rows: {e}")),
    }
}

/// Writes `bytes` with `\` `\t` `\n` `\r` escaped, as `load` reads them back.
pub fn write_escaped(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.write_all(&bytes[start..i])?;
        out.write_all(esc)?;
        start = i + 1;
    }
    out.write_all(&bytes[start..])
}

/// Undoes [`write_escaped`]; an unknown escape is an error naming it.
pub fn unescape(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut it = bytes.iter();
    while let Some(&b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'\\') => out.push(b'\\'),
            Some(b't') => out.push(b'\t'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(&other) => {
                return Err(format!(
                    "unknown escape \\{}; write a backslash as \\\\ (escapes: \\\\ \\t \\n \\r)",
                    char::from(other).escape_default()
                ));
            }
            None => return Err("a lone backslash ends the line; write it as \\\\".into()),
        }
    }
    Ok(out)
}

/// `scan`: escaped `KEY<TAB>VALUE` lines, read from the node page by page and printed as they
/// arrive, so neither side holds the range.
pub fn scan(args: &ScanArgs) -> anyhow::Result<ExitCode> {
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

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    node: NodeArgs,
}

/// `status`: the node's status JSON.
pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let json = client.status().await?;
        client.close().await;
        let value: serde_json::Value =
            serde_json::from_str(&json).context("the node sent a status that is not JSON")?;
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(ExitCode::SUCCESS)
    })
}

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

/// What a finished commit task of `load` gave.
type LoadResult = Result<anyhow::Result<((u64, u64), usize, String)>, tokio::task::JoinError>;

/// Records one finished batch; returns the keys it committed.
fn record(
    r: LoadResult,
    committed: &mut Vec<((u64, u64), String)>,
    failure: &mut Option<String>,
) -> u64 {
    match r {
        Ok(Ok((lines, n, gtid))) => {
            committed.push((lines, gtid));
            n as u64
        }
        Ok(Err(e)) => {
            failure.get_or_insert(format!("{e:#}"));
            0
        }
        Err(e) => {
            failure.get_or_insert(format!("commit task failed: {e}"));
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
/// and the error says exactly which lines were committed.
pub fn load(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
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
        let (tx, mut rx) = tokio::sync::mpsc::channel::<LoadBatch>(args.parallel.max(1));
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
        let mut loaded = 0u64;
        let mut txns = 0u64;
        // Committed line ranges with their GTIDs, and the first failure.
        let mut committed: Vec<((u64, u64), String)> = Vec::new();
        let mut failure: Option<String> = None;
        while failure.is_none() {
            let Some(b) = rx.recv().await else { break };
            while inflight.len() >= args.parallel.max(1) {
                if let Some(r) = inflight.join_next().await {
                    let n = record(r, &mut committed, &mut failure);
                    loaded += n;
                    txns += u64::from(n > 0);
                    pb.set_position(loaded);
                }
            }
            if failure.is_some() {
                break;
            }
            let client = client.clone();
            inflight.spawn(async move {
                let n = b.ops.len();
                let (first, last) = b.lines;
                let (_, gtid) = client.commit(b.ops).await.with_context(|| {
                    format!("lines {first}-{last} (one transaction, not committed)")
                })?;
                Ok::<_, anyhow::Error>((b.lines, n, gtid))
            });
        }
        // After a failure send nothing more: stop the reader, then wait for what is in flight.
        failed.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(rx);
        while let Some(r) = inflight.join_next().await {
            let n = record(r, &mut committed, &mut failure);
            loaded += n;
            txns += u64::from(n > 0);
            pb.set_position(loaded);
        }
        let read = reader.await.context("stdin reader failed")?;
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
        let cause = match (failure, read) {
            (Some(f), _) => Some(f),
            (None, Err(e)) => Some(e),
            (None, Ok(())) => None,
        };
        if let Some(cause) = cause {
            // Merge adjacent batches into line ranges.
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            for ((a, b), _) in &committed {
                match ranges.last_mut() {
                    Some((_, end)) if *end + 1 == *a => *end = *b,
                    _ => ranges.push((*a, *b)),
                }
            }
            let done = match ranges.as_slice() {
                [] => "nothing was committed".to_string(),
                [(1, end)] => format!(
                    "lines 1-{end} committed ({loaded} keys, last GTID {last_gtid}); nothing \
                     after line {end} was committed"
                ),
                _ => format!(
                    "lines {} committed ({loaded} keys, last GTID {last_gtid}); nothing else \
                     was committed",
                    ranges_text(&ranges)
                ),
            };
            bail!("{cause}; {done}");
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "loaded {loaded} keys in {txns} transactions in {secs:.2}s ({:.0} keys/s)",
            loaded as f64 / secs.max(1e-9)
        );
        println!(
            "{}",
            serde_json::json!({"keys": loaded, "transactions": txns, "last_gtid": last_gtid})
        );
        Ok(ExitCode::SUCCESS)
    })
}

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
    /// A named slot on the node that holds the log for this consumer.
    #[arg(long, value_name = "NAME")]
    slot: Option<String>,
    /// Resume from (and keep) a position in this file across restarts of `tail`. A position
    /// saved there wins over --from.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Keep trying while the node cannot be reached at start, instead of giving up after
    /// --timeout-ms. (Once connected, a tail always reconnects.)
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
        let mut n = 0u64;
        while args.limit.is_none_or(|l| n < l) {
            let next = tokio::select! {
                next = t.next() => next,
                _ = tokio::signal::ctrl_c() => break,
            };
            let Some(item) = next else { break };
            let txn = item?;
            let mut line = serde_json::to_vec(&render::txn_json(&txn))?;
            line.push(b'\n');
            if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    break;
                }
                return Err(e.into());
            }
            n += 1;
        }
        t.commit()?;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips_every_byte_and_leaves_one_line() {
        let all: Vec<u8> = (0..=255u8).chain(*b"\\t\\n\t\n\r\\").collect();
        let mut out = Vec::new();
        write_escaped(&mut out, &all).unwrap();
        assert!(!out.contains(&b'\n') && !out.contains(&b'\t') && !out.contains(&b'\r'));
        assert_eq!(unescape(&out).unwrap(), all);
        assert!(
            unescape(b"c:\\temp\\x")
                .unwrap_err()
                .contains("unknown escape \\x")
        );
        assert!(unescape(b"end\\").is_err());
    }
}
