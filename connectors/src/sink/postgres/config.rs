//! The `[sink]` keys of a PostgreSQL pipeline (`kind = "postgres"`), documented in
//! `docs/OPERATIONS.md` ("Connectors").

use std::collections::BTreeMap;

use serde::Deserialize;

/// Settings of the PostgreSQL sink: the keys of a pipeline's `[sink]` table besides `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Where to connect: a URL (`postgres://user:password@host:5432/db`) or libpq key=value
    /// text (`host=127.0.0.1 user=postgres dbname=test`). No TLS: use it on loopback or a
    /// private network.
    pub url: String,
    /// Schema of the tables (default `public`; created if absent).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Table name per tree; `{tree}` stands for the tree's name (default `{tree}`). The name
    /// is quoted, so case and punctuation are kept; at most 63 bytes (PostgreSQL's limit).
    #[serde(default = "default_table")]
    pub table: String,
    /// What a tree dropped at the source does to its table: `truncate` (default: the table
    /// and its grants stay, empty) or `drop`.
    #[serde(default)]
    pub on_drop_tree: OnDropTree,
    /// How rows reach a table: `unnest` (default: one multi-row `INSERT ... SELECT FROM
    /// unnest(arrays) ON CONFLICT` per tree and batch) or `copy` (binary `COPY` into a
    /// temporary table, then one `INSERT ... SELECT ... ON CONFLICT`). See
    /// docs/benchmarks.md for what each achieves.
    #[serde(default)]
    pub method: WriteMethod,
    /// Extra `text` columns filled from JSON values: column name → JSON pointer
    /// (`email = "/email"`). A string is stored as its text, any other JSON value as its JSON
    /// text; a value that is not JSON, or lacks the field, leaves the column NULL.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Give up connecting after this many milliseconds (default 5000); the pipeline retries.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// What a dropped tree does to its table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDropTree {
    /// `TRUNCATE` the table.
    #[default]
    Truncate,
    /// `DROP TABLE`.
    Drop,
}

/// How rows reach a table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMethod {
    /// One multi-row statement over arrays (`unnest`).
    #[default]
    Unnest,
    /// Binary COPY into a temporary table, then one merge statement.
    Copy,
}

fn default_schema() -> String {
    "public".into()
}

fn default_table() -> String {
    "{tree}".into()
}

fn default_connect_timeout_ms() -> u64 {
    5000
}

impl PostgresConfig {
    /// A configuration with the defaults and `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: default_schema(),
            table: default_table(),
            on_drop_tree: OnDropTree::default(),
            method: WriteMethod::default(),
            columns: BTreeMap::new(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }
}
