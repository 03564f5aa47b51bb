//! Resumable tails.
//!
//! Owns: the connection to one node, reconnecting with backoff and resuming right after the
//! last transaction delivered, saving positions through a [`Checkpoint`], and ending cleanly
//! ([`Tail::close`]). Must never skip a position silently (a lost position ends the stream with
//! a [`TailError`]), never ack a slot past what the checkpoint holds, and never reach into how a
//! checkpoint stores its position.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use tideline_stream::proto::ClientSubscription;
use tideline_stream::{Client, ClientError, ErrorCode, Event, Subscription};
use tideline_wal::{Epoch, GtidSet, Transaction};
use tokio::sync::watch;

use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::position::{Position, TailStart};

mod close;
mod config;

use config::backoff;
pub use config::{TailConfig, TailError};

use close::{
    CLOSE_WAIT, CloseRequest, Closing, close_requested, final_ack, goodbye, unless_closed,
};

/// A tail without a subscription to its node, and why: it lost one, or could not get one, and
/// is reconnecting. The tail keeps going by itself; this is for whoever reports on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Disconnected {
    /// When the first failure of this run happened.
    pub since: Instant,
    /// The last failure: the lost connection, then each failed reconnect.
    pub error: String,
    /// Failures since `since` (the lost connection and each failed reconnect), at least 1.
    pub failures: u32,
}

/// The tail's link to its node as [`Tail::disconnected`] reports it: `None` while subscribed
/// (and before the first attempt).
type Link = Arc<Mutex<Option<Disconnected>>>;

/// Records one failure of the link (a lost connection or a failed reconnect).
fn link_failed(link: &Mutex<Option<Disconnected>>, error: &dyn std::fmt::Display) {
    let mut l = lock(link);
    let d = l.get_or_insert_with(|| Disconnected {
        since: Instant::now(),
        error: String::new(),
        failures: 0,
    });
    d.error = error.to_string();
    d.failures += 1;
}

/// Classifies an error that ends a connection: retry, or end the tail. `PositionUnavailable`
/// is fatal here: the run loop retries it once by GTID set when it ends a subscription the
/// node had accepted.
fn classify(e: ClientError) -> Result<ClientError, TailError> {
    match e {
        ClientError::Unauthorized { .. } => Err(TailError::Unauthorized(e)),
        ClientError::Server {
            code: ErrorCode::PositionUnavailable,
            message,
        } => Err(TailError::PositionUnavailable(message)),
        e if e.is_retryable() => Ok(e),
        e => Err(TailError::Client(e)),
    }
}

/// The application's checkpoint and what it holds now (loaded or last saved): slots are
/// acked only up to that.
struct Store {
    checkpoint: Option<Box<dyn Checkpoint>>,
    stored: Option<Position>,
}

impl Store {
    fn save(&mut self, pos: &Position) -> Result<(), CheckpointError> {
        if let Some(cp) = self.checkpoint.as_mut() {
            cp.save(pos)?;
            self.stored = Some(pos.clone());
        }
        Ok(())
    }

    /// What a slot may be acked up to once the application has processed up to `processed`:
    /// what the checkpoint holds, so that a consumer that crashes finds its log still held;
    /// without a checkpoint, `processed` (the application keeps no position to resume from,
    /// so the slot only has to hold the log for this process's reconnects).
    fn ackable<'a>(&'a self, processed: Option<&'a Position>) -> Option<&'a Position> {
        if self.checkpoint.is_none() {
            processed
        } else {
            self.stored.as_ref()
        }
    }
}

type SharedCheckpoint = Arc<Mutex<Store>>;

/// Per subscription: when the checkpoint was saved last, what the slot was acked to, and how
/// far the subscription has reached.
struct Settle {
    last_saved: Option<tokio::time::Instant>,
    acked: u64,
    /// The last offset this subscription has sent or reported (in a batch or a progress
    /// report; before any, the one before its start). The node ends a subscription acked past
    /// it, so the slot is acked no further: a position from before this subscription (a
    /// checkpoint resumed by GTID set, which starts at a segment's first record) is acked once
    /// the stream has passed it.
    reached: u64,
}

/// The offset to ack the slot on `server` up to, when the application has processed up to
/// `processed` (see [`Store::ackable`]): only offsets of `server`, no further than the
/// subscription has reached, and only when that moves the slot.
fn ack_offset(
    store: &Store,
    processed: Option<&Position>,
    server: uuid::Uuid,
    st: &Settle,
) -> Option<u64> {
    store
        .ackable(processed)
        .filter(|p| p.server_uuid == server)
        .map(|p| p.offset.min(st.reached))
        .filter(|&o| o > st.acked)
}

/// Why [`settle`] failed.
enum SettleError {
    /// Saving the checkpoint failed: the tail ends.
    Checkpoint(CheckpointError),
    /// The node did not take the ack: the subscription is over (the node ends it, saying
    /// why, or the connection is gone).
    Ack(ClientError),
}

/// How long a tail whose ack the node refused goes on reading the subscription, to learn
/// why from the node's `Error` that ends it, before it reconnects anyway.
const ACK_REFUSED_GRACE: Duration = Duration::from_secs(5);

/// Takes `pos` as the tail's position: publishes it, saves it when the checkpoint interval
/// has passed, and acks the slot on `server` up to what the checkpoint holds (without a
/// checkpoint, up to `pos`: the application keeps no position to resume from, so the slot
/// only has to hold the log for this process's reconnects), and no further than the
/// subscription has reached. Only offsets of `server` are acked there.
async fn settle(
    pos: Position,
    server: uuid::Uuid,
    cfg: &TailConfig,
    st: &mut Settle,
    sub: &mut Subscription,
    delivered: &Mutex<Option<Position>>,
    checkpoint: &Mutex<Store>,
) -> Result<(), SettleError> {
    *lock(delivered) = Some(pos.clone());
    let ack = {
        let mut store = lock(checkpoint);
        if store.checkpoint.is_some() {
            // Saving syncs a file: at most once per interval, so a fast tail is not held to
            // the disk's fsync rate. `Tail::commit` saves at once.
            let due = st
                .last_saved
                .is_none_or(|t| t.elapsed() >= cfg.checkpoint_interval);
            if due && store.stored.as_ref() != Some(&pos) {
                store.save(&pos).map_err(SettleError::Checkpoint)?;
                st.last_saved = Some(tokio::time::Instant::now());
            }
        }
        ack_offset(&store, Some(&pos), server, st)
    };
    if cfg.slot.is_some()
        && let Some(o) = ack
    {
        sub.ack(o).await.map_err(SettleError::Ack)?;
        st.acked = o;
    }
    Ok(())
}

/// Logs an ack the node did not take and returns it with the deadline for the subscription
/// to end by (see [`ACK_REFUSED_GRACE`]).
fn refused_ack(cfg: &TailConfig, e: ClientError) -> (ClientError, tokio::time::Instant) {
    tracing::warn!(
        addr = %cfg.addr, error = %e,
        "tail: the node did not take an ack of the slot; the subscription is over, reconnecting once it ends"
    );
    (e, tokio::time::Instant::now() + ACK_REFUSED_GRACE)
}

/// The node's head and history epoch now, from a `latest` subscription (no filter, no slot)
/// closed at once.
async fn node_head(client: &Client) -> Result<(u64, Epoch), ClientError> {
    let sub = client
        .subscribe(TailStart::Latest.to_wire(), None, None, None)
        .await?;
    Ok((sub.head(), sub.epoch()))
}

/// Classifies a failed connect: another cluster's certificate ends the tail, unless this tail
/// reached the node before (it may be mid-redeploy): then it is retried like a network error.
fn classify_connect(e: ClientError, connected_once: bool) -> Result<ClientError, TailError> {
    match e {
        ClientError::WrongCluster { .. } if connected_once => Ok(e),
        e => classify(e),
    }
}

/// A resumable tail: an async [`Stream`] of transactions that reconnects and resumes by
/// itself. See [`tail`].
pub struct Tail {
    stream: Pin<Box<dyn Stream<Item = Result<Transaction, TailError>> + Send>>,
    delivered: Arc<Mutex<Option<Position>>>,
    checkpoint: SharedCheckpoint,
    head: Arc<AtomicU64>,
    link: Link,
    closing: watch::Sender<Option<CloseRequest>>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("delivered", &*lock(&self.delivered))
            .finish_non_exhaustive()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tail {
    /// The position after the last transaction returned (and any filtered out after it).
    pub fn position(&self) -> Option<Position> {
        lock(&self.delivered).clone()
    }

    /// The node's head (its last offset) as last reported by the node: at the subscription,
    /// with every batch and with every heartbeat. 0 before the first subscription. With
    /// [`Tail::position`], it gives the consumer's lag in transactions.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Relaxed)
    }

    /// `Some` while the tail has no subscription because a connection was lost or an attempt
    /// failed (it is reconnecting, by itself), with when that began, the last error and the
    /// failures since; `None` once it is subscribed again. Network trouble never ends a tail,
    /// so this is how a consumer that waits on it learns that its node is out of reach.
    pub fn disconnected(&self) -> Option<Disconnected> {
        lock(&self.link).clone()
    }

    /// Declares every transaction returned so far processed and saves the checkpoint. The
    /// tail also saves by itself when the application asks for the transaction after the last
    /// one of a batch, on progress reports and heartbeats, at most once per
    /// `checkpoint_interval`, so a crash re-delivers at most the batch in progress and the
    /// batches taken within that interval; an application that stops cleanly calls this (or
    /// [`Tail::close`]) last and loses and repeats nothing. The slot is acked only up to what
    /// the checkpoint holds (at the next batch, progress report or heartbeat after a save, or
    /// at [`Tail::close`]), so a consumer that crashes finds its log still held.
    pub fn commit(&mut self) -> Result<(), TailError> {
        let pos = lock(&self.delivered).clone();
        if let Some(p) = pos {
            lock(&self.checkpoint).save(&p)?;
        }
        Ok(())
    }

    /// Saves `pos`, a position [`Tail::position`] returned before the application took
    /// transactions it then could not process (its output went away, say): the checkpoint
    /// holds what was processed and the next run starts with the first one that was not.
    pub fn commit_at(&mut self, pos: &Position) -> Result<(), TailError> {
        lock(&self.checkpoint).save(pos)?;
        Ok(())
    }

    /// Ends the tail cleanly, every transaction returned so far processed: saves the
    /// checkpoint ([`Tail::commit`]), acks the slot up to what the checkpoint holds (without a
    /// checkpoint, up to what was returned), waits until the node has taken that ack, and
    /// closes the connection, so that the node ends the subscription and frees the slot at
    /// once: the next run naming the slot gets it without waiting. A tail dropped instead
    /// acks nothing more (the slot stays where a batch, progress report or heartbeat last
    /// acked it), and a process that exits right after leaves the node holding the
    /// subscription, and the slot, until its idle timeout, as after a crash.
    ///
    /// Takes at most 2 s: a node out of reach cannot hang a stopping application (the slot
    /// then stays where it was acked last, which only holds more log). Fails only when the
    /// checkpoint cannot be saved; the connection is closed anyway, and the slot is not acked
    /// past what the checkpoint holds.
    pub async fn close(self) -> Result<(), TailError> {
        let processed = self.position();
        self.finish(processed).await
    }

    /// [`Tail::close`] with `processed` as the position of what was processed: a position
    /// [`Tail::position`] returned before the application took transactions it then could not
    /// process ([`Tail::commit_at`]); `None` if it returned `None`. The checkpoint and the slot
    /// go no further.
    pub async fn close_at(self, processed: Option<Position>) -> Result<(), TailError> {
        self.finish(processed).await
    }

    async fn finish(mut self, processed: Option<Position>) -> Result<(), TailError> {
        // Saved first: the final ack goes no further than what the checkpoint holds, and a
        // failed save leaves it where it was.
        let saved = match &processed {
            Some(p) => lock(&self.checkpoint).save(p).map_err(TailError::from),
            None => Ok(()),
        };
        self.closing.send_replace(Some(CloseRequest { processed }));
        // The run loop owns the connection: it sees the request at its next step (right after
        // the transaction the application took last, while waiting for the node, or between
        // reconnects), ends the subscription and returns. Whatever it would still yield is
        // not the application's any more.
        let stream = &mut self.stream;
        let drained = tokio::time::timeout(CLOSE_WAIT, async {
            while std::future::poll_fn(|cx| stream.as_mut().poll_next(cx))
                .await
                .is_some()
            {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "tail: the connection did not close within {CLOSE_WAIT:?}; dropping it (the node \
                 ends the subscription at its idle timeout)"
            );
        }
        saved
    }
}

impl Stream for Tail {
    type Item = Result<Transaction, TailError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

/// Starts a tail. With a checkpoint, it starts from the saved position (ignoring
/// `cfg.start`) and saves the position of what the application has consumed (see
/// [`Tail::commit`]). Transactions come in log order, each once: after a reconnect to the
/// same node in the same history epoch it resumes by offset; after a switch to another node,
/// or once the node's history was replaced (it was bootstrapped), by GTID set.
pub fn tail(cfg: TailConfig, checkpoint: Option<Box<dyn Checkpoint>>) -> Tail {
    let delivered: Arc<Mutex<Option<Position>>> = Arc::new(Mutex::new(None));
    let checkpoint: SharedCheckpoint = Arc::new(Mutex::new(Store {
        checkpoint,
        stored: None,
    }));
    let head = Arc::new(AtomicU64::new(0));
    let link: Link = Arc::new(Mutex::new(None));
    let (closing, close_requests) = watch::channel(None);
    let stream = run(
        cfg,
        delivered.clone(),
        checkpoint.clone(),
        head.clone(),
        link.clone(),
        close_requests,
    );
    Tail {
        stream: Box::pin(stream),
        delivered,
        checkpoint,
        head,
        link,
        closing,
    }
}

fn run(
    cfg: TailConfig,
    delivered: Arc<Mutex<Option<Position>>>,
    checkpoint: SharedCheckpoint,
    head: Arc<AtomicU64>,
    link: Link,
    mut closing: Closing,
) -> impl Stream<Item = Result<Transaction, TailError>> + Send {
    async_stream::stream! {
        let loaded = lock(&checkpoint).checkpoint.as_ref().map(|c| c.load());
        let mut pos: Option<Position> = match loaded {
            Some(Ok(p)) => p,
            Some(Err(e)) => { yield Err(TailError::from(e)); return; }
            None => None,
        };
        lock(&checkpoint).stored.clone_from(&pos);
        lock(&delivered).clone_from(&pos);
        let mut last_saved = None;
        let mut failures: u32 = 0;
        let mut last_err: Option<ClientError> = None;
        let mut connected_once = false;
        // Where the last subscription that the node accepted ended with `PositionUnavailable`
        // mid-stream: its history epoch and the GTIDs delivered by then. The same again (the
        // same history, nothing delivered since) is not a replaced history but a log the node
        // cannot read on: it ends the tail instead of resubscribing for ever.
        let mut lost_mid_stream: Option<(Epoch, GtidSet)> = None;
        // Since when the node has refused the slot (in use by another live subscription), and
        // `failures` after that refusal. A refusal continues the run only if no other failure
        // came between (`failures` is still that) and no subscription (which clears it).
        let mut slot_refused: Option<(tokio::time::Instant, u32)> = None;
        loop {
            // A tail asked to close between subscriptions has nothing to end.
            if close_requested(&closing).is_some() {
                return;
            }
            if failures > 0 {
                if cfg.reconnect_attempts_max.is_some_and(|m| failures > m) {
                    yield Err(TailError::GaveUp {
                        attempts: failures - 1,
                        last: last_err.take().unwrap_or_else(|| {
                            ClientError::Unexpected("the node ended the subscription".into())
                        }),
                    });
                    return;
                }
                let mut delay = backoff(&cfg, failures - 1);
                if let Some((since, n)) = slot_refused && n == failures {
                    // The last retry of a refused slot comes at the bound, not a backoff after.
                    delay = delay.min(cfg.slot_in_use_wait.saturating_sub(since.elapsed()));
                }
                if unless_closed(&mut closing, tokio::time::sleep(delay))
                    .await
                    .is_none()
                {
                    return;
                }
            }
            let Some(connected) =
                unless_closed(&mut closing, Client::connect(&cfg.addr, cfg.client.clone())).await
            else {
                return;
            };
            let client = match connected {
                Ok(c) => {
                    connected_once = true;
                    c
                }
                Err(e) => match classify_connect(e, connected_once) {
                    Ok(e) => {
                        tracing::warn!(addr = %cfg.addr, error = %e, attempt = failures + 1, "tail: reconnecting");
                        link_failed(&link, &e);
                        last_err = Some(e);
                        failures += 1;
                        continue;
                    }
                    Err(fatal) => { yield Err(fatal); return; }
                },
            };
            let uuid = client.server_uuid();
            let start = match &pos {
                Some(p) => p.resume_on(uuid),
                None => cfg.start.clone(),
            };
            let by_offset = pos.is_some() && matches!(start, TailStart::Offset(_));
            let subscribed = client
                .subscribe(start.to_wire(), cfg.tree.clone(), cfg.prefix.clone(), cfg.slot.clone());
            // A subscription the node may have accepted meanwhile ends with the connection,
            // dropped with `client`.
            let Some(subscribed) = unless_closed(&mut closing, subscribed).await else {
                return;
            };
            let mut sub = match subscribed {
                Ok(s) => s,
                // The slot is held by another subscription. Retried for a while: the holder
                // may be this tail's own lost connection, or a consumer that died, which the
                // node ends at its idle timeout; past `slot_in_use_wait` the holder is live.
                Err(ClientError::Server { code: ErrorCode::Conflict, message }) if cfg.slot.is_some() => {
                    let now = tokio::time::Instant::now();
                    let since = match slot_refused {
                        Some((since, n)) if n == failures => since,
                        _ => now,
                    };
                    let waited = now.duration_since(since);
                    if waited >= cfg.slot_in_use_wait {
                        yield Err(TailError::SlotInUse { message, waited });
                        return;
                    }
                    let e = ClientError::Server { code: ErrorCode::Conflict, message };
                    tracing::warn!(
                        addr = %cfg.addr, error = %e,
                        "tail: the node refused the slot; retrying for up to {:?} in all",
                        cfg.slot_in_use_wait
                    );
                    link_failed(&link, &e);
                    last_err = Some(e);
                    failures += 1;
                    slot_refused = Some((since, failures));
                    continue;
                }
                Err(e) => match classify(e) {
                    Ok(e) => {
                        tracing::warn!(addr = %cfg.addr, error = %e, "tail: resubscribing");
                        link_failed(&link, &e);
                        last_err = Some(e);
                        failures += 1;
                        continue;
                    }
                    // A resume by offset the node refused: the position is past the node's
                    // head, before its log (purged), or of a history the node has replaced
                    // since. The node's head and epoch now tell which.
                    Err(TailError::PositionUnavailable(message)) if by_offset => {
                        match node_head(&client).await {
                            Ok((node_head, epoch)) => {
                                if let Some(p) = pos.as_mut() && !p.offset_valid_in(uuid, epoch) {
                                    tracing::warn!(
                                        addr = %cfg.addr, was = ?p.epoch, now = %epoch,
                                        "tail: the node's history was replaced; resuming by GTID set"
                                    );
                                    p.epoch = None;
                                    continue;
                                }
                                let seen = pos.as_ref().map_or(0, |p| p.offset);
                                if node_head < seen {
                                    yield Err(TailError::Diverged { server_uuid: uuid, node_head, seen });
                                } else {
                                    yield Err(TailError::PositionUnavailable(message));
                                }
                                return;
                            }
                            Err(e) => match classify(e) {
                                Ok(e) => {
                                    tracing::warn!(addr = %cfg.addr, error = %e, "tail: resubscribing");
                                    link_failed(&link, &e);
                                    last_err = Some(e);
                                    failures += 1;
                                    continue;
                                }
                                Err(fatal) => { yield Err(fatal); return; }
                            },
                        }
                    }
                    Err(fatal) => { yield Err(fatal); return; }
                },
            };
            let epoch = sub.epoch();
            // Another node (a failover) may be behind the last one: its head, not the max.
            head.store(sub.head(), Ordering::Relaxed);
            if by_offset && let Some(p) = pos.as_mut() && !p.offset_valid_in(uuid, epoch) {
                // The node's history was replaced since this position was taken (it was
                // bootstrapped): its offsets name other transactions now. Resume by GTID set.
                tracing::warn!(
                    addr = %cfg.addr, was = ?p.epoch, now = %epoch,
                    "tail: the node's history was replaced; resuming by GTID set"
                );
                p.epoch = None;
                drop(sub);
                continue;
            }
            // A node of this history whose head is below the position refuses the resume
            // (`Diverged` is told apart there): an accepted one starts within its log.
            let same_history = pos.as_ref().is_some_and(|p| p.offset_valid_in(uuid, epoch));
            let mut state = match &pos {
                Some(p) => {
                    let mut s = ClientSubscription::new(p.gtids.clone());
                    if same_history && p.offset > 0 {
                        s = s.resuming_after(p.offset);
                    }
                    s
                }
                None => ClientSubscription::new(GtidSet::new()),
            };
            if let Err(e) = state.handle_subscribed(sub.next_offset(), sub.head(), sub.gtids_before()) {
                yield Err(TailError::Client(ClientError::Wire(e.into())));
                return;
            }
            failures = 0;
            slot_refused = None;
            *lock(&link) = None;
            // The position is defined from the subscription on: everything covered before its
            // start counts as seen (a `latest` start's set comes from the subscription itself,
            // with nothing between), and a reconnect before the first record resumes here
            // rather than re-evaluating the start.
            let here = match &pos {
                Some(p) => Position { gtids: state.seen().clone(), ..p.clone() },
                None => Position {
                    server_uuid: uuid,
                    offset: sub.next_offset().saturating_sub(1),
                    gtids: state.seen().clone(),
                    epoch: Some(epoch),
                },
            };
            pos = Some(here.clone());
            let mut st = Settle {
                last_saved,
                acked: 0,
                reached: sub.next_offset().saturating_sub(1),
            };
            // Set once the node refused an ack: the subscription is over, and the node ends it
            // saying why (or the connection is gone); the tail reads on until then, or until
            // the deadline, and reconnects.
            let mut ack_refused: Option<(ClientError, tokio::time::Instant)> = None;
            match settle(here, uuid, &cfg, &mut st, &mut sub, &delivered, &checkpoint).await {
                Ok(()) => {}
                Err(SettleError::Checkpoint(e)) => { yield Err(e.into()); return; }
                Err(SettleError::Ack(e)) => ack_refused = Some(refused_ack(&cfg, e)),
            }
            // Saving the start is not a save of delivered work: the first batch may save too.
            st.last_saved = last_saved;
            loop {
                let next = match &ack_refused {
                    None => unless_closed(&mut closing, sub.next()).await,
                    Some((_, deadline)) => match tokio::time::timeout_at(*deadline, unless_closed(&mut closing, sub.next())).await {
                        Ok(next) => next,
                        Err(_) => {
                            let e = ack_refused.take().map_or_else(
                                || ClientError::Unexpected("the node refused an ack".into()),
                                |(e, _)| e,
                            );
                            tracing::warn!(addr = %cfg.addr, error = %e, "tail: the node refused an ack and did not end the subscription; reconnecting");
                            link_failed(&link, &e);
                            last_err = Some(e);
                            failures += 1;
                            break;
                        }
                    },
                };
                // Asked to close while waiting for the node: everything returned was taken.
                let Some(next) = next else {
                    let processed = close_requested(&closing).and_then(|c| c.processed);
                    let ack = final_ack(&checkpoint, processed.as_ref(), uuid, &st, ack_refused.is_some());
                    goodbye(&cfg, client, sub, ack).await;
                    return;
                };
                let taken = match next {
                    Ok(Some(Event::Batch(txns))) => {
                        let last_offset = txns.last().map(|t| t.offset.get());
                        if let Some(o) = last_offset {
                            head.fetch_max(o, Ordering::Relaxed);
                            st.reached = st.reached.max(o);
                        }
                        let mut gtids = state.seen().clone();
                        let fresh = match state.handle_batch(txns) {
                            Ok(f) => f,
                            Err(e) => { yield Err(TailError::Client(ClientError::Wire(e.into()))); return; }
                        };
                        let mut closed = None;
                        for txn in fresh {
                            gtids.insert(txn.gtid);
                            let p = Position { server_uuid: uuid, offset: txn.offset.get(), gtids: gtids.clone(), epoch: Some(epoch) };
                            *lock(&delivered) = Some(p);
                            yield Ok(txn);
                            // Asked to close after taking this one: the rest of the batch is
                            // not the application's, and no batch-end position is settled.
                            closed = close_requested(&closing);
                            if closed.is_some() {
                                break;
                            }
                        }
                        if let Some(c) = closed {
                            let ack = final_ack(&checkpoint, c.processed.as_ref(), uuid, &st, ack_refused.is_some());
                            goodbye(&cfg, client, sub, ack).await;
                            return;
                        }
                        // The application has asked for more: it took every transaction of
                        // the batch.
                        last_offset.or(state.last_offset()).map(|o| Position {
                            server_uuid: uuid,
                            offset: o,
                            gtids: state.seen().clone(),
                            epoch: Some(epoch),
                        })
                    }
                    Ok(Some(Event::Progress { through, gtids })) => {
                        st.reached = st.reached.max(through);
                        state.handle_progress(through, &gtids);
                        Some(Position {
                            server_uuid: uuid,
                            offset: state.last_offset().unwrap_or(through),
                            gtids: state.seen().clone(),
                            epoch: Some(epoch),
                        })
                    }
                    // Idle: save what a throttled save left behind.
                    Ok(Some(Event::Heartbeat { head: h, .. })) => {
                        head.fetch_max(h, Ordering::Relaxed);
                        pos.clone()
                    }
                    Ok(None) => {
                        tracing::info!(addr = %cfg.addr, "tail: node ended the subscription; reconnecting");
                        link_failed(&link, &"the node ended the subscription");
                        failures += 1;
                        break;
                    }
                    // The node accepted this position and lost it while serving: its log was
                    // replaced under the subscription (a bootstrap of the node ends with that),
                    // and the offsets go on in a new history. Resubscribe by the GTID set, as
                    // after any reset; a refusal of that one is a truly lost position (fatal).
                    Err(ClientError::Server { code: ErrorCode::PositionUnavailable, message }) => {
                        let gtids = pos.as_ref().map(|p| p.gtids.clone()).unwrap_or_default();
                        let at = Some((epoch, gtids));
                        if lost_mid_stream == at {
                            yield Err(TailError::PositionUnavailable(message));
                            return;
                        }
                        lost_mid_stream = at;
                        if let Some(p) = pos.as_mut() {
                            p.epoch = None;
                        }
                        let e = ClientError::Server { code: ErrorCode::PositionUnavailable, message };
                        tracing::warn!(addr = %cfg.addr, error = %e, "tail: the node's log was replaced mid-stream; resubscribing by GTID set");
                        link_failed(&link, &e);
                        last_err = Some(e);
                        failures += 1;
                        break;
                    }
                    Err(e) => match classify(e) {
                        Ok(e) => {
                            tracing::warn!(addr = %cfg.addr, error = %e, "tail: connection lost; reconnecting");
                            link_failed(&link, &e);
                            last_err = Some(e);
                            failures += 1;
                            break;
                        }
                        Err(fatal) => { yield Err(fatal); return; }
                    },
                };
                if let Some(p) = taken {
                    pos = Some(p.clone());
                    match settle(p, uuid, &cfg, &mut st, &mut sub, &delivered, &checkpoint).await {
                        Ok(()) => {}
                        Err(SettleError::Checkpoint(e)) => { yield Err(e.into()); return; }
                        Err(SettleError::Ack(e)) => {
                            if ack_refused.is_none() {
                                ack_refused = Some(refused_ack(&cfg, e));
                            }
                        }
                    }
                }
            }
            last_saved = st.last_saved;
        }
    }
}
