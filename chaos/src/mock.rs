//! `--broker mock`: librdkafka's mock cluster as the scenarios' broker. Three brokers, three
//! replicas per partition, Apache Kafka's answers (no broker quirks), made in this process and
//! reached by keel's processes through its listeners like any cluster. Its faults are a broker
//! going down and coming back, and partition leaders moving between brokers.
//!
//! Its admin CreateTopics request times out, so topics are made with the mock cluster's own
//! call, with the partitions `topics.toml` declares (topic configuration is not kept). It does
//! not elect a new leader when a broker goes down: the partitions that broker leads wait for it,
//! as on a cluster whose other replicas are out of sync. Leader moves are their own fault.

use std::sync::mpsc;

use rdkafka::mocking::MockCluster;

/// Brokers of the mock cluster.
pub const BROKERS: i32 = 3;

enum Ask {
    Create(String, i32),
    Down(i32),
    Up(i32),
    Leader(String, i32, i32),
}

/// A request to the cluster's thread, and where it answers.
type Asked = (Ask, mpsc::Sender<Result<(), String>>);

/// The mock cluster, owned by a thread of its own (it is not `Send`), which does what it is
/// asked. Stopped when dropped.
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
                    Ask::Create(topic, partitions) => {
                        cluster.create_topic(&topic, partitions, BROKERS)
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

    /// Makes `topic` with `partitions` partitions and [`BROKERS`] replicas.
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
