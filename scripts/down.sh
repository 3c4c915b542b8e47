#!/usr/bin/env bash
# make down: stops exactly what make up-kafka started (the pid files in $KEEL_RUN_DIR), newest first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
for name in inventory relay order-service registry tansu; do
  stop "$name"
done
