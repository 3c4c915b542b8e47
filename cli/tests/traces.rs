//! One request, followed: a `POST /orders` carrying the caller's `traceparent` yields one trace
//! across the order service, the relay and all four groups, with the parent/child relations the
//! OpenTelemetry messaging conventions describe. Spans go to an in-memory exporter.
//!
//! Its own test binary: the tracing subscriber is global to the process.

use std::time::Duration;

use keel_consumers::analytics::{self, Analytics};
use keel_consumers::cache_invalidation::{self, CacheInvalidation};
use keel_consumers::inventory::{self, Inventory};
use keel_consumers::notification::{self, Notification};
use keel_core::testkit::{eventually, unique};
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[path = "e2e/common/mod.rs"]
mod common;

use common::{Stack, order};

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_post_is_one_trace_across_the_service_the_relay_and_every_group() {
    let exporter = InMemorySpanExporter::default();
    keel_core::telemetry::init_with_exporter("keel-test", exporter.clone());
    assert!(keel_core::telemetry::recording());

    let stack = Stack::start().await;
    let topics = &stack.settings.topics;
    let groups = [
        unique("inventory"),
        unique("notification"),
        unique("analytics"),
        unique("cache"),
    ];
    let inventory = Inventory::new(topics);
    let cache = CacheInvalidation::new(&stack.settings).unwrap();
    let as_group = |g: &keel_consumers::Group, id: &str| stack.as_group(g, id);
    let stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(stack.relay().run(stop.clone())),
        tokio::spawn(
            stack
                .consumer(as_group(&inventory::GROUP, &groups[0]), inventory)
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(as_group(&notification::GROUP, &groups[1]), Notification)
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(as_group(&analytics::GROUP, &groups[2]), Analytics::new())
                .await
                .run(stop.clone()),
        ),
        tokio::spawn(
            stack
                .consumer(as_group(&cache_invalidation::GROUP, &groups[3]), cache)
                .await
                .run(stop.clone()),
        ),
    ];

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = stack
        .http
        .post(format!("{}/orders", stack.api))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&order(
            json!([{"sku": "SKU-9", "quantity": 1, "unit_price_minor": 700}]),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let order_id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Inventory's reservation is a second hop: notification reads it from the inventory topic.
    let consumed = |spans: &[SpanData]| {
        spans
            .iter()
            .filter(|s| s.span_kind == SpanKind::Consumer)
            .count()
    };
    let spans = eventually(
        "a process span per group and hop",
        Duration::from_secs(60),
        || {
            let exporter = exporter.clone();
            async move {
                let spans = exporter.get_finished_spans().ok()?;
                (consumed(&spans) >= 5).then_some(spans)
            }
        },
    )
    .await;
    let trace = TraceId::from_hex(caller_trace).unwrap();
    let ours: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect();

    // The order service's server span continues the caller's trace.
    let server: Vec<&&SpanData> = ours
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .collect();
    assert_eq!(server.len(), 1, "{ours:#?}");
    let server = server[0];
    assert_eq!(server.name, "POST /orders");
    assert_eq!(
        server.parent_span_id,
        SpanId::from_hex(caller_span).unwrap()
    );
    assert_eq!(
        attribute(server, "http.response.status_code").as_deref(),
        Some("201")
    );

    // The relay's producer span is the server span's child and names where the record went.
    let publish: Vec<&&SpanData> = ours
        .iter()
        .filter(|s| s.span_kind == SpanKind::Producer)
        .collect();
    let to_orders: Vec<&&&SpanData> = publish
        .iter()
        .filter(|s| {
            attribute(s, "messaging.destination.name").as_deref()
                == Some(stack.orders.name.as_str())
        })
        .collect();
    assert_eq!(to_orders.len(), 1, "{publish:#?}");
    let to_orders = to_orders[0];
    assert_eq!(to_orders.parent_span_id, server.span_context.span_id());
    assert_eq!(
        attribute(to_orders, "messaging.system").as_deref(),
        Some("kafka")
    );
    assert_eq!(
        attribute(to_orders, "messaging.kafka.message.key").as_deref(),
        Some(order_id.as_str())
    );
    assert!(attribute(to_orders, "messaging.kafka.offset").is_some());

    // Every group's consumer span is the producer span's child, in the same trace.
    for group in &groups {
        let process: Vec<&&SpanData> = ours
            .iter()
            .filter(|s| {
                s.span_kind == SpanKind::Consumer
                    && attribute(s, "messaging.consumer.group.name").as_deref()
                        == Some(group.as_str())
                    && attribute(s, "messaging.destination.name").as_deref()
                        == Some(stack.orders.name.as_str())
            })
            .collect();
        assert_eq!(process.len(), 1, "group {group}: {ours:#?}");
        let process = process[0];
        assert_eq!(
            process.parent_span_id,
            to_orders.span_context.span_id(),
            "group {group}"
        );
        assert_eq!(
            attribute(process, "keel.outcome").as_deref(),
            Some("applied"),
            "group {group}"
        );
        assert_eq!(
            attribute(process, "messaging.message.id"),
            attribute(to_orders, "messaging.message.id"),
        );
        // The transaction is the process span's child.
        assert!(
            ours.iter().any(|s| s.name == "BEGIN consumers"
                && s.parent_span_id == process.span_context.span_id()),
            "group {group}: no transaction span"
        );
    }

    // Second hop: inventory's outcome, published through the outbox from inside its consumer
    // span, is consumed by notification in the same trace.
    let inventory_process = ours
        .iter()
        .find(|s| {
            s.span_kind == SpanKind::Consumer
                && attribute(s, "messaging.consumer.group.name").as_deref()
                    == Some(groups[0].as_str())
        })
        .unwrap();
    let to_inventory = publish
        .iter()
        .find(|s| {
            attribute(s, "messaging.destination.name").as_deref()
                == Some(stack.inventory.name.as_str())
        })
        .expect("inventory's outcome published in the same trace");
    assert_eq!(
        to_inventory.parent_span_id,
        inventory_process.span_context.span_id()
    );
    let notified = ours
        .iter()
        .find(|s| {
            s.span_kind == SpanKind::Consumer
                && attribute(s, "messaging.destination.name").as_deref()
                    == Some(stack.inventory.name.as_str())
        })
        .expect("notification consumed the outcome in the same trace");
    assert_eq!(notified.parent_span_id, to_inventory.span_context.span_id());

    // The cache group's Redis call is a child of its transaction.
    assert!(
        ours.iter().any(
            |s| s.name == "redis" || attribute(s, "db.system.name").as_deref() == Some("redis")
        )
    );

    stop.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}
