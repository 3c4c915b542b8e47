//! The redrive-after-pay scenario's fault: an order whose `OrderCreated` inventory dead-letters
//! (its effect refused by the database for a while, as by a constraint a migration got wrong),
//! that the customer then pays, and that an operator redrives once the refusal is lifted. The
//! redriven creation reaches inventory after the payment: it must take the stock out once, as
//! in-order delivery does.

use std::time::Duration;

use anyhow::Context;
use keel_core::testkit::wait_until;
use serde_json::json;

use crate::stack::{OPENING_STOCK, Stack};

/// The refusal: reservations of `sku` fail in inventory's transaction.
async fn refuse(stack: &Stack, sku: &str) -> anyhow::Result<()> {
    let mut tx = stack.pool.begin().await?;
    sqlx::query("DROP TRIGGER IF EXISTS chaos_refuse ON inventory.reservation_lines")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE OR REPLACE FUNCTION public.chaos_refuse_line() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.sku = TG_ARGV[0] THEN
                 RAISE EXCEPTION 'chaos: reservations of % are refused', NEW.sku;
             END IF;
             RETURN NEW;
         END $$",
    )
    .execute(&mut *tx)
    .await?;
    // `sku` is this module's own, without quotes.
    sqlx::query(&format!(
        "CREATE TRIGGER chaos_refuse BEFORE INSERT ON inventory.reservation_lines
         FOR EACH ROW EXECUTE FUNCTION public.chaos_refuse_line('{sku}')"
    ))
    .execute(&mut *tx)
    .await?;
    // A SKU of its own, with the opening stock every SKU has.
    sqlx::query("INSERT INTO inventory.stock (sku, on_hand, reserved) VALUES ($1, $2, 0)")
        .bind(sku)
        .bind(OPENING_STOCK)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

async fn reservation(stack: &Stack, order: &str) -> anyhow::Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM inventory.reservations WHERE order_id = $1::uuid")
            .bind(order)
            .fetch_optional(&stack.pool)
            .await?,
    )
}

/// One round: refuse, order, wait for the dead letter, pay, lift, redrive; checks the stock.
/// Returns what happened, or the problem. The refusal is lifted whatever happens.
pub async fn round(stack: &Stack, round: u32) -> anyhow::Result<String> {
    let result = refused_round(stack, round).await;
    let lifted = sqlx::query("DROP TRIGGER IF EXISTS chaos_refuse ON inventory.reservation_lines")
        .execute(&stack.pool)
        .await;
    let note = result?;
    lifted?;
    Ok(note)
}

async fn refused_round(stack: &Stack, round: u32) -> anyhow::Result<String> {
    let sku = format!("SKU-REDRIVE-{round}");
    let quantity = 2;
    refuse(stack, &sku).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let counts = crate::load::Counts::default();
    let order = json!({
        "customer": {"id": format!("redrive-{round}"), "email": "redrive@example.com", "name": "Redrive"},
        "currency": "EUR",
        "lines": [{"sku": sku, "quantity": quantity, "unit_price_minor": 700}],
    });
    let key = uuid::Uuid::new_v4().to_string();
    let url = format!("{}/orders", stack.api);
    let created = crate::load::post(&http, &counts, &url, &order, Some(&key), None)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let id = created["id"]
        .as_str()
        .context("POST /orders answered without an id")?
        .to_owned();

    // Inventory spends its retry budget on the creation and dead-letters it.
    let dead_before = stack.dead_letters("inventory").await?;
    wait_until(
        "inventory to dead-letter the refused creation",
        Duration::from_secs(90),
        || async { Ok(stack.dead_letters("inventory").await? > dead_before) },
    )
    .await?;
    anyhow::ensure!(
        reservation(stack, &id).await?.is_none(),
        "the refused creation left a reservation"
    );

    // Paid before inventory ever applied the creation.
    let url = format!("{}/orders/{id}/pay", stack.api);
    let body = json!({"payment_reference": format!("redrive-{round}")});
    crate::load::post(&http, &counts, &url, &body, None, Some(409))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    wait_until(
        "inventory to remember the payment",
        Duration::from_secs(60),
        || async { Ok(reservation(stack, &id).await?.as_deref() == Some("paid")) },
    )
    .await?;

    // The refusal lifted, the operator redrives.
    sqlx::query("DROP TRIGGER chaos_refuse ON inventory.reservation_lines")
        .execute(&stack.pool)
        .await?;
    let out = stack
        .cli("redrive", &["dlq", "redrive", "inventory", "--all"])
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "keel dlq redrive inventory --all failed ({})",
        out.status
    );
    wait_until(
        "the redriven creation to take the stock out",
        Duration::from_secs(60),
        || async { Ok(reservation(stack, &id).await?.as_deref() == Some("fulfilled")) },
    )
    .await?;
    let (on_hand, reserved): (i32, i32) =
        sqlx::query_as("SELECT on_hand, reserved FROM inventory.stock WHERE sku = $1")
            .bind(&sku)
            .fetch_one(&stack.pool)
            .await?;
    anyhow::ensure!(
        on_hand == OPENING_STOCK - quantity && reserved == 0,
        "{sku}: on hand {on_hand}, reserved {reserved}; expected {} and 0",
        OPENING_STOCK - quantity
    );
    Ok(format!(
        "order {id} dead-lettered, paid, redriven: stock taken once"
    ))
}
