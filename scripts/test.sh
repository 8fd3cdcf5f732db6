#!/usr/bin/env bash
# The whole test suite against real services. Installs what is missing (mosquitto
# from Debian; duckdb, pyarrow, moto[server] and confluent-kafka into a virtualenv; the
# tansu Kafka-protocol broker with cargo install, cached), starts mosquitto, tansu and
# moto on free loopback ports, runs the workspace tests, and stops what it started.
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
if ! "$VENV/bin/python" -c 'import duckdb, pyarrow, moto, boto3, confluent_kafka' 2>/dev/null; then
  log "installing duckdb, pyarrow, moto[server] and confluent-kafka into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check duckdb pyarrow 'moto[server]' confluent-kafka
fi

# tansu takes about 10 minutes to build on 2 cores, so the binary is cached outside the
# checkout; a machine without the cache builds it once.
TANSU_VERSION=0.6.0
TANSU_ROOT="${SLUICE_TANSU_ROOT:-$HOME/.cache/sluice/tansu-$TANSU_VERSION}"
TANSU="$TANSU_ROOT/bin/tansu"
if ! [ -x "$TANSU" ]; then
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (about 10 minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --no-default-features \
    --features dynostore,libsql --root "$TANSU_ROOT" --target-dir "$TANSU_ROOT/build" -q
  rm -rf "$TANSU_ROOT/build"
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
max_inflight_messages 1000
CONF
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
PIDS+=($!)
wait_port mosquitto "$MQTT_PORT"
log "mosquitto on 127.0.0.1:$MQTT_PORT"

KAFKA_PORT=$(free_port)
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
wait_port tansu "$KAFKA_PORT"
log "tansu on 127.0.0.1:$KAFKA_PORT"

MOTO_PORT=$(free_port)
"$VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$WORK/moto.log" 2>&1 &
PIDS+=($!)
wait_port moto "$MOTO_PORT"
log "moto (Kinesis, S3) on 127.0.0.1:$MOTO_PORT"

export SLUICE_TEST_MOSQUITTO="127.0.0.1:$MQTT_PORT"
export SLUICE_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
export SLUICE_TEST_KINESIS="http://127.0.0.1:$MOTO_PORT"
export SLUICE_TEST_PYTHON="$VENV/bin/python"
# For tests that stop and restart a Kafka-protocol broker of their own.
export SLUICE_TEST_TANSU_BIN="$TANSU"

# --- test --------------------------------------------------------------------
# The end-to-end tests run the load tester's binary too; nextest builds only the
# binaries of the package under test, so build it first.
cargo build -q -p sluice-loadtest --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
