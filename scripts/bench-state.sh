#!/usr/bin/env bash
# Memory of window state across checkpoints: a tumbling 1-hour window grouped by
# device over KEYS devices (default 400,000), fed over HTTP by the load tester (two
# events per device), with a checkpoint every second. Reports the window state gauge,
# the process's peak RSS (VmHWM) and RSS after five more checkpoints, and the mean
# checkpoint time. A checkpoint writes every window's state into its file; the peak
# shows whether it also held a copy of the state in memory meanwhile.
#
#   scripts/bench-state.sh                       # release build of this checkout
#   SLUICE=/path/to/other/sluice scripts/bench-state.sh   # another build, to compare
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib.sh
release_bins
SLUICE="${SLUICE:-$BIN/sluice}"
KEYS="${KEYS:-400000}"
WORK=$(mktemp -d)
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

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
SLUICE_LOG=warn "$SLUICE" run --config "$WORK/state.toml" --data-dir "$WORK/lake" \
  --http-listen "127.0.0.1:$port" &
PID=$!
metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 ~ "^"m"({|$)" {s += $2} END {printf "%.0f", s}'; }
until curl -s "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done

"$BIN/sluice-loadtest" telemetry --target "http://127.0.0.1:$port" --devices "$KEYS" \
  --rate 100000 --duration "$((KEYS * 2 / 100000))s" --connections 2 --no-progress >/dev/null
start=$(metric sluice_checkpoints_total)
until [ "$(metric sluice_checkpoints_total)" -ge $((start + 5)) ]; do sleep 0.5; done

state=$(metric sluice_window_state_bytes)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
rss=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
secs=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^sluice_checkpoint_seconds_sum/ {s=$2} /^sluice_checkpoint_seconds_count/ {c=$2} END {printf "%.3f", s / c}')
newest=$(ls -d "$WORK/lake/_state/"* | tail -1)
snapshot=$(du -k "$newest" | tail -1 | cut -f1)
printf 'window state %d MB over %d keys; one checkpoint state file %d MB\n' \
  $((state / 1048576)) "$KEYS" $((snapshot / 1024))
printf 'peak RSS %d MB; RSS after 5 more checkpoints %d MB; mean checkpoint %s s\n' \
  $((hwm / 1024)) $((rss / 1024)) "$secs"
