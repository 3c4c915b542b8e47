#!/usr/bin/env bash
# make down: stops what make up-kafka started: the compose stack, or exactly the local processes
# named by the pid files in $KEEL_RUN_DIR, newest first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
stack="${KEEL_STACK:-$(cat "$RUN_DIR/stack" 2>/dev/null || echo local)}"
if [[ "$stack" == compose ]]; then
  say "Stopping the compose stack (volumes kept: docker compose -f compose/docker-compose.yml down -v drops them)"
  docker compose -f compose/docker-compose.yml down
else
  for name in cache-invalidation analytics notification inventory relay order-service registry tansu; do
    stop "$name"
  done
fi
rm -f "$RUN_DIR/stack"
