//! librdkafka configuration for keel's two roles, and topic administration.
//!
//! The producer is idempotent with `acks=all`: a retried send never duplicates or reorders
//! within a partition. It partitions by murmur2 of the key, as Java clients do. The consumer
//! never auto-stores offsets: a service stores a message's offset only after its effect is
//! durable, and librdkafka's auto-commit then commits only what was stored (the at-least-once
//! pattern of rust-rdkafka's `at_least_once` example).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::fatal::Fatal;
use crate::settings::BrokerQuirks;

/// How to reach the cluster: its bootstrap servers and the operator's librdkafka properties
/// (`KEEL_KAFKA_<PROPERTY>`: TLS, SASL, tuning), applied to every client after keel's own, so
/// that what the cluster needs wins.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kafka {
    pub brokers: String,
    /// librdkafka property → value (`security.protocol` → `SASL_SSL`).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Kafka {
    /// The cluster at `brokers`, with no properties of the operator's.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            properties: Default::default(),
        }
    }

    /// `config` with the operator's properties set, last.
    fn finish(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }
}

/// What a long-lived keel client (the relay's producer, a group's consumer and dead-letter
/// producer) reports from librdkafka's threads: a fatal error is raised on its [`Fatal`] (see
/// [`crate::fatal`]), any other error logged; librdkafka retries those itself.
#[derive(Clone)]
pub struct Reporter {
    client: String,
    fatal: Fatal,
}

impl Reporter {
    /// For the client named `client` in logs and in the fatal error (`producer relay`).
    pub fn new(client: impl Into<String>, fatal: Fatal) -> Self {
        Self {
            client: client.into(),
            fatal,
        }
    }

    /// Where this client's fatal error is raised.
    pub fn fatal(&self) -> &Fatal {
        &self.fatal
    }

    /// Reports librdkafka's global `error` and its `reason`. An error event carries the
    /// underlying code of a fatal error (`FencedInstanceId`), not whether it is fatal: the
    /// service loops ask with [`Reporter::check`].
    pub fn report(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.fatal.raise(&self.client, reason);
        } else {
            tracing::warn!(client = %self.client, error = %error, reason, "Kafka client error");
        }
    }

    /// Raises `client`'s fatal error, if librdkafka has one (a cheap read of the client's state:
    /// the loops call it every round); whether it had.
    pub fn check<C: rdkafka::ClientContext>(&self, client: &rdkafka::client::Client<C>) -> bool {
        match client.fatal_error() {
            Some((code, reason)) => {
                self.fatal
                    .raise(&self.client, &format!("{reason} ({code:?})"));
                true
            }
            None => false,
        }
    }
}

impl rdkafka::ClientContext for Reporter {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.report(&error, reason);
    }
}

/// Whether librdkafka takes `property = value` (a name it knows, a value it accepts): checked
/// at start-up, so that a mistake names its key instead of failing the first client.
pub fn check_property(property: &str, value: &str) -> Result<(), String> {
    if matches!(property, "message.timeout.ms" | "delivery.timeout.ms") {
        // A relay step waits for its deliveries inside the transaction that holds the relay
        // lock, which PostgreSQL ends after 60 s idle (crate::db::SESSION).
        let ms: u64 = value
            .parse()
            .map_err(|_| format!("{value:?} is not a number of milliseconds"))?;
        if ms == 0 || ms >= 55_000 {
            return Err(format!(
                "{ms} ms: a delivery must be decided within 55 s (0 = forever is not allowed either), before PostgreSQL ends the relay's transaction after 60 s idle"
            ));
        }
    }
    let mut config = ClientConfig::new();
    config.set(property, value);
    config
        .create_native_config()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether `property` holds a secret (a password, a key, a token): never printed.
pub fn is_secret(property: &str) -> bool {
    [
        "password",
        "secret",
        "token",
        ".key.pem",
        "sasl.oauthbearer.config",
        "ssl_key",
    ]
    .iter()
    .any(|s| property.contains(s))
}

fn base(kafka: &Kafka) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        // Surface an unreachable broker within seconds instead of minutes.
        .set("socket.connection.setup.timeout.ms", "10000");
    config
}

/// Settings every client shares, and the operator's properties.
pub fn client_config(kafka: &Kafka) -> ClientConfig {
    kafka.finish(base(kafka))
}

/// An idempotent producer: `acks=all`, at most 5 requests in flight (the idempotence limit), so
/// per-partition order survives retries.
pub fn producer_config(kafka: &Kafka) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // Topics are made by `keel topics create`, never by a write: librdkafka's producer
        // default would have a broker with auto.create.topics.enable create a missing one with
        // its defaults (one copy, a week's retention).
        .set("allow.auto.create.topics", "false")
        .set("max.in.flight.requests.per.connection", "5")
        // The Java client's partitioner (murmur2 of the key; null keys at random), so that any
        // producer keyed by order id (Java, Connect, ksqlDB) puts an order's events where keel
        // does. librdkafka's default (CRC32) would put them on another partition.
        .set("partitioner", "murmur2_random")
        // No linger: the relay's claim already is the batch (up to KEEL_RELAY_BATCH_SIZE rows
        // enqueued at once), and while 5 requests are in flight librdkafka batches what queues
        // behind them. Measured (bench, 200k rows): drain 39k/s at librdkafka's 5 ms, 37k/s at 0
        // (noise); the relay's hop at 20% load, p50 16 -> 7 ms.
        .set("linger.ms", "0")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        // A delivery that has not succeeded by then is reported as failed; the caller retries.
        .set("message.timeout.ms", "30000");
    kafka.finish(config)
}

/// An at-least-once consumer in `group`: offsets are stored explicitly after the effect commits,
/// and auto-commit only commits stored offsets.
pub fn consumer_config(kafka: &Kafka, group: &str) -> ClientConfig {
    let mut config = base(kafka);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("heartbeat.interval.ms", "1000")
        // Memory does not grow with a backlog. librdkafka prefetches until every partition
        // holds queued.min.messages (default 100,000 each) or the queue holds
        // queued.max.messages.kbytes: on a backlog a group reached 68 MiB of RSS at 100,000
        // events and 84 MiB at 300,000. 10,000 per partition is still seconds of work ahead; past
        // it, fetching pauses fetch.queue.backoff.ms (default 1 s, which halved the catch-up
        // rate) before looking again. One fetch answer holds at most fetch.max.bytes.
        // Measured at 300,000 events: peak RSS 84 -> 43 MiB.
        .set("fetch.max.bytes", "8388608")
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "10000")
        .set("fetch.queue.backoff.ms", "20");
    kafka.finish(config)
}

/// A topic as keel declares it.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
    /// Topic configuration (`retention.ms`, `cleanup.policy`) set at creation.
    pub config: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            replication: 1,
            config: Vec::new(),
        }
    }
}

fn admin(kafka: &Kafka) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(client_config(kafka).create()?)
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)))
}

/// Creates the topics that do not exist yet; an existing topic is left as it is. Returns the
/// names of those it created.
pub async fn create_topics(kafka: &Kafka, specs: &[TopicSpec]) -> anyhow::Result<Vec<String>> {
    let admin = admin(kafka)?;
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            let mut topic = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            );
            for (key, value) in &s.config {
                topic = topic.set(key, value);
            }
            topic
        })
        .collect();
    let mut created = Vec::new();
    for result in admin.create_topics(&new, &admin_options()).await? {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(created)
}

/// A topic as the cluster has it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: i32,
    /// Replicas of partition 0.
    pub replication: i32,
    /// The configuration the broker reports (empty if it does not answer DescribeConfigs).
    pub config: std::collections::BTreeMap<String, String>,
}

/// Every topic of the cluster (but its internal ones), or just `only`; without configuration.
pub fn list_topics(kafka: &Kafka, only: Option<&str>) -> anyhow::Result<Vec<TopicInfo>> {
    use rdkafka::consumer::Consumer;
    let consumer = outsider(kafka, "keel-admin")?;
    let metadata = consumer.fetch_metadata(only, ADMIN_TIMEOUT)?;
    let mut topics: Vec<TopicInfo> = metadata
        .topics()
        .iter()
        .filter(|t| {
            t.error().is_none() && !t.partitions().is_empty() && !t.name().starts_with("__")
        })
        .map(|t| TopicInfo {
            name: t.name().to_owned(),
            partitions: t.partitions().len() as i32,
            replication: t
                .partitions()
                .first()
                .map_or(0, |p| p.replicas().len() as i32),
            config: Default::default(),
        })
        .collect();
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(topics)
}

/// Fills in each topic's configuration, as far as the broker answers.
pub async fn describe_configs(kafka: &Kafka, topics: &mut [TopicInfo]) -> anyhow::Result<()> {
    use rdkafka::admin::{ConfigSource, ResourceSpecifier};
    let admin = admin(kafka)?;
    let resources: Vec<ResourceSpecifier<'_>> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.name))
        .collect();
    let answers = admin.describe_configs(&resources, &admin_options()).await?;
    // One answer per topic, in order: fill the configs in after the borrow of the names ends.
    let mut configs = Vec::new();
    for answer in answers {
        let mut config = std::collections::BTreeMap::new();
        if let Ok(resource) = answer {
            for entry in resource.entries {
                let explicit = matches!(entry.source, ConfigSource::DynamicTopic);
                if let Some(value) = entry.value
                    && (explicit
                        || matches!(entry.name.as_str(), "retention.ms" | "cleanup.policy"))
                {
                    config.insert(entry.name, value);
                }
            }
        }
        configs.push(config);
    }
    for (topic, config) in topics.iter_mut().zip(configs) {
        topic.config = config;
    }
    Ok(())
}

/// Deletes topics; a topic that does not exist is not an error.
pub async fn delete_topics(kafka: &Kafka, names: &[&str]) -> anyhow::Result<()> {
    let admin = admin(kafka)?;
    for result in admin.delete_topics(names, &admin_options()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => anyhow::bail!("cannot delete topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Where a group stands on one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionState {
    pub topic: String,
    pub partition: i32,
    /// The earliest offset still retained.
    pub low: i64,
    /// The end: the offset the next record will get.
    pub high: i64,
    /// The group's committed offset (the next record it will read), if it committed one.
    pub committed: Option<i64>,
}

impl PartitionState {
    /// Records the group has not yet committed past (from `low` if it never committed).
    pub fn lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }
}

/// A consumer in `group` that never joins it: for reading and committing offsets from outside.
fn outsider(kafka: &Kafka, group: &str) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    Ok(kafka
        .finish({
            let mut config = base(kafka);
            config.set("group.id", group);
            config
        })
        .set("enable.auto.commit", "false")
        .create()?)
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How many partitions `topic` has; an error if it does not exist.
fn partitions(consumer: &rdkafka::consumer::BaseConsumer, topic: &str) -> anyhow::Result<i32> {
    use rdkafka::consumer::Consumer;
    let metadata = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let count = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(count > 0, "topic {topic} does not exist");
    Ok(count as i32)
}

/// `group`'s committed offsets and each partition's watermarks, for every partition of `topics`.
pub fn group_offsets(
    kafka: &Kafka,
    group: &str,
    topics: &[&str],
) -> anyhow::Result<Vec<PartitionState>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = outsider(kafka, group)?;
    let mut list = TopicPartitionList::new();
    for topic in topics {
        for p in 0..partitions(&consumer, topic)? {
            list.add_partition(topic, p);
        }
    }
    let committed = consumer.committed_offsets(list, ADMIN_TIMEOUT)?;
    let mut states = Vec::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), ADMIN_TIMEOUT)?;
        states.push(PartitionState {
            topic: e.topic().to_owned(),
            partition: e.partition(),
            low,
            high,
            committed: match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            },
        });
    }
    states.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(states)
}

/// Commits `offsets` (`topic, partition, offset`) for `group` from outside it. The group must
/// have no running members: Kafka refuses commits from outside an active generation.
pub fn commit_offsets(
    kafka: &Kafka,
    group: &str,
    offsets: &[(String, i32, i64)],
) -> anyhow::Result<()> {
    use rdkafka::consumer::{CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = outsider(kafka, group)?;
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in offsets {
        list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.commit(&list, CommitMode::Sync)?;
    Ok(())
}

/// The first offset at or after `timestamp_ms` on each partition of `topics` (the end offset
/// where no record is that recent), as the broker answers ListOffsets by time.
pub fn offsets_for_time(
    kafka: &Kafka,
    topics: &[&str],
    timestamp_ms: i64,
) -> anyhow::Result<Vec<(String, i32, i64)>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = outsider(kafka, "keel-admin")?;
    let mut list = TopicPartitionList::new();
    for topic in topics {
        for p in 0..partitions(&consumer, topic)? {
            list.add_partition_offset(topic, p, Offset::Offset(timestamp_ms))?;
        }
    }
    let found = consumer.offsets_for_times(list, ADMIN_TIMEOUT)?;
    let mut out = Vec::new();
    for e in found.elements() {
        let offset = match e.offset() {
            Offset::Offset(o) => o,
            // No record at or after the time: the end.
            _ => {
                consumer
                    .fetch_watermarks(e.topic(), e.partition(), ADMIN_TIMEOUT)?
                    .1
            }
        };
        out.push((e.topic().to_owned(), e.partition(), offset));
    }
    Ok(out)
}

/// The members `group` has now (0 when nobody runs it).
pub fn group_members(kafka: &Kafka, group: &str) -> anyhow::Result<usize> {
    use rdkafka::consumer::Consumer;
    let consumer = outsider(kafka, "keel-admin")?;
    let groups = consumer.fetch_group_list(Some(group), ADMIN_TIMEOUT)?;
    Ok(groups
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .map(|g| g.members().len())
        .sum())
}

/// Moves `group`'s committed offsets on every partition of `topics` to the beginning (the
/// earliest offset still retained), so the group's next run reads them again. The group must
/// have no running members.
pub fn reset_offsets_to_beginning(
    kafka: &Kafka,
    group: &str,
    topics: &[&str],
) -> anyhow::Result<usize> {
    let targets: Vec<(String, i32, i64)> = group_offsets(kafka, group, topics)?
        .into_iter()
        .map(|p| (p.topic, p.partition, p.low))
        .collect();
    commit_offsets(kafka, group, &targets)?;
    Ok(targets.len())
}

/// Records `group` has not yet committed past on `topics`, summed over partitions.
pub fn lag(kafka: &Kafka, group: &str, topics: &[&str]) -> anyhow::Result<i64> {
    Ok(group_offsets(kafka, group, topics)?
        .iter()
        .map(PartitionState::lag)
        .sum())
}

/// Whether `topic` exists.
pub fn topic_exists(kafka: &Kafka, topic: &str) -> anyhow::Result<bool> {
    Ok(topic_names(kafka)?.contains(topic))
}

/// The names of every topic of the cluster. Asks for all of them: a metadata request naming a
/// missing topic would have a broker with `auto.create.topics.enable` create it.
pub fn topic_names(kafka: &Kafka) -> anyhow::Result<std::collections::HashSet<String>> {
    use rdkafka::consumer::Consumer;
    let consumer = outsider(kafka, "keel-admin")?;
    let metadata = consumer.fetch_metadata(None, ADMIN_TIMEOUT)?;
    Ok(names(&metadata))
}

/// The topics a metadata answer says exist: without an error and with partitions.
fn names(metadata: &rdkafka::metadata::Metadata) -> std::collections::HashSet<String> {
    metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name().to_owned())
        .collect()
}

/// Reads partition `partition` of `topic` from `from` (or its beginning) without joining a group
/// and committing nothing: at most `limit` records, up to the partition's end (its high
/// watermark when the read begins), or until none arrives for `idle` (the records before the end
/// may be transaction markers, which a reader never sees).
///
/// With [`BrokerQuirks::Tansu`] the end is judged by that silence alone: tansu 0.6
/// under-reports end offsets when the last batch holds several records, and a reader that
/// stopped there would miss them.
pub fn read_partition(
    kafka: &Kafka,
    quirks: BrokerQuirks,
    topic: &str,
    partition: i32,
    from: Option<i64>,
    limit: usize,
    idle: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer = outsider(kafka, "keel-reader")?;
    let (start, end) = match quirks {
        BrokerQuirks::None => {
            let (low, high) = consumer.fetch_watermarks(topic, partition, ADMIN_TIMEOUT)?;
            // Below the log's start (retention passed it): from the start.
            let start = from.unwrap_or(low).max(low);
            if high <= start {
                return Ok(Vec::new());
            }
            (Offset::Offset(start), Some(high))
        }
        BrokerQuirks::Tansu => (from.map_or(Offset::Beginning, Offset::Offset), None),
    };
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, partition, start)?;
    consumer.assign(&list)?;
    let mut read = Vec::new();
    while read.len() < limit {
        match consumer.poll(idle) {
            None => break,
            Some(Ok(m)) => {
                let last = end.is_some_and(|end| m.offset() + 1 >= end);
                read.push(m.detach());
                if last {
                    break;
                }
            }
            Some(Err(e)) => anyhow::bail!("reading {topic}/{partition}: {e}"),
        }
    }
    read.sort_by_key(|m| m.offset());
    Ok(read)
}

/// The timestamp (milliseconds since the epoch) of the record at `offset` of `topic`/`partition`,
/// if it is there to read within `wait`.
pub fn record_timestamp(
    kafka: &Kafka,
    quirks: BrokerQuirks,
    topic: &str,
    partition: i32,
    offset: i64,
    wait: Duration,
) -> anyhow::Result<Option<i64>> {
    use rdkafka::message::Message;
    let read = read_partition(kafka, quirks, topic, partition, Some(offset), 1, wait)?;
    Ok(read
        .first()
        .filter(|m| m.offset() == offset)
        .and_then(|m| m.timestamp().to_millis()))
}

/// Whether a broker answers a metadata request within `timeout`; the topics of `required` it
/// does not have, if it does.
pub fn probe(kafka: &Kafka, timeout: Duration, required: &[String]) -> anyhow::Result<Vec<String>> {
    use rdkafka::consumer::Consumer;
    let consumer = outsider(kafka, "keel-admin")?;
    let metadata = consumer
        .fetch_metadata(None, timeout)
        .map_err(|e| anyhow::anyhow!("{}: {e}", kafka.brokers))?;
    let present = names(&metadata);
    Ok(required
        .iter()
        .filter(|name| !present.contains(name.as_str()))
        .cloned()
        .collect())
}
