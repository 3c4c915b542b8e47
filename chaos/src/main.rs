//! `make chaos`: "at-least-once delivery, exactly-once effect", proven under faults.
//!
//! Each scenario runs a backbone of its own (database, topics, keel's processes; see [`stack`]),
//! places orders at a steady rate ([`load`]) while it injects its fault several times at random
//! moments, waits for the backbone to drain, then runs `keel audit`: every event's effect applied
//! exactly once in every group, per-order order kept, nothing missing, every dead letter
//! accounted for. Plus what the scenario itself must show (a 503 while PostgreSQL is away,
//! poison records in the dead-letter topics, a graceful stop that exits 0, …).
//!
//! Output: a table (one row per scenario) and `<logs>/<run>.json`. Exit 1 unless every verdict is
//! "nothing lost, nothing doubled".

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use keel_core::testkit::Process;
use rand::Rng;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

mod abuse;
mod deploy;
mod flaky;
mod load;
mod redrive;
mod stack;

use keel_core::testkit::cluster as mock;
use stack::{GROUPS, Parts, Stack, workers};

/// The scenarios, in the order a full run takes them.
///
/// An enum so that the compiler checks every scenario is handled where they differ
/// ([`run_scenario`]); [`ValueEnum`] gives the list ([`ValueEnum::value_variants`], in declaration
/// order) and the parsing of a name. `--only` itself stays a list of strings parsed in [`run`]:
/// as a `Vec<Scenario>`, clap would reject an unknown name with its own message and exit code.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    RelayKill,
    GroupKill,
    Sigterm,
    TwoOfEach,
    RollingDeploy,
    Poison,
    RedriveAfterPay,
    PostgresOutage,
    RedisOutage,
    DependencyDegraded,
    RegistryOutage,
    RegistryFlaky,
    HttpAbuse,
    BrokerRestart,
    BrokerDown,
    LeaderMove,
}

/// The broker every scenario runs on.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Broker {
    /// A tansu of the scenario's own (the local default), with its wrong answers worked around
    /// (`KEEL_BROKER_QUIRKS=tansu`).
    Tansu,
    /// librdkafka's three-broker mock cluster, made in this process: Apache Kafka's answers,
    /// brokers that go down and leaders that move ([`keel_core::testkit::cluster::Mock`]).
    Mock,
}

impl Scenario {
    /// The name `--only` takes, and the one in the output, the JSON record and the names of the
    /// scenario's database, topics and log files.
    fn name(self) -> &'static str {
        match self {
            Scenario::RelayKill => "relay-kill",
            Scenario::GroupKill => "group-kill",
            Scenario::Sigterm => "sigterm",
            Scenario::TwoOfEach => "two-of-each",
            Scenario::RollingDeploy => "rolling-deploy",
            Scenario::Poison => "poison",
            Scenario::RedriveAfterPay => "redrive-after-pay",
            Scenario::PostgresOutage => "postgres-outage",
            Scenario::RedisOutage => "redis-outage",
            Scenario::DependencyDegraded => "dependency-degraded",
            Scenario::RegistryOutage => "registry-outage",
            Scenario::RegistryFlaky => "registry-flaky",
            Scenario::HttpAbuse => "http-abuse",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::BrokerDown => "broker-down",
            Scenario::LeaderMove => "leader-move",
        }
    }

    /// Whether the scenario's fault exists on `broker`: a restart of tansu on SQLite; a broker of
    /// three going down, or leaders moving, on the mock cluster.
    fn runs_on(self, broker: Broker) -> bool {
        match self {
            Scenario::BrokerRestart => broker == Broker::Tansu,
            Scenario::BrokerDown | Scenario::LeaderMove => broker == Broker::Mock,
            _ => true,
        }
    }

    /// The scenario named `name` exactly (as [`Scenario::name`] spells it).
    fn parse(name: &str) -> Option<Self> {
        <Self as ValueEnum>::from_str(name, false).ok()
    }
}

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Times each fault is injected, at random moments (one per period of load).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Seconds of load per round.
    #[arg(long, default_value_t = 8)]
    period: u64,
    /// Orders per second the load generator places (the broker-restart scenario places a
    /// quarter: tansu on SQLite is slow).
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// How long the backbone may take to drain after the load before the audit's verdict stands.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
    /// Seconds each PostgreSQL or Redis outage lasts.
    #[arg(long, default_value_t = 10)]
    outage: u64,
    /// Run only these scenarios (comma separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// CI's short form: one round of 5 s per scenario.
    #[arg(long)]
    quick: bool,
    /// The broker: tansu (one per scenario) or librdkafka's three-broker mock cluster.
    #[arg(long, value_enum, default_value = "tansu")]
    broker: Broker,
}

fn var(key: &str) -> anyhow::Result<String> {
    std::env::var(key).with_context(|| format!("{key} is not set (run it through `make chaos`)"))
}

/// What one scenario found.
struct Result_ {
    scenario: Scenario,
    placed: u64,
    report: Value,
    duplicates: u64,
    drained_in: Duration,
    problems: Vec<String>,
    notes: Vec<String>,
}

/// A random moment within `[from, to)` seconds.
fn moment(from: f64, to: f64) -> Duration {
    Duration::from_secs_f64(rand::rng().random_range(from..to.max(from + 0.01)))
}

/// Runs the load on `stack` for `seconds` in the background.
fn start_load(
    stack: &Stack,
    rate: f64,
    seconds: u64,
) -> (Arc<load::Counts>, tokio::task::JoinHandle<()>) {
    let counts = Arc::new(load::Counts::default());
    let api = stack.api.clone();
    let c = counts.clone();
    let task =
        tokio::spawn(async move { load::run(&api, rate, Duration::from_secs(seconds), c).await });
    (counts, task)
}

async fn processed(stack: &Stack, group: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM consumers.processed_events WHERE group_id = $1")
            .bind(group)
            .fetch_one(&stack.pool)
            .await?,
    )
}

/// Waits up to `timeout` until `group` applies its next event: it has joined and is mid-stream.
async fn applying(stack: &Stack, group: &str, timeout: Duration) -> anyhow::Result<()> {
    let before = processed(stack, group).await?;
    keel_core::testkit::wait_until(&format!("{group} to apply an event"), timeout, || async {
        Ok(processed(stack, group).await? > before)
    })
    .await
}

/// Kills (SIGKILL) and restarts `instance` at a random moment of each round, while it works.
async fn kill_and_restart(stack: &mut Stack, instance: &str, period: f64) -> anyhow::Result<()> {
    tokio::time::sleep(moment(0.5, period - 2.0)).await;
    if GROUPS.contains(&instance)
        && applying(stack, instance, Duration::from_secs(10))
            .await
            .is_err()
    {
        return Ok(()); // the load is over: nothing to kill it in the middle of
    }
    stack.kill9(instance)?;
    tokio::time::sleep(moment(0.1, 1.5)).await;
    stack.spawn(instance)
}

/// The poison records the poison scenario injects: each must end in every group's dead-letter
/// topic, and block nothing.
fn poison() -> Vec<(&'static str, Option<Vec<u8>>)> {
    vec![
        ("random bytes", Some(b"\x13\x37 not avro at all".to_vec())),
        ("wrong magic byte", Some(vec![1, 0, 0, 0, 1, 2, 3])),
        (
            "unknown schema id",
            Some(vec![0, 0x7f, 0xff, 0xff, 0x00, 2, 4, 6]),
        ),
        ("truncated Avro", Some(vec![0, 0, 0, 0, 1])),
        ("tombstone", None),
    ]
}

async fn inject_poison(stack: &Stack, n: &mut usize) -> anyhow::Result<()> {
    let producer: FutureProducer =
        keel_core::kafka::producer_config(&keel_core::kafka::Kafka::new(&stack.brokers))
            .create()?;
    for (i, (_, value)) in poison().into_iter().enumerate() {
        let key = format!("poison-{i}");
        let mut record = FutureRecord::<str, [u8]>::to(&stack.orders_topic).key(&key);
        if let Some(v) = &value {
            record = record.payload(v);
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("injecting poison: {e}"))?;
        *n += 1;
    }
    Ok(())
}

/// One scenario, start to verdict.
async fn run_scenario(args: &Args, parts: &Parts, scenario: Scenario) -> anyhow::Result<Result_> {
    let name = scenario.name();
    let period = args.period as f64;
    let seconds = args.period * u64::from(args.rounds);
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    // A broker of the scenario's own: consumer-group state never carries over between
    // scenarios (tansu 0.6 did not expire, within minutes, a member that vanished; see
    // chaos/README.md). On SQLite where the broker restarts, so that its data survives.
    let storage = if scenario == Scenario::BrokerRestart {
        Storage::Sqlite
    } else {
        Storage::Memory
    };
    let (mut tansu, mock, broker) = match args.broker {
        Broker::Tansu => {
            let (p, broker) = start_tansu(parts, &format!("tansu-{name}"), storage).await?;
            (Some(p), None, broker)
        }
        Broker::Mock => {
            let mock = mock::Mock::start()?;
            let broker = mock.bootstrap.clone();
            (None, Some(mock), broker)
        }
    };
    let mut stack = Stack::start(
        parts,
        name,
        &broker,
        mock.as_ref(),
        scenario == Scenario::RegistryFlaky,
    )
    .await?;
    if scenario == Scenario::RollingDeploy {
        stack.spawn("relay-2")?;
    }
    if scenario == Scenario::TwoOfEach {
        stack.spawn("relay-2")?;
        for g in GROUPS.iter() {
            stack.spawn(&format!("{g}-2"))?;
        }
    }
    let rate = if scenario == Scenario::BrokerRestart {
        args.rate / 4.0
    } else {
        args.rate
    };
    let (counts, load) = start_load(&stack, rate, seconds);
    let mut poisoned = 0;
    // Orders the rolling-deploy scenario's older builds wrote: v1, JSON only.
    let mut older = [0, 0];
    let mut registry_faults = (0, 0);
    for round in 0..args.rounds {
        let round_start = Instant::now();
        match scenario {
            Scenario::RelayKill => kill_and_restart(&mut stack, "relay", period).await?,
            Scenario::GroupKill => {
                for g in GROUPS.iter() {
                    kill_and_restart(&mut stack, g, period / 4.0 + 2.0).await?;
                }
            }
            Scenario::Sigterm => {
                for instance in workers().into_iter().chain(["order-service"]) {
                    tokio::time::sleep(moment(0.2, period / 6.0)).await;
                    if let Err(e) = stack.terminate(instance) {
                        problems.push(format!("SIGTERM of {instance}: {e}"));
                    }
                    stack.spawn(instance)?;
                }
            }
            Scenario::TwoOfEach => {
                // One of each pair dies; the other takes over its partitions.
                let suffix = if round % 2 == 0 { "" } else { "-2" };
                for base in workers() {
                    tokio::time::sleep(moment(0.2, period / 5.0)).await;
                    let instance = format!("{base}{suffix}");
                    stack.kill9(&instance)?;
                    stack.spawn(&instance)?;
                }
            }
            Scenario::RollingDeploy => {
                // Older builds write beside this one while its instances replace each other
                // one by one: the relays first, then the groups and the order service.
                let per_round = 20;
                let from = older[0] + older[1];
                let half = deploy::place_and_settle(&stack, per_round / 2, from).await?;
                for instance in ["relay", "relay-2"] {
                    tokio::time::sleep(moment(0.2, period / 10.0)).await;
                    if let Err(e) = stack.terminate(instance) {
                        problems.push(format!("SIGTERM of {instance}: {e}"));
                    }
                    stack.spawn(instance)?;
                }
                let rest =
                    deploy::place_and_settle(&stack, per_round / 2, from + per_round / 2).await?;
                for instance in GROUPS.iter().copied().chain(["order-service"]) {
                    tokio::time::sleep(moment(0.2, period / 10.0)).await;
                    if let Err(e) = stack.terminate(instance) {
                        problems.push(format!("SIGTERM of {instance}: {e}"));
                    }
                    stack.spawn(instance)?;
                }
                for (total, (a, b)) in older.iter_mut().zip(half.into_iter().zip(rest)) {
                    *total += a + b;
                }
            }
            Scenario::Poison => {
                tokio::time::sleep(moment(0.5, period - 1.0)).await;
                inject_poison(&stack, &mut poisoned).await?;
            }
            Scenario::RedriveAfterPay => {
                tokio::time::sleep(moment(0.5, period / 3.0)).await;
                match redrive::round(&stack, round).await {
                    Ok(note) => notes.push(note),
                    Err(e) => problems.push(format!("redrive after pay, round {round}: {e:#}")),
                }
            }
            Scenario::PostgresOutage => {
                let away = cut(
                    &stack,
                    &stack.postgres,
                    "PostgreSQL",
                    args.outage,
                    &mut problems,
                )
                .await;
                notes.push(away);
            }
            Scenario::RedisOutage => {
                let away = cut(&stack, &stack.redis, "Redis", args.outage, &mut problems).await;
                notes.push(away);
            }
            Scenario::DependencyDegraded => {
                // Both answer, neither serves: PostgreSQL read-only (25006, a demoted primary)
                // and Redis loading its data (LOADING, a restart with persistence). Outages to
                // wait out, never dead letters.
                tokio::time::sleep(moment(0.5, 2.0)).await;
                let since = Instant::now();
                stack
                    .redis
                    .answer_redis_error(Some("LOADING Redis is loading the dataset in memory"));
                stack.set_read_only(true).await?;
                tokio::time::sleep(
                    Duration::from_secs(args.outage).saturating_sub(since.elapsed()),
                )
                .await;
                stack.set_read_only(false).await?;
                stack.redis.answer_redis_error(None);
                notes.push(format!(
                    "PostgreSQL read-only and Redis loading for {:.0} s",
                    since.elapsed().as_secs_f64()
                ));
            }
            Scenario::RegistryOutage => {
                tokio::time::sleep(moment(0.5, period / 3.0)).await;
                // The group restarted in the last round may still be joining (on the mock
                // cluster a rebalance can wait out the leaver's session): what is measured is
                // an inventory that runs, with its schemas cached.
                if let Err(e) = applying(&stack, GROUPS[0], Duration::from_secs(60)).await {
                    problems.push(format!("inventory did not apply before the outage: {e}"));
                }
                stack.kill9("registry")?;
                let before = processed(&stack, GROUPS[0]).await?;
                // A group starting while the registry is away must wait for it, not fail.
                let g = GROUPS[round as usize % GROUPS.len()];
                stack
                    .terminate(g)
                    .unwrap_or_else(|e| problems.push(format!("SIGTERM of {g}: {e}")));
                stack.spawn(g)?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                let during = processed(&stack, GROUPS[0]).await? - before;
                if g != GROUPS[0] && during <= 0 {
                    problems.push("inventory applied nothing while the registry was away: cached schemas did not keep it decoding".into());
                }
                notes.push(format!("inventory applied {during} with the registry away"));
                stack.spawn("registry")?;
                stack
                    .wait_ready("registry", Duration::from_secs(30))
                    .await?;
            }
            Scenario::RegistryFlaky => {
                // The groups and the relay restarted while the registry is flaky must fetch
                // their schemas through it (a running process has them cached).
                let proxy = stack
                    .flaky_registry
                    .as_ref()
                    .context("registry-flaky runs behind the flaky proxy")?;
                tokio::time::sleep(moment(0.5, 2.0)).await;
                let since = Instant::now();
                let before = proxy.faults();
                proxy.set_flaky(true);
                let round = round as usize;
                let restarted = [
                    "relay",
                    GROUPS[round % GROUPS.len()],
                    GROUPS[(round + 2) % GROUPS.len()],
                ];
                for instance in restarted {
                    if let Err(e) = stack.terminate(instance) {
                        problems.push(format!("SIGTERM of {instance}: {e}"));
                    }
                    stack.spawn(instance)?;
                }
                tokio::time::sleep(
                    Duration::from_secs(args.outage).saturating_sub(since.elapsed()),
                )
                .await;
                if let Some(proxy) = &stack.flaky_registry {
                    proxy.set_flaky(false);
                    let after = proxy.faults();
                    // The instances restarted in this window met both answers.
                    if after.0 == before.0 || after.1 == before.1 {
                        problems.push(format!(
                            "round {round}: the fault never bit: {} × 404 and {} × 500 answered",
                            after.0 - before.0,
                            after.1 - before.1
                        ));
                    }
                    registry_faults = after;
                }
                notes.push(format!(
                    "registry flaky for {:.0} s while {} restarted",
                    since.elapsed().as_secs_f64(),
                    restarted.join(", ")
                ));
            }
            Scenario::HttpAbuse => {
                tokio::time::sleep(moment(0.5, 2.0)).await;
                let abuse = abuse::run(&stack.api).await?;
                notes.push(format!(
                    "{} abusive requests, {} odd but valid orders",
                    abuse.requests, abuse.orders
                ));
                problems.extend(abuse.failures);
            }
            Scenario::BrokerDown => {
                let mock = mock
                    .as_ref()
                    .context("broker-down runs on the mock cluster")?;
                tokio::time::sleep(moment(0.5, period / 3.0)).await;
                let id = rand::rng().random_range(1..=mock::BROKERS);
                mock.down(id)?;
                tokio::time::sleep(Duration::from_secs(args.outage)).await;
                mock.up(id)?;
                notes.push(format!("broker {id} was down for {} s", args.outage));
            }
            Scenario::LeaderMove => {
                let mock = mock
                    .as_ref()
                    .context("leader-move runs on the mock cluster")?;
                let mut moved = 0;
                for _ in 0..3 {
                    tokio::time::sleep(moment(0.2, period / 3.0)).await;
                    for (topic, partitions) in &stack.partitions {
                        for partition in 0..*partitions {
                            let to = rand::rng().random_range(1..=mock::BROKERS);
                            mock.move_leader(topic, partition, to)?;
                            moved += 1;
                        }
                    }
                }
                notes.push(format!("{moved} leader moves"));
            }
            Scenario::BrokerRestart => {
                tokio::time::sleep(moment(1.0, period - 2.0)).await;
                if let Some(p) = tansu.take() {
                    p.kill9();
                }
                tokio::time::sleep(moment(0.5, 2.0)).await;
                let (p, _) = run_tansu(parts, &format!("tansu-{name}"), &broker, storage).await?;
                tansu = Some(p);
            }
        }
        stack.scrape_duplicates().await;
        let left = Duration::from_secs_f64(period).saturating_sub(round_start.elapsed());
        tokio::time::sleep(left).await;
    }
    load.await?;
    let dead_lettered_every_poison = |report: &Value| {
        scenario != Scenario::Poison
            || GROUPS.iter().all(|g| {
                report["groups"][g]["undecodable"].as_u64().unwrap_or(0) >= poisoned as u64
            })
    };
    let (report, drained_in) = stack
        .settle(
            Duration::from_secs(args.drain_timeout),
            dead_lettered_every_poison,
        )
        .await?;
    if report["ok"] != Value::Bool(true) {
        for c in report["checks"].as_array().into_iter().flatten() {
            if c["count"].as_u64().unwrap_or(0) > 0 {
                problems.push(format!(
                    "{}: {} (e.g. {})",
                    c["name"], c["count"], c["examples"]
                ));
            }
        }
        // Where the missing events are: skipped (the group went past them) or not reached.
        for g in GROUPS.iter() {
            match stack.where_missing(g).await {
                Ok(found) => notes.extend(found),
                Err(e) => notes.push(format!("{g}: cannot locate its missing events: {e:#}")),
            }
        }
    }
    if scenario == Scenario::Poison {
        for g in GROUPS.iter() {
            let undecodable = report["groups"][g]["undecodable"].as_u64().unwrap_or(0);
            if undecodable != poisoned as u64 {
                problems.push(format!(
                    "{g}: {undecodable} undecodable dead letters, {poisoned} injected"
                ));
            }
        }
    }
    if scenario == Scenario::RollingDeploy {
        notes.push(format!(
            "{} orders written by a v1 build, {} by a build before Avro outbox rows",
            older[0], older[1]
        ));
    }
    if scenario == Scenario::RegistryFlaky {
        let (not_found, failed) = registry_faults;
        notes.push(format!(
            "the registry answered {not_found} × 404 (a lagging replica) and {failed} × 500"
        ));
    }
    if matches!(
        scenario,
        Scenario::DependencyDegraded | Scenario::RegistryFlaky | Scenario::RollingDeploy
    ) {
        // Outages are waited out: not one record may have been dead-lettered for them.
        for g in GROUPS.iter() {
            let dead = report["groups"][g]["dead_lettered"].as_u64().unwrap_or(0);
            if dead > 0 {
                problems.push(format!(
                    "{g}: {dead} records dead-lettered during the outage"
                ));
            }
        }
    }
    if let Ok(errors) = counts.errors.lock() {
        problems.extend(errors.iter().take(10).cloned());
    }
    let placed = counts.placed.load(Ordering::Relaxed);
    notes.push(format!(
        "{} paid, {} cancelled; clients saw {} × 503 and {} × no answer, and retried",
        counts.paid.load(Ordering::Relaxed),
        counts.cancelled.load(Ordering::Relaxed),
        counts.unavailable.load(Ordering::Relaxed),
        counts.no_answer.load(Ordering::Relaxed),
    ));
    let duplicates = {
        stack.scrape_duplicates().await;
        stack.duplicates()
    };
    if let Err(e) = stack.stop().await {
        problems.push(e.to_string());
    }
    if let Some(p) = tansu {
        let _ = p.terminate();
    }
    drop(mock);
    let _ = std::fs::remove_file(parts.logs.join(format!("{}-tansu-{name}.db", parts.run)));
    Ok(Result_ {
        scenario,
        placed,
        report,
        duplicates,
        drained_in,
        problems,
        notes,
    })
}

/// Cuts `what` (behind `forwarder`) for `seconds` at a random moment, checking what the order
/// service answers meanwhile; says how long it was away.
async fn cut(
    stack: &Stack,
    forwarder: &keel_core::testkit::Outage,
    what: &str,
    seconds: u64,
    problems: &mut Vec<String>,
) -> String {
    tokio::time::sleep(moment(0.5, 2.0)).await;
    forwarder.set_down(true);
    let down = Instant::now();
    outage_checks(stack, problems, what).await;
    tokio::time::sleep(Duration::from_secs(seconds).saturating_sub(down.elapsed())).await;
    forwarder.set_down(false);
    format!("{what} away {:.0} s", down.elapsed().as_secs_f64())
}

/// While a dependency is away: the order API answers 503 (PostgreSQL) or keeps serving reads
/// (Redis), and `/ready` says so.
async fn outage_checks(stack: &Stack, problems: &mut Vec<String>, what: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let order = json!({"customer": {"id": "probe", "email": "probe@example.com", "name": "Probe"}, "currency": "EUR", "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price_minor": 100}]});
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        let status = http
            .post(format!("{}/orders", stack.api))
            .json(&order)
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        let ready = stack.ready("order-service").await;
        seen = match what {
            "PostgreSQL" => status == 503 && !ready,
            _ => status == 201,
        };
        if !seen {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    if !seen {
        problems.push(match what {
            "PostgreSQL" => {
                "PostgreSQL away: POST /orders did not answer 503 with /ready failing within 5 s"
                    .into()
            }
            _ => "Redis away: POST /orders did not keep working".into(),
        });
    }
}

#[derive(Clone, Copy)]
enum Storage {
    Memory,
    /// Data survives a kill -9 (and is about 100 times slower).
    Sqlite,
}

/// A tansu of the scenario's own on a free port; returns it and its address.
async fn start_tansu(
    parts: &Parts,
    name: &str,
    storage: Storage,
) -> anyhow::Result<(Process, String)> {
    let addr = format!("127.0.0.1:{}", keel_core::testkit::free_port()?);
    let _ = std::fs::remove_file(parts.logs.join(format!("{}-{name}.db", parts.run)));
    run_tansu(parts, name, &addr, storage).await
}

/// Starts tansu on `addr` (again, after a restart: SQLite storage keeps its data).
async fn run_tansu(
    parts: &Parts,
    name: &str,
    addr: &str,
    storage: Storage,
) -> anyhow::Result<(Process, String)> {
    let db = format!("{}-{name}.db", parts.run);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(parts.logs.join(format!("{}-{name}.log", parts.run)))?;
    let mut cmd = std::process::Command::new(var("CHAOS_TANSU")?);
    cmd.args([
        "broker",
        "--listener-url",
        &format!("tcp://{addr}"),
        "--advertised-listener-url",
        &format!("tcp://{addr}"),
        "--storage-engine",
        // Relative to the working directory: tansu reads `sqlite:///abs` as a relative path.
        &match storage {
            Storage::Memory => "memory://tansu/".to_owned(),
            Storage::Sqlite => format!("sqlite://{db}"),
        },
    ])
    .current_dir(&parts.logs)
    .stdout(std::process::Stdio::null())
    .stderr(log);
    let p = Process::spawn(name, cmd)?;
    let a = addr.to_owned();
    keel_core::testkit::wait_until("tansu to listen", Duration::from_secs(30), || {
        let a = a.clone();
        async move { Ok(tokio::net::TcpStream::connect(&a).await.is_ok()) }
    })
    .await?;
    Ok((p, addr.to_owned()))
}

fn row(r: &Result_) -> Vec<String> {
    let g = &r.report["groups"];
    let applied = |name: &str| g[name]["applied"].as_i64().unwrap_or(0).to_string();
    let dead: u64 = GROUPS
        .iter()
        .map(|n| {
            g[*n]["dead_lettered"].as_u64().unwrap_or(0)
                + g[*n]["undecodable"].as_u64().unwrap_or(0)
        })
        .sum();
    vec![
        r.scenario.name().to_owned(),
        r.placed.to_string(),
        g[GROUPS[0]]["expected"].as_i64().unwrap_or(0).to_string(),
        GROUPS
            .iter()
            .map(|name| applied(name))
            .collect::<Vec<_>>()
            .join("/"),
        r.duplicates.to_string(),
        dead.to_string(),
        format!("{:.1} s", r.drained_in.as_secs_f64()),
        if r.problems.is_empty() {
            "nothing lost, nothing doubled".into()
        } else {
            format!("FAILED ({})", r.problems.len())
        },
    ]
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(header.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if args.quick {
        args.rounds = 1;
        args.period = 5;
    }
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("keel-chaos: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let logs = std::path::PathBuf::from(var("CHAOS_LOGS")?);
    std::fs::create_dir_all(&logs)?;
    let parts = Parts {
        keel_bin: var("CHAOS_KEEL_BIN")?,
        postgres: var("CHAOS_POSTGRES")?,
        redis: var("CHAOS_REDIS")?,
        logs: logs.clone(),
        run: chrono::Utc::now().format("%Y%m%d%H%M%S").to_string(),
        settings: {
            let mut s = keel_core::Settings::from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
            // On tansu (a broker of each scenario's own) its wrong answers are worked around; the
            // mock cluster answers as Apache Kafka does.
            s.broker_quirks = match args.broker {
                Broker::Tansu => keel_core::settings::BrokerQuirks::Tansu,
                Broker::Mock => keel_core::settings::BrokerQuirks::None,
            };
            if args.broker == Broker::Mock {
                // Without static membership a killed instance's partitions wait for its
                // session to expire: 10 s, not the 45 s default.
                s.consumer.session_timeout = Duration::from_secs(10);
            }
            s
        },
        static_membership: args.broker == Broker::Tansu,
    };
    let chosen: Vec<Scenario> = Scenario::value_variants()
        .iter()
        .copied()
        .filter(|s| s.runs_on(args.broker))
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.name()))
        .collect();
    for o in &args.only {
        let known: Vec<&str> = Scenario::value_variants()
            .iter()
            .filter(|s| s.runs_on(args.broker))
            .map(|s| s.name())
            .collect();
        anyhow::ensure!(
            Scenario::parse(o).is_some_and(|s| s.runs_on(args.broker)),
            "--only: no scenario {o} on --broker {:?} (known: {})",
            args.broker,
            known.join(", ")
        );
    }
    let mut results = Vec::new();
    for scenario in chosen {
        let name = scenario.name();
        println!(
            "==> {name}: {} round(s) of {} s at {} orders/s",
            args.rounds, args.period, args.rate
        );
        let result = match run_scenario(&args, &parts, scenario).await {
            Ok(r) => r,
            Err(e) => Result_ {
                scenario,
                placed: 0,
                report: Value::Null,
                duplicates: 0,
                drained_in: Duration::ZERO,
                problems: vec![format!("the scenario could not run: {e:#}")],
                notes: vec![],
            },
        };
        for n in &result.notes {
            println!("    {n}");
        }
        for p in &result.problems {
            println!("    PROBLEM: {p}");
        }
        results.push(result);
    }
    println!();
    print_table(
        &[
            "SCENARIO",
            "ORDERS",
            "EVENTS",
            "APPLIED inv/notif/anal/cache",
            "DUPLICATES ABSORBED",
            "DEAD LETTERS",
            "DRAINED IN",
            "VERDICT",
        ],
        &results.iter().map(row).collect::<Vec<_>>(),
    );
    println!(
        "(duplicates absorbed: as counted by the instances' /metrics, read every round; an instance killed loses its last second)"
    );
    let json: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario.name(), "orders": r.placed, "audit": r.report,
                "duplicates_absorbed": r.duplicates, "drained_in_seconds": r.drained_in.as_secs_f64(),
                "problems": r.problems, "notes": r.notes,
            })
        })
        .collect();
    let file = logs.join(format!("{}.json", parts.run));
    std::fs::write(&file, serde_json::to_string_pretty(&json)?)?;
    println!("Results: {}", file.display());
    Ok(results.iter().all(|r| r.problems.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_name_parses_back_to_its_scenario() {
        for &s in Scenario::value_variants() {
            assert_eq!(
                Scenario::parse(s.name()),
                Some(s),
                "{s:?} as {:?}",
                s.name()
            );
        }
    }

    #[test]
    fn the_mock_cluster_family_is_the_scenarios_plus_its_own_faults() {
        let on = |b: Broker| -> Vec<&str> {
            Scenario::value_variants()
                .iter()
                .filter(|s| s.runs_on(b))
                .map(|s| s.name())
                .collect()
        };
        let (tansu, mock) = (on(Broker::Tansu), on(Broker::Mock));
        assert!(tansu.contains(&"broker-restart") && !mock.contains(&"broker-restart"));
        assert!(mock.contains(&"broker-down") && mock.contains(&"leader-move"));
        assert!(!tansu.contains(&"leader-move"));
        assert_eq!(
            tansu.len() + 1,
            mock.len(),
            "every other scenario runs on both"
        );
    }

    #[test]
    fn scenario_names_are_unique() {
        let names: std::collections::HashSet<&str> = Scenario::value_variants()
            .iter()
            .map(|s| s.name())
            .collect();
        assert_eq!(names.len(), Scenario::value_variants().len());
    }
}
