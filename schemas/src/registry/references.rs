//! Schema references: a schema that uses named types registered under other subjects, each
//! named by subject and version (Confluent's `references`). The registry keeps the schema as
//! given, and for compatibility checks a self-contained copy with every referenced type
//! defined where it is first used; a client resolves the references itself (Confluent's
//! serializers and schema_registry_converter do) from `GET /subjects/{s}/versions/{v}`.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, Row};

use super::api::Error;

/// One reference, as Confluent's API writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub name: String,
    pub subject: String,
    pub version: i32,
}

/// How many schemas one registration may reach through references, and how deep: a cycle or
/// a runaway chain is refused, not followed.
const MAX_REFERENCED: usize = 1000;
const MAX_DEPTH: usize = 32;

/// A referenced version as stored: its identity JSON and its own references.
struct Fetched {
    json: Value,
    references: Vec<Reference>,
}

/// The named types `references` define, by full name, each self-contained (its own references
/// inlined): every named type of every referenced version, nested ones included, so that a
/// schema may use any of them, as Confluent's registry (which parses them all into one
/// namespace) allows. A reference to a version that does not exist (or was soft-deleted) is an
/// invalid schema, as in Confluent's registry. The referenced versions stay locked (`FOR
/// SHARE`) until the caller's transaction ends, so a concurrent delete cannot slip between
/// this check and the registration.
pub async fn definitions(
    conn: &mut PgConnection,
    references: &[Reference],
) -> Result<HashMap<String, Value>, Error> {
    let mut fetched: HashMap<(String, i32), Fetched> = HashMap::new();
    let mut queue: Vec<Reference> = references.to_vec();
    while let Some(r) = queue.pop() {
        let key = (r.subject.clone(), r.version);
        if fetched.contains_key(&key) {
            continue;
        }
        if fetched.len() >= MAX_REFERENCED {
            return Err(Error::InvalidSchema(format!(
                "Invalid schema: more than {MAX_REFERENCED} schemas referenced"
            )));
        }
        let row = sqlx::query(
            "SELECT s.id, s.normalized, s.schema FROM registry.subject_versions v JOIN registry.schemas s ON s.id = v.schema_id
              WHERE v.subject = $1 AND v.version = $2 AND NOT v.deleted
                FOR SHARE OF v",
        )
        .bind(&r.subject)
        .bind(r.version)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| {
            Error::InvalidSchema(format!(
                "Invalid schema: reference {} to subject {} version {} not found",
                r.name, r.subject, r.version
            ))
        })?;
        let id: i32 = row.get("id");
        let text: String = row.get("schema");
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Store(format!("stored schema {id} is not JSON: {e}")))?;
        let own = of_schema(conn, id).await?;
        queue.extend(own.iter().cloned());
        fetched.insert(
            key,
            Fetched {
                json: super::store::identity_json(&json, ""),
                references: own,
            },
        );
    }
    let mut resolved = HashMap::new();
    let mut definitions = HashMap::new();
    for r in references {
        let value = resolve(&(r.subject.clone(), r.version), &fetched, &mut resolved, 0)?;
        index(&value, &mut definitions);
    }
    Ok(definitions)
}

/// Adds every named type `json` defines (at its top or nested) to `definitions`.
fn index(json: &Value, definitions: &mut HashMap<String, Value>) {
    match json {
        Value::Array(branches) => branches.iter().for_each(|b| index(b, definitions)),
        Value::Object(map) => {
            if let (Some("record" | "error" | "enum" | "fixed"), Some(name)) = (
                map.get("type").and_then(Value::as_str),
                map.get("name").and_then(Value::as_str),
            ) {
                definitions
                    .entry(name.to_owned())
                    .or_insert_with(|| json.clone());
            }
            if let Some(Value::Array(fields)) = map.get("fields") {
                for field in fields {
                    if let Some(t) = field.get("type") {
                        index(t, definitions);
                    }
                }
            }
            for key in ["items", "values", "type"] {
                if let Some(inner) = map.get(key).filter(|v| !v.is_string()) {
                    index(inner, definitions);
                }
            }
        }
        _ => {}
    }
}

/// The version `key` with its references inlined.
fn resolve(
    key: &(String, i32),
    fetched: &HashMap<(String, i32), Fetched>,
    resolved: &mut HashMap<(String, i32), Value>,
    depth: usize,
) -> Result<Value, Error> {
    if let Some(done) = resolved.get(key) {
        return Ok(done.clone());
    }
    if depth > MAX_DEPTH {
        return Err(Error::InvalidSchema(format!(
            "Invalid schema: references nest deeper than {MAX_DEPTH} (a cycle?)"
        )));
    }
    let Some(f) = fetched.get(key) else {
        return Err(Error::Store(format!(
            "reference to {} version {} was not fetched",
            key.0, key.1
        )));
    };
    let mut definitions = HashMap::new();
    for r in &f.references {
        let value = resolve(
            &(r.subject.clone(), r.version),
            fetched,
            resolved,
            depth + 1,
        )?;
        index(&value, &mut definitions);
    }
    let value = inline(&f.json, &definitions, &mut HashSet::new());
    resolved.insert(key.clone(), value.clone());
    Ok(value)
}

/// `json` (in identity form: every type reference a full name) with the first use of each
/// name in `definitions` replaced by its definition; `defined` collects the names defined so
/// far, so that later uses, and later definitions of the same name (a type two references
/// share), stay references: each name is defined once.
pub fn inline(
    json: &Value,
    definitions: &HashMap<String, Value>,
    defined: &mut HashSet<String>,
) -> Value {
    match json {
        Value::String(name) => match definitions.get(name) {
            Some(definition) if !defined.contains(name) => {
                // Walk the definition too, marking the names it defines.
                inline(definition, definitions, defined)
            }
            _ => json.clone(),
        },
        Value::Array(branches) => Value::Array(
            branches
                .iter()
                .map(|b| inline(b, definitions, defined))
                .collect(),
        ),
        Value::Object(map) => {
            let mut out = map.clone();
            match map.get("type").and_then(Value::as_str) {
                Some("record" | "error" | "enum" | "fixed") => {
                    if let Some(name) = map.get("name").and_then(Value::as_str)
                        && !defined.insert(name.to_owned())
                    {
                        return Value::String(name.to_owned());
                    }
                    if let Some(Value::Array(fields)) = map.get("fields") {
                        let fields = fields
                            .iter()
                            .map(|field| {
                                let mut field = field.clone();
                                if let Some(t) = field.get("type").cloned() {
                                    field["type"] = inline(&t, definitions, defined);
                                }
                                field
                            })
                            .collect();
                        out.insert("fields".into(), Value::Array(fields));
                    }
                }
                Some("array") => {
                    if let Some(items) = map.get("items") {
                        out.insert("items".into(), inline(items, definitions, defined));
                    }
                }
                Some("map") => {
                    if let Some(values) = map.get("values") {
                        out.insert("values".into(), inline(values, definitions, defined));
                    }
                }
                _ => {
                    if let Some(t) = map.get("type") {
                        out.insert("type".into(), inline(t, definitions, defined));
                    }
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// The references schema `id` was registered with, in order.
pub async fn of_schema(conn: &mut PgConnection, id: i32) -> Result<Vec<Reference>, Error> {
    let rows = sqlx::query(
        "SELECT name, subject, version FROM registry.schema_references WHERE schema_id = $1 ORDER BY position",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|r| Reference {
            name: r.get("name"),
            subject: r.get("subject"),
            version: r.get("version"),
        })
        .collect())
}

/// Records the references of a newly stored schema.
pub async fn record(
    conn: &mut PgConnection,
    id: i32,
    references: &[Reference],
) -> Result<(), Error> {
    for (position, r) in references.iter().enumerate() {
        sqlx::query(
            "INSERT INTO registry.schema_references (schema_id, position, name, subject, version)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(i32::try_from(position).unwrap_or(i32::MAX))
        .bind(&r.name)
        .bind(&r.subject)
        .bind(r.version)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
