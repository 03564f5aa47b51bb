//! The NATS JetStream sink: changes as JSON messages on a stream, de-duplicated by GTID.
//!
//! Delivery: every message of a batch is published with a `Nats-Msg-Id` header (the pipeline's
//! name and the GTID, `PIPELINE/UUID:N`, see [`message`]: a stream shared by several
//! pipelines never drops one pipeline's message as a repeat of another's), up to
//! `max_in_flight` awaiting their ack at once (see `publish.rs`), and every ack is awaited;
//! only then is the batch's checkpoint written, to the JetStream key-value bucket
//! `positions_bucket` (default `tideline_positions`) under the pipeline's name, over the
//! revision this sink last read or wrote (compare and set: a stale writer never moves it back;
//! one finding its own checkpoint already stored goes on; any other stops, `Fatal`). A crash between the acks and that write
//! sends the batch again on restart, and the stream drops each message whose id it saw within
//! its **duplicate window**: at least once + de-duplication = exactly once, as long as the
//! connector is back within the window (a longer outage may repeat the batch it was writing).
//!
//! Owns: the connection, the stream and the bucket it creates when absent, the publish-ack
//! accounting. Must never: write the checkpoint before every publish of its batch is acked.
//!
//! Layout: `message.rs` builds subjects, ids and payloads (pure); `publish.rs` publishes a
//! batch and matches its acks; this file connects, checks and stores the checkpoint.

pub mod message;
mod publish;

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

pub use message::{Message, Per};

use crate::sink::{Batch, Sink, SinkError, SinkFuture};

/// The `[sink]` table of a pipeline with `kind = "nats"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, `nats://host:port` (default `nats://127.0.0.1:4222`). Plain TCP: TLS
    /// (`tls://`) is refused.
    #[serde(default = "default_url")]
    pub url: String,
    /// The JetStream stream; created when absent (default `TIDELINE`).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The subjects the stream captures when this sink creates it (default `["tideline.>"]`);
    /// they must cover every subject the template produces.
    #[serde(default = "default_subjects")]
    pub subjects: Vec<String>,
    /// Subject template; `{tree}` is replaced by the tree's name (`.`, `*`, `>` and blanks as
    /// `_`), or `_multi` for a transaction touching several trees in `per = "txn"` mode
    /// (default `tideline.{tree}`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `"txn"` (default): one message per transaction; `"op"`: one per change.
    #[serde(default = "default_per")]
    pub per: Per,
    /// The stream's duplicate window in seconds when this sink creates it (default 120): how
    /// long after a message the stream still drops another with its id, i.e. how long a
    /// crashed connector may take to come back without repeating a message.
    #[serde(default = "default_window")]
    pub duplicate_window_secs: u64,
    /// How long to wait for the next ack of a batch's publishes, or for the answer to a
    /// stream/bucket request, before the batch is retried (default 10000).
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    /// Publishes awaiting their ack at once (default 16384): the pipelining depth.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// The key-value bucket holding each pipeline's checkpoint (default `tideline_positions`).
    #[serde(default = "default_bucket")]
    pub positions_bucket: String,
    /// User name, with `password`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password, with `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// Authentication token (instead of user and password).
    #[serde(default)]
    pub token: Option<String>,
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_stream() -> String {
    "TIDELINE".into()
}
fn default_subjects() -> Vec<String> {
    vec!["tideline.>".into()]
}
fn default_subject() -> String {
    "tideline.{tree}".into()
}
fn default_per() -> Per {
    Per::Txn
}
fn default_window() -> u64 {
    120
}
fn default_ack_timeout() -> u64 {
    10_000
}
fn default_in_flight() -> usize {
    16384
}
fn default_bucket() -> String {
    "tideline_positions".into()
}

impl NatsConfig {
    /// The defaults with `url`.
    pub fn new(url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            stream: default_stream(),
            subjects: default_subjects(),
            subject: default_subject(),
            per: default_per(),
            duplicate_window_secs: default_window(),
            ack_timeout_ms: default_ack_timeout(),
            max_in_flight: default_in_flight(),
            positions_bucket: default_bucket(),
            user: None,
            password: None,
            token: None,
        }
    }
}

/// A KV key may hold letters, digits and `-_=./` (and not start or end with `.`).
fn valid_kv_key(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with('.')
        && !k.ends_with('.')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./".contains(c))
}

/// A stream or bucket name may not hold blanks, `.`, `*`, `>`, `/` or `\`.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| !c.is_whitespace() && !".*>/\\".contains(c))
}

struct Conn {
    kv: jetstream::kv::Store,
    window: publish::AckWindow,
    max_payload: usize,
}

/// Writes batches to a JetStream stream; see the module docs.
pub struct NatsSink {
    cfg: NatsConfig,
    pipeline: String,
    conn: Option<Conn>,
    builder: message::Builder,
    /// The bucket's revision of the pipeline's key as this sink last read or wrote it (0: no
    /// entry). A checkpoint is stored only over that revision (compare and set).
    revision: u64,
}

impl NatsSink {
    /// The bucket's revision of the pipeline's key (0: none) and its checkpoint (`None` when
    /// absent or deleted).
    async fn stored(&self, conn: &Conn) -> Result<(u64, Option<Vec<u8>>), SinkError> {
        let entry = conn.kv.entry(self.pipeline.clone()).await.map_err(|e| {
            SinkError::Retry(format!(
                "NATS positions bucket {:?}, key {:?}: {e}",
                self.cfg.positions_bucket, self.pipeline
            ))
        })?;
        Ok(match entry {
            None => (0, None),
            Some(e) if e.operation == jetstream::kv::Operation::Put => {
                (e.revision, Some(e.value.to_vec()))
            }
            Some(e) => (e.revision, None),
        })
    }

    /// Checks `cfg` (no I/O); [`Sink::open`] connects.
    pub fn new(cfg: NatsConfig, pipeline: &str) -> Result<NatsSink, SinkError> {
        let bad = |m: String| Err(SinkError::Fatal(m));
        if !cfg.url.starts_with("nats://") {
            return bad(format!(
                "sink url {}: give a nats://host:port URL (TLS is not supported by this sink)",
                super::shown_url(&cfg.url)
            ));
        }
        if !valid_name(&cfg.stream) {
            return bad(format!(
                "sink stream {:?}: a stream name has no blanks, '.', '*', '>', '/' or '\\'",
                cfg.stream
            ));
        }
        if !valid_name(&cfg.positions_bucket) {
            return bad(format!(
                "sink positions_bucket {:?}: a bucket name has no blanks, '.', '*', '>', '/' or '\\'",
                cfg.positions_bucket
            ));
        }
        if cfg.subjects.is_empty() || cfg.subject.is_empty() {
            return bad("sink subjects and subject must not be empty".into());
        }
        if cfg.duplicate_window_secs == 0 {
            return bad(
                "sink duplicate_window_secs is 0: de-duplication needs a window (e.g. 120)".into(),
            );
        }
        if cfg.max_in_flight == 0 || cfg.ack_timeout_ms == 0 {
            return bad("sink max_in_flight and ack_timeout_ms must be at least 1".into());
        }
        if cfg.user.is_some() != cfg.password.is_some() {
            return bad("sink user and password go together: give both or neither".into());
        }
        if !valid_kv_key(pipeline) {
            return bad(format!(
                "pipeline name {pipeline:?} cannot key the NATS positions bucket: use letters, \
                 digits and -_=./"
            ));
        }
        let builder = message::Builder::new(pipeline, &cfg.subject, cfg.per);
        Ok(NatsSink {
            cfg,
            pipeline: pipeline.to_owned(),
            conn: None,
            builder,
            revision: 0,
        })
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let cfg = &self.cfg;
        let timeout = Duration::from_millis(cfg.ack_timeout_ms);
        let mut opts = async_nats::ConnectOptions::new()
            .name(format!("tideline pipeline {}", self.pipeline))
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            // The client drops a message for a full subscription: room for a window of acks
            // and the late ones of an attempt given up (a drop would only cost a retry).
            .subscription_capacity(cfg.max_in_flight.saturating_mul(2).max(64 * 1024));
        if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &cfg.token {
            opts = opts.token(t.clone());
        }
        // Messages show the URL without its user info (docs/OPERATIONS.md).
        let shown = super::shown_url(&cfg.url);
        let client = opts.connect(cfg.url.as_str()).await.map_err(|e| {
            use async_nats::ConnectErrorKind as K;
            match e.kind() {
                K::AuthorizationViolation | K::Authentication => SinkError::Hold(format!(
                    "NATS at {} refused the credentials ({e}): check user/password/token",
                    shown
                )),
                K::ServerParse => SinkError::Fatal(format!("sink url {shown}: {e}")),
                _ => SinkError::Retry(format!(
                    "NATS at {} is not reachable ({e}); is nats-server running?",
                    shown
                )),
            }
        })?;
        let max_payload = client.server_info().max_payload;
        let ack_window = publish::AckWindow::open(&client).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .ack_timeout(timeout)
            .build(client);
        let stream_cfg = jetstream::stream::Config {
            name: cfg.stream.clone(),
            subjects: cfg.subjects.clone(),
            duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let mut stream = js.get_or_create_stream(stream_cfg).await.map_err(|e| {
            use async_nats::jetstream::context::CreateStreamErrorKind as K;
            match e.kind() {
                K::JetStreamUnavailable => SinkError::Hold(format!(
                    "NATS at {} has no JetStream ({e}): start nats-server with -js",
                    shown
                )),
                K::JetStream(_) => SinkError::Hold(format!(
                    "NATS refused stream {:?} ({e}): check its subjects do not overlap another \
                     stream's",
                    cfg.stream
                )),
                _ => SinkError::Retry(format!("NATS stream {:?}: {e}", cfg.stream)),
            }
        })?;
        let info = stream
            .info()
            .await
            .map_err(|e| SinkError::Retry(format!("NATS stream {:?} info: {e}", cfg.stream)))?;
        let window = info.config.duplicate_window;
        if window != Duration::from_secs(cfg.duplicate_window_secs) {
            tracing::warn!(
                stream = %cfg.stream,
                window_secs = window.as_secs_f64(),
                "the existing stream's duplicate window differs from duplicate_window_secs; \
                 it is the stream's that de-duplicates"
            );
        }
        let kv = positions_bucket(&js, &cfg.positions_bucket).await?;
        Ok(Conn {
            kv,
            window: ack_window,
            max_payload,
        })
    }

    /// Publishes `msgs` and awaits every ack (the checkpoint is not this function's).
    async fn publish_all(
        cfg: &NatsConfig,
        conn: &mut Conn,
        msgs: &mut [Message],
    ) -> Result<(), SinkError> {
        for m in msgs.iter() {
            if m.payload.len() + m.id.len() + 64 > conn.max_payload {
                return Err(SinkError::Hold(format!(
                    "message {} is {} bytes, over the server's max_payload of {}: raise \
                     max_payload in nats-server or use per = \"op\"",
                    m.id,
                    m.payload.len(),
                    conn.max_payload
                )));
            }
        }
        #[cfg(feature = "testing")]
        let with_id = !testing::without_msg_id();
        #[cfg(not(feature = "testing"))]
        let with_id = true;
        let settings = publish::Settings {
            stream: &cfg.stream,
            max_in_flight: cfg.max_in_flight,
            ack_timeout: Duration::from_millis(cfg.ack_timeout_ms),
            with_id,
        };
        conn.window.publish(msgs, &settings).await
    }
}

/// The positions bucket, created when absent. Created as the stream a KV bucket is
/// (`KV_<bucket>` on `$KV.<bucket>.>`, one value per key, rollups, direct gets: what
/// `nats kv add` makes) rather than through `create_key_value`, whose account query does not
/// parse the answer of nats-server 2.9 (Debian 12's).
async fn positions_bucket(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<jetstream::kv::Store, SinkError> {
    if let Ok(kv) = js.get_key_value(bucket).await {
        return Ok(kv);
    }
    let stream = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("tideline pipeline checkpoints, keyed by pipeline".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    // Two pipelines may race to create it: an identical config is accepted twice.
    js.get_or_create_stream(stream)
        .await
        .map_err(|e| SinkError::Retry(format!("NATS positions bucket {bucket:?}: {e}")))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| SinkError::Retry(format!("NATS positions bucket {bucket:?}: {e}")))
}

impl Sink for NatsSink {
    fn describe(&self) -> String {
        let url = super::shown_url(&self.cfg.url);
        let host = url.trim_start_matches("nats://");
        format!("nats {host} stream {}", self.cfg.stream)
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        Box::pin(async move {
            let conn = self.connect().await?;
            let (revision, stored) = self.stored(&conn).await?;
            self.revision = revision;
            self.conn = Some(conn);
            Ok(stored)
        })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if self.conn.is_none() {
                self.conn = Some(self.connect().await?);
            }
            let mut msgs = self.builder.messages(batch);
            let conn = self.conn.as_mut().expect("connected just above");
            Self::publish_all(&self.cfg, conn, &mut msgs).await?;
            #[cfg(feature = "testing")]
            let published = !msgs.is_empty();
            #[cfg(feature = "testing")]
            if published && testing::die_before_position() {
                // The worst moment for a crash: every message acked, the checkpoint not moved.
                std::process::abort();
            }
            // Every message is acked: only now may the checkpoint move, and only from the
            // revision this sink last read or wrote.
            let put = conn
                .kv
                .update(
                    self.pipeline.as_str(),
                    Bytes::copy_from_slice(&batch.checkpoint),
                    self.revision,
                )
                .await;
            let e = match put {
                Ok(revision) => {
                    self.revision = revision;
                    return Ok(());
                }
                Err(e) => e,
            };
            // Refused (the key moved on) or unanswered: the stored entry tells which.
            let conn = self.conn.as_ref().expect("connected above");
            let (revision, stored) = self.stored(conn).await?;
            if stored.as_deref() == Some(batch.checkpoint.as_slice()) {
                // Stored before (by this sink, its answer lost, or by another writer of the
                // same batch): nothing left to do.
                self.revision = revision;
                return Ok(());
            }
            if revision == self.revision {
                return Err(SinkError::Retry(format!(
                    "NATS positions bucket {:?}: {e}",
                    self.cfg.positions_bucket
                )));
            }
            Err(crate::sink::position_moved(&format!(
                "NATS positions bucket {:?}: the checkpoint of pipeline {:?}",
                self.cfg.positions_bucket, self.pipeline
            )))
        })
    }
}

/// Test-only switches (feature `testing`): never in a build you deploy.
#[cfg(feature = "testing")]
pub mod testing {
    /// With env `TIDELINE_TEST_NATS_WITHOUT_MSG_ID=1` the sink publishes without the
    /// `Nats-Msg-Id` header: the protection off, for the crash tests' canary.
    pub fn without_msg_id() -> bool {
        std::env::var_os("TIDELINE_TEST_NATS_WITHOUT_MSG_ID").is_some_and(|v| v == "1")
    }

    /// With env `TIDELINE_TEST_NATS_DIE_BEFORE_POSITION=1` the process aborts after the first
    /// batch that published something is acked, before its checkpoint is stored: a crash at
    /// the one moment that makes the next run publish the batch again (the kill tests' first
    /// cycle, so that their verdict never depends on where a random kill landed).
    pub fn die_before_position() -> bool {
        std::env::var_os("TIDELINE_TEST_NATS_DIE_BEFORE_POSITION").is_some_and(|v| v == "1")
    }
}
