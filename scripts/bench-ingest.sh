#!/usr/bin/env bash
# Issue 4's MQTT ingest benchmarks, driven by sluice-loadtest (release builds, loopback):
#   embedded   `sluice run` on its embedded broker: QoS 1 telemetry at each rate in RATES
#   mosquitto  `sluice run` subscribed to an external mosquitto, same rates
#   bare       mosquitto into a bare subscriber that counts and discards (the broker's limit)
#   http       `sluice run` taking NDJSON bodies on POST /api/ingest/telemetry, each answered
#              once fsynced to the stream's write-ahead log ([http] durable_acks, the default)
#   http-nolog the same, answered once decoded (durable_acks = false)
# Each rate runs on a fresh lake. A line per rate gives what was sent, acknowledged and
# landed in the lake (loss = sent - landed), how long sending took against the schedule,
# ack latency (intended send -> PUBACK), publish -> queryable latency from probes, and the
# sluice process's CPU seconds (events per sluice CPU-second).
# A rate is sustained when loss is 0 and sending took at most 2% longer than scheduled.
# Usage: RATES="20000 40000" DURATION=20s scripts/bench-ingest.sh [embedded|mosquitto|bare ...]
set -euo pipefail
cd "$(dirname "$0")/.."
RATES="${RATES:-10000 20000 40000 60000 80000}"
DURATION="${DURATION:-20s}"
CONNECTIONS="${CONNECTIONS:-4}"
W="${BENCH_DIR:-/tmp/sluice-bench-ingest}"
mkdir -p "$W"
bin="${BENCH_BIN:-$PWD/target/release}"   # BENCH_BIN=dir with prebuilt binaries skips the build
[ -n "${BENCH_BIN:-}" ] || cargo build --release -q -p sluice -p sluice-loadtest
source scripts/lib.sh
count_rows() {
  curl -s -X POST "http://$1/api/query" -d '{"sql":"SELECT count(*) AS n FROM telemetry WHERE device_id LIKE '"'"'dev-%'"'"'"}' \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r[0]["n"] if isinstance(r,list) and r else 0)' 2>/dev/null || echo 0
}
summarize() { # report.json landed cpu_s
  python3 - "$@" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); landed = int(sys.argv[2]); cpu = float(sys.argv[3])
ms = lambda p, k: "-" if not p else f"{p[k]/1000:.1f}"
events = r["sent"] - r["probes_sent"]
a, q = r["ack_latency"], r["queryable_latency"]
late = r["send_s"] / max(r["scheduled_s"], 1e-9)
ok = "SUSTAINED" if events - landed == 0 and late <= 1.02 else "not sustained"
print(f"  rate {r['target_rate']:>8.0f}/s  sent {events:>8}  acked {r['acked']:>8}  landed {landed:>8}  loss {events-landed:>6}"
      f"  send {r['send_s']:.2f}/{r['scheduled_s']:.0f}s  ack p50/p99/p99.9 {ms(a,'p50_us')}/{ms(a,'p99_us')}/{ms(a,'p99_9_us')} ms"
      f"  queryable p50/p99 {ms(q,'p50_us')}/{ms(q,'p99_us')} ms  sluice cpu {cpu:.1f}s ({events/max(cpu,1e-9):,.0f} ev/cpu-s)  {ok}")
PY
}

start_mosquitto() {
  MQ_PORT=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\n' \
    "$MQ_PORT" > "$W/mosquitto.conf"
  mosquitto -c "$W/mosquitto.conf" > "$W/mosquitto.log" 2>&1 &
  MQ_PID=$!
  wait_port "$MQ_PORT"
}

run_sluice() { # mode rate
  local mode=$1 rate=$2 http mqtt args=()
  http=$(free_port); mqtt=$(free_port)
  rm -rf "$W/lake"
  if [ "$mode" = http ] || [ "$mode" = http-nolog ]; then
    printf '[streams.telemetry]\nschema = "telemetry"\n[http]\ndurable_acks = %s\n' \
      "$([ "$mode" = http ] && echo true || echo false)" > "$W/sluice.toml"
    args=(--config "$W/sluice.toml")
    target="http://127.0.0.1:$http"
  elif [ "$mode" = mosquitto ]; then
    cat > "$W/sluice.toml" <<TOML
[sources.devices]
type = "mqtt"
url = "mqtt://127.0.0.1:$MQ_PORT"
topics = ["devices/+/telemetry"]
qos = 1
client_id = "sluice-bench-$rate"
stream = "telemetry"
key_from_topic_segment = 1

[streams.telemetry]
schema = "telemetry"
TOML
    args=(--config "$W/sluice.toml")
    target="mqtt://127.0.0.1:$MQ_PORT"
  else
    target="mqtt://127.0.0.1:$mqtt"
  fi
  "$bin/sluice" run --data-dir "$W/lake" --http-listen "127.0.0.1:$http" --mqtt-listen "127.0.0.1:$mqtt" \
    "${args[@]}" > "$W/sluice-$mode-$rate.log" 2>&1 &
  local pid=$!
  wait_port "$http"
  sleep 1 # the MQTT source subscribes
  local cpu0; cpu0=$(cpu_s $pid)
  "$bin/sluice-loadtest" telemetry --target "$target" --devices 10000 --rate "$rate" --duration "$DURATION" \
    --qos 1 --connections "$CONNECTIONS" --query-url "http://127.0.0.1:$http" --probe-every 100ms \
    --report "$W/report-$mode-$rate.json" --hgrm "$W/ack-$mode-$rate.hgrm" --plot "$W/latency-$mode-$rate.png" \
    --no-progress > "$W/loadtest-$mode-$rate.txt"
  local want landed=0
  want=$(python3 -c "import json; r=json.load(open('$W/report-$mode-$rate.json')); print(r['sent']-r['probes_sent'])")
  for _ in $(seq "${LAND_WAIT:-120}"); do
    landed=$(count_rows "127.0.0.1:$http")
    [ "$landed" -ge "$want" ] && break
    sleep 1
  done
  local cpu1; cpu1=$(cpu_s $pid)
  kill -TERM $pid; wait $pid || true
  summarize "$W/report-$mode-$rate.json" "$landed" "$(python3 -c "print($cpu1-$cpu0)")"
}

run_bare() { # rate
  local rate=$1
  "$bin/sluice-loadtest" record --source "mqtt://127.0.0.1:$MQ_PORT" --topic 'devices/+/telemetry' --discard \
    --idle 5s --report "$W/bare-$rate.json" > /dev/null 2> "$W/bare-$rate.log" &
  local rec=$!
  until grep -q "recording: subscribed" "$W/bare-$rate.log"; do sleep 0.1; done
  "$bin/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$MQ_PORT" --devices 10000 --rate "$rate" \
    --duration "$DURATION" --qos 1 --connections "$CONNECTIONS" --report "$W/report-bare-$rate.json" \
    --no-progress > /dev/null
  wait $rec
  python3 - "$W/report-bare-$rate.json" "$W/bare-$rate.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = json.load(open(sys.argv[2]))
late = r["send_s"] / max(r["scheduled_s"], 1e-9)
ok = "SUSTAINED" if s["messages"] == r["sent"] and late <= 1.02 else "not sustained"
print(f"  rate {r['target_rate']:>8.0f}/s  sent {r['sent']:>8}  received {s['messages']:>8}  loss {r['sent']-s['messages']:>6}"
      f"  send {r['send_s']:.2f}/{r['scheduled_s']:.0f}s  subscriber rate {s['rate']:,.0f}/s"
      f"  ack p99 {r['ack_latency']['p99_us']/1000:.1f} ms  {ok}")
PY
}

for what in ${@:-embedded mosquitto bare}; do
  echo "$what (QoS 1, $CONNECTIONS connections, $DURATION per rate):"
  case $what in
    embedded) for r in $RATES; do run_sluice embedded "$r"; done ;;
    http|http-nolog) for r in $RATES; do run_sluice "$what" "$r"; done ;;
    mosquitto) start_mosquitto; for r in $RATES; do run_sluice mosquitto "$r"; done; kill $MQ_PID ;;
    bare) start_mosquitto; for r in $RATES; do run_bare "$r"; done; kill $MQ_PID ;;
    *) echo "unknown benchmark $what" >&2; exit 2 ;;
  esac
done
