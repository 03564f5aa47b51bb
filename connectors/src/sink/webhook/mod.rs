//! The webhook sink: each batch POSTed as JSON envelopes to one URL.
//!
//! Delivery: a webhook has no transaction to hold a checkpoint, so the sink keeps it in a local
//! file (`position_file`), replaced atomically (write, fsync, rename, fsync the directory)
//! only after the receiver answered 2xx. A crash between the answer and that write POSTs the
//! batch again on restart, perhaps cut differently: the receiver de-duplicates by the
//! `Tideline-Gtid-Range` header (the request's GTID set), keeping the highest GTID sequence it
//! applied per `Tideline-Pipeline` and per origin (the uuid part of each GTID; never
//! `source.server_uuid`, the node read from) (docs/OPERATIONS.md, "Webhook sink"); the
//! changes a bootstrap copy applies from
//! the records the source wrote meanwhile carry those records' GTIDs too, and the copy's rows
//! carry none (`read` upserts, harmless twice). One sink at a time owns a position file:
//! it `flock`s `POSITION_FILE.lock`, and a second one waits until the first has stopped.
//!
//! Requests: a batch goes out in log order as one POST, or several when its GTID set's text
//! would pass [`GTID_RANGE_BYTES_MAX`] (a filtered batch's GTIDs are sparse, about 8 bytes of
//! header each): each POST's header then names its own part, so the header fits a proxy's
//! limit and the receiver's rule holds per request. The position moves once every part of
//! the batch was answered 2xx; a failed part sends the batch again from its first part.
//!
//! Answers: the status line decides, within `timeout_ms`. 2xx: stored (its body is dropped
//! unread); 5xx, 408, 429, refused connections and timeouts are retried by the pipeline with
//! backoff ([`SinkError::Retry`]); any other answer (4xx, a redirect) holds the pipeline for
//! an operator ([`SinkError::Hold`]) with the status and the body's first line (a 431 says
//! which headers were too large), and the position does not move. Of an error's body at most
//! 4 KiB (`ERROR_BODY_BYTES_MAX`) are read, for at most a second.
//!
//! Owns: the HTTP request, its headers and the position file. Must never: write the position
//! before the receiver's 2xx, or show the URL's user info, query or fragment (user info is
//! refused: the client would not send it).

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tideline_wal::GtidSet;

use crate::envelope;
use crate::pipeline::PipelineCheckpoint;
use crate::sink::{Batch, CopyRecord, Item, Sink, SinkError, SinkFuture};

/// How a batch's envelopes travel in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON array of envelopes (`application/json`).
    Json,
    /// One envelope per line (`application/x-ndjson`).
    Jsonl,
}

/// The `[sink]` table of a pipeline with `kind = "webhook"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where batches are POSTed: an `http://host:port/path` URL, without user info
    /// (credentials go in `headers`). Shown without its query or fragment.
    pub url: String,
    /// The file holding this pipeline's checkpoint, replaced atomically after each 2xx; its
    /// directory is created when absent.
    pub position_file: PathBuf,
    /// `"json"` (default, a JSON array) or `"jsonl"` (one envelope per line).
    #[serde(default = "default_format")]
    pub format: Format,
    /// Extra request headers, e.g. `{ Authorization = "Bearer ..." }` (never logged).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How long one POST may take, connection included, until the receiver's status line
    /// arrives, before it is retried (default 10000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_format() -> Format {
    Format::Json
}
fn default_timeout() -> u64 {
    10_000
}

impl WebhookConfig {
    /// The defaults with `url` and `position_file`.
    pub fn new(url: impl Into<String>, position_file: impl Into<PathBuf>) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            position_file: position_file.into(),
            format: default_format(),
            headers: BTreeMap::new(),
            timeout_ms: default_timeout(),
        }
    }
}

/// The header carrying the batch's GTID set.
pub const GTID_RANGE_HEADER: &str = "tideline-gtid-range";
/// The header carrying the pipeline's name.
pub const PIPELINE_HEADER: &str = "tideline-pipeline";
/// The header naming a bootstrap step (a copy's batch; its rows carry no GTID).
pub const BOOTSTRAP_HEADER: &str = "tideline-bootstrap";

/// Most bytes of one request's `Tideline-Gtid-Range` value. A batch whose GTID set would
/// write longer goes out in several POSTs; this leaves room for the other headers under the
/// smallest common proxy limit on a header line (nginx's 8 KiB, `large_client_header_buffers`).
pub const GTID_RANGE_BYTES_MAX: usize = 4096;

/// Most bytes one GTID adds to a set's text: `,UUID:N` for a new origin (1 + 36 + 1 and at
/// most 20 digits); opening or widening an interval of a known origin adds less, and joining
/// two intervals takes bytes away.
const GTID_TEXT_BYTES_MAX: usize = 58;

/// POSTs batches to a URL; see the module docs.
pub struct WebhookSink {
    cfg: WebhookConfig,
    pipeline: String,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// `POSITION_FILE.lock`, held while this sink owns the position file.
    lock: Option<std::fs::File>,
}

impl WebhookSink {
    /// Checks `cfg` (no I/O); [`Sink::open`] reads the position file and tests the URL.
    /// Messages show the URL as [`Sink::describe`] does, never its user info, query or
    /// fragment (where tokens travel).
    pub fn new(cfg: WebhookConfig, pipeline: &str) -> Result<WebhookSink, SinkError> {
        let shown = super::shown_url(&cfg.url);
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| SinkError::Fatal(format!("sink url {shown}: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(SinkError::Fatal(format!(
                    "sink url {shown}: https is not supported by the webhook sink; POST to an \
                     http:// URL (a TLS-terminating proxy on loopback can forward it)"
                )));
            }
            _ => {
                return Err(SinkError::Fatal(format!(
                    "sink url {shown}: give an http://host:port/path URL"
                )));
            }
        }
        // The client sends no Basic auth from the URL (it takes only the host for `Host`):
        // credentials there would never reach the receiver.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(SinkError::Fatal(format!(
                "sink url {shown}: user info (`user:password@`) in the URL is not sent; \
                 remove it and give the credentials as a header instead, e.g. \
                 headers = {{ Authorization = \"Basic <base64 of user:password>\" }} (header \
                 values are never shown)"
            )));
        }
        if uri.host().is_none() {
            return Err(SinkError::Fatal(format!("sink url {shown} names no host")));
        }
        if cfg.timeout_ms == 0 {
            return Err(SinkError::Fatal(
                "sink timeout_ms must be at least 1".into(),
            ));
        }
        let mut headers = Vec::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::try_from(k.as_str()).map_err(|_| {
                SinkError::Fatal(format!("sink headers: {k:?} is not an HTTP header name"))
            })?;
            let value = HeaderValue::try_from(v.as_str()).map_err(|_| {
                SinkError::Fatal(format!(
                    "sink headers: the value of {k:?} is not a valid HTTP header value"
                ))
            })?;
            headers.push((name, value));
        }
        let pipeline_value = HeaderValue::try_from(pipeline).map_err(|_| {
            SinkError::Fatal(format!(
                "pipeline name {pipeline:?} cannot travel in an HTTP header"
            ))
        })?;
        headers.push((HeaderName::from_static(PIPELINE_HEADER), pipeline_value));
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(cfg.timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(WebhookSink {
            cfg,
            pipeline: pipeline.to_owned(),
            uri,
            headers,
            client,
            lock: None,
        })
    }

    /// The URL as messages and [`Sink::describe`] show it: `http://host:port/path`, without
    /// user info, query or fragment.
    fn shown(&self) -> String {
        format!("http://{}{}", self.authority(), self.uri.path())
    }

    fn authority(&self) -> String {
        let host = self.uri.host().unwrap_or_default();
        let port = self.uri.port_u16().unwrap_or(80);
        format!("{host}:{port}")
    }

    fn body(&self, source: uuid::Uuid, items: &[Item]) -> Vec<u8> {
        let mut envelopes: Vec<Value> = Vec::new();
        for item in items {
            envelope::for_each_envelope(item, source, |v| envelopes.push(v));
        }
        match self.cfg.format {
            Format::Json => serde_json::to_vec(&envelopes).unwrap_or_default(),
            Format::Jsonl => {
                let mut out = Vec::new();
                for e in &envelopes {
                    // Writing a `Value` into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut out, e);
                    out.push(b'\n');
                }
                out
            }
        }
    }

    /// POSTs `batch` part by part, in log order; stops at the first part not answered 2xx.
    async fn post(&self, batch: &Batch) -> Result<(), SinkError> {
        let parts = split(batch);
        let n = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let items = &batch.items[part.items];
            if items.iter().all(|item| changes(item) == 0) {
                continue;
            }
            self.post_part(batch.source, items, part.headers)
                .await
                .map_err(|e| match e {
                    SinkError::Hold(m) if n > 1 => {
                        SinkError::Hold(format!("{m} [request {} of the batch's {n}]", i + 1))
                    }
                    e => e,
                })?;
        }
        Ok(())
    }

    async fn post_part(
        &self,
        source: uuid::Uuid,
        items: &[Item],
        part_headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<(), SinkError> {
        let content_type = match self.cfg.format {
            Format::Json => "application/json",
            Format::Jsonl => "application/x-ndjson",
        };
        let mut req = hyper::Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, content_type);
        // What the request's header lines weigh (`Name: value\r\n`), and the heaviest, for
        // the message of a 431.
        let mut header_bytes = 0;
        let mut heaviest: (usize, &str) = (0, "");
        for (k, v) in self.headers.iter().chain(&part_headers) {
            let line = k.as_str().len() + v.len() + 4;
            header_bytes += line;
            if line > heaviest.0 {
                heaviest = (line, k.as_str());
            }
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(self.body(source, items))))
            .map_err(|e| SinkError::Fatal(format!("webhook request: {e}")))?;
        let url = self.shown();
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        // The answer is the status line: a 2xx means stored, whatever its body does (it is
        // dropped unread, closing the connection if any of it is still coming).
        let resp = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => {
                return Err(SinkError::Retry(format!(
                    "webhook {url} did not answer within {} ms (timeout_ms); if the receiver \
                     is up but slow with batches this large, raise the sink's `timeout_ms` or \
                     lower the pipeline's `batch_changes`",
                    self.cfg.timeout_ms
                )));
            }
            Ok(Err(e)) => {
                return Err(SinkError::Retry(format!(
                    "webhook {url}: {e}{}",
                    std::error::Error::source(&e)
                        .map(|s| format!(" ({s})"))
                        .unwrap_or_default()
                )));
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        // The body only matters for the message (its first line): a bounded part, briefly.
        let body = body_start(
            resp.into_body(),
            Duration::from_millis(self.cfg.timeout_ms.min(ERROR_BODY_WAIT_MS)),
        )
        .await;
        let first_line = String::from_utf8_lossy(&body)
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect::<String>();
        let message = format!("webhook {url} answered {status}: {first_line:?}");
        let code = status.as_u16();
        if status.is_server_error() || code == 408 || code == 429 {
            Err(SinkError::Retry(message))
        } else if code == 431 {
            Err(SinkError::Hold(format!(
                "{message}; the request's headers were too large for the receiver or a proxy \
                 in front of it: {header_bytes} bytes of header lines, the longest \
                 {:?} ({} bytes; Tideline-Gtid-Range stays within {GTID_RANGE_BYTES_MAX}); \
                 raise the receiver's header limit (nginx: large_client_header_buffers) or \
                 shorten the sink's `headers` (the position did not move)",
                heaviest.1, heaviest.0
            )))
        } else {
            Err(SinkError::Hold(format!(
                "{message}; fix the receiver or the pipeline's config (the position did not move)"
            )))
        }
    }
}

/// Most bytes of an error answer's body the sink reads: its first line goes into the
/// message, at most 200 characters of it.
const ERROR_BODY_BYTES_MAX: usize = 4096;

/// Most milliseconds the sink waits for an error answer's body (within `timeout_ms`).
const ERROR_BODY_WAIT_MS: u64 = 1000;

/// The start of `body`: what arrives within `wait`, up to its first line break or
/// [`ERROR_BODY_BYTES_MAX`] bytes. The rest is never read (dropping the body closes the
/// connection).
async fn body_start(mut body: hyper::body::Incoming, wait: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let read = async {
        while out.len() < ERROR_BODY_BYTES_MAX && !out.contains(&b'\n') {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = ERROR_BODY_BYTES_MAX - out.len();
                        out.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
    };
    // What came in time is enough for the message.
    let _ = tokio::time::timeout(wait, read).await;
    out
}

/// The changes (envelopes) `item` carries.
fn changes(item: &Item) -> usize {
    match item {
        Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. }) => t.ops.len(),
        Item::Chunk { entries, .. } => entries.len(),
        Item::Ops(ops) => ops.len(),
    }
}

/// One POST of a batch: `batch.items[items]` and the headers that identify it.
struct Part {
    items: Range<usize>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Cuts `batch` into POSTs, in log order, each with its GTID set (live transactions, and the
/// records whose changes a copy applies) in `Tideline-Gtid-Range`, whose text stays within
/// [`GTID_RANGE_BYTES_MAX`] (a part holds at least one transaction, so a batch always goes
/// out), and the bootstrap step the batch is (a bootstrap's checkpoint:
/// `SERVER_UUID:EPOCH:TREE:KEY_HEX:OFFSET`) on each. A copy's chunk or its tree and index
/// declarations carry no GTID and go out with no range.
fn split(batch: &Batch) -> Vec<Part> {
    let bootstrap = bootstrap_header(batch);
    let part = |items: Range<usize>, set: &GtidSet| {
        let mut headers = Vec::new();
        if !set.is_empty() {
            let text = set.to_string();
            assert!(
                text.len() <= GTID_RANGE_BYTES_MAX,
                "a part's GTID set is cut at {GTID_RANGE_BYTES_MAX} bytes of text"
            );
            // A GTID set's text is ASCII (hex, digits, `-`, `:` and `,`).
            if let Ok(v) = HeaderValue::try_from(text) {
                headers.push((HeaderName::from_static(GTID_RANGE_HEADER), v));
            }
        }
        if let Some(v) = &bootstrap {
            headers.push((HeaderName::from_static(BOOTSTRAP_HEADER), v.clone()));
        }
        Part { items, headers }
    };
    let mut parts = Vec::new();
    let mut start = 0;
    let mut set = GtidSet::new();
    // An upper bound on the length of `set`'s text, made exact (formatting the set) when adding
    // one more GTID might pass the bound.
    let mut text_bytes = 0;
    for (i, item) in batch.items.iter().enumerate() {
        let (Item::Txn(t) | Item::Record(CopyRecord { txn: t, .. })) = item else {
            continue;
        };
        if text_bytes + GTID_TEXT_BYTES_MAX > GTID_RANGE_BYTES_MAX {
            text_bytes = set.to_string().len();
            if text_bytes + GTID_TEXT_BYTES_MAX > GTID_RANGE_BYTES_MAX {
                parts.push(part(start..i, &set));
                (start, set, text_bytes) = (i, GtidSet::new(), 0);
            }
        }
        set.insert(t.gtid);
        text_bytes += GTID_TEXT_BYTES_MAX;
    }
    parts.push(part(start..batch.items.len(), &set));
    parts
}

/// `Tideline-Bootstrap` of a batch whose checkpoint is a bootstrap's.
fn bootstrap_header(batch: &Batch) -> Option<HeaderValue> {
    let Ok(PipelineCheckpoint::Bootstrap(p)) = PipelineCheckpoint::decode(&batch.checkpoint) else {
        return None;
    };
    let step = format!(
        "{}:{}:{}:{}:{}",
        p.server_uuid,
        p.epoch.unwrap_or_default(),
        p.tree,
        p.key_hex,
        p.after_offset
    );
    HeaderValue::try_from(step).ok()
}

/// The position file: `{"pipeline":"NAME","checkpoint_b64":"..."}`.
/// persisted: changes must stay backward compatible.
#[derive(serde::Serialize, serde::Deserialize)]
struct PositionFile {
    pipeline: String,
    checkpoint_b64: String,
}

fn read_position(path: &Path, pipeline: &str) -> Result<Option<Vec<u8>>, SinkError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SinkError::Hold(format!(
                "position file {}: {e}; check its permissions",
                path.display()
            )));
        }
    };
    let bad = |why: String| {
        SinkError::Hold(format!(
            "position file {} {why}; restore it, or remove it to start the pipeline over",
            path.display()
        ))
    };
    let f: PositionFile =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("does not decode ({e})")))?;
    if f.pipeline != pipeline {
        return Err(bad(format!(
            "belongs to pipeline {:?}, not {pipeline:?}",
            f.pipeline
        )));
    }
    base64::engine::general_purpose::STANDARD
        .decode(&f.checkpoint_b64)
        .map(Some)
        .map_err(|e| bad(format!("holds a bad checkpoint ({e})")))
}

/// Replaces `path` with the checkpoint: a temporary file beside it, fsynced, renamed over it,
/// and the directory fsynced, so that a crash leaves the old file or the new one.
fn write_position(path: &Path, pipeline: &str, checkpoint: &[u8]) -> std::io::Result<()> {
    let f = PositionFile {
        pipeline: pipeline.to_owned(),
        checkpoint_b64: base64::engine::general_purpose::STANDARD.encode(checkpoint),
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&f).unwrap_or_default())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Sink for WebhookSink {
    fn describe(&self) -> String {
        // The URL without any user info, query or fragment.
        format!("webhook {}", self.shown())
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        Box::pin(async move {
            let path = self.cfg.position_file.clone();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    SinkError::Hold(format!(
                        "position file directory {}: {e}; create it or fix its permissions",
                        dir.display()
                    ))
                })?;
            }
            if self.lock.is_none() {
                let mut lock = path.clone().into_os_string();
                lock.push(".lock");
                let what = path.display().to_string();
                self.lock = Some(crate::sink::lock_beside(
                    std::path::Path::new(&lock),
                    &what,
                )?);
            }
            let stored = read_position(&path, &self.pipeline)?;
            // Reachability: a TCP connection, no request (open moves no data).
            let addr = self.authority();
            let timeout = Duration::from_millis(self.cfg.timeout_ms);
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Ok(stored),
                Ok(Err(e)) => Err(SinkError::Retry(format!(
                    "webhook {} is not reachable ({e}); is the receiver running?",
                    self.shown()
                ))),
                Err(_) => Err(SinkError::Retry(format!(
                    "webhook {}: no connection within {} ms (timeout_ms)",
                    self.shown(),
                    self.cfg.timeout_ms
                ))),
            }
        })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            // A batch that only moves the position (everything filtered out) is not POSTed.
            if !batch.items.is_empty() && batch.changes() > 0 {
                self.post(batch).await?;
            }
            let (path, pipeline, checkpoint) = (
                self.cfg.position_file.clone(),
                self.pipeline.clone(),
                batch.checkpoint.clone(),
            );
            tokio::task::spawn_blocking(move || write_position(&path, &pipeline, &checkpoint))
                .await
                .map_err(|e| SinkError::Retry(format!("position file writer: {e}")))?
                .map_err(|e| {
                    SinkError::Hold(format!(
                        "position file {}: {e}; check the disk and its permissions",
                        self.cfg.position_file.display()
                    ))
                })
        })
    }
}

#[cfg(test)]
mod tests;
