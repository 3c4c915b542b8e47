//! One scenario's backbone: a database and topics of its own, keel's registry, order service,
//! relay and four groups as `keel` processes, with PostgreSQL and Redis reached through
//! forwarders the scenario can cut.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_core::kafka;
use keel_core::settings::BrokerQuirks;
use keel_core::testkit::{Outage, Process, free_port, metric_sum, wait_ready};
use serde_json::Value;
use sqlx::PgPool;

/// The stock every SKU starts with (the inventory migration's seed).
pub const OPENING_STOCK: i32 = 10_000;

/// The groups, as `keel consume` names them: keel's one list ([`keel_consumers::GROUPS`]).
pub static GROUPS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(keel_consumers::names);

/// The relay and every group: the instances that run beside the order service and registry.
pub fn workers() -> Vec<&'static str> {
    std::iter::once("relay")
        .chain(GROUPS.iter().copied())
        .collect()
}

/// What every scenario's stack is built from.
#[derive(Clone)]
pub struct Parts {
    pub keel_bin: String,
    pub postgres: String,
    pub redis: String,
    pub logs: std::path::PathBuf,
    pub run: String,
    /// What keel's processes start from: this environment's `KEEL_*` (`KEEL_BROKER_QUIRKS`).
    pub settings: keel_core::Settings,
    /// Whether group instances get a stable `KEEL_CONSUMER_INSTANCE_ID` (static membership).
    /// Not on the mock cluster, which does not implement it: a restarted static member joins as
    /// a second member beside its old self, and with two instances per group the rebalance
    /// never completed there.
    pub static_membership: bool,
}

pub struct Stack {
    pub parts: Parts,
    pub name: String,
    /// The scenario's database, reached directly (the auditor and checks use it).
    pub db_url: String,
    db_name: String,
    pub pool: PgPool,
    /// The services reach PostgreSQL and Redis through these.
    pub postgres: Outage,
    pub redis: Outage,
    pub brokers: String,
    pub orders_topic: String,
    pub inventory_topic: String,
    /// The orders and inventory topics and their partition counts.
    pub partitions: Vec<(String, i32)>,
    pub api: String,
    api_port: u16,
    registry_port: u16,
    mail_dir: std::path::PathBuf,
    /// Running processes by instance name (`relay`, `relay-2`, `inventory`, …).
    procs: BTreeMap<String, Process>,
    /// Each instance's admin port (/ready, /metrics).
    admin: BTreeMap<String, u16>,
    /// The last `keel_consumer_records_total{outcome="duplicate"}` read from each instance.
    duplicates: BTreeMap<String, f64>,
    pub started: chrono::DateTime<chrono::Utc>,
    /// For the admin endpoints: short timeouts, a stuck service must not stall the scenario.
    http: reqwest::Client,
    /// Between the services and the registry, for the registry-flaky scenario.
    pub flaky_registry: Option<crate::flaky::FlakyRegistry>,
}

impl Stack {
    /// Everything up and ready, on the broker at `brokers`.
    /// Its topics are made on `mock` when the broker is the mock cluster (whose CreateTopics
    /// request times out), else with the admin API as `keel topics create` makes them.
    pub async fn start(
        parts: &Parts,
        name: &str,
        brokers: &str,
        mock: Option<&keel_core::testkit::cluster::Mock>,
        flaky_registry: bool,
    ) -> anyhow::Result<Self> {
        let brokers = brokers.to_owned();
        let db_name = format!("keel_chaos_{}_{}", parts.run, name.replace('-', "_"));
        let db_url = format!("postgres://postgres@{}/{db_name}", parts.postgres);
        let postgres = Outage::forward(&parts.postgres).await;
        let redis = Outage::forward(&parts.redis).await;
        let prefix = format!("chaos-{}-{name}", parts.run);
        let orders_topic = format!("{prefix}-orders");
        let inventory_topic = format!("{prefix}-inventory");
        // As `keel topics create` makes them, dead-letter topics included: the runtime never
        // creates one.
        let topics = keel_core::settings::Topics {
            orders: orders_topic.clone(),
            inventory: inventory_topic.clone(),
        };
        let dead_letters = keel_consumers::dead_letters(&topics);
        let declared = match parts.settings.broker_quirks {
            BrokerQuirks::None => {
                keel_core::topics::load(&parts.settings.topics_file, &topics, &dead_letters)?
            }
            // tansu 0.6 on SQLite (the broker-restart scenario) lost records across its restart
            // on topics created with broker-default replication, retention.ms=-1 and
            // cleanup.policy=delete together (each alone was fine; 3 runs of 3); plain topics
            // kept them (5 of 5).
            BrokerQuirks::Tansu => [&orders_topic, &inventory_topic]
                .into_iter()
                .map(|t| kafka::TopicSpec::new(t, 6))
                .chain(
                    dead_letters
                        .iter()
                        .map(|d| keel_core::topics::plain_dead_letter(&d.name)),
                )
                .collect(),
        };
        match mock {
            Some(mock) => {
                for spec in &declared {
                    mock.create_topic(&spec.name, spec.partitions)?;
                }
            }
            None => {
                kafka::create_topics(&kafka::Kafka::new(&brokers), &declared)
                    .await
                    .context("creating the scenario's topics")?;
            }
        }
        let partitions = declared
            .iter()
            .filter(|t| t.name == orders_topic || t.name == inventory_topic)
            .map(|t| (t.name.clone(), t.partitions))
            .collect();
        let mail_dir = parts.logs.join(format!("{prefix}-mail"));
        let api_port = free_port()?;
        let registry_port = free_port()?;
        let flaky_registry = if flaky_registry {
            Some(
                crate::flaky::FlakyRegistry::start(&format!("http://127.0.0.1:{registry_port}"))
                    .await?,
            )
        } else {
            None
        };
        let mut stack = Self {
            parts: parts.clone(),
            name: name.to_owned(),
            db_url: db_url.clone(),
            db_name,
            pool: PgPool::connect_lazy(&db_url)?,
            postgres,
            redis,
            brokers,
            orders_topic,
            inventory_topic,
            partitions,
            api: format!("http://127.0.0.1:{api_port}"),
            api_port,
            registry_port,
            mail_dir,
            procs: BTreeMap::new(),
            admin: BTreeMap::new(),
            duplicates: BTreeMap::new(),
            started: chrono::Utc::now(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
            flaky_registry,
        };
        let status = stack
            .command("migrate", &["migrate"], |_| {})?
            .status()
            .context("keel migrate")?;
        anyhow::ensure!(status.success(), "keel migrate failed ({status})");
        stack.started = chrono::Utc::now();
        stack.spawn("registry")?;
        stack
            .wait_ready("registry", Duration::from_secs(30))
            .await?;
        stack.spawn("order-service")?;
        stack
            .wait_ready("order-service", Duration::from_secs(30))
            .await?;
        stack.spawn("relay")?;
        for g in GROUPS.iter() {
            stack.spawn(g)?;
        }
        for name in workers() {
            stack.wait_ready(name, Duration::from_secs(60)).await?;
        }
        Ok(stack)
    }

    /// A `keel` process of this stack with its settings as `configure` changes them. Services
    /// reach PostgreSQL and Redis through the forwarders, except the registry (its outages are
    /// scenarios of their own).
    fn command(
        &self,
        instance: &str,
        args: &[&str],
        configure: impl FnOnce(&mut keel_core::Settings),
    ) -> anyhow::Result<Command> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(
            self.parts
                .logs
                .join(format!("{}-{}-{instance}.log", self.parts.run, self.name)),
        )?;
        let local = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = self.parts.settings.clone();
        s.database_url = if instance == "registry" || instance == "migrate" {
            self.db_url.clone()
        } else {
            format!(
                "postgres://postgres@{}/{}",
                self.postgres.addr, self.db_name
            )
        };
        s.kafka.brokers = self.brokers.clone();
        s.schema_registry_url = match &self.flaky_registry {
            Some(proxy) if instance != "registry" => proxy.url.clone(),
            _ => format!("http://127.0.0.1:{}", self.registry_port),
        };
        s.registry_addr = local(self.registry_port);
        s.order_service_addr = local(self.api_port);
        s.topics.orders = self.orders_topic.clone();
        s.topics.inventory = self.inventory_topic.clone();
        s.cache.redis_url = Some(format!("redis://{}", self.redis.addr));
        s.mail.dir = self.mail_dir.clone();
        s.consumer.max_retry_backoff = Duration::from_secs(1);
        s.relay.poll_interval = Duration::from_millis(200);
        configure(&mut s);
        let mut cmd = Command::new(&self.parts.keel_bin);
        cmd.args(args)
            .envs(s.to_env())
            // CHAOS_RUST_LOG=info (or debug) to see more of what the services did.
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Ok(cmd)
    }

    /// Starts instance `name`: `registry`, `order-service`, `relay[-N]` or `<group>[-N]`.
    pub fn spawn(&mut self, instance: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.procs.contains_key(instance),
            "{instance} is already running"
        );
        let base = instance
            .rsplit_once('-')
            .filter(|(_, n)| n.parse::<u32>().is_ok())
            .map_or(instance, |(b, _)| b);
        let args: Vec<&str> = match base {
            "registry" => vec!["registry"],
            "order-service" => vec!["order-service"],
            "relay" => vec!["relay"],
            group => vec!["consume", group],
        };
        let mut admin = None;
        if !matches!(base, "registry" | "order-service") {
            let port = match self.admin.get(instance) {
                Some(p) => *p,
                None => free_port()?,
            };
            self.admin.insert(instance.to_owned(), port);
            admin = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
        // Static membership: a restarted instance takes its own partitions back.
        let instance_id = format!("{}-{}-{instance}", self.parts.run, self.name);
        let static_membership = self.parts.static_membership;
        let cmd = self.command(instance, &args, |s| {
            if admin.is_some() {
                s.admin_addr = admin;
                if static_membership {
                    s.consumer.instance_id = Some(instance_id);
                }
            }
        })?;
        self.procs
            .insert(instance.to_owned(), Process::spawn(instance, cmd)?);
        Ok(())
    }

    fn ready_url(&self, instance: &str) -> String {
        match instance {
            "registry" => format!("http://127.0.0.1:{}/ready", self.registry_port),
            "order-service" => format!("{}/ready", self.api),
            _ => format!(
                "http://127.0.0.1:{}/ready",
                self.admin.get(instance).copied().unwrap_or_default()
            ),
        }
    }

    /// Polls the instance's `/ready` until it answers 200.
    pub async fn wait_ready(&self, instance: &str, timeout: Duration) -> anyhow::Result<()> {
        let process = self.procs.get(instance);
        wait_ready(
            &self.http,
            instance,
            &self.ready_url(instance),
            timeout,
            || process.is_none_or(Process::exited),
        )
        .await?;
        Ok(())
    }

    /// Whether the instance answers `/ready` with 200 now.
    pub async fn ready(&self, instance: &str) -> bool {
        self.http
            .get(self.ready_url(instance))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Makes the scenario's database read-only (`on`) or writable again for the services, as a
    /// failover that demotes the primary does: the default for new sessions changes, and the
    /// services' sessions (through the forwarder) are cut so that they reconnect under it.
    pub async fn set_read_only(&self, on: bool) -> anyhow::Result<()> {
        // In a read-write transaction: a session of ours opened while the database was
        // read-only would refuse the ALTER that ends it.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION READ WRITE")
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "ALTER DATABASE {} SET default_transaction_read_only = {}",
            keel_core::db::quote_ident(&self.db_name),
            if on { "on" } else { "off" }
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.postgres.cut_open();
        Ok(())
    }

    pub fn kill9(&mut self, instance: &str) -> anyhow::Result<()> {
        self.procs
            .remove(instance)
            .with_context(|| format!("{instance} is not running"))?
            .kill9();
        Ok(())
    }

    /// SIGTERM: an error unless it exits 0.
    pub fn terminate(&mut self, instance: &str) -> anyhow::Result<()> {
        self.procs
            .remove(instance)
            .with_context(|| format!("{instance} is not running"))?
            .terminate()
    }

    /// Reads every group instance's duplicate count (kept when the instance dies).
    pub async fn scrape_duplicates(&mut self) {
        for (instance, port) in &self.admin {
            if !self.procs.contains_key(instance) {
                continue;
            }
            let Ok(resp) = self
                .http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await
            else {
                continue;
            };
            let Ok(text) = resp.text().await else {
                continue;
            };
            let dups = metric_sum(
                &text,
                "keel_consumer_records_total",
                "outcome=\"duplicate\"",
            );
            // A restarted instance counts from zero again: keep what the previous one saw.
            let key = format!(
                "{instance}@{}",
                self.procs.get(instance).map_or(0, Process::pid)
            );
            self.duplicates.insert(key, dups);
        }
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates.values().sum::<f64>() as u64
    }

    /// Runs an operator's `keel` command (`args`) on this stack, on the database and Redis
    /// directly, logging as `instance`; its output.
    pub async fn cli(&self, instance: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut cmd = self.command(instance, args, |s| {
            s.database_url = self.db_url.clone();
            s.cache.redis_url = Some(format!("redis://{}", self.parts.redis));
        })?;
        cmd.stdout(Stdio::piped());
        let what = format!("keel {}", args.join(" "));
        tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .context(what)
    }

    /// How many records `group` has dead-lettered (that decode), as the audit counts them.
    pub async fn dead_letters(&self, group: &str) -> anyhow::Result<u64> {
        Ok(self.audit().await?["groups"][group]["dead_lettered"]
            .as_u64()
            .unwrap_or(0))
    }

    /// `keel audit --output json` on this stack (direct database URL); `Ok(report)` whatever its
    /// verdict.
    pub async fn audit(&self) -> anyhow::Result<Value> {
        let since = self.started.to_rfc3339();
        let opening = OPENING_STOCK.to_string();
        let args = [
            "audit",
            "--output",
            "json",
            "--opening-stock",
            &opening,
            "--since",
            &since,
        ];
        let out = self.cli("audit", &args).await?;
        let code = out.status.code();
        anyhow::ensure!(
            matches!(code, Some(0 | 4)),
            "keel audit could not run (exit {code:?}; see the audit log)"
        );
        serde_json::from_slice(&out.stdout).context("keel audit's JSON")
    }

    /// For the orders-topic events another group applied and `group` did not: their partition
    /// and offset, the highest offset `group` applied there, and its committed offset. Tells a
    /// skipped record (the group is past it) from one not reached yet.
    pub async fn where_missing(&self, group: &str) -> anyhow::Result<Vec<String>> {
        /// Partition, offset, the group's highest offset there, the event, what the group
        /// applied at that offset.
        type Missing = (i32, i64, Option<i64>, String, Option<String>);
        let missing: Vec<Missing> = sqlx::query_as(
            "SELECT DISTINCT ON (o.event_id) o.kafka_partition, o.kafka_offset,
                    (SELECT max(g.kafka_offset) FROM consumers.processed_events g
                      WHERE g.group_id = $1 AND g.topic = o.topic AND g.kafka_partition = o.kafka_partition),
                    o.event_id::text,
                    (SELECT string_agg(g.event_id::text, ',') FROM consumers.processed_events g
                      WHERE g.group_id = $1 AND g.topic = o.topic AND g.kafka_partition = o.kafka_partition
                        AND g.kafka_offset = o.kafka_offset)
               FROM consumers.processed_events o
              WHERE o.topic = $2 AND o.group_id <> $1
                AND NOT EXISTS (SELECT 1 FROM consumers.processed_events g
                                 WHERE g.group_id = $1 AND g.event_id = o.event_id)
              ORDER BY o.event_id, o.kafka_offset",
        )
        .bind(group)
        .bind(&self.orders_topic)
        .fetch_all(&self.pool)
        .await?;
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let committed = {
            let (brokers, group, topic) = (
                self.brokers.clone(),
                group.to_owned(),
                self.orders_topic.clone(),
            );
            tokio::task::spawn_blocking(move || {
                kafka::group_offsets(&kafka::Kafka::new(brokers), &group, &[&topic])
            })
            .await??
        };
        Ok(missing
            .into_iter()
            .map(|(partition, offset, highest, event, there)| {
                let committed = committed
                    .iter()
                    .find(|p| p.partition == partition)
                    .and_then(|p| p.committed);
                let verdict = if highest.is_some_and(|h| h > offset) {
                    "SKIPPED: applied later offsets of that partition"
                } else {
                    "not reached"
                };
                format!(
                    "{group}: missing orders[{partition}]@{offset} (event {event}; what {group} applied at that offset: {there:?}); highest applied there {highest:?}, committed {committed:?}: {verdict}"
                )
            })
            .collect())
    }

    /// Polls the audit until it passes (the backbone drained and every effect is in place) and
    /// `also` holds of its report, or returns the last report after `timeout`. With how long it
    /// took. `also` is for what the audit does not wait for: a poison record retried at the end
    /// of a partition blocks no event, so the audit passes before it reaches the dead letters.
    pub async fn settle(
        &mut self,
        timeout: Duration,
        also: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<(Value, Duration)> {
        let begun = Instant::now();
        loop {
            self.scrape_duplicates().await;
            let report = self.audit().await?;
            if (report["ok"] == Value::Bool(true) && also(&report)) || begun.elapsed() > timeout {
                return Ok((report, begun.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every process gracefully (each must exit 0) and drops the database and topics.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.scrape_duplicates().await;
        let mut failures = Vec::new();
        // Groups and relay first, the registry last (the others may still ask it).
        let order: Vec<String> = self
            .procs
            .keys()
            .filter(|k| !matches!(k.as_str(), "registry" | "order-service"))
            .cloned()
            .chain(["order-service".to_owned(), "registry".to_owned()])
            .collect();
        for instance in order {
            if let Some(p) = self.procs.remove(&instance)
                && let Err(e) = p.terminate()
            {
                failures.push(e.to_string());
            }
        }
        self.pool.close().await;
        let admin = PgPool::connect(&format!(
            "postgres://postgres@{}/postgres",
            self.parts.postgres
        ))
        .await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        ))
        .execute(&admin)
        .await?;
        let _ = kafka::delete_topics(
            &kafka::Kafka::new(&self.brokers),
            &[&self.orders_topic, &self.inventory_topic],
        )
        .await;
        let _ = std::fs::remove_dir_all(&self.mail_dir);
        anyhow::ensure!(
            failures.is_empty(),
            "graceful stop failed: {}",
            failures.join("; ")
        );
        Ok(())
    }
}
