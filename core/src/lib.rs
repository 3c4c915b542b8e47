//! Plumbing shared by every keel service, kept in one place so the services cannot drift apart.
//!
//! # Layout
//! - [`settings`]: typed settings from `KEEL_*` environment variables, validated at start-up.
//! - [`kafka`]: librdkafka client configuration (idempotent producer, at-least-once consumer) and
//!   topic administration.
//! - [`db`]: PostgreSQL pools, databases and per-schema migrations.
//! - [`fatal`]: fatal Kafka client errors: `/health` red, a clean stop, a non-zero exit.
//! - [`shutdown`]: the SIGTERM/Ctrl-C future every `main` hands to its service.
//! - [`telemetry`]: tracing subscriber and W3C trace-context propagation.
//! - `testkit` (feature `testkit`): what integration tests share.
//! - [`cache`]: the versioned Redis cache of orders (read by the order service, invalidated by
//!   the cache-invalidation group).
//! - [`backoff`]: bounded exponential backoff with jitter for retry loops.
//! - [`metrics`]: the Prometheus metrics every process exposes on `/metrics`.
//! - [`health`]: liveness (`/health`), readiness (`/ready`) and the admin listener.
//! - [`topics`]: the topic layout declared in `topics.toml`.

pub mod backoff;
pub mod cache;
pub mod db;
pub mod fatal;
pub mod health;
pub mod kafka;
pub mod metrics;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topics;

pub use settings::Settings;

/// `e` and every error under it, `: `-separated: what an HTTP or TLS client's top-level message
/// leaves out ("error sending request" hides "certificate verify failed").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
