//! `tideline`: the command-line tool and node of the Tideline replication-stream platform.
//!
//! `serve` runs a node (engine + log + QUIC server + the replication pipelines of
//! `tideline-connectors` + HTTP admin); `put`, `get`, `del`, `load`, `scan`, `tail`,
//! `index`, `sink file` and `status` talk to one; `connect` runs pipelines from a file;
//! `log dump|info|verify` inspect a data directory offline, like mysqlbinlog;
//! `bench wal|node|index|sink-file` are the user-facing load generators; `demo` shows the log at
//! work. See `README.md`.
//!
//! The package is a library and a thin binary (`main.rs` calls [`run`]). The library exists so
//! that `tideline-integration`'s peer benchmarks run nodes in process ([`node::EngineNode`],
//! [`node::open_engine`]) with the helpers the built-in benchmarks share ([`bench_util`]).
//! What it must never do: hold replication or sink logic (that is `tideline-connectors`, which
//! the node only wires up), or carry benchmarks against other systems (PostgreSQL, Redis,
//! bare quinn: `tideline-integration`'s `peer-bench`).

mod admin;
mod bench;
mod bench_index;
mod bench_node;
mod bench_sink;
pub mod bench_util;
mod client_cmd;
mod connect;
mod demo;
mod log_cmd;
mod monitor_cmd;
pub mod node;
mod position;
mod render;
mod signals;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Tideline: a GTID-stamped replication stream and change-data-capture platform.
#[derive(Debug, Parser)]
#[command(name = "tideline", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the engine, its log, and the QUIC server for tails and requests.
    Serve(node::ServeArgs),
    /// Write one key (prints the commit's offset and GTID as JSON).
    Put(client_cmd::PutArgs),
    /// Print one key's value as stored (plus a newline on a terminal, unless --raw); a
    /// missing key exits 1 with `not found`.
    Get(client_cmd::GetArgs),
    /// Delete one key (prints the commit's offset and GTID as JSON); a missing key commits
    /// nothing and exits 1 with `no such key`.
    Del(client_cmd::KeyArgs),
    /// Import `KEY<TAB>VALUE` lines from stdin in batched transactions (escapes as `scan`
    /// writes them: `\\` `\t` `\n` `\r`).
    Load(client_cmd::LoadArgs),
    /// Print keys in order as `KEY<TAB>VALUE` lines, the whole range unless --limit.
    ///
    /// A backslash, tab, newline or carriage return inside a key or value is written as
    /// `\\`, `\t`, `\n` or `\r`, so every row is one line and `scan | load` copies any data.
    Scan(client_cmd::ScanArgs),
    /// Follow the node's changes from a position: one JSON line per transaction.
    Tail(client_cmd::TailArgs),
    /// Print the node's status as JSON.
    Status(client_cmd::StatusArgs),
    /// Drive a node's changes into a sink, until Ctrl-C or an error.
    #[command(subcommand)]
    Sink(SinkCommand),
    /// Secondary indexes over JSON fields: create, list, status, drop. Query them with
    /// `get --index` and `scan --index`.
    #[command(subcommand)]
    Index(client_cmd::IndexCommand),
    /// Consumer slots (`tail --slot`): list them, or drop one so that the log it held can go.
    #[command(subcommand)]
    Slot(client_cmd::SlotCommand),
    /// Show every request the node serves, live (like Redis MONITOR).
    Monitor(monitor_cmd::MonitorArgs),
    /// Show the hottest keys and slowest requests, refreshed every interval.
    Top(monitor_cmd::TopArgs),
    /// Run the pipelines of a TOML file: a source node's changes into PostgreSQL, Redis, NATS
    /// JetStream, a webhook or JSON-lines files, until Ctrl-C (docs/OPERATIONS.md,
    /// "Connectors", says what each sink guarantees). --check validates the file and reaches
    /// each source and sink without moving data.
    Connect(connect::ConnectArgs),
    /// Compare nodes key by key: prints a JSON report (`equal`, and each comparison's first
    /// differing key); exit 1 when they differ.
    Verify(verify::VerifyArgs),
    /// Inspect a node's log offline (the node need not run).
    #[command(subcommand)]
    Log(LogCommand),
    /// Built-in load generators that print figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a small concurrent workload through the log and show the result.
    Demo(demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Print records as JSON lines, one transaction per line.
    Dump(log_cmd::DumpArgs),
    /// Print a summary of the log as JSON: offsets, GTID set, segments, slots.
    Info(DataArg),
    /// Read and check every record of every segment; exits non-zero on damage.
    Verify(DataArg),
}

#[derive(Debug, Subcommand)]
enum SinkCommand {
    /// Append one JSON change envelope per line to a file (rotated by size), resuming exactly
    /// where it stopped: the position is kept beside the file.
    File(client_cmd::SinkFileArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Group commit, bandwidth, scan and recovery of the log, beside the raw disk.
    Wal(bench::WalBenchArgs),
    /// Load a running node with N clients (puts or gets), like redis-benchmark.
    Node(bench_node::NodeBenchArgs),
    /// The JSON-lines file sink beside `tideline tail > file`, on the same log.
    SinkFile(bench_sink::SinkFileBenchArgs),
    /// Secondary indexes: backfill rate beside a plain load, and write latency and
    /// throughput with one index against without.
    Index(bench_index::IndexBenchArgs),
}

/// The data directory of a node.
#[derive(Debug, Args)]
struct DataArg {
    /// Data directory of the node (its log is in DATA/log).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
}

/// `sync` fsyncs each group of commits and acknowledges a commit after its fsync; `async`
/// fsyncs every interval and acknowledges a commit once written, before its fsync. Either way
/// readers see a record only once it is durable (README, "Durability, stated plainly").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DurabilityArg {
    /// Acknowledge after fsync (default): an acknowledged commit survives power loss.
    Sync,
    /// One fsync every 10 ms for everything written since: a commit is acknowledged once
    /// written, before its fsync, so a power cut can lose acknowledged commits of up to one
    /// interval plus one fsync; nothing is shown to readers before it is durable.
    Async,
}

impl DurabilityArg {
    /// The log setting this flag stands for.
    fn durability(self) -> tideline_wal::Durability {
        match self {
            DurabilityArg::Sync => tideline_wal::Durability::Sync,
            DurabilityArg::Async => tideline_wal::Durability::Async {
                interval: std::time::Duration::from_millis(10),
            },
        }
    }
}

/// Logs to stderr, filtered by `TIDELINE_LOG` (default: `info` for a node, `warn` otherwise).
pub fn init_tracing(server: bool) {
    // The store's own info lines (table ingestion, journal rotation) are noise to operators.
    let default = if server {
        "info,fjall=warn,lsm_tree=warn,tokio_postgres=warn"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDELINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Parses the command line, runs the command, and prints an error as one line on stderr.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(
        cli.command,
        Command::Serve(_) | Command::Connect(_)
    ));
    // One TLS crypto provider for the whole process, chosen explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Serve(args) => node::serve(&args),
        Command::Put(args) => client_cmd::put(&args),
        Command::Get(args) => client_cmd::get(&args),
        Command::Del(args) => client_cmd::del(&args),
        Command::Load(args) => client_cmd::load(&args),
        Command::Scan(args) => client_cmd::scan(&args),
        Command::Tail(args) => client_cmd::tail_cmd(&args),
        Command::Status(args) => client_cmd::status(&args),
        Command::Sink(SinkCommand::File(args)) => client_cmd::sink_file(&args),
        Command::Index(cmd) => client_cmd::index_cmd(&cmd),
        Command::Slot(cmd) => client_cmd::slot_cmd(&cmd),
        Command::Verify(args) => verify::verify(&args),
        Command::Connect(args) => connect::connect(&args),
        Command::Log(LogCommand::Dump(args)) => log_cmd::dump(&args),
        Command::Log(LogCommand::Info(args)) => log_cmd::info(&args.data),
        Command::Log(LogCommand::Verify(args)) => log_cmd::verify(&args.data),
        Command::Bench(BenchCommand::Wal(args)) => bench::wal(&args),
        Command::Bench(BenchCommand::Node(args)) => bench_node::run(&args),
        Command::Bench(BenchCommand::SinkFile(args)) => bench_sink::run(&args),
        Command::Bench(BenchCommand::Index(args)) => bench_index::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Monitor(args) => monitor_cmd::monitor(&args),
        Command::Top(args) => monitor_cmd::top(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: many error types repeat their
/// cause's text in their own message (`connection lost: X` with cause `X`), which a plain
/// chain printer would show twice.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Microseconds since the Unix epoch, for commit timestamps.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that repeats its cause's text and also returns it as `source()`.
    #[derive(Debug)]
    struct Lost(std::io::Error);

    impl std::fmt::Display for Lost {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "connection lost: {}", self.0)
        }
    }

    impl std::error::Error for Lost {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let text = io.to_string();
        let e = anyhow::Error::from(Lost(io)).context("start the node");
        let line = error_line(&e);
        assert_eq!(line.matches(&text).count(), 1, "{line}");
        assert!(
            line.starts_with("start the node: connection lost: "),
            "{line}"
        );
    }
}
