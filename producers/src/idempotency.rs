//! Idempotency keys of the order API (`Idempotency-Key`), as zero-to-production does them.
//!
//! A request with a key [`begin`]s in its transaction: requests with the same key queue on an
//! advisory lock until the first one commits, then find its stored answer and [`Begun::Replay`]
//! it (with `Idempotent-Replayed: true`); the first one [`Begun::Proceed`]s and [`record`]s its
//! answer in the same transaction as its effect, so an answer is stored exactly when the effect
//! committed. The same key with a different body is refused, naming the header. `POST /orders`,
//! `/orders/{id}/pay` and `/orders/{id}/cancel` take a key (a retried payment replays its first
//! answer instead of a 409). An answer is kept for `KEEL_IDEMPOTENCY_KEY_TTL_SECS`; after that
//! the key is new again, and [`clean`] deletes expired keys in slices.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use crate::error::ApiError;

/// The request's `Idempotency-Key`, if it sent one: 1 to 255 visible ASCII characters.
pub fn key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::field(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// What a keyed request does after [`begin`].
pub enum Begun {
    /// The key is new: do the work, then [`record`] the answer in the same transaction.
    Proceed,
    /// The key was used before with this body: answer this, change nothing.
    Replay(Response),
}

/// Takes the key's lock in `tx` and looks for the answer of an earlier request with it.
pub async fn begin(
    tx: &mut PgConnection,
    key: &str,
    request: &Value,
    ttl: std::time::Duration,
) -> Result<Begun, ApiError> {
    // Requests with one key queue here until the first commits; then they find its answer.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.idempotency.' || $1))")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    let stored = sqlx::query(
        "SELECT request, status_code, response FROM orders.idempotency_keys
          WHERE key = $1 AND created_at > now() - make_interval(secs => $2)",
    )
    .bind(key)
    .bind(ttl.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = stored else {
        return Ok(Begun::Proceed);
    };
    let first: Value = row.get("request");
    if first != *request {
        return Err(ApiError::field(
            "Idempotency-Key",
            "was already used with a different request body",
        ));
    }
    let status =
        StatusCode::from_u16(row.get::<i16, _>("status_code") as u16).unwrap_or(StatusCode::OK);
    let body: Value = row.get("response");
    let mut answer = (
        status,
        [(
            header::HeaderName::from_static("idempotent-replayed"),
            "true",
        )],
        Json(&body),
    )
        .into_response();
    if status == StatusCode::CREATED
        && let Some(location) = body["id"]
            .as_str()
            .and_then(|id| header::HeaderValue::from_str(&format!("/orders/{id}")).ok())
    {
        answer.headers_mut().insert(header::LOCATION, location);
    }
    Ok(Begun::Replay(answer))
}

/// Stores the answer to the key's first request, in the transaction of its effect.
pub async fn record(
    tx: &mut PgConnection,
    key: &str,
    request: &Value,
    status: StatusCode,
    response: &Value,
) -> Result<(), sqlx::Error> {
    // A row still there is an expired one (`begin` found none in time): the key is new again.
    sqlx::query(
        "INSERT INTO orders.idempotency_keys (key, request, status_code, response) VALUES ($1, $2, $3, $4)
         ON CONFLICT (key) DO UPDATE SET request = EXCLUDED.request, status_code = EXCLUDED.status_code,
             response = EXCLUDED.response, created_at = now()",
    )
    .bind(key)
    .bind(request)
    .bind(status.as_u16() as i16)
    .bind(response)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Keys deleted per statement by [`clean`].
const CLEAN_SLICE: i64 = 1000;

/// Deletes the keys older than `ttl`, a slice at a time (short statements, no long lock on the
/// table); how many it deleted.
pub async fn clean(pool: &sqlx::PgPool, ttl: std::time::Duration) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    loop {
        let n = sqlx::query(
            // The age is checked again on the row deleted: a key stored anew meanwhile (an
            // expired one reused, see `record`) is not.
            "DELETE FROM orders.idempotency_keys
              WHERE created_at <= now() - make_interval(secs => $1)
                AND key IN (SELECT key FROM orders.idempotency_keys
                             WHERE created_at <= now() - make_interval(secs => $1) LIMIT $2)",
        )
        .bind(ttl.as_secs_f64())
        .bind(CLEAN_SLICE)
        .execute(pool)
        .await?
        .rows_affected();
        deleted += n;
        if n < CLEAN_SLICE as u64 {
            return Ok(deleted);
        }
    }
}
