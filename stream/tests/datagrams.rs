//! Neither end of a Tideline connection offers to receive QUIC DATAGRAM frames: nothing reads
//! them, and quinn would buffer up to 1.25 MB of them per connection outside every flow-control
//! window, so a peer that has not even sent `Hello` could make the node hold that much for each
//! handshake place. Scenarios: a bare QUIC peer that finished TLS sees no datagram support on
//! the node (and cannot send one); a node-like bare endpoint sees none on a Tideline client.
//! A peer that sends a DATAGRAM frame anyway has its connection closed by quinn
//! (PROTOCOL_VIOLATION "unexpected DATAGRAM frame"), never buffered.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::{Client, ClientConfig, ServerConfig, proto, tls};
use tideline_wal::{MemStorage, Wal, WalOptions};

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A bare quinn client endpoint (quinn's default transport) that trusts the CA in `dir`.
fn raw_client(dir: &std::path::Path) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(tls::load_client_dir(dir).expect("client secrets").ca)
        .expect("CA");
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg).expect("QUIC TLS");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    ep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_has_not_authenticated_is_offered_no_datagram_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("log"),
    ));
    let server = tideline_stream::serve(
        ServerConfig::new("127.0.0.1:0".parse().expect("addr")),
        tls::load_server(dir.path()).expect("server secrets"),
        node,
    )
    .expect("serve");
    let ep = raw_client(dir.path());
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        ep.connect(server.local_addr(), tls::SERVER_NAME)
            .expect("connect"),
    )
    .await
    .expect("the handshake finished in time")
    .expect("the handshake succeeded");
    assert_eq!(
        conn.max_datagram_size(),
        None,
        "the node advertises max_datagram_frame_size: a peer may make it buffer datagrams"
    );
    assert!(
        matches!(
            conn.send_datagram(bytes::Bytes::from_static(b"x")),
            Err(quinn::SendDatagramError::UnsupportedByPeer)
        ),
        "a datagram could be sent to the node"
    );
    conn.close(quinn::VarInt::from_u32(0), b"done");
    ep.wait_idle().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_offers_the_node_no_datagram_buffer() {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let secrets = tls::load_server(dir.path()).expect("server secrets");
    // A bare endpoint in the node's place, with the node's certificate.
    let mut tls_cfg = rustls::ServerConfig::builder_with_provider(crypto())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(secrets.chain.clone(), secrets.key.clone_key())
        .expect("certificate");
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls_cfg).expect("QUIC TLS");
    let node = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("endpoint");
    let addr = node.local_addr().expect("local addr").to_string();
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).expect("client secrets"));
    let client = tokio::spawn(async move { Client::connect(&addr, client_cfg).await });
    let conn = tokio::time::timeout(Duration::from_secs(10), async {
        node.accept()
            .await
            .expect("a connection")
            .await
            .expect("the handshake succeeded")
    })
    .await
    .expect("the client connected in time");
    let offered = conn.max_datagram_size();
    // Refuse its token, so that the client gives up at once.
    conn.close(
        quinn::VarInt::from_u32(tideline_stream::server::close_code::UNAUTHORIZED),
        b"test over",
    );
    let _ = client.await.expect("client task");
    assert_eq!(
        offered, None,
        "the client advertises max_datagram_frame_size: a node may make it buffer datagrams"
    );
    node.wait_idle().await;
}
