//! The QUIC client: one connection, one stream per request or subscription.
//!
//! This module keeps the settings ([`ClientConfig`]), the errors ([`ClientError`]), the
//! [`Client`] itself and its requests with one answer each ([`Client::get`],
//! [`Client::commit`] and the like); the rest is split along what happens to a connection:
//!
//! - `connect`: dialling a node, retrying a busy one, and the `Hello` ([`Client::connect`]).
//! - `streams`: the streams that stay open: subscriptions ([`Subscription`]), bootstraps
//!   ([`BootstrapStream`], [`ChunkAcker`]) and monitors ([`MonitorStream`]).

mod connect;
mod streams;

pub use streams::{
    BootstrapEvent, BootstrapStream, ChunkAcker, Event, MonitorStream, Subscription,
};

use std::time::Duration;

use tideline_wal::GtidSet;
use uuid::Uuid;

use crate::proto::{ErrorCode, IndexQuery, Limits, Request, Response, WriteOp};
use crate::server::{IndexPage, SCAN_PAGE_BYTES_MAX};
use crate::tls::ClientSecrets;
use crate::wire::{FramedRecv, WireError, send_message};

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

/// The error of a request stream that failed: a lost connection is
/// [`ClientError::Connection`], with the node's close code (busy, unauthorized), so that the
/// caller can tell why; anything else stays [`ClientError::Wire`].
fn request_failed(e: WireError) -> ClientError {
    match e {
        WireError::Read(quinn::ReadError::ConnectionLost(e))
        | WireError::Write(quinn::WriteError::ConnectionLost(e)) => ClientError::Connection(e),
        e => ClientError::Wire(e),
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

impl Client {
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
        send_message(&mut send, &req)
            .await
            .map_err(request_failed)?;
        let _ = send.finish();
        let mut recv = FramedRecv::new(recv, self.cfg.limits);
        let resp = match recv.next_message::<Response>().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(ClientError::Unexpected("the node closed the stream".into())),
            Err(e) => return Err(request_failed(e)),
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

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"bye");
        self.endpoint.wait_idle().await;
    }
}
