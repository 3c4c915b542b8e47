//! The registry's REST API, as Confluent documents it.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use keel_core::settings::BasicAuth;

use super::compat::Level;
use super::store::{Mode, Reference, Registering, Store, VersionRef};

/// Confluent's content type; every response carries it.
pub const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// Every way a request can fail, with Confluent's HTTP status and `error_code`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version not found.")]
    VersionNotFound,
    #[error("Schema not found")]
    SchemaNotFound,
    #[error("Subject '{0}' was soft deleted. Set permanent=true to delete permanently")]
    SubjectSoftDeleted(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error("Version {0} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted(i32),
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelNotConfigured(String),
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", messages.join(", "))]
    Incompatible {
        subject: String,
        messages: Vec<String>,
    },
    #[error("{0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("{0}")]
    InvalidLevel(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("The specified subject '{0}' is not valid.")]
    InvalidSubject(String),
    #[error(
        "Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently"
    )]
    VersionSoftDeleted { subject: String, version: i32 },
    #[error("{0}")]
    InvalidMode(String),
    #[error("{0}")]
    NotPermitted(String),
    #[error("Schema already registered with id {held} instead of input id {wanted}")]
    IdDoesNotMatch { held: i32, wanted: i32 },
    #[error("{0}")]
    ReferenceExists(String),
    #[error("Subject '{0}' does not have subject-level mode configured")]
    SubjectModeNotConfigured(String),
    #[error("HTTP 404 Not Found")]
    NoRoute,
    #[error("HTTP 405 Method Not Allowed")]
    MethodNotAllowed,
    #[error("Error in the backend datastore: database unreachable")]
    Unavailable,
    #[error("Error in the backend datastore: {0}")]
    Store(String),
}

impl Error {
    fn status_and_code(&self) -> (StatusCode, u32) {
        match self {
            Error::SubjectNotFound(_) => (StatusCode::NOT_FOUND, 40401),
            Error::VersionNotFound => (StatusCode::NOT_FOUND, 40402),
            Error::SchemaNotFound => (StatusCode::NOT_FOUND, 40403),
            Error::SubjectSoftDeleted(_) => (StatusCode::NOT_FOUND, 40404),
            Error::SubjectNotSoftDeleted(_) => (StatusCode::NOT_FOUND, 40405),
            Error::VersionNotSoftDeleted(_) => (StatusCode::NOT_FOUND, 40407),
            Error::SubjectLevelNotConfigured(_) => (StatusCode::NOT_FOUND, 40408),
            Error::Incompatible { .. } => (StatusCode::CONFLICT, 40901),
            Error::InvalidSchema(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42201),
            Error::InvalidVersion(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42202),
            Error::InvalidLevel(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42203),
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, 400),
            Error::InvalidSubject(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42208),
            Error::SubjectModeNotConfigured(_) => (StatusCode::NOT_FOUND, 40409),
            Error::VersionSoftDeleted { .. } => (StatusCode::NOT_FOUND, 40406),
            Error::InvalidMode(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42204),
            Error::NotPermitted(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42205),
            Error::IdDoesNotMatch { .. } => (StatusCode::UNPROCESSABLE_ENTITY, 42207),
            Error::ReferenceExists(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42206),
            Error::NoRoute => (StatusCode::NOT_FOUND, 404),
            Error::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, 405),
            // 503, not 500, for every store error: clients (schema_registry_converter among
            // them) retry a 503 and cache anything else as a verdict on the schema, which a
            // store error never is.
            Error::Unavailable | Error::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, 50001),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if keel_core::db::is_unavailable(&e) {
            Error::Unavailable
        } else {
            tracing::error!(error = %e, "Registry query failed");
            Error::Store(e.to_string())
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        respond(
            status,
            json!({ "error_code": code, "message": self.to_string() }),
        )
    }
}

fn respond(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

fn ok(body: Value) -> Result<Response, Error> {
    Ok(respond(StatusCode::OK, body))
}

type Flags = Query<HashMap<String, String>>;

/// Refuses a subject Confluent's registry refuses: empty, or with a control character.
fn valid_subject(subject: &str) -> Result<(), Error> {
    if subject.is_empty() || subject.chars().any(char::is_control) {
        return Err(Error::InvalidSubject(subject.to_owned()));
    }
    Ok(())
}

/// Answers `Content-Type: application/json` to a client that accepts that and not Confluent's
/// own type (as Confluent's registry negotiates); Confluent's type otherwise.
async fn negotiate(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let plain_json = request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .any(|accept| {
            accept.contains("application/json")
                && !accept.contains("application/vnd.schemaregistry")
        });
    let mut response = next.run(request).await;
    if plain_json
        && response.headers().get(header::CONTENT_TYPE)
            == Some(&HeaderValue::from_static(CONTENT_TYPE))
    {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

fn flag(q: &Flags, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The body of register, lookup and compatibility requests.
#[derive(Deserialize)]
struct SchemaRequest {
    schema: Option<String>,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
    /// Given by a migration tool in `IMPORT` mode.
    id: Option<i32>,
    version: Option<i32>,
}

impl SchemaRequest {
    /// Accepts any content type, as Confluent's registry does.
    /// The whole request: the schema, its type, and the id and version an import gives.
    fn read(body: &Bytes) -> Result<Checked, Error> {
        let req: SchemaRequest = parse_body(body)?;
        super::store::check_schema_type(req.schema_type.as_deref())?;
        let schema = req.schema.ok_or_else(|| {
            Error::InvalidSchema("Invalid schema: the request has no \"schema\" field".into())
        })?;
        // Confluent's clients send -1 and 0 for "not given".
        Ok(Checked {
            schema,
            schema_type: req.schema_type,
            id: req.id.filter(|id| *id >= 0),
            version: req.version.filter(|v| *v > 0),
            references: req.references,
        })
    }
}

/// A [`SchemaRequest`] that names a schema keel can register.
struct Checked {
    schema: String,
    schema_type: Option<String>,
    id: Option<i32>,
    version: Option<i32>,
    references: Vec<Reference>,
}

/// A request body as `T`; the error names the field that does not fit (`references[0].version`).
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        Error::BadRequest(if field == "." {
            format!("request body is not valid JSON: {inner}")
        } else {
            format!("request body does not fit at {field}: {inner}")
        })
    })?;
    // Nothing but whitespace after the value, as serde_json::from_slice requires.
    de.end()
        .map_err(|e| Error::BadRequest(format!("request body is not valid JSON: {e}")))?;
    Ok(parsed)
}

#[derive(Deserialize)]
struct ModeRequest {
    mode: Option<String>,
}

fn parse_mode(body: &Bytes) -> Result<Mode, Error> {
    let req: ModeRequest = parse_body(body)?;
    let mode = req
        .mode
        .ok_or_else(|| Error::InvalidMode("the request has no \"mode\" field".into()))?;
    mode.parse().map_err(Error::InvalidMode)
}

#[derive(Deserialize)]
struct LevelRequest {
    compatibility: Option<String>,
}

fn version_body(r: &super::store::Registered) -> Value {
    let mut body =
        json!({ "subject": r.subject, "version": r.version, "id": r.id, "schema": r.schema });
    if r.schema_type != "AVRO" {
        body["schemaType"] = json!(r.schema_type);
    }
    if !r.references.is_empty() {
        body["references"] = json!(r.references);
    }
    // Only soft-deleted versions say so (they are only found with `deleted=true`).
    if r.deleted {
        body["deleted"] = json!(true);
    }
    body
}

/// The API's routes over `pool` (which must hold the `registry` schema's migrations), open to
/// every caller.
pub fn router(pool: PgPool) -> Router {
    routes(pool)
}

/// [`router`], requiring `auth` (when set) as HTTP basic auth on every request but keel's own
/// `/health` and `/ready` (probes carry no credentials, and they say nothing about schemas).
/// Like Confluent's registry with `authentication.method=BASIC`, a request without the right
/// credentials gets 401 `{"error_code":401,"message":"Unauthorized"}` and a `WWW-Authenticate`
/// challenge; `/` is protected too.
pub fn router_with_auth(pool: PgPool, auth: Option<BasicAuth>) -> Router {
    let router = routes(pool);
    match auth {
        Some(auth) => router.layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::new(auth),
            require_auth,
        )),
        None => router,
    }
}

/// Paths that answer without credentials.
const OPEN_PATHS: &[&str] = &["/health", "/ready"];

async fn require_auth(
    State(auth): State<std::sync::Arc<BasicAuth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if OPEN_PATHS.contains(&request.uri().path()) || authorized(&auth, request.headers()) {
        return next.run(request).await;
    }
    let mut response = respond(
        StatusCode::UNAUTHORIZED,
        json!({"error_code": 401, "message": "Unauthorized"}),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"SchemaRegistry\""),
    );
    response
}

/// Whether the `Authorization` header carries exactly `auth`'s user and password.
fn authorized(auth: &BasicAuth, headers: &axum::http::HeaderMap) -> bool {
    use base64::Engine as _;
    let Some(encoded) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
    else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{}:{}", auth.user, auth.password);
    // Compared in full whatever the first difference, so the time taken says nothing about
    // how much of a guess was right.
    decoded.len() == expected.len()
        && decoded
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn routes(pool: PgPool) -> Router {
    Router::new()
        .route("/", get(|| async { ok(json!({})) }))
        .route("/health", get(|| async { ok(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/schemas/types", get(|| async { ok(json!(["AVRO"])) }))
        .route("/schemas", get(all_schemas))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/subjects", get(subjects_of_id))
        .route("/schemas/ids/{id}/schema", get(raw_schema_by_id))
        .route("/schemas/ids/{id}/versions", get(versions_of_id))
        .route("/subjects", get(subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(versions).post(register))
        .route(
            "/subjects/{subject}/versions/{version}",
            get(version).delete(delete_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/schema",
            get(raw_version),
        )
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route(
            "/compatibility/subjects/{subject}/versions",
            post(check_all),
        )
        .route(
            "/compatibility/subjects/{subject}/versions/{version}",
            post(check_version),
        )
        .route("/config", get(global_config).put(set_global_config))
        .route(
            "/config/{subject}",
            get(subject_config)
                .put(set_subject_config)
                .delete(delete_subject_config),
        )
        .route("/mode", get(global_mode).put(set_global_mode))
        .route(
            "/mode/{subject}",
            get(subject_mode)
                .put(set_subject_mode)
                .delete(delete_subject_mode),
        )
        .route("/contexts", get(|| async { ok(json!(["."])) }))
        .route(
            "/v1/metadata/id",
            get(|| async {
                ok(json!({"scope": {"path": [], "clusters": {"schema-registry-cluster": "keel"}}}))
            }),
        )
        .fallback(|| async { Error::NoRoute })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(axum::middleware::from_fn(negotiate))
        .with_state(Store::new(pool))
}

/// Serves the API on `listener` until `shutdown` is cancelled, open to every caller.
pub async fn serve(
    listener: TcpListener,
    pool: PgPool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_auth(listener, pool, None, shutdown).await
}

/// [`serve`], requiring `auth` when set (see [`router_with_auth`]).
pub async fn serve_with_auth(
    listener: TcpListener,
    pool: PgPool,
    auth: Option<BasicAuth>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        addr = %listener.local_addr()?,
        basic_auth = auth.is_some(),
        "Schema registry listening"
    );
    axum::serve(listener, router_with_auth(pool, auth))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

async fn ready(State(store): State<Store>) -> Response {
    match sqlx::query("SELECT 1").execute(store.pool()).await {
        Ok(_) => respond(StatusCode::OK, json!({"status": "ready"})),
        Err(e) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "unavailable", "database": e.to_string()}),
        ),
    }
}

async fn schema_by_id(State(store): State<Store>, Path(id): Path<i32>) -> Result<Response, Error> {
    let (schema, schema_type, references) = store.schema_by_id(id).await?;
    let mut body = json!({ "schema": schema });
    if schema_type != "AVRO" {
        body["schemaType"] = json!(schema_type);
    }
    if !references.is_empty() {
        body["references"] = json!(references);
    }
    ok(body)
}

async fn subjects_of_id(
    State(store): State<Store>,
    Path(id): Path<i32>,
    q: Flags,
) -> Result<Response, Error> {
    ok(json!(store.subjects_of_id(id, flag(&q, "deleted")).await?))
}

/// `GET /schemas`: every version's schema, with `subjectPrefix`, `deleted` and `latestOnly`.
async fn all_schemas(State(store): State<Store>, q: Flags) -> Result<Response, Error> {
    let prefix = q.get("subjectPrefix").map_or("", String::as_str);
    let found = store
        .all_versions(prefix, flag(&q, "deleted"), flag(&q, "latestOnly"))
        .await?;
    ok(json!(found.iter().map(version_body).collect::<Vec<_>>()))
}

/// The ids of the schemas that reference the version.
async fn referenced_by(
    State(store): State<Store>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, Error> {
    let v = VersionRef::parse(&version)?;
    ok(json!(store.referenced_by(&subject, v).await?))
}

async fn global_mode(State(store): State<Store>) -> Result<Response, Error> {
    ok(json!({ "mode": store.global_mode().await?.as_str() }))
}

async fn set_global_mode(
    State(store): State<Store>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    let mode = parse_mode(&body)?;
    store.set_mode("", mode, flag(&q, "force")).await?;
    ok(json!({ "mode": mode.as_str() }))
}

async fn subject_mode(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, Error> {
    match store.subject_mode(&subject).await? {
        Some(mode) => ok(json!({ "mode": mode.as_str() })),
        None if flag(&q, "defaultToGlobal") => global_mode(State(store)).await,
        None => Err(Error::SubjectModeNotConfigured(subject)),
    }
}

async fn set_subject_mode(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    let mode = parse_mode(&body)?;
    valid_subject(&subject)?;
    store.set_mode(&subject, mode, flag(&q, "force")).await?;
    ok(json!({ "mode": mode.as_str() }))
}

async fn delete_subject_mode(
    State(store): State<Store>,
    Path(subject): Path<String>,
) -> Result<Response, Error> {
    let old = store.delete_subject_mode(&subject).await?;
    ok(json!({ "mode": old.as_str() }))
}

async fn raw_schema_by_id(
    State(store): State<Store>,
    Path(id): Path<i32>,
) -> Result<Response, Error> {
    let (schema, _, _) = store.schema_by_id(id).await?;
    ok(serde_json::from_str(&schema).map_err(|e| Error::Store(e.to_string()))?)
}

async fn versions_of_id(
    State(store): State<Store>,
    Path(id): Path<i32>,
    q: Flags,
) -> Result<Response, Error> {
    let pairs = store.versions_of_id(id, flag(&q, "deleted")).await?;
    ok(json!(
        pairs
            .iter()
            .map(|(s, v)| json!({"subject": s, "version": v}))
            .collect::<Vec<_>>()
    ))
}

async fn subjects(State(store): State<Store>, q: Flags) -> Result<Response, Error> {
    ok(json!(store.subjects(flag(&q, "deleted")).await?))
}

async fn versions(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, Error> {
    ok(json!(store.versions(&subject, flag(&q, "deleted")).await?))
}

async fn register(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    valid_subject(&subject)?;
    let req = SchemaRequest::read(&body)?;
    let how = Registering {
        normalize: flag(&q, "normalize"),
        id: req.id,
        version: req.version,
    };
    let id = store
        .register(
            &subject,
            &req.schema,
            req.schema_type.as_deref(),
            &req.references,
            how,
        )
        .await?;
    ok(json!({ "id": id }))
}

async fn lookup(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    valid_subject(&subject)?;
    let req = SchemaRequest::read(&body)?;
    ok(version_body(
        &store
            .lookup(&subject, &req.schema, &req.references, flag(&q, "deleted"))
            .await?,
    ))
}

async fn version(
    State(store): State<Store>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
) -> Result<Response, Error> {
    let v = VersionRef::parse(&version)?;
    ok(version_body(
        &store.version(&subject, v, flag(&q, "deleted")).await?,
    ))
}

async fn raw_version(
    State(store): State<Store>,
    Path((subject, version)): Path<(String, String)>,
) -> Result<Response, Error> {
    let r = store
        .version(&subject, VersionRef::parse(&version)?, false)
        .await?;
    ok(serde_json::from_str(&r.schema).map_err(|e| Error::Store(e.to_string()))?)
}

async fn delete_subject(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, Error> {
    ok(json!(
        store
            .delete_subject(&subject, flag(&q, "permanent"))
            .await?
    ))
}

async fn delete_version(
    State(store): State<Store>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
) -> Result<Response, Error> {
    let v = VersionRef::parse(&version)?;
    ok(json!(
        store
            .delete_version(&subject, v, flag(&q, "permanent"))
            .await?
    ))
}

fn compat_body(messages: Vec<String>, verbose: bool) -> Value {
    let mut body = json!({ "is_compatible": messages.is_empty() });
    if verbose {
        body["messages"] = json!(messages);
    }
    body
}

async fn check_version(
    State(store): State<Store>,
    Path((subject, version)): Path<(String, String)>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    let v = VersionRef::parse(&version)?;
    let req = SchemaRequest::read(&body)?;
    let messages = match store
        .check(&subject, Some(v), &req.schema, &req.references)
        .await
    {
        // Anything is compatible with the latest version of a subject that has none.
        Err(Error::SubjectNotFound(_)) if matches!(v, VersionRef::Latest) => vec![],
        other => other?,
    };
    ok(compat_body(messages, flag(&q, "verbose")))
}

async fn check_all(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
    body: Bytes,
) -> Result<Response, Error> {
    let req = SchemaRequest::read(&body)?;
    ok(compat_body(
        store
            .check(&subject, None, &req.schema, &req.references)
            .await?,
        flag(&q, "verbose"),
    ))
}

fn parse_level(body: &Bytes) -> Result<Level, Error> {
    let req: LevelRequest = parse_body(body)?;
    let level = req
        .compatibility
        .ok_or_else(|| Error::InvalidLevel("the request has no \"compatibility\" field".into()))?;
    level.parse().map_err(Error::InvalidLevel)
}

async fn global_config(State(store): State<Store>) -> Result<Response, Error> {
    ok(json!({ "compatibilityLevel": store.global_level().await?.as_str() }))
}

async fn set_global_config(State(store): State<Store>, body: Bytes) -> Result<Response, Error> {
    let level = parse_level(&body)?;
    store.set_level("", level).await?;
    ok(json!({ "compatibility": level.as_str() }))
}

async fn subject_config(
    State(store): State<Store>,
    Path(subject): Path<String>,
    q: Flags,
) -> Result<Response, Error> {
    match store.subject_level(&subject).await? {
        Some(level) => ok(json!({ "compatibilityLevel": level.as_str() })),
        None if flag(&q, "defaultToGlobal") => global_config(State(store)).await,
        None => Err(Error::SubjectLevelNotConfigured(subject)),
    }
}

async fn set_subject_config(
    State(store): State<Store>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Result<Response, Error> {
    let level = parse_level(&body)?;
    valid_subject(&subject)?;
    store.set_level(&subject, level).await?;
    ok(json!({ "compatibility": level.as_str() }))
}

async fn delete_subject_config(
    State(store): State<Store>,
    Path(subject): Path<String>,
) -> Result<Response, Error> {
    let old = store.delete_subject_level(&subject).await?;
    ok(json!({ "compatibilityLevel": old.as_str() }))
}
