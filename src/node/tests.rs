//! `WaitFor` (a read fence) on the engine node: a waiter is woken by the apply it waits
//! for, not by a timer. Guards against the fence polling the engine for up to an hour.
//! `serve`'s server flags: `--handshake-grace-ms` reaches the server's settings, defaults to
//! the server's own default, and refuses values the handshake budget cannot work with.

use super::args::{server_config, server_defaults};
use super::*;

/// The runtime's clock is paused and never advances (a task that always yields keeps the
/// runtime from idling, which is when a paused clock jumps). A fence that only re-checks
/// on a timer therefore never sees the commit; one woken by the apply does. The loop
/// below is bounded by a real-time limit that only a broken fence reaches.
#[test]
fn wait_for_is_woken_by_the_apply_not_by_a_timer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open_engine(dir.path(), Durability::Sync, false).expect("open engine");
    let node = Arc::new(EngineNode::new(
        engine.clone(),
        Vec::new(),
        Arc::new(Observer::new()),
    ));
    let want: GtidSet = format!("{}:1", engine.server_uuid())
        .parse()
        .expect("gtid set");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let busy = tokio::spawn(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
        let fence = {
            let (node, want) = (node.clone(), want.clone());
            tokio::spawn(async move { node.wait_for(want, Duration::from_secs(3600)).await })
        };
        // Let the fence check once and start waiting.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!fence.is_finished(), "nothing was committed yet");
        let writer = {
            let engine = engine.clone();
            std::thread::spawn(move || engine.put("default", b"k", b"v"))
        };
        let limit = std::time::Instant::now() + Duration::from_secs(30);
        while !fence.is_finished() && std::time::Instant::now() < limit {
            tokio::task::yield_now().await;
        }
        writer.join().expect("writer thread").expect("put");
        assert!(
            fence.is_finished(),
            "the fence was not woken by the apply of the GTID it waits for"
        );
        let (reached, executed) = fence.await.expect("fence task");
        assert!(reached);
        assert!(want.is_subset(&executed));
        busy.abort();
    });
}

/// `serve`'s arguments as the command line gives them.
#[derive(Debug, clap::Parser)]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

fn serve_args(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
    use clap::Parser;
    let argv = ["serve", "--data", "/nonexistent"].iter().chain(extra);
    Serve::try_parse_from(argv).map(|s| s.args)
}

/// Claim: `--handshake-grace-ms` sets the server's `handshake_grace` (0 included: no grace),
/// and without it the server keeps its own default. Fails if the flag is not wired through.
#[test]
fn handshake_grace_flag_reaches_the_server_config() {
    let default = server_config(&serve_args(&[]).expect("no flags"))
        .expect("a server config")
        .handshake_grace;
    assert_eq!(default, server_defaults().handshake_grace);
    for ms in [0u64, 250, 4999] {
        let args = serve_args(&["--handshake-grace-ms", &ms.to_string()]).expect("a valid grace");
        let cfg = server_config(&args).expect("a server config");
        assert_eq!(cfg.handshake_grace, Duration::from_millis(ms));
    }
}

/// Claim: `--hello-timeout-ms` sets the server's `hello_timeout`, and without it the server
/// keeps its own default; values outside 100..=5000 are refused naming the flag. Fails if the
/// flag is not wired through or its default drifts from the server's.
#[test]
fn hello_timeout_flag_reaches_the_server_config() {
    let default = server_config(&serve_args(&[]).expect("no flags"))
        .expect("a server config")
        .hello_timeout;
    assert_eq!(default, server_defaults().hello_timeout);
    for ms in [100u64, 2500, 5000] {
        let args = serve_args(&["--hello-timeout-ms", &ms.to_string()]).expect("a valid value");
        let cfg = server_config(&args).expect("a server config");
        assert_eq!(cfg.hello_timeout, Duration::from_millis(ms));
    }
    for bad in ["99", "5001", "1s"] {
        let err = serve_args(&["--hello-timeout-ms", bad])
            .expect_err("a bad hello timeout must be refused")
            .to_string();
        assert!(err.contains("--hello-timeout-ms"), "{bad}: {err}");
    }
}

#[test]
fn bootstrap_chunks_in_flight_flag_reaches_the_server_config() {
    let default = server_config(&serve_args(&[]).expect("no flags"))
        .expect("a server config")
        .bootstrap_chunks_in_flight;
    assert_eq!(default, server_defaults().bootstrap_chunks_in_flight);
    assert_eq!(
        default, 1,
        "one chunk re-fetched per kill unless asked otherwise"
    );
    let args = serve_args(&["--bootstrap-chunks-in-flight", "2"]).expect("a valid value");
    assert_eq!(
        server_config(&args)
            .expect("a server config")
            .bootstrap_chunks_in_flight,
        2
    );
    for bad in ["0", "3", "two"] {
        let err = serve_args(&["--bootstrap-chunks-in-flight", bad])
            .expect_err("a window outside 1..=2 must be refused")
            .to_string();
        assert!(err.contains("--bootstrap-chunks-in-flight"), "{bad}: {err}");
    }
}

/// Claim: a grace that is not a number, or not below the handshake timeout, is refused with a
/// message naming the flag and why (a grace as long as the timeout would let a budget full of
/// peers that never finish refuse every new connection).
#[test]
fn handshake_grace_flag_refuses_bad_values_with_a_reason() {
    for (value, why) in [
        ("5000", "not below the handshake timeout (5000 ms)"),
        ("60000", "use 0..=4999"),
        ("1s", "not a whole number of milliseconds"),
        ("1.5", "not a whole number of milliseconds"),
    ] {
        let err = serve_args(&["--handshake-grace-ms", value])
            .expect_err("a bad grace must be refused")
            .to_string();
        assert!(
            err.contains("--handshake-grace-ms") && err.contains(why),
            "--handshake-grace-ms {value}: {err}"
        );
    }
}

/// Claim (README, "Durability, stated plainly"): under `--durability async` a commit is
/// acknowledged once its record is written, before the fsync, so a power cut can lose
/// acknowledged commits; only readers wait for the fsync. `serve --help` is where an operator
/// picks the mode, so it must say the same. Fails if the help says async commits wait for the
/// fsync or that nothing is acknowledged before it.
#[test]
fn serve_help_says_async_acknowledges_before_the_fsync() {
    use clap::CommandFactory;
    let help = Serve::command().render_long_help().to_string();
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for wrong in [
        "commits, tails and replicas wait",
        "nothing is shown or acknowledged",
    ] {
        assert!(
            !help.contains(wrong),
            "serve --help still says {wrong:?}:\n{help}"
        );
    }
    for right in [
        "acknowledged once written, before its fsync",
        "a power cut can lose acknowledged commits",
        "nothing is shown to readers before it is durable",
    ] {
        assert!(
            help.contains(right),
            "serve --help does not say {right:?}:\n{help}"
        );
    }
}

/// Runs `serve --data DIR/data --listen 127.0.0.1:0 EXTRA...` on a fresh directory; its error
/// (it must refuse to start) and whether it created the data directory or the log in it.
fn serve_refuses_on_a_fresh_dir(dir: &std::path::Path, extra: &[&str]) -> (String, bool, bool) {
    use clap::Parser;
    let data = dir.join("data");
    let data_arg = data.to_string_lossy().into_owned();
    let argv = ["serve", "--data", &data_arg, "--listen", "127.0.0.1:0"]
        .into_iter()
        .chain(extra.iter().copied());
    let args = Serve::try_parse_from(argv).expect("valid flags").args;
    let err = match serve(&args) {
        Ok(code) => panic!("serve {extra:?} started (and stopped with {code:?}); it must refuse"),
        Err(e) => crate::error_line(&e),
    };
    (err, data.exists(), data.join("log").exists())
}

/// Claim (docs/OPERATIONS.md): a bad `--connect` file, a consumer buffer the server refuses
/// and an `--http` port in use stop `serve` before it creates or changes anything: on a fresh
/// directory, no data directory and no log. Fails if such a check runs only after the engine
/// has opened (created) the log.
#[test]
fn serve_refuses_bad_pipelines_buffers_and_http_ports_before_creating_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let connect = dir.path().join("pipeline.toml");
    std::fs::write(
        &connect,
        "name = \"rows\"\n\n[source]\nfrom = \"earliest\"\n\n[sink]\nkind = \"postgres\"\n\
         url = \"postgres://tideline@127.0.0.1:1/db\"\ntable = \"rows\"\n",
    )
    .expect("write the pipeline file");
    let connect = connect.to_string_lossy().into_owned();
    let http = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
    let http = http.local_addr().expect("its address").to_string();
    let mut failures = Vec::new();
    for (i, (extra, says)) in [
        (vec!["--connect", connect.as_str()], "{tree}"),
        (
            vec!["--consumer-buffer-bytes", "2000000"],
            "--consumer-buffer-bytes",
        ),
        (vec!["--http", http.as_str()], "--http"),
    ]
    .into_iter()
    .enumerate()
    {
        let fresh = dir.path().join(format!("case{i}"));
        let (err, data, log) = serve_refuses_on_a_fresh_dir(&fresh, &extra);
        if !err.contains(says) {
            failures.push(format!(
                "serve {extra:?}: the error should name {says:?}: {err}"
            ));
        }
        if log || data {
            failures.push(format!(
                "serve {extra:?} refused ({err}) only after creating {}",
                if log { "the log" } else { "the data directory" }
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Claim: the refusal of a too-small `--consumer-buffer-bytes` lists parts that add up to the
/// minimum it states: four batches held (prepared or in flight) and a send window of two
/// more (the server's `consumer_buffer_bytes_min`). Fails if the send window is left out.
#[test]
fn a_small_consumer_buffer_is_refused_with_parts_that_add_up() {
    let args = serve_args(&["--consumer-buffer-bytes", "2000000"]).expect("valid flags");
    let err = server_config(&args)
        .expect_err("2000000 bytes is below the minimum")
        .to_string();
    let min = server_defaults().consumer_buffer_bytes_min();
    assert!(err.contains(&format!("below the {min} bytes")), "{err}");
    assert!(
        err.contains("four batches") && err.contains("a send window of two more batches"),
        "the parts named do not add up to {min}: {err}"
    );
}
