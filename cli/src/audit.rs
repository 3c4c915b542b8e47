//! `keel audit`: checks, from the source of truth, that every group applied every event's effect
//! exactly once. The promise is "at-least-once delivery, exactly-once effect"; this command is
//! how an operator (or `make chaos`) proves it holds, at any time, on a live system.
//!
//! The source of truth is the order service's tables and the outbox rows written with them in
//! the same transactions. The audit covers orders created within the outbox's retention
//! (`KEEL_OUTBOX_RETENTION_SECS`, or `--since`): all their events are still in the outbox.
//!
//! - relay: nothing pending, nothing set aside, every order has its events.
//! - every group: each event it wants was applied (a row in `consumers.processed_events`, written
//!   in the transaction of the effect) or is in its dead-letter topic; undecodable dead letters
//!   are counted (they belong to no order).
//! - inventory: one reservation per order, in the state the order's status implies, one outcome
//!   event per reservation attempt, `reserved` per SKU equal to what the reservations hold, and,
//!   given `--opening-stock`, `on_hand` equal to it minus what paid orders took.
//! - notification: a message for each applied event, to its own order's address; each one
//!   delivered or given up on.
//! - analytics: each order's facts as the orders table says.
//! - cache-invalidation: no cached entry older than its order.
//!
//! Exit 0: every check passed; 4: some check failed (the report says which and shows examples);
//! 1: the audit itself could not run.

use std::collections::{BTreeMap, HashSet};

use anyhow::Context;
use chrono::{DateTime, Utc};
use keel_consumers::{analytics, notification};
use keel_core::Settings;
use keel_schemas::events::Contract;
use keel_schemas::{InventoryRejected, InventoryReserved, OrderCancelled, OrderCreated, OrderPaid};
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::failure::Failure;
use crate::ops::{Output, table};

/// Examples shown per failed check.
const EXAMPLES: usize = 5;

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    /// What must hold.
    rule: &'static str,
    /// How many things break it (0: the check passed).
    count: usize,
    examples: Vec<String>,
}

#[derive(Debug, Serialize, Default)]
struct Tally {
    /// Events the group must apply.
    expected: i64,
    /// Of them, applied.
    applied: i64,
    /// Records in its dead-letter topics that decode to an event.
    dead_lettered: usize,
    /// Records in its dead-letter topics that do not decode (poison: they belong to no order).
    undecodable: usize,
}

struct Auditor {
    pool: PgPool,
    since: DateTime<Utc>,
    checks: Vec<Check>,
}

impl Auditor {
    /// Runs `sql` (one text column: what breaks `rule`; `$1` is the window's start, then `binds`)
    /// and records the check.
    async fn check(
        &mut self,
        name: &'static str,
        rule: &'static str,
        sql: &str,
        binds: &[Bind<'_>],
    ) -> anyhow::Result<()> {
        let mut query = sqlx::query_scalar::<_, String>(sql).bind(self.since);
        for b in binds {
            query = match b {
                Bind::Text(t) => query.bind(*t),
                Bind::Texts(t) => query.bind(t.clone()),
                Bind::Int(i) => query.bind(*i),
            };
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .with_context(|| format!("running check {name}"))?;
        self.record(name, rule, rows);
        Ok(())
    }

    fn record(&mut self, name: impl Into<String>, rule: &'static str, rows: Vec<String>) {
        self.checks.push(Check {
            name: name.into(),
            rule,
            count: rows.len(),
            examples: rows.into_iter().take(EXAMPLES).collect(),
        });
    }
}

enum Bind<'a> {
    Text(&'a str),
    Texts(Vec<String>),
    Int(i32),
}

/// The orders audited: created at or after `$1`.
const WINDOW: &str = "win AS (SELECT id, status, total_minor, currency, customer_email FROM orders.orders WHERE created_at >= $1)";

/// Every dead letter of `group`: event ids of those that decode, and how many do not.
async fn dead_letters(
    s: &Settings,
    pool: &PgPool,
    decoder: &keel_schemas::Decoder,
    group: &str,
) -> anyhow::Result<(HashSet<Uuid>, usize)> {
    let mut ids = HashSet::new();
    let mut undecodable = 0;
    for letter in crate::dlq::read(s, pool, group, None).await? {
        match decoder.decode(letter.payload()).await {
            Ok(event) => {
                ids.insert(event.event_id());
            }
            Err(
                keel_schemas::DecodeError::Permanent(_)
                | keel_schemas::DecodeError::UnknownType(_)
                | keel_schemas::DecodeError::UnknownSchema(_),
            ) => undecodable += 1,
            Err(keel_schemas::DecodeError::Transient(e)) => {
                anyhow::bail!("decoding a dead letter of {group}: {e} (is the registry up?)")
            }
        }
    }
    Ok((ids, undecodable))
}

/// `keel audit`: [`Failure::AuditFailed`] if a check found problems.
pub async fn audit(
    s: &Settings,
    since: Option<DateTime<Utc>>,
    opening_stock: Option<i32>,
    output: Output,
) -> Result<(), Failure> {
    match check_all(s, since, opening_stock, output).await? {
        0 => Ok(()),
        failed => Err(Failure::AuditFailed(failed)),
    }
}

/// Runs every check and prints the report; how many checks found problems.
async fn check_all(
    s: &Settings,
    since: Option<DateTime<Utc>>,
    opening_stock: Option<i32>,
    output: Output,
) -> anyhow::Result<usize> {
    // The cache check needs Redis: refuse before any other check runs.
    s.cache.require_redis()?;
    keel_consumers::migrate_all(s)
        .await
        .context("KEEL_DATABASE_URL")?;
    let pool = keel_core::db::pool(&s.database_url, 2)
        .await
        .context("KEEL_DATABASE_URL")?;
    let retention = chrono::Duration::from_std(s.relay.retention).unwrap_or(chrono::Duration::MAX);
    let since = since.unwrap_or_else(|| Utc::now() - retention);
    let mut a = Auditor {
        pool: pool.clone(),
        since,
        checks: Vec::new(),
    };
    let orders: i64 =
        sqlx::query_scalar("SELECT count(*) FROM orders.orders WHERE created_at >= $1")
            .bind(since)
            .fetch_one(&pool)
            .await?;

    // The relay.
    a.check(
        "outbox.pending",
        "every committed outbox row is published",
        "SELECT event_id::text FROM outbox.events WHERE published_at IS NULL AND failed_at IS NULL AND created_at >= $1 ORDER BY id",
        &[],
    )
    .await?;
    a.check(
        "outbox.set_aside",
        "no outbox row is set aside as unpublishable",
        "SELECT event_id::text || ': ' || coalesce(error, '') FROM outbox.events WHERE failed_at IS NOT NULL AND created_at >= $1 ORDER BY id",
        &[],
    )
    .await?;
    a.check(
        "orders.events",
        "every order has its OrderCreated, and OrderPaid or OrderCancelled as its status says",
        &format!(
            "WITH {WINDOW}
             SELECT o.id::text || ' lacks ' || t.type FROM win o
              CROSS JOIN LATERAL (VALUES ($2::text),
                  (CASE o.status WHEN 'paid' THEN $3::text WHEN 'cancelled' THEN $4::text END)) AS t (type)
              WHERE t.type IS NOT NULL AND NOT EXISTS (
                    SELECT 1 FROM outbox.events e
                     WHERE e.message_key = o.id::text AND e.event_type = t.type AND e.topic = $5)"
        ),
        &[
            Bind::Text(OrderCreated::NAME),
            Bind::Text(OrderPaid::NAME),
            Bind::Text(OrderCancelled::NAME),
            Bind::Text(&s.topics.orders),
        ],
    )
    .await?;

    // Every group: each wanted event applied or dead-lettered.
    let mut tallies = BTreeMap::new();
    let decoder = keel_schemas::Decoder::new(&s.schema_registry_url)?;
    for group in keel_consumers::GROUPS {
        let (dead, undecodable) = dead_letters(s, &pool, &decoder, group.name).await?;
        let dead_ids: Vec<String> = dead.iter().map(Uuid::to_string).collect();
        let mut tally = Tally {
            dead_lettered: dead.len(),
            undecodable,
            ..Tally::default()
        };
        let mut missing = Vec::new();
        for (topic, types) in (group.applies)(&s.topics) {
            let types: Vec<String> = types.into_iter().map(str::to_owned).collect();
            let rows: Vec<(String, bool)> = sqlx::query_as(&format!(
                "WITH {WINDOW}
                 SELECT e.event_id::text || ' (' || e.event_type || ', order ' || e.message_key || ')',
                        EXISTS (SELECT 1 FROM consumers.processed_events p
                                 WHERE p.group_id = $2 AND p.event_id = e.event_id)
                   FROM outbox.events e JOIN win o ON e.message_key = o.id::text
                  WHERE e.topic = $3 AND e.event_type = ANY($4) AND NOT (e.event_id::text = ANY($5))
                  ORDER BY e.id"
            ))
            .bind(since)
            .bind(group.name)
            .bind(&topic)
            .bind(&types)
            .bind(&dead_ids)
            .fetch_all(&pool)
            .await?;
            tally.expected += rows.len() as i64;
            for (event, applied) in rows {
                if applied {
                    tally.applied += 1;
                } else {
                    missing.push(event);
                }
            }
        }
        tally.expected += tally.dead_lettered as i64;
        a.record(
            format!("{}.applied", group.name),
            "every event the group wants is applied or dead-lettered",
            missing,
        );
        tallies.insert(group.name, tally);
    }

    // Inventory's effects.
    a.check(
        "inventory.reservation",
        "every order has one reservation, in the state its status implies",
        &format!(
            "WITH {WINDOW}
             SELECT o.id::text || ' is ' || o.status || ', reservation ' || coalesce(r.status, 'missing')
                    || CASE WHEN o.status = 'paid' AND r.status = 'reserved'
                            THEN ' (stock held for a paid order)' ELSE '' END
               FROM win o LEFT JOIN inventory.reservations r ON r.order_id = o.id
              WHERE r.status IS NULL OR r.status <> 'rejected' AND r.status <> CASE o.status
                    WHEN 'created' THEN 'reserved' WHEN 'paid' THEN 'fulfilled' ELSE 'released' END"
        ),
        &[],
    )
    .await?;
    a.check(
        "inventory.lines",
        "a reservation holds exactly the order's quantities",
        &format!(
            "WITH {WINDOW},
             wanted AS (SELECT l.order_id, l.sku, sum(l.quantity) AS quantity
                          FROM orders.order_lines l JOIN win o ON o.id = l.order_id GROUP BY 1, 2),
             held AS (SELECT l.order_id, l.sku, l.quantity::bigint AS quantity
                        FROM inventory.reservation_lines l JOIN win o ON o.id = l.order_id)
             SELECT DISTINCT coalesce(w.order_id, h.order_id)::text
               FROM wanted w FULL JOIN held h USING (order_id, sku)
               JOIN inventory.reservations r ON r.order_id = coalesce(w.order_id, h.order_id)
              WHERE (r.status IN ('rejected') AND h.quantity IS NOT NULL)
                 OR (r.status IN ('reserved', 'fulfilled') AND w.quantity IS DISTINCT FROM h.quantity)"
        ),
        &[],
    )
    .await?;
    a.check(
        "inventory.outcomes",
        "each reservation attempt published one outcome (InventoryReserved or InventoryRejected)",
        &format!(
            "WITH {WINDOW}
             SELECT o.id::text || ': ' || count(e.id) || ' outcome(s), reservation ' || r.status
               FROM win o JOIN inventory.reservations r ON r.order_id = o.id
               LEFT JOIN outbox.events e ON e.message_key = o.id::text AND e.topic = $2
                    AND e.event_type = ANY($3)
              GROUP BY o.id, r.status
             HAVING count(e.id) > 1
                 OR count(e.id) = 0 AND r.status IN ('reserved', 'fulfilled', 'rejected')
                 OR count(e.id) = 0 AND EXISTS (SELECT 1 FROM inventory.reservation_lines l WHERE l.order_id = o.id)"
        ),
        &[
            Bind::Text(&s.topics.inventory),
            Bind::Texts(vec![
                InventoryReserved::NAME.to_owned(),
                InventoryRejected::NAME.to_owned(),
            ]),
        ],
    )
    .await?;
    a.check(
        "inventory.reserved",
        "each SKU's reserved stock is what the open reservations hold (all orders)",
        "SELECT s.sku || ': reserved ' || s.reserved || ', reservations hold ' || coalesce(h.held, 0)
           FROM inventory.stock s
           LEFT JOIN (SELECT l.sku, sum(l.quantity) AS held FROM inventory.reservation_lines l
                        JOIN inventory.reservations r USING (order_id)
                       WHERE r.status = 'reserved' GROUP BY l.sku) h USING (sku)
          WHERE $1::timestamptz IS NOT NULL AND s.reserved <> coalesce(h.held, 0)
          ORDER BY s.sku",
        &[],
    )
    .await?;
    if let Some(opening) = opening_stock {
        a.check(
            "inventory.on_hand",
            "each SKU's stock on hand is the opening stock minus what paid orders took (all orders)",
            "SELECT s.sku || ': on hand ' || s.on_hand || ', expected ' || ($2 - coalesce(t.taken, 0))
               FROM inventory.stock s
               LEFT JOIN (SELECT l.sku, sum(l.quantity) AS taken FROM inventory.reservation_lines l
                            JOIN inventory.reservations r USING (order_id)
                           WHERE r.status = 'fulfilled' GROUP BY l.sku) t USING (sku)
              WHERE $1::timestamptz IS NOT NULL AND s.on_hand <> $2 - coalesce(t.taken, 0)
              ORDER BY s.sku",
            &[Bind::Int(opening)],
        )
        .await?;
    }

    // Notification's effects.
    a.check(
        "notification.messages",
        "each event notification applied has its message",
        "SELECT p.event_id::text FROM consumers.processed_events p
          WHERE p.group_id = $2 AND p.processed_at >= $1
            AND NOT EXISTS (SELECT 1 FROM notification.messages m WHERE m.event_id = p.event_id)",
        &[Bind::Text(notification::GROUP.name)],
    )
    .await?;
    a.check(
        "notification.recipient",
        "each message goes to the address its own order was placed with",
        &format!(
            "WITH {WINDOW}
             SELECT m.event_id::text || ' (' || m.kind || ' of ' || o.id::text || ') to ' || m.recipient
               FROM win o JOIN notification.messages m ON m.order_id = o.id
              WHERE m.recipient IS DISTINCT FROM o.customer_email AND m.recipient IS NOT NULL"
        ),
        &[],
    )
    .await?;
    a.check(
        "notification.delivery",
        "each message is delivered, or given up on with a reason",
        "SELECT event_id::text || ' (' || kind || ', ' || coalesce(recipient, 'no recipient yet')
                || coalesce(', last error: ' || last_error, '') || ')'
           FROM notification.messages
          WHERE created_at >= $1 AND delivered_at IS NULL AND failed_at IS NULL",
        &[],
    )
    .await?;

    // Analytics' facts.
    a.check(
        "analytics.facts",
        "each order's facts (total, currency, paid, cancelled, lines) match the orders table",
        &format!(
            "WITH {WINDOW}
             SELECT o.id::text FROM win o LEFT JOIN {schema}.orders a ON a.order_id = o.id
              WHERE a.order_id IS NULL OR a.created_at IS NULL
                 OR a.total_minor IS DISTINCT FROM o.total_minor OR a.currency IS DISTINCT FROM o.currency
                 OR (a.paid_at IS NOT NULL) <> (o.status = 'paid')
                 OR (o.status = 'paid' AND a.paid_amount_minor IS DISTINCT FROM o.total_minor)
                 OR (a.cancelled_at IS NOT NULL) <> (o.status = 'cancelled')
                 OR (SELECT count(*) FROM {schema}.order_lines l WHERE l.order_id = o.id)
                    <> (SELECT count(*) FROM orders.order_lines l WHERE l.order_id = o.id)",
            schema = analytics::DB_SCHEMA,
        ),
        &[],
    )
    .await?;

    // The cache: no entry older than its order.
    let versions: Vec<(Uuid, i32)> =
        sqlx::query_as("SELECT id, version FROM orders.orders WHERE created_at >= $1")
            .bind(since)
            .fetch_all(&pool)
            .await?;
    let cache = keel_core::cache::OrderCache::new(s.cache.require_redis()?, s.cache.ttl)?;
    let mut stale = Vec::new();
    for chunk in versions.chunks(1000) {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let cached = cache
            .versions(&ids)
            .await
            .context("reading cached versions (KEEL_REDIS_URL)")?;
        for ((id, version), cached) in chunk.iter().zip(cached) {
            if let Some(v) = cached.filter(|v| v < version) {
                stale.push(format!("{id}: cached version {v}, order at {version}"));
            }
        }
    }
    a.record(
        "cache-invalidation.fresh",
        "no cached order is older than the order",
        stale,
    );

    let failed = a.checks.iter().filter(|c| c.count > 0).count();
    match output {
        Output::Json => {
            let report = json!({
                "since": since.to_rfc3339(),
                "orders": orders,
                "groups": tallies,
                "checks": a.checks,
                "ok": failed == 0,
            });
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Output::Table => {
            println!("Orders created since {}: {orders}", since.to_rfc3339());
            let rows: Vec<Vec<String>> = tallies
                .iter()
                .map(|(g, t)| {
                    vec![
                        (*g).to_owned(),
                        t.expected.to_string(),
                        t.applied.to_string(),
                        t.dead_lettered.to_string(),
                        t.undecodable.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "GROUP",
                        "EXPECTED",
                        "APPLIED",
                        "DEAD-LETTERED",
                        "UNDECODABLE DEAD LETTERS"
                    ],
                    &rows
                )
            );
            println!();
            let rows: Vec<Vec<String>> = a
                .checks
                .iter()
                .map(|c| {
                    vec![
                        if c.count == 0 { "ok" } else { "FAILED" }.to_owned(),
                        c.name.to_owned(),
                        c.count.to_string(),
                        c.rule.to_owned(),
                    ]
                })
                .collect();
            print!("{}", table(&["", "CHECK", "PROBLEMS", "RULE"], &rows));
            for c in a.checks.iter().filter(|c| c.count > 0) {
                println!("\n{} ({}), e.g.:", c.name, c.count);
                for e in &c.examples {
                    println!("  {e}");
                }
            }
        }
    }
    pool.close().await;
    Ok(failed)
}
