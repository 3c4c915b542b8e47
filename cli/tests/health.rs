//! Health that means something: `/ready` follows the database (down → 503 naming it, back →
//! 200 by itself), `/health` fails only when a loop stops making progress, and `/metrics`
//! counts what the relay did. Its own test binary: liveness is process-wide.

use std::sync::Arc;
use std::time::Duration;

use keel_consumers::{Handler, HandlerError, Meta, Subscription};
use keel_core::testkit::{Outage, eventually, free_port, unique};
use keel_schemas::Event;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

#[path = "e2e/common/mod.rs"]
mod common;

use common::{Stack, fetch, keel, order};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_database_and_metrics_count_the_relay() {
    let stack = Stack::start().await;
    let (base, _) = stack.db.url.rsplit_once('/').unwrap();
    let host = base.rsplit_once('@').map_or(base, |(_, h)| h);
    let outage = Outage::forward(host).await;
    let forwarded = stack.db.url.replacen(host, &outage.addr.to_string(), 1);
    let admin = format!("127.0.0.1:{}", free_port().unwrap());
    let relay = keel(
        &stack,
        &["relay"],
        &[
            ("KEEL_DATABASE_URL", forwarded.as_str()),
            ("KEEL_ADMIN_ADDR", admin.as_str()),
        ],
    );
    let ready = format!("http://{admin}/ready");
    let body = keel_core::testkit::wait_ready(
        &stack.http,
        "the relay",
        &ready,
        Duration::from_secs(60),
        || relay.exited(),
    )
    .await
    .unwrap();
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "database": "ok", "broker": "ok", "registry": "ok"})
    );

    stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-3", "quantity": 1, "unit_price_minor": 10}])),
        )
        .await;
    let published = format!(
        "keel_relay_published_total{{topic=\"{}\"}} 1",
        stack.orders.name
    );
    let metrics = format!("http://{admin}/metrics");
    eventually(
        "the relay to count its publish",
        Duration::from_secs(60),
        || async {
            fetch(&stack.http, &metrics)
                .await
                .filter(|(_, text)| text.contains(&published))
        },
    )
    .await;

    outage.set_down(true);
    let (_, body) = eventually(
        "/ready to fail without the database",
        Duration::from_secs(30),
        || async { fetch(&stack.http, &ready).await.filter(|(s, _)| *s == 503) },
    )
    .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_ne!(body["database"], "ok", "{body}");
    assert_eq!(body["broker"], "ok");
    let (status, _) = fetch(&stack.http, &format!("http://{admin}/health"))
        .await
        .unwrap();
    assert_eq!(status, 200, "waiting for the database is not being stuck");

    outage.set_down(false);
    eventually(
        "/ready to recover by itself",
        Duration::from_secs(60),
        || async { fetch(&stack.http, &ready).await.filter(|(s, _)| *s == 200) },
    )
    .await;
    relay.terminate().expect("the relay exits 0 on SIGTERM");
}

/// A group whose handler waits until the test lets it go.
struct Stuck {
    release: Arc<Semaphore>,
}

impl Handler for Stuck {
    async fn handle(
        &self,
        _tx: &mut PgConnection,
        _event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        let permit = self
            .release
            .acquire()
            .await
            .map_err(|e| HandlerError::Transient(e.into()))?;
        permit.forget();
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_fails_while_a_loop_is_stuck_and_recovers_when_it_moves() {
    let stack = Stack::start().await;
    let stop = CancellationToken::new();
    let group = unique("stuck");
    let release = Arc::new(Semaphore::new(0));
    let consumer = stack
        .consumer(
            Subscription::new(&group, vec![stack.orders.name.clone()]),
            Stuck {
                release: release.clone(),
            },
        )
        .await;
    let checks = keel_core::health::Checks::new(stop.clone(), Duration::from_secs(2));
    let server_stop = CancellationToken::new();
    let (addr, server) =
        keel_core::health::serve("127.0.0.1:0".parse().unwrap(), checks, server_stop.clone())
            .await
            .unwrap();
    let health = format!("http://{addr}/health");
    let relay = tokio::spawn(stack.relay().run(stop.clone()));
    let consuming = tokio::spawn(consumer.run(stop.clone()));

    // Idle is not stuck: the loop beats while it waits for records.
    eventually(
        "the idle consumer to be live",
        Duration::from_secs(10),
        || async {
            fetch(&stack.http, &health)
                .await
                .filter(|(status, body)| {
                    *status == 200 && body.contains(&format!("consumer:{group}"))
                })
                .map(|_| ())
        },
    )
    .await;

    stack
        .post(
            "/orders",
            order(json!([{"sku": "SKU-4", "quantity": 1, "unit_price_minor": 10}])),
        )
        .await;
    let (_, body) = eventually(
        "/health to report the stuck loop",
        Duration::from_secs(60),
        || async { fetch(&stack.http, &health).await.filter(|(s, _)| *s == 503) },
    )
    .await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["stuck"], json!([format!("consumer:{group}")]));

    release.add_permits(1);
    eventually("/health to recover", Duration::from_secs(30), || async {
        fetch(&stack.http, &health).await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(stack.processed(&group).await, 1);

    // Shutting down: /ready says so while the server still answers.
    let ready = format!("http://{addr}/ready");
    assert_eq!(fetch(&stack.http, &ready).await.unwrap().0, 200);
    stop.cancel();
    let (status, body) = fetch(&stack.http, &ready).await.unwrap();
    assert_eq!(status, 503);
    assert!(body.contains(r#""shutting_down":true"#), "{body}");
    consuming.await.unwrap().unwrap();
    relay.await.unwrap().unwrap();
    server_stop.cancel();
    server.await.unwrap().unwrap();
}
