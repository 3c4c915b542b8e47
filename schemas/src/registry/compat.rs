//! Compatibility levels as Confluent defines them, checked with Avro's schema-resolution rules.
//!
//! `BACKWARD`: the new schema can read data written with the previous one (the default: upgrade
//! consumers first). `FORWARD`: the previous schema can read data written with the new one
//! (upgrade producers first). `FULL`: both. The `_TRANSITIVE` variants check against every
//! earlier version instead of only the latest. `NONE` checks nothing.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

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

/// Whether `reader` can read everything `writer` wrote; what breaks when it cannot.
fn can_read(writer: &Schema, reader: &Schema, sides: Sides) -> Result<(), Incompatibility> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        // Resolution may fail for some data (an enum symbol or union branch the reader lacks):
        // Confluent's registry rejects that, and so do we.
        Ok(_) => Err(partial(writer, reader, sides)),
        Err(e) => Err(explain(&e, Some(reader), String::new(), sides)),
    }
}

fn at(path: &str) -> &str {
    if path.is_empty() { "/" } else { path }
}

/// The field named `name` of `reader` (a record): its index and schema.
fn field_of<'a>(reader: Option<&'a Schema>, name: &str) -> (String, Option<&'a Schema>) {
    match reader {
        Some(Schema::Record(record)) => record
            .fields
            .iter()
            .enumerate()
            .find(|(_, f)| f.name == name)
            .map_or((name.to_owned(), None), |(i, f)| {
                (i.to_string(), Some(&f.schema))
            }),
        _ => (name.to_owned(), None),
    }
}

/// apache-avro's verdict in Confluent's terms, with the path walked through the reader's
/// fields.
fn explain(
    e: &apache_avro::error::CompatibilityError,
    reader: Option<&Schema>,
    path: String,
    sides: Sides,
) -> Incompatibility {
    use apache_avro::error::CompatibilityError as E;
    let Sides {
        reader: r,
        writer: w,
    } = sides;
    match e {
        E::FieldTypeMismatch(field, inner) => {
            let (index, next) = field_of(reader, field);
            explain(inner, next, format!("{path}/fields/{index}/type"), sides)
        }
        E::MissingDefaultValue(field) => {
            let (index, _) = field_of(reader, field);
            Incompatibility {
                error_type: "READER_FIELD_MISSING_DEFAULT_VALUE",
                description: format!(
                    "The field '{field}' at path '{path}/fields/{index}' in the {r} schema has no default value and is missing in the {w} schema"
                ),
                additional_info: field.clone(),
            }
        }
        E::NameMismatch {
            writer_name,
            reader_name,
        } => Incompatibility {
            error_type: "NAME_MISMATCH",
            description: format!("The name of the schema has changed (path '{}')", at(&path)),
            additional_info: format!("expected: {writer_name}, found: {reader_name}"),
        },
        E::FixedMismatch => Incompatibility {
            error_type: "FIXED_SIZE_MISMATCH",
            description: format!(
                "The size of FIXED type field at path '{}' in the {r} schema does not match with the {w} schema",
                at(&path)
            ),
            additional_info: String::new(),
        },
        E::MissingSymbols => Incompatibility {
            error_type: "MISSING_ENUM_SYMBOLS",
            description: format!(
                "The {r} schema is missing enum symbols at path '{}' in the {w} schema",
                at(&path)
            ),
            additional_info: String::new(),
        },
        E::MissingUnionElements | E::SchemaMismatchAllUnionElements => Incompatibility {
            error_type: "MISSING_UNION_BRANCH",
            description: format!(
                "The {r} schema is missing a type inside a union field at path '{}' in the {w} schema",
                at(&path)
            ),
            additional_info: e.to_string(),
        },
        other => Incompatibility {
            error_type: "TYPE_MISMATCH",
            description: format!(
                "The type (path '{}') of a field in the {r} schema does not match with the {w} schema",
                at(&path)
            ),
            additional_info: other.to_string(),
        },
    }
}

/// What makes resolution fail for some data: the first enum whose writer symbols the reader
/// lacks (without a default to fall back on), else a union branch.
fn partial(writer: &Schema, reader: &Schema, sides: Sides) -> Incompatibility {
    fn missing_symbols(
        writer: &Schema,
        reader: &Schema,
        path: &str,
    ) -> Option<(String, Vec<String>)> {
        match (writer, reader) {
            (Schema::Enum(w), Schema::Enum(r)) if r.default.is_none() => {
                let missing: Vec<String> = w
                    .symbols
                    .iter()
                    .filter(|s| !r.symbols.contains(s))
                    .cloned()
                    .collect();
                (!missing.is_empty()).then(|| (path.to_owned(), missing))
            }
            (Schema::Record(w), Schema::Record(r)) => {
                r.fields.iter().enumerate().find_map(|(i, rf)| {
                    let wf = w.fields.iter().find(|wf| wf.name == rf.name)?;
                    missing_symbols(&wf.schema, &rf.schema, &format!("{path}/fields/{i}/type"))
                })
            }
            (Schema::Array(w), Schema::Array(r)) => {
                missing_symbols(&w.items, &r.items, &format!("{path}/items"))
            }
            (Schema::Map(w), Schema::Map(r)) => {
                missing_symbols(&w.types, &r.types, &format!("{path}/values"))
            }
            _ => None,
        }
    }
    let Sides {
        reader: r,
        writer: w,
    } = sides;
    match missing_symbols(writer, reader, "") {
        Some((path, symbols)) => Incompatibility {
            error_type: "MISSING_ENUM_SYMBOLS",
            description: format!(
                "The {r} schema is missing enum symbols '[{}]' at path '{}' in the {w} schema",
                symbols.join(", "),
                at(&path)
            ),
            additional_info: format!("[{}]", symbols.join(", ")),
        },
        None => Incompatibility {
            error_type: "MISSING_UNION_BRANCH",
            description: format!(
                "The {r} schema is missing a type inside a union field in the {w} schema"
            ),
            additional_info: String::new(),
        },
    }
}

/// An earlier version that a new schema breaks, and how.
#[derive(Debug, Clone)]
pub struct Violation {
    pub version: i32,
    level: Level,
    /// The earlier version's schema, in canonical form.
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
            broken.push(why);
        }
        if level.forward()
            && let Err(why) = can_read(new, old, OLD_READS)
        {
            broken.push(why);
        }
        if !broken.is_empty() {
            violations.push(Violation {
                version: *version,
                level,
                old_schema: old.canonical_form(),
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
