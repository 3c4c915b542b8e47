#!/usr/bin/env bash
# make chaos: keel's services under faults, each scenario audited with `keel audit`. Each
# scenario starts a broker of its own (tansu; on SQLite for broker-restart) and a database of its
# own on the local PostgreSQL, with Redis on loopback; everything is stopped and dropped at the end. Arguments go to the runner:
# make chaos ARGS="--quick" (CI's short form), ARGS="--only poison,relay-kill --rounds 5".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

check_services
ensure_tansu
# Every scenario runs on tansu: its wrong answers are worked around behind this one switch.
export KEEL_BROKER_QUIRKS=tansu
say "Building keel and the chaos runner"
cargo build --quiet --locked -p keel -p keel-chaos
TARGET="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/debug"
export KEEL_RUN_DIR="$RUN_DIR/chaos"
RUN_DIR="$KEEL_RUN_DIR"
# Databases left by an interrupted run (a scenario drops its own when it ends).
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'keel\_chaos\_%'" |
  while read -r db; do psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"; done
export CHAOS_KEEL_BIN="$TARGET/keel" CHAOS_TANSU="$TANSU" CHAOS_LOGS="$RUN_DIR"
export CHAOS_POSTGRES=127.0.0.1:5432 CHAOS_REDIS=127.0.0.1:6379
# In a process group of its own, so that an interrupted run takes every keel process with it.
setsid "$TARGET/keel-chaos" "$@" &
runner=$!
trap 'kill -- -$runner 2>/dev/null || true' EXIT
wait $runner
