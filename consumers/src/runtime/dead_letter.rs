//! The dead-letter writer: a record that can never be applied goes to `<topic>.<group>.dlq`
//! with its key, value and headers plus `keel-dlq-*` headers saying where it came from and why.
//! What it promises: the write is acknowledged before the record's offset may be stored, so a
//! poison record is never dropped silently; until it is, the record's partition waits (retried
//! with backoff, `keel_consumer_dead_letter_waiting_records` above zero, the loop still alive).
//!
//! Dead-letter topics are declared in `topics.toml` and made by `keel topics create`, never
//! here: a topic auto-created at run time would get the broker's defaults (one copy, a week's
//! retention) or, with auto-creation off, not exist at all. A missing one is reported at
//! start-up and by `/ready`, and a record bound for it waits until it is created.

use std::time::{Duration, Instant};

use keel_core::backoff::Backoff;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use tokio_util::sync::CancellationToken;

use super::Consumer;
use super::handler::{Handler, HandlerError, Meta};

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

/// Counts a record waiting for its dead-letter write while it lives.
struct Waiting(keel_core::metrics::Gauge);

impl Waiting {
    fn new(group: &str) -> Self {
        let gauge = keel_core::metrics::metrics()
            .consumer_dead_letter_waiting
            .get_or_create(&keel_core::metrics::GroupLabels {
                group: group.to_owned(),
            })
            .clone();
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<H: Handler> Consumer<H> {
    /// Writes `message` to its dead-letter topic, retrying until the write is acknowledged.
    /// `false` if `shutdown` came first: the record is not done.
    pub(super) async fn dead_letter_until_written(
        &self,
        message: &BorrowedMessage<'_>,
        meta: &Meta,
        error: &HandlerError,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> bool {
        let began = Instant::now();
        let waiting = Waiting::new(self.group());
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_retry_backoff);
        loop {
            // In the group while the write waits (up to message.timeout.ms) and between tries.
            let written = self
                .in_group_while(async {
                    tokio::select! {
                        () = shutdown.cancelled() => None,
                        written = self.alive_while(self.dead_letter(message, error, attempts)) => Some(written),
                    }
                })
                .await;
            let Some(written) = written else { return false };
            let Err(e) = written else { break };
            let delay = backoff.next_delay();
            tracing::warn!(
                group = self.group(), topic = %meta.topic, partition = meta.partition,
                offset = meta.offset, error = %e, retry_in_ms = delay.as_millis() as u64,
                "Cannot write to the dead-letter topic; the partition waits"
            );
            keel_core::health::beat(&self.health_loop);
            if !self.sleep_in_group(delay, shutdown).await {
                return false;
            }
        }
        drop(waiting);
        keel_core::metrics::metrics()
            .consumer_dead_letter_write
            .get_or_create(&keel_core::metrics::GroupLabels {
                group: self.group().to_owned(),
            })
            .observe(began.elapsed().as_secs_f64());
        true
    }

    /// Awaits `work`, beating for liveness meanwhile: a write the broker holds (librdkafka
    /// retries NOT_ENOUGH_REPLICAS itself, up to `message.timeout.ms`) is waiting, not stuck.
    async fn alive_while<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = beat.tick() => keel_core::health::beat(&self.health_loop),
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
        let group = self.group();
        let topic = dlq_topic(message.topic(), group);
        self.dlq_exists(&topic).await?;
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

    /// Whether `topic` exists, asked of the cluster until it does. Never creates it.
    async fn dlq_exists(&self, topic: &str) -> anyhow::Result<()> {
        if self.dlq_ready.lock().is_ok_and(|r| r.contains(topic)) {
            return Ok(());
        }
        let missing = self.missing_dlqs(&[topic.to_owned()]).await?;
        anyhow::ensure!(
            missing.is_empty(),
            "{}",
            keel_core::topics::missing(&missing)
        );
        Ok(())
    }

    /// Which of `topics` the cluster does not have; remembers those it has.
    pub(super) async fn missing_dlqs(&self, topics: &[String]) -> anyhow::Result<Vec<String>> {
        let kafka = self.kafka.clone();
        let names =
            tokio::task::spawn_blocking(move || keel_core::kafka::topic_names(&kafka)).await??;
        let (present, missing): (Vec<String>, Vec<String>) =
            topics.iter().cloned().partition(|t| names.contains(t));
        if let Ok(mut ready) = self.dlq_ready.lock() {
            ready.extend(present);
        }
        Ok(missing)
    }
}
