//! `keel topics create|list|describe`: the layout declared in `topics.toml` (`KEEL_TOPICS_FILE`)
//! and what the cluster has.

use anyhow::Context;
use keel_core::Settings;
use keel_core::kafka::{self, TopicInfo, TopicSpec};
use serde_json::json;

use crate::ops::{Output, table};

/// The declared topics, then every group's dead-letter topics.
fn declared(s: &Settings) -> anyhow::Result<Vec<TopicSpec>> {
    keel_core::topics::load(
        &s.topics_file,
        &s.topics,
        &keel_consumers::dead_letters(&s.topics),
    )
}

fn config_text(config: &[(String, String)]) -> String {
    config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `keel topics create`: creates the declared topics that are missing; leaves the others alone.
pub async fn create(s: &Settings, output: Output) -> anyhow::Result<()> {
    let specs = declared(s)?;
    let created = kafka::create_topics(&s.kafka, &specs)
        .await
        .with_context(|| {
            format!(
                "KEEL_KAFKA_BROKERS: cannot create topics on {}",
                s.kafka.brokers
            )
        })?;
    match output {
        Output::Json => {
            let rows: Vec<_> = specs
                .iter()
                .map(|t| {
                    json!({
                        "topic": t.name, "partitions": t.partitions, "replication_factor": t.replication,
                        "config": t.config.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        "created": created.contains(&t.name),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = specs
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.partitions.to_string(),
                        if created.contains(&t.name) {
                            "created"
                        } else {
                            "existed"
                        }
                        .into(),
                        config_text(&t.config),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["TOPIC", "PARTITIONS", "STATE", "CONFIG"], &rows)
            );
        }
    }
    Ok(())
}

/// `keel topics list`: every topic of the cluster.
pub fn list(s: &Settings, output: Output) -> anyhow::Result<()> {
    let topics = kafka::list_topics(&s.kafka, None).context("KEEL_KAFKA_BROKERS")?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&topics)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = topics
                .iter()
                .map(|t| {
                    vec![
                        t.name.clone(),
                        t.partitions.to_string(),
                        t.replication.to_string(),
                    ]
                })
                .collect();
            print!("{}", table(&["TOPIC", "PARTITIONS", "REPLICAS"], &rows));
        }
    }
    Ok(())
}

/// One declared topic against the cluster.
#[derive(serde::Serialize)]
struct Comparison {
    topic: String,
    declared_partitions: i32,
    partitions: Option<i32>,
    /// -1: the broker's default.
    declared_replication: i32,
    replication: Option<i32>,
    declared_config: std::collections::BTreeMap<String, String>,
    config: std::collections::BTreeMap<String, String>,
    /// What differs, in words; empty when the topic matches.
    differences: Vec<String>,
}

/// `keel topics describe`: each declared topic as the cluster has it, and how it differs.
/// Fails (exit 1) if one is missing or differs, so a script can check an environment.
pub async fn describe(s: &Settings, output: Output) -> anyhow::Result<()> {
    let specs = declared(s)?;
    let mut present: Vec<TopicInfo> = kafka::list_topics(&s.kafka, None)
        .context("KEEL_KAFKA_BROKERS")?
        .into_iter()
        .filter(|t| specs.iter().any(|s| s.name == t.name))
        .collect();
    let configs_known = kafka::describe_configs(&s.kafka, &mut present)
        .await
        .is_ok();
    let mut comparisons = Vec::new();
    for spec in &specs {
        let found = present.iter().find(|t| t.name == spec.name);
        let mut differences = Vec::new();
        match found {
            None => differences.push("missing".to_owned()),
            Some(t) => {
                if t.partitions != spec.partitions {
                    differences.push(format!(
                        "{} partitions, {} declared",
                        t.partitions, spec.partitions
                    ));
                }
                // -1: the broker's default, whatever it is.
                if spec.replication >= 1 && t.replication != spec.replication {
                    differences.push(format!(
                        "{} replicas, {} declared",
                        t.replication, spec.replication
                    ));
                }
                for (key, value) in &spec.config {
                    match t.config.get(key) {
                        Some(v) if v == value => {}
                        Some(v) => differences.push(format!("{key}={v}, {value} declared")),
                        // Not every broker reports every key (tansu 0.6 reports few): unknown,
                        // not different.
                        None => {}
                    }
                }
            }
        }
        comparisons.push(Comparison {
            topic: spec.name.clone(),
            declared_partitions: spec.partitions,
            partitions: found.map(|t| t.partitions),
            declared_replication: spec.replication,
            replication: found.map(|t| t.replication),
            declared_config: spec.config.iter().cloned().collect(),
            config: found.map(|t| t.config.clone()).unwrap_or_default(),
            differences,
        });
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&comparisons)?),
        Output::Table => {
            let rows: Vec<Vec<String>> = comparisons
                .iter()
                .map(|c| {
                    vec![
                        c.topic.clone(),
                        c.partitions.map_or("-".into(), |p| p.to_string()),
                        c.config
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        if c.differences.is_empty() {
                            "as declared".into()
                        } else {
                            c.differences.join("; ")
                        },
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["TOPIC", "PARTITIONS", "CONFIG", "STATE"], &rows)
            );
            if !configs_known {
                println!(
                    "(the broker did not describe topic configurations; only partitions compared)"
                );
            }
        }
    }
    let drifted = comparisons
        .iter()
        .filter(|c| !c.differences.is_empty())
        .count();
    anyhow::ensure!(
        drifted == 0,
        "{drifted} topic(s) differ from {}",
        s.topics_file.display()
    );
    Ok(())
}
