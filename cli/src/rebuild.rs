//! `keel analytics rebuild`: the warehouse rebuilt from the topics beside the live one, swapped in
//! atomically once complete.
//!
//! 1. An empty `analytics_rebuild` schema; the `analytics-rebuild` group's offsets set to the
//!    starting point (`--from`).
//! 2. The rebuild's consumer runs in this process until its committed offsets reach the end
//!    offsets read at the start (a lower bound: tansu 0.6 under-reports end offsets, never
//!    over-reports them), so the rebuild holds at least the history that existed when it began.
//! 3. It goes on until every event the live group applied is in the rebuild too; then one
//!    transaction holds the live facts against writes, waits for the rebuild to have the last of
//!    them, stops the rebuild's consumer and swaps the schemas (see `keel_consumers::analytics`).
//!
//! Nothing the live group applied is lost: the swap refuses while the rebuild lacks one of its
//! events, and, unless `--drop-missing`, while the live warehouse holds a fact the rebuild does
//! not (an order placed before `--from`, or before retention deleted the log's start), naming
//! the orders. Interrupted before the swap, the live warehouse is untouched and the next rebuild
//! starts afresh.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_consumers::Consumer;
use keel_consumers::analytics::{self, Analytics};
use keel_core::Settings;
use keel_core::kafka;
use tokio_util::sync::CancellationToken;

use crate::failure::Failure;
use crate::ops::{From, Output};

/// How long the swap may hold the live group's writes while the rebuild takes in its last events.
const SWAP_HOLD: Duration = Duration::from_secs(60);

/// Progress on stderr: a line redrawn in place on a terminal, a line every few seconds otherwise.
struct Progress {
    tty: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, done: i64, total: i64) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if done < total && self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let pct = if total > 0 {
            done.min(total) * 100 / total
        } else {
            100
        };
        let width = 30usize;
        let filled = (pct as usize * width / 100).min(width);
        let bar = format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled));
        if self.tty {
            eprint!("\rrebuilding {bar} {done}/{total} records ({pct}%)  ");
        } else {
            eprintln!("rebuilding {bar} {done}/{total} records ({pct}%)");
        }
    }

    fn finish(&self) {
        if self.tty && self.last.is_some() {
            eprintln!();
        }
    }
}

/// `keel analytics rebuild`.
pub async fn rebuild(
    s: &Settings,
    from: &From,
    timeout: Duration,
    drop_missing: bool,
    output: Output,
) -> Result<(), Failure> {
    if matches!(from, From::Latest | From::Offset(_)) {
        return Err(
            anyhow::anyhow!("--from {from:?}: a rebuild starts at earliest or at a time").into(),
        );
    }
    let started = Instant::now();
    let deadline = started + timeout;
    let group = analytics::REBUILD_GROUP;
    let subscription = Analytics::rebuild_subscription(&s.topics);
    let names: Vec<&str> = subscription.topics.iter().map(String::as_str).collect();
    let members = kafka::group_members(&s.kafka, group)?;
    if members > 0 {
        return Err(Failure::Busy {
            group: group.to_owned(),
            members,
        });
    }

    keel_consumers::migrate(
        &s.database_url,
        Some((analytics::REBUILD_SCHEMA, &analytics::MIGRATOR)),
    )
    .await?;
    analytics::prepare_rebuild(&s.database_url)
        .await
        .context("preparing the rebuild schema")?;
    let states = kafka::group_offsets(&s.kafka, group, &names)
        .context("KEEL_KAFKA_BROKERS: reading the topics' offsets")?;
    let by_time = match from {
        From::Earliest => Vec::new(),
        From::Time(ms) => kafka::offsets_for_time(&s.kafka, &names, *ms)?,
        From::Latest | From::Offset(_) => unreachable!("refused above"),
    };
    let starts: Vec<(String, i32, i64)> = states
        .iter()
        .map(|p| {
            let start = by_time
                .iter()
                .find(|(t, part, _)| *t == p.topic && *part == p.partition)
                .map_or(p.low, |(_, _, o)| *o)
                .clamp(p.low, p.high);
            (p.topic.clone(), p.partition, start)
        })
        .collect();
    let ends: Vec<(String, i32, i64)> = states
        .iter()
        .map(|p| (p.topic.clone(), p.partition, p.high))
        .collect();
    let total: i64 = starts
        .iter()
        .zip(&ends)
        .map(|(s, e)| (e.2 - s.2).max(0))
        .sum();
    kafka::commit_offsets(&s.kafka, group, &starts)
        .context("setting the rebuild group's starting offsets")?;

    let pool = keel_core::db::pool(&s.database_url, 4).await?;
    let consumer = Consumer::new(
        subscription.clone(),
        Analytics::rebuilder(),
        pool.clone(),
        s,
    )?;
    let stop = CancellationToken::new();
    let mut running = tokio::spawn(consumer.run(stop.clone()));
    let result = async {
        // 2. The history that existed at the start.
        let mut progress = Progress::new();
        loop {
            let now = kafka::group_offsets(&s.kafka, group, &names)?;
            let done: i64 = now
                .iter()
                .zip(&starts)
                .map(|(p, st)| (p.committed.unwrap_or(st.2) - st.2).max(0))
                .sum();
            progress.show(done, total);
            let caught_up = now.iter().all(|p| {
                ends.iter()
                    .find(|e| e.0 == p.topic && e.1 == p.partition)
                    .is_none_or(|e| p.committed.unwrap_or(p.low) >= e.2)
            });
            if caught_up {
                progress.show(total, total);
                progress.finish();
                break;
            }
            wait_or_fail(&mut running, deadline, "reading the topics' history").await?;
        }
        // 3. Everything the live group applied, without holding it back...
        let mut conn = pool.acquire().await?;
        while analytics::missing_from_rebuild(&mut conn, &starts).await? > 0 {
            wait_or_fail(&mut running, deadline, "catching up with the live group").await?;
        }
        drop(conn);
        // ...then holding it back for the last few.
        let mut tx = pool.begin().await?;
        analytics::hold_live_writes(&mut tx).await?;
        let hold = Instant::now() + SWAP_HOLD;
        while analytics::missing_from_rebuild(&mut tx, &starts).await? > 0 {
            wait_or_fail(
                &mut running,
                hold.min(deadline),
                "taking in the live group's last events",
            )
            .await?;
        }
        stop.cancel();
        (&mut running).await.context("the rebuild's consumer")??;
        if !drop_missing {
            let lost = analytics::lost_by_rebuild(&mut tx).await?;
            if !lost.is_empty() {
                let shown: Vec<String> = lost.iter().take(10).map(ToString::to_string).collect();
                anyhow::bail!(
                    "the rebuild lacks facts of {} order(s) the live warehouse holds (placed before \
                     --from, before retention deleted the log's start, or written by hand): {}{}; \
                     not swapping (--drop-missing swaps anyway and drops them)",
                    lost.len(),
                    shown.join(", "),
                    if lost.len() > shown.len() { ", …" } else { "" }
                );
            }
        }
        analytics::swap_in_rebuild(&mut tx, &starts).await?;
        tx.commit().await?;
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    if !running.is_finished() {
        let _ = running.await;
    }
    result.context("the live warehouse is unchanged")?;

    let (orders, lines): (i64, i64) = sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {0}.orders), (SELECT count(*) FROM {0}.order_lines)",
        analytics::DB_SCHEMA
    ))
    .fetch_one(&pool)
    .await
    .map_err(anyhow::Error::from)?;
    let seconds = started.elapsed().as_secs_f64();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "swapped": true, "records": total, "orders": orders, "order_lines": lines,
                "seconds": seconds,
            })
        ),
        Output::Table => println!(
            "analytics rebuilt from {total} record(s) in {seconds:.1}s and swapped in: {orders} orders, {lines} order lines"
        ),
    }
    Ok(())
}

/// Waits a moment before the next check; fails if the deadline passed or the rebuild's consumer
/// stopped.
async fn wait_or_fail(
    running: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    deadline: Instant,
    doing: &str,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        Instant::now() < deadline,
        "timed out {doing}; pass a longer --timeout"
    );
    tokio::select! {
        finished = &mut *running => {
            finished.context("the rebuild's consumer")??;
            anyhow::bail!("the rebuild's consumer stopped while {doing}")
        }
        () = tokio::time::sleep(Duration::from_millis(250)) => Ok(()),
    }
}
