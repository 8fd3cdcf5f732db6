#!/usr/bin/env bash
# Publish → alert latency of `sluice run` on its embedded broker (issue 6's benchmark):
# `sluice-loadtest telemetry` publishes RATE events/s (default 50,000) at QoS 1 from
# DEVICES devices (default 1,000) for DURATION (default 60s); a small share of readings
# start a 5-reading excursion above 85, so the default rule `temperature_high` (> 80
# three readings in a row) fires on the third. The load tester is subscribed to
# `alerts/#` and records, for every fire, the time from the intended send time of the
# reading that fired it to the alert's arrival (hdrhistogram).
#
# Runs three times: the raw-event rule with decode.flush_interval = 50ms (the built-in
# default) and with FAST_FLUSH (default 5ms; the default config uses 10ms), since a
# source hands its batch on at that interval; then a window rule (`window_hot`: max temperature of a 10 s tumbling window
# above 80) at FAST_FLUSH, timed from the window's end plus the stream's 5 s
# out-of-orderness bound, the earliest the window can close.
#
#   scripts/bench-alerts.sh            # BENCH_BIN=<dir> skips the release build
set -euo pipefail
cd "$(dirname "$0")/.."

RATE=${RATE:-50000}
DEVICES=${DEVICES:-1000}
DURATION=${DURATION:-60s}
EXCURSIONS=${EXCURSIONS:-0.0002}
FAST_FLUSH=${FAST_FLUSH:-5ms}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 300); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

BIN="${BENCH_BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --release -q -p sluice --bin sluice
  cargo build --release -q -p sluice-loadtest --bins
  BIN=target/release
fi

run() {
  local flush=$1 rule=${2:-temperature_high} mqtt http config report
  mqtt=$(free_port)
  http=$(free_port)
  config="$WORK/$rule-$flush.toml"
  report="$WORK/report-$rule-$flush.json"
  sed -e "s/^flush_interval = \"[0-9]*ms\"/flush_interval = \"$flush\"/" \
    -e 's/^burst = 200/burst = 5000/' config/examples/default.toml >"$config"
  cat >>"$config" <<'TOML'
[windows.device_10s]
input = "telemetry"
kind = "tumbling"
size = "10s"
group_by = ["device_id"]
select = ["max(temperature) AS t_max"]
[alerts.window_hot]
input = "device_10s"
condition = "t_max > 80"
notify = ["local"]
TOML
  SLUICE_LOG=warn "$BIN/sluice" run --config "$config" --data-dir "$WORK/lake-$rule-$flush" \
    --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$http"
  wait_port "$mqtt"
  "$BIN/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --qos 1 \
    --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" \
    --excursion-probability "$EXCURSIONS" --alert-topic "alerts/$rule/#" --alert-window-delay 5s \
    --report "$report" --no-progress >"$WORK/loadtest-$rule-$flush.txt"
  local cpu
  cpu=$(python3 -c "
f = open('/proc/$pid/stat').read().rsplit(')', 1)[1].split()
import os; print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))")
  kill -TERM "$pid"
  wait "$pid" || true
  local alerts
  alerts=$("$BIN/sluice" query --data-dir "$WORK/lake-$rule-$flush" --format csv \
    "SELECT count(*) FILTER (WHERE event = 'fire') AS fires, count(*) FILTER (WHERE NOT notified) AS muted FROM alerts WHERE rule = '$rule'" | tail -1)
  python3 - "$report" "$flush" "$cpu" "$alerts" "$rule" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
flush, cpu, alerts, rule = sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
a = r.get("alert_latency") or {}
ack = r.get("ack_latency") or {}
def ms(p, k): return "%.1f" % (p.get(k, float("nan")) / 1000) if p else "n/a"
print(f"rule {rule}, flush_interval={flush}: sent {r['sent']} at {r['achieved_rate']:.0f}/s (target {(r.get('target_rate') or 0):.0f}), "
      f"sluice CPU {cpu:.1f} s ({r['sent'] / max(cpu, 1e-9):.0f} events per CPU-second)")
print(f"  alerts table (fires, muted): {alerts}; fire alerts timed: {a.get('count', 0)}")
print(f"  publish → alert ms: p50 {ms(a, 'p50_us')}  p90 {ms(a, 'p90_us')}  p99 {ms(a, 'p99_us')}  "
      f"p99.9 {ms(a, 'p99_9_us')}  max {ms(a, 'max_us')}")
print(f"  publish → PUBACK ms: p50 {ms(ack, 'p50_us')}  p99 {ms(ack, 'p99_us')}")
PY
}

run 50ms
run "$FAST_FLUSH"
run "$FAST_FLUSH" window_hot
