//! HTTP abuse, sent while the load runs: what a careless or hostile client sends. Each bad
//! request must get its 4xx with a JSON body naming the field and write nothing; each odd but
//! valid one must be stored exactly as sent; concurrent retries with one `Idempotency-Key` must
//! create one order.

use std::collections::HashSet;

use serde_json::{Value, json};

fn order(name: &str) -> Value {
    json!({
        "customer": {"id": "abuse", "email": "abuse@example.com", "name": name},
        "currency": "EUR",
        "lines": [{"sku": "SKU-7", "quantity": 1, "unit_price_minor": 500}],
    })
}

/// What, content type, body, the status expected and the field it must name.
type Bad = (
    &'static str,
    &'static str,
    Vec<u8>,
    u16,
    Option<&'static str>,
);

pub struct Outcome {
    pub requests: usize,
    /// Orders the abuse created on purpose (valid requests); the audit covers them like any.
    pub orders: usize,
    pub failures: Vec<String>,
}

/// Sends the abuse to `api`; `failures` says what was answered wrongly.
pub async fn run(api: &str) -> anyhow::Result<Outcome> {
    // A connection per request: the server closes one after refusing a body it did not read
    // (413), and a pooled client could send the next request into it as it closes.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let url = format!("{api}/orders");
    let mut out = Outcome {
        requests: 0,
        orders: 0,
        failures: Vec::new(),
    };

    let mut unknown = order("x");
    unknown["customer"]["admin"] = json!(true);
    let mut sql_sku = order("x");
    sql_sku["lines"][0]["sku"] = json!("SKU-1'; DROP TABLE orders.orders; --");
    let mut big_quantity = order("x");
    big_quantity["lines"][0]["quantity"] = json!(i64::MAX);
    let mut float_price = order("x");
    float_price["lines"][0]["unit_price_minor"] = json!(1e300);
    let bad: Vec<Bad> = vec![
        (
            "truncated JSON",
            "application/json",
            b"{\"customer\": {\"id\": ".to_vec(),
            400,
            None,
        ),
        (
            "not JSON at all",
            "application/json",
            b"DROP TABLE orders;".to_vec(),
            400,
            None,
        ),
        (
            "invalid UTF-8",
            "application/json",
            b"{\"currency\": \"\xff\xfe\"}".to_vec(),
            400,
            None,
        ),
        (
            "JSON array",
            "application/json",
            b"[1, 2, 3]".to_vec(),
            422,
            None,
        ),
        ("empty body", "application/json", Vec::new(), 400, None),
        (
            "form data",
            "application/x-www-form-urlencoded",
            b"currency=EUR".to_vec(),
            415,
            Some("Content-Type"),
        ),
        (
            "XML",
            "application/xml",
            b"<order/>".to_vec(),
            415,
            Some("Content-Type"),
        ),
        (
            "huge body",
            "application/json",
            order(&"x".repeat(2 * 1024 * 1024)).to_string().into_bytes(),
            413,
            None,
        ),
        (
            "unknown field",
            "application/json",
            unknown.to_string().into_bytes(),
            422,
            Some("customer.admin"),
        ),
        (
            "quantity overflow",
            "application/json",
            big_quantity.to_string().into_bytes(),
            422,
            Some("lines[0].quantity"),
        ),
        (
            "float price",
            "application/json",
            float_price.to_string().into_bytes(),
            422,
            Some("lines[0].unit_price_minor"),
        ),
        (
            "NUL in a name",
            "application/json",
            order("nul\u{0}byte").to_string().into_bytes(),
            422,
            Some("customer.name"),
        ),
    ];
    for (what, content_type, body, status, field) in bad {
        out.requests += 1;
        let resp = http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await;
        let (got, json) = match resp {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json::<Value>().await.ok())
            }
            Err(e) => {
                out.failures.push(format!("{what}: no answer ({e})"));
                continue;
            }
        };
        let named = json.as_ref().and_then(|j| j["field"].as_str());
        let has_error = json.as_ref().is_some_and(|j| j["error"].is_string());
        if got != status || !has_error || (field.is_some() && named != field) {
            out.failures.push(format!(
                "{what}: expected {status} naming {field:?}, got {got} {}",
                json.map(|j| j.to_string())
                    .unwrap_or_else(|| "(no JSON body)".into())
            ));
        }
    }

    // Odd but valid: stored exactly as sent.
    for name in [
        "Robert'); DROP TABLE orders.orders;--",
        "' OR 1=1 --",
        "Zoë Ångström-Ñúñez",
        "名前 テスト",
        "مرحبا بالعالم",
        "e\u{301}\u{301}\u{301} (combining marks)",
        "zero\u{200b}width\u{200d}joiner",
        "🦀🚢 \u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
        "\u{FEFF}byte order mark",
    ] {
        out.requests += 2;
        let created = http.post(&url).json(&order(name)).send().await?;
        let status = created.status().as_u16();
        let body: Value = created.json().await.unwrap_or(Value::Null);
        let Some(id) = body["id"].as_str().filter(|_| status == 201) else {
            out.failures.push(format!(
                "valid name {name:?}: expected 201, got {status} {body}"
            ));
            continue;
        };
        out.orders += 1;
        let stored: Value = http.get(format!("{url}/{id}")).send().await?.json().await?;
        if stored["customer"]["name"] != json!(name) {
            out.failures.push(format!(
                "name {name:?} came back as {}",
                stored["customer"]["name"]
            ));
        }
    }

    // A SKU is free text to the order service (inventory rejects unknown ones): one that looks
    // like SQL is stored as sent.
    out.requests += 2;
    let created: Value = http.post(&url).json(&sql_sku).send().await?.json().await?;
    let stored: Value = http
        .get(format!(
            "{url}/{}",
            created["id"].as_str().unwrap_or_default()
        ))
        .send()
        .await?
        .json()
        .await?;
    if stored["lines"][0]["sku"] != sql_sku["lines"][0]["sku"] {
        out.failures.push(format!(
            "a SQL-looking SKU came back as {}",
            stored["lines"][0]["sku"]
        ));
    } else {
        out.orders += 1;
    }

    // Concurrent retries of one request: one order.
    let key = uuid::Uuid::new_v4().to_string();
    let tries = (0..16).map(|_| {
        http.post(&url)
            .header("Idempotency-Key", &key)
            .json(&order("same key"))
            .send()
    });
    let mut ids = HashSet::new();
    for resp in futures::future::join_all(tries).await {
        out.requests += 1;
        match resp {
            Ok(r) if r.status().as_u16() == 201 => {
                let body: Value = r.json().await.unwrap_or(Value::Null);
                ids.insert(body["id"].as_str().unwrap_or_default().to_owned());
            }
            Ok(r) => out.failures.push(format!(
                "a retry with one Idempotency-Key got {}",
                r.status()
            )),
            Err(e) => out.failures.push(format!("a retry got no answer: {e}")),
        }
    }
    if ids.len() != 1 {
        out.failures.push(format!(
            "16 concurrent retries with one Idempotency-Key made {} distinct orders",
            ids.len()
        ));
    }
    out.orders += ids.len();
    Ok(out)
}
