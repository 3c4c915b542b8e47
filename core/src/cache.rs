//! The order cache: cache-aside in Redis, versioned so that a slow reader cannot undo an
//! invalidation.
//!
//! # The race, and how it is closed
//! A reader misses the cache and reads version 3 from PostgreSQL; meanwhile the order moves to
//! version 4 and the cache-invalidation group deletes the key; then the reader writes version 3.
//! With a plain `DEL` that stale value would live until its TTL. So an entry is a hash
//! `{v: version, b: body}` and both writes are Lua scripts, atomic in Redis:
//! - [`OrderCache::put`] writes only if the key holds nothing, an older version, or a tombstone of
//!   the same version (the reader fetched exactly the state the invalidation announced).
//! - [`OrderCache::invalidate`] replaces the entry by a tombstone `{v: event's version}` (no body),
//!   unless the entry already holds that version or a newer one. A reader that read an older
//!   version before the event can no longer store it.
//!
//! Tombstones live as long as entries (the TTL), far longer than any read takes.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Mutex;
use uuid::Uuid;

/// Writes `{v, b}` unless something at least as fresh is there. Returns 1 if written.
const PUT: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'v'))
local v = tonumber(ARGV[1])
if cur and (cur > v or (cur == v and redis.call('HEXISTS', KEYS[1], 'b') == 1)) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Leaves a tombstone at version `v` unless the entry is already at `v` or newer. Returns 1 if
/// the entry was replaced.
const INVALIDATE: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'v'))
local v = tonumber(ARGV[1])
if cur and cur >= v then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The Redis key of an order.
pub fn key(order_id: Uuid) -> String {
    format!("keel:order:{order_id}")
}

/// A handle on the cache; cheap to share. Connects on first use and reconnects after Redis comes
/// back, so a service starts (and serves from PostgreSQL) while Redis is down.
pub struct OrderCache {
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    ttl: Duration,
    put: redis::Script,
    invalidate: redis::Script,
}

impl OrderCache {
    /// `url` is checked here (a malformed `KEEL_REDIS_URL` fails start-up); nothing connects yet.
    pub fn new(url: &str, ttl: Duration) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            anyhow::anyhow!(
                "KEEL_REDIS_URL: {e} (got {:?})",
                crate::settings::redact(url)
            )
        })?;
        Ok(Self {
            client,
            connection: Mutex::new(None),
            ttl,
            put: redis::Script::new(PUT),
            invalidate: redis::Script::new(INVALIDATE),
        })
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The version each order's entry holds (a body or a tombstone), `None` where there is no
    /// entry: one pipelined round trip per call, for audits.
    pub async fn versions(&self, order_ids: &[Uuid]) -> redis::RedisResult<Vec<Option<i32>>> {
        let mut c = self.connection().await?;
        let mut pipe = redis::pipe();
        for id in order_ids {
            pipe.cmd("HGET").arg(key(*id)).arg("v");
        }
        pipe.query_async(&mut c).await
    }

    /// The cached body of `order_id`, if a fresh one is there.
    #[tracing::instrument(name = "redis", skip_all, fields(otel.name = "HGET", otel.kind = "client", db.system.name = "redis"))]
    pub async fn get(&self, order_id: Uuid) -> redis::RedisResult<Option<String>> {
        let mut c = self.connection().await?;
        redis::cmd("HGET")
            .arg(key(order_id))
            .arg("b")
            .query_async(&mut c)
            .await
    }

    /// Stores `body` at `version` unless the cache holds something at least as fresh. The TTL
    /// gets up to 10% at random so entries written together do not expire together.
    #[tracing::instrument(name = "redis", skip_all, fields(otel.name = "EVALSHA put", otel.kind = "client", db.system.name = "redis"))]
    pub async fn put(&self, order_id: Uuid, version: i32, body: &str) -> redis::RedisResult<bool> {
        let mut c = self.connection().await?;
        let written: i32 = self
            .put
            .key(key(order_id))
            .arg(version)
            .arg(body)
            .arg(self.ttl_with_jitter().as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(written == 1)
    }

    /// The order reached `version`: no reader may serve or store anything older.
    #[tracing::instrument(name = "redis", skip_all, fields(otel.name = "EVALSHA invalidate", otel.kind = "client", db.system.name = "redis"))]
    pub async fn invalidate(&self, order_id: Uuid, version: i32) -> redis::RedisResult<bool> {
        let mut c = self.connection().await?;
        let replaced: i32 = self
            .invalidate
            .key(key(order_id))
            .arg(version)
            .arg(self.ttl_with_jitter().as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(replaced == 1)
    }

    /// [`OrderCache::invalidate`] for many orders in one pipelined round trip (in order, so an
    /// order twice ends at its higher version).
    #[tracing::instrument(name = "redis", skip_all, fields(otel.name = "EVALSHA invalidate", otel.kind = "client", db.system.name = "redis", db.operation.batch.size = orders.len()))]
    pub async fn invalidate_many(&self, orders: &[(Uuid, i32)]) -> redis::RedisResult<()> {
        if orders.is_empty() {
            return Ok(());
        }
        let mut c = self.connection().await?;
        let mut pipe = redis::pipe();
        for (order_id, version) in orders {
            pipe.cmd("EVALSHA")
                .arg(self.invalidate.get_hash())
                .arg(1)
                .arg(key(*order_id))
                .arg(*version)
                .arg(self.ttl_with_jitter().as_millis() as u64)
                .ignore();
        }
        match pipe.query_async::<()>(&mut c).await {
            // Redis lost its script cache (a restart): load it and send the pipeline again.
            Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                self.invalidate.load_async(&mut c).await?;
                pipe.query_async(&mut c).await
            }
            result => result,
        }
    }

    fn ttl_with_jitter(&self) -> Duration {
        self.ttl + (self.ttl / 10).mul_f64(crate::backoff::jitter())
    }
}
