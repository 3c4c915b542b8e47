//! Confluent wire format through a Confluent-compatible registry.
//!
//! [`Encoder`] registers each contract under its subject the first time it is used (or at
//! start-up through [`Encoder::prepare`]) and caches the id; [`Decoder`] fetches writer schemas by
//! id and caches them, so a running consumer keeps decoding while the registry is briefly away.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use crate::events::{CONTRACTS, Event, Payload};

/// Encoding failed. `transient` errors (registry unreachable) are worth retrying; the others
/// (registry refused the schema, value does not fit it) are not.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode {record} for topic {topic}: {message}")]
pub struct EncodeError {
    pub record: String,
    pub topic: String,
    pub message: String,
    pub transient: bool,
    /// The registry could not be reached at all (or answered 502/503): every other record would
    /// fail the same way now. A subject's own trouble (a 403 for it, a 500) is `transient` only.
    pub unreachable: bool,
    /// The registry refused the credentials (401, 403): a setting to fix, which a process
    /// starting fails on, naming it.
    pub credentials_refused: bool,
}

impl EncodeError {
    fn new(record: &str, topic: &str, e: &SRCError) -> Self {
        Self {
            record: record.to_owned(),
            topic: topic.to_owned(),
            message: describe(e),
            transient: transient(e),
            unreachable: e.retriable,
            credentials_refused: refused_credentials(e),
        }
    }
}

/// Decoding failed. The consumer branches on the variant: retry a transient error, dead-letter a
/// permanent one.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The registry could not be reached; the same bytes may decode later.
    #[error("schema registry unavailable: {0}")]
    Transient(String),
    /// The registry does not know the schema id (404). Usually the id is wrong for good, but a
    /// replica that lags its leader answers the same for an id registered a moment ago: worth
    /// a bounded number of retries (the consumers' attempt budget), then dead-lettered.
    #[error("unknown schema id: {0}")]
    UnknownSchema(String),
    /// The bytes will never decode: not the wire format, unknown schema id, or a body that does
    /// not match its schema.
    #[error("{0}")]
    Permanent(String),
    /// A well-formed record of a type this build has no contract for (a newer producer added an
    /// event): nothing is wrong with it, this build cannot read it. Consumers skip it.
    #[error("record type {0} is not one this build knows")]
    UnknownType(String),
}

/// A registry URL split into what goes where: the base URL requests are made to, without
/// userinfo, and the userinfo (`https://key:secret@host`) as HTTP basic-auth credentials, which
/// is how Confluent Cloud (API key and secret) and Karapace take them.
pub struct Endpoint {
    /// `scheme://host[:port][/path]`, no userinfo, no trailing slash: safe to print.
    pub base: String,
    /// `(user, password)`, percent-decoded.
    pub auth: Option<(String, String)>,
}

impl Endpoint {
    /// Splits `registry_url` (`KEEL_SCHEMA_REGISTRY_URL`). The error never holds the password.
    pub fn parse(registry_url: &str) -> anyhow::Result<Self> {
        Self::parse_setting(registry_url, "KEEL_SCHEMA_REGISTRY_URL")
    }

    /// As [`Endpoint::parse`], for a URL given as `setting`, which the error names.
    pub fn parse_setting(registry_url: &str, setting: &str) -> anyhow::Result<Self> {
        let mut url = url::Url::parse(registry_url.trim_end_matches('/')).map_err(|e| {
            anyhow::anyhow!(
                "{setting}: {e} (got {:?})",
                keel_core::settings::redact(registry_url)
            )
        })?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let auth = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some((decode(user), decode(password.unwrap_or_default()))),
        };
        // Both fail only for URLs that cannot have userinfo (no host), which Url::parse of an
        // http(s) URL with userinfo is not.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Self {
            base: url.as_str().trim_end_matches('/').to_owned(),
            auth,
        })
    }
}

fn settings(registry_url: &str) -> anyhow::Result<SrSettings> {
    let endpoint = Endpoint::parse(registry_url)?;
    let mut builder = SrSettings::new_builder(endpoint.base.clone());
    builder.no_proxy().set_timeout(Duration::from_secs(5));
    if let Some((user, password)) = &endpoint.auth {
        builder.set_basic_authorization(user, Some(password));
    }
    builder.build().map_err(|e| {
        anyhow::anyhow!(
            "KEEL_SCHEMA_REGISTRY_URL ({}): {}",
            endpoint.base,
            describe(&e)
        )
    })
}

fn describe(e: &SRCError) -> String {
    let described = match &e.cause {
        Some(cause) => format!("{}: {cause}", e.error),
        None => e.error.clone(),
    };
    if refused_credentials(e) {
        format!(
            "{described} (the registry refused the credentials: check the key:secret in KEEL_SCHEMA_REGISTRY_URL)"
        )
    } else {
        described
    }
}

/// 401 or 403: the registry wants other credentials. Not the record's fault, and it heals when
/// the credentials are fixed, so it is retried (transient) rather than dead-lettered:
/// schema_registry_converter calls every status but 502 and 503 permanent.
fn refused_credentials(e: &SRCError) -> bool {
    e.error.ends_with("status 401 Unauthorized") || e.error.ends_with("status 403 Forbidden")
}

/// The HTTP status of a registry answer that was not a success, if `e` is one.
fn status(e: &SRCError) -> Option<u16> {
    const MARK: &str = "failed with status ";
    let at = e.error.find(MARK)? + MARK.len();
    e.error.get(at..at + 3)?.parse().ok()
}

/// Whether `e` is worth retrying: the registry unreachable or unavailable, refusing the
/// credentials, or in trouble of its own (429, any 5xx: schema_registry_converter retries only
/// 502 and 503, but a 500 or 504 says nothing about the schema). A 4xx verdict on the schema
/// (409 incompatible, 422 invalid) is permanent.
fn transient(e: &SRCError) -> bool {
    e.retriable
        || refused_credentials(e)
        || status(e).is_some_and(|s| s == 429 || (500..600).contains(&s))
}

/// Encodes events in the Confluent wire format, registering their schemas as needed.
pub struct Encoder {
    inner: AvroEncoder,
    strategies: RwLock<HashMap<(String, &'static str), SubjectNameStrategy>>,
}

impl Encoder {
    /// `registry_url` may carry basic-auth credentials as userinfo (see [`Endpoint`]).
    pub fn new(registry_url: &str) -> anyhow::Result<Self> {
        let settings = settings(registry_url)?;
        Ok(Self {
            inner: AvroEncoder::new(settings),
            strategies: RwLock::default(),
        })
    }

    fn strategy(
        &self,
        topic: &str,
        name: &'static str,
        schema: &'static str,
    ) -> SubjectNameStrategy {
        let key = (topic.to_owned(), name);
        if let Some(s) = self
            .strategies
            .read()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return s;
        }
        let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
            topic.to_owned(),
            SuppliedSchema::new(Some(name.to_owned()), SchemaType::Avro, schema.to_owned()),
        );
        if let Ok(mut m) = self.strategies.write() {
            m.insert(key, strategy.clone());
        }
        strategy
    }

    /// Registers (or finds) every contract of `namespace` (e.g. `keel.orders`) under its subject
    /// on `topic`, so that a registry that refuses a schema stops the service at start-up rather
    /// than at the first event.
    pub async fn prepare(&self, topic: &str, namespace: &str) -> Result<(), EncodeError> {
        for contract in CONTRACTS.iter().filter(|c| c.namespace() == namespace) {
            let strategy = self.strategy(topic, contract.name, contract.schema);
            let subject = crate::subject(topic, contract.name);
            self.inner
                .get_schema_and_id(&subject, strategy)
                .await
                .map_err(|e| self.failed(contract.name, topic, &e))?;
        }
        Ok(())
    }

    /// The event's value bytes: magic byte, schema id, Avro body.
    pub async fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, EncodeError> {
        let strategy = self.strategy(topic, event.name(), event.schema());
        self.inner
            .encode_struct(Payload(event), &strategy)
            .await
            .map_err(|e| self.failed(event.name(), topic, &e))
    }

    /// The registry id of `schema` (record `record`, written by some build, not necessarily this
    /// one) under its subject on `topic`, registering it if the registry does not have it there
    /// yet: the id a body written under that schema is framed with. Cached per subject and
    /// schema (`fingerprint`).
    pub async fn id_for(
        &self,
        topic: &str,
        record: &str,
        fingerprint: i64,
        schema: &str,
    ) -> Result<u32, EncodeError> {
        let subject = crate::subject(topic, record);
        let strategy = SubjectNameStrategy::TopicRecordNameStrategyWithSchema(
            topic.to_owned(),
            SuppliedSchema::new(Some(record.to_owned()), SchemaType::Avro, schema.to_owned()),
        );
        let registered = self
            .inner
            .get_schema_and_id(&format!("{subject}@{fingerprint:016x}"), strategy)
            .await
            .map_err(|e| self.failed(record, topic, &e))?;
        Ok(registered.id)
    }

    /// The error of a registry call. The crate caches errors it deems final, a 401 or a refused
    /// schema among them; none may stay cached: keel retries a transient one, and an operator
    /// retries a row set aside for a permanent one once its cause is fixed (fixed credentials, a
    /// compatibility level relaxed), which must ask the registry again.
    fn failed(&self, record: &str, topic: &str, e: &SRCError) -> EncodeError {
        self.inner.remove_errors_from_cache();
        EncodeError::new(record, topic, e)
    }
}

/// Decodes Confluent wire-format values into [`Event`]s.
///
/// The writer's schema is fetched by id (`GET /schemas/ids/{id}`) with the schemas it
/// references (`GET /subjects/{s}/versions/{v}` for each reference, and theirs in turn,
/// soft-deleted versions included), as Confluent's deserializers do, and kept once it parses
/// and resolves. No failure is kept: the next record with that id asks the registry again.
pub struct Decoder {
    http: reqwest::Client,
    endpoint: Endpoint,
    writers: RwLock<HashMap<u32, Arc<Writer>>>,
}

/// A writer's schema, ready to read bodies with.
struct Writer {
    /// The record's full name.
    name: String,
    /// Over the writer's schema and the named types its references define. They are leaked to
    /// live as long as the process, as the reader borrows them: a few per schema id the
    /// process meets, kept for its life anyway (as schema_registry_converter did).
    reader: apache_avro::reader::datum::GenericDatumReader<'static>,
}

/// A registry answer's `references`.
#[derive(serde::Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// The parts of `GET /schemas/ids/{id}` and `GET /subjects/{s}/versions/{v}` the decoder reads.
#[derive(serde::Deserialize)]
struct Fetched {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    /// Missing or `null`: none.
    #[serde(default, deserialize_with = "null_as_empty")]
    references: Vec<Reference>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Reference>, D::Error> {
    Ok(<Option<Vec<Reference>> as serde::Deserialize>::deserialize(d)?.unwrap_or_default())
}

/// At most this many schemas behind one id: a bound on what a registry's answers can make the
/// decoder fetch.
const MAX_REFERENCED: usize = 1000;

impl Decoder {
    /// `registry_url` may carry basic-auth credentials as userinfo (see [`Endpoint`]).
    pub fn new(registry_url: &str) -> anyhow::Result<Self> {
        let endpoint = Endpoint::parse(registry_url)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| {
                anyhow::anyhow!(
                    "KEEL_SCHEMA_REGISTRY_URL ({}): {}",
                    endpoint.base,
                    keel_core::error_chain(&e)
                )
            })?;
        Ok(Self {
            http,
            endpoint,
            writers: RwLock::default(),
        })
    }

    pub async fn decode(&self, payload: Option<&[u8]>) -> Result<Event, DecodeError> {
        let Some(bytes) = payload else {
            return Err(DecodeError::Permanent(
                "record has no value (tombstone)".into(),
            ));
        };
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(DecodeError::Permanent(format!(
                "not Confluent wire format: expected magic byte 0 and a 4-byte schema id, got {} bytes starting {:02x?}",
                bytes.len(),
                &bytes[..bytes.len().min(5)]
            )));
        }
        let id = schema_id(bytes);
        let writer = self.writer(id).await?;
        let name = &writer.name;
        let value = writer.reader.read_value(&mut &bytes[5..]).map_err(|e| {
            DecodeError::Permanent(format!(
                "{name}: the body does not match its writer's schema (id {id}): {e}"
            ))
        })?;
        // Avro schema resolution: the writer's data, read with the contract this build knows.
        // Fields the reader lacks are dropped; fields the writer lacked take their defaults.
        let reader = reader_schema(name).ok_or_else(|| DecodeError::UnknownType(name.clone()))?;
        let value = value.resolve(reader).map_err(|e| {
            DecodeError::Permanent(format!(
                "{name}: the writer's schema (id {id}) cannot be read with this build's contract: {e}"
            ))
        })?;
        event_from_value(name, &value)
    }

    /// The writer's schema of `id`, from the cache or the registry.
    async fn writer(&self, id: u32) -> Result<Arc<Writer>, DecodeError> {
        if let Some(w) = self.writers.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(w);
        }
        let main: Fetched = self.fetch(&["schemas", "ids", &id.to_string()]).await?;
        if let Some(other) = main
            .schema_type
            .as_deref()
            .filter(|t| !t.eq_ignore_ascii_case("AVRO"))
        {
            return Err(DecodeError::Permanent(format!(
                "schema id {id} is a {other} schema, not Avro"
            )));
        }
        // Every schema behind the references, each reference name once (the first found, as
        // Confluent's clients take it), whatever the depth, each after the ones it references
        // (depth first, post-order): the order in which apache-avro resolves names.
        enum Visit {
            Fetch(Reference),
            Done(String),
        }
        let mut texts = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut stack: Vec<Visit> = main
            .references
            .into_iter()
            .rev()
            .map(Visit::Fetch)
            .collect();
        while let Some(visit) = stack.pop() {
            let r = match visit {
                Visit::Done(text) => {
                    texts.push(text);
                    continue;
                }
                Visit::Fetch(r) => r,
            };
            if !seen.insert(r.name.clone()) {
                continue;
            }
            if seen.len() > MAX_REFERENCED {
                return Err(DecodeError::Permanent(format!(
                    "schema id {id} references more than {MAX_REFERENCED} schemas"
                )));
            }
            let version = r.version.to_string();
            let fetched: Fetched = self
                .fetch(&["subjects", &r.subject, "versions", &version])
                .await?;
            stack.push(Visit::Done(fetched.schema));
            stack.extend(fetched.references.into_iter().rev().map(Visit::Fetch));
        }
        let (schema, referenced) = apache_avro::Schema::parse_str_with_list(&main.schema, &texts)
            .map_err(|e| {
            DecodeError::Permanent(format!(
                "the writer's schema (id {id}) does not parse with its references: {e}"
            ))
        })?;
        let name = match &schema {
            apache_avro::Schema::Record(record) => record.name.fullname(None),
            // A named type, but not an event: no contract of this build reads it.
            other => {
                return Err(match other.name() {
                    Some(name) => DecodeError::UnknownType(name.fullname(None)),
                    None => DecodeError::Permanent(format!(
                        "the writer's schema (id {id}) is not a named record"
                    )),
                });
            }
        };
        // The writer's own names after those of its references, which it uses. Checked before
        // anything is leaked: a schema that does not resolve is not kept.
        let unresolved = |e: apache_avro::Error| {
            DecodeError::Permanent(format!(
                "the writer's schema (id {id}) does not resolve with its references: {e}"
            ))
        };
        apache_avro::schema::ResolvedSchema::new_with_schemata(
            referenced.iter().chain(std::iter::once(&schema)).collect(),
        )
        .map_err(unresolved)?;
        let schema: &'static apache_avro::Schema = Box::leak(Box::new(schema));
        let referenced: &'static [apache_avro::Schema] = Vec::leak(referenced);
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .writer_schemata(referenced.iter().chain(std::iter::once(schema)).collect())
            .and_then(|b| b.build())
            .map_err(unresolved)?;
        let writer = Arc::new(Writer { name, reader });
        if let Ok(mut m) = self.writers.write() {
            m.insert(id, writer.clone());
        }
        Ok(writer)
    }

    /// `GET` of the registry path made of `segments`, each percent-encoded. Unreachable, refused
    /// credentials, 429 and 5xx are transient; 404 is [`DecodeError::UnknownSchema`]; any other
    /// refusal, or an answer that is not what a registry answers, is permanent.
    async fn fetch<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
    ) -> Result<T, DecodeError> {
        let base = &self.endpoint.base;
        let mut url = url::Url::parse(base)
            .map_err(|e| DecodeError::Permanent(format!("registry URL {base}: {e}")))?;
        url.path_segments_mut()
            .map_err(|()| DecodeError::Permanent(format!("registry URL {base} has no path")))?
            .pop_if_empty()
            .extend(segments);
        // A record written under a version soft-deleted since still decodes.
        url.query_pairs_mut().append_pair("deleted", "true");
        let path = format!("/{}", segments.join("/"));
        let mut request = self.http.get(url).header(
            reqwest::header::ACCEPT,
            "application/vnd.schemaregistry.v1+json",
        );
        if let Some((user, password)) = &self.endpoint.auth {
            request = request.basic_auth(user, Some(password));
        }
        let unreachable = |e: reqwest::Error| {
            DecodeError::Transient(format!(
                "GET {path}: registry at {base} unreachable: {}",
                keel_core::error_chain(&e)
            ))
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                DecodeError::Permanent(format!(
                    "GET {path}: registry at {base} answered what no registry answers: {e}"
                ))
            });
        }
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let refusal = format!(
            "GET {path}: registry at {base} answered {status} (error_code {}): {}",
            answer["error_code"],
            answer["message"].as_str().unwrap_or("no message")
        );
        Err(match status.as_u16() {
            401 | 403 => DecodeError::Transient(format!(
                "{refusal} (the registry refused the credentials: check the key:secret in KEEL_SCHEMA_REGISTRY_URL)"
            )),
            429 | 500..=599 => DecodeError::Transient(refusal),
            404 => DecodeError::UnknownSchema(refusal),
            _ => DecodeError::Permanent(refusal),
        })
    }
}

/// The schema id of a Confluent wire-format value (bytes 1..5, big-endian).
fn schema_id(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]])
}

/// One of this build's contracts, parsed once.
struct Parsed {
    schema: apache_avro::Schema,
    /// CRC-64-AVRO (Rabin) of the schema's Parsing Canonical Form, as a signed 64-bit number.
    fingerprint: i64,
}

/// This build's contract for record `name`.
fn contract(name: &str) -> Option<&'static Parsed> {
    static SCHEMAS: OnceLock<HashMap<&'static str, Parsed>> = OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            CONTRACTS
                .iter()
                .filter_map(|c| {
                    let schema = apache_avro::Schema::parse_str(c.schema).ok()?;
                    let fingerprint = fingerprint(&schema);
                    Some((
                        c.name,
                        Parsed {
                            schema,
                            fingerprint,
                        },
                    ))
                })
                .collect()
        })
        .get(name)
}

/// CRC-64-AVRO (Rabin) of `schema`'s Parsing Canonical Form, as a signed 64-bit number.
pub fn fingerprint(schema: &apache_avro::Schema) -> i64 {
    let bytes = schema.fingerprint::<apache_avro::rabin::Rabin>().bytes;
    let mut eight = [0u8; 8];
    for (to, from) in eight.iter_mut().zip(bytes) {
        *to = from;
    }
    i64::from_le_bytes(eight)
}

fn reader_schema(name: &str) -> Option<&'static apache_avro::Schema> {
    contract(name).map(|c| &c.schema)
}

/// An event's Avro body under this build's contract, with that contract: what the outbox
/// stores, so that the relay publishes the record as its writer wrote it, whatever contracts
/// the relay's own build knows.
#[derive(Debug, Clone)]
pub struct Written {
    /// The record's full name.
    pub record: Cow<'static, str>,
    /// The writer's schema, as the writer build's `.avsc` has it.
    pub schema: Cow<'static, str>,
    /// [`fingerprint`] of `schema`.
    pub fingerprint: i64,
    /// The Avro binary body (no framing).
    pub body: Vec<u8>,
}

/// `event` written under this build's contract for it.
pub fn write(event: &Event) -> Result<Written, String> {
    let contract = contract(event.name())
        .ok_or_else(|| format!("{}: this build's contract does not parse", event.name()))?;
    let body = apache_avro::writer::datum::GenericDatumWriter::builder(&contract.schema)
        .build()
        .and_then(|w| w.write_ser_to_vec(&Payload(event)))
        .map_err(|e| format!("{} does not fit its contract: {e}", event.name()))?;
    Ok(Written {
        record: Cow::Borrowed(event.name()),
        schema: Cow::Borrowed(event.schema()),
        fingerprint: contract.fingerprint,
        body,
    })
}

/// `event` written under another build's contract for its record, `schema` (an `.avsc`): what
/// a writer of an older contract stores (fields `schema` lacks are left out), or of a newer one
/// with `extra`, the fields it sets that this build has no place for. For rolling-deploy tests
/// and `make chaos`, which play those writers.
pub fn write_under(
    event: &Event,
    schema: &str,
    extra: Vec<(String, Value)>,
) -> Result<Written, String> {
    let parsed = apache_avro::Schema::parse_str(schema)
        .map_err(|e| format!("{}: the schema does not parse: {e}", event.name()))?;
    let apache_avro::Schema::Record(record) = &parsed else {
        return Err(format!("{}: the schema is not a record", event.name()));
    };
    let Value::Record(mut fields) =
        apache_avro::to_value(Payload(event)).map_err(|e| format!("{}: {e}", event.name()))?
    else {
        return Err(format!("{} is not a record", event.name()));
    };
    fields.retain(|(name, _)| record.fields.iter().any(|f| &f.name == name));
    fields.extend(extra);
    let body = Value::Record(fields)
        .resolve(&parsed)
        .and_then(|value| {
            apache_avro::writer::datum::GenericDatumWriter::builder(&parsed)
                .build()?
                .write_value_to_vec(value)
        })
        .map_err(|e| format!("{} does not fit the schema: {e}", event.name()))?;
    Ok(Written {
        record: Cow::Owned(event.name().to_owned()),
        schema: Cow::Owned(schema.to_owned()),
        fingerprint: fingerprint(&parsed),
        body,
    })
}

/// Builds the [`Event`] for a decoded record named `name`.
pub fn event_from_value(name: &str, value: &Value) -> Result<Event, DecodeError> {
    match Event::from_avro(name, value) {
        Some(Ok(event)) => Ok(event),
        Some(Err(e)) => Err(DecodeError::Permanent(format!(
            "{name} does not match its contract: {e}"
        ))),
        None => Err(DecodeError::Permanent(format!(
            "unknown record type {name}"
        ))),
    }
}
