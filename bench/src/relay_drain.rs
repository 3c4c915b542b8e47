//! Scenario 1, relay drain: the relay publishes a backlog of pending outbox rows, against its own
//! claim-and-mark SQL loop without Kafka and a raw producer sending the same kind of bytes.

use std::time::{Duration, Instant};

use keel_core::testkit::wait_until;
use serde_json::json;
use sqlx::Row;

use crate::bench::{Bench, encoded, order_event, produce_all, rate};
use crate::report;

/// Scenario 1: the relay drains `rows` pending outbox rows; baselines: the claim-and-mark SQL
/// loop alone, and a raw producer sending the same kind of bytes.
pub(crate) async fn relay_drain(bench: &Bench, report: &mut report::Report) -> anyhow::Result<()> {
    let rows = bench.args.rows;
    let topic = bench.topic("drain").await?;
    let event = order_event(0);
    let template = serde_json::to_value(&event)?;
    // As `keel_outbox::enqueue` writes them: the Avro body under the writer's contract (one
    // body for all rows: the relay moves bytes and never looks inside), the contract once.
    let written = keel_schemas::write(&event).map_err(|e| anyhow::anyhow!(e))?;
    eprintln!("bench: seeding {rows} outbox rows");
    sqlx::query(
        "INSERT INTO outbox.schemas (fingerprint, record, schema) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(written.fingerprint)
    .bind(written.record.as_ref())
    .bind(written.schema.as_ref())
    .execute(&bench.pool)
    .await?;
    sqlx::query(
        "INSERT INTO outbox.events (topic, message_key, event_type, event_id, payload, schema_fingerprint, body)
         SELECT $1, k::text, 'keel.orders.OrderCreated', e,
                jsonb_set(jsonb_set($2::jsonb, '{OrderCreated,event_id}', to_jsonb(e::text)),
                          '{OrderCreated,order_id}', to_jsonb(k::text)),
                $4, $5
           FROM (SELECT gen_random_uuid() AS k, gen_random_uuid() AS e FROM generate_series(1, $3)) s",
    )
    .bind(&topic)
    .bind(&template)
    .bind(rows)
    .bind(written.fingerprint)
    .bind(&written.body)
    .execute(&bench.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox.events")
        .execute(&bench.pool)
        .await?;

    // (a) The relay's own statements (lock, claim, mark), without Kafka or decoding the rows,
    // with the relay's batch size and its commit (`synchronous_commit` off for the step).
    let batch_size = i64::try_from(bench.keel.relay.batch_size)?;
    let started = Instant::now();
    loop {
        let mut tx = bench.pool.begin().await?;
        let leader: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock($1) FROM set_config('synchronous_commit', 'off', true)",
        )
        .bind(keel_outbox::relay::RELAY_LOCK)
        .fetch_one(&mut *tx)
        .await?;
        anyhow::ensure!(
            leader,
            "not the relay leader: is a relay running on the bench's database?"
        );
        let ids: Vec<i64> = sqlx::query(keel_outbox::relay::CLAIM)
            .bind(batch_size)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| row.get("id"))
            .collect();
        if ids.is_empty() {
            break;
        }
        sqlx::query(keel_outbox::relay::MARK)
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
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
    let relay = bench.keel("relay-drain", &["relay"], |s| {
        s.topics.orders = topic.clone()
    })?;
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
        0.9,
    );
    Ok(())
}
