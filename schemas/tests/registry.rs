//! The registry's REST API over real HTTP and PostgreSQL, and keel's codec against it.

use keel_core::testkit::TestDb;
use keel_schemas::events::{Contract, Customer, OrderCreated, OrderLine};
use keel_schemas::{DecodeError, Decoder, Encoder, Event};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Registry {
    url: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _db: TestDb,
}

impl Registry {
    async fn start() -> Self {
        let db = TestDb::new().await;
        let shutdown = CancellationToken::new();
        let (addr, _task) = keel_schemas::registry::spawn(
            &db.url,
            "127.0.0.1:0".parse().unwrap(),
            shutdown.clone(),
        )
        .await
        .expect("registry starts");
        Self {
            url: format!("http://{addr}"),
            http: reqwest::Client::new(),
            shutdown,
            _db: db,
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("registry answers");
        let status = resp.status();
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/vnd.schemaregistry.v1+json"),
            "{path}"
        );
        (status, resp.json().await.expect("JSON body"))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn record(fields: Value) -> String {
    json!({"type": "record", "name": "Thing", "namespace": "test", "fields": fields}).to_string()
}

#[tokio::test]
async fn register_lookup_and_fetch_follow_confluents_api() {
    let r = Registry::start().await;
    let v1 = record(json!([{"name": "a", "type": "string"}]));

    let (status, body) = r
        .post("/subjects/things-value/versions", json!({"schema": v1}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["id"].as_i64().expect("id");

    // The same schema again, even reformatted, is the same id and no new version.
    let reformatted =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&v1).unwrap()).unwrap();
    let (_, again) = r
        .post(
            "/subjects/things-value/versions",
            json!({"schema": reformatted, "schemaType": "AVRO"}),
        )
        .await;
    assert_eq!(again["id"].as_i64(), Some(id));
    // Under another subject it keeps its id and gets version 1 there.
    let (_, other) = r
        .post("/subjects/other-value/versions", json!({"schema": v1}))
        .await;
    assert_eq!(other["id"].as_i64(), Some(id));
    assert_eq!(r.get("/subjects/things-value/versions").await.1, json!([1]));

    let (status, found) = r
        .post("/subjects/things-value", json!({"schema": v1}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found["subject"], "things-value");
    assert_eq!(found["version"], 1);
    assert_eq!(found["id"].as_i64(), Some(id));

    let (status, by_id) = r.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_id["schema"].as_str(), Some(v1.as_str()));
    // The converter crate asks with ?deleted=true.
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}?deleted=true")).await.0,
        StatusCode::OK
    );

    let v2 = record(
        json!([{"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0}]),
    );
    let (status, body) = r
        .post("/subjects/things-value/versions", json!({"schema": v2}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["id"].as_i64(), Some(id));
    let (_, latest) = r.get("/subjects/things-value/versions/latest").await;
    assert_eq!(latest["version"], 2);
    assert_eq!(
        r.get("/subjects/things-value/versions/1").await.1["id"].as_i64(),
        Some(id)
    );
    assert_eq!(
        r.get("/subjects").await.1,
        json!(["other-value", "things-value"])
    );
}

#[tokio::test]
async fn incompatible_schemas_are_refused_with_409_and_the_reason() {
    let r = Registry::start().await;
    let v1 = record(json!([{"name": "a", "type": "string"}]));
    assert_eq!(
        r.post("/subjects/s/versions", json!({"schema": v1}))
            .await
            .0,
        StatusCode::OK
    );

    // A new field without a default: the new schema cannot read old data (BACKWARD, the default).
    let breaking = record(json!([{"name": "a", "type": "string"}, {"name": "qty", "type": "int"}]));
    let (status, body) = r
        .post("/subjects/s/versions", json!({"schema": breaking}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error_code"], 40901);
    let message = body["message"].as_str().unwrap();
    // Confluent's form: the rule, the path in the new schema, the old version and the level.
    assert!(
        message.starts_with(
            "Schema being registered is incompatible with an earlier schema for subject \"s\", details: [{errorType:'READER_FIELD_MISSING_DEFAULT_VALUE', description:'The field 'qty' at path '/fields/1' in the new schema has no default value and is missing in the old schema', additionalInfo:'qty'}, {oldSchemaVersion: 1}, {oldSchema: '"
        ) && message.ends_with("{validateFields: 'false', compatibility: 'BACKWARD'}]"),
        "{message}"
    );
    assert_eq!(
        r.get("/subjects/s/versions").await.1,
        json!([1]),
        "nothing was registered"
    );

    let (_, verdict) = r
        .post(
            "/compatibility/subjects/s/versions/latest?verbose=true",
            json!({"schema": breaking}),
        )
        .await;
    assert_eq!(verdict["is_compatible"], false);
    assert!(verdict["messages"][0].as_str().unwrap().contains("qty"));

    // With the subject's level set to NONE the same schema is accepted.
    assert_eq!(
        r.get("/config").await.1,
        json!({"compatibilityLevel": "BACKWARD"})
    );
    let (status, _) = r
        .call(
            reqwest::Method::PUT,
            "/config/s",
            Some(json!({"compatibility": "NONE"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        r.get("/config/s").await.1,
        json!({"compatibilityLevel": "NONE"})
    );
    assert_eq!(
        r.post("/subjects/s/versions", json!({"schema": breaking}))
            .await
            .0,
        StatusCode::OK
    );
    let (status, body) = r
        .call(
            reqwest::Method::PUT,
            "/config",
            Some(json!({"compatibility": "SIDEWAYS"})),
        )
        .await;
    assert_eq!(
        (status, body["error_code"].as_i64()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some(42203))
    );
}

#[tokio::test]
async fn errors_carry_confluents_codes() {
    let r = Registry::start().await;
    let schema = record(json!([{"name": "a", "type": "string"}]));
    let code = |(status, body): (StatusCode, Value)| {
        (status.as_u16(), body["error_code"].as_i64().unwrap_or(0))
    };

    assert_eq!(code(r.get("/subjects/nope/versions").await), (404, 40401));
    assert_eq!(
        code(r.get("/subjects/nope/versions/latest").await),
        (404, 40401)
    );
    assert_eq!(
        code(r.post("/subjects/nope", json!({"schema": schema})).await),
        (404, 40401)
    );
    assert_eq!(code(r.get("/schemas/ids/424242").await), (404, 40403));

    r.post("/subjects/s/versions", json!({"schema": schema}))
        .await;
    assert_eq!(code(r.get("/subjects/s/versions/7").await), (404, 40402));
    assert_eq!(code(r.get("/subjects/s/versions/zero").await), (422, 42202));
    let unknown = record(json!([{"name": "z", "type": "long"}]));
    assert_eq!(
        code(r.post("/subjects/s", json!({"schema": unknown})).await),
        (404, 40403)
    );
    let (status, body) = r
        .post(
            "/subjects/s/versions",
            json!({"schema": "{\"type\": \"record\", \"name\": \"X\"}"}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error_code"].as_i64()),
        (422, Some(42201))
    );
    assert!(
        body["message"].as_str().unwrap().contains("Invalid schema"),
        "{body}"
    );
    assert_eq!(code(r.get("/config/s").await), (404, 40408));

    // Soft delete, then permanent delete, Confluent's two steps.
    assert_eq!(
        code(
            r.call(reqwest::Method::DELETE, "/subjects/s?permanent=true", None)
                .await
        ),
        (404, 40405)
    );
    assert_eq!(
        r.call(reqwest::Method::DELETE, "/subjects/s", None).await.1,
        json!([1])
    );
    assert_eq!(code(r.get("/subjects/s/versions").await), (404, 40401));
    assert_eq!(r.get("/subjects?deleted=true").await.1, json!(["s"]));
    assert_eq!(
        code(r.call(reqwest::Method::DELETE, "/subjects/s", None).await),
        (404, 40404)
    );
    assert_eq!(
        r.call(reqwest::Method::DELETE, "/subjects/s?permanent=true", None)
            .await
            .1,
        json!([1])
    );
    assert_eq!(r.get("/subjects?deleted=true").await.1, json!([]));
}

#[tokio::test]
async fn concurrent_registrations_of_one_schema_get_one_id_and_one_version() {
    let r = Registry::start().await;
    let schema = record(json!([{"name": "a", "type": "string"}]));
    let results = futures::future::join_all(
        (0..8).map(|_| r.post("/subjects/race/versions", json!({"schema": schema}))),
    )
    .await;
    let ids: Vec<&Value> = results
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            &body["id"]
        })
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(r.get("/subjects/race/versions").await.1, json!([1]));
}

fn sample() -> Event {
    Event::OrderCreated(OrderCreated {
        event_id: uuid::Uuid::new_v4(),
        occurred_at: 1_764_000_000_000,
        order_id: uuid::Uuid::new_v4(),
        order_version: 1,
        customer: Customer {
            id: "c-9".into(),
            email: "c9@example.com".into(),
            name: "Nine".into(),
        },
        currency: "EUR".into(),
        lines: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 3,
            unit_price_minor: 250,
        }],
        total_minor: 750,
        channel: "web".into(),
    })
}

#[tokio::test]
async fn keel_encodes_in_confluent_wire_format_and_decodes_back() {
    let r = Registry::start().await;
    let encoder = Encoder::new(&r.url).unwrap();
    encoder
        .prepare("orders", "keel.orders")
        .await
        .expect("contracts register");
    let subject = format!("orders-{}", OrderCreated::NAME);
    let (_, latest) = r.get(&format!("/subjects/{subject}/versions/latest")).await;
    let id = latest["id"]
        .as_i64()
        .expect("registered under TopicRecordNameStrategy") as u32;

    let event = sample();
    let bytes = encoder.encode("orders", &event).await.unwrap();
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(
        u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
        id
    );

    let decoder = Decoder::new(&r.url).unwrap();
    assert_eq!(decoder.decode(Some(&bytes)).await.unwrap(), event);

    // Garbage is a permanent failure; it will never decode. An unknown schema id is worth a
    // bounded retry (a lagging replica answers 404 too).
    assert!(matches!(
        decoder.decode(Some(b"not avro")).await,
        Err(DecodeError::Permanent(_))
    ));
    let mut unknown = bytes.clone();
    unknown[1..5].copy_from_slice(&999_999u32.to_be_bytes());
    assert!(matches!(
        decoder.decode(Some(&unknown)).await,
        Err(DecodeError::UnknownSchema(_))
    ));
}

#[tokio::test]
async fn an_id_the_registry_did_not_know_yet_decodes_once_it_does() {
    // A replica that lags its leader answers 404 for an id registered a moment ago. Here the id
    // keel's registry hands out next plays that id: unknown at first, then registered.
    let r = Registry::start().await;
    let (status, thing) = r
        .post(
            "/subjects/thing-value/versions",
            json!({"schema": record(json!([{"name": "a", "type": "string"}]))}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{thing}");
    let next = u32::try_from(thing["id"].as_u64().unwrap() + 1).unwrap();
    // The event's Avro body, as another registry's encoder writes it.
    let elsewhere = Registry::start().await;
    let event = sample();
    let body = Encoder::new(&elsewhere.url)
        .unwrap()
        .encode("orders", &event)
        .await
        .unwrap()[5..]
        .to_vec();
    let early = [&[0u8][..], &next.to_be_bytes(), &body].concat();

    let decoder = Decoder::new(&r.url).unwrap();
    assert!(matches!(
        decoder.decode(Some(&early)).await,
        Err(DecodeError::UnknownSchema(_))
    ));
    let registered = Encoder::new(&r.url)
        .unwrap()
        .encode("orders", &event)
        .await
        .unwrap();
    assert_eq!(
        registered[1..5],
        next.to_be_bytes(),
        "the id that was unknown"
    );
    // The 404 is not remembered: the decoder asks again.
    assert_eq!(decoder.decode(Some(&early)).await.unwrap(), event);
}

#[tokio::test]
async fn a_store_error_answers_503_so_that_clients_retry_it() {
    let r = Registry::start().await;
    let pool = r._db.pool().await;
    sqlx::query("DROP SCHEMA registry CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    let (status, body) = r.get("/schemas/ids/1").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error_code"], 50001, "{body}");
    let decoder = Decoder::new(&r.url).unwrap();
    assert!(matches!(
        decoder.decode(Some(&[0, 0, 0, 0, 1, 2])).await,
        Err(DecodeError::Transient(_))
    ));
}

#[tokio::test]
async fn an_unreachable_registry_is_a_transient_decode_failure() {
    // Nothing listens on port 9 of loopback.
    let decoder = Decoder::new("http://127.0.0.1:9").unwrap();
    let mut bytes = vec![0, 0, 0, 0, 1];
    bytes.extend_from_slice(&[2, 3]);
    assert!(matches!(
        decoder.decode(Some(&bytes)).await,
        Err(DecodeError::Transient(_))
    ));
}

#[tokio::test]
async fn a_restarted_registry_keeps_every_id() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let register = |url: String, subject: &'static str, schema: String| {
        let http = http.clone();
        async move {
            let body: Value = http
                .post(format!("{url}/subjects/{subject}/versions"))
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(json!({"schema": schema}).to_string())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["id"].as_i64().expect("an id")
        }
    };
    let a = record(json!([{"name": "a", "type": "string"}]));
    let b = record(
        json!([{"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0}]),
    );

    let first = CancellationToken::new();
    let (addr, task) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), first.clone())
            .await
            .unwrap();
    let url = format!("http://{addr}");
    let ids = (
        register(url.clone(), "one", a.clone()).await,
        register(url.clone(), "one", b.clone()).await,
        register(url.clone(), "two", a.clone()).await,
    );
    assert_eq!(ids.0, ids.2, "one schema, one id across subjects");
    first.cancel();
    task.await.unwrap().unwrap();

    let second = CancellationToken::new();
    let (addr, _) =
        keel_schemas::registry::spawn(&db.url, "127.0.0.1:0".parse().unwrap(), second.clone())
            .await
            .unwrap();
    let url = format!("http://{addr}");
    let schema_of = |id: i64| {
        let url = url.clone();
        async move {
            let body: Value = reqwest::get(format!("{url}/schemas/ids/{id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            body["schema"].as_str().map(str::to_owned)
        }
    };
    assert!(
        schema_of(ids.0)
            .await
            .is_some_and(|s| s.contains("\"a\"") && !s.contains("\"b\""))
    );
    assert!(schema_of(ids.1).await.is_some_and(|s| s.contains("\"b\"")));
    assert_eq!(
        register(url.clone(), "one", b).await,
        ids.1,
        "re-registering finds the old id"
    );
    let versions: Value = reqwest::get(format!("{url}/subjects/one/versions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(versions, json!([1, 2]));
    second.cancel();
}

#[tokio::test]
async fn a_compatibility_check_without_a_version_checks_what_registering_would() {
    let r = Registry::start().await;
    let v1 = record(json!([{"name": "a", "type": "int"}]));
    let v2 = record(json!([{"name": "b", "type": "int", "default": 0}]));
    // Reads v2's data, but not v1's (`a` was an int).
    let v3 = record(json!([
        {"name": "a", "type": "string", "default": ""},
        {"name": "b", "type": "int", "default": 0}
    ]));
    for v in [&v1, &v2] {
        let (status, body) = r.post("/subjects/s/versions", json!({"schema": v})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // BACKWARD compares with the latest version only, as registering does.
    let (_, verdict) = r
        .post(
            "/compatibility/subjects/s/versions?verbose=true",
            json!({"schema": v3}),
        )
        .await;
    assert_eq!(verdict, json!({"is_compatible": true, "messages": []}));
    // The _TRANSITIVE level compares with every version.
    r.call(
        reqwest::Method::PUT,
        "/config/s",
        Some(json!({"compatibility": "BACKWARD_TRANSITIVE"})),
    )
    .await;
    let (_, verdict) = r
        .post(
            "/compatibility/subjects/s/versions?verbose=true",
            json!({"schema": v3}),
        )
        .await;
    assert_eq!(verdict["is_compatible"], false, "{verdict}");
    let messages: Vec<&str> = verdict["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        messages[0].starts_with("{errorType:'TYPE_MISMATCH', description:'The type (path '/fields/0/type') of a field in the new schema does not match with the old schema'"),
        "{messages:?}"
    );
    assert_eq!(messages[1], "{oldSchemaVersion: 1}");
    assert_eq!(
        messages[3],
        "{validateFields: 'false', compatibility: 'BACKWARD_TRANSITIVE'}"
    );
    // Without verbose, the verdict alone.
    let (_, verdict) = r
        .post("/compatibility/subjects/s/versions", json!({"schema": v3}))
        .await;
    assert_eq!(verdict, json!({"is_compatible": false}));
}

#[tokio::test]
async fn a_subject_with_a_control_character_is_refused_with_42208() {
    let r = Registry::start().await;
    let schema = record(json!([{"name": "a", "type": "string"}]));
    for path in [
        "/subjects/bad%0Asubject/versions",
        "/subjects/bad%07subject",
    ] {
        let (status, body) = r.post(path, json!({"schema": schema})).await;
        assert_eq!(
            (status.as_u16(), body["error_code"].as_i64()),
            (422, Some(42208)),
            "{path}: {body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .starts_with("The specified subject 'bad"),
            "{body}"
        );
    }
    assert_eq!(r.get("/subjects").await.1, json!([]), "nothing registered");
}

#[tokio::test]
async fn a_client_that_accepts_plain_json_is_answered_in_plain_json() {
    let r = Registry::start().await;
    let content_type = |accept: Option<&'static str>| {
        let http = r.http.clone();
        let url = format!("{}/subjects", r.url);
        async move {
            let mut req = http.get(url);
            if let Some(a) = accept {
                req = req.header("accept", a);
            }
            let resp = req.send().await.unwrap();
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        }
    };
    assert_eq!(
        content_type(Some("application/json")).await.as_deref(),
        Some("application/json")
    );
    for accept in [
        None,
        Some("*/*"),
        Some("application/vnd.schemaregistry.v1+json, application/json"),
    ] {
        assert_eq!(
            content_type(accept).await.as_deref(),
            Some("application/vnd.schemaregistry.v1+json"),
            "{accept:?}"
        );
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_with_confluents_error_body() {
    let r = Registry::start().await;
    assert_eq!(
        r.get("/no/such/route").await,
        (
            StatusCode::NOT_FOUND,
            json!({"error_code": 404, "message": "HTTP 404 Not Found"})
        )
    );
    assert_eq!(
        r.call(reqwest::Method::DELETE, "/schemas/types", None)
            .await,
        (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error_code": 405, "message": "HTTP 405 Method Not Allowed"})
        )
    );
    // The global mode cannot be deleted, only set.
    let (status, body) = r.call(reqwest::Method::DELETE, "/mode", None).await;
    assert_eq!(
        (status, body["error_code"].as_i64()),
        (StatusCode::METHOD_NOT_ALLOWED, Some(405))
    );
    // A reference to a version that does not exist is an invalid schema; what is not supported
    // answers with Confluent's errors too.
    let schema = record(json!([{"name": "a", "type": "string"}]));
    let references = json!([{"name": "x", "subject": "y", "version": 1}]);
    let (status, body) = r
        .post(
            "/subjects/s/versions",
            json!({"schema": schema, "references": references}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error_code"].as_i64()),
        (422, Some(42201)),
        "{body}"
    );
    // Metadata and rule sets are accepted and ignored.
    let (status, body) = r
        .post(
            "/subjects/s/versions",
            json!({"schema": schema, "metadata": {"properties": {"owner": "x"}}, "ruleSet": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for schema_type in ["PROTOBUF", "JSON"] {
        let (status, body) = r
            .post(
                "/subjects/s/versions",
                json!({"schema": schema, "schemaType": schema_type}),
            )
            .await;
        assert_eq!(
            (status.as_u16(), body["error_code"].as_i64()),
            (422, Some(42201)),
            "{body}"
        );
    }
}

#[tokio::test]
async fn the_listing_mode_and_metadata_routes_answer_as_confluents_do() {
    let r = Registry::start().await;
    let schema = record(json!([{"name": "a", "type": "string"}]));
    let v2 = record(
        json!([{"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0}]),
    );
    let id = r
        .post("/subjects/a-value/versions", json!({"schema": schema}))
        .await
        .1["id"]
        .as_i64()
        .unwrap();
    r.post("/subjects/b-value/versions", json!({"schema": schema}))
        .await;
    let id2 = r
        .post("/subjects/b-value/versions", json!({"schema": v2}))
        .await
        .1["id"]
        .as_i64()
        .unwrap();

    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/subjects")).await,
        (StatusCode::OK, json!(["a-value", "b-value"]))
    );
    let (status, body) = r.get("/schemas/ids/424242/subjects").await;
    assert_eq!(
        (status, body["error_code"].as_i64()),
        (StatusCode::NOT_FOUND, Some(40403))
    );

    let (_, all) = r.get("/schemas").await;
    let listed: Vec<(String, i64, i64)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["subject"].as_str().unwrap().to_owned(),
                v["version"].as_i64().unwrap(),
                v["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("a-value".to_owned(), 1, id),
            ("b-value".to_owned(), 1, id),
            ("b-value".to_owned(), 2, id2)
        ]
    );
    let (_, latest) = r.get("/schemas?subjectPrefix=b-&latestOnly=true").await;
    assert_eq!(latest.as_array().unwrap().len(), 1, "{latest}");
    assert_eq!(latest[0]["version"], 2);
    assert_eq!(latest[0]["schema"].as_str(), Some(v2.as_str()));

    assert_eq!(
        r.get("/subjects/b-value/versions/1/referencedby").await,
        (StatusCode::OK, json!([]))
    );
    let (status, body) = r.get("/subjects/b-value/versions/9/referencedby").await;
    assert_eq!(
        (status, body["error_code"].as_i64()),
        (StatusCode::NOT_FOUND, Some(40402))
    );

    assert_eq!(r.get("/mode").await.1, json!({"mode": "READWRITE"}));
    let (status, body) = r.get("/mode/a-value").await;
    assert_eq!(
        (status, body["error_code"].as_i64()),
        (StatusCode::NOT_FOUND, Some(40409))
    );
    assert_eq!(
        r.get("/mode/a-value?defaultToGlobal=true").await.1,
        json!({"mode": "READWRITE"})
    );
    assert_eq!(r.get("/contexts").await.1, json!(["."]));
    let (status, metadata) = r.get("/v1/metadata/id").await;
    assert_eq!(status, StatusCode::OK);
    assert!(metadata["scope"]["clusters"].is_object(), "{metadata}");
}

/// The status and Confluent `error_code` of an answer.
fn status_code(answer: &(StatusCode, Value)) -> (u16, Option<i64>) {
    (answer.0.as_u16(), answer.1["error_code"].as_i64())
}

#[tokio::test]
async fn two_spellings_of_one_schema_are_one_schema_with_one_id() {
    let r = Registry::start().await;
    let (_, first) = r
        .post(
            "/subjects/s/versions",
            json!({"schema": r#"{"type":"string"}"#}),
        )
        .await;
    let id = first["id"].as_i64().expect("an id");
    let (_, again) = r
        .post("/subjects/s/versions", json!({"schema": r#""string""#}))
        .await;
    assert_eq!(again["id"].as_i64(), Some(id));
    assert_eq!(r.get("/subjects/s/versions").await.1, json!([1]));
    let (status, found) = r
        .post("/subjects/s", json!({"schema": r#""string""#}))
        .await;
    assert_eq!(
        (status, found["version"].as_i64()),
        (StatusCode::OK, Some(1))
    );

    // A full name, or a name and a namespace: one schema, found by either spelling.
    let full = r#"{"type":"record","name":"ns.R","fields":[{"name":"a","type":"int"}]}"#;
    let split =
        r#"{"type":"record","name":"R","namespace":"ns","fields":[{"name":"a","type":"int"}]}"#;
    let (_, by_full) = r
        .post("/subjects/r/versions", json!({"schema": full}))
        .await;
    let (status, found) = r.post("/subjects/r", json!({"schema": split})).await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["id"], by_full["id"]);
    assert_eq!(
        r.post("/subjects/other/versions", json!({"schema": split}))
            .await
            .1["id"],
        by_full["id"]
    );
    // What does change the schema still changes the id.
    let (_, with_doc) = r
        .post(
            "/subjects/r2/versions",
            json!({"schema": r#"{"type":"record","name":"ns.R","doc":"d","fields":[{"name":"a","type":"int"}]}"#}),
        )
        .await;
    assert_ne!(with_doc["id"], by_full["id"]);
    // Custom properties (Kafka Connect's among them) are part of the schema; a field's default
    // sort order is not.
    let int16 = r#"{"type":"int","connect.type":"int16"}"#;
    let (_, plain) = r
        .post("/subjects/i/versions", json!({"schema": r#""int""#}))
        .await;
    let (_, connect) = r
        .post("/subjects/i16/versions", json!({"schema": int16}))
        .await;
    assert_ne!(plain["id"], connect["id"]);
    let (_, stored) = r.get(&format!("/schemas/ids/{}", connect["id"])).await;
    assert_eq!(stored["schema"].as_str(), Some(int16));
    let ordered = r#"{"type":"record","name":"ns.R","fields":[{"name":"a","type":"int","order":"ascending"}]}"#;
    assert_eq!(
        r.post("/subjects/r", json!({"schema": ordered})).await.1["id"],
        by_full["id"]
    );

    // normalize=true stores the normalised form: what GET /schemas/ids answers.
    let spaced = "{ \"type\": \"record\", \"name\": \"N\", \"fields\": [ {\"type\": \"long\", \"name\": \"n\"} ] }";
    let (status, body) = r
        .post(
            "/subjects/n/versions?normalize=true",
            json!({"schema": spaced}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, stored) = r.get(&format!("/schemas/ids/{}", body["id"])).await;
    assert_eq!(
        stored["schema"],
        r#"{"fields":[{"name":"n","type":"long"}],"name":"N","type":"record"}"#
    );
    let (status, found) = r
        .post("/subjects/n?normalize=true", json!({"schema": spaced}))
        .await;
    assert_eq!(
        (status, found["id"].clone()),
        (StatusCode::OK, body["id"].clone())
    );
}

#[tokio::test]
async fn ids_stored_under_the_first_identity_rule_are_found_by_the_parsed_schema() {
    let db = TestDb::new().await;
    let start = |shutdown: CancellationToken| {
        let url = db.url.clone();
        async move {
            let (addr, task) =
                keel_schemas::registry::spawn(&url, "127.0.0.1:0".parse().unwrap(), shutdown)
                    .await
                    .expect("registry starts");
            (format!("http://{addr}"), task)
        }
    };
    let http = reqwest::Client::new();
    let post = |url: String, body: Value| {
        let http = http.clone();
        async move {
            let resp = http
                .post(url)
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string())
                .send()
                .await
                .expect("registry answers");
            (
                resp.status(),
                resp.json::<Value>().await.expect("JSON body"),
            )
        }
    };
    let first = CancellationToken::new();
    let (url, task) = start(first.clone()).await;
    let braced = r#"{"type":"string"}"#;
    let id = post(
        format!("{url}/subjects/s/versions"),
        json!({"schema": braced}),
    )
    .await
    .1["id"]
        .as_i64()
        .expect("an id");
    let other = post(
        format!("{url}/subjects/t/versions"),
        json!({"schema": r#""string""#}),
    )
    .await
    .1["id"]
        .as_i64()
        .expect("an id");
    assert_eq!(other, id);
    first.cancel();
    task.await.unwrap().unwrap();

    // Put the registry back as the first rule left it: two rows for one schema, each with the
    // raw JSON of its spelling as identity.
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query(
        "UPDATE registry.schemas SET normalized = $1, fingerprint = sha256(convert_to($1, 'UTF8')), identity_form = 1 WHERE id = $2",
    )
    .bind(r#"{"type":"string"}"#)
    .bind(id as i32)
    .execute(&pool)
    .await
    .unwrap();
    let legacy: i32 = sqlx::query_scalar(
        "INSERT INTO registry.schemas (schema, normalized, fingerprint) VALUES ('\"string\"', '\"string\"', sha256(convert_to('\"string\"', 'UTF8'))) RETURNING id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE registry.subject_versions SET schema_id = $1 WHERE subject = 't'")
        .bind(legacy)
        .execute(&pool)
        .await
        .unwrap();

    let second = CancellationToken::new();
    let (url, _task) = start(second.clone()).await;
    let forms: Vec<i16> =
        sqlx::query_scalar("SELECT identity_form FROM registry.schemas ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(forms, [2, 2], "every row rewritten at start-up");
    // Both ids stay, each found under its subject by either spelling; new registrations get
    // one of them.
    for (subject, held) in [("s", id), ("t", legacy as i64)] {
        for spelling in [braced, r#""string""#] {
            let (status, found) = post(
                format!("{url}/subjects/{subject}"),
                json!({"schema": spelling}),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{subject} {spelling}: {found}");
            assert_eq!(found["id"].as_i64(), Some(held), "{subject} {spelling}");
        }
    }
    let fresh = post(
        format!("{url}/subjects/u/versions"),
        json!({"schema": r#""string""#}),
    )
    .await
    .1["id"]
        .as_i64();
    assert!(
        fresh == Some(id) || fresh == Some(legacy as i64),
        "{fresh:?}"
    );
    second.cancel();
}

#[tokio::test]
async fn record_aliases_and_enum_defaults_read_what_the_specification_says_they_read() {
    let r = Registry::start().await;
    let old = json!({"type": "record", "name": "Old", "namespace": "test",
        "fields": [{"name": "a", "type": "string"}]})
    .to_string();
    r.post("/subjects/renamed/versions", json!({"schema": old}))
        .await;
    // A reader whose alias names the writer's record reads it (Avro's resolution rules).
    let aliased = json!({"type": "record", "name": "New", "namespace": "test", "aliases": ["Old"],
        "fields": [{"name": "b", "type": "string", "aliases": ["a"]}]})
    .to_string();
    let (status, body) = r
        .post("/subjects/renamed/versions", json!({"schema": aliased}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Without the alias the name has changed.
    let renamed = json!({"type": "record", "name": "Other", "namespace": "test",
        "fields": [{"name": "b", "type": "string", "aliases": ["a"]}]})
    .to_string();
    let (status, body) = r
        .post(
            "/compatibility/subjects/renamed/versions/1?verbose=true",
            json!({"schema": renamed}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["is_compatible"], false);
    assert!(
        body["messages"][0]
            .as_str()
            .is_some_and(|m| m.contains("NAME_MISMATCH")),
        "{body}"
    );

    let colours = |symbols: Value, default: Option<&str>| {
        let mut e = json!({"type": "enum", "name": "Colour", "symbols": symbols});
        if let Some(d) = default {
            e["default"] = json!(d);
        }
        json!({"type": "record", "name": "Paint", "fields": [{"name": "c", "type": e}]}).to_string()
    };
    r.post(
        "/subjects/paint/versions",
        json!({"schema": colours(json!(["RED", "GREEN", "BLUE"]), None)}),
    )
    .await;
    // A reader without BLUE but with a default reads BLUE as the default.
    let (status, body) = r
        .post(
            "/compatibility/subjects/paint/versions/latest?verbose=true",
            json!({"schema": colours(json!(["RED", "GREEN"]), Some("RED"))}),
        )
        .await;
    assert_eq!(
        (status, body["is_compatible"].clone()),
        (StatusCode::OK, json!(true)),
        "{body}"
    );
    let (_, body) = r
        .post(
            "/compatibility/subjects/paint/versions/latest?verbose=true",
            json!({"schema": colours(json!(["RED", "GREEN"]), None)}),
        )
        .await;
    assert_eq!(body["is_compatible"], false);
    assert!(
        body["messages"][0]
            .as_str()
            .is_some_and(|m| m.contains("MISSING_ENUM_SYMBOLS")
                && m.contains("[BLUE]")
                && m.contains("/fields/0/type/symbols")),
        "{body}"
    );
}

#[tokio::test]
async fn soft_deleted_versions_answer_as_confluents_do() {
    let r = Registry::start().await;
    let schema = record(json!([{"name": "a", "type": "string"}]));
    let id = r
        .post("/subjects/s/versions", json!({"schema": schema}))
        .await
        .1["id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        r.delete("/subjects/s/versions/1").await,
        (StatusCode::OK, json!(1))
    );
    // Twice is 40406, naming the version.
    let twice = r.delete("/subjects/s/versions/1").await;
    assert_eq!(status_code(&twice), (404, Some(40406)), "{}", twice.1);
    assert!(
        twice.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("Version 1")),
        "{}",
        twice.1
    );
    // Asked for, the deleted version shows as deleted; not asked for, it is gone.
    let (status, shown) = r.get("/subjects/s/versions/1?deleted=true").await;
    assert_eq!(
        (status, shown["deleted"].clone()),
        (StatusCode::OK, json!(true)),
        "{shown}"
    );
    assert_eq!(
        status_code(&r.get("/subjects/s/versions/1").await).1,
        Some(40401)
    );

    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/versions?deleted=true"))
            .await
            .1,
        json!([{"subject": "s", "version": 1}])
    );
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/versions")).await.1,
        json!([])
    );

    // Registered again, the schema is version 2; a lookup with deleted=true finds the newest.
    assert_eq!(
        r.post("/subjects/s/versions", json!({"schema": schema}))
            .await
            .1["id"]
            .as_i64(),
        Some(id)
    );
    let (_, found) = r
        .post("/subjects/s?deleted=true", json!({"schema": schema}))
        .await;
    assert_eq!(found["version"], 2, "{found}");
    assert!(found.get("deleted").is_none(), "{found}");
    assert_eq!(
        r.get(&format!("/schemas/ids/{id}/versions")).await.1,
        json!([{"subject": "s", "version": 2}])
    );

    // A soft-deleted subject is listed only with deleted=true.
    r.post("/subjects/gone/versions", json!({"schema": schema}))
        .await;
    r.delete("/subjects/gone").await;
    assert_eq!(r.get("/subjects").await.1, json!(["s"]));
    assert_eq!(
        r.get("/subjects?deleted=true").await.1,
        json!(["gone", "s"])
    );
}

#[tokio::test]
async fn modes_refuse_writes_in_read_only_and_import_keeps_the_given_ids() {
    let r = Registry::start().await;
    let v1 = record(json!([{"name": "a", "type": "string"}]));
    let v2 = record(json!([{"name": "a", "type": "string"}, {"name": "b", "type": "int"}]));
    r.post("/subjects/s/versions", json!({"schema": v1})).await;

    assert_eq!(
        status_code(&r.put("/mode", json!({"mode": "SIDEWAYS"})).await),
        (422, Some(42204))
    );
    assert_eq!(
        r.put("/mode/s", json!({"mode": "READONLY"})).await,
        (StatusCode::OK, json!({"mode": "READONLY"}))
    );
    assert_eq!(r.get("/mode/s").await.1, json!({"mode": "READONLY"}));
    let refused = r.post("/subjects/s/versions", json!({"schema": v2})).await;
    assert_eq!(status_code(&refused), (422, Some(42205)), "{}", refused.1);
    assert_eq!(
        status_code(&r.delete("/subjects/s/versions/1").await),
        (422, Some(42205))
    );
    assert_eq!(
        status_code(&r.delete("/subjects/s").await),
        (422, Some(42205))
    );
    assert_eq!(
        r.delete("/mode/s").await,
        (StatusCode::OK, json!({"mode": "READONLY"}))
    );
    assert_eq!(status_code(&r.get("/mode/s").await), (404, Some(40409)));

    // An id is the registry's to give outside IMPORT, and a version only the next one.
    let given = r
        .post(
            "/subjects/t/versions",
            json!({"schema": v1, "id": 100, "version": 5}),
        )
        .await;
    assert_eq!(status_code(&given), (422, Some(42205)), "{}", given.1);
    let skipped = r
        .post("/subjects/t/versions", json!({"schema": v1, "version": 2}))
        .await;
    assert_eq!(status_code(&skipped), (422, Some(42201)), "{}", skipped.1);
    let next = r
        .post("/subjects/t/versions", json!({"schema": v1, "version": 1}))
        .await;
    assert_eq!(next.0, StatusCode::OK, "{}", next.1);
    r.delete("/subjects/t").await;
    r.delete("/subjects/t?permanent=true").await;
    // IMPORT needs an empty registry unless forced.
    assert_eq!(
        status_code(&r.put("/mode", json!({"mode": "IMPORT"})).await),
        (422, Some(42205))
    );
    assert_eq!(
        r.put("/mode?force=true", json!({"mode": "IMPORT"})).await,
        (StatusCode::OK, json!({"mode": "IMPORT"}))
    );
    let imported = r
        .post(
            "/subjects/t/versions",
            json!({"schema": v2, "id": 100, "version": 5}),
        )
        .await;
    assert_eq!(imported, (StatusCode::OK, json!({"id": 100})));
    // A retry without the version finds what the first attempt imported.
    assert_eq!(
        r.post("/subjects/t/versions", json!({"schema": v2, "id": 100}))
            .await,
        (StatusCode::OK, json!({"id": 100}))
    );
    assert_eq!(r.get("/subjects/t/versions").await.1, json!([5]));
    // An import gives the id.
    let no_id = r
        .post("/subjects/t/versions", json!({"schema": v1, "version": 9}))
        .await;
    assert_eq!(status_code(&no_id), (422, Some(42205)), "{}", no_id.1);
    let (_, v5) = r.get("/subjects/t/versions/5").await;
    assert_eq!(
        (v5["id"].as_i64(), v5["version"].as_i64()),
        (Some(100), Some(5)),
        "{v5}"
    );
    assert_eq!(
        r.get("/schemas/ids/100").await.1["schema"].as_str(),
        Some(v2.as_str())
    );
    // No compatibility check: a string field turned int is imported, under an id below the
    // last one imported.
    let retyped = record(json!([{"name": "a", "type": "int"}, {"name": "b", "type": "int"}]));
    let back = r
        .post(
            "/subjects/t/versions",
            json!({"schema": retyped, "id": 50, "version": 6}),
        )
        .await;
    assert_eq!(back, (StatusCode::OK, json!({"id": 50})));
    // An id holds one schema, and a schema one id.
    let overwrite = r
        .post(
            "/subjects/t/versions",
            json!({"schema": record(json!([{"name": "z", "type": "int"}])), "id": 100, "version": 7}),
        )
        .await;
    assert_eq!(
        status_code(&overwrite),
        (422, Some(42205)),
        "{}",
        overwrite.1
    );
    let other_id = r
        .post(
            "/subjects/t/versions",
            json!({"schema": v2, "id": 101, "version": 7}),
        )
        .await;
    assert_eq!(status_code(&other_id), (422, Some(42207)), "{}", other_id.1);

    // Back in READWRITE, the registry's own ids start past the imported ones.
    r.put("/mode", json!({"mode": "READWRITE"})).await;
    let (_, fresh) = r
        .post(
            "/subjects/u/versions",
            json!({"schema": record(json!([{"name": "y", "type": "int"}]))}),
        )
        .await;
    assert!(fresh["id"].as_i64().is_some_and(|id| id > 100), "{fresh}");
}

#[tokio::test]
async fn a_schema_with_references_registers_checks_and_decodes() {
    let r = Registry::start().await;
    // OrderCreated with its OrderLine type registered once, under a subject of its own.
    let mut created: Value = serde_json::from_str(OrderCreated::SCHEMA).unwrap();
    let lines = created["fields"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|f| f["name"] == "lines")
        .unwrap();
    let mut line = lines["type"]["items"].take();
    lines["type"]["items"] = json!("OrderLine");
    line["namespace"] = json!("keel.orders");
    let (status, shared) = r
        .post(
            "/subjects/keel.orders.OrderLine/versions",
            json!({"schema": line.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shared}");
    let references = json!([{"name": "keel.orders.OrderLine", "subject": "keel.orders.OrderLine", "version": 1}]);
    let subject = format!("orders-{}", OrderCreated::NAME);
    let (status, body) = r
        .post(
            &format!("/subjects/{subject}/versions"),
            json!({"schema": created.to_string(), "references": references}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = body["id"].as_i64().unwrap();

    // The references are served where Confluent's clients look for them.
    let (_, by_id) = r.get(&format!("/schemas/ids/{id}")).await;
    assert_eq!(by_id["references"], references);
    let (_, v1) = r.get(&format!("/subjects/{subject}/versions/1")).await;
    assert_eq!(v1["references"], references);
    let (status, found) = r
        .post(
            &format!("/subjects/{subject}"),
            json!({"schema": created.to_string(), "references": references}),
        )
        .await;
    assert_eq!((status, found["id"].as_i64()), (StatusCode::OK, Some(id)));
    assert_eq!(
        r.get("/subjects/keel.orders.OrderLine/versions/1/referencedby")
            .await
            .1,
        json!([id])
    );
    // What is referenced cannot be deleted.
    for path in [
        "/subjects/keel.orders.OrderLine/versions/1",
        "/subjects/keel.orders.OrderLine",
    ] {
        let refused = r.delete(path).await;
        assert_eq!(
            status_code(&refused),
            (422, Some(42206)),
            "{path}: {}",
            refused.1
        );
    }

    // Compatibility reads through the references.
    let mut breaking = created.clone();
    breaking["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "note", "type": "string"}));
    let (status, body) = r
        .post(
            &format!("/subjects/{subject}/versions"),
            json!({"schema": breaking.to_string(), "references": references}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let mut adding = created.clone();
    adding["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "note", "type": "string", "default": ""}));
    let (status, body) = r
        .post(
            &format!("/subjects/{subject}/versions"),
            json!({"schema": adding.to_string(), "references": references}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // keel's decoder resolves the references: an event
    // written under the split schema's id decodes to the event.
    let elsewhere = Registry::start().await;
    let event = sample();
    let body = Encoder::new(&elsewhere.url)
        .unwrap()
        .encode("orders", &event)
        .await
        .unwrap()[5..]
        .to_vec();
    let framed = [&[0u8][..], &(id as u32).to_be_bytes(), &body].concat();
    let decoder = Decoder::new(&r.url).unwrap();
    assert_eq!(decoder.decode(Some(&framed)).await.unwrap(), event);
}

#[tokio::test]
async fn references_resolve_shared_and_nested_types_and_only_live_referrers_hold_a_version() {
    let r = Registry::start().await;
    let register = |subject: &'static str, schema: Value, references: Value| {
        let r = &r;
        async move {
            r.post(
                &format!("/subjects/{subject}/versions"),
                json!({"schema": schema.to_string(), "references": references}),
            )
            .await
        }
    };
    let line = json!({"type": "record", "name": "Line", "namespace": "ns",
        "fields": [{"name": "sku", "type": "string"}]});
    let to_line = |v: i32| json!([{"name": "ns.Line", "subject": "line", "version": v}]);
    assert_eq!(register("line", line, json!([])).await.0, StatusCode::OK);
    let order = json!({"type": "record", "name": "Order", "namespace": "ns",
        "fields": [{"name": "lines", "type": {"type": "array", "items": "ns.Line"}}]});
    let shipment = json!({"type": "record", "name": "Shipment", "namespace": "ns",
        "fields": [{"name": "line", "type": "Line"}]});
    assert_eq!(
        register("order", order.clone(), to_line(1)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        register("shipment", shipment, to_line(1)).await.0,
        StatusCode::OK
    );
    // Two references that share a type: it is defined once, and the schema is compatible with
    // itself.
    let both = json!({"type": "record", "name": "Both", "namespace": "ns", "fields": [
        {"name": "order", "type": "ns.Order"}, {"name": "shipment", "type": "ns.Shipment"},
        {"name": "spare", "type": "ns.Line"}]});
    let both_refs = json!([{"name": "ns.Order", "subject": "order", "version": 1},
        {"name": "ns.Shipment", "subject": "shipment", "version": 1}]);
    let (status, body) = register("both", both.clone(), both_refs.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, verdict) = r
        .post(
            "/compatibility/subjects/both/versions/latest?verbose=true",
            json!({"schema": both.to_string(), "references": both_refs}),
        )
        .await;
    assert_eq!(verdict["is_compatible"], true, "{verdict}");

    // A type nested in a referenced schema can be used by name.
    let outer = json!({"type": "record", "name": "Outer", "namespace": "ns", "fields": [
        {"name": "inner", "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "int"}]}}]});
    register("outer", outer, json!([])).await;
    let user = json!({"type": "record", "name": "UsesInner", "namespace": "ns",
        "fields": [{"name": "i", "type": "Inner"}]});
    let (status, body) = register(
        "user",
        user,
        json!([{"name": "ns.Outer", "subject": "outer", "version": 1}]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Compatibility reads through references: Order over a Line whose sku became an int breaks
    // Order v1, and the references are part of the identity (no version holds it).
    r.put("/config/line", json!({"compatibility": "NONE"}))
        .await;
    let retyped = json!({"type": "record", "name": "Line", "namespace": "ns",
        "fields": [{"name": "sku", "type": "int"}]});
    assert_eq!(register("line", retyped, json!([])).await.0, StatusCode::OK);
    let (status, body) = register("order", order.clone(), to_line(2)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("TYPE_MISMATCH")),
        "{body}"
    );
    let (status, body) = r
        .post(
            "/subjects/order",
            json!({"schema": order.to_string(), "references": to_line(2)}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error_code"].as_i64()),
        (404, Some(40403)),
        "{body}"
    );
    // A soft-deleted version cannot be referenced.
    assert_eq!(
        r.delete("/subjects/line/versions/2").await.0,
        StatusCode::OK
    );
    let (status, body) = register("order", order, to_line(2)).await;
    assert_eq!(
        (status.as_u16(), body["error_code"].as_i64()),
        (422, Some(42201)),
        "{body}"
    );

    // Only live schemas hold what they reference.
    assert_eq!(
        status_code(&r.delete("/subjects/order/versions/1").await),
        (422, Some(42206))
    );
    assert_eq!(r.delete("/subjects/both").await.0, StatusCode::OK);
    assert_eq!(
        r.get("/subjects/order/versions/1/referencedby").await.1,
        json!([])
    );
    assert_eq!(
        r.delete("/subjects/order/versions/1").await,
        (StatusCode::OK, json!(1))
    );
}

/// Registers a schema of each primitive type in `types` under a subject of its own: ids the
/// registry gives, before the ones a test is about.
async fn fillers(r: &Registry, types: &[&str]) {
    for filler in types {
        let (status, _) = r
            .post(
                &format!("/subjects/filler-{filler}/versions"),
                json!({ "schema": json!({"type": filler}).to_string() }),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn keel_schema_register_moves_contracts_to_another_registry_keeping_their_ids() {
    let repo =
        keel_schemas::history::Repository::load(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))
            .unwrap();
    let topic = "orders";
    let register = |to: &str, ids_from: Option<&str>| {
        let (repo, to, ids_from) = (&repo, to.to_owned(), ids_from.map(str::to_owned));
        async move {
            keel_schemas::history::register(repo, &to, topic, "keel.orders", ids_from.as_deref())
                .await
        }
    };
    let source = Registry::start().await;
    let target = Registry::start().await;
    // The source gave ids after others it holds; the target, left to itself, would give 1, 2…
    fillers(&source, &["string", "long", "double"]).await;
    let registered = register(&source.url, None).await.unwrap();
    assert!(
        registered
            .iter()
            .all(|r| r.ids.iter().all(|(_, id)| *id > 3))
    );

    // Missing versions in the registry named: nothing changes on the target.
    let empty = Registry::start().await;
    let refused = register(&target.url, Some(&empty.url)).await.unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("40401") && refused.contains("in the registry to copy ids from"),
        "{refused}"
    );
    assert_eq!(target.get("/subjects").await.1, json!([]));
    assert_eq!(
        status_code(
            &target
                .get(&format!("/config/{}", registered[0].subject))
                .await
        ),
        (404, Some(40408)),
        "no level set either"
    );

    // A target whose ids are taken by other schemas refuses the import, and the subject is given
    // back its mode all the same.
    let crowded = Registry::start().await;
    fillers(
        &crowded,
        &["string", "long", "double", "float", "bytes", "boolean"],
    )
    .await;
    let refused = register(&crowded.url, Some(&source.url)).await.unwrap_err();
    let refused = format!("{refused:#}");
    assert!(
        refused.contains("importing") && refused.contains("42205"),
        "{refused}"
    );
    let first = &registered[0].subject;
    assert_eq!(
        status_code(&crowded.get(&format!("/mode/{first}")).await),
        (404, Some(40409)),
        "the mode given back"
    );
    assert_eq!(
        status_code(&crowded.get(&format!("/subjects/{first}/versions")).await),
        (404, Some(40401))
    );

    let ids = |done: &[keel_schemas::history::Registration]| -> Vec<(String, Vec<(i32, i64)>)> {
        done.iter()
            .map(|r| (r.subject.clone(), r.ids.clone()))
            .collect()
    };
    let imported = register(&target.url, Some(&source.url)).await.unwrap();
    assert_eq!(ids(&imported), ids(&registered), "the source's ids");
    for r in &registered {
        assert_eq!(
            target
                .get(&format!("/subjects/{}/versions", r.subject))
                .await,
            source
                .get(&format!("/subjects/{}/versions", r.subject))
                .await,
            "the source's versions"
        );
        for (_, id) in &r.ids {
            let (status, answer) = target.get(&format!("/schemas/ids/{id}")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(answer, source.get(&format!("/schemas/ids/{id}")).await.1);
        }
        // The subject follows the registry's mode again, and registers as before.
        assert_eq!(
            status_code(&target.get(&format!("/mode/{}", r.subject)).await),
            (404, Some(40409))
        );
    }
    // Running it again changes nothing, and a later registration gets an id after the copied.
    let again = register(&target.url, Some(&source.url)).await.unwrap();
    assert_eq!(ids(&again), ids(&imported));
    let highest = imported
        .iter()
        .flat_map(|r| r.ids.iter().map(|(_, id)| *id))
        .max()
        .unwrap();
    let (status, answer) = target
        .post(
            "/subjects/other/versions",
            json!({ "schema": "\"string\"" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answer["id"].as_i64().unwrap() > highest, "{answer}");
}

#[tokio::test]
async fn the_decoder_reads_writers_whose_references_are_shared_nested_and_in_other_namespaces() {
    use apache_avro::types::Value as Avro;
    let r = Registry::start().await;
    // com.acme.Audit, in a namespace of its own, uses com.acme.Actor (a reference of its own)
    // twice; the writer's OrderCreated uses Audit twice by full name, and OrderLine by reference.
    let actor = json!({"type": "record", "name": "Actor", "namespace": "com.acme",
        "fields": [{"name": "who", "type": "string"}]});
    let audit_fields = |actor_type: Value| {
        json!([
            {"name": "by", "type": actor_type},
            {"name": "approved_by", "type": ["null", "com.acme.Actor"], "default": null},
        ])
    };
    let audit = json!({"type": "record", "name": "Audit", "namespace": "com.acme",
        "fields": audit_fields(json!("com.acme.Actor"))});
    let mut created: Value = serde_json::from_str(OrderCreated::SCHEMA).unwrap();
    let fields = created["fields"].as_array_mut().unwrap();
    let lines = fields.iter_mut().find(|f| f["name"] == "lines").unwrap();
    let mut line = lines["type"]["items"].take();
    lines["type"]["items"] = json!("OrderLine");
    line["namespace"] = json!("keel.orders");
    fields.push(json!({"name": "audit", "type": "com.acme.Audit"}));
    fields.push(
        json!({"name": "previous_audit", "type": ["null", "com.acme.Audit"], "default": null}),
    );

    let reference = |name: &str| json!({"name": name, "subject": name, "version": 1});
    for (subject, schema, references) in [
        ("com.acme.Actor", &actor, json!([])),
        (
            "com.acme.Audit",
            &audit,
            json!([reference("com.acme.Actor")]),
        ),
        ("keel.orders.OrderLine", &line, json!([])),
    ] {
        let (status, body) = r
            .post(
                &format!("/subjects/{subject}/versions"),
                json!({"schema": schema.to_string(), "references": references}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{subject}: {body}");
    }
    let (status, body) = r
        .post(
            &format!("/subjects/orders-{}/versions", OrderCreated::NAME),
            json!({"schema": created.to_string(), "references": [
                reference("keel.orders.OrderLine"), reference("com.acme.Audit"),
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let id = u32::try_from(body["id"].as_u64().unwrap()).unwrap();

    // The body a writer of that schema sends: the same schema with every type written out.
    let mut inline = created.clone();
    let fields = inline["fields"].as_array_mut().unwrap();
    fields.iter_mut().find(|f| f["name"] == "lines").unwrap()["type"]["items"] = line.clone();
    let mut audit_inline = audit.clone();
    let actor_inline = actor.clone();
    audit_inline["fields"] = audit_fields(actor_inline);
    fields.iter_mut().find(|f| f["name"] == "audit").unwrap()["type"] = audit_inline;
    let actor = |who: &str| Avro::Record(vec![("who".into(), Avro::String(who.into()))]);
    let an_audit = Avro::Record(vec![
        ("by".into(), actor("ana")),
        ("approved_by".into(), Avro::Union(1, Box::new(actor("bo")))),
    ]);
    let event = sample();
    let written = keel_schemas::write_under(
        &event,
        &inline.to_string(),
        vec![
            ("audit".into(), an_audit.clone()),
            ("previous_audit".into(), Avro::Union(1, Box::new(an_audit))),
        ],
    )
    .unwrap();
    let framed = [&[0u8][..], &id.to_be_bytes(), &written.body].concat();
    let decoder = Decoder::new(&r.url).unwrap();
    assert_eq!(decoder.decode(Some(&framed)).await.unwrap(), event);

    // A record written under versions soft-deleted since still decodes, as with Confluent's
    // deserializers, which fetch references with deleted=true.
    for path in [
        format!("/subjects/orders-{}/versions/1", OrderCreated::NAME),
        "/subjects/com.acme.Audit/versions/1".to_owned(),
    ] {
        let (status, body) = r.delete(&path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    assert_eq!(
        status_code(&r.get("/subjects/com.acme.Audit/versions/1").await),
        (404, Some(40401)),
        "its only version deleted, the subject is not found"
    );
    let fresh = Decoder::new(&r.url).unwrap();
    assert_eq!(fresh.decode(Some(&framed)).await.unwrap(), event);
}

#[tokio::test]
async fn a_subject_that_held_a_schema_imports_only_when_forced_and_references_name_a_number() {
    let r = Registry::start().await;
    let (status, body) = r
        .post("/subjects/held/versions", json!({"schema": "\"string\""}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Per subject as for the registry: IMPORT needs a subject that never held a schema.
    let refused = r.put("/mode/held", json!({"mode": "IMPORT"})).await;
    assert_eq!(status_code(&refused), (422, Some(42205)), "{}", refused.1);
    assert_eq!(status_code(&r.get("/mode/held").await), (404, Some(40409)));
    let (status, body) = r.put("/mode/fresh", json!({"mode": "IMPORT"})).await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"mode": "IMPORT"}))
    );
    let (status, body) = r
        .put("/mode/held?force=true", json!({"mode": "IMPORT"}))
        .await;
    assert_eq!(
        (status, &body),
        (StatusCode::OK, &json!({"mode": "IMPORT"}))
    );

    // A reference names a version number: `latest` is refused, the error naming the field.
    let line = json!({"type": "record", "name": "Line", "namespace": "ns",
        "fields": [{"name": "sku", "type": "string"}]});
    let (status, body) = r
        .post(
            "/subjects/ns.Line/versions",
            json!({"schema": line.to_string()}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let order = json!({"type": "record", "name": "Order", "namespace": "ns",
        "fields": [{"name": "line", "type": "ns.Line"}]});
    let latest = r
        .post(
            "/subjects/ns.Order/versions",
            json!({"schema": order.to_string(),
                   "references": [{"name": "ns.Line", "subject": "ns.Line", "version": "latest"}]}),
        )
        .await;
    assert_eq!(status_code(&latest), (400, Some(400)), "{}", latest.1);
    let message = latest.1["message"].as_str().unwrap_or_default();
    assert!(message.contains("references[0].version"), "{message}");
    // Anything after the body's JSON value is refused too, as a body that does not parse.
    let trailing = r
        .http
        .post(format!("{}/subjects/trailing/versions", r.url))
        .header("content-type", "application/vnd.schemaregistry.v1+json")
        .body(r#"{"schema": "\"string\""} and more"#)
        .send()
        .await
        .unwrap();
    assert_eq!(trailing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        status_code(&r.get("/subjects/trailing/versions").await),
        (404, Some(40401))
    );
}
