//! The bad-frame rule of docs/PROTOCOL.md ("a frame with an unknown kind, a length over its
//! limit, a message that does not validate ... ends the stream with an `Error {
//! InvalidRequest }`"), over real QUIC on loopback with raw frames, on every stream the node
//! reads requests from:
//!
//! - a batch header where a request belongs is refused at once, before its body arrives: the
//!   node must not gather (up to 64 MiB) and checksum a batch only to refuse it;
//! - after a subscription has started, a bad frame or a request other than `Ack` on its
//!   stream ends the subscription with `Error { InvalidRequest }`. Guards against a
//!   subscription that goes on sending while no ack is read any more (its slot stops moving,
//!   and the consumer is never told);
//! - after a bootstrap has started, a bad frame or a request other than `ChunksStored` ends
//!   the copy with `Error { InvalidRequest }`, not with a stream cut short without a word.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{self, Frame, FrameDecoder, Limits, Request, Response, Start};
use tideline_stream::testing::{BootstrapNode, FixedKeys, serve_local};
use tideline_stream::{Client, ErrorCode, Node, WriteOp};
use tideline_wal::{MemStorage, Wal, WalOptions};

/// How long a test waits for the node's next frame before it calls the node stuck.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The bad inputs sent on a stream once it has started: a frame of an unknown kind, and a
/// well-formed request that does not belong on the stream. Each with a word its error names.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut status = Vec::new();
    proto::encode_message(&Request::Status, &mut status).unwrap();
    vec![
        (
            "unknown frame kind",
            vec![1, 0, 0, 0, 77, 0],
            "unknown frame kind 77",
        ),
        ("Status request", status, "Status"),
    ]
}

/// One stream of a connection, driven frame by frame.
struct RawStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl RawStream {
    /// Opens a stream on `client`'s connection and sends `first` on it.
    async fn open(client: &Client, first: &Request) -> RawStream {
        let (send, recv) = client.raw_connection().open_bi().await.unwrap();
        let mut stream = RawStream {
            send,
            recv,
            dec: FrameDecoder::new(Limits::default()),
        };
        stream.send_request(first).await;
        stream
    }

    async fn send_request(&mut self, req: &Request) {
        let mut raw = Vec::new();
        proto::encode_message(req, &mut raw).unwrap();
        self.send_raw(&raw).await;
    }

    async fn send_raw(&mut self, raw: &[u8]) {
        self.send.write_all(raw).await.unwrap();
    }

    /// The node's next frame; `None` once it has ended the stream.
    ///
    /// # Panics
    ///
    /// If nothing arrives within [`ANSWER_TIMEOUT`] (`waiting` says for what).
    async fn next(&mut self, waiting: &str) -> Option<Frame<Response>> {
        loop {
            if let Some(frame) = self.dec.next_frame::<Response>().unwrap() {
                return Some(frame);
            }
            match tokio::time::timeout(ANSWER_TIMEOUT, self.recv.read_chunk(1 << 20, true)).await {
                Err(_) => panic!(
                    "nothing from the node within {} s while waiting for {waiting}",
                    ANSWER_TIMEOUT.as_secs()
                ),
                Ok(Ok(Some(chunk))) => self.dec.feed(&chunk.bytes),
                Ok(Ok(None)) => return None,
                Ok(Err(e)) => panic!("the stream broke while waiting for {waiting}: {e}"),
            }
        }
    }

    /// Reads on past every frame `skip` lets by, until an `Error`, which it returns.
    ///
    /// # Panics
    ///
    /// If the stream ends first, or a frame `skip` refuses arrives, or no `Error` has come
    /// within [`ANSWER_TIMEOUT`] (a subscription's heartbeats go on for ever): the message
    /// lists what came instead.
    async fn error_after(
        &mut self,
        what: &str,
        skip: impl Fn(&Frame<Response>) -> bool,
    ) -> (ErrorCode, String) {
        let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no Error within {} s of the {what}; the node sent instead: {seen:?}",
                ANSWER_TIMEOUT.as_secs()
            );
            let waiting = format!("an Error after the {what} (got so far: {seen:?})");
            match self.next(&waiting).await {
                Some(Frame::Message(Response::Error { code, message })) => return (code, message),
                Some(frame) if skip(&frame) => seen.push(summary(&frame)),
                Some(frame) => panic!("after the {what}: unexpected {frame:?}"),
                None => panic!(
                    "the node ended the stream after the {what} without an Error (got: {seen:?})"
                ),
            }
        }
    }
}

/// A frame in a few words (a batch or a chunk without its bytes).
fn summary(frame: &Frame<Response>) -> String {
    match frame {
        Frame::Batch(txns) => format!("a batch of {} record(s)", txns.len()),
        Frame::Message(Response::Chunk(c)) => format!("a chunk from {:?}", c.from),
        Frame::Message(m) => format!("{m:?}"),
    }
}

fn put(i: u64) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        tree: "t".into(),
        key: format!("key:{i:05}").into_bytes(),
        value: vec![b'v'; 100],
    }]
}

/// A log-only node on loopback and a client connected to it.
async fn log_node() -> (
    tempfile::TempDir,
    Arc<LogNode>,
    tideline_stream::ServerHandle,
    Client,
) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
    let node = Arc::new(LogNode::new(wal));
    let (server, cfg) = serve_local(dir.path(), node.clone(), |_| {});
    let client = Client::connect(&server.local_addr().to_string(), cfg)
        .await
        .unwrap();
    (dir, node, server, client)
}

/// A batch header announcing nearly the batch limit (60 MiB and a few bytes), followed by the
/// first bytes of its body and then nothing: the node must answer from the header alone. Were
/// it to wait for the body (as it did, gathering the batch to checksum its records before
/// refusing it), no answer would come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_header_on_a_request_stream_is_refused_before_its_body() {
    let (_dir, _node, server, client) = log_node().await;
    let body_bytes: u32 = (60 << 20) + 5;
    assert!(body_bytes <= Limits::default().batch_bytes_max);
    let mut raw = body_bytes.to_le_bytes().to_vec();
    raw.push(proto::KIND_BATCH);
    raw.extend_from_slice(&1u32.to_le_bytes()); // the record count, the body's first bytes
    let (mut send, recv) = client.raw_connection().open_bi().await.unwrap();
    send.write_all(&raw).await.unwrap();
    // The send side stays open: the node cannot take the stream's end for a truncated frame.
    let mut stream = RawStream {
        send,
        recv,
        dec: FrameDecoder::new(Limits::default()),
    };
    match stream.next("the answer to a batch header").await {
        Some(Frame::Message(Response::Error {
            code: ErrorCode::InvalidRequest,
            message,
        })) => assert!(
            message.contains("a batch where a message was expected"),
            "{message}"
        ),
        other => panic!("expected an InvalidRequest error, got {other:?}"),
    }
    assert!(
        stream.next("the end of the stream").await.is_none(),
        "the stream ends after the error"
    );
    // Still serving, on the same connection.
    client.commit(put(1)).await.unwrap();
    server.shutdown().await;
}

/// A subscription with a slot, its records received and acked; then a bad input on its
/// stream. The subscription must end with `Error { InvalidRequest }` naming what was wrong,
/// and end (its slot is free for the next subscription), rather than go on sending while no
/// later ack is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_on_a_subscription_stream_ends_it_with_an_error() {
    let (_dir, node, server, client) = log_node().await;
    for i in 1..=5 {
        client.commit(put(i)).await.unwrap();
    }
    for (what, raw, names) in bad_inputs() {
        let slot = format!("s-{}", what.replace(' ', "-"));
        let subscribe = Request::Subscribe {
            start: Start::Earliest,
            tree: None,
            prefix: None,
            slot: Some(slot.clone()),
        };
        let mut stream = RawStream::open(&client, &subscribe).await;
        match stream.next("Subscribed").await {
            Some(Frame::Message(Response::Subscribed { .. })) => {}
            other => panic!("expected Subscribed, got {other:?}"),
        }
        let mut received = Vec::new();
        while received.len() < 5 {
            match stream.next("the committed records").await {
                Some(Frame::Batch(txns)) => received.extend(txns.iter().map(|t| t.offset.get())),
                Some(Frame::Message(Response::Heartbeat { .. })) => {}
                other => panic!("expected the records, got {other:?}"),
            }
        }
        assert_eq!(received, (1..=5).collect::<Vec<_>>());
        // The acks are read while the stream is sound: the slot moves.
        stream.send_request(&Request::Ack { offset: 5 }).await;
        let moved = tokio::time::timeout(ANSWER_TIMEOUT, async {
            while node.wal().slot(&slot).map(|s| s.restart_offset) != Some(6) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(moved.is_ok(), "the ack moved slot {slot}");

        stream.send_raw(&raw).await;
        let is_heartbeat = |f: &Frame<Response>| {
            matches!(
                f,
                Frame::Message(Response::Heartbeat { .. }) | Frame::Batch(_)
            )
        };
        let (code, message) = stream.error_after(what, is_heartbeat).await;
        assert_eq!(code, ErrorCode::InvalidRequest, "{what}: {message}");
        assert!(message.contains(names), "{what}: {message}");
        assert!(
            stream.next("the end of the stream").await.is_none(),
            "{what}: the stream ends after the error"
        );
        // The subscription has ended: its slot takes a new one at once.
        let again = client
            .subscribe(Start::Earliest, None, None, Some(slot.clone()))
            .await
            .unwrap_or_else(|e| panic!("{what}: slot {slot} is still held: {e}"));
        assert_eq!(again.next_offset(), 1);
    }
    // Still serving, on the same connection.
    client.commit(put(6)).await.unwrap();
    server.shutdown().await;
}

/// A bootstrap whose first chunk has arrived (the node waits for it to be reported stored);
/// then a bad input on its stream. The copy must end with `Error { InvalidRequest }` naming
/// what was wrong, not with the stream cut short without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_frame_on_a_bootstrap_stream_ends_it_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
    // 100 keys of 1 KiB: several 16 KiB chunks, so the copy is far from done after the first.
    let node = Arc::new(BootstrapNode::new(wal, FixedKeys::new(100, 1024, |_| b'v')));
    let (server, cfg) = serve_local(dir.path(), node.clone(), |_| {});
    let client = Client::connect(&server.local_addr().to_string(), cfg)
        .await
        .unwrap();
    for (what, raw, names) in bad_inputs() {
        let bootstrap = Request::Bootstrap {
            resume: None,
            chunk_bytes: 16 << 10,
        };
        let mut stream = RawStream::open(&client, &bootstrap).await;
        match stream.next("BootstrapStarted").await {
            Some(Frame::Message(Response::BootstrapStarted { .. })) => {}
            other => panic!("expected BootstrapStarted, got {other:?}"),
        }
        match stream.next("the first chunk").await {
            Some(Frame::Message(Response::Chunk(c))) => {
                assert!(c.last && c.to.is_some(), "a whole chunk, not the last one")
            }
            other => panic!("expected the first chunk, got {other:?}"),
        }
        stream.send_raw(&raw).await;
        let (code, message) = stream.error_after(what, |_| false).await;
        assert_eq!(code, ErrorCode::InvalidRequest, "{what}: {message}");
        assert!(message.contains(names), "{what}: {message}");
        assert!(
            stream.next("the end of the stream").await.is_none(),
            "{what}: the stream ends after the error"
        );
    }
    // Still serving, on the same connection.
    assert!(client.status().await.is_ok());
    server.shutdown().await;
}
