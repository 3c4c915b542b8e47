//! The relay: publishes committed outbox rows to Kafka.
//!
//! One [`Relay::step`] is one transaction: take the relay lock, claim the oldest pending rows
//! (`FOR UPDATE`), frame each row's body (written under its writer's contract) with the registry
//! id of that contract (Confluent wire format), hand them to the idempotent producer,
//! await the acknowledgements, mark the acknowledged rows published and commit. A row Kafka did
//! not acknowledge stays pending and is published again later.
//!
//! # One row never blocks the rest
//! Each failure is classified ([`refused_for_good`], [`EncodeError::transient`]):
//! - **the row's own** (its topic does not exist, the relay may not write to it, it is larger
//!   than the cluster takes, the registry refuses its schema, its payload does not parse): the
//!   row is set aside with the reason (`failed_at`, `error`; `keel outbox status` lists it,
//!   `keel_outbox_failed_rows` counts it) and the rest of the batch goes on, for every topic.
//!   It holds back the later rows of its topic and key (its aggregate's later events) until an
//!   operator fixes the cause and retries it (`keel outbox retry`) or discards it (`keel outbox
//!   discard`);
//! - **the cluster's or the client's** (a timeout, no leader, a fatal client error): the row
//!   stays pending and the step reports the failure, so the loop retries with backoff.
//!
//! Either way the rows Kafka acknowledged are marked in the step's transaction, not published
//! again.
//!
//! # Order
//! An aggregate's rows share a topic and key, so a partition. Within a step, a row is handed to
//! the producer only after every earlier row of its topic and key was acknowledged: the rows go
//! in waves, the first row of each key in the first wave, the second in the next. If a row
//! fails, the later rows of its key are not sent in that step. So an aggregate's events are
//! first delivered in id order whatever fails: a message timeout while a partition has no leader
//! (which librdkafka's `enable.gapless.guarantee` does not cover), or a write refused for good
//! (which `enable.gapless.guarantee` would make fatal for the whole producer, stopping every
//! topic). Most steps have one row per key and so one wave.
//!
//! # Several relays
//! The lock is `pg_try_advisory_xact_lock`, held for the step's transaction. A relay that does not
//! get it skips the step, so batches never overlap: the next batch is claimed only after the
//! previous one is marked, and an aggregate's events leave in id order whichever relay sends them.
//! A crashed relay's lock goes with its connection; a frozen one's with its session's timeouts
//! ([`keel_core::db::SESSION`]). Throughput is that of one relay, which the producer, not the
//! claim, bounds; extra instances are for availability.
//!
//! # Marks
//! A step's transaction commits with `synchronous_commit = off` (for that transaction only):
//! the commit returns once its WAL record is written, not flushed, and PostgreSQL flushes it
//! with the next durable commit or within three `wal_writer_delay`s (600 ms by default).
//! What that puts at risk is only the marks: if PostgreSQL itself crashes in that window, the
//! last steps' rows are pending again after recovery and are published a second time. WAL is
//! flushed in order, so what is lost is always the newest marks, and the rows go out again in
//! id order, after their first copies: duplicates, which every consumer drops by event id, and
//! never a lost or reordered first delivery. In exchange a step does not wait for an fsync
//! (about 6 ms on a slow disk), which every order committed during a step would otherwise wait
//! for too. The orders and their outbox rows are written by the order service with durable
//! commits, as before.
//!
//! # Fatal errors
//! A fatal producer error ([`keel_core::fatal`]) ends [`Relay::run`] with that error after the
//! step in progress marked what was acknowledged; the process exits and is restarted with a new
//! producer.

use std::collections::HashSet;
use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, TryStreamExt};
use keel_core::Settings;
use keel_core::backoff::Backoff;
use keel_core::fatal::Fatal;
use keel_core::kafka::Reporter;
use keel_core::settings::RelaySettings;
use keel_core::telemetry::TraceHeaders;
use keel_schemas::{EncodeError, Encoder, Event};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Key of the advisory lock that serialises relay batches (`hashtext('keel.outbox.relay')` would
/// do as well; a constant is easier to find in `pg_locks`).
pub const RELAY_LOCK: i64 = 0x6b65_656c_0001;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Some rows were not acknowledged for a reason that is not theirs (a timeout, no leader, a
    /// fatal client); they stay pending. The `published` rows that were are marked.
    #[error(
        "{failed} of {total} records were not acknowledged by Kafka ({published} were, and are marked); first error: {first}"
    )]
    Delivery {
        failed: usize,
        total: usize,
        published: usize,
        first: String,
    },
    /// A step stopped by [`testing::crash_before_mark`], as a crash would stop it.
    #[error("crashed before marking (a test's hook)")]
    Crashed,
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Another relay holds the lock.
    NotLeader,
    /// Rows published and marked (0 when nothing was pending). Rows set aside are not counted.
    Published(usize),
}

struct Pending {
    id: i64,
    topic: String,
    key: String,
    /// The record's full name, as its writer named it.
    event_type: String,
    event_id: uuid::Uuid,
    content: Content,
    headers: TraceHeaders,
    /// When the writer inserted the row (milliseconds since the epoch).
    created_ms: f64,
}

/// What a row holds of its event.
enum Content {
    /// The Avro body under the writer's contract, [`keel_schemas::codec::fingerprint`] of that
    /// contract (in `outbox.schemas`): moved as written, whatever contracts this build knows.
    Written { fingerprint: i64, body: Vec<u8> },
    /// A row written before the outbox carried the writer's contract: JSON of an [`Event`] of
    /// this build's, encoded here.
    Json(Event),
}

impl Pending {
    /// The aggregate's stream this row belongs to: its events are first delivered in id order.
    fn stream(&self) -> (String, String) {
        (self.topic.clone(), self.key.clone())
    }
}

/// The producer span of one row (OpenTelemetry messaging conventions), a child of the context
/// the writer stored with it; it ends when the broker acknowledged the record.
fn publish_span(row: &Pending, event_id: &str) -> tracing::Span {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "publish",
        otel.name = format!("publish {}", row.topic),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.operation.name = "publish",
        messaging.destination.name = %row.topic,
        messaging.message.id = event_id,
        messaging.kafka.message.key = %row.key,
        messaging.destination.partition.id = Empty,
        messaging.kafka.offset = Empty,
        outbox.id = row.id,
        trace_id = Empty,
        span_id = Empty,
    );
    keel_core::telemetry::continue_trace(&span, &row.headers);
    span
}

/// The oldest pending rows, locked for this transaction (`$1`: how many), leaving out those held
/// back by an earlier row of their topic and key that was set aside (and neither retried nor
/// discarded). With [`MARK`], the SQL of a step; `make bench` times the two alone as the relay's
/// database baseline.
pub const CLAIM: &str =
    "SELECT e.id, e.topic, e.message_key, e.event_type, e.event_id, e.body, e.schema_fingerprint,
        CASE WHEN e.body IS NULL THEN e.payload::text END AS payload, e.headers::text AS headers,
        extract(epoch FROM e.created_at)::float8 * 1000 AS created_ms
   FROM outbox.events e
  WHERE e.published_at IS NULL AND e.failed_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM outbox.events h
                     WHERE h.failed_at IS NOT NULL AND h.discarded_at IS NULL
                       AND h.topic = e.topic AND h.message_key = e.message_key AND h.id < e.id)
  ORDER BY e.id LIMIT $1 FOR UPDATE OF e";

/// A claimed row, or why it can never be published.
fn parse(row: &sqlx::postgres::PgRow) -> Result<Pending, String> {
    let headers: String = row.get("headers");
    let headers = serde_json::from_str::<TraceHeaders>(&headers)
        .map_err(|e| format!("headers are not a string map: {e}"))?;
    let body: Option<Vec<u8>> = row.get("body");
    let fingerprint: Option<i64> = row.get("schema_fingerprint");
    let content = match (body, fingerprint) {
        (Some(body), Some(fingerprint)) => Content::Written { fingerprint, body },
        (Some(_), None) => return Err("the row has a body but no schema_fingerprint".to_owned()),
        (None, _) => {
            let payload: Option<String> = row.get("payload");
            let event = serde_json::from_str::<Event>(payload.as_deref().unwrap_or("null"))
                .map_err(|e| format!("payload is not a known event: {e}"))?;
            Content::Json(event)
        }
    };
    Ok(Pending {
        id: row.get("id"),
        topic: row.get("topic"),
        key: row.get("message_key"),
        event_type: row.get("event_type"),
        event_id: row.get("event_id"),
        content,
        headers,
        created_ms: row.get("created_ms"),
    })
}

/// Marks rows `$1` (ids) published. The time is the acknowledgement's, not the claim's
/// transaction start (`now()`), which for a large batch is seconds earlier.
pub const MARK: &str =
    "UPDATE outbox.events SET published_at = clock_timestamp() WHERE id = ANY($1)";

/// Rows marked published per statement while a batch's acknowledgements come in.
const MARK_SLICE: usize = 500;

async fn mark_published(
    tx: &mut Transaction<'static, Postgres>,
    ids: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query(MARK).bind(ids).execute(&mut **tx).await?;
    Ok(())
}

/// Sets a row that cannot be published aside, in the claim's transaction: it would otherwise
/// block every row behind it.
async fn set_aside(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
    topic: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tracing::error!(
        outbox_id = id,
        topic,
        reason,
        "Outbox row cannot be published; set aside (fix the cause, then `keel outbox retry`)"
    );
    sqlx::query("UPDATE outbox.events SET failed_at = now(), error = $2 WHERE id = $1")
        .bind(id)
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Whether Kafka's refusal of one record is the record's own, so that retrying cannot help until
/// an operator acts: its topic does not exist (the relay never creates one), the relay may not
/// write to it, or the record is larger than the cluster takes. Everything else (timeouts, no
/// leader, too few replicas, a fatal client) is the cluster's or the client's, and retried.
pub fn refused_for_good(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as E;
    matches!(
        code,
        // librdkafka reports a topic its metadata says the cluster does not have (after
        // topic.metadata.propagation.max.ms) as the broker's UNKNOWN_TOPIC_OR_PART; when a
        // produce request gets that answer it refreshes and retries by itself instead.
        E::UnknownTopic
            | E::UnknownTopicOrPartition
            | E::UnknownPartition
            | E::TopicAuthorizationFailed
            | E::MessageSizeTooLarge
            | E::MessageBatchTooLarge
            | E::InvalidMessageSize
            | E::InvalidRecord
            | E::InvalidTopic
            | E::PolicyViolation
    )
}

/// What became of one row handed to the producer (or refused before it was).
enum Fate {
    Acknowledged,
    /// The row's own fault: set it aside with this reason.
    SetAside(String),
    /// Not the row's fault: it stays pending.
    Failed(String),
    /// As [`Fate::Failed`], and every later row of the step would fail the same way (the
    /// registry unreachable, the producer refusing): none is tried.
    Unreachable(String),
}

/// A record handed to the producer: its delivery and, with tracing on, its span.
type Sent = (rdkafka::producer::DeliveryFuture, Option<tracing::Span>);

/// Waits until Kafka answered for every record of `rows` (sent in that order), counting each in
/// the relay's metrics: what became of each.
async fn settle(sent: Vec<Sent>, rows: &[Pending]) -> Vec<Fate> {
    let (deliveries, spans): (Vec<_>, Vec<_>) = sent.into_iter().unzip();
    let metrics = keel_core::metrics::metrics();
    let mut fates = Vec::with_capacity(rows.len());
    for ((outcome, span), row) in join_all(deliveries).await.into_iter().zip(spans).zip(rows) {
        let topic = keel_core::metrics::TopicLabels {
            topic: row.topic.clone(),
        };
        let fate = match outcome {
            Ok(Ok(delivered)) => {
                metrics.relay_published.get_or_create(&topic).inc();
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
                metrics
                    .relay_commit_to_ack
                    .observe(((now_ms - row.created_ms) / 1000.0).max(0.0));
                if let Some(span) = span {
                    span.record(
                        "messaging.destination.partition.id",
                        delivered.partition.to_string(),
                    );
                    span.record("messaging.kafka.offset", delivered.offset);
                }
                Fate::Acknowledged
            }
            Ok(Err((e, _))) => {
                metrics.relay_failed.get_or_create(&topic).inc();
                match e.rdkafka_error_code() {
                    Some(code) if refused_for_good(code) => {
                        Fate::SetAside(format!("Kafka refused the record: {e}"))
                    }
                    _ => Fate::Failed(e.to_string()),
                }
            }
            Err(_) => {
                metrics.relay_failed.get_or_create(&topic).inc();
                Fate::Failed("delivery future cancelled (producer dropped)".to_owned())
            }
        };
        fates.push(fate);
    }
    fates
}

/// The relay loop's name for liveness (`/health`).
pub const HEALTH_LOOP: &str = "relay";

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer<Reporter>,
    encoder: Encoder,
    config: RelaySettings,
    /// Where the producer's fatal error is raised: the process's.
    fatal: Fatal,
    reporter: Reporter,
    /// Set only by [`testing::crash_before_mark`].
    crash_before_mark: bool,
    /// Registry ids of the writers' schemas, per topic and fingerprint.
    schema_ids: std::sync::Mutex<std::collections::HashMap<(String, i64), u32>>,
}

/// What a step knows while it sends: what was set aside, what failed, which streams may not go
/// on in this step.
#[derive(Default)]
struct Ledger {
    set_aside: Vec<(i64, String, String)>,
    failed: usize,
    first_failure: Option<String>,
    /// Streams (topic, key) whose earlier row in this step was not acknowledged.
    stopped: HashSet<(String, String)>,
    published: usize,
    /// Rows the step claimed.
    total: usize,
    /// A row could not be handed over because the registry is unreachable or the producer
    /// refuses: no later row of this step is tried, as each would wait out the same failure (a
    /// registry timeout is 5 s a row). They stay pending for the next step. A subject's own
    /// trouble stops only its row's stream.
    halted: bool,
}

impl Ledger {
    fn fail(&mut self, stream: (String, String), error: String) {
        self.failed += 1;
        self.first_failure.get_or_insert(error);
        self.stopped.insert(stream);
    }

    fn set_aside(&mut self, id: i64, stream: (String, String), reason: String) {
        self.set_aside.push((id, stream.0.clone(), reason));
        self.stopped.insert(stream);
    }

    /// What the step reports once its transaction has committed: the rows that were not
    /// acknowledged make it fail, after the others were marked.
    fn outcome(self) -> Result<Step, RelayError> {
        match self.first_failure {
            None => Ok(Step::Published(self.published)),
            Some(first) => Err(RelayError::Delivery {
                failed: self.failed,
                total: self.total,
                published: self.published,
                first,
            }),
        }
    }
}

impl Relay {
    /// A relay publishing from `pool` with `s`'s broker, registry and relay settings.
    pub fn new(pool: PgPool, s: &Settings) -> anyhow::Result<Self> {
        let fatal = Fatal::process();
        let reporter = Reporter::new("producer relay", fatal.clone());
        let producer = keel_core::kafka::producer_config(&s.kafka)
            .create_with_context(reporter.clone())
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create producer: {e}"))?;
        let encoder = Encoder::new(&s.schema_registry_url)?;
        Ok(Self {
            pool,
            producer,
            encoder,
            config: s.relay.clone(),
            fatal,
            reporter,
            crash_before_mark: false,
            schema_ids: Default::default(),
        })
    }

    /// Registers the contracts of each `(topic, namespace)` with the registry, so that a registry
    /// that refuses one stops the relay at start-up with the reason.
    pub async fn prepare(&self, topics: &[(&str, &str)]) -> Result<(), EncodeError> {
        for (topic, namespace) in topics {
            self.encoder.prepare(topic, namespace).await?;
        }
        Ok(())
    }

    /// A transaction holding the relay lock; `None` when another relay holds it. It commits
    /// without waiting for its WAL to reach the disk (see "Marks" in the module's docs), and
    /// none of its statements may run longer than 30 s (a claim or a mark takes milliseconds:
    /// one that hangs holds every other relay back). A relay that stops talking mid-step loses
    /// the lock to the server's `idle_in_transaction_session_timeout` ([`keel_core::db::SESSION`]).
    async fn begin_as_leader(&self) -> Result<Option<Transaction<'static, Postgres>>, RelayError> {
        let mut tx = self.pool.begin().await?;
        let leader: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock($1)
               FROM set_config('synchronous_commit', 'off', true) AS durability,
                    set_config('statement_timeout', '30s', true) AS patience",
        )
        .bind(RELAY_LOCK)
        .fetch_one(&mut *tx)
        .await?;
        if !leader {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(tx))
    }

    fn limit(&self) -> i64 {
        i64::try_from(self.config.batch_size).unwrap_or(i64::MAX)
    }

    /// Encodes `row` and hands it to the producer without waiting for the acknowledgement: a
    /// whole wave is in flight at once. `Err` is the row's fate when it never reached the
    /// producer.
    async fn send(&self, row: &Pending) -> Result<Sent, Fate> {
        let encoded = match &row.content {
            Content::Written { fingerprint, body } => self
                .schema_id(&row.topic, &row.event_type, *fingerprint)
                .await
                .map(|id| [&[0u8][..], &id.to_be_bytes(), body].concat()),
            Content::Json(event) => self.encoder.encode(&row.topic, event).await,
        };
        let value = match encoded {
            Ok(value) => value,
            Err(e) if e.unreachable => return Err(Fate::Unreachable(e.to_string())),
            Err(e) if e.transient => return Err(Fate::Failed(e.to_string())),
            Err(e) => return Err(Fate::SetAside(e.to_string())),
        };
        let event_id = row.event_id.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(2 + row.headers.len())
            .insert(Header {
                key: "keel-event-type",
                value: Some(row.event_type.as_str()),
            })
            .insert(Header {
                key: "keel-event-id",
                value: Some(event_id.as_str()),
            });
        // With tracing on, a producer span in the writer's trace; its context goes on.
        let span = keel_core::telemetry::recording().then(|| publish_span(row, &event_id));
        let trace = match &span {
            Some(span) => {
                let writer = keel_core::telemetry::extract(|k| row.headers.get(k).cloned());
                span.in_scope(|| keel_core::telemetry::headers_for_current(&writer))
            }
            None => row.headers.clone(),
        };
        for (k, v) in &trace {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
        let mut record = FutureRecord::to(&row.topic)
            .key(&row.key)
            .payload(&value)
            .headers(headers);
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok((delivery, span)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => {
                    return Err(match e.rdkafka_error_code() {
                        Some(code) if refused_for_good(code) => {
                            Fate::SetAside(format!("Kafka refused the record: {e}"))
                        }
                        _ => Fate::Unreachable(e.to_string()),
                    });
                }
            }
        }
    }

    /// The registry id of the writer's schema `fingerprint` under its subject on `topic`: the
    /// schema from `outbox.schemas`, registered (or found) once per process.
    async fn schema_id(
        &self,
        topic: &str,
        record: &str,
        fingerprint: i64,
    ) -> Result<u32, EncodeError> {
        let key = (topic.to_owned(), fingerprint);
        if let Some(id) = self
            .schema_ids
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied())
        {
            return Ok(id);
        }
        let refused = |message: String, transient: bool| EncodeError {
            record: record.to_owned(),
            topic: topic.to_owned(),
            message,
            transient,
            unreachable: false,
            credentials_refused: false,
        };
        let found: Option<(String, String)> =
            sqlx::query_as("SELECT record, schema FROM outbox.schemas WHERE fingerprint = $1")
                .bind(fingerprint)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| refused(format!("reading the writer's schema: {e}"), true))?;
        let (record, schema) = found.ok_or_else(|| {
            refused(
                format!("the writer's schema {fingerprint:016x} is not in outbox.schemas"),
                false,
            )
        })?;
        let id = self
            .encoder
            .id_for(topic, &record, fingerprint, &schema)
            .await?;
        if let Ok(mut m) = self.schema_ids.lock() {
            m.insert(key, id);
        }
        Ok(id)
    }

    /// Hands `row` to the producer unless its stream stopped in this step; a row refused before
    /// it reached the producer goes in `ledger`.
    async fn offer(&self, row: Pending, ledger: &mut Ledger, wave: &mut Vec<(Pending, Sent)>) {
        if ledger.halted || ledger.stopped.contains(&row.stream()) {
            return;
        }
        match self.send(&row).await {
            Ok(sent) => wave.push((row, sent)),
            Err(Fate::SetAside(reason)) => ledger.set_aside(row.id, row.stream(), reason),
            Err(Fate::Failed(error)) => ledger.fail(row.stream(), error),
            Err(Fate::Unreachable(error)) => {
                ledger.fail(row.stream(), error);
                ledger.halted = true;
            }
            Err(Fate::Acknowledged) => {}
        }
    }

    /// Waits for `wave`'s acknowledgements a slice at a time, marking each slice's acknowledged
    /// rows as it comes in (marking overlaps with waiting for the rest), and notes the others in
    /// `ledger`.
    async fn settle_wave(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        mut wave: Vec<(Pending, Sent)>,
        ledger: &mut Ledger,
    ) -> Result<(), RelayError> {
        while !wave.is_empty() {
            let rest = wave.split_off(wave.len().min(MARK_SLICE));
            let slice = std::mem::replace(&mut wave, rest);
            let (rows, sent): (Vec<Pending>, Vec<Sent>) = slice.into_iter().unzip();
            let fates = settle(sent, &rows).await;
            if self.crash_before_mark {
                return Err(RelayError::Crashed);
            }
            let mut acknowledged = Vec::with_capacity(rows.len());
            for (row, fate) in rows.iter().zip(fates) {
                match fate {
                    Fate::Acknowledged => acknowledged.push(row.id),
                    Fate::SetAside(reason) => ledger.set_aside(row.id, row.stream(), reason),
                    Fate::Failed(error) | Fate::Unreachable(error) => {
                        ledger.fail(row.stream(), error)
                    }
                }
            }
            mark_published(tx, &acknowledged).await?;
            ledger.published += acknowledged.len();
        }
        Ok(())
    }

    /// Claim, produce, mark, in one transaction. The claimed rows are streamed from PostgreSQL
    /// into the producer as they arrive (the first wave), so reading the batch overlaps with
    /// sending it; a row whose topic and key already has a row in the wave waits for the next
    /// (see "Order" in the module's docs). The acknowledged rows are marked and rows refused for
    /// good set aside, in the claim's transaction; if others were not acknowledged, the step
    /// commits that and then fails.
    ///
    /// A step that fails rolls its transaction back before it returns, so the lock is free for
    /// the next step at once (on whichever connection it gets), not once the pool gets round to
    /// the abandoned connection.
    pub async fn step(&self) -> Result<Step, RelayError> {
        let Some(mut tx) = self.begin_as_leader().await? else {
            return Ok(Step::NotLeader);
        };
        match self.publish(&mut tx).await {
            Ok(ledger) => {
                tx.commit().await?;
                ledger.outcome()
            }
            Err(error) => {
                // If the rollback fails or hangs, the step stops waiting for it: the connection
                // goes back to the pool, which tries the rollback again (and closes the
                // connection if it fails), while the loop carries on; until then the next steps
                // may find the lock held and report NotLeader.
                match tokio::time::timeout(Duration::from_secs(5), tx.rollback()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(rollback)) => {
                        tracing::warn!(error = %rollback, "rolling back a failed relay step")
                    }
                    Err(_) => tracing::warn!("rolling back a failed relay step: no answer in 5 s"),
                }
                Err(error)
            }
        }
    }

    /// The body of [`Relay::step`], in the leader's transaction `tx`: claims, produces, marks
    /// and sets aside; the caller commits.
    async fn publish(&self, tx: &mut Transaction<'static, Postgres>) -> Result<Ledger, RelayError> {
        let mut ledger = Ledger::default();
        let mut wave = Vec::new();
        let mut in_wave = HashSet::new();
        let mut later = Vec::new();
        let mut total = 0;
        {
            let mut stream = sqlx::query(CLAIM).bind(self.limit()).fetch(&mut **tx);
            while let Some(row) = stream.try_next().await? {
                total += 1;
                match parse(&row) {
                    Ok(p) if in_wave.insert(p.stream()) => {
                        self.offer(p, &mut ledger, &mut wave).await;
                    }
                    Ok(p) => later.push(p),
                    // Set aside like any row refused for good: the rows of its topic and key
                    // behind it wait for it.
                    Err(reason) => {
                        ledger.set_aside(
                            row.get("id"),
                            (row.get("topic"), row.get("message_key")),
                            reason,
                        );
                    }
                }
            }
        }
        if total > 0 {
            keel_core::metrics::metrics()
                .relay_batch_size
                .observe(total as f64);
        }
        loop {
            self.settle_wave(tx, std::mem::take(&mut wave), &mut ledger)
                .await?;
            let waiting = std::mem::take(&mut later);
            if waiting.is_empty() {
                break;
            }
            in_wave.clear();
            for row in waiting {
                if ledger.stopped.contains(&row.stream()) {
                    continue; // an earlier row of its stream was not acknowledged
                }
                if in_wave.insert(row.stream()) {
                    self.offer(row, &mut ledger, &mut wave).await;
                } else {
                    later.push(row);
                }
            }
        }
        for (id, topic, reason) in &ledger.set_aside {
            set_aside(tx, *id, topic, reason).await?;
        }
        ledger.total = total;
        Ok(ledger)
    }

    /// Relays until `shutdown`: drains while full batches come back, then waits for a NOTIFY or
    /// the polling interval. A failing step is retried with backoff. On shutdown the batch in
    /// progress finishes (or rolls back) and the producer is flushed. A fatal producer error
    /// ends it the same way, with that error ([`keel_core::fatal`]).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("keel_outbox").await?;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let stop = shutdown.child_token();
        let fatal = self.fatal.token();
        let housekeeping = tokio::spawn(housekeeping(
            self.pool.clone(),
            self.config.retention,
            stop.clone(),
        ));
        tracing::info!(batch_size = self.config.batch_size, "Relay started");
        loop {
            self.reporter.check(self.producer.client());
            if shutdown.is_cancelled() || fatal.is_cancelled() {
                break;
            }
            keel_core::health::beat(HEALTH_LOOP);
            let idle = match self.step().await {
                Ok(Step::Published(n)) => {
                    backoff.reset();
                    if n > 0 {
                        tracing::debug!(rows = n, "Published outbox batch");
                    }
                    n < self.config.batch_size
                }
                Ok(Step::NotLeader) => true,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, attempt = backoff.attempts(), "Relay step failed; will retry");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = fatal.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            };
            if !idle {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = fatal.cancelled() => break,
                n = listener.recv() => match n {
                    // The notifications already received all ask for the same step: take them
                    // now, so that the commits of a burst cost one step, not one (mostly empty)
                    // step each. Those arriving later end the next wait. PostgreSQL sends a
                    // notification after its transaction commits, so the step's claim sees the
                    // row of every one taken here. (Polling `try_recv` once is cancel-safe: sqlx
                    // takes a message off its buffer only whole.)
                    Ok(_) => while let Some(Ok(Some(_))) = listener.try_recv().now_or_never() {},
                    Err(e) => {
                        tracing::warn!(error = %e, "Outbox LISTEN connection lost; polling until it is back");
                        tokio::time::sleep(self.config.poll_interval).await;
                    }
                },
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
        stop.cancel();
        if let Err(e) = housekeeping.await {
            tracing::warn!(error = %e, "Outbox housekeeping task failed");
        }
        // A producer that failed fatally delivers nothing more: flushing it would only wait.
        if self.fatal.reason().is_none() {
            let producer = self.producer.clone();
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await??;
        }
        keel_core::health::done(HEALTH_LOOP);
        tracing::info!("Relay stopped");
        self.fatal.check()
    }
}

/// Published rows deleted per statement past the retention.
const DELETE_SLICE: u64 = 10_000;

/// Beside the relay loop until `done`: the outbox gauges every 5 s, and every minute the
/// published rows past `retention`, a slice at a time until none are left. Not in the loop:
/// every order committed while the loop waits on one of these waits too, and the gauges'
/// counts can be slow (before the table's first ANALYZE the planner scans it whole, 60–80 ms at
/// 45,000 rows, which showed as a stall in the end-to-end bench every 5 s).
async fn housekeeping(pool: PgPool, retention: Duration, done: CancellationToken) {
    let mut measure = tokio::time::interval(Duration::from_secs(5));
    let mut cleanup = tokio::time::interval(Duration::from_secs(60));
    measure.set_missed_tick_behavior(MissedTickBehavior::Delay);
    cleanup.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            _ = measure.tick() => if let Err(e) = measure_backlog(&pool).await {
                tracing::debug!(error = %e, "Cannot measure the outbox backlog");
            },
            _ = cleanup.tick() => delete_all_expired(&pool, retention, &done).await,
        }
    }
}

/// Deletes the published rows past `retention`, a slice at a time until none are left (or
/// `done`).
async fn delete_all_expired(pool: &PgPool, retention: Duration, done: &CancellationToken) {
    let mut total = 0;
    loop {
        match delete_expired(pool, retention).await {
            Ok(n) => {
                total += n;
                if n < DELETE_SLICE || done.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Outbox cleanup failed");
                break;
            }
        }
    }
    if total > 0 {
        tracing::info!(rows = total, "Deleted published outbox rows past retention");
    }
}

/// Sets the outbox gauges: pending rows, the oldest pending row's age, rows set aside (and not
/// discarded).
async fn measure_backlog(pool: &PgPool) -> Result<(), sqlx::Error> {
    let (pending, oldest, failed): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL),
                -- The oldest is the lowest id: the pending index answers, no scan of the backlog.
                (SELECT extract(epoch FROM now() - created_at)::float8 FROM outbox.events
                  WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT 1),
                (SELECT count(*) FROM outbox.events WHERE failed_at IS NOT NULL AND discarded_at IS NULL)",
    )
    .fetch_one(pool)
    .await?;
    let m = keel_core::metrics::metrics();
    m.outbox_pending.set(pending);
    m.outbox_oldest_age.set(oldest.unwrap_or(0.0).max(0.0));
    m.outbox_failed.set(failed);
    Ok(())
}

/// Deletes up to [`DELETE_SLICE`] published rows older than `retention`; how many it deleted.
async fn delete_expired(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "DELETE FROM outbox.events WHERE id IN (
            SELECT id FROM outbox.events WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
    )
    .bind(retention.as_secs_f64())
    .bind(DELETE_SLICE as i64)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

/// What tests need of the relay: a step that stops where a crash would.
#[cfg(feature = "testing")]
pub mod testing {
    use super::Relay;

    /// Every step of `relay` hands its first wave (each key's first row) to the producer and
    /// waits for the first slice's acknowledgements (all of them, for up to 500 rows), then
    /// fails with [`super::RelayError::Crashed`] before marking any: the rows stay pending and
    /// are published again, as after a crash between produce and mark.
    pub fn crash_before_mark(mut relay: Relay) -> Relay {
        relay.crash_before_mark = true;
        relay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_own_refusals_are_for_good_and_the_clusters_are_retried() {
        use RDKafkaErrorCode as E;
        for own in [
            E::UnknownTopicOrPartition,
            E::TopicAuthorizationFailed,
            E::MessageSizeTooLarge,
            E::InvalidRecord,
            E::PolicyViolation,
        ] {
            assert!(refused_for_good(own), "{own:?}");
        }
        for clusters in [
            E::MessageTimedOut,
            E::RequestTimedOut,
            E::LeaderNotAvailable,
            E::NotLeaderForPartition,
            E::NotEnoughReplicas,
            E::BrokerNotAvailable,
        ] {
            assert!(!refused_for_good(clusters), "{clusters:?}");
        }
    }
}
