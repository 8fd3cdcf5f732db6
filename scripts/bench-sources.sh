#!/usr/bin/env bash
# Kafka → lake and Kinesis → lake throughput of `sluice run`, and the cost of
# checkpoints: the same backlog read with checkpoint_interval = 3s (default) and 0s.
#
#   scripts/bench-sources.sh [kafka|kinesis] ...
#
# A backlog of EVENTS telemetry events (default 2,000,000 for Kafka, 20,000 for
# Kinesis: moto's PutRecords slows down as a stream grows) is produced first; then
# `sluice run` (release) reads it into a fresh lake, and the script waits until every
# row is committed. Reported: events/s (wall), events per CPU-second of sluice
# (= events/s per core), and the checkpoint-on/off ratio.
#
# Needs the test virtualenv and the tansu binary that scripts/test.sh installs;
# BENCH_BIN=<dir with a release sluice> skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="$HOME/.cache/sluice/test-venv"
TANSU="${SLUICE_TANSU_ROOT:-$HOME/.cache/sluice/tansu-0.6.0}/bin/tansu"
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

BIN="${BENCH_BIN:-}"
if [ -z "$BIN" ]; then
  cargo build --release -q --bin sluice
  BIN=target/release
fi

# Runs sluice on the config ($3 = its checkpoint interval) until the lake holds $2
# committed rows of `events`; prints "wall_s cpu_s".
measure() {
  local config=$1 expected=$2 http lake
  http="127.0.0.1:$(free_port)"
  lake="$WORK/lake-$RANDOM"
  SLUICE_LOG=warn AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \
    "$BIN/sluice" run --config "$config" --data-dir "$lake" --http-listen "$http" &
  local pid=$!
  "$VENV/bin/python" - "$http" "$expected" "$pid" "$3" <<'PY'
import sys, time, urllib.request, os
http, expected, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def metric(name, label=""):
    try:
        text = urllib.request.urlopen(f"http://{http}/metrics", timeout=2).read().decode()
    except Exception:
        return 0.0
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.split("{")[0].split(" ")[0] == name and label in l)
start = None
while True:
    if start is None and metric("sluice_source_events_received_total") > 0:
        start = time.time()
    if metric("sluice_lake_rows_written_total", 'table="events"') >= expected:
        break
    time.sleep(0.05)
# Every row is encoded; it counts once a query sees it (with checkpoints, once the
# checkpoint after the last roll has committed it).
import json
def visible():
    req = urllib.request.Request(f"http://{http}/api/query", data=json.dumps({"sql": "SELECT count(*) AS n FROM events"}).encode(),
                                 headers={"content-type": "application/json"})
    try:
        rows = json.loads(urllib.request.urlopen(req, timeout=5).read())
        return rows[0]["n"]
    except Exception:
        return 0
while visible() < expected:
    time.sleep(0.02)
print(f"{time.time() - start:.2f} {cpu():.2f}")
PY
  kill "$pid"; wait "$pid" || true
}

report() {
  local name=$1 events=$2 on=$3 off=$4
  "$VENV/bin/python" - "$name" "$events" "$on" "$off" <<'PY'
import sys
name, n = sys.argv[1], int(sys.argv[2])
(won, con), (woff, coff) = [map(float, a.split()) for a in sys.argv[3:5]]
print(f"{name}: {n} events")
print(f"  checkpoints every 3s: {n / won:>10,.0f} events/s  {n / con:>10,.0f} events/CPU-s  ({won:.2f} s wall, {con:.2f} s CPU)")
print(f"  checkpoints off:      {n / woff:>10,.0f} events/s  {n / coff:>10,.0f} events/CPU-s  ({woff:.2f} s wall, {coff:.2f} s CPU)")
print(f"  checkpoint cost: {100 * (1 - (n / won) / (n / woff)):.1f}% of throughput")
PY
}

stream_config() {
  cat <<EOF
[lake]
checkpoint_interval = "$1"
[streams.events]
schema = "telemetry"
EOF
}

bench_kafka() {
  local events=${EVENTS:-2000000} port topic
  port=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
  topic=bench
  "$VENV/bin/python" - "127.0.0.1:$port" "$topic" "$events" <<'PY'
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
broker, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
admin = AdminClient({"bootstrap.servers": broker})
for f in admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)]).values():
    f.result(30)
p = Producer({"bootstrap.servers": broker, "linger.ms": 20, "batch.num.messages": 10000})
for i in range(n):
    d = i % 1000
    v = ('{"device_id":"d%04d","ts":%d,"temperature":%.2f,"humidity":%.1f,"battery":%.2f,"status":"ok"}'
         % (d, 1767225600000 + i, 20 + (i % 700) / 10, 40 + i % 30, 3.5 + (i % 50) / 100)).encode()
    while True:
        try:
            p.produce(topic, v, key=b"d%04d" % d); break
        except BufferError:
            p.poll(0.05)
    if i % 10000 == 0:
        p.poll(0)
assert p.flush(300) == 0
PY
  local results=()
  for interval in 3s 0s; do
    stream_config "$interval" >"$WORK/kafka-$interval.toml"
    cat >>"$WORK/kafka-$interval.toml" <<EOF
[sources.bench]
type = "kafka"
brokers = "127.0.0.1:$port"
topics = ["$topic"]
group_id = "bench-$interval"
stream = "events"
EOF
    results+=("$(measure "$WORK/kafka-$interval.toml" "$events" "$interval")")
  done
  report "Kafka → lake" "$events" "${results[0]}" "${results[1]}"
}

bench_kinesis() {
  local events=${EVENTS:-20000} port
  port=$(free_port)
  "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$WORK/moto.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
  "$VENV/bin/python" - "http://127.0.0.1:$port" "$events" <<'PY'
import sys, boto3, time
c = boto3.client("kinesis", endpoint_url=sys.argv[1], region_name="us-east-1",
                 aws_access_key_id="x", aws_secret_access_key="x")
n = int(sys.argv[2])
c.create_stream(StreamName="bench", ShardCount=2)
for start in range(0, n, 500):
    recs = [{"Data": ('{"device_id":"d%04d","ts":%d,"temperature":21.5,"status":"ok"}' % (i % 1000, 1767225600000 + i)).encode(),
             "PartitionKey": "d%04d" % (i % 1000)} for i in range(start, min(n, start + 500))]
    assert c.put_records(StreamName="bench", Records=recs)["FailedRecordCount"] == 0
PY
  local results=()
  for interval in 3s 0s; do
    stream_config "$interval" >"$WORK/kinesis-$interval.toml"
    cat >>"$WORK/kinesis-$interval.toml" <<EOF
[sources.bench]
type = "kinesis"
kinesis_stream = "bench"
endpoint = "http://127.0.0.1:$port"
region = "us-east-1"
stream = "events"
EOF
    results+=("$(measure "$WORK/kinesis-$interval.toml" "$events" "$interval")")
  done
  report "Kinesis (moto) → lake" "$events" "${results[0]}" "${results[1]}"
}

for target in "${@:-kafka}"; do
  "bench_$target"
done
