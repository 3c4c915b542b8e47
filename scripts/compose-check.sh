#!/usr/bin/env bash
# make compose-check: what can be checked of compose/ and the Dockerfile without a Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
BIN="$(ensure_venv compose/check-requirements.txt)"
say "The compose file against the Compose Specification's JSON schema"
"$BIN/check-jsonschema" --builtin-schema vendor.compose-spec compose/docker-compose.yml
say "Images pinned, healthchecks, ports, settings, Prometheus targets"
"$BIN/python" compose/check.py
say "Dockerfile (hadolint)"
"$BIN/hadolint" Dockerfile
if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  say "docker compose config"
  docker compose -f compose/docker-compose.yml config --quiet
fi
