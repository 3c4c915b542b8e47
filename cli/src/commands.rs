//! What each subcommand does: build the component from settings, run it until SIGTERM/Ctrl-C.

use anyhow::Context;
use keel_core::Settings;
use keel_core::shutdown;

use crate::args::{
    AnalyticsCommand, Command, DlqCommand, OutboxCommand, SchemaCommand, TopicsCommand,
};
use crate::failure::Failure;
use crate::{audit, dlq, ops, rebuild, topics};

/// Does what `command` says, with settings `s`.
pub async fn run(command: Command, s: &Settings) -> Result<(), Failure> {
    match command {
        Command::Migrate => migrate(s).await?,
        Command::Registry => registry(s).await?,
        Command::OrderService => order_service(s).await?,
        Command::Relay => relay(s).await?,
        Command::Consume { group } => consume(s, &group).await?,
        Command::Topics(TopicsCommand::Create { output }) => topics::create(s, output).await?,
        Command::Topics(TopicsCommand::List { output }) => topics::list(s, output)?,
        Command::Topics(TopicsCommand::Describe { output }) => topics::describe(s, output).await?,
        Command::Settings => print_settings()?,
        Command::Lag { group, output } => ops::lag(s, group.as_deref(), output)?,
        Command::Replay {
            group,
            from,
            topic,
            dry_run,
            wait,
            output,
        } => {
            ops::replay(
                s,
                &group,
                &from,
                topic.as_deref(),
                dry_run,
                wait.map(std::time::Duration::from_secs),
                output,
            )
            .await?
        }
        Command::Audit {
            since,
            opening_stock,
            output,
        } => audit::audit(s, since, opening_stock, output).await?,
        Command::Dlq(DlqCommand::List {
            group,
            topic,
            output,
        }) => dlq::list(s, &group, topic.as_deref(), output).await?,
        Command::Dlq(DlqCommand::Show { group, ids, output }) => {
            dlq::show(s, &group, &ids, output).await?
        }
        Command::Dlq(DlqCommand::Redrive {
            group,
            ids,
            all,
            dry_run,
            output,
        }) => dlq::redrive(s, &group, &ids, all, dry_run, output).await?,
        Command::Analytics(AnalyticsCommand::Rebuild {
            from,
            timeout,
            drop_missing,
            output,
        }) => {
            let timeout = std::time::Duration::from_secs(timeout);
            rebuild::rebuild(s, &from, timeout, drop_missing, output).await?
        }
        Command::Outbox(OutboxCommand::Status { output }) => ops::outbox_status(s, output).await?,
        Command::Outbox(OutboxCommand::Retry { ids, all, output }) => {
            ops::outbox_retry(s, &ids, all, output).await?
        }
        Command::Outbox(OutboxCommand::Discard { ids, output }) => {
            ops::outbox_discard(s, &ids, output).await?
        }
        Command::Schema(SchemaCommand::Check { dir }) => schema_check(&dir)?,
        Command::Schema(SchemaCommand::Publish { dir }) => schema_publish(&dir)?,
        Command::Schema(SchemaCommand::Register { dir, ids_from }) => {
            schema_register(s, &dir, ids_from.as_deref()).await?
        }
    }
    Ok(())
}

/// The name a command's process reports itself as in logs and traces: the service it runs.
pub fn service_name(command: &Command) -> String {
    match command {
        Command::OrderService => "keel-order-service".to_owned(),
        Command::Relay => "keel-relay".to_owned(),
        Command::Registry => "keel-registry".to_owned(),
        Command::Consume { group } => format!("keel-{group}"),
        _ => "keel".to_owned(),
    }
}

pub async fn migrate(s: &Settings) -> anyhow::Result<()> {
    let url = &s.database_url;
    keel_core::db::ensure_database(url)
        .await
        .context("KEEL_DATABASE_URL: cannot create or reach the database")?;
    keel_core::db::migrate(
        url,
        keel_schemas::registry::DB_SCHEMA,
        &keel_schemas::registry::MIGRATOR,
    )
    .await?;
    keel_core::db::migrate(url, keel_producers::DB_SCHEMA, &keel_producers::MIGRATOR).await?;
    keel_core::db::migrate(url, keel_outbox::DB_SCHEMA, &keel_outbox::MIGRATOR).await?;
    keel_consumers::migrate_all(s).await?;
    tracing::info!("Migrations applied");
    Ok(())
}

pub async fn registry(s: &Settings) -> anyhow::Result<()> {
    keel_core::db::ensure_database(&s.database_url)
        .await
        .context("KEEL_DATABASE_URL")?;
    let token = shutdown::on_signal();
    let (_, task) = keel_schemas::registry::spawn_with_auth(
        &s.database_url,
        s.registry_addr,
        s.registry_auth.clone(),
        token,
    )
    .await?;
    task.await?
}

pub async fn order_service(s: &Settings) -> anyhow::Result<()> {
    let app = keel_producers::Application::build(s).await?;
    app.run_until(shutdown::on_signal()).await
}

pub async fn relay(s: &Settings) -> anyhow::Result<()> {
    keel_core::db::migrate(
        &s.database_url,
        keel_outbox::DB_SCHEMA,
        &keel_outbox::MIGRATOR,
    )
    .await?;
    let pool = keel_core::db::pool(&s.database_url, 4).await?;
    let token = shutdown::on_signal();
    let admin = Admin::start(s, &token, pool.clone(), Vec::new()).await?;
    let result = async {
        let relay = keel_outbox::Relay::new(pool, s)?;
        let topics = [
            (s.topics.orders.as_str(), "keel.orders"),
            (s.topics.inventory.as_str(), "keel.inventory"),
        ];
        // A registry in trouble (down or not answering, its store failing, a proxy's 5xx, 429)
        // is waited for, as every group waits for it, each retry logged with the registry's
        // answer. Refused credentials (a configuration mistake) and a verdict on a contract
        // (incompatible, invalid) stop the relay at start-up with the reason.
        let mut backoff = keel_core::backoff::Backoff::new(
            std::time::Duration::from_millis(200),
            std::time::Duration::from_secs(10),
        );
        loop {
            match relay.prepare(&topics).await {
                Ok(()) => break,
                Err(e) if e.transient && !e.credentials_refused => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                        "The registry cannot take keel's contracts yet; retrying");
                    tokio::select! {
                        () = token.cancelled() => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(
                        "KEEL_SCHEMA_REGISTRY_URL: the registry did not accept keel's contracts",
                    ));
                }
            }
        }
        relay.run(token).await
    }
    .await;
    admin.stop().await;
    result
}

pub async fn consume(s: &Settings, group: &str) -> anyhow::Result<()> {
    let token = shutdown::on_signal();
    let pool = keel_core::db::pool(&s.database_url, 1)
        .await
        .context("KEEL_DATABASE_URL")?;
    let group = keel_consumers::group(group)?;
    let dead_letters = group.subscription(&s.topics).dead_letter_topics();
    let admin = Admin::start(s, &token, pool, dead_letters).await?;
    let result = (group.run)(s.clone(), token).await;
    admin.stop().await;
    result
}

/// The admin server beside a service: `/health`, `/ready` and `/metrics` on `KEEL_ADMIN_ADDR`,
/// if set. The service stops it after it stopped itself, so that `/ready` reports the shutdown
/// meanwhile.
struct Admin {
    stop: tokio_util::sync::CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Admin {
    /// Starts serving; ready until `shutdown` while PostgreSQL, the broker, the registry and
    /// the `topics` the service needs are there.
    async fn start(
        s: &Settings,
        shutdown: &tokio_util::sync::CancellationToken,
        pool: sqlx::PgPool,
        topics: Vec<String>,
    ) -> anyhow::Result<Self> {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut server = None;
        if let Some(addr) = s.admin_addr {
            let checks = keel_core::health::Checks::new(shutdown.clone(), s.liveness_timeout)
                .database(pool)
                .broker(&s.kafka)
                .topics(topics)
                .registry(&s.schema_registry_url);
            let (_, task) = keel_core::health::serve(addr, checks, stop.clone()).await?;
            server = Some(task);
        }
        Ok(Self { stop, server })
    }

    /// Stops the server and waits until it has (a scrape in progress is answered first): the
    /// process exits only after.
    async fn stop(self) {
        self.stop.cancel();
        let Some(server) = self.server else { return };
        match server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "Admin server failed"),
            Err(e) => tracing::warn!(error = %e, "Admin server task failed"),
        }
    }
}

pub fn print_settings() -> anyhow::Result<()> {
    for (key, default, doc) in keel_core::settings::KEYS {
        let current = keel_core::settings::shown(
            key,
            &std::env::var(key).unwrap_or_else(|_| default.to_string()),
        );
        println!("{key}={current}\n    {doc} (default: {default:?})");
    }
    // The librdkafka properties passed through (KEEL_KAFKA_<PROPERTY>), secrets masked.
    let mut passthrough: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("KEEL_KAFKA_")
                && !keel_core::settings::KEYS
                    .iter()
                    .any(|(known, _, _)| known == k)
        })
        .collect();
    passthrough.sort();
    for (key, value) in passthrough {
        let property = key["KEEL_KAFKA_".len()..]
            .to_ascii_lowercase()
            .replace('_', ".");
        let shown = if keel_core::kafka::is_secret(&property) {
            "***".to_owned()
        } else {
            keel_core::settings::redact(&value)
        };
        println!("{key}={shown}\n    librdkafka {property}, set on every Kafka client");
    }
    Ok(())
}

fn load_contracts(dir: &std::path::Path) -> anyhow::Result<keel_schemas::history::Repository> {
    keel_schemas::history::Repository::load(dir).with_context(|| {
        format!(
            "cannot read the contracts in {} (run from the repository root, or pass --dir)",
            dir.display()
        )
    })
}

pub fn schema_check(dir: &std::path::Path) -> anyhow::Result<()> {
    let repo = load_contracts(dir)?;
    let (report, ok) = keel_schemas::history::check(&repo);
    print!("{report}");
    anyhow::ensure!(
        ok,
        "the contracts do not pass the compatibility check (see above)"
    );
    Ok(())
}

pub fn schema_publish(dir: &std::path::Path) -> anyhow::Result<()> {
    let written = keel_schemas::history::publish(&load_contracts(dir)?)?;
    if written.is_empty() {
        println!("nothing to publish: every contract is its latest published version");
    }
    for path in written {
        println!("published {}", path.display());
    }
    Ok(())
}

pub async fn schema_register(
    s: &Settings,
    dir: &std::path::Path,
    ids_from: Option<&str>,
) -> anyhow::Result<()> {
    let repo = load_contracts(dir)?;
    for (topic, namespace) in [
        (&s.topics.orders, "keel.orders"),
        (&s.topics.inventory, "keel.inventory"),
    ] {
        let done = keel_schemas::history::register(
            &repo,
            &s.schema_registry_url,
            topic,
            namespace,
            ids_from,
        )
        .await
        .context(match ids_from {
            None => "KEEL_SCHEMA_REGISTRY_URL",
            Some(_) => "KEEL_SCHEMA_REGISTRY_URL, KEEL_SCHEMA_IDS_FROM",
        })?;
        for r in done {
            let ids: Vec<String> = r
                .ids
                .iter()
                .map(|(v, id)| format!("v{v}=id {id}"))
                .collect();
            println!("{} ({}): {}", r.subject, r.level, ids.join(", "));
        }
    }
    Ok(())
}
