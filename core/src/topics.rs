//! keel's topic layout, declared in one file (`topics.toml`, `KEEL_TOPICS_FILE`) so that every
//! environment gets the same partitions, retention and clean-up policy.
//!
//! ```toml
//! [orders]                # a role: its name comes from KEEL_TOPIC_ORDERS
//! partitions = 6
//! replication_factor = 3  # left out: the broker's default
//! min_insync_replicas = 2 # left out: the broker's default
//! retention = "7d"        # 30s, 15m, 12h, 7d, or "forever"
//! cleanup = "delete"      # delete or compact
//! config = { "compression.type" = "zstd" }  # any other topic configuration
//! ```
//!
//! A table's name is a role (`orders`, `inventory`: the topic's name is that setting's value,
//! so a renamed topic keeps its layout) or, for any other table, the topic's name itself.
//! Partitions only ever grow in Kafka and keys are spread by partition count, so `keel topics
//! create` never changes an existing topic; `keel topics describe` shows where one differs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::kafka::TopicSpec;
use crate::settings::Topics;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Declared {
    partitions: i32,
    /// Copies of each partition; absent: the broker's default (`default.replication.factor`).
    #[serde(default)]
    replication_factor: Option<i32>,
    /// `min.insync.replicas`: with `acks=all`, how many copies a write needs.
    #[serde(default)]
    min_insync_replicas: Option<i32>,
    /// Any other topic configuration, as Kafka names it (`segment.bytes = "104857600"`).
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    retention: Option<String>,
    #[serde(default)]
    cleanup: Option<String>,
    /// Overrides the role's setting or the table's name.
    #[serde(default)]
    name: Option<String>,
}

/// Reads the declared topics from `path`, naming roles with `topics`' settings. Every mistake
/// names the file and the entry.
pub fn load(path: &Path, topics: &Topics) -> anyhow::Result<Vec<TopicSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "KEEL_TOPICS_FILE: cannot read {}: {e} (run from the repository root, or set KEEL_TOPICS_FILE)",
            path.display()
        )
    })?;
    parse(&text, topics).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses a topics file's text.
pub fn parse(text: &str, topics: &Topics) -> anyhow::Result<Vec<TopicSpec>> {
    let declared: BTreeMap<String, Declared> = toml::from_str(text)?;
    let mut specs = Vec::new();
    for (role, d) in declared {
        anyhow::ensure!(
            d.partitions >= 1,
            "[{role}] partitions must be at least 1, not {}",
            d.partitions
        );
        let replication = d.replication_factor.unwrap_or(-1);
        anyhow::ensure!(
            replication >= 1 || replication == -1,
            "[{role}] replication_factor must be at least 1 (or left out: the broker's default), not {replication}"
        );
        let name = d.name.clone().unwrap_or_else(|| match role.as_str() {
            "orders" => topics.orders.clone(),
            "inventory" => topics.inventory.clone(),
            other => other.to_owned(),
        });
        let mut spec = TopicSpec::new(name, d.partitions);
        spec.replication = replication;
        if let Some(r) = &d.retention {
            let ms = retention_ms(r).map_err(|e| anyhow::anyhow!("[{role}] retention: {e}"))?;
            spec.config.push(("retention.ms".into(), ms.to_string()));
        }
        if let Some(c) = &d.cleanup {
            anyhow::ensure!(
                matches!(c.as_str(), "delete" | "compact"),
                "[{role}] cleanup must be \"delete\" or \"compact\", not {c:?}"
            );
            spec.config.push(("cleanup.policy".into(), c.clone()));
        }
        if let Some(n) = d.min_insync_replicas {
            anyhow::ensure!(
                n >= 1 && (replication == -1 || n <= replication),
                "[{role}] min_insync_replicas must be between 1 and replication_factor, not {n}"
            );
            spec.config
                .push(("min.insync.replicas".into(), n.to_string()));
        }
        for (key, value) in d.config {
            anyhow::ensure!(
                !spec.config.iter().any(|(k, _)| *k == key),
                "[{role}] config.{key:?} is set by a field of its own (retention, cleanup, min_insync_replicas)"
            );
            spec.config.push((key, value));
        }
        specs.push(spec);
    }
    anyhow::ensure!(!specs.is_empty(), "declares no topics");
    Ok(specs)
}

/// `"7d"` → milliseconds; `"forever"` → -1 (Kafka's "keep everything").
fn retention_ms(text: &str) -> Result<i64, String> {
    if text == "forever" {
        return Ok(-1);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let per = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: unit must be ms, s, m, h or d")),
    };
    n.checked_mul(per)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics {
            orders: "orders-eu".into(),
            inventory: "inventory".into(),
        }
    }

    #[test]
    fn roles_take_their_names_from_the_settings_and_others_are_literal() {
        let specs = parse(
            r#"
            [orders]
            partitions = 6
            retention = "7d"
            cleanup = "delete"

            [payments]
            partitions = 3
            replication_factor = 3
            retention = "forever"
            cleanup = "compact"
            "#,
            &topics(),
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].name, "orders-eu");
        assert_eq!(specs[0].partitions, 6);
        assert_eq!(
            specs[0].config,
            [
                ("retention.ms".to_owned(), "604800000".to_owned()),
                ("cleanup.policy".to_owned(), "delete".to_owned())
            ]
        );
        assert_eq!(specs[1].name, "payments");
        assert_eq!(specs[1].replication, 3);
        assert_eq!(specs[1].config[0].1, "-1");
        assert_eq!(specs[0].replication, -1, "left out: the broker's default");
    }

    #[test]
    fn min_insync_replicas_and_any_topic_config_are_declared() {
        let specs = parse(
            r#"
            [orders]
            partitions = 6
            replication_factor = 3
            min_insync_replicas = 2
            config = { "segment.bytes" = "104857600", "compression.type" = "zstd" }
            "#,
            &topics(),
        )
        .unwrap();
        assert_eq!(
            specs[0].config,
            [
                ("min.insync.replicas".to_owned(), "2".to_owned()),
                ("compression.type".to_owned(), "zstd".to_owned()),
                ("segment.bytes".to_owned(), "104857600".to_owned()),
            ]
        );
    }

    #[test]
    fn mistakes_name_the_entry_and_the_field() {
        let cases = [
            (
                "[orders]\npartitions = 0",
                "[orders] partitions must be at least 1",
            ),
            (
                "[orders]\npartitions = 1\nretention = \"7w\"",
                "[orders] retention: \"7w\": unit",
            ),
            (
                "[orders]\npartitions = 1\nretention = \"d\"",
                "does not start with a number",
            ),
            (
                "[orders]\npartitions = 1\ncleanup = \"keep\"",
                "[orders] cleanup must be",
            ),
            (
                "[orders]\npartitions = 1\npartition = 2",
                "unknown field `partition`",
            ),
            ("[orders]\nretention = \"1d\"", "missing field `partitions`"),
            (
                "[orders]\npartitions = 1\nreplication_factor = 0",
                "[orders] replication_factor must be at least 1",
            ),
            (
                "[orders]\npartitions = 1\nreplication_factor = 3\nmin_insync_replicas = 4",
                "[orders] min_insync_replicas must be between 1 and replication_factor",
            ),
            (
                "[orders]\npartitions = 1\nretention = \"1d\"\nconfig = { \"retention.ms\" = \"5\" }",
                "[orders] config.\"retention.ms\" is set by a field of its own",
            ),
            ("", "declares no topics"),
        ];
        for (text, expected) in cases {
            let e = parse(text, &topics()).unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_repository_file_declares_the_services_topics() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.toml");
        let specs = load(&path, &crate::Settings::local().topics).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["inventory", "orders"]);
        assert!(specs.iter().all(|s| s.partitions == 6));
    }
}
