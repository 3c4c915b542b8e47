//! keel's Confluent-compatible Schema Registry.
//!
//! The REST API follows Confluent's documentation: the same paths, JSON shapes, content type
//! (`application/vnd.schemaregistry.v1+json`) and error codes, so any client written for
//! Confluent Schema Registry works against it unchanged. Schemas live in PostgreSQL (schema
//! `registry`); only Avro is supported.
//!
//! # Layout
//! - [`api`]: the HTTP routes and Confluent's error bodies.
//! - [`store`]: registration, lookup and deletion in PostgreSQL.
//! - [`compat`]: compatibility levels over Avro's schema-resolution rules.
//! - [`references`]: schemas that use types registered under other subjects.

pub mod api;
pub mod compat;
pub mod references;
pub mod store;

pub use api::{router, router_with_auth, serve, serve_with_auth};

/// The registry's migrations, applied to PostgreSQL schema `registry`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL schema the registry owns.
pub const DB_SCHEMA: &str = "registry";

/// Migrates `database_url`, binds `addr` (port 0 picks one) and serves until `shutdown`, open
/// to every caller. Returns the bound address and the server task, which ends once the requests
/// in progress at `shutdown` are answered: await it before exiting.
pub async fn spawn(
    database_url: &str,
    addr: std::net::SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    spawn_with_auth(database_url, addr, None, shutdown).await
}

/// [`spawn`], requiring `auth` (`KEEL_REGISTRY_BASIC_AUTH`) as HTTP basic auth when set (see
/// [`api::router_with_auth`]).
pub async fn spawn_with_auth(
    database_url: &str,
    addr: std::net::SocketAddr,
    auth: Option<keel_core::settings::BasicAuth>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    keel_core::db::migrate(database_url, DB_SCHEMA, &MIGRATOR).await?;
    let pool = keel_core::db::pool(database_url, 10).await?;
    store::rewrite_identities(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("rewriting the registry's schema identities: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("KEEL_REGISTRY_ADDR: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    Ok((
        bound,
        tokio::spawn(api::serve_with_auth(listener, pool, auth, shutdown)),
    ))
}
