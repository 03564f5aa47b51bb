//! PostgreSQL logical decoding (`pg_recvlogical`, test_decoding), drained the same way.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Instant;
use tideline::bench_util::bar;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use super::*;

pub(super) struct Pg<'a> {
    args: &'a StreamBenchArgs,
}

impl Pg<'_> {
    fn conn_args(&self) -> Vec<String> {
        let a = self.args;
        vec![
            "-h".into(),
            a.pg_host.clone(),
            "-p".into(),
            a.pg_port.to_string(),
            "-U".into(),
            a.pg_user.clone(),
            "-d".into(),
            a.pg_db.clone(),
        ]
    }

    /// Runs SQL with psql; returns its unaligned, tuples-only output.
    fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At"])
            .args(self.conn_args())
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("run psql (is the PostgreSQL client installed?)")?;
        if !out.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Drains `changes` 100-byte row changes through `pg_recvlogical` with test_decoding.
/// `Err` means the comparison could not run; the caller reports it as skipped.
pub(super) fn postgres(
    args: &StreamBenchArgs,
    changes: u64,
    value_bytes: usize,
) -> anyhow::Result<Value> {
    let pg = Pg { args };
    let wal_level = pg
        .sql("SHOW wal_level")
        .context("PostgreSQL is not answering")?;
    ensure!(
        wal_level == "logical",
        "wal_level is {wal_level}, logical decoding needs logical: run \
         `ALTER SYSTEM SET wal_level = logical` and restart PostgreSQL"
    );
    let version = pg.sql("SHOW server_version")?;
    let id = std::process::id();
    let (table, slot) = (
        format!("tideline_bench_{id}"),
        format!("tideline_bench_{id}"),
    );
    pg.sql(&format!(
        "CREATE TABLE {table} (id bigint NOT NULL, v text NOT NULL)"
    ))?;
    let result = (|| -> anyhow::Result<Value> {
        pg.sql(&format!(
            "SELECT lsn FROM pg_create_logical_replication_slot('{slot}', 'test_decoding')"
        ))?;
        let per_txn = args.pg_rows_per_txn.max(1);
        let pb = bar(changes, "inserting PostgreSQL rows");
        let mut done = 0u64;
        while done < changes {
            let n = (changes - done).min(per_txn);
            pg.sql(&format!(
                "INSERT INTO {table} SELECT g, repeat('x', {value_bytes}) \
                 FROM generate_series({}, {}) g",
                done + 1,
                done + n
            ))?;
            done += n;
            pb.inc(n);
        }
        pb.finish_and_clear();
        let endpos = pg.sql("SELECT pg_current_wal_lsn()")?;
        eprintln!("pg_recvlogical draining {changes} changes to {endpos} ...");
        let started = Instant::now();
        let mut child = Command::new("pg_recvlogical")
            .args(pg.conn_args())
            .args(["--slot", &slot, "--start", "--no-loop", "--endpos", &endpos])
            .args(["-f", "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run pg_recvlogical")?;
        let stdout = child.stdout.take().context("pg_recvlogical stdout")?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, stdout);
        let mut line = Vec::new();
        let mut rows = 0u64;
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if line.starts_with(b"table ") {
                rows += 1;
            }
        }
        let out = child.wait_with_output()?;
        let seconds = started.elapsed().as_secs_f64();
        ensure!(
            out.status.success(),
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        ensure!(
            rows == changes,
            "pg_recvlogical delivered {rows} of {changes} row changes"
        );
        Ok(json!({
            "version": version,
            "plugin": "test_decoding",
            "changes": rows,
            "transactions": changes.div_ceil(per_txn),
            "seconds": seconds,
            "changes_per_s": (rows as f64 / seconds).round(),
        }))
    })();
    let _ = pg.sql(&format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = '{slot}'"
    ));
    let _ = pg.sql(&format!("DROP TABLE IF EXISTS {table}"));
    result
}
