//! Issue 10, item 1, on the serving side: a bootstrap is served from views of one history of
//! the node. If the node's history is replaced while it serves one (the node was bootstrapped
//! itself: new state, offsets going on, a new history epoch), it must end the stream with
//! `PositionUnavailable` rather than send chunks of the new state after chunks of the old one
//! (the replica would hold a mix of both), and a resume naming the old epoch is refused so the
//! replica starts again from scratch.
//!
//! The chunk window on the same side: the server keeps at most its window of chunks unstored,
//! and a consumer's report of more chunks stored than were sent (a bug or a hostile peer) ends
//! the stream with `InvalidRequest` rather than overflowing the server's count.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::proto::{BootstrapResume, Cursor, unpack_entries};
use tideline_stream::testing::{BootstrapNode, FixedKeys, serve_local};
use tideline_stream::{BootstrapEvent, Client, ClientError, ErrorCode, Node};
use tideline_wal::{Epoch, GtidSet, MemStorage, Wal, WalOptions};

/// A log-only node with a state to copy: tree `t` whose 100 keys, each with a 1 KiB value
/// (about 100 KiB, several 16 KiB chunks), all read `o` in the log's first history and `n`
/// after its history is reset (built by [`start`]).
type TwoHistories = BootstrapNode<FixedKeys>;

async fn next(
    s: &mut tideline_stream::BootstrapStream,
) -> Result<Option<BootstrapEvent>, ClientError> {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("the server answers within 10 s")
}

/// The node, its server (keeping `window` bootstrap chunks in flight) and a client connected to
/// it (the directory holds the secrets).
async fn start(
    window: u64,
) -> (
    tempfile::TempDir,
    Arc<TwoHistories>,
    tideline_stream::server::ServerHandle,
    Client,
) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
    let value = |epoch| if epoch == Epoch::INITIAL { b'o' } else { b'n' };
    let node = Arc::new(BootstrapNode::new(wal, FixedKeys::new(100, 1024, value)));
    let (server, cfg) = serve_local(dir.path(), node.clone(), |cfg| {
        cfg.bootstrap_chunks_in_flight = window
    });
    let addr = server.local_addr().to_string();
    let client = Client::connect(&addr, cfg).await.unwrap();
    (dir, node, server, client)
}

async fn expect_chunk(stream: &mut tideline_stream::BootstrapStream, n: u64) {
    match next(stream).await {
        Ok(Some(BootstrapEvent::Chunk(c))) => {
            assert!(
                c.last && c.to.is_some(),
                "chunk {n} is whole and not the end: {c:?}"
            )
        }
        other => panic!("expected chunk {n}, got {other:?}"),
    }
}

/// What a wait for the next event got, without the bytes of a chunk.
fn describe<T>(got: &Result<Result<Option<BootstrapEvent>, ClientError>, T>) -> String {
    match got {
        Err(_) => "nothing".into(),
        Ok(Ok(Some(BootstrapEvent::Chunk(c)))) => {
            format!("a chunk from {:?} to {:?}", c.from, c.to)
        }
        Ok(other) => format!("{other:?}"),
    }
}

/// A consumer that stores nothing gets the server's window of chunks (1 by default, 2 when
/// configured) and then nothing more: the server holds no more for it, so a consumer killed
/// at any moment fetches at most that many again. Each report of a stored chunk lets exactly
/// one more out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_server_keeps_at_most_its_window_of_chunks_unstored() {
    for window in [1, 2] {
        let (_dir, _node, server, client) = start(window).await;
        // About 100 KiB in 16 KiB chunks: seven chunks, more than the window.
        let mut stream = client.bootstrap(None, 16 << 10).await.unwrap();
        let mut acker = stream.take_acker().unwrap();
        for n in 1..=window {
            expect_chunk(&mut stream, n).await;
        }
        // Nothing more while none is stored: the window is full. (An absence can only be
        // waited out; 500 ms is far above the microseconds a chunk of this node takes to read.)
        let more = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
        assert!(
            more.is_err(),
            "the server sent past its window of {window} unstored chunk(s): {}",
            describe(&more)
        );
        for stored in 1..=2 {
            acker.stored(stored).await.unwrap();
            expect_chunk(&mut stream, window + stored).await;
            let more = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
            assert!(
                more.is_err(),
                "window {window}: {stored} stored let more than {stored} chunk(s) out: {}",
                describe(&more)
            );
        }
        server.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_never_crosses_a_history_reset_of_its_server() {
    let (_dir, node, server, client) = start(1).await;

    let mut stream = client.bootstrap(None, 16 << 10).await.unwrap();
    assert_eq!(stream.epoch, Epoch::INITIAL);
    let mut acker = stream.take_acker().unwrap();
    let first = match next(&mut stream).await {
        Ok(Some(BootstrapEvent::Chunk(c))) => c,
        other => panic!("expected the first chunk, got {other:?}"),
    };
    assert!(
        first.last && first.to.is_some(),
        "several chunks: {first:?}"
    );

    // The node is bootstrapped itself: new state, new epoch. Then the first chunk is stored.
    tokio::task::block_in_place(|| node.wal().reset_history(&GtidSet::new())).unwrap();
    let new_epoch = node.wal().history_epoch();
    assert_ne!(new_epoch, Epoch::INITIAL);
    acker.stored(1).await.unwrap();
    let mut chunks = 1u64;
    loop {
        match next(&mut stream).await {
            Ok(Some(BootstrapEvent::Chunk(c))) => {
                // A chunk read before the reset may still go out; never one of the new state.
                let entries = unpack_entries(&c.entries, &c.from, c.to.as_deref()).unwrap();
                assert!(
                    entries.iter().all(|(_, v)| v[0] == b'o'),
                    "chunk {} of the new history after {chunks} of the old one",
                    chunks + 1
                );
                chunks += 1;
                // The server may have ended the stream already (the error follows).
                let _ = acker.stored(chunks).await;
            }
            Err(ClientError::Server {
                code: ErrorCode::PositionUnavailable,
                message,
            }) => {
                assert!(message.contains("history was replaced"), "{message}");
                break;
            }
            other => panic!("expected the stream to end with PositionUnavailable: {other:?}"),
        }
    }
    assert!(
        chunks <= 2,
        "{chunks} chunks of the old state after the reset"
    );

    // Resuming the copy taken in the old epoch is refused: the replica must start again.
    let resume = BootstrapResume {
        server_uuid: *client.server_uuid().as_bytes(),
        after_offset: 0,
        cursor: Cursor {
            tree: "t".into(),
            key: first.to.clone().unwrap(),
            tree_done: false,
        },
        epoch: Epoch::INITIAL.get(),
    };
    match client.bootstrap(Some(resume.clone()), 16 << 10).await {
        Err(ClientError::Server {
            code: ErrorCode::PositionUnavailable,
            message,
        }) => assert!(message.contains("start it again from scratch"), "{message}"),
        other => panic!("expected PositionUnavailable, got {other:?}"),
    }
    // In the current epoch the same resume is accepted.
    let resumed = client
        .bootstrap(
            Some(BootstrapResume {
                epoch: new_epoch.get(),
                ..resume
            }),
            16 << 10,
        )
        .await
        .unwrap();
    assert_eq!(resumed.epoch, new_epoch);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_of_more_chunks_stored_than_sent_is_refused() {
    let (_dir, _node, server, client) = start(1).await;
    let mut stream = client.bootstrap(None, 16 << 10).await.unwrap();
    let mut acker = stream.take_acker().unwrap();
    expect_chunk(&mut stream, 1).await;
    acker.stored(u64::MAX).await.unwrap();
    match next(&mut stream).await {
        Err(ClientError::Server {
            code: ErrorCode::InvalidRequest,
            message,
        }) => assert!(
            message.contains(&u64::MAX.to_string()) && message.contains("has sent 1 chunk"),
            "{message}"
        ),
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
    // The server goes on: a new bootstrap is served.
    let mut again = client.bootstrap(None, 16 << 10).await.unwrap();
    expect_chunk(&mut again, 1).await;
    server.shutdown().await;
}
