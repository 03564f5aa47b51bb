//! `tideline bench index`: secondary indexes, side by side with the plain writes they ride on,
//! in one run on one engine (the node's engine and log, in process, on real files).
//!
//! 1. **load**: N JSON documents through batched transactions of 1,000 puts (what `tideline
//!    load` sends), as the base of the ratio;
//! 2. **backfill**: an index declared on the loaded tree, until live: documents per second;
//! 3. **live maintenance**: single-put transactions from several writers paced at a target
//!    rate (10,000/s), on a tree without an index, then on a tree of the same documents with
//!    one: write latency p50/p99 of each. Index lag is 0 by construction (maintenance is in the store
//!    batch of the write), so the latency with the index is what maintenance costs;
//! 4. **throughput**: the same writers unpaced, without and with the index in alternating
//!    rounds (`--rounds`, 3), and the process's CPU time per write in each (all threads): their
//!    ratio is what the throughput ratio is on a machine where nothing else runs and the CPU
//!    is the limit. The median round's ratio is the goal's: one round can be hit by the
//!    store's flushes and compactions or the machine's other work, and alternating puts both
//!    sides under the same conditions.
//!
//! Goals: backfill ≥ 200,000 docs/s; write throughput with one index ≥ 70% of without.
//!
//! `--only without|with --writes N` runs step 4 alone, for a fixed number of writes, on a
//! tree where every written key already holds a document: for instruction counts per write
//! under `valgrind --tool=callgrind`, which are repeatable on a loaded machine where rates
//! are not. Run it for two values of N and divide the difference of the totals by the
//! difference of N (`scripts/callgrind-index`), so that start-up and seeding cancel out.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{Durability, WalOptions};

use crate::bench_util::{goal, parse_seconds, percentile, run_in_dir, write_goals, writers_parser};
use crate::client_cmd::output::outln;

/// Arguments of `bench index`.
#[derive(Debug, Args)]
pub struct IndexBenchArgs {
    /// Directory to write in (on the disk to measure); created, and emptied afterwards.
    #[arg(long, value_name = "DIR", default_value = "./tideline-bench")]
    dir: PathBuf,
    /// Documents loaded and backfilled (1 or more).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    docs: u64,
    /// Target rate of the paced write phases, writes per second (1 or more).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Seconds per write phase: above 0, at most 86400.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Rounds of the unpaced phases (without, then with the index, alternating); the median
    /// round's ratio is the goal's.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Concurrent writers in the write phases, 1 to 1024.
    #[arg(long, default_value_t = 32, value_parser = writers_parser())]
    writers: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the files written instead of removing them.
    #[arg(long)]
    keep: bool,
    /// Run only the unpaced write phase without or with the index, for `--writes` writes,
    /// on a tree seeded with `min(--docs, 100000)` documents (for callgrind; see the module
    /// docs).
    #[arg(long, value_enum, requires = "writes")]
    only: Option<Only>,
    /// Writes of the `--only` phase, in all writers together (1 or more).
    #[arg(long, requires = "only", value_parser = clap::value_parser!(u64).range(1..))]
    writes: Option<u64>,
}

/// The one phase `--only` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    /// Unpaced writes to a tree without an index.
    Without,
    /// Unpaced writes to a tree with one live index.
    With,
}

const TREE: &str = "docs";

fn document(i: u64) -> String {
    format!(
        r#"{{"id":{i},"email":"user{i}@example.com","city":"city{}","age":{},"tags":["a","b"]}}"#,
        i % 5000,
        18 + i % 60
    )
}

fn open(dir: &Path) -> anyhow::Result<Arc<Engine>> {
    crate::node::open_engine_with(
        dir,
        WalOptions {
            durability: Durability::Sync,
            ..WalOptions::default()
        },
        EngineOptions::default(),
    )
}

/// CPU time this process has used (all threads, user and system), in µs; `None` where
/// `/proc/self/stat` cannot be read. Its ticks are USER_HZ, 100 per second on Linux.
fn process_cpu_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) closed by the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut f = rest.split(' ');
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

/// Writers each committing single puts, paced to `rate` in all (0: as fast as they can) for
/// `seconds`, or until `limit` writes were started when it is set; returns (writes per second, latencies in µs sorted, process CPU µs per write).
/// The CPU per write counts every thread of the process (writers, log, applier, the store's
/// flushes and compactions): on a shared machine it moves far less with the load than the
/// rate does.
fn writes(
    engine: &Arc<Engine>,
    tree: &str,
    docs: u64,
    writers: usize,
    rate: u64,
    seconds: f64,
    limit: Option<u64>,
) -> (f64, Vec<i64>, Option<f64>) {
    let cpu_before = process_cpu_us();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (engine, stop, next, tree) =
                (engine.clone(), stop.clone(), next.clone(), tree.to_string());
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if limit.is_some_and(|l| i >= l) {
                        break;
                    }
                    if rate > 0 {
                        // Open loop: write i is due at i / rate seconds.
                        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                    }
                    let key = format!("d{:09}", (i * 7919 + w as u64) % docs.max(1));
                    let t = Instant::now();
                    if engine
                        .put(&tree, key.as_bytes(), document(i + docs).as_bytes())
                        .is_err()
                    {
                        return lat;
                    }
                    lat.push(t.elapsed().as_micros() as i64);
                }
                lat
            })
        })
        .collect();
    if limit.is_none() {
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    }
    let mut lat: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, process_cpu_us()) {
        (Some(a), Some(b)) if !lat.is_empty() => {
            Some(b.saturating_sub(a) as f64 / lat.len() as f64)
        }
        _ => None,
    };
    lat.sort_unstable();
    (lat.len() as f64 / elapsed, lat, cpu)
}

/// Fills `tree` with documents 0..`n`, 1,000 per transaction.
fn seed_docs(engine: &Engine, tree: &str, n: u64) -> anyhow::Result<()> {
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        engine.transaction(|tx| {
            for j in i..end {
                tx.put(tree, format!("d{j:09}").as_bytes(), document(j).as_bytes())?;
            }
            Ok(())
        })?;
        i = end;
    }
    Ok(())
}

/// `--only`: seeds tree `plain` with `min(docs, 100000)` documents (so that every write
/// replaces one, as in the full run's phases with the index), declares the index when asked,
/// then runs `writes` unpaced writes.
fn measure_only(root: &Path, a: &IndexBenchArgs, only: Only, n: u64) -> anyhow::Result<Value> {
    let engine = open(&root.join("node"))?;
    engine.create_tree("plain", None)?;
    let seed = a.docs.clamp(1, 100_000);
    seed_docs(&engine, "plain", seed)?;
    if only == Only::With {
        engine.create_index("plain", "by_city", &["/city"], false)?;
        if !engine.wait_indexes_live(Duration::from_secs(600)) {
            anyhow::bail!("the index did not become live within 10 minutes");
        }
    }
    let (rate, lat, cpu) = writes(&engine, "plain", seed, a.writers, 0, 0.0, Some(n));
    engine.close()?;
    engine.wal().close()?;
    Ok(json!({
        "only": format!("{only:?}").to_lowercase(),
        "writes": lat.len(),
        "per_s": rate,
        "cpu_us_per_write": cpu,
    }))
}

fn measure(root: &Path, a: &IndexBenchArgs) -> anyhow::Result<Value> {
    if let (Some(only), Some(n)) = (a.only, a.writes) {
        return measure_only(root, a, only, n);
    }
    let engine = open(&root.join("node"))?;
    engine.create_tree(TREE, None)?;
    let bar = crate::bench_util::bar(a.docs, "load (1,000 per txn)");
    let t = Instant::now();
    let mut i = 0;
    while i < a.docs {
        let end = (i + 1000).min(a.docs);
        engine.transaction(|tx| {
            for j in i..end {
                tx.put(TREE, format!("d{j:09}").as_bytes(), document(j).as_bytes())?;
            }
            Ok(())
        })?;
        bar.inc(end - i);
        i = end;
    }
    bar.finish_and_clear();
    let load_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    engine.create_index(TREE, "by_city", &["/city"], false)?;
    if !engine.wait_indexes_live(Duration::from_secs(3600)) {
        anyhow::bail!("the index did not become live within an hour");
    }
    let backfill_s = t.elapsed().as_secs_f64();
    let info = engine
        .indexes()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the index vanished"))?;
    anyhow::ensure!(
        info.entries == a.docs,
        "the index holds {} entries for {} documents",
        info.entries,
        a.docs
    );

    // Write phases on two more trees holding the same documents, one without an index and
    // one with: every write replaces a document, in both.
    let seed = a.docs.clamp(1, 100_000);
    for tree in ["plain", "indexed"] {
        engine.create_tree(tree, None)?;
        seed_docs(&engine, tree, seed)?;
    }
    engine.create_index("indexed", "by_city", &["/city"], false)?;
    if !engine.wait_indexes_live(Duration::from_secs(600)) {
        anyhow::bail!("the second index did not become live within 10 minutes");
    }
    let (paced_plain, lat_plain, _) =
        writes(&engine, "plain", seed, a.writers, a.rate, a.seconds, None);
    let (paced_indexed, lat_indexed, _) =
        writes(&engine, "indexed", seed, a.writers, a.rate, a.seconds, None);
    // Unpaced, in alternating rounds: whatever else the machine or the store's background
    // work does at one moment lands on both sides alike, and the median round decides.
    let mut rounds = Vec::new();
    for _ in 0..a.rounds.max(1) {
        let (plain, _, cpu_plain) = writes(&engine, "plain", seed, a.writers, 0, a.seconds, None);
        let (indexed, _, cpu_indexed) =
            writes(&engine, "indexed", seed, a.writers, 0, a.seconds, None);
        rounds.push((plain, indexed, cpu_plain, cpu_indexed));
    }
    engine.close()?;
    engine.wal().close()?;
    let mut by_ratio = rounds.clone();
    by_ratio.sort_by(|x, y| (x.1 / x.0.max(1.0)).total_cmp(&(y.1 / y.0.max(1.0))));
    let (max_plain, max_indexed, cpu_plain, cpu_indexed) = by_ratio[by_ratio.len() / 2];

    let backfill_rate = a.docs as f64 / backfill_s;
    let ratio = max_indexed / max_plain.max(1.0);
    let p = |l: &[i64], q| percentile(l, q) as f64 / 1000.0;
    Ok(json!({
        "docs": a.docs,
        "load": { "seconds": load_s, "docs_per_s": a.docs as f64 / load_s },
        "backfill": { "seconds": backfill_s, "docs_per_s": backfill_rate, "entries": info.entries },
        "paced": {
            "target_per_s": a.rate,
            "writers": a.writers,
            "without_index": { "per_s": paced_plain, "p50_ms": p(&lat_plain, 0.5), "p99_ms": p(&lat_plain, 0.99) },
            "with_index": { "per_s": paced_indexed, "p50_ms": p(&lat_indexed, 0.5), "p99_ms": p(&lat_indexed, 0.99) },
            "index_lag_p99_ms": 0.0,
        },
        "rounds": rounds.iter().map(|(p, i, cp, ci)| json!({
            "without_index_per_s": p,
            "with_index_per_s": i,
            "ratio": i / p.max(1.0),
            "cpu_us_per_write_without_index": cp,
            "cpu_us_per_write_with_index": ci,
        })).collect::<Vec<_>>(),
        // The median round.
        "max": {
            "without_index_per_s": max_plain,
            "with_index_per_s": max_indexed,
            "ratio": ratio,
            "cpu_us_per_write_without_index": cpu_plain,
            "cpu_us_per_write_with_index": cpu_indexed,
            // What the throughput ratio is when the CPU is the limit and nothing else runs.
            "cpu_ratio": match (cpu_plain, cpu_indexed) {
                (Some(p), Some(i)) if i > 0.0 => Some(p / i),
                _ => None,
            },
        },
        "goals": [
            goal("index backfill", backfill_rate, 200_000.0, "docs/s", true),
            goal("write throughput with one index / without", ratio * 100.0, 70.0, "%", true),
        ],
    }))
}

fn print(r: &Value) -> anyhow::Result<()> {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if let Some(only) = r["only"].as_str() {
        outln!(
            "unpaced writes {only} index: {} writes, {:.0} writes/s, CPU {:.1} µs per write",
            r["writes"],
            f(&r["per_s"]),
            f(&r["cpu_us_per_write"])
        )?;
        return Ok(());
    }
    outln!("documents                 {}", r["docs"])?;
    outln!(
        "load (1,000 per txn)      {:>10.0} docs/s  ({:.1} s)",
        f(&r["load"]["docs_per_s"]),
        f(&r["load"]["seconds"])
    )?;
    outln!(
        "index backfill            {:>10.0} docs/s  ({:.1} s)",
        f(&r["backfill"]["docs_per_s"]),
        f(&r["backfill"]["seconds"])
    )?;
    let pc = &r["paced"];
    outln!(
        "paced writes, target {}/s, {} writers (index lag 0: maintained in the write's batch):",
        pc["target_per_s"],
        pc["writers"]
    )?;
    for (name, k) in [
        ("without index", "without_index"),
        ("with one index", "with_index"),
    ] {
        outln!(
            "  {name:<16} {:>9.0} writes/s  p50 {:.2} ms  p99 {:.2} ms",
            f(&pc[k]["per_s"]),
            f(&pc[k]["p50_ms"]),
            f(&pc[k]["p99_ms"])
        )?;
    }
    if let Some(rounds) = r["rounds"].as_array() {
        let ratios: Vec<String> = rounds
            .iter()
            .map(|x| format!("{:.0}%", f(&x["ratio"]) * 100.0))
            .collect();
        outln!(
            "unpaced rounds (without, then with, alternating): {}",
            ratios.join(" ")
        )?;
    }
    outln!(
        "unpaced writes, median round {:>6.0} without, {:.0} with one index ({:.0}%)",
        f(&r["max"]["without_index_per_s"]),
        f(&r["max"]["with_index_per_s"]),
        f(&r["max"]["ratio"]) * 100.0
    )?;
    outln!(
        "  CPU per unpaced write    {:>9.1} µs without, {:.1} µs with one index (without/with {:.0}%)",
        f(&r["max"]["cpu_us_per_write_without_index"]),
        f(&r["max"]["cpu_us_per_write_with_index"]),
        f(&r["max"]["cpu_ratio"]) * 100.0
    )?;
    write_goals(r)
}

/// `bench index`.
pub fn run(a: &IndexBenchArgs) -> anyhow::Result<ExitCode> {
    run_in_dir(
        &a.dir,
        "index",
        a.keep,
        a.json,
        |root| measure(root, a),
        print,
    )
}
