//! `make bench`: how fast keel moves events, as ratios against the raw parts measured in the same
//! run on the same machine (absolute numbers on a shared machine are noise; ratios are not).
//!
//! Scenarios (see `bench/README.md`): relay drain, order write path, end-to-end latency at two
//! open-loop arrival rates, consumer catch-up, and each service's peak memory. keel's services
//! run as `keel` processes (the release binary in `BENCH_KEEL_BIN`), so their memory is their own.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use keel_consumers::Handler;
use keel_core::kafka::{self, TopicSpec};
use keel_core::testkit::{Process, free_port, metric_sum, wait_until};
use keel_schemas::{Customer, Event, OrderCreated, OrderLine};
use rdkafka::Message;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

mod report;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Outbox rows the relay drains (scenario 1).
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    /// Concurrent clients on the order write path (scenario 2).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds each timed window lasts (scenarios 2 and 3).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Events in the backlog each consumer group catches up on (scenario 4).
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Run only these scenarios (comma separated: drain, write, e2e, catchup).
    #[arg(long, value_delimiter = ',', default_value = "drain,write,e2e,catchup")]
    only: Vec<String>,
    /// Groups the catch-up scenario runs (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "inventory,analytics,cache-invalidation"
    )]
    groups: Vec<String>,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
}

/// What every scenario shares.
struct Bench {
    args: Args,
    db_url: String,
    brokers: String,
    registry_url: String,
    keel_bin: String,
    pool: PgPool,
    run: String,
    /// What keel's processes read from this environment's `KEEL_*` (batch size, fetch wait), so
    /// that the raw baselines use the same values.
    keel: keel_core::Settings,
}

fn var(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

impl Bench {
    fn keel(&self, name: &str, args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Process> {
        let logs = self.args.out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = std::fs::File::create(logs.join(format!("{}-{name}.log", self.run)))?;
        let mut cmd = Command::new(&self.keel_bin);
        cmd.args(args)
            .env("KEEL_DATABASE_URL", &self.db_url)
            .env("KEEL_KAFKA_BROKERS", &self.brokers)
            .env("KEEL_SCHEMA_REGISTRY_URL", &self.registry_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Process::spawn(name, cmd)
    }

    async fn topic(&self, name: &str) -> anyhow::Result<String> {
        let topic = format!("bench-{}-{name}", self.run);
        kafka::create_topics(&self.brokers, &[TopicSpec::new(&topic, 6)]).await?;
        Ok(topic)
    }

    async fn flag(&self, sql: &str) -> anyhow::Result<bool> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    async fn scalar(&self, sql: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    async fn processed(&self, group: &str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM consumers.processed_events WHERE group_id = $1",
        )
        .bind(group)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Runs `keel consume <group>` with an admin address, so that its progress can be read
    /// from its own `/metrics` ([`GroupProcess::handled`]).
    fn group(
        &self,
        name: &str,
        group: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<GroupProcess> {
        let port = free_port()?;
        let mut env = env.to_vec();
        env.push(("KEEL_ADMIN_ADDR", format!("127.0.0.1:{port}")));
        Ok(GroupProcess {
            process: self.keel(name, &["consume", group], &env)?,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::new(),
        })
    }
}

/// A consumer group process the bench runs.
struct GroupProcess {
    process: Process,
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
    async fn handled(&self) -> anyhow::Result<u64> {
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
fn order_event(i: usize) -> Event {
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

fn order_body() -> Value {
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

fn rate(n: f64, took: Duration) -> f64 {
    n / took.as_secs_f64().max(1e-9)
}

/// Sends every `(key, value)` with the producer settings keel uses, many in flight, and waits for
/// every acknowledgement.
async fn produce_all(
    brokers: &str,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let producer: FutureProducer = kafka::producer_config(brokers).create()?;
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
async fn encoded(bench: &Bench, topic: &str, n: usize) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
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

/// Scenario 1: the relay drains `rows` pending outbox rows; baselines: the claim-and-mark SQL
/// loop alone, and a raw producer sending the same kind of bytes.
async fn relay_drain(bench: &Bench, report: &mut report::Report) -> anyhow::Result<()> {
    let rows = bench.args.rows;
    let topic = bench.topic("drain").await?;
    let template = serde_json::to_value(order_event(0))?;
    eprintln!("bench: seeding {rows} outbox rows");
    sqlx::query(
        "INSERT INTO outbox.events (topic, message_key, event_type, event_id, payload)
         SELECT $1, k::text, 'keel.orders.OrderCreated', e,
                jsonb_set(jsonb_set($2::jsonb, '{OrderCreated,event_id}', to_jsonb(e::text)),
                          '{OrderCreated,order_id}', to_jsonb(k::text))
           FROM (SELECT gen_random_uuid() AS k, gen_random_uuid() AS e FROM generate_series(1, $3)) s",
    )
    .bind(&topic)
    .bind(&template)
    .bind(rows)
    .execute(&bench.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(&bench.pool)
        .await?;

    // (a) The relay's own claim and mark, without Kafka, with the relay's batch size.
    let batch_size = bench.keel.relay.batch_size;
    let relay = keel_outbox::Relay::new(
        bench.pool.clone(),
        keel_outbox::RelayConfig {
            brokers: bench.brokers.clone(),
            registry_url: bench.registry_url.clone(),
            batch_size,
            poll_interval: Duration::from_millis(100),
            retention: Duration::from_secs(86_400),
        },
    )?;
    let started = Instant::now();
    loop {
        let claim = relay.claim().await?.context("not the relay leader")?;
        if claim.is_empty() {
            break;
        }
        relay.mark(claim).await?;
    }
    let sql = rate(rows as f64, started.elapsed());
    sqlx::query("UPDATE outbox.events SET published_at = NULL WHERE topic = $1")
        .bind(&topic)
        .execute(&bench.pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(&bench.pool)
        .await?;

    // (b) A raw producer, the same settings, bytes encoded beforehand.
    let raw_topic = bench.topic("drain-raw").await?;
    eprintln!("bench: encoding {rows} events for the raw producer");
    let records = encoded(bench, &raw_topic, rows as usize).await?;
    let started = Instant::now();
    produce_all(&bench.brokers, &raw_topic, &records).await?;
    let raw = rate(rows as f64, started.elapsed());
    drop(records);

    // The relay, as a process.
    // Timed from its first published batch: start-up (connecting, registering the contracts) is
    // not throughput.
    // Polled every 50 ms, so cheap (the partial indexes): a count over a million rows at that
    // pace would take the database's time from the relay being measured.
    let relay = bench.keel(
        "relay-drain",
        &["relay"],
        &[("KEEL_TOPIC_ORDERS", topic.clone())],
    )?;
    wait_until(
        "the relay's first batch",
        Duration::from_secs(120),
        || async {
            bench
                .flag("SELECT EXISTS (SELECT 1 FROM outbox.events WHERE published_at IS NOT NULL)")
                .await
        },
    )
    .await?;
    let started = Instant::now();
    let remaining = bench
        .scalar(
            "SELECT count(*) FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL",
        )
        .await?;
    wait_until("the relay to drain", Duration::from_secs(1800), || async {
        Ok(!bench
            .flag("SELECT EXISTS (SELECT 1 FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL)")
            .await?)
    })
    .await?;
    let keel = rate(remaining as f64, started.elapsed());
    report.memory("relay", relay.peak_rss_mib());
    relay.terminate()?;
    // The next scenarios' relays must not wade through a million dead index entries (what
    // autovacuum would clear in time on a real system).
    sqlx::query("DELETE FROM outbox.events WHERE topic = $1")
        .bind(&topic)
        .execute(&bench.pool)
        .await?;
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(&bench.pool)
        .await?;
    report.scenario(
        "relay drain",
        json!({"rows": rows, "batch_size": batch_size, "relay_per_s": keel, "sql_loop_per_s": sql, "raw_producer_per_s": raw}),
        keel / sql.min(raw),
        0.8,
    );
    Ok(())
}

/// Latencies in milliseconds, sorted.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `clients` loops of `op` for `window`; returns (operations per second, sorted latencies).
async fn closed_loop<F, Fut>(
    clients: usize,
    window: Duration,
    op: F,
) -> anyhow::Result<(f64, Vec<f64>)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                op().await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let took = started.elapsed();
    all.sort_by(f64::total_cmp);
    Ok((rate(all.len() as f64, took), all))
}

/// Scenario 2: `POST /orders` with N clients against the same transaction issued directly.
/// Returns the HTTP path's orders per second (the capacity scenario 3 loads to 20% and 80%).
async fn write_path(bench: &Bench, report: &mut report::Report) -> anyhow::Result<f64> {
    let topic = bench.topic("write").await?;
    let port = free_port()?;
    let service = bench.keel(
        "order-service",
        &["order-service"],
        &[
            ("KEEL_ORDER_SERVICE_ADDR", format!("127.0.0.1:{port}")),
            ("KEEL_TOPIC_ORDERS", topic.clone()),
        ],
    )?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until("the order service", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            Ok(http
                .get(format!("{url}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()))
        }
    })
    .await?;
    let window = Duration::from_secs(bench.args.seconds);
    let body = order_body();
    let (http_rate, http_lat) = {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        closed_loop(bench.args.clients, window, move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let r = http
                    .post(format!("{url}/orders"))
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 201, "POST /orders answered {}", r.status());
                Ok(())
            }
        })
        .await?
    };
    report.memory("order-service", service.peak_rss_mib());
    service.terminate()?;

    let new: keel_producers::domain::NewOrder = serde_json::from_value(body)?;
    let valid = keel_producers::domain::validate(&new)
        .map_err(|e| anyhow::anyhow!("bench order invalid: {e:?}"))?;
    let (pool, topic2) = (bench.pool.clone(), topic.clone());
    let (sql_rate, sql_lat) = closed_loop(bench.args.clients, window, move || {
        let (pool, topic, valid) = (pool.clone(), topic2.clone(), valid.clone());
        async move {
            let mut tx = pool.begin().await?;
            keel_producers::routes::insert_order(&mut tx, &topic, valid, &Default::default())
                .await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    // Not published by anyone: the relay of scenario 3 must not find them.
    sqlx::query("DELETE FROM outbox.events WHERE topic = $1")
        .bind(&topic)
        .execute(&bench.pool)
        .await?;
    report.scenario(
        "order write path",
        json!({
            "clients": bench.args.clients,
            "http_per_s": http_rate, "http_p50_ms": percentile(&http_lat, 50.0), "http_p99_ms": percentile(&http_lat, 99.0),
            "sql_per_s": sql_rate, "sql_p50_ms": percentile(&sql_lat, 50.0), "sql_p99_ms": percentile(&sql_lat, 99.0),
        }),
        http_rate / sql_rate,
        0.7,
    );
    Ok(http_rate)
}

/// How long each end-to-end run sends at its rate before the orders it measures.
const WARM_UP: Duration = Duration::from_secs(2);

/// Raw produce → consume round trips through the same broker (milliseconds): `n` records sent
/// open loop at `per_s`, the end-to-end run's arrival process. Sent one at a time instead, each
/// record would leave just as the previous one arrived, always at the same point of the
/// consumer's fetch cycle; tansu answers fetches only when their wait runs out, and that point
/// happens to be its best: such a baseline read about one wait plus 2 ms where records arriving
/// at random wait 1.5 waits on average (bench/README.md).
async fn raw_round_trips(bench: &Bench, n: usize, per_s: f64) -> anyhow::Result<Vec<f64>> {
    let topic = bench.topic("ping").await?;
    let producer: FutureProducer = kafka::producer_config(&bench.brokers).create()?;
    // The fetch wait keel's groups use, so that the baseline pays the same broker behaviour.
    let fetch_wait = bench.keel.consumer.fetch_wait;
    let consumer: StreamConsumer =
        kafka::consumer_config(&bench.brokers, &format!("bench-ping-{}", bench.run))
            .set("enable.auto.offset.store", "true")
            .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
            .create()?;
    consumer.subscribe(&[&topic])?;
    let send = |key: &str| {
        producer
            .send_result(FutureRecord::to(&topic).key(key).payload("ping"))
            .map_err(|(e, _)| anyhow::anyhow!("cannot enqueue a ping: {e}"))
    };
    // Joined and assigned before timing: one record through first.
    send("warm-up")?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .context("the first ping did not come back")??;
        if m.key() == Some(b"warm-up".as_slice()) {
            break;
        }
    }
    let receiver = tokio::spawn(async move {
        let mut received = vec![None; n];
        let mut left = n;
        while left > 0 {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .context("a ping did not come back within 30 s")??;
            let at = Instant::now();
            let i = m
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.parse::<usize>().ok());
            if let Some(slot) = i.and_then(|i| received.get_mut(i))
                && slot.is_none()
            {
                *slot = Some(at);
                left -= 1;
            }
        }
        anyhow::Ok(received)
    });
    let started = tokio::time::Instant::now();
    let mut sent = Vec::with_capacity(n);
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / per_s)).await;
        sent.push(Instant::now());
        deliveries.push(send(&i.to_string())?);
    }
    for delivery in futures::future::join_all(deliveries).await {
        delivery
            .map_err(|_| anyhow::anyhow!("ping delivery cancelled"))?
            .map_err(|(e, _)| anyhow::anyhow!("ping not delivered: {e}"))?;
    }
    let received = receiver.await??;
    let mut latencies: Vec<f64> = sent
        .iter()
        .zip(&received)
        .filter_map(|(sent, got)| Some(got.as_ref()?.duration_since(*sent).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// Scenario 3: order commit → inventory's commit at 20% and 80% of the write path's capacity,
/// arrivals on a fixed schedule (open loop: a slow answer does not delay the next request).
async fn end_to_end(
    bench: &Bench,
    capacity: f64,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    let orders = bench.topic("e2e-orders").await?;
    let inventory = bench.topic("e2e-inventory").await?;
    let port = free_port()?;
    let env = [
        ("KEEL_TOPIC_ORDERS", orders.clone()),
        ("KEEL_TOPIC_INVENTORY", inventory.clone()),
        ("KEEL_ORDER_SERVICE_ADDR", format!("127.0.0.1:{port}")),
    ];
    let service = bench.keel("order-service-e2e", &["order-service"], &env)?;
    let relay = bench.keel("relay-e2e", &["relay"], &env)?;
    let consumer = bench.group("inventory-e2e", "inventory", &env)?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until("the order service", Duration::from_secs(60), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            Ok(http
                .get(format!("{url}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()))
        }
    })
    .await?;
    // At the 20% run's rate, the one the targets are for.
    let baseline = raw_round_trips(bench, 1000, (capacity * 0.2).max(1.0)).await?;
    let raw_p50 = percentile(&baseline, 50.0);
    let raw_p99 = percentile(&baseline, 99.0);
    report.series("raw round trip", baseline);

    // Warm up: the group joins and the first events flow.
    let warm = order_body();
    for _ in 0..20 {
        http.post(format!("{url}/orders"))
            .json(&warm)
            .send()
            .await?;
    }
    wait_until("inventory to warm up", Duration::from_secs(120), || async {
        Ok(consumer.handled().await? >= 20)
    })
    .await?;

    let mut results = serde_json::Map::new();
    for (label, share) in [("20%", 0.2), ("80%", 0.8)] {
        let per_s = (capacity * share).max(1.0);
        // The first WARM_UP at the rate are sent but not measured: they bring the services'
        // connection pools and batches to the rate (see bench/README.md).
        let warm = (per_s * WARM_UP.as_secs_f64()) as usize;
        let n = warm + (per_s * bench.args.seconds as f64) as usize;
        let before = consumer.handled().await?;
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let at = started + Duration::from_secs_f64(i as f64 / per_s);
            let (http, url, body) = (http.clone(), url.clone(), order_body());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let r = http
                    .post(format!("{url}/orders"))
                    .json(&body)
                    .send()
                    .await?;
                // Past its capacity the service sheds load with 503 (its pool's acquire timeout):
                // counted, not an error of the bench.
                if r.status() == 503 {
                    return Ok(None);
                }
                anyhow::ensure!(r.status() == 201, "POST /orders answered {}", r.status());
                let v: Value = r.json().await?;
                Ok(Some(v["id"].as_str().unwrap_or_default().to_owned()))
            }));
        }
        let mut ids = Vec::with_capacity(n);
        let mut shed = 0;
        let mut accepted = 0;
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await?? {
                Some(id) => {
                    accepted += 1;
                    if i >= warm {
                        ids.push(id);
                    }
                }
                None if i >= warm => shed += 1,
                None => {}
            }
        }
        let target = before + accepted;
        wait_until(
            "inventory to apply the load",
            Duration::from_secs(600),
            || async { Ok(consumer.handled().await? >= target) },
        )
        .await?;
        // From the order's commit (its created_at, set in the writing transaction) to
        // inventory's (processed_at, set in the applying transaction): one clock, PostgreSQL's.
        // Each split in two hops at the relay's acknowledgement (`published_at`): order commit →
        // Kafka's ack, and ack → inventory's transaction.
        let hops: Vec<(f64, f64, f64)> = sqlx::query_as(
            "SELECT (extract(epoch FROM p.processed_at - o.created_at) * 1000)::float8,
                    (extract(epoch FROM e.published_at - o.created_at) * 1000)::float8,
                    (extract(epoch FROM p.processed_at - e.published_at) * 1000)::float8
               FROM orders.orders o
               JOIN outbox.events e ON e.message_key = o.id::text AND e.event_type = 'keel.orders.OrderCreated'
               JOIN consumers.processed_events p ON p.event_id = e.event_id AND p.group_id = 'inventory'
              WHERE o.id::text = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&bench.pool)
        .await?;
        let sorted = |pick: fn(&(f64, f64, f64)) -> f64| {
            let mut v: Vec<f64> = hops.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let latencies = sorted(|h| h.0);
        let (relay_hop, consumer_hop) = (sorted(|h| h.1), sorted(|h| h.2));
        anyhow::ensure!(
            latencies.len() == ids.len(),
            "{} of {} orders measured",
            latencies.len(),
            ids.len()
        );
        let p50 = percentile(&latencies, 50.0);
        let p99 = percentile(&latencies, 99.0);
        results.insert(
            label.into(),
            json!({
                "orders_per_s": per_s, "orders": ids.len(), "shed_503": shed,
                "p50_ms": p50, "p99_ms": p99, "p999_ms": percentile(&latencies, 99.9),
                "p50_over_raw": p50 / raw_p50, "p99_over_raw": p99 / raw_p99,
                "relay_hop_p50_ms": percentile(&relay_hop, 50.0),
                "relay_hop_p99_ms": percentile(&relay_hop, 99.0),
                "consumer_hop_p50_ms": percentile(&consumer_hop, 50.0),
                "consumer_hop_p99_ms": percentile(&consumer_hop, 99.0),
            }),
        );
        report.series(&format!("order → inventory at {label}"), latencies);
    }
    report.memory("order-service", service.peak_rss_mib());
    report.memory("relay", relay.peak_rss_mib());
    report.memory("inventory", consumer.process.peak_rss_mib());
    consumer.process.terminate()?;
    relay.terminate()?;
    service.terminate()?;
    let p50_20 = results["20%"]["p50_ms"].as_f64().unwrap_or(f64::NAN);
    let p99_20 = results["20%"]["p99_ms"].as_f64().unwrap_or(f64::NAN);
    results.insert(
        "raw_round_trip".into(),
        json!({"p50_ms": raw_p50, "p99_ms": raw_p99}),
    );
    report.target("end-to-end p50 at 20% (ms)", p50_20, 10.0, false);
    report.target("end-to-end p99 at 20% (ms)", p99_20, 50.0, false);
    report.scenario(
        "end-to-end latency",
        Value::Object(results),
        raw_p50 / p50_20,
        f64::NAN,
    );
    Ok(())
}

/// Scenario 4: each group catches up on a backlog; baselines: a raw consumer reading the topic,
/// and the group's dedupe-and-apply SQL run without Kafka.
async fn catch_up(bench: &Bench, report: &mut report::Report) -> anyhow::Result<()> {
    let n = bench.args.backlog;
    const GROUPS: [&str; 3] = ["inventory", "analytics", "cache-invalidation"];
    if let Some(unknown) = bench
        .args
        .groups
        .iter()
        .find(|g| !GROUPS.contains(&g.as_str()))
    {
        anyhow::bail!(
            "--groups: no catch-up for {unknown:?}; it runs {}",
            GROUPS.join(", ")
        );
    }
    for group in GROUPS {
        if !bench.args.groups.iter().any(|g| g == group) {
            continue;
        }
        let topic = bench.topic(&format!("backlog-{group}")).await?;
        let records = encoded(bench, &topic, n).await?;
        produce_all(&bench.brokers, &topic, &records).await?;
        eprintln!("bench: {group}: {n} events in {topic}; reading them raw");

        // Raw consume: one client assigned every partition, reading until it has them all.
        let raw_consume = {
            let (brokers, topic) = (bench.brokers.clone(), topic.clone());
            let fetch_wait = bench.keel.consumer.fetch_wait;
            tokio::task::spawn_blocking(move || raw_read(&brokers, &topic, n, fetch_wait)).await??
        };
        eprintln!("bench: {group}: raw consume {raw_consume:.0}/s; applying them without Kafka");

        // The group's work without Kafka: decode, then the runtime's own transaction (dedupe
        // rows, effects, commit) over batches of the size the group runs with.
        let decoder = keel_schemas::Decoder::new(&bench.registry_url)?;
        let mut events = Vec::with_capacity(n);
        for (_, value) in &records {
            events.push(decoder.decode(Some(value)).await?);
        }
        drop(records);
        let topics = keel_core::settings::Topics {
            orders: topic.clone(),
            inventory: bench.topic(&format!("outcomes-{group}")).await?,
        };
        let sql_group = format!("bench-sql-{group}");
        let started = Instant::now();
        match group {
            "inventory" => {
                let mut handler = keel_consumers::inventory::Inventory::new(&topics);
                handler.group = sql_group;
                apply_all(bench, &handler, &topic, events).await?
            }
            "analytics" => {
                let mut handler = keel_consumers::analytics::Analytics::new(&topics);
                handler.group = sql_group;
                apply_all(bench, &handler, &topic, events).await?
            }
            _ => {
                let mut handler =
                    keel_consumers::cache_invalidation::CacheInvalidation::new(&bench.keel)?;
                handler.group = sql_group;
                handler.orders_topic = topic.clone();
                apply_all(bench, &handler, &topic, events).await?
            }
        }
        let raw_sql = rate(n as f64, started.elapsed());
        reset_effects(&bench.pool).await?;
        eprintln!("bench: {group}: raw SQL {raw_sql:.0}/s; running the group");

        // The group, as a process.
        let service = bench.group(
            &format!("{group}-backlog"),
            group,
            &[
                ("KEEL_TOPIC_ORDERS", topic.clone()),
                ("KEEL_TOPIC_INVENTORY", topics.inventory.clone()),
            ],
        )?;
        let before = bench.processed(group).await?;
        wait_until("the group to start", Duration::from_secs(120), || async {
            Ok(service.handled().await? > 0)
        })
        .await?;
        let started = Instant::now();
        let from = service.handled().await?;
        wait_until(
            "the group to catch up",
            Duration::from_secs(1800),
            || async { Ok(service.handled().await? >= n as u64) },
        )
        .await?;
        let keel = rate((n as u64).saturating_sub(from) as f64, started.elapsed());
        // What the group's metrics said, checked once where it matters: every event has its row.
        let applied = bench.processed(group).await? - before;
        anyhow::ensure!(
            applied >= n as i64,
            "{group}: {applied} of {n} events have a processed_events row after catch-up"
        );
        report.memory(group, service.process.peak_rss_mib());
        service.process.terminate()?;
        reset_effects(&bench.pool).await?;
        report.scenario(
            &format!("catch-up: {group}"),
            json!({"backlog": n, "group_per_s": keel, "raw_consume_per_s": raw_consume, "raw_sql_per_s": raw_sql}),
            keel / raw_consume.min(raw_sql),
            0.75,
        );
        if group == "cache-invalidation" {
            report.target(
                "catch-up: cache-invalidation events/s",
                keel,
                50_000.0,
                true,
            );
        }
    }
    Ok(())
}

/// Reads `n` records of `topic` from the beginning with a plain assigned consumer (no group, no
/// processing) and the groups' fetch wait; records per second.
fn raw_read(brokers: &str, topic: &str, n: usize, fetch_wait: Duration) -> anyhow::Result<f64> {
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = kafka::client_config(brokers)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", fetch_wait.as_millis().to_string())
        .create()?;
    let mut list = TopicPartitionList::new();
    for p in 0..6 {
        list.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let started = Instant::now();
    let mut read = 0;
    while read < n {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(_)) => read += 1,
            Some(Err(e)) => anyhow::bail!("raw read: {e}"),
            None => anyhow::bail!("raw read: nothing for 30 s after {read} of {n} records"),
        }
    }
    Ok(rate(n as f64, started.elapsed()))
}

/// What the consumer runtime does with what it fetched, minus Kafka: [`keel_consumers::runtime::transact`]
/// over batches of the size the group runs with (`KEEL_CONSUMER_BATCH_SIZE`, else its own).
async fn apply_all<H: Handler>(
    bench: &Bench,
    handler: &H,
    topic: &str,
    events: Vec<Event>,
) -> anyhow::Result<()> {
    let records: Vec<(Event, keel_consumers::Meta)> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let meta = keel_consumers::Meta {
                topic: topic.to_owned(),
                partition: 0,
                offset: i as i64,
                trace: Default::default(),
                span: tracing::Span::none(),
            };
            (event, meta)
        })
        .collect();
    let batch_size = bench
        .keel
        .consumer
        .batch_size
        .unwrap_or_else(|| handler.batch_size());
    for batch in records.chunks(batch_size) {
        keel_consumers::runtime::transact(&bench.pool, handler, batch)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// Empties the groups' effects so the next measurement applies everything afresh.
async fn reset_effects(pool: &PgPool) -> anyhow::Result<()> {
    for sql in [
        "TRUNCATE inventory.reservation_lines, inventory.reservations",
        "UPDATE inventory.stock SET reserved = 0",
        "TRUNCATE analytics.order_lines, analytics.orders",
        "DELETE FROM outbox.events",
    ] {
        sqlx::query(sql).execute(pool).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let run = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let server = var("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432");
    let db_url = format!("{}/keel_bench", server.trim_end_matches('/'));
    keel_core::db::drop_database(&db_url).await?;
    keel_core::db::ensure_database(&db_url).await?;
    let keel_bin = var("BENCH_KEEL_BIN", "target/release/keel");
    let migrate = Command::new(&keel_bin)
        .arg("migrate")
        .env("KEEL_DATABASE_URL", &db_url)
        .env("RUST_LOG", "warn")
        .status()
        .with_context(|| format!("running {keel_bin} migrate"))?;
    anyhow::ensure!(migrate.success(), "keel migrate failed");
    let shutdown = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db_url, "127.0.0.1:0".parse()?, shutdown.clone()).await?;
    let bench = Bench {
        pool: keel_core::db::pool(&db_url, 20).await?,
        db_url,
        brokers: var("BENCH_KAFKA_BROKERS", "127.0.0.1:29092"),
        registry_url: format!("http://{registry}"),
        keel_bin,
        run: run.clone(),
        args: args.clone(),
        keel: keel_core::Settings::from_env().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let mut report = report::Report::new(&run, &args_json(&args));
    let only = |s: &str| args.only.iter().any(|o| o == s);
    if only("drain") {
        relay_drain(&bench, &mut report).await?;
    }
    let mut capacity = 500.0;
    if only("write") {
        capacity = write_path(&bench, &mut report).await?;
    }
    if only("e2e") {
        end_to_end(&bench, capacity, &mut report).await?;
    }
    if only("catchup") {
        catch_up(&bench, &mut report).await?;
    }
    for (service, mib) in report.peak_memory() {
        report.target(&format!("peak RSS {service} (MiB)"), mib, 100.0, false);
    }
    report.finish(&args.out)?;
    shutdown.cancel();
    Ok(())
}

fn args_json(args: &Args) -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        ("rows", json!(args.rows)),
        ("clients", json!(args.clients)),
        ("seconds", json!(args.seconds)),
        ("backlog", json!(args.backlog)),
        ("groups", json!(args.groups)),
    ])
}
