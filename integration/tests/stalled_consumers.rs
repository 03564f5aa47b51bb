//! Many consumers that stop reading must not grow a real `tideline serve` by more than the
//! consumer buffer each (`--consumer-buffer-bytes`, 4 MiB by default; docs/PROTOCOL.md).
//!
//! Scenario: a log of 32 MiB (eight times the bound); 40 consumers, each on its own connection
//! through a UDP relay, subscribe from `earliest` and each receives its `Subscribed` and first
//! batch (checked); then each relay lets no more of the node's stream data through (after
//! 1.5 MiB), while keep-alives and acknowledgements still pass both ways. That is the
//! worst a consumer can do to the node's memory: the node keeps every byte it wrote for it
//! until that byte is acknowledged, and the consumer's credit (its 9 MiB stream window) lets
//! it write far more than the bound. The node's RSS growth, sampled throughout, must stay
//! within 40 × the bound plus a stated margin.
//!
//! Guards against the node buffering up to quinn's default send window (10 MB a connection)
//! for every consumer that stops: before `--consumer-buffer-bytes`, 40 of them grew the node by
//! 170–300 MiB. The canary runs the same harness with the buffer raised to 64 MiB (above the
//! consumers' credit, as before the bound existed) and asserts that the harness then reports
//! growth beyond the bound.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Node, rss_kib};
use tideline_stream::{Client, ClientConfig, Event, Start, tls};

/// Consumers that stop.
const CONSUMERS: u64 = 40;
/// The default `--consumer-buffer-bytes`, in KiB.
const BOUND_KIB: u64 = (tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT as u64) >> 10;
/// Allowance on top of `CONSUMERS × BOUND_KIB`: each connection's own state (TLS, quinn's
/// packet bookkeeping, the stream tasks; about 100 KiB a connection), the allocator's
/// rounding and the pages it keeps, the `status` requests the test polls with.
const MARGIN_KIB: u64 = 32 << 10;
/// What a relay lets through from the node before it stops: enough for the handshake,
/// `Subscribed` and the first batch (256 KiB) with room for retransmissions.
const RELAY_PASS_BYTES: u64 = 3 << 19;
/// The log: 32 MiB of 10 KB values, eight times the bound and more than a consumer's credit.
const LOG_BYTES: u64 = 32 << 20;

/// Datagrams from the node at most this long still pass a relay that has stopped: keep-alive
/// PINGs and ACKs (about 50 bytes), never stream data (full-size packets). Without them both
/// ends would close the connection after the 10 s idle timeout and free what the node holds.
const RELAY_SMALL_BYTES: usize = 200;

/// A UDP relay between one consumer and the node: forwards everything the consumer sends,
/// and the node's datagrams until `pass_bytes` of them went through; after that only the
/// node's small ones (`RELAY_SMALL_BYTES`).
async fn relay(node: SocketAddr, pass_bytes: u64) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("relay front socket");
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("relay back socket");
    back.connect(node).await.expect("relay back connect");
    let addr = front.local_addr().expect("relay address");
    tokio::spawn(async move {
        let mut consumer: Option<SocketAddr> = None;
        let mut passed = 0u64;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((n, from)) = r else { return };
                    consumer = Some(from);
                    let _ = back.send(&up[..n]).await;
                }
                r = back.recv(&mut down) => {
                    let Ok(n) = r else { return };
                    if (passed < pass_bytes || n <= RELAY_SMALL_BYTES) && let Some(c) = consumer {
                        passed += n as u64;
                        let _ = front.send_to(&down[..n], c).await;
                    }
                }
            }
        }
    });
    addr
}

/// Loads `LOG_BYTES` of 10 KB values in transactions of 10 puts.
fn load_log(node: &Node) {
    use std::io::Write;
    let value = "x".repeat(10_000);
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", "10"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for i in 0..LOG_BYTES / 10_000 {
            writeln!(stdin, "big:{i:06}\t{value}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

/// Samples the node's RSS every 10 ms until dropped; `peak` holds the highest.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        RssSampler {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak so far; fails the test if the sampler died (it panics when `/proc` cannot be
    /// read).
    fn peak(&mut self, pid: u32) -> u64 {
        let now = rss_kib(pid);
        assert!(
            self.thread.as_ref().is_some_and(|t| !t.is_finished()),
            "the RSS sampler stopped: /proc/{pid}/status could not be read"
        );
        self.peak.fetch_max(now, Ordering::Relaxed).max(now)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the node's `status` says each live subscription was sent through, by remote address.
fn sent_through(node: &Node) -> Vec<u64> {
    let s = common::status(node);
    let mut v: Vec<u64> = s["consumers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["sent_through"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Runs the scenario against a node started with `extra` arguments; returns (RSS before the
/// consumers, peak RSS with them stopped), in KiB.
fn stop_consumers(extra: &[&str]) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Async durability: the log is loaded fast; what is measured does not depend on it. A
    // long idle timeout: a consumer whose relay has stopped hears only what the node does not
    // bundle with the data it retransmits, and must not be closed before the measurement.
    let args: Vec<&str> = ["--durability", "async", "--idle-timeout-ms", "120000"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let node = Node::start_with(&dir.path().join("n"), 0, &args);
    load_log(&node);
    let pid = node.pid();
    let rss_before = rss_kib(pid);
    let mut sampler = RssSampler::start(pid);
    let node_addr: SocketAddr = node.addr.parse().expect("the node's address");
    let mut cfg = ClientConfig::new(tls::load_client_dir(&node.secrets()).expect("secrets"));
    // The consumers hear nothing once their relay stops: they must not give up meanwhile.
    cfg.idle_timeout = Duration::from_secs(120);
    cfg.connect_timeout = Duration::from_secs(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Each consumer subscribes and receives its first batch, then stops reading; its relay
    // stops the node's stream data a little later. All at once, so that the measurement falls
    // within seconds of the stops.
    let started = Instant::now();
    let held = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..CONSUMERS {
            let cfg = cfg.clone();
            tasks.spawn(async move {
                // Forty handshakes at once on a loaded machine can outlast the node's 5 s
                // handshake timeout: a consumer tries again, as a real one would.
                let deadline = Instant::now() + Duration::from_secs(60);
                let client = loop {
                    let addr = relay(node_addr, RELAY_PASS_BYTES).await;
                    match Client::connect(&addr.to_string(), cfg.clone()).await {
                        Ok(c) => break c,
                        Err(e) if e.is_retryable() && Instant::now() < deadline => {
                            eprintln!("consumer {i} connects again: {e}");
                        }
                        Err(e) => panic!("consumer {i} could not connect: {e}"),
                    }
                };
                let mut sub = client
                    .subscribe(Start::Earliest, None, None, None)
                    .await
                    .unwrap_or_else(|e| panic!("consumer {i} could not subscribe: {e}"));
                let first = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match sub.next().await {
                            Ok(Some(Event::Batch(txns))) => return txns,
                            Ok(Some(_)) => continue,
                            other => panic!("consumer {i}: no first batch: {other:?}"),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| panic!("consumer {i} got no first batch within 30 s"));
                assert_eq!(
                    first.first().map(|t| t.offset.get()),
                    Some(1),
                    "consumer {i}'s first batch does not start at offset 1"
                );
                (client, sub)
            });
        }
        let mut held = Vec::new();
        while let Some(r) = tasks.join_next().await {
            held.push(r.expect("consumer task"));
        }
        held
    });
    eprintln!(
        "{CONSUMERS} consumers subscribed and took their first batch in {:?}",
        started.elapsed()
    );
    // Every consumer is listed; wait until what the node has written to them stops moving
    // (each is held by its window), then read the peak.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = sent_through(&node);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = sent_through(&node);
        if now.len() as u64 == CONSUMERS && now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node's writes to its {CONSUMERS} consumers did not settle within 30 s of the \
             last one subscribing (listed: {}): {now:?}",
            now.len()
        );
        last = now;
    }
    eprintln!("settled {:?} after the start", started.elapsed());
    let log_txns = LOG_BYTES / 100_000;
    assert!(
        last.iter().all(|&s| s < log_txns),
        "a consumer was sent the whole log ({log_txns} transactions): it did not stop: {last:?}"
    );
    let peak = sampler.peak(pid);
    eprintln!(
        "node RSS {rss_before} KiB -> peak {peak} KiB (+{} KiB) with {CONSUMERS} stopped \
         consumers (node args {extra:?}); sent through (transactions of 100 KB): {last:?}",
        peak.saturating_sub(rss_before)
    );
    drop(held);
    drop(rt);
    (rss_before, peak)
}

#[test]
fn forty_stopped_consumers_hold_at_most_the_consumer_buffer_each() {
    let (before, peak) = stop_consumers(&[]);
    let bound = CONSUMERS * BOUND_KIB + MARGIN_KIB;
    assert!(
        peak <= before + bound,
        "node RSS grew by {} KiB with {CONSUMERS} stopped consumers, more than {CONSUMERS} × \
         {BOUND_KIB} KiB + {MARGIN_KIB} KiB = {bound} KiB",
        peak - before
    );
}

/// Canary: with the buffer above the consumers' credit (what quinn's default 10 MB send window
/// gave before the bound), the same harness must report growth beyond the bound.
#[test]
fn canary_without_the_consumer_buffer_bound_the_node_grows_past_it() {
    let (before, peak) = stop_consumers(&["--consumer-buffer-bytes", &(64u64 << 20).to_string()]);
    let bound = CONSUMERS * BOUND_KIB + MARGIN_KIB;
    assert!(
        peak > before + bound,
        "the harness missed it: with a 64 MiB consumer buffer the node grew by only {} KiB, \
         within the {bound} KiB bound",
        peak.saturating_sub(before)
    );
}
