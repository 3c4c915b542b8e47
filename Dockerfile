# keel's services, one image: `keel <command>` (order-service, relay, consume <group>, ...).
# Dependencies are cooked in their own layer (cargo-chef), so a source change rebuilds only keel.
# Checked by `make compose-check` (hadolint).

FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# librdkafka and OpenSSL are built from source by rdkafka-sys and openssl-src (bundled,
# static): they need make and perl, which the rust image has; nothing else to install.
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --package keel
COPY . .
RUN cargo build --release --locked --package keel

FROM debian:12.12-slim AS runtime
# curl: the healthchecks; ca-certificates: TLS to managed services if configured.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends ca-certificates=20230311* curl=7.88.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin keel
WORKDIR /app
COPY --from=builder /src/target/release/keel /usr/local/bin/keel
COPY schemas /app/schemas
COPY topics.toml /app/topics.toml
USER 10001
ENV KEEL_TOPICS_FILE=/app/topics.toml
ENTRYPOINT ["keel"]
CMD ["--help"]
