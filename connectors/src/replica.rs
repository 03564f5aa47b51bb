//! Replication: a node started with `--upstream ADDR` tails each upstream by GTID
//! auto-positioning and applies what it lacks to its own engine. The upstream's GTIDs are kept;
//! each applied transaction gets the next local offset; a GTID already executed is a no-op, so
//! chains, fan-out, multi-source merges and circular paths are safe. Failover is a restart with
//! another `--upstream`: the replica sends its `gtid_executed`, the new upstream streams
//! exactly what is missing. No file names or offsets appear anywhere in the configuration.
//!
//! A replica is a pipeline whose sink is its own engine ([`EngineSink`]): this module is its
//! source side — one auto-positioned tail per upstream, the decision to bootstrap, errant-GTID
//! detection, multi-source rules and the upstream's `status` — and it hands every received
//! group of transactions to the engine sink through the pipeline's [`Driver`] (the same retry
//! and reporting every pipeline uses), as the bootstrap hands its steps through the pipeline's
//! copy. The engine sink applies them idempotently by GTID and its position is the engine's
//! own `gtid_executed`, stored in the same store batch as the data.
//!
//! Owns: the replication loop of one upstream (connect, back off, decide to bootstrap, follow
//! the tail and hand it to the sink), errant-GTID detection, the refusal to copy over this
//! node's own transactions the upstream lacks. Must never: write to the engine other than
//! through the engine sink, move a GTID number or offset the upstream assigned, or copy state
//! itself (that is `bootstrap`'s job, which this module calls and never the reverse).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tideline_consumers::Position;
use tideline_engine::Engine;
use tideline_stream::{Client, ClientConfig, ClientError, ErrorCode, Event, Start};
use tideline_wal::{Gtid, GtidSet, Transaction};

use crate::bootstrap;
use crate::pipeline::PipelineCheckpoint;
use crate::pipeline::drive::{Driver, Report};
use crate::sink::engine::EngineSink;
use crate::sink::{Batch, Item, SinkError};
use crate::status::{SharedStatus, UpstreamState, UpstreamStatus, update};
use crate::stop::{Stop, classify};

/// When a replica copies its upstream's state instead of catching up from its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapMode {
    /// When the replica is empty, or the upstream purged GTIDs it needs (single upstream only).
    Auto,
    /// Never: catch up from the upstream's log, and stop with an error if it was purged.
    Never,
}

/// How a replica replicates.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaOptions {
    /// When to bootstrap.
    pub bootstrap: BootstrapMode,
    /// How many upstreams the node has (a multi-source replica cannot bootstrap: a copy of
    /// one upstream would replace what the others sent).
    pub sources: usize,
    /// Chunk size asked of the upstream when bootstrapping.
    pub chunk_bytes: u64,
}

/// Starts replicating from `addr` into `engine`; returns the status handle and a handle that
/// stops the replication task.
pub fn spawn(
    addr: String,
    cfg: ClientConfig,
    engine: Arc<Engine>,
    opts: ReplicaOptions,
) -> (SharedStatus, tokio::task::AbortHandle) {
    let status: SharedStatus = Arc::new(Mutex::new(UpstreamStatus::new(&addr)));
    let st = status.clone();
    let task = tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                let delay = Duration::from_millis(100)
                    .saturating_mul(1 << failures.min(6))
                    .min(Duration::from_secs(5));
                tokio::time::sleep(delay).await;
            }
            match replicate_once(&addr, &cfg, &engine, &st, opts).await {
                Ok(()) => failures = 1,
                Err(Stop::Retry(e)) => {
                    tracing::warn!(upstream = %addr, error = %e, "replication: reconnecting");
                    update(&st, |s| {
                        s.state = UpstreamState::Connecting;
                        s.error = Some(e);
                    });
                    failures += 1;
                }
                // Another cluster's certificate or a refused token: permanent, unless this
                // upstream once worked in this process (it may be mid-redeploy, or restarted
                // with a rotated token before this replica), in which case it is checked again
                // after the longest backoff.
                Err(Stop::Permanent(e))
                    if st
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .server_uuid
                        .is_some() =>
                {
                    tracing::warn!(upstream = %addr, error = %e, "replication: reconnecting");
                    update(&st, |s| {
                        s.state = UpstreamState::Connecting;
                        s.error = Some(e);
                    });
                    failures = failures.max(6);
                }
                Err(Stop::Held(e)) => {
                    tracing::error!(upstream = %addr, error = %e, "replication held for an operator");
                    update(&st, |s| {
                        s.state = UpstreamState::Error;
                        s.error = Some(e);
                    });
                    failures = failures.max(6);
                }
                Err(Stop::Fatal(e) | Stop::Permanent(e)) => {
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
    (status, task.abort_handle())
}

fn is_purged(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Server {
            code: ErrorCode::PositionUnavailable,
            ..
        }
    )
}

async fn replicate_once(
    addr: &str,
    cfg: &ClientConfig,
    engine: &Arc<Engine>,
    st: &SharedStatus,
    opts: ReplicaOptions,
) -> Result<(), Stop> {
    let client = Client::connect(addr, cfg.clone()).await.map_err(classify)?;
    let upstream_uuid = client.server_uuid();
    if upstream_uuid == engine.server_uuid() {
        return Err(Stop::Fatal(format!(
            "{addr} is this node itself (server_uuid {upstream_uuid}); remove it from --upstream"
        )));
    }
    update(st, |s| s.server_uuid = Some(upstream_uuid.to_string()));
    let can_bootstrap = opts.bootstrap == BootstrapMode::Auto && opts.sources == 1;
    let empty = engine.gtid_executed().is_empty() && engine.trees().is_empty();
    if engine.is_bootstrapping() {
        pending_bootstrap_is_ours(addr, upstream_uuid, engine, opts)?;
    }
    let mut sink = EngineSink::new(engine.clone());
    if engine.is_bootstrapping() || (can_bootstrap && empty) {
        bootstrap::run(&client, &mut sink, engine, st, addr, opts.chunk_bytes).await?;
    }
    match follow(addr, &client, engine, st, opts.sources).await {
        Err(Purged(e)) if can_bootstrap => {
            // A copy wipes this node's state but keeps its own GTIDs executed: it must not run
            // over own transactions the upstream lacks. A first look without pausing local
            // writes, so that a replica held here does not refuse its clients at each
            // re-check; then the decisive one with local writes paused until the copy began.
            keep_own_transactions(addr, &client, engine, st, &e).await?;
            let paused = LocalWritesPaused::pause(engine).await?;
            keep_own_transactions(addr, &client, engine, st, &e).await?;
            tracing::warn!(upstream = %addr, error = %e, "the upstream purged GTIDs this replica needs: bootstrapping");
            let copied =
                bootstrap::run(&client, &mut sink, engine, st, addr, opts.chunk_bytes).await;
            drop(paused);
            copied?;
            follow(addr, &client, engine, st, opts.sources)
                .await
                .map_err(|Purged(e)| Stop::Retry(format!("after the bootstrap: {e}")))?
        }
        // Another upstream may still have what this one purged (a diamond or triangle whose
        // branches purge at different times): held, re-checked, and carried on by itself once
        // another upstream has delivered those GTIDs.
        Err(Purged(e)) if opts.sources > 1 => Err(Stop::Held(format!(
            "{e}; this replica needs GTIDs upstream {addr} has purged, and a multi-source \
             replica cannot bootstrap from one upstream (the copy would replace what the \
             others sent). Waiting in case another upstream delivers them: checked again every \
             few seconds, and replication from {addr} resumes by itself once this replica has \
             them. If no upstream has them, bootstrap this replica from one upstream first, \
             then add the others"
        ))),
        Err(Purged(e)) => Err(Stop::Fatal(format!(
            "{e}; this replica needs GTIDs the upstream has purged: restart it with \
             --bootstrap auto, or pick an upstream that still has them"
        ))),
        Ok(r) => r,
    }
}

/// Exactly one bootstrap may run: a bootstrap left unfinished (its progress is stored) is
/// resumed only from the upstream its progress names. The tasks of the other upstreams wait
/// (retrying) until it has finished; if no configured upstream is that node, none copies and
/// each says why. A single-source replica may start the copy again from scratch from its one
/// upstream (the operator repointed it).
fn pending_bootstrap_is_ours(
    addr: &str,
    upstream_uuid: uuid::Uuid,
    engine: &Engine,
    opts: ReplicaOptions,
) -> Result<(), Stop> {
    if opts.sources == 1 {
        return Ok(());
    }
    let stored = engine
        .bootstrap_progress()
        .and_then(|b| tideline_consumers::BootstrapProgress::from_json(&b));
    match stored {
        Some(p) if p.server_uuid == upstream_uuid => Ok(()),
        Some(p) => Err(Stop::Retry(format!(
            "this replica is in the middle of a bootstrap from node {}; {addr} (node \
             {upstream_uuid}) waits until it has finished. If node {} is not among the \
             --upstream addresses, restart with its address as the only --upstream to finish \
             the copy (or with one upstream of your choice to copy that one from scratch)",
            p.server_uuid, p.server_uuid
        ))),
        None => Err(Stop::Fatal(
            "this replica is in the middle of a bootstrap whose stored progress does not \
             decode, so it cannot tell which of its upstreams it was copying: restart it with \
             one --upstream to copy that one from scratch"
                .into(),
        )),
    }
}

/// Refuses a bootstrap from an upstream that lacks transactions this node made itself
/// (`--allow-local-writes`): the copy would wipe their effects while their GTIDs stay executed
/// (`Engine::bootstrap_begin` keeps them, so that no GTID number is reused), and no GTID
/// comparison would ever show the loss. `Held`: checked again every few seconds, so the
/// replica copies by itself once the upstream has them. `purged`: why a copy is needed.
async fn keep_own_transactions(
    addr: &str,
    client: &Client,
    engine: &Engine,
    st: &SharedStatus,
    purged: &ClientError,
) -> Result<(), Stop> {
    let upstream_executed = upstream_executed(addr, client, st).await?;
    let own_uuid = engine.server_uuid();
    let lacking = engine.gtid_executed().difference(&upstream_executed);
    let mut own = GtidSet::new();
    for iv in lacking.intervals(&own_uuid) {
        own.insert_interval(own_uuid, *iv);
    }
    if own.is_empty() {
        return Ok(());
    }
    update(st, |s| s.errant = lacking.clone());
    Err(Stop::Held(format!(
        "upstream {addr} (node {}, gtid_executed {upstream_executed}) purged GTIDs this \
         replica needs ({purged}), so catching up takes a bootstrap, and it lacks this \
         replica's own transactions {own}: a copy would wipe those acknowledged local \
         transactions. Not bootstrapping from it until that changes. Either give the \
         upstream the missing transactions: {}; this replica then resumes by itself. Or \
         discard them: stop this node, empty its data directory and start it again as a \
         fresh replica; downstreams that received them keep them and are errant in turn \
         (docs/OPERATIONS.md, \"Errant GTIDs\"); checked again every few seconds",
        client.server_uuid(),
        LET_THE_UPSTREAM_RECEIVE_THEM,
    )))
}

/// How an operator gives an upstream the transactions it lacks (docs/OPERATIONS.md, "Errant
/// GTIDs", choice 1). `--allow-local-writes` is needed: without it the upstream turns
/// read-only when given an `--upstream`, refuses its clients, and holds that node in turn for
/// its own transactions the node lacks, while the node holds it: neither ever moves.
const LET_THE_UPSTREAM_RECEIVE_THEM: &str = "restart the upstream (or a node upstream of it) \
     with an added --upstream pointing at a node that has them, e.g. this one, and with \
     --allow-local-writes (so that it keeps taking writes, and its own transactions that node \
     lacks do not hold it); once its gtid_executed contains them, restart it as before, \
     without that --upstream and without --allow-local-writes";

/// Local writes paused for the decision to bootstrap and the copy's start: the engine is
/// read-only (local commits are refused) from [`LocalWritesPaused::pause`], which returns
/// once every transaction already committed is applied (in `gtid_executed`, where
/// [`keep_own_transactions`] looks), until it is dropped. Without it a local commit made
/// after that check would be wiped by the copy, and one still in flight when the copy begins
/// would make the engine refuse to begin (`WriteError::CommitsInFlight`). Once begun, the
/// copy refuses local writes itself until it ends. Nothing if the engine is read-only anyway.
struct LocalWritesPaused {
    engine: Arc<Engine>,
    /// Whether the engine was read-write and is made so again on drop.
    resume: bool,
}

impl LocalWritesPaused {
    /// How long to wait for committed local transactions to be applied.
    const APPLIED_WAIT: Duration = Duration::from_secs(30);

    async fn pause(engine: &Arc<Engine>) -> Result<Self, Stop> {
        let resume = !engine.is_read_only();
        engine.set_read_only(true);
        let paused = LocalWritesPaused {
            engine: engine.clone(),
            resume,
        };
        if !resume {
            return Ok(paused);
        }
        let e = engine.clone();
        let applied = tokio::task::spawn_blocking(move || e.wait_all_visible(Self::APPLIED_WAIT))
            .await
            .map_err(|e| Stop::Fatal(format!("engine task failed: {e}")))?
            .map_err(|e| Stop::Fatal(e.to_string()))?;
        if !applied {
            return Err(Stop::Retry(format!(
                "transactions committed on this node were not applied within {:?}; the \
                 decision to bootstrap waits for them",
                Self::APPLIED_WAIT
            )));
        }
        Ok(paused)
    }
}

impl Drop for LocalWritesPaused {
    fn drop(&mut self) {
        if self.resume {
            self.engine.set_read_only(false);
        }
    }
}

/// The upstream's `gtid_executed`, to compare this replica's with; `Stop::Retry` while the
/// upstream is being bootstrapped itself, since its set then holds only its own GTIDs until its
/// copy ends (`Engine::bootstrap_begin`) and a comparison would call nearly everything errant.
/// The set is read between two `status` reads that both show no bootstrap and the same history
/// epoch: a copy raises `bootstrapping` before it wipes and lowers it only after it replaced
/// the history (a new epoch), so a set read between them is never one of a node mid-copy.
async fn upstream_executed(
    addr: &str,
    client: &Client,
    st: &SharedStatus,
) -> Result<GtidSet, Stop> {
    let before = epoch_unless_bootstrapping(addr, client, st).await?;
    let (_, executed) = client
        .wait_for(&GtidSet::new(), Duration::ZERO)
        .await
        .map_err(classify)?;
    let after = epoch_unless_bootstrapping(addr, client, st).await?;
    if before != after {
        return Err(Stop::Retry(format!(
            "upstream {addr} replaced its history (a bootstrap of its own ended) while this \
             replica read its GTID set; reading it again"
        )));
    }
    Ok(executed)
}

/// The upstream's history epoch from its `status` (`None` from a node that does not report
/// one); `Stop::Retry`, with no GTID called errant, while it is being bootstrapped.
async fn epoch_unless_bootstrapping(
    addr: &str,
    client: &Client,
    st: &SharedStatus,
) -> Result<Option<u64>, Stop> {
    let json = client.status().await.map_err(classify)?;
    let status: serde_json::Value = serde_json::from_str(&json).map_err(|e| {
        Stop::Retry(format!(
            "upstream {addr} answered `status` with something that is not JSON ({e}), so this \
             replica cannot tell whether it is being bootstrapped; asking again"
        ))
    })?;
    if status["bootstrapping"] == true {
        update(st, |s| s.errant = GtidSet::new());
        return Err(Stop::Retry(format!(
            "upstream {addr} (node {}) is being bootstrapped from its own upstream; waiting \
             for it to finish before comparing GTID sets",
            client.server_uuid()
        )));
    }
    Ok(status["history_epoch"].as_u64())
}

/// The upstream has purged GTIDs this replica needs.
struct Purged(ClientError);

/// Replicates from the upstream's log: errant check, subscription by GTID set, apply.
/// `Err(Purged)` when the subscription is refused because the upstream purged what is needed.
async fn follow(
    addr: &str,
    client: &Client,
    engine: &Arc<Engine>,
    st: &SharedStatus,
    sources: usize,
) -> Result<Result<(), Stop>, Purged> {
    Ok(
        match subscribe_and_apply(addr, client, engine, st, sources).await {
            Err(SubscribeError::Purged(e)) => return Err(Purged(e)),
            Err(SubscribeError::Stop(s)) => Err(s),
            Ok(r) => r,
        },
    )
}

enum SubscribeError {
    Purged(ClientError),
    Stop(Stop),
}

impl From<ClientError> for SubscribeError {
    fn from(e: ClientError) -> Self {
        SubscribeError::Stop(classify(e))
    }
}

async fn subscribe_and_apply(
    addr: &str,
    client: &Client,
    engine: &Arc<Engine>,
    st: &SharedStatus,
    sources: usize,
) -> Result<Result<(), Stop>, SubscribeError> {
    let upstream_uuid = client.server_uuid();
    let upstream_executed = upstream_executed(addr, client, st)
        .await
        .map_err(SubscribeError::Stop)?;
    let have = engine.gtid_executed();
    let (errant, held) = errant_gtids(
        &have,
        &upstream_executed,
        engine.server_uuid(),
        !engine.is_read_only(),
        sources,
    );
    if !errant.is_empty() {
        tracing::warn!(upstream = %addr, errant = %errant, "errant transactions: this replica has GTIDs its upstream lacks");
    }
    if !held.is_empty() {
        update(st, |s| s.errant = errant.clone());
        return Err(SubscribeError::Stop(Stop::Held(format!(
            "errant GTIDs {held}: this replica executed them and upstream {addr} (node \
             {upstream_uuid}, gtid_executed {upstream_executed}) lacks them, so applying from \
             it would mix two histories. Not replicating from it until that changes: point \
             this replica at an upstream that has them; or let this upstream receive them: \
             {LET_THE_UPSTREAM_RECEIVE_THEM}; or re-bootstrap this replica from it \
             (docs/OPERATIONS.md, \"Errant GTIDs\"); checked again every few seconds"
        ))));
    }
    let mut sub = match client
        .subscribe(Start::Gtid(have.to_string()), None, None, None)
        .await
    {
        Ok(sub) => sub,
        Err(e) if is_purged(&e) => return Err(SubscribeError::Purged(e)),
        Err(e) => return Err(e.into()),
    };
    update(st, |s| {
        s.state = UpstreamState::Connected;
        s.server_uuid = Some(upstream_uuid.to_string());
        s.errant = errant;
        s.error = None;
        s.upstream_head = sub.head();
        // After a bootstrap the handover offset is already known; a subscription by GTID set
        // may start further back (records this replica has are skipped).
        s.applied_offset = s.applied_offset.max(sub.next_offset().saturating_sub(1));
        s.lag_txns = s.upstream_head.saturating_sub(s.applied_offset);
    });
    tracing::info!(upstream = %addr, server_uuid = %upstream_uuid, "replicating");
    // Receiving and applying run side by side: while one group is applied, the next batches
    // arrive, and the applier takes everything that arrived as one group. A replica that
    // applied batch by batch, waiting before it read on, would fall behind a busy upstream.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Transaction>>(64);
    let mut applier = tokio::spawn(apply_loop(
        rx,
        EngineSink::new(engine.clone()),
        st.clone(),
        addr.to_string(),
        (upstream_uuid, have),
    ));
    let mut head = sub.head();
    let mut last_received = 0u64;
    let received = loop {
        let next = tokio::select! {
            next = sub.next() => next,
            // The applier only ends early on an error; stop receiving at once.
            done = &mut applier => {
                return Ok(done
                    .map_err(|e| Stop::Fatal(format!("apply task failed: {e}")))
                    .and_then(|r| r));
            }
        };
        match next {
            Ok(Some(Event::Batch(txns))) => {
                if let Some(last) = txns.last() {
                    head = head.max(last.offset.get());
                    last_received = last.offset.get();
                }
                update(st, |s| s.upstream_head = s.upstream_head.max(head));
                if tx.send(txns).await.is_err() {
                    break Ok(()); // the applier stopped: its result says why
                }
            }
            // Only filtered subscriptions get progress reports; a replica's is unfiltered.
            Ok(Some(Event::Progress { .. })) => {}
            Ok(Some(Event::Heartbeat { head: h, .. })) => {
                head = head.max(h);
                update(st, |s| {
                    s.upstream_head = s.upstream_head.max(head);
                    // A heartbeat means everything up to the head was sent or skipped (records
                    // this replica already has): once what was sent is applied, it is caught up.
                    if s.applied_offset >= last_received {
                        s.applied_offset = s.applied_offset.max(h);
                    }
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
    Ok(applier
        .await
        .map_err(|e| Stop::Fatal(format!("apply task failed: {e}")))
        .and_then(|applied| applied.and(received)))
}

/// Errant GTIDs of this replica with respect to an upstream that has executed `upstream`:
/// returns (what to report, what makes the replica refuse the upstream).
///
/// Reported: every GTID this replica has that the upstream lacks, of any origin. With several
/// upstreams, two kinds of another origin's GTIDs are left out, since they came from another
/// source rather than from a history the upstream diverged from: those of an origin the
/// upstream has never seen (a multi-source merge), and those of an origin whose lacking GTIDs
/// all lie above the upstream's highest GTID number of it (the upstream is only behind: this
/// replica got the newer ones by a shorter path, as in a triangle). A gap inside the
/// upstream's range of an origin is left in. With one upstream nothing is left out: an only
/// upstream that lacks the newest GTIDs is a failover to a node that lost them.
/// Refused on: all of those, except this node's own GTIDs when it accepts local writes
/// (`--allow-local-writes`: its own writes reach the upstream, if ever, through another path,
/// as in a circular topology).
pub(crate) fn errant_gtids(
    have: &GtidSet,
    upstream: &GtidSet,
    own_uuid: uuid::Uuid,
    local_writes: bool,
    sources: usize,
) -> (GtidSet, GtidSet) {
    let mut errant = GtidSet::new();
    let mut held = GtidSet::new();
    let lacking = have.difference(upstream);
    for uuid in lacking.uuids() {
        let only_behind = match upstream.last_seq(uuid) {
            None => true,
            Some(last) => lacking.intervals(uuid).iter().all(|iv| iv.start > last),
        };
        if sources > 1 && only_behind && *uuid != own_uuid {
            continue;
        }
        for iv in lacking.intervals(uuid) {
            errant.insert_interval(*uuid, *iv);
            if !(local_writes && *uuid == own_uuid) {
                held.insert_interval(*uuid, *iv);
            }
        }
    }
    (errant, held)
}

/// What the live side of a replica reports of its sink calls: errors in the upstream's status.
/// The counters (`applied`, lag) are updated by [`apply_loop`], which knows the upstream's
/// offsets.
struct LiveReport(SharedStatus);

impl Report for LiveReport {
    fn sink_failed(&self, e: &SinkError, _first: bool) {
        update(&self.0, |s| s.error = Some(e.to_string()));
    }

    fn sink_recovered(&self) {
        update(&self.0, |s| s.error = None);
    }

    fn wrote(&self, _txns: u64, _changes: u64, _last_ts_us: Option<i64>) {}

    fn copy_step(&self, _: &tideline_consumers::BootstrapProgress, _: f64) {}

    fn copy_done(&self, _: &Position, _: &tideline_consumers::BootstrapProgress, _: f64) {}
}

/// The sink side of the replica's pipeline: takes what the receiver hands over as few, large
/// batches as the backlog allows (no timer: a batch is whatever arrived while the previous one
/// was stored, so an idle replica applies each transaction at once) and writes them to the
/// engine sink. `(upstream, gtids)`: the upstream's `server_uuid` and the GTID set the
/// subscription started from, which the batches' checkpoints extend.
async fn apply_loop(
    mut rx: tokio::sync::mpsc::Receiver<Vec<Transaction>>,
    mut sink: EngineSink,
    st: SharedStatus,
    addr: String,
    (upstream, mut gtids): (uuid::Uuid, GtidSet),
) -> Result<(), Stop> {
    const GROUP_TXNS_MAX: usize = 16_384;
    let report = LiveReport(st.clone());
    let d: Driver<'_> = bootstrap::driver(&addr, &report);
    while let Some(mut txns) = rx.recv().await {
        while txns.len() < GROUP_TXNS_MAX {
            match rx.try_recv() {
                Ok(more) => txns.extend(more),
                Err(_) => break,
            }
        }
        let Some(last) = txns.last() else { continue };
        let (last_offset, last_ts) = (last.offset.get(), last.timestamp_us);
        let received: Vec<Gtid> = txns.iter().map(|t| t.gtid).collect();
        for g in &received {
            gtids.insert(*g);
        }
        let batch = Batch {
            source: upstream,
            checkpoint: PipelineCheckpoint::Tail(Position {
                server_uuid: upstream,
                offset: last_offset,
                gtids: gtids.clone(),
                epoch: None,
            })
            .encode(),
            items: txns.into_iter().map(Item::Txn).collect(),
        };
        d.write(&mut sink, batch).await.map_err(|e| match e {
            crate::PipelineError::Sink { message, .. } => {
                Stop::Fatal(format!("applying from {addr} failed: {message}"))
            }
            other => Stop::Fatal(format!("applying from {addr} failed: {other}")),
        })?;
        let n = sink.last_committed();
        let now_us = crate::now_us();
        update(&st, |s| {
            for g in &received {
                s.received.insert(*g);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> GtidSet {
        text.parse().unwrap()
    }

    #[test]
    fn errant_gtids_of_any_origin_hold_replication() {
        let (a, b, me) = (
            "aaaaaaaa-0000-0000-0000-000000000000",
            "bbbbbbbb-0000-0000-0000-000000000000",
            "cccccccc-0000-0000-0000-000000000000",
        );
        let me_uuid = uuid::Uuid::parse_str(me).unwrap();
        // Failover to an upstream that lost A:10: errant, whoever wrote it.
        let have = set(&format!("{a}:1-10"));
        let (errant, held) = errant_gtids(&have, &set(&format!("{a}:1-9")), me_uuid, false, 1);
        assert_eq!(
            (errant.to_string(), held),
            (format!("{a}:10"), errant.clone())
        );
        // A multi-source merge: B's GTIDs are unknown to A, so not errant towards A.
        let have = set(&format!("{a}:1-10,{b}:1-3"));
        let (errant, _) = errant_gtids(&have, &set(&format!("{a}:1-10")), me_uuid, false, 2);
        assert!(errant.is_empty(), "{errant}");
        // ... but with one upstream they are.
        let (errant, _) = errant_gtids(&have, &set(&format!("{a}:1-10")), me_uuid, false, 1);
        assert_eq!(errant.to_string(), format!("{b}:1-3"));
        // Own writes are reported; they hold replication only on a read-only replica.
        let have = set(&format!("{me}:1-2"));
        let (errant, held) = errant_gtids(&have, &GtidSet::new(), me_uuid, true, 2);
        assert_eq!(errant.to_string(), format!("{me}:1-2"));
        assert!(held.is_empty());
        let (_, held) = errant_gtids(&have, &GtidSet::new(), me_uuid, false, 1);
        assert_eq!(held.to_string(), format!("{me}:1-2"));
    }

    #[test]
    fn an_upstream_only_behind_on_an_origin_is_not_errant_with_several_sources() {
        let (a, me) = (
            "aaaaaaaa-0000-0000-0000-000000000000",
            "cccccccc-0000-0000-0000-000000000000",
        );
        let me_uuid = uuid::Uuid::parse_str(me).unwrap();
        let have = set(&format!("{a}:1-100"));
        // A triangle: this replica got A:96-100 straight from A; the other upstream, a replica
        // of A too, is behind. Neither reported nor held.
        let behind = set(&format!("{a}:1-95"));
        let (errant, held) = errant_gtids(&have, &behind, me_uuid, false, 2);
        assert!(errant.is_empty() && held.is_empty(), "{errant} / {held}");
        // A gap inside the upstream's own range of A is another history: held, all of A's
        // lacking GTIDs named.
        let gap = set(&format!("{a}:1-5:7-95"));
        let (errant, held) = errant_gtids(&have, &gap, me_uuid, false, 2);
        assert_eq!(errant.to_string(), format!("{a}:6:96-100"));
        assert_eq!(held, errant);
        // With one source nothing changes: the only upstream lacking A:96-100 is a failover to
        // a node that lost them.
        let (errant, held) = errant_gtids(&have, &behind, me_uuid, false, 1);
        assert_eq!(errant.to_string(), format!("{a}:96-100"));
        assert_eq!(held, errant);
        // This node's own GTIDs above what the upstream has of them: held on a read-only
        // node, reported only with --allow-local-writes.
        let have = set(&format!("{a}:1-95,{me}:1-5"));
        let upstream = set(&format!("{a}:1-95,{me}:1-3"));
        let (errant, held) = errant_gtids(&have, &upstream, me_uuid, false, 2);
        assert_eq!(errant.to_string(), format!("{me}:4-5"));
        assert_eq!(held, errant);
        let (errant, held) = errant_gtids(&have, &upstream, me_uuid, true, 2);
        assert_eq!(errant.to_string(), format!("{me}:4-5"));
        assert!(held.is_empty(), "{held}");
    }
}
