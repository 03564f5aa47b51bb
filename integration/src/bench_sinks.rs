//! `peer-bench sinks`: the PostgreSQL and Redis sinks beside what their servers do alone.
//!
//! The same rows (`--changes` puts of a small JSON document, keys `k0000000..`) go:
//! - PostgreSQL: through the sink (`Sink::write`, batches of `--batch` changes, one
//!   transaction each with the position row), with each write method (`unnest`, `copy`), into
//!   a fresh table; and by the server's own binary `COPY` into a table of the same shape, in
//!   one statement (the physical limit for this sink). Ratio = sink / COPY.
//! - Redis: through the sink (one MULTI/EXEC of `--batch` SETs plus the position per batch),
//!   beside `redis-benchmark -t set -P <batch> -n <changes> -d <value bytes>` (the same
//!   pipelining, no transaction).
//!
//! What it measures: the sink's write path on the server it feeds (the source's tail is
//! `peer-bench stream`'s business). Run in release:
//! `cargo run -p tideline-integration --release --bin peer-bench -- sinks`.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tideline_connectors::sink::postgres::{PostgresConfig, PostgresSink, WriteMethod};
use tideline_connectors::sink::redis::{RedisConfig, RedisSink};
use tideline_connectors::{Batch, Item, Sink};
use tideline_wal::{Gtid, Offset, Op, Transaction};

/// Arguments of `peer-bench sinks`.
#[derive(Debug, Args)]
pub struct SinkBenchArgs {
    /// Row changes written to each sink.
    #[arg(long, default_value_t = 500_000)]
    changes: u64,
    /// Changes per batch (one sink transaction) and Redis pipelining depth.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Changes per source transaction inside a batch.
    #[arg(long, default_value_t = 10)]
    ops_per_txn: usize,
    /// PostgreSQL URL (trust on loopback by default).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pg_url: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The value of row `i`: a small JSON document (also `peer-bench pg-logical`'s rows).
pub(crate) fn value(i: u64) -> Vec<u8> {
    format!("{{\"n\":{i},\"email\":\"user{i}@example.com\"}}").into_bytes()
}

/// The batches of the run: `changes` puts to tree `tree`, `ops_per_txn` per transaction.
fn batches(args: &SinkBenchArgs, tree: &str) -> Vec<Batch> {
    batches_of(args.changes, args.batch, args.ops_per_txn, tree)
}

/// `changes` puts of [`value`] to keys `k0000000..` of tree `tree`, `ops_per_txn` per
/// transaction, `batch` changes per batch.
pub(crate) fn batches_of(changes: u64, batch: usize, ops_per_txn: usize, tree: &str) -> Vec<Batch> {
    let source = uuid::Uuid::new_v4();
    let mut out = Vec::new();
    let mut i = 0u64;
    let mut n = 0u64;
    while i < changes {
        let mut items = Vec::new();
        let mut in_batch = 0;
        while in_batch < batch && i < changes {
            n += 1;
            let mut ops = Vec::new();
            for _ in 0..ops_per_txn {
                if i >= changes {
                    break;
                }
                ops.push(Op::Put {
                    tree: tree.into(),
                    key: format!("k{i:07}").into_bytes(),
                    value: value(i),
                    before: None,
                });
                i += 1;
                in_batch += 1;
            }
            items.push(Item::Txn(Transaction {
                offset: Offset::new(n).expect("n >= 1"),
                gtid: Gtid::new(source, n).expect("n >= 1"),
                timestamp_us: 0,
                ops,
            }));
        }
        out.push(Batch {
            source,
            items,
            checkpoint: format!("{{\"bench\":{n}}}").into_bytes(),
        });
    }
    out
}

/// Opens `sink` (not timed), then writes `batches` through it: the time of the writes.
pub(crate) async fn run_sink(sink: &mut dyn Sink, batches: &[Batch]) -> anyhow::Result<Duration> {
    sink.open().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = Instant::now();
    for b in batches {
        sink.write(b).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(t.elapsed())
}

async fn pg_copy(url: &str, table: &str, args: &SinkBenchArgs) -> anyhow::Result<Duration> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::{ToSql, Type};
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to PostgreSQL")?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS \"{table}\"; CREATE TABLE \"{table}\" (key text COLLATE \"C\" \
             PRIMARY KEY, value jsonb, value_bytes bytea)"
        ))
        .await?;
    let rows: Vec<(String, String)> = (0..args.changes)
        .map(|i| {
            (
                format!("k{i:07}"),
                String::from_utf8(value(i)).expect("ASCII"),
            )
        })
        .collect();
    let t = Instant::now();
    let sink = client
        .copy_in(&format!(
            "COPY \"{table}\" (key, value, value_bytes) FROM STDIN BINARY"
        ))
        .await?;
    let writer = BinaryCopyInWriter::new(sink, &[Type::TEXT, Type::JSONB, Type::BYTEA]);
    let mut writer = std::pin::pin!(writer);
    let none: Option<&[u8]> = None;
    for (k, v) in &rows {
        let j = Json(v);
        let row: [&(dyn ToSql + Sync); 3] = [k, &j, &none];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    let d = t.elapsed();
    client
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await?;
    Ok(d)
}

/// JSON text sent as jsonb in binary COPY (version byte 1, then the text).
#[derive(Debug)]
struct Json<'a>(&'a str);

impl tokio_postgres::types::ToSql for Json<'_> {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSONB
    }
    tokio_postgres::types::to_sql_checked!();
}

async fn pg_drop(url: &str, tables: &[String], pipeline: &str) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for t in tables {
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{t}\""))
            .await?;
    }
    client
        .execute(
            "DELETE FROM tideline_positions WHERE pipeline = $1",
            &[&pipeline],
        )
        .await?;
    Ok(())
}

fn redis_benchmark(args: &SinkBenchArgs, value_bytes: usize) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args(["-t", "set", "-q", "--csv", "-r", "1000000"])
        .args(["-P", &args.batch.to_string()])
        .args(["-n", &args.changes.to_string()])
        .args(["-d", &value_bytes.to_string()])
        .output()
        .context("run redis-benchmark (Debian package redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "SET","123456.79",...
    text.lines()
        .find(|l| l.starts_with("\"SET\""))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim_matches('"').parse().ok())
        .with_context(|| format!("read redis-benchmark's answer: {text}"))
}

async fn redis_clean(url: &str, prefix: &str, pipeline: &str) -> anyhow::Result<()> {
    let mut c = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(keys).query_async(&mut c).await?;
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let _: () = redis::cmd("DEL")
        .arg(format!("tideline:position:{pipeline}"))
        .query_async(&mut c)
        .await?;
    Ok(())
}

/// `peer-bench sinks`.
pub fn sinks(args: &SinkBenchArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(sinks_async(args))
}

async fn sinks_async(args: &SinkBenchArgs) -> anyhow::Result<ExitCode> {
    let tag = format!("bench{}", std::process::id());
    let per_s = |d: Duration| args.changes as f64 / d.as_secs_f64();
    let mut report =
        json!({ "changes": args.changes, "batch": args.batch, "ops_per_txn": args.ops_per_txn });
    // PostgreSQL: each method into a fresh table, then the server's own COPY.
    let mut tables = Vec::new();
    for method in [WriteMethod::Unnest, WriteMethod::Copy] {
        let name = format!("{tag}_{method:?}").to_lowercase();
        let mut cfg = PostgresConfig::new(&args.pg_url);
        cfg.method = method;
        let mut sink = PostgresSink::new(cfg, &name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let table = format!("{name}_t");
        let bs = batches(args, &table);
        let d = run_sink(&mut sink, &bs).await?;
        tables.push(table);
        pg_drop(&args.pg_url, &tables, &name).await?;
        report["postgres"][format!("{method:?}").to_lowercase()] = json!(per_s(d).round());
    }
    let d = pg_copy(&args.pg_url, &format!("{tag}_copy_peer"), args).await?;
    report["postgres"]["server_copy"] = json!(per_s(d).round());
    let best = report["postgres"]["unnest"]
        .as_f64()
        .unwrap_or(0.0)
        .max(report["postgres"]["copy"].as_f64().unwrap_or(0.0));
    report["postgres"]["ratio_best_to_copy"] = json!((best / per_s(d) * 1000.0).round() / 1000.0);
    // Redis: the sink, then redis-benchmark with the same pipelining.
    let name = format!("{tag}_redis");
    let mut cfg = RedisConfig::new(&args.redis_url);
    cfg.key = format!("{name}:{{tree}}:{{key}}");
    let mut sink = RedisSink::new(cfg, &name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let bs = batches(args, "t");
    let d = run_sink(&mut sink, &bs).await?;
    redis_clean(&args.redis_url, &format!("{name}:"), &name).await?;
    report["redis"]["sink"] = json!(per_s(d).round());
    let peer = redis_benchmark(args, value(args.changes / 2).len())?;
    report["redis"]["redis_benchmark_set"] = json!(peer.round());
    report["redis"]["ratio"] = json!((per_s(d) / peer * 1000.0).round() / 1000.0);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "PostgreSQL sink, {} changes in batches of {}: unnest {:.0}/s, copy {:.0}/s; the \
             server's own COPY {:.0}/s; best/COPY = {}",
            args.changes,
            args.batch,
            report["postgres"]["unnest"].as_f64().unwrap_or(0.0),
            report["postgres"]["copy"].as_f64().unwrap_or(0.0),
            report["postgres"]["server_copy"].as_f64().unwrap_or(0.0),
            report["postgres"]["ratio_best_to_copy"]
        );
        println!(
            "Redis sink: {:.0}/s; redis-benchmark SET -P {}: {:.0}/s; ratio {}",
            report["redis"]["sink"].as_f64().unwrap_or(0.0),
            args.batch,
            peer,
            report["redis"]["ratio"]
        );
    }
    Ok(ExitCode::SUCCESS)
}
