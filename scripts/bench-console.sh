#!/usr/bin/env bash
# The console's cost (issue 23): `sluice run` on its embedded default at RATE events/s
# (default 50,000) from DEVICES devices for DURATION, once watched by nobody and once
# by WATCHERS console event streams (default 10: what an open console tab holds,
# GET /api/events) and TAPS tap streams (default 5: what `sluice tap telemetry
# --filter "temperature > 80"` reads, GET /api/tap/telemetry). The readers stand for
# browsers and terminals on other machines, so they are one niced curl holding every
# stream (READERS=one, the default); READERS=many starts a process per reader (a curl
# per console, a `sluice tap` per tap), whose own scheduling on this 2-core machine
# shows in the service's latency. The two runs alternate PAIRS times (default 2), so
# the machine's noise falls on both. Each run reports events sent and acknowledged,
# the service's CPU seconds and events per CPU-second (at a fixed rate, the CPU per
# event is the throughput cost), and publish → alert latency (p50/p99/max) for the
# default rule, measured by the load tester from each reading's intended send time.
#
# COMPARE=<dir holding another build's sluice> instead alternates that build and this
# one, both unwatched (labels before-N, after-N): how a change moves the CPU per event
# and the alert latency under the same load.
#
#   scripts/bench-console.sh            # BENCH_BIN=<dir> skips the release build
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-50000}
DEVICES=${DEVICES:-1000}
DURATION=${DURATION:-30s}
WATCHERS=${WATCHERS:-10}
TAPS=${TAPS:-5}
PAIRS=${PAIRS:-2}
READERS=${READERS:-one}
EXCURSIONS=${EXCURSIONS:-0.0002}
source scripts/lib.sh
with_scratch

release_bins

# run LABEL WATCHERS TAPS [SLUICE_DIR]
run() {
  local label=$1 watchers=$2 taps=$3 sluice=${4:-$BIN} mqtt http config report
  mqtt=$(free_port)
  http=$(free_port)
  config="$WORK/$label.toml"
  report="$WORK/report-$label.json"
  sed -e 's/^burst = 200/burst = 5000/' config/examples/default.toml >"$config"
  SLUICE_LOG=warn "$sluice/sluice" run --config "$config" --data-dir "$WORK/lake-$label" \
    --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" 2>"$WORK/sluice-$label.log" &
  local pid=$! readers=()
  PIDS+=("$pid")
  wait_port "$http"
  wait_port "$mqtt"
  # The readers take what the service leaves (nice 19): their side of each stream is
  # not what is measured.
  if [ "$READERS" = many ]; then
    for _ in $(seq "$watchers"); do
      nice -n 19 curl -sN -H 'Accept: text/event-stream' "http://127.0.0.1:$http/api/events" >/dev/null &
      readers+=($!)
    done
    for _ in $(seq "$taps"); do
      nice -n 19 "$BIN/sluice" tap telemetry --http "127.0.0.1:$http" --filter "temperature > 80" >/dev/null 2>&1 &
      readers+=($!)
    done
  elif [ $((watchers + taps)) -gt 0 ]; then
    local urls=()
    for _ in $(seq "$watchers"); do
      urls+=("http://127.0.0.1:$http/api/events" -o /dev/null)
    done
    for _ in $(seq "$taps"); do
      urls+=("http://127.0.0.1:$http/api/tap/telemetry?filter=temperature%20%3E%2080" -o /dev/null)
    done
    nice -n 19 curl -sN -Z --parallel-immediate --parallel-max 100 -H 'Accept: text/event-stream' "${urls[@]}" 2>/dev/null &
    readers+=($!)
  fi
  PIDS+=("${readers[@]}")
  # Every reader is subscribed before the load starts.
  local open=0
  for _ in $(seq 100); do
    open=$(curl -s "http://127.0.0.1:$http/metrics" | awk '/^sluice_tap_readers / { print $2 }')
    [ "${open:-0}" -ge $((watchers * 2 + taps)) ] && break
    sleep 0.1
  done
  if [ "${open:-0}" -lt $((watchers * 2 + taps)) ]; then
    echo "[$label] only ${open:-0} of $((watchers * 2 + taps)) tap readers subscribed" >&2
    exit 1
  fi
  local cpu_before
  cpu_before=$(cpu_s "$pid")
  "$BIN/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --qos 1 \
    --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" \
    --excursion-probability "$EXCURSIONS" --alert-topic "alerts/temperature_high/#" \
    --report "$report" --no-progress >"$WORK/loadtest-$label.txt"
  local cpu
  cpu=$(awk -v a="$(cpu_s "$pid")" -v b="$cpu_before" 'BEGIN { print a - b }')
  local dropped
  dropped=$(curl -s "http://127.0.0.1:$http/metrics" |
    awk '/^sluice_tap_dropped_batches_total/ { n += $2 } END { print n + 0 }')
  for r in "${readers[@]}"; do kill "$r" 2>/dev/null || true; done
  kill -TERM "$pid"
  local status=0
  wait "$pid" || status=$?
  local rows
  rows=$("$BIN/sluice" query --data-dir "$WORK/lake-$label" --format csv \
    "SELECT count(*) FROM telemetry" | tail -1)
  # A run must land every event it sent, and stop cleanly; one that does not keeps its
  # lake and log (KEEP_WORK) and fails the script at the end.
  if [ "$status" != 0 ] || [ "$rows" != "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sent"])' "$report")" ]; then
    echo "[$label] LANDED $rows ROWS OF THOSE SENT, exit status $status; lake and log kept in $WORK" >&2
    tail -20 "$WORK/sluice-$label.log" >&2
    KEEP_WORK=1
    FAILED=1
  fi
  python3 - "$report" "$cpu" "$label" "$rows" "$dropped" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu, label, rows, dropped = float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
a = r.get("alert_latency") or {}
def ms(k): return "%.1f" % (a.get(k, float("nan")) / 1000) if a else "n/a"
print(f"[{label}] sent {r['sent']} at {r['achieved_rate']:.0f}/s, telemetry rows {rows}; sluice CPU {cpu:.1f} s = "
      f"{r['sent'] / max(cpu, 1e-9):.0f} events per CPU-second; publish → alert ms p50 {ms('p50_us')} "
      f"p99 {ms('p99_us')} p99.9 {ms('p99_9_us')} max {ms('max_us')} ({a.get('count', 0)} alerts); tap batches dropped {dropped}")
PY
}

FAILED=0
for i in $(seq "$PAIRS"); do
  if [ -n "${COMPARE:-}" ]; then
    run "before-$i" 0 0 "$COMPARE"
    run "after-$i" 0 0
  else
    run "none-$i" 0 0
    run "watched-$i" "$WATCHERS" "$TAPS"
  fi
done
[ "$FAILED" = 0 ]
