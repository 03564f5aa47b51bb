//! The admin's TCP listener and connections: what keeps clients of the admin, trusted or not
//! (the token is checked only once a request head has arrived), from holding the node's file
//! descriptors or its shutdown.
//!
//! - At most [`CONNECTIONS_MAX`] connections are served at once. The listener accepts only
//!   when one is free; more wait in the kernel's accept queue, holding no descriptor of the
//!   node (the log and the store need those: a failed segment roll fail-stops the node).
//! - A connection that is handling no request, and has moved no byte of an answer, for
//!   [`QUIET_MAX`] is dropped: a silent socket, a request head sent in part, a keep-alive
//!   connection left idle, a client that stopped reading its answer. The clock starts at
//!   accept, at the end of each request's handler and at each write that moved bytes; reading
//!   a request head does not restart it.
//! - [`Connections::drop_all`] drops every connection at once (the end of the shutdown grace).
//!
//! A dropped connection fails its next read or write, so the HTTP server ends its task. This
//! module never parses HTTP: the router's [`track`] layer says when a request is handled.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections served at once.
pub const CONNECTIONS_MAX: usize = 64;
/// How long a connection may handle no request and move no byte of an answer.
pub const QUIET_MAX: Duration = Duration::from_secs(10);
/// How often the reaper looks for quiet connections.
const REAP_INTERVAL: Duration = Duration::from_millis(250);

/// The connections being served.
pub struct Connections {
    slots: Arc<Semaphore>,
    /// Every connection accepted; entries of closed ones are pruned at each accept.
    live: Mutex<Vec<Weak<Conn>>>,
    epoch: Instant,
}

impl Connections {
    pub fn new() -> Arc<Connections> {
        Arc::new(Connections {
            slots: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            live: Mutex::new(Vec::with_capacity(CONNECTIONS_MAX)),
            epoch: Instant::now(),
        })
    }

    fn live(&self) -> Vec<Arc<Conn>> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|c| c.strong_count() > 0);
        live.iter().filter_map(Weak::upgrade).collect()
    }

    fn admit(&self, tcp: TcpStream, slot: OwnedSemaphorePermit) -> AdminIo {
        let conn = Arc::new(Conn {
            epoch: self.epoch,
            busy: AtomicUsize::new(0),
            quiet_since_ms: AtomicU64::new(0),
            dropped: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        conn.touch();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|c| c.strong_count() > 0);
        live.push(Arc::downgrade(&conn));
        AdminIo {
            tcp,
            conn,
            _slot: slot,
        }
    }

    /// Drops every connection now: their next read or write fails.
    pub fn drop_all(&self) {
        for conn in self.live() {
            conn.drop_now();
        }
    }

    /// Drops quiet connections ([`QUIET_MAX`]) until aborted.
    pub async fn reap(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for conn in self.live() {
                if conn.quiet_for() > QUIET_MAX {
                    conn.drop_now();
                }
            }
        }
    }
}

/// One connection's state, shared by its I/O, the reaper and the requests it carries.
struct Conn {
    epoch: Instant,
    /// Requests whose handler runs now (HTTP/1: 0 or 1).
    busy: AtomicUsize,
    /// When the quiet time began, in ms after `epoch`.
    quiet_since_ms: AtomicU64,
    /// Set once the connection is dropped: every read and write fails from then on.
    dropped: AtomicBool,
    /// The task serving the connection, woken when it is dropped.
    waker: Mutex<Option<Waker>>,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Restarts the quiet time.
    fn touch(&self) {
        self.quiet_since_ms.store(self.now_ms(), Ordering::Release);
    }

    /// How long the connection has been quiet; zero while a request is handled.
    fn quiet_for(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = self.quiet_since_ms.load(Ordering::Acquire);
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    fn drop_now(&self) {
        self.dropped.store(true, Ordering::Release);
        if let Some(w) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.wake();
        }
    }

    /// Registers the serving task's waker, then fails if the connection was dropped.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        {
            let mut w = self.waker.lock().unwrap_or_else(|p| p.into_inner());
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        if self.dropped.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the admin dropped this connection: quiet too long, or the node is stopping",
            ));
        }
        Ok(())
    }
}

/// An accepted admin connection: the socket, its state, and its slot among
/// [`CONNECTIONS_MAX`] (freed when the HTTP server drops it).
pub struct AdminIo {
    tcp: TcpStream,
    conn: Arc<Conn>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for AdminIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.check(cx)?;
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdminIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.check(cx)?;
        let written = Pin::new(&mut this.tcp).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.touch();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.conn.check(cx)?;
        let written = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.touch();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.conn.check(cx)?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// The admin's listener: accepts only while a slot among [`CONNECTIONS_MAX`] is free.
pub struct AdminListener {
    tcp: TcpListener,
    conns: Arc<Connections>,
}

impl AdminListener {
    pub fn new(tcp: TcpListener, conns: Arc<Connections>) -> AdminListener {
        AdminListener { tcp, conns }
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (AdminIo, SocketAddr) {
        loop {
            let slot = self
                .conns
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slots' semaphore is never closed");
            match self.tcp.accept().await {
                Ok((tcp, remote)) => {
                    // Answers are written whole: no reason to hold back small segments.
                    let _ = tcp.set_nodelay(true);
                    return (self.conns.admit(tcp, slot), remote);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => {
                    // Out of descriptors (EMFILE) or the like: wait for some to be freed.
                    drop(slot);
                    tracing::warn!(error = %e, "the HTTP admin could not accept a connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// A connection's state, handed to each of its requests (`ConnectInfo`) for [`track`].
#[derive(Clone)]
pub struct ConnState(Arc<Conn>);

impl Connected<IncomingStream<'_, AdminListener>> for ConnState {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        ConnState(stream.io().conn.clone())
    }
}

/// Router layer: marks the connection busy while the request's handler runs, so that a slow
/// handler is not mistaken for a quiet connection.
pub async fn track(req: Request, next: Next) -> Response {
    let busy = req
        .extensions()
        .get::<ConnectInfo<ConnState>>()
        .map(|c| Busy::new(c.0.0.clone()));
    let response = next.run(req).await;
    drop(busy);
    response
}

/// A request being handled on a connection; on drop, the connection's quiet time restarts.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Busy {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // Touch first: the reaper never sees the request ended with the old quiet start.
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}
