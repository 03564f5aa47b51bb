//! The abusive peers of `abuse.rs`: each kind of abuse as a function that runs it against a
//! node's address and returns how the node ended it ([`Tally`]), checking on the way every
//! answer docs/PROTOCOL.md promises (close codes, `Error` codes, streams granted). They run
//! in the test process; `abuse.rs` decides where (which CPUs, [`cpus`]) and checks the totals.
#![allow(dead_code, reason = "shared with the test file, which uses all of it")]

pub mod cpus;
pub mod observe;
pub mod tail;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use tideline_stream::proto::{self, Frame, FrameDecoder, Limits, Request, Response};
use tideline_stream::{ErrorCode, tls};

use crate::common::Node;

/// The node's handshake timeout (docs/PROTOCOL.md; `ServerConfig::new`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The node's hello timeout: its whole `Hello` within this of TLS finishing (docs/PROTOCOL.md).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// Scheduling slack on top of it: two shared cores run the node (a debug build in CI, where a
/// TLS handshake costs milliseconds of CPU), the 1,100 peers and the tail, and the node's
/// timers fire late while it works through the flood's handshakes.
pub const SLACK: Duration = Duration::from_secs(20);

/// A bare quinn endpoint trusting the cluster CA, for peers that misbehave on purpose; they
/// never give up by themselves: only the node may end their connections.
pub fn raw_endpoint(node: &Node) -> quinn::Endpoint {
    crate::common::raw_endpoint(&node.secrets(), Duration::from_secs(120))
}

pub fn hello(token: &str) -> Vec<u8> {
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
pub fn answer(body: &[u8]) -> Response {
    let mut dec = FrameDecoder::new(Limits::default());
    dec.feed(body);
    match dec.next_frame::<Response>() {
        Ok(Some(Frame::Message(m))) => m,
        other => panic!("expected a message, got {other:?} ({} bytes)", body.len()),
    }
}

/// The application close code a connection ended with; `None` for any other end (a closed
/// endpoint, a timeout of the peer's own, a reset).
pub fn close_code(e: &quinn::ConnectionError) -> Option<u64> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    }
}

/// How an abusive connection ended without an application close code.
#[derive(Debug, Clone, Copy)]
pub enum Unclosed {
    /// Refused or closed during the handshake.
    Refused,
    /// No outcome within [`HANDSHAKE_WAIT`].
    Unanswered,
}

/// How the abusive connections ended.
#[derive(Default, Debug)]
pub struct Tally {
    pub attempts: u64,
    /// Closed by the node with an application code, by code.
    pub closed: std::collections::BTreeMap<u64, u64>,
    /// Refused before TLS finished (eviction or Retry on a handshake in progress).
    pub refused_in_handshake: u64,
    /// Neither finished nor refused within [`HANDSHAKE_WAIT`] on the peer's side: the node's
    /// answer (or the peer's packets) lost in the flood. The node's own counts must still
    /// show it ended them (checked in `run`).
    pub unanswered: u64,
    /// Longest time from the client's first packet to the end.
    pub slowest: Duration,
}

impl Tally {
    pub fn add(&mut self, end: Result<u64, Unclosed>, took: Duration) {
        self.attempts += 1;
        match end {
            Ok(code) => *self.closed.entry(code).or_default() += 1,
            Err(Unclosed::Refused) => self.refused_in_handshake += 1,
            Err(Unclosed::Unanswered) => self.unanswered += 1,
        }
        self.slowest = self.slowest.max(took);
    }

    pub fn merge(&mut self, other: Tally) {
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
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(30);

/// A connection that finishes TLS (or is refused during it) and then runs `act`; returns how
/// the node ended it (`Ok(code)`: closed with an application code after TLS; `Err(())`:
/// refused during the handshake, by eviction or the timeout) and how long after TLS finished.
/// Fails if the node has not ended it within the handshake timeout and slack of TLS
/// finishing.
pub async fn ended_by_node<F, Fut>(
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
pub async fn slow_connections(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    n: usize,
    token: String,
) -> Tally {
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
pub async fn unauthenticated_opens(
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
pub async fn forged_tokens(
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
            // When this peer handed its `Hello` to QUIC: after asking to connect, after TLS
            // finished on its side (both instants no later than the node's own starts).
            let handed = Arc::new(std::sync::Mutex::new(None::<(Duration, Duration)>));
            let asked = Instant::now();
            let handed_in = handed.clone();
            let (end, took) = ended_by_node(ep, addr, move |conn| async move {
                let tls_done = Instant::now();
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    return;
                };
                if send.write_all(&hello(&forged)).await.is_err() {
                    return;
                }
                *handed_in.lock().expect("not poisoned") =
                    Some((asked.elapsed(), tls_done.elapsed()));
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
            let handed = *handed.lock().expect("not poisoned");
            // A peer that itself handed its `Hello` over late by the node's clocks (the
            // handshake timeout from its first packet, the hello timeout from TLS) may be
            // closed by them (code 2) instead: the attack generator's own CPU was late, which
            // says nothing of the node. Every other forged `Hello` must get its code.
            let late = match handed {
                Some((from_connect, from_tls)) => {
                    from_connect >= HANDSHAKE_TIMEOUT || from_tls >= HELLO_TIMEOUT
                }
                None => true,
            };
            if let Ok(code) = end {
                assert!(
                    code == want || (code == 2 && late),
                    "close code {code} for a forged hello, want {want} (oversized: {oversized}; \
                     Hello handed to QUIC (after connect, after TLS) {handed:?}; closed {took:?} \
                     after TLS finished on the client's side)"
                );
                if code != want {
                    eprintln!(
                        "abuse: a forged Hello handed over late ({handed:?} after connect, TLS) \
                         was closed by the node's timeout (code 2)"
                    );
                }
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
pub async fn authenticate(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
) -> quinn::Connection {
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
pub async fn authenticated_opens(
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
pub fn garbage_datagrams(addr: SocketAddr, n: usize, seed: u64) -> u64 {
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
