#!/usr/bin/env bash
# make bench: release builds, a broker of the bench's own (tansu, in memory, 127.0.0.1:29092,
# stopped at the end), then the bench binary. Arguments go to it: make bench ARGS="--rows 100000".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

check_services
ensure_tansu
say "Building keel and the bench (release)"
cargo build --quiet --release --locked -p keel -p keel-bench
TARGET="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release"
export KEEL_RUN_DIR="$RUN_DIR/bench"
RUN_DIR="$KEEL_RUN_DIR"
trap 'stop tansu-bench' EXIT
stop tansu-bench
start_tansu tansu-bench 29092 memory://tansu/
export KEEL_BROKER_QUIRKS=tansu
export BENCH_KAFKA_BROKERS=127.0.0.1:29092 BENCH_KEEL_BIN="$TARGET/keel"
# tansu answers a fetch only when its wait runs out, so the wait is every hop's latency there
# (the raw round-trip baseline uses the same value). Apache Kafka answers as soon as data arrives.
# 10 ms, as make up-kafka runs it (bench/README.md: latency against idle CPU).
export KEEL_CONSUMER_FETCH_WAIT_MS="${KEEL_CONSUMER_FETCH_WAIT_MS:-10}"
"$TARGET/keel-bench" "$@"
