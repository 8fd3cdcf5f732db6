#!/usr/bin/env bash
# Heavy queries cannot take the service down (issue 22): `sluice run` on its default
# config and limits, under a QoS 1 telemetry load of RATE events/s (default 50,000),
# while CLIENTS (default 50) clients send heavy queries in a loop: a cross join of two
# large tables, `SELECT *` over everything, regex bombs, a high-cardinality GROUP BY.
#
# Three phases on one service, each with `sluice-loadtest telemetry` at RATE:
#   fill      FILL (default 30s): the tables grow (about 1.5M telemetry rows);
#   baseline  DURATION (default 90s): load alone;
#   storm     DURATION: the same load, plus the query clients.
# It reports, for baseline and storm side by side: publish → alert latency (the
# default rule `temperature_high` fires on excursions the load tester injects), the
# service's peak RSS (sampled every 100 ms), events sent and acknowledged; for the
# storm, each query kind's outcomes by HTTP status and time to answer. At the end it
# stops the service and counts the telemetry rows in the lake against the events the
# load tester had acknowledged (nothing lost, nothing doubled).
#
#   scripts/bench-queries.sh           # BENCH_BIN=<dir> skips the release build
#   QUERY_CONCURRENCY=2 QUERY_MEMORY=256MB scripts/bench-queries.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
with_scratch

RATE=${RATE:-50000}
DEVICES=${DEVICES:-1000}
FILL=${FILL:-30s}
DURATION=${DURATION:-90s}
CLIENTS=${CLIENTS:-50}
release_bins

# The default config; QUERY_CONCURRENCY and QUERY_MEMORY replace its [http] limits.
config="$WORK/sluice.toml"
edits=(-e '')
[ -z "${QUERY_CONCURRENCY:-}" ] || edits+=(-e "s/^query_concurrency = [0-9]*/query_concurrency = $QUERY_CONCURRENCY/")
[ -z "${QUERY_MEMORY:-}" ] || edits+=(-e "s/^query_memory = \"[0-9A-Z]*\"/query_memory = \"$QUERY_MEMORY\"/")
sed "${edits[@]}" config/examples/default.toml >"$config"
grep -E '^query_(concurrency|memory)' "$config"
mqtt=$(free_port)
http=$(free_port)
# Its log at info, kept with the lake if the rows do not add up; warnings shown at the end.
SLUICE_LOG=info "$BIN/sluice" run --config "$config" --data-dir "$WORK/lake" \
  --mqtt-listen "127.0.0.1:$mqtt" --http-listen "127.0.0.1:$http" 2>"$WORK/sluice.log" &
PID=$!
PIDS+=("$PID")
wait_port "$http"
wait_port "$mqtt"

# load PHASE DURATION: the telemetry load, in the background; its pid in $LOAD.
load() {
  "$BIN/sluice-loadtest" telemetry --target "mqtt://127.0.0.1:$mqtt" --qos 1 \
    --devices "$DEVICES" --rate "$RATE" --duration "$2" \
    --excursion-probability 0.0002 --alert-topic "alerts/temperature_high/#" \
    --report "$WORK/report-$1.json" --no-progress >"$WORK/loadtest-$1.txt" &
  LOAD=$!
}

# watch PHASE CLIENTS: samples the service's RSS and runs CLIENTS query clients until
# the load ends; writes $WORK/watch-PHASE.json.
watch() {
  python3 - "$PID" "$LOAD" "$http" "$2" "$WORK/watch-$1.json" <<'PY'
import json, os, sys, threading, time, urllib.request, urllib.error
pid, load, port, clients, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
QUERIES = {
    # Two large tables: every reading against every device-minute.
    "cross_join": "SELECT count(*) AS n FROM telemetry t CROSS JOIN device_minute m WHERE t.temperature > m.temperature_max",
    "select_all": "SELECT * FROM telemetry",
    # Catastrophic backtracking in a backtracking engine; Rust's regex is linear, so
    # this is a full scan with a regex per row.
    "regex_bomb": "SELECT count(*) AS n FROM telemetry WHERE regexp_like(device_id || repeat('a', 200), '^(a+)+$')",
    # A pattern whose compiled program is huge.
    "regex_size": "SELECT count(*) AS n FROM telemetry WHERE regexp_like(device_id, repeat('(a|aa|aaa)*b?', 2000))",
    "group_all": "SELECT device_id, ts, count(*) AS n FROM telemetry GROUP BY device_id, ts ORDER BY n DESC LIMIT 10",
}
kinds = list(QUERIES)
outcomes = {k: {} for k in kinds}
times = {k: [] for k in kinds}
running = {}
lock = threading.Lock()
done = threading.Event()

def client(i):
    n = i
    while not done.is_set():
        kind = kinds[n % len(kinds)]
        n += 1
        body = json.dumps({"sql": QUERIES[kind]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/query", body,
                                     {"content-type": "application/json"})
        started = time.monotonic()
        retry = 0.0
        with lock:
            running[kind] = running.get(kind, 0) + 1
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                while r.read(1 << 20):
                    pass
                status = str(r.status)
        except urllib.error.HTTPError as e:
            status = str(e.code)
            e.read()
            retry = float(e.headers.get("retry-after") or 0)
        except Exception as e:
            status = type(e).__name__
        took = time.monotonic() - started
        with lock:
            running[kind] -= 1
            outcomes[kind][status] = outcomes[kind].get(status, 0) + 1
            if status != "429":
                times[kind].append(took)
        if retry:
            time.sleep(retry)

def rss_mb():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0

threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
for t in threads:
    t.start()
GAUGES = ("sluice_pipeline_queue_bytes", "sluice_lake_backlog_bytes", "sluice_window_state_bytes",
          "sluice_broker_lag_bytes", "sluice_source_queue_bytes")

def gauges():
    # What the service's own buffers held (MB), to tell ingest's memory from the queries'.
    out = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except Exception:
        return out
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in GAUGES:
            out[name] = round(out.get(name, 0) + float(line.rsplit(" ", 1)[1]) / 1e6, 1)
    return out

peak, at_peak, last_gauges = 0.0, {}, 0.0
while os.path.exists(f"/proc/{load}") and open(f"/proc/{load}/stat").read().split()[2] != "Z":
    rss = rss_mb()
    if rss > peak:
        peak = rss
        if time.monotonic() - last_gauges >= 1:
            last_gauges = time.monotonic()
            with lock:
                kinds_running = {k: n for k, n in running.items() if n}
            at_peak = {"rss_mb": round(rss), "running": kinds_running, "buffers_mb": gauges()}
    time.sleep(0.1)
done.set()
for t in threads:
    t.join(timeout=600)
peak = max(peak, rss_mb())
def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None
json.dump({"peak_rss_mb": peak, "at_peak": at_peak,
           "queries": {k: {"status": outcomes[k], "p50_s": pct(times[k], 0.5), "max_s": pct(times[k], 1.0)}
                       for k in kinds if clients}}, open(out, "w"))
PY
}

for phase in fill baseline storm; do
  case $phase in
    fill) load fill "$FILL"; watch fill 0 ;;
    baseline) load baseline "$DURATION"; watch baseline 0 ;;
    storm) load storm "$DURATION"; watch storm "$CLIENTS" ;;
  esac
  wait "$LOAD"
done
cpu=$(cpu_s "$PID")
kill -TERM "$PID"
wait "$PID" || true
stored=$("$BIN/sluice" query --data-dir "$WORK/lake" --format csv \
  "SELECT count(*) AS n FROM telemetry WHERE device_id LIKE 'dev-%'" | tail -1)

(python3 - "$WORK" "$stored" "$cpu" "$CLIENTS" <<'PY'
import json, sys
work, stored, cpu, clients = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
def ms(p, k):
    return "%.1f" % (p[k] / 1000) if p and k in p else "n/a"
acked = 0
rows = {}
for phase in ["fill", "baseline", "storm"]:
    r = json.load(open(f"{work}/report-{phase}.json"))
    w = json.load(open(f"{work}/watch-{phase}.json"))
    acked += r["acked"]
    rows[phase] = (r, w)
print(f"{'':22}{'baseline':>22}{'storm (' + clients + ' query clients)':>30}")
line = lambda label, f: print(f"{label:22}{f(rows['baseline']):>22}{f(rows['storm']):>30}")
line("events/s", lambda x: f"{x[0]['achieved_rate']:.0f}")
line("sent / acked", lambda x: f"{x[0]['sent']} / {x[0]['acked']}")
line("alerts timed", lambda x: str((x[0].get('alert_latency') or {}).get('count', 0)))
for q in ["p50_us", "p99_us", "max_us"]:
    line(f"publish→alert {q[:-3]} ms", lambda x: ms(x[0].get("alert_latency"), q))
line("publish→PUBACK p99 ms", lambda x: ms(x[0].get("ack_latency"), "p99_us"))
line("peak RSS MB", lambda x: f"{x[1]['peak_rss_mb']:.0f}")
print(f"fill phase peak RSS {rows['fill'][1]['peak_rss_mb']:.0f} MB; sluice CPU {cpu:.0f} s in all")
print("storm queries (HTTP status: count; p50 / max seconds to an answer other than 429):")
for kind, q in rows["storm"][1]["queries"].items():
    p50 = "n/a" if q["p50_s"] is None else f"{q['p50_s']:.1f}"
    top = "n/a" if q["max_s"] is None else f"{q['max_s']:.1f}"
    print(f"  {kind:12} {q['status']}  p50 {p50} s, max {top} s")
print(f"near the storm's peak RSS: {rows['storm'][1]['at_peak']}")
verdict = "nothing lost or doubled" if stored == acked else "MISMATCH"
print(f"telemetry rows in the lake {stored}, events acknowledged {acked}: {verdict}")
sys.exit(0 if stored == acked else 3)
PY
) || {
  echo "the lake and the service's log are kept for a look; dead letters by reason:"
  "$BIN/sluice" query --data-dir "$WORK/lake" --format csv \
    "SELECT reason, count(*) AS n FROM dead_letter GROUP BY reason" || true
  KEEP_WORK=1
}
grep -E ' (WARN|ERROR) ' "$WORK/sluice.log" | grep -v 'memory over \[http\] query_rss_limit' | head -20 || true
echo "queries cancelled for memory: $(grep -c 'memory over \[http\] query_rss_limit' "$WORK/sluice.log" || true)"
