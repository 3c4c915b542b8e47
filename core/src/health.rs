//! Liveness, readiness and the admin listener every keel process can open.
//!
//! - **`/health`** (liveness) fails only when the process cannot make progress: a loop that
//!   registered with [`beat`] has not beaten for longer than the stuck-after limit, or a Kafka
//!   client failed fatally ([`crate::fatal`]; the process is then on its way out). Waiting for a
//!   dependency is progress (the loops beat while they retry), so an outage does not get the
//!   process restarted: restarting would not help.
//! - **`/ready`** fails while a dependency it needs (PostgreSQL, the broker, the registry) cannot
//!   be reached within two seconds, while a topic it needs (a group's dead-letter topics) does
//!   not exist, or while the process shuts down, and recovers by itself.
//! - **`/metrics`**: [`crate::metrics::render`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn loops() -> &'static Mutex<BTreeMap<String, Instant>> {
    static LOOPS: OnceLock<Mutex<BTreeMap<String, Instant>>> = OnceLock::new();
    LOOPS.get_or_init(Mutex::default)
}

/// Loop `name` made progress (or is waiting as it should). Loops call this at least every few
/// seconds, idle or not.
pub fn beat(name: &str) {
    if let Ok(mut loops) = loops().lock() {
        match loops.get_mut(name) {
            Some(at) => *at = Instant::now(),
            None => {
                loops.insert(name.to_owned(), Instant::now());
            }
        }
    }
}

/// Loop `name` ended as it should; it no longer counts for liveness.
pub fn done(name: &str) {
    if let Ok(mut loops) = loops().lock() {
        loops.remove(name);
    }
}

/// What `/ready` checks and when `/health` calls a loop stuck.
#[derive(Clone)]
pub struct Checks {
    database: Option<sqlx::PgPool>,
    kafka: Option<crate::kafka::Kafka>,
    topics: Vec<String>,
    registry: Option<String>,
    stuck_after: Duration,
    shutdown: CancellationToken,
    fatal: crate::fatal::Fatal,
    http: reqwest::Client,
}

impl Checks {
    /// No dependencies yet; ready until `shutdown`.
    pub fn new(shutdown: CancellationToken, stuck_after: Duration) -> Self {
        Self {
            database: None,
            kafka: None,
            topics: Vec::new(),
            registry: None,
            stuck_after,
            shutdown,
            fatal: crate::fatal::Fatal::process(),
            http: reqwest::Client::new(),
        }
    }

    /// Where fatal client errors are seen: the process's [`crate::fatal::Fatal`] unless a test
    /// gives its own.
    pub fn fatal(mut self, fatal: crate::fatal::Fatal) -> Self {
        self.fatal = fatal;
        self
    }

    pub fn database(mut self, pool: sqlx::PgPool) -> Self {
        self.database = Some(pool);
        self
    }

    pub fn broker(mut self, kafka: &crate::kafka::Kafka) -> Self {
        self.kafka = Some(kafka.clone());
        self
    }

    /// Topics the broker must have (checked with it): not ready while one is missing, as
    /// `keel topics create` makes them.
    pub fn topics(mut self, names: Vec<String>) -> Self {
        self.topics = names;
        self
    }

    pub fn registry(mut self, url: &str) -> Self {
        self.registry = Some(url.trim_end_matches('/').to_owned());
        self
    }

    /// `(live, details)`: the loops and how long since each beat.
    pub fn live(&self) -> (bool, Value) {
        let mut stuck = Vec::new();
        let mut seen = serde_json::Map::new();
        if let Ok(loops) = loops().lock() {
            for (name, at) in loops.iter() {
                let ago = at.elapsed();
                seen.insert(name.clone(), json!(ago.as_secs_f64()));
                if ago > self.stuck_after {
                    stuck.push(name.clone());
                }
            }
        }
        if let Some(reason) = self.fatal.reason() {
            return (
                false,
                json!({"status": "fatal", "fatal": reason, "stuck": stuck, "seconds_since_beat": seen}),
            );
        }
        let live = stuck.is_empty();
        (
            live,
            json!({"status": if live { "ok" } else { "stuck" }, "stuck": stuck, "seconds_since_beat": seen}),
        )
    }

    /// `(ready, details)`: every dependency checked at once, each within two seconds.
    pub async fn ready(&self) -> (bool, Value) {
        let database = async {
            let pool = self.database.as_ref()?;
            Some(
                match tokio::time::timeout(CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(pool))
                    .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                },
            )
        };
        let broker = async {
            let kafka = self.kafka.clone()?;
            let required = self.topics.clone();
            let probe = tokio::task::spawn_blocking(move || {
                crate::kafka::probe(&kafka, CHECK_TIMEOUT, &required)
            });
            Some(match probe.await {
                Ok(Ok(missing)) if missing.is_empty() => Ok(()),
                Ok(Ok(missing)) => Err(crate::topics::missing(&missing)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            })
        };
        let registry = async {
            let url = self.registry.as_ref()?;
            let answer = self
                .http
                .get(format!("{url}/subjects"))
                .timeout(CHECK_TIMEOUT)
                .send()
                .await;
            Some(match answer {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status())),
                Err(e) => Err(e.to_string()),
            })
        };
        let (database, broker, registry) = tokio::join!(database, broker, registry);
        let mut details = serde_json::Map::new();
        let mut ready = true;
        for (name, result) in [
            ("database", database),
            ("broker", broker),
            ("registry", registry),
        ] {
            match result {
                None => {}
                Some(Ok(())) => {
                    details.insert(name.into(), json!("ok"));
                }
                Some(Err(e)) => {
                    ready = false;
                    details.insert(name.into(), json!(e));
                }
            }
        }
        if self.shutdown.is_cancelled() {
            ready = false;
            details.insert("shutting_down".into(), json!(true));
        }
        details.insert(
            "status".into(),
            json!(if ready { "ready" } else { "unavailable" }),
        );
        (ready, Value::Object(details))
    }
}

fn answer(ok: bool, body: Value) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `/health`, `/ready` and `/metrics`, to merge into a service's router or serve alone.
pub fn router(checks: Checks) -> Router {
    let checks = Arc::new(checks);
    let live = checks.clone();
    Router::new()
        .route(
            "/health",
            get(move || {
                let checks = live.clone();
                async move {
                    let (ok, body) = checks.live();
                    answer(ok, body)
                }
            }),
        )
        .route(
            "/ready",
            get(move || {
                let checks = checks.clone();
                async move {
                    let (ok, body) = checks.ready().await;
                    answer(ok, body)
                }
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                    crate::metrics::render(),
                )
            }),
        )
}

/// Serves [`router`] on `addr` until `shutdown` (`KEEL_ADMIN_ADDR`). Returns the bound address
/// and the server's task, which ends once the requests in progress at `shutdown` are answered:
/// await it before exiting.
pub async fn serve(
    addr: SocketAddr,
    checks: Checks,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("KEEL_ADMIN_ADDR: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "Admin endpoints listening (/health, /ready, /metrics)");
    let task = tokio::spawn(async move {
        axum::serve(listener, router(checks))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        Ok(())
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_client_error_makes_the_process_not_live_and_names_it() {
        let fatal = crate::fatal::Fatal::new();
        let checks =
            Checks::new(CancellationToken::new(), Duration::from_secs(30)).fatal(fatal.clone());
        assert!(checks.live().0, "live before");
        fatal.raise("consumer inventory", "Fatal consumer error: Broker: Static consumer fenced by other consumer with same group.instance.id");
        let (live, body) = checks.live();
        assert!(!live);
        assert_eq!(body["status"], "fatal");
        assert!(
            body["fatal"]
                .as_str()
                .unwrap_or_default()
                .contains("fenced"),
            "{body}"
        );
    }
}
