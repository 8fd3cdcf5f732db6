#!/usr/bin/env bash
# Issue 20's lake benchmarks: the same six analyst queries through a running `sluice run`
# (POST /api/query) and through DuckDB (its `delta` extension from PyPI, 2 threads) on the
# same Delta tables, alternating, REPS times each; each query's median on both sides and
# their ratio (Sluice / DuckDB; issue target: each <= 1.5, median <= 1.0).
#
#   bounded  2,000,000 W1 events across 2 hours land through `sluice run --from-file`
#            (the raw table and the 1-minute `device_minute` windows), then a `sluice run`
#            with eager maintenance compacts every hour; queries after compaction.
#   live     `sluice run` on its embedded broker takes RATE (20000) telemetry events/s from
#            the load tester for DURATION (3600s) with maintenance off; queries, then the
#            same lake with eager maintenance until every hour is one file; queries again.
#            File counts and times before and after.
#   cost     compaction beside a live load: RATE (50000)/s for DURATION (120s) twice on
#            a fresh lake, with maintenance off and with it compacting every 5 s (the
#            open hour too); events per sluice CPU-second, ack latency and bytes rewritten.
#
#   compact  the `live` lake again with eager maintenance, queries after compaction.
#   memory   compaction's peak RSS: EVENTS (24,000,000) W1 events in one hour land as 40
#            files by 40 bounded runs (maintenance off); then copies of that lake are
#            compacted into one file by a service with eager maintenance, with this
#            build and, alternating REPS (2) times, COMPARE=<dir with another build's
#            sluice>; each reports its peak RSS (VmHWM) and how long the hour took.
#
#   BENCH_BIN=target/release scripts/bench-lake.sh [bounded|live|compact|cost|memory]   # REPS=7
set -euo pipefail
cd "$(dirname "$0")/.."
W="${LAKE_BENCH_DIR:-/tmp/sluice-lake-bench}"
PY="${SLUICE_TEST_VENV:-$HOME/.cache/sluice/test-venv}/bin/python"
bin="${BENCH_BIN:-./target/release}"
mode="${1:-bounded}"
mkdir -p "$W"
source scripts/lib.sh
files() { find "$W/lake/$1" -name '*.parquet' | wc -l; }
file_counts() { echo "parquet files on disk: telemetry $(files telemetry), device_minute $(files device_minute)"; }

# The W1 pipeline, keeping the raw table too; `extra` is appended (maintenance settings);
# with `broker`, the embedded MQTT broker is on and feeds the telemetry stream.
config() { # out extra [broker]
  sed -e '/^store = false$/d' config/examples/w1-tumbling.toml >"$1"
  if [ "${3:-}" = broker ]; then
    sed -i 's/^enabled = false$/enabled = true/' "$1"
    printf '%s\n' '[sources.devices]' 'type = "mqtt"' 'url = "embedded"' \
      'topics = ["devices/+/telemetry"]' 'qos = 1' 'client_id = "sluice-devices"' \
      'stream = "telemetry"' 'key_from_topic_segment = 1' >>"$1"
  fi
  printf '%s\n' "$2" >>"$1"
}
# TARGET: compaction's file size (default 128MB): a smaller one shows on a short `live`
# run that files come out near the target.
TARGET="${TARGET:-128MB}"
EAGER="[lake.maintenance]
interval = \"1s\"
closed_after = \"0s\"
open_min_files = 2
read_rate = \"1GB\"
target_size = \"$TARGET\""
OFF='[lake.maintenance]
enabled = false'

service=
stop_service() { [ -z "$service" ] || { kill -TERM "$service" 2>/dev/null || true; wait "$service" || true; service=; }; }
trap stop_service EXIT
start_service() { # config [extra sluice args...]
  local config=$1; shift
  port=$(free_port)
  SLUICE_LOG=warn "$bin/sluice" run --config "$config" --data-dir "$W/lake" \
    --http-listen "127.0.0.1:$port" "$@" >"$W/service.log" 2>&1 &
  service=$!
  wait_port "$port"
}

queries() { # wait|now
  TARGET_BYTES=$("$PY" -c "import re,sys; n,u=re.fullmatch(r'(\d+)\s*([KMG]?B)','$TARGET').groups(); print(int(n)*{'B':1,'KB':1000,'MB':10**6,'GB':10**9}[u])") \
  "$PY" - "$W/lake" "$port" "${REPS:-7}" "$1" <<'PY'
import datetime, json, os, statistics, sys, time, urllib.request
import deltalake, duckdb, duckdb_extension_delta
import pyarrow as pa

lake, port, reps, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "wait"

def layout(table):
    """Per (date, hour) partition: live files and their bytes, from the Delta log."""
    a = pa.table(deltalake.DeltaTable(f"{lake}/{table}").get_add_actions(flatten=True))
    parts = {}
    for d, h, size in zip(a.column("partition.date").to_pylist(), a.column("partition.hour").to_pylist(),
                          a.column("size_bytes").to_pylist()):
        n, b = parts.get((d, h), (0, 0))
        parts[(d, h)] = (n + 1, b + size)
    return parts

TARGET = int(os.environ.get("TARGET_BYTES", 128 << 20))

def still_open(d, h):
    end = datetime.datetime.fromisoformat(f"{d}T{h}:00:00+00:00") + datetime.timedelta(hours=1)
    return end > datetime.datetime.now(datetime.timezone.utc)

def compacted(table):
    # One file per target size in every closed hour (at least 1); an open hour may
    # hold one more until it closes.
    return all(n <= max(1, -(-b // TARGET)) + still_open(d, h)
               for (d, h), (n, b) in layout(table).items())

def live_files(table):
    return sum(n for n, _ in layout(table).values())

def partitions(table):
    return len(layout(table))

# Wait for compaction (with `wait`): each hour in files of about the target size.
deadline = time.time() + (1800 if wait else 0)
while time.time() < deadline:
    try:
        if all(compacted(t) for t in ("telemetry", "device_minute")):
            break
    except Exception:
        pass
    time.sleep(5)
print("per hour (live files, MB):", {t: {f"{d} {h}": (n, b // 10**6) for (d, h), (n, b) in sorted(layout(t).items())}
                                     for t in ("telemetry", "device_minute")})
print("live files:",
      {t: live_files(t) for t in ("telemetry", "device_minute")},
      "partitions:", {t: partitions(t) for t in ("telemetry", "device_minute")})

con = duckdb.connect()
con.load_extension(os.path.join(os.path.dirname(duckdb_extension_delta.__file__),
                                "extensions", "v" + duckdb.__version__, "delta.duckdb_extension"))
con.execute("SET threads = 2")
for t in ("telemetry", "device_minute"):
    con.execute(f"CREATE VIEW {t} AS SELECT * FROM delta_scan('{lake}/{t}')")
start = con.execute("SELECT min(ts) FROM telemetry").fetchall()[0][0]
lo = start.replace(minute=30, second=0, microsecond=0)
hi = lo.replace(minute=40)
fmt = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")

queries = {
    "hourly fleet aggregates": "SELECT date, hour, count(*) AS n, avg(temperature) AS t, max(humidity) AS h FROM telemetry GROUP BY date, hour ORDER BY date, hour",
    "top devices": "SELECT device_id, count(*) AS n, max(temperature) AS tmax FROM telemetry GROUP BY device_id ORDER BY tmax DESC, device_id LIMIT 10",
    "one device in time order": "SELECT ts, temperature, humidity FROM telemetry WHERE device_id = 'dev-000042' ORDER BY ts",
    "per-device minutes": "SELECT count(*) AS n FROM (SELECT device_id, date_trunc('minute', ts) AS m, avg(temperature) AS t FROM telemetry GROUP BY 1, 2) q",
    "10-minute range": f"SELECT count(*) AS n, avg(temperature) AS t FROM telemetry WHERE ts >= '{fmt(lo)}' AND ts < '{fmt(hi)}'",
    "window table": "SELECT device_id, sum(events) AS events, max(temperature_max) AS tmax FROM device_minute GROUP BY device_id ORDER BY events DESC, device_id LIMIT 10",
}

def sluice(sql):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/query",
                                 data=json.dumps({"sql": sql}).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())

deadline = time.time() + 60
while True:
    try:
        sluice("SELECT 1 AS one")
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.5)

ratios = []
print(f"{'query':28} {'sluice ms':>10} {'duckdb ms':>10} {'ratio':>6}  rows")
for name, sql in queries.items():
    ours, theirs = [], []
    for _ in range(reps):
        t = time.perf_counter(); rows = sluice(sql); ours.append(time.perf_counter() - t)
        t = time.perf_counter(); want = con.execute(sql).fetchall(); theirs.append(time.perf_counter() - t)
    assert len(rows) == len(want), (name, len(rows), len(want))
    a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    ratios.append(a / b)
    print(f"{name:28} {a:10.1f} {b:10.1f} {a / b:6.2f}  {len(rows)}")
print(f"median ratio {statistics.median(ratios):.2f}, worst {max(ratios):.2f} (target: median <= 1.0, each <= 1.5)")
PY
}

case $mode in
  bounded)
    EVENTS="${EVENTS:-2000000}"
    input="$W/w1-$EVENTS.jsonl"
    [ -s "$input" ] || "$bin/sluice-loadtest" generate --out "$input" --events "$EVENTS" --span-secs 7200
    config "$W/lake.toml" "$EAGER"
    rm -rf "$W/lake"
    SLUICE_LOG=warn "$bin/sluice" run --config "$W/lake.toml" --data-dir "$W/lake" \
      --from-file "telemetry=$input"
    file_counts
    start_service "$W/lake.toml"
    queries wait ;;
  live)
    config "$W/live-off.toml" "$OFF" broker
    config "$W/live-eager.toml" "$EAGER"
    rm -rf "$W/lake"
    mqtt=$(free_port)
    start_service "$W/live-off.toml" --mqtt-listen "127.0.0.1:$mqtt"
    wait_port "$mqtt"; sleep 1
    "$bin/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --devices 10000 \
      --rate "${RATE:-20000}" --duration "${DURATION:-3600s}" --qos 1 --connections 4 \
      --report "$W/live-report.json" --no-progress >"$W/live-loadtest.txt"
    "$PY" -c "import json; r=json.load(open('$W/live-report.json')); print(f\"sent {r['sent']} acked {r['acked']} in {r['send_s']:.0f} s (scheduled {r['scheduled_s']:.0f} s)\")"
    sleep 10
    echo "== after live ingest, before compaction"
    file_counts
    queries now
    stop_service
    "$0" compact ;;
  compact)
    # The lake of a `live` run, compacted by a sluice with eager maintenance.
    config "$W/live-eager.toml" "$EAGER"
    echo "== after compaction"
    start_service "$W/live-eager.toml"
    started=$(date +%s)
    queries wait
    echo "compaction and queries took $(($(date +%s) - started)) s"
    file_counts ;;
  cost)
    for maintenance in off eager; do
      if [ $maintenance = off ]; then extra=$OFF; else extra='[lake.maintenance]
interval = "5s"
open_min_files = 10
read_rate = "1GB"'; fi
      config "$W/cost-$maintenance.toml" "$extra" broker
      rm -rf "$W/lake"
      mqtt=$(free_port)
      start_service "$W/cost-$maintenance.toml" --mqtt-listen "127.0.0.1:$mqtt"
      wait_port "$mqtt"; sleep 1
      cpu0=$(cpu_s "$service")
      "$bin/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --devices 10000 \
        --rate "${RATE:-50000}" --duration "${DURATION:-120s}" --qos 1 --connections 4 \
        --report "$W/cost-$maintenance.json" --no-progress >/dev/null
      sleep 5
      cpu1=$(cpu_s "$service")
      rewritten=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^sluice_lake_compaction_rewritten_bytes_total/ {s += $2} END {print s + 0}')
      stop_service
      "$PY" - "$W/cost-$maintenance.json" "$cpu0" "$cpu1" "$rewritten" "$maintenance" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); cpu = float(sys.argv[3]) - float(sys.argv[2])
a = r["ack_latency"]
print(f"maintenance {sys.argv[5]:5}: sent {r['sent']} acked {r['acked']} send {r['send_s']:.1f}/{r['scheduled_s']:.0f} s"
      f"  ack p50/p99 {a['p50_us']/1000:.1f}/{a['p99_us']/1000:.1f} ms  sluice cpu {cpu:.1f} s"
      f" ({r['sent']/max(cpu, 1e-9):,.0f} ev/cpu-s)  compaction rewrote {float(sys.argv[4])/1e6:.0f} MB")
PY
    done ;;
  memory)
    EVENTS="${EVENTS:-24000000}"
    config "$W/memory-off.toml" "$OFF"
    config "$W/memory-eager.toml" "$EAGER
vacuum_interval = \"1000h\""
    if [ ! -d "$W/memory-lake/telemetry" ]; then
      rm -rf "$W/memory-parts" && mkdir -p "$W/memory-parts"
      "$bin/sluice-loadtest" generate --out "$W/memory-parts/all.jsonl" --events "$EVENTS" --span-secs 1800
      split -n l/40 -d "$W/memory-parts/all.jsonl" "$W/memory-parts/part-"
      rm "$W/memory-parts/all.jsonl"
      for part in "$W"/memory-parts/part-*; do
        SLUICE_LOG=error "$bin/sluice" run --config "$W/memory-off.toml" --data-dir "$W/memory-lake" \
          --from-file "telemetry=$part" >/dev/null
      done
      rm -rf "$W/memory-parts"
    fi
    echo "telemetry before: $(find "$W/memory-lake/telemetry" -name '*.parquet' | wc -l) files, $(du -sm "$W/memory-lake/telemetry" | cut -f1) MB"
    compact_once() { # label sluice-dir
      rm -rf "$W/lake" && cp -r "$W/memory-lake" "$W/lake"
      local log="$W/memory-$1.log" port pid started
      port=$(free_port)
      touch "$W/memory-start"
      SLUICE_LOG=info "$2/sluice" run --config "$W/memory-eager.toml" --data-dir "$W/lake" \
        --http-listen "127.0.0.1:$port" >"$log" 2>&1 &
      pid=$!
      started=$(date +%s.%N)
      # The hour holding 40 files is done when an upkeep of telemetry compacted some.
      until grep -q 'table="telemetry" done=Upkeep { compacted_files: [1-9]' "$log"; do
        kill -0 "$pid" 2>/dev/null || { echo "[$1] the service ended; log: $log" >&2; exit 1; }
        sleep 0.5
      done
      local took hwm written
      took=$(awk -v a="$(date +%s.%N)" -v b="$started" 'BEGIN { printf "%.1f", a - b }')
      hwm=$(awk '/^VmHWM/ { print int($2 / 1024) }' "/proc/$pid/status")
      kill -TERM "$pid"; wait "$pid" || true
      # What compaction wrote is newer than the mark made before it started.
      written=$(find "$W/lake/telemetry" -name '*.parquet' -newer "$W/memory-start" -printf '%s\n' | awk '{ s += $1 } END { printf "%.1f", s / 1e6 }')
      echo "[$1] peak RSS $hwm MB, compacted in $took s into $written MB; $(grep -o 'table="telemetry" done=Upkeep {[^}]*}' "$log" | head -1)"
    }
    for i in $(seq "${REPS:-2}"); do
      [ -z "${COMPARE:-}" ] || compact_once "compare-$i" "$COMPARE"
      compact_once "this-$i" "$bin"
    done
    echo "compacted: $(find "$W/lake/telemetry" -name '*.parquet' | wc -l) files, $(du -sm "$W/lake/telemetry" | cut -f1) MB" ;;
  *) echo "unknown mode $mode (bounded, live, compact, cost or memory)" >&2; exit 2 ;;
esac
