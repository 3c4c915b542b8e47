# keel's front door. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

.PHONY: help up-kafka down demo test build fmt lint schema-check schema-publish install-tansu replay-analytics compose-check bench chaos

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

up-kafka: ## Start the backbone (compose if a Docker engine answers, else tansu; KEEL_STACK=local|compose)
	@scripts/up.sh

down: ## Stop exactly what up-kafka started
	@scripts/down.sh

demo: ## Place a few orders through the API of a running backbone and show what the groups did
	@scripts/demo.sh

replay-analytics: ## Rebuild the analytics warehouse from the topics and swap it in (backbone running)
	@scripts/keel.sh analytics rebuild

test: ## Run every test; starts (and stops) the broker they need
	@scripts/test.sh

bench: ## Throughput and latency against raw baselines (bench/README.md); ARGS="--rows 100000" to scale
	@scripts/bench.sh $(ARGS)

chaos: ## Faults, restarts and bad input under load, each audited (keel audit); ARGS="--quick" is CI's form
	@scripts/chaos.sh $(ARGS)

build: ## Build the keel binary
	cargo build -p keel

fmt: ## Format the code
	cargo fmt --all

lint: ## Check formatting and lints
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

compose-check: ## Check compose/ and the Dockerfile without Docker: schema, pins, ports, settings, hadolint
	@scripts/compose-check.sh

schema-check: ## Check every Avro contract against its published versions (no registry needed)
	cargo run --quiet --locked -p keel -- schema check --dir schemas

schema-publish: ## Record changed, compatible contracts as their next published versions
	cargo run --quiet --locked -p keel -- schema publish --dir schemas

install-tansu: ## Install tansu 0.6.0 (done by up-kafka and test when missing)
	@source scripts/lib.sh && ensure_tansu
