//! Day-2 operations: where the groups stand, replaying them, and the outbox's state.
//!
//! `keel replay` exits 3 ([`Failure::Busy`]) when the group has live members: stop them, or pass
//! `--wait`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_core::Settings;
use keel_core::kafka::{self, PartitionState};

use crate::failure::Failure;

/// How a command prints what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A plain text table: columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub fn topics_of(s: &Settings, group: &str) -> anyhow::Result<Vec<String>> {
    Ok((keel_consumers::group(group)?.topics)(&s.topics))
}

fn offsets(s: &Settings, group: &str, topics: &[String]) -> anyhow::Result<Vec<PartitionState>> {
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    kafka::group_offsets(&s.kafka, group, &topics)
        .with_context(|| format!("KEEL_KAFKA_BROKERS: cannot read the offsets of {group}"))
}

/// `keel lag [group]`.
pub fn lag(s: &Settings, group: Option<&str>, output: Output) -> anyhow::Result<()> {
    let groups: Vec<&str> = match group {
        Some(g) => vec![g],
        None => keel_consumers::names(),
    };
    let mut report = Vec::new();
    let now = chrono::Utc::now().timestamp_millis();
    for g in groups {
        let topics = topics_of(s, g)?;
        for p in offsets(s, g, &topics)? {
            // The age of the next record the group will read, when there is one to read.
            let age = if p.lag() > 0 {
                kafka::record_timestamp(
                    &s.kafka,
                    s.broker_quirks,
                    &p.topic,
                    p.partition,
                    p.committed.unwrap_or(p.low).max(p.low),
                    Duration::from_secs(2),
                )?
                .map(|t| (now - t).max(0) as f64 / 1000.0)
            } else {
                None
            };
            report.push((g.to_owned(), p, age));
        }
    }
    match output {
        Output::Json => {
            let rows: Vec<serde_json::Value> = report
                .iter()
                .map(|(g, p, age)| {
                    serde_json::json!({
                        "group": g, "topic": p.topic, "partition": p.partition,
                        "committed": p.committed, "start": p.low, "end": p.high, "lag": p.lag(),
                        "oldest_unconsumed_age_secs": age,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            let rows: Vec<Vec<String>> = report
                .iter()
                .map(|(g, p, age)| {
                    vec![
                        g.clone(),
                        p.topic.clone(),
                        p.partition.to_string(),
                        p.committed.map_or("-".into(), |c| c.to_string()),
                        p.high.to_string(),
                        p.lag().to_string(),
                        age.map_or("-".into(), |a| format!("{a:.1}s")),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "GROUP",
                        "TOPIC",
                        "PARTITION",
                        "COMMITTED",
                        "END",
                        "LAG",
                        "OLDEST UNCONSUMED"
                    ],
                    &rows
                )
            );
            let total: i64 = report.iter().map(|(_, p, _)| p.lag()).sum();
            println!("total lag: {total}");
        }
    }
    Ok(())
}

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    Earliest,
    Latest,
    Offset(i64),
    /// Milliseconds since the epoch.
    Time(i64),
}

impl std::str::FromStr for From {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "earliest" => Ok(From::Earliest),
            "latest" => Ok(From::Latest),
            _ => {
                if let Ok(o) = s.parse::<i64>() {
                    return if o >= 0 {
                        Ok(From::Offset(o))
                    } else {
                        Err(format!("offset {o} is negative"))
                    };
                }
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| From::Time(t.timestamp_millis()))
                    .map_err(|_| {
                        format!("{s:?} is not earliest, latest, an offset or an RFC 3339 time (2026-11-25T08:00:00Z)")
                    })
            }
        }
    }
}

/// One partition's replay plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Move {
    pub topic: String,
    pub partition: i32,
    pub current: Option<i64>,
    pub target: i64,
    /// Records read again (or skipped, if negative) compared with where the group is now.
    pub reread: i64,
}

/// `keel replay`: plans, waits for the group to be empty if asked, commits, reports.
pub async fn replay(
    s: &Settings,
    group: &str,
    from: &From,
    topic: Option<&str>,
    dry_run: bool,
    wait: Option<Duration>,
    output: Output,
) -> Result<(), Failure> {
    let mut topics = topics_of(s, group)?;
    if let Some(t) = topic {
        if !topics.iter().any(|x| x == t) {
            return Err(anyhow::anyhow!(
                "group {group} does not read topic {t}; it reads {}",
                topics.join(", ")
            )
            .into());
        }
        topics = vec![t.to_owned()];
    }
    let states = offsets(s, group, &topics)?;
    let by_time = match from {
        From::Time(ms) => {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            kafka::offsets_for_time(&s.kafka, &names, *ms)?
        }
        _ => Vec::new(),
    };
    let moves: Vec<Move> = states
        .iter()
        .map(|p| {
            let target = match from {
                From::Earliest => p.low,
                From::Latest => p.high,
                From::Offset(o) => (*o).clamp(p.low, p.high),
                From::Time(_) => by_time
                    .iter()
                    .find(|(t, part, _)| *t == p.topic && *part == p.partition)
                    .map_or(p.high, |(_, _, o)| *o)
                    .clamp(p.low, p.high),
            };
            let now = p.committed.unwrap_or(p.low);
            Move {
                topic: p.topic.clone(),
                partition: p.partition,
                current: p.committed,
                target,
                reread: now - target,
            }
        })
        .collect();
    let print = |moves: &[Move], done: bool| -> anyhow::Result<()> {
        match output {
            Output::Json => println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"group": group, "dry_run": dry_run, "done": done, "partitions": moves})
                )?
            ),
            Output::Table => {
                let rows: Vec<Vec<String>> = moves
                    .iter()
                    .map(|m| {
                        vec![
                            m.topic.clone(),
                            m.partition.to_string(),
                            m.current.map_or("-".into(), |c| c.to_string()),
                            m.target.to_string(),
                            m.reread.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["TOPIC", "PARTITION", "CURRENT", "TARGET", "RE-READ"],
                        &rows
                    )
                );
                let total: i64 = moves.iter().map(|m| m.reread.max(0)).sum();
                println!(
                    "{group}: {total} record(s) to read again{}",
                    if done {
                        "; offsets moved"
                    } else if dry_run {
                        " (dry run: nothing changed)"
                    } else {
                        ""
                    }
                );
            }
        }
        Ok(())
    };
    if dry_run {
        return Ok(print(&moves, false)?);
    }
    let deadline = wait.map(|w| Instant::now() + w);
    loop {
        let members = kafka::group_members(&s.kafka, group)?;
        if members == 0 {
            break;
        }
        match deadline {
            Some(d) if Instant::now() < d => tokio::time::sleep(Duration::from_millis(500)).await,
            _ => {
                return Err(Failure::Busy {
                    group: group.to_owned(),
                    members,
                });
            }
        }
    }
    let targets: Vec<(String, i32, i64)> = moves
        .iter()
        .map(|m| (m.topic.clone(), m.partition, m.target))
        .collect();
    kafka::commit_offsets(&s.kafka, group, &targets)
        .with_context(|| format!("committing {group}'s new offsets"))?;
    Ok(print(&moves, true)?)
}

/// A row set aside, as `keel outbox status` lists it.
#[derive(serde::Serialize, sqlx::FromRow)]
struct SetAside {
    id: i64,
    topic: String,
    key: String,
    event_type: String,
    failed_at: String,
    error: String,
    /// Pending rows of its topic and key behind it, waiting for it.
    holding: i64,
}

/// Set-aside rows shown in the table (all of them with `--output json`).
const SET_ASIDE_SHOWN: usize = 20;

/// `keel outbox status`.
pub async fn outbox_status(s: &Settings, output: Output) -> anyhow::Result<()> {
    let pool = keel_core::db::pool(&s.database_url, 1)
        .await
        .context("KEEL_DATABASE_URL")?;
    let (pending, oldest_secs, published_last_minute): (i64, Option<f64>, i64) =
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND failed_at IS NULL),
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE published_at IS NULL AND failed_at IS NULL))::float8,
                    count(*) FILTER (WHERE published_at > now() - interval '1 minute')
               FROM outbox.events",
        )
        .fetch_one(&pool)
        .await?;
    let set_aside: Vec<SetAside> = sqlx::query_as(
        "SELECT f.id, f.topic, f.message_key AS key, f.event_type,
                to_char(f.failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS failed_at,
                coalesce(f.error, '') AS error,
                (SELECT count(*) FROM outbox.events p
                  WHERE p.published_at IS NULL AND p.failed_at IS NULL
                    AND p.topic = f.topic AND p.message_key = f.message_key AND p.id > f.id) AS holding
           FROM outbox.events f
          WHERE f.failed_at IS NOT NULL AND f.discarded_at IS NULL
          ORDER BY f.id",
    )
    .fetch_all(&pool)
    .await?;
    let rate = published_last_minute as f64 / 60.0;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "pending": pending, "failed": set_aside.len(),
                "oldest_pending_age_secs": oldest_secs,
                "published_per_sec_last_minute": rate,
                "set_aside": set_aside,
            })
        ),
        Output::Table => {
            let age = oldest_secs.map_or("-".into(), |a| format!("{a:.1}s"));
            print!(
                "{}",
                table(
                    &[
                        "PENDING",
                        "FAILED",
                        "OLDEST PENDING",
                        "PUBLISHED/S (LAST MINUTE)"
                    ],
                    &[vec![
                        pending.to_string(),
                        set_aside.len().to_string(),
                        age,
                        format!("{rate:.1}")
                    ]]
                )
            );
            if !set_aside.is_empty() {
                println!("\nSet aside (fix the cause, then `keel outbox retry --all`):");
                let rows: Vec<Vec<String>> = set_aside
                    .iter()
                    .take(SET_ASIDE_SHOWN)
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            r.topic.clone(),
                            r.key.clone(),
                            r.event_type.clone(),
                            r.failed_at.clone(),
                            r.holding.to_string(),
                            r.error.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &[
                            "ID",
                            "TOPIC",
                            "KEY",
                            "EVENT",
                            "SET ASIDE AT",
                            "HOLDING",
                            "WHY"
                        ],
                        &rows
                    )
                );
                if set_aside.len() > SET_ASIDE_SHOWN {
                    println!(
                        "... and {} more (--output json lists all)",
                        set_aside.len() - SET_ASIDE_SHOWN
                    );
                }
            }
        }
    }
    Ok(())
}

/// Prints what `keel outbox retry` or `discard` did to which rows.
fn print_changed(what: &str, ids: &[i64], output: Output) {
    match output {
        Output::Json => println!("{}", serde_json::json!({ what: ids })),
        Output::Table => println!(
            "{what} {} row(s){}",
            ids.len(),
            if ids.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    ids.iter()
                        .map(i64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ),
    }
}

/// `keel outbox retry`: the rows set aside (those of `ids`, or all) back in line, and the relay
/// woken.
pub async fn outbox_retry(
    s: &Settings,
    ids: &[i64],
    all: bool,
    output: Output,
) -> anyhow::Result<()> {
    let pool = keel_core::db::pool(&s.database_url, 1)
        .await
        .context("KEEL_DATABASE_URL")?;
    let mut tx = pool.begin().await?;
    let retried: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox.events SET failed_at = NULL
          WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND published_at IS NULL
            AND ($1 OR id = ANY($2))
          RETURNING id",
    )
    .bind(all)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify('keel_outbox', '')")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut retried = retried;
    retried.sort_unstable();
    let unknown: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|i| !retried.contains(i))
        .collect();
    print_changed("retried", &retried, output);
    anyhow::ensure!(
        unknown.is_empty(),
        "not set aside (or discarded): {unknown:?}; `keel outbox status` lists the rows set aside"
    );
    Ok(())
}

/// `keel outbox discard`: the rows set aside of `ids` given up on.
pub async fn outbox_discard(s: &Settings, ids: &[i64], output: Output) -> anyhow::Result<()> {
    let pool = keel_core::db::pool(&s.database_url, 1)
        .await
        .context("KEEL_DATABASE_URL")?;
    let mut discarded: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox.events SET discarded_at = now()
          WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND id = ANY($1)
          RETURNING id",
    )
    .bind(ids)
    .fetch_all(&pool)
    .await?;
    sqlx::query("SELECT pg_notify('keel_outbox', '')")
        .execute(&pool)
        .await?;
    discarded.sort_unstable();
    for id in &discarded {
        tracing::warn!(
            outbox_id = id,
            "Outbox row discarded: it will never be published"
        );
    }
    let unknown: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|i| !discarded.contains(i))
        .collect();
    print_changed("discarded", &discarded, output);
    anyhow::ensure!(
        unknown.is_empty(),
        "not set aside (or already discarded): {unknown:?}"
    );
    Ok(())
}
