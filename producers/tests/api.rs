//! The order API over real HTTP and PostgreSQL.

use std::time::Duration;

use keel_core::cache::OrderCache;
use keel_core::testkit::{TestDb, redis_url};
use keel_producers::Application;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

struct App {
    url: String,
    http: reqwest::Client,
    pool: PgPool,
    shutdown: CancellationToken,
    _db: TestDb,
}

impl Drop for App {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn spawn_app() -> App {
    spawn_app_with(None).await
}

async fn spawn_app_with(cache: Option<(String, Duration)>) -> App {
    let db = TestDb::new().await;
    let mut settings = keel_core::Settings::local();
    settings.database_url = db.url.clone();
    settings.order_service_addr = "127.0.0.1:0".parse().unwrap();
    settings.topics.orders = "orders".into();
    settings.cache.redis_url = cache.as_ref().map(|(url, _)| url.clone());
    if let Some((_, ttl)) = cache {
        settings.cache.ttl = ttl;
    }
    settings.liveness_timeout = Duration::from_secs(60);
    let app = Application::build(&settings)
        .await
        .expect("order service builds");
    let url = format!("http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until(shutdown.clone()));
    App {
        url,
        http: reqwest::Client::new(),
        pool: db.pool().await,
        shutdown,
        _db: db,
    }
}

impl App {
    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap_or(Value::Null))
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn outbox_types(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT event_type FROM outbox.events ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

fn order() -> Value {
    json!({
        "customer": {"id": "c-1", "email": "ada@example.com", "name": "Ada Lovelace"},
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1999}, {"sku": "SKU-2", "quantity": 1, "unit_price_minor": 500}]
    })
}

#[tokio::test]
async fn an_order_and_its_event_are_written_together_with_the_callers_trace() {
    let app = spawn_app().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = app
        .http
        .post(format!("{}/orders", app.url))
        .header("traceparent", traceparent)
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["status"], "created");
    assert_eq!(created["total_minor"], 4498);
    assert_eq!(created["version"], 1);
    assert_eq!(
        location,
        format!("/orders/{}", created["id"].as_str().unwrap())
    );

    let (status, fetched) = app.get(&location).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, created);

    let (event_type, key, payload, headers): (String, String, Value, Value) =
        sqlx::query_as("SELECT event_type, message_key, payload, headers FROM outbox.events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(event_type, "keel.orders.OrderCreated");
    assert_eq!(key, created["id"].as_str().unwrap());
    assert_eq!(payload["OrderCreated"]["total_minor"], 4498);
    assert_eq!(payload["OrderCreated"]["lines"][1]["sku"], "SKU-2");
    // The stored context belongs to the caller's trace.
    let stored = headers["traceparent"].as_str().expect("traceparent stored");
    assert!(
        stored.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{stored}"
    );
}

#[tokio::test]
async fn pay_and_cancel_follow_the_state_machine() {
    let app = spawn_app().await;
    let (_, a) = app.post("/orders", &order()).await;
    let a_id = a["id"].as_str().unwrap();
    let (status, paid) = app
        .post(
            &format!("/orders/{a_id}/pay"),
            &json!({"payment_reference": "psp-42"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paid}");
    assert_eq!(
        (
            paid["status"].as_str(),
            paid["version"].as_i64(),
            paid["payment_reference"].as_str()
        ),
        (Some("paid"), Some(2), Some("psp-42"))
    );
    let (status, body) = app
        .post(&format!("/orders/{a_id}/cancel"), &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a paid order cannot be cancelled: {body}"
    );
    assert_eq!(
        app.post(&format!("/orders/{a_id}/pay"), &json!({})).await.0,
        StatusCode::CONFLICT
    );

    let (_, b) = app.post("/orders", &order()).await;
    let b_id = b["id"].as_str().unwrap();
    // No body at all is fine for cancel.
    let resp = app
        .http
        .post(format!("{}/orders/{b_id}/cancel", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = app.post(&format!("/orders/{b_id}/pay"), &json!({})).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "paying a cancelled order: {body}"
    );
    assert_eq!(body["error"], "conflict");
    assert!(body["message"].as_str().unwrap().contains("cancelled"));

    assert_eq!(
        app.outbox_types().await,
        [
            "keel.orders.OrderCreated",
            "keel.orders.OrderPaid",
            "keel.orders.OrderCreated",
            "keel.orders.OrderCancelled"
        ]
    );
    let missing = uuid::Uuid::new_v4();
    assert_eq!(
        app.get(&format!("/orders/{missing}")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        app.post(&format!("/orders/{missing}/pay"), &json!({}))
            .await
            .0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(app.get("/orders/not-a-uuid").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_field_and_writes_nothing() {
    let app = spawn_app().await;
    let mut missing = order();
    missing.as_object_mut().unwrap().remove("currency");
    let mut negative = order();
    negative["lines"][0]["quantity"] = json!(-3);
    let mut currency = order();
    currency["currency"] = json!("XYZ");
    let mut unknown_field = order();
    unknown_field["lines"][1]["discount"] = json!(5);
    let mut wrong_type = order();
    wrong_type["lines"][0]["unit_price_minor"] = json!("19.99");

    for (body, field) in [
        (missing, "currency"),
        (negative, "lines[0].quantity"),
        (currency, "currency"),
        (unknown_field, "lines[1].discount"),
        (wrong_type, "lines[0].unit_price_minor"),
    ] {
        let (status, resp) = app.post("/orders", &body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{resp}");
        assert_eq!(resp["field"], field, "{resp}");
        assert!(!resp["message"].as_str().unwrap().is_empty());
    }

    let send = |body: Vec<u8>, content_type: &'static str| {
        app.http
            .post(format!("{}/orders", app.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let resp = send(b"{\"customer\": ".to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "malformed_json"
    );

    let resp = send(order().to_string().into_bytes(), "text/plain")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(resp.json::<Value>().await.unwrap()["field"], "Content-Type");

    let mut huge = order();
    huge["customer"]["name"] = json!("x".repeat(1024 * 1024 + 1));
    let resp = send(huge.to_string().into_bytes(), "application/json")
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "payload_too_large"
    );

    let (status, resp) = app
        .post(
            "/orders/00000000-0000-0000-0000-000000000000/cancel",
            &json!({"reason": 7}),
        )
        .await;
    assert_eq!(
        (status, resp["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("reason"))
    );

    assert_eq!(app.count("orders.orders").await, 0);
    assert_eq!(app.count("orders.order_lines").await, 0);
    assert_eq!(app.count("outbox.events").await, 0);
}

#[tokio::test]
async fn a_retried_request_with_the_same_idempotency_key_creates_nothing_new() {
    let app = spawn_app().await;
    let post = |key: &'static str, body: Value| {
        let req = app
            .http
            .post(format!("{}/orders", app.url))
            .header("idempotency-key", key)
            .json(&body);
        async move {
            let resp = req.send().await.unwrap();
            (
                resp.status(),
                resp.headers().get("idempotent-replayed").is_some(),
                resp.json::<Value>().await.unwrap(),
            )
        }
    };
    let (s1, replayed1, first) = post("k-1", order()).await;
    let (s2, replayed2, second) = post("k-1", order()).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::CREATED));
    assert_eq!((replayed1, replayed2), (false, true));
    assert_eq!(first, second);

    let mut other = order();
    other["currency"] = json!("USD");
    let (status, _, body) = post("k-1", other).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key"))
    );

    // Concurrent retries: one order, one answer.
    let results = futures::future::join_all((0..8).map(|_| post("k-2", order()))).await;
    let ids: std::collections::HashSet<_> = results
        .iter()
        .map(|(s, _, b)| {
            assert_eq!(*s, StatusCode::CREATED);
            b["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(app.count("orders.orders").await, 2);
    assert_eq!(app.count("outbox.events").await, 2);
}

/// `POST path` with `Idempotency-Key: key`: status, whether it was a replay, body.
async fn post_keyed(app: &App, path: &str, key: &str, body: &Value) -> (StatusCode, bool, Value) {
    let resp = app
        .http
        .post(format!("{}{path}", app.url))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    (
        resp.status(),
        resp.headers().get("idempotent-replayed").is_some(),
        resp.json::<Value>().await.unwrap(),
    )
}

#[tokio::test]
async fn a_retried_payment_or_cancellation_with_its_key_replays_the_first_answer() {
    let app = spawn_app().await;
    let (_, paid) = app.post("/orders", &order()).await;
    let (_, cancelled) = app.post("/orders", &order()).await;
    let pay = format!("/orders/{}/pay", paid["id"].as_str().unwrap());
    let cancel = format!("/orders/{}/cancel", cancelled["id"].as_str().unwrap());

    let (s1, r1, first) = post_keyed(&app, &pay, "pay-1", &json!({})).await;
    let (s2, r2, again) = post_keyed(&app, &pay, "pay-1", &json!({})).await;
    assert_eq!((s1, r1), (StatusCode::OK, false), "{first}");
    assert_eq!(
        (s2, r2),
        (StatusCode::OK, true),
        "a retry replays, not 409: {again}"
    );
    assert_eq!(first, again);
    assert_eq!(first["status"], "paid");
    // Without the key, paying twice is the conflict it always was.
    assert_eq!(app.post(&pay, &json!({})).await.0, StatusCode::CONFLICT);
    // The key names one request: another body, or another route, is refused.
    let (status, _, body) =
        post_keyed(&app, &pay, "pay-1", &json!({"payment_reference": "x"})).await;
    assert_eq!(
        (status, body["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key"))
    );

    let reason = json!({"reason": "changed my mind"});
    let (s1, _, first) = post_keyed(&app, &cancel, "cancel-1", &reason).await;
    let (s2, replayed, again) = post_keyed(&app, &cancel, "cancel-1", &reason).await;
    assert_eq!((s1, s2, replayed), (StatusCode::OK, StatusCode::OK, true));
    assert_eq!(first, again);
    assert_eq!(
        app.count("outbox.events").await,
        4,
        "two creations, one payment, one cancellation"
    );
}

#[tokio::test]
async fn an_expired_idempotency_key_is_a_new_request_and_is_deleted() {
    let app = spawn_app().await;
    let (_, _, first) = post_keyed(&app, "/orders", "old", &order()).await;
    post_keyed(&app, "/orders", "fresh", &order()).await;
    // The first key's answer is older than the default time to live (a day).
    sqlx::query("UPDATE orders.idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'old'")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, replayed, second) = post_keyed(&app, "/orders", "old", &order()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    assert_ne!(first["id"], second["id"], "a new order");
    assert_eq!(app.count("orders.orders").await, 3);

    sqlx::query("UPDATE orders.idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'fresh'")
        .execute(&app.pool)
        .await
        .unwrap();
    let ttl = keel_core::Settings::local().idempotency_ttl;
    assert_eq!(
        keel_producers::idempotency::clean(&app.pool, ttl)
            .await
            .unwrap(),
        1
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT key FROM orders.idempotency_keys")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, vec!["old".to_owned()]);
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    let (status, body) = app.get("/health").await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("ok"))
    );
    let (status, body) = app.get("/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ready", "database": "ok"}));

    // Requests are counted by route template, not by path.
    let missing = format!("/orders/{}", uuid::Uuid::now_v7());
    assert_eq!(app.get(&missing).await.0, StatusCode::NOT_FOUND);
    let metrics = reqwest::get(format!("{}/metrics", app.url)).await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(
            r#"keel_http_requests_total{method="GET",route="/orders/{id}",status="404"}"#
        ),
        "{text}"
    );
    assert!(text.contains(
        r#"keel_http_request_duration_seconds_count{method="GET",route="/orders/{id}"}"#
    ));
}

/// Cache-aside with versions: a read fills the cache, the next read is served from it, an
/// invalidation at a newer version makes the next read fresh, and a slow reader that read the
/// older version before the invalidation cannot put it back.
#[tokio::test]
async fn reads_go_through_the_versioned_cache_and_a_stale_reader_cannot_undo_an_invalidation() {
    let ttl = Duration::from_secs(60);
    let app = spawn_app_with(Some((redis_url(), ttl))).await;
    let cache = OrderCache::new(&redis_url(), ttl).unwrap();
    let (status, created) = app.post("/orders", &order()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let uuid: uuid::Uuid = id.parse().unwrap();

    assert_eq!(
        cache.get(uuid).await.unwrap(),
        None,
        "nothing cached before the first read"
    );
    let (_, first) = app.get(&format!("/orders/{id}")).await;
    assert_eq!(first["version"], 1);
    let cached: Value =
        serde_json::from_str(&cache.get(uuid).await.unwrap().expect("filled")).unwrap();
    assert_eq!(cached, first);

    // Paid: PostgreSQL is at version 2, the cache still serves 1 until the invalidation.
    let (status, paid) = app.post(&format!("/orders/{id}/pay"), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{paid}");
    assert_eq!(app.get(&format!("/orders/{id}")).await.1["version"], 1);
    assert!(cache.invalidate(uuid, 2).await.unwrap());

    // The slow reader that fetched version 1 earlier tries to store it now: refused.
    assert!(!cache.put(uuid, 1, &first.to_string()).await.unwrap());
    let (_, fresh) = app.get(&format!("/orders/{id}")).await;
    assert_eq!(fresh["version"], 2);
    assert_eq!(fresh["status"], "paid");
    // That read filled the cache at version 2; a replayed older invalidation leaves it alone.
    assert!(!cache.invalidate(uuid, 1).await.unwrap());
    let cached: Value =
        serde_json::from_str(&cache.get(uuid).await.unwrap().expect("refilled")).unwrap();
    assert_eq!(cached["version"], 2);
}

#[tokio::test]
async fn past_its_capacity_the_service_sheds_load_at_once_and_writes_nothing_half() {
    let app = spawn_app().await;
    // Every admitted request blocks on the orders table until the lock goes.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE orders.orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let sent = 300;
    let requests: Vec<_> = (0..sent)
        .map(|_| {
            let req = app
                .http
                .post(format!("{}/orders", app.url))
                .json(&order())
                .send();
            tokio::spawn(async move {
                let resp = req.await.unwrap();
                let status = resp.status();
                (status, resp.json::<Value>().await.unwrap_or(Value::Null))
            })
        })
        .collect();
    // The requests past the limit are answered while the others wait, and health still answers.
    let (shed_so_far, health) = keel_core::testkit::eventually(
        "requests past the limit to be refused",
        Duration::from_secs(30),
        || async {
            let done = requests.iter().filter(|r| r.is_finished()).count();
            let health = app.get("/health").await.0;
            (done >= sent - 240).then_some((done, health))
        },
    )
    .await;
    assert_eq!(health, StatusCode::OK);
    lock.commit().await.unwrap();

    let mut created = 0;
    let mut overloaded = 0;
    for r in requests {
        let (status, body) = r.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::SERVICE_UNAVAILABLE if body["error"] == "overloaded" => overloaded += 1,
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    assert!(
        shed_so_far >= 60 && overloaded >= 60,
        "{overloaded} refused"
    );
    assert_eq!(created + overloaded, sent);
    assert_eq!(app.count("orders.orders").await, created as i64);
    assert_eq!(app.count("outbox.events").await, created as i64);
}
