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
# tansu 0.6's wrong answers are worked around behind this one switch (README, "Brokers").
export KEEL_BROKER_QUIRKS=tansu
"$KEEL" migrate
"$KEEL" topics create
start registry "$KEEL" registry
wait_for "the schema registry" 30 curl -fsS http://127.0.0.1:8081/ready
start order-service "$KEEL" order-service
wait_for "the order service" 30 curl -fsS http://127.0.0.1:8080/ready
# Each background process serves /health, /ready and /metrics on its own port.
KEEL_ADMIN_ADDR=127.0.0.1:9101 start relay "$KEEL" relay
# tansu answers a fetch only when its wait runs out: a short wait is a short hop, and costs CPU
# while idle (measured: 50 ms 9% of a core, 10 ms 17%, 5 ms 25%; bench/README.md).
export KEEL_CONSUMER_FETCH_WAIT_MS="${KEEL_CONSUMER_FETCH_WAIT_MS:-10}"
port=9102
for group in inventory notification analytics cache-invalidation; do
  # Static membership: a restarted group takes its partitions back without waiting for a rebalance.
  KEEL_ADMIN_ADDR=127.0.0.1:$port KEEL_CONSUMER_INSTANCE_ID=local start "$group" "$KEEL" consume "$group"
  port=$((port + 1))
done

cat <<MSG

keel is up (local stack: tansu, no Docker):
  order API        http://127.0.0.1:8080   (POST /orders, GET /orders/{id}, /health, /ready, /metrics)
  relay            http://127.0.0.1:9101   (/health, /ready, /metrics)
  groups           http://127.0.0.1:9102..9105 (inventory, notification, analytics, cache-invalidation)
  schema registry  http://127.0.0.1:8081   (Confluent REST API)
  Kafka broker     127.0.0.1:9092          (tansu $TANSU_VERSION, ${TANSU_STORAGE:-memory://tansu/})
  PostgreSQL       ${KEEL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/keel}
  consumer groups  inventory, notification, analytics, cache-invalidation
  mail             ${KEEL_MAIL_DIR:-.run/mail}/*.eml  (KEEL_SMTP_URL=smtp://host:25 to send)
  logs, pid files  $RUN_DIR

Try it:  make demo      Stop it:  make down
MSG
