//! `peer-bench`: Tideline measured beside its peers, on one machine, on loopback.
//!
//! `peer-bench replication` (replica catch-up, lag through a chain A→B→C, bootstrap, and Redis
//! replication beside them) and `peer-bench stream` (tails over QUIC beside a bare quinn stream
//! and PostgreSQL logical decoding), `peer-bench sinks` (the PostgreSQL and Redis sinks beside
//! the servers' own COPY and redis-benchmark), `peer-bench nats` (the NATS sink beside a bare
//! JetStream publisher), `peer-bench pg-logical` (the PostgreSQL sink beside PostgreSQL's own
//! logical-replication apply, on a private server it starts). Run them in release:
//! `cargo run -p tideline-integration --release --bin peer-bench -- replication|stream|sinks|nats|pg-logical`.
//! The results, with the machine and the date, go into `docs/benchmarks.md`.
//!
//! This package (`tideline-integration`, never published) also holds the multi-process tests
//! (`tests/`), which start the `tideline` binary. It depends on every Tideline crate and none
//! depends on it. What it must never do: hold code the node needs at run time (the user-facing
//! load generators, `tideline bench wal|node`, stay in the node), or be a dependency of a
//! crate that ships.

mod bench_nats;
mod bench_pg_logical;
mod bench_repl;
mod bench_sinks;
mod bench_stream;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tideline beside PostgreSQL, Redis and bare quinn: figures from one run on one machine.
#[derive(Debug, Parser)]
#[command(name = "peer-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tails over QUIC beside a bare quinn stream and PostgreSQL logical decoding.
    Stream(bench_stream::StreamBenchArgs),
    /// Replica catch-up, lag through a chain A→B→C, and Redis replication beside them.
    Replication(bench_repl::ReplBenchArgs),
    /// The PostgreSQL and Redis sinks beside their servers' own COPY and redis-benchmark.
    Sinks(bench_sinks::SinkBenchArgs),
    /// The NATS JetStream sink beside a bare JetStream publisher with the same pipelining.
    Nats(bench_nats::NatsBenchArgs),
    /// The PostgreSQL sink beside PostgreSQL's own logical-replication apply, on a private
    /// throwaway PostgreSQL server this command starts.
    PgLogical(bench_pg_logical::PgLogicalArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tideline::init_tracing(false);
    // One TLS crypto provider for the whole process, chosen explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Stream(args) => bench_stream::stream(&args),
        Command::Replication(args) => bench_repl::replication(&args),
        Command::Sinks(args) => bench_sinks::sinks(&args),
        Command::Nats(args) => bench_nats::nats(&args),
        Command::PgLogical(args) => bench_pg_logical::pg_logical(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", tideline::error_line(&e));
            ExitCode::FAILURE
        }
    }
}
