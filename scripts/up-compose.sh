#!/usr/bin/env bash
# make up-kafka (compose stack): builds keel's image and starts compose/docker-compose.yml,
# returning when every healthcheck passes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

command -v docker >/dev/null || die "docker is not installed; run KEEL_STACK=local make up-kafka"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info failed); run KEEL_STACK=local make up-kafka"
docker compose version >/dev/null 2>&1 || die "the docker compose plugin is missing (Compose v2 is required)"
# PostgreSQL's, Redis's and the schema registry's passwords: random, once each, in compose/.env
# (never committed), which docker compose reads for the file beside it. Hex, so they go into
# URLs as they are.
secret() { od -An -tx1 -N16 /dev/urandom | tr -d ' \n'; }
for key in KEEL_POSTGRES_PASSWORD KEEL_REDIS_PASSWORD KEEL_REGISTRY_PASSWORD; do
  if ! grep -q "^${key}=" compose/.env 2>/dev/null; then
    (umask 077 && printf '%s=%s\n' "$key" "$(secret)" >>compose/.env)
    say "Wrote a random ${key} to compose/.env"
  fi
done
say "Building keel's image and starting the compose stack (first build: several minutes)"
docker compose -f compose/docker-compose.yml up --build --detach --wait

cat <<MSG

keel is up (compose stack: Apache Kafka, Confluent Schema Registry):
  order API        http://localhost:8080   (POST /orders, GET /orders/{id}, /health, /ready, /metrics)
  Kafka broker     localhost:9092          (apache/kafka, KRaft; kafka:19092 inside the network)
  schema registry  http://keel:<KEEL_REGISTRY_PASSWORD>@localhost:8081  (Confluent, basic auth; compose/.env)
  PostgreSQL       postgres://postgres:<KEEL_POSTGRES_PASSWORD>@localhost:5432/keel  (compose/.env)
  Redis            redis://:<KEEL_REDIS_PASSWORD>@localhost:6379                     (compose/.env)
  every port is bound to 127.0.0.1
  traces (Jaeger)  http://localhost:16686
  metrics          http://localhost:9090   (Prometheus; keel admin ports 9101-9105)
  mail (Mailpit)   http://localhost:8025

Try it:  make demo      Stop it:  make down      Logs: docker compose -f compose/docker-compose.yml logs -f
MSG
