//! Datagrams that cannot be a QUIC packet for the node are dropped by the kernel, before they
//! wake the node: a socket filter on the server's UDP socket (docs/PROTOCOL.md, "Datagrams
//! the node never sees"). Scenario: from a plain UDP socket, datagrams of every kind the
//! filter refuses (too short, fixed bit clear, an unknown version, an Initial under 1,200
//! bytes, a destination connection id too long or too short for an Initial) and of the kinds
//! it must let through (a well-formed-looking Initial, a short-header packet); the kernel's
//! drop count of the node's socket must grow by exactly the refused ones, and a real client
//! must still connect, subscribe and read.
//!
//! Guards against a flood of random bytes costing the node a wakeup, a system call and a
//! parse per datagram (docs/reliability.md, "Abuse"), and against a filter that drops real
//! traffic. The canary turns the filter off (`unsafe_no_datagram_filter`) and checks that
//! the count then does not grow: the check would report the missing filter.

#![cfg(target_os = "linux")]

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::WriteOp;
use tideline_stream::{Client, ClientConfig, Event, ServerConfig, Start, tls};
use tideline_wal::{MemStorage, Wal, WalOptions};

/// Each refused kind, sent this many times.
const EACH: usize = 50;

/// A long-header packet of `len` bytes: `first` byte, `version`, a destination connection id
/// of `dcid_len` bytes, the rest filler.
fn long_header(first: u8, version: u32, dcid_len: u8, len: usize) -> Vec<u8> {
    let mut d = vec![0x5a; len];
    d[0] = first;
    d[1..5].copy_from_slice(&version.to_be_bytes());
    d[5] = dcid_len;
    d
}

/// Datagrams the filter must drop.
fn refused() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("shorter than any QUIC packet", vec![0x40; 20]),
        ("fixed bit clear, short header", {
            let mut d = vec![0x11; 300];
            d[0] = 0x01;
            d
        }),
        (
            "fixed bit clear, long header",
            long_header(0x80, 1, 8, 1200),
        ),
        ("unknown version", long_header(0xc0, 0xdead_beef, 8, 1200)),
        ("Initial under 1,200 bytes", long_header(0xc0, 1, 8, 1199)),
        (
            "Initial with a 4-byte destination id",
            long_header(0xc0, 1, 4, 1200),
        ),
        (
            "Handshake with a 21-byte destination id",
            long_header(0xe0, 1, 21, 300),
        ),
    ]
}

/// Datagrams the filter must pass (quinn then drops them: they decrypt to nothing).
fn passed() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("Initial of 1,200 bytes", long_header(0xc0, 1, 8, 1200)),
        ("Handshake", long_header(0xe0, 1, 8, 300)),
        ("short header of 21 bytes", vec![0x40; 21]),
    ]
}

/// The kernel's count of datagrams dropped at the IPv4 UDP socket bound to `port`
/// (`/proc/net/udp`, last column); fails when it cannot be read.
fn socket_drops(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
    let local = format!("0100007F:{port:04X}");
    let line = table
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(local.as_str()))
        .unwrap_or_else(|| panic!("no socket bound to 127.0.0.1:{port} in /proc/net/udp"));
    line.split_whitespace()
        .last()
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no drop count in {line:?}"))
}

/// Sends every refused and passed datagram to a node started with `filter`; returns how much
/// the node socket's drop count grew and how many were refused. A real client must connect
/// and read in both cases.
async fn run(filter: bool) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    tls::ensure_secrets(dir.path()).expect("secrets");
    let secrets = tls::load_server(dir.path()).expect("server secrets");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("log");
    let node = Arc::new(LogNode::new(wal));
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"));
    cfg.unsafe_no_datagram_filter = !filter;
    let server = tideline_stream::serve(cfg, secrets, node).expect("serve");
    let addr: SocketAddr = server.local_addr();
    let before = socket_drops(addr.port());

    let garbage = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut refused_n = 0;
    for (what, d) in refused() {
        for _ in 0..EACH {
            garbage
                .send_to(&d, addr)
                .unwrap_or_else(|e| panic!("send {what}: {e}"));
            refused_n += 1;
        }
    }
    for (what, d) in passed() {
        for _ in 0..EACH {
            garbage
                .send_to(&d, addr)
                .unwrap_or_else(|e| panic!("send {what}: {e}"));
        }
    }

    // A real client still gets in and reads.
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).expect("secrets"));
    let client = Client::connect(&addr.to_string(), client_cfg)
        .await
        .expect("a real client connects past the filter");
    client
        .commit(vec![WriteOp::Put {
            tree: "default".into(),
            key: b"key".to_vec(),
            value: b"value".to_vec(),
        }])
        .await
        .expect("commit");
    let mut sub = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(Some(Event::Batch(b)))) if !b.is_empty() => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("no first batch within 10 s: {other:?}"),
        }
    }
    // On loopback the filter runs in the sender's `sendto`: the count is final by now.
    (socket_drops(addr.port()) - before, refused_n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_that_cannot_be_quic_for_the_node_are_dropped_by_the_kernel() {
    let (dropped, refused) = run(true).await;
    assert_eq!(
        dropped, refused,
        "the node's socket dropped {dropped} datagrams, expected exactly the {refused} refused \
         ones (fewer: garbage reached the node; more: the filter dropped what it must pass)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_without_the_filter_the_garbage_reaches_the_node() {
    let (dropped, refused) = run(false).await;
    assert_ne!(
        dropped, refused,
        "with the filter off the check must report garbage reaching the node"
    );
    assert_eq!(dropped, 0, "with the filter off nothing is dropped");
}
