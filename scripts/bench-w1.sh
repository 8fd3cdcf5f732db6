#!/usr/bin/env bash
# The W1 benchmark of issue 3, through the real pipeline (`sluice run --from-file`):
#   tumbling  W1 (10M events, 10k devices, 1 h, event times up to 2 s out of order, 1% errors), 1-min windows
#   hopping   the same with 1-hour windows sliding by 1 minute
#   keys1m    2M events from 1,000,000 devices inside one minute: peak RSS with 1M open keys
# Each line reports events, wall and CPU seconds, events/s, events/s per CPU-second
# (= per core) and peak RSS, as logged by `sluice run` at the end of a bounded run.
# Usage: scripts/bench-w1.sh [tumbling|hopping|keys1m ...]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${W1_DIR:-/tmp/sluice-w1}"
mkdir -p "$W"
cargo build --release -q -p sluice -p sluice-loadtest
bin=./target/release
[ -s "$W/w1.jsonl" ] || "$bin/sluice-loadtest" generate --out "$W/w1.jsonl"
run() {
  local name=$1 config=$2 input=$3 table=$4
  rm -rf "$W/lake-$name"
  SLUICE_LOG=info "$bin/sluice" run --config "$config" --data-dir "$W/lake-$name" \
    --from-file "telemetry=$input" 2>&1 | grep "bounded run done" | sed -e 's/.*bounded run done/  /' -e "s/^/$name:/"
  "$bin/sluice" query --data-dir "$W/lake-$name" \
    "SELECT count(*) AS windows_rows, sum(events) AS events_in_windows FROM $table" | sed "s/^/  /"
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
      *) echo "unknown benchmark $w" >&2; exit 2 ;;
    esac
  done
done
