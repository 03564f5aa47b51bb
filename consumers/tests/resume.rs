//! The smart client's promise: a tail survives a node restart while it is mid-transfer (the
//! application has taken half of the log) and delivers every transaction exactly once, in
//! order; after a crash of the consumer itself mid-transfer (no final commit), its checkpoint
//! file resumes it with no gap (at least once); a lost position is a typed error. Guards against gaps and duplicates at reconnects and against silent skips,
//! also when the node's log history was replaced by a bootstrap (a new history epoch), between
//! two runs of the tail or under a live subscription.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tideline_consumers::{FileCheckpoint, TailConfig, TailError, TailStart, tail};
use tideline_stream::log_node::LogNode;
use tideline_stream::proto::WriteOp;
use tideline_stream::{Client, ClientConfig, Node, Observer, ServerConfig, ServerHandle, tls};
use tideline_wal::{FileStorage, Gtid, GtidSet, NewTransaction, Op, Transaction, Wal, WalOptions};

fn start_node(data: &Path, secrets: &Path, listen: SocketAddr) -> ServerHandle {
    start_node_observed(data, secrets, listen).0
}

/// [`start_node`], also returning the server's observer (its live subscriptions).
fn start_node_observed(
    data: &Path,
    secrets: &Path,
    listen: SocketAddr,
) -> (ServerHandle, Arc<Observer>) {
    let wal = Wal::open(
        Arc::new(FileStorage::new(data).unwrap()),
        WalOptions::default(),
    )
    .unwrap();
    let node = Arc::new(LogNode::new(wal));
    // An in-process restart may find the old socket not yet released: retry briefly (a real
    // restart is a new process, whose old socket the kernel has freed).
    for _ in 0..100 {
        let cfg = ServerConfig::new(listen);
        let observer = cfg.observer.clone();
        match tideline_stream::serve(cfg, tls::load_server(secrets).unwrap(), node.clone()) {
            Ok(h) => return (h, observer),
            Err(tideline_stream::ServeError::Bind { .. }) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("could not bind {listen} again");
}

async fn write(addr: &str, cfg: &ClientConfig, range: std::ops::RangeInclusive<u64>) {
    let client = Client::connect(addr, cfg.clone()).await.unwrap();
    for i in range {
        client
            .commit(vec![WriteOp::Put {
                tree: "default".into(),
                key: format!("k{i}").into_bytes(),
                value: i.to_string().into_bytes(),
            }])
            .await
            .unwrap();
    }
    client.close().await;
}

fn client_cfg(secrets: &Path) -> ClientConfig {
    let mut cfg = ClientConfig::new(tls::load_client_dir(secrets).unwrap());
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.idle_timeout = Duration::from_secs(2);
    cfg
}

fn fast_reconnect(mut t: TailConfig) -> TailConfig {
    t.backoff_min = Duration::from_millis(20);
    t.backoff_max = Duration::from_millis(200);
    t
}

async fn next_txn<S>(s: &mut S) -> Transaction
where
    S: futures_util::Stream<Item = Result<Transaction, TailError>> + Unpin,
{
    match tokio::time::timeout(Duration::from_secs(20), s.next()).await {
        Ok(Some(Ok(t))) => t,
        other => panic!("tail ended: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_resumes_across_a_node_restart_and_its_own_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (data, secrets) = (dir.path().join("log"), dir.path().join("secrets"));
    tls::ensure_secrets(&secrets).unwrap();
    let server = start_node(&data, &secrets, "127.0.0.1:0".parse().unwrap());
    let listen = server.local_addr();
    let addr = listen.to_string();
    let cfg = client_cfg(&secrets);
    write(&addr, &cfg, 1..=100).await;

    let checkpoint = dir.path().join("tail.checkpoint");
    let tcfg = fast_reconnect(TailConfig::new(&addr, cfg.clone(), TailStart::Earliest));
    let mut seen = Vec::new();
    let server = {
        let mut t = tail(
            tcfg.clone(),
            Some(Box::new(FileCheckpoint::new(&checkpoint))),
        );
        // Mid-transfer: the application has half of the log, the rest is still to come.
        for _ in 0..50 {
            seen.push(next_txn(&mut t).await.offset.get());
        }
        // The node goes away and comes back on the same address; writes go on after it.
        server.shutdown().await;
        let server = start_node(&data, &secrets, listen);
        write(&addr, &cfg, 101..=150).await;
        for _ in 0..100 {
            seen.push(next_txn(&mut t).await.offset.get());
        }
        assert_eq!(seen, (1..=150).collect::<Vec<_>>());
        write(&addr, &cfg, 151..=160).await;
        // The consumer crashes mid-transfer: it has taken 5 of 10 new transactions and
        // commits nothing more (the tail's own saves are all it has).
        for _ in 0..5 {
            seen.push(next_txn(&mut t).await.offset.get());
        }
        server
    };
    assert_eq!(seen, (1..=155).collect::<Vec<_>>());

    // The consumer restarts from its checkpoint: it may get again what it took after the last
    // save (at least once), never less than the next one it lacks, then everything in order.
    let mut t = pin!(tail(
        tcfg.clone(),
        Some(Box::new(FileCheckpoint::new(&checkpoint)))
    ));
    let first = next_txn(&mut t).await.offset.get();
    assert!(
        (1..=156).contains(&first),
        "resumed at offset {first} after taking 1..=155: a gap"
    );
    let mut after = vec![first];
    while after.last() != Some(&160) {
        after.push(next_txn(&mut t).await.offset.get());
    }
    assert_eq!(after, (first..=160).collect::<Vec<_>>());

    // A position the node does not have is loud.
    let gone = fast_reconnect(TailConfig::new(
        &addr,
        cfg.clone(),
        TailStart::Offset(10_000),
    ));
    let mut t = pin!(tail(gone, None));
    match tokio::time::timeout(Duration::from_secs(10), t.next()).await {
        Ok(Some(Err(TailError::PositionUnavailable(msg)))) => {
            assert!(msg.contains("10000"), "{msg}")
        }
        other => panic!("expected PositionUnavailable, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_starts_after_the_subscription_and_fences_see_own_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, secrets) = (dir.path().join("log"), dir.path().join("secrets"));
    tls::ensure_secrets(&secrets).unwrap();
    let (server, observer) = start_node_observed(&data, &secrets, "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().to_string();
    let cfg = client_cfg(&secrets);
    write(&addr, &cfg, 1..=20).await;

    let mut t = pin!(tail(
        fast_reconnect(TailConfig::new(&addr, cfg.clone(), TailStart::Latest)),
        None
    ));
    // Write once the server lists the subscription (its start is fixed by then).
    let writer = {
        let (addr, cfg) = (addr.clone(), cfg.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !observer.subscriptions().iter().any(|s| s.start == "latest") {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the tail never subscribed"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            write(&addr, &cfg, 21..=25).await;
        })
    };
    let first = next_txn(&mut t).await;
    assert_eq!(first.offset.get(), 21, "latest must skip the past");
    writer.await.unwrap();

    let session = tideline_consumers::Session::new(&addr, cfg.clone());
    let client = Client::connect(&addr, cfg.clone()).await.unwrap();
    let (_, gtid) = client
        .commit(vec![WriteOp::Put {
            tree: "default".into(),
            key: b"mine".to_vec(),
            value: b"1".to_vec(),
        }])
        .await
        .unwrap();
    let set = gtid.parse().unwrap();
    assert!(
        session
            .wait_for(&set, Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert_eq!(
        session.get("default", b"mine").await.unwrap(),
        Some(b"1".to_vec())
    );
    server.shutdown().await;
}

/// A read fence is what a client uses to read its own write on another node: on a replica that
/// has not applied the write yet, the fence must not resolve as reached; once the replica
/// applies it (keeping the origin GTID), the fence resolves. (A fence on the writing node
/// cannot fail: the write is already there. `LogNode` serves reads only from writes committed
/// through it, so the read after the fence is not checked here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_on_a_lagging_replica_waits_until_it_applied_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let (a_server, _a) = start_log_node(&dir.path().join("a"), &secrets);
    let (b_server, b) = start_log_node(&dir.path().join("b"), &secrets);
    let cfg = client_cfg(&secrets);
    let a_addr = a_server.local_addr().to_string();
    let b_addr = b_server.local_addr().to_string();

    let client = Client::connect(&a_addr, cfg.clone()).await.unwrap();
    let (_, gtid) = client
        .commit(vec![WriteOp::Put {
            tree: "default".into(),
            key: b"mine".to_vec(),
            value: b"1".to_vec(),
        }])
        .await
        .unwrap();
    let written: Gtid = gtid.parse().unwrap();
    let set: GtidSet = gtid.parse().unwrap();

    // B lags: it has not applied the write, so the fence times out unreached.
    let session = tideline_consumers::Session::new(&b_addr, cfg.clone());
    assert!(
        !session
            .wait_for(&set, Duration::from_millis(300))
            .await
            .unwrap(),
        "a fence on a replica that lacks {gtid} resolved as reached"
    );

    // A fence waiting on B, then B applies the write: the fence resolves.
    let fence = {
        let (fence, set) = (
            tideline_consumers::Session::new(&b_addr, cfg.clone()),
            set.clone(),
        );
        tokio::spawn(async move { fence.wait_for(&set, Duration::from_secs(30)).await })
    };
    tokio::task::block_in_place(|| {
        b.wal()
            .append(NewTransaction {
                gtid: written,
                timestamp_us: 0,
                ops: vec![Op::Put {
                    tree: "default".into(),
                    key: b"mine".to_vec(),
                    value: b"1".to_vec(),
                    before: None,
                }],
            })
            .unwrap()
    });
    assert!(
        fence.await.unwrap().unwrap(),
        "the fence on B did not resolve after B applied {gtid}"
    );
    a_server.shutdown().await;
    b_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_gives_up_after_its_reconnect_budget_naming_the_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    // A port nobody listens on.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = client_cfg(&secrets);
    cfg.connect_timeout = Duration::from_millis(200);
    let mut t = fast_reconnect(TailConfig::new(
        format!("127.0.0.1:{port}"),
        cfg,
        TailStart::Earliest,
    ));
    t.reconnect_attempts_max = Some(2);
    let mut t = tail(t, None);
    match tokio::time::timeout(Duration::from_secs(20), t.next()).await {
        Ok(Some(Err(TailError::GaveUp { attempts, last }))) => {
            assert_eq!(attempts, 2);
            assert!(last.to_string().contains("cannot reach"), "{last}");
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
}

/// A node that serves a log we can write into directly (origin GTIDs of another node, history
/// resets), as a replica's log is written.
fn start_log_node(data: &Path, secrets: &Path) -> (ServerHandle, Arc<LogNode>) {
    let wal = Wal::open(
        Arc::new(FileStorage::new(data).unwrap()),
        WalOptions::default(),
    )
    .unwrap();
    let node = Arc::new(LogNode::new(wal));
    let server = tideline_stream::serve(
        ServerConfig::new("127.0.0.1:0".parse().unwrap()),
        tls::load_server(secrets).unwrap(),
        node.clone(),
    )
    .unwrap();
    (server, node)
}

/// Appends the transactions `origin:range` (one put each) to `wal`, keeping their GTIDs.
fn append(wal: &Wal, origin: uuid::Uuid, range: std::ops::RangeInclusive<u64>) {
    tokio::task::block_in_place(|| append_blocking(wal, origin, range))
}

fn append_blocking(wal: &Wal, origin: uuid::Uuid, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        wal.append(NewTransaction {
            gtid: Gtid::new(origin, n).unwrap(),
            timestamp_us: 0,
            ops: vec![Op::Put {
                tree: "default".into(),
                key: format!("k{n}").into_bytes(),
                value: n.to_string().into_bytes(),
                before: None,
            }],
        })
        .unwrap();
    }
}

/// Issue 10, item 1: a tail checkpointed at node U's head; U's history is then replaced (U
/// was bootstrapped and gained P:101-120 by the copy, outside its log) and U goes on at the
/// same offsets. Resuming by offset on U would skip P:101-120 silently. The tail must notice
/// the new history epoch, resume by GTID set, get a typed error naming what U cannot send, and
/// then, failed over to P, receive exactly the GTIDs it lacks, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_resumed_across_a_history_reset_gets_exactly_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    // P: the origin, with the whole history.
    let (p_server, p) = start_log_node(&dir.path().join("p"), &secrets);
    let p_uuid = p.wal().server_uuid();
    append(p.wal(), p_uuid, 1..=130);
    // U: a replica of P that had P:1-100 at offsets 1-100.
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    append(u.wal(), p_uuid, 1..=100);

    let checkpoint = tideline_consumers::MemoryCheckpoint::default();
    let u_cfg = fast_reconnect(TailConfig::new(
        u_server.local_addr().to_string(),
        cfg.clone(),
        TailStart::Earliest,
    ));
    {
        let mut t = tail(u_cfg.clone(), Some(Box::new(checkpoint.clone())));
        for n in 1..=100 {
            assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(p_uuid, n).unwrap());
        }
        t.commit().unwrap();
    }
    // U is bootstrapped from a copy holding P:1-120: its log restarts after offset 100 with
    // those GTIDs before it, then P:121-130 arrive at offsets 101-110.
    let copied: GtidSet = format!("{p_uuid}:1-120").parse().unwrap();
    tokio::task::block_in_place(|| u.wal().reset_history(&copied)).unwrap();
    append(u.wal(), p_uuid, 121..=130);

    let mut t = pin!(tail(u_cfg, Some(Box::new(checkpoint.clone()))));
    match tokio::time::timeout(Duration::from_secs(20), t.next()).await {
        Ok(Some(Err(TailError::PositionUnavailable(msg)))) => {
            assert!(msg.contains(&format!("{p_uuid}:101-120")), "{msg}")
        }
        Ok(Some(Ok(txn))) => panic!(
            "the tail resumed by offset on a replaced history: got {} at offset {}, \
             silently skipping {p_uuid}:101-120",
            txn.gtid, txn.offset
        ),
        other => panic!("expected PositionUnavailable, got {other:?}"),
    }

    // Failed over to P, the same checkpoint gets exactly P:101-130, each once.
    let p_cfg = fast_reconnect(TailConfig::new(
        p_server.local_addr().to_string(),
        cfg.clone(),
        TailStart::Earliest,
    ));
    let mut t = pin!(tail(p_cfg, Some(Box::new(checkpoint))));
    for n in 101..=130 {
        assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(p_uuid, n).unwrap());
    }
    append(p.wal(), p_uuid, 131..=131);
    assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(p_uuid, 131).unwrap());
    u_server.shutdown().await;
    p_server.shutdown().await;
}

/// The other side of the same item: when the copy that replaced U's history holds nothing the
/// tail lacks, the tail resumes on U itself (by GTID set, since the epoch changed) and gets
/// exactly the transactions after its checkpoint, once, with no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_resumed_across_a_history_reset_it_has_everything_of_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=100);
    let checkpoint = tideline_consumers::MemoryCheckpoint::default();
    let u_cfg = fast_reconnect(TailConfig::new(
        u_server.local_addr().to_string(),
        cfg.clone(),
        TailStart::Earliest,
    ));
    {
        let mut t = tail(u_cfg.clone(), Some(Box::new(checkpoint.clone())));
        for n in 1..=100 {
            assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, n).unwrap());
        }
        t.commit().unwrap();
    }
    let copied: GtidSet = format!("{origin}:1-100").parse().unwrap();
    tokio::task::block_in_place(|| u.wal().reset_history(&copied)).unwrap();
    append(u.wal(), origin, 101..=110);

    let mut t = pin!(tail(u_cfg, Some(Box::new(checkpoint))));
    for n in 101..=110 {
        assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, n).unwrap());
    }
    append(u.wal(), origin, 111..=111);
    assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, 111).unwrap());
    u_server.shutdown().await;
}

/// A node's history is reset while it serves (at the end of every bootstrap of it): a tail
/// already subscribed there sees its subscription end with `PositionUnavailable` mid-stream.
/// That is not a lost position: the tail resubscribes by its GTID set, as on any reconnect,
/// and goes on with exactly the transactions after the last one it took, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tail_goes_on_across_a_history_reset_of_its_node() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=100);
    let mut t = tail(
        fast_reconnect(TailConfig::new(
            u_server.local_addr().to_string(),
            cfg.clone(),
            TailStart::Earliest,
        )),
        None,
    );
    for n in 1..=100 {
        assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, n).unwrap());
    }
    // The same tail is still subscribed (its reader waits for offset 101) when the node's
    // history is replaced by a copy holding exactly what the tail has.
    let copied: GtidSet = format!("{origin}:1-100").parse().unwrap();
    tokio::task::block_in_place(|| u.wal().reset_history(&copied)).unwrap();
    append(u.wal(), origin, 101..=110);
    for n in 101..=110 {
        assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, n).unwrap());
    }
    append(u.wal(), origin, 111..=111);
    assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, 111).unwrap());
    u_server.shutdown().await;
}

/// The other side: the copy that replaced the node's history holds GTIDs the live tail never
/// got. Resubscribing by GTID set is refused, and that ends the tail with an error naming
/// them: never a silent skip past them, never a loop of resubscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tail_ends_loudly_when_a_history_reset_of_its_node_skips_what_it_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=100);
    let mut t = tail(
        fast_reconnect(TailConfig::new(
            u_server.local_addr().to_string(),
            cfg.clone(),
            TailStart::Earliest,
        )),
        None,
    );
    for n in 1..=100 {
        assert_eq!(next_txn(&mut t).await.gtid, Gtid::new(origin, n).unwrap());
    }
    let copied: GtidSet = format!("{origin}:1-120").parse().unwrap();
    tokio::task::block_in_place(|| u.wal().reset_history(&copied)).unwrap();
    append(u.wal(), origin, 121..=130);
    match tokio::time::timeout(Duration::from_secs(20), t.next()).await {
        Ok(Some(Err(TailError::PositionUnavailable(msg)))) => {
            assert!(msg.contains(&format!("{origin}:101-120")), "{msg}")
        }
        Ok(Some(Ok(txn))) => panic!(
            "the tail went on past GTIDs it never got: {} at offset {}",
            txn.gtid, txn.offset
        ),
        other => panic!("expected PositionUnavailable, got {other:?}"),
    }
    u_server.shutdown().await;
}

/// Waits until `cond` holds, checking every 10 ms; panics with `what` after 20 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A checkpoint written before history epochs were recorded (`epoch: None`) resumes by GTID
/// set, also on the node it came from, and that subscription starts at the first record of
/// the segment holding the first GTID the consumer lacks: before the checkpoint's offset. The
/// tail must not ack its slot past what this subscription has sent (the node ends a
/// subscription acked so), and its slot must follow what the consumer saves. Guards against a
/// slot that stops moving for the whole life of the connection, pinning the log until
/// retention's cap invalidates it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_follows_a_tail_resumed_from_a_checkpoint_without_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=50);
    // The consumer took 1..=50 on this node; its checkpoint has no epoch.
    let mut checkpoint = tideline_consumers::MemoryCheckpoint::default();
    tideline_consumers::Checkpoint::save(
        &mut checkpoint,
        &tideline_consumers::Position {
            server_uuid: u.wal().server_uuid(),
            offset: 50,
            gtids: format!("{origin}:1-50").parse().unwrap(),
            epoch: None,
        },
    )
    .unwrap();
    let mut tcfg = fast_reconnect(TailConfig::new(
        u_server.local_addr().to_string(),
        cfg.clone(),
        TailStart::Earliest,
    ));
    tcfg.slot = Some("s".into());
    // Every position taken is saved: the slot may follow each one.
    tcfg.checkpoint_interval = Duration::ZERO;
    // The application takes every transaction as it comes (the tail settles, saves and acks
    // only while it is asked for more).
    let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let mut t = tail(tcfg, Some(Box::new(checkpoint.clone())));
    // The tail subscribes (it lacks nothing yet, so the node sends nothing) and settles at its
    // start, where it may ack its slot: it has once it reports the node's head.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while t.head() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tail never subscribed"
        );
        std::future::poll_fn(|cx| {
            let polled = t.poll_next_unpin(cx);
            assert!(
                polled.is_pending(),
                "the tail yielded with nothing to send: {polled:?}"
            );
            std::task::Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let app = tokio::spawn(async move {
        while let Some(r) = t.next().await {
            if taken_tx.send(r).is_err() {
                break;
            }
        }
    });
    let mut take =
        async |n: u64| match tokio::time::timeout(Duration::from_secs(20), taken.recv()).await {
            Ok(Some(Ok(txn))) => assert_eq!(txn.gtid, Gtid::new(origin, n).unwrap()),
            other => panic!("the tail ended before {origin}:{n}: {other:?}"),
        };
    append(u.wal(), origin, 51..=100);
    for n in 51..=100 {
        take(n).await;
    }
    let slot = || u.wal().slot("s").map(|s| s.restart_offset);
    wait_until("the slot follows the saved position to offset 101", || {
        slot() == Some(101)
    })
    .await;
    append(u.wal(), origin, 101..=110);
    for n in 101..=110 {
        take(n).await;
    }
    wait_until("the slot follows the saved position to offset 111", || {
        slot() == Some(111)
    })
    .await;
    app.abort();
    u_server.shutdown().await;
}

/// A node that comes back with less history than the consumer saw, in the same history epoch
/// (its data directory was restored from a backup, say), lost transactions: the tail must say
/// so (`Diverged`: re-bootstrap the consumer), not that its position is "unavailable" with the
/// advice to start from an available one, which skips or repeats data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_consumer_in_the_same_history_is_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    tls::ensure_secrets(&secrets).unwrap();
    let cfg = client_cfg(&secrets);
    let (u_server, u) = start_log_node(&dir.path().join("u"), &secrets);
    let origin = uuid::Uuid::new_v4();
    append(u.wal(), origin, 1..=10);
    let mut checkpoint = tideline_consumers::MemoryCheckpoint::default();
    tideline_consumers::Checkpoint::save(
        &mut checkpoint,
        &tideline_consumers::Position {
            server_uuid: u.wal().server_uuid(),
            offset: 50,
            gtids: format!("{origin}:1-50").parse().unwrap(),
            epoch: Some(u.wal().history_epoch()),
        },
    )
    .unwrap();
    let t = fast_reconnect(TailConfig::new(
        u_server.local_addr().to_string(),
        cfg.clone(),
        TailStart::Earliest,
    ));
    let mut t = pin!(tail(t, Some(Box::new(checkpoint))));
    match tokio::time::timeout(Duration::from_secs(20), t.next()).await {
        Ok(Some(Err(
            e @ TailError::Diverged {
                node_head, seen, ..
            },
        ))) => {
            assert_eq!((node_head, seen), (10, 50));
            assert!(e.to_string().contains("re-bootstrap the consumer"), "{e}");
        }
        other => panic!("expected Diverged {{ node_head: 10, seen: 50 }}, got {other:?}"),
    }
    u_server.shutdown().await;
}
