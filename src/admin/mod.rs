//! The HTTP admin (`serve --http ADDR`): an overview page a person reads at a glance, the
//! status JSON, recent log records, a health check and Prometheus metrics.
//!
//! It owns the admin listener, the 1 s sampler that feeds the page's charts and the gauges,
//! and nothing else: it reads the node through [`EngineNode`] and never writes to it.
//!
//! Who may read what:
//! - `/api/log`, the one path that shows keys and values, always needs `Authorization: Bearer
//!   TOKEN` (the cluster token, which also lets a client write), on loopback too: every local
//!   user reaches loopback, while the secrets directory keeps the token to the node's own
//!   user, and QUIC reads need it as well.
//! - Bound to loopback, the other paths need no token, and only requests addressed to an IP
//!   address or `localhost` are served ([`check_host`]): a web page whose name an attacker
//!   points at 127.0.0.1 (DNS rebinding) reads the admin as its own origin, and its requests
//!   name the attacker's host.
//! - Bound elsewhere, every path but `/health` needs the token. It is plain HTTP, so the token
//!   crosses the network in the clear; OPERATIONS.md says to keep the admin on loopback behind
//!   a TLS proxy instead.
//!
//! Whoever reaches the port holds the node's resources only within bounds ([`listener`]): at
//! most 64 connections at once, each dropped once quiet for 10 s, and at shutdown every one
//! still open after [`SHUTDOWN_GRACE`]. Handlers that read the log run on blocking threads.
//!
//! | path | what |
//! |---|---|
//! | `/` | HTML overview; refreshes its header's badges and `<main>` from `?part=main`, 2 s after each refresh ends |
//! | `/api/status` | the `tideline status` JSON |
//! | `/api/log?from=POSITION&limit=N` | JSON lines exactly as `tideline tail` prints them, at most 16 MiB (one record at least); `Tideline-Next-From` and `Tideline-Page-End` say where to go on and why the answer ended. Needs the token, on loopback too |
//! | `/health` | 200 `ok: ...` or 503 with the reason |
//! | `/metrics` | Prometheus text format |

mod listener;
mod metrics;
mod page;
mod samples;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::Value;

use crate::node::EngineNode;
use crate::position::StartPosition;

use self::listener::{AdminListener, ConnState, Connections};
pub use self::metrics::install_recorder;
use self::samples::Samples;

/// How long [`AdminHandle::shutdown`] lets requests in progress finish before it drops their
/// connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Records `/api/log` returns when the request names no limit, and at most.
const LOG_LIMIT_DEFAULT: u64 = 100;
const LOG_LIMIT_MAX: u64 = 10_000;
/// Most bytes of JSON lines in one `/api/log` answer: it ends before a record that would pass
/// them, unless that record is its first (one record always comes, so paging moves on).
const LOG_ANSWER_BYTES_MAX: usize = 16 << 20;
/// The `from` that reads on after an `/api/log` answer.
const NEXT_FROM_HEADER: &str = "tideline-next-from";
/// Why an `/api/log` answer ended: [`PageEnd`].
const PAGE_END_HEADER: &str = "tideline-page-end";

/// What the handlers share.
struct Admin {
    node: Arc<EngineNode>,
    samples: Samples,
    metrics: ::metrics_exporter_prometheus::PrometheusHandle,
    /// The cluster token: `/api/log` always needs it; off loopback every path but `/health`
    /// does.
    token: String,
    /// The listener is on a loopback address: the paths but `/api/log` need no token, and only
    /// requests addressed to an IP address or `localhost` are served.
    loopback: bool,
    /// The bound address, which a refused request is told to use.
    local_addr: SocketAddr,
}

/// A running admin server; [`AdminHandle::shutdown`] stops it.
pub struct AdminHandle {
    local_addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Connections>,
}

impl AdminHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets requests in progress finish for at most [`SHUTDOWN_GRACE`] (idle
    /// connections close at once), then drops the connections still open; returns once the
    /// server and the sampler have ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task)
            .await
            .is_ok()
        {
            return;
        }
        tracing::warn!(
            "HTTP admin connections still open {} s after shutdown began: dropping them",
            SHUTDOWN_GRACE.as_secs()
        );
        self.conns.drop_all();
        // A dropped connection fails its next read or write at once; the abort is a backstop.
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Binds `addr` and serves the admin pages of `node`. `token` guards `/api/log`, and every path
/// but `/health` when `addr` is not a loopback address.
pub async fn serve(
    addr: SocketAddr,
    node: Arc<EngineNode>,
    token: String,
) -> anyhow::Result<AdminHandle> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind the HTTP admin on {addr} (is the port in use?)"))?;
    let local_addr = listener.local_addr().context("read the admin address")?;
    let conns = Connections::new();
    let listener = AdminListener::new(listener, conns.clone());
    let admin = Arc::new(Admin {
        node,
        samples: Samples::new(),
        metrics: install_recorder(),
        token,
        loopback: addr.ip().is_loopback(),
        local_addr,
    });
    let app = Router::new()
        .route("/", get(overview))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(
            admin.clone(),
            require_token_off_loopback,
        ))
        .route(
            "/api/log",
            get(api_log).route_layer(middleware::from_fn_with_state(
                admin.clone(),
                require_token_for_data,
            )),
        )
        .route("/health", get(health))
        // Every path, unknown ones included.
        .layer(middleware::from_fn_with_state(admin.clone(), check_host))
        .layer(middleware::from_fn(listener::track))
        .with_state(admin.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let reaper = conns.clone();
    let task = tokio::spawn(async move {
        let sampler = tokio::spawn(samples::run(admin.clone()));
        let reaper = tokio::spawn(reaper.reap());
        let served = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<ConnState>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.await;
        })
        .await;
        sampler.abort();
        reaper.abort();
        if let Err(e) = served {
            tracing::error!(error = %e, "the HTTP admin stopped");
        }
    });
    Ok(AdminHandle {
        local_addr,
        stop,
        task,
        conns,
    })
}

/// Off loopback, the token guards the paths it is layered on.
async fn require_token_off_loopback(
    State(admin): State<Arc<Admin>>,
    req: Request,
    next: Next,
) -> Response {
    if admin.loopback || offers_token(&req, &admin.token) {
        return next.run(req).await;
    }
    unauthorized(
        "this admin listener is not on loopback: send `Authorization: Bearer TOKEN` with the \
         cluster token (the `token` file in the secrets directory)\n",
    )
}

/// The token guards `/api/log` wherever the listener is: it serves keys and values, which on
/// loopback every local user would otherwise read, token or not.
async fn require_token_for_data(
    State(admin): State<Arc<Admin>>,
    req: Request,
    next: Next,
) -> Response {
    if offers_token(&req, &admin.token) {
        return next.run(req).await;
    }
    unauthorized(
        "/api/log serves keys and values, so it needs the cluster token, on loopback too: send \
         `Authorization: Bearer TOKEN` with the `token` file in the secrets directory (curl -H \
         \"Authorization: Bearer $(cat SECRETS/token)\" ...)\n",
    )
}

fn offers_token(req: &Request, token: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| tideline_stream::tls::token_eq(t, token))
}

fn unauthorized(msg: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        msg,
    )
        .into_response()
}

/// On loopback, serves only requests addressed to an IP address or `localhost` (any port):
/// names that no DNS answer can point elsewhere. A web page at `http://attacker.example/`
/// whose name then resolves to 127.0.0.1 (DNS rebinding) reads this listener as its own
/// origin, and every one of its requests says `Host: attacker.example`. A request with no
/// `Host` (HTTP/1.0) is served: browsers always send one, so it is no such page. Off loopback
/// the token decides, and a rebinding page cannot send it.
async fn check_host(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if !admin.loopback {
        return next.run(req).await;
    }
    // An absolute request target (`GET http://NAME/...`) names the host too, and wins over
    // `Host` where both come (RFC 9112 §3.2.2): each must be local.
    let target = req.uri().authority().map(|a| a.as_str().to_string());
    let hosts = req
        .headers()
        .get_all(header::HOST)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let Some(name) = target.into_iter().chain(hosts).find(|h| !is_local_name(h)) else {
        return next.run(req).await;
    };
    let addr = admin.local_addr;
    (
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "this admin listener is on loopback and answers only requests addressed to an IP \
             address or localhost, not to {name:?} (a web page whose name was pointed at this \
             machine would read the node as its own): open http://{addr}/ instead; a reverse \
             proxy must send `Host: {addr}` (nginx: `proxy_set_header Host $proxy_host;`, its \
             default)\n"
        ),
    )
        .into_response()
}

/// Whether `authority` (`HOST[:PORT]`, as in `Host`) names an IP address or `localhost`.
fn is_local_name(authority: &str) -> bool {
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, port)) => {
                ip.parse::<Ipv6Addr>().is_ok()
                    && (port.is_empty() || port.strip_prefix(':').is_some_and(port_ok))
            }
            None => false,
        };
    }
    let host = match authority.split_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return false,
        None => authority,
    };
    host.parse::<Ipv4Addr>().is_ok() || host.eq_ignore_ascii_case("localhost")
}

#[derive(Debug, Deserialize)]
struct OverviewQuery {
    part: Option<String>,
}

async fn overview(State(admin): State<Arc<Admin>>, Query(q): Query<OverviewQuery>) -> Response {
    // It reads the log's last records from disk: off the runtime's workers.
    let view =
        tokio::task::spawn_blocking(move || page::View::gather(&admin.node, &admin.samples)).await;
    let view = match view {
        Ok(view) => view,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    };
    let html = match q.part.as_deref() {
        Some("main") => page::main_section(&view),
        _ => page::document(&view),
    };
    Html(html).into_response()
}

async fn api_status(State(admin): State<Arc<Admin>>) -> Response {
    json_response(StatusCode::OK, &admin.node.status())
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{v}\n"),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    from: Option<String>,
    limit: Option<u64>,
}

/// Why an `/api/log` answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageEnd {
    /// It holds every record up to the end of the log (as of the request).
    Log,
    /// It holds `limit` records.
    Limit,
    /// The next record would have passed [`LOG_ANSWER_BYTES_MAX`].
    Bytes,
}

impl PageEnd {
    fn as_str(self) -> &'static str {
        match self {
            PageEnd::Log => "log",
            PageEnd::Limit => "limit",
            PageEnd::Bytes => "bytes",
        }
    }
}

/// One `/api/log` answer: its JSON lines, why it ended, and the `from` that reads on.
struct LogPage {
    lines: String,
    end: PageEnd,
    next_from: StartPosition,
}

/// Reads up to `limit` records from `from`, within [`LOG_ANSWER_BYTES_MAX`] of JSON lines
/// (one record at least). The next `from` is the offset after the last record; from a GTID
/// set it is that set with the GTIDs read added, so that it goes on skipping what the set
/// holds.
fn log_page(wal: &tideline_wal::Wal, from: StartPosition, limit: u64) -> anyhow::Result<LogPage> {
    let mut reader = crate::log_cmd::reader_for(wal, &from)?;
    let mut lines = String::new();
    let mut next_from = from;
    let mut records = 0;
    let end = loop {
        if records == limit {
            break PageEnd::Limit;
        }
        let Some(txn) = reader.next_txn()? else {
            break PageEnd::Log;
        };
        let line = crate::render::txn_json(&txn).to_string();
        if records > 0 && lines.len() + line.len() + 1 > LOG_ANSWER_BYTES_MAX {
            break PageEnd::Bytes;
        }
        lines.push_str(&line);
        lines.push('\n');
        records += 1;
        next_from = match next_from {
            StartPosition::Gtid(mut set) => {
                set.insert(txn.gtid);
                StartPosition::Gtid(set)
            }
            _ => StartPosition::Offset(txn.offset.next()),
        };
    };
    Ok(LogPage {
        lines,
        end,
        next_from,
    })
}

async fn api_log(State(admin): State<Arc<Admin>>, Query(q): Query<LogQuery>) -> Response {
    let from = match q
        .from
        .as_deref()
        .unwrap_or("earliest")
        .parse::<StartPosition>()
    {
        Ok(StartPosition::Latest) => {
            return bad_request(
                "from=latest names no record yet: use earliest, offset:N or gtid:SET",
            );
        }
        Ok(p) => p,
        Err(e) => return bad_request(&e),
    };
    let limit = q.limit.unwrap_or(LOG_LIMIT_DEFAULT);
    if limit == 0 || limit > LOG_LIMIT_MAX {
        return bad_request(&format!("limit must be 1..={LOG_LIMIT_MAX}"));
    }
    let node = admin.node.clone();
    let page = tokio::task::spawn_blocking(move || log_page(node.wal_ref(), from, limit)).await;
    match page {
        Ok(Ok(page)) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
                (
                    header::HeaderName::from_static(NEXT_FROM_HEADER),
                    page.next_from.to_string(),
                ),
                (
                    header::HeaderName::from_static(PAGE_END_HEADER),
                    page.end.as_str().to_string(),
                ),
            ],
            page.lines,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

fn bad_request(msg: &str) -> Response {
    (StatusCode::BAD_REQUEST, format!("{msg}\n")).into_response()
}

async fn health(State(admin): State<Arc<Admin>>) -> Response {
    let (ok, reason) = health_of(&admin.node.status());
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        format!("{}: {reason}\n", if ok { "ok" } else { "unavailable" }),
    )
        .into_response()
}

/// Whether the node is healthy, and why (or why not): a primary accepts writes; a replica has
/// every upstream connected and applying.
pub fn health_of(status: &Value) -> (bool, String) {
    if let Some(reason) = status["fail_stop"].as_str() {
        return (false, format!("fail-stop: {reason}"));
    }
    if status["bootstrapping"].as_bool() == Some(true) {
        return (false, "bootstrapping: copying an upstream's state".into());
    }
    let upstreams = status["upstreams"].as_array().cloned().unwrap_or_default();
    if upstreams.is_empty() {
        return if status["read_only"].as_bool() == Some(true) {
            (false, "read-only and replicating from nobody".into())
        } else {
            (true, "accepting writes".into())
        };
    }
    let mut down = Vec::new();
    let mut lag = 0u64;
    for u in &upstreams {
        let state = u["state"].as_str().unwrap_or("unknown");
        if state != "connected" {
            let error = u["error"].as_str().unwrap_or("no error reported");
            down.push(format!(
                "upstream {} is {state} ({error})",
                u["addr"].as_str().unwrap_or("?")
            ));
        }
        lag = lag.max(u["lag_txns"].as_u64().unwrap_or(0));
    }
    if down.is_empty() {
        (
            true,
            format!(
                "replicating from {} upstream(s), lag {lag} transactions",
                upstreams.len()
            ),
        )
    } else {
        (false, down.join("; "))
    }
}

async fn metrics_text(State(admin): State<Arc<Admin>>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tideline_wal::{Gtid, MemStorage, NewTransaction, Op, Wal, WalOptions};

    use super::*;

    fn put(wal: &Wal, seq: u64, value_bytes: usize) {
        let gtid = Gtid::new(wal.server_uuid(), seq).unwrap();
        let op = Op::Put {
            tree: "default".into(),
            key: format!("k{seq}").into_bytes(),
            value: vec![b'a'; value_bytes],
            before: None,
        };
        let ops = vec![op];
        wal.submit(NewTransaction {
            gtid,
            timestamp_us: 0,
            ops,
        })
        .unwrap()
        .wait()
        .unwrap();
    }

    #[test]
    fn local_names_are_ip_addresses_and_localhost() {
        for name in [
            "127.0.0.1:7480",
            "127.0.0.1",
            "127.0.0.1:",
            "10.1.2.3:80",
            "[::1]:7480",
            "[::1]",
            "localhost",
            "localhost:7480",
            "LocalHost:7480",
        ] {
            assert!(is_local_name(name), "{name}");
        }
        for name in [
            "",
            "attacker.example",
            "attacker.example:7480",
            "localhost.",
            "localhost.attacker.example:7480",
            "127.0.0.1.nip.io:7480",
            "127.1:7480",
            "127.0.0.1:74x",
            "127.0.0.1:80:80",
            "x@127.0.0.1",
            "[::1",
            "[::1]x",
            "[::1]:7480x",
            "[attacker.example]:7480",
            "\u{fffd}:7480",
        ] {
            assert!(!is_local_name(name), "{name}");
        }
    }

    /// A record larger than the byte bound comes alone (paging moves on); the bound never
    /// holds back the record after it.
    #[test]
    fn a_record_past_the_byte_bound_comes_alone_and_paging_moves_on() {
        let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
        put(&wal, 1, 1 << 10);
        put(&wal, 2, LOG_ANSWER_BYTES_MAX);
        put(&wal, 3, 1 << 10);

        let page = log_page(&wal, StartPosition::Earliest, 100).unwrap();
        assert_eq!(page.lines.lines().count(), 1);
        assert_eq!(page.end, PageEnd::Bytes);
        assert_eq!(page.next_from.to_string(), "offset:2");

        let page = log_page(&wal, page.next_from, 100).unwrap();
        assert_eq!(page.lines.lines().count(), 1);
        assert!(page.lines.len() > LOG_ANSWER_BYTES_MAX);
        assert_eq!(page.end, PageEnd::Bytes);
        assert_eq!(page.next_from.to_string(), "offset:3");

        let page = log_page(&wal, page.next_from, 100).unwrap();
        assert_eq!(page.lines.lines().count(), 1);
        assert_eq!(page.end, PageEnd::Log);
        assert_eq!(page.next_from.to_string(), "offset:4");
        // At the end, the next answer starts where new records will come.
        let page = log_page(&wal, page.next_from, 100).unwrap();
        assert_eq!((page.lines.as_str(), page.end), ("", PageEnd::Log));
        assert_eq!(page.next_from.to_string(), "offset:4");
    }
}
