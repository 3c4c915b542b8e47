#!/usr/bin/env bash
# make demo: places orders through the HTTP API of a running stack and shows what the consumer
# groups did: inventory's reservations, the mails sent, the analytics figures.
set -euo pipefail
cd "$(dirname "$0")/.."
API=${API:-http://127.0.0.1:8080}
DB=${KEEL_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/keel}
# The compose stack's PostgreSQL takes the password make up-kafka wrote to compose/.env.
if [[ -z "${KEEL_DATABASE_URL:-}" && "$(cat "${KEEL_RUN_DIR:-.run}/stack" 2>/dev/null)" == compose && -f compose/.env ]]; then
  DB="postgres://postgres:$(sed -n 's/^KEEL_POSTGRES_PASSWORD=//p' compose/.env)@127.0.0.1:5432/keel"
fi
curl -fsS "$API/ready" >/dev/null || { echo "keel: the order service is not up at $API; run make up-kafka" >&2; exit 1; }

order() {
  curl -fsS -X POST "$API/orders" -H 'content-type: application/json' -d "{
    \"customer\": {\"id\": \"$1\", \"email\": \"$1@example.com\", \"name\": \"Demo $1\"},
    \"currency\": \"EUR\",
    \"lines\": [{\"sku\": \"SKU-1\", \"quantity\": $2, \"unit_price_minor\": 1250},
                {\"sku\": \"SKU-2\", \"quantity\": 1, \"unit_price_minor\": 399}]}" | jq -r .id
}

a=$(order alice 2); b=$(order bob 3); c=$(order carol 1)
curl -fsS -X POST "$API/orders/$a/pay" >/dev/null
curl -fsS -X POST "$API/orders/$b/cancel" -H 'content-type: application/json' -d '{"reason": "changed mind"}' >/dev/null
echo "Placed orders: $a (paid), $b (cancelled), $c (open)"

# Poll until inventory has handled all five events (or give up after 30 s).
ids="'$a','$b','$c'"
deadline=$((SECONDS + 30))
until [[ $(psql "$DB" -Atc "SELECT count(*) FROM inventory.reservations WHERE order_id IN ($ids) AND status IN ('fulfilled','released','reserved')") == 3 &&
         $(psql "$DB" -Atc "SELECT count(*) FROM inventory.reservations WHERE order_id IN ($ids) AND status <> 'reserved'") == 2 ]]; do
  ((SECONDS < deadline)) || { echo "keel: inventory did not catch up in 30 s; see .run/*.log" >&2; exit 1; }
  sleep 0.2
done

echo; echo "Inventory reservations:"
psql "$DB" -c "SELECT order_id, status FROM inventory.reservations WHERE order_id IN ($ids) ORDER BY updated_at"
echo "Stock:"
psql "$DB" -c "SELECT sku, on_hand, reserved, on_hand - reserved AS available FROM inventory.stock WHERE sku IN ('SKU-1','SKU-2') ORDER BY sku"

# Notification and analytics run at their own pace: poll for the demo's five events + outcomes.
deadline=$((SECONDS + 30))
until [[ $(psql "$DB" -Atc "SELECT count(*) FROM notification.messages WHERE order_id IN ($ids) AND delivered_at IS NOT NULL") -ge 5 ]]; do
  ((SECONDS < deadline)) || { echo "keel: notification did not catch up in 30 s; see .run/notification.log" >&2; exit 1; }
  sleep 0.2
done
echo "Mails sent (one .eml each in ${KEEL_MAIL_DIR:-.run/mail}):"
psql "$DB" -c "SELECT recipient, kind, subject FROM notification.messages WHERE order_id IN ($ids) ORDER BY created_at"
echo "Analytics (all time, per day and currency):"
psql "$DB" -c "SELECT * FROM analytics.daily ORDER BY day, currency"
