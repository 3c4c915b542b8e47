//! The stack end-to-end tests run on: real PostgreSQL, broker, Redis and HTTP, with a database and
//! topics of the test's own.

#![allow(dead_code)] // each test file uses its own part of this

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_consumers::{Consumer, Handler, Subscription};
use keel_core::Settings;
use keel_core::testkit::{Process, TestDb, TestTopic, brokers, redis_url, unique};
use keel_outbox::Relay;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct Stack {
    pub settings: Settings,
    pub db: TestDb,
    pub pool: PgPool,
    pub registry_url: String,
    pub api: String,
    pub orders: TestTopic,
    pub inventory: TestTopic,
    /// The dead-letter topics of every group and of each [`Stack::consumer`]'s, as `keel topics
    /// create` makes them: the runtime never creates one.
    pub dead_letters: std::sync::Mutex<Vec<TestTopic>>,
    pub mail_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.mail_dir);
    }
}

impl Stack {
    /// Registry and order service (with its Redis cache) in-process, on a fresh database and
    /// fresh 6-partition `orders` and `inventory` topics with every group's dead-letter topics;
    /// every component migrated.
    pub async fn start() -> Self {
        let db = TestDb::new().await;
        let shutdown = CancellationToken::new();
        let (registry, _) = keel_schemas::registry::spawn(
            &db.url,
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let orders = TestTopic::new("orders", 6).await;
        let inventory = TestTopic::new("inventory", 6).await;
        let mail_dir = std::env::temp_dir().join(unique("keel-mail"));
        let mut settings = Settings::local();
        settings.database_url = db.url.clone();
        settings.kafka.brokers = brokers();
        settings.broker_quirks = keel_core::testkit::broker_quirks();
        settings.schema_registry_url = format!("http://{registry}");
        settings.topics.orders = orders.name.clone();
        settings.topics.inventory = inventory.name.clone();
        settings.order_service_addr = "127.0.0.1:0".parse().unwrap();
        settings.cache.redis_url = Some(redis_url());
        settings.mail.dir = mail_dir.clone();
        settings.consumer.max_retry_backoff = Duration::from_secs(1);
        settings.consumer.max_attempts = 3;
        // The tests kill members without static membership and reuse production group names on
        // one broker: the broker should notice a dead member in seconds, not Kafka's 45 s.
        settings.consumer.session_timeout = Duration::from_secs(10);

        // Relays started as processes claim 50 rows a step.
        settings.relay.batch_size = 50;
        let app = keel_producers::Application::build(&settings).await.unwrap();
        let api = format!("http://{}", app.local_addr());
        tokio::spawn(app.run_until(shutdown.clone()));
        keel_consumers::migrate_all(&settings).await.unwrap();
        let pool = db.pool().await;
        let mut dead_letters = Vec::new();
        for d in keel_consumers::dead_letters(&settings.topics) {
            dead_letters
                .push(TestTopic::declare(keel_core::topics::plain_dead_letter(&d.name)).await);
        }
        Self {
            dead_letters: std::sync::Mutex::new(dead_letters),
            registry_url: settings.schema_registry_url.clone(),
            settings,
            db,
            pool,
            api,
            orders,
            inventory,
            mail_dir,
            shutdown,
            http: reqwest::Client::new(),
        }
    }

    /// The settings a `keel` process of this stack runs with.
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// `KEEL_*` variables for a child process, matching [`Stack::settings`].
    pub fn env(&self) -> Vec<(String, String)> {
        self.settings.to_env()
    }

    /// An in-process relay of this stack: batches of 100, polling every 200 ms.
    pub fn relay(&self) -> Relay {
        let mut s = self.settings();
        s.relay.batch_size = 100;
        s.relay.poll_interval = Duration::from_millis(200);
        s.relay.retention = Duration::from_secs(3600);
        Relay::new(self.pool.clone(), &s).unwrap()
    }

    /// A consumer of `handler` on this stack (every group's tables are migrated at the start),
    /// in `subscription`'s group.
    pub async fn consumer<H: Handler>(
        &self,
        subscription: Subscription,
        handler: H,
    ) -> Consumer<H> {
        for d in subscription.dead_letters() {
            let topic = TestTopic::declare(keel_core::topics::plain_dead_letter(&d.name)).await;
            self.dead_letters.lock().unwrap().push(topic);
        }
        Consumer::new(subscription, handler, self.pool.clone(), &self.settings).unwrap()
    }

    /// `group`'s subscription under this stack's topics, with the test's own group id `id`.
    pub fn as_group(&self, group: &keel_consumers::Group, id: &str) -> Subscription {
        Subscription::new(id, (group.topics)(&self.settings.topics))
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.api))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> Value {
        let resp = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    pub async fn stock(&self, sku: &str) -> (i32, i32) {
        sqlx::query_as("SELECT on_hand, reserved FROM inventory.stock WHERE sku = $1")
            .bind(sku)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub async fn processed(&self, group: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM consumers.processed_events WHERE group_id = $1")
            .bind(group)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Records on `topic` now, over all its partitions (high minus low watermark).
    pub fn records_in(&self, topic: &str) -> i64 {
        keel_core::kafka::group_offsets(&self.settings.kafka, &unique("look"), &[topic])
            .unwrap()
            .iter()
            .map(|p| p.high - p.low)
            .sum()
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }
}

pub fn order(lines: Value) -> Value {
    json!({"customer": {"id": "c-1", "email": "ada@example.com", "name": "Ada"}, "currency": "EUR", "lines": lines})
}

/// Runs `keel <args>` to completion against `stack`.
pub fn keel_run(stack: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .envs(stack.env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

/// `GET url` within 5 s: its status and body, or `None` if nothing answered (an admin endpoint
/// of a process still starting).
pub async fn fetch(http: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let r = http
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

/// Starts `keel <args>` against `stack`.
pub fn keel(stack: &Stack, args: &[&str], extra_env: &[(&str, &str)]) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args)
        .envs(stack.env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Process::spawn("keel", cmd).expect("keel binary starts")
}
