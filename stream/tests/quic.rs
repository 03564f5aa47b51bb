//! Server and client over real QUIC on loopback, with a bare log as the node: tails from every
//! kind of start position deliver exactly the expected records, in order, once; a wrong token,
//! a wrong CA, malformed and oversized frames, and a batch where a request belongs (unread, so
//! that a corrupt record's error text never reaches the peer) are refused while the server
//! keeps serving; a stalled subscription does not hold up another one. Every answer stays within the message
//! limit the client decodes (17 MiB), whatever the sizes of the keys and values read or of the
//! keys a monitor sees: an answer over it is refused by the client (`FrameTooLarge`), so a
//! paging client would ask for the same page forever.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{self, Request, Response, Start, WriteOp};
use tideline_stream::{
    Client, ClientConfig, ClientError, ErrorCode, Event, Node, ServerConfig, ServerHandle, tls,
};
use tideline_wal::{MemStorage, Wal, WalOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    node: Arc<LogNode>,
    server: ServerHandle,
    client_cfg: ClientConfig,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let secrets = tls::load_server(dir.path()).unwrap();
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap(),
    ));
    let server = tideline_stream::serve(
        ServerConfig::new("127.0.0.1:0".parse().unwrap()),
        secrets,
        node.clone(),
    )
    .unwrap();
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).unwrap());
    Fixture {
        _dir: dir,
        node,
        server,
        client_cfg,
    }
}

fn put(i: u64) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        tree: if i.is_multiple_of(2) { "even" } else { "odd" }.into(),
        key: format!("key:{i:05}").into_bytes(),
        value: vec![b'v'; 100],
    }]
}

/// Reads a subscription until `n` records arrived; returns their offsets.
async fn take(sub: &mut tideline_stream::Subscription, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(Some(Event::Batch(txns)))) => got.extend(txns.iter().map(|t| t.offset.get())),
            Ok(Ok(Some(Event::Heartbeat { .. }))) => {}
            other => panic!("subscription ended early: {other:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tails_from_every_start_position_exactly_once() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    assert_eq!(client.server_uuid(), f.node.wal().server_uuid());
    for i in 1..=1000 {
        let (offset, _) = client.commit(put(i)).await.unwrap();
        assert_eq!(offset, i);
    }
    let uuid = f.node.wal().server_uuid();

    let mut sub = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .unwrap();
    assert_eq!(take(&mut sub, 1000).await, (1..=1000).collect::<Vec<_>>());

    let mut sub = client
        .subscribe(Start::Offset(501), None, None, None)
        .await
        .unwrap();
    assert_eq!(take(&mut sub, 500).await, (501..=1000).collect::<Vec<_>>());

    let set = Start::Gtid(format!("{uuid}:1-600"));
    let mut sub = client.subscribe(set, None, None, None).await.unwrap();
    assert_eq!(take(&mut sub, 400).await, (601..=1000).collect::<Vec<_>>());

    // Filters: only the tree "even".
    let mut sub = client
        .subscribe(Start::Earliest, Some("even".into()), None, None)
        .await
        .unwrap();
    assert_eq!(
        take(&mut sub, 500).await,
        (2..=1000).step_by(2).collect::<Vec<_>>()
    );

    // latest: only what is committed after the subscription is in place.
    let mut sub = client
        .subscribe(Start::Latest, None, None, None)
        .await
        .unwrap();
    for i in 1001..=1010 {
        client.commit(put(i)).await.unwrap();
    }
    assert_eq!(take(&mut sub, 10).await, (1001..=1010).collect::<Vec<_>>());

    // Key-value requests and a read fence.
    assert_eq!(
        client.get("even", b"key:00002").await.unwrap(),
        Some(vec![b'v'; 100])
    );
    assert_eq!(client.get("even", b"nope").await.unwrap(), None);
    assert_eq!(client.scan("odd", b"key:0000", 100).await.unwrap().len(), 5);
    let (reached, _) = client
        .wait_for(
            &format!("{uuid}:1-1010").parse().unwrap(),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert!(reached);
    let (reached, _) = client
        .wait_for(
            &format!("{uuid}:2000").parse().unwrap(),
            Duration::from_millis(50),
        )
        .await
        .unwrap();
    assert!(!reached);

    // A purged or future position is a typed error, not silence.
    let err = client
        .subscribe(Start::Offset(5000), None, None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                code: ErrorCode::PositionUnavailable,
                ..
            }
        ),
        "{err}"
    );
    f.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_wrong_ca_and_bad_frames_are_refused_and_the_server_goes_on() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();

    let mut bad = f.client_cfg.clone();
    bad.secrets.token = "0".repeat(64);
    let err = Client::connect(&addr, bad).await.unwrap_err();
    assert!(matches!(err, ClientError::Unauthorized { .. }), "{err}");

    let other = tempfile::tempdir().unwrap();
    tls::ensure_secrets(other.path()).unwrap();
    let mut wrong_ca = f.client_cfg.clone();
    wrong_ca.secrets.ca = tls::load_client_dir(other.path()).unwrap().ca;
    let err = Client::connect(&addr, wrong_ca).await.unwrap_err();
    assert!(matches!(err, ClientError::WrongCluster { .. }), "{err}");

    // Raw frames on an authenticated connection: oversized, garbage and an unknown kind. Each
    // is answered with a typed `InvalidRequest` whose message names what was wrong.
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    for (raw, names) in [
        (
            {
                let mut v = u32::MAX.to_le_bytes().to_vec();
                v.push(proto::KIND_MESSAGE);
                v
            },
            "exceeds the limit",
        ),
        (
            vec![3, 0, 0, 0, proto::KIND_MESSAGE, 0xde, 0xad, 0xbe],
            "malformed message",
        ),
        (vec![1, 0, 0, 0, 77, 0], "unknown frame kind 77"),
    ] {
        match client_raw(&client, &raw).await {
            Ok(Some(proto::Frame::Message(proto::Response::Error {
                code: ErrorCode::InvalidRequest,
                message,
            }))) => assert!(message.contains(names), "{raw:?}: {message}"),
            other => panic!("{raw:?}: expected an InvalidRequest error, got {other:?}"),
        }
    }
    // Still serving, on the same connection and on a new one.
    client.commit(put(1)).await.unwrap();
    let again = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    assert_eq!(again.status().await.unwrap(), r#"{"last_offset":1}"#);
    f.server.shutdown().await;
}

/// Found by a third code review: a batch frame sent where a request is expected was decoded
/// before it was refused, and a record with a valid checksum but a corrupt payload came back
/// as rkyv's error text, naming addresses of the node's memory. The node must refuse the
/// batch for what it is, without reading its records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_as_a_request_is_refused_unread() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    let mut b = proto::BatchBuilder::new();
    b.push(&tideline_wal::Transaction {
        offset: tideline_wal::Offset::new(1).unwrap(),
        gtid: tideline_wal::Gtid::new(uuid::Uuid::from_bytes([1; 16]), 1).unwrap(),
        timestamp_us: 0,
        ops: vec![tideline_wal::Op::Put {
            tree: "default".into(),
            key: b"key".to_vec(),
            value: vec![7; 100],
            before: None,
        }],
    })
    .unwrap();
    let mut wire = Vec::new();
    b.finish_into(&mut wire);
    // Corrupt the payload's last bytes (rkyv's root) and re-checksum the log frame, so that
    // the batch passes its frame checks and fails only when its record is decoded.
    let frame_at = proto::BATCH_PREFIX_BYTES;
    let len = u32::from_le_bytes(wire[frame_at..frame_at + 4].try_into().unwrap()) as usize;
    let payload_end = frame_at + 16 + len;
    for byte in &mut wire[payload_end - 4..payload_end] {
        *byte ^= 0xff;
    }
    let crc = crc32c::crc32c(&[&wire[frame_at..frame_at + 4], &wire[frame_at + 8..]].concat());
    wire[frame_at + 4..frame_at + 8].copy_from_slice(&crc.to_le_bytes());
    let limits = proto::Limits::default();
    let body = &wire[proto::FRAME_HEADER_BYTES..];
    let raw = proto::RawBatch::check(bytes::Bytes::copy_from_slice(body), &limits)
        .expect("the batch passes its frame checks");
    assert_eq!(raw.len(), 1);
    assert!(
        proto::decode_batch(body, &limits).is_err(),
        "the corrupt record decodes: the test proves nothing"
    );
    match client_raw(&client, &wire).await {
        Ok(Some(proto::Frame::Message(proto::Response::Error {
            code: ErrorCode::InvalidRequest,
            message,
        }))) => assert!(
            message.contains("a batch where a message was expected"),
            "{message}"
        ),
        other => panic!("expected an InvalidRequest error, got {other:?}"),
    }
    // Still serving.
    client.commit(put(1)).await.unwrap();
    f.server.shutdown().await;
}

/// Sends raw bytes on a fresh stream of `client`'s connection and decodes the answer.
async fn client_raw(
    client: &Client,
    raw: &[u8],
) -> Result<Option<proto::Frame<proto::Response>>, proto::ProtoError> {
    let (mut send, mut recv) = client.raw_connection().open_bi().await.unwrap();
    send.write_all(raw).await.unwrap();
    let _ = send.finish();
    let body = recv.read_to_end(1 << 20).await.unwrap_or_default();
    let mut dec = proto::FrameDecoder::new(proto::Limits::default());
    dec.feed(&body);
    dec.next_frame::<proto::Response>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscription_does_not_hold_up_another() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    // Enough data to exceed every flow-control window of the stalled stream.
    for chunk in 0..40u64 {
        let ops: Vec<WriteOp> = (0..50)
            .map(|i| WriteOp::Put {
                tree: "big".into(),
                key: format!("k{chunk}-{i}").into_bytes(),
                value: vec![0; 16 << 10],
            })
            .collect();
        client.commit(ops).await.unwrap();
    }
    let _stalled = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .unwrap();
    let mut fast = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .unwrap();
    assert_eq!(take(&mut fast, 40).await, (1..=40).collect::<Vec<_>>());
    // Writers are not blocked either.
    let (offset, _) = client.commit(put(1)).await.unwrap();
    assert_eq!(offset, 41);
    f.server.shutdown().await;
}

/// Sends `req` on a fresh stream of `client`'s connection and decodes the answer as a client
/// does, with the default limits (an answer over them is `FrameTooLarge`).
async fn raw_request(
    client: &Client,
    req: &Request,
) -> Result<Option<proto::Frame<Response>>, proto::ProtoError> {
    let mut raw = Vec::new();
    proto::encode_message(req, &mut raw).unwrap();
    let (mut send, mut recv) = client.raw_connection().open_bi().await.unwrap();
    send.write_all(&raw).await.unwrap();
    let _ = send.finish();
    let body = recv.read_to_end(64 << 20).await.unwrap_or_default();
    let mut dec = proto::FrameDecoder::new(proto::Limits::default());
    dec.feed(&body);
    dec.next_frame::<Response>()
}

fn put_kv(tree: &str, key: Vec<u8>, value_bytes: usize) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        tree: tree.into(),
        key,
        value: vec![b'v'; value_bytes],
    }]
}

/// The largest row there is (a 64 KiB key, a 16 MiB value) after a page filled almost to its
/// byte bound: the page must stop before it, not take it and pass the message limit. The
/// legacy single-answer `Scan` refuses with `TooLarge` rather than send what the client cannot
/// decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_page_stops_before_a_row_that_would_pass_the_message_limit() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    let big_key = [b"p:b".as_slice(), &[b'b'; (64 << 10) - 3]].concat();
    // Just under a page's 1 MiB, then the largest row, then a small one.
    client
        .commit(put_kv("big", b"p:a".to_vec(), (1 << 20) - 256))
        .await
        .unwrap();
    client
        .commit(put_kv("big", big_key.clone(), 16 << 20))
        .await
        .unwrap();
    client
        .commit(put_kv("big", b"q:c".to_vec(), 10))
        .await
        .unwrap();

    // The legacy scan of the prefix `p:` (half a message at most): refused, not oversized.
    let legacy = |limit| Request::Scan {
        tree: "big".into(),
        prefix: b"p:".to_vec(),
        limit,
    };
    match raw_request(&client, &legacy(10)).await {
        Ok(Some(proto::Frame::Message(Response::Error {
            code: ErrorCode::TooLarge,
            message,
        }))) => assert!(
            message.contains("use a client of this version"),
            "{message}"
        ),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    match raw_request(&client, &legacy(1)).await {
        Ok(Some(proto::Frame::Message(Response::Rows { rows }))) => {
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].0, b"p:a");
        }
        other => panic!("expected one row, got {other:?}"),
    }
    let rows = client.scan("big", b"", 10).await.unwrap();
    let got: Vec<(Vec<u8>, usize)> = rows.into_iter().map(|(k, v)| (k, v.len())).collect();
    assert_eq!(
        got,
        vec![
            (b"p:a".to_vec(), (1 << 20) - 256),
            (big_key, 16 << 20),
            (b"q:c".to_vec(), 10)
        ]
    );

    f.server.shutdown().await;
}

/// `Range` (older `verify`) is bounded in bytes on the server like a legacy scan: an answer
/// that would pass half a message is refused with `TooLarge` (older clients take a short answer
/// for the end of the tree, so the server never sends one), and paging a row at a time still
/// goes through rows of any size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_is_bounded_in_bytes() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    // 18 MiB in three rows: more than one message.
    for k in [b"a", b"b", b"c"] {
        client
            .commit(put_kv("wide", k.to_vec(), 6 << 20))
            .await
            .unwrap();
    }
    match client.range_after("wide", None, u64::MAX).await {
        Err(ClientError::Server {
            code: ErrorCode::TooLarge,
            message,
        }) => assert!(message.contains("smaller"), "{message}"),
        other => panic!("expected TooLarge, got {:?}", other.map(|r| r.len())),
    }
    let mut after: Option<Vec<u8>> = None;
    let mut keys = Vec::new();
    loop {
        let rows = client
            .range_after("wide", after.as_deref(), 1)
            .await
            .unwrap();
        let Some((k, v)) = rows.last() else { break };
        assert_eq!((rows.len(), v.len()), (1, 6 << 20));
        keys.push(k.clone());
        after = Some(k.clone());
    }
    assert_eq!(keys, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    f.server.shutdown().await;
}

/// A request whose key is as large as a message may be (before any node checks it) must not
/// make the monitor feed send an event over the message limit: every attached monitor would
/// fail with `FrameTooLarge`. The event carries the key's first 1 KiB and a mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_survives_a_request_with_a_huge_key() {
    let f = start().await;
    let addr = f.server.local_addr().to_string();
    let client = Client::connect(&addr, f.client_cfg.clone()).await.unwrap();
    let mut monitor = client.monitor(None, 1_000_000).await.unwrap();

    // The largest `Get` the node accepts: its answer as an event is larger than that.
    let limit = proto::Limits::default().message_bytes_max as usize;
    let encoded = |key_bytes: usize| {
        let mut out = Vec::new();
        let get = Request::Get {
            tree: "t".into(),
            key: vec![b'k'; key_bytes],
        };
        proto::encode_message(&get, &mut out).unwrap();
        out.len() - proto::FRAME_HEADER_BYTES
    };
    let key_bytes = limit - (encoded(limit - 1024) - (limit - 1024));
    assert_eq!(encoded(key_bytes), limit);
    let mut whole = Vec::new();
    let as_event = Response::Monitor {
        events: vec![proto::MonitorEvent {
            ts_us: 0,
            remote: "127.0.0.1:1".into(),
            kind: "get".into(),
            tree: "t".into(),
            key: vec![b'k'; key_bytes],
            latency_us: 0,
            ok: true,
        }],
        dropped: 0,
    };
    proto::encode_message(&as_event, &mut whole).unwrap();
    assert!(
        whole.len() - proto::FRAME_HEADER_BYTES > limit,
        "the request's key copied whole would pass the limit"
    );

    assert_eq!(client.get("t", &vec![b'k'; key_bytes]).await.unwrap(), None);
    let (events, _) = tokio::time::timeout(Duration::from_secs(10), monitor.next())
        .await
        .expect("the monitor hears of the request within 10 s")
        .unwrap()
        .expect("the monitor stream goes on");
    let e = &events[0];
    assert_eq!((e.kind.as_str(), e.tree.as_str()), ("get", "t"));
    assert_eq!(e.key.len(), 1024 + "…".len(), "cut to 1 KiB and marked");
    assert!(e.key.starts_with(&[b'k'; 1024]) && e.key.ends_with("…".as_bytes()));
    // Still serving this monitor.
    client.get("t", b"small").await.unwrap();
    let (events, _) = tokio::time::timeout(Duration::from_secs(10), monitor.next())
        .await
        .expect("the monitor hears of the request within 10 s")
        .unwrap()
        .expect("the monitor stream goes on");
    assert_eq!(events[0].key, b"small");
    f.server.shutdown().await;
}

/// A subscription's start is shown in `status` (and on the HTTP overview) for as long as it
/// lives: a start from a client's GTID set of a MiB must show cut, as monitor events cut keys,
/// or two such subscriptions push `status` past the message limit and every status check of
/// the node fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_a_huge_gtid_set_shows_a_bounded_start() {
    use std::fmt::Write as _;
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let secrets = tls::load_server(dir.path()).unwrap();
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap(),
    ));
    let observer = Arc::new(tideline_stream::Observer::new());
    let mut cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg.observer = observer.clone();
    let server = tideline_stream::serve(cfg, secrets, node.clone()).unwrap();
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).unwrap());
    let client = Client::connect(&server.local_addr().to_string(), client_cfg)
        .await
        .unwrap();
    for i in 1..=3 {
        client.commit(put(i)).await.unwrap();
    }
    // The node's first GTID, and every other number of another origin: over a MiB of text.
    let uuid = node.wal().server_uuid();
    let other = uuid::Uuid::from_bytes([7; 16]);
    let mut set = format!("{uuid}:1,{other}");
    let mut n = 1u64;
    while set.len() < 1 << 20 {
        write!(set, ":{n}").unwrap();
        n += 2;
    }
    let mut sub = client
        .subscribe(Start::Gtid(set.clone()), None, None, None)
        .await
        .unwrap();
    assert_eq!(take(&mut sub, 2).await, vec![2, 3]);
    let shown = observer.subscriptions();
    assert_eq!(shown.len(), 1, "{shown:?}");
    let start = &shown[0].start;
    assert!(
        start.len() <= 1100 && start.starts_with("gtid:") && start.ends_with('\u{2026}'),
        "status shows a start of {} bytes for a subscription from a GTID set of {} bytes",
        start.len(),
        set.len()
    );
    server.shutdown().await;
}
