//! Pipeline files: the TOML that `tideline connect --config FILE` and `tideline serve
//! --connect FILE` run, documented key by key in `docs/OPERATIONS.md` ("Connectors").
//!
//! One pipeline at the top level, or several as `[[pipeline]]` tables:
//!
//! ```toml
//! [source]
//! node = "127.0.0.1:7400"
//! secrets = "./data/secrets"
//! from = "bootstrap"            # or "earliest", "latest", "offset:N", "gtid:SET"
//! trees = ["users"]             # optional filter
//!
//! [sink]
//! kind = "postgres"             # or "redis"
//! url = "postgres://postgres@127.0.0.1:5432/test"
//! ```
//!
//! Every mistake — a key no table knows, a wrong type, a missing key, a bad value — is a
//! [`ConfigError`] naming the line and the key, and nothing starts. It never quotes the value
//! of a key that may hold a secret (`password`, `token`, `url`, `headers`): those messages are
//! printed on stderr, into journald and by `--check`.
//!
//! Owns: parsing and checking files, building each pipeline's [`PipelineConfig`] and its
//! sink. Must never: connect anywhere (that is [`crate::Sink::open`], which `--check` calls).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IgnoredAny;
use tideline_consumers::TailStart;
use tideline_stream::{ClientConfig, tls};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::pipeline::{Filter, PipelineConfig, StartFrom};
use crate::sink::file::{FileConfig, FileSink};
use crate::sink::nats::{NatsConfig, NatsSink};
use crate::sink::postgres::{PostgresConfig, PostgresSink};
use crate::sink::redis::{RedisConfig, RedisSink};
use crate::sink::webhook::{WebhookConfig, WebhookSink};
use crate::sink::{Sink, SinkError};

/// A mistake in a pipeline file: where and what. Shown as `FILE line N: MESSAGE` (`FILE:
/// MESSAGE` when the mistake has no line), always on one line: control characters in the
/// file's name or the message (a pipeline name may hold a newline) are escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, as given.
    pub file: String,
    /// 1-based line; 0 when the mistake is about no line (the file cannot be read).
    pub line: usize,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = one_line(&self.file);
        match self.line {
            0 => write!(f, "{file}: ")?,
            line => write!(f, "{file} line {line}: ")?,
        }
        f.write_str(&one_line(&self.message))
    }
}

/// `s` with its control characters (newline, tab, ESC, ...) escaped as Rust writes them
/// (`\n`): an error is one line on stderr and in journald, whatever a name holds.
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// A pipeline file, checked.
#[derive(Debug, Clone)]
pub struct ConnectFile {
    /// Its pipelines, in file order; names are unique, and so are file sinks' `path`s.
    pub pipelines: Vec<PipelineSpec>,
}

/// One pipeline of a file.
#[derive(Debug, Clone)]
pub struct PipelineSpec {
    /// Its name: the key of its stored position in the sink, and its label in `status`.
    pub name: String,
    /// Where it reads.
    pub source: SourceConfig,
    /// Where it writes.
    pub sink: SinkConfig,
    /// A batch is written at this many changes ...
    pub batch_changes: usize,
    /// ... or this long after its first change.
    pub batch_delay: Duration,
    /// Where the start position came from: `from` parsed.
    pub from: StartFrom,
    /// The line of the pipeline's sink table, for messages.
    pub line: usize,
    /// The line of the pipeline's source table, for messages.
    pub source_line: usize,
    /// The file the pipeline was read from, as given, for messages.
    pub file: String,
}

/// A sink's kind and settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SinkConfig {
    /// `kind = "postgres"`.
    Postgres(PostgresConfig),
    /// `kind = "redis"`.
    Redis(RedisConfig),
    /// `kind = "nats"`.
    Nats(NatsConfig),
    /// `kind = "webhook"`.
    Webhook(WebhookConfig),
    /// `kind = "file"`.
    File(FileConfig),
}

/// The `[source]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The source node, `HOST:PORT` (its `--listen`). Only a pipeline that a node runs
    /// (`serve --connect`) may leave it out: its source is then that node itself, at the
    /// address it bound (so a node listening on port 0 can feed its own pipelines).
    #[serde(default)]
    pub node: Option<String>,
    /// The cluster's secrets directory (relative paths from the working directory); without
    /// it, env `TIDELINE_SECRETS`, else `./data/secrets`.
    #[serde(default)]
    pub secrets: Option<PathBuf>,
    /// Where to start when the sink holds no position: `bootstrap` (default: copy the
    /// source's state, then follow its log), `earliest`, `latest`, `offset:N`, `gtid:SET`.
    #[serde(default = "default_from")]
    pub from: Spanned<String>,
    /// Only these trees (default: all).
    #[serde(default)]
    pub trees: Vec<String>,
    /// Only keys starting with this text.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Only these op kinds: `put`, `delete`, `merge`, `create_tree`, `drop_tree` (default:
    /// all).
    #[serde(default)]
    pub ops: Vec<Spanned<String>>,
    /// Give up on an unreachable or silent source after this many milliseconds (default
    /// 5000); the pipeline retries.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_from() -> Spanned<String> {
    Spanned::new(0..0, "bootstrap".into())
}

fn default_timeout_ms() -> u64 {
    5000
}

/// The keys a pipeline has besides `source` and `sink`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineDoc {
    name: Option<Spanned<String>>,
    source: SourceConfig,
    /// Checked by kind below, from the spanned document.
    #[expect(
        dead_code,
        reason = "present for deny_unknown_fields; read from the DeTable"
    )]
    sink: IgnoredAny,
    batch_changes: Option<usize>,
    batch_delay_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    name: Option<Spanned<String>>,
    source: Option<SourceConfig>,
    #[expect(
        dead_code,
        reason = "present for deny_unknown_fields; read from the DeTable"
    )]
    sink: Option<IgnoredAny>,
    batch_changes: Option<usize>,
    batch_delay_ms: Option<u64>,
    #[serde(default)]
    pipeline: Vec<PipelineDoc>,
}

const OPS: [&str; 5] = ["put", "delete", "merge", "create_tree", "drop_tree"];
const SINKS_KNOWN: [&str; 5] = ["postgres", "redis", "nats", "webhook", "file"];

impl ConnectFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<ConnectFile, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: file.clone(),
            // Nothing was read: no line to name.
            line: 0,
            message: format!("cannot read it: {e}; pass the path of a pipeline file"),
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            ConfigError {
                file: file.clone(),
                line: line_of(e.as_bytes(), at),
                message: format!("byte {at} is not UTF-8: save the file as UTF-8 text"),
            }
        })?;
        Self::parse(&text, &file)
    }

    /// Checks `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ConnectFile, ConfigError> {
        let err = |span: Option<std::ops::Range<usize>>, message: String| ConfigError {
            file: file.to_owned(),
            line: span.map_or(0, |s| line_of(text, s.start)),
            message,
        };
        let root = DeTable::parse(text).map_err(|e| err(e.span(), e.message().to_owned()))?;
        let doc: FileDoc = toml::from_str(text).map_err(|e| {
            let message = match e.span() {
                Some(s) => name_the_key(root.get_ref(), &s, e.message()),
                None => e.message().to_owned(),
            };
            err(e.span(), message)
        })?;
        // (spanned table of the pipeline, its sink) pairs, in order.
        let mut pipelines = Vec::new();
        let top_level = doc.source.is_some() || root.get_ref().contains_key("sink");
        if top_level && !doc.pipeline.is_empty() {
            return Err(err(
                key_span(root.get_ref(), "pipeline"),
                "a file holds either one pipeline ([source] and [sink] at the top) or \
                 [[pipeline]] tables, not both; move [source] and [sink] into a [[pipeline]]"
                    .into(),
            ));
        }
        if top_level {
            let Some(source) = doc.source else {
                return Err(err(
                    key_span(root.get_ref(), "sink"),
                    "missing [source] table: add `[source]` with `node = \"HOST:PORT\"` (inside \
                     `serve --connect`, an empty `[source]` follows the node itself)"
                        .into(),
                ));
            };
            let Some(sink) = root.get_ref().get("sink") else {
                return Err(err(
                    key_span(root.get_ref(), "source"),
                    "missing [sink] table: add `[sink]` with `kind` and that sink's keys".into(),
                ));
            };
            let source_span = key_span(root.get_ref(), "source");
            pipelines.push((
                doc.name
                    .map(|n| n.into_inner())
                    .unwrap_or_else(|| "default".into()),
                source,
                source_span,
                sink,
                doc.batch_changes,
                doc.batch_delay_ms,
            ));
        } else {
            let Some(array) = root
                .get_ref()
                .get("pipeline")
                .and_then(|p| match p.get_ref() {
                    DeValue::Array(a) => Some(a),
                    _ => None,
                })
            else {
                return Err(err(
                    Some(0..0),
                    "no pipeline: write [source] and [sink] tables, or [[pipeline]] tables with \
                     name, [pipeline.source] and [pipeline.sink]"
                        .into(),
                ));
            };
            for (p, t) in doc.pipeline.into_iter().zip(array.iter()) {
                let DeValue::Table(t) = t.get_ref() else {
                    continue;
                };
                let Some(name) = p.name else {
                    return Err(err(
                        Some(t.values().next().map_or(0..0, |v| v.span())),
                        "missing field `name` in a [[pipeline]]: every pipeline of a file needs \
                         a name (it keys the pipeline's position in the sink)"
                            .into(),
                    ));
                };
                let sink = t
                    .get("sink")
                    .expect("deserialized: the sink field is there");
                pipelines.push((
                    name.into_inner(),
                    p.source,
                    key_span(t, "source"),
                    sink,
                    p.batch_changes,
                    p.batch_delay_ms,
                ));
            }
        }
        // `pipeline = []` (or a list with no table in it) deserializes to nothing to run.
        if pipelines.is_empty() {
            return Err(err(
                key_span(root.get_ref(), "pipeline").or(Some(0..0)),
                "no pipeline: the `pipeline` list is empty; write [[pipeline]] tables with \
                 name, [pipeline.source] and [pipeline.sink]"
                    .into(),
            ));
        }
        let mut out = Vec::new();
        for (name, source, source_span, sink, batch_changes, batch_delay_ms) in pipelines {
            if name.is_empty() || out.iter().any(|p: &PipelineSpec| p.name == name) {
                return Err(err(
                    Some(sink.span()),
                    format!("pipeline name `{name}` is empty or used twice; give each its own"),
                ));
            }
            let from = parse_from(source.from.get_ref())
                .map_err(|m| err(Some(source.from.span()), format!("source.from: {m}")))?;
            for op in &source.ops {
                if !OPS.contains(&op.get_ref().as_str()) {
                    return Err(err(
                        Some(op.span()),
                        format!(
                            "source.ops: unknown op `{}`; use {}",
                            op.get_ref(),
                            OPS.join(", ")
                        ),
                    ));
                }
            }
            if batch_changes == Some(0) {
                return Err(err(
                    Some(sink.span()),
                    "batch_changes: must be at least 1".into(),
                ));
            }
            let sink_cfg = sink_config(text, file, sink)?;
            if let SinkConfig::File(c) = &sink_cfg {
                let same = |p: &PipelineSpec| {
                    matches!(&p.sink, SinkConfig::File(o)
                        if o.path == c.path || same_file_lexically(&o.path, &c.path))
                };
                if let Some(first) = out.iter().find(|p| same(p)) {
                    let span = match sink.get_ref() {
                        DeValue::Table(t) => t.get("path").map(|v| v.span()),
                        _ => None,
                    };
                    return Err(err(
                        span.or(Some(sink.span())),
                        format!(
                            "pipelines `{}` and `{name}` both write the file sink path `{}`: \
                             a file sink's files and position belong to one pipeline; give \
                             each pipeline its own `path`",
                            first.name,
                            c.path.display()
                        ),
                    ));
                }
            }
            out.push(PipelineSpec {
                name,
                from,
                source,
                sink: sink_cfg,
                batch_changes: batch_changes.unwrap_or(10_000),
                batch_delay: Duration::from_millis(batch_delay_ms.unwrap_or(50)),
                line: line_of(text, sink.span().start),
                source_line: line_of(text, source_span.unwrap_or(sink.span()).start),
                file: file.to_owned(),
            });
        }
        Ok(ConnectFile { pipelines: out })
    }
}

/// Whether `a` and `b` name one file once spelled alike: relative to the working directory,
/// without `.` components or doubled separators, and with `..` taking back the component
/// before it. Lexical only (symbolic links are not followed): two names of one file
/// through a link are caught when the second sink opens (by the first one's lock, or by the
/// position the first one wrote).
fn same_file_lexically(a: &Path, b: &Path) -> bool {
    fn normal(p: &Path) -> PathBuf {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                std::path::Component::CurDir => {}
                std::path::Component::ParentDir => {
                    if !out.pop() {
                        out.push(c);
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
    normal(a) == normal(b)
}

/// Deserializes a `[sink]` table by its `kind`, with errors at the offending key's line.
fn sink_config(
    text: &str,
    file: &str,
    sink: &Spanned<DeValue<'_>>,
) -> Result<SinkConfig, ConfigError> {
    let err = |span: std::ops::Range<usize>, message: String| ConfigError {
        file: file.to_owned(),
        line: line_of(text, span.start),
        message,
    };
    let DeValue::Table(table) = sink.get_ref() else {
        return Err(err(sink.span(), "sink: must be a table".into()));
    };
    let Some(kind) = table.get("kind") else {
        return Err(err(
            sink.span(),
            format!(
                "sink: missing field `kind`; use one of {}",
                SINKS_KNOWN.join(", ")
            ),
        ));
    };
    let Some(kind_name) = kind.get_ref().as_str() else {
        return Err(err(kind.span(), "sink.kind: must be a string".into()));
    };
    let mut rest = table.clone();
    rest.remove("kind");
    let de = || toml::de::Deserializer::from(Spanned::new(sink.span(), rest.clone()));
    let fail = |e: toml::de::Error| {
        let span = e.span().unwrap_or(sink.span());
        let message = name_the_key(table, &span, e.message());
        err(span, format!("sink: {message}"))
    };
    match kind_name {
        "postgres" => PostgresConfig::deserialize(de())
            .map(SinkConfig::Postgres)
            .map_err(fail),
        "redis" => RedisConfig::deserialize(de())
            .map(SinkConfig::Redis)
            .map_err(fail),
        "nats" => NatsConfig::deserialize(de())
            .map(SinkConfig::Nats)
            .map_err(fail),
        "webhook" => WebhookConfig::deserialize(de())
            .map(SinkConfig::Webhook)
            .map_err(fail),
        "file" => FileConfig::deserialize(de())
            .map(SinkConfig::File)
            .map_err(fail),
        k => Err(err(
            kind.span(),
            format!(
                "unknown sink kind `{k}`; use one of {}",
                SINKS_KNOWN.join(", ")
            ),
        )),
    }
}

/// Adds the key's name to a message about a value (`invalid type: ...` names none), and hides
/// the value a message quotes when the key holds a secret ([`SECRET_KEYS`]).
fn name_the_key(table: &DeTable<'_>, span: &std::ops::Range<usize>, message: &str) -> String {
    match key_at(table, span, "") {
        Some(path) => {
            let secret = path
                .split(['.', '['])
                .any(|part| SECRET_KEYS.contains(&part));
            let message = if secret {
                hide_value(message)
            } else {
                message.to_owned()
            };
            if message.contains(&format!("`{}`", last(&path))) {
                message
            } else {
                format!("{path}: {message}")
            }
        }
        None => message.to_owned(),
    }
}

/// Keys whose values may hold a credential: a password, a token, a URL with its user info or
/// query, request headers (`Authorization`). Errors about them never quote the value.
const SECRET_KEYS: [&str; 4] = ["password", "token", "url", "headers"];

/// `message` without the value serde quotes in it: `invalid type: integer `123456`, expected
/// a string` becomes `invalid type: integer <hidden>, expected a string`. Messages of other
/// shapes quote no value (`unknown field `url``, `missing field `url``) and stay.
fn hide_value(message: &str) -> String {
    for lead in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(lead)
            && let Some(at) = rest.rfind(", expected ")
        {
            // `integer `5``, `string "x"`, `boolean `true``: the kind is the words before the
            // value's quote.
            let what = &rest[..at];
            return match what.find(['`', '"']) {
                Some(q) => format!("{lead}{} <hidden>{}", what[..q].trim_end(), &rest[at..]),
                None => message.to_owned(),
            };
        }
    }
    message.to_owned()
}

fn last(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// The dotted path of the key whose key or value span holds `span`, deepest first.
fn key_at(table: &DeTable<'_>, span: &std::ops::Range<usize>, prefix: &str) -> Option<String> {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        let vs = v.span();
        let ks = k.span();
        let inside = |s: &std::ops::Range<usize>| s.start <= span.start && span.end <= s.end;
        if let DeValue::Table(t) = v.get_ref()
            && let Some(deeper) = key_at(t, span, &path)
        {
            return Some(deeper);
        }
        if let DeValue::Array(a) = v.get_ref() {
            for (i, item) in a.iter().enumerate() {
                if let DeValue::Table(t) = item.get_ref()
                    && let Some(deeper) = key_at(t, span, &format!("{path}[{i}]"))
                {
                    return Some(deeper);
                }
            }
        }
        if (inside(&vs) && !matches!(v.get_ref(), DeValue::Table(_))) || inside(&ks) {
            return Some(path);
        }
    }
    None
}

fn key_span(table: &DeTable<'_>, key: &str) -> Option<std::ops::Range<usize>> {
    table.get(key).map(|v| v.span())
}

/// 1-based line of byte `at`.
fn line_of(text: impl AsRef<[u8]>, at: usize) -> usize {
    let text = text.as_ref();
    text[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn parse_from(s: &str) -> Result<StartFrom, String> {
    const HINT: &str = "use bootstrap, earliest, latest, offset:N or gtid:SET";
    Ok(match s.trim() {
        "bootstrap" => StartFrom::Bootstrap,
        "earliest" => StartFrom::Tail(TailStart::Earliest),
        "latest" => StartFrom::Tail(TailStart::Latest),
        other => {
            if let Some(n) = other.strip_prefix("offset:") {
                match n.parse::<u64>() {
                    Ok(n) if n >= 1 => StartFrom::Tail(TailStart::Offset(n)),
                    _ => return Err(format!("bad offset in `{other}`: offsets count from 1")),
                }
            } else if let Some(set) = other.strip_prefix("gtid:") {
                StartFrom::Tail(TailStart::Gtid(
                    set.parse()
                        .map_err(|e| format!("bad GTID set in `{other}`: {e}"))?,
                ))
            } else {
                return Err(format!("unknown start `{other}`; {HINT}"));
            }
        }
    })
}

/// The node a pipeline file runs inside (`serve --connect`): the source of a pipeline whose
/// `[source]` names no `node`, and the secrets of one that names none.
#[derive(Debug, Clone, Copy)]
pub struct HostNode<'a> {
    /// The address the node's QUIC server bound (an unspecified IP reads as loopback).
    pub addr: std::net::SocketAddr,
    /// The node's secrets directory.
    pub secrets: &'a Path,
}

impl HostNode<'_> {
    /// `HOST:PORT` a pipeline in the same process dials: the bound address, with `0.0.0.0`
    /// or `::` replaced by the loopback address of the same family.
    pub fn dial_addr(&self) -> String {
        let mut a = self.addr;
        if a.ip().is_unspecified() {
            a.set_ip(match a {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        a.to_string()
    }
}

impl PipelineSpec {
    /// The pipeline's settings. The source is `[source] node`, else the host node (`host`,
    /// when a node runs the file); its credentials come from `secrets`, else the host node's,
    /// else env `TIDELINE_SECRETS`, else `./data/secrets`.
    pub fn pipeline_config(&self, host: Option<HostNode<'_>>) -> Result<PipelineConfig, String> {
        let node = match (&self.source.node, host) {
            (Some(node), _) => node.clone(),
            (None, Some(h)) => h.dial_addr(),
            (None, None) => {
                return Err(format!(
                    "pipeline `{}`: [source] names no `node`: add `node = \"HOST:PORT\"` (the \
                     source node's --listen); only a file run by `tideline serve --connect` \
                     may leave it out, to follow that node itself",
                    self.name
                ));
            }
        };
        let default_secrets = host.map(|h| h.secrets);
        let from_env = std::env::var_os("TIDELINE_SECRETS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        let dir = self
            .source
            .secrets
            .clone()
            .or(default_secrets.map(Path::to_path_buf))
            .or(from_env)
            .unwrap_or_else(|| PathBuf::from("./data/secrets"));
        let secrets = tls::load_client_dir(&dir).map_err(|e| {
            format!(
                "pipeline `{}`: source secrets {}: {e}; set `secrets` in [source] to the \
                 node's secrets directory",
                self.name,
                dir.display()
            )
        })?;
        let mut client = ClientConfig::new(secrets);
        client.client_name = format!("tideline-connect {}", self.name);
        client.connect_timeout = Duration::from_millis(self.source.timeout_ms.max(1));
        client.idle_timeout = Duration::from_millis(self.source.timeout_ms.max(1));
        let mut cfg = PipelineConfig::new(&self.name, &node, client);
        cfg.from = self.from.clone();
        cfg.filter = Filter {
            trees: self.source.trees.clone(),
            prefix: self.source.prefix.clone().map(String::into_bytes),
            ops: self
                .source
                .ops
                .iter()
                .map(|o| o.get_ref().clone())
                .collect(),
        };
        cfg.batch_changes = self.batch_changes;
        cfg.batch_delay = self.batch_delay;
        Ok(cfg)
    }

    /// The pipeline's settings ([`PipelineSpec::pipeline_config`]) and its sink, not yet
    /// opened ([`PipelineSpec::sink`]), or the first mistake found in them as a
    /// [`ConfigError`] at the pipeline's place in its file: a sink mistake (a URL scheme the
    /// sink refuses, an empty `path`, a name the sink cannot use) at the sink table's line, a
    /// source mistake (no `node`, unreadable secrets) at the source table's line. Creates no
    /// file and connects nowhere, so a runner builds every pipeline of a file before it
    /// starts any.
    pub fn build(
        &self,
        host: Option<HostNode<'_>>,
    ) -> Result<(PipelineConfig, Box<dyn Sink>), ConfigError> {
        let at = |line: usize, message: String| ConfigError {
            file: self.file.clone(),
            line,
            message,
        };
        let sink = self.sink().map_err(|e| {
            at(
                self.line,
                format!("pipeline `{}`: {}", self.name, e.message()),
            )
        })?;
        let cfg = self
            .pipeline_config(host)
            .map_err(|m| at(self.source_line, m))?;
        Ok((cfg, sink))
    }

    /// The pipeline's sink, not yet opened.
    pub fn sink(&self) -> Result<Box<dyn Sink>, SinkError> {
        Ok(match &self.sink {
            SinkConfig::Postgres(c) => Box::new(PostgresSink::new(c.clone(), &self.name)?),
            SinkConfig::Redis(c) => Box::new(RedisSink::new(c.clone(), &self.name)?),
            SinkConfig::Nats(c) => Box::new(NatsSink::new(c.clone(), &self.name)?),
            SinkConfig::Webhook(c) => Box::new(WebhookSink::new(c.clone(), &self.name)?),
            SinkConfig::File(c) => Box::new(FileSink::new(c.clone(), &self.name)?),
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod secret_tests;

#[cfg(test)]
mod load_tests;
