//! PostgreSQL for the sink tests that read what a PostgreSQL sink stored (`postgres.rs`,
//! `dropped_merge_tree.rs`).

use std::collections::BTreeMap;

use super::Norm;

/// Rows of `table` as the sink stores them (none when it does not exist): jsonb by meaning,
/// bytea by bytes (a JSON value of a tree with a merge operator may keep its exact bytes beside
/// its jsonb: those).
pub async fn rows(c: &tokio_postgres::Client, table: &str) -> BTreeMap<Vec<u8>, Norm> {
    let sql = format!("SELECT key, value::text, value_bytes FROM \"{table}\"");
    let Ok(rows) = c.query(&sql, &[]).await else {
        return BTreeMap::new();
    };
    rows.iter()
        .map(|r| {
            let k: String = r.get(0);
            let v: Option<String> = r.get(1);
            let b: Option<Vec<u8>> = r.get(2);
            let n = match (v, b) {
                (Some(j), None) => Norm::Json(serde_json::from_str(&j).expect("jsonb text")),
                (None, Some(b)) => Norm::Bytes(b),
                (Some(_), Some(b)) => Norm::of(&b),
                other => panic!("row {k} of {table} has value and value_bytes {other:?}"),
            };
            (k.into_bytes(), n)
        })
        .collect()
}
