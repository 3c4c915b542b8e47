//! `make bench`: how fast keel moves events, as ratios against the raw parts measured in the same
//! run on the same machine (absolute numbers on a shared machine are noise; ratios are not).
//!
//! Scenarios (see `bench/README.md`): relay drain, order write path, end-to-end latency at two
//! open-loop arrival rates, consumer catch-up, and each service's peak memory. keel's services
//! run as `keel` processes (the release binary in `BENCH_KEEL_BIN`), so their memory is their own.
//!
//! # Layout
//!
//! - [`bench`]: what every scenario shares: the [`Bench`] (database, broker, registry, keel's
//!   processes), the orders sent, the raw producer, rates and percentiles.
//! - [`relay_drain`](mod@relay_drain): scenario 1, the relay draining a backlog of outbox rows.
//! - [`write_path`](mod@write_path): scenario 2, `POST /orders` against the same transaction
//!   issued directly.
//! - [`end_to_end`](mod@end_to_end): scenario 3, order commit → inventory's commit at 20% and 80%
//!   of the write path's capacity.
//! - [`catch_up`](mod@catch_up): scenario 4, each group working through a backlog.
//! - [`limit`]: each group's effect as hand-written set-based SQL, the catch-up's limit.
//! - [`report`]: the table, the JSON record and the latency plot.
//!
//! This file: the command line, and [`run`], which builds the [`Bench`] and runs the chosen
//! scenarios in order (the write path's capacity feeds the end-to-end rates).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod bench;
mod catch_up;
mod end_to_end;
mod limit;
mod relay_drain;
mod report;
mod write_path;

use bench::{Bench, var};
use catch_up::catch_up;
use end_to_end::end_to_end;
use relay_drain::relay_drain;
use write_path::write_path;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Outbox rows the relay drains (scenario 1).
    #[arg(long, default_value_t = 1_000_000)]
    rows: i64,
    /// Concurrent clients on the order write path (scenario 2).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds each timed window lasts (scenarios 2 and 3).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds the end-to-end run at 80% of the write path's capacity lasts (scenario 3), with
    /// inventory, analytics and cache invalidation applying it.
    #[arg(long, default_value_t = 60)]
    sustain: u64,
    /// Events in the backlog each consumer group catches up on (scenario 4).
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Run only these scenarios (comma separated: drain, write, e2e, catchup).
    #[arg(long, value_delimiter = ',', default_value = "drain,write,e2e,catchup")]
    only: Vec<String>,
    /// Groups the catch-up scenario runs (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "inventory,analytics,cache-invalidation"
    )]
    groups: Vec<String>,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)?;
    let run = chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string();
    let server = var("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432");
    let db_url = format!("{}/keel_bench", server.trim_end_matches('/'));
    keel_core::db::drop_database(&db_url).await?;
    keel_core::db::ensure_database(&db_url).await?;
    let keel_bin = var("BENCH_KEEL_BIN", "target/release/keel");
    let mut keel = keel_core::Settings::from_env().map_err(|e| anyhow::anyhow!("{e}"))?;
    keel.database_url = db_url.clone();
    keel.kafka.brokers = var("BENCH_KAFKA_BROKERS", "127.0.0.1:29092");
    let migrate = Command::new(&keel_bin)
        .arg("migrate")
        .envs(keel.to_env())
        .env("RUST_LOG", "warn")
        .status()
        .with_context(|| format!("running {keel_bin} migrate"))?;
    anyhow::ensure!(migrate.success(), "keel migrate failed");
    let shutdown = CancellationToken::new();
    let (registry, _) =
        keel_schemas::registry::spawn(&db_url, "127.0.0.1:0".parse()?, shutdown.clone()).await?;
    keel.schema_registry_url = format!("http://{registry}");
    let bench = Bench {
        pool: keel_core::db::pool(&db_url, 20).await?,
        brokers: keel.kafka.brokers.clone(),
        registry_url: keel.schema_registry_url.clone(),
        keel_bin,
        run: run.clone(),
        args: args.clone(),
        keel,
    };
    let mut report = report::Report::new(&run, &args_json(&args));
    let only = |s: &str| args.only.iter().any(|o| o == s);
    if only("drain") {
        relay_drain(&bench, &mut report).await?;
    }
    let measured = if only("write") {
        Some(write_path(&bench, &mut report).await?)
    } else {
        None
    };
    if only("e2e") {
        end_to_end(&bench, measured.unwrap_or(500.0), &mut report).await?;
    }
    if only("catchup") {
        catch_up(&bench, measured, &mut report).await?;
    }
    for (service, mib) in report.peak_memory() {
        report.target(&format!("peak RSS {service} (MiB)"), mib, 100.0, false);
    }
    report.finish(&args.out)?;
    shutdown.cancel();
    Ok(())
}

fn args_json(args: &Args) -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        ("rows", json!(args.rows)),
        ("clients", json!(args.clients)),
        ("seconds", json!(args.seconds)),
        ("sustain", json!(args.sustain)),
        ("backlog", json!(args.backlog)),
        ("groups", json!(args.groups)),
    ])
}
