#!/usr/bin/env bash
# The keel CLI of this checkout, built when stale, run from the repository root (where
# topics.toml and schemas/ are): `scripts/keel.sh lag`, `scripts/keel.sh dlq list inventory`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
KEEL="$(keel_bin)"
exec "$KEEL" "$@"
