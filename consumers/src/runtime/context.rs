//! What librdkafka tells the consumer from its own threads: rebalances (for the quirks'
//! positions, [`super::quirks`]) and the result of every offset commit.
//!
//! What it promises: a commit the cluster refuses is never silent. Each one is logged (with
//! the partitions it carried) and counted in `keel_consumer_commits_total{result="failed"}`;
//! the offsets stay stored and the next auto-commit (every second) sends them again, so a
//! refused commit costs redelivery, which the dedupe rows absorb, not records.

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::{ClientContext, TopicPartitionList};

use super::quirks::Positions;

/// The consumer's context.
pub struct Context {
    group: String,
    /// With the tansu quirk on, where each partition stands.
    pub(super) positions: Positions,
}

impl Context {
    pub(super) fn new(group: &str) -> Self {
        Self {
            group: group.to_owned(),
            positions: Positions::default(),
        }
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

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.positions.forget(rebalance);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.committed(&result, offsets);
    }
}
