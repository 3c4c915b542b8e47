# Shared by keel's scripts: service checks, tansu, and background processes with pid files.
# shellcheck shell=bash

RUN_DIR="${KEEL_RUN_DIR:-$PWD/.run}"
TANSU_VERSION=0.6.0
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/keel"
TANSU_ROOT="$CACHE_DIR/tansu-$TANSU_VERSION"
TANSU="${KEEL_TANSU:-$TANSU_ROOT/bin/tansu}"

say() { printf '\033[1m==>\033[0m %s\n' "$*"; }
die() { printf 'keel: %s\n' "$*" >&2; exit 1; }

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "$what did not come up within ${seconds}s (logs: $RUN_DIR)"
    fi
    sleep 0.2
  done
}

# check_services: PostgreSQL and Redis must be running; say which is not and how to start it.
check_services() {
  local missing=0
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && ! port_open 127.0.0.1 5432; then
    echo "keel: PostgreSQL is not reachable on 127.0.0.1:5432. Start it with:" >&2
    echo "  pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    missing=1
  fi
  if ! port_open 127.0.0.1 6379; then
    echo "keel: Redis is not reachable on 127.0.0.1:6379. Start it with:" >&2
    echo "  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save \"\" --appendonly no" >&2
    missing=1
  fi
  ((missing == 0)) || exit 1
}

# ensure_tansu: installs tansu once per machine, outside the checkout, so every clone reuses it.
ensure_tansu() {
  if [[ -x "$TANSU" ]]; then return; fi
  say "Installing tansu $TANSU_VERSION into $TANSU_ROOT (once per machine; about 11 minutes)"
  cargo install "tansu@$TANSU_VERSION" --locked --features dynostore,libsql --root "$TANSU_ROOT" \
    || die "cargo install tansu@$TANSU_VERSION failed"
}

# ensure_venv REQUIREMENTS: a virtualenv with REQUIREMENTS installed, made once per machine and
# remade when the file changes; prints its bin directory.
ensure_venv() {
  local req=$1
  local venv="$CACHE_DIR/py-$(basename "$(dirname "$req")")-$(sha256sum "$req" | cut -c1-12)"
  # Built in place (scripts in a venv name its path) and marked complete at the end, so an
  # interrupted install is redone.
  if [[ ! -f "$venv/.complete" ]]; then
    command -v python3 >/dev/null || die "python3 is missing (apt install python3-venv)"
    say "Installing $req into $venv (once per machine)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed (apt install python3-venv?)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2 \
      || die "pip install -r $req failed"
    touch "$venv/.complete"
  fi
  echo "$venv/bin"
}

# ensure_interop_python: the independent Confluent client the interop tests run
# (cli/tests/interop/requirements.txt); prints the interpreter's path.
ensure_interop_python() {
  echo "$(ensure_venv cli/tests/interop/requirements.txt)/python"
}

# running NAME: true when NAME's pid file names a live process.
running() {
  local pid_file="$RUN_DIR/$1.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

# start NAME COMMAND...: runs COMMAND in the background, logging to RUN_DIR/NAME.log, unless
# NAME is already running.
start() {
  local name=$1; shift
  mkdir -p "$RUN_DIR"
  if running "$name"; then
    say "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"
    return
  fi
  nohup "$@" >>"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
  say "Started $name (pid $!, log $RUN_DIR/$name.log)"
}

# stop NAME: SIGTERM, then SIGKILL after 15 s; removes the pid file.
stop() {
  local name=$1 pid_file="$RUN_DIR/$1.pid"
  [[ -f "$pid_file" ]] || return 0
  local pid; pid=$(cat "$pid_file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      say "Killed $name (pid $pid) after 15 s"
    else
      say "Stopped $name (pid $pid)"
    fi
  fi
  rm -f "$pid_file"
}

# start_tansu NAME PORT STORAGE
start_tansu() {
  start "$1" "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$2" \
    --advertised-listener-url "tcp://127.0.0.1:$2" \
    --storage-engine "$3"
  wait_for "tansu on 127.0.0.1:$2" 30 port_open 127.0.0.1 "$2"
}

# keel_bin: builds the keel binary of this checkout (quietly, when stale) and prints its path.
keel_bin() {
  cargo build --quiet --locked -p keel >&2 || die "cargo build -p keel failed"
  echo "$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/debug/keel"
}
