//! What the `bench` commands share: the run directory, progress bars, records, goals.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tideline_wal::{Durability, FileStorage, Op, Storage, Wal, WalOptions};

use crate::client_cmd::output::outln;

/// Async durability as `tideline serve --durability async` sets it: fsync every 10 ms.
pub const ASYNC_10MS: Durability = Durability::Async {
    interval: Duration::from_millis(10),
};

/// What a report's table printer returns: `()` when it cannot fail (peer-bench's tables, with
/// `println!`), or whether its lines could be written (`tideline bench`'s, through
/// `client_cmd::output`, where a reader gone away is not a failure).
pub trait TablePrinted {
    /// The printer's outcome as a result.
    fn into_result(self) -> anyhow::Result<()>;
}

impl TablePrinted for () {
    fn into_result(self) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TablePrinted for anyhow::Result<()> {
    fn into_result(self) -> anyhow::Result<()> {
        self
    }
}

/// Most seconds a timed `bench` phase may last: a day, far past any useful run, and far
/// below what `Duration::from_secs_f64` refuses.
pub const PHASE_SECONDS_MAX: f64 = 86_400.0;

/// Parses `--seconds`: a finite number of seconds, above 0 and at most a day, so a phase
/// always ends and its duration is one `Duration` can hold (NaN, a negative or a huge value
/// panicked in `Duration::from_secs_f64` after the run directory was made).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds; give one such as 3 or 0.5"))?;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > PHASE_SECONDS_MAX {
        return Err(format!(
            "{s} seconds: give a number above 0 and at most {PHASE_SECONDS_MAX} (a day)"
        ));
    }
    Ok(seconds)
}

/// Most concurrent writer threads a `bench` phase starts: beyond this, thread creation
/// fails before any measurement does.
pub const WRITERS_MAX: u64 = 1024;

/// Parses a writer count: 1 to [`WRITERS_MAX`] (0 writers measure nothing and print NaN).
pub fn writers_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=WRITERS_MAX)
}

/// Runs a benchmark in a fresh directory `DIR/NAME-PID` (removed afterwards unless `keep`),
/// then prints its report: one JSON object with `json`, else the table `print` draws.
pub fn run_in_dir<P: TablePrinted>(
    dir: &Path,
    name: &str,
    keep: bool,
    json: bool,
    run: impl FnOnce(&Path) -> anyhow::Result<Value>,
    print: impl FnOnce(&Value) -> P,
) -> anyhow::Result<ExitCode> {
    crate::log_cmd::refuse_node_dir(dir, "bench")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let root = dir.join(format!("{name}-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    let result = run(&root);
    if !keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    let report = result?;
    if json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        print(&report).into_result()?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {percent:>3}% {per_sec:>14} eta {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_owned());
    pb
}

/// One put of `value` under the big-endian key `seq`, in tree `bench`.
pub fn put(seq: u64, value: &[u8]) -> Vec<Op> {
    vec![Op::Put {
        tree: "bench".into(),
        key: seq.to_be_bytes().to_vec(),
        value: value.to_vec(),
        before: None,
    }]
}

/// Opens (or creates) a log in `dir`; `skip_fsync` only for diagnostics, and only in a build
/// with the `bench-without-fsync` feature (which turns on the log's test-only switches).
pub fn open_wal_with(dir: &Path, durability: Durability, skip_fsync: bool) -> anyhow::Result<Wal> {
    #[cfg(not(feature = "bench-without-fsync"))]
    if skip_fsync {
        anyhow::bail!(
            "this build cannot run the log without fsync: rebuild with \
             `--features bench-without-fsync` (a diagnostic build; never deploy it)"
        );
    }
    let storage: Arc<dyn Storage> =
        Arc::new(FileStorage::new(dir).with_context(|| format!("create {}", dir.display()))?);
    let opts = WalOptions {
        durability,
        #[cfg(feature = "bench-without-fsync")]
        unsafe_skip_fsync: skip_fsync,
        ..WalOptions::default()
    };
    Wal::open(storage, opts).with_context(|| format!("open a log in {}", dir.display()))
}

/// Opens (or creates) a log in `dir`.
pub fn open_wal(dir: &Path, durability: Durability) -> anyhow::Result<Wal> {
    open_wal_with(dir, durability, false)
}

/// The `p` quantile (0..=1) of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A goal's verdict, as the reports list them.
pub fn goal(name: &str, value: f64, target: f64, unit: &str, higher_is_better: bool) -> Value {
    let met = if higher_is_better {
        value >= target
    } else {
        value <= target
    };
    json!({
        "goal": name,
        "value": value,
        "target": target,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "met": met,
    })
}

/// Prints the `goals` of a report, one line each, met or MISSED, for a table printer that
/// cannot fail (peer-bench's): a closed pipe ends the output quietly, any other write failure
/// panics, as `println!` would.
pub fn print_goals(r: &Value) {
    if let Err(e) = write_goals(r) {
        panic!("{}", crate::error_line(&e));
    }
}

/// Prints the `goals` of a report, one line each, met or MISSED. A closed pipe is `Ok` (the
/// end of the output); any other write failure is an error.
pub fn write_goals(r: &Value) -> anyhow::Result<()> {
    outln!("goals:")?;
    for g in r["goals"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let op = if g["higher_is_better"].as_bool() == Some(true) {
            ">="
        } else {
            "<="
        };
        outln!(
            "  {:<6} {:<40} {:>12.3} {} (goal {op} {})",
            if g["met"].as_bool() == Some(true) {
                "met"
            } else {
                "MISSED"
            },
            g["goal"].as_str().unwrap_or(""),
            g["value"].as_f64().unwrap_or(f64::NAN),
            g["unit"].as_str().unwrap_or(""),
            g["target"]
        )?;
    }
    Ok(())
}

/// Reads `count` transactions from a subscription and returns, for each, the delay in
/// microseconds from its commit timestamp to its arrival.
pub async fn collect_delays(
    sub: &mut tideline_stream::Subscription,
    count: u64,
) -> anyhow::Result<Vec<i64>> {
    let mut lat = Vec::with_capacity(count as usize);
    while (lat.len() as u64) < count {
        match sub.next().await.context("read the subscription")? {
            Some(tideline_stream::Event::Batch(batch)) => {
                let now = crate::now_us();
                lat.extend(batch.iter().map(|t| now - t.timestamp_us));
            }
            // Unfiltered: no progress reports; nothing to do with one anyway.
            Some(
                tideline_stream::Event::Heartbeat { .. } | tideline_stream::Event::Progress { .. },
            ) => {}
            None => anyhow::bail!("the node ended the subscription"),
        }
    }
    Ok(lat)
}
