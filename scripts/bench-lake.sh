#!/usr/bin/env bash
# Issue 20's analyst-query benchmark. 2,000,000 W1 telemetry events across 2 hours land
# in a lake through `sluice run --from-file` (the raw table and the 1-minute
# `device_minute` windows), then a `sluice run` with eager maintenance compacts every
# hour. The same six queries then run, alternating, REPS times each: through that
# running `sluice run` (POST /api/query) and through DuckDB (its `delta` extension from
# PyPI, 2 threads) reading the same Delta tables. Prints each query's median time on
# both sides, their ratio (Sluice / DuckDB; issue target: each <= 1.5, median <= 1.0),
# and the file counts before and after compaction.
#
#   BENCH_BIN=target/release scripts/bench-lake.sh      # REPS=7, EVENTS=2000000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
W="${LAKE_BENCH_DIR:-/tmp/sluice-lake-bench}"
PY="${SLUICE_TEST_VENV:-$HOME/.cache/sluice/test-venv}/bin/python"
bin="${BENCH_BIN:-./target/release}"
mkdir -p "$W"
EVENTS="${EVENTS:-2000000}"
input="$W/w1-$EVENTS.jsonl"
[ -s "$input" ] || "$bin/sluice-loadtest" generate --out "$input" --events "$EVENTS" --span-secs 7200

# The W1 pipeline, keeping the raw table too, and maintenance as eager as it goes.
sed -e '/^store = false$/d' config/examples/w1-tumbling.toml >"$W/lake.toml"
cat >>"$W/lake.toml" <<'CONF'
[lake.maintenance]
interval = "1s"
closed_after = "0s"
read_rate = "1GB"
CONF

rm -rf "$W/lake"
SLUICE_LOG=warn "$bin/sluice" run --config "$W/lake.toml" --data-dir "$W/lake" \
  --from-file "telemetry=$input"
files() { find "$W/lake/$1" -name '*.parquet' | wc -l; }
echo "files before compaction: telemetry $(files telemetry), device_minute $(files device_minute)"

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SLUICE_LOG=warn "$bin/sluice" run --config "$W/lake.toml" --data-dir "$W/lake" \
  --http-listen "127.0.0.1:$port" >"$W/service.log" 2>&1 &
service=$!
trap 'kill $service 2>/dev/null || true' EXIT

"$PY" - "$W/lake" "$port" "${REPS:-7}" <<'PY'
import json, os, statistics, sys, time, urllib.request
import deltalake, duckdb, duckdb_extension_delta

lake, port, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def live_files(table):
    return len(deltalake.DeltaTable(f"{lake}/{table}").file_uris())

def partitions(table):
    t = deltalake.DeltaTable(f"{lake}/{table}").to_pyarrow_table(columns=["date", "hour"])
    return len(set(zip(t.column("date").to_pylist(), t.column("hour").to_pylist())))

# Wait for compaction: one live file per hour partition (they are far under 128 MB).
deadline = time.time() + 600
while time.time() < deadline:
    try:
        if all(live_files(t) == partitions(t) for t in ("telemetry", "device_minute")):
            break
    except Exception:
        pass
    time.sleep(1)
print("live files after compaction:",
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
