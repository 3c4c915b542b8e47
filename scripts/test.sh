#!/usr/bin/env bash
# make test: everything the tests need, then the tests. A broker of its own on 127.0.0.1:19092
# (so a running `make up-kafka` is not disturbed), stopped when the tests end, pass or fail.
# TEST_KAFKA_BROKERS=host:port runs them against that broker instead (the compose stack's Apache
# Kafka: TEST_KAFKA_BROKERS=localhost:9092 make test); TEST_KAFKA_BROKERS=mock, against
# librdkafka's three-broker mock cluster only. The end-to-end tests then run a second time, on
# the mock cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

check_services
TEST_INTEROP_PYTHON="$(ensure_interop_python)"
export TEST_INTEROP_PYTHON
export KEEL_RUN_DIR="$RUN_DIR/test"
RUN_DIR="$KEEL_RUN_DIR"
if [[ -n "${TEST_KAFKA_BROKERS:-}" ]]; then
  say "Testing against the broker at $TEST_KAFKA_BROKERS"
else
  ensure_tansu
  trap 'stop tansu-test' EXIT
  stop tansu-test # a leftover from an interrupted run
  start_tansu tansu-test 19092 memory://tansu/
  export TEST_KAFKA_BROKERS=127.0.0.1:19092
  # tansu 0.6's wrong answers: the services work around them, the tests expect them.
  export KEEL_BROKER_QUIRKS=tansu
fi
export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432

# Databases left by tests that were interrupted (a test drops its own when it ends).
psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
  "SELECT datname FROM pg_database WHERE datname LIKE 'keel\_test\_%'" |
  while read -r db; do psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"; done

cargo test --workspace --locked "$@"

# The end-to-end tests again on a replicated cluster: librdkafka's mock cluster (three brokers,
# three replicas per partition, Apache Kafka's answers, no quirks), made in the test process and
# used by the `keel` processes the tests start (core/src/testkit/cluster.rs).
if [[ "$TEST_KAFKA_BROKERS" != mock ]]; then
  say "The end-to-end tests on a three-broker cluster (librdkafka's mock cluster)"
  TEST_KAFKA_BROKERS=mock KEEL_BROKER_QUIRKS= cargo test --locked -p keel --test e2e "$@"
fi
