//! `tideline serve`: opening the engine on a data directory, the checks before anything is
//! opened, and the wiring of the server, its pipelines, the HTTP admin and the watchdog.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tideline_connectors::ReplicaOptions;
use tideline_connectors::config::{ConnectFile, HostNode};
use tideline_engine::{Engine, EngineOptions};
use tideline_wal::{Durability, RetentionPolicy, WalOptions};

use super::args::server_config;
use super::{EngineNode, ServeArgs};
use crate::log_cmd::open_log_with;

/// Opens the log and engine of a data directory with default limits.
pub fn open_engine(
    data: &Path,
    durability: Durability,
    read_only: bool,
) -> anyhow::Result<Arc<Engine>> {
    open_engine_with(
        data,
        WalOptions {
            durability,
            ..WalOptions::default()
        },
        EngineOptions {
            read_only,
            ..EngineOptions::default()
        },
    )
}

/// Opens the log and engine of a data directory.
pub fn open_engine_with(
    data: &Path,
    log: WalOptions,
    opts: EngineOptions,
) -> anyhow::Result<Arc<Engine>> {
    check_store_has_log(data)?;
    let wal = open_log_with(data, log)?;
    let report = wal.recovery_report();
    if report.truncated_bytes > 0 {
        tracing::warn!(
            bytes = report.truncated_bytes,
            "recovery cut a torn tail of the log"
        );
    }
    let store = data.join("store");
    let engine = Engine::open(&store, wal, opts)
        .with_context(|| format!("open the state store in {}", store.display()))?;
    Ok(Arc::new(engine))
}

/// `serve`.
pub fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tideline")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve_async(args))
}

/// The checks before anything is created on disk that need [`preflight`]'s `--connect` file:
/// the server settings (the consumer buffer), the `--http` port, and each pipeline's source
/// and sink settings (those `spawn_all` would refuse once the node serves). A pipeline whose
/// source credentials are this node's secrets, not yet created, has them checked when it starts.
fn preflight_settings(
    args: &ServeArgs,
    secrets_dir: &Path,
    connect: Option<&ConnectFile>,
) -> anyhow::Result<()> {
    server_config(args)?;
    if let Some(addr) = args.http
        && let Err(e) = std::net::TcpListener::bind(addr)
    {
        anyhow::bail!(
            "--http {addr}: cannot listen there ({e}); is another process using the port? \
             Stop it or pass another --http ADDR"
        );
    }
    let Some(file) = connect else {
        return Ok(());
    };
    let own_secrets_ready = tideline_stream::tls::missing_files(secrets_dir).is_empty();
    let host = HostNode {
        addr: args.listen,
        secrets: secrets_dir,
    };
    let refused =
        |e: String| anyhow::anyhow!("--connect: {e} (docs/OPERATIONS.md, \"Connectors\")");
    for p in &file.pipelines {
        if p.source.secrets.is_some() || own_secrets_ready {
            p.pipeline_config(Some(host)).map_err(refused)?;
        }
        p.sink()
            .map_err(|e| refused(format!("pipeline `{}`: {}", p.name, e.message())))?;
    }
    Ok(())
}

/// Checks, before anything is created on disk, that `serve` can run: the port is free, the
/// data directory is usable, the upstream addresses parse, and a replica has its cluster's whole
/// secrets (a new cluster's could never connect to the upstream).
fn preflight(args: &ServeArgs, secrets_dir: &Path) -> anyhow::Result<Option<ConnectFile>> {
    // Bind the port and let it go at once: `serve` binds it again below, after opening the
    // data directory. A port taken in between still fails there, with the same words.
    if let Err(e) = std::net::UdpSocket::bind(args.listen) {
        anyhow::bail!(
            "cannot listen on {}: {}; is another node using the port? Stop it or pass \
             another --listen HOST:PORT",
            args.listen,
            if e.kind() == std::io::ErrorKind::AddrInUse {
                format!("the address is in use ({e})")
            } else {
                e.to_string()
            }
        );
    }
    if args.data.exists() && !args.data.is_dir() {
        anyhow::bail!(
            "--data {} is a file, not a directory: pass a directory (created if absent)",
            args.data.display()
        );
    }
    let log_dir = crate::log_cmd::log_dir(&args.data);
    let store_dir = args.data.join("store");
    check_dir_or_absent(&log_dir, "the node's log")?;
    check_dir_or_absent(&store_dir, "the node's state store")?;
    check_dir_or_absent(secrets_dir, "the cluster secrets")?;
    check_store_has_log(&args.data)?;
    for up in &args.upstream {
        let port_ok = up
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok {
            anyhow::bail!("--upstream {up:?} is not HOST:PORT (for example 127.0.0.1:7400)");
        }
    }
    if !args.upstream.is_empty() {
        let missing = tideline_stream::tls::missing_files(secrets_dir);
        if missing.len() == tideline_stream::tls::FILES.len() {
            anyhow::bail!(
                "a replica needs its cluster's secrets, and {} holds none: pass --secrets DIR \
                 with the upstream's secrets directory (a new cluster's certificates could \
                 never connect to {})",
                secrets_dir.display(),
                args.upstream.join(", ")
            );
        }
        if !missing.is_empty() {
            anyhow::bail!(
                "a replica needs its cluster's whole secrets directory, and {} lacks {}: \
                 restore the whole secrets directory from a node of the cluster (the \
                 upstream's)",
                secrets_dir.display(),
                missing.join(", ")
            );
        }
    }
    match &args.connect {
        None => Ok(None),
        Some(path) => Ok(Some(ConnectFile::load(path).map_err(|e| {
            anyhow::anyhow!("--connect: {e} (docs/OPERATIONS.md, \"Connectors\")")
        })?)),
    }
}

/// Refuses `path` when something other than a directory is there (a file, a symbolic link to
/// nothing, one that cannot be looked at), naming the path and what it is for; absent is fine,
/// `serve` creates it.
fn check_dir_or_absent(path: &Path, what: &str) -> anyhow::Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => anyhow::bail!(
            "{} is a file, not a directory: it should hold {what}; move the file away, or \
             pass a --data/--secrets directory that does not hold it",
            path.display()
        ),
        // A symbolic link whose target is gone (a disk not mounted): not absent.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::symlink_metadata(path).is_ok() =>
        {
            anyhow::bail!(
                "{} is a symbolic link to {}, which does not exist: it should hold {what}; \
                 mount or restore its target",
                path.display(),
                std::fs::read_link(path)
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "a path that cannot be read".into())
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => anyhow::bail!(
            "cannot use {} ({what}): {e}; it must be a directory this user can read and \
             write (or absent)",
            path.display()
        ),
    }
}

/// Whether `dir` holds a segment of a log (a `*.wal` file). An empty directory is no log: a
/// mount point whose disk was not mounted looks like that.
fn holds_log_segments(dir: &Path) -> anyhow::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(e).with_context(|| format!("read the log directory {}", dir.display()));
        }
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("read the log directory {}", dir.display()))?;
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(tideline_wal::segment::SUFFIX)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Refuses a data directory whose store holds a node's state while its log is missing or
/// holds no segment (a log disk not mounted, a lost log directory). Opening it would create
/// a new, empty log beside the store, under another server_uuid, and then refuse the pair;
/// the store is then the only copy of the node's data, so nothing may suggest deleting it.
/// A node's first start creates its log before its store, so no crash leaves a store alone.
fn check_store_has_log(data: &Path) -> anyhow::Result<()> {
    let store = data.join("store");
    let store_used = match std::fs::read_dir(&store) {
        Ok(mut entries) => entries.next().is_some(),
        Err(_) => false,
    };
    let log = crate::log_cmd::log_dir(data);
    if !store_used || holds_log_segments(&log)? {
        return Ok(());
    }
    let state = if log.exists() {
        "holds no log segment (is its disk mounted?)"
    } else {
        "is missing"
    };
    anyhow::bail!(
        "{} holds a node's state but {} {state}: mount or restore the log; do not delete \
         the store (it may be the only copy of this node's data)",
        store.display(),
        log.display()
    )
}

/// Refuses a data directory whose log another process holds (a node serving it), with the
/// words the log's own open would use: the last check, so that a refused `serve` creates
/// nothing (no stray secrets beside a running node's log). The lock is taken and let go at
/// once, leaving this process's PID in the lock file as the open does next: the log takes
/// it again when it opens, and a writer that came in between still fails there, having
/// created nothing either (a node with a log never creates secrets). A data directory
/// without a log has no writer to find, and nothing is created for it here.
fn check_log_free(data: &Path) -> anyhow::Result<()> {
    let dir = crate::log_cmd::log_dir(data);
    if !dir.is_dir() {
        return Ok(());
    }
    let storage = tideline_wal::FileStorage::new(&dir)
        .with_context(|| format!("open the log directory {}", dir.display()))?;
    let lock = tideline_wal::Storage::lock_writer(&storage)
        .with_context(|| format!("open the log in {}", dir.display()))?;
    drop(lock);
    Ok(())
}

async fn serve_async(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let secrets_dir = args
        .secrets
        .clone()
        .unwrap_or_else(|| args.data.join("secrets"));
    let connect = preflight(args, &secrets_dir)?;
    preflight_settings(args, &secrets_dir, connect.as_ref())?;
    check_log_free(&args.data)?;
    std::fs::create_dir_all(&args.data).with_context(|| {
        format!(
            "create the data directory {}; pass a writable directory as --data",
            args.data.display()
        )
    })?;
    // Only a node without a log creates secrets (or redoes a creation cut short): one with a
    // log has served under its cluster's, and new ones would make it another cluster.
    let log_dir = crate::log_cmd::log_dir(&args.data);
    let existing_log = log_dir.exists().then_some(log_dir.as_path());
    if tideline_stream::tls::ensure_node_secrets(&secrets_dir, existing_log)? {
        tracing::info!(dir = %secrets_dir.display(), "created cluster secrets (CA, certificate, token)");
    }
    let secrets = tideline_stream::tls::load_server(&secrets_dir)?;
    let durability = args.durability.durability();
    let data = args.data.clone();
    let read_only = args.read_only || (!args.upstream.is_empty() && !args.allow_local_writes);
    let opts = EngineOptions {
        read_only,
        key_bytes_max: args.key_bytes_max as usize,
        value_bytes_max: args.value_bytes_max as usize,
        index_backfill_keys: args.index_backfill_keys as usize,
        ..EngineOptions::default()
    };
    let log = WalOptions {
        durability,
        segment_bytes_max: args.log_segment_bytes,
        retention: RetentionPolicy {
            retain_bytes_min: args.log_retain_bytes,
            slot_bytes_max: (args.log_slot_bytes_max > 0).then_some(args.log_slot_bytes_max),
            slot_age_max: args.log_slot_age_max,
        },
        ..WalOptions::default()
    };
    #[cfg(feature = "testing")]
    let (log, opts, armed) = testing::switches(log, opts)?;
    let engine = tokio::task::spawn_blocking(move || open_engine_with(&data, log, opts))
        .await
        .context("open task failed")??;
    let mut upstreams = Vec::new();
    if !args.upstream.is_empty() {
        let mut cfg = tideline_stream::ClientConfig::new(tideline_stream::tls::load_client_dir(
            &secrets_dir,
        )?);
        cfg.client_name = format!("replica {}", engine.server_uuid());
        let opts = ReplicaOptions {
            bootstrap: args.bootstrap.mode(),
            sources: args.upstream.len(),
            chunk_bytes: args.bootstrap_chunk_bytes,
        };
        for addr in &args.upstream {
            // The tasks live as long as the node's runtime.
            let (status, _task) =
                tideline_connectors::spawn(addr.clone(), cfg.clone(), engine.clone(), opts);
            upstreams.push(status);
        }
    }
    let server_cfg = server_config(args)?;
    let node = Arc::new(
        EngineNode::new(engine.clone(), upstreams, server_cfg.observer.clone())
            .with_limits(args.key_bytes_max as usize, args.value_bytes_max as usize),
    );
    let token = secrets.token.clone();
    let server = tideline_stream::serve(server_cfg, secrets, node.clone())?;
    // The node's pipelines start once the server has bound: one whose `[source]` names no
    // node follows this one at the address it bound (port 0 included).
    let pipelines = match &connect {
        Some(file) => {
            let host = HostNode {
                addr: server.local_addr(),
                secrets: &secrets_dir,
            };
            crate::connect::spawn_all(file, Some(host))?
        }
        None => Vec::new(),
    };
    node.set_pipelines(pipelines.iter().map(|(s, _)| s.clone()).collect());
    let admin = match args.http {
        Some(addr) => {
            let admin = crate::admin::serve(addr, node.clone(), token).await?;
            eprintln!("tideline admin on http://{}/", admin.local_addr());
            Some(admin)
        }
        None => None,
    };
    tracing::info!(
        listen = %server.local_addr(),
        server_uuid = %engine.server_uuid(),
        gtid_executed = %engine.gtid_executed(),
        "serving"
    );
    eprintln!(
        "tideline serving on {} (server_uuid {}, data {}, secrets {})",
        server.local_addr(),
        engine.server_uuid(),
        args.data.display(),
        secrets_dir.display()
    );
    #[cfg(feature = "testing")]
    if let Some(task) = &armed {
        eprintln!(
            "TESTING: {} armed: the {task} will die",
            testing::KILL_TASK_ENV
        );
    }

    // Both listeners live for the whole loop: one made anew in each `select!` would not exist
    // while a branch runs, and a signal landing then would be consumed by nobody.
    let mut signals = crate::signals::StopSignals::install()?;
    let mut watchdog = tokio::time::interval(Duration::from_millis(100));
    let mut retention = tokio::time::interval(Duration::from_secs(10));
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The retention run in progress: a branch of the loop, so that signals and the watchdog
    // are heard while its fsyncs run. At most one runs at a time.
    let mut retaining: Option<tokio::task::JoinHandle<_>> = None;
    let exit = loop {
        tokio::select! {
            _ = signals.recv() => break None,
            _ = watchdog.tick() => {
                // Fail-stop: a poisoned log or a dead engine thread ends the node.
                if let Some(reason) = engine.fail_stop_reason() {
                    break Some(reason);
                }
                #[cfg(feature = "testing")]
                if armed.as_deref() == Some(testing::QUIC_SERVER)
                    && engine.wal().durable_offset() >= 1
                {
                    server.unsafe_abort_accept_loop();
                }
                if server.is_finished() {
                    break Some("the QUIC server task stopped".to_string());
                }
            }
            report = async { retaining.as_mut().expect("guarded by is_some").await },
                if retaining.is_some() =>
            {
                retaining = None;
                log_retention(report);
            }
            _ = retention.tick(), if retaining.is_none() => {
                let wal = engine.wal().clone();
                retaining = Some(tokio::task::spawn_blocking(move || {
                    #[cfg(feature = "testing")]
                    testing::retention_pause();
                    wal.run_retention()
                }));
            }
        }
    };
    // Retention never runs beside the close below (nor past the runtime): let it finish.
    if let Some(run) = retaining.take() {
        log_retention(run.await);
    }
    for (_, task) in &pipelines {
        // Each batch is stored with its position in one step: stopping anywhere is safe.
        task.abort();
    }
    server.shutdown().await;
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    // The watchdog no longer ticks: a failure since its last tick (a commit's failed fsync
    // during the drain, an engine thread that died) is a fail-stop all the same.
    if let Some(reason) = exit.or_else(|| engine.fail_stop_reason()) {
        return Ok(fail_stop(&reason));
    }
    tracing::info!("shutting down: syncing the log and the store");
    let (closed, failed) = tokio::task::spawn_blocking(move || {
        let closed = engine
            .close()
            .map_err(anyhow::Error::from)
            .and_then(|()| engine.wal().close().map_err(anyhow::Error::from));
        (closed, engine.fail_stop_reason())
    })
    .await
    .context("shutdown task failed")?;
    if let Some(reason) = failed {
        if let Err(e) = &closed {
            tracing::error!(error = %e, "closing the failed node");
        }
        return Ok(fail_stop(&reason));
    }
    closed?;
    eprintln!("tideline stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// Ends the node on a fail-stop: exit code 2 and a line saying why (docs/OPERATIONS.md).
fn fail_stop(reason: &str) -> ExitCode {
    tracing::error!(%reason, "fail-stop: exiting");
    eprintln!("error: fail-stop: {reason}");
    ExitCode::from(2)
}

/// Logs a retention run that failed; the next run, 10 s later, tries again.
fn log_retention<T>(report: Result<Result<T, tideline_wal::Error>, tokio::task::JoinError>) {
    match report {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "retention failed"),
        Err(e) => tracing::warn!(error = %e, "the retention task failed"),
    }
}

/// Test-only switches (cargo feature `testing`, absent from the binary a release build makes):
/// env `TIDELINE_TESTING_KILL_TASK=applier|checkpointer|backfill|log-writer|quic-server` kills
/// that critical task once the node has a commit, so that a test can watch the watchdog stop
/// the node with exit code 2; env `TIDELINE_TESTING_SKIP_BOOTSTRAP_WIPE=1` makes a bootstrap
/// keep the replica's old trees (the engine's `unsafe_bootstrap_skip_wipe`), the canary of the
/// stale-data bootstrap test; env `TIDELINE_TESTING_RETENTION_PAUSE_MS=N` makes each retention
/// run sleep N ms first (a slow disk's fsyncs), announced on stderr, so that a test can send a
/// signal while retention runs.
#[cfg(feature = "testing")]
mod testing {
    use tideline_engine::EngineOptions;
    use tideline_wal::WalOptions;

    pub(super) const KILL_TASK_ENV: &str = "TIDELINE_TESTING_KILL_TASK";
    const SKIP_BOOTSTRAP_WIPE_ENV: &str = "TIDELINE_TESTING_SKIP_BOOTSTRAP_WIPE";
    /// The task name that kills the QUIC server's accept loop.
    pub(super) const QUIC_SERVER: &str = "quic-server";

    /// The options with the switches of the environment set, and the task armed.
    pub(super) fn switches(
        mut log: WalOptions,
        mut opts: EngineOptions,
    ) -> anyhow::Result<(WalOptions, EngineOptions, Option<String>)> {
        match std::env::var(SKIP_BOOTSTRAP_WIPE_ENV).as_deref() {
            Err(_) | Ok("" | "0") => {}
            Ok("1") => opts.unsafe_bootstrap_skip_wipe = true,
            Ok(other) => anyhow::bail!("{SKIP_BOOTSTRAP_WIPE_ENV}={other}: use 1 or 0"),
        }
        let Ok(task) = std::env::var(KILL_TASK_ENV) else {
            return Ok((log, opts, None));
        };
        match task.as_str() {
            "" => return Ok((log, opts, None)),
            "applier" | "checkpointer" | "backfill" => {
                opts.unsafe_kill_thread = Some(task.clone());
            }
            "log-writer" => log.unsafe_kill_writer = true,
            // Killed by the node itself once it has a commit (`serve`'s watchdog loop).
            QUIC_SERVER => {}
            other => anyhow::bail!(
                "{KILL_TASK_ENV}={other}: unknown task; use applier, checkpointer, backfill, \
                 log-writer or {QUIC_SERVER}"
            ),
        }
        Ok((log, opts, Some(task)))
    }

    const RETENTION_PAUSE_ENV: &str = "TIDELINE_TESTING_RETENTION_PAUSE_MS";

    /// Sleeps as long as `TIDELINE_TESTING_RETENTION_PAUSE_MS` says (on a blocking thread, in
    /// the retention run), after saying so on stderr. A value that is not a number of
    /// milliseconds is ignored with a line saying so.
    pub(super) fn retention_pause() {
        let Ok(value) = std::env::var(RETENTION_PAUSE_ENV) else {
            return;
        };
        match value.parse::<u64>() {
            Ok(0) => {}
            Ok(ms) => {
                eprintln!("TESTING: {RETENTION_PAUSE_ENV}: retention paused for {ms} ms");
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            Err(_) => {
                eprintln!("TESTING: {RETENTION_PAUSE_ENV}={value} ignored: use a number of ms")
            }
        }
    }
}
