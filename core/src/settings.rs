//! Typed settings, read once at start-up from `KEEL_*` environment variables.
//!
//! Every key has a default that matches the local stack (`make up-kafka`), so a developer sets
//! nothing; compose and production set the same keys. A value that does not parse, and any
//! `KEEL_*` variable that is not a known key (a typo would otherwise be silently ignored), fail
//! start-up with an error naming the key.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// A setting that is present but unusable. The message always starts with the key's name.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{key}: {message} (got {:?})", shown(key, value))]
    Invalid {
        key: &'static str,
        value: String,
        message: String,
    },
    #[error(
        "{key}: unknown setting; known settings are: {known}, and KEEL_KAFKA_<PROPERTY> for any librdkafka property"
    )]
    Unknown { key: String, known: String },
    #[error("{key}: librdkafka does not take {property} ({message})")]
    Kafka {
        key: String,
        property: String,
        message: String,
    },
}

/// Every key keel reads, with its default and what it means. `keel settings` prints this table.
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "KEEL_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/keel",
        "PostgreSQL database holding orders, the outbox, the registry and consumer state. TLS: ?sslmode=verify-full (or require, verify-ca) and &sslrootcert=/path/ca.pem; without sslrootcert the system's CAs and SSL_CERT_FILE are trusted",
    ),
    (
        "KEEL_KAFKA_BROKERS",
        "127.0.0.1:9092",
        "Kafka bootstrap servers, comma separated. Any librdkafka property is set with KEEL_KAFKA_<PROPERTY> (upper case, dots as underscores: KEEL_KAFKA_SECURITY_PROTOCOL=SASL_SSL, KEEL_KAFKA_SASL_MECHANISM=SCRAM-SHA-512, KEEL_KAFKA_SASL_USERNAME, KEEL_KAFKA_SASL_PASSWORD, KEEL_KAFKA_SSL_CA_LOCATION), applied to every client after keel's own",
    ),
    (
        "KEEL_KAFKA_DEBUG",
        "",
        "librdkafka debug contexts for the consumer groups, e.g. cgrp,fetch (logged at debug level under target librdkafka); empty: none",
    ),
    (
        "KEEL_BROKER_QUIRKS",
        "",
        "Workarounds for a broker's known wrong answers, kept out of the core path: tansu (tansu 0.6, the local stack: a fetch that skips records is read again; a partition is read until it falls silent, since tansu under-reports end offsets). Empty: none, Apache Kafka's semantics",
    ),
    (
        "KEEL_SCHEMA_REGISTRY_URL",
        "http://127.0.0.1:8081",
        "Confluent-compatible Schema Registry base URL, http:// or https://; https://key:secret@host sends key and secret as HTTP basic auth on every request (Confluent Cloud's API key, Karapace's user)",
    ),
    (
        "KEEL_TOPIC_ORDERS",
        "orders",
        "Topic carrying every order event, keyed by order id",
    ),
    (
        "KEEL_TOPIC_INVENTORY",
        "inventory",
        "Topic carrying inventory's outcomes (reserved, rejected), keyed by order id",
    ),
    (
        "KEEL_ADMIN_ADDR",
        "",
        "Where a relay or consumer process serves /health, /ready and /metrics (empty: not served; the order service and registry serve them on their own address)",
    ),
    (
        "KEEL_LIVENESS_TIMEOUT_SECS",
        "60",
        "/health fails when a service loop has made no progress for this long",
    ),
    (
        "KEEL_TOPICS_FILE",
        "topics.toml",
        "The declared topic layout (partitions, retention, clean-up) `keel topics create` applies",
    ),
    (
        "KEEL_REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis holding the order service's read-through cache (rediss:// for TLS; a password as redis://:password@host); empty: no cache (GET /orders/{id} reads PostgreSQL, and the cache-invalidation group and the audit refuse to start)",
    ),
    (
        "KEEL_CACHE_TTL_SECS",
        "300",
        "Time to live of a cached order; each entry gets up to 10% more, at random",
    ),
    (
        "KEEL_ORDER_SERVICE_ADDR",
        "127.0.0.1:8080",
        "Listen address of the order service's HTTP API",
    ),
    (
        "KEEL_IDEMPOTENCY_KEY_TTL_SECS",
        "86400",
        "How long the order service keeps the answer to a request with an Idempotency-Key: a retry within it replays the answer, a later one is a new request; expired keys are deleted in slices",
    ),
    (
        "KEEL_REGISTRY_ADDR",
        "127.0.0.1:8081",
        "Listen address of keel's own schema registry",
    ),
    (
        "KEEL_REGISTRY_BASIC_AUTH",
        "",
        "user:password that keel's own schema registry requires as HTTP basic auth on every request but /health and /ready (answering 401 otherwise, as Confluent's does); clients then need https://user:password@host in KEEL_SCHEMA_REGISTRY_URL. Empty: no authentication",
    ),
    (
        "KEEL_RELAY_BATCH_SIZE",
        "5000",
        "Outbox rows the relay claims, publishes and marks per transaction",
    ),
    (
        "KEEL_RELAY_POLL_INTERVAL_MS",
        "1000",
        "Relay's polling fallback when no NOTIFY arrives",
    ),
    (
        "KEEL_OUTBOX_RETENTION_SECS",
        "86400",
        "How long published outbox rows are kept before deletion",
    ),
    (
        "KEEL_CONSUMER_MAX_RETRY_BACKOFF_MS",
        "30000",
        "Upper bound of a consumer's backoff between retries of a transient failure",
    ),
    (
        "KEEL_CONSUMER_MAX_ATTEMPTS",
        "8",
        "Attempts at a record that keeps failing before it goes to the dead-letter topic",
    ),
    (
        "KEEL_CONSUMER_FETCH_WAIT_MS",
        "500",
        "Longest a consumer's fetch waits at the broker for new records (fetch.wait.max.ms); a broker that answers only when it runs out (tansu 0.6) adds up to this to every hop",
    ),
    (
        "KEEL_CONSUMER_INSTANCE_ID",
        "",
        "Static group membership (Kafka group.instance.id): a stable name per instance, e.g. the pod name; a restarted instance takes its partitions back without a rebalance",
    ),
    (
        "KEEL_CONSUMER_BATCH_SIZE",
        "",
        "Most records a consumer applies in one PostgreSQL transaction, taken from what it has already fetched (it never waits to fill a batch); 1 applies records one by one. Empty: the group's own (1000 for cache-invalidation, inventory and analytics, 100 for the others)",
    ),
    (
        "KEEL_CONSUMER_SESSION_TIMEOUT_MS",
        "45000",
        "How long the broker waits for a silent group member before giving its partitions to others (session.timeout.ms); must exceed an instance's restart time when KEEL_CONSUMER_INSTANCE_ID is set",
    ),
    (
        "KEEL_SMTP_URL",
        "",
        "SMTP server for notifications: smtp://host[:port] plain (port 25), smtp://host[:port]?tls=required for STARTTLS (port 587), smtps://host[:port] for TLS from the first byte (port 465); user:password@ before the host logs in (AUTH), refused over plain smtp://. Empty writes .eml files to KEEL_MAIL_DIR",
    ),
    (
        "KEEL_MAIL_DIR",
        ".run/mail",
        "Where notifications are written as .eml files when KEEL_SMTP_URL is empty",
    ),
    (
        "KEEL_MAIL_FROM",
        "keel orders <orders@keel.invalid>",
        "Sender of customer notifications",
    ),
    (
        "KEEL_RUN_DIR",
        ".run",
        "Where `make up-kafka` keeps logs and pid files (scripts only)",
    ),
    (
        "KEEL_STACK",
        "",
        "Which stack `make up-kafka` starts: local (tansu), compose, or empty: compose when a Docker engine answers (scripts only)",
    ),
    ("KEEL_TANSU", "", "Path of the tansu binary (scripts only)"),
];

/// Which broker's wrong answers keel works around (`KEEL_BROKER_QUIRKS`). Every workaround is
/// behind this one switch: with [`BrokerQuirks::None`] keel follows Apache Kafka's semantics and
/// none of them is on the path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BrokerQuirks {
    /// Apache Kafka (and every broker that answers as it does).
    #[default]
    None,
    /// tansu 0.6: asked for an offset inside a batch, a fetch answers from the next batch on
    /// (records are skipped); end offsets are under-reported when the last batch holds several
    /// records.
    Tansu,
}

impl BrokerQuirks {
    /// The setting's value, as [`FromStr`] reads it.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerQuirks::None => "",
            BrokerQuirks::Tansu => "tansu",
        }
    }
}

impl FromStr for BrokerQuirks {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "none" => Ok(BrokerQuirks::None),
            "tansu" => Ok(BrokerQuirks::Tansu),
            _ => Err("must be empty (Apache Kafka's semantics) or tansu".to_owned()),
        }
    }
}

/// All of keel's settings. Tests build one with [`Settings::local`] and override fields.
/// `Debug` prints them as `keel settings` does, every secret masked.
#[derive(Clone, PartialEq, Eq)]
pub struct Settings {
    pub database_url: String,
    /// The cluster: `KEEL_KAFKA_BROKERS` and the `KEEL_KAFKA_<PROPERTY>` passthrough.
    pub kafka: crate::kafka::Kafka,
    /// The broker's known wrong answers keel works around; none by default.
    pub broker_quirks: BrokerQuirks,
    /// librdkafka `debug` contexts for consumers; `None`: none.
    pub kafka_debug: Option<String>,
    /// Base URL of the schema registry; userinfo (`https://key:secret@host`) is its basic auth.
    pub schema_registry_url: String,
    pub topics: Topics,
    /// The declared topic layout (see [`crate::topics`]).
    pub topics_file: std::path::PathBuf,
    /// `/health`, `/ready`, `/metrics` of a relay or consumer process; `None`: not served.
    pub admin_addr: Option<SocketAddr>,
    pub liveness_timeout: Duration,
    pub order_service_addr: SocketAddr,
    /// How long an `Idempotency-Key`'s answer is kept (`KEEL_IDEMPOTENCY_KEY_TTL_SECS`).
    pub idempotency_ttl: Duration,
    pub registry_addr: SocketAddr,
    /// What keel's own registry requires of every request (`KEEL_REGISTRY_BASIC_AUTH`); `None`:
    /// nothing.
    pub registry_auth: Option<BasicAuth>,
    pub relay: RelaySettings,
    pub consumer: ConsumerSettings,
    pub cache: CacheSettings,
    pub mail: MailSettings,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown_of = |key: &str, value: &str| match key.strip_prefix("KEEL_KAFKA_") {
            Some(name) if crate::kafka::is_secret(&name.to_ascii_lowercase().replace('_', ".")) => {
                "***".to_owned()
            }
            _ => shown(key, value),
        };
        f.debug_map()
            .entries(self.to_env().iter().map(|(k, v)| (k, shown_of(k, v))))
            .finish()
    }
}

/// HTTP basic-auth credentials. `Debug` masks the password, so settings can be debug-printed.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicAuth")
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

impl FromStr for BasicAuth {
    type Err = String;

    /// `user:password`: the user has no colon, the password may (as RFC 7617 allows).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(BasicAuth {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err("must be user:password, both non-empty".to_owned()),
        }
    }
}

impl BasicAuth {
    /// `user:password`, as the setting takes it.
    pub fn to_setting(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }
}

/// Topic names. Configurable so that tests (and tenants sharing a cluster) get their own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub orders: String,
    pub inventory: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelaySettings {
    pub batch_size: usize,
    pub poll_interval: Duration,
    pub retention: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerSettings {
    pub max_retry_backoff: Duration,
    pub max_attempts: u32,
    /// `group.instance.id`; `None`: dynamic membership.
    pub instance_id: Option<String>,
    /// `fetch.wait.max.ms`.
    pub fetch_wait: Duration,
    /// `session.timeout.ms`.
    pub session_timeout: Duration,
    /// Most records in one transaction; `None`: the group's own.
    pub batch_size: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheSettings {
    /// `None`: no cache.
    pub redis_url: Option<String>,
    pub ttl: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MailSettings {
    /// `None`: write `.eml` files into `dir`.
    pub smtp_url: Option<String>,
    pub dir: std::path::PathBuf,
    pub from: String,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(std::env::vars())
    }

    /// The defaults: the local stack on loopback.
    pub fn local() -> Self {
        Self::from_vars(std::iter::empty()).unwrap_or_else(|e| unreachable!("defaults parse: {e}"))
    }

    /// Reads settings from `(key, value)` pairs; non-`KEEL_` keys are ignored.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingsError> {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("KEEL_"))
            .collect();
        let known = |k: &str| KEYS.iter().any(|(known, _, _)| *known == k);
        let mut kafka_properties = BTreeMap::new();
        for (key, value) in &vars {
            let Some(name) = key.strip_prefix("KEEL_KAFKA_").filter(|_| !known(key)) else {
                continue;
            };
            let property = name.to_ascii_lowercase().replace('_', ".");
            crate::kafka::check_property(&property, value).map_err(|message| {
                SettingsError::Kafka {
                    key: key.clone(),
                    property: property.clone(),
                    message: if crate::kafka::is_secret(&property) {
                        "its value is not shown".to_owned()
                    } else {
                        message
                    },
                }
            })?;
            kafka_properties.insert(property, value.clone());
        }
        if let Some(key) = vars
            .keys()
            .find(|k| !known(k) && !k.starts_with("KEEL_KAFKA_"))
        {
            return Err(SettingsError::Unknown {
                key: key.clone(),
                known: KEYS
                    .iter()
                    .map(|(k, _, _)| *k)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let source = Source(vars);
        let relay_batch_size: usize = source.parse("KEEL_RELAY_BATCH_SIZE")?;
        if relay_batch_size == 0 {
            return Err(source.invalid("KEEL_RELAY_BATCH_SIZE", "must be at least 1"));
        }
        let max_attempts: u32 = source.parse("KEEL_CONSUMER_MAX_ATTEMPTS")?;
        if max_attempts == 0 {
            return Err(source.invalid("KEEL_CONSUMER_MAX_ATTEMPTS", "must be at least 1"));
        }
        let consumer_batch_size: Option<usize> =
            source.parse_optional("KEEL_CONSUMER_BATCH_SIZE")?;
        if consumer_batch_size == Some(0) {
            return Err(source.invalid("KEEL_CONSUMER_BATCH_SIZE", "must be at least 1"));
        }
        // Apache Kafka's default bounds (group.min/max.session.timeout.ms): a broker refuses others.
        let session_timeout: u64 = source.parse("KEEL_CONSUMER_SESSION_TIMEOUT_MS")?;
        if !(6_000..=1_800_000).contains(&session_timeout) {
            return Err(source.invalid(
                "KEEL_CONSUMER_SESSION_TIMEOUT_MS",
                "must be between 6000 and 1800000 (the broker's bounds)",
            ));
        }
        let session_timeout = Duration::from_millis(session_timeout);
        Ok(Settings {
            database_url: source.parse("KEEL_DATABASE_URL")?,
            kafka: crate::kafka::Kafka {
                brokers: source.parse("KEEL_KAFKA_BROKERS")?,
                properties: kafka_properties,
            },
            broker_quirks: source
                .raw("KEEL_BROKER_QUIRKS")
                .parse()
                .map_err(|e: String| source.invalid("KEEL_BROKER_QUIRKS", &e))?,
            kafka_debug: source.optional("KEEL_KAFKA_DEBUG"),
            schema_registry_url: registry_url(&source)?,
            topics: Topics {
                orders: source.parse("KEEL_TOPIC_ORDERS")?,
                inventory: source.parse("KEEL_TOPIC_INVENTORY")?,
            },
            topics_file: source.parse("KEEL_TOPICS_FILE")?,
            admin_addr: source.parse_optional("KEEL_ADMIN_ADDR")?,
            liveness_timeout: Duration::from_secs(source.parse("KEEL_LIVENESS_TIMEOUT_SECS")?),
            order_service_addr: source.parse("KEEL_ORDER_SERVICE_ADDR")?,
            idempotency_ttl: Duration::from_secs(source.parse("KEEL_IDEMPOTENCY_KEY_TTL_SECS")?),
            registry_addr: source.parse("KEEL_REGISTRY_ADDR")?,
            registry_auth: source.parse_optional("KEEL_REGISTRY_BASIC_AUTH")?,
            relay: RelaySettings {
                batch_size: relay_batch_size,
                poll_interval: Duration::from_millis(source.parse("KEEL_RELAY_POLL_INTERVAL_MS")?),
                retention: Duration::from_secs(source.parse("KEEL_OUTBOX_RETENTION_SECS")?),
            },
            consumer: ConsumerSettings {
                max_retry_backoff: Duration::from_millis(
                    source.parse("KEEL_CONSUMER_MAX_RETRY_BACKOFF_MS")?,
                ),
                max_attempts,
                instance_id: source.optional("KEEL_CONSUMER_INSTANCE_ID"),
                fetch_wait: Duration::from_millis(source.parse("KEEL_CONSUMER_FETCH_WAIT_MS")?),
                session_timeout,
                batch_size: consumer_batch_size,
            },
            cache: CacheSettings {
                redis_url: source.optional("KEEL_REDIS_URL"),
                ttl: Duration::from_secs(source.parse("KEEL_CACHE_TTL_SECS")?),
            },
            mail: MailSettings {
                smtp_url: source.optional("KEEL_SMTP_URL"),
                dir: source.parse("KEEL_MAIL_DIR")?,
                from: source.parse("KEEL_MAIL_FROM")?,
            },
        })
    }
}

impl Settings {
    /// Every setting as the `KEEL_*` variable that reads back to it: what a process started with
    /// these settings gets in its environment (tests, chaos and the bench start `keel` this way).
    /// `Settings::from_vars(s.to_env())` is `s` again. Secrets travel as they are: never print
    /// this.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let ms = |d: Duration| d.as_millis().to_string();
        let secs = |d: Duration| d.as_secs().to_string();
        let or_empty = |v: &Option<String>| v.clone().unwrap_or_default();
        let mut env: Vec<(&'static str, String)> = vec![
            ("KEEL_DATABASE_URL", self.database_url.clone()),
            ("KEEL_KAFKA_BROKERS", self.kafka.brokers.clone()),
            ("KEEL_BROKER_QUIRKS", self.broker_quirks.as_str().to_owned()),
            ("KEEL_KAFKA_DEBUG", or_empty(&self.kafka_debug)),
            ("KEEL_SCHEMA_REGISTRY_URL", self.schema_registry_url.clone()),
            ("KEEL_TOPIC_ORDERS", self.topics.orders.clone()),
            ("KEEL_TOPIC_INVENTORY", self.topics.inventory.clone()),
            (
                "KEEL_ADMIN_ADDR",
                self.admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            ),
            ("KEEL_LIVENESS_TIMEOUT_SECS", secs(self.liveness_timeout)),
            ("KEEL_TOPICS_FILE", self.topics_file.display().to_string()),
            ("KEEL_REDIS_URL", or_empty(&self.cache.redis_url)),
            ("KEEL_CACHE_TTL_SECS", secs(self.cache.ttl)),
            (
                "KEEL_ORDER_SERVICE_ADDR",
                self.order_service_addr.to_string(),
            ),
            ("KEEL_IDEMPOTENCY_KEY_TTL_SECS", secs(self.idempotency_ttl)),
            ("KEEL_REGISTRY_ADDR", self.registry_addr.to_string()),
            (
                "KEEL_REGISTRY_BASIC_AUTH",
                self.registry_auth
                    .as_ref()
                    .map(BasicAuth::to_setting)
                    .unwrap_or_default(),
            ),
            ("KEEL_RELAY_BATCH_SIZE", self.relay.batch_size.to_string()),
            ("KEEL_RELAY_POLL_INTERVAL_MS", ms(self.relay.poll_interval)),
            ("KEEL_OUTBOX_RETENTION_SECS", secs(self.relay.retention)),
            (
                "KEEL_CONSUMER_MAX_RETRY_BACKOFF_MS",
                ms(self.consumer.max_retry_backoff),
            ),
            (
                "KEEL_CONSUMER_MAX_ATTEMPTS",
                self.consumer.max_attempts.to_string(),
            ),
            ("KEEL_CONSUMER_FETCH_WAIT_MS", ms(self.consumer.fetch_wait)),
            (
                "KEEL_CONSUMER_INSTANCE_ID",
                or_empty(&self.consumer.instance_id),
            ),
            (
                "KEEL_CONSUMER_BATCH_SIZE",
                self.consumer
                    .batch_size
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            ),
            (
                "KEEL_CONSUMER_SESSION_TIMEOUT_MS",
                ms(self.consumer.session_timeout),
            ),
            ("KEEL_SMTP_URL", or_empty(&self.mail.smtp_url)),
            ("KEEL_MAIL_DIR", self.mail.dir.display().to_string()),
            ("KEEL_MAIL_FROM", self.mail.from.clone()),
        ];
        let mut env: Vec<(String, String)> =
            env.drain(..).map(|(k, v)| (k.to_owned(), v)).collect();
        for (property, value) in &self.kafka.properties {
            env.push((kafka_key(property), value.clone()));
        }
        env
    }
}

impl CacheSettings {
    /// The Redis URL, for what cannot work without Redis; an error naming the key when unset.
    pub fn require_redis(&self) -> Result<&str, SettingsError> {
        self.redis_url
            .as_deref()
            .ok_or_else(|| SettingsError::Invalid {
                key: "KEEL_REDIS_URL",
                value: String::new(),
                message: "must be set: this needs the order cache's Redis".to_owned(),
            })
    }
}

/// The `KEEL_KAFKA_<PROPERTY>` variable that sets librdkafka `property`.
pub fn kafka_key(property: &str) -> String {
    format!(
        "KEEL_KAFKA_{}",
        property.replace('.', "_").to_ascii_uppercase()
    )
}

/// Masks a URL's password as text, for one that does not parse as written (a secret with `/`,
/// `#` or `?` not percent-encoded): everything between the user's `:` and the last `@`.
fn redact_text(value: &str) -> String {
    let Some(scheme_end) = value.find("://").map(|i| i + 3) else {
        return value.to_owned();
    };
    let rest = &value[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return value.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &value[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => value.to_owned(),
    }
}

/// `value` fit to print: a URL's password (`postgres://user:secret@host`, `redis://:secret@host`,
/// `smtps://user:secret@host`, `https://key:secret@registry`) and a password in its query
/// (`?password=secret`, as PostgreSQL URLs take it) become `***`. Everything keel prints of its
/// settings goes through this, or through [`shown`] where the key is known.
pub fn redact(value: &str) -> String {
    let Ok(mut url) = url::Url::parse(value) else {
        return redact_text(value);
    };
    let secret_query = url
        .query_pairs()
        .any(|(k, _)| k.to_ascii_lowercase().contains("password"));
    if url.password().is_none() && !secret_query {
        // A secret holding `/` that was not percent-encoded reads as a host and a path.
        return redact_text(value);
    }
    if url.password().is_some() {
        // Fails only for URLs that cannot have a password, which this one has.
        let _ = url.set_password(Some("***"));
    }
    if secret_query {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.to_ascii_lowercase().contains("password") {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

/// The value of setting `key` fit to print: [`redact`], and a secret setting's password masked
/// whatever its form (`KEEL_REGISTRY_BASIC_AUTH=user:***`).
pub fn shown(key: &str, value: &str) -> String {
    if SECRET_KEYS.contains(&key) {
        return match value.split_once(':') {
            Some((user, _)) => format!("{user}:***"),
            None if value.is_empty() => String::new(),
            None => "***".to_owned(),
        };
    }
    redact(value)
}

/// Settings whose value is a secret in itself, not a URL with a password in it.
pub const SECRET_KEYS: &[&str] = &["KEEL_REGISTRY_BASIC_AUTH"];

/// `KEEL_SCHEMA_REGISTRY_URL`, checked: an http or https URL with a host; without a trailing
/// slash.
fn registry_url(source: &Source) -> Result<String, SettingsError> {
    const KEY: &str = "KEEL_SCHEMA_REGISTRY_URL";
    let value: String = source.parse(KEY)?;
    let url = url::Url::parse(&value).map_err(|e| source.invalid(KEY, &e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(source.invalid(
            KEY,
            "must be http://host[:port] or https://[key:secret@]host[:port]",
        ));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

struct Source(BTreeMap<String, String>);

impl Source {
    fn raw(&self, key: &'static str) -> String {
        match self.0.get(key) {
            Some(v) => v.clone(),
            None => KEYS
                .iter()
                .find(|(k, _, _)| *k == key)
                .map(|(_, default, _)| (*default).to_owned())
                .unwrap_or_default(),
        }
    }

    fn parse<T>(&self, key: &'static str) -> Result<T, SettingsError>
    where
        T: FromStr,
        T::Err: Display,
    {
        let value = self.raw(key);
        if value.trim().is_empty() {
            return Err(self.invalid(key, "must not be empty"));
        }
        value
            .trim()
            .parse()
            .map_err(|e: T::Err| self.invalid(key, &e.to_string()))
    }

    /// A key whose empty value means "not set".
    fn optional(&self, key: &'static str) -> Option<String> {
        Some(self.raw(key).trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// [`Source::optional`], parsed; a value that does not parse names its key.
    fn parse_optional<T>(&self, key: &'static str) -> Result<Option<T>, SettingsError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.optional(key)
            .map(|v| {
                v.parse()
                    .map_err(|e: T::Err| self.invalid(key, &e.to_string()))
            })
            .transpose()
    }

    fn invalid(&self, key: &'static str, message: &str) -> SettingsError {
        SettingsError::Invalid {
            key,
            value: self.raw(key),
            message: message.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn settings_survive_the_trip_through_the_environment() {
        let mut s = Settings::local();
        s.database_url = "postgres://u@db:5432/other".into();
        s.kafka_debug = Some("cgrp,fetch".into());
        s.broker_quirks = BrokerQuirks::Tansu;
        s.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        s.kafka
            .properties
            .insert("sasl.mechanism".into(), "SCRAM-SHA-512".into());
        s.admin_addr = Some("127.0.0.1:9101".parse().unwrap());
        s.relay.batch_size = 50;
        s.relay.poll_interval = Duration::from_millis(200);
        s.consumer.max_retry_backoff = Duration::from_millis(1500);
        s.consumer.instance_id = Some("pod-1".into());
        s.consumer.batch_size = Some(7);
        s.consumer.session_timeout = Duration::from_secs(10);
        s.mail.smtp_url = Some("smtp://mail:25".into());
        let mut without_cache = s.clone();
        without_cache.cache.redis_url = None;
        assert_eq!(
            Settings::from_vars(vars_of(&without_cache)).unwrap(),
            without_cache
        );
        let env = s.to_env();
        let back =
            Settings::from_vars(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone()))).unwrap();
        assert_eq!(back, s);
        assert_eq!(
            Settings::from_vars(vars_of(&Settings::local())).unwrap(),
            Settings::local()
        );
        // Every key keel reads from the environment for its settings is written (the scripts'
        // own keys aside).
        for (key, _, doc) in KEYS {
            assert!(
                doc.contains("(scripts only)") || env.iter().any(|(k, _)| k.as_str() == *key),
                "{key} is not written by to_env"
            );
        }
    }

    fn vars_of(s: &Settings) -> Vec<(String, String)> {
        s.to_env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    #[test]
    fn defaults_describe_the_local_stack() {
        let s = Settings::local();
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert!(s.kafka.properties.is_empty());
        assert_eq!(s.order_service_addr.port(), 8080);
        assert_eq!(s.registry_addr.port(), 8081);
        assert_eq!(s.topics.orders, "orders");
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::from_vars(vars(&[("KEEL_RELAY_BATCH_SIZE", "many")])).unwrap_err();
        assert!(
            err.to_string().starts_with("KEEL_RELAY_BATCH_SIZE:"),
            "{err}"
        );
        let err = Settings::from_vars(vars(&[("KEEL_RELAY_BATCH_SIZE", "0")])).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let err =
            Settings::from_vars(vars(&[("KEEL_CONSUMER_SESSION_TIMEOUT_MS", "1000")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("KEEL_CONSUMER_SESSION_TIMEOUT_MS:")
                && err.to_string().contains("between 6000 and 1800000"),
            "{err}"
        );
        let err =
            Settings::from_vars(vars(&[("KEEL_ORDER_SERVICE_ADDR", "localhost")])).unwrap_err();
        assert!(
            err.to_string().starts_with("KEEL_ORDER_SERVICE_ADDR:"),
            "{err}"
        );
    }

    #[test]
    fn the_consumer_batch_size_is_the_groups_own_unless_set() {
        assert_eq!(Settings::local().consumer.batch_size, None);
        let s = Settings::from_vars(vars(&[("KEEL_CONSUMER_BATCH_SIZE", "250")])).unwrap();
        assert_eq!(s.consumer.batch_size, Some(250));
        for bad in ["0", "lots", "-1"] {
            let err = Settings::from_vars(vars(&[("KEEL_CONSUMER_BATCH_SIZE", bad)])).unwrap_err();
            assert!(
                err.to_string().starts_with("KEEL_CONSUMER_BATCH_SIZE:"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn any_librdkafka_property_passes_through_and_a_mistake_names_its_key() {
        let s = Settings::from_vars(vars(&[
            ("KEEL_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
            ("KEEL_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            ("KEEL_KAFKA_SASL_USERNAME", "keel"),
            ("KEEL_KAFKA_SASL_PASSWORD", "s3cret"),
            ("KEEL_KAFKA_BROKERS", "b-1.example:9096"),
        ]))
        .unwrap();
        assert_eq!(s.kafka.brokers, "b-1.example:9096");
        assert_eq!(s.kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(s.kafka.properties["sasl.password"], "s3cret");
        assert_eq!(kafka_key("sasl.password"), "KEEL_KAFKA_SASL_PASSWORD");
        let err = Settings::from_vars(vars(&[("KEEL_KAFKA_SECURITY_PROTOCL", "SSL")])).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "KEEL_KAFKA_SECURITY_PROTOCL: librdkafka does not take security.protocl"
            ),
            "{err}"
        );
        let err =
            Settings::from_vars(vars(&[("KEEL_KAFKA_SASL_PASSWORD_X", "s3cret")])).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
        // Not a librdkafka property either: still a typo of keel's own keys.
        let err = Settings::from_vars(vars(&[("KEEL_KAFKA_BROKER", "x:1")])).unwrap_err();
        assert!(err.to_string().starts_with("KEEL_KAFKA_BROKER:"), "{err}");
        // A delivery timeout the relay's transaction would not survive (librdkafka's default of
        // 300 s, which operators often restore) is refused at start-up.
        let err =
            Settings::from_vars(vars(&[("KEEL_KAFKA_MESSAGE_TIMEOUT_MS", "300000")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("KEEL_KAFKA_MESSAGE_TIMEOUT_MS:")
                && err.to_string().contains("55 s"),
            "{err}"
        );
        let s = Settings::from_vars(vars(&[("KEEL_KAFKA_MESSAGE_TIMEOUT_MS", "45000")])).unwrap();
        assert_eq!(s.kafka.properties["message.timeout.ms"], "45000");
    }

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            redact("postgres://keel:s3cret@db:5432/keel"),
            "postgres://keel:***@db:5432/keel"
        );
        assert_eq!(
            redact("redis://:s3cret@cache:6379"),
            "redis://:***@cache:6379"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("orders"), "orders");
        let err = Settings::from_vars(vars(&[(
            "KEEL_ORDER_SERVICE_ADDR",
            "http://admin:s3cret@example",
        )]))
        .unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn every_connection_url_prints_without_its_password() {
        for (url, shown) in [
            (
                "rediss://:s3cret@cache.example:6380",
                "rediss://:***@cache.example:6380",
            ),
            (
                "smtps://mailer:s3cret@smtp.example:465",
                "smtps://mailer:***@smtp.example:465",
            ),
            (
                "smtp://mailer:s3cret@smtp.example?tls=required",
                "smtp://mailer:***@smtp.example?tls=required",
            ),
            (
                "https://KEY123:s3cret@psrc-1.eu-west-1.aws.confluent.cloud",
                "https://KEY123:***@psrc-1.eu-west-1.aws.confluent.cloud/",
            ),
            (
                "postgres://keel@db/keel?sslmode=verify-full&password=s3cret",
                "postgres://keel@db/keel?sslmode=verify-full&password=***",
            ),
            // Secrets with `/` not percent-encoded: one does not parse, one reads as a port.
            (
                "https://KEY123:ab/cd@psrc-1.example",
                "https://KEY123:***@psrc-1.example",
            ),
            (
                "https://KEY123:12/x@psrc-1.example",
                "https://KEY123:***@psrc-1.example",
            ),
            (
                "redis://cache.example:6379/0",
                "redis://cache.example:6379/0",
            ),
        ] {
            assert_eq!(redact(url), shown);
        }
        assert_eq!(shown("KEEL_REGISTRY_BASIC_AUTH", "keel:s3cret"), "keel:***");
        assert_eq!(shown("KEEL_REGISTRY_BASIC_AUTH", "s3cret"), "***");
        assert_eq!(shown("KEEL_REGISTRY_BASIC_AUTH", ""), "");
        assert_eq!(
            shown("KEEL_SCHEMA_REGISTRY_URL", "https://k:s3cret@r.example"),
            "https://k:***@r.example/"
        );
        // Start-up errors show values through the same masks.
        for (key, value) in [
            ("KEEL_REGISTRY_BASIC_AUTH", "keel:"),
            ("KEEL_REGISTRY_BASIC_AUTH", "s3cret"),
            ("KEEL_SCHEMA_REGISTRY_URL", "ftp://k:s3cret@r.example"),
            ("KEEL_CONSUMER_MAX_ATTEMPTS", "redis://:s3cret@x"),
        ] {
            let err = Settings::from_vars(vars(&[(key, value)])).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&format!("{key}:")), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        // Debug of the settings (what a panic or a debug log would show) masks the registry's
        // password too.
        let s = Settings::from_vars(vars(&[
            ("KEEL_REGISTRY_BASIC_AUTH", "keel:s3cret"),
            ("KEEL_DATABASE_URL", "postgres://keel:s3cret@db/keel"),
            ("KEEL_SCHEMA_REGISTRY_URL", "https://k:s3cret@r.example"),
            ("KEEL_REDIS_URL", "rediss://:s3cret@cache:6380"),
            ("KEEL_SMTP_URL", "smtps://mailer:s3cret@smtp.example"),
            ("KEEL_KAFKA_SASL_PASSWORD", "s3cret"),
        ]))
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("postgres://keel:***@db/keel"), "{debug}");
    }

    #[test]
    fn the_registrys_basic_auth_is_user_colon_password() {
        assert_eq!(Settings::local().registry_auth, None);
        let s = Settings::from_vars(vars(&[("KEEL_REGISTRY_BASIC_AUTH", "keel:pa:ss")])).unwrap();
        assert_eq!(
            s.registry_auth,
            Some(BasicAuth {
                user: "keel".into(),
                password: "pa:ss".into()
            })
        );
        assert_eq!(Settings::from_vars(vars_of(&s)).unwrap(), s);
        for bad in ["keel", ":secret", "keel:"] {
            let err = Settings::from_vars(vars(&[("KEEL_REGISTRY_BASIC_AUTH", bad)])).unwrap_err();
            assert!(
                err.to_string().contains("must be user:password"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_registry_url_is_http_or_https() {
        let s = Settings::from_vars(vars(&[(
            "KEEL_SCHEMA_REGISTRY_URL",
            "https://key:secret@registry.example/",
        )]))
        .unwrap();
        assert_eq!(s.schema_registry_url, "https://key:secret@registry.example");
        for bad in ["registry:8081", "ftp://registry", "not a url"] {
            let err = Settings::from_vars(vars(&[("KEEL_SCHEMA_REGISTRY_URL", bad)])).unwrap_err();
            assert!(
                err.to_string().starts_with("KEEL_SCHEMA_REGISTRY_URL:"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn broker_quirks_are_off_unless_named() {
        assert_eq!(Settings::local().broker_quirks, BrokerQuirks::None);
        let s = Settings::from_vars(vars(&[("KEEL_BROKER_QUIRKS", "tansu")])).unwrap();
        assert_eq!(s.broker_quirks, BrokerQuirks::Tansu);
        let err = Settings::from_vars(vars(&[("KEEL_BROKER_QUIRKS", "redpanda")])).unwrap_err();
        assert!(err.to_string().starts_with("KEEL_BROKER_QUIRKS:"), "{err}");
    }

    #[test]
    fn an_unknown_keel_variable_is_a_typo_and_fails() {
        let err = Settings::from_vars(vars(&[("KEEL_TOPIC_ORDER", "x")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("KEEL_TOPIC_ORDER: unknown setting"),
            "{err}"
        );
    }

    #[test]
    fn values_override_defaults_and_other_variables_are_ignored() {
        let s = Settings::from_vars(vars(&[
            ("KEEL_TOPIC_ORDERS", "orders-eu"),
            ("KEEL_SCHEMA_REGISTRY_URL", "http://registry:8081/"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(s.topics.orders, "orders-eu");
        assert_eq!(s.schema_registry_url, "http://registry:8081");
    }
}
