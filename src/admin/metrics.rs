//! The Prometheus recorder and the node's metric names. Counters and histograms on hot paths
//! are recorded where they happen (the log's writer, the commit path); gauges and totals the
//! node already keeps are copied in by the sampler once a second. `docs/OPERATIONS.md` lists
//! every series.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install_recorder() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                // Series of consumers and upstreams that went away stop being exported.
                .idle_timeout(MetricKindMask::GAUGE, Some(Duration::from_secs(60)));
            let builder = builder
                .set_buckets_for_metric(
                    Matcher::Full("tideline_log_fsync_seconds".into()),
                    &[
                        0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tideline_log_group_commit_records".into()),
                        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("tideline_commit_seconds".into()),
                        &[
                            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0,
                        ],
                    )
                })
                .expect("bucket lists are non-empty constants");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tideline_commits_total",
        "Client transactions committed by this node"
    );
    describe_counter!(
        "tideline_commit_ops_total",
        "Operations in client transactions committed by this node"
    );
    describe_counter!(
        "tideline_commit_errors_total",
        "Client transactions refused or failed, by code"
    );
    describe_histogram!(
        "tideline_commit_seconds",
        Unit::Seconds,
        "Client commit latency, acknowledged under the node's durability"
    );
    describe_counter!(
        "tideline_log_records_total",
        "Records in this node's log since it was created (its last offset)"
    );
    describe_counter!(
        "tideline_log_written_bytes_total",
        Unit::Bytes,
        "Bytes the log writer wrote"
    );
    describe_histogram!(
        "tideline_log_fsync_seconds",
        Unit::Seconds,
        "Duration of each log fsync"
    );
    describe_histogram!(
        "tideline_log_group_commit_records",
        "Records per group-commit write"
    );
    describe_gauge!("tideline_log_first_offset", "First offset still in the log");
    describe_gauge!(
        "tideline_log_last_offset",
        "Last offset applied by the engine"
    );
    describe_gauge!(
        "tideline_log_durable_offset",
        "Last offset covered by an fsync"
    );
    describe_gauge!(
        "tideline_log_bytes",
        Unit::Bytes,
        "Size of the log's segments"
    );
    describe_gauge!("tideline_log_segments", "Segment files in the log");
    describe_gauge!(
        "tideline_read_only",
        "1 when the node refuses client writes"
    );
    describe_gauge!("tideline_fail_stop", "1 once the node has fail-stopped");
    describe_gauge!(
        "tideline_bootstrapping",
        "1 while the node copies an upstream's state"
    );
    describe_gauge!(
        "tideline_upstream_connected",
        "1 when the upstream is connected and applying"
    );
    describe_gauge!(
        "tideline_replication_lag_transactions",
        "Upstream transactions not applied here yet"
    );
    describe_gauge!(
        "tideline_replication_lag_seconds",
        Unit::Seconds,
        "Age of the oldest upstream transaction not applied here"
    );
    describe_counter!(
        "tideline_replication_applied_total",
        "Transactions applied from the upstream's log since this node started (a bootstrap copy is not counted)"
    );
    describe_gauge!(
        "tideline_bootstrap_bytes",
        Unit::Bytes,
        "Bytes copied by the running or last bootstrap"
    );
    describe_gauge!(
        "tideline_bootstrap_ratio",
        "Estimated share of the running or last bootstrap done (0..1)"
    );
    describe_counter!(
        "tideline_bootstrap_served_chunks_total",
        "Bootstrap chunks this node served to replicas"
    );
    describe_gauge!(
        "tideline_slot_lag_transactions",
        "Log records after a slot's restart offset"
    );
    describe_gauge!(
        "tideline_slot_active",
        "1 while the slot holds the log, 0 once invalidated"
    );
    describe_gauge!(
        "tideline_consumer_lag_transactions",
        "Records a live subscription has not been sent yet"
    );
    describe_gauge!("tideline_consumers", "Live subscriptions");
    describe_gauge!(
        "tideline_index_entries",
        "Entries of a secondary index (documents indexed)"
    );
    describe_gauge!(
        "tideline_index_skipped_total",
        "Documents a secondary index skips now (not JSON, a path missing, object or array)"
    );
    describe_gauge!(
        "tideline_index_duplicates",
        "Duplicates a unique index met (backfill, or applied from an upstream)"
    );
    describe_gauge!(
        "tideline_index_state",
        "1 for the secondary index's state (backfilling, live, failed), 0 for the others"
    );
    describe_gauge!(
        "tideline_index_backfill_ratio",
        "Share of a secondary index's backfill done (0..1; 1 once live)"
    );
    describe_gauge!(
        "tideline_quic_connections",
        "Open QUIC connections, handshakes included"
    );
    describe_counter!(
        "tideline_quic_connections_total",
        "QUIC connections accepted"
    );
    describe_counter!(
        "tideline_quic_refused_total",
        "QUIC connections refused, by reason"
    );
    describe_gauge!("tideline_quic_streams", "Open QUIC streams");
    describe_counter!("tideline_requests_total", "Client requests, by kind");
    describe_gauge!("tideline_monitors", "Attached live monitors");
    describe_gauge!(
        "tideline_pipeline_lag_txns",
        "Source transactions a pipeline's sink has not stored yet"
    );
    describe_gauge!(
        "tideline_pipeline_lag_seconds",
        Unit::Seconds,
        "Age of the last transaction a pipeline stored while it is behind; 0 when caught up"
    );
    describe_counter!(
        "tideline_pipeline_changes_total",
        "Changes (ops, bootstrap rows) a pipeline's sink stored since start"
    );
    describe_counter!(
        "tideline_pipeline_errors_total",
        "Failed sink calls of a pipeline since start"
    );
    describe_counter!(
        "tideline_pipeline_outages_total",
        "Separate sink outages of a pipeline since start"
    );
    describe_gauge!(
        "tideline_pipeline_state",
        "1 for a pipeline's current state (starting, bootstrapping, running, retrying, held, failed)"
    );
}
