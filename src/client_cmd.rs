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
    /// The cluster's secrets directory (ca.pem and token). Also from env TIDELINE_SECRETS.
    #[arg(long, value_name = "DIR", env = "TIDELINE_SECRETS")]
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
        let secrets = match (&self.ca, &self.token_file, &self.secrets) {
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
    /// Value.
    value: String,
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
    commit_one(
        &args.node,
        WriteOp::Put {
            tree: args.tree.clone(),
            key: args.key.as_bytes().to_vec(),
            value: args.value.as_bytes().to_vec(),
        },
    )
}

/// `del`.
pub fn del(args: &KeyArgs) -> anyhow::Result<ExitCode> {
    commit_one(
        &args.node,
        WriteOp::Delete {
            tree: args.tree.clone(),
            key: args.key.as_bytes().to_vec(),
        },
    )
}

/// `get`: the value as stored; a missing key prints nothing and exits 1.
pub fn get(args: &KeyArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let value = client.get(&args.tree, args.key.as_bytes()).await?;
        client.close().await;
        match value {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
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
    /// Most rows.
    #[arg(long, default_value_t = 1000)]
    limit: u64,
}

/// `scan`: `KEY<TAB>VALUE` lines.
pub fn scan(args: &ScanArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let rows = client
            .scan(&args.tree, args.prefix.as_bytes(), args.limit)
            .await?;
        client.close().await;
        let mut out = BufWriter::new(std::io::stdout().lock());
        for (k, v) in rows {
            out.write_all(&k)?;
            out.write_all(b"\t")?;
            out.write_all(&v)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(ExitCode::SUCCESS)
    })
}

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
    /// Transactions in flight at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
}

/// `load`: `KEY<TAB>VALUE` lines from stdin in batched transactions.
pub fn load(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async {
        let client = std::sync::Arc::new(args.node.connect().await?);
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
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(usize, Vec<WriteOp>)>(args.parallel.max(1));
        // Read stdin on a blocking thread; commit on the runtime with bounded parallelism.
        let tree = args.tree.clone();
        let batch = args.batch.max(1);
        let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let stdin = std::io::stdin().lock();
            let mut ops = Vec::with_capacity(batch);
            let mut lines = 0u64;
            for (n, line) in stdin.split(b'\n').enumerate() {
                let line = line.context("read stdin")?;
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line.is_empty() {
                    continue;
                }
                let Some(tab) = line.iter().position(|&b| b == b'\t') else {
                    bail!("line {}: expected KEY<TAB>VALUE, found no tab", n + 1);
                };
                ops.push(WriteOp::Put {
                    tree: tree.clone(),
                    key: line[..tab].to_vec(),
                    value: line[tab + 1..].to_vec(),
                });
                lines += 1;
                if ops.len() == batch {
                    let full = std::mem::replace(&mut ops, Vec::with_capacity(batch));
                    if tx.blocking_send((full.len(), full)).is_err() {
                        return Ok(lines);
                    }
                }
            }
            if !ops.is_empty() {
                let _ = tx.blocking_send((ops.len(), ops));
            }
            Ok(lines)
        });
        let mut inflight = tokio::task::JoinSet::new();
        let mut loaded = 0u64;
        let mut txns = 0u64;
        let mut last_gtid = String::new();
        while let Some((n, ops)) = rx.recv().await {
            while inflight.len() >= args.parallel.max(1) {
                if let Some(r) = inflight.join_next().await {
                    let (n, gtid): (usize, String) = r.context("commit task failed")??;
                    loaded += n as u64;
                    txns += 1;
                    last_gtid = gtid;
                    pb.set_position(loaded);
                }
            }
            let client = client.clone();
            inflight.spawn(async move {
                let (_, gtid) = client.commit(ops).await?;
                Ok::<_, anyhow::Error>((n, gtid))
            });
        }
        while let Some(r) = inflight.join_next().await {
            let (n, gtid) = r.context("commit task failed")??;
            loaded += n as u64;
            txns += 1;
            last_gtid = gtid;
            pb.set_position(loaded);
        }
        reader.await.context("stdin reader failed")??;
        pb.finish_and_clear();
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
    /// Resume from (and keep) a position in this file across restarts of `tail`.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
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
        let mut tcfg = TailConfig::new(args.node.node.clone(), cfg, start);
        tcfg.tree = args.tree.clone();
        tcfg.prefix = args.prefix.as_ref().map(|p| p.as_bytes().to_vec());
        tcfg.slot = args.slot.clone();
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
