//! Scenario 2, order write path: `POST /orders` from concurrent clients against the same
//! transaction issued directly; its rate is the capacity the end-to-end scenario loads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::testkit::{free_port, wait_ready};
use serde_json::json;

use crate::bench::{Bench, order_body, percentile, rate};
use crate::report;

/// Runs `clients` loops of `op` for `window`; returns (operations per second, sorted latencies).
async fn closed_loop<F, Fut>(
    clients: usize,
    window: Duration,
    op: F,
) -> anyhow::Result<(f64, Vec<f64>)>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                op().await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let took = started.elapsed();
    all.sort_by(f64::total_cmp);
    Ok((rate(all.len() as f64, took), all))
}

/// Scenario 2: `POST /orders` with N clients against the same transaction issued directly.
/// Returns the HTTP path's orders per second (the capacity scenario 3 loads to 20% and 80%).
pub(crate) async fn write_path(bench: &Bench, report: &mut report::Report) -> anyhow::Result<f64> {
    let topic = bench.topic("write").await?;
    let port = free_port()?;
    let service = bench.keel("order-service", &["order-service"], |s| {
        s.order_service_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        s.topics.orders = topic.clone();
    })?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        "the order service",
        &format!("{url}/ready"),
        Duration::from_secs(60),
        || service.exited(),
    )
    .await?;
    let window = Duration::from_secs(bench.args.seconds);
    let body = order_body();
    let (http_rate, http_lat) = {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        closed_loop(bench.args.clients, window, move || {
            let (http, url, body) = (http.clone(), url.clone(), body.clone());
            async move {
                let r = http
                    .post(format!("{url}/orders"))
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 201, "POST /orders answered {}", r.status());
                Ok(())
            }
        })
        .await?
    };
    report.memory("order-service", service.peak_rss_mib());
    service.terminate()?;

    let new: keel_producers::domain::NewOrder = serde_json::from_value(body)?;
    let valid = keel_producers::domain::validate(&new)
        .map_err(|e| anyhow::anyhow!("bench order invalid: {e:?}"))?;
    let (pool, topic2) = (bench.pool.clone(), topic.clone());
    let (sql_rate, sql_lat) = closed_loop(bench.args.clients, window, move || {
        let (pool, topic, valid) = (pool.clone(), topic2.clone(), valid.clone());
        async move {
            let mut tx = pool.begin().await?;
            keel_producers::routes::insert_order(&mut tx, &topic, valid, &Default::default())
                .await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    // Not published by anyone: the relay of scenario 3 must not find them.
    sqlx::query("DELETE FROM outbox.events WHERE topic = $1")
        .bind(&topic)
        .execute(&bench.pool)
        .await?;
    report.scenario(
        "order write path",
        json!({
            "clients": bench.args.clients,
            "http_per_s": http_rate, "http_p50_ms": percentile(&http_lat, 50.0), "http_p99_ms": percentile(&http_lat, 99.0),
            "sql_per_s": sql_rate, "sql_p50_ms": percentile(&sql_lat, 50.0), "sql_p99_ms": percentile(&sql_lat, 99.0),
        }),
        http_rate / sql_rate,
        0.7,
    );
    Ok(http_rate)
}
