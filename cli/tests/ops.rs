//! Day-2 commands against a running backbone: lag, replay (refused while the group runs, then a
//! replay that changes no effect), outbox status.

use std::process::{Command, Output};
use std::time::Duration;

use keel_core::testkit::{brokers, eventually};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod common;

use common::{Stack, keel, order};

/// Runs `keel <args>` to completion against `stack`.
fn keel_run(stack: &Stack, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .envs(stack.env())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn analytics(stack: &Stack) -> Vec<(String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT currency, orders, revenue_minor, cancellations FROM analytics.daily ORDER BY day, currency",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_replay_is_refused_while_the_group_runs_and_changes_no_effect_when_done() {
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let mut consumer = keel(&stack, &["consume", "analytics"], &[]);
    let mut events = 0i64;
    for i in 0..12 {
        let created = stack
            .post(
                "/orders",
                order(json!([{"sku": "SKU-30", "quantity": 1, "unit_price_minor": 100 + i}])),
            )
            .await;
        events += 1;
        let id = created["id"].as_str().unwrap();
        if i % 2 == 0 {
            stack.post(&format!("/orders/{id}/pay"), json!({})).await;
            events += 1;
        }
    }
    let topics = [stack.orders.name.as_str()];
    eventually("analytics to catch up", Duration::from_secs(90), || async {
        (keel_core::kafka::lag(&brokers(), "analytics", &topics).ok()? == 0
            && stack.processed("analytics").await == events)
            .then_some(())
    })
    .await;
    let before = analytics(&stack).await;
    assert_eq!(before.iter().map(|r| r.1).sum::<i64>(), 12);

    let lag = json_of(&keel_run(&stack, &["lag", "analytics", "--output", "json"]));
    let rows = lag.as_array().unwrap();
    assert_eq!(rows.len(), 6, "one row per partition");
    assert!(
        rows.iter()
            .all(|r| r["lag"] == 0 && r["group"] == "analytics")
    );
    let committed = |topics: [&str; 1]| -> Vec<i64> {
        keel_core::kafka::group_offsets(&brokers(), "analytics", &topics)
            .unwrap()
            .into_iter()
            .map(|p| p.committed.unwrap_or(p.low))
            .collect()
    };
    let caught_up = committed(topics);
    let lag_committed: Vec<i64> = rows
        .iter()
        .map(|r| {
            r["committed"]
                .as_i64()
                .or(r["start"].as_i64())
                .unwrap_or(-1)
        })
        .collect();
    assert_eq!(lag_committed, caught_up);

    // Refused while the consumer runs: exit 3, nothing moved.
    let busy = keel_run(&stack, &["replay", "analytics", "--from", "earliest"]);
    assert_eq!(
        busy.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(String::from_utf8_lossy(&busy.stderr).contains("live member"));

    assert!(consumer.terminate(), "the consumer stops cleanly");
    let plan = json_of(&keel_run(
        &stack,
        &[
            "replay",
            "analytics",
            "--from",
            "earliest",
            "--dry-run",
            "--output",
            "json",
        ],
    ));
    assert_eq!(plan["done"], false);
    let reread: i64 = plan["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reread"].as_i64().unwrap())
        .sum();
    let total: i64 = caught_up.iter().sum();
    assert_eq!(reread, total, "everything would be read again: {plan}");
    assert_eq!(total, events, "one offset per event on this topic");
    assert_eq!(
        keel_core::kafka::lag(&brokers(), "analytics", &topics).unwrap(),
        0,
        "a dry run moves nothing"
    );

    let done = json_of(&keel_run(
        &stack,
        &[
            "replay",
            "analytics",
            "--from",
            "earliest",
            "--wait",
            "30",
            "--output",
            "json",
        ],
    ));
    assert_eq!(done["done"], true);
    assert!(
        committed(topics).iter().all(|c| *c == 0),
        "back at the start"
    );

    let mut again = keel(&stack, &["consume", "analytics"], &[]);
    // Caught up when the committed offsets are back where they were (tansu 0.6 under-reports
    // end offsets, so lag against the end is not a reliable signal there).
    eventually("the replay to be read", Duration::from_secs(90), || async {
        (committed(topics) == caught_up).then_some(())
    })
    .await;
    assert!(again.terminate());
    assert_eq!(
        analytics(&stack).await,
        before,
        "a replay changes no effect"
    );
    assert_eq!(stack.processed("analytics").await, events);

    let status = json_of(&keel_run(&stack, &["outbox", "status", "--output", "json"]));
    assert_eq!(status["pending"], 0);
    assert_eq!(status["failed"], 0);
    stop.cancel();
    relay.await.unwrap().unwrap();
}

#[test]
fn replay_rejects_what_it_cannot_do_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["replay", "analytics", "--from", "yesterday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("RFC 3339"));
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["lag", "billing"])
        .env("KEEL_KAFKA_BROKERS", brokers())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("known groups: inventory"));
}
