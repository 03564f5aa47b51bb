//! Connecting: the QUIC endpoint and its TLS and transport settings, dialling every address a
//! name resolves to within the connect timeout, retrying a node that answers busy, and the
//! `Hello` that authenticates the connection.
//!
//! Owns: [`Client::connect`] and what one attempt found ([`Attempt`]).
//!
//! Must never: retry what cannot succeed (a node of another cluster, a refused token), or
//! wait past the connect timeout.

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::{Client, ClientConfig, ClientError};
use crate::proto::{self, ErrorCode, PROTOCOL_VERSION, Request, Response};
use crate::tls;

/// Per-stream receive window: one bootstrap chunk (up to 8 MiB) and its envelope.
const STREAM_WINDOW_BYTES: u32 = 9 << 20;

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
    // No DATAGRAM frames: nothing reads them, and quinn would buffer up to 1.25 MB of them
    // (its default) outside every flow-control window.
    t.datagram_receive_buffer_size(None);
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

/// How a failed `Hello` ends an attempt: `busy` (its argument says what the node did) when the
/// node asks to try again later, fatal otherwise.
fn hello_failed(e: ClientError, busy: impl FnOnce(&str) -> ClientError) -> Attempt {
    match e {
        // `Error { Unavailable }`: authenticated while the node serves `max_connections`.
        e @ ClientError::Server {
            code: ErrorCode::Unavailable,
            ..
        } => Attempt::Busy(e),
        // Evicted by newer handshakes before its `Hello` was read.
        ClientError::Connection(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == quinn::VarInt::from_u32(crate::server::close_code::BUSY) =>
        {
            Attempt::Busy(busy("closed the connection before its Hello"))
        }
        e => Attempt::Fatal(e),
    }
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
            Ok(Err(e)) => Err(hello_failed(e, busy)),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::request_failed;
    use crate::wire::WireError;

    fn evicted() -> quinn::ConnectionError {
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: quinn::VarInt::from_u32(crate::server::close_code::BUSY),
            reason: bytes::Bytes::from_static(b"evicted"),
        })
    }

    fn busy(why: &str) -> ClientError {
        ClientError::Server {
            code: ErrorCode::Unavailable,
            message: why.to_string(),
        }
    }

    /// Found by a third code review: a connection the node evicts (close code 3) while the
    /// client writes its `Hello` must be retried as busy, as one evicted while the client
    /// reads the answer is; `connect` gave up at once instead.
    #[test]
    fn a_connection_evicted_while_its_hello_is_written_or_read_is_tried_again() {
        let written = request_failed(WireError::Write(quinn::WriteError::ConnectionLost(
            evicted(),
        )));
        assert!(
            matches!(hello_failed(written, busy), Attempt::Busy(_)),
            "evicted while writing Hello: not retried"
        );
        let read = request_failed(WireError::Read(quinn::ReadError::ConnectionLost(evicted())));
        assert!(
            matches!(hello_failed(read, busy), Attempt::Busy(_)),
            "evicted while reading Welcome: not retried"
        );
        // A stream the node stopped is no eviction: final.
        let stopped = request_failed(WireError::Write(quinn::WriteError::Stopped(
            quinn::VarInt::from_u32(0),
        )));
        assert!(matches!(hello_failed(stopped, busy), Attempt::Fatal(_)));
    }
}
