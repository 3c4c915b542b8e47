//! What librdkafka tells the consumer from its own threads: rebalances (for the quirks'
//! positions, [`super::quirks`]), the result of every offset commit, fatal errors (a fenced
//! static member: [`keel_core::fatal`]) and its statistics, from which the group's lag is read.
//!
//! What it promises: a commit the cluster refuses is never silent. Each one is logged (with
//! the partitions it carried) and counted in `keel_consumer_commits_total{result="failed"}`;
//! the offsets stay stored and the next auto-commit (every second) sends them again, so a
//! refused commit costs redelivery, which the dedupe rows absorb, not records.
//!
//! # Lag
//! Every `statistics.interval.ms` (10 s) librdkafka reports, for each partition this instance
//! owns, the records between the group's committed offset and the partition's end
//! (`consumer_lag`), from what it already knows: no request, no client of its own. Each instance
//! reports the partitions it owns, so summing over instances gives the group's lag; a partition
//! it no longer owns is dropped from its gauge.

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};

use super::quirks::Positions;

/// The consumer's context.
pub struct Context {
    group: String,
    /// With the tansu quirk on, where each partition stands.
    pub(super) positions: Positions,
    pub(super) reporter: keel_core::kafka::Reporter,
    /// The partitions whose lag the last statistics reported.
    lagging: std::sync::Mutex<Vec<keel_core::metrics::PartitionLabels>>,
}

impl Context {
    pub(super) fn new(group: &str, fatal: keel_core::fatal::Fatal) -> Self {
        Self {
            group: group.to_owned(),
            positions: Positions::default(),
            reporter: keel_core::kafka::Reporter::new(format!("consumer {group}"), fatal),
            lagging: std::sync::Mutex::default(),
        }
    }

    /// Sets the lag gauge of each partition `stats` says this instance fetches, and drops the
    /// partitions it no longer does.
    fn measured(&self, stats: &Statistics) {
        let gauge = &keel_core::metrics::metrics().consumer_lag;
        let mut now = Vec::new();
        for (topic, t) in &stats.topics {
            for p in t.partitions.values() {
                // -1 is librdkafka's internal unassigned partition.
                if p.partition < 0 || !p.desired {
                    continue;
                }
                // librdkafka's lag needs a committed offset; a group that never committed on
                // the partition has all of it to read, from the log's start (as `keel lag` counts).
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.committed_offset < 0 && p.hi_offset >= 0 && p.lo_offset >= 0 {
                    p.hi_offset - p.lo_offset
                } else {
                    continue; // not known yet
                };
                let labels = keel_core::metrics::PartitionLabels {
                    group: self.group.clone(),
                    topic: topic.clone(),
                    partition: p.partition,
                };
                gauge.get_or_create(&labels).set(lag);
                now.push(labels);
            }
        }
        let Ok(mut before) = self.lagging.lock() else {
            return;
        };
        for gone in before.iter().filter(|l| !now.contains(l)) {
            gauge.remove(gone);
        }
        *before = now;
    }

    /// Counts and, if it failed, logs one commit's `result`.
    fn committed(&self, result: &KafkaResult<()>, offsets: &TopicPartitionList) {
        let outcome = match result {
            Ok(()) => "committed",
            // Nothing was stored since the last commit: librdkafka's auto-commit says so every
            // interval of an idle group. Not a commit at all.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => return,
            Err(e) => {
                let partitions: Vec<String> = offsets
                    .elements()
                    .iter()
                    .map(|p| format!("{}/{}@{:?}", p.topic(), p.partition(), p.offset()))
                    .collect();
                tracing::warn!(
                    group = self.group, error = %e, ?partitions,
                    "Offset commit failed; the stored offsets are sent again at the next commit"
                );
                "failed"
            }
        };
        keel_core::metrics::metrics()
            .consumer_commits
            .get_or_create(&keel_core::metrics::CommitLabels {
                group: self.group.clone(),
                result: outcome.to_owned(),
            })
            .inc();
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        self.reporter.report(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        self.measured(&statistics);
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.positions.forget(rebalance);
        if let Rebalance::Revoke(partitions) = rebalance {
            tracing::info!(
                group = self.group,
                partitions = partitions.count(),
                "Partitions revoked"
            );
            keel_core::metrics::metrics()
                .consumer_revoked
                .get_or_create(&keel_core::metrics::GroupLabels {
                    group: self.group.clone(),
                })
                .inc_by(partitions.count() as u64);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.committed(&result, offsets);
    }
}
