"""Static checks of compose/ and the Dockerfile, for machines without a Docker engine.

Run by `make compose-check` (and CI) after the compose file was validated against the Compose
Specification's JSON schema. Checks what the schema cannot: pinned images, healthchecks and the
dependencies that wait on them, unique host ports, keel's settings (known keys, every connection
pointing at a service of this file), Prometheus targets, mounted files. Exits 1 listing every
problem found.
"""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
PROMETHEUS = ROOT / "compose" / "prometheus.yml"
SETTINGS = ROOT / "core" / "src" / "settings.rs"

# Services whose images ship no shell or HTTP client, so no healthcheck can run inside them,
# and the one-shot init step (waited on with service_completed_successfully instead).
NO_HEALTHCHECK = {
    "jaeger": "distroless image",
    "otel-collector": "distroless image",
    "keel-init": "one-shot; others wait for it to complete",
}
# Connection settings every keel service needs, and the service each must point at.
CONNECTIONS = {
    "KEEL_DATABASE_URL": "postgres",
    "KEEL_KAFKA_BROKERS": "kafka",
    "KEEL_SCHEMA_REGISTRY_URL": "schema-registry",
    "KEEL_REDIS_URL": "redis",
    "KEEL_SMTP_URL": "mailpit",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "otel-collector",
}


def known_keys() -> set[str]:
    text = SETTINGS.read_text()
    table = text[text.index("pub const KEYS") :]
    table = table[: table.index("];")]
    return set(re.findall(r'"(KEEL_[A-Z0-9_]+)"', table))


def host_of(value: str) -> str:
    """The host in a URL or host:port list entry."""
    value = value.split("://", 1)[-1]
    value = value.split("@", 1)[-1]
    return value.split("/", 1)[0].split(",", 1)[0].rsplit(":", 1)[0]


def registry_auth_problems(svc: dict) -> list[str]:
    """Confluent's registry must require basic auth: method, realm, roles, a JAAS file mounted
    in whose realm is the one configured, and the password from compose/.env."""
    env = svc.get("environment") or {}
    problems = []
    if env.get("SCHEMA_REGISTRY_AUTHENTICATION_METHOD") != "BASIC":
        problems.append("the registry does not require basic auth (SCHEMA_REGISTRY_AUTHENTICATION_METHOD: BASIC)")
    realm = env.get("SCHEMA_REGISTRY_AUTHENTICATION_REALM")
    if not realm or not env.get("SCHEMA_REGISTRY_AUTHENTICATION_ROLES"):
        problems.append("basic auth needs SCHEMA_REGISTRY_AUTHENTICATION_REALM and _ROLES")
    opts = str(env.get("SCHEMA_REGISTRY_OPTS", ""))
    jaas = re.search(r"-Djava\.security\.auth\.login\.config=(\S+)", opts)
    mounts = {
        m.split(":")[1]: COMPOSE.parent / m.split(":")[0]
        for m in (svc.get("volumes") or [])
        if isinstance(m, str) and m.startswith("./")
    }
    if not jaas or jaas.group(1) not in mounts:
        problems.append("SCHEMA_REGISTRY_OPTS names no JAAS file mounted from compose/")
    elif realm and not re.search(rf"^\s*{re.escape(realm)}\s*\{{", mounts[jaas.group(1)].read_text(), re.M):
        problems.append(f"the JAAS file has no {realm} realm")
    if "${KEEL_REGISTRY_PASSWORD" not in str(env.get("KEEL_REGISTRY_PASSWORD", "")):
        problems.append("the registry's password does not come from compose/.env (KEEL_REGISTRY_PASSWORD)")
    if "KEEL_REGISTRY_PASSWORD" not in " ".join(map(str, svc.get("command") or [])):
        problems.append("the registry's password file is not written from KEEL_REGISTRY_PASSWORD")
    return problems


def main() -> int:
    problems: list[str] = []
    compose = yaml.safe_load(COMPOSE.read_text())
    services: dict = compose["services"]
    keys = known_keys()
    host_ports: dict[str, str] = {}

    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" in svc:
            if not image.startswith("keel:"):
                problems.append(f"{name}: a built service is tagged keel:<tag>, not {image!r}")
        elif not image.startswith("keel:"):
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            if not tag or tag == "latest" or not re.search(r"\d", tag):
                problems.append(f"{name}: image {image!r} is not pinned to a version tag")
        if image.startswith("keel:") and "build" not in svc:
            if not any("build" in s and s.get("image") == image for s in services.values()):
                problems.append(f"{name}: uses {image} but no service builds it")

        if "healthcheck" not in svc and name not in NO_HEALTHCHECK:
            problems.append(f"{name}: no healthcheck (and not listed in NO_HEALTHCHECK)")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
                continue
            condition = cond.get("condition") if isinstance(cond, dict) else None
            if condition == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

        for port in svc.get("ports", []):
            parts = str(port).split(":")
            if len(parts) < 2:
                problems.append(f"{name}: port {port!r} publishes a random host port; pin it")
                continue
            if len(parts) < 3 or parts[0] != "127.0.0.1":
                problems.append(f"{name}: port {port!r} is published on every host interface; bind it to 127.0.0.1")
            host = parts[-2]
            if host in host_ports:
                problems.append(f"{name}: host port {host} already used by {host_ports[host]}")
            host_ports[host] = name

        for source in (svc.get("volumes") or []):
            if isinstance(source, str) and source.startswith("./"):
                path = COMPOSE.parent / source.split(":", 1)[0]
                if not path.exists():
                    problems.append(f"{name}: mounts {path}, which does not exist")

        env = svc.get("environment") or {}
        if image.startswith("keel:"):
            for key in env:
                if key.startswith("KEEL_") and key not in keys:
                    problems.append(f"{name}: {key} is not a setting keel knows (a typo stops it at start-up)")
            for key, target in CONNECTIONS.items():
                if key not in env:
                    problems.append(f"{name}: {key} is not set (its default points at the host's loopback)")
                elif host_of(str(env[key])) != target:
                    problems.append(f"{name}: {key}={env[key]} does not point at service {target}")
        for key, value in env.items():
            if "${" in str(value) and ":-" not in str(value) and ":?" not in str(value):
                problems.append(f"{name}: {key} interpolates a variable without a default or a message")
        if env.get("POSTGRES_HOST_AUTH_METHOD") == "trust":
            problems.append(f"{name}: PostgreSQL trusts every connection; set POSTGRES_PASSWORD")
        for key in ("KEEL_DATABASE_URL", "KEEL_REDIS_URL", "KEEL_SCHEMA_REGISTRY_URL"):
            if key in env and "${" not in str(env[key]):
                problems.append(f"{name}: {key} carries no password from compose/.env")
        if image.startswith("keel:") and not re.match(
            r"^https?://[^:/@]+:\$\{KEEL_REGISTRY_PASSWORD[^}]*\}@", str(env.get("KEEL_SCHEMA_REGISTRY_URL", ""))
        ):
            problems.append(f"{name}: KEEL_SCHEMA_REGISTRY_URL carries no user:${{KEEL_REGISTRY_PASSWORD}} from compose/.env")
        if image.startswith("confluentinc/cp-schema-registry"):
            problems.extend(f"{name}: {p}" for p in registry_auth_problems(svc))

    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    for job in prometheus["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                svc = services.get(host)
                if svc is None:
                    problems.append(f"prometheus job {job['job_name']}: {host} is not a service")
                    continue
                env = svc.get("environment") or {}
                serves = {
                    str(env.get("KEEL_ADMIN_ADDR", "")).rsplit(":", 1)[-1],
                    str(env.get("KEEL_ORDER_SERVICE_ADDR", "")).rsplit(":", 1)[-1]
                    if svc.get("command") == ["order-service"]
                    else "",
                }
                if port not in serves:
                    problems.append(f"prometheus job {job['job_name']}: {host} does not serve /metrics on {port}")

    for problem in problems:
        print(f"compose-check: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"compose-check: {len(services)} services, {len(host_ports)} host ports: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
