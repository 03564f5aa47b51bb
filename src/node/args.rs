//! The flags of `tideline serve` and the stream server settings they give.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tideline_connectors::BootstrapMode;
use tideline_stream::ServerConfig;

use super::BOOTSTRAP_CHUNK_BYTES_DEFAULT;
use crate::DurabilityArg;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (log in DATA/log, state store in DATA/store).
    #[arg(long, value_name = "DIR")]
    pub(super) data: PathBuf,
    /// UDP address for the QUIC stream and KV protocol.
    #[arg(long, default_value = "127.0.0.1:7400", value_name = "ADDR")]
    pub(super) listen: SocketAddr,
    /// Secrets directory (CA, certificate, token); created on first start. Default DATA/secrets.
    #[arg(long, value_name = "DIR")]
    pub(super) secrets: Option<PathBuf>,
    /// `sync`: a commit is acknowledged after its fsync (default). `async`: one fsync every
    /// 10 ms; a commit is acknowledged once written, before its fsync, so a power cut can lose
    /// acknowledged commits of up to one interval plus one fsync; nothing is shown to readers
    /// before it is durable (tails and replicas wait up to 10 ms).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    pub(super) durability: DurabilityArg,
    /// Refuse local writes. Implied by --upstream unless --allow-local-writes is given.
    #[arg(long)]
    pub(super) read_only: bool,
    /// Replicate from this node (repeat for a multi-source merge). Positions are found by
    /// GTID auto-positioning; no offsets or file names are configured.
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) upstream: Vec<String>,
    /// Accept client writes even with --upstream (they become errant on the upstream side).
    #[arg(long)]
    pub(super) allow_local_writes: bool,
    /// `auto`: an empty replica, or one whose upstream purged GTIDs it needs, copies the
    /// upstream's state in resumable chunks while tailing its log (single upstream only).
    /// `never`: catch up from the upstream's log only.
    #[arg(long, value_enum, default_value_t = BootstrapArg::Auto)]
    pub(super) bootstrap: BootstrapArg,
    /// Size of the chunks a bootstrap asks for (the upstream keeps it within 16 KiB..8 MiB).
    /// A killed replica re-fetches at most one chunk.
    #[arg(long, default_value_t = BOOTSTRAP_CHUNK_BYTES_DEFAULT, value_name = "BYTES")]
    pub(super) bootstrap_chunk_bytes: u64,
    /// Size at which the log starts a new segment file (retention removes whole segments).
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(4096..=(1 << 40)))]
    pub(super) log_segment_bytes: u64,
    /// Log kept for consumers without a slot, in bytes; older segments go once no slot needs
    /// them (checked every 10 s). A replica needing purged GTIDs bootstraps instead.
    #[arg(long, default_value_t = 1 << 30, value_name = "BYTES")]
    pub(super) log_retain_bytes: u64,
    /// Most log that consumer slots may hold, in bytes; past it the oldest segments go anyway
    /// and the slots that needed them are invalidated (docs/OPERATIONS.md, "Retention and
    /// slots"). 0: no cap.
    #[arg(long, default_value_t = 64 << 30, value_name = "BYTES")]
    pub(super) log_slot_bytes_max: u64,
    /// Oldest log that consumer slots may hold (`90s`, `12h`, `7d`): a closed segment older
    /// than this goes anyway and the slots that needed it are invalidated. Default: no cap.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(super) log_slot_age_max: Option<Duration>,
    /// Longest key accepted, in bytes (at most 65535, the store's limit).
    #[arg(long, default_value_t = 65_535, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    pub(super) key_bytes_max: u32,
    /// Longest value accepted, in bytes (at most 16 MiB, what one protocol message carries).
    #[arg(long, default_value_t = 16 << 20, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    pub(super) value_bytes_max: u32,
    /// Documents a secondary index's backfill reads per step. Each step is one store batch
    /// that writers wait behind: smaller steps shorten that wait, larger ones backfill faster.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(super) index_backfill_keys: u32,
    /// Most memory held for one consumer that stops reading (or stops acknowledging), in
    /// bytes: its log reader's 1 MiB chunk, the two batches of a subscription (the one in
    /// flight and the next, prepared meanwhile), the connection's state and the connection's
    /// send window (the data written and not yet acknowledged: the rest, 1.75 MiB by
    /// default). At least 2.75 MiB. Raise it only for links where one tail's
    /// bandwidth times the round trip exceeds the send window.
    #[arg(long, default_value_t = tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT as u64,
          value_name = "BYTES", value_parser = clap::value_parser!(u64).range((1 << 20)..=(1 << 36)))]
    pub(super) consumer_buffer_bytes: u64,
    /// Chunks a bootstrap this node serves keeps sent and not yet stored by the replica. 1:
    /// each chunk goes out once the one before is stored (a replica killed mid-copy fetches
    /// at most one chunk again). 2: the next chunk crosses the network while the replica
    /// stores the previous one, a faster copy (+45–65% on 2 cores, docs/benchmarks.md) for up
    /// to two chunks fetched again per kill and a second chunk in flight.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=2))]
    pub(super) bootstrap_chunks_in_flight: u64,
    /// A client connection with no traffic for this long is closed (keep-alives, sent every
    /// quarter of it by both ends, count as traffic), in milliseconds. The shorter of the
    /// node's and the client's applies.
    #[arg(long, default_value_t = 10_000, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub(super) idle_timeout_ms: u64,
    /// How long a connection in its handshake (TLS, then the token) is safe from eviction by
    /// newer ones once the handshake budget (256) is full, in milliseconds: while every
    /// handshake in progress is younger, a newcomer is refused at the door instead. Long
    /// enough for a real client to finish its handshake; below the 5 s handshake timeout. 0:
    /// a newcomer always evicts the oldest (a burst of handshakes can push out a real client).
    #[arg(long, default_value_t = HANDSHAKE_GRACE_MS_DEFAULT, value_name = "MS",
          value_parser = parse_handshake_grace_ms)]
    pub(super) handshake_grace_ms: u64,
    /// Once TLS has finished, how long a connection may take to deliver its whole `Hello`
    /// (the cluster token), in milliseconds; never beyond the 5 s handshake timeout. A real
    /// client sends it with its last handshake packet; a peer that trickles or withholds it
    /// is closed with code 2. Raise it only for links whose round trip, with a retransmit,
    /// approaches it.
    #[arg(long, default_value_t = HELLO_TIMEOUT_MS_DEFAULT, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(100..=5000))]
    pub(super) hello_timeout_ms: u64,
    /// Serve the HTTP admin here: overview page `/`, `/api/status`, `/api/log`, `/health`,
    /// `/metrics`. Off unless given (e.g. `--http 127.0.0.1:7480`); off loopback every path
    /// but `/health` needs `Authorization: Bearer TOKEN` (the cluster token); `/api/log` needs
    /// it on loopback too, and on loopback only requests addressed to an IP address or
    /// `localhost` are served.
    #[arg(long, value_name = "ADDR")]
    pub(super) http: Option<SocketAddr>,
    /// Run the pipelines of this TOML file inside the node (as `tideline connect --config
    /// FILE` would); their status shows in `status`, `/metrics` and the overview page. A
    /// pipeline's source may be this node's own --listen address; its secrets default to
    /// this node's.
    #[arg(long, value_name = "FILE")]
    pub(super) connect: Option<PathBuf>,
}

/// Default `--hello-timeout-ms`: `ServerConfig`'s `hello_timeout` (a unit test checks).
const HELLO_TIMEOUT_MS_DEFAULT: u64 = 1000;

/// Default `--handshake-grace-ms`: `ServerConfig`'s `handshake_grace` (a unit test checks).
const HANDSHAKE_GRACE_MS_DEFAULT: u64 = 1000;

/// `--handshake-grace-ms`: milliseconds below the server's handshake timeout. A grace as long
/// as the timeout would never let a handshake be evicted: once the budget is full of peers
/// that never finish, every new connection, real clients included, would be refused.
fn parse_handshake_grace_ms(text: &str) -> Result<u64, String> {
    let ms: u64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of milliseconds"))?;
    let timeout = server_defaults().handshake_timeout.as_millis();
    if u128::from(ms) >= timeout {
        return Err(format!(
            "{ms} ms is not below the handshake timeout ({timeout} ms): no handshake would ever \
             be old enough to evict, so a budget full of peers that never finish would refuse \
             every new connection; use 0..={}",
            timeout - 1
        ));
    }
    Ok(ms)
}

/// The stream server's defaults (the listen address is set apart).
pub(super) fn server_defaults() -> ServerConfig {
    ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The stream server's settings that `serve`'s flags give.
pub(super) fn server_config(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    let mut cfg = ServerConfig::new(args.listen);
    cfg.idle_timeout = Duration::from_millis(args.idle_timeout_ms);
    cfg.handshake_grace = Duration::from_millis(args.handshake_grace_ms);
    cfg.hello_timeout = Duration::from_millis(args.hello_timeout_ms);
    cfg.consumer_buffer_bytes = usize::try_from(args.consumer_buffer_bytes)
        .context("--consumer-buffer-bytes does not fit this machine's address space")?;
    // The server refuses it too, but only once the data directory is open: say it first.
    if cfg.consumer_buffer_bytes < cfg.consumer_buffer_bytes_min() {
        anyhow::bail!(
            "--consumer-buffer-bytes {} is below the {} bytes a consumer needs (a log reader's \
             chunk, the connection's state, four batches of {} being prepared or in flight, \
             and a send window of two more batches): pass a larger value",
            cfg.consumer_buffer_bytes,
            cfg.consumer_buffer_bytes_min(),
            cfg.batch_bytes_target
        );
    }
    cfg.bootstrap_chunks_in_flight = args.bootstrap_chunks_in_flight;
    Ok(cfg)
}

/// `--bootstrap`: when a replica copies its upstream's state instead of catching up from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum BootstrapArg {
    /// When the replica is empty, or the upstream purged GTIDs it needs (single upstream only).
    Auto,
    /// Never: catch up from the upstream's log, and stop with an error if it was purged.
    Never,
}

impl BootstrapArg {
    /// The pipeline setting this flag stands for.
    pub(super) fn mode(self) -> BootstrapMode {
        match self {
            BootstrapArg::Auto => BootstrapMode::Auto,
            BootstrapArg::Never => BootstrapMode::Never,
        }
    }
}
