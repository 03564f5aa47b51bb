//! The overview page: plain HTML rendered on the node, a few lines of script that refresh the
//! header's badges and `<main>` 2 s after each refresh ends, and inline SVG charts. No
//! framework, no external asset: the page works from a machine with no network. Everything
//! shown comes from the status document, the last records of the log (summed up: trees and op
//! kinds, never keys or values) and the sampler's ring.
//!
//! Every URL the page uses is relative, so it works as well behind a proxy that mounts the
//! admin on a path (`https://ops.example/tideline/`) as at `/`. A refresh that fails, or that
//! brings something other than the fragment (a proxy's own page), leaves the page as it was
//! and marks it stale: the health badge says `unreachable` and `<main>` is dimmed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::samples::{Sample, Samples};
use crate::node::EngineNode;

/// Transactions listed under "Recent transactions".
const RECENT_TXNS: u64 = 15;

/// How the refreshed fragment begins: the script puts in the page only an answer that does
/// (a proxy's own page, a login page, is not ours).
const FRAGMENT_START: &str = "<span id=\"badges\">";

/// What one rendering shows.
pub struct View {
    status: Value,
    recent: Vec<TxnSummary>,
    samples: Vec<Sample>,
    health: (bool, String),
}

/// What "Recent transactions" shows of one: a few hundred bytes, whatever its values.
#[derive(Debug, Serialize)]
struct TxnSummary {
    offset: u64,
    gtid: String,
    ts: String,
    trees: BTreeSet<String>,
    /// Ops per kind (`put`, `delete`, ...).
    ops: BTreeMap<&'static str, usize>,
}

impl View {
    /// Reads the node now; it reads the log's last records from disk (run it off the async
    /// workers).
    pub fn gather(node: &EngineNode, samples: &Samples) -> View {
        let status = node.status();
        let last = status["last_offset"].as_u64().unwrap_or(0);
        let recent = recent_txns(node.wal_ref(), last);
        let health = super::health_of(&status);
        View {
            status,
            recent,
            samples: samples.all(),
            health,
        }
    }
}

/// The last [`RECENT_TXNS`] transactions up to offset `last`, newest first, summed up: each
/// record is dropped once its trees and op kinds are counted, so at most one is held.
fn recent_txns(wal: &tideline_wal::Wal, last: u64) -> Vec<TxnSummary> {
    let first = wal.first_offset().get();
    let from = last.saturating_sub(RECENT_TXNS - 1).max(first).max(1);
    let mut recent = Vec::new();
    if last >= from
        && let Some(start) = tideline_wal::Offset::new(from)
        && let Ok(reader) = wal.read_from(start)
    {
        for txn in reader.take(RECENT_TXNS as usize).flatten() {
            let mut ops = BTreeMap::new();
            for op in &txn.ops {
                *ops.entry(op.kind()).or_default() += 1;
            }
            recent.push(TxnSummary {
                offset: txn.offset.get(),
                gtid: txn.gtid.to_string(),
                ts: crate::render::rfc3339_us(txn.timestamp_us),
                trees: txn.ops.iter().map(|op| op.tree().to_owned()).collect(),
                ops,
            });
        }
    }
    recent.reverse();
    recent
}

/// HTML-escapes `s`.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".to_string(),
        Value::String(s) if s.is_empty() => "—".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#12324a;color:#fff;padding:12px 20px;display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:18px;margin:0}
.badge{padding:2px 8px;border-radius:10px;font-size:12px;font-weight:600;background:#2d5f82}
.ok{background:#1f7a3e}.bad{background:#b3261e}
#badges{display:inline-flex;gap:16px;align-items:baseline}
main{padding:12px 20px;display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
body.stale main{opacity:.45;filter:grayscale(1)}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:10px 14px;overflow:auto}
section.wide{grid-column:1/-1}
h2{font-size:14px;margin:0 0 8px;text-transform:uppercase;letter-spacing:.04em;color:#4a5663}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px 3px 0;border-bottom:1px solid #eef1f4;vertical-align:top}
th{font-weight:600;color:#4a5663;white-space:nowrap}
code{font:12px ui-monospace,monospace;word-break:break-all}
.bar{background:#e4e8ec;border-radius:3px;height:10px;width:160px;display:inline-block;vertical-align:middle}
.bar>span{display:block;height:100%;background:#2d7fb8;border-radius:3px}
.muted{color:#7a8794}
.err{color:#b3261e}
svg{background:#fbfcfd;border:1px solid #eef1f4}
footer{padding:0 20px 14px;color:#7a8794;font-size:12px}
"#;

const SCRIPT: &str = r#"
window.addEventListener('error', function (e) {
  document.body.dataset.jsError = String(e.message || e);
  var b = document.getElementById('js-error');
  if (b) { b.textContent = 'page script error: ' + (e.message || e); b.hidden = false; }
});
(function () {
  var n = 0;
  var shown = 'loading';
  // The page keeps what it shows and says it is stale: the health badge reads unreachable.
  function stale(why) {
    document.body.classList.add('stale');
    var health = document.getElementById('health');
    health.className = 'badge bad';
    health.textContent = 'unreachable';
    health.title = 'the last refresh failed (' + why + '): the page shows the node as of ' + shown;
    document.getElementById('updated').textContent =
      shown + ' · node unreachable (' + why + ')';
  }
  // Relative URL: under a proxy's path prefix it stays under the prefix.
  function refresh() {
    fetch('?part=main', {cache: 'no-store', credentials: 'same-origin'})
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.text(); })
      .then(function (html) {
        if (html.lastIndexOf('<span id="badges">', 0) !== 0) {
          throw new Error('the answer is not this node\'s overview');
        }
        var fresh = document.createElement('template');
        fresh.innerHTML = html;
        var badges = fresh.content.firstElementChild;
        document.getElementById('badges').replaceWith(badges);
        var main = document.querySelector('main');
        main.textContent = '';
        main.appendChild(fresh.content);
        document.body.classList.remove('stale');
        n += 1;
        document.body.dataset.refreshed = String(n);
        shown = new Date().toLocaleTimeString();
        document.getElementById('updated').textContent = shown;
      })
      .catch(function (e) { stale(e.message || String(e)); })
      .then(next, next);
  }
  // The next refresh starts once this one has ended: a slow answer never piles up fetches.
  function next() { setTimeout(refresh, 2000); }
  document.body.dataset.script = 'ok';
  refresh();
})();
"#;

/// The whole page.
pub fn document(v: &View) -> String {
    let s = &v.status;
    let uuid = text(&s["server_uuid"]);
    let role = text(&s["role"]);
    let mut h = String::with_capacity(16 << 10);
    // Footer links are relative, like the script's fetch (see the module's comment).
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>tideline {role} {short}</title><style>{STYLE}</style></head>\
         <body data-refreshed=\"0\"><header><h1>tideline</h1>{badges}\
         <code>{uuid}</code><span class=\"muted\">durability {dur}</span></header>\
         <p id=\"js-error\" class=\"err\" hidden></p><main>{main}</main>\
         <footer>updated <span id=\"updated\">now</span> · \
         <a href=\"api/status\">api/status</a> · \
         <a href=\"api/log?from=earliest&amp;limit=100\" title=\"needs Authorization: Bearer TOKEN\">api/log</a> (token) · \
         <a href=\"metrics\">metrics</a> · <a href=\"health\">health</a></footer>\
         <script>{SCRIPT}</script></body></html>",
        role = esc(&role),
        short = esc(uuid.get(..8).unwrap_or(&uuid)),
        badges = badges(v),
        uuid = esc(&uuid),
        dur = esc(&text(&s["durability"])),
        main = sections(v),
    );
    h
}

/// The refreshed part of the page (`?part=main`): the header's badges, which the script moves
/// into the header, then the content of `<main>`. It starts with [`FRAGMENT_START`].
pub fn main_section(v: &View) -> String {
    let mut h = badges(v);
    h.push_str(&sections(v));
    h
}

/// The role (read-only or not) and health badges, in one element the script replaces whole.
fn badges(v: &View) -> String {
    let s = &v.status;
    let (ok, reason) = &v.health;
    format!(
        "{FRAGMENT_START}<span class=\"badge\" id=\"role\">{role}{ro}</span>\
         <span class=\"badge {hc}\" id=\"health\" title=\"{reason}\">{hw}</span></span>",
        role = esc(&text(&s["role"])),
        ro = if s["read_only"].as_bool() == Some(true) {
            " · read-only"
        } else {
            ""
        },
        hc = if *ok { "ok" } else { "bad" },
        hw = if *ok { "healthy" } else { "unhealthy" },
        reason = esc(reason),
    )
}

/// What `<main>` holds.
fn sections(v: &View) -> String {
    let mut h = String::with_capacity(12 << 10);
    position(&mut h, v);
    charts(&mut h, &v.samples);
    upstreams(&mut h, &v.status);
    consumers(&mut h, &v.status);
    pipelines(&mut h, &v.status);
    indexes(&mut h, &v.status);
    recent(&mut h, &v.recent);
    h
}

fn position(h: &mut String, v: &View) {
    let s = &v.status;
    let (ok, reason) = &v.health;
    let _ = write!(
        h,
        "<section id=\"position\"><h2>Position</h2><table>\
         <tr><th>health</th><td class=\"{hc}\">{reason}</td></tr>\
         <tr><th>gtid_executed</th><td><code id=\"gtid-executed\">{gtids}</code></td></tr>\
         <tr><th>offsets</th><td>first {first} · last {last} · durable {durable}</td></tr>\
         <tr><th>log</th><td>{segments} segment(s), {bytes}</td></tr>\
         <tr><th>trees</th><td>{trees}</td></tr>\
         <tr><th>uptime</th><td>{uptime} s</td></tr>\
         <tr><th>QUIC</th><td>{conns} connection(s), {streams} stream(s), {monitors} monitor(s)</td></tr>\
         </table></section>",
        hc = if *ok { "" } else { "err" },
        reason = esc(reason),
        gtids = esc(&text(&s["gtid_executed"])),
        first = text(&s["first_offset"]),
        last = text(&s["last_offset"]),
        durable = text(&s["durable_offset"]),
        segments = text(&s["log"]["segments"]),
        bytes = human_bytes(s["log"]["bytes"].as_u64().unwrap_or(0)),
        trees = esc(&s["trees"]
            .as_array()
            .map(|t| t.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()),
        uptime = text(&s["uptime_s"]),
        conns = text(&s["connections"]["active"]),
        streams = text(&s["connections"]["streams"]),
        monitors = text(&s["connections"]["monitors"]),
    );
}

fn upstreams(h: &mut String, s: &Value) {
    let ups = s["upstreams"].as_array().cloned().unwrap_or_default();
    h.push_str("<section id=\"upstreams\" class=\"wide\"><h2>Upstreams</h2>");
    if ups.is_empty() {
        h.push_str("<p class=\"muted\">none: this node replicates from nobody</p></section>");
        return;
    }
    h.push_str(
        "<table><tr><th>upstream</th><th>state</th><th>lag</th><th>applied</th>\
         <th>errant GTIDs</th><th>bootstrap</th><th>error</th></tr>",
    );
    for u in &ups {
        let errant = text(&u["errant"]);
        let _ = write!(
            h,
            "<tr class=\"upstream\"><td><code>{addr}</code></td><td>{state}</td>\
             <td class=\"lag\">{lag_txns} txns · {lag_s:.3} s</td><td>{applied}</td>\
             <td class=\"{ec}\"><code>{errant}</code></td><td>{boot}</td><td class=\"err\">{error}</td></tr>",
            addr = esc(&text(&u["addr"])),
            state = esc(&text(&u["state"])),
            lag_txns = u["lag_txns"].as_u64().unwrap_or(0),
            lag_s = u["lag_seconds"].as_f64().unwrap_or(0.0),
            applied = text(&u["applied"]),
            ec = if errant == "—" { "" } else { "err" },
            errant = esc(&errant),
            boot = bootstrap_cell(&u["bootstrap"]),
            error = esc(u["error"].as_str().unwrap_or("")),
        );
    }
    h.push_str("</table></section>");
}

fn bootstrap_cell(b: &Value) -> String {
    let Some(obj) = b.as_object() else {
        return "—".to_string();
    };
    let pct = obj.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
    let mut cell = format!(
        "<span class=\"bar\" title=\"{pct:.1}%\"><span style=\"width:{w:.1}%\"></span></span> {pct:.1}%",
        w = pct.clamp(0.0, 100.0)
    );
    if let Some(rate) = obj.get("rate_bytes_per_s").and_then(Value::as_f64) {
        let _ = write!(cell, " · {}/s", human_bytes(rate as u64));
    }
    if let Some(eta) = obj.get("eta_s").and_then(Value::as_f64) {
        let _ = write!(cell, " · ETA {eta:.0} s");
    }
    if let Some(tree) = obj.get("tree").and_then(Value::as_str) {
        let _ = write!(cell, " · tree {}", esc(tree));
    }
    cell
}

fn consumers(h: &mut String, s: &Value) {
    let subs = s["consumers"].as_array().cloned().unwrap_or_default();
    let slots = s["slots"].as_array().cloned().unwrap_or_default();
    h.push_str("<section id=\"consumers\"><h2>Consumers</h2>");
    if subs.is_empty() {
        h.push_str("<p class=\"muted\">no live subscription</p>");
    } else {
        h.push_str(
            "<table><tr><th>client</th><th>from</th><th>filter</th><th>sent through</th>\
             <th>lag</th></tr>",
        );
        for c in &subs {
            let filter = match (c["tree"].as_str(), c["prefix"].as_str()) {
                (None, None) => "—".to_string(),
                (t, p) => format!(
                    "{}{}",
                    t.unwrap_or("*"),
                    p.map(|p| format!(" / {p}*")).unwrap_or_default()
                ),
            };
            let _ = write!(
                h,
                "<tr><td>{client} <span class=\"muted\">{remote}</span>{slot}</td><td><code>{start}</code></td>\
                 <td>{filter}</td><td>{through}</td><td>{lag} txns</td></tr>",
                client = esc(&text(&c["client"])),
                remote = esc(&text(&c["remote"])),
                slot = c["slot"]
                    .as_str()
                    .map(|s| format!(" · slot {}", esc(s)))
                    .unwrap_or_default(),
                start = esc(&text(&c["start"])),
                filter = esc(&filter),
                through = text(&c["sent_through"]),
                lag = c["lag_txns"].as_u64().unwrap_or(0),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2 style=\"margin-top:10px\">Slots</h2>");
    if slots.is_empty() {
        h.push_str("<p class=\"muted\">no slot</p>");
    } else {
        let last = s["last_offset"].as_u64().unwrap_or(0);
        h.push_str(
            "<table><tr><th>slot</th><th>restart offset</th><th>holds</th><th>state</th></tr>",
        );
        for sl in &slots {
            let restart = sl["restart_offset"].as_u64().unwrap_or(0);
            let state = text(&sl["state"]);
            let _ = write!(
                h,
                "<tr><td>{name}</td><td>{restart}</td><td>{held} txns</td><td class=\"{c}\">{state}{reason}</td></tr>",
                name = esc(&text(&sl["name"])),
                held = last.saturating_sub(restart.saturating_sub(1)),
                c = if state == "active" { "" } else { "err" },
                state = esc(&state),
                reason = sl["reason"]
                    .as_str()
                    .map(|r| format!(": {}", esc(r)))
                    .unwrap_or_default(),
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");
}

fn pipelines(h: &mut String, s: &Value) {
    let pipes = s["pipelines"].as_array().cloned().unwrap_or_default();
    h.push_str("<section id=\"pipelines\" class=\"wide\"><h2>Pipelines, sinks and indexes</h2>");
    if pipes.is_empty() {
        h.push_str(
            "<p class=\"muted\">none configured on this node (serve --connect FILE)</p></section>",
        );
        return;
    }
    h.push_str(
        "<table><tr><th>pipeline</th><th>source</th><th>sink</th><th>state</th><th>lag</th>\
         <th>changes</th><th>rate</th><th>errors · outages</th><th>bootstrap</th><th>error</th></tr>",
    );
    for p in &pipes {
        let state = text(&p["state"]);
        let bad = matches!(state.as_str(), "retrying" | "held" | "failed");
        let _ = write!(
            h,
            "<tr class=\"pipeline\"><td><code>{name}</code></td><td><code>{source}</code></td>\
             <td><code>{sink}</code></td><td class=\"{sc}\">{state}</td>\
             <td class=\"lag\">{lag_txns} txns · {lag_s:.3} s</td><td>{changes}</td>\
             <td>{rate}/s</td><td>{errors} · {outages}</td><td>{boot}</td>\
             <td class=\"err\">{error}</td></tr>",
            name = esc(&text(&p["name"])),
            source = esc(&text(&p["source"])),
            sink = esc(&text(&p["sink"])),
            sc = if bad { "err" } else { "" },
            state = esc(&state),
            lag_txns = p["lag_txns"].as_u64().unwrap_or(0),
            lag_s = p["lag_seconds"].as_f64().unwrap_or(0.0),
            changes = text(&p["changes"]),
            rate = text(&p["rate_changes_per_s"]),
            errors = text(&p["errors"]),
            outages = text(&p["outages"]),
            boot = bootstrap_cell(&p["bootstrap"]),
            error = esc(p["last_error"].as_str().unwrap_or("")),
        );
    }
    h.push_str("</table></section>");
}

fn indexes(h: &mut String, s: &Value) {
    let idxs = s["indexes"].as_array().cloned().unwrap_or_default();
    h.push_str("<section id=\"indexes\" class=\"wide\"><h2>Secondary indexes</h2>");
    if idxs.is_empty() {
        h.push_str(
            "<p class=\"muted\">none: declare one with <code>tideline index create</code></p>\
             </section>",
        );
        return;
    }
    h.push_str(
        "<table><tr><th>tree</th><th>index</th><th>paths</th><th>state</th><th>entries</th>\
         <th>skipped</th><th>duplicates</th></tr>",
    );
    for i in &idxs {
        let state = match i["state"].as_str() {
            Some("backfilling") => {
                let pct = i["percent"].as_f64().unwrap_or(0.0);
                format!(
                    "backfilling <span class=\"bar\" title=\"{pct:.1}%\"><span \
                     style=\"width:{w:.1}%\"></span></span> {pct:.1}% · {rate} docs/s",
                    w = pct.clamp(0.0, 100.0),
                    rate = i["docs_per_s"].as_f64().unwrap_or(0.0),
                )
            }
            Some("failed") => format!("failed: {}", esc(&text(&i["reason"]))),
            other => esc(other.unwrap_or("?")),
        };
        let paths = i["paths"]
            .as_array()
            .map(|p| p.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr class=\"index\"><td>{tree}</td><td><code>{name}</code>{unique}</td>\
             <td><code>{paths}</code></td><td>{state}</td><td>{entries}</td><td>{skipped}</td>\
             <td class=\"{dc}\">{dups}</td></tr>",
            tree = esc(&text(&i["tree"])),
            name = esc(&text(&i["name"])),
            unique = if i["unique"] == true { " (unique)" } else { "" },
            paths = esc(&paths),
            entries = text(&i["entries"]),
            skipped = text(&i["skipped"]),
            dc = if i["duplicates"].as_u64().unwrap_or(0) > 0 {
                "err"
            } else {
                ""
            },
            dups = text(&i["duplicates"]),
        );
    }
    h.push_str("</table></section>");
}

fn recent(h: &mut String, txns: &[TxnSummary]) {
    h.push_str("<section id=\"recent\" class=\"wide\"><h2>Recent transactions</h2>");
    if txns.is_empty() {
        h.push_str("<p class=\"muted\">the log holds no transaction yet</p></section>");
        return;
    }
    h.push_str(
        "<table><tr><th>offset</th><th>GTID</th><th>time</th><th>trees</th><th>ops</th></tr>",
    );
    for t in txns {
        let trees = t.trees.iter().map(String::as_str).collect::<Vec<_>>();
        let kinds = t
            .ops
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            h,
            "<tr><td>{offset}</td><td><code>{gtid}</code></td><td>{ts}</td><td>{trees}</td><td>{kinds}</td></tr>",
            offset = t.offset,
            gtid = esc(&t.gtid),
            ts = esc(&t.ts),
            trees = esc(&trees.join(", ")),
            kinds = esc(&kinds),
        );
    }
    h.push_str("</table></section>");
}

fn charts(h: &mut String, samples: &[Sample]) {
    h.push_str("<section id=\"charts\" class=\"wide\"><h2>Last minutes</h2>");
    if samples.len() < 2 {
        h.push_str("<p class=\"muted\">collecting samples (one a second)…</p></section>");
        return;
    }
    chart(h, "commit rate (records/s)", samples, |s| s.commit_rate);
    chart(h, "replication lag (s)", samples, |s| s.lag_seconds);
    h.push_str("</section>");
}

fn chart(h: &mut String, title: &str, samples: &[Sample], y: fn(&Sample) -> f64) {
    const W: f64 = 560.0;
    const H: f64 = 90.0;
    let max = samples.iter().map(y).fold(0.0, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let t0 = samples[0].t_us;
    let span = (samples[samples.len() - 1].t_us - t0).max(1) as f64;
    let mut points = String::new();
    for s in samples {
        let px = (s.t_us - t0) as f64 / span * W;
        let py = H - y(s) / scale * (H - 4.0);
        let _ = write!(points, "{px:.1},{py:.1} ");
    }
    let now = samples.last().map(y).unwrap_or(0.0);
    let _ = write!(
        h,
        "<figure style=\"display:inline-block;margin:0 18px 6px 0\">\
         <figcaption>{title}: now {now:.2}, max {max:.2}</figcaption>\
         <svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{title}\">\
         <polyline fill=\"none\" stroke=\"#2d7fb8\" stroke-width=\"1.5\" points=\"{points}\"/></svg></figure>",
        title = esc(title),
    );
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    /// The overview lists the last transactions by tree and op kind only: gathering them
    /// must not hold (or render) their keys and values, which may be MiBs each and are read
    /// again every 2 s for each open tab.
    #[test]
    fn the_recent_transactions_summary_holds_no_values() {
        use std::sync::Arc;
        use tideline_wal::{Gtid, MemStorage, NewTransaction, Op, Wal, WalOptions};

        const VALUE_BYTES: usize = 1 << 20;
        let wal = Wal::open(Arc::new(MemStorage::new()), WalOptions::default()).unwrap();
        for seq in 1..=RECENT_TXNS + 2 {
            // Binary values, the largest rendering (base64).
            let ops = vec![
                Op::Put {
                    tree: "blobs".into(),
                    key: format!("k{seq}").into_bytes(),
                    value: vec![0xff; VALUE_BYTES],
                    before: Some(vec![0xfe; VALUE_BYTES]),
                },
                Op::Delete {
                    tree: "gone".into(),
                    key: vec![0xfd; VALUE_BYTES],
                    before: Some(vec![0xfc; VALUE_BYTES]),
                },
            ];
            let txn = NewTransaction {
                gtid: Gtid::new(wal.server_uuid(), seq).unwrap(),
                timestamp_us: 0,
                ops,
            };
            wal.submit(txn).unwrap().wait().unwrap();
        }
        let last = RECENT_TXNS + 2;
        let summary = recent_txns(&wal, last);
        assert_eq!(summary.len(), RECENT_TXNS as usize);
        let held = serde_json::to_string(&summary).unwrap().len();
        assert!(
            held < 4096,
            "the summary of {RECENT_TXNS} transactions holds {held} bytes: values were decoded \
             into it"
        );
        let mut h = String::new();
        recent(&mut h, &summary);
        assert!(
            h.contains("<td>blobs, gone</td><td>1 delete, 1 put</td>"),
            "{h}"
        );
        assert!(
            h.contains(&format!("<tr><td>{last}</td>")),
            "newest first: {h}"
        );
    }

    /// A view of a node whose status is `status`, with no record and no sample.
    fn view_of(status: Value) -> View {
        let health = super::super::health_of(&status);
        View {
            status,
            recent: Vec::new(),
            samples: Vec::new(),
            health,
        }
    }

    /// The header's badges are part of what the page's refresh replaces: a page left open
    /// shows the node's health and role as of the last refresh, not as of its loading.
    #[test]
    fn the_refreshed_fragment_carries_the_header_badges() {
        let healthy = view_of(serde_json::json!({"role": "primary", "read_only": false}));
        let fragment = main_section(&healthy);
        assert!(
            fragment.contains(
                "<span class=\"badge ok\" id=\"health\" title=\"accepting writes\">healthy</span>"
            ),
            "{fragment}"
        );
        assert!(
            fragment.contains("<span class=\"badge\" id=\"role\">primary</span>"),
            "{fragment}"
        );

        let unhealthy = view_of(serde_json::json!({
            "role": "replica",
            "read_only": true,
            "fail_stop": "the <log> failed",
        }));
        let fragment = main_section(&unhealthy);
        assert!(
            fragment.contains(
                "<span class=\"badge bad\" id=\"health\" title=\"fail-stop: the &lt;log&gt; failed\">unhealthy</span>"
            ),
            "{fragment}"
        );
        assert!(
            fragment.contains("<span class=\"badge\" id=\"role\">replica · read-only</span>"),
            "{fragment}"
        );
        // The whole page shows the same badges once, in its header.
        let page = document(&unhealthy);
        assert_eq!(page.matches("id=\"health\"").count(), 1, "{page}");
        let header = page.split("</header>").next().unwrap_or_default();
        assert!(header.contains(">unhealthy</span>"), "{header}");
    }

    /// Behind a proxy that mounts the admin on a path prefix (`https://ops.example/tideline/`)
    /// an absolute URL leaves the prefix: the refresh fetched the proxy's own root page and
    /// put it in the page. Every URL the page uses is relative.
    #[test]
    fn the_page_fetches_and_links_relative_to_where_it_is_served() {
        let page = document(&view_of(serde_json::json!({"role": "primary"})));
        for absolute in ["fetch('/", "fetch(\"/", "href=\"/", "src=\"/", "action=\"/"] {
            assert!(!page.contains(absolute), "{absolute} in {page}");
        }
        assert!(page.contains("fetch('?part=main'"), "{page}");
        for link in ["api/status", "api/log?from=earliest", "metrics", "health"] {
            assert!(
                page.contains(&format!("href=\"{link}")),
                "no relative link to {link}: {page}"
            );
        }
        // An answer that is not the overview's fragment (a proxy's login page, say) is not
        // put in the page: the script looks for the fragment's first element.
        let fragment = main_section(&view_of(serde_json::json!({"role": "primary"})));
        assert!(fragment.starts_with(FRAGMENT_START), "{fragment}");
        assert!(page.contains(&format!("'{FRAGMENT_START}'")), "{page}");
    }

    /// A refresh starts 2 s after the previous one ended, never while it runs: a slow answer
    /// (a debug build reading large records) must not pile fetches on the node.
    #[test]
    fn the_page_refreshes_after_each_answer_not_on_an_interval() {
        let page = document(&view_of(serde_json::json!({"role": "primary"})));
        assert!(!page.contains("setInterval"), "{page}");
        assert!(page.contains("setTimeout(refresh, 2000)"), "{page}");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
