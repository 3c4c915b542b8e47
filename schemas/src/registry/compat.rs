//! Compatibility levels as Confluent defines them, checked with Avro's schema-resolution rules.
//!
//! `BACKWARD`: the new schema can read data written with the previous one (the default: upgrade
//! consumers first). `FORWARD`: the previous schema can read data written with the new one
//! (upgrade producers first). `FULL`: both. The `_TRANSITIVE` variants check against every
//! earlier version instead of only the latest. `NONE` checks nothing.

use std::fmt;
use std::str::FromStr;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use apache_avro::Schema;
use apache_avro::schema::{Alias, Name, NamesRef, ResolvedSchema};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    fn backward(self) -> bool {
        matches!(
            self,
            Level::Backward | Level::BackwardTransitive | Level::Full | Level::FullTransitive
        )
    }

    fn forward(self) -> bool {
        matches!(
            self,
            Level::Forward | Level::ForwardTransitive | Level::Full | Level::FullTransitive
        )
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "NONE" => Level::None,
            "BACKWARD" => Level::Backward,
            "BACKWARD_TRANSITIVE" => Level::BackwardTransitive,
            "FORWARD" => Level::Forward,
            "FORWARD_TRANSITIVE" => Level::ForwardTransitive,
            "FULL" => Level::Full,
            "FULL_TRANSITIVE" => Level::FullTransitive,
            _ => {
                return Err(format!(
                    "Invalid compatibility level {s:?}: use one of NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE"
                ));
            }
        })
    }
}

/// One incompatibility, as Confluent names it: its rule (`READER_FIELD_MISSING_DEFAULT_VALUE`,
/// `TYPE_MISMATCH`, `NAME_MISMATCH`, `FIXED_SIZE_MISMATCH`, `MISSING_ENUM_SYMBOLS`,
/// `MISSING_UNION_BRANCH`), a description naming the path in the reader's schema, and the
/// detail (the field, the names, the symbols).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Incompatibility {
    error_type: &'static str,
    description: String,
    additional_info: String,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{{errorType:'{}', description:'{}', additionalInfo:'{}'}}",
            self.error_type, self.description, self.additional_info
        )
    }
}

/// Which side of a check reads: `new` for BACKWARD (the new schema reads old data), `old` for
/// FORWARD. Confluent's descriptions say "in the new schema … in the old schema".
#[derive(Clone, Copy)]
struct Sides {
    reader: &'static str,
    writer: &'static str,
}

const NEW_READS: Sides = Sides {
    reader: "new",
    writer: "old",
};
const OLD_READS: Sides = Sides {
    reader: "old",
    writer: "new",
};

/// Whether `reader` can read everything `writer` wrote; every rule broken when it cannot.
///
/// This is keel's own reading of the specification's schema-resolution rules, as Avro's Java
/// `SchemaCompatibility` (which Confluent's registry runs) applies them, rather than
/// apache-avro's checker, which disagrees with the specification in places: it ignores record
/// aliases and refuses an enum whose default reads the symbols it lacks. Logical types are
/// checked as their underlying types, as Java's checker does.
fn can_read(writer: &Schema, reader: &Schema, sides: Sides) -> Result<(), Vec<Incompatibility>> {
    let writer_names = names_of(writer);
    let reader_names = names_of(reader);
    let mut checker = Checker {
        writer_names: &writer_names,
        reader_names: &reader_names,
        sides,
        in_progress: HashSet::new(),
        checked: HashMap::new(),
        found: Vec::new(),
    };
    checker.check(writer, reader, "");
    if checker.found.is_empty() {
        Ok(())
    } else {
        Err(checker.found)
    }
}

/// The named types a schema defines, to follow its references by name.
fn names_of(schema: &Schema) -> NamesRef<'_> {
    ResolvedSchema::try_from(schema)
        .map(|resolved| resolved.get_names().clone())
        .unwrap_or_default()
}

fn at(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

/// The schema a logical type annotates: compatibility reads through logical types.
fn underlying(schema: &Schema) -> Cow<'_, Schema> {
    use apache_avro::schema::{InnerDecimalSchema, UuidSchema};
    Cow::Owned(match schema {
        Schema::Date | Schema::TimeMillis => Schema::Int,
        Schema::TimeMicros
        | Schema::TimestampMillis
        | Schema::TimestampMicros
        | Schema::TimestampNanos
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => Schema::Long,
        Schema::Uuid(UuidSchema::String) => Schema::String,
        Schema::Uuid(UuidSchema::Bytes) | Schema::BigDecimal => Schema::Bytes,
        Schema::Uuid(UuidSchema::Fixed(fixed)) | Schema::Duration(fixed) => {
            Schema::Fixed(fixed.clone())
        }
        Schema::Decimal(decimal) => match &decimal.inner {
            InnerDecimalSchema::Bytes => Schema::Bytes,
            InnerDecimalSchema::Fixed(fixed) => Schema::Fixed(fixed.clone()),
        },
        _ => return Cow::Borrowed(schema),
    })
}

/// The type's name in Confluent's messages (`STRING`, `RECORD`, …).
fn type_name(schema: &Schema) -> String {
    let kind: apache_avro::schema::SchemaKind = schema.into();
    format!("{kind:?}").to_ascii_uppercase()
}

struct Checker<'a> {
    writer_names: &'a NamesRef<'a>,
    reader_names: &'a NamesRef<'a>,
    sides: Sides,
    /// Named writer/reader pairs being checked further up: a recursive type meets itself
    /// and is assumed compatible there, as Java's checker does.
    in_progress: HashSet<(String, String)>,
    /// Named pairs already checked at some path, with what they broke: a type used in many
    /// places is checked once (without this, nesting makes the check exponential).
    checked: HashMap<(String, String), Vec<Incompatibility>>,
    found: Vec<Incompatibility>,
}

impl Checker<'_> {
    fn broken(&mut self, error_type: &'static str, description: String, additional_info: String) {
        self.found.push(Incompatibility {
            error_type,
            description,
            additional_info,
        });
    }

    /// Whether `reader` reads `writer`, recording nothing.
    fn reads(&mut self, writer: &Schema, reader: &Schema, path: &str) -> bool {
        let mark = self.found.len();
        self.check(writer, reader, path);
        let reads = self.found.len() == mark;
        self.found.truncate(mark);
        reads
    }

    /// The unqualified names are equal, or one of the reader's aliases is the writer's full
    /// name (the specification's rule, and Java's).
    fn names_match(
        &mut self,
        writer: &Name,
        reader: &Name,
        aliases: Option<&Vec<Alias>>,
        path: &str,
    ) {
        let writer_full = writer.fullname(None);
        let matches = writer.name() == reader.name()
            || aliases
                .into_iter()
                .flatten()
                .any(|alias| alias.fullname(reader.namespace()) == writer_full);
        if !matches {
            self.broken(
                "NAME_MISMATCH",
                format!("The name of the schema has changed (path '{}/name')", path),
                format!("expected: {writer_full}"),
            );
        }
    }

    fn check(&mut self, writer: &Schema, reader: &Schema, path: &str) {
        let writer = match writer {
            Schema::Ref { name } => self.writer_names.get(name).copied().unwrap_or(writer),
            _ => writer,
        };
        let reader = match reader {
            Schema::Ref { name } => self.reader_names.get(name).copied().unwrap_or(reader),
            _ => reader,
        };
        let (writer, reader) = (underlying(writer), underlying(reader));
        let Sides {
            reader: r,
            writer: w,
        } = self.sides;
        match (writer.as_ref(), reader.as_ref()) {
            (Schema::Union(writer), _) => {
                for (i, branch) in writer.variants().iter().enumerate() {
                    self.check(branch, reader.as_ref(), &format!("{path}/{i}"));
                }
            }
            (_, Schema::Union(branches)) => {
                let read = branches
                    .variants()
                    .iter()
                    .any(|branch| self.reads(writer.as_ref(), branch, path));
                if !read {
                    self.broken(
                        "MISSING_UNION_BRANCH",
                        format!(
                            "The {r} schema is missing a type inside a union field at path '{}' in the {w} schema",
                            at(path)
                        ),
                        format!("reader union lacking writer type: {}", type_name(&writer)),
                    );
                }
            }
            (Schema::Null, Schema::Null)
            | (Schema::Boolean, Schema::Boolean)
            | (Schema::Int, Schema::Int | Schema::Long | Schema::Float | Schema::Double)
            | (Schema::Long, Schema::Long | Schema::Float | Schema::Double)
            | (Schema::Float, Schema::Float | Schema::Double)
            | (Schema::Double, Schema::Double)
            | (Schema::Bytes | Schema::String, Schema::Bytes | Schema::String) => {}
            (Schema::Record(writer), Schema::Record(reader)) => {
                let pair = (writer.name.fullname(None), reader.name.fullname(None));
                if let Some(broken) = self.checked.get(&pair) {
                    self.found.extend(broken.iter().cloned());
                    return;
                }
                if !self.in_progress.insert(pair.clone()) {
                    return;
                }
                let mark = self.found.len();
                // Java's checker goes on after a name mismatch; so do we.
                self.names_match(&writer.name, &reader.name, reader.aliases.as_ref(), path);
                for (i, field) in reader.fields.iter().enumerate() {
                    let written = writer.fields.iter().find(|wf| wf.name == field.name).or_else(|| {
                        writer
                            .fields
                            .iter()
                            .find(|wf| field.aliases.contains(&wf.name))
                    });
                    match written {
                        Some(wf) => {
                            self.check(&wf.schema, &field.schema, &format!("{path}/fields/{i}/type"))
                        }
                        None if field.default.is_none() => self.broken(
                            "READER_FIELD_MISSING_DEFAULT_VALUE",
                            format!(
                                "The field '{}' at path '{path}/fields/{i}' in the {r} schema has no default value and is missing in the {w} schema",
                                field.name
                            ),
                            field.name.clone(),
                        ),
                        None => {}
                    }
                }
                self.in_progress.remove(&pair);
                let broken = self.found[mark..].to_vec();
                self.checked.insert(pair, broken);
            }
            (Schema::Enum(writer), Schema::Enum(reader)) => {
                self.names_match(&writer.name, &reader.name, reader.aliases.as_ref(), path);
                let mut missing: Vec<&str> = writer
                    .symbols
                    .iter()
                    .filter(|s| !reader.symbols.contains(s))
                    .map(String::as_str)
                    .collect();
                missing.sort_unstable();
                // A reader's default stands in for every symbol it does not know.
                if !missing.is_empty() && reader.default.is_none() {
                    self.broken(
                        "MISSING_ENUM_SYMBOLS",
                        format!(
                            "The {r} schema is missing enum symbols '[{}]' at path '{path}/symbols' in the {w} schema",
                            missing.join(", ")
                        ),
                        format!("[{}]", missing.join(", ")),
                    );
                }
            }
            (Schema::Fixed(writer), Schema::Fixed(reader)) => {
                self.names_match(&writer.name, &reader.name, reader.aliases.as_ref(), path);
                if writer.size != reader.size {
                    self.broken(
                        "FIXED_SIZE_MISMATCH",
                        format!(
                            "The size of FIXED type field at path '{path}/size' in the {r} schema does not match with the {w} schema"
                        ),
                        format!("expected: {}, found: {}", writer.size, reader.size),
                    );
                }
            }
            (Schema::Array(writer), Schema::Array(reader)) => {
                self.check(&writer.items, &reader.items, &format!("{path}/items"));
            }
            (Schema::Map(writer), Schema::Map(reader)) => {
                self.check(&writer.types, &reader.types, &format!("{path}/values"));
            }
            (writer, reader) => self.broken(
                "TYPE_MISMATCH",
                format!(
                    "The type (path '{}') of a field in the {r} schema does not match with the {w} schema",
                    at(path)
                ),
                format!(
                    "reader type: {} not compatible with writer type: {}",
                    type_name(reader),
                    type_name(writer)
                ),
            ),
        }
    }
}

/// An earlier version that a new schema breaks, and how.
#[derive(Debug, Clone)]
pub struct Violation {
    pub version: i32,
    level: Level,
    /// The earlier version's schema, parsed and written back.
    old_schema: String,
    broken: Vec<Incompatibility>,
}

impl Violation {
    /// Confluent's messages for it: its incompatibilities, then `{oldSchemaVersion: n}`,
    /// `{oldSchema: '…'}` and the level.
    fn confluent(&self) -> impl Iterator<Item = String> + '_ {
        self.broken.iter().map(ToString::to_string).chain([
            format!("{{oldSchemaVersion: {}}}", self.version),
            format!("{{oldSchema: '{}'}}", self.old_schema),
            format!(
                "{{validateFields: 'false', compatibility: '{}'}}",
                self.level
            ),
        ])
    }
}

/// For people (`make schema-check`): the level, the version and each rule broken.
impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: version {}: ", self.level, self.version)?;
        for (i, b) in self.broken.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", b.error_type, b.description)?;
        }
        Ok(())
    }
}

/// The messages Confluent's registry gives for `violations`, in order (a refused registration's
/// details, a verbose compatibility check's `messages`).
pub fn messages(violations: &[Violation]) -> Vec<String> {
    violations.iter().flat_map(Violation::confluent).collect()
}

/// Checks `new` against the existing versions of a subject (oldest first) under `level`: the
/// latest only, or every one for the `_TRANSITIVE` levels, as registering does. Empty when
/// compatible.
pub fn check(level: Level, new: &Schema, existing: &[(i32, Schema)]) -> Vec<Violation> {
    let against: &[(i32, Schema)] = if level.transitive() {
        existing
    } else {
        existing.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut violations = Vec::new();
    for (version, old) in against {
        let mut broken = Vec::new();
        if level.backward()
            && let Err(why) = can_read(old, new, NEW_READS)
        {
            broken.extend(why);
        }
        if level.forward()
            && let Err(why) = can_read(new, old, OLD_READS)
        {
            broken.extend(why);
        }
        if !broken.is_empty() {
            violations.push(Violation {
                version: *version,
                level,
                old_schema: super::store::written_back(old)
                    .unwrap_or_else(|_| old.canonical_form()),
                broken,
            });
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"R","namespace":"t","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn adding_a_field_with_a_default_is_backward_compatible_and_without_one_is_not() {
        let v1 = record(r#"{"name":"a","type":"string"}"#);
        let with_default =
            record(r#"{"name":"a","type":"string"},{"name":"b","type":"string","default":"x"}"#);
        let without = record(r#"{"name":"a","type":"string"},{"name":"b","type":"string"}"#);
        assert!(check(Level::Backward, &with_default, &[(1, v1.clone())]).is_empty());
        let errors = messages(&check(Level::Backward, &without, &[(1, v1.clone())]));
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(
            errors[0].starts_with("{errorType:'READER_FIELD_MISSING_DEFAULT_VALUE'")
                && errors[0].contains("The field 'b' at path '/fields/1' in the new schema"),
            "{errors:?}"
        );
        assert_eq!(errors[1], "{oldSchemaVersion: 1}");
        assert!(
            errors[3].contains("compatibility: 'BACKWARD'"),
            "{errors:?}"
        );
        // Removing a field is backward compatible, but not forward when the old reader needs it.
        assert!(check(Level::Backward, &v1, &[(1, without.clone())]).is_empty());
        assert!(!check(Level::Forward, &v1, &[(1, without)]).is_empty());
        assert!(
            check(
                Level::None,
                &record(r#"{"name":"z","type":"int"}"#),
                &[(1, v1)]
            )
            .is_empty()
        );
    }

    #[test]
    fn transitive_levels_check_every_version_and_plain_ones_only_the_latest() {
        let v1 = record(r#"{"name":"a","type":"int"}"#);
        let v2 = record(r#"{"name":"b","type":"int","default":0}"#);
        let v3 = record(
            r#"{"name":"a","type":"string","default":""},{"name":"b","type":"int","default":0}"#,
        );
        let existing = [(1, v1), (2, v2)];
        assert!(check(Level::Backward, &v3, &existing).is_empty());
        let errors = messages(&check(Level::BackwardTransitive, &v3, &existing));
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("TYPE_MISMATCH"), "{errors:?}");
        assert_eq!(errors[1], "{oldSchemaVersion: 1}");
    }

    fn broken(writer: &str, reader: &str) -> Vec<String> {
        let (writer, reader) = (
            Schema::parse_str(writer).unwrap(),
            Schema::parse_str(reader).unwrap(),
        );
        can_read(&writer, &reader, NEW_READS)
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn unions_arrays_and_maps_are_walked_and_their_paths_named() {
        // A writer union's branches are read one by one; the one the reader cannot read is named.
        let errors = broken(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":["null","string","long"]}]}"#,
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":["null","string"]}]}"#,
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("MISSING_UNION_BRANCH") && errors[0].contains("'/fields/0/type/2'"),
            "{errors:?}"
        );
        // Promotion reads int as long through a union; a field inside an array of records is
        // found by its path.
        assert!(broken(r#"["null","int"]"#, r#"["null","long"]"#).is_empty());
        let errors = broken(
            r#"{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"x","type":"int"}]}}"#,
            r#"{"type":"array","items":{"type":"record","name":"I","fields":[{"name":"x","type":"int"},{"name":"y","type":"int"}]}}"#,
        );
        assert!(
            errors.len() == 1
                && errors[0].contains("READER_FIELD_MISSING_DEFAULT_VALUE")
                && errors[0].contains("'/items/fields/1'"),
            "{errors:?}"
        );
        let errors = broken(
            r#"{"type":"fixed","name":"F","size":16}"#,
            r#"{"type":"fixed","name":"F","size":8}"#,
        );
        assert!(
            errors.len() == 1
                && errors[0].contains("FIXED_SIZE_MISMATCH")
                && errors[0].contains("'/size'"),
            "{errors:?}"
        );
        let errors = broken(
            r#"{"type":"map","values":"string"}"#,
            r#"{"type":"map","values":"int"}"#,
        );
        assert!(
            errors.len() == 1
                && errors[0].contains("TYPE_MISMATCH")
                && errors[0].contains("'/values'"),
            "{errors:?}"
        );
    }

    #[test]
    fn recursive_types_and_logical_types_resolve() {
        let list = |extra: &str| {
            format!(
                r#"{{"type":"record","name":"Node","fields":[{{"name":"v","type":"long"}},{{"name":"next","type":["null","Node"],"default":null}}{extra}]}}"#
            )
        };
        assert!(
            broken(
                &list(""),
                &list(r#",{"name":"w","type":"int","default":0}"#)
            )
            .is_empty()
        );
        let errors = broken(&list(""), &list(r#",{"name":"w","type":"int"}"#));
        assert!(
            !errors.is_empty() && errors[0].contains("READER_FIELD_MISSING_DEFAULT_VALUE"),
            "{errors:?}"
        );
        // A logical type reads as its underlying type.
        assert!(broken(r#"{"type":"int","logicalType":"date"}"#, r#""int""#).is_empty());
        assert!(
            broken(
                r#"{"type":"long","logicalType":"timestamp-millis"}"#,
                r#"{"type":"long","logicalType":"timestamp-micros"}"#
            )
            .is_empty()
        );
    }

    #[test]
    fn record_and_field_aliases_match_the_writers_names() {
        let writer = r#"{"type":"record","name":"Old","namespace":"n","fields":[{"name":"a","type":"int"}]}"#;
        let reader = r#"{"type":"record","name":"New","namespace":"n","aliases":["Old"],"fields":[{"name":"b","type":"int","aliases":["a"]}]}"#;
        assert!(broken(writer, reader).is_empty());
        // The unqualified name is what must match: a namespace change alone is not a rename.
        let moved = r#"{"type":"record","name":"Old","namespace":"elsewhere","fields":[{"name":"a","type":"int"}]}"#;
        assert!(broken(writer, moved).is_empty());
        let errors = broken(
            writer,
            r#"{"type":"record","name":"New","namespace":"n","fields":[{"name":"a","type":"int"}]}"#,
        );
        assert!(
            errors.len() == 1
                && errors[0].contains("NAME_MISMATCH")
                && errors[0].contains("expected: n.Old"),
            "{errors:?}"
        );
    }

    #[test]
    fn levels_parse_case_insensitively_and_reject_the_unknown() {
        assert_eq!(
            "full_transitive".parse::<Level>(),
            Ok(Level::FullTransitive)
        );
        assert!(
            "SIDEWAYS"
                .parse::<Level>()
                .unwrap_err()
                .contains("SIDEWAYS")
        );
    }
}
