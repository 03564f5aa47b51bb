//! The PostgreSQL sink: one table per tree, each batch and its position in one transaction.
//!
//! Mapping (docs/OPERATIONS.md, "Connectors"): tree `t` → table `"schema"."t"` (the `table`
//! template), created if absent as
//! `(key text COLLATE "C" PRIMARY KEY, value jsonb, value_bytes bytea, <mapped columns> text)`.
//! A value that is JSON goes to `value` (jsonb: PostgreSQL keeps its meaning, not its
//! spacing or key order), any other value to `value_bytes`; the other column is NULL, except
//! that a tree with a merge operator keeps a JSON value's exact bytes in `value_bytes` too
//! when jsonb's text is not them (`rows`). A key must be UTF-8 text without NUL (the primary
//! key is `text`), and short enough for its btree: any other key holds the pipeline with an
//! error naming it. Put → upsert; delete → delete; merge → the tree's merge operator applied
//! to the stored value's exact bytes (read with `SELECT ... FOR UPDATE` in the same
//! transaction) and upserted; bootstrap chunk → its rows upserted and the range's other rows
//! deleted (`key >= from AND key < to`, compared bytewise with `COLLATE "C"`); a copy that
//! starts again from scratch → the tables of the trees the interrupted copy wrote truncated
//! with its first position ([`Sink::begin_copy`]); tree created → table created; tree dropped
//! → table truncated (or dropped: `on_drop_tree`).
//!
//! Exactly once: every batch is one transaction that also upserts the pipeline's row of
//! `tideline_positions(pipeline, checkpoint, updated_at)`; a crash before `COMMIT` leaves
//! neither rows nor position, one after leaves both. One session at a time writes a
//! pipeline: each connection takes the pipeline's advisory lock, so a new connector waits
//! (retrying, shown in `status`) until the session of one killed mid-commit has ended. The
//! position's upsert only moves it from the one this sink last read or wrote (a compare and
//! set in its `WHERE`); otherwise the batch is rolled back and the stored one says why: the
//! batch's own → it had committed and only the answer was lost, so it is not applied again;
//! any other → another writer moved it, `Fatal`.
//!
//! Errors: an unreachable, restarting or reset server, a serialization failure or deadlock →
//! `Retry`; refused credentials, a missing database or privilege, a table whose columns do
//! not fit, a key that is not text → `Hold` with what to do. A failed batch is rolled back and
//! the connection dropped; the next try reconnects.

mod config;
mod lock;
mod rows;

pub use config::{OnDropTree, PostgresConfig, WriteMethod};

use lock::lock_pipeline;
use rows::write_rows;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement, Transaction};

use crate::sink::fold::{self, Operators, Step};
use crate::sink::{Batch, EarlierCopy, Sink, SinkError, SinkFuture};

/// PostgreSQL's longest identifier, in bytes; longer names are silently cut by the server.
const IDENT_BYTES_MAX: usize = 63;

/// The PostgreSQL sink; see the module docs.
pub struct PostgresSink {
    cfg: PostgresConfig,
    pg: tokio_postgres::Config,
    pipeline: String,
    describe: String,
    /// Mapped columns, in order: (quoted name, JSON pointer).
    columns: Vec<(String, String)>,
    conn: Option<Conn>,
    operators: Operators,
    /// The checkpoint stored as this sink last read or wrote it (`open`, a committed batch):
    /// a batch's upsert moves the stored one only from this (see the module docs).
    expected: Option<Vec<u8>>,
}

/// One connection and what it has prepared.
struct Conn {
    client: Client,
    stmts: HashMap<String, Statement>,
    /// Tables known to exist with the mapped columns (reset with the connection).
    tables: HashSet<String>,
    /// The COPY staging table exists in this session.
    staged: bool,
}

impl PostgresSink {
    /// A sink for `pipeline` (its row in `tideline_positions`). Checks the settings; connects
    /// only in [`Sink::open`].
    pub fn new(cfg: PostgresConfig, pipeline: &str) -> Result<PostgresSink, SinkError> {
        let mut pg: tokio_postgres::Config = cfg.url.parse().map_err(|e| {
            SinkError::Fatal(format!(
                "sink url: {e}; write postgres://USER[:PASSWORD]@HOST:PORT/DATABASE"
            ))
        })?;
        pg.connect_timeout(Duration::from_millis(cfg.connect_timeout_ms.max(1)));
        if pg.get_application_name().is_none() {
            pg.application_name(format!("tideline {pipeline}"));
        }
        if !cfg.table.contains("{tree}") {
            return Err(SinkError::Fatal(format!(
                "sink table `{}` does not contain `{{tree}}`: every tree would write one table",
                cfg.table
            )));
        }
        let mut columns = Vec::new();
        for (name, pointer) in &cfg.columns {
            if ["key", "value", "value_bytes"].contains(&name.as_str()) {
                return Err(SinkError::Fatal(format!(
                    "sink column `{name}` is one of the sink's own columns (key, value, \
                     value_bytes); choose another name"
                )));
            }
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return Err(SinkError::Fatal(format!(
                    "sink column `{name}`: `{pointer}` is not a JSON pointer; write it like \
                     \"/email\" or \"/address/city\""
                )));
            }
            columns.push((quote_ident(name), pointer.clone()));
        }
        let describe = describe(&pg);
        Ok(PostgresSink {
            cfg,
            pg,
            pipeline: pipeline.to_owned(),
            describe,
            columns,
            conn: None,
            operators: Operators::default(),
            expected: None,
        })
    }

    async fn connect(&mut self) -> Result<&mut Conn, SinkError> {
        if self.conn.is_none() {
            let (client, connection) = self
                .pg
                .connect(NoTls)
                .await
                .map_err(|e| classify(&e, "connect"))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "postgres connection ended");
                }
            });
            // The server notices a connector host that died (not only a process) within ~30 s
            // rather than the system's two hours, and ends its session, freeing the pipeline.
            // Ignored where it does not apply (a Unix socket).
            let _ = client
                .batch_execute(
                    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; \
                     SET tcp_keepalives_count = 4",
                )
                .await;
            lock_pipeline(&client, &self.cfg.schema, &self.pipeline).await?;
            self.conn = Some(Conn {
                client,
                stmts: HashMap::new(),
                tables: HashSet::new(),
                staged: false,
            });
        }
        Ok(self.conn.as_mut().expect("set just above"))
    }

    fn positions_table(&self) -> String {
        format!("{}.\"tideline_positions\"", quote_ident(&self.cfg.schema))
    }

    fn table(&self, tree: &str) -> Result<String, SinkError> {
        let name = self.cfg.table.replace("{tree}", tree);
        if name.len() > IDENT_BYTES_MAX {
            return Err(SinkError::Hold(format!(
                "tree `{tree}` maps to table `{name}`, longer than PostgreSQL's {IDENT_BYTES_MAX} \
                 bytes; shorten the sink's `table` template or leave the tree out (`trees`)"
            )));
        }
        Ok(format!(
            "{}.{}",
            quote_ident(&self.cfg.schema),
            quote_ident(&name)
        ))
    }

    async fn open_inner(&mut self) -> Result<Option<Vec<u8>>, SinkError> {
        let schema = quote_ident(&self.cfg.schema);
        let positions = self.positions_table();
        let pipeline = self.pipeline.clone();
        let conn = self.connect().await?;
        if schema != "\"public\"" {
            conn.client
                .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await
                .map_err(|e| classify(&e, "create the schema"))?;
        }
        conn.client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {positions} (pipeline text PRIMARY KEY, checkpoint \
                 bytea NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
            ))
            .await
            .map_err(|e| classify(&e, "create tideline_positions"))?;
        let stored = read_position(&conn.client, &positions, &pipeline).await?;
        self.expected.clone_from(&stored);
        Ok(stored)
    }

    async fn write_inner(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let steps = fold::fold(batch, &mut self.operators)?;
        // Table names first (a bad one holds the pipeline before anything is sent).
        let mut tables: HashMap<String, String> = HashMap::new();
        // Trees with a merge operator: their values keep their exact bytes (`rows`).
        let merging: HashSet<String> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Run(run) => Some(fold::run_trees(run)),
                _ => None,
            })
            .flatten()
            .filter(|t| self.operators.merges(t))
            .map(str::to_owned)
            .collect();
        for step in &steps {
            let trees: Vec<&str> = match step {
                Step::Create(t) | Step::Drop(t) | Step::ClearRange { tree: t, .. } => vec![t],
                Step::Run(run) => fold::run_trees(run).collect(),
            };
            for t in trees {
                if !tables.contains_key(t) {
                    tables.insert(t.to_owned(), self.table(t)?);
                }
            }
        }
        let positions = self.positions_table();
        let pipeline = self.pipeline.clone();
        let columns = self.columns.clone();
        let method = self.cfg.method;
        let on_drop = self.cfg.on_drop_tree;
        let expected = self.expected.clone();
        let conn = self.connect().await?;
        let Conn {
            client,
            stmts,
            tables: known,
            staged,
        } = conn;
        let txn = client
            .transaction()
            .await
            .map_err(|e| classify(&e, "begin"))?;
        let mut created: Vec<String> = Vec::new();
        let mut dropped: Vec<String> = Vec::new();
        for step in &steps {
            match step {
                Step::Create(tree) => {
                    let t = &tables[tree];
                    ensure_table(&txn, known, &mut created, t, &columns).await?;
                }
                Step::Run(run) => {
                    for (tree, rows) in &run.trees {
                        let t = &tables[tree];
                        ensure_table(&txn, known, &mut created, t, &columns).await?;
                        let keep_bytes = merging.contains(tree.as_str());
                        write_rows(
                            &txn, stmts, staged, t, tree, rows, &columns, method, keep_bytes,
                        )
                        .await?;
                    }
                }
                Step::ClearRange { tree, from, to } => {
                    let t = &tables[tree];
                    ensure_table(&txn, known, &mut created, t, &columns).await?;
                    let from = key_text(tree, from)?;
                    let to = to.as_deref().map(|k| key_text(tree, k)).transpose()?;
                    txn.execute(
                        &format!(
                            "DELETE FROM {t} WHERE key COLLATE \"C\" >= $1 AND ($2::text IS NULL \
                             OR key COLLATE \"C\" < $2)"
                        ),
                        &[&from, &to],
                    )
                    .await
                    .map_err(|e| classify(&e, &format!("clear a range of {t}")))?;
                }
                Step::Drop(tree) => {
                    let t = &tables[tree];
                    match on_drop {
                        OnDropTree::Drop => {
                            txn.batch_execute(&format!("DROP TABLE IF EXISTS {t}"))
                                .await
                                .map_err(|e| classify(&e, &format!("drop {t}")))?;
                            created.retain(|c| c != t);
                            dropped.push(t.clone());
                        }
                        OnDropTree::Truncate => {
                            if table_exists(&txn, t).await? {
                                txn.batch_execute(&format!("TRUNCATE {t}"))
                                    .await
                                    .map_err(|e| classify(&e, &format!("truncate {t}")))?;
                            }
                        }
                    }
                }
            }
        }
        // The position moves only from the one this sink last read or wrote (compare and
        // set in the upsert itself, no statement of its own). When it is another, nothing of
        // the batch is committed, and the stored one says why.
        let stmt = prepare(&txn, stmts, &position_upsert(&positions)).await?;
        let stored = if crate::sink::position_apart() {
            // Canary only (feature `testing`): data first, position later, apart.
            txn.commit().await.map_err(|e| classify(&e, "commit"))?;
            tokio::time::sleep(Duration::from_millis(30)).await;
            client
                .execute(&stmt, &[&pipeline, &batch.checkpoint, &expected])
                .await
                .map_err(|e| classify(&e, "store the position"))?
        } else {
            commit_with_position(txn, &stmt, &pipeline, &batch.checkpoint, &expected).await?
        };
        if stored == 0 {
            // Not the expected position: nothing of the batch was committed.
            // A staging table created by the rolled-back transaction is gone with it.
            *staged = false;
            stored_before(client, &positions, &pipeline, &batch.checkpoint).await?;
            // This batch committed before, but its answer was lost with the connection.
            tracing::info!(pipeline = %pipeline, "batch already stored (its commit's answer was lost); not applying it again");
            return Ok(());
        }
        for t in dropped {
            known.remove(&t);
        }
        known.extend(created);
        Ok(())
    }

    /// [`Sink::begin_copy`]: the tables of the trees an earlier copy wrote are emptied in one
    /// transaction with storing the new copy's checkpoint (compare and set, as a batch's):
    /// truncated, or, for a pipeline limited to a key prefix, cleared of the keys with that
    /// prefix only (the others are not the pipeline's). Emptied, not dropped, whatever
    /// `on_drop_tree` says: the tables of trees the source still has keep their grants,
    /// indexes and mapped columns, and the copy fills them again.
    async fn begin_copy_inner(
        &mut self,
        checkpoint: &[u8],
        earlier: &EarlierCopy,
    ) -> Result<(), SinkError> {
        let (trees, prefix) = match earlier {
            EarlierCopy::None => return Ok(()),
            EarlierCopy::Trees { trees, prefix } => (trees, prefix),
            EarlierCopy::Unrecorded => {
                let why = format!(
                    "the bootstrap of pipeline `{}` cannot resume and must copy again from \
                     scratch, and its tables hold rows of the interrupted copy, whose stored \
                     position (written by an earlier version) does not name its trees: empty \
                     the pipeline's tables (`table` = \"{}\" in schema `{}`) and run `DELETE \
                     FROM {} WHERE pipeline = '{}'`; the copy then starts again by itself",
                    self.pipeline,
                    self.cfg.table,
                    self.cfg.schema,
                    self.positions_table(),
                    self.pipeline.replace('\'', "''"),
                );
                return self.hold_unless_started_over(why).await;
            }
        };
        // A tree whose name makes no valid table never had one written (that holds a write).
        let tables: Vec<String> = trees.iter().filter_map(|t| self.table(t).ok()).collect();
        // A prefix that is not text matches no row (a key that is not text is never stored).
        let (tables, prefix) = match prefix.as_deref().map(std::str::from_utf8) {
            None => (tables, None),
            Some(Ok(p)) if !p.contains('\0') => (tables, Some(p.to_owned())),
            Some(_) => (Vec::new(), None),
        };
        let positions = self.positions_table();
        let pipeline = self.pipeline.clone();
        let expected = self.expected.clone();
        let conn = self.connect().await?;
        let Conn { client, stmts, .. } = conn;
        let txn = client
            .transaction()
            .await
            .map_err(|e| classify(&e, "begin"))?;
        let mut existing = Vec::new();
        for t in tables {
            if table_exists(&txn, &t).await? {
                existing.push(t);
            }
        }
        match &prefix {
            None if !existing.is_empty() => {
                let list = existing.join(", ");
                txn.batch_execute(&format!("TRUNCATE {list}"))
                    .await
                    .map_err(|e| classify(&e, &format!("truncate {list}")))?;
            }
            None => {}
            Some(p) => {
                for t in &existing {
                    txn.execute(&format!("DELETE FROM {t} WHERE starts_with(key, $1)"), &[p])
                        .await
                        .map_err(|e| classify(&e, &format!("clear {t}")))?;
                }
            }
        }
        let stmt = prepare(&txn, stmts, &position_upsert(&positions)).await?;
        if commit_with_position(txn, &stmt, &pipeline, checkpoint, &expected).await? == 0 {
            // Cleared and stored before, if so; only the commit's answer was lost.
            stored_before(client, &positions, &pipeline, checkpoint).await?;
        } else {
            tracing::warn!(pipeline = %pipeline, tables = %existing.join(", "), "emptied the tables of the interrupted copy; copying again from scratch");
        }
        self.expected = Some(checkpoint.to_vec());
        Ok(())
    }

    /// Holds the pipeline with `why`, unless its position is gone: an operator who emptied
    /// its tables and removed the position started it over, and the copy may begin.
    async fn hold_unless_started_over(&mut self, why: String) -> Result<(), SinkError> {
        let positions = self.positions_table();
        let pipeline = self.pipeline.clone();
        let conn = self.connect().await?;
        if read_position(&conn.client, &positions, &pipeline)
            .await?
            .is_none()
        {
            self.expected = None;
            return Ok(());
        }
        Err(SinkError::Hold(why))
    }
}

/// The upsert of a pipeline's position into `positions`, moving it only from the one given
/// as `$3` (`IS NOT DISTINCT FROM`: none, when the sink held none).
fn position_upsert(positions: &str) -> String {
    format!(
        "INSERT INTO {positions} (pipeline, checkpoint, updated_at) VALUES ($1, $2, now()) ON \
         CONFLICT (pipeline) DO UPDATE SET checkpoint = EXCLUDED.checkpoint, updated_at = now() \
         WHERE {positions}.checkpoint IS NOT DISTINCT FROM $3"
    )
}

/// The checkpoint stored for `pipeline` in table `positions`.
/// Stores `checkpoint` as `pipeline`'s position with the compare-and-set upsert `stmt` (from
/// `expected`) and commits `txn` with it, or rolls it all back when the stored position is
/// not `expected`. Returns the rows the upsert changed: 0, nothing was committed.
async fn commit_with_position(
    txn: tokio_postgres::Transaction<'_>,
    stmt: &tokio_postgres::Statement,
    pipeline: &str,
    checkpoint: &[u8],
    expected: &Option<Vec<u8>>,
) -> Result<u64, SinkError> {
    let n = txn
        .execute(stmt, &[&pipeline, &checkpoint, expected])
        .await
        .map_err(|e| classify(&e, "store the position"))?;
    if n == 0 {
        txn.rollback()
            .await
            .map_err(|e| classify(&e, "roll back"))?;
    } else {
        txn.commit().await.map_err(|e| classify(&e, "commit"))?;
    }
    Ok(n)
}

/// After a compare-and-set that changed nothing: `Ok` when the stored position is
/// `checkpoint` (an earlier try stored it, and only its answer was lost), the sink's
/// position-moved error when it is another writer's.
async fn stored_before(
    client: &Client,
    positions: &str,
    pipeline: &str,
    checkpoint: &[u8],
) -> Result<(), SinkError> {
    let now = read_position(client, positions, pipeline).await?;
    if now.as_deref() == Some(checkpoint) {
        return Ok(());
    }
    Err(crate::sink::position_moved(&format!(
        "the position of pipeline `{pipeline}` in {positions}"
    )))
}

/// Whether table `t` (a quoted, qualified name) exists, as `txn` sees it.
async fn table_exists(txn: &tokio_postgres::Transaction<'_>, t: &str) -> Result<bool, SinkError> {
    let found: Option<String> = txn
        .query_one("SELECT to_regclass($1)::text", &[&t])
        .await
        .map_err(|e| classify(&e, &format!("look {t} up")))?
        .get(0);
    Ok(found.is_some())
}

async fn read_position(
    client: &Client,
    positions: &str,
    pipeline: &str,
) -> Result<Option<Vec<u8>>, SinkError> {
    let row = client
        .query_opt(
            &format!("SELECT checkpoint FROM {positions} WHERE pipeline = $1"),
            &[&pipeline],
        )
        .await
        .map_err(|e| classify(&e, "read the position"))?;
    Ok(row.map(|r| r.get(0)))
}

/// `"name"` with inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn describe(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg
        .get_dbname()
        .or(pg.get_user())
        .unwrap_or("postgres")
        .to_owned();
    format!("postgres {host}:{port}/{db}")
}

/// A key as the table's `text` key, or why it cannot be one.
fn key_text<'k>(tree: &str, key: &'k [u8]) -> Result<&'k str, SinkError> {
    match std::str::from_utf8(key) {
        Ok(s) if !s.contains('\0') => Ok(s),
        _ => Err(SinkError::Hold(format!(
            "tree `{tree}` has key {}, which is not UTF-8 text without NUL and cannot be a \
             `key text` row; leave the tree or its binary keys out of this pipeline (`trees`, \
             `prefix`) or use a sink that keeps bytes (redis, file)",
            crate::sink::postgres::hex(key)
        ))),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in bytes.iter().take(64) {
        s.push_str(&format!("{b:02x}"));
    }
    if bytes.len() > 64 {
        s.push('…');
    }
    s
}

async fn prepare(
    txn: &Transaction<'_>,
    stmts: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, SinkError> {
    if let Some(s) = stmts.get(sql) {
        return Ok(s.clone());
    }
    let s = txn
        .prepare(sql)
        .await
        .map_err(|e| classify(&e, "prepare a statement"))?;
    stmts.insert(sql.to_owned(), s.clone());
    Ok(s)
}

async fn ensure_table(
    txn: &Transaction<'_>,
    known: &HashSet<String>,
    created: &mut Vec<String>,
    table: &str,
    columns: &[(String, String)],
) -> Result<(), SinkError> {
    if known.contains(table) || created.iter().any(|c| c == table) {
        return Ok(());
    }
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {table} (key text COLLATE \"C\" PRIMARY KEY, value jsonb, \
         value_bytes bytea"
    );
    for (c, _) in columns {
        sql.push_str(&format!(", {c} text"));
    }
    sql.push_str(");");
    for (c, _) in columns {
        sql.push_str(&format!(
            "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {c} text;"
        ));
    }
    txn.batch_execute(&sql)
        .await
        .map_err(|e| classify(&e, &format!("create {table}")))?;
    created.push(table.to_owned());
    Ok(())
}

/// What a PostgreSQL error means for the pipeline.
fn classify(e: &tokio_postgres::Error, doing: &str) -> SinkError {
    let Some(db) = e.as_db_error() else {
        // No SQL state: the connection failed, was refused, reset or closed.
        return SinkError::Retry(format!("postgres: {doing}: {e}"));
    };
    let code = db.code();
    let msg = format!("postgres: {doing}: {} ({})", db.message(), code.code());
    let class = &code.code()[..2];
    if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        return SinkError::Hold(format!(
            "{msg}; fix the user or password in the sink's url (and pg_hba.conf)"
        ));
    }
    if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        return SinkError::Hold(format!(
            "{msg}; grant the sink's user CREATE on the schema and INSERT, UPDATE, DELETE, \
             SELECT, TRUNCATE on its tables"
        ));
    }
    if *code == SqlState::INVALID_CATALOG_NAME {
        return SinkError::Hold(format!("{msg}; create the database or fix the sink's url"));
    }
    // A unique index of the user's on a sink table that two source keys' rows violate: a
    // data conflict no retry resolves (the sink upserts by `key`, so its own primary key never
    // is). A concurrent CREATE TABLE IF NOT EXISTS losing a race on the system catalog's own
    // unique index (`pg_type_typname_nsp_index`, ...) is a passing fault, below.
    if *code == SqlState::UNIQUE_VIOLATION && !db.constraint().is_some_and(|c| c.starts_with("pg_"))
    {
        return SinkError::Hold(format!(
            "{msg}; a unique index or constraint on the table refuses rows the source holds \
             (the source has no such constraint): drop it, or map the column elsewhere"
        ));
    }
    // 08 connection, 40 rollbacks (serialization, deadlock), 53 resources, 57 operator
    // intervention (shutdown, restart), 58 system errors; the catalog race above.
    // A table dropped behind the sink's back: the retry reconnects and creates it again.
    if ["08", "40", "53", "57", "58"].contains(&class)
        || *code == SqlState::UNIQUE_VIOLATION
        || *code == SqlState::UNDEFINED_TABLE
    {
        return SinkError::Retry(msg);
    }
    SinkError::Hold(format!(
        "{msg}; the table does not fit the sink's mapping (docs/OPERATIONS.md, \"Connectors\"): \
         fix or drop it"
    ))
}

impl Sink for PostgresSink {
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
                // The transaction was rolled back (or the server is gone): start afresh.
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
                // A transaction was rolled back (or the server is gone): start afresh.
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
    fn bad_settings_are_refused_before_any_connection() {
        for (cfg, needle) in [
            (PostgresConfig::new("postgres://h:notaport/db"), "sink url"),
            (
                {
                    let mut c = PostgresConfig::new("postgres://postgres@127.0.0.1/test");
                    c.table = "fixed".into();
                    c
                },
                "{tree}",
            ),
            (
                {
                    let mut c = PostgresConfig::new("postgres://postgres@127.0.0.1/test");
                    c.columns.insert("value".into(), "/v".into());
                    c
                },
                "own columns",
            ),
        ] {
            let e = PostgresSink::new(cfg, "p").err().expect("refused");
            assert!(e.message().contains(needle), "{e}");
        }
    }

    #[test]
    fn keys_that_are_not_text_hold_the_pipeline_naming_the_key() {
        let e = key_text("users", b"a\xffb").unwrap_err();
        assert!(
            matches!(&e, SinkError::Hold(m) if m.contains("0x61ff62") && m.contains("`users`")),
            "{e}"
        );
        assert_eq!(key_text("users", b"u1").unwrap(), "u1");
    }
}
