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
//! ```toml
//! [dead_letters]          # the template of every group's `<topic>.<group>.dlq`
//! partitions = 1          # left out: 1
//! retention = "forever"   # left out: forever
//! ```
//!
//! Dead-letter topics are declared by the template, one per topic a group reads: what it
//! leaves out of replication, `min_insync_replicas` and `config` comes from that topic.
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

/// A topic's table.
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

/// The `[dead_letters]` table: how every dead-letter topic is made. What it leaves out comes
/// from the topic whose records it holds (replication, `min.insync.replicas`, `config`), except
/// partitions (one: dead letters are read in order, by hand), retention (forever: a dead letter
/// waits for an operator; the broker's default would drop it in a week) and clean-up (delete:
/// compaction would keep only the last dead letter of each order).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Template {
    #[serde(default)]
    partitions: Option<i32>,
    #[serde(default)]
    replication_factor: Option<i32>,
    #[serde(default)]
    min_insync_replicas: Option<i32>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    #[serde(default)]
    retention: Option<String>,
    #[serde(default)]
    cleanup: Option<String>,
}

/// What a topic's spec is made of, declared or inherited.
#[derive(Debug, Clone)]
struct Layout {
    replication_factor: Option<i32>,
    min_insync_replicas: Option<i32>,
    config: BTreeMap<String, String>,
    retention: Option<String>,
    cleanup: Option<String>,
}

impl Declared {
    fn layout(&self) -> Layout {
        Layout {
            replication_factor: self.replication_factor,
            min_insync_replicas: self.min_insync_replicas,
            config: self.config.clone(),
            retention: self.retention.clone(),
            cleanup: self.cleanup.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(default)]
    dead_letters: Option<Template>,
    #[serde(flatten)]
    topics: BTreeMap<String, Declared>,
}

/// The table that holds the dead-letter template, not a topic.
pub const DEAD_LETTERS: &str = "dead_letters";

/// A dead-letter topic to declare: its name and the topic whose records it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub name: String,
    pub source: String,
}

/// What keel says of declared topics the cluster does not have, wherever it finds them missing.
pub fn missing(topics: &[String]) -> String {
    format!(
        "missing topic(s) {}: declared by topics.toml (KEEL_TOPICS_FILE); create them with `keel topics create`",
        topics.join(", ")
    )
}

/// Reads the declared topics from `path`, naming roles with `topics`' settings, followed by
/// `dead_letters` made from the `[dead_letters]` template. Every mistake names the file and the
/// entry.
pub fn load(
    path: &Path,
    topics: &Topics,
    dead_letters: &[DeadLetter],
) -> anyhow::Result<Vec<TopicSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "KEEL_TOPICS_FILE: cannot read {}: {e} (run from the repository root, or set KEEL_TOPICS_FILE)",
            path.display()
        )
    })?;
    parse(&text, topics, dead_letters).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Parses a topics file's text.
pub fn parse(
    text: &str,
    topics: &Topics,
    dead_letters: &[DeadLetter],
) -> anyhow::Result<Vec<TopicSpec>> {
    let file: File = toml::from_str(text)?;
    let mut specs = Vec::new();
    let mut layouts = BTreeMap::new();
    for (role, d) in file.topics {
        let name = d.name.clone().unwrap_or_else(|| match role.as_str() {
            "orders" => topics.orders.clone(),
            "inventory" => topics.inventory.clone(),
            other => other.to_owned(),
        });
        let layout = d.layout();
        specs.push(spec(
            &format!("[{role}]"),
            name.clone(),
            d.partitions,
            &layout,
        )?);
        layouts.insert(name, layout);
    }
    anyhow::ensure!(!specs.is_empty(), "declares no topics");
    let template = file.dead_letters.unwrap_or_default();
    for dead_letter in dead_letters {
        let source = layouts.get(&dead_letter.source).ok_or_else(|| {
            anyhow::anyhow!(
                "[{DEAD_LETTERS}] {} holds the records of {}, which is not declared",
                dead_letter.name,
                dead_letter.source
            )
        })?;
        specs.push(dead_letter_spec(&dead_letter.name, &template, source)?);
    }
    Ok(specs)
}

/// A dead-letter topic from the template and the layout of the topic it holds the records of.
fn dead_letter_spec(name: &str, template: &Template, source: &Layout) -> anyhow::Result<TopicSpec> {
    // What decides how long records stay is the dead letters' own: retention forever and no
    // compaction unless the template says otherwise, whatever the source keeps.
    let mut config: BTreeMap<String, String> = source
        .config
        .iter()
        .filter(|(key, _)| !decides_what_stays(key))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    config.extend(template.config.clone());
    let layout = Layout {
        replication_factor: template.replication_factor.or(source.replication_factor),
        min_insync_replicas: template.min_insync_replicas.or(source.min_insync_replicas),
        config,
        retention: Some(
            template
                .retention
                .clone()
                .unwrap_or_else(|| "forever".into()),
        ),
        cleanup: Some(template.cleanup.clone().unwrap_or_else(|| "delete".into())),
    };
    spec(
        &format!("[{DEAD_LETTERS}] {name}"),
        name.to_owned(),
        template.partitions.unwrap_or(1),
        &layout,
    )
}

/// Topic configurations that decide which records a topic keeps and for how long: a dead-letter
/// topic does not inherit them from its source.
fn decides_what_stays(key: &str) -> bool {
    key.starts_with("retention.")
        || key.starts_with("local.retention.")
        || key == "cleanup.policy"
        || key == "delete.retention.ms"
        || key.starts_with("min.compaction.")
        || key.starts_with("max.compaction.")
        || key == "min.cleanable.dirty.ratio"
        || key == "segment.ms"
}

/// Dead-letter topic `name` as an empty template makes it of a source that declares nothing
/// but its partitions: what tests and the bench create beside topics of their own.
pub fn plain_dead_letter(name: &str) -> TopicSpec {
    let nothing = Layout {
        replication_factor: None,
        min_insync_replicas: None,
        config: BTreeMap::new(),
        retention: None,
        cleanup: None,
    };
    // Nothing declared cannot be declared wrong.
    dead_letter_spec(name, &Template::default(), &nothing)
        .unwrap_or_else(|_| TopicSpec::new(name, 1))
}

/// One topic's spec from its layout; `entry` names it in errors.
fn spec(entry: &str, name: String, partitions: i32, d: &Layout) -> anyhow::Result<TopicSpec> {
    anyhow::ensure!(
        partitions >= 1,
        "{entry} partitions must be at least 1, not {partitions}"
    );
    let replication = d.replication_factor.unwrap_or(-1);
    anyhow::ensure!(
        replication >= 1 || replication == -1,
        "{entry} replication_factor must be at least 1 (or left out: the broker's default), not {replication}"
    );
    let mut spec = TopicSpec::new(name, partitions);
    spec.replication = replication;
    if let Some(r) = &d.retention {
        let ms = retention_ms(r).map_err(|e| anyhow::anyhow!("{entry} retention: {e}"))?;
        spec.config.push(("retention.ms".into(), ms.to_string()));
    }
    if let Some(c) = &d.cleanup {
        anyhow::ensure!(
            matches!(c.as_str(), "delete" | "compact"),
            "{entry} cleanup must be \"delete\" or \"compact\", not {c:?}"
        );
        spec.config.push(("cleanup.policy".into(), c.clone()));
    }
    if let Some(n) = d.min_insync_replicas {
        anyhow::ensure!(
            n >= 1 && (replication == -1 || n <= replication),
            "{entry} min_insync_replicas must be between 1 and replication_factor, not {n}"
        );
        spec.config
            .push(("min.insync.replicas".into(), n.to_string()));
    }
    for (key, value) in &d.config {
        anyhow::ensure!(
            !spec.config.iter().any(|(k, _)| k == key),
            "{entry} config.{key:?} is set by a field of its own (retention, cleanup, min_insync_replicas)"
        );
        spec.config.push((key.clone(), value.clone()));
    }
    Ok(spec)
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
            &[],
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
            &[],
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
            let e = parse(text, &topics(), &[]).unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    fn dead_letter(name: &str, source: &str) -> DeadLetter {
        DeadLetter {
            name: name.into(),
            source: source.into(),
        }
    }

    #[test]
    fn a_dead_letter_topic_inherits_from_its_source_and_keeps_its_records() {
        let text = r#"
            [orders]
            partitions = 6
            replication_factor = 3
            min_insync_replicas = 2
            retention = "7d"
            cleanup = "compact"
            config = { "compression.type" = "zstd" }
            "#;
        let specs = parse(
            text,
            &topics(),
            &[dead_letter("orders-eu.inventory.dlq", "orders-eu")],
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        let dlq = &specs[1];
        assert_eq!(dlq.name, "orders-eu.inventory.dlq");
        assert_eq!(dlq.partitions, 1);
        assert_eq!(dlq.replication, 3, "as many copies as its source");
        assert_eq!(
            dlq.config,
            [
                ("retention.ms".to_owned(), "-1".to_owned()),
                ("cleanup.policy".to_owned(), "delete".to_owned()),
                ("min.insync.replicas".to_owned(), "2".to_owned()),
                ("compression.type".to_owned(), "zstd".to_owned()),
            ],
            "kept forever and never compacted, whatever its source does"
        );
    }

    #[test]
    fn the_dead_letter_template_overrides_what_it_declares() {
        let text = r#"
            [dead_letters]
            partitions = 2
            retention = "90d"
            min_insync_replicas = 1
            config = { "compression.type" = "lz4" }

            [orders]
            partitions = 6
            replication_factor = 3
            min_insync_replicas = 2
            config = { "compression.type" = "zstd", "segment.bytes" = "1048576" }
            "#;
        let specs = parse(
            text,
            &topics(),
            &[dead_letter("orders-eu.analytics.dlq", "orders-eu")],
        )
        .unwrap();
        let dlq = &specs[1];
        assert_eq!((dlq.partitions, dlq.replication), (2, 3));
        assert_eq!(
            dlq.config,
            [
                ("retention.ms".to_owned(), "7776000000".to_owned()),
                ("cleanup.policy".to_owned(), "delete".to_owned()),
                ("min.insync.replicas".to_owned(), "1".to_owned()),
                ("compression.type".to_owned(), "lz4".to_owned()),
                ("segment.bytes".to_owned(), "1048576".to_owned()),
            ]
        );
        // Left out, replication is the broker's default, as for any topic.
        let specs = parse(
            "[orders]\npartitions = 1",
            &topics(),
            &[dead_letter("orders-eu.x.dlq", "orders-eu")],
        )
        .unwrap();
        assert_eq!(specs[1].replication, -1);
    }

    #[test]
    fn a_dead_letter_topic_does_not_inherit_what_decides_how_long_records_stay() {
        let text = r#"
            [orders]
            partitions = 6
            config = { "cleanup.policy" = "compact,delete", "retention.bytes" = "1073741824", "min.compaction.lag.ms" = "60000", "compression.type" = "zstd" }
            "#;
        let specs = parse(
            text,
            &topics(),
            &[dead_letter("orders-eu.inventory.dlq", "orders-eu")],
        )
        .unwrap();
        assert_eq!(
            specs[1].config,
            [
                ("retention.ms".to_owned(), "-1".to_owned()),
                ("cleanup.policy".to_owned(), "delete".to_owned()),
                ("compression.type".to_owned(), "zstd".to_owned()),
            ]
        );
    }

    #[test]
    fn a_plain_dead_letter_is_what_an_empty_template_makes() {
        let parsed = parse(
            "[orders]\npartitions = 6",
            &topics(),
            &[dead_letter("orders-eu.x.dlq", "orders-eu")],
        )
        .unwrap();
        let plain = plain_dead_letter("orders-eu.x.dlq");
        assert_eq!(
            (
                &plain.name,
                plain.partitions,
                plain.replication,
                &plain.config
            ),
            (
                &parsed[1].name,
                parsed[1].partitions,
                parsed[1].replication,
                &parsed[1].config
            )
        );
    }

    #[test]
    fn dead_letter_mistakes_name_the_template_and_the_topic() {
        let cases = [
            (
                "[orders]\npartitions = 1",
                dead_letter("payments.x.dlq", "payments"),
                "[dead_letters] payments.x.dlq holds the records of payments, which is not declared",
            ),
            (
                "[dead_letters]\npartitions = 0\n[orders]\npartitions = 1",
                dead_letter("orders-eu.x.dlq", "orders-eu"),
                "[dead_letters] orders-eu.x.dlq partitions must be at least 1",
            ),
            (
                "[dead_letters]\nname = \"x\"\n[orders]\npartitions = 1",
                dead_letter("orders-eu.x.dlq", "orders-eu"),
                "unknown field `name`",
            ),
            (
                "[dead_letters]\nreplication_factor = 2\n[orders]\npartitions = 1\nreplication_factor = 3\nmin_insync_replicas = 3",
                dead_letter("orders-eu.x.dlq", "orders-eu"),
                "[dead_letters] orders-eu.x.dlq min_insync_replicas must be between 1 and replication_factor",
            ),
        ];
        for (text, dead_letter, expected) in cases {
            let e = parse(text, &topics(), &[dead_letter])
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_repository_file_declares_the_services_topics() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topics.toml");
        let specs = load(&path, &crate::Settings::local().topics, &[]).unwrap();
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["inventory", "orders"]);
        assert!(specs.iter().all(|s| s.partitions == 6));
    }
}
