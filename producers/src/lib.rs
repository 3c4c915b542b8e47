//! The order service: keel's example producer.
//!
//! Every write is one PostgreSQL transaction holding the business rows *and* the outbox row for
//! its event, so an order never exists without its event nor an event without its order. The
//! relay (`keel relay`) publishes the events.
//!
//! # Layout
//! - [`app`]: `Application::build` / `run_until`, what `main` and the tests both start.
//! - [`routes`]: the HTTP handlers.
//! - [`domain`]: request validation and the order's state machine.
//! - [`error`]: the API's error type; the one place errors become HTTP statuses.
//! - [`extract`]: the JSON body extractor (content type, size limit, field-naming errors).
//! - [`idempotency`]: `Idempotency-Key`: key parsing, begin (proceed or replay), record.

pub mod app;
pub mod domain;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod routes;

pub use app::Application;

/// The order service's migrations, applied to PostgreSQL schema [`DB_SCHEMA`].
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL schema the order service owns.
pub const DB_SCHEMA: &str = "orders";
