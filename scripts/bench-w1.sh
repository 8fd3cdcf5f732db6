#!/usr/bin/env bash
# The W1 benchmark of issue 3, through the real pipeline (`sluice run --from-file`):
#   tumbling  W1 (10M events, 10k devices, 1 h, event times up to 2 s out of order, 1% errors), 1-min windows
#   hopping   the same with 1-hour windows sliding by 1 minute
#   keys1m    2M events from 1,000,000 devices inside one minute: peak RSS with 1M open keys
#   function  W1 through an expensive function (config/examples/w1-function.toml) with
#             concurrency 1, then 2: events/s and events/s per core of each
#   limitcost decode + Parquet write of 3M W1 events (`sluice-loadtest bench`), without
#             and with a per-device limit that never binds, in PAIRS (default 8)
#             alternating runs; the medians and the median ratio (issue 7: >= 90%);
#             KEY_BLOCK=1 puts the limit in block mode
#   workers   tumbling W1 with 1 decode worker pinned to 1 core (taskset -c 0) and with
#             2 workers pinned to 2 cores (taskset -c 0,1), alternating, PAIRS (default
#             3) times: the median events/s and events/s per CPU-second of each, and
#             the ratio of events/s (issue 21: >= 1.7). With OTHER_BIN, a third series
#             runs that older `sluice` pinned to 1 core (the per-core figure of today)
#   versus    tumbling W1 with the `sluice` in OTHER_BIN (say, a release build of an
#             older commit) and this one, alternating, PAIRS (default 3) times; the
#             median events/s of each and their ratio (this / other)
# Each line reports events, wall and CPU seconds, events/s, events/s per CPU-second
# (= per core) and peak RSS, as logged by `sluice run` at the end of a bounded run.
# Usage: scripts/bench-w1.sh [tumbling|hopping|keys1m|function|limitcost|workers|versus ...]   (default: the first three)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${W1_DIR:-/tmp/sluice-w1}"
mkdir -p "$W"
bin="${BENCH_BIN:-./target/release}"   # BENCH_BIN=dir with prebuilt binaries skips the build
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release -q -p sluice-loadtest
  # limitcost alone needs only the load tester.
  [ "${*:-}" = limitcost ] || cargo build --release -q -p sluice
fi
run() {
  local name=$1 config=$2 input=$3 table=$4
  [ -s "$W/w1.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/w1.jsonl"
  rm -rf "$W/lake-$name"
  SLUICE_LOG=info "$bin/sluice" run --config "$config" --data-dir "$W/lake-$name" \
    --from-file "telemetry=$input" 2>&1 | grep "bounded run done" | sed -e 's/.*bounded run done/  /' -e "s/^/$name:/"
  "$bin/sluice" query --data-dir "$W/lake-$name" \
    "${5:-SELECT count(*) AS windows_rows, sum(events) AS events_in_windows FROM $table}" | sed "s/^/  /"
}
median() { sort -g | awk '{v[NR]=$1} END {printf "%.3f", (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }
limit_cost() {
  [ -s "$W/w1-3m.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/w1-3m.jsonl" --events 3000000
  local rates="$W/limitcost.txt"
  : >"$rates"
  for _ in $(seq "${PAIRS:-8}"); do
    local a b
    a=$("$bin/sluice-loadtest" bench --input "$W/w1-3m.jsonl" | awk '/events\/s\/core/{print $2}')
    b=$("$bin/sluice-loadtest" bench --input "$W/w1-3m.jsonl" --per-key-rate 1000000 ${KEY_BLOCK:+--per-key-block} | awk '/events\/s\/core/{print $2}')
    echo "$a $b" | tee -a "$rates" | awk '{printf "  without %d  with %d  ratio %.3f\n", $1, $2, $2/$1}'
  done
  echo "limitcost: median events/s/core without $(cut -d' ' -f1 "$rates" | median), with $(cut -d' ' -f2 "$rates" | median), median ratio $(awk '{print $2/$1}' "$rates" | median)"
}
versus() {
  [ -n "${OTHER_BIN:-}" ] || { echo "versus needs OTHER_BIN=<dir with the other sluice>" >&2; exit 2; }
  [ -s "$W/w1.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/w1.jsonl"
  local rates="$W/versus.txt" a b
  : >"$rates"
  rate_of() { # sluice-binary
    rm -rf "$W/lake-versus"
    SLUICE_LOG=info "$1" run --config config/examples/w1-tumbling.toml --data-dir "$W/lake-versus" \
      --from-file "telemetry=$W/w1.jsonl" 2>&1 | grep "bounded run done" | sed -e 's/.*events_per_s=\([0-9]*\).*/\1/'
  }
  for _ in $(seq "${PAIRS:-3}"); do
    a=$(rate_of "$OTHER_BIN/sluice")
    b=$(rate_of "$bin/sluice")
    echo "$a $b" | tee -a "$rates" | awk '{printf "  other %d  this %d events/s  ratio %.3f\n", $1, $2, $2/$1}'
  done
  echo "versus: median events/s other $(cut -d' ' -f1 "$rates" | median), this $(cut -d' ' -f2 "$rates" | median), median ratio $(awk '{print $2/$1}' "$rates" | median)"
}
workers() {
  [ -s "$W/w1.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/w1.jsonl"
  local rates="$W/workers.txt"
  : >"$rates"
  # One pinned bounded run: "events/s events/s-per-CPU-second".
  pinned() { # cpus sluice-binary [flags...]
    local cpus=$1 sluice=$2
    shift 2
    rm -rf "$W/lake-workers"
    SLUICE_LOG=info taskset -c "$cpus" "$sluice" run --config config/examples/w1-tumbling.toml \
      --data-dir "$W/lake-workers" --from-file "telemetry=$W/w1.jsonl" "$@" 2>&1 |
      grep "bounded run done" | sed -e 's/.*events_per_s=\([0-9]*\) events_per_cpu_s=\([0-9]*\).*/\1 \2/'
  }
  for _ in $(seq "${PAIRS:-3}"); do
    local one two old="0 0"
    one=$(pinned 0 "$bin/sluice" --workers 1)
    two=$(pinned 0,1 "$bin/sluice" --workers 2)
    [ -z "${OTHER_BIN:-}" ] || old=$(pinned 0 "$OTHER_BIN/sluice")
    echo "$one $two $old" | tee -a "$rates" | awk '{printf "  1 worker/1 core %d ev/s (%d/cpu-s)  2 workers/2 cores %d ev/s (%d/cpu-s)  ratio %.3f%s\n", $1, $2, $3, $4, $3/$1, ($5 > 0 ? sprintf("  other/1 core %d ev/s (%d/cpu-s)", $5, $6) : "")}'
  done
  echo "workers: median events/s 1 worker $(cut -d' ' -f1 "$rates" | median), 2 workers $(cut -d' ' -f3 "$rates" | median), median ratio $(awk '{print $3/$1}' "$rates" | median); events/s per CPU-second 1 worker $(cut -d' ' -f2 "$rates" | median), 2 workers $(cut -d' ' -f4 "$rates" | median)${OTHER_BIN:+, other on 1 core $(cut -d' ' -f6 "$rates" | median) (1 worker / other: $(awk '{print $2/$6}' "$rates" | median))}"
}
for what in "${@:-tumbling hopping keys1m}"; do
  for w in $what; do
    case $w in
      tumbling) run tumbling config/examples/w1-tumbling.toml "$W/w1.jsonl" device_minute ;;
      hopping) run hopping config/examples/w1-hopping.toml "$W/w1.jsonl" device_hour_sliding ;;
      keys1m)
        [ -s "$W/keys1m.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/keys1m.jsonl" \
          --events 2000000 --devices 1000000 --span-secs 50
        run keys1m config/examples/w1-tumbling.toml "$W/keys1m.jsonl" device_minute ;;
      function)
        for c in 1 2; do
          sed "s/^concurrency = 1/concurrency = $c/" config/examples/w1-function.toml >"$W/w1-function-$c.toml"
          run "function-c$c" "$W/w1-function-$c.toml" "$W/w1.jsonl" enriched \
            "SELECT count(*) AS rows, count(DISTINCT digest) AS digests FROM enriched"
        done ;;
      limitcost) limit_cost ;;
      versus) versus ;;
      workers) workers ;;
      *) echo "unknown benchmark $w" >&2; exit 2 ;;
    esac
  done
done
