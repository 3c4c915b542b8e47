//! The local broker's quirks, behind `KEEL_BROKER_QUIRKS=tansu`: nothing here is on the path
//! against Apache Kafka (the default).
//!
//! # Gaps
//! tansu 0.6, asked for an offset in the middle of a batch a producer wrote, answers from the
//! next batch on, so a group resuming from a committed offset inside a batch (every restart,
//! every rebalance) would lose the rest of that batch (found by `make chaos`). With the quirk on,
//! the runtime checks that each record is the one its partition should deliver next (the first
//! one after an assignment: the committed offset). If records are missing before it, the fetch
//! skipped them: the runtime drops the record and reads the partition again from before the gap
//! (1, 2, 4, ... records back, at most [`MAX_GAP_REWIND`]), dropping the records before the gap
//! as they come, since they are done. What it cannot see: a partition whose committed offset is
//! inside its last batch gets nothing until the next record is written to it, then heals; so
//! does one fetched again inside its last batch after a pause (a record waiting out an outage
//! pauses the partitions once the wait outlasts the poll budget, see `in_group_while`).
//!
//! Apache Kafka answers with the batch that holds the offset, and there a gap is legitimate
//! (retention passed a committed offset, a compacted topic, transaction markers): re-reading it
//! would cost seeks and a false warning, which is why this is a quirk and not the core path.
//!
//! The machine itself is [`judge`], pure; the committed-offset lookup and the seek it may call
//! for are blocking librdkafka calls, run on the blocking pool, never on an async worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::BorrowedMessage;

use super::Consumer;
use super::context::Context;
use super::handler::Handler;

/// How far back a consumer reads a partition again to recover records a fetch skipped.
pub const MAX_GAP_REWIND: i64 = 1 << 16;

/// With the quirk on, the next offset each partition should deliver,
/// forgotten for the partitions of every rebalance (they resume from their committed offsets).
/// Empty, and never consulted, without it.
#[derive(Default)]
pub struct Positions {
    /// By topic, then partition (looked up by `&str`: no allocation per record).
    expected: Mutex<HashMap<String, HashMap<i32, Position>>>,
}

/// Where a partition stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The next offset to deliver.
    pub next: i64,
    /// How far before `next` the partition is being read again (0: it is not).
    pub back: i64,
}

impl Position {
    /// Where a partition stands once the record at `offset` is delivered.
    fn delivered(offset: i64) -> Self {
        Position {
            next: offset + 1,
            back: 0,
        }
    }
}

/// What to do with a record, given its partition's [`Position`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The record is due (or a redelivery of one before it): deliver it.
    Deliver,
    /// Read again on the way back to a gap, and already done: drop it.
    Drop,
    /// Records before it never came: drop it and read the partition again from `from`.
    Rewind { from: i64 },
    /// Records before it never came although the partition was read again from as far back as
    /// allowed: deliver it and go on without them.
    GiveUp,
}

/// The gap machine: the verdict on the record at `offset` and the partition's position after it.
pub fn judge(position: Position, offset: i64) -> (Verdict, Position) {
    let delivered = Position::delivered(offset);
    if offset < position.next && position.back > 0 {
        return (Verdict::Drop, position);
    }
    if offset <= position.next {
        return (Verdict::Deliver, delivered);
    }
    if position.back >= MAX_GAP_REWIND {
        return (Verdict::GiveUp, delivered);
    }
    let back = (position.back * 2).max(1);
    let from = (position.next - back).max(0);
    let back = if from == 0 { MAX_GAP_REWIND } else { back };
    (
        Verdict::Rewind { from },
        Position {
            next: position.next,
            back,
        },
    )
}

impl Positions {
    /// The usual case under one lock: `offset` is due on a partition not being read again; its
    /// position moves on. `Err` with the known position (if any) otherwise.
    fn advance(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Option<Position>> {
        let Ok(mut expected) = self.expected.lock() else {
            return Ok(());
        };
        match expected.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
            Some(p) if p.back == 0 && offset == p.next => {
                p.next += 1;
                Ok(())
            }
            p => Err(p.copied()),
        }
    }

    fn set(&self, topic: &str, partition: i32, position: Position) {
        if let Ok(mut expected) = self.expected.lock() {
            expected
                .entry(topic.to_owned())
                .or_default()
                .insert(partition, position);
        }
    }
}

impl Positions {
    /// Forgets the partitions of `rebalance`: they resume from their committed offsets.
    pub(super) fn forget(&self, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        use rdkafka::consumer::Rebalance;
        let (Rebalance::Assign(list) | Rebalance::Revoke(list)) = rebalance else {
            return;
        };
        if let Ok(mut expected) = self.expected.lock() {
            if expected.is_empty() {
                return;
            }
            for p in list.elements() {
                if let Some(partitions) = expected.get_mut(p.topic()) {
                    partitions.remove(&p.partition());
                }
            }
        }
    }
}

/// The group's committed offset of a partition, if it has one (blocking).
fn committed(consumer: &StreamConsumer<Context>, topic: &str, partition: i32) -> Option<i64> {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(5))
        .ok()?;
    match committed.find_partition(topic, partition)?.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    }
}

/// Runs blocking librdkafka call `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    consumer: &Arc<StreamConsumer<Context>>,
    f: impl FnOnce(&StreamConsumer<Context>) -> T + Send + 'static,
) -> Option<T> {
    let consumer = Arc::clone(consumer);
    tokio::task::spawn_blocking(move || f(&consumer)).await.ok()
}

impl<H: Handler> Consumer<H> {
    /// Whether `m` is the record its partition should deliver next, on a broker that skips
    /// records ([`judge`]; see "Gaps" above).
    pub(super) async fn admit_after_gaps(&self, m: &BorrowedMessage<'_>) -> bool {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let positions = &self.consumer.context().positions;
        let known = match positions.advance(topic, partition, offset) {
            Ok(()) => return true,
            Err(known) => known,
        };
        // The first record of a partition since it was assigned must be its committed offset.
        let position = match known {
            Some(position) => Some(position),
            None => {
                let t = topic.to_owned();
                blocking(&self.consumer, move |c| committed(c, &t, partition))
                    .await
                    .flatten()
                    .map(|next| Position { next, back: 0 })
            }
        };
        let Some(position) = position else {
            positions.set(topic, partition, Position::delivered(offset));
            return true;
        };
        let group = self.group();
        let (verdict, after) = judge(position, offset);
        match verdict {
            Verdict::Deliver => {
                positions.set(topic, partition, after);
                true
            }
            Verdict::Drop => false,
            Verdict::GiveUp => {
                tracing::warn!(
                    group,
                    topic,
                    partition,
                    missing_from = position.next,
                    missing_to = offset - 1,
                    "Records never delivered although read again; going on without them"
                );
                positions.set(topic, partition, after);
                true
            }
            Verdict::Rewind { from } => {
                let t = topic.to_owned();
                let seek = blocking(&self.consumer, move |c| {
                    c.seek(
                        &t,
                        partition,
                        rdkafka::Offset::Offset(from),
                        Duration::from_secs(5),
                    )
                    .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|| Err("the seek's task failed".to_owned()));
                match seek {
                    Ok(()) => {
                        tracing::warn!(
                            group,
                            topic,
                            partition,
                            missing_from = position.next,
                            missing_to = offset - 1,
                            reading_from = from,
                            "The fetch skipped records; reading the partition again from before them"
                        );
                        positions.set(topic, partition, after);
                        false
                    }
                    Err(e) => {
                        tracing::warn!(
                            group, topic, partition,
                            missing_from = position.next, missing_to = offset - 1, error = %e,
                            "The fetch skipped records and the partition cannot be read again; going on without them"
                        );
                        positions.set(topic, partition, Position::delivered(offset));
                        true
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(next: i64, back: i64) -> Position {
        Position { next, back }
    }

    #[test]
    fn the_record_due_is_delivered_and_the_partition_moves_on() {
        assert_eq!(judge(at(5, 0), 5), (Verdict::Deliver, at(6, 0)));
        // A redelivery of an earlier record (a rebalance's replay) is the handler's duplicate.
        assert_eq!(judge(at(5, 0), 3), (Verdict::Deliver, at(4, 0)));
    }

    #[test]
    fn a_gap_reads_again_from_further_back_each_time_then_heals() {
        // Records 5..=9 were skipped: 10 comes first.
        let (verdict, p) = judge(at(5, 0), 10);
        assert_eq!(verdict, Verdict::Rewind { from: 4 });
        assert_eq!(p, at(5, 1));
        // Read again from 4: done already, dropped; then 5, the gap's first record, is due.
        assert_eq!(judge(p, 4), (Verdict::Drop, p));
        assert_eq!(judge(p, 5), (Verdict::Deliver, at(6, 0)));
        // Skipped again from a re-read: twice as far back.
        let (verdict, p) = judge(p, 10);
        assert_eq!(verdict, Verdict::Rewind { from: 3 });
        assert_eq!(p, at(5, 2));
    }

    #[test]
    fn reading_again_stops_at_the_start_and_at_the_limit() {
        // Back past offset 0: the partition is read from the start, once.
        let (verdict, p) = judge(at(1, 1), 9);
        assert_eq!(verdict, Verdict::Rewind { from: 0 });
        assert_eq!(p.back, MAX_GAP_REWIND);
        // Still missing after that: go on without them.
        assert_eq!(judge(p, 9), (Verdict::GiveUp, at(10, 0)));
        assert_eq!(
            judge(at(100_000, MAX_GAP_REWIND), 100_005),
            (Verdict::GiveUp, at(100_006, 0))
        );
    }
}
