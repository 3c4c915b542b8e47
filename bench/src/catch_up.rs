//! Scenario 4, consumer catch-up: each group works through a backlog, against a raw consumer
//! reading the same topic, the group's own transaction run without Kafka, and the limit: the
//! same effect as hand-written set-based SQL ([`crate::limit`]).

use std::time::{Duration, Instant};

use keel_consumers::Handler;
use keel_core::kafka;
use keel_core::testkit::wait_until;
use keel_schemas::Event;
use rdkafka::consumer::Consumer as _;
use serde_json::json;

use crate::bench::{Bench, encoded, produce_all, rate};
use crate::report;

/// Scenario 4: each group catches up on a backlog; baselines: a raw consumer reading the topic,
/// and the group's dedupe-and-apply SQL run without Kafka.
/// `write_path`: the order write path's orders per second measured in this run, if it ran:
/// each group's catch-up rate is also reported against it (issue 23: a backlog built at full
/// write load drains while the load goes on only if a group applies events ≥ 3× as fast).
pub(crate) async fn catch_up(
    bench: &Bench,
    write_path: Option<f64>,
    report: &mut report::Report,
) -> anyhow::Result<()> {
    let n = bench.args.backlog;
    // Every group but notification: the catch-up targets (bench/README.md) name the other three.
    let groups: Vec<&str> = keel_consumers::names()
        .into_iter()
        .filter(|g| *g != keel_consumers::notification::GROUP.name)
        .collect();
    if let Some(unknown) = bench
        .args
        .groups
        .iter()
        .find(|g| !groups.contains(&g.as_str()))
    {
        anyhow::bail!(
            "--groups: no catch-up for {unknown:?}; it runs {}",
            groups.join(", ")
        );
    }
    for group in groups {
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
        // Whatever an earlier scenario left (end-to-end's reservations) would reject orders here.
        reset_effects(bench, &events).await?;
        let started = Instant::now();
        match group {
            "inventory" => {
                let handler = keel_consumers::inventory::Inventory::new(&topics);
                apply_all(bench, &sql_group, &handler, &topic, &events).await?
            }
            "analytics" => {
                let handler = keel_consumers::analytics::Analytics::new();
                apply_all(bench, &sql_group, &handler, &topic, &events).await?
            }
            "cache-invalidation" => {
                let handler =
                    keel_consumers::cache_invalidation::CacheInvalidation::new(&bench.keel)?;
                apply_all(bench, &sql_group, &handler, &topic, &events).await?
            }
            other => anyhow::bail!("{other}: the bench has no SQL baseline for this group yet"),
        }
        let raw_sql = rate(n as f64, started.elapsed());
        reset_effects(bench, &events).await?;
        eprintln!("bench: {group}: raw SQL {raw_sql:.0}/s; the same effect set-based");

        // The limit: the effect written by hand, a few statements per batch (limit.rs).
        let set_based = crate::limit::set_based(
            bench,
            group,
            &format!("bench-limit-{group}"),
            &topic,
            &topics.inventory,
            &events,
        )
        .await?;
        reset_effects(bench, &events).await?;
        eprintln!("bench: {group}: set-based SQL {set_based:.0}/s; running the group");

        // The group, as a process.
        bench.dead_letters(&topics).await?;
        let service = bench.group(&format!("{group}-backlog"), group, |s| {
            s.topics = topics.clone()
        })?;
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
        reset_effects(bench, &events).await?;
        report.scenario(
            &format!("catch-up: {group}"),
            json!({"backlog": n, "group_per_s": keel, "raw_consume_per_s": raw_consume, "raw_sql_per_s": raw_sql, "set_based_sql_per_s": set_based}),
            keel / raw_consume.min(raw_sql),
            0.75,
        );
        // A group needs both parts: it cannot apply faster than the topic is read.
        report.target(
            &format!("catch-up ×limit: {group}"),
            keel / raw_consume.min(set_based),
            0.75,
            true,
        );
        if let Some(orders_per_s) = write_path {
            report.target(
                &format!("catch-up ×write: {group}"),
                keel / orders_per_s,
                3.0,
                true,
            );
        }
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
    let consumer: BaseConsumer = kafka::client_config(&kafka::Kafka::new(brokers))
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
    group: &str,
    handler: &H,
    topic: &str,
    events: &[Event],
) -> anyhow::Result<()> {
    let records: Vec<(Event, keel_consumers::Meta)> = events
        .iter()
        .cloned()
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
        keel_consumers::runtime::transact(&bench.pool, group, handler, batch)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(())
}

/// Empties the groups' effects so the next measurement applies everything afresh: the tables,
/// and the cache's tombstones of `events`' orders (a tombstone left at an event's version would
/// let the next run's script return without writing). Vacuums what the deletes left, so
/// autovacuum does not do it during the next measurement.
async fn reset_effects(bench: &Bench, events: &[Event]) -> anyhow::Result<()> {
    for sql in [
        "TRUNCATE inventory.reservation_lines, inventory.reservations",
        "UPDATE inventory.stock SET reserved = 0",
        "TRUNCATE analytics.order_lines, analytics.orders",
        "DELETE FROM outbox.events",
        "VACUUM (ANALYZE) consumers.processed_events, outbox.events, inventory.stock",
    ] {
        sqlx::query(sql).execute(&bench.pool).await?;
    }
    if let Some(url) = bench.keel.cache.redis_url.as_deref() {
        let mut cache = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        for chunk in events.chunks(1000) {
            let mut pipe = redis::pipe();
            for event in chunk {
                pipe.cmd("UNLINK")
                    .arg(keel_core::cache::key(event.aggregate_id()))
                    .ignore();
            }
            pipe.query_async::<()>(&mut cache).await?;
        }
    }
    Ok(())
}
