//! A registry in trouble (an overloaded or failing proxy, a registry whose store is down) is
//! retried; a registry's verdict on the schema is not. The answers come from a real HTTP server
//! that answers every request with one status and Confluent's error body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use axum::http::StatusCode;
use keel_schemas::Encoder;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_registry_in_trouble_is_retried_and_its_verdict_on_a_schema_is_not() {
    let status = Arc::new(AtomicU16::new(500));
    let answer = status.clone();
    let app = axum::Router::new().fallback(move || {
        let code = answer.load(Ordering::SeqCst);
        async move {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (
                code,
                [("content-type", "application/vnd.schemaregistry.v1+json")],
                format!(
                    r#"{{"error_code":{},"message":"answered {}"}}"#,
                    code.as_u16(),
                    code.as_u16()
                ),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
    });

    let encoder = Encoder::new(&format!("http://{addr}")).unwrap();
    for (code, transient) in [
        (500, true),
        (504, true),
        (429, true),
        (503, true),
        (401, true),
        (409, false),
        (422, false),
    ] {
        status.store(code, Ordering::SeqCst);
        let error = encoder
            .prepare("orders", "keel.orders")
            .await
            .expect_err("the registry refuses every request");
        assert_eq!(error.transient, transient, "{code}: {error}");
        assert!(error.message.contains(&code.to_string()), "{code}: {error}");
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}
