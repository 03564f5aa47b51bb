//! Peers that have not presented the cluster token must not be able to crowd out real
//! clients or make the server hold much for them. Scenarios:
//!
//! - 1,024 QUIC handshakes that never finish (real client Initials replayed through a relay
//!   that drops every answer, as a spoofing or abandoning peer would), then a real client
//!   still connects within its connect timeout;
//! - more peers than the connection cap that finish TLS but never send `Hello`, then a real
//!   client still connects;
//! - an unauthenticated peer may not announce a large first message (the server refuses it at
//!   once instead of waiting for megabytes) nor open a second stream before `Hello`.
//!
//! Guards against the handshake budget being shared with authenticated connections, against
//! handshakes without address validation holding state, and against unauthenticated peers
//! getting the limits of authenticated ones.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{self, Request, Response};
use tideline_stream::{Client, ClientConfig, ServerConfig, ServerHandle, tls};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_connects_past_1024_handshakes_that_never_finish() {
    const FLOOD: usize = 1024;
    // Long handshake and idle timeouts: the stuck handshakes must not simply expire before
    // the real client arrives.
    let f = start(|c| {
        c.handshake_timeout = Duration::from_secs(120);
        c.idle_timeout = Duration::from_secs(120);
    })
    .await;
    let server_addr = f.server.local_addr();

    // The relay: real client Initials go to the server from the relay's socket; whatever the
    // server answers is dropped, so no handshake can finish.
    let relay = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("relay"),
    );
    let relay_addr = relay.local_addr().expect("relay addr");
    let flood_ep = raw_endpoint(&f);
    let mut pending = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        pending.push(
            flood_ep
                .connect(relay_addr, tls::SERVER_NAME)
                .expect("connect"),
        );
    }
    let mut answered: HashSet<Vec<u8>> = HashSet::new();
    let mut buf = vec![0u8; 65536];
    let limit = tokio::time::Instant::now() + Duration::from_secs(60);
    while answered.len() < FLOOD {
        let (n, from): (usize, SocketAddr) =
            tokio::time::timeout_at(limit, relay.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "the server answered only {} of {FLOOD} handshakes",
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
    // still gets in within its default connect timeout.
    let client = Client::connect(&server_addr.to_string(), f.client_cfg.clone())
        .await
        .expect("a real client connects past the stuck handshakes");
    assert_eq!(
        client.status().await.expect("status"),
        r#"{"last_offset":0}"#
    );
    drop(pending);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_connects_past_more_silent_peers_than_the_connection_cap() {
    // A small connection cap (authenticated clients) and a long handshake timeout: peers that
    // finished TLS but never sent Hello must not occupy the cap nor block the real client.
    const CAP: usize = 16;
    const SILENT: usize = 300;
    let f = start(|c| {
        c.max_connections = CAP;
        c.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let server_addr = f.server.local_addr();
    let ep = raw_endpoint(&f);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SILENT {
        let connecting = ep.connect(server_addr, tls::SERVER_NAME).expect("connect");
        tasks.spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), connecting)
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    // Wait until every silent peer's handshake has an outcome.
    let mut silent = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Some(conn) = r.expect("task") {
            silent.push(conn);
        }
    }
    let client = Client::connect(&server_addr.to_string(), f.client_cfg.clone())
        .await
        .expect("a real client connects past the silent peers");
    assert_eq!(
        client.status().await.expect("status"),
        r#"{"last_offset":0}"#
    );
    drop(silent);
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_peer_gets_a_small_first_message_and_one_stream() {
    // A long handshake timeout: a server that waits for a large hello's body would wait this
    // long, far beyond the bounded wait below.
    let f = start(|c| c.handshake_timeout = Duration::from_secs(120)).await;
    let server_addr = f.server.local_addr();
    let ep = raw_endpoint(&f);

    // 1. A first message announced at 1 MiB is refused at once, before its body.
    let conn = ep
        .connect(server_addr, tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let mut header = (1u32 << 20).to_le_bytes().to_vec();
    header.push(proto::KIND_MESSAGE);
    send.write_all(&header).await.expect("header");
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 << 10)).await;
    let body = match answer {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => panic!("the server closed without an answer: {e}"),
        Err(_) => panic!("the server waited for a 1 MiB hello instead of refusing it"),
    };
    let mut dec = proto::FrameDecoder::new(proto::Limits::default());
    dec.feed(&body);
    match dec.next_frame::<Response>() {
        Ok(Some(proto::Frame::Message(Response::Error { message, .. }))) => {
            assert!(message.contains("Hello"), "{message}");
        }
        other => panic!("expected an error answer, got {other:?}"),
    }

    // 2. Before Hello, a second stream cannot be opened; after it, many can.
    let conn = ep
        .connect(server_addr, tls::SERVER_NAME)
        .expect("connect")
        .await
        .expect("TLS");
    let (mut hello_send, mut hello_recv) = conn.open_bi().await.expect("first stream");
    // A zero timeout polls once: the stream credit is in the transport parameters.
    assert!(
        tokio::time::timeout(Duration::ZERO, conn.open_bi())
            .await
            .is_err(),
        "a second stream was allowed before the peer authenticated"
    );
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
    f.server.shutdown().await;
}
