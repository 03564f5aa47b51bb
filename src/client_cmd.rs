//! Client commands: `put`, `get`, `del`, `status` here; `load`, `scan`, `tail` and `sink file` in their own
//! modules, with the escaping `scan` writes and `load` reads.
//!
//! Owns: how a command reaches and authenticates with a node ([`NodeArgs`], [`CredArgs`]), the
//! runtime of one command, the single-key commands, and [`output`], through which every
//! one-shot command writes its result (a reader that goes away ends it quietly). Must never:
//! print anything but the command's result on stdout (errors go to stderr through `run`), or
//! retry a write on its own (a commit whose outcome is unknown is reported, not sent twice).

mod escape;
mod index;
mod load;
pub(crate) mod output;
mod scan;
mod sink_file;
mod slot;
mod tail;

pub use index::{IndexCommand, index_cmd};
pub use load::{LoadArgs, load};
pub use scan::{ScanArgs, scan};
pub use sink_file::{SinkFileArgs, sink_file};
pub use slot::{SlotCommand, slot_cmd};
pub use tail::{TailArgs, tail_cmd};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tideline_stream::{Client, ClientConfig, WriteOp, tls};

use output::outln;

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
    /// Give up on an unreachable or silent node after this many milliseconds (1 or more: 0
    /// would leave no time to connect, and is also the connection's idle timeout).
    #[arg(long, default_value_t = 5000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
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
    /// Read through secondary index NAME of the tree: KEY is then the indexed value, and
    /// every matching document prints as a `KEY<TAB>VALUE` line (escaped as `scan` does).
    #[arg(long, value_name = "NAME")]
    index: Option<String>,
    /// The values of a composite index's further paths, in order (KEY is the first).
    #[arg(long = "and", value_name = "VALUE", requires = "index")]
    more: Vec<String>,
    /// Read fence: first wait until the node shows this GTID set (and, with `--index`, the
    /// index is live), so a write acknowledged elsewhere (another node, or this one under
    /// async durability: the `gtid` that `put` printed) is seen.
    #[arg(long, value_name = "GTIDSET")]
    after: Option<String>,
    /// How long `--after` waits, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    after_timeout_ms: u64,
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
        outln!("{}", serde_json::json!({"offset": offset, "gtid": gtid}))?;
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
        outln!("{}", serde_json::json!({"offset": offset, "gtid": gtid}))?;
        client.close().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// `get`: the value as stored, plus a newline when stdout is a terminal (unless `--raw`), so
/// the prompt does not run into it; a missing key prints nothing and exits 1.
pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let key = &args.key;
    if let Some(index) = &args.index {
        let mut values = vec![key.key.as_bytes().to_vec()];
        values.extend(args.more.iter().map(|v| v.as_bytes().to_vec()));
        let printed = index::print_index_read(&index::IndexRead {
            node: &key.node,
            tree: &key.tree,
            index,
            values,
            prefix: Vec::new(),
            limit: u64::MAX,
            fence: args.after.clone(),
            fence_timeout_ms: args.after_timeout_ms,
        })?;
        if printed == 0 {
            eprintln!("not found");
            return Ok(ExitCode::from(1));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let fence = match &args.after {
        Some(text) => Some(text.parse::<tideline_wal::GtidSet>().map_err(|e| {
            anyhow::anyhow!("--after {text:?} is not a GTID set ({e}); write it like uuid:1-5")
        })?),
        None => None,
    };
    runtime()?.block_on(async {
        let client = key.node.connect().await?;
        if let Some(set) = &fence {
            let timeout = std::time::Duration::from_millis(args.after_timeout_ms);
            let (reached, executed) = client.wait_for(set, timeout).await?;
            if !reached {
                client.close().await;
                bail!(
                    "the node did not show --after {set} within {} ms (it has {executed}); \
                     is it a replica still catching up? raise --after-timeout-ms or check \
                     `tideline status`",
                    args.after_timeout_ms
                );
            }
        }
        let value = client.get(&key.tree, key.key.as_bytes()).await?;
        client.close().await;
        match value {
            Some(v) => {
                output::print_bytes(&v)?;
                if !args.raw && std::io::stdout().is_terminal() {
                    output::print_bytes(b"\n")?;
                }
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("not found");
                Ok(ExitCode::from(1))
            }
        }
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
        outln!("{}", serde_json::to_string_pretty(&value)?)?;
        Ok(ExitCode::SUCCESS)
    })
}
