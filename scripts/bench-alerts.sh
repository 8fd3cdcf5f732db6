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
# MODE=fairness instead measures issue 7's fairness case: a per-device limit
# (`per_key_rate = 100`, shed) on the telemetry source, 1,000 devices at 20 events/s
# each, run once as is and once with device 0 (dev-000000) flooding at 100x (2,000/s).
# It reports publish → alert latency, and per run how many events of the other devices
# landed and how many of the flood were shed. KEY_LIMIT replaces the limit, e.g.
# '{ per_key_rate = 100, per_key_burst = 100, per_key_mode = "block" }'.
#
#   scripts/bench-alerts.sh            # BENCH_BIN=<dir> skips the release build
#   MODE=fairness scripts/bench-alerts.sh
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${MODE:-alerts}
RATE=${RATE:-50000}
DEVICES=${DEVICES:-1000}
DURATION=${DURATION:-60s}
EXCURSIONS=${EXCURSIONS:-0.0002}
FAST_FLUSH=${FAST_FLUSH:-5ms}
source scripts/lib.sh
with_scratch

release_bins

# run FLUSH [RULE [LABEL [LOADTEST ARGS...]]]; LIMIT, if set, is the devices source's
# `limit` table.
run() {
  local flush=$1 rule=${2:-temperature_high} mqtt http config report
  local label=${3:-$rule-$flush}
  local extra=("${@:4}")
  mqtt=$(free_port)
  http=$(free_port)
  config="$WORK/$label.toml"
  report="$WORK/report-$label.json"
  sed -e "s/^flush_interval = \"[0-9]*ms\"/flush_interval = \"$flush\"/" \
    -e 's/^burst = 200/burst = 5000/' \
    -e "s/^key_from_topic_segment = 1 .*device_id.*/&\n${LIMIT:+limit = $LIMIT}/" \
    config/examples/default.toml >"$config"
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
  SLUICE_LOG=warn "$BIN/sluice" run --config "$config" --data-dir "$WORK/lake-$label" \
    --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" &
  local pid=$!
  PIDS+=("$pid")
  wait_port "$http"
  wait_port "$mqtt"
  "$BIN/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --qos 1 \
    --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" \
    --excursion-probability "$EXCURSIONS" --alert-topic "alerts/$rule/#" --alert-window-delay 5s \
    --report "$report" --no-progress "${extra[@]}" >"$WORK/loadtest-$label.txt"
  local cpu
  cpu=$(python3 -c "
f = open('/proc/$pid/stat').read().rsplit(')', 1)[1].split()
import os; print((int(f[11]) + int(f[12])) / os.sysconf('SC_CLK_TCK'))")
  local shed
  shed=$(curl -s "http://127.0.0.1:$http/metrics" |
    awk '/^sluice_limit_events_total/ && /outcome="shed"/ { n += $2 } END { print n + 0 }')
  kill -TERM "$pid"
  wait "$pid" || true
  local alerts
  alerts=$("$BIN/sluice" query --data-dir "$WORK/lake-$label" --format csv \
    "SELECT count(*) FILTER (WHERE event = 'fire') AS fires, count(*) FILTER (WHERE NOT notified) AS muted FROM alerts WHERE rule = '$rule'" | tail -1)
  local devices
  devices=$("$BIN/sluice" query --data-dir "$WORK/lake-$label" --format csv \
    "SELECT count(*) FILTER (WHERE device_id <> 'dev-000000') AS others, count(*) FILTER (WHERE device_id = 'dev-000000') AS dev0 FROM telemetry WHERE device_id LIKE 'dev-%'" | tail -1)
  python3 - "$report" "$flush" "$cpu" "$alerts" "$rule" "$label" "$devices" "$shed" "$DURATION" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
flush, cpu, alerts, rule = sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5]
label, devices, shed, duration = sys.argv[6], sys.argv[7], sys.argv[8], sys.argv[9]
a = r.get("alert_latency") or {}
ack = r.get("ack_latency") or {}
def ms(p, k): return "%.1f" % (p.get(k, float("nan")) / 1000) if p else "n/a"
print(f"rule {rule}, flush_interval={flush}: sent {r['sent']} at {r['achieved_rate']:.0f}/s (target {(r.get('target_rate') or 0):.0f}), "
      f"sluice CPU {cpu:.1f} s ({r['sent'] / max(cpu, 1e-9):.0f} events per CPU-second)")
print(f"  alerts table (fires, muted): {alerts}; fire alerts timed: {a.get('count', 0)}")
print(f"  publish → alert ms: p50 {ms(a, 'p50_us')}  p90 {ms(a, 'p90_us')}  p99 {ms(a, 'p99_us')}  "
      f"p99.9 {ms(a, 'p99_9_us')}  max {ms(a, 'max_us')}")
print(f"  publish → PUBACK ms: p50 {ms(ack, 'p50_us')}  p99 {ms(ack, 'p99_us')}")
others, dev0 = (int(x) for x in devices.split(","))
secs = float(duration.rstrip("s"))
print(f"  [{label}] landed: other devices {others} ({others / secs:.0f}/s), dev-000000 {dev0}; shed by limits {shed}")
PY
}

if [ "$MODE" = fairness ]; then
  DEVICES=1000
  LIMIT=${KEY_LIMIT:-'{ per_key_rate = 100, per_key_burst = 100 }'}
  RATE=20000 run 10ms temperature_high no-flood
  # 999 devices x 20/s + dev-000000 x 2,000/s.
  RATE=21980 run 10ms temperature_high flood --flood-device 0 --flood-factor 100
  exit 0
fi
run 50ms
run "$FAST_FLUSH"
run "$FAST_FLUSH" window_hot
