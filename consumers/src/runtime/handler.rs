//! What a group implements: the [`Handler`] trait (its effect, its batch size and the batch
//! hook; its name, topics and tables are its [`crate::Group`] entry's), the [`Meta`] each
//! record comes with, and [`HandlerError`], whose class decides
//! what the runtime does with a failure (see [`super::apply`]).

use std::future::Future;

use keel_core::telemetry::TraceHeaders;
use keel_schemas::Event;
use sqlx::PgConnection;
use tracing::Instrument;

/// Where a record came from, and the trace it belongs to.
#[derive(Debug, Clone)]
pub struct Meta {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// `traceparent`/`tracestate` from the record's headers: pass it on when enqueueing events.
    pub trace: TraceHeaders,
    /// The span the record's effect runs in (the record's share of the transaction, beneath its
    /// consumer span); disabled when nothing records traces.
    pub span: tracing::Span,
}

/// Why a handler could not apply an event. The transaction is rolled back in every case.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A dependency cannot be reached: retried until it is back, never dead-lettered.
    #[error("unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
    /// May succeed if tried again: retried up to the attempt budget, then dead-lettered.
    #[error("transient: {0}")]
    Transient(#[source] anyhow::Error),
    /// Will never succeed for this event: dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        if keel_core::db::is_unavailable(&e) {
            HandlerError::Unavailable(e.into())
        } else {
            HandlerError::Transient(e.into())
        }
    }
}

/// Redis answers of a server that cannot serve anyone now: loading its data after a restart,
/// a replica after a Sentinel failover, its master gone, a script hogging it, out of memory,
/// a cluster resharding.
const REDIS_UNAVAILABLE: &[&str] = &[
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "OOM",
    "TRYAGAIN",
    "CLUSTERDOWN",
];

impl From<redis::RedisError> for HandlerError {
    fn from(e: redis::RedisError) -> Self {
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.code().is_some_and(|c| REDIS_UNAVAILABLE.contains(&c))
        {
            HandlerError::Unavailable(e.into())
        } else {
            HandlerError::Transient(e.into())
        }
    }
}

impl HandlerError {
    /// The class as written in the `keel-dlq-error-class` header.
    pub fn class(&self) -> &'static str {
        match self {
            HandlerError::Unavailable(_) => "unavailable",
            HandlerError::Transient(_) => "transient",
            HandlerError::Permanent(_) => "permanent",
        }
    }
}

/// Records per transaction for a group that does not choose ([`Handler::batch_size`]).
pub const DEFAULT_BATCH_SIZE: usize = 100;

/// What a consumer group does with each event, inside the runtime's transaction. Which group
/// it is and what it reads are its [`crate::Group`] entry's (or, in tests, a
/// [`super::Subscription`]'s): a handler is only the effect. Adding a group is implementing this
/// trait and one line in [`crate::GROUPS`]; producers are untouched.
pub trait Handler: Send + Sync + 'static {
    /// Most records the group applies in one transaction unless `KEEL_CONSUMER_BATCH_SIZE` says
    /// otherwise. Larger batches share a commit among more records; a group that applies them
    /// one statement per record gains little past 100. Set-based [`Handler::handle_batch`]es
    /// (inventory, analytics) ask for more.
    fn batch_size(&self) -> usize {
        DEFAULT_BATCH_SIZE
    }

    /// Whether the group cares about `event`. Others are skipped without a transaction.
    fn wants(&self, event: &Event) -> bool {
        let _ = event;
        true
    }

    /// Applies `event`'s effect in `tx`. Only one run per event id per group ever commits.
    fn handle(
        &self,
        tx: &mut PgConnection,
        event: &Event,
        meta: &Meta,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Applies the new events of a batch, in order, in one transaction `tx`: all or none
    /// commit. The default calls [`Handler::handle`] for each; a group whose effect costs a round
    /// trip per event outside PostgreSQL (cache invalidation's Redis) overrides it to make one.
    fn handle_batch(
        &self,
        tx: &mut PgConnection,
        events: &[(&Event, &Meta)],
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async move {
            for (event, meta) in events {
                self.handle(tx, event, meta)
                    .instrument(meta.span.clone())
                    .await?;
            }
            Ok(())
        }
    }
}
