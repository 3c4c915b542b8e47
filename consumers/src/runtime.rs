//! The loop every consumer group runs.
//!
//! Records of one partition are processed one after another, in offset order; parallelism comes
//! from partitions spread over processes (run the same group N times). librdkafka auto-commits
//! only offsets the runtime stored, and the runtime stores an offset only after the record's
//! transaction committed (or the record was skipped as undecodable). On shutdown the record in
//! progress finishes, stored offsets are committed synchronously, and the loop returns.

use std::future::Future;
use std::time::Duration;

use keel_core::backoff::Backoff;
use keel_schemas::{DecodeError, Decoder, Event};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Where a record came from.
#[derive(Debug, Clone)]
pub struct Meta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Why a handler could not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying: a dependency is unavailable. The transaction is rolled back.
    #[error("transient: {0}")]
    Transient(#[source] anyhow::Error),
    /// Will never succeed for this event. The transaction is rolled back and the record skipped.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        // Any database error inside the handler's transaction rolls it back; retrying is safe.
        HandlerError::Transient(e.into())
    }
}

/// A consumer group: which topics it reads and what it does with each event, inside the
/// runtime's transaction. Adding a group is implementing this trait; producers are untouched.
pub trait Handler: Send + Sync + 'static {
    /// The consumer group id; also the process's name (`keel consume <group>`).
    fn group(&self) -> &str;

    /// Topics the group reads.
    fn topics(&self) -> Vec<String>;

    /// The group's own tables: its PostgreSQL schema and migrations.
    fn migrations(&self) -> Option<(&'static str, &'static sqlx::migrate::Migrator)> {
        None
    }

    /// Whether the group cares about `event`. Others are skipped without a transaction.
    fn wants(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    /// Applies `event`'s effect in `tx`. Runs at most once per event id per group, in the sense
    /// that only one run ever commits.
    fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What became of one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect committed now.
    Applied,
    /// The effect had committed before (redelivery).
    Duplicate,
    /// The group does not care about this event type.
    Ignored,
    /// The record can never be applied (undecodable, or the handler said permanent): skipped.
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub brokers: String,
    pub registry_url: String,
    pub max_retry_backoff: Duration,
}

impl ConsumerConfig {
    pub fn from_settings(s: &keel_core::Settings) -> Self {
        Self {
            brokers: s.kafka_brokers.clone(),
            registry_url: s.schema_registry_url.clone(),
            max_retry_backoff: s.consumer.max_retry_backoff,
        }
    }
}

pub struct Consumer<H: Handler> {
    handler: H,
    pool: PgPool,
    consumer: StreamConsumer,
    decoder: Decoder,
    config: ConsumerConfig,
}

impl<H: Handler> Consumer<H> {
    /// Joins `handler`'s group and subscribes to its topics.
    pub fn new(handler: H, pool: PgPool, config: ConsumerConfig) -> anyhow::Result<Self> {
        let consumer: StreamConsumer =
            keel_core::kafka::consumer_config(&config.brokers, handler.group())
                .create()
                .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create consumer: {e}"))?;
        let topics = handler.topics();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let decoder = Decoder::new(&config.registry_url)?;
        Ok(Self {
            handler,
            pool,
            consumer,
            decoder,
            config,
        })
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The next record, or `None` if `shutdown` came first.
    pub async fn next(&self, shutdown: &CancellationToken) -> Option<BorrowedMessage<'_>> {
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return None,
                m = self.consumer.recv() => match m {
                    Ok(m) => return Some(m),
                    Err(e) => {
                        tracing::warn!(group = self.handler.group(), error = %e, "Kafka consumer error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    /// Applies one record's effect, retrying transient failures with backoff until it succeeds
    /// or `shutdown` (then `None`: the record was not applied and its offset must not be stored).
    /// Does not store the offset: see [`Consumer::store`].
    pub async fn apply(
        &self,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let meta = Meta {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_retry_backoff);
        loop {
            let error = match self.try_apply(message, &meta).await {
                Ok(outcome) => return Some(outcome),
                Err(e) => e,
            };
            let delay = backoff.next_delay();
            tracing::warn!(
                group = self.handler.group(), topic = %meta.topic, partition = meta.partition, offset = meta.offset,
                attempt = backoff.attempts(), retry_in_ms = delay.as_millis() as u64, error = %error,
                "Transient failure; retrying the record"
            );
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt. `Err` is transient (retry); permanent failures are `Ok(Skipped)`.
    async fn try_apply(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
    ) -> Result<Outcome, anyhow::Error> {
        let event = match self.decoder.decode(message.payload()).await {
            Ok(event) => event,
            Err(DecodeError::Transient(e)) => anyhow::bail!("decoding: {e}"),
            Err(DecodeError::Permanent(reason)) => return Ok(Outcome::Skipped(reason)),
        };
        if !self.handler.wants(&event) {
            return Ok(Outcome::Ignored);
        }
        let mut tx = self.pool.begin().await?;
        let new = sqlx::query(
            "INSERT INTO consumers.processed_events (group_id, event_id, topic, kafka_partition, kafka_offset)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(self.handler.group())
        .bind(event.event_id())
        .bind(&meta.topic)
        .bind(meta.partition)
        .bind(meta.offset)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !new {
            tx.rollback().await?;
            return Ok(Outcome::Duplicate);
        }
        match self.handler.handle(&mut tx, &event, meta).await {
            Ok(()) => {
                tx.commit().await?;
                Ok(Outcome::Applied)
            }
            Err(HandlerError::Transient(e)) => Err(e),
            Err(HandlerError::Permanent(reason)) => Ok(Outcome::Skipped(reason)),
        }
    }

    /// Marks the record done: its offset will be committed.
    pub fn store(&self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        self.consumer.store_offset_from_message(message)?;
        Ok(())
    }

    /// Consumes until `shutdown`, then commits what is done.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let group = self.handler.group().to_owned();
        tracing::info!(group, topics = ?self.handler.topics(), "Consumer started");
        while let Some(message) = self.next(&shutdown).await {
            let Some(outcome) = self.apply(&message, &shutdown).await else {
                break;
            };
            match &outcome {
                Outcome::Skipped(reason) => tracing::warn!(
                    group,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    reason,
                    "Skipping a record that can never be applied"
                ),
                Outcome::Duplicate => tracing::debug!(
                    group,
                    offset = message.offset(),
                    "Duplicate record; effect already applied"
                ),
                Outcome::Applied | Outcome::Ignored => {}
            }
            self.store(&message)?;
        }
        // Stored offsets only: the record in progress at shutdown (if any) was not stored.
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is reported as an error too; harmless.
            tracing::debug!(group, error = %e, "Final commit");
        }
        tracing::info!(group, "Consumer stopped");
        Ok(())
    }
}
