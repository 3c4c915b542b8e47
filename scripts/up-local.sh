#!/usr/bin/env bash
# make up-kafka (local stack): tansu, keel's registry, migrations, topics, the order service, the
# relay and the four consumer groups, all on loopback, logs and pid files in $KEEL_RUN_DIR (.run).
# Running it again starts only what is not running.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

check_services
ensure_tansu
say "Building keel"
KEEL="$(keel_bin)"

# Fail now, naming the key, rather than in every background process.
"$KEEL" settings >/dev/null

start_tansu tansu 9092 "${TANSU_STORAGE:-memory://tansu/}"
"$KEEL" migrate
"$KEEL" topics create
start registry "$KEEL" registry
wait_for "the schema registry" 30 curl -fsS http://127.0.0.1:8081/ready
start order-service "$KEEL" order-service
wait_for "the order service" 30 curl -fsS http://127.0.0.1:8080/ready
start relay "$KEEL" relay
for group in inventory notification analytics cache-invalidation; do
  start "$group" "$KEEL" consume "$group"
done

cat <<MSG

keel is up (local stack: tansu, no Docker):
  order API        http://127.0.0.1:8080   (POST /orders, GET /orders/{id}, /health, /ready)
  schema registry  http://127.0.0.1:8081   (Confluent REST API)
  Kafka broker     127.0.0.1:9092          (tansu $TANSU_VERSION, ${TANSU_STORAGE:-memory://tansu/})
  PostgreSQL       ${KEEL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/keel}
  consumer groups  inventory, notification, analytics, cache-invalidation
  mail             ${KEEL_MAIL_DIR:-.run/mail}/*.eml  (KEEL_SMTP_URL=smtp://host:25 to send)
  logs, pid files  $RUN_DIR

Try it:  make demo      Stop it:  make down
MSG
