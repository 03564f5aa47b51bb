//! Once a second: a sample of commit rate and replication lag for the page's charts (an
//! in-memory ring of the last minutes), and the node's gauges and totals copied into the
//! metrics recorder. Owns the ring; reads the node; writes nothing else.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::Admin;

/// Samples kept: five minutes at one a second.
const SAMPLES_MAX: usize = 300;
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// One point of the charts.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Microseconds since the epoch.
    pub t_us: i64,
    /// The log's last offset then.
    pub last_offset: u64,
    /// Records per second since the previous sample.
    pub commit_rate: f64,
    /// Largest replication lag over the upstreams, in seconds.
    pub lag_seconds: f64,
}

/// The ring of samples.
pub struct Samples {
    ring: Mutex<VecDeque<Sample>>,
}

impl Samples {
    pub fn new() -> Self {
        Samples {
            ring: Mutex::new(VecDeque::with_capacity(SAMPLES_MAX)),
        }
    }

    /// The samples, oldest first.
    pub fn all(&self) -> Vec<Sample> {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    fn push(&self, t_us: i64, last_offset: u64, lag_seconds: f64) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let commit_rate = ring.back().map_or(0.0, |prev| {
            let dt = (t_us - prev.t_us) as f64 / 1e6;
            if dt > 0.0 {
                last_offset.saturating_sub(prev.last_offset) as f64 / dt
            } else {
                0.0
            }
        });
        if ring.len() == SAMPLES_MAX {
            ring.pop_front();
        }
        ring.push_back(Sample {
            t_us,
            last_offset,
            commit_rate,
            lag_seconds,
        });
    }
}

/// Samples until aborted.
pub async fn run(admin: Arc<Admin>) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status = admin.node.status();
        let last = status["last_offset"].as_u64().unwrap_or(0);
        let lag = status["upstreams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["lag_seconds"].as_f64())
            .fold(0.0, f64::max);
        admin.samples.push(crate::now_us(), last, lag);
        export(&admin, &status);
        admin.metrics.run_upkeep();
    }
}

/// `value` as a label value the recorder exports unchanged. Its exposition writer takes a
/// backslash for the start of an escape (`\"` comes out as `\"`, read back as `"`; `\\` as
/// `\\`, read back as one backslash), so every backslash is doubled here and comes out as
/// `\\`. Quotes and line feeds it escapes itself. Every label value from the node's state goes
/// through this: pipeline and client names may hold backslashes.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\")
}

fn flag(v: &Value) -> f64 {
    if v.as_bool() == Some(true) { 1.0 } else { 0.0 }
}

/// Each slot's lag (the records it holds: 0 once invalidated, as an invalidated slot holds
/// nothing) and whether it is active; `last` is the log's last offset.
fn export_slots(status: &Value, last: u64) {
    use metrics::gauge;
    for s in status["slots"].as_array().into_iter().flatten() {
        let labels = [("slot", label(s["name"].as_str().unwrap_or("?")))];
        let restart = s["restart_offset"].as_u64().unwrap_or(0);
        let active = s["state"].as_str().is_none_or(|st| st == "active");
        let held = if active {
            last.saturating_sub(restart.saturating_sub(1))
        } else {
            0
        };
        gauge!("tideline_slot_lag_transactions", &labels).set(held as f64);
        gauge!("tideline_slot_active", &labels).set(if active { 1.0 } else { 0.0 });
    }
}

/// Copies the status document and the server's counters into the recorder.
fn export(admin: &Admin, status: &Value) {
    use metrics::{counter, gauge};
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let last = num(&status["last_offset"]);
    counter!("tideline_log_records_total").absolute(last);
    gauge!("tideline_log_last_offset").set(last as f64);
    gauge!("tideline_log_first_offset").set(num(&status["first_offset"]) as f64);
    gauge!("tideline_log_durable_offset").set(num(&status["durable_offset"]) as f64);
    let stats = admin.node.wal_ref().stats();
    gauge!("tideline_log_bytes").set(stats.total_bytes as f64);
    gauge!("tideline_log_segments").set(stats.segments.len() as f64);
    gauge!("tideline_read_only").set(flag(&status["read_only"]));
    gauge!("tideline_fail_stop").set(if status["fail_stop"].is_null() {
        0.0
    } else {
        1.0
    });
    gauge!("tideline_bootstrapping").set(flag(&status["bootstrapping"]));
    counter!("tideline_bootstrap_served_chunks_total")
        .absolute(num(&status["bootstrap_served"]["chunks"]));

    for u in status["upstreams"].as_array().into_iter().flatten() {
        let labels = [("upstream", label(u["addr"].as_str().unwrap_or("?")))];
        gauge!("tideline_upstream_connected", &labels).set(if u["state"] == "connected" {
            1.0
        } else {
            0.0
        });
        gauge!("tideline_replication_lag_transactions", &labels).set(num(&u["lag_txns"]) as f64);
        gauge!("tideline_replication_lag_seconds", &labels)
            .set(u["lag_seconds"].as_f64().unwrap_or(0.0));
        // Applied from the upstream's log since this node started, as a counter resets with
        // the process; `applied` would add a bootstrap copy (every GTID it brought) at once.
        counter!("tideline_replication_applied_total", &labels)
            .absolute(num(&u["applied_since_start"]));
        if let Some(b) = u["bootstrap"].as_object() {
            gauge!("tideline_bootstrap_bytes", &labels)
                .set(b.get("bytes").and_then(Value::as_u64).unwrap_or(0) as f64);
            if let Some(p) = b.get("percent").and_then(Value::as_f64) {
                gauge!("tideline_bootstrap_ratio", &labels).set(p / 100.0);
            }
        }
    }
    for p in status["pipelines"].as_array().into_iter().flatten() {
        let labels = [("pipeline", label(p["name"].as_str().unwrap_or("?")))];
        gauge!("tideline_pipeline_lag_txns", &labels).set(num(&p["lag_txns"]) as f64);
        gauge!("tideline_pipeline_lag_seconds", &labels)
            .set(p["lag_seconds"].as_f64().unwrap_or(0.0));
        counter!("tideline_pipeline_changes_total", &labels).absolute(num(&p["changes"]));
        counter!("tideline_pipeline_errors_total", &labels).absolute(num(&p["errors"]));
        counter!("tideline_pipeline_outages_total", &labels).absolute(num(&p["outages"]));
        let state = p["state"].as_str().unwrap_or("?");
        for st in tideline_connectors::PipelineState::ALL {
            let labels = [
                ("pipeline", labels[0].1.clone()),
                ("state", st.as_str().to_string()),
            ];
            gauge!("tideline_pipeline_state", &labels).set(if st.as_str() == state {
                1.0
            } else {
                0.0
            });
        }
    }
    export_slots(status, last);
    let consumers = status["consumers"].as_array().cloned().unwrap_or_default();
    for i in status["indexes"].as_array().into_iter().flatten() {
        let labels = [
            ("tree", label(i["tree"].as_str().unwrap_or_default())),
            ("index", label(i["name"].as_str().unwrap_or_default())),
        ];
        gauge!("tideline_index_entries", &labels).set(num(&i["entries"]) as f64);
        // Documents of the tree the index skips right now (not JSON, path missing, object
        // or array at a path): a count that also goes down, exported under the name the
        // design fixes.
        gauge!("tideline_index_skipped_total", &labels).set(num(&i["skipped"]) as f64);
        gauge!("tideline_index_duplicates", &labels).set(num(&i["duplicates"]) as f64);
        for state in ["backfilling", "live", "failed"] {
            let mut l = labels.to_vec();
            l.push(("state", state.to_string()));
            gauge!("tideline_index_state", &l).set(flag(&Value::Bool(i["state"] == state)));
        }
        gauge!("tideline_index_backfill_ratio", &labels).set(match i["state"].as_str() {
            Some("backfilling") => i["percent"].as_f64().unwrap_or(0.0) / 100.0,
            _ => 1.0,
        });
    }
    gauge!("tideline_consumers").set(consumers.len() as f64);
    for c in &consumers {
        let labels = [
            ("remote", label(c["remote"].as_str().unwrap_or("?"))),
            ("client", label(c["client"].as_str().unwrap_or("?"))),
        ];
        gauge!("tideline_consumer_lag_transactions", &labels).set(num(&c["lag_txns"]) as f64);
    }
    let observer = admin.node.observer();
    gauge!("tideline_quic_connections").set(observer.connections_active() as f64);
    counter!("tideline_quic_connections_total").absolute(observer.connections_total());
    gauge!("tideline_quic_streams").set(observer.streams_active() as f64);
    for reason in tideline_stream::RefuseReason::ALL {
        counter!("tideline_quic_refused_total", "reason" => reason.label())
            .absolute(observer.refused(reason));
    }
    for (kind, n) in observer.requests() {
        counter!("tideline_requests_total", "kind" => kind).absolute(n);
    }
    gauge!("tideline_monitors").set(observer.monitors() as f64);
}

#[cfg(test)]
mod tests {
    use super::{export_slots, label};

    /// An invalidated slot holds nothing (OPERATIONS.md, "Retention and slots"), so its lag is
    /// 0 however far the log has moved on; an active slot's lag is what it holds.
    #[test]
    fn an_invalidated_slot_exports_no_lag() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let status = serde_json::json!({"slots": [
            {"name": "gone", "restart_offset": 2, "state": "invalidated"},
            {"name": "live", "restart_offset": 31, "state": "active"},
        ]});
        metrics::with_local_recorder(&recorder, || export_slots(&status, 40));
        let text = handle.render();
        assert!(
            text.contains(r#"tideline_slot_lag_transactions{slot="gone"} 0"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tideline_slot_lag_transactions{slot="live"} 10"#),
            "{text}"
        );
    }

    /// What the recorder writes for a label value passed through [`label`] reads back as that
    /// value under the exposition format's escapes (`\\`, `\"`, `\n`); a recorder that
    /// escapes backslashes itself would make this fail with doubled backslashes.
    #[test]
    fn a_label_value_with_backslashes_is_exported_unchanged() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // a \ " b \ \ c \ n, a line feed, a trailing backslash.
        let name = "a\\\"b\\\\c\\n\nd\\";
        metrics::with_local_recorder(&recorder, || {
            metrics::gauge!("x", &[("pipeline", label(name))]).set(1.0);
        });
        let text = handle.render();
        assert!(
            text.contains(r#"x{pipeline="a\\\"b\\\\c\\n\nd\\"} 1"#),
            "{text}"
        );
    }
}
