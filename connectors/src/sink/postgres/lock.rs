//! One session at a time writes a pipeline: the session-level advisory lock each of the
//! sink's connections takes before it reads or writes anything.

use tokio_postgres::Client;

use super::classify;
use crate::sink::SinkError;

/// Takes the session-level advisory lock of `schema`.`pipeline` on `client`'s session, held
/// until the session ends; `Retry` naming the holder when another session has it.
///
/// One session at a time may write a pipeline. A connector killed after sending its COMMIT
/// leaves a session that may still commit after the next connector started: read before
/// then, the position would be one batch behind the data and the batch applied twice (a
/// merge counted twice). The lock is freed only when that session has ended, after it
/// committed or rolled back whatever it had received.
pub(super) async fn lock_pipeline(
    client: &Client,
    schema: &str,
    pipeline: &str,
) -> Result<(), SinkError> {
    let name = format!("tideline pipeline {schema}.{pipeline}");
    let row = client
        .query_one(
            "SELECT hashtextextended($1, 0), pg_try_advisory_lock(hashtextextended($1, 0))",
            &[&name],
        )
        .await
        .map_err(|e| classify(&e, "lock the pipeline"))?;
    let (key, locked): (i64, bool) = (row.get(0), row.get(1));
    if locked {
        return Ok(());
    }
    let holder = client
        .query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''), coalesce(', from ' || \
             host(a.client_addr), '') FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE \
             l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.classid::bigint = \
             (($1::bigint >> 32) & 4294967295) AND l.objid::bigint = ($1::bigint & 4294967295)",
            &[&key],
        )
        .await
        .ok()
        .flatten();
    let (who, pid) = match holder {
        Some(r) => {
            let (pid, app, from): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
            // `from` is empty for a Unix socket, or when this role may not see addresses.
            (format!("pid {pid}, `{app}`{from}"), pid.to_string())
        }
        None => ("it has just ended".to_owned(), "PID".to_owned()),
    };
    Err(SinkError::Retry(format!(
        "postgres: pipeline `{pipeline}` is written by another PostgreSQL session ({who}): \
         another connector runs this pipeline, or one just stopped and the server has not ended \
         its session yet. A connector waits for it; if that one is gone for good, end its session \
         with SELECT pg_terminate_backend({pid})"
    )))
}
