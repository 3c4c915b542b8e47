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

/// Whether `reader` can read everything `writer` wrote; the reason when it cannot.
fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => Ok(()),
        // Resolution may fail for some data (an enum symbol or union branch the reader lacks):
        // Confluent's registry rejects that, and so do we.
        Ok(_) => Err("the reader cannot read every value the writer can write (a writer enum symbol or union branch is missing in the reader)".into()),
        Err(e) => Err(describe(&e)),
    }
}

fn describe(e: &apache_avro::error::CompatibilityError) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Checks `new` against the existing versions of a subject (oldest first) under `level`.
/// Returns one message per violation, naming the version and the rule broken.
pub fn check(level: Level, new: &Schema, existing: &[(i32, Schema)]) -> Vec<String> {
    let against: &[(i32, Schema)] = if level.transitive() {
        existing
    } else {
        existing.last().map(std::slice::from_ref).unwrap_or(&[])
    };
    let mut messages = Vec::new();
    for (version, old) in against {
        if level.backward()
            && let Err(why) = can_read(old, new)
        {
            messages.push(format!(
                "{level}: the new schema cannot read data written with version {version}: {why}"
            ));
        }
        if level.forward()
            && let Err(why) = can_read(new, old)
        {
            messages.push(format!(
                "{level}: version {version} cannot read data written with the new schema: {why}"
            ));
        }
    }
    messages
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
        let errors = check(Level::Backward, &without, &[(1, v1.clone())]);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].contains("'b'") && errors[0].contains("default"),
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
        let errors = check(Level::BackwardTransitive, &v3, &existing);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("version 1"), "{errors:?}");
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
