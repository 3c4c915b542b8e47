//! The relay: publishes committed outbox rows to Kafka.
//!
//! One [`Relay::step`] is one transaction: take the relay lock, claim the oldest pending rows
//! (`FOR UPDATE`), encode them (Confluent wire format), hand them all to the idempotent producer,
//! await every acknowledgement, then mark them published and commit. If anything fails before the
//! commit, the transaction rolls back and the rows are published again later.
//!
//! # Several relays
//! The lock is `pg_try_advisory_xact_lock`, held for the step's transaction. A relay that does not
//! get it skips the step, so batches never overlap: the next batch is claimed only after the
//! previous one is marked, and an aggregate's events leave in id order whichever relay sends them.
//! A crashed relay's lock goes with its connection. Throughput is that of one relay, which the
//! producer, not the claim, bounds; extra instances are for availability.
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

use std::time::Duration;

use futures::future::join_all;
use futures::{FutureExt, TryStreamExt};
use keel_core::Settings;
use keel_core::backoff::Backoff;
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
    #[error("{failed} of {total} records were not acknowledged by Kafka; first error: {first}")]
    Delivery {
        failed: usize,
        total: usize,
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
    /// Rows published and marked (0 when nothing was pending).
    Published(usize),
}

struct Pending {
    id: i64,
    topic: String,
    key: String,
    event: Event,
    headers: TraceHeaders,
    /// When the writer inserted the row (milliseconds since the epoch).
    created_ms: f64,
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

/// The oldest pending rows, locked for this transaction (`$1`: how many). With [`MARK`], the
/// SQL of a step; `make bench` times the two alone as the relay's database baseline.
pub const CLAIM: &str =
    "SELECT id, topic, message_key, payload::text AS payload, headers::text AS headers,
        extract(epoch FROM created_at)::float8 * 1000 AS created_ms
   FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL
  ORDER BY id LIMIT $1 FOR UPDATE";

/// A claimed row, or its id and why it can never be published.
fn parse(row: &sqlx::postgres::PgRow) -> Result<Pending, (i64, String)> {
    let id: i64 = row.get("id");
    let payload: String = row.get("payload");
    let headers: String = row.get("headers");
    let (event, headers) = serde_json::from_str::<Event>(&payload)
        .map_err(|e| format!("payload is not a known event: {e}"))
        .and_then(|event| {
            serde_json::from_str::<TraceHeaders>(&headers)
                .map(|h| (event, h))
                .map_err(|e| format!("headers are not a string map: {e}"))
        })
        .map_err(|reason| (id, reason))?;
    Ok(Pending {
        id,
        topic: row.get("topic"),
        key: row.get("message_key"),
        event,
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
    rows: &[Pending],
) -> Result<(), sqlx::Error> {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    sqlx::query(MARK).bind(&ids).execute(&mut **tx).await?;
    Ok(())
}

/// Sets a row that can never be published aside, in the claim's transaction: it would otherwise
/// block every row behind it.
async fn set_aside(
    tx: &mut Transaction<'static, Postgres>,
    id: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    tracing::error!(
        outbox_id = id,
        reason,
        "Outbox row can never be published; set aside as failed"
    );
    sqlx::query("UPDATE outbox.events SET failed_at = now(), error = $2 WHERE id = $1")
        .bind(id)
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A record handed to the producer: its delivery and, with tracing on, its span.
type Sent = (rdkafka::producer::DeliveryFuture, Option<tracing::Span>);

/// Waits until Kafka acknowledged every record of `rows` (sent in that order), counting each
/// in the relay's metrics; an error if any was not acknowledged.
async fn settle(sent: Vec<Sent>, rows: &[Pending]) -> Result<(), RelayError> {
    let (deliveries, spans): (Vec<_>, Vec<_>) = sent.into_iter().unzip();
    let total = deliveries.len();
    let mut failed = 0;
    let mut first = None;
    let metrics = keel_core::metrics::metrics();
    for ((outcome, span), row) in join_all(deliveries).await.into_iter().zip(spans).zip(rows) {
        let topic = keel_core::metrics::TopicLabels {
            topic: row.topic.clone(),
        };
        if matches!(outcome, Ok(Ok(_))) {
            metrics.relay_published.get_or_create(&topic).inc();
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            metrics
                .relay_commit_to_ack
                .observe(((now_ms - row.created_ms) / 1000.0).max(0.0));
        } else {
            metrics.relay_failed.get_or_create(&topic).inc();
        }
        let error = match outcome {
            Ok(Ok(delivered)) => {
                if let Some(span) = span {
                    span.record(
                        "messaging.destination.partition.id",
                        delivered.partition.to_string(),
                    );
                    span.record("messaging.kafka.offset", delivered.offset);
                }
                continue;
            }
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "delivery future cancelled (producer dropped)".to_owned(),
        };
        failed += 1;
        first.get_or_insert(error);
    }
    match first {
        None => Ok(()),
        Some(first) => Err(RelayError::Delivery {
            failed,
            total,
            first,
        }),
    }
}

/// The relay loop's name for liveness (`/health`).
pub const HEALTH_LOOP: &str = "relay";

pub struct Relay {
    pool: PgPool,
    producer: FutureProducer,
    encoder: Encoder,
    config: RelaySettings,
    /// Set only by [`testing::crash_before_mark`].
    crash_before_mark: bool,
}

impl Relay {
    /// A relay publishing from `pool` with `s`'s broker, registry and relay settings.
    pub fn new(pool: PgPool, s: &Settings) -> anyhow::Result<Self> {
        let producer: FutureProducer = keel_core::kafka::producer_config(&s.kafka)
            .create()
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create producer: {e}"))?;
        let encoder = Encoder::new(&s.schema_registry_url)?;
        Ok(Self {
            pool,
            producer,
            encoder,
            config: s.relay.clone(),
            crash_before_mark: false,
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
    /// whole batch is in flight at once. `batch` is for the error message.
    async fn send(&self, row: &Pending, batch: usize) -> Result<Sent, RelayError> {
        let value = self.encoder.encode(&row.topic, &row.event).await?;
        let event_id = row.event.event_id().to_string();
        let mut headers = OwnedHeaders::new_with_capacity(2 + row.headers.len())
            .insert(Header {
                key: "keel-event-type",
                value: Some(row.event.name()),
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
                    return Err(RelayError::Delivery {
                        failed: 1,
                        total: batch,
                        first: e.to_string(),
                    });
                }
            }
        }
    }

    /// Claim, produce, mark, in one transaction. The claimed rows are streamed from PostgreSQL
    /// into the producer as they arrive, so reading the batch overlaps with sending it; the
    /// rows are marked only after Kafka acknowledged all of them.
    pub async fn step(&self) -> Result<Step, RelayError> {
        let Some(mut tx) = self.begin_as_leader().await? else {
            return Ok(Step::NotLeader);
        };
        let mut rows = Vec::new();
        let mut sent = Vec::new();
        let mut unpublishable = Vec::new();
        {
            let mut stream = sqlx::query(CLAIM).bind(self.limit()).fetch(&mut *tx);
            while let Some(row) = stream.try_next().await? {
                match parse(&row) {
                    Ok(p) => {
                        sent.push(self.send(&p, self.config.batch_size).await?);
                        rows.push(p);
                    }
                    Err(bad) => unpublishable.push(bad),
                }
            }
        }
        for (id, reason) in &unpublishable {
            set_aside(&mut tx, *id, reason).await?;
        }
        if !rows.is_empty() {
            keel_core::metrics::metrics()
                .relay_batch_size
                .observe(rows.len() as f64);
        }
        // Marked a slice at a time as the acknowledgements come in, so that marking overlaps
        // with waiting for the rest; all in the claim's transaction, committed only when every
        // row is acknowledged and marked.
        let mut from = 0;
        while from < rows.len() {
            let to = (from + MARK_SLICE).min(rows.len());
            let rest = sent.split_off(to - from);
            let slice = std::mem::replace(&mut sent, rest);
            settle(slice, &rows[from..to]).await?;
            if self.crash_before_mark {
                return Err(RelayError::Crashed);
            }
            mark_published(&mut tx, &rows[from..to]).await?;
            from = to;
        }
        tx.commit().await?;
        Ok(Step::Published(rows.len()))
    }

    /// Relays until `shutdown`: drains while full batches come back, then waits for a NOTIFY or
    /// the polling interval. A failing step is retried with backoff. On shutdown the batch in
    /// progress finishes (or rolls back) and the producer is flushed.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen("keel_outbox").await?;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let housekeeping = tokio::spawn(housekeeping(
            self.pool.clone(),
            self.config.retention,
            shutdown.clone(),
        ));
        tracing::info!(batch_size = self.config.batch_size, "Relay started");
        while !shutdown.is_cancelled() {
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
        // The loop ends only on `shutdown`, which ends the housekeeping too.
        if let Err(e) = housekeeping.await {
            tracing::warn!(error = %e, "Outbox housekeeping task failed");
        }
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await??;
        keel_core::health::done(HEALTH_LOOP);
        tracing::info!("Relay stopped");
        Ok(())
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

/// Sets the outbox gauges: pending rows, the oldest pending row's age, rows set aside.
async fn measure_backlog(pool: &PgPool) -> Result<(), sqlx::Error> {
    let (pending, oldest, failed): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL),
                -- The oldest is the lowest id: the pending index answers, no scan of the backlog.
                (SELECT extract(epoch FROM now() - created_at)::float8 FROM outbox.events
                  WHERE published_at IS NULL AND failed_at IS NULL ORDER BY id LIMIT 1),
                (SELECT count(*) FROM outbox.events WHERE failed_at IS NOT NULL)",
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

    /// Every step of `relay` hands all its rows to the producer and waits for the first slice's
    /// acknowledgements (all of them, for a batch of up to 500 rows), then fails with
    /// [`super::RelayError::Crashed`] before marking any: the rows stay pending and are
    /// published again, as after a crash between produce and mark.
    pub fn crash_before_mark(mut relay: Relay) -> Relay {
        relay.crash_before_mark = true;
        relay
    }
}
