#!/usr/bin/env bash
# Kafka → lake, Kinesis → lake and MQTT → lake throughput of `sluice run`, and what
# durability costs: for Kafka and Kinesis the same backlog read with
# checkpoint_interval = 3s (default) and 0s; for MQTT, QoS 1 with durable acks (the
# write-ahead log, default) and with acks on receipt, at mosquitto's
# max_inflight_messages = 1000 and at its default of 20.
#
#   scripts/bench-sources.sh [kafka|kinesis|mqtt|cluster|repartition] ...
#
# cluster: issue 21's efficiency check. The same Kafka backlog (EVENTS, default
# 2,000,000, in a 12-partition topic) read into a fresh lake by one node of a cluster
# and by three nodes (`--node-id`, one consumer group, one lake), on this one machine:
# events per CPU-second summed over the nodes, and the three-node figure as a share of
# the one-node figure (target >= 85%).
#
# repartition: what [cluster.repartition] costs. Three nodes share one mosquitto
# subscription and run a per-device minute window while `sluice-loadtest` publishes
# EVENTS (default 1,000,000) at RATE (default 50,000/s) at QoS 1: once with the windows
# fed straight from each node's MQTT rows (each node sees a share of every device:
# wrong, but the same window work), once through the repartition topic (tansu).
# Reported: events per CPU-second of the three nodes and tansu, until every row is in
# the raw table and, with the topic, read back from it.
#
# MQTT: `sluice-loadtest telemetry` publishes EVENTS (default 1,000,000) at RATE
# (default 150,000/s) at QoS 1 while sluice is subscribed; throughput is measured from
# the first event sluice receives to the last one visible to a query.
#
# A backlog of EVENTS telemetry events (default 2,000,000 for Kafka, 1,000,000 for
# Kinesis, served by kinesalite) is produced first; then
# `sluice run` (release) reads it into a fresh lake, and the script waits until every
# row is committed. Reported: events/s (wall), events per CPU-second of sluice
# (= events/s per core), and the checkpoint-on/off ratio.
#
# Needs the test virtualenv, mosquitto, kinesalite and the tansu binary that
# scripts/test.sh installs; BENCH_BIN=<dir with release sluice and sluice-loadtest> skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="$HOME/.cache/sluice/test-venv"
TANSU="${SLUICE_TANSU_ROOT:-$HOME/.cache/sluice/tansu-0.6.0}/bin/tansu"
source scripts/lib.sh
with_scratch

release_bins

# Runs sluice on the config until the lake holds $2 committed rows of `events`;
# prints "wall_s cpu_s". With $3, a command run once the sources are subscribed. With
# $4 = N > 0, N nodes of a cluster (`--node-id`) share the lake; CPU is their sum.
measure() {
  local config=$1 expected=$2 producer=${3:-} nodes=${4:-0} http lake pids=() https=()
  lake="$WORK/lake-$RANDOM"
  for i in $(seq "$((nodes > 0 ? nodes : 1))"); do
    local cluster=()
    [ "$nodes" -gt 0 ] && cluster=(--node-id "n$i")
    http="127.0.0.1:$(free_port)"
    SLUICE_LOG=warn AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x \
      "$BIN/sluice" run --config "$config" --data-dir "$lake" --http-listen "$http" "${cluster[@]}" &
    pids+=($!)
    https+=("$http")
  done
  http=${https[0]}
  if [ -n "$producer" ]; then
    local tries=0
    until curl -s "http://$http/metrics" | grep -q '^sluice_source_subscribed{.*} 1'; do
      tries=$((tries + 1))
      [ "$tries" -lt 600 ] || { echo "sluice never subscribed" >&2; exit 1; }
      sleep 0.1
    done
    $producer >"$WORK/producer.log" 2>&1 &
  fi
  "$VENV/bin/python" - "$expected" "${https[*]}" "${pids[*]}" <<'PY'
import sys, time, urllib.request, os
expected, https, pids = int(sys.argv[1]), sys.argv[2].split(), [int(p) for p in sys.argv[3].split()]
http = https[0]
tick = os.sysconf("SC_CLK_TCK")
# EXTRA_PIDS: processes whose CPU counts from the first event on (a broker the nodes
# share, started before them).
extra = [int(p) for p in os.environ.get("EXTRA_PIDS", "").split()]
def cpu(pids=pids):
    total = 0
    for pid in pids:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    return total / tick
def metric(name, label=""):
    total = 0.0
    for h in https:
        try:
            text = urllib.request.urlopen(f"http://{h}/metrics", timeout=2).read().decode()
        except Exception:
            continue
        total += sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                     if l.split("{")[0].split(" ")[0] == name and label in l)
    return total
start = None
# ALSO="<metric>|<label>": that metric, summed over the nodes, must reach the count too
# (the repartition topic's readers, which trail the raw table).
also = os.environ.get("ALSO", "").split("|") if os.environ.get("ALSO") else None
while True:
    if start is None and metric("sluice_source_events_received_total") > 0:
        start = time.time()
        extra_start = cpu(extra)
    if metric("sluice_lake_rows_written_total", 'table="events"') >= expected and (
            also is None or metric(*also) >= expected):
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
print(f"{time.time() - start:.2f} {cpu() + cpu(extra) - extra_start:.2f}")
PY
  kill "${pids[@]}"; wait "${pids[@]}" || true
}

# Prints one line per "label|wall_s cpu_s" result, then (unless COST=0) the first's
# cost against the second.
report() {
  local name=$1 events=$2
  shift 2
  "$VENV/bin/python" - "$name" "$events" "$@" <<'PY'
import sys
import os
name, n = sys.argv[1], int(sys.argv[2])
runs = [(label, *map(float, r.split())) for label, r in (a.split("|") for a in sys.argv[3:])]
print(f"{name}: {n} events")
for label, wall, cpu in runs:
    print(f"  {label:<34} {n / wall:>10,.0f} events/s  {n / cpu:>10,.0f} events/CPU-s  ({wall:.2f} s wall, {cpu:.2f} s CPU)")
if os.environ.get("COST", "1") == "1":
    (first, w1, _), (second, w2, _) = runs[0], runs[1]
    print(f"  cost of {first!r} against {second!r}: {100 * (1 - w2 / w1):.1f}% of throughput")
PY
}

# Reads the backlog ($2 events) with checkpoints every 3s and off; $3 writes the
# source section for a checkpoint interval.
checkpoints_on_off() {
  local name=$1 events=$2 source=$3 results=()
  for interval in 3s 0s; do
    { stream_config "$interval"; "$source" "$interval"; } >"$WORK/$interval.toml"
    results+=("checkpoints every $interval|$(measure "$WORK/$interval.toml" "$events")")
  done
  report "$name" "$events" "${results[0]}" "${results[1]/every 0s/off}"
}

stream_config() {
  cat <<EOF
[lake]
checkpoint_interval = "$1"
[streams.events]
schema = "telemetry"
EOF
}

# Starts tansu and fills topic `bench` ($2 partitions) with $1 telemetry events; sets
# `port` and `topic`.
kafka_backlog() {
  local events=$1 partitions=$2
  port=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
  topic=bench
  "$VENV/bin/python" - "127.0.0.1:$port" "$topic" "$events" "$partitions" <<'PY'
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
broker, topic, n, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
admin = AdminClient({"bootstrap.servers": broker})
for f in admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
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
}

bench_kafka() {
  local events=${EVENTS:-2000000} port topic
  kafka_backlog "$events" 3
  kafka_source() {
    cat <<EOF
[sources.bench]
type = "kafka"
brokers = "127.0.0.1:$port"
topics = ["$topic"]
group_id = "bench-$1"
stream = "events"
EOF
  }
  checkpoints_on_off "Kafka → lake" "$events" kafka_source
}

bench_cluster() {
  local events=${EVENTS:-2000000} port topic results=()
  kafka_backlog "$events" 12
  for nodes in 1 3; do
    { stream_config 3s; cat <<EOF
[sources.bench]
type = "kafka"
brokers = "127.0.0.1:$port"
topics = ["$topic"]
group_id = "bench-cluster-$nodes"
stream = "events"
EOF
    } >"$WORK/cluster-$nodes.toml"
    results+=("$nodes node(s)|$(measure "$WORK/cluster-$nodes.toml" "$events" "" "$nodes")")
  done
  COST=0 report "Kafka → lake, one node against three" "$events" "${results[@]}"
  "$VENV/bin/python" - "$events" "${results[@]}" <<'PY'
import sys
n = int(sys.argv[1])
per_cpu = [n / float(r.split("|")[1].split()[1]) for r in sys.argv[2:]]
print(f"  three nodes' events per CPU-second as a share of one node's: {100 * per_cpu[1] / per_cpu[0]:.1f}% (target >= 85%)")
PY
}

bench_kinesis() {
  local events=${EVENTS:-1000000} port
  port=$(free_port)
  mkdir -p "$WORK/kinesalite"
  NODE_PATH="${SLUICE_KINESALITE_ROOT:-$HOME/.cache/sluice/kinesalite-3.3.3}/node_modules" \
    node scripts/kinesalite.js "$port" "$WORK/kinesalite" >"$WORK/kinesalite.log" 2>&1 &
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
  kinesis_source() {
    cat <<EOF
[sources.bench]
type = "kinesis"
kinesis_stream = "bench"
endpoint = "http://127.0.0.1:$port"
region = "us-east-1"
stream = "events"
EOF
  }
  checkpoints_on_off "Kinesis (kinesalite) → lake" "$events" kinesis_source
}

bench_mqtt() {
  local events=${EVENTS:-1000000} rate=${RATE:-150000} results=() inflight durable port n
  n=$((events / rate * rate))
  for run in "1000 true" "1000 false" "20 true"; do
    read -r inflight durable <<<"$run"
    port=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages %s\n' \
      "$port" "$inflight" >"$WORK/mosquitto-$port.conf"
    "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto-$port.conf" >"$WORK/mosquitto.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
    { stream_config 3s; cat <<EOF
[sources.bench]
type = "mqtt"
url = "mqtt://127.0.0.1:$port"
topics = ["devices/+/telemetry"]
stream = "events"
durable_acks = $durable
EOF
    } >"$WORK/mqtt-$port.toml"
    local producer="$BIN/sluice-loadtest telemetry --target mqtt://127.0.0.1:$port --devices 1000 --qos 1 --rate $rate --duration $((events / rate))s"
    results+=("durable acks $durable, in-flight $inflight|$(measure "$WORK/mqtt-$port.toml" "$n" "$producer")")
  done
  report "MQTT QoS 1 → lake" "$n" "${results[@]}"
}

bench_repartition() {
  local events=${EVENTS:-1000000} rate=${RATE:-50000} results=() port kafka n producer
  n=$((events / rate * rate))
  port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 1000\n' \
    "$port" >"$WORK/mosquitto-$port.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto-$port.conf" >"$WORK/mosquitto.log" 2>&1 &
  PIDS+=($!)
  wait_port "$port"
  kafka=$(free_port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$kafka" --advertised-listener-url "tcp://127.0.0.1:$kafka" \
    --storage-engine memory://tansu/ >"$WORK/tansu.log" 2>&1 &
  PIDS+=($!)
  local tansu=$!
  wait_port "$kafka"
  producer="$BIN/sluice-loadtest telemetry --target mqtt://127.0.0.1:$port --devices 1000 --qos 1 --rate $rate --duration $((events / rate))s"
  for topic in direct repartition; do
    { stream_config 3s; cat <<EOF
[windows.device_minute]
input = "events"
kind = "tumbling"
size = "1m"
group_by = ["device_id"]
select = ["count(*) AS n", "avg(temperature) AS t_avg"]
[sources.bench]
type = "mqtt"
url = "mqtt://127.0.0.1:$port"
topics = ["devices/+/telemetry"]
client_id = "bench-$topic"
share_group = "bench-$topic"
stream = "events"
EOF
      if [ "$topic" = repartition ]; then
        printf '[cluster.repartition]\nbrokers = "127.0.0.1:%s"\ntopic_prefix = "bench-"\n' "$kafka"
      fi
    } >"$WORK/repartition-$topic.toml"
    local also=""
    if [ "$topic" = repartition ]; then
      also='sluice_source_events_received_total|component="repartition-events"'
    fi
    results+=("3 nodes, windows $topic|$(ALSO=$also EXTRA_PIDS=$tansu measure "$WORK/repartition-$topic.toml" "$n" "$producer" 3)")
  done
  report "MQTT QoS 1 → lake on three nodes, windows fed directly and through the repartition topic" "$n" "${results[@]}"
}

for target in "${@:-kafka}"; do
  "bench_$target"
done
