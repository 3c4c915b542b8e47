//! What every scenario shares: the [`Bench`] (this run's database, broker and registry, and how
//! to start keel's processes against them), the orders the scenarios send, the raw producer the
//! baselines use, and the arithmetic of the figures.

use std::process::{Command, Stdio};
use std::time::Duration;

use keel_core::kafka::{self, TopicSpec};
use keel_core::testkit::{Process, free_port, metric_sum};
use keel_schemas::{Customer, Event, OrderCreated, OrderLine};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::Args;

/// What every scenario shares.
pub(crate) struct Bench {
    pub(crate) args: Args,
    pub(crate) brokers: String,
    pub(crate) registry_url: String,
    pub(crate) keel_bin: String,
    pub(crate) pool: PgPool,
    pub(crate) run: String,
    /// The settings keel's processes run with: this environment's `KEEL_*` (batch size, fetch
    /// wait), on the bench's database, broker and registry. The raw baselines use the same values.
    pub(crate) keel: keel_core::Settings,
}

pub(crate) fn var(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

impl Bench {
    /// Starts `keel <args>` with [`Bench::keel`]'s settings as `configure` changes them.
    pub(crate) fn keel(
        &self,
        name: &str,
        args: &[&str],
        configure: impl FnOnce(&mut keel_core::Settings),
    ) -> anyhow::Result<Process> {
        let logs = self.args.out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::File::create(logs.join(format!("{}-{name}.log", self.run)))?;
        let mut settings = self.keel.clone();
        configure(&mut settings);
        let mut cmd = Command::new(&self.keel_bin);
        cmd.args(args)
            .envs(settings.to_env())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        Process::spawn(name, cmd)
    }

    pub(crate) async fn topic(&self, name: &str) -> anyhow::Result<String> {
        let topic = format!("bench-{}-{name}", self.run);
        kafka::create_topics(&self.keel.kafka, &[TopicSpec::new(&topic, 6)]).await?;
        Ok(topic)
    }

    /// The dead-letter topics of every group reading `topics`, as `keel topics create` makes
    /// them (the runtime never does).
    pub(crate) async fn dead_letters(
        &self,
        topics: &keel_core::settings::Topics,
    ) -> anyhow::Result<()> {
        let specs: Vec<TopicSpec> = keel_consumers::dead_letters(topics)
            .iter()
            .map(|d| keel_core::topics::plain_dead_letter(&d.name))
            .collect();
        kafka::create_topics(&self.keel.kafka, &specs).await?;
        Ok(())
    }

    pub(crate) async fn flag(&self, sql: &str) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    pub(crate) async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    pub(crate) async fn processed(&self, group: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM consumers.processed_events WHERE group_id = $1",
        )
        .bind(group)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Runs `keel consume <group>` with an admin address, so that its progress can be read
    /// from its own `/metrics` ([`GroupProcess::handled`]).
    pub(crate) fn group(
        &self,
        name: &str,
        group: &str,
        configure: impl FnOnce(&mut keel_core::Settings),
    ) -> anyhow::Result<GroupProcess> {
        let port = free_port()?;
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        Ok(GroupProcess {
            process: self.keel(name, &["consume", group], |s| {
                configure(s);
                s.admin_addr = Some(admin);
            })?,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::new(),
        })
    }
}

/// A consumer group process the bench runs.
pub(crate) struct GroupProcess {
    pub(crate) process: Process,
    metrics_url: String,
    http: reqwest::Client,
}

impl GroupProcess {
    /// Records the group has finished with since it started (every outcome of
    /// `keel_consumer_records_total`); 0 until it serves `/metrics`, an error if it exited
    /// (else the bench would wait out its deadline for a dead group).
    ///
    /// The bench polls this every 50 ms while a group works. It used to poll `count(*)` over
    /// the group's `processed_events`, which costs PostgreSQL ~30 ms at 100,000 rows: a share
    /// of the two cores the group was being measured on.
    pub(crate) async fn handled(&self) -> anyhow::Result<u64> {
        let Ok(resp) = self.http.get(&self.metrics_url).send().await else {
            anyhow::ensure!(
                !self.process.exited(),
                "{} exited (its log is in the results' logs/)",
                self.process.name
            );
            return Ok(0);
        };
        let page = resp.error_for_status()?.text().await?;
        Ok(metric_sum(&page, "keel_consumer_records_total", "") as u64)
    }
}

/// A realistic order: three lines, a customer, about 300 bytes of Avro.
pub(crate) fn order_event(i: usize) -> Event {
    let order_id = uuid::Uuid::new_v4();
    Event::OrderCreated(OrderCreated {
        // Time-ordered, as the order service makes them.
        event_id: uuid::Uuid::now_v7(),
        occurred_at: chrono::Utc::now().timestamp_millis(),
        order_id,
        order_version: 1,
        customer: Customer {
            id: format!("customer-{}", i % 5000),
            email: format!("customer{}@example.com", i % 5000),
            name: "Ada Lovelace".into(),
        },
        currency: "EUR".into(),
        lines: (0..3)
            .map(|l| OrderLine {
                sku: format!("SKU-{}", 1 + (i + l) % 50),
                quantity: 1,
                unit_price_minor: 1999 + l as i64,
            })
            .collect(),
        total_minor: 1999 * 3 + 3,
        channel: "web".into(),
    })
}

pub(crate) fn order_body() -> Value {
    json!({
        "customer": {"id": "c-bench", "email": "bench@example.com", "name": "Ada Lovelace"},
        "currency": "EUR",
        "lines": [
            {"sku": "SKU-1", "quantity": 1, "unit_price_minor": 1999},
            {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 2000},
            {"sku": "SKU-3", "quantity": 1, "unit_price_minor": 2001}
        ]
    })
}

pub(crate) fn rate(n: f64, took: Duration) -> f64 {
    n / took.as_secs_f64().max(1e-9)
}

/// Sends every `(key, value)` with the producer settings keel uses, many in flight, and waits for
/// every acknowledgement.
pub(crate) async fn produce_all(
    brokers: &str,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka::producer_config(&kafka::Kafka::new(brokers)).create()?;
    let mut pending = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut record = FutureRecord::to(topic)
            .key(key.as_str())
            .payload(value.as_slice());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    for delivery in futures::future::join_all(pending).await {
        match delivery {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("delivery failed: {e}"),
            Err(_) => anyhow::bail!("delivery cancelled"),
        }
    }
    Ok(())
}

/// Encodes `n` distinct orders for `topic` as the relay would.
pub(crate) async fn encoded(
    bench: &Bench,
    topic: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let encoder = keel_schemas::Encoder::new(&bench.registry_url)?;
    encoder.prepare(topic, "keel.orders").await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let event = order_event(i);
        let key = event.aggregate_id().to_string();
        out.push((key, encoder.encode(topic, &event).await?));
    }
    Ok(out)
}

/// Latencies in milliseconds, sorted.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
