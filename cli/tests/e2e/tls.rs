//! TLS to every dependency that is not Kafka, and credentials that never print.
//!
//! Each client runs in a `keel` process of its own: which CAs it trusts comes from the process
//! environment (`SSL_CERT_FILE`), read once per process. Each test makes a certificate authority
//! of its own ([`TestCa`]) and puts a TLS listener with a certificate it signed for `localhost`
//! in front of the real server ([`TlsProxy`], or the SMTP sink below, which speaks STARTTLS
//! itself). Every test shows both sides: the client trusting the test's CA gets through, and a
//! client trusting another CA refuses the listener.
//!
//! None of these tests needs a broker: the processes they start point `KEEL_KAFKA_BROKERS` at a
//! closed port, and what they check happens without one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_core::Settings;
use keel_core::settings::BasicAuth;
use keel_core::testkit::{
    Preamble, Process, TestCa, TestDb, TlsProxy, eventually, free_port, redis_url, server_url,
    unique, wait_ready,
};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::common::order;

const WAIT: Duration = Duration::from_secs(30);

/// `host:port` of the PostgreSQL server the tests use.
fn postgres_addr() -> String {
    let url = url::Url::parse(&server_url()).expect("TEST_DATABASE_URL parses");
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432)
    )
}

/// `host:port` of the Redis the tests use.
fn redis_addr() -> String {
    let url = url::Url::parse(&redis_url()).expect("TEST_REDIS_URL parses");
    format!(
        "{}:{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(6379)
    )
}

/// A port nothing listens on: the broker of these processes.
fn no_broker() -> String {
    format!("127.0.0.1:{}", free_port().expect("free port"))
}

/// The settings of a `keel` process of these tests: the test's database, no broker, topics of
/// its own.
fn settings(db: &TestDb) -> Settings {
    let mut s = Settings::local();
    s.database_url = db.url.clone();
    s.kafka.brokers = no_broker();
    s.topics.orders = unique("orders");
    s.topics.inventory = unique("inventory");
    s.cache.redis_url = None;
    s
}

/// `keel <args>` with `s`, trusting `ca_file` (`SSL_CERT_FILE`) when given; stderr to `log`.
fn keel_command(s: &Settings, args: &[&str], ca_file: Option<&Path>, log: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.args(args)
        .envs(s.to_env())
        .env("RUST_LOG", "warn")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"));
    if let Some(ca) = ca_file {
        cmd.env("SSL_CERT_FILE", ca);
    }
    cmd
}

/// Runs `keel <args>` to completion: `(succeeded, stdout, stderr)`. Waits on a blocking
/// thread: the listeners it talks to run on this test's runtime.
async fn keel_once(s: &Settings, args: &[&str], ca_file: Option<&Path>) -> (bool, String, String) {
    let log = std::env::temp_dir().join(unique("keel-tls-log"));
    let mut command = keel_command(s, args, ca_file, &log);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("waiting for keel")
        .expect("keel runs");
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

/// A `keel` process left running; its stderr is in `log` (removed when dropped).
struct Running {
    process: Option<Process>,
    log: PathBuf,
}

impl Running {
    fn start(s: &Settings, args: &[&str], ca_file: Option<&Path>, extra: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(unique("keel-tls-log"));
        let mut cmd = keel_command(s, args, ca_file, &log);
        cmd.stdout(Stdio::null());
        cmd.envs(extra.iter().copied());
        Self {
            process: Some(Process::spawn("keel", cmd).expect("keel starts")),
            log,
        }
    }

    fn exited(&self) -> bool {
        self.process.as_ref().is_none_or(Process::exited)
    }

    /// SIGTERM, and waits (on a blocking thread) for it to exit; its log.
    async fn stop(&mut self) -> String {
        if let Some(p) = self.process.take() {
            let _ = tokio::task::spawn_blocking(move || p.terminate()).await;
        }
        self.log()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Words OpenSSL uses when it refuses a certificate.
fn says_certificate_refused(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake")
}

#[tokio::test]
async fn postgres_over_tls_verifies_the_certificate_against_sslrootcert_or_ssl_cert_file() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let other = TestCa::new();
    let proxy = TlsProxy::start(&ca, &postgres_addr(), Preamble::Postgres).await;
    let name = db.url.rsplit('/').next().unwrap_or_default().to_owned();
    // The server trusts every connection: the password is there only to be kept out of sight.
    let url = format!(
        "postgres://postgres:pg-s3cret@localhost:{}/{name}?sslmode=verify-full",
        proxy.addr.port()
    );
    let mut s = settings(&db);

    // sslrootcert in the URL names the CA.
    s.database_url = format!("{url}&sslrootcert={}", ca.ca_pem.display());
    let (ok, _, stderr) = keel_once(&s, &["migrate"], None).await;
    assert!(ok, "keel migrate over TLS with sslrootcert: {stderr}");
    let after_first = proxy.handshakes();
    assert!(after_first >= 1, "no TLS session reached the proxy");

    // Without sslrootcert, SSL_CERT_FILE's CA is trusted.
    s.database_url = url.clone();
    let (ok, _, stderr) = keel_once(&s, &["migrate"], Some(&ca.ca_pem)).await;
    assert!(ok, "keel migrate over TLS trusting SSL_CERT_FILE: {stderr}");
    assert!(proxy.handshakes() > after_first);

    // Another CA: the server's certificate is refused, the setting is named, the password is not
    // shown.
    let refused_before = proxy.failed_handshakes();
    let (ok, _, stderr) = keel_once(&s, &["migrate"], Some(&other.ca_pem)).await;
    assert!(!ok, "keel migrate trusted a certificate of another CA");
    assert!(stderr.contains("KEEL_DATABASE_URL"), "{stderr}");
    assert!(says_certificate_refused(&stderr), "{stderr}");
    assert!(!stderr.contains("pg-s3cret"), "{stderr}");
    assert!(proxy.failed_handshakes() > refused_before);
}

/// `keel order-service` on `s`, ready; `(process, API base URL)`.
async fn order_service(
    s: &mut Settings,
    ca_file: Option<&Path>,
    extra: &[(&str, &str)],
) -> (Running, String) {
    let port = free_port().expect("free port");
    s.order_service_addr = format!("127.0.0.1:{port}").parse().expect("address");
    let service = Running::start(s, &["order-service"], ca_file, extra);
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        "order service",
        &format!("{api}/ready"),
        WAIT,
        || service.exited(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", service.log()));
    (service, api)
}

/// Places an order through `api` and reads it back; its id.
async fn place_and_read(api: &str) -> String {
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{api}/orders"))
        .json(&order(
            json!([{"sku": "SKU-TLS", "quantity": 1, "unit_price_minor": 500}]),
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("an order id").to_owned();
    let read = http.get(format!("{api}/orders/{id}")).send().await.unwrap();
    assert_eq!(read.status(), 200, "GET /orders/{id}");
    id
}

async fn cached(order_id: &str) -> bool {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("EXISTS")
        .arg(format!("keel:order:{order_id}"))
        .query_async::<i64>(&mut conn)
        .await
        .unwrap()
        == 1
}

#[tokio::test]
async fn the_order_cache_reaches_redis_over_rediss_and_refuses_an_unknown_certificate() {
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let other = TestCa::new();
    let proxy = TlsProxy::start(&ca, &redis_addr(), Preamble::None).await;
    let mut s = settings(&db);
    s.cache.redis_url = Some(format!("rediss://localhost:{}", proxy.addr.port()));

    let (mut service, api) = order_service(&mut s, Some(&ca.ca_pem), &[]).await;
    let id = place_and_read(&api).await;
    eventually("the order cached through rediss://", WAIT, || {
        let id = id.clone();
        async move { cached(&id).await.then_some(()) }
    })
    .await;
    assert!(proxy.handshakes() >= 1);
    service.stop().await;

    // Trusting another CA, the service still answers (from PostgreSQL) but never reaches Redis.
    let (mut service, api) = order_service(&mut s, Some(&other.ca_pem), &[]).await;
    let refused_before = proxy.failed_handshakes();
    let id = place_and_read(&api).await;
    eventually("the cache's TLS handshake refused", WAIT, || async {
        (proxy.failed_handshakes() > refused_before).then_some(())
    })
    .await;
    assert!(!cached(&id).await, "cached through an untrusted listener");
    let log = service.stop().await;
    assert!(log.contains("Order cache unavailable"), "{log}");
}

/// An OTLP/HTTP collector: counts the trace exports it receives.
async fn collector() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let exports = Arc::new(AtomicUsize::new(0));
    let counted = exports.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counted = counted.clone();
            async move {
                if !body.is_empty() {
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, exports)
}

#[tokio::test]
async fn traces_reach_an_https_collector_and_not_one_with_an_unknown_certificate() {
    use std::sync::atomic::Ordering;
    let db = TestDb::new().await;
    let ca = TestCa::new();
    let other = TestCa::new();
    let (collector, exports) = collector().await;
    let proxy = TlsProxy::start(&ca, &collector.to_string(), Preamble::None).await;
    let endpoint = format!("https://localhost:{}", proxy.addr.port());
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let mut s = settings(&db);

    let (mut service, api) = order_service(&mut s, Some(&ca.ca_pem), &otel).await;
    place_and_read(&api).await;
    eventually("spans exported over https", WAIT, || async {
        (exports.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    service.stop().await;

    let (mut service, api) = order_service(&mut s, Some(&other.ca_pem), &otel).await;
    let exported = exports.load(Ordering::SeqCst);
    let refused_before = proxy.failed_handshakes();
    place_and_read(&api).await;
    eventually("the exporter's TLS handshake refused", WAIT, || async {
        (proxy.failed_handshakes() > refused_before).then_some(())
    })
    .await;
    // Stopping flushes what is buffered: nothing of it gets through either.
    service.stop().await;
    assert_eq!(exports.load(Ordering::SeqCst), exported);
}

const REGISTRY_USER: &str = "keel-key";
const REGISTRY_PASSWORD: &str = "reg-s3cret/+:x";

/// keel's registry on `db`, requiring [`REGISTRY_USER`]'s basic auth, stopped with `stop`.
async fn registry_with_auth(db: &TestDb, stop: &CancellationToken) -> std::net::SocketAddr {
    let auth = BasicAuth {
        user: REGISTRY_USER.into(),
        password: REGISTRY_PASSWORD.into(),
    };
    let (addr, _) = keel_schemas::registry::spawn_with_auth(
        &db.url,
        "127.0.0.1:0".parse().unwrap(),
        Some(auth),
        stop.clone(),
    )
    .await
    .unwrap();
    addr
}

/// `https://user:password@localhost:port`, the password percent-encoded as URLs need.
fn registry_url(port: u16, password: &str) -> String {
    let mut url = url::Url::parse(&format!("https://localhost:{port}")).unwrap();
    url.set_username(REGISTRY_USER).unwrap();
    url.set_password(Some(password)).unwrap();
    url.as_str().trim_end_matches('/').to_owned()
}

/// The subjects the registry holds, asked with the right credentials over plain HTTP.
async fn subjects(registry: std::net::SocketAddr) -> Vec<String> {
    reqwest::Client::new()
        .get(format!("http://{registry}/subjects"))
        .basic_auth(REGISTRY_USER, Some(REGISTRY_PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn contracts_dir() -> String {
    format!("{}/../schemas", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn schema_register_reaches_an_https_registry_with_basic_auth_from_the_url() {
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let registry = registry_with_auth(&db, &stop).await;
    let ca = TestCa::new();
    let other = TestCa::new();
    let proxy = TlsProxy::start(&ca, &registry.to_string(), Preamble::None).await;
    let mut s = settings(&db);
    let dir = contracts_dir();
    let register = ["schema", "register", "--dir", dir.as_str()];

    s.schema_registry_url = registry_url(proxy.addr.port(), REGISTRY_PASSWORD);
    let (ok, stdout, stderr) = keel_once(&s, &register, Some(&ca.ca_pem)).await;
    assert!(
        ok,
        "keel schema register over https with basic auth: {stderr}"
    );
    let subject = format!("{}-keel.orders.OrderCreated", s.topics.orders);
    assert!(stdout.contains(&subject), "{stdout}");
    assert!(subjects(registry).await.contains(&subject));

    // A wrong password: refused with 401, the setting named, neither password shown.
    s.schema_registry_url = registry_url(proxy.addr.port(), "wrong-pw-123");
    let (ok, stdout, stderr) = keel_once(&s, &register, Some(&ca.ca_pem)).await;
    assert!(!ok, "registered with a wrong password: {stdout}");
    assert!(stderr.contains("KEEL_SCHEMA_REGISTRY_URL"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    for secret in ["wrong-pw-123", "reg-s3cret"] {
        assert!(!stderr.contains(secret), "{stderr}");
    }

    // Another CA: the registry's certificate is refused.
    s.schema_registry_url = registry_url(proxy.addr.port(), REGISTRY_PASSWORD);
    let (ok, _, stderr) = keel_once(&s, &register, Some(&other.ca_pem)).await;
    assert!(!ok, "trusted a certificate of another CA");
    assert!(stderr.contains("KEEL_SCHEMA_REGISTRY_URL"), "{stderr}");
    assert!(says_certificate_refused(&stderr), "{stderr}");
    assert!(!stderr.contains("reg-s3cret"), "{stderr}");
    stop.cancel();
}

#[tokio::test]
async fn the_relay_registers_its_contracts_over_https_with_basic_auth_and_its_readiness_check_too()
{
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let registry = registry_with_auth(&db, &stop).await;
    let ca = TestCa::new();
    let proxy = TlsProxy::start(&ca, &registry.to_string(), Preamble::None).await;
    let mut s = settings(&db);
    let admin = free_port().unwrap();
    s.admin_addr = Some(format!("127.0.0.1:{admin}").parse().unwrap());
    keel_outbox_migrated(&s).await;

    // The right credentials: the codec registers every contract, and /ready's registry check
    // (GET /subjects with the URL's credentials) passes; the broker's does not, there is none.
    s.schema_registry_url = registry_url(proxy.addr.port(), REGISTRY_PASSWORD);
    let mut relay = Running::start(&s, &["relay"], Some(&ca.ca_pem), &[]);
    let subject = format!("{}-keel.inventory.InventoryRejected", s.topics.inventory);
    eventually("the relay's contracts registered", WAIT, || async {
        subjects(registry).await.contains(&subject).then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    let ready: Value = eventually("/ready to check the registry", WAIT, || async {
        let body: Value = http
            .get(format!("http://127.0.0.1:{admin}/ready"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        body.get("registry").is_some().then_some(body)
    })
    .await;
    assert_eq!(ready["registry"], "ok", "{ready}");
    let log = relay.stop().await;
    assert!(!log.contains("reg-s3cret"), "{log}");

    // A wrong password: the relay stops at start-up naming the setting, without the password.
    s.schema_registry_url = registry_url(proxy.addr.port(), "wrong-pw-123");
    s.admin_addr = None;
    let (ok, _, stderr) = keel_once(&s, &["relay"], Some(&ca.ca_pem)).await;
    assert!(!ok, "the relay started with a wrong password");
    assert!(stderr.contains("KEEL_SCHEMA_REGISTRY_URL"), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(!stderr.contains("wrong-pw-123"), "{stderr}");
    stop.cancel();
}

async fn keel_outbox_migrated(s: &Settings) {
    keel_core::db::migrate(
        &s.database_url,
        keel_outbox::DB_SCHEMA,
        &keel_outbox::MIGRATOR,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_codec_and_the_readiness_check_send_the_urls_credentials_as_basic_auth() {
    let db = TestDb::new().await;
    let stop = CancellationToken::new();
    let registry = registry_with_auth(&db, &stop).await;
    let mut url = url::Url::parse(&format!("http://{registry}")).unwrap();
    url.set_username(REGISTRY_USER).unwrap();
    url.set_password(Some(REGISTRY_PASSWORD)).unwrap();
    let good = url.as_str().trim_end_matches('/').to_owned();
    url.set_password(Some("wrong-pw-123")).unwrap();
    let wrong = url.as_str().trim_end_matches('/').to_owned();
    let topic = unique("orders");
    let event = keel_schemas::Event::OrderPaid(keel_schemas::OrderPaid {
        event_id: uuid::Uuid::now_v7(),
        occurred_at: chrono::Utc::now().timestamp_millis(),
        order_id: uuid::Uuid::now_v7(),
        order_version: 2,
        customer_id: "c-1".into(),
        amount_minor: 500,
        currency: "EUR".into(),
        payment_reference: "p-1".into(),
    });

    let bytes = keel_schemas::Encoder::new(&good)
        .unwrap()
        .encode(&topic, &event)
        .await
        .unwrap();
    let decoded = keel_schemas::Decoder::new(&good)
        .unwrap()
        .decode(Some(&bytes))
        .await
        .unwrap();
    assert_eq!(decoded.event_id(), event.event_id());

    // Refused credentials are the configuration's fault, not the record's: transient (retried),
    // never a dead letter, and the message says which setting to fix.
    let err = keel_schemas::Encoder::new(&wrong)
        .unwrap()
        .encode(&unique("orders"), &event)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");
    assert!(err.message.contains("KEEL_SCHEMA_REGISTRY_URL"), "{err}");
    assert!(!err.to_string().contains("wrong-pw-123"), "{err}");
    match keel_schemas::Decoder::new(&wrong)
        .unwrap()
        .decode(Some(&bytes))
        .await
    {
        Err(keel_schemas::DecodeError::Transient(e)) => {
            assert!(!e.contains("wrong-pw-123"), "{e}")
        }
        other => panic!("a refused decode must be transient: {other:?}"),
    }

    // core/src/health.rs's registry check: reqwest sends the URL's userinfo as basic auth.
    let checks = |url: &str| {
        keel_core::health::Checks::new(CancellationToken::new(), Duration::from_secs(60))
            .registry(url)
    };
    let (_, body) = checks(&good).ready().await;
    assert_eq!(body["registry"], "ok", "{body}");
    let (ready, body) = checks(&wrong).ready().await;
    assert!(!ready);
    assert!(
        body["registry"].as_str().unwrap_or("").contains("401"),
        "{body}"
    );
    // Unreachable: the error names the URL without its password.
    let dead = format!(
        "http://{REGISTRY_USER}:gone-s3cret@127.0.0.1:{}",
        free_port().unwrap()
    );
    let (ready, body) = checks(&dead).ready().await;
    assert!(!ready);
    assert!(!body.to_string().contains("gone-s3cret"), "{body}");
    stop.cancel();
}

// --- SMTP ---------------------------------------------------------------------------------

const SMTP_USER: &str = "mailer";
const SMTP_PASSWORD: &str = "smtp-s3cret";

/// What the SMTP sink received: one message, whether its session was encrypted, who logged in.
#[derive(Debug)]
struct Received {
    data: String,
    tls: bool,
    user: Option<String>,
}

/// How the sink offers TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SmtpTls {
    /// TLS from the first byte (smtps, port 465).
    Implicit,
    /// Plain until the client says STARTTLS (port 587).
    StartTls,
}

/// A minimal SMTP server with a [`TestCa`] certificate, requiring AUTH PLAIN as
/// [`SMTP_USER`] over TLS before it takes a message.
async fn smtp_sink(
    ca: &TestCa,
    mode: SmtpTls,
) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = ca.acceptor();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut sessions = tokio::task::JoinSet::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            sessions.spawn(async move {
                if mode == SmtpTls::StartTls {
                    let mut plain = BufReader::new(&mut socket);
                    plain.get_mut().write_all(b"220 sink ESMTP\r\n").await?;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if plain.read_line(&mut line).await? == 0 {
                            return Ok(());
                        }
                        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
                        match verb.as_str() {
                            "EHLO" => {
                                plain
                                    .get_mut()
                                    .write_all(b"250-sink\r\n250 STARTTLS\r\n")
                                    .await?
                            }
                            "STAR" => {
                                plain.get_mut().write_all(b"220 go ahead\r\n").await?;
                                break;
                            }
                            _ => {
                                plain
                                    .get_mut()
                                    .write_all(b"530 must issue STARTTLS first\r\n")
                                    .await?
                            }
                        }
                    }
                }
                let Ok(tls) = acceptor.accept(socket).await else {
                    return Ok(()); // the client refused the certificate
                };
                smtp_session(tls, mode == SmtpTls::Implicit, tx).await
            });
            while sessions.try_join_next().is_some() {}
        }
    });
    (port, rx)
}

/// An SMTP session over an encrypted `stream`; `greet`: send the greeting first (implicit TLS).
async fn smtp_session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    greet: bool,
    tx: tokio::sync::mpsc::UnboundedSender<Received>,
) -> std::io::Result<()> {
    use base64::Engine as _;
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    if greet {
        write.write_all(b"220 sink ESMTP\r\n").await?;
    }
    let mut user = None;
    let mut data: Option<String> = None;
    while let Some(line) = lines.next_line().await? {
        if let Some(body) = data.as_mut() {
            if line == "." {
                let _ = tx.send(Received {
                    data: data.take().unwrap_or_default(),
                    tls: true,
                    user: user.clone(),
                });
                write.write_all(b"250 queued\r\n").await?;
            } else {
                body.push_str(&line);
                body.push('\n');
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250-sink\r\n250 AUTH PLAIN\r\n",
            "AUTH" => {
                let given = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .unwrap_or_default();
                let expected = format!("\0{SMTP_USER}\0{SMTP_PASSWORD}");
                if given == expected.as_bytes() {
                    user = Some(SMTP_USER.to_owned());
                    b"235 authenticated\r\n"
                } else {
                    b"535 bad credentials\r\n"
                }
            }
            "MAIL" | "RCPT" if user.is_none() => b"530 authentication required\r\n",
            "DATA" => {
                data = Some(String::new());
                b"354 go ahead\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                break;
            }
            _ => b"250 ok\r\n",
        };
        write.write_all(reply).await?;
    }
    Ok(())
}

/// A message for `ada@example.com` waiting in the notification group's table.
async fn waiting_message(pool: &sqlx::PgPool) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO notification.messages (event_id, order_id, customer_id, recipient, kind, subject, body)
         VALUES ($1, $2, 'c-1', 'ada@example.com', 'order-confirmation', 'Your order is confirmed', 'Thank you.')",
    )
    .bind(id)
    .bind(uuid::Uuid::new_v4())
    .execute(pool)
    .await
    .unwrap();
    id
}

async fn delivery(pool: &sqlx::PgPool, id: uuid::Uuid) -> (bool, Option<String>) {
    sqlx::query_as(
        "SELECT delivered_at IS NOT NULL, last_error FROM notification.messages WHERE event_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The notification group's mailer, in `keel consume notification` (no broker: the consumer
/// waits for one, the mailer sends what is in the table), delivering to `smtp_url`.
async fn mail_through(
    smtp_url: &str,
    ca_file: &Path,
    received: &mut tokio::sync::mpsc::UnboundedReceiver<Received>,
) -> Received {
    let db = TestDb::new().await;
    keel_consumers::migrate_all(&settings(&db)).await.unwrap();
    let pool = db.pool().await;
    let id = waiting_message(&pool).await;
    let mut s = settings(&db);
    s.mail.smtp_url = Some(smtp_url.to_owned());
    let mut group = Running::start(&s, &["consume", "notification"], Some(ca_file), &[]);
    let got = tokio::time::timeout(WAIT, received.recv())
        .await
        .unwrap_or_else(|_| panic!("no mail arrived: {}", group.log()))
        .expect("the sink runs");
    eventually("the message marked delivered", WAIT, || async {
        delivery(&pool, id).await.0.then_some(())
    })
    .await;
    let log = group.stop().await;
    assert!(!log.contains(SMTP_PASSWORD), "{log}");
    assert!(
        got.data.contains(&format!("Message-ID: <{id}@keel>")),
        "{got:?}"
    );
    got
}

#[tokio::test]
async fn mail_goes_over_smtps_and_starttls_logged_in_with_the_urls_credentials() {
    let ca = TestCa::new();
    let (port, mut received) = smtp_sink(&ca, SmtpTls::Implicit).await;
    let got = mail_through(
        &format!("smtps://{SMTP_USER}:{SMTP_PASSWORD}@localhost:{port}"),
        &ca.ca_pem,
        &mut received,
    )
    .await;
    assert!(got.tls);
    assert_eq!(got.user.as_deref(), Some(SMTP_USER));

    let (port, mut received) = smtp_sink(&ca, SmtpTls::StartTls).await;
    let got = mail_through(
        &format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@localhost:{port}?tls=required"),
        &ca.ca_pem,
        &mut received,
    )
    .await;
    assert!(got.tls);
    assert_eq!(got.user.as_deref(), Some(SMTP_USER));
}

#[tokio::test]
async fn mail_is_not_sent_to_a_server_whose_certificate_another_ca_signed() {
    let ca = TestCa::new();
    let other = TestCa::new();
    let (port, mut received) = smtp_sink(&ca, SmtpTls::Implicit).await;
    let db = TestDb::new().await;
    keel_consumers::migrate_all(&settings(&db)).await.unwrap();
    let pool = db.pool().await;
    let id = waiting_message(&pool).await;
    let mut s = settings(&db);
    s.mail.smtp_url = Some(format!(
        "smtps://{SMTP_USER}:{SMTP_PASSWORD}@localhost:{port}"
    ));
    let mut group = Running::start(&s, &["consume", "notification"], Some(&other.ca_pem), &[]);
    let error = eventually("the failed send recorded", WAIT, || async {
        delivery(&pool, id).await.1
    })
    .await;
    let log = group.stop().await;
    assert!(says_certificate_refused(&error), "{error}");
    assert!(!error.contains(SMTP_PASSWORD), "{error}");
    assert!(!log.contains(SMTP_PASSWORD), "{log}");
    assert!(!delivery(&pool, id).await.0);
    assert!(received.try_recv().is_err(), "a message got through");
}

#[test]
fn credentials_over_plain_smtp_are_refused_without_showing_them() {
    let settings = |url: &str| keel_core::settings::MailSettings {
        smtp_url: Some(url.to_owned()),
        dir: std::env::temp_dir(),
        from: "keel <orders@keel.invalid>".into(),
    };
    use keel_consumers::notification::Transport;
    for url in [
        format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@mail.example:25"),
        format!("smtp://{SMTP_USER}:{SMTP_PASSWORD}@mail.example?tls=opportunistic"),
        format!("smtps://{SMTP_USER}:{SMTP_PASSWORD}@mail.example?tls=required"),
        format!("imap://{SMTP_USER}:{SMTP_PASSWORD}@mail.example"),
    ] {
        let err = Transport::from_settings(&settings(&url)).err().unwrap();
        let text = err.to_string();
        assert!(text.starts_with("KEEL_SMTP_URL:"), "{text}");
        assert!(!text.contains(SMTP_PASSWORD), "{text}");
    }
    for url in [
        "smtp://mail.example",
        "smtp://mail.example:2525",
        "smtps://mail.example",
        "smtp://mail.example?tls=required",
    ] {
        assert!(
            Transport::from_settings(&settings(url)).is_ok(),
            "{url} refused"
        );
    }
}

/// `keel registry` with `KEEL_REGISTRY_BASIC_AUTH` asks every request for those credentials,
/// as Confluent's registry behind basic auth does; its health stays open.
#[tokio::test]
async fn keel_registry_requires_the_credentials_it_is_given() {
    let db = TestDb::new().await;
    let port = free_port().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.arg("registry")
        .env("KEEL_DATABASE_URL", &db.url)
        .env("KEEL_REGISTRY_ADDR", format!("127.0.0.1:{port}"))
        .env("KEEL_REGISTRY_BASIC_AUTH", "keel:registry-pw")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let registry = Process::spawn("keel registry", cmd).unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(
        &http,
        "keel registry",
        &format!("{base}/health"),
        WAIT,
        || registry.exited(),
    )
    .await
    .unwrap();
    let anonymous = http.get(format!("{base}/subjects")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["error_code"], 401, "{body}");
    let wrong = http
        .get(format!("{base}/subjects"))
        .basic_auth("keel", Some("guess"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = http
        .get(format!("{base}/subjects"))
        .basic_auth("keel", Some("registry-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    registry.terminate().expect("SIGTERM: exits 0");
}
