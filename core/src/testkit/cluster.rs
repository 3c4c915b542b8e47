//! The replicated test cluster: with `TEST_KAFKA_BROKERS=mock`, tests run against librdkafka's
//! mock cluster (three brokers, three replicas per partition, Apache Kafka's answers, no broker
//! quirks) made once in the test process; the `keel` processes a test starts use it as their
//! bootstrap servers like any cluster. It lives until the test process exits.
//!
//! Its admin CreateTopics request times out, so [`super::TestTopic`] creates topics with the mock
//! cluster's own call (topic configuration is not kept: the mock cluster has none), and deleting
//! is left to the process's end.

use std::sync::OnceLock;
use std::sync::mpsc;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;

/// Brokers of the mock cluster: what replication a topic made here gets.
pub const BROKERS: i32 = 3;

/// Whether tests run on the mock cluster (`TEST_KAFKA_BROKERS=mock`).
pub fn enabled() -> bool {
    std::env::var("TEST_KAFKA_BROKERS").is_ok_and(|v| v == "mock")
}

enum Ask {
    Create(String, i32),
    Down(i32),
    Up(i32),
    Leader(String, i32, i32),
}

/// A request to the cluster's thread, and where it answers.
type Asked = (Ask, mpsc::Sender<Result<(), String>>);

/// A mock cluster of [`BROKERS`] brokers, owned by a thread of its own (it is not `Send`), which
/// does what it is asked: the test tier's (made once per test process, [`bootstrap_servers`])
/// and the chaos runner's `--broker mock` (one per scenario). Stopped when dropped.
pub struct Mock {
    pub bootstrap: String,
    asks: Option<mpsc::Sender<Asked>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mock {
    pub fn start() -> anyhow::Result<Self> {
        let (asks, asked) = mpsc::channel::<Asked>();
        let (started, bootstrap) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let cluster = match MockCluster::new(BROKERS) {
                Ok(c) => c,
                Err(e) => {
                    let _ = started.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = started.send(Ok(cluster.bootstrap_servers()));
            for (ask, done) in asked {
                let result = match ask {
                    // As `keel topics create`: one that exists is left as it is.
                    Ask::Create(topic, partitions) => {
                        match cluster.create_topic(&topic, partitions, BROKERS) {
                            Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => {
                                Ok(())
                            }
                            other => other,
                        }
                    }
                    Ask::Down(id) => cluster.broker_down(id),
                    Ask::Up(id) => cluster.broker_up(id),
                    Ask::Leader(topic, partition, id) => {
                        cluster.partition_leader(&topic, partition, Some(id))
                    }
                };
                let _ = done.send(result.map_err(|e| e.to_string()));
            }
        });
        let bootstrap = bootstrap
            .recv()
            .map_err(|e| anyhow::anyhow!("the mock cluster's thread: {e}"))?
            .map_err(|e| anyhow::anyhow!("cannot make librdkafka's mock cluster: {e}"))?;
        Ok(Self {
            bootstrap,
            asks: Some(asks),
            thread: Some(thread),
        })
    }

    fn ask(&self, ask: Ask) -> anyhow::Result<()> {
        let (done, answer) = mpsc::channel();
        self.asks
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the mock cluster is stopped"))?
            .send((ask, done))
            .map_err(|_| anyhow::anyhow!("the mock cluster's thread ended"))?;
        answer
            .recv()
            .map_err(|_| anyhow::anyhow!("the mock cluster's thread ended"))?
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Makes `topic` with `partitions` partitions and [`BROKERS`] replicas (one that exists is
    /// left as it is).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.ask(Ask::Create(topic.to_owned(), partitions))
            .map_err(|e| anyhow::anyhow!("{topic}: {e}"))
    }

    /// Broker `id` (1 to [`BROKERS`]) disconnects its clients and refuses new ones.
    pub fn down(&self, id: i32) -> anyhow::Result<()> {
        self.ask(Ask::Down(id))
    }

    /// Broker `id` takes clients again.
    pub fn up(&self, id: i32) -> anyhow::Result<()> {
        self.ask(Ask::Up(id))
    }

    /// Moves the leadership of `topic`'s `partition` to broker `id`.
    pub fn move_leader(&self, topic: &str, partition: i32, id: i32) -> anyhow::Result<()> {
        self.ask(Ask::Leader(topic.to_owned(), partition, id))
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; the cluster goes with it.
        self.asks.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test tier's mock cluster, made on first use; it lives until the test process exits.
fn cluster() -> &'static Mock {
    static CLUSTER: OnceLock<Mock> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        Mock::start().unwrap_or_else(|e| panic!("cannot make librdkafka's mock cluster: {e}"))
    })
}

/// The mock cluster's bootstrap servers.
pub fn bootstrap_servers() -> String {
    cluster().bootstrap.clone()
}

/// Makes `topic` with `partitions` partitions and [`BROKERS`] replicas.
pub fn create_topic(topic: &str, partitions: i32) -> anyhow::Result<()> {
    cluster().create_topic(topic, partitions)
}

/// For a test that needs what the mock cluster does not do: `true` (and says why on stderr) when
/// tests run on it, so the test stops there; it runs in full on every other broker.
pub fn cannot(what: &str) -> bool {
    let on_mock = enabled();
    if on_mock {
        eprintln!("skipped on librdkafka's mock cluster, which does not do {what}");
    }
    on_mock
}
