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
use prometheus_client::metrics::gauge::Gauge;
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
pub struct RetryLabels {
    pub group: String,
    /// unavailable, transient.
    pub class: String,
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

pub struct Metrics {
    registry: Registry,
    /// `keel_http_requests_total{method, route, status}`.
    pub http_requests: Family<HttpLabels, Counter>,
    /// `keel_http_request_duration_seconds{method, route}`.
    pub http_duration: Histograms<RouteLabels>,
    /// `keel_outbox_pending_rows`: rows committed, not yet published (nor set aside).
    pub outbox_pending: Gauge,
    /// `keel_outbox_oldest_pending_age_seconds`: 0 when nothing is pending.
    pub outbox_oldest_age: Gauge<f64, AtomicU64>,
    /// `keel_outbox_failed_rows`: rows set aside as unpublishable.
    pub outbox_failed: Gauge,
    /// `keel_relay_published_total{topic}`.
    pub relay_published: Family<TopicLabels, Counter>,
    /// `keel_relay_failed_total{topic}`: deliveries Kafka did not acknowledge (retried).
    pub relay_failed: Family<TopicLabels, Counter>,
    /// `keel_relay_batch_size_rows`.
    pub relay_batch_size: Histogram,
    /// `keel_relay_commit_to_ack_seconds`: from the writer's commit to Kafka's acknowledgement.
    pub relay_commit_to_ack: Histogram,
    /// `keel_consumer_records_total{group, outcome}`.
    pub consumer_records: Family<OutcomeLabels, Counter>,
    /// `keel_consumer_retries_total{group, class}`.
    pub consumer_retries: Family<RetryLabels, Counter>,
    /// `keel_consumer_processing_seconds{group}`: one record, decode to commit, retries included
    /// (a batch's time shared among its records).
    pub consumer_processing: Histograms<GroupLabels>,
    /// `keel_consumer_batch_records{group}`: records applied per transaction.
    pub consumer_batch: Histograms<GroupLabels>,
    /// `keel_consumer_assigned_partitions{group}`: partitions this instance owns now. Zero on
    /// every instance of a lagging group means its rebalance does not complete.
    pub consumer_assigned: Family<GroupLabels, Gauge>,
    /// `keel_consumer_end_to_end_seconds{group}`: from the event's `occurred_at` to the group's
    /// commit.
    pub consumer_end_to_end: Histograms<GroupLabels>,
    /// `keel_consumer_lag_records{group, topic, partition}`: records between the group's committed
    /// offset and the partition's end, measured every ten seconds.
    pub consumer_lag: Family<PartitionLabels, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(seconds),
            outbox_pending: Gauge::default(),
            outbox_oldest_age: Gauge::default(),
            outbox_failed: Gauge::default(),
            relay_published: Family::default(),
            relay_failed: Family::default(),
            relay_batch_size: rows(),
            relay_commit_to_ack: seconds(),
            consumer_records: Family::default(),
            consumer_retries: Family::default(),
            consumer_processing: Family::new_with_constructor(seconds),
            consumer_batch: Family::new_with_constructor(rows),
            consumer_assigned: Family::default(),
            consumer_end_to_end: Family::new_with_constructor(seconds),
            consumer_lag: Family::default(),
        };
        registry.register(
            "keel_http_requests",
            "HTTP requests answered",
            m.http_requests.clone(),
        );
        registry.register_with_unit(
            "keel_http_request_duration",
            "HTTP request latency",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        registry.register(
            "keel_outbox_pending_rows",
            "Outbox rows committed and not yet published",
            m.outbox_pending.clone(),
        );
        registry.register_with_unit(
            "keel_outbox_oldest_pending_age",
            "Age of the oldest pending outbox row",
            Unit::Seconds,
            m.outbox_oldest_age.clone(),
        );
        registry.register(
            "keel_outbox_failed_rows",
            "Outbox rows set aside as unpublishable",
            m.outbox_failed.clone(),
        );
        registry.register(
            "keel_relay_published",
            "Records the relay published and Kafka acknowledged",
            m.relay_published.clone(),
        );
        registry.register(
            "keel_relay_failed",
            "Deliveries Kafka did not acknowledge (the batch is retried)",
            m.relay_failed.clone(),
        );
        registry.register(
            "keel_relay_batch_size_rows",
            "Rows per relay batch",
            m.relay_batch_size.clone(),
        );
        registry.register_with_unit(
            "keel_relay_commit_to_ack",
            "From the outbox row's commit to Kafka's acknowledgement",
            Unit::Seconds,
            m.relay_commit_to_ack.clone(),
        );
        registry.register(
            "keel_consumer_records",
            "Records a group finished, by outcome",
            m.consumer_records.clone(),
        );
        registry.register(
            "keel_consumer_retries",
            "Attempts a group will retry, by error class",
            m.consumer_retries.clone(),
        );
        registry.register_with_unit(
            "keel_consumer_processing",
            "Time to finish one record, retries included",
            Unit::Seconds,
            m.consumer_processing.clone(),
        );
        registry.register(
            "keel_consumer_batch_records",
            "Records a group applied in one transaction",
            m.consumer_batch.clone(),
        );
        registry.register(
            "keel_consumer_assigned_partitions",
            "Partitions this instance of the group owns",
            m.consumer_assigned.clone(),
        );
        registry.register_with_unit(
            "keel_consumer_end_to_end",
            "From the event's occurred_at to the group's commit",
            Unit::Seconds,
            m.consumer_end_to_end.clone(),
        );
        registry.register(
            "keel_consumer_lag_records",
            "Records between the group's committed offset and the partition's end",
            m.consumer_lag.clone(),
        );
        Metrics { registry, ..m }
    }
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
}
