//! keel's registry behind HTTP basic auth (`KEEL_REGISTRY_BASIC_AUTH`), answering as Confluent's
//! does with `authentication.method=BASIC`.

use keel_core::settings::BasicAuth;
use keel_core::testkit::TestDb;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn every_request_but_the_probes_needs_the_credentials_and_is_refused_as_confluent_refuses() {
    let db = TestDb::new().await;
    let shutdown = CancellationToken::new();
    let auth = BasicAuth {
        user: "keel".into(),
        password: "pa:ss word".into(),
    };
    let (addr, _task) = keel_schemas::registry::spawn_with_auth(
        &db.url,
        "127.0.0.1:0".parse().unwrap(),
        Some(auth),
        shutdown.clone(),
    )
    .await
    .expect("registry starts");
    let http = reqwest::Client::new();
    let get = |path: &str, credentials: Option<(&str, &str)>| {
        let request = http.get(format!("http://{addr}{path}"));
        let request = match credentials {
            Some((user, password)) => request.basic_auth(user, Some(password)),
            None => request,
        };
        request.send()
    };

    for path in [
        "/",
        "/subjects",
        "/config",
        "/schemas/ids/1",
        "/no/such/path",
    ] {
        for credentials in [None, Some(("keel", "wrong")), Some(("other", "pa:ss word"))] {
            let response = get(path, credentials).await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{path} {credentials:?}"
            );
            assert_eq!(
                response.headers()["www-authenticate"],
                "Basic realm=\"SchemaRegistry\""
            );
            assert_eq!(
                response.headers()["content-type"],
                "application/vnd.schemaregistry.v1+json"
            );
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error_code"], 401, "{body}");
            assert_eq!(body["message"], "Unauthorized", "{body}");
        }
    }
    let response = get("/subjects", Some(("keel", "pa:ss word")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        serde_json::json!([])
    );
    // Probes carry no credentials and learn nothing about schemas.
    for path in ["/health", "/ready"] {
        assert_eq!(
            get(path, None).await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
    }
    shutdown.cancel();
}
