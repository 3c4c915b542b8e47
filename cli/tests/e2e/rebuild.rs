//! `keel analytics rebuild` against a running backbone: the live group keeps consuming while the
//! rebuild reads the history, orders keep arriving, and the corrupted warehouse is replaced by one
//! equal to a direct computation over the order service's tables.
//!
//! Its own test binary: the rebuild uses the fixed group ids `analytics` and `analytics-rebuild`,
//! which no other test may share at the same time.

use std::process::Command;
use std::time::Duration;

use keel_core::testkit::eventually;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::common::{Stack, keel, order};

type Daily = Vec<(String, i64, i64, i64)>;
type Units = Vec<(String, i64, i64)>;

async fn warehouse(stack: &Stack) -> (Daily, Units, (i64, i64)) {
    let daily = sqlx::query_as(
        "SELECT currency, sum(orders)::bigint, sum(revenue_minor)::bigint, sum(cancellations)::bigint
           FROM analytics.daily GROUP BY currency ORDER BY currency",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let units = sqlx::query_as(
        "SELECT sku, units_ordered, units_sold FROM analytics.units_per_sku ORDER BY sku",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let conversion = sqlx::query_as("SELECT created, paid FROM analytics.conversion")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    (daily, units, conversion)
}

/// The same figures computed directly from `orders.orders` and `orders.order_lines`.
async fn truth(stack: &Stack) -> (Daily, Units, (i64, i64)) {
    let daily = sqlx::query_as(
        "SELECT currency, count(*), coalesce(sum(total_minor) FILTER (WHERE status = 'paid'), 0)::bigint,
                count(*) FILTER (WHERE status = 'cancelled')
           FROM orders.orders GROUP BY currency ORDER BY currency",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let units = sqlx::query_as(
        "SELECT l.sku, sum(l.quantity)::bigint, coalesce(sum(l.quantity) FILTER (WHERE o.status = 'paid'), 0)::bigint
           FROM orders.order_lines l JOIN orders.orders o ON o.id = l.order_id GROUP BY l.sku ORDER BY l.sku",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let conversion = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'paid') FROM orders.orders",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    (daily, units, conversion)
}

/// Places order `i`; pays every third, cancels every fifth other. Returns the events it caused.
async fn place(stack: &Stack, i: i64) -> i64 {
    let mut body = order(json!([
        {"sku": format!("SKU-R{}", i % 4), "quantity": 1 + i % 3, "unit_price_minor": 250 + i},
        {"sku": "SKU-RX", "quantity": 1, "unit_price_minor": 99}
    ]));
    if i % 2 == 1 {
        body["currency"] = json!("USD");
    }
    let created = stack.post("/orders", body).await;
    let id = created["id"].as_str().unwrap().to_owned();
    if i % 3 == 0 {
        stack.post(&format!("/orders/{id}/pay"), json!({})).await;
        2
    } else if i % 5 == 0 {
        stack.post(&format!("/orders/{id}/cancel"), json!({})).await;
        2
    } else {
        1
    }
}

/// Places orders `orders` on a stack with nothing placed yet and waits until the live analytics
/// group applied every event; how many there were.
async fn placed_and_applied(stack: &Stack, orders: std::ops::Range<i64>) -> i64 {
    let mut events = 0;
    for i in orders {
        events += place(stack, i).await;
    }
    eventually(
        "the live group to apply the orders",
        Duration::from_secs(90),
        || async { (stack.processed("analytics").await == events).then_some(()) },
    )
    .await;
    events
}

// Multi-threaded: the registry runs in this process and must answer while `keel` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_replaces_a_corrupted_warehouse_while_the_live_group_runs() {
    if keel_core::testkit::cluster::cannot(
        "ListGroups/DescribeGroups, which `keel analytics rebuild` asks to see that no rebuild runs",
    ) {
        return;
    }
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let live = keel(&stack, &["consume", "analytics"], &[]);
    let mut events = placed_and_applied(&stack, 0..40).await;
    assert_eq!(warehouse(&stack).await, truth(&stack).await);

    // Corrupt the live warehouse: wrong totals, lost lines, a phantom order.
    sqlx::query("UPDATE analytics.orders SET paid_at = NULL, total_minor = 1")
        .execute(&stack.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM analytics.order_lines WHERE line_no = 1")
        .execute(&stack.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO analytics.orders (order_id, currency, created_at) VALUES (gen_random_uuid(), 'EUR', now())",
    )
    .execute(&stack.pool)
    .await
    .unwrap();
    assert_ne!(warehouse(&stack).await, truth(&stack).await);

    // Orders keep coming while the rebuild runs.
    let rebuild = {
        let env = stack.env();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_keel"))
                // The phantom order is in no topic: the rebuild drops it only when told to.
                .args([
                    "analytics",
                    "rebuild",
                    "--drop-missing",
                    "--output",
                    "json",
                    "--timeout",
                    "240",
                ])
                .envs(env)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        })
    };
    for i in 40..60 {
        events += place(&stack, i).await;
    }
    let out = rebuild.await.unwrap();
    assert!(
        out.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["swapped"], true);
    assert!(report["orders"].as_i64().unwrap() >= 40, "{report}");

    // More after the swap: the live group writes into the rebuilt warehouse.
    for i in 60..70 {
        events += place(&stack, i).await;
    }
    eventually(
        "the live group to apply every event",
        Duration::from_secs(90),
        || async { (stack.processed("analytics").await == events).then_some(()) },
    )
    .await;
    let expected = truth(&stack).await;
    assert_eq!(expected.2, (70, 24), "the test's own arithmetic");
    eventually(
        "the warehouse to equal the orders",
        Duration::from_secs(30),
        || async { (warehouse(&stack).await == expected).then_some(()) },
    )
    .await;
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'analytics_rebuild'")
            .await,
        0,
        "the rebuild schema became the live one"
    );
    assert_eq!(stack.processed("analytics-rebuild").await, 0);

    // A second rebuild while nothing is corrupt changes nothing.
    let again = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["analytics", "rebuild", "--timeout", "240"])
        .envs(stack.env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("swapped in: 70 orders"));
    assert_eq!(warehouse(&stack).await, expected);

    live.terminate().expect("the live group exits 0 on SIGTERM");
    stop.cancel();
    relay.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rebuild_from_a_latest_offset_is_refused_with_the_reason() {
    let stack = Stack::start().await;
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["analytics", "rebuild", "--from", "latest"])
        .envs(stack.env())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("earliest or at a time"), "{stderr}");
    assert_eq!(
        stack
            .scalar("SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'analytics_rebuild'")
            .await,
        0,
        "nothing was started"
    );
}

// Multi-threaded: the registry runs in this process and must answer while `keel` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_that_would_drop_orders_the_topics_no_longer_hold_is_refused_naming_them() {
    if keel_core::testkit::cluster::cannot(
        "ListGroups/DescribeGroups, which `keel analytics rebuild` asks to see that no rebuild runs",
    ) {
        return;
    }
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let live = keel(&stack, &["consume", "analytics"], &[]);
    placed_and_applied(&stack, 0..5).await;
    // An order whose events retention already deleted from the topics: the live warehouse has
    // its facts, no rebuild can.
    let old: String = sqlx::query_scalar(
        "INSERT INTO analytics.orders (order_id, customer_id, currency, total_minor, created_at)
         VALUES (gen_random_uuid(), 'c-old', 'EUR', 1234, now() - interval '400 days')
         RETURNING order_id::text",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let before = warehouse(&stack).await;
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["analytics", "rebuild", "--timeout", "120"])
        .envs(stack.env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("lacks facts of 1 order(s)"), "{stderr}");
    assert!(stderr.contains(&old), "the order is named: {stderr}");
    assert!(stderr.contains("not swapping"), "{stderr}");
    assert_eq!(
        warehouse(&stack).await,
        before,
        "the live warehouse is untouched"
    );
    live.terminate().expect("the live group exits 0 on SIGTERM");
    stop.cancel();
    relay.await.unwrap().unwrap();
}
