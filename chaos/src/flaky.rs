//! The registry-flaky scenario's fault: an HTTP proxy in front of keel's registry. Transparent
//! until [`FlakyRegistry::set_flaky`]; then, as a registry behind a struggling load balancer
//! with a lagging replica answers:
//! - the first lookup of each schema id (`GET /schemas/ids/{id}…`) is answered 404, Confluent's
//!   "schema not found", as by a replica that has not caught up with its leader yet;
//! - of the other requests, every third is answered 500 (a registry whose store failed, a proxy
//!   in trouble).
//!
//! Neither may dead-letter a record: the 404 costs one attempt of the retry budget, the 500s
//! none.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Most a request body may be (a schema with its references is far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

struct Shared {
    target: String,
    client: reqwest::Client,
    flaky: AtomicBool,
    requests: AtomicU64,
    /// Schema ids looked up since the proxy turned flaky.
    looked_up: std::sync::Mutex<HashSet<String>>,
    answered_404: AtomicU64,
    answered_500: AtomicU64,
}

pub struct FlakyRegistry {
    /// Where the services reach the registry.
    pub url: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl FlakyRegistry {
    /// A proxy to the registry at `target` (`http://host:port`).
    pub async fn start(target: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            target: target.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
            flaky: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            looked_up: std::sync::Mutex::new(HashSet::new()),
            answered_404: AtomicU64::new(0),
            answered_500: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .fallback(forward)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, shared, task })
    }

    /// Flaky from now on (each id's first lookup answered 404 again), or transparent.
    pub fn set_flaky(&self, on: bool) {
        if on && let Ok(mut ids) = self.shared.looked_up.lock() {
            ids.clear();
        }
        self.shared.flaky.store(on, Ordering::SeqCst);
    }

    /// The 404s and 500s it answered in place of the registry.
    pub fn faults(&self) -> (u64, u64) {
        (
            self.shared.answered_404.load(Ordering::SeqCst),
            self.shared.answered_500.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FlakyRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            "application/vnd.schemaregistry.v1+json",
        )],
        serde_json::json!({"error_code": code, "message": message}).to_string(),
    )
        .into_response()
}

/// The fault this request gets, if any.
fn fault(shared: &Shared, path: &str) -> Option<Response> {
    if !shared.flaky.load(Ordering::SeqCst) {
        return None;
    }
    if let Some(rest) = path.strip_prefix("/schemas/ids/") {
        let id = rest.split(['/', '?']).next().unwrap_or_default().to_owned();
        let first = shared.looked_up.lock().is_ok_and(|mut ids| ids.insert(id));
        if first {
            shared.answered_404.fetch_add(1, Ordering::SeqCst);
            return Some(error(StatusCode::NOT_FOUND, 40403, "Schema not found"));
        }
    }
    if shared
        .requests
        .fetch_add(1, Ordering::SeqCst)
        .is_multiple_of(3)
    {
        shared.answered_500.fetch_add(1, Ordering::SeqCst);
        return Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            50001,
            "Error in the backend data store",
        ));
    }
    None
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    if let Some(answer) = fault(&shared, &path) {
        return answer;
    }
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return error(StatusCode::BAD_REQUEST, 400, "cannot read the request body");
    };
    let mut headers = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::AUTHORIZATION] {
        if let Some(value) = parts.headers.get(&name) {
            headers.insert(name, value.clone());
        }
    }
    let sent = shared
        .client
        .request(parts.method, format!("{}{path}", shared.target))
        .headers(headers)
        .body(body)
        .send()
        .await;
    let Ok(answer) = sent else {
        return error(
            StatusCode::BAD_GATEWAY,
            50201,
            "the registry cannot be reached",
        );
    };
    let status = answer.status();
    let content_type = answer.headers().get(header::CONTENT_TYPE).cloned();
    let Ok(bytes) = answer.bytes().await else {
        return error(
            StatusCode::BAD_GATEWAY,
            50201,
            "the registry's answer was cut",
        );
    };
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    if let Some(value) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}
