//! Answers of a dependency that cannot serve anyone for now are outages (waited out, never
//! dead-lettered), not the record's fault: produced by the real servers where they can be made
//! to give them, and by the test kit's forwarder where they cannot (a Redis still loading).

use keel_consumers::HandlerError;
use keel_consumers::cache_invalidation::CacheInvalidation;
use keel_consumers::{Handler, Meta};
use keel_core::cache::OrderCache;
use keel_core::testkit::{Outage, TestDb, redis_url, unique};
use keel_schemas::{Event, OrderPaid};
use sqlx::Connection;

fn class(e: sqlx::Error) -> &'static str {
    HandlerError::from(e).class()
}

#[tokio::test]
async fn a_read_only_database_after_a_failover_is_an_outage() {
    let db = TestDb::new().await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let pool = db.pool().await;
    sqlx::query(&format!(
        "ALTER DATABASE {} SET default_transaction_read_only = on",
        keel_core::db::quote_ident(&name)
    ))
    .execute(&pool)
    .await
    .unwrap();
    // A new session sees the database as a demoted primary's clients do.
    let mut session = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let refused = sqlx::query("CREATE TABLE t (x int)")
        .execute(&mut session)
        .await
        .unwrap_err();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|d| d.code())
            .as_deref(),
        Some("25006")
    );
    assert_eq!(class(refused), "unavailable");
    // A statement that is wrong in itself stays transient (retried a few times, then dead-lettered).
    let wrong = sqlx::query("SELECT * FROM no_such_table")
        .execute(&mut session)
        .await
        .unwrap_err();
    assert_eq!(class(wrong), "transient");
}

#[tokio::test]
async fn a_server_out_of_connections_is_an_outage() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let role = unique("keel_limited");
    sqlx::query(&format!(
        "CREATE ROLE {} LOGIN CONNECTION LIMIT 0",
        keel_core::db::quote_ident(&role)
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    let refused = sqlx::PgConnection::connect(url.as_str()).await.unwrap_err();
    sqlx::query(&format!("DROP ROLE {}", keel_core::db::quote_ident(&role)))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|d| d.code())
            .as_deref(),
        Some("53300"),
        "{refused}"
    );
    assert_eq!(class(refused), "unavailable");
}

#[tokio::test]
async fn a_redis_still_loading_its_data_is_an_outage_and_serves_again_after() {
    let redis = Outage::forward(redis_url().trim_start_matches("redis://")).await;
    let cache = std::sync::Arc::new(
        OrderCache::new(
            &format!("redis://{}", redis.addr),
            std::time::Duration::from_secs(60),
        )
        .unwrap(),
    );
    let group = CacheInvalidation {
        cache: cache.clone(),
    };
    let order_id = uuid::Uuid::now_v7();
    let paid = Event::OrderPaid(OrderPaid {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: 1_764_000_000_000,
        order_id,
        order_version: 2,
        customer_id: "c-1".into(),
        currency: "EUR".into(),
        amount_minor: 100,
        payment_reference: "pay-1".into(),
    });
    let meta = Meta {
        topic: "orders".into(),
        partition: 0,
        offset: 0,
        trace: Default::default(),
        span: tracing::Span::none(),
    };
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let mut tx = pool.begin().await.unwrap();
    for error in [
        "LOADING Redis is loading the dataset in memory",
        "READONLY You can't write against a read only replica.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "BUSY Redis is busy running a script.",
        "OOM command not allowed when used memory > 'maxmemory'.",
        "TRYAGAIN Multiple keys request during rehashing of slot",
    ] {
        redis.answer_redis_error(Some(error));
        let code = error.split(' ').next().unwrap();
        // The first call after the switch may meet the connection it cut; the next is answered.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let failed = group
                .handle_batch(&mut tx, &[(&paid, &meta)])
                .await
                .expect_err(error);
            let HandlerError::Unavailable(cause) = &failed else {
                panic!("{error}: {failed} is not an outage");
            };
            let answered = cause
                .downcast_ref::<redis::RedisError>()
                .and_then(|e| e.code())
                .is_some_and(|c| c == code);
            if answered {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{error}: still {failed}"
            );
        }
    }
    redis.answer_redis_error(None);
    // Reconnected, the group's effect lands.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Err(e) = group.handle_batch(&mut tx, &[(&paid, &meta)]).await {
        assert!(
            std::time::Instant::now() < deadline,
            "Redis back, still {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(cache.versions(&[order_id]).await.unwrap(), vec![Some(2)]);
}
