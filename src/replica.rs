//! Replication: a node started with `--upstream ADDR` tails each upstream by GTID
//! auto-positioning and applies what it lacks to its own engine. The upstream's GTIDs are kept;
//! each applied transaction gets the next local offset; a GTID already executed is a no-op, so
//! chains, fan-out, multi-source merges and circular paths are safe. Failover is a restart with
//! another `--upstream`: the replica sends its `gtid_executed`, the new upstream streams
//! exactly what is missing. No file names or offsets appear anywhere in the configuration.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tideline_engine::Engine;
use tideline_stream::{Client, ClientConfig, ClientError, ErrorCode, Event, Start};
use tideline_wal::{GtidSet, NewTransaction};

/// Connection state of one upstream, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamState {
    /// Dialling, or waiting to dial again.
    Connecting,
    /// Subscribed and applying.
    Connected,
    /// Stopped on an error that needs an operator (see `error`).
    Error,
}

/// What a replica knows about one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    /// Address as configured.
    pub addr: String,
    /// Connection state.
    pub state: UpstreamState,
    /// The upstream's `server_uuid`, once connected.
    pub server_uuid: Option<String>,
    /// GTIDs received from this upstream since start (applied or already present).
    pub received: GtidSet,
    /// Transactions applied from this upstream since start.
    pub applied: u64,
    /// The upstream's head (its local offset), from batches and heartbeats.
    pub upstream_head: u64,
    /// Upstream offset of the last transaction applied here.
    pub applied_offset: u64,
    /// Upstream head minus the upstream offset of the last transaction applied here.
    pub lag_txns: u64,
    /// Age of the last applied transaction while behind; 0 when caught up.
    pub lag_seconds: f64,
    /// Local GTIDs the upstream does not have (written here, or diverged), named.
    pub errant: GtidSet,
    /// The last error, if any.
    pub error: Option<String>,
}

impl UpstreamStatus {
    fn new(addr: &str) -> Self {
        UpstreamStatus {
            addr: addr.to_string(),
            state: UpstreamState::Connecting,
            server_uuid: None,
            received: GtidSet::new(),
            applied: 0,
            upstream_head: 0,
            applied_offset: 0,
            lag_txns: 0,
            lag_seconds: 0.0,
            errant: GtidSet::new(),
            error: None,
        }
    }

    /// The `status` JSON of this upstream.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "addr": self.addr,
            "state": match self.state {
                UpstreamState::Connecting => "connecting",
                UpstreamState::Connected => "connected",
                UpstreamState::Error => "error",
            },
            "server_uuid": self.server_uuid,
            "received": self.received.to_string(),
            "applied": self.applied,
            "lag_txns": self.lag_txns,
            "lag_seconds": self.lag_seconds,
            "errant": self.errant.to_string(),
            "error": self.error,
        })
    }
}

/// A shared, updatable upstream status.
pub type SharedStatus = Arc<Mutex<UpstreamStatus>>;

fn update(status: &SharedStatus, f: impl FnOnce(&mut UpstreamStatus)) {
    f(&mut status.lock().unwrap_or_else(|p| p.into_inner()));
}

/// Starts replicating from `addr` into `engine`; returns the status handle.
pub fn spawn(addr: String, cfg: ClientConfig, engine: Arc<Engine>) -> SharedStatus {
    let status: SharedStatus = Arc::new(Mutex::new(UpstreamStatus::new(&addr)));
    let st = status.clone();
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                let delay = Duration::from_millis(100)
                    .saturating_mul(1 << failures.min(6))
                    .min(Duration::from_secs(5));
                tokio::time::sleep(delay).await;
            }
            match replicate_once(&addr, &cfg, &engine, &st).await {
                Ok(()) => failures = 1,
                Err(Stop::Retry(e)) => {
                    tracing::warn!(upstream = %addr, error = %e, "replication: reconnecting");
                    update(&st, |s| {
                        s.state = UpstreamState::Connecting;
                        s.error = Some(e);
                    });
                    failures += 1;
                }
                Err(Stop::Fatal(e)) => {
                    tracing::error!(upstream = %addr, error = %e, "replication stopped");
                    update(&st, |s| {
                        s.state = UpstreamState::Error;
                        s.error = Some(e);
                    });
                    return;
                }
            }
        }
    });
    status
}

enum Stop {
    Retry(String),
    Fatal(String),
}

fn classify(e: ClientError) -> Stop {
    match &e {
        ClientError::Unauthorized { .. } => Stop::Fatal(e.to_string()),
        ClientError::Server {
            code: ErrorCode::PositionUnavailable,
            ..
        } => Stop::Fatal(format!(
            "{e}; this replica needs GTIDs the upstream has purged: bootstrap it from a \
             snapshot (empty its data directory) or pick an upstream that still has them"
        )),
        _ if e.is_retryable() => Stop::Retry(e.to_string()),
        _ => Stop::Fatal(e.to_string()),
    }
}

async fn replicate_once(
    addr: &str,
    cfg: &ClientConfig,
    engine: &Arc<Engine>,
    st: &SharedStatus,
) -> Result<(), Stop> {
    let client = Client::connect(addr, cfg.clone()).await.map_err(classify)?;
    let upstream_uuid = client.server_uuid();
    if upstream_uuid == engine.server_uuid() {
        return Err(Stop::Fatal(format!(
            "{addr} is this node itself (server_uuid {upstream_uuid}); remove it from --upstream"
        )));
    }
    // Errant transactions: what this node wrote itself that the upstream lacks.
    let (_, upstream_executed) = client
        .wait_for(&GtidSet::new(), Duration::ZERO)
        .await
        .map_err(classify)?;
    let have = engine.gtid_executed();
    let own: GtidSet =
        have.intervals(&engine.server_uuid())
            .iter()
            .fold(GtidSet::new(), |mut acc, iv| {
                acc.insert_interval(engine.server_uuid(), *iv);
                acc
            });
    let errant = own.difference(&upstream_executed);
    if !errant.is_empty() {
        tracing::warn!(upstream = %addr, errant = %errant, "errant transactions: this replica has GTIDs its upstream lacks");
    }
    let mut sub = client
        .subscribe(Start::Gtid(have.to_string()), None, None, None)
        .await
        .map_err(classify)?;
    update(st, |s| {
        s.state = UpstreamState::Connected;
        s.server_uuid = Some(upstream_uuid.to_string());
        s.errant = errant;
        s.error = None;
        s.upstream_head = sub.head();
        s.applied_offset = sub.next_offset().saturating_sub(1);
        s.lag_txns = s.upstream_head.saturating_sub(s.applied_offset);
    });
    tracing::info!(upstream = %addr, server_uuid = %upstream_uuid, "replicating");
    // Receiving and applying run side by side: while one group is applied, the next batches
    // arrive, and the applier takes everything that arrived as one group. A replica that
    // applied batch by batch, waiting before it read on, would fall behind a busy upstream.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<tideline_wal::Transaction>>(64);
    let mut applier = tokio::spawn(apply_loop(rx, engine.clone(), st.clone(), addr.to_string()));
    let mut head = sub.head();
    let received = loop {
        let next = tokio::select! {
            next = sub.next() => next,
            // The applier only ends early on an error; stop receiving at once.
            done = &mut applier => {
                return done.map_err(|e| Stop::Fatal(format!("apply task failed: {e}")))?;
            }
        };
        match next {
            Ok(Some(Event::Batch(txns))) => {
                if let Some(last) = txns.last() {
                    head = head.max(last.offset.get());
                }
                update(st, |s| s.upstream_head = s.upstream_head.max(head));
                if tx.send(txns).await.is_err() {
                    break Ok(()); // the applier stopped: its result says why
                }
            }
            Ok(Some(Event::Heartbeat { head: h, .. })) => {
                head = head.max(h);
                update(st, |s| {
                    s.upstream_head = s.upstream_head.max(head);
                    s.lag_txns = s.upstream_head.saturating_sub(s.applied_offset);
                    if s.lag_txns == 0 {
                        s.lag_seconds = 0.0;
                    }
                });
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(classify(e)),
        }
    };
    drop(tx);
    let applied = applier
        .await
        .map_err(|e| Stop::Fatal(format!("apply task failed: {e}")))?;
    applied.and(received)
}

/// Applies what the receiver hands over, as few, large groups as the backlog allows.
async fn apply_loop(
    mut rx: tokio::sync::mpsc::Receiver<Vec<tideline_wal::Transaction>>,
    engine: Arc<Engine>,
    st: SharedStatus,
    addr: String,
) -> Result<(), Stop> {
    const GROUP_TXNS_MAX: usize = 16_384;
    while let Some(mut txns) = rx.recv().await {
        while txns.len() < GROUP_TXNS_MAX {
            match rx.try_recv() {
                Ok(more) => txns.extend(more),
                Err(_) => break,
            }
        }
        let Some(last) = txns.last() else { continue };
        let (last_offset, last_ts) = (last.offset.get(), last.timestamp_us);
        let gtids: Vec<_> = txns.iter().map(|t| t.gtid).collect();
        let batch: Vec<NewTransaction> = txns
            .into_iter()
            .map(|t| NewTransaction {
                gtid: t.gtid,
                timestamp_us: t.timestamp_us,
                ops: t.ops,
            })
            .collect();
        let eng = engine.clone();
        let applied = tokio::task::spawn_blocking(move || eng.apply_upstream_batch(batch))
            .await
            .map_err(|e| Stop::Fatal(format!("apply task failed: {e}")))?
            .map_err(|e| Stop::Fatal(format!("applying from {addr} failed: {e}")))?;
        let n = applied
            .iter()
            .filter(|a| matches!(a, tideline_engine::Applied::Committed(_)))
            .count() as u64;
        let now_us = crate::now_us();
        update(&st, |s| {
            for g in gtids {
                s.received.insert(g);
            }
            s.applied += n;
            s.applied_offset = last_offset;
            s.lag_txns = s.upstream_head.saturating_sub(last_offset);
            s.lag_seconds = if s.lag_txns == 0 {
                0.0
            } else {
                (now_us - last_ts).max(0) as f64 / 1e6
            };
        });
    }
    Ok(())
}
