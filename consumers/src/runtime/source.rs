//! The source: records from Kafka, in offset order per partition, and the positions the runtime
//! expects each partition to deliver next.
//!
//! # Gaps
//! A partition delivers its offsets in order; the runtime checks that each record is the one
//! that should come next (the first one after an assignment: the committed offset). If records
//! are missing before it, the fetch skipped them, and the runtime drops the record and reads the
//! partition again from before the gap (1, 2, 4, ... records back, at most 65,536), dropping
//! the records before the gap as they come, since they are done. tansu 0.6 skips records this
//! way: asked for an offset in the middle of a batch a producer wrote, it answers from the next
//! batch on, so a group resuming from a committed offset inside a batch (every restart, every
//! rebalance) lost the rest of that batch (found by `make chaos`). Apache Kafka answers with the
//! batch that holds the offset; there a gap is only ever a compacted topic or a transaction
//! marker, not used by keel. What the runtime cannot see: a partition whose committed offset is
//! inside its last batch gets nothing until the next record is written to it, then heals.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;

use super::Consumer;
use super::handler::Handler;

/// How far back a consumer reads a partition again to recover records a fetch skipped.
const MAX_GAP_REWIND: i64 = 1 << 16;

/// The consumer's context: the next offset each partition should deliver, forgotten for the
/// partitions of every rebalance (they resume from their committed offsets).
#[derive(Default)]
pub struct Positions {
    /// By topic, then partition (looked up by `&str`: no allocation per record).
    expected: Mutex<std::collections::HashMap<String, std::collections::HashMap<i32, Position>>>,
}

#[derive(Clone, Copy)]
struct Position {
    /// The next offset to deliver.
    next: i64,
    /// How far before `next` the partition is being read again (0: it is not).
    back: i64,
}

impl rdkafka::ClientContext for Positions {}

impl rdkafka::consumer::ConsumerContext for Positions {
    fn pre_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        use rdkafka::consumer::Rebalance;
        let (Rebalance::Assign(list) | Rebalance::Revoke(list)) = rebalance else {
            return;
        };
        if let Ok(mut expected) = self.expected.lock() {
            for p in list.elements() {
                if let Some(partitions) = expected.get_mut(p.topic()) {
                    partitions.remove(&p.partition());
                }
            }
        }
    }
}

impl<H: Handler> Consumer<H> {
    /// The next record, or `None` if `shutdown` came first.
    pub async fn next(&self, shutdown: &CancellationToken) -> Option<BorrowedMessage<'_>> {
        loop {
            // Waiting for records is progress: beat at least every second while idle.
            keel_core::health::beat(&self.health_loop);
            self.watch_membership();
            let error = tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                m = self.consumer.recv() => match m {
                    Ok(m) => {
                        if self.admit(&m) {
                            return Some(m);
                        }
                        continue;
                    }
                    Err(e) => e,
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            tracing::warn!(group = self.handler.group(), error = %error, "Kafka consumer error");
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Whether `m` is the record its partition should deliver next. A record after a gap (the
    /// fetch skipped records: see "Gaps" in the module doc) is dropped and the partition is
    /// read again from before the gap, going back 1, 2, 4, ... records until the gap's first
    /// record comes; the records before it, already done, are then dropped as they come.
    fn admit(&self, m: &BorrowedMessage<'_>) -> bool {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let known = {
            let Ok(mut expected) = self.consumer.context().expected.lock() else {
                return true;
            };
            let position = expected
                .get_mut(topic)
                .and_then(|partitions| partitions.get_mut(&partition));
            match position {
                // The usual case, in place under one lock.
                Some(p) if p.back == 0 && offset == p.next => {
                    p.next += 1;
                    return true;
                }
                p => p.copied(),
            }
        };
        // The first record of a partition since it was assigned must be its committed offset.
        let position = match known {
            Some(position) => Some(position),
            None => self
                .committed(m.topic(), m.partition())
                .map(|next| Position { next, back: 0 }),
        };
        let Some(position) = position else {
            self.set_position(topic, partition, offset + 1, 0);
            return true;
        };
        if offset < position.next && position.back > 0 {
            return false; // read again to reach the gap; already done
        }
        if offset <= position.next || position.back >= MAX_GAP_REWIND {
            if offset > position.next {
                tracing::warn!(
                    group = self.handler.group(),
                    topic = m.topic(),
                    partition = m.partition(),
                    missing_from = position.next,
                    missing_to = offset - 1,
                    "Records never delivered although read again; going on without them"
                );
            }
            self.set_position(topic, partition, offset + 1, 0);
            return true;
        }
        let back = (position.back * 2).max(1);
        let from = (position.next - back).max(0);
        match self.consumer.seek(
            m.topic(),
            m.partition(),
            rdkafka::Offset::Offset(from),
            Duration::from_secs(5),
        ) {
            Ok(()) => {
                tracing::warn!(
                    group = self.handler.group(),
                    topic = m.topic(),
                    partition = m.partition(),
                    missing_from = position.next,
                    missing_to = offset - 1,
                    reading_from = from,
                    "The fetch skipped records; reading the partition again from before them"
                );
                let back = if from == 0 { MAX_GAP_REWIND } else { back };
                self.set_position(topic, partition, position.next, back);
                false
            }
            Err(e) => {
                tracing::warn!(
                    group = self.handler.group(), topic = m.topic(), partition = m.partition(),
                    missing_from = position.next, missing_to = offset - 1, error = %e,
                    "The fetch skipped records and the partition cannot be read again; going on without them"
                );
                self.set_position(topic, partition, offset + 1, 0);
                true
            }
        }
    }

    fn set_position(&self, topic: &str, partition: i32, next: i64, back: i64) {
        if let Ok(mut expected) = self.consumer.context().expected.lock() {
            expected
                .entry(topic.to_owned())
                .or_default()
                .insert(partition, Position { next, back });
        }
    }

    /// The group's committed offset of a partition, if it has one.
    fn committed(&self, topic: &str, partition: i32) -> Option<i64> {
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition(topic, partition);
        let committed = self
            .consumer
            .committed_offsets(list, Duration::from_secs(5))
            .ok()?;
        match committed.find_partition(topic, partition)?.offset() {
            rdkafka::Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// The records librdkafka already holds, at least one and at most the batch size; empty if
    /// `shutdown` came first. Waits only for the first: a batch never waits for more records.
    pub async fn next_batch(&self, shutdown: &CancellationToken) -> Vec<BorrowedMessage<'_>> {
        let Some(first) = self.next(shutdown).await else {
            return Vec::new();
        };
        let mut batch = vec![first];
        self.fill(&mut batch).await;
        batch
    }

    /// The records librdkafka already holds, at most the batch size; empty if there are none.
    /// Never waits.
    pub(super) async fn ready_batch(&self) -> Vec<BorrowedMessage<'_>> {
        let mut batch = Vec::new();
        self.fill(&mut batch).await;
        batch
    }

    async fn fill<'a>(&'a self, batch: &mut Vec<BorrowedMessage<'a>>) {
        while batch.len() < self.batch_size {
            // A zero timeout polls `recv` once: a record already fetched, or nothing.
            let Ok(polled) = tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await
            else {
                break;
            };
            match polled {
                Ok(m) => {
                    if !self.admit(&m) {
                        break;
                    }
                    batch.push(m);
                }
                Err(e) => {
                    tracing::warn!(group = self.handler.group(), error = %e, "Kafka consumer error");
                    break;
                }
            }
        }
    }

    /// Marks the record done: its offset will be committed. Fails after the record's partition
    /// was revoked; that is harmless (the new owner redelivers it and sees a duplicate), so the
    /// loop logs it and goes on.
    pub fn store(&self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        self.consumer.store_offset_from_message(message)?;
        Ok(())
    }
}
