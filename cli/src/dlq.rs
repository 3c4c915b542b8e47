//! `keel dlq list|show|redrive <group>`: the records a group dead-lettered, and sending them back.
//!
//! A group's dead letters live in `<topic>.<group>.dlq`, one per topic it reads (one partition
//! each, created on first use). A record is named by `<topic>:<dlq offset>`, `<topic>` being the
//! original topic. Kafka keeps the records after a redrive; which ones were redriven, when and
//! where to is recorded in `consumers.dead_letter_redrives`, written after the broker
//! acknowledged the copy. So an interrupted redrive sends a record at most once more (the groups'
//! dedupe absorbs it) and never skips one.
//!
//! A redriven copy carries the original key, value and headers, minus the `keel-dlq-*` headers,
//! plus `keel-redriven-from` (`<dlq topic>:<offset>`) and `keel-redrive-count`; if it fails again,
//! its new dead letter shows both. It goes to the original topic, so every group reading that
//! topic receives it; the groups that had applied it already see a duplicate and skip it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use keel_consumers::dlq_topic;
use keel_consumers::runtime::dlq_headers;
use keel_core::Settings;
use keel_core::kafka;
use rdkafka::Message;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::ops::{Output, table};

pub const REDRIVEN_FROM: &str = "keel-redriven-from";
pub const REDRIVE_COUNT: &str = "keel-redrive-count";

/// How long a read waits for more records before it calls the dead-letter topic read.
const IDLE: Duration = Duration::from_millis(1500);
/// Dead letters read per request to the broker: a topic is read page after page, to its end.
const PAGE: usize = 10_000;

/// One dead-lettered record.
pub(crate) struct Letter {
    /// `<original topic>:<dlq offset>`.
    id: String,
    dlq_topic: String,
    message: OwnedMessage,
    headers: Vec<(String, Option<Vec<u8>>)>,
    /// When it was last redriven, if ever.
    redriven_at: Option<String>,
}

impl Letter {
    fn header(&self, key: &str) -> Option<String> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The dead-lettered record's value: the original bytes.
    pub(crate) fn payload(&self) -> Option<&[u8]> {
        self.message.payload()
    }

    fn original_topic(&self) -> anyhow::Result<String> {
        self.header(dlq_headers::TOPIC)
            .ok_or_else(|| anyhow::anyhow!("{}: no {} header", self.id, dlq_headers::TOPIC))
    }

    fn summary(&self) -> Value {
        json!({
            "id": self.id,
            "dlq_topic": self.dlq_topic,
            "dlq_offset": self.message.offset(),
            "original": {
                "topic": self.header(dlq_headers::TOPIC),
                "partition": self.header(dlq_headers::PARTITION).and_then(|p| p.parse::<i64>().ok()),
                "offset": self.header(dlq_headers::OFFSET).and_then(|o| o.parse::<i64>().ok()),
            },
            "dead_lettered_at": self.message.timestamp().to_millis().and_then(chrono::DateTime::from_timestamp_millis).map(|t| t.to_rfc3339()),
            "error_class": self.header(dlq_headers::ERROR_CLASS),
            "error": self.header(dlq_headers::ERROR),
            "attempts": self.header(dlq_headers::ATTEMPTS).and_then(|a| a.parse::<i64>().ok()),
            "redriven_from": self.header(REDRIVEN_FROM),
            "redriven_at": self.redriven_at,
        })
    }
}

/// The group's topics (or just `topic`), each with its dead-letter topic.
fn dlq_topics(
    s: &Settings,
    group: &str,
    topic: Option<&str>,
) -> anyhow::Result<Vec<(String, String)>> {
    let topics = crate::ops::topics_of(s, group)?;
    if let Some(t) = topic {
        anyhow::ensure!(
            topics.iter().any(|x| x == t),
            "group {group} does not read topic {t}; it reads {}",
            topics.join(", ")
        );
    }
    Ok(topics
        .into_iter()
        .filter(|t| topic.is_none_or(|x| x == t))
        .map(|t| {
            let dlq = dlq_topic(&t, group);
            (t, dlq)
        })
        .collect())
}

/// Every dead letter of `group` (on `topic` only, if given), oldest first per topic.
pub(crate) async fn read(
    s: &Settings,
    pool: &sqlx::PgPool,
    group: &str,
    topic: Option<&str>,
) -> anyhow::Result<Vec<Letter>> {
    let mut letters = Vec::new();
    for (original, dlq) in dlq_topics(s, group, topic)? {
        if !kafka::topic_exists(&s.kafka, &dlq)? {
            continue; // nothing was ever dead-lettered here
        }
        let redriven: HashMap<i64, String> = sqlx::query_as::<_, (i64, String)>(
            "SELECT dlq_offset, to_char(max(redriven_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
               FROM consumers.dead_letter_redrives WHERE dlq_topic = $1 GROUP BY dlq_offset",
        )
        .bind(&dlq)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let mut messages = Vec::new();
        loop {
            let from = messages.last().map(|m: &OwnedMessage| m.offset() + 1);
            let page = kafka::read_partition(&s.kafka, s.broker_quirks, &dlq, 0, from, PAGE, IDLE)
                .with_context(|| format!("reading {dlq}"))?;
            let full = page.len() == PAGE;
            messages.extend(page);
            if !full {
                break;
            }
        }
        for message in messages {
            let headers = message
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default();
            letters.push(Letter {
                id: format!("{original}:{}", message.offset()),
                dlq_topic: dlq.clone(),
                redriven_at: redriven.get(&message.offset()).cloned(),
                message,
                headers,
            });
        }
    }
    Ok(letters)
}

async fn pool(s: &Settings) -> anyhow::Result<sqlx::PgPool> {
    keel_core::db::migrate(
        &s.database_url,
        keel_consumers::DB_SCHEMA,
        &keel_consumers::MIGRATOR,
    )
    .await
    .context("KEEL_DATABASE_URL")?;
    keel_core::db::pool(&s.database_url, 2)
        .await
        .context("KEEL_DATABASE_URL")
}

/// `keel dlq list <group>`.
pub async fn list(
    s: &Settings,
    group: &str,
    topic: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let pool = pool(s).await?;
    let letters = read(s, &pool, group, topic).await?;
    match output {
        Output::Json => {
            let rows: Vec<Value> = letters.iter().map(Letter::summary).collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = letters
                .iter()
                .map(|l| {
                    let error: String = l.header(dlq_headers::ERROR).unwrap_or_default();
                    let error = if error.chars().count() > 60 {
                        format!("{}…", error.chars().take(59).collect::<String>())
                    } else {
                        error
                    };
                    vec![
                        l.id.clone(),
                        format!(
                            "{}/{}",
                            l.header(dlq_headers::PARTITION).unwrap_or_default(),
                            l.header(dlq_headers::OFFSET).unwrap_or_default()
                        ),
                        l.header(dlq_headers::ERROR_CLASS).unwrap_or_default(),
                        l.header(dlq_headers::ATTEMPTS).unwrap_or_default(),
                        l.redriven_at.clone().unwrap_or_else(|| "-".into()),
                        error,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "FROM PARTITION/OFFSET",
                        "CLASS",
                        "ATTEMPTS",
                        "REDRIVEN",
                        "ERROR"
                    ],
                    &rows
                )
            );
            let waiting = letters.iter().filter(|l| l.redriven_at.is_none()).count();
            println!(
                "{group}: {} dead letter(s), {waiting} never redriven",
                letters.len()
            );
        }
    }
    Ok(())
}

/// `keel dlq show <group> --id ID...`: headers, key and the value decoded as JSON.
pub async fn show(s: &Settings, group: &str, ids: &[String], output: Output) -> anyhow::Result<()> {
    let pool = pool(s).await?;
    let letters = select(read(s, &pool, group, None).await?, ids, false)?;
    let decoder = keel_schemas::Decoder::new(&s.schema_registry_url)?;
    let mut shown = Vec::new();
    for l in &letters {
        let value = match decoder.decode(l.message.payload()).await {
            Ok(event) => json!({"event": event.name(), "payload": serde_json::to_value(&event)?}),
            Err(e) => json!({
                "undecodable": e.to_string(),
                "bytes_hex": l.message.payload().map(hex),
            }),
        };
        let mut summary = l.summary();
        summary["key"] = json!(
            l.message
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
        );
        summary["headers"] = Value::Object(
            l.headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        json!(
                            v.as_deref()
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                        ),
                    )
                })
                .collect(),
        );
        summary["value"] = value;
        shown.push(summary);
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&shown)?),
        Output::Table => {
            for s in &shown {
                println!("{}", serde_json::to_string_pretty(s)?);
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The letters named by `ids`, or with `all` every letter never redriven.
fn select(letters: Vec<Letter>, ids: &[String], all: bool) -> anyhow::Result<Vec<Letter>> {
    if all {
        return Ok(letters
            .into_iter()
            .filter(|l| l.redriven_at.is_none())
            .collect());
    }
    anyhow::ensure!(
        !ids.is_empty(),
        "name the records with --id <topic:offset>, or pass --all"
    );
    let mut by_id: HashMap<String, Letter> =
        letters.into_iter().map(|l| (l.id.clone(), l)).collect();
    ids.iter()
        .map(|id| {
            by_id
                .remove(id)
                .ok_or_else(|| anyhow::anyhow!("no dead letter {id} (see `keel dlq list`)"))
        })
        .collect()
}

/// `keel dlq redrive <group> (--id ID... | --all) [--dry-run]`.
pub async fn redrive(
    s: &Settings,
    group: &str,
    ids: &[String],
    all: bool,
    dry_run: bool,
    output: Output,
) -> anyhow::Result<()> {
    let pool = pool(s).await?;
    let letters = select(read(s, &pool, group, None).await?, ids, all)?;
    let mut report = Vec::new();
    if dry_run {
        for l in &letters {
            report.push(json!({"id": l.id, "to": l.original_topic()?, "redriven": false}));
        }
    } else {
        let producer: FutureProducer = kafka::producer_config(&s.kafka)
            .create()
            .context("KEEL_KAFKA_BROKERS: cannot create producer")?;
        // Enqueue every copy, then await the acknowledgements: one round trip, not one per record.
        let mut pending = Vec::new();
        for l in &letters {
            let target = l.original_topic()?;
            let count = l
                .header(REDRIVE_COUNT)
                .and_then(|c| c.parse::<u32>().ok())
                .unwrap_or(0)
                + 1;
            let from = format!("{}:{}", l.dlq_topic, l.message.offset());
            let count = count.to_string();
            let mut headers = OwnedHeaders::new();
            for (key, value) in &l.headers {
                if key.starts_with("keel-dlq-") || key == REDRIVEN_FROM || key == REDRIVE_COUNT {
                    continue;
                }
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            headers = headers
                .insert(Header {
                    key: REDRIVEN_FROM,
                    value: Some(from.as_str()),
                })
                .insert(Header {
                    key: REDRIVE_COUNT,
                    value: Some(count.as_str()),
                });
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&target).headers(headers);
            if let Some(key) = l.message.key() {
                record = record.key(key);
            }
            if let Some(value) = l.message.payload() {
                record = record.payload(value);
            }
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| anyhow::anyhow!("{}: cannot enqueue: {e}", l.id))?;
            pending.push((l, target, delivery));
        }
        let mut failed = 0usize;
        for (l, target, delivery) in pending {
            match delivery.await {
                Ok(Ok(delivered)) => {
                    sqlx::query(
                        "INSERT INTO consumers.dead_letter_redrives
                             (dlq_topic, dlq_offset, target_topic, target_partition, target_offset)
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(&l.dlq_topic)
                    .bind(l.message.offset())
                    .bind(&target)
                    .bind(delivered.partition)
                    .bind(delivered.offset)
                    .execute(&pool)
                    .await
                    .with_context(|| {
                        format!("{} was redriven but could not be recorded; it will be redriven again next time", l.id)
                    })?;
                    report.push(json!({
                        "id": l.id, "to": target, "partition": delivered.partition,
                        "offset": delivered.offset, "redriven": true,
                    }));
                }
                Ok(Err((e, _))) => {
                    failed += 1;
                    report.push(json!({"id": l.id, "to": target, "redriven": false, "error": e.to_string()}));
                }
                Err(_) => {
                    failed += 1;
                    report.push(json!({"id": l.id, "to": target, "redriven": false, "error": "delivery cancelled"}));
                }
            }
        }
        print_redrive(&report, group, dry_run, output)?;
        anyhow::ensure!(
            failed == 0,
            "{failed} record(s) not redriven (they stay in the dead-letter topic; run again)"
        );
        return Ok(());
    }
    print_redrive(&report, group, dry_run, output)
}

fn print_redrive(
    report: &[Value],
    group: &str,
    dry_run: bool,
    output: Output,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"group": group, "dry_run": dry_run, "records": report})
            )?
        ),
        Output::Table => {
            let text = |v: &Value| match v {
                Value::Null => "-".to_owned(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let rows: Vec<Vec<String>> = report
                .iter()
                .map(|r| {
                    vec![
                        text(&r["id"]),
                        text(&r["to"]),
                        text(&r["partition"]),
                        text(&r["offset"]),
                        text(&r["error"]),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["ID", "TO TOPIC", "PARTITION", "OFFSET", "ERROR"], &rows)
            );
            let sent = report.iter().filter(|r| r["redriven"] == true).count();
            if dry_run {
                println!(
                    "{group}: {} record(s) would be redriven (dry run: nothing sent)",
                    report.len()
                );
            } else {
                println!("{group}: {sent} of {} record(s) redriven", report.len());
            }
        }
    }
    Ok(())
}
