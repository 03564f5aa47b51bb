//! `peer-bench replication`'s Redis side: a primary and a replica as child processes on
//! loopback, its live and backlog replication rates and a full resync (phase 3 in the parent
//! module's doc).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use tideline::bench_util::bar;

use super::{CONVERGE_TIMEOUT, ReplBenchArgs, key};

/// A RESP reply.
#[derive(Debug)]
enum Reply {
    Simple,
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    /// Items are read and dropped: no command used here needs them.
    Array,
}

/// A minimal blocking RESP2 connection: commands out, replies in.
struct Resp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn encode_command(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Resp {
    fn connect(port: u16) -> std::io::Result<Resp> {
        let writer = TcpStream::connect(("127.0.0.1", port))?;
        writer.set_nodelay(true)?;
        writer.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Resp {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line)?;
        ensure!(n > 0, "Redis closed the connection");
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    fn reply(&mut self) -> anyhow::Result<Reply> {
        let line = self.line()?;
        let (kind, rest) = line.split_at(line.len().min(1));
        Ok(match kind {
            "+" => Reply::Simple,
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(rest.parse().context("a RESP integer")?),
            "$" => {
                let len: i64 = rest.parse().context("a RESP bulk length")?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0u8; len as usize + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(len as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let len: i64 = rest.parse().context("a RESP array length")?;
                for _ in 0..len.max(0) {
                    self.reply()?;
                }
                Reply::Array
            }
            _ => bail!("unexpected RESP reply {line:?}"),
        })
    }

    /// Sends one command and reads its reply; a Redis error becomes an `Err`.
    fn cmd(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        let mut out = Vec::new();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        encode_command(&args, &mut out);
        self.writer.write_all(&out)?;
        match self.reply()? {
            Reply::Error(e) => bail!("Redis: {e}"),
            r => Ok(r),
        }
    }

    /// `INFO section` as a map.
    fn info(&mut self, section: &str) -> anyhow::Result<HashMap<String, String>> {
        let text = match self.cmd(&["INFO", section])? {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => bail!("unexpected INFO reply {other:?}"),
        };
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect())
    }

    fn info_u64(&mut self, section: &str, field: &str) -> anyhow::Result<u64> {
        let info = self.info(section)?;
        info.get(field)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("INFO {section} has no number {field}"))
    }

    /// `DBSIZE`, or `None` while the server is still loading a dataset.
    fn dbsize(&mut self) -> anyhow::Result<Option<u64>> {
        match self.cmd(&["DBSIZE"]) {
            Ok(Reply::Int(n)) => Ok(Some(n.max(0) as u64)),
            Ok(other) => bail!("unexpected DBSIZE reply {other:?}"),
            Err(e) if e.to_string().contains("LOADING") => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A redis-server child process, shut down (or killed, by its pid) when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

fn free_tcp_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("find a free TCP port")?;
    Ok(l.local_addr()?.port())
}

impl RedisServer {
    fn start(bin: &str, dir: &Path) -> anyhow::Result<RedisServer> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        // Redis changes into `--dir` before it opens `--logfile`: both must be absolute.
        let dir = &std::path::absolute(dir)
            .with_context(|| format!("make {} an absolute path", dir.display()))?;
        let port = free_tcp_port()?;
        let log = dir.join("redis.log");
        // Where Redis says why it refused its configuration (before any log file is open).
        let err_path = dir.join("redis.stderr");
        let err_file = std::fs::File::create(&err_path)
            .with_context(|| format!("create {}", err_path.display()))?;
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(["--client-output-buffer-limit", "replica 0 0 0"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .with_context(|| format!("start {bin}"))?;
        let mut server = RedisServer { child, port };
        let started = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait()? {
                let said = [&err_path, &log]
                    .iter()
                    .filter_map(|p| std::fs::read_to_string(p).ok())
                    .flat_map(|t| {
                        t.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with("***"))
                            .map(String::from)
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                bail!("{bin} exited with {status} at start: {said}");
            }
            if let Ok(mut c) = Resp::connect(port)
                && matches!(c.cmd(&["PING"]), Ok(Reply::Simple))
            {
                return Ok(server);
            }
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "{bin} did not answer PING on port {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self) -> anyhow::Result<Resp> {
        Resp::connect(self.port).with_context(|| format!("connect to Redis on port {}", self.port))
    }

    /// Sends SIGSTOP or SIGCONT to this child, by its pid.
    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .context("run kill")?;
        ensure!(status.success(), "kill {sig} {} failed", self.child.id());
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = self.signal("-CONT");
        if let Ok(mut c) = Resp::connect(self.port) {
            let _ = c.cmd(&["SHUTDOWN", "NOSAVE"]);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-benchmark -t set -n N -r N -d B -P 64` against `port`; returns its requests/s.
fn redis_benchmark(args: &ReplBenchArgs, port: u16) -> anyhow::Result<f64> {
    let n = args.redis_sets.to_string();
    let out = Command::new(&args.redis_benchmark)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "set", "-n", &n, "-r", &n])
        .args(["-d", &args.value_bytes.to_string(), "-P", "64", "-q"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", args.redis_benchmark))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        args.redis_benchmark,
        String::from_utf8_lossy(&out.stderr)
    );
    // `-q` prints `SET: 123456.78 requests per second, p50=...` (after \r progress lines).
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .rsplit("SET: ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    Ok(rps)
}

/// Polls the replica until its `slave_repl_offset` reaches `target`.
fn wait_offset(replica: &mut Resp, target: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let info = replica.info("replication")?;
        let offset: u64 = info
            .get("slave_repl_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if offset >= target && info.get("master_link_status").map(String::as_str) == Some("up") {
            return Ok(());
        }
        ensure!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the Redis replica stayed at offset {offset}, primary at {target}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_link_up(replica: &mut Resp) -> anyhow::Result<()> {
    let started = Instant::now();
    while replica
        .info("replication")?
        .get("master_link_status")
        .map(String::as_str)
        != Some("up")
    {
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the Redis replica's link did not come up within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// SETs `keys` distinct keys of `value_bytes` on `conn`, pipelined.
fn redis_fill(conn: &mut Resp, keys: u64, value_bytes: usize) -> anyhow::Result<()> {
    let value = vec![b'x'; value_bytes];
    let pb = bar(keys, "filling the Redis primary");
    let mut out = Vec::new();
    let mut i = 0;
    while i < keys {
        let n = (keys - i).min(10_000);
        out.clear();
        for k in i..i + n {
            encode_command(&[b"SET", &key(k), &value], &mut out);
        }
        conn.writer.write_all(&out)?;
        for _ in 0..n {
            if let Reply::Error(e) = conn.reply()? {
                bail!("Redis refused a SET: {e}");
            }
        }
        i += n;
        pb.inc(n);
    }
    pb.finish_and_clear();
    Ok(())
}

pub(super) fn redis(args: &ReplBenchArgs, root: &Path) -> anyhow::Result<Value> {
    let version = Command::new(&args.redis_server)
        .arg("--version")
        .output()
        .with_context(|| format!("run {} --version", args.redis_server))?;
    ensure!(
        version.status.success(),
        "{} --version failed",
        args.redis_server
    );
    let version = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .unwrap_or("?")
        .to_string();
    let dir = root.join("redis");
    let primary = RedisServer::start(&args.redis_server, &dir.join("primary"))?;
    let replica = RedisServer::start(&args.redis_server, &dir.join("replica"))?;
    let mut p = primary.connect()?;
    let mut r = replica.connect()?;
    let port = primary.port.to_string();
    r.cmd(&["REPLICAOF", "127.0.0.1", &port])?;
    wait_link_up(&mut r)?;

    // Live: the replica attached while the load runs.
    eprintln!(
        "redis: {} SETs with the replica attached ...",
        args.redis_sets
    );
    let started = Instant::now();
    let live_load_rps = redis_benchmark(args, primary.port)?;
    let load_s = started.elapsed().as_secs_f64();
    let target = p.info_u64("replication", "master_repl_offset")?;
    wait_offset(&mut r, target)?;
    let live_s = started.elapsed().as_secs_f64();

    // Backlog: the replica stopped while the load runs, then timed draining it.
    eprintln!(
        "redis: {} SETs with the replica stopped, then its catch-up ...",
        args.redis_sets
    );
    replica.signal("-STOP")?;
    let backlog = redis_benchmark(args, primary.port);
    let target = p.info_u64("replication", "master_repl_offset");
    let started = Instant::now();
    replica.signal("-CONT")?;
    backlog?;
    let target = target?;
    wait_offset(&mut r, target)?;
    let backlog_s = started.elapsed().as_secs_f64();
    let backlog_bytes = target;
    drop(r);
    drop(replica);

    // Full resync of `redis_keys` distinct keys into a fresh replica.
    eprintln!(
        "redis: full resync of {} keys into an empty replica ...",
        args.redis_keys
    );
    p.cmd(&["FLUSHALL"])?;
    redis_fill(&mut p, args.redis_keys, args.value_bytes)?;
    let keys = p.dbsize()?.unwrap_or(0);
    let full_before = p.info_u64("stats", "sync_full")?;
    let fresh = RedisServer::start(&args.redis_server, &dir.join("fresh"))?;
    let mut f = fresh.connect()?;
    let started = Instant::now();
    f.cmd(&["REPLICAOF", "127.0.0.1", &port])?;
    loop {
        let up = f
            .info("replication")?
            .get("master_link_status")
            .map(String::as_str)
            == Some("up");
        if up && f.dbsize()? == Some(keys) {
            break;
        }
        ensure!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the fresh Redis replica did not finish its full resync"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let resync_s = started.elapsed().as_secs_f64();
    let full_syncs = p.info_u64("stats", "sync_full")? - full_before;
    drop(f);
    drop(fresh);
    drop(p);
    drop(primary);

    let n = args.redis_sets as f64;
    Ok(json!({
        "version": version,
        "sets": args.redis_sets,
        "live": {
            "load_seconds": load_s,
            "benchmark_sets_per_s": live_load_rps.round(),
            "seconds_to_replica_caught_up": live_s,
            "sets_per_s": (n / live_s).round(),
        },
        "backlog": {
            "backlog_bytes": backlog_bytes,
            "seconds": backlog_s,
            "sets_per_s": (n / backlog_s).round(),
        },
        "full_resync": {
            "keys": keys,
            "seconds": resync_s,
            "full_syncs": full_syncs,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::RedisServer;

    /// `peer-bench replication --dir` defaults to a relative path. Redis changes into `--dir`
    /// before it opens `--logfile`, so a relative log path given beside a relative dir points
    /// nowhere and the server exits at start: the comparison was skipped on every default run.
    #[test]
    fn a_server_in_a_relative_dir_starts_and_answers() {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed (scripts/services installs it)"
            );
            println!("SKIPPED: redis-server is not installed (scripts/services installs it)");
            return;
        }
        // A relative path, `.tmpXXXX/relative`, from the test's working directory.
        let cwd = std::env::current_dir().expect("working directory");
        let base = tempfile::tempdir_in(&cwd).expect("tempdir in the working directory");
        let dir = base
            .path()
            .strip_prefix(&cwd)
            .expect("inside the working directory")
            .join("relative");
        assert!(dir.is_relative(), "{} is relative", dir.display());
        let server = RedisServer::start("redis-server", &dir)
            .unwrap_or_else(|e| panic!("redis-server in {}: {e:#}", dir.display()));
        let mut c = server.connect().expect("connect");
        assert!(c.dbsize().expect("DBSIZE").is_some());
    }
}
