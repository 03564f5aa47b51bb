//! The Redis sink: a key per row by a template, each batch and its position in one transaction.
//!
//! Mapping (docs/OPERATIONS.md, "Connectors"): the row `key` of `tree` is the Redis key
//! `key` template with `{tree}` and `{key}` replaced (default `{tree}:{key}`; bytes are kept
//! as they are, so binary keys and values need no encoding). Put → `SET`; delete → `DEL`;
//! merge → the tree's merge operator applied to the stored value and `SET` (the stored values
//! are read after `WATCH`ing them, so a change by anyone else between the read and `EXEC`
//! makes the transaction fail and the batch is tried again); bootstrap chunk → its rows
//! `SET` (Redis cannot remove a key range; a copy runs only into a sink that holds none of
//! the pipeline's rows, or that first deleted the keys of the trees an interrupted copy
//! wrote: [`Sink::begin_copy`], held for an operator when a template that begins with
//! `{key}` cannot tell them from other data); tree dropped → its keys (found with `SCAN
//! MATCH` on the template, and those the batch wrote before the drop) deleted in the batch's
//! transaction. Positions (`tideline:position:*`) are never data: a drop's scan leaves them,
//! and a row whose key renders to one holds the pipeline instead of being written. A merge
//! in a later step of a batch (after a `create_tree`, a drop or a chunk) applies to what the
//! batch wrote before it, carried in memory: the batch's transaction is one step for Redis.
//!
//! Exactly once: every batch is one Redis transaction that also `SET`s
//! `tideline:position:{pipeline}` to the checkpoint; Redis applies it whole or not at all. The
//! stored position is checked in the same step: the one this sink last read or wrote → the
//! batch is written; the batch's own → the batch had been applied and only the answer was
//! lost, so it is not applied again; any other → another writer moved it, `Fatal`. A batch
//! without merges is one Lua script that checks and writes (one round trip); a batch with
//! merges `WATCH`es the position with the merged keys, reads them, then sends its
//! `MULTI ... EXEC`, which fails if any of them changed meanwhile and is tried again. (What
//! survives a crash of Redis itself is Redis's persistence setting: with AOF
//! `appendfsync always` a transaction is durable when it answers.)
//!
//! Errors: refused, reset or timed-out connections and a loading or read-only server →
//! `Retry`; refused credentials or missing ACL permissions → `Hold` with what to do.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde::Deserialize;

use template::Template;

use crate::sink::fold::{self, Final, Operators, Step};
use crate::sink::{Batch, EarlierCopy, Sink, SinkError, SinkFuture};

mod clear;
mod template;

/// Where every pipeline keeps its position: `tideline:position:{pipeline}`. No data key is
/// ever written there, and no drop or clear deletes one (a tree named `tideline` under the
/// default template `{tree}:{key}` would match them all).
const POSITION_PREFIX: &[u8] = b"tideline:position:";

/// One write of a batch: a Redis key and its new value (`None`: deleted).
type Write = (Vec<u8>, Option<Vec<u8>>);

/// How often a batch whose watched keys changed under it is tried again at once.
const WATCH_TRIES: usize = 5;

/// Batches without merges of at most this many writes go as one script ([`WRITE_SCRIPT`]):
/// one round trip instead of two. Larger ones go as MULTI/EXEC after a `WATCH` of the
/// position, as batches with merges do: a script's `redis.call` per key costs more than the
/// round trip saved once a batch holds thousands of writes (`docs/benchmarks.md`, "One writer
/// per pipeline").
const SCRIPT_OPS_MAX: usize = 2048;

/// A batch without merges, checked and written in one step. `KEYS[1]`: the position;
/// `KEYS[2..]`: the batch's keys in order. `ARGV`: `1` when a position is expected, the
/// expected position, the batch's checkpoint, `1` to store it; then for each key of
/// `KEYS[2..]` `S` and its value, or `D` and an empty string. Returns 0 when written, 1 when
/// the position already is the batch's checkpoint (stored before; its answer was lost), 2
/// when it is neither (another writer moved it). Scripts run atomically.
const WRITE_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
local want = false
if ARGV[1] == '1' then want = ARGV[2] end
if cur ~= want then
  if cur == ARGV[3] then return 1 end
  return 2
end
for i = 2, #KEYS do
  if ARGV[2 * i + 1] == 'S' then
    redis.call('SET', KEYS[i], ARGV[2 * i + 2])
  else
    redis.call('DEL', KEYS[i])
  end
end
if ARGV[4] == '1' then redis.call('SET', KEYS[1], ARGV[3]) end
return 0
";

/// Settings of the Redis sink: the keys of a pipeline's `[sink]` table besides `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// Where to connect: `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// The Redis key of a row: `{tree}` and `{key}` stand for the tree's name and the row's
    /// key (default `{tree}:{key}`). Must contain `{key}`.
    #[serde(default = "default_key")]
    pub key: String,
    /// Give up connecting after this many milliseconds (default 5000); the pipeline retries.
    #[serde(default = "default_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Give up on an answer after this many milliseconds (default 30000): a batch's
    /// transaction is one answer.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
}

fn default_key() -> String {
    "{tree}:{key}".into()
}

fn default_timeout_ms() -> u64 {
    5000
}

fn default_response_timeout_ms() -> u64 {
    30_000
}

impl RedisConfig {
    /// A configuration with the defaults and `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            key: default_key(),
            connect_timeout_ms: default_timeout_ms(),
            response_timeout_ms: default_response_timeout_ms(),
        }
    }
}

/// The Redis sink; see the module docs.
pub struct RedisSink {
    client: redis::Client,
    cfg: RedisConfig,
    template: Template,
    position_key: String,
    /// `CLIENT SETNAME`: `tideline:{pipeline}` (no spaces allowed).
    client_name: String,
    describe: String,
    conn: Option<MultiplexedConnection>,
    operators: Operators,
    /// The position as this sink last read or wrote it (`open`, a stored batch): a batch is
    /// written only while the stored one is still this (see the module docs).
    expected: Option<Vec<u8>>,
}

impl RedisSink {
    /// A sink for `pipeline` (its position key `tideline:position:{pipeline}`). Checks the
    /// settings; connects only in [`Sink::open`].
    pub fn new(cfg: RedisConfig, pipeline: &str) -> Result<RedisSink, SinkError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| {
            SinkError::Fatal(format!(
                "sink url: {e}; write redis://[USER:PASSWORD@]HOST:PORT[/DB]"
            ))
        })?;
        let template = Template::parse(&cfg.key)?;
        let info = client.get_connection_info();
        let describe = format!("redis {}/{}", info.addr(), info.redis_settings().db());
        Ok(RedisSink {
            client,
            cfg,
            template,
            position_key: format!("{}{pipeline}", String::from_utf8_lossy(POSITION_PREFIX)),
            client_name: format!("tideline:{}", pipeline.replace(char::is_whitespace, "_")),
            describe,
            conn: None,
            operators: Operators::default(),
            expected: None,
        })
    }

    async fn connect(&mut self) -> Result<MultiplexedConnection, SinkError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(
                self.cfg.connect_timeout_ms.max(1),
            )))
            .set_response_timeout(Some(Duration::from_millis(
                self.cfg.response_timeout_ms.max(1),
            )));
        let c = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|e| classify(&e, "connect"))?;
        // Named, so that an operator finds the pipeline in CLIENT LIST; a server whose ACL
        // forbids CLIENT SETNAME still serves the sink.
        let mut named = c.clone();
        let _ = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&self.client_name)
            .query_async::<()>(&mut named)
            .await;
        self.conn = Some(c.clone());
        Ok(c)
    }

    async fn open_inner(&mut self) -> Result<Option<Vec<u8>>, SinkError> {
        let mut con = self.connect().await?;
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&self.position_key)
            .query_async(&mut con)
            .await
            .map_err(|e| classify(&e, "read the position"))?;
        self.expected.clone_from(&v);
        Ok(v)
    }

    async fn write_inner(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let steps = fold::fold(batch, &mut self.operators)?;
        let mut con = self.connect().await?;
        // A dropped tree's keys, found before the transaction.
        let mut drops: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
        for step in &steps {
            if let Step::Drop(tree) = step
                && !drops.contains_key(tree)
            {
                let keys = self.scan(&mut con, tree).await?;
                drops.insert(tree.clone(), keys);
            }
        }
        // Keys whose stored value a merge needs: those not dropped earlier in the batch.
        let mut watched: Vec<Vec<u8>> = Vec::new();
        let mut dropped: HashSet<&str> = HashSet::new();
        for step in &steps {
            match step {
                Step::Drop(t) => {
                    dropped.insert(t);
                }
                Step::Run(run) => {
                    for (tree, rows) in &run.trees {
                        if dropped.contains(tree.as_str()) {
                            continue;
                        }
                        for (k, f) in rows {
                            if matches!(f, Final::Merges(_)) {
                                watched.push(self.data_key(tree, k)?);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        watched.sort();
        watched.dedup();
        let apart = crate::sink::position_apart();
        // Without merges the writes do not depend on anything read: worked out once.
        let mut plain = watched
            .is_empty()
            .then(|| self.batch_ops(&steps, &drops, &HashMap::new()))
            .transpose()?;
        if let Some(ops) = plain.take_if(|ops| ops.len() <= SCRIPT_OPS_MAX) {
            // Nothing to read first: the check and the batch are one script, one round trip.
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(WRITE_SCRIPT)
                .arg(1 + ops.len())
                .arg(&self.position_key);
            for (key, _) in &ops {
                cmd.arg(key);
            }
            cmd.arg(if self.expected.is_some() { "1" } else { "0" })
                .arg(self.expected.as_deref().unwrap_or_default())
                .arg(&batch.checkpoint)
                .arg(if apart { "0" } else { "1" });
            for (_, value) in &ops {
                match value {
                    Some(v) => cmd.arg("S").arg(v),
                    None => cmd.arg("D").arg(""),
                };
            }
            let outcome: i64 = cmd
                .query_async(&mut con)
                .await
                .map_err(|e| classify(&e, "write the batch"))?;
            return match outcome {
                0 => {
                    if apart {
                        self.store_position_apart(&mut con, &batch.checkpoint)
                            .await?;
                    }
                    Ok(())
                }
                1 => {
                    self.already_stored();
                    Ok(())
                }
                _ => Err(self.moved()),
            };
        }
        // Merges read stored values (and a large batch goes as MULTI/EXEC): the position is
        // watched and read with them, so that EXEC fails if anyone moves any of them between
        // this read and the batch.
        watched.insert(0, self.position_key.clone().into_bytes());
        for _ in 0..WATCH_TRIES {
            let (values,): (Vec<Option<Vec<u8>>>,) = redis::pipe()
                .cmd("WATCH")
                .arg(&watched)
                .ignore()
                .cmd("MGET")
                .arg(&watched)
                .query_async(&mut con)
                .await
                .map_err(|e| classify(&e, "watch and read the position and merged keys"))?;
            let mut values = values.into_iter();
            let position = values.next().flatten();
            if position != self.expected {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut con).await;
                if position.as_deref() == Some(batch.checkpoint.as_slice()) {
                    self.already_stored();
                    return Ok(());
                }
                return Err(self.moved());
            }
            let resolved;
            let ops = match &plain {
                Some(ops) => ops,
                None => {
                    let stored: HashMap<Vec<u8>, Vec<u8>> = watched[1..]
                        .iter()
                        .zip(values)
                        .filter_map(|(k, v)| Some((k.clone(), v?)))
                        .collect();
                    resolved = self.batch_ops(&steps, &drops, &stored)?;
                    &resolved
                }
            };
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (key, value) in ops {
                match value {
                    Some(v) => pipe.cmd("SET").arg(key).arg(v).ignore(),
                    None => pipe.cmd("DEL").arg(key).ignore(),
                };
            }
            if apart {
                // Canary only (feature `testing`): the position goes in a step of its own.
                pipe.cmd("PING");
            } else {
                pipe.cmd("SET")
                    .arg(&self.position_key)
                    .arg(&batch.checkpoint);
            }
            let r: Option<(redis::Value,)> = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| classify(&e, "write the batch"))?;
            if r.is_some() {
                if apart {
                    self.store_position_apart(&mut con, &batch.checkpoint)
                        .await?;
                }
                return Ok(());
            }
            // EXEC answered nil: a watched key changed between the read and EXEC.
            tracing::debug!(sink = %self.describe, "a merged key changed under the batch; again");
        }
        Err(SinkError::Retry(format!(
            "redis: keys this pipeline merges into kept changing under it ({WATCH_TRIES} tries); \
             is another writer using the same keys (the sink's `key` template)?"
        )))
    }

    /// The batch's writes in order: each Redis key and its new value (`None`: deleted), with
    /// merges resolved against `stored` and a dropped tree's keys (`drops`) deleted.
    ///
    /// A batch of several steps is applied as one transaction, so a later step sees what the
    /// earlier ones wrote, not `stored` (read before the transaction): each key's value is
    /// carried forward in memory from run to run, and a drop also deletes the keys of its tree
    /// that the batch wrote before it (they were not in Redis yet when `drops` was scanned).
    /// A row whose key renders onto a pipeline's position refuses the batch ([`Self::data_key`]).
    fn batch_ops(
        &self,
        steps: &[Step],
        drops: &HashMap<String, Vec<Vec<u8>>>,
        stored: &HashMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Vec<Write>, SinkError> {
        let mut ops = Vec::new();
        // Keys of a tree dropped earlier in this batch hold nothing any more.
        let mut dropped: HashSet<&str> = HashSet::new();
        // Only a run followed by another run or a drop needs what it wrote remembered (most
        // batches are one run).
        let carry = steps
            .iter()
            .skip_while(|s| !matches!(s, Step::Run(_)))
            .skip(1)
            .any(|s| matches!(s, Step::Run(_) | Step::Drop(_)));
        // Each key's value as the batch left it so far, and the keys each tree wrote.
        let mut carried: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut written: HashMap<&str, Vec<Vec<u8>>> = HashMap::new();
        for step in steps {
            match step {
                Step::Create(_) | Step::ClearRange { .. } => {}
                Step::Drop(tree) => {
                    dropped.insert(tree);
                    let scanned = &drops[tree];
                    ops.extend(scanned.iter().map(|k| (k.clone(), None)));
                    for key in written.remove(tree.as_str()).unwrap_or_default() {
                        let Some(v) = carried.get_mut(&key) else {
                            continue;
                        };
                        // Already absent, or deleted with the scanned keys: nothing to add.
                        if v.take().is_some() && scanned.binary_search(&key).is_err() {
                            ops.push((key, None));
                        }
                    }
                }
                Step::Run(run) => {
                    for (tree, rows) in &run.trees {
                        let gone = dropped.contains(tree.as_str());
                        for (k, f) in rows {
                            let key = self.data_key(tree, k)?;
                            let value = match carried.get(&key) {
                                Some(v) => f.resolve(v.as_deref()),
                                None if gone => f.resolve(None),
                                None => f.resolve(stored.get(&key).map(Vec::as_slice)),
                            };
                            if carry {
                                carried.insert(key.clone(), value.clone());
                                written.entry(tree).or_default().push(key.clone());
                            }
                            ops.push((key, value));
                        }
                    }
                }
            }
        }
        Ok(ops)
    }

    /// The Redis key of row `key` of `tree`, refused (`Hold`) when it renders into the
    /// positions' namespace (tree `tideline`, key `position:Q` under `{tree}:{key}`): written,
    /// it would replace pipeline Q's position.
    fn data_key(&self, tree: &str, key: &[u8]) -> Result<Vec<u8>, SinkError> {
        let rendered = self.template.key(tree, key);
        if rendered.starts_with(POSITION_PREFIX) {
            return Err(SinkError::Hold(format!(
                "redis: a row of tree `{tree}` renders to Redis key `{}`, where pipelines keep \
                 their positions (`{}NAME`), and is not written. Change the sink's `key` \
                 template (now `{}`) so that no row renders there (e.g. \
                 \"data:{{tree}}:{{key}}\"; keys written under the old one stay), or leave the \
                 tree or key out of the pipeline (`trees`, `prefix`)",
                String::from_utf8_lossy(&rendered),
                String::from_utf8_lossy(POSITION_PREFIX),
                self.cfg.key
            )));
        }
        Ok(rendered)
    }

    /// Canary only (feature `testing`): the position stored in a step of its own, after the
    /// data.
    async fn store_position_apart(
        &self,
        con: &mut MultiplexedConnection,
        checkpoint: &[u8],
    ) -> Result<(), SinkError> {
        tokio::time::sleep(Duration::from_millis(30)).await;
        redis::cmd("SET")
            .arg(&self.position_key)
            .arg(checkpoint)
            .query_async::<()>(con)
            .await
            .map_err(|e| classify(&e, "store the position"))
    }

    fn already_stored(&self) {
        tracing::info!(sink = %self.describe, "batch already stored (its answer was lost with the connection); not applying it again");
    }

    fn moved(&self) -> SinkError {
        crate::sink::position_moved(&format!("redis: the position `{}`", self.position_key))
    }

    /// The keys of dropped `tree`: those its pattern matches, never a pipeline's position.
    async fn scan(
        &self,
        con: &mut MultiplexedConnection,
        tree: &str,
    ) -> Result<Vec<Vec<u8>>, SinkError> {
        let mut keys = scan(con, &self.template.pattern(tree)).await?;
        keys.retain(|k| !k.starts_with(POSITION_PREFIX));
        Ok(keys)
    }
}

/// Every key matching `pattern` (`SCAN MATCH`), sorted, each once.
async fn scan(con: &mut MultiplexedConnection, pattern: &[u8]) -> Result<Vec<Vec<u8>>, SinkError> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .map_err(|e| {
                classify(
                    &e,
                    &format!(
                        "scan the keys matching `{}`",
                        String::from_utf8_lossy(pattern)
                    ),
                )
            })?;
        keys.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// What a Redis error means for the pipeline.
fn classify(e: &redis::RedisError, doing: &str) -> SinkError {
    use redis::{ErrorKind, ServerErrorKind};
    let msg = format!("redis: {doing}: {e}");
    if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() || e.is_connection_dropped() {
        return SinkError::Retry(msg);
    }
    match e.kind() {
        ErrorKind::AuthenticationFailed => {
            SinkError::Hold(format!("{msg}; fix the user or password in the sink's url"))
        }
        ErrorKind::Server(ServerErrorKind::NoPerm) => SinkError::Hold(format!(
            "{msg}; give the sink's user the GET, SET, DEL, MGET, WATCH, UNWATCH, MULTI, EXEC, \
             EVAL and SCAN commands on its keys"
        )),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ExecAbort,
        ) => SinkError::Retry(msg),
        ErrorKind::Io | ErrorKind::Parse => SinkError::Retry(msg),
        _ if e.is_unrecoverable_error() => SinkError::Retry(msg),
        _ => SinkError::Hold(format!(
            "{msg}; see docs/OPERATIONS.md (\"Connectors\") for the Redis sink's mapping"
        )),
    }
}

impl Sink for RedisSink {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn open(&mut self) -> SinkFuture<'_, Result<Option<Vec<u8>>, SinkError>> {
        Box::pin(async move {
            let r = self.open_inner().await;
            if r.is_err() {
                self.conn = None;
            }
            r
        })
    }

    fn write<'a>(&'a mut self, batch: &'a Batch) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let r = self.write_inner(batch).await;
            if r.is_ok() {
                self.expected = Some(batch.checkpoint.clone());
            }
            if r.is_err() {
                // Also clears a WATCH left by a failed attempt.
                self.conn = None;
            }
            r
        })
    }

    fn begin_copy<'a>(
        &'a mut self,
        checkpoint: &'a [u8],
        earlier: &'a EarlierCopy,
    ) -> SinkFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let r = self.begin_copy_inner(checkpoint, earlier).await;
            if r.is_err() {
                // Also clears a WATCH left by a failed attempt.
                self.conn = None;
            }
            r
        })
    }

    fn set_merge_operators(&mut self, operators: &BTreeMap<String, String>) {
        self.operators.learn_from_source(operators);
    }

    fn set_source_trees(&mut self, trees: &std::collections::BTreeSet<String>, as_of_offset: u64) {
        self.operators.learn_source_trees(trees, as_of_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_template_renders_bytes_and_its_scan_pattern_escapes_globs() {
        let mut cfg = RedisConfig::new("redis://127.0.0.1:6379");
        cfg.key = "app:{tree}/{key}".into();
        let s = RedisSink::new(cfg, "p").unwrap();
        assert_eq!(s.template.key("users", b"u\xff1"), b"app:users/u\xff1");
        assert_eq!(s.template.pattern("a*b"), b"app:a\\*b/*");
        assert_eq!(s.position_key, "tideline:position:p");
    }

    fn txn(ops: Vec<tideline_wal::Op>) -> crate::sink::Item {
        crate::sink::Item::Txn(tideline_wal::Transaction {
            offset: tideline_wal::Offset::new(1).unwrap(),
            gtid: tideline_wal::Gtid::new(uuid::Uuid::nil(), 1).unwrap(),
            timestamp_us: 0,
            ops,
        })
    }

    fn put(tree: &str, key: &str, value: &str) -> tideline_wal::Op {
        tideline_wal::Op::Put {
            tree: tree.into(),
            key: key.into(),
            value: value.into(),
            before: None,
        }
    }

    /// The value `key` is left with by `ops` (the last write wins), `None` when none writes it.
    fn last<'a>(ops: &'a [(Vec<u8>, Option<Vec<u8>>)], key: &str) -> Option<Option<&'a [u8]>> {
        ops.iter()
            .rev()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_deref())
    }

    /// Runs of one batch are one transaction: a merge in a later run (after a bootstrap chunk
    /// or a `create_tree`) starts from what an earlier run wrote, not from the value read
    /// before the batch; a drop deletes the keys of its tree written earlier in the batch,
    /// which its SCAN (before the batch) could not find.
    #[test]
    fn later_runs_see_what_earlier_runs_of_the_batch_wrote() {
        let s = RedisSink::new(RedisConfig::new("redis://127.0.0.1:6379"), "p").unwrap();
        let mut operators = Operators::default();
        operators.learn_from_source(&BTreeMap::from([("cnt".into(), "add".into())]));
        let merge = |key: &str, n: &str| tideline_wal::Op::Merge {
            tree: "cnt".into(),
            key: key.into(),
            operand: n.into(),
        };
        let batch = Batch {
            source: uuid::Uuid::nil(),
            items: vec![
                txn(vec![put("cnt", "a", "5"), put("t", "new", "1")]),
                crate::sink::Item::Chunk {
                    tree: "cnt".into(),
                    merge_operator: Some("add".into()),
                    from: b"m".to_vec(),
                    to: None,
                    entries: tideline_wal::PackedEntries::from_pairs(vec![(
                        b"m".to_vec(),
                        b"1".to_vec(),
                    )])
                    .unwrap(),
                },
                txn(vec![
                    merge("a", "2"),
                    merge("b", "1"),
                    tideline_wal::Op::DropTree { tree: "t".into() },
                    tideline_wal::Op::CreateTree {
                        tree: "x".into(),
                        merge_operator: None,
                    },
                    merge("a", "3"),
                    put("t", "again", "2"),
                ]),
            ],
            checkpoint: vec![],
        };
        let steps = fold::fold(&batch, &mut operators).unwrap();
        let drops = HashMap::from([("t".to_string(), vec![b"t:old".to_vec()])]);
        let stored = HashMap::from([
            (b"cnt:a".to_vec(), b"100".to_vec()),
            (b"cnt:b".to_vec(), b"10".to_vec()),
        ]);
        let ops = s.batch_ops(&steps, &drops, &stored).unwrap();
        assert_eq!(last(&ops, "cnt:a"), Some(Some(&b"10"[..])), "{ops:?}");
        assert_eq!(last(&ops, "cnt:b"), Some(Some(&b"11"[..])), "{ops:?}");
        assert_eq!(last(&ops, "cnt:m"), Some(Some(&b"1"[..])), "{ops:?}");
        assert_eq!(last(&ops, "t:old"), Some(None), "{ops:?}");
        assert_eq!(last(&ops, "t:new"), Some(None), "{ops:?}");
        assert_eq!(last(&ops, "t:again"), Some(Some(&b"2"[..])), "{ops:?}");
        // One run: nothing carried, merges on what Redis held.
        let one = fold::fold(
            &Batch {
                source: uuid::Uuid::nil(),
                items: vec![txn(vec![merge("a", "2")])],
                checkpoint: vec![],
            },
            &mut operators,
        )
        .unwrap();
        let ops = s.batch_ops(&one, &HashMap::new(), &stored).unwrap();
        assert_eq!(ops, [(b"cnt:a".to_vec(), Some(b"102".to_vec()))]);
    }

    #[test]
    fn bad_settings_are_refused_before_any_connection() {
        let mut cfg = RedisConfig::new("redis://127.0.0.1:6379");
        cfg.key = "{tree}".into();
        let e = RedisSink::new(cfg, "p").err().expect("refused");
        assert!(e.message().contains("{key}"), "{e}");
        let e = RedisSink::new(RedisConfig::new("http://x"), "p")
            .err()
            .expect("refused");
        assert!(e.message().contains("sink url"), "{e}");
    }
}
