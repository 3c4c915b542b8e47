//! keel's Kafka helpers against librdkafka's mock cluster: three brokers that answer as Apache
//! Kafka does (no broker quirks), in this process.

use std::time::Duration;

use keel_core::kafka::read_partition;
use keel_core::settings::BrokerQuirks;
use rdkafka::ClientConfig;
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

#[test]
fn read_partition_stops_at_the_end_offset_without_waiting_for_silence() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    cluster.create_topic("t", 1, 3).expect("topic");
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("producer");
    for i in 0..10 {
        let payload = format!("record {i}");
        producer
            .send(BaseRecord::<(), _>::to("t").partition(0).payload(&payload))
            .expect("enqueued");
    }
    producer.flush(Duration::from_secs(30)).expect("flushed");

    // Silence would take ten minutes to judge: the read must end because it reached the end.
    let (done, finished) = std::sync::mpsc::channel();
    let from = brokers.clone();
    std::thread::spawn(move || {
        let read = |start| {
            read_partition(
                &from,
                BrokerQuirks::None,
                "t",
                0,
                start,
                100,
                Duration::from_secs(600),
            )
        };
        let _ = done.send((read(None), read(Some(7)), read(Some(10))));
    });
    let (all, tail, past_the_end) = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("read_partition returns at the end offset, not after 600 s without records");
    let offsets = |r: anyhow::Result<Vec<rdkafka::message::OwnedMessage>>| -> Vec<i64> {
        r.expect("read").iter().map(Message::offset).collect()
    };
    assert_eq!(offsets(all), (0..10).collect::<Vec<_>>());
    assert_eq!(offsets(tail), vec![7, 8, 9]);
    assert_eq!(offsets(past_the_end), Vec::<i64>::new());
}
