//! Prometheus metrics of every keel process, exposed on `/metrics` (OpenMetrics text).
//!
//! One registry per process ([`metrics`]); each component updates the families it owns. Names
//! follow Prometheus conventions: `keel_` prefix, units in the name, `_total` on counters.
//! `docs/operations.md` says which to alert on.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub group: String,
    /// applied, duplicate, ignored, dead_lettered.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IgnoredLabels {
    pub group: String,
    /// The record's full type name (`keel.orders.OrderRefunded`).
    pub event_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub group: String,
    /// unavailable, transient.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommitLabels {
    pub group: String,
    /// committed, failed.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub group: String,
    pub topic: String,
    pub partition: i32,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 1 ms to about 65 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Batch sizes from 1 to 16384 rows.
fn rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

/// Declares every metric once: the field, its constructor, and its registration (name, unit, help),
/// so a metric cannot exist without being exposed. Registration follows declaration order, which
/// is the order families appear on `/metrics`.
macro_rules! metrics {
    (@register $registry:ident, $name:literal, $help:literal, $metric:expr) => {
        $registry.register($name, $help, $metric)
    };
    (@register $registry:ident, $name:literal, $help:literal, $metric:expr, $unit:ident) => {
        $registry.register_with_unit($name, $help, Unit::$unit, $metric)
    };
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $new:expr,
            name: $name:literal, $(unit: $unit:ident,)? help: $help:literal;
    )*) => {
        /// Every metric family of a keel process; [`metrics`] holds the process's one instance.
        pub struct Metrics {
            registry: Registry,
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Metrics {
            fn new() -> Self {
                let mut registry = Registry::default();
                $(
                    let $field: $ty = $new;
                    metrics!(@register registry, $name, $help, $field.clone() $(, $unit)?);
                )*
                Metrics { registry, $($field),* }
            }
        }
    };
}

// The name is registered without the suffixes prometheus-client appends: `_total` on counters,
// `_seconds` from the unit.
metrics! {
    /// `keel_http_requests_total{method, route, status}`.
    http_requests: Family<HttpLabels, Counter> = Family::default(),
        name: "keel_http_requests", help: "HTTP requests answered";
    /// `keel_http_request_duration_seconds{method, route}`.
    http_duration: Histograms<RouteLabels> = Family::new_with_constructor(seconds),
        name: "keel_http_request_duration", unit: Seconds, help: "HTTP request latency";
    /// `keel_outbox_pending_rows`: rows committed, not yet published (nor set aside).
    outbox_pending: Gauge = Gauge::default(),
        name: "keel_outbox_pending_rows", help: "Outbox rows committed and not yet published";
    /// `keel_outbox_oldest_pending_age_seconds`: 0 when nothing is pending.
    outbox_oldest_age: Gauge<f64, AtomicU64> = Gauge::default(),
        name: "keel_outbox_oldest_pending_age", unit: Seconds,
        help: "Age of the oldest pending outbox row";
    /// `keel_outbox_failed_rows`: rows set aside as unpublishable.
    outbox_failed: Gauge = Gauge::default(),
        name: "keel_outbox_failed_rows", help: "Outbox rows set aside as unpublishable";
    /// `keel_relay_published_total{topic}`.
    relay_published: Family<TopicLabels, Counter> = Family::default(),
        name: "keel_relay_published", help: "Records the relay published and Kafka acknowledged";
    /// `keel_relay_failed_total{topic}`: deliveries Kafka did not acknowledge (retried).
    relay_failed: Family<TopicLabels, Counter> = Family::default(),
        name: "keel_relay_failed",
        help: "Deliveries Kafka did not acknowledge (the batch is retried)";
    /// `keel_relay_batch_size_rows`.
    relay_batch_size: Histogram = rows(),
        name: "keel_relay_batch_size_rows", help: "Rows per relay batch";
    /// `keel_relay_commit_to_ack_seconds`: from the writer's commit to Kafka's acknowledgement.
    relay_commit_to_ack: Histogram = seconds(),
        name: "keel_relay_commit_to_ack", unit: Seconds,
        help: "From the outbox row's commit to Kafka's acknowledgement";
    /// `keel_consumer_records_total{group, outcome}`.
    consumer_records: Family<OutcomeLabels, Counter> = Family::default(),
        name: "keel_consumer_records", help: "Records a group finished, by outcome";
    /// `keel_consumer_ignored_records_total{group, event_type}`: records skipped because the
    /// group does not handle their type, or this build does not know it (a newer producer's).
    consumer_ignored: Family<IgnoredLabels, Counter> = Family::default(),
        name: "keel_consumer_ignored_records",
        help: "Records a group skipped, by type: one it does not handle or this build does not know";
    /// `keel_consumer_retries_total{group, class}`.
    consumer_retries: Family<RetryLabels, Counter> = Family::default(),
        name: "keel_consumer_retries", help: "Attempts a group will retry, by error class";
    /// `keel_consumer_processing_seconds{group}`: one record, decode to commit, retries included
    /// (a batch's time shared among its records).
    consumer_processing: Histograms<GroupLabels> = Family::new_with_constructor(seconds),
        name: "keel_consumer_processing", unit: Seconds,
        help: "Time to finish one record, retries included";
    /// `keel_consumer_batch_records{group}`: records applied per transaction.
    consumer_batch: Histograms<GroupLabels> = Family::new_with_constructor(rows),
        name: "keel_consumer_batch_records", help: "Records a group applied in one transaction";
    /// `keel_consumer_assigned_partitions{group}`: partitions this instance owns now. Zero on
    /// every instance of a lagging group means its rebalance does not complete.
    consumer_assigned: Family<GroupLabels, Gauge> = Family::default(),
        name: "keel_consumer_assigned_partitions",
        help: "Partitions this instance of the group owns";
    /// `keel_consumer_end_to_end_seconds{group}`: from the event's `occurred_at` to the group's
    /// commit.
    consumer_end_to_end: Histograms<GroupLabels> = Family::new_with_constructor(seconds),
        name: "keel_consumer_end_to_end", unit: Seconds,
        help: "From the event's occurred_at to the group's commit";
    /// `keel_consumer_partitions_revoked_total{group}`: partitions this instance gave up in a
    /// rebalance (another instance joined or left, or this one was thrown out of the group).
    consumer_revoked: Family<GroupLabels, Counter> = Family::default(),
        name: "keel_consumer_partitions_revoked",
        help: "Partitions this instance of the group gave up in rebalances";
    /// `keel_consumer_lag_records{group, topic, partition}`: for each partition this instance
    /// owns, records between the group's committed offset and the partition's end, from
    /// librdkafka's statistics every ten seconds.
    consumer_lag: Family<PartitionLabels, Gauge> = Family::default(),
        name: "keel_consumer_lag_records",
        help: "Records between the group's committed offset and the partition's end";
    /// `keel_consumer_commits_total{group, result}`: offset commits as the cluster answered them
    /// (committed, failed); an idle interval with nothing to commit is not counted.
    consumer_commits: Family<CommitLabels, Counter> = Family::default(),
        name: "keel_consumer_commits", help: "Offset commits a group sent, by the cluster's answer";
    /// `keel_consumer_dead_letter_waiting_records{group}`: records whose dead-letter write is not
    /// acknowledged yet. Each holds its partition: above zero for long means the dead-letter
    /// topic cannot be written (missing, or too few in-sync replicas).
    consumer_dead_letter_waiting: Family<GroupLabels, Gauge> = Family::default(),
        name: "keel_consumer_dead_letter_waiting_records",
        help: "Records waiting for their dead-letter write to be acknowledged (each holds its partition)";
    /// `keel_consumer_dead_letter_write_seconds{group}`: from the decision to dead-letter a record
    /// to the write's acknowledgement, retries included.
    consumer_dead_letter_write: Histograms<GroupLabels> = Family::new_with_constructor(seconds),
        name: "keel_consumer_dead_letter_write", unit: Seconds,
        help: "Time to write a record to its dead-letter topic, retries included";
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric in the OpenMetrics text format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &metrics().registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = metrics();
        m.relay_published
            .get_or_create(&TopicLabels {
                topic: "orders".into(),
            })
            .inc();
        m.consumer_processing
            .get_or_create(&GroupLabels {
                group: "inventory".into(),
            })
            .observe(0.004);
        let text = render();
        assert!(
            text.contains("keel_relay_published_total{topic=\"orders\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "keel_consumer_processing_seconds_bucket{le=\"0.004\",group=\"inventory\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE keel_outbox_oldest_pending_age_seconds gauge"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// Every family touched once with fixed labels on a fresh registry (not [`metrics`], which
    /// other tests share), so a change to any name, help text, unit, type, label set, bucket
    /// layout or the registration order shows up here.
    #[test]
    fn renders_every_family_unchanged() {
        let m = Metrics::new();
        let group = || GroupLabels {
            group: "inventory".into(),
        };
        let topic = || TopicLabels {
            topic: "orders".into(),
        };
        m.http_requests
            .get_or_create(&HttpLabels {
                method: "POST".into(),
                route: "/orders".into(),
                status: 201,
            })
            .inc();
        m.http_duration
            .get_or_create(&RouteLabels {
                method: "POST".into(),
                route: "/orders".into(),
            })
            .observe(0.003);
        m.outbox_pending.set(2);
        m.outbox_oldest_age.set(1.5);
        m.outbox_failed.set(1);
        m.relay_published.get_or_create(&topic()).inc();
        m.relay_failed.get_or_create(&topic()).inc();
        m.relay_batch_size.observe(3.0);
        m.relay_commit_to_ack.observe(0.02);
        m.consumer_records
            .get_or_create(&OutcomeLabels {
                group: "inventory".into(),
                outcome: "applied".into(),
            })
            .inc();
        m.consumer_ignored
            .get_or_create(&IgnoredLabels {
                group: "inventory".into(),
                event_type: "keel.orders.OrderRefunded".into(),
            })
            .inc();
        m.consumer_retries
            .get_or_create(&RetryLabels {
                group: "inventory".into(),
                class: "transient".into(),
            })
            .inc();
        m.consumer_processing.get_or_create(&group()).observe(0.004);
        m.consumer_batch.get_or_create(&group()).observe(5.0);
        m.consumer_assigned.get_or_create(&group()).set(3);
        m.consumer_end_to_end.get_or_create(&group()).observe(0.5);
        m.consumer_revoked.get_or_create(&group()).inc_by(2);
        m.consumer_lag
            .get_or_create(&PartitionLabels {
                group: "inventory".into(),
                topic: "orders".into(),
                partition: 0,
            })
            .set(7);
        m.consumer_commits
            .get_or_create(&CommitLabels {
                group: "inventory".into(),
                result: "failed".into(),
            })
            .inc();
        m.consumer_dead_letter_waiting
            .get_or_create(&group())
            .set(1);
        m.consumer_dead_letter_write
            .get_or_create(&group())
            .observe(20.0);

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        assert_eq!(text, EXPECTED, "\n{text}");
    }

    /// `/metrics` as dashboards and alerts (`docs/operations.md`) expect it: change it only on
    /// purpose.
    const EXPECTED: &str = r#"# HELP keel_http_requests HTTP requests answered.
# TYPE keel_http_requests counter
keel_http_requests_total{method="POST",route="/orders",status="201"} 1
# HELP keel_http_request_duration_seconds HTTP request latency.
# TYPE keel_http_request_duration_seconds histogram
# UNIT keel_http_request_duration_seconds seconds
keel_http_request_duration_seconds_sum{method="POST",route="/orders"} 0.003
keel_http_request_duration_seconds_count{method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.001",method="POST",route="/orders"} 0
keel_http_request_duration_seconds_bucket{le="0.002",method="POST",route="/orders"} 0
keel_http_request_duration_seconds_bucket{le="0.004",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.008",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.016",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.032",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.064",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.128",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.256",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="0.512",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="1.024",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="2.048",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="4.096",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="8.192",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="16.384",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="32.768",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="65.536",method="POST",route="/orders"} 1
keel_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/orders"} 1
# HELP keel_outbox_pending_rows Outbox rows committed and not yet published.
# TYPE keel_outbox_pending_rows gauge
keel_outbox_pending_rows 2
# HELP keel_outbox_oldest_pending_age_seconds Age of the oldest pending outbox row.
# TYPE keel_outbox_oldest_pending_age_seconds gauge
# UNIT keel_outbox_oldest_pending_age_seconds seconds
keel_outbox_oldest_pending_age_seconds 1.5
# HELP keel_outbox_failed_rows Outbox rows set aside as unpublishable.
# TYPE keel_outbox_failed_rows gauge
keel_outbox_failed_rows 1
# HELP keel_relay_published Records the relay published and Kafka acknowledged.
# TYPE keel_relay_published counter
keel_relay_published_total{topic="orders"} 1
# HELP keel_relay_failed Deliveries Kafka did not acknowledge (the batch is retried).
# TYPE keel_relay_failed counter
keel_relay_failed_total{topic="orders"} 1
# HELP keel_relay_batch_size_rows Rows per relay batch.
# TYPE keel_relay_batch_size_rows histogram
keel_relay_batch_size_rows_sum 3.0
keel_relay_batch_size_rows_count 1
keel_relay_batch_size_rows_bucket{le="1.0"} 0
keel_relay_batch_size_rows_bucket{le="2.0"} 0
keel_relay_batch_size_rows_bucket{le="4.0"} 1
keel_relay_batch_size_rows_bucket{le="8.0"} 1
keel_relay_batch_size_rows_bucket{le="16.0"} 1
keel_relay_batch_size_rows_bucket{le="32.0"} 1
keel_relay_batch_size_rows_bucket{le="64.0"} 1
keel_relay_batch_size_rows_bucket{le="128.0"} 1
keel_relay_batch_size_rows_bucket{le="256.0"} 1
keel_relay_batch_size_rows_bucket{le="512.0"} 1
keel_relay_batch_size_rows_bucket{le="1024.0"} 1
keel_relay_batch_size_rows_bucket{le="2048.0"} 1
keel_relay_batch_size_rows_bucket{le="4096.0"} 1
keel_relay_batch_size_rows_bucket{le="8192.0"} 1
keel_relay_batch_size_rows_bucket{le="16384.0"} 1
keel_relay_batch_size_rows_bucket{le="+Inf"} 1
# HELP keel_relay_commit_to_ack_seconds From the outbox row's commit to Kafka's acknowledgement.
# TYPE keel_relay_commit_to_ack_seconds histogram
# UNIT keel_relay_commit_to_ack_seconds seconds
keel_relay_commit_to_ack_seconds_sum 0.02
keel_relay_commit_to_ack_seconds_count 1
keel_relay_commit_to_ack_seconds_bucket{le="0.001"} 0
keel_relay_commit_to_ack_seconds_bucket{le="0.002"} 0
keel_relay_commit_to_ack_seconds_bucket{le="0.004"} 0
keel_relay_commit_to_ack_seconds_bucket{le="0.008"} 0
keel_relay_commit_to_ack_seconds_bucket{le="0.016"} 0
keel_relay_commit_to_ack_seconds_bucket{le="0.032"} 1
keel_relay_commit_to_ack_seconds_bucket{le="0.064"} 1
keel_relay_commit_to_ack_seconds_bucket{le="0.128"} 1
keel_relay_commit_to_ack_seconds_bucket{le="0.256"} 1
keel_relay_commit_to_ack_seconds_bucket{le="0.512"} 1
keel_relay_commit_to_ack_seconds_bucket{le="1.024"} 1
keel_relay_commit_to_ack_seconds_bucket{le="2.048"} 1
keel_relay_commit_to_ack_seconds_bucket{le="4.096"} 1
keel_relay_commit_to_ack_seconds_bucket{le="8.192"} 1
keel_relay_commit_to_ack_seconds_bucket{le="16.384"} 1
keel_relay_commit_to_ack_seconds_bucket{le="32.768"} 1
keel_relay_commit_to_ack_seconds_bucket{le="65.536"} 1
keel_relay_commit_to_ack_seconds_bucket{le="+Inf"} 1
# HELP keel_consumer_records Records a group finished, by outcome.
# TYPE keel_consumer_records counter
keel_consumer_records_total{group="inventory",outcome="applied"} 1
# HELP keel_consumer_ignored_records Records a group skipped, by type: one it does not handle or this build does not know.
# TYPE keel_consumer_ignored_records counter
keel_consumer_ignored_records_total{group="inventory",event_type="keel.orders.OrderRefunded"} 1
# HELP keel_consumer_retries Attempts a group will retry, by error class.
# TYPE keel_consumer_retries counter
keel_consumer_retries_total{group="inventory",class="transient"} 1
# HELP keel_consumer_processing_seconds Time to finish one record, retries included.
# TYPE keel_consumer_processing_seconds histogram
# UNIT keel_consumer_processing_seconds seconds
keel_consumer_processing_seconds_sum{group="inventory"} 0.004
keel_consumer_processing_seconds_count{group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.001",group="inventory"} 0
keel_consumer_processing_seconds_bucket{le="0.002",group="inventory"} 0
keel_consumer_processing_seconds_bucket{le="0.004",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.008",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.016",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.032",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.064",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.128",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.256",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="0.512",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="1.024",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="2.048",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="4.096",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="8.192",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="16.384",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="32.768",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="65.536",group="inventory"} 1
keel_consumer_processing_seconds_bucket{le="+Inf",group="inventory"} 1
# HELP keel_consumer_batch_records Records a group applied in one transaction.
# TYPE keel_consumer_batch_records histogram
keel_consumer_batch_records_sum{group="inventory"} 5.0
keel_consumer_batch_records_count{group="inventory"} 1
keel_consumer_batch_records_bucket{le="1.0",group="inventory"} 0
keel_consumer_batch_records_bucket{le="2.0",group="inventory"} 0
keel_consumer_batch_records_bucket{le="4.0",group="inventory"} 0
keel_consumer_batch_records_bucket{le="8.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="16.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="32.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="64.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="128.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="256.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="512.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="1024.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="2048.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="4096.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="8192.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="16384.0",group="inventory"} 1
keel_consumer_batch_records_bucket{le="+Inf",group="inventory"} 1
# HELP keel_consumer_assigned_partitions Partitions this instance of the group owns.
# TYPE keel_consumer_assigned_partitions gauge
keel_consumer_assigned_partitions{group="inventory"} 3
# HELP keel_consumer_end_to_end_seconds From the event's occurred_at to the group's commit.
# TYPE keel_consumer_end_to_end_seconds histogram
# UNIT keel_consumer_end_to_end_seconds seconds
keel_consumer_end_to_end_seconds_sum{group="inventory"} 0.5
keel_consumer_end_to_end_seconds_count{group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="0.001",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.002",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.004",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.008",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.016",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.032",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.064",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.128",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.256",group="inventory"} 0
keel_consumer_end_to_end_seconds_bucket{le="0.512",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="1.024",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="2.048",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="4.096",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="8.192",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="16.384",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="32.768",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="65.536",group="inventory"} 1
keel_consumer_end_to_end_seconds_bucket{le="+Inf",group="inventory"} 1
# HELP keel_consumer_partitions_revoked Partitions this instance of the group gave up in rebalances.
# TYPE keel_consumer_partitions_revoked counter
keel_consumer_partitions_revoked_total{group="inventory"} 2
# HELP keel_consumer_lag_records Records between the group's committed offset and the partition's end.
# TYPE keel_consumer_lag_records gauge
keel_consumer_lag_records{group="inventory",topic="orders",partition="0"} 7
# HELP keel_consumer_commits Offset commits a group sent, by the cluster's answer.
# TYPE keel_consumer_commits counter
keel_consumer_commits_total{group="inventory",result="failed"} 1
# HELP keel_consumer_dead_letter_waiting_records Records waiting for their dead-letter write to be acknowledged (each holds its partition).
# TYPE keel_consumer_dead_letter_waiting_records gauge
keel_consumer_dead_letter_waiting_records{group="inventory"} 1
# HELP keel_consumer_dead_letter_write_seconds Time to write a record to its dead-letter topic, retries included.
# TYPE keel_consumer_dead_letter_write_seconds histogram
# UNIT keel_consumer_dead_letter_write_seconds seconds
keel_consumer_dead_letter_write_seconds_sum{group="inventory"} 20.0
keel_consumer_dead_letter_write_seconds_count{group="inventory"} 1
keel_consumer_dead_letter_write_seconds_bucket{le="0.001",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.002",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.004",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.008",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.016",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.032",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.064",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.128",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.256",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="0.512",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="1.024",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="2.048",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="4.096",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="8.192",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="16.384",group="inventory"} 0
keel_consumer_dead_letter_write_seconds_bucket{le="32.768",group="inventory"} 1
keel_consumer_dead_letter_write_seconds_bucket{le="65.536",group="inventory"} 1
keel_consumer_dead_letter_write_seconds_bucket{le="+Inf",group="inventory"} 1
# EOF
"#;
}
