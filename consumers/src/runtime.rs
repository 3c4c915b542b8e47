//! The loop every consumer group runs.
//!
//! Records of one partition are processed one after another, in offset order; parallelism comes
//! from partitions spread over processes (run the same group N times). librdkafka auto-commits
//! only offsets the runtime stored, and the runtime stores an offset only after the record is
//! done: its transaction committed, or it was written to the dead-letter topic.
//!
//! # Batches
//! The records librdkafka has already fetched (up to `KEEL_CONSUMER_BATCH_SIZE`; the runtime
//! never waits to fill a batch, so a quiet stream gets batches of one) are applied in one
//! transaction: their dedupe rows in one statement, the effects of the new ones in order, one
//! commit ([`transact`]). A backlog is then worth one commit per batch instead of one per record.
//! If the batch fails for any reason, none of it committed, and its records go one by one through
//! the path below, so a poison record is dead-lettered alone and an outage is waited out record
//! by record. While a batch's transaction waits on PostgreSQL, the records fetched behind it are
//! taken and decoded, so the next batch is ready when it commits; a batch is stored only after
//! it is applied, and one taken but not applied at shutdown is simply not done.
//!
//! # Failures
//! - **Unavailable** (PostgreSQL, Redis, SMTP or the registry cannot be reached): not the record's
//!   fault, and every other record would fail the same way, so the record is retried with
//!   exponential backoff and jitter until the dependency is back. The partition waits; nothing is
//!   dead-lettered because of an outage.
//! - **Transient** (a deadlock, a serialization failure, a timeout): retried the same way, at most
//!   `max_attempts` times in all, then dead-lettered.
//! - **Permanent** (undecodable bytes, unknown schema id, an event that breaks an invariant):
//!   dead-lettered at once.
//!
//! A dead-lettered record goes to `<topic>.<group>.dlq` with its key, value and headers plus
//! `keel-dlq-*` headers saying where it came from and why; the offset moves on only after the
//! dead-letter topic acknowledged it. So a poison record holds its partition for at most the retry
//! budget and is never dropped silently.
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
//!
//! # Rebalances and shutdown
//! On a rebalance librdkafka commits the offsets stored so far for the revoked partitions. A record
//! in progress at that moment may commit its transaction after losing its partition; its offset
//! can no longer be stored, so the new owner receives it again and the processed-events row makes
//! that a duplicate. On shutdown the record in progress finishes (or, if it is waiting to retry,
//! is abandoned uncommitted), stored offsets are committed synchronously, and the loop returns.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use keel_core::backoff::Backoff;
use keel_core::kafka::TopicSpec;
use keel_core::telemetry::TraceHeaders;
use keel_schemas::{DecodeError, Decoder, Event};
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Where a record came from, and the trace it belongs to.
#[derive(Debug, Clone)]
pub struct Meta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `traceparent`/`tracestate` from the record's headers: pass it on when enqueueing events.
    pub trace: TraceHeaders,
    /// The span the record's effect runs in (the record's share of the transaction, beneath its
    /// consumer span); disabled when nothing records traces.
    pub span: tracing::Span,
}

/// Why a handler could not apply an event. The transaction is rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A dependency cannot be reached: retried until it is back, never dead-lettered.
    #[error("unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
    /// May succeed if tried again: retried up to the attempt budget, then dead-lettered.
    #[error("transient: {0}")]
    Transient(#[source] anyhow::Error),
    /// Will never succeed for this event: dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        if keel_core::db::is_unavailable(&e) {
            HandlerError::Unavailable(e.into())
        } else {
            HandlerError::Transient(e.into())
        }
    }
}

impl From<redis::RedisError> for HandlerError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_connection_dropped()
        {
            HandlerError::Unavailable(e.into())
        } else {
            HandlerError::Transient(e.into())
        }
    }
}

impl Outcome {
    /// The outcome as spans and metrics name it.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::DeadLettered { .. } => "dead_lettered",
        }
    }
}

impl HandlerError {
    /// The class as written in the `keel-dlq-error-class` header.
    pub fn class(&self) -> &'static str {
        match self {
            HandlerError::Unavailable(_) => "unavailable",
            HandlerError::Transient(_) => "transient",
            HandlerError::Permanent(_) => "permanent",
        }
    }
}

/// Records per transaction for a group that does not choose ([`Handler::batch_size`]).
pub const DEFAULT_BATCH_SIZE: usize = 100;

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

    /// Most records the group applies in one transaction unless `KEEL_CONSUMER_BATCH_SIZE` says
    /// otherwise. Larger batches share a commit among more records, and cost a group whose
    /// records update the same rows (inventory's stock) more per record: 100 suits most.
    fn batch_size(&self) -> usize {
        DEFAULT_BATCH_SIZE
    }

    /// Whether the group cares about `event`. Others are skipped without a transaction.
    fn wants(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    /// Applies `event`'s effect in `tx`. Only one run per event id per group ever commits.
    fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies the new events of a batch, in order, in one transaction `tx`: all or none
    /// commit. The default calls [`Handler::handle`] for each; a group whose effect costs a round
    /// trip per event outside PostgreSQL (cache invalidation's Redis) overrides it to make one.
    fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[(&Event, &Meta)],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for (event, meta) in events {
                self.handle(tx, event, meta)
                    .instrument(meta.span.clone())
                    .await?;
            }
            Ok(())
        }
    }
}

/// The dedupe rows of `records` and the effects of those that are new, in one transaction:
/// what the runtime does with the records it took from Kafka in one go (one record or many).
/// Outcomes come in the order of `records`; an event twice in `records` is applied once. If
/// anything fails, nothing commits and the error says why.
pub async fn transact<H: Handler>(
    pool: &PgPool,
    handler: &H,
    records: &[(Event, Meta)],
) -> Result<Vec<Outcome>, HandlerError> {
    let mut outcomes = vec![Outcome::Ignored; records.len()];
    let wants: Vec<bool> = records.iter().map(|(e, _)| handler.wants(e)).collect();
    let wanted: Vec<&(Event, Meta)> = records
        .iter()
        .zip(&wants)
        .filter_map(|(r, &w)| w.then_some(r))
        .collect();
    if wanted.is_empty() {
        return Ok(outcomes);
    }
    let mut tx = pool.begin().await?;
    let new: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO consumers.processed_events (group_id, event_id, topic, kafka_partition, kafka_offset)
         SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::int4[], $5::int8[])
         ON CONFLICT DO NOTHING RETURNING event_id",
    )
    .bind(handler.group())
    .bind(wanted.iter().map(|(e, _)| e.event_id()).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.topic.as_str()).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.partition).collect::<Vec<_>>())
    .bind(wanted.iter().map(|(_, m)| m.offset).collect::<Vec<_>>())
    .fetch_all(&mut *tx)
    .await?;
    let mut new: HashSet<uuid::Uuid> = new.into_iter().collect();
    let mut fresh = Vec::with_capacity(new.len());
    for ((outcome, (event, meta)), _) in outcomes
        .iter_mut()
        .zip(records)
        .zip(&wants)
        .filter(|(_, w)| **w)
    {
        if new.remove(&event.event_id()) {
            *outcome = Outcome::Applied;
            fresh.push((event, meta));
        } else {
            *outcome = Outcome::Duplicate;
        }
    }
    if fresh.is_empty() {
        tx.rollback().await?;
        return Ok(outcomes);
    }
    handler.handle_batch(&mut tx, &fresh).await?;
    tx.commit().await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let end_to_end = keel_core::metrics::metrics()
        .consumer_end_to_end
        .get_or_create(&keel_core::metrics::GroupLabels {
            group: handler.group().to_owned(),
        })
        .clone();
    for (event, _) in fresh {
        end_to_end.observe((now_ms - event.occurred_at()).max(0) as f64 / 1000.0);
    }
    Ok(outcomes)
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
    /// The record can never be applied; it is now on the dead-letter topic.
    DeadLettered { class: &'static str, reason: String },
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub brokers: String,
    pub registry_url: String,
    pub max_retry_backoff: Duration,
    /// Attempts at a record failing with a transient error before it is dead-lettered.
    pub max_attempts: u32,
    /// Static membership: this instance's `group.instance.id` (see `KEEL_CONSUMER_INSTANCE_ID`).
    pub instance_id: Option<String>,
    /// `fetch.wait.max.ms` (see `KEEL_CONSUMER_FETCH_WAIT_MS`).
    pub fetch_wait: Duration,
    /// `session.timeout.ms` (see `KEEL_CONSUMER_SESSION_TIMEOUT_MS`).
    pub session_timeout: Duration,
    /// Most records applied in one transaction (see `KEEL_CONSUMER_BATCH_SIZE`); `None`: the
    /// handler's own ([`Handler::batch_size`]).
    pub batch_size: Option<usize>,
    /// librdkafka `debug` contexts (see `KEEL_KAFKA_DEBUG`).
    pub kafka_debug: Option<String>,
}

impl ConsumerConfig {
    pub fn from_settings(s: &keel_core::Settings) -> Self {
        Self {
            brokers: s.kafka_brokers.clone(),
            registry_url: s.schema_registry_url.clone(),
            max_retry_backoff: s.consumer.max_retry_backoff,
            max_attempts: s.consumer.max_attempts,
            instance_id: s.consumer.instance_id.clone(),
            fetch_wait: s.consumer.fetch_wait,
            session_timeout: s.consumer.session_timeout,
            batch_size: s.consumer.batch_size,
            kafka_debug: s.kafka_debug.clone(),
        }
    }
}

/// The dead-letter topic of `topic` for `group`.
pub fn dlq_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

/// Headers a dead-lettered record carries besides its own.
pub mod dlq_headers {
    pub const TOPIC: &str = "keel-dlq-original-topic";
    pub const PARTITION: &str = "keel-dlq-original-partition";
    pub const OFFSET: &str = "keel-dlq-original-offset";
    pub const TIMESTAMP: &str = "keel-dlq-original-timestamp";
    pub const GROUP: &str = "keel-dlq-group";
    pub const ERROR_CLASS: &str = "keel-dlq-error-class";
    pub const ERROR: &str = "keel-dlq-error";
    pub const ATTEMPTS: &str = "keel-dlq-attempts";
}

pub struct Consumer<H: Handler> {
    handler: H,
    pool: PgPool,
    consumer: StreamConsumer<Positions>,
    producer: FutureProducer,
    decoder: Decoder,
    config: ConsumerConfig,
    /// Most records in one transaction: the setting's, else the handler's.
    batch_size: usize,
    /// Dead-letter topics known to exist.
    dlq_ready: Mutex<HashSet<String>>,
    /// This loop's name for liveness: `consumer:<group>`.
    health_loop: String,
    membership: Mutex<MembershipWatch>,
}

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

/// What [`Consumer::watch_membership`] remembers between checks.
#[derive(Default)]
struct MembershipWatch {
    checked_at: Option<std::time::Instant>,
    unassigned_since: Option<std::time::Instant>,
    warned_at: Option<std::time::Instant>,
}

impl<H: Handler> Consumer<H> {
    /// Joins `handler`'s group and subscribes to its topics.
    pub fn new(handler: H, pool: PgPool, config: ConsumerConfig) -> anyhow::Result<Self> {
        let mut client = keel_core::kafka::consumer_config(&config.brokers, handler.group());
        client.set(
            "fetch.wait.max.ms",
            config.fetch_wait.as_millis().to_string(),
        );
        client.set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        );
        if let Some(debug) = &config.kafka_debug {
            client.set("debug", debug);
        }
        if let Some(id) = &config.instance_id {
            // Unique per group: one process may run several groups under one instance name.
            client.set("group.instance.id", format!("{}-{id}", handler.group()));
        }
        let consumer: StreamConsumer<Positions> = client
            .create_with_context(Positions::default())
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create consumer: {e}"))?;
        let producer: FutureProducer = keel_core::kafka::producer_config(&config.brokers)
            .create()
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create producer: {e}"))?;
        let topics = handler.topics();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let handler_group = handler.group().to_owned();
        let decoder = Decoder::new(&config.registry_url)?;
        let batch_size = config.batch_size.unwrap_or_else(|| handler.batch_size());
        Ok(Self {
            handler,
            pool,
            consumer,
            producer,
            decoder,
            config,
            batch_size,
            dlq_ready: Mutex::default(),
            health_loop: format!("consumer:{}", handler_group),
            membership: Mutex::default(),
        })
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

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

    /// Every few seconds: the partitions this instance owns, as a gauge, and a warning when it
    /// has owned none for two session timeouts (more instances than partitions, or a rebalance
    /// that does not complete: see docs/operations.md).
    fn watch_membership(&self) {
        let Ok(mut watch) = self.membership.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if watch
            .checked_at
            .is_some_and(|at| now - at < Duration::from_secs(5))
        {
            return;
        }
        watch.checked_at = Some(now);
        let owned = self.consumer.assignment().map_or(0, |a| a.count());
        keel_core::metrics::metrics()
            .consumer_assigned
            .get_or_create(&keel_core::metrics::GroupLabels {
                group: self.handler.group().to_owned(),
            })
            .set(owned as i64);
        if owned > 0 {
            watch.unassigned_since = None;
            return;
        }
        let since = *watch.unassigned_since.get_or_insert(now);
        let quiet_for = now - since;
        if quiet_for > 2 * self.config.session_timeout
            && watch
                .warned_at
                .is_none_or(|at| now - at > Duration::from_secs(300))
        {
            watch.warned_at = Some(now);
            tracing::warn!(
                group = self.handler.group(),
                unassigned_secs = quiet_for.as_secs(),
                "No partitions assigned: more instances than partitions, or the group's rebalance does not complete (docs/operations.md)"
            );
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
    async fn ready_batch(&self) -> Vec<BorrowedMessage<'_>> {
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

    /// Decodes each record of `batch`, in order.
    async fn decode_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
    ) -> Vec<Result<Event, HandlerError>> {
        let mut events = Vec::with_capacity(batch.len());
        for (i, message) in batch.iter().enumerate() {
            // Decoding is CPU work; run concurrently with a transaction (see `run`), it lets the
            // transaction's replies in every few records rather than after the whole batch.
            if i % 32 == 31 {
                tokio::task::yield_now().await;
            }
            events.push(self.decode(message).await);
        }
        events
    }

    /// Applies `batch` (records taken from the consumer in one go, in order) in one transaction
    /// when it can. If that fails (a record that does not decode, an effect that fails, an
    /// outage), nothing of it committed and its records are applied one by one as
    /// [`Consumer::apply`] does, with its retries and dead-lettering. Outcomes come in the
    /// records' order; fewer than the records if `shutdown` came first (the rest are not done).
    /// Does not store offsets: see [`Consumer::store`].
    pub async fn apply_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        shutdown: &CancellationToken,
    ) -> Vec<Outcome> {
        let decoded = self.decode_batch(batch).await;
        self.apply_decoded(batch, decoded, shutdown).await
    }

    /// [`Consumer::apply_batch`] with the records already decoded ([`Consumer::decode_batch`]).
    async fn apply_decoded(
        &self,
        batch: &[BorrowedMessage<'_>],
        decoded: Vec<Result<Event, HandlerError>>,
        shutdown: &CancellationToken,
    ) -> Vec<Outcome> {
        let prepared: Vec<(Meta, tracing::Span)> = batch.iter().map(|m| self.prepare(m)).collect();
        if batch.len() > 1 {
            match self.try_batch(decoded, &prepared).await {
                Ok(outcomes) => {
                    for ((_, span), outcome) in prepared.iter().zip(&outcomes) {
                        span.record("keel.outcome", outcome.name());
                    }
                    return outcomes;
                }
                Err(e) => tracing::debug!(
                    group = self.handler.group(), records = batch.len(), error = %e,
                    "Cannot apply the batch in one transaction; applying its records one by one"
                ),
            }
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (message, (meta, span)) in batch.iter().zip(&prepared) {
            match self.apply_one(message, meta, span, shutdown).await {
                Some(outcome) => outcomes.push(outcome),
                None => break,
            }
        }
        outcomes
    }

    async fn try_batch(
        &self,
        decoded: Vec<Result<Event, HandlerError>>,
        prepared: &[(Meta, tracing::Span)],
    ) -> Result<Vec<Outcome>, HandlerError> {
        let mut records = Vec::with_capacity(decoded.len());
        for (event, (meta, _)) in decoded.into_iter().zip(prepared) {
            records.push((event?, meta.clone()));
        }
        transact(&self.pool, &self.handler, &records).await
    }

    /// Applies one record, retrying as its error class says (see the module doc), and
    /// dead-letters it if it can never be applied. `None` if `shutdown` came while waiting to
    /// retry: the record is not done and its offset must not be stored.
    /// Does not store the offset: see [`Consumer::store`].
    pub async fn apply(
        &self,
        message: &BorrowedMessage<'_>,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let (meta, span) = self.prepare(message);
        self.apply_one(message, &meta, &span, shutdown).await
    }

    /// The record's metadata and its consumer span (disabled unless traces are recorded).
    fn prepare(&self, message: &BorrowedMessage<'_>) -> (Meta, tracing::Span) {
        let received = trace_headers(message);
        // With tracing on, a consumer span in the producer's trace; handlers pass its context on.
        let span = if keel_core::telemetry::recording() {
            let span = process_span(message, self.handler.group());
            keel_core::telemetry::continue_trace(&span, &received);
            span
        } else {
            tracing::Span::none()
        };
        let trace = if span.is_none() {
            received
        } else {
            let caller = keel_core::telemetry::extract(|k| received.get(k).cloned());
            span.in_scope(|| keel_core::telemetry::headers_for_current(&caller))
        };
        let transaction = if span.is_none() {
            tracing::Span::none()
        } else {
            tracing::info_span!(
                parent: &span,
                "transaction",
                otel.name = "BEGIN consumers",
                otel.kind = "client",
                db.system.name = "postgresql",
            )
        };
        let meta = Meta {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            trace,
            span: transaction,
        };
        (meta, span)
    }

    async fn apply_one(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
        span: &tracing::Span,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_retry_backoff);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let error = match self.try_apply(message, meta).instrument(span.clone()).await {
                Ok(outcome) => {
                    span.record("keel.outcome", outcome.name());
                    return Some(outcome);
                }
                Err(e) => e,
            };
            span.record("keel.attempts", attempts);
            let budget_spent = match &error {
                HandlerError::Unavailable(_) => false,
                HandlerError::Transient(_) => attempts >= self.config.max_attempts,
                HandlerError::Permanent(_) => true,
            };
            if budget_spent {
                let outcome = Outcome::DeadLettered {
                    class: error.class(),
                    reason: error.to_string(),
                };
                // The dead-letter write is retried like any unavailable dependency: the record
                // is never dropped.
                while let Err(e) = self.dead_letter(message, &error, attempts).await {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        group = self.handler.group(), topic = %meta.topic, partition = meta.partition,
                        offset = meta.offset, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "Cannot write to the dead-letter topic; retrying"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                span.record("keel.outcome", "dead_lettered");
                return Some(outcome);
            }
            keel_core::metrics::metrics()
                .consumer_retries
                .get_or_create(&keel_core::metrics::RetryLabels {
                    group: self.handler.group().to_owned(),
                    class: error.class().to_owned(),
                })
                .inc();
            keel_core::health::beat(&self.health_loop);
            let delay = backoff.next_delay();
            tracing::warn!(
                group = self.handler.group(), topic = %meta.topic, partition = meta.partition, offset = meta.offset,
                attempt = attempts, class = error.class(), retry_in_ms = delay.as_millis() as u64, error = %error,
                "Cannot apply the record yet; retrying"
            );
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One attempt: decode, dedupe, handle, commit.
    async fn try_apply(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
    ) -> Result<Outcome, HandlerError> {
        let event = self.decode(message).await?;
        let outcomes = transact(&self.pool, &self.handler, &[(event, meta.clone())]).await?;
        Ok(outcomes.into_iter().next().unwrap_or(Outcome::Ignored))
    }

    async fn decode(&self, message: &BorrowedMessage<'_>) -> Result<Event, HandlerError> {
        match self.decoder.decode(message.payload()).await {
            Ok(event) => Ok(event),
            Err(DecodeError::Transient(e)) => Err(HandlerError::Unavailable(anyhow::anyhow!(e))),
            Err(DecodeError::Permanent(reason)) => {
                Err(HandlerError::Permanent(format!("cannot decode: {reason}")))
            }
        }
    }

    /// Writes `message` to its dead-letter topic and waits for the acknowledgement.
    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        error: &HandlerError,
        attempts: u32,
    ) -> anyhow::Result<()> {
        let group = self.handler.group();
        let topic = dlq_topic(message.topic(), group);
        self.ensure_dlq(&topic).await?;
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for h in original.iter() {
                headers = headers.insert(h);
            }
        }
        let partition = message.partition().to_string();
        let offset = message.offset().to_string();
        let timestamp = message.timestamp().to_millis().unwrap_or(-1).to_string();
        let attempts = attempts.to_string();
        let reason = error.to_string();
        for (key, value) in [
            (dlq_headers::TOPIC, message.topic()),
            (dlq_headers::PARTITION, &partition),
            (dlq_headers::OFFSET, &offset),
            (dlq_headers::TIMESTAMP, &timestamp),
            (dlq_headers::GROUP, group),
            (dlq_headers::ERROR_CLASS, error.class()),
            (dlq_headers::ERROR, &reason),
            (dlq_headers::ATTEMPTS, &attempts),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(value) = message.payload() {
            record = record.payload(value);
        }
        self.producer
            .send(record, Duration::from_secs(0))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
        tracing::warn!(
            group,
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            dlq = topic,
            class = error.class(),
            error = reason,
            "Record dead-lettered"
        );
        Ok(())
    }

    async fn ensure_dlq(&self, topic: &str) -> anyhow::Result<()> {
        if self.dlq_ready.lock().is_ok_and(|r| r.contains(topic)) {
            return Ok(());
        }
        keel_core::kafka::create_topics(&self.config.brokers, &[TopicSpec::new(topic, 1)]).await?;
        if let Ok(mut ready) = self.dlq_ready.lock() {
            ready.insert(topic.to_owned());
        }
        Ok(())
    }

    /// Marks the record done: its offset will be committed. Fails after the record's partition
    /// was revoked; that is harmless (the new owner redelivers it and sees a duplicate), so the
    /// loop logs it and goes on.
    pub fn store(&self, message: &BorrowedMessage<'_>) -> anyhow::Result<()> {
        self.consumer.store_offset_from_message(message)?;
        Ok(())
    }

    /// Consumes until `shutdown`, then commits what is done.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let group = self.handler.group().to_owned();
        tracing::info!(group, topics = ?self.handler.topics(), batch_size = self.batch_size, "Consumer started");
        let lag = tokio::spawn(measure_lag(
            self.config.brokers.clone(),
            group.clone(),
            self.handler.topics(),
            shutdown.clone(),
        ));
        let metrics = keel_core::metrics::metrics();
        let group_labels = keel_core::metrics::GroupLabels {
            group: group.clone(),
        };
        // The next batch when it was taken while the last one was applied.
        let mut ready = None;
        loop {
            let (batch, decoded) = match ready.take() {
                Some(taken) => taken,
                None => {
                    let batch = self.next_batch(&shutdown).await;
                    let decoded = self.decode_batch(&batch).await;
                    (batch, decoded)
                }
            };
            // A batch taken but not applied is not done: its offsets are not stored.
            if batch.is_empty() || shutdown.is_cancelled() {
                break;
            }
            // Catching up, the loop goes from batch to batch without waiting in `next`.
            keel_core::health::beat(&self.health_loop);
            self.watch_membership();
            let started = std::time::Instant::now();
            // While this batch's transaction waits on PostgreSQL (and Redis), the records
            // already fetched are taken and decoded: the next batch is ready when this one
            // commits. Nothing of the next is stored before it is applied.
            let (outcomes, (next, next_decoded)) =
                tokio::join!(self.apply_decoded(&batch, decoded, &shutdown), async {
                    let next = self.ready_batch().await;
                    let decoded = self.decode_batch(&next).await;
                    (next, decoded)
                });
            // Per record: a batch's time shared among its records.
            let per_record = started.elapsed().as_secs_f64() / batch.len() as f64;
            metrics
                .consumer_batch
                .get_or_create(&group_labels)
                .observe(batch.len() as f64);
            let processing = metrics.consumer_processing.get_or_create(&group_labels);
            let mut by_outcome: Vec<(&'static str, u64)> = Vec::new();
            for (message, outcome) in batch.iter().zip(&outcomes) {
                processing.observe(per_record);
                match by_outcome
                    .iter_mut()
                    .find(|(name, _)| *name == outcome.name())
                {
                    Some((_, n)) => *n += 1,
                    None => by_outcome.push((outcome.name(), 1)),
                }
                tracing::debug!(
                    group,
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    outcome = outcome.name(),
                    "Record done"
                );
                if let Err(e) = self.store(message) {
                    tracing::info!(
                        group, topic = message.topic(), partition = message.partition(), offset = message.offset(),
                        error = %e, "Cannot store the offset (partition revoked?); it will be redelivered as a duplicate"
                    );
                }
            }
            drop(processing);
            // One labelled counter lookup per outcome in the batch, not per record.
            for (outcome, n) in by_outcome {
                metrics
                    .consumer_records
                    .get_or_create(&keel_core::metrics::OutcomeLabels {
                        group: group.clone(),
                        outcome: outcome.to_owned(),
                    })
                    .inc_by(n);
            }
            if outcomes.len() < batch.len() {
                break; // shutdown while a record waited to be retried
            }
            if !next.is_empty() {
                ready = Some((next, next_decoded));
            }
        }
        // Stored offsets only: the record in progress at shutdown (if any) was not stored.
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is reported as an error too; harmless.
            tracing::debug!(group, error = %e, "Final commit");
        }
        keel_core::health::done(&self.health_loop);
        lag.abort();
        tracing::info!(group, "Consumer stopped");
        Ok(())
    }
}

/// Every ten seconds until `shutdown`: the group's lag per partition, from its committed offsets
/// and the partitions' end offsets (as lag exporters measure it).
async fn measure_lag(
    brokers: String,
    group: String,
    topics: Vec<String>,
    shutdown: CancellationToken,
) {
    loop {
        let (b, g, t) = (brokers.clone(), group.clone(), topics.clone());
        let states = tokio::task::spawn_blocking(move || {
            let t: Vec<&str> = t.iter().map(String::as_str).collect();
            keel_core::kafka::group_offsets(&b, &g, &t)
        })
        .await;
        match states {
            Ok(Ok(states)) => {
                for p in states {
                    keel_core::metrics::metrics()
                        .consumer_lag
                        .get_or_create(&keel_core::metrics::PartitionLabels {
                            group: group.clone(),
                            topic: p.topic.clone(),
                            partition: p.partition,
                        })
                        .set(p.lag());
                }
            }
            Ok(Err(e)) => tracing::debug!(group, error = %e, "Cannot measure lag"),
            Err(_) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// The consumer span of one record (OpenTelemetry messaging conventions).
fn process_span(message: &BorrowedMessage<'_>, group: &str) -> tracing::Span {
    use tracing::field::Empty;
    let event_id = message.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == "keel-event-id")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_owned)
    });
    tracing::info_span!(
        "process",
        otel.name = format!("process {}", message.topic()),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = message.topic(),
        messaging.destination.partition.id = message.partition().to_string(),
        messaging.kafka.offset = message.offset(),
        messaging.consumer.group.name = group,
        messaging.message.id = event_id,
        messaging.kafka.message.key = message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        keel.outcome = Empty,
        keel.attempts = Empty,
        trace_id = Empty,
        span_id = Empty,
    )
}

/// The W3C trace context carried in the record's headers.
fn trace_headers(message: &BorrowedMessage<'_>) -> TraceHeaders {
    let mut trace = TraceHeaders::new();
    if let Some(headers) = message.headers() {
        for h in headers.iter() {
            if matches!(h.key, "traceparent" | "tracestate")
                && let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok())
            {
                trace.insert(h.key.to_owned(), v.to_owned());
            }
        }
    }
    trace
}
