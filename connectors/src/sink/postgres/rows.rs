//! What happens to a tree's rows: values split into `value` (JSON) or `value_bytes`, mapped
//! columns read from the document, merges resolved against the stored rows, then deletes and
//! upserts (`unnest` or `COPY`).
//!
//! A merge starts from the value's exact bytes, as the source's does: jsonb keeps a
//! document's meaning, not its text (`{"e":1}\n` reads back as `{"e": 1}`, `1e3` as `1000`).
//! So in a tree with a merge operator, a JSON value whose jsonb text is not its exact bytes
//! also keeps them in `value_bytes` (`value` stays the jsonb view of it), and a merge reads
//! `value_bytes` first. (A row written by an earlier version, which kept only jsonb, gives
//! its jsonb text: the bytes are gone.)

use std::collections::HashMap;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Statement, Transaction};

use super::{WriteMethod, classify, hex, key_text, prepare};
use crate::sink::SinkError;
use crate::sink::fold::{Final, TreeRun};

/// PostgreSQL's largest btree index entry (8 kB pages): an insert beyond it fails with
/// SQLSTATE 54000, "index row size ... exceeds btree version 4 maximum 2704".
const BTREE_ENTRY_BYTES_MAX: usize = 2704;

/// What a key's index entry holds besides the key: the tuple header and the text's length.
const BTREE_ENTRY_OVERHEAD_BYTES: usize = 12;

/// The `value` (JSON text) or `value_bytes` of a stored value.
fn split_value(value: &[u8]) -> (Option<&str>, Option<&[u8]>, Option<serde_json::Value>) {
    if let Ok(text) = std::str::from_utf8(value)
        // jsonb refuses the NUL character; such a document is kept as bytes.
        && !text.contains("\\u0000")
        && let Ok(doc) = serde_json::from_str::<serde_json::Value>(text)
    {
        return (Some(text), None, Some(doc));
    }
    (None, Some(value), None)
}

/// A mapped column's text from a JSON document.
fn column_text(doc: Option<&serde_json::Value>, pointer: &str) -> Option<String> {
    match doc?.pointer(pointer)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) if !s.contains('\0') => Some(s.clone()),
        serde_json::Value::String(_) => None,
        v => Some(v.to_string()),
    }
}

/// Writes one tree's run: merges resolved against the stored rows, then deletes and upserts.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; the parts of a borrowed Conn"
)]
pub(super) async fn write_rows(
    txn: &Transaction<'_>,
    stmts: &mut HashMap<String, Statement>,
    staged: &mut bool,
    table: &str,
    tree: &str,
    rows: &TreeRun,
    columns: &[(String, String)],
    method: WriteMethod,
    keep_bytes: bool,
) -> Result<(), SinkError> {
    // The stored values that pending merges apply to, locked until COMMIT.
    let merge_keys: Vec<&str> = rows
        .iter()
        .filter(|(_, f)| matches!(f, Final::Merges(_)))
        .map(|(k, _)| key_text(tree, k))
        .collect::<Result<_, _>>()?;
    let mut stored: HashMap<String, Vec<u8>> = HashMap::new();
    if !merge_keys.is_empty() {
        let sql = format!(
            "SELECT key, value::text, value_bytes FROM {table} WHERE key = ANY($1::text[]) FOR \
             UPDATE"
        );
        let stmt = prepare(txn, stmts, &sql).await?;
        for r in txn
            .query(&stmt, &[&merge_keys])
            .await
            .map_err(|e| classify(&e, &format!("read merged rows of {table}")))?
        {
            let k: String = r.get(0);
            let v: Option<String> = r.get(1);
            let b: Option<Vec<u8>> = r.get(2);
            // The exact bytes where kept; jsonb's text only where it is them (or, for a row
            // of an earlier version, the best there is).
            stored.insert(k, b.or(v.map(String::into_bytes)).unwrap_or_default());
        }
    }
    let mut deletes: Vec<&str> = Vec::new();
    let mut resolved: Vec<(&str, Vec<u8>)> = Vec::new();
    for (k, f) in rows {
        let key = key_text(tree, k)?;
        let value = match f {
            Final::Value(v) => v.clone(),
            Final::Merges(_) => f.resolve(stored.get(key).map(Vec::as_slice)),
        };
        match value {
            Some(v) => resolved.push((key, v)),
            None => deletes.push(key),
        }
    }
    if !deletes.is_empty() {
        let sql = format!("DELETE FROM {table} WHERE key = ANY($1::text[])");
        let stmt = prepare(txn, stmts, &sql).await?;
        txn.execute(&stmt, &[&deletes])
            .await
            .map_err(|e| classify(&e, &format!("delete from {table}")))?;
    }
    if resolved.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<&str> = Vec::with_capacity(resolved.len());
    let mut json: Vec<Option<&str>> = Vec::with_capacity(resolved.len());
    let mut bytes: Vec<Option<&[u8]>> = Vec::with_capacity(resolved.len());
    let mut cols: Vec<Vec<Option<String>>> =
        vec![Vec::with_capacity(resolved.len()); columns.len()];
    for (k, v) in &resolved {
        let (j, b, doc) = split_value(v);
        keys.push(k);
        json.push(j);
        // Sent along for a JSON value too where merges need them; the upsert stores them only
        // when jsonb's text is not the same bytes ([`select_list`]).
        bytes.push(if keep_bytes && j.is_some() {
            Some(v.as_slice())
        } else {
            b
        });
        for (i, (_, pointer)) in columns.iter().enumerate() {
            cols[i].push(column_text(doc.as_ref(), pointer));
        }
    }
    let names: String = columns.iter().map(|(c, _)| format!(", {c}")).collect();
    let sets: String = columns
        .iter()
        .map(|(c, _)| format!(", {c} = EXCLUDED.{c}"))
        .collect();
    let conflict = format!(
        "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, value_bytes = \
         EXCLUDED.value_bytes{sets}"
    );
    match method {
        WriteMethod::Unnest => {
            let mut arrays = String::from("$1::text[], $2::text[], $3::bytea[]");
            let mut aliases = String::from("k, v, b");
            for i in 0..columns.len() {
                arrays.push_str(&format!(", ${}::text[]", i + 4));
                aliases.push_str(&format!(", c{i}"));
            }
            let sql = format!(
                "INSERT INTO {table} (key, value, value_bytes{names}) SELECT {} FROM unnest({arrays}) \
                 AS u({aliases}) {conflict}",
                select_list(columns.len())
            );
            let stmt = prepare(txn, stmts, &sql).await?;
            let mut params: Vec<&(dyn ToSql + Sync)> = vec![&keys, &json, &bytes];
            for c in &cols {
                params.push(c);
            }
            txn.execute(&stmt, &params)
                .await
                .map_err(|e| upsert_error(&e, &format!("upsert into {table}"), tree, &keys))?;
        }
        WriteMethod::Copy => {
            if !*staged {
                let mut sql = String::from(
                    "CREATE TEMP TABLE IF NOT EXISTS tideline_stage (k text, v text, b bytea",
                );
                for i in 0..columns.len() {
                    sql.push_str(&format!(", c{i} text"));
                }
                sql.push(')');
                txn.batch_execute(&sql)
                    .await
                    .map_err(|e| classify(&e, "create the staging table"))?;
            }
            let mut types = vec![Type::TEXT, Type::TEXT, Type::BYTEA];
            types.extend(std::iter::repeat_n(Type::TEXT, columns.len()));
            let sink = txn
                .copy_in("COPY tideline_stage FROM STDIN BINARY")
                .await
                .map_err(|e| classify(&e, "copy rows"))?;
            let writer = BinaryCopyInWriter::new(sink, &types);
            let mut writer = std::pin::pin!(writer);
            for i in 0..keys.len() {
                let mut row: Vec<&(dyn ToSql + Sync)> = vec![&keys[i], &json[i], &bytes[i]];
                for c in &cols {
                    row.push(&c[i]);
                }
                writer
                    .as_mut()
                    .write(&row)
                    .await
                    .map_err(|e| classify(&e, "copy rows"))?;
            }
            writer
                .finish()
                .await
                .map_err(|e| classify(&e, "copy rows"))?;
            let sql = format!(
                "INSERT INTO {table} (key, value, value_bytes{names}) SELECT {} FROM \
                 tideline_stage {conflict}; TRUNCATE tideline_stage",
                select_list(columns.len())
            );
            txn.batch_execute(&sql).await.map_err(|e| {
                upsert_error(&e, &format!("merge staged rows into {table}"), tree, &keys)
            })?;
            // Only after the transaction commits does the table surely exist; until then a
            // rollback would take it away, so a failed batch resets `staged` with the conn.
            *staged = true;
        }
    }
    Ok(())
}

/// What a failed upsert of `keys` (of `tree`) means: a key too long for the primary key's
/// btree (which the source takes: its keys may be up to 64 KiB) holds the pipeline with what
/// to leave out; anything else as [`classify`] says. (A key that compresses well fits longer;
/// one of at most `BTREE_ENTRY_BYTES_MAX - BTREE_ENTRY_OVERHEAD_BYTES` bytes always fits, so
/// a longest key within that points at another index.)
fn upsert_error(e: &tokio_postgres::Error, doing: &str, tree: &str, keys: &[&str]) -> SinkError {
    if e.code() == Some(&SqlState::PROGRAM_LIMIT_EXCEEDED)
        && let Some(key) = keys.iter().max_by_key(|k| k.len())
        && key.len() + BTREE_ENTRY_OVERHEAD_BYTES > BTREE_ENTRY_BYTES_MAX
    {
        let server = e.as_db_error().map_or("", |d| d.message());
        return SinkError::Hold(format!(
            "postgres: {doing}: {server}: tree `{tree}` has a key of {} bytes ({}), too long for \
             the table's primary key (PostgreSQL's btree takes index entries of at most \
             {BTREE_ENTRY_BYTES_MAX} bytes; longer keys fit only where they compress). The sink \
             cannot store such a key: leave these keys out of the pipeline (`prefix`, `trees`), \
             or use a sink that takes them (redis, file)",
            key.len(),
            hex(key.as_bytes())
        ));
    }
    classify(e, doing)
}

/// The upserted row from staged `k, v, b, c0, ...`: `b` is the exact bytes, of a JSON value
/// `v` too when they are kept for merges, and then stored only when jsonb's text of `v` is
/// not the same.
fn select_list(columns: usize) -> String {
    let mut s = String::from(
        "k, v::jsonb, CASE WHEN v IS NULL OR b IS NULL THEN b WHEN v::jsonb::text = v COLLATE \"C\" \
         THEN NULL ELSE b END",
    );
    for i in 0..columns {
        s.push_str(&format!(", c{i}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_into_json_and_bytes_and_columns_read_pointers() {
        let (j, b, doc) = split_value(br#"{"email":"a@b","n":3}"#);
        assert_eq!(j, Some(r#"{"email":"a@b","n":3}"#));
        assert!(b.is_none());
        assert_eq!(column_text(doc.as_ref(), "/email").as_deref(), Some("a@b"));
        assert_eq!(column_text(doc.as_ref(), "/n").as_deref(), Some("3"));
        assert_eq!(column_text(doc.as_ref(), "/missing"), None);
        let (j, b, _) = split_value(b"plain \xff bytes");
        assert!(j.is_none());
        assert_eq!(b, Some(&b"plain \xff bytes"[..]));
        // jsonb cannot hold NUL: kept as bytes instead of failing the batch.
        let (j, _, _) = split_value(br#""a\u0000b""#);
        assert!(j.is_none());
    }
}
