//! The cache-invalidation group: on every order event, the order's cache entry is replaced by a
//! tombstone at the event's version, so neither the old entry nor a slow reader's stale copy is
//! served again (see `keel_core::cache` for the race this closes).
//!
//! A batch of events costs one pipelined Redis round trip. Redis unreachable is [`HandlerError::Unavailable`]: the record is retried with backoff until
//! Redis is back, and the group catches up; other groups are not affected.

use std::sync::Arc;

use keel_core::cache::OrderCache;
use keel_schemas::Event;
use sqlx::PgConnection;

use crate::runtime::{Handler, HandlerError, Meta};
use crate::{Group, ORDER_EVENTS};

/// The cache-invalidation group's entry in [`crate::GROUPS`].
pub static GROUP: Group = Group {
    name: "cache-invalidation",
    topics: |t| vec![t.orders.clone()],
    applies: |t| vec![(t.orders.clone(), ORDER_EVENTS.to_vec())],
    migrations: None,
    run: |s, shutdown| {
        Box::pin(
            async move { crate::serve(&GROUP, CacheInvalidation::new(&s)?, &s, shutdown).await },
        )
    },
};

pub struct CacheInvalidation {
    pub cache: Arc<OrderCache>,
}

impl CacheInvalidation {
    pub fn new(settings: &keel_core::Settings) -> anyhow::Result<Self> {
        Ok(Self {
            cache: Arc::new(OrderCache::new(
                settings.cache.require_redis()?,
                settings.cache.ttl,
            )?),
        })
    }
}

impl Handler for CacheInvalidation {
    fn wants(&self, event: &Event) -> bool {
        event.is_order_event()
    }

    /// A batch costs one transaction and one pipelined Redis round trip whatever its size, and
    /// its records touch no shared rows: larger batches are nearly free (bench/README.md).
    fn batch_size(&self) -> usize {
        1000
    }

    async fn handle(
        &self,
        _tx: &mut PgConnection,
        event: &Event,
        _meta: &Meta,
    ) -> Result<(), HandlerError> {
        let Some(version) = event.order_version() else {
            return Ok(());
        };
        // Idempotent: a redelivered event finds the tombstone (or something newer) in place.
        self.cache.invalidate(event.aggregate_id(), version).await?;
        Ok(())
    }

    /// One pipelined round trip for the whole batch instead of one per event.
    async fn handle_batch(
        &self,
        _tx: &mut PgConnection,
        events: &[(&Event, &Meta)],
    ) -> Result<(), HandlerError> {
        let tombstones: Vec<_> = events
            .iter()
            .filter_map(|(e, _)| Some((e.aggregate_id(), e.order_version()?)))
            .collect();
        self.cache.invalidate_many(&tombstones).await?;
        Ok(())
    }
}
