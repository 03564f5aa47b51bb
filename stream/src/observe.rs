//! What the server shows about itself: connection and stream counts, refusals by reason,
//! requests by kind, the live subscriptions with their positions, and the live monitor feed.
//!
//! It owns counters and a registry, nothing else: it never blocks a request (every update is
//! an atomic or a short lock), and with no monitor attached a request pays one atomic load for
//! the monitor. The node reads it for `status`, `/metrics` and the HTTP overview; the server
//! writes it. It does no I/O.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::proto::MonitorEvent;

/// Why the server refused or dropped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// `max_connections` reached.
    MaxConnections,
    /// Wrong or missing token.
    Unauthorized,
    /// No TLS handshake and `Hello` within the handshake timeout.
    HandshakeTimeout,
    /// Evicted before it authenticated, by newer handshakes (`handshakes_max` reached).
    HandshakeEvicted,
    /// Refused at its first packet: `handshakes_max` handshakes in progress, none of them
    /// older than the grace period.
    HandshakesFull,
    /// A first message that was not a valid `Hello`, or a `Hello` of another protocol version.
    BadHello,
}

impl RefuseReason {
    /// Every reason, in the order of [`Observer::refused`].
    pub const ALL: [RefuseReason; 6] = [
        RefuseReason::MaxConnections,
        RefuseReason::Unauthorized,
        RefuseReason::HandshakeTimeout,
        RefuseReason::HandshakeEvicted,
        RefuseReason::HandshakesFull,
        RefuseReason::BadHello,
    ];

    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            RefuseReason::MaxConnections => "max_connections",
            RefuseReason::Unauthorized => "unauthorized",
            RefuseReason::HandshakeTimeout => "handshake_timeout",
            RefuseReason::HandshakeEvicted => "handshake_evicted",
            RefuseReason::HandshakesFull => "handshakes_full",
            RefuseReason::BadHello => "bad_hello",
        }
    }
}

/// Kinds of client requests, for counting.
pub const REQUEST_KINDS: [&str; 10] = [
    "get",
    "scan",
    "commit",
    "range",
    "status",
    "wait_for",
    "subscribe",
    "bootstrap",
    "index",
    "drop_slot",
];

/// One live subscription, as `status` and the overview page show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriptionInfo {
    /// The consumer's address.
    pub remote: String,
    /// The name the client gave in `Hello`.
    pub client: String,
    /// Where it asked to start (`earliest`, `latest`, `offset:N`, `gtid:SET`).
    pub start: String,
    /// Tree filter.
    pub tree: Option<String>,
    /// Key prefix filter (lossy UTF-8).
    pub prefix: Option<String>,
    /// Slot name.
    pub slot: Option<String>,
    /// Last offset sent (or passed by the filters).
    pub sent_through: u64,
    /// When it started, microseconds since the epoch.
    pub since_us: i64,
}

struct LiveSubscription {
    info: SubscriptionInfo,
    sent_through: Arc<AtomicU64>,
}

/// The live subscriptions and the slots being dropped, under one lock: a subscription is
/// registered as its slot's user before it creates or takes the slot, and a `DropSlot` claims
/// the slot only while no subscription uses it, so one of the two always sees the other. A
/// slot has at most one live subscription: it holds one consumer's position, and the acks of
/// two would move it past what the slower one still needs.
#[derive(Default)]
struct Registry {
    live: BTreeMap<u64, LiveSubscription>,
    /// Slot names with a `DropSlot` in progress, and how many.
    dropping: BTreeMap<String, usize>,
}

/// The server's counters and registries; shared between the server and the node.
pub struct Observer {
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    streams_active: AtomicU64,
    refused: [AtomicU64; RefuseReason::ALL.len()],
    requests: [AtomicU64; REQUEST_KINDS.len()],
    subscriptions: Mutex<Registry>,
    next_subscription: AtomicU64,
    monitors: AtomicUsize,
    monitor_tx: broadcast::Sender<MonitorEvent>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer")
            .field("connections_active", &self.connections_active())
            .field("monitors", &self.monitors())
            .finish_non_exhaustive()
    }
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new()
    }
}

/// Events a monitor may fall behind by before it is told it lost some.
const MONITOR_BUFFER: usize = 4096;

impl Observer {
    /// An observer with every counter at zero.
    pub fn new() -> Self {
        let (monitor_tx, _) = broadcast::channel(MONITOR_BUFFER);
        Observer {
            connections_active: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            streams_active: AtomicU64::new(0),
            refused: Default::default(),
            requests: Default::default(),
            subscriptions: Mutex::new(Registry::default()),
            next_subscription: AtomicU64::new(1),
            monitors: AtomicUsize::new(0),
            monitor_tx,
        }
    }

    /// Connections open now (handshakes included).
    pub fn connections_active(&self) -> u64 {
        self.connections_active.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn connections_total(&self) -> u64 {
        self.connections_total.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn streams_active(&self) -> u64 {
        self.streams_active.load(Ordering::Relaxed)
    }

    /// Connections refused for `reason` since start.
    pub fn refused(&self, reason: RefuseReason) -> u64 {
        self.refused[reason as usize].load(Ordering::Relaxed)
    }

    /// Requests of each kind in [`REQUEST_KINDS`] since start.
    pub fn requests(&self) -> Vec<(&'static str, u64)> {
        REQUEST_KINDS
            .iter()
            .zip(&self.requests)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Monitors attached now.
    pub fn monitors(&self) -> usize {
        self.monitors.load(Ordering::Relaxed)
    }

    /// The live subscriptions.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        subs.live
            .values()
            .map(|s| {
                let mut info = s.info.clone();
                info.sent_through = s.sent_through.load(Ordering::Relaxed);
                info
            })
            .collect()
    }

    pub(crate) fn on_refused(&self, reason: RefuseReason) {
        self.refused[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection(self: &Arc<Self>) -> Gauge {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        Gauge::new(self.clone(), |o| &o.connections_active)
    }

    pub(crate) fn stream(self: &Arc<Self>) -> Gauge {
        Gauge::new(self.clone(), |o| &o.streams_active)
    }

    pub(crate) fn on_request(&self, kind: &str) {
        if let Some(i) = REQUEST_KINDS.iter().position(|k| *k == kind) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Registers a live subscription, which from then on is the only user of its slot (a
    /// `DropSlot` of it and another subscription with it are refused) until the registration
    /// is dropped. Refused while a `DropSlot` of its slot is in progress or another live
    /// subscription uses the slot.
    pub(crate) fn subscription(
        self: &Arc<Self>,
        info: SubscriptionInfo,
        sent_through: Arc<AtomicU64>,
    ) -> Result<Registration, SlotBusy> {
        let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = &info.slot {
            if subs.dropping.contains_key(slot) {
                return Err(SlotBusy::Dropping);
            }
            if let Some(user) = subs
                .live
                .values()
                .find(|s| s.info.slot.as_ref() == Some(slot))
            {
                let mut info = user.info.clone();
                info.sent_through = user.sent_through.load(Ordering::Relaxed);
                return Err(SlotBusy::InUse(Box::new(info)));
            }
        }
        let id = self.next_subscription.fetch_add(1, Ordering::Relaxed);
        subs.live
            .insert(id, LiveSubscription { info, sent_through });
        Ok(Registration {
            observer: self.clone(),
            id,
        })
    }

    /// Claims slot `name` for a drop: while the claim lives no subscription can register with
    /// that slot. Refused with the live subscriptions that use the slot, if any.
    pub(crate) fn claim_slot_drop(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<SlotDropClaim, Vec<SubscriptionInfo>> {
        let mut subs = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        let users: Vec<SubscriptionInfo> = subs
            .live
            .values()
            .filter(|s| s.info.slot.as_deref() == Some(name))
            .map(|s| s.info.clone())
            .collect();
        if !users.is_empty() {
            return Err(users);
        }
        *subs.dropping.entry(name.to_owned()).or_default() += 1;
        Ok(SlotDropClaim {
            observer: self.clone(),
            name: name.to_owned(),
        })
    }

    /// Whether any monitor is attached: the only cost a request pays when none is.
    pub(crate) fn monitoring(&self) -> bool {
        self.monitors.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn publish(&self, event: MonitorEvent) {
        // No receiver left is fine: the monitor went away between the check and the send.
        let _ = self.monitor_tx.send(event);
    }

    pub(crate) fn attach_monitor(self: &Arc<Self>) -> MonitorFeed {
        let rx = self.monitor_tx.subscribe();
        self.monitors.fetch_add(1, Ordering::Relaxed);
        MonitorFeed {
            observer: self.clone(),
            rx,
        }
    }
}

/// Counts one open connection or stream until dropped.
pub(crate) struct Gauge {
    observer: Arc<Observer>,
    field: fn(&Observer) -> &AtomicU64,
}

impl Gauge {
    fn new(observer: Arc<Observer>, field: fn(&Observer) -> &AtomicU64) -> Gauge {
        field(&observer).fetch_add(1, Ordering::Relaxed);
        Gauge { observer, field }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.field)(&self.observer).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a subscription with a slot was not registered.
#[derive(Debug)]
pub(crate) enum SlotBusy {
    /// A `DropSlot` of the slot is in progress.
    Dropping,
    /// Another live subscription uses the slot: this one.
    InUse(Box<SubscriptionInfo>),
}

/// Keeps a subscription in the registry until dropped.
pub(crate) struct Registration {
    observer: Arc<Observer>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.observer
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .remove(&self.id);
    }
}

/// Keeps subscriptions from registering with a slot while it is dropped; releases when dropped.
pub(crate) struct SlotDropClaim {
    observer: Arc<Observer>,
    name: String,
}

impl Drop for SlotDropClaim {
    fn drop(&mut self) {
        let mut subs = self
            .observer
            .subscriptions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = subs.dropping.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                subs.dropping.remove(&self.name);
            }
        }
    }
}

/// One attached monitor's feed; detaches when dropped.
pub(crate) struct MonitorFeed {
    observer: Arc<Observer>,
    pub(crate) rx: broadcast::Receiver<MonitorEvent>,
}

impl Drop for MonitorFeed {
    fn drop(&mut self) {
        self.observer.monitors.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The peer of a connection, as monitors and the subscription list name it.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) remote: SocketAddr,
    pub(crate) client: Arc<str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_registrations_undo_themselves() {
        let o = Arc::new(Observer::new());
        let c = o.connection();
        let s = o.stream();
        assert_eq!((o.connections_active(), o.streams_active()), (1, 1));
        let through = Arc::new(AtomicU64::new(7));
        let info = SubscriptionInfo {
            remote: "127.0.0.1:1".into(),
            client: "t".into(),
            start: "earliest".into(),
            tree: None,
            prefix: None,
            slot: None,
            sent_through: 0,
            since_us: 0,
        };
        let r = o
            .subscription(info, through.clone())
            .expect("no slot to be busy");
        through.store(9, Ordering::Relaxed);
        assert_eq!(o.subscriptions()[0].sent_through, 9);
        drop((c, s, r));
        assert_eq!((o.connections_active(), o.streams_active()), (0, 0));
        assert!(o.subscriptions().is_empty());
        assert_eq!(o.connections_total(), 1);
    }

    /// A subscription with a slot and a drop of that slot exclude each other, whichever comes
    /// first; other slots and subscriptions without one are not held up.
    #[test]
    fn a_slot_drop_and_a_subscription_of_the_slot_exclude_each_other() {
        let o = Arc::new(Observer::new());
        let info = |slot: Option<&str>| SubscriptionInfo {
            remote: "127.0.0.1:1".into(),
            client: "t".into(),
            start: "earliest".into(),
            tree: None,
            prefix: None,
            slot: slot.map(str::to_string),
            sent_through: 0,
            since_us: 0,
        };
        let through = Arc::new(AtomicU64::new(0));
        let sub = o.subscription(info(Some("s")), through.clone()).unwrap();
        let users = o.claim_slot_drop("s").err().expect("s is in use");
        assert_eq!(users.len(), 1);
        let other = o.claim_slot_drop("x").unwrap();
        drop(sub);
        let first = o.claim_slot_drop("s").unwrap();
        let second = o.claim_slot_drop("s").unwrap();
        assert!(o.subscription(info(Some("s")), through.clone()).is_err());
        assert!(o.subscription(info(None), through.clone()).is_ok());
        drop(first);
        assert!(o.subscription(info(Some("s")), through.clone()).is_err());
        drop((second, other));
        assert!(o.subscription(info(Some("s")), through.clone()).is_ok());
        assert!(o.subscription(info(Some("x")), through).is_ok());
    }

    /// A slot has one live subscription at a time: a second one is refused with the first
    /// one's details until the first is dropped. Subscriptions without a slot or with another
    /// slot are not held up.
    #[test]
    fn a_slot_has_one_live_subscription_at_a_time() {
        let o = Arc::new(Observer::new());
        let info = |slot: Option<&str>, client: &str| SubscriptionInfo {
            remote: "127.0.0.1:1".into(),
            client: client.into(),
            start: "earliest".into(),
            tree: None,
            prefix: None,
            slot: slot.map(str::to_string),
            sent_through: 0,
            since_us: 0,
        };
        let through = Arc::new(AtomicU64::new(4));
        let first = o
            .subscription(info(Some("s"), "a"), through.clone())
            .unwrap();
        match o.subscription(info(Some("s"), "b"), through.clone()) {
            Err(SlotBusy::InUse(user)) => {
                assert_eq!((user.client.as_str(), user.sent_through), ("a", 4));
            }
            Err(SlotBusy::Dropping) => panic!("slot s is not being dropped"),
            Ok(_) => panic!("a second subscription of slot s was not refused"),
        }
        let others = (
            o.subscription(info(None, "c"), through.clone()).unwrap(),
            o.subscription(info(None, "d"), through.clone()).unwrap(),
            o.subscription(info(Some("x"), "e"), through.clone())
                .unwrap(),
        );
        drop(first);
        let again = o
            .subscription(info(Some("s"), "b"), through.clone())
            .unwrap();
        assert!(o.subscription(info(Some("s"), "a"), through).is_err());
        drop((again, others));
        assert!(o.subscriptions().is_empty());
    }

    #[test]
    fn a_monitor_counts_while_attached() {
        let o = Arc::new(Observer::new());
        assert!(!o.monitoring());
        let mut feed = o.attach_monitor();
        assert!(o.monitoring());
        o.publish(MonitorEvent {
            ts_us: 1,
            remote: "r".into(),
            kind: "get".into(),
            tree: "t".into(),
            key: b"k".to_vec(),
            latency_us: 3,
            ok: true,
        });
        assert_eq!(feed.rx.try_recv().map(|e| e.latency_us).ok(), Some(3));
        drop(feed);
        assert!(!o.monitoring());
    }
}
