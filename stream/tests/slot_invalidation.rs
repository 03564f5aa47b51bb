//! A live subscription whose slot the retention cap invalidates, over real QUIC on loopback
//! with a bare log as the node: the consumer's next ack ends the stream with an `Error` naming
//! the slot. Guards against acks into an invalidated slot being taken silently, so that the
//! consumer goes on believing its slot holds its position while retention is free to remove it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{Start, WriteOp};
use tideline_stream::{Client, ClientConfig, ClientError, ErrorCode, Event, Node, tls};
use tideline_wal::{MemStorage, Offset, RetentionPolicy, Wal, WalOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_into_a_slot_the_retention_cap_invalidated_ends_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let secrets = tls::load_server(dir.path()).unwrap();
    // Small segments and a slot cap two of them deep: a hundred records pass it.
    let opts = WalOptions {
        segment_bytes_max: 4096,
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: Some(8192),
            slot_age_max: None,
        },
        ..WalOptions::default()
    };
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), opts).unwrap(),
    ));
    let mut server_cfg = tideline_stream::ServerConfig::new("127.0.0.1:0".parse().unwrap());
    server_cfg.heartbeat = Duration::from_millis(50);
    let server = tideline_stream::serve(server_cfg, secrets, node.clone()).unwrap();
    let addr = server.local_addr().to_string();
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).unwrap());

    let writer = Client::connect(&addr, client_cfg.clone()).await.unwrap();
    for i in 1..=100u64 {
        let ops = vec![WriteOp::Put {
            tree: "t".into(),
            key: format!("key:{i:05}").into_bytes(),
            value: vec![b'v'; 100],
        }];
        writer.commit(ops).await.unwrap();
    }
    let consumer = Client::connect(&addr, client_cfg).await.unwrap();
    let mut sub = consumer
        .subscribe(Start::Earliest, None, None, Some("s".into()))
        .await
        .unwrap();
    let mut through = 0;
    while through < 100 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(Some(Event::Batch(txns)))) => {
                through = txns.last().map_or(through, |t| t.offset.get());
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("subscription ended before offset 100: {other:?}"),
        }
    }
    // The consumer acked nothing yet: the slot holds the log from offset 1, past the cap.
    let report = node.wal().run_retention().unwrap();
    assert_eq!(report.invalidated_slots, vec!["s".to_string()]);
    assert!(node.wal().first_offset() > Offset::FIRST);

    sub.ack(100).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Err(_) => panic!(
                "the subscription went on for 10 s after an ack into its invalidated slot: its \
                 consumer believes the slot holds its position"
            ),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the subscription ended without saying its slot is gone"),
            Ok(Err(ClientError::Server { code, message })) => {
                assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
                assert!(message.contains("slot s was invalidated"), "{message}");
                assert!(
                    !message.contains("dropped while"),
                    "an invalidated slot is called dropped: {message}"
                );
                break;
            }
            Ok(Err(e)) => panic!("the subscription failed without saying its slot is gone: {e}"),
        }
    }
    let slot = node.wal().slot("s").unwrap();
    assert_eq!(slot.restart_offset, 1, "the refused ack moved the slot");
}
