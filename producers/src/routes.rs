//! The order API's handlers. Each write is one transaction: lock the order row, change it,
//! enqueue its event, commit. Holding the row lock while enqueueing is what makes outbox id order
//! equal to the order's event order (see `keel_outbox`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SubsecRound, Utc};
use keel_core::telemetry::{self, TraceHeaders};
use keel_schemas::{Event, OrderCancelled, OrderCreated, OrderLine, OrderPaid};
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::domain::{self, Cancellation, NewOrder, Order, Payment, Status};
use crate::error::ApiError;
use crate::extract::{JsonBody, OptionalJsonBody};
use crate::idempotency::{self, Begun};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// Topic of order events.
    pub topic: Arc<str>,
    /// Read-through cache of `GET /orders/{id}`; `None` reads PostgreSQL every time.
    pub cache: Option<Arc<keel_core::cache::OrderCache>>,
    /// How long an `Idempotency-Key`'s answer is replayed.
    pub idempotency_ttl: std::time::Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", get(get_order))
        .route("/orders/{id}/pay", post(pay_order))
        .route("/orders/{id}/cancel", post(cancel_order))
        .with_state(state)
}

/// The trace context to store with the event: the request's span (a child of the caller's trace,
/// see `app::request_span`), or the caller's own context when tracing is off.
fn trace_context(headers: &HeaderMap) -> TraceHeaders {
    let caller = telemetry::extract(|k| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    telemetry::headers_for_current(&caller)
}

/// Event timestamps have millisecond precision; so do the rows, so that both say the same.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

async fn create_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(new): JsonBody<NewOrder>,
) -> Result<Response, ApiError> {
    let valid = domain::validate(&new).map_err(ApiError::Invalid)?;
    let key = idempotency::key(&headers)?;
    let trace = trace_context(&headers);
    let request = serde_json::to_value(&new).map_err(|e| ApiError::Unexpected(e.into()))?;

    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key
        && let Begun::Replay(answer) =
            idempotency::begin(&mut tx, key, &request, state.idempotency_ttl).await?
    {
        return Ok(answer);
    }

    let order = insert_order(&mut tx, &state.topic, valid, &trace).await?;
    let id = order.id;
    let body = serde_json::to_value(&order).map_err(|e| ApiError::Unexpected(e.into()))?;
    if let Some(key) = &key {
        idempotency::record(&mut tx, key, &request, StatusCode::CREATED, &body).await?;
    }
    tx.commit().await?;
    tracing::info!(order_id = %id, total_minor = order.total_minor, "Order created");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/orders/{id}"))],
        Json(body),
    )
        .into_response())
}

/// The order's rows and its `OrderCreated` outbox row, written in `tx` (the caller commits): the
/// whole write path of `POST /orders` without HTTP, which `make bench` measures as the baseline.
pub async fn insert_order(
    tx: &mut PgConnection,
    topic: &str,
    valid: domain::ValidOrder,
    trace: &TraceHeaders,
) -> Result<Order, sqlx::Error> {
    let id = Uuid::now_v7();
    let at = now();
    sqlx::query(
        "INSERT INTO orders.orders (id, customer_id, customer_email, customer_name, currency, status, total_minor, version, created_at, updated_at, channel)
         VALUES ($1, $2, $3, $4, $5, 'created', $6, 1, $7, $7, $8)",
    )
    .bind(id)
    .bind(&valid.customer.id)
    .bind(&valid.customer.email)
    .bind(&valid.customer.name)
    .bind(&valid.currency)
    .bind(valid.total_minor)
    .bind(at)
    .bind(&valid.channel)
    .execute(&mut *tx)
    .await?;
    let line_no: Vec<i32> = (1..=valid.lines.len() as i32).collect();
    let skus: Vec<&str> = valid.lines.iter().map(|l| l.sku.as_str()).collect();
    let quantities: Vec<i32> = valid.lines.iter().map(|l| l.quantity).collect();
    let prices: Vec<i64> = valid.lines.iter().map(|l| l.unit_price_minor).collect();
    sqlx::query(
        "INSERT INTO orders.order_lines (order_id, line_no, sku, quantity, unit_price_minor)
         SELECT $1, * FROM UNNEST($2::int[], $3::text[], $4::int[], $5::bigint[])",
    )
    .bind(id)
    .bind(&line_no)
    .bind(&skus)
    .bind(&quantities)
    .bind(&prices)
    .execute(&mut *tx)
    .await?;
    let event = Event::OrderCreated(OrderCreated {
        event_id: Uuid::now_v7(),
        occurred_at: at.timestamp_millis(),
        order_id: id,
        order_version: 1,
        customer: valid.customer.clone(),
        currency: valid.currency.clone(),
        lines: valid.lines.clone(),
        total_minor: valid.total_minor,
        channel: valid.channel.clone(),
    });
    keel_outbox::enqueue(&mut *tx, topic, &event, trace).await?;
    let order = Order {
        id,
        status: Status::Created,
        version: 1,
        customer: valid.customer,
        currency: valid.currency,
        lines: valid.lines,
        total_minor: valid.total_minor,
        channel: valid.channel,
        payment_reference: None,
        cancel_reason: None,
        created_at: at,
        updated_at: at,
    };
    Ok(order)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound(id.to_owned()))
}

/// Loads an order; with `lock`, holds its row lock until the transaction ends.
pub async fn load_order(
    conn: &mut PgConnection,
    id: Uuid,
    lock: bool,
) -> Result<Option<Order>, sqlx::Error> {
    let sql = format!(
        "SELECT id, customer_id, customer_email, customer_name, currency, status, total_minor, version,
                channel, payment_reference, cancel_reason, created_at, updated_at
         FROM orders.orders WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let Some(row) = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let lines = sqlx::query("SELECT sku, quantity, unit_price_minor FROM orders.order_lines WHERE order_id = $1 ORDER BY line_no")
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|l| OrderLine { sku: l.get("sku"), quantity: l.get("quantity"), unit_price_minor: l.get("unit_price_minor") })
        .collect();
    let status: String = row.get("status");
    Ok(Some(Order {
        id,
        status: Status::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("unknown order status {status:?}").into())
        })?,
        version: row.get("version"),
        customer: keel_schemas::Customer {
            id: row.get("customer_id"),
            email: row.get("customer_email"),
            name: row.get("customer_name"),
        },
        currency: row.get("currency"),
        lines,
        total_minor: row.get("total_minor"),
        channel: row.get("channel"),
        payment_reference: row.get("payment_reference"),
        cancel_reason: row.get("cancel_reason"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
    }))
}

/// Cache-aside: a fresh cached body is served as it is; a miss reads PostgreSQL and offers the
/// result to the cache, which keeps it only if nothing newer is there (see `keel_core::cache`).
/// Redis being down costs latency, never correctness: the order is read from PostgreSQL.
async fn get_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let uuid = parse_id(&id)?;
    if let Some(cache) = &state.cache {
        match cache.get(uuid).await {
            Ok(Some(body)) => {
                return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(order_id = %uuid, error = %e, "Order cache unavailable; reading PostgreSQL")
            }
        }
    }
    let mut conn = state.pool.acquire().await?;
    let order = load_order(&mut conn, uuid, false)
        .await?
        .ok_or(ApiError::NotFound(id))?;
    drop(conn);
    if let Some(cache) = &state.cache {
        match serde_json::to_string(&order) {
            Ok(body) => {
                if let Err(e) = cache.put(uuid, order.version, &body).await {
                    tracing::warn!(order_id = %uuid, error = %e, "Cannot fill the order cache");
                }
            }
            Err(e) => {
                tracing::warn!(order_id = %uuid, error = %e, "Cannot serialize an order for the cache")
            }
        }
    }
    Ok(Json(order).into_response())
}

async fn pay_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<Payment>,
) -> Result<Response, ApiError> {
    let given = domain::optional_text(
        "payment_reference",
        body.unwrap_or_default().payment_reference.as_deref(),
        100,
    )
    .map_err(ApiError::Invalid)?;
    // What a retry with the same Idempotency-Key must repeat.
    let request = json!({"pay": id, "payment_reference": given});
    let reference = given.unwrap_or_else(|| format!("pay-{}", Uuid::new_v4().simple()));
    transition(&state, &id, &headers, &request, Status::Paid, |order| {
        order.payment_reference = Some(reference.clone());
        Event::OrderPaid(OrderPaid {
            event_id: Uuid::now_v7(),
            occurred_at: order.updated_at.timestamp_millis(),
            order_id: order.id,
            order_version: order.version,
            customer_id: order.customer.id.clone(),
            currency: order.currency.clone(),
            amount_minor: order.total_minor,
            payment_reference: reference.clone(),
        })
    })
    .await
}

async fn cancel_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<Cancellation>,
) -> Result<Response, ApiError> {
    let reason = domain::optional_text("reason", body.unwrap_or_default().reason.as_deref(), 500)
        .map_err(ApiError::Invalid)?;
    let request = json!({"cancel": id, "reason": reason});
    transition(
        &state,
        &id,
        &headers,
        &request,
        Status::Cancelled,
        |order| {
            order.cancel_reason = reason.clone();
            Event::OrderCancelled(OrderCancelled {
                event_id: Uuid::now_v7(),
                occurred_at: order.updated_at.timestamp_millis(),
                order_id: order.id,
                order_version: order.version,
                customer_id: order.customer.id.clone(),
                reason: reason.clone(),
                lines: order.lines.clone(),
            })
        },
    )
    .await
}

/// Moves an order to `to` under its row lock, bumping its version, with the event `make` builds
/// from the updated order, in one transaction.
/// Moves the order to `to` with the event `make` builds. With an `Idempotency-Key`, a retry of
/// `request` (the route, the order and what the body asked) replays the first answer instead
/// of answering 409 for a transition already made.
async fn transition(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    request: &serde_json::Value,
    to: Status,
    make: impl FnOnce(&mut Order) -> Event,
) -> Result<Response, ApiError> {
    let uuid = parse_id(id)?;
    let key = idempotency::key(headers)?;
    let trace = trace_context(headers);
    let mut tx = state.pool.begin().await?;
    if let Some(key) = &key
        && let Begun::Replay(answer) =
            idempotency::begin(&mut tx, key, request, state.idempotency_ttl).await?
    {
        return Ok(answer);
    }
    let mut order = load_order(&mut tx, uuid, true)
        .await?
        .ok_or_else(|| ApiError::NotFound(id.to_owned()))?;
    order
        .status
        .check_transition(to)
        .map_err(ApiError::Conflict)?;
    order.status = to;
    order.version += 1;
    order.updated_at = now();
    let event = make(&mut order);
    sqlx::query(
        "UPDATE orders.orders SET status = $2, version = $3, updated_at = $4, payment_reference = $5, cancel_reason = $6 WHERE id = $1",
    )
    .bind(uuid)
    .bind(to.as_str())
    .bind(order.version)
    .bind(order.updated_at)
    .bind(&order.payment_reference)
    .bind(&order.cancel_reason)
    .execute(&mut *tx)
    .await?;
    keel_outbox::enqueue(&mut tx, &state.topic, &event, &trace).await?;
    if let Some(key) = &key {
        let body = serde_json::to_value(&order).map_err(|e| ApiError::Unexpected(e.into()))?;
        idempotency::record(&mut tx, key, request, StatusCode::OK, &body).await?;
    }
    tx.commit().await?;
    tracing::info!(order_id = %uuid, status = to.as_str(), version = order.version, "Order updated");
    Ok(Json(order).into_response())
}
