#!/usr/bin/env bash
# Memory of window state across checkpoints: a tumbling 1-hour window grouped by
# device over KEYS devices (default 400,000), fed over HTTP by the load tester (two
# events per device), with a checkpoint every second. Reports the window state gauge,
# the process's peak RSS (VmHWM) and RSS after five more checkpoints, and the mean
# checkpoint time. A checkpoint writes every window's state into its file; the peak
# shows whether it also held a copy of the state in memory meanwhile. Then the service
# is stopped (SIGTERM) and started again: the restart's peak RSS and the time until it
# answers /health (the state restored) show what a restore costs.
#
#   scripts/bench-state.sh                       # release build of this checkout
#   SLUICE=/path/to/other/sluice scripts/bench-state.sh   # another build, to compare
#   S3=1 scripts/bench-state.sh                  # the lake on a SeaweedFS of its own
#                                                # (the test virtualenv's `weed`)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
release_bins
SLUICE="${SLUICE:-$BIN/sluice}"
KEYS="${KEYS:-400000}"
WORK=$(mktemp -d)
PID=
WEED=
cleanup() {
  # The service first: its last commit needs the S3 server.
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ -n "$WEED" ] && kill "$WEED" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
port=$(free_port)
LAKE="$WORK/lake"
if [ -n "${S3:-}" ]; then
  VENV="${SLUICE_TEST_VENV:-$HOME/.cache/sluice/test-venv}"
  [ -x "$VENV/bin/weed" ] || { echo "S3=1 needs $VENV/bin/weed (./scripts/test.sh installs it)" >&2; exit 1; }
  s3_port=$(free_port)
  mapfile -t ports < <(weed_port_flags)
  export AWS_ACCESS_KEY_ID=sluice-bench AWS_SECRET_ACCESS_KEY=sluice-bench-secret
  mkdir -p "$WORK/weed"
  "$VENV/bin/weed" mini -dir="$WORK/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$s3_port" "${ports[@]}" >"$WORK/weed.log" 2>&1 &
  WEED=$!
  wait_port "$s3_port"
  for _ in $(seq 1 100); do
    "$VENV/bin/python" -c "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$s3_port', region_name='us-east-1').create_bucket(Bucket='bench')" 2>/dev/null && break
    sleep 0.2
  done
  LAKE="s3://bench/lake"
fi

cat >"$WORK/state.toml" <<CONF
[lake]
checkpoint_interval = "1s"
[streams.telemetry]
schema = "telemetry"
[windows.hourly]
input = "telemetry"
kind = "tumbling"
size = "1h"
group_by = ["device_id"]
select = ["count(*) AS n", "avg(temperature) AS t_avg", "max(temperature) AS t_max", "min(battery) AS b_min"]
CONF
if [ -n "${S3:-}" ]; then
  printf '[lake.s3]\nendpoint = "http://127.0.0.1:%s"\npath_style = true\nallow_http = true\n' \
    "$s3_port" >>"$WORK/state.toml"
fi
start_service() {
  SLUICE_LOG=warn "$SLUICE" run --config "$WORK/state.toml" --data-dir "$LAKE" \
    --http-listen "127.0.0.1:$port" &
  PID=$!
  # /health answers 503 until the lake is recovered and the state restored.
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.1; done
}
start_service
metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s += $2} END {printf "%.0f", s}'; }

"$BIN/sluice-loadtest" telemetry --target "http://127.0.0.1:$port" --devices "$KEYS" \
  --rate 100000 --duration "$((KEYS * 2 / 100000))s" --connections 2 --no-progress >/dev/null
start=$(metric sluice_checkpoints_total)
until [ "$(metric sluice_checkpoints_total)" -ge $((start + 5)) ]; do sleep 0.5; done

state=$(metric sluice_window_state_bytes)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
secs=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^sluice_checkpoint_seconds_sum/ {s=$2} /^sluice_checkpoint_seconds_count/ {c=$2} END {printf "%.3f", s / c}')
if [ -z "${S3:-}" ]; then
  newest=$(ls -d "$WORK/lake/_state/"* | tail -1)
  snapshot=$(du -k "$newest" | tail -1 | cut -f1)
  printf 'window state %d MB over %d keys; one checkpoint state file %d MB\n' \
    $((state / 1048576)) "$KEYS" $((snapshot / 1024))
else
  printf 'window state %d MB over %d keys (lake on S3)\n' $((state / 1048576)) "$KEYS"
fi
printf 'peak RSS %d MB; RSS after 5 more checkpoints %d MB; mean checkpoint %s s\n' \
  $((hwm / 1024)) $((rss / 1024)) "$secs"

kill -TERM "$PID"
wait "$PID" || true
started=$(date +%s%N)
start_service
ready=$(( ($(date +%s%N) - started) / 1000000 ))
restored=$(metric sluice_window_state_bytes)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
printf 'restart: healthy after %d ms with %d MB of window state; peak RSS %d MB\n' \
  "$ready" $((restored / 1048576)) $((hwm / 1024))
