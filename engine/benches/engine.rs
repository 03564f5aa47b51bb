//! Engine benchmarks, measured in one run on real files (fsync included):
//!
//! 1. committed transactions/s with N concurrent writers, sync durability, one 100-byte put
//!    each — for the engine and, beside it, for the bare log with the same writers;
//! 2. batch load: M puts of 100 bytes in transactions of 1,000;
//! 3. point gets/s while that load runs, with p99 latency beside the idle p99;
//! 4. RSS after loading K keys, beside the store's configured cache;
//! 5. bootstrap restore: R keys (16-byte keys, 100-byte values, ascending) written with
//!    `bootstrap_apply` in chunks of ~4 MiB, as a replica's bootstrap does; MB/s of user data
//!    (key + value bytes). A producer thread builds the chunks while the engine applies them.
//! 6. upstream apply (a replica catching up): U one-put transactions (16-byte random keys,
//!    100-byte values) of another origin, arriving in batches of ~256 KiB (1,450 transactions,
//!    as the replica's stream delivers them) while the engine applies, each
//!    `apply_upstream_batch` call taking every batch that arrived (up to 16,384 transactions,
//!    as the replica groups its backlog), on an engine whose log has async durability (10 ms),
//!    as `peer-bench replication`'s "apply only" row does.
//!
//! Prints readable figures, issue 16's goals for the rows it measures (engine commits ≥ 90%
//! of the bare log, batch load ≥ 1 M puts/s, idle gets ≥ 1 M/s and ≥ 50% of that during a
//! load, upstream apply ≥ 490k txn/s) each `met` or `MISSED`, then one JSON line. Sizes come from environment variables so CI
//! can run it small:
//! `BENCH_WRITERS` (64), `BENCH_COMMITS` (20000, total per system, in `BENCH_ROUNDS` (4)
//! alternating rounds), `BENCH_LOAD_PUTS`
//! (1000000), `BENCH_LOADERS` (2), `BENCH_READERS` (2), `BENCH_RSS_KEYS` (10000000),
//! `BENCH_CACHE_MB` (the engine default, 64), `BENCH_MEMTABLE_MB` (the engine default, 16), `BENCH_DIR` (a temporary directory under the
//! system temp dir), `BENCH_ONLY_COMMITS` (set: stop after step 1), `BENCH_RESTORE_KEYS`
//! (1000000), `BENCH_RESTORE_CHUNK_KB` (4096), `BENCH_ONLY_RESTORE` (set: run step 5 only),
//! `BENCH_UPSTREAM_TXNS` (1000000), `BENCH_ONLY_UPSTREAM` (set: run step 6 only),
//! `BENCH_ONLY_LOAD` (set: stop after step 3; with `BENCH_COMMITS=640` it runs steps 2-3
//! almost alone, e.g. under `perf record`), `BENCH_IDLE_SECS` (2: how long the idle gets run;
//! they start on the block cache the load left, so a longer run shows the warm rate).
//!
//! `cargo bench -p tideline-engine --bench engine`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tideline_engine::{Engine, EngineOptions, GtidSet, RestoreOp};
use tideline_wal::{FileStorage, Gtid, NewTransaction, Op, PackedEntries, Wal, WalOptions};

/// Issue 16's goals for the rows this bench measures, printed as `met` or `MISSED` under
/// the figures and kept in the JSON line (the same form as `peer-bench`'s goal rows).
#[derive(Default)]
struct Goals(Vec<serde_json::Value>);

impl Goals {
    fn add(&mut self, name: &str, value: f64, target: f64, unit: &str, higher_is_better: bool) {
        let met = if higher_is_better {
            value >= target
        } else {
            value <= target
        };
        self.0.push(serde_json::json!({
            "goal": name,
            "value": value,
            "target": target,
            "unit": unit,
            "higher_is_better": higher_is_better,
            "met": met,
        }));
    }

    /// Prints the goal rows; returns them for the JSON line.
    fn print(&self) -> serde_json::Value {
        println!("goals:");
        for g in &self.0 {
            let op = if g["higher_is_better"] == true {
                ">="
            } else {
                "<="
            };
            let unit = g["unit"].as_str().unwrap_or("");
            // Ratios with three decimals, rates whole.
            let decimals = if unit == "x" { 3 } else { 0 };
            println!(
                "  {:<6} {:<46} {:>12.decimals$} {unit} (goal {op} {})",
                if g["met"] == true { "met" } else { "MISSED" },
                g["goal"].as_str().unwrap_or("?"),
                g["value"].as_f64().unwrap_or(f64::NAN),
                g["target"],
            );
        }
        serde_json::Value::Array(self.0.clone())
    }
}

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

/// Runs `total` single-put commits from `writers` threads through `commit`; returns
/// (commits, seconds).
fn concurrent_commits(writers: u64, total: u64, commit: impl Fn(u64, u64) + Sync) -> (u64, f64) {
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
    (per * writers, start.elapsed().as_secs_f64())
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

/// 100 bytes that do not compress, different for every key.
fn value_of(i: u64) -> [u8; 100] {
    let mut v = [0u8; 100];
    let mut x = i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// Waits (up to a minute) until the store has no flush or compaction running.
fn settle(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s = engine.store_stats();
        if s.outstanding_flushes == 0 && s.active_compactions == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn load(engine: &Engine, from: u64, to: u64, loaders: u64, txn_puts: u64, loaded: &AtomicU64) {
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
                        tx.put("default", &key_of(i), &value_of(i)).expect("put");
                    }
                    tx.commit().expect("commit");
                    loaded.fetch_max(end, Ordering::SeqCst);
                }
            });
        }
    });
}

/// Step 4 on its own, in a child process: load keys, print RSS as JSON.
fn rss_child(dir: &std::path::Path, opts: EngineOptions, keys: u64, loaders: u64) {
    let engine = open_engine(&dir.join("rss"), opts);
    let rss_open = rss_bytes();
    let loaded = AtomicU64::new(0);
    let start = Instant::now();
    load(&engine, 0, keys, loaders, 1_000, &loaded);
    let secs = start.elapsed().as_secs_f64();
    let rss = rss_bytes();
    let stats = engine.store_stats();
    println!(
        "{}",
        serde_json::json!({
            "rss_bytes": rss,
            "rss_bytes_engine_open": rss_open,
            "puts_per_s": (keys as f64 / secs).round(),
            "write_buffer_bytes": stats.write_buffer_bytes,
            "disk_bytes": stats.disk_bytes,
        })
    );
    engine.close().expect("close");
}

/// What step 5 measured.
struct Restore {
    keys: u64,
    user_bytes: u64,
    chunks: u64,
    apply_secs: f64,
    total_secs: f64,
    settle_secs: f64,
    finish_secs: f64,
    /// `Snapshot::approximate_len` after the restore.
    estimate: u64,
}

/// Step 5: a bootstrap of `keys` keys into a fresh engine, in chunks of `chunk_bytes`.
fn restore(dir: &std::path::Path, opts: EngineOptions, keys: u64, chunk_bytes: u64) -> Restore {
    const KEY_BYTES: u64 = 16;
    const VALUE_BYTES: u64 = 100;
    let per_chunk = (chunk_bytes / (KEY_BYTES + VALUE_BYTES)).max(1);
    let key = |i: u64| {
        let mut k = vec![0u8; 16];
        k[8..].copy_from_slice(&i.to_be_bytes());
        k
    };
    let engine = open_engine(dir, opts);
    engine.bootstrap_begin(b"0").expect("begin");
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<RestoreOp>)>(2);
    let start = Instant::now();
    let mut apply_secs = 0.0;
    let mut chunks = 0;
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut from = 0;
            while from < keys {
                let to = (from + per_chunk).min(keys);
                let entries = PackedEntries::from_pairs((from..to).map(|i| (key(i), value_of(i))))
                    .expect("ascending keys");
                let chunk = RestoreOp::Chunk {
                    tree: "default".into(),
                    merge_operator: None,
                    from: key(from),
                    to: (to < keys).then(|| key(to)),
                    entries,
                };
                if tx.send((to, vec![chunk])).is_err() {
                    return;
                }
                from = to;
            }
        });
        for (done, ops) in rx {
            let t = Instant::now();
            engine
                .bootstrap_apply(ops, done.to_string().as_bytes())
                .expect("bootstrap_apply");
            apply_secs += t.elapsed().as_secs_f64();
            chunks += 1;
        }
    });
    let total_secs = start.elapsed().as_secs_f64();
    let t = Instant::now();
    settle(&engine);
    let settle_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    engine.bootstrap_finish(&GtidSet::new()).expect("finish");
    let finish_secs = t.elapsed().as_secs_f64();
    let estimate = engine.snapshot().approximate_len();
    let last = key(keys.saturating_sub(1));
    assert_eq!(
        engine.get("default", &last).expect("get").as_deref(),
        Some(&value_of(keys.saturating_sub(1))[..]),
        "the last key was restored"
    );
    engine.close().expect("close");
    Restore {
        keys,
        user_bytes: keys * (KEY_BYTES + VALUE_BYTES),
        chunks,
        apply_secs,
        total_secs,
        settle_secs,
        finish_secs,
        estimate,
    }
}

fn print_restore(r: &Restore, chunk_bytes: u64) {
    let mb = r.user_bytes as f64 / 1e6;
    println!(
        "bootstrap restore: {} keys (16 B keys, 100 B values, {:.0} MB of user data) in {} \
         chunks of ~{} KiB:",
        r.keys,
        mb,
        r.chunks,
        chunk_bytes >> 10
    );
    println!(
        "  pipeline (build + apply) : {:>8.1} MB/s  ({:.2} s)",
        mb / r.total_secs,
        r.total_secs
    );
    println!(
        "  bootstrap_apply alone    : {:>8.1} MB/s  ({:.2} s)",
        mb / r.apply_secs,
        r.apply_secs
    );
    println!(
        "  then flushes settled in {:.2} s, bootstrap_finish took {:.3} s",
        r.settle_secs, r.finish_secs
    );
    println!(
        "  Snapshot::approximate_len afterwards: {} ({} keys restored)",
        r.estimate, r.keys
    );
}

/// Step 6: `txns` one-put upstream transactions applied with `apply_upstream_batch`, grouped
/// as a replica groups its backlog; returns transactions/s.
fn upstream(dir: &std::path::Path, opts: EngineOptions, txns: u64) -> f64 {
    let storage = FileStorage::new(dir.join("log")).expect("log dir");
    let wal_opts = WalOptions {
        durability: tideline_wal::Durability::Async {
            interval: Duration::from_millis(10),
        },
        ..WalOptions::default()
    };
    let wal = Wal::open(Arc::new(storage), wal_opts).expect("open log");
    let engine = Engine::open(dir.join("store"), Arc::new(wal), opts).expect("open engine");
    // The origin created the tree in its first transaction; so does this stream.
    let origin = uuid::Uuid::from_u128(0x7e57_0000_0000_4000_8000_0000_0000_0001);
    let txn = |seq: u64| NewTransaction {
        gtid: Gtid::new(origin, seq).expect("gtid"),
        timestamp_us: 0,
        ops: {
            let mut ops = Vec::with_capacity(2);
            if seq == 1 {
                ops.push(Op::CreateTree {
                    tree: "default".into(),
                    merge_operator: None,
                });
            }
            ops.push(Op::Put {
                tree: "default".into(),
                key: key_of(seq).to_vec(),
                value: value_of(seq).to_vec(),
                before: None,
            });
            ops
        },
    };
    // As a replica does (`connectors/src/replica.rs`): batches of ~256 KiB arrive while the
    // previous group is applied (up to 64 queued), and each call applies everything that
    // arrived, up to 16,384 transactions, returning once they are logged and the group before
    // them applied (`apply_upstream_logged`). Applying one 256 KiB batch at a time instead would
    // wait for the log's 10 ms sync interval per batch (records are shown to the applier only
    // once durable), which bounds the rate at ~145k txn/s whatever the engine costs.
    const BATCH_TXNS: u64 = 1_450;
    const GROUP_TXNS_MAX: usize = 16_384;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<NewTransaction>>(64);
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut seq = 1;
            while seq <= txns {
                let end = (seq + BATCH_TXNS).min(txns + 1);
                if tx.send((seq..end).map(txn).collect()).is_err() {
                    return;
                }
                seq = end;
            }
        });
        while let Ok(mut batch) = rx.recv() {
            while batch.len() < GROUP_TXNS_MAX {
                match rx.try_recv() {
                    Ok(more) => batch.extend(more),
                    Err(_) => break,
                }
            }
            engine
                .apply_upstream_logged(batch)
                .expect("apply_upstream_logged");
        }
    });
    // The last batch's call returned once it was logged: the time runs until it is applied.
    assert!(
        engine
            .wait_all_visible(Duration::from_secs(60))
            .expect("apply")
    );
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        engine.gtid_executed().to_string(),
        format!("{origin}:1-{txns}"),
        "every upstream transaction was applied"
    );
    engine.close().expect("close");
    txns as f64 / secs
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
    let opts = EngineOptions {
        cache_bytes: env("BENCH_CACHE_MB", EngineOptions::default().cache_bytes >> 20) << 20,
        store_threads: env("BENCH_STORE_THREADS", 0) as usize,
        memtable_bytes: env(
            "BENCH_MEMTABLE_MB",
            EngineOptions::default().memtable_bytes >> 20,
        ) << 20,
        ..EngineOptions::default()
    };
    if let Ok(dir) = std::env::var("BENCH_RSS_CHILD") {
        rss_child(std::path::Path::new(&dir), opts, rss_keys, loaders);
        return;
    }
    let base = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("bench dir"),
    };
    let restore_keys = env("BENCH_RESTORE_KEYS", 1_000_000);
    let restore_chunk_bytes = env("BENCH_RESTORE_CHUNK_KB", 4096) << 10;
    if std::env::var("BENCH_ONLY_RESTORE").is_ok() {
        let r = restore(
            &base.path().join("restore"),
            opts,
            restore_keys,
            restore_chunk_bytes,
        );
        print_restore(&r, restore_chunk_bytes);
        println!(
            "{}",
            serde_json::json!({
                "bench": "tideline-engine-restore",
                "restore_keys": r.keys,
                "restore_mb_per_s": (r.user_bytes as f64 / 1e6 / r.total_secs * 10.0).round() / 10.0,
                "restore_apply_mb_per_s": (r.user_bytes as f64 / 1e6 / r.apply_secs * 10.0).round() / 10.0,
            })
        );
        return;
    }
    let upstream_txns = env("BENCH_UPSTREAM_TXNS", 1_000_000);
    if std::env::var("BENCH_ONLY_UPSTREAM").is_ok() {
        let rate = upstream(&base.path().join("upstream"), opts, upstream_txns);
        println!(
            "upstream apply: {upstream_txns} one-put transactions, grouped as a replica's backlog: {rate:>10.0} txn/s"
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "tideline-engine-upstream",
                "upstream_txns": upstream_txns,
                "upstream_txn_per_s": rate.round(),
            })
        );
        return;
    }
    let cache_bytes = opts.cache_bytes;
    let value = [1u8; 100];

    // 1. Concurrent single-put commits: the bare log and the engine, same writers. The two
    // alternate in rounds so that background noise on a shared machine hits both alike.
    let rounds = env("BENCH_ROUNDS", 4).max(1);
    let (wal_rate, engine_rate) = {
        let storage = FileStorage::new(base.path().join("bare")).expect("dir");
        let wal = Wal::open(Arc::new(storage), WalOptions::default()).expect("open log");
        let uuid = wal.server_uuid();
        let seq = AtomicU64::new(1);
        let engine = open_engine(&base.path().join("commits"), opts.clone());
        let (mut wal_secs, mut engine_secs, mut done) = (0.0, 0.0, 0);
        for round in 0..rounds {
            let per_round = commits / rounds;
            let r = concurrent_commits(writers, per_round, |w, i| {
                let txn = NewTransaction {
                    gtid: Gtid::new(uuid, seq.fetch_add(1, Ordering::SeqCst)).expect("gtid"),
                    timestamp_us: 0,
                    ops: vec![Op::Put {
                        tree: "default".into(),
                        key: format!("r{round}-w{w}-{i}").into_bytes(),
                        value: value.to_vec(),
                        before: None,
                    }],
                };
                wal.append(txn).expect("append");
            });
            wal_secs += r.1;
            let r = concurrent_commits(writers, per_round, |w, i| {
                engine
                    .put("default", format!("r{round}-w{w}-{i}").as_bytes(), &value)
                    .expect("put");
            });
            engine_secs += r.1;
            done += r.0;
        }
        engine.close().expect("close");
        (done as f64 / wal_secs, done as f64 / engine_secs)
    };
    println!("commits, {writers} writers, sync, 1 put of 100 B each:");
    println!("  bare log : {wal_rate:>10.0} txn/s");
    println!(
        "  engine   : {engine_rate:>10.0} txn/s  ({:.0}% of the bare log)",
        100.0 * engine_rate / wal_rate
    );
    let mut goals = Goals::default();
    goals.add(
        &format!("engine commits / bare log, {writers} writers, sync"),
        engine_rate / wal_rate,
        0.9,
        "x",
        true,
    );

    if std::env::var("BENCH_ONLY_COMMITS").is_ok() {
        goals.print();
        return;
    }

    // 2 + 3. Batch load with concurrent point reads; idle read latency first.
    let engine = open_engine(&base.path().join("load"), opts.clone());
    let loaded = AtomicU64::new(0);
    // The load alone: nothing else runs.
    let start = Instant::now();
    load(&engine, 0, load_puts, loaders, txn_puts, &loaded);
    let load_secs = start.elapsed().as_secs_f64();
    let load_rate = load_puts as f64 / load_secs;
    let preload = load_puts;
    settle(&engine);
    let stop = AtomicBool::new(false);
    let idle_secs = env("BENCH_IDLE_SECS", 2);
    let idle = std::thread::scope(|s| {
        let hs: Vec<_> = (0..readers)
            .map(|r| {
                s.spawn({
                    let (engine, loaded, stop) = (&engine, &loaded, &stop);
                    move || reader(engine, loaded, stop, 0x1234 + r)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(idle_secs));
        stop.store(true, Ordering::SeqCst);
        hs.into_iter()
            .map(|h| h.join().expect("reader"))
            .collect::<Vec<_>>()
    });
    let idle_gets: u64 = idle.iter().map(|r| r.0).sum();
    let idle_rate = idle_gets as f64 / idle_secs as f64;
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
    goals.add(
        &format!("batch load, transactions of {txn_puts} puts"),
        load_rate,
        1_000_000.0,
        "puts/s",
        true,
    );
    goals.add(
        &format!("point gets idle, {readers} readers"),
        idle_rate,
        1_000_000.0,
        "gets/s",
        true,
    );
    goals.add(
        "point gets during a load / idle",
        busy_rate / idle_rate,
        0.5,
        "x",
        true,
    );
    if std::env::var("BENCH_ONLY_LOAD").is_ok() {
        let goals = goals.print();
        println!(
            "{}",
            serde_json::json!({
                "bench": "tideline-engine-load",
                "goals": goals,
                "load_puts_per_s": load_rate.round(),
                "load_with_readers_puts_per_s": busy_load_rate.round(),
                "idle_gets_per_s": idle_rate.round(),
                "idle_p99_ns": idle_p99,
                "load_gets_per_s": busy_rate.round(),
                "load_p99_ns": busy_p99,
            })
        );
        return;
    }

    // 4. RSS after loading keys, in a fresh process so earlier steps do not count.
    let exe = std::env::current_exe().expect("current exe");
    let out = std::process::Command::new(exe)
        .env("BENCH_RSS_CHILD", base.path())
        .output()
        .expect("run the RSS step");
    let line = String::from_utf8_lossy(&out.stdout);
    let rss: serde_json::Value = line
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "RSS step printed no JSON: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let rss_after = rss["rss_bytes"].as_u64().unwrap_or(0);
    let rss_open = rss["rss_bytes_engine_open"].as_u64().unwrap_or(0);
    println!(
        "RSS after loading {rss_keys} keys in a fresh process ({} puts/s): {} MiB (after opening \
         the engine: {} MiB; store cache {} MiB, memtables {} MiB, store on disk {} MiB)",
        rss["puts_per_s"],
        rss_after >> 20,
        rss_open >> 20,
        cache_bytes >> 20,
        rss["write_buffer_bytes"].as_u64().unwrap_or(0) >> 20,
        rss["disk_bytes"].as_u64().unwrap_or(0) >> 20,
    );

    // 5. Bootstrap restore.
    let opts_upstream = opts.clone();
    let r = restore(
        &base.path().join("restore"),
        opts,
        restore_keys,
        restore_chunk_bytes,
    );
    print_restore(&r, restore_chunk_bytes);

    // 6. Upstream apply.
    let upstream_rate = upstream(&base.path().join("upstream"), opts_upstream, upstream_txns);
    println!(
        "upstream apply: {upstream_txns} one-put transactions, grouped as a replica's backlog: {upstream_rate:>10.0} txn/s"
    );
    // The engine side of issue 16's "apply only" row (`peer-bench replication` measures the
    // row itself, beside the bare log): 2.5x the 196k txn/s before the apply path's work.
    goals.add(
        "upstream apply (apply only)",
        upstream_rate,
        490_000.0,
        "txn/s",
        true,
    );
    let goals = goals.print();

    println!(
        "{}",
        serde_json::json!({
            "bench": "tideline-engine",
            "goals": goals,
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
            "rss_bytes_engine_open": rss_open,
            "cache_bytes": cache_bytes,
            "restore_keys": r.keys,
            "restore_mb_per_s": (r.user_bytes as f64 / 1e6 / r.total_secs * 10.0).round() / 10.0,
            "restore_apply_mb_per_s": (r.user_bytes as f64 / 1e6 / r.apply_secs * 10.0).round() / 10.0,
            "upstream_txns": upstream_txns,
            "upstream_txn_per_s": upstream_rate.round(),
        })
    );
}
