//! PostgreSQL: pools, database creation and per-schema migrations.
//!
//! Each component owns a PostgreSQL schema (`orders`, `outbox`, `registry`, `consumers`,
//! `inventory`, …) and its migrations. [`migrate`] runs a component's migrations with that schema
//! first on the `search_path`, so each component's `_sqlx_migrations` history lives in its own
//! schema and components version their migrations independently.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// A pool with bounded waits, so an unreachable database shows up as an error, not a hang.
pub async fn pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| anyhow::anyhow!("KEEL_DATABASE_URL: {e}"))?
        .options(SESSION);
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?)
}

/// What every pooled session of keel's sets, so that one whose client stopped talking lets go of
/// its locks in bounded time instead of the kernel's two hours:
/// - `idle_in_transaction_session_timeout`: a transaction left idle for a minute is ended by the
///   server, its locks released (the relay's leadership is a transaction's advisory lock; its
///   longest legitimate wait inside one is a delivery, `message.timeout.ms` = 30 s). This covers
///   a client that froze while its host still answers TCP (a paused VM, SIGSTOP).
/// - `tcp_keepalives_*`: the server probes an idle connection after 10 s, every 5 s, 3 times, so
///   it notices a client host that vanished from the network within about 25 s.
///
/// Connection poolers in transaction mode (PgBouncer) refuse start-up parameters unless told to
/// ignore them (`ignore_startup_parameters`); set these on the role there instead.
pub const SESSION: [(&str, &str); 4] = [
    ("idle_in_transaction_session_timeout", "60s"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
];

/// Creates the database named in `url` if it does not exist yet.
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let options =
        PgConnectOptions::from_str(url).map_err(|e| anyhow::anyhow!("KEEL_DATABASE_URL: {e}"))?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        // Two processes may race here; the loser's "already exists" is fine.
        let created = sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .execute(&mut admin)
            .await;
        if let Err(e) = created {
            let duplicate = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04");
            if !duplicate {
                return Err(e.into());
            }
        }
    }
    admin.close().await?;
    Ok(())
}

/// Drops the database named in `url`, disconnecting its sessions. For tests.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(url)?;
    let name = options.get_database().unwrap_or_default().to_owned();
    anyhow::ensure!(
        !name.is_empty() && name != "postgres",
        "refusing to drop {name:?}"
    );
    let mut admin = options.database("postgres").connect().await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&name)
    ))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    Ok(())
}

/// Runs `migrator` for the component owning `schema` (created if missing).
pub async fn migrate(url: &str, schema: &str, migrator: &Migrator) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(url)?;
    let mut conn = PgConnection::connect_with(&options).await?;
    let ident = quote_ident(schema);
    // Concurrent start-ups may both try to create the schema; serialise on a lock keyed by it.
    sqlx::query("SELECT pg_advisory_lock(hashtext('keel.migrate.' || $1))")
        .bind(schema)
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {ident}"))
        .execute(&mut conn)
        .await?;
    sqlx::query(&format!("SET search_path TO {ident}"))
        .execute(&mut conn)
        .await?;
    migrator
        .run(&mut conn)
        .await
        .map_err(|e| anyhow::anyhow!("migrating schema {schema}: {e}"))?;
    conn.close().await?;
    Ok(())
}

/// Quotes a PostgreSQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// True when the error says the database cannot serve anyone now (as opposed to a query that
/// failed): unreachable, shutting down, read-only after a failover, out of connections, disk or
/// memory, or refusing the credentials (a rotated password). Callers map it to 503 or wait.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            // The wire said something PostgreSQL would not (a connection cut mid-handshake
            // answers the TLS request with garbage): the connection is broken, not the record.
            | sqlx::Error::Protocol(_)
    ) || e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| unavailable_state(&c))
}

/// SQLSTATEs of a server that cannot serve anyone now, whatever the statement.
fn unavailable_state(code: &str) -> bool {
    // 08xxx: connection; 57P01..03: admin shutdown, crash shutdown, cannot connect now; 53xxx:
    // insufficient resources (53100 disk full, 53200 out of memory, 53300 too many
    // connections); 28xxx: credentials refused; 25006: read-only transaction (a standby, or
    // a primary demoted in a failover).
    code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("53")
        || code.starts_with("28")
        || code == "25006"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_unavailable_and_a_bad_statement_is_not() {
        // What a connection cut during the TLS request looks like (seen in `make chaos`).
        let cut = sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        assert!(is_unavailable(&cut));
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
