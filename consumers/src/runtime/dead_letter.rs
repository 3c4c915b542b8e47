//! The dead-letter writer: a record that can never be applied goes to `<topic>.<group>.dlq`
//! with its key, value and headers plus `keel-dlq-*` headers saying where it came from and why.
//! What it promises: the write is acknowledged before the record's offset may be stored, so a
//! poison record is never dropped silently.

use std::time::Duration;

use keel_core::kafka::TopicSpec;
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use super::Consumer;
use super::handler::{Handler, HandlerError};

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

impl<H: Handler> Consumer<H> {
    /// Writes `message` to its dead-letter topic and waits for the acknowledgement.
    pub(super) async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        error: &HandlerError,
        attempts: u32,
    ) -> anyhow::Result<()> {
        let group = self.group();
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
        keel_core::kafka::create_topics(&self.kafka, &[dlq_spec(topic)]).await?;
        if let Ok(mut ready) = self.dlq_ready.lock() {
            ready.insert(topic.to_owned());
        }
        Ok(())
    }
}

/// How a dead-letter topic is created when it is missing: one partition (dead letters are
/// read in order, by hand), the broker's default replication (as a cluster with
/// `min.insync.replicas=2` needs: one copy would refuse every write) and kept forever (a dead
/// letter waits for an operator; the broker's default retention would drop it in a week).
fn dlq_spec(topic: &str) -> TopicSpec {
    let mut spec = TopicSpec::new(topic, 1);
    spec.replication = -1;
    spec.config.push(("retention.ms".into(), "-1".into()));
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_topic_takes_the_brokers_replication_and_keeps_its_records() {
        let spec = dlq_spec("orders.inventory.dlq");
        assert_eq!(spec.name, "orders.inventory.dlq");
        assert_eq!(spec.partitions, 1);
        assert_eq!(spec.replication, -1, "not one copy on a replicated cluster");
        assert_eq!(spec.config, [("retention.ms".to_owned(), "-1".to_owned())]);
    }
}
