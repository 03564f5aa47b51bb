//! `peer-bench nats`: the NATS JetStream sink beside a bare JetStream publisher, same run.
//!
//! Both publish the same messages (one per one-put transaction: the sink's own payloads,
//! subjects and `Nats-Msg-Id`s) into a fresh stream each, with the same ack pipelining
//! (`max_in_flight` publishes awaiting their ack), in batches of `--batch`, and wait for every
//! ack of a batch before the next. The bare publisher is async-nats' own JetStream publish
//! (`send_publish` and its ack futures: what an application would write); the sink publishes
//! through its ack window (one inbox subscription, acks matched by number) and builds each
//! batch's JSON inside its timed write, and also writes its checkpoint to the positions
//! bucket after each batch (its delivery contract); the bare publisher does neither. The
//! sides alternate for `--rounds` rounds, bare first, each into a fresh stream; the figure is
//! each side's best round in messages per second with acks, and the sink's ratio to the bare
//! publisher.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use clap::Args;
use serde_json::{Value, json};
use tideline_connectors::Sink;
use tideline_connectors::sink::nats::{NatsConfig, NatsSink, Per, message};
use tideline_connectors::{Batch, Item};
use tideline_wal::{Gtid, Offset, Op, Transaction};

/// Arguments of `peer-bench nats`.
#[derive(Debug, Args)]
pub struct NatsBenchArgs {
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Messages (one-put transactions) each side publishes.
    #[arg(long, default_value_t = 500_000)]
    messages: u64,
    /// Messages per batch: the pipeline's default batch of 10,000 changes.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Value bytes of each put.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Publishes awaiting their ack at once, on both sides.
    #[arg(long, default_value_t = 16384)]
    max_in_flight: usize,
    /// Rounds of (bare, sink), alternating; each side's best counts.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Which side runs: `both` (the figure), or only `sink` or `bare` (to count one side's
    /// instructions under `valgrind --tool=callgrind`; the other side's figures are then 0).
    #[arg(long, value_enum, default_value_t = Side::Both)]
    side: Side,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Unused (every peer-bench command takes it).
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: std::path::PathBuf,
}

/// The sides `peer-bench nats` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// The bare publisher, then the sink, each round.
    Both,
    /// The sink only.
    Sink,
    /// The bare publisher only.
    Bare,
}

fn batches(args: &NatsBenchArgs) -> Vec<Batch> {
    let uuid = uuid::Uuid::from_bytes([0x42; 16]);
    let value = vec![b'v'; args.value_bytes];
    let mut out = Vec::new();
    let mut n = 0u64;
    while n < args.messages {
        let items: Vec<Item> = (0..args.batch as u64)
            .take_while(|i| n + i < args.messages)
            .map(|i| {
                let seq = n + i + 1;
                Item::Txn(Transaction {
                    offset: Offset::new(seq).expect("offsets start at 1"),
                    gtid: Gtid::new(uuid, seq).expect("sequences start at 1"),
                    timestamp_us: 1_700_000_000_000_000,
                    ops: vec![Op::Put {
                        tree: "bench".into(),
                        key: format!("key:{seq:010}").into_bytes(),
                        value: value.clone(),
                        before: None,
                    }],
                })
            })
            .collect();
        n += items.len() as u64;
        out.push(Batch {
            source: uuid,
            items,
            checkpoint: format!("{{\"bench\":{n}}}").into_bytes(),
        });
    }
    out
}

fn config(args: &NatsBenchArgs, run: &str, side: &str) -> NatsConfig {
    let mut c = NatsConfig::new(args.url.clone());
    c.stream = format!("BENCH_{side}_{run}");
    c.subjects = vec![format!("bench.{side}.{run}.>")];
    c.subject = format!("bench.{side}.{run}.{{tree}}");
    c.per = Per::Txn;
    c.max_in_flight = args.max_in_flight;
    c
}

async fn sink_side(args: &NatsBenchArgs, run: &str, batches: &[Batch]) -> anyhow::Result<f64> {
    let cfg = config(args, run, "sink");
    let mut sink = NatsSink::new(cfg, &format!("bench-{run}")).map_err(anyhow::Error::msg)?;
    sink.open().await.map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    for b in batches {
        sink.write(b).await.map_err(anyhow::Error::msg)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn bare_side(args: &NatsBenchArgs, run: &str, batches: &[Batch]) -> anyhow::Result<f64> {
    let cfg = config(args, run, "bare");
    let client = async_nats::connect(cfg.url.as_str()).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(args.max_in_flight)
        .backpressure_on_inflight(true)
        .build(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: cfg.stream.clone(),
        subjects: cfg.subjects.clone(),
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        ..Default::default()
    })
    .await?;
    // Built before the clock starts: the bare side publishes ready bytes, with the ids of the
    // sink side's pipeline name (the same length).
    let pipeline = format!("bench-{run}");
    let msgs: Vec<Vec<message::Message>> = batches
        .iter()
        .map(|b| message::messages(b, &pipeline, &cfg.subject, Per::Txn))
        .collect();
    let started = Instant::now();
    for batch in msgs {
        // The same pipelining as the sink: at most max_in_flight acks outstanding.
        let mut acks = std::collections::VecDeque::with_capacity(args.max_in_flight);
        for m in batch {
            if acks.len() >= args.max_in_flight
                && let Some(a) = acks.pop_front()
            {
                a.await?;
            }
            let p = jetstream::message::PublishMessage::build()
                .payload(m.payload)
                .message_id(&m.id);
            acks.push_back(js.send_publish(m.subject, p).await?);
        }
        for a in acks {
            a.await?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&cfg.stream).await;
    Ok(secs)
}

/// Runs `peer-bench nats`.
pub fn nats(args: &NatsBenchArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let run = format!("{}", std::process::id());
    let batches = batches(args);
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let report: Value = rt.block_on(async {
        let (mut bare, mut sink) = (f64::INFINITY, f64::INFINITY);
        let (mut bare_rounds, mut sink_rounds) = (vec![], vec![]);
        for round in 0..args.rounds {
            let run = format!("{run}_{round}");
            let b = if args.side == Side::Sink {
                f64::INFINITY
            } else {
                bare_side(args, &run, &batches)
                    .await
                    .context("the bare JetStream publisher")?
            };
            let s = if args.side == Side::Bare {
                f64::INFINITY
            } else {
                sink_side(args, &run, &batches)
                    .await
                    .context("the NATS sink")?
            };
            // The sink's stream and its checkpoint key are left for inspection only in a
            // failure.
            let client = async_nats::connect(args.url.as_str()).await?;
            let js = jetstream::new(client);
            let _ = js.delete_stream(format!("BENCH_sink_{run}")).await;
            let n = args.messages as f64;
            bare_rounds.push((n / b).round());
            sink_rounds.push((n / s).round());
            bare = bare.min(b);
            sink = sink.min(s);
        }
        let n = args.messages as f64;
        anyhow::Ok(json!({
            "messages": args.messages,
            "batch": args.batch,
            "value_bytes": args.value_bytes,
            "max_in_flight": args.max_in_flight,
            "rounds": args.rounds,
            "sink": { "seconds": sink, "messages_per_s": n / sink, "rounds_per_s": sink_rounds },
            "bare": { "seconds": bare, "messages_per_s": n / bare, "rounds_per_s": bare_rounds },
            "ratio": bare / sink,
        }))
    })?;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "NATS sink: {:.0} messages/s with acks; bare JetStream publisher: {:.0} messages/s; \
             sink/bare = {:.2} (best of {} rounds; sink {}, bare {})",
            report["sink"]["messages_per_s"].as_f64().unwrap_or(0.0),
            report["bare"]["messages_per_s"].as_f64().unwrap_or(0.0),
            report["ratio"].as_f64().unwrap_or(0.0),
            args.rounds,
            report["sink"]["rounds_per_s"],
            report["bare"]["rounds_per_s"],
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
