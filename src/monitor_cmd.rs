//! `tideline monitor` (every request a node serves, live, like Redis MONITOR) and `tideline
//! top` (the hottest keys and slowest requests of each interval, refreshed in the terminal).
//! Both read the node's monitor feed over its QUIC port, with the cluster token.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use serde_json::{Map, Value, json};
use tideline_stream::MonitorEvent;

use crate::client_cmd::{NodeArgs, runtime};
use crate::render;
use crate::signals::StopSignals;

/// Arguments of `monitor`.
#[derive(Debug, Args)]
pub struct MonitorArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Only requests on this tree.
    #[arg(long, value_name = "T")]
    tree: Option<String>,
    /// Share of requests to show, 0 < F <= 1 (e.g. 0.01 for one in a hundred).
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    sample: f64,
    /// One JSON object per request instead of text.
    #[arg(long)]
    json: bool,
    /// Stop after this many requests.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
}

fn sample_ppm(sample: f64) -> anyhow::Result<u32> {
    if !(sample > 0.0 && sample <= 1.0) {
        bail!("--sample must be in (0, 1], e.g. 0.01 for one request in a hundred; got {sample}");
    }
    Ok((sample * 1e6).round().max(1.0) as u32)
}

fn event_json(e: &MonitorEvent) -> Value {
    let mut obj = Map::new();
    obj.insert("ts".into(), json!(render::rfc3339_us(e.ts_us)));
    obj.insert("client".into(), json!(e.remote));
    obj.insert("kind".into(), json!(e.kind));
    obj.insert("tree".into(), json!(e.tree));
    render::put_bytes(&mut obj, "key", &e.key);
    obj.insert("latency_us".into(), json!(e.latency_us));
    obj.insert("ok".into(), json!(e.ok));
    Value::Object(obj)
}

/// `s` as it may reach a terminal: control characters (C0 such as ESC and BEL, DEL, C1)
/// and backslashes escaped as Rust writes them (`\u{1b}`, `\n`, `\\`), the rest as is. Tree
/// names and keys come from any client's requests: raw, an escape sequence in one would
/// clear, move or retitle the screen of whoever is watching.
pub(crate) fn terminal_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' || c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// What a failed write to stdout means: a reader that went away (`| head`) is the normal end
/// of the output (exit 0, nothing said, as for `scan` and `tail`); anything else (a full
/// disk) is an error.
fn output_failed(e: std::io::Error) -> anyhow::Result<ExitCode> {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(anyhow::Error::new(e).context("write to standard output"))
    }
}

fn event_text(e: &MonitorEvent) -> String {
    format!(
        "{:.6} [{}] {} {} {:?} {:.3} ms{}",
        e.ts_us as f64 / 1e6,
        terminal_text(&e.remote),
        terminal_text(&e.kind),
        if e.tree.is_empty() {
            "-".to_string()
        } else {
            terminal_text(&e.tree)
        },
        String::from_utf8_lossy(&e.key),
        e.latency_us as f64 / 1e3,
        if e.ok { "" } else { " ERROR" }
    )
}

/// `monitor`.
pub fn monitor(args: &MonitorArgs) -> anyhow::Result<ExitCode> {
    let ppm = sample_ppm(args.sample)?;
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let mut feed = client.monitor(args.tree.clone(), ppm).await?;
        eprintln!(
            "monitoring {} ({}% of requests{}); Ctrl-C to stop",
            client.addr(),
            args.sample * 100.0,
            args.tree
                .as_deref()
                .map(|t| format!(" on tree {t}"))
                .unwrap_or_default()
        );
        let mut stop = StopSignals::install()?;
        let stdout = std::io::stdout();
        let mut shown = 0u64;
        loop {
            let next = tokio::select! {
                // A signal first: under load the feed is always ready.
                biased;
                _ = stop.recv() => break,
                n = feed.next() => n?,
            };
            let Some((events, dropped)) = next else {
                eprintln!("the node ended the monitor");
                break;
            };
            if dropped > 0 {
                eprintln!("({dropped} requests not shown: this monitor read too slowly)");
            }
            if let Some(code) = write_events(
                &mut stdout.lock(),
                &events,
                args.json,
                &mut shown,
                args.limit,
            )? {
                return Ok(code);
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Writes one batch of the monitor feed, a line per request; `Some(exit code)` when the
/// command is done (`limit` requests shown, or stdout closed); an error when the output
/// failed otherwise.
fn write_events(
    out: &mut impl Write,
    events: &[MonitorEvent],
    json: bool,
    shown: &mut u64,
    limit: Option<u64>,
) -> anyhow::Result<Option<ExitCode>> {
    for e in events {
        let line = if json {
            event_json(e).to_string()
        } else {
            event_text(e)
        };
        if let Err(e) = writeln!(out, "{line}") {
            return output_failed(e).map(Some);
        }
        *shown += 1;
        if limit.is_some_and(|l| *shown >= l) {
            break;
        }
    }
    let done = limit.is_some_and(|l| *shown >= l);
    match out.flush() {
        Ok(()) => Ok(done.then_some(ExitCode::SUCCESS)),
        Err(e) => output_failed(e).map(Some),
    }
}

/// Arguments of `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Length of one interval, in milliseconds.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    interval_ms: u64,
    /// Rows in each list.
    #[arg(long, default_value_t = 10, value_name = "N")]
    rows: usize,
    /// Stop after this many intervals (default: until Ctrl-C).
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
    /// One JSON object per interval instead of a screen.
    #[arg(long)]
    json: bool,
}

/// One interval's figures.
#[derive(Default)]
struct Interval {
    requests: u64,
    dropped: u64,
    by_key: HashMap<(String, Vec<u8>), (u64, u64)>,
    slowest: Vec<MonitorEvent>,
}

impl Interval {
    fn add(&mut self, e: MonitorEvent, rows: usize) {
        self.requests += 1;
        if !e.key.is_empty() {
            let entry = self
                .by_key
                .entry((e.tree.clone(), e.key.clone()))
                .or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(e.latency_us);
        }
        self.slowest.push(e);
        if self.slowest.len() > rows * 4 {
            self.trim(rows);
        }
    }

    fn trim(&mut self, rows: usize) {
        self.slowest
            .sort_by_key(|e| std::cmp::Reverse(e.latency_us));
        self.slowest.truncate(rows);
    }

    fn report(mut self, rows: usize, seconds: f64) -> Value {
        self.trim(rows);
        let mut hot: Vec<_> = self.by_key.into_iter().collect();
        hot.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
        hot.truncate(rows);
        let hot: Vec<Value> = hot
            .into_iter()
            .map(|((tree, key), (n, max_us))| {
                let mut obj = Map::new();
                obj.insert("tree".into(), json!(tree));
                render::put_bytes(&mut obj, "key", &key);
                obj.insert("requests".into(), json!(n));
                obj.insert("max_latency_us".into(), json!(max_us));
                Value::Object(obj)
            })
            .collect();
        json!({
            "seconds": seconds,
            "requests": self.requests,
            "requests_per_s": self.requests as f64 / seconds.max(1e-9),
            "not_seen": self.dropped,
            "hottest_keys": hot,
            "slowest": self.slowest.iter().map(event_json).collect::<Vec<_>>(),
        })
    }
}

/// The text of one `top` screen; every name and key in it is [`terminal_text`].
fn screen(addr: &str, r: &Value, clear: bool) -> String {
    let mut s = String::new();
    if clear {
        s.push_str("\x1b[H\x1b[2J");
    }
    s.push_str(&format!(
        "tideline top — {addr} — {:.0} requests/s over {:.1} s{}\n\nHOTTEST KEYS\n{:>9}  {:>10}  KEY\n",
        r["requests_per_s"].as_f64().unwrap_or(0.0),
        r["seconds"].as_f64().unwrap_or(0.0),
        match r["not_seen"].as_u64() {
            Some(n) if n > 0 => format!(" ({n} not seen: monitor too slow)"),
            _ => String::new(),
        },
        "REQUESTS",
        "MAX ms"
    ));
    let key = |v: &Value| {
        v["key"]
            .as_str()
            .map(terminal_text)
            .or_else(|| v["key_b64"].as_str().map(|k| format!("base64:{k}")))
            .unwrap_or_default()
    };
    let text = |v: &Value| terminal_text(v.as_str().unwrap_or(""));
    for k in r["hottest_keys"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:>9}  {:>10.3}  {}/{}\n",
            k["requests"].as_u64().unwrap_or(0),
            k["max_latency_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            text(&k["tree"]),
            key(k)
        ));
    }
    s.push_str(&format!(
        "\nSLOWEST REQUESTS\n{:>10}  {:<9} {:<22} KEY\n",
        "ms", "KIND", "CLIENT"
    ));
    for e in r["slowest"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "{:>10.3}  {:<9} {:<22} {}/{}\n",
            e["latency_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            text(&e["kind"]),
            text(&e["client"]),
            text(&e["tree"]),
            key(e)
        ));
    }
    s
}

/// `top`.
pub fn top(args: &TopArgs) -> anyhow::Result<ExitCode> {
    if args.interval_ms == 0 || args.rows == 0 {
        bail!("--interval-ms and --rows must be at least 1");
    }
    let interval = Duration::from_millis(args.interval_ms);
    let clear = !args.json && std::io::stdout().is_terminal();
    runtime()?.block_on(async {
        let client = args.node.connect().await?;
        let addr = client.addr().to_string();
        let mut feed = client.monitor(None, 1_000_000).await?;
        let mut stop = StopSignals::install()?;
        let mut done = 0u64;
        loop {
            let started = Instant::now();
            let deadline = tokio::time::Instant::now() + interval;
            let mut cur = Interval::default();
            loop {
                let next = tokio::select! {
                    biased;
                    _ = stop.recv() => return Ok(ExitCode::SUCCESS),
                    () = tokio::time::sleep_until(deadline) => break,
                    n = feed.next() => n?,
                };
                let Some((events, dropped)) = next else {
                    bail!("the node ended the monitor stream");
                };
                cur.dropped += dropped;
                for e in events {
                    cur.add(e, args.rows);
                }
            }
            let report = cur.report(args.rows, started.elapsed().as_secs_f64());
            let text = if args.json {
                format!("{report}\n")
            } else {
                screen(&addr, &report, clear)
            };
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                return output_failed(e);
            }
            done += 1;
            if args.iterations.is_some_and(|n| done >= n) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(key: &str, latency_us: u64) -> MonitorEvent {
        MonitorEvent {
            ts_us: 0,
            remote: "127.0.0.1:1".into(),
            kind: "get".into(),
            tree: "t".into(),
            key: key.as_bytes().to_vec(),
            latency_us,
            ok: true,
        }
    }

    #[test]
    fn top_ranks_keys_by_requests_and_requests_by_latency() {
        let mut i = Interval::default();
        for (k, l) in [("a", 5), ("b", 900), ("a", 7), ("c", 50), ("a", 1)] {
            i.add(ev(k, l), 2);
        }
        let r = i.report(2, 1.0);
        assert_eq!(r["requests"], 5);
        assert_eq!(r["hottest_keys"][0]["key"], "a");
        assert_eq!(r["hottest_keys"][0]["requests"], 3);
        assert_eq!(r["slowest"][0]["latency_us"], 900);
        assert_eq!(r["slowest"][1]["latency_us"], 50);
        assert_eq!(r["slowest"].as_array().map(Vec::len), Some(2));
    }

    /// Every control character a request can carry: C0 (ESC, BEL, NUL, newline...), DEL, C1.
    fn controls() -> String {
        (0u32..0x20)
            .chain([0x7f])
            .chain(0x80..0xa0)
            .filter_map(char::from_u32)
            .collect()
    }

    /// Fails on a control character other than a line's own newline, naming it.
    fn assert_no_controls(what: &str, text: &str) {
        for line in text.split('\n') {
            let bad: Vec<char> = line.chars().filter(|c| c.is_control()).collect();
            assert!(
                bad.is_empty(),
                "{what} passes control characters {bad:?} to the terminal: {line:?}"
            );
        }
    }

    #[test]
    fn control_characters_in_trees_and_keys_never_reach_the_terminal() {
        let hostile = format!("\u{1b}[2J\u{1b}]0;owned\u{7}{}x", controls());
        let mut e = ev(&hostile, 5);
        e.tree = hostile.clone();
        assert_no_controls("a monitor line", &event_text(&e));
        let mut i = Interval::default();
        i.add(e, 3);
        let shown = screen("127.0.0.1:1", &i.report(3, 1.0), false);
        assert_no_controls("the top screen", &shown);
        // Escaped, not dropped: the characters stay legible.
        assert!(shown.contains("\\u{1b}[2J"), "{shown}");
    }

    /// A writer that fails every write with `kind`.
    struct Failing(std::io::ErrorKind);

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(self.0.into())
        }
    }

    #[test]
    fn a_monitor_whose_output_fails_stops_quietly_only_on_a_closed_pipe() {
        let events = [ev("k", 1)];
        let mut shown = 0;
        let closed = write_events(
            &mut Failing(std::io::ErrorKind::BrokenPipe),
            &events,
            false,
            &mut shown,
            None,
        );
        assert!(
            matches!(closed, Ok(Some(code)) if code == ExitCode::SUCCESS),
            "a closed pipe: {closed:?}"
        );
        let full = write_events(
            &mut Failing(std::io::ErrorKind::StorageFull),
            &events,
            true,
            &mut shown,
            None,
        );
        let err = match full {
            Err(err) => format!("{err:#}"),
            Ok(code) => panic!("a full disk was taken for the end of the output: {code:?}"),
        };
        assert!(err.contains("standard output"), "{err}");
    }

    #[test]
    fn sample_must_be_a_share() {
        assert!(sample_ppm(0.0).is_err());
        assert!(sample_ppm(1.5).is_err());
        assert_eq!(sample_ppm(0.01).ok(), Some(10_000));
        assert_eq!(sample_ppm(1.0).ok(), Some(1_000_000));
    }
}
