//! Slots under a live subscription, over real QUIC on loopback with a bare log as the node: a
//! `DropSlot` that arrives while a subscription is attaching its slot (created or taken, not
//! yet answered `Subscribed`) is refused as "in use", a subscription whose slot is gone all
//! the same (removed through the log itself) ends with an `Error` at its next ack, so does one
//! acked past what it was sent, and a slot has one live subscription at a time (a second is
//! refused until the first ends, also when the first one's network went away). Guards against
//! a consumer that believes its slot holds its position while retention is free to remove the
//! log it still needs, or whose slot stops moving without a word.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tideline_stream::log_node::LogNode;
use tideline_stream::proto::{Start, WriteOp};
use tideline_stream::{
    Client, ClientConfig, ClientError, ErrorCode, Event, Node, ServerConfig, ServerHandle,
    Subscription, tls,
};
use tideline_wal::{MemStorage, RetentionPolicy, Wal, WalOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    node: Arc<LogNode>,
    server: ServerHandle,
    client_cfg: ClientConfig,
}

async fn start(cfg: impl FnOnce(&mut ServerConfig)) -> Fixture {
    start_with(WalOptions::default(), cfg).await
}

async fn start_with(opts: WalOptions, cfg: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    tls::ensure_secrets(dir.path()).unwrap();
    let secrets = tls::load_server(dir.path()).unwrap();
    let node = Arc::new(LogNode::new(
        Wal::open(Arc::new(MemStorage::new()), opts).unwrap(),
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

/// An ack past what the server has sent is a consumer bug (or a consumer acking from a
/// position this subscription has not reached): the subscription ends with an `Error` the
/// consumer sees, as PROTOCOL.md says, and the slot does not move. Guards against a server that
/// only stops reading acks and goes on sending: the slot then never moves again on that
/// connection, without a word, until retention's cap invalidates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_past_what_was_sent_ends_the_subscription() {
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
    sub.ack(110).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Err(_) => panic!(
                "the subscription went on for 10 s ({events} heartbeats or batches) after an \
                 ack of offset 110 when only 1..=10 were sent"
            ),
            Ok(Ok(Some(_))) => events += 1,
            Ok(Ok(None)) => panic!("the subscription ended without saying why"),
            Ok(Err(ClientError::Server { code, message })) => {
                assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
                assert!(
                    message.contains("ack of offset 110") && message.contains("10"),
                    "the error does not name the ack and what was sent: {message}"
                );
                break;
            }
            Ok(Err(e)) => panic!("the subscription failed without saying why: {e}"),
        }
    }
    let slot = f.node.wal().slot("s").expect("slot s exists");
    assert_eq!(slot.restart_offset, 1, "the bad ack moved the slot");
}

/// A subscription's reader holds the segment it starts in from before the node answers
/// `Subscribed`: retention that removes that segment between the subscribe and the first
/// read (every 10 s on a node whose log passed its size) must not end the stream with
/// `PositionUnavailable`, which a `--from earliest` tail, resuming by GTID set from the
/// removed segment, takes for purged GTIDs and stops for good. Here the window is held open
/// with the test pause after the slot is taken (an existing slot, further on, so that it does
/// not hold the first segment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_between_subscribe_and_first_read_does_not_take_the_start_away() {
    let pause = Arc::new(tokio::sync::Notify::new());
    let opts = WalOptions {
        segment_bytes_max: 4096,
        retention: RetentionPolicy {
            retain_bytes_min: 0,
            slot_bytes_max: None,
            slot_age_max: None,
        },
        ..WalOptions::default()
    };
    let mut observer = None;
    let f = start_with(opts, |c| {
        c.heartbeat = Duration::from_millis(50);
        c.unsafe_pause_after_slot_attach = Some(pause.clone());
        observer = Some(c.observer.clone());
    })
    .await;
    let observer = observer.expect("the configuration was built");
    let writer = f.client().await;
    for i in 1..=100 {
        writer.commit(put(i)).await.unwrap();
    }
    let wal = f.node.wal();
    let segments = wal.stats().segments;
    assert!(segments.len() > 2, "the log must span segments");
    let second = segments[1].first_offset;
    wal.create_slot("s", second).unwrap();
    let consumer = f.client().await;
    let subscribing = tokio::spawn(async move {
        let sub = consumer
            .subscribe(Start::Earliest, None, None, Some("s".into()))
            .await;
        (consumer, sub)
    });
    // The subscription has its reader and took slot s once it shows in the node's list.
    let deadline = Instant::now() + Duration::from_secs(10);
    while observer.subscriptions().is_empty() {
        assert!(Instant::now() < deadline, "the subscription never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let removed = tokio::task::block_in_place(|| wal.run_retention()).unwrap();
    assert_eq!(
        wal.first_offset(),
        second,
        "retention removed {removed:?}: the first segment only was meant to go"
    );
    pause.notify_one();
    let (_consumer, sub) = subscribing.await.unwrap();
    let mut sub = sub.unwrap();
    assert_eq!(sub.next_offset(), 1);
    read_through(&mut sub, 100).await;
}

/// Subscribes with slot `slot` until the node accepts it (a `Conflict` means the slot is still
/// in use: try again); fails after `within`. Returns the subscription, how long it took and
/// how often it was refused.
async fn subscribe_when_free(
    client: &Client,
    slot: &str,
    within: Duration,
) -> (Subscription, Duration, u32) {
    let began = Instant::now();
    let mut refused = 0;
    loop {
        match client
            .subscribe(Start::Earliest, None, None, Some(slot.into()))
            .await
        {
            Ok(sub) => return (sub, began.elapsed(), refused),
            Err(ClientError::Server {
                code: ErrorCode::Conflict,
                message,
            }) if began.elapsed() < within => {
                assert!(message.contains("in use"), "{message}");
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!(
                "slot {slot} was still refused {:?} after its subscription ended: {e}",
                began.elapsed()
            ),
        }
    }
}

/// A slot holds one consumer's position: while one subscription uses slot s, a second one
/// naming s is refused (`Conflict`, saying the slot is in use and by whom), since the faster
/// consumer's acks would move the slot past what the slower one still needs. Once the first
/// subscription ends, a new one takes the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_subscription_of_a_slot_is_refused_until_the_first_ends() {
    let f = start(|c| c.heartbeat = Duration::from_millis(50)).await;
    let writer = f.client().await;
    for i in 1..=10 {
        writer.commit(put(i)).await.unwrap();
    }
    let fast = f.client().await;
    let mut first = fast
        .subscribe(Start::Earliest, None, None, Some("s".into()))
        .await
        .unwrap();
    read_through(&mut first, 10).await;
    let slow = f.client().await;
    match slow
        .subscribe(Start::Earliest, None, None, Some("s".into()))
        .await
    {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Conflict, "{message}");
            assert!(
                message.contains("slot s is in use") && message.contains("another slot name"),
                "the refusal does not say the slot is in use and what to do: {message}"
            );
        }
        Ok(second) => {
            // What it costs: the first consumer's ack moves the slot past what the second,
            // which has read nothing yet, still needs.
            first.ack(10).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            panic!(
                "a second live subscription of slot s was accepted (from offset {}); after the \
                 first one's ack the slot is {:?}",
                second.next_offset(),
                f.node.wal().slot("s")
            );
        }
        Err(e) => panic!("the second subscription failed otherwise: {e}"),
    }
    // The first ends (its consumer closes the stream): the slot is free again.
    drop(first);
    let (mut second, _, _) = subscribe_when_free(&slow, "s", Duration::from_secs(5)).await;
    read_through(&mut second, 10).await;
}

/// A UDP relay between a client and the server that can be cut: from then on it drops every
/// datagram both ways, as a network that went away does.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr) -> Relay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(server).await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let task = {
            let cut = cut.clone();
            tokio::spawn(async move {
                let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
                let mut client = None;
                loop {
                    tokio::select! {
                        Ok((n, from)) = front.recv_from(&mut up) => {
                            client = Some(from);
                            if !cut.load(Ordering::SeqCst) {
                                let _ = back.send(&up[..n]).await;
                            }
                        }
                        Ok(n) = back.recv(&mut down) => {
                            if let Some(to) = client.filter(|_| !cut.load(Ordering::SeqCst)) {
                                let _ = front.send_to(&down[..n], to).await;
                            }
                        }
                    }
                }
            })
        };
        Relay { addr, cut, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A consumer whose network goes away does not close its stream: its subscription stays the
/// slot's user until the node notices the connection is gone, at the idle timeout (the
/// shorter of the node's and the client's). The consumer that comes back then takes its slot
/// again: the refusal is not left behind by a connection that died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_free_again_once_the_node_notices_its_consumer_is_gone() {
    let idle = Duration::from_secs(2);
    let f = start(|c| {
        c.heartbeat = Duration::from_millis(50);
        c.idle_timeout = idle;
    })
    .await;
    let writer = f.client().await;
    for i in 1..=10 {
        writer.commit(put(i)).await.unwrap();
    }
    let relay = Relay::start(f.server.local_addr()).await;
    let lost = Client::connect(&relay.addr.to_string(), f.client_cfg.clone())
        .await
        .unwrap();
    let mut first = lost
        .subscribe(Start::Earliest, None, None, Some("s".into()))
        .await
        .unwrap();
    read_through(&mut first, 10).await;
    relay.cut.store(true, Ordering::SeqCst);
    let back = f.client().await;
    let (mut sub, took, refused) = subscribe_when_free(&back, "s", idle * 5).await;
    read_through(&mut sub, 10).await;
    eprintln!("slot s was free again {took:?} after the network went away (idle timeout {idle:?})");
    assert!(
        refused > 0,
        "slot s was taken by a second subscription while its first one's connection was live"
    );
    drop((first, lost, relay));
}
