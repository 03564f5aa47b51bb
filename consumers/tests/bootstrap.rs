//! A bootstrap whose node replaces its history while the copy runs (the node was bootstrapped
//! itself: new state, a new history epoch). The node ends the stream with
//! `PositionUnavailable`, and PROTOCOL.md promises that the consumer starts the copy over from
//! scratch: [`Bootstrap::next`] must say so ([`BootstrapError::Restart`]), not pass the node's
//! error on as a failed connection. Guards against pipelines that ended failed for good
//! instead of copying again.

use std::sync::Arc;
use std::time::Duration;

use tideline_consumers::{Bootstrap, BootstrapError, BootstrapStep};
use tideline_stream::testing::{BootstrapNode, FixedKeys, serve_local};
use tideline_stream::{Client, Node, ServerHandle};
use tideline_wal::{GtidSet, MemStorage, Wal, WalOptions};

/// A log-only node whose state is tree `t`, served in views of the log's current history:
/// 100 keys, each with a 1 KiB value (about 100 KiB, several 16 KiB chunks).
type TwoHistories = BootstrapNode<FixedKeys>;

/// The node, its server and a client connected to it (the directory holds the secrets).
async fn start() -> (tempfile::TempDir, Arc<TwoHistories>, ServerHandle, Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).expect("open log");
    let node = Arc::new(BootstrapNode::new(wal, FixedKeys::new(100, 1024, |_| b'v')));
    let (server, cfg) = serve_local(dir.path(), node.clone(), |_| {});
    let addr = server.local_addr().to_string();
    let client = Client::connect(&addr, cfg).await.expect("connect");
    (dir, node, server, client)
}

async fn next(b: &mut Bootstrap) -> Result<Option<BootstrapStep>, BootstrapError> {
    tokio::time::timeout(Duration::from_secs(10), b.next())
        .await
        .expect("the node answers within 10 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_reset_of_the_node_during_a_copy_asks_for_a_copy_from_scratch() {
    let (_dir, node, server, client) = start().await;
    let mut b = Bootstrap::start(&client, None, 16 << 10)
        .await
        .expect("the copy starts");
    let mut acker = b.take_acker().expect("the acker, taken once");
    match next(&mut b).await {
        Ok(Some(BootstrapStep::Chunk {
            completes_chunk: true,
            to: Some(_),
            ..
        })) => {}
        other => panic!("expected the first chunk, whole and not the end, got {other:?}"),
    }

    // The node is bootstrapped itself (new history epoch); then the first chunk is stored.
    tokio::task::block_in_place(|| node.wal().reset_history(&GtidSet::new()))
        .expect("reset the node's history");
    acker
        .stored(1)
        .await
        .expect("report the first chunk stored");
    let mut chunks = 1u64;
    let end = loop {
        match next(&mut b).await {
            // A chunk read before the reset may still come; the end follows.
            Ok(Some(BootstrapStep::Chunk {
                completes_chunk, ..
            })) => {
                if completes_chunk {
                    chunks += 1;
                    // The node may have ended the stream already (its error follows).
                    let _ = acker.stored(chunks).await;
                }
            }
            Ok(Some(BootstrapStep::Records(_) | BootstrapStep::Ops(_))) => {}
            other => break other,
        }
    };
    assert!(
        matches!(&end, Err(BootstrapError::Restart(why)) if why.contains("history was replaced")),
        "a copy whose node replaced its history must start again from scratch; got {end:?}"
    );
    server.shutdown().await;
}
