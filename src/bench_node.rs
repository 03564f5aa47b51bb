//! `tideline bench node`: a load generator against a running node, as `redis-benchmark` is
//! for Redis. N clients, each on its own QUIC connection, send one request at a time (a
//! one-put commit, or a get) for a number of requests, then it prints the rate and latency
//! percentiles. It measures the node as clients see it: QUIC, the request path, the commit
//! path and the node's durability.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;
use tideline_stream::WriteOp;

use crate::client_cmd::output::outln;
use crate::client_cmd::{NodeArgs, runtime};

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// A transaction of one put (a commit, durable under the node's durability).
    Put,
    /// A read of one key.
    Get,
}

/// Arguments of `bench node`.
#[derive(Debug, Args)]
pub struct NodeBenchArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Request kind.
    #[arg(long, value_enum, default_value_t = Kind::Put)]
    kind: Kind,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    clients: u64,
    /// Requests in all.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Bytes of each value written.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Distinct keys (`bench:000000` ...).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Tree to write and read.
    #[arg(long, default_value = "bench")]
    tree: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `bench node`.
pub fn run(args: &NodeBenchArgs) -> anyhow::Result<ExitCode> {
    let value = vec![b'x'; args.value_bytes];
    let report = runtime()?.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..args.clients {
            clients.push(args.node.connect().await?);
        }
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for client in clients {
            let (next, value, tree) = (next.clone(), value.clone(), args.tree.clone());
            let (kind, total, keys) = (args.kind, args.requests, args.keys);
            tasks.spawn(async move {
                let mut lat_us = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let key = format!("bench:{:06}", i % keys).into_bytes();
                    let t = Instant::now();
                    match kind {
                        Kind::Put => {
                            let op = WriteOp::Put {
                                tree: tree.clone(),
                                key,
                                value: value.clone(),
                            };
                            client.commit(vec![op]).await?;
                        }
                        Kind::Get => {
                            client.get(&tree, &key).await?;
                        }
                    }
                    lat_us.push(t.elapsed().as_micros() as u64);
                }
                client.close().await;
                Ok::<_, anyhow::Error>(lat_us)
            });
        }
        let mut lat_us = Vec::with_capacity(args.requests as usize);
        while let Some(r) = tasks.join_next().await {
            lat_us.extend(r.context("a client task panicked")??);
        }
        let secs = started.elapsed().as_secs_f64();
        lat_us.sort_unstable();
        let pct = |p: f64| {
            let i = ((lat_us.len() as f64 - 1.0) * p).round() as usize;
            lat_us.get(i).copied().unwrap_or(0) as f64 / 1e3
        };
        Ok::<_, anyhow::Error>(json!({
            "kind": format!("{:?}", args.kind).to_lowercase(),
            "clients": args.clients,
            "requests": lat_us.len(),
            "seconds": secs,
            "requests_per_s": lat_us.len() as f64 / secs,
            "latency_ms": { "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0) },
        }))
    })?;
    if args.json {
        outln!("{report}")?;
    } else {
        outln!(
            "{} {}: {} requests from {} clients in {:.2} s = {:.0} requests/s; latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
            args.node_addr(),
            report["kind"].as_str().unwrap_or("?"),
            report["requests"],
            args.clients,
            report["seconds"].as_f64().unwrap_or(0.0),
            report["requests_per_s"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            report["latency_ms"]["max"].as_f64().unwrap_or(0.0),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

impl NodeBenchArgs {
    fn node_addr(&self) -> &str {
        self.node.addr()
    }
}
