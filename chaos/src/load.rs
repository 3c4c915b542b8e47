//! The load generator: orders at a steady rate (open loop: a slow answer does not delay the next
//! order), half of them paid and a quarter cancelled shortly after. A client that gets no answer
//! or a 503 retries, as a real one would: an order with the same `Idempotency-Key`, a payment or
//! cancellation again (a 409 on a retry means the first attempt went through).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

/// How long a client keeps retrying one request.
const GIVE_UP: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Counts {
    /// Orders the service confirmed (201).
    pub placed: AtomicU64,
    pub paid: AtomicU64,
    pub cancelled: AtomicU64,
    /// 503 answers (the service said: not now), each followed by a retry.
    pub unavailable: AtomicU64,
    /// Requests that got no answer (connection refused or cut, timeout), each retried.
    pub no_answer: AtomicU64,
    /// Requests that never succeeded, or got an answer a valid request must not get.
    pub errors: std::sync::Mutex<Vec<String>>,
}

impl Counts {
    fn error(&self, e: String) {
        if let Ok(mut errors) = self.errors.lock() {
            errors.push(e);
        }
    }
}

fn order_body(rng: &mut impl Rng, i: u64) -> Value {
    let lines: Vec<Value> = (0..rng.random_range(1..=3))
        .map(|_| {
            json!({
                "sku": format!("SKU-{}", rng.random_range(1..=50)),
                "quantity": rng.random_range(1..=3),
                "unit_price_minor": rng.random_range(100..=10_000),
            })
        })
        .collect();
    json!({
        "customer": {"id": format!("c-{}", i % 97), "email": format!("c{}@example.com", i % 97), "name": "Chaos Customer"},
        "currency": "EUR",
        "lines": lines,
    })
}

/// POSTs until an answer in `ok` (returned) or a non-retryable one (an error). `retry_ok`: also
/// accepted, but only on a retry.
pub async fn post(
    http: &reqwest::Client,
    counts: &Counts,
    url: &str,
    body: &Value,
    key: Option<&str>,
    retry_ok: Option<u16>,
) -> Result<Value, String> {
    let begun = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = http.post(url).json(body);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                if (200..300).contains(&status) {
                    return serde_json::from_str(&text).map_err(|e| {
                        format!("POST {url}: {status} with a body that is not JSON: {e}")
                    });
                }
                if attempt > 1 && Some(status) == retry_ok {
                    return Ok(Value::Null);
                }
                if status != 503 {
                    return Err(format!("POST {url}: {status} {text}"));
                }
                counts.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.no_answer.fetch_add(1, Ordering::Relaxed);
            }
        }
        if begun.elapsed() > GIVE_UP {
            return Err(format!("POST {url}: no success within {GIVE_UP:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One customer: places an order, then maybe pays or cancels it.
async fn customer(http: reqwest::Client, api: String, counts: Arc<Counts>, i: u64) {
    let (body, then) = {
        let mut rng = rand::rng();
        let roll: f64 = rng.random();
        (order_body(&mut rng, i), roll)
    };
    let key = uuid::Uuid::new_v4().to_string();
    let order = match post(
        &http,
        &counts,
        &format!("{api}/orders"),
        &body,
        Some(&key),
        None,
    )
    .await
    {
        Ok(order) => order,
        Err(e) => return counts.error(e),
    };
    counts.placed.fetch_add(1, Ordering::Relaxed);
    let Some(id) = order["id"].as_str() else {
        return counts.error(format!("POST /orders answered without an id: {order}"));
    };
    let (action, body) = if then < 0.5 {
        ("pay", json!({"payment_reference": format!("pay-{i}")}))
    } else if then < 0.75 {
        ("cancel", json!({"reason": "changed my mind"}))
    } else {
        return;
    };
    match post(
        &http,
        &counts,
        &format!("{api}/orders/{id}/{action}"),
        &body,
        None,
        Some(409),
    )
    .await
    {
        Ok(_) if action == "pay" => {
            counts.paid.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            counts.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => counts.error(e),
    }
}

/// Places `rate` orders a second for `duration`; returns when every customer is done.
pub async fn run(api: &str, rate: f64, duration: Duration, counts: Arc<Counts>) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(h) => h,
        Err(e) => return counts.error(format!("HTTP client: {e}")),
    };
    let interval = Duration::from_secs_f64(1.0 / rate);
    let begun = tokio::time::Instant::now();
    let mut customers = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while begun.elapsed() < duration {
        // Scheduled arrivals: the i-th order is due at i × interval whatever happened before.
        tokio::time::sleep_until(begun + interval * i as u32).await;
        customers.spawn(customer(http.clone(), api.to_owned(), counts.clone(), i));
        i += 1;
    }
    while customers.join_next().await.is_some() {}
}
