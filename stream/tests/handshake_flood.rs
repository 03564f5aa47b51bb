//! Peers that have not presented the cluster token must not be able to crowd out real
//! clients or make the server hold much for them. Scenarios:
//!
//! - 1,024 QUIC handshakes that never finish (real client Initials replayed through a relay
//!   that drops every answer, as a spoofing or abandoning peer would), then a real client
//!   still connects within its connect timeout;
//! - more peers than the connection cap that finish TLS but never send `Hello`, then a real
//!   client still connects;
//! - an unauthenticated peer may not announce a large first message (the server refuses it at
//!   once instead of waiting for megabytes) nor open a second stream before `Hello`;
//! - a peer that finished TLS and trickles its `Hello` (or sends none) is closed by the hello
//!   timeout (1 s after TLS), not left to the whole handshake timeout, while real clients
//!   still get in.
//!
//! Guards against the handshake budget being shared with authenticated connections, against
//! handshakes without address validation holding state, and against unauthenticated peers
//! getting the limits of authenticated ones. The canary switches the budget off
//! (`unsafe_no_handshake_budget`) and checks that every harness then reports the lockout.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{self, Request, Response};
use tideline_stream::{Client, ClientConfig, ClientError, ServerConfig, ServerHandle, tls};
use tideline_wal::{MemStorage, Wal, WalOptions};

struct Fixture {
    dir: tempfile::TempDir,
    server: ServerHandle,
    client_cfg: ClientConfig,
}

async fn start(tune: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let secrets = tls::load_server(dir.path()).expect("server secrets");
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("log"),
    ));
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"));
    tune(&mut cfg);
    let server = tideline_stream::serve(cfg, secrets, node).expect("serve");
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).expect("client secrets"));
    Fixture {
        dir,
        server,
        client_cfg,
    }
}

/// A bare quinn client endpoint that trusts the cluster CA and speaks `tideline/1`, for peers
/// that misbehave on purpose.
fn raw_endpoint(f: &Fixture) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(tls::load_client_dir(f.dir.path()).expect("secrets").ca)
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
    // The misbehaving peers stay silent, but must outlive the test's waits.
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(120)).expect("idle"),
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    client_cfg.transport_config(Arc::new(transport));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(client_cfg);
    ep
}

/// The destination connection id of a QUIC long-header packet (what a server puts there is
/// the connection id the client chose for itself): one per handshake answered.
fn long_header_dcid(datagram: &[u8]) -> Option<Vec<u8>> {
    if datagram.first()? & 0x80 == 0 {
        return None;
    }
    let len = *datagram.get(5)? as usize;
    datagram.get(6..6 + len).map(<[u8]>::to_vec)
}

/// Sends `flood` real client Initials through a relay that drops every answer, waits until
/// the server has answered each one (so it has seen them all), then connects a real client.
async fn connect_past_unfinished_handshakes(
    flood: usize,
    tune: impl FnOnce(&mut ServerConfig),
) -> Result<Client, ClientError> {
    // Long handshake and idle timeouts: the stuck handshakes must not simply expire before
    // the real client arrives.
    let f = start(|c| {
        c.handshake_timeout = Duration::from_secs(120);
        c.hello_timeout = Duration::from_secs(120);
        c.idle_timeout = Duration::from_secs(120);
        tune(c);
    })
    .await;
    let server_addr = f.server.local_addr();

    // The relay: real client Initials go to the server from the relay's socket; whatever the
    // server answers is dropped, so no handshake can finish.
    // Large socket buffers: a burst of 1,024 answers must not overflow the relay's queue on a
    // loaded machine (a dropped answer is only made up for by the client's slow retransmits).
    let relay = tideline_stream::udp::bind("127.0.0.1:0".parse().expect("addr"), 8 << 20)
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UdpSocket::from_std(s)
        })
        .expect("relay");
    let relay = Arc::new(relay);
    let relay_addr = relay.local_addr().expect("relay addr");
    let flood_ep = raw_endpoint(&f);
    let mut pending = Vec::with_capacity(flood);
    for _ in 0..flood {
        pending.push(
            flood_ep
                .connect(relay_addr, tls::SERVER_NAME)
                .expect("connect"),
        );
    }
    let mut answered: HashSet<Vec<u8>> = HashSet::new();
    let mut buf = vec![0u8; 65536];
    let limit = tokio::time::Instant::now() + Duration::from_secs(110);
    while answered.len() < flood {
        let (n, from): (usize, SocketAddr) =
            tokio::time::timeout_at(limit, relay.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the server answered only {} of {flood} handshakes",
                        answered.len()
                    )
                })
                .expect("relay recv");
        if from == server_addr {
            if let Some(dcid) = long_header_dcid(&buf[..n]) {
                answered.insert(dcid);
            }
        } else {
            relay
                .send_to(&buf[..n], server_addr)
                .await
                .expect("relay send");
        }
    }

    // Every stuck handshake has been answered (so the server has seen it); a real client
    // must still get in within its default connect timeout.
    let client = Client::connect(&server_addr.to_string(), f.client_cfg.clone()).await;
    if let Ok(c) = &client {
        assert_eq!(c.status().await.expect("status"), r#"{"last_offset":0}"#);
    }
    drop(pending);
    f.server.shutdown().await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_connects_past_1024_handshakes_that_never_finish() {
    connect_past_unfinished_handshakes(1024, |_| {})
        .await
        .expect("a real client connects past the stuck handshakes");
}

/// Connects `silent` peers that finish TLS but never send `Hello` to a server whose
/// connection cap is `cap`, then a real client.
async fn connect_past_silent_peers(
    cap: usize,
    silent: usize,
    tune: impl FnOnce(&mut ServerConfig),
) -> Result<Client, ClientError> {
    // Long handshake and hello timeouts: the silent peers must not simply expire.
    let f = start(|c| {
        c.max_connections = cap;
        c.handshake_timeout = Duration::from_secs(60);
        c.hello_timeout = Duration::from_secs(60);
        tune(c);
    })
    .await;
    let server_addr = f.server.local_addr();
    let ep = raw_endpoint(&f);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..silent {
        let connecting = ep.connect(server_addr, tls::SERVER_NAME).expect("connect");
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), connecting)
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    // Wait until every silent peer's handshake has an outcome.
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Some(conn) = r.expect("task") {
            held.push(conn);
        }
    }
    let client = Client::connect(&server_addr.to_string(), f.client_cfg.clone()).await;
    if let Ok(c) = &client {
        assert_eq!(c.status().await.expect("status"), r#"{"last_offset":0}"#);
    }
    drop(held);
    f.server.shutdown().await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_connects_past_more_silent_peers_than_the_connection_cap() {
    // More silent peers than the handshake budget (256) too, so that eviction is exercised.
    connect_past_silent_peers(16, 300, |_| {})
        .await
        .expect("a real client connects past the silent peers");
}

/// Peers that finished TLS and hold back their `Hello` take every place among the handshakes,
/// with a grace period far longer than the real client's connect timeout: the client still
/// gets in, because a place whose `Hello` is overdue (100 ms after TLS, or 4 round trips)
/// goes to a newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_whose_hello_is_overdue_goes_to_a_real_client_before_the_grace_period() {
    let started = std::time::Instant::now();
    connect_past_silent_peers(16, 8, |c| {
        c.handshakes_max = 8;
        c.handshake_grace = Duration::from_secs(50);
    })
    .await
    .expect("a real client gets a place held by a peer whose hello is overdue");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the real client got in only after the grace period"
    );
}

/// Canary: with the handshake budget switched off, both harnesses see the real client locked
/// out (smaller floods do: the cap is lowered to match).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_the_handshake_budget_real_clients_are_locked_out() {
    let legacy = |c: &mut ServerConfig| c.unsafe_no_handshake_budget = true;
    let r = connect_past_unfinished_handshakes(64, |c| {
        c.max_connections = 64;
        legacy(c);
    })
    .await;
    assert!(r.is_err(), "the flood harness missed the lockout");
    let r = connect_past_silent_peers(16, 32, legacy).await;
    assert!(r.is_err(), "the silent-peer harness missed the lockout");
    let f = start(legacy).await;
    assert!(
        second_stream_before_hello(&f).await,
        "the stream check missed the second stream"
    );
    assert!(
        !large_hello_refused_within(&f, Duration::from_secs(2)).await,
        "the hello check missed the large hello"
    );
    f.server.shutdown().await;
}

/// Announces a 1 MiB first message and returns whether the server refused it, with an error
/// naming `Hello`, within `bound`.
async fn large_hello_refused_within(f: &Fixture, bound: Duration) -> bool {
    let ep = raw_endpoint(f);
    let conn = ep
        .connect(f.server.local_addr(), tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut header = (1u32 << 20).to_le_bytes().to_vec();
    header.push(proto::KIND_MESSAGE);
    send.write_all(&header).await.expect("header");
    let Ok(answer) = tokio::time::timeout(bound, recv.read_to_end(64 << 10)).await else {
        return false;
    };
    let body = answer.unwrap_or_else(|e| panic!("the server closed without an answer: {e}"));
    let mut dec = proto::FrameDecoder::new(proto::Limits::default());
    dec.feed(&body);
    match dec.next_frame::<Response>() {
        Ok(Some(proto::Frame::Message(Response::Error { message, .. }))) => {
            assert!(message.contains("Hello"), "{message}");
            true
        }
        other => panic!("expected an error answer, got {other:?}"),
    }
}

/// Whether a peer that has not sent `Hello` can open a second stream. Then sends `Hello` and
/// checks that streams are granted.
async fn second_stream_before_hello(f: &Fixture) -> bool {
    let ep = raw_endpoint(f);
    let conn = ep
        .connect(f.server.local_addr(), tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS");
    let (mut hello_send, mut hello_recv) = conn.open_bi().await.expect("first stream");
    // A zero timeout polls once: the stream credit is in the transport parameters.
    let second = tokio::time::timeout(Duration::ZERO, conn.open_bi())
        .await
        .is_ok();
    let mut buf = Vec::new();
    proto::encode_message(
        &Request::Hello {
            token: f.client_cfg.secrets.token.clone(),
            client: "test".into(),
            protocol: proto::PROTOCOL_VERSION,
        },
        &mut buf,
    )
    .expect("encode");
    hello_send.write_all(&buf).await.expect("hello");
    let _ = hello_send.finish();
    let body = hello_recv.read_to_end(64 << 10).await.expect("welcome");
    let mut dec = proto::FrameDecoder::new(proto::Limits::default());
    dec.feed(&body);
    assert!(
        matches!(
            dec.next_frame::<Response>(),
            Ok(Some(proto::Frame::Message(Response::Welcome { .. })))
        ),
        "expected Welcome"
    );
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(
            tokio::time::timeout(Duration::from_secs(30), conn.open_bi())
                .await
                .expect("streams are granted after Hello")
                .expect("stream"),
        );
    }
    second
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_gets_a_small_first_message_and_one_stream() {
    // A long handshake timeout: a server that waits for a large hello's body would wait this
    // long, far beyond the bounded wait below.
    let f = start(|c| {
        c.handshake_timeout = Duration::from_secs(120);
        c.hello_timeout = Duration::from_secs(120);
    })
    .await;
    assert!(
        large_hello_refused_within(&f, Duration::from_secs(30)).await,
        "the server waited for a 1 MiB hello instead of refusing it"
    );
    assert!(
        !second_stream_before_hello(&f).await,
        "a second stream was allowed before the peer authenticated"
    );
    f.server.shutdown().await;
}

/// A UDP relay between one client and the server that holds every answer of the server to
/// the client until [`HoldingRelay::release`]: the client's handshake stays in progress on the
/// server (TLS sent, the client's `Finished` not yet back) for as long as the test needs.
struct HoldingRelay {
    addr: SocketAddr,
    release: Arc<tokio::sync::Notify>,
    answered: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingRelay {
    fn start(server: SocketAddr) -> HoldingRelay {
        let socket = tideline_stream::udp::bind("127.0.0.1:0".parse().expect("addr"), 4 << 20)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                tokio::net::UdpSocket::from_std(s)
            })
            .expect("relay");
        let addr = socket.local_addr().expect("relay addr");
        let release = Arc::new(tokio::sync::Notify::new());
        let answered = Arc::new(tokio::sync::Notify::new());
        let (rel, ans) = (release.clone(), answered.clone());
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut held: Option<Vec<Vec<u8>>> = Some(Vec::new());
            let mut buf = vec![0u8; 65536];
            let released = rel.notified();
            tokio::pin!(released);
            loop {
                tokio::select! {
                    r = socket.recv_from(&mut buf) => {
                        let (n, from) = r.expect("relay recv");
                        if from == server {
                            match (&mut held, client) {
                                (Some(h), _) => {
                                    h.push(buf[..n].to_vec());
                                    ans.notify_one();
                                }
                                (None, Some(c)) => {
                                    let _ = socket.send_to(&buf[..n], c).await;
                                }
                                (None, None) => {}
                            }
                        } else {
                            client = Some(from);
                            let _ = socket.send_to(&buf[..n], server).await;
                        }
                    }
                    () = &mut released, if held.is_some() => {
                        for d in held.take().unwrap_or_default() {
                            if let Some(c) = client {
                                let _ = socket.send_to(&d, c).await;
                            }
                        }
                    }
                }
            }
        });
        HoldingRelay {
            addr,
            release,
            answered,
            task,
        }
    }

    fn release(&self) {
        self.release.notify_one();
    }
}

impl Drop for HoldingRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real client (a raw connection, which never retries, so that only the server is judged)
/// starts its handshake through a relay that holds the server's answers; once the server has
/// answered it, `flood` peers connect directly and finish TLS without a `Hello`; then the
/// relay lets the real client finish and it sends its `Hello`. Returns how the real client
/// ended: `Ok` once welcomed, or the error it got.
async fn real_handshake_under_a_burst(
    flood: usize,
    tune: impl FnOnce(&mut ServerConfig),
) -> Result<(), String> {
    // Long timeouts: only eviction may end the real client's handshake.
    let f = start(|c| {
        c.handshakes_max = 8;
        c.handshake_timeout = Duration::from_secs(60);
        c.hello_timeout = Duration::from_secs(60);
        c.idle_timeout = Duration::from_secs(60);
        tune(c);
    })
    .await;
    let relay = HoldingRelay::start(f.server.local_addr());
    let real_ep = raw_endpoint(&f);
    let answered = relay.answered.notified();
    let connecting = real_ep
        .connect(relay.addr, tls::SERVER_NAME)
        .expect("connect");
    let real = tokio::spawn(async move {
        let conn = connecting.await.map_err(|e| format!("handshake: {e}"))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| format!("stream: {e}"))?;
        Ok::<_, String>((conn, send, recv))
    });
    tokio::time::timeout(Duration::from_secs(30), answered)
        .await
        .expect("the server answered the real client's first packet");
    // The burst: every peer's handshake has an outcome (finished TLS, or refused).
    let flood_ep = raw_endpoint(&f);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..flood {
        let connecting = flood_ep
            .connect(f.server.local_addr(), tls::SERVER_NAME)
            .expect("connect");
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(30), connecting)
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut held = Vec::new();
    while let Some(r) = tasks.join_next().await {
        held.extend(r.expect("flood task"));
    }
    relay.release();
    let token = f.client_cfg.secrets.token.clone();
    let outcome = async {
        let (conn, mut send, mut recv) = tokio::time::timeout(Duration::from_secs(30), real)
            .await
            .map_err(|_| "the real client's handshake did not end".to_string())?
            .expect("real client task")?;
        let mut hello = Vec::new();
        proto::encode_message(
            &Request::Hello {
                token,
                client: "real".into(),
                protocol: proto::PROTOCOL_VERSION,
            },
            &mut hello,
        )
        .expect("encode");
        send.write_all(&hello)
            .await
            .map_err(|e| format!("hello: {e}"))?;
        let _ = send.finish();
        let body = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 << 10))
            .await
            .map_err(|_| "no answer to the real client's hello".to_string())?
            .map_err(|e| format!("answer: {e} (closed: {:?})", conn.close_reason()))?;
        let mut dec = proto::FrameDecoder::new(proto::Limits::default());
        dec.feed(&body);
        match dec.next_frame::<Response>() {
            Ok(Some(proto::Frame::Message(Response::Welcome { .. }))) => Ok(()),
            other => Err(format!("answer to the real client's hello: {other:?}")),
        }
    }
    .await;
    drop(held);
    f.server.shutdown().await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_in_its_handshake_is_not_evicted_by_a_burst_of_newer_ones() {
    // A grace period far longer than the burst takes on a loaded machine (the default, 1 s,
    // is for a real client's round trips, not for 32 handshakes of a debug build).
    real_handshake_under_a_burst(32, |c| c.handshake_grace = Duration::from_secs(20))
        .await
        .expect("the real client is welcomed after the burst");
}

/// Canary: with no grace period (the oldest handshake is always evicted, as before it
/// existed) the same burst pushes the real client out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_the_grace_period_a_burst_evicts_a_real_client() {
    let r = real_handshake_under_a_burst(32, |c| c.handshake_grace = Duration::ZERO).await;
    let e = r.expect_err("the burst harness missed the eviction");
    eprintln!("the real client, evicted: {e}");
}

/// A client the node answers busy (here: its one authenticated connection taken) tries again
/// within its connect timeout, and gets in once a place frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_told_busy_tries_again_within_its_connect_timeout() {
    let observer = Arc::new(tideline_stream::Observer::new());
    let obs = observer.clone();
    let f = start(move |c| {
        c.max_connections = 1;
        c.observer = obs;
    })
    .await;
    let addr = f.server.local_addr().to_string();
    let mut cfg = f.client_cfg.clone();
    cfg.connect_timeout = Duration::from_secs(30);
    let holder = Client::connect(&addr, cfg.clone())
        .await
        .expect("the first client");
    let second = {
        let addr = addr.clone();
        tokio::spawn(async move { Client::connect(&addr, cfg).await })
    };
    // Once the node has refused the second client, the first leaves.
    let refused = tideline_stream::RefuseReason::MaxConnections;
    let limit = tokio::time::Instant::now() + Duration::from_secs(30);
    while observer.refused(refused) == 0 {
        assert!(
            tokio::time::Instant::now() < limit,
            "the node never refused the second client"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(holder);
    let second = second
        .await
        .expect("task")
        .expect("the second client gets in once the first has left");
    assert_eq!(
        second.status().await.expect("status"),
        r#"{"last_offset":0}"#
    );
    f.server.shutdown().await;
}

/// A peer that has finished TLS, opens its stream and then trickles a genuine `Hello` one byte
/// every `pace`; returns the application close code it was ended with (`None`: another end)
/// and how long after TLS finished on its side.
async fn trickled_hello_end(f: &Fixture, pace: Option<Duration>) -> (Option<u64>, Duration) {
    let ep = raw_endpoint(f);
    let conn = ep
        .connect(f.server.local_addr(), tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS");
    let tls_done = std::time::Instant::now();
    let mut hello = Vec::new();
    proto::encode_message(
        &Request::Hello {
            token: f.client_cfg.secrets.token.clone(),
            client: "trickle".into(),
            protocol: proto::PROTOCOL_VERSION,
        },
        &mut hello,
    )
    .expect("encode");
    let sender = conn.clone();
    let trickle = tokio::spawn(async move {
        let Some(pace) = pace else {
            return;
        };
        let Ok((mut send, _recv)) = sender.open_bi().await else {
            return;
        };
        for b in hello {
            if send.write_all(&[b]).await.is_err() {
                return;
            }
            // Pacing of the trickle, not synchronisation.
            tokio::time::sleep(pace).await;
        }
    });
    // Far below the 60 s handshake timeout of the fixture, far above the 1 s hello timeout.
    let end = tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .unwrap_or_else(|_| {
            panic!("the server left a peer without its Hello open 20 s after TLS finished")
        });
    trickle.abort();
    let code = match end {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    };
    (code, tls_done.elapsed())
}

/// Claim (PROTOCOL.md, "Limits and timeouts"): once TLS has finished, a peer's whole `Hello`
/// must arrive within the hello timeout (1 s), not whenever the 5 s handshake timeout ends;
/// one that trickles it (a byte every 100 ms: ~9 s for a `Hello`) or sends none is closed with
/// code 2, and a real client still connects. Guards against trickling peers holding places
/// of the handshake budget, and costing the node a receive and an acknowledgement per
/// trickled packet, for the whole handshake timeout. Fails on a server that waits for the
/// handshake timeout (60 s here, with the hello timeout left at its default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_trickles_its_hello_is_closed_by_the_hello_timeout() {
    let f = start(|c| c.handshake_timeout = Duration::from_secs(60)).await;
    for pace in [Some(Duration::from_millis(100)), None] {
        let (code, after) = trickled_hello_end(&f, pace).await;
        assert_eq!(
            code,
            Some(2),
            "a peer trickling its Hello every {pace:?} was not closed with code 2 ({after:?} \
             after TLS)"
        );
        eprintln!("hello every {pace:?}: closed with code 2 {after:?} after TLS");
    }
    let client = Client::connect(&f.server.local_addr().to_string(), f.client_cfg.clone())
        .await
        .expect("a real client sends its Hello at once and gets in");
    assert_eq!(
        client.status().await.expect("status"),
        r#"{"last_offset":0}"#
    );
    f.server.shutdown().await;
}
