//! Engine benchmarks, measured in one run on real files (fsync included):
//!
//! 1. committed transactions/s with N concurrent writers, sync durability, one 100-byte put
//!    each — for the engine and, beside it, for the bare log with the same writers;
//! 2. batch load: M puts of 100 bytes in transactions of 1,000;
//! 3. point gets/s while that load runs, with p99 latency beside the idle p99;
//! 4. RSS after loading K keys, beside the store's configured cache.
//!
//! Prints readable figures, then one JSON line. Sizes come from environment variables so CI
//! can run it small:
//! `BENCH_WRITERS` (64), `BENCH_COMMITS` (20000, total per system), `BENCH_LOAD_PUTS`
//! (1000000), `BENCH_LOADERS` (2), `BENCH_READERS` (2), `BENCH_RSS_KEYS` (10000000),
//! `BENCH_DIR` (a temporary directory under the system temp dir).
//!
//! `cargo bench -p tideline-engine --bench engine`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{FileStorage, Gtid, NewTransaction, Op, Wal, WalOptions};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn open_engine(dir: &std::path::Path, opts: EngineOptions) -> Engine {
    let storage = FileStorage::new(dir.join("log")).expect("log dir");
    let wal = Wal::open(Arc::new(storage), WalOptions::default()).expect("open log");
    Engine::open(dir.join("store"), Arc::new(wal), opts).expect("open engine")
}

fn key_of(i: u64) -> [u8; 16] {
    // Spread keys over the key space, as random 16-byte keys would be, but reproducibly.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ i;
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&h.to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn percentile(samples: &mut [u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

/// Commits/s of `writers` threads doing `total` single-put commits through `commit`.
fn concurrent_commits(writers: u64, total: u64, commit: impl Fn(u64, u64) + Sync) -> f64 {
    let per = total / writers;
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let commit = &commit;
            s.spawn(move || {
                for i in 0..per {
                    commit(w, i);
                }
            });
        }
    });
    (per * writers) as f64 / start.elapsed().as_secs_f64()
}

/// Gets random loaded keys until `stop`; returns (gets, latency samples in ns).
fn reader(
    engine: &Engine,
    keys_loaded: &AtomicU64,
    stop: &AtomicBool,
    seed: u64,
) -> (u64, Vec<u64>) {
    let mut x = seed | 1;
    let mut gets = 0u64;
    let mut samples = Vec::with_capacity(1 << 20);
    while !stop.load(Ordering::Relaxed) {
        let n = keys_loaded.load(Ordering::Relaxed).max(1);
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key_of(x % n);
            let t = Instant::now();
            let v = engine.get("default", &k).expect("get");
            let ns = t.elapsed().as_nanos() as u64;
            std::hint::black_box(v);
            if gets.is_multiple_of(8) && samples.len() < samples.capacity() {
                samples.push(ns);
            }
            gets += 1;
        }
    }
    (gets, samples)
}

fn load(engine: &Engine, from: u64, to: u64, loaders: u64, txn_puts: u64, loaded: &AtomicU64) {
    let value = [7u8; 100];
    let next = AtomicU64::new(from);
    std::thread::scope(|s| {
        for _ in 0..loaders {
            s.spawn(|| {
                loop {
                    let start = next.fetch_add(txn_puts, Ordering::SeqCst);
                    if start >= to {
                        return;
                    }
                    let end = (start + txn_puts).min(to);
                    let mut tx = engine.begin();
                    for i in start..end {
                        tx.put("default", &key_of(i), &value).expect("put");
                    }
                    tx.commit().expect("commit");
                    loaded.fetch_max(end, Ordering::SeqCst);
                }
            });
        }
    });
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let writers = env("BENCH_WRITERS", 64);
    let commits = env("BENCH_COMMITS", 20_000);
    let load_puts = env("BENCH_LOAD_PUTS", 1_000_000);
    let loaders = env("BENCH_LOADERS", 2);
    let readers = env("BENCH_READERS", 2);
    let rss_keys = env("BENCH_RSS_KEYS", 10_000_000);
    let txn_puts = 1_000;
    let base = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("bench dir"),
    };
    let opts = EngineOptions::default();
    let cache_bytes = opts.cache_bytes;
    let value = [1u8; 100];

    // 1. Concurrent single-put commits: the bare log, then the engine, same writers.
    let wal_rate = {
        let storage = FileStorage::new(base.path().join("bare")).expect("dir");
        let wal = Wal::open(Arc::new(storage), WalOptions::default()).expect("open log");
        let uuid = wal.server_uuid();
        let seq = AtomicU64::new(1);
        concurrent_commits(writers, commits, |w, i| {
            let txn = NewTransaction {
                gtid: Gtid::new(uuid, seq.fetch_add(1, Ordering::SeqCst)).expect("gtid"),
                timestamp_us: 0,
                ops: vec![Op::Put {
                    tree: "default".into(),
                    key: format!("w{w}-{i}").into_bytes(),
                    value: value.to_vec(),
                    before: None,
                }],
            };
            wal.append(txn).expect("append");
        })
    };
    let engine_rate = {
        let engine = open_engine(&base.path().join("commits"), opts.clone());
        let r = concurrent_commits(writers, commits, |w, i| {
            engine
                .put("default", format!("w{w}-{i}").as_bytes(), &value)
                .expect("put");
        });
        engine.close().expect("close");
        r
    };
    println!("commits, {writers} writers, sync, 1 put of 100 B each:");
    println!("  bare log : {wal_rate:>10.0} txn/s");
    println!(
        "  engine   : {engine_rate:>10.0} txn/s  ({:.0}% of the bare log)",
        100.0 * engine_rate / wal_rate
    );

    // 2 + 3. Batch load with concurrent point reads; idle read latency first.
    let engine = open_engine(&base.path().join("load"), opts.clone());
    let loaded = AtomicU64::new(0);
    // The load alone: nothing else runs.
    let start = Instant::now();
    load(&engine, 0, load_puts, loaders, txn_puts, &loaded);
    let load_secs = start.elapsed().as_secs_f64();
    let load_rate = load_puts as f64 / load_secs;
    let preload = load_puts;
    let stop = AtomicBool::new(false);
    let idle = std::thread::scope(|s| {
        let hs: Vec<_> = (0..readers)
            .map(|r| {
                s.spawn({
                    let (engine, loaded, stop) = (&engine, &loaded, &stop);
                    move || reader(engine, loaded, stop, 0x1234 + r)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::SeqCst);
        hs.into_iter()
            .map(|h| h.join().expect("reader"))
            .collect::<Vec<_>>()
    });
    let idle_gets: u64 = idle.iter().map(|r| r.0).sum();
    let idle_rate = idle_gets as f64 / 2.0;
    let mut idle_samples: Vec<u64> = idle.into_iter().flat_map(|r| r.1).collect();
    let idle_p50 = percentile(&mut idle_samples, 0.50);
    let idle_p99 = percentile(&mut idle_samples, 0.99);

    stop.store(false, Ordering::SeqCst);
    let (busy_load_secs, busy) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..readers)
            .map(|r| {
                s.spawn({
                    let (engine, loaded, stop) = (&engine, &loaded, &stop);
                    move || reader(engine, loaded, stop, 0x9876 + r)
                })
            })
            .collect();
        let start = Instant::now();
        load(
            &engine,
            preload,
            preload + load_puts,
            loaders,
            txn_puts,
            &loaded,
        );
        let secs = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::SeqCst);
        (
            secs,
            hs.into_iter()
                .map(|h| h.join().expect("reader"))
                .collect::<Vec<_>>(),
        )
    });
    let busy_load_rate = load_puts as f64 / busy_load_secs;
    let busy_gets: u64 = busy.iter().map(|r| r.0).sum();
    let busy_rate = busy_gets as f64 / busy_load_secs;
    let mut busy_samples: Vec<u64> = busy.into_iter().flat_map(|r| r.1).collect();
    let busy_p50 = percentile(&mut busy_samples, 0.50);
    let busy_p99 = percentile(&mut busy_samples, 0.99);
    println!(
        "batch load: {load_puts} puts of 100 B in transactions of {txn_puts}, {loaders} loaders:"
    );
    println!("  alone         : {load_rate:>10.0} puts/s  ({load_secs:.2} s)");
    println!(
        "  with {readers} readers: {busy_load_rate:>10.0} puts/s  ({busy_load_secs:.2} s, a second load of {load_puts} new keys)"
    );
    println!("point gets, {readers} readers ({preload} keys before the second load):");
    println!("  idle        : {idle_rate:>10.0} gets/s  p50 {idle_p50} ns  p99 {idle_p99} ns");
    println!(
        "  during load : {busy_rate:>10.0} gets/s  p50 {busy_p50} ns  p99 {busy_p99} ns  ({:.2}x idle p99)",
        busy_p99 as f64 / idle_p99.max(1) as f64
    );
    engine.close().expect("close");
    drop(engine);

    // 4. RSS after loading keys.
    let rss_before = rss_bytes();
    let engine = open_engine(&base.path().join("rss"), opts);
    let loaded = AtomicU64::new(0);
    let start = Instant::now();
    load(&engine, 0, rss_keys, loaders, txn_puts, &loaded);
    let rss_load_secs = start.elapsed().as_secs_f64();
    let rss_after = rss_bytes();
    println!(
        "RSS after loading {rss_keys} keys ({:.0} puts/s): {} MiB (process before: {} MiB; store cache {} MiB)",
        rss_keys as f64 / rss_load_secs,
        rss_after >> 20,
        rss_before >> 20,
        cache_bytes >> 20
    );
    engine.close().expect("close");

    println!(
        "{}",
        serde_json::json!({
            "bench": "tideline-engine",
            "writers": writers,
            "commits": commits,
            "wal_txn_per_s": wal_rate.round(),
            "engine_txn_per_s": engine_rate.round(),
            "engine_vs_wal": (engine_rate / wal_rate * 1000.0).round() / 1000.0,
            "load_puts": load_puts,
            "load_puts_per_s": load_rate.round(),
            "load_with_readers_puts_per_s": busy_load_rate.round(),
            "readers": readers,
            "idle_gets_per_s": idle_rate.round(),
            "idle_p99_ns": idle_p99,
            "load_gets_per_s": busy_rate.round(),
            "load_p99_ns": busy_p99,
            "rss_keys": rss_keys,
            "rss_bytes": rss_after,
            "rss_bytes_before": rss_before,
            "cache_bytes": cache_bytes,
        })
    );
}
