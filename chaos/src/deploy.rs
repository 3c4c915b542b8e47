//! The rolling-deploy scenario's older builds: orders written into the scenario's database as
//! the order service of an older build writes them, while this build's services run beside it
//! and restart one by one.
//! - **v1**: a build of version 1 of `OrderCreated`, which has no `channel` (the column keeps
//!   its default): the body is written under v1, and v1 travels with the row.
//! - **JSON only**: a build from before the outbox carried Avro bodies: the row holds the event
//!   as JSON only, which this build's relays encode under their own contract.
//!
//! Half of these orders are then paid and a quarter cancelled through this build's API, as when
//! an order placed on an old instance is paid on a new one.

use anyhow::Context;
use keel_core::telemetry::TraceHeaders;
use keel_producers::domain::{NewCustomer, NewLine, NewOrder};
use keel_schemas::Event;
use serde_json::json;
use uuid::Uuid;

use crate::stack::Stack;

/// Version 1 of `OrderCreated`, as the build that wrote it had it.
const ORDER_CREATED_V1: &str =
    include_str!("../../schemas/published/keel.orders.OrderCreated/v1.avsc");

/// The older writer a row is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Older {
    V1,
    JsonOnly,
}

/// Writes an order as `older` writes it; returns its id.
pub async fn place(stack: &Stack, older: Older, i: usize) -> anyhow::Result<Uuid> {
    let order = NewOrder {
        customer: NewCustomer {
            id: format!("older-{i}"),
            email: format!("older{i}@example.com"),
            name: "Older Build".into(),
        },
        currency: "EUR".into(),
        lines: vec![NewLine {
            sku: format!("SKU-{}", 1 + i % 50),
            quantity: 1,
            unit_price_minor: 500,
        }],
        // No channel: "web", the column's default, which is what a build without channels
        // stores.
        channel: None,
    };
    let valid = keel_producers::domain::validate(&order)
        .map_err(|errors| anyhow::anyhow!("the older build's order is invalid: {errors:?}"))?;
    let mut tx = stack.pool.begin().await?;
    let created = keel_producers::routes::insert_order(
        &mut tx,
        &stack.orders_topic,
        valid,
        &TraceHeaders::new(),
    )
    .await?;
    let key = created.id.to_string();
    match older {
        Older::V1 => {
            // This build's row, replaced by the one a v1 build writes in its place.
            let payload: serde_json::Value = sqlx::query_scalar(
                "DELETE FROM outbox.events WHERE message_key = $1 AND topic = $2 RETURNING payload",
            )
            .bind(&key)
            .bind(&stack.orders_topic)
            .fetch_one(&mut *tx)
            .await?;
            let event: Event =
                serde_json::from_value(payload.clone()).context("the order's event")?;
            let written = keel_schemas::write_under(&event, ORDER_CREATED_V1, Vec::new())
                .map_err(|e| anyhow::anyhow!(e))?;
            keel_outbox::enqueue_written(
                &mut tx,
                &stack.orders_topic,
                &keel_outbox::Outgoing {
                    key,
                    event_id: event.event_id(),
                    written,
                    payload,
                },
                &TraceHeaders::new(),
            )
            .await?;
        }
        Older::JsonOnly => {
            sqlx::query(
                "UPDATE outbox.events SET body = NULL, schema_fingerprint = NULL
                  WHERE message_key = $1 AND topic = $2",
            )
            .bind(&key)
            .bind(&stack.orders_topic)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(created.id)
}

/// Writes `n` orders as older builds (alternately v1 and JSON only), then pays half of them and
/// cancels a quarter through this build's API. Returns how many of each kind.
pub async fn place_and_settle(stack: &Stack, n: usize, from: usize) -> anyhow::Result<[usize; 2]> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let counts = crate::load::Counts::default();
    let mut written = [0, 0];
    for i in from..from + n {
        let older = if i % 2 == 0 {
            Older::V1
        } else {
            Older::JsonOnly
        };
        let id = place(stack, older, i).await?;
        written[usize::from(older == Older::JsonOnly)] += 1;
        let (action, body) = match i % 4 {
            0 | 1 => ("pay", json!({"payment_reference": format!("older-{i}")})),
            2 => ("cancel", json!({"reason": "placed on an old instance"})),
            _ => continue,
        };
        // The order service restarts during the scenario: the load's client retries.
        let url = format!("{}/orders/{id}/{action}", stack.api);
        crate::load::post(&http, &counts, &url, &body, None, Some(409))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(written)
}
