//! Building and running the order service: what `keel order-service` and the tests both start.

use std::net::SocketAddr;
use std::sync::Arc;

use keel_core::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::trace::TraceLayer;

use crate::routes::{AppState, router};

/// The server span of one request, in the caller's trace when it sent `traceparent`
/// (OpenTelemetry HTTP conventions: `http.request.method`, `http.route`, status).
fn request_span<B>(request: &axum::http::Request<B>) -> tracing::Span {
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |m| m.as_str().to_owned(),
        );
    let span = tracing::info_span!(
        "request",
        otel.name = format!("{} {route}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    let parent = keel_core::telemetry::extract(|k| {
        request
            .headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    // Fails only when tracing is off; the caller's context is then forwarded as it came.
    let _ = span.set_parent(parent);
    keel_core::telemetry::record_ids(&span);
    span
}

fn record_status<B>(
    response: &axum::http::Response<B>,
    _latency: std::time::Duration,
    span: &tracing::Span,
) {
    span.record("http.response.status_code", response.status().as_u16());
}

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    /// Cancelled when shutdown begins, so that `/ready` fails while requests drain.
    stopping: CancellationToken,
    /// Where expired idempotency keys are deleted, and after how long.
    pool: sqlx::PgPool,
    idempotency_ttl: std::time::Duration,
}

/// How often expired idempotency keys are deleted.
const CLEAN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// API requests in progress at most. Past it the service answers 503 at once rather than
/// queueing: memory stays bounded under overload, and clients back off instead of timing out.
/// Twelve times the database pool: enough to keep it busy, few enough to answer fast.
const MAX_IN_FLIGHT: usize = 240;

/// Admits a request if a slot is free; otherwise 503 `overloaded`.
async fn admit(
    axum::extract::State(slots): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(slot) = slots.try_acquire() else {
        return crate::error::ApiError::Overloaded.into_response();
    };
    let response = next.run(request).await;
    drop(slot);
    response
}

/// Counts and times every request by route template and status (`keel_http_*`).
async fn measure(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let m = keel_core::metrics::metrics();
    m.http_requests
        .get_or_create(&keel_core::metrics::HttpLabels {
            method: method.clone(),
            route: route.clone(),
            status: response.status().as_u16(),
        })
        .inc();
    m.http_duration
        .get_or_create(&keel_core::metrics::RouteLabels { method, route })
        .observe(started.elapsed().as_secs_f64());
    response
}

impl Application {
    /// Applies the order service's and the outbox's migrations, connects, and binds.
    /// With `s.cache.redis_url` unset, `GET /orders/{id}` reads PostgreSQL every time.
    pub async fn build(s: &Settings) -> anyhow::Result<Self> {
        keel_core::db::migrate(&s.database_url, crate::DB_SCHEMA, &crate::MIGRATOR).await?;
        keel_core::db::migrate(
            &s.database_url,
            keel_outbox::DB_SCHEMA,
            &keel_outbox::MIGRATOR,
        )
        .await?;
        let pool = keel_core::db::pool(&s.database_url, 20).await?;
        let addr = s.order_service_addr;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            anyhow::anyhow!("KEEL_ORDER_SERVICE_ADDR: cannot listen on {addr}: {e}")
        })?;
        let cache = match &s.cache.redis_url {
            Some(url) => Some(Arc::new(keel_core::cache::OrderCache::new(
                url,
                s.cache.ttl,
            )?)),
            None => None,
        };
        let state = AppState {
            pool,
            topic: Arc::from(s.topics.orders.as_str()),
            cache,
            idempotency_ttl: s.idempotency_ttl,
        };
        let stopping = CancellationToken::new();
        let checks = keel_core::health::Checks::new(stopping.clone(), s.liveness_timeout)
            .database(state.pool.clone());
        Ok(Self {
            listener,
            stopping,
            pool: state.pool.clone(),
            idempotency_ttl: s.idempotency_ttl,
            router: router(state)
                .route_layer(axum::middleware::from_fn_with_state(
                    Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                    admit,
                ))
                .merge(keel_core::health::router(checks))
                .route_layer(axum::middleware::from_fn(measure))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(record_status),
                ),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serves until `shutdown`; requests in progress are finished first.
    pub async fn run_until(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "Order service listening");
        let stopping = self.stopping.clone();
        let (pool, ttl, stop) = (self.pool, self.idempotency_ttl, shutdown.clone());
        let cleaner = tokio::spawn(async move {
            let mut every = tokio::time::interval(CLEAN_EVERY);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every.tick() => match crate::idempotency::clean(&pool, ttl).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(deleted = n, "Expired idempotency keys deleted"),
                        Err(e) => tracing::warn!(error = %e, "Cannot delete expired idempotency keys"),
                    },
                }
            }
        });
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                stopping.cancel();
            })
            .await;
        cleaner.abort();
        let _ = cleaner.await;
        served?;
        Ok(())
    }
}
