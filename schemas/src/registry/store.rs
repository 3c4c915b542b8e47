//! The registry's state in PostgreSQL.
//!
//! Registration takes a transaction-scoped advisory lock on the subject, so concurrent
//! registrations to one subject are serialised (one version each, no gaps) and concurrent
//! registrations of one schema get one id (the `fingerprint` unique index decides).
//!
//! A schema's identity is its JSON with names resolved to full names and keys sorted
//! (`identity_json`), so that `"string"` and `{"type":"string"}`, or `"name":"ns.R"` and
//! `"name":"R","namespace":"ns"`, are one schema with one id, as in Confluent's registry.

use apache_avro::Schema;
use serde_json::Value;
use sqlx::{PgConnection, PgPool, Row};

use super::api::Error;
use super::compat::{self, Level};
pub use super::references::Reference;

/// A version of a subject, as the API returns it.
#[derive(Debug, Clone)]
pub struct Registered {
    pub subject: String,
    pub version: i32,
    pub id: i32,
    pub schema: String,
    pub schema_type: String,
    /// Soft-deleted (only found when deleted versions were asked for).
    pub deleted: bool,
    pub references: Vec<Reference>,
    /// Self-contained, for a schema with references.
    pub resolved: Option<String>,
}

/// A registry's or a subject's mode, as Confluent's registry has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Registrations are checked and numbered by the registry (the default).
    ReadWrite,
    /// Every registration and deletion is refused.
    ReadOnly,
    /// Registrations carry their own id and version and are not checked: how a migration tool
    /// moves contracts between registries keeping their ids.
    Import,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ReadWrite => "READWRITE",
            Mode::ReadOnly => "READONLY",
            Mode::Import => "IMPORT",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "READWRITE" => Ok(Mode::ReadWrite),
            "READONLY" => Ok(Mode::ReadOnly),
            "IMPORT" => Ok(Mode::Import),
            _ => Err(format!(
                "Invalid mode {s:?}: use one of READWRITE, READONLY, IMPORT"
            )),
        }
    }
}

/// How a registration asks to be made: `normalize` stores the schema in its normalised form
/// (Confluent's `normalize=true`); `id` and `version` are given by a migration tool in
/// `IMPORT` mode (which needs the id). Outside it a version may be given only as the next one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Registering {
    pub normalize: bool,
    pub id: Option<i32>,
    pub version: Option<i32>,
}

/// `latest` (or `-1`) or a version number.
#[derive(Debug, Clone, Copy)]
pub enum VersionRef {
    Latest,
    Number(i32),
}

impl VersionRef {
    pub fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "latest" | "-1" => Ok(VersionRef::Latest),
            _ => match s.parse::<i32>() {
                Ok(n) if n > 0 => Ok(VersionRef::Number(n)),
                _ => Err(Error::InvalidVersion(s.to_owned())),
            },
        }
    }
}

/// A parsed, validated schema and its identity.
pub struct Parsed {
    /// Self-contained: referenced types are defined where first used.
    pub schema: Schema,
    /// The identity: the schema's normalised text, with its references when it has any.
    pub normalized: String,
    /// The schema's normalised text alone (what `normalize=true` stores).
    pub normalized_text: String,
    /// The self-contained text, for a schema with references.
    pub resolved: Option<String>,
    pub references: Vec<Reference>,
}

/// Refuses every `schemaType` but Avro (absent means Avro): keel speaks Avro only.
pub fn check_schema_type(schema_type: Option<&str>) -> Result<(), Error> {
    match schema_type {
        Some(t) if !t.eq_ignore_ascii_case("AVRO") => Err(Error::InvalidSchema(format!(
            "schemaType {t} is not supported by this registry; only AVRO is"
        ))),
        _ => Ok(()),
    }
}

/// Validates `text` as an Avro schema of `schema_type`.
pub fn parse(text: &str, schema_type: Option<&str>) -> Result<Parsed, Error> {
    check_schema_type(schema_type)?;
    let json: Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidSchema(format!("Invalid schema: not JSON: {e}")))?;
    let schema =
        Schema::parse(&json).map_err(|e| Error::InvalidSchema(format!("Invalid schema: {e}")))?;
    let mut normalized = String::with_capacity(text.len());
    write_sorted(&identity_json(&json, ""), &mut normalized);
    Ok(Parsed {
        schema,
        normalized_text: normalized.clone(),
        normalized,
        resolved: None,
        references: Vec::new(),
    })
}

/// [`parse`], for a schema that uses the named types of `references` (looked up through
/// `conn`).
pub async fn parse_with(
    conn: &mut PgConnection,
    text: &str,
    schema_type: Option<&str>,
    references: &[Reference],
) -> Result<Parsed, Error> {
    if references.is_empty() {
        return parse(text, schema_type);
    }
    check_schema_type(schema_type)?;
    let json: Value = serde_json::from_str(text)
        .map_err(|e| Error::InvalidSchema(format!("Invalid schema: not JSON: {e}")))?;
    let main = identity_json(&json, "");
    let definitions = super::references::definitions(conn, references).await?;
    let inlined = super::references::inline(&main, &definitions, &mut Default::default());
    let schema = Schema::parse(&inlined).map_err(|e| {
        Error::InvalidSchema(format!(
            "Invalid schema: {e} (with its references resolved)"
        ))
    })?;
    let mut normalized_text = String::with_capacity(text.len());
    write_sorted(&main, &mut normalized_text);
    let mut normalized = String::with_capacity(text.len());
    write_sorted(
        &serde_json::json!({"schema": main, "references": references}),
        &mut normalized,
    );
    Ok(Parsed {
        schema,
        normalized,
        normalized_text,
        resolved: Some(inlined.to_string()),
        references: references.to_vec(),
    })
}

/// The identity of a schema, from its (valid) JSON: named types under their full names (and
/// `"namespace": ""` where a type leaves an enclosing namespace), references by full name,
/// `{"type": P}` alone as `P`, a field's default `"order": "ascending"` left out; every other
/// key kept (docs, defaults, aliases, logical types, custom properties such as Kafka
/// Connect's). Written with sorted keys it does not depend on whitespace, key order or the
/// spelling of names; this is also the text `normalize=true` stores.
pub(super) fn identity_json(v: &Value, namespace: &str) -> Value {
    const PRIMITIVES: [&str; 8] = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ];
    let qualify = |name: &str, namespace: &str| -> String {
        if PRIMITIVES.contains(&name) || name.contains('.') || namespace.is_empty() {
            name.to_owned()
        } else {
            format!("{namespace}.{name}")
        }
    };
    let map = match v {
        Value::String(name) => return Value::String(qualify(name, namespace)),
        Value::Array(branches) => {
            return Value::Array(
                branches
                    .iter()
                    .map(|b| identity_json(b, namespace))
                    .collect(),
            );
        }
        Value::Object(map) => map,
        other => return other.clone(),
    };
    let kind = map.get("type").and_then(Value::as_str);
    if map.len() == 1
        && let Some(kind) = kind
        && !matches!(
            kind,
            "record" | "error" | "enum" | "fixed" | "array" | "map"
        )
    {
        return Value::String(qualify(kind, namespace));
    }
    let mut out = serde_json::Map::new();
    match kind {
        Some("record" | "error" | "enum" | "fixed") => {
            let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
            let full = if name.contains('.') {
                name.to_owned()
            } else {
                let own = map.get("namespace").and_then(Value::as_str);
                qualify(name, own.unwrap_or(namespace))
            };
            let inner = full.rsplit_once('.').map_or("", |(ns, _)| ns);
            for (key, value) in map {
                let value = match (key.as_str(), value) {
                    ("namespace", _) => continue,
                    ("name", _) => Value::String(full.clone()),
                    ("aliases", Value::Array(aliases)) => Value::Array(
                        aliases
                            .iter()
                            .map(|a| match a {
                                Value::String(a) => Value::String(qualify(a, inner)),
                                other => other.clone(),
                            })
                            .collect(),
                    ),
                    ("fields", Value::Array(fields)) => {
                        Value::Array(fields.iter().map(|f| identity_field(f, inner)).collect())
                    }
                    _ => value.clone(),
                };
                out.insert(key.clone(), value);
            }
            if inner.is_empty() && !namespace.is_empty() {
                out.insert("namespace".into(), Value::String(String::new()));
            }
        }
        _ => {
            for (key, value) in map {
                let value = match (key.as_str(), value) {
                    ("items" | "values", _) => identity_json(value, namespace),
                    ("type", Value::String(t)) if !matches!(t.as_str(), "array" | "map") => {
                        Value::String(qualify(t, namespace))
                    }
                    ("type", Value::String(_)) => value.clone(),
                    ("type", _) => identity_json(value, namespace),
                    _ => value.clone(),
                };
                out.insert(key.clone(), value);
            }
        }
    }
    Value::Object(out)
}

fn identity_field(field: &Value, namespace: &str) -> Value {
    let Value::Object(map) = field else {
        return field.clone();
    };
    let mut out = serde_json::Map::new();
    for (key, value) in map {
        match key.as_str() {
            "type" => {
                out.insert(key.clone(), identity_json(value, namespace));
            }
            "order" if value == "ascending" => {}
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Value::Object(out)
}

/// A parsed schema written back as JSON with sorted keys: how the messages of a refused
/// compatibility check show an earlier version (`oldSchema`).
pub fn written_back(schema: &Schema) -> Result<String, serde_json::Error> {
    let json = serde_json::to_value(schema)?;
    let mut out = String::new();
    write_sorted(&json, &mut out);
    Ok(out)
}

/// Compact JSON with object keys sorted at every depth: equal for schemas that differ only in
/// whitespace or key order. Written by hand so it does not depend on serde_json's map features.
fn write_sorted(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_sorted(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn registered(row: &sqlx::postgres::PgRow) -> Result<Registered, Error> {
    let references = serde_json::from_str(row.get::<&str, _>("refs"))
        .map_err(|e| Error::Store(format!("stored references do not parse: {e}")))?;
    Ok(Registered {
        subject: row.get("subject"),
        version: row.get("version"),
        id: row.get("schema_id"),
        schema: row.get("schema"),
        schema_type: row.get("schema_type"),
        deleted: row.get("deleted"),
        references,
        resolved: row.get("resolved"),
    })
}

const VERSION_COLUMNS: &str = "v.subject, v.version, v.schema_id, s.schema, s.schema_type, v.deleted, s.resolved,
    (SELECT COALESCE(json_agg(json_build_object('name', r.name, 'subject', r.subject, 'version', r.version) ORDER BY r.position), '[]'::json)
       FROM registry.schema_references r WHERE r.schema_id = s.id)::text AS refs";

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Registers `text` under `subject`; returns the schema id. Registering a schema the subject
    /// already has returns its id and creates no version. In `IMPORT` mode the id and version
    /// are the caller's (see [`Registering`]) and no compatibility check is made.
    pub async fn register(
        &self,
        subject: &str,
        text: &str,
        schema_type: Option<&str>,
        references: &[Reference],
        how: Registering,
    ) -> Result<i32, Error> {
        let mut tx = self.pool.begin().await?;
        // Shared with every registration, exclusive for a change of the global mode (the key
        // of subject "", which no registration can have).
        sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext('keel.registry.'))")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.registry.' || $1))")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        let parsed = parse_with(&mut tx, text, schema_type, references).await?;
        let stored = if how.normalize {
            parsed.normalized_text.as_str()
        } else {
            text
        };
        let mode = mode_for(&mut tx, subject).await?;
        if mode == Mode::ReadOnly {
            return Err(Error::NotPermitted(format!(
                "Subject {subject} is in read-only mode"
            )));
        }
        if mode == Mode::Import {
            let id = import(&mut tx, subject, stored, &parsed, how).await?;
            tx.commit().await?;
            tracing::info!(subject, id, "Imported schema");
            return Ok(id);
        }
        if how.id.is_some() {
            return Err(Error::NotPermitted(format!(
                "Subject {subject} is not in import mode: the registry gives ids"
            )));
        }
        let existing: Option<i32> = sqlx::query_scalar(
            "SELECT v.schema_id FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
             WHERE v.subject = $1 AND NOT v.deleted AND s.normalized = $2 ORDER BY v.version LIMIT 1",
        )
        .bind(subject)
        .bind(&parsed.normalized)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = existing {
            tx.commit().await?;
            return Ok(id);
        }
        if let Some(wanted) = how.version {
            let next: i32 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM registry.subject_versions WHERE subject = $1",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
            if wanted != next {
                return Err(Error::InvalidSchema(format!(
                    "Version {wanted} is not one more than previous version {}",
                    next - 1
                )));
            }
        }
        let level = level_for(&mut tx, subject).await?;
        let previous = live_versions(&mut tx, subject).await?;
        let violations = compat::check(level, &parsed.schema, &previous);
        if !violations.is_empty() {
            return Err(Error::Incompatible {
                subject: subject.to_owned(),
                messages: compat::messages(&violations),
            });
        }
        let id: i32 = sqlx::query_scalar(
            "INSERT INTO registry.schemas (schema, normalized, fingerprint, identity_form, resolved)
             VALUES ($1, $2, sha256(convert_to($2, 'UTF8')), 2, $3)
             ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = EXCLUDED.fingerprint
             RETURNING id",
        )
        .bind(stored)
        .bind(&parsed.normalized)
        .bind(&parsed.resolved)
        .fetch_one(&mut *tx)
        .await?;
        // References are part of the identity: a schema found by fingerprint has these ones
        // already, and recording them again changes nothing.
        super::references::record(&mut tx, id, &parsed.references).await?;
        sqlx::query(
            "INSERT INTO registry.subject_versions (subject, version, schema_id)
             SELECT $1, COALESCE(MAX(version), 0) + 1, $2 FROM registry.subject_versions WHERE subject = $1",
        )
        .bind(subject)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(subject, id, "Registered schema");
        Ok(id)
    }

    /// Finds the version of `subject` holding `text` (the newest, when it was registered again
    /// after a soft delete and `deleted` asks for soft-deleted versions too).
    pub async fn lookup(
        &self,
        subject: &str,
        text: &str,
        references: &[Reference],
        deleted: bool,
    ) -> Result<Registered, Error> {
        let mut conn = self.pool.acquire().await?;
        let parsed = parse_with(&mut conn, text, None, references).await?;
        drop(conn);
        let row = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
             WHERE v.subject = $1 AND s.normalized = $2 AND ($3 OR NOT v.deleted) ORDER BY v.version DESC LIMIT 1"
        ))
        .bind(subject)
        .bind(&parsed.normalized)
        .bind(deleted)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => registered(&row),
            None if self.subject_exists(subject, deleted).await? => Err(Error::SchemaNotFound),
            None => Err(Error::SubjectNotFound(subject.to_owned())),
        }
    }

    /// Schema `id`: its text, type and references.
    pub async fn schema_by_id(&self, id: i32) -> Result<(String, String, Vec<Reference>), Error> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query("SELECT schema, schema_type FROM registry.schemas WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
            .ok_or(Error::SchemaNotFound)?;
        let references = super::references::of_schema(&mut conn, id).await?;
        Ok((row.get("schema"), row.get("schema_type"), references))
    }

    /// The ids of the live schemas that reference `subject`'s `version`.
    pub async fn referenced_by(
        &self,
        subject: &str,
        version: VersionRef,
    ) -> Result<Vec<i32>, Error> {
        let found = self.version(subject, version, false).await?;
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT r.schema_id FROM registry.schema_references r
               JOIN registry.subject_versions v ON v.schema_id = r.schema_id AND NOT v.deleted
              WHERE r.subject = $1 AND r.version = $2 ORDER BY r.schema_id",
        )
        .bind(subject)
        .bind(found.version)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The subject/version pairs that use schema `id` (soft-deleted ones with `deleted`).
    pub async fn versions_of_id(
        &self,
        id: i32,
        deleted: bool,
    ) -> Result<Vec<(String, i32)>, Error> {
        self.schema_by_id(id).await?;
        let rows = sqlx::query("SELECT subject, version FROM registry.subject_versions WHERE schema_id = $1 AND ($2 OR NOT deleted) ORDER BY subject, version")
            .bind(id)
            .bind(deleted)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("subject"), r.get("version")))
            .collect())
    }

    /// The subjects with a version that uses schema `id` (soft-deleted ones with `deleted`).
    pub async fn subjects_of_id(&self, id: i32, deleted: bool) -> Result<Vec<String>, Error> {
        self.schema_by_id(id).await?;
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT subject FROM registry.subject_versions
              WHERE schema_id = $1 AND ($2 OR NOT deleted) ORDER BY subject",
        )
        .bind(id)
        .bind(deleted)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every version of the subjects starting with `prefix`, by subject and version; with
    /// `latest_only`, each subject's latest.
    pub async fn all_versions(
        &self,
        prefix: &str,
        deleted: bool,
        latest_only: bool,
    ) -> Result<Vec<Registered>, Error> {
        let rows = sqlx::query(&format!(
            "SELECT {VERSION_COLUMNS} FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
              WHERE starts_with(v.subject, $1) AND ($2 OR NOT v.deleted)
                AND (NOT $3 OR v.version = (SELECT max(l.version) FROM registry.subject_versions l
                                             WHERE l.subject = v.subject AND ($2 OR NOT l.deleted)))
              ORDER BY v.subject, v.version"
        ))
        .bind(prefix)
        .bind(deleted)
        .bind(latest_only)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(registered).collect()
    }

    pub async fn subjects(&self, deleted: bool) -> Result<Vec<String>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT subject FROM registry.subject_versions GROUP BY subject HAVING $1 OR bool_or(NOT deleted) ORDER BY subject",
        )
        .bind(deleted)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn subject_exists(&self, subject: &str, deleted: bool) -> Result<bool, Error> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM registry.subject_versions WHERE subject = $1 AND ($2 OR NOT deleted))",
        )
        .bind(subject)
        .bind(deleted)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn versions(&self, subject: &str, deleted: bool) -> Result<Vec<i32>, Error> {
        let versions: Vec<i32> = sqlx::query_scalar(
            "SELECT version FROM registry.subject_versions WHERE subject = $1 AND ($2 OR NOT deleted) ORDER BY version",
        )
        .bind(subject)
        .bind(deleted)
        .fetch_all(&self.pool)
        .await?;
        if versions.is_empty() {
            return Err(Error::SubjectNotFound(subject.to_owned()));
        }
        Ok(versions)
    }

    pub async fn version(
        &self,
        subject: &str,
        version: VersionRef,
        deleted: bool,
    ) -> Result<Registered, Error> {
        let row = match version {
            VersionRef::Latest => sqlx::query(&format!(
                "SELECT {VERSION_COLUMNS} FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
                 WHERE v.subject = $1 AND ($2 OR NOT v.deleted) ORDER BY v.version DESC LIMIT 1"
            ))
            .bind(subject)
            .bind(deleted)
            .fetch_optional(&self.pool)
            .await?,
            VersionRef::Number(n) => sqlx::query(&format!(
                "SELECT {VERSION_COLUMNS} FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
                 WHERE v.subject = $1 AND v.version = $3 AND ($2 OR NOT v.deleted)"
            ))
            .bind(subject)
            .bind(deleted)
            .bind(n)
            .fetch_optional(&self.pool)
            .await?,
        };
        match row {
            Some(row) => registered(&row),
            None if self.subject_exists(subject, false).await? => Err(Error::VersionNotFound),
            None => Err(Error::SubjectNotFound(subject.to_owned())),
        }
    }

    /// Violations of the subject's level if `text` were registered, checked against `version`
    /// (or, with `None`, as registering checks: the latest live version, or every one for the
    /// `_TRANSITIVE` levels).
    pub async fn check(
        &self,
        subject: &str,
        version: Option<VersionRef>,
        text: &str,
        references: &[Reference],
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.pool.acquire().await?;
        let parsed = parse_with(&mut conn, text, None, references).await?;
        let level = level_for(&mut conn, subject).await?;
        let existing = match version {
            // The check registering would make: the latest version, or every one for the
            // `_TRANSITIVE` levels (Confluent's `/compatibility/subjects/{s}/versions`).
            None => live_versions(&mut conn, subject).await?,
            Some(v) => {
                let found = self.version(subject, v, false).await?;
                let schema = Schema::parse_str(found.resolved.as_deref().unwrap_or(&found.schema))
                    .map_err(|e| Error::Store(e.to_string()))?;
                vec![(found.version, schema)]
            }
        };
        Ok(compat::messages(&compat::check(
            level,
            &parsed.schema,
            &existing,
        )))
    }

    pub async fn global_level(&self) -> Result<Level, Error> {
        let mut conn = self.pool.acquire().await?;
        level_for(&mut conn, "").await
    }

    /// The subject's own level, if one was set.
    pub async fn subject_level(&self, subject: &str) -> Result<Option<Level>, Error> {
        let level: Option<String> =
            sqlx::query_scalar("SELECT compatibility FROM registry.config WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        level.map(|l| l.parse().map_err(Error::Store)).transpose()
    }

    /// Sets the level of `subject` (`""` for the global default).
    pub async fn set_level(&self, subject: &str, level: Level) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO registry.config (subject, compatibility) VALUES ($1, $2)
             ON CONFLICT (subject) DO UPDATE SET compatibility = EXCLUDED.compatibility",
        )
        .bind(subject)
        .bind(level.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes the subject's own level; returns what it was.
    pub async fn delete_subject_level(&self, subject: &str) -> Result<Level, Error> {
        let old: Option<String> = sqlx::query_scalar("DELETE FROM registry.config WHERE subject = $1 AND subject <> '' RETURNING compatibility")
            .bind(subject)
            .fetch_optional(&self.pool)
            .await?;
        match old {
            Some(l) => l.parse().map_err(Error::Store),
            None => Err(Error::SubjectLevelNotConfigured(subject.to_owned())),
        }
    }

    /// Soft-deletes every live version of `subject`, or with `permanent` removes a subject that
    /// was soft-deleted first (Confluent's two-step delete). Returns the versions deleted.
    pub async fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<i32>, Error> {
        self.refuse_in_read_only(subject).await?;
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT version, deleted FROM registry.subject_versions WHERE subject = $1 ORDER BY version FOR UPDATE")
            .bind(subject)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            return Err(Error::SubjectNotFound(subject.to_owned()));
        }
        refuse_if_referenced(&mut tx, subject, None).await?;
        let live = rows.iter().filter(|r| !r.get::<bool, _>("deleted")).count();
        let versions: Vec<i32> = rows.iter().map(|r| r.get("version")).collect();
        if permanent {
            if live > 0 {
                return Err(Error::SubjectNotSoftDeleted(subject.to_owned()));
            }
            sqlx::query("DELETE FROM registry.subject_versions WHERE subject = $1")
                .bind(subject)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM registry.config WHERE subject = $1 AND subject <> ''")
                .bind(subject)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(versions);
        }
        if live == 0 {
            return Err(Error::SubjectSoftDeleted(subject.to_owned()));
        }
        let deleted: Vec<i32> = sqlx::query_scalar(
            "UPDATE registry.subject_versions SET deleted = true WHERE subject = $1 AND NOT deleted RETURNING version",
        )
        .bind(subject)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut deleted = deleted;
        deleted.sort_unstable();
        Ok(deleted)
    }

    /// Soft-deletes one version (or with `permanent`, removes a soft-deleted one).
    pub async fn delete_version(
        &self,
        subject: &str,
        version: VersionRef,
        permanent: bool,
    ) -> Result<i32, Error> {
        self.refuse_in_read_only(subject).await?;
        if permanent {
            let found = self.version(subject, version, true).await?;
            let mut tx = self.pool.begin().await?;
            if lock_version(&mut tx, subject, found.version).await? != Some(true) {
                return Err(Error::VersionNotSoftDeleted(found.version));
            }
            refuse_if_referenced(&mut tx, subject, Some(found.version)).await?;
            sqlx::query(
                "DELETE FROM registry.subject_versions WHERE subject = $1 AND version = $2",
            )
            .bind(subject)
            .bind(found.version)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(found.version);
        }
        let found = match self.version(subject, version, false).await {
            Err(Error::VersionNotFound | Error::SubjectNotFound(_))
                if matches!(version, VersionRef::Number(_)) =>
            {
                let found = self.version(subject, version, true).await?;
                return Err(Error::VersionSoftDeleted {
                    subject: subject.to_owned(),
                    version: found.version,
                });
            }
            other => other?,
        };
        let mut tx = self.pool.begin().await?;
        match lock_version(&mut tx, subject, found.version).await? {
            Some(false) => {}
            // Deleted by a concurrent request since it was read.
            Some(true) => {
                return Err(Error::VersionSoftDeleted {
                    subject: subject.to_owned(),
                    version: found.version,
                });
            }
            None => return Err(Error::VersionNotFound),
        }
        refuse_if_referenced(&mut tx, subject, Some(found.version)).await?;
        sqlx::query("UPDATE registry.subject_versions SET deleted = true WHERE subject = $1 AND version = $2")
            .bind(subject)
            .bind(found.version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(found.version)
    }

    async fn refuse_in_read_only(&self, subject: &str) -> Result<(), Error> {
        let mut conn = self.pool.acquire().await?;
        if mode_for(&mut conn, subject).await? == Mode::ReadOnly {
            return Err(Error::NotPermitted(format!(
                "Subject {subject} is in read-only mode"
            )));
        }
        Ok(())
    }

    /// The global mode.
    pub async fn global_mode(&self) -> Result<Mode, Error> {
        let mut conn = self.pool.acquire().await?;
        mode_for(&mut conn, "").await
    }

    /// The subject's own mode, if one was set.
    pub async fn subject_mode(&self, subject: &str) -> Result<Option<Mode>, Error> {
        let mode: Option<String> =
            sqlx::query_scalar("SELECT mode FROM registry.modes WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&self.pool)
                .await?;
        mode.map(|m| m.parse().map_err(Error::Store)).transpose()
    }

    /// Sets the mode of `subject` (`""` for the global one). `IMPORT` needs a registry (or a
    /// subject) that never had a schema, soft-deleted ones included, unless `force`: ids given
    /// by an import must not meet ids this registry gave.
    pub async fn set_mode(&self, subject: &str, mode: Mode, force: bool) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        // Registrations check the mode under this lock: none runs under the old mode after.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.registry.' || $1))")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT mode FROM registry.modes WHERE subject = $1")
                .bind(subject)
                .fetch_optional(&mut *tx)
                .await?;
        let already_importing = current.as_deref() == Some(Mode::Import.as_str());
        if mode == Mode::Import && !force && !already_importing {
            let used: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM registry.subject_versions WHERE $1 = '' OR subject = $1)",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?;
            if used {
                return Err(Error::NotPermitted(
                    "Cannot import since found existing subjects: use force=true to import into a registry that has schemas".into(),
                ));
            }
        }
        sqlx::query(
            "INSERT INTO registry.modes (subject, mode) VALUES ($1, $2)
             ON CONFLICT (subject) DO UPDATE SET mode = EXCLUDED.mode",
        )
        .bind(subject)
        .bind(mode.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the subject's own mode; returns what it was.
    pub async fn delete_subject_mode(&self, subject: &str) -> Result<Mode, Error> {
        let old: Option<String> = sqlx::query_scalar(
            "DELETE FROM registry.modes WHERE subject = $1 AND subject <> '' RETURNING mode",
        )
        .bind(subject)
        .fetch_optional(&self.pool)
        .await?;
        match old {
            Some(m) => m.parse().map_err(Error::Store),
            None => Err(Error::SubjectModeNotConfigured(subject.to_owned())),
        }
    }
}

/// Registers in `IMPORT` mode: `stored` under the caller's id (or the schema's existing id, or
/// a new one) as the caller's version (or the next), without a compatibility check.
async fn import(
    tx: &mut PgConnection,
    subject: &str,
    stored: &str,
    parsed: &Parsed,
    how: Registering,
) -> Result<i32, Error> {
    let normalized = parsed.normalized.as_str();
    // One import at a time across subjects: the checks of ids below and the sequence only ever
    // moving forward depend on it.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.registry.ids'))")
        .execute(&mut *tx)
        .await?;
    let holder: Option<i32> = sqlx::query_scalar(
        "SELECT id FROM registry.schemas WHERE fingerprint = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(normalized)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(wanted) = how.id else {
        return Err(Error::NotPermitted(format!(
            "Subject {subject} is in import mode: a registration must give the schema's id"
        )));
    };
    let id = match holder {
        Some(held) if held != wanted => {
            return Err(Error::IdDoesNotMatch { held, wanted });
        }
        Some(held) => held,
        None => {
            let taken: Option<String> =
                sqlx::query_scalar("SELECT normalized FROM registry.schemas WHERE id = $1")
                    .bind(wanted)
                    .fetch_optional(&mut *tx)
                    .await?;
            if taken.is_some() {
                return Err(Error::NotPermitted(format!(
                    "Overwrite new schema with id {wanted} is not permitted."
                )));
            }
            sqlx::query(
                "INSERT INTO registry.schemas (id, schema, normalized, fingerprint, identity_form, resolved)
                 VALUES ($1, $2, $3, sha256(convert_to($3, 'UTF8')), 2, $4)",
            )
            .bind(wanted)
            .bind(stored)
            .bind(normalized)
            .bind(&parsed.resolved)
            .execute(&mut *tx)
            .await?;
            super::references::record(&mut *tx, wanted, &parsed.references).await?;
            // Ids the registry gives later must not meet the imported ones.
            sqlx::query(
                "SELECT setval(pg_get_serial_sequence('registry.schemas', 'id'),
                               GREATEST($1::bigint, (SELECT last_value FROM registry.schemas_id_seq)))",
            )
            .bind(i64::from(wanted))
            .execute(&mut *tx)
            .await?;
            wanted
        }
    };
    let version: i32 = match how.version {
        Some(v) => v,
        None => {
            // A retried import finds what the first attempt registered.
            let held: Option<i32> = sqlx::query_scalar(
                "SELECT version FROM registry.subject_versions WHERE subject = $1 AND schema_id = $2 AND NOT deleted ORDER BY version DESC LIMIT 1",
            )
            .bind(subject)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if held.is_some() {
                return Ok(id);
            }
            sqlx::query_scalar(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM registry.subject_versions WHERE subject = $1",
            )
            .bind(subject)
            .fetch_one(&mut *tx)
            .await?
        }
    };
    let present: Option<i32> = sqlx::query_scalar(
        "SELECT schema_id FROM registry.subject_versions WHERE subject = $1 AND version = $2",
    )
    .bind(subject)
    .bind(version)
    .fetch_optional(&mut *tx)
    .await?;
    match present {
        Some(held) if held == id => Ok(id),
        Some(_) => Err(Error::NotPermitted(format!(
            "Overwrite version {version} of subject {subject} is not permitted."
        ))),
        None => {
            sqlx::query(
                "INSERT INTO registry.subject_versions (subject, version, schema_id) VALUES ($1, $2, $3)",
            )
            .bind(subject)
            .bind(version)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            Ok(id)
        }
    }
}

/// Rewrites the identity of schemas stored under the first rule (raw JSON with sorted keys)
/// under the current one; run at start-up, before serving. Where two stored schemas turn out to
/// be one, one of them keeps the fingerprint (new registrations get its id) and the other keeps
/// its id, still found by lookups of its subjects. Rows a registry of the first rule writes
/// later are rewritten at the next start: run one release of the registry at a time. Returns how
/// many rows it rewrote.
pub async fn rewrite_identities(pool: &PgPool) -> Result<u64, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('keel.registry.identity'))")
        .execute(&mut *tx)
        .await?;
    let rows =
        sqlx::query("SELECT id, schema FROM registry.schemas WHERE identity_form < 2 ORDER BY id")
            .fetch_all(&mut *tx)
            .await?;
    let mut rewritten = 0;
    for row in &rows {
        let id: i32 = row.get("id");
        let text: String = row.get("schema");
        let normalized = match parse(&text, None) {
            Ok(parsed) => parsed.normalized,
            Err(e) => {
                tracing::warn!(id, error = %e, "Stored schema no longer parses; its identity stays as it was");
                continue;
            }
        };
        let holder: Option<i32> = sqlx::query_scalar(
            "SELECT id FROM registry.schemas WHERE fingerprint = sha256(convert_to($1, 'UTF8')) AND id <> $2",
        )
        .bind(&normalized)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let fingerprint_of = if holder.is_some() {
            // Unique per row, and no schema's identity: lookups go by `normalized`.
            "sha256(convert_to('keel:same schema as another id:' || $2::text, 'UTF8'))"
        } else {
            "sha256(convert_to($1, 'UTF8'))"
        };
        sqlx::query(&format!(
            "UPDATE registry.schemas SET normalized = $1, fingerprint = {fingerprint_of}, identity_form = 2 WHERE id = $2"
        ))
        .bind(&normalized)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        rewritten += 1;
    }
    tx.commit().await?;
    if rewritten > 0 {
        tracing::info!(rewritten, "Rewrote schema identities as parsed schemas");
    }
    Ok(rewritten)
}

/// Refuses to delete what a live schema references: `version` of `subject`, or with `None` any
/// of its versions (Confluent's 42206; soft-deleted referrers do not count, as there). Run in
/// the delete's transaction after its rows are locked: a registration referencing them holds
/// them `FOR SHARE` until it commits, so the check sees it.
async fn refuse_if_referenced(
    conn: &mut PgConnection,
    subject: &str,
    version: Option<i32>,
) -> Result<(), Error> {
    let referrer: Option<(String, i32)> = sqlx::query_as(
        "SELECT v.subject, v.version FROM registry.schema_references r
           JOIN registry.subject_versions v ON v.schema_id = r.schema_id AND NOT v.deleted
          WHERE r.subject = $1 AND ($2::integer IS NULL OR r.version = $2) LIMIT 1",
    )
    .bind(subject)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    match referrer {
        Some((by, by_version)) => Err(Error::ReferenceExists(format!(
            "One or more references exist to the schema {{subject={subject}{}}}: version {by_version} of {by} references it",
            version
                .map(|v| format!(", version={v}"))
                .unwrap_or_default()
        ))),
        None => Ok(()),
    }
}

/// Locks version `version` of `subject`; whether it is soft-deleted (`None`: it is gone).
async fn lock_version(
    conn: &mut PgConnection,
    subject: &str,
    version: i32,
) -> Result<Option<bool>, Error> {
    Ok(sqlx::query_scalar(
        "SELECT deleted FROM registry.subject_versions WHERE subject = $1 AND version = $2 FOR UPDATE",
    )
    .bind(subject)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?)
}

/// The mode in force for `subject`: its own, else the global one.
async fn mode_for(conn: &mut PgConnection, subject: &str) -> Result<Mode, Error> {
    let mode: String = sqlx::query_scalar(
        "SELECT mode FROM registry.modes WHERE subject IN ($1, '') ORDER BY subject DESC LIMIT 1",
    )
    .bind(subject)
    .fetch_one(&mut *conn)
    .await?;
    mode.parse().map_err(Error::Store)
}

/// The level in force for `subject`: its own, else the global one.
async fn level_for(conn: &mut PgConnection, subject: &str) -> Result<Level, Error> {
    let level: String = sqlx::query_scalar(
        "SELECT compatibility FROM registry.config WHERE subject IN ($1, '') ORDER BY subject DESC LIMIT 1",
    )
    .bind(subject)
    .fetch_one(&mut *conn)
    .await?;
    level.parse().map_err(Error::Store)
}

/// The live versions of `subject`, oldest first, parsed.
async fn live_versions(
    conn: &mut PgConnection,
    subject: &str,
) -> Result<Vec<(i32, Schema)>, Error> {
    let rows = sqlx::query(
        "SELECT v.version, COALESCE(s.resolved, s.schema) AS schema FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
         WHERE v.subject = $1 AND NOT v.deleted ORDER BY v.version",
    )
    .bind(subject)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let text: String = r.get("schema");
            Schema::parse_str(&text)
                .map(|s| (r.get("version"), s))
                .map_err(|e| Error::Store(format!("stored schema no longer parses: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_ignores_whitespace_and_key_order_but_not_field_order() {
        let a = parse(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},{"name":"b","type":"int"}]}"#, None).unwrap();
        let b = parse("{ \"name\": \"R\",\n \"fields\": [{\"type\": \"int\", \"name\": \"a\"}, {\"name\":\"b\",\"type\":\"int\"}], \"type\": \"record\" }", None).unwrap();
        let c = parse(r#"{"type":"record","name":"R","fields":[{"name":"b","type":"int"},{"name":"a","type":"int"}]}"#, None).unwrap();
        assert_eq!(a.normalized, b.normalized);
        assert_ne!(a.normalized, c.normalized);
    }

    #[test]
    fn invalid_schemas_carry_the_parser_message() {
        let Err(Error::InvalidSchema(m)) = parse(r#"{"type":"record","name":"R"}"#, None) else {
            panic!()
        };
        assert!(m.starts_with("Invalid schema:"), "{m}");
        let Err(Error::InvalidSchema(m)) = parse("{not json", None) else {
            panic!()
        };
        assert!(m.contains("not JSON"), "{m}");
        let Err(Error::InvalidSchema(m)) = parse(r#""string""#, Some("PROTOBUF")) else {
            panic!()
        };
        assert!(m.contains("PROTOBUF"), "{m}");
    }
}
