//! `peer-bench pg-logical`: the PostgreSQL sink beside PostgreSQL's own logical-replication
//! apply, both writing the same rows into one private, throwaway PostgreSQL server, same run.
//!
//! The machine's shared PostgreSQL (5432) runs `wal_level = replica` and is never restarted or
//! reconfigured for this; the harness starts its own server instead: `initdb` and `pg_ctl`
//! (`--pg-bin`, else the newest `/usr/lib/postgresql/*/bin`) in a fresh directory, with
//! `wal_level = logical`, on a free loopback port; as user `postgres` through
//! `runuser -u postgres --` when the harness runs as root (initdb refuses root). The server is
//! stopped and its directory removed at the end, also after an error (`--keep` keeps it).
//!
//! Three databases on that server: `publisher`, `subscriber` and `sink`. Each round, with a
//! fresh table of the sink's shape (`key text COLLATE "C" PRIMARY KEY, value jsonb,
//! value_bytes bytea`) in each:
//! - the sink: `--changes` puts (`peer-bench sinks`' rows: keys `k0000000..`, a ~45-byte JSON
//!   document) through `Sink::write` into `sink`, batches of `--batch` changes, one
//!   transaction each with the position row;
//! - logical apply: a publication of the table in `publisher`, its slot created first
//!   (`pg_create_logical_replication_slot(.., 'pgoutput')`: a subscription cannot create a slot
//!   on its own server), and a disabled subscription in `subscriber` (`create_slot = false,
//!   copy_data = false`). The same rows are inserted into `publisher` in transactions of
//!   `--batch` rows, not timed; then the clock starts, the subscription is enabled, and it
//!   stops when the subscriber's table holds the last row (probed by key every 5 ms; apply
//!   commits each source transaction whole and in order, and the row count is checked after).
//!   What is timed: the walsender decoding the WAL and the apply worker writing it, PostgreSQL's
//!   own equivalent of the sink's write path. The subscription keeps PostgreSQL's default
//!   `synchronous_commit = off` for its apply (`--apply-synchronous-commit on` to change it);
//!   the sink's commits are synchronous (they carry its position).
//!
//! The sides alternate (sink, apply) for `--rounds` rounds; each side's best round counts.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;
use tideline_connectors::sink::postgres::{PostgresConfig, PostgresSink, WriteMethod};

use crate::bench_sinks::{batches_of, run_sink};

/// Arguments of `peer-bench pg-logical`.
#[derive(Debug, Args)]
pub struct PgLogicalArgs {
    /// Row changes each side writes per round.
    #[arg(long, default_value_t = 500_000)]
    changes: u64,
    /// Changes per sink batch (one sink transaction) and rows per publisher transaction.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Changes per source transaction inside a sink batch.
    #[arg(long, default_value_t = 10)]
    ops_per_txn: usize,
    /// Rounds of (sink, apply); each side's best counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The sink's write method.
    #[arg(long, value_enum, default_value_t = Method::Unnest)]
    method: Method,
    /// `synchronous_commit` of the subscription's apply (PostgreSQL's default is `off`).
    #[arg(long, default_value = "off",
          value_parser = ["off", "local", "remote_write", "on", "remote_apply"])]
    apply_synchronous_commit: String,
    /// Directory of PostgreSQL's server binaries (`initdb`, `pg_ctl`); default: the newest
    /// `/usr/lib/postgresql/*/bin`.
    #[arg(long, value_name = "DIR")]
    pg_bin: Option<PathBuf>,
    /// Where the private server's directory is made (default: the system's temp directory);
    /// user `postgres` must be able to write there when the harness runs as root.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the private server's directory (data and `server.log`) after the run.
    #[arg(long)]
    keep: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The sink's write methods, as `--method` spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Multi-row upsert from arrays (the sink's default).
    Unnest,
    /// Binary COPY into a temporary table, then merge.
    Copy,
}

/// The newest `/usr/lib/postgresql/*/bin` holding `initdb` and `pg_ctl`.
fn find_pg_bin() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut best: Option<(u32, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let Some(version) = e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()) else {
                continue;
            };
            let bin = e.path().join("bin");
            if bin.join("initdb").is_file()
                && bin.join("pg_ctl").is_file()
                && best.as_ref().is_none_or(|(v, _)| version > *v)
            {
                best = Some((version, bin));
            }
        }
    }
    best.map(|(_, b)| b).with_context(|| {
        "no PostgreSQL server binaries (initdb and pg_ctl) under /usr/lib/postgresql/*/bin: \
         install the Debian package postgresql, or give --pg-bin DIR"
    })
}

/// Whether this process runs as root (its `/proc/self` belongs to uid 0).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Runs `cmd` to completion; a failure names `what` and carries the command's stderr.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: could not run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// A private PostgreSQL server in a directory of its own; stopped (and the directory removed
/// unless kept) on drop.
struct PrivatePg {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    keep: bool,
    running: bool,
}

impl PrivatePg {
    /// `prog` of the server binaries, as user `postgres` when the harness is root.
    fn command(&self, prog: &str) -> Command {
        let exe = self.bin.join(prog);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// initdb and start a server with `wal_level = logical` on a free loopback port.
    fn start(args: &PgLogicalArgs) -> anyhow::Result<PrivatePg> {
        let bin = match &args.pg_bin {
            Some(b) => {
                anyhow::ensure!(
                    b.join("initdb").is_file() && b.join("pg_ctl").is_file(),
                    "--pg-bin {}: no initdb and pg_ctl there; give the directory of \
                     PostgreSQL's server binaries (e.g. /usr/lib/postgresql/15/bin)",
                    b.display()
                );
                b.clone()
            }
            None => find_pg_bin()?,
        };
        let as_postgres = running_as_root();
        if as_postgres {
            run(
                Command::new("runuser").args(["-u", "postgres", "--", "true"]),
                "running as root, the harness starts PostgreSQL as user postgres with \
                 `runuser -u postgres --` (util-linux; initdb refuses root): check that both \
                 exist",
            )?;
        }
        let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = parent.join(format!("tideline-pg-logical-{}", std::process::id()));
        anyhow::ensure!(
            !dir.exists(),
            "{} exists already: remove it (a run of the same process id left it)",
            dir.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("find a free loopback port for the private PostgreSQL")?
            .port();
        let mut pg = PrivatePg {
            bin,
            dir,
            port,
            as_postgres,
            keep: args.keep,
            running: false,
        };
        if as_postgres {
            run(
                Command::new("runuser")
                    .args(["-u", "postgres", "--", "mkdir", "-m", "700"])
                    .arg(&pg.dir),
                &format!(
                    "make {} as user postgres (give --dir a directory postgres may write in)",
                    pg.dir.display()
                ),
            )?;
        } else {
            std::fs::create_dir(&pg.dir).with_context(|| format!("make {}", pg.dir.display()))?;
        }
        run(
            pg.command("initdb")
                .arg("-D")
                .arg(pg.data())
                .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
                .arg("--no-sync"),
            "initdb of the private PostgreSQL",
        )?;
        let opts = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10 \
             -c max_logical_replication_workers=4",
            pg.dir.display()
        );
        pg.running = true;
        run(
            pg.command("pg_ctl")
                .arg("-D")
                .arg(pg.data())
                .arg("-l")
                .arg(pg.log())
                .args(["-w", "-t", "120", "-o", &opts, "start"]),
            &format!(
                "start the private PostgreSQL (its log: {})",
                pg.log().display()
            ),
        )?;
        Ok(pg)
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.running {
            let stopped = run(
                self.command("pg_ctl")
                    .arg("-D")
                    .arg(self.data())
                    .args(["-m", "fast", "-w", "stop"]),
                "stop the private PostgreSQL",
            );
            if let Err(e) = stopped {
                eprintln!("{e:#}");
            }
        }
        if self.keep {
            eprintln!(
                "kept the private PostgreSQL's directory {}",
                self.dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Runs `statements` one by one, each in a transaction of its own (slot, subscription and
/// database commands refuse a transaction block or earlier writes).
async fn each(client: &tokio_postgres::Client, statements: &[String]) -> anyhow::Result<()> {
    for s in statements {
        client
            .batch_execute(s)
            .await
            .with_context(|| format!("run `{s}`"))?;
    }
    Ok(())
}

const TABLE_SHAPE: &str = "(key text COLLATE \"C\" PRIMARY KEY, value jsonb, value_bytes bytea)";

/// One round of logical apply of `args.changes` rows into table `t` of `subscriber`.
async fn apply_round(
    pg: &PrivatePg,
    publisher: &tokio_postgres::Client,
    subscriber: &tokio_postgres::Client,
    round: usize,
    args: &PgLogicalArgs,
) -> anyhow::Result<Duration> {
    let (t, p, s) = (
        format!("apply_{round}"),
        format!("pub_{round}"),
        format!("slot_{round}"),
    );
    each(
        publisher,
        &[
            format!("CREATE TABLE {t} {TABLE_SHAPE}"),
            format!("CREATE PUBLICATION {p} FOR TABLE {t}"),
            format!("SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')"),
        ],
    )
    .await
    .context("create the publication and its slot")?;
    each(
        subscriber,
        &[
            format!("CREATE TABLE {t} {TABLE_SHAPE}"),
            format!(
                "CREATE SUBSCRIPTION {s} CONNECTION \
             'host=127.0.0.1 port={} dbname=publisher user=postgres' PUBLICATION {p} WITH \
             (create_slot = false, slot_name = '{s}', copy_data = false, enabled = false, \
             synchronous_commit = '{}')",
                pg.port, args.apply_synchronous_commit
            ),
        ],
    )
    .await
    .context("create the subscription")?;
    // The rows of `peer-bench sinks` (`bench_sinks::value`), `--batch` per transaction.
    let insert = publisher
        .prepare(&format!(
            "INSERT INTO {t} (key, value) SELECT 'k' || lpad(i::text, 7, '0'), \
             ('{{\"n\":' || i || ',\"email\":\"user' || i || '@example.com\"}}')::jsonb \
             FROM generate_series($1::bigint, $2::bigint) AS i"
        ))
        .await?;
    let mut i = 0i64;
    let n = i64::try_from(args.changes).context("--changes is too large")?;
    let batch = i64::try_from(args.batch).context("--batch is too large")?;
    while i < n {
        let last = (i + batch).min(n) - 1;
        publisher.execute(&insert, &[&i, &last]).await?;
        i = last + 1;
    }
    let last_key = format!("k{:07}", n - 1);
    let probe = subscriber
        .prepare(&format!("SELECT 1 FROM {t} WHERE key = $1"))
        .await?;
    let deadline = Duration::from_secs(600);
    let started = Instant::now();
    subscriber
        .batch_execute(&format!("ALTER SUBSCRIPTION {s} ENABLE"))
        .await?;
    loop {
        if !subscriber.query(&probe, &[&last_key]).await?.is_empty() {
            break;
        }
        if started.elapsed() > deadline {
            bail!(
                "the subscription did not apply {n} rows within {} s: see the private \
                 server's log {} (run with --keep to read it afterwards)",
                deadline.as_secs(),
                pg.log().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let count: i64 = subscriber
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await?
        .get(0);
    anyhow::ensure!(
        count == n,
        "the subscriber holds {count} rows once the last arrived, not {n}"
    );
    // Tear down, so that the next round has no walsender decoding its WAL.
    each(
        subscriber,
        &[
            format!("ALTER SUBSCRIPTION {s} DISABLE"),
            format!("ALTER SUBSCRIPTION {s} SET (slot_name = NONE)"),
            format!("DROP SUBSCRIPTION {s}"),
            format!("DROP TABLE {t}"),
        ],
    )
    .await?;
    let mut tries = 0;
    loop {
        // The walsender exits shortly after the subscription is disabled.
        match publisher
            .batch_execute(&format!("SELECT pg_drop_replication_slot('{s}')"))
            .await
        {
            Ok(()) => break,
            Err(_) if tries < 200 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("drop the round's replication slot"),
        }
    }
    each(
        publisher,
        &[format!("DROP PUBLICATION {p}"), format!("DROP TABLE {t}")],
    )
    .await?;
    Ok(elapsed)
}

/// One round of the sink writing the same rows into tree (table) `sink_ROUND` of `sink`.
async fn sink_round(
    pg: &PrivatePg,
    round: usize,
    args: &PgLogicalArgs,
) -> anyhow::Result<Duration> {
    let mut cfg = PostgresConfig::new(pg.url("sink"));
    cfg.method = match args.method {
        Method::Unnest => WriteMethod::Unnest,
        Method::Copy => WriteMethod::Copy,
    };
    let table = format!("sink_{round}");
    let mut sink =
        PostgresSink::new(cfg, &format!("bench_{round}")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let batches = batches_of(args.changes, args.batch, args.ops_per_txn, &table);
    let d = run_sink(&mut sink, &batches).await?;
    drop(sink);
    let client = connect(&pg.url("sink")).await?;
    let count: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
        .await?
        .get(0);
    anyhow::ensure!(
        u64::try_from(count).ok() == Some(args.changes),
        "the sink's table holds {count} rows, not {}",
        args.changes
    );
    client
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await?;
    Ok(d)
}

/// `peer-bench pg-logical`.
pub fn pg_logical(args: &PgLogicalArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        args.changes > 0 && args.batch > 0 && args.ops_per_txn > 0,
        "--changes, --batch and --ops-per-txn must be at least 1"
    );
    let pg = PrivatePg::start(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let admin = connect(&pg.url("postgres")).await?;
        for db in ["publisher", "subscriber", "sink"] {
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .with_context(|| format!("create database {db} in the private PostgreSQL"))?;
        }
        let publisher = connect(&pg.url("publisher")).await?;
        let subscriber = connect(&pg.url("subscriber")).await?;
        let per_s = |d: Duration| (args.changes as f64 / d.as_secs_f64()).round();
        let (mut sink_rounds, mut apply_rounds) = (vec![], vec![]);
        for round in 0..args.rounds {
            let s = sink_round(&pg, round, args)
                .await
                .context("the PostgreSQL sink")?;
            sink_rounds.push(per_s(s));
            let a = apply_round(&pg, &publisher, &subscriber, round, args)
                .await
                .context("logical-replication apply")?;
            apply_rounds.push(per_s(a));
        }
        let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        let (sink, apply) = (best(&sink_rounds), best(&apply_rounds));
        anyhow::Ok(json!({
            "changes": args.changes,
            "batch": args.batch,
            "ops_per_txn": args.ops_per_txn,
            "method": format!("{:?}", args.method).to_lowercase(),
            "apply_synchronous_commit": args.apply_synchronous_commit,
            "rounds": args.rounds,
            "sink": { "per_s": sink, "rounds_per_s": sink_rounds },
            "apply": { "per_s": apply, "rounds_per_s": apply_rounds },
            "ratio": (sink / apply * 1000.0).round() / 1000.0,
        }))
    })?;
    drop(rt);
    drop(pg);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "PostgreSQL sink ({}), {} changes in batches of {}: {:.0}/s; logical-replication \
             apply (synchronous_commit {}): {:.0}/s; sink/apply = {} (best of {} rounds; sink \
             {}, apply {})",
            report["method"].as_str().unwrap_or(""),
            args.changes,
            args.batch,
            report["sink"]["per_s"].as_f64().unwrap_or(0.0),
            args.apply_synchronous_commit,
            report["apply"]["per_s"].as_f64().unwrap_or(0.0),
            report["ratio"],
            args.rounds,
            report["sink"]["rounds_per_s"],
            report["apply"]["rounds_per_s"],
        );
    }
    Ok(ExitCode::SUCCESS)
}
