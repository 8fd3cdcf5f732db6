#!/usr/bin/env bash
# The whole test suite against real services. Installs what is missing (mosquitto
# from Debian; duckdb + pyarrow into a virtualenv), starts mosquitto on a free loopback
# port, runs the workspace tests, and stops what it started.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -E 'test(e2e)'  # extra args go to cargo nextest
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

# --- install -----------------------------------------------------------------
if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
  log "installing mosquitto"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi
# Prefer the packaged binary even when /usr/sbin is not on PATH.
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

VENV="${SLUICE_TEST_VENV:-$HOME/.cache/sluice/test-venv}"
if ! "$VENV/bin/python" -c 'import duckdb, pyarrow' 2>/dev/null; then
  log "installing duckdb and pyarrow into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check duckdb pyarrow
fi

# --- start -------------------------------------------------------------------
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # name port
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  log "$1 did not start on port $2"; return 1
}

MQTT_PORT=$(free_port)
cat > "$WORK/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_inflight_messages 0
CONF
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
wait_port mosquitto "$MQTT_PORT"
log "mosquitto on 127.0.0.1:$MQTT_PORT"

export SLUICE_TEST_MOSQUITTO="127.0.0.1:$MQTT_PORT"
export SLUICE_TEST_PYTHON="$VENV/bin/python"

# --- test --------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
