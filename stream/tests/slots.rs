//! Slots under a live subscription, over real QUIC on loopback with a bare log as the node: a
//! `DropSlot` that arrives while a subscription is attaching its slot (created or taken, not
//! yet answered `Subscribed`) is refused as "in use", and a subscription whose slot is gone
//! all the same (removed through the log itself) ends with an `Error` at its next ack. Guards against a consumer that believes its
//! slot holds its position while retention is free to remove the log it still needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{Start, WriteOp};
use tideline_stream::{
    Client, ClientConfig, ClientError, ErrorCode, Event, Node, ServerConfig, ServerHandle,
    Subscription, tls,
};
use tideline_wal::{MemStorage, Wal, WalOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    node: Arc<LogNode>,
    server: ServerHandle,
    client_cfg: ClientConfig,
}

async fn start(cfg: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let secrets = tls::load_server(dir.path()).unwrap();
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap(),
    ));
    let mut server_cfg = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    cfg(&mut server_cfg);
    let server = tideline_stream::serve(server_cfg, secrets, node.clone()).unwrap();
    let client_cfg = ClientConfig::new(tls::load_client_dir(dir.path()).unwrap());
    Fixture {
        _dir: dir,
        node,
        server,
        client_cfg,
    }
}

impl Fixture {
    async fn client(&self) -> Client {
        let addr = self.server.local_addr().to_string();
        Client::connect(&addr, self.client_cfg.clone())
            .await
            .unwrap()
    }
}

fn put(i: u64) -> Vec<WriteOp> {
    vec![WriteOp::Put {
        tree: "t".into(),
        key: format!("key:{i:05}").into_bytes(),
        value: vec![b'v'; 100],
    }]
}

/// Reads until the records through `offset` arrived.
async fn read_through(sub: &mut Subscription, offset: u64) {
    let mut through = 0;
    while through < offset {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Ok(Some(Event::Batch(txns)))) => {
                through = txns.last().map_or(through, |t| t.offset.get());
            }
            Ok(Ok(Some(Event::Heartbeat { .. } | Event::Progress { .. }))) => {}
            other => panic!("subscription ended before offset {offset}: {other:?}"),
        }
    }
}

/// Reads the subscription after an ack into a slot that no longer exists: it must end with an
/// `Error` naming the slot, not go on as if its position were held.
async fn expect_slot_gone_error(sub: &mut Subscription, slot: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Err(_) => panic!(
                "the subscription went on for 10 s after an ack into its dropped slot {slot}: \
                 its consumer believes the slot holds its position"
            ),
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => panic!("the subscription ended without saying its slot is gone"),
            Ok(Err(ClientError::Server { code, message })) => {
                assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
                assert!(
                    message.contains(&format!("slot {slot}")) && message.contains("dropped"),
                    "the error does not say the slot was dropped: {message}"
                );
                return;
            }
            Ok(Err(e)) => panic!("the subscription failed without saying its slot is gone: {e}"),
        }
    }
}

/// A `DropSlot` sent while a subscription has created its slot but not yet answered
/// `Subscribed` is refused as "in use", as for any live subscription: dropped there, the slot
/// would be gone under a consumer that goes on acking into it. The slot then follows the
/// consumer's ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_while_a_subscription_attaches_its_slot_is_refused() {
    let pause = Arc::new(tokio::sync::Notify::new());
    let f = start(|c| {
        c.heartbeat = Duration::from_millis(50);
        c.unsafe_pause_after_slot_attach = Some(pause.clone());
    })
    .await;
    let writer = f.client().await;
    for i in 1..=10 {
        writer.commit(put(i)).await.unwrap();
    }
    let consumer = f.client().await;
    let subscribing = tokio::spawn(async move {
        let sub = consumer
            .subscribe(Start::Earliest, None, None, Some("s".into()))
            .await;
        (consumer, sub)
    });
    // The subscription is in its window once its slot exists (it pauses right after).
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.node.wal().slot("s").is_none() {
        assert!(
            Instant::now() < deadline,
            "the subscription never created slot s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dropped = writer.drop_slot("s").await;
    pause.notify_one();
    let (_consumer, sub) = subscribing.await.unwrap();
    let mut sub = sub.unwrap();
    read_through(&mut sub, 10).await;
    sub.ack(10).await.unwrap();
    match dropped {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
            assert!(message.contains("in use"), "{message}");
        }
        Ok(restart_offset) => {
            // Say what the consumer sees of it, too.
            let after = match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
                Ok(Err(e)) => format!("ended with: {e}"),
                _ => "went on".to_string(),
            };
            panic!(
                "DropSlot removed slot s (restart offset {restart_offset}) while a subscription \
                 was attaching it; after its ack the subscription {after}"
            );
        }
        Err(e) => panic!("DropSlot failed: {e}"),
    }
    // The slot is held and follows the consumer's ack.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let slot = f.node.wal().slot("s").expect("slot s was refused a drop");
        if slot.restart_offset == 11 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ack never moved slot s: {slot:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A live subscription whose slot is removed under it (here straight through the log) learns
/// at its next ack: the stream ends with an `Error`, rather than the ack being dropped while
/// retention frees the log the consumer still needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_into_a_dropped_slot_ends_the_subscription() {
    let f = start(|c| c.heartbeat = Duration::from_millis(50)).await;
    let writer = f.client().await;
    for i in 1..=10 {
        writer.commit(put(i)).await.unwrap();
    }
    let consumer = f.client().await;
    let mut sub = consumer
        .subscribe(Start::Earliest, None, None, Some("s".into()))
        .await
        .unwrap();
    read_through(&mut sub, 10).await;
    f.node.wal().drop_slot("s").unwrap();
    sub.ack(10).await.unwrap();
    expect_slot_gone_error(&mut sub, "s").await;
    assert!(
        f.node.wal().slot("s").is_none(),
        "the ack re-created the slot"
    );
}
