//! The loop every consumer group runs: take the records already fetched, apply them in one
//! transaction (dedupe rows and effects), store their offsets, repeat.
//!
//! Records of one partition are processed one after another, in offset order; parallelism comes
//! from partitions spread over processes (run the same group N times). librdkafka auto-commits
//! only offsets the runtime stored, and the runtime stores an offset only after the record is
//! done: its transaction committed, or it was written to the dead-letter topic.
//!
//! # Layout
//! One room per concern; each file's own doc says what it owns and what it promises.
//! - [`handler`]: the [`Handler`] trait a group implements, its batch hook, [`HandlerError`].
//! - [`transaction`]: [`transact`], the dedupe rows and the effects in one transaction.
//! - [`source`]: fetching (the next record, the records already fetched) and storing offsets,
//!   which librdkafka's auto-commit then commits (`keel_core::kafka::consumer_config`).
//! - [`apply`]: a batch at once, else record by record with the retry classes.
//! - [`context`]: what librdkafka reports from its threads: rebalances, commit results, fatal
//!   errors, the statistics the lag is read from.
//! - [`dead_letter`]: the dead-letter writer and its headers.
//! - [`membership`]: owned partitions.
//! - [`quirks`]: the local broker's wrong answers, worked around only with
//!   `KEEL_BROKER_QUIRKS=tansu`.
//! - [`spans`]: each record's consumer span and the trace context handlers pass on.
//! - `testing` (feature `testing`): one record taken, applied and stored step by step.
//!
//! # Shutdown
//! On shutdown the record in progress finishes (or, if it is waiting to retry, is abandoned
//! uncommitted), stored offsets are committed synchronously, and the loop returns.

pub mod apply;
pub mod context;
pub mod dead_letter;
pub mod handler;
pub mod membership;
pub mod quirks;
pub mod source;
pub mod spans;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transaction;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_core::Settings;
use keel_core::settings::ConsumerSettings;
use keel_schemas::Decoder;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::producer::{FutureProducer, Producer as _};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use dead_letter::{dlq_headers, dlq_topic};
pub use handler::{DEFAULT_BATCH_SIZE, Handler, HandlerError, Meta};
pub use transaction::{Outcome, transact};

use context::Context;
use membership::MembershipWatch;

/// Which group a consumer is and what it reads: a [`crate::Group`]'s, or a test's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The Kafka group id, and the group's name in dedupe rows, metrics and logs.
    pub group: String,
    pub topics: Vec<String>,
}

impl Subscription {
    pub fn new(group: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            group: group.into(),
            topics,
        }
    }

    /// Its dead-letter topics, one per topic it reads ([`dlq_topic`]).
    pub fn dead_letters(&self) -> Vec<keel_core::topics::DeadLetter> {
        self.topics
            .iter()
            .map(|t| keel_core::topics::DeadLetter {
                name: dlq_topic(t, &self.group),
                source: t.clone(),
            })
            .collect()
    }

    /// The names of its [`Subscription::dead_letters`].
    pub fn dead_letter_topics(&self) -> Vec<String> {
        self.dead_letters().into_iter().map(|d| d.name).collect()
    }
}

pub struct Consumer<H: Handler> {
    subscription: Subscription,
    handler: H,
    pool: PgPool,
    consumer: Arc<StreamConsumer<Context>>,
    /// The broker's wrong answers worked around ([`quirks`]); none against Apache Kafka.
    broker_quirks: keel_core::settings::BrokerQuirks,
    producer: FutureProducer<keel_core::kafka::Reporter>,
    decoder: Decoder,
    /// The runtime's settings (`KEEL_CONSUMER_*`).
    config: ConsumerSettings,
    /// Where the dead-letter topics are looked for.
    kafka: keel_core::kafka::Kafka,
    /// Most records in one transaction: the setting's, else the handler's.
    batch_size: usize,
    /// Dead-letter topics known to exist.
    dlq_ready: Mutex<HashSet<String>>,
    /// This loop's name for liveness: `consumer:<group>`.
    health_loop: String,
    membership: Mutex<MembershipWatch>,
    /// Where the consumer's and the producer's fatal errors are raised: the process's.
    fatal: keel_core::fatal::Fatal,
    /// The dead-letter producer's reporter ([`Consumer::check_fatal`]).
    producer_reporter: keel_core::kafka::Reporter,
    /// When the consumer was last polled ([`Consumer::in_group_while`]).
    last_poll: Mutex<std::time::Instant>,
    /// How long the consumer may go unpolled before a wait pauses its partitions to poll: a
    /// quarter of `max.poll.interval.ms`, at most [`MAX_POLL_BUDGET`].
    poll_budget: std::time::Duration,
}

/// The most a wait goes without pausing to poll the consumer (an apply that takes longer is
/// not a wait, and is not bounded by it).
const MAX_POLL_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);

impl<H: Handler> Consumer<H> {
    /// Joins `subscription`'s group and subscribes to its topics; `handler` applies its events.
    pub fn new(
        subscription: Subscription,
        handler: H,
        pool: PgPool,
        s: &Settings,
    ) -> anyhow::Result<Self> {
        let config = &s.consumer;
        let group = subscription.group.as_str();
        let mut client = keel_core::kafka::consumer_config(&s.kafka, group);
        client.set(
            "fetch.wait.max.ms",
            config.fetch_wait.as_millis().to_string(),
        );
        client.set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        );
        if let Some(debug) = &s.kafka_debug {
            client.set("debug", debug);
        }
        if let Some(id) = &config.instance_id {
            // Unique per group: one process may run several groups under one instance name.
            client.set("group.instance.id", format!("{group}-{id}"));
        }
        // The lag gauge comes from librdkafka's statistics ([`context`]), unless the operator
        // set their own interval.
        if !s.kafka.properties.contains_key("statistics.interval.ms") {
            client.set("statistics.interval.ms", "10000");
        }
        // librdkafka's default, 5 min, unless the operator set it (KEEL_KAFKA_PROPERTIES).
        let max_poll_interval = client
            .get("max.poll.interval.ms")
            .and_then(|ms| ms.parse::<u64>().ok())
            .unwrap_or(300_000);
        let poll_budget =
            std::time::Duration::from_millis(max_poll_interval / 4).min(MAX_POLL_BUDGET);
        let fatal = keel_core::fatal::Fatal::process();
        let consumer: StreamConsumer<Context> = client
            .create_with_context(Context::new(group, fatal.clone()))
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create consumer: {e}"))?;
        let producer_reporter =
            keel_core::kafka::Reporter::new(format!("dead-letter producer {group}"), fatal.clone());
        let producer = keel_core::kafka::producer_config(&s.kafka)
            .create_with_context(producer_reporter.clone())
            .map_err(|e| anyhow::anyhow!("KEEL_KAFKA_BROKERS: cannot create producer: {e}"))?;
        let topics: Vec<&str> = subscription.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let decoder = Decoder::new(&s.schema_registry_url)?;
        let batch_size = config.batch_size.unwrap_or_else(|| handler.batch_size());
        Ok(Self {
            health_loop: format!("consumer:{group}"),
            subscription,
            handler,
            pool,
            consumer: Arc::new(consumer),
            broker_quirks: s.broker_quirks,
            kafka: s.kafka.clone(),
            producer,
            decoder,
            config: config.clone(),
            batch_size,
            dlq_ready: Mutex::default(),
            membership: Mutex::default(),
            fatal,
            producer_reporter,
            last_poll: Mutex::new(std::time::Instant::now()),
            poll_budget,
        })
    }

    /// Says at start-up which dead-letter topics are missing, rather than at the first poison
    /// record (which would then wait for its topic; `/ready` names them too).
    async fn report_missing_dlqs(&self) {
        let names = self.subscription.dead_letter_topics();
        match self.missing_dlqs(&names).await {
            Ok(missing) if missing.is_empty() => {}
            Ok(missing) => tracing::error!(
                group = self.group(),
                "{}",
                keel_core::topics::missing(&missing)
            ),
            Err(e) => {
                tracing::warn!(group = self.group(), error = %e, "Cannot list the dead-letter topics")
            }
        }
    }

    /// Raises the consumer's or the dead-letter producer's fatal error, if librdkafka has one:
    /// every round of the loop and every second while idle ([`keel_core::fatal`]).
    fn check_fatal(&self) {
        self.consumer
            .context()
            .reporter
            .check(self.consumer.client());
        self.producer_reporter.check(self.producer.client());
    }

    /// The group id.
    fn group(&self) -> &str {
        &self.subscription.group
    }

    /// Consumes until `shutdown`, then commits what is done: take the records already fetched
    /// (`next_batch`, in `source.rs`), decode and apply them (dedupe rows and effects
    /// in one transaction: `apply_decoded`, in `apply.rs`), store their offsets
    /// (`finish`), repeat. librdkafka commits the stored offsets every second. A fatal client
    /// error stops it as `shutdown` does, and it then returns that error
    /// ([`keel_core::fatal`]).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let group = self.group().to_owned();
        tracing::info!(group, topics = ?self.subscription.topics, batch_size = self.batch_size, "Consumer started");
        self.report_missing_dlqs().await;
        // The tasks beside the loop. They stop when the loop does (whatever ended it), and `run`
        // returns only once they have: nothing of the consumer outlives it.
        let beside = tokio_util::task::TaskTracker::new();
        let loop_ended = CancellationToken::new();
        let shutdown = {
            let stop = shutdown.child_token();
            let (stop_on, fatal, ended) = (stop.clone(), self.fatal.token(), loop_ended.clone());
            beside.spawn(async move {
                tokio::select! {
                    () = fatal.cancelled() => stop_on.cancel(),
                    () = ended.cancelled() => {}
                }
            });
            stop
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
            self.check_fatal();
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
            self.finish(&batch, &outcomes, started.elapsed());
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
        loop_ended.cancel();
        beside.close();
        beside.wait().await;
        tracing::info!(group, "Consumer stopped");
        self.fatal.check()
    }

    /// The records of `batch` that are done (the first `outcomes.len()`, in order): their
    /// offsets stored for the next commit, and counted. `took`: the batch's time.
    fn finish(&self, batch: &[BorrowedMessage<'_>], outcomes: &[Outcome], took: Duration) {
        let group = self.group();
        let metrics = keel_core::metrics::metrics();
        let labels = keel_core::metrics::GroupLabels {
            group: group.to_owned(),
        };
        metrics
            .consumer_batch
            .get_or_create(&labels)
            .observe(batch.len() as f64);
        // Per record: a batch's time shared among its records.
        let per_record = took.as_secs_f64() / batch.len() as f64;
        let processing = metrics.consumer_processing.get_or_create(&labels);
        for (message, outcome) in batch.iter().zip(outcomes) {
            processing.observe(per_record);
            tracing::debug!(
                group,
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                outcome = outcome.name(),
                "Record done"
            );
            if let Outcome::Ignored(event_type) = outcome {
                metrics
                    .consumer_ignored
                    .get_or_create(&keel_core::metrics::IgnoredLabels {
                        group: group.to_owned(),
                        event_type: event_type.clone(),
                    })
                    .inc();
            }
            if let Err(e) = self.store(message) {
                tracing::info!(
                    group, topic = message.topic(), partition = message.partition(), offset = message.offset(),
                    error = %e, "Cannot store the offset (partition revoked?); it will be redelivered as a duplicate"
                );
            }
        }
        drop(processing);
        for (outcome, n) in transaction::tally(outcomes) {
            metrics
                .consumer_records
                .get_or_create(&keel_core::metrics::OutcomeLabels {
                    group: group.to_owned(),
                    outcome: outcome.to_owned(),
                })
                .inc_by(n);
        }
    }
}
