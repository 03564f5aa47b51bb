//! Batches never pass the batch size limit (`batch_bytes_max`) that the receiving end
//! enforces: a record that would take a batch past it ends that batch and goes in the next one,
//! on its own if need be, in unfiltered (records as the log stores them) and filtered
//! subscriptions alike. Over real QUIC on loopback, with a bare log as the node and a small
//! limit on both ends. Guards against a large record that follows a few others making a frame
//! every client refuses (`FrameTooLarge`), again at every resume, so that the tail never
//! gets past it.

use std::sync::Arc;
use std::time::Duration;

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{Limits, Start, WriteOp};
use tideline_stream::{Client, ClientConfig, Event, ServerConfig, Subscription, tls};
use tideline_wal::{MemStorage, Wal, WalOptions};

/// The limit on both ends: room for one of the large records below, not two.
const BATCH_BYTES_MAX: u32 = 64 << 10;
const VALUE_BYTES: usize = 40 << 10;

fn put(key: &str, value_bytes: usize) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        tree: "t".into(),
        key: key.as_bytes().to_vec(),
        value: vec![b'v'; value_bytes],
    }]
}

/// Reads batches until offset `last` arrived; returns the offsets of each batch.
async fn batches_through(sub: &mut Subscription, last: u64) -> Vec<Vec<u64>> {
    let mut batches = Vec::new();
    let mut through = 0;
    while through < last {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(Some(Event::Batch(txns)))) => {
                let offsets: Vec<u64> = txns.iter().map(|t| t.offset.get()).collect();
                through = offsets.last().copied().unwrap_or(through);
                batches.push(offsets);
            }
            Ok(Ok(Some(Event::Heartbeat { .. } | Event::Progress { .. }))) => {}
            other => panic!(
                "the subscription ended before offset {last} (batches so far: {batches:?}): \
                 {other:?}"
            ),
        }
    }
    batches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_would_pass_the_batch_limit_goes_in_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let limits = Limits {
        batch_bytes_max: BATCH_BYTES_MAX,
        ..Limits::default()
    };
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap(),
    ));
    let mut server_cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    server_cfg.limits = limits;
    server_cfg.heartbeat = Duration::from_millis(50);
    let server =
        tideline_stream::serve(server_cfg, tls::load_server(dir.path()).unwrap(), node).unwrap();
    let mut client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).unwrap());
    client_cfg.limits = limits;
    let addr = server.local_addr().to_string();
    let client = Client::connect(&addr, client_cfg).await.unwrap();
    // Small ones share a batch with a large one while they fit.
    client.commit(put("a", VALUE_BYTES)).await.unwrap();
    client.commit(put("b", 100)).await.unwrap();
    client.commit(put("c", VALUE_BYTES)).await.unwrap();
    client.commit(put("d", VALUE_BYTES)).await.unwrap();
    client.commit(put("e", 100)).await.unwrap();
    let expected = vec![vec![1, 2], vec![3], vec![4, 5]];

    let mut raw = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .unwrap();
    assert_eq!(batches_through(&mut raw, 5).await, expected, "unfiltered");
    let mut filtered = client
        .subscribe(Start::Earliest, Some("t".into()), None, None)
        .await
        .unwrap();
    assert_eq!(
        batches_through(&mut filtered, 5).await,
        expected,
        "filtered"
    );
    server.shutdown().await;
}
