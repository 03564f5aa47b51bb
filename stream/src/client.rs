//! The QUIC client: one connection, one stream per request or subscription.

use std::sync::Arc;
use std::time::Duration;

use tideline_wal::{Epoch, GtidSet, Transaction};
use uuid::Uuid;

use crate::proto::{
    self, BootstrapResume, Chunk, ErrorCode, Frame, IndexQuery, Limits, MonitorEvent,
    PROTOCOL_VERSION, RawBatch, Request, Response, Start, WriteOp,
};
use crate::server::{IndexPage, SCAN_PAGE_BYTES_MAX};
use crate::tls::{self, ClientSecrets};
use crate::wire::{FramedRecv, WireError, send_message};

/// Per-stream receive window: one bootstrap chunk (up to 8 MiB) and its envelope.
const STREAM_WINDOW_BYTES: u32 = 9 << 20;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// CA and token.
    pub secrets: ClientSecrets,
    /// Name sent in `Hello`, for the server's logs.
    pub client_name: String,
    /// Most time for DNS, the QUIC/TLS handshake and the token exchange.
    pub connect_timeout: Duration,
    /// A connection silent this long is dead (keep-alives run at a quarter of it).
    pub idle_timeout: Duration,
    /// Frame limits.
    pub limits: Limits,
    /// UDP send and receive buffer size (0: the kernel's default).
    pub udp_buffer_bytes: usize,
}

impl ClientConfig {
    /// Defaults: 5 s to connect, 5 s idle timeout (a dead node is noticed within 5 s).
    pub fn new(secrets: ClientSecrets) -> Self {
        ClientConfig {
            secrets,
            client_name: "tideline-client".into(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            udp_buffer_bytes: crate::udp::UDP_BUFFER_BYTES_DEFAULT,
        }
    }
}

/// What went wrong talking to a node. [`ClientError::is_retryable`] says whether to try again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address did not resolve or the node could not be reached in time.
    #[error("cannot reach {addr}: {reason}; check that the node runs and the address is right")]
    Connect {
        /// Address dialled.
        addr: String,
        /// Cause.
        reason: String,
    },
    /// The node's certificate is not signed by our CA: it belongs to another cluster (or we
    /// hold another cluster's secrets). Permanent: retrying cannot help.
    #[error(
        "the node at {addr} belongs to another cluster (CA mismatch: {reason}); secrets used: \
         {secrets}; pass the --secrets DIR of that node's cluster"
    )]
    WrongCluster {
        /// Address dialled.
        addr: String,
        /// The TLS stack's words.
        reason: String,
        /// Where the CA we trusted came from.
        secrets: String,
    },
    /// The node refused our token.
    #[error("{addr} refused the token: pass the --secrets DIR of this cluster (or --token-file)")]
    Unauthorized {
        /// Address dialled.
        addr: String,
    },
    /// The connection broke.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// A stream broke or the peer broke the protocol.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The node answered with an error.
    #[error("{message}")]
    Server {
        /// Class.
        code: ErrorCode,
        /// The node's message.
        message: String,
    },
    /// The node answered something unexpected.
    #[error("unexpected answer from the node: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// Whether retrying (after a reconnect) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Connection(_) => true,
            ClientError::Wire(WireError::Read(_) | WireError::Write(_)) => true,
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::Unavailable | ErrorCode::Conflict)
            }
            _ => false,
        }
    }
}

/// A connection to one node.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    cfg: ClientConfig,
    server_uuid: Uuid,
    addr: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("server_uuid", &self.server_uuid)
            .finish()
    }
}

fn client_endpoint(cfg: &ClientConfig, ipv6: bool) -> Result<quinn::Endpoint, ClientError> {
    let connect_err = |reason: String| ClientError::Connect {
        addr: "local endpoint".into(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cfg.secrets.ca.clone())
        .map_err(|e| connect_err(format!("bad CA certificate: {e}")))?;
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| connect_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![proto::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls_cfg)
        .map_err(|e| connect_err(e.to_string()))?;
    let mut client_cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout).ok());
    t.keep_alive_interval(Some((cfg.idle_timeout / 4).max(Duration::from_millis(100))));
    // Room for a whole bootstrap chunk in flight (the stream window bounds what a stalled
    // reader holds; tails stay bounded by the server's batch size).
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW_BYTES));
    client_cfg.transport_config(Arc::new(t));
    // Bound to the family of the address dialled: an IPv4 socket cannot reach [::1].
    let bind: std::net::SocketAddr = if ipv6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = crate::udp::bind(bind, cfg.udp_buffer_bytes)
        .and_then(|socket| crate::udp::endpoint(socket, None))
        .map_err(|e| connect_err(format!("bind UDP socket: {e}")))?;
    endpoint.set_default_client_config(client_cfg);
    Ok(endpoint)
}

/// First pause before a connection attempt the node answered busy is tried again; doubled
/// after each, up to [`BUSY_RETRY_MAX`].
const BUSY_RETRY_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between attempts the node answered busy.
const BUSY_RETRY_MAX: Duration = Duration::from_millis(500);

/// How one connection attempt failed.
enum Attempt {
    /// The node asked to try again later.
    Busy(ClientError),
    /// This address did not work; the next one may.
    Failed(String),
    /// Give up.
    Fatal(ClientError),
}

impl Client {
    /// Resolves `addr` (`host:port`) afresh, connects, and authenticates with the token.
    pub async fn connect(addr: &str, cfg: ClientConfig) -> Result<Client, ClientError> {
        let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
        let timeout = || ClientError::Connect {
            addr: addr.to_string(),
            reason: format!("no answer within {:?}", cfg.connect_timeout),
        };
        let addrs: Vec<std::net::SocketAddr> =
            tokio::time::timeout_at(deadline, tokio::net::lookup_host(addr))
                .await
                .map_err(|_| timeout())?
                .map_err(|e| ClientError::Connect {
                    addr: addr.to_string(),
                    reason: format!("cannot resolve: {e}"),
                })?
                .collect();
        let mut last_err = None;
        let count = addrs.len() as u32;
        for (i, sa) in addrs.into_iter().enumerate() {
            // Each address gets an equal share of the time left, so a name that resolves to an
            // address nobody listens on (say ::1 before 127.0.0.1) still reaches the next one.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt_deadline = tokio::time::Instant::now() + left / (count - i as u32).max(1);
            let mut backoff = BUSY_RETRY_FIRST;
            loop {
                match Client::attempt(addr, sa, &cfg, attempt_deadline, deadline).await {
                    Ok(client) => return Ok(client),
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Failed(reason)) => {
                        last_err = Some(reason);
                        break;
                    }
                    // The node is busy (as many connections or handshakes as it allows) or
                    // pushed this handshake out: it asks to try again later, so try again
                    // while the connect timeout lasts.
                    Err(Attempt::Busy(e)) => {
                        if tokio::time::Instant::now() + backoff >= attempt_deadline {
                            return Err(e);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BUSY_RETRY_MAX);
                    }
                }
            }
        }
        Err(ClientError::Connect {
            addr: addr.to_string(),
            reason: last_err.unwrap_or_else(|| "the name resolved to no address".into()),
        })
    }

    /// One connection attempt to `sa`: the handshake until `attempt_deadline`, `Hello` until
    /// `deadline`.
    async fn attempt(
        addr: &str,
        sa: std::net::SocketAddr,
        cfg: &ClientConfig,
        attempt_deadline: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<Client, Attempt> {
        let busy = |why: &str| ClientError::Server {
            code: ErrorCode::Unavailable,
            message: format!(
                "{addr} {why}: it serves as many connections as it allows (1,024 by default) \
                 or is flooded with handshakes; try again later"
            ),
        };
        let endpoint = client_endpoint(cfg, sa.is_ipv6()).map_err(Attempt::Fatal)?;
        let connecting = endpoint
            .connect(sa, tls::SERVER_NAME)
            .map_err(|e| Attempt::Failed(e.to_string()))?;
        let conn = match tokio::time::timeout_at(attempt_deadline, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                let reason = e.to_string();
                // A certificate our CA did not sign: another cluster, not a network fault.
                if reason.contains("invalid peer certificate") {
                    return Err(Attempt::Fatal(ClientError::WrongCluster {
                        addr: addr.to_string(),
                        reason,
                        secrets: cfg.secrets.origin.clone(),
                    }));
                }
                // Refused at the door, or closed by the node during the handshake (evicted:
                // code 3 once this side has finished TLS, QUIC's APPLICATION_ERROR before).
                // Busy, not unreachable (docs/OPERATIONS.md promises these words).
                return Err(match &e {
                    quinn::ConnectionError::ConnectionClosed(close)
                        if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                    {
                        Attempt::Busy(busy("refused the connection"))
                    }
                    quinn::ConnectionError::ConnectionClosed(close)
                        if close.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
                    {
                        Attempt::Busy(busy("closed the handshake"))
                    }
                    quinn::ConnectionError::ApplicationClosed(close)
                        if close.error_code
                            == quinn::VarInt::from_u32(crate::server::close_code::BUSY) =>
                    {
                        Attempt::Busy(busy("closed the handshake"))
                    }
                    _ => Attempt::Failed(reason),
                });
            }
            Err(_) => return Err(Attempt::Failed(format!("{sa}: no answer"))),
        };
        let mut client = Client {
            endpoint: endpoint.clone(),
            conn,
            cfg: cfg.clone(),
            server_uuid: Uuid::nil(),
            addr: addr.to_string(),
        };
        let timeout = || ClientError::Connect {
            addr: addr.to_string(),
            reason: format!("no answer within {:?}", cfg.connect_timeout),
        };
        match tokio::time::timeout_at(deadline, client.hello()).await {
            Err(_) => Err(Attempt::Fatal(timeout())),
            Ok(Ok(welcome)) => {
                client.server_uuid = welcome;
                Ok(client)
            }
            // `Error { Unavailable }`: authenticated while the node serves `max_connections`.
            Ok(Err(
                e @ ClientError::Server {
                    code: ErrorCode::Unavailable,
                    ..
                },
            )) => Err(Attempt::Busy(e)),
            // Evicted by newer handshakes before its `Hello` was read.
            Ok(Err(ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c))))
                if c.error_code == quinn::VarInt::from_u32(crate::server::close_code::BUSY) =>
            {
                Err(Attempt::Busy(busy(
                    "closed the connection before its Hello",
                )))
            }
            Ok(Err(e)) => Err(Attempt::Fatal(e)),
        }
    }

    async fn hello(&self) -> Result<Uuid, ClientError> {
        let resp = self
            .request(Request::Hello {
                token: self.cfg.secrets.token.clone(),
                client: self.cfg.client_name.clone(),
                protocol: PROTOCOL_VERSION,
            })
            .await;
        match resp {
            Ok(Response::Welcome {
                server_uuid,
                protocol,
            }) if protocol == PROTOCOL_VERSION => Ok(Uuid::from_bytes(server_uuid)),
            Ok(Response::Welcome { protocol, .. }) => Err(ClientError::Unexpected(format!(
                "{} speaks protocol {protocol} and this client {PROTOCOL_VERSION}: run the same \
                 Tideline version on both ends",
                self.addr
            ))),
            Ok(Response::Error {
                code: ErrorCode::InvalidRequest,
                message,
            }) => Err(ClientError::Server {
                code: ErrorCode::InvalidRequest,
                message,
            }),
            Ok(Response::Error {
                code: ErrorCode::Unauthorized,
                ..
            }) => Err(ClientError::Unauthorized {
                addr: self.addr.clone(),
            }),
            // Busy (`Unavailable`: retry later) or a refused first message.
            Ok(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Err(ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c)))
                if c.error_code
                    == quinn::VarInt::from_u32(crate::server::close_code::UNAUTHORIZED) =>
            {
                Err(ClientError::Unauthorized {
                    addr: self.addr.clone(),
                })
            }
            Ok(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// The node's `server_uuid`.
    pub fn server_uuid(&self) -> Uuid {
        self.server_uuid
    }

    /// The underlying QUIC connection, for tools and tests that speak raw frames.
    pub fn raw_connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// The address this client dialled.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one request on a new stream and reads one answer; error answers become
    /// [`ClientError::Server`] except for `Hello`.
    async fn request(&self, req: Request) -> Result<Response, ClientError> {
        let is_hello = matches!(req, Request::Hello { .. });
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(&mut send, &req).await?;
        let _ = send.finish();
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        let resp = match recv.next_message::<Response>().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(ClientError::Unexpected("the node closed the stream".into())),
            Err(WireError::Read(quinn::ReadError::ConnectionLost(e))) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        };
        match resp {
            Response::Error { code, message } if !is_hello => {
                Err(ClientError::Server { code, message })
            }
            r => Ok(r),
        }
    }

    /// Reads one key.
    pub async fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        match self
            .request(Request::Get {
                tree: tree.into(),
                key: key.to_vec(),
            })
            .await?
        {
            Response::Value { value } => Ok(value),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads up to `limit` keys with `prefix`, page by page (see [`Client::scan_page`]); the
    /// rows are collected here, so a caller printing a big range should page itself.
    pub async fn scan(
        &self,
        tree: &str,
        prefix: &[u8],
        limit: u64,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        let mut rows = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        while (rows.len() as u64) < limit {
            let left = limit - rows.len() as u64;
            let page = self
                .scan_page(tree, prefix, after.as_deref(), left, SCAN_PAGE_BYTES_MAX)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            rows.extend(page);
        }
        Ok(rows)
    }

    /// Reads one page of keys with `prefix` strictly after `after`: at most `limit` rows and
    /// about `bytes_max` bytes (the node caps both at [`SCAN_PAGE_BYTES_MAX`]). An empty page
    /// means the range is exhausted; otherwise ask again after the page's last key.
    pub async fn scan_page(
        &self,
        tree: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: u64,
        bytes_max: u64,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        match self
            .request(Request::ScanPage {
                tree: tree.into(),
                prefix: prefix.to_vec(),
                after: after.map(<[u8]>::to_vec),
                limit,
                bytes_max,
            })
            .await?
        {
            Response::Rows { rows } => Ok(rows),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads up to `limit` keys strictly after `after` (from the start when `None`).
    pub async fn range_after(
        &self,
        tree: &str,
        after: Option<&[u8]>,
        limit: u64,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, ClientError> {
        match self
            .request(Request::Range {
                tree: tree.into(),
                after: after.map(<[u8]>::to_vec),
                limit,
            })
            .await?
        {
            Response::Rows { rows } => Ok(rows),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Commits `ops` atomically; returns the offset and GTID text.
    pub async fn commit(&self, ops: Vec<WriteOp>) -> Result<(u64, String), ClientError> {
        match self.request(Request::Commit { ops }).await? {
            Response::Committed { offset, gtid } => Ok((offset, gtid)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads one page of a secondary index (see [`IndexQuery`]): the documents and the
    /// entry key to resume after (`None`: no more).
    pub async fn index_query(&self, query: IndexQuery) -> Result<IndexPage, ClientError> {
        match self.request(Request::IndexQuery(query)).await? {
            Response::IndexRows { rows, next } => Ok(IndexPage { rows, next }),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Drops the consumer slot `name` on the node, so that it holds the log no longer.
    /// Returns the restart offset the slot held. The node refuses while a live subscription
    /// uses the slot, and names the node's slots when there is none called `name`.
    pub async fn drop_slot(&self, name: &str) -> Result<u64, ClientError> {
        match self
            .request(Request::DropSlot {
                name: name.to_string(),
            })
            .await?
        {
            Response::SlotDropped { restart_offset } => Ok(restart_offset),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The node's status document.
    pub async fn status(&self) -> Result<String, ClientError> {
        match self.request(Request::Status).await? {
            Response::Status { json } => Ok(json),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A read fence: resolves once the node has applied and made durable `gtids`, or at the
    /// timeout. Returns whether they were reached and the node's `gtid_executed`.
    pub async fn wait_for(
        &self,
        gtids: &GtidSet,
        timeout: Duration,
    ) -> Result<(bool, GtidSet), ClientError> {
        match self
            .request(Request::WaitFor {
                gtids: gtids.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            })
            .await?
        {
            Response::Fenced {
                reached,
                gtid_executed,
            } => {
                let set = gtid_executed
                    .parse()
                    .map_err(|e| ClientError::Unexpected(format!("bad GTID set from node: {e}")))?;
                Ok((reached, set))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Opens a subscription on its own stream.
    pub async fn subscribe(
        &self,
        start: Start,
        tree: Option<String>,
        prefix: Option<Vec<u8>>,
        slot: Option<String>,
    ) -> Result<Subscription, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(
            &mut send,
            &Request::Subscribe {
                start,
                tree,
                prefix,
                slot,
            },
        )
        .await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::Subscribed {
                next_offset,
                head,
                gtids_before,
                epoch,
            }) => Ok(Subscription {
                send,
                recv,
                next_offset,
                head,
                gtids_before: parse_gtids(&gtids_before)?,
                epoch: Epoch::new(epoch),
            }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the subscription stream".into(),
            )),
        }
    }

    /// Starts (or, with `resume`, resumes) a bootstrap on its own stream. See
    /// [`BootstrapStream`] and `tideline_consumers::bootstrap` for the merging end.
    pub async fn bootstrap(
        &self,
        resume: Option<BootstrapResume>,
        chunk_bytes: u64,
    ) -> Result<BootstrapStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(
            &mut send,
            &Request::Bootstrap {
                resume,
                chunk_bytes,
            },
        )
        .await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::BootstrapStarted {
                server_uuid,
                after_offset,
                keys_estimate,
                bytes_estimate,
                epoch,
            }) => Ok(BootstrapStream {
                recv,
                send: Some(send),
                server_uuid: Uuid::from_bytes(server_uuid),
                after_offset,
                keys_estimate,
                bytes_estimate,
                epoch: Epoch::new(epoch),
            }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the bootstrap stream".into(),
            )),
        }
    }

    /// Attaches a live monitor: every request the node serves (on `tree`, a `sample_ppm`
    /// share of them) arrives as a [`MonitorEvent`] until the returned stream is dropped.
    pub async fn monitor(
        &self,
        tree: Option<String>,
        sample_ppm: u32,
    ) -> Result<MonitorStream, ClientError> {
        let (mut send, recv) = self.conn.open_bi().await?;
        send_message(&mut send, &Request::Monitor { tree, sample_ppm }).await?;
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        match recv.next_message::<Response>().await? {
            Some(Response::MonitorStarted) => Ok(MonitorStream { _send: send, recv }),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
            None => Err(ClientError::Unexpected(
                "the node closed the monitor stream (a node older than the monitor?)".into(),
            )),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        self.endpoint.wait_idle().await;
    }
}

fn parse_gtids(text: &str) -> Result<GtidSet, ClientError> {
    text.parse()
        .map_err(|e| ClientError::Unexpected(format!("bad GTID set from the node: {e}")))
}

/// What a subscription yields. `B` is how records come: owned transactions
/// ([`Subscription::next`]) or a [`RawBatch`] read in place ([`Subscription::next_raw`]).
#[derive(Debug)]
pub enum Event<B = Vec<Transaction>> {
    /// Records, in offset order.
    Batch(B),
    /// The server is alive; its head.
    Heartbeat {
        /// Visible head.
        head: u64,
        /// Server clock.
        server_time_us: i64,
    },
    /// A filtered subscription: every record through `through` was considered (sent or
    /// dropped by the filter); `gtids` is every GTID covered through it.
    Progress {
        /// Last offset considered.
        through: u64,
        /// GTIDs covered through `through`.
        gtids: GtidSet,
    },
}

/// One subscription stream.
#[derive(Debug)]
pub struct Subscription {
    send: quinn::SendStream,
    recv: FramedRecv,
    next_offset: u64,
    head: u64,
    gtids_before: GtidSet,
    epoch: Epoch,
}

impl Subscription {
    /// The server's history epoch: `next_offset` and every offset received are offsets of
    /// that history (see [`Epoch`]).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The offset the server started from.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Every GTID covered before [`Subscription::next_offset`]: the history before the start
    /// point (for a GTID start, the set asked with). Count it as seen.
    pub fn gtids_before(&self) -> &GtidSet {
        &self.gtids_before
    }

    /// The server's head when the subscription started.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The next event, with records decoded into owned transactions; `None` when the server
    /// ended the subscription cleanly.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        Ok(match self.next_raw().await? {
            None => None,
            Some(Event::Batch(b)) => Some(Event::Batch(b.decode().map_err(WireError::from)?)),
            Some(Event::Heartbeat {
                head,
                server_time_us,
            }) => Some(Event::Heartbeat {
                head,
                server_time_us,
            }),
            Some(Event::Progress { through, gtids }) => Some(Event::Progress { through, gtids }),
        })
    }

    /// The next event, with records as they arrived: one buffer per batch, every record's
    /// frame checked (CRC32C), nothing decoded or copied until the caller reads a record (see
    /// [`RawBatch`]). For consumers that forward records or read a few fields. Delivers what
    /// the server sent: the order and duplicate checks of [`ClientSubscription`] are the
    /// caller's (`tideline_consumers` runs them on owned transactions).
    ///
    /// [`ClientSubscription`]: crate::proto::ClientSubscription
    pub async fn next_raw(&mut self) -> Result<Option<Event<RawBatch>>, ClientError> {
        match self.recv.next_raw::<Response>().await? {
            None => Ok(None),
            Some(Frame::Batch(b)) => Ok(Some(Event::Batch(b))),
            Some(Frame::Message(Response::Heartbeat {
                head,
                server_time_us,
            })) => Ok(Some(Event::Heartbeat {
                head,
                server_time_us,
            })),
            Some(Frame::Message(Response::Progress { through, gtids })) => {
                Ok(Some(Event::Progress {
                    through,
                    gtids: parse_gtids(&gtids)?,
                }))
            }
            Some(Frame::Message(Response::Error { code, message })) => {
                Err(ClientError::Server { code, message })
            }
            Some(Frame::Message(other)) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Acknowledges processing through `offset` (moves the slot, if any).
    pub async fn ack(&mut self, offset: u64) -> Result<(), ClientError> {
        send_message(&mut self.send, &Request::Ack { offset }).await?;
        Ok(())
    }
}

/// A live monitor (see [`Client::monitor`]); dropping it detaches.
#[derive(Debug)]
pub struct MonitorStream {
    _send: quinn::SendStream,
    recv: FramedRecv,
}

impl MonitorStream {
    /// The next events, oldest first, and how many this monitor missed by reading too slowly
    /// since the previous call; `None` when the node ended the stream.
    pub async fn next(&mut self) -> Result<Option<(Vec<MonitorEvent>, u64)>, ClientError> {
        match self.recv.next_message::<Response>().await? {
            None => Ok(None),
            Some(Response::Monitor { events, dropped }) => Ok(Some((events, dropped))),
            Some(Response::Error { code, message }) => Err(ClientError::Server { code, message }),
            Some(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// What a bootstrap stream carries, in order.
#[derive(Debug)]
pub enum BootstrapEvent {
    /// Live log records, densely after the previous ones.
    Records(Vec<Transaction>),
    /// A part of a chunk of a tree.
    Chunk(Chunk),
    /// The secondary indexes of the tree whose chunk follows (see
    /// [`Response::BootstrapIndexes`]).
    Indexes {
        /// The tree.
        tree: String,
        /// Its merge operator.
        merge_operator: Option<String>,
        /// Its index definitions.
        indexes: Vec<crate::proto::IndexDef>,
    },
    /// The copy is complete at `offset`, where the server had executed `gtid_executed`.
    Done {
        /// Handover offset.
        offset: u64,
        /// GTID set text.
        gtid_executed: String,
    },
}

/// The receiving side of [`Client::bootstrap`].
#[derive(Debug)]
pub struct BootstrapStream {
    recv: FramedRecv,
    send: Option<quinn::SendStream>,
    /// The server.
    pub server_uuid: Uuid,
    /// Live records after this offset follow.
    pub after_offset: u64,
    /// Estimated keys (progress only).
    pub keys_estimate: u64,
    /// Estimated bytes (progress only).
    pub bytes_estimate: u64,
    /// The server's history epoch the copy is taken in; store it with the progress.
    pub epoch: Epoch,
}

/// Tells the server how many chunks of a bootstrap stream are stored; it sends the next chunk
/// only then. Taken from [`BootstrapStream::take_acker`] by whoever stores the chunks.
#[derive(Debug)]
pub struct ChunkAcker {
    send: quinn::SendStream,
}

impl ChunkAcker {
    /// `chunks` chunks of this stream are stored.
    pub async fn stored(&mut self, chunks: u64) -> Result<(), ClientError> {
        send_message(&mut self.send, &Request::ChunksStored { chunks }).await?;
        Ok(())
    }
}

impl BootstrapStream {
    /// The acknowledging half (once).
    pub fn take_acker(&mut self) -> Option<ChunkAcker> {
        self.send.take().map(|send| ChunkAcker { send })
    }

    /// The next event; `None` if the server ended the stream without `Done` (an error).
    pub async fn next(&mut self) -> Result<Option<BootstrapEvent>, ClientError> {
        Ok(match self.recv.next::<Response>().await? {
            None => None,
            Some(Frame::Batch(txns)) => Some(BootstrapEvent::Records(txns)),
            Some(Frame::Message(Response::Chunk(c))) => Some(BootstrapEvent::Chunk(c)),
            Some(Frame::Message(Response::BootstrapIndexes {
                tree,
                merge_operator,
                indexes,
            })) => Some(BootstrapEvent::Indexes {
                tree,
                merge_operator,
                indexes,
            }),
            Some(Frame::Message(Response::BootstrapDone {
                offset,
                gtid_executed,
            })) => Some(BootstrapEvent::Done {
                offset,
                gtid_executed,
            }),
            Some(Frame::Message(Response::Error { code, message })) => {
                return Err(ClientError::Server { code, message });
            }
            Some(Frame::Message(other)) => {
                return Err(ClientError::Unexpected(format!("{other:?}")));
            }
        })
    }
}
