//! Abuse of a real `tideline serve` while a legitimate tail runs. At once (in full, as
//! `scripts/abuse` runs it; CI runs every kind scaled down, [`CI`]):
//!
//! - 1,000 slow connections: each finishes TLS and trickles a genuine `Hello` one byte every
//!   100 ms (too slow to finish within the 5 s handshake timeout);
//! - 10,000 stream opens on unauthenticated connections (100 connections × 100 attempts: one
//!   stream each is granted, the rest never are) and 10,000 on authenticated ones (10
//!   connections × 1,000 streams, each finished empty or carrying a garbage message);
//! - 200 `Hello`s with forged or random tokens (random, the real one with one character
//!   changed, empty, and 5,000 characters long);
//! - 100,000 garbage datagrams (random bytes; a quarter shaped like QUIC Initials);
//! - oversized frames: a 1 GiB message announced on an authenticated stream, a 1 MiB `Hello`
//!   on an unauthenticated one;
//! - 20 consumers that subscribe, take their first batch and never read again.
//!
//! Checks: every slow, unauthenticated and forged connection is refused or closed, with the
//! close code docs/PROTOCOL.md gives, within the handshake timeout (plus stated scheduling
//! slack); every garbage message and oversized frame gets `Error { InvalidRequest }` at once;
//! the node's RSS stays under a stated cap; a legitimate `tideline tail` run again and again
//! during the abuse delivers every transaction each time, and its throughput beside the
//! abuse is printed as a ratio of its throughput alone (the CI test does not assert the ratio:
//! two shared cores make it noisy; `scripts/abuse` runs the `#[ignore]`d variant, which
//! asserts ≥ 90% on a release build), with the node's own count of refusals by reason.
//!
//! Guards against any of these peers holding the node's memory or time without bound, or
//! crowding out real clients. The canary of the admission side is
//! `stream/tests/handshake_flood.rs`; the canary of the consumer buffer is
//! `stalled_consumers.rs`.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Node, rss_kib};
use rand::{Rng, RngCore, SeedableRng};
use tideline_stream::proto::{self, Frame, FrameDecoder, Limits, Request, Response};
use tideline_stream::{Client, ClientConfig, ErrorCode, Event, Start, tls};

/// The node's handshake timeout (docs/PROTOCOL.md; `ServerConfig::new`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Scheduling slack on top of it: two shared cores run the node (a debug build in CI, where a
/// TLS handshake costs milliseconds of CPU), the 1,100 peers and the tail, and the node's
/// timers fire late while it works through the flood's handshakes.
const SLACK: Duration = Duration::from_secs(20);
/// Consumers that subscribe and never read.
const NEVER_READING: u64 = 20;
/// Cap on the node's RSS growth during the abuse, in KiB: the never-reading consumers'
/// buffers (20 × 4 MiB), the handshakes in progress (at most 256, each with a 64 KiB receive
/// window and its TLS and quinn state, ~256 KiB together: 64 MiB), and 64 MiB for the
/// authenticated connections' streams, the legitimate tail and the allocator.
const RSS_CAP_GROWTH_KIB: u64 = NEVER_READING
    * ((tideline_stream::CONSUMER_BUFFER_BYTES_DEFAULT as u64) >> 10)
    + (64 << 10)
    + (64 << 10);

struct Scale {
    slow: usize,
    unauth_conns: usize,
    unauth_opens: usize,
    auth_conns: usize,
    auth_opens: usize,
    forged: usize,
    datagrams: usize,
    /// Transactions (of 10 puts of 100 bytes) the legitimate tail reads each round.
    tail_txns: u64,
}

/// The abuse of the issue, in full: run by `scripts/abuse`.
const FULL: Scale = Scale {
    slow: 1000,
    unauth_conns: 100,
    unauth_opens: 100,
    auth_conns: 10,
    auth_opens: 1000,
    forged: 200,
    datagrams: 100_000,
    tail_txns: 2_000,
};

/// Every kind of abuse, scaled for CI (a debug node on two cores shared with other tests):
/// still more slow and silent peers (320) than the node's handshake budget (256), so that the
/// budget refuses and evicts while the legitimate tail connects again and again.
const CI: Scale = Scale {
    slow: 300,
    unauth_conns: 20,
    unauth_opens: 100,
    auth_conns: 2,
    auth_opens: 500,
    forged: 40,
    datagrams: 20_000,
    tail_txns: 500,
};

/// A bare quinn endpoint trusting the cluster CA, for peers that misbehave on purpose.
fn raw_endpoint(node: &Node) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(tls::load_client_dir(&node.secrets()).expect("secrets").ca)
        .expect("CA");
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).expect("QUIC TLS");
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // The peers never give up by themselves: only the node may end their connections.
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(120)).expect("idle"),
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    client_cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(client_cfg);
    ep
}

fn hello(token: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    proto::encode_message(
        &Request::Hello {
            token: token.to_string(),
            client: "abuse".into(),
            protocol: proto::PROTOCOL_VERSION,
        },
        &mut buf,
    )
    .expect("encode hello");
    buf
}

/// The first frame of `body`, which must be a message.
fn answer(body: &[u8]) -> Response {
    let mut dec = FrameDecoder::new(Limits::default());
    dec.feed(body);
    match dec.next_frame::<Response>() {
        Ok(Some(Frame::Message(m))) => m,
        other => panic!("expected a message, got {other:?} ({} bytes)", body.len()),
    }
}

/// The application close code a connection ended with; `None` for any other end (a closed
/// endpoint, a timeout of the peer's own, a reset).
fn close_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

/// How an abusive connection ended without an application close code.
#[derive(Debug, Clone, Copy)]
enum Unclosed {
    /// Refused or closed during the handshake.
    Refused,
    /// No outcome within [`HANDSHAKE_WAIT`].
    Unanswered,
}

/// How the abusive connections ended.
#[derive(Default, Debug)]
struct Tally {
    attempts: u64,
    /// Closed by the node with an application code, by code.
    closed: std::collections::BTreeMap<u64, u64>,
    /// Refused before TLS finished (eviction or Retry on a handshake in progress).
    refused_in_handshake: u64,
    /// Neither finished nor refused within [`HANDSHAKE_WAIT`] on the peer's side: the node's
    /// answer (or the peer's packets) lost in the flood. The node's own counts must still
    /// show it ended them (checked in `run`).
    unanswered: u64,
    /// Longest time from the client's first packet to the end.
    slowest: Duration,
}

impl Tally {
    fn add(&mut self, end: Result<u64, Unclosed>, took: Duration) {
        self.attempts += 1;
        match end {
            Ok(code) => *self.closed.entry(code).or_default() += 1,
            Err(Unclosed::Refused) => self.refused_in_handshake += 1,
            Err(Unclosed::Unanswered) => self.unanswered += 1,
        }
        self.slowest = self.slowest.max(took);
    }

    fn merge(&mut self, other: Tally) {
        self.attempts += other.attempts;
        for (k, v) in other.closed {
            *self.closed.entry(k).or_default() += v;
        }
        self.refused_in_handshake += other.refused_in_handshake;
        self.unanswered += other.unanswered;
        self.slowest = self.slowest.max(other.slowest);
    }
}

/// Longest wait for a handshake to finish or be refused. Not a bound on the node: in the
/// flood a client's Initial (or the node's answer) can be lost (the garbage datagrams fill
/// the node's socket buffer) and the client's retransmits back off, 1, 2, 4, 8, 16, 32 s
/// after it, before the node has seen it at all, and a close the node sends during the
/// handshake, once lost, is never sent again (the node forgets the connection). A peer
/// with no outcome by then counts as unanswered; `run` checks the node's own counts.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);

/// A connection that finishes TLS (or is refused during it) and then runs `act`; returns how
/// the node ended it (`Ok(code)`: closed with an application code after TLS; `Err(())`:
/// refused during the handshake, by eviction or the timeout) and how long after TLS finished.
/// Fails if the node has not ended it within the handshake timeout and slack of TLS
/// finishing.
async fn ended_by_node<F, Fut>(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    act: F,
) -> (Result<u64, Unclosed>, Duration)
where
    F: FnOnce(quinn::Connection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let bound = HANDSHAKE_TIMEOUT + SLACK;
    let connecting = ep.connect(addr, tls::SERVER_NAME).expect("connect");
    let conn = match tokio::time::timeout(HANDSHAKE_WAIT, connecting).await {
        Err(_) => return (Err(Unclosed::Unanswered), HANDSHAKE_WAIT),
        Ok(Err(_)) => return (Err(Unclosed::Refused), Duration::ZERO),
        Ok(Ok(c)) => c,
    };
    let start = Instant::now();
    let closed = conn.clone();
    let acting = async move {
        act(conn).await;
        std::future::pending::<()>().await;
    };
    let end = tokio::time::timeout(bound, async move {
        tokio::select! {
            e = closed.closed() => e,
            () = acting => unreachable!("a pending future never completes"),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the node did not close an abusive connection within {bound:?}"));
    // The node's side of TLS may end after the client's: a close then is still one during
    // the handshake (no application code).
    (close_code(&end).ok_or(Unclosed::Refused), start.elapsed())
}

/// 1,000 connections trickling a genuine `Hello`, one byte every 100 ms.
async fn slow_connections(ep: quinn::Endpoint, addr: SocketAddr, n: usize, token: String) -> Tally {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (ep, hello) = (ep.clone(), hello(&token));
        tasks.spawn(ended_by_node(ep, addr, move |conn| async move {
            let Ok((mut send, _recv)) = conn.open_bi().await else {
                return;
            };
            for b in hello {
                if send.write_all(&[b]).await.is_err() {
                    return;
                }
                // Pacing of the trickle, not synchronisation.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let mut tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let (end, took) = r.expect("slow connection task");
        tally.add(end, took);
    }
    tally
}

/// Unauthenticated connections that try to open `opens` streams each and send nothing.
/// Returns the tally and the most streams any one of them was granted.
async fn unauthenticated_opens(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    conns: usize,
    opens: usize,
) -> (Tally, u64) {
    let granted_max = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (ep, granted_max) = (ep.clone(), granted_max.clone());
        tasks.spawn(ended_by_node(ep, addr, move |conn| async move {
            let mut held = Vec::new();
            for _ in 0..opens {
                // A zero timeout polls once: stream credit is in the transport parameters.
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::ZERO, conn.open_bi()).await {
                    held.push(s);
                }
            }
            granted_max.fetch_max(held.len() as u64, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }));
    }
    let mut tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let (end, took) = r.expect("unauthenticated task");
        tally.add(end, took);
    }
    (tally, granted_max.load(Ordering::SeqCst))
}

/// `Hello`s with forged and random tokens; each must get `Error { Unauthorized }` (or, for
/// the oversized one, `InvalidRequest`) and the matching close code.
async fn forged_tokens(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    n: usize,
    token: String,
    seed: u64,
) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let forged = match i % 4 {
            0 => (0..token.len())
                .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
                .collect(),
            1 => {
                let mut t = token.clone().into_bytes();
                let at = rng.random_range(0..t.len());
                t[at] = if t[at] == b'0' { b'1' } else { b'0' };
                String::from_utf8(t).expect("hex token")
            }
            2 => String::new(),
            _ => "f".repeat(5000),
        };
        let ep = ep.clone();
        tasks.spawn(async move {
            let oversized = forged.len() > 4096;
            let (end, took) = ended_by_node(ep, addr, move |conn| async move {
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    return;
                };
                if send.write_all(&hello(&forged)).await.is_err() {
                    return;
                }
                let _ = send.finish();
                if let Ok(body) = recv.read_to_end(64 << 10).await {
                    let want = if oversized {
                        ErrorCode::InvalidRequest
                    } else {
                        ErrorCode::Unauthorized
                    };
                    match answer(&body) {
                        Response::Error { code, .. } => assert_eq!(code, want, "forged hello"),
                        other => panic!("a forged token got {other:?}"),
                    }
                }
            })
            .await;
            let want = if oversized { 2 } else { 1 };
            if let Ok(code) = end {
                assert_eq!(
                    code, want,
                    "close code for a forged hello (oversized: {oversized})"
                );
            }
            (end, took)
        });
    }
    let mut tally = Tally::default();
    while let Some(r) = tasks.join_next().await {
        let (end, took) = r.expect("forged task");
        tally.add(end, took);
    }
    tally
}

/// Authenticates a raw connection.
async fn authenticate(ep: &quinn::Endpoint, addr: SocketAddr, token: &str) -> quinn::Connection {
    let conn = ep
        .connect(addr, tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS with the node");
    let (mut send, mut recv) = conn.open_bi().await.expect("hello stream");
    send.write_all(&hello(token)).await.expect("hello");
    let _ = send.finish();
    let body = recv.read_to_end(64 << 10).await.expect("welcome");
    assert!(
        matches!(answer(&body), Response::Welcome { .. }),
        "an authenticated peer was not welcomed"
    );
    conn
}

/// Authenticated connections opening `opens` streams each: even ones finished empty, odd ones
/// carrying a garbage message (answered `InvalidRequest`), and one announcing a 1 GiB message
/// (answered `InvalidRequest` at once). Returns the streams opened.
async fn authenticated_opens(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    conns: usize,
    opens: usize,
    token: String,
    seed: u64,
) -> u64 {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let (ep, token) = (ep.clone(), token.clone());
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ c as u64);
            let conn = authenticate(&ep, addr, &token).await;
            // The oversized frame: refused before its body.
            let (mut send, mut recv) = conn.open_bi().await.expect("stream");
            let mut header = (1u32 << 30).to_le_bytes().to_vec();
            header.push(proto::KIND_MESSAGE);
            send.write_all(&header).await.expect("header");
            let body = tokio::time::timeout(SLACK, recv.read_to_end(64 << 10))
                .await
                .expect("a 1 GiB frame header was not refused at once")
                .expect("the answer to a 1 GiB frame header");
            assert!(
                matches!(
                    answer(&body),
                    Response::Error {
                        code: ErrorCode::InvalidRequest,
                        ..
                    }
                ),
                "a 1 GiB frame got another answer"
            );
            let mut opened = 1u64;
            for i in 0..opens {
                let (mut send, mut recv) = conn.open_bi().await.expect("stream");
                opened += 1;
                if i % 2 == 1 {
                    // Random bytes that happen to be a valid request (a unit variant needs
                    // little more than its tag) would be served as one: draw again.
                    let garbage = loop {
                        let mut g = vec![0u8; rng.random_range(1..512)];
                        rng.fill_bytes(&mut g);
                        if proto::decode_message::<Request>(&g).is_err() {
                            break g;
                        }
                    };
                    let mut frame = (garbage.len() as u32).to_le_bytes().to_vec();
                    frame.push(proto::KIND_MESSAGE);
                    frame.extend_from_slice(&garbage);
                    send.write_all(&frame).await.expect("garbage");
                }
                let _ = send.finish();
                let body = tokio::time::timeout(SLACK, recv.read_to_end(64 << 10))
                    .await
                    .expect("a stream was not answered or ended within the slack")
                    .expect("the answer");
                if i % 2 == 1 {
                    assert!(
                        matches!(
                            answer(&body),
                            Response::Error {
                                code: ErrorCode::InvalidRequest,
                                ..
                            }
                        ),
                        "a garbage message got another answer"
                    );
                } else {
                    assert!(body.is_empty(), "an empty stream got an answer");
                }
            }
            conn.close(0u32.into(), b"done");
            opened
        });
    }
    let mut opened = 0;
    while let Some(r) = tasks.join_next().await {
        opened += r.expect("authenticated task");
    }
    opened
}

/// Random datagrams at the node's port; a quarter shaped like QUIC v1 Initials (long header,
/// padded to 1,200 bytes) so that the node's packet parser, not just its header check, sees them.
fn garbage_datagrams(addr: SocketAddr, n: usize, seed: u64) -> u64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut sent = 0;
    let mut buf = vec![0u8; 1400];
    for i in 0..n {
        let len = if i % 4 == 0 {
            1200
        } else {
            rng.random_range(1..1400)
        };
        rng.fill_bytes(&mut buf[..len]);
        if i % 4 == 0 {
            buf[0] = 0xc0 | (buf[0] & 0x0f);
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = 8;
        }
        if socket.send_to(&buf[..len], addr).is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Runs `tideline tail --from earliest --limit N` and returns its duration; fails unless it
/// delivered exactly offsets 1..=N. A tail that could not run to the end (it could not
/// connect, or the node closed it) is an `Err` with its stderr.
fn tail_round(node: &Node, txns: u64) -> Result<Duration, String> {
    let start = Instant::now();
    let out = node
        .cli()
        .args(["tail", "--node", &node.addr, "--from", "earliest"])
        .args(["--limit", &txns.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("run tideline tail");
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "after {took:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut want = 1u64;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(
            v["offset"].as_u64(),
            Some(want),
            "the legitimate tail skipped or repeated"
        );
        want += 1;
    }
    assert_eq!(
        want - 1,
        txns,
        "the legitimate tail delivered {} of {txns}",
        want - 1
    );
    Ok(took)
}

/// What the legitimate tail did during the abuse.
struct TailRun {
    txn_s: f64,
    rounds: u64,
    /// Rounds that could not run to the end, with the tail's stderr.
    failed: Vec<String>,
}

/// Tail rounds until `stop` is set (at least one).
fn tail_rounds(node: &Node, txns: u64, stop: &AtomicBool) -> TailRun {
    let (mut total, mut rounds, mut failed) = (Duration::ZERO, 0u64, Vec::new());
    loop {
        match tail_round(node, txns) {
            Ok(took) => {
                total += took;
                rounds += 1;
            }
            Err(e) => failed.push(e),
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    TailRun {
        txn_s: (txns * rounds) as f64 / total.as_secs_f64(),
        rounds,
        failed,
    }
}

/// The node's `tideline_quic_refused_total` by reason, once the admin's sampler (every
/// second) has caught up: two reads a sampling period apart agree.
fn refused_by_reason(node: &Node) -> std::collections::BTreeMap<String, u64> {
    use std::io::{Read, Write};
    let admin = node.admin.as_deref().expect("the node runs its HTTP admin");
    let read = || {
        let mut s = std::net::TcpStream::connect(admin).expect("connect to the admin listener");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").expect("request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read /metrics");
        let mut by = std::collections::BTreeMap::new();
        for line in raw.lines() {
            let Some(rest) = line.strip_prefix("tideline_quic_refused_total{reason=\"") else {
                continue;
            };
            let (reason, value) = rest.split_once("\"} ").expect("a labelled sample");
            by.insert(reason.to_string(), value.trim().parse().expect("a count"));
        }
        by
    };
    let mut last = read();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(1100));
        let now = read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Loads `txns` transactions of 10 puts of 100 bytes.
fn load_log(node: &Node, txns: u64) {
    use std::io::Write;
    let value = "v".repeat(100);
    let mut child = node
        .cli()
        .args(["load", "--node", &node.addr, "--batch", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("run tideline load");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        for i in 0..txns * 10 {
            writeln!(stdin, "k:{i:08}\t{value}").expect("write to load");
        }
    }
    assert!(child.wait().expect("wait for load").success());
}

/// Sets its flags when dropped (also while unwinding).
struct StopOnDrop<'a>([&'a AtomicBool; 2]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for flag in self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Everything the run measured.
struct Report {
    tail_alone_txn_s: f64,
    tail_abused_txn_s: f64,
    rss_growth_kib: u64,
}

fn run(scale: &Scale) -> Report {
    let seed: u64 = std::env::var("TIDELINE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("abuse: seed {seed} (replay with TIDELINE_TEST_SEED={seed})");
    let dir = tempfile::tempdir().expect("tempdir");
    // Async durability: the log loads fast; nothing here depends on it.
    // The HTTP admin: the node's own count of the connections it refused, by reason.
    let node = Node::start_with(
        &dir.path().join("n"),
        0,
        &["--durability", "async", "--http", "127.0.0.1:0"],
    );
    load_log(&node, scale.tail_txns);
    let addr: SocketAddr = node.addr.parse().expect("the node's address");
    let token = tls::load_client_dir(&node.secrets())
        .expect("secrets")
        .token;

    // The legitimate tail alone: at least three rounds and two seconds.
    let t0 = Instant::now();
    let (mut alone, mut rounds) = (Duration::ZERO, 0u64);
    while rounds < 3 || t0.elapsed() < Duration::from_secs(2) {
        alone += tail_round(&node, scale.tail_txns)
            .unwrap_or_else(|e| panic!("the legitimate tail failed with no abuse: {e}"));
        rounds += 1;
    }
    let tail_alone = (scale.tail_txns * rounds) as f64 / alone.as_secs_f64();

    let pid = node.pid();
    let rss_before = rss_kib(pid);
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let abuse_done = AtomicBool::new(false);
    let (tail, outcome) = std::thread::scope(|s| {
        // A failed check below unwinds through here: stop the tail and the sampler, or the
        // scope would wait for them for ever.
        let _stop = StopOnDrop([&abuse_done, &*stop]);
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let tail = s.spawn(|| tail_rounds(&node, scale.tail_txns, &abuse_done));
        let datagrams = s.spawn(|| garbage_datagrams(addr, scale.datagrams, seed));
        let outcome = rt.block_on(async {
            let ep = raw_endpoint(&node);
            // Never-reading consumers: subscribed, first batch taken, then left alone.
            let mut cfg =
                ClientConfig::new(tls::load_client_dir(&node.secrets()).expect("secrets"));
            cfg.connect_timeout = Duration::from_secs(30);
            let mut never_reading = Vec::new();
            for i in 0..NEVER_READING {
                let client = Client::connect(&node.addr, cfg.clone())
                    .await
                    .unwrap_or_else(|e| panic!("never-reading consumer {i}: {e}"));
                let mut sub = client
                    .subscribe(Start::Earliest, None, None, None)
                    .await
                    .expect("subscribe");
                loop {
                    match sub.next().await {
                        Ok(Some(Event::Batch(_))) => break,
                        Ok(Some(_)) => {}
                        other => panic!("never-reading consumer {i}: no first batch: {other:?}"),
                    }
                }
                never_reading.push((client, sub));
            }
            // The floods of unauthenticated peers first, together; then, once their handshakes
            // no longer crowd the budget (where a forged hello or an authenticating peer could
            // be evicted before its answer, which would prove nothing), forged tokens and
            // authenticated stream opens, together.
            let slow = tokio::spawn(slow_connections(
                ep.clone(),
                addr,
                scale.slow,
                token.clone(),
            ));
            let unauth = tokio::spawn(unauthenticated_opens(
                ep.clone(),
                addr,
                scale.unauth_conns,
                scale.unauth_opens,
            ));
            let slow = slow.await.expect("slow connections");
            let (unauth, granted) = unauth.await.expect("unauthenticated opens");
            let forged = tokio::spawn(forged_tokens(
                ep.clone(),
                addr,
                scale.forged,
                token.clone(),
                seed,
            ));
            let auth = tokio::spawn(authenticated_opens(
                ep.clone(),
                addr,
                scale.auth_conns,
                scale.auth_opens,
                token.clone(),
                seed,
            ));
            let forged = forged.await.expect("forged tokens");
            let auth = auth.await.expect("authenticated opens");
            // A real client still gets in and is served after all that.
            let client = Client::connect(&node.addr, cfg.clone())
                .await
                .expect("a real client connects after the abuse");
            client.status().await.expect("status after the abuse");
            drop(never_reading);
            (slow, unauth, granted, forged, auth)
        });
        let sent = datagrams.join().expect("datagrams");
        abuse_done.store(true, Ordering::SeqCst);
        let tail = tail.join().expect("legitimate tail");
        stop.store(true, Ordering::SeqCst);
        sampler
            .join()
            .expect("RSS sampler (it fails when /proc cannot be read)");
        (tail, (outcome, sent))
    });
    let ((slow, unauth, granted, forged, auth_opened), datagrams) = outcome;
    let rss_peak = peak.load(Ordering::SeqCst).max(rss_kib(pid));
    let growth = rss_peak.saturating_sub(rss_before);
    eprintln!("abuse: slow connections {slow:?}");
    eprintln!(
        "abuse: unauthenticated stream opens: {} attempts on {unauth:?}; most granted on one connection: {granted}",
        scale.unauth_conns * scale.unauth_opens
    );
    eprintln!("abuse: forged tokens {forged:?}");
    eprintln!(
        "abuse: authenticated streams opened {auth_opened}; garbage datagrams sent {datagrams}"
    );
    eprintln!(
        "abuse: node RSS {rss_before} KiB -> peak {rss_peak} KiB (+{growth} KiB; cap +{RSS_CAP_GROWTH_KIB} KiB)"
    );
    let tail_abused = tail.txn_s;
    eprintln!(
        "abuse: legitimate tail alone {tail_alone:.0} txn/s ({rounds} rounds), during the abuse \
         {tail_abused:.0} txn/s ({} rounds, {} failed): {:.2}x",
        tail.rounds,
        tail.failed.len(),
        tail_abused / tail_alone
    );
    for e in &tail.failed {
        eprintln!("abuse: a legitimate tail round failed {e}");
    }
    let refused = refused_by_reason(&node);
    eprintln!("abuse: the node refused, by reason: {refused:?}");
    assert!(
        tail.failed.is_empty(),
        "{} legitimate tail rounds failed during the abuse (above)",
        tail.failed.len()
    );
    assert_eq!(slow.attempts as usize, scale.slow);
    assert_eq!(unauth.attempts as usize, scale.unauth_conns);
    assert_eq!(forged.attempts as usize, scale.forged);
    assert_eq!(
        granted, 1,
        "an unauthenticated connection was granted {granted} streams"
    );
    // Slow and silent unauthenticated peers end by the handshake timeout (close code 2) or by
    // eviction (3, at whatever stage of TLS the node's side was), each within the bound
    // `ended_by_node` checks, or are refused during the handshake.
    let mut all = Tally::default();
    all.merge(slow);
    all.merge(unauth);
    // Every slow and silent peer never authenticates: the node must have ended each one
    // (refused at the door, evicted, or timed out), whether or not the peer heard of it. The
    // node's counts also hold the legitimate tail's refused attempts, hence `>=`.
    let at_budget: u64 = ["handshakes_full", "handshake_evicted", "handshake_timeout"]
        .iter()
        .map(|r| refused.get(*r).copied().unwrap_or(0))
        .sum();
    assert!(
        at_budget >= all.attempts,
        "the node ended {at_budget} unauthenticated connections, fewer than the {} slow and \
         silent peers ({} of them never heard back): {refused:?}",
        all.attempts,
        all.unanswered
    );
    for code in all.closed.keys() {
        assert!(
            [2, 3].contains(code),
            "an unauthenticated peer was closed with code {code}: {:?}",
            all.closed
        );
    }
    assert!(
        all.closed.get(&2).copied().unwrap_or(0) + all.closed.get(&3).copied().unwrap_or(0) > 0,
        "no unauthenticated peer was closed by the timeout or by eviction: {:?}",
        all.closed
    );
    assert_eq!(
        auth_opened as usize,
        scale.auth_conns * (scale.auth_opens + 1)
    );
    assert!(
        growth <= RSS_CAP_GROWTH_KIB,
        "node RSS grew by {growth} KiB under abuse, over the {RSS_CAP_GROWTH_KIB} KiB cap"
    );
    Report {
        tail_alone_txn_s: tail_alone,
        tail_abused_txn_s: tail_abused,
        rss_growth_kib: growth,
    }
}

/// Every kind of abuse at CI scale; everything but the throughput ratio is asserted.
#[test]
fn abusive_peers_are_refused_in_time_and_a_legitimate_tail_keeps_going() {
    run(&CI);
}

/// `scripts/abuse`: the full abuse of the issue, everything but the ratio asserted.
#[test]
#[ignore = "1,100 handshakes and 100,000 datagrams: run by scripts/abuse on a release build"]
fn abusive_peers_in_full_are_refused_in_time_and_a_legitimate_tail_keeps_going() {
    run(&FULL);
}

/// `scripts/abuse`: the same run on a release build, asserting that the legitimate tail keeps
/// at least 90% of its throughput during the abuse.
#[test]
#[ignore = "a throughput ratio: run by scripts/abuse on a release build"]
fn a_legitimate_tail_keeps_90_percent_of_its_throughput_under_abuse() {
    let scale = Scale {
        tail_txns: 20_000,
        ..FULL
    };
    let r = run(&scale);
    let ratio = r.tail_abused_txn_s / r.tail_alone_txn_s;
    eprintln!(
        "abuse ratio {ratio:.3} (alone {:.0} txn/s, abused {:.0} txn/s, RSS +{} KiB)",
        r.tail_alone_txn_s, r.tail_abused_txn_s, r.rss_growth_kib
    );
    assert!(
        ratio >= 0.9,
        "the legitimate tail kept {:.0}% of its throughput under abuse (goal ≥ 90%)",
        ratio * 100.0
    );
}
