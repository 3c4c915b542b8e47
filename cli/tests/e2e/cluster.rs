//! `keel` against a replicated cluster: librdkafka's mock cluster (three brokers, three replicas
//! per partition) made in this process and used by `keel` processes as their bootstrap servers,
//! with no broker quirks. Its CreateTopics request times out, so topics are made with the mock
//! cluster's own call, as `keel topics create` would have made them.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_core::Settings;
use keel_core::kafka::Kafka;
use keel_core::settings::BrokerQuirks;
use keel_core::testkit::{Process, TestDb, eventually, free_port};
use rdkafka::mocking::MockCluster;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// `/ready`'s status and JSON body.
async fn ready(http: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let (status, body) = crate::common::fetch(http, url).await?;
    Some((status, serde_json::from_str(&body).ok()?))
}

// Multi-threaded: the registry runs in this process and must answer while `keel` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_dead_letter_topic_is_missing_is_not_ready_and_names_it() {
    let cluster = MockCluster::new(3).expect("mock cluster");
    for topic in ["orders", "inventory"] {
        cluster.create_topic(topic, 6, 3).expect("topic");
    }
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), stop.clone())
            .await
            .unwrap();
    let mut s = Settings::local();
    s.kafka = Kafka::new(cluster.bootstrap_servers());
    s.broker_quirks = BrokerQuirks::None;
    s.database_url = db.url.clone();
    s.schema_registry_url = format!("http://{registry}");
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["consume", "analytics"])
        .envs(s.to_env())
        .env("KEEL_ADMIN_ADDR", &admin)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let group = Process::spawn("keel consume analytics", cmd).expect("keel starts");
    let http = reqwest::Client::new();
    let url = format!("http://{admin}/ready");

    let (_, body) = eventually(
        "/ready to answer 503 for the missing dead-letter topic",
        Duration::from_secs(60),
        || async {
            ready(&http, &url)
                .await
                .filter(|(status, _)| *status == 503)
        },
    )
    .await;
    let said = body["broker"].as_str().unwrap_or_default();
    assert!(
        said.contains("orders.analytics.dlq") && said.contains("keel topics create"),
        "names the topic and the fix: {body}"
    );
    assert_eq!(body["database"], "ok", "{body}");
    assert_eq!(body["registry"], "ok", "{body}");
    assert!(
        !group.exited(),
        "the group keeps running, waiting for its topic"
    );

    cluster
        .create_topic("orders.analytics.dlq", 1, 3)
        .expect("dead-letter topic");
    let (_, body) = eventually(
        "/ready to recover once the topic exists",
        Duration::from_secs(60),
        || async {
            ready(&http, &url)
                .await
                .filter(|(status, _)| *status == 200)
        },
    )
    .await;
    assert_eq!(body["broker"], "ok");
    group.terminate().expect("SIGTERM: exits 0");
    stop.cancel();
}

/// `keel topics list` with `KEEL_KAFKA_*` properties for TLS, against `brokers`.
fn topics_list(brokers: &str, properties: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(["topics", "list", "--output", "json"])
        .env("KEEL_KAFKA_BROKERS", brokers)
        .env("RUST_LOG", "warn");
    for (k, v) in properties {
        cmd.env(k, v);
    }
    cmd.output().expect("keel runs")
}

// A TLS listener in front of a mock broker: what the bootstrap connection of a cluster with
// `security.protocol=SSL` (MSK, Confluent Cloud, Aiven) asks of keel's client. The brokers the
// metadata then names listen in plain, so this proves the handshake, the trust store and the
// first requests over TLS, not a whole session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_reaches_a_tls_listener_it_is_told_to_trust_and_refuses_one_it_is_not() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("secured", 3, 1).expect("topic");
    let ca = keel_core::testkit::TestCa::new();
    let proxy = keel_core::testkit::TlsProxy::start(
        &ca,
        &cluster.bootstrap_servers(),
        keel_core::testkit::Preamble::None,
    )
    .await;
    let listener = format!("localhost:{}", proxy.addr.port());
    let ca_file = ca.ca_pem.display().to_string();

    let trusted = tokio::task::spawn_blocking({
        let (listener, ca_file) = (listener.clone(), ca_file.clone());
        move || {
            topics_list(
                &listener,
                &[
                    ("KEEL_KAFKA_SECURITY_PROTOCOL", "ssl"),
                    ("KEEL_KAFKA_SSL_CA_LOCATION", &ca_file),
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        trusted.status.success(),
        "{}",
        String::from_utf8_lossy(&trusted.stderr)
    );
    let listed: Value = serde_json::from_slice(&trusted.stdout).unwrap();
    let secured = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "secured")
        .unwrap_or_else(|| panic!("the topic, read over TLS: {listed}"));
    assert_eq!(secured["partitions"], 3);
    assert!(proxy.handshakes() >= 1, "the answer came over TLS");

    // Not told to trust the test's CA: the system's roots do not know it, and keel says so.
    let refused_before = proxy.failed_handshakes();
    let untrusted = tokio::task::spawn_blocking({
        let listener = listener.clone();
        move || topics_list(&listener, &[("KEEL_KAFKA_SECURITY_PROTOCOL", "ssl")])
    })
    .await
    .unwrap();
    assert!(!untrusted.status.success());
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("KEEL_KAFKA_BROKERS"), "{said}");
    assert!(
        proxy.failed_handshakes() > refused_before,
        "the client refused the certificate"
    );
}
