//! librdkafka configuration for keel's two roles, and topic administration.
//!
//! The producer is idempotent with `acks=all`: a retried send never duplicates or reorders
//! within a partition. The consumer never auto-stores offsets: a service stores a message's
//! offset only after its effect is durable, and librdkafka's auto-commit then commits only what
//! was stored (the at-least-once pattern of rust-rdkafka's `at_least_once` example).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

/// Settings every client shares.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        // Surface an unreachable broker within seconds instead of minutes.
        .set("socket.connection.setup.timeout.ms", "10000");
    config
}

/// An idempotent producer: `acks=all`, at most 5 requests in flight (the idempotence limit), so
/// per-partition order survives retries.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        // A delivery that has not succeeded by then is reported as failed; the caller retries.
        .set("message.timeout.ms", "30000");
    config
}

/// An at-least-once consumer in `group`: offsets are stored explicitly after the effect commits,
/// and auto-commit only commits stored offsets.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    config
}

/// A topic as keel declares it.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication: 1,
        }
    }
}

fn admin(brokers: &str) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(client_config(brokers).create()?)
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)))
}

/// Creates the topics that do not exist yet; an existing topic is left as it is.
pub async fn create_topics(brokers: &str, specs: &[TopicSpec]) -> anyhow::Result<()> {
    let admin = admin(brokers)?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            )
        })
        .collect();
    for result in admin.create_topics(&new, &admin_options()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Deletes topics; a topic that does not exist is not an error.
pub async fn delete_topics(brokers: &str, names: &[&str]) -> anyhow::Result<()> {
    let admin = admin(brokers)?;
    for result in admin.delete_topics(names, &admin_options()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => anyhow::bail!("cannot delete topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Moves `group`'s committed offsets on every partition of `topics` to the beginning (the
/// earliest offset still retained), so the group's next run reads them again. The group must
/// have no running members: Kafka refuses commits from outside an active generation.
pub fn reset_offsets_to_beginning(
    brokers: &str,
    group: &str,
    topics: &[&str],
) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let mut list = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        anyhow::ensure!(
            partitions > 0,
            "topic {topic} has no partitions (does it exist?)"
        );
        for p in 0..partitions as i32 {
            let (low, _) = consumer.fetch_watermarks(topic, p, timeout)?;
            list.add_partition_offset(topic, p, Offset::Offset(low))?;
        }
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(list.count())
}

/// Records `group` has not yet committed past on `topics`: high watermark minus committed offset,
/// summed over partitions (a partition with no commit counts from its low watermark).
pub fn lag(brokers: &str, group: &str, topics: &[&str]) -> anyhow::Result<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let mut list = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        for p in 0..partitions as i32 {
            list.add_partition(topic, p);
        }
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut lag = 0;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), timeout)?;
        let at = match e.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
        lag += (high - at).max(0);
    }
    Ok(lag)
}
