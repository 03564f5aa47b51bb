//! The consumer's re-delivery bound after a crash (`TailConfig::checkpoint_interval`,
//! PROTOCOL.md): "after a crash of the consumer itself what it took since the last save is
//! delivered again: the batch it was taking, plus the batches it took within that interval".
//! `claims.rs` in the integration tests checks it for a consumer slower than the interval per
//! batch; this one checks it for a fast consumer, which takes many batches per interval.
//!
//! A consumer process (this test binary, run again as [`redelivery_child`]) tails a log of
//! 20,000 transactions of 1 KiB from a node in this process with a [`FileCheckpoint`], at
//! most ~10,000 a second (tens of batches a second, several per interval), and writes a
//! journal line per transaction (`offset nanoseconds`, nanoseconds on its own
//! monotonic clock, written with one `write` each, which a SIGKILL does not undo). It is
//! killed with SIGKILL once it has taken 5,000 (asserted: not all; the rest is in flight),
//! then run again with its checkpoint until it has taken everything.
//!
//! Checks: the checkpoint is not past what was taken (nothing missing); the second run starts
//! right after it; together the runs delivered every offset; and the bound. A save happens
//! when the consumer asks for the transaction after a batch's last, if `checkpoint_interval`
//! has passed since the previous save, before that call returns. So the first re-delivered
//! transaction was taken after the last save, and every batch the first run finished after the
//! checkpoint ended within the interval of that save: a re-delivered transaction taken later
//! than the interval after the first re-delivered one belongs to the batch in progress, at
//! most 257 of them (a batch is 256 KiB and one transaction more, each transaction > 1 KiB).
//! No margin is needed: every time compared comes from the consumer's own clock, and each
//! inequality holds however slowly the machine runs.
//!
//! Canary: [`canary_a_consumer_saving_too_rarely_breaks_the_bound`], the same consumer with
//! an interval of 60 s, checked against the documented 200 ms: the check must fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tideline_consumers::{FileCheckpoint, Position, TailConfig, TailStart, tail};
use tideline_stream::log_node::LogNode;
use tideline_stream::{ClientConfig, ServerConfig, ServerHandle, tls};
use tideline_wal::{FileStorage, Gtid, NewTransaction, Op, Wal, WalOptions};

const CHILD: &str = "redelivery_child";
const ENV_ADDR: &str = "TIDELINE_REDELIVERY_ADDR";
const ENV_SECRETS: &str = "TIDELINE_REDELIVERY_SECRETS";
const ENV_CHECKPOINT: &str = "TIDELINE_REDELIVERY_CHECKPOINT";
const ENV_JOURNAL: &str = "TIDELINE_REDELIVERY_JOURNAL";
const ENV_INTERVAL_MS: &str = "TIDELINE_REDELIVERY_INTERVAL_MS";
const ENV_LAST: &str = "TIDELINE_REDELIVERY_LAST";

/// Transactions in the log.
const TXNS: u64 = 20_000;
/// The first run is killed once it has taken this many.
const KILL_AFTER: u64 = 5_000;
/// Bytes of each transaction's value: every transaction is larger than 1 KiB on the wire.
const VALUE_BYTES: usize = 1024;
/// The documented interval (`TailConfig`'s default).
const INTERVAL: Duration = Duration::from_millis(200);
/// Most transactions of one batch: 256 KiB (`batch_bytes_target`) of transactions larger than
/// 1 KiB, and the one that crosses it.
const BATCH_TXNS_MAX: usize = (256 << 10) / VALUE_BYTES + 1;

/// The consumer process: runs only when the parent test sets its environment.
#[test]
fn redelivery_child() {
    let Ok(addr) = std::env::var(ENV_ADDR) else {
        return; // run as a test of its own: nothing to do
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let secrets = PathBuf::from(var(ENV_SECRETS));
    let interval: u64 = var(ENV_INTERVAL_MS).parse().expect("an interval in ms");
    let last: u64 = var(ENV_LAST).parse().expect("the last offset");
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(var(ENV_JOURNAL))
        .expect("open the journal");
    let mut cfg = TailConfig::new(
        addr,
        ClientConfig::new(tls::load_client_dir(&secrets).expect("the secrets")),
        TailStart::Earliest,
    );
    cfg.checkpoint_interval = Duration::from_millis(interval);
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let mut t = tail(
            cfg,
            Some(Box::new(FileCheckpoint::new(var(ENV_CHECKPOINT)))),
        );
        loop {
            let txn = match t.next().await {
                Some(Ok(txn)) => txn,
                other => panic!("the tail ended: {other:?}"),
            };
            let offset = txn.offset.get();
            let line = format!("{offset} {}\n", started.elapsed().as_nanos());
            journal
                .write_all(line.as_bytes())
                .expect("write the journal");
            if offset >= last {
                t.commit().expect("the final commit");
                return;
            }
            // Paced to at most ~10,000 a second (a batch in ~25 ms, several per interval):
            // a consumer this fast still takes many batches per interval, and a kill after
            // 5,000 lands more than an interval after the first save however fast the
            // machine, which the canary needs to see anything.
            if offset % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
}

/// A node serving a log of [`TXNS`] transactions of [`VALUE_BYTES`] on `rt` (the log is
/// written first, outside it: appends block).
fn start_node(dir: &Path, secrets: &Path, rt: &tokio::runtime::Runtime) -> ServerHandle {
    let wal = Wal::open(
        Arc::new(FileStorage::new(dir.join("log")).unwrap()),
        WalOptions::default(),
    )
    .unwrap();
    let origin = uuid::Uuid::new_v4();
    let value = vec![b'v'; VALUE_BYTES];
    let mut appended = Vec::new();
    for n in 1..=TXNS {
        let txn = NewTransaction {
            gtid: Gtid::new(origin, n).unwrap(),
            timestamp_us: 0,
            ops: vec![Op::Put {
                tree: "default".into(),
                key: format!("k{n:08}").into_bytes(),
                value: value.clone(),
                before: None,
            }],
        };
        appended.push(wal.submit(txn).unwrap());
    }
    for a in appended {
        a.wait().unwrap();
    }
    let node = Arc::new(LogNode::new(wal));
    let _in_rt = rt.enter();
    tideline_stream::serve(
        ServerConfig::new("127.0.0.1:0".parse().unwrap()),
        tls::load_server(secrets).unwrap(),
        node,
    )
    .unwrap()
}

/// One run of the consumer process, writing to `journal`.
fn spawn_consumer(addr: &str, dir: &Path, journal: &Path, interval: Duration) -> Child {
    Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--exact", CHILD, "--nocapture"])
        .env(ENV_ADDR, addr)
        .env(ENV_SECRETS, dir.join("secrets"))
        .env(ENV_CHECKPOINT, dir.join("tail.checkpoint"))
        .env(ENV_JOURNAL, journal)
        .env(ENV_INTERVAL_MS, interval.as_millis().to_string())
        .env(ENV_LAST, TXNS.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the consumer")
}

/// A journal's lines: (offset, nanoseconds on the consumer's clock). A line cut by the kill
/// (no newline) is not counted: its transaction was taken, but the test cannot tell when.
fn journal(path: &Path) -> Vec<(u64, u128)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            let (o, t) = l.split_once(' ').expect("a journal line is `offset nanos`");
            (o.parse().expect("an offset"), t.parse().expect("nanos"))
        })
        .collect()
}

/// Runs the consumer with `interval`, kills it mid-transfer, runs it again to the end; returns
/// the violations of the documented bound found (empty: none) and what it saw.
fn crash_round(interval: Duration) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = start_node(dir.path(), &secrets, &rt);
    let addr = server.local_addr().to_string();

    let first = dir.path().join("journal-1");
    let mut child = spawn_consumer(&addr, dir.path(), &first, interval);
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal(&first).len() < KILL_AFTER as usize {
        assert!(Instant::now() < deadline, "the consumer took too little");
        assert!(
            child.try_wait().expect("poll the consumer").is_none(),
            "the consumer exited before the kill"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL the consumer");
    child.wait().expect("reap the consumer");
    let run1 = journal(&first);
    let taken = run1.last().map_or(0, |l| l.0);
    assert!(
        taken < TXNS,
        "the consumer had taken everything before the kill: nothing was in flight"
    );
    let saved = std::fs::read(dir.path().join("tail.checkpoint")).expect("a checkpoint file");
    let checkpoint = Position::parse(&saved)
        .expect("the checkpoint parses")
        .offset;

    let second = dir.path().join("journal-2");
    let mut child = spawn_consumer(&addr, dir.path(), &second, interval);
    let status = child.wait().expect("wait for the consumer");
    assert!(status.success(), "the second run failed: {status}");
    let run2 = journal(&second);
    drop(server);

    let mut violations = Vec::new();
    let offsets1: Vec<u64> = run1.iter().map(|l| l.0).collect();
    let offsets2: Vec<u64> = run2.iter().map(|l| l.0).collect();
    assert_eq!(offsets1, (1..=taken).collect::<Vec<_>>(), "run 1 in order");
    if checkpoint > taken {
        violations.push(format!(
            "the checkpoint ({checkpoint}) is past what was taken ({taken})"
        ));
    }
    if offsets2 != (checkpoint + 1..=TXNS).collect::<Vec<_>>() {
        violations.push(format!(
            "run 2 did not deliver {}..={TXNS} in order (it delivered {} transactions from {:?})",
            checkpoint + 1,
            offsets2.len(),
            offsets2.first()
        ));
    }
    // Re-delivered: what run 1 took past the checkpoint. Taken "late": more than the
    // documented interval after the first of them; those must all be of the batch in progress.
    let again: Vec<(u64, u128)> = run1.iter().copied().filter(|l| l.0 > checkpoint).collect();
    let late = again.first().map_or(0, |&(_, t0)| {
        again
            .iter()
            .filter(|&&(_, t)| t >= t0 + INTERVAL.as_nanos())
            .count()
    });
    if late > BATCH_TXNS_MAX {
        violations.push(format!(
            "{late} re-delivered transactions were taken more than {INTERVAL:?} after the first \
             re-delivered one: more than the batch in progress ({BATCH_TXNS_MAX})"
        ));
    }
    let seen = format!(
        "interval {interval:?}: run 1 took 1..={taken} and was killed; checkpoint at \
         {checkpoint}: {} re-delivered, {late} of them taken later than {INTERVAL:?} after the \
         first",
        again.len()
    );
    eprintln!("{seen}; violations: {violations:?}");
    (violations, seen)
}

#[test]
fn a_fast_consumer_killed_mid_stream_re_delivers_within_the_documented_bound() {
    let (violations, seen) = crash_round(INTERVAL);
    assert!(violations.is_empty(), "{seen}: {violations:#?}");
}

/// The canary: a consumer that saves every 60 s instead of every 200 ms re-delivers far more
/// than the bound allows, and the round must say so.
#[test]
fn canary_a_consumer_saving_too_rarely_breaks_the_bound() {
    let (violations, seen) = crash_round(Duration::from_secs(60));
    assert!(
        violations.iter().any(|v| v.contains("batch in progress")),
        "with a 60 s interval the round found nothing: {seen}"
    );
}
