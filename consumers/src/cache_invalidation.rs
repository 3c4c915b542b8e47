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

pub const GROUP: &str = "cache-invalidation";

pub struct CacheInvalidation {
    pub group: String,
    pub orders_topic: String,
    pub cache: Arc<OrderCache>,
}

impl CacheInvalidation {
    pub fn new(settings: &keel_core::Settings) -> anyhow::Result<Self> {
        Ok(Self {
            group: GROUP.to_owned(),
            orders_topic: settings.topics.orders.clone(),
            cache: Arc::new(OrderCache::new(
                &settings.cache.redis_url,
                settings.cache.ttl,
            )?),
        })
    }
}

impl Handler for CacheInvalidation {
    fn group(&self) -> &str {
        &self.group
    }

    fn topics(&self) -> Vec<String> {
        vec![self.orders_topic.clone()]
    }

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
