//! The replicated test cluster: with `TEST_KAFKA_BROKERS=mock`, tests run against librdkafka's
//! mock cluster (three brokers, three replicas per partition, Apache Kafka's answers, no broker
//! quirks) made once in the test process; the `keel` processes a test starts use it as their
//! bootstrap servers like any cluster. It lives until the test process exits.
//!
//! Its admin CreateTopics request times out, so [`super::TestTopic`] creates topics with the mock
//! cluster's own call (topic configuration is not kept: the mock cluster has none), and deleting
//! is left to the process's end.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;

/// What the test process asks of its mock cluster: a topic and its partitions, and where to say
/// whether it was made.
type Create = (String, i32, mpsc::Sender<Result<(), String>>);

struct Cluster {
    bootstrap: String,
    create: Mutex<mpsc::Sender<Create>>,
}

/// Brokers of the mock cluster: what replication a topic made here gets.
pub const BROKERS: i32 = 3;

/// Whether tests run on the mock cluster (`TEST_KAFKA_BROKERS=mock`).
pub fn enabled() -> bool {
    std::env::var("TEST_KAFKA_BROKERS").is_ok_and(|v| v == "mock")
}

/// The mock cluster, made on first use. It is not `Send`, so one thread owns it and makes topics
/// when asked.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let (create, asked) = mpsc::channel::<Create>();
        let (started, bootstrap) = mpsc::channel();
        std::thread::spawn(move || {
            let cluster = match MockCluster::new(BROKERS) {
                Ok(c) => c,
                Err(e) => {
                    let _ = started.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = started.send(Ok(cluster.bootstrap_servers()));
            for (topic, partitions, made) in asked {
                let created = match cluster.create_topic(&topic, partitions, BROKERS) {
                    // As `keel topics create`: one that exists is left as it is.
                    Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => Ok(()),
                    other => other.map_err(|e| e.to_string()),
                };
                let _ = made.send(created);
            }
        });
        let bootstrap = bootstrap
            .recv()
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("cannot make librdkafka's mock cluster: {e}"));
        Cluster {
            bootstrap,
            create: Mutex::new(create),
        }
    })
}

/// The mock cluster's bootstrap servers.
pub fn bootstrap_servers() -> String {
    cluster().bootstrap.clone()
}

/// Makes `topic` with `partitions` partitions and [`BROKERS`] replicas.
pub fn create_topic(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let (made, answer) = mpsc::channel();
    cluster()
        .create
        .lock()
        .map_err(|_| anyhow::anyhow!("the mock cluster's thread panicked"))?
        .send((topic.to_owned(), partitions, made))?;
    answer.recv()?.map_err(|e| anyhow::anyhow!("{topic}: {e}"))
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
