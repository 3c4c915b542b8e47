//! The source: records from Kafka, in offset order per partition (with `KEEL_BROKER_QUIRKS=tansu`
//! checked against the positions of [`super::quirks`]), and storing their offsets for
//! librdkafka's auto-commit.

use std::time::Duration;

use rdkafka::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;

use keel_core::settings::BrokerQuirks;

use super::Consumer;
use super::handler::Handler;

impl<H: Handler> Consumer<H> {
    /// The next record, or `None` if `shutdown` came first.
    pub(super) async fn next(&self, shutdown: &CancellationToken) -> Option<BorrowedMessage<'_>> {
        loop {
            // Waiting for records is progress: beat at least every second while idle.
            keel_core::health::beat(&self.health_loop);
            self.watch_membership();
            self.check_fatal();
            self.polled();
            let error = tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                m = self.consumer.recv() => match m {
                    Ok(m) => {
                        if self.admit(&m).await {
                            return Some(m);
                        }
                        continue;
                    }
                    Err(e) => e,
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            };
            tracing::warn!(group = self.group(), error = %error, "Kafka consumer error");
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Whether `m` is the record its partition should deliver next. Apache Kafka delivers a
    /// partition's records in order and never skips one it holds, so without quirks every record
    /// is; with `KEEL_BROKER_QUIRKS=tansu`, see [`super::quirks`].
    async fn admit(&self, m: &BorrowedMessage<'_>) -> bool {
        match self.broker_quirks {
            BrokerQuirks::None => true,
            BrokerQuirks::Tansu => self.admit_after_gaps(m).await,
        }
    }

    /// The records librdkafka already holds, at least one and at most the batch size; empty if
    /// `shutdown` came first. Waits only for the first: a batch never waits for more records.
    pub(super) async fn next_batch(
        &self,
        shutdown: &CancellationToken,
    ) -> Vec<BorrowedMessage<'_>> {
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
            self.polled();
            let Ok(polled) = tokio::time::timeout(Duration::ZERO, self.consumer.recv()).await
            else {
                break;
            };
            match polled {
                Ok(m) => {
                    if !self.admit(&m).await {
                        break;
                    }
                    batch.push(m);
                }
                Err(e) => {
                    tracing::warn!(group = self.group(), error = %e, "Kafka consumer error");
                    break;
                }
            }
        }
    }

    /// Awaits `work` (the wait before a retry, a dead-letter write) while this member stays in
    /// its group. librdkafka throws out a member that does not poll for `max.poll.interval.ms`
    /// (5 min), and every partition of the group then moves; an outage longer than that would
    /// do it. So while `work` runs (past the budget below) the instance's partitions are paused
    /// (nothing more is fetched) and the consumer is polled, which then only serves librdkafka's events
    /// (heartbeats are librdkafka's own; rebalances and errors are served here). What was
    /// fetched but not taken is fetched again after the pause, from the position after the
    /// last record taken; the records taken (the one waiting, the next batch) are kept. A
    /// record of a partition assigned meanwhile is put back: its partition is rewound to it and
    /// paused too. Everything paused is resumed when `work` is done.
    ///
    /// A short wait is not paused for (most retries, a dead-letter write the cluster takes):
    /// while the consumer was polled less than [`Consumer::poll_budget`] ago, `work` is simply
    /// awaited. A pause throws away what librdkafka fetched ahead of the record, which must then
    /// be fetched again, and tansu 0.6 answers such a fetch, from inside a batch, from the next
    /// batch on: with none behind it, the rest of the batch waited for new traffic.
    pub(super) async fn in_group_while<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let unpaused = self.poll_budget.saturating_sub(self.since_polled());
        if !unpaused.is_zero()
            && let Ok(done) = tokio::time::timeout(unpaused, &mut work).await
        {
            return done;
        }
        let mut paused = self.consumer.assignment().unwrap_or_default();
        if let Err(e) = self.consumer.pause(&paused) {
            tracing::debug!(group = self.group(), error = %e, "Cannot pause the partitions");
        }
        let done = loop {
            tokio::select! {
                biased;
                done = &mut work => break done,
                polled = self.consumer.recv() => match polled {
                    Ok(m) => {
                        self.polled();
                        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
                        drop(m);
                        let mut more = rdkafka::TopicPartitionList::new();
                        more.add_partition(&topic, partition);
                        let rewound = self
                            .consumer
                            .seek(&topic, partition, rdkafka::Offset::Offset(offset), Duration::from_secs(5))
                            .and_then(|()| self.consumer.pause(&more));
                        match rewound {
                            Ok(()) => {
                                let _ = paused.add_partition(&topic, partition);
                            }
                            Err(e) => tracing::warn!(
                                group = self.group(), topic, partition, offset, error = %e,
                                "Cannot put back a record taken while waiting; it is redelivered after a rebalance"
                            ),
                        }
                    }
                    Err(e) => {
                        tracing::warn!(group = self.group(), error = %e, "Kafka consumer error");
                        self.check_fatal();
                    }
                },
                // A wait may outlast a fatal error raised with no record to deliver: look at
                // least every second, as the idle loop does.
                () = tokio::time::sleep(Duration::from_secs(1)) => self.check_fatal(),
            }
        };
        self.polled();
        if let Err(e) = self.consumer.resume(&paused) {
            tracing::debug!(group = self.group(), error = %e, "Cannot resume the partitions");
        }
        done
    }

    /// Waits `delay` before a retry, in the group ([`Consumer::in_group_while`]); `false` if
    /// `shutdown` came first.
    pub(super) async fn sleep_in_group(
        &self,
        delay: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        self.in_group_while(async {
            tokio::select! {
                () = shutdown.cancelled() => false,
                () = tokio::time::sleep(delay) => true,
            }
        })
        .await
    }

    /// Notes that the consumer is polled now (librdkafka's `max.poll.interval.ms` starts again).
    fn polled(&self) {
        if let Ok(mut at) = self.last_poll.lock() {
            *at = std::time::Instant::now();
        }
    }

    fn since_polled(&self) -> Duration {
        self.last_poll
            .lock()
            .map_or(Duration::MAX, |at| at.elapsed())
    }

    /// Marks the record done: its offset will be committed. Fails after the record's partition
    /// was revoked; that is harmless (the new owner redelivers it and sees a duplicate), so the
    /// loop logs it and goes on.
    pub(super) fn store(&self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        self.consumer.store_offset_from_message(message)?;
        Ok(())
    }
}
