//! `keel audit` on a running backbone: it passes once every group has applied every event, and
//! each kind of damage (an effect applied twice, one lost, a lost invalidation, a poison record)
//! makes the check that guards against it fail, by name, with exit code 4.
//!
//! Its own test binary: the audit reads the production group ids (`inventory`, `notification`,
//! …), which no other test may use at the same time.

use std::time::Duration;

use keel_core::testkit::eventually;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::common::{Stack, keel, keel_run, order};

const AUDIT: &[&str] = &["audit", "--output", "json", "--opening-stock", "10000"];

/// The audit's report and exit code.
fn audit(stack: &Stack) -> (Option<i32>, Value) {
    let out = keel_run(stack, AUDIT);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "keel audit printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// The checks that failed, with their counts.
fn failed(report: &Value) -> Vec<(String, u64)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["count"].as_u64().unwrap() > 0)
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["count"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_passes_on_a_drained_backbone_and_names_each_kind_of_damage() {
    let stack = Stack::start().await;
    let services: Vec<_> = [
        &["relay"][..],
        &["consume", "inventory"],
        &["consume", "notification"],
        &["consume", "analytics"],
        &["consume", "cache-invalidation"],
    ]
    .iter()
    .map(|args| keel(&stack, args, &[]))
    .collect();

    let mut ids = Vec::new();
    for i in 0..9 {
        let created = stack
            .post(
                "/orders",
                order(json!([{"sku": format!("SKU-{}", 40 + i % 3), "quantity": 2, "unit_price_minor": 250}])),
            )
            .await;
        let id = created["id"].as_str().unwrap().to_owned();
        match i % 3 {
            0 => drop(stack.post(&format!("/orders/{id}/pay"), json!({})).await),
            1 => drop(stack.post(&format!("/orders/{id}/cancel"), json!({})).await),
            _ => {}
        }
        // Read through the cache, so that entries exist for the invalidations to replace.
        stack.get(&format!("/orders/{id}")).await;
        ids.push(id);
    }

    let report = eventually("the audit to pass", Duration::from_secs(90), || async {
        let (code, report) = audit(&stack);
        (code == Some(0)).then_some(report)
    })
    .await;
    assert_eq!(report["ok"], true);
    assert_eq!(report["orders"], 9);
    // 9 created, 3 paid, 3 cancelled.
    for g in ["inventory", "analytics", "cache-invalidation"] {
        assert_eq!(report["groups"][g]["expected"], 15, "{g}: {report}");
        assert_eq!(report["groups"][g]["applied"], 15, "{g}: {report}");
    }
    assert_eq!(report["groups"]["notification"]["applied"], 15);

    // Damage, each kind guarded by its own check.
    let paid = &ids[0];
    let created = &ids[2];
    let p = &stack.pool;
    // An effect applied twice: the stock taken again for a paid order.
    sqlx::query(
        "UPDATE inventory.stock SET on_hand = on_hand - 2
          WHERE sku = (SELECT sku FROM inventory.reservation_lines WHERE order_id = $1::uuid)",
    )
    .bind(paid)
    .execute(p)
    .await
    .unwrap();
    // A reservation's outcome published twice.
    sqlx::query(
        "INSERT INTO outbox.events (topic, message_key, event_type, event_id, payload, published_at)
         SELECT topic, message_key, event_type, gen_random_uuid(), payload, now()
           FROM outbox.events WHERE message_key = $1 AND topic = $2",
    )
    .bind(created)
    .bind(&stack.inventory.name)
    .execute(p)
    .await
    .unwrap();
    // An event analytics never applied (its dedupe row and its effect both gone).
    sqlx::query("DELETE FROM consumers.processed_events WHERE group_id = 'analytics' AND event_id = (SELECT event_id FROM outbox.events WHERE message_key = $1 AND event_type LIKE '%OrderPaid')")
        .bind(paid)
        .execute(p)
        .await
        .unwrap();
    sqlx::query("UPDATE analytics.orders SET paid_at = NULL WHERE order_id = $1::uuid")
        .bind(paid)
        .execute(p)
        .await
        .unwrap();
    // A receipt sent to another order's address.
    sqlx::query(
        "UPDATE notification.messages SET recipient = 'someone-else@example.com'
          WHERE order_id = $1::uuid AND kind = 'payment-receipt'",
    )
    .bind(paid)
    .execute(p)
    .await
    .unwrap();
    // Stock held for a paid order: its reservation left `reserved` (the payment never took the
    // stock out), the SKU's reserved and on-hand counts agreeing with it, so that only the
    // reservation's state shows it.
    let held = &ids[3];
    sqlx::query("UPDATE inventory.reservations SET status = 'reserved' WHERE order_id = $1::uuid")
        .bind(held)
        .execute(p)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE inventory.stock s SET reserved = s.reserved + l.quantity, on_hand = s.on_hand + l.quantity
           FROM inventory.reservation_lines l WHERE l.order_id = $1::uuid AND l.sku = s.sku",
    )
    .bind(held)
    .execute(p)
    .await
    .unwrap();
    // A lost invalidation: the cache holds an older version than the order.
    sqlx::query("UPDATE orders.orders SET version = version + 1 WHERE id = $1::uuid")
        .bind(created)
        .execute(p)
        .await
        .unwrap();

    let (code, report) = audit(&stack);
    assert_eq!(code, Some(4), "{report}");
    assert_eq!(report["ok"], false);
    let mut found = failed(&report);
    found.sort();
    let reservation = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "inventory.reservation")
        .map(|c| c["examples"].to_string())
        .unwrap_or_default();
    assert!(
        reservation.contains(held.as_str()) && reservation.contains("stock held for a paid order"),
        "{reservation}"
    );
    assert_eq!(
        found,
        vec![
            ("analytics.applied".to_owned(), 1),
            ("analytics.facts".to_owned(), 1),
            ("cache-invalidation.fresh".to_owned(), 1),
            ("inventory.on_hand".to_owned(), 1),
            ("inventory.outcomes".to_owned(), 1),
            ("inventory.reservation".to_owned(), 1),
            ("notification.recipient".to_owned(), 1),
        ],
        "{report}"
    );

    // A poison record is accounted for as an undecodable dead letter of every group reading it.
    let producer: FutureProducer = keel_core::kafka::producer_config(&keel_core::testkit::kafka())
        .create()
        .unwrap();
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&stack.orders.name)
                .key("poison")
                .payload(b"not avro".as_slice()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    eventually(
        "the poison record in every group's dead letters",
        Duration::from_secs(60),
        || async {
            let (_, report) = audit(&stack);
            [
                "inventory",
                "notification",
                "analytics",
                "cache-invalidation",
            ]
            .iter()
            .all(|g| report["groups"][g]["undecodable"] == 1)
            .then_some(())
        },
    )
    .await;
    // Gracefully: the groups leave, so later tests of the production group ids start afresh
    // (tansu does not expire a member that vanished without leaving).
    for service in services {
        service.terminate().expect("SIGTERM: exits 0");
    }
}
