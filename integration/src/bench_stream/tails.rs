//! The Tideline server over a log and the consumers that tail it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use tideline_stream::log_node::LogNode;
use tideline_stream::{
    Client, ClientConfig, ClientSecrets, Event, Node, ServerConfig, ServerSecrets, Start,
};
use tideline_wal::Wal;

use super::*;

/// A Tideline server over the log in `dir`, on the server runtime.
pub(super) struct Server {
    pub(super) handle: Option<tideline_stream::ServerHandle>,
    pub(super) addr: SocketAddr,
    pub(super) node: Arc<LogNode>,
}

pub(super) fn start_server(
    rt: &RtThread,
    wal: Wal,
    secrets: &ServerSecrets,
    consumer_buffer_bytes: usize,
) -> anyhow::Result<Server> {
    let node = Arc::new(LogNode::new(wal));
    let mut cfg = ServerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.consumer_buffer_bytes = consumer_buffer_bytes;
    let (secrets, n) = (secrets.clone(), node.clone());
    let handle = rt
        .run(async move { tideline_stream::serve(cfg, secrets, n) })?
        .context("start the Tideline server")?;
    Ok(Server {
        addr: handle.local_addr(),
        handle: Some(handle),
        node,
    })
}

impl Server {
    pub(super) fn stop(mut self, rt: &RtThread) -> anyhow::Result<()> {
        if let Some(h) = self.handle.take() {
            rt.run(h.shutdown())?;
        }
        self.node.wal().close()?;
        Ok(())
    }
}

/// How a consumer reads its batches.
#[derive(Debug, Clone, Copy)]
pub(super) enum Read {
    /// Decoded into owned transactions (`Subscription::next`).
    Owned,
    /// In place (`Subscription::next_raw`): each record validated and its ops counted through
    /// rkyv's archived form, nothing allocated per record.
    Raw,
}

/// Counts the transaction at `offset`, which must follow the `txns` counted so far.
pub(super) fn next_in_order(txns: &mut u64, offset: u64) -> anyhow::Result<()> {
    ensure!(
        offset == *txns + 1,
        "offset {offset} arrived where {} was expected",
        *txns + 1
    );
    *txns += 1;
    Ok(())
}

/// Reads `expect` transactions from `earliest` on a connected client, checking that offsets
/// arrive dense and in order. Returns the changes (ops) received and the seconds it took from
/// the subscribe request to the last transaction.
pub(super) async fn tail_all(
    client: &Client,
    expect: u64,
    read: Read,
) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut sub = client
        .subscribe(Start::Earliest, None, None, None)
        .await
        .context("subscribe from earliest")?;
    let (mut txns, mut changes) = (0u64, 0u64);
    while txns < expect {
        if let Read::Raw = read {
            match sub.next_raw().await.context("read the subscription")? {
                Some(Event::Batch(batch)) => {
                    for r in batch.records() {
                        next_in_order(&mut txns, r.offset.get())?;
                        changes += r.archived().context("read a record")?.ops.len() as u64;
                    }
                }
                Some(Event::Heartbeat { .. } | Event::Progress { .. }) => {}
                None => bail!("the server ended the subscription after {txns} of {expect}"),
            }
            continue;
        }
        match sub.next().await.context("read the subscription")? {
            Some(Event::Batch(batch)) => {
                for t in &batch {
                    next_in_order(&mut txns, t.offset.get())?;
                    changes += t.ops.len() as u64;
                }
            }
            Some(Event::Heartbeat { .. } | Event::Progress { .. }) => {}
            None => bail!("the server ended the subscription after {txns} of {expect}"),
        }
    }
    Ok((changes, started.elapsed().as_secs_f64()))
}

pub(super) async fn connect(addr: SocketAddr, secrets: ClientSecrets) -> anyhow::Result<Client> {
    let mut cfg = ClientConfig::new(secrets);
    cfg.client_name = "tideline-bench".into();
    Client::connect(&addr.to_string(), cfg)
        .await
        .with_context(|| format!("connect to {addr}"))
}

/// One consumer tails the whole log. Returns (changes, seconds).
pub(super) fn tail_one(
    rt: &RtThread,
    addr: SocketAddr,
    secrets: &ClientSecrets,
    expect: u64,
    read: Read,
) -> anyhow::Result<(u64, f64)> {
    let secrets = secrets.clone();
    rt.run(async move {
        let client = connect(addr, secrets).await?;
        let r = tail_all(&client, expect, read).await;
        client.close().await;
        r
    })?
}

/// One consumer tails the whole log while another, on its own connection, subscribed first
/// and never reads. Returns (changes, seconds) of the reading one.
pub(super) fn tail_beside_stalled(
    rt: &RtThread,
    addr: SocketAddr,
    secrets: &ClientSecrets,
    expect: u64,
) -> anyhow::Result<(u64, f64)> {
    let secrets = secrets.clone();
    rt.run(async move {
        let stalled = connect(addr, secrets.clone()).await?;
        let stuck = stalled
            .subscribe(Start::Earliest, None, None, None)
            .await
            .context("subscribe the stalled consumer")?;
        let client = connect(addr, secrets).await?;
        let r = tail_all(&client, expect, Read::Owned).await;
        drop(stuck);
        client.close().await;
        stalled.close().await;
        r
    })?
}

/// `consumers` consumers tail the whole log at once, each on its own OS thread with its own
/// current-thread runtime and connection, as separate consumer processes would. Returns
/// (changes received by all, seconds from the common start to the last transaction).
pub(super) fn tail_many(
    addr: SocketAddr,
    secrets: &ClientSecrets,
    expect: u64,
    consumers: usize,
) -> anyhow::Result<(u64, f64)> {
    let start = Arc::new(std::sync::Barrier::new(consumers + 1));
    let handles: Vec<_> = (0..consumers)
        .map(|i| {
            let (secrets, start) = (secrets.clone(), start.clone());
            std::thread::Builder::new()
                .name(format!("bench-consumer-{i}"))
                .spawn(move || -> anyhow::Result<u64> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("start a consumer runtime")?;
                    let client = rt.block_on(connect(addr, secrets));
                    // Every consumer starts together, connected or not.
                    start.wait();
                    let client = client?;
                    rt.block_on(async {
                        let r = tail_all(&client, expect, Read::Owned).await;
                        client.close().await;
                        r.map(|(changes, _)| changes)
                    })
                })
                .context("start a consumer thread")
        })
        .collect::<anyhow::Result<_>>()?;
    start.wait();
    let started = Instant::now();
    let mut total = 0u64;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("a consumer thread panicked"))??;
    }
    Ok((total, started.elapsed().as_secs_f64()))
}
