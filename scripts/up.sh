#!/usr/bin/env bash
# make up-kafka: the compose stack (real Apache Kafka, Confluent Schema Registry, Jaeger,
# Prometheus, Mailpit) when a Docker engine answers, the local stack (tansu) otherwise.
# KEEL_STACK=local|compose chooses explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

stack="${KEEL_STACK:-}"
if [[ -z "$stack" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    stack=compose
    say "A Docker engine answers: starting the compose stack (KEEL_STACK=local for tansu)"
  else
    stack=local
    say "No Docker engine: starting the local stack on tansu (KEEL_STACK=compose to insist)"
  fi
fi
mkdir -p "$RUN_DIR"
case "$stack" in
  local) echo local >"$RUN_DIR/stack"; exec scripts/up-local.sh ;;
  compose) echo compose >"$RUN_DIR/stack"; exec scripts/up-compose.sh ;;
  *) die "KEEL_STACK=$stack: expected local or compose" ;;
esac
